"""Prune and Reconstruct: pruning that also updates the kept weights (OBS), one pass of the sampler per group."""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import comfy.samplers
import torch
from comfy.model_patcher import ModelPatcher
from comfy.weight_adapter.base import WeightAdapterBase
from comfy_api.latest import io

import nodes as comfy_nodes  # ComfyUI's nodes.py (this pack is imported as a package, never as `nodes`)

from ..ditprune_core import METRICS, PATTERNS, TIMESTEP_WEIGHTINGS, MetricParams, PruneConfig, parse_pattern
from ..ditprune_core.calibrate import Calibrator
from ..ditprune_core.prune import prune_sequential_
from ..ditprune_core.specs import GroupingSpec, SaliencySpec
from ..ditprune_core.util.packing import PackedMask
from .common import (
    CATEGORY,
    PREFIX,
    ClustersType,
    Progress,
    SaliencyType,
    _patched_fp32,
    diffusion_model,
    original_weight,
)

_GIB = 1 << 30


class ReconstructedPatch(WeightAdapterBase):
    """A reconstructed weight held compactly: 1 bit per weight plus the kept values.

    ComfyUI calls :meth:`calculate_weight` when it loads the weight (every forward in lowvram mode);
    it returns the reconstructed weight, whatever the original was: no dense copy is kept.
    """

    name = "ditprune_reconstructed"

    def __init__(self, mask: PackedMask, values: torch.Tensor, layer: str) -> None:
        self.loaded_keys: set[str] = set()
        self.weights: list[torch.Tensor] = []
        self.mask, self.values, self.layer = mask, values, layer

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
        if tuple(weight.shape) != self.mask.shape:
            raise ValueError(
                f"ditprune reconstruction of {self.layer!r} has shape {self.mask.shape} but the weight is "
                f"{tuple(weight.shape)}: the model changed after Prune and Reconstruct; run it again"
            )
        keep = self.mask.to_bool(weight.device)
        out = torch.zeros_like(weight)
        return out.masked_scatter_(keep, self.values.to(weight.device, weight.dtype))


