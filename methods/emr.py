"""EMR-Merging (Huang et al. 2024, *EMR-Merging: Tuning-Free High-Performance Model Merging*, NeurIPS 2024,
arXiv 2405.17461, Sec. 3 / Eq. 1-5): Elect a unified task vector, then per task a Mask and a Rescaler.

    γ     = sign(Σ_i τ_i), with 0 counted as −1                   (the elected sign, elementwise)
    m_t   = τ_t · γ > 0                                          (task t agrees with the elected sign)
    τ_U   = γ · max_t |m_t ⊙ τ_t|                                 (the unified task vector)
    λ_t   = Σ_keys mean|τ_t| / Σ_keys mean|m_t ⊙ τ_U|               (a sum of per-tensor means, as the code)
    θ_t   = θ0 + λ_t · (m_t ⊙ τ_U)                                 (the weights task t is evaluated on)

As FusionBench's ``emr_merging/utils.py`` and the authors' ``EMR_Merging`` repository; no hyperparameter. Where
the reference divides 0 by 0 (a task whose τ_t is 0 on every merged key, so no mask entry is on) it gets NaN;
here λ_t = 0 and θ_t = θ0. λ_t's sums are accumulated in float64 (the reference sums fp32 scalars), so λ_t may
differ from it in the last bits.

The result is one set of weights per task (``output="per_task"``): τ_U (one model), K bit masks and K scalars;
each task adds ⌈n/8⌉ bytes per tensor of n entries plus its 4-byte λ_t (the recorded per-task storage), and its
weights are built when it is evaluated. Integer buffers are the base's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.problem import MergeContext, PerTaskWeights, StateDict
from bench.registry import register_method
from bench.tensorwise import TensorInputs, scan_tensorwise
from methods.tall_masks import SharedAndMasks, masked_weights, pack_masks


@dataclass(frozen=True)
class EmrStatistics:
    """One key's unified vector, packed masks, and its terms of λ_t: mean|τ_t| and mean|m_t ⊙ τ_U| per task."""

    unified: Tensor
    masks: object
    task_means: list[float]
    masked_means: list[float]


def emr_tensor(inputs: TensorInputs) -> EmrStatistics:
    """Elect, mask and unify one key (the module docstring's first three lines)."""
    tau = torch.stack(inputs.task_vectors)
    total = inputs.task_vectors[0].clone()
    for task_vector in inputs.task_vectors[1:]:  # summed in task order, as the reference's state_dict_sum
        total += task_vector
    elected = torch.where(total > 0, 1.0, -1.0).to(tau.dtype)
    masks = tau * elected > 0
    unified = (masks * tau).abs().amax(dim=0) * elected
    masked = (masks * unified).abs()
    return EmrStatistics(unified, pack_masks(masks), [float(t.abs().mean()) for t in tau],
                         [float(m.mean()) for m in masked])


def rescalers(statistics: Sequence[EmrStatistics], tasks: int) -> list[float]:
    """λ_t = Σ_keys mean|τ_t| / Σ_keys mean|m_t ⊙ τ_U| (0 where the denominator is 0)."""
    numerators = [sum(s.task_means[t] for s in statistics) for t in range(tasks)]
    denominators = [sum(s.masked_means[t] for s in statistics) for t in range(tasks)]
    return [n / d if d > 0 else 0.0 for n, d in zip(numerators, denominators, strict=True)]


def emr_merge(base: StateDict, experts: Sequence[StateDict], *, tasks: Sequence[str] | None = None) -> PerTaskWeights:
    """One set of weights per task (``tasks`` names them; default 0, 1, ...), built when asked for."""
    statistics = scan_tensorwise(base, experts, emr_tensor)
    scales = rescalers(list(statistics.values()), len(experts))
    state = SharedAndMasks({key: s.unified for key, s in statistics.items()},
                           {key: s.masks for key, s in statistics.items()})
    names = list(tasks) if tasks is not None else [str(i) for i in range(len(experts))]

    def weights_of(index: int):
        return lambda: masked_weights(base, state, index, scales[index])

    result = PerTaskWeights({name: weights_of(index) for index, name in enumerate(names)},
                            per_task_bytes=state.bytes_per_task() + 4)
    result.state, result.rescalers = state, dict(zip(names, scales, strict=True))
    return result


@register_method(
    "emr",
    family="data-free",
    memory="stacked",
    output="per_task",
    description="EMR-Merging: elected unified task vector, per-task masks and rescalers (Huang et al. 2024)",
)
def merge(ctx: MergeContext, p: object) -> PerTaskWeights:
    result = emr_merge(ctx.pretrained(), ctx.experts(), tasks=ctx.tasks)
    ctx.notes["emr_rescalers"] = result.rescalers
    ctx.notes.setdefault("held_bytes", {})["unified_and_masks"] = result.state.nbytes()
    return result
