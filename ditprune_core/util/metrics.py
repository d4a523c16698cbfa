"""Image/sample metrics of a pruned model against the dense one (pure torch, no scikit-learn)."""

from __future__ import annotations

import math

import torch

__all__ = ["non_finite_note", "psnr", "relative_error", "relative_squared_error"]


def relative_error(pruned: torch.Tensor, dense: torch.Tensor) -> float:
    """Mean over samples (dim 0) of ||pruned - dense|| / ||dense||."""
    p, d = pruned.reshape(pruned.shape[0], -1).double(), dense.reshape(dense.shape[0], -1).double()
    return float(((p - d).norm(dim=1) / d.norm(dim=1).clamp_min(1e-12)).mean())


def relative_squared_error(pruned: torch.Tensor, dense: torch.Tensor) -> float:
    """Mean over samples (dim 0) of ||pruned - dense||^2 / ||dense||^2 (relative MSE).

    The square of :func:`relative_error` per sample: ratios between methods are squared too (a 1.73x
    lower relative error is a 3x lower relative squared error). The issues' own figures (fp8 cast
    0.0005, GGUF Q4_0 0.003) are in this metric; the benchmarks report both."""
    p, d = pruned.reshape(pruned.shape[0], -1).double(), dense.reshape(dense.shape[0], -1).double()
    return float(((p - d).pow(2).sum(dim=1) / d.pow(2).sum(dim=1).clamp_min(1e-24)).mean())


def psnr(pruned: torch.Tensor, dense: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch (images in [-1, 1])."""
    mse = float((pruned.double().clamp(-1, 1) - dense.double().clamp(-1, 1)).pow(2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def non_finite_note(images: dict[str, torch.Tensor]) -> str | None:
    """Which of the named images hold NaN or inf, and how many values, or None if all are finite.

    Every metric above is NaN as soon as one value is; this says which input made it so.
    """
    notes = []
    for name, t in images.items():
        bad = ~torch.isfinite(t)
        count = int(bad.sum())
        if count:
            kinds = "/".join(k for k, m in (("NaN", t.isnan()), ("inf", t.isinf())) if bool(m.any()))
            notes.append(f"the {name} image has {kinds} in {count} of {t.numel()} values")
    return "; ".join(notes) if notes else None
