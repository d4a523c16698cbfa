"""Working with every weight dtype ComfyUI loads, fp8 included.

torch implements few kernels for float8 (no ``masked_fill``, ``masked_scatter``, ``scatter``,
``gather`` or ``isfinite`` on the CPU). Pruning only moves values and writes zeros, and zero is the
all-zero byte in every float8 format, so those operations run on the weight's bytes instead.
"""

from __future__ import annotations

import torch

from .blocks import row_blocks

__all__ = ["cast_saturating", "first_non_finite", "storage_view", "to_float32", "zero_where_"]


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a 1-byte float dtype (fp8) a uint8 view of the same memory."""
    if t.is_floating_point() and t.element_size() == 1:
        return t.view(torch.uint8)
    return t


#: every byte of each 1-byte float dtype -> its float32 value (NaN included), torch's own conversion
_BYTE_VALUES = {
    dtype: torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
}


def to_float32(t: torch.Tensor) -> torch.Tensor:
    """``t.float()``; for fp8 a gather from the 256 values of its bytes (the same values: torch's
    CPU conversion of fp8 runs a value at a time, 7x slower on a 3072 x 12288 weight)."""
    table = _BYTE_VALUES.get(t.dtype)
    if table is None:
        return t.float()
    flat = t.reshape(-1).view(torch.uint8).to(torch.int32)
    return table.to(t.device).index_select(0, flat).reshape(t.shape)


#: float dtypes narrower in range than float32: a decode into them is clamped to their range first
_NARROW_RANGE = {
    dtype: float(torch.finfo(dtype).max) for dtype in (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)
}


def cast_saturating(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, with values beyond ``dtype``'s finite range clamped to it first (float16 and
    fp8; a no-op clamp for wider dtypes).

    A decoded low-bit value may lie up to half a step beyond the largest value it was quantised from
    (an asymmetric zero point is rounded): near float16's 65504 a plain cast makes it inf, and fp8's
    e4m3 makes it NaN. Finite values inside the range are cast exactly as ``.to`` casts them.
    """
    peak = _NARROW_RANGE.get(dtype)
    if peak is None or t.dtype == dtype:
        return t.to(dtype)
    return t.clamp(-peak, peak).to(dtype)


def zero_where_(weight: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Set ``weight`` to zero where the bool ``pruned`` is True, in place (any dtype, fp8 too)."""
    storage_view(weight).masked_fill_(pruned.to(weight.device), 0)
    return weight


def first_non_finite(t: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first NaN or inf entry of a float tensor (checked a block of rows at a time), or None."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    for span in row_blocks(flat.shape[0], flat.shape[1]):
        bad = ~torch.isfinite(flat[span].float())
        if bool(bad.any()):
            row, col = (int(x) for x in bad.nonzero()[0])
            index = (span.start + row) * flat.shape[1] + col
            return tuple(int(i) for i in torch.unravel_index(torch.tensor(index), t.shape))
    return None
