"""The size target in the real ComfyUI: Prune and Reconstruct's ``target_file_gb`` takes the held-out
frontier's file for that size (docs/bench/frontier.json, scaled to this model's parameter counts),
Save Pruned Model's ``size target`` values and remainder store it as chosen, and the bad inputs are
refused with what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Comfy
from graph import load, reconstruct, reconstructed_patches
from safetensors import safe_open
from tiny_models import flux_cond, flux_shapes, random_state_dict

from ditprune_core.config import PruneConfig
from ditprune_core.prune import select_layers
from ditprune_core.quantize import DEFAULT_DENSE_SPECS, dequantize_weight
from ditprune_core.save import load_pruned_checkpoint
from ditprune_core.tiers import choose_for_size, file_candidates, load_frontier

REPO = Path(__file__).resolve().parents[2]
TABLE = load_frontier(REPO / "docs" / "bench" / "frontier.json")


def _counts(model: Any) -> tuple[int, int]:
    dm = model.model.diffusion_model
    prunable = sum(m.weight.numel() for m in select_layers(dm, PruneConfig(0.5)).values())
    return prunable, sum(p.numel() for p in dm.parameters()) - prunable


def _save(comfy: Comfy, model: Any, tag: str, **kw: Any) -> Path:
    out = comfy.node("DitPruneSavePrunedModel").execute(
        model=model, filename_prefix=f"target/{tag}", **{"format": "compressed", **kw}
    )
    return Path(out.args[0])


@pytest.mark.parametrize("which", ["every-file-fits", "the-smallest-fits", "a-gptq-remainder-file"])
def test_the_size_target_takes_the_frontiers_file_and_save_stores_it(comfy: Comfy, which: str) -> None:
    model = load(random_state_dict(flux_shapes(), seed=51))
    prunable, rest = _counts(model)
    candidates = sorted(file_candidates(TABLE, prunable, rest), key=lambda c: c.file_gb)
    target = {"every-file-fits": candidates[-1].file_gb, "the-smallest-fits": candidates[0].file_gb}.get(
        which, 0.0
    )
    if which == "a-gptq-remainder-file":  # the smallest size whose choice quantises the remainder by GPTQ
        target = next(
            c.file_gb
            for c in candidates
            if choose_for_size(TABLE, c.file_gb, prunable, rest).remainder_bits is not None
        )
    expected = choose_for_size(TABLE, target, prunable, rest)
    assert (expected.remainder_bits is not None) == (which == "a-gptq-remainder-file")
    # the widgets say something else: the target replaces them
    pruned, report = reconstruct(
        comfy, model, flux_cond, sparsity=0.9, value_bits="none", target_file_gb=target
    )
    assert f"size target {target:g} GB: {expected.describe()}" in report
    assert pruned.model_options["ditprune"]["size_target"]["point"] == expected.point
    everything = reconstructed_patches(pruned)
    selected = set(select_layers(model.model.diffusion_model, PruneConfig(0.5)))
    patches = {n: p for n, p in everything.items() if n in selected}
    # the remainder (modulation) is patched only where the choice quantises it by GPTQ
    rest = {n: p for n, p in everything.items() if n not in selected}
    assert patches and bool(rest) == (expected.remainder_bits is not None)
    for name, patch in rest.items():
        assert patch.mask is None and patch.quantized.keep is None, name
        spec, want = patch.quantized.spec, DEFAULT_DENSE_SPECS[expected.remainder_bits]
        # fields, not ==: the node's QuantSpec is the pack's own import of the class (another module)
        assert (spec.bits, spec.group_size, spec.sym) == (want.bits, want.group_size, want.sym), name
    for name, patch in patches.items():
        if expected.value_bits is None:
            assert patch.quantized is None, name
        else:
            upgraded = expected.upgrade_layers is not None and re.search(expected.upgrade_layers, name)
            assert patch.quantized.spec.bits == (4 if upgraded else expected.value_bits), name
            assert patch.quantized.spec.group_size == expected.value_group, name
        assert (patch.mask is None) == (expected.sparsity == 0), name
    assert f"sparsity {expected.sparsity:.2%}" in report.splitlines()[0]
    path = _save(comfy, pruned, "chosen", values="size target", remainder="size target")
    with safe_open(str(path), framework="pt") as f:
        layouts = json.loads(f.metadata()["layouts"])
    stored = {layouts[f"{n}.weight"]["values"] for n in patches}
    want = {"int4": "int4", "int3": "int3", "int2": "int2", "fp8_e4m3fn": "float8_e4m3fn"}
    if expected.upgrade_layers is not None:  # mixed precision: the upgraded layers' codes are int4
        stored -= {"int4"}
    assert stored == {want.get(expected.values, expected.values)} or expected.values == "keep dtype"
    remainder = {v["values"] for k, v in layouts.items() if v["layout"] == "dense" and "_mod.lin" in k}
    if expected.remainder != "keep":
        assert remainder == {"float8_e4m3fn" if expected.remainder == "fp8" else expected.remainder}
    if rest:  # the file holds GPTQ's codes, not a second rounding of them
        loaded = load_pruned_checkpoint(path)
        for name, patch in rest.items():
            held = dequantize_weight(patch.quantized, loaded[f"{name}.weight"].dtype)
            assert torch.equal(loaded[f"{name}.weight"], held), name


def test_size_target_refusals(comfy: Comfy) -> None:
    model = load(random_state_dict(flux_shapes(), seed=52))
    prunable, rest = _counts(model)
    smallest = min(file_candidates(TABLE, prunable, rest), key=lambda c: c.file_gb)
    with pytest.raises(
        ValueError, match=rf"target_file_gb 1e-09: .* the smallest is {re.escape(smallest.point)}"
    ):
        reconstruct(comfy, model, flux_cond, target_file_gb=1e-9)
    pruned, _report = reconstruct(comfy, model, flux_cond, layer_regex="single_blocks.0.linear2")
    with pytest.raises(ValueError, match="this model has no size target"):
        _save(comfy, pruned, "none", values="size target")
    target, _ = reconstruct(
        comfy, model, flux_cond, target_file_gb=smallest.file_gb, layer_regex="double_blocks.0"
    )
    with pytest.raises(ValueError, match="choose format 'compressed'"):
        _save(comfy, target, "dense", format="dense", values="keep dtype", remainder="size target")
