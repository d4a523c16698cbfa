"""Group quantisation, packing, storage cost and GPTQ (ditprune_core.quantize), by hand where possible."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from ditprune_core.layouts import bits_per_weight, storage_cost
from ditprune_core.obs import gptq_quantize, relative_output_error
from ditprune_core.quantize import (
    QuantizationError,
    QuantizedWeight,
    QuantSpec,
    dequantize_weight,
    fake_quantize,
    fit_groups,
    pack_codes,
    packed_nbytes,
    quantize_weight,
    round_to_grid,
    unpack_codes,
)
from ditprune_core.save import save_pruned_checkpoint

ROW = [[0.3, -1.0, 0.2, 0.9, 2.0, -0.5, 0.1, 1.0, 0.4, -0.2]]


def test_symmetric_3bit_row_by_hand() -> None:
    # groups of 4 along the row; 10 columns: the last group holds 2 values (ragged tail)
    q = quantize_weight(torch.tensor(ROW), QuantSpec(3, 4, sym=True))
    # group 0: peak -1.0 -> s = -1.0 / -4 = 0.25; x / s = 1.2, -4, 0.8, 3.6 -> 1, -4, 1, 4 (clamped
    #          to 3); code = q + 4
    # group 1: peak 2.0 -> s = -0.5; x / s = -4, 1, -0.2, -2 -> codes 0, 5, 4, 2
    # group 2: peak 0.4 -> s = fp16(-0.1) = -0.0999755859375; x / s = -4.001, 2.0005 -> codes 0, 6
    assert q.codes.tolist() == [[5, 0, 5, 7, 0, 5, 4, 2, 0, 6]]
    assert q.scales.tolist() == [0.25, -0.5, -0.0999755859375]
    assert q.zeros is None
    assert dequantize_weight(q).tolist() == [
        [0.25, -1.0, 0.25, 0.75, 2.0, -0.5, 0.0, 1.0, 0.39990234375, -0.199951171875]
    ]


def test_asymmetric_2bit_row_by_hand() -> None:
    w = torch.tensor([[0.1, 0.6, 1.2, 0.3, -0.6, 0.3, -0.15, 0.0]])
    q = quantize_weight(w, QuantSpec(2, 4, sym=False))
    # group 0: range [min(0.1, 0), 1.2] -> s = fp16(1.2 / 3) = 0.39990234375, z = 0;
    #          x / s = 0.25, 1.5004, 3.0007, 0.75 -> codes 0, 2, 3, 1
    # group 1: range [-0.6, 0.3] -> s = fp16(0.3) = 0.300048828125, z = round(0.6 / s) = 2;
    #          x / s = -1.9997, 0.9998, -0.4999, 0 -> -2, 1, 0, 0 -> codes 0, 3, 2, 2
    assert q.codes.tolist() == [[0, 2, 3, 1, 0, 3, 2, 2]]
    assert q.scales.tolist() == [0.39990234375, 0.300048828125]
    assert q.zeros is not None and q.zeros.tolist() == [0, 2]
    s0, s1 = 0.39990234375, 0.300048828125
    assert dequantize_weight(q).tolist() == [[0.0, 2 * s0, 3 * s0, s0, -2 * s1, s1, 0.0, 0.0]]


SPARSE_ROW = [[0.3, -1.0, 0.2, 0.9, 2.0, -0.5, 0.1, 1.0]]
SPARSE_KEEP = [[True, False, True, True, False, True, True, True]]


def test_sparse_row_grouped_over_kept_values_by_hand() -> None:
    w, keep = torch.tensor(SPARSE_ROW), torch.tensor(SPARSE_KEEP)
    q = quantize_weight(w, QuantSpec(3, 3, sym=True, grouping="kept"), keep=keep)
    # kept values 0.3, 0.2, 0.9 | -0.5, 0.1, 1.0 (two groups of three kept values)
    # group 0: peak 0.9 -> s = fp16(-0.225) = -0.2249755859375; x / s = -1.33, -0.89, -4.0 -> codes 3, 3, 0
    # group 1: peak 1.0 -> s = -0.25; x / s = 2, -0.4, -4 -> codes 6, 4, 0
    assert q.codes.tolist() == [3, 3, 0, 6, 4, 0]
    assert q.scales.tolist() == [-0.2249755859375, -0.25]
    s0 = 0.2249755859375
    assert dequantize_weight(q).tolist() == [[s0, 0.0, s0, 4 * s0, 0.0, -0.5, 0.0, 1.0]]


def test_sparse_row_grouped_over_columns_by_hand() -> None:
    w, keep = torch.tensor(SPARSE_ROW), torch.tensor(SPARSE_KEEP)
    q = quantize_weight(w, QuantSpec(3, 3, sym=True, grouping="columns"), keep=keep)
    # windows [0, 3): 0.3, 0.2 | [3, 6): 0.9, -0.5 | [6, 8): 0.1, 1.0
    # window 0: peak 0.3 -> s = fp16(-0.075) = -0.07501220703125; x / s = -4.0, -2.67 -> codes 0, 1
    # window 1: peak 0.9 -> s = -0.2249755859375; x / s = -4.0, 2.22 -> codes 0, 6
    # window 2: peak 1.0 -> s = -0.25; x / s = -0.4, -4 -> codes 4, 0
    assert q.codes.tolist() == [0, 1, 0, 6, 4, 0]
    assert q.scales.tolist() == [-0.07501220703125, -0.2249755859375, -0.25]
    s0, s1 = 0.07501220703125, 0.2249755859375
    assert dequantize_weight(q).tolist() == [[4 * s0, 0.0, 3 * s0, 4 * s1, 0.0, -2 * s1, 0.0, 1.0]]


def test_column_helpers_agree_with_the_row_quantiser() -> None:
    # what a column-wise quantiser (GPTQ, joint OBS) does one column at a time, the row quantiser does
    # at once: same scales, zero points, codes and values
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 16, generator=gen)
    spec = QuantSpec(3, 8, sym=False)
    q = quantize_weight(w, spec)
    scale, zero = fit_groups(w[:, 8:], spec)  # the second group of every row
    assert torch.equal(scale, q.scales.reshape(6, 2)[:, 1])
    assert q.zeros is not None and torch.equal(zero.to(torch.uint8), q.zeros.reshape(6, 2)[:, 1])
    codes, values = round_to_grid(w[:, 11:12], scale, zero, spec)
    assert torch.equal(codes[:, 0], q.codes[:, 11])
    assert torch.equal(values[:, 0], dequantize_weight(q)[:, 11])


def test_an_empty_window_gets_scale_zero_and_decodes_to_zeros() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    keep = torch.tensor([[False, False, True, True]])
    q = quantize_weight(w, QuantSpec(4, 2, sym=False, grouping="columns"), keep=keep)
    assert q.scales[0].item() == 0.0
    out = dequantize_weight(q)
    assert out[0, :2].tolist() == [0.0, 0.0]
    assert (out[0, 2:] - w[0, 2:]).abs().max() < 0.2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("grouping", ["kept", "columns"])
def test_values_lie_on_their_grid_and_error_shrinks_with_bits(bits: int, sym: bool, grouping: str) -> None:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 40, generator=gen)
    keep = torch.rand(16, 40, generator=gen) > 0.4
    spec = QuantSpec(bits, 16, sym=sym, grouping=grouping)
    out = fake_quantize(w, spec, keep=keep)
    assert bool((out[~keep] == 0).all())
    # every value is within half a step of its group (asymmetric: within one step at the clipped ends)
    err = (out - w * keep).abs()[keep]
    peak = w.abs().max()
    step = 2 * peak / spec.max_code
    assert float(err.max()) <= float(step)
    if bits > 2:
        coarser = fake_quantize(w, QuantSpec(bits - 1 if bits != 8 else 4, 16, sym, grouping), keep=keep)
        assert float((coarser - w * keep).pow(2).sum()) > float((out - w * keep).pow(2).sum())


def test_dequantize_is_bit_exact_through_packing() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(12, 50, generator=gen).to(torch.bfloat16)
    keep = torch.rand(12, 50, generator=gen) > 0.5
    q = quantize_weight(w, QuantSpec(3, 8, sym=False), keep=keep)
    assert q.zeros is not None
    codes = unpack_codes(pack_codes(q.codes, 3), 3, q.codes.numel())
    zeros = unpack_codes(pack_codes(q.zeros, 3), 3, q.zeros.numel())
    again = dataclasses.replace(q, codes=codes, zeros=zeros)
    assert torch.equal(dequantize_weight(again, torch.bfloat16), fake_quantize(w, q.spec, keep=keep))


def test_pack_3bit_by_hand() -> None:
    # codes 1..7, 0 -> bit stream (little-endian, 3 bits each): 001 010 011 100 101 110 111 000
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(c << (3 * k) for k, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack_codes(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack_codes(codes, 3).tolist() == [0xD1, 0x58, 0x1F]


def test_pack_4bit_and_2bit_by_hand() -> None:
    assert pack_codes(torch.tensor([1, 15, 7], dtype=torch.uint8), 4).tolist() == [0xF1, 0x07]
    assert pack_codes(torch.tensor([3, 0, 1, 2, 1], dtype=torch.uint8), 2).tolist() == [0b10010011, 0b01]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(bits: int, count: int) -> None:
    gen = torch.Generator().manual_seed(count)
    codes = torch.randint(0, 1 << bits, (count,), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_nbytes(count, bits)
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_packed_sizes() -> None:
    assert [packed_nbytes(10, b) for b in (2, 3, 4, 8)] == [3, 6, 5, 10]  # 3-bit: 2 words of 8 codes
    assert packed_nbytes(8 * 1000, 3) == 3000


def test_bits_per_weight_dense_by_hand() -> None:
    # (4, 64), 3-bit, groups of 32: 256 codes = 32 words of 3 bytes (96); 8 float16 scales (16);
    # the int64 shape piece (16) and the int32 spec piece (16) -> 144 bytes = 4.5 bits per weight
    cost = storage_cost((4, 64), QuantSpec(3, 32, sym=True))
    assert (cost.value_bytes, cost.scale_bytes, cost.zero_bytes, cost.tensor_bytes) == (96, 16, 0, 32)
    assert cost.bits_per_weight == 4.5
    # asymmetric adds 8 packed 3-bit zero points: one word, 3 bytes
    assert bits_per_weight((4, 64), QuantSpec(3, 32, sym=False)) == 8 * 147 / 256
    # FLUX-sized, 4-bit groups of 64: 4 + 16 / 64 bits, plus the shape and spec pieces (32 bytes)
    assert bits_per_weight((3072, 3072), QuantSpec(4, 64)) == pytest.approx(4.25 + 256 / 3072**2, abs=1e-12)


def test_bits_per_weight_bitmask_by_hand() -> None:
    # (3072, 3072) at 50 %, 3-bit kept values in groups of 32 kept values, symmetric:
    # mask 1 bit, codes 0.5 * 3 bits, scales 0.5 * 16 / 32 bits; no row offsets (the bitmask gives
    # each row's count), the shape and spec pieces (32 bytes)
    rows = cols = 3072
    kept = torch.full((rows,), cols // 2)
    cost = storage_cost((rows, cols), QuantSpec(3, 32), layout="bitmask", kept=kept)
    assert cost.mask_bytes == rows * cols // 8
    assert cost.value_bytes == rows * cols // 2 * 3 // 8
    assert cost.scale_bytes == rows * (cols // 2 // 32) * 2
    assert cost.row_bytes == 0
    expected = 1 + 1.5 + 0.25 + 256 / (rows * cols)
    assert cost.bits_per_weight == pytest.approx(expected, abs=1e-12)
    # grouped over columns, the same group size costs twice the scales (one per window of 32)
    by_columns = storage_cost((rows, cols), QuantSpec(3, 32, grouping="columns"), layout="bitmask", kept=kept)
    assert by_columns.scale_bytes == 2 * cost.scale_bytes


def test_bits_per_weight_ragged_kept_counts() -> None:
    # rows keeping 5 and 33 values, groups of 16 kept values: 1 + 3 groups
    cost = storage_cost((2, 40), QuantSpec(4, 16, sym=False), layout="bitmask", kept=[5, 33])
    assert cost.scale_bytes == 4 * 2
    assert cost.zero_bytes == packed_nbytes(4, 4) == 2
    assert cost.value_bytes == packed_nbytes(38, 4) == 19
    assert cost.mask_bytes == 2 * 5
    assert cost.row_bytes == 0  # no row offsets with quantised values
    assert cost.total_bytes == 10 + 19 + 8 + 2 + 16 + 16  # mask, codes, scales, zeros, shape, spec


def test_bits_per_weight_two_four_by_hand() -> None:
    # (8, 64) 2:4, 4-bit values in groups of 16 kept values: 16 position groups per row, 3 per byte
    # (6 bytes); 32 codes per row (16 bytes); 2 scales per row (4 bytes); shape + spec 32 -> 240 bytes
    cost = storage_cost((8, 64), QuantSpec(4, 16), layout="2:4")
    assert (cost.mask_bytes, cost.value_bytes, cost.scale_bytes) == (48, 128, 32)
    assert cost.bits_per_weight == 8 * 240 / 512


def test_quantised_storage_matches_the_quantiser_pieces() -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(24, 72, generator=gen)
    keep = torch.rand(24, 72, generator=gen) > 0.6
    for grouping in ("kept", "columns"):
        spec = QuantSpec(3, 16, sym=False, grouping=grouping)
        q = quantize_weight(w, spec, keep=keep)
        assert q.zeros is not None
        cost = storage_cost((24, 72), spec, layout="bitmask", kept=keep)
        assert cost.value_bytes == pack_codes(q.codes, 3).numel()
        assert cost.scale_bytes == q.scales.numel() * 2
        assert cost.zero_bytes == pack_codes(q.zeros, 3).numel()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("value_dtype", [None, torch.float8_e4m3fn])
def test_unquantised_storage_cost_is_what_the_writer_stores(tmp_path, pattern: str, value_dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen).to(torch.bfloat16)
    if pattern == "2:4":
        idx = w.float().abs().reshape(48, 16, 4).topk(2, dim=2).indices
        keep = torch.zeros(48, 16, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(48, 64)
    else:
        keep = torch.rand(48, 64, generator=gen) > 0.55
    w = w * keep
    report = save_pruned_checkpoint({"w": w}, tmp_path / "c.safetensors", value_dtype=value_dtype)
    layout = "2:4" if pattern == "2:4" else "bitmask"
    assert report.layouts["w"] == layout
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    cost = storage_cost((48, 64), value_dtype or torch.bfloat16, layout=layout, kept=keep)
    assert cost.total_bytes == stored


def _correlated_gram(cols: int, samples: int, gen: torch.Generator) -> torch.Tensor:
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(samples, cols, generator=gen) @ (torch.eye(cols) + mix)
    x = x * torch.rand(cols, generator=gen).add(0.2)  # channels of unequal energy, as in DiTs
    return x.T @ x / samples


@pytest.mark.parametrize("seed", range(6))
def test_gptq_beats_round_to_nearest_on_its_gram(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(8, 48, (1,), generator=gen))
    cols = int(torch.randint(24, 130, (1,), generator=gen))
    gram = _correlated_gram(cols, 4 * cols, gen)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    for bits, group, sym in ((2, 32, False), (3, 16, True), (4, 32, True), (3, 64, False)):
        q = gptq_quantize(w, gram, bits, group, sym, block_size=32)
        q.validate()
        gptq = relative_output_error(dequantize_weight(q), w, gram)
        rtn = relative_output_error(fake_quantize(w, QuantSpec(bits, group, sym)), w, gram)
        assert gptq < rtn, (rows, cols, bits, group, sym, gptq, rtn)


def test_gptq_on_uncorrelated_inputs_is_round_to_nearest() -> None:
    # with H = I, no column's error can be compensated on another: GPTQ rounds to nearest
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(10, 48, generator=gen)
    q = gptq_quantize(w, torch.eye(48), 3, 16, False)
    rtn = quantize_weight(w, QuantSpec(3, 16, sym=False))
    assert torch.equal(q.codes, rtn.codes)
    assert torch.equal(q.scales, rtn.scales)


def test_gptq_zeroes_inputs_that_never_fire() -> None:
    gen = torch.Generator().manual_seed(2)
    gram = _correlated_gram(32, 128, gen)
    gram[5, :] = 0
    gram[:, 5] = 0
    out = dequantize_weight(gptq_quantize(torch.randn(6, 32, generator=gen), gram, 4, 16, True))
    assert bool((out[:, 5] == 0).all())


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 5, 6, 16, True])
def test_unsupported_bits_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantSpec(bits)


def test_bad_group_size_and_grouping_are_refused() -> None:
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        QuantSpec(4, 0)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        QuantSpec(4, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown grouping"):
        QuantSpec(4, 32, grouping="rows")


def test_bad_weights_and_masks_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D floating-point weight"):
        quantize_weight(torch.ones(8), QuantSpec(4))
    with pytest.raises(ValueError, match="does not fit the weight's shape"):
        quantize_weight(torch.ones(2, 8), QuantSpec(4), keep=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]), QuantSpec(4), where="blocks.0.qkv")
    with pytest.raises(QuantizationError, match="float16 range"):
        quantize_weight(torch.tensor([[1e9, 1.0]]), QuantSpec(8))


def _valid() -> QuantizedWeight:
    gen = torch.Generator().manual_seed(0)
    return quantize_weight(torch.randn(4, 10, generator=gen), QuantSpec(3, 4, sym=False))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"codes": torch.zeros(4, 9, dtype=torch.uint8)}, "codes of shape"),
        ({"codes": torch.full((4, 10), 8, dtype=torch.uint8)}, "above the 3-bit maximum"),
        ({"scales": torch.ones(11, dtype=torch.float16)}, "scales of shape"),
        ({"scales": torch.ones(12, dtype=torch.float32)}, "scales of shape"),
        ({"scales": torch.full((12,), float("inf"), dtype=torch.float16)}, "inf or NaN"),
        ({"zeros": None}, "need uint8 zero points"),
        ({"zeros": torch.zeros(13, dtype=torch.uint8)}, "need uint8 zero points"),
        ({"zeros": torch.full((12,), 9, dtype=torch.uint8)}, "zero point is 9"),
        ({"keep": torch.ones(4, 10, dtype=torch.bool)}, "codes of shape"),
        ({"keep": torch.ones(4, 11, dtype=torch.bool)}, "keep mask of shape"),
    ],
)
def test_pieces_that_disagree_with_the_shape_are_refused(change: dict, message: str) -> None:
    bad = dataclasses.replace(_valid(), **change)
    with pytest.raises(QuantizationError, match=message):
        dequantize_weight(bad, where="double_blocks.0.img_mlp.0.weight")
    with pytest.raises(QuantizationError, match=r"double_blocks\.0\.img_mlp\.0\.weight"):
        bad.validate("double_blocks.0.img_mlp.0.weight")


def test_symmetric_codes_with_zero_points_are_refused() -> None:
    q = quantize_weight(torch.ones(2, 8), QuantSpec(4, 4))
    with pytest.raises(QuantizationError, match="store no zero points"):
        dataclasses.replace(q, zeros=torch.zeros(4, dtype=torch.uint8)).validate()


def test_bad_packed_streams_are_refused() -> None:
    with pytest.raises(QuantizationError, match="do not hold 10 3-bit codes"):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 3, 10)
    with pytest.raises(QuantizationError, match="do not hold"):
        unpack_codes(torch.zeros(6, dtype=torch.int8), 3, 10)
    stream = pack_codes(torch.ones(10, dtype=torch.uint8), 3)
    stream[-1] |= 0x80  # a bit of the padding code after the 10th
    with pytest.raises(QuantizationError, match="padding bits"):
        unpack_codes(stream, 3, 10)
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_codes(torch.tensor([1], dtype=torch.uint8), 5)


def test_bad_storage_questions_are_refused() -> None:
    with pytest.raises(ValueError, match="needs `kept`"):
        storage_cost((4, 8), QuantSpec(4), layout="bitmask")
    with pytest.raises(ValueError, match="divisible by 4"):
        storage_cost((4, 10), QuantSpec(4), layout="2:4")
    with pytest.raises(ValueError, match="unknown layout"):
        storage_cost((4, 8), QuantSpec(4), layout="csr")
    with pytest.raises(ValueError, match="kept counts must be 4 integers"):
        storage_cost((4, 8), QuantSpec(4), layout="bitmask", kept=[1, 2, 9, 0])


def test_gptq_refuses_a_gram_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"linear1: Gram matrix of shape \(8, 8\) does not fit .* 10 inputs"):
        gptq_quantize(torch.ones(3, 10), torch.eye(8), 4, 8, True, where="single_blocks.0.linear1")


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made while ``fn`` runs, by torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("grouping", ["kept", "columns"])
@pytest.mark.parametrize("masked", [False, True])
def test_a_group_size_beyond_the_row_costs_what_the_row_costs(grouping: str, masked: bool) -> None:
    """Groups never span rows: a group size of 2^20 (or 2^31 - 1) gives exactly the pieces of a group
    as long as the row, and allocates by the weight's size, not groups x group size (it used to
    build a 64 x 2^20 grid, 4.6 GB for 2^24)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=gen)
    keep = (torch.rand(64, 64, generator=gen) > 0.5) if masked else None
    row = quantize_weight(w, QuantSpec(4, 64, sym=False, grouping=grouping), keep=keep)
    for huge in (1 << 20, (1 << 31) - 1):
        spec = QuantSpec(4, huge, sym=False, grouping=grouping)
        q = quantize_weight(w, spec, keep=keep)
        assert torch.equal(q.codes, row.codes) and torch.equal(q.scales, row.scales)
        assert torch.equal(dequantize_weight(q), dequantize_weight(row))
    spec = QuantSpec(4, 1 << 20, sym=False, grouping=grouping)
    q = quantize_weight(w, spec, keep=keep)
    bound = 64 * 64 * 8 * 4  # a few float64-sized copies of the weight, far below 64 x 2^20
    assert _largest_allocation(lambda: quantize_weight(w, spec, keep=keep)) <= bound
    assert _largest_allocation(lambda: dequantize_weight(q)) <= bound


