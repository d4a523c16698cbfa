"""Calibrate: forward hooks that gather per-input-channel activation statistics while the model runs.

For every hooked Linear layer the :class:`Calibrator` accumulates the weighted mean of x**2 per
input channel over all tokens it sees (``activation_sq_mean``, shape ``(in_features,)``), in
float64 whatever the model dtype, with a numerically stable running mean. Each forward call can be
weighted (timestep weighting): the weight of a call multiplies every one of its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .layers import detect_architecture, find_prunable_layers, unwrap_diffusion_model
from .stats import (
    CalibrationError,
    CalibrationStats,
    ChannelSquareMean,
    GramAccumulator,
    LayerStats,
    WeightFn,
    module_weight,
    weight_sample_hash,
)

__all__ = [
    "CALIBRATED_FAMILIES",
    "TIMESTEP_WEIGHTINGS",
    "Calibrator",
    "GramRecorder",
    "log_timestep_weight",
    "recording_grams",
]

#: Families hooked when the caller names none: every block family, so that one calibration serves
#: any later choice of layers to prune.
CALIBRATED_FAMILIES = ("attention", "mlp", "single_fused", "modulation", "block_linear")

TimestepWeighting = Callable[[float], float]


def log_timestep_weight(sigma: float, high: float = 1.2, low: float = 0.8) -> float:
    """Log-decreasing weight: ``high`` at sigma 1 (pure noise) down to ``low`` at sigma 0.

    ``w(sigma) = low + (high - low) * ln(1 + 9 * sigma) / ln(10)`` for sigma clipped to [0, 1]:
    like OBS-Diff's 1.2 -> 0.8 log schedule, as a function of the noise level rather than the step
    index, so it does not depend on the sampler's step count.
    """
    s = min(max(float(sigma), 0.0), 1.0)
    return low + (high - low) * math.log1p(9.0 * s) / math.log(10.0)


def _uniform(_sigma: float) -> float:
    return 1.0


TIMESTEP_WEIGHTINGS: dict[str, TimestepWeighting] = {"uniform": _uniform, "log": log_timestep_weight}


class Calibrator:
    """Context manager that records :class:`CalibrationStats` while the model runs.

    Example::

        with Calibrator(model, weighting="log") as cal:
            pipe.sample(labels, seed=0, on_step=cal.on_step)
        stats = cal.stats

    A Calibrator records one run: it can be entered once (a second ``with`` is refused, because it
    would add to the first run's statistics). Combine runs with :meth:`CalibrationStats.merge`.

    Args:
        model: a DiT or ComfyUI MODEL; hooks go on its Linear layers.
        layers: ``{name: nn.Linear}`` to hook; default every block layer
            (``find_prunable_layers(model, families=CALIBRATED_FAMILIES)``).
        weighting: ``"uniform"``, ``"log"`` (see :func:`log_timestep_weight`) or a function of sigma
            returning the weight of the calls made at that noise level.
        settings: extra JSON-able settings stored with the statistics.
        weight_fn: which tensor is a layer's weight, for the model fingerprint (see
            :data:`WeightFn`); the hooks themselves never read weights.
    """

    def __init__(
        self,
        model: nn.Module | object,
        layers: Mapping[str, nn.Linear] | None = None,
        *,
        weighting: str | TimestepWeighting = "uniform",
        settings: Mapping[str, Any] | None = None,
        weight_fn: WeightFn = module_weight,
        grams: Iterable[str] = (),
        gram_dtype: torch.dtype = torch.float32,
    ) -> None:
        module = unwrap_diffusion_model(model)
        self.architecture = detect_architecture(module).name
        self.layers = (
            dict(layers) if layers is not None else find_prunable_layers(module, families=CALIBRATED_FAMILIES)
        )
        if not self.layers:
            raise CalibrationError("no layers to calibrate: the layer selection is empty")
        if isinstance(weighting, str):
            if weighting not in TIMESTEP_WEIGHTINGS:
                raise ValueError(
                    f"unknown timestep weighting {weighting!r}; choose from {sorted(TIMESTEP_WEIGHTINGS)}"
                )
            self._weighting = TIMESTEP_WEIGHTINGS[weighting]
            weighting_name = weighting
        else:
            self._weighting = weighting
            weighting_name = getattr(weighting, "__name__", "custom")
        self.settings = {"weighting": weighting_name, **dict(settings or {})}
        self.current_weight = 1.0
        self._accumulators = {
            name: ChannelSquareMean(layer.in_features) for name, layer in self.layers.items()
        }
        self._samples = {
            name: weight_sample_hash(weight_fn(name, layer)) for name, layer in self.layers.items()
        }
        unknown = sorted(set(grams) - set(self.layers))
        if unknown:
            raise ValueError(f"Grams asked for layers that are not calibrated: {unknown[:3]}")
        # the input Gram Σ w·xᵀx of the chosen layers, for reconstruction (in_features² × 4 bytes each)
        self._grams = {
            name: GramAccumulator(self.layers[name].in_features, name=name, dtype=gram_dtype)
            for name in grams
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stats: CalibrationStats | None = None
        self._entered = False

    def set_sigma(self, sigma: float) -> None:
        """Tell the calibrator the noise level of the next model calls."""
        self.current_weight = float(self._weighting(float(sigma)))
        if not math.isfinite(self.current_weight) or self.current_weight < 0:
            raise CalibrationError(f"timestep weighting returned {self.current_weight} for sigma {sigma}")

    def on_step(self, _step: int, sigma: float) -> None:
        """Sampler callback ``(step_index, sigma)``; same as :meth:`set_sigma`."""
        self.set_sigma(sigma)

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        acc = self._accumulators[name]
        gram = self._grams.get(name)

        def hook(_module: nn.Module, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0].detach()
            before = acc.mean.clone() if acc.mean is not None else None
            acc.add_batch(x, self.current_weight)
            if acc.mean is not None and not bool(torch.isfinite(acc.mean).all()):
                acc.mean = before
                raise CalibrationError(
                    f"layer {name!r} received NaN or inf activations during calibration; check the "
                    "model's dtype (fp16 overflow?) and its inputs"
                )
            if gram is not None:
                gram.add_batch(x, self.current_weight)

        return hook

    def __enter__(self) -> Calibrator:
        if self._handles:
            raise RuntimeError("this Calibrator is already active")
        if self._entered:
            raise CalibrationError(
                "this Calibrator has recorded a run already; entering it again would add to those "
                "statistics. Make a new Calibrator for each run, and combine runs with "
                "CalibrationStats.merge"
            )
        self._entered = True
        try:
            for name, layer in self.layers.items():
                self._handles.append(layer.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove_hooks()
        self._stats = None

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def gram(self, name: str) -> torch.Tensor:
        """The weighted mean input Gram (in, in) of layer ``name``, asked for with ``grams=``.

        Raises:
            KeyError: no Gram was asked for this layer.
            CalibrationError: the layer saw no token, or its Gram holds NaN/inf.
        """
        if name not in self._grams:
            raise KeyError(f"no Gram was recorded for {name!r}; pass it in Calibrator(..., grams=[...])")
        return self._grams[name].finalize()

    def tokens(self, name: str) -> int:
        """Tokens layer ``name`` has seen so far."""
        return self._accumulators[name].tokens

    def free_gram(self, name: str) -> None:
        """Drop the Gram of ``name`` (its memory is released once no one else holds it)."""
        self._grams.pop(name, None)

    @property
    def gram_bytes(self) -> int:
        """Bytes the Grams of this calibrator take once recorded."""
        return sum(GramAccumulator.nbytes(acc.in_features, acc.dtype) for acc in self._grams.values())

    @property
    def stats(self) -> CalibrationStats:
        """The statistics recorded so far.

        Raises:
            CalibrationError: when some layer saw no token (the model never ran, or that layer
                was skipped), naming it.
        """
        if self._stats is None:
            empty = [name for name, acc in self._accumulators.items() if acc.tokens == 0]
            if empty:
                raise CalibrationError(
                    f"calibration saw no tokens for {len(empty)} layer(s), e.g. {empty[:3]}: run the "
                    "model (sample at least one step) inside the `with Calibrator(...)` block"
                )
            layers = {
                name: LayerStats.from_accumulator(acc, self.layers[name].out_features, self._samples[name])
                for name, acc in self._accumulators.items()
            }
            self._stats = CalibrationStats(layers, self.architecture, self.settings)
        return self._stats


class GramRecorder:
    """Context manager: forward hooks that accumulate the input Gram of each given layer.

    The Grams alone, of bare layers (no model to resolve, no statistics): benchmarks and tools that
    need ``H`` per layer. The same :class:`~ditprune_core.stats.GramAccumulator` as
    ``Calibrator(grams=...)``, which the product uses. Timestep weighting as in :class:`Calibrator`: call
    :meth:`on_step` (``(step_index, sigma)``) or :meth:`set_sigma` before each model call. Hooks are
    removed on exit, also after an exception.

    Args:
        layers: ``{name: nn.Linear}`` to record.
        weighting: ``"uniform"``, ``"log"`` or a function of sigma.
        dtype: Gram dtype (float32 default).
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Linear],
        *,
        weighting: str | TimestepWeighting = "uniform",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.layers = dict(layers)
        self._weighting = TIMESTEP_WEIGHTINGS[weighting] if isinstance(weighting, str) else weighting
        self.current_weight = 1.0
        self.accumulators = {
            name: GramAccumulator(layer.in_features, name=name, dtype=dtype)
            for name, layer in self.layers.items()
        }
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def set_sigma(self, sigma: float) -> None:
        self.current_weight = float(self._weighting(float(sigma)))

    def on_step(self, _step: int, sigma: float) -> None:
        self.set_sigma(sigma)

    def __enter__(self) -> GramRecorder:
        for name, layer in self.layers.items():
            acc = self.accumulators[name]

            def hook(_m: nn.Module, inputs: tuple[Any, ...], _o: Any, acc: GramAccumulator = acc) -> None:
                acc.add_batch(inputs[0], self.current_weight)

            self._handles.append(layer.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def grams(self) -> dict[str, torch.Tensor]:
        """``{name: Gram (in, in)}``; raises CalibrationError naming a layer that saw no token."""
        return {name: acc.finalize() for name, acc in self.accumulators.items()}


@contextmanager
def recording_grams(layers: Mapping[str, nn.Linear], **kwargs: Any) -> Iterator[GramRecorder]:
    """Functional spelling of ``with GramRecorder(...) as rec``."""
    with GramRecorder(layers, **kwargs) as rec:
        yield rec
