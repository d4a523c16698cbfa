"""The generalisation benchmark's pieces by hand (its figures come from ``python -m bench
generalisation``): the targets it checks, its table, and one real method on a tiny split."""

from __future__ import annotations

import types
import typing
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.generalisation import METHODS, GenRow, checks, run_generalisation, write_generalisation
from ditprune_core.config import PruneConfig, ReconstructParams


def _rows() -> list[GenRow]:
    return [
        GenRow("m", 0.5, "mask-only defaults", [0.03, 0.03], [0.04, 0.04]),
        GenRow("m", 0.5, "SparseGPT one-shot", [0.01], [0.02]),
        # held 0.012: 40% below SparseGPT, mask-only 3.33x; held/seen 0.012 / 0.01 = 1.2
        GenRow("m", 0.5, "obs defaults", [0.01, 0.01], [0.012, 0.012], [17.0], [1], [3.0]),
        GenRow("m", 0.7, "SparseGPT one-shot", [0.05], [0.06]),
        GenRow("m", 0.7, "mask-only defaults", [0.1], [0.1]),
        # held 0.05: 17% below SparseGPT, mask-only 2.0x, held/seen 2.5
        GenRow("m", 0.7, "obs defaults", [0.02], [0.05], [12.0], [1], [2.0]),
        GenRow("m", 0.5, "obs + int4", [0.02], [0.03], [3.2], [1], [3.0]),
        GenRow("m", 0.5, "obs + int3", [0.04], [0.05], [2.7], [1], [3.0]),
        GenRow("m", 0.0, "GGUF Q3_K", [0.02], [0.025], [3.44]),
        GenRow("m", 0.0, "GGUF Q2_K", [0.06], [0.09], [2.62], [0], [0.4]),
    ]


def test_targets_are_checked_on_held_out_means() -> None:
    got = {text.split(": ", 1)[1]: ok for text, ok in checks(_rows())}
    assert got["obs defaults 0.01200 vs SparseGPT one-shot 0.02000 held out: 40% below (target >= 30%)"]
    assert got["mask-only defaults 0.04000 / obs defaults 0.01200 held out = 3.3x (target >= 3x)"]
    assert got["obs defaults held/seen 1.20 (target <= 1.5)"]
    assert not got["obs defaults 0.05000 vs SparseGPT one-shot 0.06000 held out: 17% below (target >= 30%)"]
    assert got["mask-only defaults 0.10000 / obs defaults 0.05000 held out = 2.0x (target >= 2x)"]
    assert not got["obs defaults held/seen 2.50 (target <= 1.5)"]
    # <= 3.0 bits: only int3 (2.7 b/w) fits: 0.05 against Q2_K's 0.09 is 0.56x, not half
    q2 = [ok for text, ok in checks(_rows()) if "Q2_K" in text]
    q3 = [ok for text, ok in checks(_rows()) if "Q3_K" in text]
    assert q2 == [False] and q3 == [False]  # int4 0.03 is not below Q3_K's 0.025


def test_table_reports_seen_held_out_and_their_ratio(tmp_path: Path) -> None:
    text = write_generalisation(_rows(), tmp_path, "cmd").read_text()
    assert "| m | 50% | obs defaults | 17.00 | 0.01000 | 0.01200 | 1.20 | 1 | 3 |" in text
    assert "| m | - | GGUF Q2_K | 2.62 | 0.06000 | 0.09000 | 1.50 | 0 | 0 |" in text
    assert "| 50% | obs defaults | 0.01200 |" in text  # the mean over test-beds
    assert "- **not met**: m 70%: obs defaults held/seen 2.50" in text
    assert "Reduced run: miniflux-a, miniflux-b, miniflux-c not run" in text


def test_an_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown generalisation method"):
        run_generalisation(["miniflux-a"], methods=["obs forever"])


