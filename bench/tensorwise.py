"""The per-tensor method contract: a method whose math is per tensor is a function from one tensor of the base
and the K experts' tensors to the merged tensor; :func:`merge_tensorwise` is the one driver that owns which keys
are merged, the dtype, and reading the experts one key at a time.

    def my_tensor_merge(inputs: TensorInputs, *, scaling: float) -> Tensor:
        return inputs.base + scaling * torch.stack(inputs.task_vectors).sum(0)

    @register_method("my_method", family="data-free", params=MyParams, description="...")
    def merge(ctx: MergeContext, p: MyParams) -> StateDict:
        return merge_tensorwise(ctx.pretrained(), ctx.experts(), partial(my_tensor_merge, scaling=p.scaling),
                                generator=ctx.generator)

What the driver guarantees a tensor function:

- it is called once per mergeable key (floating point; integer buffers are copied from the base), keys in
  sorted order, so a method drawing random numbers from ``inputs.generator`` draws them in the same order in
  every process;
- ``inputs.base`` and ``inputs.experts`` are in the work dtype (fp32; fp64 stays fp64), on the CPU, and must
  not be modified in place (they may be the reader's buffers, reused for the next key);
- it holds one key of every model at a time (plus the next one being read ahead when experts come from files);
- the returned tensor (θ, not a task vector) has the base tensor's shape and is written in the base's dtype.

Methods that need a whole-model pass first (a global threshold, a global mask's statistics) declare it with
:func:`scan_tensorwise`, which visits the same keys the same way and returns one small result per key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from bench.errors import BenchError
from bench.model_pool import KeyReader
from bench.problem import StateDict
from bench.task_vectors import check_experts, mergeable_keys, start_output, work_dtype


@dataclass
class TensorInputs:
    """One key's tensors of the base and of every expert, in the work dtype."""

    key: str
    base: Tensor
    experts: Sequence[Tensor]
    generator: torch.Generator
    _task_vectors: tuple[Tensor, ...] | None = field(default=None, repr=False)

    @property
    def task_vectors(self) -> tuple[Tensor, ...]:
        """τ_i = θ_i − θ0 for this key (computed once, on first use)."""
        if self._task_vectors is None:
            self._task_vectors = tuple(expert - self.base for expert in self.experts)
        return self._task_vectors

    @property
    def count(self) -> int:
        return len(self.experts)


TensorMerge = Callable[[TensorInputs], Tensor]
T = TypeVar("T")


def _inputs(base: StateDict, experts: Sequence[StateDict], generator: torch.Generator | None):
    """Every mergeable key's :class:`TensorInputs`, in sorted key order, one key held at a time."""
    check_experts(base, experts)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    keys = mergeable_keys(base)
    reader = KeyReader([base, *experts], keys)
    for key in keys:
        tensors = reader.get(key)  # valid until the next get: a caller copies what it keeps before that
        dtype = work_dtype(tensors[0].dtype)
        work = [tensor.to(dtype) for tensor in tensors]
        yield TensorInputs(key, work[0], work[1:], generator)


def scan_tensorwise(base: StateDict, experts: Sequence[StateDict], fn: Callable[[TensorInputs], T], *,
                    generator: torch.Generator | None = None) -> dict[str, T]:
    """A declared first pass (whole-model statistics: global thresholds, norms): ``fn(inputs of key)`` for every
    mergeable key, in sorted order; returns key -> result. Keep results small (scalars, a sample): holding a
    tensor per key would hold a whole model."""
    return {inputs.key: fn(inputs) for inputs in _inputs(base, experts, generator)}


def merge_tensorwise(base: StateDict, experts: Sequence[StateDict], fn: TensorMerge, *,
                     generator: torch.Generator | None = None) -> StateDict:
    """θ[key] = ``fn(inputs of key)`` for every mergeable key, the other keys copied from the base."""
    out = start_output(base)
    for inputs in _inputs(base, experts, generator):
        key = inputs.key
        merged = fn(inputs)
        if merged.shape != out[key].shape:
            raise BenchError(f"{getattr(fn, '__name__', 'the tensor merge')} returned shape {tuple(merged.shape)} "
                             f"for '{key}', not the base's {tuple(out[key].shape)}")
        out[key].copy_(merged)
    return out
