"""Consensus merging with TALL masks (Wang et al. 2024, *Localizing Task Information for Improved Model
Merging and Compression*, Eq. 3-4), applied to task arithmetic ("Consensus TA").

    τ_MTL = Σ_j τ_j                                         (the unscaled task-arithmetic vector)
    m_i   = |τ_i| ≥ λ_t · |τ_MTL − τ_i|                     (TALL mask of task i, elementwise)
    keep  = Σ_i m_i ≥ k                                     (entries that matter to at least k tasks)
    θ     = θ0 + λ · (keep ⊙ τ_MTL)

Defaults [k = 2, λ_t = 0.6, λ = 0.3]: k = 2 is the paper's consensus threshold (removes "selfish" entries
used by one task only as well as "catastrophic" ones used by none); λ_t = 0.6 is FusionBench's TALL-mask
default (the paper picks λ_t per task on validation data from {0.2, ..., 0.6}; a data-free method cannot);
λ = 0.3 is task arithmetic's. k = 0 reduces to task arithmetic, k > K to the pretrained model.

The mask uses ≥ as written in the method facts; the reference code uses > — they differ only where the two
sides are exactly equal (e.g. τ_i = 0 while the other tasks' entries cancel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_range
from bench.task_vectors import PlainTaskVectors, check_experts, merge_blockwise


@dataclass(frozen=True)
class ConsensusParams:
    k: int = param(2, "keep entries whose TALL masks agree for at least k tasks", low=0)
    tall_lambda: float = param(0.6, "λ_t in the TALL mask |τ_i| ≥ λ_t·|τ_MTL − τ_i|", low=0.0)
    scaling: float = param(0.3, "λ in θ0 + λ · (mask ⊙ Σ τ_i)")

    def __post_init__(self) -> None:
        require_range("consensus_ta", "k", self.k, 0, None)
        require_range("consensus_ta", "tall_lambda", self.tall_lambda, 0.0, None)


def tall_masks(tau: Tensor, tall_lambda: float, multi_task: Tensor | None = None) -> Tensor:
    """For a ``[K, n]`` block of task vectors: the ``[K, n]`` TALL masks m_i = |τ_i| ≥ λ_t·|τ_MTL − τ_i|
    (``multi_task``: τ_MTL = Σ_i τ_i when already computed)."""
    multi_task = tau.sum(dim=0) if multi_task is None else multi_task
    distance = (multi_task - tau).abs_().mul_(tall_lambda)  # λ_t |τ_MTL − τ_i|
    return tau.abs() >= distance


def consensus_mask(tau: Tensor, *, k: int, tall_lambda: float) -> Tensor:
    """For a ``[K, n]`` block of task vectors: ``[n]`` bool, True where at least k TALL masks are on."""
    return tall_masks(tau, tall_lambda).sum(dim=0) >= k


def consensus_merge(
    base: StateDict, experts: Sequence[StateDict], *, k: int, tall_lambda: float, scaling: float
) -> StateDict:
    """θ0 + scaling · (consensus mask ⊙ Σ_i τ_i)."""
    check_experts(base, experts)

    def combine(tau: Tensor) -> Tensor:
        keep = consensus_mask(tau, k=k, tall_lambda=tall_lambda)
        return tau.sum(dim=0).mul_(keep)

    return merge_blockwise(PlainTaskVectors(base, experts), combine, scaling=scaling)


@register_method(
    "consensus_ta",
    family="data-free",
    params=ConsensusParams,
    description="Task arithmetic restricted to entries that TALL masks mark as used by ≥ k tasks",
)
def merge(ctx: MergeContext, p: ConsensusParams) -> StateDict:
    return consensus_merge(
        ctx.pretrained(), ctx.experts(), k=p.k, tall_lambda=p.tall_lambda, scaling=p.scaling
    )
