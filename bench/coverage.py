"""Calibration coverage: how held-out error falls as the calibration covers more classes and samples.

    python -m bench coverage      # writes docs/bench/coverage.md and docs/bench/coverage.png

Protocol: each MiniFlux test-bed (classes = digits, like prompts) is pruned by
:func:`~ditprune_core.sequential.prune_sequential_` with ``update="obs"`` at 50% sparsity, every
other setting at the product's default except block refinement, which is off (on the CPU it makes a
run ten times slower; the curve is about what the OBS reconstruction fits), calibrated on the first
``k`` classes of one half of the digits (:data:`HALVES`: 0-4, then the swap 5-9) and ``n`` samples in all, the
classes taken in turn (``k`` in :data:`CLASSES`, ``n`` in :data:`SAMPLES`); one calibration seed
(1000), 20 Euler steps, cfg 2, log timestep weighting. The evaluation samples 10 digits of every
class of the *other* half (held out: disjoint from every calibration of that split) and 10 of each
calibrated class (seen), seed 0, the same noise for dense and pruned, and reports the relative MSE
of the final samples against the dense model's, each the mean over both splits. Runs at 2 torch
threads on a shared CPU: seconds compare within the table only.
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

from . import table_head
from .refine_holdout import SPLITS, class_labels, class_split

__all__ = [
    "CLASSES",
    "HALVES",
    "SAMPLES",
    "CoverageRow",
    "calibration_labels",
    "run_coverage",
    "write_coverage",
]

#: the two halves of the digits, as the held-out refinement benchmark splits them
HALVES = SPLITS
CLASSES = (1, 2, 5)
SAMPLES = (8, 32, 128)
CAL_SEED, EVAL_PER_CLASS, STEPS, CFG, SPARSITY = 1000, 10, 20, 2.0, 0.5


def calibration_labels(classes: Sequence[int], samples: int) -> torch.Tensor:
    """``samples`` labels cycling through ``classes`` (class ``i % k`` for sample ``i``).

    Raises:
        ValueError: no class, or fewer samples than classes (a class would go unseen).
    """
    if not classes or samples < len(classes):
        raise ValueError(f"{samples} samples cannot cover the {len(classes)} classes {list(classes)}")
    return torch.tensor([classes[i % len(classes)] for i in range(samples)])


@dataclass
class CoverageRow:
    model: str
    classes: int
    samples: int
    seen: list[float]  # one relative MSE per split
    held: list[float]
    seconds: list[float]


def run_coverage(
    models: Sequence[str],
    classes: Sequence[int] = CLASSES,
    samples: Sequence[int] = SAMPLES,
    halves: Sequence[Sequence[int]] = HALVES,
) -> list[CoverageRow]:
    rows: dict[tuple[str, int, int], CoverageRow] = {}
    for name in models:
        pipe = load_bundled(name)
        for half in halves:
            held_labels = class_labels(class_split(half, pipe.config.num_classes)[1], EVAL_PER_CLASS)
            dense_held = pipe.sample(held_labels, seed=0, steps=STEPS, cfg=CFG)
            for k in classes:
                seen = list(half[:k])
                seen_labels = class_labels(seen, EVAL_PER_CLASS)
                dense_seen = pipe.sample(seen_labels, seed=0, steps=STEPS, cfg=CFG)
                for n in samples:
                    model = copy.deepcopy(pipe.model)
                    pruned = MiniFluxPipeline(model, pipe.conditioner)
                    labels = calibration_labels(seen, n)

                    def calibrate(
                        cal: Any, pruned: MiniFluxPipeline = pruned, labels: torch.Tensor = labels
                    ) -> None:
                        pruned.sample(labels, seed=CAL_SEED, steps=STEPS, cfg=CFG, on_step=cal.on_step)

                    start = time.perf_counter()
                    prune_sequential_(
                        model,
                        calibrate,
                        PruneConfig(
                            SPARSITY, update="obs", reconstruct=ReconstructParams(block_refine_steps=0)
                        ),
                        memory_budget_bytes=1 << 34,
                        weighting="log",
                    )
                    seconds = time.perf_counter() - start
                    row = rows.setdefault((name, k, n), CoverageRow(name, k, n, [], [], []))
                    row.seen.append(
                        relative_squared_error(
                            pruned.sample(seen_labels, seed=0, steps=STEPS, cfg=CFG), dense_seen
                        )
                    )
                    row.held.append(
                        relative_squared_error(
                            pruned.sample(held_labels, seed=0, steps=STEPS, cfg=CFG), dense_held
                        )
                    )
                    row.seconds.append(seconds)
    return list(rows.values())


def write_coverage(rows: Sequence[CoverageRow], out_dir: Path, command: str) -> tuple[Path, Path]:
    """The markdown table (``coverage.md``) and the curve (``coverage.png``: held-out relative MSE
    against calibration samples, one line per class count and model)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = table_head(
        "Calibration coverage",
        command,
        __doc__,
        ["model", "classes", "samples", "seen rel. MSE", "held-out rel. MSE", "held/seen", "seconds"],
    )
    for r in rows:
        seen, held = float(np.mean(r.seen)), float(np.mean(r.held))
        lines.append(
            f"| {r.model} | {r.classes} | {r.samples} | {seen:.5f} | {held:.5f} | {held / seen:.2f} | "
            f"{np.mean(r.seconds):.0f} |"
        )
    models = list(dict.fromkeys(r.model for r in rows))
    if len(models) < 2:  # say when a run left a test-bed out
        lines += [
            "",
            f"Reduced run: {', '.join(models)} only (the other MiniFlux test-bed was not run; "
            "`python -m bench coverage` runs both).",
        ]
    md = out_dir / "coverage.md"
    md.write_text("\n".join(lines).rstrip("\n") + "\n")

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)  # no pyplot state
    axes = figure.add_subplot()
    for model in models:
        for k in dict.fromkeys(r.classes for r in rows):
            mine = sorted((r for r in rows if r.model == model and r.classes == k), key=lambda r: r.samples)
            axes.plot(
                [r.samples for r in mine],
                [float(np.mean(r.held)) for r in mine],
                marker="o",
                label=f"{model}, {k} class{'es' if k > 1 else ''}",
            )
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("calibration samples")
    axes.set_ylabel("held-out relative MSE (vs dense)")
    axes.set_title("50% sparsity, OBS reconstruction: held-out error vs calibration coverage")
    axes.title.set_fontsize(9)
    axes.legend(fontsize=7)
    axes.grid(True, which="both", alpha=0.3)
    png = out_dir / "coverage.png"
    figure.savefig(png)
    return md, png
