"""Task vectors τ_i = θ_i − θ0, produced on the fly, and the shared streaming loops over them.

Everything here works tensor by tensor, and inside a tensor block by block, so that merging K experts never
holds K task vectors of the whole model at once: the working memory of a merge is its output plus scratch
buffers of O(K × one tensor) at most.

- which keys are merged and how: :func:`mergeable_keys` (floating-point keys, sorted), :func:`is_matrix_param`
  (the SVD methods' matrices; a suite names the 2-D parameters to treat as vectors), :func:`work_dtype`;
- :class:`TaskVectorSource` and :class:`PlainTaskVectors` (block-wise, one key held at a time), and their
  magnitudes as rows for :mod:`bench.selection` (:class:`TaskVectorMagnitudes`, :class:`BlockMagnitudes`);
- loops: :func:`merge_summed` (Σ τ_i), :func:`merge_blockwise` (any function of the [K, n] block),
  :func:`mean_task_vector`; per-tensor methods use :mod:`bench.tensorwise`, λ-optimisers
  :class:`bench.lambda_merge.TaskVectorStack`, all over the same :func:`mergeable_keys`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from bench.buffers import Scratch, numpy_compatible
from bench.errors import BenchError
from bench.model_pool import KeyReader, check_compatible, dtype_of, read_flat, shape_of
from bench.problem import StateDict

BLOCK_COLUMNS = 1 << 18
"""Entries of one tensor processed together (per expert): K × 1 MiB of fp32 scratch, cache friendly."""


# ------------------------------------------------------------------------------------------------------------
# Parameter rules


def is_mergeable(tensor: Tensor) -> bool:
    """Floating-point tensors are merged; integer buffers (e.g. position ids) are copied from the base."""
    return tensor.is_floating_point()


def is_matrix_param(name: str, tensor: Tensor, vector_params: Sequence[str] = ()) -> bool:
    """The SVD methods' rule: a 2-D tensor whose name matches none of the suite's ``vector_params`` patterns
    (fnmatch; the CLIP suites declare ``*text_projection*``, as the TSV and Iso reference code treat it).

    Everything else (biases, norms, class embeddings, 4-D conv kernels) is merged as a plain vector.
    """
    return tensor.ndim == 2 and not any(fnmatch.fnmatchcase(name, pattern) for pattern in vector_params)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision: float64 stays float64, everything else (fp32, fp16, bf16) is done in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_experts(base: StateDict, experts: Sequence[StateDict]) -> None:
    """Fail early (one-line BenchError) when there are no experts or keys/shapes differ from the base."""
    if len(experts) == 0:
        raise BenchError("merging needs at least one expert; the problem has none")
    check_compatible(base, experts, [f"#{index}" for index in range(len(experts))])


def column_blocks(numel: int, block: int = BLOCK_COLUMNS) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(numel)``; every range but the last has length ``block``."""
    for start in range(0, numel, block):
        yield start, min(start + block, numel)


def flat(tensor: Tensor) -> Tensor:
    """A 1-D view (a copy only when the tensor is not contiguous)."""
    return tensor.reshape(-1)


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
    def delta(key: str, start: int, stop: int, dtype: torch.dtype, scratch: Scratch) -> Tensor:
        return combine(source.fill(key, start, stop, scratch.get("tau", (source.count, stop - start), dtype)))

    return _merge_by_block(source, delta, scaling, block)


def merge_summed(source: TaskVectorSource, *, scaling: float, block: int = BLOCK_COLUMNS) -> StateDict:
    """``θ = θ0 + scaling · Σ_i τ_i`` block by block, accumulating one expert at a time (no K-row stack)."""
    def delta(key: str, start: int, stop: int, dtype: torch.dtype, scratch: Scratch) -> Tensor:
        return source.accumulate(key, start, stop, scratch.get("total", (stop - start,), dtype), scratch)

    return _merge_by_block(source, delta, scaling, block)


def _merge_by_block(source: TaskVectorSource, delta: Callable[..., Tensor], scaling: float, block: int) -> StateDict:
    """The shared loop: ``θ = θ0 + scaling · delta(key, start, stop, work dtype, scratch)`` block by block."""
    base = source.base
    out = start_output(base)
    scratch = Scratch()
    for key in mergeable_keys(base):
        base_flat, out_flat = source.base_flat(key), out[key].view(-1)
        dtype = work_dtype(base_flat.dtype)
        for start, stop in column_blocks(base_flat.numel(), block):
            write_scaled_sum(out_flat[start:stop], base_flat[start:stop], delta(key, start, stop, dtype, scratch),
                             scaling)
    return out


def mean_task_vector(base_tensor: Tensor, expert_tensors: Sequence[Tensor]) -> Tensor:
    """mean_i (θ_i − θ0) for one tensor, in the work dtype, accumulated one expert at a time."""
    dtype = work_dtype(base_tensor.dtype)
    total = torch.zeros(base_tensor.shape, dtype=dtype)
    difference = torch.empty_like(total)
    for expert_tensor in expert_tensors:
        total.add_(difference_into(difference, expert_tensor, base_tensor))
    return total.div_(len(expert_tensors))


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


def task_vector(base_tensor: Tensor, expert_tensor: Tensor, device: torch.device | str = "cpu") -> Tensor:
    """τ = θ_i − θ0 for one tensor, in the work dtype, on ``device``."""
    dtype = work_dtype(base_tensor.dtype)
    return expert_tensor.to(device=device, dtype=dtype) - base_tensor.to(device=device, dtype=dtype)
