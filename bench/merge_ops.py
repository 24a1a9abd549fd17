"""Helpers shared by the merging methods in ``methods/``: one piece of code wherever the logic is the same.

Everything here works tensor by tensor, and inside a tensor block by block, so that merging K experts never
holds K task vectors of the whole model at once: the working memory of a merge is its output plus scratch
buffers of O(K × one tensor) at most.

Contents:

- parameter rules: :func:`is_mergeable`, :func:`is_matrix_param`, :func:`work_dtype`, :func:`keep_count`;
- task vectors produced on the fly: :class:`TaskVectorSource` and :class:`PlainTaskVectors`;
- exact k-th largest value over a virtual concatenation of tensors without flattening or sorting it:
  :func:`kth_largest`, :func:`kth_largest_rows`;
- TIES: :func:`trim_`, :class:`SignElection` (elect + disjoint merge, with the reference's tie rule) and the
  block-wise driver :func:`ties_merge_task_vectors` shared by ``ties`` and ``dare_ties``;
- SVD helpers: :func:`polar_factor`, :func:`isotropic`;
- state-dict loops: :func:`merge_summed` (Σ τ_i), :func:`merge_blockwise` (any function of the [K, n]
  block), :func:`svd_merge` (matrix parameters by SVD, the rest by the mean task vector).
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from bench.errors import BenchError
from bench.model_pool import KeyReader, check_compatible, dtype_of, read_flat, shape_of
from bench.problem import StateDict

BLOCK_COLUMNS = 1 << 18
"""Entries of one tensor processed together (per expert): K × 1 MiB of fp32 scratch, cache friendly."""

TRIM_SCOPES = ("global", "per_tensor")
TIES_MERGES = ("mean", "sum")


# ------------------------------------------------------------------------------------------------------------
# Parameter rules


def is_mergeable(tensor: Tensor) -> bool:
    """Floating-point tensors are merged; integer buffers (e.g. position ids) are copied from the base."""
    return tensor.is_floating_point()


def is_matrix_param(name: str, tensor: Tensor) -> bool:
    """The SVD methods' rule (TSV-M and Iso reference code): a 2-D tensor not named ``*text_projection*``.

    Everything else (biases, norms, class embeddings, 4-D conv kernels) is merged as a plain vector.
    """
    return tensor.ndim == 2 and "text_projection" not in name


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision: float64 stays float64, everything else (fp32, fp16, bf16) is done in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_count(numel: int, percent: float) -> int:
    """Entries kept by a "top-k%" rule: ⌊numel · percent / 100⌋ with percent read as written (3.3 is 33/10,
    not the binary float just below it), so 3.3% of 120000 is 3960."""
    return math.floor(numel * Fraction(str(percent)) / 100)


def check_experts(base: StateDict, experts: Sequence[StateDict]) -> None:
    """Fail early (one-line BenchError) when there are no experts or keys/shapes differ from the base."""
    if len(experts) == 0:
        raise BenchError("merging needs at least one expert; the problem has none")
    check_compatible(base, experts, [f"#{index}" for index in range(len(experts))])


def column_blocks(numel: int, block: int = BLOCK_COLUMNS) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(numel)``; every range but the last has length ``block``."""
    for start in range(0, numel, block):
        yield start, min(start + block, numel)


def numpy_compatible(tensor: Tensor) -> bool:
    """Whether ``tensor.numpy()`` is a zero-copy view (CPU, a dtype numpy has, no autograd)."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype
        in (torch.float16, torch.float32, torch.float64, torch.int16, torch.int64, torch.bool)
        and not tensor.requires_grad
    )


def require_choice(method: str, name: str, value: object, choices: Sequence[object]) -> None:
    """ValueError for a hyperparameter outside its choices, saying what to set instead."""
    if value not in choices:
        options = "|".join(str(choice) for choice in choices)
        raise ValueError(
            f"{method}.{name}={value!r} is not one of {options}; e.g. --set {method}.{name}={choices[0]}"
        )


def require_range(method: str, name: str, value: float, low: float | None, high: float | None) -> None:
    """ValueError for a hyperparameter outside the closed range [low, high] (NaN is in no range)."""
    if value != value or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{method}.{name}={value} is outside [{low}, {high}]; pick a value in that range")


def flat(tensor: Tensor) -> Tensor:
    """A 1-D view (a copy only when the tensor is not contiguous)."""
    return tensor.reshape(-1)


class Scratch:
    """Reusable buffers handed out as contiguous views, so blocks do not page-fault fresh memory each time."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype)
            self._buffers[(name, dtype)] = buffer
        return buffer[:numel].view(shape)


