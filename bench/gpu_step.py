"""Step time and memory of every format on a GPU (or, as a smoke run, on the CPU).

    python -m bench gpu_step --device cuda --gguf-dequant /path/to/ComfyUI-GGUF/dequant.py
    python -m bench gpu_step --device cpu --quick --gguf-dequant ...   # the tested smoke run

FLUX.1-dev's four prunable layer shapes (``--quick``: every side / 8), random weights pruned 50 %
by magnitude, inputs of 4096 tokens (a 1024² image; ``--quick``: 64) in the compute dtype (bf16 on
a GPU, float32 on the CPU, as ComfyUI computes there). Every format's layers are held on the
device as its ComfyUI runtime holds them, and each step makes every layer's weight the way that
runtime does (:mod:`~bench.decode_speed`): dense (nothing to decode), ComfyUI's fp8
(cast to the compute dtype), GGUF Q8_0 / Q4_0 / Q3_K / Q2_K through ComfyUI-GGUF's own
``dequant.py`` (its default ``dequant_dtype``), and ditprune's runtime decode of a bf16 file.
Formats interleaved, best of ``--repeats``; with ``--compile``, ditprune's decode also runs under
``torch.compile`` (inductor). Memory: the bytes each format holds, and on CUDA the peak that one
step of the four layers adds on top (``torch.cuda.max_memory_allocated``: the decoded weight, the
output and the decode's temporaries). LoRA: the step with 1 and 2 rank-32 LoRAs on every layer,
the patches already on the device, for GGUF Q4_0 (ComfyUI-GGUF's default: the weight in the
compute dtype, the product in float32) and ditprune int4 with ``patch_dtype`` float32 and target.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ditprune_core.dit_shapes import FLUX_LAYERS

from . import write_report
from .decode_speed import (
    DITPRUNE_FORMATS,
    Format,
    ditprune_formats,
    flux_layer,
    load_gguf_dequant,
    lora_patch_,
    make_loras,
    reference_formats,
)

log = logging.getLogger("ditprune")

GPU_GGUF = ("Q8_0", "Q4_0", "Q3_K", "Q2_K")
LORA_COUNTS = (1, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, run: Callable[[], object]) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def run_gpu_step(
    dequant_path: str | None,
    device: torch.device,
    *,
    quick: bool = False,
    tokens: int | None = None,
    repeats: int = 5,
    compile_decode: bool = False,
) -> dict[str, dict[str, float]]:
    """Per format: ``step`` (s, the four layers), ``held`` (bytes), ``peak`` (bytes added by one
    step, CUDA only), and ``lora1`` / ``lora2`` (s) where measured."""
    dequant = load_gguf_dequant(dequant_path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = tokens or (64 if quick else 4096)
    scale = 8 if quick else 1
    layers = {n: (r // scale, c // scale) for n, (r, c) in FLUX_LAYERS.items()}
    gen = torch.Generator().manual_seed(0)
    per_layer: list[tuple[dict[str, Format], torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = []
    for name, shape in layers.items():
        w, keep = flux_layer(name, shape, gen)
        formats = reference_formats(w, dequant, device, dtype, dense_dtype=dtype, gguf=GPU_GGUF)
        formats.update(ditprune_formats(w, keep, device, dtype, DITPRUNE_FORMATS))
        if compile_decode:
            for label in ("ditprune 50% + int4", "ditprune 50% + bf16"):
                formats[f"{label} (compiled)"] = Format(
                    torch.compile(formats[label].make), formats[label].held
                )
        x = torch.randn(tokens, shape[1], generator=gen).to(device=device, dtype=dtype)
        per_layer.append((formats, x, make_loras(shape, max(LORA_COUNTS), gen, device)))
        log.info("gpu_step: %s built", name)
    labels = list(per_layer[0][0])
    lora_runs: dict[str, Callable[[Format, torch.Tensor, list], torch.Tensor]] = {
        "GGUF Q4_0": lambda f, x, loras: _patched(f, x, loras, torch.float32, into=None),
        "ditprune 50% + int4": lambda f, x, loras: _patched(f, x, loras, torch.float32, into=torch.float32),
        "ditprune 50% + int4, patch_dtype target": lambda f, x, loras: _patched(
            f, x, loras, x.dtype, into=None
        ),
    }
    best: dict[str, dict[str, float]] = {label: {} for label in [*labels, *lora_runs]}
    for label in labels:  # warm-up (and compile) outside the timing
        for formats, x, _ in per_layer:
            torch.nn.functional.linear(x, formats[label].make())
    for _ in range(repeats):
        for label in labels:
            seconds = 0.0
            for formats, x, _ in per_layer:
                fmt = formats[label]
                seconds += _timed(device, partial(_step, fmt, x))
            best[label]["step"] = min(best[label].get("step", np.inf), seconds)
        for label, run in lora_runs.items():
            source = "GGUF Q4_0" if label.startswith("GGUF") else "ditprune 50% + int4"
            for n in LORA_COUNTS:
                seconds = 0.0
                for formats, x, loras in per_layer:
                    fmt, patches = formats[source], loras[:n]
                    seconds += _timed(device, partial(run, fmt, x, patches))
                best[label][f"lora{n}"] = min(best[label].get(f"lora{n}", np.inf), seconds)
    for label in labels:
        best[label]["held"] = float(sum(formats[label].held for formats, _, _ in per_layer))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            for formats, x, _ in per_layer:
                torch.nn.functional.linear(x, formats[label].make())
            best[label]["peak"] = float(torch.cuda.max_memory_allocated(device) - base)
    return best


def _step(fmt: Format, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, fmt.make())


def _patched(
    fmt: Format,
    x: torch.Tensor,
    loras: list[tuple[torch.Tensor, torch.Tensor]],
    product_dtype: torch.dtype,
    *,
    into: torch.dtype | None,
) -> torch.Tensor:
    """One step with LoRA patches applied after the decode: in ``into`` (then cast back to the
    compute dtype; ditprune's ``patch_dtype`` float32) or in the decoded weight's dtype (None)."""
    weight = fmt.make()
    if into is not None:
        weight = weight.to(into)
    lora_patch_(weight, loras, product_dtype)
    return torch.nn.functional.linear(x, weight.to(x.dtype))


def write_gpu_step(
    out_dir: Path,
    command: str,
    *,
    device: str = "cuda",
    quick: bool = False,
    dequant_path: str | None = None,
    repeats: int = 5,
    compile_decode: bool = False,
) -> Path:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "gpu_step --device cuda: no CUDA device here; --device cpu --quick runs on the CPU"
        )
    best = run_gpu_step(dequant_path, dev, quick=quick, repeats=repeats, compile_decode=compile_decode)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    dense = next(label for label in best if label.startswith("dense"))
    q4 = best["GGUF Q4_0"]["step"]
    sizes = "quick: FLUX shapes / 8, 64 tokens" if quick else "FLUX.1-dev shapes, 4096 tokens"
    lines = [
        f"# Step time and memory per format, {name} (generated)",
        "",
        f"Command: `{command}`. Written by `bench/gpu_step.py`; do not edit by hand.",
        f"torch {torch.__version__}; {sizes}; best of {repeats}, interleaved.",
        "",
        "| format | held MB | step s (4 layers) | vs dense | vs GGUF Q4_0 | peak MB added by a step | "
        "1 LoRA s | 2 LoRA s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, m in best.items():
        step = m.get("step")
        held = f"{m['held'] / 1e6:.0f}" if "held" in m else "-"
        peak = f"{m['peak'] / 1e6:.0f}" if "peak" in m else "-"
        cells = (
            f"{step:.4f} | {step / best[dense]['step']:.2f}× | {step / q4:.2f}×"
            if step is not None
            else "- | - | -"
        )
        loras = " | ".join(f"{m[f'lora{n}']:.4f}" if f"lora{n}" in m else "-" for n in LORA_COUNTS)
        lines.append(f"| {label} | {held} | {cells} | {peak} | {loras} |")
    lines.append("")
    filename = (
        "gpu_step.md"
        if dev.type == "cuda" and not quick
        else f"gpu_step_{dev.type}{'_quick' if quick else ''}.md"
    )
    return write_report(out_dir, filename, "\n".join(lines))
