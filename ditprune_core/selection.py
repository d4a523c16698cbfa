"""Exact selection of the lowest scores: the one place where masks get their exact sparsity."""

from __future__ import annotations

import torch

__all__ = ["kth_smallest", "prune_lowest"]


def prune_lowest(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask that prunes exactly ``counts[g]`` lowest scores in each row ``g`` of ``scores``.

    Selection is by ``kthvalue`` (no full sort), a block of rows at a time so temporaries stay
    small; one very long row (layer-wide groups) uses :func:`kth_smallest`. Ties at the threshold
    are pruned in index order so the count is exact.

    Args:
        scores: (G, n) scores.
        counts: (G,) int64 number to prune per row, each in [0, n].
    Returns:
        (G, n) bool keep-mask.
    """
    counts = counts.to(scores.device)
    distinct = torch.unique(counts).tolist()
    if len(distinct) == 1:
        return _prune_uniform(scores, int(distinct[0]))
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for value in distinct:
        rows = (counts == value).nonzero().squeeze(1)
        keep[rows] = _prune_uniform(scores.index_select(0, rows), int(value))
    return keep


_ROW_BLOCK_ELEMENTS = 1 << 22  # kthvalue copies its input: bound that copy to 16 MB of float32
_BRACKET_SAMPLE = 1 << 20


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th smallest (1-based) of a 1-D tensor without copying all of it.

    A random sample brackets the answer; only the values inside the bracket are then selected
    from. Falls back to ``kthvalue`` on small inputs or when the bracket misses.
    """
    n = values.numel()
    if n <= 4 * _BRACKET_SAMPLE:
        return values.kthvalue(k).values
    gen = torch.Generator(device="cpu").manual_seed(n ^ k)
    idx = torch.randint(0, n, (_BRACKET_SAMPLE,), generator=gen).to(values.device)
    sample = values[idx]
    q = k / n
    margin = 4.0 * (q * (1 - q) / _BRACKET_SAMPLE) ** 0.5 + 2.0 / _BRACKET_SAMPLE
    lo = sample.kthvalue(max(1, int((q - margin) * _BRACKET_SAMPLE))).values
    hi = sample.kthvalue(min(_BRACKET_SAMPLE, int((q + margin) * _BRACKET_SAMPLE) + 1)).values
    below = int((values < lo).sum())
    inside = values[(values >= lo) & (values <= hi)]
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values
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
        step = max(1, _ROW_BLOCK_ELEMENTS // n)
        threshold = torch.cat(
            [scores[i : i + step].kthvalue(count, dim=1, keepdim=True).values for i in range(0, g, step)]
        )
    keep = scores > threshold
    ties = scores == threshold
    need = count - (n - keep.sum(dim=1) - ties.sum(dim=1))  # ties still to prune per row
    survivors = (need < ties.sum(dim=1)).nonzero().squeeze(1)  # rows where some ties are kept
    if survivors.numel():
        row_ties = ties.index_select(0, survivors)
        keep[survivors] |= row_ties & (row_ties.cumsum(dim=1) > need[survivors, None])
    return keep
