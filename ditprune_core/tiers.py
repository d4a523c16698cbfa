"""Which ditprune file for which size or GPU: the held-out frontier's choice.

    python -m bench frontier   # measures every point, writes docs/bench/frontier.json (bench/frontier.py)
    python -m bench tiers      # reads frontier.json, writes vram_tiers.json/.md (bench/tiers.py)

The frontier benchmark writes every point it measured to ``frontier.json``: its settings, the bits
per weight of FLUX.1-dev's prunable layers in its format, and its held-out error on each MiniFlux
test-bed (relative MSE of final samples against dense on classes the calibration never saw). The
files Prune and Reconstruct + Save Pruned Model make (``reconstructed`` points: sparse or dense,
given the same OBS reconstruction) are the candidates. A candidate's file is its prunable layers
at their bits per weight plus the other parameters stored as the Save node's ``remainder`` says:
``keep`` or ``fp8`` for any point (the remainder's fp8 rounding measured free on MiniFlux:
docs/bench/lowbit.md), ``int4`` or ``int3`` only where the table measured that whole file
(``rest int4`` / ``rest int3`` points: :data:`WHOLE_FILE_REMAINDERS`).

:func:`choose_for_size` picks, for a file of at most N GB, the candidate with the least mean held-out
error over the test-beds that measured every point (ties: the smaller file); Prune and Reconstruct's
``target_file_gb`` uses it, for FLUX.1-dev or, scaled by parameter counts, any other model.
:func:`choose_tier` does the same for a GPU: the file whose loaded model fits the card **without
offloading**:

    file + largest decoded layer + ComfyUI's own inference reserve  <=  the card's memory

The reserve is what ComfyUI 0.3.64 keeps free before it loads a model fully: its activation
estimate for a FLUX latent (``BaseModel.memory_required``: area × 2 bytes × 0.01 × FLUX's
``memory_usage_factor`` 3.1 MiB, at 1024×1024) plus ``minimum_inference_memory`` (0.8 GiB and the
400 MiB ``EXTRA_RESERVED_VRAM`` of Linux). Text encoders are unloaded before sampling and do not
count. A smaller card still runs a larger file, with ComfyUI offloading part of it (slower).

A file that ComfyUI's own fp8 cast beats in both size and error is never chosen (every ComfyUI user
has that one already). Where the fp8 cast fits the card and has less error than the choice, the
tier's ``verdict`` is ``"fp8"``: the README says to use it, and no workflow is made for that tier.
Pure Python (json): the workflow generator and the nodes read it without torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FLUX_LARGEST_DECODED_BYTES",
    "TIERS_GIB",
    "WHOLE_FILE_REMAINDERS",
    "FileChoice",
    "TierChoice",
    "choice_models",
    "choose_for_size",
    "choose_tier",
    "choose_tiers",
    "comfy_reserve_bytes",
    "file_budget_gb",
    "file_candidates",
    "load_frontier",
]

GIB = 1 << 30
MIB = 1 << 20
#: :data:`ditprune_core.quantize.DEFAULT_GROUP_SIZE` (this module imports no torch; a test checks)
DEFAULT_GROUP_SIZE = 128
#: the remainders a whole-file point of the frontier table is measured with (its ``remainder_measured``)
WHOLE_FILE_REMAINDERS = ("int4", "int3")
#: the cards the shipped FLUX.1-dev workflows are made for (6 GB: the 4 GB file, below GGUF Q2_K's error)
TIERS_GIB = (6, 8, 12, 16)
#: FLUX.1-dev's largest prunable layer, ``single_blocks.N.linear1`` (21504 x 3072), decoded to bf16
FLUX_LARGEST_DECODED_BYTES = 21504 * 3072 * 2
#: ComfyUI 0.3.64: ``Flux.memory_usage_factor`` (comfy/supported_models.py) and
#: ``minimum_inference_memory`` = 0.8 GiB + ``EXTRA_RESERVED_VRAM`` 400 MiB (comfy/model_management.py)
FLUX_MEMORY_USAGE_FACTOR = 3.1
COMFY_MIN_INFERENCE_BYTES = int(0.8 * GIB) + 400 * MIB
#: the Save node's ``values`` choice for each kind of kept values (a model from Prune and
#: Reconstruct with value bits keeps its own codes whatever ``values`` says; int2 has no widget name)
SAVE_VALUES = {
    "bf16": "keep dtype",
    "fp8": "fp8_e4m3fn",
    "int4": "int4",
    "int3": "int3",
    "int2": "keep dtype",
}
FP8_CAST = "fp8 cast (ComfyUI)"


def comfy_reserve_bytes(width: int = 1024, height: int = 1024) -> int:
    """What ComfyUI keeps free for sampling FLUX at ``width`` x ``height`` (see module docstring)."""
    area = (width // 8) * (height // 8)  # one latent of 16 x H/8 x W/8, batch 1
    return int(area * 2 * 0.01 * FLUX_MEMORY_USAGE_FACTOR * MIB) + COMFY_MIN_INFERENCE_BYTES


def file_budget_gb(vram_gib: int) -> float:
    """The largest FLUX.1-dev file (GB, rounded down to 0.1) whose loaded model, plus its largest
    decoded layer and ComfyUI's reserve at 1024x1024, fits a ``vram_gib`` card without offloading."""
    free = vram_gib * GIB - FLUX_LARGEST_DECODED_BYTES - comfy_reserve_bytes()
    return math.floor(free / 1e8) / 10


