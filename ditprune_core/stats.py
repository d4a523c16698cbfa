"""Calibration statistics: the data the hooks gather, and their file format.

:class:`ChannelSquareMean` is the accumulator (``add_batch`` / ``merge`` / ``finalize``) of the
weighted mean of x**2 per input channel, in float64. :class:`LayerStats` is one layer's finalised
statistics, :class:`CalibrationStats` a model's, with ``merge``, ``validate_for`` and the
safetensors ``save`` / ``load``. The hooks that fill them live in :mod:`ditprune_core.calibrate`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .prompts import merge_records, record_of
from .util.blocks import HOOK_ELEMENTS, row_blocks
from .util.safetensors_io import checksum_mismatch, read_checksums, read_metadata, write_safetensors

__all__ = [
    "FORMAT",
    "VERSION",
    "CalibrationError",
    "CalibrationStats",
    "ChannelSquareMean",
    "GramAccumulator",
    "LayerStats",
    "WeightFn",
    "check_gram",
    "module_weight",
    "stats_from_batches",
    "weight_sample_hash",
]

FORMAT = "ditprune.calibration"
VERSION = 1

#: ``weight_fn(name, layer) -> weight``: where a host keeps the real weight elsewhere (ComfyUI keeps
#: originals in a backup while a patched clone is loaded), this says which tensor is the layer's.
WeightFn = Callable[[str, nn.Linear], torch.Tensor]


def module_weight(_name: str, layer: nn.Linear) -> torch.Tensor:
    """The default :data:`WeightFn`: the module's own weight."""
    return layer.weight


class CalibrationError(ValueError):
    """A calibration that cannot be used: wrong model, no tokens, bad values, bad file."""


def check_activation_sq_mean(values: torch.Tensor, where: str) -> None:
    """Refuse NaN, inf or negative mean squares, naming ``where`` and the first bad channel.

    A NaN channel loses every comparison (its layer would be pruned whole) and an inf one turns the
    ranking into index-order ties, so such statistics must never reach scoring.

    Raises:
        CalibrationError: naming the channel and its value.
    """
    bad = ~torch.isfinite(values) | (values < 0)
    if bool(bad.any()):
        channel = int(bad.nonzero()[0, 0]) if values.dim() else 0
        value = float(values.reshape(-1)[channel])
        raise CalibrationError(
            f"{where}: input channel {channel} has activation mean square {value} (statistics must be "
            "finite and non-negative); recalibrate (in float32 or bfloat16 if fp16 overflowed)"
        )


def strided_indices(n: int, samples: int) -> torch.Tensor:
    """``samples`` indices spread evenly over ``range(n)``, first and last included (integer maths:
    float32 ``linspace`` rounds past the end for FLUX-sized tensors)."""
    count = min(samples, n)
    if count <= 1:
        return torch.zeros(count, dtype=torch.int64)
    return torch.arange(count, dtype=torch.int64) * (n - 1) // (count - 1)


def weight_sample_hash(weight: torch.Tensor, samples: int = 16) -> str:
    """Short hash of ``samples`` evenly strided entries of a weight: tells models apart cheaply."""
    flat = weight.detach().reshape(-1)
    idx = strided_indices(flat.numel(), samples).to(flat.device)
    values = flat[idx].float().cpu().numpy().round(6).tobytes()
    return hashlib.sha256(values).hexdigest()[:16]


