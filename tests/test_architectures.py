"""Templates of Qwen-Image, Wan, HunyuanVideo, Chroma, HiDream and Lumina 2 on module trees with
ComfyUI's exact names (ditprune_core.dit_shapes; the node tests check those names against
ComfyUI's own classes)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from ditprune_core import detect_architecture, find_prunable_layers
from ditprune_core.dit_shapes import FLUX_PRUNABLE, FLUX_TOTAL, FULL_CONFIGS, SHAPES, DitShapes, module_tree
from ditprune_core.layers import (
    DEFAULT_FAMILIES,
    FAMILIES,
    TEMPLATES,
    TemplateMismatchError,
    UnsupportedModelError,
    layer_block,
    supported_models_text,
)
from ditprune_core.report import sparsity_report

TINY = {
    "qwen_image": {"heads": 2, "head_dim": 32, "layers": 2, "ctx": 48},
    "wan": {"dim": 128, "ffn": 256, "layers": 2, "text_dim": 64, "i2v": True},
    "hunyuan_video": {"hidden": 128, "depth": 2, "depth_single": 2, "ctx": 64},
    "chroma": {
        "hidden": 128,
        "heads": 2,
        "depth": 2,
        "depth_single": 2,
        "ctx": 32,
        "approx_hidden": 64,
        "approx_layers": 2,
    },
    "hidream": {
        "heads": 2,
        "head_dim": 32,
        "layers": 2,
        "single_layers": 2,
        "t5_dim": 48,
        "llama_dim": 32,
        "pooled_dim": 24,
    },
    "lumina2": {"dim": 128, "heads": 2, "kv_heads": 1, "layers": 2, "cap_dim": 32},
}

# Block 0's default-pruned layers, written out from comfy/ldm/<model>/.
BLOCK0 = {
    "qwen_image": [
        f"transformer_blocks.0.{n}"
        for n in (
            "img_mlp.net.0.proj",
            "img_mlp.net.2",
            "txt_mlp.net.0.proj",
            "txt_mlp.net.2",
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_out.0",
            "attn.to_add_out",
        )
    ],
    "wan": [
        f"blocks.0.{n}"
        for n in (
            "self_attn.q",
            "self_attn.k",
            "self_attn.v",
            "self_attn.o",
            "cross_attn.q",
            "cross_attn.k",
            "cross_attn.v",
            "cross_attn.o",
            "cross_attn.k_img",
            "cross_attn.v_img",
            "ffn.0",
            "ffn.2",
        )
    ],
    "hunyuan_video": [
        f"double_blocks.0.{s}_{n}"
        for s in ("img", "txt")
        for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    ],
    "chroma": [
        f"double_blocks.0.{s}_{n}"
        for s in ("img", "txt")
        for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    ],
    "hidream": [
        f"double_stream_blocks.0.block.{n}"
        for n in (
            *(f"attn1.{p}{t}" for t in ("", "_t") for p in ("to_q", "to_k", "to_v", "to_out")),
            *(f"ff_i.shared_experts.w{i}" for i in (1, 2, 3)),
            *(f"ff_i.experts.{e}.w{i}" for e in range(4) for i in (1, 2, 3)),
            *(f"ff_t.w{i}" for i in (1, 2, 3)),
        )
    ],
    "lumina2": [
        f"noise_refiner.0.{n}"
        for n in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    ],
}

MODULATION = {
    "qwen_image": {f"transformer_blocks.{i}.{s}_mod.1" for i in (0, 1) for s in ("img", "txt")},
    "wan": {"time_projection.1"},  # the per-block tables are bare parameters
    "hunyuan_video": {f"double_blocks.{i}.{s}_mod.lin" for i in (0, 1) for s in ("img", "txt")}
    | {f"single_blocks.{i}.modulation.lin" for i in (0, 1)},
    "chroma": {"distilled_guidance_layer.in_proj", "distilled_guidance_layer.out_proj"}
    | {f"distilled_guidance_layer.layers.{i}.{p}_layer" for i in (0, 1) for p in ("in", "out")},
    "hidream": {
        f"{k}_stream_blocks.{i}.block.adaLN_modulation.1" for k in ("double", "single") for i in (0, 1)
    },
    "lumina2": {f"{k}.{i}.adaLN_modulation.1" for k in ("noise_refiner", "layers") for i in (0, 1)},
}


def tiny(arch: str, **over: object) -> tuple[DitShapes, nn.Module]:
    shapes = SHAPES[arch](**{**TINY[arch], **over})
    return shapes, module_tree(shapes)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_detected_and_default_layers_of_block0(arch: str) -> None:
    _shapes, model = tiny(arch)
    assert detect_architecture(model).name == arch
    names = list(find_prunable_layers(model))
    first_block = layer_block(BLOCK0[arch][0], detect_architecture(model))
    assert [n for n in names if n.startswith(first_block + ".")] == BLOCK0[arch]
    assert not any(re.search(r"(mod|embed|final|_in\b|proj_out|norm_out|head\.head)", n) for n in names)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_modulation_family_and_every_linear_classified(arch: str) -> None:
    shapes, model = tiny(arch)
    template = detect_architecture(model)
    assert set(find_prunable_layers(model, families=["modulation"])) == MODULATION[arch]
    unclassified = [n for n in shapes.linears if template.family_of(n) is None]
    assert unclassified == []  # embedders and final layers too: every Linear has a family
    every = find_prunable_layers(model, families=FAMILIES)
    assert list(every) == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_lookalikes_are_not_flux() -> None:
    """HunyuanVideo and Chroma reuse FLUX's block names; HiDream and Lumina reuse `layers`-like lists."""
    for arch in ("hunyuan_video", "chroma"):
        _s, model = tiny(arch)
        assert "double_blocks.0.img_attn.qkv" in dict(model.named_modules())
        assert detect_architecture(model).name == arch
    _s, hv = tiny("hunyuan_video")
    assert "txt_in.individual_token_refiner.blocks.0.self_attn.qkv" in find_prunable_layers(
        hv, families=["embedder"]
    )
    assert not any(n.startswith("txt_in") for n in find_prunable_layers(hv))


