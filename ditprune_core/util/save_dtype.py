"""Which dtype to save weights in: the narrowest one that holds them exactly.

A host may compute in a wider dtype than the file it loaded (ComfyUI upcasts a bf16 FLUX to fp32 on
CPUs and on GPUs without bf16) without recording the file's dtype. Weights that came from a bf16 file
still hold only bf16 values, so the file's dtype can be read back from the values themselves: the
narrowest float dtype in which every weight survives a round trip unchanged. Saving in it loses
nothing and never makes the file larger than its source.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["SAVE_DTYPES", "cast_exactly", "exact_in", "narrowest_exact_dtype", "needs_cast"]

#: float dtypes a checkpoint may be saved in, narrowest first (bf16 before fp16: FLUX and SD3 ship bf16)
SAVE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.bfloat16,
    torch.float16,
    torch.float32,
)
_CHUNK = 1 << 24  # elements compared at a time: bounds the round-trip copies to ~200 MB


def _sample(flat: torch.Tensor, samples: int) -> torch.Tensor:
    n = flat.numel()
    if n <= samples:
        return flat
    idx = torch.arange(samples, dtype=torch.int64) * (n - 1) // (samples - 1)
    return flat[idx.to(flat.device)]


def exact_in(tensor: torch.Tensor, dtype: torch.dtype, *, samples: int | None = None) -> bool:
    """Whether ``tensor`` (any shape) survives ``tensor.to(dtype).to(tensor.dtype)`` unchanged.

    Args:
        tensor: a floating tensor.
        dtype: the dtype to test.
        samples: test only this many evenly strided entries (a quick guess); None tests all.
    Returns:
        True when every tested entry is exact in ``dtype`` (NaN counts as exact when it stays NaN).
    """
    flat = tensor.detach().reshape(-1)
    if samples is not None:
        flat = _sample(flat, max(samples, 2))
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        back = part.to(dtype).to(part.dtype)
        same = (back == part) | (torch.isnan(back) & torch.isnan(part))
        if not bool(same.all()):
            return False
    return True


def narrowest_exact_dtype(
    tensors: Iterable[torch.Tensor], *, samples: int | None = 4096
) -> tuple[torch.dtype, torch.dtype] | None:
    """The narrowest of :data:`SAVE_DTYPES` that holds every floating tensor of ``tensors`` exactly.

    Only dtypes narrower than the most common stored dtype (by element count, as ComfyUI reckons a
    file's weight dtype) are tried; tensors already at most that narrow need not be exact in it.

    Args:
        tensors: the state dict's tensors (non-floating ones are ignored), read once.
        samples: entries tested per tensor (evenly strided); None tests every entry. A sample is
            enough to choose: a weight trained in fp32 has about a 1 in 65536 chance per entry of
            fitting bf16. Check every entry again with :func:`cast_exactly` when casting.
    Returns:
        ``(stored, narrowest)``: the most common stored dtype and the narrowest exact one, or None
        when no narrower dtype holds them (or there is no floating tensor).
    """
    counts: dict[torch.dtype, int] = {}
    kept: list[torch.Tensor] = []
    for tensor in tensors:
        if not tensor.is_floating_point():
            continue
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
        kept.append(_sample(tensor.detach().reshape(-1), samples) if samples is not None else tensor)
    if not counts:
        return None
    stored = max(counts, key=lambda d: counts[d])
    for dtype in SAVE_DTYPES:  # narrowest first
        width = torch.empty((), dtype=dtype).element_size()
        if width >= torch.empty((), dtype=stored).element_size():
            break
        if all(t.element_size() <= width or exact_in(t, dtype) for t in kept):
            return stored, dtype
    return None


def cast_exactly(
    tensor: torch.Tensor, dtype: torch.dtype, name: str, *, original: torch.Tensor | None = None
) -> torch.Tensor:
    """``tensor`` in ``dtype``, refusing a cast that would change an unpatched weight or overflow.

    Args:
        tensor: the weight to save (patches baked in), any shape.
        dtype: the dtype to save it in.
        name: its state-dict key, for the message.
        original: the weight as loaded, before patches: it must be exact in ``dtype`` (the dtype
            was inferred from it); None skips that check.
    Raises:
        ValueError: ``original`` is not exact in ``dtype``, or a finite value overflows ``dtype``.
    """
    if original is not None and not exact_in(original, dtype):
        raise ValueError(
            f"{name!r}: its weights are not all exact in {str(dtype).removeprefix('torch.')}, although a "
            "sample of every weight was; choose the save dtype by hand (fp32 keeps them exactly)"
        )
    out = tensor.to(dtype)
    # beyond the largest value: inf in fp16, NaN or saturated at 448 in fp8 e4m3fn
    overflow = torch.isfinite(tensor) & (
        ~torch.isfinite(out.to(tensor.dtype)) | (tensor.abs() > torch.finfo(dtype).max)
    )
    if bool(overflow.any()):
        biggest = float(tensor[overflow].abs().max())
        raise ValueError(
            f"{name!r} holds {biggest:g}, which does not fit in {str(dtype).removeprefix('torch.')}; "
            "save in bf16 or fp32"
        )
    return out


def needs_cast(tensor: torch.Tensor, save_as: torch.dtype | None, *, inferred: bool) -> bool:
    """Whether a tensor is cast when it is saved in ``save_as`` (the save-dtype policy): never for a
    non-float tensor, no save dtype, or the same dtype; with an ``inferred`` save dtype (read back
    from the weights), not for a tensor already at most that narrow (it was stored so)."""
    if save_as is None or not tensor.is_floating_point() or tensor.dtype == save_as:
        return False
    return not (inferred and tensor.element_size() <= save_as.itemsize)
