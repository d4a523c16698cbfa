"""How a compressed weight's values are stored: one codec object per kind, which every layout composes.

- :class:`PlainValues`: in the weights' dtype (bit-exact), in the layout's values piece;
- :class:`Fp8Values`: float8_e4m3fn in the values piece, with a float32 ``scale`` per row
  (value = fp8 * scale, scale = row max / 448);
- :class:`QuantValues`: the group codes of :mod:`ditprune_core.quantize`: ``qcodes`` (the stored
  values' codes, packed by :func:`~ditprune_core.quantize.pack_codes`), ``qscales`` (float16, one
  per group), ``qzeros`` (asymmetric codes: the zero points, packed the same way) and ``qspec``
  (int32 ``[bits, group_size, sym, grouping]``, grouping 0 = kept, 1 = columns). A value decodes
  exactly as :func:`~ditprune_core.quantize.dequantize_weight` decodes it: that function *is* the
  decoder. The mask pieces come from the keep mask, never from the decoded values (a kept value may
  decode to 0).

A codec checks and decodes the values; the layout (:class:`~ditprune_core.layouts.base.Layout`) says
where they go. :func:`value_codec_of` tells a weight's codec from the pieces it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError
from ..quantize import (
    GROUPINGS,
    QuantizationError,
    QuantizedWeight,
    QuantSpec,
    count_groups,
    dequantize_weight,
    pack_codes,
    packed_nbytes,
    unpack_codes,
    unpack_stream,
)
from ..util.dtypes import cast_saturating, first_non_finite, to_float32
from ..util.selection import count_true

if TYPE_CHECKING:
    from .base import Layout

__all__ = [
    "FP8_MAX",
    "QUANT_PIECES",
    "Fp8Values",
    "PieceSpec",
    "PlainValues",
    "QuantValues",
    "ValueCodec",
    "is_quantized",
    "piece_nbytes",
    "spec_of_piece",
    "spec_piece",
    "value_codec_of",
]

FP8_MAX = 448.0
#: (shape, dtype) of a piece, known before it is made (so that a writer can stream it)
PieceSpec = tuple[tuple[int, ...], torch.dtype]
#: the pieces of quantised values (``qzeros`` only for asymmetric codes)
QUANT_PIECES = ("qcodes", "qscales", "qzeros", "qspec")


def piece_nbytes(spec: PieceSpec) -> int:
    """Bytes of a piece of (shape, dtype) ``spec``."""
    shape, dtype = spec
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


class ValueCodec(ABC):
    """The values of a compressed weight: which pieces hold them, how they are checked and decoded
    (the layout places them)."""

    @abstractmethod
    def required_pieces(self, layout: Layout) -> tuple[str, ...]:
        """The pieces a weight of ``layout`` with these values cannot lack, besides ``shape``."""

    @abstractmethod
    def check(
        self, layout: Layout, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str
    ) -> None:
        """Check the pieces of a (rows, cols) weight against each other; raises
        :class:`~ditprune_core.errors.CheckpointError` naming ``where``."""

    @abstractmethod
    def decode(
        self, layout: Layout, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The dense (rows, cols) weight in ``dtype``, on the pieces' device."""


@dataclass(frozen=True)
class PlainValues(ValueCodec):
    """Values in the weights' own dtype, in the layout's values piece: a bit-exact round trip."""

    def required_pieces(self, layout: Layout) -> tuple[str, ...]:
        return layout.own_pieces

    def check(
        self, layout: Layout, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str
    ) -> None:
        layout.check_values(pieces, rows, cols, where)

    def decode(
        self, layout: Layout, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype
    ) -> torch.Tensor:
        return layout.place(pieces, rows, cols, pieces[layout.values_piece].to(dtype))


