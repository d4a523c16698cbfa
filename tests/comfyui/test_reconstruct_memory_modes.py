"""Prune and Reconstruct on fp8-stored weights and under ComfyUI's lowvram (partial) loading."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import Comfy
from graph import SAMPLE, load, reconstruct, sample
from tiny_models import flux_cond, flux_shapes, random_state_dict, sd3_cond, sd3_shapes

PREFIX = "diffusion_model."
SAMPLE_STEPS = SAMPLE["steps"]  # model calls per sampler run (euler, cfg 1: one call a step)
ARCHS = {"flux": (flux_shapes, flux_cond), "sd3": (sd3_shapes, sd3_cond)}
#: the bit-for-bit comparisons across memory modes are of the OBS reconstruction itself: block
#: refinement's Adam steps run through each mode's own weight casts, so they are not bit-exact
#: across modes (test_block_refinement_under_lowvram_keeps_the_masks checks it there)
NO_BLOCK = {"block_refine_steps": 0}


def _report_lines(report: str) -> list[str]:
    """The report without its second line, the calibration's cost (``calibration ...``): the
    summary, then one line per pass, per refined block and per layer."""
    first, *rest = report.splitlines()
    return [first, *(line for line in rest if not line.startswith("calibration "))]


def _patches(pruned: Any) -> dict[str, Any]:
    """key -> the ReconstructedPatch the node put on ``pruned`` (one per pruned layer)."""
    out = {}
    for key, entries in pruned.patches.items():
        found = [e[1] for e in entries if getattr(e[1], "name", "") == "ditprune_reconstructed"]
        if found:
            (out[key],) = found
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so equality is bit for bit for every dtype (fp8 included)."""
    return t.detach().contiguous().view(torch.uint8)


def _a_layer(arch: str) -> str:
    return "double_blocks.0.img_attn.qkv" if arch == "flux" else "joint_blocks.0.x_block.attn.qkv"


