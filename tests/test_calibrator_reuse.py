"""A Calibrator records one run: a second ``with`` would add to the first run's statistics."""

from __future__ import annotations

import pytest
import torch
from tiny_miniflux_models import tiny_miniflux as _model
from tiny_miniflux_models import tiny_miniflux_forward as _run

from ditprune_core import CalibrationError, Calibrator


def test_a_calibrator_is_entered_once() -> None:
    model = _model()
    cal = Calibrator(model)
    with cal:
        _run(model, 2, 0)
    first = cal.stats["single_blocks.0.linear1"]
    with pytest.raises(CalibrationError, match=r"recorded a run already.*new Calibrator.*merge"), cal:
        _run(model, 3, 1)
    again = cal.stats["single_blocks.0.linear1"]
    assert again.tokens == first.tokens == 2 * (16 + model.config.context_tokens)
    assert torch.equal(again.activation_sq_mean, first.activation_sq_mean)
    assert all(not m._forward_hooks for m in model.modules())  # the refused `with` hooked nothing
    with Calibrator(model) as fresh:  # a new one records the second run alone
        _run(model, 3, 1)
    assert fresh.stats["single_blocks.0.linear1"].tokens == 3 * (16 + model.config.context_tokens)
