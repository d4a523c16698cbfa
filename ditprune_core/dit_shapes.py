"""State-dict shapes of ComfyUI's DiTs at any size, written out from the key names in
``comfy/ldm/<model>/`` (ComfyUI 0.3.64) and checked against ComfyUI's own classes by the node tests.

``SHAPES[arch](**config)`` returns :class:`DitShapes`: every key of the diffusion model's state dict
(no ``diffusion_model.`` prefix) with its shape, and which of them are Linear layers. With
:data:`FULL_CONFIGS` it gives the published models' parameter counts (the supported-models table),
with small configs the tiny random models of the tests; :func:`module_tree` turns it into an
``nn.Module`` tree with the same names (on the meta device by default: no memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn

__all__ = [
    "FLUX_DEV",
    "FLUX_LAYERS",
    "FLUX_PRUNABLE",
    "FLUX_REST",
    "FLUX_SHAPES",
    "FLUX_TOTAL",
    "FULL_CONFIGS",
    "SHAPES",
    "DitShapes",
    "module_tree",
]

# ---- FLUX.1-dev, defined once for every benchmark -------------------------------------------------
#: FLUX.1-dev's dimensions: hidden width, attention heads, double and single blocks, MLP width
FLUX_DEV = {"hidden": 3072, "heads": 24, "depth": 19, "depth_single": 38, "mlp": 12288}
_H, _MLP = FLUX_DEV["hidden"], FLUX_DEV["mlp"]
#: (out, in) -> how many of FLUX.1-dev's prunable layers (attention, MLP, fused single) have it
FLUX_SHAPES = {
    (3 * _H, _H): 2 * FLUX_DEV["depth"],  # img_attn.qkv, txt_attn.qkv
    (_H, _H): 2 * FLUX_DEV["depth"],  # img_attn.proj, txt_attn.proj
    (_MLP, _H): 2 * FLUX_DEV["depth"],  # img_mlp.0, txt_mlp.0
    (_H, _MLP): 2 * FLUX_DEV["depth"],  # img_mlp.2, txt_mlp.2
    (3 * _H + _MLP, _H): FLUX_DEV["depth_single"],  # single_blocks.N.linear1
    (_H, _H + _MLP): FLUX_DEV["depth_single"],  # single_blocks.N.linear2
}
#: name: (out, in), the four layers the step-time benchmarks measure (the largest distinct shapes)
FLUX_LAYERS = {
    "single_blocks.N.linear1": (3 * _H + _MLP, _H),
    "single_blocks.N.linear2": (_H, _H + _MLP),
    "double_blocks.N.img_attn.qkv": (3 * _H, _H),
    "double_blocks.N.img_mlp.2": (_H, _MLP),
}
#: weights of FLUX.1-dev's prunable layers
FLUX_PRUNABLE = sum(rows * cols * count for (rows, cols), count in FLUX_SHAPES.items())
#: parameters of the FLUX.1-dev diffusion model (23.8 GB in bf16)
FLUX_TOTAL = 11_901_408_320
#: the rest: modulation, embedders, final layer, norms and biases
FLUX_REST = FLUX_TOTAL - FLUX_PRUNABLE


@dataclass
class DitShapes:
    """Key -> shape of one diffusion model, and the names of its Linear layers (no ``.weight``)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    linears: list[str] = field(default_factory=list)

    def lin(self, name: str, out_f: int, in_f: int, bias: bool = True) -> None:
        self.shapes[name + ".weight"] = (out_f, in_f)
        if bias:
            self.shapes[name + ".bias"] = (out_f,)
        self.linears.append(name)

    def param(self, name: str, *shape: int) -> None:
        self.shapes[name] = tuple(shape)

    def norm(self, name: str, dim: int, *, bias: bool = False, key: str = "weight") -> None:
        self.shapes[f"{name}.{key}"] = (dim,)
        if bias:
            self.shapes[f"{name}.bias"] = (dim,)

    def numel(self, keys: list[str] | None = None) -> int:
        return sum(prod(self.shapes[k]) for k in (self.shapes if keys is None else keys))

    def linear_numel(self, names: list[str]) -> int:
        """Weight entries (no biases) of the Linear layers ``names``."""
        return sum(prod(self.shapes[n + ".weight"]) for n in names)


