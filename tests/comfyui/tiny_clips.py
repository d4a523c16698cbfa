"""Tiny real ComfyUI text encoders (``comfy.sd.CLIP``) for the prompt-set tests: ComfyUI's own FLUX
(CLIP-L + T5) and SD3 (CLIP-L) encoders and tokenizers, with narrow random weights instead of the
checkpoints. Their conditionings have the widths the tiny FLUX / SD3 models of tiny_models.py take:
FLUX context 32, pooled 32; SD3 (CLIP-L padded to 4096 as ComfyUI does) context 4096, pooled 32 + 1280.
"""

from __future__ import annotations

from typing import Any

import torch

#: ComfyUI's config keys (sd1_clip_config.json, t5_config_xxl.json) overridden to a tiny width
CLIP_L_TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "projection_dim": 32,
}
T5_TINY = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}
#: the conditioning widths of each tiny encoder: (context, pooled)
WIDTHS = {"flux": (32, 32), "sd3": (4096, 32 + 1280)}


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("layer_norm.weight", "layer_norm1.weight", "layer_norm2.weight")) or (
                "norm" in name and p.dim() == 1 and name.endswith("weight")
            ):
                p.copy_(torch.ones_like(p))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def tiny_clip(family: str, seed: int = 0) -> Any:
    """A real ``comfy.sd.CLIP`` of ``family`` ("flux" or "sd3"), tiny and random."""
    import comfy.sd
    import comfy.supported_models_base
    from comfy.text_encoders import flux, sd3_clip

    options = {"clip_l_model_config": dict(CLIP_L_TINY), "t5xxl_model_config": dict(T5_TINY)}
    if family == "flux":
        target = comfy.supported_models_base.ClipTarget(flux.FluxTokenizer, flux.flux_clip())
    elif family == "sd3":
        target = comfy.supported_models_base.ClipTarget(
            sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False)
        )
    else:
        raise ValueError(family)
    clip = comfy.sd.CLIP(target, model_options={**options, "dtype": torch.float32})
    _randomise(clip.cond_stage_model, seed)
    return clip
