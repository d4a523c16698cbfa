"""Low-bit files: what the remainder choice costs, and what per-layer dequantisation costs a step.

    python -m bench lowbit         # writes docs/bench/lowbit.md

1. **Remainder.** Both MiniFlux models pruned with the DiT-Pruning defaults at 50 % (bitmask) and
   saved with int4 values (:data:`~ditprune_core.quantize.DEFAULT_VALUE_SPECS`, rounded at save
   time) by :func:`~ditprune_core.save.save_pruned_checkpoint` with ``remainder`` keep / fp8 / int8 / int4,
   read back with :func:`~ditprune_core.save.load_pruned_checkpoint` and sampled: the quality
   benchmark's metrics against the dense model from the same noise, and the file's size. The same
   without the int4 rounding (bf16 values) shows what the remainder costs alone.
2. **Step time.** FLUX.1-dev-shaped layers (random weights, the real sizes) at 50 % sparsity,
   forward at 512 tokens on the CPU in float32, each layer's weight made the way the ComfyUI
   runtime makes it every forward (:class:`~nodes.packed.PackedLinear`:
   :func:`~ditprune_core.runtime.decode_runtime`, values rounded to the file's bf16 and written once
   in the input's dtype), against the dense float32 weight and against
   ComfyUI's fp8 weights (cast to float32 before the matmul); best of 3, interleaved, side by side.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditprune_core.config import PruneConfig
from ditprune_core.dit_shapes import FLUX_LAYERS, FLUX_REST, SHAPES
from ditprune_core.layers import rest_linear_params
from ditprune_core.layouts import LAYOUTS, Fp8Values, storage_cost
from ditprune_core.mask import layer_keep_mask
from ditprune_core.miniflux.pipeline import MiniFluxPipeline
from ditprune_core.prune import apply_masks_, compute_masks
from ditprune_core.quantize import DEFAULT_DENSE_SPECS, DEFAULT_VALUE_SPECS, quantize_weight
from ditprune_core.runtime import decode_runtime, runtime_pieces, runtime_plan
from ditprune_core.save import load_pruned_checkpoint, remainder_spec, save_pruned_checkpoint

from . import write_report
from .context import BenchContext, fmt_stat

log = logging.getLogger("ditprune")

REMAINDERS = ("keep", "fp8", "int8", "int4")


@dataclass
class RemainderPoint:
    model: str
    values: str
    remainder: str
    file_ratio: float  # file bytes / the dense bf16 state dict's bytes
    remainder_error: float  # largest |error| / peak over the remainder's weights
    metrics: dict[str, list[float]]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def run_remainder(
    model: str, *, seeds: Sequence[int] = (0, 1, 2), per_class: int = 10
) -> list[RemainderPoint]:
    """Every (values, remainder) point on one MiniFlux, through real files."""
    ctx = BenchContext.build(model, seeds=seeds, per_class=per_class)
    pruned = copy.deepcopy(ctx.pipe.model)
    apply_masks_(pruned, compute_masks(pruned, ctx.stats, PruneConfig(0.5)))
    state = _state(pruned)
    dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for values in ("keep", "int4"):
            for remainder in REMAINDERS:
                start = time.perf_counter()
                path = Path(tmp) / f"{values}-{remainder}.safetensors"
                report = save_pruned_checkpoint(state, path, values=values, remainder=remainder)
                net = copy.deepcopy(ctx.pipe.model)
                loaded = load_pruned_checkpoint(path)
                net.load_state_dict({k: v.float() for k, v in loaded.items()})
                metrics = ctx.evaluate(MiniFluxPipeline(net, ctx.pipe.conditioner))
                points.append(
                    RemainderPoint(
                        model,
                        "bf16" if values == "keep" else values,
                        remainder,
                        report.file_bytes / dense_bytes,
                        report.max_remainder_relative_error,
                        metrics,
                    )
                )
                log.info(
                    "%s %s values, remainder %s: rel err %.4f (%.1f s)",
                    model,
                    values,
                    remainder,
                    np.mean(metrics["rel_err"]),
                    time.perf_counter() - start,
                )
    return points


#: FLUX.1-dev's weights that ``remainder`` codes: the modulation layers (3.23B of the 3.29B outside
#: the prunable layers); the other 67M (embedders, final layer, norms, biases) stay in bf16
FLUX_REMAINDER_CODED = rest_linear_params(SHAPES["flux"](), "flux")


def flux_rest_gb(remainder: str) -> float:
    """GB of FLUX.1-dev's 3.29B parameters outside the prunable layers when Save Pruned Model stores
    them with ``remainder``: the 3.23B modulation weights it codes (treated as one weight matrix of
    3072-wide rows: per-row and per-group data included), the embedders, final layer, norms and
    biases in bf16 (:func:`~ditprune_core.layers.remainder_layers`)."""
    kept = 2 * (FLUX_REST - FLUX_REMAINDER_CODED)
    if remainder == "keep":
        return 2 * FLUX_REST / 1e9
    rows = FLUX_REMAINDER_CODED // 3072
    if remainder == "fp8":
        return (FLUX_REMAINDER_CODED + 4 * rows + kept) / 1e9
    return (storage_cost((rows, 3072), remainder_spec(remainder)).total_bytes + kept) / 1e9


# ---------------------------------------------------------------------------------------------------
# step time


def _flux_weights(gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """FLUX-shaped float32 weights pruned to 50 % (magnitude over the layer: rows keep different
    counts, as DiT-Pruning's masks do) and their keep masks."""
    out = {}
    for name, (rows, cols) in FLUX_LAYERS.items():
        w = torch.randn(rows, cols, generator=gen).mul_(0.02)
        keep = layer_keep_mask(name, w, None, PruneConfig(0.5, metric="magnitude", granularity="layer"))
        out[name] = (w, keep)
    return out


def _two_four(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    idx = w.abs().reshape(rows, -1, 4).topk(2, dim=2).indices
    return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


def _runtime(pieces: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The weight as PackedLinear makes it each forward: runtime pieces, values rounded to bf16,
    written once in float32."""
    kept = runtime_pieces(pieces)
    plan = runtime_plan(kept)
    return lambda: decode_runtime(kept, plan, torch.bfloat16, out_dtype=torch.float32)


def _formats(w: torch.Tensor, keep: torch.Tensor) -> dict[str, tuple[Callable[[], torch.Tensor], int]]:
    """Format label -> (make the float32 weight, bytes held)."""
    bitmask = LAYOUTS["bitmask"]
    pruned = (w * keep).to(torch.bfloat16)
    fp8 = w.to(torch.float8_e4m3fn)
    out: dict[str, tuple[Callable[[], torch.Tensor], int]] = {
        "dense float32": (lambda: w, w.numel() * 4),
        "ComfyUI fp8 (cast per forward)": (lambda: fp8.to(torch.float32), w.numel()),
    }
    for label, values in (("bitmask + bf16 values", None), ("bitmask + fp8 values", "fp8")):
        pieces, _ = bitmask.encode(pruned, Fp8Values() if values else None)
        out[label] = (_runtime(pieces), sum(p.numel() * p.element_size() for p in pieces.values()))
    for bits in (4, 3):
        q = quantize_weight(w, DEFAULT_VALUE_SPECS[bits], keep=keep)
        pieces = bitmask.encode_quantized(q)
        held = runtime_pieces(pieces)
        out[f"bitmask + int{bits}"] = (
            _runtime(pieces),
            sum(p.numel() * p.element_size() for p in held.values()),
        )
    two_four = LAYOUTS["2:4"]
    q = quantize_weight(w, DEFAULT_VALUE_SPECS[4], keep=_two_four(w))
    pieces = two_four.encode_quantized(q)
    out["2:4 + int4"] = (_runtime(pieces), sum(p.numel() * p.element_size() for p in pieces.values()))
    dense = LAYOUTS["dense"]
    q = quantize_weight(w, DEFAULT_DENSE_SPECS[8])
    pieces = dense.encode_quantized(q)
    out["dense int8 (remainder)"] = (
        _runtime(pieces),
        sum(p.numel() * p.element_size() for p in pieces.values()),
    )
    return out


@torch.no_grad()
def run_step_time(
    tokens: int = 512, repeats: int = 3
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, int]]:
    """(forward s, decode-only s) per format and layer, best of ``repeats`` interleaved; and each
    format's bytes held for all layers."""
    gen = torch.Generator().manual_seed(0)
    forward: dict[str, dict[str, float]] = {}
    decode: dict[str, dict[str, float]] = {}
    held: dict[str, int] = {}
    for name, (w, keep) in _flux_weights(gen).items():
        x = torch.randn(tokens, w.shape[1], generator=gen)
        formats = _formats(w, keep)
        for _ in range(repeats):
            for label, (make, _nbytes) in formats.items():
                start = time.perf_counter()
                weight = make()
                made = time.perf_counter()
                torch.nn.functional.linear(x, weight)
                end = time.perf_counter()
                del weight
                forward.setdefault(label, {})[name] = min(
                    forward.get(label, {}).get(name, np.inf), end - start
                )
                decode.setdefault(label, {})[name] = min(
                    decode.get(label, {}).get(name, np.inf), made - start
                )
        for label, (_make, nbytes) in formats.items():
            held[label] = held.get(label, 0) + nbytes
        log.info("step time: %s done", name)
        del formats
    return forward, decode, held


# ---------------------------------------------------------------------------------------------------
# report


def _remainder_table(points: list[RemainderPoint]) -> list[str]:
    lines = [
        "| model | values | remainder | rel. error ↓ | PSNR dB ↑ | velocity error ↓ | accuracy ↑ | FD ↓ "
        "| file / dense bf16 | remainder max error / peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        m = p.metrics
        stats = (
            fmt_stat(m[k], d) for k, d in (("rel_err", 4), ("psnr", 2), ("vel_err", 4), ("acc", 3), ("fd", 1))
        )
        lines.append(
            f"| {p.model} | {p.values} | {p.remainder} | {' | '.join(stats)} | {p.file_ratio:.1%} | "
            f"{p.remainder_error:.4f} |"
        )
    return lines


def write_lowbit(
    out_dir: Path,
    command: str,
    models: Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    per_class: int = 10,
) -> Path:
    points = [p for m in models for p in run_remainder(m, seeds=seeds, per_class=per_class)]
    forward, decode, held = run_step_time()
    layers = list(FLUX_LAYERS)
    dense_total = sum(forward["dense float32"].values())
    fp8_total = sum(forward["ComfyUI fp8 (cast per forward)"].values())
    lines = [
        "# Low-bit files: the remainder's error and the step time of per-layer dequantisation (generated)",
        "",
        f"Command: `{command}`. Written by `bench/lowbit.py`; do not edit by hand.",
        "",
        "## What the remainder costs",
        "",
        "Both MiniFlux models pruned with the DiT-Pruning defaults at 50 % (bitmask), saved by",
        "`save_pruned_checkpoint` with bf16 or int4 values (int4: groups of 128 kept values, asymmetric,",
        "rounded at save time) and the dense layers (modulation, embedders, final layer; norms and biases",
        "always bf16) kept, in fp8 (e4m3fn, a float32 scale per row), int8 or int4 (groups of 128,",
        "asymmetric);",
        "read back from the file and sampled. Metrics against the dense model from the same noise, mean",
        "± std over the evaluation seeds (as in the quality benchmark). MiniFlux's dense layers weigh far",
        "more than FLUX.1-dev's (hidden 48-64: its adaLN modulation is most of the model), so the file",
        "ratios here are not FLUX.1-dev's.",
        "",
        *_remainder_table(points),
        "",
        "FLUX.1-dev's dense remainder (3.29B parameters, 28 %): "
        + ", ".join(f"{r} {flux_rest_gb(r):.2f} GB" for r in REMAINDERS)
        + ".",
        "",
        "## Step time with per-layer dequantisation (FLUX.1-dev-shaped layers, 50 %, 512 tokens, CPU)",
        "",
        "Each layer's weight is made as the ComfyUI runtime makes it every forward (`PackedLinear`:",
        "`decode_runtime`, values rounded to the file's bf16, written once in float32), then one float32",
        "matmul; best of 3,",
        "interleaved, on the CPU this ran on (shared, so only the ratios measured side by side mean",
        "anything). ComfyUI's fp8: weights stored in fp8, cast to float32 before the matmul. No GPU was",
        "lent to this work: GPU step time is not measured.",
        "",
        "| format | held MB | "
        + " | ".join(f"{n.split('.N.')[-1].removeprefix('img_')} s" for n in layers)
        + " | all s | decode s | vs dense | vs ComfyUI fp8 |",
        "|---|---|" + "---|" * len(layers) + "---|---|---|---|",
    ]
    for label, per_layer in forward.items():
        total = sum(per_layer.values())
        lines.append(
            f"| {label} | {held[label] / 1e6:.0f} | "
            + " | ".join(f"{per_layer[n]:.3f}" for n in layers)
            + f" | {total:.3f} | {sum(decode[label].values()):.3f} | {total / dense_total:.2f} | "
            f"{total / fp8_total:.2f} |"
        )
    lines.append("")
    return write_report(out_dir, "lowbit.md", "\n".join(lines))
