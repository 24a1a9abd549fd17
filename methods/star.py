"""STAR: Spectral Truncation and Rescale (Yu-Ang Lee, Ching-Yun Ko, Tejaswini Pedapati, I-Hsin Chung, Mi-Yen Yeh,
Pin-Yu Chen 2025, *STAR: Spectral Truncation and Rescale for Model Merging*, NAACL 2025 short, arXiv:2502.10339).
Reference: repo ``IBM/STAR``, ``merger/STAR.py:star`` and ``runner/flan_t5_large.py`` (how the truncated task
vectors are combined).

For every matrix parameter (:func:`bench.task_vectors.is_matrix_param`: 2-D and not named by the suite's
``vector_params``, which the CLIP suites set to ``*text_projection*``) and every expert i, with the thin SVD
τ_i = U diag(σ) Vᵀ, σ_1 ≥ … ≥ σ_r:

    k     = min{k : σ_1 + … + σ_k ≥ η/100 · Σ_j σ_j}       (the reference's ``searchsorted(cumsum, Σσ·η/100) + 1``)
    STAR(τ_i) = U[:, :k] diag(σ_:k · Σ_j σ_j / Σ_{j≤k} σ_j) V[:, :k]ᵀ     (the nuclear norm is preserved)
    θ     = θ0 + λ · (1/K) Σ_i STAR(τ_i)

Every other floating-point tensor (biases, norms, embeddings that are not 2-D, 4-D kernels) gets
θ0 + λ · mean_i τ_i.

Defaults [η = 40, λ = 1] (methods-wave2.md; the reference's ``--eta 40`` default and the value in all its
scripts). The reference averages the truncated task vectors (``weighted_merge`` with weights 1/N) and adds the
average to the base with no further scaling, hence λ = 1.

Deliberate differences from the reference:

- The reference merges LoRA deltas only, which are all 2-D; averaging the non-matrix tensors of a full
  fine-tune is this benchmark's assumption (methods-wave2.md: "Gap"). The suite's ``vector_params`` matrices
  (``*text_projection*`` on CLIP) follow the same rule as in TSV-M/Iso: merged as plain vectors.
- A zero task vector (Σσ = 0) contributes zero; the reference divides 0 by 0 there and returns NaN.
- k is capped at r (with η = 100, rounding can leave the last cumulative sum just below Σσ, where the
  reference's ``k = r + 1`` is clipped by slicing anyway).
- The reference's optional ``known_rank`` (a randomised low-rank SVD for LoRA) is not offered: the SVD is exact.

SVDs run on ``device`` (the run's device) in fp32 (fp64 stays fp64); the result is written in the base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_range
from bench.task_vectors import is_matrix_param
from bench.tensorwise import TensorInputs, merge_tensorwise


@dataclass(frozen=True)
class StarParams:
    eta: float = param(40.0, "percent of the nuclear norm the kept singular values must reach", low=0.0, high=100.0)
    scaling: float = param(1.0, "λ in θ0 + λ · mean_i STAR(τ_i)")

    def __post_init__(self) -> None:
        require_range("star", "eta", self.eta, 0.0, 100.0)


def star_rank(singular_values: Tensor, eta: float) -> int:
    """k = min{k : σ_1 + … + σ_k ≥ η/100 · Σσ} (1-based, at least 1, at most r), for σ sorted descending.

    The target is computed as (Σσ · η) / 100, in that order, as the reference does; a cumulative sum equal to it
    counts as reaching it.
    """
    total = singular_values.sum()
    cumulative = torch.cumsum(singular_values, dim=0)
    index = int(torch.searchsorted(cumulative, (total * eta / 100).reshape(1)).item())
    return min(index + 1, singular_values.numel())


def star_truncate(matrix: Tensor, eta: float) -> Tensor:
    """STAR(τ): keep the top-k singular components (k from :func:`star_rank`) and rescale the kept singular
    values by Σσ_all / Σσ_kept. A zero matrix stays zero."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    total = s.sum()
    if not total > 0:
        return torch.zeros_like(matrix)
    k = star_rank(s, eta)
    kept = s[:k]
    return (u[:, :k] * (kept * (total / kept.sum()))) @ vh[:k]


def star_tensor(
    inputs: TensorInputs,
    *,
    eta: float,
    scaling: float,
    device: torch.device | str = "cpu",
    vector_params: Sequence[str] = (),
) -> Tensor:
    """θ for one key: θ0 + λ · mean_i STAR(τ_i) on matrix parameters, θ0 + λ · mean_i τ_i elsewhere."""
    if is_matrix_param(inputs.key, inputs.base, vector_params):
        total = torch.zeros(inputs.base.shape, dtype=inputs.base.dtype, device=device)
        for tau in inputs.task_vectors:
            total += star_truncate(tau.to(device), eta)
        delta = total.cpu()
    else:
        delta = torch.stack(inputs.task_vectors).sum(dim=0)
    return inputs.base + scaling * (delta / inputs.count)


def star_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    eta: float,
    scaling: float,
    device: torch.device | str = "cpu",
    vector_params: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> StateDict:
    """θ0 + scaling · mean_i STAR(θ_i − θ0) (see the module docstring); ``vector_params``: fnmatch patterns of
    2-D parameters merged as plain vectors. Deterministic: ``generator`` is unused."""
    fn = partial(star_tensor, eta=eta, scaling=scaling, device=device, vector_params=vector_params)
    return merge_tensorwise(base, experts, fn, generator=generator)


@register_method(
    "star",
    family="data-free",
    params=StarParams,
    description="Truncate each task vector's spectrum to η% of its nuclear norm, rescale, average (Lee et al. 2025)",
)
def merge(ctx: MergeContext, p: StarParams) -> StateDict:
    return star_merge(
        ctx.pretrained(),
        ctx.experts(),
        eta=p.eta,
        scaling=p.scaling,
        device=ctx.device,
        vector_params=ctx.problem.vector_params,
        generator=ctx.generator,
    )
