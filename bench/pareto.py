"""Size–fidelity benchmark: ditprune against what ComfyUI users run instead, on both MiniFlux models.

    python -m bench pareto         # writes docs/bench/pareto.md + pareto_<model>.png

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
  the compressed writer stores them), 4-bit and 3-bit kept values (round to nearest);
- ditprune with reconstruction: ``prune_sequential_`` with ``PruneConfig(s, update="obs")`` (the
  shipped defaults, block refinement included) at 50/60/70 % and 2:4, kept values in bf16, in fp8
  (rounded after the update) or quantised jointly after it (``value_bits=4 | 3``), plus 40 % with
  3-bit, 45 % and 52 % with 4-bit (:data:`OBS_EXTRA`), and a few of them without block
  refinement (:data:`NO_REFINE`); the lab's calibration (:class:`~.reconstruction_lab.Lab`);
- whole-file points: a few of those with the layers that stay dense (modulation, embedders, final
  layer) also rounded as ``save_pruned_checkpoint(remainder="int4")`` stores them, so that their
  error includes what a file under 5 GB costs there.

Bits per weight are the exact stored bits of the prunable layers (mask, codes, scales, zero points,
per-row data) per original weight. The projected FLUX.1-dev file applies the same formats to
FLUX.1-dev's prunable layers with their real shapes (exact layout arithmetic, kept values spread
evenly over rows), plus the other 3.3B parameters stored in bf16, fp8 or int4 (4-bit groups of 128).

Errors are reported as relative error (``||Δ|| / ||dense||``, the project's metric) and relative
MSE (``||Δ||² / ||dense||²``, the metric the issue's own figures are in); the targets are checked
in both.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ditprune_core.config import PruneConfig, ReconstructParams
from ditprune_core.dit_shapes import FLUX_PRUNABLE, FLUX_REST, FLUX_SHAPES
from ditprune_core.layers import remainder_layers
from ditprune_core.layouts import StorageCost, storage_cost
from ditprune_core.miniflux.judge import load_judge
from ditprune_core.miniflux.pipeline import MiniFluxPipeline
from ditprune_core.obs import gptq_quantize
from ditprune_core.prune import compute_masks, select_layers
from ditprune_core.quantize import (
    DEFAULT_DENSE_SPECS,
    DEFAULT_VALUE_SPECS,
    QuantSpec,
    dequantize_weight,
    fake_quantize,
)
from ditprune_core.save import is_remainder_weight, remainder_spec
from ditprune_core.sequential import prune_sequential_
from ditprune_core.util.io import atomic_path
from ditprune_core.util.metrics import psnr, relative_error, relative_squared_error

from . import write_report
from .context import SETTINGS, BenchContext, fmt_stat
from .gguf_ref import BITS_PER_WEIGHT, GGUF_FORMATS, fp8_cast, gguf_fake_quantize
from .grams import miniflux_grams
from .lowbit import flux_rest_gb
from .reconstruction_lab import Lab

log = logging.getLogger("ditprune")

#: Dense round-to-nearest / GPTQ and kept-value settings (measured: docs/bench/quant_groups.md).
DENSE_SPECS = {b: DEFAULT_DENSE_SPECS[b] for b in (4, 3, 2)}
VALUE_SPECS = {b: DEFAULT_VALUE_SPECS[b] for b in (4, 3)}
FAMILIES = ("reference", "gguf", "rtn", "gptq", "ditprune", "ditprune-obs")
#: sparsity settings of the reconstruction points (below 50 % too: with 4-bit values they land
#: between 3 and 3.5 b/w; 52 % is the most a 4-bit file at 3.0 b/w can keep)
OBS_SETTINGS: dict[str, tuple[float, str]] = {
    "40%": (0.4, "unstructured"),
    "45%": (0.45, "unstructured"),
    "52%": (0.52, "unstructured"),
}
OBS_SETTINGS.update(SETTINGS)
#: the settings that get every value format of :data:`OBS_VALUES`
OBS_MAIN = ("50%", "60%", "70%", "2:4")
#: (label, value_bits) of the reconstruction points; None: bf16 values, and the same rounded to fp8
OBS_VALUES: tuple[tuple[str, int | None], ...] = (("bf16", None), ("4-bit", 4), ("3-bit", 3))
#: extra reconstruction points: (setting, value spec)
OBS_EXTRA = (
    ("40%", DEFAULT_VALUE_SPECS[3]),
    ("45%", DEFAULT_VALUE_SPECS[4]),
    ("52%", DEFAULT_VALUE_SPECS[4]),
)
#: reconstruction points without block refinement (``block_refine_steps=0``), to show what it adds
NO_REFINE = (
    ("50%", DEFAULT_VALUE_SPECS[4]),
    ("50%", DEFAULT_VALUE_SPECS[3]),
    ("52%", DEFAULT_VALUE_SPECS[4]),
)
#: whole-file points: (setting, value spec), with the remainder stored as int4
WHOLE_FILE = (
    ("50%", DEFAULT_VALUE_SPECS[3]),
    ("52%", DEFAULT_VALUE_SPECS[4]),
    ("60%", DEFAULT_VALUE_SPECS[4]),
)
REMAINDER_SPEC = remainder_spec("int4")


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
    flux_gb_rest_int4: float = 0.0
    #: "as trained": only the prunable layers changed; "int4": the remainder too (a whole file)
    remainder: str = "as trained"

    @property
    def error(self) -> float:
        return float(np.mean(self.metrics["rel_err"]))

    @property
    def mse(self) -> float:
        return float(np.mean(self.metrics["rel_mse"]))


def flux_gb(prunable_bytes: float) -> tuple[float, float, float]:
    """Projected FLUX.1-dev GB with the other weights in bf16, fp8 (a scale per row) and int4."""
    return (
        (prunable_bytes + 2 * FLUX_REST) / 1e9,
        prunable_bytes / 1e9 + flux_rest_gb("fp8"),
        prunable_bytes / 1e9 + flux_rest_gb("int4"),
    )


def flux_bytes(
    values: QuantSpec | torch.dtype | None, setting: str | float | None, fixed_bpw: float = 0.0
) -> float:
    """Bytes of FLUX.1-dev's prunable layers in a format (exact layout arithmetic); ``setting``: a
    name of :data:`OBS_SETTINGS`, or a sparsity (unstructured, kept values spread evenly over rows)."""
    if values is None:
        return FLUX_PRUNABLE * fixed_bpw / 8
    total = 0
    for (rows, cols), count in FLUX_SHAPES.items():
        if setting is None:
            cost = storage_cost((rows, cols), values, layout="dense")
        elif setting == "2:4":
            cost = storage_cost((rows, cols), values, layout="2:4")
        else:
            keep_fraction = 1 - (setting if isinstance(setting, float) else OBS_SETTINGS[setting][0])
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
                flux_bytes(None, None, 16),
            ),
            (
                "fp8 cast (ComfyUI)",
                "reference",
                lambda n, w: _plain(w, fp8_cast(w), 8),
                flux_bytes(None, None, 8),
            ),
        ]
        for fmt in GGUF_FORMATS:
            bpw = BITS_PER_WEIGHT[fmt]
            out.append(
                (
                    f"GGUF {fmt}",
                    "gguf",
                    self._gguf(fmt),
                    flux_bytes(None, None, bpw),
                )
            )
        for spec in DENSE_SPECS.values():
            out.append((f"RTN {self._spec(spec)}", "rtn", self._rtn(spec), flux_bytes(spec, None)))
        for spec in DENSE_SPECS.values():
            out.append((f"GPTQ {self._spec(spec)}", "gptq", self._gptq(spec), flux_bytes(spec, None)))
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
                        flux_bytes(values, setting),
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


def _obs_name(setting: str, values: str) -> str:
    return f"ditprune+OBS {setting} + {values}"


class _Reconstructed:
    """The reconstruction points of one model: ``prune_sequential_`` with the shipped defaults of
    ``update="obs"`` on the lab's calibration, kept values in bf16, fp8 or quantised jointly."""

    def __init__(self, ctx: BenchContext, lab: Lab) -> None:
        self.ctx, self.lab = ctx, lab
        self.pipes: dict[tuple[str, str, str], tuple[MiniFluxPipeline, float]] = {}

    def run(
        self, setting: str, spec: QuantSpec | None, *, refine: bool = True
    ) -> tuple[MiniFluxPipeline, float]:
        """The pruned pipeline and its MiniFlux bits per weight (as the compressed writer stores the
        codes; bf16 values in the layout the default compressed save picks). Runs once per point;
        ``refine=False``: without block refinement."""
        key = (setting, "bf16" if spec is None else _Points._spec(spec), str(refine))
        if key in self.pipes:
            return self.pipes[key]
        sparsity, pattern = OBS_SETTINGS[setting]
        params = ReconstructParams() if refine else ReconstructParams(block_refine_steps=0)
        config = PruneConfig(sparsity, pattern=pattern, update="obs", value_spec=spec, reconstruct=params)
        model = copy.deepcopy(self.ctx.pipe.model)
        pipe = MiniFluxPipeline(model, self.ctx.pipe.conditioner)
        report = prune_sequential_(
            model,
            lambda cal: self.lab.run_calibration(pipe, cal),
            config,
            memory_budget_bytes=1 << 34,
            weighting="log",
        )
        bpw = (
            report.bits_per_weight if spec is not None else _bits_of(model, torch.bfloat16, _layout(setting))
        )
        self.pipes[key] = (pipe, bpw)
        return pipe, bpw

    def points(self) -> list[tuple[str, str, MiniFluxPipeline, float, float]]:
        """(name, family, pipeline, MiniFlux b/w, projected FLUX bytes of the prunable layers)."""
        out = []
        todo: list[tuple[str, QuantSpec | None]] = []
        for setting in OBS_MAIN:
            todo += [(setting, None if bits is None else DEFAULT_VALUE_SPECS[bits]) for _, bits in OBS_VALUES]
        for setting, spec in [*todo, *OBS_EXTRA]:
            pipe, bpw = self.run(setting, spec)
            if spec is None:
                out.append(
                    (
                        _obs_name(setting, "bf16"),
                        "ditprune-obs",
                        pipe,
                        bpw,
                        flux_bytes(torch.bfloat16, setting),
                    )
                )
                fp8_pipe, fp8_bpw = _fp8_values(pipe, _layout(setting))
                fp8_bytes = flux_bytes(torch.float8_e4m3fn, setting)
                out.append((_obs_name(setting, "fp8"), "ditprune-obs", fp8_pipe, fp8_bpw, fp8_bytes))
            else:
                out.append(
                    (
                        _obs_name(setting, _Points._spec(spec)),
                        "ditprune-obs",
                        pipe,
                        bpw,
                        flux_bytes(spec, setting),
                    )
                )
        for setting, spec in NO_REFINE:
            pipe, bpw = self.run(setting, spec, refine=False)
            name = _obs_name(setting, _Points._spec(spec)) + " (no block refinement)"
            out.append((name, "ditprune-obs", pipe, bpw, flux_bytes(spec, setting)))
        return out

    def whole_files(self) -> list[tuple[str, str, MiniFluxPipeline, float, float]]:
        """The :data:`WHOLE_FILE` points with the remainder rounded as ``remainder="int4"`` stores it."""
        out = []
        for setting, spec in WHOLE_FILE:
            pipe, bpw = self.run(setting, spec)
            name = _obs_name(setting, _Points._spec(spec)) + ", rest int4"
            out.append((name, "ditprune-obs", _round_remainder(pipe), bpw, flux_bytes(spec, setting)))
        return out


