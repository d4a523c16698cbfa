"""Reference quantisers for the size–fidelity benchmark: what ComfyUI users run instead of ditprune.

- ComfyUI's fp8 weights: a plain cast to ``float8_e4m3fn``, no scale (:func:`fp8_cast`).
- GGUF Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 through the ``gguf`` package's own quantisers
  (``gguf.quants.quantize``), decoded with its dequantiser.
- GGUF Q3_K and Q2_K: the ``gguf`` package only decodes these, so :func:`quantize_q3_k` and
  :func:`quantize_q2_k` implement ggml's reference quantisers (``quantize_row_q3_K_ref`` with
  ``make_q3_quants``, ``quantize_row_q2_K_ref`` with ``make_qkx2_quants``, ggml-quants.c), written
  from the algorithm in vectorised numpy float32, sums accumulated in ggml's order. They return the
  block bytes and the values those bytes claim to hold; :func:`gguf_fake_quantize` decodes every
  block with the ``gguf`` package and refuses bytes that do not decode to the claim. (These are the
  ``_ref`` quantisers llama.cpp uses without an importance matrix.)

GGUF blocks run along a tensor's rows (``block_size`` consecutive values: 32, or 256 for the
K-quants). FLUX.1-dev's rows are multiples of 256; MiniFlux's are not always (48, 64, 240...), so
here the row-major flattened weight is cut into blocks, which then may straddle two rows: the same
bits per weight, and (for the K-quants) every 16-value sub-block still lies in one row when the row
length is a multiple of 16.

Requires ``pip install gguf`` (llama.cpp's Python package); nothing else in ditprune does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "BITS_PER_WEIGHT",
    "GGUF_FORMATS",
    "fp8_cast",
    "gguf_block_size",
    "gguf_fake_quantize",
    "gguf_quantize_blocks",
    "quantize_q2_k",
    "quantize_q3_k",
]

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
#: GGUF formats of the benchmark, from the largest to the smallest.
GGUF_FORMATS = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q3_K", "Q2_K")
#: Stored bits per weight of each format: block bytes * 8 / block values.
BITS_PER_WEIGHT = {
    "fp8": 8.0,
    "Q8_0": 34 * 8 / 32,
    "Q5_1": 24 * 8 / 32,
    "Q5_0": 22 * 8 / 32,
    "Q4_1": 20 * 8 / 32,
    "Q4_0": 18 * 8 / 32,
    "Q3_K": 110 * 8 / 256,
    "Q2_K": 84 * 8 / 256,
}
_BLOCK = {"Q3_K": 256, "Q2_K": 256}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "the GGUF reference points need llama.cpp's `gguf` package: pip install gguf"
        ) from exc
    return gguf


def gguf_block_size(fmt: str) -> int:
    """Values per block of a GGUF format (32, or 256 for the K-quants)."""
    if fmt not in GGUF_FORMATS:
        raise ValueError(f"unknown GGUF format {fmt!r}; choose from {list(GGUF_FORMATS)}")
    return _BLOCK.get(fmt, 32)


def fp8_cast(weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI's fp8 weights: cast to float8_e4m3fn (no scale) and back to the weight's dtype."""
    return weight.to(torch.float8_e4m3fn).to(weight.dtype)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (the FPU's default mode), as int32."""
    return np.rint(x).astype(np.int32)


def _fp16(x: np.ndarray) -> np.ndarray:
    """Round to float16 (stored) and back to float32 (used)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def _seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis in order (float32), as ggml's loops accumulate."""
    total = np.zeros(terms.shape[:-1], dtype=np.float32)
    for i in range(terms.shape[-1]):
        total = total + terms[..., i]
    return total


def _pack_low2(levels: np.ndarray) -> np.ndarray:
    """(nb, 256) 2-bit levels -> (nb, 64) bytes: qs[32 h + l] holds levels 128 h + l + 32 k, k = 0..3."""
    lv = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(lv << shifts, axis=2).reshape(-1, 64)


def _as_blocks(x: np.ndarray, block: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size % block:
        raise ValueError(f"{x.size} values do not fill whole GGUF blocks of {block}")
    return x.reshape(-1, block)


# --- Q3_K -------------------------------------------------------------------------------------------


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed levels in [0, 2 nmax) and scale of every row of x (n, 16), weighted by x^2 (rmse)."""
    n = x.shape[1]
    ax = np.abs(x)
    first_max = np.argmax(ax, axis=1)  # the first value of largest magnitude
    peak = np.take_along_axis(x, first_max[:, None], axis=1)[:, 0]
    empty = ax.max(axis=1) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(empty, np.float32(0), np.float32(-nmax) / np.where(empty, 1, peak)).astype(
            np.float32
        )
        levels = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        w = x * x
        lf = levels.astype(np.float32)
        sumlx = _seq_sum(w * x * lf)
        suml2 = _seq_sum(w * lf * lf)
        for _ in range(5):  # ggml stops when a pass changes nothing: later passes would not either
            for i in range(n):
                wi, xi, li = w[:, i], x[:, i], levels[:, i]
                lif = li.astype(np.float32)
                slx = sumlx - wi * xi * lif
                sl2 = suml2 - wi * lif * lif
                positive = slx > 0
                ratio = xi * sl2 / np.where(positive, slx, np.float32(1))
                new_l = np.clip(_nearest_int(np.where(positive, ratio, 0)), -nmax, nmax - 1)
                nlf = new_l.astype(np.float32)
                slx_new = slx + wi * xi * nlf
                sl2_new = sl2 + wi * nlf * nlf
                accept = (
                    positive
                    & (new_l != li)
                    & (sl2_new > 0)
                    & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                )
                levels[:, i] = np.where(accept, new_l, li)
                sumlx = np.where(accept, slx_new, sumlx)
                suml2 = np.where(accept, sl2_new, suml2)
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), np.float32(0)).astype(np.float32)
    levels = np.where(empty[:, None], 0, levels + nmax)
    return levels, np.where(empty, np.float32(0), scale)


def quantize_q3_k(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's reference Q3_K quantiser (``quantize_row_q3_K_ref``).

    A block is 256 values in 16 sub-blocks of 16: 3-bit signed levels (-4..3), a 6-bit signed scale
    per sub-block and a float16 block scale; 110 bytes: ``hmask[32]`` (level bit 2, inverted),
    ``qs[64]`` (level bits 0-1), ``scales[12]`` (6-bit scales, 4 low bits then 2 high bits),
    ``d`` (float16).

    Args:
        values: float array whose size is a multiple of 256 (read as blocks of 256, row-major).
    Returns:
        ``(blocks, claimed)``: uint8 (n_blocks, 110) bytes and float32 (n_blocks, 256) values they
        decode to.
    """
    x = _as_blocks(values, QK_K)
    nb = x.shape[0]
    levels, sub_scales = _make_q3_quants(x.reshape(nb * 16, 16), 4)
    levels, sub_scales = levels.reshape(nb, QK_K), sub_scales.reshape(nb, 16)
    first_max = np.argmax(np.abs(sub_scales), axis=1)
    max_scale = np.take_along_axis(sub_scales, first_max[:, None], axis=1)[:, 0]
    has = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(has, np.float32(-32) / np.where(has, max_scale, 1), 0).astype(np.float32)
        l6 = np.clip(_nearest_int(iscale[:, None] * sub_scales), -32, 31) + 32  # (nb, 16) in 0..63
        d = np.where(has, np.float32(1) / np.where(has, iscale, 1), np.float32(0)).astype(np.float32)
    l6 = np.where(has[:, None], l6, 0).astype(np.uint8)
    scales = np.zeros((nb, 12), dtype=np.uint8)
    scales[:, :8] = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    high = (l6 >> 4).reshape(nb, 4, 4)  # [j // 4, j % 4]
    scales[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    d16 = _fp16(d)
    sub_d = (d16[:, None] * (l6.astype(np.int32) - 32).astype(np.float32)).astype(np.float32)  # (nb, 16)
    xs = x.reshape(nb, 16, 16)
    use = sub_d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(xs / np.where(use, sub_d, 1)[..., None]), -4, 3) + 4
    levels = np.where(use[..., None], requant, levels.reshape(nb, 16, 16)).reshape(nb, QK_K)
    high_bit = levels > 3
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for k in range(8):  # values 32 k .. 32 k + 31 put their bit 2 in bit k of hmask[0..31]
        hmask |= (high_bit[:, 32 * k : 32 * (k + 1)].astype(np.uint8) << k).astype(np.uint8)
    qs = _pack_low2(np.where(high_bit, levels - 4, levels))
    blocks = np.concatenate([hmask, qs, scales, d16.astype(np.float16).view(np.uint8).reshape(nb, 2)], axis=1)
    signed = (levels - 4).astype(np.float32).reshape(nb, 16, 16)
    claimed = (sub_d[..., None] * signed).reshape(nb, QK_K).astype(np.float32)
    return blocks, claimed


# --- Q2_K -------------------------------------------------------------------------------------------


def _make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levels in [0, nmax], scale and (positive) min of every row of x (n, 16): the weighted
    absolute-error search of ggml's make_qkx2_quants (use_mad=true)."""
    f32 = np.float32
    mn = np.minimum(x.min(axis=1), f32(0))
    mx = x.max(axis=1)
    sum_w = _seq_sum(weights)
    sum_x = _seq_sum(weights * x)
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(flat, f32(0), f32(nmax) / np.where(flat, 1, mx - mn)).astype(f32)
        scale = np.where(flat, f32(0), f32(1) / np.where(flat, 1, iscale)).astype(f32)
        levels = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        best = _seq_sum(weights * np.abs(scale[:, None] * levels.astype(f32) + mn[:, None] - x))
        for step in range(nstep + 1):
            factor = f32(f32(rmin) + f32(rdelta) * f32(step)) + f32(nmax)
            iscale = (factor / np.where(flat, 1, mx - mn)).astype(f32)
            aux = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            la = aux.astype(f32)
            sum_l = _seq_sum(weights * la)
            sum_l2 = _seq_sum(weights * la * la)
            sum_xl = _seq_sum(weights * la * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, f32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            err = _seq_sum(weights * np.abs(this_scale[:, None] * la + this_min[:, None] - x))
            better = ~flat & (det > 0) & (err < best)
            levels = np.where(better[:, None], aux, levels)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale).astype(f32)
            mn = np.where(better, this_min, mn).astype(f32)
    levels = np.where(flat[:, None], 0, levels)
    return levels, scale, (-mn).astype(f32)


def quantize_q2_k(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's reference Q2_K quantiser (``quantize_row_q2_K_ref``).

    A block is 256 values in 16 sub-blocks of 16: 2-bit levels (0..3), per sub-block a 4-bit scale
    and a 4-bit min, and float16 ``d`` and ``dmin``; value = d * scale * level - dmin * min.
    84 bytes: ``scales[16]`` (scale | min << 4), ``qs[64]``, ``d``, ``dmin``.

    Args:
        values: float array whose size is a multiple of 256 (read as blocks of 256, row-major).
    Returns:
        ``(blocks, claimed)``: uint8 (n_blocks, 84) bytes and float32 (n_blocks, 256) values they
        decode to.
    """
    f32 = np.float32
    x = _as_blocks(values, QK_K)
    nb = x.shape[0]
    subs = x.reshape(nb * 16, 16)
    levels, sub_scales, sub_mins = _make_qkx2_quants(subs, np.abs(subs), 3, -0.5, 0.1, 15)
    levels = levels.reshape(nb, 16, 16)
    sub_scales, sub_mins = sub_scales.reshape(nb, 16), sub_mins.reshape(nb, 16)
    max_scale = np.maximum(sub_scales.max(axis=1), f32(0))
    max_min = np.maximum(sub_mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = _nearest_int((f32(15) / np.where(max_scale > 0, max_scale, 1))[:, None] * sub_scales)
        lm = _nearest_int((f32(15) / np.where(max_min > 0, max_min, 1))[:, None] * sub_mins)
    # a sub-block scale below 0 (never seen on real weights) is clamped rather than wrapped
    ls = np.where(max_scale[:, None] > 0, np.clip(ls, 0, 15), 0).astype(np.uint8)
    lm = np.where(max_min[:, None] > 0, np.clip(lm, 0, 15), 0).astype(np.uint8)
    d16 = _fp16(np.where(max_scale > 0, max_scale / f32(15), f32(0)))
    dmin16 = _fp16(np.where(max_min > 0, max_min / f32(15), f32(0)))
    sub_d = (d16[:, None] * ls.astype(f32)).astype(f32)
    sub_m = (dmin16[:, None] * lm.astype(f32)).astype(f32)
    use = sub_d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        shifted = x.reshape(nb, 16, 16) + sub_m[..., None]
        requant = np.clip(_nearest_int(shifted / np.where(use, sub_d, 1)[..., None]), 0, 3)
    levels = np.where(use[..., None], requant, levels)
    scales = (ls | (lm << 4)).astype(np.uint8)
    qs = _pack_low2(levels.reshape(nb, QK_K))
    blocks = np.concatenate(
        [
            scales,
            qs,
            d16.astype(np.float16).view(np.uint8).reshape(nb, 2),
            dmin16.astype(np.float16).view(np.uint8).reshape(nb, 2),
        ],
        axis=1,
    )
    claimed = (sub_d[..., None] * levels.astype(f32) - sub_m[..., None]).reshape(nb, QK_K).astype(f32)
    return blocks, claimed


# --- GGUF through the gguf package ------------------------------------------------------------------


def gguf_quantize_blocks(values: np.ndarray, fmt: str) -> np.ndarray:
    """Block bytes (n_blocks, type_size) of ``values`` (size a multiple of the block) in ``fmt``.

    Q8_0..Q4_0 are the ``gguf`` package's quantisers; Q3_K and Q2_K are :func:`quantize_q3_k` /
    :func:`quantize_q2_k`, whose bytes are checked against their claim by the ``gguf`` decoder.

    Raises:
        RuntimeError: Q3_K / Q2_K bytes that the ``gguf`` package decodes to other values.
    """
    gguf = _gguf()
    block = gguf_block_size(fmt)
    x = _as_blocks(values, block)
    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    if fmt in ("Q3_K", "Q2_K"):
        blocks, claimed = (quantize_q3_k if fmt == "Q3_K" else quantize_q2_k)(x)
        decoded = gguf.quants.dequantize(blocks, qtype).reshape(claimed.shape)
        if not np.array_equal(decoded, claimed):
            bad = int(np.flatnonzero(~(decoded == claimed).all(axis=1))[0])
            raise RuntimeError(f"{fmt} block {bad}: the gguf package decodes its bytes to other values")
        return blocks
    return np.asarray(gguf.quants.quantize(x, qtype)).reshape(x.shape[0], -1)


def gguf_fake_quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weight a GGUF file of format ``fmt`` holds, decoded by the ``gguf`` package.

    The row-major weight is cut into blocks (see the module docstring); the result has the weight's
    shape, dtype and device.

    Raises:
        ValueError: a weight whose size is not a multiple of the format's block.
    """
    gguf = _gguf()
    block = gguf_block_size(fmt)
    if weight.numel() % block:
        raise ValueError(
            f"a weight of shape {tuple(weight.shape)} ({weight.numel()} values) does not fill whole "
            f"{fmt} blocks of {block} values"
        )
    flat = weight.detach().float().cpu().numpy().reshape(-1)
    blocks = gguf_quantize_blocks(flat, fmt)
    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    decoded = np.asarray(gguf.quants.dequantize(blocks, qtype), dtype=np.float32).reshape(weight.shape)
    return torch.from_numpy(decoded).to(device=weight.device, dtype=weight.dtype)
