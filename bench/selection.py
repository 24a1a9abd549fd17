"""Exact selection: the k-th largest value over many tensors without flattening, sorting or ``kthvalue`` over
all of them (:func:`kth_largest`, :func:`kth_largest_rows`), and the count a "top-k%" rule keeps
(:func:`keep_count`). Shared by the methods that keep a top fraction of magnitudes (TIES, DARE-TIES, PCB, DOGE,
DRM, ...).

A stratified random sample (fixed seed; it only affects speed) places a narrow band [lo, hi] around the
expected rank (±5 binomial standard deviations); one pass counts the entries above the band and collects
the few inside it; when the counts prove the answer lies in the band, a selection (numpy's partition) over
the collected entries gives it exactly. Otherwise the counts give a smaller bracket holding the answer and
its exact rank there, and the next pass scans a band placed by the sample points inside that bracket: a
miss (probability ~1e-6 per row) costs one more pass, and inputs so large that the first band is too
crowded to collect shrink it ~10x per pass. With too few sample points left (many tied values), the
bracket is bisected over the float bit patterns. Every answer is certified by exact counts, so the
result never depends on the sample.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Sequence
from fractions import Fraction
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from bench.buffers import Scratch, numpy_compatible


def keep_count(numel: int, percent: float) -> int:
    """Entries kept by a "top-k%" rule: ⌊numel · percent / 100⌋ with percent read as written (3.3 is 33/10,
    not the binary float just below it), so 3.3% of 120000 is 3960."""
    return math.floor(numel * Fraction(str(percent)) / 100)


DIRECT_LIMIT = 1 << 16
"""Inputs with at most this many entries per row are selected directly (no sampling)."""
SAMPLE_SIZE = 1 << 18
COLLECT_LIMIT = 1 << 20
"""Fewest in-band entries per row gathered before falling back to bisection (4 MiB of fp32 per row) ..."""
COLLECT_BUDGET = 1 << 26
"""... and a row may gather more while all rows together stay within this many (256 MiB of fp32): a model-wide
band of 20 rows of 300M entries holds ~2.4M entries a row, and one scan pass then settles it."""
BAND_SIGMAS = 5.0


class RowChunks(Protocol):
    """``rows`` independent sequences, each the virtual concatenation of chunks of lengths ``sizes``.

    ``values(i)`` returns chunk ``i`` as ``[rows, sizes[i]]`` (valid until the next call; a pass calls it
    for i = 0, 1, ... in order); ``sample(i, positions)`` returns ``[rows, len(positions)]`` entries of
    chunk ``i`` (they only guide the search and may be approximate).
    """

    rows: int
    sizes: Sequence[int]
    dtype: torch.dtype

    def values(self, index: int) -> Tensor: ...

    def sample(self, index: int, positions: Tensor) -> Tensor: ...


class TensorChunks:
    """One row: the given tensors, flattened and virtually concatenated."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = [tensor.reshape(-1) for tensor in tensors]
        self.rows = 1
        self.sizes = [tensor.numel() for tensor in self.tensors]
        self.dtype = self.tensors[0].dtype if self.tensors else torch.float32

    def values(self, index: int) -> Tensor:
        return self.tensors[index].unsqueeze(0)

    def sample(self, index: int, positions: Tensor) -> Tensor:
        return self.tensors[index].index_select(0, positions).unsqueeze(0)


def _float_format(dtype: torch.dtype) -> tuple[str, str, int]:
    """struct codes and sign bit of the bit patterns bisection works on (fp64, else fp32)."""
    return ("<d", "<Q", 1 << 63) if dtype == torch.float64 else ("<f", "<I", 1 << 31)


def _order_key(value: float, dtype: torch.dtype) -> int:
    """An integer that orders like the float (±0 share key 0)."""
    float_code, int_code, sign_bit = _float_format(dtype)
    bits = struct.unpack(int_code, struct.pack(float_code, value))[0]
    return -(bits - sign_bit) if bits >= sign_bit else bits


def _from_order_key(key: int, dtype: torch.dtype) -> float:
    float_code, int_code, sign_bit = _float_format(dtype)
    bits = key if key >= 0 else (-key) | sign_bit
    return struct.unpack(float_code, struct.pack(int_code, bits))[0]


def next_float(value: float, dtype: torch.dtype, direction: int) -> float:
    """The neighbouring representable value of ``dtype`` (fp32 for 16-bit types) above (+1) or below (−1)."""
    return _from_order_key(_order_key(value, dtype) + direction, dtype)


def kth_largest(tensors: Sequence[Tensor] | Tensor, k: int, **options: int) -> float:
    """The k-th largest value (k = 1 is the maximum) of the tensors' entries, taken together.

    Exact (equal to ``torch.kthvalue(torch.cat(flattened), N − k + 1)``), without building the concatenation.
    Ties count with multiplicity; values must not be NaN.
    """
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    return kth_largest_rows(TensorChunks(tensors), [k], **options)[0]


