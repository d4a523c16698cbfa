"""Prune and Reconstruct: pruning that also updates the kept weights (OBS), one pass of the sampler per group."""

from __future__ import annotations

import dataclasses

import comfy.model_management
import torch
from comfy.model_patcher import ModelPatcher
from comfy.weight_adapter.base import WeightAdapterBase
from comfy_api.latest import io

from ..ditprune_core import METRICS, MetricParams, PruneConfig
from ..ditprune_core.config import ReconstructParams
from ..ditprune_core.prune import select_layers
from ..ditprune_core.quantize import DEFAULT_GROUP_SIZE, QuantizedWeight, QuantSpec, dequantize_weight
from ..ditprune_core.sequential import default_memory_budget, prune_sequential_
from ..ditprune_core.specs import GroupingSpec, SaliencySpec
from ..ditprune_core.util.packing import PackedMask
from .common import (
    CATEGORY,
    PREFIX,
    ClustersType,
    Progress,
    SaliencyType,
    SamplerRun,
    _patched_fp32,
    diffusion_model,
    layer_progress,
    original_weight,
    pruning_choice,
    pruning_inputs,
    sampling_inputs,
)
from .prompts import CalibrationPlan, EncodedPrompts, prompt_inputs, sample_plan
from .targets import TARGET_TOOLTIP, size_target_choice

_GIB = 1 << 30
VALUE_BITS_CHOICES = ("none", "8", "4", "3", "2")
#: values one scale covers (the first is the default): smaller groups, less error, more bits
VALUE_GROUP_CHOICES = (str(DEFAULT_GROUP_SIZE), "64", "32")


