"""The label font and row labels of the demo grid."""

from __future__ import annotations

import pytest
import torch

from ditprune_core.util.glyphs import label_rows, text_image


def test_text_image_draws_the_glyph_pixels() -> None:
    img = text_image("-", scale=1)  # a 5x7 dash in row 3, then one blank column
    assert img.shape == (7, 6, 3)
    ink = img[..., 0] == 0
    expected = torch.zeros(7, 6, dtype=torch.bool)
    expected[3, :5] = True
    assert torch.equal(ink, expected)
    assert torch.equal(text_image("i", scale=1), text_image("I", scale=1))  # lower case as capitals
    assert text_image("AB", scale=3).shape == (21, 36, 3)


def test_unknown_characters_are_named() -> None:
    with pytest.raises(ValueError, match="no '#'"):
        text_image("#1")


def test_label_rows_centres_each_label_on_its_row() -> None:
    grid = torch.zeros(60, 10, 3)  # three black rows of 20 px
    out = label_rows(grid, ["A", "B", "C"], scale=1, pad=2)
    assert out.shape == (60, 6 + 4 + 10, 3)
    assert torch.equal(out[:, 10:], grid)  # the grid itself is untouched, to the right
    for row, letter in enumerate("ABC"):
        # a 7 px label in a 20 px row starts round(6.5) = 6 px down (Python rounds half to even)
        band = out[row * 20 : row * 20 + 20, :10, 0] == 0
        rows_with_ink = band.any(1).nonzero().flatten()
        assert (rows_with_ink.min().item(), rows_with_ink.max().item()) == (6, 12)
        assert torch.equal(band[6:13, 2:8], text_image(letter, scale=1)[..., 0] == 0)


def test_label_rows_refuses_rows_too_low_for_the_text() -> None:
    with pytest.raises(ValueError, match="too low"):
        label_rows(torch.zeros(10, 4, 3), ["A", "B"], scale=1)
