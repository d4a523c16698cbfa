"""Save: pruned checkpoints, dense or compressed, written streamed and atomically; and their reader.

Safetensors only, no pickle. A dense checkpoint is the state dict as it is. A compressed one stores
each pruned 2-D weight ``k`` in the smallest layout of :mod:`ditprune_core.layouts` that fits it, as
the pieces ``k.<piece>``, optionally with fp8 values; tensors that are not pruned, or would not get
smaller, are stored as they are. ``k`` itself is kept as an empty placeholder, so that a loader that
does not know this format fails loudly (size mismatch) instead of loading zeros. The metadata holds
``format``, ``format_version``, ``checkpoint`` (dense / compressed) and a JSON ``layouts`` map.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .layouts import LAYOUTS, PIECES, CheckpointError, Fp8Values, Layout, PieceSpec, choose_layout
from .util.safetensors_io import LazyTensor, read_metadata, write_safetensors

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RESERVED_METADATA",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointReport",
    "iter_pruned_checkpoint",
    "load_pruned_checkpoint",
    "read_checkpoint_info",
    "save_pruned_checkpoint",
]

FORMAT = "ditprune.checkpoint"
FORMAT_VERSION = 1
#: metadata keys the writer sets itself; a caller's metadata may not use them
RESERVED_METADATA = ("format", "format_version", "layouts", "checkpoint")
_DTYPE_NAMES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    )
}
#: ``progress(done, total)`` over the tensors a save produces
SaveProgress = Callable[[int, int], None]


@dataclass
class CheckpointReport:
    """What :func:`save_pruned_checkpoint` wrote."""

    path: Path
    format: str
    dense_bytes: int = 0
    file_bytes: int = 0
    layouts: dict[str, str] = field(default_factory=dict)
    max_fp8_relative_error: float = 0.0

    @property
    def ratio(self) -> float:
        """File size as a fraction of the dense state dict's bytes."""
        return self.file_bytes / self.dense_bytes if self.dense_bytes else 0.0


