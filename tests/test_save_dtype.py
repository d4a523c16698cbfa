"""The save dtype read back from the weights: tiny cases whose answer is written out."""

from __future__ import annotations

import pytest
import torch

from ditprune_core.util.save_dtype import cast_exactly, exact_in, narrowest_exact_dtype

F32 = torch.float32


def test_narrowest_exact_dtype_by_hand() -> None:
    fp8 = torch.tensor([1.0, 0.5, -2.0, 0.0])  # 1 mantissa bit at most: fp8 e4m3fn holds them
    bf16 = torch.tensor([1.0, 1 + 2**-7])  # 7 mantissa bits: bf16, not fp8
    fp16 = torch.tensor([1.0, 1 + 2**-10])  # 10 mantissa bits: fp16, not bf16
    fp32 = torch.tensor([1 + 2**-20])
    assert narrowest_exact_dtype([fp8]) == (F32, torch.float8_e4m3fn)
    assert narrowest_exact_dtype([fp8, bf16]) == (F32, torch.bfloat16)
    assert narrowest_exact_dtype([fp8, bf16, fp16]) == (F32, torch.float16)
    assert narrowest_exact_dtype([fp8, fp32]) is None
    assert narrowest_exact_dtype([torch.tensor([2.0**-16])]) == (F32, torch.float8_e5m2)  # below e4m3's range
    assert narrowest_exact_dtype([torch.tensor([99840.0])]) == (F32, torch.bfloat16)  # > fp16's 65504
    assert narrowest_exact_dtype([torch.arange(3)]) is None  # no float tensor
    # a tensor already narrower than a candidate need not be exact in it: the stored dtype is fp32
    # by count, the bf16 buffer stays as it is
    mixed = [torch.ones(100), torch.tensor([1 + 2**-7], dtype=torch.bfloat16)]
    assert narrowest_exact_dtype(mixed) == (F32, torch.bfloat16)
    assert narrowest_exact_dtype([torch.ones(4, dtype=torch.bfloat16)]) == (
        torch.bfloat16,
        torch.float8_e4m3fn,
    )
    assert narrowest_exact_dtype([torch.tensor([1.0], dtype=torch.float8_e4m3fn)]) is None


def test_a_sample_chooses_and_the_full_check_catches_what_it_missed() -> None:
    w = torch.ones(10_000)
    w[1] = 1 + 2**-20  # not among the sampled entries (0, 9999 // 3, ...)
    assert narrowest_exact_dtype([w], samples=4) == (F32, torch.float8_e4m3fn)
    assert narrowest_exact_dtype([w], samples=None) is None
    assert exact_in(w, torch.bfloat16, samples=4) and not exact_in(w, torch.bfloat16)
    with pytest.raises(ValueError, match=r"'w': its weights are not all exact in bfloat16.*by hand"):
        cast_exactly(w, torch.bfloat16, "w", original=w)
    nan = torch.tensor([float("nan"), 1.0])
    assert exact_in(nan, torch.bfloat16)  # NaN stays NaN


def test_cast_exactly_refuses_overflow_and_keeps_values() -> None:
    w = torch.tensor([1.0, -0.25, 1 + 2**-7])
    out = cast_exactly(w, torch.bfloat16, "w", original=w)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), w)
    with pytest.raises(ValueError, match=r"'big' holds 70000, which does not fit in float16"):
        cast_exactly(torch.tensor([1.0, -70000.0]), torch.float16, "big")
    with pytest.raises(ValueError, match="'x' holds 500, which does not fit in float8_e4m3fn"):
        cast_exactly(torch.tensor([500.0]), torch.float8_e4m3fn, "x")  # torch saturates it to 448
    inf = cast_exactly(torch.tensor([float("inf")]), torch.float16, "inf")  # not an overflow: it was inf
    assert torch.isinf(inf).all()


def test_the_save_dtype_policy_by_hand() -> None:
    from ditprune_core.util.save_dtype import needs_cast

    w32, w16 = torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.bfloat16)
    assert needs_cast(w32, torch.bfloat16, inferred=True) and needs_cast(w32, torch.bfloat16, inferred=False)
    assert not needs_cast(w16, torch.bfloat16, inferred=False)  # already that dtype
    assert not needs_cast(w16, torch.float32, inferred=True)  # inferred: stored at most that narrow
    assert needs_cast(w16, torch.float32, inferred=False)  # asked for: widened
    assert not needs_cast(torch.ones(2, dtype=torch.int64), torch.bfloat16, inferred=False)
    assert not needs_cast(w32, None, inferred=False)
