"""Every layout a checkpoint may use, by the name its metadata records, and the choices between
them: the writer's (:func:`choose_layout`, :func:`choose_quantized_layout`) and the reader's
(:func:`layout_of`, :func:`unpack_weight`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import CheckpointError
from ..quantize import QuantSpec
from ..util.dtypes import storage_view
from ..util.selection import count_true
from .base import Layout
from .bitmask import BitmaskLayout
from .dense import DenseLayout
from .two_four import TwoFourLayout
from .values import QUANT_PIECES, is_quantized

__all__ = [
    "LAYOUTS",
    "MASKED_LAYOUTS",
    "PIECES",
    "choose_layout",
    "choose_quantized_layout",
    "layout_of",
    "unpack_weight",
]

#: every layout a checkpoint may use, by the name its metadata records
LAYOUTS: dict[str, Layout] = {
    layout.name: layout for layout in (TwoFourLayout(), BitmaskLayout(), DenseLayout())
}
#: the layouts of pruned weights (a mask says where the values go)
MASKED_LAYOUTS: tuple[Layout, ...] = (LAYOUTS["2:4"], LAYOUTS["bitmask"])
#: every piece name any layout stores
PIECES: tuple[str, ...] = tuple(
    dict.fromkeys(
        p
        for layout in LAYOUTS.values()
        for p in (*layout.own_pieces, *layout.mask_pieces, "shape", "scale", *QUANT_PIECES)
    )
)
_MIN_NUMEL = 256


def choose_layout(weight: torch.Tensor, value_dtype: torch.dtype | None) -> Layout | None:
    """The smallest masked layout that fits ``weight``, or None when it is not pruned or would not
    shrink (with the weights' dtype or fp8 values)."""
    if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() < _MIN_NUMEL:
        return None
    if int(count_true((storage_view(weight) != 0).reshape(1, -1))) == weight.numel():
        return None
    fitting = [layout for layout in MASKED_LAYOUTS if layout.fits(weight)]
    best = min(fitting, key=lambda layout: layout.nbytes(weight, value_dtype))
    if best.nbytes(weight, value_dtype) >= weight.numel() * weight.element_size():
        return None
    return best


def choose_quantized_layout(shape: tuple[int, int], spec: QuantSpec, keep: torch.Tensor | None) -> Layout:
    """The smallest layout for a (rows, cols) weight quantised with ``spec`` and keep mask ``keep``
    (None: dense): 2:4 when every group of 4 keeps exactly 2, no mask when every weight is kept."""
    fitting = [layout for layout in LAYOUTS.values() if layout.fits_keep(keep, shape)]
    return min(fitting, key=lambda layout: layout.quantized_nbytes(shape, spec, keep))


def layout_of(pieces: Mapping[str, torch.Tensor], where: str = "weight") -> Layout:
    """The layout of a weight's ``pieces``: by its values piece, or with quantised values by its
    mask piece (none: dense).

    Raises:
        CheckpointError: no layout's values piece is present.
    """
    if is_quantized(pieces):
        for layout in MASKED_LAYOUTS:
            if all(p in pieces for p in layout.mask_pieces):
                return layout
        return LAYOUTS["dense"]
    for layout in LAYOUTS.values():
        if layout.values_piece in pieces:
            return layout
    raise CheckpointError(f"{where}: no values piece ({[lay.values_piece for lay in LAYOUTS.values()]})")


def unpack_weight(
    pieces: Mapping[str, torch.Tensor], dtype: torch.dtype, *, check: bool = True, where: str = "weight"
) -> torch.Tensor:
    """Dense weight from its compressed pieces (keys as in :data:`PIECES`), on the pieces' device.

    This is the checked reader: the checkpoint reader calls it once per tensor. The ComfyUI runtime
    decodes every forward with :func:`~ditprune_core.runtime.decode_runtime`, which equals it bit
    for bit.

    Raises:
        CheckpointError: (with ``check``) pieces that do not fit the shape, or invalid codes.
    """
    return layout_of(pieces, where).decode(pieces, dtype, check=check, where=where)
