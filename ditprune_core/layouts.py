"""Compressed layouts of one pruned 2-D weight: one object per layout (pieces, encode, decode, validate).

A compressed checkpoint (:mod:`ditprune_core.save`) stores each pruned weight ``k`` as the pieces of
one layout, ``k.<piece>``:

- **bitmask** (the compressed-tensors sparse-bitmask layout): ``compressed`` (the non-zero values,
  row-major, 1-D), ``bitmask`` (uint8, (rows, ceil(cols / 8)), little-endian bits along the input
  dimension) and ``row_offsets`` (int64, where each row starts in ``compressed``);
- **2:4**, when every group of 4 inputs holds at most 2 non-zeros: ``nm_values`` ((rows, cols/2),
  the two kept values of every group) and ``nm_codes`` (uint8: which 2 of the 4 positions, one of 6
  patterns, three groups per byte as ``c0 + 6 c1 + 36 c2``: 2.67 bits per group of 4).

Every layout also stores ``shape`` (int64 [rows, cols]). With fp8 values (:class:`Fp8Values`) the
values are float8_e4m3fn with a float32 scale per row, ``scale`` (value = fp8 * scale, scale = row
max / 448). A new layout (the quantised ones of the low-bit work) is one more :class:`Layout`
subclass registered in :data:`LAYOUTS`; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .util.dtypes import first_non_finite, storage_view
from .util.packing import pack_bits, unpack_bits
from .util.selection import count_true

__all__ = [
    "FP8_MAX",
    "LAYOUTS",
    "PIECES",
    "BitmaskLayout",
    "CheckpointError",
    "Fp8Values",
    "Layout",
    "PieceSpec",
    "TwoFourLayout",
    "choose_layout",
    "layout_of",
    "unpack_weight",
]

FP8_MAX = 448.0
#: (shape, dtype) of a piece, known before it is made (so that a writer can stream it)
PieceSpec = tuple[tuple[int, ...], torch.dtype]


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
        self, values: torch.Tensor, value_rows: torch.Tensor | None, n_rows: int, where: str = "weight"
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(fp8 values, scale (rows,), max error / peak)``.

        ``value_rows`` gives the row of each value of a 1-D ``values``; None: ``values`` is (rows, k).

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
        error = float((q.float() * per_value - v).abs().max()) / peak if peak > 0 else 0.0
        return q, scale, error


class Layout:
    """One compressed layout. Subclasses define the pieces and the maths; all share ``shape``/``scale``."""

    name: str = ""
    #: the piece that holds the kept values (fp8-coded when the file has fp8 values)
    values_piece: str = ""
    #: the layout's own pieces besides ``shape`` and ``scale``
    own_pieces: tuple[str, ...] = ()

    def fits(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` (2-D, zeros where pruned) can be stored in this layout."""
        raise NotImplementedError

    def _specs(self, weight: torch.Tensor, value_dtype: torch.dtype) -> dict[str, PieceSpec]:
        raise NotImplementedError

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

    def piece_specs(self, weight: torch.Tensor, value_dtype: torch.dtype | None) -> dict[str, PieceSpec]:
        """Every piece's (shape, dtype), without encoding: what the writer announces up front."""
        specs = self._specs(weight, value_dtype or weight.dtype)
        specs["shape"] = ((2,), torch.int64)
        if value_dtype is not None:
            specs["scale"] = ((weight.shape[0],), torch.float32)
        return specs

    def nbytes(self, weight: torch.Tensor, value_dtype: torch.dtype | None) -> int:
        """Bytes this layout stores for ``weight``."""
        return sum(_nbytes(s) for s in self.piece_specs(weight, value_dtype).values())

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
            q, scale, error = values.encode(pieces[self.values_piece], value_rows, rows, where)
            pieces[self.values_piece], pieces["scale"] = q, scale
        return pieces, error

    def validate(self, pieces: Mapping[str, torch.Tensor], where: str) -> tuple[int, int]:
        """Check every piece against the others before anything is allocated; returns (rows, cols).

        Raises:
            CheckpointError: a missing piece, a bad ``shape``, pieces that do not fit it, counts that
                disagree or codes out of range, naming ``where``.
        """
        missing = [p for p in ("shape", *self.own_pieces) if p not in pieces]
        if missing:
            raise CheckpointError(f"{where}: {self.name} weight has no {missing} piece(s)")
        shape = pieces["shape"]
        if shape.dtype != torch.int64 or tuple(shape.shape) != (2,) or bool((shape < 0).any()):
            raise CheckpointError(f"{where}: its 'shape' piece must be two non-negative int64 values")
        rows, cols = (int(x) for x in shape.tolist())
        self._validate(pieces, rows, cols, where)
        scale = pieces.get("scale")
        if scale is not None and (tuple(scale.shape) != (rows,) or not bool(torch.isfinite(scale).all())):
            raise CheckpointError(f"{where}: its 'scale' piece must be {rows} finite values, one per row")
        return rows, cols

    def decode(
        self,
        pieces: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        *,
        check: bool = True,
        where: str = "weight",
    ) -> torch.Tensor:
        """The dense (rows, cols) weight in ``dtype`` on the pieces' device."""
        if check:
            rows, cols = self.validate(pieces, where)
        else:
            rows, cols = (int(x) for x in pieces["shape"].tolist())
        values = pieces[self.values_piece]
        scale = pieces.get("scale")
        values = (
            values.to(dtype) if scale is None else (values.float() * self._row_scale(pieces, scale)).to(dtype)
        )
        return self._decode(pieces, rows, cols, values, dtype)