def test_a_decode_into_float16_is_clamped_to_its_range_not_inf() -> None:
    """An asymmetric group's rounded zero point can decode its largest value half a step above the
    weight's own largest: near float16's 65504 a plain cast made it inf."""
    top = float(torch.finfo(torch.float16).max)
    w = torch.tensor([[-0.001 * top, top, 0.5 * top, 0.0]])
    q = quantize_weight(w, QuantSpec(8, 4, sym=False))
    wide = dequantize_weight(q)
    assert float(wide[0, 1]) > 65520  # the float32 decode overshoots past float16's rounding limit
    assert torch.isinf(wide.to(torch.float16)).any()  # which a plain cast makes inf
    narrow = dequantize_weight(q, torch.float16)
    assert bool(torch.isfinite(narrow).all()) and float(narrow[0, 1]) == top
    assert torch.equal(narrow[0, [0, 2, 3]], wide.to(torch.float16)[0, [0, 2, 3]])  # the rest as cast


def test_mse_clip_by_hand() -> None:
    # symmetric 2 bits, one group [4, 1, 1, 1]. The range (peak 4, s = -2) decodes 4, 0, 0, 0:
    # squared error 3. Shrunk by 0.775 (peak 3.1, s = fp16(-1.55)): 4 clamps to code 0 -> 3.1 and
    # 1 / -1.55 = -0.65 -> code 1 -> 1.55: error 0.9^2 + 3 * 0.55^2 = 1.7175, the least of the
    # shrinks (0.75: 1.75, 0.8: 1.72, 0.825: 1.7575, 0.7: 1.92)
    w = torch.tensor([[4.0, 1.0, 1.0, 1.0]])
    ranged = quantize_weight(w, QuantSpec(2, 4, sym=True))
    assert dequantize_weight(ranged).tolist() == [[4.0, 0.0, 0.0, 0.0]]
    q = quantize_weight(w, QuantSpec(2, 4, sym=True, clip="mse"))
    s = float(torch.tensor(-1.55, dtype=torch.float16))
    assert q.scales.tolist() == [s]
    assert q.codes.tolist() == [[0, 1, 1, 1]]
    assert dequantize_weight(q).tolist() == [[-2 * s, -s, -s, -s]]
    assert float((dequantize_weight(q) - w).square().sum()) == pytest.approx(1.7175, abs=2e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_mse_clip_is_never_worse_than_the_range_in_any_group(bits: int, sym: bool, masked: bool) -> None:
    gen = torch.Generator().manual_seed(10 * bits + sym)
    w = torch.randn(12, 50, generator=gen) * torch.rand(12, 1, generator=gen)
    w[:, 7] *= 8  # an outlier column: where a clipped range pays
    keep = torch.rand(12, 50, generator=gen) > 0.5 if masked else None
    base = QuantSpec(bits, 16, sym=sym)
    clipped = dataclasses.replace(base, clip="mse")
    assert clipped == base  # an encoder choice: the format (and so the spec's identity) is the same
    wk = w if keep is None else w * keep
    err_range = (fake_quantize(w, base, keep=keep) - wk).square()
    err_mse = (fake_quantize(w, clipped, keep=keep) - wk).square()
    # per group of 16 columns of a dense row (kept values are grouped differently: compare rows)
    per = (lambda e: e.reshape(12, -1).sum(dim=1)) if masked else (lambda e: e[:, :48].reshape(-1, 16).sum(1))
    assert bool((per(err_mse) <= per(err_range) * (1 + 1e-6) + 1e-12).all())
    if bits <= 3:
        assert float(err_mse.sum()) < float(err_range.sum())


def test_mse_clip_changes_the_grid_not_the_decode() -> None:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=gen)
    q = quantize_weight(w, QuantSpec(3, 32, sym=True, clip="mse"))
    q.validate()
    assert torch.equal(dequantize_weight(q), fake_quantize(w, QuantSpec(3, 32, sym=True, clip="mse")))
    assert not torch.equal(dequantize_weight(q), fake_quantize(w, QuantSpec(3, 32, sym=True)))


def test_an_unknown_clip_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown clip 'max'"):
        QuantSpec(3, 32, clip="max")


def test_mse_clip_weighs_each_value_by_its_price() -> None:
    # the group of test_mse_clip_by_hand: with equal weights the search shrinks the range (0.775);
    # when an error on the 4 costs 100 times more (a column OBS prices high), the full range stays
    spec = QuantSpec(2, 4, sym=True, clip="mse")
    group = torch.tensor([[4.0, 1.0, 1.0, 1.0]])
    even, _ = fit_groups(group, spec, weights=torch.ones(1, 4))
    dear, _ = fit_groups(group, spec, weights=torch.tensor([[100.0, 1.0, 1.0, 1.0]]))
    assert even.tolist() == [float(torch.tensor(-1.55, dtype=torch.float16))]
    assert dear.tolist() == [-2.0]
    # the range rule ignores the weights
    ranged, _ = fit_groups(group, QuantSpec(2, 4, sym=True), weights=torch.ones(1, 4))
    assert ranged.tolist() == [-2.0]
