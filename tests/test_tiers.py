"""The size target and the VRAM tiers: the held-out frontier's choice per file size and per card,
and the committed tables they are read from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditprune_core.tiers import (
    FLUX_LARGEST_DECODED_BYTES,
    GIB,
    choose_for_size,
    choose_tier,
    choose_tiers,
    comfy_reserve_bytes,
    file_budget_gb,
    file_candidates,
)

BENCH = Path(__file__).resolve().parents[1] / "docs" / "bench"
#: 1e9 prunable and 1e9 other parameters: a point of b bits/weight is b/8 GB of prunable layers;
#: the rest is 2 GB kept, 1 GB fp8, 0.5 GB int4
PARAMS = 10**9


def _point(name: str, kind: str, bpw: float, errors: dict[str, float], **kw: object) -> dict:
    sparsity = kw.get("sparsity", 0.0)
    values = kw.get("values", "int4")
    return {
        "name": name,
        "kind": kind,
        "sparsity": sparsity,
        "values": values,
        "value_bits": int(str(values)[3:]) if str(values).startswith("int") and kind != "gguf" else None,
        "remainder_measured": kw.get("rest", "as trained"),
        "reconstructed": kind in ("sparse", "dense"),
        "flux_bits_per_weight": bpw,
        "flux_gb": kw.get("flux_gb", {}),
        "models": {m: {"held": e, "seen": e / 2, "bits_per_weight": bpw} for m, e in errors.items()},
        **({"value_group": kw["group"]} if "group" in kw else {}),
    }


def _table() -> dict:
    return {
        "models": ["a", "b", "c"],
        "flux_prunable_params": PARAMS,
        "flux_rest_params": PARAMS,
        "rest_bytes_per_param": {"keep": 2.0, "fp8": 1.0, "int4": 0.5},
        "points": [
            # ComfyUI's cast: its own size (every weight a byte, the rest kept: here 2 GB)
            _point(
                "fp8 cast (ComfyUI)",
                "fp8 cast",
                8.0,
                {"a": 0.001, "b": 0.003},
                values="fp8",
                flux_gb={"fp8": 2.0},
            ),
            _point("GGUF Q2_K", "gguf", 2.625, {"a": 0.05, "b": 0.07, "c": 0.02}, values="Q2_K"),
            # dense int4 + OBS: 0.52 GB of layers, + 1 GB fp8 rest = 1.52; + 2 GB kept = 2.52
            _point("dense int4 + OBS", "dense", 4.16, {"a": 0.003, "b": 0.005, "c": 0.0001}),
            # sparse 50% + int4: 0.385 GB of layers; mean error (a, b) 0.03
            _point("50% + int4 + OBS", "sparse", 3.08, {"a": 0.02, "b": 0.04}, sparsity=0.5),
            # its whole file with the rest in int4: 0.385 + 0.5 = 0.885 GB, mean 0.035
            _point(
                "50% + int4 + OBS, rest int4",
                "sparse",
                3.08,
                {"a": 0.03, "b": 0.04},
                sparsity=0.5,
                rest="int4",
            ),
            # 50% + fp8: 0.6275 GB of layers; error below dense int4 on a, b: but larger than the fp8
            # cast is not (1.6275 GB < 2.0 GB of the fp8 cast with rest fp8)
            _point("50% + fp8 + OBS", "sparse", 5.02, {"a": 0.002, "b": 0.004}, sparsity=0.5, values="fp8"),
        ],
    }


def test_candidates_are_the_reconstructed_points_with_the_remainders_they_measured() -> None:
    got = {(c.point, c.remainder): round(c.file_gb, 4) for c in file_candidates(_table())}
    assert got == {
        ("dense int4 + OBS", "keep"): 2.52,
        ("dense int4 + OBS, rest fp8", "fp8"): 1.52,
        ("50% + int4 + OBS", "keep"): 2.385,
        ("50% + int4 + OBS, rest fp8", "fp8"): 1.385,
        ("50% + int4 + OBS, rest int4", "int4"): 0.885,
        ("50% + fp8 + OBS", "keep"): 2.6275,
        ("50% + fp8 + OBS, rest fp8", "fp8"): 1.6275,
    }
    (dense,) = [c for c in file_candidates(_table()) if c.point == "dense int4 + OBS"]
    # chosen on the mean over the test-beds that measured every point (a, b), c only shown
    assert dense.mean_error == pytest.approx(0.004) and dense.errors == {"a": 0.003, "b": 0.005, "c": 0.0001}
    assert (dense.sparsity, dense.value_bits, dense.values) == (0.0, 4, "int4")


def test_the_size_target_picks_the_least_held_out_error_that_fits() -> None:
    table = _table()
    # 1.6 GB: dense int4 with the rest fp8 (1.52 GB, mean 0.004) beats 50% + int4 (0.03)
    c = choose_for_size(table, 1.6)
    assert (c.point, c.sparsity, c.value_bits, c.values, c.remainder) == (
        "dense int4 + OBS, rest fp8",
        0.0,
        4,
        "int4",
        "fp8",
    )
    # 1.7 GB: 50% + fp8 values (1.6275 GB, mean 0.003) wins, stored by Save as fp8_e4m3fn
    c = choose_for_size(table, 1.7)
    assert (c.point, c.sparsity, c.value_bits, c.values) == (
        "50% + fp8 + OBS, rest fp8",
        0.5,
        None,
        "fp8_e4m3fn",
    )
    # 1.0 GB: only the measured whole file with the rest in int4 fits
    assert choose_for_size(table, 1.0).point == "50% + int4 + OBS, rest int4"
    # another model's parameter counts: 2e9 prunable, no rest -> 50% + int4 is 0.77 GB
    assert choose_for_size(table, 0.8, 2 * PARAMS, 0).point == "50% + int4 + OBS"


def test_a_size_target_below_every_file_names_the_smallest() -> None:
    with pytest.raises(
        ValueError, match=r"at most 0.5 GB: the smallest is 50% \+ int4 \+ OBS, rest int4 at 0.885 GB"
    ):
        choose_for_size(_table(), 0.5)


def test_a_file_the_fp8_cast_beats_in_size_and_error_is_never_chosen() -> None:
    table = _table()
    for m in ("a", "b"):  # the fp8 cast (2 GB) now beats everything
        table["points"][0]["models"][m]["held"] = 0.0001
    c = choose_for_size(table, 3.0)
    assert c.file_gb < 2.0  # the kept-rest files (2.4-2.6 GB, larger and worse) are out
    assert c.point == "50% + fp8 + OBS, rest fp8"


def test_a_point_with_groups_of_32_is_made_with_value_group_32() -> None:
    table = _table()
    # dense int3 in groups of 32: 3.5 b/w = 0.4375 GB + 1 GB fp8 rest; mean error 0.0035 beats dense
    # int4's 0.004 at 1.52 GB; tables written before value_group existed read as groups of 128
    table["points"].append(
        _point("dense int3 g32 + OBS", "dense", 3.5, {"a": 0.003, "b": 0.004}, values="int3", group=32)
    )
    c = choose_for_size(table, 1.5)
    assert (c.point, c.value_bits, c.value_group, c.remainder) == (
        "dense int3 g32 + OBS, rest fp8",
        3,
        32,
        "fp8",
    )
    assert "3-bit values in groups of 32" in c.describe()
    dense4 = next(x for x in file_candidates(table) if x.point == "dense int4 + OBS")
    assert dense4.value_group == 128 and "in groups" not in dense4.describe()


def test_a_mixed_precision_file_is_chosen_only_for_a_model_whose_layers_it_names() -> None:
    """A point with ``upgrade_layers`` is made with that upgrade; for a model whose selected layers the
    regex does not find (another architecture's names) it is no candidate."""
    from ditprune_core.config import UPGRADE_ATTENTION

    table = _table()
    # dense int3 + attention int4: 3.3 b/w = 0.4125 GB + 1 GB fp8 rest; mean error 0.0025 beats
    # dense int4's 0.004 at 1.52 GB
    point = _point("dense int3 + attention int4 + OBS", "dense", 3.3, {"a": 0.002, "b": 0.003}, values="int3")
    table["points"].append({**point, "upgrade_layers": UPGRADE_ATTENTION})
    flux = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"]
    c = choose_for_size(table, 1.5, layer_names=flux)
    assert (c.point, c.value_bits, c.upgrade_layers) == (
        "dense int3 + attention int4 + OBS, rest fp8",
        3,
        UPGRADE_ATTENTION,
    )
    assert f"the layers /{UPGRADE_ATTENTION}/ at 4 bits" in c.describe()
    assert choose_for_size(table, 1.5).upgrade_layers == UPGRADE_ATTENTION  # no names given: every file
    sd3 = ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc1"]
    other = choose_for_size(table, 1.6, layer_names=sd3)
    assert (other.point, other.upgrade_layers) == ("dense int4 + OBS, rest fp8", None)


def test_the_tier_chooser_and_the_quantiser_agree_on_the_default_group() -> None:
    from ditprune_core import quantize, tiers

    assert tiers.DEFAULT_GROUP_SIZE == quantize.DEFAULT_GROUP_SIZE
    assert all(s.group_size == quantize.DEFAULT_GROUP_SIZE for s in quantize.DEFAULT_DENSE_SPECS.values())


def test_comfy_reserve_is_comfyuis_own_formula() -> None:
    # FLUX at 1024x1024: 128x128 latent x 2 bytes x 0.01 x 3.1 MiB, plus 0.8 GiB + 400 MiB
    assert comfy_reserve_bytes() == int(16384 * 2 * 0.01 * 3.1 * 2**20) + int(0.8 * GIB) + 400 * 2**20


def test_a_tier_is_the_size_target_of_its_card() -> None:
    free = 8 * GIB - FLUX_LARGEST_DECODED_BYTES - comfy_reserve_bytes()
    assert file_budget_gb(8) == pytest.approx(int(free / 1e8) / 10)
    table = json.loads((BENCH / "frontier.json").read_text())
    for gib in (6, 8, 12, 16):
        tier = choose_tier(table, gib)
        assert tier.point == choose_for_size(table, file_budget_gb(gib)).point
        assert tier.file_gb <= tier.target_file_gb
        assert tier.needs_gb * 1e9 <= gib * GIB
    with pytest.raises(ValueError, match="fits 2 GiB without offloading"):
        choose_tier(table, 2)


def test_committed_tiers_are_the_choice_of_the_committed_frontier() -> None:
    """docs/bench/vram_tiers.json (which the workflows are made from) is what the chooser makes of
    docs/bench/frontier.json (written by python -m bench frontier)."""
    table = json.loads((BENCH / "frontier.json").read_text())
    tiers = json.loads((BENCH / "vram_tiers.json").read_text())["tiers"]
    assert [c.to_dict() for c in choose_tiers(table)] == tiers
