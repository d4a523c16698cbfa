"""Reconstruction: prune a Linear layer and compensate its kept weights (OBS / SparseGPT, refit).

A layer ``y = W x`` with calibration inputs ``X`` (in, tokens) is pruned to a keep-mask and its kept
weights are changed so that the output on the calibration inputs moves as little as possible::

    min_{W'}  ||(W' - W) X||²   subject to  W'_ij = 0 where the mask prunes

Everything needed is the layer's input Gram matrix ``H = Σ_t w_t x_t x_tᵀ / Σ_t w_t`` (in, in)
(:class:`GramAccumulator`, with the same timestep weighting and token counting as
:class:`~ditprune_core.stats.ChannelSquareMean`, whose mean of x² is ``diag(H)``). The
relative output error of a candidate ``W'`` is ``tr(Δ H Δᵀ) / tr(W H Wᵀ)`` with ``Δ = W' - W``
(:func:`relative_output_error`).

The OBS column sweep itself (pruning, quantising, or both) lives in :mod:`ditprune_core.obs`
(:func:`~ditprune_core.obs.obs_prune`, :func:`~ditprune_core.obs.obs_quantize`, re-exported here).
This module adds:

- :func:`refit_masked`: the masked least-squares problem above solved for a fixed mask, exactly per
  output row (small layers), or by batched preconditioned conjugate gradient warm-started from the
  OBS result (large layers).
- :func:`allocate_block_counts` and :func:`plan_groups`: how a block's prune count is shared among
  its layers, and which layers are calibrated together under a memory budget.
- :func:`allocate_upgrades`: which layers mixed precision (``PruneConfig.upgrade_share``) stores at
  more bits.
- :func:`reconstruct_layer` and :func:`quantize_layer`: one layer as a :class:`PruneConfig` says
  (the per-layer dispatch that :func:`~ditprune_core.sequential.prune_sequential_` runs).

All maths runs in float32 on the weight's device; the returned weight has the input's dtype.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import PruneConfig, parse_pattern
from .mask import layer_keep_mask
from .obs import (
    GRANULARITIES,
    QUANT_GRIDS,
    ObsResult,
    dampened,
    obs_prune,
    obs_quantize,
    relative_output_error,
    shrunk,
)
from .quantize import QuantizedWeight, QuantSpec, fake_quantize, quantize_weight
from .stats import CalibrationError, GramAccumulator, check_gram

__all__ = [
    "GRANULARITIES",
    "QUANT_GRIDS",
    "REFIT_METHODS",
    "GramAccumulator",
    "LayerReconstruction",
    "ObsResult",
    "RefitInfo",
    "allocate_block_counts",
    "allocate_upgrades",
    "dampened",
    "obs_prune",
    "obs_quantize",
    "plan_groups",
    "quantize_layer",
    "reconstruct_layer",
    "refit_masked",
    "relative_output_error",
    "rounding_cost",
]

log = logging.getLogger("ditprune")

REFIT_METHODS = ("auto", "exact", "pcg")
_EXACT_BATCH_ELEMENTS = 1 << 24  # (rows, in, in) systems of the exact refit: at most 64 MB at once


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


def rounding_cost(
    weight: torch.Tensor, energy: torch.Tensor, spec: QuantSpec, *, name: str = "weight"
) -> float:
    """Estimated relative output error of rounding ``weight`` to nearest with ``spec``:
    ``Σ_ij e_ij² a_j / Σ_ij w_ij² a_j`` with ``e`` the rounding error and ``a = energy`` each input
    channel's mean square (``E[x²]``, the Gram's diagonal); 0 for a layer with no output energy."""
    w = weight.detach().float()
    a = energy.to(w.device, torch.float32).clamp_min(0.0)
    total = float((w.square() * a).sum())
    if total <= 0.0:
        return 0.0
    e = fake_quantize(w, spec, where=name) - w
    return float((e.square() * a).sum()) / total


def allocate_upgrades(
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]], spec: QuantSpec, share: float
) -> tuple[str, ...]:
    """The layers that mixed precision stores at more bits: those whose rounding costs most per weight.

    Each layer's cost is :func:`rounding_cost` at ``spec`` (the bits every other layer gets) divided
    by its weight count: upgrading a layer removes most of its rounding error, and costs bits in
    proportion to its size. Layers are taken by that cost, highest first (ties by name), each while
    the upgraded weights stay within ``share`` of all the layers' weights; a layer that would go over
    is passed and smaller ones after it may still fit. The choice is made on the dense weights,
    before any is pruned: an estimate, which the final layers' output errors in the report check.

    Args:
        layers: ``{name: (weight (out, in), energy (in,))}``.
        spec: the spec of the layers that are not upgraded.
        share: the most of all the weights that may be upgraded, in [0, 1).
    Returns:
        the upgraded layers' names, most costly per weight first.
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"upgrade share must be in [0, 1), got {share}")
    sizes = {name: w.numel() for name, (w, _a) in layers.items()}
    per_weight = {name: rounding_cost(w, a, spec, name=name) / sizes[name] for name, (w, a) in layers.items()}
    allowed, used, chosen = share * sum(sizes.values()), 0, []
    for name in sorted(per_weight, key=lambda n: (-per_weight[n], n)):
        if used + sizes[name] <= allowed:
            chosen.append(name)
            used += sizes[name]
    return tuple(chosen)


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
    name: str, weight: torch.Tensor, gram: torch.Tensor, config: PruneConfig, *, shrink: float = 0.0
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
        shrink: the Gram's shrinkage toward its diagonal in the update and the refit
            (:func:`~ditprune_core.obs.shrunk`; the caller picks the layer's, ``reconstruct.shrink``
            or ``shrink_text``); the report's errors are on ``gram`` as given.
    Returns:
        ``(new weight (out, in) in weight's dtype, keep-mask (out, in) bool, report)``.
    """
    start = time.perf_counter()
    params = config.reconstruct
    measured, gram = gram, shrunk(gram, shrink)
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
    error = relative_output_error(new, w32, measured)
    mask_only = relative_output_error(w32 * keep, w32, measured)
    sparsity = 1.0 - int(keep.sum()) / keep.numel()
    report = LayerReconstruction(name, sparsity, error, mask_only, time.perf_counter() - start, info)
    return new.to(weight.dtype), keep, report


# ---------------------------------------------------------------------------------------------------
# quantised kept values: the joint OBS pass (pruning and rounding errors compensated together)


def quantize_layer(
    name: str,
    reconstructed: torch.Tensor,
    keep: torch.Tensor | None,
    gram: torch.Tensor,
    config: PruneConfig,
    *,
    held_dtype: torch.dtype,
    shrink: float = 0.0,
) -> QuantizedWeight:
    """The kept values of one pruned layer quantised as ``config.value_bits`` says.

    ``update="obs"``: :func:`obs_quantize` from the reconstructed weight on its mask (grids fit
    lazily), so the rounding error is compensated like the pruning error; ``update="none"``: round
    to nearest (:func:`~ditprune_core.quantize.quantize_weight` with the keep mask). With ``keep``
    None (quantise only) the whole weight is quantised: under ``update="obs"`` by the same sweep on
    a mask that keeps every weight (GPTQ, compensating the value the model holds), and the codes
    come back dense (no keep mask: what the dense layout stores), the Gram dampened by
    ``reconstruct.dense_damp`` instead of ``damp``.

    Args:
        name: the layer's name, for messages.
        reconstructed: (out, in) pruned weight (zeros off the mask), float32 preferably.
        keep: (out, in) bool keep mask, or None: every weight kept (quantise only).
        gram: (in, in) input Gram (used by ``update="obs"``).
        config: a config with ``value_bits`` set.
        held_dtype: the dtype the model holds the layer's weight in.
        shrink: the Gram's shrinkage toward its diagonal in the sweep (as :func:`reconstruct_layer`).
    Returns:
        the layer's :class:`~ditprune_core.quantize.QuantizedWeight`.
    """
    spec = config.value_quant
    if spec is None:
        raise ValueError(f"quantize_layer of {name!r}: the config has no value_bits")
    if config.update == "obs":
        params = config.reconstruct
        whole = torch.ones(reconstructed.shape, dtype=torch.bool, device=reconstructed.device)
        q = obs_quantize(
            reconstructed,
            shrunk(gram, shrink),
            whole if keep is None else keep,
            spec,
            held_dtype=held_dtype,
            blocksize=params.blocksize,
            damp=params.damp if keep is not None else params.dense_damp,
            name=name,
        )
        if keep is None:  # every weight kept: the same codes and groups, as a dense weight's
            q = QuantizedWeight(q.codes.reshape(q.shape), q.scales, q.zeros, q.shape, q.spec)
        return q
    return quantize_weight(reconstructed, spec, keep=keep, where=name)
