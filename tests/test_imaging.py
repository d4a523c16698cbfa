"""Image grids, the demo's row labels and PNG writing (Pillow)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ditprune_core.util.imaging import image_grid, label_rows, write_png


def test_label_rows_puts_each_label_on_its_row() -> None:
    grid = torch.zeros(90, 10, 3)  # three black rows of 30 px
    out = label_rows(grid, ["dense", "DiT-Pruning", "Wanda"], size=12, pad=2)
    assert out.shape[0] == 90 and out.shape[1] > 10 + 4
    assert torch.equal(out[:, -10:], grid)
    column = out[:, :-10]
    for row in range(3):  # ink in every row's band, none on the band edges
        band = column[row * 30 : (row + 1) * 30]
        assert (band < 0.5).any()
        assert (band[0] == 1).all() and (band[-1] == 1).all()
    with pytest.raises(ValueError, match="too low"):
        label_rows(torch.zeros(12, 4, 3), ["a", "b", "c"], size=14)
    with pytest.raises(ValueError, match="at least one"):
        label_rows(grid, [])


def test_write_png_round_trips(tmp_path) -> None:
    grid = image_grid(torch.linspace(-1, 1, 2 * 4 * 4).reshape(2, 1, 4, 4), rows=1, scale=2)
    path = write_png(grid, tmp_path / "g.png")
    back = torch.from_numpy(__import__("numpy").asarray(Image.open(path), dtype="float32") / 255)
    assert back.shape == grid.shape and (back - grid).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(FileExistsError):
        write_png(grid, path)
