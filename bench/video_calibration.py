"""Calibration cost for video DiTs: hook overhead and memory at Wan 14B widths, and how many frames
and steps a calibration needs before the masks stop changing.

    python -m bench video            # writes docs/bench/video_calibration.md
    python -m bench.video_calibration [--tokens 780 1560] [--device cuda]

1. Overhead: one Wan 2.1/2.2 14B block (hidden 5120, FFN 13824, 40 heads; random weights) run on a
   video-sized token sequence, plain and with the :class:`~ditprune_core.calibrate.Calibrator`
   hooks on its ten Linear layers, interleaved in one run, and also with a Gram (X^T X) hook per
   layer as second-order methods (OBS reconstruction) need. Ratios to the plain forward.
2. Memory, by arithmetic: per-channel statistics (in_features x 8 bytes, float64) and Gram
   matrices (in_features^2 x 4 bytes, float32) per layer, per block, per model.
3. Frames and steps: a tiny Wan-architecture model (real Wan layer names and block layout, random
   weights with uneven channel gains, written in plain torch, no rotary embedding) sampled with a
   rectified-flow Euler sampler on video latents; masks (energy, 50 %) from calibrations with
   growing frames and steps compared with those of a large calibration on other prompts and noise.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ditprune_core.calibrate import Calibrator
from ditprune_core.config import PruneConfig
from ditprune_core.layers import find_prunable_layers
from ditprune_core.prune import compute_masks
from ditprune_core.stats import CalibrationStats

from . import write_report

log = logging.getLogger("ditprune")

WAN14B = {"dim": 5120, "ffn": 13824, "heads": 40, "layers": 40, "text_tokens": 512}
#: Tokens per latent frame of a 480x832 video (latent 60x104, patches 2x2); 81 frames -> 21 latent frames.
TOKENS_480P_FRAME = 30 * 52


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, L, dim) or None for self-attention -> (B, N, dim)."""
        ctx = x if context is None else context
        b, n, d = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.norm_k(self.k(ctx)).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class WanBlock(nn.Module):
    """A Wan attention block (self-attention, text cross-attention, GELU FFN, bare modulation)."""

    def __init__(self, dim: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = _Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) * 0.1)

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), e (B, 6, dim) from time_projection, context (B, L, dim)."""
        e0, e1, e2, e3, e4, e5 = (self.modulation + e).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + e1) + e0) * e2
        x = x + self.cross_attn(self.norm3(x), context)
        return x + self.ffn(self.norm2(x) * (1 + e4) + e3) * e5


class _Head(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) * 0.1)


class TinyWan(nn.Module):
    """Wan-architecture video DiT with Wan's module names; ``forward(x, sigma, context)``.

    x (B, 16, T, H, W) latent video, sigma (B,) noise level, context (B, L, text_dim) -> velocity
    with the shape of x.
    """

    def __init__(
        self,
        dim: int = 128,
        ffn: int = 256,
        heads: int = 2,
        layers: int = 2,
        text_dim: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.dim = dim
        self.patch_embedding = nn.Conv3d(16, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(
            nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        blocks = [WanBlock(dim, ffn, heads) for _ in range(layers)]
        self.blocks = nn.ModuleList(blocks)
        self.head = _Head(dim, 16 * 4)
        with torch.no_grad():  # uneven channel gains, as trained DiTs have (outlier channels)
            gains = torch.exp(torch.randn(dim) * 0.8)
            self.patch_embedding.weight.mul_(gains[:, None, None, None, None])
            for block in blocks:
                block.norm3.weight.copy_(torch.exp(torch.randn(dim) * 0.5))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _c, t, h, w = x.shape
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, T*H/2*W/2, dim)
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=x.dtype) / half)
        angles = 1000.0 * sigma[:, None] * freqs[None]
        e = self.time_embedding(torch.cat([angles.cos(), angles.sin()], dim=1))
        e6 = self.time_projection(e).unflatten(1, (6, self.dim))
        ctx = self.text_embedding(context)
        for block in self.blocks:
            tokens = block(tokens, e6, ctx)
        m0, m1 = (self.head.modulation + e[:, None]).chunk(2, dim=1)
        out = self.head.head(self.head.norm(tokens) * (1 + m1) + m0)  # (B, N, 16*2*2)
        out = out.view(b, t, h // 2, w // 2, 16, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return out.reshape(b, 16, t, h, w)


def sample_calibrated(
    model: TinyWan, frames: int, steps: int, seed: int, size: int = 16, prompts: int = 2
) -> CalibrationStats:
    """Calibrate ``model`` while a rectified-flow Euler sampler draws ``prompts`` videos of
    ``frames`` latent frames in ``steps`` steps (random prompt embeddings and noise from ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(prompts, 12, 64, generator=gen)
    x = torch.randn(prompts, 16, frames, size, size, generator=gen)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad(), Calibrator(model, weighting="uniform") as cal:
        for i in range(steps):
            cal.set_sigma(float(sigmas[i]))
            v = model(x, sigmas[i].expand(prompts), context)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return cal.stats


def mask_agreement(
    model: nn.Module, a: CalibrationStats, b: CalibrationStats, sparsity: float = 0.5
) -> float:
    """Share of weights (over all default layers) whose keep/prune decision is the same under both."""
    config = PruneConfig(sparsity)
    ma = cast(dict[str, torch.Tensor], compute_masks(model, a, config))
    mb = cast(dict[str, torch.Tensor], compute_masks(model, b, config))
    same = sum(int(torch.eq(ma[n], mb[n]).sum()) for n in ma)
    return same / sum(m.numel() for m in ma.values())


@contextmanager
def gram_hooks(layers: dict[str, nn.Linear]) -> Iterator[dict[str, torch.Tensor]]:
    """Accumulate X^T X (in, in) in float32 for every layer while the model runs."""
    grams = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in layers.items()}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def run(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            grams[name].addmm_(x.T, x)

        return run

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        yield grams
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Overhead:
    """Best-of-``repeats`` seconds of one block forward (CPU time of all threads, and wall time)."""

    tokens: int
    plain_cpu_s: float
    plain_wall_s: float
    calibrator_cpu: float  # ratios to the plain forward
    gram_cpu: float
    calibrator_wall: float
    gram_wall: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_overhead(tokens: int, device: torch.device, dtype: torch.dtype, repeats: int = 5) -> Overhead:
    """One Wan 14B block forward, plain / with the Calibrator / with Gram hooks, the three
    interleaved ``repeats`` times; the best of each. On a shared CPU the process CPU time (summed
    over threads) is the steadier measure; wall time is given beside it."""
    dim, heads = WAN14B["dim"], WAN14B["heads"]
    block = WanBlock(dim, WAN14B["ffn"], heads).to(device=device, dtype=dtype).eval()
    model = nn.Module()
    model.blocks = nn.ModuleList([block])  # named like Wan: blocks.0.self_attn.q ...
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=gen)
    ctx = torch.randn(1, WAN14B["text_tokens"], dim, device=device, dtype=dtype, generator=gen)
    e = torch.randn(1, 6, dim, device=device, dtype=dtype, generator=gen) * 0.1
    layers = find_prunable_layers(model, families=("attention", "mlp"))
    cpu: dict[str, list[float]] = {"plain": [], "calibrator": [], "gram": []}
    wall: dict[str, list[float]] = {"plain": [], "calibrator": [], "gram": []}

    def run(kind: str) -> None:
        _sync(device)
        c0, w0 = time.process_time(), time.perf_counter()
        block(x, e, ctx)
        _sync(device)
        cpu[kind].append(time.process_time() - c0)
        wall[kind].append(time.perf_counter() - w0)

    with torch.no_grad():
        run("plain")  # warm-up
        cpu["plain"].clear()
        wall["plain"].clear()
        for _ in range(repeats):
            run("plain")
            with Calibrator(model, layers, weighting="uniform"):
                run("calibrator")
            with gram_hooks(layers):
                run("gram")
    c = {k: min(v) for k, v in cpu.items()}
    w = {k: min(v) for k, v in wall.items()}
    return Overhead(
        tokens,
        c["plain"],
        w["plain"],
        c["calibrator"] / c["plain"],
        c["gram"] / c["plain"],
        w["calibrator"] / w["plain"],
        w["gram"] / w["plain"],
    )


