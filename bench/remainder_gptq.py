"""The remainder quantised by GPTQ when pruning, held out: how much it gains over rounding it to
nearest when saved, and the dampening that holds on classes the calibration never saw.

    python -m bench remainder_gptq --jobs 2                     # writes docs/bench/remainder_gptq.md
    python -m bench remainder_gptq --models miniflux-c --damps 1.0   # the default only

Protocol (the generalisation protocol of :mod:`bench.generalisation`): each MiniFlux test-bed is
calibrated on half of its digit classes (0-4, then the swap 5-9), 10 samples a class per calibration
seed (1000, 1001), 20 Euler steps, cfg 2, log timestep weighting, recording the input Gram of every
remainder layer (:func:`~ditprune_core.layers.remainder_layers`: the modulation); it is evaluated on
10 digits of every class of the seen half and of the held-out half with evaluation seeds 0, 1 and 2:
relative MSE of the final samples against the dense model's from the same noise, the mean over both
splits and the three seeds. The prunable layers stay as trained, so the rows measure the remainder
alone. Rows:

- ``round to nearest``: what Save Pruned Model's ``remainder`` int3 / int4 stores when nothing
  quantised it before (3-bit symmetric / 4-bit asymmetric groups of 128);
- ``GPTQ, damp d``: each remainder layer quantised to the same codes by
  :func:`~ditprune_core.obs.gptq_quantize` on its calibration Gram dampened by ``d`` of its mean
  diagonal: what ``PruneConfig(remainder_bits=B)`` does inside ``prune_sequential_``
  (``ReconstructParams.remainder_damp``; tests/test_remainder_gptq.py checks that the driver's codes
  are exactly these), whose Grams are the dense model's since the modulation reads only the
  conditioning vector.

Chosen on miniflux-a and -b, confirmed on miniflux-c (``--damps``: the dampenings to run).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditprune_core.calibrate import Calibrator
from ditprune_core.config import PruneConfig, ReconstructParams
from ditprune_core.layers import remainder_layers
from ditprune_core.miniflux.pipeline import MiniFluxPipeline, load_bundled
from ditprune_core.obs import gptq_quantize
from ditprune_core.prune import select_layers
from ditprune_core.quantize import dequantize_weight, fake_quantize
from ditprune_core.save import remainder_spec
from ditprune_core.util.io import atomic_path

from . import table_head, write_report
from .generalisation import CAL_PER_CLASS, EVAL_SEEDS, GenRow, HeldOutEval, _calibrate
from .refine_holdout import SPLITS, class_labels, class_split

#: the dampenings tried (the product's: ReconstructParams().remainder_damp)
DAMPS = (0.01, 0.1, 0.3, 1.0, 3.0)
FORMATS = ("int3", "int4")


def rest_names(model: torch.nn.Module) -> list[str]:
    """The layers ``PruneConfig.remainder_bits`` quantises: the remainder layers not selected."""
    selected = set(select_layers(model, PruneConfig(0.5)))
    return [n for n in remainder_layers(model) if n not in selected]


@torch.no_grad()
def quantised(
    pipe: MiniFluxPipeline, grams: dict[str, torch.Tensor], remainder: str, damp: float | None
) -> MiniFluxPipeline:
    """A copy of ``pipe`` with its remainder as ``remainder`` codes: GPTQ dampened by ``damp`` on
    ``grams``, or (``damp`` None) rounded to nearest."""
    model = copy.deepcopy(pipe.model)
    spec = remainder_spec(remainder)
    named = dict(model.named_modules())
    for name, gram in grams.items():
        weight = named[name].weight
        if damp is None:
            new = fake_quantize(weight.detach(), spec, where=name)
        else:
            q = gptq_quantize(
                weight.detach(), gram, spec.bits, spec.group_size, spec.sym, damp=damp, where=name
            )
            new = dequantize_weight(q, weight.dtype)
        weight.copy_(new)
    return MiniFluxPipeline(model, pipe.conditioner)


@dataclass
class GptqRow:
    model: str
    method: str  # "round to nearest" or "GPTQ, damp d"
    remainder: str
    seen: list[float] = field(default_factory=list)
    held: list[float] = field(default_factory=list)

    def mean(self, which: str) -> float:
        return float(np.mean(getattr(self, which)))


def _method(damp: float | None) -> str:
    if damp is None:
        return "round to nearest"
    default = " (default)" if damp == ReconstructParams().remainder_damp else ""
    return f"GPTQ, damp {damp:g}{default}"


def run_remainder_gptq(
    model: str,
    damps: Sequence[float] = DAMPS,
    splits: Sequence[Sequence[int]] = SPLITS,
    eval_seeds: Sequence[int] = EVAL_SEEDS,
) -> list[GptqRow]:
    """Round to nearest and GPTQ at each of ``damps`` in int3, and round to nearest and the default
    dampening in int4, of ``model``'s remainder, per half and evaluation seed."""
    pipe = load_bundled(model)
    names = rest_names(pipe.model)
    named = dict(pipe.model.named_modules())
    default = ReconstructParams().remainder_damp
    runs: list[tuple[float | None, str]] = [(None, "int3"), *((d, "int3") for d in damps)]
    runs += [(None, "int4"), (default, "int4")]
    rows = {(d, r): GptqRow(model, _method(d), r) for d, r in runs}
    for half in splits:
        seen, held = class_split(half, pipe.config.num_classes)
        with Calibrator(pipe.model, {n: named[n] for n in names}, weighting="log", grams=names) as cal:
            _calibrate(pipe, class_labels(seen, CAL_PER_CLASS), cal)
        grams = {n: cal.gram(n) for n in names}
        evaluation = HeldOutEval.of(pipe, seen, held, eval_seeds)
        for (damp, remainder), row in rows.items():
            scored = GenRow(model, 0.0, row.method)
            evaluation.score(quantised(pipe, grams, remainder, damp), scored)
            row.seen.extend(scored.seen)
            row.held.extend(scored.held)
    return list(rows.values())


