"""Save Pruned Model: the diffusion model, pruning baked in, dense or compressed."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..ditprune_core import __version__
from ..ditprune_core.save import save_pruned_checkpoint
from ..ditprune_core.util.io import next_free_path
from .common import (
    CATEGORY,
    PREFIX,
    Progress,
    diffusion_model,
    diffusion_models_dir,
    safe_child,
    stored_weight,
)
from .packed import PackedLinear


class DitPruneSavePrunedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneSavePrunedModel",
            display_name="DiT-Pruning Save Pruned Model",
            category=CATEGORY,
            description="Writes the diffusion model, pruning baked in, to models/diffusion_models/. 'dense' files open "
            "in the stock Load Diffusion Model node; 'compressed' files (about 56% of bf16 at 50% sparsity, 31% with "
            "fp8 values) open in DiT-Pruning Load Pruned Model. Never overwrites a file.",
            inputs=[
                io.Model.Input("model", tooltip="A model from Apply Pruning (any MODEL can be saved)."),
                io.String.Input(
                    "filename_prefix",
                    default="ditprune/pruned",
                    tooltip="Name inside models/diffusion_models; a counter is appended (_00001).",
                ),
                io.Combo.Input(
                    "format",
                    options=["dense", "compressed"],
                    default="dense",
                    tooltip="dense: same size as the original, opens in the stock Load Diffusion Model; "
                    "compressed: bitmask or 2:4 packing of pruned weights, opens only in DiT-Pruning Load "
                    "Pruned Model.",
                ),
                io.Combo.Input(
                    "values",
                    options=["keep dtype", "fp8_e4m3fn"],
                    default="keep dtype",
                    tooltip="compressed only: store pruned weights' values as fp8 with per-row scales "
                    "(lossy, bounded error) or keep their dtype (bit-exact).",
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="path",
                    tooltip="The file written, and which loader opens it; connect Preview Any to read it.",
                )
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, model: ModelPatcher, filename_prefix: str, format: str = "dense", values: str = "keep dtype"
    ) -> io.NodeOutput:
        dm = diffusion_model(model)
        if any(isinstance(m, PackedLinear) and m.is_packed for m in dm.modules()):
            raise ValueError(
                "this model was loaded compressed; it is saved already. To save it again, load it "
                "with mode 'densify at load'"
            )
        if format == "dense" and values != "keep dtype":
            raise ValueError("fp8 values need format 'compressed'; choose 'keep dtype' for a dense file")
        folder = diffusion_models_dir()
        prefix = safe_child(folder, filename_prefix.strip() or "ditprune/pruned")
        target = next_free_path(prefix.parent, prefix.name, ".safetensors")
        keys = list(dm.state_dict().keys())

        def source(key: str) -> Callable[[], torch.Tensor]:
            return lambda: stored_weight(model, PREFIX + key)

        info = model.model_options.get("ditprune", {})
        metadata = {"ditprune_version": __version__, "ditprune": json.dumps(info, default=str)}
        report = save_pruned_checkpoint(
            {k: source(k) for k in keys},
            target,
            format=format,
            metadata=metadata,
            value_dtype=torch.float8_e4m3fn if values == "fp8_e4m3fn" else None,
            progress=Progress(),
        )
        loader = "DiT-Pruning Load Pruned Model" if format == "compressed" else "Load Diffusion Model"
        text = (
            f"saved {target} ({report.ratio:.1%} of the dense size, {len(report.layouts)} tensors compressed); "
            f"open it with {loader}"
        )
        return io.NodeOutput(str(target), ui={"text": [text]})
