"""Which Linear layers of a DiT can be pruned: declarative per-architecture templates.

Each template names the modules that prove the architecture (``detect``), the ComfyUI classes it
covers (``comfy_classes``) and maps layer names to families with regular expressions. Names are
relative to the diffusion model, exactly as in ComfyUI's state dicts without the
``diffusion_model.`` prefix.

Every diffusion-model class ComfyUI 0.3.64 can load is either covered by a named template here or
refused by :func:`detect_architecture` with a message listing what is supported
(:data:`COMFY_REFUSED` names the refused ones). Modules that are not ComfyUI classes (your own DiT,
MiniFlux) are matched by their module names, with a generic fallback for Linear layers in
repeated blocks.

Some architectures keep their per-block modulation as a bare ``nn.Parameter`` rather than a
Linear layer (Wan's ``blocks.N.modulation``, a ``(1, 6, dim)`` table added to the shared
``time_projection`` output); such parameters are listed in ``ArchTemplate.bare_parameters`` and are
never pruned: only Linear weights are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .dit_shapes import DitShapes

__all__ = [
    "COMFY_REFUSED",
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "REMAINDER_KEPT_FAMILIES",
    "TEMPLATES",
    "ArchTemplate",
    "FusedLayer",
    "LayerFilter",
    "TemplateMismatchError",
    "UnsupportedModelError",
    "check_blocks",
    "detect_architecture",
    "find_prunable_layers",
    "is_remainder_family",
    "layer_block",
    "layer_family",
    "remainder_layers",
    "rest_linear_params",
    "supported_models_text",
    "unwrap_diffusion_model",
]

#: Every family name a template may use. ``attention`` holds self- and cross-attention
#: projections alike (each template's docstring says which is which).
FAMILIES = ("attention", "mlp", "single_fused", "modulation", "embedder", "final", "block_linear")

#: Families pruned when the caller does not choose. Modulation layers are left dense by default:
#: the quality benchmark (README, "Which layers") measured a large error increase when they are
#: pruned, for a small share of FLOPs (their input is one vector per sample).
DEFAULT_FAMILIES = ("attention", "mlp", "single_fused", "block_linear")

#: Families whose weights a compressed file's ``remainder`` option leaves in the model's dtype: the
#: embedders and the final layer, as ComfyUI-GGUF's converter keeps them in 16 bits. On FLUX.1-dev
#: they are 67M of the 3.29B parameters outside the prunable layers (0.13 GB in bf16), yet rounding
#: them to int3 or int4 gave 71-96% of the remainder's error on the MiniFlux test-beds (held out:
#: docs/bench/remainder.md).
REMAINDER_KEPT_FAMILIES = ("embedder", "final")

LayerFilter = Callable[[nn.Module, str], bool]


class UnsupportedModelError(ValueError):
    """The model has no layers any template recognises."""


class TemplateMismatchError(UnsupportedModelError):
    """The architecture is recognised but its blocks do not match the template (names the key)."""


@dataclass(frozen=True)
class FusedLayer:
    """A Linear whose weight stacks several projections.

    Attributes:
        pattern: regex of the fused layers' full names.
        axis: ``"out"`` when the parts are stacked along the output rows (``qkv``: rows
            ``[q; k; v]``), ``"in"`` when they are concatenated along the input columns.
        parts: the projections, in order along ``axis``.
    """

    pattern: str
    axis: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class ArchTemplate:
    """Declarative description of one DiT family.

    Attributes:
        name: architecture name shown to users and stored with calibrations.
        detect: module names of which at least one must exist for the template to apply.
        families: ``(family, regex)`` pairs matched in order against full layer names.
        block: regex whose first group is the block id (e.g. ``double_blocks.3``): the rows of the
            per-block report and plot, in module order.
        display: the models it covers, for messages and docs.
        comfy_classes: ``module.QualName`` of the ComfyUI diffusion-model classes it covers.
        fused: Linear layers that fuse several projections.
        bare_parameters: ``(regex, meaning)`` of parameters that are not Linear weights (bare
            modulation tables, MoE router weights...): never pruned.
        optional: regex of block layers that only some blocks of a list have (SD3's last,
            pre-only context block lacks ``attn.proj`` and the MLP); other layers must be in
            every block of their list.
        text_stream: regex of the layers whose inputs are the conditioning (text) tokens only, not
            the image tokens: a double-stream block's text half, a cross-attention's key and value.
            A calibration of a few prompts gives them few distinct inputs, so their Gram fits
            those prompts closely; reconstruction shrinks it harder
            (:attr:`~ditprune_core.config.ReconstructParams.shrink_text`). None: no such layers.
    """

    name: str
    detect: tuple[str, ...]
    families: tuple[tuple[str, str], ...]
    block: str
    display: str = ""
    comfy_classes: tuple[str, ...] = ()
    fused: tuple[FusedLayer, ...] = ()
    bare_parameters: tuple[tuple[str, str], ...] = ()
    optional: str | None = None
    text_stream: str | None = None

    def family_of(self, name: str) -> str | None:
        for family, pattern in self.families:
            if re.fullmatch(pattern, name):
                return family
        return None

    def is_text_stream(self, name: str) -> bool:
        """Whether layer ``name``'s inputs are the conditioning tokens only (:attr:`text_stream`)."""
        return self.text_stream is not None and re.fullmatch(self.text_stream, name) is not None


