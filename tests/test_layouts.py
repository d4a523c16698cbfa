"""The layout objects themselves: packing, the decode of codes, the spec piece (ditprune_core.layouts).

Files written and read through them are tested in test_save.py and test_save_quantized.py; the
runtime decode in test_runtime.py.
"""

from __future__ import annotations

import torch
from bit_equality import same_bits

from ditprune_core.layouts import (
    LAYOUTS,
    _unpack_all,
    choose_quantized_layout,
    spec_piece,
)
from ditprune_core.quantize import (
    QuantSpec,
    dequantize_weight,
    pack_codes,
    quantize_weight,
    unpack_codes,
)
from ditprune_core.util.packing import count_bits_per_row, pack_bits, unpack_bits


def test_fast_unpacking_equals_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, (1001,), generator=gen, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert torch.equal(_unpack_all(packed, bits)[:1001], unpack_codes(packed, bits, 1001))
    mask = torch.rand(37, 83, generator=gen) > 0.5
    packed_mask = pack_bits(mask)
    assert torch.equal(unpack_bits(packed_mask, 83), mask)
    assert torch.equal(count_bits_per_row(packed_mask), mask.sum(dim=1))


def test_decoded_zeros_are_positive_zero() -> None:
    # symmetric scales are negative when the group's peak is positive: s * (c - z) at c == z is -0.0
    w = torch.tensor([[4.0, 0.0, 1.0, 0.0] * 64])
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[0, 1::4] = False
    q = quantize_weight(w, QuantSpec(3, 64, sym=True), keep=keep)
    assert float(q.scales[0]) < 0 and int((q.codes == 4).sum()) > 0  # code 4 = the zero point
    decoded = LAYOUTS["bitmask"].decode(LAYOUTS["bitmask"].encode_quantized(q), torch.float32)
    assert not bool(torch.signbit(decoded[decoded == 0]).any())
    assert same_bits(decoded, dequantize_weight(q, torch.float32))


def test_spec_piece_round_trips() -> None:
    for spec in (QuantSpec(4, 128, sym=False), QuantSpec(3, 7, grouping="columns"), QuantSpec(8, 1)):
        from ditprune_core.layouts import spec_of_piece

        assert spec_of_piece(spec_piece(spec)) == spec
    assert choose_quantized_layout((4, 8), QuantSpec(4), torch.ones(4, 8, dtype=torch.bool)).name == "dense"
