"""Prompt sets in the real ComfyUI, on the tiny FLUX and SD3 models with tiny real text encoders:
the Prompt Set node, Calibrate and Prune and Reconstruct over a set, the held-out check, the
calibration record, and every bad input."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import Comfy
from graph import APPLY, SAMPLE, apply, load, saliency
from tiny_clips import tiny_clip
from tiny_models import empty_latent, flux_shapes, random_state_dict, sd3_shapes

PROMPTS = (
    "a red fox in fresh snow\na bowl of ramen, top view\na neon sign that says OPEN\n"
    "[held-out]\na lighthouse at night\na cat on a windowsill"
)


def _module(comfy: Comfy, name: str) -> ModuleType:
    return sys.modules[comfy.node("DitPruneCalibrate").__module__.rsplit(".", 1)[0] + f".{name}"]


@pytest.fixture(scope="module")
def clips(comfy: Comfy) -> dict[str, Any]:
    return {"flux": tiny_clip("flux"), "sd3": tiny_clip("sd3")}


def _model(arch: str, seed: int = 11) -> Any:
    shapes = flux_shapes() if arch == "flux" else sd3_shapes(ctx=4096, adm=32 + 1280)
    return load(random_state_dict(shapes, seed=seed))


def _prompt_set(comfy: Comfy, clip: Any, text: str = PROMPTS, **kw: Any) -> tuple[Any, str]:
    """The node's output and the summary it shows on itself."""
    args = {
        "source": "(the text below)",
        "text": text,
        "max_prompts": 256,
        "held_out_fraction": 0.0,
        "seeds_per_prompt": 1,
        "sizes": "",
        **kw,
    }
    out = comfy.node("DitPrunePromptSet").execute(clip=clip, **args)
    return out.args[0], out.ui["text"][0]


def _encode(clip: Any, text: str, guidance: bool) -> list:
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return [[c, {**o, "guidance": 3.5}] for c, o in cond] if guidance else cond


def _calibrate(comfy: Comfy, model: Any, positive: list, negative: list, **kw: Any) -> Any:
    args = {"seed": 0, **SAMPLE, "steps": 2, "timestep_weighting": "log", **kw}
    return (
        comfy.node("DitPruneCalibrate")
        .execute(model=model, positive=positive, negative=negative, latent_image=empty_latent(), **args)
        .args
    )


# --- the Prompt Set node --------------------------------------------------------------------------


def test_prompt_set_node_encodes_like_clip_text_encode(comfy: Comfy, clips: dict[str, Any]) -> None:
    encoded, summary = _prompt_set(comfy, clips["flux"])
    assert encoded.prompts.calibration == (
        "a red fox in fresh snow",
        "a bowl of ramen, top view",
        "a neon sign that says OPEN",
    )
    assert encoded.prompts.held_out == ("a lighthouse at night", "a cat on a windowsill")
    assert "3 calibration + 2 held-out prompts from text box" in summary
    # exactly CLIPTextEncode's conditioning, prompt by prompt
    (stock,) = comfy.nodes.CLIPTextEncode().encode(clips["flux"], "a bowl of ramen, top view")
    assert torch.equal(encoded.calibration[1][0][0], stock[0][0])
    assert torch.equal(encoded.calibration[1][0][1]["pooled_output"], stock[0][1]["pooled_output"])
    assert (encoded.context_width, encoded.pooled_width) == (32, 32)


def test_prompt_set_sources(comfy: Comfy, clips: dict[str, Any], tmp_path: Path) -> None:
    import folder_paths

    prompts_mod = _module(comfy, "prompts")
    shipped = prompts_mod.read_prompts(prompts_mod.SHIPPED, "", max_prompts=256, held_out_fraction=0.5)
    assert len(shipped.calibration) == 103 and len(shipped.held_out) == 16  # its own split wins
    assert shipped.source == "prompts.txt"
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "mine.txt").write_text("one\ntwo\nthree\nfour\n")
        (tmp_path / "photo.txt").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
        schema_sources = comfy.node("DitPrunePromptSet").define_schema().inputs[1].options
        assert "sub/mine.txt" in schema_sources and "photo.txt" in schema_sources
        encoded, _ = _prompt_set(comfy, clips["sd3"], source="sub/mine.txt", held_out_fraction=0.25)
        assert encoded.prompts.calibration == ("one", "two", "three") and encoded.prompts.held_out == (
            "four",
        )
        with pytest.raises(ValueError, match=r"gone\.txt does not exist.*input folder"):
            _prompt_set(comfy, clips["sd3"], source="gone.txt")
        with pytest.raises(ValueError, match=r"photo\.txt is not UTF-8 text"):
            _prompt_set(comfy, clips["sd3"], source="photo.txt")
        with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
            _prompt_set(comfy, clips["sd3"], source="../elsewhere.txt")
    finally:
        folder_paths.set_input_directory(old)


