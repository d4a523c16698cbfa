"""The held-out frontier benchmark's pieces by hand (its figures come from ``python -m bench
frontier``): each format's bits per weight on FLUX.1-dev, the table the chooser reads, the frontier
per budget, the file-size targets, a run of one test-bed added to the others', and a real tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.__main__ import bench_command
from bench.frontier import (
    FLUX_GGUF_QUANTISED,
    FULL,
    REDUCED,
    Point,
    as_gguf_file_,
    best_for_budget,
    points_named,
    run_frontier,
    table_shrink_text,
    to_table,
    write_frontier,
)
from bench.generalisation import GenRow
from bench.lowbit import FLUX_REMAINDER_CODED, flux_rest_gb
from ditprune_core.config import ReconstructParams
from ditprune_core.dit_shapes import FLUX_PRUNABLE, FLUX_REST, FLUX_TOTAL
from ditprune_core.miniflux.pipeline import load_bundled
from ditprune_core.tiers import choose_for_size


def test_bits_per_weight_of_each_format_on_flux_by_hand() -> None:
    # dense int3: 3-bit codes, a 16-bit scale per 128 weights (symmetric): 3 + 16/128
    assert Point("dense", "int3").flux_bits_per_weight() == pytest.approx(3.125, abs=1e-4)
    # dense int4: 4-bit codes, a 16-bit scale and a 4-bit zero point per 128 weights
    dense4 = Point("dense", "int4").flux_bits_per_weight()
    assert dense4 == pytest.approx(4 + 20 / 128, abs=1e-4)
    # 50% + int4: 1 mask bit per weight, half the weights kept (FLUX's rows keep whole groups of 128)
    assert Point("sparse", "int4", 0.5).flux_bits_per_weight() == pytest.approx(1 + dense4 / 2, abs=1e-4)
    # fp8 kept values: 8 bits each, a float32 scale per row, and the mask
    assert Point("sparse", "fp8", 0.5).flux_bits_per_weight() == pytest.approx(1 + 4, abs=0.03)
    assert Point("gguf", "Q2_K").flux_bits_per_weight() == 2.625
    assert Point("fp8 cast", "fp8").flux_bits_per_weight() == 8.0
    gb = Point("dense", "int3").flux_gb()
    assert gb["int4"] == pytest.approx(3.125 * FLUX_PRUNABLE / 8e9 + flux_rest_gb("int4"), abs=2e-3)


def test_names_and_what_the_nodes_can_make() -> None:
    assert Point("sparse", "int3", 0.75, rest="int4").name == "75% + int3 + OBS, rest int4"
    assert Point("dense", "int2").name == "dense int2 + OBS" and Point("dense", "int2").value_bits == 2
    assert Point("sparse", "fp8", 0.3).value_bits is None and Point("sparse", "fp8", 0.3).reconstructed
    assert not Point("gguf", "Q3_K").reconstructed and Point("gguf", "Q3_K").value_bits is None
    # the sets: sparse from 20% to 75%, dense 2-4 bits, fp8, the references; miniflux-c a subset
    names = {p.name for p in FULL}
    assert {"20% + int4 + OBS", "75% + int3 + OBS", "dense int2 + OBS", "GGUF Q3_K", "RTN int4"} <= names
    assert {p.name for p in REDUCED} <= names


def _rows() -> list[GenRow]:
    return [
        GenRow("a", 0.0, "GGUF Q3_K", [0.02], [0.02], [3.4375]),
        GenRow("a", 0.0, "GGUF Q2_K", [0.06], [0.06], [2.625]),
        GenRow("a", 0.0, "dense int3 + OBS", [0.01], [0.03], [3.2]),  # 3.125 b/w on FLUX
        GenRow("a", 0.5, "50% + int4 + OBS", [0.01], [0.025], [3.2]),  # 3.078
        GenRow("a", 0.75, "75% + int3 + OBS, rest int4", [0.03], [0.05], [1.8]),  # 1.781, 3.73 GB
        GenRow("a", 0.0, "dense int2 + OBS, rest int4", [0.05], [0.08], [2.2]),  # 2.125, 4.00 GB
        GenRow("a", 0.55, "55% + int4 + OBS, rest int4", [0.004], [0.008], [2.9]),  # 2.871, 4.90 GB
    ]


def test_the_table_the_chooser_reads_and_the_frontier_per_budget() -> None:
    table = to_table(_rows(), "cmd")
    assert table["models"] == ["a"] and table["command"] == "cmd"
    by_name = {p["name"]: p for p in table["points"]}
    assert by_name["50% + int4 + OBS"]["models"]["a"] == {"held": 0.025, "seen": 0.01, "bits_per_weight": 3.2}
    assert by_name["50% + int4 + OBS"]["value_bits"] == 4 and by_name["50% + int4 + OBS"]["reconstructed"]
    assert by_name["75% + int3 + OBS, rest int4"]["remainder_measured"] == "int4"
    assert table["rest_bytes_per_param"]["int4"] < table["rest_bytes_per_param"]["fp8"] < 2.0
    best = {b: (p or {}).get("name") for b in (1.5, 2.0, 3.0, 3.1, 3.5) for p in [best_for_budget(table, b)]}
    assert best == {
        1.5: None,  # nothing is that small
        2.0: "75% + int3 + OBS, rest int4",
        3.0: "55% + int4 + OBS, rest int4",  # 0.008 beats Q2_K's 0.06
        3.1: "55% + int4 + OBS, rest int4",
        3.5: "55% + int4 + OBS, rest int4",  # below Q3_K (0.02) and dense int3 (0.03)
    }


def test_markdown_states_the_frontier_and_the_file_size_targets(tmp_path: Path) -> None:
    text = write_frontier(_rows(), tmp_path, "cmd").read_text()
    assert "| 3.5 | 55% + int4 + OBS, rest int4 | yes | 2.87 |" in text
    # <= 5 GB: 55% + int4 whole file (4.90 GB) 0.008 vs Q3_K 0.02: 0.40x, at most half: met
    assert "- met: a: best FLUX.1-dev file <= 5 GB is 55% + int4 + OBS, rest int4 (4.90 GB)" in text
    # <= 4 GB: 75% + int3 whole file (3.73 GB) 0.05 vs Q2_K 0.06: below: met (dense int2 is 4.11 GB)
    assert "- met: a: best FLUX.1-dev file <= 4 GB is 75% + int3 + OBS, rest int4 (3.73 GB)" in text
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert saved["points"] == to_table(_rows(), "cmd")["points"]


def test_a_run_of_one_test_bed_is_added_to_the_others(tmp_path: Path) -> None:
    write_frontier(_rows(), tmp_path, "first")
    other = [GenRow("miniflux-c", 0.0, "GGUF Q3_K", [0.01], [0.01], [3.4375])]
    write_frontier(other, tmp_path, "second", previous=tmp_path / "frontier.json")
    table = json.loads((tmp_path / "frontier.json").read_text())
    assert table["command"] == ["first", "second"]
    assert table["models"] == ["miniflux-c", "a"] or set(table["models"]) == {"a", "miniflux-c"}
    q3 = next(p for p in table["points"] if p["name"] == "GGUF Q3_K")
    assert set(q3["models"]) == {"a", "miniflux-c"}
    assert "`first`, then `second`" in (tmp_path / "frontier.md").read_text()


def test_a_table_of_clipped_ranges_is_its_own(tmp_path: Path) -> None:
    write_frontier(_rows(), tmp_path, "first", clip="mse")
    table = json.loads((tmp_path / "frontier.json").read_text())
    assert table["clip"] == "mse"
    assert "**Range rule: `clip='mse'`**" in (tmp_path / "frontier.md").read_text()
    with pytest.raises(ValueError, match="measured with clip 'mse', this run with 'range'"):
        write_frontier(_rows(), tmp_path, "second", previous=tmp_path / "frontier.json")
    assert json.loads((tmp_path / "frontier.json").read_text())["command"] == "first"  # untouched
    write_frontier(_rows(), tmp_path / "plain", "plain")
    assert "Range rule" not in (tmp_path / "plain" / "frontier.md").read_text()


def test_clipped_ranges_reach_the_round_to_nearest_reference() -> None:
    points = [Point("rtn", "int3")]
    runs = {
        clip: run_frontier(["miniflux-a"], splits=[(0,)], eval_seeds=(0,), points=points, clip=clip)[0]
        for clip in ("range", "mse")
    }
    assert runs["mse"].held != runs["range"].held and runs["mse"].bits == runs["range"].bits


def test_one_real_split_of_the_bundled_test_bed() -> None:
    """miniflux-a calibrated on class 0: GGUF needs no calibration; dense int2 + OBS and its whole
    file share one OBS run; every point has one seen and one held-out error."""
    points = [Point("gguf", "Q2_K"), Point("dense", "int2"), Point("dense", "int2", rest="int4")]
    rows = run_frontier(["miniflux-a"], splits=[(0,)], eval_seeds=(0,), points=points)
    got = {r.method: r for r in rows}
    assert list(got) == [p.name for p in points]
    assert got["GGUF Q2_K"].runs == [0] and got["dense int2 + OBS"].runs == [1]
    assert got["dense int2 + OBS, rest int4"].bits == got["dense int2 + OBS"].bits
    assert got["dense int2 + OBS, rest int4"].held != got["dense int2 + OBS"].held  # the rest rounded too
    assert all(0 < r.held[0] < 1 and 0 < r.seen[0] < 1 for r in rows)


def test_the_whole_gguf_file_has_the_published_size() -> None:
    """ComfyUI-GGUF's converter keeps the embedders and the final layer in 16 bits and puts every other
    2-D weight, the modulation (3.23B) included, in the format: FLUX.1-dev's Q3_K file is 5.22 GB and
    its Q2_K file 4.02 GB (city96's published files: 5.23 and 4.03 GB)."""
    assert FLUX_GGUF_QUANTISED - FLUX_PRUNABLE == 19 * 2 * 6 * 3072 * 3072 + 38 * 3 * 3072 * 3072
    q3 = Point("gguf", "Q3_K", gguf_file=True)
    kept = FLUX_TOTAL - FLUX_GGUF_QUANTISED
    assert q3.flux_gb()["int4"] == pytest.approx((FLUX_GGUF_QUANTISED * 110 / 256 + 2 * kept) / 1e9, abs=1e-3)
    assert q3.flux_gb()["int4"] == pytest.approx(5.22, abs=0.01)
    assert Point("gguf", "Q2_K", gguf_file=True).flux_gb()["keep"] == pytest.approx(4.02, abs=0.01)
    assert q3.name == "GGUF Q3_K file (modulation Q3_K)" and q3.remainder_measured == "gguf"
    assert not q3.reconstructed and q3 in FULL and q3 in REDUCED


def test_file_targets_compare_with_the_whole_gguf_file(tmp_path: Path) -> None:
    rows = [
        *_rows(),
        GenRow("a", 0.0, "GGUF Q3_K file (modulation Q3_K)", [0.03], [0.03], [3.4375]),
        GenRow("a", 0.0, "GGUF Q2_K file (modulation Q2_K)", [0.045], [0.045], [2.625]),
    ]
    text = write_frontier(rows, tmp_path, "cmd").read_text()
    # <= 5 GB: 0.008 vs the Q3_K file's 0.03 (not the prunable layers' 0.02)
    assert "(4.90 GB), held-out 0.00800 vs the GGUF Q3_K file (5.22 GB) 0.03000 (0.27x" in text
    assert "GGUF Q3_K on the prunable layers only: 0.02000" in text
    # <= 4 GB: 75% + int3 (0.05) is not below the Q2_K file's 0.045, though below Q2_K's layers' 0.06
    assert "- **not met**: a: best FLUX.1-dev file <= 4 GB is 75% + int3 + OBS, rest int4" in text
    assert "| GGUF Q3_K file (modulation Q3_K) | no | 3.44 | 5.22 (the whole file) |" in text
    # the bits/weight targets, on the prunable layers (whole files are not candidates there):
    # <= 3.0 b/w: none of the reconstructed points without rest fits but ... dense int3 is 3.125
    assert (
        "- met: a: best at <= 3.5 b/w is 50% + int4 + OBS (3.08 b/w) 0.02500 vs GGUF Q3_K 0.02000" not in text
    )
    assert (
        "- **not met**: a: best at <= 3.5 b/w is 50% + int4 + OBS (3.08 b/w) 0.02500 vs GGUF Q3_K 0.02000"
        in text
    )


def test_a_whole_file_with_the_rest_in_int3(tmp_path: Path) -> None:
    point = Point("sparse", "int3", 0.55, rest="int3")
    assert point.name == "55% + int3 + OBS, rest int3" and point.remainder_measured == "int3"
    gb = point.flux_gb()
    # the modulation in 3-bit symmetric groups of 128: 3.125 bits a weight against int4's 4.125 +
    # zeros; the embedders, final layer, norms and biases (67M) in bf16
    coded = 19 * 2 * 3072 * 6 * 3072 + 38 * 3072 * 3 * 3072  # img_mod/txt_mod, single modulation
    assert coded == FLUX_REMAINDER_CODED
    kept = 2 * (FLUX_REST - coded)
    assert flux_rest_gb("int3") == pytest.approx((coded * (3 + 16 / 128) / 8 + kept) / 1e9, abs=2e-3)
    assert flux_rest_gb("keep") == pytest.approx(2 * FLUX_REST / 1e9)
    assert gb["int4"] - gb["int3"] == pytest.approx(0.42, abs=0.01) and gb["int3"] < 4.0 < gb["int4"]
    assert point in FULL and point in REDUCED
    rows = [
        *_rows(),
        GenRow("a", 0.0, "GGUF Q2_K file (modulation Q2_K)", [0.045], [0.045], [2.625]),
        GenRow("a", 0.55, "55% + int3 + OBS, rest int3", [0.03], [0.04], [2.5]),
        GenRow("a", 0.0, "fp8 cast (ComfyUI)", [0.001], [0.001], [8.0]),
    ]
    text = write_frontier(rows, tmp_path, "cmd").read_text()
    assert f"| 55% + int3 + OBS, rest int3 | yes | 2.41 | {gb['int3']:.2f} (rest int3) |" in text
    # <= 4 GB: the rest-int3 file (0.04) is below the Q2_K file's 0.045, where 75% + int3 (0.05) is not
    assert (
        f"- met: a: best FLUX.1-dev file <= 4 GB is 55% + int3 + OBS, rest int3 ({gb['int3']:.2f} GB), "
        "held-out 0.04000 vs the GGUF Q2_K file" in text
    )
    # the nodes can make it: Save Pruned Model's remainder int3
    table = json.loads((tmp_path / "frontier.json").read_text())
    choice = choose_for_size(table, 4.0)
    assert choice.point == "55% + int3 + OBS, rest int3" and choice.remainder == "int3"
    assert choice.file_gb == pytest.approx(gb["int3"], abs=2e-3)


def test_points_by_name_and_a_run_of_a_few_points_keeps_the_rest(tmp_path: Path) -> None:
    assert points_named(["dense int2 + OBS"]) == [Point("dense", "int2")]
    with pytest.raises(ValueError, match=r"no frontier point is named \['dense int5'\].*dense int2 \+ OBS"):
        points_named(["dense int5"])
    write_frontier(_rows(), tmp_path, "first")
    again = [GenRow("a", 0.0, "GGUF Q3_K", [0.04], [0.04], [3.4375])]
    write_frontier(again, tmp_path, "second", previous=tmp_path / "frontier.json")
    points = {p["name"]: p for p in json.loads((tmp_path / "frontier.json").read_text())["points"]}
    assert points["GGUF Q3_K"]["models"]["a"]["held"] == 0.04  # re-measured
    assert points["dense int3 + OBS"]["models"]["a"]["held"] == 0.03  # kept


def test_the_command_a_table_names() -> None:
    argv = ["frontier", "--out", "/tmp/x", "--points", "GGUF Q3_K file (modulation Q3_K)", "--out=/y"]
    assert bench_command(argv) == "python -m bench frontier --points 'GGUF Q3_K file (modulation Q3_K)'"


def test_the_gguf_file_rounds_the_modulation_and_keeps_the_embedders() -> None:
    pipe = load_bundled("miniflux-a")
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    as_gguf_file_(pipe.model, "Q2_K")
    after = pipe.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert (
        "double_blocks.0.img_mod.lin.weight" in changed and "single_blocks.1.modulation.lin.weight" in changed
    )
    assert "double_blocks.0.img_attn.qkv.weight" in changed and "single_blocks.0.linear2.weight" in changed
    assert not changed & {"txt_in.weight", "time_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight"}
    assert not any(after[k].dim() == 1 for k in changed)  # biases and norms stay


def test_a_table_measured_with_another_shrinkage_is_never_merged(tmp_path: Path) -> None:
    """Points measured with another ``ReconstructParams.shrink_text`` (the table before the default
    changed has no key: 0) never mix with the product's; ``--shrink-text`` adds to it."""
    default = ReconstructParams().shrink_text
    write_frontier(_rows(), tmp_path, "first", shrink_text=0.0)
    table = json.loads((tmp_path / "frontier.json").read_text())
    assert table["shrink_text"] == 0.0 and table_shrink_text({"points": []}) == 0.0
    md = (tmp_path / "frontier.md").read_text()
    assert "Grams shrunk by 0 " in md and f"the product's default is now {default:g}" in md
    with pytest.raises(ValueError, match=f"shrink_text 0.0, this run with {default}: add --shrink-text 0.0"):
        write_frontier(_rows(), tmp_path, "second", previous=tmp_path / "frontier.json")
    assert json.loads((tmp_path / "frontier.json").read_text())["command"] == "first"  # untouched
    write_frontier(_rows(), tmp_path, "second", previous=tmp_path / "frontier.json", shrink_text=0.0)
    assert json.loads((tmp_path / "frontier.json").read_text())["command"] == ["first", "second"]
    write_frontier(_rows(), tmp_path / "now", "now")
    assert "the product's default)" in (tmp_path / "now" / "frontier.md").read_text()


def test_merging_recomputes_the_sizes_of_points_measured_before(tmp_path: Path) -> None:
    """A point kept from an older table gets today's FLUX.1-dev sizes (arithmetic, not measured):
    the remainder's layers changed after some points were measured."""
    write_frontier(_rows(), tmp_path, "first")
    path = tmp_path / "frontier.json"
    table = json.loads(path.read_text())
    stale = next(p for p in table["points"] if p["name"] == "55% + int4 + OBS, rest int4")
    stale["flux_gb"] = {"keep": 1.0, "fp8": 1.0, "int4": 1.0, "int3": 1.0}
    path.write_text(json.dumps(table))
    q3 = [GenRow("a", 0.0, "GGUF Q3_K", [0.02], [0.02], [3.4375])]
    write_frontier(q3, tmp_path, "second", previous=path)
    merged = next(p for p in json.loads(path.read_text())["points"] if p["name"] == stale["name"])
    assert merged["flux_gb"] == Point("sparse", "int4", 0.55, rest="int4").flux_gb()
    assert merged["models"]["a"]["held"] == stale["models"]["a"]["held"]  # the measurement is kept
