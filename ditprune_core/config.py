"""What to prune and how: :class:`PruneConfig`, its constants and its parsing (one home for each rule).

Every choice a caller can make is validated here, once, when the config is built: the metric
(by :func:`~ditprune_core.score.check_metric`), the comparison group, the N:M pattern (by
:func:`parse_pattern`, which the nodes use too) and the layer selection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .cluster import ClusterParams
from .layers import DEFAULT_FAMILIES, FAMILIES, LayerFilter
from .score import MetricParams, check_metric, needs_calibration

__all__ = ["GRANULARITIES", "PATTERNS", "ProgressFn", "PruneConfig", "parse_pattern"]

GRANULARITIES = ("layer", "row", "column", "cluster")
PATTERNS = ("unstructured", "2:4", "4:8")
#: ``progress(done, total, layer_name)``
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
        check_metric(self.metric)
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
        return needs_calibration(self.metric)

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
