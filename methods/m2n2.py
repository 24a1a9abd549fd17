"""M2N2, Model Merging of Natural Niches (Abrantes, Lange & Tang, GECCO 2025), "Competition and Attraction Improve
Model Fusion", arXiv:2508.16204. Reference: repo ``SakanaAI/natural_niches``, ``natural_niches_fn.py`` and
``helper_fn.py`` (MNIST).

An evolutionary merge over an archive of M flat parameter vectors θ_k (the merged keys, floating-point ones in
sorted order, concatenated). Each member has a correctness vector s_k ∈ {0, 1}^E over E labeled examples
(s_kj = 1 when argmax of the member's logits on example j is its label).

Competition (fitness sharing):   z_j = (Σ_k s_kj)^α  (z_j := 1 where no member gets j right),
                                 s̄_kj = s_kj / z_j,   f_k = Σ_j s̄_kj
Parent a (competition):          P(a = k) ∝ f_k
Parent b (attraction):           P(b = k) ∝ Σ_j max(0, s̄_kj − s̄_aj)
Crossover (SLERP, split point):  one global angle Ω = arccos(θ̂_a · θ̂_b); split ~ U{0, …, D − 1}, w ~ U[0, 1);
                                 t_i = w for positions i < split, 1 − w from the split on;
                                 child_i = sin((1 − t_i)Ω)/sin Ω · θ_a,i + sin(t_i Ω)/sin Ω · θ_b,i,
                                 or (1 − t_i) θ_a,i + t_i θ_b,i  if sin Ω ≤ 1e-6 (LERP)
Archive update:                  with the child's s appended, z and f are recomputed over the M + 1 vectors; the
                                 one of lowest f (the first on ties, the child last) leaves the archive; the child
                                 is dropped if it is that one.
Result:                          the member with the best mean accuracy over the tasks' labeled examples.

Defaults and their source: α = 1, the matchmaker (attraction) and the split point on, as the reference. The
reference's archive (20 members) and budget (50,000 child evaluations on the MNIST train set) are far beyond a
benchmark run, so here ``archive_size`` = 12 (the 8 tiny8/vit8 experts plus 4 children) and ``evaluations`` = 400
children on ``num_samples`` = 128 labeled examples per task: one child costs one forward pass over the 8 × 128
examples (~0.14 s on the full tiny8, one idle CPU thread), about a minute in all; ~0.3 s per child on the full
tinylm.

Adaptation to our suites (not in the reference, which merges two MLPs on MNIST):

- The archive starts from the K experts, inserted in task order through the same update rule (so with
  ``archive_size`` < K the weakest experts are evicted on the way in). θ0 is not in it unless
  ``include_pretrained`` (then it is inserted first): the reference starts from its fine-tuned models only.
- The examples are the union, in task order, of ``problem.labeled(task, num_samples, seed)`` for every task (the
  suites draw them from each task's training split, as the reference scores on MNIST's train set); example j is
  scored with its own task's head. ``evaluations`` counts the children scored (the reference's
  ``total_forward_passes``; the K initial members are scored once more, outside that count).
- The returned member is the best by the mean over tasks of its per-task labeled accuracy (the reference: the best
  train accuracy over all its examples; the same when every task has ``num_samples`` examples).

Deliberate differences from the reference:

- No Gaussian mutation: the reference mutates (std 0.01) only when it starts from scratch; we start from experts.
- The reference fills a zero-initialised archive whose empty rows have fitness 0 and are therefore replaced
  first; here a child is simply added while the archive has free slots.
- Degenerate distributions the reference leaves as NaN get a defined answer: when every fitness is 0, parent a is
  uniform; when no member beats parent a on any example (every attraction is 0), parent b is drawn ∝ f (the
  no-matchmaker rule); a zero-norm parent makes the crossover a LERP.
- Ablations as the reference's flags: ``matchmaker=false`` draws both parents independently ∝ f;
  ``split_point=false`` uses t = w everywhere.
- Random draws, in this order per child, from ``ctx.generator``: parent a, parent b, split, w (CPU, float64
  probabilities), so a seed reproduces the run bit for bit on the CPU.
- The archive is held in fp32 (fp64 when a merged key is fp64) and the result is written back in each key's dtype;
  integer buffers are copied from θ0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.problem import MergeContext, MergeProblem, StateDict
from bench.registry import param, register_method

LERP_SIN = 1e-6
"""The crossover is linear where sin Ω ≤ this (reference ``helper_fn.slerp_w_splitpoint``)."""


@dataclass(frozen=True)
class M2N2Params:
    evaluations: int = param(400, "children generated and scored (the reference: 50,000 on MNIST; 0: the best "
                                  "initial member)", low=0)
    num_samples: int = param(128, "labeled examples per task that make up the correctness vectors", low=1)
    archive_size: int = param(12, "members the archive holds, experts included (the reference: 20)", low=1)
    alpha: float = param(1.0, "exponent α of the niche normaliser z_j = (Σ_k s_kj)^α (0: no fitness sharing)",
                         low=0.0)
    matchmaker: bool = param(True, "draw parent b by attraction (false: both parents ∝ fitness)")
    split_point: bool = param(True, "t = w before a random split point and 1 − w after (false: t = w everywhere)")
    include_pretrained: bool = param(False, "put θ0 in the initial archive besides the experts")
    batch_size: int = param(256, "examples per task in one forward pass when scoring a member", low=1)


# -- the math: fitness, parents, crossover, eviction -------------------------------------------------------------


def niche_normaliser(scores: Tensor, alpha: float) -> Tensor:
    """z_j = (Σ_k s_kj)^α over the members' rows of ``scores`` ([M, E]), 1 where no member gets j right."""
    counts = scores.double().sum(dim=0)
    return torch.where(counts > 0, counts, torch.ones_like(counts)) ** alpha