@pytest.mark.parametrize("text", ["", "\n  \n\n", "# just a comment"])
def test_empty_prompt_set_is_refused(comfy: Comfy, clips: dict[str, Any], text: str) -> None:
    with pytest.raises(ValueError, match=r"text box: no prompt in it"):
        _prompt_set(comfy, clips["flux"], text=text)


def test_more_prompts_than_the_maximum(comfy: Comfy, clips: dict[str, Any]) -> None:
    with pytest.raises(
        ValueError, match=r"5 prompts, more than max_prompts = 4\. Raise max_prompts.*at least 5"
    ):
        _prompt_set(comfy, clips["flux"], max_prompts=4)


# --- Calibrate over a set -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_a_set_of_three_is_three_one_prompt_calibrations_merged(
    comfy: Comfy, clips: dict[str, Any], arch: str
) -> None:
    """The same E[x²] (Calibrate) and the same Grams (the recorder Prune and Reconstruct uses) as three
    one-prompt runs merged, within float tolerance."""
    from ditprune_core.calibrate import Calibrator

    clip, guidance = clips[arch], arch == "flux"
    model = _model(arch)
    encoded, _ = _prompt_set(comfy, clip)
    positive = _encode(clip, "the workflow's own prompt", guidance)
    negative = _encode(clip, "", guidance)
    together, _, summary = _calibrate(comfy, model, positive, negative, prompt_set=encoded)
    merged = None
    for text in encoded.prompts.calibration:
        one, _, _ = _calibrate(comfy, model, _encode(clip, text, guidance), negative)
        merged = one if merged is None else merged.merge(one)
    assert merged is not None and set(together.layers) == set(merged.layers)
    for name, layer in together.layers.items():
        assert layer.tokens == merged[name].tokens
        torch.testing.assert_close(
            layer.activation_sq_mean, merged[name].activation_sq_mean, rtol=1e-5, atol=1e-9
        )
    assert together.settings["record"]["prompts"] == list(encoded.prompts.calibration)
    assert merged.settings["record"]["prompt_count"] == 3
    assert "3 sampler run(s) (3 prompt(s) x 1 seed(s) x 1 size(s)) x 2 steps = 6 model calls" in summary

    prompts_mod, common = _module(comfy, "prompts"), _module(comfy, "common")
    dm = model.model.diffusion_model
    names = list(together.layers)[:3]
    run = common.SamplerRun(positive, negative, empty_latent(), 0, 2, 1.0, "euler", "simple")
    plan = prompts_mod.CalibrationPlan.of(run, encoded, dm)
    with Calibrator(dm, {n: dm.get_submodule(n) for n in names}, weighting="log", grams=names) as cal:
        prompts_mod.sample_plan(cal, model, plan, common.Progress())
    grams = {n: cal.gram(n) for n in names}
    accs: dict[str, Any] = {}
    for _label, one_run in plan.runs():
        with Calibrator(dm, {n: dm.get_submodule(n) for n in names}, weighting="log", grams=names) as one:
            common.sample_calibrating(one, model, one_run)
        for n in names:
            acc = one._grams[n]
            if n in accs:
                accs[n].merge(acc)
            else:
                accs[n] = acc
    for n in names:
        torch.testing.assert_close(grams[n], accs[n].finalize(), rtol=1e-5, atol=1e-7)


