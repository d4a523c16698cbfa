"""Labelled plots with matplotlib (the Agg backend, no pyplot state): the 2-D weight space of one
layer's rows, coloured by cluster, and the sparsity of every transformer block.

Each plot is built as a :class:`matplotlib.figure.Figure` (tests read its labels) and rendered to an
(H, W, 3) float tensor in [0, 1], the layout of ComfyUI's IMAGE without the batch, by
:func:`render`. Sizes are chosen to be read in a workflow's preview node at its fit view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

__all__ = ["PALETTE", "block_kind", "render", "sparsity_by_block_figure", "weight_space_figure"]

#: Colours for clusters / series (colour-blind friendly, Okabe-Ito), as matplotlib hex strings.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#56b4e9", "#cc79a7", "#f0e442", "#000000")

#: block name prefix -> the legend name of its kind (FLUX, SD3, Wan, ...; anything else: "block")
_BLOCK_KINDS = (
    ("double_blocks", "double-stream block"),
    ("single_blocks", "single-stream block"),
    ("joint_blocks", "joint block"),
    ("transformer_blocks", "transformer block"),
    ("blocks", "block"),
    ("layers", "layer"),
)


def render(figure: Figure, *, dpi: int = 100) -> torch.Tensor:
    """A figure drawn by Agg as an (H, W, 3) float32 tensor in [0, 1]."""
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0)


def weight_space_figure(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    layer: str,
    calibrated: bool,
    silhouette: float | None = None,
    size: tuple[float, float] = (3.4, 3.2),
    font_size: float = 14,
) -> Figure:
    """Every output row of ``layer`` as a point ``(f1, f2)`` (:func:`~ditprune_core.cluster.row_features`),
    coloured by its cluster; the legend gives each cluster's rows.

    Args:
        features: (rows, 2) points: log RMS of the row's weights, and log RMS of its weights seen
            through the input energy (``calibrated``) or log of its largest weight.
        labels: (rows,) cluster ids.
        layer: the layer's name, shown in the title.
        calibrated: whether ``f2`` used a calibration (its axis label says which it is).
        silhouette: the clustering's silhouette score, shown in the title when given.
        size, font_size: inches at 100 dpi and points; the defaults read in a 230-unit preview
            node at a workflow's fit view (about 62 % zoom).
    """
    points = features.detach().float().cpu().numpy()
    ids = labels.detach().long().cpu().numpy()
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    ax.tick_params(labelsize=font_size - 2)
    k = int(ids.max()) + 1 if ids.size else 0
    for cluster in range(k):
        sel = ids == cluster
        ax.scatter(
            points[sel, 0],
            points[sel, 1],
            s=14,
            alpha=0.75,
            color=PALETTE[cluster % len(PALETTE)],
            label=f"cluster {cluster}: {int(sel.sum())} rows",
            edgecolors="none",
        )
    ax.set_xlabel("ln RMS(w) of a row", fontsize=font_size)
    ax.set_ylabel("ln RMS(w·√E[x²])" if calibrated else "ln max|w| (no calib.)", fontsize=font_size)
    title = f"{layer}\n{len(ids)} rows, k = {k}"
    if silhouette is not None:
        title += f", silhouette {silhouette:.2f}"
    ax.set_title(title, fontsize=font_size)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=font_size - 3, markerscale=1.5, framealpha=0.85)
    return fig


def block_kind(block: str) -> str:
    """The legend name of a block's kind, from its name (``double_blocks.3`` -> double-stream block)."""
    for prefix, name in _BLOCK_KINDS:
        if block.startswith(prefix + ".") or block == prefix:
            return name
    return "other layers"


def _short(block: str) -> str:
    """A tick label: ``double_blocks.3`` -> ``d3``, ``single_blocks.10`` -> ``s10``."""
    head, _, index = block.rpartition(".")
    return f"{head[:1]}{index}" if head and index.isdigit() else block


def sparsity_by_block_figure(
    sparsity: Mapping[str, float],
    *,
    target: float | None = None,
    title: str = "Sparsity per block",
    size: tuple[float, float] = (3.4, 3.2),
    font_size: float = 14,
) -> Figure:
    """One bar per transformer block, in model order: the fraction of its prunable weights removed,
    in percent; bars coloured by block kind (legend), the target as a dashed line.

    Args:
        sparsity: block name -> sparsity in [0, 1] (:meth:`~ditprune_core.report.SparsityReport.by`).
        target: the requested sparsity, drawn as a line when given.
        size, font_size: as :func:`weight_space_figure`.
    """
    names: Sequence[str] = list(sparsity)
    values = [100.0 * float(sparsity[n]) for n in names]
    kinds = [block_kind(n) for n in names]
    order = list(dict.fromkeys(kinds))
    colour = {kind: PALETTE[i % len(PALETTE)] for i, kind in enumerate(order)}
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    ax.tick_params(labelsize=font_size - 2)
    x = np.arange(len(names))
    ax.bar(x, values, color=[colour[k] for k in kinds], width=0.8)
    handles: list[Patch | Line2D] = [Patch(color=colour[k], label=k) for k in order]
    if target is not None:
        ax.axhline(100.0 * target, color="#444444", linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color="#444444", linestyle="--", label=f"target {target:.0%}"))
    ax.set_ylim(0, 100)
    ax.set_ylabel("sparsity (% removed)", fontsize=font_size)
    ax.set_xlabel("block, in model order", fontsize=font_size)
    step = max(1, -(-len(names) // 6))  # at most 6 tick labels
    ax.set_xticks(x[::step], [_short(n) for n in names][::step])
    ax.set_title(title, fontsize=font_size)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(handles=handles, loc="upper right", fontsize=font_size - 3)
    return fig
