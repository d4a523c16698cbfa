"""Train a MiniFlux on scikit-learn's 8x8 digits (class-conditional rectified flow, CFG dropout).

    python -m ditprune_core.miniflux.train --name miniflux-a
    python -m ditprune_core.miniflux.train --name miniflux-b

The two named recipes are the ones the shipped checkpoints were trained with; each takes a few
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .model import ClassConditioner, MiniFlux, MiniFluxConfig
from .pipeline import BUNDLED, MiniFluxPipeline

log = logging.getLogger("ditprune")


@dataclass(frozen=True)
class Recipe:
    config: MiniFluxConfig
    seed: int
    steps: int = 3000
    batch: int = 128
    lr: float = 2e-3
    cfg_dropout: float = 0.1
    ema: float = 0.995


RECIPES = {
    "miniflux-a": Recipe(MiniFluxConfig(hidden_size=64, num_heads=4, axes_dim=(4, 6, 6)), seed=0),
    "miniflux-b": Recipe(MiniFluxConfig(hidden_size=48, num_heads=4, axes_dim=(4, 4, 4)), seed=1),
}


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as images (N, 1, 8, 8) in [-1, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return images, torch.from_numpy(digits.target.astype(np.int64))


def train(recipe: Recipe, *, log_every: int = 250) -> MiniFluxPipeline:
    torch.manual_seed(recipe.seed)
    images, labels = load_digits_tensor()
    model = MiniFlux(recipe.config)
    conditioner = ClassConditioner(recipe.config, seed=recipe.seed)
    pipe = MiniFluxPipeline(model, conditioner)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(recipe.seed)
    tokens_all = pipe.to_tokens(images)
    start = time.perf_counter()
    for step in range(recipe.steps):
        lr = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        idx = torch.randint(0, tokens_all.shape[0], (recipe.batch,), generator=gen)
        x0, y = tokens_all[idx], labels[idx].clone()
        drop = torch.rand(recipe.batch, generator=gen) < recipe.cfg_dropout
        y[drop] = conditioner.null_class
        # logit-normal noise levels, as in SD3 / FLUX training
        sigma = torch.sigmoid(torch.randn(recipe.batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        pred = pipe.velocity(xt, sigma, y)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema_model.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - recipe.ema)
        if step % log_every == 0 or step == recipe.steps - 1:
            log.info("step %d loss %.4f (%.0f s)", step, loss.item(), time.perf_counter() - start)
    return MiniFluxPipeline(ema_model.eval(), conditioner)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", choices=sorted(RECIPES), default="miniflux-a")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--out", type=Path, default=None, help="default: the package's assets/")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = RECIPES[args.name]
    if args.steps is not None:
        recipe = Recipe(**{**recipe.__dict__, "steps": args.steps})
    pipe = train(recipe)
    out = args.out or Path(__file__).resolve().parent.parent / "assets" / BUNDLED[args.name]
    pipe.save(
        out, extra_metadata={"recipe": args.name, "train_steps": str(recipe.steps)}, overwrite=args.force
    )
    log.info("saved %s", out)


if __name__ == "__main__":
    main()
