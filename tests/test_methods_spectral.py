"""Golden values for STAR, DRM and WUDI (methods/star.py, methods/drm.py, methods/wudi.py), worked out by hand.

Every expected value is derived in the comments from the definitions in the module docstrings (and
methods-wave2.md), not by calling the implementation. Unless a test says otherwise θ0 = 0, so θ_i = τ_i and the
merged weights are the merged task vector. Tensors are fp64 where an SVD or an optimiser is involved, so hand
values hold to ~1e-12; elsewhere the arithmetic is exact.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bench.errors import BenchError
from bench.problem import MergeContext, StateDict
from bench.registry import build_params, get_method
from methods.drm import DrmParams, drm_merge, kept_count, prune_jointly
from methods.star import StarParams, star_merge, star_rank, star_truncate
from methods.wudi import WudiGradient, WudiParams, adam_steps, wudi_loss, wudi_matrix, wudi_merge


def f64(rows: list) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def zeros_like_all(experts: list[StateDict]) -> StateDict:
    return {key: torch.zeros_like(value) for key, value in experts[0].items()}


def assert_close(actual: Tensor, expected: Tensor, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=0.0)


# ----------------------------------------------------------------------------------------------------------
# STAR


def star(base: StateDict, experts: list[StateDict], eta: float = 40.0, scaling: float = 1.0,
         vector_params: tuple[str, ...] = ()) -> StateDict:
    return star_merge(base, experts, eta=eta, scaling=scaling, vector_params=vector_params)


def test_star_keeps_one_component_of_a_diagonal_matrix_and_rescales_it() -> None:
    # τ = diag(3, 2, 1): σ = (3, 2, 1), Σσ = 6, η = 40 → target 6·40/100 = 2.4; cumsum (3, 5, 6) reaches it at
    # k = 1. Kept σ_1 = 3 is rescaled by Σσ/Σkept = 6/3 = 2 → STAR(τ) = diag(6, 0, 0) (nuclear norm 6 kept).
    tau = torch.diag(f64([3, 2, 1]))
    assert_close(star_truncate(tau, 40.0), torch.diag(f64([6, 0, 0])))


def test_star_on_a_rotated_matrix() -> None:
    # τ = Q diag(2, 1) with Q = [[0.6, −0.8], [0.8, 0.6]] (orthogonal): τ = [[1.2, −0.8], [1.6, 0.6]].
    # Σσ = 3, target 1.2 → k = 1; rescale 3/2 → STAR(τ) = 3 · q_1 e_1ᵀ = [[1.8, 0], [2.4, 0]].
    tau = f64([[1.2, -0.8], [1.6, 0.6]])
    assert_close(star_truncate(tau, 40.0), f64([[1.8, 0.0], [2.4, 0.0]]))


@pytest.mark.parametrize(
    ("eta", "rank"),
    # σ = (4, 3, 2, 1), Σσ = 10, cumsum (4, 7, 9, 10); target = 10·η/100 (exact for these η).
    [(0.0, 1), (40.0, 1), (41.0, 2), (70.0, 2), (70.5, 3), (90.0, 3), (90.5, 4), (100.0, 4)],
)
def test_star_rank_is_searchsorted_plus_one_at_exact_boundaries(eta: float, rank: int) -> None:
    # η = 40: target 4.0 = cumsum_1 exactly → reached at k = 1; η = 41: 4.1 > 4 → k = 2; η = 70: 7.0 = cumsum_2
    # → k = 2; η = 70.5: 7.05 → k = 3; η = 90: 9.0 → k = 3; η = 90.5 → k = 4; η = 100: 10 → k = 4; η = 0 → 1.
    assert star_rank(f64([4, 3, 2, 1]), eta) == rank


def test_star_rescale_with_two_components() -> None:
    # diag(4, 3, 2, 1), η = 70 → k = 2; kept (4, 3), Σ = 7, rescale 10/7 → diag(40/7, 30/7, 0, 0).
    assert_close(star_truncate(torch.diag(f64([4, 3, 2, 1])), 70.0), torch.diag(f64([40 / 7, 30 / 7, 0, 0])))


def test_star_zero_and_rank_deficient_task_vectors() -> None:
    # A zero matrix stays zero (the reference gives 0/0 = NaN).
    zero = torch.zeros(2, 3, dtype=torch.float64)
    assert torch.equal(star_truncate(zero, 40.0), zero)
    # diag(5, 0): σ = (5, 0), target 2 → k = 1, rescale 5/5 = 1 → unchanged.
    assert_close(star_truncate(torch.diag(f64([5, 0])), 40.0), torch.diag(f64([5, 0])))


def test_star_merge_averages_truncated_matrices_and_plain_vectors() -> None:
    base = {
        "w": torch.ones(3, 3, dtype=torch.float64),
        "b": f64([1, 1]),
        "s": torch.tensor(2.0, dtype=torch.float64),
        "text_projection": torch.zeros(2, 2, dtype=torch.float64),
        "ids": torch.tensor([0, 1, 2]),
    }
    experts = [
        {"w": base["w"] + torch.diag(f64([3, 2, 1])), "b": f64([2, -1]), "s": torch.tensor(3.0, dtype=torch.float64),
         "text_projection": torch.diag(f64([2, 1])), "ids": torch.tensor([7, 7, 7])},
        {"w": base["w"] + torch.diag(f64([0, 0, 4])), "b": f64([4, 5]), "s": torch.tensor(5.0, dtype=torch.float64),
         "text_projection": torch.diag(f64([0, 4])), "ids": torch.tensor([9, 9, 9])},
    ]
    merged = star(base, experts, eta=40.0, scaling=0.5, vector_params=("*text_projection*",))
    # w: STAR(τ_1) = diag(6, 0, 0) (first test); τ_2 = diag(0, 0, 4): σ = (4, 0, 0), k = 1, rescale 1 → itself.
    # mean = diag(3, 0, 2); θ = 1 + 0.5 · diag(3, 0, 2).
    assert_close(merged["w"], torch.ones(3, 3, dtype=torch.float64) + torch.diag(f64([1.5, 0, 1])))
    # b: τ = (1, −2), (3, 4) → mean (2, 1) → θ = 1 + 0.5 · (2, 1) = (2, 1.5).
    assert torch.equal(merged["b"], f64([2, 1.5]))
    # s (0-D): τ = 1, 3 → mean 2 → 2 + 1 = 3.
    assert merged["s"].item() == 3.0
    # text_projection is named in vector_params: plain mean of diag(2, 1), diag(0, 4) = diag(1, 2.5), × 0.5.
    assert torch.equal(merged["text_projection"], torch.diag(f64([0.5, 1.25])))
    assert torch.equal(merged["ids"], torch.tensor([0, 1, 2]))
    # Without vector_params it is a matrix: STAR(diag(2, 1)) = diag(3, 0) (Σσ 3, target 1.2 → k = 1, × 3/2),
    # STAR(diag(0, 4)) = itself → mean diag(1.5, 2) → × 0.5 = diag(0.75, 1).
    assert_close(star(base, experts, scaling=0.5)["text_projection"], torch.diag(f64([0.75, 1])))


def test_star_one_expert_with_eta_100_returns_it_and_keeps_dtype() -> None:
    # η = 100 keeps every component and rescales by 1: θ0 + τ. bf16 in, bf16 out.
    tau = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    base = {"w": torch.ones(2, 2, dtype=torch.bfloat16)}
    merged = star(base, [{"w": (1 + tau).to(torch.bfloat16)}], eta=100.0)
    assert merged["w"].dtype == torch.bfloat16
    torch.testing.assert_close(merged["w"].float(), 1 + tau, atol=1e-2, rtol=0)


def test_star_params() -> None:
    defaults = StarParams()
    assert (defaults.eta, defaults.scaling) == (40.0, 1.0)
    with pytest.raises(BenchError, match=r"^star\.eta=120\.0 is outside \[0\.0, 100\.0\]$"):
        build_params("star", StarParams, {"eta": "120"})
    with pytest.raises(ValueError, match="star.eta=-1"):
        StarParams(eta=-1.0)


# ----------------------------------------------------------------------------------------------------------
# DRM

# The shared hand case: τ_1 = [[3, 0], [4, 1]], τ_2 = [[−2, 2], [0, 5]].
# DRM-V stacks the rows: X = [τ_1; τ_2] (4×2) with columns x_0 = (3, 4, −2, 0), x_1 = (0, 1, 2, 5), and
# x_0 · x_1 = 0 + 4 − 4 + 0 = 0, so XᵀX = diag(29, 30): V = I (up to order and signs, which cancel),
# σ = (√30, √29), both > 0.01 σ_max; column j of U is x_j / σ_j.
# Renormalise: U_i's column j is τ_i[:, j] / σ_j, its norm c_ij = ‖τ_i[:, j]‖ / σ_j, so
#   Û_1 = [[0.6, 0], [0.8, 1]] (columns (3, 4)/5 and (0, 1)/1), s_1 = (5, 1);
#   Û_2 = [[−1, 2/√29], [0, 5/√29]] (columns (−2, 0)/2 and (2, 5)/√29), s_2 = (2, √29),
# and M_i = Û_i diag(s_i) = τ_i when nothing is pruned. |Û| over both models (8 entries):
#   1, 1, 5/√29 ≈ 0.928, 0.8, 0.6, 2/√29 ≈ 0.371, 0, 0.
TAU_1 = [[3.0, 0.0], [4.0, 1.0]]
TAU_2 = [[-2.0, 2.0], [0.0, 5.0]]


def drm(experts: list[StateDict], base: StateDict | None = None, **options: object) -> StateDict:
    settings = {"drop_rate": 0.8, "direction": "vertical", "coefficient": 1.0} | options
    return drm_merge(base if base is not None else zeros_like_all(experts), experts, **settings)  # type: ignore[arg-type]


def test_drm_vertical_hand_case_prunes_in_the_joint_basis() -> None:
    experts = [{"w": f64(TAU_1)}, {"w": f64(TAU_2)}]
    # drop 0.5: p = round(8 · 0.5) = 4 → keep |Û| ≥ 0.8: Û_1[1, 0], Û_1[1, 1], Û_2[0, 0], Û_2[1, 1].
    # M_1 = [[0, 0], [0.8·5, 1·1]] = [[0, 0], [4, 1]]; M_2 = [[−1·2, 0], [0, (5/√29)·√29]] = [[−2, 0], [0, 5]].
    # Σ M = [[−2, 0], [4, 6]]: no conflicts; disjoint mean → [[−2, 0], [4, (1 + 5)/2]]; × Vᵀ = I.
    assert_close(drm(experts, drop_rate=0.5)["w"], f64([[-2, 0], [4, 3]]))
    # drop 0.25: p = round(8 · 0.75) = 6 → keep |Û| ≥ 2/√29: every non-zero entry, so M_i = τ_i.
    # Election: [0, 0]: 3 − 2 = 1 > 0 → keep 3, drop −2; [0, 1]: 2; [1, 0]: 4; [1, 1]: (1 + 5)/2 = 3.
    assert_close(drm(experts, drop_rate=0.25)["w"], f64([[3, 2], [4, 3]]))
    # drop 0.625: p = round(8 · 3/8) = 3, one threshold for both models → keep 1, 1, 5/√29: Û_1[1, 1], Û_2[0, 0],
    # Û_2[1, 1] (a per-model top-2 would also keep Û_1[1, 0] = 0.8). M_1 = [[0, 0], [0, 1]], M_2 = [[−2, 0], [0, 5]]
    # → [[−2, 0], [0, 3]].
    assert_close(drm(experts, drop_rate=0.625)["w"], f64([[-2, 0], [0, 3]]))
    # The coefficient multiplies the merged delta: c = 2 at drop 0.5 → 2 · [[−2, 0], [4, 3]].
    assert_close(drm(experts, drop_rate=0.5, coefficient=2.0)["w"], f64([[-4, 0], [8, 6]]))


def test_drm_drop_zero_is_the_plain_disjoint_mean() -> None:
    experts = [{"w": f64(TAU_1)}, {"w": f64(TAU_2)}]
    # No SVD, no election: [0, 0]: (3 − 2)/2 = 0.5; [0, 1]: 2/1; [1, 0]: 4/1; [1, 1]: (1 + 5)/2 = 3.
    assert torch.equal(drm(experts, drop_rate=0.0)["w"], f64([[0.5, 2], [4, 3]]))
    # The coefficient applies here too (the reference ignores it at drop 0): c = 0.5 → [[0.25, 1], [2, 1.5]].
    assert torch.equal(drm(experts, drop_rate=0.0, coefficient=0.5)["w"], f64([[0.25, 1], [2, 1.5]]))


def test_drm_horizontal_is_the_transposed_hand_case() -> None:
    # DRM-H stacks columns: [τ_1ᵀ τ_2ᵀ] = Xᵀ, whose rows are orthogonal; with the roles of U and V swapped the
    # computation is the vertical hand case transposed: drop 0.5 → [[−2, 0], [4, 3]]ᵀ = [[−2, 4], [0, 3]].
    experts = [{"w": f64(TAU_1).T.contiguous()}, {"w": f64(TAU_2).T.contiguous()}]
    assert_close(drm(experts, drop_rate=0.5, direction="horizontal")["w"], f64([[-2, 4], [0, 3]]))
    # ... and the vertical direction on these inputs is a different merge.
    assert not torch.allclose(drm(experts, drop_rate=0.5, direction="vertical")["w"], f64([[-2, 4], [0, 3]]))


def test_drm_vector_path_elects_with_this_tensors_majority_sign() -> None:
    experts = [
        {"v": f64([1, -2, -3, 0, -1]), "a": f64([5, 5, 5, 5, 5, 5, 5])},
        {"v": f64([-1, 4, -1, 0, -3]), "a": f64([5, 5, 5, 5, 5, 5, 5])},
    ]
    merged = drm(experts)
    # v: sums (0, 2, −4, 0, −4) → signs (0, +, −, 0, −); this tensor's majority sign(1 − 1 − 1) = −, so entry 0
    # takes −: keep −1 (from τ_2). Entry 1: keep 4; entry 2: (−3 − 1)/2 = −2; entry 3: 0; entry 4: (−1 − 3)/2.
    # (A model-wide majority, as in ``ties``, would be + because of tensor "a", and give +1 at entry 0.)
    assert torch.equal(merged["v"], f64([-1, 4, -2, 0, -2]))
    assert torch.equal(merged["a"], f64([5, 5, 5, 5, 5, 5, 5]))


def test_drm_zero_expert_and_rank_threshold() -> None:
    # τ_1 = diag(2, 1), τ_2 = 0: X = [diag(2, 1); 0], σ = (2, 1), V = I, Û_1 = I, Û_2's columns have norm 0 and
    # stay 0 (the reference divides 0 by 0 → NaN). |Û|: 1, 1 and six 0s; drop 0.8 → p = round(8 · 0.2) = 2
    # → both 1s kept: M_1 = diag(2, 1), M_2 = 0; the disjoint mean ignores the zeros → θ = diag(2, 1).
    merged = drm([{"w": torch.diag(f64([2, 1]))}, {"w": torch.zeros(2, 2, dtype=torch.float64)}])
    assert_close(merged["w"], torch.diag(f64([2, 1])))
    # One expert diag(1, 0.005): σ_2 = 0.005 ≤ 0.01 · σ_max is dropped → r = 1, Û = (1, 0)ᵀ; drop 0.5 → p = 1
    # → keep the 1 → θ = diag(1, 0). With diag(1, 0.02) both components stay; p = round(4 · 0.5) = 2 keeps both
    # unit entries → θ = diag(1, 0.02).
    assert_close(drm([{"w": torch.diag(f64([1, 0.005]))}], drop_rate=0.5)["w"], torch.diag(f64([1, 0])))
    assert_close(drm([{"w": torch.diag(f64([1, 0.02]))}], drop_rate=0.5)["w"], torch.diag(f64([1, 0.02])))


def test_drm_drop_one_keeps_no_matrix_update_and_copies_integer_buffers() -> None:
    base = {"w": torch.ones(2, 2, dtype=torch.float64), "b": f64([1, 1]), "ids": torch.tensor([3, 4])}
    experts = [
        {"w": base["w"] + f64(TAU_1), "b": f64([2, 3]), "ids": torch.tensor([0, 0])},
        {"w": base["w"] + f64(TAU_2), "b": f64([0, 5]), "ids": torch.tensor([1, 1])},
    ]
    merged = drm(experts, base=base, drop_rate=1.0)
    # p = 0: nothing survives the pruning → Δ = 0 for the matrix. b: τ = (1, 2), (−1, 4): entry 0 cancels →
    # majority sign of (0, +) is + → 1; entry 1: (2 + 4)/2 = 3 → θ = (2, 4).
    assert torch.equal(merged["w"], base["w"])
    assert torch.equal(merged["b"], f64([2, 4]))
    assert torch.equal(merged["ids"], torch.tensor([3, 4]))
    # Named in vector_params, w takes the vector path instead: elect + disjoint mean of τ_1, τ_2 (the drop-0.25
    # hand value [[3, 2], [4, 3]]: the same election, entry by entry), + θ0 = 1.
    as_vector = drm(experts, base=base, drop_rate=1.0, vector_params=("w",))
    assert torch.equal(as_vector["w"], base["w"] + f64([[3, 2], [4, 3]]))


def test_drm_kept_count_and_joint_pruning_ties() -> None:
    assert kept_count(10, 0.8) == 2  # 10 · 1/5 exactly (not 1 from the float 0.19999…)
    assert kept_count(10, 0.85) == 2 and kept_count(10, 0.75) == 2  # 1.5 and 2.5 round half to even
    assert kept_count(5, 0.9) == 0 and kept_count(7, 0.0) == 7 and kept_count(7, 1.0) == 0
    # keep 1 of (3, −3, 1, 2): the largest magnitude is 3, and both entries tied at 3 are kept.
    assert torch.equal(prune_jointly(f64([3, -3, 1, 2]), 1), f64([3, -3, 0, 0]))
    assert torch.equal(prune_jointly(f64([3, -3, 1, 2]), 3), f64([3, -3, 0, 2]))


def test_drm_params() -> None:
    defaults = DrmParams()
    assert (defaults.drop_rate, defaults.direction, defaults.coefficient) == (0.8, "vertical", 1.0)
    with pytest.raises(BenchError, match=r"^drm\.drop_rate=1\.5 is outside \[0\.0, 1\.0\]$"):
        build_params("drm", DrmParams, {"drop_rate": "1.5"})
    with pytest.raises(BenchError, match=r"^drm\.direction=diagonal is not one of vertical\|horizontal$"):
        build_params("drm", DrmParams, {"direction": "diagonal"})


# ----------------------------------------------------------------------------------------------------------
# WUDI

# The 1×2 hand case: τ_1 = [[1, 0]], τ_2 = [[1, 1]]; n_1 = 1, n_2 = 2; start τ_m = Σ τ_i = [[2, 1]].
# Residuals: (τ_m − τ_1) τ_1ᵀ = (1, 1)·(1, 0) = 1, (τ_m − τ_2) τ_2ᵀ = (1, 0)·(1, 1) = 1 → L = 1²/1 + 1²/2 = 1.5.
# ∇L = Σ_i 2 ((τ_m − τ_i) τ_iᵀ) τ_i / n_i = 2·1·(1, 0)/1 + 2·1·(1, 1)/2 = (3, 1).
# Optimum: L = 0 iff τ_m · τ_1 = τ_1 · τ_1 = 1 and τ_m · τ_2 = τ_2 · τ_2 = 2 → τ_m = (1, 1) (unique: A is
# invertible, A = [[1.5, 0.5], [0.5, 0.5]]).
W1 = [[1.0, 0.0]]
W2 = [[1.0, 1.0]]


@pytest.mark.parametrize("form", ["gram", "stacked"])
def test_wudi_loss_and_gradient_by_hand(form: str) -> None:
    taus = [f64(W1), f64(W2)]
    start = taus[0] + taus[1]
    # n_2 is computed as ‖τ_2‖² = (√2)² (FB's torch.norm squared), 2 up to one rounding: hence the tolerance.
    assert wudi_loss(start, taus).item() == pytest.approx(1.5, abs=1e-15)
    assert_close(WudiGradient(taus, form)(start), f64([[3, 1]]), atol=1e-15)
    # The closed-form gradient is the loss's autograd gradient.
    probe = start.clone().requires_grad_(True)
    wudi_loss(probe, taus).backward()
    assert_close(probe.grad, f64([[3, 1]]), atol=1e-15)


def test_wudi_one_adam_step_by_hand() -> None:
    # Step 1 from g = (3, 1): m = 0.1 g, v = 0.001 g², bias corrections 0.1 and 0.001, so the step is
    # lr · g / (|g| + ε): with lr = 0.5 → (2 − 0.5·3/(3 + 1e−8), 1 − 0.5·1/(1 + 1e−8)) ≈ (1.5, 0.5).
    merged = wudi_matrix([f64(W1), f64(W2)], steps=1, lr=0.5)
    assert_close(merged, f64([[2 - 0.5 * 3 / (3 + 1e-8), 1 - 0.5 / (1 + 1e-8)]]))


def test_wudi_adam_is_torch_adam() -> None:
    # The written-out update against torch.optim.Adam itself (single-tensor CPU path), 30 steps.
    generator = torch.Generator().manual_seed(3)
    taus = [torch.randn(3, 4, generator=generator) for _ in range(3)]
    gradient = WudiGradient(taus)
    ours = adam_steps(taus[0] + taus[1] + taus[2], gradient, steps=30, lr=1e-2)
    param = (taus[0] + taus[1] + taus[2]).clone()
    optimizer = torch.optim.Adam([param], lr=1e-2, foreach=False)
    for _ in range(30):
        param.grad = gradient(param)
        optimizer.step()
    assert torch.equal(ours, param)


def test_wudi_converges_to_the_closed_form_optimum() -> None:
    # 1×2 case: the minimiser (1, 1) (derived above); Adam with lr 1e-2 for 1000 steps gets there.
    assert_close(wudi_matrix([f64(W1), f64(W2)], steps=1000, lr=1e-2), f64([[1, 1]]), atol=1e-6)
    # A 2×3 case with three experts: ∇L = 0 ⇔ τ_m A = B, A = Σ τ_iᵀτ_i/n_i (3×3, invertible here), so the
    # minimiser is B A⁻¹; compare with a solve written from the definition (not the module's precomputation).
    generator = torch.Generator().manual_seed(0)
    taus = [torch.randn(2, 3, generator=generator, dtype=torch.float64) for _ in range(3)]
    a = sum(tau.T @ tau / tau.square().sum() for tau in taus)
    b = sum(tau @ tau.T @ tau / tau.square().sum() for tau in taus)
    optimum = torch.linalg.solve(a.T, b.T).T  # X A = B
    for form in ("gram", "stacked"):
        assert_close(wudi_matrix(taus, steps=3000, lr=1e-2, form=form), optimum, atol=1e-6)


def test_wudi_matches_fusionbench_formulation_with_autograd() -> None:
    # FB: τ_m = Parameter(Σ τ_i); loss Σ (((τ_m − τ_i) τ_iᵀ)² / ‖τ_i‖²) by autograd; torch.optim.Adam(lr).
    generator = torch.Generator().manual_seed(1)
    taus = [torch.randn(4, 3, generator=generator) * 0.1 for _ in range(3)]
    stacked = torch.stack(taus)
    param = torch.nn.Parameter(stacked.sum(dim=0).clone())
    optimizer = torch.optim.Adam([param], lr=1e-3, weight_decay=0)
    norms = torch.norm(stacked.reshape(3, -1), p=2, dim=-1).square()
    for _ in range(40):
        loss = (torch.matmul(param.unsqueeze(0) - stacked, stacked.transpose(1, 2)).square()
                / norms.view(-1, 1, 1)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for form in ("gram", "stacked"):
        torch.testing.assert_close(wudi_matrix(taus, steps=40, lr=1e-3, form=form), param.detach(),
                                   atol=1e-6, rtol=1e-5)


def test_wudi_one_expert_and_orthogonal_experts_stay_at_the_sum() -> None:
    # One expert: τ_m = τ_1 gives (τ_m − τ_1) = 0 → ∇L = 0 exactly → Adam never moves: θ = θ0 + τ_1.
    base = {"w": f64([[1, 2], [3, 4]])}
    tau = f64([[0.5, -1.5], [2.0, 0.25]])
    merged = wudi_merge(base, [{"w": base["w"] + tau}], steps=50, lr=0.1)
    assert torch.equal(merged["w"], base["w"] + tau)
    # Row-orthogonal experts: τ_1 = [[1, 1], [0, 0]], τ_2 = [[1, −1], [0, 0]]: τ_1 τ_2ᵀ = 0, so
    # (τ_m − τ_i) τ_iᵀ = τ_j τ_iᵀ = 0 at the start Σ τ_i = [[2, 0], [0, 0]] → it is optimal and stays.
    experts = [{"w": f64([[1, 1], [0, 0]])}, {"w": f64([[1, -1], [0, 0]])}]
    for form in ("gram", "stacked"):
        taus = [expert["w"] for expert in experts]
        assert torch.equal(WudiGradient(taus, form)(taus[0] + taus[1]), torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(wudi_merge(zeros_like_all(experts), experts, steps=50, lr=0.1)["w"], f64([[2, 0], [0, 0]]))


def test_wudi_zero_experts_and_other_tensors() -> None:
    base = {
        "w": torch.zeros(2, 2),
        "b": torch.tensor([1.0, 1.0]),
        "s": torch.tensor(0.5),
        "k": torch.zeros(1, 1, 2, 2),
        "ids": torch.tensor([5, 6]),
    }
    experts = [
        {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([2.0, 3.0]), "s": torch.tensor(1.5),
         "k": torch.full((1, 1, 2, 2), 2.0), "ids": torch.tensor([0, 0])},
        {"w": torch.zeros(2, 2), "b": torch.tensor([0.0, 7.0]), "s": torch.tensor(-0.5),
         "k": torch.full((1, 1, 2, 2), 4.0), "ids": torch.tensor([0, 0])},
    ]
    merged = wudi_merge(base, experts, steps=20, lr=0.1)
    # w: τ_2 = 0 is left out of the loss (FB: 0/0 = NaN); with τ_1 alone the start Σ τ_i = τ_1 is optimal.
    assert torch.equal(merged["w"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # Non-2-D tensors: mean τ. b: τ = (1, 2), (−1, 6) → (0, 4) → θ = (1, 5). s: (1 − 1)/2 = 0 → 0.5.
    # k (4-D): (2 + 4)/2 = 3. Integer buffers from the base.
    assert torch.equal(merged["b"], torch.tensor([1.0, 5.0]))
    assert merged["s"].item() == 0.5
    assert torch.equal(merged["k"], torch.full((1, 1, 2, 2), 3.0))
    assert torch.equal(merged["ids"], torch.tensor([5, 6]))
    # All experts zero on a matrix: it stays at θ0.
    zero = wudi_merge({"w": torch.ones(2, 3)}, [{"w": torch.ones(2, 3)}] * 2, steps=5, lr=0.1)
    assert torch.equal(zero["w"], torch.ones(2, 3))


def test_wudi_params() -> None:
    defaults = WudiParams()
    assert (defaults.steps, defaults.lr) == (400, 1e-5)
    with pytest.raises(BenchError, match=r"^wudi\.steps=-1 is outside \[0, None\]$"):
        build_params("wudi", WudiParams, {"steps": "-1"})
    with pytest.raises(BenchError, match=r"^wudi\.lr='fast' is not a valid float; default is 1e-05$"):
        build_params("wudi", WudiParams, {"lr": "fast"})


# ----------------------------------------------------------------------------------------------------------
# Registered adapters


@pytest.mark.parametrize("name", ["star", "drm", "wudi"])
def test_registered_methods_run_with_defaults_deterministically(name: str) -> None:
    from toy_plugin import ToyParams, ToyProblem

    problem = ToyProblem(ToyParams())
    before = {key: value.clone() for key, value in problem.pretrained().items()}
    experts_before = [{key: value.clone() for key, value in e.items()} for e in problem.experts()]
    spec = get_method(name)
    params = build_params(name, spec.params, {})

    def run(seed: int) -> StateDict:
        context = MergeContext(problem=problem, seed=seed, device=torch.device("cpu"),
                               generator=torch.Generator().manual_seed(seed))
        return spec.fn(context, params)

    merged = run(0)
    assert merged.keys() == before.keys()
    for key, value in merged.items():
        assert value.dtype == before[key].dtype and value.shape == before[key].shape
        assert torch.isfinite(value).all()
    # The toy's experts differ from the base, so the merge moves the weights.
    assert not torch.equal(merged["w"], before["w"])
    # No randomness: the same bits again, and for another seed.
    for seed in (0, 1):
        again = run(seed)
        assert all(torch.equal(again[key], merged[key]) for key in merged)
    for key, value in problem.pretrained().items():
        assert torch.equal(value, before[key])
    for expert, saved in zip(problem.experts(), experts_before, strict=True):
        assert all(torch.equal(expert[key], saved[key]) for key in saved)


def test_spectral_methods_keep_half_precision_dtypes() -> None:
    generator = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(3, 4, generator=generator).to(torch.float16), "b": torch.zeros(3, dtype=torch.float16)}
    experts = [{key: (value.float() + 0.1 * torch.randn(value.shape, generator=generator)).to(torch.float16)
                for key, value in base.items()} for _ in range(2)]
    outputs = [
        star_merge(base, experts, eta=40.0, scaling=1.0),
        drm_merge(base, experts, drop_rate=0.8, direction="vertical", coefficient=1.0),
        wudi_merge(base, experts, steps=10, lr=1e-5),
    ]
    for merged in outputs:
        assert all(merged[key].dtype == torch.float16 and torch.isfinite(merged[key]).all() for key in base)
    assert math.isfinite(float(outputs[0]["w"].float().sum()))
