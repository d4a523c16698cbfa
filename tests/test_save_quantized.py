"""Quantised checkpoints: codes, scales and zero points with the bitmask / 2:4 / dense layouts,
the fp8 / int8 remainder, exact storage cost, bit-exact round trips and refusals."""

from __future__ import annotations

import itertools
import json
import logging
import struct

import pytest
import torch
from bit_equality import same_bits
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ditprune_core import PruneConfig, apply_masks_, compute_masks, select_layers
from ditprune_core.layouts import (
    storage_cost,
)
from ditprune_core.quantize import (
    DEFAULT_DENSE_SPECS,
    DEFAULT_VALUE_SPECS,
    QuantizedWeight,
    QuantSpec,
    dequantize_weight,
    fake_quantize,
    quantize_weight,
)
from ditprune_core.runtime import decode_runtime, runtime_pieces, runtime_plan
from ditprune_core.save import (
    CheckpointError,
    load_pruned_checkpoint,
    read_checkpoint_info,
    save_pruned_checkpoint,
    validate_compressed_state,
)


def _keep(rows: int, cols: int, kind: str, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "dense":
        return None
    if kind == "2:4":
        idx = torch.rand(rows, cols // 4, 4, generator=gen).topk(2, dim=2).indices
        return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    keep = torch.rand(rows, cols, generator=gen) > 0.5
    keep[1] = False  # an empty row
    keep[2] = True  # a full row
    return keep


def _state_from_codes(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_weight(q, torch.float32).to(dtype)


# ------------------------------------------------------------------------------------------------
# layouts by hand


def test_bitmask_int4_layout_by_hand(tmp_path) -> None:
    # one row of 16 weights keeps 4; groups of 2 kept values, asymmetric 4-bit:
    # kept values 1.0, 3.0 | -1.5, 0.0 (a kept weight that is exactly zero)
    w = torch.zeros(16, 16)
    keep = torch.zeros(16, 16, dtype=torch.bool)
    keep[:, [0, 3, 9, 12]] = True
    w[:, [0, 3, 9, 12]] = torch.tensor([1.0, 3.0, -1.5, 0.0])
    spec = QuantSpec(4, 2, sym=False)
    q = quantize_weight(w, spec, keep=keep)
    # group 1: range [0, 3]: scale 3/15 = 0.2 (float16 0.19995...), zero 0: codes 5, 15
    # group 2: range [-1.5, 0]: scale 0.1, zero 15: codes 0, 15 (0.0 decodes to exactly 0)
    assert q.codes[:4].tolist() == [5, 15, 0, 15] and q.zeros[:2].tolist() == [0, 15]
    path = tmp_path / "c.safetensors"
    held = _state_from_codes(q, torch.bfloat16)
    assert held[0, 12] == 0  # the kept zero is zero in the model...
    report = save_pruned_checkpoint({"blocks.0.w": held}, path, quantized={"blocks.0.w": q})
    assert report.layouts == {"blocks.0.w": "bitmask"} and report.stored_codes == ["blocks.0.w"]
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("blocks.0.w").numel() == 0  # placeholder
        # ...and still kept in the file: the bitmask comes from the keep mask, not from w != 0
        assert f.get_tensor("blocks.0.w.bitmask")[0].tolist() == [1 + 8, 2 + 16]
        assert f.get_tensor("blocks.0.w.qcodes")[:2].tolist() == [5 | 15 << 4, 0 | 15 << 4]
        assert f.get_tensor("blocks.0.w.qzeros")[0].tolist() == 0 | 15 << 4
        assert f.get_tensor("blocks.0.w.qscales").dtype == torch.float16
        assert f.get_tensor("blocks.0.w.qspec").tolist() == [4, 2, 0, 0]
        assert "blocks.0.w.row_offsets" not in f.keys()  # noqa: SIM118
    info = read_checkpoint_info(path)
    assert info.version == 2
    assert info.layouts["blocks.0.w"] == {
        "layout": "bitmask",
        "dtype": "bfloat16",
        "values": "int4",
        "scale": "group",
        "group_size": "2",
        "sym": "false",
        "grouping": "kept",
    }
    assert same_bits(load_pruned_checkpoint(path)["blocks.0.w"], held)


def test_two_four_int3_layout_by_hand(tmp_path) -> None:
    row = torch.tensor([0.0, 5.0, 0.0, 6.0, 7.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0])
    keep = row != 0
    keep[8] = True  # group 3 keeps positions 0 and 3: a kept zero
    w, keep = row.repeat(32, 1), keep.repeat(32, 1)
    q = quantize_weight(w, QuantSpec(3, 6), keep=keep)  # one group of the 6 kept values a row
    report = save_pruned_checkpoint(
        {"w": _state_from_codes(q, torch.float32)}, tmp_path / "c.safetensors", quantized={"w": q}
    )
    assert report.layouts == {"w": "2:4"}
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        # codes 4 = (1,3), 0 = (0,1), 2 = (0,3): one byte 4 + 6*0 + 36*2 = 76
        assert f.get_tensor("w.nm_codes")[0].tolist() == [76]
        assert f.get_tensor("w.qcodes").numel() == 32 * 6 * 3 // 8
        assert "w.qzeros" not in f.keys()  # noqa: SIM118 (symmetric)
    assert same_bits(
        load_pruned_checkpoint(tmp_path / "c.safetensors")["w"], _state_from_codes(q, torch.float32)
    )


# ------------------------------------------------------------------------------------------------
# bit-exact round trips


@pytest.mark.parametrize("kind", ["bitmask", "2:4", "dense"])
@pytest.mark.parametrize(
    ("bits", "sym"), [(8, False), (4, False), (4, True), (3, True), (3, False), (2, True)]
)
def test_given_codes_round_trip_bit_exact_in_every_reader(tmp_path, kind: str, bits: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 2 + sym)
    state, quantized = {}, {}
    for i, ((rows, cols), group, grouping, dtype) in enumerate(
        itertools.product(
            [(24, 40), (16, 128)], (16, 7), ("kept", "columns"), (torch.bfloat16, torch.float16)
        )
    ):
        w = torch.randn(rows, cols, generator=gen)
        w[0, :group] = 0  # an all-zero group: scale 0
        q = quantize_weight(
            w, QuantSpec(bits, group, sym=sym, grouping=grouping), keep=_keep(rows, cols, kind, gen)
        )
        state[f"layer{i}.weight"], quantized[f"layer{i}"] = _state_from_codes(q, dtype), q
    state["norm.weight"], state["layer0.bias"] = torch.ones(24), torch.randn(24, generator=gen)
    path = tmp_path / "q.safetensors"
    report = save_pruned_checkpoint(state, path, quantized=quantized)
    assert set(report.layouts.values()) == {kind} and len(report.stored_codes) == len(quantized)
    back = load_pruned_checkpoint(path)
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert same_bits(back[key], tensor), key
    # compressed on device: validated without decoding, then decoded per forward from runtime pieces
    with safe_open(str(path), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    info = validate_compressed_state(raw, path)
    for key in report.layouts:
        pieces = {k.removeprefix(f"{key}."): v for k, v in raw.items() if k.startswith(f"{key}.")}
        dtype = getattr(torch, info.layouts[key]["dtype"])
        held = runtime_pieces(pieces)
        assert same_bits(decode_runtime(held, runtime_plan(held), dtype), state[key]), key
    assert report.ratio < 1.0


def test_rounding_at_save_is_the_reference_quantiser_and_is_reported(tmp_path, caplog) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=gen)
    pruned = (w * (w.abs() > 0.7)).to(torch.bfloat16)  # ~52 % zeros
    dense = torch.randn(32, 48, generator=gen).to(torch.bfloat16)
    path = tmp_path / "r.safetensors"
    with caplog.at_level(logging.WARNING, logger="ditprune"):
        report = save_pruned_checkpoint({"p": pruned, "d": dense}, path, values="int4")
    assert report.rounded_at_save == ["p"] and report.layouts == {"p": "bitmask"}
    assert "rounded to int4 codes at save time" in caplog.text and "differs from the model" in caplog.text
    back = load_pruned_checkpoint(path)
    expected = fake_quantize(pruned, DEFAULT_VALUE_SPECS[4], keep=pruned != 0)
    assert same_bits(back["p"], expected) and same_bits(back["d"], dense)
    err = float((back["p"].float() - pruned.float()).abs().max() / pruned.float().abs().max())
    assert 0 < err == pytest.approx(report.max_value_relative_error, rel=0.05)
    assert bool((back["p"][pruned == 0] == 0).all())  # pruned weights stay pruned


@pytest.mark.parametrize("remainder", ["fp8", "int8", "int4", "int3"])
def test_remainder_stores_only_dense_2d_weights_compactly(tmp_path, remainder: str) -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=gen)
    state = {
        "blocks.0.qkv.weight": (w * (w.abs() > 0.7)).to(torch.bfloat16),
        "blocks.0.mod.lin.weight": torch.randn(96, 64, generator=gen).to(torch.bfloat16),
        "blocks.0.mod.lin.bias": torch.randn(96, generator=gen).to(torch.bfloat16),
        "blocks.0.norm.scale": torch.rand(64, generator=gen).to(torch.bfloat16),
        "img_in.weight": torch.randn(64, 16, generator=gen).to(torch.bfloat16),  # 1024 values
        "tiny.weight": torch.randn(8, 8, generator=gen).to(torch.bfloat16),  # too small to bother
        "pos": torch.randn(1, 16, 64, generator=gen),  # 3-D
    }
    keep_path, path = tmp_path / "keep.safetensors", tmp_path / f"{remainder}.safetensors"
    kept = save_pruned_checkpoint(state, keep_path, values="int4")
    report = save_pruned_checkpoint(state, path, values="int4", remainder=remainder)
    assert report.remainder == ["blocks.0.mod.lin.weight", "img_in.weight"]
    assert report.layouts["img_in.weight"] == "dense" and report.file_bytes < kept.file_bytes
    back = load_pruned_checkpoint(path)
    for key in ("blocks.0.mod.lin.bias", "blocks.0.norm.scale", "tiny.weight", "pos"):
        assert same_bits(back[key], state[key]), key
    assert same_bits(back["blocks.0.qkv.weight"], load_pruned_checkpoint(keep_path)["blocks.0.qkv.weight"])
    for key in report.remainder:
        original = state[key].float()
        if remainder != "fp8":
            expected = fake_quantize(state[key], DEFAULT_DENSE_SPECS[int(remainder[3:])])
        else:
            scale = original.abs().amax(dim=1, keepdim=True) / 448
            expected = ((original / scale).to(torch.float8_e4m3fn).float() * scale).to(torch.bfloat16)
        assert same_bits(back[key], expected), key
    # asymmetric groups: at most half a step, a step being at most twice the peak over 2^bits - 1;
    # symmetric 3-bit ones: codes -4..3 steps of peak / 4, so a value of the peak's opposite sign
    # clamps at 3 steps: at most a quarter of the peak; codes are measured as they decode, in the
    # file's bf16: plus bf16's rounding (2^-9 of a value)
    bound = {"fp8": 2**-4, "int8": 1 / 255 + 2**-9, "int4": 1 / 15 + 2**-9, "int3": 1 / 4 + 2**-9}[remainder]
    assert 0 < report.max_remainder_relative_error <= bound
    worst = max(
        float((back[key].float() - state[key].float()).abs().max() / state[key].float().abs().max())
        for key in report.remainder
    )
    assert report.max_remainder_relative_error == pytest.approx(worst, rel=1e-6)  # what the file decodes to
    entry = read_checkpoint_info(path).layouts["img_in.weight"]
    assert entry["values"] == ("float8_e4m3fn" if remainder == "fp8" else remainder)
    assert entry.get("group_size") == (None if remainder == "fp8" else "128")


def test_remainder_filter_picks_the_hosts_linear_weights(tmp_path) -> None:
    state = {"emb.weight": torch.randn(64, 32), "lin.weight": torch.randn(64, 32)}
    report = save_pruned_checkpoint(
        state, tmp_path / "c.safetensors", remainder="fp8", remainder_filter={"lin.weight"}.__contains__
    )
    assert report.remainder == ["lin.weight"]


def test_plain_files_stay_version_1(tmp_path) -> None:
    w = torch.randn(32, 64)
    report = save_pruned_checkpoint({"w": w * (w.abs() > 0.7)}, tmp_path / "c.safetensors", values="fp8")
    assert report.version == 1 and read_checkpoint_info(tmp_path / "c.safetensors").version == 1


# ------------------------------------------------------------------------------------------------
# bits per weight equals the file's bytes


def _tensor_bytes(path) -> dict[str, int]:
    """Each tensor's bytes as the safetensors header's offsets give them."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__")
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


@pytest.mark.parametrize("values", ["int4", "int3"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_bits_per_weight_equals_the_files_bytes(
    tmp_path, tiny_flux: nn.Module, values: str, pattern: str
) -> None:
    config = PruneConfig(0.5, metric="magnitude", pattern=pattern)
    masks = compute_masks(tiny_flux, None, config)
    apply_masks_(tiny_flux, masks)
    state = {k: v.to(torch.bfloat16) for k, v in tiny_flux.state_dict().items()}
    path = tmp_path / "c.safetensors"
    report = save_pruned_checkpoint(state, path, values=values)
    sizes = _tensor_bytes(path)
    spec = DEFAULT_VALUE_SPECS[int(values[-1])]
    layers = select_layers(tiny_flux, config)
    assert set(report.layouts) == {f"{name}.weight" for name in layers}
    for name in layers:
        key = f"{name}.weight"
        keep = state[key] != 0
        cost = storage_cost(tuple(keep.shape), spec, layout=report.layouts[key], kept=keep)
        stored = sum(size for k, size in sizes.items() if k == key or k.startswith(f"{key}."))
        assert stored == cost.total_bytes, key
        assert report.layouts[key] == ("2:4" if pattern == "2:4" else "bitmask")
    total = sum(
        storage_cost(
            tuple(state[f"{n}.weight"].shape),
            spec,
            layout=report.layouts[f"{n}.weight"],
            kept=state[f"{n}.weight"] != 0,
        ).total_bytes
        for n in layers
    )
    assert total == sum(
        size for k, size in sizes.items() if k.rsplit(".", 1)[0] in report.layouts or k in report.layouts
    )


def test_dense_quantised_storage_cost_equals_the_files_bytes(tmp_path) -> None:
    gen = torch.Generator().manual_seed(4)
    q = quantize_weight(torch.randn(40, 200, generator=gen), QuantSpec(4, 64, sym=False))
    path = tmp_path / "d.safetensors"
    save_pruned_checkpoint({"w": _state_from_codes(q, torch.float32)}, path, quantized={"w": q})
    assert sum(_tensor_bytes(path).values()) == storage_cost((40, 200), q.spec).total_bytes


# ------------------------------------------------------------------------------------------------
# refusals at save


def test_fp8_or_quantised_remainder_or_values_of_a_dense_save_are_refused(tmp_path) -> None:
    w = torch.randn(32, 64)
    state = {"w": w * (w.abs() > 0.7)}
    target = tmp_path / "x.safetensors"
    for remainder in ("fp8", "int8", "int4"):
        with pytest.raises(ValueError, match=rf"remainder='{remainder}' needs format='compressed'"):
            save_pruned_checkpoint(state, target, format="dense", remainder=remainder)
    for values in ("int8", "int4", "int3"):
        with pytest.raises(ValueError, match=rf"{values} values need format='compressed'"):
            save_pruned_checkpoint(state, target, format="dense", values=values)
    q = quantize_weight(w, DEFAULT_VALUE_SPECS[4], keep=w.abs() > 0.7)
    with pytest.raises(ValueError, match="quantised codes need format='compressed'"):
        save_pruned_checkpoint(state, target, format="dense", quantized={"w": q})
    with pytest.raises(ValueError, match="unknown remainder 'int2'"):
        save_pruned_checkpoint(state, target, remainder="int2")
    with pytest.raises(ValueError, match="unknown values 'int5'"):
        save_pruned_checkpoint(state, target, values="int5")
    with pytest.raises(ValueError, match="use \\[3, 4, 8\\] bits, not 2"):
        save_pruned_checkpoint(state, target, values=QuantSpec(2, 64))
    with pytest.raises(ValueError, match="contradicts values='int4'"):
        save_pruned_checkpoint(state, target, values="int4", value_dtype=torch.float8_e4m3fn)
    assert not target.exists()


def test_codes_that_disagree_with_their_tensor_are_refused_at_save(tmp_path) -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(32, 64, generator=gen)
    keep = w.abs() > 0.7
    q = quantize_weight(w, DEFAULT_VALUE_SPECS[4], keep=keep)
    held = _state_from_codes(q, torch.float32)
    target = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"quantised layer 'blocks\.9' is not in the state dict"):
        save_pruned_checkpoint({"w": held}, target, quantized={"blocks.9": q})
    with pytest.raises(
        ValueError, match=r"'w': its quantised codes are for a \(32, 64\) weight but the tensor is \(64, 32\)"
    ):
        save_pruned_checkpoint({"w": held.t().contiguous()}, target, quantized={"w": q})
    with pytest.raises(
        ValueError, match=r"'w': the tensor does not hold the values its quantised codes decode to"
    ):
        save_pruned_checkpoint({"w": held + 0.01 * keep}, target, quantized={"w": q})  # a LoRA on top
    short = QuantizedWeight(q.codes[:-1], q.scales, q.zeros, q.shape, q.spec, q.keep)
    with pytest.raises(ValueError, match=r"'w': codes of shape .* do not fit"):
        save_pruned_checkpoint({"w": held}, target, quantized={"w": short})
    few = QuantizedWeight(q.codes, q.scales[:-1], q.zeros, q.shape, q.spec, q.keep)
    with pytest.raises(ValueError, match=r"'w': scales of shape .* do not fit"):
        save_pruned_checkpoint({"w": held}, target, quantized={"w": few})
    no_zeros = QuantizedWeight(q.codes, q.scales, None, q.shape, q.spec, q.keep)
    with pytest.raises(ValueError, match=r"'w': asymmetric codes need uint8 zero points"):
        save_pruned_checkpoint({"w": held}, target, quantized={"w": no_zeros})
    assert not target.exists()


# ------------------------------------------------------------------------------------------------
# refusals at load: truncated, corrupted, lying


def _saved(tmp_path, *, sym: bool = False, kind: str = "bitmask"):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(32, 64, generator=gen)
    keep = _keep(32, 64, kind, gen)
    if keep is not None and kind == "bitmask" and int(keep.sum()) % 2 == 0:
        keep[3, 0] = ~keep[3, 0]  # an odd count: the last byte of 4-bit codes has padding bits
    q = quantize_weight(w, QuantSpec(4, 16, sym=sym), keep=keep)
    path = tmp_path / "ok.safetensors"
    save_pruned_checkpoint(
        {"w": _state_from_codes(q, torch.bfloat16), "b": torch.ones(4)}, path, quantized={"w": q}
    )
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return path, meta, data


def _entry(meta: dict, **change: str) -> str:
    layouts = json.loads(meta["layouts"])
    layouts["w"].update(change)
    return json.dumps(layouts)


def _padding_bit_set(_m: dict, d: dict) -> None:
    codes = d["w.qcodes"].clone()
    codes[-1] |= 0xF0  # the high nibble of the last byte: padding after an odd number of codes
    d["w.qcodes"] = codes


LYING = [
    (
        lambda m, d: d.__setitem__("w.qcodes", d["w.qcodes"][:-2].clone()),
        r"'w': codes: packed codes of shape .* do not hold",
    ),
    (
        lambda m, d: d.__setitem__("w.qcodes", torch.cat((d["w.qcodes"], d["w.qcodes"][:4]))),
        r"packed codes of shape .* do not hold",
    ),
    (
        lambda m, d: d.__setitem__("w.qcodes", d["w.qcodes"].to(torch.int8)),
        r"packed codes of shape .* and dtype torch.int8",
    ),
    (
        lambda m, d: d.__setitem__("w.qscales", d["w.qscales"][:-1].clone()),
        r"'w': scales of shape .* do not fit",
    ),
    (
        lambda m, d: d.__setitem__("w.qscales", d["w.qscales"].float()),
        r"'w': scales of shape .* dtype torch.float32",
    ),
    (
        lambda m, d: d.__setitem__("w.qscales", torch.full_like(d["w.qscales"], float("nan"))),
        r"scales hold inf or NaN",
    ),
    (
        lambda m, d: d.__setitem__("w.qzeros", d["w.qzeros"][:-1].clone()),
        r"'w': zero points: packed codes of shape",
    ),
    (
        lambda m, d: d.__setitem__("w.qspec", torch.tensor([3, 16, 0, 0], dtype=torch.int32)),
        r"'qspec' piece says .*bits=3.* but the metadata says .*bits=4",
    ),
    (
        lambda m, d: d.__setitem__("w.qspec", torch.tensor([5, 16, 0, 0], dtype=torch.int32)),
        r"'qspec' piece is invalid",
    ),
    (
        lambda m, d: d.__setitem__("w.qspec", torch.tensor([4, 16, 0, 0])),
        r"'qspec' piece must be four int32 values",
    ),
    (lambda m, d: d.__setitem__("w.shape", torch.tensor([32, 128])), r"bitmask does not fit its shape"),
    (
        lambda m, d: d.__setitem__("w.bitmask", torch.zeros_like(d["w.bitmask"])),
        r"packed codes of shape .* do not hold 0 4-bit codes",
    ),
    (_padding_bit_set, r"padding bits after the last of"),
    (lambda m, d: d.pop("w.qzeros"), r"'w' has no 'qzeros' piece"),
    (
        lambda m, d: d.__setitem__("w.compressed", torch.zeros(3)),
        r"'w\.compressed' is not a piece of the bitmask layout",
    ),
    (
        lambda m, d: m.__setitem__("layouts", _entry(m, group_size="0")),
        r"'group_size' must be a positive integer",
    ),
    (lambda m, d: m.__setitem__("layouts", _entry(m, sym="maybe")), r"'sym' must be 'true' or 'false'"),
    (lambda m, d: m.__setitem__("layouts", _entry(m, grouping="rows")), r"unknown grouping 'rows'"),
    (
        lambda m, d: m.__setitem__("layouts", _entry(m, scale="per-row")),
        r"quantised values need scale 'group'",
    ),
    (lambda m, d: m.__setitem__("layouts", _entry(m, values="int5")), r"unknown values 'int5'"),
    (
        lambda m, d: m.__setitem__("layouts", _entry(m, group_size="8")),
        r"'qspec' piece says .*group_size=16.* but the metadata says .*group_size=8",
    ),
    (
        lambda m, d: m.__setitem__("format_version", "1"),
        r"int4 values need format version 2, the file says 1",
    ),
]


def _refused(tmp_path, meta: dict, data: dict, message: str) -> None:
    """The crafted file of ``meta`` and ``data`` is refused by the reader and by the validation of
    a loaded state, with ``message`` after the file's name."""
    meta.pop("tensor_crc32")  # a crafted file: the checks behind the checksums refuse it
    meta.pop("layouts_crc32")
    bad = tmp_path / "bad.safetensors"
    save_file(data, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{message}"):
        load_pruned_checkpoint(bad)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*{message}"):
        validate_compressed_state(data, bad)


@pytest.mark.parametrize(("change", "message"), LYING)
def test_lying_quantised_files_are_refused_naming_file_and_key(tmp_path, change, message) -> None:
    _path, meta, data = _saved(tmp_path)
    change(meta, data)
    _refused(tmp_path, meta, data, message)


def test_symmetric_codes_with_zero_points_and_2_4_masks_are_checked(tmp_path) -> None:
    _path, meta, data = _saved(tmp_path, sym=True, kind="2:4")
    meta.pop("tensor_crc32")
    bad = tmp_path / "sym.safetensors"
    save_file({**data, "w.qzeros": torch.zeros(4, dtype=torch.uint8)}, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=r"sym\.safetensors.*'w\.qzeros' is not a piece"):
        load_pruned_checkpoint(bad)
    codes = data["w.nm_codes"].clone()
    codes[0, 0] = 250
    save_file({**data, "w.nm_codes": codes}, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=r"sym\.safetensors: 'w': invalid 2:4 codes"):
        load_pruned_checkpoint(bad)


def test_dense_layout_entries_are_checked(tmp_path) -> None:
    path = tmp_path / "r.safetensors"
    save_pruned_checkpoint({"m.weight": torch.randn(64, 32)}, path, remainder="fp8")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.pop("tensor_crc32")
    meta.pop("layouts_crc32")
    layouts = json.loads(meta["layouts"])
    layouts["m.weight"]["scale"] = "none"
    bad = tmp_path / "bad.safetensors"
    save_file(data, str(bad), metadata={**meta, "layouts": json.dumps(layouts)})
    with pytest.raises(CheckpointError, match="the dense layout holds fp8 or quantised values"):
        load_pruned_checkpoint(bad)
    save_file({**data, "m.weight.values": data["m.weight.values"][:10].clone()}, str(bad), metadata=meta)
    with pytest.raises(
        CheckpointError, match=r"bad\.safetensors: 'm\.weight': its values piece \(10, 32\) does not fit"
    ):
        load_pruned_checkpoint(bad)


def test_truncated_and_flipped_quantised_files_are_refused(tmp_path) -> None:
    path, _meta, _data = _saved(tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated or corrupted"):
        load_pruned_checkpoint(cut)
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    raw[header_end + 3] ^= 0x10  # inside the first tensor's data
    flipped = tmp_path / "flip.safetensors"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"flip\.safetensors: tensor .* is corrupted"):
        load_pruned_checkpoint(flipped)


def test_version_2_files_name_the_version_to_an_old_reader(tmp_path) -> None:
    _path, meta, data = _saved(tmp_path)
    bad = tmp_path / "v3.safetensors"
    save_file(data, str(bad), metadata={**meta, "format_version": "3"})
    with pytest.raises(CheckpointError, match="version '3'; this ditprune reads version 1 or 2"):
        read_checkpoint_info(bad)


DENSE_LYING = [
    (
        lambda m, d: d.__setitem__("w.qcodes", d["w.qcodes"][:-2].clone()),
        r"'w': codes: packed codes of shape \(1022,\) .* do not hold 2048 4-bit codes",
    ),
    (
        lambda m, d: d.__setitem__("w.qscales", d["w.qscales"][:-1].clone()),
        r"'w': scales of shape \(127,\) .* do not fit: 128 groups of 16",
    ),
    (
        lambda m, d: d.__setitem__("w.qzeros", d["w.qzeros"][:-1].clone()),
        r"'w': zero points: packed codes of shape \(63,\)",
    ),
    (
        lambda m, d: d.__setitem__("w.shape", torch.tensor([32, 128])),
        r"'w': codes: packed codes of shape \(1024,\) .* do not hold 4096 4-bit codes",
    ),
    (
        lambda m, d: d.__setitem__("w.shape", torch.tensor([16, 64])),
        r"'w': codes: packed codes of shape \(1024,\) .* do not hold 1024 4-bit codes",
    ),
    # a quantise-only weight under an entry that says it has a mask
    (lambda m, d: m.__setitem__("layouts", _entry(m, layout="bitmask")), r"'w' has no 'bitmask' piece"),
    (lambda m, d: m.__setitem__("layouts", _entry(m, layout="2:4")), r"'w' has no 'nm_codes' piece"),
]


@pytest.mark.parametrize(("change", "message"), DENSE_LYING)
def test_dense_quantised_files_whose_codes_scales_or_shape_disagree_are_refused(
    tmp_path, change, message
) -> None:
    _path, meta, data = _saved(tmp_path, kind="dense")  # quantise only: codes and scales, no mask
    assert json.loads(meta["layouts"])["w"]["layout"] == "dense" and "w.bitmask" not in data
    change(meta, data)
    _refused(tmp_path, meta, data, message)
