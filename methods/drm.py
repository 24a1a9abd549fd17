"""DRM: Decom-Renorm-Merge (Chaichana, Trachu, Limkonchotiwat, Preechakul, Khandhawit, Chuangsuwanich 2025,
*Decom-Renorm-Merge: Model Merging on the Right Space Improves Multitasking*, arXiv:2505.23117). Reference: repo
``yophis/decom-renorm-merge``, ``drm/_decom_renorm_merge.py`` (``left_drm``, ``right_drm``, ``drm_merging``).

**Matrix parameters** (:func:`bench.task_vectors.is_matrix_param`: 2-D and not named by the suite's
``vector_params``, ``*text_projection*`` on CLIP), DRM-V (``direction="vertical"``, the reference's ``left_drm``)
on the K deltas τ_i ∈ ℝ^{n×m}:

1. decompose: the row stack [τ_1; …; τ_K] ∈ ℝ^{Kn×m} = U diag(σ) Vᵀ (thin SVD); keep the r components with
   σ_j > 0.01 · σ_max (strictly).
2. renormalise: split U into the K blocks U_i ∈ ℝ^{n×r} (rows of τ_i); each column j of U_i is divided by its
   norm c_ij, which moves into that model's singular values: s_ij = σ_j · c_ij, so U_i diag(σ) = Û_i diag(s_i).
3. prune: over all K·n·r entries of the Û_i **jointly**, keep the p largest |·| (entries equal to the p-th
   largest are all kept) with p = round(K·n·r · (1 − drop_rate)), half to even as Python's ``round``; zero the rest.
4. M_i = pruned Û_i · diag(s_i).
5. elect (TIES, by mass): γ = sign(Σ_i M_i) entrywise; where that sum is 0, γ = the majority sign of this one
   tensor, sign(Σ_entries γ) (if that is 0 too, γ stays 0); entries of M_i whose sign differs from γ are zeroed.
6. merge: Δ = c · disjoint-mean_i(M_i) · Vᵀ, where the disjoint mean divides the sum by the number of non-zero
   entries (at least 1) and c is the coefficient.

DRM-H (``direction="horizontal"``, ``right_drm``) decomposes the column stack [τ_1 … τ_K] = U diag(σ) Vᵀ, splits
and renormalises the rows of Vᵀ per model and returns U · merged; it equals DRM-V applied to the transposes
τ_iᵀ and transposed back, which is how it is computed here.

**Other floating-point tensors**: steps 5-6 directly on the τ_i (election, coefficient, disjoint mean).

θ = θ0 + Δ.

Defaults [drop_rate = 0.8, direction = vertical, coefficient = 1]: the repo's example config
(``configs/config.yaml``: ``singular_matrices_drop_rate: 0.8``, ``direction: vertical``, coefficient 1.0 per
model). The value the paper uses for CLIP ViT is unverified (methods-wave2.md); the repo's function defaults
differ (``is_horizontal_stack=True``, drop rate 0.0).

Deliberate differences from the reference:

- Pruning keeps the p largest entries. The reference zeroes |x| < kthvalue(L − p) (the (p+1)-th largest), so it
  keeps one more entry than p when there are no ties, fails for p = L, and keeps the largest entry at
  drop_rate = 1; here drop_rate = 1 keeps nothing (Δ = 0 for matrices). The same choice as ``ties`` here.
- A column of some U_i with zero norm (that model has no component along σ_j, e.g. a zero task vector) stays
  zero with s_ij = 0; the reference divides 0 by 0 and the merged tensor becomes NaN.
- ``drop_rate = 0`` follows the reference's bypass: matrices get the plain disjoint mean of the raw τ_i (no
  SVD, no sign election). The reference then ignores the coefficient for matrices; here it is applied (Δ =
  c · disjoint mean), so c means the same at every drop rate. With the default c = 1 nothing differs.
- One coefficient for all models (the reference allows one per model); applied as c · mean, which equals the
  reference's mean of c · M_i.
- The reference's optional magnitude trim of the non-matrix parameters (``non_linear_module_entries_drop_rate``,
  default 0.0, a global top-k over all of them) is not offered; its switches ``enable_disjoint_mean`` and
  ``enable_sign_resolution`` are fixed at their defaults (true), as are its automatic direction choices (off).
- Which matrices get DRM: the reference selects 2-D weights by name regex (the example config excludes
  ``embed_tokens`` and ``lm_head``); here every matrix parameter does, embeddings included. Tensors are used as
  stored: for a GPT-2 ``Conv1D`` weight ([in, out]) "vertical" stacks along the input dimension.

This follows the repo's merging functions. Its driver ``drm/merge_models.py`` does not run as released (it passes
``merging_coeff=``, which ``drm_merging`` does not accept, and reads the linear-weight patterns from the top level
of the config rather than ``merging_config``), so it is no guide to the settings behind the paper's numbers.

SVDs run on ``device`` (the run's device) in fp32 (fp64 stays fp64); the result is written in the base's dtype.
No randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_choice, require_range
from bench.selection import kth_largest_small
from bench.task_vectors import is_matrix_param
from bench.tensorwise import TensorInputs, merge_tensorwise

DIRECTIONS = ("vertical", "horizontal")
RANK_TOLERANCE = 0.01
"""Singular values at most this fraction of the largest are dropped (the reference's ``S.max() * 1e-2``)."""


@dataclass(frozen=True)
class DrmParams:
    drop_rate: float = param(
        0.8, "fraction of the renormalised singular-vector entries pruned, jointly over experts", low=0.0, high=1.0
    )
    direction: str = param(
        "vertical", "stack the task vectors' rows (DRM-V) or columns (DRM-H) before the SVD", choices=DIRECTIONS
    )
    coefficient: float = param(1.0, "c multiplying every expert's contribution before the disjoint mean")

    def __post_init__(self) -> None:
        require_range("drm", "drop_rate", self.drop_rate, 0.0, 1.0)
        require_choice("drm", "direction", self.direction, DIRECTIONS)


def kept_count(numel: int, drop_rate: float) -> int:
    """p = round(numel · (1 − drop_rate)), half to even, with drop_rate read as written (0.8 is 4/5)."""
    return round(numel * (1 - Fraction(str(drop_rate))))


def prune_jointly(values: Tensor, keep: int) -> Tensor:
    """``values`` with all but its ``keep`` largest magnitudes zeroed (ties with the keep-th largest are kept)."""
    if keep >= values.numel():
        return values.clone()
    if keep <= 0:
        return torch.zeros_like(values)
    magnitudes = values.abs()
    threshold = kth_largest_small(magnitudes.reshape(-1), keep)
    return torch.where(magnitudes >= threshold, values, torch.zeros_like(values))


def elect_signs(stack: Tensor) -> Tensor:
    """TIES election by mass over dim 0: entries whose sign differs from γ = sign(Σ_i stack_i) are zeroed; where
    the sum is 0, γ is this tensor's majority sign sign(Σ γ) (the reference's ``resolve_zero_sign``)."""
    elected = stack.sum(dim=0).sign()
    majority = elected.sum(dtype=torch.float64).sign().to(stack.dtype)
    elected = torch.where(elected == 0, majority, elected)
    return torch.where(stack.sign() == elected, stack, torch.zeros_like(stack))


def disjoint_mean(stack: Tensor) -> Tensor:
    """Σ_i stack_i divided, per entry, by how many stack_i are non-zero (at least 1)."""
    count = torch.count_nonzero(stack, dim=0).clamp_(min=1)
    return stack.sum(dim=0) / count.to(stack.dtype)


def drm_vertical(deltas: Sequence[Tensor], *, drop_rate: float, coefficient: float) -> Tensor:
    """DRM-V's merged delta Δ ∈ ℝ^{n×m} of K matrices τ_i ∈ ℝ^{n×m} (steps 1-6 of the module docstring)."""
    stack = torch.stack(list(deltas))
    if drop_rate == 0:
        return coefficient * disjoint_mean(stack)
    count, rows, _ = stack.shape
    u, s, vh = torch.linalg.svd(stack.reshape(count * rows, -1), full_matrices=False)
    rank = int((s > float(s.max()) * RANK_TOLERANCE).sum()) if s.numel() else 0
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    blocks = u.reshape(count, rows, rank)  # U_i: the rows of U belonging to τ_i
    norms = torch.linalg.vector_norm(blocks, dim=1, keepdim=True)  # c_ij, [K, 1, r]
    normalised = blocks / torch.where(norms > 0, norms, torch.ones_like(norms))
    pruned = prune_jointly(normalised, kept_count(normalised.numel(), drop_rate))
    joint = pruned * (s * norms)  # M_i = pruned Û_i · diag(s_i)
    return (coefficient * disjoint_mean(elect_signs(joint))) @ vh


def drm_matrix(deltas: Sequence[Tensor], *, drop_rate: float, coefficient: float, direction: str) -> Tensor:
    """Δ for one matrix parameter: DRM-V, or DRM-H computed as DRM-V of the transposes, transposed back."""
    if direction == "horizontal":
        merged = drm_vertical([delta.T for delta in deltas], drop_rate=drop_rate, coefficient=coefficient)
        return merged.T
    return drm_vertical(deltas, drop_rate=drop_rate, coefficient=coefficient)


def drm_tensor(
    inputs: TensorInputs,
    *,
    drop_rate: float,
    direction: str,
    coefficient: float,
    device: torch.device | str = "cpu",
    vector_params: Sequence[str] = (),
) -> Tensor:
    """θ for one key: θ0 + DRM Δ on matrix parameters, θ0 + c · disjoint mean of the elected τ_i elsewhere."""
    if is_matrix_param(inputs.key, inputs.base, vector_params):
        deltas = [tau.to(device) for tau in inputs.task_vectors]
        delta = drm_matrix(deltas, drop_rate=drop_rate, coefficient=coefficient, direction=direction).cpu()
    else:
        delta = coefficient * disjoint_mean(elect_signs(torch.stack(inputs.task_vectors)))
    return inputs.base + delta


def drm_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    drop_rate: float,
    direction: str,
    coefficient: float,
    device: torch.device | str = "cpu",
    vector_params: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> StateDict:
    """θ0 + DRM(θ_i − θ0) (see the module docstring); ``vector_params``: fnmatch patterns of 2-D parameters
    merged as plain vectors. Deterministic: ``generator`` is unused."""
    require_choice("drm", "direction", direction, DIRECTIONS)
    fn = partial(drm_tensor, drop_rate=drop_rate, direction=direction, coefficient=coefficient, device=device,
                 vector_params=vector_params)
    return merge_tensorwise(base, experts, fn, generator=generator)


@register_method(
    "drm",
    family="data-free",
    params=DrmParams,
    description="SVD of the stacked task vectors, renormalise, prune, TIES-merge in the joint basis "
    "(Chaichana et al. 2025)",
)
def merge(ctx: MergeContext, p: DrmParams) -> StateDict:
    return drm_merge(
        ctx.pretrained(),
        ctx.experts(),
        drop_rate=p.drop_rate,
        direction=p.direction,
        coefficient=p.coefficient,
        device=ctx.device,
        vector_params=ctx.problem.vector_params,
        generator=ctx.generator,
    )
