"""DOGE, task-arithmetic form (Wei et al. 2025, *Modeling Multi-Task Model Merging as Adaptive Projective
Gradient Descent*, arXiv 2501.01230), as FusionBench's ``method/doge_ta/doge_ta.py`` computes it (its docs
misstate the loss and the mask; this follows the code, methods-wave2.md "DOGE").

For every merged matrix W (layer l) with the N task vectors τ_i = θ_i − θ0 of shape [rows, cols]:

    1. λ_i = lamda / ‖τ_i‖_F                                                         [lamda = 0.07]
    2. shared subspace: s = min(rows, cols), c = ⌊s/N⌋; Ū = [U_1[:, :c] … U_N[:, :c] 0] ∈ ℝ^{rows×s} with U_i
       the left singular vectors of τ_i; U_k = the top k = ⌊s/subspace⌋ left singular vectors of Ū
                                                                                       [subspace = 6]
    3. δ ∈ ℝ^{rows×cols}, one per layer, shared by the tasks, from 0: with S = Σ_i λ_i τ_i and Λ = Σ_i λ_i,
           L(δ) = Σ_j Σ_r ⟨τ_j[r], τ_j[r] − S[r] − Λ δ[r]⟩²        (r runs over rows, ⟨·,·⟩ over columns)
       minimised by Adam (lr 1e−4, betas (0.9, 0.999), eps 1e−8; 400 steps), one layer at a time, each step's
       gradient g = ∂L/∂δ = −2Λ Σ_j e_j ⊙_rows τ_j (e_j[r] the inner product above) replaced by g − U_k U_kᵀ g
    4. mask_i = |τ_i| ≥ t_i with t_i the (⌊D·k/100⌋ + 1)-th largest |τ_i| over all D merged entries of the model
       (global per task; on τ_i, not τ_i + δ)                                        [k = 30]
    5. W = W0 + Σ_i λ_i (τ_i + δ) ⊙ mask_i

Defaults are FusionBench's config (subspace 6, K 30, lamda 0.07; lr 1e−4 and 400 steps are hard-coded there).

Deliberate differences from the reference:
- Which tensors are merged. FusionBench merges the keys containing "encoder" and "weight" but not "layer_norm"
  (the 6 linear weights × 12 blocks of HF CLIP); every other tensor (biases, LayerNorms, embeddings) stays at θ0.
  Key names differ between suites (open_clip-style ViT in tiny8 with a fused ``in_proj_weight``, GPT-2 in tinylm),
  so here the merged tensors are the matrix parameters (:func:`bench.task_vectors.is_matrix_param`: 2-D, not
  ``*text_projection*``), and every other tensor stays at θ0 as in the reference. This includes 2-D embeddings
  and projections the reference would leave alone (positional embeddings, ``proj``; GPT-2's ``wte``/``wpe``), and
  a fused q/k/v matrix gets one subspace and one δ where HF CLIP has three. Matrices are used as stored:
  nn.Linear is [out, in] like the reference; GPT-2's Conv1D and CLIP's ``proj`` are [in, out], so there the
  rows (the loss's inner products and the projected subspace) are the input side.
- The mask keeps entries ≥ the (⌊D·k/100⌋ + 1)-th largest |τ_i|, which is exactly the reference's
  ``kthvalue(D − int(D·K))`` (so one more entry than ⌊D·k/100⌋ survives, plus ties), with the same float
  expression ``int(D * (k / 100))``; k = 100 keeps everything (the reference fails) and k is always a percent
  (the reference reads K ≤ 1 as a fraction). The threshold is exact from :func:`bench.selection.kth_largest_rows`
  over the merged matrices, read block by block in a first pass (no flattening).
- A zero task vector of a layer (‖τ_i‖_F = 0) gets λ_i = 0 (the reference divides by zero and yields NaN).
- c = 0 (N > s) or k = 0 leaves nothing to project out (U_k empty). P = U_k U_kᵀ is never formed: g − U_k(U_kᵀ g).
  With one expert Ū has orthonormal columns, all its singular values are 1 and which k of them are "top" is up
  to the SVD routine (the same ambiguity as the reference).
- The gradient is the closed form above (autograd in the reference; equal up to rounding), and Adam is written
  out with torch.optim.Adam's arithmetic (bit-identical to it; avoids importing torch._dynamo, seconds).
The merge reads one key at a time (``merge_tensorwise``); arithmetic is fp32 (fp64 stays fp64); the result is
written in the base's dtype; integer buffers are copied from the base. Nothing is random.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench.buffers import Scratch
from bench.model_pool import shape_of
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_range
from bench.selection import kth_largest_rows
from bench.task_vectors import (
    PlainTaskVectors,
    TaskVectorMagnitudes,
    check_experts,
    is_matrix_param,
    mergeable_keys,
)
from bench.tensorwise import TensorInputs, merge_tensorwise

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class DogeTaParams:
    subspace: int = param(6, "the shared subspace keeps ⌊min(rows, cols)/subspace⌋ directions", low=1)
    k: float = param(30.0, "percent of each task vector's entries kept (top |τ_i| over all merged matrices)",
                     low=0.0, high=100.0)
    lamda: float = param(0.07, "λ_i = lamda / ‖τ_i‖_F per layer", low=0.0)
    lr: float = param(1e-4, "Adam learning rate for δ", low=0.0)
    steps: int = param(400, "Adam steps per layer", low=0)

    def __post_init__(self) -> None:
        require_range("doge_ta", "subspace", self.subspace, 1, None)
        require_range("doge_ta", "k", self.k, 0.0, 100.0)
        require_range("doge_ta", "lamda", self.lamda, 0.0, None)
        require_range("doge_ta", "lr", self.lr, 0.0, None)
        require_range("doge_ta", "steps", self.steps, 0, None)


# ------------------------------------------------------------------------------------------------------------
# The math on one layer (pure functions over the stacked task vectors τ [N, rows, cols])


def doge_lambdas(taus: Tensor, lamda: float) -> Tensor:
    """λ_i = lamda / ‖τ_i‖_F, 0 for a zero τ_i: ``[N]``."""
    norms = torch.linalg.vector_norm(taus.flatten(1), dim=1)
    return torch.where(norms > 0, lamda / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)


def shared_subspace(taus: Tensor, subspace: int) -> Tensor:
    """U_k ``[rows, k]``: the top k = ⌊s/subspace⌋ left singular vectors of Ū (step 2); ``[rows, 0]`` when there
    is nothing to project."""
    count, rows, cols = taus.shape
    s = min(rows, cols)
    per_task, k = s // count, s // subspace
    if per_task == 0 or k == 0:
        return taus.new_zeros(rows, 0)
    u = torch.linalg.svd(taus, full_matrices=False).U  # [N, rows, s]
    stacked = taus.new_zeros(rows, s)
    for i in range(count):
        stacked[:, i * per_task : (i + 1) * per_task] = u[i, :, :per_task]
    return torch.linalg.svd(stacked, full_matrices=False).U[:, :k]


def project_out(gradient: Tensor, basis: Tensor) -> Tensor:
    """g − U_k U_kᵀ g: the gradient without its component in the shared subspace."""
    return gradient - basis @ (basis.T @ gradient)


def doge_gradient(taus: Tensor, lambdas: Tensor, delta: Tensor) -> Tensor:
    """∂L/∂δ for L(δ) = Σ_j Σ_r ⟨τ_j[r], τ_j[r] − S[r] − Λ δ[r]⟩² (step 3)."""
    total = lambdas.sum()
    merged = torch.einsum("k,krc->rc", lambdas, taus)  # S
    inner = (taus * (taus - merged - total * delta)).sum(dim=-1)  # e_j[r], [N, rows]
    return torch.einsum("kr,krc->rc", inner, taus).mul_(-2 * total)


def doge_loss(taus: Tensor, lambdas: Tensor, delta: Tensor) -> Tensor:
    """L(δ) (step 3), for checks."""
    merged = torch.einsum("k,krc->rc", lambdas, taus)
    return (taus * (taus - merged - lambdas.sum() * delta)).sum(dim=-1).square().sum()


def optimise_delta(taus: Tensor, lambdas: Tensor, basis: Tensor, *, lr: float, steps: int) -> Tensor:
    """δ after ``steps`` Adam steps from 0 on L with projected gradients (step 3).

    Adam with torch.optim.Adam's defaults and arithmetic (betas (0.9, 0.999), eps 1e−8, no weight decay):
    m ← m + (1 − β1)(g − m), v ← β2 v + (1 − β2) g², δ ← δ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps).
    Written out because the first ``torch.optim`` optimiser of a process imports torch._dynamo (seconds).
    """
    delta = torch.zeros_like(taus[0])
    first, second = torch.zeros_like(delta), torch.zeros_like(delta)
    for step in range(1, steps + 1):
        gradient = project_out(doge_gradient(taus, lambdas, delta), basis)
        first.lerp_(gradient, 1 - ADAM_BETAS[0])
        second.mul_(ADAM_BETAS[1]).addcmul_(gradient, gradient, value=1 - ADAM_BETAS[1])
        step_size = lr / (1 - ADAM_BETAS[0] ** step)
        denominator = second.sqrt().div_(math.sqrt(1 - ADAM_BETAS[1] ** step)).add_(ADAM_EPS)
        delta.addcdiv_(first, denominator, value=-step_size)
    return delta


def doge_layer(taus: Tensor, thresholds: Tensor, *, subspace: int, lamda: float, lr: float, steps: int) -> Tensor:
    """Σ_i λ_i (τ_i + δ) ⊙ mask_i for one layer; ``thresholds`` ``[N]`` are the global t_i (step 4)."""
    lambdas = doge_lambdas(taus, lamda)
    delta = optimise_delta(taus, lambdas, shared_subspace(taus, subspace), lr=lr, steps=steps)
    masks = taus.abs() >= thresholds.view(-1, 1, 1)
    return (((taus + delta) * masks) * lambdas.view(-1, 1, 1)).sum(dim=0)


# ------------------------------------------------------------------------------------------------------------
# Driver


def merged_keys(base: StateDict, vector_params: Sequence[str] = ()) -> list[str]:
    """The keys DOGE merges (matrix parameters, sorted); the other tensors stay at θ0."""
    return [key for key in mergeable_keys(base)
            if is_matrix_param(key, torch.empty(shape_of(base, key), device="meta"), vector_params)]


def mask_rank(total: int, k: float) -> int:
    """Rank (1 = largest) of the global mask threshold among ``total`` entries: ``int(total·(k/100)) + 1``, as the
    reference's ``kthvalue(total − int(total·K))``, capped at ``total``."""
    return min(int(total * (k / 100)) + 1, total)


