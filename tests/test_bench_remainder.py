"""The remainder benchmark: its groups split the Linear layers outside the prunable ones, it rounds
exactly the group it names, and its table reports each group's share of the whole remainder's error."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.lowbit import FLUX_REMAINDER_CODED
from bench.pareto import round_remainder_
from bench.remainder import GROUPS, RemainderRow, flux_group_params, group_keys, rounded, write_remainder
from ditprune_core.miniflux.pipeline import load_bundled


def test_groups_split_the_rest_and_modulation_is_what_the_product_codes() -> None:
    pipe = load_bundled("miniflux-a")
    every = set(group_keys(pipe.model, "every Linear"))
    parts = [set(group_keys(pipe.model, g)) for g in ("modulation", "embedders", "final layer")]
    assert all(parts) and sum(len(p) for p in parts) == len(every) and set().union(*parts) == every
    coded: list[str] = []  # what the frontier's whole files (and Save Pruned Model) round
    round_remainder_(pipe.model, lambda w, key: (coded.append(key), w)[1])
    assert set(coded) == parts[0]
    assert flux_group_params("modulation") == FLUX_REMAINDER_CODED
    assert sum(flux_group_params(g) for g in ("modulation", "embedders", "final layer")) == flux_group_params(
        "every Linear"
    )


def test_rounded_changes_only_its_group() -> None:
    pipe = load_bundled("miniflux-a")
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    after = rounded(pipe, "final layer", "int3").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(group_keys(pipe.model, "final layer"))
    assert all(torch.equal(before[k], v) for k, v in pipe.model.state_dict().items())  # a copy


def test_table_gives_each_groups_share(tmp_path: Path) -> None:
    rows = [
        RemainderRow("a", g, 1, {"int4": [e / 2, e / 2], "int3": [e, e]})
        for g, e in zip(GROUPS, (0.01, 0.002, 0.006, 0.003), strict=True)
    ]
    text = write_remainder(rows, tmp_path, "cmd").read_text()
    assert "| a | every Linear | 1 | 0.00500 (100%) | 0.01000 (100%) |" in text
    assert "| a | modulation | 1 | 0.00100 (20%) | 0.00200 (20%) | 3.228B |" in text
    assert "| a | embedders | 1 | 0.00300 (60%) | 0.00600 (60%) |" in text
