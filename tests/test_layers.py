from __future__ import annotations

import pytest
import torch
from torch import nn

from ditprune_core import UnsupportedModelError, detect_architecture, find_prunable_layers
from ditprune_core.layers import REMAINDER_KEPT_FAMILIES, layer_block, layer_family, remainder_layers


def test_flux_default_families_exclude_embedders_final_and_modulation(tiny_flux: nn.Module) -> None:
    names = list(find_prunable_layers(tiny_flux))
    assert names == [
        "double_blocks.0.img_attn.qkv",
        "double_blocks.0.img_attn.proj",
        "double_blocks.0.img_mlp.0",
        "double_blocks.0.img_mlp.2",
        "double_blocks.0.txt_attn.qkv",
        "double_blocks.0.txt_attn.proj",
        "double_blocks.0.txt_mlp.0",
        "double_blocks.0.txt_mlp.2",
        "single_blocks.0.linear1",
        "single_blocks.0.linear2",
    ]


def test_flux_families_are_selectable(tiny_flux: nn.Module) -> None:
    assert list(find_prunable_layers(tiny_flux, families=["modulation"])) == [
        "double_blocks.0.img_mod.lin",
        "double_blocks.0.txt_mod.lin",
        "single_blocks.0.modulation.lin",
    ]
    assert set(find_prunable_layers(tiny_flux, families=["embedder", "final"])) == {
        "img_in",
        "time_in.in_layer",
        "time_in.out_layer",
        "vector_in.in_layer",
        "vector_in.out_layer",
        "txt_in",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
    }
    assert list(find_prunable_layers(tiny_flux, families=["single_fused"])) == [
        "single_blocks.0.linear1",
        "single_blocks.0.linear2",
    ]


def test_filter_fn_applies_after_families(tiny_flux: nn.Module) -> None:
    layers = find_prunable_layers(tiny_flux, filter_fn=lambda m, name: name.endswith("qkv"))
    assert list(layers) == ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv"]


def test_sd3_names(tiny_sd3: nn.Module) -> None:
    assert detect_architecture(tiny_sd3).name == "sd3"
    names = set(find_prunable_layers(tiny_sd3))
    assert "joint_blocks.0.x_block.attn.qkv" in names
    assert "joint_blocks.1.context_block.attn.qkv" in names
    assert "joint_blocks.0.context_block.mlp.fc2" in names
    assert not any("adaLN" in n or "embedder" in n or "final" in n for n in names)
    assert "joint_blocks.0.x_block.adaLN_modulation.1" in find_prunable_layers(
        tiny_sd3, families=["modulation"]
    )


class _GenericBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.ff = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.adaLN_modulation = nn.Linear(8, 16)


class _GenericDiT(nn.Module):
    """A DiT no template names: Linear layers in repeated blocks, an embedder and a head outside."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([_GenericBlock(), _GenericBlock()])
        self.head = nn.Linear(8, 4)


def test_generic_fallback_finds_linears_in_repeated_blocks() -> None:
    model = _GenericDiT()
    assert detect_architecture(model).name == "generic"
    assert list(find_prunable_layers(model)) == [
        "blocks.0.attn",
        "blocks.0.ff.0",
        "blocks.0.ff.2",
        "blocks.1.attn",
        "blocks.1.ff.0",
        "blocks.1.ff.2",
    ]


def test_unsupported_model_names_what_is_supported() -> None:
    unet = nn.Sequential(nn.Conv2d(4, 8, 3), nn.SiLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(UnsupportedModelError, match=r"FLUX.*SD3"):
        find_prunable_layers(unet)


def test_unknown_family_is_refused(tiny_flux: nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown layer families"):
        find_prunable_layers(tiny_flux, families=["attn"])


def test_comfy_shaped_wrappers_are_unwrapped(tiny_flux: nn.Module) -> None:
    class BaseModel(nn.Module):
        def __init__(self, dm: nn.Module) -> None:
            super().__init__()
            self.diffusion_model = dm

    class Patcher:  # ComfyUI's ModelPatcher is a plain object holding .model
        def __init__(self, model: nn.Module) -> None:
            self.model = model

    direct = find_prunable_layers(tiny_flux)
    assert list(find_prunable_layers(Patcher(BaseModel(tiny_flux)))) == list(direct)
    assert (
        find_prunable_layers(BaseModel(tiny_flux))["single_blocks.0.linear1"]
        is direct["single_blocks.0.linear1"]
    )


def test_block_and_family_of_names(tiny_flux: nn.Module) -> None:
    template = detect_architecture(tiny_flux)
    assert layer_block("single_blocks.12.linear1", template) == "single_blocks.12"
    assert layer_block("img_in", template) == "other"
    assert layer_family("double_blocks.3.txt_mod.lin", template) == "modulation"
    assert layer_family("double_blocks.3.txt_mlp.2", template) == "mlp"
    assert layer_family("double_blocks.3.txt_attn.norm", template) is None


def test_linear_subclasses_count(tiny_flux: nn.Module) -> None:
    class CastLinear(nn.Linear):  # like comfy.ops.manual_cast.Linear
        pass

    block = tiny_flux.single_blocks[0]
    old = block.linear2
    block.linear2 = CastLinear(old.in_features, old.out_features)
    assert isinstance(find_prunable_layers(tiny_flux)["single_blocks.0.linear2"], CastLinear)
    assert torch.equal(
        block.linear1.weight, find_prunable_layers(tiny_flux)["single_blocks.0.linear1"].weight
    )


def test_unet_is_refused_even_though_its_blocks_repeat() -> None:
    class ResBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(8, 8))

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_blocks = nn.ModuleList([nn.ModuleList([ResBlock()])])
            self.middle_block = nn.ModuleList([ResBlock()])
            self.output_blocks = nn.ModuleList([nn.ModuleList([ResBlock()])])

    with pytest.raises(UnsupportedModelError, match=r"is a UNet .*SDXL.*supported are FLUX"):
        find_prunable_layers(UNet())


def test_remainder_layers_are_the_blocks_linears_not_the_embedders_or_final_layer(
    tiny_flux: nn.Module, tiny_sd3: nn.Module
) -> None:
    names = remainder_layers(tiny_flux)
    # the modulation and the (prunable) attention / MLP layers: a compressed file codes any of them
    # that it holds dense; the embedders and the final layer stay in the model's dtype
    assert "double_blocks.0.img_mod.lin" in names and "single_blocks.0.modulation.lin" in names
    assert "double_blocks.0.img_attn.qkv" in names
    assert not any(n.startswith(("img_in", "txt_in", "time_in", "vector_in", "final_layer")) for n in names)
    every = {n for n, m in tiny_flux.named_modules() if isinstance(m, nn.Linear)}
    kept = every - set(names)
    template = detect_architecture(tiny_flux)
    assert kept and all(layer_family(n, template) in REMAINDER_KEPT_FAMILIES for n in kept)
    sd3 = remainder_layers(tiny_sd3)
    assert "joint_blocks.0.x_block.adaLN_modulation.1" in sd3
    assert not any("embedder" in n or n.startswith("final_layer") for n in sd3)


def test_remainder_layers_of_a_generic_dit_leave_the_layers_outside_its_blocks() -> None:
    names = remainder_layers(_GenericDiT())
    assert names == [f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn", "ff.0", "ff.2", "adaLN_modulation")]
