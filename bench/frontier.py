"""The size–fidelity frontier, held out: the best file for every size, dense and sparse given the
same reconstruction.

    python -m bench frontier --jobs 2     # writes docs/bench/frontier.md, frontier.json, frontier.png

Protocol (the generalisation protocol of :mod:`bench.generalisation`): each MiniFlux test-bed is
calibrated on half of its digit classes (0-4, then the swap 5-9), 10 samples a class per calibration
seed (1000, 1001), 20 Euler steps, cfg 2, log timestep weighting, and evaluated on 10 digits of every
class of the seen half and of the held-out half with evaluation seeds 0, 1 and 2 (the same noise for
dense and compressed): relative MSE of the final samples against the dense model's, the mean over
both splits and the three seeds. Every reconstructed point, dense or sparse, is the same
``prune_sequential_(model, run_calibration, PruneConfig(s, update="obs", value_bits=B))`` with the
product's defaults (one OBS sweep: OBS update, refit, block allocation; block refinement off, as
shipped), so dense and sparse get exactly the same reconstruction:

- ``dense intB + OBS``: sparsity 0, the whole weight quantised in the sweep (GPTQ's update, groups
  of 128; its Gram dampened by ``ReconstructParams.dense_damp``, 0.1 since 2026-12-08: every dense
  point was measured again with it), stored as dense codes with no mask (what Prune and Reconstruct
  with sparsity 0 makes);
- ``S% + intB + OBS``: S% pruned, the kept values quantised jointly in the sweep (B = 4, 3);
- ``... intB g32 ...``: the same with a scale for every 32 values instead of 128 (Prune and
  Reconstruct's ``value_group`` 32: more scales, less error, more bits);
- ``... int3 + attention int4 ...``: mixed precision (new): the same int3 sweep with the attention
  layers that cost most when rounded (both streams' qkv, the image stream's output:
  ``PruneConfig.upgrade_layers=UPGRADE_ATTENTION``; in ComfyUI through the size target) at int4:
  15% of FLUX.1-dev's pruned weights;
- ``S% + fp8 + OBS``: S% pruned with the kept values reconstructed in bf16, then rounded to fp8 with a
  scale per row, as Save Pruned Model (values fp8_e4m3fn) stores them;
- ``..., rest int4``: the same with the modulation layers (which stay dense) rounded as
  ``remainder="int4"`` stores them, the embedders and the final layer kept as trained, as Save
  Pruned Model keeps them (:func:`~ditprune_core.layers.remainder_layers`): the whole file's error
  (what a file under 5 GB needs); ``..., rest int3``: rounded as ``remainder="int3"`` stores them
  (3-bit symmetric groups of 128, 0.42 GB less on FLUX.1-dev: for a file under 4 GB). Measured
  since 2026-12-07 with the embedders and final layer kept (rounding them too gave 71-96% of the
  remainder's error for 0.11 GB: docs/bench/remainder.md);
- ``..., rest int3 GPTQ`` / ``rest int4 GPTQ`` (new): the same whole file with the modulation
  quantised inside the sweep by GPTQ on its calibration Grams (``PruneConfig.remainder_bits``,
  ``ReconstructParams.remainder_damp``) instead of rounded to nearest when saved: the same bytes;
- the references, no calibration: ComfyUI's fp8 cast, GGUF (``Q8_0`` ... ``Q2_K``, :mod:`.gguf_ref`),
  round-to-nearest (``RTN``) at 4 and 3 bits;
- ``GGUF Qx file``: the whole GGUF file as ComfyUI-GGUF's converter makes it: every 2-D weight in the
  format, the modulation layers included, the embedders and the final layer kept in 16 bits. Its
  FLUX.1-dev size is that file's (Q3_K 5.22 GB, Q2_K 4.02 GB: the published files are 5.23 and 4.03
  GB), and its error is measured with the modulation quantised too: the like-for-like reference for
  our whole files (``rest int4``). The plain ``GGUF Qx`` rows quantise the prunable layers only.

Bits/weight (b/w) are those of FLUX.1-dev's prunable layers stored in the point's format (exact
layout arithmetic on FLUX.1-dev's shapes; kept values spread evenly over rows; mask, codes, scales
and zero points included); the MiniFlux column is the same format on the test-bed. The FLUX.1-dev
file adds its other 3.29B parameters in bf16, or its 3.23B modulation weights in fp8 (a scale per
row), int4 or int3 (groups of 128) and the other 67M (embedders, final layer, norms, biases) in
bf16. The frontier takes, for each budget of bits/weight, the point with
the least held-out error, per test-bed and by the mean over the test-beds that measured every point
(miniflux-c runs a reduced set: each of its OBS runs takes 100-200 s on this machine).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ditprune_core.config import UPGRADE_ATTENTION, PruneConfig, ReconstructParams
from ditprune_core.dit_shapes import FLUX_PRUNABLE, FLUX_REST, FLUX_TOTAL, SHAPES
from ditprune_core.layers import DEFAULT_FAMILIES, TEMPLATES
from ditprune_core.miniflux.pipeline import MiniFluxPipeline
from ditprune_core.prune import select_layers
from ditprune_core.quantize import (
    DEFAULT_DENSE_SPECS,
    DEFAULT_GROUP_SIZE,
    DEFAULT_VALUE_SPECS,
    QuantSpec,
    fake_quantize,
)
from ditprune_core.save import remainder_spec
from ditprune_core.sequential import prune_sequential_
from ditprune_core.tiers import WHOLE_FILE_REMAINDERS, choice_models
from ditprune_core.util.io import atomic_path

from . import table_head, write_report
from .generalisation import EVAL_SEEDS, GenRow, Split, _copy, calibrated_halves, meets_target, merge_rows
from .gguf_ref import BITS_PER_WEIGHT, fp8_cast, gguf_fake_quantize
from .lowbit import flux_rest_gb
from .pareto import _fp8_values, _round_remainder, flux_bytes, round_remainder_
from .refine_holdout import SPLITS

__all__ = [
    "BUDGETS",
    "FULL",
    "REDUCED",
    "Point",
    "as_gguf_file_",
    "best_for_budget",
    "points_for",
    "points_named",
    "run_frontier",
    "run_split",
    "to_table",
    "write_frontier",
]

MODELS = ("miniflux-a", "miniflux-b", "miniflux-c")
#: the frontier issue's budgets, bits/weight of FLUX.1-dev's prunable layers
BUDGETS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 8.0)
#: the remainders a file can have, and the bytes a parameter of FLUX.1-dev's remainder takes in each
REMAINDERS = ("keep", "fp8", "int4", "int3")
#: the weights ComfyUI-GGUF's converter (tools/convert.py) keeps in high precision; every other 2-D
#: weight of a GGUF file, the modulation layers included, takes the file's format
GGUF_KEPT = ("time_in.", "txt_in.", "vector_in.", "img_in.", "guidance_in.", "final_layer.")


def _flux_gguf_quantised() -> int:
    """Weights of FLUX.1-dev a GGUF file stores in its format (prunable layers and modulation)."""
    shapes = SHAPES["flux"]().shapes
    return sum(
        rows * cols
        for key, (rows, cols) in ((k, v) for k, v in shapes.items() if len(v) == 2)
        if not _gguf_kept(key)
    )


def _gguf_kept(key: str) -> bool:
    return any(k in key for k in GGUF_KEPT)


def _flux_linear_weights() -> int:
    shapes = SHAPES["flux"]()
    return shapes.linear_numel(shapes.linears)


#: FLUX.1-dev's Linear weights (biases not included): what ComfyUI's fp8 cast stores in one byte
FLUX_LINEAR = _flux_linear_weights()

#: FLUX.1-dev's weights in a GGUF file's format (prunable + modulation: 11.83B of its 11.90B)
FLUX_GGUF_QUANTISED = _flux_gguf_quantised()


@dataclass(frozen=True)
class Point:
    """One file format of the prunable layers (and, with ``rest``, of the rest too).

    ``kind``: ``"sparse"`` / ``"dense"`` (Prune and Reconstruct makes them: reconstructed), or a
    reference made without calibration: ``"gguf"``, ``"fp8 cast"``, ``"rtn"``. ``values``: ``int4``,
    ``int3``, ``int2``, ``fp8`` or a GGUF format's name."""

    kind: str
    values: str
    sparsity: float = 0.0
    #: the remainder rounded as Save Pruned Model's ``remainder`` stores it (``"int4"``, ``"int3"``)
    #: and measured with it: a whole file; None: the remainder as trained
    rest: str | None = None
    #: values one scale covers (Prune and Reconstruct's ``value_group``), reconstructed int points
    group: int = DEFAULT_GROUP_SIZE
    #: a GGUF point: the whole file as ComfyUI-GGUF makes it (the modulation in the format too)
    gguf_file: bool = False
    #: mixed precision (``PruneConfig.upgrade_layers``): the prunable layers this regex finds are
    #: stored at int4 instead of ``values`` (a reconstructed int3 point)
    upgrade: str | None = None
    #: the remainder quantised by GPTQ in the sweep (``PruneConfig.remainder_bits``, the bits of
    #: ``rest``) instead of rounded to nearest when saved
    rest_gptq: bool = False

    @property
    def name(self) -> str:
        values = self.values if self.group == DEFAULT_GROUP_SIZE else f"{self.values} g{self.group}"
        if self.upgrade:
            values += (
                " + attention int4" if self.upgrade == UPGRADE_ATTENTION else f" + int4 /{self.upgrade}/"
            )
        base = {
            "sparse": f"{self.sparsity:.0%} + {values} + OBS",
            "dense": f"dense {values} + OBS",
            "gguf": f"GGUF {self.values}",
            "fp8 cast": "fp8 cast (ComfyUI)",
            "rtn": f"RTN {self.values}",
        }[self.kind]
        if self.gguf_file:
            return f"{base} file (modulation {self.values})"
        return base + (f", rest {self.rest}{' GPTQ' if self.rest_gptq else ''}" if self.rest else "")

    @property
    def remainder_bits(self) -> int | None:
        """Prune and Reconstruct's ``PruneConfig.remainder_bits`` (None: the remainder rounded when saved)."""
        return int(self.rest[3:]) if self.rest_gptq and self.rest else None

    @property
    def reconstructed(self) -> bool:
        """Made by Prune and Reconstruct (+ Save Pruned Model): a choice the nodes can offer."""
        return self.kind in ("sparse", "dense")

    def value_spec(self) -> QuantSpec | None:
        """The codes' spec when the group is not the default (None: ``value_bits``' default)."""
        if self.value_bits is None or self.group == DEFAULT_GROUP_SIZE:
            return None
        defaults = DEFAULT_DENSE_SPECS if self.kind == "dense" else DEFAULT_VALUE_SPECS
        return replace(defaults[self.value_bits], group_size=self.group)

    @property
    def value_bits(self) -> int | None:
        """Prune and Reconstruct's value bits (None: the kept values stay in the model's dtype)."""
        return int(self.values[3:]) if self.reconstructed and self.values.startswith("int") else None

    def flux_bits_per_weight(self) -> float:
        """Bits per weight of FLUX.1-dev's prunable layers stored in this format."""
        if self.kind == "gguf":
            return BITS_PER_WEIGHT[self.values]
        if self.kind == "fp8 cast":
            return 8.0
        if self.values == "fp8":
            stored = flux_bytes(torch.float8_e4m3fn, self.sparsity)
        elif self.upgrade:  # the upgraded layers' share of the weights at int4, the rest as the point
            share = flux_upgraded_share(self.upgrade)
            low, high = replace(self, upgrade=None), replace(self, values="int4", upgrade=None)
            return (1 - share) * low.flux_bits_per_weight() + share * high.flux_bits_per_weight()
        elif self.kind == "sparse":
            stored = flux_bytes(self.value_spec() or DEFAULT_VALUE_SPECS[int(self.values[3:])], self.sparsity)
        else:  # dense codes (reconstructed or round to nearest)
            stored = flux_bytes(self.value_spec() or DEFAULT_DENSE_SPECS[int(self.values[3:])], None)
        return 8 * stored / FLUX_PRUNABLE

    def flux_gb(self) -> dict[str, float]:
        """The FLUX.1-dev file in GB with the remainder kept (bf16), fp8 or int4; a GGUF file's own
        size under every key (its remainder is what the converter makes of it)."""
        if self.gguf_file:
            rest = 2 * (FLUX_PRUNABLE + FLUX_REST - FLUX_GGUF_QUANTISED)
            gb = round((self.flux_bits_per_weight() * FLUX_GGUF_QUANTISED / 8 + rest) / 1e9, 3)
            return dict.fromkeys(REMAINDERS, gb)
        if self.kind == "fp8 cast":  # ComfyUI's cast: every Linear weight one byte, no scale; the rest bf16
            return dict.fromkeys(REMAINDERS, round((FLUX_LINEAR + 2 * (FLUX_TOTAL - FLUX_LINEAR)) / 1e9, 3))
        prunable = self.flux_bits_per_weight() * FLUX_PRUNABLE / 8e9
        return {r: round(prunable + flux_rest_gb(r), 3) for r in REMAINDERS}

    @property
    def remainder_measured(self) -> str:
        """What the layers outside the prunable ones held when the error was measured."""
        if self.gguf_file:
            return "gguf"
        return self.rest or "as trained"


