"""PCB-Merging (Du et al. 2024, *Parameter Competition Balancing for Model Merging*, arXiv 2410.02396, Sec. 3),
as the authors' ``vision_source_code/pcb_ES.py:PCB`` computes it (repo duguodong7/pcb-merging).

T is the [N, d] matrix of the N task vectors τ_i = θ_i − θ0 over every mergeable (floating-point) entry of the
model; "row i" is task i over the whole model, so every quantile, min and max below is model-wide per task.
With sort_i(x)[j] the j-th smallest entry (0-based) of row i of x:

    1. clip:       lo_i = sort_i(|T|)[⌊d·c⌋],  hi_i = sort_i(|T|)[⌊d·(1 − c) − 1⌋]      [c = clip = 0.01]
                   A = clamp(|T|, lo_i, hi_i),   T̃ = sign(T) ⊙ A
    2. normalise:  mm(A)_i = (A_i − lo_i) / (hi_i − lo_i)  (the row's min-max: after the clamp lo_i and hi_i
                   are the row's min and max),   T̂ = sign(T) ⊙ mm(A)
    3. intra:      intra = exp(N · mm(A)²)
    4. inter:      inter_i = Σ_j tanh(T̂_i ⊙ T̂_j), j = 1..N including j = i
    5. balance:    β = intra ⊙ inter;  b_i = sort_i(β)[⌊d·(1 − r)⌋],  B_i = max_i(β)
                   scale_i = (max(β_i, b_i) − b_i) / (B_i − b_i)                           [r = ratio = 0.05]
    6. merge:      θ = θ0 + Σ_i (λ·T̃_i) ⊙ scale_i / max(Σ_i scale_i, 1e−12)              [λ = scaling = 1.2]

Defaults r = 0.05 and λ = 1.2 for every task are ``pcb_ES.py``'s (methods-wave2.md, "PCB-Merging"); c = 0.01 is
hard-coded there and is a parameter here. The indices are the reference's Python expressions evaluated the same
way (``int(d * ratio)``-style float arithmetic, truncation), so the quantiles are the same sorted entries, not an
interpolated ``torch.quantile``. Consequences kept from the reference: only entries strictly above b_i get a
non-zero scale, so each task keeps d − ⌊d(1 − r)⌋ − 1 entries (fewer with ties at b_i; none when that is 0, e.g.
d = 20 at r = 0.05); entries whose scale is 0 for every task stay at θ0.

Differences from the reference, all deliberate:
- The paper's ES variant (λ_i searched in [0.8, 1.3] by nevergrad NGOpt, budget 100, on a labeled validation
  split) is not this method: it needs labeled data. Here every task gets the same fixed λ (``scaling``).
- A degenerate min-max (hi_i = lo_i, e.g. a zero task vector or a row >99% zeros; or B_i = b_i) is 0/0 = NaN in
  the reference; here that normalisation is 0 (the task then contributes nothing).
- An index ⌊d(1 − r)⌋ that float rounding pushes to d (r below ~1e−16) is taken as d − 1 (the reference fails).
- Integer buffers are copied from the base (the reference flattens every entry; its CLIP checkpoints have none).
- Nothing is flattened or sorted: the exact order statistics come from :func:`bench.selection.kth_largest_rows`
  (the j-th smallest of d entries is the (d − j)-th largest) over the model read block by block: one multi-pass
  scan for lo_i/hi_i, one for b_i/B_i (recomputing β per block), then the merge (``merge_tensorwise``), so the
  memory is that of a streamed method. β is recomputed on the same blocks in the same way in both later passes,
  so the values compared with b_i are bit-identical to those ranked.
Arithmetic is in fp32 (fp64 stays fp64); the result is written in the base's dtype. Sorted-key order does not
matter to the math (everything is elementwise or an order statistic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench.buffers import Scratch
from bench.model_pool import dtype_of, shape_of
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_range
from bench.selection import kth_largest_rows
from bench.task_vectors import (
    BLOCK_COLUMNS,
    PlainTaskVectors,
    check_experts,
    column_blocks,
    mergeable_keys,
    work_dtype,
)
from bench.tensorwise import TensorInputs, merge_tensorwise

SCALE_FLOOR = 1e-12
"""The reference's lower bound on Σ_i scale_i in the final division."""


