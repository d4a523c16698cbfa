"""PruneConfig.remainder_bits: the remainder (modulation) quantised by GPTQ in the sequential passes,
stored by the writer as the codes computed, and every refusal."""

from __future__ import annotations

import pytest
import torch
from tiny_miniflux_models import tiny_miniflux as _model
from tiny_miniflux_models import tiny_miniflux_forward as _run

from ditprune_core import PruneConfig, find_prunable_layers, prune_sequential_
from ditprune_core.calibrate import Calibrator
from ditprune_core.config import ReconstructParams
from ditprune_core.layers import remainder_layers
from ditprune_core.obs import gptq_quantize
from ditprune_core.quantize import DEFAULT_DENSE_SPECS, dequantize_weight
from ditprune_core.save import load_pruned_checkpoint, read_checkpoint_info, save_pruned_checkpoint
from ditprune_core.stats import GramAccumulator


def _calibration(model):
    return lambda cal: [_run(model, 4, seed) for seed in range(3)]


def _rest(model) -> list[str]:
    selected = set(find_prunable_layers(model))
    return [n for n in remainder_layers(model) if n not in selected]


def test_the_remainder_is_gptq_on_the_dense_models_gram_in_one_pass() -> None:
    """One pass (every Gram fits): each remainder layer holds exactly GPTQ's decode of its weight on
    the Gram of its inputs in the model as given (which pruning upstream does not change: the
    modulation reads the conditioning vector), with ``remainder_damp``; its codes are the remainder's
    spec, and GPTQ's error on its own Gram is below round to nearest's."""
    a, b = _model(21), _model(21)
    config = PruneConfig(0.5, update="obs", value_bits=4, remainder_bits=3)
    report = prune_sequential_(a, _calibration(a), config, memory_budget_bytes=1 << 30)
    rest = _rest(b)
    assert rest and [r.name for r in report.remainder] == rest  # forward order
    assert len(report.passes) == 1 and set(report.passes[0].layers) >= set(rest)
    named_b = dict(b.named_modules())
    with Calibrator(b, {n: named_b[n] for n in rest}, grams=rest) as cal:
        _calibration(b)(cal)
    named_a = dict(a.named_modules())
    spec = DEFAULT_DENSE_SPECS[3]
    for r in report.remainder:
        q = report.quantized[r.name]
        assert q.spec == spec and q.keep is None, r.name
        damp = config.reconstruct.remainder_damp
        weight, gram = named_b[r.name].weight, cal.gram(r.name)
        expected = gptq_quantize(weight, gram, 3, spec.group_size, spec.sym, damp=damp, where=r.name)
        assert torch.equal(q.codes, expected.codes) and torch.equal(q.scales, expected.scales), r.name
        assert torch.equal(named_a[r.name].weight, dequantize_weight(expected, torch.float32)), r.name
        assert 0 < r.output_error < r.rounded_error, r
    # not pruned, not counted: the sparsity report and the layer reports are the selected layers'
    assert [row.name for row in report.sparsity.layers] == list(find_prunable_layers(a))
    assert f"remainder: {len(rest)} layers quantised by GPTQ" in report.to_text()


def test_the_remainder_does_not_change_bits_per_weight_and_stays_within_the_budget() -> None:
    model = _model(22)
    layers = find_prunable_layers(model)
    largest = max(GramAccumulator.nbytes(layer.in_features) for layer in layers.values())
    config = PruneConfig(0, update="obs", value_bits=3, remainder_bits=4)
    report = prune_sequential_(model, _calibration(model), config, memory_budget_bytes=largest)
    plain_model = _model(22)
    plain_config = PruneConfig(0, update="obs", value_bits=3)
    plain = prune_sequential_(
        plain_model, _calibration(plain_model), plain_config, memory_budget_bytes=largest
    )
    assert report.bits_per_weight == plain.bits_per_weight  # dense codes: the same bytes either way
    assert len(report.passes) > 1 and all(p.gram_bytes <= largest for p in report.passes)
    order = [n for n, _m in model.named_modules() if n in layers or n in set(_rest(model))]
    assert [n for p in report.passes for n in p.layers] == order  # forward order, each once
    assert all(report.quantized[r.name].spec == DEFAULT_DENSE_SPECS[4] for r in report.remainder)
    assert plain.remainder == ()


