"""Prune configuration, mask computation (one layer at a time) and mask application."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .cluster import ClusterParams, LayerClusters, allocate_cluster_prune_counts, cluster_rows
from .layers import (
    DEFAULT_FAMILIES,
    FAMILIES,
    LayerFilter,
    detect_architecture,
    find_prunable_layers,
    unwrap_diffusion_model,
)
from .report import LayerSparsity, SparsityReport, count_kept
from .score import METRICS, MetricParams, score_layer
from .stats import CalibrationError, CalibrationStats, WeightFn, module_weight
from .util.packing import PackedMask
from .util.selection import prune_lowest

__all__ = [
    "GRANULARITIES",
    "PATTERNS",
    "PruneConfig",
    "apply_masks_",
    "compute_masks",
    "iter_masks",
    "layer_keep_mask",
    "parse_pattern",
    "prune_lowest",
    "prune_model_",
    "select_layers",
]

log = logging.getLogger("ditprune")

GRANULARITIES = ("layer", "row", "column", "cluster")
PATTERNS = ("unstructured", "2:4", "4:8")
ProgressFn = Callable[[int, int, str], None]


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``"unstructured"`` -> None."""
    if pattern == "unstructured":
        return None
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; choose from {list(PATTERNS)}")
    n, m = pattern.split(":")
    return int(n), int(m)


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. The defaults are DiT-Pruning as chosen by the quality benchmark.

    Attributes:
        sparsity: fraction of weights removed in every selected layer, in (0, 1). For an N:M
            pattern it must equal ``1 - N/M`` (0.5 for 2:4 and 4:8).
        metric: ``magnitude``, ``wanda``, ``ria`` or ``energy``.
        granularity: comparison group: ``layer``, ``row`` (output channel), ``column`` (input
            channel) or ``cluster``. Ignored by N:M patterns, whose groups are M inputs of a row.
        pattern: ``unstructured``, ``2:4`` or ``4:8`` (groups along the input dimension).
        metric_params: parameters of the metric (energy balance, row normalisation, RIA power).
        cluster_params: parameters of the cluster granularity.
        families: layer families to prune (default :data:`~ditprune_core.layers.DEFAULT_FAMILIES`).
        layer_regex: only layers whose name matches this regular expression (``re.search``).
        filter_fn: optional ``filter_fn(module, name) -> bool``, applied last; not serialised.
    """

    sparsity: float = 0.5
    metric: str = "energy"
    granularity: str = "layer"
    pattern: str = "unstructured"
    metric_params: MetricParams = field(default_factory=MetricParams)
    cluster_params: ClusterParams = field(default_factory=ClusterParams)
    families: tuple[str, ...] = DEFAULT_FAMILIES
    layer_regex: str | None = None
    filter_fn: LayerFilter | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 < float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be strictly between 0 and 1, got {self.sparsity!r}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {list(METRICS)}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose from {list(GRANULARITIES)}")
        nm = parse_pattern(self.pattern)
        if nm is not None and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(
                f"pattern {self.pattern} prunes exactly {1 - nm[0] / nm[1]:.0%} of every layer; set "
                f"sparsity={1 - nm[0] / nm[1]} (got {self.sparsity})"
            )
        object.__setattr__(self, "families", tuple(self.families))
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown layer families {unknown}; choose from {list(FAMILIES)}")
        if not self.families:
            raise ValueError("families is empty: choose at least one layer family to prune")
        if self.layer_regex is not None:
            try:
                re.compile(self.layer_regex)
            except re.error as exc:
                raise ValueError(
                    f"layer_regex {self.layer_regex!r} is not a valid regular expression: {exc}"
                ) from exc

    @property
    def needs_calibration(self) -> bool:
        return self.metric != "magnitude"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``filter_fn`` excluded)."""
        out = asdict(self)
        out.pop("filter_fn")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneConfig:
        data = dict(data)
        data["metric_params"] = MetricParams(**data.get("metric_params", {}))
        data["cluster_params"] = ClusterParams(**data.get("cluster_params", {}))
        if "families" in data:
            data["families"] = tuple(data["families"])
        return cls(**data)


def select_layers(model: nn.Module | object, config: PruneConfig) -> dict[str, nn.Linear]:
    """The layers ``config`` prunes in ``model``."""
    pattern = re.compile(config.layer_regex) if config.layer_regex else None

    def keep(module: nn.Module, name: str) -> bool:
        if pattern is not None and not pattern.search(name):
            return False
        return config.filter_fn(module, name) if config.filter_fn is not None else True

    return find_prunable_layers(model, families=config.families, filter_fn=keep)


