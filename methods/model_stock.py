"""Model Stock (Jang, Yun & Han 2024, *Model Stock: All we need is just a few fine-tuned models*, arXiv
2403.19522: the layer-wise interpolation ratio for N fine-tuned models). Per tensor, with τ_i = θ_i − θ0 and
N = K experts:

    c = the pairwise cosine of the task vectors τ_i, τ_j (i < j), aggregated over the N(N − 1)/2 pairs
    t = N c / ((N − 1) c + 1)
    θ = t · (1/N) Σ_i θ_i + (1 − t) · θ0

Two aggregations, the two peer codes (``cosine``):

- ``mean_angle`` (default; FusionBench ``method/model_stock/model_stock.py``): c = cos(mean of the pairwise
  angles in degrees). Its arithmetic is reproduced: cos_ij = Σ τ_i τ_j / (√(Σ τ_i² · Σ τ_j²) + 1e-8) in fp32
  (the square root in float64), clamped to [−1, 1], arccos in fp32, degrees / mean / cos in float64, and
  t = N c / ((N − 1) c + 1 + 1e-8) (FusionBench's ε in the denominator). On fp32 inputs the result is
  bit-identical to FusionBench's.
- ``mean_cosine`` (mergekit ``merge_methods/model_stock.py``): c = the mean of the pairwise cosines,
  cos_ij = Σ τ_i τ_j / max(‖τ_i‖ ‖τ_j‖, 1e-6) clamped to [−1, 1], in the work dtype, and
  t = N c / (1 + (N − 1) c) without ε, as mergekit's operations; bit-identical to mergekit on fp32 inputs.

``filter_wise=true`` (mergekit's ``filter_wise``, default false in both): one c and t per vector along the last
dimension (each row of a [out, in] weight; a 0-D or 1-D tensor is one row) instead of one per tensor; with
``mean_angle`` the same per-row angles are averaged (no peer has that combination).

Why ``mean_angle`` is the default: FusionBench is the harness's primary reference for the CLIP suites and follows
the paper's angle formulation (the paper writes t in terms of one angle between fine-tuned models and does not
say how to combine N > 2 of them). For N = 2 the two choices agree up to rounding. They differ when the pairwise
angles spread: below 90° (the usual case for task vectors) cos is concave, so cos(mean angle) ≥ mean cos and
``mean_angle`` gives the larger t (moves further toward the average); above 90° the opposite. Neither peer (nor
this code) clamps t to [0, 1]: a negative c gives t < 0 (extrapolation away from the average). With N > 2,
``mean_angle`` can reach (N − 1) c + 1 ≤ 0 (e.g. two antiparallel pairs at right angles to each other: mean
angle 120°); the mean cosine cannot go below −1/(N − 1).

Edge cases, deliberate differences from the peers:

- (N − 1) c + 1 ≤ 0, i.e. the task vectors share no direction at all (the mean cosine at its floor
  −1/(N − 1): e.g. a 0-D or one-element parameter whose N = 2 task vectors have opposite signs, or N = 8 with
  four of each sign): t = 0 (θ0). mergekit divides by zero there (inf or nan), FusionBench by ~1e-8 or by a
  negative number (t of ±10⁸, or e.g. 4). Only that is caught: just above the floor t still diverges, as in
  both peers (FusionBench's +1e-8 in the cosine keeps exactly opposite 0-D task vectors just above it, so
  ``mean_angle`` gives t of order −10⁸ · |τ_1| |τ_2| for N = 2 there, like FusionBench).
- K = 1: θ_1 (both peers refuse it; a single model's cosine with itself is 1, so t = 1).
- A tensor (or, filter-wise, a row) whose task vectors are all zero: t = 0, θ0 exactly. mergekit gives that
  already; FusionBench's fp32 arccos(0) is 90.0000025°, so its t there is about −4.4e-8 · N: θ0 within an ulp.
  Pairs with one zero task vector count as cosine 0 (90°), as in both peers.
- Integer buffers are copied from the base (FusionBench merges every key; mergekit's models have none). 16-bit
  inputs are merged in fp32 and written in their dtype (the peers work in the checkpoint dtype; FusionBench's
  cosine is always fp32, also for fp64 models, and so is it here).
- FusionBench's ``ignore_keys`` (open_clip names) match no key of our models, so none is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_choice
from bench.tensorwise import TensorInputs, merge_tensorwise

COSINES = ("mean_angle", "mean_cosine")
ANGLE_EPS = 1e-8
"""FusionBench's ε: added to the cosine's denominator √(Σ τ_i² Σ τ_j²) and to t's denominator."""
NORM_FLOOR = 1e-6
"""mergekit's floor on ‖τ_i‖ ‖τ_j‖ in the cosine."""


