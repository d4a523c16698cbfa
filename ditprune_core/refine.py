"""Block refinement: the kept weights of a pruned transformer block, fitted together to the dense block.

Reconstruction (:mod:`~ditprune_core.reconstruct`) fits each layer alone to its own dense output on
its calibration inputs. The layers of one transformer block then still compound their errors
through attention, the MLP's nonlinearity and the modulation. Block refinement (BRECQ's block
reconstruction, OBS-Diff's module packages) fits them together, with every mask held fixed::

    min_{W'_l, l in block}  Σ_c w_c ||B'(x_c) - B(x_c)||²   subject to  W'_l = 0 where the masks prune

where ``x_c`` are the inputs of the block in calibration call ``c`` *on the model pruned upstream of
it* (so the block also learns to absorb the errors that reach it), ``B`` the dense block, ``B'`` the
pruned one and ``w_c`` the call's timestep weight. It is solved by Adam on one recorded call per
step, with the gradient and the weights multiplied by the mask after every step, so the pruned zeros
stay exactly zero and the achieved sparsity is unchanged. Only weights are refined; biases,
norms and the layers that are not pruned stay as they are.

Two pieces: :class:`BlockCallRecorder` records a block's forward calls (a uniform sample of at most
``max_calls``) while the calibration runs; :func:`refine_block_` fits the pruned block's kept weights.
:func:`~ditprune_core.sequential.prune_sequential_` runs both per block with
``ReconstructParams(block_refine_steps=...)``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "REFINE_STEPS",
    "BlockCall",
    "BlockCallRecorder",
    "BlockRefinement",
    "block_output_error",
    "holdout_split",
    "refine_block_",
]

#: how Adam's step is sized: ``"absolute"``, ``lr`` in weight units for every layer (the step moves
#: every weight by about ``lr`` whatever its size); ``"relative"``, ``lr`` times the layer's RMS of
#: kept weights (scale-invariant: scaling a layer's weights by k scales its steps by k)
REFINE_STEPS = ("absolute", "relative")

log = logging.getLogger("ditprune")


@dataclass(frozen=True)
class BlockCall:
    """One recorded forward call of a block: its arguments (tensors detached and copied) and the
    calibration's timestep weight at that call."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0


def _copy_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it: tuples, lists, dicts and dataclass
    instances (ComfyUI passes modulations as ``ModulationOut``) are walked, other objects kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = copy.copy(value)
        for f in dataclasses.fields(value):
            object.__setattr__(out, f.name, _map_tensors(getattr(value, f.name), fn))
        return out
    return value


def _normal(value: Any) -> Any:
    """``value`` with its inference tensors (recorded under ``torch.inference_mode()``, as ComfyUI
    runs every prompt) cloned into normal ones, which autograd can save; call outside inference mode."""
    return _map_tensors(value, lambda t: t.clone() if t.is_inference() else t)


def _snapshot(value: Any) -> Any:
    """Detached copies of the tensors in ``value`` (containers walked as :func:`_map_tensors` does)."""
    return _map_tensors(value, lambda t: t.detach().clone())


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its tensors copied, the floating ones in ``dtype`` (containers walked). Always a
    copy: a host's block may update its inputs in place (ComfyUI's FLUX blocks do ``txt += ...``),
    which would change the recording and, under autograd, chain one step's graph into the next."""
    return _map_tensors(value, lambda t: t.to(dtype, copy=True) if t.is_floating_point() else t.clone())


