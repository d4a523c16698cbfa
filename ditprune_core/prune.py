"""Prune: the streaming driver over a model's layers (mask-only pruning).

For every layer that :func:`select_layers` picks, in the model's module order, the driver runs the
per-layer engine :func:`~ditprune_core.mask.layer_keep_mask`, which clusters (cluster granularity
only), scores and selects; then it yields, collects or applies that one mask before the next layer
is touched. The calibration statistics are checked against the layers once, before the first layer.
At any moment only one layer's scores and mask exist beside the model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .calibrate import Calibrator, TimestepWeighting
from .config import ProgressFn, PruneConfig, parse_pattern
from .layers import (
    ArchTemplate,
    detect_architecture,
    find_prunable_layers,
    layer_block,
    unwrap_diffusion_model,
)
from .layouts import choose_layout
from .mask import layer_keep_mask
from .quantize import (
    QuantizedWeight,
    QuantSpec,
    StorageCost,
    dequantize_weight,
    quantize_weight,
    quantized_storage_cost,
    storage_cost,
)
from .reconstruct import (
    LayerReconstruction,
    allocate_block_counts,
    plan_groups,
    quantize_layer,
    reconstruct_layer,
    relative_output_error,
)
from .refine import BlockCallRecorder, BlockRefinement, refine_block_
from .report import LayerSparsity, SparsityReport, count_kept
from .score import missing_calibration
from .stats import CalibrationError, CalibrationStats, GramAccumulator, WeightFn, module_weight
from .util.dtypes import storage_view, zero_where_
from .util.packing import PackedMask

__all__ = [
    "PassReport",
    "PruneTarget",
    "SequentialReport",
    "apply_masks_",
    "compute_masks",
    "default_memory_budget",
    "iter_masks",
    "prune_model_",
    "prune_sequential_",
    "quantize_kept_",
    "select_layers",
    "unquantized_storage_cost",
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


def unquantized_storage_cost(weight: torch.Tensor) -> StorageCost:
    """Bytes of a pruned weight (zeros where pruned) in the default compressed save, values in its
    own dtype: the layout :func:`~ditprune_core.layouts.choose_layout` picks, or dense if none."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    layout = choose_layout(weight, None)
    if layout is None:
        return storage_cost(shape, weight.dtype)
    return storage_cost(shape, weight.dtype, layout=layout.name, kept=storage_view(weight) != 0)


#: ``run_calibration(calibrator)``: runs the user's sampler or forward passes through the model
RunCalibration = Callable[[Calibrator], object]
#: ``write(name, layer, new_weight, keep_mask, quantized)``: where a reconstructed weight goes
#: (default: into ``layer.weight`` in place; a host that must not change shared weights, like
#: ComfyUI, patches). ``quantized`` is the layer's QuantizedWeight (``value_bits``) or None;
#: ``new_weight`` is then exactly its dequantisation in the layer's dtype.
WriteFn = Callable[[str, nn.Linear, torch.Tensor, torch.Tensor, QuantizedWeight | None], None]
_GIB = 1 << 30


@dataclass(frozen=True)
class PassReport:
    """One sequential pass: its layers, the bytes of their Grams, and its seconds."""

    layers: tuple[str, ...]
    gram_bytes: int
    seconds: float


