"""Compressed layouts of one 2-D weight: one object per layout (pieces, encode, decode, validate).

A compressed checkpoint (:mod:`ditprune_core.save`) stores each compressed weight ``k`` as the
pieces of one layout, ``k.<piece>``. Where the values go:

- **bitmask** (the compressed-tensors sparse-bitmask layout): ``bitmask`` (uint8,
  (rows, ceil(cols / 8)), little-endian bits along the input dimension) marks the stored values,
  which are in row-major order; with unquantised values also ``compressed`` (the values, 1-D) and
  ``row_offsets`` (int64, where each row starts in ``compressed``);
- **2:4**, when every group of 4 inputs holds at most 2 non-zeros (2 kept weights, with quantised
  values): ``nm_codes`` (uint8: which 2 of the 4 positions, one of 6 patterns, three groups per byte
  as ``c0 + 6 c1 + 36 c2``: 2.67 bits per group of 4); unquantised values in ``nm_values``
  ((rows, cols/2), the two values of every group);
- **dense**: every position has a value, no mask. Only with fp8 or quantised values (the dense
  layers of a compact file: modulation, embedders, final layer); unquantised values in ``values``
  ((rows, cols)).

How the values are stored:

- in the weights' dtype (bit-exact);
- **fp8** (:class:`Fp8Values`): float8_e4m3fn with a float32 scale per row, ``scale``
  (value = fp8 * scale, scale = row max / 448);
- **quantised** (:class:`QuantValues`, the group codes of :mod:`ditprune_core.quantize`):
  ``qcodes`` (the stored values' codes, packed by :func:`~ditprune_core.quantize.pack_codes`),
  ``qscales`` (float16, one per group), ``qzeros`` (asymmetric codes: the zero points, packed the
  same way) and ``qspec`` (int32 ``[bits, group_size, sym, grouping]``, grouping 0 = kept,
  1 = columns). A value decodes to ``scale * (code - zero)`` computed in float32, then cast to the
  weight's dtype: exactly :func:`~ditprune_core.quantize.dequantize_weight`. The mask pieces come
  from the :class:`~ditprune_core.quantize.QuantizedWeight`'s keep mask, never from the decoded
  values (a kept value may decode to 0). The bitmask layout stores no row offsets here: each
  row's count is read off the bitmask (8 bytes a row less).

Every layout also stores ``shape`` (int64 [rows, cols]). A new layout is one more :class:`Layout`
subclass registered in :data:`LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .quantize import (
    GROUPINGS,
    QuantizationError,
    QuantizedWeight,
    QuantSpec,
    count_groups,
    dequantize_codes,
    kept_per_row,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)
from .util.dtypes import cast_saturating, first_non_finite, storage_view, to_float32
from .util.packing import pack_bits, unpack_bits
from .util.selection import count_true

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
    "QuantValues",
    "StorageCost",
    "TwoFourLayout",
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
]

FP8_MAX = 448.0
#: (shape, dtype) of a piece, known before it is made (so that a writer can stream it)
PieceSpec = tuple[tuple[int, ...], torch.dtype]
#: the pieces of quantised values (``qzeros`` only for asymmetric codes)
QUANT_PIECES = ("qcodes", "qscales", "qzeros", "qspec")


class CheckpointError(ValueError):
    """A checkpoint file that is not ours, truncated, of an unknown version, or inconsistent."""


def _nbytes(spec: PieceSpec) -> int:
    shape, dtype = spec
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Fp8Values:
    """fp8 e4m3 values with a float32 scale per row: ``value = fp8 * scale``, scale = row max / 448."""

    dtype: torch.dtype = torch.float8_e4m3fn

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
class QuantValues:
    """Group-quantised values (:mod:`ditprune_core.quantize`): packed codes, float16 scales, packed
    zero points (asymmetric) and the spec; composable with every :class:`Layout`."""

    spec: QuantSpec

    @property
    def name(self) -> str:
        """How the checkpoint metadata names the values: ``int4``, ``int3``, ..."""
        return f"int{self.spec.bits}"

    @property
    def pieces(self) -> tuple[str, ...]:
        zeros = () if self.spec.sym else ("qzeros",)
        return ("qcodes", "qscales", *zeros, "qspec")

    def piece_specs(self, n_values: int, n_groups: int) -> dict[str, PieceSpec]:
        """(shape, dtype) of each piece for ``n_values`` codes in ``n_groups`` groups."""
        bits = self.spec.bits
        specs: dict[str, PieceSpec] = {
            "qcodes": ((packed_nbytes(n_values, bits),), torch.uint8),
            "qscales": ((n_groups,), torch.float16),
        }
        if not self.spec.sym:
            specs["qzeros"] = ((packed_nbytes(n_groups, bits),), torch.uint8)
        specs["qspec"] = ((4,), torch.int32)
        return specs

    def encode(self, q: QuantizedWeight) -> dict[str, torch.Tensor]:
        """The value pieces of ``q`` (CPU tensors)."""
        bits = self.spec.bits
        pieces = {
            "qcodes": pack_codes(q.codes.reshape(-1), bits),
            "qscales": q.scales.contiguous(),
        }
        if q.zeros is not None:
            pieces["qzeros"] = pack_codes(q.zeros, bits)
        pieces["qspec"] = spec_piece(self.spec)
        return pieces


def is_quantized(pieces: Mapping[str, object]) -> bool:
    """Whether a weight's pieces hold quantised values."""
    return "qspec" in pieces or "qcodes" in pieces or "qgrid" in pieces


