"""Text in images without an imaging dependency: a 5x7 bitmap font, and labels beside grid rows.

Images are float tensors (H, W, 3) in [0, 1], as in :mod:`ditprune_core.util.imaging`. The font has
capitals, digits and ``- ( ) % . : , / = +``; lower case is drawn as capitals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["label_rows", "text_image"]

_FONT: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    "%": ("##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    ",": (".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    " ": (".....",) * 7,
}
_GLYPHS = {
    ch: torch.tensor([[c == "#" for c in row] for row in rows], dtype=torch.bool)
    for ch, rows in _FONT.items()
}


def text_image(text: str, *, scale: int = 2) -> torch.Tensor:
    """``text`` as a (7 * scale, 6 * scale * len(text), 3) image: black on white.

    Raises:
        ValueError: for a character the font lacks (it names the character).
    """
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    columns = []
    for ch in text.upper():
        glyph = _GLYPHS.get(ch)
        if glyph is None:
            raise ValueError(f"the label font has no {ch!r}; use letters, digits and - ( ) % . : , / = +")
        columns += [glyph, torch.zeros(7, 1, dtype=torch.bool)]
    ink = torch.cat(columns, dim=1) if columns else torch.zeros(7, 0, dtype=torch.bool)
    ink = ink.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (~ink).float()[..., None].expand(-1, -1, 3).clone()


def label_rows(grid: torch.Tensor, labels: Sequence[str], *, scale: int = 2, pad: int = 6) -> torch.Tensor:
    """``grid`` (H, W, 3) with a white column on its left naming each of its ``len(labels)``
    equal-height rows, the text centred on its row. Returns (H, W + label width, 3)."""
    if not labels:
        raise ValueError("label_rows needs at least one label")
    height = grid.shape[0]
    row_h = height / len(labels)
    texts = [text_image(label, scale=scale) for label in labels]
    width = max(t.shape[1] for t in texts) + 2 * pad
    column = torch.ones(height, width, 3, dtype=grid.dtype)
    for i, text in enumerate(texts):
        top = round(i * row_h + (row_h - text.shape[0]) / 2)
        if top < 0 or top + text.shape[0] > height:
            raise ValueError(f"row {i} is {row_h:.0f} px high, too low for a {text.shape[0]} px label")
        column[top : top + text.shape[0], pad : pad + text.shape[1]] = text.to(grid.dtype)
    return torch.cat([column, grid], dim=1)
