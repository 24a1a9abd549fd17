"""AdaMerging, SAMerging, Fisher and RegMean: golden values by hand and the SAM-gradient checks."""

import math

import pytest
import torch
from toy_plugin import ToyParams, ToyProblem

from bench.adaptation import UnlabeledBatches
from bench.lambda_merge import TaskVectorStack
from methods.adamerging import entropy_loss
from methods.fisher import diagonal_fisher, fisher_weighted_average
from methods.regmean import regmean_merge, shrink_off_diagonal
from methods.samerging import distillation_loss, sam_gradients, sam_perturbation


def test_entropy_and_distillation_losses_by_hand():
    assert entropy_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log(2))
    # teacher softmax([0, 0]) = [.5, .5]; student softmax([0, ln 3]) = [.25, .75]
    # KL = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    teacher, student = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3)]])
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # T = 2 halves the logits: student softmax([0, ln 3 / 2]) = [1/(1+√3), √3/(1+√3)]
    q0 = 1 / (1 + math.sqrt(3))
    expected = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / (1 - q0))
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_sam_perturbation_by_hand():
    lambdas, grad = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    # adaptive: ρ λ² g / ‖|λ| g‖ = ρ [3, 16] / ‖[3, 8]‖ = ρ [3, 16] / √73
    adaptive = sam_perturbation(lambdas, grad, 0.1, adaptive=True)
    assert torch.allclose(adaptive, 0.1 * torch.tensor([3.0, 16.0]) / math.sqrt(73))
    # plain: ρ g / ‖g‖ = ρ [3, 4] / 5
    assert torch.allclose(sam_perturbation(lambdas, grad, 0.1, adaptive=False), torch.tensor([0.06, 0.08]))
    assert torch.equal(sam_perturbation(torch.zeros(2), grad, 0.1, adaptive=True), torch.zeros(2))


@pytest.fixture
def toy_loss():
    problem = ToyProblem(ToyParams())
    stack = TaskVectorStack(problem.pretrained(), problem.experts())
    batches = UnlabeledBatches(problem, 32, 16, seed=0, device=torch.device("cpu"))
    teachers = {t: problem.logits(problem.expert(t), t, batches.batch(t, 0)).detach() for t in problem.tasks}

    def loss_fn(lambdas, step):
        params = stack.merge(lambdas)
        return sum(distillation_loss(problem.logits(params, t, batches.batch(t, 0)), teachers[t], 2.0)
                   for t in problem.tasks)

    return stack, loss_fn


@pytest.mark.parametrize("adaptive", [True, False])
def test_sam_gradient_is_taken_at_the_perturbed_point(toy_loss, adaptive):
    stack, loss_fn = toy_loss
    lambdas = stack.initial_lambdas("layer", 0.3).requires_grad_(True)
    _, clean, sharp = sam_gradients(loss_fn, lambdas, 0, rho=0.07, adaptive=adaptive)
    assert not torch.allclose(clean, sharp), "the perturbed pass must rebuild θ(λ + ε)"
    # and it is exactly the gradient at λ + ε, computed independently here
    epsilon = sam_perturbation(lambdas.detach(), clean, 0.07, adaptive)
    moved = (lambdas.detach() + epsilon).requires_grad_(True)
    (expected,) = torch.autograd.grad(loss_fn(moved, 0), moved)
    assert torch.allclose(sharp, expected)


def test_sam_gradient_with_rho_zero_equals_clean_gradient(toy_loss):
    stack, loss_fn = toy_loss
    lambdas = stack.initial_lambdas("layer", 0.3).requires_grad_(True)
    _, clean, sharp = sam_gradients(loss_fn, lambdas, 0, rho=0.0, adaptive=True)
    assert torch.equal(clean, sharp)


def test_task_vector_stack_merges_by_hand():
    base = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0])}
    experts = [{"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([1.0])},
               {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([-1.0])}]
    stack = TaskVectorStack(base, experts)
    # task-wise λ = [0.5, 2]: a = [1,1] + .5[1,0] + 2[0,2] = [1.5, 5]; b = .5·1 + 2·(−1) = −1.5
    merged = stack.merge(torch.tensor([0.5, 2.0]))
    assert merged["a"].tolist() == [1.5, 5.0] and merged["b"].tolist() == [-1.5]
    # layer-wise λ[:, a] = [1, 0], λ[:, b] = [0, 1]
    merged = stack.merge(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert merged["a"].tolist() == [2.0, 1.0] and merged["b"].tolist() == [-1.0]


def test_fisher_weighted_average_by_hand():
    experts = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    fishers = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}]
    # entry 0: (1·1 + 3·3) / (1 + 3) = 2.5; entry 1: both floored to 1e-6 -> plain mean (2 + 4) / 2 = 3
    assert fisher_weighted_average(experts, fishers, 1e-6)["w"].tolist() == [2.5, 3.0]


