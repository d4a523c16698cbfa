"""Exact selection of the lowest scores: the one place where masks get their exact sparsity.

Everything here works a block of rows (or columns) at a time, so that beside a layer's scores only
block-sized temporaries exist: this is what keeps the peak memory of pruning a FLUX layer near
one fp32 copy of it.
"""

from __future__ import annotations

import torch

from .blocks import row_blocks, rows_per_block

__all__ = ["count_true", "kth_smallest", "prune_lowest"]

_BRACKET_SAMPLE = 1 << 16


def prune_lowest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask that prunes exactly ``counts[g]`` lowest scores in each row ``g`` of ``scores``.

    Selection is by ``kthvalue`` (no full sort) on blocks of rows; a single long row (layer-wide
    groups) uses :func:`kth_smallest`. Ties at the threshold are pruned in index order so the count
    is exact.

    Args:
        scores: (G, n) scores.
        counts: (G,) int64 number to prune per row, each in [0, n].
    Returns:
        (G, n) bool keep-mask.
    """
    g, n = scores.shape
    counts = counts.to(scores.device)
    distinct = torch.unique(counts).tolist()
    if len(distinct) == 1 and g <= rows_per_block(n):
        return _prune_uniform(scores, int(distinct[0]))
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    if len(distinct) == 1:
        for block in row_blocks(g, n):
            keep[block] = _prune_uniform(scores[block], int(distinct[0]))
        return keep
    for value in distinct:
        rows = (counts == value).nonzero().squeeze(1)
        for block in row_blocks(rows.numel(), n):
            chunk = rows[block]
            keep[chunk] = _prune_uniform(scores.index_select(0, chunk), int(value))
    return keep


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True entries per row of a (G, n) bool tensor, as (G, 1) int64.

    ``mask.sum(dim=1)`` would first cast the whole mask to int64 (8 bytes per weight); this sums a
    block of columns at a time.
    """
    g, n = mask.shape
    total = torch.zeros(g, 1, dtype=torch.int64, device=mask.device)
    for cols in row_blocks(n, g):  # blocks of columns, each g tall
        total += mask[:, cols].sum(dim=1, keepdim=True)
    return total


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th smallest (1-based) of a 1-D tensor without copying all of it.

    A random sample brackets the answer; only the values inside the bracket are then selected
    from. Falls back to ``kthvalue`` on small inputs or when the bracket misses.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside 1..{n}")
    if n <= 16 * _BRACKET_SAMPLE:
        return values.kthvalue(k).values
    gen = torch.Generator(device="cpu").manual_seed(n ^ k)
    idx = torch.randint(0, n, (_BRACKET_SAMPLE,), generator=gen).to(values.device)
    sample = values[idx]
    q = k / n
    margin = 5.0 * (q * (1 - q) / _BRACKET_SAMPLE) ** 0.5 + 2.0 / _BRACKET_SAMPLE
    lo = sample.kthvalue(max(1, int((q - margin) * _BRACKET_SAMPLE))).values
    hi = sample.kthvalue(min(_BRACKET_SAMPLE, int((q + margin) * _BRACKET_SAMPLE) + 1)).values
    below = 0
    inside = []
    for span in row_blocks(n, 1):  # a 1-D tensor: blocks of BLOCK_ELEMENTS values
        block = values[span]
        below += int(count_true((block < lo)[None]))
        inside.append(block[(block >= lo) & (block <= hi)])
    candidates = torch.cat(inside)
    if below < k <= below + candidates.numel():
        return candidates.kthvalue(k - below).values
    return values.kthvalue(k).values


def _prune_uniform(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask pruning exactly ``count`` lowest scores in every row of (G, n) ``scores``."""
    g, n = scores.shape
    if count <= 0:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if count >= n:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if g == 1:
        threshold = kth_smallest(scores[0], count).reshape(1, 1)
    else:
        threshold = scores.kthvalue(count, dim=1, keepdim=True).values
    keep = scores > threshold
    ties = scores == threshold
    n_ties = count_true(ties)
    need = count - (n - count_true(keep) - n_ties)  # ties still to prune per row
    survivors = (need < n_ties).squeeze(1).nonzero().squeeze(1)  # rows where some ties are kept
    if survivors.numel():
        _keep_late_ties_(keep, ties, need, survivors)
    return keep


def _keep_late_ties_(keep: torch.Tensor, ties: torch.Tensor, need: torch.Tensor, rows: torch.Tensor) -> None:
    """In ``rows``, keep the ties after the first ``need`` ones, a block of columns at a time."""
    every_row = rows.numel() == ties.shape[0]
    sub = ties if every_row else ties.index_select(0, rows)
    sub_need = need if every_row else need.index_select(0, rows)
    running = torch.zeros_like(sub_need)
    n = sub.shape[1]
    for cols in row_blocks(n, rows.numel()):  # blocks of columns, rows.numel() tall
        t = sub[:, cols]
        rank = t.cumsum(dim=1) + running
        late = t & (rank > sub_need)
        if every_row:
            keep[:, cols] |= late
        else:
            keep[rows, cols] |= late
        running = rank[:, -1:]
