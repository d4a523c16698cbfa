"""Which Linear layers of a DiT can be pruned: declarative per-architecture templates.

Each template names the module that proves the architecture (``detect``) and maps layer names to
families with regular expressions. Names are relative to the diffusion model, exactly as in
ComfyUI's state dicts without the ``diffusion_model.`` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "TEMPLATES",
    "ArchTemplate",
    "LayerFilter",
    "UnsupportedModelError",
    "detect_architecture",
    "find_prunable_layers",
    "layer_block",
    "layer_family",
    "unwrap_diffusion_model",
]

#: Every family name a template may use.
FAMILIES = ("attention", "mlp", "single_fused", "modulation", "embedder", "final", "block_linear")

#: Families pruned when the caller does not choose. Modulation layers are left dense by default:
#: the quality benchmark (README, "Which layers") measured a large error increase when they are
#: pruned, for a small share of FLOPs (their input is one vector per sample).
DEFAULT_FAMILIES = ("attention", "mlp", "single_fused", "block_linear")

LayerFilter = Callable[[nn.Module, str], bool]


class UnsupportedModelError(ValueError):
    """The model has no layers any template recognises."""


@dataclass(frozen=True)
class ArchTemplate:
    """Declarative description of one DiT family.

    Attributes:
        name: architecture name shown to users.
        detect: module names of which at least one must exist for the template to apply.
        families: ``(family, regex)`` pairs matched in order against full layer names.
        block: regex whose first group is the block id (e.g. ``double_blocks.3``).
    """

    name: str
    detect: tuple[str, ...]
    families: tuple[tuple[str, str], ...]
    block: str

    def family_of(self, name: str) -> str | None:
        for family, pattern in self.families:
            if re.fullmatch(pattern, name):
                return family
        return None


FLUX = ArchTemplate(
    name="flux",
    detect=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"),
    families=(
        ("attention", r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)"),
        ("mlp", r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)"),
        ("single_fused", r"single_blocks\.\d+\.linear(1|2)"),
        ("modulation", r"(double_blocks\.\d+\.(img|txt)_mod\.lin|single_blocks\.\d+\.modulation\.lin)"),
        ("embedder", r"(img_in|txt_in|(time_in|vector_in|guidance_in)\.(in_layer|out_layer))"),
        ("final", r"final_layer\.(linear|adaLN_modulation\.1)"),
    ),
    block=r"^((?:double|single)_blocks\.\d+)\.",
)

SD3 = ArchTemplate(
    name="sd3",
    detect=("joint_blocks.0.x_block.attn.qkv",),
    families=(
        ("attention", r"joint_blocks\.\d+\.(context_block|x_block)\.(attn|attn2)\.(qkv|proj)"),
        ("mlp", r"joint_blocks\.\d+\.(context_block|x_block)\.mlp\.fc(1|2)"),
        ("modulation", r"joint_blocks\.\d+\.(context_block|x_block)\.adaLN_modulation\.1"),
        ("embedder", r"(context_embedder|(t_embedder|y_embedder)\.mlp\.\d+|x_embedder\.proj)"),
        ("final", r"final_layer\..*"),
    ),
    block=r"^(joint_blocks\.\d+)\.",
)

TEMPLATES: tuple[ArchTemplate, ...] = (FLUX, SD3)

# Generic fallback: Linear layers inside repeated blocks (``<list>.<index>.``).
GENERIC_BLOCK = r"^((?:[A-Za-z_][\w]*\.)*?[A-Za-z_]\w*\.\d+)\."
GENERIC = ArchTemplate(
    name="generic",
    detect=(),
    families=(
        ("modulation", r".*\.\d+\..*(adaLN|modulation|_mod\b).*"),
        ("block_linear", r".*\.\d+\..*"),
    ),
    block=GENERIC_BLOCK,
)


#: Module names that mark a UNet (SD1.x, SDXL): refused even though its blocks repeat.
UNET_MARKERS = ("input_blocks.0", "middle_block", "output_blocks.0")


def unwrap_diffusion_model(model: nn.Module | object) -> nn.Module:
    """Return the diffusion transformer inside ``model``.

    Accepts a bare ``nn.Module``, a ComfyUI ``BaseModel`` (``.diffusion_model``) or a ComfyUI
    ``ModelPatcher`` (``.model.diffusion_model``) without importing ComfyUI.
    """
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "diffusion_model"):
        model = inner.diffusion_model
    elif hasattr(model, "diffusion_model"):
        model = model.diffusion_model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch nn.Module or a ComfyUI MODEL, got {type(model).__name__}")
    return model


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def detect_architecture(model: nn.Module | object) -> ArchTemplate:
    """The template that applies to ``model``; :data:`GENERIC` when blocks repeat but none match.

    Raises:
        UnsupportedModelError: no template applies and no Linear sits inside a repeated block.
    """
    module = unwrap_diffusion_model(model)
    names = {name for name, _ in module.named_modules()}
    if all(marker in names for marker in UNET_MARKERS):
        raise UnsupportedModelError(
            f"{type(module).__name__} is a UNet (input_blocks / middle_block / output_blocks, as in SD1.x "
            "and SDXL), not a diffusion transformer: supported are FLUX (double_blocks/single_blocks), "
            "SD3/SD3.5 (joint_blocks) and other DiTs whose Linear layers sit in repeated blocks"
        )
    for template in TEMPLATES:
        if any(key in names for key in template.detect):
            return template
    if any(GENERIC.family_of(name) for name in _linear_layers(module)):
        return GENERIC
    raise UnsupportedModelError(
        f"{type(module).__name__} has no recognisable DiT blocks: supported are FLUX "
        "(double_blocks/single_blocks), SD3/SD3.5 (joint_blocks) and any model whose Linear layers "
        "sit in repeated blocks (e.g. blocks.0.attn.qkv). A UNet such as SDXL is not a DiT."
    )


def layer_family(name: str, template: ArchTemplate) -> str | None:
    """Family of a layer name under ``template``, or None when the template does not know it."""
    return template.family_of(name)


def layer_block(name: str, template: ArchTemplate) -> str:
    """Block id of a layer (``double_blocks.3``), or ``"other"`` outside the blocks."""
    match = re.match(template.block, name)
    return match.group(1) if match else "other"


def find_prunable_layers(
    model: nn.Module | object,
    *,
    families: Iterable[str] | None = None,
    filter_fn: LayerFilter | None = None,
) -> dict[str, nn.Linear]:
    """Prunable Linear layers of a DiT, ``{name: layer}`` in module order.

    Args:
        model: a DiT ``nn.Module`` or a ComfyUI MODEL / BaseModel wrapping one.
        families: families to include; default :data:`DEFAULT_FAMILIES`. Embedders and the final
            layer are included only when named here.
        filter_fn: optional ``filter_fn(module, name) -> bool`` applied after the families.

    Raises:
        UnsupportedModelError: when the model is not a recognisable DiT.
        ValueError: for an unknown family name.
    """
    chosen = tuple(DEFAULT_FAMILIES if families is None else families)
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown layer families {unknown}; choose from {list(FAMILIES)}")
    module = unwrap_diffusion_model(model)
    template = detect_architecture(module)
    out: dict[str, nn.Linear] = {}
    for name, layer in _linear_layers(module).items():
        family = template.family_of(name)
        if family is None or family not in chosen:
            continue
        if filter_fn is not None and not filter_fn(layer, name):
            continue
        out[name] = layer
    return out
