"""What the node tests share: a tiny model loaded through ComfyUI's detection, and one call of each
node with the suite's small settings (3 Euler steps, batch 2). Import it by name (``from graph
import ...``): pytest puts ``tests/comfyui/`` on ``sys.path``; never import one test file from another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from conftest import Comfy
from tiny_models import empty_latent, flux_detection_from_shapes, random_state_dict, sd3_cond, sd3_shapes

__all__ = [
    "APPLY",
    "SAMPLE",
    "apply",
    "calibrate",
    "load",
    "load_pruned",
    "reconstruct",
    "reconstructed_patches",
    "saliency",
    "sample",
    "saved_compressed",
]

SAMPLE = {"steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
APPLY = {"pattern": "unstructured", "attention": True, "mlp": True, "single_fused": True, "modulation": False}


def load(sd: dict[str, torch.Tensor], **options: Any) -> Any:
    import comfy.sd as csd

    with flux_detection_from_shapes():
        return csd.load_diffusion_model_state_dict(dict(sd), model_options=options)


def sample(comfy: Comfy, model: Any, cond: list, seed: int = 7, cfg: float = 1.0) -> torch.Tensor:
    (out,) = comfy.nodes.common_ksampler(model, seed, 3, cfg, "euler", "simple", cond, cond, empty_latent())
    return out["samples"]


def calibrate(comfy: Comfy, model: Any, cond_fn: Any, **kw: Any) -> Any:
    args = {"seed": 0, **SAMPLE, "timestep_weighting": "log", **kw}
    out = comfy.node("DitPruneCalibrate").execute(
        model=model,
        positive=cond_fn(batch=2),
        negative=cond_fn(batch=2, seed=3),
        latent_image=empty_latent(batch=2),
        **args,
    )
    return out.args


def saliency(comfy: Comfy, stats: Any, metric: str = "energy") -> Any:
    return (
        comfy.node("DitPruneScoreSaliency")
        .execute(metric=metric, balance=0.4, normalize="none", ria_power=0.5, calibration=stats)
        .args[0]
    )


def apply(comfy: Comfy, model: Any, sal: Any, sparsity: float = 0.5, **kw: Any) -> Any:
    return (
        comfy.node("DitPruneApplyPruning")
        .execute(model=model, saliency=sal, sparsity=sparsity, **{**APPLY, **kw})
        .args
    )


def reconstruct(comfy: Comfy, model: Any, cond_fn: Any, **kw: Any) -> Any:
    args = {
        "seed": 0,
        **SAMPLE,
        "timestep_weighting": "log",
        "metric": "energy",
        "sparsity": 0.5,
        **APPLY,
        "layer_regex": "",
        "memory_budget_gb": 0.0,
        **kw,
    }
    return (
        comfy.node("DitPrunePruneAndReconstruct")
        .execute(
            model=model,
            positive=cond_fn(batch=2),
            negative=cond_fn(batch=2, seed=3),
            latent_image=empty_latent(batch=2),
            **args,
        )
        .args
    )


def reconstructed_patches(model: Any) -> dict[str, Any]:
    """``{layer name: ReconstructedPatch}`` of a MODEL from Prune and Reconstruct (each key's last patch)."""
    out = {}
    for key, entries in model.patches.items():
        patch = entries[-1][1]
        if getattr(patch, "name", "") == "ditprune_reconstructed":
            out[key.removeprefix("diffusion_model.").removesuffix(".weight")] = patch
    return out


def saved_compressed(comfy: Comfy, pattern: str, tag: str) -> tuple[Any, Any, str]:
    model = load(random_state_dict(sd3_shapes(), seed=20))
    stats, _, _ = calibrate(comfy, model, sd3_cond)
    pruned, _report, _ = apply(comfy, model, saliency(comfy, stats), 0.5, pattern=pattern)
    path, _size = (
        comfy.node("DitPruneSavePrunedModel")
        .execute(model=pruned, filename_prefix=f"runtime/{tag}", format="compressed", values="keep dtype")
        .args
    )
    name = str(Path(path).relative_to(comfy.base / "models" / "diffusion_models"))
    return model, pruned, name


def load_pruned(comfy: Comfy, name: str, mode: str = "compressed on device") -> Any:
    return (
        comfy.node("DitPruneLoadPrunedModel").execute(model_name=name, mode=mode, sparse_kernels=True).args[0]
    )
