"""Seeded, bounded fuzzing of every file we read: corruption is refused, or changes nothing.

Each case flips bits in the header or in the data of a compressed checkpoint (bitmask, 2:4, fp8
values, int4 codes, int3 codes with an int8 remainder) or a calibration file. The outcome must be
a clean refusal that names the file, or a result identical to the original (a change that does not
matter, e.g. inside JSON padding). A crash of any other kind, or different values loaded silently,
fails the test.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from torch import nn

from ditprune_core import CalibrationError, CalibrationStats, PruneConfig, load_pruned_checkpoint
from ditprune_core.mask import layer_keep_mask
from ditprune_core.save import CheckpointError, save_pruned_checkpoint
from ditprune_core.stats import stats_from_batches

CASES_PER_FILE = 120
BUDGET_SECONDS = 6.0


def _checkpoint(tmp_path, kind: str):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    pattern = "2:4" if kind == "2:4" else "unstructured"
    keep = layer_keep_mask("w", w, None, PruneConfig(0.5, metric="magnitude", pattern=pattern))
    path = tmp_path / f"{kind.replace(':', '')}.safetensors"
    values = {"fp8": "fp8", "int4": "int4", "int3+int8": "int3"}.get(kind, "keep")
    remainder = "int8" if kind == "int3+int8" else "keep"
    state = {
        "w": (w * keep).to(torch.bfloat16),
        "b": torch.ones(3),
        "m.weight": torch.randn(16, 32, generator=gen),
    }
    save_pruned_checkpoint(state, path, values=values, remainder=remainder)
    return path, load_pruned_checkpoint(path), load_pruned_checkpoint, CheckpointError


def _calibration(tmp_path):
    torch.manual_seed(0)
    layers = {"blocks.0.fc": nn.Linear(16, 8), "blocks.1.fc": nn.Linear(8, 16)}
    stats = stats_from_batches(
        layers, [{"blocks.0.fc": torch.randn(5, 16), "blocks.1.fc": torch.randn(5, 8)}]
    )
    path = stats.save(tmp_path / "cal.safetensors")
    loaded = CalibrationStats.load(path)
    return path, {n: s.activation_sq_mean for n, s in loaded.layers.items()}, _load_means, CalibrationError


def _load_means(path):
    return {n: s.activation_sq_mean for n, s in CalibrationStats.load(path).layers.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


@pytest.mark.parametrize("kind", ["bitmask", "2:4", "fp8", "int4", "int3+int8", "calibration"])
def test_corruption_is_refused_or_harmless(tmp_path, kind: str) -> None:
    path, original, read, refusal = (
        _calibration(tmp_path) if kind == "calibration" else _checkpoint(tmp_path, kind)
    )
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    rng = random.Random(f"ditprune-{kind}")
    start = time.monotonic()
    outcomes = {"refused": 0, "harmless": 0}
    for case in range(CASES_PER_FILE):
        if time.monotonic() - start > BUDGET_SECONDS:
            break
        data = bytearray(raw)
        in_header = case % 2 == 0
        lo, hi = (0, header_end) if in_header else (header_end, len(raw))
        for _ in range(rng.choice([1, 1, 2, 4])):
            position = rng.randrange(lo, hi)
            data[position] = (
                rng.randrange(256) if rng.random() < 0.3 else data[position] ^ (1 << rng.randrange(8))
            )
        target = tmp_path / f"case{case}.safetensors"
        target.write_bytes(bytes(data))
        try:
            got = read(target)
        except refusal as exc:
            assert target.name in str(exc), f"case {case}: the refusal does not name the file: {exc}"
            outcomes["refused"] += 1
        else:
            assert _same(got, original), f"case {case} ({'header' if in_header else 'data'}): silent damage"
            outcomes["harmless"] += 1
        target.unlink()
    assert outcomes["refused"] >= 0.9 * sum(outcomes.values()) > 0, outcomes
