"""Qwen-Image, Wan, HunyuanVideo, Chroma, HiDream and Lumina 2 through the whole flow in a real
ComfyUI on CPU: ComfyUI's own detection loads tiny random models with the real key names;
Calibrate (a video latent for Wan and HunyuanVideo), Apply Pruning, KSampler, Save (dense and
compressed), reload with the stock loader and with Load Pruned Model, sample bit for bit again.

(Named *_comfyui so that its module name differs from tests/test_architectures.py.)
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Comfy
from safetensors import safe_open
from tiny_dits import TINY_DITS, TinyDit, dit_detection_from_shapes, random_weights

from ditprune_core.dit_shapes import FULL_CONFIGS, SHAPES

STEPS = 2
APPLY = {"pattern": "unstructured", "attention": True, "mlp": True, "single_fused": True, "modulation": False}


def load(sd: dict[str, torch.Tensor]) -> Any:
    import comfy.sd as csd

    with dit_detection_from_shapes():
        return csd.load_diffusion_model_state_dict(dict(sd), model_options={})


def sample(comfy: Comfy, model: Any, tiny: TinyDit, seed: int = 7) -> torch.Tensor:
    cond = tiny.cond()
    (out,) = comfy.nodes.common_ksampler(
        model, seed, STEPS, 1.0, "euler", "simple", cond, cond, tiny.latent(1)
    )
    return out["samples"]


def weight(model: Any, layer: str) -> torch.Tensor:
    return dict(model.model.diffusion_model.named_modules())[layer].weight


@pytest.mark.parametrize("arch", list(TINY_DITS))
def test_whole_flow(comfy: Comfy, arch: str) -> None:
    tiny = TINY_DITS[arch]
    shapes = tiny.shapes()
    sd = random_weights(shapes, seed=3)
    model = load(sd)
    dm = model.model.diffusion_model
    assert f"{type(dm).__module__}.{type(dm).__qualname__}" == tiny.comfy_class
    state = dm.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes.shapes  # ComfyUI's exact names
    dense = sample(comfy, model, tiny)

    latent = tiny.latent(2)
    stats, drawn, summary = (
        comfy.node("DitPruneCalibrate")
        .execute(
            model=model,
            positive=tiny.cond(batch=2),
            negative=tiny.cond(batch=2, seed=3),
            latent_image=latent,
            seed=0,
            steps=STEPS,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            timestep_weighting="log",
        )
        .args
    )
    assert f"a {arch} model" in summary
    assert drawn["samples"].numel() == latent["samples"].numel()  # Qwen-Image draws (B, 16, 1, H, W)
    frames = latent["samples"].shape[2] if latent["samples"].dim() == 5 else 1
    image_tokens = 2 * frames * 4 * 4  # batch 2, frames, 8x8 latent in 2x2 patches
    if arch in ("wan", "hunyuan_video", "qwen_image", "hidream"):  # layers that see image tokens only
        assert stats[tiny.layer].tokens == STEPS * image_tokens
    else:  # joint attention over image and text tokens
        assert stats[tiny.layer].tokens > STEPS * image_tokens
    if tiny.modulation is not None:
        assert tiny.modulation in stats  # calibrated too, pruned only when asked
    if arch == "hidream":  # each image token visits 2 of the 4 routed experts, all the shared one
        b = "double_stream_blocks.0.block.ff_i."
        assert sum(stats[f"{b}experts.{e}.w1"].tokens for e in range(4)) == 2 * STEPS * image_tokens
        assert stats[f"{b}shared_experts.w1"].tokens == STEPS * image_tokens

    sal = comfy.node("DitPruneScoreSaliency").execute(
        metric="energy", balance=0.4, normalize="none", ria_power=0.5, calibration=stats
    )
    pruned, report, image = (
        comfy.node("DitPruneApplyPruning")
        .execute(model=model, saliency=sal.args[0], sparsity=0.5, **APPLY)
        .args
    )
    assert "50.00%" in report.splitlines()[1]
    assert image.dim() == 4
    pruned_latent = sample(comfy, pruned, tiny)
    assert float((weight(pruned, tiny.layer) == 0).float().mean()) == pytest.approx(0.5, abs=1e-2)
    if tiny.modulation is not None:
        assert float((weight(pruned, tiny.modulation) == 0).float().mean()) == 0.0
    assert not torch.allclose(pruned_latent, dense)
    assert torch.equal(sample(comfy, model, tiny), dense)  # the incoming MODEL stays dense
    assert float((weight(model, tiny.layer) == 0).float().mean()) == 0.0

    save = comfy.node("DitPruneSavePrunedModel")
    path, _size = save.execute(model=pruned, filename_prefix=f"dits/{arch}").args
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(shapes.shapes)
        saved = f.get_tensor(f"{tiny.layer}.weight")
        assert float((saved == 0).float().mean()) == pytest.approx(0.5, abs=1e-2)
    name = str(Path(path).relative_to(comfy.base / "models" / "diffusion_models"))
    with dit_detection_from_shapes():
        (reloaded,) = comfy.nodes.UNETLoader().load_unet(name, "default")
    assert torch.equal(sample(comfy, reloaded, tiny), pruned_latent)

    packed = save.execute(model=pruned, filename_prefix=f"dits/{arch}_packed", format="compressed").args[0]
    packed_name = str(Path(packed).relative_to(comfy.base / "models" / "diffusion_models"))
    with dit_detection_from_shapes():
        (loaded,) = comfy.node("DitPruneLoadPrunedModel").execute(model_name=packed_name).args
    assert torch.equal(sample(comfy, loaded, tiny), pruned_latent)


def test_wan_calibrates_video_frames(comfy: Comfy) -> None:
    """More frames, more tokens per step: the statistics count every frame's tokens."""
    tiny = TINY_DITS["wan"]
    model = load(random_weights(tiny.shapes(), seed=4))
    counts = []
    for frames in (1, 5):
        latent = {"samples": torch.zeros(1, 16, frames, 8, 8)}
        stats, _, _ = (
            comfy.node("DitPruneCalibrate")
            .execute(
                model=model,
                positive=tiny.cond(),
                negative=tiny.cond(seed=3),
                latent_image=latent,
                seed=0,
                steps=1,
                cfg=1.0,
                sampler_name="euler",
                scheduler="simple",
                timestep_weighting="uniform",
            )
            .args
        )
        counts.append((stats["blocks.0.self_attn.q"].tokens, stats["blocks.0.cross_attn.k"].tokens))
    assert counts == [(16, 6), (80, 6)]  # video tokens grow with frames, text tokens do not