@dataclass(frozen=True)
class ModelStockParams:
    cosine: str = param("mean_angle", "aggregate the pairwise task-vector angles: cos of the mean angle "
                        "(FusionBench) or mean of the cosines (mergekit)", choices=COSINES)
    filter_wise: bool = param(False, "one ratio t per vector along the last dimension instead of per tensor")

    def __post_init__(self) -> None:
        require_choice("model_stock", "cosine", self.cosine, COSINES)


def vectors(tensor: Tensor, filter_wise: bool) -> Tensor:
    """The vectors whose angles are measured: the flattened tensor, or (filter-wise) the rows along the last
    dimension, a 0-D or 1-D tensor being one row."""
    if not filter_wise:
        return tensor.reshape(-1)
    return tensor.reshape(1, -1) if tensor.ndim <= 1 else tensor


def mean_cosine_ratio(task_vectors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """mergekit's t and 1 − t (work dtype, shaped to broadcast over the vectors): mean pairwise cosine."""
    norms = [torch.norm(tau, dim=-1) for tau in task_vectors]
    cosines = [
        ((task_vectors[i] * task_vectors[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1, 1)
        for i in range(len(task_vectors))
        for j in range(i + 1, len(task_vectors))
    ]
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(task_vectors)
    denominator = 1 + (count - 1) * cosine
    ratio = (count * cosine) / denominator
    ratio = ratio.masked_fill(denominator <= 0, 0.0)  # no common direction: θ0 (mergekit: inf or nan)
    return ratio, 1 - ratio


def pair_angle(tau_i: Tensor, tau_j: Tensor, squares_i: Tensor, squares_j: Tensor) -> np.ndarray:
    """FusionBench's angle in degrees (float64) of each vector pair, from fp32 τ's and their Σ τ²."""
    denominator = (squares_i * squares_j).double().sqrt() + ANGLE_EPS
    cosine = ((tau_i * tau_j).sum(dim=-1) / denominator.float()).clamp(-1.0, 1.0)
    return np.rad2deg(torch.acos(cosine).double().numpy())


def mean_angle_ratio(task_vectors: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """FusionBench's t and 1 − t (float64, then ``dtype``): cos of the mean pairwise angle."""
    taus = [tau.float() for tau in task_vectors]
    squares = [(tau**2).sum(dim=-1) for tau in taus]
    total, pairs = 0.0, 0
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            total = total + pair_angle(taus[i], taus[j], squares[i], squares[j])
            pairs += 1
    cosine = np.cos(np.deg2rad(total / pairs))
    count = len(taus)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero denominator is replaced just below
        ratio = count * cosine / ((count - 1) * cosine + 1 + ANGLE_EPS)
    ratio = np.where((count - 1) * cosine + 1 <= 0, 0.0, ratio)  # no common direction: θ0 (FusionBench: ±huge)
    ratio = torch.from_numpy(np.asarray(ratio, dtype=np.float64)).unsqueeze(-1)
    return ratio.to(dtype), (1.0 - ratio).to(dtype)


def model_stock_tensor(inputs: TensorInputs, *, cosine: str, filter_wise: bool) -> Tensor:
    """θ for one key (see the module docstring)."""
    if inputs.count == 1:
        return inputs.experts[0]
    taus = [vectors(tau, filter_wise) for tau in inputs.task_vectors]
    if cosine == "mean_cosine":
        ratio, rest = mean_cosine_ratio(taus)
    else:
        ratio, rest = mean_angle_ratio(taus, inputs.base.dtype)
    untouched = torch.stack([tau != 0 for tau in taus]).any(dim=-1).any(dim=0).logical_not().unsqueeze(-1)
    if bool(untouched.any()):  # every task vector of the tensor (row) is zero: θ0 exactly
        ratio, rest = ratio.masked_fill(untouched, 0.0), rest.masked_fill(untouched, 1.0)
    total = inputs.experts[0]
    for expert in inputs.experts[1:]:
        total = total + expert
    average = vectors(total / inputs.count, filter_wise)
    merged = average * ratio + vectors(inputs.base, filter_wise) * rest
    return merged.reshape(inputs.base.shape)


def model_stock_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    cosine: str = "mean_angle",
    filter_wise: bool = False,
    generator: torch.Generator | None = None,
) -> StateDict:
    """θ = t · mean_i θ_i + (1 − t) · θ0 per tensor (or row), t from the task vectors' pairwise angles."""
    require_choice("model_stock", "cosine", cosine, COSINES)
    fn = partial(model_stock_tensor, cosine=cosine, filter_wise=filter_wise)
    return merge_tensorwise(base, experts, fn, generator=generator)


@register_method(
    "model_stock",
    family="data-free",
    params=ModelStockParams,
    description="Interpolate the experts' average toward the base by their task vectors' angles (Jang et al. 2024)",
)
def merge(ctx: MergeContext, p: ModelStockParams) -> StateDict:
    return model_stock_merge(ctx.pretrained(), ctx.experts(), cosine=p.cosine, filter_wise=p.filter_wise,
                             generator=ctx.generator)

