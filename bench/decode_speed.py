"""Decode speed: ditprune's per-forward decode beside ComfyUI-GGUF's own dequantisation.

    python -m bench decode --gguf-dequant /path/to/ComfyUI-GGUF/dequant.py

writes docs/bench/decode_speed.md. FLUX.1-dev's four prunable layer shapes (random weights, the
real sizes), pruned 50 % by magnitude over the layer (rows keep different counts, as DiT-Pruning's
masks do); float32 inputs, as ComfyUI computes on a CPU. Every format makes each layer's float32
weight the way its ComfyUI runtime does every forward:

- dense float32: the weight as it is (nothing to decode);
- ComfyUI fp8: float8_e4m3fn weights cast to float32;
- GGUF Q8_0 / Q4_0 / Q3_K / Q2_K: ComfyUI-GGUF's ``dequantize`` (from its ``dequant.py``, loaded
  from the path given: it is not part of ditprune) with its default ``dequant_dtype``, then cast
  to float32, as ``GGMLLayer.get_weight`` does; the blocks are made by llama.cpp's ``gguf``
  package (:mod:`~bench.gguf_ref`) from a tile of the layer repeated over its rows
  (the decode reads every block alike, whatever it holds);
- ditprune: :func:`~ditprune_core.runtime.decode_runtime` on the runtime pieces of a bf16 file
  (what ``PackedLinear`` runs), to float32.

Each format's decode alone, and a step (decode + the layer's matmul) at 512 and at 4096 tokens
(a 1024² image), are timed side by side: formats interleaved, best of N. The LoRA table times
the 512-token step with 0, 1 and 2 LoRAs (rank 32) on every layer: the patch math of ComfyUI's
``LoRAAdapter`` (up @ down in float32, scaled, added) after the decode, for GGUF Q4_0 and ditprune
as their layers run it every forward; a dense model's LoRAs are merged once at load, so its step
is the plain matmul.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ditprune_core.config import PruneConfig
from ditprune_core.dit_shapes import FLUX_LAYERS
from ditprune_core.layouts import LAYOUTS, Fp8Values
from ditprune_core.mask import layer_keep_mask
from ditprune_core.quantize import DEFAULT_DENSE_SPECS, DEFAULT_VALUE_SPECS, quantize_weight
from ditprune_core.runtime import decode_runtime, runtime_pieces, runtime_plan

from . import write_report
from .gguf_ref import gguf_block_size, gguf_quantize_blocks

log = logging.getLogger("ditprune")

#: where the benchmarks look for ComfyUI-GGUF's dequant.py when no path is given
GGUF_DEQUANT_ENV = "DITPRUNE_GGUF_DEQUANT"
HOW_TO_FETCH = (
    "ComfyUI-GGUF's dequant.py is needed (it is not part of ditprune): "
    "git clone https://github.com/city96/ComfyUI-GGUF /some/where (outside this repository), then "
    f"pass --gguf-dequant /some/where/dequant.py or set {GGUF_DEQUANT_ENV}=/some/where/dequant.py"
)
GGUF_COMPARED = ("Q8_0", "Q4_0", "Q3_K", "Q2_K")
#: a decode: (device, compute dtype) -> the dense weight
Make = Callable[[], torch.Tensor]


class GgufDequantMissing(FileNotFoundError):
    """ComfyUI-GGUF's dequant.py was not given or not found."""


