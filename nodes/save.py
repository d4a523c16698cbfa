"""Save Pruned Model: the diffusion model, pruning baked in, dense or compressed."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..ditprune_core import __version__
from ..ditprune_core.save import save_pruned_checkpoint
from ..ditprune_core.util.io import check_name_fits, next_free_path
from ..ditprune_core.util.save_dtype import cast_exactly, narrowest_exact_dtype
from .common import (
    CATEGORY,
    PREFIX,
    Progress,
    diffusion_model,
    diffusion_models_dir,
    original_weight,
    safe_child,
    stored_weight,
)

DTYPE_CHOICES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def save_dtype(model: ModelPatcher, keys: list[str], choice: str) -> tuple[torch.dtype | None, str]:
    """The dtype to save the float tensors of ``model`` in (None: as stored), and how it was chosen.

    ComfyUI (v0.3.64) does not record the dtype of the file a model came from: it loads a bf16 FLUX
    into fp32 on a CPU and keeps only that. ``auto`` reads it back from the unpatched weights, as
    the narrowest dtype that holds a sample of every one of them exactly.
    """
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"unknown save dtype {choice!r}; choose from {list(DTYPE_CHOICES)}")
    if choice != "auto":
        return DTYPE_CHOICES[choice], choice
    found = narrowest_exact_dtype(original_weight(model, PREFIX + k) for k in keys)
    if found is None:
        return None, "the dtype it is stored in"
    stored, narrowest = found
    name = str(narrowest).removeprefix("torch.")
    return (
        narrowest,
        f"{name}, the dtype of its source (ComfyUI holds it in {str(stored).removeprefix('torch.')})",
    )


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
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPE_CHOICES),
                    default="auto",
                    optional=True,  # prompts saved before it existed still validate
                    tooltip="auto: the dtype of the file the model came from (a bf16 FLUX that ComfyUI "
                    "computes in fp32 is saved as bf16), read from the weights: never larger, never lossy. "
                    "bf16 / fp16 / fp32: that dtype for every float tensor.",
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
        cls,
        model: ModelPatcher,
        filename_prefix: str,
        format: str = "dense",
        values: str = "keep dtype",
        dtype: str = "auto",
    ) -> io.NodeOutput:
        dm = diffusion_model(model, action="save it again (it is saved already)")
        if format == "dense" and values != "keep dtype":
            raise ValueError("fp8 values need format 'compressed'; choose 'keep dtype' for a dense file")
        folder = diffusion_models_dir()
        prefix = safe_child(folder, filename_prefix.strip() or "ditprune/pruned")
        target = next_free_path(prefix.parent, prefix.name, ".safetensors")
        check_name_fits(target)  # now, not after every tensor has been made once
        keys = list(dm.state_dict().keys())
        save_as, how = save_dtype(model, keys, dtype)
        verified: set[str] = set()

        def produce(key: str) -> torch.Tensor:
            tensor = stored_weight(model, PREFIX + key)
            if save_as is None or not tensor.is_floating_point() or tensor.dtype == save_as:
                return tensor
            if dtype == "auto" and tensor.element_size() <= save_as.itemsize:
                return tensor  # already at most that narrow
            original = None
            if dtype == "auto" and key not in verified:  # every entry, once: the choice read a sample
                original = original_weight(model, PREFIX + key)
                verified.add(key)
            return cast_exactly(tensor, save_as, key, original=original)

        def source(key: str) -> Callable[[], torch.Tensor]:
            return lambda: produce(key)

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
            f"saved {target} in {how} ({report.ratio:.1%} of the dense size, {len(report.layouts)} "
            f"tensors compressed); open it with {loader}"
        )
        return io.NodeOutput(str(target), ui={"text": [text]})