_QKV = FusedLayer(r".*\.qkv", "out", ("q", "k", "v"))

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
    display="FLUX.1 dev / schnell / Fill",
    comfy_classes=("comfy.ldm.flux.model.Flux",),
    text_stream=r"double_blocks\.\d+\.txt_(attn|mlp)\..*",
    fused=(
        _QKV,
        FusedLayer(r"single_blocks\.\d+\.linear1", "out", ("q", "k", "v", "mlp_in")),
        FusedLayer(r"single_blocks\.\d+\.linear2", "in", ("attn_out", "mlp_hidden")),
    ),
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
    display="SD3 / SD3.5 medium, large",
    comfy_classes=("comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",),
    text_stream=r"joint_blocks\.\d+\.context_block\..*",
    fused=(_QKV,),
    # the last context block is pre-only (no attn.proj, no MLP); SD3.5 medium has attn2 in its
    # first blocks only
    optional=r"joint_blocks\.\d+\.(context_block\.(attn\.proj|mlp\.fc[12])|x_block\.attn2\.(qkv|proj))",
)

CHROMA = ArchTemplate(
    name="chroma",
    detect=("distilled_guidance_layer.in_proj",),
    families=(
        ("attention", r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)"),
        ("mlp", r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)"),
        ("single_fused", r"single_blocks\.\d+\.linear(1|2)"),
        # no per-block modulation layers: one small MLP (the "approximator") computes every
        # block's shift/scale/gate from the timestep; that MLP is the modulation family
        ("modulation", r"distilled_guidance_layer\.(in_proj|out_proj|layers\.\d+\.(in|out)_layer)"),
        ("embedder", r"(img_in|txt_in)"),
        ("final", r"final_layer\.linear"),
    ),
    block=r"^((?:double|single)_blocks\.\d+)\.",
    display="Chroma (FLUX.1-schnell derivative)",
    comfy_classes=("comfy.ldm.chroma.model.Chroma",),
    text_stream=r"double_blocks\.\d+\.txt_(attn|mlp)\..*",
    fused=FLUX.fused,
)

