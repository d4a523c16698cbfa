"""Size–fidelity benchmark: ditprune against what ComfyUI users run instead, on both MiniFlux models.

    python -m ditprune_core.bench pareto         # writes docs/bench/pareto.md + pareto_<model>.png

Every point changes only the prunable layers (attention, MLP, fused single-block layers: what
DiT-Pruning prunes), so all points are compared on the same weights; modulation, embedders and the
final layer stay as trained. The metrics are those of the quality benchmark (same seeds, same noise:
relative error of the final samples against the dense model's, PSNR, velocity error, classifier
accuracy, Fréchet distance). The points:

- bf16 cast, and ComfyUI's fp8 cast (e4m3fn, no scale);
- GGUF Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 (the ``gguf`` package's quantisers) and Q3_K, Q2_K (ggml's
  reference algorithm, every block checked by the ``gguf`` decoder), see :mod:`.gguf_ref`;
- RTN: our group round-to-nearest at 4, 3 and 2 bits (dense);
- GPTQ: our column-by-column OBS quantisation at 4, 3 and 2 bits, on input Gram matrices recorded
  during the calibration sampling;
- ditprune masks (DiT-Pruning defaults) at 50/60/70 % and 2:4 with bf16, fp8 (per-row scale, as
  the compressed writer stores them), 4-bit and 3-bit kept values (round to nearest). The points
  with OBS reconstruction come with ``prune_sequential_`` (not in this version).

Bits per weight are the exact stored bits of the prunable layers (mask, codes, scales, zero points,
per-row data) per original weight. The projected FLUX.1-dev file applies the same formats to
FLUX.1-dev's prunable layers with their real shapes (exact layout arithmetic, kept values spread
evenly over rows), plus the other 3.3B parameters stored in bf16 or fp8.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import PruneConfig
from ..miniflux.pipeline import MiniFluxPipeline
from ..prune import compute_masks, select_layers
from ..quantize import (
    DEFAULT_DENSE_SPECS,
    DEFAULT_VALUE_SPECS,
    QuantSpec,
    StorageCost,
    dequantize_weight,
    fake_quantize,
    gptq_quantize,
    storage_cost,
)
from ..util.imaging import PALETTE, write_png
from . import write_report
from .checkpoint_size import FLUX_PRUNABLE, FLUX_TOTAL
from .evaluation import load_judge, psnr, relative_error
from .gguf_ref import BITS_PER_WEIGHT, GGUF_FORMATS, fp8_cast, gguf_fake_quantize
from .grams import miniflux_grams
from .quality import SETTINGS, BenchContext, _fmt

log = logging.getLogger("ditprune")

#: Dense round-to-nearest / GPTQ and kept-value settings (measured: docs/bench/quant_groups.md).
DENSE_SPECS = {b: DEFAULT_DENSE_SPECS[b] for b in (4, 3, 2)}
VALUE_SPECS = {b: DEFAULT_VALUE_SPECS[b] for b in (4, 3)}
H, MLP = 3072, 12288
#: FLUX.1-dev's prunable layers: (out, in) -> how many (19 double blocks x img/txt, 38 single blocks)
FLUX_SHAPES = {
    (3 * H, H): 2 * 19,
    (H, H): 2 * 19,
    (MLP, H): 2 * 19,
    (H, MLP): 2 * 19,
    (3 * H + MLP, H): 38,
    (H, H + MLP): 38,
}
FLUX_REST = FLUX_TOTAL - FLUX_PRUNABLE
FAMILIES = ("reference", "gguf", "rtn", "gptq", "ditprune")

#: a layer transform: (name, weight) -> (new weight, its stored cost)
Transform = Callable[[str, torch.Tensor], tuple[torch.Tensor, StorageCost]]


@dataclass
class ParetoPoint:
    name: str
    family: str
    bits_per_weight: float  # on MiniFlux's prunable layers
    flux_bits_per_weight: float  # the same format on FLUX.1-dev's prunable layers
    flux_gb_rest_bf16: float
    flux_gb_rest_fp8: float
    metrics: dict[str, list[float]] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return float(np.mean(self.metrics["rel_err"]))


def _flux_gb(prunable_bytes: float) -> tuple[float, float]:
    return (prunable_bytes + 2 * FLUX_REST) / 1e9, (prunable_bytes + FLUX_REST) / 1e9


def _flux_bytes(values: QuantSpec | torch.dtype | None, setting: str | None, fixed_bpw: float = 0.0) -> float:
    """Bytes of FLUX.1-dev's prunable layers in a format (exact layout arithmetic)."""
    if values is None:
        return FLUX_PRUNABLE * fixed_bpw / 8
    total = 0
    for (rows, cols), count in FLUX_SHAPES.items():
        if setting is None:
            cost = storage_cost((rows, cols), values, layout="dense")
        elif setting == "2:4":
            cost = storage_cost((rows, cols), values, layout="2:4")
        else:
            keep_fraction = 1 - SETTINGS[setting][0]
            kept = torch.full((rows,), round(cols * keep_fraction), dtype=torch.int64)
            cost = storage_cost((rows, cols), values, layout="bitmask", kept=kept)
        total += count * cost.total_bytes
    return float(total)


