"""Model Tinting: clamping, the pseudo-label losses by hand, one Adam step by hand, the per-task result (shared
tensors identical, only the tinted tensor differs), the shuffled task order and determinism."""

import math

import pytest
import torch
from toy_plugin import ToyParams, ToyProblem

from bench.adaptation import UnlabeledBatches
from bench.errors import BenchError
from bench.lambda_merge import TaskVectorStack
from bench.problem import MergeContext, PerTaskWeights
from bench.registry import build_params, get_method
from methods.tint import (
    TintParams,
    auto_tint_param,
    clamped,
    compute_expert_targets,
    initial_tints,
    kept_examples,
    nearest_to_output,
    pseudo_label_loss,
    task_order,
    tint,
    tinted,
    train_tint,
)

CPU = torch.device("cpu")


def context(problem, seed=0):
    return MergeContext(problem=problem, seed=seed, device=CPU, generator=torch.Generator().manual_seed(seed))


def params(**overrides):
    return build_params("tint", TintParams, overrides)


def test_clamp_in_the_forward_by_hand():
    lambdas = torch.tensor([-0.5, 0.3, 1.7], requires_grad=True)
    values = clamped(lambdas)
    assert torch.equal(values.detach(), torch.tensor([0.0, 0.3, 1.0]))
    (grad,) = torch.autograd.grad((values * torch.tensor([2.0, 3.0, 5.0])).sum(), lambdas)
    assert torch.equal(grad, torch.tensor([0.0, 3.0, 0.0]))  # no gradient outside [0, 1]


def test_pseudo_label_cross_entropy_by_hand():
    # student softmax([0, ln 3]) = [.25, .75]; the expert's argmax is class 1: CE = −ln .75
    student = torch.tensor([[0.0, math.log(3.0)]])
    labels = torch.tensor([1])
    assert pseudo_label_loss(student, labels).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    # against class 0: −ln .25
    assert pseudo_label_loss(student, torch.tensor([0])).item() == pytest.approx(-math.log(0.25), rel=1e-6)


def test_tinting_plus_plus_filter_by_hand():
    # the merged model predicts class 1 with probability .75 on every row
    student = torch.tensor([[0.0, math.log(3.0)]] * 3)
    labels = torch.tensor([1, 0, 0])  # agree | disagree, expert surer | disagree, expert less sure
    confidence = torch.tensor([0.1, 0.8, 0.6])
    assert kept_examples(student, labels, confidence).tolist() == [True, True, False]
    expected = (-math.log(0.75) - math.log(0.25)) / 2  # mean over the two kept rows only
    assert pseudo_label_loss(student, labels, confidence).item() == pytest.approx(expected, rel=1e-6)
    # nothing kept: a zero loss with a zero gradient (the reference's CE over no rows would be NaN)
    leaf = student[:1].clone().requires_grad_(True)
    loss = pseudo_label_loss(leaf, torch.tensor([0]), torch.tensor([0.6]))
    (grad,) = torch.autograd.grad(loss, leaf)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_task_order_is_a_permutation_drawn_from_the_generator():
    order = task_order(5, torch.Generator().manual_seed(3))
    assert order == torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    assert sorted(order) == list(range(5))


def setup(problem, p, key):
    stack = TaskVectorStack(problem.pretrained(), problem.experts())
    batches = UnlabeledBatches(problem, p.epochs * p.batch_size, p.batch_size, seed=0, device=CPU)
    targets = compute_expert_targets(problem, batches, CPU)
    return stack, batches, targets, initial_tints(stack, key, p.init, p.tint_init)


def test_training_visits_tasks_in_the_generators_shuffled_orders():
    problem = ToyProblem(ToyParams())
    p = params(epochs=4, batch_size=8)
    stack, batches, targets, starts = setup(problem, p, "b")
    result = train_tint(problem, stack, batches, targets, "b", starts, p, torch.Generator().manual_seed(7))
    reference = torch.Generator().manual_seed(7)
    expected = [index for _ in range(4) for index in torch.randperm(3, generator=reference).tolist()]
    assert result.visited == expected
    assert expected[:3] != expected[3:6] or expected[3:6] != expected[6:9]  # the order does change


def test_each_tint_moves_only_on_its_own_tasks_steps():
    """One epoch: every W_t had exactly one Adam step (its first: each entry moves by lr · |g| / (|g| + ε) ≈ lr),
    not one per task."""
    problem = ToyProblem(ToyParams())
    p = params(epochs=1, batch_size=8)
    stack, batches, targets, starts = setup(problem, p, "b")
    result = train_tint(problem, stack, batches, targets, "b", starts, p, torch.Generator().manual_seed(0))
    for start, moved in zip(starts, result.tints, strict=True):
        assert torch.allclose((moved - start).abs(), torch.full_like(start, p.lr), rtol=1e-4)
    tinted_column, shared_column = stack.keys.index("b"), stack.keys.index("w")
    assert bool((result.lambdas[:, shared_column] != 0.3).all())
    assert bool((result.lambdas[:, tinted_column] == 0.3).all())  # no gradient reaches the tinted tensor's λ


def test_expert_targets_are_the_experts_argmax_and_top_probability():
    problem = ToyProblem(ToyParams())
    p = params(epochs=2, batch_size=4)
    _, batches, targets, _ = setup(problem, p, "w")
    for task in problem.tasks:
        probabilities = problem.logits(problem.expert(task), task, batches.batch(task, 1)).softmax(-1)
        assert torch.equal(targets[task][0][1], probabilities.argmax(-1))
        assert torch.allclose(targets[task][1][1], probabilities.max(-1).values)


