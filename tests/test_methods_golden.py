"""Golden values for the data-free merging methods, worked out by hand on tiny state dicts.

Every expected value below is computed in the comments from the method's definition (methods.md and the
module docstrings), not by calling the implementation. Unless a test says otherwise θ0 = 0, so θ_i = τ_i and
the merged weights are the scaled merged task vector. Values are chosen to be exact in binary floating point
where the arithmetic allows, so most comparisons are exact.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from bench import registry
from bench.problem import MergeContext, StateDict
from bench.registry import build_params, get_method
from bench.selection import keep_count, kth_largest, kth_largest_rows
from methods.consensus import ConsensusParams, consensus_mask, consensus_merge
from methods.dare import DareTaParams, DareTiesParams, dare_ta_merge, dare_ties_merge
from methods.iso import IsoCtsParams, iso_c_merge, iso_cts_merge, subspace_sizes
from methods.task_arithmetic import task_arithmetic_merge
from methods.ties import TiesParams, ties_merge
from methods.tsv import polar_factor, tsv_merge
from methods.weight_averaging import weight_average


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def zeros_like_all(experts: list[StateDict]) -> StateDict:
    return {key: torch.zeros_like(value) for key, value in experts[0].items()}


def assert_state_equal(actual: StateDict, expected: StateDict, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0.0, msg=f"tensor {key}")


def ties(base: StateDict, experts: list[StateDict], **overrides: object) -> StateDict:
    options = {"k": 100.0, "trim_scope": "global", "merge": "sum", "scaling": 1.0} | overrides
    return ties_merge(base, experts, **options)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Weight averaging and task arithmetic


def test_weight_averaging_is_the_mean_and_copies_integer_buffers() -> None:
    base = {"w": t(9, 9, 9), "ids": torch.tensor([0, 1, 2])}
    experts = [
        {"w": t(1, 2, 3), "ids": torch.tensor([5, 5, 5])},
        {"w": t(3, 2, 1), "ids": torch.tensor([7, 7, 7])},
    ]
    merged = weight_average(base, experts)
    # (1+3)/2, (2+2)/2, (3+1)/2; the integer buffer comes from the base.
    assert_state_equal(merged, {"w": t(2, 2, 2), "ids": torch.tensor([0, 1, 2])})


def test_task_arithmetic_adds_scaled_sum_of_task_vectors() -> None:
    base = {"w": t(1, 1)}
    experts = [{"w": t(2, 0)}, {"w": t(1.5, 3)}]
    # τ1 = [1, -1], τ2 = [0.5, 2], Σ = [1.5, 1]; λ = 0.5 → θ = [1 + 0.75, 1 + 0.5]
    assert_state_equal(task_arithmetic_merge(base, experts, scaling=0.5), {"w": t(1.75, 1.5)})


def test_task_arithmetic_keeps_bf16_dtype_and_computes_exact_task_vectors() -> None:
    base = {"w": torch.tensor([1.0, 256.0], dtype=torch.bfloat16)}
    experts = [{"w": torch.tensor([1.0078125, 258.0], dtype=torch.bfloat16)}]
    # τ = [2^-7, 2] exactly; θ = θ0 + 1·τ = [1.0078125, 258] (representable in bf16)
    merged = task_arithmetic_merge(base, experts, scaling=1.0)
    assert merged["w"].dtype == torch.bfloat16
    assert merged["w"].tolist() == [1.0078125, 258.0]


# ----------------------------------------------------------------------------------------------------------
# TIES


def test_ties_global_and_per_tensor_trim_differ() -> None:
    # One expert, so elect/merge return the trimmed vector itself; θ0 = 0, λ = 1, k = 50%.
    experts = [{"a": t(4, 3, 2, 1), "b": t(0.5, 0.25, 0.125, 0.0625)}]
    base = zeros_like_all(experts)
    # global: N = 8 → keep 4: the 4th largest |τ| is 1 → all of a survives, all of b is trimmed.
    assert_state_equal(ties(base, experts, k=50.0), {"a": t(4, 3, 2, 1), "b": t(0, 0, 0, 0)})
    # per tensor: 4 entries each → keep 2 per tensor: a keeps 4, 3; b keeps 0.5, 0.25.
    assert_state_equal(
        ties(base, experts, k=50.0, trim_scope="per_tensor"),
        {"a": t(4, 3, 0, 0), "b": t(0.5, 0.25, 0, 0)},
    )


def test_ties_mean_versus_sum() -> None:
    experts = [{"w": t(2, -1, 3)}, {"w": t(4, -3, -1)}, {"w": t(-1, -2, 0)}]
    base = zeros_like_all(experts)
    # column 0: 2 + 4 - 1 = 5 → γ = +, agreeing 2, 4 → sum 6, mean 3
    # column 1: -1 - 3 - 2 = -6 → γ = −, all agree → sum -6, mean -2
    # column 2: 3 - 1 + 0 = 2 → γ = +, agreeing 3 (the 0 does not count) → sum 3, mean 3
    assert_state_equal(ties(base, experts, merge="sum"), {"w": t(6, -6, 3)})
    assert_state_equal(ties(base, experts, merge="mean"), {"w": t(3, -2, 3)})
    # λ scales the merged vector: θ0 = 1, λ = 0.5, sum → 1 + 0.5·[6, -6, 3]
    shifted = [{"w": e["w"] + 1} for e in experts]
    assert_state_equal(ties({"w": t(1, 1, 1)}, shifted, scaling=0.5), {"w": t(4, -2, 2.5)})


def test_ties_zero_sum_takes_the_model_wide_majority_sign() -> None:
    # column 0 cancels (2 - 2 = 0); columns 1, 2 elect −; column 3 is all zero (elects nothing).
    experts = [{"w": t(2, -1, -1, 0)}, {"w": t(-2, -1, -1, 0)}]
    base = zeros_like_all(experts)
    # majority: 0 entries +, 2 entries − → −; column 0 keeps the negative entry -2.
    # sum: [-2, -2, -2, 0]; mean: [-2 / 1, -2 / 2, -2 / 2, 0]
    assert_state_equal(ties(base, experts, merge="sum"), {"w": t(-2, -2, -2, 0)})
    assert_state_equal(ties(base, experts, merge="mean"), {"w": t(-2, -1, -1, 0)})
    # Same cancelling column, positive majority → column 0 keeps +2.
    positive = [{"w": t(2, 1, 1, 0)}, {"w": t(-2, 1, 1, 0)}]
    assert_state_equal(ties(base, positive, merge="sum"), {"w": t(2, 2, 2, 0)})


def test_ties_zero_sum_with_tied_majority_stays_zero_and_other_tensors_vote() -> None:
    # one + column, one − column, one cancelling column: the model-wide count is tied → it stays 0
    experts = [{"w": t(2, 1, -1)}, {"w": t(-2, 1, -1)}]
    base = zeros_like_all(experts)
    assert_state_equal(ties(base, experts), {"w": t(0, 2, -2)})
    # a second tensor electing + twice breaks the tie for the whole model → the cancelling entry becomes +2
    experts = [{"w": t(2, 1, -1), "v": t(1, 1)}, {"w": t(-2, 1, -1), "v": t(1, 1)}]
    base = zeros_like_all(experts)
    assert_state_equal(ties(base, experts), {"w": t(2, 2, -2), "v": t(2, 2)})


def test_ties_trim_keeps_ties_at_the_threshold_and_floors_the_count() -> None:
    experts = [{"w": t(3, -2, 2, 1)}]
    base = zeros_like_all(experts)
    # k = 50%: n = 2, the 2nd largest |τ| is 2 → both entries of magnitude 2 are kept (3 survive)
    assert_state_equal(ties(base, experts, k=50.0), {"w": t(3, -2, 2, 0)})
    # k = 30%: n = ⌊1.2⌋ = 1 → threshold 3
    assert_state_equal(ties(base, experts, k=30.0), {"w": t(3, 0, 0, 0)})
    # k = 0: nothing kept → θ0
    assert_state_equal(ties(base, experts, k=0.0), {"w": t(0, 0, 0, 0)})


def test_ties_thresholds_are_per_expert() -> None:
    # k = 50% of 4 = 2 per expert: expert 1 keeps 8, 4 (threshold 4); expert 2 keeps -0.5, 0.25 (threshold
    # 0.25)
    experts = [{"w": t(8, 4, 2, 1)}, {"w": t(-0.5, 0.25, 0.125, 0.0625)}]
    base = zeros_like_all(experts)
    # column 0: 8 - 0.5 → +, agreeing 8; column 1: 4 + 0.25 → +, sum 4.25; columns 2, 3: all trimmed → 0
    assert_state_equal(ties(base, experts, k=50.0), {"w": t(8, 4.25, 0, 0)})


def test_ties_does_not_modify_inputs_and_keeps_dtype() -> None:
    base = {"w": torch.tensor([0.5, 1.0], dtype=torch.float64)}
    experts = [{"w": torch.tensor([1.5, 0.0], dtype=torch.float64)}]
    before = [base["w"].clone(), experts[0]["w"].clone()]
    merged = ties(base, experts, k=50.0)
    # τ = [1, -1], n = 1 → both have |τ| = 1 = threshold → both kept; one expert → θ = θ0 + τ
    assert merged["w"].dtype == torch.float64
    assert merged["w"].tolist() == [1.5, 0.0]
    assert torch.equal(base["w"], before[0]) and torch.equal(experts[0]["w"], before[1])


def test_ties_params_validation() -> None:
    with pytest.raises(ValueError, match="global|per_tensor"):
        TiesParams(trim_scope="layer")
    with pytest.raises(ValueError, match="outside"):
        TiesParams(k=120.0)
    defaults = TiesParams()
    assert (defaults.k, defaults.trim_scope, defaults.merge, defaults.scaling) == (20.0, "global", "sum", 0.3)


# ----------------------------------------------------------------------------------------------------------
# DARE


def dare_keep_masks_p_half(seed: int, experts: int, sizes: list[int]) -> list[list[np.ndarray]]:
    """The documented rule for p = 0.5 (1 bit per entry): expert i's generator is seeded with
    torch.randint(0, 2**32, (K, 2), generator=Generator().manual_seed(seed))[i, 0]; each tensor draws
    ⌈n/64⌉ int64 words with random_(-2**63, None), and entry j is kept iff bit j (little-endian) is 1."""
    seeds = torch.randint(0, 2**32, (experts, 2), generator=torch.Generator().manual_seed(seed))
    masks = []
    for main_seed in seeds[:, 0].tolist():
        generator = torch.Generator().manual_seed(int(main_seed))
        per_tensor = []
        for size in sizes:
            words = torch.empty(-(-size // 64), dtype=torch.int64).random_(
                -(2**63), None, generator=generator
            )
            bits = np.unpackbits(words.view(torch.uint8).numpy(), bitorder="little")[:size]
            per_tensor.append(bits == 1)
        masks.append(per_tensor)
    return masks


@pytest.mark.parametrize("rescale", ["inverse_keep", "l1", "none"])
def test_dare_ta_values_from_the_documented_masks(rescale: str) -> None:
    sizes = [70, 5]  # the first tensor spans two random words
    taus = [[torch.arange(1, n + 1, dtype=torch.float32) * (i + 1) for n in sizes] for i in range(2)]
    experts = [{"a": tau[0], "b": tau[1]} for tau in taus]
    base = zeros_like_all(experts)
    masks = dare_keep_masks_p_half(seed=7, experts=2, sizes=sizes)
    expected = {}
    for position, key in enumerate(["a", "b"]):
        total = torch.zeros(sizes[position])
        for i in range(2):
            tau = taus[i][position]
            kept = tau * torch.from_numpy(masks[i][position])
            if rescale == "inverse_keep":
                kept = kept / (1 - 0.5)  # survivors × 2
            elif rescale == "l1" and kept.abs().sum() > 0:
                kept = kept * (tau.abs().sum() / kept.abs().sum())  # ‖τ̃‖₁ = ‖τ‖₁ per tensor and expert
            total += kept
        expected[key] = 0.5 * total  # λ = 0.5, θ0 = 0
    merged = dare_ta_merge(base, experts, p=0.5, rescale=rescale, scaling=0.5, seed=7)
    assert_state_equal(merged, expected, atol=1e-5)


def test_dare_is_deterministic_per_seed_and_leaves_the_global_rng_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    experts = [{"w": torch.randn(1000, generator=generator)} for _ in range(3)]
    base = zeros_like_all(experts)
    global_state = torch.get_rng_state()
    first = dare_ta_merge(base, experts, p=0.5, rescale="inverse_keep", scaling=1.0, seed=11)
    again = dare_ta_merge(base, experts, p=0.5, rescale="inverse_keep", scaling=1.0, seed=11)
    other = dare_ta_merge(base, experts, p=0.5, rescale="inverse_keep", scaling=1.0, seed=12)
    assert torch.equal(first["w"], again["w"])
    assert not torch.equal(first["w"], other["w"])
    assert torch.equal(torch.get_rng_state(), global_state)


@pytest.mark.parametrize("rescale", ["inverse_keep", "l1", "none"])
def test_dare_with_p_zero_is_task_arithmetic_and_ties(rescale: str) -> None:
    generator = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 5, generator=generator), "b": torch.randn(5, generator=generator)}
    experts = [{k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in range(3)]
    # p = 0 keeps every entry and every rescale factor is 1.
    assert_state_equal(
        dare_ta_merge(base, experts, p=0.0, rescale=rescale, scaling=0.3, seed=0),
        task_arithmetic_merge(base, experts, scaling=0.3),
        atol=1e-6,
    )
    assert_state_equal(
        dare_ties_merge(
            base,
            experts,
            p=0.0,
            rescale=rescale,
            k=20.0,
            trim_scope="global",
            merge="sum",
            scaling=0.5,
            seed=0,
        ),
        ties_merge(base, experts, k=20.0, trim_scope="global", merge="sum", scaling=0.5),
        atol=1e-6,
    )


@pytest.mark.parametrize("p", [0.3, 0.75, 0.9])
def test_dare_keeps_one_minus_p_of_the_entries(p: float) -> None:
    n = 200_000
    experts = [{"w": torch.ones(n)}]
    merged = dare_ta_merge({"w": torch.zeros(n)}, experts, p=p, rescale="none", scaling=1.0, seed=3)
    kept = merged["w"].mean().item()  # every kept entry is 1, every dropped one 0
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_dare_ties_replays_its_masks_in_both_passes() -> None:
    # One expert, k = 100: TIES returns the sparsified vector itself, so the output reveals the mask used in
    # the merge pass; it must be the documented p = 0.5 mask (the threshold pass drew it first).
    tau = torch.arange(1, 71, dtype=torch.float32)
    merged = dare_ties_merge(
        {"w": torch.zeros(70)},
        [{"w": tau}],
        p=0.5,
        rescale="none",
        k=100.0,
        trim_scope="global",
        merge="sum",
        scaling=1.0,
        seed=5,
    )
    mask = dare_keep_masks_p_half(seed=5, experts=1, sizes=[70])[0][0]
    assert torch.equal(merged["w"], tau * torch.from_numpy(mask))


def test_dare_params_validation() -> None:
    with pytest.raises(ValueError, match="p < 1"):
        DareTaParams(p=1.0)
    with pytest.raises(ValueError, match="inverse_keep"):
        DareTaParams(rescale="max")
    with pytest.raises(ValueError, match="per_tensor"):
        DareTiesParams(trim_scope="rows")
    assert (DareTaParams().p, DareTaParams().scaling) == (0.5, 0.3)


# ----------------------------------------------------------------------------------------------------------
# Consensus (TALL masks)


def test_consensus_masks_and_merge() -> None:
    experts = [{"w": t(1, 0, 2)}, {"w": t(1, 0.5, -2)}, {"w": t(1, 0, 0.25)}]
    base = zeros_like_all(experts)
    # τ_MTL = [3, 0.5, 0.25]; λ_t = 0.5; mask_i = |τ_i| ≥ 0.5·|τ_MTL − τ_i|
    # column 0: 1 ≥ 0.5·2 = 1 for all three (≥, so the equality counts) → 3 votes
    # column 1: τ1 = 0 ≥ 0.5·0.5 = 0.25? no; τ2 = 0.5 ≥ 0.5·0 = 0 yes; τ3 = 0 ≥ 0.25? no → 1 vote
    # column 2: 2 ≥ 0.5·1.75 yes; 2 ≥ 0.5·2.25 yes; 0.25 ≥ 0.5·0 yes → 3 votes
    tau = torch.stack([e["w"] for e in experts])
    assert consensus_mask(tau, k=2, tall_lambda=0.5).tolist() == [True, False, True]
    assert consensus_mask(tau, k=1, tall_lambda=0.5).tolist() == [True, True, True]
    # k = 2 keeps columns 0 and 2 of τ_MTL: λ = 1 → [3, 0, 0.25]
    assert_state_equal(
        consensus_merge(base, experts, k=2, tall_lambda=0.5, scaling=1.0), {"w": t(3, 0, 0.25)}
    )
    # k = 0 is task arithmetic; k > K keeps nothing (the pretrained model)
    assert_state_equal(
        consensus_merge(base, experts, k=0, tall_lambda=0.5, scaling=1.0), {"w": t(3, 0.5, 0.25)}
    )
    assert_state_equal(consensus_merge(base, experts, k=4, tall_lambda=0.5, scaling=1.0), {"w": t(0, 0, 0)})


def test_consensus_params_defaults_and_validation() -> None:
    defaults = ConsensusParams()
    assert (defaults.k, defaults.tall_lambda, defaults.scaling) == (2, 0.6, 0.3)
    with pytest.raises(ValueError, match="outside"):
        ConsensusParams(k=-1)


# ----------------------------------------------------------------------------------------------------------
# TSV-M


def diag(*values: float) -> Tensor:
    return torch.diag(t(*values))


def test_tsv_keeps_each_tasks_top_components_on_diagonal_matrices() -> None:
    # K = 2, 3×3 → r = 3, each task keeps ⌊3/2⌋ = 1 component.
    # τ1 = diag(5, 2, 1): top component 5·e1e1ᵀ; τ2 = diag(1, 1, 4): top component 4·e3e3ᵀ.
    # U = [e1, e3, 0] and V likewise are already orthonormal, so Δ = 5·e1e1ᵀ + 4·e3e3ᵀ = diag(5, 0, 4).
    # The bias is not a matrix: mean task vector ([2, 4] + [0, 2]) / 2 = [1, 3].
    experts = [{"w": diag(5, 2, 1), "b": t(2, 4)}, {"w": diag(1, 1, 4), "b": t(0, 2)}]
    base = zeros_like_all(experts)
    assert_state_equal(tsv_merge(base, experts, alpha=1.0), {"w": diag(5, 0, 4), "b": t(1, 3)}, atol=1e-6)
    # α scales everything, on top of θ0
    base = {"w": torch.ones(3, 3), "b": t(1, 1)}
    shifted = [{k: v + base[k] for k, v in e.items()} for e in experts]
    expected = {"w": torch.ones(3, 3) + 2 * diag(5, 0, 4), "b": t(3, 7)}
    assert_state_equal(tsv_merge(base, shifted, alpha=2.0), expected, atol=1e-5)


def test_tsv_with_one_expert_returns_its_task_vector() -> None:
    # K = 1 keeps all r components and U, V are orthonormal already → Δ = U S Vᵀ = τ.
    generator = torch.Generator().manual_seed(0)
    tau = torch.randn(4, 6, generator=generator)
    merged = tsv_merge({"w": torch.zeros(4, 6)}, [{"w": tau}], alpha=1.0)
    torch.testing.assert_close(merged["w"], tau, atol=1e-5, rtol=0)


def test_polar_factor_orthonormalises() -> None:
    # [[0, 2], [1, 0]] = U S Vᵀ with U = I, S = diag(2, 1), V = [e2, e1] → U Vᵀ = [[0, 1], [1, 0]]
    torch.testing.assert_close(
        polar_factor(torch.tensor([[0.0, 2.0], [1.0, 0.0]])), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    )


# ----------------------------------------------------------------------------------------------------------
# Iso-C / Iso-CTS


def test_iso_c_flattens_the_spectrum() -> None:
    # τ1 = diag(3, 0), τ2 = diag(1, 2) → M = diag(4, 2), mean singular value 3 → Δ = 3·I
    experts = [{"w": diag(3, 0), "b": t(2)}, {"w": diag(1, 2), "b": t(4)}]
    base = zeros_like_all(experts)
    assert_state_equal(iso_c_merge(base, experts, alpha=1.0), {"w": 3 * torch.eye(2), "b": t(3)}, atol=1e-6)
    # off-diagonal: M = [[0, 2], [1, 0]] has singular values 2, 1 (mean 1.5) and U Vᵀ = [[0, 1], [1, 0]]
    rotated = [{"w": torch.tensor([[0.0, 2.0], [0.0, 0.0]])}, {"w": torch.tensor([[0.0, 0.0], [1.0, 0.0]])}]
    merged = iso_c_merge({"w": torch.zeros(2, 2)}, rotated, alpha=1.0)
    torch.testing.assert_close(merged["w"], torch.tensor([[0.0, 1.5], [1.5, 0.0]]), atol=1e-6, rtol=0)


def test_iso_cts_hand_case_differs_from_iso_c() -> None:
    # 4×4, K = 2, f = 0.5: c = 4 − round((4 − 2)/2)·2 = 2 common directions, s = 1 per task.
    # τ1 = diag(6, 0, 3, 1), τ2 = diag(0, 5, 1, 2): M = diag(6, 5, 4, 3) → common space e1 (6), e2 (5).
    # Projected out: τ1 → diag(0, 0, 3, 1), top e3 (3); τ2 → diag(0, 0, 1, 2), top e4 (2).
    # Directions [e3, e4, e1, e2] are orthonormal; σ = [3, 2, 6, 5], mean 4 → Δ = 4·I.
    # Iso-C on the same M: mean(6, 5, 4, 3) = 4.5 → 4.5·I.
    experts = [{"w": diag(6, 0, 3, 1)}, {"w": diag(0, 5, 1, 2)}]
    base = zeros_like_all(experts)
    cts = iso_cts_merge(base, experts, alpha=1.0, common_space_fraction=0.5)
    torch.testing.assert_close(cts["w"], 4 * torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        iso_c_merge(base, experts, alpha=1.0)["w"], 4.5 * torch.eye(4), atol=1e-5, rtol=0
    )


def test_iso_cts_output_is_isotropic_with_full_rank() -> None:
    generator = torch.Generator().manual_seed(3)
    experts = [
        {"w": torch.randn(7, 5, generator=generator), "b": torch.randn(7, generator=generator)}
        for _ in range(3)
    ]
    base = zeros_like_all(experts)
    merged = iso_cts_merge(base, experts, alpha=1.0, common_space_fraction=0.8)
    singular_values = torch.linalg.svdvals(merged["w"].double())
    assert singular_values.shape == (5,)  # rank r = min(7, 5)
    torch.testing.assert_close(singular_values, singular_values.mean().expand(5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged["b"], sum(e["b"] for e in experts) / 3, atol=1e-6, rtol=0)


def test_iso_cts_subspace_sizes() -> None:
    assert subspace_sizes(768, 8, 0.8) == (616, 19)  # ⌊614.4⌋ = 614; round(154/8) = 19; 768 − 152
    assert subspace_sizes(4, 2, 0.5) == (2, 1)
    assert subspace_sizes(2, 2, 0.8) == (2, 0)  # round(0.5) = 0 (Python rounds halves to even)
    assert subspace_sizes(5, 8, 0.0) == (5, 0)  # round(5/8) = 1 would overflow: capped at ⌊5/8⌋ = 0
    with pytest.raises(ValueError, match="outside"):
        IsoCtsParams(common_space_fraction=1.5)


# ----------------------------------------------------------------------------------------------------------
# Exact k-th largest


def reference_kth_largest(tensors: list[Tensor], k: int) -> float:
    values = torch.cat([tensor.reshape(-1) for tensor in tensors])
    return torch.kthvalue(values.double(), values.numel() - k + 1).values.item()


def random_tensors(kind: str, total: int, generator: torch.Generator) -> list[Tensor]:
    if kind == "normal":
        values = torch.randn(total, generator=generator)
    elif kind == "ties":
        values = torch.randint(-3, 4, (total,), generator=generator).float()
    elif kind == "sparse":
        values = torch.randn(total, generator=generator) * (torch.rand(total, generator=generator) < 0.05)
    elif kind == "negative":
        values = -torch.rand(total, generator=generator) - 1
    else:  # "extremes": infinities and subnormals among ordinary values
        values = torch.randn(total, generator=generator)
        values[:: max(1, total // 5)] = float("inf")
        values[1 :: max(2, total // 3)] = float("-inf")
        values[2 :: max(3, total // 4)] = 1e-40
    cuts = sorted({0, total // 3, total // 3 + total // 5, total})  # split into up to three unequal tensors
    return [values[start:stop] for start, stop in itertools.pairwise(cuts)]


@pytest.mark.parametrize("kind", ["normal", "ties", "sparse", "negative", "extremes"])
@pytest.mark.parametrize("total", [1, 2, 3, 1000, 300_000])
def test_kth_largest_matches_kthvalue(kind: str, total: int) -> None:
    generator = torch.Generator().manual_seed(total)
    tensors = random_tensors(kind, total, generator)
    for k in sorted({1, total, max(1, total // 5), max(1, total // 2), max(1, total - total // 3)}):
        expected = reference_kth_largest(tensors, k)
        assert kth_largest(tensors, k) == expected
        # tiny sample, band and direct limit: forces the band misses and the bisection fallback
        assert kth_largest(tensors, k, sample_size=4, collect_limit=16, direct_limit=2) == expected


def test_kth_largest_on_a_large_model_sized_input_and_other_dtypes() -> None:
    generator = torch.Generator().manual_seed(9)
    big = [torch.randn(2_000_000, generator=generator), torch.randn(1500, 700, generator=generator)]
    for k in (1, 700_000, 3_050_000):
        assert kth_largest(big, k) == reference_kth_largest(big, k)
    doubles = [torch.randn(200_000, generator=generator, dtype=torch.float64)]
    assert kth_largest(doubles, 12_345) == reference_kth_largest(doubles, 12_345)
    halves = [torch.randn(100_000, generator=generator).to(torch.bfloat16)]
    assert kth_largest(halves, 777) == reference_kth_largest(halves, 777)


def test_kth_largest_survives_a_misleading_sample_and_a_crowded_band() -> None:
    from bench.selection import TensorChunks

    class MisleadingSample(TensorChunks):
        """The sample only places the search band, so a biased one must cost passes, never exactness."""

        def sample(self, index: int, positions: Tensor) -> Tensor:
            return super().sample(index, positions) * 1.5 + 0.3

    generator = torch.Generator().manual_seed(4)
    tensors = list(torch.randn(1_000_000, generator=generator).split(100_000))
    for k in (1, 1000, 200_000, 999_999):
        expected = reference_kth_largest(tensors, k)
        assert kth_largest_rows(MisleadingSample(tensors), [k]) == [expected]
        # a band far larger than what may be collected: narrowed again from the sample points inside it
        assert kth_largest(tensors, k, collect_limit=500) == expected


def test_kth_largest_rows_and_bad_k() -> None:
    from bench.selection import TensorChunks

    values = t(5, 1, 4, 1, 3)
    assert kth_largest_rows(TensorChunks([values]), [2]) == [4.0]
    with pytest.raises(ValueError, match="outside"):
        kth_largest(values, 6)


def test_keep_count_reads_percentages_as_written() -> None:
    assert keep_count(120_000, 3.3) == 3960  # not 3959 from the binary float just below 3.3
    assert keep_count(87_849_216, 20.0) == 17_569_843  # ⌊17,569,843.2⌋
    assert keep_count(4, 30.0) == 1 and keep_count(4, 0.0) == 0 and keep_count(4, 100.0) == 4


# ----------------------------------------------------------------------------------------------------------
# Registered adapters


DATA_FREE = sorted(name for name, spec in registry.methods().items()
                   if spec.family == "data-free" and spec.output == "merged")  # per-task ones: test_methods_per_task


@pytest.mark.parametrize("name", DATA_FREE)
def test_registered_methods_run_with_defaults_and_leave_inputs_alone(name: str) -> None:
    """Every data-free method (the wave-2 ones included): its defaults run on the toy suite, keep every key's
    shape and dtype, give finite weights that moved from θ0, leave the inputs untouched, and the same seed gives
    the same bits again."""
    from toy_plugin import ToyParams, ToyProblem

    problem = ToyProblem(ToyParams())
    before = {key: value.clone() for key, value in problem.pretrained().items()}
    experts_before = [{key: value.clone() for key, value in e.items()} for e in problem.experts()]
    spec = get_method(name)

    def run(seed: int) -> StateDict:
        context = MergeContext(problem=problem, seed=seed, device=torch.device("cpu"),
                               generator=torch.Generator().manual_seed(seed))
        return spec.fn(context, build_params(name, spec.params, {}))

    merged = run(0)
    assert merged.keys() == before.keys()
    for key, value in merged.items():
        assert value.dtype == before[key].dtype and value.shape == before[key].shape
        assert torch.isfinite(value).all()
    assert not torch.equal(merged["w"], before["w"])
    assert_state_equal(run(0), merged)
    assert_state_equal(problem.pretrained(), before)
    for expert, saved in zip(problem.experts(), experts_before, strict=True):
        assert_state_equal(expert, saved)
