"""The runtime decode (ditprune_core.runtime): bit for bit the reader's weight on every layout and
value kind, in every block size, under torch.compile too; the gather index worked out by hand."""

from __future__ import annotations

import itertools

import pytest
import torch
from bit_equality import same_bits

from ditprune_core.layouts import LAYOUTS, Fp8Values, unpack_weight
from ditprune_core.quantize import QuantSpec, dequantize_weight, quantize_weight
from ditprune_core.runtime import (
    _BIT_RANK,
    _PRUNED,
    _TRIPLE_RANK,
    decode_runtime,
    runtime_pieces,
    runtime_plan,
)
from ditprune_core.save import CheckpointError

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _masks(rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(rows, cols, generator=gen)
    keep = torch.rand(rows, cols, generator=gen) > 0.5
    keep[rows // 2] = False  # an empty row
    keep[0] = True  # a full row
    idx = w.abs().reshape(rows, -1, 4).topk(2, dim=2).indices
    two_four = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    return w, keep, two_four


def _check_every_block_size(pieces: dict[str, torch.Tensor], dtype: torch.dtype, label: str) -> None:
    expected = unpack_weight(pieces, dtype)
    held = runtime_pieces(pieces)
    plan = runtime_plan(held)
    cols = plan.cols
    for out_dtype, block in itertools.product(OUT_DTYPES, (None, 1, 3 * cols, 0)):
        got = decode_runtime(held, plan, dtype, out_dtype=out_dtype, block_elements=block)
        assert same_bits(got, expected.to(out_dtype)), (label, out_dtype, block)


# shapes: cols not a multiple of 8 (bitmask padding bits) nor of 12 (2:4's last code byte)
SHAPES = [(17, 44), (6, 200), (3, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unquantised_values_decode_as_the_reader(shape: tuple[int, int], file_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(shape[0])
    w, keep, two_four = _masks(*shape, gen)
    for layout, mask in (("bitmask", keep), ("2:4", two_four)):
        for values in (None, Fp8Values()):
            pieces, _ = LAYOUTS[layout].encode((w * mask).to(file_dtype), values)
            _check_every_block_size(pieces, file_dtype, f"{layout} {values}")


BITS_SYM = [(8, False), (4, False), (4, True), (3, True), (3, False), (2, True)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("bits", "sym"), BITS_SYM)
def test_quantised_values_decode_as_the_reader(shape: tuple[int, int], bits: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 2 + sym)
    w, keep, two_four = _masks(*shape, gen)
    w[1, :5] = 0  # an all-zero group: scale 0
    for group, grouping in itertools.product((1, 5, 16, 128), ("kept", "columns")):
        spec = QuantSpec(bits, group, sym=sym, grouping=grouping)
        for layout, mask in (("bitmask", keep), ("2:4", two_four), ("dense", None)):
            pieces = LAYOUTS[layout].encode_quantized(quantize_weight(w, spec, keep=mask))
            for dtype in (torch.bfloat16, torch.float32):
                _check_every_block_size(pieces, dtype, f"{layout} {spec} {dtype}")


def test_a_layer_with_nothing_kept_and_an_empty_one() -> None:
    keep = torch.zeros(4, 24, dtype=torch.bool)
    q = quantize_weight(torch.randn(4, 24), QuantSpec(4, 8), keep=keep)
    _check_every_block_size(LAYOUTS["bitmask"].encode_quantized(q), torch.bfloat16, "nothing kept")
    pieces, _ = LAYOUTS["bitmask"].encode(torch.zeros(4, 24, dtype=torch.bfloat16))
    _check_every_block_size(pieces, torch.bfloat16, "all zeros")
    empty, _ = LAYOUTS["bitmask"].encode(torch.zeros(0, 24, dtype=torch.bfloat16))
    held = runtime_pieces(empty)
    assert decode_runtime(held, runtime_plan(held), torch.bfloat16).shape == (0, 24)


def test_rank_tables_by_hand() -> None:
    # byte 0b1010_0101: bits 0, 2, 5, 7 set -> ranks 0, 1, 2, 3 there
    p = _PRUNED
    assert _BIT_RANK[0b1010_0101].tolist() == [0, p, 1, p, p, 2, p, 3]
    assert _BIT_RANK[0].tolist() == [p] * 8 and _BIT_RANK[255].tolist() == list(range(8))
    # nm_codes byte c0 + 6 c1 + 36 c2 = 1 + 6 * 5 + 36 * 0: groups keep (0, 2), (2, 3), (0, 1)
    assert _TRIPLE_RANK[31].tolist() == [0, p, 1, p, p, p, 2, 3, 4, 5, p, p]
    assert _TRIPLE_RANK[216].tolist() == [p] * 12  # no valid code: nothing placed


def test_the_gather_writes_the_values_in_place_by_hand() -> None:
    # one 1x10 bf16 row: kept at 0, 3, 4, 9 -> values 1, 2, 3, 4 there and zeros elsewhere
    w = torch.tensor([[1.0, 0, 0, 2, 3, 0, 0, 0, 0, 4]], dtype=torch.bfloat16)
    pieces, _ = LAYOUTS["bitmask"].encode(w)
    held = runtime_pieces(pieces)
    assert "row_offsets" not in held and held["row_starts"].tolist() == [0, 4]
    got = decode_runtime(held, runtime_plan(held), torch.bfloat16, out_dtype=torch.float32)
    assert got.tolist() == [[1.0, 0, 0, 2, 3, 0, 0, 0, 0, 4]]
    assert not bool(torch.signbit(got).any())  # the pruned positions are +0.0


def test_runtime_pieces_cost_what_the_docstring_says() -> None:
    # 50 % int4 in groups of 128: the grid pads each row's last group (G/2 codes a row on average)
    # and row_starts costs 4 bytes a row, as the qrowpad piece it replaces did
    gen = torch.Generator().manual_seed(5)
    rows, cols, g = 32, 3072, 128  # a FLUX.1-dev row length
    w = torch.randn(rows, cols, generator=gen)
    keep = torch.rand(rows, cols, generator=gen) > 0.5
    pieces = LAYOUTS["bitmask"].encode_quantized(quantize_weight(w, QuantSpec(4, g, sym=False), keep=keep))
    held = runtime_pieces(pieces)
    counts = keep.sum(dim=1)
    padded_codes = int((((counts + g - 1) // g) * g).sum())
    assert held["qgrid"].numel() == (padded_codes + 1) // 2
    assert held["row_starts"].dtype == torch.int32 and held["row_starts"].numel() == rows + 1
    extra = sum(t.numel() * t.element_size() for t in held.values()) - sum(
        t.numel() * t.element_size() for t in pieces.values()
    )
    assert extra == held["qgrid"].numel() - pieces["qcodes"].numel() + 4 * (rows + 1)
    assert extra < 0.04 * sum(t.numel() * t.element_size() for t in pieces.values())
    # unquantised values: int32 row starts instead of the file's int64 row offsets
    plain, _ = LAYOUTS["bitmask"].encode((w * keep).to(torch.bfloat16))
    held_plain = runtime_pieces(plain)
    assert held_plain["row_starts"].numel() * 4 < plain["row_offsets"].numel() * 8


def test_a_plan_refuses_pieces_not_made_for_the_runtime() -> None:
    pieces, _ = LAYOUTS["bitmask"].encode(torch.eye(16, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.q.*runtime_pieces"):
        runtime_plan(pieces, "blocks.0.q")


def test_the_decode_compiles_without_a_graph_break_and_stays_bit_exact() -> None:
    # one small layer of each layout under inductor on the CPU, in one graph (fullgraph: any graph
    # break fails); bf16 files decoded to float32, where inductor would drop a bf16 round trip
    gen = torch.Generator().manual_seed(7)
    w, keep, two_four = _masks(24, 128, gen)
    spec = QuantSpec(4, 32, sym=False)
    layers = {
        "bitmask int4": LAYOUTS["bitmask"].encode_quantized(quantize_weight(w, spec, keep=keep)),
        "2:4 int3": LAYOUTS["2:4"].encode_quantized(quantize_weight(w, QuantSpec(3, 16), keep=two_four)),
        "dense int8": LAYOUTS["dense"].encode_quantized(quantize_weight(w, QuantSpec(8, 128, sym=False))),
        "bitmask bf16": LAYOUTS["bitmask"].encode((w * keep).to(torch.bfloat16))[0],
        "bitmask fp8": LAYOUTS["bitmask"].encode((w * keep).to(torch.bfloat16), Fp8Values())[0],
    }
    held = {k: runtime_pieces(p) for k, p in layers.items()}
    plans = {k: runtime_plan(p) for k, p in held.items()}
    device_pieces = {k: {n: t for n, t in p.items() if n not in ("shape", "qspec")} for k, p in held.items()}

    def decode_all(pieces: dict[str, dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        return [decode_runtime(pieces[k], plans[k], torch.bfloat16, out_dtype=torch.float32) for k in layers]

    torch._dynamo.reset()
    compiled = torch.compile(decode_all, backend="inductor", fullgraph=True)
    for (label, pieces), got in zip(layers.items(), compiled(device_pieces), strict=True):
        expected = unpack_weight(pieces, torch.bfloat16).float()
        assert same_bits(got, expected), label


def test_runtime_decode_matches_the_reference_on_ragged_and_empty_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    for bits, group, sym in itertools.product((2, 3, 4, 8), (1, 5, 16, 128), (True, False)):
        keep = torch.rand(33, 200, generator=gen) > 0.6
        keep[4] = False
        w = torch.randn(33, 200, generator=gen)
        q = quantize_weight(w, QuantSpec(bits, group, sym=sym), keep=keep)
        pieces = LAYOUTS["bitmask"].encode_quantized(q)
        fast = runtime_pieces(pieces)
        assert "qgrid" in fast and "qcodes" not in fast
        plan = runtime_plan(fast)
        for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn):
            expected = dequantize_weight(q, torch.float32).to(dtype)
            for block in (None, 200, 0):  # several blocks of rows (one row each), one block
                got = decode_runtime(fast, plan, dtype, block_elements=block)
                assert same_bits(got, expected), (bits, group, sym, dtype, block)
            assert same_bits(unpack_weight(pieces, dtype), expected), (bits, group, sym, dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_cpu_decode_splits_rows_among_threads_and_stays_bit_exact(threads: int) -> None:
    """With several torch threads the CPU decode hands runs of blocks to a pool of as many Python
    threads, each writing its own rows: the weight is the reader's bit for bit, whatever the split
    (a ragged last share, fewer blocks than threads, one block)."""
    import ditprune_core.runtime as runtime

    gen = torch.Generator().manual_seed(7)
    w, keep, two_four = _masks(600, 512, gen)  # the plan's finest block: 128 rows, so 5 blocks
    files = {
        "bitmask int4": LAYOUTS["bitmask"].encode_quantized(quantize_weight(w, QuantSpec(4, 16), keep=keep)),
        "bitmask bf16": LAYOUTS["bitmask"].encode((w * keep).to(torch.bfloat16))[0],
        "2:4 int3": LAYOUTS["2:4"].encode_quantized(quantize_weight(w, QuantSpec(3, 8), keep=two_four)),
        "dense int8": LAYOUTS["dense"].encode_quantized(quantize_weight(w, QuantSpec(8, 16))),
    }
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for label, pieces in files.items():
            expected = unpack_weight(pieces, torch.bfloat16)
            held = runtime_pieces(pieces)
            plan = runtime_plan(held)
            for block in (1, 3 * 128 * 512, None):  # 5 spans (3 workers: 2 + 2 + 1), 2 spans, 1
                out_dtype = torch.float32
                got = decode_runtime(held, plan, torch.bfloat16, out_dtype=out_dtype, block_elements=block)
                assert same_bits(got, expected.float()), (label, threads, block)
    finally:
        torch.set_num_threads(before)
    assert (threads in runtime._POOLS) == (threads > 1)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_the_threaded_decode_runs_in_the_callers_mode(mode: str) -> None:
    """ComfyUI samples under ``torch.inference_mode``, which is per thread: the decode's pool threads
    take the caller's mode, so they may write the inference tensor they were given (a worker outside
    inference mode may not), and the weight comes back as a plain decode would."""
    gen = torch.Generator().manual_seed(3)
    w, keep, _ = _masks(600, 512, gen)
    pieces = LAYOUTS["bitmask"].encode_quantized(quantize_weight(w, QuantSpec(4, 16), keep=keep))
    held = runtime_pieces(pieces)
    plan = runtime_plan(held)
    expected = unpack_weight(pieces, torch.bfloat16).float()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    context = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[
        mode
    ]
    try:
        with context():
            got = decode_runtime(held, plan, torch.bfloat16, out_dtype=torch.float32, block_elements=1)
            assert got.is_inference() == (mode == "inference_mode") and not got.requires_grad
    finally:
        torch.set_num_threads(before)
    assert same_bits(got, expected)
