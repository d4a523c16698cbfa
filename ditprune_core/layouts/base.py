"""The :class:`Layout` base: where a compressed weight's values go, composed with a value codec
(:mod:`.values`) that says how they are stored. One subclass per layout: :mod:`.bitmask`,
:mod:`.two_four`, :mod:`.dense`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from ..errors import CheckpointError
from ..quantize import QuantizedWeight, QuantSpec, count_groups, kept_per_row
from .values import Fp8Values, PieceSpec, QuantValues, piece_nbytes, value_codec_of

__all__ = ["Layout"]


class Layout(ABC):
    """One compressed layout: which positions hold a value (the mask pieces) and where the values of
    each kind go. Every layout also stores ``shape`` (int64 [rows, cols])."""

    name: str = ""
    #: the piece that holds unquantised values (fp8-coded when the file has fp8 values)
    values_piece: str = ""
    #: the layout's own pieces with unquantised values, besides ``shape`` and ``scale``
    own_pieces: tuple[str, ...] = ()
    #: the pieces that say where the values go (with quantised values, the only ones besides them)
    mask_pieces: tuple[str, ...] = ()

    # ---- what a layout defines -------------------------------------------------------------------
    @abstractmethod
    def fits(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` (2-D, zeros where pruned) can be stored in this layout."""

    @abstractmethod
    def fits_keep(self, keep: torch.Tensor | None, shape: tuple[int, int]) -> bool:
        """Whether a (rows, cols) weight with bool keep mask ``keep`` (None: every weight kept) can
        be stored here with quantised values."""

    @abstractmethod
    def per_row(self, cols: int) -> int | None:
        """Values in every row when all rows hold as many (2:4, dense); None: each its own (bitmask)."""

    @abstractmethod
    def own_specs(
        self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype
    ) -> dict[str, PieceSpec]:
        """The own pieces' (shape, dtype) for ``n_values`` stored unquantised values."""

    @abstractmethod
    def mask_specs(self, rows: int, cols: int) -> dict[str, PieceSpec]:
        """The mask pieces' (shape, dtype)."""

    @abstractmethod
    def encode_own(self, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The own pieces of CPU weight ``w`` (zeros where pruned), values in its dtype included;
        and the row of each value (None: the values piece is (rows, k))."""

    @abstractmethod
    def mask_of_keep(self, keep: torch.Tensor | None, rows: int, cols: int) -> dict[str, torch.Tensor]:
        """The mask pieces of a bool (rows, cols) keep mask (None: every weight kept)."""

    @abstractmethod
    def check_values(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        """Check the own pieces (unquantised values) against the shape and each other."""

    @abstractmethod
    def check_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, where: str) -> None:
        """Check the mask pieces against the shape."""

    @abstractmethod
    def keep_of_mask(self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int) -> torch.Tensor | None:
        """The bool (rows, cols) positions of the stored values; None: every position."""

    @abstractmethod
    def place(
        self, pieces: Mapping[str, torch.Tensor], rows: int, cols: int, values: torch.Tensor
    ) -> torch.Tensor:
        """The dense (rows, cols) weight, in ``values``' dtype, from the stored values in row-major
        order (zeros where pruned)."""

    def stored_count(self, weight: torch.Tensor) -> int:
        """How many values of ``weight`` this layout stores (every one, unless overridden)."""
        return int(weight.numel())

    # ---- sizes -----------------------------------------------------------------------------------
    def piece_specs(self, weight: torch.Tensor, value_dtype: torch.dtype | None) -> dict[str, PieceSpec]:
        """Every piece's (shape, dtype), without encoding: what the writer announces up front."""
        rows, cols = int(weight.shape[0]), int(weight.shape[1])
        n_values = self.stored_count(weight)
        return self.value_piece_specs(
            rows, cols, n_values, value_dtype or weight.dtype, scaled=value_dtype is not None
        )

    def value_piece_specs(
        self, rows: int, cols: int, n_values: int, value_dtype: torch.dtype, *, scaled: bool
    ) -> dict[str, PieceSpec]:
        """Every piece's (shape, dtype) for ``n_values`` stored unquantised values of a (rows, cols)
        weight in ``value_dtype``; ``scaled``: with the float32 per-row scale of fp8 values."""
        specs = self.own_specs(rows, cols, n_values, value_dtype)
        specs["shape"] = ((2,), torch.int64)
        if scaled:
            specs["scale"] = ((rows,), torch.float32)
        return specs

    def nbytes(self, weight: torch.Tensor, value_dtype: torch.dtype | None) -> int:
        """Bytes this layout stores for ``weight``."""
        return sum(piece_nbytes(s) for s in self.piece_specs(weight, value_dtype).values())

    def quantized_piece_specs(
        self, shape: tuple[int, int], spec: QuantSpec, keep: torch.Tensor | None
    ) -> dict[str, PieceSpec]:
        """Every piece's (shape, dtype) for a weight quantised with ``spec``, without quantising it:
        the kept values of a bool (rows, cols) ``keep``, or of (rows,) kept counts per row; None:
        every value."""
        rows, cols = int(shape[0]), int(shape[1])
        counts = None if keep is None else (kept_per_row(keep) if keep.dtype == torch.bool else keep)
        n_values = rows * cols if counts is None else int(counts.sum())
        specs = self.mask_specs(rows, cols)
        specs.update(QuantValues(spec).piece_specs(n_values, count_groups((rows, cols), spec, counts)))
        specs["shape"] = ((2,), torch.int64)
        return specs

    def quantized_nbytes(self, shape: tuple[int, int], spec: QuantSpec, keep: torch.Tensor | None) -> int:
        """Bytes this layout stores for a weight quantised with ``spec``."""
        return sum(piece_nbytes(s) for s in self.quantized_piece_specs(shape, spec, keep).values())

    # ---- encode, validate, decode ----------------------------------------------------------------
    def encode(
        self, weight: torch.Tensor, values: Fp8Values | None = None, where: str = "weight"
    ) -> tuple[dict[str, torch.Tensor], float]:
        """``(pieces, fp8 max relative error)`` of ``weight`` (any device; encoded on the CPU)."""
        w = weight.detach().cpu()
        rows, cols = w.shape
        pieces, value_rows = self.encode_own(w)
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
        pieces = self.mask_of_keep(keep, rows, cols)
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
        codec = value_codec_of(pieces)
        missing = [p for p in ("shape", *codec.required_pieces(self)) if p not in pieces]
        if missing:
            raise CheckpointError(f"{where}: {self.name} weight has no {sorted(set(missing))} piece(s)")
        shape = pieces["shape"]
        if shape.dtype != torch.int64 or tuple(shape.shape) != (2,) or bool((shape < 0).any()):
            raise CheckpointError(f"{where}: its 'shape' piece must be two non-negative int64 values")
        rows, cols = (int(x) for x in shape.tolist())
        codec.check(self, pieces, rows, cols, where)
        return rows, cols

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
        return value_codec_of(pieces).decode(self, pieces, rows, cols, dtype)
