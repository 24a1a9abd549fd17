"""Buffers shared by the merge kernels: reusable scratch (fresh pages cost far more than reused ones) and the
test for a zero-copy numpy view (numpy's single-threaded kernels beat torch's on CPU blocks)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def numpy_compatible(tensor: Tensor) -> bool:
    """Whether ``tensor.numpy()`` is a zero-copy view (CPU, a dtype numpy has, no autograd)."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype
        in (torch.float16, torch.float32, torch.float64, torch.int16, torch.int64, torch.bool)
        and not tensor.requires_grad
    )


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
