"""Quantise only in the real ComfyUI: Prune and Reconstruct with sparsity 0 and value bits quantises
every selected layer whole (no mask), Save Pruned Model stores the dense codes exactly (no mask bit),
Load Pruned Model draws them bit for bit in both modes, LoRA and lowvram apply as on pruned layers,
and the bits per weight the node reports are the file's."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Comfy
from graph import load, reconstruct, reconstructed_patches, sample
from safetensors import safe_open
from tiny_models import flux_cond, flux_detection_from_shapes, flux_shapes, random_state_dict

from ditprune_core.quantize import QuantSpec, dequantize_weight

PREFIX = "diffusion_model."
LAYER = "single_blocks.0.linear2"  # 64 x 320: a full and a ragged group of 128 per row


def _save(comfy: Comfy, model: Any, tag: str) -> tuple[Path, str]:
    out = comfy.node("DitPruneSavePrunedModel").execute(
        model=model, filename_prefix=f"qonly/{tag}", format="compressed", values="keep dtype"
    )
    return Path(out.args[0]), out.ui["text"][0]


def _load(comfy: Comfy, path: Path, mode: str = "compressed on device", **kw: Any) -> Any:
    name = str(path.relative_to(comfy.base / "models" / "diffusion_models"))
    with flux_detection_from_shapes():
        node = comfy.node("DitPruneLoadPrunedModel")
        return node.execute(model_name=name, mode=mode, **{"sparse_kernels": False, **kw}).args[0]


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Each tensor's bytes as the file stores them."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}  # noqa: SIM118


def _forwards(model: Any, cond: list) -> list[torch.Tensor]:
    """The diffusion model's output streamed layer by layer (lowvram) and fully loaded."""
    import comfy.model_management as mm

    mm.unload_all_models()
    cpu = torch.device("cpu")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    c = cond[0]
    kwargs = {"context": c[0], "y": c[1]["pooled_output"], "guidance": torch.tensor([3.5])}
    out = []
    for budget in (1, 0):
        model.patch_model(device_to=cpu, lowvram_model_memory=budget)
        try:
            out.append(model.model.diffusion_model(x, torch.tensor([0.5]), **kwargs))
        finally:
            model.unpatch_model(device_to=cpu)
    return out


def test_quantise_only_is_stored_as_dense_codes_and_loads_bit_for_bit(comfy: Comfy) -> None:
    model = load(random_state_dict(flux_shapes(), seed=41))
    cond = flux_cond()
    pruned, report = reconstruct(comfy, model, flux_cond, sparsity=0.0, value_bits="4")
    assert "sparsity 0.00%" in report.splitlines()[0] and "refined" not in report  # nothing to refine
    patches = reconstructed_patches(pruned)
    assert patches and all(p.mask is None and p.quantized.keep is None for p in patches.values())
    in_graph = sample(comfy, pruned, cond)  # loads the clone: its modules hold the patched weights
    modules = dict(pruned.model.diffusion_model.named_modules())
    for name, patch in patches.items():
        q = patch.quantized
        assert q.spec.bits == 4 and q.spec.group_size == 128 and not q.spec.sym
        assert torch.equal(modules[name].weight, dequantize_weight(q, modules[name].weight.dtype)), name
    # Save Pruned Model: every quantised layer in the dense layout, its own codes, no mask bit
    path, text = _save(comfy, pruned, "int4")
    assert f"{len(patches)} layer(s) stored with their own quantised codes" in text
    with safe_open(str(path), framework="pt") as f:
        layouts = json.loads(f.metadata()["layouts"])
    keys = {f"{name}.weight" for name in patches}
    assert {k: (layouts[k]["layout"], layouts[k]["values"]) for k in keys} == dict.fromkeys(
        keys, ("dense", "int4")
    )
    sizes = _tensor_bytes(path)
    assert not any(k.endswith((".bitmask", ".nm_codes")) for k in sizes)
    # the bits per weight the node reports are the file's bytes of those layers, exactly
    stored = sum(size for k, size in sizes.items() if k in keys or k.rpartition(".")[0] in keys)
    weights = sum(modules[name].weight.numel() for name in patches)
    assert pruned.model_options["ditprune"]["bits_per_weight"] == 8.0 * stored / weights
    for mode in ("compressed on device", "densify at load"):
        assert torch.equal(sample(comfy, _load(comfy, path, mode), cond), in_graph), mode
    # LoRA on the loaded dense codes, as on pruned layers: compressed on device == densified
    packed, dense = _load(comfy, path), _load(comfy, path, "densify at load")
    key = f"{PREFIX}{LAYER}.weight"
    delta = torch.randn(64, 320, generator=torch.Generator().manual_seed(0)) * 0.05
    outs = []
    for loaded in (packed, dense):
        patched = loaded.clone()
        assert patched.add_patches({key: ("diff", (delta,))}) == [key]
        outs.append(sample(comfy, patched, cond))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert not torch.allclose(outs[0], in_graph, atol=1e-4)  # the LoRA applied
    # lowvram: streamed layer by layer equals a full load, for the file and for the in-graph patches
    patched = packed.clone()
    patched.add_patches({key: ("diff", (delta,))})
    for streamed, full in (_forwards(patched, cond), _forwards(pruned, cond)):
        assert torch.allclose(streamed, full, atol=1e-5)


