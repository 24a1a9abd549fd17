"""FW-Merging, hard variant (``methods/fw_merging.py``): each step checked by hand.

Expected values are worked out in the comments from the definitions in the module docstring (and
/work/shared/docs/methods-wave2.md "FW-Merging"), not by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from toy_plugin import ToyParams, ToyProblem

from bench.errors import BenchError
from bench.problem import MergeContext
from bench.registry import build_params, get_method
from methods.fw_merging import (
    FwMergingParams,
    alignment_table,
    cosine,
    frank_wolfe,
    fw_step,
    fw_update,
    iteration_examples,
    mean_cross_entropy_gradient,
    select_candidates,
)

R2 = 1 / math.sqrt(2)


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def context(problem: ToyProblem, seed: int = 0) -> MergeContext:
    return MergeContext(problem=problem, seed=seed, device=torch.device("cpu"),
                        generator=torch.Generator().manual_seed(seed))


def run(problem: ToyProblem, seed: int = 0, **overrides: str) -> tuple[dict, MergeContext]:
    spec = get_method("fw_merging")
    ctx = context(problem, seed)
    return spec.fn(ctx, build_params("fw_merging", spec.params, overrides)), ctx


# -- step size -------------------------------------------------------------------------------------------------


def test_step_size_schedule_by_hand() -> None:
    # γ_t = s·η·2/(t+2) with s = 0.3, η = 0.1: 0.03, 0.02, 0.015, …, 0.006 at t = 8
    assert [fw_step(t, 0.1, 0.3) for t in (0, 1, 2, 8)] == pytest.approx([0.03, 0.02, 0.015, 0.006], abs=1e-15)
    # the classic FW schedule 2/(t+2) with η = s = 1: a full jump to the vertex at t = 0
    assert [fw_step(t, 1.0, 1.0) for t in range(4)] == pytest.approx([1.0, 2 / 3, 0.5, 0.4])


# -- candidate selection ---------------------------------------------------------------------------------------

# g: a = [1, 0], b = [0, 1]. Cosines with the raw weights:
#   c0: a = [1, 0] → 1,          b = [1, 0]  → 0             Σ = 1
#   c1: a = [−1, 1] → −1/√2,     b = [0, 2]  → 1             Σ = 1 − 1/√2
#   c2: a = [0, 3] → 0,          b = [1, −1] → −1/√2         Σ = −1/√2
#   c3: a = [0, 0] → 0 (zero),   b = [0, 0]  → 0             Σ = 0
# model: argmin Σ = c2 for both tensors; layer: a → c1 (−1/√2), b → c2 (−1/√2)
GRADIENT = {"a": t(1, 0), "b": t(0, 1)}
CANDIDATES = [{"a": t(1, 0), "b": t(1, 0)}, {"a": t(-1, 1), "b": t(0, 2)}, {"a": t(0, 3), "b": t(1, -1)},
              {"a": t(0, 0), "b": t(0, 0)}]


def test_alignment_table_is_the_cosine_with_raw_weights() -> None:
    table = alignment_table(GRADIENT, CANDIDATES, ["a", "b"])
    expected = torch.tensor([[1, 0], [-R2, 1], [0, -R2], [0, 0]], dtype=torch.float64)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-12)
    assert cosine(t(0, 0), t(1, 2)) == 0.0 and cosine(t(3, 4), t(6, 8)) == pytest.approx(1.0)


def test_selection_model_and_layer_by_hand() -> None:
    table = alignment_table(GRADIENT, CANDIDATES, ["a", "b"])
    assert select_candidates(table, "model").tolist() == [2, 2]
    assert select_candidates(table, "layer").tolist() == [1, 2]
    # ties (a zero gradient: every cosine 0) go to the first candidate
    assert select_candidates(torch.zeros(3, 2, dtype=torch.float64), "layer").tolist() == [0, 0]
    assert select_candidates(torch.zeros(3, 2, dtype=torch.float64), "model").tolist() == [0, 0]


def test_alignment_with_task_vectors_subtracts_the_base() -> None:
    # base a = [1, 0], b = [0, 1]; θ_m − θ0:
    #   c0: a = [0, 0] → 0,            b = [1, −1] → −1/√2
    #   c1: a = [−2, 1] → −2/√5,       b = [0, 1]  → 1
    #   c2: a = [−1, 3] → −1/√10,      b = [1, −2] → −2/√5
    base = {"a": t(1, 0), "b": t(0, 1)}
    table = alignment_table(GRADIENT, CANDIDATES[:3], ["a", "b"], base)
    expected = torch.tensor([[0, -R2], [-2 / math.sqrt(5), 1], [-1 / math.sqrt(10), -2 / math.sqrt(5)]],
                            dtype=torch.float64)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-7)


# -- the update ------------------------------------------------------------------------------------------------


def test_update_moves_each_tensor_towards_its_chosen_vertex() -> None:
    # θ = {a: [1, 2], b: [4]}; choice a → c1 = [1, −2], b → c0 = [8]; γ = 0.25:
    # a = [1, 2] + 0.25([1, −2] − [1, 2]) = [1, 1];  b = 4 + 0.25(8 − 4) = 5
    theta = {"a": t(1, 2), "b": t(4), "ids": torch.tensor([7])}
    candidates = [{"a": t(3, 2), "b": t(8)}, {"a": t(1, -2), "b": t(0)}]
    updated = fw_update(theta, candidates, ["a", "b"], torch.tensor([1, 0]), 0.25)
    assert torch.equal(updated["a"], t(1, 1)) and torch.equal(updated["b"], t(5))
    assert torch.equal(updated["ids"], torch.tensor([7])) and torch.equal(theta["a"], t(1, 2))


# -- Frank-Wolfe on a quadratic whose minimiser is a vertex ----------------------------------------------------

# f(θ) = ½‖θ − v1‖², g = θ − v1, vertices v0 = [1, 0], v1 = [0, 1], start (initial candidate) [½, ½].
# Every iterate is [α, 1 − α] with α > 0, so g ∝ [1, −1]: cos with v0 = 1/√2, with v1 = −1/√2, with [½, ½] = 0.
# FW always picks v1 and θ_{t+1} − v1 = (1 − γ_t)(θ_t − v1), so θ_T − v1 = Π_t (1 − γ_t) · ([½, ½] − v1).
V0, V1, START = t(1, 0), t(0, 1), t(0.5, 0.5)


def test_frank_wolfe_converges_towards_the_optimal_vertex() -> None:
    candidates = [{"v": V0}, {"v": V1}, {"v": START}]
    theta, choices = frank_wolfe({"v": START}, candidates, ["v"], lambda step, th: {"v": th["v"] - V1},
                                 max_iters=10, step_size=0.1, scaling_factor=0.3, granularity="model")
    assert [choice.tolist() for choice in choices] == [[1]] * 10
    shrink = math.prod(1 - 0.03 * 2 / (step + 2) for step in range(10))
    torch.testing.assert_close(theta["v"], V1 + shrink * (START - V1), rtol=0, atol=1e-6)
    # the classic schedule (η = s = 1) reaches the vertex in one step
    theta, _ = frank_wolfe({"v": START}, candidates, ["v"], lambda step, th: {"v": th["v"] - V1},
                           max_iters=1, step_size=1.0, scaling_factor=1.0, granularity="model")
    assert torch.equal(theta["v"], V1)


def test_layer_granularity_picks_a_vertex_per_tensor() -> None:
    # tensor a is pulled to v1 and tensor b to v0 (g_b = θ_b − v0 ∝ [−1, 1]: cos −1/√2 with v0): model granularity
    # must pick one vertex for both, layer granularity picks [1, 0] in every iteration and reaches both at once.
    candidates = [{"a": V0, "b": V0}, {"a": V1, "b": V1}, {"a": START, "b": START}]

    def gradient(step: int, th: dict) -> dict:
        return {"a": th["a"] - V1, "b": th["b"] - V0}

    theta, choices = frank_wolfe({"a": START, "b": START}, candidates, ["a", "b"], gradient, max_iters=10,
                                 step_size=0.1, scaling_factor=0.3, granularity="layer")
    assert [choice.tolist() for choice in choices] == [[1, 0]] * 10
    shrink = math.prod(1 - 0.03 * 2 / (step + 2) for step in range(10))
    torch.testing.assert_close(theta["a"], V1 + shrink * (START - V1), rtol=0, atol=1e-6)
    torch.testing.assert_close(theta["b"], V0 + shrink * (START - V0), rtol=0, atol=1e-6)
    # with the classic schedule one step lands both tensors on their vertices
    theta, _ = frank_wolfe({"a": START, "b": START}, candidates, ["a", "b"], gradient, max_iters=1,
                           step_size=1.0, scaling_factor=1.0, granularity="layer")
    assert torch.equal(theta["a"], V1) and torch.equal(theta["b"], V0)
    # model granularity: Σ cos = −1/√2 + 1/√2 = 0 for both vertices and 0 for the start, so the tie goes to v0
    _, choices = frank_wolfe({"a": START, "b": START}, candidates, ["a", "b"], gradient, max_iters=1,
                             step_size=0.1, scaling_factor=0.3, granularity="model")
    assert choices[0].tolist() == [0, 0]


# -- the gradient ----------------------------------------------------------------------------------------------


def hand_gradient(problem: ToyProblem, params: dict, data: dict) -> dict:
    """∇ of the mean CE of the linear toy (logits = x Wᵀ + b) over all examples: (softmax − onehot) per example,
    dW = Σ (p − e_y) xᵀ / N, db = Σ (p − e_y) / N."""
    dw, db, count = torch.zeros_like(params["w"]), torch.zeros_like(params["b"]), 0
    for inputs, labels in data.values():
        residual = torch.softmax(inputs @ params["w"].T + params["b"], dim=-1)
        residual[torch.arange(len(labels)), labels] -= 1
        dw += residual.T @ inputs
        db += residual.sum(0)
        count += len(labels)
    return {"w": dw / count, "b": db / count}


@pytest.mark.parametrize("batch_size", [1, 7, 100])
def test_mean_gradient_is_the_same_for_any_batch_size(batch_size: int) -> None:
    problem = ToyProblem(ToyParams())
    params = problem.expert("t1")
    data = {task: problem.labeled(task, 30, seed=5) for task in problem.tasks}
    gradient, loss = mean_cross_entropy_gradient(problem, params, ["b", "w"], data, batch_size, torch.device("cpu"))
    expected = hand_gradient(problem, params, data)
    for key in ("w", "b"):
        torch.testing.assert_close(gradient[key], expected[key], rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(float(sum(torch.nn.functional.cross_entropy(
        problem.logits(params, task, x), y, reduction="sum") for task, (x, y) in data.items())) / 90, rel=1e-5)


def test_iteration_examples_walk_the_drawn_stream() -> None:
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    assert iteration_examples(x, y, 1, 4, True)[1].tolist() == [4, 5, 6, 7]
    assert iteration_examples(x, y, 2, 4, True)[1].tolist() == [8, 9, 0, 1]  # wraps around a short stream
    assert iteration_examples(x, y, 2, 4, False)[1].tolist() == [0, 1, 2, 3]
    assert iteration_examples(x, y, 3, 20, True)[1].tolist() == list(range(10))


# -- the registered method -------------------------------------------------------------------------------------


def test_one_iteration_end_to_end_by_hand() -> None:
    # θ_init = θ0 + 0.3 Σ τ_i; g = the hand CE gradient on the first 50 drawn examples of every task at θ_init;
    # the candidate with the least Σ cos(g, θ_m) (θ_m raw weights, θ_init last) is approached by γ_0 = 0.03.
    problem = ToyProblem(ToyParams())
    base, experts = problem.pretrained(), problem.experts()
    start = {k: base[k] + 0.3 * sum(e[k] - base[k] for e in experts) for k in base}
    data = {task: problem.labeled(task, 50, seed=0) for task in problem.tasks}
    g = hand_gradient(problem, start, data)

    def cos(u: Tensor, v: Tensor) -> float:
        return float(u.flatten() @ v.flatten() / (u.norm() * v.norm()))

    candidates = [*experts, start]
    sums = [cos(g["b"], c["b"]) + cos(g["w"], c["w"]) for c in candidates]
    best = candidates[sums.index(min(sums))]
    merged, ctx = run(problem, max_iters="1", dataset_size="50", batch_size="13")
    for key in base:
        torch.testing.assert_close(merged[key], start[key] + 0.03 * (best[key] - start[key]), rtol=1e-6, atol=1e-6)
    assert ctx.notes["chosen"] == [[*problem.tasks, "initial"][sums.index(min(sums))]]
    assert ctx.notes["samples_per_task"] == 50


def test_deterministic_and_inputs_untouched() -> None:
    problem = ToyProblem(ToyParams())
    before = {k: v.clone() for k, v in problem.pretrained().items()}
    experts_before = [{k: v.clone() for k, v in e.items()} for e in problem.experts()]
    for overrides in ({"max_iters": "4", "dataset_size": "40"},
                      {"max_iters": "4", "dataset_size": "40", "granularity": "layer", "alignment": "task_vectors"}):
        first, ctx = run(problem, seed=3, **overrides)
        second, _ = run(problem, seed=3, **overrides)
        assert first.keys() == before.keys() and len(ctx.notes["chosen"]) == 4
        for key in first:
            assert torch.equal(first[key], second[key]) and first[key].dtype == before[key].dtype
            assert torch.isfinite(first[key]).all()
            assert not torch.equal(first[key], before[key])
    for key, value in problem.pretrained().items():
        assert torch.equal(value, before[key])
    for expert, saved in zip(problem.experts(), experts_before, strict=True):
        assert all(torch.equal(expert[k], saved[k]) for k in saved)


def test_budget_and_draw_error_name_the_settings() -> None:
    spec = get_method("fw_merging")
    assert spec.samples_per_task(build_params("fw_merging", spec.params, {})) == 1000  # 100 × 10 iterations
    assert spec.samples_per_task(build_params("fw_merging", spec.params, {"resample": "false"})) == 100
    assert spec.data == "labeled" and set(spec.needs) == {"class_logits", "labeled_data"}

    class Small(ToyProblem):
        def labeled(self, task: str, n: int, seed: int):
            if n > 200:
                raise BenchError(f"asked for {n} labeled examples of task '{task}' but its split has 200")
            return super().labeled(task, n, seed)

    # 1000 asked, 200 held: one iteration's 100 are drawn and the iterations walk round them (recorded)
    merged, ctx = run(Small(ToyParams()), max_iters="3", dataset_size="80")  # 240 asked
    assert ctx.notes["samples_per_task"] == 80
    merged, ctx = run(Small(ToyParams()), resample="false", max_iters="2")
    assert ctx.notes["samples_per_task"] == 100
    for resample in ("true", "false"):
        with pytest.raises(BenchError, match=r"^asked for 300 labeled examples of task 't0' but its split has 200 "
                                             r"\(fw_merging draws dataset_size = 300 examples per task( at least)?; "
                                             r"lower fw_merging.dataset_size\)$"):
            run(Small(ToyParams()), dataset_size="300", resample=resample)


def test_bad_hyperparameters_one_line_errors() -> None:
    assert build_params("fw_merging", FwMergingParams, {}) == FwMergingParams(
        max_iters=10, step_size=0.1, scaling_factor=0.3, dataset_size=100, batch_size=16, granularity="model",
        alignment="weights", resample=True)
    cases = {
        "granularity": ("task", r"^fw_merging\.granularity=task is not one of model\|layer$"),
        "alignment": ("deltas", r"^fw_merging\.alignment=deltas is not one of weights\|task_vectors$"),
        "max_iters": ("0", r"^fw_merging\.max_iters=0 is outside \[1, None\]$"),
        "dataset_size": ("0", r"^fw_merging\.dataset_size=0 is outside \[1, None\]$"),
        "step_size": ("-0.1", r"^fw_merging\.step_size=-0\.1 is outside \[0\.0, None\]$"),
        "step_size ": ("nan", r"^fw_merging\.step_size=nan is not a finite number; default is 0\.1$"),
    }
    for name, (raw, message) in cases.items():
        with pytest.raises(BenchError, match=message):
            build_params("fw_merging", FwMergingParams, {name.strip(): raw})
