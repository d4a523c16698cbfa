"""Shared by the core tests: equality of tensors bit for bit (+0.0 and -0.0 differ, NaN equals
itself), not merely value for value. Import it by name: pytest puts ``tests/`` on ``sys.path``."""

from __future__ import annotations

import torch

__all__ = ["bits", "same_bits"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers of its element size."""
    return t.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