def flux_upgraded_share(regex: str) -> float:
    """The share of FLUX.1-dev's prunable weights in the layers ``regex`` finds (``re.search``)."""
    shapes = SHAPES["flux"]()
    template = next(t for t in TEMPLATES if t.name == "flux")
    prunable = [n for n in shapes.linears if template.family_of(n) in DEFAULT_FAMILIES]
    assert shapes.linear_numel(prunable) == FLUX_PRUNABLE
    return shapes.linear_numel([n for n in prunable if re.search(regex, n)]) / FLUX_PRUNABLE


def _sparse(
    values: Sequence[str], sparsities: Sequence[float], group: int = DEFAULT_GROUP_SIZE
) -> list[Point]:
    return [Point("sparse", v, s, group=group) for v in values for s in sparsities]


def _dense(bits: Sequence[int], group: int = DEFAULT_GROUP_SIZE) -> list[Point]:
    return [Point("dense", f"int{b}", group=group) for b in bits]


def _whole(points: Sequence[Point], rest: str = "int4") -> list[Point]:
    return [replace(p, rest=rest) for p in points]


#: every point on miniflux-a and -b (their OBS runs take seconds): sparse from 20% to 75%
_FULL_RECON = [
    *_dense((4, 3, 2)),
    *_sparse(("int4",), (0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.75)),
    *_sparse(("int3",), (0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.75)),
    *_sparse(("fp8",), (0.2, 0.3, 0.5)),
]
#: groups of 32 (Prune and Reconstruct's value_group 32): more scales, less error
_G32_RECON = [
    *_dense((4, 3, 2), group=32),
    *_sparse(("int4",), (0.4, 0.5), group=32),
    *_sparse(("int3",), (0.4, 0.5, 0.6, 0.7), group=32),
]
#: whole files with the rest in 3-bit codes (Save Pruned Model's remainder int3): 0.42 GB less than
#: int4 on FLUX.1-dev, for the 4 GB target; and, since the remainder codes the modulation only (its
#: int3 rounding then adds little), 5 GB files of up to 3.35 b/w in the prunable layers
_REST_INT3 = [
    *_sparse(("int3",), (0.55, 0.6)),
    *_dense((2,), group=32),
    *_dense((3,)),
    *_sparse(("int3",), (0.3,)),
    *_sparse(("int4",), (0.5,)),
]
#: mixed precision (``upgrade_layers``): int3 codes with the attention layers that cost most when rounded
#: (both streams' qkv, the image stream's output; chosen on miniflux-a and -b by rounding one layer
#: family at a time) at int4: 4.92-4.94 GB whole files with the rest in int3
_UPGRADED = [
    Point("dense", "int3", upgrade=UPGRADE_ATTENTION),
    Point("sparse", "int3", 0.3, upgrade=UPGRADE_ATTENTION),
]
#: sparse with the same upgrade, each just within a budget: 2.97 b/w (<= 3.0), 2.48 b/w (<= 2.5) and a
#: 3.88 GB whole file with the rest in int3 (<= 4 GB, and the 6 GB card's 3.9 GB)
_UPGRADED_SPARSE = [
    Point("sparse", "int3", 0.4, upgrade=UPGRADE_ATTENTION),
    Point("sparse", "int3", 0.55, upgrade=UPGRADE_ATTENTION),
    Point("sparse", "int3", 0.6, rest="int3", upgrade=UPGRADE_ATTENTION),
]
#: the same whole files with the remainder quantised by GPTQ in the sweep (``remainder_bits``, new):
#: the same bytes, calibrated codes for the modulation instead of round to nearest
_REST_GPTQ = [
    Point("dense", "int3", rest="int3", upgrade=UPGRADE_ATTENTION, rest_gptq=True),
    Point("sparse", "int3", 0.6, rest="int3", upgrade=UPGRADE_ATTENTION, rest_gptq=True),
    Point("sparse", "int3", 0.55, rest="int3", rest_gptq=True),
    Point("dense", "int3", rest="int3", rest_gptq=True),
    Point("dense", "int3", rest="int4", upgrade=UPGRADE_ATTENTION, rest_gptq=True),
    Point("sparse", "int4", 0.3, rest="int4", rest_gptq=True),
]
#: the GGUF files the file-size targets compare with, whole (the modulation in the format too)
GGUF_FILES = (Point("gguf", "Q3_K", gguf_file=True), Point("gguf", "Q2_K", gguf_file=True))
FULL: tuple[Point, ...] = (
    Point("fp8 cast", "fp8"),
    *(Point("gguf", f) for f in ("Q8_0", "Q5_0", "Q4_0", "Q3_K", "Q2_K")),
    *GGUF_FILES,
    Point("rtn", "int4"),
    Point("rtn", "int3"),
    *_FULL_RECON,
    *_whole([p for p in _FULL_RECON if p.values != "fp8"]),
    *_G32_RECON,
    *_whole(_G32_RECON),
    *_whole(_REST_INT3, "int3"),
    _UPGRADED[0],
    *_whole(_UPGRADED, "int3"),
    *_UPGRADED_SPARSE,
    *_REST_GPTQ,
)
#: miniflux-c's reduced set (each OBS run 100-200 s, each evaluation 90 s on one core): the points
#: near the file-size targets (5 GB and 4 GB whole files) and the dense baselines
_REDUCED_RECON = [
    *_dense((4, 3, 2)),
    *_sparse(("int4",), (0.3, 0.5, 0.55, 0.7)),
    *_sparse(("int3",), (0.5, 0.7, 0.75)),
]
REDUCED: tuple[Point, ...] = (
    Point("fp8 cast", "fp8"),
    *(Point("gguf", f) for f in ("Q3_K", "Q2_K")),
    *GGUF_FILES,
    *_REDUCED_RECON,
    *_whole([Point("dense", "int2"), Point("sparse", "int4", 0.55), Point("sparse", "int3", 0.75)]),
    *_dense((4, 3), group=32),  # dense int4 g32: the 12 GB tier's file
    *_sparse(("int3",), (0.5, 0.7), group=32),
    *_whole(_sparse(("int3",), (0.5, 0.7), group=32)),
    *_sparse(("int3",), (0.55,)),
    *_whole([*_sparse(("int3",), (0.55, 0.6)), *_dense((3,)), *_sparse(("int4",), (0.5,))], "int3"),
    _UPGRADED[0],
    *_whole(_UPGRADED[:1], "int3"),
    *_REST_GPTQ[:3],
)


