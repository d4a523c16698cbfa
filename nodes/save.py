"""Save Pruned Model and Compare."""

from __future__ import annotations

import json
from typing import Any

import torch
from comfy_api.latest import io

from ..ditprune_core import __version__
from ..ditprune_core.bench.evaluation import psnr, relative_error
from ..ditprune_core.io import next_free_path
from ..ditprune_core.safetensors_io import LazyTensor, write_safetensors
from .common import (
    CATEGORY,
    PREFIX,
    Progress,
    diffusion_model,
    diffusion_models_dir,
    safe_child,
    stored_weight,
)


class DitPruneSavePrunedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneSavePrunedModel",
            display_name="DiT-Pruning Save Pruned Model",
            category=CATEGORY,
            description="Writes the diffusion model, pruning baked in, to models/diffusion_models/ for the stock "
            "Load Diffusion Model node. Weights keep their dtype; never overwrites a file.",
            inputs=[
                io.Model.Input("model", tooltip="A model from Apply Pruning (any MODEL can be saved)."),
                io.String.Input(
                    "filename_prefix",
                    default="ditprune/pruned",
                    tooltip="Name inside models/diffusion_models; a counter is appended (_00001).",
                ),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: Any, filename_prefix: str) -> io.NodeOutput:
        dm = diffusion_model(model)
        folder = diffusion_models_dir()
        prefix = safe_child(folder, filename_prefix.strip() or "ditprune/pruned")
        target = next_free_path(prefix.parent, prefix.name, ".safetensors")
        state = dm.state_dict()
        progress = Progress(len(state))
        tensors = {}
        for i, (key, value) in enumerate(state.items()):

            def produce(key: str = key, i: int = i) -> torch.Tensor:
                progress(i + 1, len(state))
                return stored_weight(model, PREFIX + key)

            tensors[key] = LazyTensor(tuple(value.shape), value.dtype, produce)
        info = model.model_options.get("ditprune", {})
        metadata = {
            "format": "ditprune.pruned_diffusion_model",
            "ditprune_version": __version__,
            "ditprune": json.dumps(info, default=str),
        }
        write_safetensors(target, tensors, metadata)
        return io.NodeOutput(str(target), ui={"text": [f"saved {target}"]})


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
