"""Prompt sets in the graph: the Prompt Set node (one prompt a line, encoded with the workflow's CLIP),
and the calibration plan the calibrating nodes run over it (prompts x seeds x sizes per pass)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import folder_paths
import torch
from comfy_api.latest import io
from torch import nn

from ..ditprune_core.prompts import (
    DEFAULT_MAX_PROMPTS,
    DEFAULT_PROMPT_FILE,
    PromptSet,
    calibration_record,
    calibration_runs,
    parse_prompts,
    parse_sizes,
    read_prompt_file,
)
from .common import CATEGORY, Progress, SamplerRun, sample_calibrating, show_text

PromptsType = io.Custom("DITPRUNE_PROMPTS")

SHIPPED = "(shipped default set)"
TEXT_BOX = "(the text below)"
#: latents of the image DiTs ditprune prunes (FLUX, SD3) are 1/8 of the picture's size
LATENT_SCALE = 8


@dataclass(frozen=True)
class EncodedPrompts:
    """A prompt set encoded with the workflow's CLIP: one CONDITIONING per prompt, as
    CLIPTextEncode makes it, and the conditioning's widths (for the model-family check)."""

    prompts: PromptSet
    calibration: tuple[list, ...]
    held_out: tuple[list, ...]
    context_width: int
    pooled_width: int | None
    seeds: int = 1  # every prompt is sampled from seed, seed + 1, ... (the calibrating node's seed)
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) in pixels; empty: the node's LATENT


def conditioning_widths(cond: Any) -> tuple[int, int | None]:
    """(context width, pooled width or None) of a CONDITIONING's first entry."""
    pooled = cond[0][1].get("pooled_output") if isinstance(cond[0][1], dict) else None
    return int(cond[0][0].shape[-1]), None if pooled is None else int(pooled.shape[-1])


def prompt_text_files() -> list[str]:
    """``.txt`` files in ComfyUI's input folder (and its subfolders)."""
    base = Path(folder_paths.get_input_directory())
    if not base.is_dir():
        return []
    return sorted(str(p.relative_to(base)) for p in base.rglob("*.txt") if p.is_file())


def read_prompts(source: str, text: str, *, max_prompts: int, held_out_fraction: float) -> PromptSet:
    """The :class:`PromptSet` the node's ``source`` names: the shipped set, the text box, or a file
    of the input folder (its path checked to stay inside it)."""
    if source == SHIPPED:
        return read_prompt_file(
            DEFAULT_PROMPT_FILE, max_prompts=max_prompts, held_out_fraction=held_out_fraction
        )
    if source == TEXT_BOX:
        return parse_prompts(
            text, source="text box", max_prompts=max_prompts, held_out_fraction=held_out_fraction
        )
    base = Path(folder_paths.get_input_directory()).resolve()
    path = (base / source).resolve()
    if base not in path.parents:
        raise ValueError(f"prompt file {source!r} is outside ComfyUI's input folder {base}; put it there")
    return read_prompt_file(path, max_prompts=max_prompts, held_out_fraction=held_out_fraction)


def encode_prompts(
    clip: Any, prompts: PromptSet, *, seeds: int = 1, sizes: tuple[tuple[int, int], ...] = ()
) -> EncodedPrompts:
    """Encode every prompt as CLIPTextEncode does (``clip.encode_from_tokens_scheduled(clip.tokenize(text))``),
    showing ``encoding prompt k of n`` and honouring interrupts between prompts."""
    if clip is None:
        raise ValueError("the clip input is None: connect the text encoder of this workflow's model")
    every = [*prompts.calibration, *prompts.held_out]
    progress = Progress()
    conds = []
    for k, text in enumerate(every):
        progress.phase(f"encoding prompt {k + 1} of {len(every)}")
        conds.append(clip.encode_from_tokens_scheduled(clip.tokenize(text)))
    context, pooled = conditioning_widths(conds[0])
    n = len(prompts.calibration)
    return EncodedPrompts(prompts, tuple(conds[:n]), tuple(conds[n:]), context, pooled, seeds, sizes)


def with_settings_of(cond: list, template: Any) -> list:
    """``cond`` (one prompt's CONDITIONING) with the non-text settings of ``template`` (the node's
    ``positive``: FLUX guidance from FluxGuidance, ...) under its own text values."""
    extra = {k: v for k, v in template[0][1].items() if k not in ("pooled_output",)}
    return [[c, {**extra, **opts}] for c, opts in cond]


def model_text_width(module: nn.Module) -> int | None:
    """The conditioning width the DiT's text input takes (FLUX ``txt_in``, SD3 ``context_embedder``)."""
    for name in ("txt_in", "context_embedder"):
        layer = getattr(module, name, None)
        if isinstance(layer, nn.Linear):
            return int(layer.in_features)
    return None


