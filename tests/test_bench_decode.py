"""The decode benchmarks' pieces: ComfyUI-GGUF's dequant.py found (or a skip that says how to fetch
it), its tiled blocks, and gpu_step's CPU smoke run (the command a lent GPU runs, at small sizes)."""

from __future__ import annotations

import re

import pytest
import torch

from bench.__main__ import main
from bench.decode_speed import (
    GGUF_DEQUANT_ENV,
    GgufDequantMissing,
    gguf_dequant_path,
    gguf_tiled_blocks,
    load_gguf_dequant,
)

pytest.importorskip("gguf", reason="the GGUF reference needs llama.cpp's gguf package: pip install gguf")


def _dequant_or_skip() -> str:
    try:
        return str(gguf_dequant_path())
    except GgufDequantMissing as exc:
        pytest.skip(str(exc))


def test_a_missing_dequant_says_how_to_fetch_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(GGUF_DEQUANT_ENV, raising=False)
    with pytest.raises(
        GgufDequantMissing, match=re.escape("git clone https://github.com/city96/ComfyUI-GGUF")
    ):
        gguf_dequant_path()
    with pytest.raises(GgufDequantMissing, match=r"nowhere\.py does not exist"):
        gguf_dequant_path(tmp_path / "nowhere.py")


def test_tiled_blocks_decode_to_the_tile_repeated() -> None:
    dequant = load_gguf_dequant(_dequant_or_skip())
    import gguf

    w = torch.randn(10, 256, generator=torch.Generator().manual_seed(0))
    blocks = gguf_tiled_blocks(w, "Q4_0", tile_rows=4)
    assert blocks.shape == (10 * 256 // 32, 18)
    decoded = dequant.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0, (10, 256), dtype=torch.float32)
    assert torch.equal(decoded[4:8], decoded[:4]) and torch.equal(decoded[8:], decoded[:2])
    assert float((decoded[:4] - w[:4]).abs().max()) < 0.5  # Q4_0 of the tile itself


def test_gpu_step_smoke_run_on_the_cpu(tmp_path) -> None:
    path = _dequant_or_skip()
    args = ["gpu_step", "--device", "cpu", "--quick", "--repeats", "1", "--out", str(tmp_path)]
    assert main([*args, "--gguf-dequant", path]) == 0
    text = (tmp_path / "gpu_step_cpu_quick.md").read_text()
    labels = ("dense float32", "ComfyUI fp8", "GGUF Q4_0", "GGUF Q3_K", "GGUF Q2_K", "ditprune 50% + int4")
    for label in labels:
        assert f"| {label}" in text, label
    assert "patch_dtype target" in text
