"""Compressed layouts of one 2-D weight: one object per layout, composed with one codec per kind of
values.

A compressed checkpoint (:mod:`ditprune_core.save`) stores each compressed weight ``k`` as the
pieces of one layout, ``k.<piece>``. Where the values go (one module each):

- **bitmask** (:mod:`.bitmask`, the compressed-tensors sparse-bitmask layout): ``bitmask`` marks
  the stored values; with unquantised values also ``compressed`` and ``row_offsets``;
- **2:4** (:mod:`.two_four`), when every group of 4 inputs holds at most 2 non-zeros: ``nm_codes``
  (a 6-pattern code per group, three per byte); unquantised values in ``nm_values``;
- **dense** (:mod:`.dense`): every position has a value, no mask; only with fp8 or quantised
  values; unquantised values in ``values``.

How the values are stored (:mod:`.values`: :class:`PlainValues` in the weights' dtype,
:class:`Fp8Values` with a float32 ``scale`` per row, :class:`QuantValues` as ``qcodes``,
``qscales``, ``qzeros`` and ``qspec``, decoded by :func:`~ditprune_core.quantize.dequantize_weight`).
Every layout also stores ``shape`` (int64 [rows, cols]). A new layout is one more
:class:`Layout` subclass registered in :data:`LAYOUTS` (:mod:`.registry`); what each writes is
counted from its piece specs (:mod:`.cost`).
"""

from ..errors import CheckpointError
from .base import Layout
from .bitmask import BitmaskLayout
from .cost import StorageCost, bits_per_weight, quantized_storage_cost, storage_cost
from .dense import DenseLayout
from .registry import (
    LAYOUTS,
    MASKED_LAYOUTS,
    PIECES,
    choose_layout,
    choose_quantized_layout,
    layout_of,
    unpack_weight,
)
from .two_four import TwoFourLayout
from .values import (
    FP8_MAX,
    QUANT_PIECES,
    Fp8Values,
    PieceSpec,
    PlainValues,
    QuantValues,
    ValueCodec,
    is_quantized,
    spec_of_piece,
    spec_piece,
    value_codec_of,
)

__all__ = [
    "FP8_MAX",
    "LAYOUTS",
    "MASKED_LAYOUTS",
    "PIECES",
    "QUANT_PIECES",
    "BitmaskLayout",
    "CheckpointError",
    "DenseLayout",
    "Fp8Values",
    "Layout",
    "PieceSpec",
    "PlainValues",
    "QuantValues",
    "StorageCost",
    "TwoFourLayout",
    "ValueCodec",
    "bits_per_weight",
    "choose_layout",
    "choose_quantized_layout",
    "is_quantized",
    "layout_of",
    "quantized_storage_cost",
    "spec_of_piece",
    "spec_piece",
    "storage_cost",
    "unpack_weight",
    "value_codec_of",
]
