"""MaTS (Tam et al., TMLR 2024), "Merging by Matching Models in Task Parameter Subspaces", arXiv 2312.04339;
reference: repo r-three/mats, ``src/merging/conjugateGradient_fisherMerging.py`` (``cg_forward``).

The RegMean objective, solved iteratively instead of in closed form. For every linear layer y = x Wᵀ + b, with
X_i its inputs in expert i on n examples of task i, G_i = X_iᵀ X_i and G̃_i = α G_i + (1 − α) diag(G_i), the
merged V = Wᵀ ([in, out]) solves

    A V = B,   A = Σ_i G̃_i,   B = Σ_i G̃_i W_iᵀ

by conjugate gradient on the flattened system (the operator V ↦ A V on all in·out entries at once, so one step
size per iteration for the whole matrix, as the reference's scipy ``cg`` on a ``LinearOperator``), started from the
task-arithmetic merge V₀ = (θ0 + λ Σ_i τ_i)ᵀ with λ = 0.3, for at most 100 iterations, stopping early when
‖B − A V‖_F ≤ 1e-5 ‖B‖_F (scipy's default relative tolerance). Directions in the null space of A (input features
no task activates) keep their task-arithmetic value. Every other parameter is the mean of the experts.
[α = 1 (``model_lambda``), 100 iterations, TA(0.3) start: the reference; n = 256 as RegMean here.]

Only the RegMean ("forward") objective is implemented. The reference's Fisher objective (``--use_backward``:
Σ_i G_i V B_i = Σ_i G_i W_iᵀ B_i, with B_i the Gram of each layer's output gradients under true labels) needs the
gradients at every linear layer's output, which no suite exposes.

Deliberate differences from the reference: the examples come from each task's training split (labels unused), as
RegMean's do here, not its validation split; CG runs in float64 with torch (the reference: float32 products inside
scipy's float64 loop), with the same iteration count and tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method
from methods.regmean import expert_grams, shrink_off_diagonal


@dataclass(frozen=True)
class MatsParams:
    num_samples: int = param(256, "examples per task for the Gram matrices", low=1)
    alpha: float = param(1.0, "off-diagonal scaling α of each Gram matrix (the reference's model_lambda)",
                         low=0.0, high=1.0)
    iterations: int = param(100, "conjugate-gradient iterations per linear layer (at most)", low=0)
    init_scale: float = param(0.3, "λ of the task-arithmetic merge θ0 + λ Σ τ_i that CG starts from", low=0.0)
    tolerance: float = param(1e-5, "stop when ‖B − A V‖ ≤ tolerance · ‖B‖", low=0.0)


def conjugate_gradient(
    lhs: Tensor, rhs: Tensor, start: Tensor, iterations: int, tolerance: float
) -> tuple[Tensor, int]:
    """Solve ``lhs @ V = rhs`` (lhs symmetric positive semi-definite [d, d], V and rhs [d, m]) by CG on the flattened
    d·m system with Frobenius inner products, from ``start``; returns V and the iterations run."""
    solution = start.clone()
    residual = rhs - lhs @ solution
    direction = residual.clone()
    squared = (residual * residual).sum()
    target = (tolerance * torch.linalg.norm(rhs)) ** 2
    for step in range(iterations):
        if squared <= target:
            return solution, step
        product = lhs @ direction
        curvature = (direction * product).sum()
        if curvature <= 0:  # the residual lies in A's null space: nothing more to fit
            return solution, step
        step_size = squared / curvature
        solution += step_size * direction
        residual -= step_size * product
        new_squared = (residual * residual).sum()
        direction = residual + (new_squared / squared) * direction
        squared = new_squared
    return solution, iterations


def mats_merge(
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    grams: Sequence[Mapping[str, Tensor]],
    p: MatsParams,
) -> tuple[StateDict, dict[str, int]]:
    """CG on the RegMean system for the keys with Gram matrices, from TA(``p.init_scale``); the mean elsewhere.
    Also returns the iterations CG ran per key."""
    merged, steps = {}, {}
    for key in experts[0]:
        weights = [expert[key] for expert in experts]
        if key not in grams[0]:
            merged[key] = torch.stack(weights).mean(dim=0)
            continue
        shrunk = [shrink_off_diagonal(g[key].double(), p.alpha) for g in grams]
        lhs = torch.stack(shrunk).sum(dim=0)
        rhs = sum(g @ w.double().T for g, w in zip(shrunk, weights, strict=True))
        theta0 = base[key].double()
        start = (theta0 + p.init_scale * sum(w.double() - theta0 for w in weights)).T
        solution, steps[key] = conjugate_gradient(lhs, rhs, start, p.iterations, p.tolerance)
        merged[key] = solution.T.to(weights[0].dtype).contiguous()
    return merged, steps


@register_method("mats", family="data-using", params=MatsParams, data="labeled",
                 budget=lambda p: p.num_samples, memory="stacked",
                 needs=("linear_inputs", "labeled_data"),
                 description="MaTS: the RegMean objective solved by conjugate gradient from the task-arithmetic merge")
def merge(ctx: MergeContext, p: MatsParams) -> StateDict:
    merged, steps = mats_merge(ctx.pretrained(), ctx.experts(), expert_grams(ctx, p.num_samples), p)
    ctx.notes["cg_iterations"] = {"max": max(steps.values(), default=0), "mean": (
        sum(steps.values()) / len(steps) if steps else 0.0)}
    return merged
