"""Reconstruction lab: mask-only pruning vs SparseGPT vs DiT-Pruning with OBS update / refit, on MiniFlux.

    python -m bench.reconstruction_lab                 # final table, both models
    python -m bench.reconstruction_lab --quick --variants sparsegpt-seq energy-refit-seq

Same calibration (2 seeds x 10 digits per class, 20 Euler steps, cfg 2, log timestep weighting, as
``bench/quality.py``), same evaluation (relative error of the final samples against the dense model
from the same noise, mean over evaluation seeds). Every variant sees the same calibration:

- one-shot (``-1s``): the Grams of all layers are gathered on the dense model in one pass;
- sequential (``-seq``): layers in forward order are split into groups (one transformer block each);
  for each group the Grams are gathered while the calibration sampler runs on the partially pruned
  model, the group's layers are pruned and updated, and the Grams are freed. Every sequential variant
  runs the same number of calibration passes.

The mask-only DiT-Pruning defaults (``dit-pruning``) are exactly the quality benchmark's row.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ditprune_core.calibrate import Calibrator, GramRecorder
from ditprune_core.config import PruneConfig, ReconstructParams
from ditprune_core.mask import layer_keep_mask
from ditprune_core.miniflux.pipeline import MiniFluxPipeline, sigma_schedule
from ditprune_core.obs import obs_prune, relative_output_error, sparsegpt_prune
from ditprune_core.reconstruct import reconstruct_layer, refit_masked

from . import write_report
from .context import SETTINGS, BenchContext
from .error_correction import PairedGramAccumulator, corrected_weight

log = logging.getLogger("ditprune")

#: ``fn(name, weight, gram, sparsity, pattern) -> new weight``
LayerFn = Callable[[str, torch.Tensor, torch.Tensor, float, str], torch.Tensor]
CAL_SEEDS = (1000, 1001)
CAL_PER_CLASS = 10


@dataclass(frozen=True)
class Recipe:
    """How one layer is pruned and compensated."""

    mask: str = "obs"  # "obs": chosen inside the update; "energy": DiT-Pruning energy mask, fixed
    balance: float = 0.5
    damp: float = 0.01
    blocksize: int = 128
    refit: str = "none"  # "none", "exact", "pcg"
    refit_damp: float = 0.01
    refit_iters: int = 20
    refit_tol: float = 1e-4
    update: bool = True  # OBS update (False: mask alone, then refit if asked)

    def product_config(self, s: float, pattern: str) -> PruneConfig | None:
        """The :class:`PruneConfig` under which the product's own per-layer dispatch
        (:func:`~ditprune_core.reconstruct.reconstruct_layer`) is this recipe, or None for the
        lab-only recipes (the mask alone then a refit, or a refit dampened apart from the update)."""
        if not self.update or self.refit_damp != self.damp:
            return None
        params = ReconstructParams(
            mask="metric" if self.mask == "energy" else "in-update",
            balance=self.balance,
            damp=self.damp,
            blocksize=self.blocksize,
            refit=self.refit,
            refit_iters=self.refit_iters,
            refit_tol=self.refit_tol,
        )
        if self.mask == "energy":  # the metric mask with the config's own (default) comparison group
            return PruneConfig(s, pattern=pattern, update="obs", reconstruct=params)
        return PruneConfig(s, pattern=pattern, granularity="layer", update="obs", reconstruct=params)

    def __call__(
        self, name: str, weight: torch.Tensor, gram: torch.Tensor, s: float, pattern: str
    ) -> torch.Tensor:
        config = self.product_config(s, pattern)
        if config is not None:  # the product's dispatch itself: the lab's rows cannot drift from it
            return reconstruct_layer(name, weight, gram, config)[0]
        return self.lab_only(name, weight, gram, s, pattern)

    def lab_only(
        self, name: str, weight: torch.Tensor, gram: torch.Tensor, s: float, pattern: str
    ) -> torch.Tensor:
        """The recipes the product does not offer, spelled out with the core's pieces."""
        nm = None if pattern == "unstructured" else pattern
        keep = None
        if self.mask == "energy":
            keep = layer_keep_mask(name, weight, gram.diagonal().double(), PruneConfig(s, pattern=pattern))
        if self.update:
            res = obs_prune(
                weight,
                gram,
                sparsity=s,
                pattern=nm,
                keep_mask=keep,
                balance=self.balance,
                damp=self.damp,
                blocksize=self.blocksize,
                name=name,
            )
            new, keep = res.weight, res.keep_mask
        else:
            assert keep is not None
            new = weight.masked_fill(~keep, 0.0)
        if self.refit != "none":
            new, _info = refit_masked(
                weight,
                gram,
                keep,
                init=new,
                method=self.refit,
                damp=self.refit_damp,
                iters=self.refit_iters,
                tol=self.refit_tol,
                name=name,
            )
        return new


