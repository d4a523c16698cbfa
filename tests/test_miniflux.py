"""The shipped MiniFlux test-bed: it loads, draws recognisable digits, and prunes end to end."""

from __future__ import annotations

import pytest
import torch

from ditprune_core import PruneConfig, apply_masks_, compute_masks, find_prunable_layers
from ditprune_core.miniflux.judge import frechet_distance, load_judge
from ditprune_core.miniflux.model import MiniFluxConfig, patchify, unpatchify
from ditprune_core.miniflux.pipeline import MiniFluxPipeline, bundled_checkpoints, calibrate, load_bundled
from ditprune_core.miniflux.train import RECIPES
from ditprune_core.util.metrics import psnr, relative_error, relative_squared_error


def test_bundled_checkpoints_are_small_and_load() -> None:
    for name, path in bundled_checkpoints().items():
        assert path.stat().st_size <= 10 * 1024 * 1024, name
        pipe = load_bundled(name)
        assert pipe.model.config == RECIPES[name].config
    with pytest.raises(ValueError, match="unknown MiniFlux checkpoint"):
        load_bundled("miniflux-z")


def test_dense_miniflux_draws_the_requested_digits() -> None:
    pipe = load_bundled("miniflux-a")
    labels = torch.arange(10).repeat(3)
    images = pipe.sample(labels, seed=0, steps=12, cfg=2.0)
    assert images.shape == (30, 1, 8, 8)
    assert load_judge().accuracy(images, labels) >= 0.9


def test_patchify_round_trip() -> None:
    x = torch.randn(2, 1, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 4)
    assert torch.equal(unpatchify(tokens, 2, 8), x)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MiniFluxConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="even"):
        MiniFluxConfig(hidden_size=16, num_heads=2, axes_dim=(2, 3, 3))


def test_checkpoint_round_trip(tmp_path) -> None:
    pipe = load_bundled("miniflux-b")
    path = tmp_path / "m.safetensors"
    pipe.save(path)
    again = MiniFluxPipeline.load(path)
    for (k, v), (_, w) in zip(pipe.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(FileExistsError):
        pipe.save(path)


def test_prune_miniflux_end_to_end() -> None:
    pipe = load_bundled("miniflux-b")
    stats = calibrate(pipe, seeds=(5,), per_class=2, steps=4)
    masks = compute_masks(pipe.model, stats, PruneConfig(0.5))
    assert set(masks) == set(find_prunable_layers(pipe.model))
    labels = torch.arange(10)
    dense = pipe.sample(labels, seed=1, steps=8)
    apply_masks_(pipe.model, masks)
    pruned = pipe.sample(labels, seed=1, steps=8)
    err = relative_error(pruned, dense)
    assert 0.0 < err < 0.6


def test_evaluation_measures_by_hand() -> None:
    a = torch.tensor([[3.0, 4.0]])
    assert relative_error(a * 1.1, a) == pytest.approx(0.1)
    assert relative_error(torch.tensor([[3.0, 5.0]]), a) == pytest.approx(0.2)
    # per sample: (1^2) / 25 = 0.04 and (0.3^2 + 0.4^2) / 25 = 0.01 -> mean 0.025 (not 0.15^2)
    two = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    assert relative_squared_error(torch.tensor([[3.0, 5.0], [3.3, 4.4]]), two) == pytest.approx(0.025)
    # mse 0.01 over range 2 -> 10 log10(4 / 0.01) = 26.02 dB
    assert psnr(torch.full((1, 4), 0.1), torch.zeros(1, 4)) == pytest.approx(26.0206, abs=1e-3)
    mu, cov = torch.zeros(2).numpy(), torch.eye(2).numpy()
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    # shifted mean by (1, 1), covariances I and 4I: 2 + (2 + 8 - 2 * 2 * 2) = 4
    assert frechet_distance(mu, cov, mu + 1, 4 * cov) == pytest.approx(4.0)
