"""bench remainder_gptq: the table's ratios and merging by hand, and one real (short) run."""

from __future__ import annotations

import json

from bench.remainder_gptq import GptqRow, run_remainder_gptq, write_remainder_gptq


def _row(model: str, method: str, remainder: str, seen: float, held: float) -> GptqRow:
    return GptqRow(model, method, remainder, [seen, seen], [held, held])


def test_the_table_gives_each_rows_ratios_and_a_later_run_adds_to_it(tmp_path) -> None:
    first = [
        _row("miniflux-a", "round to nearest", "int3", 0.002, 0.002),
        _row("miniflux-a", "GPTQ, damp 1 (default)", "int3", 0.0005, 0.001),
    ]
    write_remainder_gptq(first, tmp_path, "python -m bench remainder_gptq")
    text = (tmp_path / "remainder_gptq.md").read_text()
    assert "| miniflux-a | int3 | GPTQ, damp 1 (default) | 0.00050 | 0.00100 | 2.00 | 0.50x |" in text
    assert "| miniflux-a | int3 | round to nearest | 0.00200 | 0.00200 | 1.00 | 1.00x |" in text
    later = [
        _row("miniflux-c", "round to nearest", "int3", 0.001, 0.001),
        _row("miniflux-c", "GPTQ, damp 1 (default)", "int3", 0.0001, 0.0002),
        _row("miniflux-a", "round to nearest", "int3", 0.004, 0.004),  # measured again: replaces
    ]
    write_remainder_gptq(later, tmp_path, "python -m bench remainder_gptq --models miniflux-c")
    text = (tmp_path / "remainder_gptq.md").read_text()
    assert (
        "`python -m bench remainder_gptq`, then `python -m bench remainder_gptq --models miniflux-c`" in text
    )
    assert "| miniflux-a | int3 | GPTQ, damp 1 (default) | 0.00050 | 0.00100 | 2.00 | 0.25x |" in text
    assert "| miniflux-c | int3 | GPTQ, damp 1 (default) | 0.00010 | 0.00020 | 2.00 | 0.20x |" in text
    saved = json.loads((tmp_path / "remainder_gptq.json").read_text())
    assert [(r["model"], r["method"]) for r in saved["rows"]] == [
        ("miniflux-a", "GPTQ, damp 1 (default)"),
        ("miniflux-a", "round to nearest"),
        ("miniflux-c", "round to nearest"),
        ("miniflux-c", "GPTQ, damp 1 (default)"),
    ]


def test_a_real_run_gptq_beats_round_to_nearest_held_out_on_miniflux_a() -> None:
    """One calibrated half, one evaluation seed: GPTQ at the default dampening has less held-out
    error than rounding the modulation to nearest in int3 (in int4 both are small and GPTQ is not
    always ahead held out: the table shows it)."""
    rows = run_remainder_gptq("miniflux-a", damps=(1.0,), splits=[(0, 1, 2, 3, 4)], eval_seeds=(0,))
    by = {(r.method, r.remainder): r for r in rows}
    assert set(by) == {
        ("round to nearest", "int3"),
        ("GPTQ, damp 1 (default)", "int3"),
        ("round to nearest", "int4"),
        ("GPTQ, damp 1 (default)", "int4"),
    }
    assert all(len(r.held) == len(r.seen) == 1 and r.mean("held") > 0 for r in rows)
    gptq, rtn = by[("GPTQ, damp 1 (default)", "int3")], by[("round to nearest", "int3")]
    assert gptq.mean("held") < rtn.mean("held")
    assert gptq.mean("seen") < rtn.mean("seen")
