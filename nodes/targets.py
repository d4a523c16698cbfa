"""The size target: Prune and Reconstruct's ``target_file_gb`` picks the held-out frontier's file for
a size (docs/bench/frontier.json, :func:`ditprune_core.tiers.choose_for_size`), and Save Pruned
Model's ``size target`` values / remainder store it as chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from comfy.model_patcher import ModelPatcher

from ..ditprune_core import PruneConfig
from ..ditprune_core.config import chosen_families
from ..ditprune_core.prune import select_layers
from ..ditprune_core.tiers import (
    FLUX_LARGEST_DECODED_BYTES,
    GIB,
    FileChoice,
    choose_for_size,
    comfy_reserve_bytes,
    file_candidates,
    load_frontier,
)

#: the held-out frontier table (python -m bench frontier); the per-GPU workflows come from it too
FRONTIER_FILE = Path(__file__).resolve().parents[1] / "docs" / "bench" / "frontier.json"
#: Save Pruned Model's choice that takes values / remainder from the size target
FROM_TARGET = "size target"


def _advice(path: Path = FRONTIER_FILE) -> str:
    """The file budget of each card, and the smallest file the table offers (FLUX.1-dev)."""
    try:
        table = load_frontier(path)
        smallest = min(file_candidates(table), key=lambda c: c.file_gb)
    except (OSError, ValueError, KeyError):
        return "The table: docs/bench/frontier.md (python -m bench frontier)."
    cards = ", ".join(
        f"{gib} GB card: {(gib * GIB - FLUX_LARGEST_DECODED_BYTES - comfy_reserve_bytes()) / 1e9:.1f}"
        for gib in (8, 12, 16, 24)
    )
    return (
        f"FLUX.1-dev file sizes that load without offloading (GB): {cards}. The smallest file the table "
        f"offers: {smallest.file_gb:.2f} GB ({smallest.point})."
    )


TARGET_TOOLTIP = (
    "0: use sparsity, pattern and value bits above. A size in GB: the file of at most that size with "
    "the least held-out error in docs/bench/frontier.md (dense quantise-only or sparse, whichever the "
    "table says wins there) replaces those three widgets; set Save Pruned Model's values and remainder "
    "to 'size target' to store it as chosen. Sizes are of this model's file (FLUX.1-dev's, or scaled by "
    "this model's parameter counts); errors were measured on MiniFlux, on prompts the calibration never "
    "saw. " + _advice()
)


def size_target_choice(
    dm: torch.nn.Module,
    target_gb: float,
    attention: bool,
    mlp: bool,
    single_fused: bool,
    modulation: bool,
    path: Path = FRONTIER_FILE,
) -> FileChoice:
    """The frontier's file of at most ``target_gb`` GB for this model (its prunable layers as the
    family widgets select them, the rest stored as the choice's remainder).

    Raises:
        ValueError: the table is missing, or no file of it is that small (naming the smallest).
    """
    try:
        table = load_frontier(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"target_file_gb needs the frontier table {path}, which this install cannot read ({exc}); "
            "set target_file_gb to 0 and choose sparsity and value bits yourself"
        ) from exc
    chosen = {"attention": attention, "mlp": mlp, "single_fused": single_fused, "modulation": modulation}
    layers = select_layers(dm, PruneConfig(0.5, families=chosen_families(chosen)))
    prunable = sum(layer.weight.numel() for layer in layers.values())
    total = sum(p.numel() for p in dm.parameters())
    if prunable == 0:
        raise ValueError("target_file_gb: the family widgets select no layer of this model; turn one on")
    try:
        return choose_for_size(table, target_gb, prunable, total - prunable, layer_names=list(layers))
    except ValueError as exc:
        raise ValueError(f"target_file_gb {target_gb:g}: {exc}") from exc


def resolve_from_target(model: ModelPatcher, format: str, values: str, remainder: str) -> tuple[str, str]:
    """Save Pruned Model's ``values`` and ``remainder``, with ``size target`` replaced by what Prune
    and Reconstruct's size target chose.

    Raises:
        ValueError: ``size target`` asked of a model without one, or with format dense.
    """
    if FROM_TARGET not in (values, remainder):
        return values, remainder
    target: dict[str, Any] | None = model.model_options.get("ditprune", {}).get("size_target")
    if target is None:
        raise ValueError(
            "values or remainder 'size target' needs a model from DiT-Pruning Prune and Reconstruct with "
            "target_file_gb above 0 (this model has no size target); choose values and remainder yourself"
        )
    if format != "compressed":
        raise ValueError(
            f"the size target ({target['gb']:g} GB) is met only by a compressed file; choose format 'compressed'"
        )
    return (
        target["values"] if values == FROM_TARGET else values,
        target["remainder"] if remainder == FROM_TARGET else remainder,
    )