def shared_scores(scores: Tensor, alpha: float) -> Tensor:
    """s̄_kj = s_kj / z_j, float64 [M, E]."""
    return scores.double() / niche_normaliser(scores, alpha)


def fitness(scores: Tensor, alpha: float) -> Tensor:
    """f_k = Σ_j s_kj / z_j, float64 [M]."""
    return shared_scores(scores, alpha).sum(dim=1)


def parent_a_probabilities(scores: Tensor, alpha: float) -> Tensor:
    """P(a = k) = f_k / Σ f (uniform when every f_k is 0)."""
    f = fitness(scores, alpha)
    total = f.sum()
    return f / total if total > 0 else torch.full_like(f, 1.0 / len(f))


def parent_b_probabilities(scores: Tensor, alpha: float, a: int) -> Tensor:
    """P(b = k) ∝ Σ_j max(0, s̄_kj − s̄_aj); ∝ f when that is 0 for every k (no member beats a anywhere)."""
    shared = shared_scores(scores, alpha)
    attraction = (shared - shared[a]).clamp(min=0).sum(dim=1)
    total = attraction.sum()
    return attraction / total if total > 0 else parent_a_probabilities(scores, alpha)


def interpolation_scales(t: float, omega: float, sin_omega: float) -> tuple[float, float]:
    """(scale of θ_a, scale of θ_b) at t: slerp's sin((1 − t)Ω)/sin Ω and sin(tΩ)/sin Ω, or LERP's 1 − t and t."""
    if sin_omega > LERP_SIN:
        return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
    return 1.0 - t, t


def crossover(x: Tensor, y: Tensor, w: float, split: int, out: Tensor | None = None) -> Tensor:
    """SLERP of the flat vectors ``x`` (parent a) and ``y`` (parent b) with one global angle: t = w at positions
    before ``split`` and 1 − w from it on (``split`` ≥ len(x) gives t = w everywhere). Written into ``out``."""
    norm_x = float(torch.linalg.vector_norm(x))
    norm_y = float(torch.linalg.vector_norm(y))
    if norm_x > 0 and norm_y > 0:
        cosine = min(1.0, max(-1.0, float(torch.dot(x, y)) / (norm_x * norm_y)))
        omega = math.acos(cosine)
        sin_omega = math.sin(omega)
    else:  # an angle with the zero vector is undefined: interpolate linearly
        omega, sin_omega = 0.0, 0.0
    out = torch.empty_like(x) if out is None else out
    for (start, stop), t in (((0, split), w), ((split, len(x)), 1.0 - w)):
        if start >= stop:
            continue
        scale_x, scale_y = interpolation_scales(t, omega, sin_omega)
        torch.mul(x[start:stop], scale_x, out=out[start:stop])
        out[start:stop].add_(y[start:stop], alpha=scale_y)
    return out


