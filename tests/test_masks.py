"""Granularities, patterns and configs on tiny layers with the expected keep-masks written out."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ditprune_core import (
    ClusterParams,
    PruneConfig,
    apply_masks_,
    compute_masks,
    find_prunable_layers,
    layer_keep_mask,
    sparsity_report,
)
from ditprune_core.cluster import LayerClusters, cluster_rows
from ditprune_core.util.selection import kth_smallest, prune_lowest

T, F = True, False


def mag(granularity: str, sparsity: float = 0.5, pattern: str = "unstructured", **kw: object) -> PruneConfig:
    return PruneConfig(sparsity, metric="magnitude", granularity=granularity, pattern=pattern, **kw)  # type: ignore[arg-type]


def test_prune_lowest_breaks_ties_in_index_order() -> None:
    keep = prune_lowest(torch.ones(1, 4), torch.tensor([2]))
    assert keep.tolist() == [[F, F, T, T]]
    keep = prune_lowest(torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.5]]), torch.tensor([1, 2]))
    assert keep.tolist() == [[T, F, T], [F, T, F]]


def test_row_layer_and_column_groups() -> None:
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [8.0, 7.0, 6.0, 5.0]])
    assert layer_keep_mask("l", w, None, mag("row")).tolist() == [[T, T, F, F], [T, T, F, F]]
    assert layer_keep_mask("l", w, None, mag("layer")).tolist() == [[F, F, F, F], [T, T, T, T]]
    w2 = torch.tensor([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [4.0, 6.0]])
    # each column keeps its 2 largest of 4
    assert layer_keep_mask("l", w2, None, mag("column")).tolist() == [[F, T], [F, T], [T, F], [T, F]]
    # the layer-wide comparison prunes the 4 smallest values 1..4
    assert layer_keep_mask("l", w2, None, mag("layer")).tolist() == [[F, T], [F, T], [F, T], [F, T]]


def test_n_m_patterns_along_inputs() -> None:
    w = torch.tensor([[9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0]])
    assert layer_keep_mask("l", w, None, mag("row", pattern="2:4")).tolist() == [[T, T, F, F, F, F, T, T]]
    assert layer_keep_mask("l", w, None, mag("row", pattern="4:8")).tolist() == [[T, T, T, T, F, F, F, F]]


def test_n_m_on_indivisible_layer_names_it() -> None:
    with pytest.raises(ValueError, match=r"'blocks\.0\.odd' has 6 input features, not divisible by 4"):
        layer_keep_mask("blocks.0.odd", torch.randn(2, 6), None, mag("row", pattern="2:4"))


def _two_scale_weight() -> torch.Tensor:
    # rows 0-3 large, rows 4-7 small; within a row the values are 1..4 times the row scale
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    return torch.cat([10 * base.repeat(4, 1), 0.1 * base.repeat(4, 1)])


def test_cluster_rows_finds_the_two_scales() -> None:
    clusters = cluster_rows(_two_scale_weight(), None, ClusterParams(n_clusters=2))
    assert clusters.k == 2
    assert clusters.labels.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]  # id 0 = smaller rows


@pytest.mark.parametrize(
    ("allocation", "expected_small_pruned", "expected_large_pruned"),
    [(0.0, 2, 2), (0.5, 3, 1), (1.0, 4, 0)],
)
def test_cluster_allocation_blends_uniform_and_layerwide(
    allocation: float, expected_small_pruned: int, expected_large_pruned: int
) -> None:
    w = _two_scale_weight()
    config = mag("cluster", cluster_params=ClusterParams(n_clusters=2, allocation=allocation))
    keep = layer_keep_mask("l", w, None, config)
    pruned_per_row = (~keep).sum(dim=1).tolist()
    assert pruned_per_row == [expected_large_pruned] * 4 + [expected_small_pruned] * 4
    # within a row the smallest go first
    if expected_large_pruned == 1:
        assert keep[0].tolist() == [F, T, T, T]
    assert int((~keep).sum()) == 16


def test_cluster_within_cluster_compares_all_rows_of_a_cluster() -> None:
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [100.0, 200.0], [300.0, 400.0]])
    params = ClusterParams(n_clusters=2, allocation=0.0, within="cluster")
    keep = layer_keep_mask("l", w, None, mag("cluster", cluster_params=params))
    assert keep.tolist() == [[F, F], [T, T], [F, F], [T, T]]


def test_given_cluster_assignment_is_used() -> None:
    w = torch.arange(1.0, 9.0).reshape(4, 2)
    clusters = LayerClusters(torch.tensor([0, 0, 1, 1]), torch.zeros(4, 2), 2, None)
    params = ClusterParams(allocation=0.0, within="cluster")
    keep = layer_keep_mask("l", w, None, mag("cluster", cluster_params=params), clusters)
    assert keep.tolist() == [[F, F], [T, T], [F, F], [T, T]]


@pytest.mark.parametrize("granularity", ["layer", "row", "column", "cluster"])
def test_exact_sparsity_over_random_shapes(granularity: str) -> None:
    gen = torch.Generator().manual_seed(3)
    for trial in range(12):
        out_f = int(torch.randint(3, 70, (1,), generator=gen))
        in_f = int(torch.randint(3, 70, (1,), generator=gen))
        sparsity = float(torch.empty(1).uniform_(0.05, 0.95, generator=gen))
        w = torch.randn(out_f, in_f, generator=gen)
        w[0, :2] = 0.0  # ties
        a = torch.rand(in_f, generator=gen).double() + 0.1
        config = PruneConfig(
            sparsity,
            metric="energy",
            granularity=granularity,
            cluster_params=ClusterParams(seed=trial, min_silhouette=0.0),
        )
        keep = layer_keep_mask("l", w, a, config)
        pruned = ~keep
        if granularity == "row":
            assert set(pruned.sum(1).tolist()) == {round(sparsity * in_f)}
        elif granularity == "column":
            assert set(pruned.sum(0).tolist()) == {round(sparsity * out_f)}
        else:
            assert int(pruned.sum()) == round(sparsity * w.numel())
            if granularity == "cluster":
                # rows of one cluster differ by at most one pruned weight
                clusters = cluster_rows(w, a, config.cluster_params)
                for c in range(clusters.k):
                    counts = pruned[clusters.labels == c].sum(1)
                    assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 0.0}, "strictly between 0 and 1"),
        ({"sparsity": 1.0}, "strictly between 0 and 1"),
        ({"sparsity": -0.2}, "strictly between 0 and 1"),
        ({"sparsity": 1.5}, "strictly between 0 and 1"),
        ({"metric": "sparsegpt"}, "unknown metric"),
        ({"granularity": "block"}, "unknown granularity"),
        ({"pattern": "1:4"}, "unknown sparsity pattern"),
        ({"pattern": "2:4", "sparsity": 0.6}, "set sparsity=0.5"),
        ({"families": ("attn",)}, "unknown layer families"),
        ({"families": ()}, "families is empty"),
        ({"layer_regex": "("}, "not a valid regular expression"),
    ],
)
def test_config_refuses_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PruneConfig(**kwargs)  # type: ignore[arg-type]


def test_config_round_trips_through_dict() -> None:
    config = PruneConfig(0.6, metric="ria", granularity="row", cluster_params=ClusterParams(n_clusters=3))
    assert PruneConfig.from_dict(config.to_dict()) == config


def test_compute_and_apply_on_a_model(tiny_flux: nn.Module) -> None:
    config = PruneConfig(0.5, metric="magnitude", granularity="row", layer_regex=r"single_blocks")
    masks = compute_masks(tiny_flux, None, config)
    assert list(masks) == ["single_blocks.0.linear1", "single_blocks.0.linear2"]
    before = tiny_flux.double_blocks[0].img_attn.qkv.weight.clone()
    apply_masks_(tiny_flux, masks)
    layers = find_prunable_layers(tiny_flux)
    report = sparsity_report(tiny_flux, layers={k: layers[k] for k in masks})
    assert report.sparsity == pytest.approx(0.5)
    assert torch.equal(tiny_flux.double_blocks[0].img_attn.qkv.weight, before)
    assert sparsity_report(tiny_flux, masks).by("block") == {
        "single_blocks.0": (report.total[0], report.total[1])
    }


def test_apply_masks_refuses_mismatches(tiny_flux: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"single_blocks\.0\.linear1.*shape"):
        apply_masks_(tiny_flux, {"single_blocks.0.linear1": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(KeyError, match="no Linear layer"):
        apply_masks_(tiny_flux, {"nope": torch.ones(2, 2, dtype=torch.bool)})


def test_cluster_masks_are_deterministic(tiny_flux: nn.Module) -> None:
    config = PruneConfig(
        0.6, metric="magnitude", granularity="cluster", cluster_params=ClusterParams(min_silhouette=0.0)
    )
    first = compute_masks(tiny_flux, None, config)
    second = compute_masks(tiny_flux, None, config)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert math.isclose(sparsity_report(tiny_flux, first).sparsity, 0.6, abs_tol=1e-3)


def test_ties_spanning_rows_keep_the_later_ones() -> None:
    scores = torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    keep = prune_lowest(scores, torch.tensor([2, 2, 2]))
    assert keep.tolist() == [[F, F, T, T], [F, T, F, T], [F, F, T, T]]


def test_kth_smallest_matches_kthvalue_on_large_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5_000_000, generator=gen)
    values[:1_000_000] = 0.25  # a big block of ties
    for k in (1, 1_234_567, 2_500_000, 4_999_999):
        assert kth_smallest(values, k) == values.kthvalue(k).values


def test_the_node_rules_live_in_the_core() -> None:
    """What the pruning nodes ask of the core: an N:M pattern fixes the sparsity, and a user's
    family choice always adds the generic DiTs' block Linears."""
    from ditprune_core.config import chosen_families, pattern_sparsity

    assert pattern_sparsity(0.3, "2:4") == 0.5 and pattern_sparsity(0.3, "4:8") == 0.5
    assert pattern_sparsity(0.3, "unstructured") == 0.3
    assert chosen_families({"attention": True, "mlp": False, "single_fused": True}) == (
        "attention",
        "single_fused",
        "block_linear",
    )
    with pytest.raises(ValueError, match="unknown layer families"):
        chosen_families({"attn": True})
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        pattern_sparsity(0.5, "1:3")