def _merged(rows: Sequence[GptqRow], saved: Path, command: str) -> tuple[list[GptqRow], str]:
    """``rows`` with the rows of ``saved`` (an earlier run's JSON) they do not measure again, and
    the commands that wrote them all, in order."""
    if not saved.exists():
        return list(rows), command
    old = json.loads(saved.read_text())
    key = {(r.model, r.remainder, r.method) for r in rows}
    kept = [GptqRow(**r) for r in old["rows"] if (r["model"], r["remainder"], r["method"]) not in key]
    commands = [c for c in old["commands"] if c != command] + [command]
    order = {m: i for i, m in enumerate(dict.fromkeys([*(r.model for r in kept), *(r.model for r in rows)]))}
    merged = sorted([*kept, *rows], key=lambda r: order[r.model])
    return merged, "`, then `".join(commands)


def write_remainder_gptq(rows: Sequence[GptqRow], out_dir: Path, command: str) -> Path:
    """remainder_gptq.md and .json; an earlier run's rows that this one does not measure are kept (a
    run of one test-bed adds to the rest)."""
    saved = out_dir / "remainder_gptq.json"
    rows, commands = _merged(rows, saved, command)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(saved, overwrite=True) as tmp:
        data = {"commands": commands.split("`, then `"), "rows": [asdict(r) for r in rows]}
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    columns = [
        "test-bed",
        "remainder",
        "method",
        "seen",
        "held out",
        "held/seen",
        "held out / round to nearest",
    ]
    lines = table_head("The remainder quantised by GPTQ when pruning, held out", commands, __doc__, columns)
    for r in rows:
        rtn = next(
            x for x in rows if x.model == r.model and x.remainder == r.remainder and x.method == _method(None)
        )
        lines.append(
            f"| {r.model} | {r.remainder} | {r.method} | {r.mean('seen'):.5f} | {r.mean('held'):.5f} | "
            f"{r.mean('held') / r.mean('seen'):.2f} | {r.mean('held') / rtn.mean('held'):.2f}x |"
        )
    return write_report(out_dir, "remainder_gptq.md", "\n".join(lines))


__all__ = [
    "DAMPS",
    "FORMATS",
    "GptqRow",
    "quantised",
    "rest_names",
    "run_remainder_gptq",
    "write_remainder_gptq",
]
