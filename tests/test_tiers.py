"""The VRAM tiers: the size–fidelity table's choice per card, and the table they are read from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.pareto import read_markdown, to_json
from ditprune_core.tiers import (
    FLUX_LARGEST_DECODED_BYTES,
    GIB,
    choose_tier,
    choose_tiers,
    comfy_reserve_bytes,
    parse_setting,
)

BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"


def test_settings_are_read_from_point_names() -> None:
    assert parse_setting("ditprune+OBS 52% + 4-bit g128 asym, rest int4") == {
        "reconstruct": True,
        "sparsity": 0.52,
        "pattern": "unstructured",
        "values": "int4",
        "value_bits": 4,
        "block_refine": True,
        "rest_measured": "int4",
    }
    nm = parse_setting("ditprune 2:4 + fp8")
    assert nm is not None and nm["pattern"] == "2:4" and nm["sparsity"] == 0.5 and not nm["reconstruct"]
    off = parse_setting("ditprune+OBS 50% + 3-bit g128 sym (no block refinement)")
    assert off is not None and off["value_bits"] == 3 and not off["block_refine"]
    assert parse_setting("GGUF Q4_0") is None and parse_setting("fp8 cast (ComfyUI)") is None


def test_comfy_reserve_is_comfyuis_own_formula() -> None:
    # FLUX at 1024x1024: 128x128 latent x 2 bytes x 0.01 x 3.1 MiB, plus 0.8 GiB + 400 MiB
    assert comfy_reserve_bytes() == int(16384 * 2 * 0.01 * 3.1 * 2**20) + int(0.8 * GIB) + 400 * 2**20


def _table(points: list[tuple[str, float, float]]) -> dict:
    """A one-model table: (name, rest fp8 GB, rel. error); rest bf16 = +3.3 GB, rest int4 = -1.6 GB."""
    rows = [
        {
            "name": n,
            "flux_bits_per_weight": 3.0,
            "flux_gb": {"rest_bf16": gb + 3.3, "rest_fp8": gb, "rest_int4": gb - 1.6},
            "rel_err": err,
        }
        for n, gb, err in points
    ]
    return {"models": {"m": rows}}


def test_the_least_error_that_fits_and_never_a_file_fp8_beats() -> None:
    table = _table(
        [
            ("fp8 cast (ComfyUI)", 11.9, 0.02),
            ("ditprune+OBS 50% + bf16", 13.0, 0.07),  # fp8 is smaller and better: never chosen
            ("ditprune+OBS 45% + 4-bit g128 asym", 6.8, 0.075),
            ("ditprune+OBS 52% + 4-bit g128 asym, rest int4", 6.5, 0.10),  # int4 column: 4.9 GB
            ("ditprune 50% + 4-bit g128 asym", 6.6, 0.19),  # mask only: not what the workflows make
        ]
    )
    eight, twelve, sixteen = choose_tiers(table, (8, 12, 16))
    assert (eight.point, eight.remainder, eight.file_gb) == (
        "ditprune+OBS 52% + 4-bit g128 asym, rest int4",
        "int4",
        4.9,
    )
    needs = 4.9e9 + FLUX_LARGEST_DECODED_BYTES + comfy_reserve_bytes()
    assert eight.needs_gb == pytest.approx(needs / 1e9, abs=0.01)
    assert (twelve.point, twelve.remainder, twelve.values, twelve.value_bits) == (
        "ditprune+OBS 45% + 4-bit g128 asym, rest fp8",
        "fp8",
        "int4",
        4,
    )
    assert twelve.verdict == "ditprune" and not twelve.fp8_fits
    assert sixteen.verdict == "fp8" and sixteen.fp8_fits  # 11.9 GB fits 16 GiB and has less error
    with pytest.raises(ValueError, match="fits 4 GiB"):
        choose_tier(table, 4)


def test_committed_tiers_are_the_choice_of_the_committed_table() -> None:
    """docs/bench/vram_tiers.json (which the workflows are made from) is what the chooser makes of
    docs/bench/pareto.json, which holds the means of docs/bench/pareto.md."""
    table = json.loads((BENCH / "pareto.json").read_text())
    tiers = json.loads((BENCH / "vram_tiers.json").read_text())["tiers"]
    assert [c.to_dict() for c in choose_tiers(table)] == tiers
    again = to_json(read_markdown(BENCH / "pareto.md"), table["command"])
    assert again == table