def _diffusion_model_classes(root: Path) -> list[str]:
    """Every class ComfyUI's model_base.py builds as a diffusion model (``unet_model=...``)."""
    source = (root / "comfy" / "model_base.py").read_text()
    names = set(re.findall(r"unet_model\s*=\s*([A-Za-z_][\w.]*)", source)) - {"unet_model"}
    short = {
        "UNetModel": "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "StageB": "comfy.ldm.cascade.stage_b.StageB",
        "StageC": "comfy.ldm.cascade.stage_c.StageC",
        "OpenAISignatureMMDITWrapper": "comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper",
    }
    return sorted(short.get(n, n) for n in names)


def test_every_comfyui_diffusion_model_is_templated_or_refused_by_name(comfy: Comfy) -> None:
    from ditprune_core.layers import COMFY_REFUSED, TEMPLATES, detect_architecture

    classes = _diffusion_model_classes(comfy.root)
    assert len(classes) >= 28
    templated = {c: t.name for t in TEMPLATES for c in t.comfy_classes}
    for path in classes:
        assert path in templated or path in COMFY_REFUSED, f"{path} is neither templated nor refused"
        module_name, cls_name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), cls_name)
        assert f"{cls.__module__}.{cls.__qualname__}" == path
        if path in COMFY_REFUSED:
            empty = cls.__new__(cls)  # a real instance of the class, without building its layers
            torch.nn.Module.__init__(empty)
            with pytest.raises(
                ValueError,
                match=rf"{re.escape(path)} \(.*\), which has no ditprune template.*supported are FLUX\.1",
            ):
                detect_architecture(empty)
    assert set(templated) | set(COMFY_REFUSED) == set(classes)  # no stale entries either


