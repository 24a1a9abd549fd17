"""DARE: Drop And REscale (Yu et al. 2024, *Language Models are Super Mario*, Eq. 2-3), followed by task
arithmetic (``dare_ta``) or TIES (``dare_ties``) on the sparsified task vectors.

    m_i ~ Bernoulli(p) elementwise,   τ̃_i = rescale((1 − m_i) ⊙ τ_i),   τ_i = θ_i − θ0

- ``rescale="inverse_keep"``: τ̃_i = (1 − m_i) ⊙ τ_i / (1 − p) (the paper, FusionBench);
  ``"l1"``: per tensor and expert, the survivors are scaled so that ‖τ̃_i‖₁ = ‖τ_i‖₁ (mergekit's choice;
  if nothing survives the tensor's τ̃_i is 0); ``"none"``: survivors are kept as they are.
- ``dare_ta``:   θ = θ0 + λ Σ_i τ̃_i                     [p = 0.5, λ = 0.3: FusionBench's CLIP config]
- ``dare_ties``: θ = θ0 + λ · TIES-merge(τ̃_1..τ̃_K)      [p = 0.5, k = 20, global trim, dis-sum, λ = 0.5:
  FusionBench's DareTiesMerging config]; TIES exactly as in ``methods/ties.py`` (its trim ranks the
  rescaled τ̃_i, dropped entries included as zeros).

Randomness (reproducible, never the global RNG). A CPU ``torch.Generator`` seeded with the run seed draws
``torch.randint(0, 2**32, (K, 2))``: expert i's main and tie-break seeds, each seeding its own generator.
Each entry uses m random bits, m the smallest of 1, 2, 4, 8 with p·2^m an integer, else 8 (p = 0.5 → 1 bit,
p = 0.9 → 8). For every mergeable tensor, in the state dict's key order, expert i's main generator fills
⌈n·m/64⌉ int64 words with ``random_(-2**63, None)``; read as one little-endian bit string (least
significant bit of word 0 first), entry j of the flattened tensor gets u1_j = the m-bit number at bit offset
m·j (leftover bits are discarded). With P = ⌈p · 2³²⌉ = 2^(32−m)·t1 + t2, entry j is kept iff u1_j > t1, or
u1_j = t1 and u2_j ≥ t2, where u2_j is the low 32−m bits of the next int64 word of the tie-break generator,
drawn only for such j, in entry order (only when t2 > 0, i.e. when p·256 is not an integer). That is exactly
P(keep) = 1 − P / 2³² (p at 2⁻³² resolution); for p = 0.5 the rule is simply "keep iff the bit is 1".
Masks do not depend on how tensors are split into blocks, and ``dare_ties`` replays them in its second pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bench.buffers import Scratch
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_choice, require_range
from bench.task_vectors import (
    BLOCK_COLUMNS,
    PlainTaskVectors,
    check_experts,
    column_blocks,
    merge_summed,
    work_dtype,
)
from methods.ties import TIES_MERGES, TRIM_SCOPES, ties_merge_task_vectors

RESCALES = ("inverse_keep", "l1", "none")


class KeepMasks:
    """Expert i's keep-mask stream (the rule in the module docstring): Bernoulli(1 − p) per entry."""

    def __init__(self, p: float, main_seed: int, tie_seed: int) -> None:
        self.bits = next((bits for bits in (1, 2, 4) if (p * 2**bits).is_integer()), 8)
        self.threshold, self.tie_threshold = divmod(math.ceil(p * 2**32), 1 << (32 - self.bits))
        self.main = torch.Generator().manual_seed(main_seed)
        self.tie = torch.Generator().manual_seed(tie_seed)
        self._start = self.state()

    def state(self) -> tuple[Tensor, Tensor]:
        return self.main.get_state(), self.tie.get_state()

    def restore(self, state: tuple[Tensor, Tensor]) -> None:
        self.main.set_state(state[0])
        self.tie.set_state(state[1])

    def rewind(self) -> None:
        self.restore(self._start)

    def draw(self, count: int, scratch: Scratch) -> np.ndarray:
        """The next ``count`` keep decisions of this stream (a bool array valid until the next draw)."""
        words = scratch.get("words", (-(-count * self.bits // 64),), torch.int64)
        words.random_(-(2**63), None, generator=self.main)
        values = self._unpack(words.view(torch.uint8).numpy())[:count]
        keep = scratch.get("keep", (count,), torch.bool).numpy()
        if self.threshold >= 1 << self.bits:
            keep.fill(False)
        elif self.tie_threshold == 0:
            np.greater_equal(values, self.threshold, out=keep)
        else:
            np.greater(values, self.threshold, out=keep)
            boundary = np.flatnonzero(values == self.threshold)
            if boundary.size:
                tie_words = torch.empty(boundary.size, dtype=torch.int64)
                tie_words.random_(-(2**63), None, generator=self.tie)
                low_bits = tie_words.numpy() & ((1 << (32 - self.bits)) - 1)
                keep[boundary] = low_bits >= self.tie_threshold
        return keep

    def _unpack(self, data: np.ndarray) -> np.ndarray:
        """The m-bit numbers of a little-endian byte string, in order."""
        if self.bits == 8:
            return data
        if self.bits == 1:
            return np.unpackbits(data, bitorder="little")
        per_byte, low_mask = 8 // self.bits, (1 << self.bits) - 1
        values = np.empty((data.size, per_byte), dtype=np.uint8)
        for slot in range(per_byte):
            np.bitwise_and(np.right_shift(data, slot * self.bits), low_mask, out=values[:, slot])
        return values.reshape(-1)


class DareTaskVectors:
    """τ̃_i block by block (a :class:`bench.task_vectors.TaskVectorSource`): plain τ_i, masked, rescaled."""

    def __init__(
        self, base: StateDict, experts: Sequence[StateDict], *, p: float, rescale: str, seed: int
    ) -> None:
        self.base = base
        self.count = len(experts)
        self.plain = PlainTaskVectors(base, experts)
        self.p, self.rescale = p, rescale
        seeds = torch.randint(0, 2**32, (self.count, 2), generator=torch.Generator().manual_seed(seed))
        self.masks = [KeepMasks(p, int(main), int(tie)) for main, tie in seeds.tolist()]
        self.scratch = Scratch()
        self._scales = [1.0 / (1.0 - p) if rescale == "inverse_keep" else 1.0] * self.count

    @property
    def streamed(self) -> bool:
        return self.plain.streamed

    def base_flat(self, key: str) -> Tensor:
        return self.plain.base_flat(key)

    def rewind(self) -> None:
        for stream in self.masks:
            stream.rewind()

    def fill(self, key: str, start: int, stop: int, out: Tensor) -> Tensor:
        self._begin_block(key, start)
        for index, row in enumerate(out):
            self._masked_difference(key, index, start, stop, row).mul_(self._scales[index])
        return out

    def accumulate(self, key: str, start: int, stop: int, out: Tensor, scratch: Scratch) -> Tensor:
        self._begin_block(key, start)
        total, difference = out.numpy(), scratch.get("difference", (stop - start,), out.dtype)
        common_scale = len(set(self._scales)) == 1
        for index in range(self.count):
            masked = self._masked_difference(key, index, start, stop, out if index == 0 else difference)
            if not common_scale:
                masked.mul_(self._scales[index])
            if index:
                np.add(total, masked.numpy(), out=total)
        return out.mul_(self._scales[0]) if common_scale else out

    def _begin_block(self, key: str, start: int) -> None:
        if start % 64:
            raise ValueError("DARE blocks must start at multiples of 64 entries (whole random words)")
        if start == 0 and self.rescale == "l1":
            self._scales = self._l1_scales(key)

    def _masked_difference(self, key: str, index: int, start: int, stop: int, out: Tensor) -> Tensor:
        """``out = (1 − m_index) ⊙ τ_index`` over ``[start, stop)`` of ``key``, drawing the mask."""
        self.plain.difference(key, index, start, stop, out)
        keep = self.masks[index].draw(stop - start, self.scratch)
        np.multiply(out.numpy(), keep, out=out.numpy())
        return out

    def _l1_scales(self, key: str) -> list[float]:
        """‖τ_i‖₁ / ‖kept τ_i‖₁ for this tensor (1 when nothing is kept), replaying the streams afterwards."""
        states = [stream.state() for stream in self.masks]
        dense_norms = torch.zeros(self.count, dtype=torch.float64)
        kept_norms = torch.zeros(self.count, dtype=torch.float64)
        base_flat = self.plain.base_flat(key)
        for start, stop in column_blocks(base_flat.numel(), BLOCK_COLUMNS):
            row = self.scratch.get("l1", (stop - start,), work_dtype(base_flat.dtype))
            for index in range(self.count):
                dense_norms[index] += float(self.plain.difference(key, index, start, stop, row).abs().sum())
                kept_norms[index] += float(self._masked_difference(key, index, start, stop, row).abs().sum())
        for stream, state in zip(self.masks, states, strict=True):
            stream.restore(state)
        scales = torch.where(kept_norms > 0, dense_norms / kept_norms, torch.ones_like(dense_norms))
        return scales.tolist()

    def sample(self, key: str, positions: Tensor) -> Tensor:
        # Only places the search band of the exact top-k, so an independent (fixed-seed) mask draw with the
        # same statistics stands in for the real masks, and 1/(1-p) for the L1 scales.
        values = self.plain.sample(key, positions)
        generator = torch.Generator().manual_seed(0)
        values.mul_(torch.rand(values.shape, generator=generator) >= self.p)
        return values if self.rescale == "none" else values.div_(1.0 - self.p)


def dare_task_vectors(
    base: StateDict, experts: Sequence[StateDict], *, p: float, rescale: str, seed: int
) -> DareTaskVectors:
    check_experts(base, experts)
    _check_drop("dare", p, rescale)
    return DareTaskVectors(base, experts, p=p, rescale=rescale, seed=seed)


def dare_ta_merge(
    base: StateDict, experts: Sequence[StateDict], *, p: float, rescale: str, scaling: float, seed: int
) -> StateDict:
    """θ0 + scaling · Σ_i τ̃_i."""
    return merge_summed(dare_task_vectors(base, experts, p=p, rescale=rescale, seed=seed), scaling=scaling)


def dare_ties_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    p: float,
    rescale: str,
    k: float,
    trim_scope: str,
    merge: str,
    scaling: float,
    seed: int,
    notes: dict | None = None,
) -> StateDict:
    """θ0 + scaling · TIES(τ̃_1..τ̃_K) (TIES as in ``methods/ties.py``)."""
    source = dare_task_vectors(base, experts, p=p, rescale=rescale, seed=seed)
    return ties_merge_task_vectors(
        source, k=k, trim_scope=trim_scope, merge=merge, scaling=scaling, notes=notes
    )


def _check_drop(method: str, p: float, rescale: str) -> None:
    require_range(method, "p", p, 0.0, 1.0)
    if p >= 1.0:
        raise ValueError(f"{method}.p={p} drops every entry; use p < 1 (e.g. --set {method}.p=0.9)")
    require_choice(method, "rescale", rescale, RESCALES)


@dataclass(frozen=True)
class DareTaParams:
    p: float = param(0.5, "drop probability of each task-vector entry (< 1)", low=0.0, high=1.0)
    rescale: str = param(
        "inverse_keep", "survivors × 1/(1−p), L1-matched per tensor, or none", choices=RESCALES
    )
    scaling: float = param(0.3, "λ in θ0 + λ Σ τ̃_i")

    def __post_init__(self) -> None:
        _check_drop("dare_ta", self.p, self.rescale)


@dataclass(frozen=True)
class DareTiesParams:
    p: float = param(0.5, "drop probability of each task-vector entry (< 1)", low=0.0, high=1.0)
    rescale: str = param(
        "inverse_keep", "survivors × 1/(1−p), L1-matched per tensor, or none", choices=RESCALES
    )
    k: float = param(
        20.0, "TIES: percent of each sparsified task vector kept (by magnitude)", low=0.0, high=100.0
    )
    trim_scope: str = param(
        "global", "TIES: rank magnitudes over the whole model or per tensor", choices=TRIM_SCOPES
    )
    merge: str = param("sum", "TIES: combine agreeing entries by sum or mean", choices=TIES_MERGES)
    scaling: float = param(0.5, "λ in θ0 + λ · merged")

    def __post_init__(self) -> None:
        _check_drop("dare_ties", self.p, self.rescale)
        require_range("dare_ties", "k", self.k, 0.0, 100.0)
        require_choice("dare_ties", "trim_scope", self.trim_scope, TRIM_SCOPES)
        require_choice("dare_ties", "merge", self.merge, TIES_MERGES)


@register_method(
    "dare_ta",
    family="data-free",
    params=DareTaParams,
    description="Randomly drop and rescale task-vector entries, then task arithmetic (Yu et al. 2024)",
)
def merge_dare_ta(ctx: MergeContext, p: DareTaParams) -> StateDict:
    return dare_ta_merge(
        ctx.pretrained(), ctx.experts(), p=p.p, rescale=p.rescale, scaling=p.scaling, seed=ctx.seed
    )


@register_method(
    "dare_ties",
    family="data-free",
    params=DareTiesParams,
    description="Randomly drop and rescale task-vector entries, then TIES (Yu et al. 2024)",
)
def merge_dare_ties(ctx: MergeContext, p: DareTiesParams) -> StateDict:
    return dare_ties_merge(
        ctx.pretrained(),
        ctx.experts(),
        p=p.p,
        rescale=p.rescale,
        k=p.k,
        trim_scope=p.trim_scope,
        merge=p.merge,
        scaling=p.scaling,
        seed=ctx.seed,
        notes=ctx.notes,
    )
