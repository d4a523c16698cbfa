"""Block refinement: the mask is kept exactly, the block error drops, and prune_sequential_ runs it."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_miniflux_models import tiny_miniflux as _model
from tiny_miniflux_models import tiny_miniflux_forward as _run
from torch import nn

from ditprune_core import PruneConfig, find_prunable_layers, prune_sequential_
from ditprune_core.config import ReconstructParams
from ditprune_core.refine import (
    BlockCall,
    BlockCallRecorder,
    block_output_error,
    holdout_split,
    refine_block_,
)

#: refinement as it ran before its defaults changed (absolute step, fitted and judged on every call,
#: no patience): the driver's tests pin it, since they check what refinement does, not its defaults
FIT_ALL = {
    "block_refine_step": "absolute",
    "block_refine_lr": 3e-3,
    "block_refine_holdout": 0.0,
    "block_refine_patience": 0,
}


def _twin_input_calls() -> list[BlockCall]:
    """Inputs (tokens, 3) whose first two channels are equal: x = (a, a, b)."""
    gen = torch.Generator().manual_seed(0)
    calls = []
    for weight in (1.0, 0.5):
        a, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
        calls.append(BlockCall((torch.stack([a, a, b], dim=1),), {}, weight))
    return calls


def _linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def test_a_linear_block_converges_to_the_hand_computed_masked_fit() -> None:
    """y = W x with x = (a, a, b): a row that loses input 1 or 2 compensates exactly through the
    other, so the masked optimum of W = [[1, 2, 3], [4, 5, 6]] with masks [[1, 0, 1], [0, 1, 1]] is
    [[3, 0, 3], [0, 9, 6]] with zero error; the mask alone gives [[1, 0, 3], [0, 5, 6]]."""
    dense = _linear([[1, 2, 3], [4, 5, 6]])
    pruned = _linear([[1, 2, 3], [4, 5, 6]])
    keep = torch.tensor([[True, False, True], [False, True, True]])
    calls = _twin_input_calls()
    result = refine_block_(pruned, dense, {"w": pruned}, {"w": keep}, calls, steps=3000, lr=0.05)
    weight = pruned.weight.detach()
    assert torch.equal(weight[~keep], torch.zeros(2))  # pruned zeros are exactly zero
    assert torch.allclose(weight, torch.tensor([[3.0, 0.0, 3.0], [0.0, 9.0, 6.0]]), atol=1e-2)
    masked = _linear([[1, 0, 3], [0, 5, 6]])
    assert result.error_before == pytest.approx(block_output_error(masked, dense, calls))
    assert result.error_before > 0.05 and result.error_after < 1e-5 and not result.reverted
    assert all(not p.requires_grad or p.grad is None for p in pruned.parameters())


def test_zero_steps_changes_nothing_and_a_divergent_fit_is_put_back() -> None:
    dense = _linear([[1, 2, 3], [4, 5, 6]])
    keep = torch.tensor([[True, False, True], [False, True, True]])
    calls = _twin_input_calls()
    masked = torch.tensor([[1.0, 0.0, 3.0], [0.0, 5.0, 6.0]])
    for steps, lr in ((0, 1e-3), (3, 1e4)):
        pruned = _linear([[1, 2, 3], [4, 5, 6]])
        result = refine_block_(pruned, dense, {"w": pruned}, {"w": keep}, calls, steps=steps, lr=lr)
        assert torch.equal(pruned.weight.detach(), masked)
        assert result.error_after == result.error_before
        assert result.reverted == (steps > 0)


def test_bad_inputs_are_refused() -> None:
    dense, pruned = _linear([[1, 2, 3], [4, 5, 6]]), _linear([[1, 2, 3], [4, 5, 6]])
    keep = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="no recorded calls"):
        refine_block_(pruned, dense, {"w": pruned}, {"w": keep}, [], steps=1, lr=1e-3)
    with pytest.raises(ValueError, match=r"'w' needs a keep-mask of shape \(2, 3\), got \(3, 2\)"):
        refine_block_(pruned, dense, {"w": pruned}, {"w": keep.T}, _twin_input_calls(), steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="block_refine_steps must be >= 0"):
        ReconstructParams(block_refine_steps=-1)


def test_the_recorder_keeps_a_sample_of_copied_calls_with_their_weights() -> None:
    layer = nn.Linear(2, 2)
    weight = [0.0]
    inputs = [torch.full((1, 2), float(i)) for i in range(10)]
    with BlockCallRecorder(layer, max_calls=3, weight_of=lambda: weight[0], seed=1) as rec:
        for i, x in enumerate(inputs):
            weight[0] = 10.0 + i
            layer(x, **{})
            x.add_(100.0)  # the recording is a copy
    assert len(layer._forward_hooks) == 0 and rec.seen == 10 and len(rec.calls) == 3
    indices = [int(c.args[0][0, 0]) for c in rec.calls]
    assert len(set(indices)) == 3 and all(0 <= i < 10 for i in indices)
    assert [c.weight for c in rec.calls] == [10.0 + i for i in indices]


def _block_errors(model: nn.Module, dense: nn.Module) -> list[float]:
    """Relative output error of every block of ``model`` against ``dense``'s, on the calibration."""
    errors = []
    for kind in ("double_blocks", "single_blocks"):
        for block, ref in zip(getattr(model, kind), getattr(dense, kind), strict=True):
            with BlockCallRecorder(block, max_calls=100) as rec:
                for seed in range(3):
                    _run(model, 4, seed)
            errors.append(block_output_error(block, ref, rec.calls))
    return errors


