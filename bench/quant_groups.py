"""Which group size, symmetry and (for pruned layers) grouping the low-bit values should use.

    python -m bench quantgroups        # writes docs/bench/quant_groups.md

On both MiniFlux models, every prunable layer is quantised by round to nearest (dense, or only its
kept values after the DiT-Pruning mask) and scored by its output error on the calibration inputs:
``sum_l tr(E_l H_l E_l^T) / sum_l tr(W_l H_l W_l^T)`` (H_l the layer's input Gram matrix, E_l the
quantisation error, W_l the dense or masked weight), against the exact bits per weight of the
compressed layout (mask, codes, scales, zero points, row offsets). A layer-level proxy: cheap, and
what GPTQ / OBS minimise; the pareto benchmark measures the samples themselves.

Defaults rule, per bit width: the (group size, symmetry, grouping) of lowest ``error * 4**bits``
(:func:`exchange_score`): scale and zero-point bits must buy as much as code bits do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ditprune_core.config import PruneConfig
from ditprune_core.dit_shapes import FLUX_PRUNABLE
from ditprune_core.layouts import storage_cost
from ditprune_core.miniflux.pipeline import calibrate, load_bundled
from ditprune_core.prune import compute_masks, select_layers
from ditprune_core.quantize import QuantSpec, fake_quantize

from . import write_report
from .grams import miniflux_grams
from .pareto import flux_bytes

log = logging.getLogger("ditprune")

GROUP_SIZES = (16, 32, 64, 128)
SPARSE_SETTINGS = {"50%": (0.5, "unstructured"), "2:4": (0.5, "2:4")}


@dataclass(frozen=True)
class Point:
    model: str
    setting: str  # "dense" or a sparsity setting
    bits: int
    group_size: int
    sym: bool
    grouping: str
    bits_per_weight: float  # the same format on FLUX.1-dev's prunable layers (what the rule uses)
    error: float
    miniflux_bits_per_weight: float = 0.0  # on MiniFlux's layers (ragged groups, 64-bit row offsets)

    @property
    def label(self) -> str:
        kind = "sym" if self.sym else "asym"
        return f"{self.bits}-bit g{self.group_size} {kind}" + (
            "" if self.setting == "dense" else f" ({self.grouping})"
        )


def _measure(
    weights: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    keeps: dict[str, torch.Tensor] | None,
    spec: QuantSpec,
    layout: str,
) -> tuple[float, float]:
    num = den = 0.0
    bits = weights_count = 0
    for name, w in weights.items():
        keep = None if keeps is None else keeps[name]
        base = w if keep is None else w * keep
        q = fake_quantize(w, spec, keep=keep, where=name)
        e = (q - base).double()
        h = grams[name]
        num += float(((e @ h) * e).sum())
        den += float(((base.double() @ h) * base.double()).sum())
        cost = storage_cost(tuple(w.shape), spec, layout=layout, kept=keep)  # type: ignore[arg-type]
        bits += 8 * cost.total_bytes
        weights_count += w.numel()
    return bits / weights_count, num / den


def frontier(points: Sequence[Point]) -> list[Point]:
    """Points that no other point beats at equal or fewer bits per weight."""
    out = []
    for p in points:
        beaten = any(
            (q.bits_per_weight <= p.bits_per_weight and q.error < p.error)
            or (q.bits_per_weight < p.bits_per_weight and q.error <= p.error)
            for q in points
        )
        if not beaten:
            out.append(p)
    return sorted(out, key=lambda p: p.bits_per_weight)


def exchange_score(p: Point) -> float:
    """``error * 4 ** bits_per_weight``: a bit spent on scales must buy what a bit spent on codes buys.

    One more code bit quarters the squared error (rate-distortion of a Gaussian; measured here 4.2x
    from 3 to 4 bits, 4.4x from 2 to 3), so settings of one bit width are compared at that rate.
    """
    return p.error * 4.0**p.bits_per_weight


def choose_defaults(points: Sequence[Point], bit_widths: Sequence[int]) -> dict[int, Point]:
    """Per bit width: the setting of lowest :func:`exchange_score`."""
    out = {}
    for bits in bit_widths:
        mine = [p for p in points if p.bits == bits]
        if mine:
            out[bits] = min(mine, key=exchange_score)
    return out


def measure_model(name: str) -> list[Point]:
    pipe = load_bundled(name)
    stats = calibrate(pipe)
    layers = select_layers(pipe.model, PruneConfig())
    grams = miniflux_grams(pipe, layers)
    weights = {n: layer.weight.detach().float() for n, layer in layers.items()}
    points = []
    for bits in (8, 4, 3, 2):
        for g in GROUP_SIZES:
            for sym in (True, False):
                spec = QuantSpec(bits, g, sym)
                bpw, err = _measure(weights, grams, None, spec, "dense")
                flux = 8 * flux_bytes(spec, None) / FLUX_PRUNABLE
                points.append(Point(name, "dense", bits, g, sym, "-", flux, err, bpw))
    for setting, (sparsity, pattern) in SPARSE_SETTINGS.items():
        keeps = compute_masks(pipe.model, stats, PruneConfig(sparsity, pattern=pattern))
        keeps_bool = {n: k for n, k in keeps.items() if isinstance(k, torch.Tensor)}
        layout = "2:4" if pattern == "2:4" else "bitmask"
        for bits in (8, 4, 3):
            for g in GROUP_SIZES:
                for sym in (True, False):
                    for grouping in ("kept", "columns"):
                        spec = QuantSpec(bits, g, sym, grouping)
                        bpw, err = _measure(weights, grams, keeps_bool, spec, layout)
                        flux = 8 * flux_bytes(spec, setting) / FLUX_PRUNABLE
                        points.append(Point(name, setting, bits, g, sym, grouping, flux, err, bpw))
        log.info("%s %s measured", name, setting)
    return points


def _table(points: Sequence[Point], setting: str, groupings: Sequence[str]) -> list[str]:
    lines = [
        "| bits | symmetry | grouping | " + " | ".join(f"g{g}" for g in GROUP_SIZES) + " |",
        "|---|---|---|" + "---|" * len(GROUP_SIZES),
    ]
    chosen = {id(p) for p in frontier(points)}
    for bits in sorted({p.bits for p in points}, reverse=True):
        for sym in (True, False):
            for grouping in groupings:
                cells = []
                for g in GROUP_SIZES:
                    (p,) = [
                        q
                        for q in points
                        if (q.bits, q.group_size, q.sym, q.grouping) == (bits, g, sym, grouping)
                    ]
                    cell = f"{p.error:.2e} @ {p.bits_per_weight:.3f}"
                    cells.append(f"**{cell}**" if id(p) in chosen else cell)
                kind = "sym" if sym else "asym"
                lines.append(f"| {bits} | {kind} | {grouping} | " + " | ".join(cells) + " |")
    return lines


def _grouping_verdict(points: Sequence[Point]) -> tuple[int, int]:
    """(frontier points grouped over kept values, over columns), per bit width and symmetry."""
    kept = cols = 0
    for bits in {p.bits for p in points}:
        for sym in (True, False):
            subset = [p for p in points if p.bits == bits and p.sym == sym]
            for p in frontier(subset):
                kept += p.grouping == "kept"
                cols += p.grouping == "columns"
    return kept, cols


def run_quant_groups(models: Sequence[str]) -> str:
    lines = [
        "# Low-bit group settings (generated)",
        "",
        "Command: `python -m bench quantgroups`. Written by `bench/quant_groups.py`.",
        "",
        "Each cell: relative layer output error (sum over the prunable layers of tr(E H E^T) over",
        "sum of tr(W H W^T), H from the calibration sampling) @ stored bits per original weight of",
        "the same format on FLUX.1-dev's prunable layers (exact layout bytes: mask, packed codes,",
        "float16 scales, packed zero points, row offsets; MiniFlux's own 48-320-wide rows would add",
        "ragged groups and up to 1.3 bits of row offsets, which FLUX.1-dev's rows do not have).",
        "Round to nearest. Bold: on the frontier of the table (nothing in it is better at equal or",
        "fewer bits). Sparse rows quantise only the kept values of the DiT-Pruning mask and measure",
        "the error against the masked weight (the quantisation's own error).",
        "",
        "Caveat: MiniFlux's rows are 48 to 320 values wide, so a group of 128 is often a whole row;",
        "finer groups may pay more on FLUX.1-dev's 3072- to 15360-wide rows (outliers): re-measure",
        "there when real weights can be used.",
        "",
    ]
    summary: dict[str, dict[str, dict[int, Point]]] = {}
    verdicts = []
    for model in models:
        points = measure_model(model)
        log.info(
            "%s:\n%s",
            model,
            "\n".join(f"{p.setting} {p.label}: {p.error:.3e} @ {p.bits_per_weight:.3f}" for p in points),
        )
        summary[model] = {}
        lines += [f"## {model}", "", "### dense", ""]
        dense = [p for p in points if p.setting == "dense"]
        lines += _table(dense, "dense", ["-"])
        summary[model]["dense"] = choose_defaults(dense, (8, 4, 3, 2))
        for setting in SPARSE_SETTINGS:
            subset = [p for p in points if p.setting == setting]
            lines += ["", f"### {setting}", ""]
            lines += _table(subset, setting, ["kept", "columns"])
            summary[model][setting] = choose_defaults(subset, (8, 4, 3))
            kept, cols = _grouping_verdict(subset)
            verdicts.append((model, setting, kept, cols))
        lines.append("")
    lines += [
        "## Kept-value groups vs column groups",
        "",
        "Points on the per-(bits, symmetry) frontier that group kept values / dense columns:",
        "",
        "| model | sparsity | kept | columns |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {s} | {k} | {c} |" for m, s, k, c in verdicts]
    lines += [
        "",
        "## Chosen per bit width (rule: lowest error x 4^(bits/weight); a bit on scales must buy what",
        "a bit on codes buys, 4x less squared error)",
        "",
        "| model | setting | " + " | ".join(f"{b}-bit" for b in (8, 4, 3, 2)) + " |",
        "|---|---|---|---|---|---|",
    ]
    for model, per_setting in summary.items():
        for setting, chosen in per_setting.items():
            cells = [chosen[b].label if b in chosen else "" for b in (8, 4, 3, 2)]
            lines.append(f"| {model} | {setting} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def write_quant_groups(out_dir: Path, models: Sequence[str]) -> Path:
    return write_report(out_dir, "quant_groups.md", run_quant_groups(models))
