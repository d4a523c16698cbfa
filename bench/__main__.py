"""Benchmarks: ``python -m bench WHICH [--out DIR]``.

WHICH: quality, sweep, speed, checkpoint, video, models, quantgroups, pareto, obsspeed, lowbit,
decode, gpu_step, refine_holdout, tiers, coverage, generalisation, frontier, remainder, remainder_gptq,
ceiling.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_OUT = Path("docs/bench")
#: the MiniFlux test-beds (the held-out benchmarks run all three by default)
ALL_MODELS = ("miniflux-a", "miniflux-b", "miniflux-c")


T = TypeVar("T")


def _per_model(run: Callable[[str], list[T]], models: list[str], jobs: int) -> list[T]:
    """``run(model)`` for each model, concatenated in order: one process per model (one thread each)
    with ``jobs`` > 1."""
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(models)), initializer=_one_thread) as pool:
            parts = list(pool.map(run, models))
    else:
        parts = [run(m) for m in models]
    return [row for part in parts for row in part]


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _ceiling_of(model: str, **kwargs: Any) -> list[Any]:
    """One model's rows of the ceiling benchmark (a process's share)."""
    from .ceiling import run_ceiling

    return run_ceiling([model], **kwargs)


def bench_command(argv: list[str]) -> str:
    """The command a table names: quoted as a shell takes it, without ``--out DIR`` (where a run
    wrote its files is not how its figures were made)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return "python -m bench " + shlex.join(kept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "which",
        choices=(
            "quality",
            "sweep",
            "speed",
            "checkpoint",
            "video",
            "models",
            "quantgroups",
            "pareto",
            "obsspeed",
            "lowbit",
            "decode",
            "gpu_step",
            "refine_holdout",
            "tiers",
            "coverage",
            "generalisation",
            "frontier",
            "remainder",
            "remainder_gptq",
            "ceiling",
        ),
    )
    parser.add_argument("--only", nargs="+", default=None, help="speed: only these method labels")
    parser.add_argument(
        "--points",
        nargs="+",
        default=None,
        help="frontier: only these points (as frontier.md names them); the rest is kept from frontier.json",
    )
    parser.add_argument(
        "--clip",
        choices=("range", "mse"),  # ditprune_core.quantize.CLIPS (the parser imports no torch)
        default="range",
        help="frontier: the range rule of every integer grid (range: the product's; mse: the least-error "
        "clipped ranges, written to docs/bench/clip_mse unless --out names another folder)",
    )
    parser.add_argument(
        "--shrink-text",
        type=float,
        default=None,
        help="frontier: ReconstructParams.shrink_text of every reconstructed point (default: the product's)",
    )
    parser.add_argument(
        "--damps",
        type=float,
        nargs="+",
        default=None,
        help="remainder_gptq: the GPTQ dampenings to run (default: bench.remainder_gptq.DAMPS)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the tables and pictures")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation seeds (quality)")
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="MiniFlux test-beds (default: miniflux-a and -b; refine_holdout, coverage and "
        "generalisation: all three)",
    )
    parser.add_argument(
        "--per-class", type=int, default=10, help="pareto, lowbit: samples of each digit per seed"
    )
    parser.add_argument(
        "--all-classes",
        action="store_true",
        help="quality: calibrate and evaluate on every class (default: held out, see its protocol)",
    )
    parser.add_argument("--no-velocity", action="store_true", help="pareto: skip the velocity error")
    parser.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=None,
        help="refine_holdout (default 0.5 0.7), generalisation (default: each method's own): sparsities",
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help="generalisation: method names (default: all)"
    )
    parser.add_argument(
        "--table", default=None, help="generalisation: the table's file name (generalisation.md)"
    )
    parser.add_argument(
        "--settings", nargs="+", default=None, help="refine_holdout: setting names (default: all)"
    )
    parser.add_argument(
        "--from-markdown",
        action="store_true",
        help="pareto: rewrite pareto.json and the plots from the pareto.md of the last run (no re-run)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="quality, pareto, generalisation: models run in parallel processes",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="obsspeed: FLUX widths / 4; gpu_step: / 8, 64 tokens (smoke runs)",
    )
    parser.add_argument(
        "--device", default=None, help="obsspeed: cpu or cuda (cpu); gpu_step: cuda or cpu (cuda)"
    )
    parser.add_argument("--threads", type=int, default=None, help="obsspeed, decode: torch CPU threads")
    parser.add_argument(
        "--gguf-dequant",
        default=None,
        help="decode, gpu_step: ComfyUI-GGUF's dequant.py (default $DITPRUNE_GGUF_DEQUANT)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="decode, gpu_step: best of this many runs")
    parser.add_argument("--compile", action="store_true", help="gpu_step: also ditprune's decode compiled")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = bench_command(argv if argv is not None else sys.argv[1:])
    held_out_benches = (
        "refine_holdout",
        "coverage",
        "generalisation",
        "frontier",
        "remainder",
        "remainder_gptq",
        "ceiling",
    )
    if args.models is None:
        args.models = list(ALL_MODELS if args.which in held_out_benches else ALL_MODELS[:2])
    if args.which == "quality":
        from .quality import run_quality, write_quality
        from .refine_holdout import SPLITS

        if args.jobs > 1:  # one process per model, one thread each
            from concurrent.futures import ProcessPoolExecutor
            from functools import partial

            run = partial(run_quality, seeds=tuple(args.seeds), splits=None if args.all_classes else SPLITS)
            with ProcessPoolExecutor(min(args.jobs, len(args.models)), initializer=_one_thread) as pool:
                results = list(pool.map(run, args.models))
        else:
            splits = None if args.all_classes else SPLITS
            results = [run_quality(m, seeds=tuple(args.seeds), splits=splits) for m in args.models]
        path = write_quality(results, args.out, command)
        print(path.read_text())
        return 0 if all(ok for r in results for _, ok in r.checks()) else 1
    if args.which == "quantgroups":
        from .quant_groups import write_quant_groups

        path = write_quant_groups(args.out, args.models)
        print(path.read_text())
        return 0
    if args.which == "remainder":
        from .remainder import run_remainder, write_remainder

        remainder_rows = _per_model(run_remainder, args.models, args.jobs)
        print(write_remainder(remainder_rows, args.out, command).read_text())
        return 0
    if args.which == "remainder_gptq":
        from functools import partial

        from .remainder_gptq import DAMPS, run_remainder_gptq, write_remainder_gptq

        run_gptq = partial(run_remainder_gptq, damps=tuple(args.damps or DAMPS))
        gptq_rows = _per_model(run_gptq, args.models, args.jobs)
        print(write_remainder_gptq(gptq_rows, args.out, command).read_text())
        return 0
    if args.which == "tiers":
        from .tiers import write_tiers

        path = write_tiers(args.out / "frontier.json", args.out)
        print(path.read_text())
        return 0
    if args.which == "pareto" and args.from_markdown:
        from .pareto import OLD_PLOT_CAPTION, PLOT_CAPTION, read_markdown, write_tables

        md = args.out / "pareto.md"
        read = read_markdown(md)
        first = md.read_text().split("\n", 3)[2]  # "Command: `...`. Written by ..."
        path = write_tables(read, args.out, first.split("`")[1] + " (means, read back from pareto.md)")
        md.write_text(md.read_text().replace(OLD_PLOT_CAPTION, PLOT_CAPTION))
        print(path)
        return 0
    if args.which == "pareto":
        from .pareto import run_pareto, write_pareto

        kwargs = {"seeds": tuple(args.seeds), "per_class": args.per_class, "velocity": not args.no_velocity}
        if args.jobs > 1:  # one process per model, one thread each; same results, side by side
            from concurrent.futures import ProcessPoolExecutor
            from functools import partial

            with ProcessPoolExecutor(min(args.jobs, len(args.models)), initializer=_one_thread) as pool:
                pareto = list(pool.map(partial(run_pareto, **kwargs), args.models))
        else:
            pareto = [run_pareto(m, **kwargs) for m in args.models]
        path = write_pareto(pareto, args.out, command)
        print(path.read_text())
        return 0
    if args.which == "obsspeed":
        from .obs_speed import write_obs_speed

        path = write_obs_speed(
            args.out, command=command, quick=args.quick, device=args.device or "cpu", threads=args.threads
        )
        print(path.read_text())
        return 0
    if args.which == "lowbit":
        from .lowbit import write_lowbit

        path = write_lowbit(args.out, command, args.models, seeds=tuple(args.seeds), per_class=args.per_class)
        print(path.read_text())
        return 0
    if args.which == "decode":
        from .decode_speed import write_decode_speed

        path = write_decode_speed(
            args.out, command, dequant_path=args.gguf_dequant, repeats=args.repeats, threads=args.threads
        )
        print(path.read_text())
        return 0
    if args.which == "gpu_step":
        from .gpu_step import write_gpu_step

        path = write_gpu_step(
            args.out,
            command,
            device=args.device or "cuda",
            quick=args.quick,
            dequant_path=args.gguf_dequant,
            repeats=args.repeats,
            compile_decode=args.compile,
        )
        print(path.read_text())
        return 0
    if args.which == "coverage":
        import torch

        from .coverage import run_coverage, write_coverage

        torch.set_num_threads(2)  # the machine's two cores; the table's seconds say so
        md, _png = write_coverage(run_coverage(args.models), args.out, command)
        print(md.read_text())
        return 0
    if args.which == "ceiling":
        import torch

        from .ceiling import SPARSITIES, run_ceiling, write_ceiling

        torch.set_num_threads(2)
        sparsities = tuple(args.sparsities or SPARSITIES)
        if args.jobs > 1:  # one process per model, one thread each, the largest model first
            from concurrent.futures import ProcessPoolExecutor
            from functools import partial

            run_one = partial(_ceiling_of, sparsities=sparsities, eval_seeds=tuple(args.seeds))
            with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
                order = list(reversed(args.models))
                per_model = dict(zip(order, pool.map(run_one, order), strict=True))
            ceiling = [r for m in args.models for r in per_model[m]]
        else:
            ceiling = run_ceiling(args.models, sparsities, tuple(args.seeds))
        path = write_ceiling(ceiling, args.out, command)
        print(path.read_text())
        return 0
    if args.which == "refine_holdout":
        from .refine_holdout import run_refine_holdout, write_refine_holdout

        rows = run_refine_holdout(args.models, args.sparsities or (0.5, 0.7), args.settings)
        path = write_refine_holdout(rows, args.out, command)
        print(path.read_text())
        return 0
    if args.which == "generalisation":
        import torch

        from .generalisation import (
            merge_rows,
            run_generalisation,
            run_split,
            write_generalisation,
        )

        torch.set_num_threads(2)  # the machine's two cores; the table's seconds say so
        kwargs = {
            "sparsities": args.sparsities,
            "methods": args.methods,
            "eval_seeds": tuple(args.seeds),
        }
        if args.jobs > 1:  # the same rows, side by side, one thread a process
            from concurrent.futures import ProcessPoolExecutor
            from functools import partial

            from .refine_holdout import SPLITS

            # one process per (model, split), the last model's (the largest) first
            tasks = [(m, split) for m in reversed(args.models) for split in SPLITS]
            with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
                parts = pool.map(partial(run_split, **kwargs), *zip(*tasks, strict=True))
                generalisation = merge_rows(list(parts))
            generalisation.sort(key=lambda r: args.models.index(r.model))
        else:
            generalisation = run_generalisation(args.models, **kwargs)
        path = write_generalisation(generalisation, args.out, command, args.table or "generalisation.md")
        print(path.read_text())
        return 0
    if args.which == "frontier":
        import torch

        from .frontier import points_named, rows_by_model, run_frontier, run_split, write_frontier

        torch.set_num_threads(2)
        points = points_named(args.points) if args.points else None
        if args.clip != "range" and args.out == DEFAULT_OUT:  # never mixed into the product's table
            args.out = DEFAULT_OUT / f"clip_{args.clip}"
        if args.jobs > 1:  # one process per (model, split), one thread each; the largest model first
            from concurrent.futures import ProcessPoolExecutor
            from functools import partial

            from .refine_holdout import SPLITS

            tasks = [(m, split) for m in reversed(args.models) for split in SPLITS]
            run_part = partial(
                run_split,
                eval_seeds=tuple(args.seeds),
                points=points,
                clip=args.clip,
                shrink_text=args.shrink_text,
            )
            with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
                parts = pool.map(run_part, *zip(*tasks, strict=True))
                frontier_rows = rows_by_model(list(parts), args.models)
        else:
            frontier_rows = run_frontier(
                args.models,
                eval_seeds=tuple(args.seeds),
                points=points,
                clip=args.clip,
                shrink_text=args.shrink_text,
            )
        path = write_frontier(
            frontier_rows,
            args.out,
            command,
            previous=args.out / "frontier.json",
            clip=args.clip,
            shrink_text=args.shrink_text,
        )
        print(path.read_text())
        return 0
    if args.which == "checkpoint":
        from .checkpoint_size import write_checkpoint_bench

        path = write_checkpoint_bench(args.out)
        print(path.read_text())
        return 0
    if args.which == "video":
        from .video_calibration import write_video_bench

        path = write_video_bench(args.out)
        print(path.read_text())
        return 0
    if args.which == "models":
        from .supported_models import write_supported_models

        path = write_supported_models(Path("docs"))
        print(path.read_text())
        return 0
    if args.which == "speed":
        from .speed import write_speed

        path = write_speed(args.out, args.only)
        print(path.read_text())
        return 0
    from .sweep import write_sweep

    path = write_sweep(args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