def memory_rows() -> list[tuple[str, int, int, int]]:
    """(layer, in_features, per-channel statistics bytes, Gram bytes) of one Wan 14B block."""
    dim, ffn = WAN14B["dim"], WAN14B["ffn"]
    rows = []
    for attn in ("self_attn", "cross_attn"):
        for n in ("q", "k", "v", "o"):
            rows.append((f"blocks.N.{attn}.{n}", dim, dim * 8, dim * dim * 4))
    rows.append(("blocks.N.ffn.0", dim, dim * 8, dim * dim * 4))
    rows.append(("blocks.N.ffn.2", ffn, ffn * 8, ffn * ffn * 4))
    return rows


FRAMES = (1, 2, 4, 8, 16)
TINY_TOKENS_PER_FRAME, TINY_PROMPTS = 64, 2  # 16x16 latent in 2x2 patches; prompts per calibration
STEPS = (1, 2, 4, 8, 16)
REFERENCE = (32, 32)


def frames_steps_table(seed: int = 0) -> tuple[dict[tuple[int, int], float], float]:
    """Mask agreement with a (32 frames, 32 steps) calibration on other prompts/noise, for each
    (frames, steps), and the agreement of two independent reference calibrations (the floor)."""
    model = TinyWan(seed=seed).eval()
    ref = sample_calibrated(model, *REFERENCE, seed=1000)
    ref2 = sample_calibrated(model, *REFERENCE, seed=2000)
    floor = mask_agreement(model, ref, ref2)
    table = {}
    for f in FRAMES:
        for s in STEPS:
            table[(f, s)] = mask_agreement(model, sample_calibrated(model, f, s, seed=1), ref)
            log.info("frames %d steps %d: agreement %.4f", f, s, table[(f, s)])
    return table, floor


