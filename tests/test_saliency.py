"""Every metric on tiny weights, expected scores written out by hand."""

from __future__ import annotations

import pytest
import torch

from ditprune_core import MetricParams, score_layer
from ditprune_core.score import energy_score

W = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
A = torch.tensor([4.0, 1.0], dtype=torch.float64)  # E[x^2] per input channel


def test_magnitude() -> None:
    assert torch.equal(score_layer("magnitude", W, None), torch.tensor([[1.0, 2.0], [3.0, 1.0]]))


def test_wanda_is_abs_weight_times_rms_activation() -> None:
    # sqrt(a) = [2, 1]
    assert torch.allclose(score_layer("wanda", W, A), torch.tensor([[2.0, 2.0], [6.0, 1.0]]))


def test_ria() -> None:
    # |W| column sums [4, 3], row sums [3, 4]; ||X||^0.5 = a^0.25 = [sqrt(2), 1]
    rel = torch.tensor([[1 / 4 + 1 / 3, 2 / 3 + 2 / 3], [3 / 4 + 3 / 4, 1 / 3 + 1 / 4]])
    expected = rel * torch.tensor([2**0.5, 1.0])
    assert torch.allclose(score_layer("ria", W, A), expected)


def test_energy_balance_extremes_and_normalisations() -> None:
    w = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    a = torch.tensor([1.0, 4.0])
    # W^2 = [[1, 4], [1, 1]], mean 7/4; a / mean(a) = [0.4, 1.6]
    only_act = energy_score(w, a, balance=1.0, normalize="none")
    assert torch.allclose(only_act, torch.tensor([[0.4, 1.6], [0.4, 1.6]]))
    only_weight = energy_score(w, a, balance=0.0, normalize="none")
    assert torch.allclose(only_weight, torch.tensor([[4 / 7, 16 / 7], [4 / 7, 4 / 7]]))
    assert torch.allclose(
        energy_score(w, a, balance=0.0, normalize="row"), torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    )
    # row+column: row shares [[.2,.8],[.5,.5]] + column shares [[.5,.8],[.5,.2]]
    assert torch.allclose(
        energy_score(w, a, balance=0.0, normalize="row+column"), torch.tensor([[0.7, 1.6], [1.0, 0.7]])
    )


def test_energy_at_half_balance_orders_rows_like_wanda() -> None:
    torch.manual_seed(0)
    w, a = torch.randn(8, 32), torch.rand(32) * 10
    energy = energy_score(w, a, balance=0.5, normalize="row")
    wanda = score_layer("wanda", w, a)
    assert torch.equal(energy.argsort(dim=1), wanda.argsort(dim=1))


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        score_layer("sparsegpt", W, A)
    with pytest.raises(ValueError, match="needs calibration"):
        score_layer("wanda", W, None)
    with pytest.raises(ValueError, match="input channels"):
        score_layer("energy", W, torch.ones(3))
    with pytest.raises(ValueError, match="balance"):
        MetricParams(balance=1.5)
    with pytest.raises(ValueError, match="normalisation"):
        MetricParams(normalize="col")


def test_scores_are_float32_for_low_precision_weights() -> None:
    for metric in ("magnitude", "wanda", "ria", "energy"):
        s = score_layer(metric, W.to(torch.bfloat16), A)
        assert s.dtype == torch.float32