def test_block_numbering_in_module_order() -> None:
    _s, lumina = tiny("lumina2")
    layers = find_prunable_layers(lumina)
    report = sparsity_report(
        lumina, {n: torch.ones(m.weight.shape, dtype=torch.bool) for n, m in layers.items()}
    )
    assert list(report.by("block")) == [
        "noise_refiner.0",
        "noise_refiner.1",
        "context_refiner.0",
        "context_refiner.1",
        "layers.0",
        "layers.1",
    ]
    _s, hv = tiny("hunyuan_video")
    template = detect_architecture(hv)
    assert layer_block("txt_in.individual_token_refiner.blocks.1.mlp.0", template) == (
        "txt_in.individual_token_refiner.blocks.1"
    )
    assert layer_block("single_blocks.1.linear2", template) == "single_blocks.1"
    _s, hidream = tiny("hidream")
    assert layer_block("single_stream_blocks.1.block.ff_i.experts.3.w2", detect_architecture(hidream)) == (
        "single_stream_blocks.1"
    )
    assert layer_block("caption_projection.3.linear", detect_architecture(hidream)) == "other"


def test_bare_parameters_and_fused_layers_are_declared_truthfully() -> None:
    for arch in TINY:
        shapes, model = tiny(arch)
        template = detect_architecture(model)
        params = [k for k in shapes.shapes if k.rsplit(".", 1)[0] not in shapes.linears]
        for pattern, _meaning in template.bare_parameters:
            hits = [k for k in params if re.fullmatch(pattern, k)]
            assert hits, f"{arch}: bare parameter {pattern} not in the model"
            assert not any(re.fullmatch(pattern, n) for n in find_prunable_layers(model, families=FAMILIES))
        for fused in template.fused:
            layers = [n for n in shapes.linears if re.fullmatch(fused.pattern, n)]
            assert layers, f"{arch}: fused layer {fused.pattern} not in the model"
    _s, wan = tiny("wan")
    assert [p for p, _ in detect_architecture(wan).bare_parameters] == [
        r"blocks\.\d+\.modulation",
        r"head\.modulation",
    ]
    _s, lumina = tiny("lumina2")
    qkv = dict(lumina.named_modules())["layers.0.attention.qkv"]
    assert isinstance(qkv, nn.Linear) and qkv.out_features == (2 + 2 * 1) * 64  # q: 2 heads, k and v: 1 each


def test_pruned_depth_is_handled() -> None:
    for depth in (1, 5):
        _s, wan = tiny("wan", layers=depth)
        assert detect_architecture(wan).name == "wan"
        assert len(find_prunable_layers(wan)) == 12 * depth
    _s, hv = tiny("hunyuan_video", depth=3, depth_single=0)  # no single blocks at all
    assert len(find_prunable_layers(hv)) == 3 * 8


