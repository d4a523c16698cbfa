from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny_miniflux_models import tiny_miniflux as _model
from tiny_miniflux_models import tiny_miniflux_forward as _run
from torch import nn

from ditprune_core import (
    CalibrationError,
    CalibrationStats,
    Calibrator,
    ChannelSquareMean,
    PruneConfig,
    compute_masks,
)
from ditprune_core.calibrate import log_timestep_weight
from ditprune_core.miniflux.model import MiniFlux, MiniFluxConfig
from ditprune_core.stats import stats_from_batches


def test_channel_square_mean_by_hand() -> None:
    acc = ChannelSquareMean(2)
    acc.add_batch(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # x^2 means [5, 10] over 2 tokens
    assert acc.finalize().tolist() == [5.0, 10.0]
    acc.add_batch(torch.tensor([[2.0, 2.0]]), weight=3.0)  # one token counted 3 times, x^2 = [4, 4]
    # (1*1 + 1*9 + 3*4) / 5 = 4.4 ; (4 + 16 + 12) / 5 = 6.4
    assert torch.allclose(acc.finalize(), torch.tensor([4.4, 6.4], dtype=torch.float64))
    assert acc.tokens == 3
    assert acc.weight_total == 5.0


def test_running_mean_is_float64_whatever_the_input_dtype() -> None:
    acc = ChannelSquareMean(3)
    for _ in range(1000):
        acc.add_batch(torch.full((4, 3), 3.0, dtype=torch.bfloat16))
    assert acc.finalize().dtype == torch.float64
    assert torch.allclose(acc.finalize(), torch.full((3,), 9.0, dtype=torch.float64))


def test_calibrator_counts_tokens_and_matches_direct_statistics() -> None:
    model = _model()
    captured: list[torch.Tensor] = []
    layer = model.single_blocks[0].linear2
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with Calibrator(model) as cal:
        _run(model, 3, 0)
        _run(model, 2, 1)
    handle.remove()
    s = cal.stats["single_blocks.0.linear2"]
    assert s.tokens == (3 + 2) * (16 + 4)  # image + text tokens, both calls
    direct = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double().pow(2).mean(0)
    assert torch.allclose(s.activation_sq_mean, direct)
    assert cal.stats["double_blocks.0.img_mod.lin"].tokens == 5  # one vector per sample
    assert "img_in" not in cal.stats  # embedders are never calibrated by default


def test_merge_equals_concatenated_batches() -> None:
    model = _model()
    with Calibrator(model) as both:
        _run(model, 3, 0)
        _run(model, 5, 1)
    with Calibrator(model) as first:
        _run(model, 3, 0)
    with Calibrator(model) as second:
        _run(model, 5, 1)
    merged = first.stats.merge(second.stats)
    for name, s in both.stats.layers.items():
        assert merged[name].tokens == s.tokens
        assert torch.allclose(merged[name].activation_sq_mean, s.activation_sq_mean, rtol=1e-10)


def test_timestep_weighting() -> None:
    assert log_timestep_weight(1.0) == pytest.approx(1.2)
    assert log_timestep_weight(0.0) == pytest.approx(0.8)
    assert log_timestep_weight(5.0) == pytest.approx(1.2)  # clipped
    assert 0.8 < log_timestep_weight(0.1) < log_timestep_weight(0.5) < 1.2
    model = _model()
    layers = {"single_blocks.0.linear1": model.single_blocks[0].linear1}
    with Calibrator(model, layers, weighting=lambda sigma: 2.0 if sigma > 0.5 else 0.0) as cal:
        cal.set_sigma(0.9)
        _run(model, 2, 0)
        cal.set_sigma(0.1)  # weight 0: this call must not count
        _run(model, 2, 1)
    with Calibrator(model, layers) as only_first:
        _run(model, 2, 0)
    assert torch.allclose(
        cal.stats["single_blocks.0.linear1"].activation_sq_mean,
        only_first.stats["single_blocks.0.linear1"].activation_sq_mean,
    )
    with pytest.raises(ValueError, match="unknown timestep weighting"):
        Calibrator(model, weighting="cosine")


def test_hooks_are_removed_after_an_exception() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), Calibrator(model):
        _run(model, 1, 0)
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_no_tokens_is_an_error() -> None:
    model = _model()
    with Calibrator(model) as cal:
        pass
    with pytest.raises(CalibrationError, match=r"saw no tokens.*double_blocks\.0"):
        _ = cal.stats


