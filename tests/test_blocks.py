"""The row-block memory policy."""

from __future__ import annotations

from ditprune_core.util.blocks import BLOCK_ELEMENTS, row_blocks, rows_per_block


def test_rows_per_block_by_hand() -> None:
    assert rows_per_block(1000, budget=4096) == 4
    assert rows_per_block(10_000, budget=4096) == 1  # always at least one row
    assert rows_per_block(0, budget=4096) == 4096  # an empty width never divides by zero
    assert rows_per_block(3072) == BLOCK_ELEMENTS // 3072 == 85


def test_row_blocks_cover_in_order_without_overlap() -> None:
    assert list(row_blocks(10, 3, budget=12)) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert list(row_blocks(0, 3)) == []
