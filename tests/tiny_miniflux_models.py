"""Shared by the core tests: the tiny MiniFlux (FLUX's layer names, random weights) and one forward
pass of it on random inputs. Import it by name (``from tiny_miniflux_models import ...``): pytest
puts ``tests/`` on ``sys.path`` (and ``tests/comfyui/``, whose own ``tiny_models`` is the node
tests'). Fixtures shared by many tests are in ``tests/conftest.py``.
"""

from __future__ import annotations

import torch

from ditprune_core.miniflux.model import MiniFlux, MiniFluxConfig

__all__ = ["tiny_miniflux", "tiny_miniflux_forward"]


def tiny_miniflux(seed: int = 0) -> MiniFlux:
    """A MiniFlux of width 16, one double and one single block, seeded."""
    torch.manual_seed(seed)
    return MiniFlux(
        MiniFluxConfig(hidden_size=16, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(2, 2, 4))
    )


def tiny_miniflux_forward(model: MiniFlux, batch: int, seed: int) -> None:
    """One forward pass of ``model`` on seeded random inputs (``batch`` samples of 16 image tokens)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    img = torch.randn(batch, 16, cfg.in_channels, generator=gen)
    txt = torch.randn(batch, cfg.context_tokens, cfg.context_dim, generator=gen)
    model(
        img,
        torch.zeros(batch, 16, 3),
        txt,
        torch.zeros(batch, cfg.context_tokens, 3),
        torch.rand(batch, generator=gen),
        torch.randn(batch, cfg.vec_dim, generator=gen),
    )