def test_refused_comfyui_model_through_the_node(comfy: Comfy) -> None:
    from comfy import model_patcher as mp
    from comfy import ops
    from comfy.ldm.wan.model import VaceWanModel

    class Base(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.diffusion_model = VaceWanModel(
                dim=128,
                ffn_dim=256,
                num_heads=1,
                num_layers=1,
                vace_layers=1,
                vace_in_dim=16,
                text_dim=32,
                device=torch.device("meta"),
                operations=ops.disable_weight_init,
            )

    model = mp.ModelPatcher(Base(), torch.device("cpu"), torch.device("cpu"))
    sal = comfy.node("DitPruneScoreSaliency").execute(
        metric="magnitude", balance=0.4, normalize="none", ria_power=0.5, calibration=None
    )
    with pytest.raises(
        ValueError, match=r"VaceWanModel \(Wan VACE\), which has no ditprune template.*Wan 2\.1"
    ):
        comfy.node("DitPruneApplyPruning").execute(model=model, saliency=sal.args[0], sparsity=0.5, **APPLY)


_FULL_CLASSES = {
    "flux": (
        "comfy.ldm.flux.model.Flux",
        lambda c: {
            "in_channels": 16,
            "out_channels": 16,
            "vec_in_dim": 768,
            "context_in_dim": 4096,
            "hidden_size": 3072,
            "mlp_ratio": 4.0,
            "num_heads": 24,
            "depth": 19,
            "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56],
            "theta": 10000,
            "patch_size": 2,
            "qkv_bias": True,
            "guidance_embed": True,
        },
    ),
    "chroma": (
        "comfy.ldm.chroma.model.Chroma",
        lambda c: {
            "in_channels": 64,
            "out_channels": 64,
            "in_dim": 64,
            "out_dim": 3072,
            "hidden_dim": 5120,
            "n_layers": 5,
            "context_in_dim": 4096,
            "hidden_size": 3072,
            "mlp_ratio": 4.0,
            "num_heads": 24,
            "depth": 19,
            "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56],
            "theta": 10000,
            "patch_size": 2,
            "qkv_bias": True,
        },
    ),
    "hunyuan_video": (
        "comfy.ldm.hunyuan_video.model.HunyuanVideo",
        lambda c: {
            "in_channels": 16,
            "out_channels": 16,
            "vec_in_dim": 768,
            "context_in_dim": 4096,
            "hidden_size": 3072,
            "mlp_ratio": 4.0,
            "num_heads": 24,
            "depth": 20,
            "depth_single_blocks": 40,
            "axes_dim": [16, 56, 56],
            "theta": 256,
            "patch_size": [1, 2, 2],
            "qkv_bias": True,
            "guidance_embed": True,
            "byt5": False,
            "meanflow": False,
        },
    ),
    "qwen_image": ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel", lambda c: {"num_layers": 60}),
    "wan": (
        "comfy.ldm.wan.model.WanModel",
        lambda c: {
            "dim": c.get("dim", 5120),
            "ffn_dim": c.get("ffn", 13824),
            "num_layers": c.get("layers", 40),
            "num_heads": c.get("dim", 5120) // 128,
            "in_dim": c.get("in_dim", 16),
            "out_dim": c.get("out_dim", 16),
        },
    ),
    "hidream": (
        "comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",
        lambda c: {
            "attention_head_dim": 128,
            "axes_dims_rope": [64, 32, 32],
            "caption_channels": [4096, 4096],
            "in_channels": 16,
            "llama_layers": list(range(48)),
            "num_attention_heads": 20,
            "num_routed_experts": 4,
            "num_activated_experts": 2,
            "num_layers": 16,
            "num_single_layers": 32,
            "out_channels": 16,
            "patch_size": 2,
            "text_emb_dim": 2048,
        },
    ),
    "lumina2": (
        "comfy.ldm.lumina.model.NextDiT",
        lambda c: {
            "patch_size": 2,
            "in_channels": 16,
            "dim": 2304,
            "cap_feat_dim": 2304,
            "n_layers": 26,
            "n_heads": 24,
            "n_kv_heads": 8,
            "qk_norm": True,
            "axes_dims": [32, 32, 32],
            "axes_lens": [300, 512, 512],
        },
    ),
}


@pytest.mark.parametrize(("label", "arch", "config"), FULL_CONFIGS, ids=[c[0] for c in FULL_CONFIGS])
def test_full_size_shapes_are_comfyuis(comfy: Comfy, label: str, arch: str, config: dict) -> None:
    """The parameter counts of docs/SUPPORTED_MODELS.md: ComfyUI's classes on the meta device."""
    import comfy.ops

    path, kwargs = _FULL_CLASSES[arch]
    module_name, cls_name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    model = cls(**kwargs(config), device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == SHAPES[arch](**config).shapes


def test_wan_workflow_is_generated_and_calibrates_on_the_sampled_clip() -> None:
    """The committed JSON is what workflows/make_workflows.py writes (schemas: test_workflows.py)."""
    import json
    import runpy

    from conftest import REPO

    generator = runpy.run_path(str(REPO / "workflows" / "make_workflows.py"), run_name="ditprune_wan")
    built = generator["wan21_t2v"]()
    assert json.loads((REPO / "workflows" / "ditprune_wan21_t2v.json").read_text()) == built
    nodes = {n["id"]: n for n in built["nodes"]}
    into = {(link[3], nodes[link[3]]["inputs"][link[4]]["name"]): nodes[link[1]] for link in built["links"]}

    def source(node_id: int, name: str) -> dict:
        node = into[(node_id, name)]
        while node["type"] == "Reroute":  # follow the layout's reroutes back to the real source
            node = into[(node["id"], node["inputs"][0]["name"])]
        return node

    (cal,) = (n for n in nodes.values() if n["type"] == "DitPruneCalibrate")
    samplers = [n for n in nodes.values() if n["type"] == "KSampler"]
    assert source(cal["id"], "latent_image")["widgets_values"][2] == 33  # frames of the clip
    assert all(source(k["id"], "latent_image")["widgets_values"][2] == 33 for k in samplers)
    assert source(cal["id"], "model")["type"] == "ModelSamplingSD3"  # calibrated with the sampling shift


def test_calibration_of_one_architecture_is_refused_on_another(comfy: Comfy) -> None:
    wan, chroma = TINY_DITS["wan"], TINY_DITS["chroma"]
    wan_model = load(random_weights(wan.shapes(), seed=5))
    stats, _, _summary = (
        comfy.node("DitPruneCalibrate")
        .execute(
            model=wan_model,
            positive=wan.cond(),
            negative=wan.cond(seed=3),
            latent_image=wan.latent(1),
            seed=0,
            steps=1,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            timestep_weighting="log",
        )
        .args
    )
    assert stats.architecture == "wan"
    sal = comfy.node("DitPruneScoreSaliency").execute(
        metric="energy", balance=0.4, normalize="none", ria_power=0.5, calibration=stats
    )
    other = load(random_weights(chroma.shapes(), seed=6))
    with pytest.raises(
        ValueError, match=r"calibration has no statistics for .*'double_blocks\.0\.img_attn\.qkv'"
    ):
        comfy.node("DitPruneApplyPruning").execute(model=other, saliency=sal.args[0], sparsity=0.5, **APPLY)


@pytest.mark.parametrize("arch", list(TINY_DITS))
def test_reconstruction_flow(comfy: Comfy, arch: str) -> None:
    """Prune and Reconstruct on every architecture (a video latent for Wan and HunyuanVideo): the
    update beats each layer's mask alone, the input stays dense, and the saved file reloads with the
    stock loader and, compressed, with Load Pruned Model to the same latent, bit for bit."""
    import re

    tiny = TINY_DITS[arch]
    model = load(random_weights(tiny.shapes(), seed=4))
    dense = sample(comfy, model, tiny)
    pruned, report = (
        comfy.node("DitPrunePruneAndReconstruct")
        .execute(
            model=model,
            positive=tiny.cond(batch=2),
            negative=tiny.cond(batch=2, seed=3),
            latent_image=tiny.latent(2),
            seed=0,
            steps=STEPS,
            cfg=1.0,
            sampler_name="euler",
            scheduler="simple",
            timestep_weighting="log",
            metric="energy",
            sparsity=0.5,
            layer_regex="",
            memory_budget_gb=0.0,
            block_refine_steps=100,
            **APPLY,
        )
        .args
    )
    assert "sparsity 50.00%" in report.splitlines()[0]
    # every layer reported; block refinement (asked for: off by default) ran on the architecture's blocks and
    # never left a block worse than the OBS reconstruction (a worse fit is put back)
    assert re.findall(r"output error ([\d.e+-]+) \(mask only ([\d.e+-]+)\)", report)
    refined = re.findall(r"refined: output error ([\d.e+-]+) -> ([\d.e+-]+)", report)
    assert refined and all(float(after) <= float(before) for before, after in refined)
    out = sample(comfy, pruned, tiny)
    assert torch.equal(sample(comfy, model, tiny), dense)  # the incoming MODEL stays dense
    save = comfy.node("DitPruneSavePrunedModel")
    folder = comfy.base / "models" / "diffusion_models"
    path, _size = save.execute(model=pruned, filename_prefix=f"dits/recon_{arch}").args
    with dit_detection_from_shapes():
        (reloaded,) = comfy.nodes.UNETLoader().load_unet(str(Path(path).relative_to(folder)), "default")
    assert torch.equal(sample(comfy, reloaded, tiny), out)
    packed = save.execute(model=pruned, filename_prefix=f"dits/recon_{arch}_c", format="compressed").args[0]
    with dit_detection_from_shapes():
        (loaded,) = (
            comfy.node("DitPruneLoadPrunedModel")
            .execute(model_name=str(Path(packed).relative_to(folder)))
            .args
        )
    assert torch.equal(sample(comfy, loaded, tiny), out)
