"""Expert Merging (methods/expert_merging.py): chunk scaling, the σ(logit(0.1)) start, the loss terms by hand, a toy
whose optimum coefficients are known, determinism and the hyperparameter errors."""

from __future__ import annotations

import math

import pytest
import torch
from toy_plugin import ToyParams, ToyProblem

from bench.errors import BenchError
from bench.lambda_merge import TaskVectorStack
from bench.problem import MergeContext
from bench.registry import build_params, get_method
from methods.expert_merging import (
    ExpertMergingParams,
    chunk_scale,
    clip_gradient,
    coefficient_regulariser,
    combine_chunked,
    initial_logits,
    merge_chunked,
    soft_cross_entropy,
)

CPU = torch.device("cpu")


def test_chunk_scale_by_hand_with_torch_chunk_remainders():
    # 5 elements, K = 4: torch.chunk gives ⌈5/4⌉ = 2 per piece -> sizes 2, 2, 1 (only 3 pieces; c_4 unused)
    scaled = chunk_scale(torch.arange(5.0), torch.tensor([1.0, 2.0, 3.0, 100.0]))
    assert torch.equal(scaled, torch.tensor([0.0, 1.0, 4.0, 6.0, 12.0]))
    # a [2, 5] tensor is flattened (10 elements), K = 4 -> sizes 3, 3, 3, 1, then reshaped back
    scaled = chunk_scale(torch.ones(2, 5), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(scaled, torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0], [2.0, 3.0, 3.0, 3.0, 4.0]]))
    # fewer elements than K: 2 elements, K = 4 -> sizes 1, 1
    assert torch.equal(chunk_scale(torch.tensor([1.0, 1.0]), torch.tensor([5.0, 6.0, 7.0, 8.0])),
                       torch.tensor([5.0, 6.0]))
    # K = 1 is a plain scalar multiple
    assert torch.equal(chunk_scale(torch.arange(4.0).reshape(2, 2), torch.tensor([0.5])),
                       torch.tensor([[0.0, 0.5], [1.0, 1.5]]))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        chunk_scale(torch.ones(3), torch.ones(2, 2))


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 7])
def test_stacked_combination_is_the_sum_of_per_expert_chunk_scales(chunks):
    g = torch.Generator().manual_seed(0)
    stacked, coefficients = torch.randn(3, 2, 5, generator=g), torch.rand(3, chunks, generator=g)
    expected = sum(chunk_scale(stacked[i], coefficients[i]) for i in range(3))
    assert torch.allclose(combine_chunked(stacked, coefficients), expected, atol=1e-6)


def test_start_is_task_arithmetic_at_0_1():
    assert torch.sigmoid(torch.logit(torch.tensor(0.1))) == torch.tensor(0.1)  # exact in float32
    problem = ToyProblem(ToyParams())
    stack = TaskVectorStack(problem.pretrained(), problem.experts())
    base, experts = problem.pretrained(), problem.experts()
    by_hand = {k: base[k] + 0.1 * sum(e[k] - base[k] for e in experts) for k in base}
    for chunks in (1, 3):
        start = torch.sigmoid(initial_logits(3, len(stack.keys), chunks, 0.1, CPU))
        assert start.shape == (3, 2, chunks) and torch.all(start == torch.tensor(0.1))
        merged = merge_chunked(stack, start)
        for key in base:
            assert torch.allclose(merged[key], by_hand[key], atol=1e-6)
    # K = 1 is exactly the shared layer-wise merge at λ = 0.1
    start = torch.sigmoid(initial_logits(3, 2, 1, 0.1, CPU))
    for key, value in stack.merge(torch.full((3, 2), 0.1)).items():
        assert torch.equal(merge_chunked(stack, start)[key], value)


def test_loss_terms_by_hand_on_two_classes():
    # teacher logits [T ln 3, 0] / T -> softmax [3/4, 1/4]; student [0, 0] -> log_softmax [-ln 2, -ln 2]
    # softCE = -(3/4 + 1/4)(-ln 2) = ln 2, times T² = 9
    teacher, student = torch.tensor([[3 * math.log(3), 0.0]]), torch.zeros(1, 2)
    assert soft_cross_entropy(student, teacher, 3.0).item() == pytest.approx(9 * math.log(2), rel=1e-6)
    # softCE = KL + H(teacher): student equal to the teacher leaves T² · H([3/4, 1/4])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert soft_cross_entropy(teacher, teacher, 3.0).item() == pytest.approx(9 * entropy, rel=1e-6)
    # batch mean: a second example with student = [ln 3, 0] (T = 1), teacher [0, 0]: -(.5 ln .75 + .5 ln .25)
    two = soft_cross_entropy(torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]), torch.zeros(2, 2), 1.0)
    assert two.item() == pytest.approx((math.log(2) - 0.5 * math.log(0.75) - 0.5 * math.log(0.25)) / 2, rel=1e-6)
    # regulariser: Σ|c − 0.1| / (#coefficients / N): N = 2 experts, 2 slots each -> (0.2 + 0 + 0 + 0.1) / 2
    coefficients = torch.tensor([[[0.3, 0.1]], [[0.1, 0.0]]])
    assert coefficient_regulariser(coefficients, 0.1).item() == pytest.approx(0.15, rel=1e-6)
    # clipping: ‖[3, 4]‖ = 5 -> scaled to norm 1 (up to the 1e-6 of clip_grad_norm_); small ones untouched
    assert torch.allclose(clip_gradient(torch.tensor([3.0, 4.0]), 1.0), torch.tensor([0.6, 0.8]), atol=1e-6)
    assert torch.equal(clip_gradient(torch.tensor([0.3, 0.4]), 1.0), torch.tensor([0.3, 0.4]))
    assert torch.equal(clip_gradient(torch.tensor([3.0, 4.0]), 0.0), torch.tensor([3.0, 4.0]))