def sparsegpt_layer(
    name: str, weight: torch.Tensor, gram: torch.Tensor, s: float, pattern: str
) -> torch.Tensor:
    return sparsegpt_prune(
        weight, gram, sparsity=s, pattern=None if pattern == "unstructured" else pattern, name=name
    ).weight


#: ``prune_sequential_`` rows: name -> PruneConfig keywords besides sparsity, pattern, update="obs"
PRODUCT: dict[str, dict[str, Any]] = {
    "dit-obs": {},
    "dit-obs-uniform": {"reconstruct": ReconstructParams(allocation="uniform")},
    "dit-obs-spread0.2": {"reconstruct": ReconstructParams(allocation_spread=0.2)},
    "dit-obs-spread0.45": {"reconstruct": ReconstructParams(allocation_spread=0.45)},
    "dit-obs-b0.3": {"reconstruct": ReconstructParams(balance=0.3)},
    "dit-obs-b0.5": {"reconstruct": ReconstructParams(balance=0.5)},
    "dit-obs-norefit": {"reconstruct": ReconstructParams(refit="none")},
    "dit-obs-damp0.001": {"reconstruct": ReconstructParams(damp=0.001)},
    "dit-obs-damp0.1": {"reconstruct": ReconstructParams(damp=0.1)},
    "dit-obs-damp1": {"reconstruct": ReconstructParams(damp=1.0)},
    "dit-obs-noblock": {"reconstruct": ReconstructParams(block_refine_steps=0)},
    "dit-obs-refine300": {"reconstruct": ReconstructParams(block_refine_steps=300)},
    "dit-obs-refine1000": {"reconstruct": ReconstructParams(block_refine_steps=1000)},
    "dit-obs-refine300-lr1e-3": {
        "reconstruct": ReconstructParams(block_refine_steps=300, block_refine_lr=1e-3)
    },
    "dit-obs-refine300-lr1e-2": {
        "reconstruct": ReconstructParams(block_refine_steps=300, block_refine_lr=1e-2)
    },
    "dit-obs-v8": {"value_bits": 8},
    "dit-obs-v4": {"value_bits": 4},
    "dit-obs-v3": {"value_bits": 3},
}


def variants() -> dict[str, LayerFn]:
    """The layer recipes the lab can run; ``-1s`` / ``-seq`` suffixes choose one-shot or sequential."""
    out: dict[str, LayerFn] = {"sparsegpt": sparsegpt_layer}
    for b in (0.3, 0.4, 0.5, 0.6):
        out[f"obs-b{b}"] = Recipe(balance=b)
        out[f"obs-b{b}-refit"] = Recipe(balance=b, refit="exact")
    out["energy-obs"] = Recipe(mask="energy")
    out["energy-refit"] = Recipe(mask="energy", update=False, refit="exact")
    out["energy-obs-refit"] = Recipe(mask="energy", refit="exact")
    for d in (1e-4, 1e-3, 0.1):
        out[f"energy-refit-d{d}"] = Recipe(mask="energy", update=False, refit="exact", refit_damp=d)
        out[f"obs-b0.5-refit-d{d}"] = Recipe(balance=0.5, refit="exact", refit_damp=d)
    for it in (1, 3, 5, 10, 20):
        out[f"energy-obs-pcg{it}"] = Recipe(mask="energy", refit="pcg", refit_iters=it, refit_tol=0.0)
    for it in (1, 3, 5, 10, 20, 40):
        out[f"obs-b0.4-pcg{it}"] = Recipe(balance=0.4, refit="pcg", refit_iters=it, refit_tol=0.0)
    for tol in (1e-2, 1e-3, 1e-4):
        out[f"obs-b0.4-pcg-tol{tol}"] = Recipe(balance=0.4, refit="pcg", refit_iters=500, refit_tol=tol)
    return out