HUNYUAN_VIDEO = ArchTemplate(
    name="hunyuan_video",
    detect=("txt_in.individual_token_refiner.blocks.0.self_attn.qkv",),
    families=(
        # the text refiner in txt_in is part of the text embedder: never pruned by default
        (
            "embedder",
            r"(txt_in\..*|(time_in|time_r_in|vector_in|guidance_in)\.(in_layer|out_layer)|byt5_in\.fc[123])",
        ),
        ("attention", r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)"),
        ("mlp", r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)"),
        ("single_fused", r"single_blocks\.\d+\.linear(1|2)"),
        ("modulation", r"(double_blocks\.\d+\.(img|txt)_mod\.lin|single_blocks\.\d+\.modulation\.lin)"),
        ("final", r"final_layer\.(linear|adaLN_modulation\.1)"),
    ),
    block=r"^((?:double|single)_blocks\.\d+|txt_in\.individual_token_refiner\.blocks\.\d+)\.",
    display="HunyuanVideo T2V / I2V / SkyReels, HunyuanImage 2.1",
    comfy_classes=("comfy.ldm.hunyuan_video.model.HunyuanVideo",),
    text_stream=r"double_blocks\.\d+\.txt_(attn|mlp)\..*",
    fused=FLUX.fused,
)

QWEN_IMAGE = ArchTemplate(
    name="qwen_image",
    detect=("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.img_mod.1"),
    families=(
        # image stream: to_q/to_k/to_v/to_out.0; text stream: add_{q,k,v}_proj/to_add_out (joint
        # self-attention over both, no cross-attention)
        (
            "attention",
            r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
        ),
        ("mlp", r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)"),
        ("modulation", r"transformer_blocks\.\d+\.(img|txt)_mod\.1"),
        ("embedder", r"(img_in|txt_in|time_text_embed\.timestep_embedder\.linear_(1|2))"),
        ("final", r"(norm_out\.linear|proj_out)"),
    ),
    block=r"^(transformer_blocks\.\d+)\.",
    display="Qwen-Image, Qwen-Image-Edit",
    comfy_classes=("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
    text_stream=r"transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|txt_mlp\..*)",
)

WAN = ArchTemplate(
    name="wan",
    detect=("blocks.0.cross_attn.q",),
    families=(
        # self_attn: self-attention over video tokens; cross_attn: to the text (k/v) and, for
        # I2V, to the CLIP image tokens (k_img/v_img)
        ("attention", r"blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img)"),
        ("mlp", r"blocks\.\d+\.ffn\.(0|2)"),
        # one Linear makes the modulation of all blocks; each block adds its own bare table
        ("modulation", r"time_projection\.1"),
        ("embedder", r"((text_embedding|time_embedding)\.(0|2)|img_emb\.proj\.(1|3))"),
        ("final", r"head\.head"),
    ),
    block=r"^(blocks\.\d+)\.",
    display="Wan 2.1 / 2.2 T2V, I2V, FLF2V, TI2V 5B",
    comfy_classes=("comfy.ldm.wan.model.WanModel",),
    # the cross-attention's key and value read the text (and CLIP image) tokens
    text_stream=r"blocks\.\d+\.cross_attn\.(k|v|k_img|v_img)",
    bare_parameters=(
        (r"blocks\.\d+\.modulation", "per-block adaLN table (1, 6, dim) added to time_projection"),
        (r"head\.modulation", "final adaLN table (1, 2, dim)"),
    ),
)

HIDREAM = ArchTemplate(
    name="hidream",
    detect=("caption_projection.0.linear", "double_stream_blocks.0.block.attn1.to_q"),
    families=(
        # joint self-attention; to_*_t are the text stream of the double-stream blocks
        ("attention", r"(double|single)_stream_blocks\.\d+\.block\.attn1\.(to_q|to_k|to_v|to_out)(_t)?"),
        # MoE SwiGLU: routed experts, the shared expert, and the dense text MLP (ff_t)
        (
            "mlp",
            r"(double|single)_stream_blocks\.\d+\.block\.(ff_i\.(shared_experts\.|experts\.\d+\.)?|ff_t\.)w[123]",
        ),
        ("modulation", r"(double|single)_stream_blocks\.\d+\.block\.adaLN_modulation\.1"),
        (
            "embedder",
            r"((t_embedder\.timestep|p_embedder\.pooled)_embedder\.linear_(1|2)|x_embedder\.proj|caption_projection\.\d+\.linear)",
        ),
        ("final", r"final_layer\.(linear|adaLN_modulation\.1)"),
    ),
    block=r"^((?:double|single)_stream_blocks\.\d+)\.",
    display="HiDream-I1 full / dev / fast, HiDream-E1",
    comfy_classes=("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",),
    text_stream=r"double_stream_blocks\.\d+\.block\.(attn1\.to_(q|k|v|out)_t|ff_t\.w[123])",
    bare_parameters=((r".*\.ff_i\.gate\.weight", "MoE router (n_experts, dim), a bare parameter"),),
)

LUMINA2 = ArchTemplate(
    name="lumina2",
    detect=("cap_embedder.1",),
    families=(
        # qkv fuses q (n_heads) with k and v (n_kv_heads each: grouped-query attention)
        ("attention", r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)"),
        ("mlp", r"(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.w[123]"),
        ("modulation", r"(layers|noise_refiner)\.\d+\.adaLN_modulation\.1"),
        ("embedder", r"(x_embedder|cap_embedder\.1|t_embedder\.mlp\.(0|2))"),
        ("final", r"final_layer\.(linear|adaLN_modulation\.1)"),
    ),
    block=r"^((?:noise_refiner|context_refiner|layers)\.\d+)\.",
    display="Lumina Image 2.0, Neta Lumina",
    comfy_classes=("comfy.ldm.lumina.model.NextDiT",),
    # the context refiner runs on the caption tokens alone
    text_stream=r"context_refiner\.\d+\..*",
    fused=(_QKV,),
)

#: Checked in this order (HunyuanVideo and Chroma reuse FLUX's block names, so they come first).
TEMPLATES: tuple[ArchTemplate, ...] = (HUNYUAN_VIDEO, CHROMA, FLUX, SD3, QWEN_IMAGE, WAN, HIDREAM, LUMINA2)

#: ComfyUI 0.3.64 diffusion-model classes with no template, and what they are; refused by name.
COMFY_REFUSED: Mapping[str, str] = {
    "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel": "SD1.x / SD2.x / SDXL UNet",
    "comfy.ldm.cascade.stage_c.StageC": "Stable Cascade stage C",
    "comfy.ldm.cascade.stage_b.StageB": "Stable Cascade stage B",
    "comfy.ldm.ace.model.ACEStepTransformer2DModel": "ACE-Step (audio)",
    "comfy.ldm.audio.dit.AudioDiffusionTransformer": "Stable Audio",
    "comfy.ldm.aura.mmdit.MMDiT": "AuraFlow",
    "comfy.ldm.chroma_radiance.model.ChromaRadiance": "Chroma Radiance",
    "comfy.ldm.cosmos.model.GeneralDIT": "Cosmos 1.0",
    "comfy.ldm.cosmos.predict2.MiniTrainDIT": "Cosmos Predict2",
    "comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint": "Mochi",
    "comfy.ldm.hunyuan3d.model.Hunyuan3Dv2": "Hunyuan3D 2.0",
    "comfy.ldm.hunyuan3dv2_1.hunyuandit.HunYuanDiTPlain": "Hunyuan3D 2.1",
    "comfy.ldm.hydit.models.HunYuanDiT": "HunyuanDiT",
    "comfy.ldm.lightricks.model.LTXVModel": "LTX-Video",
    "comfy.ldm.omnigen.omnigen2.OmniGen2Transformer2DModel": "OmniGen2",
    "comfy.ldm.pixart.pixartms.PixArtMS": "PixArt alpha / sigma",
    "comfy.ldm.wan.model.VaceWanModel": "Wan VACE",
    "comfy.ldm.wan.model.CameraWanModel": "Wan Fun Camera",
    "comfy.ldm.wan.model.WanModel_S2V": "Wan 2.2 S2V",
    "comfy.ldm.wan.model.HumoWanModel": "Wan HuMo",
    "comfy.ldm.wan.model_animate.AnimateWanModel": "Wan 2.2 Animate",
}

# Generic fallback (modules that are not ComfyUI classes): Linear layers inside repeated blocks.
GENERIC_BLOCK = r"^((?:[A-Za-z_][\w]*\.)*?[A-Za-z_]\w*\.\d+)\."
GENERIC = ArchTemplate(
    name="generic",
    detect=(),
    families=(
        ("modulation", r".*\.\d+\..*(adaLN|modulation|_mod\b).*"),
        ("block_linear", r".*\.\d+\..*"),
    ),
    block=GENERIC_BLOCK,
    display="other DiTs (not ComfyUI classes) with Linear layers in repeated blocks",
)


#: Module names that mark a UNet (SD1.x, SDXL): refused even though its blocks repeat.
UNET_MARKERS = ("input_blocks.0", "middle_block", "output_blocks.0")


def supported_models_text() -> str:
    """One line naming every template and the models it covers (for error messages)."""
    order = (FLUX, SD3, CHROMA, HUNYUAN_VIDEO, QWEN_IMAGE, WAN, HIDREAM, LUMINA2)
    return "; ".join(f"{t.display} (template {t.name!r})" for t in order)


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


def is_remainder_family(family: str | None) -> bool:
    """Whether a compressed file's ``remainder`` option codes the unpruned Linear layers of
    ``family`` (:func:`remainder_layers`): a block family, not the embedders and the final layer
    (:data:`REMAINDER_KEPT_FAMILIES`), nor layers no family names."""
    return family is not None and family not in REMAINDER_KEPT_FAMILIES


def rest_linear_params(
    shapes: DitShapes, template_name: str, chosen: Callable[[str | None], bool] = is_remainder_family
) -> int:
    """Weights of the Linear layers outside the prunable families (:data:`DEFAULT_FAMILIES`) whose
    family ``chosen`` takes, in a model of these shapes (:mod:`~ditprune_core.dit_shapes`) named as
    ``template_name``'s architecture; by default those ``remainder`` codes (the modulation)."""
    template = next(t for t in TEMPLATES if t.name == template_name)
    families = {name: template.family_of(name) for name in shapes.linears}
    return shapes.linear_numel(
        [name for name, family in families.items() if family not in DEFAULT_FAMILIES and chosen(family)]
    )


def remainder_layers(model: nn.Module | object) -> list[str]:
    """The Linear layers a compressed file's ``remainder`` option stores as fp8 or codes when they are
    not pruned: those of a block family (modulation, and any unpruned attention or MLP layer), not the
    embedders and the final layer (:data:`REMAINDER_KEPT_FAMILIES`), nor Linear layers no family
    names (a generic DiT's layers outside its blocks), which stay in the model's dtype.

    Raises:
        UnsupportedModelError: when the model is not a recognisable DiT.
    """
    module = unwrap_diffusion_model(model)
    template = detect_architecture(module)
    return [name for name in _linear_layers(module) if is_remainder_family(template.family_of(name))]


def _class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_blocks(model: nn.Module | object, template: ArchTemplate) -> None:
    """Check that the blocks of ``model`` have the layers ``template`` describes.

    A model with fewer (or more) blocks than the published one is fine: blocks are counted as
    they are. Refused are blocks holding a Linear layer the template has no family for (a
    LoRA or adapter wrapper left in the model, a modified variant), and blocks lacking a layer
    the other blocks of their list have (outside ``template.optional``).

    Raises:
        TemplateMismatchError: naming the first layer that disagrees.
    """
    if template is GENERIC:
        return
    module = unwrap_diffusion_model(model)
    lists: dict[str, dict[str, list[str]]] = {}
    for name in _linear_layers(module):
        match = re.match(template.block, name)
        if match is None:
            continue
        block = match.group(1)
        if template.family_of(name) is None:
            raise TemplateMismatchError(
                f"layer {name!r} in block {block!r} is not part of the {template.name} template "
                f"({template.display}): this model differs from ComfyUI's {template.name} (a LoRA or "
                "adapter wrapper still in the model, or a modified architecture?). Merge or remove the "
                "extra layers first, or prune with layer_regex limited to the layers you know"
            )
        list_name = block.rsplit(".", 1)[0]
        lists.setdefault(list_name, {}).setdefault(block, []).append(name[len(block) + 1 :])
    optional = re.compile(template.optional) if template.optional else None
    for blocks in lists.values():
        union: dict[str, None] = {}
        for relative in blocks.values():
            union.update(dict.fromkeys(relative))
        for block, relative in blocks.items():
            have = set(relative)
            for rel in union:
                full = f"{block}.{rel}"
                if rel not in have and not (optional is not None and optional.fullmatch(full)):
                    raise TemplateMismatchError(
                        f"block {block!r} has no layer {full!r}, which the other blocks of this "
                        f"{template.name} model have: its blocks do not match the {template.name} "
                        f"template ({template.display}). A model with layers removed inside its "
                        "blocks cannot be pruned with this template; use the unmodified model"
                    )


def _refuse(module: nn.Module, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(module).__name__} is {what}: ditprune prunes diffusion transformers with a template, "
        f"supported are {supported_models_text()}"
    )


