"""Weight averaging ("uniform soup"; Wortsman et al. 2022, *Model soups*, Eq. 1 with uniform weights).

    θ = (1/K) Σ_i θ_i

No hyperparameters. Computed block by block in fp32 (fp64 stays fp64) and written in the base's dtype;
non-floating-point tensors (integer buffers) are copied from the base.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.buffers import Scratch
from bench.problem import MergeContext, StateDict
from bench.registry import NoParams, register_method
from bench.task_vectors import (
    check_experts,
    column_blocks,
    flat,
    mergeable_keys,
    start_output,
    work_dtype,
)


def weight_average(base: StateDict, experts: Sequence[StateDict]) -> StateDict:
    """mean_i θ_i for every floating-point tensor (the base only gives keys, dtypes and buffers)."""
    check_experts(base, experts)
    out = start_output(base)
    scratch = Scratch()
    for key in mergeable_keys(base):
        out_flat = out[key].view(-1)
        expert_flats = [flat(expert[key]) for expert in experts]
        dtype = work_dtype(out_flat.dtype)
        for start, stop in column_blocks(out_flat.numel()):
            total = scratch.get("total", (stop - start,), dtype)
            total.copy_(expert_flats[0][start:stop])
            for expert_flat in expert_flats[1:]:
                total.add_(expert_flat[start:stop])
            out_flat[start:stop] = total.div_(len(experts))
    return out


@register_method(
    "weight_averaging",
    family="data-free",
    params=NoParams,
    description="Uniform average of the experts' weights (model soup)",
)
def merge(ctx: MergeContext, p: NoParams) -> StateDict:
    return weight_average(ctx.pretrained(), ctx.experts())
