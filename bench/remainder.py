"""Which of the remainder's weights its rounding hurts, held out: why Save Pruned Model's
``remainder`` codes the modulation and keeps the embedders and the final layer.

    python -m bench remainder --jobs 2    # writes docs/bench/remainder.md

Protocol (the generalisation protocol of :mod:`bench.generalisation`, without calibration: nothing
here is fit): the prunable layers stay as trained, and one group of the other Linear layers is
rounded as ``remainder="int4"`` / ``"int3"`` stores it (round to nearest, 4-bit asymmetric /
3-bit symmetric groups of 128; weights of fewer than 256 values are never rounded, as the writer
skips them). Each MiniFlux test-bed is evaluated on 10 digits of every class of each half of its
classes (0-4 and 5-9), evaluation seeds 0, 1 and 2, 20 Euler steps, cfg 2: relative MSE of the
final samples against the dense model's from the same noise, the mean over both halves and the three
seeds. Nothing is calibrated, so "seen" and "held-out" differ only in the classes drawn; the column
is the mean of both.

The groups, by the architecture template's families (:mod:`ditprune_core.layers`):

- ``every Linear``: every Linear layer outside the prunable ones (what ``remainder`` coded before
  2026-12-07);
- ``modulation``: the layers ``remainder`` codes now (:func:`~ditprune_core.layers.remainder_layers`);
- ``embedders``: ``img_in``, ``txt_in``, ``time_in``, ``vector_in`` (and ``guidance_in``);
- ``final layer``: ``final_layer.linear`` and ``final_layer.adaLN_modulation.1``.

The FLUX.1-dev column counts the group's weights in FLUX.1-dev (its shapes, :mod:`ditprune_core.dit_shapes`)
and the GB they take in int3 beyond what they take in bf16 saves: what keeping them costs a file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditprune_core.dit_shapes import SHAPES
from ditprune_core.layers import (
    DEFAULT_FAMILIES,
    detect_architecture,
    is_remainder_family,
    rest_linear_params,
)
from ditprune_core.miniflux.pipeline import MiniFluxPipeline, load_bundled
from ditprune_core.quantize import fake_quantize
from ditprune_core.save import is_remainder_weight, remainder_spec

from . import table_head, write_report
from .generalisation import EVAL_SEEDS, GenRow, HeldOutEval
from .refine_holdout import SPLITS, class_split

#: group name -> which families (of a Linear layer outside the prunable ones) it rounds
GROUPS: dict[str, Callable[[str | None], bool]] = {
    "every Linear": lambda family: True,
    "modulation": is_remainder_family,
    "embedders": lambda family: family == "embedder",
    "final layer": lambda family: family == "final",
}
FORMATS = ("int4", "int3")


def group_keys(model: torch.nn.Module, group: str) -> list[str]:
    """State-dict keys of the weights ``group`` rounds in ``model`` (prunable layers never)."""
    template = detect_architecture(model)
    chosen = GROUPS[group]
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        family = template.family_of(name)
        if family in DEFAULT_FAMILIES or not chosen(family):
            continue
        if is_remainder_weight(f"{name}.weight", module.weight):
            out.append(f"{name}.weight")
    return out


def flux_group_params(group: str) -> int:
    """Weights of FLUX.1-dev's Linear layers in ``group``."""
    return rest_linear_params(SHAPES["flux"](), "flux", GROUPS[group])


@torch.no_grad()
def rounded(pipe: MiniFluxPipeline, group: str, remainder: str) -> MiniFluxPipeline:
    """A copy of ``pipe`` with ``group``'s weights rounded as ``remainder`` stores them."""
    model = copy.deepcopy(pipe.model)
    spec = remainder_spec(remainder)
    weights = dict(model.named_parameters())
    for key in group_keys(model, group):
        weights[key].copy_(fake_quantize(weights[key].detach(), spec, where=key))
    return MiniFluxPipeline(model, pipe.conditioner)


@dataclass
class RemainderRow:
    model: str
    group: str
    keys: int
    errors: dict[str, list[float]] = field(default_factory=dict)  # format -> per (half, seed)

    def mean(self, remainder: str) -> float:
        return float(np.mean(self.errors[remainder]))


def run_remainder(
    model: str, splits: Sequence[Sequence[int]] = SPLITS, eval_seeds: Sequence[int] = EVAL_SEEDS
) -> list[RemainderRow]:
    """One row per group of ``model``: its error with each remainder format, per half and seed."""
    pipe = load_bundled(model)
    rows = {g: RemainderRow(model, g, len(group_keys(pipe.model, g))) for g in GROUPS}
    for half in splits:
        seen, held = class_split(half, pipe.config.num_classes)
        evaluation = HeldOutEval.of(pipe, seen, held, eval_seeds)
        for group, row in rows.items():
            for remainder in FORMATS:
                scored = GenRow(model, 0.0, group)
                evaluation.score(rounded(pipe, group, remainder), scored)
                # one half's held-out classes are the other's seen ones: every class once a half
                row.errors.setdefault(remainder, []).extend(scored.held)
    return list(rows.values())


def write_remainder(rows: Sequence[RemainderRow], out_dir: Path, command: str) -> Path:
    columns = ["test-bed", "weights rounded", "layers"]
    columns += [f"{r} rel. MSE (share of every Linear's)" for r in FORMATS]
    columns += ["FLUX.1-dev weights", "FLUX.1-dev GB kept in bf16 instead of int3"]
    lines = table_head("The remainder: which weights its rounding hurts", command, __doc__, columns)
    int3 = remainder_spec("int3")
    per_weight = (int3.bits + 16 / int3.group_size) / 8
    for r in rows:
        every = next(x for x in rows if x.model == r.model and x.group == "every Linear")
        cells = [f"{r.mean(f):.5f} ({r.mean(f) / every.mean(f):.0%})" for f in FORMATS]
        params = flux_group_params(r.group)
        lines.append(
            f"| {r.model} | {r.group} | {r.keys} | "
            + " | ".join(cells)
            + f" | {params / 1e9:.3f}B | {params * (2 - per_weight) / 1e9:.3f} |"
        )
    lines += [
        "",
        "The errors do not add up exactly: the groups' errors interact through the sampler.",
    ]
    return write_report(out_dir, "remainder.md", "\n".join(lines))


__all__ = [
    "FORMATS",
    "GROUPS",
    "RemainderRow",
    "flux_group_params",
    "group_keys",
    "run_remainder",
    "write_remainder",
]