def forward_order(pipe: MiniFluxPipeline, layers: dict[str, nn.Linear]) -> list[str]:
    """Layer names in the order their first forward call happens (one tiny guided step)."""
    seen: list[str] = []
    handles = [
        layer.register_forward_hook(lambda _m, _i, _o, n=name: seen.append(n) if n not in seen else None)
        for name, layer in layers.items()
    ]
    try:
        labels = torch.arange(2)
        with torch.no_grad():
            pipe.guided_velocity(pipe.initial_noise(2, 0), 1.0, labels, 2.0)
    finally:
        for h in handles:
            h.remove()
    return seen


def block_groups(order: Sequence[str]) -> list[list[str]]:
    """Consecutive layers of the same transformer block (``double_blocks.N`` / ``single_blocks.N``)."""
    groups: list[list[str]] = []
    for name in order:
        block = ".".join(name.split(".")[:2])
        if groups and ".".join(groups[-1][0].split(".")[:2]) == block:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


class Lab:
    """One model: calibration, dense runs, one-shot Grams; runs variants."""

    def __init__(
        self, model: str, *, seeds: Sequence[int], per_class: int, ctx: BenchContext | None = None
    ) -> None:
        self.ctx = ctx if ctx is not None else BenchContext.build(model, seeds=seeds, per_class=per_class)
        self.pipe = self.ctx.pipe
        self.layers = PruneConfig(0.5)
        self.correction_damp = 0.01
        from ditprune_core.prune import select_layers

        self._select = select_layers
        layers = select_layers(self.pipe.model, self.layers)
        self.order = forward_order(self.pipe, layers)
        self.groups = block_groups(self.order)
        start = time.perf_counter()
        self.grams = self._gather(self.pipe, layers)
        self.gram_seconds = time.perf_counter() - start

    def run_calibration(self, pipe: MiniFluxPipeline, rec: GramRecorder | Calibrator) -> None:
        """The calibration of ``bench/quality.py``: both CFG halves, log weighting."""
        labels = self.ctx.calibration_labels(CAL_PER_CLASS)
        for seed in CAL_SEEDS:
            pipe.sample(labels, seed=seed, steps=self.ctx.steps, cfg=self.ctx.cfg, on_step=rec.on_step)

    def _gather(self, pipe: MiniFluxPipeline, layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        with GramRecorder(layers, weighting="log") as rec:
            self.run_calibration(pipe, rec)
        return rec.grams()

    def oneshot(self, fn: LayerFn, s: float, pattern: str) -> tuple[MiniFluxPipeline, float]:
        model = copy.deepcopy(self.pipe.model)
        layers = self._select(model, self.layers)
        err = []
        with torch.no_grad():
            for name in self.order:
                w = layers[name].weight
                new = fn(name, w.detach().clone(), self.grams[name], s, pattern)
                err.append(relative_output_error(new, w, self.grams[name]))
                w.copy_(new)
        return MiniFluxPipeline(model, self.pipe.conditioner), float(np.mean(err))

    def sequential(self, fn: LayerFn, s: float, pattern: str) -> tuple[MiniFluxPipeline, float]:
        model = copy.deepcopy(self.pipe.model)
        pipe = MiniFluxPipeline(model, self.pipe.conditioner)
        layers = self._select(model, self.layers)
        err = []
        for group in self.groups:
            grams = self._gather(pipe, {n: layers[n] for n in group})
            with torch.no_grad():
                for name in group:
                    w = layers[name].weight
                    new = fn(name, w.detach().clone(), grams[name], s, pattern)
                    err.append(relative_output_error(new, w, grams[name]))
                    w.copy_(new)
            del grams
        return pipe, float(np.mean(err))

    def _gather_paired(
        self, pipe: MiniFluxPipeline, layers: dict[str, nn.Linear]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Grams of the pruned model's inputs and cross-Grams with the dense model's, same tokens.

        The sampler follows the pruned model; at every step the dense model also runs on the same
        latent, so that each layer sees (pruned input, dense input) pairs.
        """
        from ditprune_core.calibrate import log_timestep_weight

        dense_layers = self._select(self.pipe.model, self.layers)
        accs = {n: PairedGramAccumulator(layers[n].in_features, name=n) for n in layers}
        pending: dict[str, torch.Tensor] = {}
        weight = [1.0]

        def grab(name: str) -> Callable[..., None]:
            return lambda _m, inputs, _o: pending.__setitem__(name, inputs[0].detach())

        def pair(name: str) -> Callable[..., None]:
            return lambda _m, inputs, _o: accs[name].add_pair(pending.pop(name), inputs[0], weight[0])

        handles = [layers[n].register_forward_hook(grab(n)) for n in layers]
        handles += [dense_layers[n].register_forward_hook(pair(n)) for n in layers]
        try:
            labels = self.ctx.calibration_labels(CAL_PER_CLASS)
            sigmas = sigma_schedule(self.ctx.steps)
            with torch.no_grad():
                for seed in CAL_SEEDS:
                    x = pipe.initial_noise(labels.shape[0], seed)
                    for i in range(self.ctx.steps):
                        sigma = float(sigmas[i])
                        weight[0] = log_timestep_weight(sigma)
                        v = pipe.guided_velocity(x, sigma, labels, self.ctx.cfg)
                        self.pipe.guided_velocity(x, sigma, labels, self.ctx.cfg)
                        x = x + float(sigmas[i + 1] - sigmas[i]) * v
        finally:
            for h in handles:
                h.remove()
        return {n: acc.finalize() for n, acc in accs.items()}

    def twin(self, fn: LayerFn, s: float, pattern: str) -> tuple[MiniFluxPipeline, float]:
        """Sequential, and each layer's target is the dense layer on dense inputs (error correction)."""
        model = copy.deepcopy(self.pipe.model)
        pipe = MiniFluxPipeline(model, self.pipe.conditioner)
        layers = self._select(model, self.layers)
        err = []
        for group in self.groups:
            paired = self._gather_paired(pipe, {n: layers[n] for n in group})
            with torch.no_grad():
                for name in group:
                    h, c = paired[name]
                    w = layers[name].weight
                    target = corrected_weight(w, h, c, damp=self.correction_damp)
                    new = fn(name, target.clone(), h, s, pattern)
                    err.append(relative_output_error(new, target, h))
                    w.copy_(new)
            del paired
        return pipe, float(np.mean(err))

    def product(self, config: PruneConfig) -> tuple[MiniFluxPipeline, float]:
        """``prune_sequential_`` itself, one pass (every Gram fits), the lab's calibration."""
        from ditprune_core.sequential import prune_sequential_

        model = copy.deepcopy(self.pipe.model)
        pipe = MiniFluxPipeline(model, self.pipe.conditioner)
        report = prune_sequential_(
            model,
            lambda cal: self.run_calibration(pipe, cal),
            config,
            memory_budget_bytes=1 << 34,
            weighting="log",
        )
        return pipe, float(np.mean([r.output_error for r in report.layers]))

    def mask_only_defaults(self, s: float, pattern: str) -> MiniFluxPipeline:
        return self.ctx.pruned(PruneConfig(s, pattern=pattern))


@dataclass
class Row:
    model: str
    variant: str
    setting: str
    rel_err: list[float]
    layer_err: float
    seconds: float
    rel_mse: list[float] = field(default_factory=list)
    #: held out: the same on the classes the calibration never saw (empty: every class calibrated)
    held_rel_err: list[float] = field(default_factory=list)
    held_rel_mse: list[float] = field(default_factory=list)


def merge_lab_rows(parts: Sequence[Sequence[Row]]) -> list[Row]:
    """Rows of runs on the two calibration halves as one table: each metric's values concatenated,
    seconds and layer error averaged."""
    out: dict[tuple[str, str, str], list[Row]] = {}
    for part in parts:
        for r in part:
            out.setdefault((r.model, r.variant, r.setting), []).append(r)
    return [
        Row(
            model,
            variant,
            setting,
            [v for r in rs for v in r.rel_err],
            float(np.mean([r.layer_err for r in rs])),
            float(np.mean([r.seconds for r in rs])),
            [v for r in rs for v in r.rel_mse],
            [v for r in rs for v in r.held_rel_err],
            [v for r in rs for v in r.held_rel_mse],
        )
        for (model, variant, setting), rs in out.items()
    ]


def run_lab(
    model: str,
    names: Sequence[str],
    settings: Sequence[str],
    *,
    seeds: Sequence[int],
    per_class: int,
    full: bool,
    calibration_classes: Sequence[int] | None = None,
) -> list[Row]:
    ctx = BenchContext.build(model, seeds=seeds, per_class=per_class, calibration_classes=calibration_classes)
    lab = Lab(model, seeds=seeds, per_class=per_class, ctx=ctx)
    table = variants()
    rows = []
    for setting in settings:
        s, pattern = SETTINGS[setting]
        for name in names:
            start = time.perf_counter()
            layer_err = float("nan")
            if name == "dit-pruning":
                pipe = lab.mask_only_defaults(s, pattern)
            elif name in PRODUCT:
                pipe, layer_err = lab.product(PruneConfig(s, pattern=pattern, update="obs", **PRODUCT[name]))
            else:
                base, mode = name.rsplit("-", 1)
                if mode not in ("1s", "seq", "twin") or base not in table:
                    raise ValueError(
                        f"unknown variant {name!r}: use dit-pruning or <recipe>-1s / -seq / -twin, "
                        f"recipes {list(table)}"
                    )
                runner = {"1s": lab.oneshot, "seq": lab.sequential, "twin": lab.twin}[mode]
                pipe, layer_err = runner(table[base], s, pattern)
            seconds = time.perf_counter() - start
            metrics = lab.ctx.evaluate(pipe, full=full)
            rows.append(
                Row(
                    model,
                    name,
                    setting,
                    metrics["rel_err"],
                    layer_err,
                    seconds,
                    metrics["rel_mse"],
                    metrics.get("held_rel_err", []),
                    metrics.get("held_rel_mse", []),
                )
            )
            log.info(
                "%s %s %s: rel err %.4f  layer err %.4f  (%.1f s)",
                model,
                name,
                setting,
                np.mean(metrics["rel_err"]),
                layer_err,
                seconds,
            )
    return rows


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.4f}" if len(values) == 1 else f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def to_markdown(rows: Sequence[Row], command: str) -> str:
    lines = [
        "# Reconstruction lab (generated)",
        "",
        f"Command: `{command}`. Written by `bench/reconstruction_lab.py`; do not edit by hand.",
        "",
        "Relative error of the final samples against the dense model from the same noise (mean ± std over",
        "evaluation seeds), same calibration for every row. `layer err` is the mean over layers of the",
        "relative output error on each layer's own calibration Gram. `-1s`: one-shot; `-seq`: sequential,",
        "one calibration pass per transformer block. Seconds: pruning incl. calibration passes.",
        "`rel. MSE`: the relative squared error of the same samples (mean of ||Δ||²/||dense||²), the",
        "metric the issues' own figures are in; a ratio of relative errors is squared in it.",
        "",
        "Variants: `dit-pruning`: the mask-only defaults (`PruneConfig(s)`); `sparsegpt`: SparseGPT's",
        "own algorithm (mask chosen in the update, β = 0.5, no refit); `dit-obs`: `prune_sequential_`",
        'with `PruneConfig(s, update="obs")`, the shipped defaults (mask in the update with β = 0.4,',
        "block allocation, exact refit up to 1024 inputs, so everywhere on MiniFlux; block refinement",
        "off), one pass; `dit-obs-noblock`: the same, refinement explicitly off;",
        '`obs-b0.4-refit`: the same with `allocation="uniform"`, one-shot; `obs-b0.4`: the OBS update alone,',
        "β = 0.4, no refit, uniform; `energy-refit`: the mask-only DiT-Pruning mask, then the exact",
        "refit; `obs-b0.4-pcgK`: OBS β = 0.4 then K PCG iterations instead of the exact refit (what",
        "FLUX.1-dev's wide layers get), `pcg-tolT`: PCG until every row's residual is below T.",
        "`dit-obs-refineN`: `dit-obs` with N steps of block refinement (`block_refine_steps=N`,",
        "Adam lr 3e-3 unless named): each block's kept weights fitted together to the dense block's output",
        "on the calls the upstream-pruned model makes, masks fixed; one calibration run more per block.",
        "",
    ]
    held = any(r.held_rel_mse for r in rows)
    if held:
        lines += [
            "Protocol (held out, the default): each model is calibrated on half of its digit classes (0-4,",
            "then the swap 5-9; 10 samples a class per calibration seed 1000 and 1001) and evaluated on 10",
            "samples of every class of the half it saw (seen) and of the half it never saw (held out), the",
            "same noise for dense and pruned; each figure is the mean (± std) over both halves and the",
            "evaluation seeds, held/seen the ratio of the mean relative MSEs. The ratios below are held out.",
            "`dit-obs-dampD`: the defaults with the Gram dampened by D of its mean diagonal (default 0.01);",
            "`-spreadS`: block allocation spread S (default 0.3); `-uniform`: no allocation.",
            "",
            "| model | variant | sparsity | held-out rel. MSE ↓ | seen rel. MSE ↓ | held/seen "
            "| held-out rel. error ↓ | layer err | seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r.model} | {r.variant} | {r.setting} | {_cell(r.held_rel_mse)} | {_cell(r.rel_mse)} | "
                f"{np.mean(r.held_rel_mse) / np.mean(r.rel_mse):.2f} | {_cell(r.held_rel_err)} | "
                f"{r.layer_err:.4f} | {r.seconds:.1f} |"
            )
    else:
        lines += [
            "| model | variant | sparsity | rel. error ↓ | rel. MSE ↓ | layer err | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r.model} | {r.variant} | {r.setting} | {_cell(r.rel_err)} | {_cell(r.rel_mse)} | "
                f"{r.layer_err:.4f} | {r.seconds:.1f} |"
            )
    lines += ["", *_ratios(rows)]
    return "\n".join(lines)


#: the issue's targets for the shipped defaults: (rival, how many times less error)
TARGETS = {"dit-pruning": 3.0, "sparsegpt-1s": 1.25}


def _ratios(rows: Sequence[Row]) -> list[str]:
    """How many times less error ``dit-obs`` has than each rival of :data:`TARGETS`, per cell, in
    both metrics (3x less relative MSE is 1.73x less relative error)."""
    by = {(r.model, r.variant, r.setting): r for r in rows}
    lines = [
        "Ratios of the shipped defaults (`dit-obs`) to the rivals, rival error / ours (higher is better;",
        "target: 3x below mask-only, 20% below SparseGPT = 1.25x):",
        "",
        "| model | rival | sparsity | × rel. error | × rel. MSE | target met (rel. error / rel. MSE) |",
        "|---|---|---|---|---|---|",
    ]
    found = False
    for (model, variant, setting), ours in by.items():
        if variant != "dit-obs":
            continue
        for rival, target in TARGETS.items():
            other = by.get((model, rival, setting))
            if other is None or not ours.rel_mse or not other.rel_mse:
                continue
            found = True
            if ours.held_rel_mse and other.held_rel_mse:  # held out: the ratios of the held-out errors
                r_err = float(np.mean(other.held_rel_err) / np.mean(ours.held_rel_err))
                r_mse = float(np.mean(other.held_rel_mse) / np.mean(ours.held_rel_mse))
            else:
                r_err = float(np.mean(other.rel_err) / np.mean(ours.rel_err))
                r_mse = float(np.mean(other.rel_mse) / np.mean(ours.rel_mse))
            if rival == "sparsegpt-1s" and setting == "2:4":
                target = 1.0  # "no worse at 2:4"
            met = f"{'yes' if r_err >= target else 'NO'} / {'yes' if r_mse >= target else 'NO'}"
            lines.append(f"| {model} | {rival} | {setting} | {r_err:.2f} | {r_mse:.2f} | {met} |")
    return lines if found else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconstruction_lab", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["miniflux-a", "miniflux-b"])
    parser.add_argument("--variants", nargs="+", default=None)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="one evaluation seed of 50 samples, no file")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument(
        "--all-classes", action="store_true", help="calibrate and evaluate on every class (default: held out)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    names = args.variants or list(DEFAULT_VARIANTS)
    seeds, per_class = ((0,), 5) if args.quick else (tuple(args.seeds), args.per_class)
    from .refine_holdout import SPLITS

    halves: Sequence[Sequence[int] | None] = [None] if args.all_classes else SPLITS
    rows = merge_lab_rows(
        [
            run_lab(
                m, names, args.settings, seeds=seeds, per_class=per_class, full=False, calibration_classes=h
            )
            for m in args.models
            for h in halves
        ]
    )
    command = "python -m bench.reconstruction_lab " + " ".join(argv if argv is not None else sys.argv[1:])
    text = to_markdown(rows, command.strip())
    if args.quick:
        print(text)
        return 0
    path = write_report(args.out, "reconstruction_lab.md", text)
    print(path.read_text())
    return 0


DEFAULT_VARIANTS = (
    "dit-pruning",
    "sparsegpt-1s",
    "dit-obs",
    "obs-b0.4-refit-1s",
    "obs-b0.4-1s",
    "energy-refit-1s",
    "obs-b0.4-pcg1-1s",
    "obs-b0.4-pcg5-1s",
    "obs-b0.4-pcg20-1s",
    "obs-b0.4-pcg-tol0.001-1s",
)

if __name__ == "__main__":
    sys.exit(main())
