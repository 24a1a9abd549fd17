"""RegMean++ (``methods/regmean_pp.py``) and MaTS (``methods/mats.py``) on problems solved by hand.

Expected values are derived in the comments from the module docstrings, never by calling the implementation
(RegMean's closed form, ``methods/regmean.regmean_merge``, serves as the reference only where a test says so).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from bench.errors import BenchError
from bench.problem import MergeContext, MergeProblem, StateDict, TaskMetrics
from bench.registry import build_params, get_method
from methods.mats import MatsParams, conjugate_gradient, mats_merge
from methods.regmean import gram_matrices, regmean_merge
from methods.regmean_pp import block_of, hybrid_params, merge_stages, regmean_plusplus, stage_index

sys.path.insert(0, str(Path(__file__).parent))
from toy_plugin import ToyParams, ToyProblem  # noqa: E402


def scalar(value: float) -> Tensor:
    return torch.tensor([value])


def matrix(value: float) -> Tensor:
    return torch.tensor([[value]])


class ScalarChain(MergeProblem):
    """Two 1×1 linear layers in two blocks, forward order ``first`` then ``second`` (names chosen by the test):

        z = x · embed;  in_1 = z;  h = (in_1 · w_1) · s_1;  in_2 = h · pre_2;  y = in_2 · w_2

    ``embed`` lies outside the blocks; s_1 belongs to the first block, pre_2 to the second.
    Task a: embed 1, w_1 1, s_1 1, pre_2 1,   w_2 1, inputs x = [1, 1].
    Task b: embed 3, w_1 4, s_1 3, pre_2 0.5, w_2 7, inputs x = [2, 0].
    """

    def __init__(self, first: str = "blocks.0", second: str = "blocks.1"):
        self.name, self.tasks = "chain", ["a", "b"]
        self.first, self.second = first, second
        values = {"a": (1.0, 1.0, 1.0, 1.0, 1.0), "b": (3.0, 4.0, 3.0, 0.5, 7.0)}
        self._experts = {task: self.weights(*numbers) for task, numbers in values.items()}
        self._inputs = {"a": torch.tensor([[1.0], [1.0]]), "b": torch.tensor([[2.0], [0.0]])}

    def weights(self, embed: float, w1: float, s1: float, pre2: float, w2: float) -> StateDict:
        entries = {"embed": scalar(embed), f"{self.first}.w": matrix(w1), f"{self.first}.s": scalar(s1),
                   f"{self.second}.pre": scalar(pre2), f"{self.second}.w": matrix(w2)}
        return dict(sorted(entries.items()))  # suites list parameters by name, not in forward order

    def pretrained(self) -> StateDict:
        return self.weights(1.0, 1.0, 1.0, 1.0, 1.0)

    def expert(self, task: str) -> StateDict:
        return self._experts[task]

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        first_in = inputs * params["embed"]
        hidden = first_in @ params[f"{self.first}.w"].T * params[f"{self.first}.s"]
        return {f"{self.first}.w": first_in, f"{self.second}.w": hidden * params[f"{self.second}.pre"]}

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        return self.linear_inputs(params, task, inputs)[f"{self.second}.w"] @ params[f"{self.second}.w"].T

    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        return self._inputs[task][:n], torch.zeros(n, dtype=torch.long)

    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        raise NotImplementedError

    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        raise NotImplementedError

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        raise NotImplementedError


def context(problem: MergeProblem, seed: int = 0) -> MergeContext:
    return MergeContext(problem=problem, seed=seed, device=torch.device("cpu"),
                        generator=torch.Generator().manual_seed(seed))


def run(name: str, problem: MergeProblem, seed: int = 0, **overrides: object) -> StateDict:
    spec = get_method(name)
    return spec.fn(context(problem, seed), build_params(name, spec.params, overrides))


# ==========================================================================================================
# RegMean++
# ==========================================================================================================


def test_blocks_are_named_by_the_prefix_up_to_the_first_number() -> None:
    assert block_of("transformer.resblocks.3.attn.in_proj_weight") == "transformer.resblocks.3"
    assert block_of("transformer.h.11.mlp.c_fc.weight") == "transformer.h.11"
    assert block_of("encoder.block.0.layer.1.DenseReluDense.wi.weight") == "encoder.block.0"
    assert block_of("ln_post.weight") is None and block_of("proj") is None


def test_stages_follow_the_forward_order_of_linear_inputs() -> None:
    fired = ["h.1.attn.w", "h.1.mlp.w", "head.weight", "h.0.attn.w", "h.0.mlp.w"]
    assert merge_stages(fired) == [["h.1.attn.w", "h.1.mlp.w"], ["head.weight"], ["h.0.attn.w", "h.0.mlp.w"]]
    stages_of = stage_index(["embed", "h.0.ln", "h.1.ln", "head.weight", "head.bias", "h.0.attn.w"],
                            merge_stages(fired))
    # block-less weights are their own stage; their bias and the embedding lie outside (-1: merged from the start)
    assert stages_of == {"embed": -1, "h.0.ln": 2, "h.1.ln": 0, "head.weight": 1, "head.bias": -1, "h.0.attn.w": 2}


def test_hybrid_takes_merged_parameters_before_the_stage_and_the_experts_from_it_on() -> None:
    merged = {"embed": scalar(10.0), "b0.w": matrix(11.0), "b0.s": scalar(12.0), "b1.w": matrix(13.0)}
    expert = {"embed": scalar(0.0), "b0.w": matrix(1.0), "b0.s": scalar(2.0), "b1.w": matrix(3.0)}
    stages_of = {"embed": -1, "b0.w": 0, "b0.s": 0, "b1.w": 1}
    assert {k: v.item() for k, v in hybrid_params(merged, expert, stages_of, 0).items()} == {
        "embed": 10.0, "b0.w": 1.0, "b0.s": 2.0, "b1.w": 3.0}
    assert {k: v.item() for k, v in hybrid_params(merged, expert, stages_of, 1).items()} == {
        "embed": 10.0, "b0.w": 11.0, "b0.s": 12.0, "b1.w": 3.0}


@pytest.mark.parametrize("first,second", [("blocks.0", "blocks.1"), ("late.1", "early.0")])
def test_regmean_pp_on_a_two_block_chain_by_hand(first: str, second: str) -> None:
    # Non-linear parameters: means. embed = (1+3)/2 = 2, s_1 = (1+3)/2 = 2, pre_2 = (1+0.5)/2 = 0.75.
    # Block 1 (embed merged, the rest each task's own): in_1 = 2x -> a: [2, 2], G = 8; b: [4, 0], G = 16;
    #   w_1 = (8·1 + 16·4)/24 = 3 (1×1 Gram matrices: α changes nothing).
    # Block 2 (embed, w_1 = 3 and s_1 = 2 merged; pre_2 and w_2 each task's own): h = 2x·3·2 = 12x;
    #   a: in_2 = 12x·1 = [12, 12], G = 288; b: in_2 = 12x·0.5 = [12, 0], G = 144;
    #   w_2 = (288·1 + 144·7)/432 = 1296/432 = 3.
    # Plain RegMean would take block 2's inputs from each expert alone: b: x·3·4·3·0.5 = 18x -> w_2 ≠ 3.
    # The second parametrisation names the blocks so that they sort against their forward order.
    merged = run("regmean_pp", ScalarChain(first, second), num_samples=2)
    expected = {"embed": 2.0, f"{first}.w": 3.0, f"{first}.s": 2.0, f"{second}.pre": 0.75, f"{second}.w": 3.0}
    assert list(merged) == sorted(expected)
    for key, value in expected.items():
        assert merged[key].shape == ScalarChain(first, second).pretrained()[key].shape
        assert merged[key].item() == pytest.approx(value, rel=1e-6), key
    plain = run("regmean", ScalarChain(first, second), num_samples=2)
    assert plain[f"{second}.w"].item() != pytest.approx(3.0, rel=1e-3)


def test_layer_granularity_merges_one_linear_layer_at_a_time_by_hand() -> None:
    # One block b.0: in_1 = x, h = (x·w_1)·s, in_2 = h, y = in_2·w_2. Task a: w_1 1, s 1, w_2 1, x = [1, 1];
    # task b: w_1 4, s 3, w_2 7, x = [2, 0]. w_1 = (G_a·1 + G_b·4)/(G_a + G_b) with G_a = 2, G_b = 4:
    # w_1 = (2 + 16)/6 = 3 in both modes.
    # block: w_2's inputs come from each expert alone: a: [1, 1], G = 2; b: x·4·3 = [24, 0], G = 576;
    #   w_2 = (2 + 576·7)/578 = 2017/289.
    # layer: w_1 = 3 merged, s each task's own (the block's last linear layer is not merged yet):
    #   a: x·3·1 = [3, 3], G = 18; b: x·3·3 = [18, 0], G = 324; w_2 = (18 + 324·7)/342 = 2286/342 = 127/19.
    # s is the mean (1 + 3)/2 = 2 either way.
    experts = [{"b.0.s": scalar(1.0), "b.0.w1": matrix(1.0), "b.0.w2": matrix(1.0)},
               {"b.0.s": scalar(3.0), "b.0.w1": matrix(4.0), "b.0.w2": matrix(7.0)}]
    data = [torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0], [0.0]])]

    def linear_inputs(params: StateDict, task: int, probe: bool) -> dict[str, Tensor]:
        x = data[task]
        return {"b.0.w1": x, "b.0.w2": x @ params["b.0.w1"].T * params["b.0.s"]}

    assert stage_index(experts[0], merge_stages(["b.0.w1", "b.0.w2"], "layer")) == {
        "b.0.s": 1, "b.0.w1": 0, "b.0.w2": 1}
    for granularity, w2 in (("block", 2017 / 289), ("layer", 127 / 19)):
        merged = regmean_plusplus(experts, linear_inputs, 0.95, granularity)
        assert merged["b.0.w1"].item() == pytest.approx(3.0, rel=1e-6)
        assert merged["b.0.w2"].item() == pytest.approx(w2, rel=1e-6), granularity
        assert merged["b.0.s"].item() == 2.0


def test_regmean_pp_with_one_linear_layer_is_regmean() -> None:
    # The toy suite has one linear weight `w` (a stage of its own) and its bias `b` outside: block 1's inputs
    # come from nothing merged, so RegMean++ is RegMean, bit for bit.
    problem = ToyProblem(ToyParams())
    assert all(torch.equal(a, b) for a, b in zip(run("regmean_pp", problem, num_samples=40).values(),
                                                run("regmean", problem, num_samples=40).values(), strict=True))


def test_regmean_pp_closed_form_step_is_regmeans() -> None:
    experts = [{"w": torch.tensor([[1.0, 2.0], [0.0, 1.0]])}, {"w": torch.tensor([[3.0, 0.0], [1.0, 1.0]])}]
    data = [torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [1.0, -1.0]])]
    merged = regmean_plusplus(experts, lambda params, task, probe: {"w": data[task]}, 0.9)
    reference = regmean_merge(experts, [gram_matrices({"w": x}) for x in data], 0.9)
    torch.testing.assert_close(merged["w"], reference["w"])


def test_regmean_pp_is_deterministic() -> None:
    problem = ToyProblem(ToyParams())
    first, second = run("regmean_pp", problem, seed=3, num_samples=30), run("regmean_pp", problem, seed=3,
                                                                            num_samples=30)
    assert all(torch.equal(first[key], second[key]) for key in first)


# ==========================================================================================================
# MaTS
# ==========================================================================================================


def test_conjugate_gradient_on_a_2x2_system_by_hand() -> None:
    # A = [[4, 1], [1, 3]], b = [1, 2]: A⁻¹ = (1/11)[[3, −1], [−1, 4]], so V = [1/11, 7/11]; CG needs 2 steps.
    lhs = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    rhs = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    solution, steps = conjugate_gradient(lhs, rhs, torch.zeros(2, 1, dtype=torch.float64), 100, 1e-12)
    torch.testing.assert_close(solution, torch.tensor([[1 / 11], [7 / 11]], dtype=torch.float64))
    assert steps == 2


def test_conjugate_gradient_keeps_the_start_in_the_null_space() -> None:
    # A = diag(2, 0), b = [4, 0], start [1, 7]: r = [2, 0], A r = [4, 0], step = 4/8 = 0.5 -> [2, 7], r = 0.
    lhs = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    rhs = torch.tensor([[4.0], [0.0]], dtype=torch.float64)
    solution, steps = conjugate_gradient(lhs, rhs, torch.tensor([[1.0], [7.0]], dtype=torch.float64), 100, 1e-5)
    assert solution.flatten().tolist() == [2.0, 7.0] and steps == 1


def test_mats_starts_from_task_arithmetic_and_converges_to_the_weighted_mean() -> None:
    # θ0 w = 1, experts w = 2 and 4 (τ = 1, 3): the start is 1 + 0.3·4 = 2.2. Gram matrices 1 and 3:
    # W = (1·2 + 3·4)/4 = 3.5. The bias has no Gram matrix: mean (0 + 2)/2 = 1.
    base = {"w": matrix(1.0), "b": scalar(0.0)}
    experts = [{"w": matrix(2.0), "b": scalar(0.0)}, {"w": matrix(4.0), "b": scalar(2.0)}]
    grams = [{"w": matrix(1.0)}, {"w": matrix(3.0)}]
    start, steps = mats_merge(base, experts, grams, MatsParams(iterations=0))
    assert start["w"].item() == pytest.approx(2.2) and start["b"].item() == 1.0 and steps == {"w": 0}
    solved, steps = mats_merge(base, experts, grams, MatsParams())
    assert solved["w"].item() == pytest.approx(3.5) and steps == {"w": 1}


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_mats_with_exact_cg_equals_regmeans_closed_form(alpha: float) -> None:
    # 6 input features: CG on the (SPD) 6×6 system is exact after 6 steps, so it lands on RegMean's solution.
    problem = ToyProblem(ToyParams())
    experts = problem.experts()
    grams = [gram_matrices(problem.linear_inputs(e, t, problem.labeled(t, 40, 0)[0]))
             for e, t in zip(experts, problem.tasks, strict=True)]
    merged, steps = mats_merge(problem.pretrained(), experts, grams, MatsParams(alpha=alpha, tolerance=0.0,
                                                                                 iterations=6))
    reference = regmean_merge(experts, grams, alpha)
    torch.testing.assert_close(merged["w"], reference["w"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged["b"], reference["b"])
    assert steps == {"w": 6}


def test_mats_registered_run_is_deterministic_and_records_cg_steps() -> None:
    problem = ToyProblem(ToyParams())
    ctx = context(problem, seed=1)
    spec = get_method("mats")
    first = spec.fn(ctx, build_params("mats", spec.params, {"num_samples": 30}))
    second = run("mats", problem, seed=1, num_samples=30)
    assert all(torch.equal(first[key], second[key]) for key in first)
    # CG stopped on its tolerance, not on the 100-iteration cap, at RegMean's closed form (α = 1: MaTS's default)
    assert ctx.notes["cg_iterations"]["max"] < MatsParams().iterations
    closed = run("regmean", problem, seed=1, num_samples=30, alpha=1.0)
    torch.testing.assert_close(first["w"], closed["w"], rtol=1e-4, atol=1e-4 * float(closed["w"].abs().max()))


# ==========================================================================================================
# Hyperparameter errors
# ==========================================================================================================


@pytest.mark.parametrize("method,overrides,message", [
    ("regmean_pp", {"alpha": "1.5"}, "regmean_pp.alpha=1.5 is outside [0.0, 1.0]"),
    ("regmean_pp", {"num_samples": "0"}, "regmean_pp.num_samples=0 is outside [1, None]"),
    ("regmean_pp", {"granularity": "tensor"}, "regmean_pp.granularity=tensor is not one of block|layer"),
    ("mats", {"iterations": "-1"}, "mats.iterations=-1 is outside [0, None]"),
    ("mats", {"alpha": "-0.1"}, "mats.alpha=-0.1 is outside [0.0, 1.0]"),
    ("mats", {"init_scale": "nan"}, "mats.init_scale=nan is not a finite number; default is 0.3"),
])
def test_bad_hyperparameters(method: str, overrides: dict, message: str) -> None:
    with pytest.raises(BenchError) as error:
        build_params(method, get_method(method).params, overrides)
    assert str(error.value) == message
