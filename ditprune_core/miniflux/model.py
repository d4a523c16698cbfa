"""MiniFlux: a small FLUX-architecture diffusion transformer used as the project's test-bed.

The module tree and Linear names follow ComfyUI's ``comfy.ldm.flux.model.Flux`` (``img_in``,
``time_in.in_layer``, ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` ...), so every
layer template and every pruning code path that runs on FLUX runs on MiniFlux unchanged. It is
written from the published FLUX architecture, not copied from any implementation.

Differences from FLUX.1, all of scale only: hidden width, head count and depth are tiny; images are
single-channel digits, 8x8 patchified 2x2 (16 tokens of 4 channels; miniflux-a and -b) or 32x32
patchified 4x4 (64 tokens of 16 channels; miniflux-c), in pixel space; the "text encoder" is a fixed,
seeded table of context tokens per class (see :class:`ClassConditioner`); no guidance embedder
(like FLUX.1-schnell).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ClassConditioner", "MiniFlux", "MiniFluxConfig", "patchify", "unpatchify"]


@dataclass(frozen=True)
class MiniFluxConfig:
    """Shape of a MiniFlux model. ``hidden_size`` must divide by ``num_heads``."""

    hidden_size: int = 64
    num_heads: int = 4
    mlp_ratio: float = 4.0
    depth: int = 2
    depth_single_blocks: int = 2
    in_channels: int = 4
    context_dim: int = 32
    vec_dim: int = 32
    context_tokens: int = 4
    image_size: int = 8
    patch_size: int = 2
    num_classes: int = 10
    axes_dim: tuple[int, ...] = (4, 6, 6)
    theta: int = 10_000

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every rotary axis dimension must be even, got {self.axes_dim}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(
                f"axes_dim {self.axes_dim} must sum to the head size {self.hidden_size // self.num_heads}"
            )

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` (B,) in [0, 1] -> (B, dim), FLUX convention (t * 1000)."""
    t = t * time_factor
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: int) -> torch.Tensor:
    """Rotary angles for position ids (B, L, n_axes) -> (B, L, head_dim // 2)."""
    parts = []
    for axis, dim in enumerate(axes_dim):
        scale = torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim
        omega = 1.0 / (theta**scale)
        parts.append(ids[..., axis, None].double() * omega)
    return torch.cat(parts, dim=-1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of ``x`` (B, H, L, D) by ``angles`` (B, L, D // 2)."""
    x_pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = torch.cos(angles)[:, None]
    sin = torch.sin(angles)[:, None]
    real = x_pairs[..., 0] * cos - x_pairs[..., 1] * sin
    imag = x_pairs[..., 0] * sin + x_pairs[..., 1] * cos
    return torch.stack([real, imag], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rrms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).type_as(x) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, _ = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return self.norm.query_norm(q), self.norm.key_norm(k), v


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden)
    )


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden, num_heads))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", _mlp(hidden, mlp_hidden))

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        streams = {"img": img, "txt": txt}
        mods, qkvs = {}, {}
        for name, x in streams.items():
            mod = getattr(self, f"{name}_mod")(vec)
            mods[name] = mod
            normed = (1 + mod[1]) * getattr(self, f"{name}_norm1")(x) + mod[0]
            qkvs[name] = getattr(self, f"{name}_attn").split_qkv(normed)
        q, k, v = (torch.cat([qkvs["txt"][i], qkvs["img"][i]], dim=2) for i in range(3))
        attn = attention(q, k, v, angles)
        n_txt = txt.shape[1]
        attn_parts = {"txt": attn[:, :n_txt], "img": attn[:, n_txt:]}
        out = []
        for name in ("img", "txt"):
            x, mod = streams[name], mods[name]
            x = x + mod[2] * getattr(self, f"{name}_attn").proj(attn_parts[name])
            normed = (1 + mod[4]) * getattr(self, f"{name}_norm2")(x) + mod[3]
            x = x + mod[5] * getattr(self, f"{name}_mlp")(normed)
            out.append(x)
        return out[0], out[1]


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(hidden, hidden * 3 + mlp_hidden)
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        normed = (1 + scale) * self.pre_norm(x) + shift
        qkv, mlp = torch.split(self.linear1(normed), [3 * self.hidden, self.mlp_hidden], dim=-1)
        b, length, _ = x.shape
        qkv = qkv.view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm.query_norm(qkv[0]), self.norm.key_norm(qkv[1])
        attn = attention(q, k, qkv[2], angles)
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


class MiniFlux(nn.Module):
    """FLUX-architecture DiT. ``forward(img, img_ids, txt, txt_ids, timesteps, y)``.

    Args (shapes): img (B, L_img, in_channels) patch tokens; img_ids (B, L_img, 3); txt
    (B, L_txt, context_dim); txt_ids (B, L_txt, 3); timesteps (B,) in [0, 1]; y (B, vec_dim).
    Returns the velocity (B, L_img, in_channels).
    """

    def __init__(self, config: MiniFluxConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(config.vec_dim, hidden)
        self.txt_in = nn.Linear(config.context_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, config.num_heads, config.mlp_hidden) for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, config.num_heads, config.mlp_hidden)
            for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, config.in_channels)

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256)) + self.vector_in(y)
        txt = self.txt_in(txt)
        angles = rope_frequencies(
            torch.cat([txt_ids, img_ids], dim=1), self.config.axes_dim, self.config.theta
        )
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, angles)
        x = torch.cat([txt, img], dim=1)
        for single in self.single_blocks:
            x = single(x, vec, angles)
        return self.final_layer(x[:, txt.shape[1] :], vec)


class ClassConditioner(nn.Module):
    """Stands in for FLUX's text encoders: a fixed, seeded table of context tokens per class.

    Class ``num_classes`` is the empty prompt used for classifier-free guidance. Its tensors are
    buffers saved with the checkpoint (``conditioner.context``, ``conditioner.pooled``).
    """

    def __init__(self, config: MiniFluxConfig, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        n = config.num_classes + 1
        self.null_class = config.num_classes
        self.context: torch.Tensor
        self.pooled: torch.Tensor
        self.register_buffer(
            "context", torch.randn(n, config.context_tokens, config.context_dim, generator=gen)
        )
        self.register_buffer("pooled", torch.randn(n, config.vec_dim, generator=gen))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.context[labels], self.pooled[labels]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p) tokens, row-major like FLUX."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, size: int, channels: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, C * p * p) -> (B, C, size, size)."""
    b = tokens.shape[0]
    n = size // patch
    x = tokens.reshape(b, n, n, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, size, size)


def image_ids(config: MiniFluxConfig, batch: int) -> torch.Tensor:
    """Position ids (B, L_img, 3): axis 0 unused for images, then row and column."""
    n = config.image_size // config.patch_size
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(1, n * n, 3)
    return ids.float().expand(batch, -1, -1)


def text_ids(config: MiniFluxConfig, batch: int) -> torch.Tensor:
    return torch.zeros(batch, config.context_tokens, 3)
