"""Block allocation of update="obs": a block's prune count shared among its layers, exactly."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_miniflux_models import tiny_miniflux as _model
from tiny_miniflux_models import tiny_miniflux_forward as _run

from ditprune_core import PruneConfig, find_prunable_layers, prune_sequential_
from ditprune_core.calibrate import Calibrator
from ditprune_core.config import ReconstructParams
from ditprune_core.layers import detect_architecture, layer_block
from ditprune_core.reconstruct import allocate_block_counts, reconstruct_layer


def _calibration(model):
    return lambda cal: [_run(model, 4, seed) for seed in range(3)]


def test_hand_worked_allocation() -> None:
    """H = I. Layer a = [1, 1, 1, 1]: every weight carries 1/4 of its output energy. Layer b =
    [2, .1, .1, .1]: its three small weights carry .01/4.03 each. Half of the 8 weights go; every
    layer keeps its sparsity in [0.2, 0.8], i.e. prunes 1 to 3 of its 4 weights. The four lowest
    costs are b's three small weights and one of a's: a prunes 1, b prunes 3."""
    eye = torch.eye(4)
    layers = {
        "a": (torch.tensor([[1.0, 1.0, 1.0, 1.0]]), eye),
        "b": (torch.tensor([[2.0, 0.1, 0.1, 0.1]]), eye),
    }
    assert allocate_block_counts(layers, 0.5, spread=0.3) == {"a": 1, "b": 3}
    # spread 0: uniform; a tight upper bound caps b at 2 of 4 again
    assert allocate_block_counts(layers, 0.5, spread=0.0) == {"a": 2, "b": 2}
    assert allocate_block_counts(layers, 0.5, spread=0.3, max_sparsity=0.5) == {"a": 2, "b": 2}


def test_the_gram_weights_the_costs() -> None:
    """Same weights, but b's inputs 2..4 are 100x louder: now a's weights are the cheap ones."""
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    loud = torch.diag(torch.tensor([1.0, 1e4, 1e4, 1e4]))
    layers = {"a": (w, torch.eye(4)), "b": (torch.tensor([[2.0, 0.1, 0.1, 0.1]]), loud)}
    # b: output energy 4 + 3 * 100 = 304; costs 4/304 (weight 2) and 100/304 each (the loud ones)
    assert allocate_block_counts(layers, 0.5, spread=0.3) == {"a": 3, "b": 1}


@pytest.mark.parametrize("seed", range(6))
def test_counts_are_exact_and_within_bounds(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(int(torch.randint(1, 6, (1,), generator=gen))):
        rows, cols = (int(v) for v in torch.randint(2, 40, (2,), generator=gen))
        x = torch.randn(64, cols, generator=gen) * torch.rand(cols, generator=gen) * 3
        layers[f"l{i}"] = (torch.randn(rows, cols, generator=gen), x.T @ x / 64)
    s = float(torch.rand(1, generator=gen)) * 0.8 + 0.1
    spread = 0.25
    counts = allocate_block_counts(layers, s, spread=spread, sample=97)  # sampled costs too
    sizes = {n: w.numel() for n, (w, _h) in layers.items()}
    assert sum(counts.values()) == round(s * sum(sizes.values()))
    for n, k in counts.items():
        lo = min(max(1, math.ceil((s - spread) * sizes[n])), math.floor(s * sizes[n]))
        hi = min(sizes[n] - 1, max(math.floor(min(0.95, s + spread) * sizes[n]), math.ceil(s * sizes[n])))
        assert lo <= k <= hi, (n, k, lo, hi)


def test_a_single_layer_gets_the_uniform_count() -> None:
    w, h = torch.randn(7, 9), torch.eye(9)
    assert allocate_block_counts({"x": (w, h)}, 0.61) == {"x": round(0.61 * 63)}
    with pytest.raises(ValueError, match="sparsity"):
        allocate_block_counts({"x": (w, h)}, 1.0)


def test_prune_sequential_shares_each_blocks_count() -> None:
    """One pass: each block prunes exactly its share, layers within it differ, and every layer equals
    reconstruct_layer at its allocated count (the same Grams, from an unpruned twin)."""
    a, b = _model(), _model()
    config = PruneConfig(0.5, update="obs", reconstruct=ReconstructParams(block_refine_steps=0))
    assert config.reconstruct.allocation == "block"
    report = prune_sequential_(a, _calibration(a), config, memory_budget_bytes=1 << 30)
    layers = find_prunable_layers(b)
    template = detect_architecture(b)
    with Calibrator(b, layers, grams=list(layers)) as cal:
        _calibration(b)(cal)
    blocks: dict[str, list[str]] = {}
    for name in layers:
        blocks.setdefault(layer_block(name, template), []).append(name)
    by_name = {r.name: r for r in report.layers}
    spread_seen = False
    for names in blocks.values():
        counts = allocate_block_counts({n: (layers[n].weight, cal.gram(n)) for n in names}, 0.5)
        total = sum(layers[n].weight.numel() for n in names)
        pruned = sum(int((dict(a.named_modules())[n].weight == 0).sum()) for n in names)
        assert pruned == sum(counts.values()) == round(0.5 * total)
        spread_seen |= len({round(by_name[n].sparsity, 6) for n in names}) > 1
        for n in names:
            layer_config = PruneConfig(counts[n] / layers[n].weight.numel(), update="obs")
            params = layer_config.reconstruct
            shrink = params.shrink_of(template.is_text_stream(n))
            new, _keep, _ = reconstruct_layer(n, layers[n].weight, cal.gram(n), layer_config, shrink=shrink)
            assert torch.equal(dict(a.named_modules())[n].weight, new), n
    assert spread_seen


def test_uniform_allocation_and_n_m_keep_every_layer_at_the_config_sparsity() -> None:
    for config in (
        PruneConfig(0.5, update="obs", reconstruct=ReconstructParams(allocation="uniform")),
        PruneConfig(0.5, pattern="2:4", update="obs"),
    ):
        model = _model(1)
        report = prune_sequential_(model, _calibration(model), config)
        assert {round(r.sparsity, 6) for r in report.layers} == {0.5}


def test_bad_allocation_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="allocation"):
        ReconstructParams(allocation="global")
    with pytest.raises(ValueError, match="allocation_spread"):
        ReconstructParams(allocation_spread=1.0)
