"""θ(λ) = θ0 + Σ_i λ_i ⊙ τ_i, the parameterisation shared by AdaMerging and SAMerging.

The base and the stacked task vectors live on the device once; θ(λ) is rebuilt from them on every call
(one fused ``tensordot`` per parameter tensor, differentiable in λ) and applied with
``torch.func.functional_call`` by the problem's ``logits``. Nothing copies K models per step and nothing is
reloaded between steps.

Granularity:
- ``task``: λ has shape [K]; one coefficient per expert (AdaMerging task-wise).
- ``layer``: λ has shape [K, P]; one coefficient per expert per parameter tensor (AdaMerging layer-wise,
  the SAMerging default; P = 199 for HF CLIP ViT-B/32's vision tower).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.task_vectors import mergeable_keys

GRANULARITIES = ("task", "layer")


class TaskVectorStack:
    """θ0 and the K task vectors of every parameter tensor, stacked on one device: ``stack[key]`` is [K, *shape]."""

    def __init__(self, base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]],
                 device: torch.device | str = "cpu"):
        # The keys every merge merges (floating point, sorted: gradients summed over keys, task-wise λ, must not
        # depend on the order a loader handed the tensors over in); integer buffers stay the base's.
        self.keys = mergeable_keys(base)
        self.num_tasks = len(experts)
        self.base = {k: base[k].detach().to(device) for k in self.keys}
        self.fixed = {k: base[k].detach().to(device) for k in base if k not in self.base}
        # Built key by key, so experts read from files are never held whole; kept in the base's dtype.
        self.stack = {
            k: torch.stack([expert[k].detach().to(device=device, dtype=self.base[k].dtype) - self.base[k]
                            for expert in experts])
            for k in self.keys
        }

    @property
    def nbytes(self) -> int:
        """Bytes held on the device: θ0 and the K stacked task vectors."""
        tensors = [*self.base.values(), *self.fixed.values(), *self.stack.values()]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    @property
    def device(self) -> torch.device:
        return next(iter(self.base.values())).device

    def lambda_shape(self, granularity: str) -> tuple[int, ...]:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        return (self.num_tasks,) if granularity == "task" else (self.num_tasks, len(self.keys))

    def initial_lambdas(self, granularity: str, init: float) -> Tensor:
        return torch.full(self.lambda_shape(granularity), float(init), device=self.device)

    def merge(self, lambdas: Tensor) -> StateDict:
        """θ(λ), differentiable in ``lambdas`` ([K] task-wise or [K, P] layer-wise)."""
        merged = dict(self.fixed)
        for index, key in enumerate(self.keys):
            coefficients = lambdas if lambdas.dim() == 1 else lambdas[:, index]
            base = self.base[key]
            merged[key] = base + torch.tensordot(coefficients.to(base.dtype), self.stack[key], dims=1)
        return merged


def shared_task_vectors(ctx: MergeContext) -> TaskVectorStack:
    """The run's task-vector stack on its device: built once and reused by every λ-optimising job of the run or
    sweep (its bytes recorded in the job's notes)."""
    stack = ctx.memo(("task_vectors", str(ctx.device)),
                     lambda: TaskVectorStack(ctx.pretrained(), ctx.experts(), ctx.device))
    ctx.note_held("task_vectors", stack)
    return stack