class ChannelSquareMean:
    """Running, weighted mean of x**2 per channel: ``add_batch`` / ``merge`` / ``finalize``.

    The mean is updated as ``mean += w_b / (W + w_b) * (batch_mean - mean)`` in float64, so it stays
    accurate over millions of tokens.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.mean: torch.Tensor | None = None
        self.weight_total = 0.0
        self.tokens = 0

    def add_batch(self, x: torch.Tensor, weight: float = 1.0) -> None:
        """Add activations ``x`` (..., channels); every token counts ``weight`` times."""
        if x.shape[-1] != self.channels:
            raise CalibrationError(f"activation has {x.shape[-1]} channels, expected {self.channels}")
        rows = x.reshape(-1, self.channels)
        n = rows.shape[0]
        if n == 0 or weight <= 0:
            return
        total = torch.zeros(self.channels, dtype=torch.float64, device=x.device)
        for span in row_blocks(n, self.channels, HOOK_ELEMENTS):
            chunk = rows[span].float()
            total += chunk.pow(2).sum(0, dtype=torch.float64)
        batch_mean = total / n
        self._combine(batch_mean, weight * n, n)

    def _combine(self, batch_mean: torch.Tensor, batch_weight: float, tokens: int) -> None:
        if self.mean is None:
            self.mean = batch_mean.clone()
        else:
            self.mean = self.mean.to(batch_mean.device)
            self.mean += (batch_weight / (self.weight_total + batch_weight)) * (batch_mean - self.mean)
        self.weight_total += batch_weight
        self.tokens += tokens

    def merge(self, other: ChannelSquareMean) -> None:
        """Fold another accumulator of the same size into this one."""
        if other.channels != self.channels:
            raise CalibrationError(f"cannot merge {other.channels} channels into {self.channels}")
        if other.mean is not None:
            self._combine(other.mean.to(torch.float64), other.weight_total, other.tokens)

    def finalize(self) -> torch.Tensor:
        """The mean of x**2 per channel, float64 on the CPU."""
        if self.mean is None:
            raise CalibrationError("no tokens were seen")
        return self.mean.detach().to("cpu", torch.float64)


class GramAccumulator:
    """Running, weighted mean of ``x xᵀ`` over tokens (the input Gram of one Linear).

    ``add_batch`` / ``merge`` / ``finalize`` like :class:`ChannelSquareMean`:
    every token of a batch counts ``weight`` times and the mean is updated as
    ``mean += w_b / (W + w_b) * (batch_mean - mean)``, so ``finalize().diagonal()`` is that class's
    mean of x². Memory: ``in_features² × 4`` bytes in float32 (:meth:`nbytes`).

    Args:
        in_features: input size of the layer.
        name: layer name, used in error messages.
        dtype: ``torch.float32`` (default) or ``torch.float64`` for the running mean.
    """

    def __init__(self, in_features: int, *, name: str = "layer", dtype: torch.dtype = torch.float32) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Gram of {name!r}: dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.name = name
        self.dtype = dtype
        self.mean: torch.Tensor | None = None
        self.weight_total = 0.0
        self.tokens = 0

    @staticmethod
    def nbytes(in_features: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of one Gram of ``in_features`` inputs."""
        return in_features * in_features * (8 if dtype == torch.float64 else 4)

    def add_batch(self, x: torch.Tensor, weight: float = 1.0) -> None:
        """Add inputs ``x`` (..., in_features); every token counts ``weight`` times.

        Raises:
            CalibrationError: wrong input size, or NaN/inf in the inputs (naming the layer).
        """
        if x.shape[-1] != self.in_features:
            raise CalibrationError(
                f"Gram of {self.name!r}: input has {x.shape[-1]} features, expected {self.in_features}"
            )
        rows = x.detach().reshape(-1, self.in_features)
        n = rows.shape[0]
        if n == 0 or weight <= 0:
            return
        total = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
        for span in row_blocks(n, self.in_features, HOOK_ELEMENTS // 4):
            chunk = rows[span].to(self.dtype)
            total.addmm_(chunk.t(), chunk)
        if not bool(torch.isfinite(total).all()):
            raise CalibrationError(
                f"layer {self.name!r} received NaN or inf inputs while its Gram was accumulated; check "
                "the model's dtype (fp16 overflow?) and its inputs"
            )
        self._combine(total.div_(n), weight * n, n)

    def _combine(self, batch_mean: torch.Tensor, batch_weight: float, tokens: int) -> None:
        if self.mean is None:
            self.mean = batch_mean.to(self.dtype, copy=True)
        else:
            self.mean.lerp_(
                batch_mean.to(self.mean.device, self.dtype), batch_weight / (self.weight_total + batch_weight)
            )
        self.weight_total += batch_weight
        self.tokens += tokens

    def merge(self, other: GramAccumulator) -> None:
        """Fold another accumulator of the same layer into this one (as if its batches were added)."""
        if other.in_features != self.in_features:
            raise CalibrationError(
                f"cannot merge a Gram of {other.in_features} inputs into {self.name!r} ({self.in_features})"
            )
        if other.mean is not None:
            self._combine(other.mean, other.weight_total, other.tokens)

    def finalize(self) -> torch.Tensor:
        """The weighted mean Gram (in, in) in this accumulator's dtype, on the inputs' device.

        Raises:
            CalibrationError: no token was seen, or the Gram holds NaN/inf.
        """
        if self.mean is None:
            raise CalibrationError(
                f"Gram of {self.name!r} saw no tokens: run the model through this layer while recording"
            )
        check_gram(self.mean, self.name)
        return self.mean


def check_gram(gram: torch.Tensor, name: str = "layer") -> None:
    """Raise a clear error for a Gram that is not square or holds NaN/inf."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Gram of {name!r} must be square (in, in), got shape {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise CalibrationError(
            f"Gram of {name!r} holds NaN or inf: its calibration inputs overflowed (fp16?) or were "
            "corrupted; recalibrate this layer"
        )


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one Linear layer. ``activation_sq_mean`` is float64 of shape (in_features,)."""

    activation_sq_mean: torch.Tensor
    in_features: int
    out_features: int
    tokens: int
    weight_total: float
    weight_sample: str

    def check(self, name: str) -> None:
        """Refuse statistics that cannot be scored, naming layer ``name``.

        Raises:
            CalibrationError: a wrong shape, non-finite or negative values, or no tokens / weight.
        """
        where = f"calibration of layer {name!r}"
        a = self.activation_sq_mean
        if not isinstance(a, torch.Tensor) or tuple(a.shape) != (self.in_features,):
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise CalibrationError(f"{where}: statistics have shape {shape}, expected ({self.in_features},)")
        check_activation_sq_mean(a, where)
        if not (isinstance(self.tokens, int) and self.tokens > 0):
            raise CalibrationError(f"{where}: token count {self.tokens!r} must be a positive integer")
        if not (isinstance(self.weight_total, (int, float)) and math.isfinite(self.weight_total)):
            raise CalibrationError(f"{where}: weight total {self.weight_total!r} is not a finite number")
        if self.weight_total <= 0:
            raise CalibrationError(f"{where}: weight total {self.weight_total} must be positive")

    @classmethod
    def from_accumulator(cls, acc: ChannelSquareMean, out_features: int, weight_sample: str) -> LayerStats:
        """Finalise ``acc`` (the layer's inputs) into the statistics of a layer."""
        return cls(acc.finalize(), acc.channels, out_features, acc.tokens, acc.weight_total, weight_sample)

    def accumulator(self) -> ChannelSquareMean:
        """An accumulator holding these statistics, ready to ``merge`` with others."""
        acc = ChannelSquareMean(self.in_features)
        acc.mean, acc.weight_total, acc.tokens = self.activation_sq_mean, self.weight_total, self.tokens
        return acc

    @property
    def activation_norm(self) -> torch.Tensor:
        """Root-mean-square input per channel, the ``||X||`` of Wanda up to a constant."""
        return self.activation_sq_mean.sqrt()


@dataclass(frozen=True)
class CalibrationStats:
    """Per-layer activation statistics of one model; ``merge``, ``save`` / ``load``, ``validate``."""

    layers: Mapping[str, LayerStats]
    architecture: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, layer in self.layers.items():
            layer.check(name)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    @property
    def fingerprint(self) -> str:
        """Hash of layer names, shapes and weight samples: equal for the same model."""
        items = sorted((n, s.out_features, s.in_features, s.weight_sample) for n, s in self.layers.items())
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.layers.values())

    def summary(self) -> dict[str, Any]:
        """Small JSON-able description (for checkpoint metadata and node reports)."""
        tokens = [s.tokens for s in self.layers.values()]
        return {
            "architecture": self.architecture,
            "layers": len(self.layers),
            "fingerprint": self.fingerprint,
            "tokens_per_layer_min": min(tokens) if tokens else 0,
            "tokens_per_layer_max": max(tokens) if tokens else 0,
            "settings": dict(self.settings),
        }

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Statistics of both calibrations together, as if their batches had been seen in one run.

        Raises:
            CalibrationError: when the two were recorded on different models.
        """
        if set(self.layers) != set(other.layers):
            missing = sorted(set(self.layers) ^ set(other.layers))[:5]
            raise CalibrationError(f"cannot merge calibrations of different layer sets (e.g. {missing})")
        merged: dict[str, LayerStats] = {}
        for name, mine in self.layers.items():
            theirs = other.layers[name]
            if (mine.in_features, mine.out_features, mine.weight_sample) != (
                theirs.in_features,
                theirs.out_features,
                theirs.weight_sample,
            ):
                raise CalibrationError(
                    f"cannot merge: layer {name!r} differs between the two calibrations "
                    "(they were recorded on different models)"
                )
            acc = mine.accumulator()
            acc.merge(theirs.accumulator())
            merged[name] = LayerStats.from_accumulator(acc, mine.out_features, mine.weight_sample)
        settings: dict[str, Any] = {"merged": [dict(self.settings), dict(other.settings)]}
        mine_record, their_record = record_of(self.settings), record_of(other.settings)
        if mine_record is not None and their_record is not None:  # what both saw, together
            settings["record"] = merge_records(mine_record, their_record)
        return CalibrationStats(merged, self.architecture, settings)

    def validate_for(
        self,
        layers: Mapping[str, nn.Linear],
        weight_fn: WeightFn = module_weight,
        *,
        weights: bool = True,
    ) -> None:
        """Check that these statistics belong to ``layers`` (names, shapes and, with ``weights``,
        each layer's weight fingerprint through ``weight_fn``).

        Raises:
            CalibrationError: naming the first layer that is missing or differs.
        """
        missing = [name for name in layers if name not in self.layers]
        if missing:
            raise CalibrationError(
                f"calibration has no statistics for {len(missing)} layer(s), e.g. {missing[:3]}; "
                "it was recorded on another model or with other layer families: calibrate again "
                "with these layers"
            )
        for name, layer in layers.items():
            s = self.layers[name]
            if (s.out_features, s.in_features) != (layer.out_features, layer.in_features):
                raise CalibrationError(
                    f"layer {name!r} is {layer.out_features}x{layer.in_features} but the calibration "
                    f"was recorded on a {s.out_features}x{s.in_features} layer: calibration from "
                    "another model; calibrate this model"
                )
            if weights:
                self.check_weight(name, weight_fn(name, layer))

    def check_weight(self, name: str, weight: torch.Tensor) -> None:
        """Check one layer's weight against the fingerprint recorded with its statistics.

        Raises:
            CalibrationError: the weight differs from the one the calibration was recorded on.
        """
        if weight_sample_hash(weight) != self.layers[name].weight_sample:
            raise CalibrationError(
                f"weights of layer {name!r} differ from the model the calibration was recorded "
                "on (another checkpoint, or already pruned): calibrate this model"
            )

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file atomically; refuses to overwrite an existing file."""
        path = Path(path)
        tensors = {name: s.activation_sq_mean.contiguous() for name, s in self.layers.items()}
        meta_layers = {
            name: {
                "in_features": s.in_features,
                "out_features": s.out_features,
                "tokens": s.tokens,
                "weight_total": s.weight_total,
                "weight_sample": s.weight_sample,
            }
            for name, s in self.layers.items()
        }
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "architecture": self.architecture,
            "fingerprint": self.fingerprint,
            "layers": json.dumps(meta_layers),
            "settings": json.dumps(dict(self.settings), default=str),
        }
        write_safetensors(path, tensors, metadata)  # atomic, never overwrites, CRC32 per tensor
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Read a file written by :meth:`save`.

        Raises:
            CalibrationError: the file is missing, truncated, not ours, or of another version.
        """
        metadata = read_metadata(
            path,
            format=FORMAT,
            what="ditprune calibration",
            error=CalibrationError,
            version=VERSION,
            version_key="version",
            not_ours_hint="; pass a file saved by Calibrator (or the Calibrate node)",
            old_version_hint="recalibrate or upgrade ditprune",
        )
        crcs = read_checksums(metadata, path, CalibrationError)
        try:
            meta_layers = json.loads(metadata["layers"])
            settings = json.loads(metadata.get("settings", "{}"))
        except (KeyError, json.JSONDecodeError, RecursionError) as exc:
            raise CalibrationError(
                f"{path}: its 'layers'/'settings' metadata is missing or not JSON ({exc})"
            ) from exc
        if not isinstance(meta_layers, dict) or not isinstance(settings, dict):
            raise CalibrationError(f"{path}: its 'layers' and 'settings' metadata must be JSON maps")
        fields: dict[str, type | tuple[type, ...]] = {
            "in_features": int,
            "out_features": int,
            "tokens": int,
            "weight_total": (int, float),
        }
        layers = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                if crcs and set(crcs) != keys:
                    odd = sorted(set(crcs) ^ keys)[0]
                    raise CalibrationError(
                        f"{path}: key {odd!r} differs from the keys the file was written with"
                    )
                for name, m in meta_layers.items():
                    where = f"{path}: layer {name!r}"
                    if not isinstance(m, dict) or not isinstance(m.get("weight_sample"), str):
                        raise CalibrationError(f"{where}: its metadata entry is not what Calibrator writes")
                    for key, kind in fields.items():
                        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
                            raise CalibrationError(f"{where}: {key!r} is {m.get(key)!r}, not a number")
                    if name not in keys:
                        raise CalibrationError(f"{where} has no tensor in the file")
                    raw = f.get_tensor(name)
                    problem = checksum_mismatch(name, raw, crcs, path) if crcs else None
                    if problem:
                        raise CalibrationError(problem)
                    mean = raw.to(torch.float64)
                    if mean.shape != (m["in_features"],):
                        raise CalibrationError(f"{path}: tensor {name!r} has shape {tuple(mean.shape)}")
                    layer = LayerStats(
                        mean,
                        m["in_features"],
                        m["out_features"],
                        m["tokens"],
                        float(m["weight_total"]),
                        m["weight_sample"],
                    )
                    try:
                        layer.check(name)
                    except CalibrationError as exc:
                        raise CalibrationError(f"{path}: {exc}") from exc
                    layers[name] = layer
        except CalibrationError:
            raise
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
            raise CalibrationError(
                f"{path} is not a readable ditprune calibration file (truncated or corrupted?): {exc}"
            ) from exc
        return cls(layers, str(metadata.get("architecture", "unknown")), settings)


def stats_from_batches(
    layers: Mapping[str, nn.Linear],
    batches: Iterable[Mapping[str, torch.Tensor]],
    architecture: str = "custom",
) -> CalibrationStats:
    """Build statistics from given input activations ``{layer name: x (..., in_features)}``.

    Handy for tests and for callers that already hold activations.
    """
    accs = {name: ChannelSquareMean(layer.in_features) for name, layer in layers.items()}
    for batch in batches:
        for name, x in batch.items():
            accs[name].add_batch(x)
    return CalibrationStats(
        {
            name: LayerStats.from_accumulator(
                acc, layers[name].out_features, weight_sample_hash(layers[name].weight)
            )
            for name, acc in accs.items()
        },
        architecture,
    )