def points_for(model: str) -> tuple[Point, ...]:
    return REDUCED if model == "miniflux-c" else FULL


@torch.no_grad()
def as_gguf_file_(model: torch.nn.Module, fmt: str) -> None:
    """Round ``model`` in place to what a GGUF file of ``fmt`` holds: the prunable layers and every
    other 2-D weight but the embedders and the final layer (:data:`GGUF_KEPT`) in the format."""
    _round_prunable_(model, lambda name, w: gguf_fake_quantize(w, fmt))
    round_remainder_(model, lambda w, key: gguf_fake_quantize(w, fmt), skip=_gguf_kept)


@torch.no_grad()
def _round_prunable_(model: torch.nn.Module, fn: Any) -> None:
    """Replace in place the weight of every prunable layer by ``fn(layer name, weight)``."""
    for name, layer in select_layers(model, PruneConfig(0.5)).items():
        layer.weight.copy_(fn(name, layer.weight.detach()))


class _Maker:
    """Makes the compressed pipeline of every point of one split; one OBS run per (sparsity, value
    bits), shared by the fp8 and whole-file points built on it."""

    def __init__(self, split: Split, clip: str = "range", shrink_text: float | None = None) -> None:
        self.split, self.clip = split, clip
        self.reconstruct = (
            ReconstructParams() if shrink_text is None else ReconstructParams(shrink_text=shrink_text)
        )
        self.runs: dict[
            tuple[float, int | None, QuantSpec | None, str | None, int | None],
            tuple[MiniFluxPipeline, float, int],
        ] = {}

    def obs(
        self,
        sparsity: float,
        bits: int | None,
        spec: QuantSpec | None = None,
        upgrade: str | None = None,
        remainder_bits: int | None = None,
    ) -> tuple[MiniFluxPipeline, float, int]:
        key = (sparsity, bits, spec, upgrade, remainder_bits)
        if key not in self.runs:
            pipe = _copy(self.split)
            config = PruneConfig(
                sparsity,
                update="obs",
                value_bits=bits,
                value_spec=spec,
                reconstruct=self.reconstruct,
                upgrade_layers=upgrade,
                remainder_bits=remainder_bits,
            )
            if config.value_quant is not None and not upgrade:  # an upgrade takes the default specs
                config = replace(config, value_spec=self._clipped(config.value_quant))
            report = prune_sequential_(
                pipe.model,
                lambda cal: self.split.calibrate(pipe, cal),
                config,
                memory_budget_bytes=1 << 34,
                weighting="log",
            )
            self.runs[key] = (pipe, report.bits_per_weight, report.sampler_runs)
        return self.runs[key]

    def _clipped(self, spec: QuantSpec) -> QuantSpec:
        """``spec`` with the run's range rule (``--clip``)."""
        return replace(spec, clip=self.clip)

    @torch.no_grad()
    def _each_layer(self, fn: Any) -> MiniFluxPipeline:
        pipe = _copy(self.split)
        _round_prunable_(pipe.model, fn)
        return pipe

    def _gguf_file(self, fmt: str) -> MiniFluxPipeline:
        pipe = _copy(self.split)
        as_gguf_file_(pipe.model, fmt)
        return pipe

    def make(self, point: Point) -> tuple[MiniFluxPipeline, float, int]:
        """(pipeline, MiniFlux bits/weight of the prunable layers, sampler runs)."""
        if point.kind == "gguf":
            if point.gguf_file:
                return self._gguf_file(point.values), BITS_PER_WEIGHT[point.values], 0
            return (
                self._each_layer(lambda n, w: gguf_fake_quantize(w, point.values)),
                BITS_PER_WEIGHT[point.values],
                0,
            )
        if point.kind == "fp8 cast":
            return self._each_layer(lambda n, w: fp8_cast(w)), 8.0, 0
        if point.kind == "rtn":
            spec = self._clipped(DEFAULT_DENSE_SPECS[int(point.values[3:])])
            pipe = self._each_layer(lambda n, w: fake_quantize(w, spec, where=n))
            return pipe, point.flux_bits_per_weight(), 0
        if point.values == "fp8":
            base, _, runs = self.obs(point.sparsity, None)
            pipe, bits = _fp8_values(base, "bitmask")
        else:
            pipe, bits, runs = self.obs(
                point.sparsity, point.value_bits, point.value_spec(), point.upgrade, point.remainder_bits
            )
        if point.rest is None or point.rest_gptq:  # a GPTQ remainder is in the pipeline already
            return pipe, bits, runs
        rest = self._clipped(remainder_spec(point.rest))
        return _round_remainder(pipe, rest), bits, runs


