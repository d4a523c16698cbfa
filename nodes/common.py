"""ComfyUI glue shared by the nodes: socket types, weights of a MODEL, the mask patch, progress."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import comfy.float
import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy.weight_adapter.base import WeightAdapterBase
from comfy_api.latest import io
from torch import nn

import nodes as comfy_nodes  # ComfyUI's nodes.py (this pack is imported as a package, never as `nodes`)

from ..ditprune_core import PATTERNS, TIMESTEP_WEIGHTINGS
from ..ditprune_core.calibrate import Calibrator
from ..ditprune_core.config import chosen_families, pattern_sparsity
from ..ditprune_core.layers import detect_architecture, unwrap_diffusion_model
from ..ditprune_core.util.io import check_name_fits
from ..ditprune_core.util.packing import PackedMask
from .packed import PackedLinear

log = logging.getLogger("ditprune")

CATEGORY = "DiT-Pruning"
CalibrationType = io.Custom("DITPRUNE_CALIBRATION")
SaliencyType = io.Custom("DITPRUNE_SALIENCY")
ClustersType = io.Custom("DITPRUNE_CLUSTERS")

CALIBRATION_FOLDER = "ditprune_calibrations"
PREFIX = "diffusion_model."
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
_FLOAT_DTYPES |= {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


def diffusion_models_dir() -> Path:
    """Where the stock "Load Diffusion Model" node looks: ``models/diffusion_models``."""
    paths = [Path(p) for p in folder_paths.get_folder_paths("diffusion_models")]
    named = [p for p in paths if p.name == "diffusion_models"]
    return (named or paths)[0]


def calibration_dir() -> Path:
    """``models/ditprune_calibrations``, registered with ComfyUI's folder list on first use."""
    if CALIBRATION_FOLDER not in folder_paths.folder_names_and_paths:
        path = diffusion_models_dir().parent / CALIBRATION_FOLDER
        folder_paths.folder_names_and_paths[CALIBRATION_FOLDER] = ([str(path)], {".safetensors"})
    return Path(folder_paths.get_folder_paths(CALIBRATION_FOLDER)[0])


def diffusion_model(model: comfy.model_patcher.ModelPatcher, *, action: str) -> nn.Module:
    """The DiT inside a MODEL, refusing models ditprune cannot prune (names what is supported) and
    models loaded compressed (see :func:`refuse_compressed`; ``action`` says what the node would do)."""
    module = unwrap_diffusion_model(model)
    detect_architecture(module)  # raises UnsupportedModelError with the list of supported models
    refuse_compressed(module, action)
    return module


def refuse_compressed(module: nn.Module, action: str) -> None:
    """Refuse a model loaded by Load Pruned Model in mode 'compressed on device'.

    Its pruned layers hold their compressed pieces and an empty placeholder instead of a weight, so
    nothing that reads weights (calibration fingerprints, clustering, masks, saving) can use them.

    Raises:
        ValueError: naming a compressed layer, what could not be done and how to load the model instead.
    """
    packed = [name for name, m in module.named_modules() if isinstance(m, PackedLinear) and m.is_packed]
    if packed:
        raise ValueError(
            f"cannot {action}: this model was loaded compressed (Load Pruned Model, mode 'compressed on "
            f"device'), so {len(packed)} pruned layer(s), e.g. {packed[0]!r}, hold no dense weight. "
            "Load it with mode 'densify at load' instead"
        )


def original_weight(model: comfy.model_patcher.ModelPatcher, key: str) -> torch.Tensor:
    """The stored tensor of state-dict ``key``, unpatched even while a patched clone is loaded."""
    backup = model.backup.get(key)
    if backup is not None:
        return backup.weight.detach()
    weight, _set_func, _convert = comfy.model_patcher.get_key_weight(model.model, key)
    return weight.detach()


def _patched_fp32(
    model: comfy.model_patcher.ModelPatcher, key: str, original: torch.Tensor
) -> torch.Tensor | None:
    """``original`` with the MODEL's patches on ``key`` applied, in float32; None when it has none."""
    patches = model.patches.get(key)
    if not patches:
        return None
    _w, set_func, convert_func = comfy.model_patcher.get_key_weight(model.model, key)
    if set_func is not None:
        raise ValueError(f"{key!r} uses custom weight storage (scaled fp8?); ditprune cannot read it patched")
    temp = original.to(torch.float32, copy=True)
    if convert_func is not None:
        temp = convert_func(temp, inplace=True)
    return comfy.lora.calculate_weight(patches, temp, key)


@torch.no_grad()
def effective_weight(model: comfy.model_patcher.ModelPatcher, name: str) -> torch.Tensor:
    """The weight of layer ``name`` the sampler will use: the original with the MODEL's own patches
    (LoRA ...) on it.

    Raises:
        ValueError: for quantised storage ditprune cannot read (GGUF and other custom tensors).
    """
    key = f"{PREFIX}{name}.weight"
    weight = original_weight(model, key)
    if weight.dtype not in _FLOAT_DTYPES or type(weight) is not torch.Tensor:
        raise ValueError(
            f"layer {name!r} is stored as {type(weight).__name__} of dtype {weight.dtype}: quantised "
            "weights (GGUF, NF4, ...) cannot be pruned. Prune the bf16/fp16/fp8 model, then quantise"
        )
    patched = _patched_fp32(model, key, weight)
    return weight if patched is None else patched


