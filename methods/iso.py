"""Isotropic merging (Marczak et al. 2025, *No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces*): Iso-C (Sec. 4.1) and Iso-CTS (Sec. 4.2).

For every matrix parameter (:func:`bench.task_vectors.is_matrix_param`), with M = Σ_i τ_i = U S Vᵀ and
r = min(rows, cols):

- Iso-C: Δ = mean(S) · U Vᵀ — the task-arithmetic matrix with a flat (isotropic) spectrum.
- Iso-CTS: the common subspace is the top-c singular directions of M, c = r − s·K, where
  s = round((r − ⌊r·f⌋) / K) directions per task (Python's round, as the reference; f =
  ``common_space_fraction``; s is capped at ⌊r/K⌋ so c ≥ 0). Each task then contributes the top-s singular
  directions of its update with the common part projected out, τ_i − U_c U_cᵀ τ_i. The r directions
  [task 1 … task K, common] are stacked (U' columns, V' rows) and decorrelated with the polar factor P, and
  Δ = mean(σ') · P(U') P(V'ᵀ), σ' the r singular values collected with them.

Every other floating-point parameter gets the mean task vector (1/K) Σ_i τ_i (the reference code's rule).
θ = θ0 + α Δ  [α = 1.0 default; the published CLIP rows use α = 1.5; f = 0.8].
SVDs run on ``device`` in fp32 (fp64 stays fp64); the result is in the base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_range
from bench.task_vectors import task_vector
from bench.tensorwise import merge_tensorwise
from methods.tsv import polar_factor, spectral_merge


@dataclass(frozen=True)
class IsoCParams:
    alpha: float = param(1.0, "α in θ0 + α Δ (1.5 for the published CLIP rows)")


@dataclass(frozen=True)
class IsoCtsParams:
    alpha: float = param(1.0, "α in θ0 + α Δ (1.5 for the published CLIP rows)")
    common_space_fraction: float = param(
        0.8, "share of each layer's rank given to the common subspace", low=0.0, high=1.0
    )

    def __post_init__(self) -> None:
        require_range("iso_cts", "common_space_fraction", self.common_space_fraction, 0.0, 1.0)


def isotropic(matrix: Tensor) -> Tensor:
    """``matrix`` with all its singular values replaced by their mean: mean(S) · U Vᵀ."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u * s.mean()) @ vh


def summed_task_vector(
    base_tensor: Tensor, expert_tensors: Sequence[Tensor], device: torch.device | str
) -> Tensor:
    total = task_vector(base_tensor, expert_tensors[0], device)
    for expert_tensor in expert_tensors[1:]:
        total += task_vector(base_tensor, expert_tensor, device)
    return total


def iso_c_matrix(base_tensor: Tensor, expert_tensors: Sequence[Tensor], device: torch.device | str) -> Tensor:
    """Iso-C's Δ for one matrix parameter: Σ τ_i with its singular values replaced by their mean."""
    return isotropic(summed_task_vector(base_tensor, expert_tensors, device))


def subspace_sizes(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions c, directions per task s) with c + s·tasks = rank."""
    per_task = round((rank - int(rank * common_space_fraction)) / tasks)
    per_task = min(per_task, rank // tasks)
    return rank - per_task * tasks, per_task


def iso_cts_matrix(
    base_tensor: Tensor,
    expert_tensors: Sequence[Tensor],
    device: torch.device | str,
    common_space_fraction: float,
) -> Tensor:
    """Iso-CTS's Δ for one matrix parameter (see the module docstring)."""
    rows, cols = base_tensor.shape
    rank, tasks = min(rows, cols), len(expert_tensors)
    common, per_task = subspace_sizes(rank, tasks, common_space_fraction)
    u, s, vh = torch.linalg.svd(summed_task_vector(base_tensor, expert_tensors, device), full_matrices=False)
    u_common = u[:, :common]
    u_all, s_all, vh_all = u.new_zeros(rows, rank), s.new_zeros(rank), vh.new_zeros(rank, cols)
    for index, expert_tensor in enumerate(expert_tensors if per_task else []):
        tau = task_vector(base_tensor, expert_tensor, device)
        task_specific = tau - u_common @ (u_common.T @ tau)
        u_task, s_task, vh_task = torch.linalg.svd(task_specific, full_matrices=False)
        slot = slice(index * per_task, (index + 1) * per_task)
        u_all[:, slot], s_all[slot], vh_all[slot, :] = (
            u_task[:, :per_task],
            s_task[:per_task],
            vh_task[:per_task],
        )
    shared = slice(tasks * per_task, rank)
    u_all[:, shared], s_all[shared], vh_all[shared, :] = u_common, s[:common], vh[:common]
    return (polar_factor(u_all) * s_all.mean()) @ polar_factor(vh_all)


def iso_c_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    alpha: float,
    device: torch.device | str = "cpu",
    vector_params: Sequence[str] = (),
) -> StateDict:
    return merge_tensorwise(base, experts, spectral_merge(
        lambda base_tensor, expert_tensors: iso_c_matrix(base_tensor, expert_tensors, device), alpha, device,
        vector_params))


def iso_cts_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    alpha: float,
    common_space_fraction: float,
    device: torch.device | str = "cpu",
    vector_params: Sequence[str] = (),
) -> StateDict:
    return merge_tensorwise(base, experts, spectral_merge(
        lambda base_tensor, expert_tensors: iso_cts_matrix(base_tensor, expert_tensors, device,
                                                           common_space_fraction), alpha, device, vector_params))


@register_method(
    "iso_c",
    family="data-free",
    params=IsoCParams,
    description="Task arithmetic with each layer's spectrum flattened to its mean (Marczak et al. 2025)",
)
def merge_iso_c(ctx: MergeContext, p: IsoCParams) -> StateDict:
    return iso_c_merge(ctx.pretrained(), ctx.experts(), alpha=p.alpha, device=ctx.device,
                       vector_params=ctx.problem.vector_params)


@register_method(
    "iso_cts",
    family="data-free",
    params=IsoCtsParams,
    description="Iso-C plus task-specific subspaces for each expert (Marczak et al. 2025)",
)
def merge_iso_cts(ctx: MergeContext, p: IsoCtsParams) -> StateDict:
    return iso_cts_merge(
        ctx.pretrained(),
        ctx.experts(),
        alpha=p.alpha,
        common_space_fraction=p.common_space_fraction,
        device=ctx.device,
        vector_params=ctx.problem.vector_params,
    )
