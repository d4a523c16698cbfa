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
    """A model, its calibration and the dense runs every pruned model is compared with."""

    name: str
    pipe: MiniFluxPipeline
    stats: CalibrationStats
    steps: int
    cfg: float
    dense: dict[int, DenseRun] = field(default_factory=dict)
    #: a reconstruction lab on this context (the quality benchmark makes it when first needed)
    lab: Any = field(default=None, repr=False)

    @classmethod
    def build(
        cls, name: str, *, seeds: Sequence[int], per_class: int, steps: int = 20, cfg: float = 2.0
    ) -> BenchContext:
        pipe = load_bundled(name)
        stats = calibrate(pipe, steps=steps, cfg=cfg)
        ctx = cls(name, pipe, stats, steps, cfg)
        labels = torch.arange(pipe.config.num_classes).repeat(per_class)
        for seed in seeds:
            ctx.dense[seed] = ctx._trajectory(pipe, labels, seed)
        return ctx

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
        """Metrics per evaluation seed; ``full=False`` computes the relative error only."""
        judge = load_judge(self.pipe.config.image_size) if full else None
        out: dict[str, list[float]] = {
            "rel_err": [],
            "rel_mse": [],
            "psnr": [],
            "vel_err": [],
            "acc": [],
            "fd": [],
        }
        for _seed, run in self.dense.items():
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