# Elementwise kernels on blocks. On CPU they go through numpy's ufuncs on zero-copy views: for the
# ~1M-entry blocks used here numpy's per-call overhead and streaming loops are markedly cheaper than
# torch's (about 1.4x on a whole task-arithmetic merge); other devices and dtypes use torch.


def _numpy_views(*tensors: Tensor) -> list[np.ndarray] | None:
    if all(numpy_compatible(tensor) and tensor.dtype == tensors[0].dtype for tensor in tensors):
        return [tensor.numpy() for tensor in tensors]
    return None


def difference_into(out: Tensor, minuend: Tensor, subtrahend: Tensor) -> Tensor:
    """``out = minuend − subtrahend`` computed in ``out``'s dtype (exact for 16-bit inputs upcast to fp32)."""
    views = _numpy_views(out, minuend, subtrahend)
    if views is not None:
        np.subtract(views[1], views[2], out=views[0])
    elif minuend.dtype == out.dtype and subtrahend.dtype == out.dtype:
        torch.sub(minuend, subtrahend, out=out)
    else:
        out.copy_(minuend).sub_(subtrahend)
    return out


def add_into(out: Tensor, addend: Tensor) -> Tensor:
    """``out += addend``."""
    views = _numpy_views(out, addend)
    if views is not None:
        np.add(views[0], views[1], out=views[0])
    else:
        out.add_(addend)
    return out


def write_scaled_sum(out: Tensor, base: Tensor, delta: Tensor, scaling: float) -> None:
    """``out = base + scaling · delta`` (``delta``, in the work dtype, is overwritten; ``out`` has the base's
    dtype)."""
    views = _numpy_views(out, base, delta)
    if views is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # the runner checks merged weights and says so
            np.multiply(views[2], views[2].dtype.type(scaling), out=views[2])
            np.add(views[1], views[2], out=views[0])
    elif out.dtype == delta.dtype and base.dtype == delta.dtype:
        torch.add(base, delta, alpha=scaling, out=out)
    else:
        out.copy_(delta.mul_(scaling).add_(base))


# ------------------------------------------------------------------------------------------------------------
# Task vectors produced on the fly


class TaskVectorSource(Protocol):
    """The K task vectors of a merge, produced block by block and never all at once.

    ``fill(key, start, stop, out)`` writes rows ``out[i] = τ_i[key].flatten()[start:stop]`` in the work dtype;
    ``accumulate(key, start, stop, out, scratch)`` writes their sum ``out = Σ_i τ_i[...]`` without the stack.
    Calls for one tensor must come in order (start 0, then each previous stop) with lengths that are multiples
    of 64 except the last, because random sources (DARE) consume their streams in that order; ``rewind()``
    starts the streams over so a second pass sees the same vectors. ``sample(key, positions)`` returns
    ``[K, len(positions)]`` values used only to place a search band (it may be approximate); ``base_flat(key)``
    is θ0's tensor flattened (valid while ``key`` is the one being merged).
    """

    base: StateDict
    count: int

    def fill(self, key: str, start: int, stop: int, out: Tensor) -> Tensor: ...

    def base_flat(self, key: str) -> Tensor: ...

    def accumulate(self, key: str, start: int, stop: int, out: Tensor, scratch: Scratch) -> Tensor: ...

    def sample(self, key: str, positions: Tensor) -> Tensor: ...

    def rewind(self) -> None: ...


