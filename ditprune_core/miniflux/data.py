"""Procedural digits for MiniFlux-C: scikit-learn's 8x8 digits redrawn larger, with random jitter.

Nothing is downloaded: every image is one of the 1797 digits that ship inside scikit-learn, warped by
a random affine map (rotation, scale, shear, shift), resampled bicubically to ``size`` x ``size``
pixels and given a random stroke width by thresholding the smooth upsampled digit with a soft step
(a lower threshold draws a thicker stroke). The same seed gives the same images, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["DigitStyle", "draw_digits", "procedural_digits", "render_digits", "source_digits"]


@dataclass(frozen=True)
class DigitStyle:
    """Ranges of the random jitter; each image draws its own values uniformly from them.

    Attributes:
        size: output images are ``size`` x ``size`` pixels.
        max_rotation_deg: rotation in ``[-max, max]`` degrees.
        scale: isotropic scale range (1 fills the frame as the 8x8 original does).
        max_shear: horizontal shear factor in ``[-max, max]``.
        max_shift: translation in ``[-max, max]`` of the half-width, each axis.
        stroke_threshold: the soft step's threshold range on the [0, 1] upsampled digit; lower is thicker.
        sharpness: slope of the soft step (``sigmoid(sharpness * (v - threshold))``).
    """

    size: int = 32
    max_rotation_deg: float = 12.0
    scale: tuple[float, float] = (0.85, 1.05)
    max_shear: float = 0.15
    max_shift: float = 0.08
    stroke_threshold: tuple[float, float] = (0.25, 0.55)
    sharpness: float = 12.0

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"DigitStyle.size must be at least 8 pixels, got {self.size}")
        for name in ("scale", "stroke_threshold"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"DigitStyle.{name} must be a range 0 < low <= high, got {(low, high)}")


@lru_cache(maxsize=1)
def _source_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def source_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits: images (N, 1, 8, 8) in [0, 1] and labels (N,)."""
    images, labels = _source_arrays()
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.copy())


def _affine(n: int, style: DigitStyle, gen: torch.Generator) -> torch.Tensor:
    """Random output->input affine maps (n, 2, 3) in ``affine_grid``'s normalised coordinates."""
    u = torch.rand(n, 5, generator=gen, dtype=torch.float64)
    angle = (2 * u[:, 0] - 1) * math.radians(style.max_rotation_deg)
    scale = style.scale[0] + (style.scale[1] - style.scale[0]) * u[:, 1]
    shear = (2 * u[:, 2] - 1) * style.max_shear
    shift = (2 * u[:, 3:5] - 1) * style.max_shift
    cos, sin = torch.cos(angle), torch.sin(angle)
    # forward map: rotate(shear(scale * p)) + shift; affine_grid wants its inverse (output -> input)
    forward = torch.zeros(n, 2, 2, dtype=torch.float64)
    forward[:, 0, 0], forward[:, 0, 1] = cos * scale, (cos * shear - sin) * scale
    forward[:, 1, 0], forward[:, 1, 1] = sin * scale, (sin * shear + cos) * scale
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)
    return theta.float()


def render_digits(
    sources: torch.Tensor, gen: torch.Generator, style: DigitStyle = DigitStyle()
) -> torch.Tensor:
    """Warp and redraw 8x8 digits: (N, 1, 8, 8) in [0, 1] -> (N, 1, size, size) in [-1, 1].

    Draws 6 random numbers per image from ``gen`` (5 for the affine map, 1 for the stroke width).
    """
    if sources.ndim != 4 or sources.shape[1] != 1:
        raise ValueError(f"render_digits wants (N, 1, H, W) digits, got shape {tuple(sources.shape)}")
    n = sources.shape[0]
    theta = _affine(n, style, gen)
    threshold = style.stroke_threshold[0] + (
        style.stroke_threshold[1] - style.stroke_threshold[0]
    ) * torch.rand(n, generator=gen)
    grid = F.affine_grid(theta, [n, 1, style.size, style.size], align_corners=False)
    smooth = F.grid_sample(sources, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    step_at = threshold[:, None, None, None]
    stroke = torch.sigmoid(style.sharpness * (smooth - step_at))
    background = torch.sigmoid(-style.sharpness * step_at)  # the step's value on an empty pixel
    stroke = ((stroke - background) / (1 - background)).clamp(0.0, 1.0)
    return stroke * 2.0 - 1.0


def draw_digits(
    n: int, gen: torch.Generator, *, style: DigitStyle = DigitStyle(), classes: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random procedural digits drawn with ``gen``: images (n, 1, size, size) in [-1, 1], labels (n,).

    The trainer calls this once per step with one generator; :func:`procedural_digits` is the
    same with a fresh generator from a seed.

    Args:
        n: number of images.
        gen: the random source (advanced by the call).
        style: jitter ranges.
        classes: draw only source digits of these classes (default: all ten).
    """
    sources, labels = source_digits()
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(classes))
        if not keep.any():
            raise ValueError(f"no source digit has a class in {classes}; classes are 0..9")
        sources, labels = sources[keep], labels[keep]
    index = torch.randint(0, sources.shape[0], (n,), generator=gen)
    return render_digits(sources[index], gen, style), labels[index]


def procedural_digits(
    n: int, *, seed: int, style: DigitStyle = DigitStyle(), classes: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw_digits` from ``torch.Generator().manual_seed(seed)``: the same seed, the same digits."""
    return draw_digits(n, torch.Generator().manual_seed(seed), style=style, classes=classes)
