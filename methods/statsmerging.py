"""StatsMerging: "StatsMerging: Statistics-Guided Model Merging via Task-Specific Teacher Distillation"
(2025, arXiv 2506.04567), reimplemented from the paper with label-free pseudo-labels.

Per merged tensor p (a "layer"), the K task vectors τ_{i,p} = θ_{i,p} − θ0_p are flattened and stacked into
M_p ∈ R^{K×d_p}. Six statistics of M_p form the layer's feature vector (as the released code computes them):

    s_p = [mean(M_p), std(M_p), var(M_p), ‖M_p‖_F, σ1(M_p), #{σ_j(M_p) > 1e-3}]

std/var are unbiased (torch's default); σ_j are the singular values of the K×d_p stacked matrix itself, so
the SVD features are defined for every tensor shape (biases, LayerNorm vectors, Conv1D [in, out] weights)
without a special case. Because the raw features span many orders of magnitude (‖M‖ ≫ var, the rank count is
an integer), each of the 6 columns is standardised across the P layers before the MLPs see it:
    ŝ_{p,f} = (s_{p,f} − mean_p s_{·,f}) / std_p s_{·,f}   (population std; a column constant across layers → 0).

One small MLP per layer (6 → hidden → hidden → K, ReLU, softmax; Xavier-uniform weights, zero biases, as the
code) maps ŝ_p to the layer's coefficients c_p = softmax(MLP_p(ŝ_p)) ∈ Δ^{K−1} (they sum to 1 per layer), and

    θ_p = θ0_p + Σ_i c_{p,i} τ_{i,p}          (θ0's coefficient fixed at 1, as in the code)

The MLPs are trained by task-specific teacher distillation: expert i is the teacher of task i; its argmax on
unlabeled test-time inputs of task i (the suite's protocol) is the pseudo-label, and the loss is
    L = Σ_i CE(f(x_i; θ(c), head_i), argmax f(x_i; θ_i, head_i))
summed over tasks (the code sums the per-dataset losses), one batch per task per step, AdamW (lr 1e-3,
weight decay 1e-4, as the code). The teachers' logits are computed once and shared with SAMerging's for the same
batches (``methods.samerging.teacher_logits``).

Defaults (all the released code's): hidden 256, AdamW lr 1e-3, weight decay 1e-4, 500 steps of one batch of 4
unlabeled examples per task (budget 2000 draws per task; tiny8 full: ~13 s of adaptation on 2 CPU cores).

Deliberate differences from the released code (``src/train-8-models-stats-merge.py``):
- it trains on ground-truth test labels (test-label leakage); here the experts' argmax pseudo-labels, as the
  paper describes (data="unlabeled");
- it computes the coefficients under ``torch.no_grad()`` and ``.detach()``es them before merging, so no gradient
  ever reaches the MLPs and the coefficients stay at their random initialisation (only the heads learn); here the
  merge is differentiable in the MLP parameters (tested);
- it also trains the classification heads; here the heads are the experts' and stay fixed;
- it feeds the raw (unnormalised) features to the MLPs; here they are standardised across layers (above);
- its cosine LR schedule (T_max=100 over 500 steps, i.e. a restarting cosine) is dropped: constant lr.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from bench.adaptation import UnlabeledBatches
from bench.lambda_merge import TaskVectorStack, shared_task_vectors
from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method
from methods.samerging import teacher_logits

NUM_FEATURES = 6
RANK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class StatsMergingParams:
    hidden: int = param(256, "hidden width of each layer's MLP (6 → hidden → hidden → K)", low=1)
    lr: float = param(1e-3, "AdamW learning rate", low=0.0)
    weight_decay: float = param(1e-4, "AdamW weight decay on the MLP parameters", low=0.0)
    steps: int = param(500, "optimiser steps (one unlabeled batch per task per step)", low=1)
    batch_size: int = param(4, "unlabeled examples per task per step", low=1)


def layer_statistics(task_vectors: Tensor) -> Tensor:
    """The 6 raw features of one layer from its stacked task vectors [K, *shape]:
    mean, std, var, Frobenius norm, top singular value and #σ > 1e-3 of the K×d flattened stack."""
    flat = task_vectors.detach().reshape(task_vectors.shape[0], -1).float()
    if flat.numel() == 0:
        return torch.zeros(NUM_FEATURES)
    singular = torch.linalg.svdvals(flat)
    spread = (flat.std(), flat.var()) if flat.numel() > 1 else (torch.zeros(()), torch.zeros(()))
    return torch.stack([
        flat.mean(), *spread, flat.norm(), singular[0], (singular > RANK_TOLERANCE).sum().to(flat.dtype),
    ]).cpu()


