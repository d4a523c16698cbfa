"""The nodes inside a real ComfyUI on CPU, on random-weight FLUX and SD3 models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import NODE_IDS, Comfy
from graph import apply, calibrate, load, saliency, sample
from safetensors import safe_open
from tiny_models import (
    flux_cond,
    flux_detection_from_shapes,
    flux_shapes,
    random_state_dict,
    sd3_cond,
    sd3_shapes,
)


def test_pack_registers_every_node_with_tooltips(comfy: Comfy) -> None:
    for node_id in NODE_IDS:
        schema = comfy.node(node_id).GET_SCHEMA()
        assert schema.category == ("loaders" if node_id == "DitPruneLoadPrunedModel" else "DiT-Pruning")
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"


def test_flux_calibrate_prune_sample_save_reload(comfy: Comfy, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    prune_nodes = sys.modules[comfy.node("DitPruneApplyPruning").__module__]
    figures: list[Any] = []  # the matplotlib figures the nodes render: their labels are checked below
    render = prune_nodes.render
    monkeypatch.setattr(prune_nodes, "render", lambda fig: figures.append(fig) or render(fig))
    sd = random_state_dict(flux_shapes(), seed=0)
    model = load(sd)
    cond = flux_cond()
    dense = sample(comfy, model, cond)

    stats, latent, summary = calibrate(comfy, model, flux_cond)
    assert latent["samples"].shape == (2, 16, 8, 8)
    assert "flux model" in summary
    assert stats["double_blocks.0.img_attn.qkv"].tokens > 0
    sal = saliency(comfy, stats)
    clusters, plot, text = (
        comfy.node("DitPruneClusterWeights")
        .execute(
            model=model,
            granularity="cluster",
            n_clusters=2,
            max_clusters=4,
            min_silhouette=0.0,
            allocation=1.0,
            within="row",
            seed=0,
            plot_layer="single_blocks.0.linear1",
            saliency=sal,
        )
        .args
    )
    assert plot.shape == (1, 320, 340, 3)
    assert text.startswith("single_blocks.0.linear1: k=2")
    pruned, report, image = apply(comfy, model, sal, 0.5, clusters=clusters)
    assert "50.00%" in report.splitlines()[1]
    assert image.shape == (1, 320, 340, 3)
    scatter, bars = (fig.axes[0] for fig in figures)
    assert scatter.get_title().startswith("single_blocks.0.linear1\n")  # the layer plotted
    assert (scatter.get_xlabel(), scatter.get_ylabel()) == ("ln RMS(w) of a row", "ln RMS(w·√E[x²])")
    assert scatter.get_legend().get_texts()[0].get_text().startswith("cluster 0: ")
    assert (bars.get_xlabel(), bars.get_ylabel()) == ("block, in model order", "sparsity (% removed)")
    assert [t.get_text() for t in bars.get_legend().get_texts()] == [
        "double-stream block",
        "single-stream block",
        "target 50%",
    ]

    pruned_latent = sample(comfy, pruned, cond)
    linear1 = pruned.model.diffusion_model.single_blocks[0].linear1.weight  # pruned clone is loaded now
    assert float((linear1 == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert not torch.allclose(pruned_latent, dense)
    assert torch.equal(sample(comfy, model, cond), dense)  # the incoming model still draws dense
    assert float((model.model.diffusion_model.single_blocks[0].linear1.weight == 0).float().mean()) == 0.0

    path, _size = (
        comfy.node("DitPruneSavePrunedModel").execute(model=pruned, filename_prefix="ditprune/flux").args
    )
    assert path.endswith("diffusion_models/ditprune/flux_00001.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "ditprune.checkpoint" and meta["checkpoint"] == "dense"
        assert json.loads(meta["ditprune"])["config"]["granularity"] == "cluster"
        assert f.get_tensor("single_blocks.0.linear1.weight").eq(0).float().mean() == pytest.approx(
            0.5, abs=1e-3
        )
    with flux_detection_from_shapes():
        (reloaded,) = comfy.nodes.UNETLoader().load_unet("ditprune/flux_00001.safetensors", "default")
    assert torch.equal(sample(comfy, reloaded, cond), pruned_latent)


def test_sd3_with_cfg_and_bf16_weights_kept(comfy: Comfy) -> None:
    sd = random_state_dict(sd3_shapes(), seed=1, dtype=torch.bfloat16)
    model = load(sd, dtype=torch.bfloat16)
    cond = sd3_cond()
    stats, _latent, summary = calibrate(comfy, model, sd3_cond, cfg=2.0)
    assert "sd3 model" in summary
    pruned, _report, _ = apply(comfy, model, saliency(comfy, stats, "wanda"), 0.6)
    pruned_latent = sample(comfy, pruned, cond, cfg=2.0)
    path, _size = comfy.node("DitPruneSavePrunedModel").execute(model=pruned, filename_prefix="sd3").args
    with safe_open(path, framework="pt") as f:
        weight = f.get_tensor("joint_blocks.0.x_block.mlp.fc1.weight")
        assert weight.dtype == torch.bfloat16
        assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=1e-3)
        assert (
            float((f.get_tensor("joint_blocks.0.x_block.adaLN_modulation.1.weight") == 0).float().mean()) == 0
        )
    (reloaded,) = comfy.nodes.UNETLoader().load_unet(path.rsplit("/", 1)[1], "default")
    assert torch.equal(sample(comfy, reloaded, cond, cfg=2.0), pruned_latent)


def test_lowvram_patch_matches_full_load(comfy: Comfy) -> None:
    import comfy.model_management as mm

    model = load(random_state_dict(flux_shapes(), seed=2))
    pruned, _report, _ = apply(comfy, model, saliency(comfy, None, "magnitude"), 0.5)
    mm.unload_all_models()
    cpu = torch.device("cpu")
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    c = flux_cond()[0]
    kwargs = {"context": c[0], "y": c[1]["pooled_output"], "guidance": torch.tensor([3.5])}
    pruned.patch_model(device_to=cpu, lowvram_model_memory=1)  # every layer patched per forward
    try:
        qkv = pruned.model.diffusion_model.double_blocks[0].img_attn.qkv
        assert qkv.weight_function, "lowvram mode did not engage"
        assert float((qkv.weight == 0).float().mean()) == 0.0  # stored weights untouched
        with torch.no_grad():
            low = pruned.model.diffusion_model(x, t, **kwargs)
    finally:
        pruned.unpatch_model(device_to=cpu)
    pruned.patch_model(device_to=cpu)
    try:
        with torch.no_grad():
            full = pruned.model.diffusion_model(x, t, **kwargs)
    finally:
        pruned.unpatch_model(device_to=cpu)
    assert torch.allclose(low, full, atol=1e-6)


def test_calibration_files_round_trip(comfy: Comfy) -> None:
    model = load(random_state_dict(flux_shapes(), seed=3))
    stats, _, _ = calibrate(comfy, model, flux_cond, save_name="tiny_flux")
    load_node = comfy.node("DitPruneLoadCalibration")
    options = load_node.GET_SCHEMA().inputs[0].options
    assert "tiny_flux.safetensors" in options
    loaded, record = load_node.execute(calibration_name="tiny_flux.safetensors").args
    assert loaded.fingerprint == stats.fingerprint
    assert record.startswith("tiny_flux.safetensors: 1 prompt(s)") and "steps 3" in record
    with pytest.raises(FileExistsError, match="already exists"):
        calibrate(comfy, model, flux_cond, save_name="tiny_flux")
    with pytest.raises(ValueError, match="outside"):
        calibrate(comfy, model, flux_cond, save_name="../../escape")
    # chained calibrations merge
    merged, _, _ = calibrate(comfy, model, flux_cond, calibration=stats)
    assert merged["single_blocks.0.linear1"].tokens == 2 * stats["single_blocks.0.linear1"].tokens


def test_interrupted_calibrate_leaves_no_hooks_and_runs_again(comfy: Comfy) -> None:
    import comfy.model_management as mm
    import comfy.utils as cu

    model = load(random_state_dict(flux_shapes(), seed=4))
    calls = {"n": 0}

    def server_like_hook(value: int, total: int, preview: Any = None, node_id: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # the user presses Cancel during the first sampler step
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    cu.set_progress_bar_global_hook(server_like_hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            calibrate(comfy, model, flux_cond)
    finally:
        mm.interrupt_current_processing(False)
        cu.set_progress_bar_global_hook(None)
    assert calls["n"] >= 1
    assert all(not m._forward_hooks for m in model.model.diffusion_model.modules())
    stats, _, _ = calibrate(comfy, model, flux_cond)
    assert stats["single_blocks.0.linear2"].tokens > 0


def test_bad_inputs_are_refused_with_clear_errors(comfy: Comfy) -> None:
    flux = load(random_state_dict(flux_shapes(), seed=5))
    other = load(random_state_dict(flux_shapes(), seed=6))
    stats, _, _ = calibrate(comfy, flux, flux_cond)
    with pytest.raises(ValueError, match=r"calibration from another model|differ from the model"):
        apply(comfy, other, saliency(comfy, stats))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            apply(comfy, flux, saliency(comfy, stats), bad)
    with pytest.raises(ValueError, match="needs a calibration"):
        saliency(comfy, None, "wanda")
    odd = load(random_state_dict(flux_shapes(hidden=36, heads=2), seed=7))
    with pytest.raises(ValueError, match="has 36 input features, not divisible by 8"):
        apply(comfy, odd, saliency(comfy, None, "magnitude"), pattern="4:8")


def test_unsupported_model_is_named(comfy: Comfy) -> None:
    import comfy.model_patcher as mp
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    class Base(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.diffusion_model = UNetModel(
                image_size=8,
                in_channels=4,
                model_channels=32,
                out_channels=4,
                num_res_blocks=1,
                channel_mult=(1,),
                num_head_channels=8,
                transformer_depth=[0],
                transformer_depth_output=[0, 0],
                transformer_depth_middle=0,
            )

    unet = mp.ModelPatcher(Base(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"is a UNet .*SDXL.*supported are FLUX"):
        apply(comfy, unet, saliency(comfy, None, "magnitude"))


def test_save_never_overwrites_and_stays_in_its_folder(comfy: Comfy) -> None:
    model = load(random_state_dict(sd3_shapes(), seed=8))
    save = comfy.node("DitPruneSavePrunedModel")
    first, _size = save.execute(model=model, filename_prefix="keep/me").args
    before = Path(first).read_bytes()
    second, _size = save.execute(model=model, filename_prefix="keep/me").args
    assert first != second and Path(first).read_bytes() == before
    with pytest.raises(ValueError, match="outside"):
        save.execute(model=model, filename_prefix="../../../tmp/evil")


def test_compare_node(comfy: Comfy) -> None:
    a = torch.zeros(1, 4, 4, 3)
    b = a.clone()
    b[0, 0, 0, 0] = 0.5
    text, diff = comfy.node("DitPruneCompare").execute(dense=a, pruned=b, amplify=2.0).args
    assert "max abs difference 0.5000" in text
    assert float(diff.max()) == 1.0
    with pytest.raises(ValueError, match="same size"):
        comfy.node("DitPruneCompare").execute(dense=a, pruned=torch.zeros(1, 2, 2, 3), amplify=1.0)


def test_compare_node_names_the_input_with_nan(comfy: Comfy, caplog: pytest.LogCaptureFixture) -> None:
    a = torch.zeros(1, 4, 4, 3)
    b = a.clone()
    b[0, 1, 1] = float("nan")
    with caplog.at_level("WARNING", logger="ditprune"):
        text, diff = comfy.node("DitPruneCompare").execute(dense=a, pruned=b, amplify=2.0).args
    assert "the pruned image has NaN in 3 of 48 values" in text and "dense image" not in text
    assert "nan" not in text.replace("NaN", "")  # no "PSNR nan dB"
    assert "pruned image has NaN" in caplog.text
    assert bool(torch.isfinite(diff).all())
    text, _ = comfy.node("DitPruneCompare").execute(dense=b, pruned=a, amplify=2.0).args
    assert "the dense image has NaN" in text and "pruned image" not in text


@pytest.mark.parametrize("variant", ["flux-schnell", "sd3.5"])
def test_schnell_and_sd35_variants(comfy: Comfy, variant: str) -> None:
    if variant == "flux-schnell":
        sd, cond_fn = random_state_dict(flux_shapes(guidance=False), seed=11), flux_cond
        layer = "double_blocks.0.txt_attn.qkv"
    else:
        sd, cond_fn = random_state_dict(sd3_shapes(sd35=True), seed=12), sd3_cond
        layer = "joint_blocks.0.x_block.attn2.qkv"
    model = load(sd)
    stats, _, _ = calibrate(comfy, model, cond_fn)
    assert stats[layer].tokens > 0
    pruned, _report, _ = apply(comfy, model, saliency(comfy, stats), 0.6)
    cond = cond_fn()
    dense = sample(comfy, model, cond)
    pruned_latent = sample(comfy, pruned, cond)
    weight = dict(pruned.model.diffusion_model.named_modules())[layer].weight  # loaded, patched
    assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=1e-3)
    assert not torch.allclose(dense, pruned_latent)
    assert torch.equal(sample(comfy, model, cond), dense)


def test_fp8_weights_are_pruned_and_saved_as_fp8(comfy: Comfy) -> None:
    model = load(random_state_dict(flux_shapes(), seed=13), dtype=torch.float8_e4m3fn)
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    assert qkv.dtype == torch.float8_e4m3fn
    stats, _, _ = calibrate(comfy, model, flux_cond)
    pruned, _report, _ = apply(comfy, model, saliency(comfy, stats), 0.5)
    sample(comfy, pruned, flux_cond())
    in_graph = pruned.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.clone()  # loaded, patched
    path, _size = comfy.node("DitPruneSavePrunedModel").execute(model=pruned, filename_prefix="fp8/flux").args
    with safe_open(path, framework="pt") as f:
        saved = f.get_tensor("double_blocks.0.img_attn.qkv.weight")
    assert saved.dtype == torch.float8_e4m3fn
    assert float((saved.float() == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    # the file holds exactly what ComfyUI computes in the graph (its fp8 stochastic rounding included),
    # and kept values stay within one fp8 step of the originals
    assert torch.equal(saved.view(torch.uint8), in_graph.view(torch.uint8))
    kept = saved.float() != 0
    step = qkv.float()[kept].abs() * 2**-3
    assert bool(((saved.float()[kept] - qkv.float()[kept]).abs() <= step + 1e-12).all())


@pytest.mark.slow
def test_full_width_flux_block_with_stock_detection(comfy: Comfy) -> None:
    """3072-wide FLUX, 1 double + 1 single block (546M parameters): ComfyUI's own detection."""
    import comfy.sd as csd

    sd = random_state_dict(
        flux_shapes(hidden=3072, heads=24, ctx=4096, vec=768), seed=14, dtype=torch.bfloat16, std=0.02
    )
    model = csd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.bfloat16})
    cond_fn = lambda batch=1, seed=1: flux_cond(batch, seed, ctx=4096, vec=768)  # noqa: E731
    stats, _, _ = calibrate(comfy, model, cond_fn, steps=1)
    pruned, report, _ = apply(comfy, model, saliency(comfy, stats), 0.5)
    assert "50.00%" in report.splitlines()[1]
    cond = cond_fn()
    assert not torch.equal(sample(comfy, pruned, cond), sample(comfy, model, cond))


