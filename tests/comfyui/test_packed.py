"""Compressed checkpoints kept compressed in ComfyUI: decompressed per layer per forward."""

from __future__ import annotations

import pytest
import torch
from conftest import Comfy
from graph import load_pruned as _load
from graph import sample
from graph import saved_compressed as _saved
from tiny_models import sd3_cond

LAYER = "joint_blocks.0.x_block.mlp.fc1"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_compressed_runtime_draws_what_the_graph_drew(comfy: Comfy, pattern: str) -> None:
    _model, pruned, name = _saved(comfy, pattern, pattern.replace(":", "of"))
    cond = sd3_cond()
    in_graph = sample(comfy, pruned, cond)
    packed = _load(comfy, name)
    layer = packed.model.diffusion_model.get_submodule(LAYER)
    assert layer.weight.numel() == 0  # no dense copy of the pruned weight anywhere
    assert ("nm_values" if pattern == "2:4" else "compressed") in layer.packed_pieces
    dense = _load(comfy, name, "densify at load")
    assert packed.model_size() < 0.8 * dense.model_size()
    # sparse_kernels=True falls back on the CPU: same result
    assert torch.equal(sample(comfy, packed, cond), in_graph)
    assert torch.equal(sample(comfy, dense, cond), in_graph)


def test_patches_still_apply_to_compressed_layers(comfy: Comfy) -> None:
    _model, _pruned, name = _saved(comfy, "unstructured", "lora")
    packed, dense = _load(comfy, name), _load(comfy, name, "densify at load")
    key = f"diffusion_model.{LAYER}.weight"
    delta = torch.randn(512, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    cond = sd3_cond()
    outs = []
    for model in (packed, dense):
        patched = model.clone()
        assert patched.add_patches({key: ("diff", (delta,))}) == [key]
        outs.append(sample(comfy, patched, cond))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert not torch.allclose(outs[0], sample(comfy, packed, cond), atol=1e-4)
    assert packed.model.diffusion_model.get_submodule(LAYER).ditprune_patches is None  # unpatched again


def test_lowvram_forward_of_compressed_layers(comfy: Comfy) -> None:
    import comfy.model_management as mm

    _model, _pruned, name = _saved(comfy, "2:4", "lowvram")
    packed = _load(comfy, name)
    patched = packed.clone()
    key = f"diffusion_model.{LAYER}.weight"
    patched.add_patches({key: ("diff", (torch.full((512, 128), 0.01),))})
    mm.unload_all_models()
    cpu = torch.device("cpu")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    c = sd3_cond()[0]
    kwargs = {"context": c[0], "y": c[1]["pooled_output"]}
    t = torch.tensor([0.5])
    outs = []
    for budget in (1, 0):  # 1 byte: every layer lowvram (patches via weight_function); 0: full load
        patched.patch_model(device_to=cpu, lowvram_model_memory=budget)
        try:
            outs.append(patched.model.diffusion_model(x, t, **kwargs))
        finally:
            patched.unpatch_model(device_to=cpu)
    packed.patch_model(device_to=cpu)
    try:
        unpatched = packed.model.diffusion_model(x, t, **kwargs)
    finally:
        packed.unpatch_model(device_to=cpu)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert not torch.allclose(outs[1], unpatched, atol=1e-4)  # the patch did apply on both paths


def test_compressed_models_are_not_saved_again(comfy: Comfy) -> None:
    _model, _pruned, name = _saved(comfy, "unstructured", "resave")
    with pytest.raises(ValueError, match="loaded compressed"):
        comfy.node("DitPruneSavePrunedModel").execute(model=_load(comfy, name), filename_prefix="again")


@pytest.mark.parametrize("mode", ["compressed on device", "densify at load"])
def test_corrupted_or_crafted_files_are_refused_at_load_in_every_mode(comfy: Comfy, mode: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _model, _pruned, name = _saved(comfy, "2:4", f"bad{mode[:4]}")
    folder = comfy.base / "models" / "diffusion_models"
    with safe_open(str(folder / name), framework="pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = f"{LAYER}.weight"
    # a flipped data bit: the checksum catches it before sampling
    raw = bytearray((folder / name).read_bytes())
    raw[-7] ^= 0x04
    (folder / "runtime" / f"flip{mode[:4]}.safetensors").write_bytes(bytes(raw))
    # (the pack's CheckpointError, a ValueError: ComfyUI imports the pack under its own package name)
    with pytest.raises(ValueError, match="is corrupted"):
        _load(comfy, f"runtime/flip{mode[:4]}.safetensors", mode)
    # a crafted file without checksums: a 2:4 code out of range, a lying shape, a renamed key
    meta.pop("tensor_crc32")
    codes = data[f"{key}.nm_codes"].clone()
    codes[0, 0] = 250
    crafted = {
        "code": ({**data, f"{key}.nm_codes": codes}, "invalid 2:4 codes"),
        "shape": ({**data, f"{key}.shape": torch.tensor([512, 10**6])}, "do not fit its shape"),
        "renamed": (
            {**{k: v for k, v in data.items() if k != key}, key + "x": data[key]},
            "has no placeholder key",
        ),
    }
    for tag, (tensors, message) in crafted.items():
        save_file(tensors, str(folder / "runtime" / f"{tag}{mode[:4]}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=message):
            _load(comfy, f"runtime/{tag}{mode[:4]}.safetensors", mode)
