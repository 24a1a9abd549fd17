"""RegMean (Jin et al., ICLR 2023), "Dataless Knowledge Fusion by Merging Weights of Language Models", Eq. 6.

For every linear layer y = x Wᵀ + b, with X_i the layer's inputs in expert i on n examples of task i:

    G_i = X_iᵀ X_i                                  (Gram matrix, [in, in])
    G̃_i = α G_i + (1 − α) diag(G_i)                  (off-diagonals shrunk by α; the diagonal is kept)
    Wᵀ  = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ

the closed-form minimiser of Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² (α = 1) regularised towards the diagonal. Every other
parameter (biases, norms, embeddings) is the plain average of the experts. [n = 256, α = 0.95 as FusionBench;
another published config uses 0.6]. Examples come from each task's training split (labels unused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.adaptation import per_expert_statistics
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method


@dataclass(frozen=True)
class RegMeanParams:
    num_samples: int = param(256, "examples per task for the Gram matrices", low=1)
    alpha: float = param(0.95, "off-diagonal scaling α of each Gram matrix (1: plain RegMean)", low=0.0, high=1.0)


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """α G + (1 − α) diag(G)."""
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_merge(experts: Sequence[StateDict], grams: Sequence[Mapping[str, Tensor]], alpha: float) -> StateDict:
    """Closed-form RegMean for the keys that have Gram matrices, the mean of the experts elsewhere."""
    merged = {}
    for key in experts[0]:
        weights = [expert[key] for expert in experts]
        if key not in grams[0]:
            merged[key] = torch.stack(weights).mean(dim=0)
            continue
        shrunk = [shrink_off_diagonal(g[key].double(), alpha) for g in grams]
        lhs = torch.stack(shrunk).sum(dim=0)
        rhs = sum(g @ w.double().T for g, w in zip(shrunk, weights, strict=True))
        try:
            solution = torch.linalg.solve(lhs, rhs)
        except torch.linalg.LinAlgError:  # singular: an input feature no task ever activates
            solution = torch.linalg.lstsq(lhs, rhs).solution
        merged[key] = solution.T.to(weights[0].dtype).contiguous()
    return merged


def gram_matrices(inputs_per_key: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key: x.double().T @ x.double() for key, x in inputs_per_key.items()}


@register_method("regmean", family="data-using", params=RegMeanParams, data="labeled",
                 budget=lambda p: p.num_samples, memory="stacked",
                 needs=("linear_inputs", "labeled_data"),
                 description="RegMean: closed-form least-squares merge of linear layers from input Gram matrices")
def merge(ctx: MergeContext, p: RegMeanParams) -> StateDict:
    return regmean_merge(ctx.experts(), expert_grams(ctx, p.num_samples), p.alpha)


def expert_grams(ctx: MergeContext, num_samples: int) -> list[dict[str, Tensor]]:
    """Every expert's Gram matrices of its linear layers' inputs on ``num_samples`` of its task (held bytes noted)."""
    def grams(expert: StateDict, task: str, inputs: Tensor) -> StateDict:
        with torch.no_grad():
            return gram_matrices(ctx.problem.linear_inputs(expert, task, inputs))

    statistics = per_expert_statistics(ctx, num_samples, grams)
    ctx.note_held("gram_matrices", statistics)
    return statistics