def test_one_real_split_of_the_bundled_test_bed() -> None:
    """Mask-only pruning of miniflux-a calibrated on class 0 only: one seen and one held-out error
    per (split, seed), and pruning moves the samples."""
    rows = run_generalisation(["miniflux-a"], [0.5], ["mask-only defaults"], splits=[(0,)], eval_seeds=(0,))
    assert [(r.sparsity, r.method) for r in rows] == [(0.5, "mask-only defaults")]
    assert len(rows[0].seen) == len(rows[0].held) == 1
    assert 0 < rows[0].seen[0] < 1 and 0 < rows[0].held[0] < 1
    assert rows[0].bits == [] and rows[0].runs == [0]
    assert set(METHODS) >= {"obs defaults", "SparseGPT one-shot", "GGUF Q2_K"}


def test_rows_of_parallel_splits_merge_into_one_table() -> None:
    from bench.generalisation import merge_rows

    first = [GenRow("m", 0.5, "obs defaults", [0.01], [0.02], [17.0], [1], [3.0])]
    second = [
        GenRow("m", 0.5, "obs defaults", [0.03], [0.04], [17.0], [1], [5.0]),
        GenRow("n", 0.5, "obs defaults", [0.1], [0.2], [17.0], [1], [1.0]),
    ]
    merged = merge_rows([first, second])
    assert [(r.model, r.seen, r.held, r.seconds) for r in merged] == [
        ("m", [0.01, 0.03], [0.02, 0.04], [3.0, 5.0]),
        ("n", [0.1], [0.2], [1.0]),
    ]
    assert first[0].seen == [0.01]  # the parts are not changed


def test_the_frontier_takes_the_least_held_out_error_within_each_budget() -> None:
    from bench.generalisation import frontier

    rows = [
        *_rows(),
        GenRow("m", 0.0, "dense int3 + OBS (quantise only)", [0.01], [0.02], [3.13], [1], [1.0]),
    ]
    best = {
        budget: (r.method, r.sparsity) if r else None
        for _m, budget, r in frontier(rows, (2.0, 2.7, 3.3, 3.5))
    }
    assert best[2.0] is None  # nothing is that small
    assert best[2.7] == ("obs + int3", 0.5)  # 2.70 b/w, 0.05 against GGUF Q2_K's 0.09 at 2.62
    assert best[3.3] == ("dense int3 + OBS (quantise only)", 0.0)  # 0.02 beats int4's 0.03 and int3's 0.05
    assert best[3.5] == ("dense int3 + OBS (quantise only)", 0.0)
    # and the size targets count dense ditprune points too: <= 3.5 b/w, 0.02 < Q3_K's 0.025
    assert [ok for text, ok in checks(rows) if "Q3_K" in text] == [True]


def test_the_before_rows_run_without_text_shrinkage(monkeypatch: pytest.MonkeyPatch) -> None:
    """``..., no text shrinkage`` is the defaults with ``shrink_text=0``, and only that (the configs
    the methods hand to ``prune_sequential_``)."""
    import bench.generalisation as gen

    seen: list[PruneConfig] = []

    def record(_model: object, _run: object, config: PruneConfig, **_kw: object) -> _Report:
        seen.append(config)
        return _Report()

    monkeypatch.setattr(gen, "prune_sequential_", record)
    split = typing.cast(gen.Split, _FakeSplit())
    for name in (
        "obs defaults",
        "obs, no text shrinkage",
        "dense int3 + OBS, no text shrinkage (quantise only)",
    ):
        METHODS[name][0](split, 0.0 if "dense" in name else 0.5)
    default, before, dense = seen
    assert default.reconstruct.shrink_text == ReconstructParams().shrink_text > 0
    assert before == replace(default, reconstruct=replace(default.reconstruct, shrink_text=0.0))
    assert dense.value_bits == 3 and dense.sparsity == 0 and dense.reconstruct.shrink_text == 0


class _Report:
    bits_per_weight, sampler_runs = 0.0, 1


class _FakeSplit:
    """Just enough of a :class:`~bench.generalisation.Split` for a method to build its config."""

    pipe = types.SimpleNamespace(model=torch.nn.Linear(1, 1), conditioner=None)

    def calibrate(self, pipe: object, cal: object) -> None:
        pass
