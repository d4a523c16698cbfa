"""Low-bit checkpoints in the real ComfyUI: int8/int4/int3 values and the fp8/int8 remainder saved by
Save Pruned Model, kept compressed on the device by Load Pruned Model (dequantised per layer right
before its matmul) and drawing bit for bit what a densified load draws; LoRA and lowvram still work."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Comfy
from graph import apply, calibrate, load, saliency, sample
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import flux_cond, flux_detection_from_shapes, flux_shapes, random_state_dict

LAYER = "single_blocks.0.linear2"  # 64 x 320: a full and a ragged group of kept values per row
PRUNED = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "linear1", "linear2")


def _pruned(comfy: Comfy, seed: int) -> tuple[Any, Any]:
    model = load(random_state_dict(flux_shapes(), seed=seed))
    stats, _, _ = calibrate(comfy, model, flux_cond)
    pruned, _report, _ = apply(comfy, model, saliency(comfy, stats), 0.5)
    return model, pruned


def _save(comfy: Comfy, model: Any, tag: str, **kw: Any) -> tuple[str, str]:
    out = comfy.node("DitPruneSavePrunedModel").execute(
        model=model, filename_prefix=f"lowbit/{tag}", format="compressed", **kw
    )
    path, _size = out.args
    name = str(Path(path).relative_to(comfy.base / "models" / "diffusion_models"))
    return name, out.ui["text"][0]


def _load(comfy: Comfy, name: str, mode: str = "compressed on device") -> Any:
    with flux_detection_from_shapes():
        node = comfy.node("DitPruneLoadPrunedModel")
        return node.execute(model_name=name, mode=mode, sparse_kernels=False).args[0]


def _layouts(comfy: Comfy, name: str) -> dict[str, dict[str, str]]:
    with safe_open(str(comfy.base / "models" / "diffusion_models" / name), framework="pt") as f:
        return json.loads(f.metadata()["layouts"])


@pytest.mark.parametrize(
    ("values", "remainder"),
    [("int4", "fp8"), ("int3", "int8"), ("int8", "keep"), ("int3", "int4"), ("int4", "int3")],
)
def test_compressed_on_device_draws_what_densify_at_load_draws(
    comfy: Comfy, values: str, remainder: str
) -> None:
    _model, pruned = _pruned(comfy, seed=30)
    name, text = _save(comfy, pruned, f"{values}-{remainder}", values=values, remainder=remainder)
    assert f"rounded to {values} at save time" in text
    layouts = _layouts(comfy, name)
    assert layouts[f"{LAYER}.weight"]["values"] == values
    rest = [k for k, e in layouts.items() if e["layout"] == "dense"]
    if remainder == "keep":
        assert not rest
    else:
        # the dense Linear weights of the blocks (modulation); never the embedders and the final
        # layer (kept in their dtype, as GGUF keeps them), nor norms or biases
        assert {"double_blocks.0.img_mod.lin.weight", "single_blocks.0.modulation.lin.weight"} <= set(rest)
        kept = ("img_in", "txt_in", "time_in", "vector_in", "final_layer")
        assert not any(k.startswith(kept) for k in rest)
        assert not any("norm" in k or "bias" in k for k in rest)
    cond = flux_cond()
    packed, dense = _load(comfy, name), _load(comfy, name, "densify at load")
    layer = packed.model.diffusion_model.get_submodule(LAYER)
    assert layer.weight.numel() == 0 and "qgrid" in layer.packed_pieces  # kept compressed
    # float32 in memory: the pruned layers shrink 5-9x; with a compact remainder the rest does too
    assert packed.model_size() < (0.8 if remainder == "keep" else 0.6) * dense.model_size()
    out = sample(comfy, packed, cond)
    assert torch.equal(out, sample(comfy, dense, cond))
    assert not torch.equal(out, sample(comfy, pruned, cond))  # the file holds rounded values


def _pack(comfy: Comfy, module: str) -> Any:
    """A module of the pack as ComfyUI imported it (under its folder's name, never as ``nodes``)."""
    top = comfy.node("DitPrunePruneAndReconstruct").__module__.rsplit(".nodes.", 1)[0]
    return sys.modules[f"{top}.{module}"]


def _reconstructed(comfy: Comfy, model: Any, bits: int) -> Any:
    """A MODEL as Prune and Reconstruct leaves it with value bits: every pruned layer's patch holds
    the kept values and, in ``quantized``, the codes they decode from."""
    quantize, packing = _pack(comfy, "ditprune_core.quantize"), _pack(comfy, "ditprune_core.util.packing")
    reconstruct = _pack(comfy, "nodes.reconstruct")
    patched = model.clone()
    gen = torch.Generator().manual_seed(bits)
    for name, module in model.model.diffusion_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(PRUNED):
            weight = module.weight.detach().float()
            keep = torch.rand(weight.shape, generator=gen) > 0.5
            q = quantize.quantize_weight(weight, quantize.DEFAULT_VALUE_SPECS[bits], keep=keep, where=name)
            # as nodes/reconstruct.py builds it with value bits: the codes, decoded to the model's dtype
            patch = reconstruct.ReconstructedPatch(
                packing.PackedMask.from_bool(keep), None, name, quantized=q, dtype=torch.float32
            )
            patched.add_patches({f"diffusion_model.{name}.weight": patch}, 1.0)
    return patched


def test_reconstructed_codes_are_stored_exactly(comfy: Comfy, caplog: pytest.LogCaptureFixture) -> None:
    model = load(random_state_dict(flux_shapes(), seed=31))
    recon = _reconstructed(comfy, model, 4)
    cond = flux_cond()
    in_graph = sample(comfy, recon, cond)
    # "keep dtype": the codes are the model's values, stored as they are
    name, text = _save(comfy, recon, "recon4", values="keep dtype")
    assert "10 layer(s) stored with their own quantised codes" in text and "rounded" not in text
    assert _layouts(comfy, name)[f"{LAYER}.weight"]["values"] == "int4"
    for mode in ("compressed on device", "densify at load"):
        assert torch.equal(sample(comfy, _load(comfy, name, mode), cond), in_graph), mode
    # a LoRA on top of the reconstruction: its codes no longer give the weight, so they are not
    # stored (this dense LoRA also fills the pruned weights: the layer is saved as it is)
    lora = recon.clone()
    key = f"diffusion_model.{LAYER}.weight"
    lora.add_patches({key: ("diff", (torch.full((64, 320), 0.01),))})
    with caplog.at_level("WARNING", logger="ditprune"):
        name, text = _save(comfy, lora, "recon-lora", values="int4")
    assert "9 layer(s) stored with their own quantised codes" in text
    assert f"'{LAYER}.weight' is patched again after Prune and Reconstruct" in caplog.text
    assert f"{LAYER}.weight" not in _layouts(comfy, name)
    assert torch.equal(sample(comfy, _load(comfy, name), cond), sample(comfy, lora, cond))


def test_patches_and_lowvram_on_quantised_layers(comfy: Comfy) -> None:
    import comfy.model_management as mm

    _model, pruned = _pruned(comfy, seed=32)
    name, _text = _save(comfy, pruned, "lora3", values="int3", remainder="fp8")
    packed, dense = _load(comfy, name), _load(comfy, name, "densify at load")
    key = f"diffusion_model.{LAYER}.weight"
    delta = torch.randn(64, 320, generator=torch.Generator().manual_seed(0)) * 0.05
    cond = flux_cond()
    outs = []
    for model in (packed, dense):
        patched = model.clone()
        assert patched.add_patches({key: ("diff", (delta,))}) == [key]
        outs.append(sample(comfy, patched, cond))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert not torch.allclose(outs[0], sample(comfy, packed, cond), atol=1e-4)  # the patch applied
    # lowvram: every layer streamed (patches through weight_function) equals a full load
    patched = packed.clone()
    patched.add_patches({key: ("diff", (delta,))})
    mm.unload_all_models()
    cpu = torch.device("cpu")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    c = cond[0]
    kwargs = {"context": c[0], "y": c[1]["pooled_output"], "guidance": torch.tensor([3.5])}
    t = torch.tensor([0.5])
    forwards = []
    for budget in (1, 0):
        patched.patch_model(device_to=cpu, lowvram_model_memory=budget)
        try:
            forwards.append(patched.model.diffusion_model(x, t, **kwargs))
        finally:
            patched.unpatch_model(device_to=cpu)
    assert torch.allclose(forwards[0], forwards[1], atol=1e-5)


def test_dense_saves_refuse_low_bit_values_and_a_remainder(comfy: Comfy) -> None:
    _model, pruned = _pruned(comfy, seed=33)
    save = comfy.node("DitPruneSavePrunedModel")
    for kw in ({"values": "int4"}, {"values": "keep dtype", "remainder": "fp8"}, {"remainder": "int8"}):
        with pytest.raises(ValueError, match="need format 'compressed': a dense file holds every weight"):
            save.execute(model=pruned, filename_prefix="lowbit/dense", format="dense", **kw)
    assert not list((comfy.base / "models" / "diffusion_models").glob("lowbit/dense*"))


@pytest.mark.parametrize("mode", ["compressed on device", "densify at load"])
def test_corrupted_or_lying_quantised_files_are_refused_in_every_mode(comfy: Comfy, mode: str) -> None:
    _model, pruned = _pruned(comfy, seed=34)
    name, _text = _save(comfy, pruned, f"bad{mode[:4]}", values="int4", remainder="int8")
    folder = comfy.base / "models" / "diffusion_models"
    raw = bytearray((folder / name).read_bytes())
    raw[-5] ^= 0x08
    (folder / "lowbit" / f"flip{mode[:4]}.safetensors").write_bytes(bytes(raw))
    # (the pack's CheckpointError, a ValueError: ComfyUI imports the pack under its own package name)
    with pytest.raises(ValueError, match="is corrupted"):
        _load(comfy, f"lowbit/flip{mode[:4]}.safetensors", mode)
    with safe_open(str(folder / name), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.pop("tensor_crc32")
    key = f"{LAYER}.weight"
    mod_key = "double_blocks.0.img_mod.lin.weight"  # a remainder tensor: the modulation is coded
    crafted = {
        "scales": ({**data, f"{key}.qscales": data[f"{key}.qscales"][:-1].clone()}, "scales of shape"),
        "spec": (
            {**data, f"{key}.qspec": torch.tensor([3, 128, 1, 0], dtype=torch.int32)},
            "'qspec' piece says",
        ),
        "rest": (
            {**data, f"{mod_key}.qcodes": data[f"{mod_key}.qcodes"][:-8].clone()},
            "packed codes of shape",
        ),
    }
    for tag, (tensors, message) in crafted.items():
        save_file(tensors, str(folder / "lowbit" / f"{tag}{mode[:4]}.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match=message):
            _load(comfy, f"lowbit/{tag}{mode[:4]}.safetensors", mode)


def test_a_packed_layer_compiles_without_a_graph_break(comfy: Comfy) -> None:
    # the per-forward decode of an int4 layer (bitmask) and of the int8 remainder, under inductor on
    # the CPU: fullgraph, so any graph break in PackedLinear's forward or the decode fails
    _model, pruned = _pruned(comfy, seed=35)
    name, _text = _save(comfy, pruned, "compile", values="int4", remainder="int8")
    packed = _load(comfy, name).model.diffusion_model
    gen = torch.Generator().manual_seed(2)
    torch._dynamo.reset()
    for path in (LAYER, "double_blocks.0.img_mod.lin"):
        layer = packed.get_submodule(path)
        assert layer.is_packed, path
        x = torch.randn(2, 3, layer.in_features, generator=gen)
        compiled = torch.compile(layer, backend="inductor", fullgraph=True)
        assert torch.equal(compiled(x), layer(x)), path


@pytest.mark.parametrize("patch_dtype", ["float32", "target"])
def test_lora_options_on_device_and_in_the_target_dtype(comfy: Comfy, patch_dtype: str) -> None:
    _model, pruned = _pruned(comfy, seed=36)
    name, _text = _save(comfy, pruned, f"opts{patch_dtype}", values="int4", remainder="fp8")
    with flux_detection_from_shapes():
        node = comfy.node("DitPruneLoadPrunedModel")
        packed = node.execute(
            model_name=name, mode="compressed on device", patch_on_device=True, patch_dtype=patch_dtype
        ).args[0]
    dense = _load(comfy, name, "densify at load")
    key = f"diffusion_model.{LAYER}.weight"
    delta = torch.randn(64, 320, generator=torch.Generator().manual_seed(0)) * 0.05
    outs = []
    for model in (packed, dense):
        patched = model.clone()
        assert patched.add_patches({key: ("diff", (delta,))}) == [key]
        outs.append(sample(comfy, patched, flux_cond()))
    assert packed.clone().patch_on_device is True  # clones keep the option
    layer = packed.model.diffusion_model.get_submodule(LAYER)
    assert layer.patch_dtype == (torch.float32 if patch_dtype == "float32" else None)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)  # float32 on the CPU either way


@pytest.mark.slow
def test_torch_compile_model_node_on_a_compressed_model(comfy: Comfy) -> None:
    # ComfyUI's own TorchCompileModel node (inductor, on the CPU) over a model kept compressed: it
    # samples, and close to the eager model (inductor may reorder the blocks' other float maths)
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    _model, pruned = _pruned(comfy, seed=37)
    name, _text = _save(comfy, pruned, "compile-node", values="int4", remainder="int8")
    packed = _load(comfy, name)
    cond = flux_cond()
    eager = sample(comfy, packed, cond)
    torch._dynamo.reset()
    compiled = TorchCompileModel.execute(model=packed, backend="inductor").args[0]
    assert torch.allclose(sample(comfy, compiled, cond), eager, atol=1e-4)
