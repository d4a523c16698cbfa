"""The coverage-ceiling benchmark (its figures come from ``python -m bench ceiling``): its ratios and
target lines by hand, and one real run on a bundled test-bed."""

from __future__ import annotations

from pathlib import Path

from bench.ceiling import PAIR, CeilingRow, checks, run_ceiling, write_ceiling


def _rows() -> list[CeilingRow]:
    mask, obs = PAIR
    return [
        # 50%: ceiling 0.03 / 0.01 = 3x, held out 0.04 / 0.02 = 2x, gap 0.02 / 0.01 = 2x
        CeilingRow("m", 0.5, mask, [0.02, 0.04], [0.04]),
        CeilingRow("m", 0.5, obs, [0.01, 0.01], [0.015, 0.025]),
        # 70%: ceiling 0.1 / 0.0625 = 1.6x, below the 2x target
        CeilingRow("m", 0.7, mask, [0.1], [0.1]),
        CeilingRow("m", 0.7, obs, [0.0625], [0.08]),
        CeilingRow("n", 0.5, mask, [0.03], []),  # no held-out run: no line
        CeilingRow("n", 0.5, obs, [0.01], []),
    ]


def test_ratios_and_targets_by_hand(tmp_path: Path) -> None:
    text = write_ceiling(_rows(), tmp_path, "cmd").read_text()
    assert "| m | 50% | 0.03000 | 0.01000 | 3.00x | 0.04000 | 0.02000 | 2.00x | 2.00x |" in text
    assert "| m | 70% | 0.10000 | 0.06250 | 1.60x | 0.10000 | 0.08000 | 1.25x | 1.28x |" in text
    assert "| n |" not in text
    lines = checks(_rows())
    assert lines == [
        "- m 50%: target 3x below mask-only; the ceiling is 3.0x (above the target), held out 2.0x; "
        "held out the reconstruction's error is 2.00x its error on the same classes calibrated on",
        "- m 70%: target 2x below mask-only; the ceiling is 1.6x (**below** the target), held out 1.2x; "
        "held out the reconstruction's error is 1.28x its error on the same classes calibrated on",
    ]


def test_one_real_run_scores_both_calibrations() -> None:
    """miniflux-a at 50%, one evaluation seed: every class (both halves) and held out (both splits)
    scored for each method; the reconstruction beats mask-only calibrated on every class."""
    rows = {r.method: r for r in run_ceiling(["miniflux-a"], [0.5], eval_seeds=(0,))}
    assert set(rows) == set(PAIR)
    for r in rows.values():
        assert len(r.every) == 2 and len(r.held) == 2
        assert all(0 < e < 1 for e in r.every + r.held)
    mask, obs = (rows[name] for name in PAIR)
    assert sum(obs.every) < sum(mask.every)