def settled(
    table: dict[tuple[int, int], float], floor: float, tolerance: float = 0.005
) -> tuple[int, int] | None:
    """The smallest (frames, steps), by frames x steps, from which on every calibration with at
    least as many frames and steps agrees with the reference within ``tolerance`` of ``floor``."""
    good = [
        (f * s, f, s)
        for f, s in table
        if all(a >= floor - tolerance for (f2, s2), a in table.items() if f2 >= f and s2 >= s)
    ]
    return (min(good)[1], min(good)[2]) if good else None


def enough_text(table: dict[tuple[int, int], float], floor: float) -> list[str]:
    point = settled(table, floor)
    if point is None:
        return ["No calibration in the table comes within 0.5 points of the floor."]
    f, s = point
    return [
        f"From **{f} latent frames x {s} steps** on (and for every calibration with at least as many "
        f"frames and steps) the masks agree with the reference within 0.5 points of the floor: beyond "
        "that point they stop changing.",
        "",
        f"At the same token count, {FRAMES[-1]} frames x 1 step agrees {table[(FRAMES[-1], 1)]:.2%} and 1 "
        f"frame x {STEPS[-1]} steps {table[(1, STEPS[-1])]:.2%}: "
        + (
            "steps (new noise levels) are worth more than frames."
            if table[(1, STEPS[-1])] > table[(FRAMES[-1], 1)]
            else "frames are worth as much as steps or more."
        ),
        "",
        f"In tokens: {f} latent frames of {TINY_TOKENS_PER_FRAME} tokens for {TINY_PROMPTS} prompts are "
        f"{f * TINY_TOKENS_PER_FRAME * TINY_PROMPTS:,} video tokens per step over {s} steps. One 480x832 "
        f"latent frame of Wan has {TOKENS_480P_FRAME:,} tokens, so what a user needs is a short clip and "
        f"at least {s} steps, not the full video: the example workflow calibrates on its 33-frame clip "
        f"(9 latent frames, {9 * TOKENS_480P_FRAME:,} tokens per step) for 8 steps. "
        "(A random-weight model shows how fast the statistics settle, not how different prompts or "
        "motion shift them: calibrate on the kind "
        "of prompts you will render.)",
    ]


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write_video_bench(
    out_dir: Path, tokens: tuple[int, ...] = (TOKENS_480P_FRAME // 2, TOKENS_480P_FRAME), device: str = "cpu"
) -> Path:
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    lines = [
        "# Video calibration cost (Wan)",
        "",
        "Generated by `python -m bench video` "
        f"(device {dev}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads).",
        "",
        "## Hook overhead at Wan 14B widths",
        "",
        "One Wan 14B block (hidden 5120, FFN 13824, 40 heads, 512 text tokens; random weights), plain and "
        "with hooks on its 10 Linear layers, interleaved in one run; best of 5 each. `Calibrator` is what "
        "Calibrate records today (per-channel mean of x^2); `Gram` accumulates X^T X per layer, what a "
        "second-order reconstruction (OBS) would need. Ratios of process CPU time (all threads; steady on "
        "a shared machine), wall-time ratios in brackets. Measured on CPU (no GPU here); the Calibrator's "
        "hook is a few elementwise passes over each input: expect a larger ratio on a GPU, where the "
        "matrix products are relatively faster (not measured here).",
        "",
        "| video tokens per step | plain forward (CPU s / wall s) | with Calibrator | with Gram hooks |",
        "|---:|---:|---:|---:|",
    ]
    for n in tokens:
        o = measure_overhead(n, dev, dtype)
        log.info("tokens %d: %s", n, o)
        lines.append(
            f"| {n:,} ({n / TOKENS_480P_FRAME:.1f} latent frames at 480p) | {o.plain_cpu_s:.1f} / "
            f"{o.plain_wall_s:.1f} | {o.calibrator_cpu:.3f}x ({o.calibrator_wall:.3f}x) | "
            f"{o.gram_cpu:.2f}x ({o.gram_wall:.2f}x) |"
        )
    rows = memory_rows()
    diag_block = sum(r[2] for r in rows)
    gram_block = sum(r[3] for r in rows)
    # self_attn q, k, v read one input, cross_attn k, v another: 3 Grams fewer when shared
    shared = gram_block - 3 * WAN14B["dim"] ** 2 * 4
    layers = WAN14B["layers"]
    lines += [
        "",
        "## Memory of the statistics (arithmetic, Wan 14B)",
        "",
        "| layer | in_features | per-channel stats (x 8 B) | Gram (in^2 x 4 B) |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {i:,} | {_gb(d)} | {_gb(g)} |" for n, i, d, g in rows),
        f"| **one block (10 layers)** | | {_gb(diag_block)} | "
        f"{_gb(gram_block)} ({_gb(shared)} with one Gram per shared input) |",
        f"| **whole model ({layers} blocks)** | | {_gb(diag_block * layers)} | "
        f"{_gb(gram_block * layers)} ({_gb(shared * layers)} shared) |",
        "",
        "Per-channel statistics cost nothing next to the 28.6 GB of bf16 weights; Gram matrices for every "
        "layer at once do not fit a consumer GPU and must be gathered a block at a time. Neither grows "
        "with the number of frames: only the hook time does, in proportion to the tokens, like the "
        "forward itself.",
    ]
    table, floor = frames_steps_table()
    lines += [
        "",
        "## How many frames and steps",
        "",
        f"Tiny Wan-architecture model (hidden 128, 2 blocks, 16x16 latent = {TINY_TOKENS_PER_FRAME} tokens "
        f"per latent frame, {TINY_PROMPTS} prompts). Share of weights whose keep/prune decision "
        "(energy, 50 %) equals that of a "
        f"{REFERENCE[0]}-frame, {REFERENCE[1]}-step calibration on other prompts and noise. Two independent "
        f"reference calibrations agree on **{floor:.2%}**: that is the most any calibration can reach.",
        "",
        "| latent frames \\ steps | " + " | ".join(str(s) for s in STEPS) + " |",
        "|---:|" + "---:|" * len(STEPS),
    ]
    for f in FRAMES:
        lines.append(f"| {f} | " + " | ".join(f"{table[(f, s)]:.2%}" for s in STEPS) + " |")
    lines += ["", *enough_text(table, floor)]
    return write_report(out_dir, "video_calibration.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.video_calibration", description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[TOKENS_480P_FRAME // 2, TOKENS_480P_FRAME])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = write_video_bench(args.out, tuple(args.tokens), args.device)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