def _nm_keep(scores: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Keep the ``n`` best of every ``m`` consecutive inputs of each row (a block of rows at a time)."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(
            f"layer {name!r} has {in_f} input features, not divisible by {m}: pattern {n}:{m} "
            f"cannot apply; exclude it with layer_regex/families or use unstructured sparsity"
        )
    keep = torch.zeros(out_f, in_f // m, m, dtype=torch.bool, device=scores.device)
    step = max(1, _NM_BLOCK_ELEMENTS // in_f)
    for start in range(0, out_f, step):
        groups = scores[start : start + step].reshape(-1, in_f // m, m)
        keep[start : start + step].scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(out_f, in_f)


_NM_BLOCK_ELEMENTS = 1 << 18


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

    Only this layer's scores exist while it runs. ``clusters`` may be passed to reuse an
    assignment (the cluster node does); otherwise it is computed when the granularity needs it.
    """
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


def iter_masks(
    model: nn.Module | object,
    stats: CalibrationStats | None,
    config: PruneConfig,
    *,
    progress: ProgressFn | None = None,
    clusters: Mapping[str, LayerClusters] | None = None,
    weight_fn: WeightFn = module_weight,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, keep_mask)`` one layer at a time: at most one layer's scores exist at once.

    ``weight_fn(name, layer)`` gives the weight to score (default: ``layer.weight``); a host that
    keeps original weights elsewhere (ComfyUI while a patched clone is loaded) passes its own.

    Raises:
        CalibrationError: the metric needs statistics and ``stats`` is None or does not match.
    """
    layers = select_layers(model, config)
    if not layers:
        raise ValueError(
            f"no layer of families {list(config.families)} matches (layer_regex={config.layer_regex!r})"
        )
    if config.needs_calibration:
        if stats is None:
            raise CalibrationError(f"metric {config.metric!r} needs a calibration; run Calibrate first")
        stats.validate_for(layers, weight_fn)
    for i, (name, layer) in enumerate(layers.items()):
        a = stats[name].activation_sq_mean if (stats is not None and name in stats) else None
        cached = clusters.get(name) if clusters is not None else None
        with torch.no_grad():
            keep = layer_keep_mask(name, weight_fn(name, layer).detach(), a, config, cached)
        if progress is not None:
            progress(i + 1, len(layers), name)
        yield name, keep


def compute_masks(
    model: nn.Module | object,
    stats: CalibrationStats | None,
    config: PruneConfig,
    *,
    progress: ProgressFn | None = None,
    packed: bool = False,
) -> dict[str, torch.Tensor] | dict[str, PackedMask]:
    """``{layer name: keep-mask (out, in)}`` for every layer ``config`` selects.

    Scores are computed and dropped one layer at a time; only the masks are kept: bool tensors, or
    with ``packed=True`` :class:`~ditprune_core.util.packing.PackedMask` (1 bit per weight), which is
    what a 12B model needs.
    """
    if packed:
        return {
            name: PackedMask.from_bool(keep)
            for name, keep in iter_masks(model, stats, config, progress=progress)
        }
    return dict(iter_masks(model, stats, config, progress=progress))


MaskLike = torch.Tensor | PackedMask


def _as_bool(keep: MaskLike, device: torch.device) -> torch.Tensor:
    return keep.to_bool(device) if isinstance(keep, PackedMask) else keep.to(device)


def apply_masks_(model: nn.Module | object, masks: Mapping[str, MaskLike]) -> None:
    """Zero, in place, the weights whose mask entry is False (bool or packed masks).

    Raises:
        KeyError: a mask names a layer the model lacks.
        ValueError: a mask's shape differs from its layer's weight.
    """
    module = unwrap_diffusion_model(model)
    named = dict(module.named_modules())
    for name, keep in masks.items():
        layer = named.get(name)
        if not isinstance(layer, nn.Linear):
            raise KeyError(f"mask for {name!r}, but the model has no Linear layer of that name")
        if tuple(keep.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(keep.shape)}, the weight {tuple(layer.weight.shape)}"
            )
    with torch.no_grad():
        for name, keep in masks.items():
            weight = named[name].weight
            weight.masked_fill_(~_as_bool(keep, weight.device), 0)


def prune_model_(
    model: nn.Module | object,
    stats: CalibrationStats | None,
    config: PruneConfig,
    *,
    progress: ProgressFn | None = None,
) -> SparsityReport:
    """Compute each layer's mask and zero its weights at once, in place (streaming).

    At any moment only one layer's scores and mask exist beside the model, so this is how a
    FLUX.1-dev-sized model is pruned in bounded memory. Returns the sparsity report.
    """
    module = unwrap_diffusion_model(model)
    template = detect_architecture(module)
    named = dict(module.named_modules())
    rows = []
    with torch.no_grad():
        for name, keep in iter_masks(module, stats, config, progress=progress):
            weight = named[name].weight
            weight.masked_fill_(~keep, 0)
            rows.append(LayerSparsity.of(name, template, keep.numel(), count_kept(keep)))
            del keep
    return SparsityReport(tuple(rows))