def _plain(weight: torch.Tensor, out: torch.Tensor, bpw: float) -> tuple[torch.Tensor, StorageCost]:
    return out, StorageCost(weight.numel(), value_bytes=round(weight.numel() * bpw / 8))


def _fp8_rows(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept values stored as fp8 with a float32 scale per row (row max / 448), as the writer does."""
    masked = values.float() * keep
    row_max = masked.abs().amax(dim=1, keepdim=True)
    scale = torch.where(row_max > 0, row_max / 448.0, torch.ones_like(row_max))
    return (masked / scale).to(torch.float8_e4m3fn).float() * scale * keep


class _Points:
    """Builds every point of one model: its transform and its FLUX.1-dev projection."""

    def __init__(self, ctx: BenchContext, grams: dict[str, torch.Tensor]) -> None:
        self.ctx = ctx
        self.grams = grams
        self.masks: dict[str, dict[str, torch.Tensor]] = {}

    def mask(self, setting: str) -> dict[str, torch.Tensor]:
        if setting not in self.masks:
            sparsity, pattern = SETTINGS[setting]
            masks = compute_masks(self.ctx.pipe.model, self.ctx.stats, PruneConfig(sparsity, pattern=pattern))
            self.masks[setting] = {n: m for n, m in masks.items() if isinstance(m, torch.Tensor)}
        return self.masks[setting]

    def all(self) -> list[tuple[str, str, Transform, float]]:
        """(name, family, transform, projected FLUX bytes of the prunable layers)."""
        out: list[tuple[str, str, Transform, float]] = [
            (
                "bf16 cast",
                "reference",
                lambda n, w: _plain(w, w.to(torch.bfloat16).float(), 16),
                _flux_bytes(None, None, 16),
            ),
            (
                "fp8 cast (ComfyUI)",
                "reference",
                lambda n, w: _plain(w, fp8_cast(w), 8),
                _flux_bytes(None, None, 8),
            ),
        ]
        for fmt in GGUF_FORMATS:
            bpw = BITS_PER_WEIGHT[fmt]
            out.append(
                (
                    f"GGUF {fmt}",
                    "gguf",
                    self._gguf(fmt),
                    _flux_bytes(None, None, bpw),
                )
            )
        for spec in DENSE_SPECS.values():
            out.append((f"RTN {self._spec(spec)}", "rtn", self._rtn(spec), _flux_bytes(spec, None)))
        for spec in DENSE_SPECS.values():
            out.append((f"GPTQ {self._spec(spec)}", "gptq", self._gptq(spec), _flux_bytes(spec, None)))
        for setting in SETTINGS:
            layout = "2:4" if setting == "2:4" else "bitmask"
            formats: list[tuple[str, QuantSpec | torch.dtype]] = [
                ("bf16", torch.bfloat16),
                ("fp8", torch.float8_e4m3fn),
            ]
            formats += [(self._spec(s), s) for s in VALUE_SPECS.values()]
            for label, values in formats:
                out.append(
                    (
                        f"ditprune {setting} + {label}",
                        "ditprune",
                        self._ditprune(setting, layout, values),
                        _flux_bytes(values, setting),
                    )
                )
        return out

    @staticmethod
    def _spec(spec: QuantSpec) -> str:
        return f"{spec.bits}-bit g{spec.group_size} {'sym' if spec.sym else 'asym'}"

    @staticmethod
    def _gguf(fmt: str) -> Transform:
        def transform(_name: str, w: torch.Tensor) -> tuple[torch.Tensor, StorageCost]:
            return _plain(w, gguf_fake_quantize(w, fmt), BITS_PER_WEIGHT[fmt])

        return transform

    def _rtn(self, spec: QuantSpec) -> Transform:
        def transform(name: str, w: torch.Tensor) -> tuple[torch.Tensor, StorageCost]:
            return fake_quantize(w, spec, where=name), storage_cost(tuple(w.shape), spec)  # type: ignore[arg-type]

        return transform

    def _gptq(self, spec: QuantSpec) -> Transform:
        def transform(name: str, w: torch.Tensor) -> tuple[torch.Tensor, StorageCost]:
            q = gptq_quantize(w, self.grams[name], spec.bits, spec.group_size, spec.sym, where=name)
            return dequantize_weight(q, w.dtype), storage_cost(tuple(w.shape), spec)  # type: ignore[arg-type]

        return transform

    def _ditprune(self, setting: str, layout: str, values: QuantSpec | torch.dtype) -> Transform:
        def transform(name: str, w: torch.Tensor) -> tuple[torch.Tensor, StorageCost]:
            keep = self.mask(setting)[name]
            if isinstance(values, QuantSpec):
                out = fake_quantize(w, values, keep=keep, where=name)
            elif values == torch.float8_e4m3fn:
                out = _fp8_rows(w, keep)
            else:
                out = (w * keep).to(values).float()
            cost = storage_cost(tuple(w.shape), values, layout=layout, kept=keep)  # type: ignore[arg-type]
            return out, cost

        return transform


def _apply(ctx: BenchContext, transform: Transform) -> tuple[MiniFluxPipeline, float]:
    model = copy.deepcopy(ctx.pipe.model)
    layers = select_layers(model, PruneConfig())
    bits = weights = 0
    with torch.no_grad():
        for name, layer in layers.items():
            new, cost = transform(name, layer.weight.detach().float())
            layer.weight.copy_(new.to(layer.weight.dtype))
            bits += 8 * cost.total_bytes
            weights += layer.weight.numel()
    return MiniFluxPipeline(model, ctx.pipe.conditioner), bits / weights


@dataclass
class ParetoResult:
    model: str
    points: list[ParetoPoint]

    def get(self, name: str) -> ParetoPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)

    def best_under(self, bpw: float, family: str) -> ParetoPoint | None:
        mine = [p for p in self.points if p.family == family and p.flux_bits_per_weight <= bpw]
        return min(mine, key=lambda p: p.error) if mine else None

    def checks(self) -> list[tuple[str, bool]]:
        """The issue's targets on this model (mask-only ditprune; reconstruction comes later)."""
        out = []
        q2, q3 = self.get("GGUF Q2_K").error, self.get("GGUF Q3_K").error
        best3 = self.best_under(3.0, "ditprune")
        best35 = self.best_under(3.5, "ditprune")
        text3 = f"{best3.name} {best3.error:.4f} ({best3.flux_bits_per_weight:.2f} b/w)" if best3 else "none"
        text35 = (
            f"{best35.name} {best35.error:.4f} ({best35.flux_bits_per_weight:.2f} b/w)" if best35 else "none"
        )
        out.append(
            (
                f"{self.model}: ditprune <= 3.0 b/w with <= half Q2_K's error ({q2:.4f}): best {text3}",
                best3 is not None and best3.error <= q2 / 2,
            )
        )
        out.append(
            (
                f"{self.model}: ditprune <= 3.5 b/w beats Q3_K ({q3:.4f}): best {text35}",
                best35 is not None and best35.error < q3,
            )
        )
        smallest = min((p for p in self.points if p.family == "ditprune"), key=lambda p: p.flux_gb_rest_fp8)
        out.append(
            (
                f"{self.model}: a ditprune FLUX.1-dev file <= 5 GB (rest fp8): smallest {smallest.name} "
                f"{smallest.flux_gb_rest_fp8:.2f} GB",
                smallest.flux_gb_rest_fp8 <= 5.0,
            )
        )
        for bits in (3, 4):
            gptq = [p for p in self.points if p.family == "gptq" and p.name.startswith(f"GPTQ {bits}-bit")]
            if gptq:
                g = gptq[0]
                rival = self.best_under(g.flux_bits_per_weight, "ditprune")
                if rival is not None:
                    out.append(
                        (
                            f"{self.model}: at <= {g.flux_bits_per_weight:.2f} b/w, dense GPTQ "
                            f"{g.error:.4f} vs best {rival.name} {rival.error:.4f} "
                            "(PASS = sparsity wins)",
                            rival.error < g.error,
                        )
                    )
        return out

    def to_markdown(self) -> str:
        lines = [
            f"### {self.model}",
            "",
            "| point | b/w FLUX.1-dev | b/w MiniFlux | rel. error ↓ | PSNR dB ↑ | velocity error ↓ "
            "| accuracy ↑ | FD ↓ | FLUX.1-dev GB, rest bf16 | rest fp8 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in sorted(self.points, key=lambda p: (-p.flux_bits_per_weight, p.name)):
            m = p.metrics
            lines.append(
                f"| {p.name} | {p.flux_bits_per_weight:.3f} | {p.bits_per_weight:.3f} | "
                f"{_fmt(m['rel_err'], 4)} | {_fmt(m['psnr'], 2)} | "
                f"{_fmt(m['vel_err'], 4) if 'vel_err' in m else '-'} | "
                f"{_fmt(m['acc'], 3)} | {_fmt(m['fd'], 1)} | "
                f"{p.flux_gb_rest_bf16:.2f} | {p.flux_gb_rest_fp8:.2f} |"
            )
        return "\n".join(lines)


@torch.no_grad()
def _evaluate(ctx: BenchContext, pipe: MiniFluxPipeline, *, velocity: bool) -> dict[str, list[float]]:
    """The quality benchmark's metrics; without ``velocity``, all but the velocity error (which
    costs as many model calls as sampling)."""
    if velocity:
        return ctx.evaluate(pipe)
    judge = load_judge()
    out: dict[str, list[float]] = {"rel_err": [], "psnr": [], "acc": [], "fd": []}
    for run in ctx.dense.values():
        images = pipe.sample(run.labels, seed=0, steps=ctx.steps, cfg=ctx.cfg, noise=run.noise)
        out["rel_err"].append(relative_error(images, run.images))
        out["psnr"].append(psnr(images, run.images))
        out["acc"].append(judge.accuracy(images, run.labels))
        out["fd"].append(judge.frechet(images))
    return out


def run_pareto(
    model: str, *, seeds: Sequence[int] = (0, 1, 2), per_class: int = 10, velocity: bool = True
) -> ParetoResult:
    """Every point on one model; ``velocity=False`` skips the velocity error (half the time)."""
    ctx = BenchContext.build(model, seeds=seeds, per_class=per_class)
    layers = select_layers(ctx.pipe.model, PruneConfig())
    grams = miniflux_grams(ctx.pipe, layers)
    points = []
    for name, family, transform, flux_bytes in _Points(ctx, grams).all():
        start = time.perf_counter()
        pipe, bpw = _apply(ctx, transform)
        metrics = _evaluate(ctx, pipe, velocity=velocity)
        rest_bf16, rest_fp8 = _flux_gb(flux_bytes)
        flux_bpw = 8 * flux_bytes / FLUX_PRUNABLE
        points.append(ParetoPoint(name, family, bpw, flux_bpw, rest_bf16, rest_fp8, metrics))
        log.info(
            "%s %s: %.3f b/w, rel err %.4f (%.1f s)",
            model,
            name,
            bpw,
            np.mean(metrics["rel_err"]),
            time.perf_counter() - start,
        )
    return ParetoResult(model, points)


def plot(
    result: ParetoResult, *, width: int = 480, height: int = 320, margin: int = 16, x_max: float = 10.0
) -> torch.Tensor:
    """(height, width, 3) plot: log10 relative error (up) against FLUX.1-dev bits per weight (right).

    Vertical grid lines at every bit per weight from 0 to ``x_max`` (darker every 4), horizontal ones
    at every decade of error; dots coloured by family (:data:`FAMILIES` order in
    :data:`~ditprune_core.util.imaging.PALETTE`: reference blue, GGUF orange, RTN green, GPTQ vermillion,
    ditprune sky blue). Points beyond ``x_max`` bits or with zero error (the bf16 cast) are left out.
    """
    img = torch.ones(height, width, 3)
    pts = [
        (p.flux_bits_per_weight, math.log10(p.error), FAMILIES.index(p.family))
        for p in result.points
        if p.error > 0 and p.flux_bits_per_weight <= x_max
    ]
    if not pts:
        return img
    y_lo = math.floor(min(y for _, y, _ in pts))
    y_hi = math.ceil(max(y for _, y, _ in pts))
    if y_hi == y_lo:
        y_hi += 1

    def to_px(x: float, y: float) -> tuple[int, int]:
        px = margin + round(x / x_max * (width - 2 * margin - 1))
        py = height - 1 - margin - round((y - y_lo) / (y_hi - y_lo) * (height - 2 * margin - 1))
        return px, py

    for b in range(int(x_max) + 1):
        px, _ = to_px(b, y_lo)
        img[margin : height - margin, px] = 0.55 if b % 4 == 0 else 0.8
    for decade in range(y_lo, y_hi + 1):
        _, py = to_px(0, decade)
        img[py, margin : width - margin] = 0.55
    dot = 3
    for x, y, fam in pts:
        px, py = to_px(x, y)
        img[max(0, py - dot) : py + dot + 1, max(0, px - dot) : px + dot + 1] = PALETTE[fam]
    return img


def write_pareto(results: Sequence[ParetoResult], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Size–fidelity benchmark (generated)",
        "",
        f"Command: `{command}`. Written by `ditprune_core/bench/pareto.py`; do not edit by hand.",
        "",
        "Only the prunable layers change (attention, MLP, fused single-block layers); bits/weight (b/w)",
        "is their exact stored size per original weight: on FLUX.1-dev's layers (what a user's file",
        "costs; the targets and the plot use it) and on MiniFlux's, whose 48- to 320-wide rows make",
        "per-row data (int64 row offsets of the bitmask layout with bf16 or fp8 values: 64 bits per row;",
        "quantised values store none) and ragged groups cost up to 1.3 b/w more than on FLUX.1-dev's",
        "3072-wide rows. Rel. error, PSNR and velocity error",
        "compare with the dense model from the same noise (mean ± std over evaluation seeds); accuracy",
        "and FD judge the digits. FLUX.1-dev GB: the same format on FLUX.1-dev's 8.61B prunable",
        f"parameters (real shapes, exact layout bytes) plus its other {FLUX_REST / 1e9:.2f}B parameters in",
        "bf16, or in fp8.",
        "GGUF files as distributed store those in their own format too (Q4_0 is 6.8 GB).",
        "",
        "GGUF blocks run over the row-major weight; MiniFlux rows of 48 or 240 values make some",
        "32-value blocks straddle two rows (FLUX.1-dev's rows are whole blocks). GPTQ uses Gram",
        "matrices recorded on the calibration sampling. ditprune points are mask-only (DiT-Pruning",
        "defaults), kept values rounded to nearest; reconstruction (OBS) points are not in this table.",
        "",
    ]
    for res in results:
        parts += [res.to_markdown(), ""]
        png = out_dir / f"pareto_{res.model}.png"
        write_png(plot(res), png, overwrite=True)
        parts += [
            f"![error vs bits]({png.name})",
            "",
            "Rel. error on a log scale (up; a line every decade) vs FLUX.1-dev bits/weight (right; a line",
            "every bit from 0 to 10, darker at 0, 4, 8). Blue: fp8 cast, orange: GGUF, green: RTN,",
            "vermillion: GPTQ, sky blue: ditprune (mask-only).",
            "",
        ]
    parts += ["## Targets checked", ""]
    for res in results:
        for text, ok in res.checks():
            parts.append(f"- {'PASS' if ok else 'FAIL'}: {text}")
    return write_report(out_dir, "pareto.md", "\n".join(parts))
