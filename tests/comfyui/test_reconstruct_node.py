"""Prune and Reconstruct in the real ComfyUI: passes, save, stock reload, compressed load, bit for bit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Comfy
from graph import SAMPLE, load, reconstruct, sample
from tiny_models import (
    flux_cond,
    flux_detection_from_shapes,
    flux_shapes,
    random_state_dict,
    sd3_cond,
    sd3_shapes,
)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_reconstruct_prunes_in_passes_saves_and_reloads_bit_for_bit(
    comfy: Comfy, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    common = sys.modules[comfy.node("DitPruneSavePrunedModel").__module__.rsplit(".", 1)[0] + ".common"]
    shown: list[str] = []  # what the nodes show on themselves while they run (progress text)
    monkeypatch.setattr(common, "show_text", shown.append)
    shapes, cond_fn = (flux_shapes(), flux_cond) if arch == "flux" else (sd3_shapes(), sd3_cond)
    model = load(random_state_dict(shapes, seed=11))
    cond = cond_fn()
    dense = sample(comfy, model, cond)
    # a budget of the largest block layer's Gram: several passes
    widest = max(
        m.in_features
        for n, m in model.model.diffusion_model.named_modules()
        if isinstance(m, torch.nn.Linear) and "blocks." in n and "mod" not in n and "adaLN" not in n
    )
    budget_gb = widest * widest * 4 * 1.0001 / (1 << 30)
    pruned, report = reconstruct(comfy, model, cond_fn, memory_budget_gb=budget_gb, block_refine_steps=100)
    first = report.splitlines()[0]
    assert "pass(es)" in first and int(first.split()[0]) > 1 and "sparsity 50.00%" in first
    out = sample(comfy, pruned, cond)
    assert torch.equal(sample(comfy, model, cond), dense)  # the incoming model still draws dense
    # every layer is reported; block refinement (asked for: off by default) ran on every block,
    # each block's output error on its calibration calls went down (the layers' own errors may then
    # go up: the block's output is what is fitted), and the masks are still exact
    layer_lines = [line for line in report.splitlines() if "(mask only" in line]
    assert len(layer_lines) == int(first.split()[2]) > 0
    block_lines = [line for line in report.splitlines() if "refined: output error" in line]
    blocks = {n.split(".")[0] + "." + n.split(".")[1] for n in _pruned_names(pruned)}
    refined = {line.split()[1] for line in block_lines}
    # every block, unless refinement gained nothing on 2 blocks in a row (block_refine_patience's
    # default: on the tiny SD3 a fit on its 2 recorded calls never beats the reconstruction)
    stopped = "block refinement stopped: it gained nothing on 2 refinement(s) in a row" in report
    assert refined == blocks or (stopped and refined < blocks), (refined, blocks)
    improved = 0
    for line in block_lines:
        before, after = (float(x) for x in re.findall(r"output error ([\d.e+-]+) -> ([\d.e+-]+)", line)[0])
        assert after < before or (after == before and "(worse: put back)" in line), line
        improved += after < before
    assert improved > 0 or stopped
    assert not torch.equal(out, dense)
    # the phase and its position, in order: pass p of P, then block b of B recording / refining
    passes = int(first.split()[0])
    starts = [t for t in shown if t.startswith("calibration pass ") and "\n" not in t]
    assert [t.split(":")[0] for t in starts] == [
        f"calibration pass {p} of {passes}" for p in range(1, passes + 1)
    ]
    assert any(
        re.fullmatch(rf"calibration pass \d+ of {passes}: .*\nlayer \d+ of \d+: \S+", t) for t in shown
    )
    refining = [t for t in shown if t.endswith("refining its kept weights (100 Adam steps)")]
    assert refining[0].startswith("block 1 of ")
    assert {re.search(r"\((\S+)\): refining", t)[1] for t in refining} == refined  # type: ignore[index]
    assert any("sampling to record its calls (block refinement)" in t for t in shown)
    folder = comfy.base / "models" / "diffusion_models"
    for fmt in ("dense", "compressed"):
        path, _size = (
            comfy.node("DitPruneSavePrunedModel")
            .execute(model=pruned, filename_prefix=f"recon/{arch}-{fmt}", format=fmt, values="keep dtype")
            .args
        )
        name = str(Path(path).relative_to(folder))
        if fmt == "dense":
            with flux_detection_from_shapes():
                (reloaded,) = comfy.nodes.UNETLoader().load_unet(name, "default")
            assert torch.equal(sample(comfy, reloaded, cond), out)
            assert any(t.startswith("saving: writing tensor ") for t in shown)
        else:
            for mode in ("compressed on device", "densify at load"):
                with flux_detection_from_shapes():
                    (loaded,) = (
                        comfy.node("DitPruneLoadPrunedModel")
                        .execute(model_name=name, mode=mode, sparse_kernels=False)
                        .args
                    )
                assert torch.equal(sample(comfy, loaded, cond), out), mode


def _pruned_names(model: Any) -> list[str]:
    """The layers the MODEL's ditprune patches prune."""
    return [
        k.removeprefix("diffusion_model.").removesuffix(".weight") for k in model.patches if "blocks." in k
    ]


