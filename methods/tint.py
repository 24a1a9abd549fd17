"""Model Tinting: Jung, Lee, Han and Hong (2024), "Tint Your Models Task-wise for Improved Multi-task Model
Merging" (v2, 2025: "Why Train Everything? Tint a Single Layer for Multi-task Model Merging"), arXiv 2412.19098.

Layer-wise merged trunk shared by all tasks, plus ONE trainable task-specific layer per task (the "tint"):

    θ(λ)      = θ0 + Σ_i clamp(λ_{i,p}, 0, 1) · τ_{i,p}        one λ per expert i per tensor p, λ_init = 0.3
    θ_t       = θ(λ) with tensor ``tint_param`` replaced by the free tensor W_t   (the weights task t runs on)
    L_t(λ, W_t) = CE(f(x; θ_t, head_t), ŷ),    ŷ = argmax f(x; θ_expert_t, head_t)   (pseudo-labels, no grad)

The clamp is applied in the forward (λ itself is never clipped; its gradient is zero outside [0, 1]), as in the
reference. Training, as the reference: one Adam (lr 1e-2, no weight decay) over λ and every W_t; each epoch
visits the tasks in a shuffled order (``ctx.generator``) and, per task, takes one batch of 32 unlabeled examples
of the task's adaptation split (the test split under the transductive protocol) and one optimiser step on L_t
alone (so W_t only moves on task t's steps; λ moves on every step). 500 epochs. ``variant=tinting++`` keeps in
L_t only the examples where the merged model agrees with the expert's argmax, or disagrees while the expert's
top probability is ≥ the merged model's (Tinting++, the reference's ``crosspseudoconf`` loss).

The result is one set of weights per task (``output="per_task"``, ``PerTaskWeights``): the same shared tensors
θ(λ) for every task (the same tensor objects) and the task's own W_t. ``ctx.notes`` records the tinted tensor,
its size per task (``tint_extra_params_per_task``, ``tint_extra_bytes_per_task``; also the result's
``per_task_bytes``) and the total over tasks, for the storage-cost column.

Reference: repo AIM-SKKU/ModelTinting, ``src/main_layer_wise_adamerging.py`` with ``--classifier_train
--prior 0.3`` and ``--losstype crosspseudo`` (``train.sh``) or ``crosspseudoconf`` (``train_plus.sh``).

Deliberate differences from the reference:
- The reference's tint is the task's classification head (initialised from the zero-shot head), which is not
  merged. Here heads stay inside the suite, frozen, and a method returns only the merged keys, so the tint is one
  of the MERGED tensors, ``tint_param``. ``auto`` picks the 2-D merged tensor nearest to the logits in the
  autograd graph of one forward of the first task's first batch (fewest operations between it and the output,
  ties broken by the graph's breadth-first order): the layer that plays the head's role (the reference README
  notes that any layer can be the tint). On tiny8 / the CLIP suites that is the visual projection ``proj`` (the
  last linear map before the zero-shot head); on tinylm it is the tied embedding ``transformer.wte.weight``,
  the output layer (being tied, each task's tint is also its input embedding). The plain sorted-key order would
  pick a mid-network MLP matrix instead (tiny8: ``transformer.resblocks.1.mlp.c_proj.weight``). W_t starts
  from the tensor's value in θ(λ_init) (``tint_init=merged``: what the shared model uses at the start, as the
  reference's head starts from what every model uses); the λ's of the tinted tensor then have no effect.
- Each step's batch comes from :class:`bench.adaptation.UnlabeledBatches`: ``epochs × 32`` draws per task
  walked without replacement through seeded reshuffles of at most that many distinct examples (the reference
  re-creates a shuffled loader every step and takes its first batch, i.e. independent random batches).
- The experts' pseudo-labels (and, for Tinting++, their confidences) are computed once per batch before
  training, from each expert loaded once (same values as the reference computing them per step).
- Tinting++ with no example kept in a batch gives a zero loss (the reference would produce NaN); the number of
  such steps is recorded in ``ctx.notes["tint_empty_steps"]``.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from bench.adaptation import UnlabeledBatches
from bench.errors import BenchError, unknown_name_error
from bench.lambda_merge import TaskVectorStack, shared_task_vectors
from bench.problem import MergeContext, MergeProblem, PerTaskWeights, StateDict
from bench.registry import param, register_method

VARIANTS = ("tinting", "tinting++")
TINT_INITS = ("merged", "pretrained", "expert")


@dataclass(frozen=True)
class TintParams:
    init: float = param(0.3, "initial value of every λ (the reference's --prior 0.3)")
    lr: float = param(1e-2, "Adam learning rate of λ and the tinted tensors (reference, with --classifier_train)",
                      low=0.0)
    epochs: int = param(500, "epochs; each is one step per task, in a shuffled task order", low=1)
    batch_size: int = param(32, "unlabeled examples per step", low=1)
    variant: str = param("tinting", "tinting: CE to the expert's argmax; tinting++: only confident pseudo-labels",
                         choices=VARIANTS)
    tint_param: str = param("auto", "merged tensor tinted per task (auto: the 2-D tensor nearest the logits)")
    tint_init: str = param("merged", "start of each tinted tensor: θ(λ_init), θ0 or the task's expert",
                           choices=TINT_INITS)


# ------------------------------------------------------------------------------------------------------------
# The math


def clamped(lambdas: Tensor) -> Tensor:
    """clamp(λ, 0, 1), applied in the forward (zero gradient outside [0, 1])."""
    return torch.clamp(lambdas, 0.0, 1.0)


def tinted(shared: Mapping[str, Tensor], key: str, tint: Tensor) -> StateDict:
    """The weights one task runs on: the shared tensors with ``key`` replaced by the task's tint (cast to the
    shared tensor's dtype)."""
    weights = dict(shared)
    weights[key] = tint.to(shared[key].dtype)
    return weights


