"""DELLA-Merging (Deep, Bhardwaj & Poria 2024, *DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling*, arXiv 2406.11617): Drop (MagPrune), Elect, fuse, with λ.

For each tensor and task vector τ_i = θ_i − θ0 (as mergekit's ``sparsify.della_magprune`` and its ``della`` /
``della_linear`` merge methods, MK @a6e4028):

1. Rows. A tensor of ndim ≥ 2 is ranked along dim 1 separately for every index of the other dims (a 2-D
   [out, in] weight: within each output row; a GPT-2 Conv1D [in, out]: within each input's fan-out, since
   mergekit also uses dim 1 whatever the layout; a 4-D conv: along in-channels for each (out, h, w)). A 1-D
   tensor is one row. A 0-D tensor is a 1 × 1 row (mergekit fails on 0-D tensors).
2. Rank: r = 1 + position of |τ| in ``torch.argsort(|τ|, dim=1)`` (ascending, torch's default unstable sort,
   the reference's own call, so ties rank as mergekit ranks them); rn = (r − min r)/(max r − min r), clamped
   to [0, 1], i.e. (r − 1)/(n − 1) for a row of n. A row of one entry gets rn = 1/2 (mergekit divides 0 by 0
   there and then fails in torch.bernoulli): its keep probability is the density.
3. Keep probability p = (density − ε) + rn · 2 · ε (that float expression, in the work dtype), so p runs from
   density − ε (smallest |τ| of the row) to density + ε (largest); the mean over a row is the density.
4. m ~ Bernoulli(p) with ``torch.bernoulli(p, generator=...)``; δ_i = τ_i · m, rescaled by ``rescale``:
   ``"l1"`` (mergekit, default): δ_i ·= ‖τ_i‖₁ / ‖δ_i‖₁ over the whole tensor, unless either norm is
   < 1e−7 (then δ_i is left unscaled); ``"inverse_keep"`` (the paper's Eq. and the authors' release,
   declare-lab/della ``rank_magnitude``): δ_i = τ_i · m / p entrywise; ``"none"``.
5. Fuse (:func:`methods.breadcrumbs.mergekit_combine`, weights w_i = 1): ``consensus="ties"`` (mergekit
   ``della``): elected sign = +1 where Σ_i w_i δ_i ≥ 0 else −1, keep the w_i δ_i whose sign equals it, divide
   their sum by the sum of their w_i (1 where none agree); ``consensus="none"`` (mergekit ``della_linear``):
   the plain weighted sum Σ_i w_i δ_i, not divided. Then multiply by λ when λ ≠ 1; θ = θ0 + that.

``density = 1`` prunes nothing and does not rescale (mergekit's early return), ``density = 0`` drops
everything; otherwise ε < density < 1 − ε is required (mergekit raises a ValueError there too).

Randomness: only from the generator given (the run's ``torch.Generator`` seeded with the run seed), one
``torch.bernoulli`` call per (tensor, task), tensors in sorted key order and tasks in order, so two runs with
the same seed are bit-identical and the global RNG is untouched. mergekit draws from torch's global RNG in its
own tensor order, so the two are not bit-identical in general. (For one tensor, or the same tensor order,
seeding the global RNG with s for mergekit and passing ``torch.Generator().manual_seed(s)`` here draws the
same masks: torch.bernoulli consumes either generator identically.)

Defaults [density = 0.7, ε = 0.15, λ = 1, consensus = ties, rescale = l1]: ε, λ, the L1 rescale and TIES
consensus are mergekit's ``della`` defaults (methods-wave2.md); mergekit's density default is 1, which would
prune nothing, so density = 0.7 is the authors' example command (declare-lab/della README: drop rate 0.3; it
also uses window 0.14, i.e. ε = 0.07, and λ = 1.1). With ``consensus="none"`` the K deltas are summed, so
choose λ near task arithmetic's (≈ 0.3 for eight CLIP tasks).

Differences from mergekit besides the RNG and the 0-D / one-entry rows above: everything is computed in fp32
(fp64 stays fp64) and written in the base's dtype, while mergekit forms task vectors and fuses in the model's
dtype and prunes fp64 in fp32 and bf16 in bf16. For fp32 inputs and the same generator seed, :func:`della_prune`
was checked bit for bit against mergekit's ``sparsify.della_magprune`` (1-4 dims, with and without tied
magnitudes, rescale l1 and none); the fusion repeats ``GTATask.execute``'s operations in the same order.
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
from methods.breadcrumbs import CONSENSUS, mergekit_combine

RESCALES = ("l1", "inverse_keep", "none")
L1_EPSILON = 1e-7  # mergekit's rescaled_masked_tensor tolerance


def check_della(density: float, epsilon: float) -> None:
    """ValueError unless density ∈ [0, 1], ε ∈ [0, 0.5] and, for 0 < density < 1, ε < density < 1 − ε."""
    require_range("della", "density", density, 0.0, 1.0)
    require_range("della", "epsilon", epsilon, 0.0, 0.5)
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ValueError(
            f"della.epsilon={epsilon} with della.density={density}: keep probabilities density ± epsilon must lie "
            f"in (0, 1); pick epsilon < {min(density, 1 - density):g}"
        )


@dataclass(frozen=True)
class DellaParams:
    density: float = param(0.7, "mean keep probability of each task vector's entries (1 = no pruning)",
                           low=0.0, high=1.0)
    epsilon: float = param(0.15, "keep probabilities run from density − ε (smallest |τ| in a row) to density + ε",
                           low=0.0, high=0.5)
    scaling: float = param(1.0, "λ applied to the fused task vector")
    consensus: str = param("ties", "ties: sign election + disjoint mean (della); none: plain sum (della_linear)",
                           choices=CONSENSUS)
    rescale: str = param("l1", "survivors rescaled to the tensor's L1 norm (mergekit), by 1/p (paper), or not",
                         choices=RESCALES)

    def __post_init__(self) -> None:
        check_della(self.density, self.epsilon)
        require_choice("della", "consensus", self.consensus, CONSENSUS)
        require_choice("della", "rescale", self.rescale, RESCALES)


def _rows(tensor: Tensor) -> Tensor:
    """The view that is ranked along dim 1: 0-D → [1, 1], 1-D → [1, n], otherwise the tensor itself."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def della_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """p for every entry of ``tau`` (same shape): (density − ε) + rn · 2ε with rn the normalised rank of |τ|
    along dim 1 of the row view (steps 1-3 of the module docstring)."""
    rows = _rows(tau)
    magnitudes = rows.abs()
    if rows.shape[1] == 1:
        rank_norm = torch.full_like(magnitudes, 0.5)
    else:
        order = torch.argsort(magnitudes, dim=1, descending=False)
        # the inverse permutation of each row (what mergekit's order.argsort(dim=1) computes), without a sort
        positions = torch.arange(rows.shape[1]).view((1, -1) + (1,) * (rows.dim() - 2)).expand_as(order)
        ranks = torch.empty_like(order).scatter_(1, order, positions).to(rows.dtype) + 1
        low = ranks.min(dim=1, keepdim=True).values
        high = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    probabilities = (density - epsilon) + rank_norm * 2 * epsilon
    return probabilities.reshape(tau.shape)


def della_rescale(tau: Tensor, mask: Tensor, probabilities: Tensor, rescale: str) -> Tensor:
    """δ = τ · m, rescaled (step 4): ``l1`` to ‖τ‖₁ over the tensor, ``inverse_keep`` by 1/p, ``none``."""
    masked = tau * mask
    if rescale == "inverse_keep":
        return masked / probabilities
    if rescale == "l1":
        before = tau.abs().sum()
        after = masked.abs().sum()
        if before < L1_EPSILON or after < L1_EPSILON:
            return masked
        return masked * (before / after)
    return masked


def della_prune(
    tau: Tensor, density: float, epsilon: float, rescale: str, generator: torch.Generator
) -> Tensor:
    """MagPrune one task vector tensor: δ (same shape), drawing one Bernoulli mask from ``generator``."""
    if density >= 1:
        return tau
    if density <= 0:
        return torch.zeros_like(tau)
    rows = _rows(tau)
    probabilities = _rows(della_keep_probabilities(tau, density, epsilon))
    mask = torch.bernoulli(probabilities, generator=generator).to(rows.dtype)
    return della_rescale(rows, mask, probabilities, rescale).reshape(tau.shape)


def della_tensor(
    inputs: TensorInputs,
    *,
    density: float,
    epsilon: float,
    scaling: float,
    consensus: str,
    rescale: str,
    weights: Sequence[float] | None = None,
    normalize: bool | None = None,
) -> Tensor:
    """θ for one key (see the module docstring)."""
    pruned = [della_prune(tau, density, epsilon, rescale, inputs.generator) for tau in inputs.task_vectors]
    return mergekit_combine(
        inputs.base,
        pruned,
        weights=weights,
        consensus=consensus,
        normalize=(consensus == "ties") if normalize is None else normalize,
        scaling=scaling,
    )


def della_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    density: float,
    epsilon: float,
    scaling: float,
    consensus: str = "ties",
    rescale: str = "l1",
    weights: Sequence[float] | None = None,
    normalize: bool | None = None,
    generator: torch.Generator | None = None,
) -> StateDict:
    """θ0 + λ · fuse(MagPrune(τ_i)). ``weights`` (default all 1) and ``normalize`` (default: True for
    ``consensus="ties"``, False for ``"none"``, mergekit's defaults) exist for comparisons with mergekit.
    Without a generator the driver's fixed-seed (0) generator is used."""
    check_della(density, epsilon)
    require_choice("della", "consensus", consensus, CONSENSUS)
    require_choice("della", "rescale", rescale, RESCALES)
    if weights is not None and len(weights) != len(experts):
        raise ValueError(f"della: {len(weights)} weights for {len(experts)} experts")
    fn = partial(della_tensor, density=density, epsilon=epsilon, scaling=scaling, consensus=consensus,
                 rescale=rescale, weights=weights, normalize=normalize)
    return merge_tensorwise(base, experts, fn, generator=generator)


@register_method(
    "della",
    family="data-free",
    params=DellaParams,
    description="Magnitude-ranked random pruning with rescaling, sign election, disjoint mean "
    "(Deep et al. 2024)",
)
def merge(ctx: MergeContext, p: DellaParams) -> StateDict:
    return della_merge(ctx.pretrained(), ctx.experts(), density=p.density, epsilon=p.epsilon, scaling=p.scaling,
                       consensus=p.consensus, rescale=p.rescale, generator=ctx.generator)