def check_prompts_fit(prompts: EncodedPrompts, positive: Any, module: nn.Module) -> None:
    """The set was encoded for this model: the same conditioning widths as ``positive``, and the
    width the model's text input takes.

    Raises:
        ValueError: naming both widths and how to fix it.
    """
    widths = (prompts.context_width, prompts.pooled_width)
    theirs = conditioning_widths(positive)
    fix = (
        "encode the prompt set with the CLIP (text encoder) that belongs to this MODEL, the one that "
        "encodes the positive prompt"
    )
    if widths != theirs:
        raise ValueError(
            f"prompt set {prompts.prompts.source!r} was encoded by a text encoder of another model family: its "
            f"conditioning is {widths[0]} wide (pooled {widths[1]}), the positive prompt's {theirs[0]} "
            f"(pooled {theirs[1]}); {fix}"
        )
    expected = model_text_width(module)
    if expected is not None and expected != prompts.context_width:
        raise ValueError(
            f"prompt set {prompts.prompts.source!r} is {prompts.context_width} wide, but this MODEL's text "
            f"input takes {expected}: another model family; {fix}"
        )


def conditioning_label(cond: Any) -> str:
    """``"conditioning <hash>"``: a prompt given as a CONDITIONING (its text is unknown)."""
    tensor = cond[0][0].detach().to("cpu", torch.float32).contiguous()
    return "conditioning " + hashlib.sha256(tensor.numpy().tobytes()).hexdigest()[:12]


def latent_of_size(latent: dict, size: tuple[int, int]) -> dict:
    """An empty LATENT like ``latent`` (batch, channels) for a ``(width, height)`` picture."""
    samples = latent["samples"]
    if samples.dim() != 4:
        raise ValueError(
            f"sizes need an image LATENT (4 dimensions), this one is {tuple(samples.shape)}; leave sizes "
            "empty for video models"
        )
    width, height = size
    return {
        "samples": torch.zeros(
            samples.shape[0], samples.shape[1], height // LATENT_SCALE, width // LATENT_SCALE
        )
    }


def size_label(latent: dict) -> str:
    h, w = latent["samples"].shape[-2:]
    return f"{w * LATENT_SCALE}x{h * LATENT_SCALE}"


@dataclass(frozen=True)
class CalibrationPlan:
    """The sampler runs of one calibration pass: every calibration prompt (or the node's own
    ``positive``) x ``seeds`` seeds (``seed``, ``seed + 1``, ...) x every size (or the LATENT's)."""

    base: SamplerRun
    prompts: EncodedPrompts | None = None
    seeds: int = 1
    sizes: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, base: SamplerRun, prompts: EncodedPrompts | None, module: nn.Module) -> CalibrationPlan:
        """The plan of a calibrating node's run (the set's seeds and sizes), checked: the set is
        of this model family, and sizes need an image LATENT."""
        if prompts is None:
            return cls(base)
        check_prompts_fit(prompts, base.positive, module)
        plan = cls(base, prompts, prompts.seeds, prompts.sizes)
        if plan.sizes:
            latent_of_size(base.latent_image, plan.sizes[0])  # refuses a video latent now, not mid-run
        return plan

    @property
    def prompt_count(self) -> int:
        return 1 if self.prompts is None else len(self.prompts.calibration)

    @property
    def runs_per_pass(self) -> int:
        return calibration_runs(self.prompt_count, self.seeds, max(1, len(self.sizes)))

    def runs(self) -> list[tuple[str, SamplerRun]]:
        """``(label, run)`` for every sampler run of a pass, prompt by prompt."""
        conds = (
            [self.base.positive]
            if self.prompts is None
            else [with_settings_of(c, self.base.positive) for c in self.prompts.calibration]
        )
        latents = [latent_of_size(self.base.latent_image, s) for s in self.sizes] or [self.base.latent_image]
        out = []
        for k, cond in enumerate(conds):
            for i in range(self.seeds):
                for latent in latents:
                    label = f"prompt {k + 1} of {len(conds)}, seed {self.base.seed + i}, {size_label(latent)}"
                    run = replace(self.base, positive=cond, seed=self.base.seed + i, latent_image=latent)
                    out.append((label, run))
        return out

    def record(self, weighting: str) -> dict[str, Any]:
        """What a calibration made with this plan saw (:func:`calibration_record`)."""
        if self.prompts is None:
            texts = [conditioning_label(self.base.positive)]
            source = "positive"
        else:
            texts = list(self.prompts.prompts.calibration)
            source = self.prompts.prompts.source
        sizes = [f"{w}x{h}" for w, h in self.sizes] or [size_label(self.base.latent_image)]
        return calibration_record(
            prompts=texts,
            seeds=range(self.base.seed, self.base.seed + self.seeds),
            sizes=sizes,
            steps=self.base.steps,
            weighting=weighting,
            source=source,
        )

    def cost_text(self) -> str:
        """``per pass: 12 sampler runs (4 prompts x 3 seeds x 1 size) x 8 steps = 96 model calls``."""
        sizes = max(1, len(self.sizes))
        calls_per_step = 1 if self.base.cfg == 1.0 else 2
        calls = self.runs_per_pass * self.base.steps * calls_per_step
        cfg = "" if calls_per_step == 1 else " (x2: cfg != 1 runs the negative too)"
        return (
            f"per pass: {self.runs_per_pass} sampler run(s) ({self.prompt_count} prompt(s) x {self.seeds} "
            f"seed(s) x {sizes} size(s)) x {self.base.steps} steps = {calls} model calls{cfg}"
        )


