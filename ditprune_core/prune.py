"""Prune: the streaming driver over a model's layers (mask-only pruning).

For every layer that :func:`select_layers` picks, in the model's module order, the driver runs the
per-layer engine :func:`~ditprune_core.mask.layer_keep_mask`, which clusters (cluster granularity
only), scores and selects; then it yields, collects or applies that one mask before the next layer
is touched. The calibration statistics are checked against the layers once, before the first layer.
At any moment only one layer's scores and mask exist beside the model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import ProgressFn, PruneConfig
from .layers import (
    ArchTemplate,
    detect_architecture,
    find_prunable_layers,
    unwrap_diffusion_model,
)
from .mask import layer_keep_mask
from .quantize import (
    QuantizedWeight,
    QuantSpec,
    dequantize_weight,
    quantize_weight,
)
from .report import LayerSparsity, SparsityReport, count_kept
from .score import missing_calibration
from .stats import CalibrationStats, WeightFn, module_weight
from .util.dtypes import zero_where_
from .util.packing import PackedMask

__all__ = [
    "PruneTarget",
    "apply_masks_",
    "check_untied",
    "compute_masks",
    "iter_masks",
    "prune_model_",
    "quantize_kept_",
    "select_layers",
]

log = logging.getLogger("ditprune")


@dataclass(frozen=True)
class PruneTarget:
    """A model resolved once for a config: its DiT module, architecture and the selected layers.

    Resolving unwraps the ComfyUI MODEL and detects the architecture; callers that need the module,
    the template and the layers (the Apply node: masks, then the report) resolve once and pass this
    down instead of repeating it.
    """

    module: nn.Module
    template: ArchTemplate
    layers: dict[str, nn.Linear]

    @classmethod
    def of(cls, model: nn.Module | object, config: PruneConfig) -> PruneTarget:
        """Resolve ``model`` (a DiT, a ComfyUI MODEL, or a target already) for ``config``.

        Raises:
            UnsupportedModelError: the model is not a supported DiT.
            ValueError: no layer matches the config's families and ``layer_regex``.
        """
        if isinstance(model, PruneTarget):
            return model
        module = unwrap_diffusion_model(model)
        template = detect_architecture(module)
        layers = select_layers(module, config)
        if not layers:
            raise ValueError(
                f"no layer of families {list(config.families)} matches (layer_regex={config.layer_regex!r})"
            )
        check_untied(layers)
        return cls(module, template, layers)


def _weight_identity(weight: torch.Tensor) -> tuple[object, ...]:
    if weight.device.type == "meta" or weight.numel() == 0:
        return (id(weight),)
    return (weight.device, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype)


def check_untied(layers: Mapping[str, nn.Module]) -> None:
    """Refuse layers that share one weight tensor (tied weights).

    Each layer is pruned (and reconstructed) for its own inputs and written in place, so the second
    write of a shared weight would silently replace the first, and neither layer would keep what was
    computed for it.

    Raises:
        ValueError: naming both layers and how to go on.
    """
    seen: dict[tuple[object, ...], str] = {}
    for name, layer in layers.items():
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        key = _weight_identity(weight)
        first = seen.setdefault(key, name)
        if first != name:
            raise ValueError(
                f"layers {first!r} and {name!r} share one weight tensor (tied weights): each would be "
                "pruned for its own inputs and the second write would replace the first. Leave one of "
                "them out (layer_regex or filter_fn), or untie them (give each its own copy of the "
                "weight) before pruning"
            )


def select_layers(model: nn.Module | object, config: PruneConfig) -> dict[str, nn.Linear]:
    """The layers ``config`` prunes in ``model``, ``{name: layer}`` in module order."""
    pattern = re.compile(config.layer_regex) if config.layer_regex else None

    def keep(module: nn.Module, name: str) -> bool:
        if pattern is not None and not pattern.search(name):
            return False
        return config.filter_fn(module, name) if config.filter_fn is not None else True

    return find_prunable_layers(model, families=config.families, filter_fn=keep)


def iter_masks(
    model: nn.Module | object,
    stats: CalibrationStats | None,
    config: PruneConfig,
    *,
    progress: ProgressFn | None = None,
    weight_fn: WeightFn = module_weight,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, keep_mask)`` one layer at a time: at most one layer's scores exist at once.

    ``model`` is a DiT, a ComfyUI MODEL or a :class:`PruneTarget`. ``weight_fn(name, layer)`` gives
    the weight to score (default: ``layer.weight``); a host that keeps original weights elsewhere
    (ComfyUI while a patched clone is loaded) passes its own. Each layer's weight is made once: the
    calibration's names and shapes are checked before the first layer, and each layer's weight
    fingerprint on the very tensor that is scored, before its mask is yielded.

    Raises:
        CalibrationError: the metric needs statistics and ``stats`` is None or does not match.
    """
    if config.update != "none":
        raise ValueError(
            f"update={config.update!r} updates the kept weights from each layer's input Gram, which "
            "only sequential calibration passes provide: use prune_sequential_(model, run_calibration, "
            "config) (in ComfyUI: the Prune and Reconstruct node)"
        )
    if config.quantize_only:
        raise ValueError(
            "sparsity 0 (quantise only) prunes nothing, so there is no mask to compute: quantise with "
            "prune_sequential_(model, run_calibration, config) (in ComfyUI: Prune and Reconstruct with "
            "sparsity 0 and value bits), or give a sparsity in (0, 1)"
        )
    target = PruneTarget.of(model, config)
    if config.needs_calibration:
        if stats is None:
            raise missing_calibration(config.metric)
        stats.validate_for(target.layers, weights=False)
    for i, (name, layer) in enumerate(target.layers.items()):
        weight = weight_fn(name, layer).detach()
        a = None
        if stats is not None and name in stats:
            if config.needs_calibration:
                stats.check_weight(name, weight)
            a = stats[name].activation_sq_mean
        with torch.no_grad():
            keep = layer_keep_mask(name, weight, a, config)
        del weight
        if progress is not None:
            progress(i + 1, len(target.layers), name)
        yield name, keep


