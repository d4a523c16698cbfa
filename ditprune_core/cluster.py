"""Clustering-aware granularity: group a layer's output rows by where they sit in 2-D weight space.

Our definition (the paper publishes none). Each output row i of a layer becomes a point::

    f1_i = log RMS_j(W_ij)                 # the row's weight scale
    f2_i = log RMS_j(W_ij * sqrt(a_j))     # its scale seen through the input energy

(``f2 = log max_j |W_ij|`` when no calibration is given). The fused FLUX matrices, such as
``linear1`` = q, k, v and MLP-in stacked, put their sub-matrices at distinct places in this plane.
The standardised points are clustered with scikit-learn's KMeans (seeded); ``k`` is fixed or chosen
by the best silhouette score (``k = 1`` when no ``k`` reaches ``min_silhouette``).

The layer's prune budget is then allocated across clusters (:func:`allocate_cluster_prune_counts`):
a blend, by ``allocation`` in [0, 1], of uniform sparsity and the sparsity each cluster would get
under one layer-wide threshold on the (row-normalised) scores. The blend keeps the layer total
exactly at its target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .util.blocks import row_blocks
from .util.selection import count_true, kth_smallest

__all__ = [
    "ClusterParams",
    "LayerClusters",
    "allocate_cluster_prune_counts",
    "cluster_rows",
    "row_features",
]

log = logging.getLogger("ditprune")
WITHIN = ("row", "cluster")


@dataclass(frozen=True)
class ClusterParams:
    """Parameters of the clustering granularity.

    Attributes:
        n_clusters: fixed number of clusters, or None to choose by silhouette up to ``max_clusters``.
        max_clusters: largest ``k`` tried when choosing automatically.
        min_silhouette: below this best silhouette the layer is one cluster.
        allocation: 0 gives every cluster the layer's sparsity; 1 gives each the sparsity a
            layer-wide threshold on scores would give it.
        within: ``"row"`` prunes each row of a cluster to the cluster's sparsity (comparisons within
            a row); ``"cluster"`` compares all weights of a cluster together.
        sample_rows: rows used to fit KMeans (all rows are then assigned); bounds the cost on
            FLUX-sized layers.
        seed: KMeans and sampling seed.
    """

    n_clusters: int | None = None
    max_clusters: int = 4
    min_silhouette: float = 0.5
    allocation: float = 1.0
    within: str = "row"
    sample_rows: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1 or None (automatic), got {self.n_clusters}")
        if self.max_clusters < 1:
            raise ValueError(f"max_clusters must be >= 1, got {self.max_clusters}")
        if not 0.0 <= self.allocation <= 1.0:
            raise ValueError(f"cluster allocation must be in [0, 1], got {self.allocation}")
        if self.within not in WITHIN:
            raise ValueError(f"unknown cluster comparison {self.within!r}; choose from {list(WITHIN)}")
        if self.sample_rows < 2:
            raise ValueError(f"sample_rows must be >= 2, got {self.sample_rows}")


@dataclass(frozen=True)
class LayerClusters:
    """Cluster assignment of one layer's rows.

    Attributes:
        labels: (out,) int64 cluster id per output row, ids ordered by increasing mean ``f1``.
        features: (out, 2) float32 points ``(f1, f2)`` (see module docstring).
        k: number of clusters.
        silhouette: silhouette score of the chosen ``k`` (None for ``k = 1``).
    """

    labels: torch.Tensor
    features: torch.Tensor
    k: int
    silhouette: float | None

    def sizes(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.k).tolist()


def row_features(weight: torch.Tensor, activation_sq_mean: torch.Tensor | None) -> torch.Tensor:
    """The 2-D point of every output row, (out, 2) float32 on the CPU (computed in row blocks)."""
    weight = weight.detach()
    out_f, in_f = weight.shape
    a = (
        None
        if activation_sq_mean is None
        else activation_sq_mean.to(device=weight.device, dtype=torch.float32)
    )
    f1 = torch.empty(out_f, device=weight.device)
    f2 = torch.empty(out_f, device=weight.device)
    for span in row_blocks(out_f, in_f):
        w2 = weight[span].float().pow(2)
        f1[span] = w2.mean(dim=1)
        if a is not None:
            f2[span] = w2.mul_(a).mean(dim=1)
        else:
            f2[span] = w2.amax(dim=1)
    f1 = f1.clamp_min(1e-30).sqrt().log()
    f2 = f2.clamp_min(1e-30).sqrt().log()
    return torch.stack([f1, f2], dim=1).cpu()


def cluster_rows(
    weight: torch.Tensor, activation_sq_mean: torch.Tensor | None, params: ClusterParams
) -> LayerClusters:
    """Cluster the output rows of one layer (see module docstring). Deterministic for a seed."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    features = row_features(weight, activation_sq_mean)
    n_rows = features.shape[0]
    points = features.double().numpy()
    std = points.std(axis=0)
    std[std == 0] = 1.0
    points = (points - points.mean(axis=0)) / std
    rng = np.random.default_rng(params.seed)
    sample = (
        rng.choice(n_rows, size=params.sample_rows, replace=False)
        if n_rows > params.sample_rows
        else np.arange(n_rows)
    )
    fit_points = points[sample]
    n_distinct = len(np.unique(fit_points.round(8), axis=0))

    if params.n_clusters is not None:
        candidates = [min(params.n_clusters, n_distinct)]
    else:
        candidates = list(range(2, min(params.max_clusters, n_distinct - 1) + 1))
    best: tuple[float, KMeans] | None = None
    for k in candidates:
        if k < 2:
            continue
        km = KMeans(n_clusters=k, n_init=4, random_state=params.seed).fit(fit_points)
        score = float(
            silhouette_score(
                fit_points, km.labels_, sample_size=min(2000, len(fit_points)), random_state=params.seed
            )
        )
        if best is None or score > best[0]:
            best = (score, km)
    if best is None or (params.n_clusters is None and best[0] < params.min_silhouette):
        return LayerClusters(torch.zeros(n_rows, dtype=torch.int64), features, 1, None)
    silhouette, km = best
    raw = km.predict(points)
    # relabel so that cluster 0 has the smallest mean row scale: stable ids for plots and reports
    order = np.argsort(km.cluster_centers_[:, 0])
    relabel = np.empty_like(order)
    relabel[order] = np.arange(len(order))
    labels = torch.from_numpy(relabel[raw].astype(np.int64))
    return LayerClusters(labels, features, int(km.n_clusters), silhouette)


