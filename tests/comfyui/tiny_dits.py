"""Tiny random Qwen-Image, Wan, HunyuanVideo, Chroma, HiDream and Lumina 2 models with ComfyUI's
exact key names (from ditprune_core.dit_shapes), their conditioning and latents, and the
detection override for the sizes ComfyUI hard-codes. Builds tensors without ComfyUI; the override
patches comfy.model_detection."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ditprune_core.dit_shapes import SHAPES, DitShapes


@dataclass(frozen=True)
class TinyDit:
    """One architecture's tiny test model: builder config, ComfyUI class, inputs."""

    arch: str
    config: dict[str, Any]
    comfy_class: str
    cond: Callable[..., list]
    latent: Callable[[int], dict[str, torch.Tensor]]
    layer: str  # a default-pruned layer to look at
    modulation: str | None  # a Linear of the modulation family (stays dense), if any

    def shapes(self) -> DitShapes:
        return SHAPES[self.arch](**self.config)


def random_weights(shapes: DitShapes, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random Linear / conv / modulation tensors; norm weights (1-D, not a bias) set to one."""
    gen = torch.Generator().manual_seed(seed)
    linears = set(shapes.linears)
    out = {}
    for key, shape in shapes.shapes.items():
        owner, leaf = key.rsplit(".", 1)
        if owner not in linears and len(shape) == 1 and leaf in ("weight", "scale"):
            out[key] = torch.ones(shape)
        else:
            out[key] = torch.randn(shape, generator=gen) * std
    return out


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _context(width: int, tokens: int = 6, **extra: Any) -> Callable[..., list]:
    """Text embeddings (B, tokens, width); ``extra`` values are callables of the batch size."""

    def cond(batch: int = 1, seed: int = 1) -> list:
        return [
            [torch.randn(batch, tokens, width, generator=_gen(seed)), {k: f(batch) for k, f in extra.items()}]
        ]

    return cond


def _hunyuan_cond(batch: int = 1, seed: int = 1) -> list:
    g = _gen(seed)
    return [[torch.randn(batch, 6, 64, generator=g), {"pooled_output": torch.randn(batch, 768, generator=g)}]]


def _hidream_cond(batch: int = 1, seed: int = 1) -> list:
    g = _gen(seed)
    t5 = torch.randn(batch, 6, 48, generator=g)
    extra = {
        "pooled_output": torch.randn(batch, 24, generator=g),
        "conditioning_llama3": torch.randn(batch, 2, 5, 32, generator=g),  # (B, llama layers, T, width)
    }
    return [[t5, extra]]


def _image(batch: int, size: int = 8) -> dict[str, torch.Tensor]:
    return {"samples": torch.zeros(batch, 16, size, size)}


def _video(batch: int, frames: int = 3, size: int = 8) -> dict[str, torch.Tensor]:
    return {"samples": torch.zeros(batch, 16, frames, size, size)}


TINY_DITS: dict[str, TinyDit] = {
    t.arch: t
    for t in (
        TinyDit(
            "qwen_image",
            {"heads": 2, "head_dim": 32, "layers": 2, "ctx": 48},
            "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",
            _context(48),
            _image,
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.img_mod.1",
        ),
        TinyDit(
            # dim 128 = one head of ComfyUI's fixed head width 128; text width 4096 is not detected
            "wan",
            {"dim": 128, "ffn": 256, "layers": 2, "text_dim": 4096},
            "comfy.ldm.wan.model.WanModel",
            _context(4096),
            _video,
            "blocks.0.self_attn.q",
            "time_projection.1",
        ),
        TinyDit(
            "hunyuan_video",
            {"hidden": 128, "depth": 1, "depth_single": 1, "ctx": 64},
            "comfy.ldm.hunyuan_video.model.HunyuanVideo",
            _hunyuan_cond,
            _video,
            "double_blocks.0.img_attn.qkv",
            "double_blocks.0.img_mod.lin",
        ),
        TinyDit(
            "chroma",
            {
                "hidden": 64,
                "heads": 2,
                "depth": 1,
                "depth_single": 1,
                "ctx": 32,
                "approx_hidden": 32,
                "approx_layers": 2,
            },
            "comfy.ldm.chroma.model.Chroma",
            _context(32, pooled_output=lambda b: None),  # Chroma's T5 encoder gives no pooled vector
            _image,
            "single_blocks.0.linear1",
            "distilled_guidance_layer.in_proj",
        ),
        TinyDit(
            "hidream",
            {
                "heads": 1,  # ComfyUI fixes HiDream's head width at 128
                "head_dim": 128,
                "layers": 1,
                "single_layers": 1,
                "t5_dim": 48,
                "llama_dim": 32,
                "pooled_dim": 24,
            },
            "comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",
            _hidream_cond,
            _image,
            "double_stream_blocks.0.block.attn1.to_q",
            "double_stream_blocks.0.block.adaLN_modulation.1",
        ),
        TinyDit(
            "lumina2",
            # ComfyUI fixes 8 key/value heads: 16 query heads of width 8 keep grouped-query attention
            {"dim": 128, "heads": 16, "kv_heads": 8, "layers": 1, "refiners": 1, "cap_dim": 32},
            "comfy.ldm.lumina.model.NextDiT",
            # Gemma's encoder gives an integer mask; ComfyUI counts num_tokens from it
            _context(32, attention_mask=lambda b: torch.ones(1, 6, dtype=torch.long)),
            _image,
            "layers.0.attention.qkv",
            "layers.0.adaLN_modulation.1",
        ),
    )
}


def _axes(head_dim: int, n: int = 3) -> list[int]:
    """Rotary axes (even sizes) summing to ``head_dim``."""
    first = head_dim - (n - 1) * (head_dim // n // 2 * 2)
    return [first] + [head_dim // n // 2 * 2] * (n - 1)


@contextlib.contextmanager
def dit_detection_from_shapes() -> Iterator[None]:
    """Where ComfyUI's detection hard-codes widths (Chroma, Qwen-Image, HiDream, Lumina 2), read
    them from the state dict instead, from tensors that stay dense when pruned (norms, embedders,
    modulation). Wan and HunyuanVideo need no override."""
    import comfy.model_detection

    original = comfy.model_detection.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):  # type: ignore[no-untyped-def]
        cfg = original(state_dict, key_prefix, metadata=metadata)
        p = key_prefix
        model = cfg.get("image_model") if cfg else None
        if model == "chroma":
            hidden = state_dict[f"{p}img_in.weight"].shape[0]
            head_dim = state_dict[f"{p}double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]
            cfg.update(
                hidden_size=hidden,
                num_heads=hidden // head_dim,
                context_in_dim=state_dict[f"{p}txt_in.weight"].shape[1],
                out_dim=hidden,
                hidden_dim=state_dict[f"{p}distilled_guidance_layer.in_proj.weight"].shape[0],
                n_layers=sum(1 for k in state_dict if k.startswith(f"{p}distilled_guidance_layer.norms.")),
                axes_dim=_axes(head_dim),
            )
        elif model == "qwen_image":
            head_dim = state_dict[f"{p}transformer_blocks.0.attn.norm_q.weight"].shape[0]
            inner = state_dict[f"{p}img_in.weight"].shape[0]
            cfg.update(
                attention_head_dim=head_dim,
                num_attention_heads=inner // head_dim,
                joint_attention_dim=state_dict[f"{p}txt_norm.weight"].shape[0],
                axes_dims_rope=_axes(head_dim),
            )
        elif model == "hidream":
            inner = state_dict[f"{p}x_embedder.proj.weight"].shape[0]
            double = sum(
                1 for k in state_dict if k.endswith(".block.adaLN_modulation.1.weight") and "double" in k
            )
            single = sum(
                1 for k in state_dict if k.endswith(".block.adaLN_modulation.1.weight") and "single" in k
            )
            projections = double + single + 1
            cfg.update(
                num_attention_heads=inner // 128,
                caption_channels=[
                    state_dict[f"{p}caption_projection.{projections - 1}.linear.weight"].shape[1],
                    state_dict[f"{p}caption_projection.0.linear.weight"].shape[1],
                ],
                llama_layers=[i % 2 for i in range(double + single)],
                num_layers=double,
                num_single_layers=single,
                text_emb_dim=state_dict[f"{p}p_embedder.pooled_embedder.linear_1.weight"].shape[1],
            )
        elif model == "lumina2":
            dim = state_dict[f"{p}x_embedder.weight"].shape[0]
            head_dim = state_dict[f"{p}layers.0.attention.q_norm.weight"].shape[0]
            # read from tensors that stay dense (norms, embedders): a compressed file packs the rest
            refiners = [
                k for k in state_dict if k.startswith(f"{p}noise_refiner.") and k.endswith("q_norm.weight")
            ]
            cfg.update(
                dim=dim, n_heads=dim // head_dim, n_refiner_layers=len(refiners), axes_dims=_axes(head_dim)
            )
        return cfg

    comfy.model_detection.detect_unet_config = detect
    try:
        yield
    finally:
        comfy.model_detection.detect_unet_config = original