def test_seeds_and_sizes_multiply_the_runs(
    comfy: Comfy, clips: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = clips["flux"]
    model = _model("flux")
    encoded, _ = _prompt_set(comfy, clip, text="one\ntwo", seeds_per_prompt=2, sizes="64x64, 32x64")
    calls: list[tuple[int, tuple[int, ...]]] = []
    original = comfy.nodes.common_ksampler

    def counting(m: Any, seed: int, *args: Any) -> Any:
        calls.append((seed, tuple(args[-1]["samples"].shape)))
        return original(m, seed, *args)

    monkeypatch.setattr(comfy.nodes, "common_ksampler", counting)
    stats, _, summary = _calibrate(
        comfy,
        model,
        _encode(clip, "x", True),
        _encode(clip, "", True),
        prompt_set=encoded,
        seed=5,
    )
    assert len(calls) == 2 * 2 * 2
    assert {c[0] for c in calls} == {5, 6}
    assert {c[1] for c in calls} == {(1, 16, 8, 8), (1, 16, 8, 4)}
    record = stats.settings["record"]
    assert record["seeds"] == [5, 6] and record["sizes"] == ["32x64", "64x64"] and record["steps"] == [2]
    assert "8 sampler run(s) (2 prompt(s) x 2 seed(s) x 2 size(s))" in summary
    with pytest.raises(ValueError, match="multiples of 16"):  # refused before any prompt is encoded
        _prompt_set(comfy, clip, sizes="50x50")
    with pytest.raises(ValueError, match="image LATENT"):  # sizes on a video latent: refused up front
        video = {"samples": torch.zeros(1, 16, 2, 8, 8)}
        comfy.node("DitPruneCalibrate").execute(
            model=model,
            positive=_encode(clip, "x", True),
            negative=_encode(clip, "", True),
            latent_image=video,
            seed=0,
            **SAMPLE,
            timestep_weighting="log",
            prompt_set=encoded,
        )


def test_the_record_is_saved_merged_and_shown_by_load_calibration(
    comfy: Comfy, clips: dict[str, Any]
) -> None:
    clip = clips["sd3"]
    model = _model("sd3")
    encoded, _ = _prompt_set(comfy, clip)
    pos, neg = _encode(clip, "x", False), _encode(clip, "", False)
    first, _, _ = _calibrate(comfy, model, pos, neg, seed=3)  # one prompt, as before
    merged, _, _ = _calibrate(
        comfy, model, pos, neg, prompt_set=encoded, calibration=first, save_name="setrec"
    )
    record = merged.settings["record"]
    assert record["prompt_count"] == 4 and record["prompts"][0].startswith("conditioning ")
    assert record["prompts"][1:] == list(encoded.prompts.calibration)
    assert record["seeds"] == [0, 3] and record["prompt_sources"] == ["positive", "text box"]
    loaded, text = comfy.node("DitPruneLoadCalibration").execute(calibration_name="setrec.safetensors").args
    assert loaded.settings["record"] == record
    assert "4 prompt(s)" in text and "seeds 0, 3" in text and "a red fox in fresh snow" in text
    assert "steps 2" in text and "weighting log" in text


def test_a_set_of_another_model_family_is_refused(comfy: Comfy, clips: dict[str, Any]) -> None:
    model = _model("flux")
    sd3_set, _ = _prompt_set(comfy, clips["sd3"])
    pos, neg = _encode(clips["flux"], "x", True), _encode(clips["flux"], "", True)
    with pytest.raises(
        ValueError, match=r"another model family.*4096 wide.*positive prompt's 32.*encode the prompt set"
    ):
        _calibrate(comfy, model, pos, neg, prompt_set=sd3_set)
    with pytest.raises(ValueError, match="another model family"):
        _reconstruct(comfy, model, pos, neg, prompt_set=sd3_set)
    # positive and the set both SD3's, the MODEL FLUX's: the model's text input names the mismatch
    sd3_pos = _encode(clips["sd3"], "x", False)
    with pytest.raises(ValueError, match="this MODEL's text input takes 32: another model family"):
        _calibrate(comfy, model, sd3_pos, sd3_pos, prompt_set=sd3_set)


# --- Prune and Reconstruct over a set -------------------------------------------------------------


def _reconstruct(comfy: Comfy, model: Any, positive: list, negative: list, **kw: Any) -> Any:
    args = {
        "seed": 0,
        **SAMPLE,
        "steps": 1,
        "timestep_weighting": "log",
        "metric": "energy",
        "sparsity": 0.5,
        **APPLY,
        "layer_regex": "",
        "memory_budget_gb": 0.0,
        "block_refine_steps": 0,
        **kw,
    }
    return (
        comfy.node("DitPrunePruneAndReconstruct")
        .execute(model=model, positive=positive, negative=negative, latent_image=empty_latent(), **args)
        .args
    )


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_reconstruct_samples_every_prompt_in_every_pass(
    comfy: Comfy, clips: dict[str, Any], arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip, guidance = clips[arch], arch == "flux"
    model = _model(arch)
    encoded, _ = _prompt_set(comfy, clip)
    texts = {id(c[0][0]): k for k, c in enumerate(encoded.calibration)}
    calls: list[int] = []
    original = comfy.nodes.common_ksampler

    def counting(
        m: Any, seed: int, steps: int, cfg: float, sa: str, sc: str, positive: list, *rest: Any
    ) -> Any:
        calls.append(texts[id(positive[0][0])])
        if guidance:
            assert positive[0][1]["guidance"] == 3.5  # positive's settings apply to every prompt
        return original(m, seed, steps, cfg, sa, sc, positive, *rest)

    monkeypatch.setattr(comfy.nodes, "common_ksampler", counting)
    shown: list[str] = []
    monkeypatch.setattr(_module(comfy, "common"), "show_text", shown.append)
    dm = model.model.diffusion_model
    linears = [m for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear) and "attn." in n]
    grams = [m.in_features**2 * 4 for m in linears]
    budget_gb = max(max(grams), sum(grams) / 2.5) / (1 << 30)  # a few passes
    pos, neg = _encode(clip, "x", guidance), _encode(clip, "", guidance)
    pruned, report = _reconstruct(
        comfy,
        model,
        pos,
        neg,
        prompt_set=encoded,
        memory_budget_gb=budget_gb,
        block_refine_steps=2 if guidance else 0,
        layer_regex=r"attn\.",  # the attention layers only: the passes are about the prompts, not the maths
    )
    passes = int(report.splitlines()[0].split()[0])
    blocks = sum("refined: output error" in line for line in report.splitlines())
    assert passes > 1 and (blocks > 0) == guidance  # block refinement: on FLUX (it is slow on CPU)
    runs = passes + blocks
    assert calls == [0, 1, 2] * runs  # every prompt, in order, in every pass and block refinement
    assert (
        f"{runs} calibration runs of the set ({passes} pass(es) + {blocks} block refinement(s)) = "
        f"{3 * runs} sampler runs" in report
    )
    assert "3 sampler run(s) (3 prompt(s) x 1 seed(s) x 1 size(s)) x 1 steps" in report.splitlines()[1]
    assert any("calibration pass 2 of" in s and "prompt 3 of 3" in s for s in shown)
    assert not guidance or any("refining" in s or "recording its calls" in s for s in shown)
    assert pruned.model_options["ditprune"]["calibration"]["prompt_count"] == 3


def test_old_workflows_without_the_new_inputs(comfy: Comfy, clips: dict[str, Any]) -> None:
    """Old UI workflows store widgets by position, API prompts by name: every input the prompt sets
    added is optional (ComfyUI's validation asks only for required ones) and comes after every old
    input; the nodes run without them exactly as before (one prompt)."""
    for node_id in ("DitPruneCalibrate", "DitPrunePruneAndReconstruct"):
        spec = comfy.node(node_id).INPUT_TYPES()
        names = [*spec["required"], *spec.get("optional", {})]
        assert names[-1] == "prompt_set" and "prompt_set" not in spec["required"]
    clip = clips["flux"]
    model = _model("flux")
    pos, neg = _encode(clip, "x", True), _encode(clip, "", True)
    old_style = {"seed": 0, **SAMPLE, "steps": 2, "timestep_weighting": "log", "save_name": ""}
    stats, latent, _ = (
        comfy.node("DitPruneCalibrate")
        .execute(model=model, positive=pos, negative=neg, latent_image=empty_latent(), **old_style)
        .args
    )
    (by_hand,) = comfy.nodes.common_ksampler(model, 0, 2, 1.0, "euler", "simple", pos, neg, empty_latent())
    assert torch.equal(latent["samples"], by_hand["samples"])  # one run, the same as before
    assert stats.settings["record"]["prompt_count"] == 1
    _pruned, report = _reconstruct(comfy, model, pos, neg)
    assert "1 sampler run(s) (1 prompt(s)" in report


# --- interrupts -----------------------------------------------------------------------------------


def _interrupt_after(comfy: Comfy, monkeypatch: pytest.MonkeyPatch, runs: int) -> None:
    import comfy.model_management as mm

    original = comfy.nodes.common_ksampler
    count = [0]

    def interrupting(*args: Any) -> Any:
        out = original(*args)
        count[0] += 1
        if count[0] == runs:
            mm.interrupt_current_processing(True)  # the user presses Cancel during the set
        return out

    monkeypatch.setattr(comfy.nodes, "common_ksampler", interrupting)


def _hooks(model: Any) -> int:
    return sum(len(m._forward_hooks) for m in model.model.diffusion_model.modules())


@pytest.mark.parametrize("node", ["calibrate", "reconstruct"])
def test_an_interrupt_mid_set_leaves_nothing_behind(
    comfy: Comfy, clips: dict[str, Any], node: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import comfy.model_management as mm

    from ditprune_core.calibrate import Calibrator  # noqa: F401  (hooks are the Calibrator's)

    clip = clips["flux"]
    model = _model("flux")
    encoded, _ = _prompt_set(comfy, clip)
    pos, neg = _encode(clip, "x", True), _encode(clip, "", True)
    weights = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    before = (dict(model.patches), dict(model.model_options), _hooks(model))
    _interrupt_after(comfy, monkeypatch, 2)
    folder = _module(comfy, "common").calibration_dir()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            if node == "calibrate":
                _calibrate(comfy, model, pos, neg, prompt_set=encoded, save_name="interrupted")
            else:
                _reconstruct(comfy, model, pos, neg, prompt_set=encoded)
    finally:
        mm.interrupt_current_processing(False)
    assert (dict(model.patches), dict(model.model_options), _hooks(model)) == before
    for k, v in model.model.diffusion_model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert not list(folder.glob("interrupted*")) and not list(folder.glob("*.tmp*"))


# --- the held-out check ---------------------------------------------------------------------------


def _check(comfy: Comfy, model: Any, pruned: Any, encoded: Any, neg: list, **kw: Any) -> Any:
    args = {
        "seed": 4,
        "steps": 2,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "simple",
        "held_out_prompts": 2,
        "seen_prompts": 2,
        **kw,
    }
    return (
        comfy.node("DitPruneHeldOutCheck")
        .execute(
            model=model,
            pruned_model=pruned,
            prompt_set=encoded,
            negative=neg,
            latent_image=empty_latent(),
            **args,
        )
        .args
    )


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_held_out_figures_equal_a_hand_computation(comfy: Comfy, clips: dict[str, Any], arch: str) -> None:
    clip, guidance = clips[arch], arch == "flux"
    model = _model(arch)
    encoded, _ = _prompt_set(comfy, clip)
    pos, neg = _encode(clip, "x", guidance), _encode(clip, "", guidance)
    stats, _, _ = _calibrate(comfy, model, pos, neg, prompt_set=encoded)
    pruned, _, _ = apply(comfy, model, saliency(comfy, stats), 0.5)
    text, grid = _check(comfy, model, pruned, encoded, neg, positive=pos)
    expected = {}
    for held, prompts, conds in (
        (True, encoded.prompts.held_out, encoded.held_out),
        (False, encoded.prompts.calibration[:2], encoded.calibration[:2]),  # 2 of 3: indices 0 and 1
    ):
        for prompt, cond in zip(prompts, conds, strict=False):
            if guidance:
                cond = [[c, {**o, "guidance": 3.5}] for c, o in cond]
            d = comfy.nodes.common_ksampler(model, 4, 2, 1.0, "euler", "simple", cond, neg, empty_latent())[
                0
            ]["samples"]
            p = comfy.nodes.common_ksampler(pruned, 4, 2, 1.0, "euler", "simple", cond, neg, empty_latent())[
                0
            ]["samples"]
            d64, p64 = d.double().flatten(), p.double().flatten()
            rel = float((p64 - d64).norm() / d64.norm())
            mse = float(((p64 - d64) ** 2).mean())
            db = 10 * math.log10(float(d64.max() - d64.min()) ** 2 / mse)
            expected[prompt] = (held, rel, db)
    lines = {m[3]: m for m in re.findall(r"(held-out|seen    ) rel ([\d.]+), PSNR ([\d.]+) dB: (.*)", text)}
    assert set(lines) == set(expected)
    for prompt, (held, rel, db) in expected.items():
        kind, shown_rel, shown_db, _ = lines[prompt]
        assert (kind == "held-out") == held
        assert float(shown_rel) == pytest.approx(rel, abs=6e-5) and float(shown_db) == pytest.approx(
            db, abs=6e-3
        )
    held_mean = sum(v[1] for v in expected.values() if v[0]) / 2
    seen_mean = sum(v[1] for v in expected.values() if not v[0]) / 2
    assert f"held-out (2 prompts) relative error {held_mean:.4f}" in text
    assert f"seen (2) relative error {seen_mean:.4f}" in text
    assert f"held-out / seen error {held_mean / seen_mean:.2f}" in text
    assert grid.dim() == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.shape[1] >= 4 * 64


def test_held_out_check_of_a_set_without_a_held_out_part(comfy: Comfy, clips: dict[str, Any]) -> None:
    model = _model("flux")
    encoded, _ = _prompt_set(comfy, clips["flux"], text="one\ntwo")
    with pytest.raises(ValueError, match=r"no held-out part.*'\[held-out\]'.*held_out_fraction"):
        _check(comfy, model, model, encoded, _encode(clips["flux"], "", True))