class ReconstructedPatch(WeightAdapterBase):
    """A reconstructed weight held compactly: 1 bit per weight plus the kept values.

    ComfyUI calls :meth:`calculate_weight` when it loads the weight (every forward in lowvram mode);
    it returns the reconstructed weight, whatever the original was: no dense copy is kept. With
    quantised kept values (``value_bits``) the patch holds their codes (one byte each), group scales
    and zero points instead of the values, and decodes them as the file's reader does
    (``dequantize_weight(quantized, dtype)``): bit for bit what ``prune_sequential_`` computed.
    Quantise only (sparsity 0): ``mask`` is None and the codes are dense (no bit per weight).
    """

    name = "ditprune_reconstructed"
    made_by = "Prune and Reconstruct"

    def __init__(
        self,
        mask: PackedMask | None,
        values: torch.Tensor | None,
        layer: str,
        *,
        quantized: QuantizedWeight | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if mask is not None:
            shape = mask.shape
        elif quantized is not None and quantized.keep is None:
            shape = (int(quantized.shape[0]), int(quantized.shape[1]))
        else:
            raise ValueError(f"{layer!r}: a reconstructed patch without a mask needs dense quantised codes")
        self.loaded_keys: set[str] = set()
        self.weights: list[torch.Tensor] = []
        self.mask, self.layer, self.shape = mask, layer, shape
        self.values = values
        self.dtype = dtype  # the dtype the quantised values are decoded to (the model's)
        self._codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, QuantSpec] | None = None
        if quantized is not None:
            zeros = None if quantized.zeros is None else quantized.zeros.cpu()
            self._codes = (quantized.codes.cpu(), quantized.scales.cpu(), zeros, quantized.spec)

    def check_shape(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.shape:
            raise ValueError(
                f"ditprune reconstruction of {self.layer!r} has shape {self.shape} but the weight is "
                f"{tuple(weight.shape)}: the model changed after {self.made_by}; run it again"
            )

    @property
    def quantized(self) -> QuantizedWeight | None:
        """The layer's QuantizedWeight (on the CPU), or None for unquantised kept values."""
        return self._quantized(torch.device("cpu"))

    def _quantized(self, device: torch.device) -> QuantizedWeight | None:
        if self._codes is None:
            return None
        codes, scales, zeros, spec = self._codes
        return QuantizedWeight(
            codes.to(device),
            scales.to(device),
            None if zeros is None else zeros.to(device),
            self.shape,
            spec,
            None if self.mask is None else self.mask.to_bool(device),
        )

    def calculate_weight(
        self,
        weight: torch.Tensor,
        key: str,
        strength: float,
        strength_model: float,
        offset: object,
        function: object,
        intermediate_dtype: torch.dtype = torch.float32,
        original_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_shape(weight)
        quantized = self._quantized(weight.device)
        if quantized is not None:
            held = dequantize_weight(quantized, self.dtype or weight.dtype, check=False)
            return held.to(weight.dtype)
        assert self.values is not None and self.mask is not None  # set at construction, or quantized
        out = torch.zeros_like(weight)
        return out.masked_scatter_(
            self.mask.to_bool(weight.device), self.values.to(weight.device, weight.dtype)
        )


def default_gram_budget(model: ModelPatcher, module: torch.nn.Module, config: PruneConfig) -> int:
    """The core's :func:`default_memory_budget` with ComfyUI's free memory of the device the MODEL
    computes on, where the Grams accumulate (under lowvram the layers' weights sit in RAM, whose size
    would wrongly size Grams on the GPU). Call it after the model is loaded."""
    free = int(comfy.model_management.get_free_memory(model.load_device))
    return default_memory_budget(select_layers(module, config), free_bytes=free)


def reconstruct_config(
    sparsity: float,
    pattern: str,
    families: tuple[str, ...],
    metric: str,
    layer_regex: str,
    value_bits: str,
    block_refine_steps: int | None,
    saliency: SaliencySpec | None,
    clusters: GroupingSpec | None,
    value_group: str = VALUE_GROUP_CHOICES[0],
    upgrade_layers: str | None = None,
    remainder_bits: int | None = None,
) -> PruneConfig:
    """The node's widgets as a :class:`PruneConfig` with ``update="obs"`` (a Score Saliency /
    Cluster Weights input overrides the metric / comparison group); ``value_group`` other than the
    default gives the value bits' default spec with that group size; ``upgrade_layers`` and
    ``remainder_bits``: a size target's mixed precision and GPTQ remainder (``PruneConfig`` checks
    them)."""
    grouping = clusters or GroupingSpec()
    if value_group not in VALUE_GROUP_CHOICES:
        raise ValueError(f"value_group must be one of {list(VALUE_GROUP_CHOICES)}, got {value_group!r}")
    config = PruneConfig(
        sparsity,
        metric=saliency.metric if saliency is not None else metric,
        granularity=grouping.granularity,
        pattern=pattern,
        metric_params=saliency.params if saliency is not None else MetricParams(),
        cluster_params=grouping.cluster_params,
        families=families,
        layer_regex=layer_regex or None,
        update="obs",
        value_bits=None if value_bits == "none" else int(value_bits),
        upgrade_layers=upgrade_layers,
        remainder_bits=remainder_bits,
        reconstruct=ReconstructParams()
        if block_refine_steps is None
        else ReconstructParams(block_refine_steps=int(block_refine_steps)),
    )
    spec = config.value_quant
    if spec is None or int(value_group) == spec.group_size:
        return config
    return dataclasses.replace(config, value_spec=dataclasses.replace(spec, group_size=int(value_group)))


class ReconstructingClone:
    """The node's clone of the incoming MODEL, loaded once (its backup then holds the originals),
    with what :func:`prune_sequential_` asks of a host: the weight each layer is fitted to, and
    where a reconstructed weight goes (a patch on the clone; the incoming MODEL is never changed)."""

    def __init__(self, model: ModelPatcher) -> None:
        self.model = model
        self.pruned = model.clone()
        comfy.model_management.load_models_gpu([self.pruned])

    def target_weight(self, name: str, _layer: torch.nn.Linear) -> torch.Tensor:
        """The weight the incoming MODEL computes with (original + its own patches, e.g. a LoRA)."""
        key = f"{PREFIX}{name}.weight"
        backup = self.pruned.backup.get(key)
        original = backup.weight.detach() if backup is not None else original_weight(self.model, key)
        patched = _patched_fp32(self.model, key, original)
        return original if patched is None else patched

    def write(
        self,
        name: str,
        _layer: torch.nn.Linear,
        new: torch.Tensor,
        keep: torch.Tensor,
        quantized: QuantizedWeight | None,
    ) -> None:
        keep = keep.cpu()
        if quantized is not None and quantized.keep is None:  # quantise only: dense codes, no mask
            patch = ReconstructedPatch(None, None, name, quantized=quantized, dtype=new.dtype)
            self.pruned.add_patches({f"{PREFIX}{name}.weight": patch}, 1.0)
            return
        mask = PackedMask.from_bool(keep)
        if quantized is not None:  # new is its decode in the model's dtype
            patch = ReconstructedPatch(mask, None, name, quantized=quantized, dtype=new.dtype)
        else:
            stored_dtype = original_weight(self.model, f"{PREFIX}{name}.weight").dtype
            patch = ReconstructedPatch(mask, new.detach().cpu()[keep].to(stored_dtype), name)
        self.pruned.add_patches({f"{PREFIX}{name}.weight": patch}, 1.0)


class DitPrunePruneAndReconstruct(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPrunePruneAndReconstruct",
            display_name="DiT-Pruning Prune and Reconstruct",
            category=CATEGORY,
            description="Prunes and updates the kept weights so that every layer's output on the calibration "
            "changes as little as possible (OBS update + least-squares refit). The layers are done in groups "
            "whose input Gram matrices fit the memory budget; the sampler runs once per group, on the model "
            "pruned so far, so each layer compensates the error upstream of it. The incoming model is "
            "never changed; the output holds the reconstructed weights compactly (1 bit per weight plus the "
            "kept values). Sparsity 0 with value bits quantises without pruning (dense codes, no mask). "
            "With a prompt set every pass samples every calibration prompt (x seeds x sizes): the cost is "
            "sampler runs x prompts x steps, stated in the report.",
            inputs=[
                *sampling_inputs("The model to prune. It is cloned, never changed."),
                io.Combo.Input(
                    "metric",
                    options=list(METRICS),
                    default="energy",
                    tooltip="The mask's metric (energy = DiT-Pruning); its statistics come from each pass.",
                ),
                *pruning_inputs(quantize_only=True),
                io.Float.Input(
                    "memory_budget_gb",
                    default=0.0,
                    min=0.0,
                    max=1024.0,
                    step=0.5,
                    tooltip="GiB of Gram matrices alive at once (fewer passes with more). 0: a quarter of the "
                    "free memory of the device the model runs on (lowvram included), at most 8 GiB. "
                    "FLUX.1-dev's largest layer needs 0.88 GiB.",
                ),
                io.Combo.Input(
                    "value_bits",
                    options=list(VALUE_BITS_CHOICES),
                    default="none",
                    optional=True,  # prompts and workflows saved before it still run (unquantised)
                    tooltip="Quantise the kept values to 8, 4 or 3 bits (groups of 128 kept values, scale "
                    "per group), the rounding compensated inside the OBS update. none: keep the model's dtype. "
                    "With sparsity 0, quantise only: every selected layer whole (GPTQ-style, 2 bits too), "
                    "no mask.",
                ),
                io.Int.Input(
                    "block_refine_steps",
                    default=ReconstructParams().block_refine_steps,
                    min=0,
                    max=10000,
                    step=10,
                    optional=True,
                    tooltip="Block refinement, off (0) by default: after a transformer block is reconstructed, "
                    "its kept weights are fitted together (Adam, this many steps, step relative to each layer's "
                    "weight size, masks fixed) to the dense block's output on the calibration calls, a quarter "
                    "of the calls held out: a fit that is not better on them is put back, and after 2 such "
                    "blocks refinement stops. It fits the calibration prompts: on prompts it never saw it did "
                    "not help on the test-bed it was not tuned on (docs/bench/generalisation.md). Each refined "
                    "block costs one more sampler run (FLUX.1-dev: up to 57) and, on the GPU, about two float32 "
                    "copies of a block.",
                ),
                io.Float.Input(
                    "target_file_gb",
                    default=0.0,
                    min=0.0,
                    max=1000.0,
                    step=0.1,
                    optional=True,  # prompts and workflows saved before it still run
                    tooltip=TARGET_TOOLTIP,
                ),
                io.Combo.Input(  # last of the widgets: workflows saved before it keep their values
                    "value_group",
                    options=list(VALUE_GROUP_CHOICES),
                    default=VALUE_GROUP_CHOICES[0],
                    optional=True,
                    tooltip="Values one scale covers when value_bits quantises: 128 (default), 64 or 32. "
                    "Smaller groups have less error and cost bits (3-bit: 3.125, 3.25, 3.5 bits/weight "
                    "dense); the frontier (docs/bench/frontier.md) measures where they pay. A size target "
                    "sets it.",
                ),
                SaliencyType.Input(
                    "saliency",
                    optional=True,
                    tooltip="Optional, from Score Saliency: its metric and parameters replace 'metric'.",
                ),
                ClustersType.Input(
                    "clusters",
                    optional=True,
                    tooltip="Optional, from Cluster Weights: the comparison groups.",
                ),
                *prompt_inputs(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The pruned, reconstructed model."),
                io.String.Output(
                    display_name="report",
                    tooltip="The calibration's cost (sampler runs x prompts x steps), passes, per-layer "
                    "sparsity and output error; connect Preview Any to read it.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        positive: object,
        negative: object,
        latent_image: dict,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        timestep_weighting: str,
        metric: str,
        sparsity: float,
        pattern: str,
        attention: bool,
        mlp: bool,
        single_fused: bool,
        modulation: bool,
        layer_regex: str = "",
        memory_budget_gb: float = 0.0,
        value_bits: str = "none",
        value_group: str = VALUE_GROUP_CHOICES[0],
        block_refine_steps: int | None = None,
        target_file_gb: float = 0.0,
        saliency: SaliencySpec | None = None,
        clusters: GroupingSpec | None = None,
        prompt_set: EncodedPrompts | None = None,
    ) -> io.NodeOutput:
        dm = diffusion_model(model, action="prune and reconstruct it")
        # mixed precision and the GPTQ remainder: what a size target's file uses
        target, upgrade_layers, remainder_bits = None, None, None
        if target_file_gb > 0:  # the frontier's file for that size replaces the three widgets
            target = size_target_choice(dm, target_file_gb, attention, mlp, single_fused, modulation)
            sparsity, pattern = target.sparsity, target.pattern
            value_bits = "none" if target.value_bits is None else str(target.value_bits)
            value_group = str(target.value_group)
            upgrade_layers, remainder_bits = target.upgrade_layers, target.remainder_bits
        sparsity, families = pruning_choice(sparsity, pattern, attention, mlp, single_fused, modulation)
        config = reconstruct_config(
            sparsity,
            pattern,
            families,
            metric,
            layer_regex,
            value_bits,
            block_refine_steps,
            saliency,
            clusters,
            value_group,
            upgrade_layers,
            remainder_bits,
        )
        run = SamplerRun(positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler)
        plan = CalibrationPlan.of(run, prompt_set, dm)  # checked before loading
        clone = ReconstructingClone(model)
        if memory_budget_gb > 0:
            budget = int(memory_budget_gb * _GIB)
        else:
            budget = default_gram_budget(clone.pruned, dm, config)
        progress = Progress(describe=layer_progress)
        report = prune_sequential_(
            dm,
            lambda cal: sample_plan(cal, clone.pruned, plan, progress),
            config,
            memory_budget_bytes=budget,
            weighting=timestep_weighting,
            progress=progress,
            weight_fn=clone.target_weight,
            write_fn=clone.write,
            collect_quantized=False,
            on_phase=progress.phase,
        )
        clone.pruned.model_options["ditprune"] = {
            "config": config.to_dict(),
            "sparsity": report.sparsity.sparsity,
            "passes": len(report.passes),
            "bits_per_weight": report.bits_per_weight,
            "calibration": plan.record(timestep_weighting),
        }
        if target is not None:
            clone.pruned.model_options["ditprune"]["size_target"] = {"gb": target_file_gb, **target.to_dict()}
        sampler_runs = report.sampler_runs
        cost = (
            f"calibration {plan.cost_text()}; {sampler_runs} calibration runs of the set "
            f"({len(report.passes)} pass(es) + {len(report.blocks)} block refinement(s)) = "
            f"{sampler_runs * plan.runs_per_pass} sampler runs of {steps} steps"
        )
        first, *rest = report.to_text().split("\n")
        if target is not None:
            cost += (
                f"\nsize target {target_file_gb:g} GB: {target.describe()}. Save Pruned Model: format "
                "compressed, values and remainder 'size target'"
            )
        return io.NodeOutput(clone.pruned, "\n".join([first, cost, *rest]))