def test_the_file_stores_the_remainders_codes_whatever_remainder_the_save_asks(tmp_path) -> None:
    """Save Pruned Model passes every layer's codes: the remainder layers are stored as GPTQ made
    them (not rounded again at save time), the file loads back bit for bit."""
    model = _model(23)
    report = prune_sequential_(
        model, _calibration(model), PruneConfig(0.5, update="obs", value_bits=3, remainder_bits=3)
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rest = {f"{n}.weight" for n in _rest(model)}
    for remainder in ("int3", "keep"):
        path = tmp_path / f"{remainder}.safetensors"
        saved = save_pruned_checkpoint(state, path, quantized=report.quantized, remainder=remainder)
        assert rest <= set(saved.stored_codes) and not set(saved.remainder) & rest
        entries = read_checkpoint_info(path).layouts
        assert {entries[k]["layout"] for k in rest} == {"dense"}
        assert {entries[k]["values"] for k in rest} == {"int3"}
        loaded = load_pruned_checkpoint(path)
        for key in rest:
            assert torch.equal(loaded[key], state[key]), key


def test_remainder_bits_refusals() -> None:
    with pytest.raises(ValueError, match=r"remainder_bits must be None or one of \[3, 4, 8\]"):
        PruneConfig(0.5, update="obs", remainder_bits=2)
    with pytest.raises(ValueError, match=r"remainder_bits must be None or one of"):
        PruneConfig(0.5, update="obs", remainder_bits=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs update='obs'"):
        PruneConfig(0.5, remainder_bits=3)
    with pytest.raises(ValueError, match="remainder_damp must be >= 0"):
        ReconstructParams(remainder_damp=float("nan"))
    config = PruneConfig(0.5, update="obs", value_bits=3, remainder_bits=4)
    assert PruneConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("pruned", [False, True], ids=["quantise-only", "kept-values"])
def test_the_quantising_sweep_is_dampened_by_dense_damp_when_nothing_is_pruned(pruned: bool) -> None:
    """``ReconstructParams.dense_damp`` dampens the quantise-only sweep (dense GPTQ); the kept
    values of a pruned layer keep ``damp``: each equals :func:`obs_quantize` with that dampening."""
    from ditprune_core.obs import obs_quantize
    from ditprune_core.reconstruct import quantize_layer

    torch.manual_seed(0)
    w, x = torch.randn(8, 32), torch.randn(64, 32) * torch.linspace(0.1, 3, 32)
    gram = x.T @ x / 64
    keep = torch.rand(8, 32) > 0.5 if pruned else None
    params = ReconstructParams(damp=0.001, dense_damp=0.5)
    config = PruneConfig(0.5 if pruned else 0, update="obs", value_bits=3, reconstruct=params)
    weight = w * keep if keep is not None else w
    q = quantize_layer("layer", weight, keep, gram, config, held_dtype=torch.float32)
    mask = torch.ones(w.shape, dtype=torch.bool) if keep is None else keep

    def sweep(damp: float):
        spec = config.value_quant
        return obs_quantize(weight, gram, mask, spec, held_dtype=torch.float32, blocksize=128, damp=damp)

    expected = sweep(0.001 if pruned else 0.5)
    assert torch.equal(q.codes.reshape(-1), expected.codes.reshape(-1))
    assert torch.equal(q.scales, expected.scales)
    other = sweep(0.5 if pruned else 0.001)
    assert not torch.equal(other.codes.reshape(-1), expected.codes.reshape(-1))  # the choice matters
    with pytest.raises(ValueError, match="dense_damp must be >= 0"):
        ReconstructParams(dense_damp=-1.0)


def test_a_remainder_that_is_all_selected_is_said_and_nothing_else_changes(caplog) -> None:
    """Modulation selected for pruning: the remainder is empty, and the log says why nothing was
    quantised as remainder."""
    from ditprune_core.layers import DEFAULT_FAMILIES

    model = _model(24)
    families = (*DEFAULT_FAMILIES, "modulation")
    config = PruneConfig(0.5, update="obs", value_bits=4, remainder_bits=3, families=families)
    with caplog.at_level("WARNING", logger="ditprune"):
        report = prune_sequential_(model, _calibration(model), config)
    assert report.remainder == ()
    assert "every remainder layer of this flux model is selected" in caplog.text
    assert all(n in {r.name for r in report.layers} for n in remainder_layers(model))
