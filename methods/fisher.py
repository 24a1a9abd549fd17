"""Fisher merging (Matena & Raffel, NeurIPS 2022), "Merging Models with Fisher-Weighted Averaging", Eq. 2-3.

Each expert's diagonal Fisher information, estimated on n examples of its own task with labels sampled from
the expert's own predictive distribution (the "empirical" Fisher would use true labels; the reference does not):

    F_i = (1/n) Σ_x (∂ log p(ŷ | x; θ_i) / ∂θ_i)²,    ŷ ~ p(· | x; θ_i)

and the merge is the per-parameter Fisher-weighted average, with a floor so that parameters no expert's Fisher
touches do not divide 0 by 0:

    θ = Σ_i F̃_i ⊙ θ_i / Σ_i F̃_i,    F̃_i = max(F_i, floor)     [n = 256, floor = 1e-6]

Examples come from each task's training split (labels unused), as in the reference implementations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.adaptation import per_expert_statistics
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method


@dataclass(frozen=True)
class FisherParams:
    num_samples: int = param(256, "examples per task for each expert's Fisher estimate", low=1)
    floor: float = param(1e-6, "lower bound applied to every Fisher entry", low=0.0)


def fisher_weighted_average(experts: Sequence[StateDict], fishers: Sequence[StateDict], floor: float) -> StateDict:
    """θ = Σ F̃_i θ_i / Σ F̃_i with F̃_i = max(F_i, floor), per parameter entry."""
    merged = {}
    for key in experts[0]:
        numerator = torch.zeros_like(experts[0][key], dtype=torch.float64)
        denominator = torch.zeros_like(numerator)
        for expert, fisher in zip(experts, fishers, strict=True):
            weight = fisher[key].double().clamp(min=floor)
            numerator += weight * expert[key].double()
            denominator += weight
        merged[key] = (numerator / denominator).to(experts[0][key].dtype)
    return merged


def diagonal_fisher(
    log_probs_fn: Callable[[StateDict, Tensor], Tensor],
    params: StateDict,
    inputs: Tensor,
    generator: torch.Generator,
) -> StateDict:
    """(1/n) Σ_x (∇_θ log p(ŷ|x))², ŷ sampled from p(·|x; θ); ``log_probs_fn`` maps (params, [1, ...]) -> [1, C]."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    totals = {k: torch.zeros_like(v) for k, v in leaves.items()}
    for example in inputs:
        log_probs = log_probs_fn(leaves, example.unsqueeze(0))[0]
        label = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).item()
        grads = torch.autograd.grad(log_probs[label], list(leaves.values()), allow_unused=True)
        for key, grad in zip(leaves, grads, strict=True):
            if grad is not None:
                totals[key] += grad.detach() ** 2
    return {k: v / len(inputs) for k, v in totals.items()}


@register_method("fisher", family="data-using", params=FisherParams, data="labeled",
                 budget=lambda p: p.num_samples, memory="stacked",
                 needs=("class_logits", "labeled_data"),
                 description="Fisher-weighted averaging with each expert's diagonal Fisher (sampled labels)")
def merge(ctx: MergeContext, p: FisherParams) -> StateDict:
    problem = ctx.problem

    def fisher(expert: StateDict, task: str, inputs: Tensor) -> StateDict:
        def log_probs(params: StateDict, batch: Tensor) -> Tensor:
            return torch.log_softmax(problem.logits(params, task, batch).float(), dim=-1)

        return diagonal_fisher(log_probs, expert, inputs, ctx.generator)

    fishers = per_expert_statistics(ctx, p.num_samples, fisher)
    ctx.note_held("fisher_diagonals", fishers)
    return fisher_weighted_average(ctx.experts(), fishers, p.floor)