def _layout(setting: str) -> str:
    return "2:4" if setting == "2:4" else "bitmask"


def _bits_of(model: torch.nn.Module, values: QuantSpec | torch.dtype, layout: str) -> float:
    """Stored bits per weight of the prunable layers in ``values`` (kept = the nonzero weights)."""
    layers = select_layers(model, PruneConfig())
    bits = weights = 0
    for layer in layers.values():
        w = layer.weight
        cost = storage_cost(tuple(w.shape), values, layout=layout, kept=w != 0)  # type: ignore[arg-type]
        bits += 8 * cost.total_bytes
        weights += w.numel()
    return bits / weights


def _fp8_values(pipe: MiniFluxPipeline, layout: str) -> tuple[MiniFluxPipeline, float]:
    """The reconstructed kept values rounded to fp8 with a scale per row, as the writer stores them."""
    model = copy.deepcopy(pipe.model)
    layers = select_layers(model, PruneConfig())
    bits = weights = 0
    with torch.no_grad():
        for layer in layers.values():
            w = layer.weight.detach().float()
            keep = w != 0
            layer.weight.copy_(_fp8_rows(w, keep).to(layer.weight.dtype))
            cost = storage_cost(tuple(w.shape), torch.float8_e4m3fn, layout=layout, kept=keep)  # type: ignore[arg-type]
            bits += 8 * cost.total_bytes
            weights += w.numel()
    return MiniFluxPipeline(model, pipe.conditioner), bits / weights