@dataclass(frozen=True)
class CheckpointInfo:
    """The metadata of a ditprune checkpoint, as :func:`read_checkpoint_info` reads it.

    Attributes:
        format: ``"dense"`` or ``"compressed"``.
        version: the checkpoint format version.
        layouts: for each compressed tensor, ``{"layout", "dtype", "values"}``.
        metadata: every metadata string of the file.
    """

    format: str
    version: int
    layouts: dict[str, dict[str, str]]
    metadata: dict[str, str]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Encoder:
    """Encodes one weight lazily in one layout; its pieces are produced once, then dropped after writing."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        layout: Layout,
        values: Fp8Values | None,
        produce: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.name, self.layout, self.values = name, layout, values
        # with a producer, the weight is made again when it is written instead of being kept
        self.produce: Callable[[], torch.Tensor] = produce if produce is not None else (lambda: weight)
        self._pieces: dict[str, torch.Tensor] | None = None
        self.max_error = 0.0
        self.specs: dict[str, PieceSpec] = layout.piece_specs(weight, values.dtype if values else None)

    def lazy(self) -> dict[str, LazyTensor]:
        return {
            f"{self.name}.{piece}": LazyTensor(shape, dtype, functools.partial(self._take, piece))
            for piece, (shape, dtype) in self.specs.items()
        }

    def _take(self, piece: str) -> torch.Tensor:
        if self._pieces is None:
            self._pieces, self.max_error = self.layout.encode(self.produce(), self.values)
        return self._pieces.pop(piece)


TensorSource = torch.Tensor | Callable[[], torch.Tensor]


def save_pruned_checkpoint(
    state_dict: Mapping[str, TensorSource],
    path: str | Path,
    *,
    format: str = "compressed",
    value_dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    progress: SaveProgress | None = None,
) -> CheckpointReport:
    """Write a state dict, ``dense`` or ``compressed`` (see module docstring), one tensor at a time.

    Args:
        state_dict: name -> tensor (any device; pruned weights hold exact zeros), or a function
            returning it: such tensors are made once to choose their layout and once when written,
            so no more than one of them is alive at a time (how a 12B model is saved).
        path: the ``.safetensors`` file to create; never overwritten unless ``overwrite``.
        format: ``"compressed"`` or ``"dense"``.
        value_dtype: None keeps the weights' dtype (bit-exact round trip); ``torch.float8_e4m3fn``
            stores pruned weights' values as fp8 with per-row scales.
        metadata: extra string metadata (the keys in :data:`RESERVED_METADATA` are ours).
        progress: ``progress(done, total)`` after each tensor is produced (each source is called
            twice, to choose its layout and to write it: ``total`` counts both).
    Returns:
        a :class:`CheckpointReport` with sizes, layouts and the fp8 error.
    """
    if format not in ("dense", "compressed"):
        raise ValueError(f"unknown checkpoint format {format!r}; choose 'dense' or 'compressed'")
    if value_dtype not in (None, torch.float8_e4m3fn):
        raise ValueError(f"value_dtype must be None or torch.float8_e4m3fn, got {value_dtype}")
    if value_dtype is not None and format == "dense":
        raise ValueError("fp8 values need format='compressed'")
    reserved = set(RESERVED_METADATA) & set(metadata or {})
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved for ditprune")
    report = CheckpointReport(Path(path), format)
    values = Fp8Values(value_dtype) if value_dtype is not None else None
    total = 2 * len(state_dict)
    done = 0

    def made(source: TensorSource) -> TensorSource:
        if progress is None or not callable(source):
            return source

        def produce() -> torch.Tensor:
            nonlocal done
            tensor = source()
            done = min(done + 1, total)
            progress(done, total)
            return tensor

        return produce

    tensors: dict[str, torch.Tensor | LazyTensor] = {}
    layouts: dict[str, dict[str, str]] = {}
    encoders = []
    for name, given in state_dict.items():
        source = made(given)
        if progress is not None and not callable(given):  # a tensor given as it is: both passes now
            done = min(done + 2, total)
            progress(done, total)
        tensor = source() if callable(source) else source
        report.dense_bytes += _nbytes(tensor)
        layout = choose_layout(tensor, value_dtype) if format == "compressed" else None
        if layout is None:
            tensors[name] = (
                LazyTensor(tuple(tensor.shape), tensor.dtype, source) if callable(source) else tensor
            )
            continue
        encoder = _Encoder(name, tensor, layout, values, source if callable(source) else None)
        encoders.append(encoder)
        tensors[name] = torch.zeros(0, dtype=torch.uint8)  # placeholder: unknowing loaders fail loudly
        tensors.update(encoder.lazy())
        layouts[name] = {
            "layout": layout.name,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "values": str(value_dtype or tensor.dtype).removeprefix("torch."),
        }
        report.layouts[name] = layout.name
        del tensor
    meta = {
        **(metadata or {}),
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layouts": json.dumps(layouts),
        "checkpoint": format,
    }
    write_safetensors(path, tensors, meta, overwrite=overwrite)
    report.file_bytes = Path(path).stat().st_size
    report.max_fp8_relative_error = max((e.max_error for e in encoders), default=0.0)
    return report


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Metadata of a ditprune checkpoint: format, version, layouts; refuses other files.

    Raises:
        CheckpointError: a missing, unreadable or foreign file, or another format version.
    """
    meta = read_metadata(
        path,
        format=FORMAT,
        what="ditprune checkpoint",
        error=CheckpointError,
        version=FORMAT_VERSION,
        not_ours_hint="; load it with ComfyUI's Load Diffusion Model node, or save it with ditprune first",
    )
    try:
        layouts = json.loads(meta.get("layouts", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its 'layouts' metadata is not valid JSON: {exc}") from exc
    return CheckpointInfo(meta.get("checkpoint", "compressed"), FORMAT_VERSION, layouts, meta)


def _decode(name: str, info: Mapping[str, str], own: Mapping[str, torch.Tensor], path: Path) -> torch.Tensor:
    where = f"{path}: {name!r}"
    layout = LAYOUTS.get(info.get("layout", ""))
    if layout is None:
        raise CheckpointError(f"{where}: unknown layout {info.get('layout')!r}; choose from {list(LAYOUTS)}")
    return layout.decode(own, _DTYPE_NAMES[info["dtype"]], where=where)


def iter_pruned_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, dense tensor)`` one at a time (bounded memory)."""
    path = Path(path)
    layouts = read_checkpoint_info(path).layouts
    pieces = {f"{n}.{p}" for n in layouts for p in PIECES}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            missing = [n for n in layouts if f"{n}.shape" not in keys]
            if missing:
                raise CheckpointError(f"{path}: compressed tensor {missing[0]!r} has no '.shape' piece")
            for key in keys:
                if key in pieces:
                    continue
                if key in layouts:
                    own = {
                        k.removeprefix(key + "."): f.get_tensor(k)
                        for k in keys
                        if k.startswith(key + ".") and k in pieces
                    }
                    yield key, _decode(key, layouts[key], own, path)
                else:
                    yield key, f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path} could not be read (truncated or corrupted?): {exc}") from exc


def load_pruned_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a checkpoint written by :func:`save_pruned_checkpoint`.

    Raises:
        CheckpointError: missing, truncated or corrupted file, a file that is not ours, an unknown
            format version, or pieces whose sizes do not match their tensor.
    """
    return dict(iter_pruned_checkpoint(path))
