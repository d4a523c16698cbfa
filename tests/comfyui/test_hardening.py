"""Refusals and file handling of the nodes, found by attacking them (issue 10, items 6-10)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Comfy
from graph import apply, calibrate, saliency
from graph import load_pruned as _load
from graph import saved_compressed as _saved
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import flux_cond, flux_detection_from_shapes, flux_shapes, random_state_dict

CLUSTER = {
    "granularity": "layer",
    "n_clusters": 0,
    "max_clusters": 4,
    "min_silhouette": 0.0,
    "allocation": 0.0,
    "within": "row",
    "seed": 0,
    "plot_layer": "single_blocks.0.linear1",
}


def _models_dir(comfy: Comfy) -> Path:
    return comfy.base / "models" / "diffusion_models"


def _stock_load(comfy: Comfy, sd: dict[str, torch.Tensor], name: str, *, narrow: bool = True) -> Any:
    """Write ``sd`` as a file and load it with the stock Load Diffusion Model node, weight_dtype default."""
    if not (_models_dir(comfy) / name).exists():  # never over a file a loaded model may map
        save_file(sd, str(_models_dir(comfy) / name))
    if not narrow:
        return comfy.nodes.UNETLoader().load_unet(name, "default")[0]
    with flux_detection_from_shapes():
        return comfy.nodes.UNETLoader().load_unet(name, "default")[0]


def _save(comfy: Comfy, model: Any, prefix: str, **kw: Any) -> str:
    return comfy.node("DitPruneSavePrunedModel").execute(model=model, filename_prefix=prefix, **kw).args[0]


# --- 6. Save keeps the dtype of the file the model came from -------------------------------------


def test_bf16_flux_loaded_as_fp32_on_cpu_is_saved_as_bf16(comfy: Comfy) -> None:
    sd = random_state_dict(flux_shapes(), seed=30, dtype=torch.bfloat16)
    model = _stock_load(comfy, sd, "dtype_src.safetensors")
    qkv = "double_blocks.0.img_attn.qkv.weight"
    assert model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32  # CPU
    pruned, _report, _ = apply(comfy, model, saliency(comfy, None, "magnitude"), 0.5)
    source_size = (_models_dir(comfy) / "dtype_src.safetensors").stat().st_size
    for fmt in ("dense", "compressed"):
        path = _save(comfy, pruned, f"dtype/auto_{fmt}", format=fmt)
        assert Path(path).stat().st_size <= source_size + 4096  # never larger than its source
        with safe_open(path, framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            tensors = {k: f.get_tensor(k) for k in names}
        if fmt == "dense":
            assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
            saved = tensors[qkv]
            kept = saved != 0
            assert float(kept.float().mean()) == pytest.approx(0.5, abs=1e-3)
            assert torch.equal(saved[kept], sd[qkv][kept])  # bit-exact: the source's own bf16 values
            assert torch.equal(tensors["img_in.weight"], sd["img_in.weight"])
        else:
            assert tensors[qkv + ".compressed"].dtype == torch.bfloat16  # the kept values
    # by hand: fp32 (asked for, so larger) and fp16
    with safe_open(_save(comfy, pruned, "dtype/fp32", dtype="fp32"), framework="pt") as f:
        assert f.get_tensor(qkv).dtype == torch.float32
    with safe_open(_save(comfy, pruned, "dtype/fp16", dtype="fp16"), framework="pt") as f:
        assert f.get_tensor(qkv).dtype == torch.float16


def test_genuine_fp32_stays_fp32_and_overflow_is_refused(comfy: Comfy) -> None:
    sd = random_state_dict(flux_shapes(), seed=31)
    model = _stock_load(comfy, sd, "dtype_fp32.safetensors")
    with safe_open(_save(comfy, model, "dtype/fp32_auto"), framework="pt") as f:
        assert torch.equal(f.get_tensor("img_in.weight"), sd["img_in.weight"])  # not rounded to bf16
    sd["txt_in.bias"][0] = 1e5  # fits bf16, not fp16
    big = _stock_load(comfy, {k: v.to(torch.bfloat16) for k, v in sd.items()}, "dtype_big.safetensors")
    with pytest.raises(ValueError, match=r"'txt_in\.bias' holds 99840, which does not fit in float16"):
        _save(comfy, big, "dtype/overflow", dtype="fp16")
    assert not list((_models_dir(comfy) / "dtype").glob("overflow*"))


@pytest.mark.slow
def test_full_width_bf16_flux_through_the_stock_loader_is_saved_as_bf16(comfy: Comfy) -> None:
    """3072-wide FLUX, 1 double + 1 single block, bf16 file; stock detection and UNETLoader 'default'."""
    sd = random_state_dict(
        flux_shapes(hidden=3072, heads=24, ctx=4096, vec=768), seed=32, dtype=torch.bfloat16, std=0.02
    )
    model = _stock_load(comfy, sd, "dtype_full.safetensors", narrow=False)
    layer = model.model.diffusion_model.single_blocks[0].linear1.weight
    assert layer.dtype == torch.float32 and layer.shape == (3 * 3072 + 4 * 3072, 3072)
    del sd
    pruned, _report, _ = apply(comfy, model, saliency(comfy, None, "magnitude"), 0.5)
    path = _save(comfy, pruned, "dtype/full")
    source_size = (_models_dir(comfy) / "dtype_full.safetensors").stat().st_size
    assert Path(path).stat().st_size <= source_size + 4096
    with safe_open(path, framework="pt") as f:
        assert f.get_slice("single_blocks.0.linear1.weight").get_dtype() == "BF16"
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    for name in (path, _models_dir(comfy) / "dtype_full.safetensors"):
        Path(name).unlink()


# --- 7. a model loaded compressed is refused by every node that reads its weights ------------------


def test_nodes_refuse_a_model_loaded_compressed(comfy: Comfy) -> None:
    from tiny_models import sd3_cond

    _model, _pruned, name = _saved(comfy, "unstructured", "refuse")
    packed = _load(comfy, name)
    expected = r".*loaded compressed.*'joint_blocks\.\d\..*'.*mode 'densify at load'"
    with pytest.raises(ValueError, match="cannot calibrate it: " + expected):
        calibrate(comfy, packed, sd3_cond)
    with pytest.raises(ValueError, match="cannot cluster its weights: " + expected):
        comfy.node("DitPruneClusterWeights").execute(model=packed, **CLUSTER)
    with pytest.raises(ValueError, match="cannot prune it: " + expected):
        apply(comfy, packed, saliency(comfy, None, "magnitude"))
    with pytest.raises(ValueError, match="cannot save it again .*" + expected):
        _save(comfy, packed, "again")
    dense = _load(comfy, name, "densify at load")  # what the message says to do works
    stats, _, _ = calibrate(comfy, dense, sd3_cond)
    apply(comfy, dense, saliency(comfy, stats), 0.5)


# --- 8. a prefix must name a file inside the folder -----------------------------------------------


@pytest.mark.parametrize("prefix", [".", "sub/..", "sub/", "sub/.", "a/b/..", "sub\\"])
def test_save_prefix_naming_the_folder_itself_is_refused(comfy: Comfy, prefix: str) -> None:
    model = _stock_load(comfy, random_state_dict(flux_shapes(), seed=33), "prefix_src.safetensors")
    before = set(comfy.base.rglob("*"))
    with pytest.raises(ValueError, match="does not end in a file name"):
        _save(comfy, model, prefix)
    assert set(comfy.base.rglob("*")) == before


# --- 9. the pack installs the signal handlers that remove a save's temporary -----------------------


def test_loading_the_pack_installed_the_cleanup_handlers(comfy: Comfy) -> None:
    """Each signal gets the cleanup handler, unless the process ignores it (run under ``nohup``,
    SIGHUP is ignored): then it stays ignored, so that a hang-up still does not stop the process."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(signum)
        assert handler == signal.SIG_IGN or getattr(handler, "ditprune_cleanup", False), signal.Signals(
            signum
        ).name
    assert getattr(signal.getsignal(signal.SIGTERM), "ditprune_cleanup", False)  # never ignored by pytest


# --- 10. Calibrate checks its save_name before it samples ------------------------------------------


@contextmanager
def _forward_calls(model: Any) -> Iterator[list[int]]:
    calls: list[int] = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_calibrate_refuses_a_bad_save_name_before_sampling(comfy: Comfy) -> None:
    model = _stock_load(comfy, random_state_dict(flux_shapes(), seed=34), "calname_src.safetensors")
    with _forward_calls(model) as calls:
        calibrate(comfy, model, flux_cond, save_name="taken", steps=1)
    assert calls, "the forward counter does not see sampling"
    bad = {
        "taken": (FileExistsError, "already exists"),
        "taken.safetensors": (FileExistsError, "already exists"),
        "x" * 300: (ValueError, "file name is 3.. bytes long; this filesystem allows"),
        "../../escape": (ValueError, "outside"),
        ".": (ValueError, "does not end in a file name"),
        "sub/..": (ValueError, "does not end in a file name"),
        ".safetensors": (ValueError, "does not end in a file name"),
    }
    for name, (error, message) in bad.items():
        with _forward_calls(model) as calls, pytest.raises(error, match=message):
            calibrate(comfy, model, flux_cond, save_name=name)
        assert calls == [], f"{name!r}: sampled before refusing the name"
