"""No silent damage: bad statistics, bad weights and bad files are refused, naming what is wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ditprune_core import (
    CalibrationError,
    CalibrationStats,
    LayerStats,
    PruneConfig,
    apply_masks_,
    compute_masks,
    load_pruned_checkpoint,
    prune_model_,
    save_pruned_checkpoint,
    score_layer,
)
from ditprune_core.mask import layer_keep_mask
from ditprune_core.save import CheckpointError, validate_compressed_state
from ditprune_core.stats import stats_from_batches, weight_sample_hash

F8 = torch.float8_e4m3fn


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32)) for _ in range(2))


def _layer_stats(
    a: torch.Tensor, layer: nn.Linear, tokens: int = 10, weight_total: float = 10.0
) -> LayerStats:
    return LayerStats(
        a, a.numel(), layer.out_features, tokens, weight_total, weight_sample_hash(layer.weight)
    )


@pytest.mark.parametrize(
    ("value", "why"), [(math.nan, "nan"), (math.inf, "inf"), (-1.0, r"-1\.0")], ids=["nan", "inf", "neg"]
)
def test_bad_statistics_are_refused_where_they_enter(tmp_path, value, why) -> None:
    net = _Net()
    layer = net.blocks[0][0]
    a = torch.ones(32, dtype=torch.float64)
    a[5] = value
    # construction
    with pytest.raises(CalibrationError, match=rf"'blocks\.0\.0'.*channel 5 .*{why}"):
        CalibrationStats({"blocks.0.0": _layer_stats(a, layer)}, "generic")
    # from batches
    x = torch.ones(4, 32)
    x[0, 5] = value if value > 0 or math.isnan(value) else math.nan
    with pytest.raises(CalibrationError, match="channel 5"):
        stats_from_batches({"blocks.0.0": layer}, [{"blocks.0.0": x}])
    # scoring a raw tensor
    with pytest.raises(CalibrationError, match="channel 5"):
        score_layer("wanda", layer.weight, a)
    # a file whose tensor says so (written by hand, without checksums)
    good = stats_from_batches({"blocks.0.0": layer}, [{"blocks.0.0": torch.ones(4, 32)}])
    path = good.save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta.pop("tensor_crc32")
    save_file({"blocks.0.0": a}, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(CalibrationError, match=r"bad\.safetensors.*channel 5"):
        CalibrationStats.load(tmp_path / "bad.safetensors")


def test_zero_weight_total_and_no_tokens_are_refused() -> None:
    layer = _Net().blocks[0][0]
    a = torch.ones(32, dtype=torch.float64)
    with pytest.raises(CalibrationError, match=r"weight total 0\.0 must be positive"):
        CalibrationStats({"l": _layer_stats(a, layer, weight_total=0.0)}, "generic")
    with pytest.raises(CalibrationError, match="token count 0"):
        CalibrationStats({"l": _layer_stats(a, layer, tokens=0)}, "generic")


def test_calibration_file_errors_name_the_file(tmp_path) -> None:
    layer = _Net().blocks[0][0]
    good = stats_from_batches({"blocks.0.0": layer}, [{"blocks.0.0": torch.ones(4, 32)}])
    path = good.save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensor = f.metadata(), f.get_tensor("blocks.0.0")
    cases = {
        "notjson": ({"layers": "{"}, "not JSON"),
        "deep": ({"layers": "[" * 100_000 + "]" * 100_000}, "not JSON|JSON maps"),
        "typed": (
            {"layers": json.dumps({"blocks.0.0": {"in_features": "32"}})},
            "not what Calibrator writes",
        ),
        "total": (
            {
                "layers": json.dumps(
                    {
                        "blocks.0.0": {
                            "in_features": 32,
                            "out_features": 32,
                            "tokens": 4,
                            "weight_total": 0,
                            "weight_sample": "x",
                        }
                    }
                )
            },
            "weight total 0.0 must be positive",
        ),
    }
    for name, (changes, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file({"blocks.0.0": tensor}, str(bad), metadata={**meta, **changes})
        with pytest.raises(CalibrationError, match=rf"{name}\.safetensors.*({message})"):
            CalibrationStats.load(bad)
    # one flipped bit of data: the checksum refuses it
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(CalibrationError, match=r"flipped\.safetensors: tensor 'blocks\.0\.0' is corrupted"):
        CalibrationStats.load(flipped)


def test_non_finite_weights_are_refused_with_the_layer_name() -> None:
    w = torch.randn(8, 8)
    w[2, 3] = math.nan
    with pytest.raises(ValueError, match=r"layer 'blocks\.1\.x' has a non-finite weight at \[2, 3\]"):
        layer_keep_mask("blocks.1.x", w, None, PruneConfig(0.5, metric="magnitude"))
    w8 = torch.randn(16, 32)
    w8[0, 0] = math.inf
    with pytest.raises(CheckpointError, match=r"'w': a kept value is inf"):
        save_pruned_checkpoint({"w": w8 * (w8.abs() > 1)}, "/nonexistent/x.safetensors", value_dtype=F8)


def test_fp8_weights_prune_and_round_trip_bit_exact(tmp_path) -> None:
    net = _Net()
    for layer in (net.blocks[0][0], net.blocks[1][0]):
        layer.weight.data = layer.weight.data.to(F8)
    before = net.blocks[0][0].weight.detach().view(torch.uint8).clone()
    # fp8 at 50% is no smaller as a bitmask (1 byte a value): 80% is
    config = PruneConfig(0.8, metric="magnitude", families=("block_linear",))
    masks = compute_masks(net, None, config)
    apply_masks_(net, masks)
    keep = masks["blocks.0.0"]
    after = net.blocks[0][0].weight.detach().view(torch.uint8)
    assert torch.equal(after[keep], before[keep]) and bool((after[~keep] == 0).all())
    report = prune_model_(_with_fp8(_Net()), None, PruneConfig(0.5, metric="magnitude", pattern="2:4"))
    assert report.sparsity == 0.5
    state = {k: v for k, v in net.state_dict().items()}
    for values in (None, F8):
        path = tmp_path / f"fp8-{values}.safetensors"
        saved = save_pruned_checkpoint(state, path, value_dtype=values)
        assert set(saved.layouts) == {"blocks.0.0.weight", "blocks.1.0.weight"}
        back = load_pruned_checkpoint(path)
        for k, v in state.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)), k


def _with_fp8(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.to(F8)
    return net


def _saved(tmp_path, pattern: str = "unstructured") -> tuple:
    w = torch.randn(32, 64)
    keep = layer_keep_mask("w", w, None, PruneConfig(0.5, metric="magnitude", pattern=pattern))
    path = tmp_path / f"c{pattern.replace(':', '')}.safetensors"
    save_pruned_checkpoint({"w": w * keep, "bias": torch.ones(4)}, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return path, meta, data


def _write(tmp_path, name, meta, data, drop_checksums=True):
    meta = dict(meta)
    if drop_checksums:
        meta.pop("tensor_crc32", None)
        meta.pop("layouts_crc32", None)
    out = tmp_path / name
    save_file(data, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m, d: d.pop("w"), r"'w' has no placeholder key"),
        (lambda m, d: d.__setitem__("v", d.pop("w")), r"'w' has no placeholder key"),
        (lambda m, d: d.pop("w.row_offsets"), r"'w' has no 'row_offsets' piece"),
        (
            lambda m, d: d.__setitem__("w.nm_codes", torch.zeros(1, dtype=torch.uint8)),
            "not a piece of the bitmask",
        ),
        (lambda m, d: m.pop("layouts"), "no 'layouts' map"),
        (lambda m, d: m.__setitem__("layouts", "{"), "'layouts' metadata is not valid JSON"),
        (lambda m, d: m.__setitem__("layouts", "[" * 50_000 + "]" * 50_000), "not valid JSON|not a map"),
        (
            lambda m, d: m.__setitem__("layouts", json.dumps({"w": {"layout": "bitmask"}})),
            "must hold the strings",
        ),
        (
            lambda m, d: m.__setitem__(
                "layouts", json.dumps({"w": {"layout": "bitmask", "dtype": "/float16", "values": "/float16"}})
            ),
            "unknown dtype '/float16'",
        ),
        (lambda m, d: d.__setitem__("w.shape", torch.tensor([32.0, math.nan])), "'shape' piece must be two"),
        (lambda m, d: d.__setitem__("w.shape", torch.tensor([32, 64, 1])), "'shape' piece must be two"),
        (lambda m, d: d.__setitem__("w.shape", torch.tensor([32, 10**9])), "does not fit its shape"),
        (lambda m, d: d.__setitem__("w.bitmask", d["w.bitmask"][:, :4].clone()), "does not fit its shape"),
    ],
)
def test_crafted_checkpoints_are_refused_naming_file_and_key(tmp_path, change, message) -> None:
    _path, meta, data = _saved(tmp_path)
    change(meta, data)
    bad = _write(tmp_path, "bad.safetensors", meta, data)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*({message})"):
        load_pruned_checkpoint(bad)
    if "layouts" in meta and meta["layouts"].startswith('{"w": {"layout": "bitmask", "dtype": "bfloat16"'):
        # compressed-on-device validation refuses it too, decoding nothing
        with pytest.raises(CheckpointError, match=rf"bad\.safetensors.*({message})"):
            validate_compressed_state(data, bad)


def test_two_four_codes_out_of_range_and_wrong_dtype(tmp_path) -> None:
    _path, meta, data = _saved(tmp_path, "2:4")
    codes = data["w.nm_codes"].clone()
    codes[0, 0] = 216
    bad = _write(tmp_path, "codes.safetensors", meta, {**data, "w.nm_codes": codes})
    with pytest.raises(CheckpointError, match=r"codes\.safetensors: 'w': invalid 2:4 codes"):
        load_pruned_checkpoint(bad)
    with pytest.raises(CheckpointError, match="invalid 2:4 codes"):
        validate_compressed_state({**data, "w.nm_codes": codes}, bad)
    signed = _write(
        tmp_path, "int8.safetensors", meta, {**data, "w.nm_codes": data["w.nm_codes"].to(torch.int8)}
    )
    with pytest.raises(CheckpointError, match="2:4 pieces do not fit"):
        load_pruned_checkpoint(signed)


def test_flipped_data_bits_are_detected_by_checksums(tmp_path) -> None:
    path, _meta, _data = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0x01  # inside the last tensor's data
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"flipped\.safetensors: tensor .* is corrupted \(CRC32"):
        load_pruned_checkpoint(flipped)
    with safe_open(str(flipped), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with pytest.raises(CheckpointError, match="is corrupted"):
        validate_compressed_state(state, flipped)


def test_keys_colliding_with_our_pieces_are_refused_at_save(tmp_path) -> None:
    w = torch.randn(32, 64)
    w = w * (w.abs() > 0.7)
    with pytest.raises(ValueError, match=r"'w\.shape' collides with a piece of the compressed weight 'w'"):
        save_pruned_checkpoint({"w": w, "w.shape": torch.zeros(2)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="__metadata__"):
        save_pruned_checkpoint({"__metadata__": torch.zeros(2)}, tmp_path / "b.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written
