"""SAMerging: "Model Merging via Multi-Teacher Knowledge Distillation" (Dec 2025), the method this harness
exists to evaluate.

Parameterisation (as AdaMerging, no clamping, no normalisation of λ):
    θ(λ) = θ0 + Σ_i λ_i ⊙ τ_i        layer-wise λ ∈ R^{K×P} (``samerging``) or task-wise λ ∈ R^K (``samerging_tw``)

Objective, multi-teacher distillation with temperature T (forward KL, batch mean, tasks weighted equally, no T²):
    L(λ) = Σ_i KL( softmax(z_i^teacher / T) ‖ softmax(z_i^student(λ) / T) )
where teacher i is expert θ_i with head i and the student is θ(λ) with head i. The teachers' logits are computed
once per cached batch, after which the experts are no longer needed. ``objective=entropy`` swaps in
AdaMerging's entropy loss (an ablation: AdaMerging's objective optimised with SAM).

Optimiser, sharpness-aware minimisation around λ (Foret et al. 2021; adaptive: Kwon et al. 2021):
    g  = ∇L(λ)
    ε  = ρ · λ² ⊙ g / ‖ |λ| ⊙ g ‖     (adaptive, the reference)       ε = ρ · g / ‖g‖   (``adaptive=false``)
    g' = ∇L(λ + ε)                      θ(λ + ε) is REBUILT before this second forward pass
    λ ← Adam step from λ with g' (lr 1e-3, weight decay 5e-4)
The public reference code caches the merged weights and only rebuilds them after the optimiser's second step,
so its "perturbed" pass runs on the unperturbed weights and g' = g (ρ has no effect). Here the second pass always
merges from λ + ε (tested: g' ≠ g for ρ > 0, g' = g for ρ = 0). ``rho=0`` is the distillation-only ablation.

Reference defaults: init 0.0, ρ 0.07, T 2 (CLIP layer-wise; 1 elsewhere), 100 batches × 16 unlabeled images
per task drawn once and cycled for 10 epochs (1000 steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.adaptation import LossFn, UnlabeledBatches, optimise_lambdas
from bench.lambda_merge import shared_task_vectors
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method
from methods.adamerging import entropy_loss


@dataclass(frozen=True)
class SAMergingParams:
    init: float = param(0.0, "initial value of every scaling coefficient λ")
    rho: float = param(0.07, "SAM neighbourhood radius ρ (0: plain Adam, distillation only)", low=0.0)
    adaptive: bool = param(True, "adaptive SAM (ASAM, scale-invariant ε) instead of plain SAM")
    temperature: float = param(2.0, "distillation temperature T", low=1e-6)
    objective: str = param("kl", "kl: multi-teacher distillation; entropy: AdaMerging's loss",
                           choices=("kl", "entropy"))
    lr: float = param(1e-3, "Adam learning rate", low=0.0)
    weight_decay: float = param(5e-4, "Adam weight decay on λ", low=0.0)
    num_batches: int = param(100, "unlabeled batches per task, drawn once", low=1)
    batch_size: int = param(16, "examples per batch", low=1)
    epochs: int = param(10, "passes over the cached batches (steps = num_batches × epochs)", low=1)


@dataclass(frozen=True)
class SAMergingTaskWiseParams(SAMergingParams):
    temperature: float = param(1.0, "distillation temperature T (1 for task-wise in the reference)", low=1e-6)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean, computed from log-probabilities."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def sam_perturbation(lambdas: Tensor, grad: Tensor, rho: float, adaptive: bool) -> Tensor:
    """ε = ρ λ² ⊙ g / ‖|λ| ⊙ g‖ (adaptive) or ρ g / ‖g‖; zero where the norm vanishes."""
    if adaptive:
        norm = (lambdas.abs() * grad).norm()
        direction = lambdas.pow(2) * grad
    else:
        norm = grad.norm()
        direction = grad
    if norm == 0:
        return torch.zeros_like(lambdas)
    return rho * direction / norm


def sam_gradients(loss_fn: LossFn, lambdas: Tensor, step: int, rho: float, adaptive: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(loss at λ, clean gradient at λ, gradient at λ + ε); ``loss_fn`` rebuilds θ from whatever λ it gets."""
    loss = loss_fn(lambdas, step)
    (clean,) = torch.autograd.grad(loss, lambdas)
    epsilon = sam_perturbation(lambdas.detach(), clean, rho, adaptive)
    perturbed = (lambdas.detach() + epsilon).requires_grad_(True)
    (sharp,) = torch.autograd.grad(loss_fn(perturbed, step), perturbed)
    return loss.detach(), clean, sharp


