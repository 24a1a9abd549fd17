"""StatsMerging: the 6 layer features by hand, their normalisation, the softmax coefficient structure, gradients
reaching the MLPs (the released code's no_grad bug, fixed), a toy whose optimum is known, determinism and the
hyperparameter errors."""

import math

import pytest
import torch
from toy_plugin import ToyParams, ToyProblem

from bench.adaptation import UnlabeledBatches
from bench.errors import BenchError
from bench.lambda_merge import TaskVectorStack
from bench.problem import MergeContext
from bench.registry import build_params, get_method
from methods.statsmerging import (
    StatsMergingParams,
    coefficients,
    init_mlps,
    layer_statistics,
    normalise_features,
    pseudo_label_loss,
    stack_features,
    train_mlps,
)

CPU = torch.device("cpu")


def context(problem, seed=0):
    return MergeContext(problem=problem, seed=seed, device=CPU, generator=torch.Generator().manual_seed(seed))


def params(**overrides):
    return build_params("statsmerging", StatsMergingParams, overrides)


def test_six_features_by_hand():
    # two task vectors of a 2-element tensor: M = [[3, 0], [0, 4]]
    stacked = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    mean, std, var, norm, top, rank = layer_statistics(stacked).tolist()
    assert mean == pytest.approx(7 / 4)
    # unbiased var: Σ(x − 1.75)² / 3 = (1.5625 + 3.0625 + 3.0625 + 5.0625) / 3 = 12.75 / 3
    assert var == pytest.approx(4.25) and std == pytest.approx(math.sqrt(4.25))
    assert norm == pytest.approx(5.0)
    assert top == pytest.approx(4.0) and rank == 2.0  # singular values of diag(3, 4)
    # a rank-1 stack (τ_2 = 2 τ_1) of a [1, 2] weight: M = [[1, 1], [2, 2]], σ = (√10, 0)
    _, _, _, norm, top, rank = layer_statistics(torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]])).tolist()
    assert norm == pytest.approx(math.sqrt(10)) and top == pytest.approx(math.sqrt(10)) and rank == 1.0
    # a one-element tensor with one task: std and var are 0 (not NaN)
    assert layer_statistics(torch.tensor([[2.0]])).tolist() == pytest.approx([2.0, 0.0, 0.0, 2.0, 2.0, 1.0])


