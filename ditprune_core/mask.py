"""Mask: one layer's keep-mask from its scores, in its comparison group or N:M pattern.

:func:`layer_keep_mask` is the per-layer engine: for the cluster granularity it clusters the rows
first (KMeans' temporaries never stack on top of the scores), then scores the layer
(:mod:`ditprune_core.score`), then selects exactly the configured count in each group
(:mod:`ditprune_core.util.selection`). Only this layer's scores exist while it runs.
"""

from __future__ import annotations

import torch

from .cluster import LayerClusters, allocate_cluster_prune_counts, cluster_rows
from .config import PruneConfig, parse_pattern
from .score import score_layer
from .stats import check_activation_sq_mean
from .util.blocks import row_blocks
from .util.dtypes import first_non_finite
from .util.selection import prune_lowest

__all__ = ["layer_keep_mask"]


def _nm_keep(scores: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Keep the ``n`` best of every ``m`` consecutive inputs of each row (a block of rows at a time)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(
            f"layer {name!r} has {in_f} input features, not divisible by {m}: pattern {n}:{m} "
            f"cannot apply; exclude it with layer_regex/families or use unstructured sparsity"
        )
    keep = torch.zeros(out_f, in_f // m, m, dtype=torch.bool, device=scores.device)
    for span in row_blocks(out_f, in_f):
        groups = scores[span].reshape(-1, in_f // m, m)
        keep[span].scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(out_f, in_f)


def _counts_even(total: int, parts: int) -> torch.Tensor:
    """``total`` split over ``parts`` as evenly as possible (first ones get the extra)."""
    base, extra = divmod(total, parts)
    counts = torch.full((parts,), base, dtype=torch.int64)
    counts[:extra] += 1
    return counts


def layer_keep_mask(
    name: str,
    weight: torch.Tensor,
    activation_sq_mean: torch.Tensor | None,
    config: PruneConfig,
    clusters: LayerClusters | None = None,
) -> torch.Tensor:
    """Keep-mask (out, in) bool of one layer, on the weight's device.

    Order: cluster (cluster granularity only) -> score -> select. Only this layer's scores exist
    while it runs. ``clusters`` reuses a row assignment made earlier with
    :func:`~ditprune_core.cluster.cluster_rows`; without it the assignment is computed here.

    Args:
        name: the layer's name, for messages.
        weight: (out, in) weight.
        activation_sq_mean: (in,) calibrated E[x**2] per input channel, or None for magnitude.
        config: what to prune and how.
        clusters: optional row assignment for the cluster granularity.
    Returns:
        (out, in) bool, True where the weight is kept.
    """
    bad = first_non_finite(weight)
    if bad is not None:
        raise ValueError(
            f"layer {name!r} has a non-finite weight at {list(bad)} ({float(weight[bad])}): pruning "
            "would rank it arbitrarily; fix or reload the model (NaN: a broken file or fp16 overflow)"
        )
    if activation_sq_mean is not None:
        check_activation_sq_mean(activation_sq_mean, f"calibration of layer {name!r}")
    nm = parse_pattern(config.pattern)
    if nm is None and config.granularity == "cluster" and clusters is None:
        # cluster before scoring: KMeans' temporaries never stack on top of the scores
        clusters = cluster_rows(weight, activation_sq_mean, config.cluster_params)
    scores = score_layer(config.metric, weight, activation_sq_mean, config.metric_params)
    if nm is not None:
        return _nm_keep(scores, nm[0], nm[1], name)
    out_f, in_f = scores.shape
    s = float(config.sparsity)
    if config.granularity == "layer":
        return prune_lowest(scores.reshape(1, -1), torch.tensor([round(s * scores.numel())])).reshape(
            out_f, in_f
        )
    if config.granularity == "row":
        return prune_lowest(scores, torch.full((out_f,), round(s * in_f), dtype=torch.int64))
    if config.granularity == "column":
        return prune_lowest(scores.t(), torch.full((in_f,), round(s * out_f), dtype=torch.int64)).t()
    assert clusters is not None  # set above for the cluster granularity
    if clusters.labels.shape != (out_f,):
        raise ValueError(
            f"cluster assignment for {name!r} has {clusters.labels.numel()} rows, the layer {out_f}"
        )
    total = round(s * scores.numel())
    per_cluster = allocate_cluster_prune_counts(
        scores, clusters.labels, clusters.k, total, config.cluster_params.allocation
    )
    labels = clusters.labels.to(scores.device)
    if config.cluster_params.within == "row":
        # every row of a cluster prunes its share of the cluster's count (exact to one weight)
        row_counts = torch.empty(out_f, dtype=torch.int64, device=scores.device)
        for c, count in enumerate(per_cluster):
            rows = (labels == c).nonzero().squeeze(1)
            if rows.numel():
                row_counts[rows] = _counts_even(count, rows.numel()).to(scores.device)
        return prune_lowest(scores, row_counts)
    keep = torch.ones_like(scores, dtype=torch.bool)
    for c, count in enumerate(per_cluster):
        rows = (labels == c).nonzero().squeeze(1)
        if rows.numel():
            sub = scores.index_select(0, rows)
            keep[rows] = prune_lowest(sub.reshape(1, -1), torch.tensor([count])).reshape(sub.shape)
    return keep
