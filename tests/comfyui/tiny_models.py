"""Random FLUX / SD3 state dicts with ComfyUI's exact key names, and the narrow-FLUX detection
override. Needs no ComfyUI to build the tensors; the override patches comfy.model_detection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _lin(shapes: dict[str, tuple[int, ...]], name: str, out_f: int, in_f: int) -> None:
    shapes[name + ".weight"] = (out_f, in_f)
    shapes[name + ".bias"] = (out_f,)


def flux_shapes(
    hidden: int = 64,
    heads: int = 2,
    depth: int = 1,
    depth_single: int = 1,
    *,
    ctx: int = 32,
    vec: int = 32,
    guidance: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ComfyUI's FLUX (diffusion_model-relative), latent channels 16, patch 2."""
    h, hd, m = hidden, hidden // heads, 4 * hidden
    s: dict[str, tuple[int, ...]] = {}
    _lin(s, "img_in", h, 64)
    for emb, width in (("time_in", 256), ("vector_in", vec)) + ((("guidance_in", 256),) if guidance else ()):
        _lin(s, f"{emb}.in_layer", h, width)
        _lin(s, f"{emb}.out_layer", h, h)
    _lin(s, "txt_in", h, ctx)
    for i in range(depth):
        for st in ("img", "txt"):
            b = f"double_blocks.{i}.{st}_"
            _lin(s, b + "mod.lin", 6 * h, h)
            _lin(s, b + "attn.qkv", 3 * h, h)
            s[b + "attn.norm.query_norm.scale"] = (hd,)
            s[b + "attn.norm.key_norm.scale"] = (hd,)
            _lin(s, b + "attn.proj", h, h)
            _lin(s, b + "mlp.0", m, h)
            _lin(s, b + "mlp.2", h, m)
    for i in range(depth_single):
        b = f"single_blocks.{i}."
        _lin(s, b + "linear1", 3 * h + m, h)
        _lin(s, b + "linear2", h, h + m)
        s[b + "norm.query_norm.scale"] = (hd,)
        s[b + "norm.key_norm.scale"] = (hd,)
        _lin(s, b + "modulation.lin", 3 * h, h)
    _lin(s, "final_layer.linear", 64, h)
    _lin(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def sd3_shapes(
    depth: int = 2, *, ctx: int = 32, adm: int = 32, sd35: bool = False
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ComfyUI's MMDiT (SD3): hidden 64 * depth, the last context block pre-only.

    ``sd35`` adds SD3.5's RMS q/k norms (``ln_q``/``ln_k``) and a second self-attention
    (``x_block.attn2``) in block 0, whose modulation is then 9 * hidden wide."""
    h, m = 64 * depth, 256 * depth
    s: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, 256, h),
        "x_embedder.proj.weight": (h, 16, 2, 2),
        "x_embedder.proj.bias": (h,),
    }
    _lin(s, "t_embedder.mlp.0", h, 256)
    _lin(s, "t_embedder.mlp.2", h, h)
    _lin(s, "y_embedder.mlp.0", h, adm)
    _lin(s, "y_embedder.mlp.2", h, h)
    _lin(s, "context_embedder", h, ctx)
    for i in range(depth):
        for blk in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{blk}."
            pre_only = blk == "context_block" and i == depth - 1
            attn2 = sd35 and blk == "x_block" and i == 0
            for attn in ("attn", "attn2") if attn2 else ("attn",):
                _lin(s, b + f"{attn}.qkv", 3 * h, h)
                if sd35:
                    s[b + f"{attn}.ln_q.weight"] = (64,)
                    s[b + f"{attn}.ln_k.weight"] = (64,)
                if not pre_only:
                    _lin(s, b + f"{attn}.proj", h, h)
            if not pre_only:
                _lin(s, b + "mlp.fc1", m, h)
                _lin(s, b + "mlp.fc2", h, m)
            _lin(s, b + "adaLN_modulation.1", (2 if pre_only else 9 if attn2 else 6) * h, h)
    _lin(s, "final_layer.linear", 64, h)
    _lin(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def random_state_dict(
    shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.05
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith((".scale", ".ln_q.weight", ".ln_k.weight")):
            out[key] = torch.ones(shape, dtype=dtype)
        else:
            out[key] = (torch.randn(shape, generator=gen) * std).to(dtype)
    return out


def _axes_dim(head_dim: int) -> list[int]:
    a0 = max(2, (head_dim // 8) // 2 * 2)
    a1 = ((head_dim - a0) // 2) // 2 * 2
    return [a0, a1, head_dim - a0 - a1]


def _rows(state_dict: dict, key: str) -> int:
    """Rows of a weight, also when a ditprune compressed file holds it as an empty placeholder
    (its true shape is the ``.shape`` piece)."""
    weight = state_dict[key]
    if weight.numel() == 0 and f"{key}.shape" in state_dict:
        return int(state_dict[f"{key}.shape"][0])
    return int(weight.shape[0])


@contextlib.contextmanager
def flux_detection_from_shapes() -> Iterator[None]:
    """ComfyUI hard-codes FLUX's width, heads and text width; read them from the shapes instead."""
    import comfy.model_detection

    original = comfy.model_detection.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):  # type: ignore[no-untyped-def]
        cfg = original(state_dict, key_prefix, metadata=metadata)
        p = key_prefix
        if cfg is not None and cfg.get("image_model") == "flux" and f"{p}img_in.weight" in state_dict:
            hidden = state_dict[f"{p}img_in.weight"].shape[0]
            head_dim = state_dict[f"{p}double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]
            cfg.update(
                hidden_size=hidden,
                num_heads=hidden // head_dim,
                context_in_dim=state_dict[f"{p}txt_in.weight"].shape[1],
                mlp_ratio=_rows(state_dict, f"{p}double_blocks.0.img_mlp.0.weight") / hidden,
                axes_dim=_axes_dim(head_dim),
            )
        return cfg

    comfy.model_detection.detect_unet_config = detect
    try:
        yield
    finally:
        comfy.model_detection.detect_unet_config = original


def flux_cond(batch: int = 1, seed: int = 1, ctx: int = 32, vec: int = 32) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(batch, 8, ctx, generator=gen),
            {"pooled_output": torch.randn(batch, vec, generator=gen), "guidance": 3.5},
        ]
    ]


def sd3_cond(batch: int = 1, seed: int = 1, ctx: int = 32, adm: int = 32) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(batch, 8, ctx, generator=gen), {"pooled_output": torch.randn(batch, adm, generator=gen)}]
    ]


def empty_latent(batch: int = 1, size: int = 64) -> dict[str, torch.Tensor]:
    return {"samples": torch.zeros(batch, 16, size // 8, size // 8)}
