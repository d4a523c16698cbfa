"""Which ditprune setting for which GPU: the size–fidelity table's choice per VRAM tier.

    python -m bench tiers      # reads docs/bench/pareto.json, writes vram_tiers.json/.md (bench/tiers.py)

The size–fidelity benchmark (``bench/pareto.py``) writes every point it measured to ``pareto.json``:
its projected FLUX.1-dev file with the layers that stay dense stored as trained (bf16), fp8 or int4,
and its relative error on both MiniFlux models. For each tier this module picks, among the files
Prune and Reconstruct + Save Pruned Model make (``ditprune+OBS`` points with block refinement), the
one with the least mean relative error whose loaded model fits the card **without offloading**:

    file + largest decoded layer + ComfyUI's own inference reserve  <=  the card's memory

The reserve is what ComfyUI 0.3.64 keeps free before it loads a model fully: its activation
estimate for a FLUX latent (``BaseModel.memory_required``: area × 2 bytes × 0.01 × FLUX's
``memory_usage_factor`` 3.1 MiB, at 1024×1024) plus ``minimum_inference_memory`` (0.8 GiB and the
400 MiB ``EXTRA_RESERVED_VRAM`` of Linux). Text encoders are unloaded before sampling and do not
count. A smaller card still runs a larger file, with ComfyUI offloading part of it (slower).

A file that ComfyUI's own fp8 cast beats in both size and error is never chosen (every ComfyUI user
has that one already). Where the fp8 cast fits the card and has less error than the choice, the
tier's ``verdict`` is ``"fp8"``: the README says to use it, and no workflow is made for that tier.

Remainder choices: ``as trained`` points are offered with the remainder kept (bf16) or in fp8
(measured free on MiniFlux: docs/bench/lowbit.md); int4 remainders only where the table measured
their error (the ``rest int4`` points). Pure Python (json): the workflow generator and the tests
read it without torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FLUX_LARGEST_DECODED_BYTES",
    "TIERS_GIB",
    "TierChoice",
    "choose_tier",
    "choose_tiers",
    "comfy_reserve_bytes",
    "load_pareto",
    "parse_setting",
]

GIB = 1 << 30
MIB = 1 << 20
#: the cards the shipped FLUX.1-dev workflows are made for
TIERS_GIB = (8, 12, 16)
#: FLUX.1-dev's largest prunable layer, ``single_blocks.N.linear1`` (21504 x 3072), decoded to bf16
FLUX_LARGEST_DECODED_BYTES = 21504 * 3072 * 2
#: ComfyUI 0.3.64: ``Flux.memory_usage_factor`` (comfy/supported_models.py) and
#: ``minimum_inference_memory`` = 0.8 GiB + ``EXTRA_RESERVED_VRAM`` 400 MiB (comfy/model_management.py)
FLUX_MEMORY_USAGE_FACTOR = 3.1
COMFY_MIN_INFERENCE_BYTES = int(0.8 * GIB) + 400 * MIB
#: the Save node's remainder choice for each column of the table
REMAINDER_COLUMNS = {"keep": "rest_bf16", "fp8": "rest_fp8", "int4": "rest_int4"}
#: the Save node's ``values`` choice for each kind of kept values
SAVE_VALUES = {"bf16": "keep dtype", "fp8": "fp8_e4m3fn", "int4": "int4", "int3": "int3"}

_SETTING = re.compile(
    r"^ditprune(?P<obs>\+OBS)? (?:(?P<pct>\d+)%|(?P<nm>\d+:\d+)) \+ "
    r"(?:(?P<dtype>bf16|fp8)|(?P<bits>\d)-bit g(?P<group>\d+) (?P<sym>a?sym))"
    r"(?P<norefine> \(no block refinement\))?(?P<rest>, rest int4)?$"
)


def comfy_reserve_bytes(width: int = 1024, height: int = 1024) -> int:
    """What ComfyUI keeps free for sampling FLUX at ``width`` x ``height`` (see module docstring)."""
    area = (width // 8) * (height // 8)  # one latent of 16 x H/8 x W/8, batch 1
    return int(area * 2 * 0.01 * FLUX_MEMORY_USAGE_FACTOR * MIB) + COMFY_MIN_INFERENCE_BYTES


def parse_setting(name: str) -> dict[str, Any] | None:
    """The settings of a ditprune point from its name in the table, or None for other points.

    ``"ditprune+OBS 52% + 4-bit g128 asym, rest int4"`` -> ``{"reconstruct": True, "sparsity": 0.52,
    "pattern": "unstructured", "values": "int4", "value_bits": 4, "block_refine": True,
    "rest_measured": "int4"}``.
    """
    m = _SETTING.match(name)
    if m is None:
        return None
    bits = int(m["bits"]) if m["bits"] else None
    kept, group = m["nm"].split(":") if m["nm"] else ("0", "1")
    return {
        "reconstruct": bool(m["obs"]),
        "sparsity": int(m["pct"]) / 100 if m["pct"] else 1 - int(kept) / int(group),
        "pattern": "unstructured" if m["pct"] else m["nm"],
        "values": m["dtype"] or f"int{bits}",
        "value_bits": bits,
        "block_refine": not m["norefine"],
        "rest_measured": "int4" if m["rest"] else "as trained",
    }


def load_pareto(path: str | Path) -> dict[str, Any]:
    """The size–fidelity table as :mod:`.pareto` writes it (``pareto.json``)."""
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class TierChoice:
    """The setting one VRAM tier gets, and what it costs and gives.

    Attributes:
        vram_gib: the card's memory.
        point: the table's point (its name in docs/bench/pareto.md).
        sparsity, pattern, value_bits: Prune and Reconstruct's widgets (``value_bits`` None: "none").
        values, remainder: Save Pruned Model's widgets (format compressed).
        file_gb: the projected FLUX.1-dev file, GB.
        vram_gb: file + largest decoded layer, GB: what Save Pruned Model reports for it.
        needs_gb: ``vram_gb`` + ComfyUI's reserve at 1024x1024, GB (at most the card's memory).
        bits_per_weight: of the prunable layers, on FLUX.1-dev's shapes.
        errors: model -> mean relative error of final samples against dense (MiniFlux).
        fp8_gb, fp8_errors: ComfyUI's own fp8 cast, for comparison.
        fp8_fits: whether the fp8 cast fits the card without offloading.
        verdict: ``"ditprune"``, or ``"fp8"`` where the fp8 cast fits and has less error.
    """

    vram_gib: int
    point: str
    sparsity: float
    pattern: str
    value_bits: int | None
    values: str
    remainder: str
    file_gb: float
    vram_gb: float
    needs_gb: float
    bits_per_weight: float
    errors: dict[str, float]
    fp8_gb: float
    fp8_errors: dict[str, float]
    fp8_fits: bool
    verdict: str

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidates(table: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, float, dict[str, float]]]:
    """(point, settings, remainder, file GB, errors by model) of every file the workflows can make."""
    models = list(table["models"])
    first = table["models"][models[0]]
    out = []
    for point in first:
        setting = parse_setting(point["name"])
        if setting is None or not setting["reconstruct"] or not setting["block_refine"]:
            continue
        errors = {m: _get(table, m, point["name"])["rel_err"] for m in models}
        rests = ["int4"] if setting["rest_measured"] == "int4" else ["keep", "fp8"]
        for rest in rests:
            out.append((point["name"], setting, rest, point["flux_gb"][REMAINDER_COLUMNS[rest]], errors))
    return out


def _get(table: dict[str, Any], model: str, name: str) -> dict[str, Any]:
    for point in table["models"][model]:
        if point["name"] == name:
            return point
    raise KeyError(f"{name!r} is not in the size–fidelity table of {model}")


def choose_tier(table: dict[str, Any], vram_gib: int) -> TierChoice:
    """The least-error workflow file that fits a ``vram_gib`` card without offloading (ties: the
    smaller file).

    Raises:
        ValueError: no file of the table fits the card (naming the smallest and what it needs).
    """
    reserve = comfy_reserve_bytes()
    budget = vram_gib * GIB
    models = list(table["models"])
    fp8 = _get(table, models[0], "fp8 cast (ComfyUI)")
    fp8_gb = fp8["flux_gb"]["rest_fp8"]
    fp8_errors = {m: _get(table, m, fp8["name"])["rel_err"] for m in models}
    fp8_mean = sum(fp8_errors.values()) / len(fp8_errors)
    fits = []
    for name, setting, rest, file_gb, errors in _candidates(table):
        needs = file_gb * 1e9 + FLUX_LARGEST_DECODED_BYTES + reserve
        mean = sum(errors.values()) / len(errors)
        if needs <= budget and not (fp8_gb <= file_gb and fp8_mean <= mean):
            fits.append((mean, file_gb, name, setting, rest, errors))
    if not fits:
        raise ValueError(
            f"no ditprune file of the size–fidelity table fits {vram_gib} GiB without offloading"
        )
    err, file_gb, name, setting, rest, errors = min(fits, key=lambda f: (f[0], f[1]))
    vram = file_gb * 1e9 + FLUX_LARGEST_DECODED_BYTES
    fp8_fits = fp8_gb * 1e9 + FLUX_LARGEST_DECODED_BYTES + reserve <= budget
    return TierChoice(
        vram_gib=vram_gib,
        point=name if rest != "fp8" else f"{name}, rest fp8",
        sparsity=setting["sparsity"],
        pattern=setting["pattern"],
        value_bits=setting["value_bits"],
        values=SAVE_VALUES[setting["values"]],
        remainder=rest,
        file_gb=round(file_gb, 2),
        vram_gb=round(vram / 1e9, 2),
        needs_gb=round((vram + reserve) / 1e9, 2),
        bits_per_weight=round(_get(table, models[0], name)["flux_bits_per_weight"], 3),
        errors={m: round(e, 4) for m, e in errors.items()},
        fp8_gb=round(fp8_gb, 2),
        fp8_errors={m: round(e, 4) for m, e in fp8_errors.items()},
        fp8_fits=fp8_fits,
        verdict="fp8" if fp8_fits and fp8_mean < err else "ditprune",
    )


def choose_tiers(table: dict[str, Any], tiers: tuple[int, ...] = TIERS_GIB) -> list[TierChoice]:
    return [choose_tier(table, gib) for gib in tiers]
