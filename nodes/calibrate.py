"""Calibrate, plus loading a saved calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import folder_paths
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..ditprune_core.calibrate import Calibrator
from ..ditprune_core.prompts import record_text
from ..ditprune_core.stats import CalibrationStats
from ..ditprune_core.util.io import FileExistsRefusal, check_name_fits
from .choices import NO_CALIBRATIONS, calibration_options, refuse_placeholder
from .common import (
    CALIBRATION_FOLDER,
    CATEGORY,
    CalibrationType,
    Progress,
    SamplerRun,
    calibration_dir,
    diffusion_model,
    safe_child,
    sampling_inputs,
    show_text,
    weight_fn_for,
)
from .prompts import CalibrationPlan, EncodedPrompts, prompt_inputs, sample_plan


def calibration_target(save_name: str) -> Path | None:
    """Where Calibrate saves ``save_name`` (None for no name), checked the way the save will check it.

    Raises:
        ValueError: the name would leave the calibration folder, names no file, or is too long.
        FileExistsRefusal: the file exists (calibrations are never overwritten).
    """
    name = save_name.strip().removesuffix(".safetensors")
    if not save_name.strip():
        return None
    stem = safe_child(calibration_dir(), name)
    target = stem.with_name(stem.name + ".safetensors")
    check_name_fits(target)
    if target.exists():
        raise FileExistsRefusal(
            f"{target} already exists; choose another save_name or delete the file (nothing was sampled)"
        )
    return target


class DitPruneCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneCalibrate",
            display_name="DiT-Pruning Calibrate",
            category=CATEGORY,
            description="Runs ComfyUI's sampler on the model and records, for every block layer, the mean "
            "square of its inputs per channel (both CFG halves, every step). With a prompt set it samples "
            "every calibration prompt (x seeds x sizes): sampler runs x prompts x steps.",
            inputs=[
                *sampling_inputs("The FLUX / SD3 model to calibrate. It is not changed."),
                io.String.Input(
                    "save_name",
                    default="",
                    tooltip="If set, also save the calibration as "
                    "models/ditprune_calibrations/<name>.safetensors (never overwrites).",
                ),
                CalibrationType.Input(
                    "calibration",
                    optional=True,
                    tooltip="A calibration to merge with (its record of prompts, seeds and sizes is merged too).",
                ),
                *prompt_inputs(),
            ],
            outputs=[
                CalibrationType.Output(
                    display_name="calibration",
                    tooltip="Per-layer input statistics; feed Score Saliency (or merge into another Calibrate).",
                ),
                io.Latent.Output(
                    display_name="LATENT",
                    tooltip="What the model drew while being calibrated (with a prompt set: the first prompt).",
                ),
                io.String.Output(
                    display_name="summary",
                    tooltip="Layers and tokens recorded, the model fingerprint, the sampler runs it cost and "
                    "what it saw (prompts, seeds, sizes); connect Preview Any to read it.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model: ModelPatcher,
        positive: Any,
        negative: Any,
        latent_image: dict,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        timestep_weighting: str,
        save_name: str = "",
        calibration: CalibrationStats | None = None,
        prompt_set: EncodedPrompts | None = None,
    ) -> io.NodeOutput:
        target = calibration_target(save_name)  # before sampling: a bad name must not cost the run
        dm = diffusion_model(model, action="calibrate it")
        run = SamplerRun(positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler)
        plan = CalibrationPlan.of(run, prompt_set, dm)
        settings = {**run.settings(), "record": plan.record(timestep_weighting)}
        with Calibrator(
            dm, weighting=timestep_weighting, settings=settings, weight_fn=weight_fn_for(model)
        ) as cal:
            samples = sample_plan(cal, model, plan, Progress())
        stats = cal.stats
        if calibration is not None:
            stats = calibration.merge(stats)
        if target is not None:
            stats.save(target)
        s = stats.summary()
        text = (
            f"{s['layers']} layers of a {s['architecture']} model, "
            f"{s['tokens_per_layer_min']:,}-{s['tokens_per_layer_max']:,} tokens per layer, "
            f"fingerprint {s['fingerprint']}\n{plan.cost_text()}\nrecorded: {record_text(stats.settings)}"
        )
        return io.NodeOutput(stats, samples, text)


class DitPruneLoadCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DitPruneLoadCalibration",
            display_name="DiT-Pruning Load Calibration",
            category=CATEGORY,
            description="Loads a calibration that DiT-Pruning Calibrate saved (its save_name) from "
            "models/ditprune_calibrations, so a model can be pruned again without sampling. It only fits "
            "the model it was recorded on; Apply Pruning refuses another.",
            inputs=[
                io.Combo.Input(
                    "calibration_name",
                    options=calibration_options(),
                    tooltip="A file saved by Calibrate in models/ditprune_calibrations (press R to refresh the list).",
                )
            ],
            outputs=[
                CalibrationType.Output(
                    display_name="calibration", tooltip="The saved statistics; feed Score Saliency."
                ),
                io.String.Output(
                    display_name="record",
                    tooltip="What it was calibrated on: prompts (count, hash, the first few), seeds, sizes, "
                    "steps and weighting; connect Preview Any to read it.",
                ),
            ],
        )

    @classmethod
    def execute(cls, calibration_name: str) -> io.NodeOutput:
        refuse_placeholder(calibration_name, NO_CALIBRATIONS, CALIBRATION_FOLDER)
        path = folder_paths.get_full_path_or_raise(CALIBRATION_FOLDER, calibration_name)
        stats = CalibrationStats.load(path)
        text = f"{calibration_name}: {record_text(stats.settings)}"
        show_text(text)
        return io.NodeOutput(stats, text)


__all__ = ["DitPruneCalibrate", "DitPruneLoadCalibration"]
