"""Load Pruned Model: a ditprune checkpoint, kept compressed on the device or densified at load."""

from __future__ import annotations

from typing import Any

import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..ditprune_core.load import (
    decoded_dtype,
    decoded_placeholders,
    load_pruned_checkpoint,
    read_checkpoint_info,
    validate_compressed_state,
)
from .choices import NO_DIFFUSION_MODELS, options, refuse_placeholder
from .packed import PackedLinear, PackedOps, make_packed

MODES = ("compressed on device", "densify at load")
#: the dtype LoRA-style patches on compressed layers are applied in (ComfyUI-GGUF's patch_dtype)
PATCH_DTYPES = {"float32": torch.float32, "target": None}


def refuse_unpacked(model: Any, expected: int, path: str) -> None:
    """Every compressed tensor of the file became a compressed Linear layer (a compressed weight of
    any other module would be left as an empty stand-in).

    Raises:
        ValueError: naming the file and how to load it instead.
    """
    packed = sum(isinstance(m, PackedLinear) and m.is_packed for m in model.model.modules())
    if packed < expected:
        raise ValueError(
            f"{path}: {expected - packed} of its {expected} compressed tensors are not weights of Linear "
            "layers, which are all that can stay compressed on the device; load it with mode 'densify at load'"
        )


class DitPruneLoadPrunedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneLoadPrunedModel",
            display_name="DiT-Pruning Load Pruned Model",
            category="loaders",
            description="Loads a checkpoint saved by DiT-Pruning Save Pruned Model (dense or compressed) through "
            "ComfyUI's own model detection. Pruned weights can stay compressed in memory and be decompressed "
            "one layer at a time per forward; LoRA and other patches still apply.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=options("diffusion_models", NO_DIFFUSION_MODELS),
                    tooltip="A ditprune checkpoint in models/diffusion_models.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default=MODES[0],
                    tooltip="compressed on device: less memory, each pruned layer is decompressed when "
                    "it runs; densify at load: ordinary dense weights.",
                ),
                io.Boolean.Input(
                    "sparse_kernels",
                    default=False,
                    tooltip="2:4 layers use torch's semi-structured sparse kernels where they exist "
                    "(CUDA, fp16/bf16, Ampere or newer); elsewhere this falls back to dense.",
                ),
                io.Boolean.Input(
                    "patch_on_device",
                    default=False,
                    optional=True,
                    tooltip="compressed on device: LoRA patches are moved to the GPU once when applied, "
                    "instead of being copied there by every forward (costs their size in VRAM).",
                ),
                io.Combo.Input(
                    "patch_dtype",
                    options=list(PATCH_DTYPES),
                    default="float32",
                    optional=True,
                    tooltip="compressed on device: the dtype LoRA patches are applied in every forward. "
                    "float32 is exact; target uses the model's compute dtype (bf16/fp16): no float32 "
                    "copy of each weight, slightly less precise.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL", tooltip="The pruned model, ready for KSampler (LoRAs still apply)."
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        model_name: str,
        mode: str = MODES[0],
        sparse_kernels: bool = False,
        patch_on_device: bool = False,
        patch_dtype: str = "float32",
    ) -> io.NodeOutput:
        refuse_placeholder(model_name, NO_DIFFUSION_MODELS, "diffusion_models")
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        info = read_checkpoint_info(path)
        layouts = info.layouts
        if sparse_kernels and layouts and all(entry["layout"] == "dense" for entry in layouts.values()):
            raise ValueError(
                f"{path}: sparse_kernels runs 2:4-pruned layers with sparse kernels, but this file has no "
                "pruned layer (quantise only: every compressed layer is dense codes, no mask); turn "
                "sparse_kernels off to load it"
            )
        if mode == "densify at load" or not layouts:
            state = load_pruned_checkpoint(path)  # checks every piece and checksum as it decodes
            model = comfy.sd.load_diffusion_model_state_dict(state)
        else:
            state = comfy.utils.load_torch_file(path)
            # every piece, count, code range and checksum is checked before anything is built from it
            validate_compressed_state(state, path, info)
            # ComfyUI's detection reads widths off weight shapes (Wan's ffn, Qwen-Image, ...): show it
            # each compressed weight's true shape and dtype (meta tensors, no memory); PackedLinear
            # then takes the pieces and drops the placeholder
            state.update(decoded_placeholders(state, info))
            options = {"custom_operations": PackedOps, "dtype": decoded_dtype(info)}
            model = comfy.sd.load_diffusion_model_state_dict(state, model_options=options)
            if model is not None:
                model = make_packed(
                    model,
                    sparse_kernels,
                    patch_on_device=patch_on_device,
                    patch_dtype=PATCH_DTYPES[patch_dtype],
                )
                refuse_unpacked(model, len(layouts), path)
        if model is None:
            raise ValueError(f"{path}: ComfyUI could not detect the model type of this checkpoint")
        return io.NodeOutput(model)