@dataclass(frozen=True)
class PcbParams:
    ratio: float = param(0.05, "r: fraction of each task's entries kept by the balance score", low=0.0, high=1.0)
    scaling: float = param(1.2, "λ applied to every task's clipped task vector")
    clip: float = param(0.01, "c: fraction of |τ_i| clipped at each end (the reference hard-codes 0.01)",
                        low=0.0, high=0.25)

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:  # r = 0 would index past the sorted row in the reference
            raise ValueError(f"pcb.ratio={self.ratio} is outside (0, 1]; pick a value in that range")
        require_range("pcb", "clip", self.clip, 0.0, 0.25)


# ------------------------------------------------------------------------------------------------------------
# Indices of the reference's order statistics (its own float expressions)


def clip_indices(d: int, clip: float) -> tuple[int, int]:
    """0-based ascending positions of lo and hi in a row of d entries: ``int(d·c)`` and ``int(d·(1 − c) − 1)``."""
    return int(d * clip), int(d * (1 - clip) - 1)


def balance_index(d: int, ratio: float) -> int:
    """0-based ascending position of the balance threshold b: ``int(d·(1 − r))`` (at most d − 1)."""
    return min(int(d * (1 - ratio)), d - 1)


# ------------------------------------------------------------------------------------------------------------
# The math on one [N, m] block of T (pure functions)