def eviction_index(scores: Tensor, child_scores: Tensor, alpha: float) -> int:
    """Which of the M members (index < M) or the child (index M) has the lowest fitness among the M + 1, z taken
    over all of them; the first on ties."""
    extended = torch.cat([scores, child_scores.unsqueeze(0)])
    return int(torch.argmin(fitness(extended, alpha)))


# -- flat parameter vectors ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatLayout:
    """Where each merged key lives in a flat vector: sorted floating-point keys, each flattened, concatenated."""

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    dtype: torch.dtype  # the archive's dtype

    @classmethod
    def of(cls, base: Mapping[str, Tensor]) -> FlatLayout:
        keys = tuple(sorted(k for k, v in base.items() if v.is_floating_point()))
        dtypes = tuple(base[k].dtype for k in keys)
        dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        return cls(keys, tuple(base[k].shape for k in keys), dtypes, dtype)

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def flatten(self, state: Mapping[str, Tensor], out: Tensor) -> Tensor:
        """Write ``state``'s merged keys into ``out`` ([size]), one tensor at a time."""
        start = 0
        for key, shape in zip(self.keys, self.shapes, strict=True):
            stop = start + math.prod(shape)
            out[start:stop].copy_(state[key].reshape(-1))
            start = stop
        return out

    def unflatten(self, vector: Tensor, cast: bool = True) -> dict[str, Tensor]:
        """Views of ``vector`` shaped as the keys (cast to each key's dtype when ``cast`` and it differs)."""
        sizes = [math.prod(shape) for shape in self.shapes]
        parts = torch.split(vector, sizes)
        return {
            key: (part.view(shape).to(dtype) if cast else part.view(shape))
            for key, shape, dtype, part in zip(self.keys, self.shapes, self.dtypes, parts, strict=True)
        }


# -- scoring -----------------------------------------------------------------------------------------------------


@dataclass
class LabeledSet:
    """Every task's labeled examples (inputs and labels on the device), tasks in order as in s."""

    tasks: list[str]
    inputs: list[Tensor]
    labels: list[Tensor]

    @property
    def counts(self) -> list[int]:
        return [len(labels) for labels in self.labels]


def correctness(problem: MergeProblem, params: StateDict, data: LabeledSet, batch_size: int) -> Tensor:
    """s ∈ {0, 1}^E (bool, CPU): argmax of each example's own task logits == its label, tasks in order."""
    per_task: dict[str, list[Tensor]] = {task: [] for task in data.tasks}
    longest = max(data.counts)
    with torch.no_grad():
        for start in range(0, longest, batch_size):
            batches = {task: inputs[start:start + batch_size]
                       for task, inputs in zip(data.tasks, data.inputs, strict=True) if start < len(inputs)}
            logits = problem.logits_per_task(params, batches)
            for task, labels in zip(data.tasks, data.labels, strict=True):
                if task in batches:
                    chunk = labels[start:start + batch_size]
                    per_task[task].append(logits[task].argmax(dim=-1).to(chunk.device) == chunk)
    return torch.cat([torch.cat(per_task[task]) for task in data.tasks]).cpu()


def mean_task_accuracy(scores: Tensor, counts: Sequence[int]) -> Tensor:
    """Each row's mean over tasks of its per-task accuracy (``counts``: examples per task, in order), float64."""
    parts = torch.split(scores.double(), list(counts), dim=-1)
    return torch.stack([part.mean(dim=-1) for part in parts], dim=-1).mean(dim=-1)


# -- the run -----------------------------------------------------------------------------------------------------


