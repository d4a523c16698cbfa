"""The reconstruction lab runs the product's own per-layer dispatch: its rows cannot drift from it."""

from __future__ import annotations

import pytest
import torch

from bench.reconstruction_lab import Recipe


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(balance=0.4),
        Recipe(balance=0.5, refit="exact"),
        Recipe(mask="energy"),
        Recipe(mask="energy", refit="pcg", refit_iters=5, refit_tol=0.0),
    ],
)
@pytest.mark.parametrize(
    ("sparsity", "pattern"), [(0.5, "unstructured"), (0.5, "2:4"), (0.7, "unstructured")]
)
def test_a_product_recipe_is_reconstruct_layer_bit_for_bit(
    recipe: Recipe, sparsity: float, pattern: str
) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=gen)
    x = torch.randn(200, 32, generator=gen)
    gram = x.T @ x / 200
    assert recipe.product_config(sparsity, pattern) is not None
    via_product = recipe("blocks.0.fc", w, gram, sparsity, pattern)
    spelled_out = recipe.lab_only("blocks.0.fc", w, gram, sparsity, pattern)
    assert torch.equal(via_product, spelled_out)


def test_lab_only_recipes_are_named_as_such() -> None:
    assert Recipe(mask="energy", update=False, refit="exact").product_config(0.5, "unstructured") is None
    assert Recipe(refit="exact", refit_damp=0.1).product_config(0.5, "unstructured") is None


def test_rows_of_both_halves_merge_and_the_table_leads_with_held_out() -> None:
    from bench.reconstruction_lab import Row, merge_lab_rows, to_markdown

    first = [
        Row("m", "dit-obs", "50%", [0.1], 0.02, 4.0, [0.01], [0.2], [0.04]),
        Row("m", "dit-pruning", "50%", [0.3], float("nan"), 1.0, [0.09], [0.3], [0.09]),
    ]
    second = [
        Row("m", "dit-obs", "50%", [0.1], 0.04, 6.0, [0.01], [0.2], [0.02]),
        Row("m", "dit-pruning", "50%", [0.3], float("nan"), 1.0, [0.09], [0.3], [0.09]),
    ]
    merged = merge_lab_rows([first, second])
    obs = merged[0]
    assert (obs.rel_mse, obs.held_rel_mse, obs.seconds) == ([0.01, 0.01], [0.04, 0.02], 5.0)
    assert obs.layer_err == pytest.approx(0.03)
    text = to_markdown(merged, "cmd")
    # held-out 0.03, seen 0.01: held/seen 3.00
    assert "| m | dit-obs | 50% | 0.0300 ± 0.0100 | 0.0100 ± 0.0000 | 3.00 |" in text
    # mask-only 0.09 / ours 0.03 held out = 3.00x rel. MSE; rel. error 0.3 / 0.2 = 1.50x
    assert "| m | dit-pruning | 50% | 1.50 | 3.00 | NO / yes |" in text