def run_frontier(
    models: Sequence[str] = MODELS,
    splits: Sequence[Sequence[int]] = SPLITS,
    eval_seeds: Sequence[int] = EVAL_SEEDS,
    points: Sequence[Point] | None = None,
    clip: str = "range",
    shrink_text: float | None = None,
) -> list[GenRow]:
    """One :class:`~.generalisation.GenRow` per (model, point): ``method`` is the point's name.

    ``clip``: the range rule of every integer grid the points make (kept values, dense codes, the
    round-to-nearest references and the int4 remainder; :data:`~ditprune_core.quantize.CLIPS`):
    ``"range"`` is the product's; ``"mse"`` measures the least-error clipped ranges instead.
    ``shrink_text``: the reconstruction's ``ReconstructParams.shrink_text`` (None: the product's)."""
    rows: dict[tuple[str, str], GenRow] = {}
    for model, split, evaluation in calibrated_halves(models, splits, eval_seeds):
        maker = _Maker(split, clip, shrink_text)
        for point in points if points is not None else points_for(model):
            start = time.perf_counter()
            made, bits, runs = maker.make(point)
            seconds = time.perf_counter() - start
            row = rows.setdefault((model, point.name), GenRow(model, point.sparsity, point.name))
            evaluation.score(made, row)
            row.add_run(bits, runs, seconds)
    return list(rows.values())


