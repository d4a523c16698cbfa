"""Small picture helpers with no imaging dependency: PNG writing, image grids, bar and scatter plots.

Images are float tensors (H, W, 3) in [0, 1], the layout of ComfyUI's IMAGE (without the batch).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from .io import atomic_path

__all__ = ["PALETTE", "bar_chart", "image_grid", "scatter_plot", "write_png"]

#: Colours for clusters / series, RGB in [0, 1] (colour-blind friendly, Okabe-Ito).
PALETTE = torch.tensor(
    [
        [0.0, 0.45, 0.70],
        [0.90, 0.62, 0.0],
        [0.0, 0.62, 0.45],
        [0.80, 0.40, 0.0],
        [0.35, 0.70, 0.90],
        [0.80, 0.60, 0.70],
        [0.94, 0.89, 0.26],
        [0.0, 0.0, 0.0],
    ]
)


def write_png(image: torch.Tensor, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an (H, W, 3) or (H, W) image in [0, 1] as an 8-bit PNG, atomically."""
    img = image.detach().float().clamp(0, 1)
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    h, w, _ = img.shape
    pixels = (img * 255).round().to(torch.uint8).contiguous().numpy()
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(png)
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


def scatter_plot(
    points: torch.Tensor, labels: torch.Tensor, *, size: int = 384, dot: int = 2
) -> torch.Tensor:
    """Scatter of (N, 2) points coloured by integer ``labels``; (size, size, 3) white background."""
    img = torch.ones(size, size, 3)
    pts = points.float()
    lo, hi = pts.min(0).values, pts.max(0).values
    span = (hi - lo).clamp_min(1e-9)
    margin = 8
    xy = ((pts - lo) / span * (size - 2 * margin - 1)).round().long() + margin
    x, y = xy[:, 0], size - 1 - xy[:, 1]
    # axes
    img[size - margin, margin : size - margin] = 0.3
    img[margin : size - margin, margin] = 0.3
    colours = PALETTE[labels.long() % len(PALETTE)]
    for dy in range(-dot, dot + 1):
        for dx in range(-dot, dot + 1):
            img[(y + dy).clamp(0, size - 1), (x + dx).clamp(0, size - 1)] = colours
    return img


def bar_chart(
    values: Sequence[float],
    *,
    height: int = 200,
    bar: int = 12,
    gap: int = 3,
    colours: Sequence[int] | None = None,
) -> torch.Tensor:
    """Vertical bars for values in [0, 1] (e.g. sparsity per block) with 25/50/75 % grid lines."""
    n = len(values)
    width = max(1, n * (bar + gap) + gap)
    img = torch.ones(height, width, 3)
    for frac in (0.25, 0.5, 0.75):
        img[height - 1 - int(frac * (height - 1))] = 0.85
    for i, v in enumerate(values):
        top = height - round(min(max(float(v), 0.0), 1.0) * (height - 1))
        x0 = gap + i * (bar + gap)
        colour = PALETTE[(colours[i] if colours is not None else 0) % len(PALETTE)]
        img[top:height, x0 : x0 + bar] = colour
    return img
