"""What every MiniFlux quality benchmark shares: the calibrated model, its dense runs, the settings,
the evaluation and the table's number format. The benchmarks import it; it imports none of them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ditprune_core.config import PruneConfig
from ditprune_core.miniflux.judge import load_judge
from ditprune_core.miniflux.pipeline import MiniFluxPipeline, calibrate, load_bundled, sigma_schedule
from ditprune_core.prune import apply_masks_, compute_masks
from ditprune_core.stats import CalibrationStats
from ditprune_core.util.metrics import psnr, relative_error, relative_squared_error

__all__ = ["SETTINGS", "BenchContext", "DenseRun", "fmt_stat"]

SETTINGS: dict[str, tuple[float, str]] = {
    "50%": (0.5, "unstructured"),
    "60%": (0.6, "unstructured"),
    "70%": (0.7, "unstructured"),
    "2:4": (0.5, "2:4"),
}


@dataclass
class DenseRun:
    labels: torch.Tensor
    noise: torch.Tensor
    images: torch.Tensor
    states: list[torch.Tensor]
    velocities: list[torch.Tensor]


@dataclass
class BenchContext:
    """A model, its calibration and the dense runs every pruned model is compared with.

    Held out (``calibration_classes`` given): the calibration samples those classes only, ``dense``
    holds runs of those classes (seen) and ``held`` runs of the other classes, and
    :meth:`evaluate` reports every metric on both (the held-out ones prefixed ``held_``)."""

    name: str
    pipe: MiniFluxPipeline
    stats: CalibrationStats
    steps: int
    cfg: float
    dense: dict[int, DenseRun] = field(default_factory=dict)
    #: a reconstruction lab on this context (the quality benchmark makes it when first needed)
    lab: Any = field(default=None, repr=False)
    #: the classes the calibration sampled (None: every class)
    calibration_classes: tuple[int, ...] | None = None
    #: dense runs of the classes the calibration never saw, by evaluation seed
    held: dict[int, DenseRun] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        name: str,
        *,
        seeds: Sequence[int],
        per_class: int,
        steps: int = 20,
        cfg: float = 2.0,
        calibration_classes: Sequence[int] | None = None,
    ) -> BenchContext:
        pipe = load_bundled(name)
        seen = None if calibration_classes is None else tuple(calibration_classes)
        stats = calibrate(pipe, steps=steps, cfg=cfg, classes=seen)
        ctx = cls(name, pipe, stats, steps, cfg, calibration_classes=seen)
        everything = list(range(pipe.config.num_classes))
        labels = torch.tensor(everything if seen is None else list(seen)).repeat(per_class)
        for seed in seeds:
            ctx.dense[seed] = ctx._trajectory(pipe, labels, seed)
        if seen is not None:
            held = torch.tensor([c for c in everything if c not in seen]).repeat(per_class)
            for seed in seeds:
                ctx.held[seed] = ctx._trajectory(pipe, held, seed)
        return ctx

    def calibration_labels(self, per_class: int) -> torch.Tensor:
        """The labels a calibration run samples: each calibration class ``per_class`` times."""
        classes = self.calibration_classes or tuple(range(self.pipe.config.num_classes))
        return torch.tensor(classes).repeat_interleave(per_class)

    @torch.no_grad()
    def _trajectory(self, pipe: MiniFluxPipeline, labels: torch.Tensor, seed: int) -> DenseRun:
        noise = pipe.initial_noise(labels.shape[0], seed)
        x, states, velocities = noise.clone(), [], []
        sigmas = sigma_schedule(self.steps)
        for i in range(self.steps):
            v = pipe.guided_velocity(x, float(sigmas[i]), labels, self.cfg)
            states.append(x)
            velocities.append(v)
            x = x + float(sigmas[i + 1] - sigmas[i]) * v
        return DenseRun(labels, noise, pipe.to_images(x), states, velocities)

    def pruned(self, config: PruneConfig) -> MiniFluxPipeline:
        model = copy.deepcopy(self.pipe.model)
        apply_masks_(model, compute_masks(model, self.stats, config))
        return MiniFluxPipeline(model, self.pipe.conditioner)

    @torch.no_grad()
    def evaluate(self, pipe: MiniFluxPipeline, *, full: bool = True) -> dict[str, list[float]]:
        """Metrics per evaluation seed; ``full=False`` computes the relative error only. Held out,
        the same metrics on the held-out classes too, as ``held_<metric>``."""
        out = self._metrics(pipe, self.dense, full)
        if self.held:
            out.update({f"held_{k}": v for k, v in self._metrics(pipe, self.held, full).items()})
        return out

    def _metrics(
        self, pipe: MiniFluxPipeline, runs: dict[int, DenseRun], full: bool
    ) -> dict[str, list[float]]:
        judge = load_judge(self.pipe.config.image_size) if full else None
        out: dict[str, list[float]] = {
            "rel_err": [],
            "rel_mse": [],
            "psnr": [],
            "vel_err": [],
            "acc": [],
            "fd": [],
        }
        for _seed, run in runs.items():
            images = pipe.sample(run.labels, seed=0, steps=self.steps, cfg=self.cfg, noise=run.noise)
            out["rel_err"].append(relative_error(images, run.images))
            out["rel_mse"].append(relative_squared_error(images, run.images))
            if judge is None:
                continue
            out["psnr"].append(psnr(images, run.images))
            sigmas = sigma_schedule(self.steps)
            errs = [
                relative_error(pipe.guided_velocity(state, float(sigmas[i]), run.labels, self.cfg), v)
                for i, (state, v) in enumerate(zip(run.states, run.velocities, strict=True))
            ]
            out["vel_err"].append(float(np.mean(errs)))
            out["acc"].append(judge.accuracy(images, run.labels))
            out["fd"].append(judge.frechet(images))
        return {k: v for k, v in out.items() if v}


def fmt_stat(values: list[float], digits: int) -> str:
    """One value, or mean ± std over evaluation seeds, with ``digits`` decimals."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"
