"""Task arithmetic (Ilharco et al. 2023, *Editing Models with Task Arithmetic*, Eq. 1 / Sec. 2).

    τ_i = θ_i − θ0,    θ = θ0 + λ Σ_i τ_i        [λ = 0.3, the CLIP ViT-B/32 eight-task setting]

Task vectors are formed block by block (never K whole task vectors at once), in fp32 (fp64 stays fp64),
and the result is written in the base's dtype; non-floating-point tensors are copied from the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method
from bench.task_vectors import PlainTaskVectors, check_experts, merge_summed


@dataclass(frozen=True)
class TaskArithmeticParams:
    scaling: float = param(0.3, "λ in θ0 + λ Σ τ_i")


def task_arithmetic_merge(base: StateDict, experts: Sequence[StateDict], *, scaling: float) -> StateDict:
    """θ0 + scaling · Σ_i (θ_i − θ0)."""
    check_experts(base, experts)
    return merge_summed(PlainTaskVectors(base, experts), scaling=scaling)


@register_method(
    "task_arithmetic",
    family="data-free",
    params=TaskArithmeticParams,
    description="Add the scaled sum of task vectors to the base (Ilharco et al. 2023)",
)
def merge(ctx: MergeContext, p: TaskArithmeticParams) -> StateDict:
    return task_arithmetic_merge(ctx.pretrained(), ctx.experts(), scaling=p.scaling)