def run_split(model: str, split: Sequence[int], **kwargs: Any) -> list[GenRow]:
    """:func:`run_frontier` of one model calibrated on one split (a process's share)."""
    return run_frontier([model], splits=[split], **kwargs)


ALL_POINTS = {p.name: p for p in (*FULL, *REDUCED)}


def points_named(names: Sequence[str]) -> list[Point]:
    """The points of these names (as frontier.md writes them).

    Raises:
        ValueError: a name no point has; the message lists the names there are.
    """
    unknown = [n for n in names if n not in ALL_POINTS]
    if unknown:
        raise ValueError(f"no frontier point is named {unknown}; the points are: {', '.join(ALL_POINTS)}")
    return [ALL_POINTS[n] for n in names]


def to_table(rows: Sequence[GenRow], command: str) -> dict[str, Any]:
    """The frontier table as ``frontier.json`` holds it: every point with its settings, its FLUX.1-dev
    file and its errors on each test-bed that measured it. The tier chooser and the size target of
    Prune and Reconstruct read it (:mod:`ditprune_core.tiers`)."""
    models = list(dict.fromkeys(r.model for r in rows))
    out_points = []
    for name, point in ALL_POINTS.items():
        measured = {r.model: r for r in rows if r.method == name}
        if not measured:
            continue
        out_points.append(
            {
                "name": name,
                "kind": point.kind,
                "sparsity": point.sparsity,
                "values": point.values,
                "value_bits": point.value_bits,
                "value_group": point.group,
                "upgrade_layers": point.upgrade,
                "remainder_measured": point.remainder_measured,
                "remainder_bits": point.remainder_bits,
                "reconstructed": point.reconstructed,
                "flux_bits_per_weight": round(point.flux_bits_per_weight(), 4),
                "flux_gb": point.flux_gb(),
                "models": {
                    m: {
                        "held": round(float(np.mean(r.held)), 6),
                        "seen": round(float(np.mean(r.seen)), 6),
                        "bits_per_weight": round(float(np.mean(r.bits)), 4),
                    }
                    for m, r in measured.items()
                },
            }
        )
    return {
        "command": command,
        "metric": "held-out relative MSE of final samples against dense (generalisation protocol)",
        "models": models,
        "flux_prunable_params": FLUX_PRUNABLE,
        "flux_rest_params": FLUX_REST,
        "rest_bytes_per_param": {r: flux_rest_gb(r) * 1e9 / FLUX_REST for r in REMAINDERS},
        "points": out_points,
    }