def test_extra_layer_in_a_block_is_refused_naming_it() -> None:
    _s, wan = tiny("wan")
    attn = dict(wan.named_modules())["blocks.1.self_attn"]
    attn.add_module("q_lora_down", nn.Linear(128, 4, device="meta"))  # an unmerged LoRA wrapper
    with pytest.raises(
        TemplateMismatchError, match=r"'blocks\.1\.self_attn\.q_lora_down' in block 'blocks\.1'"
    ):
        find_prunable_layers(wan)


def test_missing_layer_in_a_block_is_refused_naming_it() -> None:
    _s, qwen = tiny("qwen_image")
    del dict(qwen.named_modules())["transformer_blocks.1.txt_mlp.net"]._modules["2"]
    with pytest.raises(TemplateMismatchError, match=r"no layer 'transformer_blocks\.1\.txt_mlp\.net\.2'"):
        detect_architecture(qwen)


def test_message_lists_every_template() -> None:
    text = supported_models_text()
    assert text.startswith("FLUX.1")
    for template in TEMPLATES:
        assert f"template {template.name!r}" in text
    with pytest.raises(UnsupportedModelError, match=r"Wan 2\.1 / 2\.2.*HiDream.*Lumina"):
        find_prunable_layers(nn.Sequential(nn.Conv2d(4, 4, 3)))


def test_full_size_counts_match_the_flux_figures_used_elsewhere() -> None:
    flux = SHAPES["flux"]()
    assert flux.numel() == FLUX_TOTAL
    template = detect_architecture(module_tree(flux))
    prunable = [n for n in flux.linears if template.family_of(n) in DEFAULT_FAMILIES]
    assert flux.linear_numel(prunable) == FLUX_PRUNABLE


@pytest.mark.parametrize(("label", "arch", "config"), FULL_CONFIGS, ids=[c[0] for c in FULL_CONFIGS])
def test_full_size_models_detect_and_prune_most_weights(label: str, arch: str, config: dict) -> None:
    shapes = SHAPES[arch](**config)
    template = detect_architecture(module_tree(shapes))
    assert template.name == arch
    prunable = [n for n in shapes.linears if template.family_of(n) in DEFAULT_FAMILIES]
    share = shapes.linear_numel(prunable) / shapes.numel()
    assert 0.5 < share < 0.99, f"{label}: prunable share {share:.1%}"


def test_projected_sizes_arithmetic() -> None:
    from bench.supported_models import ModelRow
    from ditprune_core.layers import WAN

    row = ModelRow(
        "x", WAN, params=10**9, prunable=6 * 10**8, families={}, packed_ratio=0.5, packed_fp8_ratio=0.25
    )
    sizes = row.sizes()
    assert sizes["bf16"] == pytest.approx(2.0)
    assert sizes["fp8"] == pytest.approx(1.0)
    assert sizes["Q8_0"] == pytest.approx(1.0625) and sizes["Q4_0"] == pytest.approx(0.5625)
    assert sizes["50%"] == pytest.approx(0.6 * 2 * 0.5 + 0.4 * 2)  # pruned layers packed, the rest bf16
    assert sizes["50% fp8"] == pytest.approx(0.6 * 2 * 0.25 + 0.4 * 2)


def test_video_bench_model_is_a_wan_and_gram_memory_is_in_squared() -> None:
    from bench.video_calibration import TinyWan, mask_agreement, memory_rows, sample_calibrated

    model = TinyWan(dim=32, ffn=64, heads=2, layers=1, seed=0).eval()
    assert detect_architecture(model).name == "wan"
    stats = sample_calibrated(model, frames=2, steps=2, seed=0, size=4, prompts=1)
    assert stats["blocks.0.self_attn.q"].tokens == 2 * 2 * 2 * 2  # steps x frames x (4/2)^2
    assert stats["blocks.0.cross_attn.k"].tokens == 2 * 12  # text tokens do not grow with frames
    assert mask_agreement(model, stats, stats) == 1.0
    other = sample_calibrated(model, frames=2, steps=2, seed=1, size=4, prompts=1)
    assert mask_agreement(model, stats, other) < 1.0
    rows = dict((name, (i, d, g)) for name, i, d, g in memory_rows())
    assert rows["blocks.N.ffn.2"] == (13824, 13824 * 8, 13824 * 13824 * 4)
    assert rows["blocks.N.self_attn.q"][2] == 5120 * 5120 * 4
