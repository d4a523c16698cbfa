"""Save Pruned Model: the diffusion model, pruning baked in, dense or compressed (with fp8 or
quantised values, and an fp8 or integer remainder)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from ..ditprune_core import __version__
from ..ditprune_core.layers import remainder_layers
from ..ditprune_core.save import (
    REMAINDER_FORMATS,
    VALUE_FORMATS,
    CheckpointReport,
    check_save_options,
    save_pruned_checkpoint,
)
from ..ditprune_core.util.io import check_name_fits, next_free_path
from ..ditprune_core.util.save_dtype import cast_exactly, narrowest_exact_dtype, needs_cast
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
from .targets import FROM_TARGET, resolve_from_target

log = logging.getLogger("ditprune")

DTYPE_CHOICES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: the node's value choices -> save_pruned_checkpoint's ``values`` ("keep dtype" and "fp8_e4m3fn"
#: are the names saved prompts already use)
VALUE_CHOICES = {
    "keep dtype": "keep",
    "fp8_e4m3fn": "fp8",
    **{name: name for name in VALUE_FORMATS if name not in ("keep", "fp8")},
}
REMAINDER_CHOICES = REMAINDER_FORMATS

#: the size–fidelity table's choice per GPU, as the tiers benchmark writes it (the per-GPU workflows
#: are made from the same file): the tooltip quotes it, never a copy of its figures
TIERS_FILE = Path(__file__).resolve().parents[1] / "docs" / "bench" / "vram_tiers.json"


def tier_advice(path: Path = TIERS_FILE) -> str:
    """'Which to pick for your VRAM', written from the tiers table (a line pointing to it when the
    pack was installed without its docs)."""
    try:
        tiers = json.loads(path.read_text())["tiers"]
    except (OSError, ValueError, KeyError):
        return "Which to pick for your VRAM: docs/bench/vram_tiers.md (python -m bench tiers)."
    lines = [
        "Which to pick for your VRAM (FLUX.1-dev, docs/bench/vram_tiers.md; error = held-out relative MSE "
        "of final samples on the MiniFlux test-beds, on classes the calibration never saw):"
    ]
    for tier in tiers:
        errors = " / ".join(f"{e:.4f}" for e in tier["errors"].values())
        if tier["verdict"] == "ditprune":
            lines.append(
                f"- {tier['vram_gib']} GB: Prune and Reconstruct {tier['sparsity']:.0%} sparsity with value bits "
                f"{tier['value_bits']}, then values {tier['values']}, remainder {tier['remainder']}: "
                f"{tier['file_gb']:.2f} GB ({errors})"
            )
        else:
            fp8 = " / ".join(f"{e:.4f}" for e in tier["fp8_errors"].values())
            lines.append(
                f"- {tier['vram_gib']} GB: ComfyUI's own fp8, {tier['fp8_gb']:.1f} GB ({fp8}): no pruning"
            )
    return "\n".join(lines)


VALUES_TOOLTIP = (
    "compressed only: how pruned layers' values are stored. keep dtype: bit-exact. fp8_e4m3fn: a "
    "scale per row. int8 / int4 / int3: codes with a scale per 128 kept values, rounded at save time "
    "(the file then differs from the model by the rounding; the node says by how much). A model from "
    "Prune and Reconstruct with value bits keeps its own codes, stored exactly, whatever you choose here. "
    "size target: what Prune and Reconstruct's target_file_gb chose.\n" + tier_advice()
)
REMAINDER_TOOLTIP = (
    "compressed only: how the layers of the blocks that stay dense (the adaLN modulation: 27% of "
    "FLUX.1-dev) are stored; the embedders and the final layer (0.13 GB, most of this rounding's error "
    "if rounded too), norms and biases always keep their dtype. keep: as they are. fp8: e4m3fn "
    "with a scale per row (half of bf16). int8: 8-bit codes, a scale per 128 weights (about half). "
    "int4: 4-bit codes, a scale and zero point per 128 weights (about a quarter: what a FLUX.1-dev file "
    "under 5 GB needs, as GGUF Q4 files do; held out on MiniFlux it adds 0.0001-0.0007 relative MSE). "
    "int3: 3-bit codes, a scale per 128 weights (about a fifth: for a file under 4 GB; it adds "
    "0.001-0.004). What each costs in size and "
    "on final samples: docs/bench/remainder.md, the 'rest int4' and 'rest int3' points of "
    "docs/bench/frontier.md, and the tier "
    "choices above. size target: what Prune and Reconstruct's target_file_gb chose."
)


def given_codes(model: ModelPatcher, keys: list[str]) -> dict[str, Any]:
    """The quantised codes Prune and Reconstruct left on the MODEL's patches, by state-dict key.

    A ditprune patch with a ``quantized`` attribute (a ``QuantizedWeight``) replaces the weight; a
    layer patched again after it (a LoRA) no longer holds what its codes decode to, so it is left
    out (its values are then rounded at save time, with a warning)."""
    out: dict[str, Any] = {}
    for key in keys:
        patches = model.patches.get(PREFIX + key) or []
        if not patches:
            continue
        codes = getattr(patches[-1][1], "quantized", None)
        if codes is not None:
            out[key] = codes
        elif any(getattr(p[1], "quantized", None) is not None for p in patches[:-1]):
            log.warning(
                "ditprune: %r is patched again after Prune and Reconstruct (a LoRA?): its codes are not "
                "stored, its values are rounded at save time",
                key,
            )
    return out


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
            "in the stock Load Diffusion Model node; 'compressed' files (pruned layers at 50% sparsity: about 56% "
            "of bf16, 31% with fp8 values, 19% with int4) open in DiT-Pruning Load Pruned Model. A model from "
            "Prune and Reconstruct with value bits is stored with its own codes: pruned layers with their mask, "
            "quantise-only layers (sparsity 0) as dense codes with no mask. Never overwrites a file.",
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
                    "compressed: bitmask or 2:4 packing of pruned weights, the codes of quantised layers "
                    "(quantise only: no mask), opens only in DiT-Pruning Load Pruned Model.",
                ),
                io.Combo.Input(
                    "values",
                    options=[*VALUE_CHOICES, FROM_TARGET],
                    default="keep dtype",
                    tooltip=VALUES_TOOLTIP,
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
                io.Combo.Input(
                    "remainder",
                    options=[*REMAINDER_CHOICES, FROM_TARGET],
                    default="keep",
                    optional=True,  # prompts saved before it existed still validate
                    tooltip=REMAINDER_TOOLTIP,
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="path",
                    tooltip="The file written, and which loader opens it; connect Preview Any to read it.",
                ),
                io.String.Output(
                    display_name="size",
                    tooltip="The file's size, bits per weight, its ratio to the dense model, and the VRAM "
                    "the loaded model needs (weights plus the largest layer decoded at once); connect Preview Any to read it "
                    "on screen after a run.",
                ),
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
        remainder: str = "keep",
    ) -> io.NodeOutput:
        dm = diffusion_model(model, action="save it again (it is saved already)")
        values, remainder = resolve_from_target(model, format, values, remainder)
        if values not in VALUE_CHOICES:  # the widget's names; the core knows its own
            raise ValueError(f"unknown values {values!r}; choose from {list(VALUE_CHOICES)}")
        try:  # the core's one check of the options, before any tensor is made
            check_save_options(format, VALUE_CHOICES[values], remainder)
        except ValueError as exc:
            if format != "dense":
                raise
            raise ValueError(
                f"values {values!r} and remainder {remainder!r} need format 'compressed': a dense file holds "
                f"every weight as it is ({exc}); choose 'keep dtype' and remainder 'keep' for a dense file"
            ) from exc
        folder = diffusion_models_dir()
        prefix = safe_child(folder, filename_prefix.strip() or "ditprune/pruned")
        target = next_free_path(prefix.parent, prefix.name, ".safetensors")
        check_name_fits(target)  # now, not after every tensor has been made once
        keys = list(dm.state_dict().keys())
        save_as, how = save_dtype(model, keys, dtype)
        verified: set[str] = set()

        def produce(key: str) -> torch.Tensor:
            tensor = stored_weight(model, PREFIX + key)
            if save_as is None or not needs_cast(tensor, save_as, inferred=dtype == "auto"):
                return tensor
            original = None
            if dtype == "auto" and key not in verified:  # every entry, once: the choice read a sample
                original = original_weight(model, PREFIX + key)
                verified.add(key)
            return cast_exactly(tensor, save_as, key, original=original)

        def source(key: str) -> Callable[[], torch.Tensor]:
            return lambda: produce(key)

        info = model.model_options.get("ditprune", {})
        metadata = {"ditprune_version": __version__, "ditprune": json.dumps(info, default=str)}
        coded_keys = {f"{name}.weight" for name in remainder_layers(dm)}
        report = save_pruned_checkpoint(
            {k: source(k) for k in keys},
            target,
            format=format,
            metadata=metadata,
            values=VALUE_CHOICES[values],
            quantized=given_codes(model, keys) if format == "compressed" else None,
            remainder=remainder,
            remainder_filter=coded_keys.__contains__,
            progress=Progress(describe=save_progress(len(keys))),
        )
        loader = "DiT-Pruning Load Pruned Model" if format == "compressed" else "Load Diffusion Model"
        size = size_text(report)
        text = (
            f"saved {target} in {how} ({report.ratio:.1%} of the dense size, {len(report.layouts)} "
            f"tensors compressed); open it with {loader}"
        )
        if report.stored_codes:
            text += f". {len(report.stored_codes)} layer(s) stored with their own quantised codes (exact)"
        if report.rounded_at_save:
            text += (
                f". {len(report.rounded_at_save)} layer(s) rounded to {values} at save time: the file differs "
                f"from this model by up to {report.max_value_relative_error:.3g} of each layer's largest weight"
            )
        if report.remainder:
            text += (
                f". {len(report.remainder)} dense layer(s) stored as {remainder} (largest error "
                f"{report.max_remainder_relative_error:.3g} of each layer's largest weight)"
            )
        return io.NodeOutput(str(target), size, ui={"text": [text, size]})


def save_progress(tensors: int) -> Callable[[int, int, str], str]:
    """The Save phase in words: each tensor is made twice, to choose its layout and to write it."""

    def describe(done: int, _total: int, _label: str) -> str:
        if done <= tensors:
            return f"saving: choosing the layout of tensor {done} of {tensors}"
        return f"saving: writing tensor {done - tensors} of {tensors}"

    return describe


def human_bytes(n: int) -> str:
    """``n`` bytes in GB, MB or kB (powers of 1000, as the README's tables)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def size_text(report: CheckpointReport) -> str:
    """What a saved file costs, from the core's :class:`CheckpointReport` (the node only formats)."""
    dtype = str(report.dense_dtype).removeprefix("torch.")
    text = (
        f"size {human_bytes(report.file_bytes)}, {report.bits_per_weight:.2f} bits per weight, "
        f"ratio {report.ratio:.1%} of the dense model ({human_bytes(report.dense_bytes)} in {dtype}); "
        f"VRAM to load it: {human_bytes(report.vram_bytes)}"
    )
    name, decoded = report.largest_decoded
    if decoded:
        text += (
            f" (weights + the largest decoded layer, {name.removesuffix('.weight')}: {human_bytes(decoded)})"
        )
    else:
        text += " (its weights as stored)"
    return text + "; activations, text encoders and VAE come on top"
