"""Shared fixtures: tiny DiTs with real FLUX / SD3 layer names, built from random weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditprune_core.miniflux.model import MiniFlux, MiniFluxConfig


@pytest.fixture
def tiny_flux() -> MiniFlux:
    torch.manual_seed(0)
    return MiniFlux(
        MiniFluxConfig(hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6))
    ).eval()


class _SD3Block(nn.Module):
    def __init__(self, hidden: int, last: bool = False) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(hidden, 3 * hidden)
        if not last:
            self.attn.proj = nn.Linear(hidden, hidden)
            self.mlp = nn.Module()
            self.mlp.fc1 = nn.Linear(hidden, 4 * hidden)
            self.mlp.fc2 = nn.Linear(4 * hidden, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))


class _SD3Joint(nn.Module):
    def __init__(self, hidden: int, last: bool) -> None:
        super().__init__()
        self.context_block = _SD3Block(hidden, last)
        self.x_block = _SD3Block(hidden)


class TinySD3(nn.Module):
    """The module tree of ComfyUI's MMDiT (names only; no forward needed for layer tests)."""

    def __init__(self, hidden: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(16, hidden, 2, 2)
        self.context_embedder = nn.Linear(32, hidden)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.joint_blocks = nn.ModuleList(_SD3Joint(hidden, last=i == depth - 1) for i in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(hidden, 64)


@pytest.fixture
def tiny_sd3() -> TinySD3:
    torch.manual_seed(0)
    return TinySD3()
