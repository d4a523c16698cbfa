"""The 2:4 layout, when every group of 4 inputs holds at most 2 non-zeros (exactly 2 kept weights,
with quantised values): ``nm_codes`` (uint8: which 2 of the 4 positions, one of 6 patterns, three
groups per byte as ``c0 + 6 c1 + 36 c2``: 2.67 bits per group of 4); unquantised values in
``nm_values`` ((rows, cols/2), the two values of every group, in ascending position)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import CheckpointError
from ..util.dtypes import storage_view
from .base import Layout
from .values import PieceSpec

__all__ = ["MAX_TRIPLE_CODE", "PAIRS", "TwoFourLayout"]

#: the 6 patterns of 2 kept positions in a group of 4, by code
PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
_PAIR_CODE = torch.full((4, 4), -1, dtype=torch.int64)
for _code, (_a, _b) in enumerate(PAIRS):
    _PAIR_CODE[_a, _b] = _code
#: the largest valid ``nm_codes`` byte (three 6-pattern codes)
MAX_TRIPLE_CODE = 6**3 - 1
#: an ``nm_codes`` byte (three groups of 4) -> its 12 kept positions as bools, padded to 16 bytes
#: (two int64 words: a gather moves a byte's 12 bools at once)
_TRIPLE_KEEP = torch.zeros(256, 16, dtype=torch.uint8)
for _byte in range(MAX_TRIPLE_CODE + 1):
    for _group, _code in enumerate((_byte % 6, (_byte // 6) % 6, _byte // 36)):
        for _pos in PAIRS[_code]:
            _TRIPLE_KEEP[_byte, 4 * _group + _pos] = 1
_TRIPLE_KEEP_WORDS = _TRIPLE_KEEP.view(torch.int64)  # (256, 2)


def _pair_index(marked: torch.Tensor) -> torch.Tensor:
    """(rows, groups, 2) positions of two entries of every group of 4 of a bool (rows, groups, 4):
    the marked ones first, then the lowest positions."""
    priority = marked.to(torch.int64) * 8 + (3 - torch.arange(4))
    return priority.topk(2, dim=2).indices.sort(dim=2).values


def _pack_pairs(idx: torch.Tensor) -> torch.Tensor:
    """``nm_codes`` (rows, ceil(groups / 3)) uint8 of (rows, groups, 2) sorted positions."""
    codes = _PAIR_CODE[idx[..., 0], idx[..., 1]]
    pad = (-codes.shape[1]) % 3
    codes = torch.nn.functional.pad(codes, (0, pad)).reshape(codes.shape[0], -1, 3)
    return (codes[..., 0] + 6 * codes[..., 1] + 36 * codes[..., 2]).to(torch.uint8)


class TwoFourLayout(Layout):
    """2:4 packing: the two kept values of every group of 4 and a pattern code (2.67 bits a group)."""

    name = "2:4"
    values_piece = "nm_values"
    own_pieces = ("nm_values", "nm_codes")
    mask_pieces = ("nm_codes",)

    def fits(self, weight: torch.Tensor) -> bool:
        if weight.dim() != 2 or weight.shape[1] % 4:
            return False
        groups = (storage_view(weight) != 0).reshape(weight.shape[0], -1, 4)
        return bool((groups.sum(dim=2) <= 2).all())

    def fits_keep(self, keep: torch.Tensor | None, shape: tuple[int, int]) -> bool:
        rows, cols = shape
        if keep is None or cols % 4:
            return False
        return bool((keep.reshape(rows, -1, 4).sum(dim=2) == 2).all())

    def per_row(self, cols: int) -> int | None:
        return cols // 2

    def own_specs(
        self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype
    ) -> dict[str, PieceSpec]:
        return {"nm_values": ((rows, cols // 2), value_dtype), **self.mask_specs(rows, cols)}

    def mask_specs(self, rows: int, cols: int) -> dict[str, PieceSpec]:
        return {"nm_codes": ((rows, -(-(cols // 4) // 3)), torch.uint8)}

    def encode_own(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        rows, cols = w.shape
        groups = storage_view(w).reshape(rows, -1, 4)
        idx = _pair_index(groups != 0)  # nonzeros first, then the lowest positions: two per group
        values = groups.gather(2, idx).reshape(rows, cols // 2).view(w.dtype)
        return {"nm_values": values, "nm_codes": _pack_pairs(idx)}, None

    def mask_of_keep(self, keep: torch.Tensor | None, rows: int, cols: int) -> dict[str, torch.Tensor]:
        if keep is None or not self.fits_keep(keep, (rows, cols)):
            raise CheckpointError("the 2:4 layout needs exactly 2 kept weights in every group of 4")
        return {"nm_codes": _pack_pairs(_pair_index(keep.reshape(rows, -1, 4)))}

    def check_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        codes = pieces["nm_codes"]
        if cols % 4 or tuple(codes.shape) != (rows, -(-(cols // 4) // 3)) or codes.dtype != torch.uint8:
            raise CheckpointError(f"{where}: 2:4 pieces do not fit its shape ({rows}, {cols})")
        if codes.numel() and int(codes.max()) > MAX_TRIPLE_CODE:
            raise CheckpointError(f"{where}: invalid 2:4 codes (corrupted file)")

    def check_values(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        if tuple(pieces["nm_values"].shape) != (rows, cols // 2):
            raise CheckpointError(f"{where}: 2:4 pieces do not fit its shape ({rows}, {cols})")
        self.check_mask(pieces, rows, cols, where)

    def keep_of_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        codes = pieces["nm_codes"]
        words = _TRIPLE_KEEP_WORDS.to(codes.device).index_select(0, codes.reshape(-1).to(torch.int32))
        return words.view(torch.bool).reshape(rows, -1, 16)[:, :, :12].reshape(rows, -1)[:, :cols]

    def place(
        self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, values: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
        # the two kept positions of a group are stored in ascending order: row-major, as placed here
        storage_view(out).masked_scatter_(self.keep_of_mask(pieces, rows, cols), storage_view(values))
        return out
