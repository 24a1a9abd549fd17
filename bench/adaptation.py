"""Shared machinery of the λ-optimising (test-time) methods: unlabeled batches and the Adam loop over λ."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.problem import MergeContext, MergeProblem, StateDict

LossFn = Callable[[Tensor, int], Tensor]
GradientFn = Callable[[Tensor, int], tuple[Tensor, Tensor]]


class UnlabeledBatches:
    """Per task, ``total`` draws in batches of ``batch_size`` from the protocol's adaptation split.

    At most ``total`` distinct examples per task are drawn once (fewer when the split is smaller); batches walk
    through seeded reshuffles of them, epoch after epoch. Only the examples' positions in the split are held
    (8 bytes per draw, whatever the split's size): each batch is read from the suite's stored examples (e.g. the
    memory-mapped uint8 images), preprocessed and moved to the device when asked for. The latest batch of each
    task is kept, so the two passes of a sharpness-aware step read it once.
    """

    def __init__(self, problem: MergeProblem, total: int, batch_size: int, seed: int, device: torch.device):
        self.problem = problem
        self.batch_size = batch_size
        self.num_batches = -(-total // batch_size)
        self.device = device
        self.positions: dict[str, Tensor] = {}  # task -> split positions of every draw, in batch order
        self._latest: dict[str, tuple[int, Tensor]] = {}  # task -> (batch number, its inputs on the device)
        generator = torch.Generator().manual_seed(seed)
        distinct_counts = []
        draws = self.num_batches * batch_size
        for task in problem.tasks:
            distinct = min(total, problem.unlabeled_size(task))
            drawn = problem.unlabeled_indices(task, distinct, seed)
            epochs = -(-draws // distinct)
            order = torch.cat([torch.randperm(distinct, generator=generator) for _ in range(epochs)])
            self.positions[task] = drawn[order[:draws]]
            distinct_counts.append(distinct)
        self.distinct_per_task = min(distinct_counts)

    def batch(self, task: str, index: int) -> Tensor:
        """Batch ``index`` (taken modulo the number of batches) of ``task``."""
        number = index % self.num_batches
        latest = self._latest.get(task)
        if latest is None or latest[0] != number:
            start = number * self.batch_size
            inputs = self.problem.unlabeled_inputs(task, self.positions[task][start : start + self.batch_size])
            latest = (number, inputs.to(self.device, non_blocking=True))
            self._latest[task] = latest
        return latest[1]

    @property
    def nbytes(self) -> int:
        """Bytes held: the drawn positions and the latest batch of each task (never the split's examples)."""
        return sum(positions.nbytes for positions in self.positions.values()) + sum(
            inputs.nbytes for _, inputs in self._latest.values())


def plain_gradient(loss_fn: LossFn) -> GradientFn:
    def gradient(lambdas: Tensor, step: int) -> tuple[Tensor, Tensor]:
        loss = loss_fn(lambdas, step)
        (grad,) = torch.autograd.grad(loss, lambdas)
        return loss.detach(), grad

    return gradient


def optimise_lambdas(
    ctx: MergeContext,
    loss_fn: LossFn,
    initial: Tensor,
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    clamp: tuple[float, float] | None = None,
    gradient: GradientFn | None = None,
    desc: str = "adapting",
) -> Tensor:
    """Adam on λ for ``steps`` steps; ``gradient`` (default: plain autograd of ``loss_fn``) gives each step's
    (loss, gradient). Records seconds per step and the loss curve's ends in ``ctx.notes``."""
    gradient = gradient or plain_gradient(loss_fn)
    lambdas = initial.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([lambdas], lr=lr, weight_decay=weight_decay)
    losses = []
    with ctx.adapt_phase():
        begin = time.perf_counter()
        for step in tqdm(range(steps), desc=desc, leave=False, file=sys.stderr, disable=not ctx.progress):
            loss, grad = gradient(lambdas, step)
            optimiser.zero_grad(set_to_none=True)
            lambdas.grad = grad
            optimiser.step()
            if clamp is not None:
                with torch.no_grad():
                    lambdas.clamp_(*clamp)
            losses.append(float(loss))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        elapsed = time.perf_counter() - begin
    ctx.notes["seconds_per_step"] = elapsed / steps
    ctx.notes["loss_first"] = losses[0]
    ctx.notes["loss_last"] = losses[-1]
    ctx.notes["lambda_min"] = float(lambdas.detach().min())
    ctx.notes["lambda_max"] = float(lambdas.detach().max())
    ctx.notes["lambda_mean"] = float(lambdas.detach().mean())
    ctx.notes["lambda_std"] = float(lambdas.detach().std()) if lambdas.numel() > 1 else 0.0
    return lambdas.detach()


def per_expert_statistics(
    ctx: MergeContext, num_samples: int, statistic: Callable[[StateDict, str, Tensor], StateDict]
) -> list[StateDict]:
    """``statistic(expert, task, inputs)`` per task, on ``num_samples`` training inputs of the task and its expert
    on the device (Fisher diagonals, Gram matrices); timed as the adapt phase, returned on the CPU, task order."""
    results = []
    for task in ctx.tasks:
        inputs, _ = ctx.problem.labeled(task, num_samples, ctx.seed)
        expert = {k: v.to(ctx.device) for k, v in ctx.problem.expert(task).items()}
        with ctx.adapt_phase():
            results.append({k: v.cpu() for k, v in statistic(expert, task, inputs).items()})
    return results
