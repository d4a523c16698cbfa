"""Writes the per-GPU choice table: ``python -m bench tiers`` reads docs/bench/frontier.json and writes
``vram_tiers.json`` / ``vram_tiers.md``. The choice itself is the core's (:mod:`ditprune_core.tiers`),
which the nodes and the workflow generator use too."""

from __future__ import annotations

import json
from pathlib import Path

from ditprune_core.tiers import (
    FLUX_LARGEST_DECODED_BYTES,
    TierChoice,
    choose_tiers,
    comfy_reserve_bytes,
    load_frontier,
)

__all__ = ["to_markdown", "write_tiers"]


def _cell(error: float | None) -> str:
    return "not measured" if error is None else f"{error:.5f}"


def to_markdown(choices: list[TierChoice], source: str) -> str:
    models = list(dict.fromkeys(m for c in choices for m in c.errors))
    lines = [
        "# Which setting for which GPU (generated)",
        "",
        f"Command: `python -m bench tiers`, from `{source}`. Written by",
        "`bench/tiers.py`; the FLUX.1-dev workflows `workflows/ditprune_flux1_dev_<N>gb.json`",
        "are made from `vram_tiers.json` (one per tier whose verdict is ditprune). Do not edit by hand.",
        "",
        "Each tier gets the Prune and Reconstruct + Save setting with the least mean held-out error",
        "(relative MSE of final samples against dense on MiniFlux classes the calibration never saw,",
        "docs/bench/frontier.md; mean over the test-beds that measured every point; dense quantise-only",
        "and sparse files alike) whose FLUX.1-dev file, plus its largest decoded layer",
        f"({FLUX_LARGEST_DECODED_BYTES / 1e6:.0f} MB) plus ComfyUI's own reserve for sampling at 1024x1024 "
        f"({comfy_reserve_bytes() / 1e9:.2f} GB), fits the card without offloading. A file that ComfyUI's",
        "own fp8 cast beats in both size and error is never chosen; where the fp8 cast fits and has less",
        "error, the verdict is to use it and no workflow is made.",
        "",
        "| card | verdict | setting | sparsity | value bits (group) | Save values | remainder | file GB "
        f"| VRAM GB (file + layer) | {' | '.join(f'held-out rel. MSE {m}' for m in models)} "
        "| ComfyUI fp8 (11.9 GB) |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(models) + "---|",
    ]
    for c in choices:
        fp8 = (
            f"fits, error {' / '.join(f'{e:.5f}' for e in c.fp8_errors.values())}: better"
            if c.fp8_fits
            else "does not fit"
        )
        lines.append(
            f"| {c.vram_gib} GB | {'ComfyUI fp8' if c.verdict == 'fp8' else 'ditprune'} | {c.point} | "
            f"{c.sparsity:.0%} {c.pattern} | "
            f"{f'{c.value_bits} ({c.value_group})' if c.value_bits else 'none'} | {c.values} | "
            f"{c.remainder}{' (GPTQ when pruning)' if c.remainder_bits else ''} | {c.file_gb:.2f} | "
            f"{c.vram_gb:.2f} | {' | '.join(_cell(c.errors.get(m)) for m in models)} | {fp8} |"
        )
    return "\n".join(lines)


def write_tiers(frontier_json: Path, out_dir: Path) -> Path:
    """Choose every tier from ``frontier_json``; write ``vram_tiers.json`` and ``vram_tiers.md``."""
    choices = choose_tiers(load_frontier(frontier_json))
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "source": frontier_json.name,
        "reserve_bytes": comfy_reserve_bytes(),
        "largest_decoded_bytes": FLUX_LARGEST_DECODED_BYTES,
        "tiers": [c.to_dict() for c in choices],
    }
    (out_dir / "vram_tiers.json").write_text(json.dumps(data, indent=1) + "\n")
    md = out_dir / "vram_tiers.md"
    md.write_text(to_markdown(choices, frontier_json.name) + "\n")
    return md