@pytest.mark.parametrize("values", ["keep dtype", "fp8_e4m3fn"])
def test_compressed_save_and_load_pruned_model(comfy: Comfy, values: str) -> None:
    model = load(random_state_dict(sd3_shapes(), seed=15, dtype=torch.bfloat16), dtype=torch.bfloat16)
    stats, _, _ = calibrate(comfy, model, sd3_cond)
    pruned, _report, _ = apply(comfy, model, saliency(comfy, stats), 0.5, pattern="2:4")
    cond = sd3_cond()
    in_graph = sample(comfy, pruned, cond)
    save = comfy.node("DitPruneSavePrunedModel")
    path, shown = save.execute(
        model=pruned, filename_prefix=f"packed/{values[:4]}", format="compressed", values=values
    ).args
    dense_path, dense_shown = save.execute(model=pruned, filename_prefix="packed/dense").args
    size, dense_size = Path(path).stat().st_size, Path(dense_path).stat().st_size
    # the size output: file size, bits per weight, ratio to dense bf16, VRAM = file + largest decode
    assert f"size {size / 1e6:.2f} MB" in shown and "bits per weight" in shown, shown
    assert re.search(r"ratio \d+\.\d% of the dense model \([\d.]+ MB in bfloat16\)", shown), shown
    assert re.search(r"the largest decoded layer, joint_blocks\.\d\.\S+: [\d.]+ kB", shown), shown
    # a dense bf16 file: 16 bits per weight plus its header (CRCs and metadata: 0.4% of this tiny model)
    assert re.search(r"16\.\d\d bits per weight, ratio 100\.\d%", dense_shown), dense_shown
    assert (
        size < (0.75 if values == "keep dtype" else 0.65) * dense_size
    )  # modulation and embedders stay dense
    name = str(Path(path).relative_to(comfy.base / "models" / "diffusion_models"))
    (loaded,) = comfy.node("DitPruneLoadPrunedModel").execute(model_name=name).args
    latent = sample(comfy, loaded, cond)
    if values == "keep dtype":
        assert torch.equal(latent, in_graph)
    else:
        assert (latent - in_graph).norm() / in_graph.norm() < 0.05
    with pytest.raises(RuntimeError, match="size mismatch"):  # the stock loader fails loudly on it
        comfy.nodes.UNETLoader().load_unet(name, "default")


