"""Golden values for Model Breadcrumbs, DELLA and MagMax (methods/breadcrumbs.py, della.py, magmax.py).

Expected values are worked out by hand in the comments from the module docstrings (mergekit's selection and
fusion rules, FusionBench's MagMax fold), not by calling the implementation. Unless a test says otherwise
θ0 = 0, so θ_i = τ_i. Values are exact in binary floating point, so most comparisons are exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bench.errors import BenchError
from bench.problem import MergeContext, StateDict
from bench.registry import build_params, get_method
from methods.breadcrumbs import BreadcrumbsParams, breadcrumbs_counts, breadcrumbs_merge
from methods.della import DellaParams, della_keep_probabilities, della_merge, della_rescale
from methods.magmax import MagMaxParams, magmax_merge


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def zeros_like_all(experts: list[StateDict]) -> StateDict:
    return {key: torch.zeros_like(value) for key, value in experts[0].items()}


def assert_state_equal(actual: StateDict, expected: StateDict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(actual[key], expected[key], atol=0.0, rtol=0.0, msg=f"tensor {key}")


def breadcrumbs(base: StateDict, experts: list[StateDict], **overrides: object) -> StateDict:
    options = {"density": 1.0, "gamma": 0.0, "scaling": 1.0, "consensus": "none"} | overrides
    return breadcrumbs_merge(base, experts, **options)  # type: ignore[arg-type]


def della(base: StateDict, experts: list[StateDict], **overrides: object) -> StateDict:
    options = {"density": 1.0, "epsilon": 0.15, "scaling": 1.0, "consensus": "ties", "rescale": "l1"} | overrides
    return della_merge(base, experts, **options)  # type: ignore[arg-type]


def distinct_magnitudes(shape: tuple[int, ...], seed: int) -> Tensor:
    """Entries ±(1..N)/N in a random order and with random signs: all magnitudes differ."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    values = (torch.randperm(numel, generator=generator) + 1).float() / numel
    signs = torch.randint(0, 2, (numel,), generator=generator).float() * 2 - 1
    return (values * signs).reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Breadcrumbs


def test_breadcrumbs_counts_follow_mergekits_float_truncation() -> None:
    # N = 10, density 0.5, γ 0.1: target = int(5.0) = 5, n_top = int(1.0) = 1, n_bot = 10 − 5 − 1 = 4
    assert breadcrumbs_counts(10, 0.5, 0.1) == (4, 1)
    # N = 100, density 0.29: 0.29 · 100 = 28.999… → target 28 (not 29); n_top = int(1.0) = 1; n_bot = 71
    assert breadcrumbs_counts(100, 0.29, 0.01) == (71, 1)
    # N = 10, density 0.9, γ 0.2: target 9, n_top 2, n_bot = −1 < 0 → n_top = 2 − 1 = 1, n_bot = 0
    assert breadcrumbs_counts(10, 0.9, 0.2) == (0, 1)
    # N = 50, γ 0.01: n_top = int(0.5) = 0; target = int(5.0) = 5 → n_bot = 45
    assert breadcrumbs_counts(50, 0.1, 0.01) == (45, 0)
    # density 0: target 0, n_top = 1, n_bot = 99 → nothing kept
    assert breadcrumbs_counts(100, 0.0, 0.01) == (99, 1)
    # a 0-D tensor (N = 1): target 0, n_top 0, n_bot 1
    assert breadcrumbs_counts(1, 0.1, 0.01) == (1, 0)


