"""Sparsity reports: per layer, per block, per family and for the whole model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .layers import ArchTemplate, detect_architecture, layer_block, layer_family, unwrap_diffusion_model
from .util.packing import PackedMask
from .util.selection import count_true

__all__ = ["LayerSparsity", "SparsityReport", "count_kept", "sparsity_report"]


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    family: str
    block: str
    numel: int
    pruned: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0

    @classmethod
    def of(cls, name: str, template: ArchTemplate, numel: int, kept: int) -> LayerSparsity:
        """Row for layer ``name``, its family and block read off ``template``."""
        return cls(
            name, layer_family(name, template) or "other", layer_block(name, template), numel, numel - kept
        )


def count_kept(keep: torch.Tensor | PackedMask) -> int:
    """Number of True entries of a bool or packed keep-mask, without an int64 copy of it."""
    return keep.kept() if isinstance(keep, PackedMask) else int(count_true(keep.reshape(1, -1)))


@dataclass(frozen=True)
class SparsityReport:
    """Counts of pruned weights. ``by("block")`` / ``by("family")`` aggregate; ``total`` sums all."""

    layers: tuple[LayerSparsity, ...]

    def by(self, key: str) -> dict[str, tuple[int, int]]:
        """``{block or family: (pruned, numel)}`` in first-seen order."""
        if key not in ("block", "family"):
            raise ValueError(f"group by 'block' or 'family', not {key!r}")
        out: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            group = getattr(layer, key)
            pruned, numel = out.get(group, (0, 0))
            out[group] = (pruned + layer.pruned, numel + layer.numel)
        return out

    @property
    def total(self) -> tuple[int, int]:
        return sum(x.pruned for x in self.layers), sum(x.numel for x in self.layers)

    @property
    def sparsity(self) -> float:
        pruned, numel = self.total
        return pruned / numel if numel else 0.0

    def to_text(self, *, per_layer: bool = False) -> str:
        """Plain-text table (what the Apply Pruning node shows)."""
        lines = []
        pruned, numel = self.total
        lines.append(
            f"pruned {pruned:,} of {numel:,} weights in {len(self.layers)} layers: {self.sparsity:.2%}"
        )
        for key in ("family", "block"):
            lines.append(f"by {key}:")
            for group, (p, n) in self.by(key).items():
                lines.append(f"  {group:<24} {p / n if n else 0:7.2%}  ({n:,} weights)")
        if per_layer:
            lines.append("by layer:")
            for x in self.layers:
                lines.append(f"  {x.name:<40} {x.sparsity:7.2%}  {x.numel:,}")
        return "\n".join(lines)


def sparsity_report(
    model: nn.Module | object,
    masks: Mapping[str, torch.Tensor | PackedMask] | None = None,
    *,
    layers: Mapping[str, nn.Linear] | None = None,
    template: ArchTemplate | None = None,
) -> SparsityReport:
    """Report from keep-masks (``masks``), or from the zeros in the weights of ``layers``."""
    module = unwrap_diffusion_model(model)
    template = template or detect_architecture(module)
    rows = []
    if masks is not None:
        for name, keep in masks.items():
            rows.append(LayerSparsity.of(name, template, keep.numel(), count_kept(keep)))
    else:
        if layers is None:
            raise ValueError("give masks, or the layers whose zeros to count")
        for name, layer in layers.items():
            w = layer.weight
            rows.append(LayerSparsity.of(name, template, w.numel(), count_kept(w != 0)))
    return SparsityReport(tuple(rows))
