"""NuSLERP: spherical interpolation of two task vectors, added to the base (mergekit
``merge_methods/nuslerp.py``, the "nuslerp" method with a distinct ``base_model``; no paper or arXiv id).
Per tensor, with τ_i = θ_i − θ0 and weights w_1, w_2:

    t = w_2 / (w_1 + w_2)        (t = 0.5 when |w_1 + w_2| < 1e-6, as mergekit)
    θ = θ0 + slerp(τ_1, τ_2, t)
    slerp(v0, v1, t) = sin((1 − t)Ω) / sin Ω · v0 + sin(tΩ) / sin Ω · v1,   Ω = arccos(v̂0 · v̂1)
                       (1 − t) v0 + t v1   where |sin Ω| < 1e-8 (LERP)

``flatten=true`` (mergekit's ``nuslerp_flatten`` default): one angle per tensor. ``flatten=false``: one angle per
vector along the last dimension (each row of a [out, in] weight), or along dim 0 with ``row_wise=true``
(mergekit's ``nuslerp_row_wise``; ignored when flattening, as in mergekit). 0-D and 1-D tensors are one
vector. Weights default to all 1 (t = 0.5).

Generalisation to K experts (the harness's own; mergekit takes exactly two models plus the base):

- K = 1: θ = θ_1.
- K = 2: exactly mergekit's merge above, τ_1 being the first expert.
- K > 2: the weighted running spherical mean of the task vectors, m_1 = τ_1,
  m_i = slerp(m_{i−1}, τ_i, t_i) with t_i = w_i / Σ_{j≤i} w_j (0.5 where that sum is below 1e-6 in magnitude),
  θ = θ0 + m_K. With equal weights t_i = 1/i.

``weights`` is one number per expert (e.g. ``--set nuslerp.weights=1,1,2``; commas, semicolons or spaces
separate them) or empty for all 1; a single number shared by all experts would be a no-op (t_i = 1/i whatever
it is), so there is none.

The kernel is :func:`methods.slerp.slerp_rows` with nuslerp's LERP rule. Differences from mergekit, all
deliberate:

1. arithmetic follows the slerp kernel (sin(Ω − tΩ)/sin Ω · v0 + ..., FusionBench's order) where mergekit
   evaluates (sin((1 − t)Ω) v0 + sin(tΩ) v1) / sin Ω: results agree within fp32 rounding, not bit for bit;
2. rows are normalised as by the slerp peers (unchanged when ‖v‖ ≤ 1e-8) where mergekit divides by
   max(‖v‖, 1e-7): only rows with 0 < ‖τ‖ ≤ 1e-7 differ;
3. rows whose cosine computes to exactly −1 (always so for opposite one-element rows: 0-D tensors, or
   flatten=false with a last dimension of size 1) are LERPed, where mergekit's fp32 sin(arccos(−1)) = −8.7e-8
   fails its |sin Ω| < 1e-8 test and multiplies the row by ~10⁷ (nearly antiparallel rows of unequal norms
   still blow up, as in mergekit: the formula itself does);
4. computed in fp32 (fp64 stays fp64) and written in the base's dtype, where mergekit works in the checkpoint
   dtype; integer buffers are copied from the base.

Measured on fp32 inputs (K = 2, every layout): |ours − mergekit| ≤ 1e-6 · |mergekit| + 1e-6 · max(|τ_1|, |τ_2|)
elementwise (worst excess seen 1.2e-7 · max|τ|).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench.errors import BenchError
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method
from bench.tensorwise import TensorInputs, merge_tensorwise
from methods.slerp import running_mean, slerp_rows

SIN_EPS = 1e-8
"""LERP a row when |sin Ω| is below this (mergekit nuslerp)."""
WEIGHT_SUM_EPS = 1e-6
"""t = 0.5 when the weights sum to less than this in magnitude (mergekit nuslerp)."""


def parse_weights(text: str) -> tuple[float, ...] | None:
    """``"1,1,2"`` -> (1.0, 1.0, 2.0); empty -> None (all 1). ValueError for a part that is not a finite number."""
    parts = [part for part in re.split(r"[,;\s]+", text.strip()) if part]
    if not parts:
        return None
    weights = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"nuslerp.weights={text!r}: {part!r} is not a finite number; write one weight per "
                             "expert, e.g. --set nuslerp.weights=1,1,2, or leave it empty for all 1")
        weights.append(value)
    return tuple(weights)


@dataclass(frozen=True)
class NuSlerpParams:
    weights: str = param("", "one weight per expert, e.g. 1,1,2 (t_i = w_i / Σ_{j≤i} w_j); empty: all 1")
    flatten: bool = param(True, "one angle per tensor; false: one per vector along the last dimension")
    row_wise: bool = param(False, "with flatten=false, take the vectors along dim 0 instead of the last one")

    def __post_init__(self) -> None:
        parse_weights(self.weights)


def nuslerp_fractions(weights: Sequence[float]) -> list[float]:
    """t_i = w_i / Σ_{j≤i} w_j for i = 2..K (0.5 where |Σ_{j≤i} w_j| < 1e-6)."""
    fractions, total = [], weights[0]
    for weight in weights[1:]:
        total += weight
        fractions.append(0.5 if abs(total) < WEIGHT_SUM_EPS else weight / total)
    return fractions


def to_rows(tensor: Tensor, *, flatten: bool, row_wise: bool) -> Tensor:
    """The [R, n] vectors interpolated: the whole tensor (flatten, 0-D, 1-D), else along dim 0 or the last dim."""
    if flatten or tensor.ndim <= 1:
        return tensor.reshape(1, -1)
    if row_wise:
        tensor = tensor.transpose(0, -1)
    return tensor.reshape(-1, tensor.shape[-1])


def from_rows(rows: Tensor, shape: torch.Size, *, flatten: bool, row_wise: bool) -> Tensor:
    """Inverse of :func:`to_rows`."""
    if flatten or len(shape) <= 1 or not row_wise:
        return rows.reshape(shape)
    swapped = [shape[-1], *shape[1:-1], shape[0]]
    return rows.reshape(swapped).transpose(0, -1)


def nuslerp_tensor(inputs: TensorInputs, *, fractions: Sequence[float], flatten: bool, row_wise: bool) -> Tensor:
    """θ for one key: θ_1 (K = 1), else θ0 + the running slerp of the task vectors (see the module docstring)."""
    if inputs.count == 1:
        return inputs.experts[0]
    layout = partial(to_rows, flatten=flatten, row_wise=row_wise)
    rows = [layout(task_vector) for task_vector in inputs.task_vectors]
    merged = running_mean(rows, fractions, partial(slerp_rows, dot_threshold=None, sin_eps=SIN_EPS))
    return inputs.base + from_rows(merged, inputs.base.shape, flatten=flatten, row_wise=row_wise)


def nuslerp_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    weights: Sequence[float] | None = None,
    flatten: bool = True,
    row_wise: bool = False,
    generator: torch.Generator | None = None,
) -> StateDict:
    """θ0 + the (running) slerp of the task vectors with per-expert ``weights`` (None: all 1)."""
    count = len(experts)
    if weights is None:
        weights = [1.0] * count
    if len(weights) != count:
        raise BenchError(f"nuslerp.weights has {len(weights)} numbers but there are {count} experts; give one "
                         "per expert or leave it empty for all 1")
    fn = partial(nuslerp_tensor, fractions=nuslerp_fractions(weights) if count else [], flatten=flatten,
                 row_wise=row_wise)
    return merge_tensorwise(base, experts, fn, generator=generator)


@register_method(
    "nuslerp",
    family="data-free",
    params=NuSlerpParams,
    description="Slerp of two task vectors added to the base (mergekit nuslerp); running slerp for K > 2",
)
def merge(ctx: MergeContext, p: NuSlerpParams) -> StateDict:
    return nuslerp_merge(ctx.pretrained(), ctx.experts(), weights=parse_weights(p.weights), flatten=p.flatten,
                         row_wise=p.row_wise, generator=ctx.generator)