class PlainTaskVectors:
    """τ_i = θ_i − θ0, computed block by block from the experts' weights."""

    def __init__(self, base: StateDict, experts: Sequence[StateDict]) -> None:
        self.base = base
        self.experts = list(experts)
        self.count = len(self.experts)
        # Flat views of the current key's base and expert tensors (plus numpy views when they are fp32/fp64
        # on CPU). Only one key is held (and the next one being read ahead, for experts read from files):
        # keeping every key's would hold K whole models.
        self._reader = KeyReader([base, *self.experts], mergeable_keys(base))
        self._key: str | None = None
        self._arrays: list[np.ndarray] | None = None
        self._flats: list[Tensor] = []

    def flats(self, key: str) -> list[Tensor]:
        """Flat views of the base's and then every expert's ``key``."""
        if key != self._key:
            self._flats, self._arrays = [], None  # drop the previous key's tensors before reading the next
            flats = [flat(tensor) for tensor in self._reader.get(key)]
            dtype = flats[0].dtype
            numpy_ok = dtype == work_dtype(dtype) and all(numpy_compatible(tensor) for tensor in flats)
            self._flats, self._arrays = flats, [tensor.numpy() for tensor in flats] if numpy_ok else None
            self._key = key
        return self._flats

    def difference(self, key: str, index: int, start: int, stop: int, out: Tensor) -> Tensor:
        """``out = τ_index[key].flatten()[start:stop]``."""
        flats = self.flats(key)
        if self._arrays is not None and out.dtype == flats[0].dtype:
            np.subtract(self._arrays[index + 1][start:stop], self._arrays[0][start:stop], out=out.numpy())
            return out
        return difference_into(out, flats[index + 1][start:stop], flats[0][start:stop])

    @property
    def streamed(self) -> bool:
        """Whether the experts are read from files (then a sample should read little of them)."""
        return self._reader.streamed

    def base_flat(self, key: str) -> Tensor:
        return self.flats(key)[0]

    def fill(self, key: str, start: int, stop: int, out: Tensor) -> Tensor:
        for index, row in enumerate(out):
            self.difference(key, index, start, stop, row)
        return out

    def accumulate(self, key: str, start: int, stop: int, out: Tensor, scratch: Scratch) -> Tensor:
        self.difference(key, 0, start, stop, out)
        difference = scratch.get("difference", (stop - start,), out.dtype)
        if self._arrays is not None and out.dtype == self._flats[0].dtype:
            total, scratch_array, base_block = out.numpy(), difference.numpy(), self._arrays[0][start:stop]
            for expert_array in self._arrays[2:]:
                np.add(total, np.subtract(expert_array[start:stop], base_block, out=scratch_array), out=total)
            return out
        for index in range(1, self.count):
            add_into(out, self.difference(key, index, start, stop, difference))
        return out

    def sample(self, key: str, positions: Tensor) -> Tensor:
        # Only the window the (sorted) positions span is read, so a sample clustered in runs reads little.
        first, last = int(positions[0]), int(positions[-1]) + 1
        if key == self._key:
            windows = [tensor[first:last] for tensor in self._flats]
        else:
            windows = [read_flat(source, key, first, last) for source in (self.base, *self.experts)]
        local = positions - first
        dtype = work_dtype(windows[0].dtype)
        base_values = windows[0].index_select(0, local).to(dtype)
        return torch.stack([window.index_select(0, local).to(dtype) - base_values for window in windows[1:]])

    def rewind(self) -> None:
        pass


def mergeable_keys(base: StateDict) -> list[str]:
    """Mergeable keys in sorted order: random streams (DARE masks) are consumed in this order, so results must
    not depend on a state dict's insertion order (safetensors, for one, does not preserve it across processes)."""
    return sorted(key for key in base if dtype_of(base, key).is_floating_point)


