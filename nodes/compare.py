"""Compare: dense vs pruned images from the same seed."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..ditprune_core.util.metrics import non_finite_note, psnr, relative_error
from .common import CATEGORY

log = logging.getLogger("ditprune")


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
            outputs=[
                io.String.Output(
                    display_name="metrics",
                    tooltip="PSNR, relative error and max difference of pruned vs dense; connect Preview Any to read it.",
                ),
                io.Image.Output(display_name="difference", tooltip="|pruned - dense| times amplify."),
            ],
        )

    @classmethod
    def execute(cls, dense: torch.Tensor, pruned: torch.Tensor, amplify: float) -> io.NodeOutput:
        if dense.shape != pruned.shape:
            raise ValueError(
                f"dense image is {tuple(dense.shape)} but pruned is {tuple(pruned.shape)}: compare "
                "images made with the same size and batch"
            )
        d, p = dense.float(), pruned.float()
        bad = non_finite_note({"dense": d, "pruned": p})
        if bad is not None:
            text = (
                f"cannot compare: {bad} (PSNR and relative error would be NaN). A NaN image comes from "
                "a model that overflowed (float16 weights beyond its range?) or a damaged checkpoint: "
                "check that input's model"
            )
            log.warning("ditprune Compare: %s", text)
            diff = ((p - d).abs() * amplify).nan_to_num(nan=1.0, posinf=1.0).clamp(0, 1)
            return io.NodeOutput(text, diff, ui={"text": [text]})
        # images are in [0, 1]: PSNR over a range of 1 (psnr() takes [-1, 1] data, so map to it)
        text = (
            f"PSNR {psnr(p * 2 - 1, d * 2 - 1):.2f} dB, relative error {relative_error(p, d):.4f}, "
            f"max abs difference {float((p - d).abs().max()):.4f}"
        )
        diff = ((p - d).abs() * amplify).clamp(0, 1)
        return io.NodeOutput(text, diff, ui={"text": [text]})
