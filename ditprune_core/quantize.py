"""Low-bit weights: group-wise quantisation of weight rows, bit-packed codes, storage cost, GPTQ.

Conventions (a weight is ``(rows, cols) = (out_features, in_features)``):

- **Codes.** ``bits`` b is 2, 3, 4 or 8 (:data:`SUPPORTED_BITS`; kept values of a pruned layer use
  8, 4 or 3, :data:`VALUE_BITS`). A code c is an unsigned integer in ``[0, 2**b - 1]``.
- **Groups** run along the input dimension, ``group_size`` G values each. Every group has a float16
  scale s and an integer zero point z in ``[0, 2**b - 1]``; a code decodes to ``s * (c - z)``,
  computed in float32 (then cast to the weight's dtype).
- **Symmetric** (``sym=True``): z is fixed at ``2**(b-1)`` and not stored; ``s = m / -2**(b-1)``
  where m is the group's value of largest magnitude, so m decodes exactly (code 0) and all ``2**b``
  levels are used (ggml's Q4_0 rule). **Asymmetric**: the range ``[min(x_min, 0), max(x_max, 0)]``
  is cut into ``2**b - 1`` steps, ``s = range / (2**b - 1)``, ``z = round(-min / s)``, stored in b
  bits (GPTQ's convention).
- **Clipped ranges** (``clip="mse"``): the range above is shrunk by each factor of
  :data:`CLIP_SHRINKS` (1.0 down to 0.5) and the group keeps the grid with the least squared
  rounding error (each value's square weighted, inside an OBS sweep, by the price of an error in
  its column); values beyond the shrunk range clamp to its ends. The stored pieces and the decode
  are the same as the range rule's.
- **Rounding** is ``torch.round`` (half to even). The scale is rounded to float16 *before* the codes
  are chosen, so the dequantised values are exactly what a file holds.
- **Ragged rows.** A row whose length is not a multiple of G ends with one shorter group (its own
  scale); nothing is padded or stored for the missing values. Any G >= 1 fits any row.
- **With a keep mask** (pruned weights), only kept values get codes, stored compacted in row-major
  order (the order of the bitmask layout's ``compressed`` values). ``grouping="kept"`` (default,
  measured better per bit: docs/bench/quant_groups.md): a group is G consecutive *kept* values of a
  row, the row's last group possibly shorter, so every scale serves G values whatever the sparsity.
  ``grouping="columns"``: a group is the dense column window ``[g G, (g+1) G)`` and its scale is fit
  on the kept values inside; every window has a scale, used or not.
- **Packing.** Codes (and stored zero points) are packed as a little-endian bit stream: code k
  occupies bits ``[k b, (k+1) b)``, bit j being bit ``j % 8`` of byte ``j // 8``. Codes go in words
  of ``L`` codes (2 bits: 4 codes in 1 byte, 3 bits: 8 in 3 bytes, 4 bits: 2 in 1 byte, 8 bits:
  1 in 1 byte); the last word is padded with zero codes.

What a layout stores of a quantised weight, and so its storage cost, is
:mod:`ditprune_core.layouts`' business (:func:`~ditprune_core.layouts.storage_cost`). The
column-by-column OBS quantiser (GPTQ) is
:func:`ditprune_core.obs.gptq_quantize`: one plug-in of the one OBS sweep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .util.dtypes import cast_saturating, storage_view

__all__ = [
    "CLIPS",
    "CLIP_SHRINKS",
    "DEFAULT_DENSE_SPECS",
    "DEFAULT_GROUP_SIZE",
    "DEFAULT_VALUE_SPECS",
    "GROUPINGS",
    "SUPPORTED_BITS",
    "VALUE_BITS",
    "WORDS",
    "QuantSpec",
    "QuantizationError",
    "QuantizedWeight",
    "check_weight",
    "count_groups",
    "dequantize_codes",
    "dequantize_weight",
    "fake_quantize",
    "fit_groups",
    "kept_per_row",
    "pack_codes",
    "packed_nbytes",
    "quantize_weight",
    "round_to_grid",
    "unpack_codes",
    "unpack_stream",
]

log = logging.getLogger("ditprune")

SUPPORTED_BITS = (2, 3, 4, 8)
#: Bit widths for the kept values of a pruned layer (2 bits is offered for dense baselines only).
VALUE_BITS = (3, 4, 8)
GROUPINGS = ("kept", "columns")
CLIPS = ("range", "mse")
#: the factors ``clip="mse"`` tries on a group's range (1.0 first: a tie keeps the full range)
CLIP_SHRINKS = tuple(1.0 - 0.025 * k for k in range(21))
#: bits -> (codes per word, bytes per word) of the packed stream
WORDS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 8: (1, 1)}
_PACK_CHUNK = 1 << 20  # words per packing step (bounded temporary memory)


class QuantizationError(ValueError):
    """Codes, scales or zero points that disagree with their shape, spec or each other."""


@dataclass(frozen=True)
class QuantSpec:
    """How weight values are quantised.

    Attributes:
        bits: code width, one of :data:`SUPPORTED_BITS`.
        group_size: values per scale along the input dimension (any positive size: a row's last
            group may be shorter).
        sym: symmetric (no stored zero point) or asymmetric (a ``bits``-bit zero point per group).
        grouping: with a keep mask, ``"kept"`` (groups of kept values) or ``"columns"`` (groups of
            dense column positions); see the module docstring. Ignored for dense weights.
        clip: how a group's scale is chosen: ``"range"`` (the group's range, the rule of the module
            docstring) or ``"mse"`` (the range shrunk by the factor of :data:`CLIP_SHRINKS` that
            gives the group the least squared rounding error; the range itself is one of them, so
            never worse). An encoder choice: the file format and the decode are the same, so it is
            not stored and two specs that differ only in it compare equal.
    """

    bits: int
    group_size: int = 64
    sym: bool = True
    grouping: str = "kept"
    clip: str = field(default="range", compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits must be one of {list(SUPPORTED_BITS)} (got {self.bits!r}); kept values of a "
                f"pruned layer use {list(VALUE_BITS)}"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {self.grouping!r}; choose from {list(GROUPINGS)}")
        if self.clip not in CLIPS:
            raise ValueError(f"unknown clip {self.clip!r}; choose from {list(CLIPS)}")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def group_width(self, cols: int) -> int:
        """Slots of one group in a row of ``cols`` values: ``group_size`` bounded by the row.

        Groups never span rows, so a group size above the row's length gives exactly the groups of
        a size equal to it; every grid is laid out with this width, so that memory follows the
        weight's size, never a (possibly crafted) group size.
        """
        return max(1, min(self.group_size, int(cols)))

    @property
    def sym_zero(self) -> int:
        """The fixed zero point of symmetric codes, ``2**(bits-1)``."""
        return 1 << (self.bits - 1)


#: the values one scale covers in the default specs (a ``value_spec`` may choose 64 or 32: more
#: scales, less error; docs/bench/frontier.md measures both)
DEFAULT_GROUP_SIZE = 128
#: Measured defaults for the kept values of a pruned layer (``value_bits``): groups of 128 kept
#: values; asymmetric at 8 and 4 bits, symmetric at 3 (docs/bench/quant_groups.md: lowest
#: error x 4^(bits/weight) on both MiniFlux models, at 50 % and 2:4).
DEFAULT_VALUE_SPECS = {
    8: QuantSpec(8, DEFAULT_GROUP_SIZE, sym=False),
    4: QuantSpec(4, DEFAULT_GROUP_SIZE, sym=False),
    3: QuantSpec(3, DEFAULT_GROUP_SIZE, sym=True),
}
#: Measured defaults for dense weights (round to nearest, GPTQ), same rule. All defaults keep each
#: group's range (``clip="range"``): the least-error clipped range lowered dense int3's held-out error
#: on miniflux-a and -b but raised it on miniflux-c, the test-bed it was confirmed on
#: (docs/bench/frontier.md, "Clipped ranges").
DEFAULT_DENSE_SPECS = {
    8: QuantSpec(8, DEFAULT_GROUP_SIZE, sym=False),
    4: QuantSpec(4, DEFAULT_GROUP_SIZE, sym=False),
    3: QuantSpec(3, DEFAULT_GROUP_SIZE, sym=True),
    2: QuantSpec(2, DEFAULT_GROUP_SIZE, sym=True),
}


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantised ``(rows, cols)`` weight (all tensors on one device).

    Attributes:
        codes: uint8 codes, ``(rows, cols)`` for a dense weight, ``(kept,)`` (the kept values in
            row-major order) with a keep mask.
        scales: float16 ``(n_groups,)``, groups in row-major order (a row's groups in order).
        zeros: uint8 ``(n_groups,)`` zero points, or None for symmetric codes.
        shape: ``(rows, cols)`` of the weight.
        spec: the :class:`QuantSpec` it was made with.
        keep: bool ``(rows, cols)`` keep mask, or None for a dense weight.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int]
    spec: QuantSpec
    keep: torch.Tensor | None = None

    def validate(self, where: str = "weight") -> None:
        """Check that the pieces fit each other; raises :class:`QuantizationError` naming ``where``."""
        rows, cols = self.shape
        spec = self.spec
        if self.keep is not None:
            if self.keep.dtype != torch.bool or tuple(self.keep.shape) != (rows, cols):
                raise QuantizationError(
                    f"{where}: keep mask of shape {tuple(self.keep.shape)} and dtype {self.keep.dtype} does "
                    f"not fit the weight's shape ({rows}, {cols}); expected a bool ({rows}, {cols}) mask"
                )
            expected_codes: tuple[int, ...] = (int(self.keep.sum()),)
        else:
            expected_codes = (rows, cols)
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != expected_codes:
            raise QuantizationError(
                f"{where}: codes of shape {tuple(self.codes.shape)} and dtype {self.codes.dtype} do not fit "
                f"a ({rows}, {cols}) weight (expected uint8 {expected_codes})"
            )
        if self.codes.numel() and int(self.codes.max()) > spec.max_code:
            raise QuantizationError(
                f"{where}: a code is {int(self.codes.max())}, above the {spec.bits}-bit maximum "
                f"{spec.max_code} (corrupted codes or wrong bits)"
            )
        n_groups = _n_groups(self.shape, spec, self.keep)
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != (n_groups,):
            raise QuantizationError(
                f"{where}: scales of shape {tuple(self.scales.shape)} and dtype {self.scales.dtype} do not "
                f"fit: {n_groups} groups of {spec.group_size} (grouping {spec.grouping!r}) need float16 "
                f"({n_groups},)"
            )
        if not bool(torch.isfinite(self.scales).all()):
            raise QuantizationError(f"{where}: scales hold inf or NaN (corrupted file?)")
        if spec.sym:
            if self.zeros is not None:
                raise QuantizationError(f"{where}: symmetric codes store no zero points, but some are given")
        else:
            zeros = self.zeros
            if zeros is None or zeros.dtype != torch.uint8 or tuple(zeros.shape) != (n_groups,):
                got = "none" if zeros is None else f"{tuple(zeros.shape)} {zeros.dtype}"
                raise QuantizationError(
                    f"{where}: asymmetric codes need uint8 zero points ({n_groups},), got {got}"
                )
            if zeros.numel() and int(zeros.max()) > spec.max_code:
                raise QuantizationError(
                    f"{where}: a zero point is {int(zeros.max())}, above the {spec.bits}-bit maximum"
                )

    @property
    def n_groups(self) -> int:
        return int(self.scales.numel())


# ---------------------------------------------------------------------------------------------------
# group layout


def kept_per_row(keep: torch.Tensor) -> torch.Tensor:
    """Kept values of each row: bool (rows, cols) -> int64 (rows,)."""
    return keep.sum(dim=1, dtype=torch.int64)


def _groups_per_row(shape: tuple[int, int], spec: QuantSpec, counts: torch.Tensor | None) -> torch.Tensor:
    rows, cols = shape
    g = spec.group_width(cols)
    if counts is None or spec.grouping == "columns":
        return torch.full((rows,), -(-cols // g), dtype=torch.int64)
    return (counts + g - 1) // g


def _n_groups(shape: tuple[int, int], spec: QuantSpec, keep: torch.Tensor | None) -> int:
    """Groups of a weight: ``keep`` a bool (rows, cols) keep mask, (rows,) kept counts, or None."""
    rows, cols = shape
    if keep is None or spec.grouping == "columns":
        return rows * -(-cols // spec.group_width(cols))
    counts = kept_per_row(keep) if keep.dtype == torch.bool else keep.to(torch.int64)
    return int(_groups_per_row(shape, spec, counts).sum())


def count_groups(shape: tuple[int, int], spec: QuantSpec, keep: torch.Tensor | None = None) -> int:
    """Groups (scales) of a (rows, cols) weight quantised with ``spec`` (only its kept values with a
    bool (rows, cols) ``keep``, or given (rows,) kept counts): the length of
    :attr:`QuantizedWeight.scales`."""
    return _n_groups((int(shape[0]), int(shape[1])), spec, keep)


def _group_slots(
    shape: tuple[int, int], spec: QuantSpec, keep: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Which slots of the (n_groups, G) group grid hold a value; None when all of them do.

    The grid's valid slots, read row-major, are the stored values in storage order.
    """
    rows, cols = shape
    g = spec.group_width(cols)
    per_row = -(-cols // g)
    if keep is None or spec.grouping == "columns":
        if keep is None and cols % g == 0:
            return None
        valid = torch.ones(rows, cols, dtype=torch.bool, device=device) if keep is None else keep
        valid = torch.nn.functional.pad(valid, (0, per_row * g - cols), value=False)
        return valid.reshape(rows * per_row, g)
    counts = kept_per_row(keep).to(device)
    if bool((counts % g == 0).all()):  # every group full (2:4 rows, say): the grid is the values
        return None
    groups = _groups_per_row(shape, spec, counts)
    total = int(groups.sum())
    row_of_group = torch.repeat_interleave(torch.arange(rows, device=device), groups)
    first = torch.cumsum(groups, 0) - groups
    index_in_row = torch.arange(total, device=device) - first[row_of_group]
    filled = (counts[row_of_group] - index_in_row * g).clamp(max=g)
    return torch.arange(g, device=device)[None, :] < filled[:, None]


def _to_grid(values: torch.Tensor, slots: torch.Tensor | None, n_groups: int, g: int) -> torch.Tensor:
    """Stored-order values (n,) -> (n_groups, G) grid (zeros in empty slots)."""
    if slots is None:
        return values.reshape(n_groups, g)
    grid = torch.zeros(n_groups, g, dtype=values.dtype, device=values.device)
    return grid.masked_scatter_(slots, values)


def _from_grid(grid: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    return grid.reshape(-1) if slots is None else grid[slots]


# ---------------------------------------------------------------------------------------------------
# round to nearest


def _grid_of(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16) and zero point (int64) of groups whose values span ``[lo, hi]``."""
    if spec.sym:
        peak = torch.where(-lo > hi, lo, hi)  # the value of largest magnitude (the larger on a tie)
        scale = (peak / -spec.sym_zero).to(torch.float16)
        zero = torch.full_like(peak, spec.sym_zero, dtype=torch.int64)
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / spec.max_code).to(torch.float16)
        safe = torch.where(scale == 0, 1.0, scale.float())
        zero = torch.round(-lo / safe).clamp(0, spec.max_code).to(torch.int64)
    return scale, zero


def _fit_groups(
    grid: torch.Tensor,
    slots: torch.Tensor | None,
    spec: QuantSpec,
    where: str = "weight",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16) and zero point (int64) of every row of a (n_groups, G) float32 grid."""
    if slots is None:
        hi, lo = grid.amax(dim=1), grid.amin(dim=1)
    else:
        hi = torch.where(slots, grid, -torch.inf).amax(dim=1)
        lo = torch.where(slots, grid, torch.inf).amin(dim=1)
        empty = ~slots.any(dim=1)
        hi, lo = hi.masked_fill(empty, 0.0), lo.masked_fill(empty, 0.0)
    scale, zero = _grid_of(lo, hi, spec)
    if not bool(torch.isfinite(scale).all()):
        raise QuantizationError(
            f"{where}: weights beyond float16 range ({float(grid.abs().max()):.3g}); group scales are "
            "float16: rescale the layer or keep it unquantised"
        )
    if spec.clip == "mse" and grid.numel():
        best = _rounding_error(grid, slots, scale, zero, spec, weights)
        for shrink in CLIP_SHRINKS[1:]:
            s, z = _grid_of(lo * shrink, hi * shrink, spec)
            err = _rounding_error(grid, slots, s, z, spec, weights)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _rounding_error(
    grid: torch.Tensor,
    slots: torch.Tensor | None,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared rounding error of each group (row of ``grid``) on the grid ``(scale, zero)``, each
    value's square times its weight (``weights`` broadcast to ``grid``; None: 1)."""
    diff = dequantize_codes(_encode(grid, scale, zero, spec), scale[:, None], zero[:, None]).sub_(grid)
    if slots is not None:
        diff = diff.masked_fill_(~slots, 0.0)
    diff = diff.square_()
    if weights is not None:
        diff = diff.mul_(weights)
    return diff.sum(dim=1)


def _encode(grid: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """int64 codes of a (n_groups, G) grid for the given scales and zero points."""
    s = scale.float()
    safe = torch.where(s == 0, 1.0, s)[:, None]
    return (torch.round(grid / safe) + zero[:, None]).clamp_(0, spec.max_code).to(torch.int64)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scale * (codes - zero)`` in float32, cast to ``dtype``: the one decode of codes, which the
    file reader (:mod:`~ditprune_core.layouts`), the runtime and :func:`dequantize_weight` share.

    ``scale * code - scale * zero`` is that value exactly: a float16 scale times an integer below
    256 needs at most 19 significant bits, so both products and their difference are exact in
    float32, and ``x - x`` is +0.0 (a zero code never decodes to -0.0). The cast to a narrower
    ``dtype`` clamps to its range (:func:`~ditprune_core.util.dtypes.cast_saturating`).

    Args:
        codes: integer codes, any shape; ``scale`` (float16 or float32) and ``zero`` broadcast to it.
    """
    s = scale.float()
    offset = s * zero if isinstance(zero, int) else s * zero.float()
    return cast_saturating(codes.float().mul_(s).sub_(offset), dtype)


def fit_groups(
    groups: torch.Tensor,
    spec: QuantSpec,
    *,
    valid: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    where: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every group, by the rule of :func:`quantize_weight`.

    For column-wise quantisers (GPTQ, joint OBS pruning + quantisation) that fit a group's grid on
    its current, updated values when they reach its first column.

    Args:
        groups: (n_groups, G) float values (any G; a ragged group is a shorter ``valid`` row).
        spec: bits and symmetry (group size and grouping are the caller's business here).
        valid: optional bool (n_groups, G): which entries belong to their group (kept values).
        weights: optional non-negative (n_groups, G) weight of each value's squared rounding error
            in ``clip="mse"``'s search (an OBS sweep passes each column's ``1 / U_jj**2``, the
            price of an error there); ignored for ``clip="range"``.
    Returns:
        ``(scale, zero)``: float16 (n_groups,) and int64 (n_groups,) (``2**(bits-1)`` if symmetric).
    """
    return _fit_groups(groups.float(), valid, spec, where, None if weights is None else weights.float())


def round_to_grid(
    values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round (n_groups, k) values to their group's grid: ``(codes uint8, dequantised float32)``.

    ``scale`` and ``zero`` are (n_groups,) from :func:`fit_groups`; the dequantised values are
    exactly what :func:`dequantize_weight` decodes from the codes.
    """
    codes = _encode(values.float(), scale, zero, spec)
    return codes.to(torch.uint8), dequantize_codes(codes, scale[:, None], zero[:, None])


def check_weight(weight: torch.Tensor, keep: torch.Tensor | None, where: str) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"{where}: expected a 2-D floating-point weight (out_features, in_features), got shape "
            f"{tuple(weight.shape)} and dtype {weight.dtype}"
        )
    if keep is not None and (keep.dtype != torch.bool or keep.shape != weight.shape):
        raise ValueError(
            f"{where}: keep mask of shape {tuple(keep.shape)} and dtype {keep.dtype} does not fit the "
            f"weight's shape {tuple(weight.shape)}; pass a bool mask of the weight's shape"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}: the weight holds inf or NaN; it cannot be quantised")


def quantize_weight(
    weight: torch.Tensor, spec: QuantSpec, *, keep: torch.Tensor | None = None, where: str = "weight"
) -> QuantizedWeight:
    """Round-to-nearest group quantisation of a weight (only its kept values, with ``keep``).

    Args:
        weight: (rows, cols) floating-point weight, any device.
        spec: bits, group size, symmetry and (with ``keep``) grouping.
        keep: optional bool (rows, cols) keep mask; pruned positions get no code.
        where: the layer's name, for error messages.
    Returns:
        a :class:`QuantizedWeight`; :func:`dequantize_weight` gives the values a file would hold.
    """
    check_weight(weight, keep, where)
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    w = weight.detach().float()
    slots = _group_slots(shape, spec, keep, w.device)
    n_groups = _n_groups(shape, spec, keep)
    values = w.reshape(-1) if keep is None else w[keep]
    grid = _to_grid(values, slots, n_groups, spec.group_width(shape[1]))
    scale, zero = _fit_groups(grid, slots, spec, where)
    codes = _from_grid(_encode(grid, scale, zero, spec), slots).to(torch.uint8)
    if keep is None:
        codes = codes.reshape(shape)
    zeros = None if spec.sym else zero.to(torch.uint8)
    return QuantizedWeight(codes, scale, zeros, shape, spec, None if keep is None else keep.clone())


def dequantize_weight(
    q: QuantizedWeight, dtype: torch.dtype = torch.float32, *, check: bool = True, where: str = "weight"
) -> torch.Tensor:
    """(rows, cols) weight decoded from codes (zeros at pruned positions), on the codes' device.

    Raises:
        QuantizationError: (with ``check``) pieces that disagree with the shape or spec.
    """
    if check:
        q.validate(where)
    rows, cols = q.shape
    spec = q.spec
    device = q.codes.device
    slots = _group_slots(q.shape, spec, q.keep, device)
    zero: torch.Tensor | int = spec.sym_zero if q.zeros is None else q.zeros
    flat = q.codes.reshape(-1)
    g = spec.group_width(cols)
    if slots is None:
        grid = flat.reshape(q.n_groups, g)
    else:
        grid = torch.zeros(q.n_groups, g, dtype=torch.uint8, device=device)
        grid.masked_scatter_(slots, flat)
    z = zero if isinstance(zero, int) else zero[:, None]
    values = _from_grid(dequantize_codes(grid, q.scales[:, None], z), slots)
    if q.keep is None:
        return cast_saturating(values.reshape(rows, cols), dtype)
    out = torch.zeros(rows, cols, dtype=dtype, device=device)
    # on the bytes: fp8 has no masked_scatter (and its zero is the zero byte)
    storage_view(out).masked_scatter_(q.keep.to(device), storage_view(cast_saturating(values, dtype)))
    return out


def fake_quantize(
    weight: torch.Tensor, spec: QuantSpec, *, keep: torch.Tensor | None = None, where: str = "weight"
) -> torch.Tensor:
    """The weight a file quantised with ``spec`` holds, in the weight's dtype (pruned positions 0)."""
    return dequantize_weight(quantize_weight(weight, spec, keep=keep, where=where), weight.dtype, check=False)


# ---------------------------------------------------------------------------------------------------
# packing


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` packed ``bits``-bit codes (whole words, see the module docstring)."""
    if bits not in WORDS:
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {bits!r}")
    per_word, word_bytes = WORDS[bits]
    return -(-count // per_word) * word_bytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (any shape, read row-major) into a uint8 stream of :func:`packed_nbytes` bytes."""
    if bits not in WORDS:
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {bits!r}")
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {flat.dtype}")
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise ValueError(f"a code is {int(flat.max())}, which does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    per_word, word_bytes = WORDS[bits]
    n = flat.numel()
    flat = torch.nn.functional.pad(flat, (0, (-n) % per_word))
    words = flat.reshape(-1, per_word)
    out = torch.empty(words.shape[0], word_bytes, dtype=torch.uint8, device=flat.device)
    shifts = torch.arange(per_word, device=flat.device, dtype=torch.int32) * bits
    byte_shifts = torch.arange(word_bytes, device=flat.device, dtype=torch.int32) * 8
    for start in range(0, words.shape[0], _PACK_CHUNK):
        chunk = words[start : start + _PACK_CHUNK].to(torch.int32)
        word = (chunk << shifts).sum(dim=1, dtype=torch.int32)
        out[start : start + _PACK_CHUNK] = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, count: int, *, where: str = "codes") -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 stream -> ``count`` uint8 codes.

    Raises:
        QuantizationError: a stream of the wrong size or dtype for ``count`` codes, or with set
            padding bits (a corrupted file).
    """
    if bits not in WORDS:
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {bits!r}")
    expected = packed_nbytes(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise QuantizationError(
            f"{where}: packed codes of shape {tuple(packed.shape)} and dtype {packed.dtype} do not hold "
            f"{count} {bits}-bit codes (expected uint8 ({expected},))"
        )
    if bits == 8:
        return packed.clone()
    per_word, word_bytes = WORDS[bits]
    words = packed.reshape(-1, word_bytes)
    out = torch.empty(words.shape[0], per_word, dtype=torch.uint8, device=packed.device)
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    byte_shifts = torch.arange(word_bytes, device=packed.device, dtype=torch.int32) * 8
    mask = (1 << bits) - 1
    for start in range(0, words.shape[0], _PACK_CHUNK):
        chunk = words[start : start + _PACK_CHUNK].to(torch.int32)
        word = (chunk << byte_shifts).sum(dim=1, dtype=torch.int32)
        out[start : start + _PACK_CHUNK] = ((word[:, None] >> shifts) & mask).to(torch.uint8)
    flat = out.reshape(-1)
    if bool(flat[count:].any()):
        raise QuantizationError(f"{where}: padding bits after the last of {count} codes are set (corrupted)")
    return flat[:count]


def unpack_stream(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Every code of a packed stream, the last word's padding included: uint8, a few vectorised
    byte operations and no checks (the readers' fast unpacking, after :func:`unpack_codes`, the
    checked reference, has validated the stream, or where it is trusted)."""
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
