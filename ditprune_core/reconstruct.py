"""Reconstruction: prune a Linear layer and compensate its kept weights (OBS / SparseGPT, refit).

A layer ``y = W x`` with calibration inputs ``X`` (in, tokens) is pruned to a keep-mask and its kept
weights are changed so that the output on the calibration inputs moves as little as possible::

    min_{W'}  ||(W' - W) X||²   subject to  W'_ij = 0 where the mask prunes

Everything needed is the layer's input Gram matrix ``H = Σ_t w_t x_t x_tᵀ / Σ_t w_t`` (in, in)
(:class:`GramAccumulator`, with the same timestep weighting and token counting as
:class:`~ditprune_core.stats.ChannelSquareMean`, whose mean of x² is ``diag(H)``). The
relative output error of a candidate ``W'`` is ``tr(Δ H Δᵀ) / tr(W H Wᵀ)`` with ``Δ = W' - W``
(:func:`relative_output_error`).

Three pieces, each usable alone:

- :func:`obs_prune`: the Optimal Brain Surgeon update as SparseGPT computes it (Frantar & Alistarh
  2023): dampened ``H``, upper Cholesky factor ``U`` of ``H⁻¹``, columns processed left to right in
  blocks with lazy updates of the columns to the right. The mask is chosen inside the update, a
  block of columns at a time, on the already updated weights: the lowest
  ``(w²)^(1-β) · (1/U_jj²)^β`` are pruned (β = 0.5 is SparseGPT's ``w² / U_jj²``; β is the energy
  balance of DiT-Pruning, with the curvature ``1/U_jj²`` in the place of the activation energy,
  which it equals when ``H`` is diagonal). Or a given mask is kept fixed and only the update runs.
- :func:`refit_masked`: the masked least-squares problem above solved for a fixed mask, exactly per
  output row (small layers), or by batched preconditioned conjugate gradient warm-started from the
  OBS result (large layers).
- :func:`sparsegpt_prune`: the SparseGPT baseline with its standard settings.

**Exact counts.** Unstructured sparsity is exact per comparison group, as in the mask-only path.
Selection happens block by block, so the group's total is split over the blocks of columns by
cumulative rounding: block ``[c0, c1)`` of a group with ``P`` weights to prune over ``n`` columns
prunes ``round(P·c1/n) - round(P·c0/n)``, which sums to exactly ``P``. Groups are the whole layer
(``"layer"``, SparseGPT's choice), each output row (``"row"``), or clusters of rows with given
per-cluster totals (``"cluster"``). N:M patterns keep ``n`` of every ``m`` consecutive inputs of a row.

All maths runs in float32 on the weight's device; the returned weight has the input's dtype.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from .calibrate import TIMESTEP_WEIGHTINGS, TimestepWeighting
from .config import PruneConfig, parse_pattern
from .mask import layer_keep_mask
from .quantize import QuantizedWeight, QuantSpec, fit_groups, kept_per_row, quantize_weight
from .stats import CalibrationError, GramAccumulator, check_gram
from .util.selection import prune_lowest

__all__ = [
    "QUANT_GRIDS",
    "REFIT_METHODS",
    "GramAccumulator",
    "GramRecorder",
    "LayerReconstruction",
    "ObsResult",
    "PairedGramAccumulator",
    "RefitInfo",
    "allocate_block_counts",
    "corrected_weight",
    "dampened",
    "obs_prune",
    "obs_quantize",
    "plan_groups",
    "quantize_layer",
    "reconstruct_layer",
    "refit_masked",
    "relative_output_error",
    "sparsegpt_prune",
]

log = logging.getLogger("ditprune")

REFIT_METHODS = ("auto", "exact", "pcg")
GRANULARITIES = ("layer", "row", "cluster")
_CHUNK_ELEMENTS = 1 << 22  # token rows per Gram product: at most 16 MB of float32 inputs at a time
_EXACT_BATCH_ELEMENTS = 1 << 24  # (rows, in, in) systems of the exact refit: at most 64 MB at once
MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PairedGramAccumulator:
    """Gram of a layer's inputs ``x`` and cross-Gram with reference inputs ``x_ref`` of the same tokens.

    For error-correcting reconstruction: ``x`` are the inputs of the layer in the partially pruned
    model, ``x_ref`` the inputs of the same layer in the dense model on the same model inputs. The
    running means are ``H = E[x xᵀ]`` and ``C = E[x_ref xᵀ]``, both (in, in), weighted like
    :class:`GramAccumulator`. Memory: twice a Gram.
    """

    def __init__(self, in_features: int, *, name: str = "layer", dtype: torch.dtype = torch.float32) -> None:
        self.gram = GramAccumulator(in_features, name=name, dtype=dtype)
        self.cross = GramAccumulator(in_features, name=name, dtype=dtype)

    @property
    def tokens(self) -> int:
        return self.gram.tokens

    def add_pair(self, x: torch.Tensor, x_ref: torch.Tensor, weight: float = 1.0) -> None:
        """Add inputs ``x`` and reference inputs ``x_ref``, both (..., in_features), token for token."""
        if x.shape != x_ref.shape:
            raise CalibrationError(
                f"paired Gram of {self.gram.name!r}: inputs {tuple(x.shape)} and reference inputs "
                f"{tuple(x_ref.shape)} differ; run the dense and the pruned model on the same inputs"
            )
        self.gram.add_batch(x, weight)
        n = self.gram.in_features
        a, b = x_ref.detach().reshape(-1, n), x.detach().reshape(-1, n)
        if a.shape[0] == 0 or weight <= 0:
            return
        total = torch.zeros(n, n, dtype=self.cross.dtype, device=x.device)
        step = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, a.shape[0], step):
            total.addmm_(a[start : start + step].to(total.dtype).t(), b[start : start + step].to(total.dtype))
        if not bool(torch.isfinite(total).all()):
            raise CalibrationError(f"layer {self.gram.name!r} received NaN or inf reference inputs")
        self.cross._combine(total.div_(a.shape[0]), weight * a.shape[0], a.shape[0])

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, C)``: Gram ``E[x xᵀ]`` and cross-Gram ``E[x_ref xᵀ]``, each (in, in)."""
        return self.gram.finalize(), self.cross.finalize()


