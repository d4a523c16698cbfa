"""Demo: calibrate and prune the bundled MiniFlux at 50 % with DiT-Pruning and with Wanda.

    python -m ditprune_core.demo [--out DIR] [--sparsity 0.5] [--model miniflux-a]

Prints the comparison against the dense model (same seeds) and writes a sample grid PNG: the
first row dense, then DiT-Pruning, then Wanda (two samples of every digit each), each row labelled.
The figures are from one evaluation seed (0); the README's quality table is the mean over three
(``python -m bench quality``), so they differ a little.
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
    parser.add_argument("--model", default="miniflux-a", choices=("miniflux-a", "miniflux-b"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("ditprune_demo"), help="folder for the sample grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    pipe = load_bundled(args.model)
    stats = calibrate(pipe)
    log.info(
        "calibrated %d layers on %d tokens per layer",
        len(stats.layers),
        min(s.tokens for s in stats.layers.values()),
    )
    labels = torch.arange(10).repeat(10)
    seed, steps, cfg = 0, 20, 2.0
    dense = pipe.sample(labels, seed=seed, steps=steps, cfg=cfg)
    judge = load_judge()
    methods = {
        "DiT-Pruning (defaults)": PruneConfig(args.sparsity),
        "Wanda (row)": PruneConfig(args.sparsity, metric="wanda", granularity="row"),
    }
    rows = [("dense", 0.0, float("nan"), float("inf"), judge.accuracy(dense, labels))]
    grids = [dense[:20]]
    for name, config in methods.items():
        model = copy.deepcopy(pipe.model)
        masks = compute_masks(model, stats, config)
        apply_masks_(model, masks)
        pruned = MiniFluxPipeline(model, pipe.conditioner).sample(labels, seed=seed, steps=steps, cfg=cfg)
        rows.append(
            (
                name,
                sparsity_report(model, masks).sparsity,
                relative_error(pruned, dense),
                psnr(pruned, dense),
                judge.accuracy(pruned, labels),
            )
        )
        grids.append(pruned[:20])

    print(f"\n{args.model}, {len(labels)} samples, seed {seed}, {steps} Euler steps, cfg {cfg}")
    print(f"{'method':<24} {'sparsity':>8} {'rel.err':>8} {'PSNR dB':>8} {'accuracy':>8}")
    for name, sparsity, err, db, acc in rows:
        err_text, db_text = ("-", "-") if name == "dense" else (f"{err:.4f}", f"{db:.2f}")
        print(f"{name:<24} {sparsity:>8.2%} {err_text:>8} {db_text:>8} {acc:>8.3f}")
    grid = label_rows(image_grid(torch.cat(grids), rows=len(grids)), [name for name, *_ in rows])
    path = write_png(grid, next_free_path(args.out, "demo", ".png"))
    print(f"\nsample grid (rows: dense, DiT-Pruning, Wanda): {path}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
