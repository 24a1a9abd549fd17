"""Reference row: the pretrained model θ0 with each task's head (zero-shot for CLIP suites).

Not a merge; every leaderboard has it as the lower reference (methods.md, "Reference rows").
"""

from __future__ import annotations

from bench.problem import MergeContext, StateDict
from bench.registry import register_method


@register_method("pretrained", family="reference", description="θ0 with each task's head (zero-shot lower bound)")
def merge(ctx: MergeContext, params: object) -> StateDict:
    return ctx.pretrained()