def _tensors(output: Any) -> list[torch.Tensor]:
    """The floating tensors of a block's output (a tensor, or a tuple/list of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    return []


class BlockCallRecorder:
    """Context manager that records a block's forward calls while the model runs.

    At most ``max_calls`` calls are kept: a uniform sample of all calls (reservoir sampling, seeded),
    each with the timestep weight ``weight_of()`` returns at that call (the active
    :class:`~ditprune_core.calibrate.Calibrator`'s ``current_weight``). The recorded tensors stay on
    the device they were on: one call of a FLUX.1-dev double block at 1024² with both CFG halves is
    about 110 MB in float32.

    Args:
        block: the block module (hooked with a forward hook, removed on exit).
        max_calls: how many calls to keep at most (>= 1).
        weight_of: the weight of the call being made now.
        seed: seed of the reservoir sample.
    """

    def __init__(
        self,
        block: nn.Module,
        *,
        max_calls: int,
        weight_of: Callable[[], float] = lambda: 1.0,
        seed: int = 0,
    ) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls must be >= 1, got {max_calls}")
        self.block = block
        self.max_calls = max_calls
        self.calls: list[BlockCall] = []
        self.seen = 0
        self._weight_of = weight_of
        self._gen = torch.Generator().manual_seed(seed)
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        index = self.seen
        self.seen += 1
        if index < self.max_calls:
            slot = index
        else:
            slot = int(torch.randint(0, index + 1, (1,), generator=self._gen))
            if slot >= self.max_calls:
                return
        call = BlockCall(_snapshot(args), _snapshot(kwargs), float(self._weight_of()))
        if slot == len(self.calls):
            self.calls.append(call)
        else:
            self.calls[slot] = call

    def __enter__(self) -> BlockCallRecorder:
        self._handle = self.block.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass(frozen=True)
class BlockRefinement:
    """What :func:`refine_block_` did to one block.

    Attributes:
        block: the block's name (``double_blocks.3``).
        error_before / error_after: the block's relative squared output error on its recorded calls,
            ``Σ_c w_c ||B'(x_c) - B(x_c)||² / Σ_c w_c ||B(x_c)||²``, before and after.
        calls: recorded calls it was fitted on; steps: Adam steps taken; seconds: wall time.
        reverted: True when the fit ended worse than it started and the weights were put back.
        holdout_before / holdout_after: with held-out calls, the same error on them, before and for
            the weights kept (the best on them); None without.
        best_step: with held-out calls, the step whose weights were kept (0: the starting ones).
    """

    block: str
    error_before: float
    error_after: float
    calls: int
    steps: int
    seconds: float
    reverted: bool = False
    holdout_before: float | None = None
    holdout_after: float | None = None
    best_step: int | None = None


def _run(block: nn.Module, call: BlockCall, dtype: torch.dtype) -> list[torch.Tensor]:
    return _tensors(block(*_cast(call.args, dtype), **_cast(call.kwargs, dtype)))


def _squared_error(out: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(out) != len(target) or not out:
        raise ValueError(
            f"the pruned block returned {len(out)} tensors and the dense block {len(target)}; block "
            "refinement needs a block that returns a tensor or a tuple of tensors"
        )
    return sum(((o.float() - t.float()) ** 2).sum() for o, t in zip(out, target, strict=True))  # type: ignore[return-value]


@torch.no_grad()
def _error_terms(block: nn.Module, reference: nn.Module, calls: Sequence[BlockCall]) -> tuple[float, float]:
    """``(Σ_c w_c ||block(x_c) - reference(x_c)||², Σ_c w_c ||reference(x_c)||²)``."""
    dtype = next(block.parameters()).dtype
    num = den = 0.0
    for call in calls:
        target = _run(reference, call, dtype)
        num += call.weight * float(_squared_error(_run(block, call, dtype), target))
        den += call.weight * sum(float((t.float() ** 2).sum()) for t in target)
    return num, den


def block_output_error(block: nn.Module, reference: nn.Module, calls: Sequence[BlockCall]) -> float:
    """``Σ_c w_c ||block(x_c) - reference(x_c)||² / Σ_c w_c ||reference(x_c)||²`` over ``calls``."""
    num, den = _error_terms(block, reference, calls)
    return num / den if den > 0 else 0.0


def holdout_split(calls: Sequence[BlockCall], fraction: float) -> tuple[list[BlockCall], list[BlockCall]]:
    """``(fit, held)``: every ``k``-th call (``k = round(1 / fraction)``: the ``k``-th, ``2k``-th, …)
    held out, deterministic and spread over the recording (so over timesteps and prompts alike), or
    the last call when there are fewer than ``k``; none for ``fraction <= 0`` or fewer than 2 calls.
    At least one call is always fitted on."""
    calls = list(calls)
    if fraction <= 0 or len(calls) < 2:
        return calls, []
    k = max(2, round(1.0 / fraction))
    held = {i for i in range(len(calls)) if i % k == k - 1} or {len(calls) - 1}
    return [c for i, c in enumerate(calls) if i not in held], [calls[i] for i in sorted(held)]


def _kept_rms(weight: torch.Tensor, keep: torch.Tensor) -> float:
    kept = weight.detach()[keep]
    return float(kept.float().pow(2).mean().sqrt()) if kept.numel() else 0.0


@torch.inference_mode(False)
def refine_block_(
    block: nn.Module,
    reference: nn.Module,
    layers: Mapping[str, nn.Linear],
    keep_masks: Mapping[str, torch.Tensor],
    calls: Sequence[BlockCall],
    *,
    steps: int,
    lr: float,
    seed: int = 0,
    name: str = "block",
    step: str = "absolute",
    holdout: float = 0.0,
    checks: int = 10,
) -> BlockRefinement:
    """Fit the kept weights of ``layers`` (inside ``block``) so ``block`` matches ``reference``, in place.

    Adam with a cosine-decaying learning rate from ``lr``, one recorded call per step (drawn
    uniformly, seeded), loss ``w_c ||block(x_c) - reference(x_c)||²`` over every tensor the block
    returns. After every step the weights are multiplied by their masks (and the gradients before
    it), so every pruned weight stays exactly 0. If the fit ends with a higher error on ``calls``
    than it started with, the starting weights are put back (``reverted``).

    With ``holdout > 0`` a fraction of the calls (:func:`holdout_split`) is not fitted on: the error
    on them is measured at the start and ``checks`` times during the fit, and the weights with the
    lowest held-out error are kept (early stopping). The starting weights count too: a fit that is
    worse on the held-out calls than no fit at all is never kept (``reverted``).

    It runs outside ``torch.inference_mode()`` even when called inside it (ComfyUI runs prompts
    so); ``block``'s parameters must then be normal tensors (made outside inference mode, e.g. by
    copying the block there), and recorded inference tensors in ``calls`` are cloned.

    Args:
        block: the pruned block (its layers' pruned weights already 0 where ``keep_masks`` is False);
            its other parameters are not changed. Its parameters' dtype is the working dtype
            (float32 recommended): the calls' floating tensors are cast to it.
        reference: the dense block, same architecture; it is only run.
        layers: ``{name: Linear inside block}`` whose weights are refined.
        keep_masks: ``{name: keep-mask (out, in) bool}``, for every name of ``layers``.
        calls: the block's recorded calibration calls (:class:`BlockCallRecorder`).
        steps: Adam steps (0: nothing changes).
        lr: Adam's starting learning rate: in weight units (``step="absolute"``), or relative to each
            layer's RMS of kept weights (``step="relative"``, scale-invariant).
        step: one of :data:`REFINE_STEPS`.
        holdout: fraction of the calls held out for early stopping, in [0, 1).
        checks: how many times during the fit the held-out error is measured.
    Returns:
        a :class:`BlockRefinement`.
    Raises:
        ValueError: no calls, a mask missing or of the wrong shape, or ``steps < 0`` / ``lr <= 0``.
    """
    calls = [BlockCall(_normal(c.args), _normal(c.kwargs), c.weight) for c in calls]
    if not calls:
        raise ValueError(f"{name}: no recorded calls to refine on; the calibration never ran this block")
    if steps < 0 or lr <= 0:
        raise ValueError(f"{name}: steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if step not in REFINE_STEPS:
        raise ValueError(f"{name}: unknown step {step!r}; choose from {list(REFINE_STEPS)}")
    if not 0.0 <= holdout < 1.0 or checks < 1:
        raise ValueError(f"{name}: holdout must be in [0, 1) and checks >= 1, got {holdout} and {checks}")
    calls, held = holdout_split(calls, holdout)
    for key, layer in layers.items():
        keep = keep_masks.get(key)
        if keep is None or tuple(keep.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"{name}: layer {key!r} needs a keep-mask of shape {tuple(layer.weight.shape)}, got "
                f"{None if keep is None else tuple(keep.shape)}"
            )
    start = time.perf_counter()
    weights = [layers[k].weight for k in layers]
    masks = [keep_masks[k].to(device=layers[k].weight.device, dtype=torch.bool) for k in layers]
    with torch.no_grad():
        for w, keep in zip(weights, masks, strict=True):
            w.masked_fill_(~keep, 0.0)
    initial = [w.detach().clone() for w in weights]
    num, den = _error_terms(block, reference, calls)
    before = num / den if den > 0 else 0.0
    held_before = block_output_error(block, reference, held) if held else None
    best: tuple[float, int, list[torch.Tensor]] | None = None
    if held_before is not None:
        best = (held_before, 0, initial)
    if steps == 0:
        return BlockRefinement(
            name,
            before,
            before,
            len(calls),
            0,
            time.perf_counter() - start,
            False,
            held_before,
            held_before,
            0,
        )
    dtype = weights[0].dtype
    scale = max(den / len(calls), 1e-30)  # the loss of one step estimates the relative error
    flags = {p: p.requires_grad for p in block.parameters()}
    gen = torch.Generator().manual_seed(seed)
    # each layer its own group: its starting rate, in weight units or relative to its kept weights
    rates = [
        lr * (_kept_rms(w, keep) or 1.0) if step == "relative" else lr
        for w, keep in zip(weights, masks, strict=True)
    ]
    check_at = {round(steps * (i + 1) / checks) for i in range(checks)}
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam([{"params": [w], "lr": r} for w, r in zip(weights, rates, strict=True)])
        with torch.enable_grad():
            for index in range(steps):
                decay = 0.5 * (1.0 + math.cos(math.pi * index / steps))
                for group, rate in zip(opt.param_groups, rates, strict=True):
                    group["lr"] = rate * decay
                call = calls[int(torch.randint(0, len(calls), (1,), generator=gen))]
                with torch.no_grad():
                    target = _run(reference, call, dtype)
                opt.zero_grad(set_to_none=True)
                # every tensor autograd saves is copied when saved: a host's block may update its
                # activations in place (ComfyUI's FLUX blocks do `img += ...`), which would otherwise
                # corrupt what the backward pass needs
                with torch.autograd.graph.saved_tensors_hooks(_copy_saved, _same):
                    loss = call.weight * _squared_error(_run(block, call, dtype), target) / scale
                loss.backward()
                with torch.no_grad():
                    for w, keep in zip(weights, masks, strict=True):
                        if w.grad is not None:
                            w.grad.masked_fill_(~keep, 0.0)
                    opt.step()
                    for w, keep in zip(weights, masks, strict=True):
                        w.masked_fill_(~keep, 0.0)
                if best is not None and index + 1 in check_at:
                    error = block_output_error(block, reference, held)
                    if error < best[0]:
                        best = (error, index + 1, [w.detach().clone() for w in weights])
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    if best is not None:  # early stopping: the weights best on the held-out calls (the start included)
        with torch.no_grad():
            for w, kept in zip(weights, best[2], strict=True):
                w.copy_(kept)
        after = block_output_error(block, reference, calls)
        reverted = best[1] == 0
        if reverted:
            log.warning(
                "%s: block refinement did not lower the held-out error (%.4g); weights put back",
                name,
                held_before,
            )
        seconds = time.perf_counter() - start
        return BlockRefinement(
            name, before, after, len(calls), steps, seconds, reverted, held_before, best[0], best[1]
        )
    after = block_output_error(block, reference, calls)
    reverted = not after <= before
    if reverted:
        with torch.no_grad():
            for w, w0 in zip(weights, initial, strict=True):
                w.copy_(w0)
        log.warning("%s: block refinement ended worse (%.4g > %.4g); weights put back", name, after, before)
        after = before
    seconds = time.perf_counter() - start
    log.info(
        "%s: block output error %.4g -> %.4g (%d calls, %d steps, %.1f s)",
        *(name, before, after, len(calls), steps, seconds),
    )
    return BlockRefinement(name, before, after, len(calls), steps, seconds, reverted)