@dataclass(frozen=True)
class SequentialReport:
    """What :func:`prune_sequential_` did, per layer and per pass, and the sparsity report.

    Attributes:
        bits_per_weight: storage of the pruned layers per original weight, as the compressed writer
            stores them (mask, values, scales, zero points, per-row data, shapes): quantised kept values
            in their :func:`~ditprune_core.quantize.value_layout`, else the kept values in the model's
            dtype in the layout the default compressed save picks (:func:`unquantized_storage_cost`).
        quantized: ``{layer name: QuantizedWeight}`` (on the CPU) of every pruned layer with
            ``value_bits``; empty without, or when ``prune_sequential_(collect_quantized=False)``.
    """

    layers: tuple[LayerReconstruction, ...]
    passes: tuple[PassReport, ...]
    sparsity: SparsityReport
    memory_budget_bytes: int
    bits_per_weight: float = 0.0
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    blocks: tuple[BlockRefinement, ...] = ()

    def to_text(self) -> str:
        lines = [
            f"{len(self.passes)} pass(es), {len(self.layers)} layers, Gram budget "
            f"{self.memory_budget_bytes / _GIB:.2f} GiB; sparsity {self.sparsity.sparsity:.2%}, "
            f"{self.bits_per_weight:.3f} bits per weight stored",
        ]
        for p in self.passes:
            lines.append(
                f"  pass of {len(p.layers)} layers: {p.gram_bytes / _GIB:.2f} GiB of Grams, {p.seconds:.1f} s"
            )
        for b in self.blocks:
            reverted = " (worse: put back)" if b.reverted else ""
            lines.append(
                f"  block {b.block} refined: output error {b.error_before:.4g} -> {b.error_after:.4g}"
                f"{reverted}, {b.calls} calls, {b.steps} steps, {b.seconds:.1f} s"
            )
        for r in self.layers:
            quantised = "" if r.unquantized_error is None else f", unquantised {r.unquantized_error:.4g}"
            lines.append(
                f"  {r.name}: sparsity {r.sparsity:.2%}, output error {r.output_error:.4g} "
                f"(mask only {r.mask_only_error:.4g}{quantised}), {r.seconds:.2f} s"
            )
        return "\n".join(lines)


