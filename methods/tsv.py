"""TSV-M: Task Singular Vectors merging (Gargiulo et al. 2025, *Task Singular Vectors: Reducing Task
Interference in Model Merging*, Sec. 4 / Eq. 8-10).

For every matrix parameter (:func:`bench.task_vectors.is_matrix_param`: 2-D, not one the suite names as a
vector, e.g. CLIP's ``*text_projection*``), with
r = min(rows, cols) and c = ⌊r / K⌋:

    τ_i = U_i S_i V_iᵀ                       (thin SVD of each task's update)
    U = [U_1[:, :c] … U_K[:, :c] 0],  S = diag(S_1[:c] … S_K[:c] 0),  V = [V_1[:, :c] … V_K[:, :c] 0]
    Δ = P(U) S P(V)ᵀ                         P(X) = polar factor X̂ Ŷᵀ of X = X̂ Σ Ŷᵀ (decorrelates the blocks)

i.e. each task keeps its top 1/K singular components; slots left over when K does not divide r stay zero, and
K > r keeps nothing. Every other floating-point parameter gets the mean task vector (1/K) Σ_i τ_i, as the
reference code does (the method facts call this "TA"; the reference's task-arithmetic step here is the
running mean, not the sum). Then θ = θ0 + α Δ  [α = 1.0].

(The reference computes c as int(r · (1/K)), which can round down below ⌊r/K⌋ for some r, K; ⌊r/K⌋ is meant.)
SVDs run on ``device`` (the run's device) in fp32 (fp64 stays fp64); the result is in the base's dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method
from bench.task_vectors import is_matrix_param, mean_task_vector, task_vector
from bench.tensorwise import TensorInputs, merge_tensorwise


@dataclass(frozen=True)
class TsvParams:
    alpha: float = param(1.0, "α in θ0 + α Δ")


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal factor U Vᵀ of ``matrix = U S Vᵀ`` (thin SVD): the nearest matrix with orthonormal
    columns (or rows), used to decorrelate concatenated singular vectors."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def spectral_merge(
    matrix_delta: Callable[[Tensor, Sequence[Tensor]], Tensor],
    scaling: float,
    device: torch.device | str,
    vector_params: Sequence[str],
) -> Callable[[TensorInputs], Tensor]:
    """The per-tensor function of TSV-M and Iso-C/CTS: θ = θ0 + scaling · Δ, with Δ = ``matrix_delta(θ0, θ_i's)``
    (on ``device``) for matrix parameters (:func:`bench.task_vectors.is_matrix_param`) and mean_i τ_i for every
    other floating-point tensor (the reference code's rule)."""

    def merge_tensor(inputs: TensorInputs) -> Tensor:
        if is_matrix_param(inputs.key, inputs.base, vector_params):
            delta = matrix_delta(inputs.base, inputs.experts).to(device="cpu")
        else:
            delta = mean_task_vector(inputs.base, inputs.experts)
        return inputs.base + scaling * delta

    return merge_tensor


def tsv_matrix(base_tensor: Tensor, expert_tensors: Sequence[Tensor], device: torch.device | str) -> Tensor:
    """Δ for one matrix parameter (see the module docstring)."""
    rows, cols = base_tensor.shape
    rank = min(rows, cols)
    per_task = rank // len(expert_tensors)
    first = task_vector(base_tensor, expert_tensors[0], device)
    u_all = first.new_zeros(rows, rank)
    s_all = first.new_zeros(rank)
    vh_all = first.new_zeros(rank, cols)
    for index, expert_tensor in enumerate(expert_tensors):
        tau = first if index == 0 else task_vector(base_tensor, expert_tensor, device)
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        slot = slice(index * per_task, (index + 1) * per_task)
        u_all[:, slot], s_all[slot], vh_all[slot, :] = u[:, :per_task], s[:per_task], vh[:per_task, :]
    return (polar_factor(u_all) * s_all) @ polar_factor(vh_all)


def tsv_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    alpha: float,
    device: torch.device | str = "cpu",
    vector_params: Sequence[str] = (),
) -> StateDict:
    """θ0 + α Δ with Δ from :func:`tsv_matrix` on matrices and the mean task vector elsewhere."""
    return merge_tensorwise(base, experts, spectral_merge(
        lambda base_tensor, expert_tensors: tsv_matrix(base_tensor, expert_tensors, device), alpha, device,
        vector_params))


@register_method(
    "tsv_m",
    family="data-free",
    params=TsvParams,
    description="Top 1/K singular components of each task, decorrelated and summed (Gargiulo et al. 2025)",
)
def merge(ctx: MergeContext, p: TsvParams) -> StateDict:
    return tsv_merge(ctx.pretrained(), ctx.experts(), alpha=p.alpha, device=ctx.device,
                     vector_params=ctx.problem.vector_params)