def test_features_are_standardised_across_layers():
    raw = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    # column 0: mean 2, population std 1 → [−1, 1]; column 1 is constant → 0
    assert torch.equal(normalise_features(raw), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    stack = TaskVectorStack({"a": torch.zeros(3), "b": torch.zeros(2, 2)},
                            [{"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.eye(2)},
                             {"a": torch.tensor([0.0, 1.0, 0.0]), "b": -torch.eye(2)}])
    features = stack_features(stack)
    assert features.shape == (2, 6)
    assert torch.allclose(features.mean(dim=0), torch.zeros(6), atol=1e-6)


def test_coefficients_are_a_softmax_per_layer():
    mlps = init_mlps(num_layers=5, hidden=8, num_tasks=3, generator=torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in mlps] == [(5, 6, 8), (5, 8), (5, 8, 8), (5, 8), (5, 8, 3), (5, 3)]
    features = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    c = coefficients(mlps, features)
    assert c.shape == (5, 3) and (c > 0).all()
    assert torch.allclose(c.sum(dim=1), torch.ones(5))
    # each layer has its own MLP: layer 0's coefficients are those of a plain 6→8→8→3 MLP with its weights
    w1, b1, w2, b2, w3, b3 = (t[0] for t in mlps)
    h = torch.relu(torch.relu(features[0] @ w1 + b1) @ w2 + b2)
    assert torch.allclose(c[0], torch.softmax(h @ w3 + b3, dim=-1))


def test_merge_keeps_the_base_coefficient_at_one():
    base = {"w": torch.tensor([1.0, 1.0])}
    stack = TaskVectorStack(base, [{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([1.0, 5.0])}])
    # c = [.25, .75]: θ = θ0 + .25 [2, 0] + .75 [0, 4] = [1.5, 4]
    merged = stack.merge(torch.tensor([[0.25, 0.75]]).T)
    assert torch.allclose(merged["w"], torch.tensor([1.5, 4.0]))


def test_pseudo_label_cross_entropy_by_hand():
    student = torch.tensor([[0.0, math.log(3.0)]])  # softmax [.25, .75]
    assert pseudo_label_loss(student, torch.tensor([[5.0, 1.0]])).item() == pytest.approx(-math.log(0.25))
    assert pseudo_label_loss(student, torch.tensor([[0.0, 2.0]])).item() == pytest.approx(-math.log(0.75))


def test_gradients_reach_every_mlp_parameter():
    # the released code builds θ under no_grad from detached coefficients, so its MLPs never learn
    problem = ToyProblem(ToyParams())
    stack = TaskVectorStack(problem.pretrained(), problem.experts())
    mlps = [t.requires_grad_(True) for t in init_mlps(len(stack.keys), 8, 3, torch.Generator().manual_seed(0))]
    features = stack_features(stack)
    inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    merged = stack.merge(coefficients(mlps, features).T)
    loss = sum(pseudo_label_loss(problem.logits(merged, t, inputs), problem.logits(problem.expert(t), t, inputs))
               for t in problem.tasks)
    grads = torch.autograd.grad(loss, mlps)
    for grad in grads[4:]:  # the output layer's weights and biases get a gradient in every layer's MLP
        assert grad.abs().sum(dim=tuple(range(1, grad.dim()))).gt(0).all()
    assert all(grad.abs().sum() > 0 for grad in grads)


def test_coefficients_move_toward_the_expert_that_teaches_every_task():
    # expert t0 is the teacher of every task: the optimum puts all weight on τ_0 in every layer
    problem = ToyProblem(ToyParams())
    stack = TaskVectorStack(problem.pretrained(), problem.experts())
    batches = UnlabeledBatches(problem, 8 * 16, 16, seed=0, device=CPU)
    teacher = {t: [problem.logits(problem.expert("t0"), t, batches.batch(t, b)) for b in range(batches.num_batches)]
               for t in problem.tasks}
    ctx = context(problem)
    features = stack_features(stack)
    initial = coefficients(init_mlps(len(stack.keys), 16, 3, torch.Generator().manual_seed(0)), features)
    mlps, _ = train_mlps(ctx, stack, batches, teacher, params(hidden=16, steps=40, lr=0.01, batch_size=16))
    final = coefficients(mlps, features)
    assert (final[:, 0] > initial[:, 0] + 0.3).all() and (final[:, 0] > 0.8).all()
    assert ctx.notes["loss_last"] < ctx.notes["loss_first"]


def run_method(problem, seed, **overrides):
    method = get_method("statsmerging")
    ctx = context(problem, seed)
    merged = method.fn(ctx, params(**overrides))
    return merged, ctx.notes


def test_end_to_end_on_the_toy_is_deterministic_by_seed():
    problem = ToyProblem(ToyParams())
    merged, notes = run_method(problem, 0, hidden=8, steps=5)
    again, _ = run_method(ToyProblem(ToyParams()), 0, hidden=8, steps=5)
    other, _ = run_method(ToyProblem(ToyParams()), 1, hidden=8, steps=5)
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    assert not torch.equal(merged["w"], other["w"])
    assert notes["samples_per_task"] == 20
    assert len(notes["coefficient_mean_per_task"]) == 3
    assert sum(notes["coefficient_mean_per_task"]) == pytest.approx(1.0, abs=1e-3)


def test_registration_and_budget():
    method = get_method("statsmerging")
    assert method.family == "test-time" and method.data == "unlabeled"
    assert set(method.needs) == {"class_logits", "unlabeled_data"}
    assert method.budget(params(steps=7, batch_size=3)) == 21


@pytest.mark.parametrize(("name", "value", "message"), [
    ("hidden", "0", "statsmerging.hidden=0 is outside [1, None]"),
    ("steps", "0", "statsmerging.steps=0 is outside [1, None]"),
    ("lr", "-1", "statsmerging.lr=-1.0 is outside [0.0, None]"),
    ("batch_size", "x", "statsmerging.batch_size='x' is not a valid int; default is 4"),
])
def test_bad_hyperparameters_fail_with_one_line(name, value, message):
    with pytest.raises(BenchError) as error:
        params(**{name: value})
    assert str(error.value) == message