def test_nan_activations_name_the_layer() -> None:
    model = _model()
    with torch.no_grad():
        model.double_blocks[0].img_attn.qkv.bias[0] = float("nan")
    with (
        pytest.raises(CalibrationError, match=r"layer 'double_blocks\.0\.img_attn\.proj' received NaN"),
        Calibrator(model),
    ):
        _run(model, 1, 0)
    assert all(not m._forward_hooks for m in model.modules())


def test_save_load_round_trip(tmp_path) -> None:
    model = _model()
    with Calibrator(model, weighting="log") as cal:
        cal.set_sigma(0.7)
        _run(model, 2, 0)
    path = cal.stats.save(tmp_path / "cal.safetensors")
    loaded = CalibrationStats.load(path)
    assert loaded.fingerprint == cal.stats.fingerprint
    assert loaded.settings["weighting"] == "log"
    for name, s in cal.stats.layers.items():
        assert torch.equal(loaded[name].activation_sq_mean, s.activation_sq_mean)
        assert loaded[name].tokens == s.tokens
    with pytest.raises(FileExistsError, match="already exists"):
        cal.stats.save(path)


def test_stats_from_another_model_are_refused() -> None:
    model, other = _model(0), _model(1)
    with Calibrator(model) as cal:
        _run(model, 1, 0)
    with pytest.raises(CalibrationError, match=r"weights of layer .* differ"):
        compute_masks(other, cal.stats, PruneConfig(0.5, metric="wanda"))
    wider = MiniFlux(
        MiniFluxConfig(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6))
    )
    with pytest.raises(CalibrationError, match="is 96x32 but the calibration was recorded on a 48x16"):
        compute_masks(wider, cal.stats, PruneConfig(0.5, metric="wanda"))


def test_missing_layers_are_refused() -> None:
    model = _model()
    layers = {"single_blocks.0.linear1": model.single_blocks[0].linear1}
    with Calibrator(model, layers) as cal:
        _run(model, 1, 0)
    with pytest.raises(CalibrationError, match="no statistics for 9 layer"):
        compute_masks(model, cal.stats, PruneConfig(0.5, metric="energy"))
    with pytest.raises(CalibrationError, match="needs a calibration"):
        compute_masks(model, None, PruneConfig(0.5, metric="energy"))


def test_files_that_are_not_ours(tmp_path) -> None:
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(CalibrationError, match="not a ditprune calibration"):
        CalibrationStats.load(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(CalibrationError, match="not a readable ditprune calibration"):
        CalibrationStats.load(garbage)
    with pytest.raises(CalibrationError, match="does not exist"):
        CalibrationStats.load(tmp_path / "missing.safetensors")


def test_truncated_and_future_files(tmp_path) -> None:
    model = _model()
    with Calibrator(model) as cal:
        _run(model, 1, 0)
    path = cal.stats.save(tmp_path / "cal.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(CalibrationError, match="truncated or corrupted"):
        CalibrationStats.load(cut)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"]["version"] = "99"
    new_header = json.dumps(header).encode()
    new_header += b" " * ((8 - len(new_header) % 8) % 8)
    future = tmp_path / "future.safetensors"
    future.write_bytes(len(new_header).to_bytes(8, "little") + new_header + data[8 + header_len :])
    with pytest.raises(CalibrationError, match="version '99'"):
        CalibrationStats.load(future)


def test_stats_from_batches_helper() -> None:
    layer = nn.Linear(2, 1)
    stats = stats_from_batches(
        {"blocks.0.l": layer}, [{"blocks.0.l": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}]
    )
    assert stats["blocks.0.l"].activation_sq_mean.tolist() == [5.0, 10.0]


def test_weight_samples_stay_inside_flux_sized_tensors() -> None:
    from ditprune_core.stats import strided_indices

    n = 21504 * 3072  # single_blocks.N.linear1 of FLUX.1-dev; float32 linspace overshoots here
    idx = strided_indices(n, 16)
    assert idx[0] == 0 and idx[-1] == n - 1
    assert bool((idx[1:] > idx[:-1]).all())
    assert strided_indices(3, 16).tolist() == [0, 1, 2]
