"""Train a MiniFlux (class-conditional rectified flow, CFG dropout, EMA of the weights).

    python -m ditprune_core.miniflux.train --name miniflux-a
    python -m ditprune_core.miniflux.train --name miniflux-b
    python -m ditprune_core.miniflux.train --name miniflux-c

The named recipes are the ones the shipped checkpoints were trained with. miniflux-a and miniflux-b
learn scikit-learn's 8x8 digits and take a few minutes on 2 CPU cores; miniflux-c learns 32x32
procedural digits (:mod:`.data`, drawn afresh every step) and took a little over an hour on 2
CPU cores shared with other work (docs/TESTBEDS.md quotes the recorded time). Its learning rate is
constant after the warmup, so the checkpoint saved at step K of a longer run is the run
``--steps K``: the recipe's 800 steps are where the shipped run was stopped. The training record
(steps, batch, seconds, the loss curve and the final loss) is written into the checkpoint's
metadata as JSON under ``training``; the test-bed card (:mod:`.card`) quotes it from there.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from .data import DigitStyle, draw_digits
from .model import ClassConditioner, MiniFlux, MiniFluxConfig
from .pipeline import BUNDLED, MiniFluxPipeline

__all__ = ["RECIPES", "Recipe", "TrainingRecord", "load_digits_tensor", "train"]

log = logging.getLogger("ditprune")


@dataclass(frozen=True)
class Recipe:
    """How one MiniFlux is trained.

    ``data`` is ``"digits"`` (scikit-learn's 8x8 digits, sampled with replacement) or
    ``"procedural"`` (:func:`.data.draw_digits` at the config's image size, fresh every step).
    """

    config: MiniFluxConfig
    seed: int
    steps: int = 3000
    batch: int = 128
    lr: float = 2e-3
    cfg_dropout: float = 0.1
    ema: float = 0.995
    data: Literal["digits", "procedural"] = "digits"
    warmup: int = 100
    #: "cosine" decays to 0 at ``steps``; "constant" keeps ``lr`` after the warmup, so the first K
    #: steps of a run are the run ``--steps K`` (a run stopped early is a run of its recorded steps)
    schedule: Literal["cosine", "constant"] = "cosine"


#: MiniFlux-C: 32x32 digits in 4x4 patches (64 image tokens of 16 channels), hidden 256 in 4 heads
#: of 64 (rotary axes in FLUX's 1:3.5:3.5 proportion), one double and two single blocks: 4.69M
#: parameters, 9 MB in bf16.
MINIFLUX_C = MiniFluxConfig(
    hidden_size=256,
    num_heads=4,
    axes_dim=(8, 28, 28),
    depth=1,
    depth_single_blocks=2,
    image_size=32,
    patch_size=4,
    in_channels=16,
)

RECIPES = {
    "miniflux-a": Recipe(MiniFluxConfig(hidden_size=64, num_heads=4, axes_dim=(4, 6, 6)), seed=0),
    "miniflux-b": Recipe(MiniFluxConfig(hidden_size=48, num_heads=4, axes_dim=(4, 4, 4)), seed=1),
    "miniflux-c": Recipe(
        MINIFLUX_C,
        seed=2,
        steps=800,
        batch=32,
        lr=1e-3,
        ema=0.99,
        data="procedural",
        warmup=50,
        schedule="constant",
    ),
}


@dataclass
class TrainingRecord:
    """What a training run did, stored in the checkpoint's metadata (``training``, JSON)."""

    recipe: str
    steps: int
    batch: int
    lr: float
    data: str
    seconds: float = 0.0
    threads: int = 1
    #: (step, mean loss of the ``log_every`` steps ending there)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    #: mean loss over the last 10% of the steps (the training loss, on the raw weights)
    final_loss: float = float("nan")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainingRecord:
        raw = json.loads(text)
        raw["loss_curve"] = [(int(s), float(v)) for s, v in raw["loss_curve"]]
        return cls(**raw)


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as images (N, 1, 8, 8) in [-1, 1] and labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    return images, torch.from_numpy(digits.target.astype(np.int64))


Checkpoint = Callable[[MiniFluxPipeline, TrainingRecord], None]


def train(
    recipe: Recipe, *, name: str = "", log_every: int = 250, on_log: Checkpoint | None = None
) -> tuple[MiniFluxPipeline, TrainingRecord]:
    """Train ``recipe`` from scratch; returns the EMA model with its conditioner, and the record.

    ``on_log(ema_pipeline, record_so_far)`` is called at every log line (the command line saves the
    checkpoint there, so a long run stopped by hand leaves the checkpoint of its last logged step).
    """
    torch.manual_seed(recipe.seed)
    model = MiniFlux(recipe.config)
    conditioner = ClassConditioner(recipe.config, seed=recipe.seed)
    pipe = MiniFluxPipeline(model, conditioner)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(recipe.seed)
    data_gen = torch.Generator().manual_seed(recipe.seed + 10_000)
    style = DigitStyle(size=recipe.config.image_size)
    if recipe.data == "digits":
        images, labels = load_digits_tensor()
        tokens_all = pipe.to_tokens(images)
    record = TrainingRecord(
        name, recipe.steps, recipe.batch, recipe.lr, recipe.data, threads=torch.get_num_threads()
    )
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(recipe.steps):
        lr = recipe.lr
        if recipe.schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / recipe.warmup)
        if recipe.data == "digits":
            idx = torch.randint(0, tokens_all.shape[0], (recipe.batch,), generator=gen)
            x0, y = tokens_all[idx], labels[idx].clone()
        else:
            batch_images, y = draw_digits(recipe.batch, data_gen, style=style)
            x0 = pipe.to_tokens(batch_images)
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
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == recipe.steps - 1:
            window = losses[-log_every:]
            record.loss_curve.append((step + 1, round(float(np.mean(window)), 5)))
            log.info(
                "step %d loss %.4f (mean of last %d: %.4f) %.0f s",
                step + 1,
                losses[-1],
                len(window),
                record.loss_curve[-1][1],
                time.perf_counter() - start,
            )
            if on_log is not None:
                on_log(MiniFluxPipeline(ema_model, conditioner), _finish(record, losses, start))
    return MiniFluxPipeline(ema_model.eval(), conditioner), _finish(record, losses, start)


def _finish(record: TrainingRecord, losses: list[float], start: float) -> TrainingRecord:
    """The record of the ``len(losses)`` steps done so far: seconds, and the mean of the last 10%."""
    return replace(
        record,
        steps=len(losses),
        seconds=round(time.perf_counter() - start, 1),
        final_loss=round(float(np.mean(losses[-max(1, len(losses) // 10) :])), 5),
        loss_curve=list(record.loss_curve),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", choices=sorted(RECIPES), default="miniflux-a")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--batch", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument("--log-every", type=int, default=None, help="default: 250 (miniflux-c: 50)")
    parser.add_argument("--out", type=Path, default=None, help="default: the package's assets/")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = RECIPES[args.name]
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    if args.batch is not None:
        recipe = replace(recipe, batch=args.batch)
    log_every = args.log_every or (50 if recipe.data == "procedural" else 250)
    out = args.out or Path(__file__).resolve().parent.parent / "assets" / BUNDLED[args.name]
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to overwrite it, or --out to write elsewhere")

    def save(pipe: MiniFluxPipeline, record: TrainingRecord) -> None:
        metadata = {"recipe": args.name, "train_steps": str(record.steps), "training": record.to_json()}
        pipe.save(out, extra_metadata=metadata, overwrite=True)

    save_every_log = recipe.data == "procedural"
    pipe, record = train(recipe, name=args.name, log_every=log_every, on_log=save if save_every_log else None)
    save(pipe, record)
    log.info(
        "saved %s (%d steps, %.0f s, final loss %.4f)", out, record.steps, record.seconds, record.final_loss
    )


if __name__ == "__main__":
    main()
