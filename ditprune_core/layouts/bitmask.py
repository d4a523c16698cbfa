"""The bitmask layout (compressed-tensors' sparse bitmask): ``bitmask`` (uint8,
(rows, ceil(cols / 8)), little-endian bits along the input dimension) marks the stored values, which
are in row-major order; with unquantised values also ``compressed`` (the values, 1-D) and
``row_offsets`` (int64, where each row starts in ``compressed``). With quantised values no row
offsets are stored: each row's count is read off the bitmask (8 bytes a row less)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import CheckpointError
from ..util.dtypes import storage_view
from ..util.packing import pack_bits, unpack_bits
from ..util.selection import count_true
from .base import Layout
from .values import PieceSpec

__all__ = ["BitmaskLayout"]


class BitmaskLayout(Layout):
    """compressed-tensors' sparse bitmask: values, a bit per weight, and row offsets."""

    name = "bitmask"
    values_piece = "compressed"
    own_pieces = ("compressed", "bitmask", "row_offsets")
    mask_pieces = ("bitmask",)

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.dim() == 2

    def fits_keep(self, keep: torch.Tensor | None, shape: tuple[int, int]) -> bool:
        return keep is not None

    def per_row(self, cols: int) -> int | None:
        return None

    def stored_count(self, weight: torch.Tensor) -> int:
        return int(count_true((storage_view(weight) != 0).reshape(1, -1)))

    def own_specs(
        self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype
    ) -> dict[str, PieceSpec]:
        return {
            "compressed": ((n_values,), value_dtype),
            "bitmask": ((rows, -(-cols // 8)), torch.uint8),
            "row_offsets": ((rows,), torch.int64),
        }

    def mask_specs(self, rows: int, cols: int) -> dict[str, PieceSpec]:
        return {"bitmask": ((rows, -(-cols // 8)), torch.uint8)}

    def encode_own(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        mask = storage_view(w) != 0
        counts = count_true(mask).squeeze(1)
        pieces = {
            "compressed": w[mask],
            "bitmask": pack_bits(mask),
            "row_offsets": torch.cumsum(counts, 0) - counts,
        }
        return pieces, torch.repeat_interleave(torch.arange(w.shape[0]), counts)

    def mask_of_keep(self, keep: torch.Tensor | None, rows: int, cols: int) -> dict[str, torch.Tensor]:
        if keep is None:
            raise CheckpointError("the bitmask layout needs a keep mask")
        return {"bitmask": pack_bits(keep)}

    def check_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        bits = pieces["bitmask"]
        if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, -(-cols // 8)):
            raise CheckpointError(
                f"{where}: bitmask does not fit its shape ({rows}, {cols}): it is {tuple(bits.shape)} "
                f"{bits.dtype}, expected ({rows}, {-(-cols // 8)}) uint8"
            )

    def check_values(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        self.check_mask(pieces, rows, cols, where)
        bits, values = pieces["bitmask"], pieces["compressed"]
        if values.dim() != 1:
            raise CheckpointError(f"{where}: its values piece must be 1-D, got {tuple(values.shape)}")
        marked = int(count_true(unpack_bits(bits, cols).reshape(1, -1)))
        if marked != values.numel():
            raise CheckpointError(
                f"{where}: bitmask marks {marked} weights but {values.numel()} values are stored "
                "(mask size does not match its tensor)"
            )

    def keep_of_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
        return unpack_bits(pieces["bitmask"], cols)

    def place(
        self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, values: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
        # ~1.6x faster than out[mask] = values on CPU; on the bytes for fp8 (zero is the zero byte)
        storage_view(out).masked_scatter_(unpack_bits(pieces["bitmask"], cols), storage_view(values))
        return out