@torch.no_grad()
def corrected_weight(
    weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, *, damp: float = 0.01
) -> torch.Tensor:
    """The dense weight moved to absorb the error upstream of the layer (before pruning it).

    ``W* = argmin E||W' x - W x_ref||² + λ||W' - W||² = W (C + λI)(H + λI)⁻¹`` with ``H = E[x xᵀ]``,
    ``C = E[x_ref xᵀ]`` (:class:`PairedGramAccumulator`) and ``λ = damp · mean(diag H)``. When the
    inputs are unchanged (``x = x_ref``) it is ``W`` itself. Since
    ``E||W' x - W x_ref||² = tr((W' - W*) H (W' - W*)ᵀ) + const`` (for λ → 0), pruning ``W*`` on
    ``H`` with :func:`obs_prune` / :func:`refit_masked` minimises the error against the dense layer's
    output on dense inputs.

    Args:
        weight: (out, in) dense weight ``W``.
        gram: (in, in) ``H``; cross: (in, in) ``C``.
    Returns:
        (out, in) float32 ``W*`` on the weight's device.
    """
    check_gram(gram)
    check_gram(cross)
    device = weight.device
    h = dampened(gram.to(device), damp)
    lam = float(h.diagonal().mean() - gram.diagonal().mean())
    c = cross.to(device, torch.float32, copy=True)
    c.diagonal().add_(lam)
    w = weight.detach().to(torch.float32)
    chol = torch.linalg.cholesky(h)
    return torch.cholesky_solve(c.t() @ w.t(), chol).t().contiguous()


