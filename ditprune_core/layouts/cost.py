"""Storage cost: what the layouts write, counted from their piece specs (the one source of the
bytes of a layout; the writer announces the same specs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..quantize import QuantizedWeight, QuantSpec, kept_per_row
from .registry import LAYOUTS, choose_quantized_layout
from .values import piece_nbytes

__all__ = ["StorageCost", "bits_per_weight", "quantized_storage_cost", "storage_cost"]

#: which :class:`StorageCost` field each piece's bytes count in
_PIECE_COST = {
    "bitmask": "mask_bytes",
    "nm_codes": "mask_bytes",
    "compressed": "value_bytes",
    "nm_values": "value_bytes",
    "values": "value_bytes",
    "qcodes": "value_bytes",
    "scale": "scale_bytes",
    "qscales": "scale_bytes",
    "qzeros": "zero_bytes",
    "row_offsets": "row_bytes",
    "shape": "tensor_bytes",
    "qspec": "tensor_bytes",
}
_COST_FIELDS = ("mask_bytes", "value_bytes", "scale_bytes", "zero_bytes", "row_bytes", "tensor_bytes")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class StorageCost:
    """Bytes of one weight as the compressed writer stores it (tensor data; the file's header aside).

    Attributes:
        weights: rows * cols of the original weight.
        mask_bytes: the bitmask (rows * ceil(cols / 8)) or the 2:4 position codes
            (rows * ceil(cols / 12)).
        value_bytes: the values: packed codes, or plain values (bf16, fp8, ...).
        scale_bytes: float16 group scales (or float32 per-row fp8 scales).
        zero_bytes: packed zero points (asymmetric codes).
        row_bytes: per-row data: int64 row offsets of the bitmask layout with unquantised values
            (with quantised values they are not stored: each row's count is read off the bitmask).
        tensor_bytes: the int64 ``[rows, cols]`` shape piece of a compressed layout, and with
            quantised values the int32 ``[bits, group_size, sym, grouping]`` spec piece.
    """

    weights: int
    mask_bytes: int = 0
    value_bytes: int = 0
    scale_bytes: int = 0
    zero_bytes: int = 0
    row_bytes: int = 0
    tensor_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (
            self.mask_bytes
            + self.value_bytes
            + self.scale_bytes
            + self.zero_bytes
            + self.row_bytes
            + self.tensor_bytes
        )

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per original weight."""
        return 8.0 * self.total_bytes / self.weights if self.weights else 0.0


def storage_cost(
    shape: tuple[int, int] | torch.Size,
    values: QuantSpec | torch.dtype,
    *,
    layout: str = "dense",
    kept: torch.Tensor | Sequence[int] | None = None,
) -> StorageCost:
    """Exact tensor bytes of one (rows, cols) weight in a layout: the sum of the pieces the layout
    writes (:meth:`Layout.value_piece_specs`, :meth:`Layout.quantized_piece_specs`), by kind.

    Args:
        shape: (rows, cols) of the weight.
        values: a :class:`~ditprune_core.quantize.QuantSpec` (packed codes with float16 group scales,
            packed zero points when asymmetric), or a dtype for unquantised values (an fp8 dtype
            adds a float32 scale per row, as :func:`~ditprune_core.save.save_pruned_checkpoint`
            writes).
        layout: ``"dense"`` (every weight has a value; with a dtype other than fp8: the plain
            tensor), ``"bitmask"`` (kept values compacted, a bitmask; int64 row offsets with dtype
            values) or ``"2:4"`` (2 values of every 4 inputs, a 6-pattern position code per group of
            4, three per byte).
        kept: for ``"bitmask"``, the kept values of each row, (rows,) ints, or the bool keep mask.
    Returns:
        a :class:`StorageCost`; ``.bits_per_weight`` is bytes * 8 / (rows * cols).
    """
    rows, cols = int(shape[0]), int(shape[1])
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {list(LAYOUTS)}")
    counts: torch.Tensor | None = None
    if layout == "bitmask":
        if kept is None:
            raise ValueError("the bitmask layout needs `kept` (kept values per row, or the keep mask)")
        counts = torch.as_tensor(kept)
        if counts.dtype == torch.bool:
            if tuple(counts.shape) != (rows, cols):
                raise ValueError(f"keep mask of shape {tuple(counts.shape)} does not fit ({rows}, {cols})")
            counts = kept_per_row(counts)
        counts = counts.to(torch.int64).reshape(-1)
        if counts.numel() != rows or bool((counts < 0).any()) or bool((counts > cols).any()):
            raise ValueError(f"kept counts must be {rows} integers in [0, {cols}]")
    elif layout == "2:4":
        if cols % 4:
            raise ValueError(f"the 2:4 layout needs in_features divisible by 4, got {cols}")
        counts = torch.full((rows,), cols // 2, dtype=torch.int64)
    chosen = LAYOUTS[layout]
    if isinstance(values, QuantSpec):
        specs = chosen.quantized_piece_specs((rows, cols), values, None if layout == "dense" else counts)
    elif layout == "dense" and values not in _FP8_DTYPES:  # unquantised and unmasked: the plain tensor
        specs = {"values": ((rows, cols), values)}
    else:
        n_values = rows * cols if counts is None else int(counts.sum())
        specs = chosen.value_piece_specs(rows, cols, n_values, values, scaled=values in _FP8_DTYPES)
    cost = dict.fromkeys(_COST_FIELDS, 0)
    for piece, spec in specs.items():
        cost[_PIECE_COST[piece]] += piece_nbytes(spec)
    return StorageCost(rows * cols, **cost)


def bits_per_weight(
    shape: tuple[int, int] | torch.Size,
    values: QuantSpec | torch.dtype,
    *,
    layout: str = "dense",
    kept: torch.Tensor | Sequence[int] | None = None,
) -> float:
    """Stored bits per original weight of one layer; see :func:`storage_cost`."""
    return storage_cost(shape, values, layout=layout, kept=kept).bits_per_weight


def quantized_storage_cost(q: QuantizedWeight) -> StorageCost:
    """:func:`storage_cost` of a quantised weight in the layout the writer picks for it
    (:func:`choose_quantized_layout`)."""
    layout = choose_quantized_layout(q.shape, q.spec, q.keep)
    return storage_cost(q.shape, q.spec, layout=layout.name, kept=None if layout.name == "dense" else q.keep)
