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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .layouts import LAYOUTS, PIECES, CheckpointError, Fp8Values, Layout, PieceSpec, choose_layout
from .util.safetensors_io import (
    CHECKSUM_KEY,
    LazyTensor,
    checksum_mismatch,
    read_checksums,
    read_metadata,
    write_safetensors,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RESERVED_METADATA",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointReport",
    "check_keys",
    "iter_pruned_checkpoint",
    "load_pruned_checkpoint",
    "read_checkpoint_info",
    "save_pruned_checkpoint",
    "validate_compressed_state",
]

FORMAT = "ditprune.checkpoint"
FORMAT_VERSION = 1
#: metadata keys the writer sets itself; a caller's metadata may not use them
RESERVED_METADATA = ("format", "format_version", "layouts", "checkpoint", CHECKSUM_KEY)
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
            where = repr(self.name)
            self._pieces, self.max_error = self.layout.encode(self.produce(), self.values, where)
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
        pieces = encoder.lazy()
        taken = sorted(set(pieces) & set(state_dict))
        if taken:
            raise ValueError(
                f"state dict key {taken[0]!r} collides with a piece of the compressed weight {name!r}; "
                "rename it, or save with format='dense'"
            )
        tensors.update(pieces)
        layouts[name] = {
            "layout": layout.name,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "values": str(value_dtype or tensor.dtype).removeprefix("torch."),
            "scale": "per-row" if values is not None else "none",
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
    if "__metadata__" in state_dict:
        raise ValueError("a tensor may not be called '__metadata__' (safetensors keeps its metadata there)")
    write_safetensors(path, tensors, meta, overwrite=overwrite)
    report.file_bytes = Path(path).stat().st_size
    report.max_fp8_relative_error = max((e.max_error for e in encoders), default=0.0)
    return report


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Metadata of a ditprune checkpoint: format, version, layouts; refuses other files.

    Raises:
        CheckpointError: a missing, unreadable or foreign file, another format version, or a
            ``layouts`` map that is not what the writer stores.
    """
    meta = read_metadata(
        path,
        format=FORMAT,
        what="ditprune checkpoint",
        error=CheckpointError,
        version=FORMAT_VERSION,
        not_ours_hint="; load it with ComfyUI's Load Diffusion Model node, or save it with ditprune first",
    )
    fmt = meta.get("checkpoint", "compressed")
    if fmt not in ("dense", "compressed"):
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r} in its metadata")
    if "layouts" not in meta:
        raise CheckpointError(f"{path}: its metadata has no 'layouts' map (not written by ditprune?)")
    try:
        layouts = json.loads(meta["layouts"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: its 'layouts' metadata is not valid JSON ({exc})") from exc
    if not isinstance(layouts, dict):
        raise CheckpointError(f"{path}: its 'layouts' metadata is not a map of tensor names")
    for name, entry in layouts.items():
        where = f"{path}: layouts entry {name!r}"
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("layout", "dtype", "values")
        ):
            raise CheckpointError(f"{where} must hold the strings 'layout', 'dtype' and 'values'")
        if entry["layout"] not in LAYOUTS:
            raise CheckpointError(f"{where}: unknown layout {entry['layout']!r}; known: {list(LAYOUTS)}")
        if entry.get("scale", "none") not in ("none", "per-row"):
            raise CheckpointError(f"{where}: unknown scale {entry.get('scale')!r}; known: 'none', 'per-row'")
        for key in ("dtype", "values"):
            if entry[key] not in _DTYPE_NAMES:
                raise CheckpointError(f"{where}: unknown {key} {entry[key]!r}; known: {list(_DTYPE_NAMES)}")
    if fmt == "dense" and layouts:
        raise CheckpointError(f"{path}: a dense checkpoint lists compressed tensors")
    return CheckpointInfo(fmt, FORMAT_VERSION, layouts, meta)


def _piece_names(info: Mapping[str, str]) -> tuple[str, ...]:
    layout = LAYOUTS[info["layout"]]
    # files from before the "scale" key: scaled exactly when the values dtype differs
    scaled = info.get("scale", "per-row" if info["values"] != info["dtype"] else "none") == "per-row"
    scale = ("scale",) if scaled else ()
    return ("shape", *layout.own_pieces, *scale)


def check_keys(keys: Iterable[str], info: CheckpointInfo, path: str | Path) -> None:
    """Every compressed weight has its placeholder and exactly its pieces, and nothing is left over.

    Raises:
        CheckpointError: naming the file and the first key that is missing, extra or renamed.
    """
    present = set(keys)
    expected: set[str] = set()
    for name, entry in info.layouts.items():
        if name not in present:
            raise CheckpointError(
                f"{path}: compressed tensor {name!r} has no placeholder key (renamed or removed?)"
            )
        for piece in _piece_names(entry):
            if f"{name}.{piece}" not in present:
                raise CheckpointError(f"{path}: compressed tensor {name!r} has no {piece!r} piece")
            expected.add(f"{name}.{piece}")
    for key in sorted(present - expected - set(info.layouts)):
        base, _, piece = key.rpartition(".")
        if piece in PIECES and base in info.layouts:
            raise CheckpointError(
                f"{path}: {key!r} is not a piece of the {info.layouts[base]['layout']} layout"
            )
    crc_names = set(read_checksums(info.metadata, path, CheckpointError))
    if crc_names and crc_names != present:
        odd = sorted(crc_names ^ present)[0]
        raise CheckpointError(
            f"{path}: key {odd!r} is {'missing' if odd in crc_names else 'not recorded'} "
            "(the file's keys differ from the ones it was written with: renamed or corrupted)"
        )


def _decode(name: str, entry: Mapping[str, str], own: Mapping[str, torch.Tensor], path: Path) -> torch.Tensor:
    return LAYOUTS[entry["layout"]].decode(own, _DTYPE_NAMES[entry["dtype"]], where=f"{path}: {name!r}")


def validate_compressed_state(
    state: Mapping[str, torch.Tensor], path: str | Path, info: CheckpointInfo | None = None
) -> CheckpointInfo:
    """Check a whole loaded state dict of a checkpoint before anything is built from it.

    Checks the keys (:func:`check_keys`), every compressed weight's pieces against each other
    (counts, code ranges, shapes; :meth:`Layout.validate`) and, where the file records them, every
    tensor's CRC32. This is what "compressed on device" loading runs: it decodes nothing.

    Raises:
        CheckpointError: naming the file and the key.
    """
    info = info or read_checkpoint_info(path)
    check_keys(state.keys(), info, path)
    crcs = read_checksums(info.metadata, path, CheckpointError)
    for name, entry in info.layouts.items():
        if state[name].numel() != 0:
            raise CheckpointError(f"{path}: placeholder {name!r} of a compressed tensor is not empty")
        own = {p: state[f"{name}.{p}"] for p in _piece_names(entry)}
        LAYOUTS[entry["layout"]].validate(own, f"{path}: {name!r}")
    if crcs:
        for key, tensor in state.items():
            problem = checksum_mismatch(key, tensor, crcs, path)
            if problem:
                raise CheckpointError(problem)
    return info


def iter_pruned_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, dense tensor)`` one at a time (bounded memory), checking every piece and,
    where the file records them, every tensor's CRC32 as it is read.

    Raises:
        CheckpointError: naming the file and the key.
    """
    path = Path(path)
    info = read_checkpoint_info(path)
    layouts = info.layouts
    crcs = read_checksums(info.metadata, path, CheckpointError)
    pieces = {f"{n}.{p}" for n, entry in layouts.items() for p in _piece_names(entry)}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            check_keys(keys, info, path)

            def read(key: str) -> torch.Tensor:
                tensor = f.get_tensor(key)
                problem = checksum_mismatch(key, tensor, crcs, path) if crcs else None
                if problem:
                    raise CheckpointError(problem)
                return tensor

            for key in keys:
                if key in pieces:
                    continue
                if key in layouts:
                    if read(key).numel() != 0:
                        raise CheckpointError(
                            f"{path}: placeholder {key!r} of a compressed tensor is not empty"
                        )
                    own = {p: read(f"{key}.{p}") for p in _piece_names(layouts[key])}
                    yield key, _decode(key, layouts[key], own, path)
                else:
                    yield key, read(key)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path} could not be read (truncated or corrupted?): {exc}") from exc


def load_pruned_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a checkpoint written by :func:`save_pruned_checkpoint`.

    Raises:
        CheckpointError: missing, truncated or corrupted file, a file that is not ours, an unknown
            format version, or pieces whose sizes do not match their tensor.
    """
    return dict(iter_pruned_checkpoint(path))