def test_one_training_step_by_hand():
    """One task, one epoch: Adam's first step moves each parameter by lr · g / (|g| + ε)."""
    problem = ToyProblem(ToyParams(num_tasks=1))
    p = params(epochs=1, batch_size=16)
    stack, batches, targets, starts = setup(problem, p, "b")
    task = problem.tasks[0]
    # W_0 = θ(λ_init)["b"] = b0 + 0.3 τ_b
    assert torch.allclose(starts[0], stack.base["b"] + 0.3 * stack.stack["b"][0])
    lambdas = torch.full((1, 2), 0.3, requires_grad=True)
    tint_leaf = starts[0].clone().requires_grad_(True)
    weights = tinted(stack.merge(clamped(lambdas)), "b", tint_leaf)
    labels = problem.logits(problem.expert(task), task, batches.batch(task, 0)).argmax(-1)
    loss = torch.nn.functional.cross_entropy(problem.logits(weights, task, batches.batch(task, 0)), labels)
    grad_lambdas, grad_tint = torch.autograd.grad(loss, [lambdas, tint_leaf])

    result = train_tint(problem, stack, batches, targets, "b", starts, p, torch.Generator().manual_seed(0))
    assert result.losses[0] == pytest.approx(loss.item(), rel=1e-6)
    key_index = stack.keys.index("b")
    assert grad_lambdas[0, key_index] == 0  # the tinted tensor's λ has no effect
    expected_lambdas = lambdas.detach() - p.lr * grad_lambdas / (grad_lambdas.abs() + 1e-8)
    expected_tint = starts[0] - p.lr * grad_tint / (grad_tint.abs() + 1e-8)
    assert torch.allclose(result.lambdas, expected_lambdas, atol=1e-7)
    assert result.lambdas[0, key_index] == pytest.approx(0.3)
    assert torch.allclose(result.tints[0], expected_tint, atol=1e-7)


def test_per_task_weights_share_everything_but_the_tinted_tensor():
    problem = ToyProblem(ToyParams())
    ctx = context(problem)
    result = tint(ctx, params(epochs=3, batch_size=8, tint_param="b"))
    assert isinstance(result, PerTaskWeights) and list(result) == problem.tasks
    first = result[problem.tasks[0]]
    for task in problem.tasks[1:]:
        assert result[task]["w"] is first["w"]  # one shared tensor, not K copies
        assert not torch.equal(result[task]["b"], first["b"])
    assert result.per_task_bytes == 6 * 4
    assert ctx.notes["tint_param"] == "b"
    assert ctx.notes["tint_extra_params_per_task"] == 6
    assert ctx.notes["tint_extra_bytes_per_task"] == 24 and ctx.notes["tint_extra_bytes_total"] == 72
    assert ctx.notes["samples_per_task"] == 24


def test_deterministic_for_a_seed_and_different_for_another():
    def run(seed, **overrides):
        problem = ToyProblem(ToyParams())
        return tint(context(problem, seed), params(epochs=3, batch_size=8, **overrides))

    first, again, other = run(0), run(0), run(1)
    for task in first:
        for key in first[task]:
            assert torch.equal(first[task][key], again[task][key])
    assert any(not torch.equal(first[t]["w"], other[t]["w"]) for t in first)
    plus = run(0, variant="tinting++")
    assert any(not torch.equal(first[t]["w"], plus[t]["w"]) for t in first)


def test_auto_picks_the_matrix_nearest_the_logits():
    class TwoLayers(ToyProblem):
        def pretrained(self):
            return {"a_last": torch.eye(6), "bias": torch.zeros(6), "z_first": torch.eye(6)}

        def logits(self, params, task, inputs):
            return (inputs @ params["z_first"].T + params["bias"]) @ params["a_last"].T

    problem = TwoLayers(ToyParams())
    weights = problem.pretrained()
    inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    assert auto_tint_param(problem, weights, sorted(weights), "t0", inputs) == "a_last"
    leaves = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    order = nearest_to_output(problem.logits(leaves, "t0", inputs), leaves)
    assert sorted(order[:2]) == ["a_last", "bias"] and order[2] == "z_first"  # two operations away, then three
    # on the toy suite, the only matrix
    toy = ToyProblem(ToyParams())
    assert auto_tint_param(toy, toy.pretrained(), ["b", "w"], "t0", inputs) == "w"


def test_bad_hyperparameters_one_line_errors():
    with pytest.raises(BenchError, match=r"^tint\.variant=plus is not one of tinting\|tinting\+\+$"):
        params(variant="plus")
    with pytest.raises(BenchError, match=r"^tint\.epochs=0 is outside \[1, None\]$"):
        params(epochs=0)
    with pytest.raises(BenchError, match=r"^tint\.tint_init=zero is not one of merged\|pretrained\|expert$"):
        params(tint_init="zero")
    with pytest.raises(BenchError, match=r"^unknown tint\.tint_param \(merged tensor\) 'ww'; did you mean: w\?$"):
        tint(context(ToyProblem(ToyParams())), params(epochs=1, tint_param="ww"))


def test_registration():
    spec = get_method("tint")
    assert (spec.family, spec.data, spec.output, spec.memory) == ("test-time", "unlabeled", "per_task", "stacked")
    assert spec.needs == ("class_logits", "unlabeled_data")
    assert spec.samples_per_task(params()) == 500 * 32