def test_quantise_only_refusals(comfy: Comfy) -> None:
    model = load(random_state_dict(flux_shapes(), seed=42))
    with pytest.raises(ValueError, match="sparsity 0 prunes nothing: give value_bits"):
        reconstruct(comfy, model, flux_cond, sparsity=0.0, value_bits="none")
    with pytest.raises(ValueError, match=r"value_bits must be None or one of \[3, 4, 8\]"):
        reconstruct(comfy, model, flux_cond, sparsity=0.5, value_bits="2")  # 2 bits: quantise only
    pruned, _report = reconstruct(comfy, model, flux_cond, sparsity=0.0, value_bits="2", layer_regex=LAYER)
    (patch,) = reconstructed_patches(pruned).values()
    spec = QuantSpec(**dataclasses.asdict(patch.quantized.spec))
    assert spec == QuantSpec(2, 128, sym=True)
    path, _text = _save(comfy, pruned, "int2")
    # a quantise-only file fed to the option that needs 2:4 masks: refused, naming the file
    with pytest.raises(ValueError, match=r"int2_00001\.safetensors: sparse_kernels .* has no pruned layer"):
        _load(comfy, path, sparse_kernels=True)
    assert _load(comfy, path) is not None  # without it, the file loads


@pytest.mark.parametrize(("sparsity", "bits"), [(0.0, "3"), (0.5, "4")], ids=["dense-int3", "sparse-int4"])
def test_value_group_32_is_made_stored_and_drawn_bit_for_bit(
    comfy: Comfy, sparsity: float, bits: str
) -> None:
    """Prune and Reconstruct's value_group: the codes carry groups of 32 (the bits' default symmetry
    kept), Save stores them with that group size, the loaded file draws what the graph drew, and the
    reported bits per weight are the file's (more scales than groups of 128)."""
    model = load(random_state_dict(flux_shapes(), seed=43))
    cond = flux_cond()
    runs = {}
    for group in ("128", "32"):
        pruned, _ = reconstruct(
            comfy, model, flux_cond, sparsity=sparsity, value_bits=bits, value_group=group, layer_regex=LAYER
        )
        (patch,) = reconstructed_patches(pruned).values()
        default = QuantSpec(3, 128, sym=True) if bits == "3" else QuantSpec(4, 128, sym=False)
        # the pack's QuantSpec is ComfyUI's import of it (another class object): compare the fields
        want = dataclasses.asdict(dataclasses.replace(default, group_size=int(group)))
        assert dataclasses.asdict(patch.quantized.spec) == want
        assert pruned.model_options["ditprune"]["config"]["value_spec"] == (
            None if group == "128" else dataclasses.asdict(patch.quantized.spec)
        )
        runs[group] = pruned
    assert (
        runs["32"].model_options["ditprune"]["bits_per_weight"]
        > runs["128"].model_options["ditprune"]["bits_per_weight"]
    )
    pruned = runs["32"]
    path, _text = _save(comfy, pruned, f"g32-{bits}")
    with safe_open(str(path), framework="pt") as f:
        entry = json.loads(f.metadata()["layouts"])[f"{LAYER}.weight"]
    assert (entry["values"], entry["group_size"]) == (f"int{bits}", "32")
    sizes = _tensor_bytes(path)
    key = f"{LAYER}.weight"
    stored = sum(size for k, size in sizes.items() if k == key or k.rpartition(".")[0] == key)
    assert pruned.model_options["ditprune"]["bits_per_weight"] == 8.0 * stored / (64 * 320)
    assert torch.equal(sample(comfy, _load(comfy, path), cond), sample(comfy, pruned, cond))


def test_value_group_refusal(comfy: Comfy) -> None:
    node_module = sys.modules[comfy.node("DitPrunePruneAndReconstruct").__module__]
    with pytest.raises(ValueError, match=r"value_group must be one of \['128', '64', '32'\], got '48'"):
        node_module.reconstruct_config(
            0.5, "unstructured", ("attention",), "energy", "", "4", None, None, None, "48"
        )
