from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ditprune_core import PruneConfig, apply_masks_, compute_masks, sparsity_report
from ditprune_core.prune import prune_model_
from ditprune_core.util.packing import PackedMask, pack_bits, unpack_bits


def test_pack_bits_by_hand_little_endian() -> None:
    mask = torch.tensor([[True, False, False, False, False, False, False, False, True, True]])
    bits = pack_bits(mask)
    assert bits.tolist() == [[1, 3]]  # element 0 -> bit 0 of byte 0; elements 8, 9 -> bits 0, 1 of byte 1
    assert torch.equal(unpack_bits(bits, 10), mask)


def test_layout_matches_numpy_packbits_little() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 29, generator=gen) > 0.5
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(pack_bits(mask).numpy(), expected)
    packed = PackedMask.from_bool(mask)
    assert packed.kept() == int(mask.sum())
    assert packed.nbytes == 7 * 4
    assert torch.equal(packed.to_bool(), mask)


def test_unpack_refuses_a_mismatched_bitmask() -> None:
    with pytest.raises(ValueError, match="does not fit 30 columns"):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 30)


def test_packed_masks_prune_like_bool_masks(tiny_flux: nn.Module) -> None:
    config = PruneConfig(0.5, metric="magnitude", granularity="row")
    plain = compute_masks(tiny_flux, None, config)
    packed = compute_masks(tiny_flux, None, config, packed=True)
    assert all(isinstance(m, PackedMask) for m in packed.values())
    assert sparsity_report(tiny_flux, packed).total == sparsity_report(tiny_flux, plain).total
    import copy

    a, b = copy.deepcopy(tiny_flux), copy.deepcopy(tiny_flux)
    apply_masks_(a, plain)
    apply_masks_(b, packed)
    report = prune_model_(tiny_flux, None, config)
    for (name, p1), (_, p2), (_, p3) in zip(
        a.named_parameters(), b.named_parameters(), tiny_flux.named_parameters(), strict=True
    ):
        assert torch.equal(p1, p2), name
        assert torch.equal(p1, p3), name
    assert report.sparsity == pytest.approx(0.5)
