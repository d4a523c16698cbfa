"""Compressed pruned checkpoints: make the zeros pay off on disk (and in RAM when loading).

Safetensors only, no pickle. A compressed checkpoint stores each pruned 2-D weight ``k`` as one of:

- **bitmask** (the compressed-tensors sparse-bitmask layout): ``k.compressed`` (the non-zero
  values, row-major, 1-D), ``k.bitmask`` (uint8, (rows, ceil(cols / 8)), little-endian bits along
  the input dimension), ``k.shape`` (int64 [rows, cols]) and ``k.row_offsets`` (int64, where each
  row starts in ``k.compressed``);
- **2:4**, when every group of 4 inputs holds at most 2 non-zeros: ``k.nm_values`` ((rows, cols/2),
  the two kept values of every group), ``k.nm_codes`` (uint8: which 2 of the 4 positions, one of 6
  patterns, three groups per byte as ``c0 + 6 c1 + 36 c2``: 2.67 bits per group of 4) and
  ``k.shape``.

With ``value_dtype=torch.float8_e4m3fn`` the values are stored as fp8 with a float32 scale per row
(``k.scale``: value = fp8 * scale, scale = row max / 448). Tensors that are not pruned, or would not
get smaller, are stored as they are. ``k`` itself is kept as an empty placeholder, so that a loader
that does not know this format fails loudly (size mismatch) instead of loading zeros. The metadata
holds ``format``, ``format_version`` and a JSON ``layouts`` map.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .util.packing import pack_bits, unpack_bits
from .util.safetensors_io import LazyTensor, write_safetensors
from .util.selection import count_true

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointReport",
    "load_pruned_checkpoint",
    "read_checkpoint_info",
    "save_pruned_checkpoint",
    "unpack_weight",
]

FORMAT = "ditprune.checkpoint"
FORMAT_VERSION = 1
FP8_MAX = 448.0
_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
_PAIR_CODE = torch.full((4, 4), -1, dtype=torch.int64)
for _code, (_a, _b) in enumerate(_PAIRS):
    _PAIR_CODE[_a, _b] = _code
_CODE_PAIRS = torch.tensor(_PAIRS, dtype=torch.int64)
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


class CheckpointError(ValueError):
    """A checkpoint file that is not ours, truncated, of an unknown version, or inconsistent."""


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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_two_four(weight: torch.Tensor) -> bool:
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    groups = (weight != 0).reshape(weight.shape[0], -1, 4)
    return bool((groups.sum(dim=2) <= 2).all())


def _fp8_quantize(
    values: torch.Tensor, rows: torch.Tensor | None, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scaled e4m3 values. ``rows`` gives the row of each value (None: values are (rows, k))."""
    v = values.float()
    if rows is None:
        row_max = v.abs().amax(dim=1) if v.numel() else torch.zeros(n_rows)
        scale = torch.where(row_max > 0, row_max / FP8_MAX, torch.ones_like(row_max))
        return (v / scale[:, None]).to(torch.float8_e4m3fn), scale
    row_max = torch.zeros(n_rows).scatter_reduce_(0, rows, v.abs(), reduce="amax")
    scale = torch.where(row_max > 0, row_max / FP8_MAX, torch.ones_like(row_max))
    return (v / scale[rows]).to(torch.float8_e4m3fn), scale


