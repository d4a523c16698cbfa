"""Quality benchmark on the trained MiniFlux models: pruned vs dense at the same seed.

    python -m bench quality            # writes docs/bench/quality.md + PNG grids

For each model the dense sampler runs once per evaluation seed; every (method, sparsity) then
samples from the same noise and labels and is compared with it:

- rel. error: mean over samples of ||x_pruned - x_dense|| / ||x_dense|| of the final images;
- PSNR (dB) of the final images against the dense ones;
- velocity error: relative error of the pruned model's guided velocity on the dense trajectory,
  averaged over the sampling steps;
- accuracy: a logistic-regression classifier trained on the real digits reads the class;
- FD: Fréchet distance to the real digits in a fixed PCA-16 feature space.

Mean and standard deviation over evaluation seeds are reported.

Protocol (held out, the default): each model is calibrated on half of its digit classes (0-4,
then the swap 5-9: :data:`~bench.refine_holdout.SPLITS`; 10 samples a class per calibration seed
1000 and 1001, log weighting) and evaluated with 10 samples of every class of the half it saw
(**seen**) and of the half it never saw (**held out**), the same noise for dense and pruned; every
metric is the mean (± std) over both splits and the evaluation seeds. The held-out columns are the
table's headline, held/seen the ratio of the mean relative MSEs, and the claims are checked held out.
``--all-classes`` runs the old protocol (calibrated and evaluated on every class).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditprune_core.config import PruneConfig
from ditprune_core.miniflux.judge import load_judge
from ditprune_core.miniflux.pipeline import MiniFluxPipeline
from ditprune_core.util.imaging import image_grid, write_png

from . import write_report
from .context import SETTINGS, BenchContext, fmt_stat
from .reconstruction_lab import Lab, sparsegpt_layer
from .refine_holdout import SPLITS

log = logging.getLogger("ditprune")

ConfigFactory = Callable[[float, str], PruneConfig]

#: Methods of the table; name -> config for (sparsity, pattern).
METHODS: dict[str, ConfigFactory] = {
    "magnitude-layer": lambda s, p: PruneConfig(s, metric="magnitude", granularity="layer", pattern=p),
    "wanda-row": lambda s, p: PruneConfig(s, metric="wanda", granularity="row", pattern=p),
    "ria-layer": lambda s, p: PruneConfig(s, metric="ria", granularity="layer", pattern=p),
    "dit-pruning": lambda s, p: PruneConfig(s, pattern=p),
    "energy-row": lambda s, p: PruneConfig(s, granularity="row", pattern=p),
    "energy-cluster": lambda s, p: PruneConfig(s, granularity="cluster", pattern=p),
    "wanda-cluster": lambda s, p: PruneConfig(s, metric="wanda", granularity="cluster", pattern=p),
}
#: Methods that update the kept weights (reconstruction): name -> ``(lab, sparsity, pattern) -> pipe``.
#: They share the calibration of the mask-only rows (same seeds, steps, cfg, log weighting), with
#: its Grams (``bench/reconstruction_lab.py``).
RECONSTRUCTING = ("sparsegpt-1s", "sparsegpt-seq", "dit-pruning-obs")


def reconstructed(ctx: BenchContext, method: str, sparsity: float, pattern: str) -> MiniFluxPipeline:
    """A :data:`RECONSTRUCTING` method's model, from this context's calibration (one lab per
    context, kept on it: its Grams are recorded once)."""
    if ctx.lab is None:
        ctx.lab = Lab(ctx.name, seeds=(), per_class=0, ctx=ctx)
    lab = ctx.lab
    if method == "sparsegpt-1s":
        return lab.oneshot(sparsegpt_layer, sparsity, pattern)[0]
    if method == "sparsegpt-seq":
        return lab.sequential(sparsegpt_layer, sparsity, pattern)[0]
    if method == "dit-pruning-obs":
        return lab.product(PruneConfig(sparsity, pattern=pattern, update="obs"))[0]
    raise ValueError(f"unknown reconstructing method {method!r}; choose from {list(RECONSTRUCTING)}")


@dataclass
class QualityResult:
    model: str
    rows: list[tuple[str, str, dict[str, list[float]]]]
    dense: dict[str, list[float]]
    images: dict[str, torch.Tensor]

    def mean(self, method: str, setting: str, key: str = "rel_err") -> float:
        """The mean of a metric; held out, the claims read the held-out one."""
        if self.held_out and not key.startswith("held_"):
            key = f"held_{key}"
        for m, s, metrics in self.rows:
            if (m, s) == (method, setting):
                return float(np.mean(metrics[key]))
        raise KeyError((method, setting))

    @property
    def held_out(self) -> bool:
        return any("held_rel_mse" in m for _m, _s, m in self.rows)

    def to_markdown(self) -> str:
        lines = [
            f"### {self.model}",
            "",
            f"dense: accuracy {fmt_stat(self.dense['acc'], 3)}, FD {fmt_stat(self.dense['fd'], 1)}",
            "",
        ]
        if self.held_out:
            lines += [
                "| method | sparsity | held-out rel. MSE ↓ | seen rel. MSE ↓ | held/seen "
                "| held-out rel. error ↓ | held-out PSNR dB ↑ | held-out velocity error ↓ "
                "| held-out accuracy ↑ | held-out FD ↓ |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for method, setting, m in self.rows:
                ratio = np.mean(m["held_rel_mse"]) / np.mean(m["rel_mse"])
                lines.append(
                    f"| {method} | {setting} | {fmt_stat(m['held_rel_mse'], 4)} | "
                    f"{fmt_stat(m['rel_mse'], 4)} | "
                    f"{ratio:.2f} | {fmt_stat(m['held_rel_err'], 4)} | {fmt_stat(m['held_psnr'], 2)} | "
                    f"{fmt_stat(m['held_vel_err'], 4)} | {fmt_stat(m['held_acc'], 3)} | "
                    f"{fmt_stat(m['held_fd'], 1)} |"
                )
            return "\n".join(lines)
        lines += [
            "| method | sparsity | rel. error ↓ | rel. MSE ↓ | PSNR dB ↑ | velocity error ↓ | accuracy ↑ "
            "| FD ↓ |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for method, setting, m in self.rows:
            lines.append(
                f"| {method} | {setting} | {fmt_stat(m['rel_err'], 4)} | {fmt_stat(m['rel_mse'], 4)} | "
                f"{fmt_stat(m['psnr'], 2)} | "
                f"{fmt_stat(m['vel_err'], 4)} | {fmt_stat(m['acc'], 3)} | {fmt_stat(m['fd'], 1)} |"
            )
        return "\n".join(lines)

    def checks(self) -> list[tuple[str, bool]]:
        """The claims the README makes, each checked on this model."""
        out = []
        for setting in ("50%", "60%", "70%"):
            ours = self.mean("dit-pruning", setting)
            for rival in ("wanda-row", "magnitude-layer"):
                theirs = self.mean(rival, setting)
                ok = ours <= theirs if setting == "50%" else ours < theirs
                word = "no worse than" if setting == "50%" else "beats"
                out.append(
                    (f"{self.model} {setting}: dit-pruning {ours:.4f} {word} {rival} {theirs:.4f}", ok)
                )
        methods = {m for m, _s, _x in self.rows}
        if not {"dit-pruning-obs", "sparsegpt-1s"} <= methods:
            return out
        for setting in ("50%", "60%", "70%", "2:4"):
            obs = self.mean("dit-pruning-obs", setting)
            for rival in ("sparsegpt-1s", "sparsegpt-seq"):
                if rival not in methods:
                    continue
                theirs = self.mean(rival, setting)
                if setting == "2:4":
                    out.append(
                        (
                            f"{self.model} 2:4: dit-pruning-obs {obs:.4f} no worse than {rival} {theirs:.4f}",
                            obs <= theirs,
                        )
                    )
                else:
                    out.append(
                        (
                            f"{self.model} {setting}: dit-pruning-obs {obs:.4f} at least 20% below {rival} "
                            f"{theirs:.4f} ({1 - obs / theirs:.0%} below)",
                            obs <= 0.8 * theirs,
                        )
                    )
            mask_only = self.mean("dit-pruning", setting)
            out.append(
                (
                    f"{self.model} {setting}: dit-pruning-obs {obs:.4f} at least 3x below mask-only "
                    f"dit-pruning {mask_only:.4f} ({mask_only / obs:.2f}x, relative error)",
                    3 * obs <= mask_only,
                )
            )
            obs_mse = self.mean("dit-pruning-obs", setting, "rel_mse")
            mask_mse = self.mean("dit-pruning", setting, "rel_mse")
            out.append(
                (
                    f"{self.model} {setting}: dit-pruning-obs {obs_mse:.4f} at least 3x below mask-only "
                    f"dit-pruning {mask_mse:.4f} ({mask_mse / obs_mse:.2f}x, relative MSE)",
                    3 * obs_mse <= mask_mse,
                )
            )
        return out


def run_quality(
    model: str,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    per_class: int = 10,
    methods: Sequence[str] = (*METHODS, *RECONSTRUCTING),
    settings: Sequence[str] = tuple(SETTINGS),
    splits: Sequence[Sequence[int]] | None = SPLITS,
) -> QualityResult:
    """Every (method, setting) of one model; held out (``splits``), one run per calibration half,
    their metrics merged (None: calibrated and evaluated on every class)."""
    if splits is None:
        return _run_quality(model, seeds, per_class, methods, settings, None)
    return merge_results([_run_quality(model, seeds, per_class, methods, settings, s) for s in splits])


def merge_results(parts: Sequence[QualityResult]) -> QualityResult:
    """Results of one model on disjoint calibration halves as one: each metric's values concatenated
    (the mean over splits and seeds); the images of the first."""
    first = parts[0]
    rows = []
    for i, (method, setting, metrics) in enumerate(first.rows):
        merged = {k: [v for p in parts for v in p.rows[i][2][k]] for k in metrics}
        rows.append((method, setting, merged))
    dense = {k: [v for p in parts for v in p.dense[k]] for k in first.dense}
    return QualityResult(first.model, rows, dense, first.images)


def _run_quality(
    model: str,
    seeds: Sequence[int],
    per_class: int,
    methods: Sequence[str],
    settings: Sequence[str],
    calibration_classes: Sequence[int] | None,
) -> QualityResult:
    ctx = BenchContext.build(model, seeds=seeds, per_class=per_class, calibration_classes=calibration_classes)
    judge = load_judge(ctx.pipe.config.image_size)
    first = ctx.dense[seeds[0]]
    dense_metrics = {
        "acc": [judge.accuracy(r.images, r.labels) for r in ctx.dense.values()],
        "fd": [judge.frechet(r.images) for r in ctx.dense.values()],
    }
    shown = slice(0, 20)  # two samples of each digit from the first seed
    images = {"dense": first.images[shown]}
    rows = []
    for setting in settings:
        sparsity, pattern = SETTINGS[setting]
        for method in methods:
            start = time.perf_counter()
            if method in RECONSTRUCTING:
                pipe = reconstructed(ctx, method, sparsity, pattern)
            else:
                pipe = ctx.pruned(METHODS[method](sparsity, pattern))
            metrics = ctx.evaluate(pipe)
            rows.append((method, setting, metrics))
            images[f"{method} {setting}"] = pipe.sample(
                first.labels[shown], seed=0, steps=ctx.steps, cfg=ctx.cfg, noise=first.noise[shown]
            )
            log.info(
                "%s %s %s: rel err %.4f (%.1f s)",
                model,
                method,
                setting,
                np.mean(metrics["rel_err"]),
                time.perf_counter() - start,
            )
    return QualityResult(model, rows, dense_metrics, images)


def write_quality(results: Sequence[QualityResult], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Quality benchmark (generated)",
        "",
        f"Command: `{command}`. Written by `bench/quality.py`; do not edit by hand.",
        "",
        "Mean ± std over evaluation seeds. Rel. error, PSNR and velocity error compare the pruned",
        "model with the dense one from the same noise; accuracy and FD judge the digits themselves.",
        "",
    ]
    if results and results[0].held_out:
        parts += ["Protocol" + (__doc__ or "").split("Protocol", 1)[1].rstrip(), ""]
    for res in results:
        parts += [res.to_markdown(), ""]
        grid_path = out_dir / f"quality_{res.model}.png"
        names = list(res.images)
        grid = image_grid(torch.cat([res.images[n] for n in names]), rows=len(names))
        write_png(grid, grid_path, overwrite=True)
        parts += [
            f"![samples]({grid_path.name})",
            "",
            "Grid rows, top to bottom: " + ", ".join(names) + ".",
            "",
        ]
    parts += ["## Claims checked", ""]
    for res in results:
        for text, ok in res.checks():
            parts.append(f"- {'PASS' if ok else 'FAIL'}: {text}")
    return write_report(out_dir, "quality.md", "\n".join(parts))
