"""The layout objects themselves: packing, the decode of codes, the spec piece (ditprune_core.layouts).

Files written and read through them are tested in test_save.py and test_save_quantized.py; the
runtime decode in test_runtime.py.
"""

from __future__ import annotations

import torch
from bit_equality import bits as tensor_bits
from bit_equality import same_bits

from ditprune_core.layouts import (
    LAYOUTS,
    choose_quantized_layout,
    spec_piece,
)
from ditprune_core.quantize import (
    QuantSpec,
    dequantize_weight,
    pack_codes,
    quantize_weight,
    unpack_codes,
    unpack_stream,
)
from ditprune_core.util.packing import count_bits_per_row, pack_bits, unpack_bits


def test_fast_unpacking_equals_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, (1001,), generator=gen, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert torch.equal(unpack_stream(packed, bits)[:1001], unpack_codes(packed, bits, 1001))
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


# ------------------------------------------------------------------------------------------------
# files of every layout x value format, byte for byte as the format's first writer wrote them


def _golden_state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(19)
    unstructured = torch.randn(24, 48, generator=gen) * (torch.rand(24, 48, generator=gen) > 0.5)
    unstructured[3] = 0.0  # an empty row
    pairs = torch.rand(24, 12, 4, generator=gen).topk(2, dim=2).indices
    two_four = torch.zeros(24, 12, 4, dtype=torch.bool).scatter_(2, pairs, True).reshape(24, 48)
    return {
        "blocks.0.a.weight": unstructured.to(dtype),
        "blocks.0.b.weight": (torch.randn(24, 48, generator=gen) * two_four).to(dtype),
        "blocks.0.c.weight": torch.randn(16, 40, generator=gen).to(dtype),
        "blocks.0.a.bias": torch.randn(24, generator=gen).to(dtype),
    }


def _given_codes(state: dict[str, torch.Tensor], specs: tuple[QuantSpec, QuantSpec, QuantSpec]) -> dict:
    """Codes for the bitmask, 2:4 and dense weights of ``state``; the state then holds their values."""
    codes = {}
    for key, spec in zip(("blocks.0.a.weight", "blocks.0.b.weight", "blocks.0.c.weight"), specs, strict=True):
        w = state[key]
        keep = None if key.endswith("c.weight") else w != 0
        codes[key] = quantize_weight(w.float(), spec, keep=keep)
        state[key] = dequantize_weight(codes[key], torch.float32).to(w.dtype)
    return codes


def _golden_saves() -> dict[str, tuple[torch.dtype, dict]]:
    cols = QuantSpec(4, 16, sym=True, grouping="columns")
    return {
        "keep bf16": (torch.bfloat16, {}),
        "keep fp32": (torch.float32, {}),
        "fp8": (torch.bfloat16, {"values": "fp8"}),
        "int8": (torch.bfloat16, {"values": "int8"}),
        "int4": (torch.float16, {"values": "int4"}),
        "int3": (torch.bfloat16, {"values": "int3"}),
        "int4 columns": (torch.bfloat16, {"values": cols}),
        "int3 g7 asym": (torch.bfloat16, {"values": QuantSpec(3, 7, sym=False)}),
        "remainder fp8": (torch.bfloat16, {"remainder": "fp8"}),
        "remainder int8": (torch.bfloat16, {"values": "int4", "remainder": "int8"}),
        "remainder int4": (torch.bfloat16, {"values": "fp8", "remainder": "int4"}),
        "given codes": (
            torch.bfloat16,
            {"given": (QuantSpec(4, 16, sym=False), QuantSpec(3, 16), QuantSpec(4, 16))},
        ),
        "given columns": (
            torch.bfloat16,
            {"given": (cols, QuantSpec(3, 5, sym=False, grouping="columns"), QuantSpec(2, 7))},
        ),
    }


def _golden_digests(folder) -> dict[str, tuple[str, str]]:
    import hashlib

    from ditprune_core.save import load_pruned_checkpoint, save_pruned_checkpoint

    out = {}
    for name, (dtype, options) in _golden_saves().items():
        state = _golden_state(dtype)
        options = dict(options)
        if "given" in options:
            options["quantized"] = _given_codes(state, options.pop("given"))
        path = folder / f"{name.replace(' ', '_')}.safetensors"
        save_pruned_checkpoint(state, path, **options)
        decoded = hashlib.sha256()
        for key, tensor in sorted(load_pruned_checkpoint(path).items()):
            decoded.update(key.encode() + str(tensor.dtype).encode() + tensor_bits(tensor).numpy().tobytes())
        out[name] = (hashlib.sha256(path.read_bytes()).hexdigest()[:16], decoded.hexdigest()[:16])
    return out


#: sha256 (first 16 hex digits) of each file and of its decoded state dict, as written by the
#: layouts.py of commit bf8961f (before the layouts became a package): a change that alters one byte
#: of a file, or one bit of what it decodes to, fails here
GOLDEN = {
    "keep bf16": ("870aa7400908541a", "ce482a5345fbc455"),
    "keep fp32": ("ed95f179aa7d6bd4", "ed65b3cc2d9a1b66"),
    "fp8": ("e9e73a0e844e6497", "91516d99d2f7aca1"),
    "int8": ("42dd472cba29dde0", "b082b859b264bb8d"),
    "int4": ("8a3627eeaa15c934", "dc77ae9cef7d879c"),
    "int3": ("90f0de784d6ed837", "37b08277cd42e88a"),
    "int4 columns": ("87cf15e8986cdff2", "2a538644055edc48"),
    "int3 g7 asym": ("d91ad31b261028ad", "76dac6e5c95bd580"),
    "remainder fp8": ("c8a5f94a71ee511c", "924a0a43113de51e"),
    "remainder int8": ("331cfab7c9f0c5af", "ed4082c11e3ff1b0"),
    "remainder int4": ("2d9c8d42b86d13fa", "0e312cc241e7e45c"),
    "given codes": ("c6dcaf68be52d4cb", "64f99551b7544ce4"),
    "given columns": ("2eea467c9c3b115f", "77504c5ce0f65694"),
}


def test_files_of_every_layout_and_value_format_are_byte_identical_to_the_golden_ones(tmp_path) -> None:
    # bitmask and 2:4 with dtype, fp8 and quantised values (kept and column groups, sym and asym,
    # ragged groups), dense with fp8 and quantised values, codes given or rounded at save
    assert _golden_digests(tmp_path) == GOLDEN
