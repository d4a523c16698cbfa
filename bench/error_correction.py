"""Error-correcting reconstruction, a lab variant (not a product path): fit the dense weight to the
dense model's inputs before pruning (``reconstruction_lab``'s ``corrected`` recipes).

Measured in docs/bench/reconstruction_lab.md; it lives with the benchmarks because only the lab
uses it.
"""

from __future__ import annotations

import torch

from ditprune_core.obs import dampened
from ditprune_core.stats import CalibrationError, GramAccumulator, check_gram

__all__ = ["PairedGramAccumulator", "corrected_weight"]

_CHUNK_ELEMENTS = 1 << 22  # token rows per Gram product: at most 16 MB of float32 inputs at a time


class PairedGramAccumulator:
    """Gram of a layer's inputs ``x`` and cross-Gram with reference inputs ``x_ref`` of the same tokens.

    For error-correcting reconstruction: ``x`` are the inputs of the layer in the partially pruned
    model, ``x_ref`` the inputs of the same layer in the dense model on the same model inputs. The
    running means are ``H = E[x xᵀ]`` and ``C = E[x_ref xᵀ]``, both (in, in), weighted like
    :class:`GramAccumulator`. Memory: twice a Gram.
    """

    def __init__(self, in_features: int, *, name: str = "layer", dtype: torch.dtype = torch.float32) -> None:
        self.gram = GramAccumulator(in_features, name=name, dtype=dtype)
        self.cross = GramAccumulator(in_features, name=name, dtype=dtype)

    @property
    def tokens(self) -> int:
        return self.gram.tokens

    def add_pair(self, x: torch.Tensor, x_ref: torch.Tensor, weight: float = 1.0) -> None:
        """Add inputs ``x`` and reference inputs ``x_ref``, both (..., in_features), token for token."""
        if x.shape != x_ref.shape:
            raise CalibrationError(
                f"paired Gram of {self.gram.name!r}: inputs {tuple(x.shape)} and reference inputs "
                f"{tuple(x_ref.shape)} differ; run the dense and the pruned model on the same inputs"
            )
        self.gram.add_batch(x, weight)
        n = self.gram.in_features
        a, b = x_ref.detach().reshape(-1, n), x.detach().reshape(-1, n)
        if a.shape[0] == 0 or weight <= 0:
            return
        total = torch.zeros(n, n, dtype=self.cross.dtype, device=x.device)
        step = max(1, _CHUNK_ELEMENTS // n)
        for start in range(0, a.shape[0], step):
            total.addmm_(a[start : start + step].to(total.dtype).t(), b[start : start + step].to(total.dtype))
        if not bool(torch.isfinite(total).all()):
            raise CalibrationError(f"layer {self.gram.name!r} received NaN or inf reference inputs")
        self.cross._combine(total.div_(a.shape[0]), weight * a.shape[0], a.shape[0])

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, C)``: Gram ``E[x xᵀ]`` and cross-Gram ``E[x_ref xᵀ]``, each (in, in)."""
        return self.gram.finalize(), self.cross.finalize()


@torch.no_grad()
def corrected_weight(
    weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, *, damp: float = 0.01
) -> torch.Tensor:
    """The dense weight moved to absorb the error upstream of the layer (before pruning it).

    ``W* = argmin E||W' x - W x_ref||² + λ||W' - W||² = W (C + λI)(H + λI)⁻¹`` with ``H = E[x xᵀ]``,
    ``C = E[x_ref xᵀ]`` (:class:`PairedGramAccumulator`) and ``λ = damp · mean(diag H)``. When the
    inputs are unchanged (``x = x_ref``) it is ``W`` itself. Since
    ``E||W' x - W x_ref||² = tr((W' - W*) H (W' - W*)ᵀ) + const`` (for λ → 0), pruning ``W*`` on
    ``H`` with :func:`obs_prune` / :func:`refit_masked` minimises the error against the dense layer's
    output on dense inputs.

    Args:
        weight: (out, in) dense weight ``W``.
        gram: (in, in) ``H``; cross: (in, in) ``C``.
    Returns:
        (out, in) float32 ``W*`` on the weight's device.
    """
    check_gram(gram)
    check_gram(cross)
    device = weight.device
    h = dampened(gram.to(device), damp)
    lam = float(h.diagonal().mean() - gram.diagonal().mean())
    c = cross.to(device, torch.float32, copy=True)
    c.diagonal().add_(lam)
    w = weight.detach().to(torch.float32)
    chol = torch.linalg.cholesky(h)
    return torch.cholesky_solve(c.t() @ w.t(), chol).t().contiguous()
