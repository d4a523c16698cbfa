"""prune_sequential_: passes under a memory budget, the update, and every refusal."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
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
from ditprune_core.layers import FLUX
from ditprune_core.layouts import unpack_weight
from ditprune_core.quantize import DEFAULT_DENSE_SPECS, dequantize_weight
from ditprune_core.reconstruct import relative_output_error
from ditprune_core.runtime import decode_runtime, runtime_pieces, runtime_plan
from ditprune_core.save import load_pruned_checkpoint, read_checkpoint_info, save_pruned_checkpoint
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
    params = OBS.reconstruct
    for name, layer in layers.items():
        shrink = params.shrink_of(FLUX.is_text_stream(name))
        new, _keep, _ = reconstruct_layer(name, layer.weight, cal.gram(name), OBS, shrink=shrink)
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


# --- quantise only: sparsity 0 with value_bits ------------------------------------------------------


def _file_bytes(path) -> dict[str, int]:
    """Each tensor's bytes as the file stores them."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize(("update", "bits"), [("obs", 4), ("obs", 2), ("none", 3)])
def test_quantise_only_writes_dense_codes_whose_bits_per_weight_are_the_files(tmp_path, update, bits) -> None:
    model = _model(11)
    config = PruneConfig(0, update=update, value_bits=bits)
    assert config.quantize_only and config.value_quant == DEFAULT_DENSE_SPECS[bits]
    report = prune_sequential_(model, _calibration(model), config)
    layers = find_prunable_layers(model)
    assert list(report.quantized) == list(layers) and report.sparsity.sparsity == 0.0
    assert report.blocks == ()  # nothing pruned: no block to refine
    for name, layer in layers.items():
        q = report.quantized[name]
        assert q.keep is None and tuple(q.codes.shape) == tuple(layer.weight.shape), name
        assert torch.equal(dequantize_weight(q, layer.weight.dtype), layer.weight), name
    assert all(r.output_error > 0 and r.unquantized_error == 0 for r in report.layers)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = tmp_path / "q.safetensors"
    saved = save_pruned_checkpoint(state, path, quantized=report.quantized)
    keys = {f"{n}.weight" for n in layers}
    assert saved.layouts == dict.fromkeys(keys, "dense") and set(saved.stored_codes) == keys
    entries = read_checkpoint_info(path).layouts
    assert {e["values"] for e in entries.values()} == {f"int{bits}"}
    sizes = _file_bytes(path)
    assert not any(k.endswith((".bitmask", ".nm_codes")) for k in sizes)  # no mask bit anywhere
    stored = sum(size for k, size in sizes.items() if k.rpartition(".")[0] in keys or k in keys)
    weights = sum(layer.weight.numel() for layer in layers.values())
    assert report.bits_per_weight == 8.0 * stored / weights  # exact: the writer's own bytes
    loaded = load_pruned_checkpoint(path)
    with safe_open(str(path), framework="pt") as f:
        for key in keys:
            assert torch.equal(loaded[key], state[key]), key
            pieces = {p: f.get_tensor(f"{key}.{p}") for p in ("shape", "qcodes", "qscales", "qspec")}
            if f"{key}.qzeros" in f.keys():  # noqa: SIM118
                pieces["qzeros"] = f.get_tensor(f"{key}.qzeros")
            held = runtime_pieces(pieces)
            assert torch.equal(decode_runtime(held, runtime_plan(held), state[key].dtype), state[key])
            assert torch.equal(unpack_weight(pieces, state[key].dtype), state[key])


def test_quantise_only_obs_compensates_the_rounding_that_round_to_nearest_leaves() -> None:
    # one pass: every layer's Gram is the dense model's, so the two runs see the same inputs
    errors = {}
    for update in ("obs", "none"):
        model = _model(12)
        report = prune_sequential_(
            model,
            _calibration(model),
            PruneConfig(0, update=update, value_bits=3),
            memory_budget_bytes=1 << 30,
        )
        errors[update] = {r.name: r.output_error for r in report.layers}
    assert all(errors["obs"][n] < errors["none"][n] for n in errors["obs"]), errors


