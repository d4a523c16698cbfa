"""The labelled plots of Cluster Weights and Apply Pruning: axes, units, legend, the layer plotted."""

from __future__ import annotations

import pytest
import torch

from ditprune_core.util.plots import block_kind, render, sparsity_by_block_figure, weight_space_figure


def test_weight_space_plot_names_its_axes_layer_and_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.cat([torch.randn(30, 2, generator=gen), torch.randn(20, 2, generator=gen) + 4])
    labels = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    fig = weight_space_figure(
        features, labels, layer="single_blocks.0.linear1", calibrated=True, silhouette=0.71
    )
    (ax,) = fig.axes
    assert ax.get_xlabel() == "ln RMS(w) of a row"
    assert ax.get_ylabel() == "ln RMS(w·√E[x²])"
    assert ax.get_title() == "single_blocks.0.linear1\n50 rows, k = 2, silhouette 0.71"
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["cluster 0: 30 rows", "cluster 1: 20 rows"]
    uncalibrated = weight_space_figure(features, labels, layer="x", calibrated=False)
    assert uncalibrated.axes[0].get_ylabel() == "ln max|w| (no calib.)"
    image = render(fig)
    assert image.shape == (320, 340, 3) and image.min() >= 0 and image.max() <= 1
    assert (image < 0.5).any()  # something is drawn


def test_sparsity_chart_has_units_kinds_and_the_target() -> None:
    blocks = {f"double_blocks.{i}": 0.45 for i in range(2)} | {f"single_blocks.{i}": 0.55 for i in range(3)}
    fig = sparsity_by_block_figure(blocks, target=0.5, title="sparsity per block")
    (ax,) = fig.axes
    assert ax.get_ylabel() == "sparsity (% removed)"
    assert ax.get_xlabel() == "block, in model order" and ax.get_title() == "sparsity per block"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["d0", "d1", "s0", "s1", "s2"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "double-stream block",
        "single-stream block",
        "target 50%",
    ]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([45.0, 45.0, 55.0, 55.0, 55.0])
    assert ax.get_ylim() == (0.0, 100.0)
    assert render(fig).shape == (320, 340, 3)


def test_block_kinds() -> None:
    assert block_kind("joint_blocks.3") == "joint block"
    assert block_kind("blocks.12") == "block"
    assert block_kind("other") == "other layers"
