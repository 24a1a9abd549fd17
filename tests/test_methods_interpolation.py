"""Golden values for the interpolation methods (model_stock, slerp, nuslerp), worked out by hand on tiny tensors.

Every expected value is computed in the comments from the definitions in the method modules' docstrings, not by
calling the implementation. Where the result is irrational (square roots, sines) it is written as the hand
formula and compared within a few fp32 ulps; everything exact in binary is compared exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bench.errors import BenchError
from bench.problem import MergeContext, StateDict
from bench.registry import build_params, get_method
from methods.model_stock import ModelStockParams, model_stock_merge
from methods.nuslerp import NuSlerpParams, nuslerp_fractions, nuslerp_merge, parse_weights
from methods.slerp import SlerpParams, slerp_merge

SQRT_HALF = math.sqrt(0.5)  # sin 45° = cos 45°


def t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(actual: Tensor, expected: Tensor | list, atol: float = 2e-7) -> None:
    """Equal within ``atol`` plus 3e-7 relative (two or three fp32 ulps of the value)."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=3e-7)


def exact(actual: Tensor, expected: Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"{actual} != {expected}"


def zeros(experts: list[StateDict]) -> StateDict:
    return {key: torch.zeros_like(value) for key, value in experts[0].items()}


# ----------------------------------------------------------------------------------------------------------
# SLERP (raw weights; the base is not used)


def test_slerp_orthogonal_vectors_at_half_and_at_a_third() -> None:
    experts = [{"w": t(3, 0)}, {"w": t(0, 4)}]
    base = {"w": t(100, -100)}  # slerp ignores the base: raw weights only
    # Ω = 90°, sin Ω = 1. t = 1/2: s0 = s1 = sin 45° = √½ → [3√½, 4√½] (not a unit vector: raw norms are kept)
    close(slerp_merge(base, experts, t=0.5)["w"], [3 * SQRT_HALF, 4 * SQRT_HALF])
    # t = 1/3: s0 = sin(90° − 30°) = √3/2, s1 = sin 30° = 1/2 → [3√3/2, 2]
    close(slerp_merge(base, experts, t=1 / 3)["w"], [3 * math.sqrt(3) / 2, 2.0])
    # the end points: t = 0 is θ_1 (s0 = sin Ω/sin Ω = 1, s1 = sin 0 = 0), t = 1 is θ_2 (s0 = 0, s1 = 1)
    exact(slerp_merge(base, experts, t=0.0)["w"], t(3, 0))
    exact(slerp_merge(base, experts, t=1.0)["w"], t(0, 4))


def test_slerp_falls_back_to_lerp_for_nearly_parallel_and_antiparallel_tensors() -> None:
    base = {"w": t(0, 0)}
    # cos Ω = 1/√1.0001 = 0.99995 > 0.9995 → LERP: ½[1, 0] + ½[1, 0.01] = [1, 0.005] (exact: halving is exact)
    parallel = [{"w": t(1, 0)}, {"w": t(1, 0.01)}]
    exact(slerp_merge(base, parallel)["w"], 0.5 * t(1, 0) + 0.5 * t(1, 0.01))
    # with the threshold raised above 0.99995 the same pair is slerped: at t = ½, s0 = s1 = sin(Ω/2)/sin Ω =
    # 1/(2 cos(Ω/2)) = s with cos(Ω/2) = √((1 + cos Ω)/2) → s·(v0 + v1) = [2s, 0.01 s], s = 0.50000625...,
    # which is not the LERP value
    cos_omega = 1 / math.sqrt(1.0001)
    s = 1 / (2 * math.sqrt((1 + cos_omega) / 2))
    slerped = slerp_merge(base, parallel, dot_threshold=0.99999)["w"]
    close(slerped, [2 * s, 0.01 * s], atol=3e-7)
    assert slerped[0] > 1.000001
    # antiparallel: |cos Ω| = 1 → LERP: ½[2, 4] + ½[−1, −2] = [0.5, 1]
    exact(slerp_merge(base, [{"w": t(2, 4)}, {"w": t(-1, -2)}])["w"], t(0.5, 1))


def test_slerp_just_below_the_threshold_is_spherical() -> None:
    # [1, 0] and [1, 0.05]: cos Ω = 1/√1.0025 = 0.998752 < 0.9995 → slerp, s = 1/(2 cos(Ω/2)) = 0.50015...
    # → s·(v0 + v1) = [2s, 0.05 s]
    cos_omega = 1 / math.sqrt(1.0025)
    s = 1 / (2 * math.sqrt((1 + cos_omega) / 2))
    merged = slerp_merge({"w": t(0, 0)}, [{"w": t(1, 0)}, {"w": t(1, 0.05)}])["w"]
    close(merged, [2 * s, 0.05 * s], atol=3e-7)
    assert merged[0] > 1.0002  # the LERP value would be 1


def test_slerp_leaves_tensors_of_norm_below_1e_8_unnormalised() -> None:
    # v0 = [5e-9, 5e-9] (norm 7.1e-9 ≤ 1e-8: kept as it is), v1 = [1, 0]: cos = 5e-9 → Ω = 90° to 1e-8 →
    # s0 = s1 = √½ → √½·(v0 + v1) = [√½, 3.5e-9]. (Dividing by max(‖v0‖, 1e-7) instead would give cos = 0.05,
    # Ω = 87.1°, s = 1/(2 cos 43.6°) = 0.69: [0.69, ...].)
    merged = slerp_merge({"w": t(0, 0)}, [{"w": t(5e-9, 5e-9)}, {"w": t(1, 0)}])["w"]
    close(merged, [SQRT_HALF, SQRT_HALF * 5e-9])


def test_slerp_one_expert_is_that_expert() -> None:
    experts = [{"w": t(1.5, -2), "s": torch.tensor(3.0)}]
    merged = slerp_merge({"w": t(0, 0), "s": torch.tensor(0.0)}, experts)
    exact(merged["w"], t(1.5, -2))
    exact(merged["s"], torch.tensor(3.0))


def test_slerp_three_experts_is_the_running_spherical_mean() -> None:
    # θ = [1, 0] (0°), [0, 1] (90°), [0, −1] (−90°), all unit vectors.
    experts = [{"w": t(1, 0)}, {"w": t(0, 1)}, {"w": t(0, -1)}]
    base = {"w": t(0, 0)}
    # m2 = slerp(θ1, θ2, ½) = [√½, √½] (45°). m3 = slerp(m2, θ3, ⅓): Ω = 135°, sin Ω = √½;
    # s0 = sin(90°)/√½ = √2, s1 = sin(45°)/√½ = 1 → √2·[√½, √½] + [0, −1] = [1, 0] (the mean angle, 0°).
    expected = [1.0, 0.0]
    close(slerp_merge(base, experts)["w"], expected, atol=5e-7)
    # t applies only to K = 2: any t gives the same K = 3 result
    exact(slerp_merge(base, experts, t=0.1)["w"], slerp_merge(base, experts, t=0.9)["w"])
    # the order matters (it is a running mean): [0, 1], [0, −1] first are antiparallel → LERP → m2 = [0, 0];
    # then slerp([0, 0], [1, 0], ⅓): the zero vector is not normalised, cos = 0 → Ω = 90° →
    # s1 = sin 30° = ½ → [0.5, 0]
    close(slerp_merge(base, [experts[1], experts[2], experts[0]])["w"], [0.5, 0.0])


def test_slerp_any_shape_uses_one_angle_per_tensor() -> None:
    # 4-D and 0-D tensors: the whole tensor is one vector. v0 = 3·e_0, v1 = 4·e_3 (orthogonal) → as the 2-D case
    v0, v1 = torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2)
    v0.view(-1)[0], v1.view(-1)[3] = 3.0, 4.0
    merged = slerp_merge({"k": torch.zeros(1, 2, 1, 2)}, [{"k": v0}, {"k": v1}])["k"]
    assert merged.shape == (1, 2, 1, 2)
    close(merged.view(-1), [3 * SQRT_HALF, 0, 0, 4 * SQRT_HALF])
    # 0-D: both are ±1 after normalising → |cos| = 1 → LERP: ½·2 + ½·(−6) = −2
    scalar = slerp_merge({"s": torch.tensor(0.0)}, [{"s": torch.tensor(2.0)}, {"s": torch.tensor(-6.0)}])["s"]
    exact(scalar, torch.tensor(-2.0))


