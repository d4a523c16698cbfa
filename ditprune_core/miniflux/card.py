"""The test-bed card: what each bundled MiniFlux is, how it was trained and how well it draws.

    python -m ditprune_core.miniflux.card        # writes docs/TESTBEDS.md and docs/bench/testbed*

Every figure on the card comes from here: sizes from the checkpoint and its config, the training
record from the checkpoint's metadata (written by :mod:`.train`), the data from the recipe and
:class:`.data.DigitStyle`, and the judge's accuracy from sampling the model now. The facts are also
written as JSON (``docs/bench/testbeds.json``); ``tests/test_miniflux_c.py`` checks that the card is
the rendering of that JSON and that its checkpoint facts are the bundled checkpoints'.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..util.imaging import image_grid, label_rows, write_png
from ..util.io import atomic_path
from .data import DigitStyle
from .judge import JUDGE_SAMPLES, JUDGE_SEED, load_judge
from .pipeline import BUNDLED, MiniFluxPipeline, bundled_checkpoints
from .train import RECIPES, TrainingRecord

__all__ = [
    "CFG",
    "PER_CLASS",
    "SAMPLE_SEED",
    "STEPS",
    "CardEntry",
    "CheckpointFacts",
    "checkpoint_facts",
    "render_card",
    "testbed_facts",
    "write_card",
]

log = logging.getLogger("ditprune")

#: the judged samples: this many of each class, from this noise seed, Euler steps and guidance
PER_CLASS, SAMPLE_SEED, STEPS, CFG = 10, 0, 20, 2.0
GRID_PER_CLASS = 8


@dataclass(frozen=True)
class CheckpointFacts:
    """What a bundled checkpoint is, read from the file alone (no sampling)."""

    name: str
    file: str
    file_bytes: int
    stored_dtype: str
    params: int
    hidden_size: int
    num_heads: int
    mlp_hidden: int
    double_blocks: int
    single_blocks: int
    image_size: int
    patch_size: int
    image_tokens: int
    text_tokens: int
    num_classes: int
    data: str
    recipe: dict[str, Any]
    #: the training record (:class:`.train.TrainingRecord` as a dict); None for checkpoints trained
    #: before records were written into the metadata
    training: dict[str, Any] | None


@dataclass(frozen=True)
class CardEntry:
    checkpoint: CheckpointFacts
    judge_accuracy: float
    judge_accuracy_by_class: list[float]
    grid: str


def _data_text(data: str, image_size: int) -> str:
    if data == "digits":
        return "scikit-learn's 1797 8x8 digits, drawn with replacement"
    style = DigitStyle(size=image_size)
    return (
        f"procedural {style.size}x{style.size} digits, fresh every step: scikit-learn's 8x8 digits "
        f"warped (rotation ±{style.max_rotation_deg:g}°, scale {style.scale[0]:g}–{style.scale[1]:g}, "
        f"shear ±{style.max_shear:g}, shift ±{style.max_shift:g} of the half-width), resampled bicubically "
        f"and thresholded at {style.stroke_threshold[0]:g}–{style.stroke_threshold[1]:g} "
        "for the stroke width "
        "(`ditprune_core/miniflux/data.py`)"
    )


def checkpoint_facts(name: str) -> CheckpointFacts:
    """The facts of bundled checkpoint ``name`` that need no sampling."""
    path = bundled_checkpoints()[name]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        keys = [k for k in f.keys() if not k.startswith("conditioner.")]  # noqa: SIM118
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in keys})
    pipe = MiniFluxPipeline.load(path)
    cfg = pipe.config
    recipe = RECIPES[name]
    return CheckpointFacts(
        name=name,
        file=f"ditprune_core/assets/{BUNDLED[name]}",
        file_bytes=path.stat().st_size,
        stored_dtype="/".join(dtypes),
        params=sum(p.numel() for p in pipe.model.parameters()),
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        mlp_hidden=cfg.mlp_hidden,
        double_blocks=cfg.depth,
        single_blocks=cfg.depth_single_blocks,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        image_tokens=(cfg.image_size // cfg.patch_size) ** 2,
        text_tokens=cfg.context_tokens,
        num_classes=cfg.num_classes,
        data=_data_text(recipe.data, cfg.image_size),
        recipe={
            "seed": recipe.seed,
            "steps": int(metadata.get("train_steps", recipe.steps)),
            "batch": recipe.batch,
            "lr": recipe.lr,
            "schedule": recipe.schedule,
            "ema": recipe.ema,
            "cfg_dropout": recipe.cfg_dropout,
        },
        training=json.loads(metadata["training"]) if "training" in metadata else None,
    )


def testbed_facts(name: str, grid_dir: Path) -> CardEntry:
    """:func:`checkpoint_facts` plus the judge's accuracy on fresh samples, and a sample grid PNG.

    Samples :data:`PER_CLASS` digits of every class (seed :data:`SAMPLE_SEED`, :data:`STEPS` Euler
    steps, cfg :data:`CFG`) and writes the first :data:`GRID_PER_CLASS` of each, a row a class, to
    ``grid_dir/testbed_<name>.png``.
    """
    facts = checkpoint_facts(name)
    pipe = MiniFluxPipeline.load(bundled_checkpoints()[name])
    labels = torch.arange(facts.num_classes).repeat_interleave(PER_CLASS)
    images = pipe.sample(labels, seed=SAMPLE_SEED, steps=STEPS, cfg=CFG)
    judge = load_judge(facts.image_size)
    by_class = [judge.accuracy(images[labels == c], labels[labels == c]) for c in range(facts.num_classes)]
    shown = images.reshape(facts.num_classes, PER_CLASS, *images.shape[1:])[:, :GRID_PER_CLASS]
    scale = max(1, 64 // facts.image_size)
    grid = image_grid(shown.flatten(0, 1), facts.num_classes, scale=scale)
    grid = label_rows(grid, [str(c) for c in range(facts.num_classes)], size=12)
    grid_path = write_png(grid, grid_dir / f"testbed_{name}.png", overwrite=True)
    return CardEntry(facts, judge.accuracy(images, labels), [round(a, 3) for a in by_class], grid_path.name)


def facts_from_json(raw: dict[str, Any]) -> CardEntry:
    """Inverse of ``dataclasses.asdict`` on :class:`CardEntry`."""
    names = {f.name for f in fields(CardEntry)}
    return CardEntry(**{**{k: raw[k] for k in names}, "checkpoint": CheckpointFacts(**raw["checkpoint"])})


def _training_cells(c: CheckpointFacts) -> tuple[str, str, str]:
    if c.training is None:
        return "not recorded", "not recorded", "—"
    record = TrainingRecord(**{**c.training, "loss_curve": [tuple(p) for p in c.training["loss_curve"]]})
    minutes = f"{record.seconds / 60:.1f} min ({record.threads} threads, shared CPU)"
    curve = ", ".join(
        f"{step}: {loss:.3f}" for step, loss in record.loss_curve[:: max(1, len(record.loss_curve) // 8)]
    )
    return minutes, f"{record.final_loss:.4f}", curve


def render_card(testbeds: list[CardEntry], command: str) -> str:
    """The markdown of docs/TESTBEDS.md for ``testbeds``."""
    lines = [
        "# Test-beds (generated)",
        "",
        f"`{command}` writes this page from the bundled checkpoints; do not edit it by hand.",
        "",
        "Every test-bed is a MiniFlux (`ditprune_core/miniflux/model.py`): FLUX's module tree and "
        "Linear names (double- and single-stream blocks, adaLN modulation, QK-norm, RoPE), trained "
        "with rectified flow (logit-normal noise levels), class-conditional with CFG dropout, and an "
        "EMA of the weights (`python -m ditprune_core.miniflux.train --name NAME`). Weights ship in "
        "bf16 and load as float32.",
        "",
        "| | " + " | ".join(t.checkpoint.name for t in testbeds) + " |",
        "|---|" + "---|" * len(testbeds),
    ]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    cps = [t.checkpoint for t in testbeds]
    row("parameters", [f"{c.params:,} ({c.params / 1e6:.2f}M)" for c in cps])
    row("hidden width / heads / MLP", [f"{c.hidden_size} / {c.num_heads} / {c.mlp_hidden}" for c in cps])
    row("double / single blocks", [f"{c.double_blocks} / {c.single_blocks}" for c in cps])
    row(
        "image / tokens",
        [
            f"{c.image_size}x{c.image_size} in {c.patch_size}x{c.patch_size} patches: {c.image_tokens}"
            for c in cps
        ],
    )
    row("text tokens", [str(c.text_tokens) for c in cps])
    row("classes", [f"{c.num_classes} (+ the empty prompt)" for c in cps])
    row("file", [f"`{c.file}`, {c.file_bytes / 2**20:.2f} MiB, {c.stored_dtype}" for c in cps])
    row(
        "recipe",
        [
            f"seed {r['seed']}, {r['steps']} steps of batch {r['batch']}, lr {r['lr']:g} ({r['schedule']}), "
            f"EMA {r['ema']}, CFG dropout {r['cfg_dropout']}"
            for r in (c.recipe for c in cps)
        ],
    )
    cells = [_training_cells(c) for c in cps]
    row("training time", [c[0] for c in cells])
    row("final loss (mean of the last 10% of steps)", [c[1] for c in cells])
    row("loss by step", [c[2] for c in cells])
    row(
        f"judge accuracy ({PER_CLASS} samples a class)",
        [f"{t.judge_accuracy:.3f} (worst class {min(t.judge_accuracy_by_class):.2f})" for t in testbeds],
    )
    lines += ["", "Data:", ""]
    lines += [f"- {c.name}: {c.data}." for c in cps]
    lines += [
        "",
        f"Judge: the samples are {PER_CLASS} of every class from noise seed {SAMPLE_SEED}, {STEPS} Euler "
        f"steps, cfg {CFG}. 8x8 models are judged by a logistic regression on the real digits; larger "
        f"ones by an RBF support-vector machine on 40 principal components of the images pooled to 8x8, "
        f"fit on {JUDGE_SAMPLES} procedural digits drawn from seed {JUDGE_SEED} (the trainer draws its "
        "digits from its recipe's seed + 10000; both redraw the same 1797 scikit-learn digits, so the "
        "judge checks that samples show their class, not that they are new digits) "
        "(`ditprune_core/miniflux/judge.py`).",
        "",
    ]
    for t in testbeds:
        lines += [
            f"## {t.checkpoint.name}: samples, a row a class",
            "",
            f"![{t.checkpoint.name}](bench/{t.grid})",
            "",
        ]
    return "\n".join(lines)


def write_card(names: list[str], docs_dir: Path, command: str) -> Path:
    """Sample and judge every test-bed in ``names``; write the card, its JSON and its grids."""
    bench_dir = docs_dir / "bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    testbeds = []
    for name in names:
        log.info("sampling and judging %s", name)
        testbeds.append(testbed_facts(name, bench_dir))
    with atomic_path(bench_dir / "testbeds.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps([asdict(t) for t in testbeds], indent=1) + "\n")
    path = docs_dir / "TESTBEDS.md"
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(render_card(testbeds, command) + "\n")
    return path


COMMAND = "python -m ditprune_core.miniflux.card"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="the docs folder (default: ./docs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("wrote %s", write_card(sorted(BUNDLED), args.docs, COMMAND))


if __name__ == "__main__":
    main()
