"""MiniFlux-C, the third test-bed: its size, FLUX names, procedural data, judge, trainer and card."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ditprune_core.layers import FLUX, detect_architecture, find_prunable_layers
from ditprune_core.miniflux.card import COMMAND as CARD_COMMAND
from ditprune_core.miniflux.card import (
    CardEntry,
    checkpoint_facts,
    facts_from_json,
    render_card,
)
from ditprune_core.miniflux.data import DigitStyle, draw_digits, procedural_digits, render_digits
from ditprune_core.miniflux.judge import load_judge
from ditprune_core.miniflux.model import MiniFluxConfig
from ditprune_core.miniflux.pipeline import bundled_checkpoints, load_bundled
from ditprune_core.miniflux.train import RECIPES, Recipe, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe_c():
    return load_bundled("miniflux-c")


def test_miniflux_c_is_the_size_the_issue_asks_for(pipe_c) -> None:
    cfg = pipe_c.config
    params = sum(p.numel() for p in pipe_c.model.parameters())
    assert params == 4_693_520  # >= 4M: hidden 256, 1 double + 2 single blocks, MLP 1024
    assert cfg.hidden_size == 256 and cfg.depth == 1 and cfg.depth_single_blocks == 2
    noise = pipe_c.initial_noise(2, seed=0)
    assert noise.shape == (2, 64, 16)  # 64 image tokens: 32x32 in 4x4 patches of one channel
    assert pipe_c.to_images(noise).shape == (2, 1, 32, 32)
    assert all(p.dtype == torch.float32 for p in pipe_c.model.parameters())
    path = bundled_checkpoints()["miniflux-c"]
    assert path.stat().st_size < 10 * 1024 * 1024
    with safe_open(str(path), framework="pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys() if not k.startswith("conditioner.")}  # noqa: SIM118
    assert dtypes == {"BF16"}


def test_every_bundled_checkpoint_is_package_data() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "ditprune_core"
    ]
    for name, path in bundled_checkpoints().items():
        relative = path.relative_to(REPO / "ditprune_core").as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), (name, relative, patterns)


def test_miniflux_c_has_flux_layer_names(pipe_c) -> None:
    assert detect_architecture(pipe_c.model) is FLUX
    linears = [n for n, m in pipe_c.model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(FLUX.family_of(n) is not None for n in linears), [
        n for n in linears if FLUX.family_of(n) is None
    ]
    prunable = find_prunable_layers(pipe_c.model)
    assert "double_blocks.0.img_attn.qkv" in prunable and "single_blocks.1.linear2" in prunable
    assert prunable["single_blocks.0.linear1"].weight.shape == (256 * 3 + 1024, 256)


def test_procedural_digits_are_deterministic_and_cover_ten_classes() -> None:
    a, la = procedural_digits(64, seed=3)
    b, lb = procedural_digits(64, seed=3)
    c, _ = procedural_digits(64, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (64, 1, 32, 32) and a.min() >= -1.0 and a.max() <= 1.0
    assert set(procedural_digits(400, seed=0)[1].tolist()) == set(range(10))
    # the background is black whatever the stroke width (the soft step is shifted to 0 there):
    # in every image at least a third of the pixels are within 0.01 of -1
    assert ((a <= -0.99).float().mean(dim=(1, 2, 3)) >= 1 / 3).all()
    _, only = procedural_digits(50, seed=1, classes=(5, 6))
    assert set(only.tolist()) <= {5, 6}
    # one generator, two calls: the trainer's stream is reproducible too
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    first = [draw_digits(8, g1)[0] for _ in range(2)]
    second = [draw_digits(8, g2)[0] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])


def test_stroke_threshold_changes_the_stroke_width() -> None:
    digit = torch.zeros(1, 1, 8, 8)
    digit[0, 0, 1:7, 3:5] = 1.0  # a vertical bar
    ink = []
    for low in (0.2, 0.6):
        style = DigitStyle(
            max_rotation_deg=0, scale=(1, 1), max_shear=0, max_shift=0, stroke_threshold=(low, low)
        )
        image = render_digits(digit, torch.Generator().manual_seed(0), style)
        ink.append(int((image > 0).sum()))
    assert ink[0] > ink[1] > 0  # the lower threshold draws the thicker bar


def test_bad_procedural_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"DigitStyle\.size"):
        DigitStyle(size=4)
    with pytest.raises(ValueError, match=r"DigitStyle\.scale"):
        DigitStyle(scale=(1.2, 1.0))
    with pytest.raises(ValueError, match="no source digit has a class in"):
        procedural_digits(4, seed=0, classes=(12,))
    with pytest.raises(ValueError, match=r"wants \(N, 1, H, W\)"):
        render_digits(torch.zeros(8, 8), torch.Generator())
    with pytest.raises(ValueError, match="multiple of 8"):
        load_judge(12)


def test_the_32px_judge_recognises_fresh_procedural_digits() -> None:
    images, labels = procedural_digits(300, seed=5)  # not the judge's seed
    assert load_judge(32).accuracy(images, labels) >= 0.97


def test_judge_recognises_miniflux_c_samples(pipe_c) -> None:
    labels = torch.arange(10).repeat(3)
    images = pipe_c.sample(labels, seed=0, steps=12, cfg=2.0)
    assert images.shape == (30, 1, 32, 32)
    assert load_judge(32).accuracy(images, labels) >= 0.9


def test_constant_schedule_run_stopped_early_is_the_shorter_run() -> None:
    """A constant-LR run logged at step 2 has the weights of the 2-step run (a stopped run is honest)."""
    tiny = MiniFluxConfig(
        hidden_size=16, num_heads=2, axes_dim=(2, 2, 4), depth=1, depth_single_blocks=1,
        image_size=16, patch_size=4, in_channels=16,
    )  # fmt: skip
    recipe = Recipe(tiny, seed=3, steps=4, batch=4, data="procedural", warmup=2, schedule="constant")
    seen = []
    long_pipe, long_record = train(
        recipe,
        log_every=2,
        on_log=lambda p, r: seen.append(({k: v.clone() for k, v in p.model.state_dict().items()}, r)),
    )
    short_pipe, short_record = train(replace(recipe, steps=2), log_every=2)
    at_two, record_at_two = seen[0]
    assert record_at_two.steps == 2 and long_record.steps == 4 and short_record.steps == 2
    for key, value in short_pipe.model.state_dict().items():
        assert torch.equal(value, at_two[key]), key
    assert not torch.equal(long_pipe.model.img_in.weight, short_pipe.model.img_in.weight)
    assert [s for s, _ in long_record.loss_curve] == [2, 4]


def test_recipe_c_is_the_bundled_checkpoints() -> None:
    facts = checkpoint_facts("miniflux-c")
    assert facts.training is not None
    assert facts.training["recipe"] == "miniflux-c"
    assert facts.training["batch"] == RECIPES["miniflux-c"].batch
    assert facts.recipe["steps"] == facts.training["steps"]
    assert facts.training["final_loss"] < facts.training["loss_curve"][0][1]  # it learned


def test_card_is_the_rendering_of_the_bundled_checkpoints_facts() -> None:
    """docs/TESTBEDS.md is render_card(docs/bench/testbeds.json), and the JSON's checkpoint facts
    are what the bundled checkpoints say now (the judged accuracy is regenerated by the card command)."""
    raw = json.loads((REPO / "docs" / "bench" / "testbeds.json").read_text())
    entries: list[CardEntry] = [facts_from_json(r) for r in raw]
    assert [e.checkpoint.name for e in entries] == sorted(bundled_checkpoints())
    for entry in entries:
        assert entry.checkpoint == checkpoint_facts(entry.checkpoint.name), entry.checkpoint.name
        assert (REPO / "docs" / "bench" / entry.grid).exists()
    card = (REPO / "docs" / "TESTBEDS.md").read_text()
    assert card == render_card(entries, CARD_COMMAND) + "\n"
    c = next(e for e in entries if e.checkpoint.name == "miniflux-c")
    assert "4,693,520" in card and c.judge_accuracy >= 0.9