def load_frontier(path: str | Path) -> dict[str, Any]:
    """The held-out frontier table as :mod:`bench.frontier` writes it (``frontier.json``)."""
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class FileChoice:
    """One file Prune and Reconstruct + Save Pruned Model make, and what it costs and gives.

    Attributes:
        point: the table's point (its name in docs/bench/frontier.md).
        sparsity, pattern, value_bits: Prune and Reconstruct's widgets (``value_bits`` None: "none").
        values, remainder: Save Pruned Model's widgets (format compressed).
        file_gb: the file, GB (FLUX.1-dev, or the model whose parameter counts were given).
        bits_per_weight: of the prunable layers (FLUX.1-dev's shapes).
        errors: test-bed -> held-out relative MSE of final samples against dense (MiniFlux).
        mean_error: the mean of ``errors`` over the test-beds the choice is made on.
        value_group: Prune and Reconstruct's ``value_group`` widget: values a scale covers.
        upgrade_layers: its mixed precision, ``PruneConfig.upgrade_layers`` (None: every layer at
            ``value_bits``).
        remainder_bits: ``PruneConfig.remainder_bits``: the remainder quantised by GPTQ when pruning
            (to the codes ``remainder`` stores); None: rounded to nearest when saved.
    """

    point: str
    sparsity: float
    pattern: str
    value_bits: int | None
    values: str
    remainder: str
    file_gb: float
    bits_per_weight: float
    errors: dict[str, float]
    mean_error: float
    value_group: int = field(default=DEFAULT_GROUP_SIZE, kw_only=True)
    upgrade_layers: str | None = field(default=None, kw_only=True)
    remainder_bits: int | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        bits = "values in the model's dtype" if self.value_bits is None else f"{self.value_bits}-bit values"
        if self.value_bits is not None and self.value_group != DEFAULT_GROUP_SIZE:
            bits += f" in groups of {self.value_group}"
        if self.upgrade_layers is not None:
            bits += f", the layers /{self.upgrade_layers}/ at 4 bits"
        if self.remainder_bits is not None:
            bits += f", the remainder quantised to {self.remainder_bits} bits by GPTQ"
        kind = f"{self.sparsity:.0%} sparsity" if self.sparsity > 0 else "no pruning (quantise only)"
        errors = ", ".join(f"{m} {e:.4f}" for m, e in self.errors.items())
        return (
            f"{self.point} ({kind}, {bits}; Save: values {self.values}, remainder {self.remainder}): "
            f"{self.file_gb:.3g} GB, {self.bits_per_weight:.2f} bits/weight in the pruned layers; held-out "
            f"error on MiniFlux {errors} (docs/bench/frontier.md)"
        )