@torch.no_grad()
def round_remainder_(
    model: torch.nn.Module,
    fn: Callable[[torch.Tensor, str], torch.Tensor],
    skip: Callable[[str], bool] = lambda key: False,
) -> None:
    """Replace in place every remainder weight of ``model`` (the weights outside the prunable layers
    that Save Pruned Model's ``remainder`` codes: :func:`~ditprune_core.layers.remainder_layers`,
    as the writer picks them) whose key ``skip`` does not name by ``fn(weight, key)``."""
    prunable = {f"{n}.weight" for n in select_layers(model, PruneConfig())}
    coded = {f"{n}.weight" for n in remainder_layers(model)}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in prunable or key not in coded or not is_remainder_weight(key, tensor) or skip(key):
            continue
        tensor.copy_(fn(tensor.detach(), key))


def _round_remainder(pipe: MiniFluxPipeline, spec: QuantSpec = REMAINDER_SPEC) -> MiniFluxPipeline:
    """A copy whose remainder weights hold what ``remainder="int4"`` stores: 4-bit asymmetric groups
    of 128, round to nearest (``spec``: another grid for them)."""
    model = copy.deepcopy(pipe.model)
    round_remainder_(model, lambda w, key: fake_quantize(w, spec, where=key))
    return MiniFluxPipeline(model, pipe.conditioner)