def normalise_features(features: Tensor) -> Tensor:
    """Standardise each feature column across layers ([P, 6] → [P, 6]); a constant column becomes 0."""
    centred = features - features.mean(dim=0, keepdim=True)
    scale = features.std(dim=0, unbiased=False, keepdim=True) if features.shape[0] > 1 else torch.zeros(1, 1)
    return torch.where(scale > 0, centred / torch.where(scale > 0, scale, 1.0), torch.zeros_like(centred))


def stack_features(stack: TaskVectorStack) -> Tensor:
    """Normalised features of every merged tensor, in ``stack.keys`` order: [P, 6]."""
    return normalise_features(torch.stack([layer_statistics(stack.stack[key]) for key in stack.keys]))


def init_mlps(num_layers: int, hidden: int, num_tasks: int, generator: torch.Generator) -> list[Tensor]:
    """P independent MLPs held as batched weights [W1 [P,6,H], b1 [P,H], W2 [P,H,H], b2, W3 [P,H,K], b3];
    Xavier-uniform weights (bound √(6/(fan_in+fan_out))) drawn from ``generator``, zero biases."""
    params = []
    for fan_in, fan_out in ((NUM_FEATURES, hidden), (hidden, hidden), (hidden, num_tasks)):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight = (torch.rand(num_layers, fan_in, fan_out, generator=generator) * 2 - 1) * bound
        params += [weight, torch.zeros(num_layers, fan_out)]
    return params


def coefficients(mlps: list[Tensor], features: Tensor) -> Tensor:
    """c = softmax(MLP_p(ŝ_p)) per layer: [P, K], each row sums to 1; differentiable in ``mlps``."""
    w1, b1, w2, b2, w3, b3 = mlps
    h = torch.relu(torch.einsum("pf,pfh->ph", features, w1) + b1)
    h = torch.relu(torch.einsum("pf,pfh->ph", h, w2) + b2)
    return torch.softmax(torch.einsum("pf,pfh->ph", h, w3) + b3, dim=-1)


def pseudo_label_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """CE of the student against the teacher's argmax (batch mean)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def train_mlps(ctx: MergeContext, stack: TaskVectorStack, batches: UnlabeledBatches,
               teacher_logits: dict[str, list[Tensor]], p: StatsMergingParams) -> tuple[list[Tensor], Tensor]:
    """AdamW on the MLP parameters for ``p.steps`` steps; returns (trained MLPs, normalised features)."""
    problem = ctx.problem
    features = stack_features(stack).to(ctx.device)
    mlps = [t.to(ctx.device).requires_grad_(True)
            for t in init_mlps(len(stack.keys), p.hidden, stack.num_tasks, ctx.generator)]
    optimiser = torch.optim.AdamW(mlps, lr=p.lr, weight_decay=p.weight_decay)
    losses = []
    with ctx.adapt_phase():
        begin = time.perf_counter()
        for step in tqdm(range(p.steps), desc="adapting", leave=False, file=sys.stderr, disable=not ctx.progress):
            index = step % batches.num_batches
            merged = stack.merge(coefficients(mlps, features).T)
            students = problem.logits_per_task(merged, {t: batches.batch(t, index) for t in problem.tasks})
            loss = torch.stack([pseudo_label_loss(students[t], teacher_logits[t][index])
                                for t in problem.tasks]).sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        elapsed = time.perf_counter() - begin
    ctx.notes["seconds_per_step"] = elapsed / p.steps
    ctx.notes["loss_first"], ctx.notes["loss_last"] = losses[0], losses[-1]
    return [t.detach() for t in mlps], features


def statsmerging(ctx: MergeContext, p: StatsMergingParams) -> StateDict:
    problem = ctx.problem
    batches = UnlabeledBatches(problem, p.steps * p.batch_size, p.batch_size, ctx.seed, ctx.device)
    ctx.notes["samples_per_task"] = batches.distinct_per_task
    teachers = teacher_logits(ctx, batches)
    stack = shared_task_vectors(ctx)
    mlps, features = train_mlps(ctx, stack, batches, teachers, p)
    with torch.no_grad():
        final = coefficients(mlps, features)
        ctx.notes["coefficient_mean_per_task"] = [round(float(v), 4) for v in final.mean(dim=0)]
        ctx.notes["coefficient_min"], ctx.notes["coefficient_max"] = float(final.min()), float(final.max())
        return {k: v.cpu() for k, v in stack.merge(final.T).items()}


def _budget(p: StatsMergingParams) -> int:
    return p.steps * p.batch_size


@register_method("statsmerging", family="test-time", params=StatsMergingParams, data="unlabeled", budget=_budget,
                 memory="stacked", needs=("class_logits", "unlabeled_data"),
                 description="StatsMerging: per-layer MLPs map task-vector statistics to softmax coefficients, "
                             "distilled from the experts' pseudo-labels")
def merge(ctx: MergeContext, p: StatsMergingParams) -> StateDict:
    return statsmerging(ctx, p)