def choice_models(table: dict[str, Any]) -> list[str]:
    """The test-beds that measured every point: the choice is made on their mean."""
    return [m for m in table["models"] if all(m in p["models"] for p in table["points"])]


def _point(table: dict[str, Any], name: str) -> dict[str, Any]:
    for p in table["points"]:
        if p["name"] == name:
            return p
    raise KeyError(f"{name!r} is not in the frontier table")


def _file_gb(table: dict[str, Any], point: dict[str, Any], remainder: str, prunable: int, rest: int) -> float:
    rest_bytes = table["rest_bytes_per_param"]["keep" if remainder == "keep" else remainder] * rest
    return (point["flux_bits_per_weight"] * prunable / 8 + rest_bytes) / 1e9


def file_candidates(
    table: dict[str, Any], prunable_params: int | None = None, rest_params: int | None = None
) -> list[FileChoice]:
    """Every file the nodes can make from the table's reconstructed points, with the remainders it
    measured (see the module docstring), for FLUX.1-dev or a model of these parameter counts."""
    prunable = prunable_params or table["flux_prunable_params"]
    rest = rest_params if rest_params is not None else table["flux_rest_params"]
    models = choice_models(table)
    out = []
    for p in table["points"]:
        if not p["reconstructed"]:
            continue
        whole = p["remainder_measured"] in WHOLE_FILE_REMAINDERS
        rests = [p["remainder_measured"]] if whole else ["keep", "fp8"]
        errors = {m: e["held"] for m, e in p["models"].items()}
        for remainder in rests:
            out.append(
                FileChoice(
                    point=p["name"] if remainder != "fp8" else f"{p['name']}, rest fp8",
                    sparsity=p["sparsity"],
                    pattern="unstructured",
                    value_bits=p["value_bits"],
                    value_group=p.get("value_group", DEFAULT_GROUP_SIZE),
                    upgrade_layers=p.get("upgrade_layers"),
                    remainder_bits=p.get("remainder_bits"),
                    values=SAVE_VALUES[p["values"]],
                    remainder=remainder,
                    file_gb=_file_gb(table, p, remainder, prunable, rest),
                    bits_per_weight=round(p["flux_bits_per_weight"], 3),
                    errors={m: round(e, 5) for m, e in errors.items()},
                    mean_error=sum(errors[m] for m in models) / len(models),
                )
            )
    return out


def _fp8(table: dict[str, Any]) -> tuple[float, dict[str, float], float]:
    """ComfyUI's fp8 cast: its FLUX.1-dev file GB (the rest fp8 too), errors, mean error."""
    fp8 = _point(table, FP8_CAST)
    errors = {m: e["held"] for m, e in fp8["models"].items()}
    models = choice_models(table)
    mean = sum(errors[m] for m in models) / len(models)
    return float(fp8["flux_gb"]["fp8"]), errors, mean


