"""Input Gram matrices of Linear layers, recorded with forward hooks while MiniFlux samples.

The low-bit benchmarks need ``H = X^T X / n`` per layer (GPTQ's objective, and the layer output
error ``tr(E H E^T)``), recorded by the core's :class:`~ditprune_core.calibrate.GramRecorder`
(float64, every call weighted alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ditprune_core.calibrate import GramRecorder
from ditprune_core.miniflux.pipeline import MiniFluxPipeline

__all__ = ["miniflux_grams"]


def miniflux_grams(
    pipe: MiniFluxPipeline,
    layers: Mapping[str, nn.Linear],
    *,
    seeds: Sequence[int] = (1000, 1001),
    per_class: int = 10,
    steps: int = 20,
    cfg: float = 2.0,
) -> dict[str, torch.Tensor]:
    """(in, in) float64 Gram matrix of every layer over the calibration sampling (the same digits,
    seeds and steps as :func:`~ditprune_core.miniflux.pipeline.calibrate`; every call weighs alike)."""
    labels = torch.arange(pipe.config.num_classes).repeat_interleave(per_class)
    with GramRecorder(layers, dtype=torch.float64) as rec:
        for seed in seeds:
            pipe.sample(labels, seed=seed, steps=steps, cfg=cfg)
    return rec.grams()