def weight_fn_for(model: comfy.model_patcher.ModelPatcher) -> Callable[[str, nn.Linear], torch.Tensor]:
    return lambda name, _layer: effective_weight(model, name)


class MaskPatch(WeightAdapterBase):
    """Zeroes pruned weights when ComfyUI loads them: 1 bit of state per weight.

    ComfyUI calls :meth:`calculate_weight` on a float copy of the weight, once per load in normal
    mode and once per forward in lowvram mode, so the MODEL's stored weights are never changed.
    """

    name = "ditprune_mask"

    def __init__(self, mask: PackedMask, layer: str) -> None:
        self.loaded_keys: set[str] = set()
        self.weights: list[torch.Tensor] = []
        self.mask = mask
        self.layer = layer

    #: the node whose output holds this patch, for the message when the model changed under it
    made_by = "Apply Pruning"

    def check_shape(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.mask.shape:
            raise ValueError(
                f"ditprune mask for {self.layer!r} has shape {self.mask.shape} but the weight is "
                f"{tuple(weight.shape)}: the model changed after {self.made_by}; run it again"
            )

    def calculate_weight(
        self,
        weight: torch.Tensor,
        key: str,
        strength: float,
        strength_model: float,
        offset: object,
        function: object,
        intermediate_dtype: torch.dtype = torch.float32,
        original_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_shape(weight)
        with torch.no_grad():
            return weight.masked_fill_(~self.mask.to_bool(weight.device), 0)


def show_text(text: str) -> None:
    """Show ``text`` on the running node, under its title, as ComfyUI's own nodes do
    (``PromptServer.send_progress_text``; frontend 1.27 draws it on the node). Outside a server
    (a script, the tests) it is only logged."""
    log.debug("ditprune: %s", text)
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return
    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    if context is not None and server is not None:
        server.send_progress_text(text, context.node_id)


class Progress:
    """A ComfyUI progress bar whose every update is also an interrupt point, and the phase in words
    on the node: ``describe(done, total, label)`` for each update, :meth:`phase` for a new phase.
    ``shown`` keeps every text shown (for the tests)."""

    def __init__(
        self,
        total: int | None = None,
        describe: Callable[[int, int, str], str] | None = None,
    ) -> None:
        self.bar = None if total is None else comfy.utils.ProgressBar(total)
        self.describe = describe
        self.current_phase = ""
        self.shown: list[str] = []

    def phase(self, text: str) -> None:
        """A new phase starts (``calibration pass 2 of 8: ...``): show it; it is an interrupt point."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.current_phase = text
        self._show(text)

    def detail(self, text: str) -> None:
        """A step inside the current phase (``prompt 3 of 96, seed 0, 1024x1024``): shown under the
        phase; it is an interrupt point."""
        comfy.model_management.throw_exception_if_processing_interrupted()
        self._show(f"{self.current_phase}\n{text}" if self.current_phase else text)

    def _show(self, text: str) -> None:
        self.shown.append(text)
        show_text(text)

    def __call__(self, done: int, total: int, label: str = "") -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.bar is None:  # total learnt from the first update
            self.bar = comfy.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)
        if self.describe is not None:
            text = self.describe(done, total, label)
            self._show(f"{self.current_phase}\n{text}" if self.current_phase else text)


def layer_progress(done: int, total: int, label: str) -> str:
    """``layer 3 of 228: double_blocks.0.img_attn.qkv``."""
    return f"layer {done} of {total}" + (f": {label}" if label else "")


def safe_child(folder: str | Path, relative: str) -> Path:
    """``folder / relative`` resolved: a name inside ``folder`` or one of its subfolders.

    Raises:
        ValueError: ``relative`` would leave ``folder``, resolve to ``folder`` itself, or does not end
            in a name (``.``, ``sub/..``, ``sub/``), or a name in it is too long for the filesystem.
    """
    base = Path(folder).resolve()
    last = re.split(r"[\\/]", relative)[-1].strip()
    if last in ("", ".", ".."):
        raise ValueError(
            f"{relative!r} does not end in a file name (it names a folder); end it with a name, "
            "e.g. 'ditprune/pruned'"
        )
    target = (base / relative).resolve()
    if base not in target.parents:
        raise ValueError(f"{relative!r} would write outside {base}; use a plain name or a subfolder")
    check_name_fits(target)
    return target


@torch.no_grad()
def stored_weight(model: comfy.model_patcher.ModelPatcher, key: str) -> torch.Tensor:
    """A state-dict tensor of the MODEL with its patches baked in, in the stored dtype (rounded the
    way ComfyUI rounds when it patches weights in place)."""
    original = original_weight(model, key)
    patched = _patched_fp32(model, key, original)
    if patched is None:
        return original
    return comfy.float.stochastic_rounding(
        patched, original.dtype, seed=comfy.model_patcher.string_to_seed(key)
    )


def sampling_inputs(model_tooltip: str) -> list[io.Input]:
    """The inputs of a node that runs ComfyUI's sampler to calibrate (Calibrate, Prune and Reconstruct),
    in the order the workflows store their widgets."""
    return [
        io.Model.Input("model", tooltip=model_tooltip),
        io.Conditioning.Input("positive", tooltip="Prompts to calibrate on; batch them for many prompts."),
        io.Conditioning.Input("negative", tooltip="Negative prompt (its pass is skipped at cfg 1)."),
        io.Latent.Input(
            "latent_image", tooltip="Empty latent: its size and batch set the calibration shape."
        ),
        io.Int.Input(
            "seed",
            default=0,
            min=0,
            max=0xFFFFFFFFFFFFFFFF,
            control_after_generate=True,
            tooltip="Sampling seed.",
        ),
        io.Int.Input("steps", default=8, min=1, max=200, tooltip="Sampling steps; every step is recorded."),
        io.Float.Input(
            "cfg",
            default=1.0,
            min=0.0,
            max=100.0,
            step=0.1,
            round=0.01,
            tooltip="CFG scale; 1.0 for FLUX.1-dev (guidance is in the conditioning).",
        ),
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampler."),
        io.Combo.Input(
            "scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple", tooltip="Scheduler."
        ),
        io.Combo.Input(
            "timestep_weighting",
            options=sorted(TIMESTEP_WEIGHTINGS),
            default="log",
            tooltip="log: early (noisy) steps weigh 1.2, the last 0.8; uniform: all equal.",
        ),
    ]


def pruning_inputs(*, quantize_only: bool = False) -> list[io.Input]:
    """Sparsity, pattern and layer families, as Apply Pruning and Prune and Reconstruct take them
    (``quantize_only``: sparsity 0 is offered, which quantises the layers without pruning them)."""
    tooltip = "Fraction of weights removed in every selected layer (0.5 for 2:4 and 4:8)."
    if quantize_only:
        tooltip += (
            " 0 with value bits: quantise only (nothing pruned; each layer's codes are fitted by the same "
            "OBS update, and a compressed file stores them with no mask)."
        )
    return [
        io.Float.Input(
            "sparsity",
            default=0.5,
            min=0.0 if quantize_only else 0.01,
            max=0.99,
            step=0.01,
            tooltip=tooltip,
        ),
        io.Combo.Input(
            "pattern",
            options=list(PATTERNS),
            default="unstructured",
            tooltip="2:4 / 4:8 keep N of every M inputs (GPU sparse kernels need 2:4).",
        ),
        io.Boolean.Input("attention", default=True, tooltip="Prune attention qkv / proj layers."),
        io.Boolean.Input("mlp", default=True, tooltip="Prune MLP layers."),
        io.Boolean.Input("single_fused", default=True, tooltip="Prune FLUX single-block linear1/linear2."),
        io.Boolean.Input(
            "modulation",
            default=False,
            tooltip="Prune adaLN modulation layers (off by default: measured to hurt).",
        ),
        io.String.Input("layer_regex", default="", tooltip="Optional: only layers whose name matches."),
    ]


def pruning_choice(
    sparsity: float, pattern: str, attention: bool, mlp: bool, single_fused: bool, modulation: bool
) -> tuple[float, tuple[str, ...]]:
    """``(sparsity, families)`` from :func:`pruning_inputs`' values (an N:M pattern fixes the sparsity)."""
    chosen = {"attention": attention, "mlp": mlp, "single_fused": single_fused, "modulation": modulation}
    return pattern_sparsity(sparsity, pattern), chosen_families(chosen)


@dataclass(frozen=True)
class SamplerRun:
    """One KSampler run as the calibrating nodes take it (their ten loose widget values, typed once):
    the conditionings, the LATENT and the sampler's settings."""

    positive: object
    negative: object
    latent_image: dict
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str

    def settings(self) -> dict[str, object]:
        """What a calibration file records of the run."""
        return {
            "seed": self.seed,
            "steps": self.steps,
            "cfg": self.cfg,
            "sampler": self.sampler_name,
            "scheduler": self.scheduler,
        }


def sample_calibrating(cal: Calibrator, model: comfy.model_patcher.ModelPatcher, run: SamplerRun) -> dict:
    """Run ComfyUI's KSampler on ``model`` once, telling ``cal`` the sigma of every model call."""
    patched = model.clone()
    inner = patched.model_options.get("model_function_wrapper")

    def record_sigma(apply_model: Callable[..., torch.Tensor], args: dict) -> torch.Tensor:
        cal.set_sigma(float(args["timestep"].flatten()[0]))
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(record_sigma)
    (samples,) = comfy_nodes.common_ksampler(
        patched,
        run.seed,
        run.steps,
        run.cfg,
        run.sampler_name,
        run.scheduler,
        run.positive,
        run.negative,
        run.latent_image,
    )
    return samples
