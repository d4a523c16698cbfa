"""Mixed precision's choice by hand: the rounding cost of a layer, and which layers a share upgrades."""

from __future__ import annotations

import pytest
import torch

from ditprune_core.config import PruneConfig
from ditprune_core.quantize import DEFAULT_VALUE_SPECS, fake_quantize
from ditprune_core.reconstruct import allocate_upgrades, rounding_cost

INT3 = DEFAULT_VALUE_SPECS[3]


def test_rounding_cost_is_the_energy_weighted_relative_error() -> None:
    torch.manual_seed(0)
    w, a = torch.randn(4, 128), torch.rand(128) + 0.1
    e = fake_quantize(w, INT3) - w
    expected = float((e.square() * a).sum() / (w.square() * a).sum())
    assert rounding_cost(w, a, INT3) == pytest.approx(expected, rel=1e-6)
    # scale-free: the weights' and the inputs' scales cancel (powers of two: exact in float)
    assert rounding_cost(8 * w, 4 * a, INT3) == pytest.approx(expected, rel=1e-6)
    # a weight on its grid costs nothing; a layer whose inputs are silent costs nothing
    assert rounding_cost(fake_quantize(w, INT3), a, INT3) == pytest.approx(0.0, abs=1e-12)
    assert rounding_cost(w, torch.zeros(128), INT3) == 0.0


def test_the_costliest_layers_per_weight_are_upgraded_within_the_share() -> None:
    torch.manual_seed(1)
    base = torch.randn(8, 128)  # 1024 weights
    a = torch.ones(128)
    layers = {
        "small": (base, a),
        "big": (base.repeat(4, 1), a),  # the same rows four times: the same cost, 4x the weights
        "exact": (fake_quantize(base, INT3), a),  # on the grid: cost 0
    }
    # per weight: small > big > exact; 6144 weights in all
    assert allocate_upgrades(layers, INT3, 0.2) == ("small",)  # 1228 allowed: big and exact do not fit
    assert allocate_upgrades(layers, INT3, 0.5) == ("small", "exact")  # big (4096) is passed
    assert allocate_upgrades(layers, INT3, 0.9) == ("small", "big")  # 5120; exact would make 6144
    assert allocate_upgrades(layers, INT3, 0.0) == ()
    with pytest.raises(ValueError, match="upgrade share must be in"):
        allocate_upgrades(layers, INT3, 1.0)


def test_upgrade_choices_are_checked() -> None:
    config = PruneConfig(0.5, update="obs", value_bits=3, upgrade_share=0.25)
    assert config.upgraded().value_bits == 4 and config.upgraded().upgrade_share == 0
    assert PruneConfig.from_dict(config.to_dict()) == config
    two = PruneConfig(0, update="obs", value_bits=2, upgrade_share=0.1, upgrade_bits=3)
    assert two.upgraded().value_bits == 3
    with pytest.raises(ValueError, match=r"upgrade_share must be in \[0, 1\)"):
        PruneConfig(0.5, update="obs", value_bits=3, upgrade_share=1.0)
    with pytest.raises(ValueError, match="value_bits is None: give value_bits"):
        PruneConfig(0.5, update="obs", upgrade_share=0.2)
    with pytest.raises(ValueError, match="a custom value_spec has no upgraded twin"):
        PruneConfig(0.5, update="obs", value_spec=INT3, upgrade_share=0.2)
    with pytest.raises(ValueError, match=r"upgrade_bits must be above value_bits 4, one of \[8\]; got 3"):
        PruneConfig(0.5, update="obs", value_bits=4, upgrade_share=0.2, upgrade_bits=3)
    with pytest.raises(ValueError, match=r"one of \[4, 8\]; got 2"):
        PruneConfig(0.5, update="obs", value_bits=3, upgrade_share=0.2, upgrade_bits=2)


def test_upgrade_by_name_is_checked() -> None:
    from ditprune_core.config import UPGRADE_ATTENTION

    config = PruneConfig(0, update="obs", value_bits=3, upgrade_layers=UPGRADE_ATTENTION)
    assert config.upgrades and config.upgraded().upgrade_layers is None and not config.upgraded().upgrades
    assert PruneConfig.from_dict(config.to_dict()) == config
    assert not PruneConfig(0, update="obs", value_bits=3).upgrades
    with pytest.raises(ValueError, match=r"upgrade_share .* or upgrade_layers .* not both"):
        PruneConfig(0.5, update="obs", value_bits=3, upgrade_share=0.2, upgrade_layers="qkv")
    with pytest.raises(ValueError, match=r"upgrade_layers '\(qkv' is not a valid regular expression"):
        PruneConfig(0.5, update="obs", value_bits=3, upgrade_layers="(qkv")
    with pytest.raises(ValueError, match=r"upgrade_layers 'qkv' stores some layers .* value_bits is None"):
        PruneConfig(0.5, update="obs", upgrade_layers="qkv")
