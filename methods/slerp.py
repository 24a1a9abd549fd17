"""SLERP: spherical linear interpolation of two models' raw weights (Shoemake 1985, *Animating rotation with
quaternion curves*; as a model merge in FusionBench ``method/slerp/slerp_utils.py`` and mergekit
``merge_methods/slerp.py``; no paper or arXiv id of its own). Per tensor, flattened, of the raw weights
v0 = θ_1, v1 = θ_2 (the base θ0 is not used):

    û = v / ‖v‖ (v left as it is when ‖v‖ ≤ 1e-8),   d = Σ û0 ⊙ û1,   Ω = arccos d
    θ = sin((1 − t)Ω) / sin Ω · v0 + sin(tΩ) / sin Ω · v1          if |d| ≤ 0.9995
    θ = (1 − t) v0 + t v1                                            if |d| > 0.9995 (LERP: nearly (anti)parallel)

Defaults [t = 0.5, dot_threshold = 0.9995] are FusionBench's (config ``method/slerp/slerp.yaml``; mergekit
requires t and uses the same 0.9995 and 1e-8). t = 0 gives θ_1 and t = 1 gives θ_2.

The peers merge exactly two models; every method here must run on any K, so (the harness's own
generalisation, in neither peer):

- K = 1: θ = θ_1.
- K = 2: θ = slerp(θ_1, θ_2, t), exactly the peers' merge with v0 the first expert.
- K > 2: the running spherical mean m_1 = θ_1, m_i = slerp(m_{i−1}, θ_i, 1/i), θ = m_K (the incremental
  geodesic mean: for vectors of equal norm on one great circle it is the one at the mean angle, every expert
  weighing 1/K). ``t`` is not used then (the run's notes say so).

Arithmetic is FusionBench's, operation for operation (fp32, fp64 stays fp64; sin((1 − t)Ω) is evaluated as sin(Ω −
tΩ)), so on fp32 inputs the result is bit-identical to its ``slerp`` (``tox -e peers``). mergekit 0.1.5 computes
the same formula but sums the normalising norms in chunks, so it agrees within fp32 rounding, not bit for bit: on
CLIP ViT-B/32 tensors |ours − mergekit| ≤ 2e-5 · max|θ| (the 2.36M-entry MLP matrices: one fp32 norm over the whole
tensor, FusionBench's and ours, is ~4e-5 relative too small there, which moves the angle by ~3e-4; mergekit's
chunked sum is ~10x closer to a float64 slerp). mergekit's ``slerp`` fails on 0-D tensors. Deliberate differences:
integer buffers are copied from the base (FusionBench slerps them as floats); 16-bit inputs are interpolated in
fp32 and written back in their dtype (as FusionBench).

:func:`slerp_rows` is the kernel ``methods/nuslerp.py`` reuses (row-wise angles, and mergekit nuslerp's
|sin Ω| < 1e-8 LERP rule instead of the dot threshold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_range
from bench.tensorwise import TensorInputs, merge_tensorwise

DOT_THRESHOLD = 0.9995
"""LERP when |cos Ω| exceeds this (FusionBench and mergekit ``slerp``)."""
NORM_EPS = 1e-8
"""A vector whose norm is at most this is not normalised (FusionBench and mergekit ``slerp``)."""


@dataclass(frozen=True)
class SlerpParams:
    t: float = param(0.5, "interpolation factor for K = 2 (0: first expert, 1: second); K > 2 ignores it",
                     low=0.0, high=1.0)
    dot_threshold: float = param(DOT_THRESHOLD, "LERP instead when |cos Ω| of the two tensors exceeds this",
                                 low=0.0, high=1.0)

    def __post_init__(self) -> None:
        require_range("slerp", "t", self.t, 0.0, 1.0)
        require_range("slerp", "dot_threshold", self.dot_threshold, 0.0, 1.0)


def _unit_rows(rows: Tensor, eps: float) -> Tensor:
    """Each row divided by its norm, rows with norm ≤ eps left as they are."""
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return rows / torch.where(norm > eps, norm, 1.0)


def slerp_rows(
    t: float,
    v0: Tensor,
    v1: Tensor,
    *,
    dot_threshold: float | None = DOT_THRESHOLD,
    sin_eps: float | None = None,
    eps: float = NORM_EPS,
) -> Tensor:
    """Spherical interpolation of every row of ``v0`` ([R, n]) towards the same row of ``v1``, one angle per row.

    A row is linearly interpolated, (1 − t) v0 + t v1, where |cos Ω| > ``dot_threshold`` (if given: the slerp
    peers' rule) or where |sin Ω| < ``sin_eps`` or cos Ω = −1 (if given: mergekit nuslerp's rule; exactly
    antiparallel rows are added because fp32 sin(arccos(−1)) is −8.7e-8, which would pass that test and scale
    the row by ~10⁷). Elsewhere sin(Ω − tΩ)/sin Ω · v0 + sin(tΩ)/sin Ω · v1, Ω = arccos(û0 · û1).
    """
    dot = (_unit_rows(v0, eps) * _unit_rows(v1, eps)).sum(dim=-1, keepdim=True)
    linear = torch.zeros_like(dot, dtype=torch.bool)
    if dot_threshold is not None:
        linear |= dot.abs() > dot_threshold
    theta = torch.acos(dot.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    if sin_eps is not None:
        linear |= (sin_theta.abs() < sin_eps) | (dot <= -1.0)
    if bool(linear.all()):
        return (1 - t) * v0 + t * v1
    theta_t = theta * t
    spherical = torch.sin(theta - theta_t) / sin_theta * v0 + torch.sin(theta_t) / sin_theta * v1
    if not bool(linear.any()):
        return spherical
    return torch.where(linear, (1 - t) * v0 + t * v1, spherical)


def slerp(t: float, v0: Tensor, v1: Tensor, *, dot_threshold: float = DOT_THRESHOLD) -> Tensor:
    """The peers' two-tensor slerp: one angle for the whole (flattened) tensor; result shaped like ``v0``."""
    rows = slerp_rows(t, v0.reshape(1, -1), v1.reshape(1, -1), dot_threshold=dot_threshold)
    return rows.reshape(v0.shape)


