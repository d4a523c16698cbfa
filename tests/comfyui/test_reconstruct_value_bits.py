"""Prune and Reconstruct with value_bits in the real ComfyUI: the patches hold the codes, and the
loaded weights are exactly their decode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import Comfy
from graph import load, reconstruct, reconstructed_patches, sample
from tiny_models import flux_cond, flux_shapes, random_state_dict

from ditprune_core.layouts import choose_quantized_layout, storage_cost
from ditprune_core.quantize import QuantSpec, dequantize_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_bits_4_patches_hold_the_codes_the_model_computes_with(
    comfy: Comfy, dtype: torch.dtype
) -> None:
    model = load(random_state_dict(flux_shapes(), seed=21, dtype=dtype), dtype=dtype)
    cond = flux_cond()
    pruned, report = reconstruct(comfy, model, flux_cond, value_bits="4")
    assert "bits per weight stored" in report.splitlines()[0]
    bits = float(report.splitlines()[0].split(", ")[-1].split()[0])
    patches = reconstructed_patches(pruned)
    assert patches and all(p.quantized is not None for p in patches.values())
    stored = weights = 0
    for patch in patches.values():  # the pack's own QuantSpec class differs from this import's
        q = patch.quantized
        spec = QuantSpec(**dataclasses.asdict(q.spec))
        layout = choose_quantized_layout(q.shape, spec, q.keep).name  # the writer's one rule
        stored += storage_cost(q.shape, spec, layout=layout, kept=q.keep).total_bytes
        weights += q.keep.numel()
    assert bits == pytest.approx(8 * stored / weights, abs=1e-3)
    sample(comfy, pruned, cond)  # loads the clone: its modules now hold the patched weights
    modules = dict(pruned.model.diffusion_model.named_modules())
    for name, patch in patches.items():
        q = patch.quantized
        weight = modules[name].weight
        assert weight.dtype == dtype
        assert torch.equal(weight, dequantize_weight(q, dtype)), name
        assert q.spec.bits == 4 and q.spec.group_size == 128 and not q.spec.sym
        # block allocation moves a layer's sparsity by at most allocation_spread (0.3)
        assert float((weight == 0).float().mean()) >= 0.5 - 0.3 - 1e-3
        # every group of kept values takes at most 2**4 distinct values
        values, start = weight[q.keep], 0
        for row in range(q.shape[0]):
            count = int(q.keep[row].sum())
            for g0 in range(0, count, 128):
                assert values[start + g0 : start + min(g0 + 128, count)].unique().numel() <= 16, name
            start += count
    assert pruned.model_options["ditprune"]["config"]["value_bits"] == 4
    assert pruned.model_options["ditprune"]["bits_per_weight"] == pytest.approx(bits, abs=1e-3)


def test_value_bits_none_keeps_the_unquantised_patch(comfy: Comfy) -> None:
    model = load(random_state_dict(flux_shapes(), seed=22))
    pruned, _report = reconstruct(comfy, model, flux_cond, value_bits="none")
    patches = reconstructed_patches(pruned)
    assert patches and all(p.quantized is None for p in patches.values())
    sample(comfy, pruned, flux_cond())
    modules = dict(pruned.model.diffusion_model.named_modules())
    name, patch = next(iter(patches.items()))
    weight = modules[name].weight
    assert torch.equal(weight[patch.mask.to_bool(weight.device)], patch.values)