def test_slerp_copies_integer_buffers_and_keeps_the_dtype() -> None:
    base = {"w": torch.zeros(2, dtype=torch.bfloat16), "ids": torch.tensor([0, 1, 2])}
    experts = [
        {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "ids": torch.tensor([7, 7, 7])},
        {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "ids": torch.tensor([9, 9, 9])},
    ]
    merged = slerp_merge(base, experts)
    exact(merged["ids"], torch.tensor([0, 1, 2]))
    # identical tensors: cos = 1 → LERP of equal values = the value, written back in bf16
    exact(merged["w"], torch.tensor([1.0, 2.0], dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------
# NuSLERP (task vectors, added to the base)


def test_nuslerp_slerps_task_vectors_and_adds_the_base() -> None:
    base = {"w": t(1, 1)}
    experts = [{"w": t(4, 1)}, {"w": t(1, 5)}]  # τ1 = [3, 0], τ2 = [0, 4]: orthogonal
    # t = 1/(1+1) = ½ → base + [3√½, 4√½]
    close(nuslerp_merge(base, experts)["w"], [1 + 3 * SQRT_HALF, 1 + 4 * SQRT_HALF])
    # weights (1, 3): t = 3/4 → s0 = sin(22.5°), s1 = sin(67.5°)
    s0, s1 = math.sin(math.radians(22.5)), math.sin(math.radians(67.5))
    close(nuslerp_merge(base, experts, weights=(1.0, 3.0))["w"], [1 + 3 * s0, 1 + 4 * s1], atol=3e-7)
    # weights (0, 0): |Σw| < 1e-6 → t = ½ (mergekit's rule), same as equal weights
    exact(nuslerp_merge(base, experts, weights=(0.0, 0.0))["w"], nuslerp_merge(base, experts)["w"])


def test_nuslerp_flatten_versus_rows_versus_columns() -> None:
    tau1 = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    tau2 = torch.tensor([[0.0, 4.0], [2.0, 0.0]])
    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": tau1}, {"w": tau2}]
    # flatten (default): cos Ω = (0 + 0 + 2 + 0)/(√10 · √20) = 1/√50; at t = ½ slerp = (τ1 + τ2)/(2 cos(Ω/2))
    c = 1 / math.sqrt(50)
    s = 1 / (2 * math.sqrt((1 + c) / 2))
    close(nuslerp_merge(base, experts)["w"], [[3 * s, 4 * s], [3 * s, 0.0]], atol=5e-7)
    # rows (flatten=false): row 0 orthogonal → [3√½, 4√½]; row 1 parallel: sin Ω = 0 → LERP → [1.5, 0]
    rows = nuslerp_merge(base, experts, flatten=False)["w"]
    close(rows, [[3 * SQRT_HALF, 4 * SQRT_HALF], [1.5, 0.0]])
    assert rows[1].tolist() == [1.5, 0.0]
    # columns (row_wise): column 0: τ1 = [3, 1], τ2 = [0, 2], cos = 2/(√10 · 2) = 1/√10 → (τ1 + τ2)/(2 cos(Ω/2))
    # = s'·[3, 3]; column 1: τ1 = [0, 0] (not normalised: cos = 0, Ω = 90°), τ2 = [4, 0] → √½·[4, 0]
    c = 1 / math.sqrt(10)
    s = 1 / (2 * math.sqrt((1 + c) / 2))
    columns = nuslerp_merge(base, experts, flatten=False, row_wise=True)["w"]
    close(columns, [[3 * s, 4 * SQRT_HALF], [3 * s, 0.0]], atol=5e-7)
    # row_wise is ignored when flattening (as mergekit)
    exact(nuslerp_merge(base, experts, row_wise=True)["w"], nuslerp_merge(base, experts)["w"])


def test_nuslerp_row_wise_on_non_square_and_3d_tensors() -> None:
    # vectors along dim 0 of a [2, 3] (and the same numbers as [2, 1, 3]):
    tau1 = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    tau2 = torch.tensor([[2.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
    # column 0: [1, 1] ∥ [2, 2] → sin Ω = 0 → LERP ½[3, 3]; column 1: [0, 0] (not normalised, cos 0) and [0, 3]
    # → √½·[0, 3]; column 2: [2, 0] and [0, 0] → √½·[2, 0]
    expected = torch.tensor([[1.5, 0.0, 2 * SQRT_HALF], [1.5, 3 * SQRT_HALF, 0.0]])
    for shape in ((2, 3), (2, 1, 3)):
        base = {"w": torch.zeros(shape)}
        experts = [{"w": tau1.view(shape)}, {"w": tau2.view(shape)}]
        merged = nuslerp_merge(base, experts, flatten=False, row_wise=True)["w"]
        assert merged.shape == shape
        close(merged.view(2, 3), expected)


def test_nuslerp_lerps_exactly_antiparallel_one_element_rows() -> None:
    # 0-D: τ1 = 2, τ2 = −1 → unit values +1, −1 → cos = −1 → LERP: ½·2 + ½·(−1) = 0.5 → θ0 + 0.5
    base = {"s": torch.tensor(1.0), "col": torch.zeros(2, 1)}
    experts = [
        {"s": torch.tensor(3.0), "col": torch.tensor([[2.0], [1.0]])},
        {"s": torch.tensor(0.0), "col": torch.tensor([[-1.0], [3.0]])},
    ]
    merged = nuslerp_merge(base, experts, flatten=False)
    exact(merged["s"], torch.tensor(1.5))
    # rows of one element (last dim 1): row 0 opposite → LERP 0.5; row 1 same sign → cos = 1 → LERP 2
    exact(merged["col"], torch.tensor([[0.5], [2.0]]))


def test_nuslerp_one_expert_zero_task_vectors_and_buffers() -> None:
    base = {"w": t(1, 2), "ids": torch.tensor([4, 5])}
    # K = 1 is θ_1 itself, not θ0 + (θ_1 − θ0): in fp32 1e-8 − 1 rounds to −1, and 1 + (−1) = 0 ≠ 1e-8
    exact(nuslerp_merge(base, [{"w": t(1e-8, 3), "ids": torch.tensor([0, 0])}])["w"], t(1e-8, 3))
    # both task vectors zero: normalising leaves them 0, cos = 0 → 0·s0 + 0·s1 = 0 → θ0 exactly
    merged = nuslerp_merge(base, [{"w": t(1, 2), "ids": torch.tensor([0, 0])}] * 3)
    exact(merged["w"], t(1, 2))
    exact(merged["ids"], torch.tensor([4, 5]))


def test_nuslerp_three_experts_running_mean_with_weights() -> None:
    base = {"w": t(2, 2)}
    experts = [{"w": t(3, 2)}, {"w": t(2, 3)}, {"w": t(2, 1)}]  # τ = [1, 0], [0, 1], [0, −1]
    # equal weights: t2 = ½, t3 = ⅓ → the slerp example: m3 = [1, 0] → θ0 + [1, 0]
    close(nuslerp_merge(base, experts)["w"], [3.0, 2.0], atol=5e-7)
    # weights (1, 1, 2): t2 = 1/2, t3 = 2/4 = ½: m2 = [√½, √½] (45°), halfway to −90° is −22.5°
    # (both unit, Ω = 135°: s0 = s1 = sin 67.5°/sin 135°) → θ0 + [cos 22.5°, −sin 22.5°]
    a = math.radians(22.5)
    close(nuslerp_merge(base, experts, weights=(1.0, 1.0, 2.0))["w"], [2 + math.cos(a), 2 - math.sin(a)], atol=5e-7)


def test_nuslerp_fractions_and_weight_parsing() -> None:
    assert nuslerp_fractions([1.0, 1.0, 1.0, 1.0]) == [1 / 2, 1 / 3, 1 / 4]
    assert nuslerp_fractions([2.0, 0.5, 0.5]) == [0.5 / 2.5, 0.5 / 3.0]
    assert nuslerp_fractions([1.0, -1.0, 3.0]) == [0.5, 1.0]  # Σ = 0 → ½; then 3/3
    assert nuslerp_fractions([1e-7, 0.0]) == [0.5]  # |Σ| = 1e-7 < 1e-6 → ½ (not 0/1e-7 = 0)
    assert nuslerp_fractions([3e-7, 6e-7]) == [0.5]  # |Σ| = 9e-7 < 1e-6 → ½ (not ⅔)
    assert parse_weights("") is None and parse_weights("  ") is None
    assert parse_weights("1, 2;3 4") == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(BenchError, match="has 2 numbers but there are 3 experts"):
        nuslerp_merge({"w": t(0)}, [{"w": t(1)}] * 3, weights=(1.0, 2.0))


# ----------------------------------------------------------------------------------------------------------
# Model Stock


def test_model_stock_sixty_degrees_two_experts() -> None:
    # τ1 = [1, 1, 0], τ2 = [1, 0, 1]: cos = 1/(√2·√2) = ½ (60°) → t = 2·½/(1·½ + 1) = 2/3
    # θ0 = 0: θ = ⅔ · mean θ_i = ⅔ · [1, ½, ½] = [⅔, ⅓, ⅓]
    experts = [{"w": t(1, 1, 0)}, {"w": t(1, 0, 1)}]
    base = zeros(experts)
    for cosine in ("mean_angle", "mean_cosine"):
        close(model_stock_merge(base, experts, cosine=cosine)["w"], [2 / 3, 1 / 3, 1 / 3], atol=3e-7)
    # with a base: θ0 = [1, 1, 1], θ_i = θ0 + τ_i → θ = ⅔ [2, 1.5, 1.5] + ⅓ [1, 1, 1] = [5/3, 4/3, 4/3]
    shifted = [{"w": e["w"] + 1} for e in experts]
    close(model_stock_merge({"w": t(1, 1, 1)}, shifted)["w"], [5 / 3, 4 / 3, 4 / 3], atol=3e-7)


def test_model_stock_mean_angle_and_mean_cosine_differ_when_angles_spread() -> None:
    # τ = [1, 0, 0], [0, 1, 0], [1, 1, 0]: pairwise angles 90°, 45°, 45°
    experts = [{"w": t(1, 0, 0)}, {"w": t(0, 1, 0)}, {"w": t(1, 1, 0)}]
    base = zeros(experts)
    mean = torch.tensor([2 / 3, 2 / 3, 0.0])
    # mean_angle: mean 60° → c = ½ → t = 3·½/(2·½ + 1) = ¾
    close(model_stock_merge(base, experts, cosine="mean_angle")["w"], 0.75 * mean, atol=3e-7)
    # mean_cosine: c = (0 + √½ + √½)/3 = √2/3 → t = 3c/(1 + 2c) = √2/(1 + 2√2/3) = 0.72792...
    c = math.sqrt(2) / 3
    close(model_stock_merge(base, experts, cosine="mean_cosine")["w"], 3 * c / (1 + 2 * c) * mean, atol=3e-7)


def test_model_stock_filter_wise_gives_each_row_its_own_ratio() -> None:
    # row 0: τ1 = [1, 0], τ2 = [0, 1] → 90°, c = 0 → t = 0 → θ0's row; row 1: parallel → c = 1 → t = 2/2 = 1
    experts = [{"w": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}, {"w": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}]
    base = zeros(experts)
    # mergekit's arithmetic: c is exactly 0 and 1 → exact
    exact(model_stock_merge(base, experts, cosine="mean_cosine", filter_wise=True)["w"],
          torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    # FusionBench's: arccos(0) in fp32 is 90.0000025°, so t ≈ −9e-8 on row 0: θ0 within 1e-7
    close(model_stock_merge(base, experts, cosine="mean_angle", filter_wise=True)["w"], [[0.0, 0.0], [1.0, 0.0]])
    # per tensor instead: [1, 0, 1, 0] · [0, 1, 1, 0] = 1, norms √2 → c = ½ → t = ⅔ → ⅔ · [[½, ½], [1, 0]]
    close(model_stock_merge(base, experts)["w"], [[1 / 3, 1 / 3], [2 / 3, 0.0]], atol=3e-7)


def test_model_stock_zero_task_vectors_stay_at_the_base() -> None:
    base = {"w": t(0.1, -3), "b": torch.tensor([[1.5, 2.5]])}
    for count in (2, 3):
        experts = [{key: value.clone() for key, value in base.items()} for _ in range(count)]
        for cosine in ("mean_angle", "mean_cosine"):
            for filter_wise in (False, True):
                merged = model_stock_merge(base, experts, cosine=cosine, filter_wise=filter_wise)
                exact(merged["w"], base["w"])
                exact(merged["b"], base["b"])
    # one zero task vector of two: mergekit counts the pair as cosine 0 → t = 0 → θ0 exactly
    experts = [{"w": t(0.1, -3), "b": base["b"]}, {"w": t(2, 5), "b": base["b"]}]
    exact(model_stock_merge(base, experts, cosine="mean_cosine")["w"], base["w"])


def test_model_stock_opposite_scalars_have_no_common_direction() -> None:
    # 0-D τ = +0.5, −0.5: cos = −1 → (N − 1)c + 1 = 0 → t = 0 → θ0 (mergekit would divide by zero: nan)
    base = {"s": torch.tensor(1.0)}
    experts = [{"s": torch.tensor(1.5)}, {"s": torch.tensor(0.5)}]
    exact(model_stock_merge(base, experts, cosine="mean_cosine")["s"], torch.tensor(1.0))
    # N = 8, four of each sign: mean cosine = (12 − 16)/28 = −1/7 → 1 + 7·(−1/7) = 0 → θ0
    experts = [{"s": torch.tensor(1.0 + (0.25 if i % 2 else -0.5))} for i in range(8)]
    exact(model_stock_merge(base, experts, cosine="mean_cosine")["s"], torch.tensor(1.0))


def test_model_stock_task_vectors_without_a_common_direction_stay_at_the_base() -> None:
    # τ = [2, 0], [−1, 0], [0, 1], [0, −1]: pair angles 180°, 90°, 90°, 90°, 90°, 180°.
    # mean_angle: mean 120° → c = −½ → (N − 1)c + 1 = 3·(−½) + 1 = −½ ≤ 0 → t = 0 → θ0 (FusionBench: t = −2/−½ = 4,
    # θ0 + 4·mean τ = θ0 + [1, 0]). mean_cosine: c = (−1 − 1 + 0)/6 = −⅓ → 1 + 3·(−⅓) = 0 → t = 0 → θ0.
    base = {"w": t(1, 1)}
    experts = [{"w": t(3, 1)}, {"w": t(0, 1)}, {"w": t(1, 2)}, {"w": t(1, 0)}]
    for cosine in ("mean_angle", "mean_cosine"):
        exact(model_stock_merge(base, experts, cosine=cosine)["w"], t(1, 1))


def test_model_stock_one_expert_and_integer_buffers() -> None:
    base = {"w": t(0, 0), "ids": torch.tensor([1, 2])}
    # K = 1 is θ_1 itself (not θ0 + (θ_1 − θ0), which rounds 1e-8 away: see the nuslerp test)
    base_one = {"w": t(1, 0)}
    exact(model_stock_merge(base_one, [{"w": t(1e-8, -1)}])["w"], t(1e-8, -1))
    experts = [{"w": t(1, 1), "ids": torch.tensor([8, 8])}, {"w": t(1, 1), "ids": torch.tensor([9, 9])}]
    merged = model_stock_merge(base, experts, cosine="mean_cosine")
    exact(merged["ids"], torch.tensor([1, 2]))
    # identical τ = [1, 1]: c = 1 → t = 1 → the mean [1, 1]
    exact(merged["w"], t(1, 1))


def test_model_stock_keeps_16_bit_dtypes_and_4d_shapes() -> None:
    base = {"k": torch.zeros(2, 1, 1, 2, dtype=torch.float16)}
    experts = [
        {"k": torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float16).view(2, 1, 1, 2)},
        {"k": torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float16).view(2, 1, 1, 2)},
    ]
    merged = model_stock_merge(base, experts, cosine="mean_cosine")["k"]
    assert merged.dtype == torch.float16 and merged.shape == (2, 1, 1, 2)
    # c = ½ → t = ⅔; mean = [1, ½, ½, 0] → [⅔, ⅓, ⅓, 0] rounded to fp16
    close(merged.view(-1), torch.tensor([2 / 3, 1 / 3, 1 / 3, 0.0]).half(), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Hyperparameters and registered adapters


@pytest.mark.parametrize(
    ("name", "params", "overrides", "message"),
    [
        ("slerp", SlerpParams, {"t": "1.5"}, "slerp.t=1.5 is outside [0.0, 1.0]"),
        ("slerp", SlerpParams, {"dot_threshold": "-0.1"}, "slerp.dot_threshold=-0.1 is outside [0.0, 1.0]"),
        ("model_stock", ModelStockParams, {"cosine": "median"},
         "model_stock.cosine=median is not one of mean_angle|mean_cosine"),
        ("nuslerp", NuSlerpParams, {"weights": "1,x"},
         "nuslerp: nuslerp.weights='1,x': 'x' is not a finite number; write one weight per expert, e.g. "
         "--set nuslerp.weights=1,1,2, or leave it empty for all 1"),
        ("nuslerp", NuSlerpParams, {"weights": "1 inf"},
         "nuslerp: nuslerp.weights='1 inf': 'inf' is not a finite number; write one weight per expert, e.g. "
         "--set nuslerp.weights=1,1,2, or leave it empty for all 1"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(name: str, params: type, overrides: dict, message: str) -> None:
    with pytest.raises(BenchError) as error:
        build_params(name, params, overrides)
    assert str(error.value) == message


@pytest.mark.parametrize("name", ["model_stock", "slerp", "nuslerp"])
def test_registered_methods_run_with_defaults_deterministically(name: str) -> None:
    from toy_plugin import ToyParams, ToyProblem

    problem = ToyProblem(ToyParams(num_tasks=3))
    before = {key: value.clone() for key, value in problem.pretrained().items()}
    spec = get_method(name)
    results = []
    for seed in (0, 1):
        context = MergeContext(problem=problem, seed=seed, device=torch.device("cpu"),
                               generator=torch.Generator().manual_seed(seed))
        results.append(spec.fn(context, build_params(name, spec.params, {})))
    merged = results[0]
    assert merged.keys() == before.keys()
    for key, value in merged.items():
        assert value.dtype == before[key].dtype and value.shape == before[key].shape
        assert torch.isfinite(value).all()
        exact(value, results[1][key])  # no randomness: another seed gives the same weights
        exact(problem.pretrained()[key], before[key])  # inputs untouched
    # the merge is not a trivial copy of the base or of one expert
    assert not torch.equal(merged["w"], before["w"])
    assert all(not torch.equal(merged["w"], problem.expert(task)["w"]) for task in problem.tasks)
    if name == "slerp":
        assert "running spherical mean of 3 experts" in context.notes["slerp_rule"]