def test_breadcrumbs_golden_drops_both_tails_then_sums() -> None:
    experts = [
        {"w": t(1, -2, 3, -4, 5, -6, 7, -8, 9, -10)},
        {"w": t(5, 4.5, 4, 3.5, 3, 2.5, 2, 1.5, 1, 0.5)},
    ]
    base = {"w": torch.ones(10)}
    experts = [{"w": e["w"] + 1} for e in experts]
    # density 0.5, γ 0.1 on N = 10: drop the 4 smallest and the 1 largest |τ| of each task (counts above).
    # τ̃1 = [0, 0, 0, 0, 5, -6, 7, -8, 9, 0]            (drops |1..4| and |10|)
    # τ̃2 = [0, 4.5, 4, 3.5, 3, 2.5, 0, 0, 0, 0]         (drops 0.5, 1, 1.5, 2 and 5)
    # Σ   = [0, 4.5, 4, 3.5, 8, -3.5, 7, -8, 9, 0]; λ = 0.5; θ = 1 + 0.5 Σ
    expected = t(1, 3.25, 3, 2.75, 5, -0.75, 4.5, -3, 5.5, 1)
    assert_state_equal(breadcrumbs(base, experts, density=0.5, gamma=0.1, scaling=0.5), {"w": expected})


def test_breadcrumbs_keeps_exactly_the_middle_ranks() -> None:
    tau = distinct_magnitudes((20, 50), seed=3)  # N = 1000, magnitudes 1/1000 … 1000/1000
    merged = breadcrumbs(zeros_like_all([{"w": tau}]), [{"w": tau}], density=0.29, gamma=0.01)["w"]
    # target = int(290.0) = 290, n_top = int(10.0) = 10, n_bot = 700: the kept magnitudes are ranks
    # 701 … 990, i.e. exactly the values 0.701 … 0.990 (each kept entry unchanged, the rest 0).
    kept = merged != 0
    assert int(kept.sum()) == 290
    assert torch.equal(merged[kept], tau[kept])
    magnitudes = tau.abs() * 1000
    assert torch.equal(kept, (magnitudes >= 700.5) & (magnitudes <= 990.5))
    # density 0.29 of N = 100 keeps int(28.999…) = 28 entries, with γ = 0.01 removing the largest one
    small = distinct_magnitudes((100,), seed=4)
    merged = breadcrumbs({"w": torch.zeros(100)}, [{"w": small}], density=0.29, gamma=0.01)["w"]
    assert torch.equal(merged != 0, (small.abs() * 100 >= 71.5) & (small.abs() * 100 <= 99.5))


def test_breadcrumbs_ties_in_magnitude_keep_the_exact_count() -> None:
    # 40 entries of magnitude 1 with alternating signs; density 0.5, γ 0.1: target 20, n_top 4, n_bot 16.
    # Which tied entries survive is torch.sort's order, but exactly 20 survive, unchanged.
    tau = torch.tensor([1.0, -1.0] * 20)
    merged = breadcrumbs({"w": torch.zeros(40)}, [{"w": tau}], density=0.5, gamma=0.1)["w"]
    assert int((merged != 0).sum()) == 20
    assert torch.equal(merged[merged != 0], tau[merged != 0])


def test_breadcrumbs_top_cut_of_zero_removes_nothing_unless_mergekit_slice_is_asked() -> None:
    # N = 6, density 0.5, γ 0.01: target 3, n_top = int(0.06) = 0, n_bot 3 → keep the 3 largest |τ|.
    experts = [{"w": t(0.5, -4, 1, 3, -2, 0.25)}]
    base = zeros_like_all(experts)
    assert_state_equal(breadcrumbs(base, experts, density=0.5, gamma=0.01), {"w": t(0, -4, 0, 3, -2, 0)})
    # mergekit keeps indices[n_bot:-0], an empty slice: the whole task vector is dropped.
    dropped = breadcrumbs(base, experts, density=0.5, gamma=0.01, mergekit_empty_slice=True)
    assert_state_equal(dropped, {"w": t(0, 0, 0, 0, 0, 0)})


def test_breadcrumbs_density_one_is_task_arithmetic_and_ignores_gamma() -> None:
    base = {"w": t(1, 1, 1)}
    experts = [{"w": t(2, 0, 1.5)}, {"w": t(1.5, 3, 1)}]
    # τ1 = [1, -1, 0.5], τ2 = [0.5, 2, 0]; Σ = [1.5, 1, 0.5]; λ = 0.5 → θ = [1.75, 1.5, 1.25]
    assert_state_equal(breadcrumbs(base, experts, density=1.0, gamma=0.3, scaling=0.5), {"w": t(1.75, 1.5, 1.25)})