class BitmaskLayout(Layout):
    """compressed-tensors' sparse bitmask: values, a bit per weight, and row offsets."""

    name = "bitmask"
    values_piece = "compressed"
    own_pieces = ("compressed", "bitmask", "row_offsets")

    def fits(self, weight: torch.Tensor) -> bool:
        return weight.dim() == 2

    def _specs(self, weight: torch.Tensor, value_dtype: torch.dtype) -> dict[str, PieceSpec]:
        rows, cols = weight.shape
        nnz = int(count_true((storage_view(weight) != 0).reshape(1, -1)))
        return {
            "compressed": ((nnz,), value_dtype),
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

    def _validate(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        bits, values = pieces["bitmask"], pieces["compressed"]
        if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, -(-cols // 8)):
            raise CheckpointError(
                f"{where}: bitmask does not fit its shape ({rows}, {cols}): it is {tuple(bits.shape)} "
                f"{bits.dtype}, expected ({rows}, {-(-cols // 8)}) uint8"
            )
        if values.dim() != 1:
            raise CheckpointError(f"{where}: its values piece must be 1-D, got {tuple(values.shape)}")
        marked = int(count_true(unpack_bits(bits, cols).reshape(1, -1)))
        if marked != values.numel():
            raise CheckpointError(
                f"{where}: bitmask marks {marked} weights but {values.numel()} values are stored "
                "(mask size does not match its tensor)"
            )

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
        mask = unpack_bits(pieces["bitmask"], cols)
        out = torch.zeros(rows, cols, dtype=dtype, device=values.device)
        # ~1.6x faster than out[mask] = values on CPU; on the bytes for fp8 (zero is the zero byte)
        storage_view(out).masked_scatter_(mask, storage_view(values))
        return out


_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
_PAIR_CODE = torch.full((4, 4), -1, dtype=torch.int64)
for _code, (_a, _b) in enumerate(_PAIRS):
    _PAIR_CODE[_a, _b] = _code
_CODE_PAIRS = torch.tensor(_PAIRS, dtype=torch.int64)
_MAX_TRIPLE_CODE = 6**3 - 1


class TwoFourLayout(Layout):
    """2:4 packing: the two kept values of every group of 4 and a pattern code (2.67 bits a group)."""

    name = "2:4"
    values_piece = "nm_values"
    own_pieces = ("nm_values", "nm_codes")

    def fits(self, weight: torch.Tensor) -> bool:
        if weight.dim() != 2 or weight.shape[1] % 4:
            return False
        groups = (storage_view(weight) != 0).reshape(weight.shape[0], -1, 4)
        return bool((groups.sum(dim=2) <= 2).all())

    def _specs(self, weight: torch.Tensor, value_dtype: torch.dtype) -> dict[str, PieceSpec]:
        rows, cols = weight.shape
        return {
            "nm_values": ((rows, cols // 2), value_dtype),
            "nm_codes": ((rows, -(-(cols // 4) // 3)), torch.uint8),
        }

    def _encode(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        rows, cols = w.shape
        groups = storage_view(w).reshape(rows, -1, 4)
        nonzero = (groups != 0).to(torch.int64)
        # nonzeros first, then the lowest positions: exactly two per group
        priority = nonzero * 8 + (3 - torch.arange(4))
        idx = priority.topk(2, dim=2).indices.sort(dim=2).values
        values = groups.gather(2, idx).reshape(rows, cols // 2).view(w.dtype)
        codes = _PAIR_CODE[idx[..., 0], idx[..., 1]]
        pad = (-codes.shape[1]) % 3
        codes = torch.nn.functional.pad(codes, (0, pad)).reshape(rows, -1, 3)
        packed = (codes[..., 0] + 6 * codes[..., 1] + 36 * codes[..., 2]).to(torch.uint8)
        return {"nm_values": values, "nm_codes": packed}, None

    def _validate(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        values, codes = pieces["nm_values"], pieces["nm_codes"]
        groups = cols // 4
        if (
            cols % 4
            or tuple(values.shape) != (rows, cols // 2)
            or tuple(codes.shape) != (rows, -(-groups // 3))
            or codes.dtype != torch.uint8
        ):
            raise CheckpointError(f"{where}: 2:4 pieces do not fit its shape ({rows}, {cols})")
        if codes.numel() and int(codes.max()) > _MAX_TRIPLE_CODE:
            raise CheckpointError(f"{where}: invalid 2:4 codes (corrupted file)")

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
        codes = pieces["nm_codes"].long()
        groups = cols // 4
        unpacked = torch.stack([codes % 6, (codes // 6) % 6, codes // 36], dim=2).reshape(rows, -1)[
            :, :groups
        ]
        idx = _CODE_PAIRS.to(values.device)[unpacked]
        out = torch.zeros(rows, groups, 4, dtype=dtype, device=values.device)
        storage_view(out).scatter_(2, idx, storage_view(values).reshape(rows, groups, 2))
        return out.reshape(rows, cols)


#: every layout a checkpoint may use, by the name its metadata records
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (TwoFourLayout(), BitmaskLayout())}
#: every piece name any layout stores
PIECES: tuple[str, ...] = tuple(
    dict.fromkeys(p for layout in LAYOUTS.values() for p in (*layout.own_pieces, "shape", "scale"))
)
_MIN_NUMEL = 256


def choose_layout(weight: torch.Tensor, value_dtype: torch.dtype | None) -> Layout | None:
    """The smallest layout that fits ``weight``, or None when it is not pruned or would not shrink."""
    if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() < _MIN_NUMEL:
        return None
    if int(count_true((storage_view(weight) != 0).reshape(1, -1))) == weight.numel():
        return None
    fitting = [layout for layout in LAYOUTS.values() if layout.fits(weight)]
    best = min(fitting, key=lambda layout: layout.nbytes(weight, value_dtype))
    if best.nbytes(weight, value_dtype) >= weight.numel() * weight.element_size():
        return None
    return best


def layout_of(pieces: Mapping[str, torch.Tensor], where: str = "weight") -> Layout:
    """The layout whose values piece is among ``pieces``.

    Raises:
        CheckpointError: no layout's values piece is present.
    """
    for layout in LAYOUTS.values():
        if layout.values_piece in pieces:
            return layout
    raise CheckpointError(f"{where}: no values piece ({[lay.values_piece for lay in LAYOUTS.values()]})")


def unpack_weight(
    pieces: Mapping[str, torch.Tensor], dtype: torch.dtype, *, check: bool = True, where: str = "weight"
) -> torch.Tensor:
    """Dense weight from its compressed pieces (keys as in :data:`PIECES`), on the pieces' device.

    This is the per-layer decompression: the checkpoint reader calls it once per tensor, the ComfyUI
    runtime once per forward (with ``check=False``, after validating at load).

    Raises:
        CheckpointError: (with ``check``) pieces that do not fit the shape, or invalid codes.
    """
    return layout_of(pieces, where).decode(pieces, dtype, check=check, where=where)
