"""Golden values for PCB-Merging (``methods/pcb.py``) and DOGE-TA (``methods/doge_ta.py``), worked out by hand.

Expected values are derived in the comments from the definitions in the module docstrings (and
/work/shared/docs/methods-wave2.md), never by calling the implementation. Irrational quantities (exp, tanh, the
SVD of a 2×2 matrix) are written as the math expression they come from and compared with a small tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bench.errors import BenchError
from bench.problem import StateDict
from bench.registry import build_params, get_method
from bench.task_vectors import BLOCK_COLUMNS
from methods.doge_ta import (
    DogeTaParams,
    doge_gradient,
    doge_lambdas,
    doge_ta_merge,
    optimise_delta,
    project_out,
    shared_subspace,
)
from methods.pcb import PcbParams, balance_index, clip_indices, pcb_merge


def t(*values: float, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.tensor(values, dtype=dtype)


def close(actual: Tensor, expected: Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol, atol=tol)


def plus(base: StateDict, deltas: dict[str, Tensor]) -> StateDict:
    """An expert θ0 + τ (keys missing from ``deltas`` are copied from the base)."""
    return {key: value + deltas[key] if key in deltas else value.clone() for key, value in base.items()}


# ==========================================================================================================
# PCB-Merging
# ==========================================================================================================

TANH_Q, TANH_H, TANH_1 = math.tanh(0.25), math.tanh(0.5), math.tanh(1.0)
E_H, E_2 = math.exp(0.5), math.exp(2.0)


def pcb_two_task_model() -> tuple[StateDict, list[StateDict]]:
    """2 tasks, d = 4 entries over two keys (+ an integer buffer):

        T1 = [1, −2, 3, 8]     T2 = [2, −4, 1, 0]     (entries 0-1 in "a" [1, 2], entries 2-3 in "b" [2])
    """
    base = {"a": t(0.5, 0.5).view(1, 2), "b": t(1.0, 1.0), "ids": torch.tensor([3, 4])}
    first = {"a": t(1.5, -1.5).view(1, 2), "b": t(4.0, 9.0), "ids": torch.tensor([9, 9])}
    second = {"a": t(2.5, -3.5).view(1, 2), "b": t(2.0, 1.0), "ids": torch.tensor([7, 7])}
    return base, [first, second]


# Hand computation shared by the two tests below (N = 2, d = 4, clip c = 0.01):
#   clip positions int(4·0.01) = 0 and int(4·0.99 − 1) = int(2.96) = 2 of the ascending |T| row:
#     |T1| sorted [1, 2, 3, 8] → lo1 = 1, hi1 = 3;   |T2| sorted [0, 1, 2, 4] → lo2 = 0, hi2 = 2
#   A1 = [1, 2, 3, 3]  T̃1 = [1, −2, 3, 3]   mm(A1) = (A1 − 1)/2 = [0, .5, 1, 1]   T̂1 = [0, −.5, 1, 1]
#   A2 = [2, 2, 1, 0]  T̃2 = [2, −2, 1, 0]   mm(A2) = A2/2       = [1, 1, .5, 0]   T̂2 = [1, −1, .5, 0]
#   intra1 = exp(2·mm1²) = [1, e^.5, e², e²]         intra2 = [e², e², e^.5, 1]
#   T̂1² = [0, .25, 1, 1],  T̂2² = [1, 1, .25, 0],  T̂1T̂2 = [0, .5, .5, 0]
#   inter1 = [0, th(.25) + th(.5), th(1) + th(.5), th(1)]     inter2 = [th(1), th(1) + th(.5), th(.25) + th(.5), 0]
#   With P = e^.5(th(.25) + th(.5)) ≈ 1.1657, Q = e²(th(1) + th(.5)) ≈ 9.0423, R = e²·th(1) ≈ 5.6275:
#   β1 = [0, P, Q, R]        β2 = [R, Q, P, 0]
P_BALANCE = E_H * (TANH_Q + TANH_H)
Q_BALANCE = E_2 * (TANH_1 + TANH_H)
R_BALANCE = E_2 * TANH_1


def test_pcb_golden_two_tasks_full_min_max() -> None:
    base, experts = pcb_two_task_model()
    # r = 1: threshold position int(4·(1 − 1)) = 0 → b_i = min β_i = 0 for both tasks, B_i = Q:
    #   scale1 = β1/Q = [0, P/Q, 1, R/Q]        scale2 = [R/Q, 1, P/Q, 0]
    # θ − θ0 = Σ λ T̃_i scale_i / Σ scale_i  (λ = 1.2):
    #   entry 0: (1.2·1·0 + 1.2·2·R/Q) / (R/Q)        = 2.4
    #   entry 1: (1.2·(−2)·P/Q + 1.2·(−2)·1) / (P/Q + 1) = −2.4
    #   entry 2: (1.2·3·1 + 1.2·1·P/Q) / (1 + P/Q)     = 1.2·(3Q + P)/(Q + P)
    #   entry 3: (1.2·3·R/Q + 1.2·0·0) / (R/Q)         = 3.6
    merged = pcb_merge(base, experts, ratio=1.0, scaling=1.2)
    entry2 = 1.2 * (3 * Q_BALANCE + P_BALANCE) / (Q_BALANCE + P_BALANCE)
    close(merged["a"], t(0.5 + 2.4, 0.5 - 2.4).view(1, 2))
    close(merged["b"], t(1.0 + entry2, 1.0 + 3.6))
    assert torch.equal(merged["ids"], torch.tensor([3, 4]))  # integer buffer from the base


def test_pcb_golden_quantile_clamp_zeroes_entries_at_or_below_the_threshold() -> None:
    base, experts = pcb_two_task_model()
    # r = 0.75: position int(4·0.25) = 1 → b_i = 2nd smallest β_i = P for both tasks (β1 sorted [0, P, R, Q]).
    #   scale1 = mm(max(β1, P)) = [0, 0, 1, (R − P)/(Q − P)]     (β1[1] = P is tied with b: scale 0)
    #   scale2 = [(R − P)/(Q − P), 1, 0, 0]
    # Every entry now has one task only: θ − θ0 = 1.2·T̃ of that task = [2.4, −2.4, 3.6, 3.6]
    merged = pcb_merge(base, experts, ratio=0.75, scaling=1.2)
    close(merged["a"], t(0.5 + 2.4, 0.5 - 2.4).view(1, 2))
    close(merged["b"], t(1.0 + 3.6, 1.0 + 3.6))


def test_pcb_indices_are_the_reference_float_expressions() -> None:
    # int(100·0.01) = 1, int(100·0.99 − 1) = int(98.0) = 98; int(4·0.01) = 0, int(4·0.99 − 1) = int(2.96) = 2
    assert clip_indices(100, 0.01) == (1, 98)
    assert clip_indices(4, 0.01) == (0, 2)
    assert clip_indices(1, 0.01) == (0, 0)  # int(−0.01) truncates to 0
    # int(100·0.95) = 95; int(20·0.95) = 19 = d − 1 (the maximum: nothing kept); r = 1 → 0 (the minimum)
    assert balance_index(100, 0.05) == 95
    assert balance_index(20, 0.05) == 19
    assert balance_index(4, 1.0) == 0
    assert balance_index(10, 1e-17) == 9  # 1 − 1e−17 rounds to 1: position d, taken as d − 1


def single_task_ramp(n: int = 100) -> tuple[StateDict, list[StateDict]]:
    base = {"w": torch.zeros(n)}
    return base, [{"w": torch.arange(1, n + 1, dtype=torch.float32)}]


def test_pcb_clip_uses_sorted_positions_not_interpolated_quantiles() -> None:
    base, experts = single_task_ramp()
    # One task, T = [1, 2, ..., 100], d = 100: lo = sorted[1] = 2, hi = sorted[98] = 99 (not the interpolated
    # 1.99 / 99.01 of torch.quantile), so T̃ = [2, 2, 3, ..., 98, 99, 99].
    # β = exp(mm²)·tanh(mm²) grows with A, its minimum (0) is at A = 2 (entries 0 and 1).
    # r = 1 → b = min β = 0 → scale = 0 at entries 0, 1 and > 0 elsewhere; with one task the combination is
    # λ·T̃·scale/scale = λ·T̃ where scale > 0. λ = 1:
    expected = torch.arange(1, 101, dtype=torch.float32)
    expected[:2] = 0.0
    expected[-1] = 99.0  # clipped from 100
    close(pcb_merge(base, experts, ratio=1.0, scaling=1.0)["w"], expected)


def test_pcb_keeps_the_entries_strictly_above_the_sorted_threshold() -> None:
    base, experts = single_task_ramp()
    # r = 0.05: b = sorted(β)[int(100·0.95)] = sorted(β)[95], which is the β of A = 96 (A ascending is
    # [2, 2, 3, 4, ..., 99, 99]: position i ≥ 1 holds i + 1). Strictly above it: A ∈ {97, 98, 99, 99}, i.e. the
    # entries with T = 97, 98, 99, 100 → d − int(d(1 − r)) − 1 = 4 entries, λ·T̃ = [97, 98, 99, 99].
    expected = torch.zeros(100)
    expected[96:] = t(97, 98, 99, 99)
    close(pcb_merge(base, experts, ratio=0.05, scaling=1.0)["w"], expected)


def test_pcb_degenerate_rows_give_base_not_nan() -> None:
    # d = 20 at r = 0.05: position int(20·0.95) = 19 is the row's maximum, so max(β, b) − b = 0 = B − b: the
    # reference divides 0 by 0 (NaN); here every scale is 0 and θ = θ0.
    base = {"w": torch.full((4, 5), 2.0)}
    expert = {"w": base["w"] + torch.arange(20, dtype=torch.float32).view(4, 5)}
    assert torch.equal(pcb_merge(base, [expert], ratio=0.05, scaling=1.2)["w"], base["w"])
    # All task vectors zero: lo = hi = 0 for every row (reference: NaN) → θ = θ0.
    assert torch.equal(pcb_merge(base, [plus(base, {}), plus(base, {})], ratio=1.0, scaling=1.2)["w"], base["w"])


def test_pcb_zero_task_gets_no_weight() -> None:
    base, experts = pcb_two_task_model()
    experts[1] = plus(base, {})  # T2 = 0: lo2 = hi2 = 0 → mm = 0, T̂2 = 0, T̃2 = 0, β2 = intra·inter = 1·0 = 0
    # Task 1 (N = 2 still): inter1 = th(T̂1²) = [0, th(.25), th(1), th(1)], intra1 = [1, e^.5, e², e²]
    # β1 = [0, e^.5 th(.25), e² th(1), e² th(1)] → with r = 1, scale1 = [0, +, +, +] and scale2 = 0, so
    # θ − θ0 = 1.2·T̃1 where scale1 > 0: [0, −2.4, 3.6, 3.6]
    merged = pcb_merge(base, experts, ratio=1.0, scaling=1.2)
    close(merged["a"], t(0.5, 0.5 - 2.4).view(1, 2))
    close(merged["b"], t(1.0 + 3.6, 1.0 + 3.6))


def flat_pcb(base: StateDict, experts: list[StateDict], ratio: float, scaling: float) -> Tensor:
    """PCB on the flattened model with torch.sort, written from the step list in methods-wave2.md."""
    keys = sorted(key for key in base if base[key].is_floating_point())
    theta0 = torch.cat([base[key].reshape(-1) for key in keys])
    tasks = torch.stack([torch.cat([expert[key].reshape(-1) for key in keys]) - theta0 for expert in experts])
    n, d = tasks.shape
    ordered = torch.sort(tasks.abs(), dim=1).values
    low, high = ordered[:, int(d * 0.01)].unsqueeze(1), ordered[:, int(d * 0.99 - 1)].unsqueeze(1)
    magnitude = torch.clamp(tasks.abs(), low, high)
    normalised = (magnitude - low) / (high - low)
    signed = tasks.sign() * normalised
    balance = torch.exp(n * normalised**2) * torch.stack([torch.tanh(signed[i] * signed).sum(0) for i in range(n)])
    threshold = torch.sort(balance, dim=1).values[:, int(d * (1 - ratio))].unsqueeze(1)
    clamped = torch.clamp(balance, min=threshold)
    scale = (clamped - threshold) / (clamped.max(dim=1, keepdim=True).values - threshold)
    merged = (tasks.sign() * magnitude * scaling * scale).sum(0) / scale.sum(0).clamp(min=1e-12)
    return theta0 + merged


def test_pcb_streamed_statistics_match_the_flattened_definition_across_blocks() -> None:
    # > BLOCK_COLUMNS entries in one key (two blocks) and > 2^16 in all (the sampled k-th value search): the
    # block-wise order statistics must equal the sorted ones on the flattened model.
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(BLOCK_COLUMNS + 1000, generator=generator), "v": torch.randn(3, 5, generator=generator)}
    experts = [
        {key: value + 0.01 * torch.randn(value.shape, generator=generator) for key, value in base.items()}
        for _ in range(2)
    ]
    merged = pcb_merge(base, experts, ratio=0.05, scaling=1.2)
    expected = flat_pcb(base, experts, 0.05, 1.2)
    actual = torch.cat([merged["v"].reshape(-1), merged["w"]])  # sorted key order: v, w
    assert not torch.isnan(expected).any()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert (actual != torch.cat([base["v"].reshape(-1), base["w"]])).sum() > 0  # some entries moved


def test_pcb_is_shape_and_key_order_blind_and_handles_0d_4d() -> None:
    # Everything is elementwise or a model-wide order statistic, so packing the same entries in other shapes
    # and keys gives the same merged entries.
    values = [t(0.0, 1.0, -3.0, 2.0, 0.5, 4.0, -1.0), t(2.0, -1.0, 1.0, 0.0, 3.0, -2.0, 0.25)]
    base_flat = t(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)

    def shaped(flat: Tensor) -> StateDict:
        return {"conv": flat[:4].reshape(1, 2, 2, 1), "scalar": flat[4].reshape(()), "z": flat[5:]}

    merged = pcb_merge(shaped(base_flat), [shaped(base_flat + v) for v in values], ratio=1.0, scaling=1.2)
    flat = pcb_merge({"w": base_flat}, [{"w": base_flat + v} for v in values], ratio=1.0, scaling=1.2)["w"]
    assert merged["conv"].shape == (1, 2, 2, 1) and merged["scalar"].shape == ()
    assert torch.equal(torch.cat([merged["conv"].reshape(-1), merged["scalar"].reshape(1), merged["z"]]), flat)


def test_pcb_half_precision_inputs_keep_their_dtype() -> None:
    base, experts = pcb_two_task_model()
    half = [{key: value.half() if value.is_floating_point() else value for key, value in sd.items()}
            for sd in (base, *experts)]
    merged = pcb_merge(half[0], half[1:], ratio=1.0, scaling=1.2)
    reference = pcb_merge(base, experts, ratio=1.0, scaling=1.2)  # the same values are exact in fp16
    assert merged["a"].dtype == torch.float16
    assert torch.equal(merged["b"], reference["b"].half())


def test_pcb_is_deterministic_and_uses_no_randomness() -> None:
    base, experts = pcb_two_task_model()
    first = pcb_merge(base, experts, ratio=1.0, scaling=1.2, generator=torch.Generator().manual_seed(1))
    second = pcb_merge(base, experts, ratio=1.0, scaling=1.2, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_pcb_parameter_errors_are_one_line() -> None:
    with pytest.raises(BenchError, match=r"^pcb: pcb\.ratio=0\.0 is outside \(0, 1\]; pick a value in that range$"):
        build_params("pcb", PcbParams, {"ratio": "0"})
    with pytest.raises(BenchError, match=r"^pcb\.ratio=1\.5 is outside \[0\.0, 1\.0\]$"):
        build_params("pcb", PcbParams, {"ratio": "1.5"})
    with pytest.raises(BenchError, match=r"^pcb\.clip=0\.3 is outside \[0\.0, 0\.25\]$"):
        build_params("pcb", PcbParams, {"clip": "0.3"})
    assert build_params("pcb", PcbParams, {}) == PcbParams(ratio=0.05, scaling=1.2, clip=0.01)
    spec = get_method("pcb")
    assert (spec.family, spec.memory, spec.data) == ("data-free", "streamed", "none")


# ==========================================================================================================
# DOGE-TA
# ==========================================================================================================


def test_doge_lambdas_are_lamda_over_frobenius_norm_and_zero_for_zero_tasks() -> None:
    taus = torch.stack([t(3.0, 0.0, 4.0, 0.0).view(2, 2), torch.zeros(2, 2), t(0.0, 0.0, 0.0, 0.5).view(2, 2)])
    # ‖τ1‖ = 5 → 0.07/5 = 0.014;  ‖τ2‖ = 0 → 0 (not NaN);  ‖τ3‖ = 0.5 → 0.14
    close(doge_lambdas(taus, 0.07), t(0.014, 0.0, 0.14))


# The 2-task 2×2 layer used below:  τ1 = [[3, 0], [4, 0]] = 5·(0.6, 0.8)ᵀ(1, 0),  τ2 = [[0, 4], [0, 3]] =
# 5·(0.8, 0.6)ᵀ(0, 1). s = 2, c = ⌊2/2⌋ = 1: Ū = [±(0.6, 0.8), ±(0.8, 0.6)], ŪŪᵀ = [[1, .96], [.96, 1]] (signs
# drop out) with eigenvectors (1, 1)/√2 (eigenvalue 1.96) and (1, −1)/√2 (0.04). subspace = 2 → k = 1:
# P = U_k U_kᵀ = [[.5, .5], [.5, .5]].
TAUS_2X2 = torch.stack([t(3.0, 0.0, 4.0, 0.0).view(2, 2), t(0.0, 4.0, 0.0, 3.0).view(2, 2)])


def test_doge_shared_subspace_and_projection_remove_the_shared_component() -> None:
    basis = shared_subspace(TAUS_2X2, subspace=2)
    assert basis.shape == (2, 1)
    close(basis @ basis.T, t(0.5, 0.5, 0.5, 0.5).view(2, 2))
    # g = [[1, 2], [3, 5]]: Pg has each column's mean in both rows = [[2, 3.5], [2, 3.5]];
    # g − Pg = [[−1, −1.5], [1, 1.5]]
    close(project_out(t(1.0, 2.0, 3.0, 5.0).view(2, 2), basis), t(-1.0, -1.5, 1.0, 1.5).view(2, 2))
    # subspace = 6 → k = ⌊2/6⌋ = 0 and 3 tasks on s = 2 → c = 0: nothing to project
    assert shared_subspace(TAUS_2X2, subspace=6).shape == (2, 0)
    assert shared_subspace(torch.cat([TAUS_2X2, TAUS_2X2[:1]]), subspace=1).shape == (2, 0)


def test_doge_gradient_and_one_adam_step_by_hand() -> None:
    lambdas = doge_lambdas(TAUS_2X2, 0.07)  # both norms 5 → λ = 0.014, Λ = 0.028
    # S = 0.014·(τ1 + τ2) = [[.042, .056], [.056, .042]].  e_j[r] = ⟨τ_j[r], τ_j[r] − S[r]⟩ at δ = 0:
    #   e1 = [3·(3 − .042), 4·(4 − .056)] = [8.874, 15.776],   e2 = [4·(4 − .056), 3·(3 − .042)] = [15.776, 8.874]
    # g[r] = −2Λ Σ_j e_j[r] τ_j[r]:
    #   row 0: −.056·(8.874·(3, 0) + 15.776·(0, 4)) = (−1.490832, −3.533824)
    #   row 1: −.056·(15.776·(4, 0) + 8.874·(0, 3)) = (−3.533824, −1.490832)
    a, b = -1.490832, -3.533824
    gradient = doge_gradient(TAUS_2X2, lambdas, torch.zeros(2, 2))
    close(gradient, t(a, b, b, a).view(2, 2), tol=1e-5)
    # Projected: g − Pg = g − (a + b)/2 = ±(a − b)/2 = ±1.021496: [[+, −], [−, +]]
    basis = shared_subspace(TAUS_2X2, subspace=2)
    close(project_out(gradient, basis), t(1.021496, -1.021496, -1.021496, 1.021496).view(2, 2), tol=1e-5)
    # Adam step 1 (β1 = .9, β2 = .999): m = .1g, v = .001g², step = lr/(1 − .9) = 10·lr,
    # denominator = √v/√(1 − .999) + 1e−8 = |g| + 1e−8 → δ = −lr·g/(|g| + 1e−8) ≈ −lr·sign(g)
    delta = optimise_delta(TAUS_2X2, lambdas, basis, lr=1e-4, steps=1)
    close(delta, t(-1e-4, 1e-4, 1e-4, -1e-4).view(2, 2), tol=1e-10)
    # Masks (k = 30, D = 4): rank int(4·0.3) + 1 = 2 → t_i = 2nd largest |τ_i| = 3 for both tasks:
    #   mask1 = [[1, 0], [1, 0]], mask2 = [[0, 1], [0, 1]]
    # θ − θ0 = .014·((τ1 + δ)⊙mask1 + (τ2 + δ)⊙mask2) = .014·[[3 − 1e−4, 4 + 1e−4], [4 + 1e−4, 3 − 1e−4]]
    base = {"layer.weight": torch.ones(2, 2)}
    experts = [{"layer.weight": torch.ones(2, 2) + tau} for tau in TAUS_2X2]
    merged = doge_ta_merge(base, experts, subspace=2, k=30.0, lamda=0.07, lr=1e-4, steps=1)["layer.weight"]
    close(merged, 1 + 0.014 * t(3 - 1e-4, 4 + 1e-4, 4 + 1e-4, 3 - 1e-4).view(2, 2), tol=1e-7)


def test_doge_gradient_matches_autograd_of_the_reference_loss() -> None:
    generator = torch.Generator().manual_seed(3)
    taus = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    lambdas = doge_lambdas(taus, 0.07)
    delta = torch.randn(5, 4, generator=generator, dtype=torch.float64).requires_grad_()
    # The reference's form: Σ_j ((−τ_j ⊙ S) + (−τ_j ⊙ Λδ) + τ_j ⊙ τ_j).sum(dim=1)² summed over rows
    merged = (taus * lambdas.view(-1, 1, 1)).sum(0)
    shift = (delta.unsqueeze(0) * lambdas.view(-1, 1, 1)).sum(0)
    loss = sum(((-tau * merged) + (-tau * shift) + tau * tau).sum(dim=1).pow(2).sum() for tau in taus)
    loss.backward()
    torch.testing.assert_close(doge_gradient(taus, lambdas, delta.detach()), delta.grad, rtol=1e-12, atol=1e-12)


def test_doge_global_mask_with_ties_and_unmerged_tensors_stay_at_base() -> None:
    base = {
        "m1.weight": torch.ones(2, 3),
        "m2.weight": torch.zeros(2, 2),
        "m2.bias": t(5.0, 5.0),
        "conv.weight": torch.zeros(1, 1, 2, 2),
        "ids": torch.tensor([1, 2]),
    }
    first = plus(base, {"m1.weight": t(4, -2, 0, 2, 1, 0).view(2, 3), "m2.weight": t(2, -2, 1, 0).view(2, 2),
                        "m2.bias": t(1, 1), "conv.weight": torch.ones(1, 1, 2, 2)})
    second = plus(base, {"m1.weight": t(0, 3, 0, 0, 0, -4).view(2, 3), "m2.bias": t(-3, 2)})
    # Merged matrices: m1 (6) + m2 (4) → D = 10; rank int(10·0.3) + 1 = int(3.0000000000000004) + 1 = 4.
    #   |τ1| = 4, 2, 0, 2, 1, 0 | 2, 2, 1, 0 → sorted 4, 2, 2, 2, 2, 1, 1, 0, 0, 0 → t1 = 2: keeps 4 and all
    #   four tied 2s (5 entries, 4 nominal).   |τ2| = 0, 3, 0, 0, 0, 4 | 0, 0, 0, 0 → t2 = 0: keeps everything.
    # λ (lamda = 3): ‖τ1 m1‖ = √(16 + 4 + 4 + 1) = 5 → .6;  ‖τ1 m2‖ = √(4 + 4 + 1) = 3 → 1;  ‖τ2 m1‖ = 5 → .6;
    #   ‖τ2 m2‖ = 0 → 0.   steps = 0 → δ = 0.
    # m1: θ0 + .6·[[4, −2, 0], [2, 0, 0]] + .6·[[0, 3, 0], [0, 0, −4]] = 1 + [[2.4, .6, 0], [1.2, 0, −2.4]]
    # m2: 0 + 1·[[2, −2], [0, 0]]   (the 1 is below t1)
    # m2.bias (1-D) and conv.weight (4-D) stay θ0 though the experts changed them; ids from the base.
    merged = doge_ta_merge(base, [first, second], subspace=6, k=30.0, lamda=3.0, steps=0)
    close(merged["m1.weight"], 1 + t(2.4, 0.6, 0.0, 1.2, 0.0, -2.4).view(2, 3))
    close(merged["m2.weight"], t(2.0, -2.0, 0.0, 0.0).view(2, 2))
    assert torch.equal(merged["m2.bias"], base["m2.bias"])
    assert torch.equal(merged["conv.weight"], base["conv.weight"])
    assert torch.equal(merged["ids"], base["ids"])
    # k = 100 keeps every entry (the rank is capped at D): m2 then also gets τ1's 1.
    merged = doge_ta_merge(base, [first, second], subspace=6, k=100.0, lamda=3.0, steps=0)
    close(merged["m2.weight"], t(2.0, -2.0, 1.0, 0.0).view(2, 2))


def test_doge_delta_stays_zero_when_the_residual_vanishes() -> None:
    # One expert, τ = [[3, 4]], lamda = ‖τ‖_F = 5 → λ = 1: S = τ, so every e[r] = ⟨τ[r], τ[r] − S[r]⟩ = 0, the
    # gradient is exactly 0 and Adam never moves δ (m = v = 0, update 0/(0 + eps) = 0), whatever the steps.
    taus = t(3.0, 4.0).view(1, 1, 2)
    lambdas = doge_lambdas(taus, 5.0)
    assert torch.equal(lambdas, t(1.0))
    assert torch.equal(optimise_delta(taus, lambdas, shared_subspace(taus, 6), lr=1e-4, steps=50), torch.zeros(1, 2))
    # With λ = .014 instead (lamda .07) the residual is not 0: δ moves (about lr per step).
    moved = optimise_delta(taus, doge_lambdas(taus, 0.07), shared_subspace(taus, 6), lr=1e-4, steps=50)
    assert moved.abs().min() > 1e-3
    # Merge: D = 2, rank int(.6) + 1 = 1 → t = 4 → mask [[0, 1]]: θ = θ0 + 1·[[0, 4]]
    base = {"w": t(1.0, 1.0).view(1, 2)}
    merged = doge_ta_merge(base, [{"w": t(4.0, 5.0).view(1, 2)}], lamda=5.0, steps=50)
    assert torch.equal(merged["w"], t(1.0, 5.0).view(1, 2))


def test_doge_zero_task_vectors_give_the_base() -> None:
    base = {"w": torch.ones(3, 2), "b": t(1.0, 2.0)}
    merged = doge_ta_merge(base, [plus(base, {}), plus(base, {})], steps=5)
    assert torch.equal(merged["w"], base["w"]) and torch.equal(merged["b"], base["b"])


def flat_doge(base: StateDict, experts: list[StateDict], *, subspace: int, k: float, lamda: float, lr: float,
              steps: int) -> StateDict:
    """DOGE written from the step list in methods-wave2.md: explicit P, autograd of the loss, Adam by formula,
    the mask by kthvalue on the flattened merged matrices."""
    keys = sorted(key for key in base if base[key].ndim == 2)
    taus = {key: torch.stack([expert[key] - base[key] for expert in experts]) for key in keys}
    flat = torch.cat([taus[key].flatten(1) for key in keys], dim=1)
    total = flat.shape[1]
    thresholds = flat.abs().kthvalue(total - int(total * (k / 100)), dim=1).values
    out = dict(base)
    for key in keys:
        tau = taus[key]
        lambdas = torch.stack([lamda / torch.linalg.norm(v) for v in tau])
        s = min(tau.shape[1:])
        width = s // len(experts)
        stacked = torch.zeros(tau.shape[1], s)
        for i, v in enumerate(tau):
            stacked[:, i * width : (i + 1) * width] = torch.linalg.svd(v, full_matrices=False).U[:, :width]
        top = torch.linalg.svd(stacked, full_matrices=False).U[:, : s // subspace]
        projection = top @ top.T
        delta = torch.zeros_like(tau[0], requires_grad=True)
        m, v = torch.zeros_like(tau[0]), torch.zeros_like(tau[0])
        for step in range(1, steps + 1):
            merged = (tau * lambdas.view(-1, 1, 1)).sum(0)
            loss = sum((x * (x - merged - lambdas.sum() * delta)).sum(1).pow(2).sum() for x in tau)
            (grad,) = torch.autograd.grad(loss, delta)
            grad = grad - projection @ grad
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            with torch.no_grad():
                delta -= lr / (1 - 0.9**step) * m / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
        masks = tau.abs() >= thresholds.view(-1, 1, 1)
        out[key] = base[key] + (lambdas.view(-1, 1, 1) * (tau + delta.detach()) * masks).sum(0)
    return out


def test_doge_matches_the_step_list_end_to_end() -> None:
    generator = torch.Generator().manual_seed(5)
    base = {"a.weight": torch.randn(6, 4, generator=generator), "b.weight": torch.randn(3, 8, generator=generator),
            "a.bias": torch.randn(6, generator=generator)}
    experts = [{key: value + 0.1 * torch.randn(value.shape, generator=generator) for key, value in base.items()}
               for _ in range(3)]
    options = {"subspace": 2, "k": 30.0, "lamda": 0.07, "lr": 1e-2, "steps": 20}
    merged = doge_ta_merge(base, experts, **options)
    expected = flat_doge(base, experts, **options)
    for key in base:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=2e-6)
    assert not torch.equal(merged["a.weight"], doge_ta_merge(base, experts, **(options | {"steps": 0}))["a.weight"])


def test_doge_half_precision_single_expert_and_determinism() -> None:
    generator = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(4, 3, generator=generator).half(), "b": torch.randn(4, generator=generator).half()}
    expert = {key: (value.float() + 0.1 * torch.randn(value.shape, generator=generator)).half()
              for key, value in base.items()}
    first = doge_ta_merge(base, [expert], steps=10, generator=torch.Generator().manual_seed(0))
    second = doge_ta_merge(base, [expert], steps=10, generator=torch.Generator().manual_seed(1))
    assert first["w"].dtype == torch.float16 and torch.isfinite(first["w"].float()).all()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert torch.equal(first["b"], base["b"])
    widened = doge_ta_merge({k: v.float() for k, v in base.items()}, [{k: v.float() for k, v in expert.items()}],
                            steps=10)
    assert torch.equal(first["w"], widened["w"].half())


def test_doge_parameter_errors_are_one_line() -> None:
    cases = {
        "subspace": ("0", r"^doge_ta\.subspace=0 is outside \[1, None\]$"),
        "k": ("101", r"^doge_ta\.k=101\.0 is outside \[0\.0, 100\.0\]$"),
        "lamda": ("-0.1", r"^doge_ta\.lamda=-0\.1 is outside \[0\.0, None\]$"),
        "steps": ("-1", r"^doge_ta\.steps=-1 is outside \[0, None\]$"),
    }
    for name, (raw, message) in cases.items():
        with pytest.raises(BenchError, match=message):
            build_params("doge_ta", DogeTaParams, {name: raw})
    assert build_params("doge_ta", DogeTaParams, {}) == DogeTaParams(subspace=6, k=30.0, lamda=0.07, lr=1e-4,
                                                                     steps=400)
    with pytest.raises(ValueError, match=r"^doge_ta\.subspace=0 is outside \[1, None\]"):
        doge_ta_merge({"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}], subspace=0)
    spec = get_method("doge_ta")
    assert (spec.family, spec.memory, spec.data) == ("data-free", "streamed", "none")
