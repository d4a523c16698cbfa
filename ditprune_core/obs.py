"""The OBS column sweep: one loop for pruning, quantising, and both at once.

Pruning (SparseGPT: Frantar & Alistarh 2023) and quantisation (GPTQ: Frantar et al. 2022) of a
Linear layer ``y = W x`` with input Gram ``H`` are the same algorithm: dampen ``H``, take the upper
Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), and walk the columns left to right in lazy blocks.
Each column ``j`` takes a new value ``q`` (its pruned entries zero, its kept entries rounded to a
grid, or both), and its error ``(w_j - q) / U_jj`` is spread over the columns to its right
(``err × U_j,j:``): within the block at once, right of the block once per block. Only how ``q`` is
chosen differs, so :func:`obs_sweep` is the loop and a :class:`ColumnRule` the choice:

- :class:`PruneColumns`: a fixed mask, or a mask chosen inside the sweep a block of columns at a
  time (unstructured, exact counts) or ``m`` columns at a time (N:M). :func:`obs_prune`.
- :class:`RoundKept`: the kept values of a fixed mask rounded to their group's grid, the grids fit
  lazily when the sweep reaches a group (GPTQ's rule) or once before it. :func:`obs_quantize`.
- :class:`RoundDense`: every value of a dense weight rounded, groups of columns. :func:`gptq_quantize`.

Also here, because every sweep needs them: :func:`dampened`, :func:`cholesky_inverse_upper` (the
one factorisation, with the one retry policy) and :func:`relative_output_error` (the one measure of
a layer's error on its Gram).

All maths runs in float32 on the weight's device, unless a caller asks for float64 factorisation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch

from .quantize import (
    QuantizedWeight,
    QuantSpec,
    check_weight,
    fit_groups,
    kept_per_row,
    quantize_weight,
    round_to_grid,
)
from .stats import CalibrationError, check_gram
from .util.selection import prune_lowest

__all__ = [
    "GRANULARITIES",
    "QUANT_GRIDS",
    "ColumnRule",
    "ObsResult",
    "PruneColumns",
    "RoundDense",
    "RoundKept",
    "cholesky_inverse_upper",
    "dampened",
    "gptq_quantize",
    "obs_prune",
    "obs_quantize",
    "obs_sweep",
    "relative_output_error",
    "shrunk",
    "sparsegpt_prune",
]

log = logging.getLogger("ditprune")

GRANULARITIES = ("layer", "row", "cluster")
#: how :func:`obs_quantize` fits each group's scale and zero point: ``"lazy"`` when the pass reaches
#: the group's first kept value, on the values as updated so far (GPTQ's rule); ``"static"`` once,
#: before the pass, on the starting weight's kept values
QUANT_GRIDS = ("lazy", "static")
MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# the factorisation and the error measure


def dampened(gram: torch.Tensor, damp: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` in ``dtype`` (a new tensor); ``damp`` is relative.

    A Gram whose diagonal is all zero (the layer only ever saw zeros) becomes ``damp · I``, so that
    the pruning falls back to magnitude order instead of failing. Dead input channels (zero
    diagonal entries) get ``damp · mean(diag H)`` and so become positive definite.
    """
    h = gram.to(dtype, copy=True)
    scale = float(h.diagonal().mean())
    if not scale > 0:
        scale = 1.0
    h.diagonal().add_(damp * scale)
    return h


def shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - α) H + α · diag(H)``: the Gram's off-diagonal correlations shrunk by ``α``, its
    diagonal (each input's mean square) kept; ``gram`` itself when ``α`` is 0.

    A Gram measured on a few prompts holds correlations between inputs that other prompts need not
    share. OBS and the refit spend the update along them, so the fit is tight on those prompts and
    looser on others; shrinking toward the diagonal (Ledoit-Wolf style, toward the diagonal rather
    than the identity, so that each input keeps its scale) trades a little of that fit for an
    update that holds on prompts the calibration never saw (``ReconstructParams.shrink``).

    Raises:
        ValueError: ``alpha`` is outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Gram shrinkage must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return gram
    out = gram * (1.0 - alpha)
    out.diagonal().copy_(gram.diagonal())
    return out


def cholesky_inverse_upper(h: torch.Tensor, name: str, damp: float, *, retries: int = 8) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``) in ``h``'s dtype, for an already
    dampened ``h`` (:func:`dampened`); if ``h`` is not positive definite, more damping is added
    (``damp``, then 10x more each try, relative to its mean diagonal) and a warning says how much.

    Raises:
        CalibrationError: still not positive definite after ``retries`` tries (naming the layer).
    """
    extra = 0.0
    scale = float(h.diagonal().mean()) or 1.0
    for _attempt in range(retries):
        hd = h if extra == 0 else h + extra * scale * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                if extra:
                    log.warning("Gram of %r was not positive definite: damping raised by %g", name, extra)
                return u
        extra = max(10 * extra, damp, 1e-6)
    raise CalibrationError(
        f"Gram of {name!r} is not positive definite even with damping {extra:g}: its inputs are "
        "degenerate; exclude the layer or calibrate it on more data"
    )


def relative_output_error(new_weight: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W H Wᵀ)``, ``Δ = W' - W``: relative squared output error on the Gram.

    0.0 when nothing changed, inf when the layer's output is zero on the Gram but ``W'`` differs.

    Args:
        new_weight: (out, in) pruned/updated/quantised weight ``W'``.
        weight: (out, in) original weight ``W``.
        gram: (in, in) input Gram ``H``.
    """
    h = gram.to(weight.device, torch.float64)
    w = weight.detach().to(torch.float64)
    delta = new_weight.detach().to(weight.device, torch.float64) - w
    num = float(((delta @ h) * delta).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# ---------------------------------------------------------------------------------------------------
# the sweep


class ColumnRule(Protocol):
    """What a sweep does with each column: the value the column takes; state per lazy block."""

    def begin_block(self, i1: int, i2: int, w1: torch.Tensor, d: torch.Tensor) -> None:
        """Columns ``[i1, i2)`` start: ``w1`` (out, i2 - i1) their current values, ``d`` U's diagonal."""

    def column(self, i: int, w1: torch.Tensor, err1: torch.Tensor) -> torch.Tensor:
        """The new value (out,) float32 of column ``i1 + i``; ``err1`` holds the block's errors so far."""
        ...

    def end_block(self, i1: int, i2: int) -> None:
        """Columns ``[i1, i2)`` are final (the sweep has written them and updated the rest)."""


def obs_sweep(w: torch.Tensor, u: torch.Tensor, blocksize: int, rule: ColumnRule) -> None:
    """The OBS column sweep over float32 ``w`` (out, in), in place: every column takes the value
    ``rule`` gives it, and its error divided by ``U_jj`` is spread over the columns to its right.

    Args:
        w: (out, in) float32 weight; on return each column holds its new value.
        u: (in, in) upper Cholesky factor of ``H⁻¹`` (:func:`cholesky_inverse_upper`), float32.
        blocksize: columns per lazy-update block.
        rule: the :class:`ColumnRule`.
    """
    in_f = w.shape[1]
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        err1 = torch.zeros_like(w1)
        rule.begin_block(i1, i2, w1, d)
        for i in range(i2 - i1):
            q = rule.column(i, w1, err1)
            col = w1[:, i]
            e = (col - q) / d[i]
            w1[:, i:].sub_(e.unsqueeze(1) * u1[i, i:].unsqueeze(0))
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        if i2 < in_f:
            w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
        rule.end_block(i1, i2)


def _check_layer(weight: torch.Tensor, gram: torch.Tensor, blocksize: int, damp: float, name: str) -> None:
    check_gram(gram, name)
    in_f = weight.shape[1]
    if gram.shape[0] != in_f:
        raise ValueError(f"Gram of {name!r} is {gram.shape[0]}x{gram.shape[0]}, the layer has {in_f} inputs")
    if blocksize < 1 or not damp >= 0:  # also refuses a NaN damp
        raise ValueError(f"blocksize must be >= 1 and damp >= 0, got {blocksize} and {damp}")


# ---------------------------------------------------------------------------------------------------
# plug-in 1: the mask


class ObsResult(NamedTuple):
    """What :func:`obs_prune` returns: the updated weight (out, in) and its keep-mask (out, in) bool."""

    weight: torch.Tensor
    keep_mask: torch.Tensor


def _split_counts(total: torch.Tensor, starts: Sequence[int], n: int) -> list[torch.Tensor]:
    """Split per-group totals over column blocks by cumulative rounding (sums exactly to ``total``)."""
    t = total.to(torch.float64)
    edges = [*starts, n]
    cum = [torch.round(t * e / n).to(torch.int64) for e in edges]
    return [cum[i + 1] - cum[i] for i in range(len(starts))]


def _parse_nm(pattern: tuple[int, int] | str | None) -> tuple[int, int] | None:
    if pattern is None or pattern == "unstructured":
        return None
    if isinstance(pattern, str):
        try:
            n, m = (int(p) for p in pattern.split(":"))
        except ValueError as exc:
            raise ValueError(
                f"unknown sparsity pattern {pattern!r}; use 'unstructured', '2:4' or '4:8'"
            ) from exc
        return n, m
    return int(pattern[0]), int(pattern[1])


def _saliency(w: torch.Tensor, d: torch.Tensor, balance: float) -> torch.Tensor:
    """``log`` of ``(w²)^(1-β) (1/d²)^β`` (same order, no overflow): (out, c) from w (out, c), d (c,)."""
    return (1.0 - balance) * w.pow(2).clamp_min(1e-38).log() - (2.0 * balance) * d.abs().clamp_min(
        1e-38
    ).log()


def _select_block(
    w1: torch.Tensor,
    d: torch.Tensor,
    balance: float,
    granularity: str,
    counts: torch.Tensor,
    row_groups: torch.Tensor | None,
) -> torch.Tensor:
    """Keep-mask (out, c) of one block: exactly ``counts[g]`` lowest saliencies pruned per group."""
    sal = _saliency(w1, d, balance)
    if granularity == "layer":
        return prune_lowest(sal.reshape(1, -1), counts).reshape(sal.shape)
    if granularity == "row":
        return prune_lowest(sal, counts)
    if row_groups is None:  # cannot happen: obs_prune checks it
        raise ValueError("granularity 'cluster' needs row_groups")
    keep = torch.ones_like(sal, dtype=torch.bool)
    groups = row_groups.to(sal.device)
    for g, count in enumerate(counts.tolist()):
        rows = (groups == g).nonzero().squeeze(1)
        if rows.numel() and count:
            sub = sal.index_select(0, rows)
            keep[rows] = prune_lowest(sub.reshape(1, -1), torch.tensor([count])).reshape(sub.shape)
    return keep


class PruneColumns:
    """Plug-in: each column's pruned entries become zero; the mask is fixed, or chosen in the sweep.

    Exactly one of ``fixed_prune`` (out, in) bool, ``nm`` ``(n, m)``, or ``block_counts`` (each
    block's per-group prune counts, with ``granularity`` and, for clusters, ``row_groups``).
    ``keep`` (out, in) bool holds the mask after the sweep.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        device: torch.device,
        *,
        fixed_prune: torch.Tensor | None = None,
        nm: tuple[int, int] | None = None,
        block_counts: list[torch.Tensor] | None = None,
        balance: float = 0.5,
        granularity: str = "layer",
        row_groups: torch.Tensor | None = None,
    ) -> None:
        self.fixed_prune, self.nm, self.block_counts = fixed_prune, nm, block_counts
        self.balance, self.granularity, self.row_groups = balance, granularity, row_groups
        self.keep = torch.ones(shape, dtype=torch.bool, device=device)
        self._block = 0
        self._prune1 = torch.empty(0, dtype=torch.bool)
        self._d = torch.empty(0)

    def begin_block(self, i1: int, i2: int, w1: torch.Tensor, d: torch.Tensor) -> None:
        self._d = d
        if self.fixed_prune is not None:
            self._prune1 = self.fixed_prune[:, i1:i2]
        elif self.nm is None:
            if self.block_counts is None:  # cannot happen: obs_prune sets one of the three
                raise ValueError("PruneColumns needs a fixed mask, an N:M pattern or block counts")
            counts = self.block_counts[self._block]
            self._prune1 = ~_select_block(w1, d, self.balance, self.granularity, counts, self.row_groups)
        else:
            self._prune1 = torch.zeros_like(w1, dtype=torch.bool)

    def column(self, i: int, w1: torch.Tensor, err1: torch.Tensor) -> torch.Tensor:
        if self.nm is not None and i % self.nm[1] == 0:
            n, m = self.nm
            sal = _saliency(w1[:, i : i + m], self._d[i : i + m], self.balance)
            low = sal.topk(m - n, dim=1, largest=False).indices
            self._prune1[:, i : i + m].scatter_(1, low, True)
        return w1[:, i].masked_fill(self._prune1[:, i], 0.0)

    def end_block(self, i1: int, i2: int) -> None:
        self.keep[:, i1:i2] = ~self._prune1
        self._block += 1


@torch.no_grad()
def obs_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    sparsity: float | None = None,
    pattern: tuple[int, int] | str | None = None,
    keep_mask: torch.Tensor | None = None,
    mask_fn: MaskFn | None = None,
    balance: float = 0.5,
    granularity: str = "layer",
    row_groups: torch.Tensor | None = None,
    group_prune_counts: torch.Tensor | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    name: str = "layer",
) -> ObsResult:
    """Prune one layer with the OBS update (SparseGPT's algorithm; DiT-Pruning balance optional).

    How the mask is chosen, first match wins:

    1. ``keep_mask`` (out, in) bool: fixed; only the update runs.
    2. ``mask_fn(weight, activation_sq_mean) -> keep_mask``: called once, before the update, on the
       original weight and ``diag(H)`` (e.g. the DiT-Pruning energy mask); then as 1.
    3. ``pattern`` N:M (``(2, 4)``, ``"2:4"``, ``"4:8"``): inside the update, at the first column of
       each group of ``m`` inputs, each row prunes its ``m - n`` lowest saliencies in the group.
    4. ``sparsity``: inside the update, per block of ``blocksize`` columns, the lowest saliencies
       of each comparison group (``granularity``) are pruned, with exact counts: block ``[c0, c1)``
       of a group with ``P`` weights to prune over ``n`` columns prunes
       ``round(P·c1/n) - round(P·c0/n)``, which sums to exactly ``P``.

    The saliency of weight j of a row is ``(w_j²)^(1-β) · (1/U_jj²)^β`` with ``β = balance``, on
    the weights as updated so far; β = 0.5 ranks exactly as SparseGPT's ``w² / U_jj²``.

    Args:
        weight: (out, in) weight, any float dtype; not modified.
        gram: (in, in) input Gram (:class:`~ditprune_core.stats.GramAccumulator`), any float dtype.
        sparsity: fraction pruned, in (0, 1), for unstructured selection.
        pattern: N:M as ``(n, m)`` (keep n of m) or a string; None / "unstructured" for none.
        keep_mask: fixed (out, in) bool keep-mask.
        mask_fn: mask builder, see above.
        balance: β in [0, 1].
        granularity: ``"layer"`` (all rows of a block compared together), ``"row"``, or
            ``"cluster"`` (with ``row_groups`` and ``group_prune_counts``).
        row_groups: (out,) int64 group id per row, for ``"cluster"``.
        group_prune_counts: (G,) int64 weights to prune per group, for ``"cluster"``.
        blocksize: columns per lazy-update block (a multiple of m for N:M).
        damp: dampening relative to the mean diagonal of ``H``.
        name: layer name for error messages.
    Returns:
        :class:`ObsResult`: updated weight (out, in) in ``weight``'s dtype and device, and the
        keep-mask (out, in) bool; pruned entries of the weight are exactly zero.
    Raises:
        ValueError: inconsistent arguments (naming the layer).
        CalibrationError: NaN/inf in the Gram.
    """
    out_f, in_f = weight.shape
    _check_layer(weight, gram, blocksize, damp, name)
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    nm = _parse_nm(pattern)
    device = weight.device
    h = dampened(gram.to(device), damp)
    if mask_fn is not None and keep_mask is None:
        keep_mask = mask_fn(weight, gram.diagonal().to(device, torch.float64))
    fixed_prune = None
    if keep_mask is not None:
        if tuple(keep_mask.shape) != (out_f, in_f):
            raise ValueError(
                f"keep_mask of {name!r} has shape {tuple(keep_mask.shape)}, weight {(out_f, in_f)}"
            )
        fixed_prune = ~keep_mask.to(device, torch.bool)
        nm = None
    elif nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"pattern {n}:{m} must keep between 1 and {m - 1} of {m}")
        if in_f % m:
            raise ValueError(
                f"layer {name!r} has {in_f} input features, not divisible by {m}: pattern {n}:{m} "
                "cannot apply; exclude it or use unstructured sparsity"
            )
        if blocksize % m:
            blocksize = max(m, blocksize - blocksize % m)
    elif sparsity is None or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"obs_prune of {name!r}: give sparsity in (0, 1), an N:M pattern or a keep_mask")

    w = weight.detach().to(torch.float32, copy=True)
    u = cholesky_inverse_upper(h, name, damp)
    del h
    starts = list(range(0, in_f, blocksize))
    block_counts: list[torch.Tensor] | None = None
    if fixed_prune is None and nm is None:
        s = float(sparsity)  # type: ignore[arg-type]
        if granularity == "layer":
            block_counts = _split_counts(torch.tensor([round(s * out_f * in_f)]), starts, in_f)
        elif granularity == "row":
            block_counts = _split_counts(torch.full((out_f,), round(s * in_f)), starts, in_f)
        elif granularity == "cluster":
            if row_groups is None or group_prune_counts is None or row_groups.shape != (out_f,):
                raise ValueError(
                    f"granularity 'cluster' of {name!r} needs row_groups (out,) and group_prune_counts"
                )
            block_counts = _split_counts(group_prune_counts.to(torch.int64).cpu(), starts, in_f)
        else:
            raise ValueError(f"unknown granularity {granularity!r}; choose from {list(GRANULARITIES)}")
    rule = PruneColumns(
        (out_f, in_f),
        device,
        fixed_prune=fixed_prune,
        nm=nm,
        block_counts=block_counts,
        balance=balance,
        granularity=granularity,
        row_groups=row_groups,
    )
    obs_sweep(w, u, blocksize, rule)
    keep = rule.keep
    w.masked_fill_(~keep, 0.0)
    return ObsResult(w.to(weight.dtype), keep)


def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    sparsity: float = 0.5,
    pattern: tuple[int, int] | str | None = None,
    name: str = "layer",
) -> ObsResult:
    """SparseGPT (Frantar & Alistarh 2023) with its standard settings: the baseline.

    Blocksize 128, relative dampening 0.01, mask chosen inside the update by ``w² / U_jj²`` once per
    block of 128 columns across all rows (or per ``m`` columns for N:M). Counts are made exact per
    layer (module docstring); the reference code prunes one weight more per block.
    """
    return obs_prune(
        weight,
        gram,
        sparsity=sparsity,
        pattern=pattern,
        balance=0.5,
        granularity="layer",
        blocksize=128,
        damp=0.01,
        name=name,
    )


# ---------------------------------------------------------------------------------------------------
# plug-in 2: the rounding


def _group_index(keep: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """Each row's first group index (out,), and the total number of groups.

    Groups run in storage order (a row's groups in order, rows in order), as
    :func:`~ditprune_core.quantize.quantize_weight` lays them out.
    """
    out_f, in_f = keep.shape
    g = spec.group_width(in_f)
    if spec.grouping == "kept":
        per_row = (kept_per_row(keep) + g - 1) // g
    else:
        per_row = torch.full((out_f,), -(-in_f // g), dtype=torch.int64, device=keep.device)
    return torch.cumsum(per_row, 0) - per_row, int(per_row.sum())


class RoundKept:
    """Plug-in: each column's kept entries rounded to their group's grid, pruned entries zero.

    Groups are those of :func:`~ditprune_core.quantize.quantize_weight` with the keep mask; with
    ``grids="lazy"`` a group's scale and zero point are fit when the sweep reaches its first kept
    value, on its values as updated so far (the pending updates of the current block included).
    The value compensated is the one the model will hold: the dequantised float32 value cast to
    ``held_dtype``. After the sweep: ``codes`` (out, in) uint8, ``scales``, ``zeros``.
    """

    def __init__(
        self,
        w: torch.Tensor,
        u: torch.Tensor,
        keep: torch.Tensor,
        spec: QuantSpec,
        *,
        grids: str,
        held_dtype: torch.dtype | None,
        name: str,
    ) -> None:
        out_f, in_f = w.shape
        device = w.device
        self.w, self.u, self.keep, self.spec, self.name = w, u, keep, spec, name
        self.held_dtype = held_dtype
        self.g = spec.group_width(in_f)
        self.first, self.n_groups = _group_index(keep, spec)
        self.lazy = grids == "lazy"
        if grids == "static":
            start = quantize_weight(w, spec, keep=keep, where=name)
            self.scales = start.scales.clone()
            self.zeros = (
                torch.full((self.n_groups,), spec.sym_zero, dtype=torch.int64, device=device)
                if start.zeros is None
                else start.zeros.to(torch.int64)
            )
        else:
            self.scales = torch.zeros(self.n_groups, dtype=torch.float16, device=device)
            zero = spec.sym_zero if spec.sym else 0
            self.zeros = torch.full((self.n_groups,), zero, dtype=torch.int64, device=device)
        self.codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=device)
        self._before = torch.zeros(out_f, dtype=torch.int64, device=device)  # kept values left of the block
        self._i1 = 0
        self._keep1 = self._gid1 = self._s1 = self._z1 = self._codes1 = torch.empty(0)
        self._starts1: torch.Tensor | None = None  # (out, b): a group begins here (lazy grids)
        self._fit_at: set[int] = set()

    def begin_block(self, i1: int, i2: int, w1: torch.Tensor, d: torch.Tensor) -> None:
        out_f, g, spec, device = w1.shape[0], self.g, self.spec, w1.device
        self._i1 = i1
        keep1 = self._keep1 = self.keep[:, i1:i2]
        rank1 = self._before[:, None] + keep1.cumsum(dim=1) - 1  # each kept value's index in its row
        if spec.grouping == "kept":
            slot1 = rank1.div(g, rounding_mode="floor")
        else:
            slot1 = (torch.arange(i1, i2, device=device) // g).expand(out_f, -1)
        self._gid1 = (self.first[:, None] + slot1).clamp_(0, max(self.n_groups - 1, 0))
        self._starts1, self._fit_at = None, set()
        if self.lazy and self.n_groups:
            if spec.grouping == "kept":
                self._starts1 = keep1 & (rank1 % g == 0)
            else:  # a window begins in every row
                self._starts1 = (torch.arange(i1, i2, device=device) % g == 0).expand(out_f, -1)
            self._fit_at = set(self._starts1.any(dim=0).nonzero().squeeze(1).tolist())  # one sync a block
        # each entry's grid, gathered once per block (refreshed where a group is fit in the block)
        self._s1, self._z1 = self.scales[self._gid1].float(), self.zeros[self._gid1].float()
        self._codes1 = torch.zeros_like(w1)

    def column(self, i: int, w1: torch.Tensor, err1: torch.Tensor) -> torch.Tensor:
        if self._starts1 is not None and i in self._fit_at:
            rows = self._starts1[:, i].nonzero().squeeze(1)
            ids = self._gid1[rows, i]
            scale, zero = self._fit_starting_groups(w1, err1, rows, i)
            self.scales[ids], self.zeros[ids] = scale, zero
            same = self._gid1[rows, i:] == ids[:, None]
            self._s1[rows, i:] = torch.where(same, scale.float()[:, None], self._s1[rows, i:])
            self._z1[rows, i:] = torch.where(same, zero.float()[:, None], self._z1[rows, i:])
        col = w1[:, i]
        if not self.n_groups:
            return torch.zeros_like(col)
        # round_to_grid's arithmetic, so that dequantize_weight decodes the same
        s, z = self._s1[:, i], self._z1[:, i]
        code = torch.round(col / torch.where(s == 0, 1.0, s)).add_(z).clamp_(0, self.spec.max_code)
        value = s * (code - z) + 0.0
        if self.held_dtype is not None and self.held_dtype != torch.float32:
            value = value.to(self.held_dtype).float()
        self._codes1[:, i] = code
        return torch.where(self._keep1[:, i], value, 0.0)

    def end_block(self, i1: int, i2: int) -> None:
        self.codes[:, i1:i2] = self._codes1.masked_fill_(~self._keep1, 0.0).to(torch.uint8)
        self._before += self._keep1.sum(dim=1)

    def _fit_starting_groups(
        self, w1: torch.Tensor, err1: torch.Tensor, rows: torch.Tensor, i: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the groups that begin at column ``i1 + i`` in ``rows``, fit on
        their current values.

        A row's current values from the column on are the block's (``w1``, up to date) and, right
        of the block, ``w`` less the block's pending update ``err1[:, :i] @ U[i1:i1+i, i2:]``.
        """
        w, u, keep, spec, g, i1 = self.w, self.u, self.keep, self.spec, self.g, self._i1
        i2 = i1 + w1.shape[1]
        col = i1 + i
        kept = keep[rows, col:]
        if spec.grouping == "kept":
            seen = kept.cumsum(dim=1)
            member = kept & (seen <= g)  # the row's next G kept values: its group
            span = min(int((seen < g).sum(dim=1).max()) + 1, kept.shape[1])  # columns the groups cover
        else:
            member, span = kept[:, :g], min(g, kept.shape[1])
        current = w1[rows, i : i + span]
        if col + span > i2:  # right of the block: w less the block's pending update
            right = w[rows, i2 : col + span]
            if i:
                right = right - err1[rows, :i] @ u[i1 : i1 + i, i2 : col + span]
            current = torch.cat([current, right], dim=1)
        price = None  # clip="mse" weighs each value's rounding error by its column's price, 1 / U_jj**2
        if spec.clip == "mse":
            price = u.diagonal()[col : col + span].square().reciprocal().expand(rows.numel(), span)
        if spec.grouping == "kept":
            count = member.sum(dim=1)
            valid = torch.arange(g, device=w.device)[None, :] < count[:, None]
            grid = torch.zeros(rows.numel(), g, dtype=torch.float32, device=w.device)
            grid.masked_scatter_(valid, current[member[:, :span]])
            weights = None
            if price is not None:
                weights = torch.zeros_like(grid).masked_scatter_(valid, price[member[:, :span]])
        else:
            grid, valid, weights = current, member, price
        return fit_groups(grid, spec, valid=valid, weights=weights, where=self.name)


@torch.no_grad()
def obs_quantize(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep_mask: torch.Tensor,
    spec: QuantSpec,
    *,
    held_dtype: torch.dtype | None = None,
    grids: str = "lazy",
    blocksize: int = 128,
    damp: float = 0.01,
    name: str = "layer",
) -> QuantizedWeight:
    """Quantise the kept values of a layer on a fixed mask, compensating every column's error (OBS).

    One sweep (:func:`obs_sweep` with :class:`RoundKept`), as :func:`obs_prune` with a fixed mask
    (same dampened ``H``, same upper Cholesky factor ``U`` of ``H⁻¹``, same lazy blocks): column
    j's pruned entries are set to zero and its kept entries rounded to their group's grid, and the
    column's error is spread over the columns to its right. So the rounding error of each column is
    compensated exactly like the pruning error (SparseGPT's joint mode, GPTQ's update), and the
    pruned entries stay exactly zero.

    Groups are those of :func:`~ditprune_core.quantize.quantize_weight` with ``keep_mask``: for
    ``grouping="kept"``, G consecutive kept values of a row, so groups begin at different columns in
    different rows. With ``grids="lazy"`` a group's scale and zero point are fit (by
    :func:`~ditprune_core.quantize.fit_groups`) when the pass reaches its first kept value, on its
    values as updated so far; with ``"static"``, once, on ``weight``'s kept values.

    Args:
        weight: (out, in) starting weight: the reconstructed (refit) weight, or the original weight
            (pruned entries need not be zero: forcing them to zero is compensated too).
        gram: (in, in) input Gram of the layer.
        keep_mask: (out, in) bool keep mask.
        spec: bits, group size, symmetry and grouping of the codes.
        held_dtype: dtype the dequantised weight is held in (None: float32).
        grids: ``"lazy"`` or ``"static"`` (:data:`QUANT_GRIDS`).
        blocksize: columns per lazy-update block.
        damp: dampening relative to the mean diagonal of ``H``.
        name: layer name for error messages.
    Returns:
        a :class:`~ditprune_core.quantize.QuantizedWeight` with ``keep = keep_mask``;
        ``dequantize_weight(q, held_dtype)`` is the compensated weight.
    Raises:
        ValueError: shapes that do not fit, unknown ``grids``, a non-finite weight.
        CalibrationError: NaN/inf in the Gram.
    """
    out_f, in_f = weight.shape
    _check_layer(weight, gram, blocksize, damp, name)
    if tuple(keep_mask.shape) != (out_f, in_f) or keep_mask.dtype != torch.bool:
        raise ValueError(
            f"keep_mask of {name!r} has shape {tuple(keep_mask.shape)} and dtype {keep_mask.dtype}; "
            f"expected a bool {(out_f, in_f)} mask"
        )
    if grids not in QUANT_GRIDS:
        raise ValueError(f"unknown grids {grids!r}; choose from {list(QUANT_GRIDS)}")
    device = weight.device
    keep = keep_mask.to(device)
    w = weight.detach().to(torch.float32, copy=True)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: the weight holds inf or NaN; it cannot be quantised")
    if not bool(keep.any()):  # the whole layer pruned: no code, no group, nothing to compensate
        return quantize_weight(w, spec, keep=keep, where=name)
    h = dampened(gram.to(device), damp)
    u = cholesky_inverse_upper(h, name, damp)
    del h
    rule = RoundKept(w, u, keep, spec, grids=grids, held_dtype=held_dtype, name=name)
    obs_sweep(w, u, blocksize, rule)
    return QuantizedWeight(
        rule.codes[keep],
        rule.scales,
        None if spec.sym else rule.zeros.to(torch.uint8),
        (int(out_f), int(in_f)),
        spec,
        keep.clone(),
    )


class RoundDense:
    """Plug-in: GPTQ's rounding of a dense weight, groups of ``G`` columns, each group's grid fit on
    its columns as updated when the sweep reaches its first column. After the sweep: ``codes``
    (out, in) uint8, ``scales`` float16 and ``zeros`` int64 (out, groups per row)."""

    def __init__(self, shape: tuple[int, int], spec: QuantSpec, device: torch.device, where: str) -> None:
        rows, cols = shape
        self.spec, self.where = spec, where
        self.g = spec.group_width(cols)
        per_row = -(-cols // self.g)
        self.codes = torch.empty(rows, cols, dtype=torch.uint8, device=device)
        self.scales = torch.empty(rows, per_row, dtype=torch.float16, device=device)
        self.zeros = torch.empty(rows, per_row, dtype=torch.int64, device=device)
        self._i1 = 0
        self._scale = self._zero = torch.empty(0)

    def begin_block(self, i1: int, i2: int, w1: torch.Tensor, d: torch.Tensor) -> None:
        self._i1 = i1

    def column(self, i: int, w1: torch.Tensor, err1: torch.Tensor) -> torch.Tensor:
        col, g = self._i1 + i, self.g
        if col % g == 0:  # a new group starts: fit it on its (updated) columns
            self._scale, self._zero = fit_groups(w1[:, i : i + g], self.spec, where=self.where)
            self.scales[:, col // g], self.zeros[:, col // g] = self._scale, self._zero
        code, value = round_to_grid(w1[:, i : i + 1], self._scale, self._zero, self.spec)
        self.codes[:, col] = code[:, 0]
        return value[:, 0]

    def end_block(self, i1: int, i2: int) -> None:
        pass


def gptq_quantize(
    weight: torch.Tensor,
    gram: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    where: str = "weight",
) -> QuantizedWeight:
    """GPTQ: quantise a dense weight column by column, compensating each column's rounding error.

    Minimises ``tr((W - Q) H (W - Q)^T)`` greedily (Frantar et al., 2022): :func:`obs_sweep` with
    :class:`RoundDense`. Columns are processed in lazy blocks of ``block_size`` (rounded up to a
    multiple of ``group_size``); each group's scale and zero point are fit, by the same rule as
    :func:`~ditprune_core.quantize.quantize_weight`, on the group's columns as updated when the
    group is reached. Inputs that never fire (zero diagonal) get weight 0. The Gram is dampened and
    factorised in float64 (then used in float32).

    Args:
        weight: (rows, cols) dense weight, any device.
        gram: (cols, cols) input Gram matrix ``X^T X / n`` of the layer's calibration inputs.
        bits, group_size, sym: as in :class:`~ditprune_core.quantize.QuantSpec`.
        block_size: columns per lazy update block.
        damp: dampening, as a fraction of the mean diagonal of H, added before inverting.
        where: the layer's name, for error messages.
    Returns:
        a dense :class:`~ditprune_core.quantize.QuantizedWeight` (``dequantize_weight`` gives the
        compensated weight).
    Raises:
        ValueError: a Gram of the wrong size, a bad weight or ``damp``.
        CalibrationError: a Gram that stays singular however it is dampened.
    """
    spec = QuantSpec(bits, group_size, sym)
    check_weight(weight, None, where)
    rows, cols = (int(s) for s in weight.shape)
    if gram.shape != (cols, cols):
        raise ValueError(
            f"{where}: Gram matrix of shape {tuple(gram.shape)} does not fit a weight with {cols} inputs "
            f"(expected ({cols}, {cols}))"
        )
    if not damp >= 0.0:  # also refuses NaN
        raise ValueError(f"damp must be >= 0, got {damp}")
    device = weight.device
    w = weight.detach().float().clone()
    h = gram.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    upper = cholesky_inverse_upper(dampened(h, damp, torch.float64), where, damp).float()
    g = spec.group_width(cols)
    rule = RoundDense((rows, cols), spec, device, where)
    obs_sweep(w, upper, max(g, -(-block_size // g) * g), rule)
    return QuantizedWeight(
        rule.codes,
        rule.scales.reshape(-1),
        None if sym else rule.zeros.reshape(-1).to(torch.uint8),
        (rows, cols),
        spec,
    )