def default_memory_budget(layers: Mapping[str, nn.Linear]) -> int:
    """The Gram budget when none is given: a quarter of the memory available now (RAM, or free
    memory of the layers' CUDA device), at most 8 GiB, and never less than the largest single
    layer's Gram (which must fit either way)."""
    largest = max(GramAccumulator.nbytes(layer.in_features) for layer in layers.values())
    device = next(iter(layers.values())).weight.device
    available = 4 * _GIB
    if device.type == "cuda" and torch.cuda.is_available():
        available = int(torch.cuda.mem_get_info(device)[0])
    else:
        with contextlib.suppress(ValueError, OSError, AttributeError):  # no sysconf: keep 4 GiB
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(largest, min(8 * _GIB, available // 4))


def _write_in_place(
    _name: str,
    layer: nn.Linear,
    new_weight: torch.Tensor,
    _keep: torch.Tensor,
    _quantized: QuantizedWeight | None,
) -> None:
    with torch.no_grad():
        layer.weight.copy_(new_weight.to(layer.weight.dtype))


def _block_counts(
    target: PruneTarget, group: list[str], cal: Calibrator, config: PruneConfig, weight_fn: WeightFn
) -> dict[str, int]:
    """Prune counts of the group's layers under ``reconstruct.allocation="block"`` (else empty)."""
    params = config.reconstruct
    if config.update != "obs" or params.allocation != "block" or parse_pattern(config.pattern) is not None:
        return {}
    blocks: dict[str, list[str]] = {}
    for name in group:
        blocks.setdefault(layer_block(name, target.template), []).append(name)
    counts: dict[str, int] = {}
    for names in blocks.values():
        if len(names) < 2:
            continue
        layers = {n: (weight_fn(n, target.layers[n]).detach(), cal.gram(n)) for n in names}
        counts.update(allocate_block_counts(layers, float(config.sparsity), spread=params.allocation_spread))
    return counts


def prune_sequential_(
    model: nn.Module | object,
    run_calibration: RunCalibration,
    config: PruneConfig,
    *,
    memory_budget_bytes: int | None = None,
    weighting: str | TimestepWeighting = "uniform",
    progress: ProgressFn | None = None,
    weight_fn: WeightFn = module_weight,
    write_fn: WriteFn = _write_in_place,
    collect_quantized: bool = True,
    on_phase: Callable[[str], None] | None = None,
) -> SequentialReport:
    """Prune with reconstruction, in sequential passes whose Grams fit a memory budget.

    The selected layers, in forward (module) order, are split into consecutive groups whose input
    Grams (``in_features² × 4`` bytes each) fit ``memory_budget_bytes``. For each group in turn:
    a :class:`~ditprune_core.calibrate.Calibrator` records the group's Grams (and ``E[x²]``) while
    ``run_calibration(cal)`` runs the model (it may call ``cal.on_step(sigma)`` for timestep
    weighting); then every layer of the group is pruned and its kept weights updated
    (:func:`~ditprune_core.reconstruct.reconstruct_layer`), one at a time, and its Gram freed.
    With ``reconstruct.allocation="block"`` (the default of ``update="obs"``, unstructured only), the
    layers of one transformer block within a pass first share the block's prune count
    (:func:`~ditprune_core.reconstruct.allocate_block_counts`): the block's sparsity is exact, its
    layers' sparsities differ.
    Earlier groups are already pruned and updated when later ones calibrate, so each layer
    compensates the error upstream of it (SparseGPT's sequential mode, OBS-Diff's module packages).

    With ``reconstruct.block_refine_steps > 0`` (block refinement, :mod:`~ditprune_core.refine`),
    after a pass's layers are reconstructed, each transformer block of the pass in turn gets one
    more ``run_calibration`` that records the block's calls on the model as it is now (the blocks
    before it pruned and refined), then its layers' kept weights are fitted together so that the
    block's output matches the dense block's on those calls, masks fixed; only then are its layers
    written (``write_fn`` is still called once per layer). The layers' reported output errors are
    those before refinement; ``report.blocks`` has each block's error before and after.

    With ``config.update == "none"`` the passes still run (each layer then gets the config's mask on
    the calibrated model upstream of it) but no weight is updated.

    With ``config.value_bits`` every pruned layer's kept values are quantised
    (:func:`~ditprune_core.reconstruct.quantize_layer`: with ``update="obs"`` inside an OBS pass
    that compensates the rounding error, else round to nearest), and the model holds exactly the
    dequantised values in the layer's dtype, ``dequantize_weight(report.quantized[name],
    layer.weight.dtype)``: the float32 decode cast to that dtype, which is what a file's decode
    must produce too. Later passes calibrate on the quantised layers.

    State after an exception or interrupt: hooks are always removed. Layers of the groups finished
    before it, and the layers of the current group already written, are pruned and updated in
    place (by ``write_fn``); all other layers are untouched. Callers that need all-or-nothing (the
    ComfyUI node) write into patches on a clone instead.

    Args:
        model: a DiT ``nn.Module`` or a ComfyUI MODEL (its diffusion model is changed in place).
        run_calibration: runs the model once over the calibration inputs, given the Calibrator.
        config: what to prune; ``update="obs"`` gives reconstruction.
        memory_budget_bytes: bytes of Grams alive at once; default :func:`default_memory_budget`.
        weighting: timestep weighting of the calibration (``"uniform"``, ``"log"`` or a function).
        progress: ``progress(done, total, layer)`` after every layer.
        weight_fn: the weight of a layer as the model will compute with it (see ``iter_masks``).
        write_fn: where a reconstructed weight goes (default: in place).
        collect_quantized: keep every layer's QuantizedWeight (on the CPU) in ``report.quantized``;
            a host that keeps them itself (from ``write_fn``) passes False to hold them only once.
        on_phase: told, in words, each phase as it starts: ``"calibration pass 2 of 8: ..."``,
            ``"block 3 of 57 (double_blocks.2): recording its calls"``, ``"... refining"`` (a host
            shows it beside its progress bar, which the sampler's own steps also move).
    Returns:
        a :class:`SequentialReport`.
    Raises:
        ValueError: the budget is smaller than one layer's Gram (naming it and the bytes it needs).
        CalibrationError: ``run_calibration`` ran no forward pass through a group's layers, or NaN/inf
            reached a Gram.
    """
    target = PruneTarget.of(model, config)
    budget = memory_budget_bytes if memory_budget_bytes is not None else default_memory_budget(target.layers)
    groups = plan_groups([(n, layer.in_features) for n, layer in target.layers.items()], budget)
    rows: list[LayerSparsity] = []
    done: list[LayerReconstruction] = []
    passes: list[PassReport] = []
    spec = config.value_quant
    quantized: dict[str, QuantizedWeight] = {}
    stored_bytes = stored_weights = 0
    refine = config.update == "obs" and config.reconstruct.block_refine_steps > 0
    pending: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    at: dict[str, int] = {}  # a pending layer's index in ``done``
    refined: list[BlockRefinement] = []
    blocks = list(dict.fromkeys(layer_block(n, target.template) for n in target.layers)) if refine else []
    blocks = [b for b in blocks if b != "other"]

    def phase(text: str) -> None:
        if on_phase is not None:
            on_phase(text)

    for index, group in enumerate(groups):
        start = time.perf_counter()
        layers = {name: target.layers[name] for name in group}
        phase(f"calibration pass {index + 1} of {len(groups)}: sampling to record {len(group)} layers")
        with Calibrator(target.module, layers, weighting=weighting, weight_fn=weight_fn, grams=group) as cal:
            run_calibration(cal)
        gram_bytes = cal.gram_bytes
        silent = [name for name in group if cal.tokens(name) == 0]
        if silent:
            raise CalibrationError(
                f"pass {index + 1} of {len(groups)}: run_calibration ran no forward pass through "
                f"{len(silent)} of its layers (e.g. {silent[0]!r}); it must run the model on the "
                "calibration inputs every time it is called"
            )
        counts = _block_counts(target, group, cal, config, weight_fn)
        for name in group:
            layer = target.layers[name]
            weight = weight_fn(name, layer).detach()
            gram = cal.gram(name)
            held = layer.weight.dtype
            if config.update == "obs":
                layer_config = config
                if name in counts:
                    layer_config = replace(config, sparsity=counts[name] / weight.numel())
                # quantising starts from the float32 reconstruction, not its cast to the model's dtype
                new, keep, report = reconstruct_layer(
                    name, weight if spec is None else weight.float(), gram, layer_config
                )
            else:
                a = gram.diagonal().to(torch.float64).clamp_min(0.0)
                keep = layer_keep_mask(name, weight, a if config.needs_calibration else None, config)
                new = weight * keep
                w32 = weight.float()
                error = relative_output_error(new.float(), w32, gram)
                report = LayerReconstruction(
                    name, 1 - int(keep.sum()) / keep.numel(), error, error, 0.0, None
                )
            block = layer_block(name, target.template) if refine else "other"
            if block != "other":  # refined with its block, then quantised and written, below
                pending.setdefault(block, {})[name] = (new if spec is not None else new.to(held), keep)
                at[name] = len(done)
            else:
                new, q, report = _finish_layer(name, new, keep, weight, gram, report, config, held)
                if q is not None and collect_quantized:
                    quantized[name] = _to_cpu(q)
                stored_bytes, stored_weights = _add_cost(stored_bytes, stored_weights, new, q)
                write_fn(name, layer, new, keep, q)
                cal.free_gram(name)
            del gram
            rows.append(LayerSparsity.of(name, target.template, keep.numel(), count_kept(keep)))
            done.append(report)
            del new, keep, weight
            if progress is not None:
                progress(len(done), len(target.layers), name)
        for block, news in pending.items():
            where = f"block {blocks.index(block) + 1} of {len(blocks)} ({block})"
            refined.append(
                _refine_block(
                    target, block, news, run_calibration, config, weighting, weight_fn, phase, where
                )
            )
            for name, (new, keep) in news.items():
                layer = target.layers[name]
                dense = weight_fn(name, layer).detach()
                new, q, done[at[name]] = _finish_layer(
                    name,
                    new,
                    keep,
                    dense,
                    cal.gram(name),
                    done[at[name]],
                    config,
                    layer.weight.dtype,
                    refined=True,
                )
                if q is not None and collect_quantized:
                    quantized[name] = _to_cpu(q)
                stored_bytes, stored_weights = _add_cost(stored_bytes, stored_weights, new, q)
                write_fn(name, layer, new, keep, q)
                cal.free_gram(name)
                del new, keep, dense, q
            if progress is not None:  # a host's progress callback is also where it can interrupt
                progress(len(done), len(target.layers), f"{block} (block refined)")
        pending.clear()
        passes.append(PassReport(tuple(group), gram_bytes, time.perf_counter() - start))
    bits = 8.0 * stored_bytes / stored_weights if stored_weights else 0.0
    return SequentialReport(
        tuple(done), tuple(passes), SparsityReport(tuple(rows)), budget, bits, quantized, tuple(refined)
    )


def _finish_layer(
    name: str,
    new: torch.Tensor,
    keep: torch.Tensor,
    weight: torch.Tensor,
    gram: torch.Tensor,
    report: LayerReconstruction,
    config: PruneConfig,
    held: torch.dtype,
    *,
    refined: bool = False,
) -> tuple[torch.Tensor, QuantizedWeight | None, LayerReconstruction]:
    """A reconstructed layer as it is written: cast to the held dtype, or (``value_bits``) quantised
    from its float32 values, jointly on its Gram under ``update="obs"``, and decoded; the report's
    error follows (the unquantised one is kept). ``refined``: the values come from block
    refinement, so the layer's error is measured again."""
    if config.value_quant is None:
        out = new.to(held)
        if refined:
            report = replace(report, output_error=relative_output_error(out.float(), weight.float(), gram))
        return out, None, report
    began = time.perf_counter()
    q = quantize_layer(name, new.float() * keep, keep, gram, config, held_dtype=held)
    out = dequantize_weight(q, held, check=False)
    error = relative_output_error(out.float(), weight.float(), gram)
    seconds = report.seconds + time.perf_counter() - began
    return out, q, replace(report, output_error=error, unquantized_error=report.output_error, seconds=seconds)


def _add_cost(
    stored_bytes: int, stored_weights: int, new: torch.Tensor, q: QuantizedWeight | None
) -> tuple[int, int]:
    cost = quantized_storage_cost(q) if q is not None else unquantized_storage_cost(new)
    return stored_bytes + cost.total_bytes, stored_weights + cost.weights


def _refine_block(
    target: PruneTarget,
    block: str,
    news: dict[str, tuple[torch.Tensor, torch.Tensor]],
    run_calibration: RunCalibration,
    config: PruneConfig,
    weighting: str | TimestepWeighting,
    weight_fn: WeightFn,
    phase: Callable[[str], None] = lambda _text: None,
    where: str = "",
) -> BlockRefinement:
    """Block refinement of one block whose layers' new weights are ``news``; replaces them in ``news``.

    One calibration run records the block's calls on the model as it is now (every block before it
    written), then :func:`~ditprune_core.refine.refine_block_` fits a float32 copy of the block to a
    float32 dense copy (weights from ``weight_fn``).
    """
    params = config.reconstruct
    module = target.module.get_submodule(block)
    first = next(iter(news))
    probe = {first: target.layers[first]}  # the Calibrator only gives run_calibration its timestep weights
    cal = Calibrator(target.module, probe, weighting=weighting, weight_fn=weight_fn)
    rec = BlockCallRecorder(module, max_calls=params.block_refine_calls, weight_of=lambda: cal.current_weight)
    phase(f"{where or block}: sampling to record its calls (block refinement)")
    with cal, rec:
        run_calibration(cal)
    if not rec.calls:
        raise CalibrationError(
            f"block refinement of {block!r}: run_calibration ran no forward pass through the block; it "
            "must run the model on the calibration inputs every time it is called"
        )
    phase(f"{where or block}: refining its kept weights ({params.block_refine_steps} Adam steps)")
    # copies made outside inference mode (ComfyUI samples inside it): autograd needs normal tensors
    with torch.inference_mode(False):
        reference = copy.deepcopy(module).float()
        work = copy.deepcopy(module).float()
        ref_named = dict(reference.named_modules())
        layers: dict[str, nn.Linear] = {}
        with torch.no_grad():
            for name, (new, _keep) in news.items():
                local = name.removeprefix(block + ".")
                dense = weight_fn(name, target.layers[name]).detach()
                ref_named[local].weight.copy_(dense.to(ref_named[local].weight))
                layers[name] = _plain_linear_(work, local, new)
        result = refine_block_(
            work,
            reference,
            layers,
            {name: keep for name, (_new, keep) in news.items()},
            rec.calls,
            steps=params.block_refine_steps,
            lr=params.block_refine_lr,
            name=block,
        )
    for name, (new, keep) in news.items():
        news[name] = (layers[name].weight.detach().masked_fill(~keep, 0).to(new.dtype), keep)
    del rec, reference, work
    return result


def _plain_linear_(block: nn.Module, local: str, weight: torch.Tensor) -> nn.Linear:
    """Replace ``block``'s Linear ``local`` by a plain float32 :class:`torch.nn.Linear` holding
    ``weight`` and the layer's bias: a host's Linear subclass may cast its weight in a way autograd
    cannot follow (ComfyUI's ops copy it into a fresh tensor), and refinement needs its gradient."""
    old = block.get_submodule(local)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"block refinement: {local!r} is a {type(old).__name__}, not a Linear layer")
    bias = old.bias is not None
    new = nn.Linear(old.in_features, old.out_features, bias=bias, device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        new.weight.copy_(weight)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach())
    parent, _, child = local.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)
    return new


def _to_cpu(q: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(
        q.codes.cpu(),
        q.scales.cpu(),
        None if q.zeros is None else q.zeros.cpu(),
        q.shape,
        q.spec,
        None if q.keep is None else q.keep.cpu(),
    )
