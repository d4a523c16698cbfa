from __future__ import annotations

import pytest

from ditprune_core import CalibrationError, ClusterParams, MetricParams, PruneConfig
from ditprune_core.specs import GroupingSpec, SaliencySpec


def test_specs_build_the_prune_config() -> None:
    saliency = SaliencySpec("magnitude")
    grouping = GroupingSpec("cluster", ClusterParams(n_clusters=3))
    config = grouping.to_config(saliency, 0.6, families=("mlp",), layer_regex="")
    assert config == PruneConfig(
        0.6,
        metric="magnitude",
        granularity="cluster",
        cluster_params=ClusterParams(n_clusters=3),
        families=("mlp",),
    )
    assert SaliencySpec("magnitude").describe() == "magnitude"
    assert GroupingSpec().to_config(saliency, 0.5).granularity == PruneConfig(0.5).granularity


def test_specs_refuse_bad_input() -> None:
    with pytest.raises(CalibrationError, match="needs a calibration"):
        SaliencySpec("energy", MetricParams())
    with pytest.raises(ValueError, match="unknown metric"):
        SaliencySpec("obs")
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        GroupingSpec().to_config(SaliencySpec("magnitude"), 1.0)
