"""Input Gram matrices of Linear layers, recorded with forward hooks while MiniFlux samples.

The low-bit benchmarks need ``H = X^T X / n`` per layer (GPTQ's objective, and the layer output
error ``tr(E H E^T)``). This is a small benchmark-side recorder; the OBS reconstruction keeps its
own accumulator in the core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..miniflux.pipeline import MiniFluxPipeline

__all__ = ["GramAccumulator", "miniflux_grams", "recording_grams"]


class GramAccumulator:
    """Running ``X^T X / n`` (float64) of the inputs (..., C) a layer sees."""

    def __init__(self, channels: int) -> None:
        self.sum = torch.zeros(channels, channels, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
        self.sum += flat.T @ flat
        self.tokens += flat.shape[0]

    def finalize(self) -> torch.Tensor:
        if not self.tokens:
            raise ValueError("no inputs were recorded: run the model inside `recording_grams`")
        return self.sum / self.tokens


def _hook(acc: GramAccumulator) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
    def hook(_module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
        acc.add_batch(inputs[0])

    return hook


@contextmanager
def recording_grams(layers: Mapping[str, nn.Linear]) -> Iterator[dict[str, GramAccumulator]]:
    """Hook ``layers`` for the duration of the block; yields ``{name: GramAccumulator}``."""
    accumulators = {name: GramAccumulator(layer.in_features) for name, layer in layers.items()}
    handles = []
    try:
        for name, layer in layers.items():
            acc = accumulators[name]
            handles.append(
                layer.register_forward_hook(lambda _m, inputs, _o, acc=acc: acc.add_batch(inputs[0]))
            )
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()


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
    with recording_grams(layers) as accumulators:
        for seed in seeds:
            pipe.sample(labels, seed=seed, steps=steps, cfg=cfg)
    return {name: acc.finalize() for name, acc in accumulators.items()}