def cache_teacher_logits(ctx: MergeContext, batches: UnlabeledBatches) -> dict[str, list[Tensor]]:
    """Each expert's logits on every cached batch of its own task, computed once; the expert is then freed."""
    problem, logits = ctx.problem, {}
    with torch.no_grad():
        for task in problem.tasks:
            expert = {k: v.to(ctx.device) for k, v in problem.expert(task).items()}
            logits[task] = [problem.logits(expert, task, batches.batch(task, b)) for b in range(batches.num_batches)]
            del expert
    return logits


def teacher_logits(ctx: MergeContext, batches: UnlabeledBatches) -> dict[str, list[Tensor]]:
    """:func:`cache_teacher_logits` once per run for these batches (seed, count, size, device): methods that draw
    the same batches (SAMerging, Expert Merging, StatsMerging) share it."""
    key = ("samerging_teacher_logits", ctx.seed, batches.num_batches, batches.batch_size, str(ctx.device))
    return ctx.memo(key, lambda: cache_teacher_logits(ctx, batches))


def samerging(ctx: MergeContext, p: SAMergingParams, granularity: str) -> StateDict:
    problem = ctx.problem
    batches = UnlabeledBatches(problem, p.num_batches * p.batch_size, p.batch_size, ctx.seed, ctx.device)
    ctx.notes["samples_per_task"] = batches.distinct_per_task
    teachers: dict[str, list[Tensor]] = teacher_logits(ctx, batches) if p.objective == "kl" else {}
    stack = shared_task_vectors(ctx)

    def loss_fn(lambdas: Tensor, step: int) -> Tensor:
        batch_index = step % batches.num_batches
        students = problem.logits_per_task(stack.merge(lambdas),
                                           {task: batches.batch(task, batch_index) for task in problem.tasks})
        if p.objective == "kl":
            losses = [distillation_loss(students[task], teachers[task][batch_index], p.temperature)
                      for task in problem.tasks]
        else:
            losses = [entropy_loss(students[task]) for task in problem.tasks]
        return torch.stack(losses).sum()

    def gradient(lambdas: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if p.rho == 0:  # ε = 0: the second pass would repeat the first
            loss = loss_fn(lambdas, step)
            (grad,) = torch.autograd.grad(loss, lambdas)
            return loss.detach(), grad
        loss, _, sharp = sam_gradients(loss_fn, lambdas, step, p.rho, p.adaptive)
        return loss, sharp

    lambdas = optimise_lambdas(
        ctx,
        loss_fn,
        stack.initial_lambdas(granularity, p.init),
        steps=batches.num_batches * p.epochs,
        lr=p.lr,
        weight_decay=p.weight_decay,
        gradient=gradient,
    )
    with torch.no_grad():
        return {k: v.cpu() for k, v in stack.merge(lambdas).items()}


def _budget(p: SAMergingParams) -> int:
    return p.num_batches * p.batch_size


@register_method("samerging", family="test-time", params=SAMergingParams, data="unlabeled", budget=_budget,
                 memory="stacked", needs=("class_logits", "unlabeled_data"),
                 description="SAMerging layer-wise: multi-teacher KD of λ with sharpness-aware minimisation")
def merge_layer_wise(ctx: MergeContext, p: SAMergingParams) -> StateDict:
    return samerging(ctx, p, "layer")


@register_method("samerging_tw", family="test-time", params=SAMergingTaskWiseParams, data="unlabeled", budget=_budget,
                 memory="stacked", needs=("class_logits", "unlabeled_data"),
                 description="SAMerging task-wise: one λ per expert, multi-teacher KD with SAM")
def merge_task_wise(ctx: MergeContext, p: SAMergingParams) -> StateDict:
    return samerging(ctx, p, "task")
