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
from ditprune_core.save import CheckpointError, read_checkpoint_info, save_pruned_checkpoint
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


# ---- fixed cases: the crafted files of the hardening issue, each kept as it was made ---------------


def _recraft(src, dst, *, meta=None, tensors=None, layouts_crc: str = "keep") -> None:
    """Rewrite ``src`` with changed metadata or tensors and every tensor's CRC32 recomputed, so that
    only the semantic checks (and, with ``layouts_crc="keep"``, the decoding metadata's own checksum
    as written) can catch the change; ``layouts_crc="recompute"`` makes the edit self-consistent."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ditprune_core.save import LAYOUTS_CHECKSUM_KEY, layouts_checksum
    from ditprune_core.util.safetensors_io import CHECKSUM_KEY, tensor_crc32

    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    metadata.update(meta or {})
    data.update(tensors or {})
    metadata[CHECKSUM_KEY] = json.dumps({k: tensor_crc32(v) for k, v in data.items()})
    if layouts_crc == "recompute":
        metadata[LAYOUTS_CHECKSUM_KEY] = layouts_checksum(metadata)
    save_file(data, str(dst), metadata=metadata)


@pytest.mark.parametrize("group_size", [16_777_216, 2**31 - 1])
def test_fixed_case_a_huge_group_size_decodes_as_the_row_and_allocates_by_the_file(
    tmp_path, group_size: int
) -> None:
    """A valid 3 KB int4 file with its group size set to 2^24 (or 2^31 - 1) in ``qspec`` and the
    metadata, every checksum recomputed: it passes every check (it is a self-consistent file) and
    now decodes exactly as the original (groups never span rows) through the reader and the runtime
    pieces, which used to build a groups x 2^24 grid (512 MB a layer, 8 GB for 2^31 - 1)."""
    import json

    from ditprune_core.runtime import decode_runtime, runtime_pieces, runtime_plan
    from ditprune_core.save import validate_compressed_state

    path, original, _, _ = _checkpoint(tmp_path, "int4")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        spec = f.get_tensor("w.qspec").clone()
        pieces = {k.removeprefix("w."): f.get_tensor(k) for k in f.keys() if k.startswith("w.")}  # noqa: SIM118
    layouts = json.loads(meta["layouts"])
    layouts["w"]["group_size"] = str(group_size)
    spec[1] = group_size
    bad = tmp_path / "huge_group.safetensors"
    _recraft(
        path, bad, meta={"layouts": json.dumps(layouts)}, tensors={"w.qspec": spec}, layouts_crc="recompute"
    )
    assert _same(load_pruned_checkpoint(bad), original)
    with safe_open(str(bad), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    validate_compressed_state(state, bad)
    crafted = {k.removeprefix("w."): v for k, v in state.items() if k.startswith("w.")}
    runtime, reference = runtime_pieces(crafted, "'w'"), runtime_pieces(pieces, "'w'")
    assert {k: v.numel() for k, v in runtime.items()} == {k: v.numel() for k, v in reference.items()}
    assert torch.equal(decode_runtime(runtime, runtime_plan(runtime, "'w'"), torch.bfloat16), original["w"])


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float16", "float32", "float64"])
@pytest.mark.parametrize("kind", ["bitmask", "2:4", "int4", "int3+int8"])
def test_fixed_case_the_decoded_dtype_edited_in_the_metadata_is_refused(
    tmp_path, kind: str, dtype: str
) -> None:
    """Changing a layer's ``"dtype"`` in the ``layouts`` metadata (tensor CRCs recomputed) was accepted
    on every layout, and the weights decoded to another dtype: the tensor CRCs cover tensor bytes only.
    The decoding metadata now has its own checksum."""
    import json

    path, _, _, _ = _checkpoint(tmp_path, kind)
    meta = read_checkpoint_info(path).metadata
    layouts = json.loads(meta["layouts"])
    for entry in layouts.values():
        entry["dtype"] = dtype
    bad = tmp_path / "retyped.safetensors"
    _recraft(path, bad, meta={"layouts": json.dumps(layouts)})
    with pytest.raises(
        CheckpointError, match=r"retyped\.safetensors: its decoding metadata .* does not match"
    ):
        load_pruned_checkpoint(bad)


def test_fixed_case_a_float16_int8_remainder_near_65504_loads_finite_and_reports_its_error(tmp_path) -> None:
    """A float16 weight near float16's largest value, stored as an int8 remainder: an asymmetric
    zero point decoded values half a step above 65504, all 512 loaded values were inf, and the save
    report (measured in float32) said 0.00047. Decoding now clamps to the dtype's range and the
    report measures what the file decodes to."""
    top = float(torch.finfo(torch.float16).max)
    gen = torch.Generator().manual_seed(0)
    w = (torch.rand(4, 128, generator=gen) * 0.5 + 0.5) * top
    w[:, 0] = -0.001 * top
    w[:, 1] = top
    w = w.to(torch.float16)
    path = tmp_path / "near_max.safetensors"
    report = save_pruned_checkpoint({"m.weight": w}, path, remainder="int8")
    assert report.remainder == ["m.weight"]
    back = load_pruned_checkpoint(path)["m.weight"]
    assert back.dtype == torch.float16 and bool(torch.isfinite(back).all())
    # the runtime decode (ComfyUI's compressed-on-device load) clamps alike, bit for bit
    from safetensors import safe_open

    from ditprune_core.runtime import decode_runtime, runtime_pieces, runtime_plan

    with safe_open(str(path), framework="pt") as f:
        pieces = {k.removeprefix("m.weight."): f.get_tensor(k) for k in f.keys() if k.startswith("m.weight.")}  # noqa: SIM118
    held = runtime_pieces(pieces)
    assert torch.equal(decode_runtime(held, runtime_plan(held), torch.float16), back)
    real = float((back.float() - w.float()).abs().max() / w.float().abs().max())
    assert report.max_remainder_relative_error == pytest.approx(real, rel=1e-6)
    assert real < 1 / 255
