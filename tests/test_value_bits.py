"""Quantised kept values (``value_bits``): config, the joint OBS pass by hand, and prune_sequential_."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_miniflux_models import tiny_miniflux as _model
from tiny_miniflux_models import tiny_miniflux_forward as _run

from ditprune_core import PruneConfig, compute_masks, find_prunable_layers, prune_model_, prune_sequential_
from ditprune_core.config import ReconstructParams
from ditprune_core.layouts import choose_quantized_layout, storage_cost
from ditprune_core.prune import apply_masks_, quantize_kept_
from ditprune_core.quantize import (
    DEFAULT_VALUE_SPECS,
    QuantSpec,
    dequantize_weight,
    quantize_weight,
)
from ditprune_core.reconstruct import (
    obs_prune,
    obs_quantize,
    refit_masked,
    relative_output_error,
)
from ditprune_core.save import save_pruned_checkpoint

# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_value_bits_give_the_measured_defaults(bits: int) -> None:
    config = PruneConfig(0.5, update="obs", value_bits=bits)
    assert config.value_quant == DEFAULT_VALUE_SPECS[bits]
    assert config.value_quant.group_size == 128
    assert config.value_quant.sym is (bits == 3)
    assert PruneConfig(0.5).value_quant is None


def test_an_explicit_spec_overrides_the_default_and_round_trips() -> None:
    spec = QuantSpec(4, 32, sym=True, grouping="columns")
    config = PruneConfig(0.5, update="obs", value_bits=4, value_spec=spec)
    assert config.value_quant == spec
    assert PruneConfig(0.5, value_spec=spec).value_bits == 4  # bits taken from the spec
    again = PruneConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.value_quant == spec
    plain = PruneConfig(0.5, update="obs", value_bits=3)
    assert PruneConfig.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


@pytest.mark.parametrize("bits", [2, 1, 5, 16, True, "4", 4.0])
def test_value_bits_outside_the_supported_set_are_refused(bits: object) -> None:
    with pytest.raises(ValueError, match=r"value_bits must be None or one of \[3, 4, 8\]") as info:
        PruneConfig(0.5, update="obs", value_bits=bits)  # type: ignore[arg-type]
    assert "2 bits is only offered for dense baselines" in str(info.value)


def test_a_spec_that_disagrees_with_value_bits_is_refused() -> None:
    with pytest.raises(ValueError, match="value_spec has 8 bits but value_bits is 4"):
        PruneConfig(0.5, value_bits=4, value_spec=QuantSpec(8))
    with pytest.raises(ValueError, match=r"value_bits must be .* \(got 2\)"):
        PruneConfig(0.5, value_spec=QuantSpec(2))
    with pytest.raises(ValueError, match="value_spec must be a QuantSpec"):
        PruneConfig(0.5, value_spec={"bits": 4})  # type: ignore[arg-type]


# --- the joint OBS pass by hand -------------------------------------------------------------------


def _gram_of_upper(upper: torch.Tensor) -> torch.Tensor:
    """The H whose H^-1 has the upper Cholesky factor ``upper`` (H^-1 = U^T U)."""
    return torch.linalg.inv(upper.double().T @ upper.double()).float()


def test_joint_pass_compensates_pruning_and_rounding_by_hand() -> None:
    # U = [[1, .5], [0, 1]] on inputs (0, 1) and on (2, 3): H = [[1.25, -.5], [-.5, 1]] per pair
    upper = torch.tensor([[1.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0.5], [0, 0, 0, 1.0]])
    w = torch.tensor([[0.3, 0.5, 0.4, -0.6]])
    keep = torch.tensor([[True, True, False, True]])
    spec = QuantSpec(3, 2, sym=True)  # groups of 2 kept values: {w0, w1}, {w3}
    q = obs_quantize(w, _gram_of_upper(upper), keep, spec, damp=0.0)
    # column 0 starts group 0, fit on (0.3, 0.5): s = 0.5 / -4 = -0.125; 0.3 / s = -2.4 -> -2,
    #   code 2, value 0.25; error 0.05 / U00 moves w1 by -0.05 * 0.5 -> 0.475
    # column 1: 0.475 / s = -3.8 -> -4, code 0, value 0.5 (error -0.025, U[1, 2:] = 0)
    # column 2 is pruned: error 0.4 moves w3 by -0.4 * 0.5 -> -0.8
    # column 3 starts group 1, fit on its updated value -0.8: s = fp16(0.2) = 0.199951171875;
    #   -0.8 / s = -4.001 -> -4, code 0, value -0.7998046875
    assert q.codes.tolist() == [2, 0, 0]
    assert q.scales.tolist() == [-0.125, 0.199951171875]
    assert q.zeros is None
    torch.testing.assert_close(
        dequantize_weight(q), torch.tensor([[0.25, 0.5, 0.0, -0.7998046875]]), rtol=0, atol=1e-6
    )
    # round to nearest on the same mask, for contrast: w3 = -0.6 is not moved to absorb w2
    assert dequantize_weight(quantize_weight(w, spec, keep=keep))[0, 3].item() == pytest.approx(
        -0.6001, abs=1e-4
    )


def test_a_group_is_fit_on_values_with_the_pending_block_update_by_hand() -> None:
    # blocks of 2 columns; U couples input 0 and input 2 (U02 = 0.5), which lie in different blocks
    upper = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0], [0, 0, 1.0]])
    w = torch.tensor([[0.2, 0.3, 0.5]])
    keep = torch.tensor([[False, True, True]])
    spec = QuantSpec(3, 2, sym=True)  # one group of the 2 kept values, starting at column 1
    q = obs_quantize(w, _gram_of_upper(upper), keep, spec, damp=0.0, blocksize=2)
    # column 0 is pruned: its error 0.2 will move w2 by -0.2 * 0.5 -> 0.4 (pending, right of block 0)
    # column 1 starts the group: fit on (0.3, 0.4), not (0.3, 0.5): s = fp16(-0.1) = -0.0999755859375
    #   0.3 / s = -3.0007 -> code 1; 0.4 / s = -4.001 -> code 0
    assert q.scales.tolist() == [-0.0999755859375]
    assert q.codes.tolist() == [1, 0]
    s = 0.0999755859375
    torch.testing.assert_close(dequantize_weight(q), torch.tensor([[0.0, 3 * s, 4 * s]]), rtol=0, atol=1e-6)
    # the same group fit before the pass ("static") sees 0.5: s = -0.125
    static = obs_quantize(w, _gram_of_upper(upper), keep, spec, damp=0.0, blocksize=2, grids="static")
    assert static.scales.tolist() == [-0.125]


@pytest.mark.parametrize("grids", ["lazy", "static"])
def test_uncorrelated_inputs_leave_nothing_to_compensate(grids: str) -> None:
    # H = I: no column's error can move another, so the joint pass is round to nearest
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(10, 40, generator=gen)
    keep = torch.rand(10, 40, generator=gen) > 0.5
    spec = QuantSpec(3, 8, sym=False)
    q = obs_quantize(w * keep, torch.eye(40), keep, spec, grids=grids)
    rtn = quantize_weight(w * keep, spec, keep=keep)
    assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scales, rtn.scales)
    assert q.zeros is not None and rtn.zeros is not None and torch.equal(q.zeros, rtn.zeros)


def _correlated_gram(cols: int, samples: int, gen: torch.Generator) -> torch.Tensor:
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(samples, cols, generator=gen) @ (torch.eye(cols) + mix)
    x = x * torch.rand(cols, generator=gen).add(0.2)  # channels of unequal energy, as in DiTs
    return x.T @ x / samples


@pytest.mark.parametrize("grids", ["lazy", "static"])
@pytest.mark.parametrize("grouping", ["kept", "columns"])
def test_lazy_blocks_do_not_change_the_result(grids: str, grouping: str) -> None:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(20, 90, generator=gen)
    gram = _correlated_gram(90, 400, gen)
    keep = torch.rand(20, 90, generator=gen) > 0.45
    spec = QuantSpec(4, 16, sym=False, grouping=grouping)
    one = obs_quantize(w, gram, keep, spec, grids=grids, blocksize=128)
    for blocksize in (1, 7, 32):
        other = obs_quantize(w, gram, keep, spec, grids=grids, blocksize=blocksize)
        torch.testing.assert_close(dequantize_weight(other), dequantize_weight(one), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_joint_beats_round_to_nearest_on_the_same_mask(seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    rows = int(torch.randint(8, 48, (1,), generator=gen))
    cols = int(torch.randint(24, 200, (1,), generator=gen))
    gram = _correlated_gram(cols, 4 * cols, gen)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    pattern = "2:4" if seed % 2 and cols % 4 == 0 else None
    pruned = obs_prune(w, gram, sparsity=None if pattern else 0.5, pattern=pattern, balance=0.4)
    refit, _ = refit_masked(w, gram, pruned.keep_mask, method="exact")
    for spec in (
        DEFAULT_VALUE_SPECS[4],
        DEFAULT_VALUE_SPECS[3],
        QuantSpec(3, 16, False),
        QuantSpec(4, 8, True),
    ):
        q = obs_quantize(refit, gram, pruned.keep_mask, spec)
        q.validate()
        assert torch.equal(q.keep, pruned.keep_mask)
        joint = relative_output_error(dequantize_weight(q), w, gram)
        rtn = relative_output_error(
            dequantize_weight(quantize_weight(refit, spec, keep=pruned.keep_mask)), w, gram
        )
        assert joint < rtn, (rows, cols, spec, joint, rtn)


def test_bad_joint_pass_inputs_are_refused() -> None:
    w, gram, keep = torch.randn(4, 8), torch.eye(8), torch.ones(4, 8, dtype=torch.bool)
    spec = QuantSpec(4, 8)
    with pytest.raises(ValueError, match=r"keep_mask of 'l' has shape \(4, 4\)"):
        obs_quantize(w, gram, keep[:, :4], spec, name="l")
    with pytest.raises(ValueError, match="unknown grids 'late'"):
        obs_quantize(w, gram, keep, spec, grids="late")
    with pytest.raises(ValueError, match="the layer has 8 inputs"):
        obs_quantize(w, torch.eye(6), keep, spec, name="l")


def value_layout(keep: torch.Tensor) -> str:
    """The layout the writer picks for a pruned weight's codes (one rule: choose_quantized_layout)."""
    return choose_quantized_layout(tuple(keep.shape), QuantSpec(4), keep).name