def test_prune_sequential_refines_each_block_with_the_masks_and_sparsity_unchanged() -> None:
    dense = _model()
    plain, refined = _model(), _model()

    def calibration(model: nn.Module):
        return lambda cal: [_run(model, 4, seed) for seed in range(3)]

    base = PruneConfig(0.6, update="obs", reconstruct=ReconstructParams(block_refine_steps=0))
    config = PruneConfig(0.6, update="obs", reconstruct=ReconstructParams(block_refine_steps=60, **FIT_ALL))
    plain_report = prune_sequential_(plain, calibration(plain), base, memory_budget_bytes=1 << 30)
    report = prune_sequential_(refined, calibration(refined), config, memory_budget_bytes=1 << 30)
    assert [b.block for b in report.blocks] == ["double_blocks.0", "single_blocks.0"]
    assert all(b.calls == 3 and b.steps == 60 and b.error_after < b.error_before for b in report.blocks)
    assert report.sparsity.sparsity == plain_report.sparsity.sparsity
    assert report.bits_per_weight == plain_report.bits_per_weight
    layers = find_prunable_layers(refined)
    for name, layer in find_prunable_layers(plain).items():
        # one pass: the same Grams, so the same masks; refinement moved only kept weights
        assert torch.equal(layer.weight != 0, layers[name].weight != 0), name
        assert not torch.equal(layer.weight, layers[name].weight), name
    assert "refined: output error" in report.to_text()
    before, after = _block_errors(plain, dense), _block_errors(refined, dense)
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_refinement_then_joint_quantisation_stores_codes_on_the_grid() -> None:
    """With value_bits, each block is refined first and its layers quantised after: the model holds
    exactly the codes' decode, pruned weights stay 0, the bits are those of the same run without
    refinement, and the layers' errors are measured on the final weights."""
    from ditprune_core.quantize import dequantize_weight

    quant, unrefined = _model(), _model()

    def calibration(model: nn.Module):
        return lambda cal: [_run(model, 4, seed) for seed in range(3)]

    params = ReconstructParams(block_refine_steps=40, **FIT_ALL)
    report = prune_sequential_(
        quant,
        calibration(quant),
        PruneConfig(0.6, update="obs", value_bits=4, reconstruct=params),
        memory_budget_bytes=1 << 30,
    )
    plain = prune_sequential_(
        unrefined,
        calibration(unrefined),
        PruneConfig(0.6, update="obs", value_bits=4, reconstruct=ReconstructParams(block_refine_steps=0)),
        memory_budget_bytes=1 << 30,
    )
    assert len(report.blocks) == 2 and not plain.blocks and report.bits_per_weight == plain.bits_per_weight
    layers = find_prunable_layers(quant)
    assert set(report.quantized) == set(layers)
    for name, layer in layers.items():
        q = report.quantized[name]
        assert torch.equal(layer.weight.detach(), dequantize_weight(q, layer.weight.dtype, check=False)), name
        assert q.keep is not None and bool((layer.weight[~q.keep] == 0).all()), name
    for r in report.layers:
        assert r.unquantized_error is not None and r.output_error > 0, r.name


def _two_layer_block(
    scale: float,
) -> tuple[nn.Module, nn.Module, dict[str, nn.Linear], dict[str, torch.Tensor]]:
    """Dense and pruned Linear-ReLU-Linear blocks, every weight times ``scale``."""
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False))
    with torch.no_grad():
        for p in dense.parameters():
            p.mul_(scale)
    pruned = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(4)
    keeps = {}
    for key in ("0", "2"):
        layer = pruned.get_submodule(key)
        keeps[key] = torch.rand(layer.weight.shape, generator=gen) > 0.5
        with torch.no_grad():
            layer.weight.mul_(keeps[key])
    return pruned, dense, {k: pruned.get_submodule(k) for k in keeps}, keeps


