"""MagMax (Marczak, Twardowski, Trzciński & Cygert 2024, *MagMax: Leveraging Model Merging for Seamless
Continual Learning*, ECCV 2024, arXiv 2407.06322): keep, entry by entry, the task vector of largest magnitude.

    τ*[j] = τ_{t*(j)}[j],   t*(j) = argmax_t |τ_t[j]|,   θ = θ0 + α · τ*        [α = 0.5]

As in FusionBench's ``magmax.py`` (FB @54c9e8c, matched there to the authors' ``merge_max_abs``): τ* is a fold
over the tasks in order, starting from τ_1, replacing the running choice where |τ_t| ≥ |running| (``>=``), so
ties of magnitude go to the LATER task (τ = +1 and −1 at the same entry keep the later one's sign). A NaN
never replaces the running value (the comparison is false) and a NaN already chosen stays. θ0 + α·τ* is
computed as ``base + α * τ*``. α = 0.5 is FusionBench's default (the authors' 8-dataset script,
``scaling_coef = 0.5``; FB reports 70.70 on CLIP ViT-B/32 TA8 with it).

Integer buffers are copied from the base (FB skips integer/bool buffers). FB computes in the model's own
dtype; here fp16/bf16 tensors are computed in fp32 (fp64 stays fp64) and rounded once to the base's dtype, so
half-precision models may differ from FB in the last bit. Deterministic; the generator is unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method
from bench.tensorwise import TensorInputs, merge_tensorwise


@dataclass(frozen=True)
class MagMaxParams:
    scaling: float = param(0.5, "α in θ0 + α · τ* (τ*: the largest-magnitude task vector entry)")


def max_magnitude(task_vectors: Sequence[Tensor]) -> Tensor:
    """τ*: elementwise the entry of largest |τ_t|, ties to the later task (a fresh tensor)."""
    chosen = task_vectors[0].clone()
    for tau in task_vectors[1:]:
        chosen = torch.where(tau.abs() >= chosen.abs(), tau, chosen)
    return chosen


def magmax_tensor(inputs: TensorInputs, *, scaling: float) -> Tensor:
    """θ for one key: θ0 + α · τ*."""
    return inputs.base + scaling * max_magnitude(inputs.task_vectors)


def magmax_merge(
    base: StateDict, experts: Sequence[StateDict], *, scaling: float, generator: torch.Generator | None = None
) -> StateDict:
    """θ0 + scaling · τ* (``generator`` is accepted for a uniform signature and unused)."""
    return merge_tensorwise(base, experts, partial(magmax_tensor, scaling=scaling), generator=generator)


@register_method(
    "magmax",
    family="data-free",
    params=MagMaxParams,
    description="Keep each entry's largest-magnitude task vector, scaled (Marczak et al. 2024)",
)
def merge(ctx: MergeContext, p: MagMaxParams) -> StateDict:
    return magmax_merge(ctx.pretrained(), ctx.experts(), scaling=p.scaling, generator=ctx.generator)
