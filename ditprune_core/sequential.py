"""The sequential driver: pruning with reconstruction, in passes whose Grams fit a memory budget.

:func:`prune_sequential_` calibrates a group of layers (their input Grams), then prunes and updates
each of them (:func:`~ditprune_core.reconstruct.reconstruct_layer`), refines each transformer block
(:mod:`~ditprune_core.refine`, optional), quantises the kept values (``value_bits``,
:func:`~ditprune_core.reconstruct.quantize_layer`) and writes the layer, before the next group is
calibrated on the model pruned so far. The mask-only driver is :mod:`ditprune_core.prune`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .calibrate import Calibrator, TimestepWeighting
from .config import ProgressFn, PruneConfig, parse_pattern
from .layers import layer_block, remainder_layers
from .layouts import StorageCost, choose_layout, quantized_storage_cost, storage_cost
from .mask import layer_keep_mask
from .obs import gptq_quantize, relative_output_error
from .prune import PruneTarget
from .quantize import DEFAULT_DENSE_SPECS, QuantizedWeight, dequantize_weight, fake_quantize
from .reconstruct import (
    LayerReconstruction,
    allocate_block_counts,
    allocate_upgrades,
    plan_groups,
    quantize_layer,
    reconstruct_layer,
)
from .refine import BlockCallRecorder, BlockRefinement, refine_block_
from .report import LayerSparsity, SparsityReport, count_kept
from .stats import CalibrationError, GramAccumulator, WeightFn, module_weight
from .util.dtypes import storage_view

__all__ = [
    "PassReport",
    "RemainderLayer",
    "RunCalibration",
    "SequentialReport",
    "WriteFn",
    "default_memory_budget",
    "prune_sequential_",
    "unquantized_storage_cost",
]

log = logging.getLogger("ditprune")


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
class RemainderLayer:
    """One remainder layer quantised by ``PruneConfig.remainder_bits``: its relative output error on
    its own Gram as GPTQ left it, and that of rounding it to nearest (what saving with that remainder
    would have stored), and its seconds."""

    name: str
    output_error: float
    rounded_error: float
    seconds: float


@dataclass(frozen=True)
class SequentialReport:
    """What :func:`prune_sequential_` did, per layer and per pass, and the sparsity report.

    Attributes:
        bits_per_weight: storage of the pruned layers per original weight, as the compressed writer
            stores them (mask, values, scales, zero points, per-row data, shapes): quantised kept values
            in the layout the writer picks (:func:`~ditprune_core.layouts.choose_quantized_layout`),
            else the kept values in the model's dtype in the layout the default compressed save
            picks (:func:`unquantized_storage_cost`).
        quantized: ``{layer name: QuantizedWeight}`` (on the CPU) of every pruned layer with
            ``value_bits``; empty without, or when ``prune_sequential_(collect_quantized=False)``.
        upgraded: the layers mixed precision stored at ``upgrade_bits`` (``PruneConfig.upgrade_share``:
            most costly per weight first; ``upgrade_layers``: in forward order); empty without.
        fruitless: refinements in a row that gained nothing when refinement stopped
            (``block_refine_patience``; a block whose layers span several passes is refined once a
            pass, so this counts refinements, not blocks); 0 when it did not stop.
        remainder: the remainder layers ``PruneConfig.remainder_bits`` quantised, in forward order
            (their codes are in ``quantized`` too; they count in neither ``layers``, ``sparsity`` nor
            ``bits_per_weight``); empty without.
    """

    layers: tuple[LayerReconstruction, ...]
    passes: tuple[PassReport, ...]
    sparsity: SparsityReport
    memory_budget_bytes: int
    bits_per_weight: float = 0.0
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    blocks: tuple[BlockRefinement, ...] = ()
    skipped_blocks: tuple[str, ...] = ()
    fruitless: int = 0
    upgraded: tuple[str, ...] = ()
    remainder: tuple[RemainderLayer, ...] = ()

    @property
    def sampler_runs(self) -> int:
        """How many times ``run_calibration`` ran: once per pass, once per refined block."""
        return len(self.passes) + len(self.blocks)

    def to_text(self) -> str:
        lines = [
            f"{len(self.passes)} pass(es), {len(self.layers)} layers, Gram budget "
            f"{self.memory_budget_bytes / _GIB:.2f} GiB; sparsity {self.sparsity.sparsity:.2%}, "
            f"{self.bits_per_weight:.3f} bits per weight stored; {self.sampler_runs} sampler run(s)",
        ]
        if self.skipped_blocks:
            lines.append(
                f"  block refinement stopped: it gained nothing on {self.fruitless} refinement(s) in a row "
                f"(block_refine_patience); {len(self.skipped_blocks)} block(s) after them were not "
                "refined, saving as many sampler runs"
            )
        for p in self.passes:
            lines.append(
                f"  pass of {len(p.layers)} layers: {p.gram_bytes / _GIB:.2f} GiB of Grams, {p.seconds:.1f} s"
            )
        for b in self.blocks:
            reverted = " (worse: put back)" if b.reverted else ""
            held = (
                ""
                if b.holdout_before is None
                else f", held-out calls {b.holdout_before:.4g} -> {b.holdout_after:.4g} (step {b.best_step})"
            )
            lines.append(
                f"  block {b.block} refined: output error {b.error_before:.4g} -> {b.error_after:.4g}"
                f"{reverted}{held}, {b.calls} calls, {b.steps} steps, {b.seconds:.1f} s"
            )
        if self.remainder:
            worst = max(self.remainder, key=lambda r: r.output_error)
            lines.append(
                f"  remainder: {len(self.remainder)} layers quantised by GPTQ, output error at most "
                f"{worst.output_error:.4g} ({worst.name}; round to nearest {worst.rounded_error:.4g})"
            )
        for r in self.layers:
            quantised = "" if r.unquantized_error is None else f", unquantised {r.unquantized_error:.4g}"
            lines.append(
                f"  {r.name}: sparsity {r.sparsity:.2%}, output error {r.output_error:.4g} "
                f"(mask only {r.mask_only_error:.4g}{quantised}), {r.seconds:.2f} s"
            )
        return "\n".join(lines)


def default_memory_budget(layers: Mapping[str, nn.Linear], free_bytes: int | None = None) -> int:
    """The Gram budget when none is given: a quarter of the free memory, at most 8 GiB, and never
    less than the largest single layer's Gram (which must fit either way).

    Args:
        layers: the selected layers.
        free_bytes: the free memory where the Grams accumulate, as the host reads it (ComfyUI: its
            free memory of the device the MODEL computes on). None: read here, the RAM or the free
            memory of the layers' CUDA device (4 GiB assumed where neither can be read).
    """
    largest = max((GramAccumulator.nbytes(layer.in_features) for layer in layers.values()), default=0)
    if free_bytes is None:
        device = next(iter(layers.values())).weight.device
        free_bytes = 4 * _GIB
        if device.type == "cuda" and torch.cuda.is_available():
            free_bytes = int(torch.cuda.mem_get_info(device)[0])
        else:
            with contextlib.suppress(ValueError, OSError, AttributeError):  # no sysconf: keep 4 GiB
                free_bytes = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(largest, min(8 * _GIB, free_bytes // 4))


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
    if config.quantize_only:  # nothing to share
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

    With ``config.quantize_only`` (sparsity 0 and ``value_bits``) nothing is pruned: each layer is
    quantised whole, in the same passes, by the same OBS sweep (``update="obs"``) on a mask that keeps
    every weight, and its codes are dense (``q.keep`` None: the file's dense layout, no mask bits);
    ``write_fn`` gets an all-True keep mask. There is no refit (nothing was pruned) and no block
    refinement: a block whose weights are all kept is the dense block, which it would be fitted to
    (for a pruned layer too, refinement fits the pruned weights before they are quantised).

    With ``config.value_bits`` every pruned layer's kept values are quantised
    (:func:`~ditprune_core.reconstruct.quantize_layer`: with ``update="obs"`` inside an OBS pass
    that compensates the rounding error, else round to nearest), and the model holds exactly the
    dequantised values in the layer's dtype, ``dequantize_weight(report.quantized[name],
    layer.weight.dtype)``: the float32 decode cast to that dtype, which is what a file's decode
    must produce too. Later passes calibrate on the quantised layers.

    With ``config.remainder_bits`` the remainder (the block layers that are not selected:
    :func:`~ditprune_core.layers.remainder_layers`, FLUX's and SD3's modulation) joins the passes in
    forward order: each remainder layer's Gram is recorded with its pass's layers (within the budget),
    and it is quantised whole by GPTQ (``reconstruct.remainder_damp``) to the codes Save Pruned
    Model's remainder of those bits stores, then written by ``write_fn`` (an all-True keep mask, its
    dense codes). It is neither pruned nor counted in ``bits_per_weight``; ``report.remainder``
    has each one's error against rounding it to nearest.

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
    rest = _remainder_of(target, config)
    calibrated = _in_module_order(target.module, {**target.layers, **rest}) if rest else target.layers
    groups = plan_groups([(n, layer.in_features) for n, layer in calibrated.items()], budget)
    rest_done: list[RemainderLayer] = []
    rows: list[LayerSparsity] = []
    done: list[LayerReconstruction] = []
    passes: list[PassReport] = []
    spec = config.value_quant
    written = _Written(collect_quantized, write_fn)
    # quantise only: a block whose weights are all kept is the dense block, refinement has nothing to fit
    refine = config.update == "obs" and config.reconstruct.block_refine_steps > 0 and not config.quantize_only
    pending: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    at: dict[str, int] = {}  # a pending layer's index in ``done``
    refined: list[BlockRefinement] = []
    blocks = list(dict.fromkeys(layer_block(n, target.template) for n in target.layers)) if refine else []
    blocks = [b for b in blocks if b != "other"]
    patience = config.reconstruct.block_refine_patience
    fruitless = 0  # blocks in a row that refinement gained nothing on
    skipped: list[str] = []

    def phase(text: str) -> None:
        if on_phase is not None:
            on_phase(text)

    def shrink_of(name: str) -> float:
        return config.reconstruct.shrink_of(target.template.is_text_stream(name))

    # mixed precision: the layers stored at config.upgrade_bits (by name now, by estimate in pass 1)
    upgraded = () if config.upgrade_layers is None else _upgraded_by_name(target, config.upgrade_layers)

    def bits_of(name: str) -> PruneConfig:
        return config.upgraded() if name in upgraded else config

    for index, group in enumerate(groups):
        start = time.perf_counter()
        layers = {name: calibrated[name] for name in group}
        phase(f"calibration pass {index + 1} of {len(groups)}: sampling to record {len(group)} layers")
        # mixed precision is chosen from every layer's input energy: the first pass records it for all
        hooked = {**target.layers, **layers} if index == 0 and config.upgrade_share > 0 else layers
        with Calibrator(target.module, hooked, weighting=weighting, weight_fn=weight_fn, grams=group) as cal:
            run_calibration(cal)
        gram_bytes = cal.gram_bytes
        silent = [name for name in group if cal.tokens(name) == 0]
        if silent:
            raise CalibrationError(
                f"pass {index + 1} of {len(groups)}: run_calibration ran no forward pass through "
                f"{len(silent)} of its layers (e.g. {silent[0]!r}); it must run the model on the "
                "calibration inputs every time it is called"
            )
        if hooked is not layers:
            upgraded = _upgrades(target, cal, config, weight_fn)
        counts = _block_counts(target, [n for n in group if n not in rest], cal, config, weight_fn)
        for name in group:
            if name in rest:  # quantised whole by GPTQ, written now: no mask, no refinement
                rest_done.append(_quantize_remainder(name, rest[name], cal, config, weight_fn, written))
                if progress is not None:
                    progress(len(done), len(target.layers), name)
                continue
            layer = target.layers[name]
            weight = weight_fn(name, layer).detach()
            gram = cal.gram(name)
            held = layer.weight.dtype
            if config.quantize_only:  # nothing pruned, nothing to update: the whole weight is quantised
                new, keep = weight.float(), torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
                report = LayerReconstruction(name, 0.0, 0.0, 0.0, 0.0, None)
            elif config.update == "obs":
                layer_config = config
                if name in counts:
                    layer_config = replace(config, sparsity=counts[name] / weight.numel())
                # quantising starts from the float32 reconstruction, not its cast to the model's dtype
                new, keep, report = reconstruct_layer(
                    name,
                    weight if spec is None else weight.float(),
                    gram,
                    layer_config,
                    shrink=shrink_of(name),
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
                new, q, report = _finish_layer(
                    name, new, keep, weight, gram, report, bits_of(name), held, shrink=shrink_of(name)
                )
                written.write(name, layer, new, keep, q, cal)
            del gram
            rows.append(LayerSparsity.of(name, target.template, keep.numel(), count_kept(keep)))
            done.append(report)
            del new, keep, weight
            if progress is not None:
                progress(len(done), len(target.layers), name)
        for block, news in pending.items():
            where = f"block {blocks.index(block) + 1} of {len(blocks)} ({block})"
            if patience and fruitless >= patience:
                skipped.append(block)
                phase(f"{where}: not refined (refinement gained nothing on {fruitless} blocks in a row)")
            else:
                result = _refine_block(
                    target, block, news, run_calibration, config, weighting, weight_fn, phase, where
                )
                refined.append(result)
                fruitless = fruitless + 1 if _gained_nothing(result) else 0
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
                    bits_of(name),
                    layer.weight.dtype,
                    refined=not skipped or skipped[-1] != block,
                    shrink=shrink_of(name),
                )
                written.write(name, layer, new, keep, q, cal)
                del new, keep, dense, q
            if progress is not None:  # a host's progress callback is also where it can interrupt
                progress(len(done), len(target.layers), f"{block} (block refined)")
        pending.clear()
        passes.append(PassReport(tuple(group), gram_bytes, time.perf_counter() - start))
    bits = 8.0 * written.stored_bytes / written.stored_weights if written.stored_weights else 0.0
    return SequentialReport(
        tuple(done),
        tuple(passes),
        SparsityReport(tuple(rows)),
        budget,
        bits,
        written.quantized,
        tuple(refined),
        tuple(skipped),
        fruitless if skipped else 0,
        upgraded,
        tuple(rest_done),
    )


def _remainder_of(target: PruneTarget, config: PruneConfig) -> dict[str, nn.Linear]:
    """The layers ``config.remainder_bits`` quantises: the remainder layers that are not selected."""
    if config.remainder_bits is None:
        return {}
    named = dict(target.module.named_modules())
    rest = {n: named[n] for n in remainder_layers(target.module) if n not in target.layers}
    if not rest:
        log.warning(
            "ditprune: remainder_bits %d: every remainder layer of this %s model is selected (pruned) "
            "already, so there is no remainder to quantise",
            config.remainder_bits,
            target.template.name,
        )
    return rest


def _in_module_order(module: nn.Module, layers: Mapping[str, nn.Linear]) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if name in layers}


def _quantize_remainder(
    name: str, layer: nn.Linear, cal: Calibrator, config: PruneConfig, weight_fn: WeightFn, written: _Written
) -> RemainderLayer:
    """One remainder layer quantised whole by GPTQ on its Gram to the remainder's codes, and written."""
    began = time.perf_counter()
    assert config.remainder_bits is not None
    spec = DEFAULT_DENSE_SPECS[config.remainder_bits]
    weight = weight_fn(name, layer).detach()
    gram = cal.gram(name)
    damp = config.reconstruct.remainder_damp
    q = gptq_quantize(weight.float(), gram, spec.bits, spec.group_size, spec.sym, damp=damp, where=name)
    new = dequantize_weight(q, layer.weight.dtype, check=False)
    error = relative_output_error(new.float(), weight.float(), gram)
    rounded = relative_output_error(fake_quantize(weight.float(), spec, where=name), weight.float(), gram)
    keep = torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    written.write(name, layer, new, keep, q, cal, counted=False)
    return RemainderLayer(name, error, rounded, time.perf_counter() - began)


