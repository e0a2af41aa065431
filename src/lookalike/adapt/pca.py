"""PCA of pair features (scikit-learn), kept as plain arrays (mean, components) so it is saved without pickling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from lookalike.core.errors import LookalikeError


@dataclass(frozen=True)
class PCAProjection:
    """x -> (x - mean) @ components.T: the projection scikit-learn's PCA (without whitening) applies."""

    mean: np.ndarray  # [D]
    components: np.ndarray  # [n, D]
    explained_variance_ratio: np.ndarray  # [n]

    @property
    def dim(self) -> int:
        return len(self.components)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project rows of `x` [N, D] to [N, n] float32."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T).astype(np.float32)

    def arrays(self, prefix: str = "pca_") -> dict[str, np.ndarray]:
        """The projection as named arrays for an .npz file."""
        return {
            f"{prefix}mean": self.mean,
            f"{prefix}components": self.components,
            f"{prefix}explained_variance_ratio": self.explained_variance_ratio,
        }

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "pca_") -> PCAProjection | None:
        """The projection stored by `arrays`, or None when the file has none."""
        if f"{prefix}mean" not in arrays:
            return None
        return cls(arrays[f"{prefix}mean"], arrays[f"{prefix}components"], arrays[f"{prefix}explained_variance_ratio"])


def fit_pca(samples: np.ndarray, dim: int, seed: int = 0, field: str = "adapt.pca_dim") -> PCAProjection:
    """Fit a `dim`-component PCA on `samples` [M, D] (the training images only; the caller chooses them)."""
    most = min(samples.shape)
    if not 1 <= dim <= most:
        raise LookalikeError(
            f"{field}: expected 1 to {most} components ({samples.shape[0]} training images of {samples.shape[1]} "
            f"features), got {dim}"
        )
    pca = PCA(n_components=dim, random_state=seed).fit(np.asarray(samples, dtype=np.float64))
    return PCAProjection(pca.mean_.copy(), pca.components_.copy(), pca.explained_variance_ratio_.copy())