def _mean_held(point: dict[str, Any], models: Sequence[str]) -> float:
    return float(np.mean([point["models"][m]["held"] for m in models]))


def best_for_budget(
    table: dict[str, Any], budget: float, model: str | None = None, whole_file: bool = False
) -> dict[str, Any] | None:
    """The point with the least held-out error (on ``model``, or the mean over the test-beds that
    measured every point) whose FLUX.1-dev prunable layers fit ``budget`` bits/weight; with
    ``whole_file``, only points whose remainder error was measured (rest int4 / int3) or references."""
    models = [model] if model else choice_models(table)
    fits = [
        p
        for p in table["points"]
        if p["flux_bits_per_weight"] <= budget
        and all(m in p["models"] for m in models)
        and (not whole_file or p["remainder_measured"] in WHOLE_FILE_REMAINDERS or not p["reconstructed"])
    ]
    return min(fits, key=lambda p: _mean_held(p, models)) if fits else None


def _whole_gb(point: dict[str, Any]) -> float:
    """The FLUX.1-dev file of a whole-file point: the size with the remainder it was measured with."""
    return float(point["flux_gb"][point["remainder_measured"]])


def _claims(table: dict[str, Any]) -> list[tuple[str, bool]]:
    """The frontier issue's file-size targets, per test-bed, on whole files (rest int4 / int3 measured)
    against the whole GGUF file (its modulation quantised too) where it was measured, else against
    GGUF on the prunable layers only (then the reference's error leaves its remainder out)."""
    out = []
    for model in table["models"]:
        ref = {p["name"]: p for p in table["points"] if model in p["models"]}
        for gb, fmt, factor, words in (
            (5.0, "Q3_K", 0.5, "at most half of"),
            (4.0, "Q2_K", 1.0, "below"),
        ):
            whole, layers = ref.get(f"GGUF {fmt} file (modulation {fmt})"), ref.get(f"GGUF {fmt}")
            reference = whole or layers
            if reference is None:
                continue
            q = reference["models"][model]["held"]
            fits = [
                p
                for p in ref.values()
                if p["reconstructed"]
                and p["remainder_measured"] in WHOLE_FILE_REMAINDERS
                and _whole_gb(p) <= gb
            ]
            if not fits:
                out.append((f"{model}: no measured whole file of at most {gb:.0f} GB", False))
                continue
            best = min(fits, key=lambda p: p["models"][model]["held"])
            e = best["models"][model]["held"]
            ok = meets_target(e, q, factor)
            what = (
                f"the GGUF {fmt} file ({whole['flux_gb']['int4']:.2f} GB) {q:.5f}"
                if whole
                else f"GGUF {fmt} (prunable layers only) {q:.5f}"
            )
            also = (
                f"; GGUF {fmt} on the prunable layers only: {layers['models'][model]['held']:.5f}"
                if whole and layers
                else ""
            )
            out.append(
                (
                    f"{model}: best FLUX.1-dev file <= {gb:.0f} GB is {best['name']} "
                    f"({_whole_gb(best):.2f} GB), "
                    f"held-out {e:.5f} vs {what} ({e / q:.2f}x; target {words} GGUF {fmt}'s{also})",
                    ok,
                )
            )
    return out