def _upgraded_by_name(target: PruneTarget, regex: str) -> tuple[str, ...]:
    """The selected layers ``upgrade_layers`` finds; a regex that finds none is refused (a pattern
    written for another architecture's names would otherwise upgrade nothing, silently)."""
    found = tuple(name for name in target.layers if re.search(regex, name))
    if not found:
        example = next(iter(target.layers))
        raise ValueError(
            f"upgrade_layers {regex!r} finds none of the {len(target.layers)} selected layers of this "
            f"{target.template.name} model (e.g. {example!r}): write it for this model's layer names, or "
            "give no upgrade"
        )
    return found


def _upgrades(
    target: PruneTarget, cal: Calibrator, config: PruneConfig, weight_fn: WeightFn
) -> tuple[str, ...]:
    """The layers ``config.upgrade_share`` stores at ``upgrade_bits``, from the dense weights and the
    first pass's input energy of every layer (:func:`~ditprune_core.reconstruct.allocate_upgrades`)."""
    spec = config.value_quant
    assert spec is not None  # PruneConfig refuses an upgrade share without value_bits
    stats = cal.stats
    energies = {
        name: (weight_fn(name, layer).detach(), stats[name].activation_sq_mean)
        for name, layer in target.layers.items()
    }
    return allocate_upgrades(energies, spec, float(config.upgrade_share))