@dataclass
class ParetoResult:
    model: str
    points: list[ParetoPoint]

    def get(self, name: str) -> ParetoPoint:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(name)

    def best_under(
        self, bpw: float, family: str | tuple[str, ...], *, metric: str = "rel_err"
    ) -> ParetoPoint | None:
        """The point of ``family`` with the least ``metric`` at most ``bpw`` FLUX.1-dev b/w, among
        the points that change only the prunable layers."""
        families = (family,) if isinstance(family, str) else family
        mine = [
            p
            for p in self.points
            if p.family in families and p.flux_bits_per_weight <= bpw and p.remainder == "as trained"
        ]
        return min(mine, key=lambda p: float(np.mean(p.metrics[metric]))) if mine else None

    def checks(self) -> list[tuple[str, bool]]:
        """The issue's targets on this model, in both metrics, ditprune with and without
        reconstruction; then where dense GPTQ beats sparsity at equal bits."""
        out = []
        ours = ("ditprune", "ditprune-obs")
        for metric, label in (("rel_err", "rel. error"), ("rel_mse", "rel. MSE")):
            q2 = float(np.mean(self.get("GGUF Q2_K").metrics[metric]))
            q3 = float(np.mean(self.get("GGUF Q3_K").metrics[metric]))
            for bpw, rival, factor, what in (
                (3.0, q2, 0.5, "<= half Q2_K's"),
                (3.5, q3, 1.0, "below Q3_K's"),
            ):
                best = self.best_under(bpw, ours, metric=metric)
                err = float(np.mean(best.metrics[metric])) if best else math.inf
                text = f"{best.name} {err:.4f} ({best.flux_bits_per_weight:.2f} b/w)" if best else "none"
                ok = err <= rival * factor if factor < 1 else err < rival
                out.append(
                    (f"{self.model}, {label}: ditprune <= {bpw} b/w {what} ({rival:.4f}): best {text}", ok)
                )
        wholes = [p for p in self.points if p.remainder != "as trained"]
        if wholes:
            fits = [p for p in wholes if p.flux_gb_rest_int4 <= 5.0]
            whole = (
                min(fits, key=lambda p: p.error) if fits else min(wholes, key=lambda p: p.flux_gb_rest_int4)
            )
            gguf = self.get("GGUF Q2_K")
            out.append(
                (
                    f"{self.model}: a whole ditprune FLUX.1-dev file <= 5 GB (remainder int4, its error "
                    f"measured with the remainder rounded): {whole.name} {whole.flux_gb_rest_int4:.2f} GB, "
                    f"rel. error {whole.error:.4f} / rel. MSE {whole.mse:.4f} (GGUF Q2_K on the prunable "
                    f"layers alone: {gguf.error:.4f} / {gguf.mse:.4f})",
                    whole.flux_gb_rest_int4 <= 5.0,
                )
            )
        else:
            smallest = min((p for p in self.points if p.family in ours), key=lambda p: p.flux_gb_rest_fp8)
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
                best = self.best_under(g.flux_bits_per_weight, ours)
                if best is not None:
                    out.append(
                        (
                            f"{self.model}: at <= {g.flux_bits_per_weight:.2f} b/w, dense GPTQ "
                            f"{g.error:.4f} vs best {best.name} {best.error:.4f} "
                            "(PASS = sparsity wins)",
                            best.error < g.error,
                        )
                    )
        return out

    def to_markdown(self) -> str:
        lines = [
            f"### {self.model}",
            "",
            "| point | rest | b/w FLUX.1-dev | b/w MiniFlux | rel. error ↓ | rel. MSE ↓ | PSNR dB ↑ "
            "| velocity error ↓ | accuracy ↑ | FD ↓ | FLUX.1-dev GB, rest bf16 | rest fp8 | rest int4 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in sorted(self.points, key=lambda p: (-p.flux_bits_per_weight, p.name)):
            m = p.metrics
            lines.append(
                f"| {p.name} | {p.remainder} | {p.flux_bits_per_weight:.3f} | {p.bits_per_weight:.3f} | "
                f"{fmt_stat(m['rel_err'], 4)} | {fmt_stat(m['rel_mse'], 4)} | {fmt_stat(m['psnr'], 2)} | "
                f"{fmt_stat(m['vel_err'], 4) if 'vel_err' in m else '-'} | "
                f"{fmt_stat(m['acc'], 3)} | {fmt_stat(m['fd'], 1)} | "
                f"{p.flux_gb_rest_bf16:.2f} | {p.flux_gb_rest_fp8:.2f} | {p.flux_gb_rest_int4:.2f} |"
            )
        return "\n".join(lines)


@torch.no_grad()
def _evaluate(ctx: BenchContext, pipe: MiniFluxPipeline, *, velocity: bool) -> dict[str, list[float]]:
    """The quality benchmark's metrics; without ``velocity``, all but the velocity error (which
    costs as many model calls as sampling)."""
    if velocity:
        return ctx.evaluate(pipe)
    judge = load_judge(ctx.pipe.config.image_size)
    out: dict[str, list[float]] = {"rel_err": [], "rel_mse": [], "psnr": [], "acc": [], "fd": []}
    for run in ctx.dense.values():
        images = pipe.sample(run.labels, seed=0, steps=ctx.steps, cfg=ctx.cfg, noise=run.noise)
        out["rel_err"].append(relative_error(images, run.images))
        out["rel_mse"].append(relative_squared_error(images, run.images))
        out["psnr"].append(psnr(images, run.images))
        out["acc"].append(judge.accuracy(images, run.labels))
        out["fd"].append(judge.frechet(images))
    return out


def run_pareto(
    model: str,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    per_class: int = 10,
    velocity: bool = True,
    reconstruction: bool = True,
) -> ParetoResult:
    """Every point on one model; ``velocity=False`` skips the velocity error (half the time),
    ``reconstruction=False`` the ``prune_sequential_`` points."""
    ctx = BenchContext.build(model, seeds=seeds, per_class=per_class)
    layers = select_layers(ctx.pipe.model, PruneConfig())
    grams = miniflux_grams(ctx.pipe, layers)
    points = []

    def add(
        name: str, family: str, pipe: MiniFluxPipeline, bpw: float, flux_bytes: float, rest: str, start: float
    ) -> None:
        metrics = _evaluate(ctx, pipe, velocity=velocity)
        rest_bf16, rest_fp8, rest_int4 = flux_gb(flux_bytes)
        flux_bpw = 8 * flux_bytes / FLUX_PRUNABLE
        points.append(ParetoPoint(name, family, bpw, flux_bpw, rest_bf16, rest_fp8, metrics, rest_int4, rest))
        log.info(
            "%s %s: %.3f b/w, rel err %.4f (%.1f s)",
            model,
            name,
            bpw,
            np.mean(metrics["rel_err"]),
            time.perf_counter() - start,
        )

    for name, family, transform, flux_bytes in _Points(ctx, grams).all():
        start = time.perf_counter()
        pipe, bpw = _apply(ctx, transform)
        add(name, family, pipe, bpw, flux_bytes, "as trained", start)
    if reconstruction:
        rec = _Reconstructed(ctx, Lab(model, seeds=seeds, per_class=per_class, ctx=ctx))
        start = time.perf_counter()
        for name, family, pipe, bpw, flux_bytes in rec.points():
            add(name, family, pipe, bpw, flux_bytes, "as trained", start)
            start = time.perf_counter()
        for name, family, pipe, bpw, flux_bytes in rec.whole_files():
            add(name, family, pipe, bpw, flux_bytes, "int4", start)
            start = time.perf_counter()
    return ParetoResult(model, points)


#: each family's colour and legend name in the plot
FAMILY_STYLE = {
    "reference": ("#0072b2", "fp8 / bf16 cast"),
    "gguf": ("#e69f00", "GGUF"),
    "rtn": ("#009e73", "RTN (dense)"),
    "gptq": ("#d55e00", "GPTQ (dense)"),
    "ditprune": ("#56b4e9", "ditprune, mask only"),
    "ditprune-obs": ("#cc79a7", "ditprune + OBS (Prune and Reconstruct)"),
}
PLOT_CAPTION = (
    "Relative error of final samples against dense (log scale) against bits per weight of the "
    "prunable layers on FLUX.1-dev's shapes; one marker per point of the table, coloured by family "
    "(legend). Points beyond 10 bits and the bf16 cast (error 0) are left out."
)

#: the caption runs before the plots were matplotlib's (``--from-markdown`` replaces it)
OLD_PLOT_CAPTION = (
    "Rel. error on a log scale (up; a line every decade) vs FLUX.1-dev bits/weight (right; a line\n"
    "every bit from 0 to 10, darker at 0, 4, 8). Blue: fp8 cast, orange: GGUF, green: RTN,\n"
    "vermillion: GPTQ, sky blue: ditprune (mask-only), pink: ditprune + OBS."
)


def plot_figure(result: ParetoResult, *, x_max: float = 10.0) -> Figure:
    """The size–fidelity plane of one model (matplotlib): relative error (log) against FLUX.1-dev
    bits per weight, a marker per point coloured by family (:data:`FAMILY_STYLE`), labelled axes
    and a legend. Points beyond ``x_max`` bits or with zero error (the bf16 cast) are left out."""
    fig = Figure(figsize=(7.2, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for family, (colour, label) in FAMILY_STYLE.items():
        pts = [
            (p.flux_bits_per_weight, p.error)
            for p in result.points
            if p.family == family and p.error > 0 and p.flux_bits_per_weight <= x_max
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, s=22, color=colour, label=label, alpha=0.85)
    ax.set_yscale("log")
    ax.set_xlim(0, x_max)
    ax.set_xlabel("bits per weight (prunable layers, FLUX.1-dev shapes)")
    ax.set_ylabel("relative error of final samples vs dense")
    ax.set_title(f"{result.model}: size against fidelity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def write_plot(result: ParetoResult, path: Path) -> Path:
    """:func:`plot_figure` as a PNG, atomically."""
    with atomic_path(path, overwrite=True) as tmp:
        FigureCanvasAgg(plot_figure(result)).print_png(str(tmp))
    return path


def to_json(results: Sequence[ParetoResult], command: str) -> dict[str, object]:
    """The table as data (``pareto.json``): per model, every point's name, family, remainder, bits
    per weight, projected FLUX.1-dev GB by remainder, and mean (and std over seeds, where known)
    metrics. :mod:`.tiers` reads it."""
    models: dict[str, list[dict[str, object]]] = {}
    for res in results:
        rows = []
        for p in sorted(res.points, key=lambda p: (-p.flux_bits_per_weight, p.name)):
            row: dict[str, object] = {
                "name": p.name,
                "family": p.family,
                "rest": p.remainder,
                "flux_bits_per_weight": round(p.flux_bits_per_weight, 4),
                "bits_per_weight": round(p.bits_per_weight, 4),
                "flux_gb": {
                    "rest_bf16": round(p.flux_gb_rest_bf16, 3),
                    "rest_fp8": round(p.flux_gb_rest_fp8, 3),
                    "rest_int4": round(p.flux_gb_rest_int4, 3),
                },
            }
            for key in ("rel_err", "rel_mse", "psnr"):
                if key in p.metrics:
                    values = np.asarray(p.metrics[key], dtype=float)
                    finite = bool(np.isfinite(values).all())  # the bf16 cast's PSNR is inf: null
                    row[key] = round(float(values.mean()), 6) if finite else None
                    if len(values) > 1:  # one value: read back from pareto.md, spread unknown
                        row[key + "_std"] = round(float(values.std()), 6) if finite else None
            rows.append(row)
        models[res.model] = rows
    return {"command": command, "models": models}


_MD_ROW = re.compile(r"^\| (?P<cells>.+) \|$")


def read_markdown(path: Path) -> list[ParetoResult]:
    """The results of a previous run, read back from the ``pareto.md`` it wrote: each point's mean
    metrics (one value per metric; the spread over seeds is not recoverable). For rewriting
    ``pareto.json`` and the plots without running the benchmark again (hours on a CPU)."""
    results: list[ParetoResult] = []
    family_of = {"bf16 cast": "reference", "fp8 cast (ComfyUI)": "reference"}
    for line in path.read_text().splitlines():
        if line.startswith("### "):
            results.append(ParetoResult(line[4:].strip(), []))
            continue
        m = _MD_ROW.match(line)
        if not m or not results or line.startswith(("| point", "|---")):
            continue
        cells = [c.strip() for c in m["cells"].split(" | ")]
        name, rest = cells[0], cells[1]
        family = family_of.get(name) or next(
            f
            for prefix, f in (
                ("GGUF", "gguf"),
                ("RTN", "rtn"),
                ("GPTQ", "gptq"),
                ("ditprune+OBS", "ditprune-obs"),
                ("ditprune", "ditprune"),
            )
            if name.startswith(prefix)
        )

        def mean(cell: str) -> list[float]:
            return [float(cell.split(" ± ")[0])]

        metrics = {"rel_err": mean(cells[4]), "rel_mse": mean(cells[5]), "psnr": mean(cells[6])}
        point = ParetoPoint(
            name,
            family,
            float(cells[3]),
            float(cells[2]),
            float(cells[10]),
            float(cells[11]),
            metrics,
            float(cells[12]),
            rest,
        )
        results[-1].points.append(point)
    return results


def write_tables(results: Sequence[ParetoResult], out_dir: Path, command: str) -> Path:
    """``pareto.json`` and one plot per model (``pareto_<model>.png``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for res in results:
        write_plot(res, out_dir / f"pareto_{res.model}.png")
    path = out_dir / "pareto.json"
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(to_json(results, command), indent=1) + "\n")
    return path


def write_pareto(results: Sequence[ParetoResult], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Size–fidelity benchmark (generated)",
        "",
        f"Command: `{command}`. Written by `bench/pareto.py`; do not edit by hand.",
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
        'bf16, fp8 (a scale per row) or int4 (4-bit asymmetric groups of 128, as `remainder="int4"`',
        "stores them). GGUF files as distributed store those in their own format too (Q4_0 is 6.8 GB).",
        "`rest`: `as trained` points change only the prunable layers; `int4` points (whole files) also",
        "hold the remainder as the int4 file stores it, so their error includes it. rel. MSE: the",
        "relative squared error of the same samples (mean of ||Δ||²/||dense||²), the metric the issue's",
        "own figures are in (fp8 0.0005, Q4_0 0.003); a ratio of relative errors is squared in it.",
        "",
        "GGUF blocks run over the row-major weight; MiniFlux rows of 48 or 240 values make some",
        "32-value blocks straddle two rows (FLUX.1-dev's rows are whole blocks). GPTQ uses Gram",
        "matrices recorded on the calibration sampling. `ditprune` points are mask-only (DiT-Pruning",
        "defaults), kept values rounded to nearest; `ditprune+OBS` points are `prune_sequential_` with",
        '`PruneConfig(s, update="obs", value_bits=B)`: the mask chosen in the update, exact refit,',
        "block allocation, block refinement (100 steps), then 4- and 3-bit codes chosen jointly on each",
        "layer's Gram, fp8 rounded after it; `(no block refinement)`: the same with `block_refine_steps=0`.",
        "",
    ]
    for res in results:
        parts += [res.to_markdown(), ""]
        parts += [f"![error vs bits](pareto_{res.model}.png)", "", PLOT_CAPTION, ""]
    write_tables(results, out_dir, command)
    parts += ["## Targets checked", ""]
    for res in results:
        for text, ok in res.checks():
            parts.append(f"- {'PASS' if ok else 'FAIL'}: {text}")
    return write_report(out_dir, "pareto.md", "\n".join(parts))