def gguf_dequant_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The path of ComfyUI-GGUF's dequant.py: ``path``, else ``$DITPRUNE_GGUF_DEQUANT``.

    Raises:
        GgufDequantMissing: neither names an existing file (the message says how to fetch it).
    """
    given = path or os.environ.get(GGUF_DEQUANT_ENV)
    if not given or not Path(given).is_file():
        where = f"{given!s} does not exist. " if given else ""
        raise GgufDequantMissing(where + HOW_TO_FETCH)
    return Path(given)


def load_gguf_dequant(path: str | os.PathLike[str] | None = None) -> ModuleType:
    """ComfyUI-GGUF's ``dequant`` module, imported from its file (it needs ``gguf`` and ``tqdm``)."""
    file = gguf_dequant_path(path)
    spec = importlib.util.spec_from_file_location("comfyui_gguf_dequant", file)
    if spec is None or spec.loader is None:
        raise GgufDequantMissing(f"{file}: cannot be imported as a module. " + HOW_TO_FETCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gguf_tiled_blocks(weight: torch.Tensor, fmt: str, tile_rows: int = 64) -> torch.Tensor:
    """GGUF ``fmt`` blocks of ``weight``'s first ``tile_rows`` rows, repeated to its row count:
    uint8 (n_blocks, type_size), the layout ComfyUI-GGUF decodes (its decode cost does not depend on
    what the blocks hold; quantising 180M values with the numpy K-quant reference takes minutes)."""
    rows, cols = weight.shape
    tile = min(tile_rows, rows)
    block = gguf_block_size(fmt)
    if (tile * cols) % block:
        raise ValueError(f"a {tile}x{cols} tile does not fill whole {fmt} blocks of {block}")
    blocks = torch.from_numpy(gguf_quantize_blocks(weight[:tile].float().numpy().reshape(-1), fmt))
    reps = -(-rows // tile)
    return blocks.repeat(reps, 1)[: rows * cols // block].contiguous()


@dataclass(frozen=True)
class Format:
    """One way of holding a layer: ``make()`` gives its dense weight; ``held`` bytes stay resident."""

    make: Make
    held: int


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def flux_layer(name: str, shape: tuple[int, int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A FLUX-shaped float32 weight and its 50 % keep mask (magnitude over the layer)."""
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen).mul_(0.02)
    keep = layer_keep_mask(name, w, None, PruneConfig(0.5, metric="magnitude", granularity="layer"))
    return w, keep


def _two_four(w: torch.Tensor) -> torch.Tensor:
    rows, cols = w.shape
    idx = w.abs().reshape(rows, -1, 4).topk(2, dim=2).indices
    return torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)


def ditprune_format(pieces: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Format:
    """File pieces (of a bf16 weight) held as ``PackedLinear`` holds them, decoded to ``dtype``."""
    held = runtime_pieces(pieces)
    plan = runtime_plan(held)
    on_device = {k: v.to(device) for k, v in held.items() if k not in ("shape", "qspec")}
    return Format(
        lambda: decode_runtime(on_device, plan, torch.bfloat16, out_dtype=dtype),
        _nbytes(list(on_device.values())),
    )


def ditprune_formats(
    w: torch.Tensor, keep: torch.Tensor, device: torch.device, dtype: torch.dtype, labels: Sequence[str]
) -> dict[str, Format]:
    """The ditprune formats named in ``labels`` (see :data:`DITPRUNE_FORMATS`)."""
    out: dict[str, Format] = {}
    bitmask = LAYOUTS["bitmask"]
    pruned = (w * keep).to(torch.bfloat16)
    for label in labels:
        if label == "ditprune 50% + bf16":
            pieces, _ = bitmask.encode(pruned)
        elif label == "ditprune 50% + fp8":
            pieces, _ = bitmask.encode(pruned, Fp8Values())
        elif label in ("ditprune 50% + int4", "ditprune 50% + int3"):
            bits = int(label[-1])
            pieces = bitmask.encode_quantized(quantize_weight(w, DEFAULT_VALUE_SPECS[bits], keep=keep))
        elif label == "ditprune 2:4 + int4":
            q = quantize_weight(w, DEFAULT_VALUE_SPECS[4], keep=_two_four(w))
            pieces = LAYOUTS["2:4"].encode_quantized(q)
        elif label == "ditprune dense int8":
            pieces = LAYOUTS["dense"].encode_quantized(quantize_weight(w, DEFAULT_DENSE_SPECS[8]))
        else:
            raise ValueError(f"unknown ditprune format {label!r}; choose from {list(DITPRUNE_FORMATS)}")
        out[label] = ditprune_format(pieces, device, dtype)
    return out


DITPRUNE_FORMATS = (
    "ditprune 50% + bf16",
    "ditprune 50% + fp8",
    "ditprune 50% + int4",
    "ditprune 50% + int3",
    "ditprune 2:4 + int4",
    "ditprune dense int8",
)


def reference_formats(
    w: torch.Tensor,
    dequant: ModuleType,
    device: torch.device,
    dtype: torch.dtype,
    *,
    dense_dtype: torch.dtype,
    gguf: Sequence[str] = GGUF_COMPARED,
) -> dict[str, Format]:
    """Dense, ComfyUI's fp8 and GGUF formats of ``w`` on ``device``, each made in ``dtype``."""
    import gguf as gguf_package

    rows, cols = w.shape
    dense = w.to(device=device, dtype=dense_dtype)
    fp8 = w.to(device=device, dtype=torch.float8_e4m3fn)
    out = {
        f"dense {str(dense_dtype).removeprefix('torch.')}": Format(lambda: dense, _nbytes([dense])),
        "ComfyUI fp8 (cast per forward)": Format(lambda: fp8.to(dtype), _nbytes([fp8])),
    }
    for fmt in gguf:
        blocks = gguf_tiled_blocks(w, fmt).to(device)
        qtype = getattr(gguf_package.GGMLQuantizationType, fmt)

        def make(blocks: torch.Tensor = blocks, qtype: Any = qtype) -> torch.Tensor:
            # dequantize_tensor(tensor, dtype, dequant_dtype=None) for a quantised tensor
            return dequant.dequantize(blocks, qtype, (rows, cols), dtype=None).to(dtype)

        out[f"GGUF {fmt}"] = Format(make, _nbytes([blocks]))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lora_patch_(
    weight: torch.Tensor, loras: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> None:
    """ComfyUI's ``LoRAAdapter.calculate_weight`` for each (up, down): ``weight += (alpha / rank) *
    (up @ down)``, the product in ``dtype`` (its ``intermediate_dtype``), added in the weight's."""
    for up, down in loras:
        diff = torch.mm(up.to(dtype), down.to(dtype))
        weight += (1.0 * diff).to(weight.dtype)


def make_loras(
    shape: tuple[int, int], count: int, gen: torch.Generator, device: torch.device, rank: int = 32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rows, cols = shape
    return [
        (
            (torch.randn(rows, rank, generator=gen) * 0.01).to(device),
            (torch.randn(rank, cols, generator=gen) * 0.01).to(device),
        )
        for _ in range(count)
    ]


@dataclass
class DecodeResult:
    """Best times (s) per format, summed over the layers: decode alone and steps by token count;
    bytes held; weights."""

    decode: dict[str, float]
    step: dict[int, dict[str, float]]
    held: dict[str, int]
    weights: int


@torch.no_grad()
def run_decode(
    dequant: ModuleType,
    *,
    tokens: Sequence[int] = (512, 4096),
    repeats: int = 5,
    step_labels: Sequence[str] | None = None,
    layers: dict[str, tuple[int, int]] = FLUX_LAYERS,
) -> DecodeResult:
    """Decode and step times of every format, interleaved, best of ``repeats`` (CPU, float32).

    ``step_labels``: the formats whose step is timed (None: all)."""
    cpu, f32 = torch.device("cpu"), torch.float32
    gen = torch.Generator().manual_seed(0)
    decode: dict[str, float] = {}
    step: dict[int, dict[str, float]] = {t: {} for t in tokens}
    held: dict[str, int] = {}
    weights = 0
    for name, shape in layers.items():
        w, keep = flux_layer(name, shape, gen)
        weights += w.numel()
        formats = reference_formats(w, dequant, cpu, f32, dense_dtype=f32)
        formats.update(ditprune_formats(w, keep, cpu, f32, DITPRUNE_FORMATS))
        inputs = {t: torch.randn(t, shape[1], generator=gen) for t in tokens}
        best: dict[tuple[str, int], float] = {}
        for _ in range(repeats):
            for label, fmt in formats.items():
                start = time.perf_counter()
                weight = fmt.make()
                best[(label, 0)] = min(best.get((label, 0), np.inf), time.perf_counter() - start)
                del weight
                if step_labels is not None and label not in step_labels:
                    continue
                for t, x in inputs.items():
                    start = time.perf_counter()
                    torch.nn.functional.linear(x, fmt.make())
                    best[(label, t)] = min(best.get((label, t), np.inf), time.perf_counter() - start)
        for (label, t), seconds in best.items():
            table = decode if t == 0 else step[t]
            table[label] = table.get(label, 0.0) + seconds
        for label, fmt in formats.items():
            held[label] = held.get(label, 0) + fmt.held
        log.info("decode: %s done", name)
        del formats, w, keep
    return DecodeResult(decode, step, held, weights)


LORA_LABELS = ("dense float32", "GGUF Q4_0", "ditprune 50% + int4", "ditprune 50% + bf16")


@torch.no_grad()
def run_lora(
    dequant: ModuleType,
    *,
    tokens: int = 512,
    counts: Sequence[int] = (0, 1, 2),
    repeats: int = 3,
    layers: dict[str, tuple[int, int]] = FLUX_LAYERS,
) -> dict[str, dict[int, float]]:
    """Step time (s, summed over the layers) with 0, 1, 2 LoRAs per format, interleaved, best of
    ``repeats`` (CPU, float32)."""
    cpu, f32 = torch.device("cpu"), torch.float32
    gen = torch.Generator().manual_seed(1)
    out: dict[str, dict[int, float]] = {}
    for name, shape in layers.items():
        w, keep = flux_layer(name, shape, gen)
        formats = reference_formats(w, dequant, cpu, f32, dense_dtype=f32, gguf=("Q4_0",))
        formats.update(ditprune_formats(w, keep, cpu, f32, [x for x in LORA_LABELS if "ditprune" in x]))
        x = torch.randn(tokens, shape[1], generator=gen)
        loras = make_loras(shape, max(counts), gen, cpu)
        best: dict[tuple[str, int], float] = {}
        for _ in range(repeats):
            for label in LORA_LABELS:
                for n in counts:
                    start = time.perf_counter()
                    weight = formats[label].make()
                    if n and not label.startswith("dense"):  # dense: merged once at load
                        lora_patch_(weight, loras[:n], f32)
                    torch.nn.functional.linear(x, weight)
                    best[(label, n)] = min(best.get((label, n), np.inf), time.perf_counter() - start)
        for (label, n), seconds in best.items():
            out.setdefault(label, {})[n] = out.get(label, {}).get(n, 0.0) + seconds
        log.info("lora: %s done", name)
    return out


def _bpw(held: int, weights: int) -> str:
    return f"{8 * held / weights:.2f}"


def decode_tables(result: DecodeResult) -> list[str]:
    """The decode table and the step table (markdown lines)."""
    ggufs = [f"GGUF {f}" for f in GGUF_COMPARED]
    lines = [
        "| format | bits/weight | decode s (4 layers) | "
        + " | ".join(f"vs {g.removeprefix('GGUF ')}" for g in ggufs)
        + " | vs ComfyUI fp8 |",
        "|---|---|---|" + "---|" * len(ggufs) + "---|",
    ]
    fp8 = result.decode["ComfyUI fp8 (cast per forward)"]
    for label, seconds in result.decode.items():
        ratios = " | ".join(f"{seconds / result.decode[g]:.2f}×" for g in ggufs)
        lines.append(
            f"| {label} | {_bpw(result.held[label], result.weights)} | {seconds:.3f} | {ratios} | "
            f"{seconds / fp8:.2f}× |"
        )
    lines += ["", "Step (decode + matmul), the 4 layers:", ""]
    header = "| format |"
    rule = "|---|"
    for t in result.step:
        header += f" {t} tok s | vs dense | vs Q4_0 | vs Q8_0 |"
        rule += "---|---|---|---|"
    lines += [header, rule]
    for label in result.step[next(iter(result.step))]:
        row = f"| {label} |"
        for per in result.step.values():
            s = per[label]
            row += (
                f" {s:.3f} | {s / per['dense float32']:.2f}× | {s / per['GGUF Q4_0']:.2f}× | "
                f"{s / per['GGUF Q8_0']:.2f}× |"
            )
        lines.append(row)
    return lines


def lora_table(lora: dict[str, dict[int, float]]) -> list[str]:
    counts = sorted(next(iter(lora.values())))
    lines = [
        "| format | "
        + " | ".join(f"{n} LoRA s" for n in counts)
        + " | "
        + " | ".join(f"{n} vs 0" for n in counts if n)
        + " | "
        + " | ".join(f"{n} LoRA vs Q4_0" for n in counts)
        + " |",
        "|---|" + "---|" * (2 * len(counts) + len(counts) - 1),
    ]
    for label, per in lora.items():
        lines.append(
            f"| {label} | "
            + " | ".join(f"{per[n]:.3f}" for n in counts)
            + " | "
            + " | ".join(f"{per[n] / per[0]:.2f}×" for n in counts if n)
            + " | "
            + " | ".join(f"{per[n] / lora['GGUF Q4_0'][n]:.2f}×" for n in counts)
            + " |"
        )
    return lines


def write_decode_speed(
    out_dir: Path,
    command: str,
    *,
    dequant_path: str | None = None,
    repeats: int = 5,
    threads: int | None = None,
) -> Path:
    """Run both benchmarks and write ``decode_speed.md`` (``decode_speed_{threads}thread.md`` with
    ``threads``)."""
    dequant = load_gguf_dequant(dequant_path)
    if threads:
        torch.set_num_threads(threads)
    result = run_decode(
        dequant,
        repeats=repeats,
        step_labels=(
            "dense float32",
            "ComfyUI fp8 (cast per forward)",
            "GGUF Q8_0",
            "GGUF Q4_0",
            "ditprune 50% + bf16",
            "ditprune 50% + int4",
        ),
    )
    lora = run_lora(dequant, repeats=max(2, repeats - 2))
    lines = [
        "# Decode speed beside ComfyUI-GGUF (generated)",
        "",
        f"Command: `{command}`. Written by `bench/decode_speed.py`; do not edit by hand.",
        f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; ComfyUI-GGUF's "
        "`dequant.py` loaded from its own file. Best of "
        f"{repeats}, formats interleaved; the CPU is shared, so only the ratios measured side by side "
        "in this run mean anything. No GPU was lent to this work: see gpu_step for the command that "
        "measures one.",
        "",
        "FLUX.1-dev's four prunable layer shapes (linear1 21504x3072, linear2 3072x15360, qkv "
        "9216x3072, mlp.2 3072x12288; random weights pruned 50 % by magnitude over the layer), float32 "
        "inputs. ditprune: bf16 files, decoded by `decode_runtime` as `PackedLinear` runs it "
        "(bits/weight counts every piece it holds). GGUF: `dequantize(..., dtype=None)` then `.to(float32)`, "
        "as `GGMLLayer.get_weight` with the default `dequant_dtype`.",
        "",
        *decode_tables(result),
        "",
        "## LoRA cost (512 tokens, rank 32 on every layer)",
        "",
        "The step with 0, 1 and 2 LoRAs: GGUF Q4_0 and ditprune apply them after every decode "
        "(ComfyUI's LoRA math: up @ down in float32, added to the weight); a dense model merges them "
        "once at load, so its step does not change.",
        "",
        *lora_table(lora),
        "",
    ]
    name = f"decode_speed_{threads}thread.md" if threads else "decode_speed.md"
    return write_report(out_dir, name, "\n".join(lines))
