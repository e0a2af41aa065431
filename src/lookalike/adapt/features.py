"""Frozen features of the two images of every pair, saved as plain arrays (.npz) with the pair ids, split and PCA."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from lookalike.adapt.backbones import LayerFeatures, Progress, extract_image_features
from lookalike.adapt.pca import PCAProjection, fit_pca
from lookalike.config import DataConfig
from lookalike.core.atomic import atomic_path
from lookalike.core.errors import LookalikeError
from lookalike.data.images import transforms_for
from lookalike.data.pairs import PairsTable

SIDES = ("left", "right")


@dataclass(frozen=True)
class PairFeatures:
    """Row i of `left` and `right` [N, D] are the features of pair i's images (`*_flip`: of their mirror images)."""

    left: np.ndarray
    right: np.ndarray
    left_ids: np.ndarray  # [N] the pairs table's `left` paths
    right_ids: np.ndarray
    split: np.ndarray  # [N] the pairs table's split; the stored PCA was fitted on the 'train' rows only
    left_flip: np.ndarray | None = None
    right_flip: np.ndarray | None = None
    pca: PCAProjection | None = None
    meta: dict = field(default_factory=dict)  # extraction settings and the layer blocks making up the columns

    def __post_init__(self) -> None:
        n, dim = self.left.shape
        arrays = [self.right, self.left_flip, self.right_flip]
        if any(a is not None and a.shape != (n, dim) for a in arrays) or any(
            len(a) != n for a in (self.left_ids, self.right_ids, self.split)
        ):
            raise LookalikeError(f"pair features: expected left, right, flips [{n}, {dim}] and {n} ids and splits")

    def __len__(self) -> int:
        return len(self.left)

    @property
    def dim(self) -> int:
        return self.left.shape[1]

    @property
    def has_flip(self) -> bool:
        return self.left_flip is not None

    def images(self, rows: np.ndarray) -> np.ndarray:
        """Every image feature of the chosen pairs, both sides and their mirrors: what a PCA of those pairs is fitted
        on."""
        sides = [self.left, self.right] + ([self.left_flip, self.right_flip] if self.has_flip else [])
        return np.concatenate([side[rows] for side in sides])

    def project(self, pca: PCAProjection | None) -> PairFeatures:
        """The same pairs with every feature array passed through `pca` (None keeps them)."""
        if pca is None:
            return self
        flips = {f"{s}_flip": pca.transform(getattr(self, f"{s}_flip")) for s in SIDES} if self.has_flip else {}
        return replace(self, left=pca.transform(self.left), right=pca.transform(self.right), **flips, pca=None)

    def save(self, path: str | os.PathLike) -> None:
        """Write every array (and the PCA with the reduced features) into one .npz file atomically; no pickles."""
        arrays = {
            "left": self.left,
            "right": self.right,
            "left_ids": self.left_ids,
            "right_ids": self.right_ids,
            "split": self.split,
        }
        if self.has_flip:
            arrays.update(left_flip=self.left_flip, right_flip=self.right_flip)
        if self.pca is not None:
            arrays.update(
                self.pca.arrays(),
                left_reduced=self.pca.transform(self.left),
                right_reduced=self.pca.transform(self.right),
            )
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays, meta=np.array(json.dumps(self.meta)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PairFeatures:
        """Read pair features written by `save`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            optional = {k: arrays.get(k) for k in ("left_flip", "right_flip")}
            return cls(
                arrays["left"],
                arrays["right"],
                arrays["left_ids"].astype(str),
                arrays["right_ids"].astype(str),
                arrays["split"].astype(str),
                **optional,
                pca=PCAProjection.from_arrays(arrays),
                meta=json.loads(str(arrays["meta"])),
            )
        except FileNotFoundError:
            raise LookalikeError(f"{path}: no such pair features file") from None
        except (KeyError, ValueError, OSError) as exc:
            raise LookalikeError(f"{path}: not a pair features file written by lookalike ({exc})") from None


def extract_pair_features(
    pairs: PairsTable,
    backbones: list[LayerFeatures],
    image_sizes: list[int | list[int]],
    crop_fraction: float = 0.875,
    flip: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> PairFeatures:
    """Features of both images of every pair (each distinct image computed once), concatenated across backbones."""
    paths = [p.resolve() for side in SIDES for p in pairs.image_paths(side)]
    unique, index = np.unique(np.array([str(p) for p in paths]), return_inverse=True)
    transforms = [
        transforms_for(b, DataConfig(image_size=size, crop_fraction=crop_fraction))
        for b, size in zip(backbones, image_sizes)
    ]
    plain, mirrored = extract_image_features(
        [Path(p) for p in unique], backbones, transforms, flip, batch_size, num_workers, device, progress
    )
    n = len(pairs)
    left, right = index[:n], index[n:]
    flips = {"left_flip": mirrored[left], "right_flip": mirrored[right]} if mirrored is not None else {}
    blocks = [block for b in backbones for block in b.blocks]
    return PairFeatures(
        plain[left],
        plain[right],
        pairs.column("left").astype(str),
        pairs.column("right").astype(str),
        pairs.column("split").astype(str),
        **flips,
        meta={"blocks": blocks},
    )


def with_table_pca(features: PairFeatures, dim: int | None, seed: int = 0) -> PairFeatures:
    """The features with a PCA fitted on the pairs of the table's 'train' split only (None: no PCA)."""
    if dim is None:
        return features
    train = np.flatnonzero(features.split == "train")
    if len(train) == 0:
        raise LookalikeError("pairs table: no 'train' pairs to fit the PCA on")
    return replace(features, pca=fit_pca(features.images(train), dim, seed))