def _largest_remainder(targets: np.ndarray, total: int, caps: np.ndarray) -> np.ndarray:
    """Integers near ``targets``, each <= its cap, summing exactly to ``total``."""
    floors = np.minimum(np.floor(targets).astype(np.int64), caps)
    remaining = total - int(floors.sum())
    order = np.argsort(-(targets - floors), kind="stable")
    out = floors.copy()
    i = 0
    while remaining > 0:
        j = order[i % len(order)]
        if out[j] < caps[j]:
            out[j] += 1
            remaining -= 1
        i += 1
    return out


def allocate_cluster_prune_counts(
    scores: torch.Tensor, labels: torch.Tensor, k: int, prune_total: int, allocation: float
) -> list[int]:
    """How many weights to prune in each cluster so that the layer prunes exactly ``prune_total``.

    Args:
        scores: (out, in) scores, comparable across rows.
        labels: (out,) cluster id per row.
        k: number of clusters.
        prune_total: weights to prune in the layer.
        allocation: blend between uniform (0) and layer-wide-threshold (1) sparsity per cluster.
    Returns:
        prune counts per cluster, summing to ``prune_total``.
    """
    rows_per_cluster = torch.bincount(labels, minlength=k).cpu().numpy()
    sizes = rows_per_cluster * scores.shape[1]
    uniform = sizes * (prune_total / max(1, scores.numel()))
    if allocation > 0 and 0 < prune_total < scores.numel():
        threshold = kth_smallest(scores.reshape(-1), prune_total)
        below = torch.cat(
            [count_true(scores[span] <= threshold) for span in row_blocks(*scores.shape)]
        ).squeeze(1)
        global_counts = (
            torch.zeros(k, dtype=torch.float64).index_add_(0, labels.cpu(), below.cpu().double()).numpy()
        )
        global_counts *= prune_total / max(1.0, global_counts.sum())
        targets = (1 - allocation) * uniform + allocation * global_counts
    else:
        targets = uniform
    return _largest_remainder(targets, prune_total, sizes.astype(np.int64)).tolist()
