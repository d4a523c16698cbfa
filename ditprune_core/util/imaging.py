"""Pictures as tensors: image grids, row labels beside them, and writing them as PNG (with Pillow).

Images are float tensors (H, W, 3) in [0, 1], the layout of ComfyUI's IMAGE (without the batch).
Plots with axes are made with matplotlib in :mod:`ditprune_core.util.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .io import atomic_path

__all__ = ["image_grid", "label_rows", "to_pil", "write_png"]


def to_pil(image: torch.Tensor) -> Image.Image:
    """An (H, W, 3) or (H, W) image in [0, 1] as an 8-bit RGB Pillow image."""
    img = image.detach().float().clamp(0, 1)
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    return Image.fromarray((img * 255).round().to(torch.uint8).contiguous().numpy(), mode="RGB")


def write_png(image: torch.Tensor, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an (H, W, 3) or (H, W) image in [0, 1] as an 8-bit PNG, atomically."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        to_pil(image).save(tmp, format="PNG")
    return path


def image_grid(images: torch.Tensor, rows: int, *, scale: int = 4, pad: int = 2) -> torch.Tensor:
    """Tile (N, 1 or 3, h, w) images in [-1, 1] into an (H, W, 3) grid in [0, 1], ``rows`` rows."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    imgs = ((images.float().clamp(-1, 1) + 1) / 2).expand(n, 3, h, w) if c == 1 else (images.float() + 1) / 2
    imgs = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    hh, ww = h * scale + pad, w * scale + pad
    grid = torch.ones(rows * hh + pad, cols * ww + pad, 3)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[pad + r * hh : pad + r * hh + h * scale, pad + col * ww : pad + col * ww + w * scale] = imgs[
            i
        ].permute(1, 2, 0)
    return grid


def label_rows(grid: torch.Tensor, labels: Sequence[str], *, size: int = 14, pad: int = 6) -> torch.Tensor:
    """``grid`` (H, W, 3) with a white column on its left naming each of its ``len(labels)``
    equal-height rows, the text (Pillow's default font, ``size`` px) centred on its row.
    Returns (H, W + label width, 3).

    Raises:
        ValueError: no labels, or rows too low for the text.
    """
    if not labels:
        raise ValueError("label_rows needs at least one label")
    font = ImageFont.load_default(size=size)
    height = grid.shape[0]
    row_h = height / len(labels)
    boxes = [font.getbbox(label) for label in labels]
    width = max(box[2] for box in boxes) + 2 * pad
    column = Image.new("RGB", (int(width), height), "white")
    draw = ImageDraw.Draw(column)
    for i, (label, box) in enumerate(zip(labels, boxes, strict=True)):
        text_h = box[3] - box[1]
        if text_h > row_h:
            raise ValueError(f"row {i} is {row_h:.0f} px high, too low for a {text_h} px label")
        draw.text((pad, i * row_h + row_h / 2), label, fill="black", font=font, anchor="lm")
    pixels = torch.from_numpy(np.asarray(column, dtype=np.float32) / 255.0).to(grid.dtype)
    return torch.cat([pixels, grid], dim=1)