def sample_plan(cal: Any, model: Any, plan: CalibrationPlan, progress: Progress) -> dict:
    """Every run of ``plan`` through :func:`~.common.sample_calibrating`, showing ``prompt k of n``
    under the current phase and checking for an interrupt before each run. Returns the first run's
    LATENT (what the model drew for the first prompt)."""
    first: dict | None = None
    runs = plan.runs()
    for k, (label, run) in enumerate(runs):
        progress.detail(f"{label} (sampler run {k + 1} of {len(runs)})")
        samples = sample_calibrating(cal, model, run)
        first = samples if first is None else first
    assert first is not None  # a plan has at least one run (one prompt, one seed, one size)
    return first


def prompt_inputs() -> list[io.Input]:
    """The optional input of a calibrating node that takes a prompt set (after its old inputs, so that
    saved workflows and API prompts without it still load and run as before)."""
    return [
        PromptsType.Input(
            "prompt_set",
            optional=True,
            tooltip="Optional, from Prompt Set: calibrate on all its calibration prompts (x its seeds x "
            "its sizes) instead of 'positive' (whose other settings, e.g. FLUX guidance, apply to every "
            "prompt). Cost per calibration pass: prompts x seeds x sizes sampler runs of 'steps' steps.",
        ),
    ]


class DitPrunePromptSet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPrunePromptSet",
            display_name="DiT-Pruning Prompt Set",
            category=CATEGORY,
            description="Many calibration prompts, one a line, encoded with the workflow's text encoder "
            "(as CLIP Text Encode does), with a held-out part that is never calibrated on (the held-out "
            "check samples it). A line '[held-out]' starts the held-out part; lines starting with # are "
            "comments. Feed Calibrate, Prune and Reconstruct and Held-out Check.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model to prune."),
                io.Combo.Input(
                    "source",
                    options=[SHIPPED, TEXT_BOX, *prompt_text_files()],
                    default=SHIPPED,
                    tooltip="The shipped set (103 calibration + 16 held-out prompts written for ditprune), "
                    "the text below, or a .txt file in ComfyUI's input folder (press R to refresh).",
                ),
                io.String.Input(
                    "text",
                    default="",
                    multiline=True,
                    tooltip="With source '(the text below)': one prompt per line; '[held-out]' on a line "
                    "of its own starts the held-out prompts.",
                ),
                io.Int.Input(
                    "max_prompts",
                    default=DEFAULT_MAX_PROMPTS,
                    min=1,
                    max=4096,
                    tooltip="Refuse a set with more prompts than this (every calibration prompt is "
                    "sampled in every calibration pass).",
                ),
                io.Float.Input(
                    "held_out_fraction",
                    default=0.0,
                    min=0.0,
                    max=0.9,
                    step=0.05,
                    tooltip="When the set has no '[held-out]' line: hold out this fraction of its prompts, "
                    "spread evenly over the list (the same list, the same split).",
                ),
                io.Int.Input(
                    "seeds_per_prompt",
                    default=1,
                    min=1,
                    max=64,
                    tooltip="Calibration samples every prompt from this many seeds (the calibrating node's "
                    "seed, seed+1, ...); multiplies the cost. 1 is the advice of the coverage benchmark: "
                    "more prompts help, more samples of the same prompt do not.",
                ),
                io.String.Input(
                    "sizes",
                    default="",
                    tooltip="Optional picture sizes, e.g. '1024x1024, 832x1216': calibration samples every "
                    "prompt at each (multiplies the cost). Empty: the calibrating node's LATENT size.",
                ),
            ],
            outputs=[
                PromptsType.Output(
                    display_name="prompt_set",
                    tooltip="The encoded prompts and their held-out split (the node shows how many, and "
                    "the set's hash).",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        clip: Any,
        source: str,
        text: str,
        max_prompts: int,
        held_out_fraction: float,
        seeds_per_prompt: int = 1,
        sizes: str = "",
    ) -> io.NodeOutput:
        if seeds_per_prompt < 1:
            raise ValueError(f"seeds_per_prompt must be at least 1, got {seeds_per_prompt}")
        picture_sizes = parse_sizes(sizes)  # before encoding: a typo must not cost the run
        prompts = read_prompts(source, text, max_prompts=max_prompts, held_out_fraction=held_out_fraction)
        encoded = encode_prompts(clip, prompts, seeds=seeds_per_prompt, sizes=picture_sizes)
        summary = (
            f"{len(prompts.calibration)} calibration + {len(prompts.held_out)} held-out prompts from "
            f"{prompts.source} (hash {prompts.hash}), conditioning {encoded.context_width} wide"
        )
        show_text(summary)
        return io.NodeOutput(encoded, ui={"text": [summary]})


__all__ = [
    "CalibrationPlan",
    "DitPrunePromptSet",
    "EncodedPrompts",
    "PromptsType",
    "check_prompts_fit",
    "encode_prompts",
    "prompt_inputs",
    "sample_plan",
]
