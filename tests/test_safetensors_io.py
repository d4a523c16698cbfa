from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ditprune_core.util.safetensors_io import LazyTensor, write_safetensors


def test_round_trip_through_the_safetensors_library(tmp_path) -> None:
    tensors = {
        "a.weight": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int32),
        "c": torch.tensor([True, False, True]),
        "d": torch.randn(2, 2).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
        "lazy": LazyTensor((2, 3), torch.float16, lambda: torch.ones(2, 3, dtype=torch.float16)),
    }
    path = write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "test"}, checksums=False)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "test"}
        for name, t in tensors.items():
            expected = t.produce() if isinstance(t, LazyTensor) else t
            got = f.get_tensor(name)
            assert got.dtype == expected.dtype, name
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), name


def test_refusals(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": torch.zeros(1)})
    with pytest.raises(FileExistsError, match="already exists"):
        write_safetensors(path, {"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="must be strings"):
        write_safetensors(tmp_path / "m.safetensors", {"a": torch.zeros(1)}, {"n": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="announced"):
        write_safetensors(
            tmp_path / "l.safetensors", {"a": LazyTensor((2,), torch.float32, lambda: torch.zeros(3))}
        )
    assert not (tmp_path / "l.safetensors").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left behind


def test_checksums_are_the_crc32_of_each_tensors_bytes(tmp_path) -> None:
    import json

    from ditprune_core.util.safetensors_io import CHECKSUM_KEY, checksum_mismatch, read_checksums

    tensors = {
        "u": torch.tensor([1, 2, 3], dtype=torch.uint8),  # zlib.crc32(b"\x01\x02\x03") = 0x55bc801d
        "one": LazyTensor((1,), torch.float32, lambda: torch.ones(1)),  # bytes 00 00 80 3f
    }
    path = write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "test"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta[CHECKSUM_KEY]) == {"u": "55bc801d", "one": "aca16a6a"}
        assert torch.equal(f.get_tensor("u"), tensors["u"])  # the header rewrite kept the data intact
    crcs = read_checksums(meta, path, ValueError)
    assert checksum_mismatch("u", torch.tensor([1, 2, 3], dtype=torch.uint8), crcs, path) is None
    assert "corrupted" in (
        checksum_mismatch("u", torch.tensor([1, 2, 4], dtype=torch.uint8), crcs, path) or ""
    )
    with pytest.raises(ValueError, match="reserved"):
        write_safetensors(tmp_path / "r.safetensors", {"a": torch.zeros(1)}, {CHECKSUM_KEY: "{}"})
    with pytest.raises(ValueError, match="__metadata__"):
        write_safetensors(tmp_path / "m.safetensors", {"__metadata__": torch.zeros(1)})
