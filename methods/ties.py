"""TIES-Merging (Yadav et al. 2023, *TIES-Merging: Resolving Interference When Merging Models*, Sec. 3 /
Algorithm 1): trim, elect sign, disjoint merge.

    1. trim: τ̂_i keeps the entries of τ_i = θ_i − θ0 whose magnitude is at least t_i, the n-th largest |τ_i|,
       n = ⌊N · k / 100⌋; the rest are set to 0. Entries tied with t_i are all kept (the reference code's
       ``|τ| >= kthvalue`` rule), so slightly more than n can survive; n = 0 keeps nothing.
       ``trim_scope="global"`` ranks over all N entries of the model (the original code, MergeBench,
       FusionBench); ``"per_tensor"`` ranks within each tensor, N = its size (mergekit).
       (The reference computes its threshold with ``kthvalue(N − n)``, i.e. the (n+1)-th largest; here it is
       the n-th largest, so exactly n survive when there are no ties.)
    2. elect: γ = sign(Σ_i τ̂_i), the sign with more total mass. Where that sum is exactly 0 although some τ̂_i
       are nonzero, γ is the model-wide majority sign sign(#{γ > 0} − #{γ < 0}), as in the reference code
       (``resolve_zero_signs(..., "majority")``); if that count is itself tied such entries stay 0.
    3. disjoint merge: over the i with sign(τ̂_i) = γ, ``merge="mean"`` (the paper's dis-mean: their sum over
       how many are nonzero) or ``"sum"`` (dis-sum); entries where no expert agrees (all τ̂_i = 0) stay 0.
    4. θ = θ0 + λ · merged.

Defaults [k = 20, trim_scope = global, merge = sum, λ = 0.3] are those of the published CLIP ViT-B/32
eight-task rows (AdaMerging, FusionBench, MergeBench: global top-20%, dis-sum, λ = 0.3); the paper's own
dis-mean is ``merge=mean`` and needs a larger λ (around 1).

Exact thresholds come from :func:`bench.selection.kth_largest_rows` (no flattening, sorting or kthvalue over
the model); everything is done block by block in fp32 (fp64 stays fp64) and written in the base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bench.buffers import Scratch, numpy_compatible
from bench.model_pool import shape_of
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_choice, require_range
from bench.selection import keep_count, kth_largest_rows, next_float
from bench.task_vectors import (
    BLOCK_COLUMNS,
    BlockMagnitudes,
    PlainTaskVectors,
    TaskVectorMagnitudes,
    TaskVectorSource,
    check_experts,
    column_blocks,
    flat,
    mergeable_keys,
    start_output,
    work_dtype,
    write_scaled_sum,
)

TRIM_SCOPES = ("global", "per_tensor")
TIES_MERGES = ("mean", "sum")


def trim_(tau: Tensor, thresholds: Sequence[float | None]) -> Tensor:
    """Zero entries of row i whose magnitude is below ``thresholds[i]``; keep |τ| ≥ threshold (ties kept).

    A threshold of None keeps nothing, one ≤ 0 keeps everything.
    """
    magnitude = below = None
    for row, threshold in zip(tau, thresholds, strict=True):
        if threshold is None:
            row.zero_()
        elif threshold > 0 and numpy_compatible(row) and row.is_contiguous():
            # numpy's single-threaded kernels: torch's threaded hardshrink stalls ~10x when another process holds
            # a core. Zeroing where |x| < threshold keeps |x| ≥ threshold, as below.
            values = row.numpy()
            if magnitude is None:
                magnitude, below = np.empty_like(values), np.empty(values.shape, dtype=bool)
            np.less(np.abs(values, out=magnitude), values.dtype.type(threshold), out=below)
            np.copyto(values, 0, where=below)
        elif threshold > 0:
            # hardshrink keeps |x| > λ; λ = the float just below the threshold makes that |x| ≥ threshold.
            torch.hardshrink(row, next_float(threshold, row.dtype, -1), out=row)
    return tau


def disjoint_merge(trimmed: Tensor, elected: Tensor, merge: str) -> Tensor:
    """Combine, per entry, the rows whose sign equals ``elected`` (±1, or 0 = none agree → 0).

    ``merge="sum"`` adds them; ``"mean"`` divides by how many of them are nonzero (at least 1). This is the
    definition; :meth:`SignElection.merge_block` computes the same thing in fewer passes.
    """
    aligned = (trimmed * elected).clamp_(min=0)  # |τ_i| where sign(τ_i) = elected, else 0
    merged = aligned.sum(dim=0)
    if merge == "mean":
        merged.div_(aligned.sign().sum(dim=0).clamp_(min=1))
    return merged.mul_(elected)


class SignElection:
    """Elect + disjoint merge of trimmed task-vector blocks, with the reference code's rule for zero sums.

    The elected sign of an entry is sign(Σ_i trimmed τ_i). Where that sum is exactly 0 although some trimmed
    entries are nonzero (they cancel), the reference (``resolve_zero_signs(..., "majority")``) uses the sign
    that wins over the whole model: sign(#entries elected + − #entries elected −). That needs the whole model,
    so such entries are set aside here and patched by :meth:`resolve` at the end. If the model-wide count is
    itself tied, they stay 0 (the reference would fall through to averaging the negative entries).
    """

    def __init__(self, merge: str) -> None:
        if merge not in TIES_MERGES:
            raise ValueError(f"merge must be one of {TIES_MERGES}, got {merge!r}")
        self.merge = merge
        self.balance = 0  # #entries elected positive − #entries elected negative
        self.cancelled: list[tuple[str, Tensor, Tensor]] = []  # (key, flat positions, trimmed values [K, m])

    def merge_block(self, trimmed: Tensor, key: str, offset: int, work: Tensor | None = None) -> Tensor:
        """:func:`disjoint_merge` at the elected signs, for a ``[K, n]`` block starting at ``offset``."""
        ones = trimmed.new_ones(trimmed.shape[0])
        total = ones @ trimmed  # column sums; a matrix-vector product is ~2x faster than sum(dim=0) on CPU
        elected = total.sign()
        self.balance += int(elected.sum(dtype=torch.float64))
        # Elected +: the agreeing entries are the positive ones, summing to P; elected −: the negative ones,
        # summing to N = total − P (computed so, N is as accurate as total: there |N| > P).
        positive = torch.clamp(trimmed, min=0, out=work) if work is not None else trimmed.clamp(min=0)
        positive_sum = ones @ positive
        negative_sum = total.sub_(positive_sum)
        if self.merge == "mean":
            positive_count = ones @ positive.sign_()
            negative_count = (ones @ trimmed.sign().abs_()).sub_(positive_count)
            positive_sum.div_(positive_count.clamp_(min=1))
            negative_sum.div_(negative_count.clamp_(min=1))
        undecided = 1 - elected.abs()
        if float(torch.dot(positive_sum, undecided)) > 0:  # some entries with a zero sum are not all zero
            positions = torch.nonzero(positive_sum.mul(undecided) > 0).squeeze(1)
            self.cancelled.append((key, positions + offset, trimmed[:, positions].clone()))
        elected_positive, elected_negative = elected.clamp(min=0), elected.clamp(max=0)  # 1 / 0 and −1 / 0
        return positive_sum.mul_(elected_positive).addcmul_(negative_sum, elected_negative, value=-1)

    @property
    def majority_sign(self) -> int:
        return (self.balance > 0) - (self.balance < 0)

    def resolve(self, out: StateDict, base: StateDict, scaling: float) -> int:
        """Patch the set-aside entries of ``out`` (θ0 there) to θ0 + scaling · merge at the majority sign."""
        majority = self.majority_sign
        patched = 0
        base_key, base_flat = None, None
        for key, positions, values in self.cancelled:
            if majority == 0:
                continue
            if key != base_key:  # blocks of one key come together: read each base tensor once
                base_key, base_flat = key, flat(base[key])
            merged = disjoint_merge(values, torch.full_like(values[0], float(majority)), self.merge)
            base_values = base_flat[positions].to(merged.dtype)
            out[key].view(-1)[positions] = (base_values + scaling * merged).to(out[key].dtype)
            patched += positions.numel()
        return patched


def ties_merge_task_vectors(
    source: TaskVectorSource,
    *,
    k: float,
    trim_scope: str,
    merge: str,
    scaling: float,
    notes: dict | None = None,
    block: int = BLOCK_COLUMNS,
) -> StateDict:
    """θ = θ0 + scaling · TIES(τ_1..τ_K) with τ_i from ``source`` (plain task vectors, or DARE-sparsified).

    - trim: keep the entries of τ_i with |τ_i| ≥ t_i, where t_i is the n-th largest |τ_i| and
      n = ⌊N·k/100⌋; N counts all merged entries of the model (``trim_scope="global"``) or of the one tensor
      (``"per_tensor"``, with its own t_i per tensor). Ties at t_i are all kept; n = 0 keeps nothing.
    - elect and disjoint merge: :class:`SignElection`.

    ``global`` makes two passes over the model (exact thresholds, then merge); ``per_tensor`` one.
    """
    if trim_scope not in TRIM_SCOPES:
        raise ValueError(f"trim_scope must be one of {TRIM_SCOPES}, got {trim_scope!r}")
    base = source.base
    keys = mergeable_keys(base)
    scratch = Scratch()
    election = SignElection(merge)
    out = start_output(base)
    global_thresholds: list[float | None] = []
    if trim_scope == "global":
        total = sum(shape_of(base, key).numel() for key in keys)
        kept = keep_count(total, k)
        global_thresholds = (
            kth_largest_rows(TaskVectorMagnitudes(source, keys, scratch, block), [kept] * source.count)
            if kept > 0
            else [None] * source.count
        )
        source.rewind()
    for key in keys:
        base_flat, out_flat = source.base_flat(key), out[key].view(-1)
        numel, dtype = base_flat.numel(), work_dtype(base_flat.dtype)
        if trim_scope == "global":
            for start, stop in column_blocks(numel, block):
                tau = source.fill(key, start, stop, scratch.get("tau", (source.count, stop - start), dtype))
                _merge_trimmed(
                    trim_(tau, global_thresholds), election, key, start, base_flat, out_flat, scaling, scratch
                )
        else:
            # The whole tensor's task vectors, as contiguous [K, block] pieces of one buffer.
            stack = scratch.get("stack", (source.count * numel,), dtype)
            blocks = [
                source.fill(
                    key, start, stop, stack[source.count * start : source.count * stop].view(-1, stop - start)
                )
                for start, stop in column_blocks(numel, block)
            ]
            kept = keep_count(numel, k)
            thresholds = (
                kth_largest_rows(BlockMagnitudes(blocks, scratch), [kept] * source.count)
                if kept > 0
                else [None] * source.count
            )
            for (start, _), tau in zip(column_blocks(numel, block), blocks, strict=True):
                _merge_trimmed(
                    trim_(tau, thresholds), election, key, start, base_flat, out_flat, scaling, scratch
                )
    patched = election.resolve(out, base, scaling)
    if notes is not None:
        notes.update(
            {
                "ties_global_thresholds": global_thresholds,
                "ties_majority_sign": election.majority_sign,
                "ties_cancelled_entries": patched,
            }
        )
    return out


def _merge_trimmed(
    trimmed: Tensor,
    election: SignElection,
    key: str,
    start: int,
    base_flat: Tensor,
    out_flat: Tensor,
    scaling: float,
    scratch: Scratch,
) -> None:
    stop = start + trimmed.shape[1]
    merged = election.merge_block(
        trimmed, key, start, scratch.get("positive", tuple(trimmed.shape), trimmed.dtype)
    )
    write_scaled_sum(out_flat[start:stop], base_flat[start:stop], merged, scaling)


@dataclass(frozen=True)
class TiesParams:
    k: float = param(20.0, "percent of each task vector's entries kept (by magnitude)", low=0.0, high=100.0)
    trim_scope: str = param(
        "global", "rank magnitudes over the whole model or within each tensor", choices=TRIM_SCOPES
    )
    merge: str = param(
        "sum", "combine the agreeing entries by sum (dis-sum) or mean (dis-mean)", choices=TIES_MERGES
    )
    scaling: float = param(0.3, "λ in θ0 + λ · merged")

    def __post_init__(self) -> None:
        require_range("ties", "k", self.k, 0.0, 100.0)
        require_choice("ties", "trim_scope", self.trim_scope, TRIM_SCOPES)
        require_choice("ties", "merge", self.merge, TIES_MERGES)


def ties_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    k: float,
    trim_scope: str,
    merge: str,
    scaling: float,
    notes: dict | None = None,
) -> StateDict:
    """θ0 + scaling · TIES(θ_i − θ0); ``notes`` (optional) receives the thresholds and the majority sign."""
    check_experts(base, experts)
    return ties_merge_task_vectors(
        PlainTaskVectors(base, experts), k=k, trim_scope=trim_scope, merge=merge, scaling=scaling, notes=notes
    )


@register_method(
    "ties",
    family="data-free",
    params=TiesParams,
    description="Trim to top-k% magnitudes, elect signs, disjoint merge (Yadav et al. 2023)",
)
def merge(ctx: MergeContext, p: TiesParams) -> StateDict:
    return ties_merge(
        ctx.pretrained(),
        ctx.experts(),
        k=p.k,
        trim_scope=p.trim_scope,
        merge=p.merge,
        scaling=p.scaling,
        notes=ctx.notes,
    )
