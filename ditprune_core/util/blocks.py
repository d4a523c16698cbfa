"""The one memory policy for block-wise work: how many rows of a given width fit a temporary budget.

Pruning a FLUX layer must not build full-size temporaries beside its scores, so every loop over a
big tensor walks it a block of rows at a time. The budgets are element counts of those temporaries.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["BLOCK_ELEMENTS", "HOOK_ELEMENTS", "PACK_ELEMENTS", "row_blocks", "rows_per_block"]

#: default budget: 1 MB of float32 (2 MB of int64) per temporary
BLOCK_ELEMENTS = 1 << 18
#: bit packing works on bool blocks, which are cheap: 4 MB
PACK_ELEMENTS = 1 << 22
#: calibration hooks square activations in float32 chunks: at most 64 MB per hook call
HOOK_ELEMENTS = 1 << 24


def rows_per_block(width: int, budget: int = BLOCK_ELEMENTS) -> int:
    """How many rows of ``width`` elements fit in ``budget`` elements (at least one)."""
    return max(1, budget // max(1, width))


def row_blocks(n_rows: int, width: int, budget: int = BLOCK_ELEMENTS) -> Iterator[slice]:
    """Slices covering ``range(n_rows)`` in order, each of at most ``rows_per_block`` rows."""
    step = rows_per_block(width, budget)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))