def test_breadcrumbs_weights_multiply_each_task_vector() -> None:
    experts = [{"w": t(1, 2)}, {"w": t(4, -8)}]
    base = zeros_like_all(experts)
    # no pruning; w = [2, 0.25]: 2·[1, 2] + 0.25·[4, -8] = [3, 2]; λ = 1
    assert_state_equal(breadcrumbs(base, experts, weights=[2.0, 0.25]), {"w": t(3, 2)})


def test_breadcrumbs_ties_consensus_sums_sign_agreeing_entries() -> None:
    experts = [{"w": t(2, -1, 3, 0, 2)}, {"w": t(4, -3, -1, 0, -2)}, {"w": t(-1, -2, 0, 0, 0)}]
    base = zeros_like_all(experts)
    # column 0: Σ = 5 ≥ 0 → +, agreeing 2, 4 → 6;    column 1: Σ = −6 → −, all agree → −6
    # column 2: Σ = 2 → +, agreeing 3 (0 has sign 0) → 3;   column 3: all 0 → 0
    # column 4: Σ = 0 counts as + → only the +2 agrees → 2 (mergekit's rule, not TIES' majority sign)
    assert_state_equal(breadcrumbs(base, experts, consensus="ties"), {"w": t(6, -6, 3, 0, 2)})
    # normalize divides by the number of agreeing tasks (weights 1): [6/2, −6/3, 3/1, 0/1, 2/1]
    assert_state_equal(breadcrumbs(base, experts, consensus="ties", normalize=True), {"w": t(3, -2, 3, 0, 2)})


def test_breadcrumbs_edge_cases_k1_zero_vectors_buffers_shapes_dtypes() -> None:
    base = {
        "w": torch.zeros(2, 1, 2, 3, dtype=torch.float16),
        "s": torch.tensor(0.5),
        "ids": torch.tensor([0, 1, 2]),
    }
    tau = t(1, -6, 2, -5, 3, 4, -12, 10, 7, -8, 9, 11).reshape(2, 1, 2, 3)
    experts = [{"w": tau.half(), "s": torch.tensor(2.5), "ids": torch.tensor([7, 7, 7])}]
    merged = breadcrumbs(base, experts, density=0.5, gamma=0.1)
    # w: N = 12, target 6, n_top = int(1.2) = 1, n_bot = 5 → keep |τ| ranks 6 … 11: 6, 7, 8, 9, 10, 11
    expected_w = t(0, -6, 0, 0, 0, 0, 0, 10, 7, -8, 9, 11).reshape(2, 1, 2, 3).half()
    # s (0-D, N = 1): target 0, n_bot 1 → dropped → θ0 = 0.5; ids copied from the base
    assert_state_equal(merged, {"w": expected_w, "s": torch.tensor(0.5), "ids": torch.tensor([0, 1, 2])})
    # zero task vectors leave θ0
    same = breadcrumbs(base, [dict(base)], density=0.5, gamma=0.1)
    assert_state_equal(same, {key: value.clone() for key, value in base.items()})


def test_breadcrumbs_params() -> None:
    defaults = BreadcrumbsParams()
    assert (defaults.density, defaults.gamma, defaults.scaling, defaults.consensus) == (0.1, 0.01, 0.3, "none")
    with pytest.raises(BenchError, match=r"^breadcrumbs\.density=1\.5 is outside \[0\.0, 1\.0\]$"):
        build_params("breadcrumbs", BreadcrumbsParams, {"density": "1.5"})
    with pytest.raises(BenchError, match=r"^breadcrumbs\.gamma=-0\.1 is outside \[0\.0, 1\.0\]$"):
        build_params("breadcrumbs", BreadcrumbsParams, {"gamma": "-0.1"})
    with pytest.raises(BenchError, match=r"^breadcrumbs\.consensus=sum is not one of none\|ties$"):
        build_params("breadcrumbs", BreadcrumbsParams, {"consensus": "sum"})
    with pytest.raises(ValueError, match="outside"):
        BreadcrumbsParams(density=2.0)


