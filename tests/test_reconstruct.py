"""OBS update, masked refit and Gram statistics, on tiny layers with the expected weights worked by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditprune_core.calibrate import GramRecorder
from ditprune_core.obs import sparsegpt_prune
from ditprune_core.reconstruct import (
    GramAccumulator,
    obs_prune,
    plan_groups,
    refit_masked,
    relative_output_error,
)
from ditprune_core.stats import CalibrationError, ChannelSquareMean

T, F = True, False


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.t() @ x / x.shape[0]


def test_obs_hand_worked_selection_and_update() -> None:
    # H: inputs 0 and 1 correlated (0.5), input 2 independent with energy 4.
    h = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 4.0]])
    w = torch.tensor([[1.3, 3.0, 0.6], [0.1, 5.0, 5.0]])
    # OBS saliency w_j^2 / U_jj^2 = w_j^2 * (H_jj - H_j,>j H_>j^-1 H_>j,j): the curvature of input 0
    # given the later ones is 1 - 0.25 = 0.75, of input 1 is 1, of input 2 is 4. Row 0: 1.2675, 9, 1.44
    # (magnitude and Wanda, 1.69 vs 1.44, would both prune input 2 instead); row 1: 0.0075, 25, 100.
    # One third of the layer (2 weights) -> prune (0, 0) and (1, 0). Pruning input 0 moves input 1 by
    # -w0 / [H^-1]_00 * [H^-1]_10 = w0 * 0.5 and input 2 not at all.
    res = obs_prune(w, h, sparsity=1 / 3, damp=0.0)
    assert res.keep_mask.tolist() == [[F, T, T], [F, T, T]]
    torch.testing.assert_close(res.weight, torch.tensor([[0.0, 3.65, 0.6], [0.0, 5.05, 5.0]]))
    # with beta = 0 the saliency is the (updated) weight magnitude alone: row 0 loses 0.6 instead
    res0 = obs_prune(w, h, sparsity=1 / 3, damp=0.0, balance=0.0)
    assert res0.keep_mask.tolist() == [[T, T, F], [F, T, T]]


def test_obs_fixed_mask_two_pruned_inputs() -> None:
    # H = I + J (all ones), H^-1 = I - J/4. Pruning input 0 of w = [1, 2, 3] adds 1/3 to inputs 1, 2:
    # [0, 7/3, 10/3]; pruning input 1 then (H on {1, 2} = [[2, 1], [1, 2]]) adds 7/6 to input 2: 4.5,
    # which is the least-squares optimum (H w)_2 / H_22 = 9 / 2.
    h = torch.ones(3, 3) + torch.eye(3)
    w = torch.tensor([[1.0, 2.0, 3.0]])
    res = obs_prune(w, h, keep_mask=torch.tensor([[F, F, T]]), damp=0.0)
    torch.testing.assert_close(res.weight, torch.tensor([[0.0, 0.0, 4.5]]))


def test_refit_beats_obs_when_a_kept_input_precedes_a_pruned_one() -> None:
    # OBS freezes input 0 before it prunes input 1: [1, 0], error (-2)^2 * 2 = 8.
    # Refit: w0' = (H w)_0 / H_00 = (2 + 2) / 2 = 2: [2, 0], error [1, -2] H [1, -2]^T = 6.
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    w = torch.tensor([[1.0, 2.0]])
    keep = torch.tensor([[T, F]])
    obs = obs_prune(w, h, keep_mask=keep, damp=0.0).weight
    torch.testing.assert_close(obs, torch.tensor([[1.0, 0.0]]))
    exact, info = refit_masked(w, h, keep, method="exact", damp=0.0)
    torch.testing.assert_close(exact, torch.tensor([[2.0, 0.0]]))
    assert relative_output_error(obs, w, h) == pytest.approx(8 / 14)  # w H w^T = 2 + 4 + 8 = 14
    assert relative_output_error(exact, w, h) == pytest.approx(6 / 14)
    pcg, info = refit_masked(w, h, keep, method="pcg", damp=0.0, init=obs, iters=5, tol=1e-9)
    torch.testing.assert_close(pcg, exact)
    assert info.method == "pcg"


@pytest.mark.parametrize("seed", range(6))
def test_update_and_refit_reduce_output_error_on_random_layers(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    out_f = int(torch.randint(2, 24, (1,), generator=gen))
    in_f = 4 * int(torch.randint(2, 12, (1,), generator=gen))
    tokens = int(torch.randint(in_f // 2, 4 * in_f, (1,), generator=gen))  # may be rank-deficient
    x = torch.randn(tokens, in_f, generator=gen) @ torch.randn(in_f, in_f, generator=gen)
    h = _gram(x)
    w = torch.randn(out_f, in_f, generator=gen)
    for kwargs in ({"sparsity": 0.3 + 0.1 * (seed % 4)}, {"pattern": "2:4"}):
        res = obs_prune(w, h, blocksize=8, **kwargs)  # type: ignore[arg-type]
        mask_only = relative_output_error(w * res.keep_mask, w, h)
        updated = relative_output_error(res.weight, w, h)
        assert updated < mask_only
        refit, _ = refit_masked(w, h, res.keep_mask, damp=0.0, method="exact")
        assert relative_output_error(refit, w, h) <= updated + 1e-6
        assert not bool(refit[~res.keep_mask].any())
        pcg, _ = refit_masked(w, h, res.keep_mask, damp=0.01, method="pcg", init=res.weight, iters=3)
        assert relative_output_error(pcg, w, h) <= updated + 1e-6


def test_exact_counts_across_uneven_blocks() -> None:
    gen = torch.Generator().manual_seed(0)
    w, h = torch.randn(7, 10, generator=gen), _gram(torch.randn(40, 10, generator=gen))
    res = obs_prune(w, h, sparsity=0.37, blocksize=3)  # blocks of 3, 3, 3, 1 columns
    assert int((~res.keep_mask).sum()) == round(0.37 * 70)
    rows = obs_prune(w, h, sparsity=0.37, blocksize=3, granularity="row")
    assert (~rows.keep_mask).sum(dim=1).tolist() == [round(0.37 * 10)] * 7
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    counts = torch.tensor([5, 20])
    cl = obs_prune(
        w, h, sparsity=0.37, blocksize=3, granularity="cluster", row_groups=groups, group_prune_counts=counts
    )
    pruned = ~cl.keep_mask
    assert [int(pruned[:3].sum()), int(pruned[3:].sum())] == [5, 20]
    assert not bool(res.weight[~res.keep_mask].any())


@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_patterns_are_exact(pattern: str, n: int, m: int) -> None:
    gen = torch.Generator().manual_seed(1)
    w, h = torch.randn(5, 24, generator=gen), _gram(torch.randn(60, 24, generator=gen))
    res = obs_prune(w, h, pattern=pattern, blocksize=12)  # 12 is no multiple of 8: rounded down
    assert res.keep_mask.reshape(5, -1, m).sum(dim=2).eq(n).all()
    assert not bool(res.weight[~res.keep_mask].any())


def test_n_m_on_indivisible_layer_names_it() -> None:
    with pytest.raises(ValueError, match=r"'blocks\.3\.odd' has 6 input features"):
        obs_prune(torch.randn(2, 6), torch.eye(6), pattern="2:4", name="blocks.3.odd")


def test_balance_half_is_sparsegpt() -> None:
    gen = torch.Generator().manual_seed(2)
    w, h = torch.randn(16, 256, generator=gen), _gram(torch.randn(300, 256, generator=gen))
    ours = obs_prune(w, h, sparsity=0.6, balance=0.5, damp=0.01, blocksize=128)
    ref = sparsegpt_prune(w, h, sparsity=0.6)
    assert torch.equal(ours.keep_mask, ref.keep_mask)
    other = obs_prune(w, h, sparsity=0.6, balance=0.2, damp=0.01, blocksize=128)
    assert not torch.equal(other.keep_mask, ref.keep_mask)


def test_singular_gram_with_dead_channels_is_dampened() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=gen)  # 5 tokens for 8 inputs: rank 5
    x[:, 2] = 0.0  # a dead input channel: zero row and column in H
    h = _gram(x)
    w = torch.randn(4, 8, generator=gen)
    res = obs_prune(w, h, sparsity=0.5)
    assert bool(torch.isfinite(res.weight).all()) and int((~res.keep_mask).sum()) == 16
    refit, _ = refit_masked(w, h, res.keep_mask)
    assert bool(torch.isfinite(refit).all())
    zero = obs_prune(w, torch.zeros(8, 8), sparsity=0.5)  # a layer that only saw zeros: magnitude order
    assert torch.equal(zero.keep_mask, w.abs() > w.abs().flatten().kthvalue(16).values)


def test_nan_gram_is_refused_naming_the_layer() -> None:
    acc = GramAccumulator(3, name="single_blocks.0.linear2")
    with pytest.raises(CalibrationError, match=r"'single_blocks\.0\.linear2' received NaN or inf"):
        acc.add_batch(torch.tensor([[1.0, float("inf"), 0.0]]))
    bad = torch.eye(3)
    bad[1, 1] = float("nan")
    with pytest.raises(CalibrationError, match=r"Gram of 'blocks\.1\.qkv' holds NaN or inf"):
        obs_prune(torch.ones(2, 3), bad, sparsity=0.5, name="blocks.1.qkv")
    with pytest.raises(CalibrationError, match="saw no tokens"):
        GramAccumulator(3, name="x").finalize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_merge_equals_concatenated_batches(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    x1, x2, x3 = (torch.randn(n, 2, 6, generator=gen) for n in (3, 5, 2))
    a, b, whole = (
        GramAccumulator(6, dtype=dtype),
        GramAccumulator(6, dtype=dtype),
        GramAccumulator(6, dtype=dtype),
    )
    a.add_batch(x1)
    b.add_batch(x2)
    b.add_batch(x3)
    a.merge(b)
    whole.add_batch(torch.cat([x1, x2, x3]))
    torch.testing.assert_close(a.finalize(), whole.finalize())
    assert a.tokens == whole.tokens == 20
    # timestep weighting: tokens of a batch count its weight times
    wa = GramAccumulator(6, dtype=torch.float64)
    wa.add_batch(x1, 2.0)
    wa.add_batch(x2, 0.5)
    r1, r2 = x1.reshape(-1, 6).double(), x2.reshape(-1, 6).double()
    expected = (2.0 * r1.t() @ r1 + 0.5 * r2.t() @ r2) / (2.0 * 6 + 0.5 * 10)
    torch.testing.assert_close(wa.finalize(), expected)
    sq = ChannelSquareMean(6)
    sq.add_batch(x1, 2.0)
    sq.add_batch(x2, 0.5)
    torch.testing.assert_close(wa.finalize().diagonal(), sq.finalize())


def test_plan_groups_respects_the_budget_and_names_a_layer_too_big() -> None:
    layers = [("a", 4), ("b", 4), ("c", 8), ("d", 2)]  # Grams of 64, 64, 256, 16 bytes
    assert plan_groups(layers, 256) == [["a", "b"], ["c"], ["d"]]
    assert plan_groups(layers, 399) == [["a", "b", "c"], ["d"]]
    assert plan_groups(layers, 400) == [["a", "b", "c", "d"]]
    with pytest.raises(ValueError, match=r"layer 'c' \(8 inputs need 256 bytes\)"):
        plan_groups(layers, 200)


def test_gram_recorder_weights_steps_and_removes_hooks_after_an_exception() -> None:
    layer = nn.Linear(3, 2)
    x = torch.tensor([[1.0, 2.0, 0.0]])
    with GramRecorder({"l": layer}, weighting=lambda s: 1.0 + s) as rec:
        rec.set_sigma(1.0)
        layer(x)
        rec.set_sigma(0.0)
        layer(2 * x)
    expected = (2.0 * x.t() @ x + 1.0 * 4 * x.t() @ x) / 3.0
    torch.testing.assert_close(rec.grams()["l"], expected)
    with pytest.raises(RuntimeError, match="boom"), GramRecorder({"l": layer}):
        raise RuntimeError("boom")
    assert not layer._forward_hooks
