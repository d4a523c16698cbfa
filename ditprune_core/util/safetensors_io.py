"""A streaming safetensors writer: one tensor in memory at a time, atomic, never overwriting.

``safetensors.torch.save_file`` first turns every tensor into bytes, which doubles the memory of a
12B model. The format is simple (an 8-byte little-endian header length, a JSON header with dtype,
shape and byte offsets, then the raw bytes), so we write it ourselves, tensor by tensor. Files are
read back with the ``safetensors`` library.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .io import atomic_path

__all__ = ["LazyTensor", "read_metadata", "write_safetensors"]

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


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, TensorLike],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``tensors`` to ``path`` one at a time; :class:`LazyTensor` values are produced then.

    Raises:
        ValueError: a dtype safetensors cannot store, a non-string metadata value, or a lazy
            tensor whose produced shape/dtype differ from what it announced.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(
                f"safetensors metadata values must be strings; not {bad[:3]} (store JSON strings)"
            )
        header["__metadata__"] = dict(metadata)
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
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
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
    return Path(path)


def read_metadata(
    path: str | Path,
    *,
    format: str,
    what: str,
    error: type[Exception],
    version: int | None = None,
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
        version: the version this code reads (None: unversioned).
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
    if version is not None and metadata.get(version_key) != str(version):
        raise error(
            f"{path} has {what} format version {metadata.get(version_key)!r}; this ditprune reads "
            f"version {version}: {old_version_hint}"
        )
    return metadata