def _merge_key(inputs: TensorInputs, *, merged: set[str], thresholds: Tensor, subspace: int, lamda: float,
               lr: float, steps: int) -> Tensor:
    if inputs.key not in merged:
        return inputs.base
    taus = torch.stack(inputs.task_vectors)
    layer = doge_layer(taus, thresholds.to(taus.dtype), subspace=subspace, lamda=lamda, lr=lr, steps=steps)
    return inputs.base + layer


def doge_ta_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    subspace: int = 6,
    k: float = 30.0,
    lamda: float = 0.07,
    lr: float = 1e-4,
    steps: int = 400,
    generator: torch.Generator | None = None,
    notes: dict | None = None,
    vector_params: Sequence[str] = (),
) -> StateDict:
    """θ0 + DOGE-TA on the matrix parameters, θ0 elsewhere (module docstring)."""
    check_experts(base, experts)
    DogeTaParams(subspace=subspace, k=k, lamda=lamda, lr=lr, steps=steps)  # the registry's one-line errors
    keys = merged_keys(base, vector_params)
    total = sum(shape_of(base, key).numel() for key in keys)
    thresholds = torch.zeros(len(experts), dtype=torch.float64)
    if total > 0:
        magnitudes = TaskVectorMagnitudes(PlainTaskVectors(base, experts), keys, Scratch())
        thresholds = torch.tensor(kth_largest_rows(magnitudes, [mask_rank(total, k)] * len(experts)),
                                  dtype=torch.float64)
    if notes is not None:
        notes.update({"doge_merged_keys": len(keys), "doge_mask_thresholds": thresholds.tolist()})
    fn = partial(_merge_key, merged=set(keys), thresholds=thresholds, subspace=subspace, lamda=lamda, lr=lr,
                 steps=steps)
    return merge_tensorwise(base, experts, fn, generator=generator)


@register_method(
    "doge_ta",
    family="data-free",
    params=DogeTaParams,
    description="DOGE: learn a shared correction δ per layer by projected Adam, mask top-k% (Wei et al. 2025)",
)
def merge(ctx: MergeContext, p: DogeTaParams) -> StateDict:
    return doge_ta_merge(ctx.pretrained(), ctx.experts(), subspace=p.subspace, k=p.k, lamda=p.lamda, lr=p.lr,
                         steps=p.steps, generator=ctx.generator, notes=ctx.notes,
                         vector_params=ctx.problem.vector_params)
