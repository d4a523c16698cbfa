"""The quality benchmark held out (its figures come from ``python -m bench quality``): the shared
context calibrates on the seen classes only and evaluates on both halves, results of the two halves
merge, and the table leads with the held-out columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.context import BenchContext
from bench.quality import QualityResult, merge_results, run_quality


def test_a_held_out_context_calibrates_on_its_classes_and_evaluates_both_halves() -> None:
    ctx = BenchContext.build("miniflux-a", seeds=(0,), per_class=1, calibration_classes=(0, 1, 2, 3, 4))
    assert ctx.calibration_labels(2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ctx.dense[0].labels.tolist() == [0, 1, 2, 3, 4] and ctx.held[0].labels.tolist() == [5, 6, 7, 8, 9]
    dense = ctx.evaluate(ctx.pipe, full=False)  # the dense model against itself: no error anywhere
    assert dense == {"rel_err": [0.0], "rel_mse": [0.0], "held_rel_err": [0.0], "held_rel_mse": [0.0]}
    pruned = ctx.evaluate(ctx.pruned(ctx_config()), full=False)
    assert 0 < pruned["rel_mse"][0] < 1 and 0 < pruned["held_rel_mse"][0] < 1
    assert pruned["held_rel_mse"] != pruned["rel_mse"]
    # every class, as before: no held-out runs, no held_ metrics
    everything = BenchContext.build("miniflux-a", seeds=(0,), per_class=1)
    assert everything.held == {} and set(everything.evaluate(everything.pipe, full=False)) == {
        "rel_err",
        "rel_mse",
    }
    assert everything.calibration_labels(1).tolist() == list(range(10))


def ctx_config():  # type: ignore[no-untyped-def]
    from ditprune_core.config import PruneConfig

    return PruneConfig(0.5)


def _result(seen: float, held: float) -> QualityResult:
    metrics = {"rel_mse": [seen], "held_rel_mse": [held], "rel_err": [seen], "held_rel_err": [held]}
    return QualityResult("m", [("dit-pruning", "50%", metrics)], {"acc": [1.0], "fd": [50.0]}, {})


def test_the_two_halves_merge_and_claims_read_the_held_out_means() -> None:
    merged = merge_results([_result(0.01, 0.03), _result(0.02, 0.05)])
    (_method, _setting, metrics) = merged.rows[0]
    assert metrics["rel_mse"] == [0.01, 0.02] and metrics["held_rel_mse"] == [0.03, 0.05]
    assert merged.dense == {"acc": [1.0, 1.0], "fd": [50.0, 50.0]}
    assert merged.held_out and merged.mean("dit-pruning", "50%", "rel_mse") == pytest.approx(0.04)


def test_one_real_held_out_run_writes_the_held_out_columns() -> None:
    result = run_quality(
        "miniflux-a",
        seeds=(0,),
        per_class=1,
        methods=("dit-pruning",),
        settings=("50%",),
        splits=[(0, 1, 2, 3, 4)],
    )
    text = result.to_markdown()
    assert "| method | sparsity | held-out rel. MSE ↓ | seen rel. MSE ↓ | held/seen |" in text
    (_m, _s, metrics) = result.rows[0]
    ratio = np.mean(metrics["held_rel_mse"]) / np.mean(metrics["rel_mse"])
    assert f"| {ratio:.2f} |" in text
    assert torch.is_tensor(result.images["dense"])