def _mlp_embedder(s: DitShapes, name: str, in_dim: int, hidden: int) -> None:
    s.lin(f"{name}.in_layer", hidden, in_dim)
    s.lin(f"{name}.out_layer", hidden, hidden)


def _swiglu_hidden(hidden: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
    hidden = int(2 * hidden / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _flux_streams(s: DitShapes, hidden: int, heads: int, depth: int, depth_single: int, mod: bool) -> None:
    h, hd, m = hidden, hidden // heads, 4 * hidden
    for i in range(depth):
        for st in ("img", "txt"):
            b = f"double_blocks.{i}.{st}_"
            if mod:
                s.lin(b + "mod.lin", 6 * h, h)
            s.lin(b + "attn.qkv", 3 * h, h)
            s.norm(b + "attn.norm.query_norm", hd, key="scale")
            s.norm(b + "attn.norm.key_norm", hd, key="scale")
            s.lin(b + "attn.proj", h, h)
            s.lin(b + "mlp.0", m, h)
            s.lin(b + "mlp.2", h, m)
    for i in range(depth_single):
        b = f"single_blocks.{i}."
        s.lin(b + "linear1", 3 * h + m, h)
        s.lin(b + "linear2", h, h + m)
        s.norm(b + "norm.query_norm", hd, key="scale")
        s.norm(b + "norm.key_norm", hd, key="scale")
        if mod:
            s.lin(b + "modulation.lin", 3 * h, h)


def flux_shapes(
    hidden: int = 3072,
    heads: int = 24,
    depth: int = 19,
    depth_single: int = 38,
    ctx: int = 4096,
    vec: int = 768,
) -> DitShapes:
    """FLUX.1-dev (comfy/ldm/flux): latent 16 channels, patch 2, guidance embedder."""
    s = DitShapes()
    s.lin("img_in", hidden, 64)
    _mlp_embedder(s, "time_in", 256, hidden)
    _mlp_embedder(s, "vector_in", vec, hidden)
    _mlp_embedder(s, "guidance_in", 256, hidden)
    s.lin("txt_in", hidden, ctx)
    _flux_streams(s, hidden, heads, depth, depth_single, mod=True)
    s.lin("final_layer.linear", 64, hidden)
    s.lin("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return s


def chroma_shapes(
    hidden: int = 3072,
    heads: int = 24,
    depth: int = 19,
    depth_single: int = 38,
    ctx: int = 4096,
    approx_hidden: int = 5120,
    approx_layers: int = 5,
) -> DitShapes:
    """Chroma (comfy/ldm/chroma): FLUX's blocks without modulation layers; one approximator MLP
    (``distilled_guidance_layer``, input 64 = timestep 16 + guidance 16 + block index 32) computes all."""
    s = DitShapes()
    s.lin("img_in", hidden, 64)
    s.lin("txt_in", hidden, ctx)
    g = "distilled_guidance_layer."
    s.lin(g + "in_proj", approx_hidden, 64)
    for i in range(approx_layers):
        s.lin(f"{g}layers.{i}.in_layer", approx_hidden, approx_hidden)
        s.lin(f"{g}layers.{i}.out_layer", approx_hidden, approx_hidden)
    for i in range(approx_layers):
        s.norm(f"{g}norms.{i}", approx_hidden, key="scale")
    s.lin(g + "out_proj", hidden, approx_hidden)
    _flux_streams(s, hidden, heads, depth, depth_single, mod=False)
    s.lin("final_layer.linear", 64, hidden)
    return s


def hunyuan_video_shapes(
    hidden: int = 3072,
    depth: int = 20,
    depth_single: int = 40,
    ctx: int = 4096,
    in_channels: int = 16,
    guidance: bool = True,
) -> DitShapes:
    """HunyuanVideo (comfy/ldm/hunyuan_video): FLUX-like streams with head dim 128, a Conv3d patch
    embedding (patch 1x2x2), a 2-block token refiner in ``txt_in`` and a 768-wide CLIP vector."""
    h, heads = hidden, hidden // 128
    s = DitShapes()
    s.param("img_in.proj.weight", h, in_channels, 1, 2, 2)
    s.param("img_in.proj.bias", h)
    _mlp_embedder(s, "time_in", 256, h)
    _mlp_embedder(s, "vector_in", 768, h)
    if guidance:
        _mlp_embedder(s, "guidance_in", 256, h)
    s.lin("txt_in.input_embedder", h, ctx)
    _mlp_embedder(s, "txt_in.t_embedder", 256, h)
    _mlp_embedder(s, "txt_in.c_embedder", ctx, h)
    for i in range(2):
        b = f"txt_in.individual_token_refiner.blocks.{i}."
        s.lin(b + "adaLN_modulation.1", 2 * h, h)
        s.norm(b + "norm1", h, bias=True)
        s.lin(b + "self_attn.qkv", 3 * h, h)
        s.lin(b + "self_attn.proj", h, h)
        s.norm(b + "norm2", h, bias=True)
        s.lin(b + "mlp.0", 4 * h, h)
        s.lin(b + "mlp.2", h, 4 * h)
    _flux_streams(s, h, heads, depth, depth_single, mod=True)
    s.lin("final_layer.linear", 16 * 4, h)
    s.lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def qwen_image_shapes(
    heads: int = 24, head_dim: int = 128, layers: int = 60, ctx: int = 3584, in_channels: int = 64
) -> DitShapes:
    """Qwen-Image (comfy/ldm/qwen_image): MMDiT with separate q/k/v per stream, GELU MLPs."""
    d = heads * head_dim
    s = DitShapes()
    s.lin("time_text_embed.timestep_embedder.linear_1", d, 256)
    s.lin("time_text_embed.timestep_embedder.linear_2", d, d)
    s.norm("txt_norm", ctx)
    s.lin("img_in", d, in_channels)
    s.lin("txt_in", d, ctx)
    for i in range(layers):
        b = f"transformer_blocks.{i}."
        for st in ("img", "txt"):
            s.lin(f"{b}{st}_mod.1", 6 * d, d)
            s.lin(f"{b}{st}_mlp.net.0.proj", 4 * d, d)
            s.lin(f"{b}{st}_mlp.net.2", d, 4 * d)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            s.norm(f"{b}attn.{n}", head_dim)
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            s.lin(f"{b}attn.{n}", d, d)
    s.lin("norm_out.linear", 2 * d, d)
    s.lin("proj_out", 64, d)
    return s


def wan_shapes(
    dim: int = 5120,
    ffn: int = 13824,
    layers: int = 40,
    text_dim: int = 4096,
    in_dim: int = 16,
    out_dim: int = 16,
    i2v: bool = False,
) -> DitShapes:
    """Wan 2.1 / 2.2 (comfy/ldm/wan): self-attention, cross-attention to the text (and the CLIP image
    for I2V), GELU FFN; per-block modulation is a bare (1, 6, dim) parameter."""
    s = DitShapes()
    s.param("patch_embedding.weight", dim, in_dim, 1, 2, 2)
    s.param("patch_embedding.bias", dim)
    s.lin("text_embedding.0", dim, text_dim)
    s.lin("text_embedding.2", dim, dim)
    s.lin("time_embedding.0", dim, 256)
    s.lin("time_embedding.2", dim, dim)
    s.lin("time_projection.1", 6 * dim, dim)
    for i in range(layers):
        b = f"blocks.{i}."
        s.param(b + "modulation", 1, 6, dim)
        for n in ("q", "k", "v", "o"):
            s.lin(f"{b}self_attn.{n}", dim, dim)
        s.norm(b + "self_attn.norm_q", dim)
        s.norm(b + "self_attn.norm_k", dim)
        s.norm(b + "norm3", dim, bias=True)
        for n in ("q", "k", "v", "o"):
            s.lin(f"{b}cross_attn.{n}", dim, dim)
        s.norm(b + "cross_attn.norm_q", dim)
        s.norm(b + "cross_attn.norm_k", dim)
        if i2v:
            s.lin(b + "cross_attn.k_img", dim, dim)
            s.lin(b + "cross_attn.v_img", dim, dim)
            s.norm(b + "cross_attn.norm_k_img", dim)
        s.lin(b + "ffn.0", ffn, dim)
        s.lin(b + "ffn.2", dim, ffn)
    s.param("head.modulation", 1, 2, dim)
    s.lin("head.head", out_dim * 4, dim)
    if i2v:
        s.norm("img_emb.proj.0", 1280, bias=True)
        s.lin("img_emb.proj.1", 1280, 1280)
        s.lin("img_emb.proj.3", dim, 1280)
        s.norm("img_emb.proj.4", dim, bias=True)
    return s


def hidream_shapes(
    heads: int = 20,
    head_dim: int = 128,
    layers: int = 16,
    single_layers: int = 32,
    experts: int = 4,
    t5_dim: int = 4096,
    llama_dim: int = 4096,
    pooled_dim: int = 2048,
) -> DitShapes:
    """HiDream-I1 (comfy/ldm/hidream): double- and single-stream blocks with a mixture-of-experts
    SwiGLU (routed experts, a shared expert, a bare router weight) and one caption projection per
    block plus one for T5."""
    d = heads * head_dim
    s = DitShapes()
    s.lin("t_embedder.timestep_embedder.linear_1", d, 256)
    s.lin("t_embedder.timestep_embedder.linear_2", d, d)
    s.lin("p_embedder.pooled_embedder.linear_1", d, pooled_dim)
    s.lin("p_embedder.pooled_embedder.linear_2", d, d)
    s.lin("x_embedder.proj", d, 64)
    routed, shared = _swiglu_hidden(4 * d), _swiglu_hidden(2 * d)

    def swiglu(prefix: str, hidden: int) -> None:
        s.lin(prefix + "w1", hidden, d, bias=False)
        s.lin(prefix + "w2", d, hidden, bias=False)
        s.lin(prefix + "w3", hidden, d, bias=False)

    for kind, count in (("double", layers), ("single", single_layers)):
        for i in range(count):
            b = f"{kind}_stream_blocks.{i}.block."
            s.lin(b + "adaLN_modulation.1", (12 if kind == "double" else 6) * d, d)
            for suffix in ("", "_t") if kind == "double" else ("",):
                for n in ("to_q", "to_k", "to_v", "to_out"):
                    s.lin(f"{b}attn1.{n}{suffix}", d, d)
                s.norm(f"{b}attn1.q_rms_norm{suffix}", d)
                s.norm(f"{b}attn1.k_rms_norm{suffix}", d)
            swiglu(b + "ff_i.shared_experts.", shared)
            for e in range(experts):
                swiglu(f"{b}ff_i.experts.{e}.", routed)
            s.param(b + "ff_i.gate.weight", experts, d)
            if kind == "double":
                swiglu(b + "ff_t.", routed)
    s.lin("final_layer.linear", 64, d)
    s.lin("final_layer.adaLN_modulation.1", 2 * d, d)
    for i in range(layers + single_layers + 1):
        s.lin(
            f"caption_projection.{i}.linear",
            d,
            llama_dim if i < layers + single_layers else t5_dim,
            bias=False,
        )
    return s


def lumina2_shapes(
    dim: int = 2304,
    heads: int = 24,
    kv_heads: int = 8,
    layers: int = 26,
    refiners: int = 2,
    cap_dim: int = 2304,
) -> DitShapes:
    """Lumina Image 2.0 (comfy/ldm/lumina NextDiT): fused grouped-query qkv, SwiGLU FFN, two noise
    and two context refiner blocks before the main layers."""
    hd, t = dim // heads, min(dim, 1024)
    ffn = 256 * ((4 * dim + 255) // 256)  # Lumina's FeedForward: no 2/3 factor
    s = DitShapes()
    s.lin("x_embedder", dim, 64)

    def block(b: str, modulation: bool) -> None:
        s.lin(b + "attention.qkv", (heads + 2 * kv_heads) * hd, dim, bias=False)
        s.lin(b + "attention.out", dim, heads * hd, bias=False)
        s.norm(b + "attention.q_norm", hd)
        s.norm(b + "attention.k_norm", hd)
        s.lin(b + "feed_forward.w1", ffn, dim, bias=False)
        s.lin(b + "feed_forward.w2", dim, ffn, bias=False)
        s.lin(b + "feed_forward.w3", ffn, dim, bias=False)
        for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            s.norm(b + n, dim)
        if modulation:
            s.lin(b + "adaLN_modulation.1", 4 * dim, t)

    for i in range(refiners):
        block(f"noise_refiner.{i}.", True)
    for i in range(refiners):
        block(f"context_refiner.{i}.", False)
    s.lin("t_embedder.mlp.0", t, 256)
    s.lin("t_embedder.mlp.2", t, t)
    s.norm("cap_embedder.0", cap_dim)
    s.lin("cap_embedder.1", dim, cap_dim)
    for i in range(layers):
        block(f"layers.{i}.", True)
    s.norm("norm_final", dim)
    s.lin("final_layer.linear", 64, dim)
    s.lin("final_layer.adaLN_modulation.1", dim, t)
    return s


SHAPES: dict[str, Callable[..., DitShapes]] = {
    "flux": flux_shapes,
    "chroma": chroma_shapes,
    "hunyuan_video": hunyuan_video_shapes,
    "qwen_image": qwen_image_shapes,
    "wan": wan_shapes,
    "hidream": hidream_shapes,
    "lumina2": lumina2_shapes,
}

#: The published models, by the template that prunes them: (label, builder name, config).
FULL_CONFIGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("FLUX.1-dev", "flux", {}),
    ("Chroma", "chroma", {}),
    ("HunyuanVideo", "hunyuan_video", {}),
    ("Qwen-Image", "qwen_image", {}),
    ("Wan 2.1 / 2.2 14B T2V", "wan", {}),
    ("Wan 2.1 1.3B T2V", "wan", {"dim": 1536, "ffn": 8960, "layers": 30}),
    ("Wan 2.2 TI2V 5B", "wan", {"dim": 3072, "ffn": 14336, "layers": 30, "in_dim": 48, "out_dim": 48}),
    ("HiDream-I1", "hidream", {}),
    ("Lumina Image 2.0", "lumina2", {}),
)


def module_tree(shapes: DitShapes, device: torch.device | str = "meta") -> nn.Module:
    """An ``nn.Module`` whose ``state_dict()`` has exactly ``shapes.shapes``: Linear layers as
    ``nn.Linear``, everything else as bare parameters of plain modules (``ModuleList`` where a
    name part is an index)."""
    root = nn.Module()
    linears = set(shapes.linears)

    def child(parent: nn.Module, part: str) -> nn.Module:
        if part not in parent._modules:
            parent.add_module(part, nn.Module())
        module = parent._modules[part]
        assert module is not None
        return module

    def at(path: str) -> tuple[nn.Module, str]:
        *parents, last = path.split(".")
        node = root
        for part in parents:
            node = child(node, part)
        return node, last

    for name in shapes.linears:
        out_f, in_f = shapes.shapes[name + ".weight"]
        parent, last = at(name)
        parent.add_module(last, nn.Linear(in_f, out_f, bias=name + ".bias" in shapes.shapes, device=device))
    for key, shape in shapes.shapes.items():
        owner = key.rsplit(".", 1)[0]
        if owner in linears:
            continue
        parent, last = at(key)
        parent.register_parameter(last, nn.Parameter(torch.empty(shape, device=device), requires_grad=False))
    return root