@pytest.mark.parametrize("step", ["relative", "absolute"])
def test_a_relative_step_is_scale_invariant(step: str) -> None:
    """Weights x10 and inputs /10 give the same refined block (outputs x10, the second layer's
    scale) with the relative step; the absolute step moves every weight by the same amounts
    whatever their size, so it does not (the cause of refinement being put back on wide models)."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, 8, generator=gen) for _ in range(8)]
    outs = []
    for scale in (1.0, 10.0):
        block, dense, layers, keeps = _two_layer_block(scale)
        calls = [BlockCall((x / scale,)) for x in xs]
        refine_block_(block, dense, layers, keeps, calls, steps=40, lr=0.05, step=step)
        with torch.no_grad():
            outs.append([block(x / scale) / scale for x in xs])
    same = all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(*outs, strict=True))
    assert same == (step == "relative")


def test_early_stopping_keeps_the_best_held_out_fit_while_the_training_error_falls() -> None:
    """One kept weight w1 of y = w1 x1 + w2 x2 (w2 pruned), dense (1, 1), starting at w1 = -1.
    The fitted calls have x = (1, 1): their target 2 pulls w1 to 2, their error falls all the way.
    The held-out call has x = (1, -0.5), target 0.5: its relative error (w1 - 0.5)² / 0.25 falls from
    9 until w1 = 0.5, then rises back to 9. Early stopping keeps the weights at the held-out minimum,
    near w1 = 0.5, not the fit's w1 = 2."""
    dense = nn.Linear(2, 1, bias=False)
    block = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.tensor([[1.0, 1.0]]))
        block.weight.copy_(torch.tensor([[-1.0, 0.0]]))
    keep = torch.tensor([[True, False]])
    fit = BlockCall((torch.tensor([[1.0, 1.0]]),))
    held = BlockCall((torch.tensor([[1.0, -0.5]]),))
    calls = [fit, fit, held]  # holdout 1/3: every third call held out
    result = refine_block_(
        block, dense, {"l": block}, {"l": keep}, calls, steps=200, lr=0.05, holdout=1 / 3, checks=50
    )
    w1 = float(block.weight.detach()[0, 0])
    assert abs(w1 - 0.5) < 0.25, w1
    assert result.holdout_before == pytest.approx(9.0) and result.holdout_after < 0.5
    assert 0 < result.best_step < 200 and not result.reverted
    assert float(block.weight.detach()[0, 1]) == 0.0
    # the same fit without held-out calls goes all the way to the training optimum
    with torch.no_grad():
        block.weight.copy_(torch.tensor([[-1.0, 0.0]]))
    refine_block_(block, dense, {"l": block}, {"l": keep}, [fit, fit], steps=200, lr=0.05)
    assert float(block.weight.detach()[0, 0]) > 1.8  # far past the held-out optimum 0.5


def test_a_fit_worse_on_the_held_out_calls_is_never_kept() -> None:
    """Starting at w1 = 0.5, the held-out optimum: every step of the fit makes the held-out call
    worse, so the starting weights stay (reverted)."""
    dense = nn.Linear(2, 1, bias=False)
    block = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.tensor([[1.0, 1.0]]))
        block.weight.copy_(torch.tensor([[0.5, 0.0]]))
    keep = torch.tensor([[True, False]])
    fit, held = BlockCall((torch.tensor([[1.0, 1.0]]),)), BlockCall((torch.tensor([[1.0, -0.5]]),))
    result = refine_block_(
        block, dense, {"l": block}, {"l": keep}, [fit, held], steps=50, lr=0.05, holdout=0.5
    )
    assert result.reverted and result.best_step == 0 and float(block.weight.detach()[0, 0]) == 0.5


def test_the_holdout_split_is_disjoint_and_deterministic() -> None:
    calls = [BlockCall((torch.tensor([float(i)]),)) for i in range(10)]
    fit, held = holdout_split(calls, 0.25)
    assert [int(c.args[0]) for c in held] == [3, 7]
    assert [int(c.args[0]) for c in fit] == [0, 1, 2, 4, 5, 6, 8, 9]
    assert holdout_split(calls, 0.25) == (fit, held)
    assert holdout_split(calls[:2], 0.25) == ([calls[0]], [calls[1]])
    assert holdout_split(calls, 0.0) == (calls, [])
    with pytest.raises(ValueError, match="holdout must be in"):
        refine_block_(nn.Linear(1, 1), nn.Linear(1, 1), {}, {}, calls, steps=1, lr=1.0, holdout=1.0)
    with pytest.raises(ValueError, match="unknown step"):
        refine_block_(nn.Linear(1, 1), nn.Linear(1, 1), {}, {}, calls, steps=1, lr=1.0, step="adaptive")


