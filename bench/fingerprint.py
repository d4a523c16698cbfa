"""What the calibration fingerprint detects: ``python -m bench.fingerprint``.

A calibration stores, per layer, :func:`~ditprune_core.stats.weight_sample_hash` of the weight it
was recorded on: 16 evenly strided entries, rounded to 6 decimals, hashed. Pruning refuses a
calibration whose hash differs for any layer. This measures, on FLUX.1-dev-shaped layers (random
bf16 weights, std 0.02, the real sizes), which changes of the weights change that hash, with the
real function; writes docs/bench/fingerprint.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ditprune_core.dit_shapes import FLUX_LAYERS
from ditprune_core.stats import weight_sample_hash

from . import write_report

LAYERS = FLUX_LAYERS  # the distinct large shapes of FLUX.1-dev's prunable layers
FLUX_BLOCK_LAYERS = 19 * 2 * 5 + 38 * 3  # double: mod, qkv, proj, mlp.0, mlp.2 per stream; single: 3
TRIALS = 8

Change = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _lora(relative: float, rank: int = 16) -> Change:
    def change(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        a = torch.randn(rank, w.shape[1], generator=gen)
        b = torch.randn(w.shape[0], rank, generator=gen)
        delta = b @ a
        delta *= relative * w.float().norm() / delta.norm()
        return (w.float() + delta).to(w.dtype)  # merged in fp32, stored in the model's dtype

    return change


def _step(lr: float, dtype: torch.dtype) -> Change:
    """One Adam-like optimiser step (every entry moves by lr, in the gradient's sign), stored in ``dtype``."""

    def change(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        sign = torch.randint(0, 2, w.shape, generator=gen, dtype=torch.int8).float() * 2 - 1
        return (w.float() + lr * sign).to(dtype)

    return change


def _sparse(fraction: float) -> Change:
    """A fine-tune that changed ``fraction`` of the entries (at random places) by 10 %."""

    def change(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = w.clone().reshape(-1)
        idx = torch.randint(0, out.numel(), (max(1, round(fraction * out.numel())),), generator=gen)
        out[idx] = (out[idx].float() * 1.1 + 1e-3).to(out.dtype)
        return out.reshape(w.shape)

    return change


def _pruned(w: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
    keep = w.abs() > w.abs().float().median()
    return w * keep


CASES: list[tuple[str, Change, int]] = [  # (what, change, trials)
    (
        "another checkpoint (independent weights)",
        lambda w, g: torch.randn(w.shape, generator=g).to(w.dtype) * 0.02,
        1,
    ),
    ("the same checkpoint pruned 50 % (magnitude)", _pruned, 1),
    ("the same weights upcast to fp32 (ComfyUI on CPU)", lambda w, _g: w.float(), 1),
    ("the same weights cast to fp8 e4m3fn", lambda w, _g: w.to(torch.float8_e4m3fn), 1),
    ("LoRA rank 16 merged, ‖ΔW‖/‖W‖ = 1e-2, bf16", _lora(1e-2), 1),
    ("LoRA rank 16 merged, ‖ΔW‖/‖W‖ = 1e-3, bf16", _lora(1e-3), 1),
    ("LoRA rank 16 merged, ‖ΔW‖/‖W‖ = 1e-4, bf16", _lora(1e-4), 1),
    ("one optimiser step, lr 1e-4, bf16", _step(1e-4, torch.bfloat16), 1),
    ("one optimiser step, lr 1e-5, fp32", _step(1e-5, torch.float32), 1),
    ("one optimiser step, lr 1e-7, fp32", _step(1e-7, torch.float32), 1),
    ("one weight changed", _sparse(0.0), TRIALS),
    ("0.1 % of the weights changed", _sparse(1e-3), TRIALS),
    ("1 % of the weights changed", _sparse(1e-2), TRIALS),
    ("10 % of the weights changed", _sparse(1e-1), TRIALS),
]


def _entries_changed(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() != b.float()).float().mean())


def measure(seed: int = 0) -> list[tuple[str, float, float, float]]:
    """For each case: (what, share of entries changed, share of layer hashes changed, whole-model miss
    probability for FLUX.1-dev's block layers at that per-layer rate)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {
        name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) for name, shape in LAYERS.items()
    }
    hashes = {name: weight_sample_hash(w) for name, w in weights.items()}
    rows = []
    for what, change, trials in CASES:
        changed = flagged = total = 0.0
        for name, w in weights.items():
            for _ in range(trials):
                other = change(w, gen)
                changed += _entries_changed(w, other)
                flagged += weight_sample_hash(other) != hashes[name]
                total += 1
                del other
        rate = flagged / total
        rows.append((what, changed / total, rate, (1 - rate) ** FLUX_BLOCK_LAYERS))
    return rows


def write_fingerprint_bench(out: Path, command: str) -> Path:
    start = time.perf_counter()
    rows = measure()
    seconds = time.perf_counter() - start
    lines = [
        "# What the calibration fingerprint detects",
        "",
        f"Generated by `{command}` ({seconds:.0f} s on CPU). Layers: "
        + ", ".join(f"{n} {o}x{i}" for n, (o, i) in LAYERS.items())
        + ", random bf16 weights (std 0.02). Per layer, the hash of 16 strided entries rounded to 6 "
        f"decimals is compared, as pruning does. Rare changes are tried {TRIALS} times per layer. The "
        f"last column applies the per-layer rate to the {FLUX_BLOCK_LAYERS} block layers of FLUX.1-dev, "
        "every one changed alike and each checked (pruning checks them all).",
        "",
        "| change | entries changed | layer hashes changed | whole model missed |",
        "|---|---|---|---|",
    ]
    for what, changed, rate, miss in rows:
        lines.append(f"| {what} | {changed:.4%} | {rate:.0%} | {miss:.3g} |")
    return write_report(out, "fingerprint.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fingerprint", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args(argv)
    command = "python -m bench.fingerprint " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_fingerprint_bench(args.out, command.strip())
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
