"""The Gram's shrinkage toward its diagonal (``ReconstructParams.shrink`` / ``shrink_text``): the
formula on a hand-computed case, where it applies (the fit, never the reported error), which layers
are the text stream, and the refusals."""

from __future__ import annotations

import pytest
import torch
from tiny_miniflux_models import tiny_miniflux as _model
from tiny_miniflux_models import tiny_miniflux_forward as _run

from ditprune_core import PruneConfig, find_prunable_layers, prune_sequential_
from ditprune_core.config import ReconstructParams
from ditprune_core.layers import FLUX, HIDREAM, LUMINA2, QWEN_IMAGE, SD3, WAN
from ditprune_core.obs import relative_output_error, shrunk
from ditprune_core.reconstruct import reconstruct_layer


def test_shrunk_scales_the_off_diagonal_and_keeps_the_diagonal() -> None:
    h = torch.tensor([[4.0, 2.0, -1.0], [2.0, 9.0, 3.0], [-1.0, 3.0, 1.0]])
    assert shrunk(h, 0.0) is h
    assert torch.equal(shrunk(h, 0.5), torch.tensor([[4.0, 1.0, -0.5], [1.0, 9.0, 1.5], [-0.5, 1.5, 1.0]]))
    assert torch.equal(shrunk(h, 1.0), torch.diag(torch.tensor([4.0, 9.0, 1.0])))
    assert torch.equal(h[0], torch.tensor([4.0, 2.0, -1.0]))  # the input is not touched
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="shrinkage must be in"):
            shrunk(h, bad)


def test_params_refuse_a_shrinkage_outside_0_1() -> None:
    for bad in (1.2, -0.01):
        with pytest.raises(ValueError, match="shrink "):
            ReconstructParams(shrink=bad)
        with pytest.raises(ValueError, match="shrink_text"):
            ReconstructParams(shrink_text=bad)


def test_the_fit_uses_the_shrunk_gram_and_the_report_the_measured_one() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen) @ torch.randn(12, 12, generator=gen)  # correlated inputs
    h = x.T @ x / 64
    w = torch.randn(6, 12, generator=gen)
    config = PruneConfig(0.5, update="obs")
    full, keep, report = reconstruct_layer("blocks.0.fc", w, h, config, shrink=1.0)
    diag, keep_d, _ = reconstruct_layer("blocks.0.fc", w, torch.diag(h.diagonal()), config)
    assert torch.equal(full, diag) and torch.equal(keep, keep_d)
    assert report.output_error == pytest.approx(relative_output_error(full, w, h))
    plain, _, plain_report = reconstruct_layer("blocks.0.fc", w, h, config)
    assert not torch.equal(plain, full)
    # on the Gram it was fitted to, the unshrunk fit is the better one: shrinkage trades that fit away
    assert plain_report.output_error < report.output_error


def test_text_stream_layers_of_each_template() -> None:
    assert FLUX.is_text_stream("double_blocks.3.txt_attn.qkv")
    assert FLUX.is_text_stream("double_blocks.3.txt_mlp.2")
    for name in ("double_blocks.3.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.3.txt_mod.lin"):
        assert not FLUX.is_text_stream(name), name
    assert SD3.is_text_stream("joint_blocks.2.context_block.mlp.fc1")
    assert not SD3.is_text_stream("joint_blocks.2.x_block.mlp.fc1")
    assert QWEN_IMAGE.is_text_stream("transformer_blocks.0.attn.add_k_proj")
    assert not QWEN_IMAGE.is_text_stream("transformer_blocks.0.attn.to_k")
    assert WAN.is_text_stream("blocks.4.cross_attn.k") and not WAN.is_text_stream("blocks.4.cross_attn.q")
    assert HIDREAM.is_text_stream("double_stream_blocks.1.block.attn1.to_q_t")
    assert not HIDREAM.is_text_stream("double_stream_blocks.1.block.attn1.to_q")
    assert LUMINA2.is_text_stream("context_refiner.0.attention.qkv")
    assert not LUMINA2.is_text_stream("layers.0.attention.qkv")


def _pruned(reconstruct: ReconstructParams) -> dict[str, torch.Tensor]:
    model = _model()
    config = PruneConfig(0.5, update="obs", reconstruct=reconstruct)
    # one pass (every Gram recorded on the dense model at once): a layer's result depends on its
    # own Gram and shrinkage only
    prune_sequential_(
        model, lambda cal: [_run(model, 4, s) for s in range(3)], config, memory_budget_bytes=1 << 30
    )
    return {n: layer.weight.detach().clone() for n, layer in find_prunable_layers(model).items()}


def test_the_driver_shrinks_text_layers_by_shrink_text_and_the_others_by_shrink() -> None:
    base = ReconstructParams(allocation="uniform")
    plain = _pruned(base)
    text = _pruned(ReconstructParams(allocation="uniform", shrink_text=0.5))
    image = _pruned(ReconstructParams(allocation="uniform", shrink=0.5))
    names = list(plain)
    txt = [n for n in names if FLUX.is_text_stream(n)]
    assert txt and len(txt) < len(names)
    for n in names:
        assert torch.equal(plain[n], text[n]) != (n in txt), n
        assert torch.equal(plain[n], image[n]) == (n in txt), n
