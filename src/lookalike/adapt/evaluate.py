"""Top-k accuracy of matched pairs: is an image's partner among the k most similar images of the other side?"""

from __future__ import annotations

import numpy as np
import torch

from lookalike.losses.info_nce import cosine_matrix

# each metric is named top{k}/{direction}
DIRECTIONS = {
    "left_to_right": "left -> right",
    "right_to_left": "right -> left",
    "mean": "mean of both directions",
    "either": "either direction (published)",
}


def partner_ranks(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = first) of each left image's partner among all right images by cosine similarity, and vice versa.
    Ties count against the partner, so constant features never score."""
    sim = cosine_matrix(left.float(), right.float())
    diag = sim.diagonal()
    return (sim >= diag[:, None]).sum(1) - 1, (sim >= diag[None, :]).sum(0) - 1


def topk_accuracy(
    left: torch.Tensor | np.ndarray, right: torch.Tensor | np.ndarray, ks: tuple[int, ...] | list[int] = (1, 3, 5)
) -> dict[str, float]:
    """For each k: accuracy left->right, right->left, their mean, and the published 'either direction' variant (a pair
    counts when either of its images finds the other in its top k). The gallery is the other side of the same pairs."""
    left, right = torch.as_tensor(left), torch.as_tensor(right)
    lr, rl = partner_ranks(left, right)
    out = {}
    for k in ks:
        a, b = lr < k, rl < k
        out[f"top{k}/left_to_right"] = a.double().mean().item()
        out[f"top{k}/right_to_left"] = b.double().mean().item()
        out[f"top{k}/mean"] = (out[f"top{k}/left_to_right"] + out[f"top{k}/right_to_left"]) / 2
        out[f"top{k}/either"] = (a | b).double().mean().item()
    return out
