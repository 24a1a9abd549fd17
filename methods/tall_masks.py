"""TALL masks (Wang et al. 2024, *Localizing Task Information for Improved Model Merging and Compression*,
ICML 2024, arXiv 2405.07813, Eq. 3-5): one shared multi-task vector and, per task, a binary mask that restores
that task's weights from it.

    τ_MTL = Σ_i τ_i                                        (unscaled; τ_i = θ_i − θ0)
    m_t   = |τ_t| ≥ λ · |τ_MTL − τ_t|                      (TALL mask of task t, elementwise)
    θ_t   = θ0 + α · (m_t ⊙ τ_MTL)                          (the weights task t is evaluated on)

Defaults [λ = 0.6, α = 1]: FusionBench's ``tall_mask/task_arithmetic.py`` (scale 1; the original code picks λ per
task in {0.2, ..., 0.6} on labeled validation data, which a data-free method cannot). The mask is the one
``consensus_ta`` uses (``methods/consensus.py``: ≥ as written in the paper; FusionBench's code uses >, which
differs only where both sides are exactly equal).

The result is one set of weights per task (``output="per_task"``): what is kept is τ_MTL (one model) and K bit
masks, so each task adds ⌈n/8⌉ bytes per tensor of n entries (recorded as the per-task storage); each task's
weights are built from them when that task is evaluated, so K models never exist at once. Integer buffers are
the base's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bench.problem import MergeContext, PerTaskWeights, StateDict
from bench.registry import param, register_method, require_range
from bench.task_vectors import mergeable_keys, start_output
from bench.tensorwise import TensorInputs, scan_tensorwise
from methods.consensus import tall_masks


@dataclass(frozen=True)
class TallMasksParams:
    tall_lambda: float = param(0.6, "λ in the mask |τ_t| ≥ λ·|τ_MTL − τ_t|", low=0.0)
    scaling: float = param(1.0, "α in θ_t = θ0 + α (m_t ⊙ τ_MTL)")

    def __post_init__(self) -> None:
        require_range("tall_masks", "tall_lambda", self.tall_lambda, 0.0, None)


@dataclass
class SharedAndMasks:
    """Per key: the shared task vector (work dtype) and each task's mask as packed bits ``[K, ⌈n/8⌉]``."""

    shared: dict[str, Tensor]
    masks: dict[str, np.ndarray]

    def mask(self, key: str, task: int) -> Tensor:
        shape = self.shared[key].shape
        bits = np.unpackbits(self.masks[key][task], count=int(np.prod(shape, dtype=np.int64)))
        return torch.from_numpy(bits.astype(bool)).reshape(shape)

    def bytes_per_task(self) -> int:
        return sum(packed.shape[1] for packed in self.masks.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shared.values()) + sum(
            packed.nbytes for packed in self.masks.values())


def pack_masks(masks: Tensor) -> np.ndarray:
    """``[K, *shape]`` bool -> ``[K, ⌈n/8⌉]`` uint8 (numpy's packbits, most significant bit first)."""
    return np.packbits(masks.reshape(masks.shape[0], -1).numpy(), axis=1)


def tall_masks_tensor(inputs: TensorInputs, *, tall_lambda: float) -> tuple[Tensor, np.ndarray]:
    """τ_MTL and the packed TALL masks of one key."""
    tau = torch.stack(inputs.task_vectors)
    multi_task = tau.sum(dim=0)
    return multi_task, pack_masks(tall_masks(tau, tall_lambda, multi_task))


def masked_weights(base: StateDict, state: SharedAndMasks, task: int, coefficient: float) -> StateDict:
    """θ0 + coefficient · (m_task ⊙ shared), in the base's dtypes (other keys copied from the base)."""
    out = start_output(base)
    for key in mergeable_keys(base):
        shared = state.shared[key]
        out[key].copy_(base[key].to(shared.dtype) + coefficient * (state.mask(key, task) * shared))
    return out


def tall_masks_merge(base: StateDict, experts: Sequence[StateDict], *, tall_lambda: float, scaling: float,
                     tasks: Sequence[str] | None = None) -> PerTaskWeights:
    """One set of weights per task (``tasks`` names them; default 0, 1, ...), built when asked for."""
    results = scan_tensorwise(base, experts, lambda inputs: tall_masks_tensor(inputs, tall_lambda=tall_lambda))
    state = SharedAndMasks({key: value[0] for key, value in results.items()},
                           {key: value[1] for key, value in results.items()})
    names = list(tasks) if tasks is not None else [str(i) for i in range(len(experts))]

    def weights_of(index: int):
        return lambda: masked_weights(base, state, index, scaling)

    result = PerTaskWeights({name: weights_of(index) for index, name in enumerate(names)},
                            per_task_bytes=state.bytes_per_task())
    result.state = state
    return result


@register_method(
    "tall_masks",
    family="data-free",
    params=TallMasksParams,
    memory="stacked",
    output="per_task",
    description="TALL masks: one multi-task vector plus a binary mask per task restoring it (Wang et al. 2024)",
)
def merge(ctx: MergeContext, p: TallMasksParams) -> PerTaskWeights:
    result = tall_masks_merge(ctx.pretrained(), ctx.experts(), tall_lambda=p.tall_lambda, scaling=p.scaling,
                              tasks=ctx.tasks)
    ctx.notes.setdefault("held_bytes", {})["shared_and_masks"] = result.state.nbytes()
    return result