def _column(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(list(values), dtype=like.dtype).view(-1, 1)


def min_max(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """(values − low) / (high − low) per row; 0 for a row with high = low (the reference's 0/0)."""
    span = high - low
    return (values - low) / torch.where(span > 0, span, torch.ones_like(span))


def pcb_block(tau: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """Steps 1-5 before the threshold for a ``[N, m]`` block of T with the rows' clip bounds ``[N, 1]``:
    (T̃, β)."""
    count = tau.shape[0]
    sign = torch.sign(tau)
    magnitude = torch.clamp(tau.abs(), min=low, max=high)  # A
    clipped = sign * magnitude  # T̃
    normalised = min_max(magnitude, low, high)  # mm(A)
    signed = sign * normalised  # T̂
    intra = torch.exp(count * normalised.square())
    inter = torch.stack([torch.tanh(signed[i] * signed).sum(dim=0) for i in range(count)])
    return clipped, intra * inter


def pcb_scale(balance: Tensor, threshold: Tensor, top: Tensor) -> Tensor:
    """mm(clamp(β, min=b)) per row: (max(β, b) − b) / (B − b); 0 where B = b."""
    return min_max(torch.clamp(balance, min=threshold), threshold, top)


def pcb_combine(clipped: Tensor, scale: Tensor, scaling: float) -> Tensor:
    """Σ_i (λ·T̃_i) ⊙ scale_i / max(Σ_i scale_i, 1e−12) for a block (the merged task vector)."""
    return ((clipped * scaling) * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=SCALE_FLOOR)


# ------------------------------------------------------------------------------------------------------------
# Whole-model order statistics, block by block


class _ModelRows:
    """``kth_largest_rows`` input: ``2N`` rows over all mergeable entries, rows N..2N−1 a copy of rows 0..N−1
    (two ranks per task in one scan), where each block's N rows are ``transform(T block)``."""

    def __init__(
        self, source: PlainTaskVectors, keys: Sequence[str], transform: Callable[[Tensor], Tensor], scratch: Scratch
    ) -> None:
        self.source, self.transform, self.scratch = source, transform, scratch
        self.chunks = [
            (key, start, stop) for key in keys for start, stop in column_blocks(shape_of(source.base, key).numel())
        ]
        self.rows = 2 * source.count
        self.sizes = [stop - start for _, start, stop in self.chunks]
        self.clustered_sample = source.streamed
        self.dtype = torch.float64 if any(dtype_of(source.base, k) == torch.float64 for k in keys) else torch.float32

    def values(self, index: int) -> Tensor:
        key, start, stop = self.chunks[index]
        dtype = work_dtype(dtype_of(self.source.base, key))
        tau = self.source.fill(key, start, stop, self.scratch.get("tau", (self.source.count, stop - start), dtype))
        rows = self.transform(tau).to(self.dtype)
        return torch.cat([rows, rows])

    def sample(self, index: int, positions: Tensor) -> Tensor:  # guides the search only
        key, start, _ = self.chunks[index]
        rows = self.transform(self.source.sample(key, positions + start)).to(self.dtype)
        return torch.cat([rows, rows])


def _blocks(tau: Tensor, scratch: Scratch) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, block)`` with ``block`` the contiguous ``[N, stop − start]`` columns of ``tau [N, n]``,
    split exactly as :class:`_ModelRows` splits the tensor (so per-block results are bit-identical)."""
    for start, stop in column_blocks(tau.shape[1], BLOCK_COLUMNS):
        block = scratch.get("block", (tau.shape[0], stop - start), tau.dtype)
        yield start, stop, block.copy_(tau[:, start:stop])


def _merge_key(
    inputs: TensorInputs,
    *,
    bounds: tuple[list[float], list[float]],
    thresholds: tuple[list[float], list[float]],
    scaling: float,
    scratch: Scratch,
) -> Tensor:
    tau = torch.stack([vector.reshape(-1) for vector in inputs.task_vectors])
    merged = torch.empty(tau.shape[1], dtype=tau.dtype)
    low, high = _column(bounds[0], tau), _column(bounds[1], tau)
    threshold, top = _column(thresholds[0], tau), _column(thresholds[1], tau)
    for start, stop, block in _blocks(tau, scratch):
        clipped, balance = pcb_block(block, low, high)
        merged[start:stop] = pcb_combine(clipped, pcb_scale(balance, threshold, top), scaling)
    return inputs.base + merged.view(inputs.base.shape)


def pcb_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    ratio: float,
    scaling: float,
    clip: float = 0.01,
    generator: torch.Generator | None = None,
    notes: dict | None = None,
) -> StateDict:
    """θ0 + PCB(τ_1..τ_N) (module docstring); ``notes`` (optional) receives the per-task order statistics."""
    check_experts(base, experts)
    PcbParams(ratio=ratio, scaling=scaling, clip=clip)  # the same one-line errors as the registry's
    keys = mergeable_keys(base)
    count = len(experts)
    d = sum(shape_of(base, key).numel() for key in keys)
    if d == 0:
        return merge_tensorwise(base, experts, lambda inputs: inputs.base, generator=generator)
    scratch = Scratch()
    source = PlainTaskVectors(base, experts)

    j_low, j_high = clip_indices(d, clip)
    ranks = kth_largest_rows(_ModelRows(source, keys, torch.abs, scratch), [d - j_low] * count + [d - j_high] * count)
    bounds = (ranks[:count], ranks[count:])  # lo_i, hi_i

    def balance(tau: Tensor) -> Tensor:
        return pcb_block(tau, _column(bounds[0], tau), _column(bounds[1], tau))[1]

    j_balance = balance_index(d, ratio)
    ranks = kth_largest_rows(_ModelRows(source, keys, balance, scratch), [d - j_balance] * count + [1] * count)
    thresholds = (ranks[:count], ranks[count:])  # b_i, B_i
    if notes is not None:
        notes.update({"pcb_clip_low": bounds[0], "pcb_clip_high": bounds[1],
                      "pcb_balance_threshold": thresholds[0], "pcb_balance_max": thresholds[1]})
    fn = partial(_merge_key, bounds=bounds, thresholds=thresholds, scaling=scaling, scratch=scratch)
    return merge_tensorwise(base, experts, fn, generator=generator)


@register_method(
    "pcb",
    family="data-free",
    params=PcbParams,
    description="PCB-Merging: clip, intra/inter-task balance scores, keep the top r per task (Du et al. 2024)",
)
def merge(ctx: MergeContext, p: PcbParams) -> StateDict:
    return pcb_merge(ctx.pretrained(), ctx.experts(), ratio=p.ratio, scaling=p.scaling, clip=p.clip,
                     generator=ctx.generator, notes=ctx.notes)