def expert_targets(expert_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(argmax pseudo-labels, the expert's top softmax probability) of a batch of expert logits."""
    probabilities = expert_logits.detach().float().softmax(dim=-1)
    confidence, labels = probabilities.max(dim=-1)
    return labels, confidence


def kept_examples(student_logits: Tensor, labels: Tensor, confidence: Tensor) -> Tensor:
    """Tinting++'s filter (bool [n]): the merged model agrees with the pseudo-label, or disagrees while the
    expert's top probability is at least the merged model's."""
    student_confidence, student_labels = student_logits.detach().float().softmax(dim=-1).max(dim=-1)
    return (student_labels == labels) | (confidence >= student_confidence)


def pseudo_label_loss(student_logits: Tensor, labels: Tensor, confidence: Tensor | None = None) -> Tensor:
    """Mean CE of the merged model against the expert's argmax labels; with ``confidence`` (Tinting++), over the
    kept examples only, and 0 (with a zero gradient) when none is kept."""
    logits = student_logits.float()
    if confidence is None:
        return F.cross_entropy(logits, labels)
    keep = kept_examples(logits, labels, confidence)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], labels[keep])


def task_order(num_tasks: int, generator: torch.Generator) -> list[int]:
    """One epoch's shuffled visiting order of the tasks."""
    return torch.randperm(num_tasks, generator=generator).tolist()


def nearest_to_output(output: Tensor, params: Mapping[str, Tensor]) -> list[str]:
    """The keys of ``params`` (leaves of ``output``'s graph) in breadth-first order from ``output``: the first
    is the tensor with the fewest operations between it and the output."""
    by_id = {id(tensor): key for key, tensor in params.items()}
    found: list[str] = []
    seen: set = set()
    queue = deque([output.grad_fn])
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in by_id and by_id[id(variable)] not in found:
            found.append(by_id[id(variable)])
        queue.extend(child for child, _ in node.next_functions)
    return found


def auto_tint_param(problem: MergeProblem, weights: Mapping[str, Tensor], keys: Sequence[str], task: str,
                    inputs: Tensor) -> str:
    """The 2-D tensor among ``keys`` nearest to ``task``'s logits (any tensor if no 2-D one is reached)."""
    leaves = {key: weights[key].detach().clone().requires_grad_(True) for key in keys}
    with torch.enable_grad():
        output = problem.logits({**weights, **leaves}, task, inputs)
        order = nearest_to_output(output, leaves)
    if not order:
        raise BenchError(f"tint: no merged tensor reaches the logits of task '{task}'; set tint.tint_param")
    matrices = [key for key in order if leaves[key].ndim == 2]
    return (matrices or order)[0]


# ------------------------------------------------------------------------------------------------------------
# Training


def compute_expert_targets(problem: MergeProblem, batches: UnlabeledBatches, device: torch.device
                           ) -> dict[str, tuple[Tensor, Tensor]]:
    """Per task, the expert's pseudo-labels and confidences on every batch ([num_batches, batch_size] each);
    each expert is loaded once and freed before the next."""
    targets = {}
    with torch.no_grad():
        for task in problem.tasks:
            expert = {k: v.to(device) for k, v in problem.expert(task).items()}
            labels, confidence = zip(*(expert_targets(problem.logits(expert, task, batches.batch(task, b)))
                                       for b in range(batches.num_batches)), strict=True)
            targets[task] = (torch.stack(labels), torch.stack(confidence))
            del expert
    return targets


@dataclass
class TintResult:
    lambdas: Tensor  # raw λ [K, P] (unclamped)
    tints: list[Tensor]  # W_t, task order
    visited: list[int]  # task indices in the order they were stepped
    losses: list[float]
    empty_steps: int


