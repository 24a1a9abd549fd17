"""Reference row: each expert θi evaluated on its own task i only (the fine-tuned upper bound).

Not one model. Its per-task accuracies are the denominators of normalized accuracy (merged / individual).
"""

from __future__ import annotations

from bench.problem import MergeContext, PerTaskWeights
from bench.registry import register_method


@register_method("individual", family="reference", output="per_task",
                 description="each expert on its own task (fine-tuned upper bound)")
def merge(ctx: MergeContext, params: object) -> PerTaskWeights:
    base = ctx.problem.model_pool().base
    whole_model = sum(base.nbytes_of(key) for key in base)  # from the headers: nothing is read
    return PerTaskWeights({task: ctx.problem.expert(task) for task in ctx.tasks}, per_task_bytes=whole_model)