def detect_architecture(model: nn.Module | object) -> ArchTemplate:
    """The template that applies to ``model``, its blocks checked (:func:`check_blocks`).

    A ComfyUI diffusion model is matched by its class (``comfy_classes``); any other module by
    its module names (``detect``), falling back to :data:`GENERIC` when its Linear layers sit in
    repeated blocks.

    Raises:
        UnsupportedModelError: a UNet, a ComfyUI class with no template (naming it and what is
            supported), or a module with no Linear inside a repeated block.
        TemplateMismatchError: the architecture is known but its blocks differ (names the layer).
    """
    module = unwrap_diffusion_model(model)
    names = {name for name, _ in module.named_modules()}
    if all(marker in names for marker in UNET_MARKERS):
        raise _refuse(
            module,
            "a UNet (input_blocks / middle_block / output_blocks, as in SD1.x and SDXL), not a "
            "diffusion transformer",
        )
    path = _class_path(module)
    template: ArchTemplate | None = None
    if path.startswith("comfy."):
        template = next((t for t in TEMPLATES if path in t.comfy_classes), None)
        if template is None:
            known = COMFY_REFUSED.get(path)
            raise _refuse(
                module,
                f"ComfyUI's {path} ({known}), which has no ditprune template yet"
                if known
                else f"ComfyUI's {path}, a model class ditprune does not know",
            )
        if not any(key in names for key in template.detect):
            raise TemplateMismatchError(
                f"{type(module).__name__} is ComfyUI's {template.name} class but has none of the "
                f"modules {list(template.detect)} its template expects: a modified {template.name}; "
                "ditprune cannot tell which layers to prune"
            )
    else:
        template = next((t for t in TEMPLATES if any(key in names for key in t.detect)), None)
    if template is not None:
        check_blocks(module, template)
        return template
    if any(GENERIC.family_of(name) for name in _linear_layers(module)):
        return GENERIC
    raise UnsupportedModelError(
        f"{type(module).__name__} has no recognisable DiT blocks: supported are "
        f"{supported_models_text()}, and any model whose Linear layers sit in repeated blocks "
        "(e.g. blocks.0.attn.qkv). A UNet such as SDXL is not a DiT."
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
        TemplateMismatchError: when its blocks do not match its template.
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
