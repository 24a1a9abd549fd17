"""FW-Merging, hard variant (H. M. Chen, S. X. Hu, W. Luk, T. Hospedales, H. Fan, ICCV 2025, *FW-Merging: Scaling
Model Merging with Frank-Wolfe Optimization*, arXiv 2503.12649), as FusionBench's ``method/fw_merging/fw_hard.py``
computes it (``merge_fn: task_arithmetic``, ``loss_fn: cross_entropy``; methods-wave2.md "FW-Merging").

Candidates ("vertices") are the K fine-tuned models θ_1 … θ_K and the starting point θ_init:

    θ_init = θ0 + s · Σ_i (θ_i − θ0)                                                      [s = 0.3]
    θ^(0)  = θ_init
    for t = 0 … T−1:                                                                      [T = 10]
        g      = ∇_θ (1 / (n·K)) Σ_tasks Σ_{(x, y) in the t-th n examples of the task} CE(f_task(x; θ^(t)), y)
                                                                                           [n = 100, labeled train]
        c_m[p] = ⟨g[p], θ_m[p]⟩ / (‖g[p]‖ ‖θ_m[p]‖)    per candidate m and merged tensor p (raw weights)
        model granularity: m* = argmin_m Σ_p c_m[p], the same candidate for every tensor
        layer granularity: m*[p] = argmin_m c_m[p], one candidate per tensor
        γ_t    = s · η · 2 / (t + 2)                                                      [η = step_size = 0.1]
        θ^(t+1)[p] = θ^(t)[p] + γ_t (θ_{m*[p]}[p] − θ^(t)[p])

Defaults are FusionBench's ``config/method/fw_merging/fw_hard.yaml`` (max_iters 10, step_size 0.1,
scaling_factor 0.3, dataset_size 100, cross-entropy, granularity "task" — called ``model`` here).

Fidelity notes (quirks kept on purpose):
- The cosine is taken with the candidates' *raw weights* θ_m, not with the task vectors or with the FW direction
  θ_m − θ^(t) (a textbook Frank-Wolfe oracle would minimise ⟨g, θ_m⟩). Because every candidate shares θ0, the
  cosines differ little between candidates. ``alignment=task_vectors`` uses θ_m − θ0 instead (θ_init − θ0 for
  the starting point) as an ablation; it is not the reference.
- The update scales the FW step by ``scaling_factor`` again (γ = 0.03 · 2/(t+2) at the defaults), as the reference
  reuses its task-arithmetic merge function with ``scaling_factor = step · scaling_factor``.
- θ_init stays a candidate throughout, after the experts (ties go to the earlier candidate, as the reference's
  strict ``<`` over its dict order: experts in task order, then ``initial``).
- Data: the reference draws each iteration's n examples per task from one shuffled, infinite training loader
  (batch 1), so iteration t sees the *next* n examples. Here the n·T examples per task are drawn once
  (``problem.labeled(task, n·T, seed)``) and iteration t uses examples [t·n, (t+1)·n) (``resample=true``, the
  default, a budget of n·T per task); ``resample=false`` reuses the first n in every iteration (budget n).
  The reference's loader wraps around (and reshuffles) when a split holds fewer than n·T examples; here a suite
  whose ``labeled`` refuses n·T fails with a message naming the settings to lower, and one that hands over fewer
  examples than asked is walked cyclically without a reshuffle (all of them every iteration if fewer than n).

Deliberate differences from the reference:
- The gradient is the same mean, Σ CE / (n·K), accumulated over mini-batches of ``batch_size`` examples per task
  (batch 1 in the reference; equal up to float rounding for our suites' batch-independent forwards, whose
  models have no batch norm and run without dropout). The tasks of one mini-batch share one trunk forward
  (``problem.logits_per_task``).
- A cosine whose denominator is 0 (a zero gradient or an all-zero candidate tensor) counts as 0; the reference
  yields NaN, which then makes that candidate's sum NaN and never selected.
- Only the floating-point keys of ``pretrained()`` are merged, differentiated and compared (sorted order); integer
  buffers stay θ0's. Work is in float32 (float64 kept); the result is written in the base's dtype.
- Granularity ``model`` is the reference's ``task`` (one candidate for the whole model).
- Memory: θ^(t), θ_init and g are held (three models); the experts are read one tensor at a time, twice per
  iteration (cosines, then the update), where the reference holds every expert in memory.

Not implemented: the soft variant (``fw_soft.py``: per-round layer-wise AdaMerging over θ_m − θ on test data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError
from bench.problem import MergeContext, MergeProblem, StateDict
from bench.registry import param, register_method
from bench.task_vectors import dtype_of, mergeable_keys

GRANULARITIES = ("model", "layer")
ALIGNMENTS = ("weights", "task_vectors")
INITIAL = "initial"


@dataclass(frozen=True)
class FwMergingParams:
    max_iters: int = param(10, "Frank-Wolfe iterations T", low=1)
    step_size: float = param(0.1, "FW step size η; iteration t moves by γ = scaling_factor · η · 2/(t+2)", low=0.0)
    scaling_factor: float = param(0.3, "s: θ_init = θ0 + s·Στ_i, and the extra factor in every FW step", low=0.0)
    dataset_size: int = param(100, "labeled train examples per task for each iteration's gradient", low=1)
    batch_size: int = param(16, "examples per task per forward/backward (the reference: 1; same mean)", low=1)
    granularity: str = param("model", "one candidate for the whole model, or one per tensor",
                             choices=GRANULARITIES)
    alignment: str = param("weights", "cosine of the gradient with the candidates' raw weights (the reference) "
                           "or with their task vectors θ_m − θ0", choices=ALIGNMENTS)
    resample: bool = param(True, "fresh dataset_size examples every iteration (the reference's stream); "
                           "false: the same ones")


# -- the math ------------------------------------------------------------------------------------------------


def fw_step(t: int, step_size: float, scaling_factor: float) -> float:
    """γ_t = s · η · 2/(t + 2) for iteration t = 0, 1, …"""
    return scaling_factor * step_size * 2.0 / (t + 2)


def cosine(a: Tensor, b: Tensor) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖) over all entries (float64), 0 when either is all zeros."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    denominator = float(a.norm() * b.norm())
    return float(a @ b) / denominator if denominator > 0 else 0.0


def alignment_table(gradient: Mapping[str, Tensor], candidates: Sequence[Mapping[str, Tensor]], keys: Sequence[str],
                    base: Mapping[str, Tensor] | None = None) -> Tensor:
    """c[m, p] = cos(g[p], θ_m[p]) (or cos(g[p], θ_m[p] − θ0[p]) given ``base``), float64 [M, P]; reads each
    candidate one tensor at a time."""
    table = torch.zeros(len(candidates), len(keys), dtype=torch.float64)
    for p, key in enumerate(keys):
        grad = gradient[key]
        for m, candidate in enumerate(candidates):
            weight = candidate[key].to(grad.device, torch.float64)
            if base is not None:
                weight = weight - base[key].to(grad.device, torch.float64)
            table[m, p] = cosine(grad, weight)
    return table


def select_candidates(table: Tensor, granularity: str) -> Tensor:
    """The chosen candidate per tensor (int64 [P]): argmin_m Σ_p c[m, p] for every tensor (``model``), or
    argmin_m c[m, p] per tensor (``layer``); ties go to the lower index."""
    if granularity == "model":
        return torch.full((table.shape[1],), int(torch.argmin(table.sum(dim=1))), dtype=torch.int64)
    if granularity == "layer":
        return torch.argmin(table, dim=0)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def fw_update(theta: Mapping[str, Tensor], candidates: Sequence[Mapping[str, Tensor]], keys: Sequence[str],
              choice: Tensor, gamma: float) -> StateDict:
    """θ[p] + γ (θ_{choice[p]}[p] − θ[p]) for every key p in ``keys`` (others copied)."""
    updated = dict(theta)
    for p, key in enumerate(keys):
        current = theta[key]
        vertex = candidates[int(choice[p])][key].to(current.device, current.dtype)
        updated[key] = current + gamma * (vertex - current)
    return updated


def task_arithmetic_start(base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]], keys: Sequence[str],
                          scaling_factor: float, dtype_of: dict[str, torch.dtype]) -> StateDict:
    """θ0 + s · Σ_i (θ_i − θ0) on ``keys`` (in the work dtypes), one tensor at a time."""
    start = {}
    for key in keys:
        base_value = base[key].to(dtype_of[key])
        total = torch.zeros_like(base_value)
        for expert in experts:
            total += expert[key].to(dtype_of[key]) - base_value
        start[key] = base_value + scaling_factor * total
    return start


def mean_cross_entropy_gradient(problem: MergeProblem, params: Mapping[str, Tensor], keys: Sequence[str],
                                data: Mapping[str, tuple[Tensor, Tensor]], batch_size: int,
                                device: torch.device) -> tuple[StateDict, float]:
    """∇ of Σ_tasks Σ_examples CE / (total examples) w.r.t. ``params[keys]``, accumulated over mini-batches of
    ``batch_size`` examples per task (the tasks of a mini-batch share one ``logits_per_task`` call). Returns the
    gradient and the loss."""
    leaves = {key: params[key].detach().clone().requires_grad_(True) for key in keys}
    full = {**{k: v for k, v in params.items() if k not in leaves}, **leaves}
    totals = {key: torch.zeros_like(value) for key, value in leaves.items()}
    count = sum(len(labels) for _, labels in data.values())
    longest = max(len(labels) for _, labels in data.values())
    loss_total = 0.0
    for start in range(0, longest, batch_size):
        chunk = {task: (inputs[start : start + batch_size], labels[start : start + batch_size])
                 for task, (inputs, labels) in data.items() if start < len(labels)}
        logits = problem.logits_per_task(full, {task: x.to(device) for task, (x, _) in chunk.items()})
        loss = sum(F.cross_entropy(logits[task].float(), y.to(device), reduction="sum")
                   for task, (_, y) in chunk.items()) / count
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for key, grad in zip(leaves, grads, strict=True):
            if grad is not None:
                totals[key] += grad.detach()
        loss_total += float(loss.detach())
    return totals, loss_total


def frank_wolfe(start: Mapping[str, Tensor], candidates: Sequence[Mapping[str, Tensor]], keys: Sequence[str],
                gradient_fn: Callable[[int, StateDict], Mapping[str, Tensor]], *, max_iters: int, step_size: float,
                scaling_factor: float, granularity: str,
                base: Mapping[str, Tensor] | None = None) -> tuple[StateDict, list[Tensor]]:
    """The hard FW loop from θ^(0) = ``start``: ``gradient_fn(t, θ^(t))`` gives g; returns θ^(T) and each
    iteration's chosen candidate per tensor. ``base`` switches the alignment to task vectors θ_m − θ0."""
    theta = dict(start)
    choices = []
    for t in range(max_iters):
        table = alignment_table(gradient_fn(t, theta), candidates, keys, base)
        choice = select_candidates(table, granularity)
        theta = fw_update(theta, candidates, keys, choice, fw_step(t, step_size, scaling_factor))
        choices.append(choice)
    return theta, choices