def compute_masks(
    model: nn.Module | object,
    stats: CalibrationStats | None,
    config: PruneConfig,
    *,
    progress: ProgressFn | None = None,
    packed: bool = False,
) -> dict[str, torch.Tensor] | dict[str, PackedMask]:
    """``{layer name: keep-mask (out, in)}`` for every layer ``config`` selects.

    Scores are computed and dropped one layer at a time; only the masks are kept: bool tensors, or
    with ``packed=True`` :class:`~ditprune_core.util.packing.PackedMask` (1 bit per weight), which is
    what a 12B model needs.
    """
    if packed:
        return {
            name: PackedMask.from_bool(keep)
            for name, keep in iter_masks(model, stats, config, progress=progress)
        }
    return dict(iter_masks(model, stats, config, progress=progress))


MaskLike = torch.Tensor | PackedMask


def _as_bool(keep: MaskLike, device: torch.device) -> torch.Tensor:
    return keep.to_bool(device) if isinstance(keep, PackedMask) else keep.to(device)


def apply_masks_(model: nn.Module | object, masks: Mapping[str, MaskLike]) -> None:
    """Zero, in place, the weights whose mask entry is False (bool or packed masks).

    Raises:
        KeyError: a mask names a layer the model lacks.
        ValueError: a mask's shape differs from its layer's weight.
    """
    module = unwrap_diffusion_model(model)
    named = dict(module.named_modules())
    for name, keep in masks.items():
        layer = named.get(name)
        if not isinstance(layer, nn.Linear):
            raise KeyError(f"mask for {name!r}, but the model has no Linear layer of that name")
        if tuple(keep.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(keep.shape)}, the weight {tuple(layer.weight.shape)}"
            )
    with torch.no_grad():
        for name, keep in masks.items():
            weight = named[name].weight
            zero_where_(weight, ~_as_bool(keep, weight.device))


def prune_model_(
    model: nn.Module | object,
    stats: CalibrationStats | None,
    config: PruneConfig,
    *,
    progress: ProgressFn | None = None,
) -> SparsityReport:
    """Compute each layer's mask and zero its weights at once, in place (streaming).

    At any moment only one layer's scores and mask exist beside the model, so this is how a
    FLUX.1-dev-sized model is pruned in bounded memory. Returns the sparsity report.

    Raises:
        ValueError: ``config.value_bits`` is set: the codes must be kept beside the model, which
            this function cannot return; use :func:`prune_sequential_` (its report holds them) or
            :func:`compute_masks`, :func:`apply_masks_` and :func:`quantize_kept_`.
    """
    if config.value_bits is not None:
        raise ValueError(
            f"value_bits={config.value_bits} quantises the kept values, whose codes prune_model_ cannot "
            "return: use prune_sequential_(model, run_calibration, config) (report.quantized holds them), "
            "or compute_masks + apply_masks_ + quantize_kept_"
        )
    target = PruneTarget.of(model, config)
    if config.needs_calibration and stats is not None:
        stats.validate_for(target.layers)  # every fingerprint before anything changes in place
    rows = []
    with torch.no_grad():
        for name, keep in iter_masks(target, stats, config, progress=progress):
            zero_where_(target.layers[name].weight, ~keep)
            rows.append(LayerSparsity.of(name, target.template, keep.numel(), count_kept(keep)))
            del keep
    return SparsityReport(tuple(rows))


def quantize_kept_(
    model: nn.Module | object, masks: Mapping[str, MaskLike], spec: QuantSpec
) -> dict[str, QuantizedWeight]:
    """Round the kept values of each masked layer to nearest, in place (the mask-only path).

    After :func:`apply_masks_`: each layer's weight becomes exactly its dequantised kept values in
    the weight's dtype (``dequantize_weight(q, weight.dtype)``), zeros elsewhere.

    Args:
        model: a DiT or ComfyUI MODEL.
        masks: ``{layer name: keep-mask (out, in)}`` (bool or packed), as :func:`compute_masks` gives.
        spec: the codes' :class:`~ditprune_core.quantize.QuantSpec` (e.g. ``config.value_quant``).
    Returns:
        ``{layer name: QuantizedWeight}`` (on the weights' devices).
    Raises:
        KeyError / ValueError: as :func:`apply_masks_`.
    """
    module = unwrap_diffusion_model(model)
    named = dict(module.named_modules())
    for name, mask in masks.items():  # every mask checked before any weight changes
        layer = named.get(name)
        if not isinstance(layer, nn.Linear):
            raise KeyError(f"mask for {name!r}, but the model has no Linear layer of that name")
        if tuple(mask.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(layer.weight.shape)}"
            )
    out: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        for name, mask in masks.items():
            weight = named[name].weight
            keep = _as_bool(mask, weight.device)
            q = quantize_weight(weight.float() * keep, spec, keep=keep, where=name)
            weight.copy_(dequantize_weight(q, weight.dtype, check=False))
            out[name] = q
    return out