class _Encoder:
    """Encodes one weight lazily; its pieces are produced once, then dropped after writing."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        layout: str,
        value_dtype: torch.dtype | None,
        produce: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.name, self.layout, self.value_dtype = name, layout, value_dtype
        # with a producer, the weight is made again when it is written instead of being kept
        self.produce: Callable[[], torch.Tensor] = produce if produce is not None else (lambda: weight)
        self._pieces: dict[str, torch.Tensor] | None = None
        self.max_error = 0.0
        rows, cols = weight.shape
        vdtype = value_dtype or weight.dtype
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]
        if layout == "2:4":
            groups = cols // 4
            self.shapes = {
                "nm_values": ((rows, cols // 2), vdtype),
                "nm_codes": ((rows, -(-groups // 3)), torch.uint8),
            }
        else:
            nnz = int(count_true((weight != 0).reshape(1, -1)))
            self.shapes = {
                "compressed": ((nnz,), vdtype),
                "bitmask": ((rows, -(-cols // 8)), torch.uint8),
                "row_offsets": ((rows,), torch.int64),
            }
        self.shapes["shape"] = ((2,), torch.int64)
        if value_dtype is not None:
            self.shapes["scale"] = ((rows,), torch.float32)

    def lazy(self) -> dict[str, LazyTensor]:
        return {
            f"{self.name}.{piece}": LazyTensor(shape, dtype, functools.partial(self._take, piece))
            for piece, (shape, dtype) in self.shapes.items()
        }

    def _take(self, piece: str) -> torch.Tensor:
        if self._pieces is None:
            self._pieces = self._encode()
        out = self._pieces.pop(piece)
        if not self._pieces:
            self._pieces = {}
        return out

    def _encode(self) -> dict[str, torch.Tensor]:
        w = self.produce().detach().cpu()
        rows, cols = w.shape
        pieces: dict[str, torch.Tensor] = {"shape": torch.tensor([rows, cols], dtype=torch.int64)}
        if self.layout == "2:4":
            groups = w.reshape(rows, -1, 4)
            nonzero = (groups != 0).to(torch.int64)
            # nonzeros first, then the lowest positions: exactly two per group
            priority = nonzero * 8 + (3 - torch.arange(4))
            idx = priority.topk(2, dim=2).indices.sort(dim=2).values
            values = groups.gather(2, idx).reshape(rows, cols // 2)
            codes = _PAIR_CODE[idx[..., 0], idx[..., 1]]
            pad = (-codes.shape[1]) % 3
            codes = torch.nn.functional.pad(codes, (0, pad)).reshape(rows, -1, 3)
            pieces["nm_codes"] = (codes[..., 0] + 6 * codes[..., 1] + 36 * codes[..., 2]).to(torch.uint8)
            value_rows = None
        else:
            mask = w != 0
            values = w[mask]
            counts = count_true(mask).squeeze(1)
            pieces["bitmask"] = pack_bits(mask)
            pieces["row_offsets"] = torch.cumsum(counts, 0) - counts
            value_rows = torch.repeat_interleave(torch.arange(rows), counts)
        if self.value_dtype is not None:
            q, scale = _fp8_quantize(values, value_rows, rows)
            back = q.float() * (scale[:, None] if value_rows is None else scale[value_rows])
            peak = float(values.float().abs().max()) if values.numel() else 0.0
            if peak > 0:
                self.max_error = float((back - values.float()).abs().max()) / peak
            values = q
            pieces["scale"] = scale
        pieces["nm_values" if self.layout == "2:4" else "compressed"] = values
        return pieces

    def compressed_bytes(self) -> int:
        total = 0
        for shape, dtype in self.shapes.values():
            total += torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        return total


def _choose_layout(weight: torch.Tensor, value_dtype: torch.dtype | None) -> str | None:
    if weight.dim() != 2 or not weight.is_floating_point() or weight.numel() < 256:
        return None
    zeros = weight.numel() - int(count_true((weight != 0).reshape(1, -1)))
    if zeros == 0:
        return None
    candidates = ["2:4"] if _is_two_four(weight) else []
    candidates.append("bitmask")
    best = min(candidates, key=lambda lay: _Encoder("x", weight, lay, value_dtype).compressed_bytes())
    if _Encoder("x", weight, best, value_dtype).compressed_bytes() >= _nbytes(weight):
        return None
    return best


TensorSource = torch.Tensor | Callable[[], torch.Tensor]


def save_pruned_checkpoint(
    state_dict: Mapping[str, TensorSource],
    path: str | Path,
    *,
    format: str = "compressed",
    value_dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
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
        metadata: extra string metadata (keys ``format``, ``format_version``, ``layouts`` are ours).
    Returns:
        a :class:`CheckpointReport` with sizes, layouts and the fp8 error.
    """
    if format not in ("dense", "compressed"):
        raise ValueError(f"unknown checkpoint format {format!r}; choose 'dense' or 'compressed'")
    if value_dtype not in (None, torch.float8_e4m3fn):
        raise ValueError(f"value_dtype must be None or torch.float8_e4m3fn, got {value_dtype}")
    if value_dtype is not None and format == "dense":
        raise ValueError("fp8 values need format='compressed'")
    reserved = {"format", "format_version", "layouts"} & set(metadata or {})
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved for ditprune")
    report = CheckpointReport(Path(path), format)
    tensors: dict[str, torch.Tensor | LazyTensor] = {}
    layouts: dict[str, dict[str, str]] = {}
    encoders = []
    for name, source in state_dict.items():
        tensor = source() if callable(source) else source
        report.dense_bytes += _nbytes(tensor)
        layout = _choose_layout(tensor, value_dtype) if format == "compressed" else None
        if layout is None:
            tensors[name] = (
                LazyTensor(tuple(tensor.shape), tensor.dtype, source) if callable(source) else tensor
            )
            continue
        encoder = _Encoder(name, tensor, layout, value_dtype, source if callable(source) else None)
        encoders.append(encoder)
        tensors[name] = torch.zeros(0, dtype=torch.uint8)  # placeholder: unknowing loaders fail loudly
        tensors.update(encoder.lazy())
        layouts[name] = {
            "layout": layout,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "values": str(value_dtype or tensor.dtype).removeprefix("torch."),
        }
        report.layouts[name] = layout
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