# -- the method ----------------------------------------------------------------------------------------------


def draw_labeled(problem: MergeProblem, p: FwMergingParams, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Every iteration's examples per task: dataset_size × max_iters with ``resample``; where a task's split holds
    fewer, one iteration's dataset_size examples, which the iterations then walk round (the stream wraps); a
    split smaller than dataset_size is a one-line error naming the setting."""
    wanted = p.dataset_size * (p.max_iters if p.resample else 1)
    data = {}
    for task in problem.tasks:
        try:
            data[task] = problem.labeled(task, wanted, seed)
            continue
        except BenchError as exc:
            if wanted == p.dataset_size:
                raise BenchError(f"{exc} (fw_merging draws dataset_size = {wanted} examples per task; lower "
                                 "fw_merging.dataset_size)") from None
        data[task] = draw_labeled_at_least(problem, task, p.dataset_size, seed)
    return data


def draw_labeled_at_least(problem: MergeProblem, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    try:
        return problem.labeled(task, n, seed)
    except BenchError as exc:
        raise BenchError(f"{exc} (fw_merging draws dataset_size = {n} examples per task at least; lower "
                         "fw_merging.dataset_size)") from None


def iteration_examples(inputs: Tensor, labels: Tensor, t: int, n: int, resample: bool) -> tuple[Tensor, Tensor]:
    """Iteration t's n examples of one task's drawn stream: positions (t·n + j) mod size with ``resample`` (a
    stream that wraps around when a suite hands over fewer than n·T), the first n otherwise; all of them when
    fewer than n were drawn."""
    size = len(labels)
    if size <= n:
        return inputs, labels
    positions = (t * n + torch.arange(n)) % size if resample else torch.arange(n)
    return inputs[positions], labels[positions]


def _budget(p: FwMergingParams) -> int:
    return p.dataset_size * (p.max_iters if p.resample else 1)


@register_method("fw_merging", family="data-using", params=FwMergingParams, data="labeled", budget=_budget,
                 memory="streamed", needs=("class_logits", "labeled_data"),
                 description="FW-Merging (hard): Frank-Wolfe steps towards the expert whose weights align least "
                             "with the CE gradient")
def merge(ctx: MergeContext, p: FwMergingParams) -> StateDict:
    problem = ctx.problem
    # Data first: a suite that cannot supply it fails before any expert is read.
    data = draw_labeled(problem, p, ctx.seed)
    ctx.notes["samples_per_task"] = min(len(labels) for _, labels in data.values())
    ctx.note_held("labeled_examples", [tensor for pair in data.values() for tensor in pair])

    base, experts = ctx.pretrained(), ctx.experts()
    keys = mergeable_keys(base)
    fixed = {key: base[key].to(ctx.device) for key in base if key not in keys}
    work = {key: torch.float64 if dtype_of(base, key) == torch.float64 else torch.float32 for key in keys}
    initial = {k: v.to(ctx.device) for k, v in task_arithmetic_start(base, experts, keys, p.scaling_factor,
                                                                      work).items()}
    candidates = [*experts, initial]
    names = [*problem.tasks, INITIAL]

    losses, grad_norms = [], []

    def gradient_fn(t: int, theta: StateDict) -> StateDict:
        batch = {task: iteration_examples(x, y, t, p.dataset_size, p.resample) for task, (x, y) in data.items()}
        gradient, loss = mean_cross_entropy_gradient(problem, {**fixed, **theta}, keys, batch, p.batch_size,
                                                     ctx.device)
        losses.append(loss)
        grad_norms.append(float(torch.stack([g.double().norm() for g in gradient.values()]).norm()))
        return gradient

    with ctx.adapt_phase():
        theta, choices = frank_wolfe(initial, candidates, keys, gradient_fn, max_iters=p.max_iters,
                                     step_size=p.step_size, scaling_factor=p.scaling_factor,
                                     granularity=p.granularity, base=base if p.alignment == "task_vectors" else None)
    if p.granularity == "model":
        chosen = [names[int(choice[0])] for choice in choices]
    else:
        chosen = [{name: int((choice == m).sum()) for m, name in enumerate(names)} for choice in choices]
    ctx.notes["chosen"] = chosen
    ctx.notes["loss_first"], ctx.notes["loss_last"] = losses[0], losses[-1]
    ctx.notes["grad_norm_first"], ctx.notes["grad_norm_last"] = grad_norms[0], grad_norms[-1]
    merged = {key: base[key].clone() for key in base if key not in keys}
    merged.update({key: theta[key].detach().to(device="cpu", dtype=dtype_of(base, key)) for key in keys})
    return {key: merged[key] for key in base}