def start_output(base: StateDict) -> StateDict:
    """Output tensors shaped like the base's: non-mergeable ones copied, the others uninitialised (from the
    shapes alone: a base read from a file is not read here)."""
    return {
        key: torch.empty(shape_of(base, key), dtype=dtype_of(base, key))
        if dtype_of(base, key).is_floating_point
        else base[key].clone()
        for key in base
    }


def merge_blockwise(
    source: TaskVectorSource,
    combine: Callable[[Tensor], Tensor],
    *,
    scaling: float,
    block: int = BLOCK_COLUMNS,
) -> StateDict:
    """``θ = θ0 + scaling · combine(τ block)`` for every block of every mergeable tensor.

    ``combine`` maps the ``[K, n]`` task-vector block to the ``[n]`` merged task vector (it may overwrite its
    input, which is scratch).
    """
    base = source.base
    out = start_output(base)
    scratch = Scratch()
    for key in mergeable_keys(base):
        base_flat, out_flat = source.base_flat(key), out[key].view(-1)
        dtype = work_dtype(base_flat.dtype)
        for start, stop in column_blocks(base_flat.numel(), block):
            tau = source.fill(key, start, stop, scratch.get("tau", (source.count, stop - start), dtype))
            write_scaled_sum(out_flat[start:stop], base_flat[start:stop], combine(tau), scaling)
    return out


def merge_summed(source: TaskVectorSource, *, scaling: float, block: int = BLOCK_COLUMNS) -> StateDict:
    """``θ = θ0 + scaling · Σ_i τ_i`` block by block, accumulating one expert at a time (no K-row stack)."""
    base = source.base
    out = start_output(base)
    scratch = Scratch()
    for key in mergeable_keys(base):
        base_flat, out_flat = source.base_flat(key), out[key].view(-1)
        dtype = work_dtype(base_flat.dtype)
        for start, stop in column_blocks(base_flat.numel(), block):
            total = source.accumulate(key, start, stop, scratch.get("total", (stop - start,), dtype), scratch)
            write_scaled_sum(out_flat[start:stop], base_flat[start:stop], total, scaling)
    return out


def mean_task_vector(base_tensor: Tensor, expert_tensors: Sequence[Tensor]) -> Tensor:
    """mean_i (θ_i − θ0) for one tensor, in the work dtype, accumulated one expert at a time."""
    dtype = work_dtype(base_tensor.dtype)
    total = torch.zeros(base_tensor.shape, dtype=dtype)
    difference = torch.empty_like(total)
    for expert_tensor in expert_tensors:
        total.add_(difference_into(difference, expert_tensor, base_tensor))
    return total.div_(len(expert_tensors))


# ------------------------------------------------------------------------------------------------------------
# Exact k-th largest value without flattening, sorting or kthvalue over the whole input
#
# A stratified random sample (fixed seed; it only affects speed) places a narrow band [lo, hi] around the
# expected rank (±5 binomial standard deviations); one pass counts the entries above the band and collects
# the few inside it; when the counts prove the answer lies in the band, a selection (numpy's partition) over
# the collected entries gives it exactly. Otherwise the counts give a smaller bracket holding the answer and
# its exact rank there, and the next pass scans a band placed by the sample points inside that bracket: a
# miss (probability ~1e-6 per row) costs one more pass, and inputs so large that the first band is too
# crowded to collect shrink it ~10x per pass. With too few sample points left (many tied values), the
# bracket is bisected over the float bit patterns. Every answer is certified by exact counts, so the
# result never depends on the sample.

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
        self.tensors = [flat(tensor) for tensor in tensors]
        self.rows = 1
        self.sizes = [tensor.numel() for tensor in self.tensors]
        self.dtype = self.tensors[0].dtype if self.tensors else torch.float32

    def values(self, index: int) -> Tensor:
        return self.tensors[index].unsqueeze(0)

    def sample(self, index: int, positions: Tensor) -> Tensor:
        return self.tensors[index].index_select(0, positions).unsqueeze(0)