def running_mean(
    items: Sequence[Tensor], fractions: Sequence[float], interpolate: Callable[[float, Tensor, Tensor], Tensor]
) -> Tensor:
    """m_1 = items[0], m_i = interpolate(fractions[i − 2], m_{i−1}, items[i − 1]) for i = 2..K; returns m_K.

    ``fractions`` has K − 1 entries (slerp: 1/2, 1/3, ..., 1/K gives every item the weight 1/K)."""
    if len(fractions) != len(items) - 1:
        raise ValueError(f"{len(items)} items need {len(items) - 1} fractions, got {len(fractions)}")
    merged = items[0]
    for fraction, item in zip(fractions, items[1:], strict=True):
        merged = interpolate(fraction, merged, item)
    return merged


def slerp_fractions(count: int, t: float) -> list[float]:
    """The interpolation factors of the K − 1 steps: [t] for K = 2, else 1/2, 1/3, ..., 1/K."""
    return [t] if count == 2 else [1 / i for i in range(2, count + 1)]


def slerp_tensor(inputs: TensorInputs, *, t: float, dot_threshold: float) -> Tensor:
    """θ for one key: θ_1 (K = 1), slerp(θ_1, θ_2, t) (K = 2), the running spherical mean (K > 2)."""
    if inputs.count == 1:
        return inputs.experts[0]
    return running_mean(
        inputs.experts, slerp_fractions(inputs.count, t), partial(slerp, dot_threshold=dot_threshold)
    )


def slerp_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    t: float = 0.5,
    dot_threshold: float = DOT_THRESHOLD,
    generator: torch.Generator | None = None,
) -> StateDict:
    """Per tensor, the slerp of the experts' raw weights (see the module docstring); buffers from the base."""
    return merge_tensorwise(
        base, experts, partial(slerp_tensor, t=t, dot_threshold=dot_threshold), generator=generator
    )


@register_method(
    "slerp",
    family="data-free",
    params=SlerpParams,
    description="Spherical interpolation of two experts' raw weights; running spherical mean for K > 2",
)
def merge(ctx: MergeContext, p: SlerpParams) -> StateDict:
    experts = ctx.experts()
    if len(experts) > 2:
        ctx.notes["slerp_rule"] = f"running spherical mean of {len(experts)} experts (t={p.t} not used)"
    return slerp_merge(ctx.pretrained(), experts, t=p.t, dot_threshold=p.dot_threshold, generator=ctx.generator)