def sample_calibrating(
    cal: Calibrator,
    model: ModelPatcher,
    positive: object,
    negative: object,
    latent_image: dict,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
) -> dict:
    """Run ComfyUI's KSampler on ``model`` once, telling ``cal`` the sigma of every model call."""
    patched = model.clone()
    inner = patched.model_options.get("model_function_wrapper")

    def record_sigma(apply_model: Callable[..., torch.Tensor], args: dict) -> torch.Tensor:
        cal.set_sigma(float(args["timestep"].flatten()[0]))
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(record_sigma)
    (samples,) = comfy_nodes.common_ksampler(
        patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image
    )
    return samples


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
            "kept values).",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The FLUX / SD3 model to prune. It is cloned, never changed."
                ),
                io.Conditioning.Input(
                    "positive", tooltip="Prompts to calibrate on; batch them for many prompts."
                ),
                io.Conditioning.Input("negative", tooltip="Negative prompt (its pass is skipped at cfg 1)."),
                io.Latent.Input(
                    "latent_image", tooltip="Empty latent: its size and batch set the calibration."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Sampling seed of the calibration passes (the same in every pass).",
                ),
                io.Int.Input("steps", default=8, min=1, max=200, tooltip="Sampling steps per pass."),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="CFG scale; 1.0 for FLUX.1-dev (guidance is in the conditioning).",
                ),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampler."),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="simple",
                    tooltip="Scheduler.",
                ),
                io.Combo.Input(
                    "timestep_weighting",
                    options=sorted(TIMESTEP_WEIGHTINGS),
                    default="log",
                    tooltip="log: early (noisy) steps weigh 1.2, the last 0.8; uniform: all equal.",
                ),
                io.Combo.Input(
                    "metric",
                    options=list(METRICS),
                    default="energy",
                    tooltip="The mask's metric (energy = DiT-Pruning); its statistics come from each pass.",
                ),
                io.Float.Input(
                    "sparsity",
                    default=0.5,
                    min=0.01,
                    max=0.99,
                    step=0.01,
                    tooltip="Fraction of weights removed in every selected layer (0.5 for 2:4 and 4:8).",
                ),
                io.Combo.Input(
                    "pattern",
                    options=list(PATTERNS),
                    default="unstructured",
                    tooltip="2:4 / 4:8 keep N of every M inputs (GPU sparse kernels need 2:4).",
                ),
                io.Boolean.Input("attention", default=True, tooltip="Prune attention qkv / proj layers."),
                io.Boolean.Input("mlp", default=True, tooltip="Prune MLP layers."),
                io.Boolean.Input(
                    "single_fused", default=True, tooltip="Prune FLUX single-block linear1/linear2."
                ),
                io.Boolean.Input(
                    "modulation", default=False, tooltip="Prune adaLN modulation layers (off by default)."
                ),
                io.String.Input(
                    "layer_regex", default="", tooltip="Optional: only layers whose name matches."
                ),
                io.Float.Input(
                    "memory_budget_gb",
                    default=0.0,
                    min=0.0,
                    max=1024.0,
                    step=0.5,
                    tooltip="GiB of Gram matrices alive at once (fewer passes with more). 0: a quarter of the "
                    "free memory, at most 8 GiB. FLUX.1-dev's largest layer needs 0.92 GiB.",
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
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The pruned, reconstructed model."),
                io.String.Output(
                    display_name="report",
                    tooltip="Passes, per-layer sparsity and output error; connect Preview Any to read it.",
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
        saliency: SaliencySpec | None = None,
        clusters: GroupingSpec | None = None,
    ) -> io.NodeOutput:
        chosen = {"attention": attention, "mlp": mlp, "single_fused": single_fused, "modulation": modulation}
        families = (*[f for f, on in chosen.items() if on], "block_linear")
        nm = parse_pattern(pattern)
        if nm is not None:
            sparsity = 1 - nm[0] / nm[1]
        grouping = clusters or GroupingSpec()
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
        )
        dm = diffusion_model(model, action="prune and reconstruct it")
        pruned = model.clone()
        comfy.model_management.load_models_gpu([pruned])  # the clone's backup holds the originals from now on

        def target_weight(name: str, _layer: torch.nn.Linear) -> torch.Tensor:
            """The weight the incoming MODEL computes with (original + its own patches, e.g. a LoRA)."""
            key = f"{PREFIX}{name}.weight"
            backup = pruned.backup.get(key)
            original = backup.weight.detach() if backup is not None else original_weight(model, key)
            patched = _patched_fp32(model, key, original)
            return original if patched is None else patched

        def write(name: str, _layer: torch.nn.Linear, new: torch.Tensor, keep: torch.Tensor) -> None:
            keep = keep.cpu()
            stored_dtype = original_weight(model, f"{PREFIX}{name}.weight").dtype
            values = new.detach().cpu()[keep].to(stored_dtype)
            patch = ReconstructedPatch(PackedMask.from_bool(keep), values, name)
            pruned.add_patches({f"{PREFIX}{name}.weight": patch}, 1.0)

        def run(cal: Calibrator) -> None:
            sample_calibrating(
                cal, pruned, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler
            )

        budget = int(memory_budget_gb * _GIB) if memory_budget_gb > 0 else None
        report = prune_sequential_(
            dm,
            run,
            config,
            memory_budget_bytes=budget,
            weighting=timestep_weighting,
            progress=Progress(),
            weight_fn=target_weight,
            write_fn=write,
        )
        pruned.model_options["ditprune"] = {
            "config": config.to_dict(),
            "sparsity": report.sparsity.sparsity,
            "passes": len(report.passes),
        }
        return io.NodeOutput(pruned, report.to_text())
