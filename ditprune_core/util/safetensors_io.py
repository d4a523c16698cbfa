"""A streaming safetensors writer: one tensor in memory at a time, atomic, never overwriting.

``safetensors.torch.save_file`` first turns every tensor into bytes, which doubles the memory of a
12B model. The format is simple (an 8-byte little-endian header length, a JSON header with dtype,
shape and byte offsets, then the raw bytes), so we write it ourselves, tensor by tensor. Files are
read back with the ``safetensors`` library.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .io import atomic_path

__all__ = [
    "CHECKSUM_KEY",
    "LazyTensor",
    "checksum_mismatch",
    "read_checksums",
    "read_metadata",
    "tensor_crc32",
    "write_safetensors",
]

#: metadata key holding a JSON ``{tensor name: CRC32 of its bytes, 8 hex digits}``
CHECKSUM_KEY = "tensor_crc32"

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


@dataclass(frozen=True)
class LazyTensor:
    """A tensor produced only when it is written: its shape and dtype must be known up front."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


TensorLike = torch.Tensor | LazyTensor


def _meta(t: TensorLike) -> tuple[tuple[int, ...], torch.dtype]:
    return (tuple(t.shape), t.dtype)


def tensor_crc32(t: torch.Tensor) -> str:
    """CRC32 of a tensor's bytes as they are stored (row-major, little-endian), 8 hex digits."""
    data = t.detach().to("cpu").contiguous().reshape(-1)
    return f"{zlib.crc32(data.view(torch.uint8).numpy().data) if data.numel() else 0:08x}"


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, TensorLike],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    checksums: bool = True,
) -> Path:
    """Write ``tensors`` to ``path`` one at a time; :class:`LazyTensor` values are produced then.

    With ``checksums`` the metadata gets :data:`CHECKSUM_KEY`, the CRC32 of every tensor's bytes:
    the header is written first with fixed-width placeholders, and rewritten in place (same length)
    once every tensor has been produced and hashed.

    Raises:
        ValueError: a dtype safetensors cannot store, a non-string metadata value, or a lazy
            tensor whose produced shape/dtype differ from what it announced.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    header: dict[str, object] = {}
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata values must be strings; not {bad[:3]} (store JSON strings)")
    if "__metadata__" in tensors:
        raise ValueError("a tensor may not be called '__metadata__' (safetensors keeps its metadata there)")
    if checksums:
        if CHECKSUM_KEY in meta:
            raise ValueError(f"metadata key {CHECKSUM_KEY!r} is reserved for the checksums")
        meta[CHECKSUM_KEY] = json.dumps(dict.fromkeys(tensors, "0" * 8))
    if meta:
        header["__metadata__"] = meta
    offset = 0
    for name, t in tensors.items():
        shape, dtype = _meta(t)
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = _header_bytes(header)
    crcs: dict[str, str] = {}
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, t in tensors.items():
            value = t.produce() if isinstance(t, LazyTensor) else t
            if _meta(value) != _meta(t):
                raise ValueError(f"tensor {name!r} was announced as {_meta(t)} but produced {_meta(value)}")
            data = value.detach().to("cpu").contiguous().reshape(-1)
            if data.numel():
                f.write(data.view(torch.uint8).numpy().data)
            if checksums:
                crcs[name] = tensor_crc32(data)
            del value, data
        if checksums:
            meta[CHECKSUM_KEY] = json.dumps(crcs)
            final = _header_bytes(header)
            if len(final) != len(raw):  # cannot happen: every placeholder has the width of a CRC
                raise RuntimeError("safetensors header changed size while writing checksums")
            f.seek(8)
            f.write(final)
    return Path(path)


def _header_bytes(header: Mapping[str, object]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * ((8 - len(raw) % 8) % 8)


def read_checksums(metadata: Mapping[str, str], path: str | Path, error: type[Exception]) -> dict[str, str]:
    """The per-tensor CRC32s a file's metadata records (empty for a file written without them).

    Raises:
        ``error``: the checksum metadata is not a JSON map of 8-hex-digit strings.
    """
    raw = metadata.get(CHECKSUM_KEY)
    if raw is None:
        return {}
    try:
        crcs = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{path}: its {CHECKSUM_KEY!r} metadata is not valid JSON ({exc})") from exc
    if not isinstance(crcs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) == 8 for k, v in crcs.items()
    ):
        raise error(f"{path}: its {CHECKSUM_KEY!r} metadata is not a map of tensor names to CRC32s")
    return crcs


def checksum_mismatch(
    name: str, tensor: torch.Tensor, crcs: Mapping[str, str], path: str | Path
) -> str | None:
    """A message if ``tensor`` (read as key ``name``) does not match its recorded CRC32, else None."""
    expected = crcs.get(name)
    if expected is None:
        return f"{path}: tensor {name!r} has no recorded checksum (the file was changed after it was written)"
    actual = tensor_crc32(tensor)
    if actual != expected:
        return (
            f"{path}: tensor {name!r} is corrupted (CRC32 {actual}, the file records {expected}); "
            "the file was damaged on disk or in transfer: save or copy it again"
        )
    return None


def read_metadata(
    path: str | Path,
    *,
    format: str,
    what: str,
    error: type[Exception],
    version: int | tuple[int, ...] | None = None,
    version_key: str = "format_version",
    not_ours_hint: str = "",
    old_version_hint: str = "upgrade ditprune",
) -> dict[str, str]:
    """The metadata of one of our safetensors files, after checking its ``format`` and version.

    This is the one place where a file's kind is recognised: calibrations, checkpoints and MiniFlux
    files all go through it, so they refuse foreign, truncated and future files the same way.

    Args:
        path: the file.
        format: the ``format`` metadata value our writer stores.
        what: how a message names the kind of file ("ditprune calibration").
        error: the exception class to raise.
        version: the version this code reads, or the versions (None: unversioned).
        version_key: the metadata key holding the version.
        not_ours_hint: appended to the "not a ..." message (how to fix it).
        old_version_hint: appended to the version message (how to fix it).
    Raises:
        ``error``: the file is missing, unreadable, not ours, or of another version.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{path} is not a readable {what} file (truncated or corrupted?): {exc}") from exc
    if metadata.get("format") != format:
        raise error(f"{path} is not a {what} (format {metadata.get('format')!r}){not_ours_hint}")
    versions = (version,) if isinstance(version, int) else version
    if versions is not None and metadata.get(version_key) not in {str(v) for v in versions}:
        readable = " or ".join(str(v) for v in versions)
        raise error(
            f"{path} has {what} format version {metadata.get(version_key)!r}; this ditprune reads "
            f"version {readable}: {old_version_hint}"
        )
    return metadata