def read_checkpoint_info(path: str | Path) -> dict[str, object]:
    """Metadata of a ditprune checkpoint: format, version, layouts; refuses other files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}"
        ) from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a ditprune checkpoint (format {meta.get('format')!r}); load it with ComfyUI's "
            "Load Diffusion Model node, or save it with ditprune first"
        )
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has ditprune checkpoint format version {meta.get('format_version')!r}; this ditprune "
            f"reads version {FORMAT_VERSION}: upgrade ditprune"
        )
    return {
        "format": meta.get("checkpoint", "compressed"),
        "version": FORMAT_VERSION,
        "layouts": json.loads(meta.get("layouts", "{}")),
        "metadata": meta,
    }


PIECES = ("compressed", "bitmask", "shape", "row_offsets", "scale", "nm_values", "nm_codes")


def unpack_weight(
    pieces: Mapping[str, torch.Tensor], dtype: torch.dtype, *, check: bool = True, where: str = "weight"
) -> torch.Tensor:
    """Dense weight from its compressed pieces (keys as in :data:`PIECES`), on the pieces' device.

    This is the per-layer decompression: :func:`load_pruned_checkpoint` calls it once per tensor,
    the ComfyUI runtime once per forward. ``check`` validates the pieces against each other.

    Raises:
        CheckpointError: (with ``check``) pieces that do not fit the shape, or invalid codes.
    """
    rows, cols = (int(x) for x in pieces["shape"].tolist())
    scale = pieces.get("scale")
    if "nm_values" in pieces:
        values, codes = pieces["nm_values"], pieces["nm_codes"].long()
        groups = cols // 4
        if check:
            if values.shape != (rows, cols // 2) or codes.shape != (rows, -(-groups // 3)) or cols % 4:
                raise CheckpointError(f"{where}: 2:4 pieces do not fit its shape ({rows}, {cols})")
            if bool((codes > 215).any()):
                raise CheckpointError(f"{where}: invalid 2:4 codes (corrupted file)")
        unpacked = torch.stack([codes % 6, (codes // 6) % 6, codes // 36], dim=2).reshape(rows, -1)[
            :, :groups
        ]
        idx = _CODE_PAIRS.to(values.device)[unpacked]
        v = values.to(dtype) if scale is None else (values.float() * scale[:, None]).to(dtype)
        out = torch.zeros(rows, groups, 4, dtype=dtype, device=values.device)
        out.scatter_(2, idx, v.reshape(rows, groups, 2))
        return out.reshape(rows, cols)
    bits, values = pieces["bitmask"], pieces["compressed"]
    try:
        mask = unpack_bits(bits, cols)
    except ValueError as exc:
        raise CheckpointError(f"{where}: bitmask does not fit its shape ({rows}, {cols}): {exc}") from exc
    if check and (mask.shape[0] != rows or int(count_true(mask.reshape(1, -1))) != values.numel()):
        raise CheckpointError(
            f"{where}: bitmask marks {int(count_true(mask.reshape(1, -1)))} weights but "
            f"{values.numel()} values are stored (mask size does not match its tensor)"
        )
    if scale is not None:
        offsets = pieces.get("row_offsets")
        counts = (
            count_true(mask).squeeze(1)
            if offsets is None
            else torch.diff(offsets, append=torch.tensor([values.numel()], device=offsets.device))
        )
        values = values.float() * torch.repeat_interleave(scale, counts)
    out = torch.zeros(rows, cols, dtype=dtype, device=values.device)
    return out.masked_scatter_(mask, values.to(dtype))  # ~1.6x faster than out[mask] = values on CPU


def _decode(name: str, info: Mapping[str, str], get: Mapping[str, torch.Tensor], path: Path) -> torch.Tensor:
    pieces = {k.removeprefix(f"{name}."): v for k, v in get.items()}
    return unpack_weight(pieces, _DTYPE_NAMES[info["dtype"]], where=f"{path}: {name!r}")


def iter_pruned_checkpoint(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, dense tensor)`` one at a time (bounded memory)."""
    path = Path(path)
    info = read_checkpoint_info(path)
    layouts: dict[str, dict[str, str]] = info["layouts"]  # type: ignore[assignment]
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
                    own = {k: f.get_tensor(k) for k in keys if k.startswith(key + ".") and k in pieces}
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