# ----------------------------------------------------------------------------------------------------------
# DELLA


def test_della_keep_probabilities_golden() -> None:
    # density 0.5, ε 0.25 → p = 0.25 + rn · 0.5
    # 1-D is one row: |τ| = [1, 4, 2, 0.5, 3] → ranks [2, 5, 3, 1, 4] → rn = (r − 1)/4 = [.25, 1, .5, 0, .75]
    assert torch.equal(della_keep_probabilities(t(1, -4, 2, 0.5, -3), 0.5, 0.25), t(0.375, 0.75, 0.5, 0.25, 0.625))
    # 2-D: each row along dim 1: [1, 2, 3] → rn [0, .5, 1]; [-3, 2, 1] → rn [1, .5, 0]
    matrix = torch.tensor([[1.0, 2.0, 3.0], [-3.0, 2.0, 1.0]])
    expected = torch.tensor([[0.25, 0.5, 0.75], [0.75, 0.5, 0.25]])
    assert torch.equal(della_keep_probabilities(matrix, 0.5, 0.25), expected)
    # 3-D [1, 3, 2]: ranked along dim 1 for each last index: [1, 2, 3] and [6, 5, 4]
    cube = torch.tensor([[[1.0, 6.0], [2.0, 5.0], [3.0, 4.0]]])
    expected = torch.tensor([[[0.25, 0.75], [0.5, 0.5], [0.75, 0.25]]])
    assert torch.equal(della_keep_probabilities(cube, 0.5, 0.25), expected)
    # rows of one entry (0-D, [n, 1]) get rn = 1/2 → p = 0.25 + 0.25 = 0.5 = density
    assert torch.equal(della_keep_probabilities(torch.tensor(-7.0), 0.5, 0.25), torch.tensor(0.5))
    assert torch.equal(della_keep_probabilities(torch.tensor([[3.0], [-1.0]]), 0.5, 0.25), torch.full((2, 1), 0.5))


def test_della_rescale_rules_golden() -> None:
    tau, mask, probabilities = t(1, -2, 3, -4), t(1, 0, 1, 0), t(0.25, 0.5, 0.5, 0.75)
    # l1: ‖τ‖₁ = 10, ‖τ·m‖₁ = 4 → ×2.5
    assert torch.equal(della_rescale(tau, mask, probabilities, "l1"), t(2.5, 0, 7.5, 0))
    # inverse_keep: τ·m / p = [1/0.25, 0, 3/0.5, 0]
    assert torch.equal(della_rescale(tau, mask, probabilities, "inverse_keep"), t(4, 0, 6, 0))
    assert torch.equal(della_rescale(tau, mask, probabilities, "none"), t(1, 0, 3, 0))
    # nothing kept: the L1 rescale leaves the zeros (‖τ·m‖₁ < 1e-7)
    assert torch.equal(della_rescale(tau, torch.zeros(4), probabilities, "l1"), torch.zeros(4))


def test_della_fusion_golden_without_pruning() -> None:
    experts = [{"w": t(2, -1, 3, 0, 2)}, {"w": t(4, -3, -1, 0, -2)}, {"w": t(-1, -2, 0, 0, 0)}]
    base = {"w": torch.ones(5)}
    experts = [{"w": e["w"] + 1} for e in experts]
    # density 1: no pruning, no rescale. ties: elected sign + where Σ ≥ 0; disjoint mean of agreeing entries:
    # [(2+4)/2, (−1−3−2)/3, 3/1, 0 (divisor 0 → 1), 2/1 (Σ = 0 counts as +)] = [3, −2, 3, 0, 2];
    # λ = 0.5 → θ = 1 + [1.5, −1, 1.5, 0, 1]
    assert_state_equal(della(base, experts, scaling=0.5), {"w": t(2.5, 0, 2.5, 1, 2)})
    # consensus none (della_linear): plain sum [5, −6, 2, 0, 0], not divided; λ = 0.5
    assert_state_equal(della(base, experts, consensus="none", scaling=0.5), {"w": t(3.5, -2, 2, 1, 1)})
    # density 0 drops every task vector → θ0
    assert_state_equal(della(base, experts, density=0.0), {"w": torch.ones(5)})


