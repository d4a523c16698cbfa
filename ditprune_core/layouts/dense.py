"""The dense layout: every position has a value, no mask. Only with fp8 or quantised values (the
dense layers of a compact file: modulation, embedders, final layer; every layer of a quantise-only
file); unquantised values in ``values`` ((rows, cols))."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import CheckpointError
from .base import Layout
from .values import PieceSpec

__all__ = ["DenseLayout"]


class DenseLayout(Layout):
    """Every weight has a value, no mask: the dense layers of a compact file, with fp8 or quantised
    values (unquantised, a dense weight is stored as the plain tensor)."""

    name = "dense"
    values_piece = "values"
    own_pieces = ("values",)
    mask_pieces = ()

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.dim() == 2

    def fits_keep(self, keep: torch.Tensor | None, shape: tuple[int, int]) -> bool:
        return keep is None or bool(keep.all())

    def per_row(self, cols: int) -> int | None:
        return cols

    def own_specs(
        self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype
    ) -> dict[str, PieceSpec]:
        return {"values": ((rows, cols), value_dtype)}

    def mask_specs(self, rows: int, cols: int) -> dict[str, PieceSpec]:
        return {}

    def encode_own(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return {"values": w}, None

    def mask_of_keep(self, keep: torch.Tensor | None, rows: int, cols: int) -> dict[str, torch.Tensor]:
        return {}

    def check_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        return None

    def check_values(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        if tuple(pieces["values"].shape) != (rows, cols):
            raise CheckpointError(
                f"{where}: its values piece {tuple(pieces['values'].shape)} does not fit its shape "
                f"({rows}, {cols})"
            )

    def keep_of_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
        return None

    def place(
        self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, values: torch.Tensor
    ) -> torch.Tensor:
        return values.reshape(rows, cols)
