"""Speed and memory of mask computation on FLUX.1-dev-shaped layers (random weights, real sizes).

    python -m bench speed        # writes docs/bench/speed.md

One double-stream and one single-stream block of FLUX.1-dev (hidden 3072, MLP 12288, heads 24) in
bf16. For every metric x granularity x pattern it times computing the masks of the default layer
families, streaming (one layer's scores alive at a time), and reads the peak extra RSS; the ratio
to plain row-wise Wanda is measured in the same run. The 12B figure extrapolates to FLUX.1-dev's
19 double + 38 single blocks. A second table times the calibration hooks against the same forward
passes without hooks.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ditprune_core.calibrate import Calibrator
from ditprune_core.config import GRANULARITIES, PruneConfig
from ditprune_core.miniflux.model import DoubleStreamBlock, SingleStreamBlock, rope_frequencies
from ditprune_core.prune import iter_masks
from ditprune_core.score import METRICS
from ditprune_core.stats import CalibrationStats

from . import write_report
from .memprobe import PeakRSS, synthetic_stats

log = logging.getLogger("ditprune")

HIDDEN, MLP, HEADS = 3072, 12288, 24
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38


class FluxDevBlocks(nn.Module):
    """``double_blocks.0`` and ``single_blocks.0`` of FLUX.1-dev (module names as in ComfyUI)."""

    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(HIDDEN, HEADS, MLP)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(HIDDEN, HEADS, MLP)])

    def blocks(self) -> tuple[DoubleStreamBlock, SingleStreamBlock]:
        double, single = self.double_blocks[0], self.single_blocks[0]
        assert isinstance(double, DoubleStreamBlock) and isinstance(single, SingleStreamBlock)
        return double, single


def flux_dev_blocks(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> FluxDevBlocks:
    """One FLUX.1-dev double and single block with random weights (std 0.02), built without a
    float32 detour so that bf16 needs only its own 2 bytes per weight."""
    with torch.device("meta"):
        model = FluxDevBlocks()
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.zero_()
    return model


def limit_malloc_caching() -> str:
    """Make glibc return freed blocks at once, so that peak RSS reflects live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        return "glibc mmap threshold fixed at 64 KiB"
    except (OSError, AttributeError):
        return "allocator defaults (peak RSS includes cached blocks)"


def time_config(model: nn.Module, stats: CalibrationStats, config: PruneConfig) -> tuple[float, float, int]:
    """Seconds for the double block, for the single block, and the peak extra RSS."""
    probe = PeakRSS()
    before = probe.reset()
    times = {}
    for prefix in ("double_blocks", "single_blocks"):
        scoped = replace(config, layer_regex=rf"^{prefix}\.")
        start = time.perf_counter()
        for _name, keep in iter_masks(model, stats, scoped):
            del keep
        times[prefix] = time.perf_counter() - start
    return times["double_blocks"], times["single_blocks"], probe.peak() - before


def configs() -> list[tuple[str, PruneConfig]]:
    out = [("DiT-Pruning defaults", PruneConfig(0.5))]
    for metric in METRICS:
        for granularity in GRANULARITIES:
            out.append((f"{metric} {granularity}", PruneConfig(0.5, metric=metric, granularity=granularity)))
        for pattern in ("2:4", "4:8"):
            out.append((f"{metric} {pattern}", PruneConfig(0.5, metric=metric, pattern=pattern)))
    return out


REFERENCE = "wanda row"


