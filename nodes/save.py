"""Save Pruned Model and Compare."""

from __future__ import annotations

import json
from typing import Any

import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..ditprune_core import __version__
from ..ditprune_core.bench.evaluation import psnr, relative_error
from ..ditprune_core.checkpoint import load_pruned_checkpoint, read_checkpoint_info, save_pruned_checkpoint
from ..ditprune_core.io import next_free_path
from .common import (
    CATEGORY,
    PREFIX,
    Progress,
    diffusion_model,
    diffusion_models_dir,
    safe_child,
    stored_weight,
)
from .packed import PackedLinear, PackedOps, make_packed


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
                    tooltip="dense: same size as the original, any loader; compressed: bitmask or 2:4 "
                    "packing of pruned weights (DiT-Pruning Load Pruned Model).",
                ),
                io.Combo.Input(
                    "values",
                    options=["keep dtype", "fp8_e4m3fn"],
                    default="keep dtype",
                    tooltip="compressed only: store pruned weights' values as fp8 with per-row scales "
                    "(lossy, bounded error) or keep their dtype (bit-exact).",
                ),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, model: Any, filename_prefix: str, format: str = "dense", values: str = "keep dtype"
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
        progress = Progress(2 * len(keys))
        done = {"n": 0}

        def source(key: str) -> Any:
            def produce() -> torch.Tensor:
                done["n"] += 1
                progress(min(done["n"], 2 * len(keys)), 2 * len(keys))
                return stored_weight(model, PREFIX + key)

            return produce

        info = model.model_options.get("ditprune", {})
        metadata = {"ditprune_version": __version__, "ditprune": json.dumps(info, default=str)}
        report = save_pruned_checkpoint(
            {k: source(k) for k in keys},
            target,
            format=format,
            metadata=metadata,
            value_dtype=torch.float8_e4m3fn if values == "fp8_e4m3fn" else None,
        )
        text = (
            f"saved {target} ({report.ratio:.1%} of the dense size, {len(report.layouts)} tensors compressed)"
        )
        return io.NodeOutput(str(target), ui={"text": [text]})


MODES = ("compressed on device", "densify at load")


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
                    options=folder_paths.get_filename_list("diffusion_models"),
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
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model_name: str, mode: str = MODES[0], sparse_kernels: bool = False) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        info = read_checkpoint_info(path)
        layouts: dict[str, dict[str, str]] = info["layouts"]  # type: ignore[assignment]
        if mode == "densify at load" or not layouts:
            state = load_pruned_checkpoint(path)
            model = comfy.sd.load_diffusion_model_state_dict(state)
        else:
            state = comfy.utils.load_torch_file(path)
            dtypes = [getattr(torch, v["dtype"]) for v in layouts.values()]
            options = {"custom_operations": PackedOps, "dtype": max(set(dtypes), key=dtypes.count)}
            model = comfy.sd.load_diffusion_model_state_dict(state, model_options=options)
            if model is not None:
                model = make_packed(model, sparse_kernels)
        if model is None:
            raise ValueError(f"{path}: ComfyUI could not detect the model type of this checkpoint")
        return io.NodeOutput(model)


def _as_images(x: Any) -> torch.Tensor:
    if isinstance(x, dict):
        return x["samples"].float()
    return x.float()


class DitPruneCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneCompare",
            display_name="DiT-Pruning Compare",
            category=CATEGORY,
            description="Dense vs pruned from the same seed: PSNR, relative error and an amplified difference.",
            inputs=[
                io.Image.Input("dense", tooltip="Image from the dense model."),
                io.Image.Input("pruned", tooltip="Image from the pruned model, same seed and settings."),
                io.Float.Input(
                    "amplify",
                    default=4.0,
                    min=1.0,
                    max=64.0,
                    step=1.0,
                    tooltip="Multiply the difference image by this.",
                ),
            ],
            outputs=[io.String.Output(display_name="metrics"), io.Image.Output(display_name="difference")],
        )

    @classmethod
    def execute(cls, dense: torch.Tensor, pruned: torch.Tensor, amplify: float) -> io.NodeOutput:
        if dense.shape != pruned.shape:
            raise ValueError(
                f"dense image is {tuple(dense.shape)} but pruned is {tuple(pruned.shape)}: compare "
                "images made with the same size and batch"
            )
        d, p = dense.float(), pruned.float()
        # images are in [0, 1]: PSNR over a range of 1 (psnr() takes [-1, 1] data, so map to it)
        text = (
            f"PSNR {psnr(p * 2 - 1, d * 2 - 1):.2f} dB, relative error {relative_error(p, d):.4f}, "
            f"max abs difference {float((p - d).abs().max()):.4f}"
        )
        diff = ((p - d).abs() * amplify).clamp(0, 1)
        return io.NodeOutput(text, diff, ui={"text": [text]})
