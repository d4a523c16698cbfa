"""The per-forward decode of a weight kept compressed on the device (the ComfyUI runtime's).

:func:`unpack_weight` (:mod:`ditprune_core.layouts`) is the reader: it decodes a file's pieces once,
checked. A runtime that keeps the pieces on the device decodes every layer on every forward, so
here the same weight is made in one pass over the output:

1. at load, :func:`runtime_pieces` re-lays the pieces where that makes the decode cheaper, and
   :func:`runtime_plan` reads what the decode needs on the host (shape, spec, where each block of
   rows starts in the values) as plain Python ints: no device sync, nothing for ``torch.compile``
   to trace;
2. every forward, :func:`decode_runtime` decodes the stored values of a block of rows (dequantised,
   rounded to the file's dtype, cast to the compute dtype: only as many values as are kept), then
   writes every output position once by a gather: a kept position reads its value, a pruned one a
   zero appended after the values. The gather index comes from the mask with no scatter: for the
   bitmask, the values before each mask byte (a popcount table and a cumulative sum over bytes)
   plus each bit's rank within its byte (a 256 x 8 table); for 2:4, six values per ``nm_codes``
   byte plus each position's slot (a 256 x 12 table).

On the CPU the rows go in blocks of about 2^20 weights, so that the temporaries stay in cache and
only the output is a fresh allocation; on other devices in blocks of 2^26 (at most two per
FLUX.1-dev layer); under ``torch.compile`` in one block, which inductor fuses. The result equals
``unpack_weight(file pieces, dtype).to(out_dtype)`` bit for bit on every layout and value kind.

What the runtime holds besides the file's pieces (bytes of a FLUX.1-dev layer at 50 %):

- bitmask with codes in groups of kept values: ``qgrid`` instead of ``qcodes`` (each row's codes
  padded to whole groups, G/2 codes a row more on average: 2.7 % of a 50 % int4 layer) and
  ``row_starts`` (int32 (rows + 1,): where each row starts in the grid; 4 bytes a row);
- bitmask with unquantised values: ``row_starts`` (int32, rows + 1) instead of the file's int64
  ``row_offsets`` (4 bytes a row fewer);
- 2:4 and dense: the file's pieces.

Codes in groups of dense columns on a mask (``grouping="columns"``, never a default) are decoded by
the reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import CheckpointError
from .layouts import is_quantized, layout_of, spec_of_piece, unpack_weight
from .layouts.two_four import MAX_TRIPLE_CODE, PAIRS
from .quantize import WORDS, dequantize_codes, pack_codes, unpack_codes, unpack_stream
from .util.dtypes import cast_saturating, storage_view, to_float32
from .util.packing import unpack_bits

__all__ = [
    "BLOCK_ELEMENTS",
    "RuntimePlan",
    "decode_runtime",
    "runtime_pieces",
    "runtime_plan",
]

#: weights per block of rows: on the CPU (temporaries in cache), elsewhere (few kernel launches)
BLOCK_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 26}
#: the plan's finest block (the decode merges whole multiples of it)
_PLAN_ELEMENTS = 1 << 16
#: the rank of a pruned position: far past any block's values, so that a clamp sends it to the zero
_PRUNED = 1 << 30


def _bit_ranks() -> torch.Tensor:
    """(256, 8) int32: for a mask byte and a bit, how many set bits lie below it; _PRUNED if unset."""
    byte = torch.arange(256)[:, None]
    bit = torch.arange(8)[None, :]
    is_set = ((byte >> bit) & 1).bool()
    below = torch.cumsum(is_set.to(torch.int32), 1, dtype=torch.int32) - is_set.to(torch.int32)
    return torch.where(is_set, below, _PRUNED).to(torch.int32)


_BIT_RANK = _bit_ranks()
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def _triple_ranks() -> torch.Tensor:
    """(256, 12) int32: for an ``nm_codes`` byte (three groups of 4) and a position, its slot among
    the byte's six values (two per group, in order); _PRUNED if not kept or the byte is invalid."""
    table = torch.full((256, 12), _PRUNED, dtype=torch.int32)
    for byte in range(MAX_TRIPLE_CODE + 1):
        for group, code in enumerate((byte % 6, (byte // 6) % 6, byte // 36)):
            for slot, pos in enumerate(PAIRS[code]):
                table[byte, 4 * group + pos] = 2 * group + slot
    return table


_TRIPLE_RANK = _triple_ranks()


@dataclass(frozen=True)
class RuntimePlan:
    """What :func:`decode_runtime` reads on the host, as Python ints (made once at load).

    Attributes:
        layout: ``"bitmask"``, ``"2:4"`` or ``"dense"``.
        rows, cols: the weight's shape.
        values: ``"plain"`` (the file's dtype), ``"fp8"`` (a float32 scale per row) or ``"quant"``.
        bits, group_size, sym: the codes' spec (quantised values).
        per_row: values in every row (2:4, dense); 0 for the bitmask.
        block_rows: rows in the plan's finest block.
        block_starts: where each finest block of rows starts in the values (the grid, for codes in
            group-grid order), then the total: ``ceil(rows / block_rows) + 1`` ints.
        reader: decode with :func:`~ditprune_core.layouts.unpack_weight` instead (codes grouped over
            dense columns on a bitmask or 2:4 mask).
    """

    layout: str
    rows: int
    cols: int
    values: str
    bits: int = 0
    group_size: int = 0
    sym: bool = True
    per_row: int = 0
    block_rows: int = 1
    block_starts: tuple[int, ...] = (0, 0)
    reader: bool = False


def _row_starts(counts: torch.Tensor) -> torch.Tensor:
    """int32 (rows + 1,) exclusive cumulative sum of per-row counts (int64 if they reach 2^31)."""
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return starts.to(torch.int32) if int(starts[-1]) < 2**31 else starts


def _group_sizes(keep: torch.Tensor, g: int, n_groups: int, padded: int) -> torch.Tensor:
    """Values in each of the ``n_groups`` groups of G kept values (row-major, a row's last group
    shorter), plus one last entry for the ``padded`` stream's tail: (n_groups + 1,) int64 summing to
    ``padded``. Computed on the device without reading anything back."""
    counts = keep.sum(dim=1)
    row_groups = (counts + g - 1) // g
    ends = torch.cumsum(row_groups, 0)
    sizes = torch.full((n_groups + 1,), g, dtype=torch.int64, device=keep.device)
    last = torch.where(row_groups > 0, ends - 1, n_groups)  # an empty row writes the tail slot
    sizes.scatter_(0, last, counts - (row_groups - 1) * g)
    sizes[n_groups] = padded - counts.sum()
    return sizes


def runtime_pieces(pieces: Mapping[str, torch.Tensor], where: str = "weight") -> dict[str, torch.Tensor]:
    """The pieces a runtime keeps on the device to decode a weight every forward, from validated
    file pieces (the file is not changed: these are made at load).

    - bitmask with codes in groups of kept values: ``qgrid`` (the codes as the (groups, G) grid,
      each row's last group padded with zero codes to G) instead of ``qcodes``, and ``row_starts``
      (each row's first grid slot, then the grid's size);
    - bitmask with unquantised values: ``row_starts`` (int32 (rows + 1,)) instead of
      ``row_offsets``;
    - otherwise the file's pieces.

    Raises:
        CheckpointError: pieces of no known layout, naming ``where``.
    """
    layout = layout_of(pieces, where)
    out = dict(pieces)
    if layout.name != "bitmask":
        return out
    cols = int(pieces["shape"][1])
    if not is_quantized(pieces):
        values = pieces["compressed"]
        offsets = torch.cat((pieces["row_offsets"], torch.tensor([values.numel()], device=values.device)))
        out.pop("row_offsets")
        out["row_starts"] = _row_starts(torch.diff(offsets))
        return out
    spec = spec_of_piece(pieces["qspec"], where)
    if spec.grouping != "kept":
        return out
    g = spec.group_width(cols)  # grids follow the row, never a (possibly crafted) larger group size
    counts = unpack_bits(pieces["bitmask"], cols).sum(dim=1)
    n_groups = pieces["qscales"].numel()
    codes = unpack_codes(pieces["qcodes"], spec.bits, int(counts.sum()), where=f"{where}: codes")
    sizes = _group_sizes(unpack_bits(pieces["bitmask"], cols), g, n_groups, codes.numel())[:n_groups]
    slots = torch.arange(g, device=codes.device)[None, :] < sizes[:, None]
    grid = torch.zeros(n_groups, g, dtype=torch.uint8, device=codes.device).masked_scatter_(slots, codes)
    row_groups = (counts + g - 1) // g
    out.pop("qcodes")
    out["qgrid"] = pack_codes(grid.reshape(-1), spec.bits)
    out["row_starts"] = _row_starts(row_groups * g)
    return out


def runtime_plan(pieces: Mapping[str, torch.Tensor], where: str = "weight") -> RuntimePlan:
    """The host-side plan of :func:`runtime_pieces`' output (reads shape, spec and row starts once).

    Raises:
        CheckpointError: pieces of no known layout, or bitmask pieces that were not made by
            :func:`runtime_pieces`, naming ``where``.
    """
    layout = layout_of(pieces, where)
    rows, cols = (int(x) for x in pieces["shape"].tolist())
    kwargs: dict[str, int | bool | str] = {}
    if is_quantized(pieces):
        spec = spec_of_piece(pieces["qspec"].cpu(), where)
        kwargs.update(values="quant", bits=spec.bits, group_size=spec.group_width(cols), sym=spec.sym)
        if layout.name != "dense" and spec.grouping != "kept":
            return RuntimePlan(layout.name, rows, cols, reader=True, **kwargs)  # type: ignore[arg-type]
    else:
        kwargs["values"] = "fp8" if "scale" in pieces else "plain"
    block_rows = max(1, _PLAN_ELEMENTS // max(cols, 1))
    if layout.name == "bitmask":
        if "row_starts" not in pieces:
            raise CheckpointError(
                f"{where}: bitmask pieces without 'row_starts': make them with runtime_pieces"
            )
        starts = pieces["row_starts"].cpu()
        block_starts = tuple(int(x) for x in starts[::block_rows].tolist())
        if (rows % block_rows) or rows == 0:
            block_starts += (int(starts[-1]),)
        per_row = 0
    else:
        per_row = cols // 2 if layout.name == "2:4" else cols
        n_blocks = -(-rows // block_rows)
        block_starts = (*(i * block_rows * per_row for i in range(n_blocks)), rows * per_row)
        if rows == 0:
            block_starts = (0, 0)
    if block_starts[-1] >= _PRUNED:
        raise CheckpointError(
            f"{where}: {block_starts[-1]} stored values, more than the runtime decode indexes "
            f"({_PRUNED}): load this file with densify at load"
        )
    return RuntimePlan(
        layout.name,
        rows,
        cols,
        per_row=per_row,
        block_rows=block_rows,
        block_starts=block_starts,
        **kwargs,  # type: ignore[arg-type]
    )


def _unpack_range(packed: torch.Tensor, bits: int, start: int, count: int) -> torch.Tensor:
    """Codes ``start .. start + count`` of a packed stream, unpacking only the words that hold them."""
    per_word, word_bytes = WORDS[bits]
    first = start // per_word
    end = -(-(start + count) // per_word)
    codes = unpack_stream(packed[first * word_bytes : end * word_bytes], bits)
    offset = start - first * per_word
    return codes[offset : offset + count]


def _rounded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` as the reader leaves them: rounded to ``dtype`` (cast only if needed; clamped to
    float16's or fp8's range first, as :func:`~ditprune_core.util.dtypes.cast_saturating` does).

    Under ``torch.compile``, float32 values bound for bfloat16 are rounded on their bits (to
    nearest, ties to even: what the cast does to finite values) and stay float32: inductor drops a
    bfloat16 round trip inside a fused kernel (unless ``emulate_precision_casts``), and the decode
    must round where the reader rounds.
    """
    if values.dtype == dtype:
        return values
    if dtype == torch.bfloat16 and values.dtype == torch.float32 and torch.compiler.is_compiling():
        bits = values.view(torch.int32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).view(torch.float32)
    return cast_saturating(values, dtype)  # float16 / fp8: clamped to their range, as the reader does


def _block_values(
    pieces: Mapping[str, torch.Tensor],
    plan: RuntimePlan,
    r0: int,
    r1: int,
    v0: int,
    v1: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The stored values of rows ``r0 .. r1`` (positions ``v0 .. v1`` of the values, or of the
    grid), decoded and rounded to ``dtype`` exactly as the reader does: 1-D, or (rows, cols) for the
    dense layout."""
    if plan.values == "plain":
        name = {"bitmask": "compressed", "2:4": "nm_values", "dense": "values"}[plan.layout]
        stored = pieces[name].reshape(-1)[v0:v1]
        return _rounded(stored, dtype)
    if plan.values == "fp8":
        name = {"bitmask": "compressed", "2:4": "nm_values", "dense": "values"}[plan.layout]
        stored = to_float32(pieces[name].reshape(-1)[v0:v1])
        scale = pieces["scale"][r0:r1]
        if plan.layout == "bitmask":
            starts = pieces["row_starts"][r0 : r1 + 1]
            counts = (starts[1:] - starts[:-1]).to(torch.int64)
            per_value = torch.repeat_interleave(scale, counts, output_size=v1 - v0)
            return _rounded(stored * per_value, dtype)
        return _rounded(stored.view(r1 - r0, plan.per_row) * scale[:, None], dtype).reshape(-1)
    bits, g = plan.bits, plan.group_size
    codes_piece = pieces["qgrid"] if "qgrid" in pieces else pieces["qcodes"]
    codes = _unpack_range(codes_piece, bits, v0, v1 - v0)
    if plan.layout == "bitmask" or plan.per_row % g == 0:  # whole groups: one scale a grid row
        g0, g1 = v0 // g, v1 // g
        scales = pieces["qscales"][g0:g1, None]
        zero: torch.Tensor | int = 1 << (bits - 1)
        if not plan.sym:
            zero = _unpack_range(pieces["qzeros"], bits, g0, g1 - g0)[:, None]
        return _rounded(
            dequantize_codes(codes.reshape(g1 - g0, g), scales, zero, torch.float32), dtype
        ).reshape(-1)
    row_groups = -(-plan.per_row // g)
    group = torch.arange(plan.per_row, device=codes.device) // g
    scales = pieces["qscales"][r0 * row_groups : r1 * row_groups].reshape(r1 - r0, row_groups)[:, group]
    zero = 1 << (bits - 1)
    if not plan.sym:
        zeros = _unpack_range(pieces["qzeros"], bits, r0 * row_groups, (r1 - r0) * row_groups)
        zero = zeros.reshape(r1 - r0, row_groups)[:, group]
    values = dequantize_codes(codes.reshape(r1 - r0, plan.per_row), scales, zero, torch.float32)
    return _rounded(values, dtype).reshape(-1)


def _gather_index(
    pieces: Mapping[str, torch.Tensor], plan: RuntimePlan, r0: int, r1: int, v0: int, v1: int
) -> torch.Tensor:
    """int32 (rows * cols,) for rows ``r0 .. r1``: each position's value in the block's values, or
    ``v1 - v0`` (the zero after them) where pruned."""
    n_rows = r1 - r0
    if plan.layout == "bitmask":
        mask = pieces["bitmask"][r0:r1]
        table = _BIT_RANK
        byte = mask.reshape(-1).to(torch.int32)
        counts = _POPCOUNT.to(mask.device).index_select(0, byte).view(n_rows, -1)
        row_first = (pieces["row_starts"][r0:r1] - v0).to(torch.int32)
        first = torch.cumsum(counts, 1, dtype=torch.int32).sub_(counts).add_(row_first[:, None])
    else:  # 2:4: six values a byte of nm_codes, cols / 2 a row
        codes = pieces["nm_codes"][r0:r1]
        table = _TRIPLE_RANK
        byte = codes.reshape(-1).to(torch.int32)
        n_bytes = codes.shape[1]
        first = (
            torch.arange(n_rows, device=codes.device, dtype=torch.int32)[:, None] * plan.per_row
            + torch.arange(n_bytes, device=codes.device, dtype=torch.int32)[None, :] * 6
        )
    index = table.to(byte.device).index_select(0, byte)  # (bytes, per_byte): rank within the byte
    first = first.reshape(-1, 1)
    if torch.compiler.is_compiling():
        index = index + first
    else:  # two int32 ranks a 64-bit add: no carry crosses, every sum is below 2^31
        pairs = index.view(torch.int64)
        pairs += first.to(torch.int64).mul_((1 << 32) + 1)
    index = index.clamp_(max=v1 - v0).view(n_rows, -1)
    if index.shape[1] != plan.cols:
        index = index[:, : plan.cols].contiguous()
    return index.view(-1)


def _decode_block(
    pieces: Mapping[str, torch.Tensor],
    plan: RuntimePlan,
    b: int,
    e: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Plan blocks ``b .. e`` decoded: written into their rows of ``out``, or (``out`` None, under
    ``torch.compile``) returned as a fresh (rows, cols) tensor."""
    rows, cols = plan.rows, plan.cols
    r0, r1 = b * plan.block_rows, min(e * plan.block_rows, rows)
    v0, v1 = plan.block_starts[b], plan.block_starts[e]
    values = _block_values(pieces, plan, r0, r1, v0, v1, dtype)
    target = None if out is None else out[r0:r1]
    if plan.layout == "dense":
        block = values.reshape(r1 - r0, cols)
        if target is None:
            return block.to(out_dtype)
        return target.copy_(block)
    padded = torch.empty(v1 - v0 + 1, dtype=out_dtype, device=values.device)
    padded[: v1 - v0].copy_(values)
    storage_view(padded)[v1 - v0 :].zero_()
    index = _gather_index(pieces, plan, r0, r1, v0, v1)
    if target is None:
        return storage_view(padded).index_select(0, index).view(r1 - r0, cols)
    torch.index_select(storage_view(padded), 0, index, out=storage_view(target).view(-1))
    return target


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads for the CPU decode (made once per size).

    Most of the decode is gathers that torch runs on one thread whatever ``torch.get_num_threads()``
    says, so the CPU decode splits a layer's blocks of rows among as many Python threads (torch
    releases the GIL inside every op): each writes its own rows of the output. Each pool thread
    runs its ops on one torch thread (``torch.set_num_threads`` is per thread under OpenMP), so
    the workers do not start a team of OpenMP threads each and oversubscribe the cores."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(
            workers, thread_name_prefix="ditprune-decode", initializer=torch.set_num_threads, initargs=(1,)
        )
    return _POOLS[workers]


def decode_runtime(
    pieces: Mapping[str, torch.Tensor],
    plan: RuntimePlan,
    dtype: torch.dtype,
    *,
    out_dtype: torch.dtype | None = None,
    block_elements: int | None = None,
) -> torch.Tensor:
    """The dense weight from its runtime pieces, every position written once.

    Args:
        pieces: :func:`runtime_pieces`' output, on the decoding device (``shape`` and ``qspec`` may
            stay on the host: only ``plan`` is read there).
        plan: :func:`runtime_plan` of the same pieces.
        dtype: the reader's dtype (the file's): every value is rounded to it, as
            :func:`~ditprune_core.layouts.unpack_weight` rounds it.
        out_dtype: the dtype returned (the compute dtype; default ``dtype``).
        block_elements: weights decoded per block of rows (default :data:`BLOCK_ELEMENTS` for the
            device; one block under ``torch.compile``).
    Returns:
        (rows, cols) tensor in ``out_dtype``, equal bit for bit to
        ``unpack_weight(file pieces, dtype).to(out_dtype)``.
    """
    out_dtype = out_dtype or dtype
    if plan.reader:
        return unpack_weight(pieces, dtype, check=False).to(out_dtype)
    device = next(t.device for k, t in pieces.items() if k not in ("shape", "qspec"))
    rows, cols = plan.rows, plan.cols
    if rows * cols == 0:
        return torch.zeros(rows, cols, dtype=out_dtype, device=device)
    compiling = torch.compiler.is_compiling()
    if block_elements is None:
        block_elements = 0 if compiling else BLOCK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    step = (
        max(1, block_elements // max(plan.block_rows * cols, 1)) if block_elements else len(plan.block_starts)
    )
    starts = plan.block_starts
    spans = [(b, min(b + step, len(starts) - 1)) for b in range(0, len(starts) - 1, step)]
    if compiling:
        blocks = [_decode_block(pieces, plan, b, e, dtype, out_dtype, None) for b, e in spans]
        whole = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        return whole.view(out_dtype) if whole.dtype != out_dtype else whole
    out = torch.empty(rows, cols, dtype=out_dtype, device=device)
    # inference and grad mode are per thread: the workers take the caller's (ComfyUI samples under
    # inference_mode, and an inference tensor may not be written outside it)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def work(part: list[tuple[int, int]]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            for b, e in part:
                _decode_block(pieces, plan, b, e, dtype, out_dtype, out)

    workers = min(torch.get_num_threads(), len(spans)) if device.type == "cpu" else 1
    if workers <= 1:
        work(spans)
        return out
    share = -(-len(spans) // workers)  # each worker a run of neighbouring blocks: disjoint rows of out
    for done in [_pool(workers).submit(work, spans[i : i + share]) for i in range(0, len(spans), share)]:
        done.result()
    return out