def dampened(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` in float32 (a new tensor); ``damp`` is relative.

    A Gram whose diagonal is all zero (the layer only ever saw zeros) becomes ``damp · I``, so that
    the pruning falls back to magnitude order instead of failing. Dead input channels (zero
    diagonal entries) get ``damp · mean(diag H)`` and so become positive definite.
    """
    h = gram.to(torch.float32, copy=True)
    scale = float(h.diagonal().mean())
    if not scale > 0:
        scale = 1.0
    h.diagonal().add_(damp * scale)
    return h


def _cholesky_inverse_upper(h: torch.Tensor, name: str, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), adding damping if H is not PD."""
    extra = 0.0
    scale = float(h.diagonal().mean()) or 1.0
    for _attempt in range(8):
        hd = h if extra == 0 else h + extra * scale * torch.eye(h.shape[0], device=h.device)
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
       of each comparison group (``granularity``) are pruned, with exact counts (module docstring).

    The saliency of weight j of a row is ``(w_j²)^(1-β) · (1/U_jj²)^β`` with ``β = balance``, on
    the weights as updated so far; β = 0.5 ranks exactly as SparseGPT's ``w² / U_jj²``.

    Args:
        weight: (out, in) weight, any float dtype; not modified.
        gram: (in, in) input Gram (:class:`GramAccumulator`), any float dtype.
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
    check_gram(gram, name)
    if gram.shape[0] != in_f:
        raise ValueError(f"Gram of {name!r} is {gram.shape[0]}x{gram.shape[0]}, the layer has {in_f} inputs")
    if not 0.0 <= balance <= 1.0:
        raise ValueError(f"balance must be in [0, 1], got {balance}")
    if blocksize < 1 or damp < 0:
        raise ValueError(f"blocksize must be >= 1 and damp >= 0, got {blocksize} and {damp}")
    nm = _parse_nm(pattern)
    device = weight.device
    h = dampened(gram.to(device), damp)
    if mask_fn is not None and keep_mask is None:
        keep_mask = mask_fn(weight, gram.diagonal().to(device, torch.float64))
    if keep_mask is not None:
        if tuple(keep_mask.shape) != (out_f, in_f):
            raise ValueError(
                f"keep_mask of {name!r} has shape {tuple(keep_mask.shape)}, weight {(out_f, in_f)}"
            )
        fixed_prune = ~keep_mask.to(device, torch.bool)
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
    u = _cholesky_inverse_upper(h, name, damp)
    del h
    starts = list(range(0, in_f, blocksize))
    block_counts: list[torch.Tensor] | None = None
    if keep_mask is None and nm is None:
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
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=device)
    for b, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, in_f)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        err1 = torch.zeros_like(w1)
        if keep_mask is not None:
            prune1 = fixed_prune[:, i1:i2]
        elif nm is None:
            assert block_counts is not None  # set above for unstructured selection
            prune1 = ~_select_block(w1, d, balance, granularity, block_counts[b], row_groups)
        else:
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = _saliency(w1[:, i : i + nm[1]], d[i : i + nm[1]], balance)
                low = sal.topk(nm[1] - nm[0], dim=1, largest=False).indices
                prune1[:, i : i + nm[1]].scatter_(1, low, True)
            col = w1[:, i]
            q = col.masked_fill(prune1[:, i], 0.0)
            e = (col - q) / d[i]
            w1[:, i:].sub_(e.unsqueeze(1) * u1[i, i:].unsqueeze(0))
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~prune1
        if i2 < in_f:
            w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
    w.masked_fill_(~keep, 0.0)
    return ObsResult(w.to(weight.dtype), keep)


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
    assert row_groups is not None
    keep = torch.ones_like(sal, dtype=torch.bool)
    groups = row_groups.to(sal.device)
    for g, count in enumerate(counts.tolist()):
        rows = (groups == g).nonzero().squeeze(1)
        if rows.numel() and count:
            sub = sal.index_select(0, rows)
            keep[rows] = prune_lowest(sub.reshape(1, -1), torch.tensor([count])).reshape(sub.shape)
    return keep


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


@dataclass(frozen=True)
class RefitInfo:
    """How a refit went: method, iterations run, final relative residual (max over rows), seconds."""

    method: str
    iterations: int
    residual: float
    seconds: float


@torch.no_grad()
def refit_masked(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep_mask: torch.Tensor,
    *,
    init: torch.Tensor | None = None,
    method: str = "auto",
    damp: float = 0.01,
    iters: int = 20,
    tol: float = 1e-4,
    exact_max_in: int = 1024,
    name: str = "layer",
) -> tuple[torch.Tensor, RefitInfo]:
    """Least-squares refit of the kept weights for a fixed mask, one independent problem per row.

    For output row i with kept inputs K: ``min ||(w'_i - w_i) X||²`` over ``w'_i`` zero off K, with
    the dampened ``H_λ = H + damp · mean(diag H) · I``; the solution is
    ``w'_K = (H_λ)_KK⁻¹ (H_λ w_i)_K``.

    - ``"exact"``: that solve per row (batched Cholesky of the row's masked system), cost
      ``out · in³ / 3`` flops.
    - ``"pcg"``: conjugate gradient on all rows at once, Jacobi-preconditioned, warm-started from
      ``init`` (the OBS result; default ``weight`` masked), at most ``iters`` iterations, stopping
      when every row's residual, relative to its right-hand side, is below ``tol``. Each iteration
      is one (out, in) × (in, in) product.
    - ``"auto"``: exact when ``in_features <= exact_max_in``, else PCG.

    Args:
        weight: (out, in) original (target) weight.
        gram: (in, in) input Gram.
        keep_mask: (out, in) bool mask to respect.
        init: (out, in) starting point for PCG (zero off the mask is enforced).
    Returns:
        ``(refit weight (out, in) in weight's dtype, zero off the mask; RefitInfo)``.
    """
    if method not in REFIT_METHODS:
        raise ValueError(f"unknown refit method {method!r}; choose from {list(REFIT_METHODS)}")
    check_gram(gram, name)
    start = time.perf_counter()
    out_f, in_f = weight.shape
    device = weight.device
    h = dampened(gram.to(device), damp)
    w = weight.detach().to(torch.float32)
    mask = keep_mask.to(device, torch.bool)
    rhs = (w @ h).masked_fill_(~mask, 0.0)  # (H w_i)_K per row (H symmetric)
    if method == "auto":
        method = "exact" if in_f <= exact_max_in else "pcg"
    if method == "exact":
        x = torch.zeros_like(w)
        step = max(1, _EXACT_BATCH_ELEMENTS // (in_f * in_f))
        eye = torch.eye(in_f, device=device)
        for r0 in range(0, out_f, step):
            m = mask[r0 : r0 + step].to(torch.float32)
            a = h.unsqueeze(0) * (m.unsqueeze(2) * m.unsqueeze(1))
            a += eye * (1.0 - m).unsqueeze(2)  # identity on pruned inputs: their solution is 0
            chol, info = torch.linalg.cholesky_ex(a)
            if bool((info != 0).any()):
                raise CalibrationError(f"refit of {name!r}: a row's kept Gram is singular; raise damp")
            x[r0 : r0 + step] = torch.cholesky_solve(rhs[r0 : r0 + step].unsqueeze(2), chol).squeeze(2)
        x.masked_fill_(~mask, 0.0)
        resid = _residual(x, h, rhs, mask)
        info_out = RefitInfo("exact", 1, resid, time.perf_counter() - start)
        return x.to(weight.dtype), info_out
    x = (
        (init if init is not None else weight)
        .detach()
        .to(device, torch.float32, copy=True)
        .masked_fill_(~mask, 0.0)
    )
    inv_diag = h.diagonal().reciprocal()
    r = rhs - (x @ h).masked_fill_(~mask, 0.0)
    rhs_norm = rhs.norm(dim=1).clamp_min(1e-30)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(dim=1)
    it = 0
    for it in range(1, iters + 1):  # noqa: B007 (the count is reported)
        ap = (p @ h).masked_fill_(~mask, 0.0)
        alpha = rz / (p * ap).sum(dim=1).clamp_min(1e-30)
        x.addcmul_(alpha.unsqueeze(1), p)
        r.addcmul_(alpha.unsqueeze(1), ap, value=-1.0)
        if float((r.norm(dim=1) / rhs_norm).max()) < tol:
            break
        z = r * inv_diag
        rz_new = (r * z).sum(dim=1)
        p.mul_((rz_new / rz.clamp_min(1e-30)).unsqueeze(1)).add_(z)
        rz = rz_new
    x.masked_fill_(~mask, 0.0)
    resid = float((r.norm(dim=1) / rhs_norm).max()) if iters else _residual(x, h, rhs, mask)
    return x.to(weight.dtype), RefitInfo("pcg", it, resid, time.perf_counter() - start)


def _residual(x: torch.Tensor, h: torch.Tensor, rhs: torch.Tensor, mask: torch.Tensor) -> float:
    r = rhs - (x @ h).masked_fill_(~mask, 0.0)
    return float((r.norm(dim=1) / rhs.norm(dim=1).clamp_min(1e-30)).max())


def relative_output_error(new_weight: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W H Wᵀ)``, ``Δ = W' - W``: relative squared output error on the Gram.

    Args:
        new_weight: (out, in) pruned/updated weight ``W'``.
        weight: (out, in) original weight ``W``.
        gram: (in, in) input Gram ``H``.
    """
    h = gram.to(weight.device, torch.float64)
    w = weight.detach().to(torch.float64)
    delta = new_weight.detach().to(torch.float64) - w
    num = float(((delta @ h) * delta).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def allocate_block_counts(
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    sparsity: float,
    *,
    spread: float = 0.3,
    max_sparsity: float = 0.95,
    sample: int = 1 << 20,
) -> dict[str, int]:
    """Share a block's prune count among its layers by their estimated relative output error.

    Every weight ``w_ij`` of layer ``l`` costs ``e_ij = w_ij² H_jj / tr(W H Wᵀ)`` if pruned alone:
    the share of the layer's output energy it carries (the diagonal OBS error without update,
    relative to the layer's output). The block prunes the ``K = round(sparsity · Σ n_l)`` weights
    of lowest ``e`` over all its layers, with every layer's sparsity kept within
    ``[sparsity - spread, sparsity + spread]`` (and ``(0, max_sparsity]``): layers whose output
    rests on few weights give up fewer. The counts sum to ``K`` exactly (largest-remainder
    rounding of the water level). Layers above ``sample`` weights are estimated from an evenly
    strided sample of their costs.

    Args:
        layers: ``{name: (weight (out, in), Gram (in, in))}``, the layers of one block.
        sparsity: the block's target sparsity, in (0, 1).
        spread: how far one layer's sparsity may move from ``sparsity``.
        max_sparsity: upper bound of any layer's sparsity (raised to ``sparsity`` if below it).
        sample: costs per layer used at most.
    Returns:
        ``{name: weights to prune}``.
    """
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    names = list(layers)
    sizes, costs, lows, highs = [], [], [], []
    for name in names:
        weight, gram = layers[name]
        w = weight.detach().to(torch.float32)
        h = gram.to(w.device, torch.float32)
        n = w.numel()
        energy = float(((w @ h) * w).sum())
        cost = (w.square() * h.diagonal().clamp_min(0.0)).flatten()
        cost = cost / energy if energy > 0 else torch.zeros_like(cost)
        step = max(1, n // sample)
        costs.append(cost[::step].sort().values.double().cpu())
        sizes.append(n)
        upper = max(min(max_sparsity, sparsity + spread), sparsity)
        # the bounds admit the uniform counts, and every layer prunes at least one weight and keeps
        # at least one: at extreme sparsities (0.001, 0.9999) the uniform count of a small layer is
        # 0 or all of it, which no layer's sparsity in (0, 1) can express
        low = min(max(1, math.ceil(max(0.0, sparsity - spread) * n)), max(1, math.floor(sparsity * n)))
        lows.append(float(min(low, n - 1)))
        highs.append(float(max(1, min(n - 1, max(math.floor(upper * n), math.ceil(sparsity * n))))))
    # the block's count, within what those bounds allow (it moves only at extreme sparsities)
    total = min(max(round(sparsity * sum(sizes)), round(sum(lows))), round(sum(highs)))

    def counts(level: float) -> list[float]:
        out = []
        for c, n, lo, hi in zip(costs, sizes, lows, highs, strict=True):
            below = int(torch.searchsorted(c, torch.tensor([level], dtype=c.dtype), right=True))
            out.append(min(max(n * below / c.numel(), lo), hi))
        return out

    lo_level, hi_level = -1.0, max(float(c[-1]) for c in costs) + 1.0
    for _ in range(100):
        mid = 0.5 * (lo_level + hi_level)
        if sum(counts(mid)) >= total:
            hi_level = mid
        else:
            lo_level = mid
    under, over = counts(lo_level), counts(hi_level)
    gap = sum(over) - sum(under)
    alpha = (total - sum(under)) / gap if gap > 0 else 0.0
    real = [a + alpha * (b - a) for a, b in zip(under, over, strict=True)]
    whole = [math.floor(r) for r in real]
    order = sorted(range(len(names)), key=lambda i: real[i] - whole[i], reverse=True)
    for i in order[: total - sum(whole)]:
        whole[i] += 1
    return dict(zip(names, whole, strict=True))


def plan_groups(
    layers: Sequence[tuple[str, int]], budget_bytes: int, dtype: torch.dtype = torch.float32
) -> list[list[str]]:
    """Split layers, in the given (forward) order, into consecutive groups whose Grams fit the budget.

    Args:
        layers: ``(name, in_features)`` in forward order.
        budget_bytes: bytes allowed for the Grams of one group.
    Returns:
        groups of names, each non-empty, in order.
    Raises:
        ValueError: a single layer's Gram exceeds the budget (naming it and the bytes it needs).
    """
    groups: list[list[str]] = []
    used = 0
    for name, in_f in layers:
        need = GramAccumulator.nbytes(in_f, dtype)
        if need > budget_bytes:
            raise ValueError(
                f"memory budget {budget_bytes} bytes is smaller than the Gram of layer {name!r} "
                f"({in_f} inputs need {need} bytes); raise the budget to at least {need}"
            )
        if not groups or used + need > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return groups


class GramRecorder:
    """Context manager: forward hooks that accumulate the input Gram of each given layer.

    Timestep weighting as in :class:`~ditprune_core.calibrate.Calibrator`: call
    :meth:`on_step` (``(step_index, sigma)``) or :meth:`set_sigma` before each model call. Hooks are
    removed on exit, also after an exception.

    Args:
        layers: ``{name: nn.Linear}`` to record.
        weighting: ``"uniform"``, ``"log"`` or a function of sigma.
        dtype: Gram dtype (float32 default).
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Linear],
        *,
        weighting: str | TimestepWeighting = "uniform",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.layers = dict(layers)
        self._weighting = TIMESTEP_WEIGHTINGS[weighting] if isinstance(weighting, str) else weighting
        self.current_weight = 1.0
        self.accumulators = {
            name: GramAccumulator(layer.in_features, name=name, dtype=dtype)
            for name, layer in self.layers.items()
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def set_sigma(self, sigma: float) -> None:
        self.current_weight = float(self._weighting(float(sigma)))

    def on_step(self, _step: int, sigma: float) -> None:
        self.set_sigma(sigma)

    def __enter__(self) -> GramRecorder:
        for name, layer in self.layers.items():
            acc = self.accumulators[name]

            def hook(_m: nn.Module, inputs: tuple[Any, ...], _o: Any, acc: GramAccumulator = acc) -> None:
                acc.add_batch(inputs[0], self.current_weight)

            self._handles.append(layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def grams(self) -> dict[str, torch.Tensor]:
        """``{name: Gram (in, in)}``; raises CalibrationError naming a layer that saw no token."""
        return {name: acc.finalize() for name, acc in self.accumulators.items()}


@contextmanager
def recording_grams(layers: Mapping[str, nn.Linear], **kwargs: Any) -> Iterator[GramRecorder]:
    """Functional spelling of ``with GramRecorder(...) as rec``."""
    with GramRecorder(layers, **kwargs) as rec:
        yield rec


@dataclass(frozen=True)
class LayerReconstruction:
    """One reconstructed layer: its sparsity, relative output error on its own Gram, and time.

    With quantised kept values (``value_bits``), ``output_error`` is the error of the weight the model
    holds (quantised) and ``unquantized_error`` that of the reconstruction before quantising.
    """

    name: str
    sparsity: float
    output_error: float
    mask_only_error: float
    seconds: float
    refit: RefitInfo | None
    unquantized_error: float | None = None


def reconstruct_layer(
    name: str, weight: torch.Tensor, gram: torch.Tensor, config: PruneConfig
) -> tuple[torch.Tensor, torch.Tensor, LayerReconstruction]:
    """Prune one layer and update its kept weights as ``config`` (``update="obs"``) says.

    The mask comes from the config's own metric and group (``reconstruct.mask="metric"``: chosen
    on the original weight and ``diag(H)``, the calibrated mean square of each input, then fixed) or
    from inside the OBS update (``"in-update"``); the OBS update compensates the pruned weights, and
    the refit then solves the masked least-squares problem for the kept weights.

    Args:
        name: the layer's name, for messages.
        weight: (out, in) original weight.
        gram: (in, in) input Gram of the layer, recorded on the model as it is upstream.
        config: the prune config.
    Returns:
        ``(new weight (out, in) in weight's dtype, keep-mask (out, in) bool, report)``.
    """
    start = time.perf_counter()
    params = config.reconstruct
    w32 = weight.detach().to(torch.float32)
    nm = parse_pattern(config.pattern)
    if params.mask == "metric":
        a = gram.diagonal().to(torch.float64).clamp_min(0.0)
        keep = layer_keep_mask(name, weight, a if config.needs_calibration else None, config)
        result = obs_prune(w32, gram, keep_mask=keep, blocksize=params.blocksize, damp=params.damp, name=name)
    else:
        granularity = "row" if config.granularity == "row" else "layer"
        result = obs_prune(
            w32,
            gram,
            sparsity=None if nm is not None else float(config.sparsity),
            pattern=nm,
            balance=params.balance,
            granularity=granularity,
            blocksize=params.blocksize,
            damp=params.damp,
            name=name,
        )
    new, keep = result
    info = None
    if params.refit != "none":
        new, info = refit_masked(
            w32,
            gram,
            keep,
            init=new,
            method=params.refit,
            damp=params.damp,
            iters=params.refit_iters,
            tol=params.refit_tol,
            exact_max_in=params.exact_max_in,
            name=name,
        )
    error = relative_output_error(new, w32, gram)
    mask_only = relative_output_error(w32 * keep, w32, gram)
    sparsity = 1.0 - int(keep.sum()) / keep.numel()
    report = LayerReconstruction(name, sparsity, error, mask_only, time.perf_counter() - start, info)
    return new.to(weight.dtype), keep, report


# ---------------------------------------------------------------------------------------------------
# quantised kept values: the joint OBS pass (pruning and rounding errors compensated together)

#: how :func:`obs_quantize` fits each group's scale and zero point: ``"lazy"`` when the pass reaches
#: the group's first kept value, on the values as updated so far (GPTQ's rule); ``"static"`` once,
#: before the pass, on the starting weight's kept values
QUANT_GRIDS = ("lazy", "static")


def _group_index(keep: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """Each row's first group index (out,), and the total number of groups.

    Groups run in storage order (a row's groups in order, rows in order), as
    :func:`~ditprune_core.quantize.quantize_weight` lays them out.
    """
    out_f, in_f = keep.shape
    g = spec.group_size
    if spec.grouping == "kept":
        per_row = (kept_per_row(keep) + g - 1) // g
    else:
        per_row = torch.full((out_f,), -(-in_f // g), dtype=torch.int64, device=keep.device)
    return torch.cumsum(per_row, 0) - per_row, int(per_row.sum())


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

    One left-to-right pass over the columns, as :func:`obs_prune` with a fixed mask (same dampened
    ``H``, same upper Cholesky factor ``U`` of ``H⁻¹``, same lazy blocks): column j's pruned entries
    are set to zero and its kept entries rounded to their group's grid, and the column's error,
    divided by ``U_jj``, is spread over the columns to its right (``err / U_jj × U_j,j:``). So the
    rounding error of each column is compensated exactly like the pruning error (SparseGPT's joint
    mode, GPTQ's update), and the pruned entries stay exactly zero.

    Groups are those of :func:`~ditprune_core.quantize.quantize_weight` with ``keep_mask``: for
    ``grouping="kept"``, G consecutive kept values of a row, so groups begin at different columns in
    different rows. With ``grids="lazy"`` a group's scale and zero point are fit (by
    :func:`~ditprune_core.quantize.fit_groups`) when the pass reaches its first kept value, on its
    values as updated so far (the pending updates of the current block included); with
    ``"static"``, once, on ``weight``'s kept values.

    The value compensated is the one the model will hold: the dequantised float32 value cast to
    ``held_dtype`` (the model's weight dtype; None: float32).

    Args:
        weight: (out, in) starting weight: the reconstructed (refit) weight, or the original weight
            (pruned entries need not be zero: forcing them to zero is compensated too).
        gram: (in, in) input Gram of the layer.
        keep_mask: (out, in) bool keep mask.
        spec: bits, group size, symmetry and grouping of the codes.
        held_dtype: dtype the dequantised weight is held in.
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
    check_gram(gram, name)
    if gram.shape[0] != in_f:
        raise ValueError(f"Gram of {name!r} is {gram.shape[0]}x{gram.shape[0]}, the layer has {in_f} inputs")
    if tuple(keep_mask.shape) != (out_f, in_f) or keep_mask.dtype != torch.bool:
        raise ValueError(
            f"keep_mask of {name!r} has shape {tuple(keep_mask.shape)} and dtype {keep_mask.dtype}; "
            f"expected a bool {(out_f, in_f)} mask"
        )
    if grids not in QUANT_GRIDS:
        raise ValueError(f"unknown grids {grids!r}; choose from {list(QUANT_GRIDS)}")
    if blocksize < 1 or damp < 0:
        raise ValueError(f"blocksize must be >= 1 and damp >= 0, got {blocksize} and {damp}")
    device = weight.device
    keep = keep_mask.to(device)
    w = weight.detach().to(torch.float32, copy=True)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: the weight holds inf or NaN; it cannot be quantised")
    if not bool(keep.any()):  # the whole layer pruned: no code, no group, nothing to compensate
        return quantize_weight(w, spec, keep=keep, where=name)
    h = dampened(gram.to(device), damp)
    u = _cholesky_inverse_upper(h, name, damp)
    del h
    g = spec.group_size
    first, n_groups = _group_index(keep, spec)
    if grids == "static":
        start = quantize_weight(w, spec, keep=keep, where=name)
        scales = start.scales.clone()
        zeros = (
            torch.full((n_groups,), spec.sym_zero, dtype=torch.int64, device=device)
            if start.zeros is None
            else start.zeros.to(torch.int64)
        )
    else:
        scales = torch.zeros(n_groups, dtype=torch.float16, device=device)
        zeros = torch.full((n_groups,), spec.sym_zero if spec.sym else 0, dtype=torch.int64, device=device)
    last_group = max(n_groups - 1, 0)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=device)
    before = torch.zeros(out_f, dtype=torch.int64, device=device)  # kept values left of the block
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = u1.diagonal()
        err1 = torch.zeros_like(w1)
        keep1 = keep[:, i1:i2]
        rank1 = before[:, None] + keep1.cumsum(dim=1) - 1  # each kept value's index in its row
        if spec.grouping == "kept":
            slot1 = rank1.div(g, rounding_mode="floor")
        else:
            slot1 = (torch.arange(i1, i2, device=device) // g).expand(out_f, -1)
        gid1 = (first[:, None] + slot1).clamp_(0, last_group)
        starts1: torch.Tensor | None = None  # (out, b): a group begins here (lazy grids)
        fit_at: set[int] = set()
        if grids == "lazy" and n_groups:
            if spec.grouping == "kept":
                starts1 = keep1 & (rank1 % g == 0)
            else:  # a window begins in every row
                starts1 = (torch.arange(i1, i2, device=device) % g == 0).expand(out_f, -1)
            fit_at = set(starts1.any(dim=0).nonzero().squeeze(1).tolist())  # one sync per block
        # each entry's grid, gathered once per block (refreshed where a group is fit in the block)
        s1, z1 = scales[gid1].float(), zeros[gid1].float()
        codes1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if starts1 is not None and i in fit_at:
                rows = starts1[:, i].nonzero().squeeze(1)
                ids = gid1[rows, i]
                scale, zero = _fit_starting_groups(w, w1, err1, u, keep, rows, i1, i, spec, name)
                scales[ids], zeros[ids] = scale, zero
                same = gid1[rows, i:] == ids[:, None]
                s1[rows, i:] = torch.where(same, scale.float()[:, None], s1[rows, i:])
                z1[rows, i:] = torch.where(same, zero.float()[:, None], z1[rows, i:])
            col = w1[:, i]
            if n_groups:  # round_to_grid's arithmetic, so that dequantize_weight decodes the same
                s, z = s1[:, i], z1[:, i]
                code = torch.round(col / torch.where(s == 0, 1.0, s)).add_(z).clamp_(0, spec.max_code)
                value = s * (code - z) + 0.0
                if held_dtype is not None and held_dtype != torch.float32:
                    value = value.to(held_dtype).float()
                q = torch.where(keep1[:, i], value, 0.0)
                codes1[:, i] = code
            else:
                q = torch.zeros_like(col)
            e = (col - q) / d[i]
            w1[:, i:].sub_(e.unsqueeze(1) * u1[i, i:].unsqueeze(0))
            w1[:, i] = q
            err1[:, i] = e
        codes[:, i1:i2] = codes1.masked_fill_(~keep1, 0.0).to(torch.uint8)
        w[:, i1:i2] = w1
        if i2 < in_f:
            w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
        before += keep1.sum(dim=1)
    return QuantizedWeight(
        codes[keep],
        scales,
        None if spec.sym else zeros.to(torch.uint8),
        (int(out_f), int(in_f)),
        spec,
        keep.clone(),
    )


def _fit_starting_groups(
    w: torch.Tensor,
    w1: torch.Tensor,
    err1: torch.Tensor,
    u: torch.Tensor,
    keep: torch.Tensor,
    rows: torch.Tensor,
    i1: int,
    i: int,
    spec: QuantSpec,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the groups that begin at column ``i1 + i`` in ``rows``, fit on their
    current values.

    A row's current values from the column on are the block's (``w1``, up to date) and, right of
    the block, ``w`` less the block's pending update ``err1[:, :i] @ U[i1:i1+i, i2:]``.
    """
    i2 = i1 + w1.shape[1]
    col = i1 + i
    g = spec.group_size
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
    if spec.grouping == "kept":
        count = member.sum(dim=1)
        valid = torch.arange(g, device=w.device)[None, :] < count[:, None]
        grid = torch.zeros(rows.numel(), g, dtype=torch.float32, device=w.device)
        grid.masked_scatter_(valid, current[member[:, :span]])
    else:
        grid, valid = current, member
    return fit_groups(grid, spec, valid=valid, where=name)


def quantize_layer(
    name: str,
    reconstructed: torch.Tensor,
    keep: torch.Tensor,
    gram: torch.Tensor,
    config: PruneConfig,
    *,
    held_dtype: torch.dtype,
) -> QuantizedWeight:
    """The kept values of one pruned layer quantised as ``config.value_bits`` says.

    ``update="obs"``: :func:`obs_quantize` from the reconstructed weight on its mask (grids fit
    lazily), so the rounding error is compensated like the pruning error; ``update="none"``: round
    to nearest (:func:`~ditprune_core.quantize.quantize_weight` with the keep mask).

    Args:
        name: the layer's name, for messages.
        reconstructed: (out, in) pruned weight (zeros off the mask), float32 preferably.
        keep: (out, in) bool keep mask.
        gram: (in, in) input Gram (used by ``update="obs"``).
        config: a config with ``value_bits`` set.
        held_dtype: the dtype the model holds the layer's weight in.
    Returns:
        the layer's :class:`~ditprune_core.quantize.QuantizedWeight`.
    """
    spec = config.value_quant
    if spec is None:
        raise ValueError(f"quantize_layer of {name!r}: the config has no value_bits")
    if config.update == "obs":
        params = config.reconstruct
        return obs_quantize(
            reconstructed,
            gram,
            keep,
            spec,
            held_dtype=held_dtype,
            blocksize=params.blocksize,
            damp=params.damp,
            name=name,
        )
    return quantize_weight(reconstructed, spec, keep=keep, where=name)
