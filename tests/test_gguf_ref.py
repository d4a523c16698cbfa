"""The benchmark's GGUF reference quantisers (bench.gguf_ref), checked by the gguf package."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF reference points need `pip install gguf` (dev extra)")

from bench.gguf_ref import (  # noqa: E402
    BITS_PER_WEIGHT,
    GGUF_FORMATS,
    fp8_cast,
    gguf_block_size,
    gguf_fake_quantize,
    gguf_quantize_blocks,
    quantize_q2_k,
    quantize_q3_k,
)
from ditprune_core.layouts import bits_per_weight  # noqa: E402
from ditprune_core.quantize import QuantSpec, fake_quantize  # noqa: E402

Q3_K = gguf.GGMLQuantizationType.Q3_K
Q2_K = gguf.GGMLQuantizationType.Q2_K


def _rows(seed: int, kind: str, n: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return (rng.standard_normal(n) * 0.02).astype(np.float32)
    if kind == "heavy":  # outliers, as in attention projections
        return (rng.standard_t(2, n) * 0.01).astype(np.float32)
    if kind == "positive":
        return np.abs(rng.standard_normal(n)).astype(np.float32)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)  # sparse: half zeros, some zero blocks
    x[rng.random(n) < 0.5] = 0
    x[256:512] = 0
    x[1024:1040] = 0.5  # a constant sub-block
    return x


def test_bits_per_weight_of_each_format() -> None:
    assert BITS_PER_WEIGHT == {
        "fp8": 8.0,
        "Q8_0": 8.5,
        "Q5_1": 6.0,
        "Q5_0": 5.5,
        "Q4_1": 5.0,
        "Q4_0": 4.5,
        "Q3_K": 3.4375,
        "Q2_K": 2.625,
    }
    for fmt in GGUF_FORMATS:  # and they are the gguf package's block sizes
        block, type_size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, fmt)]
        assert block == gguf_block_size(fmt)
        assert BITS_PER_WEIGHT[fmt] == 8 * type_size / block


@pytest.mark.parametrize("kind", ["gauss", "heavy", "positive", "sparse"])
@pytest.mark.parametrize(
    ("quantizer", "qtype", "nbytes"), [(quantize_q3_k, Q3_K, 110), (quantize_q2_k, Q2_K, 84)]
)
def test_k_quant_bytes_decode_through_gguf_to_what_they_claim(kind: str, quantizer, qtype, nbytes) -> None:
    x = _rows(len(kind), kind)
    blocks, claimed = quantizer(x)
    assert blocks.dtype == np.uint8 and blocks.shape == (x.size // 256, nbytes)
    decoded = gguf.quants.dequantize(blocks, qtype).reshape(claimed.shape)
    assert np.array_equal(decoded, claimed)
    assert np.abs(claimed.reshape(-1) - x).max() <= np.abs(x).max()  # and the claim is near the input


def test_q3_k_one_hot_block_by_hand() -> None:
    x = np.zeros(256, dtype=np.float32)
    x[37] = 1.0  # sub-block 2, value 5
    blocks, claimed = quantize_q3_k(x)
    # sub-block 2: largest value 1 -> iscale -4, level -4, scale sum(x^2 x l) / sum(x^2 l^2) = -1/4;
    # the other sub-blocks are zero (scale 0). Block: iscale -32 / -0.25 = 128, d = fp16(1/128);
    # 6-bit scales l + 32: sub-block 2 -> 0, others -> 32 (low nibbles 0, high bits 2)
    hmask, qs, scales, d = blocks[0, :32], blocks[0, 32:96], blocks[0, 96:108], blocks[0, 108:]
    assert d.view(np.float16)[0] == np.float16(1 / 128)
    assert scales.tolist() == [0] * 8 + [0xAA, 0xAA, 0xA8, 0xAA]  # 2 << 2k, sub-block 2's missing
    # requantised with d * (0 - 32) = -0.25: value 37 -> level -4 (+4 = 0, bit 2 clear); the other
    # values of sub-block 2 -> 0 (+4 = 4: bit 2 set in bit 1 of hmask, values 32..63); zero
    # sub-blocks keep level 0
    assert hmask.tolist() == [2] * 5 + [0] + [2] * 10 + [0] * 16
    assert not qs.any()
    expected = np.zeros(256, dtype=np.float32)
    expected[37] = 1.0
    assert np.array_equal(claimed[0], expected)


def test_q2_k_one_hot_block_by_hand() -> None:
    x = np.zeros(256, dtype=np.float32)
    x[37] = 1.0
    blocks, claimed = quantize_q2_k(x)
    # sub-block 2: min 0, max 1 -> scale 1/3 (level 3), min 0; block: d = fp16(1/3 / 15) =
    # 0.022216796875, sub-block scale round(15 * 3 * 1/3) = 15, dmin 0
    scales, qs, d, dmin = blocks[0, :16], blocks[0, 16:80], blocks[0, 80:82], blocks[0, 82:]
    assert scales.tolist() == [0, 0, 15] + [0] * 13
    assert d.view(np.float16)[0] == np.float16(0.022216796875)
    assert dmin.view(np.float16)[0] == 0
    # requantised: 1 / (15 d) = 3.0007 -> level 3, stored in qs[5] bits 2-3 (value 37 = 32 + 5)
    assert qs.tolist() == [0] * 5 + [3 << 2] + [0] * 58
    assert claimed[0, 37] == np.float32(15 * 0.022216796875) * 3
    assert np.count_nonzero(claimed) == 1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed", range(3))
def test_k_quants_beat_round_to_nearest_at_more_bits(seed: int) -> None:
    w = torch.from_numpy(_rows(seed, "gauss", 64 * 1024).reshape(64, 1024))
    q3 = _rel(gguf_fake_quantize(w, "Q3_K"), w)
    q2 = _rel(gguf_fake_quantize(w, "Q2_K"), w)
    # naive 3-bit RTN with a float16 scale per 32 values: 3.5 bits/weight, more than Q3_K's 3.4375
    rtn3 = QuantSpec(3, 32, sym=True)
    assert bits_per_weight(w.shape, rtn3) > BITS_PER_WEIGHT["Q3_K"]
    assert q3 < _rel(fake_quantize(w, rtn3), w)
    # naive 2-bit RTN per 32 values (scale and zero point): 2.56 bits/weight vs Q2_K's 2.625
    rtn2 = QuantSpec(2, 32, sym=False)
    assert q2 < 0.85 * _rel(fake_quantize(w, rtn2), w)
    # sane magnitudes for Gaussian weights (ggml's own figures: ~0.15 and ~0.30)
    assert 0.12 < q3 < 0.18 and 0.25 < q2 < 0.34
    # and the ladder of formats is ordered by bits
    errors = [_rel(gguf_fake_quantize(w, fmt), w) for fmt in GGUF_FORMATS]
    assert errors == sorted(errors)


def test_q4_0_matches_our_symmetric_4bit_groups_of_32() -> None:
    # gguf's Q4_0 (d = signed max / -8) is our symmetric rule at 4 bits in groups of 32; only the
    # rounding of exact ties (and x * (1/d) vs x / d) may differ
    w = torch.from_numpy(_rows(7, "gauss", 32 * 4096).reshape(32, 4096))
    ours = fake_quantize(w, QuantSpec(4, 32, sym=True))
    theirs = gguf_fake_quantize(w, "Q4_0")
    assert float((ours == theirs).float().mean()) > 0.999


def test_gguf_formats_keep_shape_dtype_and_refuse_partial_blocks() -> None:
    w = torch.randn(3, 96).to(torch.bfloat16)  # 288 values: whole blocks of 32, not of 256
    out = gguf_fake_quantize(w, "Q5_1")
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not fill whole Q3_K blocks of 256"):
        gguf_fake_quantize(w, "Q3_K")
    with pytest.raises(ValueError, match="unknown GGUF format"):
        gguf_quantize_blocks(np.zeros(32, dtype=np.float32), "Q4_K")


def test_fp8_cast_is_comfyui_e4m3fn_without_scale() -> None:
    w = torch.tensor([[0.1, -0.3, 1.7, 300.0]], dtype=torch.bfloat16)
    out = fp8_cast(w)
    assert out.dtype == torch.bfloat16
    # e4m3fn has 3 mantissa bits: 0.1 -> 0.1015625, 1.7 -> 1.75, 300 -> 288
    assert out.float().tolist() == [[0.1015625, -0.3125, 1.75, 288.0]]
