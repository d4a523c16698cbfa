"""Pieces of the low-bit benchmarks that can be checked by hand (the benchmarks themselves are commands)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.pareto import flux_bytes, flux_gb
from bench.quant_groups import Point, choose_defaults, frontier
from ditprune_core.calibrate import recording_grams
from ditprune_core.dit_shapes import FLUX_REST, FLUX_SHAPES
from ditprune_core.quantize import QuantSpec


def test_recording_grams_is_the_mean_outer_product_and_unhooks() -> None:
    layer = nn.Linear(2, 1)
    with recording_grams({"l": layer}, dtype=torch.float64) as rec, torch.no_grad():
        layer(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        layer(torch.tensor([[[0.0, 1.0]]]))  # (batch, tokens, channels) inputs flatten
    # (x x^T summed: [1 2; 2 4] + [9 0; 0 0] + [0 0; 0 1]) / 3 tokens
    # the core's running weighted mean: equal to the sum over tokens up to float64 rounding
    assert rec.grams()["l"].flatten().tolist() == pytest.approx([10 / 3, 2 / 3, 2 / 3, 5 / 3], rel=1e-12)
    assert not layer._forward_hooks


def _p(bits: int, g: int, bpw: float, err: float) -> Point:
    return Point("m", "dense", bits, g, True, "-", bpw, err)


def test_frontier_and_defaults_rule() -> None:
    a, b, c, d = _p(4, 32, 4.5, 0.010), _p(4, 128, 4.1, 0.012), _p(3, 16, 4.0, 0.020), _p(3, 64, 3.2, 0.030)
    e = _p(4, 16, 5.0, 0.011)  # beaten by a: more bits, more error
    assert frontier([a, b, c, d, e]) == [d, c, b, a]
    # error x 4^bpw: a 0.010 x 4^4.5 = 5.12, b 0.012 x 4^4.1 = 0.012 x 294.1 = 3.53 -> b;
    # c 0.020 x 256 = 5.12, d 0.030 x 4^3.2 = 0.030 x 84.4 = 2.53 -> d
    chosen = choose_defaults([a, b, c, d, e], (4, 3, 2))
    assert chosen == {4: b, 3: d}
    # halving the error for half a bit pays (a quarter per bit would be the break-even)
    f = _p(3, 16, 3.7, 0.014)
    assert choose_defaults([d, f], (3,))[3] is f


def test_flux_projection_matches_the_known_files() -> None:
    # ComfyUI's fp8 FLUX.1-dev is 11.9 GB: every parameter in one byte; fp8 values with Save's
    # remainder fp8 add a second byte for the 67M kept in bf16 (embedders, final layer, norms, biases)
    assert flux_gb(flux_bytes(None, None, 8))[1] == pytest.approx(11.9 + 0.067, abs=0.05)
    # bf16: 23.8 GB
    assert flux_gb(flux_bytes(None, None, 16))[0] == pytest.approx(23.8, abs=0.05)
    # dense 4-bit groups of 64, symmetric: 4.25 bits + a 16-byte shape and a 16-byte spec piece per layer
    # 19 double blocks x (img, txt) x (qkv, proj, mlp.0, mlp.2) + 38 single blocks x 2:
    # 2 x 38 x 4 x 3072^2 (qkv + proj) + 2 x 38 x 8 x 3072^2 (mlp) ... = 8.607B parameters
    assert sum(r * c * n for (r, c), n in FLUX_SHAPES.items()) == 8_606_711_808
    layers = 19 * 2 * 4 + 38 * 2
    assert sum(FLUX_SHAPES.values()) == layers
    assert flux_bytes(QuantSpec(4, 64), None) == 8_606_711_808 * 4.25 / 8 + 32 * layers
    assert FLUX_REST == 11_901_408_320 - 8_606_711_808


def test_the_held_out_split_is_disjoint_and_deterministic() -> None:
    from bench.refine_holdout import SPLITS, class_split

    for split in SPLITS:
        seen, held = class_split(split)
        assert not set(seen) & set(held) and sorted(seen + held) == list(range(10))
        assert class_split(split) == (seen, held)
    assert class_split((0, 1, 2, 3, 4)) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert class_split(SPLITS[1])[1] == list(SPLITS[0])  # the swap holds out the other half
    with pytest.raises(ValueError, match="none is left to hold out"):
        class_split(range(10))
    with pytest.raises(ValueError, match=r"must be in 0\.\.9"):
        class_split([3, 12])