def test_value_layout_by_hand() -> None:
    two_four = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert value_layout(two_four) == "2:4"
    assert value_layout(torch.tensor([[1, 1, 1, 0, 0, 0, 1, 0]], dtype=torch.bool)) == "bitmask"
    assert value_layout(torch.tensor([[1, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)) == "bitmask"  # 1 of 4
    assert value_layout(torch.arange(6).remainder(2).eq(0).expand(2, 6)) == "bitmask"  # 6 inputs: no 2:4


# --- prune_sequential_ --------------------------------------------------------------------------


def _calibration(model, autocast: bool = False):
    def run(_cal) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for seed in range(3):
                _run(model, 4, seed)

    return run


def _expected_bits(report, layers) -> float:
    total = weights = 0
    for name, q in report.quantized.items():
        layout = "2:4" if _is_two_four(q.keep) else "bitmask"
        cost = storage_cost(tuple(layers[name].weight.shape), q.spec, layout=layout, kept=q.keep)
        total += cost.total_bytes
        weights += layers[name].weight.numel()
    return 8.0 * total / weights


def _is_two_four(keep: torch.Tensor) -> bool:
    return bool((keep.reshape(keep.shape[0], -1, 4).sum(dim=2) == 2).all())


@pytest.mark.parametrize(
    ("update", "pattern", "bits"),
    [("obs", "unstructured", 4), ("obs", "2:4", 3), ("none", "unstructured", 8)],
)
def test_the_model_holds_exactly_the_dequantised_values(update: str, pattern: str, bits: int) -> None:
    model = _model(2)
    config = PruneConfig(0.5, pattern=pattern, update=update, value_bits=bits)
    report = prune_sequential_(model, _calibration(model), config)
    layers = find_prunable_layers(model)
    assert list(report.quantized) == list(layers)
    for name, layer in layers.items():
        q = report.quantized[name]
        assert q.spec == DEFAULT_VALUE_SPECS[bits]
        assert torch.equal(dequantize_weight(q, layer.weight.dtype), layer.weight), name
        assert torch.equal(layer.weight[~q.keep], torch.zeros(int((~q.keep).sum()))), name
        # kept values lie on their group's grid: at most 2**bits distinct values per group
        values = layer.weight[q.keep]
        start = 0
        for row in range(q.shape[0]):
            count = int(q.keep[row].sum())
            for g0 in range(0, count, q.spec.group_size):
                group = values[start + g0 : start + min(g0 + q.spec.group_size, count)]
                assert group.unique().numel() <= 2**bits
            start += count
    assert report.bits_per_weight == pytest.approx(_expected_bits(report, layers), rel=1e-12)
    assert all(r.unquantized_error is not None for r in report.layers)
    if update == "obs":
        assert all(r.output_error < r.mask_only_error for r in report.layers)
    assert "bits per weight stored" in report.to_text()


def test_update_none_rounds_the_mask_to_nearest() -> None:
    a, b = _model(4), _model(4)
    config = PruneConfig(0.5, metric="magnitude", value_bits=4)
    report = prune_sequential_(a, _calibration(a), config)
    masks = compute_masks(b, None, PruneConfig(0.5, metric="magnitude"))
    for name, layer in find_prunable_layers(b).items():
        expected = quantize_weight(layer.weight * masks[name], config.value_quant, keep=masks[name])
        got = report.quantized[name]
        assert torch.equal(got.codes, expected.codes) and torch.equal(got.scales, expected.scales), name


def test_a_bf16_model_holds_the_decode_cast_to_bf16() -> None:
    model = _model(5)
    layers = find_prunable_layers(model)
    for layer in layers.values():
        layer.to(torch.bfloat16)
    report = prune_sequential_(
        model, _calibration(model, autocast=True), PruneConfig(0.5, update="obs", value_bits=4)
    )
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.bfloat16
        held = dequantize_weight(report.quantized[name], torch.bfloat16)
        assert torch.equal(held, layer.weight), name
        # the float32 decode itself is not what the model holds: the cast matters
    assert any(
        not torch.equal(dequantize_weight(report.quantized[n]), layers[n].weight.float()) for n in layers
    )


def test_quantising_starts_from_the_float32_reconstruction() -> None:
    """One pass (every Gram from the dense model): the reconstruction before quantising is the one
    without value_bits, and quantising it costs some output error."""
    errors = {}
    for name in ("joint", "none"):
        model = _model(6)
        config = PruneConfig(
            0.5,
            update="obs",
            value_bits=3 if name == "joint" else None,
            reconstruct=ReconstructParams(block_refine_steps=0),  # refined layers are quantised after
        )
        errors[name] = prune_sequential_(model, _calibration(model), config, memory_budget_bytes=1 << 30)
    for joint, plain in zip(errors["joint"].layers, errors["none"].layers, strict=True):
        assert joint.unquantized_error == pytest.approx(plain.output_error, rel=1e-5)
        assert joint.output_error > plain.output_error  # quantising costs something


def test_unquantised_bits_per_weight_is_what_the_writer_stores(tmp_path) -> None:
    model = _model(7)
    for layer in find_prunable_layers(model).values():
        layer.to(torch.bfloat16)
    report = prune_sequential_(model, _calibration(model, autocast=True), PruneConfig(0.5, update="obs"))
    assert report.quantized == {}
    layers = find_prunable_layers(model)
    state = {f"{n}.weight": layer.weight.detach() for n, layer in layers.items()}
    save_pruned_checkpoint(state, tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    weights = sum(layer.weight.numel() for layer in layers.values())
    assert report.bits_per_weight == pytest.approx(8.0 * stored / weights, rel=1e-12)


def test_collect_quantized_false_hands_the_codes_to_write_fn_only() -> None:
    model = _model(8)
    seen = {}

    def write(name, layer, new, keep, q) -> None:
        seen[name] = q
        with torch.no_grad():
            layer.weight.copy_(new)

    report = prune_sequential_(
        model,
        _calibration(model),
        PruneConfig(0.5, update="obs", value_bits=4),
        write_fn=write,
        collect_quantized=False,
    )
    layers = find_prunable_layers(model)
    assert report.quantized == {} and list(seen) == list(layers)
    for name, layer in layers.items():
        assert torch.equal(dequantize_weight(seen[name], layer.weight.dtype), layer.weight)
    assert report.bits_per_weight > 0


# --- the mask-only path ---------------------------------------------------------------------------


def test_mask_only_path_rounds_to_nearest_with_quantize_kept() -> None:
    model = _model(9)
    with pytest.raises(ValueError, match="use prune_sequential_"):
        prune_model_(model, None, PruneConfig(0.5, metric="magnitude", value_bits=4))
    config = PruneConfig(0.5, metric="magnitude")
    masks = compute_masks(model, None, config)
    originals = {n: layer.weight.detach().clone() for n, layer in find_prunable_layers(model).items()}
    apply_masks_(model, masks)
    spec = DEFAULT_VALUE_SPECS[3]
    codes = quantize_kept_(model, masks, spec)
    for name, layer in find_prunable_layers(model).items():
        expected = quantize_weight(originals[name] * masks[name], spec, keep=masks[name])
        assert torch.equal(codes[name].codes, expected.codes)
        assert torch.equal(layer.weight, dequantize_weight(expected, layer.weight.dtype))
    with pytest.raises(KeyError, match="no Linear layer"):
        quantize_kept_(model, {"nope": next(iter(masks.values()))}, spec)
