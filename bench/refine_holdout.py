"""Block refinement held out: does each refinement setting lower the error on classes it never saw?

    python -m bench refine_holdout      # writes docs/bench/refine_holdout.md

Protocol (the generalisation issue's): each MiniFlux model is calibrated on half of its digit
classes (:data:`SPLITS`: 0-4, then the swap 5-9), 10 samples a class per calibration seed (1000,
1001), 20 Euler steps, cfg 2, log timestep weighting, as the quality benchmark calibrates. Each
setting is :func:`~ditprune_core.sequential.prune_sequential_` with ``update="obs"`` and that
setting's :class:`~ditprune_core.config.ReconstructParams`, everything else at its default. The
evaluation samples 10 digits of every class of each half (seed 0, the same noise for dense and
pruned) and reports the relative MSE of the final samples against the dense model's: on the *seen*
classes (calibrated on) and the *held-out* ones, each the mean over both splits; ``held/seen`` is
their ratio. Sampler runs are ``prune_sequential_``'s calibration runs per split (passes + refined
blocks; ``block_refine_patience`` skips blocks once refinement stopped paying). Seconds are the whole
``prune_sequential_`` run (shared CPU: compare within a column).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditprune_core.config import PruneConfig, ReconstructParams
from ditprune_core.miniflux.pipeline import MiniFluxPipeline, load_bundled
from ditprune_core.sequential import prune_sequential_
from ditprune_core.util.metrics import relative_squared_error

from . import table_head, write_report

__all__ = [
    "SETTINGS",
    "SPLITS",
    "HoldoutRow",
    "class_labels",
    "class_split",
    "run_refine_holdout",
    "write_refine_holdout",
]

#: calibration classes of each split; the evaluation's held-out classes are the other ones
SPLITS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
CAL_SEEDS, CAL_PER_CLASS, EVAL_PER_CLASS, STEPS, CFG = (1000, 1001), 10, 10, 20, 2.0
#: name -> ReconstructParams keywords
SETTINGS: dict[str, dict[str, Any]] = {
    "no refinement": {"block_refine_steps": 0},
    "default (absolute 3e-3)": {},
    "absolute 3e-3, 25% held out": {"block_refine_holdout": 0.25},
    "relative 2e-2": {"block_refine_step": "relative", "block_refine_lr": 2e-2},
    "relative 2e-2, 25% held out": {
        "block_refine_step": "relative",
        "block_refine_lr": 2e-2,
        "block_refine_holdout": 0.25,
    },
    "relative 2e-2, 25% held out, patience 2": {
        "block_refine_step": "relative",
        "block_refine_lr": 2e-2,
        "block_refine_holdout": 0.25,
        "block_refine_patience": 2,
    },
}


def class_split(calibration: Sequence[int], num_classes: int = 10) -> tuple[list[int], list[int]]:
    """``(seen, held out)``: the calibration classes and the disjoint rest, both sorted.

    Raises:
        ValueError: a class outside ``range(num_classes)``, or no class left to hold out.
    """
    seen = sorted(set(calibration))
    if not seen or seen[0] < 0 or seen[-1] >= num_classes:
        raise ValueError(f"calibration classes must be in 0..{num_classes - 1}, got {list(calibration)}")
    held = [c for c in range(num_classes) if c not in seen]
    if not held:
        raise ValueError("every class is calibrated on: none is left to hold out")
    return seen, held


@dataclass
class HoldoutRow:
    model: str
    sparsity: float
    setting: str
    seen: list[float]  # one relative MSE per split
    held: list[float]
    seconds: list[float]
    reverted: int
    blocks: int
    runs: int = 0  # sampler runs of prune_sequential_ (passes + refined blocks), summed over splits


def class_labels(classes: Sequence[int], per_class: int) -> torch.Tensor:
    """``per_class`` labels of each class, class by class."""
    return torch.tensor(list(classes)).repeat_interleave(per_class)


def run_refine_holdout(
    models: Sequence[str], sparsities: Sequence[float] = (0.5, 0.7), settings: Sequence[str] | None = None
) -> list[HoldoutRow]:
    rows: dict[tuple[str, float, str], HoldoutRow] = {}
    names = list(settings or SETTINGS)
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown refine_holdout setting(s) {unknown}; choose from {list(SETTINGS)}")
    for name in models:
        pipe = load_bundled(name)
        for split in SPLITS:
            seen, held = class_split(split, pipe.config.num_classes)
            cal_labels = class_labels(seen, CAL_PER_CLASS)
            evals = {"seen": class_labels(seen, EVAL_PER_CLASS), "held": class_labels(held, EVAL_PER_CLASS)}
            dense = {k: pipe.sample(v, seed=0, steps=STEPS, cfg=CFG) for k, v in evals.items()}
            for sparsity in sparsities:
                for setting in names:
                    model = copy.deepcopy(pipe.model)
                    pruned = MiniFluxPipeline(model, pipe.conditioner)

                    def calibrate(
                        cal: Any, pruned: MiniFluxPipeline = pruned, labels: torch.Tensor = cal_labels
                    ) -> None:
                        for seed in CAL_SEEDS:
                            pruned.sample(labels, seed=seed, steps=STEPS, cfg=CFG, on_step=cal.on_step)

                    config = PruneConfig(
                        sparsity, update="obs", reconstruct=ReconstructParams(**SETTINGS[setting])
                    )
                    start = time.perf_counter()
                    report = prune_sequential_(
                        model, calibrate, config, memory_budget_bytes=1 << 34, weighting="log"
                    )
                    seconds = time.perf_counter() - start
                    errors = {
                        k: relative_squared_error(pruned.sample(v, seed=0, steps=STEPS, cfg=CFG), dense[k])
                        for k, v in evals.items()
                    }
                    row = rows.setdefault(
                        (name, sparsity, setting), HoldoutRow(name, sparsity, setting, [], [], [], 0, 0)
                    )
                    row.runs += report.sampler_runs
                    row.seen.append(errors["seen"])
                    row.held.append(errors["held"])
                    row.seconds.append(seconds)
                    row.reverted += sum(b.reverted for b in report.blocks)
                    row.blocks += len(report.blocks)
    return list(rows.values())


def write_refine_holdout(rows: Sequence[HoldoutRow], out_dir: Path, command: str) -> Path:
    lines = table_head(
        "Block refinement held out",
        command,
        __doc__,
        [
            "model",
            "sparsity",
            "setting",
            "seen rel. MSE",
            "held-out rel. MSE",
            "held/seen",
            "blocks put back",
            "sampler runs",
            "seconds",
        ],
    )
    for r in rows:
        seen, held = float(np.mean(r.seen)), float(np.mean(r.held))
        lines.append(
            f"| {r.model} | {r.sparsity:.0%} | {r.setting} | {seen:.4f} | {held:.4f} | {held / seen:.2f} | "
            f"{r.reverted} of {r.blocks} | {r.runs / len(r.seen):.0f} | {np.mean(r.seconds):.0f} |"
        )
    means: dict[str, list[float]] = {}
    for r in rows:
        means.setdefault(r.setting, []).append(float(np.mean(r.held)))
    lines += ["", "Mean held-out relative MSE over models and sparsities:", ""]
    lines += [f"- {setting}: {np.mean(v):.4f}" for setting, v in means.items()]
    return write_report(out_dir, "refine_holdout.md", "\n".join(lines))