def _bit_claims(table: dict[str, Any]) -> list[tuple[str, bool]]:
    """The generalisation issue's size-fidelity targets, per test-bed, held out, on the prunable
    layers (bits/weight of FLUX.1-dev's; GGUF on the same layers): at <= 3.0 b/w at most half of
    Q2_K's error, at <= 3.5 b/w below Q3_K's."""
    out = []
    for model in table["models"]:
        ref = {p["name"]: p for p in table["points"] if model in p["models"]}
        for budget, fmt, factor, words in (
            (3.0, "Q2_K", 0.5, "at most half of"),
            (3.5, "Q3_K", 1.0, "below"),
        ):
            if f"GGUF {fmt}" not in ref:
                continue
            q = ref[f"GGUF {fmt}"]["models"][model]["held"]
            fits = [
                p
                for p in ref.values()
                if p["reconstructed"]
                and p["remainder_measured"] == "as trained"
                and p["flux_bits_per_weight"] <= budget
            ]
            if not fits:
                continue
            best = min(fits, key=lambda p: p["models"][model]["held"])
            e = best["models"][model]["held"]
            out.append(
                (
                    f"{model}: best at <= {budget:.1f} b/w is {best['name']} "
                    f"({best['flux_bits_per_weight']:.2f} b/w) {e:.5f} vs GGUF {fmt} {q:.5f} "
                    f"({e / q:.2f}x; target {words} GGUF {fmt}'s)",
                    meets_target(e, q, factor),
                )
            )
    return out


