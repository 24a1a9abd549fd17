"""TIES-Merging (Yadav et al. 2023, *TIES-Merging: Resolving Interference When Merging Models*, Sec. 3 /
Algorithm 1): trim, elect sign, disjoint merge.

    1. trim: τ̂_i keeps the entries of τ_i = θ_i − θ0 whose magnitude is at least t_i, the n-th largest |τ_i|,
       n = ⌊N · k / 100⌋; the rest are set to 0. Entries tied with t_i are all kept (the reference code's
       ``|τ| >= kthvalue`` rule), so slightly more than n can survive; n = 0 keeps nothing.
       ``trim_scope="global"`` ranks over all N entries of the model (the original code, MergeBench,
       FusionBench); ``"per_tensor"`` ranks within each tensor, N = its size (mergekit).
       (The reference computes its threshold with ``kthvalue(N − n)``, i.e. the (n+1)-th largest; here it is
       the n-th largest, so exactly n survive when there are no ties.)
    2. elect: γ = sign(Σ_i τ̂_i), the sign with more total mass. Where that sum is exactly 0 although some τ̂_i
       are nonzero, γ is the model-wide majority sign sign(#{γ > 0} − #{γ < 0}), as in the reference code
       (``resolve_zero_signs(..., "majority")``); if that count is itself tied such entries stay 0.
    3. disjoint merge: over the i with sign(τ̂_i) = γ, ``merge="mean"`` (the paper's dis-mean: their sum over
       how many are nonzero) or ``"sum"`` (dis-sum); entries where no expert agrees (all τ̂_i = 0) stay 0.
    4. θ = θ0 + λ · merged.

Defaults [k = 20, trim_scope = global, merge = sum, λ = 0.3] are those of the published CLIP ViT-B/32
eight-task rows (AdaMerging, FusionBench, MergeBench: global top-20%, dis-sum, λ = 0.3); the paper's own
dis-mean is ``merge=mean`` and needs a larger λ (around 1).

Exact thresholds come from :func:`bench.merge_ops.kth_largest_rows` (no flattening, sorting or kthvalue over
the model); everything is done block by block in fp32 (fp64 stays fp64) and written in the base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.merge_ops import (
    TIES_MERGES,
    TRIM_SCOPES,
    PlainTaskVectors,
    check_experts,
    require_choice,
    require_range,
    ties_merge_task_vectors,
)
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method


@dataclass(frozen=True)
class TiesParams:
    k: float = param(20.0, "percent of each task vector's entries kept (by magnitude)", low=0.0, high=100.0)
    trim_scope: str = param(
        "global", "rank magnitudes over the whole model or within each tensor", choices=TRIM_SCOPES
    )
    merge: str = param(
        "sum", "combine the agreeing entries by sum (dis-sum) or mean (dis-mean)", choices=TIES_MERGES
    )
    scaling: float = param(0.3, "λ in θ0 + λ · merged")

    def __post_init__(self) -> None:
        require_range("ties", "k", self.k, 0.0, 100.0)
        require_choice("ties", "trim_scope", self.trim_scope, TRIM_SCOPES)
        require_choice("ties", "merge", self.merge, TIES_MERGES)


def ties_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    k: float,
    trim_scope: str,
    merge: str,
    scaling: float,
    notes: dict | None = None,
) -> StateDict:
    """θ0 + scaling · TIES(θ_i − θ0); ``notes`` (optional) receives the thresholds and the majority sign."""
    check_experts(base, experts)
    return ties_merge_task_vectors(
        PlainTaskVectors(base, experts), k=k, trim_scope=trim_scope, merge=merge, scaling=scaling, notes=notes
    )


@register_method(
    "ties",
    family="data-free",
    params=TiesParams,
    description="Trim to top-k% magnitudes, elect signs, disjoint merge (Yadav et al. 2023)",
)
def merge(ctx: MergeContext, p: TiesParams) -> StateDict:
    return ties_merge(
        ctx.pretrained(),
        ctx.experts(),
        k=p.k,
        trim_scope=p.trim_scope,
        merge=p.merge,
        scaling=p.scaling,
        notes=ctx.notes,
    )
