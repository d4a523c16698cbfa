"""Fixed judges of MiniFlux's generated digits: a classifier and a feature space for Fréchet distance.

Both are fit on scikit-learn's real digits with fixed seeds, so every run of the benchmark uses the
same judges. Images are (B, 1, 8, 8) tensors in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["DigitJudge", "frechet_distance", "load_judge"]


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), via symmetric eigendecompositions."""
    vals, vecs = np.linalg.eigh(cov1)
    sqrt1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    inner = np.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1)
    return float(
        ((mu1 - mu2) ** 2).sum()
        + np.trace(cov1)
        + np.trace(cov2)
        - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


@dataclass(frozen=True)
class DigitJudge:
    """Classifier (logistic regression) and PCA feature space fit on the real digits."""

    classifier: object
    pca: object
    real_mu: np.ndarray
    real_cov: np.ndarray

    @staticmethod
    def to_pixels(images: torch.Tensor) -> np.ndarray:
        """[-1, 1] images -> the 0..16 pixel scale of ``sklearn.datasets.load_digits``."""
        return ((images.clamp(-1, 1) + 1.0) * 8.0).reshape(images.shape[0], -1).double().numpy()

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = self.classifier.predict(self.to_pixels(images))  # type: ignore[attr-defined]
        return float((predicted == labels.numpy()).mean())

    def frechet(self, images: torch.Tensor) -> float:
        """Fréchet distance between generated images and the real digits in PCA-16 space."""
        feats = self.pca.transform(self.to_pixels(images))  # type: ignore[attr-defined]
        return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), self.real_mu, self.real_cov)


@lru_cache(maxsize=1)
def load_judge() -> DigitJudge:
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x, y = digits.data.astype(np.float64), digits.target
    classifier = LogisticRegression(max_iter=2000, C=0.1, random_state=0).fit(x, y)
    pca = PCA(n_components=16, random_state=0).fit(x)
    feats = pca.transform(x)
    return DigitJudge(classifier, pca, feats.mean(0), np.cov(feats, rowvar=False))
