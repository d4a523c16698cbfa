"""Pruning streams one layer at a time: peak extra memory stays near one layer, not the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _probe(*args: str) -> dict[str, float]:
    # a fixed mmap threshold makes glibc return freed blocks at once, so RSS tracks live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "bench.memprobe", "--layers", "16", *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to read peak RSS")
@pytest.mark.parametrize(
    "args",
    [
        (),  # DiT-Pruning defaults
        ("--granularity", "row", "--metric", "wanda"),
        ("--granularity", "cluster"),
        ("--pattern", "2:4", "--granularity", "row"),
    ],
)
def test_peak_memory_is_about_one_layer(args: tuple[str, ...]) -> None:
    result = _probe(*args)
    largest = result["largest_layer_fp32_bytes"]
    # all 16 layers' bool masks alone would be 16 x 4 MiB = 64 MiB, their scores 256 MiB
    assert result["peak_extra_bytes"] <= 2 * largest + 8 * 2**20, result
    assert result["sparsity"] == pytest.approx(0.5)