def test_prune_sequential_passes_the_relative_step_and_the_held_out_calls() -> None:
    model = _model()
    params = ReconstructParams(
        block_refine_steps=20, block_refine_calls=8, block_refine_step="relative", block_refine_holdout=0.25
    )
    config = PruneConfig(0.6, update="obs", reconstruct=params)
    report = prune_sequential_(model, lambda cal: [_run(model, 4, seed) for seed in range(3)], config)
    for b in report.blocks:
        assert b.holdout_before is not None and b.holdout_after is not None and b.best_step is not None
        assert b.holdout_after <= b.holdout_before  # never a fit worse on the held-out calls
        assert b.calls == 2  # 3 recorded calls, every 4th held out: the last one, as fewer than 4
    assert "held-out calls" in report.to_text()
    with pytest.raises(ValueError, match="unknown block_refine_step"):
        ReconstructParams(block_refine_step="adaptive")
    with pytest.raises(ValueError, match="block_refine_holdout must be in"):
        ReconstructParams(block_refine_holdout=1.0)


def test_patience_stops_refining_after_blocks_it_gained_nothing_on_and_saves_their_sampler_runs() -> None:
    """A learning rate far too large makes every fit end worse, so every refined block is put back.
    With ``block_refine_patience=1`` only the first block costs a sampler run; the model is exactly
    the one without refinement, and the report counts the runs and names the skipped blocks."""
    runs = {"n": 0}

    def prune(params: ReconstructParams) -> tuple[nn.Module, object]:
        model = _model()

        def run(cal: object) -> None:
            runs["n"] += 1
            for seed in range(2):
                _run(model, 4, seed)

        runs["n"] = 0
        report = prune_sequential_(model, run, PruneConfig(0.6, update="obs", reconstruct=params))
        assert report.sampler_runs == runs["n"]
        return model, report

    plain, plain_report = prune(ReconstructParams(block_refine_steps=0))
    blow_up = {**FIT_ALL, "block_refine_steps": 3, "block_refine_lr": 50.0, "block_refine_calls": 4}
    every, every_report = prune(ReconstructParams(**blow_up))
    stopped, report = prune(ReconstructParams(**{**blow_up, "block_refine_patience": 1}))

    n_blocks = len(every_report.blocks)
    assert n_blocks >= 2 and all(b.reverted for b in every_report.blocks)
    assert every_report.sampler_runs == len(every_report.passes) + n_blocks
    assert len(report.blocks) == 1 and report.blocks[0].reverted
    assert len(report.skipped_blocks) == n_blocks - 1
    assert report.sampler_runs == len(report.passes) + 1 == plain_report.sampler_runs + 1
    assert "block refinement stopped" in report.to_text()
    for name, param in plain.state_dict().items():
        assert torch.equal(param, stopped.state_dict()[name]), name
        assert torch.equal(param, every.state_dict()[name]), name
    with pytest.raises(ValueError, match="block_refine_patience must be >= 0"):
        ReconstructParams(block_refine_patience=-1)


def test_patience_keeps_refining_while_refinement_pays() -> None:
    model = _model()
    params = ReconstructParams(
        **{**FIT_ALL, "block_refine_steps": 20, "block_refine_calls": 8, "block_refine_patience": 1}
    )
    report = prune_sequential_(
        model,
        lambda cal: [_run(model, 4, seed) for seed in range(3)],
        PruneConfig(0.6, update="obs", reconstruct=params),
    )
    total = len(report.blocks) + len(report.skipped_blocks)
    assert total >= 2
    gained = [not (b.reverted or b.best_step == 0) for b in report.blocks]
    # refined up to and including the first block it gained nothing on, none after it
    first_fruitless = gained.index(False) if False in gained else total
    assert len(report.blocks) == min(first_fruitless + 1, total)
    assert report.sampler_runs == len(report.passes) + len(report.blocks)
    # the stop names the refinements in a row that gained nothing (patience), not all refinements
    assert report.fruitless == (1 if report.skipped_blocks else 0)
    if report.skipped_blocks:
        assert "it gained nothing on 1 refinement(s) in a row" in report.to_text()


def test_refinement_is_off_by_default_and_costs_no_sampler_run() -> None:
    """The defaults (README, "Block refinement"): off; when asked for, a step relative to each
    layer's weight RMS, a quarter of the calls held out, patience 2. Off, a run is its passes."""
    params = ReconstructParams()
    assert params.block_refine_steps == 0
    assert (params.block_refine_step, params.block_refine_holdout, params.block_refine_patience) == (
        "relative",
        0.25,
        2,
    )
    model = _model()
    runs = []
    report = prune_sequential_(
        model,
        lambda cal: runs.append([_run(model, 4, seed) for seed in range(2)]),
        PruneConfig(0.6, update="obs"),
    )
    assert report.blocks == () and report.sampler_runs == len(report.passes) == len(runs)