def _unpack_all(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Every code of a packed stream, the last word's padding included: uint8, a few vectorised ops
    on the packed bytes (the runtime's unpacking; :func:`~ditprune_core.quantize.unpack_codes` is the
    checked reference)."""
    if bits == 8:
        return packed
    if bits == 4:
        return torch.stack((packed & 15, packed >> 4), dim=1).reshape(-1)
    if bits == 2:
        return torch.stack((packed & 3, (packed >> 2) & 3, (packed >> 4) & 3, packed >> 6), dim=1).reshape(-1)
    b = packed.reshape(-1, 3)
    b0, b1, b2 = b[:, 0], b[:, 1], b[:, 2]
    return torch.stack(
        (
            b0 & 7,
            (b0 >> 3) & 7,
            (b0 >> 6) | ((b1 & 1) << 2),
            (b1 >> 1) & 7,
            (b1 >> 4) & 7,
            (b1 >> 7) | ((b2 & 3) << 1),
            (b2 >> 2) & 7,
            b2 >> 5,
        ),
        dim=1,
    ).reshape(-1)


class Layout:
    """One compressed layout. Subclasses define the pieces and the maths; all share ``shape``/``scale``."""

    name: str = ""
    #: the piece that holds unquantised values (fp8-coded when the file has fp8 values)
    values_piece: str = ""
    #: the layout's own pieces with unquantised values, besides ``shape`` and ``scale``
    own_pieces: tuple[str, ...] = ()
    #: the pieces that say where the values go (with quantised values, the only ones besides them)
    mask_pieces: tuple[str, ...] = ()

    def fits(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` (2-D, zeros where pruned) can be stored in this layout."""
        raise NotImplementedError

    def fits_keep(self, keep: torch.Tensor | None, shape: tuple[int, int]) -> bool:
        """Whether a (rows, cols) weight with bool keep mask ``keep`` (None: every weight kept) can
        be stored here with quantised values."""
        raise NotImplementedError

    def _specs(self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype) -> dict[str, PieceSpec]:
        """The own pieces' (shape, dtype) for ``n_values`` stored values (only the bitmask layout's
        depend on it: the others store a fixed share of the weight)."""
        raise NotImplementedError

    def _stored_count(self, weight: torch.Tensor) -> int:
        """How many values of ``weight`` this layout stores (every one, unless overridden)."""
        return int(weight.numel())

    def _encode(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The own pieces of CPU weight ``w``, values included; and the row of each value (None:
        the values piece is (rows, k))."""
        raise NotImplementedError

    def _validate(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        raise NotImplementedError

    def _decode(
        self,
        pieces: Mapping[str, torch.Tensor],
        rows: int,
        cols: int,
        values: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _row_scale(self, pieces: Mapping[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        """The scale of every stored value, broadcastable to the values piece."""
        raise NotImplementedError

    # the positions of the values, for quantised values
    def _mask_specs(self, rows: int, cols: int) -> dict[str, PieceSpec]:
        raise NotImplementedError

    def _mask_of_keep(self, keep: torch.Tensor | None, rows: int, cols: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _validate_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        raise NotImplementedError

    def _keep_of_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
        """The bool (rows, cols) positions of the stored values; None: every position."""
        raise NotImplementedError

    def _per_row(self, cols: int) -> int | None:
        """Values in every row when all rows hold as many (2:4, dense); None: each its own (bitmask)."""
        return None

    def _place(
        self,
        pieces: Mapping[str, torch.Tensor],
        rows: int,
        cols: int,
        values: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        """The dense weight from the row-major stored values (in their final dtype)."""
        return self._decode(pieces, rows, cols, values, values.dtype)

    # ------------------------------------------------------------------------------------------
    def piece_specs(self, weight: torch.Tensor, value_dtype: torch.dtype | None) -> dict[str, PieceSpec]:
        """Every piece's (shape, dtype), without encoding: what the writer announces up front."""
        rows, cols = int(weight.shape[0]), int(weight.shape[1])
        n_values = self._stored_count(weight)
        return self.value_piece_specs(
            rows, cols, n_values, value_dtype or weight.dtype, scaled=value_dtype is not None
        )

    def value_piece_specs(
        self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype, *, scaled: bool
    ) -> dict[str, PieceSpec]:
        """Every piece's (shape, dtype) for ``n_values`` stored unquantised values of a (rows, cols)
        weight in ``value_dtype``; ``scaled``: with the float32 per-row scale of fp8 values."""
        specs = self._specs(rows, cols, n_values, value_dtype)
        specs["shape"] = ((2,), torch.int64)
        if scaled:
            specs["scale"] = ((rows,), torch.float32)
        return specs

    def nbytes(self, weight: torch.Tensor, value_dtype: torch.dtype | None) -> int:
        """Bytes this layout stores for ``weight``."""
        return sum(_nbytes(s) for s in self.piece_specs(weight, value_dtype).values())

    def quantized_piece_specs(
        self, shape: tuple[int, int], spec: QuantSpec, keep: torch.Tensor | None
    ) -> dict[str, PieceSpec]:
        """Every piece's (shape, dtype) for a weight quantised with ``spec``, without quantising it:
        the kept values of a bool (rows, cols) ``keep``, or of (rows,) kept counts per row; None:
        every value."""
        rows, cols = int(shape[0]), int(shape[1])
        counts = None if keep is None else (kept_per_row(keep) if keep.dtype == torch.bool else keep)
        n_values = rows * cols if counts is None else int(counts.sum())
        specs = self._mask_specs(rows, cols)
        specs.update(QuantValues(spec).piece_specs(n_values, count_groups((rows, cols), spec, counts)))
        specs["shape"] = ((2,), torch.int64)
        return specs

    def quantized_nbytes(self, shape: tuple[int, int], spec: QuantSpec, keep: torch.Tensor | None) -> int:
        """Bytes this layout stores for a weight quantised with ``spec``."""
        return sum(_nbytes(s) for s in self.quantized_piece_specs(shape, spec, keep).values())

    def encode(
        self, weight: torch.Tensor, values: Fp8Values | None = None, where: str = "weight"
    ) -> tuple[dict[str, torch.Tensor], float]:
        """``(pieces, fp8 max relative error)`` of ``weight`` (any device; encoded on the CPU)."""
        w = weight.detach().cpu()
        rows, cols = w.shape
        pieces, value_rows = self._encode(w)
        pieces["shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        error = 0.0
        if values is not None:
            q, scale, error = values.encode(pieces[self.values_piece], value_rows, rows, where, w.dtype)
            pieces[self.values_piece], pieces["scale"] = q, scale
        return pieces, error

    def encode_quantized(self, q: QuantizedWeight, where: str = "weight") -> dict[str, torch.Tensor]:
        """The pieces of quantised weight ``q`` (any device; encoded on the CPU): its codes exactly,
        the mask from its keep mask.

        Raises:
            CheckpointError: ``q``'s keep mask does not fit this layout.
            QuantizationError: ``q``'s pieces disagree with each other.
        """
        q.validate(where)
        rows, cols = q.shape
        keep = None if q.keep is None else q.keep.cpu()
        if not self.fits_keep(keep, (rows, cols)):
            raise CheckpointError(f"{where}: its keep mask does not fit the {self.name} layout")
        pieces = self._mask_of_keep(keep, rows, cols)
        zeros = None if q.zeros is None else q.zeros.cpu()
        cpu = QuantizedWeight(q.codes.cpu(), q.scales.cpu(), zeros, q.shape, q.spec, keep)
        pieces.update(QuantValues(q.spec).encode(cpu))
        pieces["shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        return pieces

    def validate(self, pieces: Mapping[str, torch.Tensor], where: str) -> tuple[int, int]:
        """Check every piece against the others before anything is allocated; returns (rows, cols).

        Raises:
            CheckpointError: a missing piece, a bad ``shape``, pieces that do not fit it, counts that
                disagree, codes out of range or set padding bits, naming ``where``.
        """
        quantized = is_quantized(pieces)
        needed = ("shape", *self.mask_pieces, "qcodes", "qscales", "qspec") if quantized else self.own_pieces
        missing = [p for p in ("shape", *needed) if p not in pieces]
        if missing:
            raise CheckpointError(f"{where}: {self.name} weight has no {sorted(set(missing))} piece(s)")
        shape = pieces["shape"]
        if shape.dtype != torch.int64 or tuple(shape.shape) != (2,) or bool((shape < 0).any()):
            raise CheckpointError(f"{where}: its 'shape' piece must be two non-negative int64 values")
        rows, cols = (int(x) for x in shape.tolist())
        if quantized:
            if "scale" in pieces:
                raise CheckpointError(f"{where}: quantised values have group scales, not a per-row 'scale'")
            self._validate_mask(pieces, rows, cols, where)
            self._validate_quantized(pieces, rows, cols, where)
            return rows, cols
        self._validate(pieces, rows, cols, where)
        scale = pieces.get("scale")
        if scale is not None and (tuple(scale.shape) != (rows,) or not bool(torch.isfinite(scale).all())):
            raise CheckpointError(f"{where}: its 'scale' piece must be {rows} finite values, one per row")
        return rows, cols

    def _validate_quantized(
        self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str
    ) -> None:
        spec = spec_of_piece(pieces["qspec"], where)
        if spec.sym and "qzeros" in pieces:
            raise CheckpointError(
                f"{where}: symmetric codes store no zero points, but it has a 'qzeros' piece"
            )
        if not spec.sym and "qzeros" not in pieces:
            raise CheckpointError(
                f"{where}: asymmetric codes need their zero points, it has no 'qzeros' piece"
            )
        keep = self._keep_of_mask(pieces, rows, cols)
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
        self,
        pieces: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        *,
        check: bool = True,
        where: str = "weight",
    ) -> torch.Tensor:
        """The dense (rows, cols) weight in ``dtype`` on the pieces' device.

        ``shape`` and ``qspec`` are read on the host: a caller that keeps them on the CPU (the
        ComfyUI runtime) decodes without waiting for the device.
        """
        if check:
            rows, cols = self.validate(pieces, where)
        else:
            rows, cols = (int(x) for x in pieces["shape"].tolist())
        if is_quantized(pieces):
            return self._decode_quantized(pieces, rows, cols, dtype)
        values = pieces[self.values_piece]
        scale = pieces.get("scale")
        values = (
            values.to(dtype)
            if scale is None
            else cast_saturating(to_float32(values) * self._row_scale(pieces, scale), dtype)
        )
        return self._decode(pieces, rows, cols, values, dtype)

    def _decode_quantized(
        self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Vectorised decode: codes unpacked with a few byte operations, every scale (and zero point)
        spread over its values, one multiply-subtract; no loop over rows or groups."""
        bits, g, sym, grouping = (int(x) for x in pieces["qspec"].tolist())
        g = max(1, min(g, cols))  # QuantSpec.group_width: grids follow the row, not the stored size
        scales = pieces["qscales"]
        n_groups = scales.numel()
        zero: torch.Tensor | int = 1 << (bits - 1)
        if not sym:
            zero = _unpack_all(pieces["qzeros"], bits)[:n_groups]
        codes = _unpack_all(pieces["qcodes"], bits)
        per_row = self._per_row(cols)
        if GROUPINGS[grouping] == "columns" and per_row != cols:
            return self._decode_column_groups(pieces, rows, cols, codes, scales, zero, g, dtype)
        keep = None
        if per_row is not None:  # every row holds per_row values: groups tile each row alike
            codes = codes[: rows * per_row]
            row_groups = -(-per_row // g)
            if per_row % g == 0:
                z = zero if isinstance(zero, int) else zero[:, None]
                values = dequantize_codes(codes.reshape(n_groups, g), scales[:, None], z, dtype).reshape(-1)
            else:
                group = torch.arange(per_row, device=codes.device) // g
                z = zero if isinstance(zero, int) else zero.reshape(rows, row_groups)[:, group]
                s = scales.reshape(rows, row_groups)[:, group]
                values = dequantize_codes(codes.reshape(rows, per_row), s, z, dtype).reshape(-1)
        else:
            keep = self._keep_of_mask(pieces, rows, cols)
            if keep is None:  # cannot happen: only the layouts with a mask have ragged rows
                raise CheckpointError(f"{self.name} layout without a mask")
            sizes = _group_sizes(keep, g, n_groups, codes.numel())
            # each group's float32 scale and scale * zero, spread over its values in one pass
            s = torch.cat((scales.float(), scales.new_zeros(1, dtype=torch.float32)))
            z = zero if isinstance(zero, int) else torch.cat((zero, zero.new_zeros(1))).float()
            pair = torch.stack((s, s * z), dim=1)
            spread = torch.repeat_interleave(pair, sizes, dim=0, output_size=codes.numel())
            values = cast_saturating(codes.float().mul_(spread[:, 0]).sub_(spread[:, 1]), dtype)
        return self._place(pieces, rows, cols, values, keep)

    def _decode_column_groups(
        self,
        pieces: Mapping[str, torch.Tensor],
        rows: int,
        cols: int,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zero: torch.Tensor | int,
        g: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Groups over dense column windows: decode on the dense grid, then keep the kept positions."""
        keep = self._keep_of_mask(pieces, rows, cols)
        if keep is None:  # cannot happen: dense rows decode as whole rows
            raise CheckpointError(f"{self.name} layout without a mask")
        row_groups = -(-cols // g)
        dense_codes = torch.zeros(rows, cols, dtype=torch.uint8, device=codes.device)
        dense_codes.masked_scatter_(keep, codes)
        group = torch.arange(cols, device=codes.device) // g
        s = scales.reshape(rows, row_groups)[:, group]
        z = zero if isinstance(zero, int) else zero.reshape(rows, row_groups)[:, group]
        values = dequantize_codes(dense_codes, s, z, torch.float32)
        return cast_saturating(torch.where(keep, values, 0.0), dtype)


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

    def _stored_count(self, weight: torch.Tensor) -> int:
        return int(count_true((storage_view(weight) != 0).reshape(1, -1)))

    def _specs(self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype) -> dict[str, PieceSpec]:
        return {
            "compressed": ((n_values,), value_dtype),
            "bitmask": ((rows, -(-cols // 8)), torch.uint8),
            "row_offsets": ((rows,), torch.int64),
        }

    def _encode(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        mask = storage_view(w) != 0
        counts = count_true(mask).squeeze(1)
        pieces = {
            "compressed": w[mask],
            "bitmask": pack_bits(mask),
            "row_offsets": torch.cumsum(counts, 0) - counts,
        }
        return pieces, torch.repeat_interleave(torch.arange(w.shape[0]), counts)

    def _validate_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        bits = pieces["bitmask"]
        if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, -(-cols // 8)):
            raise CheckpointError(
                f"{where}: bitmask does not fit its shape ({rows}, {cols}): it is {tuple(bits.shape)} "
                f"{bits.dtype}, expected ({rows}, {-(-cols // 8)}) uint8"
            )

    def _validate(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        self._validate_mask(pieces, rows, cols, where)
        bits, values = pieces["bitmask"], pieces["compressed"]
        if values.dim() != 1:
            raise CheckpointError(f"{where}: its values piece must be 1-D, got {tuple(values.shape)}")
        marked = int(count_true(unpack_bits(bits, cols).reshape(1, -1)))
        if marked != values.numel():
            raise CheckpointError(
                f"{where}: bitmask marks {marked} weights but {values.numel()} values are stored "
                "(mask size does not match its tensor)"
            )

    def decode(
        self,
        pieces: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        *,
        check: bool = True,
        where: str = "weight",
    ) -> torch.Tensor:
        values, scale = pieces.get("compressed"), pieces.get("scale")
        if values is None or scale is None or is_quantized(pieces):
            return super().decode(pieces, dtype, check=check, where=where)
        # fp8 values: their bytes placed (1 byte a weight), then scaled row by row on the dense grid,
        # instead of spreading each row's scale over its values: the same value * scale per weight
        if check:
            rows, cols = self.validate(pieces, where)
        else:
            rows, cols = (int(x) for x in pieces["shape"].tolist())
        placed = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
        storage_view(placed).masked_scatter_(unpack_bits(pieces["bitmask"], cols), storage_view(values))
        return cast_saturating(to_float32(placed) * scale[:, None], dtype)

    def _row_scale(self, pieces: Mapping[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        offsets, values = pieces["row_offsets"], pieces["compressed"]
        counts = torch.diff(offsets, append=torch.tensor([values.numel()], device=offsets.device))
        return torch.repeat_interleave(scale, counts)

    def _decode(
        self,
        pieces: Mapping[str, torch.Tensor],
        rows: int,
        cols: int,
        values: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        return self._place(pieces, rows, cols, values, unpack_bits(pieces["bitmask"], cols))

    def _place(
        self,
        pieces: Mapping[str, torch.Tensor],
        rows: int,
        cols: int,
        values: torch.Tensor,
        keep: torch.Tensor | None,
    ) -> torch.Tensor:
        mask = unpack_bits(pieces["bitmask"], cols) if keep is None else keep
        out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
        # ~1.6x faster than out[mask] = values on CPU; on the bytes for fp8 (zero is the zero byte);
        # the values may run past the marked count (a packed stream's padding): those are not read
        storage_view(out).masked_scatter_(mask, storage_view(values))
        return out

    def _mask_specs(self, rows: int, cols: int) -> dict[str, PieceSpec]:
        return {"bitmask": ((rows, -(-cols // 8)), torch.uint8)}

    def _mask_of_keep(self, keep: torch.Tensor | None, rows: int, cols: int) -> dict[str, torch.Tensor]:
        if keep is None:
            raise CheckpointError("the bitmask layout needs a keep mask")
        return {"bitmask": pack_bits(keep)}

    def _keep_of_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
        return unpack_bits(pieces["bitmask"], cols)


_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
_PAIR_CODE = torch.full((4, 4), -1, dtype=torch.int64)
for _code, (_a, _b) in enumerate(_PAIRS):
    _PAIR_CODE[_a, _b] = _code
_MAX_TRIPLE_CODE = 6**3 - 1
#: an ``nm_codes`` byte (three groups of 4) -> its 12 kept positions as bools, padded to 16 bytes
#: (two int64 words: a gather moves a byte's 12 bools at once)
_TRIPLE_KEEP = torch.zeros(256, 16, dtype=torch.uint8)
for _byte in range(_MAX_TRIPLE_CODE + 1):
    for _group, _code in enumerate((_byte % 6, (_byte // 6) % 6, _byte // 36)):
        for _pos in _PAIRS[_code]:
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

    def _specs(self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype) -> dict[str, PieceSpec]:
        return {
            "nm_values": ((rows, cols // 2), value_dtype),
            "nm_codes": ((rows, -(-(cols // 4) // 3)), torch.uint8),
        }

    def _encode(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        rows, cols = w.shape
        groups = storage_view(w).reshape(rows, -1, 4)
        idx = _pair_index(groups != 0)  # nonzeros first, then the lowest positions: two per group
        values = groups.gather(2, idx).reshape(rows, cols // 2).view(w.dtype)
        return {"nm_values": values, "nm_codes": _pack_pairs(idx)}, None

    def _validate_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        codes = pieces["nm_codes"]
        if cols % 4 or tuple(codes.shape) != (rows, -(-(cols // 4) // 3)) or codes.dtype != torch.uint8:
            raise CheckpointError(f"{where}: 2:4 pieces do not fit its shape ({rows}, {cols})")
        if codes.numel() and int(codes.max()) > _MAX_TRIPLE_CODE:
            raise CheckpointError(f"{where}: invalid 2:4 codes (corrupted file)")

    def _validate(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        if tuple(pieces["nm_values"].shape) != (rows, cols // 2):
            raise CheckpointError(f"{where}: 2:4 pieces do not fit its shape ({rows}, {cols})")
        self._validate_mask(pieces, rows, cols, where)

    def _row_scale(self, pieces: Mapping[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        return scale[:, None]

    def _decode(
        self,
        pieces: Mapping[str, torch.Tensor],
        rows: int,
        cols: int,
        values: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        keep = self._keep_of_mask(pieces, rows, cols)
        out = torch.zeros(rows, cols, dtype=dtype, device=values.device)
        # the two kept positions of a group are stored in ascending order: row-major, as placed here
        storage_view(out).masked_scatter_(keep, storage_view(values))
        return out

    def _mask_specs(self, rows: int, cols: int) -> dict[str, PieceSpec]:
        return {"nm_codes": ((rows, -(-(cols // 4) // 3)), torch.uint8)}

    def _mask_of_keep(self, keep: torch.Tensor | None, rows: int, cols: int) -> dict[str, torch.Tensor]:
        if keep is None or not self.fits_keep(keep, (rows, cols)):
            raise CheckpointError("the 2:4 layout needs exactly 2 kept weights in every group of 4")
        return {"nm_codes": _pack_pairs(_pair_index(keep.reshape(rows, -1, 4)))}

    def _keep_of_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor:
        codes = pieces["nm_codes"]
        words = _TRIPLE_KEEP_WORDS.to(codes.device).index_select(0, codes.reshape(-1).to(torch.int32))
        return words.view(torch.bool).reshape(rows, -1, 16)[:, :, :12].reshape(rows, -1)[:, :cols]

    def _per_row(self, cols: int) -> int | None:
        return cols // 2


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

    def _specs(self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype) -> dict[str, PieceSpec]:
        return {"values": ((rows, cols), value_dtype)}

    def _encode(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        return {"values": w}, None

    def _validate(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        if tuple(pieces["values"].shape) != (rows, cols):
            raise CheckpointError(
                f"{where}: its values piece {tuple(pieces['values'].shape)} does not fit its shape "
                f"({rows}, {cols})"
            )

    def _row_scale(self, pieces: Mapping[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        return scale[:, None]

    def _decode(
        self,
        pieces: Mapping[str, torch.Tensor],
        rows: int,
        cols: int,
        values: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        return values.reshape(rows, cols)

    def _mask_specs(self, rows: int, cols: int) -> dict[str, PieceSpec]:
        return {}

    def _mask_of_keep(self, keep: torch.Tensor | None, rows: int, cols: int) -> dict[str, torch.Tensor]:
        return {}

    def _validate_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        return None

    def _keep_of_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
        return None

    def _per_row(self, cols: int) -> int | None:
        return cols


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


# ---------------------------------------------------------------------------------------------------
# storage cost: what the layouts above write, counted from their piece specs (the one source)

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
        cost[_PIECE_COST[piece]] += _nbytes(spec)
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