def _stored(model: Any) -> dict[str, torch.Tensor]:
    return {k: _bits(v).clone() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fp8_weights_hold_the_reconstruction_of_their_fp32_twin(comfy: Comfy, arch: str) -> None:
    """A model stored in float8_e4m3fn (ComfyUI's weight_dtype fp8 path) computes in fp32 on the CPU
    with exactly its fp8 values; an fp32 model holding those same values therefore sees the same
    calibration, and its reconstruction rounded to fp8 is what the fp8 model must hold."""
    from comfy.float import stochastic_rounding
    from comfy.model_patcher import string_to_seed

    shapes, cond_fn = ARCHS[arch]
    fp8 = load(random_state_dict(shapes(), seed=21), dtype=torch.float8_e4m3fn)
    dm8 = fp8.model.diffusion_model
    assert dm8.get_submodule(_a_layer(arch)).weight.dtype == torch.float8_e4m3fn
    twin = load({k: v.float() for k, v in dm8.state_dict().items()})
    cond = cond_fn()
    dense = sample(comfy, fp8, cond)
    before = _stored(fp8)

    pruned8, report8 = reconstruct(comfy, fp8, cond_fn, **NO_BLOCK)
    pruned32, report32 = reconstruct(comfy, twin, cond_fn, **NO_BLOCK)
    assert report8.splitlines()[0].startswith("1 pass(es)")  # one calibration: the same Grams
    assert "sparsity 50.00%" in report8.splitlines()[0]
    # the same calibration and the same maths: the per-layer errors agree to the printed digits
    strip = lambda r: [line.rsplit(",", 1)[0] for line in r.splitlines()[2:]]  # noqa: E731 (not the time)
    assert strip(report8) == strip(report32)
    patches8, patches32 = _patches(pruned8), _patches(pruned32)
    assert patches8 and set(patches8) == set(patches32)
    changed = kept_total = weights_total = 0
    for key, p8 in patches8.items():
        p32 = patches32[key]
        keep = p8.mask.to_bool()
        assert torch.equal(keep, p32.mask.to_bool()), key
        # block allocation: layers of a block share its count, so only the total is exactly half
        kept_total += p8.mask.kept()
        weights_total += keep.numel()
        assert p8.values.dtype == torch.float8_e4m3fn and p8.values.numel() == p8.mask.kept()
        assert torch.equal(_bits(p8.values), _bits(p32.values.to(torch.float8_e4m3fn))), key
        original = before[key.removeprefix(PREFIX)].view(torch.float8_e4m3fn).reshape(keep.shape)
        changed += int((p8.values.float() != original[keep].float()).sum())
    assert abs(kept_total - weights_total / 2) <= len(patches8)  # exact per block, rounded per block
    # the update changed most kept weights by at least an fp8 step: not the mask alone
    assert changed > 0.3 * sum(p.values.numel() for p in patches8.values())

    pruned_latent = sample(comfy, pruned8, cond)
    name = _a_layer(arch)
    key = f"{PREFIX}{name}.weight"
    patch = patches8[key]
    in_graph = dm8.get_submodule(name).weight  # loaded and patched by ComfyUI, still fp8
    assert in_graph.dtype == torch.float8_e4m3fn
    exact = torch.zeros(patch.mask.shape).masked_scatter_(patch.mask.to_bool(), patch.values.float())
    # ComfyUI stores a patched fp8 weight through its own stochastic rounding (comfy.float, keyed by
    # the weight's name); on values already in fp8 it is exact but for -0 -> 0 and the few entries its
    # fp16 random numbers push one fp8 step up: the weight in the graph is precisely that
    rounded = stochastic_rounding(exact, torch.float8_e4m3fn, seed=string_to_seed(key))
    assert torch.equal(_bits(in_graph), _bits(rounded))
    assert bool((in_graph.float()[~patch.mask.to_bool()] == 0).all())
    moved = in_graph.float() != exact
    assert int(moved.sum()) < 0.01 * patch.values.numel()
    assert bool(((in_graph.float() - exact).abs()[moved] <= exact.abs()[moved] * 2**-3 + 2**-9).all())
    assert not torch.equal(pruned_latent, dense)
    # the incoming MODEL: the same draw, and its stored weights bit for bit those it came with
    assert torch.equal(sample(comfy, fp8, cond), dense)
    after = _stored(fp8)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture
def lowvram(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every load ComfyUI makes from here on (the node's, its sampler runs', the test's) is a partial
    one with a budget of 1 byte, as load_models_gpu decides for a GPU without free memory (on a CPU it
    always loads fully): every layer keeps its stored weight and gets its patches per forward
    (LowVramPatch). Only the budget is chosen here; the loading is ComfyUI's own."""
    import comfy.model_management as mm

    model_load = mm.LoadedModel.model_load

    def partial(self: Any, lowvram_model_memory: int = 0, force_patch_weights: bool = False) -> Any:
        return model_load(self, 1, force_patch_weights=force_patch_weights)

    mm.unload_all_models()
    monkeypatch.setattr(mm.LoadedModel, "model_load", partial)
    yield
    monkeypatch.undo()
    mm.unload_all_models()


def _budget_gb(arch: str) -> float:
    """One Gram of the widest block layer: several passes."""
    widest = max(s[1] for n, s in ARCHS[arch][0]().items() if "blocks." in n and len(s) == 2)
    return widest * widest * 4 * 1.0001 / (1 << 30)


def _run_and_sample(
    comfy: Comfy, arch: str, dtype: torch.dtype = torch.float32, *, own_patch: bool = True, **kw: Any
) -> tuple[Any, str, torch.Tensor, list, torch.Tensor]:
    """A fresh tiny model (same seed every call), with a LoRA-like patch of its own, and a probe on
    every model call, then Prune and Reconstruct in passes, and a sample of its output; the incoming
    model must draw as before. The probe records, per call of the node's passes and the sample,
    whether the model is loaded lowvram and which layers get a LowVramPatch.

    Returns (pruned MODEL, report, its latent, probe, the incoming model's latent)."""
    import comfy.model_patcher as mp

    shapes, cond_fn = ARCHS[arch]
    model = load(random_state_dict(shapes(), seed=22), dtype=dtype)
    own = model.clone()  # the incoming MODEL carries a patch of its own (as a LoRA would)
    if own_patch:
        key = f"{PREFIX}{_a_layer(arch)}.weight"
        delta = torch.full(own.get_model_object(key).shape, 0.01)
        assert own.add_patches({key: ("diff", (delta,))}) == [key]
    probe: list = []

    def record(apply_model: Any, args: dict) -> torch.Tensor:
        dm = own.model.diffusion_model
        lowvram_layers = {
            n
            for n, m in dm.named_modules()
            if any(isinstance(f, mp.LowVramPatch) for f in getattr(m, "weight_function", ()))
        }
        probe.append((bool(own.model.model_lowvram), lowvram_layers))
        return apply_model(args["input"], args["timestep"], **args["c"])

    dense = sample(comfy, own, cond_fn())
    own.set_model_unet_function_wrapper(record)
    pruned, report = reconstruct(comfy, own, cond_fn, memory_budget_gb=_budget_gb(arch), **kw)
    latent = sample(comfy, pruned, cond_fn())
    assert torch.equal(sample(comfy, own, cond_fn()), dense)  # the incoming MODEL is untouched
    del probe[-SAMPLE_STEPS:]  # that check's own calls
    assert not torch.equal(latent, dense)
    return pruned, report, latent, probe, dense


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lowvram_run_and_sampling_match_the_full_load_bit_for_bit(
    comfy: Comfy, arch: str, request: pytest.FixtureRequest
) -> None:
    import comfy.model_management as mm

    mm.unload_all_models()
    full, full_report, full_latent, full_probe, _ = _run_and_sample(comfy, arch, **NO_BLOCK)
    assert not any(lowvram for lowvram, _layers in full_probe)

    request.getfixturevalue("lowvram")
    low, low_report, low_latent, probe, _ = _run_and_sample(comfy, arch, **NO_BLOCK)
    passes = int(low_report.split()[0])
    assert passes > 1 and low_report.splitlines()[0] == full_report.splitlines()[0]
    # lowvram really engaged in every model call (the node's passes and the final sample) ...
    assert probe and all(lowvram for lowvram, _layers in probe)
    # ... and the layers reconstructed in the first pass were patched per forward in the last one
    lines = _report_lines(low_report)
    layers = [line.split(":")[0].strip() for line in lines[1 + passes :]]
    first_pass = set(layers[: int(lines[1].split()[2])])
    assert len(probe) == SAMPLE_STEPS * (passes + 1)  # every pass samples once, then the test does
    assert first_pass <= probe[SAMPLE_STEPS * (passes - 1)][1]
    assert set(layers) <= probe[-1][1]
    assert _patches(low) and _patches(low).keys() == _patches(full).keys()
    for key, patch in _patches(low).items():
        other = _patches(full)[key]
        assert torch.equal(patch.mask.to_bool(), other.mask.to_bool()), key
        assert torch.equal(_bits(patch.values), _bits(other.values)), key
    assert torch.equal(low_latent, full_latent)
    # the full-load output sampled under lowvram, and the incoming weights stored unchanged
    assert torch.equal(sample(comfy, full, ARCHS[arch][1]()), full_latent)
    layer = low.model.diffusion_model.get_submodule(_a_layer(arch))
    assert float((layer.weight == 0).float().mean()) == 0.0  # stored weight, masked only per forward


def test_fp8_model_in_lowvram_computes_with_the_exact_reconstruction(
    comfy: Comfy, request: pytest.FixtureRequest
) -> None:
    """fp8 storage under partial loading (FLUX fp8 on a small GPU): every pruned layer computes with
    exactly the patch's fp8 values, and the first pass is the full load's bit for bit. The later ones
    are not: a fully loaded fp8 model stores each patched weight through ComfyUI's stochastic
    rounding (see the fp8 test above), which moves a few kept entries one fp8 step, while lowvram
    applies the patches per forward in the compute dtype, unrounded; so the passes after the first
    calibrate on slightly different upstream weights. (Without a patch of its own on the incoming
    MODEL: ComfyUI rounds a LoRA on fp8 weights the same way, a difference that is not ours.)"""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    mm.unload_all_models()
    full, _report, full_latent, _probe, dense = _run_and_sample(
        comfy, "flux", torch.float8_e4m3fn, own_patch=False, **NO_BLOCK
    )
    request.getfixturevalue("lowvram")
    low, low_report, low_latent, probe, _ = _run_and_sample(
        comfy, "flux", torch.float8_e4m3fn, own_patch=False, **NO_BLOCK
    )
    lines = _report_lines(low_report)
    passes = int(lines[0].split()[0])
    assert passes > 1 and "sparsity 50.00%" in lines[0]
    assert probe and all(lowvram for lowvram, _layers in probe)
    patches, full_patches = _patches(low), _patches(full)
    assert patches and patches.keys() == full_patches.keys()
    first_pass = [line.split(":")[0].strip() for line in lines[1 + passes :]][: int(lines[1].split()[2])]
    for name in first_pass:
        key = f"{PREFIX}{name}.weight"
        assert torch.equal(patches[key].mask.to_bool(), full_patches[key].mask.to_bool()), key
        assert torch.equal(_bits(patches[key].values), _bits(full_patches[key].values)), key
    mm.load_models_gpu([low])  # as the sampler loads it (lowvram here)
    dm = low.model.diffusion_model
    kept_total = weights_total = 0
    for key, patch in patches.items():
        layer = dm.get_submodule(key.removeprefix(PREFIX).removesuffix(".weight"))
        assert layer.weight.dtype == torch.float8_e4m3fn and patch.values.dtype == torch.float8_e4m3fn
        kept_total += patch.mask.kept()
        weights_total += patch.mask.numel()
        (per_forward,) = [f for f in layer.weight_function if isinstance(f, mp.LowVramPatch)]
        # what the layer computes with: ComfyUI's LowVramPatch on the stored weight in fp32
        used = per_forward(layer.weight.to(torch.float32))
        exact = torch.zeros(patch.mask.shape).masked_scatter_(patch.mask.to_bool(), patch.values.float())
        assert torch.equal(used, exact), key
    assert abs(kept_total - weights_total / 2) <= len(patches)  # block allocation: exact per block
    # lowvram against the full load: measured 2.0e-4, 2.8% of the pruning's own effect (7.0e-3)
    error = float((low_latent - full_latent).norm() / full_latent.norm())
    effect = float((full_latent - dense).norm() / full_latent.norm())
    assert 0 < error < 0.1 * effect, (error, effect)


def test_default_budget_is_a_quarter_of_the_compute_devices_free_memory(
    comfy: Comfy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory_budget_gb 0: a quarter of what ComfyUI reports free on the device the model computes
    on (where the Grams accumulate), never below the largest Gram. Not the device the weights are
    stored on, which under lowvram is RAM. The free memory is set here; the passes must be those of
    that budget given explicitly."""
    import sys

    import comfy.model_management as mm

    model = load(random_state_dict(sd3_shapes(), seed=23))
    gram = 512 * 512 * 4  # the widest layer's (mlp.fc2, 512 inputs)
    free_bytes = {"now": 10 * gram}
    asked = []
    real = mm.get_free_memory

    def free(dev: Any = None, torch_free_too: bool = False) -> Any:
        if torch_free_too:
            return real(dev, torch_free_too)
        asked.append(dev)
        return free_bytes["now"]

    monkeypatch.setattr(mm, "get_free_memory", free)
    _pruned, auto = reconstruct(comfy, model, sd3_cond)
    assert model.load_device in asked
    # no free memory at all: the floor, one Gram of the widest layer
    node_module = sys.modules[comfy.node("DitPrunePruneAndReconstruct").__module__]
    config = node_module.PruneConfig(0.5, update="obs")
    free_bytes["now"] = 0
    assert node_module.default_gram_budget(model, model.model.diffusion_model, config) == gram
    free_bytes["now"] = 1 << 40
    assert node_module.default_gram_budget(model, model.model.diffusion_model, config) == 8 << 30
    monkeypatch.undo()
    _pruned, explicit = reconstruct(comfy, model, sd3_cond, memory_budget_gb=(10 * gram // 4) / (1 << 30))

    def passes(report: str) -> list[str]:
        return [line.rsplit(",", 1)[0] for line in report.splitlines() if line.startswith("  pass of")]

    assert len(passes(auto)) > 1 and passes(auto) == passes(explicit)
    assert auto.splitlines()[0] == explicit.splitlines()[0]


def test_block_refinement_under_lowvram_keeps_the_masks(comfy: Comfy, request: pytest.FixtureRequest) -> None:
    """Block refinement (asked for; off by default) under partial loading: it runs (one more sampler run per
    block, every model call in lowvram), lowers each block's output error, keeps the first pass's
    masks exactly the full load's (refinement never moves a mask), and the incoming MODEL draws as
    before (checked in ``_run_and_sample``). Values are not compared bit for bit: the Adam steps
    run through each mode's own weight casts."""
    import comfy.model_management as mm

    mm.unload_all_models()
    full, _full_report, _full_latent, _probe, _ = _run_and_sample(comfy, "flux", block_refine_steps=100)
    request.getfixturevalue("lowvram")
    low, low_report, low_latent, probe, dense = _run_and_sample(comfy, "flux", block_refine_steps=100)
    lines = _report_lines(low_report)
    passes = int(lines[0].split()[0])
    refined = [line for line in lines if "refined: output error" in line]
    assert passes > 1 and refined and len(probe) == SAMPLE_STEPS * (passes + len(refined) + 1)
    assert all(lowvram for lowvram, _layers in probe)
    for line in refined:
        before, after = (float(x) for x in re.findall(r"output error ([\d.e+-]+) -> ([\d.e+-]+)", line)[0])
        assert after <= before, line
    layers = [line.split(":")[0].strip() for line in lines[1 + passes + len(refined) :]]
    for name in layers[: int(lines[1].split()[2])]:
        key = f"{PREFIX}{name}.weight"
        assert torch.equal(_patches(low)[key].mask.to_bool(), _patches(full)[key].mask.to_bool()), key
    assert torch.isfinite(low_latent).all() and not torch.equal(low_latent, dense)