def test_reconstruct_interrupted_leaves_the_model_and_hooks_clean(comfy: Comfy) -> None:
    import comfy.model_management as mm

    model = load(random_state_dict(sd3_shapes(), seed=12))
    cond = sd3_cond()
    dense = sample(comfy, model, cond)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            reconstruct(comfy, model, sd3_cond)
    finally:
        mm.interrupt_current_processing(False)
    dm = model.model.diffusion_model
    assert sum(len(m._forward_hooks) for m in dm.modules()) == 0
    assert torch.equal(sample(comfy, model, cond), dense)


def test_reconstruct_interrupted_mid_run_returns_nothing_and_leaves_the_model_clean(comfy: Comfy) -> None:
    """Cancel in the second pass, while the sampler runs with the Gram hooks on and the first pass's
    layers are already patched on the node's clone: the node raises (no MODEL comes out), the hooks
    are gone, and the incoming MODEL draws and stores exactly what it did."""
    import comfy.model_management as mm
    import comfy.utils as cu

    model = load(random_state_dict(sd3_shapes(), seed=14))
    cond = sd3_cond()
    dense = sample(comfy, model, cond)
    stored = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    budget_gb = 512 * 512 * 4 * 1.0001 / (1 << 30)  # one Gram of the widest layer (fc2): passes
    calls = {"model": 0, "at_cancel": None}

    def count(apply_model: Any, args: dict) -> torch.Tensor:
        calls["model"] += 1
        if calls["model"] == SAMPLE["steps"] + 1:  # the first model call of the second pass
            calls["at_cancel"] = sum(len(m._forward_hooks) for m in dm.modules())
            mm.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def server_like_hook(value: int, total: int, preview: Any = None, node_id: Any = None) -> None:
        mm.throw_exception_if_processing_interrupted()  # the server's progress hook does this

    dm = model.model.diffusion_model
    counted = model.clone()
    counted.set_model_unet_function_wrapper(count)
    cu.set_progress_bar_global_hook(server_like_hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            reconstruct(comfy, counted, sd3_cond, memory_budget_gb=budget_gb)
    finally:
        mm.interrupt_current_processing(False)
        cu.set_progress_bar_global_hook(None)
    assert calls["model"] == SAMPLE["steps"] + 1 and calls["at_cancel"]  # cancelled with hooks on
    assert sum(len(m._forward_hooks) for m in dm.modules()) == 0
    assert not any(
        getattr(e[1], "name", "") == "ditprune_reconstructed" for v in counted.patches.values() for e in v
    )
    assert torch.equal(sample(comfy, model, cond), dense)
    after = model.model.diffusion_model.state_dict()
    assert after.keys() == stored.keys() and all(torch.equal(after[k], stored[k]) for k in stored)
    # and the node runs to the end afterwards (without block refinement: its passes, one layer each,
    # are what is checked, and refining every one-layer pass made this the suite's slowest test)
    _pruned, report = reconstruct(comfy, model, sd3_cond, memory_budget_gb=budget_gb, block_refine_steps=0)
    assert int(report.split()[0]) > 1 and "sparsity 50.00%" in report.splitlines()[0]


def test_reconstruct_refuses_a_budget_below_one_gram(comfy: Comfy) -> None:
    model = load(random_state_dict(sd3_shapes(), seed=13))
    with pytest.raises(ValueError, match="smaller than the Gram of layer"):
        reconstruct(comfy, model, sd3_cond, memory_budget_gb=1e-7)
