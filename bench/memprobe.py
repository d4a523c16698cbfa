"""Peak-RSS probe: prune a synthetic layer stack in a fresh process and report the peak extra memory.

    python -m bench.memprobe --layers 24 --width 1024 [--granularity cluster]

Prints one JSON line: ``peak_extra_bytes`` (peak RSS during pruning minus RSS before it) and
``largest_layer_fp32_bytes``. Linux only (``/proc/self/status``, ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from ditprune_core.config import PruneConfig
from ditprune_core.prune import prune_model_
from ditprune_core.stats import CalibrationStats, LayerStats, weight_sample_hash


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident memory since :meth:`reset`: the kernel's high-water mark where it can be
    reset, else a 1 ms sampling thread."""

    def __init__(self) -> None:
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False

    def reset(self) -> int:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._kernel = True
        except OSError:
            self._kernel = False
            self._peak = _status_kb("VmRSS")
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return _status_kb("VmRSS") * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _status_kb("VmRSS"))
            time.sleep(0.001)

    def peak(self) -> int:
        if self._kernel:
            return _status_kb("VmHWM") * 1024
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self._peak, _status_kb("VmRSS")) * 1024


class _Block(nn.Module):
    def __init__(self, width: int, ratio: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, ratio * width, bias=False)
        self.down = nn.Linear(ratio * width, width, bias=False)


class LayerStack(nn.Module):
    """``blocks.N.{up,down}``: a generic DiT-like stack (found by the generic template)."""

    def __init__(self, layers: int, width: int, ratio: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width, ratio) for _ in range(layers // 2))


def synthetic_stats(
    model: nn.Module, seed: int = 0, *, spread: str = "uniform", architecture: str = "generic"
) -> CalibrationStats:
    """Random calibration statistics for every Linear of ``model`` (benchmarks need no sampler).

    ``spread``: ``"uniform"`` draws E[x²] from [0.01, 4.01); ``"lognormal"`` from exp(1.5 N(0, 1)),
    with DiT-like outlier channels.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if spread == "lognormal":
                a = torch.randn(m.in_features, generator=gen, dtype=torch.float64).mul(1.5).exp()
            else:
                a = torch.rand(m.in_features, generator=gen, dtype=torch.float64) * 4 + 0.01
            layers[name] = LayerStats(a, m.in_features, m.out_features, 1, 1.0, weight_sample_hash(m.weight))
    return CalibrationStats(layers, architecture)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--metric", default=None, help="default: PruneConfig's")
    parser.add_argument("--granularity", default=None, help="default: PruneConfig's")
    parser.add_argument("--pattern", default="unstructured")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with torch.no_grad():
        model = LayerStack(args.layers, args.width)
    stats = synthetic_stats(model)
    chosen = {"metric": args.metric, "granularity": args.granularity}
    config = PruneConfig(0.5, pattern=args.pattern, **{k: v for k, v in chosen.items() if v is not None})
    largest = max(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) * 4
    # warm-up on a small stack: loads sklearn, allocator pools and kernels outside the measurement
    small = LayerStack(2, 64)
    prune_model_(small, synthetic_stats(small), config)
    probe = PeakRSS()
    before = probe.reset()
    report = prune_model_(model, stats, config)
    peak = probe.peak()
    print(
        json.dumps(
            {
                "peak_extra_bytes": peak - before,
                "largest_layer_fp32_bytes": largest,
                "model_fp32_bytes": sum(p.numel() for p in model.parameters()) * 4,
                "sparsity": report.sparsity,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