def write_frontier(
    rows: Sequence[GenRow],
    out_dir: Path,
    command: str,
    previous: Path | None = None,
    clip: str = "range",
    shrink_text: float | None = None,
) -> Path:
    """frontier.json, frontier.md and frontier.png. ``previous``: a frontier.json whose entries the
    new rows did not measure are kept (a run of one test-bed, or of a few points, adds to the rest);
    ``clip`` and ``shrink_text``: the range rule and the text-stream Gram shrinkage the rows were
    measured with (:func:`run_frontier`; None: the product's shrinkage).

    Raises:
        ValueError: ``previous`` measured with another range rule or shrinkage (tables never mix).
    """
    shrink = ReconstructParams().shrink_text if shrink_text is None else shrink_text
    table = {**to_table(rows, command), "clip": clip, "shrink_text": shrink}
    if previous is not None and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("clip", "range") != clip:
            raise ValueError(
                f"{previous} was measured with clip {old.get('clip', 'range')!r}, this run with {clip!r}: "
                "write it to another --out folder"
            )
        if table_shrink_text(old) != shrink:
            raise ValueError(
                f"{previous} was measured with shrink_text {table_shrink_text(old)}, this run with "
                f"{shrink}: add --shrink-text {table_shrink_text(old)} to add points to it, or write to "
                "another --out folder"
            )
        table = _merge_tables(old, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "frontier.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(table, indent=1) + "\n")
    _plot(table, out_dir / "frontier.png")
    return write_report(out_dir, "frontier.md", _markdown(table))


def table_shrink_text(table: dict[str, Any]) -> float:
    """The text-stream Gram shrinkage a frontier table was measured with (0 before it existed)."""
    return float(table.get("shrink_text", 0.0))


def _merge_tables(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with every (point, test-bed) entry of ``old`` that ``new`` did not measure. Every
    point's FLUX.1-dev sizes are computed again (layout arithmetic, not a measurement: a change to
    what the remainder stores changes them for the points measured before it too)."""
    points = {p["name"]: {**p, "models": dict(p["models"])} for p in new["points"]}
    for p in old["points"]:
        if p["name"] in points:
            for m, v in p["models"].items():
                points[p["name"]]["models"].setdefault(m, v)
        else:
            points[p["name"]] = {**p, "models": dict(p["models"])}
    order = [n for n in ALL_POINTS if n in points]
    measured = {*old["models"], *new["models"]}
    models = [m for m in dict.fromkeys((*MODELS, *old["models"], *new["models"])) if m in measured]
    commands = old["command"] if isinstance(old["command"], list) else [old["command"]]
    return {
        **new,
        "command": [*commands, new["command"]],
        "models": models,
        "points": [
            {
                **points[n],
                "flux_gb": ALL_POINTS[n].flux_gb(),
                "models": {m: points[n]["models"][m] for m in models if m in points[n]["models"]},
            }
            for n in order
        ],
    }


def _markdown(table: dict[str, Any]) -> str:
    models = table["models"]
    commands = table["command"] if isinstance(table["command"], list) else [table["command"]]
    protocol = __doc__ or ""
    if table.get("clip", "range") != "range":
        protocol += (
            f"\n**Range rule: `clip={table['clip']!r}`** (`--clip`): every integer grid of these points "
            "(kept values, dense codes, RTN, the int4 remainder) clips each group's range by the least-error "
            "search (:data:`~ditprune_core.quantize.CLIP_SHRINKS`) instead of keeping it, the product's "
            "rule; compare each row with the same row of `docs/bench/frontier.md`.\n"
        )
    shrink, default = table_shrink_text(table), ReconstructParams().shrink_text
    protocol += (
        f"\nReconstruction: the text-stream layers' Grams shrunk by {shrink:g} "
        "(`ReconstructParams.shrink_text`"
    )
    protocol += (
        ", the product's default).\n"
        if shrink == default
        else f"; the product's default is now {default:g}: these points were measured before it; a run "
        f"with the default goes to another `--out` folder, `--shrink-text {shrink:g}` adds points here).\n"
    )
    lines = table_head(
        "The size–fidelity frontier, held out",
        "`, then `".join(commands),
        protocol,
        [
            "point",
            "sparse?",
            "FLUX.1-dev b/w",
            "FLUX.1-dev GB (rest bf16 / fp8 / int4)",
            *[f"{m} held-out (seen, b/w)" for m in models],
        ],
    )
    for p in table["points"]:
        cells = []
        for m in models:
            e = p["models"].get(m)
            cells.append(
                "-" if e is None else f"{e['held']:.5f} ({e['seen']:.5f}, {e['bits_per_weight']:.2f})"
            )
        gb = p["flux_gb"]
        if p["remainder_measured"] == "gguf":
            size = f"{gb['int4']:.2f} (the whole file)"
        elif p["remainder_measured"] == "int3":
            size = f"{gb['int3']:.2f} (rest int3)"
        else:
            size = f"{gb['keep']:.2f} / {gb['fp8']:.2f} / {gb['int4']:.2f}"
        lines.append(
            f"| {p['name']} | {'yes' if p['sparsity'] > 0 else 'no'} | {p['flux_bits_per_weight']:.2f} | "
            f"{size} | {' | '.join(cells)} |"
        )
    full = choice_models(table)
    lines += [
        "",
        "## The frontier",
        "",
        f"For each budget (bits/weight of FLUX.1-dev's prunable layers), the point with the least mean "
        f"held-out error over {', '.join(full)} (the test-beds that measured every point), and each "
        "test-bed's own best. `sparse?` says whether the winner prunes: where it says no, sparsity is "
        "not on the frontier.",
        "",
        "| budget | best point (mean) | sparse? | b/w | FLUX.1-dev GB (rest fp8 / int4) | mean held-out | "
        + " | ".join(f"best on {m}" for m in models)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(models),
    ]
    for budget in BUDGETS:
        best = best_for_budget(table, budget)
        per = []
        for m in models:
            b = best_for_budget(table, budget, m)
            per.append("none fits" if b is None else f"{b['name']} {b['models'][m]['held']:.5f}")
        if best is None:
            lines.append(f"| {budget:.1f} | none fits | - | - | - | - | {' | '.join(per)} |")
            continue
        lines.append(
            f"| {budget:.1f} | {best['name']} | {'yes' if best['sparsity'] > 0 else 'no'} | "
            f"{best['flux_bits_per_weight']:.2f} | "
            f"{best['flux_gb']['fp8']:.2f} / {best['flux_gb']['int4']:.2f} | "
            f"{_mean_held(best, full):.5f} | {' | '.join(per)} |"
        )
    lines += [
        "",
        "## File-size targets (whole files: the remainder's rounding measured too)",
        "",
        "Like for like: each of our files is measured whole (its remainder rounded to int4 or int3) and "
        "compared with the whole GGUF file, whose modulation layers are in the GGUF format too (the rows "
        "`GGUF Qx file`); the error of GGUF on the prunable layers alone is given beside it.",
        "",
    ]
    lines += [f"- {'met' if ok else '**not met**'}: {text}" for text, ok in _claims(table)]
    lines += [
        "",
        "## Bits/weight targets (the prunable layers, as the generalisation issue sets them)",
        "",
    ]
    lines += [f"- {'met' if ok else '**not met**'}: {text}" for text, ok in _bit_claims(table)]
    lines += [
        "",
        "Plot: `frontier.png` (held-out error against FLUX.1-dev bits/weight, one panel per test-bed).",
    ]
    return "\n".join(lines)


_STYLE = {
    "sparse": ("tab:red", "o"),
    "dense": ("tab:blue", "s"),
    "gguf": ("tab:green", "^"),
    "rtn": ("tab:gray", "x"),
    "fp8 cast": ("black", "D"),
}


def _plot(table: dict[str, Any], path: Path) -> None:
    models = table["models"]
    fig = Figure(figsize=(5 * len(models), 4.2))
    FigureCanvasAgg(fig)
    for i, model in enumerate(models):
        ax = fig.add_subplot(1, len(models), i + 1)
        pts = [p for p in table["points"] if model in p["models"] and p["remainder_measured"] == "as trained"]
        for kind, (color, marker) in _STYLE.items():
            sel = [p for p in pts if p["kind"] == kind]
            if sel:
                ax.scatter(
                    [p["flux_bits_per_weight"] for p in sel],
                    [p["models"][model]["held"] for p in sel],
                    c=color,
                    marker=marker,
                    label={"sparse": "sparse + OBS", "dense": "dense + OBS"}.get(kind, kind),
                )
        # the frontier: the least error at or below each point's size
        pts.sort(key=lambda p: p["flux_bits_per_weight"])
        xs, ys, best = [], [], float("inf")
        for p in pts:
            e = p["models"][model]["held"]
            if e < best:
                best = e
                xs.append(p["flux_bits_per_weight"])
                ys.append(e)
        ax.step(xs, ys, where="post", color="tab:purple", lw=1, label="frontier")
        ax.set_yscale("log")
        ax.set_xlabel("bits/weight (FLUX.1-dev prunable layers)")
        ax.set_ylabel("held-out relative MSE")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def rows_by_model(parts: Sequence[Sequence[GenRow]], models: Sequence[str]) -> list[GenRow]:
    rows = merge_rows(parts)
    rows.sort(key=lambda r: models.index(r.model))
    return rows
