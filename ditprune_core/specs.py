"""Lazy descriptions passed between the ComfyUI nodes: what to score and how to group.

Neither holds a score tensor: the scores of a 12B model are computed one layer at a time, when the
masks are made (:func:`~ditprune_core.prune.iter_masks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .cluster import ClusterParams
from .config import PruneConfig
from .layers import DEFAULT_FAMILIES
from .score import MetricParams, missing_calibration, needs_calibration
from .stats import CalibrationStats

__all__ = ["GroupingSpec", "SaliencySpec"]


@dataclass(frozen=True)
class SaliencySpec:
    """A metric, its parameters and the calibration it reads (None only for ``magnitude``)."""

    metric: str = "energy"
    params: MetricParams = field(default_factory=MetricParams)
    stats: CalibrationStats | None = None

    def __post_init__(self) -> None:
        if needs_calibration(self.metric) and self.stats is None:
            raise missing_calibration(self.metric)

    def describe(self) -> str:
        if self.metric == "energy":
            return f"energy (balance {self.params.balance}, normalize {self.params.normalize})"
        if self.metric == "ria":
            return f"ria (power {self.params.ria_power})"
        return self.metric


@dataclass(frozen=True)
class GroupingSpec:
    """Comparison group: ``layer``, ``row``, ``column`` or ``cluster`` with its parameters."""

    granularity: str = "layer"
    cluster_params: ClusterParams = field(default_factory=ClusterParams)

    def to_config(
        self,
        saliency: SaliencySpec,
        sparsity: float,
        *,
        pattern: str = "unstructured",
        families: Iterable[str] = DEFAULT_FAMILIES,
        layer_regex: str | None = None,
    ) -> PruneConfig:
        """The full, validated :class:`PruneConfig` (raises ``ValueError`` on bad values)."""
        return PruneConfig(
            sparsity,
            metric=saliency.metric,
            granularity=self.granularity,
            pattern=pattern,
            metric_params=saliency.params,
            cluster_params=self.cluster_params,
            families=tuple(families),
            layer_regex=layer_regex or None,
        )
