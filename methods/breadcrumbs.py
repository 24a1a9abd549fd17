"""Model Breadcrumbs (Davari & Belilovsky 2024, *Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks*, arXiv 2312.06795): drop both tails of every task vector's magnitudes, then task arithmetic.

    τ̃_i = m_i ⊙ τ_i,   m_i keeps the "middle" of |τ_i| within each tensor (drop the top γ and the bottom
                          1 − density − γ of the entries),
    θ   = θ0 + λ Σ_i w_i τ̃_i                                        (w_i = 1 in the registered method)

Selection rule, per tensor and task, exactly as mergekit's ``sparsify.magnitude_outliers`` (MK @a6e4028), so that
our output equals mergekit's bit for bit on identical fp32 inputs (:func:`breadcrumbs_sparsify` with
``mergekit_empty_slice=True`` was checked against it on 1-4-dim tensors with and without tied magnitudes; the
fusion repeats ``GTATask.execute``'s operations in the same order):

- ``density >= 1``: τ_i is kept whole (γ is then ignored, as in mergekit).
- Otherwise, with N = the tensor's number of entries and Python float products truncated by ``int``:
  target = int(density · N), n_top = int(γ · N), n_bot = N − target − n_top; if n_bot < 0 then
  n_top += n_bot and n_bot = 0 (the top cut shrinks so that ``target`` entries survive). Note the float
  product: density = 0.29 of N = 100 keeps int(28.999…) = 28 entries, not 29.
- Entries are ranked by ``torch.sort(|τ_i|.float().flatten())`` (ascending; torch's default, *unstable* sort,
  the reference's own call) and positions n_bot … N − n_top − 1 of that order are kept. So exactly
  N − n_bot − n_top entries survive; among entries of equal magnitude at a cut, which ones survive is
  whatever order that torch.sort call returns (a deterministic function of the input for a given torch build,
  identical to mergekit's choice; for more than 16 entries it is not index order).
- τ̃_i = τ_i · mask (a float mask, as in mergekit, so dropped entries are τ_i · 0).

mergekit @a6e4028 kept ``indices[n_bot:-n_top]``, which is empty when n_top = 0 (γ·N < 1, e.g. γ = 0.01 on a tensor
of fewer than 100 entries, or γ = 0), so such tensors lost their whole task vector; mergekit 0.1.5 keeps
``indices[n_bot:n_bot + target]`` and agrees with ours bit for bit there too (``tox -e peers``). Here n_top = 0
removes no top entries. ``breadcrumbs_merge(..., mergekit_empty_slice=True)`` reproduces the older behaviour. (No
tensor of CLIP ViT-B/32 has fewer than 768 entries, so with γ = 0.01 the two agree there.)

The merge step is mergekit's generalized task arithmetic (:func:`mergekit_combine`): stack the τ̃_i, multiply by
w_i, sum over tasks (``consensus="ties"``: mergekit's ``breadcrumbs_ties``, i.e. keep only entries whose sign
equals sign(Σ_i w_i τ̃_i) with a zero sum counting as +, and sum those — not divided by the weights unless
``normalize``), multiply by λ when λ ≠ 1, add to θ0.

Defaults [density = 0.1, γ = 0.01, λ = 0.3, consensus = none] are a harness choice (methods-wave2.md gives
mergekit's density = 1, which prunes nothing and makes the method task arithmetic with λ = 1):
- density/γ: the paper works at high sparsity. The authors' code (rezazzr/breadcrumbs,
  ``find_best_hyperparam.py``) searches the kept fraction in [0.05, 0.20] and the top cut in [0.001, 0.01]; a
  third-party reimplementation reads the paper as "β = 90% bottom, top 1%" (mttl ``ModelBreadcrumbsConfig``).
  We keep 10% and drop the top 1% (γ = 0.01 is also mergekit's default). The paper's own ViT-B/32 setting
  could not be read here: *unverified*.
- λ = 0.3: the sum of K sparsified vectors is scaled like this harness's other summing methods (task
  arithmetic, TIES dis-sum on the CLIP ViT-B/32 eight-task benchmark); the authors search λ in [0.01, 1].
The reference (authors') code ranks along the last dimension of each tensor (per row) and removes the top
entries before keeping the top ``density`` of the rest; mergekit (followed here) ranks over the whole tensor.

Everything runs per tensor through :func:`bench.tensorwise.merge_tensorwise` (fp32; fp64 stays fp64; written in
the base's dtype; integer buffers copied from the base). mergekit computes in the model's dtype, so fp16/bf16
models can differ from it in the last bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_choice, require_range
from bench.tensorwise import TensorInputs, merge_tensorwise

CONSENSUS = ("none", "ties")


@dataclass(frozen=True)
class BreadcrumbsParams:
    density: float = param(0.1, "fraction of each tensor's task-vector entries kept (1 = no pruning)", low=0.0,
                           high=1.0)
    gamma: float = param(0.01, "fraction of largest-magnitude entries removed (shrinks if 1 − density < γ)",
                         low=0.0, high=1.0)
    scaling: float = param(0.3, "λ in θ0 + λ Σ_i τ̃_i")
    consensus: str = param("none", "none: plain sum (breadcrumbs); ties: keep sign-agreeing entries "
                           "(mergekit breadcrumbs_ties)", choices=CONSENSUS)

    def __post_init__(self) -> None:
        require_range("breadcrumbs", "density", self.density, 0.0, 1.0)
        require_range("breadcrumbs", "gamma", self.gamma, 0.0, 1.0)
        require_choice("breadcrumbs", "consensus", self.consensus, CONSENSUS)


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, n_top): how many of the smallest and of the largest magnitudes are dropped (density < 1)."""
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = numel - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    return n_bot, n_top