def train_tint(problem: MergeProblem, stack: TaskVectorStack, batches: UnlabeledBatches,
               targets: Mapping[str, tuple[Tensor, Tensor]], key: str, initial_tints: Sequence[Tensor],
               p: TintParams, generator: torch.Generator, progress: bool = False) -> TintResult:
    """The reference loop: per epoch a shuffled task order; per task one batch and one Adam step on its loss.

    One Adam holds λ and every W_t; a step's gradient is set on λ and W_t only (the other tints' gradients are
    None, so Adam leaves them and their moments untouched, as ``zero_grad`` + ``backward`` do in the reference).
    """
    tasks = problem.tasks
    lambdas = stack.initial_lambdas("layer", p.init).requires_grad_(True)
    tints = [tint.detach().clone().requires_grad_(True) for tint in initial_tints]
    optimiser = torch.optim.Adam([lambdas, *tints], lr=p.lr, betas=(0.9, 0.999), weight_decay=0.0)
    visited, losses, empty = [], [], 0
    for epoch in tqdm(range(p.epochs), desc="tinting", leave=False, file=sys.stderr, disable=not progress):
        for index in task_order(len(tasks), generator):
            task = tasks[index]
            labels, confidence = targets[task]
            row = epoch % batches.num_batches
            logits = problem.logits(tinted(stack.merge(clamped(lambdas)), key, tints[index]), task,
                                    batches.batch(task, epoch))
            conf = confidence[row] if p.variant == "tinting++" else None
            if conf is not None and not bool(kept_examples(logits, labels[row], conf).any()):
                empty += 1
            loss = pseudo_label_loss(logits, labels[row], conf)
            optimiser.zero_grad(set_to_none=True)
            lambdas.grad, tints[index].grad = torch.autograd.grad(loss, [lambdas, tints[index]], allow_unused=True)
            optimiser.step()
            visited.append(index)
            losses.append(float(loss.detach()))
    return TintResult(lambdas.detach(), [tint.detach() for tint in tints], visited, losses, empty)


def initial_tints(stack: TaskVectorStack, key: str, init: float, how: str) -> list[Tensor]:
    """W_t at the start, in the work precision (fp32; fp64 stays fp64)."""
    dtype = torch.float64 if stack.base[key].dtype == torch.float64 else torch.float32
    base = stack.base[key].to(dtype)
    if how == "pretrained":
        values = [base] * stack.num_tasks
    elif how == "expert":
        values = [base + stack.stack[key][i].to(dtype) for i in range(stack.num_tasks)]
    else:
        coefficients = clamped(torch.full((stack.num_tasks,), float(init), device=base.device, dtype=dtype))
        values = [base + torch.tensordot(coefficients, stack.stack[key].to(dtype), dims=1)] * stack.num_tasks
    return [value.clone() for value in values]


def tint(ctx: MergeContext, p: TintParams) -> PerTaskWeights:
    problem = ctx.problem
    # Data first: a suite that cannot supply it fails (and the method is skipped) before any expert is loaded.
    batches = UnlabeledBatches(problem, p.epochs * p.batch_size, p.batch_size, ctx.seed, ctx.device)
    ctx.notes["samples_per_task"] = batches.distinct_per_task
    stack = shared_task_vectors(ctx)
    if p.tint_param == "auto":
        with torch.no_grad():
            start = stack.merge(clamped(stack.initial_lambdas("layer", p.init)))
        key = auto_tint_param(problem, start, stack.keys, problem.tasks[0], batches.batch(problem.tasks[0], 0))
    elif p.tint_param in stack.keys:
        key = p.tint_param
    else:
        raise unknown_name_error("tint.tint_param (merged tensor)", p.tint_param, stack.keys)

    with ctx.adapt_phase():
        targets = ctx.memo(("tint_expert_targets", ctx.seed, p.epochs, p.batch_size, str(ctx.device)),
                           lambda: compute_expert_targets(problem, batches, ctx.device))
        starts = initial_tints(stack, key, p.init, p.tint_init)
        ctx.note_held("tints", starts)
        begin = time.perf_counter()
        result = train_tint(problem, stack, batches, targets, key, starts, p, ctx.generator, ctx.progress)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        elapsed = time.perf_counter() - begin

    numel = stack.base[key].numel()
    element_size = stack.base[key].element_size()
    lambdas = clamped(result.lambdas)
    ctx.notes.update({
        "tint_param": key,
        "tint_shape": list(stack.base[key].shape),
        "tint_extra_params_per_task": numel,
        "tint_extra_bytes_per_task": numel * element_size,
        "tint_extra_bytes_total": numel * element_size * stack.num_tasks,
        "seconds_per_step": elapsed / len(result.losses),
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "lambda_min": float(lambdas.min()),
        "lambda_max": float(lambdas.max()),
        "lambda_mean": float(lambdas.mean()),
    })
    if p.variant == "tinting++":
        ctx.notes["tint_empty_steps"] = result.empty_steps
    with torch.no_grad():
        shared = {k: v.cpu() for k, v in stack.merge(lambdas).items()}
    return PerTaskWeights({task: tinted(shared, key, result.tints[i].cpu()) for i, task in enumerate(problem.tasks)},
                          per_task_bytes=numel * element_size)


def _budget(p: TintParams) -> int:
    return p.epochs * p.batch_size


@register_method("tint", family="test-time", params=TintParams, data="unlabeled", budget=_budget,
                 memory="stacked", needs=("class_logits", "unlabeled_data"), output="per_task",
                 description="Model Tinting: layer-wise λ shared + one tinted tensor per task, expert pseudo-labels")
def merge(ctx: MergeContext, p: TintParams) -> PerTaskWeights:
    return tint(ctx, p)
