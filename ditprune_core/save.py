"""Save: pruned checkpoints, dense or compressed, written streamed and atomically.

The reader is :mod:`ditprune_core.load` (its names are re-exported here, where they used to live).

Safetensors only, no pickle. A dense checkpoint is the state dict as it is. A compressed one stores
each pruned 2-D weight ``k`` in the smallest layout of :mod:`ditprune_core.layouts` that fits it, as
the pieces ``k.<piece>``, with its values in their dtype, as fp8 or as group-quantised codes; on
request the dense 2-D weights (the *remainder*: what the caller's ``remainder_filter`` names; Save
Pruned Model names the modulation, :func:`~ditprune_core.layers.remainder_layers`) are stored as
fp8, 8-, 4- or 3-bit codes too; other tensors (norms, biases, 1-D and small tensors) are stored as they
are. ``k`` itself is kept as an empty placeholder, so that a loader that does not know this format
fails loudly (size mismatch) instead of loading zeros. The metadata holds ``format``,
``format_version``, ``checkpoint`` (dense / compressed) and a JSON ``layouts`` map, one entry per
compressed tensor: ``layout``, ``dtype`` (the decoded dtype), ``values`` (a dtype, or ``int8``,
``int4``, ``int3``, ``int2``), ``scale`` (``none``, ``per-row`` for fp8, ``group`` for codes) and,
for codes, ``group_size``, ``sym`` (``true``/``false``) and ``grouping`` (``kept``/``columns``).
``layouts_crc32`` is the CRC32 of the metadata that drives decoding (``format_version``,
``checkpoint``, ``layouts``: :func:`layouts_checksum`), since the tensors' own CRCs cover only their
bytes: a quantised layer's decoded dtype, for one, is written nowhere else. Files written before it
have no such key and are read as before.

Format versions: 1 has the bitmask and 2:4 layouts with dtype or fp8 values; 2 adds quantised
values and the dense layout. A file is written with the lowest version that holds it (so that an
older ditprune still reads what it can); both are read.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .layouts import (
    LAYOUTS,
    Fp8Values,
    Layout,
    PieceSpec,
    choose_layout,
    choose_quantized_layout,
)
from .load import (
    DTYPE_NAMES,
    FORMAT,
    FORMAT_VERSION,
    INT_BITS,
    LAYOUTS_CHECKSUM_KEY,
    READ_VERSIONS,
    RESERVED_METADATA,
    CheckpointInfo,
    check_keys,
    dtype_name,
    iter_pruned_checkpoint,
    layouts_checksum,
    load_pruned_checkpoint,
    read_checkpoint_info,
    validate_compressed_state,
)
from .quantize import (
    DEFAULT_DENSE_SPECS,
    DEFAULT_VALUE_SPECS,
    VALUE_BITS,
    QuantizedWeight,
    QuantSpec,
    dequantize_weight,
    quantize_weight,
)
from .util.dtypes import storage_view
from .util.safetensors_io import (
    LazyTensor,
    write_safetensors,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LAYOUTS_CHECKSUM_KEY",
    "READ_VERSIONS",
    "REMAINDER_BITS",
    "REMAINDER_FORMATS",
    "RESERVED_METADATA",
    "VALUE_FORMATS",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointReport",
    "check_keys",
    "check_save_options",
    "is_remainder_weight",
    "iter_pruned_checkpoint",
    "layouts_checksum",
    "load_pruned_checkpoint",
    "read_checkpoint_info",
    "remainder_spec",
    "save_pruned_checkpoint",
    "validate_compressed_state",
]

log = logging.getLogger("ditprune")

#: how the values of pruned layers may be stored: their dtype, fp8 with per-row scales, or codes
#: (:data:`~ditprune_core.quantize.DEFAULT_VALUE_SPECS`: groups of 128 kept values)
VALUE_FORMATS = ("keep", "fp8", "int8", "int4", "int3")
#: how the dense 2-D weights of a compressed file may be stored: their dtype, fp8 e4m3fn with a
#: float32 scale per row, or 8-, 4- or 3-bit codes in groups of 128
REMAINDER_FORMATS = ("keep", "fp8", "int8", "int4", "int3")
#: the remainder's integer codes (:data:`~ditprune_core.quantize.DEFAULT_DENSE_SPECS`): a scale and
#: zero point per 128 weights at 8 and 4 bits, a scale per 128 (symmetric) at 3
REMAINDER_BITS = {"int8": 8, "int4": 4, "int3": 3}
_MIN_REMAINDER_NUMEL = 256
#: ``progress(done, total)`` over the tensors a save produces
SaveProgress = Callable[[int, int], None]


@dataclass
class CheckpointReport:
    """What :func:`save_pruned_checkpoint` wrote.

    Attributes:
        layouts: compressed tensor -> its layout name.
        max_fp8_relative_error: largest error of fp8 values of pruned layers, over each layer's peak.
        max_value_relative_error: the same for values rounded to codes at save time.
        max_remainder_relative_error: the same for the dense weights stored as fp8 or codes.
        stored_codes: tensors stored with the codes they were given (exactly the model's values).
        rounded_at_save: pruned tensors whose values were rounded to codes at save time: the file
            differs from the weights given by at most ``max_value_relative_error`` of their peak.
        remainder: dense tensors stored as fp8 or codes.
        dense_bytes: the state dict's bytes as given (the dense model in its save dtype).
        file_bytes: the file's size on disk.
        parameters: the number of values of every tensor of the state dict (the model's parameters).
        dense_dtype: the dtype that holds most of ``dense_bytes`` (what the dense size is counted in).
        largest_decoded: the compressed tensor with the most bytes once decoded, and those bytes
            (its element count times its dtype's size): what a runtime that decodes one layer at a
            time holds beside the compressed model (``("", 0)`` for a dense file).
    """

    path: Path
    format: str
    dense_bytes: int = 0
    file_bytes: int = 0
    parameters: int = 0
    largest_decoded: tuple[str, int] = ("", 0)
    dense_dtype: torch.dtype | None = None
    layouts: dict[str, str] = field(default_factory=dict)
    max_fp8_relative_error: float = 0.0
    max_value_relative_error: float = 0.0
    max_remainder_relative_error: float = 0.0
    stored_codes: list[str] = field(default_factory=list)
    rounded_at_save: list[str] = field(default_factory=list)
    remainder: list[str] = field(default_factory=list)
    version: int = 1

    @property
    def ratio(self) -> float:
        """File size as a fraction of the dense state dict's bytes."""
        return self.file_bytes / self.dense_bytes if self.dense_bytes else 0.0

    @property
    def bits_per_weight(self) -> float:
        """The file's bits per parameter of the model (header, scales, masks and norms included)."""
        return 8 * self.file_bytes / self.parameters if self.parameters else 0.0

    @property
    def vram_bytes(self) -> int:
        """What the loaded model holds on its device: the file's tensors plus the largest layer
        decoded at once (Load Pruned Model, ``compressed on device``, decodes one layer per matmul;
        a dense file is loaded as it is). Activations, the text encoders and the VAE come on top."""
        return self.file_bytes + self.largest_decoded[1]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


#: makes one weight's pieces when they are written: ``(pieces, max relative error)``
_Make = Callable[[], tuple[dict[str, torch.Tensor], float]]


class _Encoder:
    """One compressed weight: its pieces are made once, when the first is written, then dropped."""

    def __init__(self, name: str, kind: str, specs: dict[str, PieceSpec], make: _Make) -> None:
        self.name, self.kind, self.specs, self.make = name, kind, specs, make
        self._pieces: dict[str, torch.Tensor] | None = None
        self.max_error = 0.0

    def lazy(self) -> dict[str, LazyTensor]:
        return {
            f"{self.name}.{piece}": LazyTensor(shape, dtype, functools.partial(self._take, piece))
            for piece, (shape, dtype) in self.specs.items()
        }

    def _take(self, piece: str) -> torch.Tensor:
        if self._pieces is None:
            self._pieces, self.max_error = self.make()
        return self._pieces.pop(piece)


TensorSource = torch.Tensor | Callable[[], torch.Tensor]


class _Progress:
    """Counts the tensors made (each source twice: to choose its layout, and to write it)."""

    def __init__(self, progress: SaveProgress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def step(self, n: int = 1) -> None:
        if self.progress is not None:
            self.done = min(self.done + n, self.total)
            self.progress(self.done, self.total)

    def wrap(self, source: TensorSource) -> TensorSource:
        if self.progress is None or not callable(source):
            return source

        def produce() -> torch.Tensor:
            tensor = source()
            self.step()
            return tensor

        return produce


def _peak_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    """Largest ``|approx - weight|`` over the weight's largest magnitude (0 for an all-zero weight)."""
    w = weight.float()
    peak = float(w.abs().max()) if w.numel() else 0.0
    return float((approx.float() - w).abs().max()) / peak if peak > 0 else 0.0


def check_save_options(
    format: str,
    values: str | QuantSpec = "keep",
    remainder: str = "keep",
    *,
    value_dtype: torch.dtype | None = None,
    quantized: bool = False,
) -> tuple[str, QuantSpec | None]:
    """The one check of :func:`save_pruned_checkpoint`'s storage options (a host checks its user's
    choice with it before it makes any tensor).

    Returns:
        ``(values name, spec)``: the name one of :data:`VALUE_FORMATS` (or ``int<bits>`` of a
        given spec), the spec None for dtype or fp8 values.
    Raises:
        ValueError: an unknown format, values or remainder, or fp8 / quantised values, a remainder
            or given codes asked of a dense file.
    """
    if format not in ("dense", "compressed"):
        raise ValueError(f"unknown checkpoint format {format!r}; choose 'dense' or 'compressed'")
    value_name, value_spec = _value_format(values, value_dtype)
    if remainder not in REMAINDER_FORMATS:
        raise ValueError(f"unknown remainder {remainder!r}; choose from {list(REMAINDER_FORMATS)}")
    if format == "dense":
        if value_name == "fp8":
            raise ValueError("fp8 values need format='compressed'")
        if value_name != "keep":
            raise ValueError(
                f"{value_name} values need format='compressed'; a dense file holds the weights as they are"
            )
        if remainder != "keep":
            raise ValueError(
                f"remainder={remainder!r} needs format='compressed': a dense file holds every weight as it "
                "is (choose remainder='keep', or save compressed)"
            )
        if quantized:
            raise ValueError(
                "quantised codes need format='compressed'; a dense file holds the dequantised weights"
            )
    return value_name, value_spec


def _value_format(values: str | QuantSpec, value_dtype: torch.dtype | None) -> tuple[str, QuantSpec | None]:
    """``(name, spec)`` of the values of pruned layers: name one of :data:`VALUE_FORMATS` (or
    ``int<bits>`` of a given spec), spec None for dtype or fp8 values."""
    if value_dtype not in (None, torch.float8_e4m3fn):
        raise ValueError(f"value_dtype must be None or torch.float8_e4m3fn, got {value_dtype}")
    spec: QuantSpec | None = None
    if isinstance(values, QuantSpec):
        if values.bits not in VALUE_BITS:
            raise ValueError(
                f"kept values of pruned layers use {list(VALUE_BITS)} bits, not {values.bits} (2 bits is "
                "for dense baselines only)"
            )
        name, spec = f"int{values.bits}", values
    elif values in VALUE_FORMATS:
        name = values
        spec = DEFAULT_VALUE_SPECS[INT_BITS[values]] if values in INT_BITS else None
    else:
        raise ValueError(f"unknown values {values!r}; choose from {list(VALUE_FORMATS)} or give a QuantSpec")
    if value_dtype is not None:
        if name not in ("keep", "fp8"):
            raise ValueError(f"value_dtype=torch.float8_e4m3fn contradicts values={name!r}: give one of them")
        name = "fp8"
    return name, spec


def _keys_of(quantized: Mapping[str, QuantizedWeight], keys: Iterable[str]) -> dict[str, QuantizedWeight]:
    """State-dict key -> codes: a layer name (as :func:`~ditprune_core.prune.select_layers` gives it)
    is the key of its ``.weight``."""
    present = set(keys)
    out: dict[str, QuantizedWeight] = {}
    for name, q in quantized.items():
        key = name if name in present else f"{name}.weight"
        if key not in present:
            raise ValueError(
                f"quantised layer {name!r} is not in the state dict (neither {name!r} nor {key!r}): name "
                "layers as select_layers does, or by their state-dict keys"
            )
        out[key] = q
    return out


def _check_given(key: str, tensor: torch.Tensor, q: QuantizedWeight) -> QuantizedWeight:
    """``q`` on the CPU, after checking that it fits ``tensor`` and decodes to its values.

    Raises:
        ValueError: codes for another shape, pieces that disagree, or values other than the tensor's.
    """
    where = repr(key)
    if tuple(q.shape) != tuple(tensor.shape):
        raise ValueError(
            f"{where}: its quantised codes are for a {tuple(q.shape)} weight but the tensor is "
            f"{tuple(tensor.shape)}; pass the codes made for this model"
        )
    q.validate(where)
    keep = None if q.keep is None else q.keep.cpu()
    zeros = None if q.zeros is None else q.zeros.cpu()
    q = QuantizedWeight(q.codes.cpu(), q.scales.cpu(), zeros, q.shape, q.spec, keep)
    exact = dequantize_weight(q, torch.float32, check=False)
    held = tensor.detach().cpu().float()
    decoded = exact.to(tensor.dtype).float()
    if tensor.element_size() == 1:  # fp8 weights: ComfyUI rounds patched weights stochastically
        info = torch.finfo(tensor.dtype)
        same = bool(
            ((held - exact).abs() <= torch.clamp(exact.abs() * info.eps, min=info.tiny * info.eps)).all()
        )
    else:
        same = torch.equal(decoded, held)
    if not same:
        raise ValueError(
            f"{where}: the tensor does not hold the values its quantised codes decode to (largest "
            f"difference {float((decoded - held).abs().max()):.3g}): it was patched after quantisation (a "
            "LoRA?) or saved in another dtype. Pass the codes of the weight you save, or leave this layer "
            "out of `quantized` to round it at save time"
        )
    return q


def _int_entry(layout: Layout, dtype: torch.dtype, spec: QuantSpec) -> dict[str, str]:
    return {
        "layout": layout.name,
        "dtype": dtype_name(dtype),
        "values": f"int{spec.bits}",
        "scale": "group",
        "group_size": str(spec.group_size),
        "sym": "true" if spec.sym else "false",
        "grouping": spec.grouping,
    }


def _rounded(
    layout: Layout, spec: QuantSpec, produce: Callable[[], torch.Tensor], masked: bool, where: str
) -> _Make:
    """Quantise the weight when it is written (kept values only, with ``masked``; the mask is where
    the weight is not zero, before rounding)."""

    def make() -> tuple[dict[str, torch.Tensor], float]:
        w = produce().detach().cpu()
        keep = storage_view(w) != 0 if masked else None
        q = quantize_weight(w.float(), spec, keep=keep, where=where)
        # measured on what the file decodes to: in its own dtype (clamped to its range, as the reader does)
        error = _peak_error(dequantize_weight(q, w.dtype, check=False), w)
        return layout.encode_quantized(q, where), error

    return make


def is_remainder_weight(
    name: str, tensor: torch.Tensor, remainder_filter: Callable[[str], bool] | None = None
) -> bool:
    """A dense 2-D weight the remainder option applies to (never norms, biases, 1-D or fp8 tensors,
    nor tensors of fewer than 256 values), by state-dict key ``name``."""
    if tensor.dim() != 2 or not tensor.is_floating_point() or tensor.element_size() == 1:
        return False
    if tensor.numel() < _MIN_REMAINDER_NUMEL:
        return False
    if remainder_filter is not None:
        return remainder_filter(name)
    return name == "weight" or name.endswith(".weight")


def save_pruned_checkpoint(
    state_dict: Mapping[str, TensorSource],
    path: str | Path,
    *,
    format: str = "compressed",
    value_dtype: torch.dtype | None = None,
    values: str | QuantSpec = "keep",
    quantized: Mapping[str, QuantizedWeight] | None = None,
    remainder: str = "keep",
    remainder_filter: Callable[[str], bool] | None = None,
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
        value_dtype: ``torch.float8_e4m3fn``: the same as ``values="fp8"`` (kept for callers of
            format version 1).
        values: how pruned weights' values are stored (compressed only): ``"keep"`` their dtype
            (bit-exact round trip), ``"fp8"`` e4m3 with per-row scales, ``"int8"`` / ``"int4"`` /
            ``"int3"`` group codes (:data:`~ditprune_core.quantize.DEFAULT_VALUE_SPECS`), or a
            :class:`~ditprune_core.quantize.QuantSpec`. With codes, a pruned layer that is not in
            ``quantized`` is rounded to nearest at save time: **the file then differs from the
            weights given** by the rounding (reported in ``max_value_relative_error`` and
            ``rounded_at_save``, and logged as a warning). A layer counts as pruned when its dtype
            values would shrink in the bitmask or 2:4 layout (about 7 % zeros or more).
        quantized: layer name (as :func:`~ditprune_core.prune.select_layers` names it) or
            state-dict key -> its :class:`~ditprune_core.quantize.QuantizedWeight`: those layers
            store exactly these codes, whatever ``values`` says, with the mask of their keep mask
            (compressed only). The tensor must hold what the codes decode to, in its dtype.
        remainder: ``"keep"``, ``"fp8"``, ``"int8"``, ``"int4"`` or ``"int3"``: how the dense 2-D
            weights that stay uncompressed (those ``remainder_filter`` names; never norms, biases,
            1-D or fp8 tensors) are stored in a compressed file: fp8 e4m3fn with a float32 scale per
            row, or 8- or 4-bit codes in asymmetric groups of 128, 3-bit codes in symmetric ones
            (:data:`~ditprune_core.quantize.DEFAULT_DENSE_SPECS`; int4 is what a GGUF Q4 file does
            to these layers, and what a FLUX.1-dev file under 5 GB needs; int3, a file under 4 GB).
            Lossy: the error is reported (``max_remainder_relative_error``); its cost on final
            samples is measured by ``python -m bench lowbit`` and ``python -m bench frontier``.
        remainder_filter: which state-dict keys the remainder applies to (default: 2-D ``*.weight``
            tensors of at least 256 values). Save Pruned Model passes the keys of
            :func:`~ditprune_core.layers.remainder_layers`: the blocks' Linear layers (modulation),
            not the embedders and the final layer, which carry most of the rounding's error on
            final samples for 0.13 GB of FLUX.1-dev (docs/bench/remainder.md).
        metadata: extra string metadata (the keys in :data:`RESERVED_METADATA` are ours).
        progress: ``progress(done, total)`` after each tensor is produced (each source is called
            twice, to choose its layout and to write it: ``total`` counts both).
    Returns:
        a :class:`CheckpointReport` with sizes, layouts and errors.
    Raises:
        ValueError: an unknown option, fp8 / quantised values or remainder asked of a dense save,
            codes that do not fit or do not decode to their tensor, a key colliding with a piece.
    """
    value_name, value_spec = check_save_options(
        format, values, remainder, value_dtype=value_dtype, quantized=bool(quantized)
    )
    reserved = set(RESERVED_METADATA) & set(metadata or {})
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are reserved for ditprune")
    if "__metadata__" in state_dict:
        raise ValueError("a tensor may not be called '__metadata__' (safetensors keeps its metadata there)")
    given = _keys_of(quantized or {}, state_dict.keys())
    report = CheckpointReport(Path(path), format)
    fp8 = Fp8Values() if value_name == "fp8" else None
    counter = _Progress(progress, 2 * len(state_dict))

    tensors: dict[str, torch.Tensor | LazyTensor] = {}
    layouts: dict[str, dict[str, str]] = {}
    bytes_by_dtype: dict[torch.dtype, int] = {}
    encoders: list[_Encoder] = []
    for name, source_given in state_dict.items():
        source = counter.wrap(source_given)
        if not callable(source_given):  # a tensor given as it is: both passes now
            counter.step(2)
        tensor = source() if callable(source) else source
        report.dense_bytes += _nbytes(tensor)
        report.parameters += tensor.numel()
        bytes_by_dtype[tensor.dtype] = bytes_by_dtype.get(tensor.dtype, 0) + _nbytes(tensor)
        produce: Callable[[], torch.Tensor] = source if callable(source) else functools.partial(_same, tensor)
        plan: tuple[_Encoder, dict[str, str]] | None = None
        if format == "compressed" and name in given:
            plan = _codes_plan(name, tensor, given[name], counter if callable(source_given) else None)
            report.stored_codes.append(name)
        elif format == "compressed":
            plan = _values_plan(name, tensor, produce, value_spec, fp8)
            if plan is not None and value_spec is not None:
                report.rounded_at_save.append(name)
            if plan is None and remainder != "keep" and is_remainder_weight(name, tensor, remainder_filter):
                plan = _remainder_plan(name, tensor, produce, remainder)
                report.remainder.append(name)
        if plan is None:
            tensors[name] = (
                LazyTensor(tuple(tensor.shape), tensor.dtype, source) if callable(source) else tensor
            )
            continue
        encoder, layouts[name] = plan
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
        report.layouts[name] = layouts[name]["layout"]
        decoded = tensor.numel() * DTYPE_NAMES[layouts[name]["dtype"]].itemsize
        if decoded > report.largest_decoded[1]:
            report.largest_decoded = (name, decoded)
        del tensor
    report.version = 2 if any(_needs_v2(e) for e in layouts.values()) else 1
    report.dense_dtype = max(bytes_by_dtype, key=bytes_by_dtype.__getitem__) if bytes_by_dtype else None
    meta = {
        **(metadata or {}),
        "format": FORMAT,
        "format_version": str(report.version),
        "layouts": json.dumps(layouts),
        "checkpoint": format,
    }
    meta[LAYOUTS_CHECKSUM_KEY] = layouts_checksum(meta)
    write_safetensors(path, tensors, meta, overwrite=overwrite)
    report.file_bytes = Path(path).stat().st_size
    errors: dict[str, float] = {}
    for e in encoders:
        errors[e.kind] = max(errors.get(e.kind, 0.0), e.max_error)
    report.max_fp8_relative_error = errors.get("values", 0.0)
    report.max_value_relative_error = errors.get("rounded", 0.0)
    report.max_remainder_relative_error = errors.get("remainder", 0.0)
    if report.rounded_at_save:
        log.warning(
            "ditprune: %d pruned layer(s) (e.g. %r) were rounded to %s codes at save time: %s differs "
            "from the model in memory by up to %.3g of each layer's largest weight. Quantise when "
            "pruning (Prune and Reconstruct's value bits) to save exactly what you sampled",
            len(report.rounded_at_save),
            report.rounded_at_save[0],
            value_name,
            path,
            report.max_value_relative_error,
        )
    return report


def _shape(tensor: torch.Tensor) -> tuple[int, int]:
    return int(tensor.shape[0]), int(tensor.shape[1])


def _codes_plan(
    name: str, tensor: torch.Tensor, q: QuantizedWeight, counter: _Progress | None
) -> tuple[_Encoder, dict[str, str]]:
    """A weight stored with the codes it was given (``counter``: tick it when they are written, in
    place of making the source a second time)."""
    where = repr(name)
    q = _check_given(name, tensor, q)
    layout = choose_quantized_layout(_shape(tensor), q.spec, q.keep)

    def make() -> tuple[dict[str, torch.Tensor], float]:
        if counter is not None:
            counter.step()
        return layout.encode_quantized(q, where), 0.0

    specs = layout.quantized_piece_specs(_shape(tensor), q.spec, q.keep)
    return _Encoder(name, "codes", specs, make), _int_entry(layout, tensor.dtype, q.spec)


def _values_plan(
    name: str,
    tensor: torch.Tensor,
    produce: Callable[[], torch.Tensor],
    spec: QuantSpec | None,
    fp8: Fp8Values | None,
) -> tuple[_Encoder, dict[str, str]] | None:
    """A pruned weight with its values in their dtype, as fp8 or rounded to codes; None when the
    weight is not pruned (its dtype values would not shrink in a masked layout)."""
    where = repr(name)
    fp8_dtype = fp8.dtype if fp8 is not None else None
    layout = choose_layout(tensor, None if spec is not None else fp8_dtype)
    if layout is None:
        return None
    if spec is not None:
        keep = storage_view(tensor) != 0
        qlayout = choose_quantized_layout(_shape(tensor), spec, keep)
        specs = qlayout.quantized_piece_specs(_shape(tensor), spec, keep)
        make = _rounded(qlayout, spec, produce, True, where)
        return _Encoder(name, "rounded", specs, make), _int_entry(qlayout, tensor.dtype, spec)
    entry = {
        "layout": layout.name,
        "dtype": dtype_name(tensor.dtype),
        "values": dtype_name(fp8_dtype or tensor.dtype),
        "scale": "per-row" if fp8 is not None else "none",
    }
    specs = layout.piece_specs(tensor, fp8_dtype)
    return _Encoder(name, "values", specs, _encode_later(layout, produce, fp8, where)), entry


def remainder_spec(remainder: str) -> QuantSpec:
    """The codes' spec of an integer ``remainder`` (a key of :data:`REMAINDER_BITS`): the dense
    default of its bits, what the writer stores and every benchmark of a whole file rounds to."""
    return DEFAULT_DENSE_SPECS[REMAINDER_BITS[remainder]]


def _remainder_plan(
    name: str, tensor: torch.Tensor, produce: Callable[[], torch.Tensor], remainder: str
) -> tuple[_Encoder, dict[str, str]]:
    """A dense weight in the dense layout, as fp8 with per-row scales or as 8- or 4-bit codes."""
    where, dense = repr(name), LAYOUTS["dense"]
    if remainder == "fp8":
        fp8 = Fp8Values()
        entry = {
            "layout": dense.name,
            "dtype": dtype_name(tensor.dtype),
            "values": dtype_name(fp8.dtype),
            "scale": "per-row",
        }
        specs = dense.piece_specs(tensor, fp8.dtype)
        return _Encoder(name, "remainder", specs, _encode_later(dense, produce, fp8, where)), entry
    spec = remainder_spec(remainder)
    specs = dense.quantized_piece_specs(_shape(tensor), spec, None)
    make = _rounded(dense, spec, produce, False, where)
    return _Encoder(name, "remainder", specs, make), _int_entry(dense, tensor.dtype, spec)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _encode_later(
    layout: Layout, produce: Callable[[], torch.Tensor], values: Fp8Values | None, where: str
) -> _Make:
    return lambda: layout.encode(produce(), values, where)


def _needs_v2(entry: Mapping[str, str]) -> bool:
    return entry["layout"] == "dense" or entry["values"] in INT_BITS