def hook_overhead(tokens: int = 256, text_tokens: int = 64, repeats: int = 3) -> tuple[float, float]:
    """Forward seconds of one double + one single FLUX block, without and with calibration hooks."""
    model = flux_dev_blocks(torch.float32, seed=1)
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(1, tokens, HIDDEN, generator=gen)
    txt = torch.randn(1, text_tokens, HIDDEN, generator=gen)
    vec = torch.randn(1, HIDDEN, generator=gen)
    ids = torch.zeros(1, tokens + text_tokens, 3)
    angles = rope_frequencies(ids, (16, 56, 56), 10_000)
    double, single = model.blocks()

    def forward() -> None:
        with torch.no_grad():
            i, t = double(img, txt, vec, angles)
            single(torch.cat([t, i], dim=1), vec, angles)

    def timed(fn: Callable[[], None]) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    forward()  # warm-up
    plain = timed(forward)
    with Calibrator(model) as cal:
        hooked = timed(forward)
    _ = cal.stats
    plain_again = timed(forward)
    return min(plain, plain_again), hooked


def run_speed(selected: Sequence[str] | None = None, repeats: int = 2) -> str:
    allocator = limit_malloc_caching()
    torch.manual_seed(0)
    model = flux_dev_blocks()
    stats = synthetic_stats(model, spread="lognormal", architecture="flux")
    largest = max(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and "mod" not in n
    )
    chosen = [
        (label, cfg) for label, cfg in configs() if not selected or label in selected or label == REFERENCE
    ]
    time_config(model, stats, chosen[0][1])  # warm-up: first touches of the weights, thread pools
    measured: dict[str, tuple[float, float, int]] = {}
    for _round in range(repeats):  # rounds interleave the methods, so drift hits all of them alike
        for label, config in chosen:
            double_s, single_s, peak = time_config(model, stats, config)
            old = measured.get(label, (float("inf"), float("inf"), 0))
            measured[label] = (min(old[0], double_s), min(old[1], single_s), max(old[2], peak))
            log.info("%-24s %.2f s + %.2f s  peak %.2fx", label, double_s, single_s, peak / (largest * 4))
    reference = sum(measured[REFERENCE][:2])
    rows = []
    for label, (double_s, single_s, peak) in measured.items():
        twelve_b = DOUBLE_BLOCKS * double_s + SINGLE_BLOCKS * single_s
        rows.append(
            (label, double_s, single_s, (double_s + single_s) / reference, twelve_b, peak / (largest * 4))
        )
    plain, hooked = hook_overhead()
    lines = [
        "# Speed benchmark (generated)",
        "",
        "Command: `python -m bench speed`. Written by `bench/speed.py`.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, CPU.",
        f"Memory: peak extra RSS while computing masks, as a multiple of the largest pruned layer in "
        f"fp32 ({largest * 4 / 2**20:.0f} MiB, single_blocks.0.linear1); {allocator}.",
        "",
        "Masks for the default layer families (attention, MLP, fused single-block layers) of one",
        "FLUX.1-dev double block and one single block, bf16 weights, sparsity 50 %. The 12B column",
        f"extrapolates to {DOUBLE_BLOCKS} double + {SINGLE_BLOCKS} single blocks. Ratios are to row-wise",
        f"Wanda measured in the same run; each time is the best of {repeats} interleaved rounds; absolute",
        "seconds vary with the machine.",
        "",
        "| method | double block s | single block s | ratio to wanda-row | 12B extrapolated s "
        "| peak extra / largest fp32 layer |",
        "|---|---|---|---|---|---|",
    ]
    for label, double_s, single_s, ratio, twelve_b, peak_ratio in rows:
        lines.append(
            f"| {label} | {double_s:.2f} | {single_s:.2f} | {ratio:.2f} | {twelve_b:.0f} | {peak_ratio:.2f} |"
        )
    lines += [
        "",
        "## Calibration hooks",
        "",
        "One double + one single FLUX.1-dev block (fp32), 256 image + 64 text tokens, best of 3.",
        "",
        "| forward without hooks s | with Calibrator hooks s | ratio |",
        "|---|---|---|",
        f"| {plain:.3f} | {hooked:.3f} | {hooked / plain:.3f} |",
        "",
    ]
    return "\n".join(lines)


def write_speed(out_dir: Path, selected: Sequence[str] | None = None) -> Path:
    return write_report(out_dir, "speed.md", run_speed(selected))
