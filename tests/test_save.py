"""Compressed checkpoints: layouts by hand, bit-exact round trips, fp8 error bound, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ditprune_core import PruneConfig, compute_masks
from ditprune_core.mask import layer_keep_mask
from ditprune_core.save import (
    CheckpointError,
    load_pruned_checkpoint,
    read_checkpoint_info,
    save_pruned_checkpoint,
)


def _pruned(
    rows: int, cols: int, sparsity: float, pattern: str = "unstructured", dtype=torch.bfloat16, seed=0
):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    keep = layer_keep_mask(
        "w", w, None, PruneConfig(sparsity, metric="magnitude", granularity="row", pattern=pattern)
    )
    return (w * keep).to(dtype)


def test_bitmask_layout_by_hand(tmp_path) -> None:
    w = torch.zeros(2, 16)
    w[0, 0], w[0, 9], w[1, 15] = 1.5, -2.0, 3.0
    w = w.repeat(8, 1)  # 16 x 16, enough to be worth compressing
    report = save_pruned_checkpoint({"blocks.0.w": w, "bias": torch.ones(3)}, tmp_path / "c.safetensors")
    assert report.layouts == {"blocks.0.w": "bitmask"}
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        assert f.get_tensor("blocks.0.w").numel() == 0  # placeholder: unknowing loaders fail loudly
        assert f.get_tensor("blocks.0.w.shape").tolist() == [16, 16]
        assert f.get_tensor("blocks.0.w.bitmask")[:2].tolist() == [[1, 2], [0, 128]]
        assert f.get_tensor("blocks.0.w.compressed")[:3].tolist() == [1.5, -2.0, 3.0]
        assert f.get_tensor("blocks.0.w.row_offsets")[:3].tolist() == [0, 2, 3]
        assert torch.equal(f.get_tensor("bias"), torch.ones(3))
    back = load_pruned_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["blocks.0.w"], w) and back["blocks.0.w"].dtype == w.dtype


def test_two_four_layout_by_hand(tmp_path) -> None:
    row = torch.tensor(
        [0.0, 5.0, 0.0, 6.0, 7.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]
    )  # groups: (1,3) (0,1) (2,3)*
    w = row.repeat(32, 1)
    report = save_pruned_checkpoint({"w": w}, tmp_path / "c.safetensors")
    assert report.layouts == {"w": "2:4"}
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        assert f.get_tensor("w.nm_values")[0].tolist() == [5.0, 6.0, 7.0, 8.0, 0.0, 9.0]
        # codes 4 = (1,3), 0 = (0,1), 2 = (0,3): one byte 4 + 6*0 + 36*2 = 76
        assert f.get_tensor("w.nm_codes")[0].tolist() == [76]
    assert torch.equal(load_pruned_checkpoint(tmp_path / "c.safetensors")["w"], w)


@pytest.mark.parametrize(
    ("sparsity", "pattern"), [(0.5, "unstructured"), (0.7, "unstructured"), (0.5, "2:4"), (0.5, "4:8")]
)
def test_round_trip_is_bit_exact(tmp_path, sparsity: float, pattern: str) -> None:
    state = {
        "a": _pruned(64, 96, sparsity, pattern),
        "b": _pruned(40, 24, sparsity, pattern, torch.float16, 1),
        "dense": torch.randn(8, 8),
        "step": torch.tensor(3),
    }
    report = save_pruned_checkpoint(state, tmp_path / "c.safetensors")
    back = load_pruned_checkpoint(tmp_path / "c.safetensors")
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert report.layouts["a"] == ("2:4" if pattern == "2:4" else "bitmask")
    assert report.ratio < 1.0


def test_fp8_values_error_is_bounded_and_reported(tmp_path) -> None:
    w = _pruned(128, 256, 0.5)
    report = save_pruned_checkpoint({"w": w}, tmp_path / "c.safetensors", value_dtype=torch.float8_e4m3fn)
    back = load_pruned_checkpoint(tmp_path / "c.safetensors")["w"]
    assert back.dtype == torch.bfloat16
    assert torch.equal(back == 0, w == 0)  # the mask is exact
    err = float((back.float() - w.float()).abs().max() / w.float().abs().max())
    assert 0 < err <= 2**-4
    assert report.max_fp8_relative_error == pytest.approx(err, rel=0.05)
    two_four = save_pruned_checkpoint(
        {"w": _pruned(64, 64, 0.5, "2:4")}, tmp_path / "d.safetensors", value_dtype=torch.float8_e4m3fn
    )
    assert two_four.layouts == {"w": "2:4"} and 0 < two_four.max_fp8_relative_error <= 2**-4


def test_sizes_match_the_arithmetic(tmp_path) -> None:
    w = _pruned(512, 1024, 0.5)
    bf16 = save_pruned_checkpoint({"w": w}, tmp_path / "a.safetensors")
    fp8 = save_pruned_checkpoint({"w": w}, tmp_path / "b.safetensors", value_dtype=torch.float8_e4m3fn)
    nm = save_pruned_checkpoint({"w": _pruned(512, 1024, 0.5, "2:4")}, tmp_path / "c.safetensors")
    assert 0.56 < bf16.ratio <= 0.57  # 1/2 values + 1/16 bitmask (+ row offsets)
    assert 0.31 < fp8.ratio <= 0.32  # 1/4 values + 1/16 bitmask (+ scales)
    assert 0.54 < nm.ratio <= 0.55  # 1/2 values + 2.67 bits per 4 weights


def test_report_gives_bits_per_weight_and_the_vram_a_load_needs(tmp_path) -> None:
    """Bits per weight over every parameter, the largest layer decoded at once (its element count
    times its dtype's size) and the VRAM figure the Save node shows: file + that layer."""
    big, small = _pruned(256, 512, 0.5), _pruned(128, 128, 0.5)
    bias = torch.zeros(256, dtype=torch.bfloat16)
    state = {"a.weight": small, "b.weight": big, "b.bias": bias}
    report = save_pruned_checkpoint(state, tmp_path / "r.safetensors", values="int4")
    params = 256 * 512 + 128 * 128 + 256
    file_bytes = (tmp_path / "r.safetensors").stat().st_size
    assert report.parameters == params and report.file_bytes == file_bytes
    assert report.bits_per_weight == pytest.approx(8 * file_bytes / params)
    assert 2.5 < report.bits_per_weight < 4  # half the values in 4 bits, a bitmask, scales, header
    assert report.largest_decoded == ("b.weight", 256 * 512 * 2)  # decoded to its bf16
    assert report.vram_bytes == file_bytes + 256 * 512 * 2
    assert report.ratio == pytest.approx(file_bytes / (2 * params)) and report.dense_dtype == torch.bfloat16
    dense = save_pruned_checkpoint(state, tmp_path / "d.safetensors", format="dense")
    assert dense.largest_decoded == ("", 0) and dense.vram_bytes == dense.file_bytes


def test_unpruned_and_small_tensors_stay_dense(tmp_path) -> None:
    report = save_pruned_checkpoint(
        {
            "full": torch.randn(64, 64),
            "tiny": torch.zeros(4, 4),
            "light": _pruned(64, 64, 0.03, dtype=torch.float32),
        },
        tmp_path / "c.safetensors",
    )
    assert report.layouts == {}


def test_dense_format_and_model_masks(tmp_path, tiny_flux) -> None:
    masks = compute_masks(tiny_flux, None, PruneConfig(0.6, metric="magnitude"))
    from ditprune_core import apply_masks_

    apply_masks_(tiny_flux, masks)
    state = tiny_flux.state_dict()
    dense = save_pruned_checkpoint(state, tmp_path / "d.safetensors", format="dense")
    assert dense.layouts == {} and read_checkpoint_info(tmp_path / "d.safetensors").format == "dense"
    compressed = save_pruned_checkpoint(state, tmp_path / "c.safetensors")
    assert set(compressed.layouts) == {f"{n}.weight" for n in masks}
    back = load_pruned_checkpoint(tmp_path / "c.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_refusals(tmp_path) -> None:
    w = _pruned(32, 64, 0.5)
    path = tmp_path / "c.safetensors"
    save_pruned_checkpoint({"w": w}, path)
    with pytest.raises(FileExistsError):
        save_pruned_checkpoint({"w": w}, path)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save_pruned_checkpoint({"w": w}, tmp_path / "x.safetensors", format="gguf")
    with pytest.raises(ValueError, match="reserved"):
        save_pruned_checkpoint({"w": w}, tmp_path / "x.safetensors", metadata={"format": "mine"})
    # truncated
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_pruned_checkpoint(cut)
    # not ours
    other = tmp_path / "other.safetensors"
    save_file({"w": w}, str(other))
    with pytest.raises(CheckpointError, match="not a ditprune checkpoint"):
        load_pruned_checkpoint(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pruned_checkpoint(tmp_path / "missing.safetensors")


def _rewrite(src, dst, *, meta=None, tensors=None, keep_checksums=False) -> None:
    """Rewrite a file with changed metadata or tensors; a crafted file drops the checksums, so that
    the checks behind them are what refuses it."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if not keep_checksums:
        metadata.pop("tensor_crc32")
    metadata.update(meta or {})
    data.update(tensors or {})
    save_file(data, str(dst), metadata=metadata)


def test_unknown_version_and_mismatched_mask(tmp_path) -> None:
    path = tmp_path / "c.safetensors"
    save_pruned_checkpoint({"w": _pruned(32, 64, 0.5)}, path)
    _rewrite(path, tmp_path / "v9.safetensors", meta={"format_version": "9"})
    with pytest.raises(CheckpointError, match="version '9'"):
        load_pruned_checkpoint(tmp_path / "v9.safetensors")
    with safe_open(str(path), framework="pt") as f:
        values = f.get_tensor("w.compressed")
    _rewrite(path, tmp_path / "short.safetensors", tensors={"w.compressed": values[:-3].clone()})
    with pytest.raises(CheckpointError, match="mask size does not match"):
        load_pruned_checkpoint(tmp_path / "short.safetensors")
    _rewrite(
        path, tmp_path / "narrow.safetensors", tensors={"w.bitmask": torch.zeros(32, 2, dtype=torch.uint8)}
    )
    with pytest.raises(CheckpointError, match="does not fit its shape"):
        load_pruned_checkpoint(tmp_path / "narrow.safetensors")
    meta = json.loads(read_checkpoint_info(path).metadata["layouts"])
    assert meta["w"]["layout"] == "bitmask"


def test_tensor_producers_are_called_lazily(tmp_path) -> None:
    w, d = _pruned(64, 64, 0.5), torch.randn(16, 16)
    calls = {"w": 0, "d": 0}

    def make(name, t):
        def produce():
            calls[name] += 1
            return t.clone()

        return produce

    report = save_pruned_checkpoint({"w": make("w", w), "d": make("d", d)}, tmp_path / "c.safetensors")
    assert report.layouts == {"w": "bitmask"} and calls == {"w": 2, "d": 2}  # layout pass + write
    back = load_pruned_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["w"], w) and torch.equal(back["d"], d)


def test_save_progress_counts_both_passes_of_every_tensor(tmp_path) -> None:
    w, d = _pruned(64, 64, 0.5), torch.randn(16, 16)
    seen: list[tuple[int, int]] = []
    save_pruned_checkpoint(
        {"w": lambda: w.clone(), "d": d},
        tmp_path / "c.safetensors",
        progress=lambda n, t: seen.append((n, t)),
    )
    # "w" is made twice (layout, then write); the tensor "d" counts both passes at once
    assert seen == [(1, 4), (3, 4), (4, 4)]


def test_reserved_metadata_and_typed_info(tmp_path) -> None:
    w = _pruned(32, 64, 0.5)
    with pytest.raises(ValueError, match=r"'checkpoint'.*reserved"):
        save_pruned_checkpoint({"w": w}, tmp_path / "x.safetensors", metadata={"checkpoint": "dense"})
    path = tmp_path / "c.safetensors"
    save_pruned_checkpoint({"w": w}, path, metadata={"mine": "1"})
    info = read_checkpoint_info(path)
    assert (info.format, info.version, info.metadata["mine"]) == ("compressed", 1, "1")
    assert info.layouts == {
        "w": {"layout": "bitmask", "dtype": "bfloat16", "values": "bfloat16", "scale": "none"}
    }


def test_every_layout_round_trips_through_its_own_object() -> None:
    from ditprune_core.layouts import LAYOUTS, Fp8Values, choose_layout, unpack_weight

    w = _pruned(16, 16, 0.5, pattern="2:4", dtype=torch.float32)
    assert choose_layout(w, None) is LAYOUTS["2:4"]
    for layout in LAYOUTS.values():
        pieces, err = layout.encode(w)
        assert err == 0.0 and set(pieces) == {"shape", *layout.own_pieces}
        specs = layout.piece_specs(w, None)
        assert {k: (tuple(v.shape), v.dtype) for k, v in pieces.items()} == specs
        assert torch.equal(layout.decode(pieces, torch.float32), w)
        assert torch.equal(unpack_weight(pieces, torch.float32), w)
        fp8, err = layout.encode(w, Fp8Values())
        assert pieces.keys() | {"scale"} == fp8.keys() and 0 < err <= 1 / 16
    with pytest.raises(CheckpointError, match=r"'shape' piece must be two non-negative"):
        layout.decode({**pieces, "shape": torch.tensor([16.0, 16.0])}, torch.float32)


def test_decoded_placeholders_give_each_compressed_weight_its_true_shape_and_dtype(tmp_path) -> None:
    """What a host's model detection reads in place of a compressed weight (no memory held)."""
    from safetensors import safe_open

    from ditprune_core.load import decoded_dtype, decoded_placeholders

    path = tmp_path / "c.safetensors"
    save_pruned_checkpoint(
        {"w": _pruned(32, 64, 0.5).to(torch.bfloat16), "v": _pruned(16, 32, 0.5).to(torch.float16)}, path
    )
    info = read_checkpoint_info(path)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    placeholders = decoded_placeholders(state, info)
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in placeholders.items()} == {
        "w": ((32, 64), torch.bfloat16, "meta"),
        "v": ((16, 32), torch.float16, "meta"),
    }
    assert decoded_dtype(info) in (torch.bfloat16, torch.float16)