def test_unused_chunk_coefficients_get_no_gradient():
    problem = ToyProblem(ToyParams())
    stack = TaskVectorStack(problem.pretrained(), problem.experts())
    weights = initial_logits(3, 2, 4, 0.1, CPU).requires_grad_(True)
    inputs = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    teacher = problem.logits(problem.expert("t0"), "t0", inputs)
    loss = soft_cross_entropy(problem.logits(merge_chunked(stack, torch.sigmoid(weights)), "t0", inputs), teacher, 3.0)
    (grad,) = torch.autograd.grad(loss, weights)
    b = stack.keys.index("b")  # 6 elements, K = 4 -> pieces of 2: only 3 pieces
    assert torch.all(grad[:, b, 3] == 0) and torch.all(grad[:, b, :3] != 0)
    assert torch.all(grad[:, stack.keys.index("w")] != 0)  # 36 elements -> 4 pieces of 9


def run_method(problem, seed: int = 0, **overrides):
    spec = get_method("expert_merging")
    context = MergeContext(problem=problem, seed=seed, device=CPU, generator=torch.Generator().manual_seed(seed))
    merged = spec.fn(context, build_params("expert_merging", spec.params, {k: str(v) for k, v in overrides.items()}))
    return merged, context


@pytest.mark.parametrize("chunks", [1, 2])
def test_identical_experts_converge_to_coefficients_summing_to_one(chunks):
    # Two tasks with the same expert θ0 + τ: the student θ0 + (c1 + c2) τ matches both teachers iff c1 + c2 = 1
    # (per tensor and per chunk); symmetric start and gradients keep c1 = c2, so each tends to 1/2 from 0.1.
    problem = ToyProblem(ToyParams(num_tasks=2))
    problem._experts["t1"] = problem._experts["t0"]
    base, expert = problem.pretrained(), problem.expert("t0")
    merged, context = run_method(problem, chunks=chunks, reg_weight=0.0, lr=0.05, steps=200, batch_size=8,
                                 temperature=1.0)
    for key in base:
        assert torch.allclose(merged[key], base[key] + (expert[key] - base[key]), atol=2e-3)
    assert context.notes["lambda_min"] == pytest.approx(0.5, abs=2e-3)
    assert context.notes["lambda_max"] == pytest.approx(0.5, abs=2e-3)
    assert context.notes["loss_last"] < context.notes["loss_first"]


def test_regulariser_holds_coefficients_at_init_when_it_dominates():
    problem = ToyProblem(ToyParams(num_tasks=2))
    merged, context = run_method(problem, reg_weight=1e4, lr=0.01, steps=50)
    assert context.notes["lambda_mean"] == pytest.approx(0.1, abs=1e-2)
    assert context.notes["samples_per_task"] == 200 and context.notes["held_bytes"]["task_vectors"] > 0


def test_same_seed_same_bits_other_seed_other_batches():
    problem = ToyProblem(ToyParams())
    first, _ = run_method(problem, seed=0, lr=0.05, steps=20, batch_size=4, chunks=3)
    again, _ = run_method(problem, seed=0, lr=0.05, steps=20, batch_size=4, chunks=3)
    other, _ = run_method(problem, seed=1, lr=0.05, steps=20, batch_size=4, chunks=3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["w"], other["w"])
    assert first.keys() == problem.pretrained().keys()


def test_defaults_follow_the_reference_trainer():
    p = ExpertMergingParams()
    assert (p.chunks, p.init, p.temperature, p.reg_weight, p.lr, p.clip) == (1, 0.1, 3.0, 0.1, 1e-4, 1.0)
    spec = get_method("expert_merging")
    assert spec.family == "test-time" and spec.data == "unlabeled"
    assert spec.needs == ("class_logits", "unlabeled_data") and spec.samples_per_task(p) == 16000


@pytest.mark.parametrize(("overrides", "message"), [
    ({"chunks": "0"}, "expert_merging.chunks=0 is outside [1, None]"),
    ({"init": "1.0"}, "expert_merging.init=1.0 is outside [1e-06, 0.999999]"),
    ({"temperature": "0"}, "expert_merging.temperature=0.0 is outside [1e-06, None]"),
    ({"lr": "-1"}, "expert_merging.lr=-1.0 is outside [0.0, None]"),
    ({"steps": "0"}, "expert_merging.steps=0 is outside [1, None]"),
    ({"chunks": "1.5"}, "expert_merging.chunks='1.5' is not a valid int; default is 1"),
])
def test_bad_hyperparameters_give_one_line_errors(overrides, message):
    with pytest.raises(BenchError) as error:
        build_params("expert_merging", get_method("expert_merging").params, overrides)
    assert str(error.value) == message
