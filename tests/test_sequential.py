"""prune_sequential_: passes under a memory budget, the update, and every refusal."""

from __future__ import annotations

import pytest
import torch
from tiny_miniflux_models import tiny_miniflux as _model
from tiny_miniflux_models import tiny_miniflux_forward as _run

from ditprune_core import (
    CalibrationError,
    PruneConfig,
    compute_masks,
    find_prunable_layers,
    prune_model_,
    prune_sequential_,
)
from ditprune_core.config import ReconstructParams
from ditprune_core.reconstruct import relative_output_error
from ditprune_core.stats import GramAccumulator

#: the OBS machinery itself: uniform allocation, no block refinement (tests/test_block_refine.py)
OBS = PruneConfig(
    0.5, update="obs", reconstruct=ReconstructParams(allocation="uniform", block_refine_steps=0)
)


def _calibration(model):
    return lambda cal: [_run(model, 4, seed) for seed in range(3)]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_one_group_equals_the_one_shot_reconstruction() -> None:
    """With a budget that holds every Gram, one pass; its result equals reconstructing every layer
    from Grams of the unpruned model, which a one-shot run computes."""
    from ditprune_core.calibrate import Calibrator
    from ditprune_core.reconstruct import reconstruct_layer

    a, b = _model(), _model()
    report = prune_sequential_(a, _calibration(a), OBS, memory_budget_bytes=1 << 30)
    assert len(report.passes) == 1 and report.sparsity.sparsity == pytest.approx(0.5, abs=1e-3)
    layers = find_prunable_layers(b)
    with Calibrator(b, layers, grams=list(layers)) as cal:
        _calibration(b)(cal)
    for name, layer in layers.items():
        new, _keep, _ = reconstruct_layer(name, layer.weight, cal.gram(name), OBS)
        assert torch.equal(dict(a.named_modules())[name].weight, new), name


def test_sequential_passes_follow_the_budget_and_compensate_upstream_error() -> None:
    model = _model()
    layers = find_prunable_layers(model)
    largest = max(GramAccumulator.nbytes(layer.in_features) for layer in layers.values())
    report = prune_sequential_(model, _calibration(model), OBS, memory_budget_bytes=largest)
    assert len(report.passes) > 1
    assert all(p.gram_bytes <= largest for p in report.passes)
    assert [n for p in report.passes for n in p.layers] == list(layers)  # forward order, each once
    assert all(r.output_error < r.mask_only_error for r in report.layers)
    assert report.sparsity.sparsity == pytest.approx(0.5, abs=1e-3)


def test_the_update_beats_the_mask_alone_on_every_layer_and_2_4_holds() -> None:
    model = _model(3)
    config = PruneConfig(0.5, pattern="2:4", update="obs")
    report = prune_sequential_(model, _calibration(model), config)
    for name, layer in find_prunable_layers(model).items():
        groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(dim=2)
        assert bool((groups == 2).all()), name
    assert all(r.output_error < r.mask_only_error for r in report.layers)


def test_refusals() -> None:
    model = _model()
    with pytest.raises(
        ValueError, match=r"smaller than the Gram of layer '.*' \(\d+ inputs need \d+ bytes\)"
    ):
        prune_sequential_(model, _calibration(model), OBS, memory_budget_bytes=100)
    with pytest.raises(CalibrationError, match="ran no forward pass"):
        prune_sequential_(model, lambda cal: None, OBS)
    with pytest.raises(ValueError, match=r"update='obs' .* use prune_sequential_"):
        compute_masks(model, None, OBS)
    with pytest.raises(ValueError, match="use prune_sequential_"):
        prune_model_(model, None, OBS)
    with pytest.raises(ValueError, match="unknown update"):
        PruneConfig(0.5, update="gptq")
    with pytest.raises(ValueError, match="unknown refit"):
        ReconstructParams(refit="lbfgs")


