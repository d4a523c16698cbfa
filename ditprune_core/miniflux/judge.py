"""Fixed judges of MiniFlux's generated digits: a classifier and a feature space for Fréchet distance.

For 8x8 models (miniflux-a, miniflux-b) both are fit on scikit-learn's real digits; for larger
images (miniflux-c's 32x32) on :data:`JUDGE_SAMPLES` procedural digits (:mod:`.data`) drawn with
:data:`JUDGE_SEED`, which the trainer never draws. Fixed seeds: every run uses the same judges.
Images are (B, 1, S, S) tensors in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["JUDGE_SAMPLES", "JUDGE_SEED", "DigitJudge", "frechet_distance", "load_judge"]

#: the procedural judge's training set: this many digits, drawn with this seed
JUDGE_SAMPLES, JUDGE_SEED = 6000, 90_210


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
    """Classifier and PCA feature space fit on digits, seen through ``pool`` x ``pool`` average pooling.

    The 8x8 judge (``pool`` 1) is a logistic regression on the real digits' pixels; the larger
    judges average-pool images down to 8x8 and classify with an RBF support-vector machine on 40
    principal components (a linear model reaches only 94% on the jittered procedural digits).
    """

    classifier: object
    pca: object
    real_mu: np.ndarray
    real_cov: np.ndarray
    pool: int = 1

    def to_pixels(self, images: torch.Tensor) -> np.ndarray:
        """[-1, 1] images (B, 1, S, S) -> (B, (S / pool)^2) on the 0..16 pixel scale of ``load_digits``."""
        return _pixels(images, self.pool)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = self.classifier.predict(self.to_pixels(images))  # type: ignore[attr-defined]
        return float((predicted == labels.numpy()).mean())

    def frechet(self, images: torch.Tensor) -> float:
        """Fréchet distance between generated images and the judge's digits in PCA-16 space."""
        feats = self.pca.transform(self.to_pixels(images))  # type: ignore[attr-defined]
        return frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), self.real_mu, self.real_cov)


def _pixels(images: torch.Tensor, pool: int) -> np.ndarray:
    if pool > 1:
        images = F.avg_pool2d(images.float(), pool)
    return ((images.clamp(-1, 1) + 1.0) * 8.0).reshape(images.shape[0], -1).double().numpy()


@lru_cache(maxsize=2)
def load_judge(image_size: int = 8) -> DigitJudge:
    """The judge of ``image_size`` x ``image_size`` digits: 8 for real digits, a multiple of 8 above.

    Raises:
        ValueError: a size that is not a multiple of 8 (no digit data at that size).
    """
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import SVC

    if image_size < 8 or image_size % 8:
        raise ValueError(
            f"no digit judge for {image_size}x{image_size} images: the size must be 8 or a multiple of 8"
        )
    pool = image_size // 8
    classifier: object
    if pool == 1:
        digits = load_digits()
        x, y = digits.data.astype(np.float64), digits.target
        classifier = LogisticRegression(max_iter=2000, C=0.1, random_state=0).fit(x, y)
    else:
        from .data import DigitStyle, procedural_digits

        images, labels = procedural_digits(JUDGE_SAMPLES, seed=JUDGE_SEED, style=DigitStyle(size=image_size))
        x, y = _pixels(images, pool), labels.numpy()
        classifier = make_pipeline(PCA(n_components=40, random_state=0), SVC(C=10.0)).fit(x, y)
    pca = PCA(n_components=16, random_state=0).fit(x)
    feats = pca.transform(x)
    return DigitJudge(classifier, pca, feats.mean(0), np.cov(feats, rowvar=False), pool)
