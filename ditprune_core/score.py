"""Saliency metrics: how much each weight matters. Higher score = keep.

Every metric maps one layer's weight ``W`` (out, in) and its calibration statistics to a float32
score tensor of the same shape. ``a_j = E[x_j**2]`` is the weighted mean square of input channel j
(:class:`~ditprune_core.calibrate.LayerStats.activation_sq_mean`).

- ``magnitude``: ``|W_ij|``.
- ``wanda``: ``|W_ij| * sqrt(a_j)`` (Sun et al. 2023; ``sqrt(a_j)`` is ``||X_j||_2`` up to a constant).
- ``ria``: ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * a_j ** (power / 2)`` with ``power``
  0.5 (Zhang et al. 2024, relative importance and activations).
- ``energy``: ours, see :func:`energy_score`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stats import CalibrationError, check_activation_sq_mean
from .util.blocks import row_blocks

__all__ = [
    "METRICS",
    "NORMALIZATIONS",
    "MetricParams",
    "check_metric",
    "energy_score",
    "missing_calibration",
    "needs_calibration",
    "score_layer",
]

METRICS = ("magnitude", "wanda", "ria", "energy")
NORMALIZATIONS = ("row", "row+column", "none")
_TINY = 1e-30


def check_metric(metric: str) -> str:
    """``metric`` if it is one of :data:`METRICS` (the one place a metric name is validated).

    Raises:
        ValueError: an unknown metric, listing the known ones.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
    return metric


def needs_calibration(metric: str) -> bool:
    """Whether ``metric`` reads calibration statistics (every metric but ``magnitude``)."""
    return check_metric(metric) != "magnitude"


def missing_calibration(metric: str) -> CalibrationError:
    """The error for a metric that needs statistics and got none (hosts may add their own hint)."""
    return CalibrationError(
        f"metric {metric!r} needs a calibration (it needs calibration statistics, E[x**2] per "
        "input channel): record them with a Calibrator, or use metric 'magnitude'"
    )


@dataclass(frozen=True)
class MetricParams:
    """Parameters of the metrics; the defaults are the ones the quality benchmark chose.

    Attributes:
        balance: ``beta`` of the energy metric, in [0, 1]: 0 ranks by weight energy alone,
            1 by activation energy alone, 0.5 ranks like Wanda within a row.
        normalize: ``"row"``: energy scores as the share of their output row's energy, which makes
            scores of different rows comparable (used by layer and cluster groups);
            ``"row+column"``: the sum of the row share and the input-column share (RIA's relative
            importance, in energies); ``"none"``: the raw balanced energy.
        ria_power: exponent ``a`` on ``||X||`` in RIA.
    """

    balance: float = 0.4
    normalize: str = "none"
    ria_power: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.balance <= 1.0:
            raise ValueError(f"energy balance must be in [0, 1], got {self.balance}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(
                f"unknown energy normalisation {self.normalize!r}; choose from {list(NORMALIZATIONS)}"
            )
        if self.ria_power < 0:
            raise ValueError(f"ria_power must be >= 0, got {self.ria_power}")


def energy_score(
    weight: torch.Tensor, activation_sq_mean: torch.Tensor, *, balance: float, normalize: str = "row"
) -> torch.Tensor:
    """DiT-Pruning energy saliency (this project's definition; the paper publishes no formula).

    The term ``W_ij x_j`` carries expected energy ``W_ij**2 * a_j`` into output i. Its two factors
    are the weight energy ``W_ij**2`` and the activation energy ``a_j``. The score balances them
    with ``beta``, each first made dimensionless by its layer mean so that ``beta`` means the same
    in every layer::

        e_ij = (W_ij**2 / mean(W**2)) ** (1 - beta) * (a_j / mean(a)) ** beta
        S_ij = e_ij / sum_j e_ij                      (normalize="row")
        S_ij = e_ij / sum_j e_ij + e_ij / sum_i e_ij  (normalize="row+column")
        S_ij = e_ij                                   (normalize="none")

    With ``beta = 0.5`` the order within a row is Wanda's; ``beta > 0.5`` gives activations more
    say than Wanda does (the abstract: LLM metrics over-weight weights, DiT weights are large).
    Row normalisation turns the score into the share of output i's energy that the weight carries,
    so weights of different rows compare fairly when the group spans rows.

    Args:
        weight: (out, in) tensor of any float dtype.
        activation_sq_mean: (in,) mean of x**2 per input channel.
    Returns:
        (out, in) float32 scores on the weight's device.
    """
    score = _fp32_copy(weight).pow_(2)
    a = activation_sq_mean.to(device=weight.device, dtype=torch.float32)
    score.div_(score.mean().clamp_min(_TINY))
    a = a / a.mean().clamp_min(_TINY)
    if balance == 0.5:  # the common case: one sqrt instead of two pows
        score.mul_(a).sqrt_()
    else:
        score.pow_(1.0 - balance).mul_(a.pow(balance))
    if normalize == "row":
        score.div_(score.sum(dim=1, keepdim=True).clamp_min(_TINY))
    elif normalize == "row+column":
        row_sum = score.sum(dim=1).clamp_min(_TINY)
        col_sum = score.sum(dim=0).clamp_min(_TINY)
        _mul_row_plus_col_(score, row_sum.reciprocal(), col_sum.reciprocal())
    return score


def _fp32_copy(weight: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``weight`` that in-place ops may change (``.float()`` can alias)."""
    return weight.detach().to(torch.float32, copy=True)


def _mul_row_plus_col_(t: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``t_ij *= row_i + col_j`` in place, a block of rows at a time (no full-size temporary)."""
    for span in row_blocks(t.shape[0], t.shape[1]):
        t[span].mul_(row[span, None] + col[None, :])
    return t


def score_layer(
    metric: str,
    weight: torch.Tensor,
    activation_sq_mean: torch.Tensor | None,
    params: MetricParams | None = None,
) -> torch.Tensor:
    """Scores (out, in) float32 of one layer under ``metric``; higher means keep.

    Raises:
        ValueError: unknown metric, or a metric that needs calibration given none.
    """
    params = params or MetricParams()
    if not needs_calibration(metric):
        return _fp32_copy(weight).abs_()
    if activation_sq_mean is None:
        raise missing_calibration(metric)
    check_activation_sq_mean(activation_sq_mean, "activation statistics")
    if activation_sq_mean.shape != (weight.shape[1],):
        raise ValueError(
            f"activation statistics have shape {tuple(activation_sq_mean.shape)}, the weight has "
            f"{weight.shape[1]} input channels"
        )
    a = activation_sq_mean.to(device=weight.device, dtype=torch.float32)
    if metric == "wanda":
        return _fp32_copy(weight).abs_().mul_(a.sqrt())
    if metric == "ria":
        # |W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij| = |W_ij| * (1 / row_i + 1 / col_j)
        w = _fp32_copy(weight).abs_()
        row = w.sum(dim=1).clamp_min(_TINY).reciprocal()
        col = w.sum(dim=0).clamp_min(_TINY).reciprocal()
        return _mul_row_plus_col_(w, row, col).mul_(a.pow(params.ria_power / 2))
    return energy_score(weight, a, balance=params.balance, normalize=params.normalize)