def choose_for_size(
    table: dict[str, Any],
    target_gb: float,
    prunable_params: int | None = None,
    rest_params: int | None = None,
    layer_names: Sequence[str] | None = None,
) -> FileChoice:
    """The least-error file of at most ``target_gb`` GB (ties: the smaller file), never one that
    ComfyUI's fp8 cast beats in both size and error. ``layer_names``: the model's selected layers;
    a file whose mixed precision (``upgrade_layers``) finds none of them is not a candidate (its
    names are another architecture's).

    Raises:
        ValueError: no file of the table is that small (naming the smallest, and its size).
    """
    candidates = [
        c
        for c in file_candidates(table, prunable_params, rest_params)
        if c.upgrade_layers is None
        or layer_names is None
        or any(re.search(c.upgrade_layers, name) for name in layer_names)
    ]
    if not candidates:
        raise ValueError("the frontier table has no reconstructed point; run python -m bench frontier")
    fp8_gb, _errors, fp8_mean = _fp8(table)
    if prunable_params is not None:  # the same fp8 file of this model
        fp8_gb *= (prunable_params + (rest_params or 0)) / (
            table["flux_prunable_params"] + table["flux_rest_params"]
        )
    fits = [
        c
        for c in candidates
        if c.file_gb <= target_gb and not (fp8_gb <= c.file_gb and fp8_mean <= c.mean_error)
    ]
    if not fits:
        smallest = min(candidates, key=lambda c: c.file_gb)
        raise ValueError(
            f"no ditprune file of the frontier table is at most {target_gb:g} GB: the smallest is "
            f"{smallest.point} at {smallest.file_gb:.3g} GB (docs/bench/frontier.md); ask for at least that"
        )
    return min(fits, key=lambda c: (c.mean_error, c.file_gb))


@dataclass(frozen=True)
class TierChoice(FileChoice):
    """The file one VRAM tier gets: :class:`FileChoice`'s fields (``file_gb`` rounded to 0.01), and

    Attributes:
        vram_gib: the card's memory.
        target_file_gb: :func:`file_budget_gb`: the size target that picks this file.
        vram_gb: file + largest decoded layer, GB: what Save Pruned Model reports for it.
        needs_gb: ``vram_gb`` + ComfyUI's reserve at 1024x1024, GB (at most the card's memory).
        fp8_gb, fp8_errors: ComfyUI's own fp8 cast, for comparison.
        fp8_fits: whether the fp8 cast fits the card without offloading.
        verdict: ``"ditprune"``, or ``"fp8"`` where the fp8 cast fits and has less error.
    """

    vram_gib: int
    target_file_gb: float
    vram_gb: float
    needs_gb: float
    fp8_gb: float
    fp8_errors: dict[str, float]
    fp8_fits: bool
    verdict: str


def choose_tier(table: dict[str, Any], vram_gib: int) -> TierChoice:
    """The least-error file that fits a ``vram_gib`` card without offloading (ties: the smaller).

    Raises:
        ValueError: no file of the table fits the card (naming the smallest and what it needs).
    """
    reserve = comfy_reserve_bytes()
    budget = vram_gib * GIB
    target = file_budget_gb(vram_gib)
    try:
        c = choose_for_size(table, target)
    except ValueError as exc:
        raise ValueError(
            f"no ditprune file of the frontier table fits {vram_gib} GiB without offloading: {exc}"
        ) from exc
    fp8_gb, fp8_errors, fp8_mean = _fp8(table)
    vram = c.file_gb * 1e9 + FLUX_LARGEST_DECODED_BYTES
    fp8_fits = fp8_gb * 1e9 + FLUX_LARGEST_DECODED_BYTES + reserve <= budget
    chosen = {**asdict(c), "file_gb": round(c.file_gb, 2), "mean_error": round(c.mean_error, 5)}
    return TierChoice(
        **chosen,
        vram_gib=vram_gib,
        target_file_gb=target,
        vram_gb=round(vram / 1e9, 2),
        needs_gb=round((vram + reserve) / 1e9, 2),
        fp8_gb=round(fp8_gb, 2),
        fp8_errors={m: round(e, 5) for m, e in fp8_errors.items()},
        fp8_fits=fp8_fits,
        verdict="fp8" if fp8_fits and fp8_mean < c.mean_error else "ditprune",
    )


def choose_tiers(table: dict[str, Any], tiers: tuple[int, ...] = TIERS_GIB) -> list[TierChoice]:
    return [choose_tier(table, gib) for gib in tiers]
