"""Parameter sweep that chose the DiT-Pruning defaults (relative error vs dense, both MiniFlux).

    python -m bench sweep            # writes docs/bench/sweep.md

Stage "metric": energy balance x normalisation x {layer, row} groups, with the baselines. Stage
"cluster": the cluster granularity's allocation and comparison for the best metric settings.
Stage "families": the best setting with the adaLN modulation layers pruned too. Relative error of the final
samples against dense (one evaluation seed, 100 samples) at 50/60/70 %, averaged over both models.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from ditprune_core.cluster import ClusterParams
from ditprune_core.config import PruneConfig
from ditprune_core.score import MetricParams

from . import write_report
from .context import BenchContext

log = logging.getLogger("ditprune")
SPARSITIES = (0.5, 0.6, 0.7)


def metric_grid() -> list[tuple[str, PruneConfig]]:
    grid = []
    for balance, normalize, gran in itertools.product(
        (0.3, 0.4, 0.5, 0.6, 0.8), ("none", "row", "row+column"), ("layer", "row")
    ):
        if gran == "row" and normalize == "none":
            continue  # same order as "row" within a row
        params = MetricParams(balance=balance, normalize=normalize)
        grid.append(
            (
                f"energy b={balance} {normalize} {gran}",
                PruneConfig(0.5, metric="energy", granularity=gran, metric_params=params),
            )
        )
    for metric, gran in (("wanda", "row"), ("wanda", "layer"), ("magnitude", "layer"), ("ria", "layer")):
        grid.append((f"{metric} {gran}", PruneConfig(0.5, metric=metric, granularity=gran)))
    return grid


def cluster_grid(base: MetricParams) -> list[tuple[str, PruneConfig]]:
    grid = []
    for allocation, within in itertools.product((0.0, 0.5, 1.0), ("row", "cluster")):
        params = ClusterParams(allocation=allocation, within=within)
        cfg = PruneConfig(
            0.5, metric="energy", granularity="cluster", metric_params=base, cluster_params=params
        )
        grid.append(
            (f"energy b={base.balance} {base.normalize} cluster alloc={allocation} within={within}", cfg)
        )
    return grid


def family_grid(best: PruneConfig, label: str) -> list[tuple[str, PruneConfig]]:
    with_mod = replace(best, families=(*best.families, "modulation"))
    return [(f"{label} + modulation layers", with_mod)]


def evaluate_grid(
    contexts: Sequence[BenchContext], grid: list[tuple[str, PruneConfig]]
) -> list[tuple[str, PruneConfig, list[float]]]:
    rows = []
    for label, cfg in grid:
        errs = []
        for s in SPARSITIES:
            per_model = [
                np.mean(ctx.evaluate(ctx.pruned(replace(cfg, sparsity=s)), full=False)["rel_err"])
                for ctx in contexts
            ]
            errs.append(float(np.mean(per_model)))
        log.info("%-50s %s", label, " ".join(f"{e:.4f}" for e in errs))
        rows.append((label, cfg, errs))
    return rows


def run_sweep(models: Sequence[str] = ("miniflux-a", "miniflux-b"), seeds: Sequence[int] = (7, 8)) -> str:
    contexts = [BenchContext.build(m, seeds=seeds, per_class=10) for m in models]
    metric_rows = evaluate_grid(contexts, metric_grid())
    energy_rows = [r for r in metric_rows if r[1].metric == "energy"]
    best_metric = min(energy_rows, key=lambda r: float(np.mean(r[2])))
    cluster_rows = evaluate_grid(contexts, cluster_grid(best_metric[1].metric_params))
    best = min(energy_rows + cluster_rows, key=lambda r: float(np.mean(r[2])))
    family_rows = evaluate_grid(contexts, family_grid(best[1], best[0]))
    lines = [
        "# DiT-Pruning parameter sweep (generated)",
        "",
        "Command: `python -m bench sweep`. Relative error of final samples vs dense,",
        f"mean over {', '.join(models)} and seeds {list(seeds)} (100 samples each).",
        "",
        f"Best: **{best[0]}** (mean {np.mean(best[2]):.4f}).",
        "",
    ]
    for title, rows in (
        ("Metric and normalisation", metric_rows),
        ("Cluster granularity (best energy metric)", cluster_rows),
        ("Layer families (best setting)", [best, *family_rows]),
    ):
        lines += [f"## {title}", "", "| setting | 50% | 60% | 70% | mean |", "|---|---|---|---|---|"]
        for label, _cfg, errs in sorted(rows, key=lambda r: float(np.mean(r[2]))):
            lines.append(f"| {label} | " + " | ".join(f"{e:.4f}" for e in errs) + f" | {np.mean(errs):.4f} |")
        lines.append("")
    return "\n".join(lines)


def write_sweep(out_dir: Path) -> Path:
    return write_report(out_dir, "sweep.md", run_sweep())
