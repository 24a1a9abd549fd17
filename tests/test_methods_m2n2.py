"""M2N2: fitness sharing, the two parent distributions, split-point SLERP and eviction checked by hand on tiny
archives; the whole evolution on small linear problems (determinism, the best member returned)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from toy_plugin import ToyParams, ToyProblem

from bench.errors import BenchError
from bench.problem import MergeContext, MergeProblem, StateDict, TaskMetrics
from bench.registry import build_params, get_method
from methods.m2n2 import (
    Archive,
    FlatLayout,
    LabeledSet,
    M2N2Params,
    correctness,
    crossover,
    eviction_index,
    fitness,
    interpolation_scales,
    mean_task_accuracy,
    merge,
    niche_normaliser,
    parent_a_probabilities,
    parent_b_probabilities,
)

# 3 members × 4 examples: z = (2, 1, 1, 1); s̄ = [[.5, 1, 0, 0], [.5, 0, 1, 0], [0, 0, 0, 1]]; f = (1.5, 1.5, 1).
SCORES = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)


def close(actual: Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-12)


def test_fitness_shares_each_example_among_the_members_that_get_it_right():
    close(niche_normaliser(SCORES, 1.0), [2, 1, 1, 1])
    close(fitness(SCORES, 1.0), [1.5, 1.5, 1.0])
    # α = 2: z = (4, 1, 1, 1), f = (1/4 + 1, 1/4 + 1, 1); α = 0: raw counts
    close(fitness(SCORES, 2.0), [1.25, 1.25, 1.0])
    close(fitness(SCORES, 0.0), [2, 2, 1])
    # an example nobody gets right has z = 1 (no division by zero)
    close(fitness(torch.tensor([[1, 0], [0, 0]], dtype=torch.bool), 1.0), [1, 0])


def test_parent_a_is_drawn_in_proportion_to_fitness():
    close(parent_a_probabilities(SCORES, 1.0), [0.375, 0.375, 0.25])
    close(parent_a_probabilities(SCORES, 2.0), [1.25 / 3.5, 1.25 / 3.5, 1 / 3.5])
    close(parent_a_probabilities(torch.zeros(2, 3, dtype=torch.bool), 1.0), [0.5, 0.5])  # nobody right: uniform


def test_parent_b_is_attracted_to_what_parent_a_gets_wrong():
    # a = 0: member 1 beats it on example 2 (s̄ 1 − 0), member 2 on example 3; both gain 1
    close(parent_b_probabilities(SCORES, 1.0, 0), [0, 0.5, 0.5])
    # a = 2: members 0 and 1 each gain .5 + 1 = 1.5
    close(parent_b_probabilities(SCORES, 1.0, 2), [0.5, 0.5, 0])
    # a = 1 with α = 2: member 0 gains 1 (example 1), member 2 gains 1 (example 3)
    close(parent_b_probabilities(SCORES, 2.0, 1), [0.5, 0, 0.5])


def test_parent_b_falls_back_to_fitness_when_parent_a_dominates():
    scores = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    close(parent_b_probabilities(scores, 1.0, 0), parent_a_probabilities(scores, 1.0).tolist())


def test_interpolation_scales_slerp_and_lerp():
    sx, sy = interpolation_scales(1 / 3, math.pi / 2, 1.0)
    assert (sx, sy) == pytest.approx((math.sqrt(3) / 2, 0.5), abs=1e-15)
    assert interpolation_scales(0.25, 1e-7, 1e-7) == (0.75, 0.25)  # sin Ω ≤ 1e-6: LERP


def test_crossover_uses_w_before_the_split_and_one_minus_w_after():
    x = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    # Ω = π/2; t = 1/3 on positions 0-1: (sin π/3, sin π/6); t = 2/3 on 2-3: (sin π/6, sin π/3)
    child = crossover(x, y, 1 / 3, 2)
    close(child, [math.sqrt(3) / 2, 0.5, 0.5, math.sqrt(3) / 2])
    # split 0: t = 1 − w everywhere; split ≥ D: t = w everywhere
    close(crossover(x, y, 1 / 3, 0), [0.5, math.sqrt(3) / 2, 0.5, math.sqrt(3) / 2])
    close(crossover(x, y, 1 / 3, 4), [math.sqrt(3) / 2, 0.5, math.sqrt(3) / 2, 0.5])


def test_crossover_has_one_global_angle():
    x = torch.tensor([2.0, 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # cos Ω = 2 / (2 √2): Ω = π/4 over the whole vector; w = 1/2 gives the same t on both sides
    scale = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(crossover(x, y, 0.5, 1), [2 * scale + scale, scale])


def test_crossover_is_linear_for_parallel_antiparallel_and_zero_parents():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # t = 1/4 at position 0 and 3/4 at position 1
    close(crossover(x, 2 * x, 0.25, 1), [0.75 * 1 + 0.25 * 2, 0.25 * 2 + 0.75 * 4])
    close(crossover(x, -x, 0.25, 1), [0.75 - 0.25, 0.25 * 2 - 0.75 * 2])
    close(crossover(x, torch.zeros(2, dtype=torch.float64), 0.25, 1), [0.75, 0.5])


def test_crossover_writes_into_out():
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = torch.full((2,), 7.0)
    assert crossover(x, y, 0.0, 2, out) is out
    close(out, [1.0, 0.0])


def test_eviction_recomputes_z_with_the_child_and_drops_the_lowest():
    # child = a copy of member 2: z = (2, 1, 1, 2), f = (1.5, 1.5, .5, .5): tie, the member (first) leaves
    assert eviction_index(SCORES, torch.tensor([0, 0, 0, 1], dtype=torch.bool), 1.0) == 2
    # child right everywhere: z = (3, 2, 2, 2), f = (5/6, 5/6, 1/2, 11/6)
    assert eviction_index(SCORES, torch.ones(4, dtype=torch.bool), 1.0) == 2
    # child right nowhere: it is the lowest (index M) and is not inserted
    assert eviction_index(SCORES, torch.zeros(4, dtype=torch.bool), 1.0) == 3


def test_archive_fills_free_slots_then_replaces_the_lowest_fitness_member():
    archive = Archive(3, 2, 4, torch.float32, torch.device("cpu"))
    for k, row in enumerate(SCORES):
        assert archive.offer(torch.full((2,), float(k)), row, f"m{k}", 1.0)
    assert archive.count == 3
    assert not archive.offer(torch.full((2,), 9.0), torch.zeros(4, dtype=torch.bool), "bad", 1.0)
    assert archive.origins == ["m0", "m1", "m2"]
    assert archive.offer(torch.full((2,), 5.0), torch.ones(4, dtype=torch.bool), "good", 1.0)
    assert archive.origins == ["m0", "m1", "good"]
    close(archive.vectors[2], [5.0, 5.0])
    assert archive.members()[2].all()


def test_flat_layout_round_trip_skips_integer_buffers():
    state = {"w": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([7.0]), "ids": torch.arange(3)}
    layout = FlatLayout.of(state)
    assert layout.keys == ("a", "w") and layout.size == 7 and layout.dtype == torch.float32
    flat = layout.flatten(state, torch.empty(7))
    close(flat, [7.0, 0, 1, 2, 3, 4, 5])
    back = layout.unflatten(flat)
    assert set(back) == {"a", "w"} and torch.equal(back["w"], state["w"])


def test_mean_task_accuracy_averages_per_task_accuracies():
    scores = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    close(mean_task_accuracy(scores, [3, 1]), [(2 / 3 + 1) / 2, 0.0])


def test_correctness_is_the_same_in_chunks():
    problem = ToyProblem(ToyParams())
    inputs, labels = zip(*[problem.labeled(task, 10, 0) for task in problem.tasks], strict=True)
    data = LabeledSet(problem.tasks, list(inputs), list(labels))
    expert = problem.expert("t1")
    whole = correctness(problem, expert, data, 64)
    assert whole.shape == (30,) and whole[10:20].all()  # labels of t1 are its expert's argmax
    assert torch.equal(correctness(problem, expert, data, 3), whole)


class TeacherProblem(MergeProblem):
    """Two linear tasks labeled by one teacher W*; expert 1 is W* (right everywhere), expert 0 is noise."""

    def __init__(self):
        self.name = "teacher"
        self.tasks = ["a", "b"]
        g = torch.Generator().manual_seed(5)
        self.teacher = torch.randn(4, 4, generator=g)
        self._base = {"w": torch.randn(4, 4, generator=g), "steps": torch.tensor(3)}
        self._experts = {"a": {"w": torch.randn(4, 4, generator=g), "steps": torch.tensor(3)},
                         "b": {"w": self.teacher.clone(), "steps": torch.tensor(3)}}
        self._inputs = {task: torch.randn(40, 4, generator=g) for task in self.tasks}

    def pretrained(self) -> StateDict:
        return self._base

    def expert(self, task: str) -> StateDict:
        return self._experts[task]

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        return inputs @ params["w"].T

    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        raise NotImplementedError

    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        raise NotImplementedError

    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        inputs = self._inputs[task][:n]
        return inputs, (inputs @ self.teacher.T).argmax(-1)

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        raise NotImplementedError


def context(problem: MergeProblem, seed: int) -> MergeContext:
    return MergeContext(problem, seed, torch.device("cpu"), torch.Generator().manual_seed(seed))


def test_the_strictly_best_member_is_returned():
    problem = TeacherProblem()
    ctx = context(problem, 0)
    merged = merge(ctx, M2N2Params(evaluations=0, num_samples=30))
    assert torch.equal(merged["w"], problem.teacher)
    assert torch.equal(merged["steps"], torch.tensor(3)) and list(merged) == ["w", "steps"]
    assert ctx.notes["returned_member"] == "expert b" and ctx.notes["returned_labeled_accuracy"] == 1.0
    # with children: whatever is returned is right on every labeled example, and θ0 may join the archive
    ctx = context(problem, 1)
    merged = merge(ctx, M2N2Params(evaluations=15, num_samples=30, archive_size=3, include_pretrained=True))
    assert ctx.notes["evaluations"] == 15 and ctx.notes["returned_labeled_accuracy"] == 1.0
    for task in problem.tasks:
        inputs, labels = problem.labeled(task, 30, 0)
        assert torch.equal(problem.logits(merged, task, inputs).argmax(-1), labels)


@pytest.mark.parametrize("overrides", [{}, {"matchmaker": False, "split_point": False}])
def test_merge_is_deterministic_by_seed(overrides):
    problem = ToyProblem(ToyParams())
    params = M2N2Params(evaluations=25, num_samples=20, archive_size=4, **overrides)
    first_ctx, second_ctx = context(problem, 3), context(problem, 3)
    first, second = merge(first_ctx, params), merge(second_ctx, params)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first_ctx.notes == second_ctx.notes
    assert first_ctx.notes["held_bytes"]["archive"] == 4 * (36 + 6) * 4
    assert first_ctx.notes["children_inserted"] > 0


def test_registration():
    spec = get_method("m2n2")
    assert (spec.family, spec.data, spec.memory) == ("data-using", "labeled", "stacked")
    assert spec.needs == ("class_logits", "labeled_data")
    assert spec.samples_per_task(M2N2Params(num_samples=64)) == 64


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"evaluations": -1}, "m2n2.evaluations=-1 is outside [0, None]"),
        ({"archive_size": 0}, "m2n2.archive_size=0 is outside [1, None]"),
        ({"num_samples": 0}, "m2n2.num_samples=0 is outside [1, None]"),
        ({"alpha": -0.5}, "m2n2.alpha=-0.5 is outside [0.0, None]"),
        ({"alpha": "nan"}, "m2n2.alpha=nan is not a finite number; default is 1.0"),
        ({"matchmaker": "maybe"}, "m2n2.matchmaker='maybe' is not a valid bool; default is true"),
    ],
)
def test_bad_hyperparameters(overrides, message):
    with pytest.raises(BenchError) as error:
        build_params("m2n2", M2N2Params, overrides)
    assert str(error.value) == message
