"""Load: read, validate and decode the checkpoints :mod:`ditprune_core.save` writes.

The file format (module docstring of :mod:`ditprune_core.save`) is defined here by what is accepted:
:func:`read_checkpoint_info` reads and checks the metadata (format, version, the ``layouts`` map and
its checksum), :func:`check_keys` the keys, :func:`validate_compressed_state` every piece without
decoding, and :func:`iter_pruned_checkpoint` / :func:`load_pruned_checkpoint` decode, a tensor at a
time. The writer imports the format's names from here, never the other way round.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .layouts import LAYOUTS, PIECES, spec_of_piece
from .quantize import GROUPINGS, SUPPORTED_BITS, QuantSpec
from .util.safetensors_io import CHECKSUM_KEY, checksum_mismatch, read_checksums, read_metadata

__all__ = [
    "DTYPE_NAMES",
    "FORMAT",
    "FORMAT_VERSION",
    "INT_BITS",
    "LAYOUTS_CHECKSUM_KEY",
    "READ_VERSIONS",
    "RESERVED_METADATA",
    "CheckpointError",
    "CheckpointInfo",
    "check_keys",
    "decoded_dtype",
    "decoded_placeholders",
    "dtype_name",
    "iter_pruned_checkpoint",
    "layouts_checksum",
    "load_pruned_checkpoint",
    "read_checkpoint_info",
    "validate_compressed_state",
]

FORMAT = "ditprune.checkpoint"
#: the newest format version (quantised values, the dense layout)
FORMAT_VERSION = 2
#: the versions this code reads
READ_VERSIONS = (1, 2)
#: the metadata key of :func:`layouts_checksum`
LAYOUTS_CHECKSUM_KEY = "layouts_crc32"
#: metadata keys the writer sets itself; a caller's metadata may not use them
RESERVED_METADATA = ("format", "format_version", "layouts", "checkpoint", CHECKSUM_KEY, LAYOUTS_CHECKSUM_KEY)
DTYPE_NAMES = {
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
INT_BITS = {f"int{b}": b for b in SUPPORTED_BITS}


@dataclass(frozen=True)
class CheckpointInfo:
    """The metadata of a ditprune checkpoint, as :func:`read_checkpoint_info` reads it.

    Attributes:
        format: ``"dense"`` or ``"compressed"``.
        version: the checkpoint format version of the file.
        layouts: for each compressed tensor, ``{"layout", "dtype", "values", "scale", ...}``.
        metadata: every metadata string of the file.
    """

    format: str
    version: int
    layouts: dict[str, dict[str, str]]
    metadata: dict[str, str]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layouts_checksum(metadata: Mapping[str, str]) -> str:
    """CRC32 (8 hex digits) of the metadata that says how to decode a checkpoint: its
    ``format_version``, ``checkpoint`` and ``layouts`` strings as stored."""
    covered = json.dumps([metadata.get(k) for k in ("format_version", "checkpoint", "layouts")])
    return f"{zlib.crc32(covered.encode()):08x}"


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
        version=READ_VERSIONS,
        not_ours_hint="; load it with ComfyUI's Load Diffusion Model node, or save it with ditprune first",
    )
    recorded = meta.get(LAYOUTS_CHECKSUM_KEY)
    if recorded is not None and recorded != layouts_checksum(meta):
        raise CheckpointError(
            f"{path}: its decoding metadata ('format_version', 'checkpoint', 'layouts') does not match "
            f"its checksum (CRC32 {layouts_checksum(meta)}, the file records {recorded}): the metadata "
            "was edited or damaged after the file was written; save or copy it again"
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
    version = int(meta["format_version"])
    for name, entry in layouts.items():
        _check_entry(entry, f"{path}: layouts entry {name!r}", version)
    if fmt == "dense" and layouts:
        raise CheckpointError(f"{path}: a dense checkpoint lists compressed tensors")
    return CheckpointInfo(fmt, version, layouts, meta)


def _check_entry(entry: object, where: str, version: int) -> None:
    """One ``layouts`` entry is what the writer of ``version`` stores."""
    if not isinstance(entry, dict) or not all(
        isinstance(entry.get(k), str) for k in ("layout", "dtype", "values")
    ):
        raise CheckpointError(f"{where} must hold the strings 'layout', 'dtype' and 'values'")
    if entry["layout"] not in LAYOUTS:
        raise CheckpointError(f"{where}: unknown layout {entry['layout']!r}; known: {list(LAYOUTS)}")
    if entry["dtype"] not in DTYPE_NAMES:
        raise CheckpointError(f"{where}: unknown dtype {entry['dtype']!r}; known: {list(DTYPE_NAMES)}")
    if entry["values"] in INT_BITS:
        if version < 2:
            raise CheckpointError(
                f"{where}: {entry['values']} values need format version 2, the file says {version}"
            )
        if entry.get("scale") != "group":
            raise CheckpointError(f"{where}: quantised values need scale 'group', not {entry.get('scale')!r}")
        size = entry.get("group_size")
        if not isinstance(size, str) or not size.isdigit() or int(size) < 1:
            raise CheckpointError(f"{where}: its 'group_size' must be a positive integer, got {size!r}")
        if entry.get("sym") not in ("true", "false"):
            raise CheckpointError(f"{where}: its 'sym' must be 'true' or 'false', got {entry.get('sym')!r}")
        if entry.get("grouping") not in GROUPINGS:
            raise CheckpointError(
                f"{where}: unknown grouping {entry.get('grouping')!r}; known: {list(GROUPINGS)}"
            )
        try:
            _entry_spec(entry)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc
        return
    if entry["values"] not in DTYPE_NAMES:
        known = [*DTYPE_NAMES, *INT_BITS]
        raise CheckpointError(f"{where}: unknown values {entry['values']!r}; known: {known}")
    if entry.get("scale", "none") not in ("none", "per-row"):
        raise CheckpointError(f"{where}: unknown scale {entry.get('scale')!r}; known: 'none', 'per-row'")
    if entry["layout"] == "dense":
        if version < 2:
            raise CheckpointError(
                f"{where}: the dense layout needs format version 2, the file says {version}"
            )
        if entry.get("scale") != "per-row":
            raise CheckpointError(f"{where}: the dense layout holds fp8 or quantised values, not plain ones")


def _entry_spec(entry: Mapping[str, str]) -> QuantSpec:
    return QuantSpec(
        INT_BITS[entry["values"]],
        int(entry["group_size"]),
        sym=entry["sym"] == "true",
        grouping=entry["grouping"],
    )


def _piece_names(info: Mapping[str, str]) -> tuple[str, ...]:
    layout = LAYOUTS[info["layout"]]
    if info["values"] in INT_BITS:
        zeros = () if info["sym"] == "true" else ("qzeros",)
        return ("shape", *layout.mask_pieces, "qcodes", "qscales", *zeros, "qspec")
    # files from before the "scale" key: scaled exactly when the values dtype differs
    scaled = info.get("scale", "per-row" if info["values"] != info["dtype"] else "none") == "per-row"
    scale = ("scale",) if scaled else ()
    return ("shape", *layout.own_pieces, *scale)


def _check_spec(
    name: str, entry: Mapping[str, str], own: Mapping[str, torch.Tensor], path: Path | str
) -> None:
    """The ``qspec`` piece says what the metadata says (a lying file disagrees with itself)."""
    if entry["values"] not in INT_BITS:
        return
    where = f"{path}: {name!r}"
    stored, said = spec_of_piece(own["qspec"], where), _entry_spec(entry)
    if stored != said:
        raise CheckpointError(
            f"{where}: its 'qspec' piece says {stored} but the metadata says {said} (crafted or corrupted "
            "file)"
        )


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
    _check_spec(name, entry, own, path)
    return LAYOUTS[entry["layout"]].decode(own, DTYPE_NAMES[entry["dtype"]], where=f"{path}: {name!r}")


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
        _check_spec(name, entry, own, path)
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


def decoded_placeholders(state: Mapping[str, torch.Tensor], info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """For every compressed weight of a (validated) state dict, a meta tensor of its decoded shape
    and dtype: it holds no memory, and a host's model detection reads widths off it as off the
    dense weight (a host that keeps the pieces compressed puts these in place of the empty
    placeholders)."""
    out = {}
    for name, entry in info.layouts.items():
        shape = tuple(int(x) for x in state[f"{name}.shape"].tolist())
        out[name] = torch.empty(shape, dtype=DTYPE_NAMES[entry["dtype"]], device="meta")
    return out


def decoded_dtype(info: CheckpointInfo) -> torch.dtype | None:
    """The dtype most compressed weights decode to (None for a file with none)."""
    dtypes = [DTYPE_NAMES[entry["dtype"]] for entry in info.layouts.values()]
    return max(set(dtypes), key=dtypes.count) if dtypes else None