@dataclass(frozen=True)
class Fp8Values(ValueCodec):
    """fp8 e4m3 values with a float32 scale per row: ``value = fp8 * scale``, scale = row max / 448."""

    dtype: torch.dtype = torch.float8_e4m3fn

    def required_pieces(self, layout: Layout) -> tuple[str, ...]:
        return (*layout.own_pieces, "scale")

    def check(
        self, layout: Layout, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str
    ) -> None:
        layout.check_values(pieces, rows, cols, where)
        scale = pieces["scale"]
        if tuple(scale.shape) != (rows,) or not bool(torch.isfinite(scale).all()):
            raise CheckpointError(f"{where}: its 'scale' piece must be {rows} finite values, one per row")

    def decode(
        self, layout: Layout, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype
    ) -> torch.Tensor:
        values, scale = pieces[layout.values_piece], pieces["scale"]
        if layout.per_row(cols) is None:
            # rows of their own lengths (bitmask): the fp8 bytes placed (1 byte a weight), then scaled
            # row by row on the dense grid, instead of spreading each row's scale over its values
            placed = layout.place(pieces, rows, cols, values)
            return cast_saturating(to_float32(placed) * scale[:, None], dtype)
        # the values piece is (rows, values per row): scaled by row, then placed
        return layout.place(pieces, rows, cols, cast_saturating(to_float32(values) * scale[:, None], dtype))

    def encode(
        self,
        values: torch.Tensor,
        value_rows: torch.Tensor | None,
        n_rows: int,
        where: str = "weight",
        decoded_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(fp8 values, scale (rows,), max error / peak)``.

        ``value_rows`` gives the row of each value of a 1-D ``values``; None: ``values`` is (rows, k).
        The error is measured on the values as they decode: in ``decoded_dtype`` (default ``values``'
        dtype), clamped to its range as the reader does.

        Raises:
            CheckpointError: a NaN or inf value (it would turn its whole row into NaN).
        """
        v = values.float()
        bad = first_non_finite(v)
        if bad is not None:
            raise CheckpointError(
                f"{where}: a kept value is {float(v[bad])}; fp8 values with per-row scales need finite "
                "weights: fix the model, or save with the values' own dtype"
            )
        if value_rows is None:
            row_max = v.abs().amax(dim=1) if v.numel() else torch.zeros(n_rows)
        else:
            row_max = torch.zeros(n_rows).scatter_reduce_(0, value_rows, v.abs(), reduce="amax")
        scale = torch.where(row_max > 0, row_max / FP8_MAX, torch.ones_like(row_max))
        per_value = scale[:, None] if value_rows is None else scale[value_rows]
        q = (v / per_value).to(self.dtype)
        peak = float(v.abs().max()) if v.numel() else 0.0
        decoded = cast_saturating(q.float() * per_value, decoded_dtype or values.dtype).float()
        error = float((decoded - v).abs().max()) / peak if peak > 0 else 0.0
        return q, scale, error


def spec_piece(spec: QuantSpec) -> torch.Tensor:
    """The ``qspec`` piece of ``spec``: int32 ``[bits, group_size, sym, grouping]``."""
    return torch.tensor(
        [spec.bits, spec.group_size, int(spec.sym), GROUPINGS.index(spec.grouping)], dtype=torch.int32
    )


def spec_of_piece(piece: torch.Tensor, where: str = "weight") -> QuantSpec:
    """The :class:`QuantSpec` a ``qspec`` piece records.

    Raises:
        CheckpointError: not four int32 values, or values no spec has (corrupted or crafted).
    """
    if piece.dtype != torch.int32 or tuple(piece.shape) != (4,):
        raise CheckpointError(
            f"{where}: its 'qspec' piece must be four int32 values [bits, group_size, sym, grouping], "
            f"got {tuple(piece.shape)} {piece.dtype}"
        )
    bits, group_size, sym, grouping = (int(x) for x in piece.tolist())
    if sym not in (0, 1) or not 0 <= grouping < len(GROUPINGS):
        raise CheckpointError(f"{where}: its 'qspec' piece {[bits, group_size, sym, grouping]} is invalid")
    try:
        return QuantSpec(bits, group_size, sym=bool(sym), grouping=GROUPINGS[grouping])
    except ValueError as exc:
        raise CheckpointError(f"{where}: its 'qspec' piece is invalid: {exc}") from exc


@dataclass(frozen=True)
class QuantValues(ValueCodec):
    """Group-quantised values (:mod:`ditprune_core.quantize`): packed codes, float16 scales, packed
    zero points (asymmetric) and the spec; composable with every layout.

    Attributes:
        spec: the spec a writer stores (:meth:`piece_specs`, :meth:`encode`); None for a reader,
            which takes each weight's spec from its ``qspec`` piece.
    """

    spec: QuantSpec | None = None

    def _spec(self) -> QuantSpec:
        if self.spec is None:
            raise ValueError("QuantValues without a spec only reads: give the spec to write with")
        return self.spec

    @property
    def name(self) -> str:
        """How the checkpoint metadata names the values: ``int4``, ``int3``, ..."""
        return f"int{self._spec().bits}"

    @property
    def pieces(self) -> tuple[str, ...]:
        zeros = () if self._spec().sym else ("qzeros",)
        return ("qcodes", "qscales", *zeros, "qspec")

    def piece_specs(self, n_values: int, n_groups: int) -> dict[str, PieceSpec]:
        """(shape, dtype) of each piece for ``n_values`` codes in ``n_groups`` groups."""
        spec = self._spec()
        specs: dict[str, PieceSpec] = {
            "qcodes": ((packed_nbytes(n_values, spec.bits),), torch.uint8),
            "qscales": ((n_groups,), torch.float16),
        }
        if not spec.sym:
            specs["qzeros"] = ((packed_nbytes(n_groups, spec.bits),), torch.uint8)
        specs["qspec"] = ((4,), torch.int32)
        return specs

    def encode(self, q: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The value pieces of ``q`` (CPU tensors)."""
        bits = self._spec().bits
        pieces = {
            "qcodes": pack_codes(q.codes.reshape(-1), bits),
            "qscales": q.scales.contiguous(),
        }
        if q.zeros is not None:
            pieces["qzeros"] = pack_codes(q.zeros, bits)
        pieces["qspec"] = spec_piece(self._spec())
        return pieces

    def required_pieces(self, layout: Layout) -> tuple[str, ...]:
        return (*layout.mask_pieces, "qcodes", "qscales", "qspec")

    def check(
        self, layout: Layout, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str
    ) -> None:
        if "scale" in pieces:
            raise CheckpointError(f"{where}: quantised values have group scales, not a per-row 'scale'")
        layout.check_mask(pieces, rows, cols, where)
        spec = spec_of_piece(pieces["qspec"], where)
        if spec.sym and "qzeros" in pieces:
            raise CheckpointError(
                f"{where}: symmetric codes store no zero points, but it has a 'qzeros' piece"
            )
        if not spec.sym and "qzeros" not in pieces:
            raise CheckpointError(
                f"{where}: asymmetric codes need their zero points, it has no 'qzeros' piece"
            )
        keep = layout.keep_of_mask(pieces, rows, cols)
        n_values = rows * cols if keep is None else int(count_true(keep.reshape(1, -1)))
        n_groups = count_groups((rows, cols), spec, keep)
        try:
            codes = unpack_codes(pieces["qcodes"], spec.bits, n_values, where=f"{where}: codes")
            zeros = None
            if not spec.sym:
                zeros = unpack_codes(pieces["qzeros"], spec.bits, n_groups, where=f"{where}: zero points")
            shaped = codes.reshape(rows, cols) if keep is None else codes
            QuantizedWeight(shaped, pieces["qscales"], zeros, (rows, cols), spec, keep).validate(where)
        except QuantizationError as exc:
            raise CheckpointError(str(exc)) from exc

    def decode(
        self, layout: Layout, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """:func:`~ditprune_core.quantize.dequantize_weight` of the codes (unpacked by a few byte
        operations), the keep mask read off the layout's mask pieces."""
        spec = spec_of_piece(pieces["qspec"])
        keep = layout.keep_of_mask(pieces, rows, cols)
        per_row = layout.per_row(cols)  # every row alike (2:4, dense): no count needed
        if per_row is not None or keep is None:
            n_values = rows * (cols if per_row is None else per_row)
        else:
            n_values = int(count_true(keep.reshape(1, -1)))
        codes = unpack_stream(pieces["qcodes"], spec.bits)[:n_values]
        scales = pieces["qscales"]
        zeros = None if spec.sym else unpack_stream(pieces["qzeros"], spec.bits)[: scales.numel()]
        shaped = codes.reshape(rows, cols) if keep is None else codes
        q = QuantizedWeight(shaped, scales, zeros, (rows, cols), spec, keep)
        return dequantize_weight(q, dtype, check=False)


def is_quantized(pieces: Mapping[str, object]) -> bool:
    """Whether a weight's pieces hold quantised values."""
    return "qspec" in pieces or "qcodes" in pieces or "qgrid" in pieces


def value_codec_of(pieces: Mapping[str, object]) -> ValueCodec:
    """The codec of a weight's values, told from its pieces: codes, a per-row scale (fp8), or
    neither (the weights' dtype)."""
    if is_quantized(pieces):
        return QuantValues()
    if "scale" in pieces:
        return Fp8Values()
    return PlainValues()
