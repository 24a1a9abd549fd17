"""Per-task results (issue 14 part 2): TALL masks and EMR-Merging, golden values worked out by hand, and their
records through the runner: evaluated task by task on their own weights, the per-task storage recorded."""

from __future__ import annotations

import math

import pytest
import torch

from bench.problem import PerTaskWeights
from bench.runner import RunConfig, execute
from methods.emr import emr_merge
from methods.tall_masks import tall_masks_merge


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_tall_masks_golden() -> None:
    # θ0 = (1, 1, 1); τ1 = (1, 0, 2), τ2 = (1, 3, −2); τ_MTL = (2, 3, 0)
    # task 1: |τ_MTL − τ1| = (1, 3, 2), × 0.6 = (0.6, 1.8, 1.2); |τ1| = (1, 0, 2) ≥ it: (T, F, T) -> θ0 + (2, 0, 0)
    # task 2: |τ_MTL − τ2| = (1, 0, 2), × 0.6 = (0.6, 0, 1.2); |τ2| = (1, 3, 2) ≥ it: (T, T, T) -> θ0 + (2, 3, 0)
    base = {"w": t(1, 1, 1), "ids": torch.tensor([4, 5])}
    experts = [{"w": t(2, 1, 3), "ids": torch.tensor([4, 5])}, {"w": t(2, 4, -1), "ids": torch.tensor([4, 5])}]
    result = tall_masks_merge(base, experts, tall_lambda=0.6, scaling=1.0, tasks=["a", "b"])
    assert isinstance(result, PerTaskWeights) and list(result) == ["a", "b"]
    assert torch.equal(result.for_task("a")["w"], t(3, 1, 1))
    assert torch.equal(result.for_task("b")["w"], t(3, 4, 1))
    assert torch.equal(result.for_task("b")["ids"], torch.tensor([4, 5]))
    assert result.per_task_bytes == 1  # 3 mask bits per task: one byte


def test_tall_masks_one_expert_restores_it_and_scaling_scales_the_masked_vector() -> None:
    base = {"w": torch.zeros(2, 2, dtype=torch.bfloat16)}
    expert = {"w": torch.tensor([[0.5, -1.0], [0.0, 2.0]], dtype=torch.bfloat16)}
    alone = tall_masks_merge(base, [expert], tall_lambda=0.6, scaling=1.0).for_task("0")["w"]
    assert alone.dtype == torch.bfloat16 and torch.equal(alone, expert["w"])  # |τ| ≥ 0.6·0 everywhere
    half = tall_masks_merge(base, [expert], tall_lambda=0.6, scaling=0.5).for_task("0")["w"]
    assert torch.equal(half, expert["w"] * 0.5)


def test_emr_golden() -> None:
    # τ1 = (1, −2, 0.5), τ2 = (3, 1, −0.5); Σ = (4, −1, 0) -> γ = (1, −1, −1) (0 counts as −1)
    # m1 = τ1γ > 0 = (T, T, F); m2 = (T, F, T); τ_U = γ · max(|m1 τ1|, |m2 τ2|) = (3, −2, −0.5)
    # λ1 = mean|τ1| / mean|m1 τ_U| = (3.5/3) / (5/3) = 0.7; λ2 = (4.5/3) / (3.5/3) = 9/7
    # θ1 = 0.7 · (3, −2, 0) = (2.1, −1.4, 0); θ2 = 9/7 · (3, 0, −0.5)
    base = {"w": torch.zeros(3)}
    experts = [{"w": t(1, -2, 0.5)}, {"w": t(3, 1, -0.5)}]
    result = emr_merge(base, experts, tasks=["a", "b"])
    assert result.rescalers["a"] == pytest.approx(0.7, rel=1e-6)  # per-tensor means in fp32
    assert result.rescalers["b"] == pytest.approx(9 / 7, rel=1e-6)
    torch.testing.assert_close(result.for_task("a")["w"], t(2.1, -1.4, 0.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.for_task("b")["w"], t(27 / 7, 0.0, -4.5 / 7), rtol=0, atol=1e-6)
    assert result.per_task_bytes == 1 + 4  # one byte of mask bits and the 4-byte rescaler


def test_emr_edge_cases() -> None:
    base = {"w": t(1, 1, 1, 1)}
    # one expert: γ = sign(τ) (0 -> −1), the mask keeps its nonzero entries, τ_U = τ there, λ = 1: θ = θ1
    alone = emr_merge(base, [{"w": t(3, 1, 1, -1)}])
    assert alone.rescalers["0"] == 1.0 and torch.equal(alone.for_task("0")["w"], t(3, 1, 1, -1))
    # a task whose τ is 0 everywhere: 0/0 in the reference (NaN); here λ = 0 and its weights are θ0
    zero = emr_merge(base, [{"w": t(1, 1, 1, 1)}, {"w": t(2, 0, 1, 1)}])
    assert zero.rescalers["0"] == 0.0 and torch.equal(zero.for_task("0")["w"], base["w"])
    assert all(math.isfinite(x) for x in zero.rescalers.values())


@pytest.mark.parametrize("name", ["tall_masks", "emr"])
def test_per_task_results_are_evaluated_task_by_task_and_record_their_storage(tmp_path, name) -> None:
    import toy_plugin

    summary = execute(RunConfig(suite="toy", methods=[name], results_dir=tmp_path, progress=False))
    record = next(r for r in summary.computed if r["method"] == name)
    assert record["output"] == "per_task" and record["notes"]["per_task_bytes"] == 5 + 1 + (4 if name == "emr" else 0)
    problem = toy_plugin.ToyProblem(toy_plugin.ToyParams())
    merge = tall_masks_merge if name == "tall_masks" else emr_merge
    options = {"tall_lambda": 0.6, "scaling": 1.0} if name == "tall_masks" else {}
    weights = merge(problem.pretrained(), problem.experts(), tasks=problem.tasks, **options)
    for task in problem.tasks:  # each task scored on its own weights, not on one merged model
        expected = problem.evaluate(weights.for_task(task), task, torch.device("cpu")).accuracy
        assert record["tasks"][task]["accuracy"] == expected
    reference = next(r for r in summary.computed if r["method"] == "individual")
    assert reference["output"] == "per_task" and reference["notes"]["per_task_bytes"] == (36 + 6) * 4