class Archive:
    """Up to ``capacity`` flat vectors ([capacity, D] on the device) and their correctness vectors (CPU)."""

    def __init__(self, capacity: int, size: int, examples: int, dtype: torch.dtype, device: torch.device):
        self.vectors = torch.empty(capacity, size, dtype=dtype, device=device)
        self.scores = torch.zeros(capacity, examples, dtype=torch.bool)
        self.origins: list[str] = []
        self.capacity = capacity

    @property
    def count(self) -> int:
        return len(self.origins)

    def members(self) -> Tensor:
        return self.scores[: self.count]

    def offer(self, vector: Tensor, scores: Tensor, origin: str, alpha: float) -> bool:
        """Add the candidate (free slot) or let it replace the lowest-fitness member; False if it is the lowest."""
        if self.count < self.capacity:
            slot = self.count
            self.origins.append(origin)
        else:
            slot = eviction_index(self.members(), scores, alpha)
            if slot == self.count:
                return False
            self.origins[slot] = origin
        self.vectors[slot].copy_(vector)
        self.scores[slot] = scores
        return True


def draw(probabilities: Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probabilities, 1, generator=generator))


def evolve(
    problem: MergeProblem,
    starts: Sequence[tuple[str, Mapping[str, Tensor]]],
    data: LabeledSet,
    p: M2N2Params,
    generator: torch.Generator,
    device: torch.device,
    base: Mapping[str, Tensor],
) -> tuple[Archive, FlatLayout, dict]:
    """Seed the archive with ``starts`` (name, weights) and run ``p.evaluations`` generations of M2N2."""
    layout = FlatLayout.of(base)
    buffers = {k: v.to(device) for k, v in base.items() if k not in layout.keys}
    archive = Archive(p.archive_size, layout.size, sum(data.counts), layout.dtype, device)
    candidate = torch.empty(layout.size, dtype=layout.dtype, device=device)

    def score(vector: Tensor) -> Tensor:
        return correctness(problem, {**buffers, **layout.unflatten(vector)}, data, p.batch_size)

    for name, state in starts:
        layout.flatten(state, candidate)
        archive.offer(candidate, score(candidate), name, p.alpha)
    inserted = 0
    for child in range(p.evaluations):
        members = archive.members()
        a = draw(parent_a_probabilities(members, p.alpha), generator)
        if p.matchmaker:
            b = draw(parent_b_probabilities(members, p.alpha, a), generator)
        else:
            b = draw(parent_a_probabilities(members, p.alpha), generator)
        split = int(torch.randint(0, layout.size, (1,), generator=generator))
        w = float(torch.rand(1, generator=generator, dtype=torch.float64))
        crossover(archive.vectors[a], archive.vectors[b], w, split if p.split_point else layout.size, candidate)
        inserted += archive.offer(candidate, score(candidate), f"child {child}", p.alpha)
    return archive, layout, {"children_inserted": inserted}


@register_method(
    "m2n2", family="data-using", params=M2N2Params, data="labeled", budget=lambda p: p.num_samples,
    memory="stacked", needs=("class_logits", "labeled_data"),
    description="M2N2: archive evolution by fitness sharing, attraction-based mates and split-point SLERP",
)
def merge(ctx: MergeContext, p: M2N2Params) -> StateDict:
    problem = ctx.problem
    inputs, labels = [], []
    for task in ctx.tasks:
        x, y = problem.labeled(task, p.num_samples, ctx.seed)
        inputs.append(x.to(ctx.device))
        labels.append(y.to(ctx.device))
    data = LabeledSet(list(ctx.tasks), inputs, labels)
    if min(data.counts) < p.num_samples:
        ctx.notes["samples_per_task"] = dict(zip(ctx.tasks, data.counts, strict=True))
    base = ctx.pretrained()
    starts = [("pretrained", base)] if p.include_pretrained else []
    starts += [(f"expert {task}", problem.expert(task)) for task in ctx.tasks]
    with ctx.adapt_phase():
        archive, layout, info = evolve(problem, starts, data, p, ctx.generator, ctx.device, base)
    accuracy = mean_task_accuracy(archive.members(), data.counts)
    best = int(torch.argmax(accuracy))
    ctx.note_held("archive", archive.vectors)
    ctx.notes["evaluations"] = p.evaluations
    ctx.notes["children_inserted"] = info["children_inserted"]
    ctx.notes["returned_member"] = archive.origins[best]
    ctx.notes["returned_labeled_accuracy"] = float(accuracy[best])
    merged = {k: v.clone().cpu() for k, v in layout.unflatten(archive.vectors[best]).items()}
    for key, value in base.items():
        if key not in merged:
            merged[key] = value.clone()
    return {key: merged[key] for key in base}
