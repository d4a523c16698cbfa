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