def test_quantise_only_choices_are_checked() -> None:
    with pytest.raises(ValueError, match="sparsity 0 prunes nothing: give value_bits"):
        PruneConfig(0, update="obs")
    with pytest.raises(ValueError, match="strictly between 0 and 1 to prune, or 0 with value_bits"):
        PruneConfig(-0.1, value_bits=4)
    with pytest.raises(ValueError, match=r"value_bits must be None or one of \[3, 4, 8\]"):
        PruneConfig(0.5, update="obs", value_bits=2)  # 2 bits only for dense weights
    assert PruneConfig(0, update="obs", value_bits=2).value_bits == 2
    with pytest.raises(ValueError, match="pattern 2:4 prunes exactly 50%"):
        PruneConfig(0, pattern="2:4", value_bits=4)
    config = PruneConfig(0, update="obs", value_bits=4)
    assert PruneConfig.from_dict(config.to_dict()) == config
    model = _model()
    with pytest.raises(ValueError, match=r"sparsity 0 \(quantise only\) prunes nothing, so there is no mask"):
        compute_masks(model, None, PruneConfig(0, metric="magnitude", value_bits=4))


# --- mixed precision: upgrade_share ---------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_mixed_precision_upgrades_the_layers_it_chose_and_counts_their_bits(tmp_path, sparsity) -> None:
    """``upgrade_share``: the layers ``allocate_upgrades`` picks from the dense weights and the
    calibration's input energy are stored at 4 bits, the rest at 3, within the share; the report's
    bits per weight are the written file's, with several passes (a small budget) too."""
    from ditprune_core.calibrate import Calibrator
    from ditprune_core.quantize import DEFAULT_VALUE_SPECS
    from ditprune_core.reconstruct import allocate_upgrades

    specs = DEFAULT_DENSE_SPECS if sparsity == 0 else DEFAULT_VALUE_SPECS
    model = _model(5)
    layers = find_prunable_layers(model)
    with Calibrator(model, layers) as cal:
        _calibration(model)(cal)
    expected = allocate_upgrades(
        {n: (layer.weight.detach(), cal.stats[n].activation_sq_mean) for n, layer in layers.items()},
        specs[3],
        0.3,
    )
    config = PruneConfig(sparsity, update="obs", value_bits=3, upgrade_share=0.3)
    largest = max(GramAccumulator.nbytes(layer.in_features) for layer in layers.values())
    report = prune_sequential_(model, _calibration(model), config, memory_budget_bytes=largest)
    assert len(report.passes) > 1 and report.upgraded == expected and expected
    sizes = {n: layer.weight.numel() for n, layer in layers.items()}
    assert 0 < sum(sizes[n] for n in expected) <= 0.3 * sum(sizes.values())
    for name, q in report.quantized.items():
        assert q.spec == specs[4 if name in expected else 3], name
        assert torch.equal(dequantize_weight(q, layers[name].weight.dtype), layers[name].weight), name
    path = tmp_path / "mixed.safetensors"
    save_pruned_checkpoint(
        {k: v.detach().clone() for k, v in model.state_dict().items()}, path, quantized=report.quantized
    )
    values = {k: e["values"] for k, e in read_checkpoint_info(path).layouts.items()}
    assert values == {f"{n}.weight": "int4" if n in expected else "int3" for n in layers}
    keys = {f"{n}.weight" for n in layers}
    with safe_open(str(path), framework="pt") as f:
        stored = sum(
            f.get_tensor(k).numel() * f.get_tensor(k).element_size()
            for k in f.keys()  # noqa: SIM118
            if k in keys or k.rpartition(".")[0] in keys
        )
    assert report.bits_per_weight == 8.0 * stored / sum(sizes.values())
    other = _model(5)
    plain = prune_sequential_(other, _calibration(other), PruneConfig(sparsity, update="obs", value_bits=3))
    assert plain.upgraded == () and plain.bits_per_weight < report.bits_per_weight


def test_mixed_precision_by_name_upgrades_exactly_the_matching_layers() -> None:
    from ditprune_core.config import UPGRADE_ATTENTION
    from ditprune_core.quantize import DEFAULT_VALUE_SPECS

    model = _model(6)
    config = PruneConfig(0.5, update="obs", value_bits=3, upgrade_layers=UPGRADE_ATTENTION)
    report = prune_sequential_(model, _calibration(model), config)
    assert report.upgraded == (
        "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_attn.proj",
        "double_blocks.0.txt_attn.qkv",
    )
    for name, q in report.quantized.items():
        assert q.spec == DEFAULT_VALUE_SPECS[4 if name in report.upgraded else 3], name


def test_an_upgrade_regex_that_finds_no_layer_is_refused() -> None:
    model = _model(7)
    config = PruneConfig(0.5, update="obs", value_bits=3, upgrade_layers=r"context_block\.attn")
    with pytest.raises(ValueError, match=r"finds none of the \d+ selected layers of this flux"):
        prune_sequential_(model, _calibration(model), config)
