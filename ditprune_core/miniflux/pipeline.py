"""MiniFlux sampling and checkpoint I/O: rectified flow, Euler steps, classifier-free guidance."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..calibrate import Calibrator
from ..stats import CalibrationStats
from ..util.io import atomic_path
from .model import ClassConditioner, MiniFlux, MiniFluxConfig, image_ids, patchify, text_ids, unpatchify

__all__ = ["MiniFluxPipeline", "bundled_checkpoints", "calibrate", "load_bundled", "sigma_schedule"]

StepCallback = Callable[[int, float], None]

BUNDLED = {
    "miniflux-a": "miniflux_a.safetensors",
    "miniflux-b": "miniflux_b.safetensors",
    "miniflux-c": "miniflux_c.safetensors",
}


def sigma_schedule(steps: int) -> torch.Tensor:
    """Linearly spaced noise levels from 1 (pure noise) to 0, ``steps + 1`` values."""
    return torch.linspace(1.0, 0.0, steps + 1)


@dataclass
class MiniFluxPipeline:
    """A trained MiniFlux with its conditioner. Images are (B, 1, S, S) in [-1, 1], S the config's
    ``image_size``."""

    model: MiniFlux
    conditioner: ClassConditioner

    @property
    def config(self) -> MiniFluxConfig:
        return self.model.config

    def velocity(self, tokens: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Model velocity for noisy tokens (B, L, C) at noise level ``sigma`` (B,)."""
        b = tokens.shape[0]
        context, pooled = self.conditioner(labels)
        return self.model(tokens, image_ids(self.config, b), context, text_ids(self.config, b), sigma, pooled)

    def guided_velocity(
        self, tokens: torch.Tensor, sigma: float, labels: torch.Tensor, cfg: float
    ) -> torch.Tensor:
        """Classifier-free guided velocity; conditional and empty-prompt halves in one batch."""
        b = tokens.shape[0]
        if cfg == 1.0:
            return self.velocity(tokens, torch.full((b,), sigma), labels)
        null = torch.full_like(labels, self.conditioner.null_class)
        both = self.velocity(
            torch.cat([tokens, tokens]), torch.full((2 * b,), sigma), torch.cat([labels, null])
        )
        cond, uncond = both[:b], both[b:]
        return uncond + cfg * (cond - uncond)

    def initial_noise(self, batch: int, seed: int) -> torch.Tensor:
        cfg = self.config
        n = (cfg.image_size // cfg.patch_size) ** 2
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, n, cfg.in_channels, generator=gen)

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        *,
        seed: int,
        steps: int = 20,
        cfg: float = 3.0,
        on_step: StepCallback | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate digits for ``labels`` (B,) -> images (B, 1, S, S).

        ``on_step(step_index, sigma)`` is called before each model evaluation (the calibration
        hooks use it to weight timesteps).
        """
        x = self.initial_noise(labels.shape[0], seed) if noise is None else noise.clone()
        sigmas = sigma_schedule(steps)
        for i in range(steps):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            if on_step is not None:
                on_step(i, sigma)
            v = self.guided_velocity(x, sigma, labels, cfg)
            x = x + (sigma_next - sigma) * v
        return self.to_images(x)

    def to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return unpatchify(tokens, cfg.patch_size, cfg.image_size)

    def to_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(images, self.config.patch_size)

    def save(
        self, path: str | Path, *, extra_metadata: dict[str, str] | None = None, overwrite: bool = False
    ) -> None:
        """Write the model (bf16) and conditioner atomically; refuses to overwrite unless asked."""
        tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"conditioner.{k}": v.contiguous() for k, v in self.conditioner.state_dict().items()})
        metadata = {"format": "ditprune.miniflux", "config": json.dumps(self.config.to_dict())}
        metadata.update(extra_metadata or {})
        with atomic_path(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> MiniFluxPipeline:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != "ditprune.miniflux":
            raise ValueError(f"{path} is not a MiniFlux checkpoint (no 'ditprune.miniflux' metadata)")
        raw = json.loads(metadata["config"])
        raw["axes_dim"] = tuple(raw["axes_dim"])
        config = MiniFluxConfig(**raw)
        state = load_file(str(path))
        model = MiniFlux(config)
        model.load_state_dict({k: v.float() for k, v in state.items() if not k.startswith("conditioner.")})
        conditioner = ClassConditioner(config)
        conditioner.load_state_dict(
            {k.removeprefix("conditioner."): v for k, v in state.items() if k.startswith("conditioner.")}
        )
        return cls(model.eval(), conditioner)


def bundled_checkpoints() -> dict[str, Path]:
    """Names and paths of the MiniFlux checkpoints shipped with the package."""
    assets = resources.files("ditprune_core") / "assets"
    return {name: Path(str(assets / filename)) for name, filename in BUNDLED.items()}


def load_bundled(name: str = "miniflux-a") -> MiniFluxPipeline:
    """Load a shipped, trained MiniFlux (``miniflux-a``, ``miniflux-b`` or ``miniflux-c``), as float32."""
    paths = bundled_checkpoints()
    if name not in paths:
        raise ValueError(f"unknown MiniFlux checkpoint {name!r}; bundled: {sorted(paths)}")
    if not paths[name].exists():
        raise FileNotFoundError(
            f"{paths[name]} is missing; reinstall ditprune or retrain it with "
            f"`python -m ditprune_core.miniflux.train --name {name}`"
        )
    return MiniFluxPipeline.load(paths[name])


def calibrate(
    pipe: MiniFluxPipeline,
    *,
    seeds: tuple[int, ...] = (1000, 1001),
    per_class: int = 10,
    steps: int = 20,
    cfg: float = 2.0,
    weighting: str = "log",
    layers: dict[str, torch.nn.Linear] | None = None,
    classes: Sequence[int] | None = None,
) -> CalibrationStats:
    """Record calibration statistics while sampling ``per_class`` digits of every class (or of
    ``classes`` only: a held-out protocol's calibration half) per seed.

    Both CFG halves (conditional and empty prompt) are seen, as in real sampling.
    """
    chosen = torch.arange(pipe.config.num_classes) if classes is None else torch.tensor(list(classes))
    labels = chosen.repeat_interleave(per_class)
    with Calibrator(
        pipe.model,
        layers,
        weighting=weighting,
        settings={"sampler": "euler", "steps": steps, "cfg": cfg, "seeds": list(seeds)},
    ) as cal:
        for seed in seeds:
            pipe.sample(labels, seed=seed, steps=steps, cfg=cfg, on_step=cal.on_step)
    return cal.stats