def breadcrumbs_mask(tau: Tensor, density: float, gamma: float, *, mergekit_empty_slice: bool = False) -> Tensor:
    """The keep mask (1/0, in ``tau``'s dtype and shape) of one task vector tensor; all ones when density ≥ 1."""
    mask = torch.zeros_like(tau)
    if density >= 1:
        return mask.fill_(1)
    numel = tau.numel()
    n_bot, n_top = breadcrumbs_counts(numel, density, gamma)
    if n_top == 0 and mergekit_empty_slice:
        return mask
    order = torch.sort(tau.abs().reshape(-1).float(), descending=False).indices
    mask.view(-1)[order[n_bot : numel - n_top]] = 1
    return mask


def breadcrumbs_sparsify(tau: Tensor, density: float, gamma: float, *, mergekit_empty_slice: bool = False) -> Tensor:
    """τ̃ = τ · mask (the tensor itself when density ≥ 1, as in mergekit)."""
    if density >= 1:
        return tau
    return tau * breadcrumbs_mask(tau, density, gamma, mergekit_empty_slice=mergekit_empty_slice)


def mergekit_combine(
    base: Tensor,
    deltas: Sequence[Tensor],
    *,
    weights: Sequence[float] | None,
    consensus: str,
    normalize: bool,
    scaling: float,
) -> Tensor:
    """θ0 + λ · mix(w_i δ_i): mergekit's generalized task arithmetic step on sparsified task vectors.

    consensus ``"ties"``: an entry of w_i δ_i counts where its sign equals the elected sign (+1 where
    Σ_i w_i δ_i ≥ 0, else −1; zero entries never count), mix = Σ of counted entries and the divisor is Σ of
    the counted w_i (0 → 1). ``"none"``: mix = Σ_i w_i δ_i and the divisor is Σ_i w_i (|·| < 1e−8 → 1).
    ``normalize`` divides mix by the divisor. λ multiplies only when λ ≠ 1 (as mergekit does).
    """
    stacked = torch.stack(list(deltas), dim=0)
    w = torch.tensor([1.0] * len(deltas) if weights is None else list(weights), dtype=stacked.dtype)
    while w.dim() < stacked.dim():
        w = w.unsqueeze(-1)
    weighted = stacked * w
    if consensus == "ties":
        elected = (weighted.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
        agree = weighted.sign() == elected
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if scaling != 1:
        mixed = mixed * scaling
    return base + mixed


def breadcrumbs_tensor(
    inputs: TensorInputs,
    *,
    density: float,
    gamma: float,
    scaling: float,
    consensus: str,
    weights: Sequence[float] | None = None,
    normalize: bool = False,
    mergekit_empty_slice: bool = False,
) -> Tensor:
    """θ for one key (see the module docstring)."""
    sparse = [
        breadcrumbs_sparsify(tau, density, gamma, mergekit_empty_slice=mergekit_empty_slice)
        for tau in inputs.task_vectors
    ]
    return mergekit_combine(inputs.base, sparse, weights=weights, consensus=consensus, normalize=normalize,
                            scaling=scaling)


def breadcrumbs_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    density: float,
    gamma: float,
    scaling: float,
    consensus: str = "none",
    weights: Sequence[float] | None = None,
    normalize: bool = False,
    mergekit_empty_slice: bool = False,
    generator: torch.Generator | None = None,
) -> StateDict:
    """θ0 + λ Σ_i w_i τ̃_i (``consensus="ties"``: sign-agreeing entries only). ``weights`` (default all 1),
    ``normalize`` and ``mergekit_empty_slice`` exist for comparisons with mergekit; the method is deterministic
    (``generator`` is accepted for a uniform signature and unused)."""
    require_range("breadcrumbs", "density", density, 0.0, 1.0)
    require_range("breadcrumbs", "gamma", gamma, 0.0, 1.0)
    require_choice("breadcrumbs", "consensus", consensus, CONSENSUS)
    if weights is not None and len(weights) != len(experts):
        raise ValueError(f"breadcrumbs: {len(weights)} weights for {len(experts)} experts")
    fn = partial(breadcrumbs_tensor, density=density, gamma=gamma, scaling=scaling, consensus=consensus,
                 weights=weights, normalize=normalize, mergekit_empty_slice=mergekit_empty_slice)
    return merge_tensorwise(base, experts, fn, generator=generator)


@register_method(
    "breadcrumbs",
    family="data-free",
    params=BreadcrumbsParams,
    description="Drop each task vector's largest and smallest magnitudes per tensor, then task arithmetic "
    "(Davari & Belilovsky 2024)",
)
def merge(ctx: MergeContext, p: BreadcrumbsParams) -> StateDict:
    return breadcrumbs_merge(ctx.pretrained(), ctx.experts(), density=p.density, gamma=p.gamma, scaling=p.scaling,
                             consensus=p.consensus, generator=ctx.generator)