def kth_largest_rows(
    chunks: RowChunks,
    ks: Sequence[int],
    *,
    sample_size: int = SAMPLE_SIZE,
    collect_limit: int | None = None,
    direct_limit: int = DIRECT_LIMIT,
) -> list[float]:
    """For every row r, the ``ks[r]``-th largest entry of the row's chunks (exact; see above)."""
    rows, total = chunks.rows, sum(chunks.sizes)
    if collect_limit is None:
        collect_limit = max(COLLECT_LIMIT, COLLECT_BUDGET // max(rows, 1))
    ks = [int(k) for k in ks]
    if len(ks) != rows:
        raise ValueError(f"need one k per row: {rows} rows, {len(ks)} values of k")
    for k in ks:
        if not 1 <= k <= total:
            raise ValueError(f"k={k} is outside [1, {total}] (the number of entries per row)")
    if total <= direct_limit:
        return _kth_largest_direct(chunks, ks)

    bound_dtype = torch.float64 if chunks.dtype == torch.float64 else torch.float32
    inf = math.inf
    lower, upper = [-inf] * rows, [inf] * rows  # the answer lies in [lower, upper] ...
    above_upper, below_lower = [0] * rows, [0] * rows  # ... with this many entries outside on each side
    result: list[float | None] = [None] * rows
    sample = _draw_sample(chunks, total, sample_size)
    lo, hi = [0.0] * rows, [0.0] * rows
    widen = [1.0] * rows  # grows after each miss, in case the sample misleads (it may be approximate)
    while True:
        pending = [r for r in range(rows) if result[r] is None]
        if not pending:
            return [float(value) for value in result]  # type: ignore[arg-type]
        for r in pending:
            bracket_count = total - above_upper[r] - below_lower[r]
            lo[r], hi[r] = _next_band(
                sample[r],
                lower[r],
                upper[r],
                ks[r] - above_upper[r],
                bracket_count,
                BAND_SIGMAS * widen[r],
                collect_limit,
                bound_dtype,
            )
        above, within, collected = _scan_band(chunks, lo, hi, bound_dtype, collect_limit)
        for r in pending:
            if above[r] >= ks[r]:  # the answer is above the band
                lower[r], below_lower[r] = next_float(hi[r], bound_dtype, +1), total - above[r]
                widen[r] *= 4
            elif above[r] + within[r] < ks[r]:  # ... below it
                upper[r], above_upper[r] = next_float(lo[r], bound_dtype, -1), above[r] + within[r]
                widen[r] *= 4
            elif collected[r] is not None:  # ... in it, and we have the band's entries
                result[r] = kth_largest_small(collected[r], ks[r] - above[r])  # type: ignore[arg-type]
                continue
            elif lo[r] == hi[r]:  # ... in a band of one (tied) value
                result[r] = lo[r]
                continue
            else:  # ... in a band too crowded to collect: it becomes the bracket
                lower[r], upper[r] = lo[r], hi[r]
                above_upper[r], below_lower[r] = above[r], total - above[r] - within[r]
                widen[r] = 1.0
            if lower[r] > upper[r]:
                raise ValueError("kth_largest: inconsistent counts; the values must not contain NaN")
            if lower[r] == upper[r]:
                result[r] = lower[r]


def _kth_largest_direct(chunks: RowChunks, ks: Sequence[int]) -> list[float]:
    everything = torch.cat([chunks.values(i).clone() for i in range(len(chunks.sizes))], dim=1)
    return [kth_largest_small(everything[r], k) for r, k in enumerate(ks)]


def _draw_sample(chunks: RowChunks, total: int, sample_size: int) -> Tensor:
    """``[rows, n]`` entries at stratified random positions (one uniform position in each of n equal strata:
    sorted by construction, and at least as informative as a simple random sample)."""
    sample_size = min(sample_size, max(1024, total // 32))  # sample_size caps it; small inputs need less
    jitter = torch.rand(sample_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    strata = torch.arange(sample_size, dtype=torch.float64).add_(jitter).mul_(total / sample_size)
    positions = strata.to(torch.int64).clamp_(max=total - 1)
    offsets = torch.tensor([0, *itertools.accumulate(chunks.sizes)], dtype=torch.int64)
    chunk_ids = torch.searchsorted(offsets, positions, right=True) - 1
    ids, counts = torch.unique_consecutive(chunk_ids, return_counts=True)
    parts, first = [], 0
    runs = torch.Generator().manual_seed(1)
    for chunk_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
        if getattr(chunks, "clustered_sample", False):
            # The chunk's share of the sample as one run at a random place: a reader of files then reads a few
            # hundred bytes per chunk instead of every page (entries of one block of a tensor are alike).
            start = int(torch.randint(0, chunks.sizes[chunk_id] - count + 1, (1,), generator=runs))
            local = torch.arange(start, start + count)
        else:
            local = positions[first : first + count] - offsets[chunk_id]
        parts.append(chunks.sample(chunk_id, local))
        first += count
    return torch.cat(parts, dim=1)


MIN_BAND_POINTS = 64
"""Fewest sample points inside a bracket for placing a band from them (else the bracket is bisected)."""


def _next_band(
    sample: Tensor,
    lower: float,
    upper: float,
    rank: int,
    count: int,
    sigmas: float,
    collect_limit: int,
    bound_dtype: torch.dtype,
) -> tuple[float, float]:
    """The band [lo, hi] ⊆ [lower, upper] to scan for the ``rank``-th largest of the ``count`` entries known
    to lie in the bracket: from the sample points inside the bracket, around the answer's expected place
    ± ``sigmas`` binomial standard deviations; failing that (too few points, or no narrowing), the whole
    bracket if it is collectable, else its upper half by bit pattern."""
    points = sample[(sample >= lower) & (sample <= upper)]
    inside = points.numel()
    if inside >= MIN_BAND_POINTS:
        fraction = rank / count
        expected = fraction * inside  # 1-based rank of the answer among the points, on average
        margin = sigmas * math.sqrt(inside * fraction * (1 - fraction)) + 8
        top, bottom = math.floor(expected - margin), math.ceil(expected + margin)
        hi = kth_largest_small(points, top) if top >= 1 else upper
        lo = kth_largest_small(points, bottom) if bottom <= inside else lower
        if (lo, hi) != (lower, upper):
            return lo, hi
    if count <= collect_limit:
        return lower, upper
    low_key, high_key = _order_key(lower, bound_dtype), _order_key(upper, bound_dtype)
    return _from_order_key((low_key + high_key + 1) // 2, bound_dtype), upper


def kth_largest_small(values: Tensor, k: int) -> float:
    """k-th largest of a 1-D tensor that fits in memory (numpy's introselect on CPU: faster than kthvalue)."""
    if numpy_compatible(values):
        array = values.contiguous().numpy()
        position = array.size - k
        return float(np.partition(array, position)[position])
    return torch.kthvalue(values, values.numel() - k + 1).values.item()


def _scan_band(
    chunks: RowChunks, lo: Sequence[float], hi: Sequence[float], bound_dtype: torch.dtype, collect_limit: int
) -> tuple[list[int], list[int], list[Tensor | None]]:
    """One pass: per row, #entries > hi, #entries in [lo, hi], and the latter's values if ≤ collect_limit."""
    rows = chunks.rows
    above_total, within_total = [0] * rows, [0] * rows
    collected: list[list[Tensor] | None] = [[] for _ in range(rows)]
    masks = Scratch()
    for index, size in enumerate(chunks.sizes):
        values = chunks.values(index)
        above = masks.get("above", (rows, size), torch.bool)
        within = masks.get("within", (rows, size), torch.bool)
        use_numpy = numpy_compatible(values)
        if use_numpy:
            # numpy's compare, count and compress kernels are 5-10x faster than torch's on CPU (zero copy).
            values_np, above_np, within_np = values.numpy(), above.numpy(), within.numpy()
            bound_np = np.float64 if bound_dtype == torch.float64 else np.float32
            np.greater(values_np, np.array(hi, dtype=bound_np)[:, None], out=above_np)
            np.greater_equal(values_np, np.array(lo, dtype=bound_np)[:, None], out=within_np)
            np.logical_xor(within_np, above_np, out=within_np)
            above_counts = [int(np.count_nonzero(row)) for row in above_np]
            within_counts = [int(np.count_nonzero(row)) for row in within_np]
        else:
            lo_column = torch.tensor(lo, dtype=bound_dtype, device=values.device).view(rows, 1)
            hi_column = torch.tensor(hi, dtype=bound_dtype, device=values.device).view(rows, 1)
            torch.gt(values, hi_column, out=above)
            torch.ge(values, lo_column, out=within).logical_xor_(above)
            above_counts, within_counts = above.sum(dim=1).tolist(), within.sum(dim=1).tolist()
        selected: Tensor | None = None
        if any(part is not None for part in collected):
            if use_numpy:
                selected = torch.from_numpy(
                    np.compress(within.numpy().reshape(-1), values.numpy().reshape(-1))
                )
            else:
                selected = values[within]
        first = 0
        for r in range(rows):
            count = within_counts[r]
            above_total[r] += above_counts[r]
            within_total[r] += count
            part = collected[r]
            if part is not None:
                if within_total[r] > collect_limit:
                    collected[r] = None
                elif count:
                    part.append(selected[first : first + count])  # type: ignore[index]
            first += count
    gathered = [None if part is None else torch.cat(part) if part else torch.empty(0) for part in collected]
    return above_total, within_total, gathered