def test_diagonal_fisher_by_hand():
    # logits = [w x, −w x] at w = 0: p = [.5, .5]; ∂ log p_0/∂w = 2x(1 − p_0) = x, ∂ log p_1/∂w = −x.
    # Either sampled label gives a squared gradient of x², so F = mean(x²) = (1 + 4 + 9) / 3.
    def log_probs(params, x):
        z = params["w"] * x
        return torch.log_softmax(torch.cat([z, -z], dim=-1), dim=-1)

    fisher = diagonal_fisher(log_probs, {"w": torch.zeros(1)}, torch.tensor([[1.0], [2.0], [3.0]]),
                             torch.Generator().manual_seed(0))
    assert fisher["w"].item() == pytest.approx(14 / 3)


def test_regmean_by_hand():
    # one linear layer W [1 out, 2 in]; X1 = [[1, 1]], X2 = [[1, −1]] -> G1 = [[1, 1], [1, 1]], G2 = [[1, −1], [−1, 1]]
    g1, g2 = torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert shrink_off_diagonal(g1, 0.5).tolist() == [[1.0, 0.5], [0.5, 1.0]]
    experts = [{"w": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([1.0])},
               {"w": torch.tensor([[0.0, 1.0]]), "b": torch.tensor([3.0])}]
    # α = .5: ΣG̃ = [[2, 0], [0, 2]]; ΣG̃ Wᵀ = [1, .5] + [−.5, 1] = [.5, 1.5] -> Wᵀ = [.25, .75]; b = mean = 2
    merged = regmean_merge(experts, [{"w": g1}, {"w": g2}], alpha=0.5)
    assert torch.allclose(merged["w"], torch.tensor([[0.25, 0.75]]))
    assert merged["b"].tolist() == [2.0]
    # α = 1 with G1 = diag(1, 0), G2 = diag(0, 4): each expert owns one input -> W = [1, 1]
    merged = regmean_merge(experts, [{"w": torch.diag(torch.tensor([1.0, 0.0]))},
                                     {"w": torch.diag(torch.tensor([0.0, 4.0]))}], alpha=1.0)
    assert torch.allclose(merged["w"], torch.tensor([[1.0, 1.0]]))


def test_unlabeled_batches_cycle_a_seeded_pool():
    problem = ToyProblem(ToyParams())
    batches = UnlabeledBatches(problem, total=500, batch_size=16, seed=3, device=torch.device("cpu"))
    assert batches.distinct_per_task == 200 and batches.num_batches == 32
    again = UnlabeledBatches(problem, total=500, batch_size=16, seed=3, device=torch.device("cpu"))
    assert torch.equal(batches.batch("t0", 5), again.batch("t0", 5))
    assert torch.equal(batches.batch("t0", 1), batches.batch("t0", 33))  # index is taken modulo num_batches
    other = UnlabeledBatches(problem, total=500, batch_size=16, seed=4, device=torch.device("cpu"))
    assert not torch.equal(batches.batch("t0", 5), other.batch("t0", 5))


def test_adamerging_lowers_entropy_and_respects_the_clamp(tmp_path):
    from bench.runner import RunConfig, execute

    summary = execute(RunConfig(suite="toy", methods=["adamerging_lw", "samerging"], results_dir=tmp_path,
                                progress=False, method_overrides={"adamerging_lw": {"steps": "60", "lr": "0.05"},
                                                                  "samerging": {"num_batches": "5", "epochs": "4"}}))
    records = {r["method"]: r for r in summary.computed}
    ada = records["adamerging_lw"]
    assert ada["notes"]["loss_last"] < ada["notes"]["loss_first"]
    assert ada["timings"]["adapt"] > 0 and ada["samples_per_task"] == 200
    assert 0.0 <= ada["notes"]["lambda_min"] and ada["notes"]["lambda_max"] <= 1.0
    assert ada["notes"]["lambda_max"] == 1.0  # entropy pushes some coefficients into the clamp on this suite
    sam = records["samerging"]
    assert sam["notes"]["loss_last"] < sam["notes"]["loss_first"]
    assert sam["samples_per_task"] == 80 and sam["data_access"] == "unlabeled"