def test_della_masks_are_bernoulli_draws_from_the_generator_in_key_then_task_order() -> None:
    # two keys inserted as b, a: the driver visits a first, then b; per key task 1 then task 2.
    experts = [
        {"b": t(1, -4, 2, 0.5, -3), "a": t(3, 2, 1)},
        {"b": t(-2, 1, 0.5, 4, 3), "a": t(-1, 5, 2)},
    ]
    base = zeros_like_all(experts)
    before = torch.get_rng_state()
    merged = della(base, experts, density=0.5, epsilon=0.25, consensus="none", rescale="none",
                   generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is never used
    # p by hand (0.25 + rn · 0.5): a1 |3, 2, 1| → [.75, .5, .25]; a2 |1, 5, 2| → [.25, .75, .5]
    # b1 (as in the golden above) [.375, .75, .5, .25, .625]; b2 |2, 1, .5, 4, 3| → ranks [3, 2, 1, 5, 4]
    # → rn [.5, .25, 0, 1, .75] → p [.5, .375, .25, .75, .625]
    generator = torch.Generator().manual_seed(11)
    mask_a1 = torch.bernoulli(t(0.75, 0.5, 0.25), generator=generator)
    mask_a2 = torch.bernoulli(t(0.25, 0.75, 0.5), generator=generator)
    mask_b1 = torch.bernoulli(t(0.375, 0.75, 0.5, 0.25, 0.625), generator=generator)
    mask_b2 = torch.bernoulli(t(0.5, 0.375, 0.25, 0.75, 0.625), generator=generator)
    assert torch.equal(merged["a"], experts[0]["a"] * mask_a1 + experts[1]["a"] * mask_a2)
    assert torch.equal(merged["b"], experts[0]["b"] * mask_b1 + experts[1]["b"] * mask_b2)


def test_della_kept_fraction_matches_the_keep_probabilities() -> None:
    # 50 rows of 400 distinct magnitudes; density 0.7, ε 0.15 → p = 0.55 + 0.3 · (r − 1)/399.
    # Mean p over a row is exactly 0.7. Kept counts are sums of independent Bernoullis, so the kept fraction of a
    # set S has standard deviation σ_S = sqrt(Σ_S p(1 − p)) / |S| (about 0.0032 over all 20000 entries, 0.010 per
    # rank decile); we allow 5σ, which any seed passes with probability > 1 − 1e-6.
    tau = distinct_magnitudes((50, 400), seed=5)
    ranks = tau.abs().argsort(dim=1).argsort(dim=1)  # 0-based rank of |τ| within its row (no ties)
    p = 0.55 + 0.3 * ranks.float() / 399
    merged = della({"w": torch.zeros(50, 400)}, [{"w": tau}], density=0.7, epsilon=0.15, rescale="none",
                   generator=torch.Generator().manual_seed(0))["w"]
    kept = merged != 0

    def check(selection: Tensor) -> None:
        probabilities = p[selection]
        sigma = float(torch.sqrt((probabilities * (1 - probabilities)).sum())) / probabilities.numel()
        assert abs(float(kept[selection].float().mean()) - float(probabilities.mean())) < 5 * sigma

    check(torch.ones_like(kept))
    assert abs(float(p.mean()) - 0.7) < 1e-6
    for decile in range(10):  # larger magnitudes are kept more often: 0.565 in the lowest decile, 0.835 top
        check(ranks // 40 == decile)
    # survivors are the task vector itself (rescale none)
    assert torch.equal(merged[kept], tau[kept])


def test_della_rescales_preserve_l1_norm_and_are_unbiased() -> None:
    tau = distinct_magnitudes((20, 500), seed=6)
    base = {"w": torch.zeros(20, 500)}
    l1 = della(base, [{"w": tau}], density=0.5, epsilon=0.2, rescale="l1")["w"]
    torch.testing.assert_close(l1.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0.0)
    # inverse_keep: each survivor is τ/p, so E[δ/τ] = 1; δ/τ = m/p has variance (1 − p)/p ≤ 0.7/0.3 < 2.4 for
    # p ∈ [0.3, 0.7], so the mean over 10000 entries has σ < 0.0155 and 5σ < 0.08.
    inverse = della(base, [{"w": tau}], density=0.5, epsilon=0.2, rescale="inverse_keep")["w"]
    assert abs(float((inverse / tau).mean()) - 1.0) < 0.08
    assert float((inverse / tau)[inverse != 0].min()) >= 1 / 0.7 - 1e-5  # 1/p ≥ 1/(density + ε)


def test_della_is_deterministic_by_seed_through_the_registered_method() -> None:
    from toy_plugin import ToyParams, ToyProblem

    problem = ToyProblem(ToyParams())
    spec = get_method("della")
    params = build_params("della", spec.params, {})

    def run(seed: int) -> StateDict:
        context = MergeContext(problem=problem, seed=seed, device=torch.device("cpu"),
                               generator=torch.Generator().manual_seed(seed))
        return spec.fn(context, params)

    first, again, other = run(3), run(3), run(4)
    assert_state_equal(first, again)
    assert not torch.equal(first["w"], other["w"])


def test_della_edge_cases_k1_shapes_dtypes_buffers() -> None:
    base = {"w": torch.zeros(3, 2, 2, 2, dtype=torch.bfloat16), "s": torch.tensor(1.0), "ids": torch.arange(3)}
    experts = [{"w": torch.ones(3, 2, 2, 2, dtype=torch.bfloat16), "s": torch.tensor(3.0),
                "ids": torch.zeros(3, dtype=torch.int64)}]
    merged = della(base, experts, density=0.5, epsilon=0.25, consensus="none", rescale="inverse_keep",
                   generator=torch.Generator().manual_seed(1))
    assert merged["w"].dtype == torch.bfloat16 and torch.equal(merged["ids"], torch.arange(3))
    # rows (dim 1) of 2 equal entries are ranked 1, 2 → p ∈ {0.25, 0.75}: every entry of w is 0 (dropped) or
    # 1/p ∈ {4, 4/3}, written in bf16 (4/3 rounds to 1.3359375)
    allowed = set(torch.tensor([0.0, 4.0, 4.0 / 3.0]).bfloat16().float().tolist())
    assert set(merged["w"].float().unique().tolist()) <= allowed
    # s (0-D, p = 0.5): θ0 + 2·m/0.5 ∈ {1, 5}
    assert float(merged["s"]) in (1.0, 5.0)
    # zero task vectors: θ0 whatever the masks (L1 rescale skipped for a zero tensor)
    same = della(base, [dict(base)], density=0.5, epsilon=0.25)
    assert_state_equal(same, {key: value.clone() for key, value in base.items()})


def test_della_params() -> None:
    defaults = DellaParams()
    assert (defaults.density, defaults.epsilon, defaults.scaling, defaults.consensus, defaults.rescale) == (
        0.7, 0.15, 1.0, "ties", "l1")
    message = (r"^della: della\.epsilon=0\.15 with della\.density=0\.9: keep probabilities density ± epsilon "
               r"must lie in \(0, 1\); pick epsilon < 0\.1$")
    with pytest.raises(BenchError, match=message):
        build_params("della", DellaParams, {"density": "0.9"})
    with pytest.raises(BenchError, match=r"^della\.epsilon=0\.6 is outside \[0\.0, 0\.5\]$"):
        build_params("della", DellaParams, {"epsilon": "0.6"})
    with pytest.raises(BenchError, match=r"^della\.rescale=l2 is not one of l1\|inverse_keep\|none$"):
        build_params("della", DellaParams, {"rescale": "l2"})
    # density 1 and 0 need no ε check (no sampling)
    assert build_params("della", DellaParams, {"density": "1"}).density == 1.0
    with pytest.raises(ValueError, match="pick epsilon"):
        della_merge({"w": t(1)}, [{"w": t(2)}], density=0.1, epsilon=0.15, scaling=1.0)


# ----------------------------------------------------------------------------------------------------------
# MagMax


def test_magmax_golden_fold_with_ties_to_the_later_task() -> None:
    base = {"w": torch.ones(4)}
    taus = [t(1, -2, 3, 0.5), t(-4, 0.5, 3, -0.5), t(0, -2.5, -3, 0.25)]
    experts = [{"w": tau + 1} for tau in taus]
    # fold from τ1 = [1, −2, 3, 0.5]; τ2 replaces where |τ2| ≥ |running|: [−4, −2, 3 (τ2's, tie), −0.5 (tie)]
    # τ3: |0| < 4 keep −4; 2.5 ≥ 2 → −2.5; |−3| ≥ 3 → −3 (tie, later wins); 0.25 < 0.5 keep −0.5
    # τ* = [−4, −2.5, −3, −0.5]; α = 0.5 → θ = 1 + 0.5 τ* = [−1, −0.25, −0.5, 0.75]
    assert_state_equal(magmax_merge(base, experts, scaling=0.5), {"w": t(-1, -0.25, -0.5, 0.75)})


def test_magmax_tie_goes_to_later_task_in_either_order() -> None:
    base = {"w": torch.zeros(1)}
    assert_state_equal(magmax_merge(base, [{"w": t(1)}, {"w": t(-1)}], scaling=1.0), {"w": t(-1)})
    assert_state_equal(magmax_merge(base, [{"w": t(-1)}, {"w": t(1)}], scaling=1.0), {"w": t(1)})


def test_magmax_edge_cases_k1_zero_nan_buffers_dtypes() -> None:
    base = {"w": torch.full((2, 1, 1, 2), 2.0, dtype=torch.float16), "s": torch.tensor(1.0), "ids": torch.arange(2)}
    experts = [{"w": torch.tensor([[[[3.0, 1.0]]], [[[2.0, 6.0]]]], dtype=torch.float16), "s": torch.tensor(0.0),
                "ids": torch.ones(2, dtype=torch.int64)}]
    # K = 1: θ0 + 0.5 τ1 with τ1 = [[1, −1], [0, 4]], s: τ = −1 → 0.5
    merged = magmax_merge(base, experts, scaling=0.5)
    expected_w = torch.tensor([[[[2.5, 1.5]]], [[[2.0, 4.0]]]], dtype=torch.float16)
    assert_state_equal(merged, {"w": expected_w, "s": torch.tensor(0.5), "ids": torch.arange(2)})
    # zero task vectors: θ0
    assert_state_equal(magmax_merge(base, [dict(base), dict(base)], scaling=0.5), dict(base))
    # NaN never replaces the running choice, and a chosen NaN stays (comparisons with NaN are false)
    nan = float("nan")
    merged = magmax_merge({"w": torch.zeros(2)}, [{"w": t(nan, 5)}, {"w": t(7, nan)}], scaling=1.0)["w"]
    assert math.isnan(float(merged[0])) and float(merged[1]) == 5.0


def test_magmax_params() -> None:
    assert MagMaxParams().scaling == 0.5
    with pytest.raises(BenchError, match=r"^magmax\.scaling=nan is not a finite number; default is 0\.5$"):
        build_params("magmax", MagMaxParams, {"scaling": "nan"})