class BlockMagnitudes:
    """Rows of ``|τ|`` for one tensor held as contiguous ``[K, block]`` pieces (computed through scratch)."""

    def __init__(self, blocks: Sequence[Tensor], scratch: Scratch) -> None:
        self.blocks = blocks
        self.scratch = scratch
        self.rows = blocks[0].shape[0]
        self.sizes = [block.shape[1] for block in blocks]
        self.dtype = blocks[0].dtype

    def values(self, index: int) -> Tensor:
        block = self.blocks[index]
        return torch.abs(block, out=self.scratch.get("magnitudes", tuple(block.shape), self.dtype))

    def sample(self, index: int, positions: Tensor) -> Tensor:
        return self.blocks[index].index_select(1, positions).abs_()


class TaskVectorMagnitudes:
    """Rows ``|τ_i|`` over all mergeable tensors of a model (one row per expert), block by block.

    Each pass starts by rewinding the source, so random sources replay the same task vectors.
    """

    def __init__(
        self, source: TaskVectorSource, keys: Sequence[str], scratch: Scratch, block: int = BLOCK_COLUMNS
    ) -> None:
        self.source = source
        self.scratch = scratch
        self.chunks = [
            (key, start, stop)
            for key in keys
            for start, stop in column_blocks(shape_of(source.base, key).numel(), block)
        ]
        self.rows = source.count
        self.sizes = [stop - start for _, start, stop in self.chunks]
        self.clustered_sample = getattr(source, "streamed", False)
        self.dtype = (
            torch.float64 if any(dtype_of(source.base, k) == torch.float64 for k in keys) else torch.float32
        )

    def values(self, index: int) -> Tensor:
        if index == 0:
            self.source.rewind()
        key, start, stop = self.chunks[index]
        out = self.scratch.get("tau", (self.rows, stop - start), work_dtype(dtype_of(self.source.base, key)))
        return self.source.fill(key, start, stop, out).abs_().to(self.dtype)

    def sample(self, index: int, positions: Tensor) -> Tensor:
        key, start, _ = self.chunks[index]
        return self.source.sample(key, positions + start).abs().to(self.dtype)


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


# ------------------------------------------------------------------------------------------------------------
# TIES: trim, elect sign, disjoint merge (Yadav et al. 2023)


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


# ------------------------------------------------------------------------------------------------------------
# SVD helpers


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal factor U Vᵀ of ``matrix = U S Vᵀ`` (thin SVD): the nearest matrix with orthonormal
    columns (or rows), used to decorrelate concatenated singular vectors."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def isotropic(matrix: Tensor) -> Tensor:
    """``matrix`` with all its singular values replaced by their mean: mean(S) · U Vᵀ."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u * s.mean()) @ vh


def task_vector(base_tensor: Tensor, expert_tensor: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """τ = θ_i − θ0 for one tensor, in the work dtype, on ``device``."""
    dtype = work_dtype(base_tensor.dtype)
    return expert_tensor.to(device=device, dtype=dtype) - base_tensor.to(device=device, dtype=dtype)


def svd_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    merge_matrix: Callable[[str, Tensor, Sequence[Tensor]], Tensor],
    *,
    scaling: float,
    device: torch.device | str = "cpu",
) -> StateDict:
    """The shared loop of TSV-M and Iso-C/CTS: θ = θ0 + scaling · Δ per tensor.

    Δ = ``merge_matrix(name, θ0 tensor, expert tensors)`` for matrix parameters (:func:`is_matrix_param`,
    computed on ``device``) and mean_i τ_i for every other floating-point tensor (the reference code's rule).
    """
    check_experts(base, experts)
    out: StateDict = {}
    for key, base_tensor in base.items():
        if not is_mergeable(base_tensor):
            out[key] = base_tensor.clone()
            continue
        expert_tensors = [expert[key] for expert in experts]
        if is_matrix_param(key, base_tensor):
            delta = merge_matrix(key, base_tensor, expert_tensors).to(device="cpu")
        else:
            delta = mean_task_vector(base_tensor, expert_tensors)
        out[key] = (base_tensor.to(delta.dtype) + scaling * delta).to(base_tensor.dtype)
    return out
