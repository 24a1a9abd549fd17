"""AdaMerging (Yang et al., ICLR 2024), "AdaMerging: Adaptive Model Merging for Multi-Task Learning", Eq. 5-6.

θ(λ) = θ0 + Σ_i λ_i ⊙ τ_i, with λ task-wise (K numbers, ``adamerging_tw``) or layer-wise (one per expert per
parameter tensor, ``adamerging_lw``). λ minimises the mean over tasks of the Shannon entropy of the merged
model's predictions on unlabeled batches of each task:

    L(λ) = (1/K) Σ_i mean_x H(softmax(f(x; θ(λ), head_i))),   H(p) = −Σ_c p_c log p_c

Reference defaults: init 0.3, λ clamped to [0, 1] after every step, Adam lr 1e-3, 16 unlabeled examples per
task per step, 1000 steps. The published protocol draws the unlabeled batches from the test split
(``transductive``); ``--set suite.protocol=inductive`` draws them from a disjoint split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.adaptation import UnlabeledBatches, optimise_lambdas
from bench.lambda_merge import shared_task_vectors
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method


@dataclass(frozen=True)
class AdaMergingParams:
    init: float = param(0.3, "initial value of every scaling coefficient λ")
    lr: float = param(1e-3, "Adam learning rate", low=0.0)
    steps: int = param(1000, "optimiser steps (one batch per task per step)", low=1)
    batch_size: int = param(16, "unlabeled examples per task per step", low=1)
    clamp: bool = param(True, "clamp λ to [0, 1] after every step")


def entropy_loss(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch (log_softmax for stability)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


def adamerging(ctx: MergeContext, p: AdaMergingParams, granularity: str) -> StateDict:
    problem = ctx.problem
    # Data first: a suite that cannot supply it fails (and the method is skipped) before any expert is loaded.
    batches = UnlabeledBatches(problem, p.steps * p.batch_size, p.batch_size, ctx.seed, ctx.device)
    ctx.notes["samples_per_task"] = batches.distinct_per_task
    stack = shared_task_vectors(ctx)

    def loss_fn(lambdas: Tensor, step: int) -> Tensor:
        logits = problem.logits_per_task(stack.merge(lambdas), {t: batches.batch(t, step) for t in problem.tasks})
        return torch.stack([entropy_loss(logits[task]) for task in problem.tasks]).mean()

    lambdas = optimise_lambdas(
        ctx,
        loss_fn,
        stack.initial_lambdas(granularity, p.init),
        steps=p.steps,
        lr=p.lr,
        clamp=(0.0, 1.0) if p.clamp else None,
    )
    with torch.no_grad():
        return {k: v.cpu() for k, v in stack.merge(lambdas).items()}


def _budget(p: AdaMergingParams) -> int:
    return p.steps * p.batch_size


@register_method("adamerging_tw", family="test-time", params=AdaMergingParams, data="unlabeled", budget=_budget,
                 memory="stacked", needs=("class_logits", "unlabeled_data"),
                 description="AdaMerging task-wise: one λ per expert, entropy minimisation on unlabeled data")
def merge_task_wise(ctx: MergeContext, p: AdaMergingParams) -> StateDict:
    return adamerging(ctx, p, "task")


@register_method("adamerging_lw", family="test-time", params=AdaMergingParams, data="unlabeled", budget=_budget,
                 memory="stacked", needs=("class_logits", "unlabeled_data"),
                 description="AdaMerging layer-wise: one λ per expert per tensor, entropy minimisation")
def merge_layer_wise(ctx: MergeContext, p: AdaMergingParams) -> StateDict:
    return adamerging(ctx, p, "layer")
