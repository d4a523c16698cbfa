"""Held-out Check: a few held-out and seen prompts sampled by the dense and the pruned model from the
same noise, so that a result fitted to its calibration prompts shows at once."""

from __future__ import annotations

from typing import Any

import comfy.samplers
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

import nodes as comfy_nodes  # ComfyUI's nodes.py

from ..ditprune_core.prompts import HeldOutCheck, PromptScore, sample_scores
from ..ditprune_core.util.imaging import image_grid, label_rows
from .common import CATEGORY, Progress, show_text
from .prompts import EncodedPrompts, PromptsType, check_prompts_fit, with_settings_of

#: the difference column is |pruned - dense| times this
AMPLIFY = 4.0


def spread(items: tuple[Any, ...], count: int) -> list[int]:
    """``count`` indices spread evenly over ``items`` (all of them when there are fewer)."""
    n = len(items)
    if count >= n:
        return list(range(n))
    return [(i * n) // count for i in range(count)]


def check_has_held_out(prompts: EncodedPrompts) -> None:
    """Raises ValueError, saying how to add a held-out part, when the set has none."""
    if not prompts.held_out:
        raise ValueError(
            f"prompt set {prompts.prompts.source!r} has no held-out part, so there is nothing unseen to "
            "check: add a line '[held-out]' before the prompts to hold out, or set held_out_fraction on "
            "the Prompt Set node (e.g. 0.15)"
        )


def preview(samples: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) as (B, h, w, 3) pictures in [0, 1]: their first three channels, each
    picture scaled to its own range (only for the grid; the figures use the latents themselves)."""
    x = samples[:, :3].float()
    if x.shape[1] < 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - low) / (high - low).clamp_min(1e-12)).permute(0, 2, 3, 1)


class DitPruneHeldOutCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneHeldOutCheck",
            display_name="DiT-Pruning Held-out Check",
            category=CATEGORY,
            description="Samples a few held-out prompts (never calibrated on) and a few calibration prompts "
            "with the dense and the pruned model from the same noise, at low steps, and reports relative "
            "error and PSNR of held-out against seen prompts, with an image grid. Held-out much worse than "
            "seen (ratio 2 and more): the pruning fitted its calibration prompts; calibrate on more.",
            inputs=[
                io.Model.Input("model", tooltip="The dense model (the one that was pruned)."),
                io.Model.Input(
                    "pruned_model", tooltip="The pruned model (Apply Pruning / Prune and Reconstruct)."
                ),
                PromptsType.Input("prompt_set", tooltip="The prompt set the pruning was calibrated on."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (its pass is skipped at cfg 1)."),
                io.Latent.Input("latent_image", tooltip="Empty latent: the size the check samples at."),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="The shared noise's seed."
                ),
                io.Int.Input(
                    "steps",
                    default=4,
                    min=1,
                    max=200,
                    tooltip="Sampling steps (few: a check, not a picture). Cost: 2 models x (held-out + "
                    "seen prompts) sampler runs of this many steps.",
                ),
                io.Float.Input(
                    "cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="CFG scale."
                ),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampler."),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="simple",
                    tooltip="Scheduler.",
                ),
                io.Int.Input(
                    "held_out_prompts", default=4, min=1, max=64, tooltip="Held-out prompts to sample."
                ),
                io.Int.Input(
                    "seen_prompts",
                    default=4,
                    min=0,
                    max=64,
                    tooltip="Calibration prompts to sample, to compare with (0: none, no ratio).",
                ),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="Optional: measure and show decoded pictures (PSNR over [0, 1]). Without it the "
                    "figures are on the latents (PSNR over each dense latent's range).",
                ),
                io.Conditioning.Input(
                    "positive",
                    optional=True,
                    tooltip="Optional: its settings other than the text (FLUX guidance) apply to every prompt.",
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="report",
                    tooltip="Relative error and PSNR, held-out vs seen, per prompt; connect Preview Any.",
                ),
                io.Image.Output(
                    display_name="grid",
                    tooltip=f"One row per prompt: dense | pruned | difference x{AMPLIFY:g}.",
                ),
            ],
            is_output_node=False,
        )

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        pruned_model: ModelPatcher,
        prompt_set: EncodedPrompts,
        negative: list,
        latent_image: dict,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        held_out_prompts: int,
        seen_prompts: int,
        vae: Any = None,
        positive: list | None = None,
    ) -> io.NodeOutput:
        check_has_held_out(prompt_set)
        check_prompts_fit(prompt_set, positive or prompt_set.held_out[0], pruned_model.model.diffusion_model)
        chosen = [(True, i) for i in spread(prompt_set.held_out, held_out_prompts)]
        chosen += [(False, i) for i in spread(prompt_set.calibration, seen_prompts)]
        progress = Progress()
        scores, pictures, labels = [], [], []
        for k, (held, i) in enumerate(chosen):
            text = (prompt_set.prompts.held_out if held else prompt_set.prompts.calibration)[i]
            cond = (prompt_set.held_out if held else prompt_set.calibration)[i]
            if positive is not None:
                cond = with_settings_of(cond, positive)
            progress.phase(f"held-out check: prompt {k + 1} of {len(chosen)}")
            outs = []
            for m in (model, pruned_model):
                (samples,) = comfy_nodes.common_ksampler(
                    m, seed, steps, cfg, sampler_name, scheduler, cond, negative, latent_image
                )
                outs.append(samples["samples"])
            dense, pruned = outs
            if vae is not None:
                dense, pruned = vae.decode(dense), vae.decode(pruned)
                pair = sample_scores(pruned, dense, data_range=1.0)
                shown = (dense[0], pruned[0])
            else:
                pair = [
                    sample_scores(p[None], d[None], data_range=float(d.max() - d.min()))[0]
                    for p, d in zip(pruned, dense, strict=True)
                ]
                shown = (preview(dense[:1])[0], preview(pruned[:1])[0])
            rel = sum(r for r, _ in pair) / len(pair)
            db = sum(q for _, q in pair) / len(pair)
            scores.append(PromptScore(text, held, rel, db))
            d_img, p_img = (x.float().cpu() for x in shown)
            pictures += [d_img, p_img, ((p_img - d_img).abs() * AMPLIFY).clamp(0, 1)]
            labels.append(f"{'held-out' if held else 'seen'} {rel:.3f}: {text[:28]}")
        check = HeldOutCheck(tuple(scores), "decoded images" if vae is not None else "latents")
        text = check.to_text()
        show_text(text)
        return io.NodeOutput(text, held_out_grid(pictures, labels))


def held_out_grid(pictures: list[torch.Tensor], labels: list[str]) -> torch.Tensor:
    """(1, H, W, 3) IMAGE: rows of dense | pruned | difference, each row labelled."""
    h, w = pictures[0].shape[:2]
    scale = max(1, 96 // max(h, w))  # tiny latents are enlarged so that a row fits its label
    stack = torch.stack([p * 2 - 1 for p in pictures]).permute(0, 3, 1, 2)
    grid = image_grid(stack, rows=len(labels), scale=scale)
    return label_rows(grid, labels)[None]


__all__ = ["DitPruneHeldOutCheck", "check_has_held_out"]