def _gained_nothing(result: BlockRefinement) -> bool:
    """The fit was put back, or (with held-out calls) the starting weights were the best kept."""
    return result.reverted or result.best_step == 0


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
    shrink: float = 0.0,
) -> tuple[torch.Tensor, QuantizedWeight | None, LayerReconstruction]:
    """A reconstructed layer as it is written: cast to the held dtype, or (``value_bits``) quantised
    from its float32 values, jointly on its Gram under ``update="obs"``, and decoded; the report's
    error follows (the unquantised one is kept). ``refined``: the values come from block
    refinement, so the layer's error is measured again. ``shrink``: the Gram's shrinkage in the
    quantising sweep (the layer's ``reconstruct.shrink`` or ``shrink_text``)."""
    if config.value_quant is None:
        out = new.to(held)
        if refined:
            report = replace(report, output_error=relative_output_error(out.float(), weight.float(), gram))
        return out, None, report
    began = time.perf_counter()
    if config.quantize_only:  # the whole weight: dense codes, no mask
        q = quantize_layer(name, new.float(), None, gram, config, held_dtype=held, shrink=shrink)
    else:
        q = quantize_layer(name, new.float() * keep, keep, gram, config, held_dtype=held, shrink=shrink)
    out = dequantize_weight(q, held, check=False)
    error = relative_output_error(out.float(), weight.float(), gram)
    seconds = report.seconds + time.perf_counter() - began
    return out, q, replace(report, output_error=error, unquantized_error=report.output_error, seconds=seconds)


@dataclass
class _Written:
    """Every layer :func:`prune_sequential_` finishes goes through :meth:`write`: its storage cost
    is counted, its codes kept (``collect``), the host's ``write_fn`` called and its Gram freed."""

    collect: bool
    write_fn: WriteFn
    stored_bytes: int = 0
    stored_weights: int = 0
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)

    def write(
        self,
        name: str,
        layer: nn.Linear,
        new: torch.Tensor,
        keep: torch.Tensor,
        q: QuantizedWeight | None,
        cal: Calibrator,
        *,
        counted: bool = True,
    ) -> None:
        """``counted``: the layer's storage counts in ``bits_per_weight`` (not a remainder layer's)."""
        if q is not None and self.collect:
            self.quantized[name] = _to_cpu(q)
        if counted:
            cost = quantized_storage_cost(q) if q is not None else unquantized_storage_cost(new)
            self.stored_bytes += cost.total_bytes
            self.stored_weights += cost.weights
        self.write_fn(name, layer, new, keep, q)
        cal.free_gram(name)


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
            step=params.block_refine_step,
            holdout=params.block_refine_holdout,
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