def test_load_pruned_model_refuses_other_files(comfy: Comfy) -> None:
    from safetensors.torch import save_file

    other = comfy.base / "models" / "diffusion_models" / "not_ours.safetensors"
    save_file(random_state_dict(sd3_shapes(), seed=16), str(other))
    with pytest.raises(ValueError, match="not a ditprune checkpoint"):
        comfy.node("DitPruneLoadPrunedModel").execute(model_name="not_ours.safetensors")
    with pytest.raises(ValueError, match="need format 'compressed'"):
        comfy.node("DitPruneSavePrunedModel").execute(
            model=comfy.nodes.UNETLoader().load_unet("not_ours.safetensors", "default")[0],
            filename_prefix="x",
            format="dense",
            values="fp8_e4m3fn",
        )


def test_quantised_weights_are_refused_with_the_reason(comfy: Comfy) -> None:
    class QuantTensor(torch.Tensor):  # stands for GGUF's GGMLTensor and other custom storage
        pass

    model = load(random_state_dict(flux_shapes(), seed=17))
    layer = model.model.diffusion_model.single_blocks[0].linear1
    layer.weight = torch.nn.Parameter(layer.weight.detach().as_subclass(QuantTensor), requires_grad=False)
    with pytest.raises(ValueError, match=r"'single_blocks\.0\.linear1' is stored as QuantTensor.*quantised"):
        apply(comfy, model, saliency(comfy, None, "magnitude"))


def test_save_tooltip_quotes_the_tiers_table_not_a_copy(comfy: Comfy, tmp_path: Path) -> None:
    """The VRAM advice in Save's `values` tooltip is written from docs/bench/vram_tiers.json (the
    table the per-GPU workflows come from): every tier's figures appear, and a missing table gives a
    pointer instead of stale figures."""
    import sys

    save_module = sys.modules[comfy.node("DitPruneSavePrunedModel").__module__]
    tiers = json.loads(save_module.TIERS_FILE.read_text())["tiers"]
    tooltip = next(
        i.tooltip for i in comfy.node("DitPruneSavePrunedModel").GET_SCHEMA().inputs if i.id == "values"
    )
    for tier in tiers:
        assert f"- {tier['vram_gib']} GB:" in tooltip
        if tier["verdict"] == "ditprune":
            assert f"{tier['file_gb']:.2f} GB" in tooltip and f"{tier['sparsity']:.0%}" in tooltip
    assert "docs/bench/vram_tiers.md" in save_module.tier_advice(tmp_path / "missing.json")