def test_an_exception_in_run_calibration_removes_every_hook_and_changes_nothing() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def boom(cal) -> None:
        _run(model, 2, 0)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        prune_sequential_(model, boom, OBS)
    assert _hooks(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dead_input_channels_are_dampened_not_a_crash() -> None:
    model = _model()

    def zeros_in_some_channels(cal) -> None:
        handles = [
            layer.register_forward_pre_hook(
                lambda _m, args: (args[0].index_fill(-1, torch.tensor([0, 1]), 0.0),)
            )
            for layer in find_prunable_layers(model).values()
        ]
        try:
            _calibration(model)(cal)
        finally:
            for h in handles:
                h.remove()

    report = prune_sequential_(model, zeros_in_some_channels, OBS)
    assert all(torch.isfinite(layer.weight).all() for layer in find_prunable_layers(model).values())
    assert all(r.output_error <= r.mask_only_error for r in report.layers)


def test_mask_only_sequential_reports_the_mask_error() -> None:
    model = _model()
    report = prune_sequential_(model, _calibration(model), PruneConfig(0.5))
    assert all(r.output_error == r.mask_only_error for r in report.layers)
    # the error is the one the Gram gives for the mask alone
    assert all(r.output_error > 0 for r in report.layers)
    assert relative_output_error(torch.zeros(2, 2), torch.eye(2), torch.eye(2)) == 1.0


def test_tied_weights_are_refused_naming_both_layers() -> None:
    """Two layers sharing one weight: each would be reconstructed for its own inputs and the second
    write would silently replace the first (then a save blamed a LoRA). Refused before any pass."""
    model = _model()
    layers = find_prunable_layers(model)
    layers["double_blocks.0.txt_attn.proj"].weight = layers["double_blocks.0.img_attn.proj"].weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    message = r"'double_blocks\.0\.img_attn\.proj' and 'double_blocks\.0\.txt_attn\.proj' share one weight"
    for config in (OBS, PruneConfig(0.5)):
        with pytest.raises(ValueError, match=message):
            prune_sequential_(model, lambda cal: calls.append(cal), config)
    with pytest.raises(ValueError, match=message):
        prune_model_(model, None, PruneConfig(0.5, metric="magnitude"))
    assert calls == [] and _hooks(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # leaving one of them out is the way on that the message gives
    config = PruneConfig(0.5, metric="magnitude", layer_regex=r"^(?!double_blocks\.0\.txt_attn\.proj)")
    prune_model_(model, None, config)


@pytest.mark.parametrize("sparsity", [0.9999, 0.001])
@pytest.mark.parametrize("value_bits", [None, 4])
def test_extreme_sparsities_run_with_every_layer_pruned_and_kept(sparsity: float, value_bits) -> None:
    """Block allocation used to give a layer a prune count of 0 or all of it at 0.001 and 0.9999,
    and then failed on a sparsity the user never gave ("got 1.0", "got 0.0"); every layer now
    prunes at least one weight and keeps at least one."""
    model = _model()
    config = PruneConfig(
        sparsity, update="obs", value_bits=value_bits, reconstruct=ReconstructParams(block_refine_steps=0)
    )
    report = prune_sequential_(model, _calibration(model), config)
    for row in report.sparsity.layers:
        assert 0 < row.pruned < row.numel, row.name
    assert report.sparsity.sparsity == pytest.approx(sparsity, abs=2e-3)
    for layer in find_prunable_layers(model).values():
        assert bool(torch.isfinite(layer.weight).all())


def test_a_whole_layer_pruned_quantises_to_no_codes() -> None:
    """Uniform allocation at 0.9999 prunes the whole of a small layer: with value_bits its
    quantisation has no value, no group and nothing to compensate (it raised IndexError)."""
    model = _model()
    config = PruneConfig(
        0.9999,
        update="obs",
        value_bits=4,
        reconstruct=ReconstructParams(allocation="uniform", block_refine_steps=0),
    )
    report = prune_sequential_(model, _calibration(model), config)
    q = report.quantized["double_blocks.0.img_attn.proj"]
    assert q.codes.numel() == 0 and q.scales.numel() == 0
    assert not bool(find_prunable_layers(model)["double_blocks.0.img_attn.proj"].weight.any())
