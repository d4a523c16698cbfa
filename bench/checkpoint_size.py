"""Checkpoint sizes and load times: dense vs compressed (bf16 and fp8 values).

    python -m bench checkpoint      # writes docs/bench/checkpoint.md

MiniFlux-A pruned with the DiT-Pruning defaults, and FLUX.1-dev-shaped layers (random bf16 weights,
the real sizes) pruned by magnitude per row, at 50/60/70 % and 2:4. The FLUX.1-dev projection
applies the measured ratios of the FLUX-width layers to FLUX.1-dev's prunable layers (attention,
MLP, fused single-block layers) and keeps the rest (modulation, embedders) dense.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ditprune_core.config import PruneConfig
from ditprune_core.dit_shapes import FLUX_LAYERS, FLUX_PRUNABLE, FLUX_TOTAL
from ditprune_core.layouts import PIECES, unpack_weight
from ditprune_core.mask import layer_keep_mask
from ditprune_core.miniflux.pipeline import calibrate, load_bundled
from ditprune_core.prune import apply_masks_, compute_masks
from ditprune_core.save import load_pruned_checkpoint, save_pruned_checkpoint
from ditprune_core.util.safetensors_io import tensor_crc32

from . import write_report

SETTINGS = {
    "50%": (0.5, "unstructured"),
    "60%": (0.6, "unstructured"),
    "70%": (0.7, "unstructured"),
    "2:4": (0.5, "2:4"),
}
REFERENCES = {
    "bf16 (dense)": 23.8,
    "fp8 (ComfyUI)": 11.9,
    "GGUF Q8_0": 12.7,
    "GGUF Q5_K_S": 8.3,
    "GGUF Q4_0": 6.8,
}


def _sizes(state: dict[str, torch.Tensor], folder: Path, tag: str) -> tuple[float, float, float]:
    """(compressed bf16 ratio, compressed fp8 ratio, fp8 max relative error) for one state dict."""
    plain = save_pruned_checkpoint(state, folder / f"{tag}_bf16.safetensors")
    fp8 = save_pruned_checkpoint(state, folder / f"{tag}_fp8.safetensors", value_dtype=torch.float8_e4m3fn)
    dense = folder / f"{tag}_dense.safetensors"
    save_file(state, str(dense))
    dense_size = dense.stat().st_size
    return plain.file_bytes / dense_size, fp8.file_bytes / dense_size, fp8.max_fp8_relative_error


def _flux_layers(sparsity: float, pattern: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, (rows, cols) in FLUX_LAYERS.items():
        w = torch.randn(rows, cols, generator=gen, dtype=torch.float32).mul_(0.02)
        keep = layer_keep_mask(
            name, w, None, PruneConfig(sparsity, metric="magnitude", granularity="row", pattern=pattern)
        )
        out[name] = w.mul_(keep).to(torch.bfloat16)
        del keep
    return out


def _load_ratio(state: dict[str, torch.Tensor], folder: Path) -> tuple[float, float, float]:
    """Seconds to load compressed (decompressing, checking every CRC32) and dense, and to CRC32 the
    compressed file's tensors alone; best of 3 each, interleaved. The dense load copies every tensor
    out of the memory map, so both read all their bytes."""
    dense, packed = folder / "load_dense.safetensors", folder / "load_packed.safetensors"
    save_file(state, str(dense))
    save_pruned_checkpoint(state, packed)
    best = [float("inf"), float("inf"), float("inf")]
    for _ in range(3):
        loaders = (
            lambda: load_pruned_checkpoint(packed),
            lambda: {k: v.clone() for k, v in load_file(str(dense)).items()},
            lambda: [tensor_crc32(v) for v in load_file(str(packed)).values()],
        )
        for i, fn in enumerate(loaders):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1], best[2]


def _step_ratio(folder: Path, pattern: str, tokens: int = 512) -> tuple[float, float]:
    """Forward seconds of the FLUX-shaped layers with per-layer decompression vs dense weights.

    Each layer is decompressed from its stored pieces right before its matmul, as the ComfyUI
    runtime does on every forward; best of 3, interleaved, float32 on the CPU.
    """
    state = {k: v.float() for k, v in _flux_layers(0.5, pattern).items()}
    path = folder / f"step_{pattern.replace(':', '_')}.safetensors"
    save_pruned_checkpoint(state, path)
    with safe_open(str(path), framework="pt") as f:
        pieces = {
            name: {p: f.get_tensor(f"{name}.{p}") for p in PIECES if f"{name}.{p}" in f.keys()}  # noqa: SIM118
            for name in state
        }
    gen = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(tokens, w.shape[1], generator=gen) for name, w in state.items()}
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for _ in range(3):
            for i in range(2):
                start = time.perf_counter()
                for name, w in state.items():
                    weight = unpack_weight(pieces[name], torch.float32, check=False) if i == 0 else w
                    torch.nn.functional.linear(inputs[name], weight)
                best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def run_checkpoint_bench() -> str:
    lines = [
        "# Checkpoint size benchmark (generated)",
        "",
        "Command: `python -m bench checkpoint`. Written by `bench/checkpoint_size.py`.",
        "",
        "File size as a fraction of the same state dict saved dense in bf16 (safetensors).",
        "",
    ]
    pipe = load_bundled("miniflux-a")
    stats = calibrate(pipe, seeds=(1000,), per_class=5)
    flux_ratios: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lines += [
            "## MiniFlux-A (whole model, DiT-Pruning defaults; modulation and embedders stay dense)",
            "",
            "| sparsity | compressed, bf16 values | compressed, fp8 values | fp8 max error / row max |",
            "|---|---|---|---|",
        ]
        for label, (sparsity, pattern) in SETTINGS.items():
            model = load_bundled("miniflux-a").model
            apply_masks_(model, compute_masks(model, stats, PruneConfig(sparsity, pattern=pattern)))
            state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
            bf16, fp8, err = _sizes(state, folder, f"mini{label.replace(':', '_').rstrip('%')}")
            lines.append(f"| {label} | {bf16:.1%} | {fp8:.1%} | {err:.4f} |")
        lines += [
            "",
            "## FLUX.1-dev-shaped layers ("
            + ", ".join(f"{k} {r}x{c}" for k, (r, c) in FLUX_LAYERS.items())
            + ")",
            "",
            "| sparsity | compressed, bf16 values | compressed, fp8 values | fp8 max error / row max |",
            "|---|---|---|---|",
        ]
        for label, (sparsity, pattern) in SETTINGS.items():
            state = _flux_layers(sparsity, pattern)
            flux_ratios[label] = _sizes(state, folder, f"flux{label.replace(':', '_').rstrip('%')}")
            for f in folder.glob("flux*"):
                f.unlink()
            bf16, fp8, err = flux_ratios[label]
            lines.append(f"| {label} | {bf16:.1%} | {fp8:.1%} | {err:.4f} |")
        packed_s, dense_s, crc_s = _load_ratio(_flux_layers(0.5, "unstructured"), folder)
        steps = {pattern: _step_ratio(folder, pattern) for pattern in ("unstructured", "2:4")}
    prunable = FLUX_PRUNABLE / FLUX_TOTAL
    lines += [
        "",
        "## Projected FLUX.1-dev diffusion model",
        "",
        f"Prunable layers (attention, MLP, fused single-block): {FLUX_PRUNABLE / 1e9:.2f}B of "
        f"{FLUX_TOTAL / 1e9:.2f}B parameters ({prunable:.0%}); the rest stays bf16.",
        "",
        "| file | GB |",
        "|---|---|",
    ]
    lines += [f"| {name} | {gb} |" for name, gb in REFERENCES.items()]
    for label, (bf16, fp8, _err) in flux_ratios.items():
        for values, ratio in (("bf16", bf16), ("fp8", fp8)):
            gb = 23.8 * ((1 - prunable) + prunable * ratio)
            lines.append(f"| ditprune {label}, compressed, {values} values | {gb:.1f} |")
    lines += [
        "",
        "## Load time (FLUX-shaped layers, 50 %)",
        "",
        f"Loading the compressed file and decompressing it takes {packed_s / dense_s:.2f}x the time of "
        f"loading the dense file ({packed_s:.2f} s vs {dense_s:.2f} s, best of 3, interleaved; CPU).",
        "That includes checking the CRC32 of every tensor: reading and hashing the compressed file's",
        f"tensors alone takes {crc_s / dense_s:.2f}x the dense load "
        f"({crc_s / packed_s:.0%} of the compressed load).",
        "",
        "## Step time with per-layer decompression (FLUX-shaped layers, 50 %, 512 tokens)",
        "",
        "The same forward with each weight decompressed right before its matmul (what the ComfyUI",
        "runtime does on every forward), as a ratio to dense weights, best of 3, interleaved; CPU,",
        "float32. No GPU was lent to this work: GPU step time and VRAM are not measured.",
        "",
        "| layout | decompress + matmul s | dense matmul s | ratio |",
        "|---|---|---|---|",
    ]
    for pattern, (packed_step, dense_step) in steps.items():
        layout = "2:4 packing" if pattern == "2:4" else "bitmask"
        lines.append(f"| {layout} | {packed_step:.3f} | {dense_step:.3f} | {packed_step / dense_step:.2f} |")
    lines.append("")
    return "\n".join(lines)


def write_checkpoint_bench(out_dir: Path) -> Path:
    return write_report(out_dir, "checkpoint.md", run_checkpoint_bench())
