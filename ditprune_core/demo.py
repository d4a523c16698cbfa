"""Demo: calibrate and prune the bundled MiniFlux at 50 % with DiT-Pruning and with Wanda, held out.

    python -m ditprune_core.demo [--out DIR] [--sparsity 0.5] [--model miniflux-a] [--calibrate-on 0 1 2 3 4]

The calibration samples only the ``--calibrate-on`` digits (default 0-4), as a ComfyUI user
calibrates on a few prompts; the pruned models are then compared with the dense model (same seed
and noise) on those digits (**seen**) and on the others, which the calibration never saw (**held
out**). Prints both and their ratio, and writes a sample grid PNG: the first row dense, then
DiT-Pruning, then Wanda (two samples of every digit each, held-out digits included), each row
labelled. The figures are from one evaluation seed (0); the README's tables are means over seeds and
both calibration halves (``python -m bench quality``), so they differ a little.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

from .config import PruneConfig
from .miniflux.judge import load_judge
from .miniflux.pipeline import MiniFluxPipeline, calibrate, load_bundled
from .prune import apply_masks_, compute_masks
from .report import sparsity_report
from .util.imaging import image_grid, label_rows, write_png
from .util.io import next_free_path
from .util.metrics import psnr, relative_error

log = logging.getLogger("ditprune")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ditprune_core.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="miniflux-a", choices=("miniflux-a", "miniflux-b", "miniflux-c"))
    parser.add_argument(
        "--calibrate-on",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="the digits the calibration samples (the rest are held out)",
    )
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("ditprune_demo"), help="folder for the sample grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    pipe = load_bundled(args.model)
    classes = pipe.config.num_classes
    seen_classes = sorted(set(args.calibrate_on))
    if not seen_classes or not all(0 <= c < classes for c in seen_classes):
        parser.error(f"--calibrate-on: digits between 0 and {classes - 1}, at least one")
    held_classes = [c for c in range(classes) if c not in seen_classes]
    stats = calibrate(pipe, classes=seen_classes)
    log.info(
        "calibrated %d layers on %d tokens per layer, digits %s only",
        len(stats.layers),
        min(s.tokens for s in stats.layers.values()),
        seen_classes,
    )
    labels = torch.arange(classes).repeat(10)
    seen = torch.isin(labels, torch.tensor(seen_classes))
    seed, steps, cfg = 0, 20, 2.0
    dense = pipe.sample(labels, seed=seed, steps=steps, cfg=cfg)
    judge = load_judge(pipe.config.image_size)
    methods = {
        "DiT-Pruning (defaults)": PruneConfig(args.sparsity),
        "Wanda (row)": PruneConfig(args.sparsity, metric="wanda", granularity="row"),
    }
    nan = float("nan")
    rows = [("dense", 0.0, nan, nan, float("inf"), judge.accuracy(dense, labels))]
    grids = [dense[:20]]
    for name, config in methods.items():
        model = copy.deepcopy(pipe.model)
        masks = compute_masks(model, stats, config)
        apply_masks_(model, masks)
        pruned = MiniFluxPipeline(model, pipe.conditioner).sample(labels, seed=seed, steps=steps, cfg=cfg)
        held_err = relative_error(pruned[~seen], dense[~seen]) if held_classes else nan
        rows.append(
            (
                name,
                sparsity_report(model, masks).sparsity,
                relative_error(pruned[seen], dense[seen]),
                held_err,
                psnr(pruned, dense),
                judge.accuracy(pruned, labels),
            )
        )
        grids.append(pruned[:20])

    print(
        f"\n{args.model}, {len(labels)} samples, seed {seed}, {steps} Euler steps, cfg {cfg}; calibrated on "
        f"digits {seen_classes} (seen), held out {held_classes or 'none'}"
    )
    print(
        f"{'method':<24} {'sparsity':>8} {'rel.err seen':>12} {'held out':>9} {'held/seen':>9} "
        f"{'PSNR dB':>8} {'accuracy':>8}"
    )
    for name, sparsity, err, held, db, acc in rows:
        if name == "dense":
            err_text = held_text = ratio = db_text = "-"
        else:
            err_text, held_text, db_text = f"{err:.4f}", f"{held:.4f}", f"{db:.2f}"
            ratio = f"{held / err:.2f}"
        print(
            f"{name:<24} {sparsity:>8.2%} {err_text:>12} {held_text:>9} {ratio:>9} {db_text:>8} {acc:>8.3f}"
        )
    grid = label_rows(image_grid(torch.cat(grids), rows=len(grids)), [name for name, *_ in rows])
    path = write_png(grid, next_free_path(args.out, "demo", ".png"))
    print(f"\nsample grid (rows: dense, DiT-Pruning, Wanda): {path}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
