"""Our data-free merges against FusionBench 0.2.33 and mergekit 0.1.5 on the same CLIP ViT-B/32-shaped inputs.

Run with ``tox -e peers`` (the peers are installed in that env only). Inputs: :mod:`clip_inputs` (θ0 and K = 5
experts with task-vector scales 0.5 … 4.2, two transformer blocks plus embeddings and LayerNorms). Each test
names the peer function it calls and the difference it checks. "Bit-identical" means ``torch.equal`` on every
tensor. "Within rounding" means, per entry, |ours − peer| ≤ ε·(2|peer| + (K+2)·|λ|·Σ_i|τ_i|) with ε the fp32
machine epsilon: the error of summing K task vectors in another order, scaling and adding θ0 (the peers sum
with ``torch.sum`` / Python ``sum``, we with matrix products or numpy). SVD-based methods use stated relative
tolerances. A documented difference is tested as exactly that difference: the expected output is built from
the peer plus that difference (or from ours with the peer's rule), and every other entry must agree.
"""

from __future__ import annotations

import math

import pytest
import torch
from clip_inputs import (
    BLOCKS,
    CANCEL_KEY,
    CANCEL_POSITIONS,
    TIE_KEY,
    TIE_POSITIONS,
    StateDict,
    clip_module,
    fusion_bench_pool,
)
from peer_calls import (
    fb_consensus,
    fb_dare_task_arithmetic,
    fb_doge_ta,
    fb_iso_c,
    fb_iso_cts,
    fb_magmax,
    fb_model_stock,
    fb_simple_average,
    fb_slerp,
    fb_tall_masks,
    fb_task_arithmetic,
    fb_ties,
    fb_tsv,
    fb_wudi,
    mk_merge,
    quiet,
)

from bench.selection import keep_count
from methods.consensus import consensus_merge
from methods.dare import dare_ta_merge, dare_ties_merge
from methods.iso import iso_c_merge, iso_cts_merge, subspace_sizes
from methods.task_arithmetic import task_arithmetic_merge
from methods.ties import ties_merge
from methods.tsv import tsv_merge
from methods.weight_averaging import weight_average

EPS = torch.finfo(torch.float32).eps
LAMBDA = 0.3


# ------------------------------------------------------------------------------------------------------------
# Helpers


def assert_identical(ours: StateDict, peer: StateDict) -> None:
    assert set(ours) == set(peer)
    for key in sorted(ours):
        assert ours[key].dtype == peer[key].dtype and ours[key].shape == peer[key].shape, key
        if not torch.equal(ours[key], peer[key]):
            count = int((ours[key] != peer[key]).sum())
            worst = float((ours[key] - peer[key]).abs().max())
            raise AssertionError(f"{key}: {count} entries differ (max |diff| {worst:.3g})")


_ABS_SUM_CACHE: dict[int, StateDict] = {}


def rounding_bound(base: StateDict, experts, scaling: float, peer: StateDict) -> StateDict:
    """Per entry: ε·(2|peer| + (K+2)·|λ|·Σ_i|τ_i|) (see the module docstring). Σ_i|τ_i| is cached per input set."""
    magnitude = _ABS_SUM_CACHE.get(id(base))
    if magnitude is None:
        magnitude = _ABS_SUM_CACHE[id(base)] = {
            key: sum((expert[key] - base[key]).abs() for expert in experts) for key in base
        }
    count = len(experts)
    return {key: EPS * (2 * peer[key].abs() + (count + 2) * abs(scaling) * magnitude[key]) for key in base}


def beyond(ours: StateDict, expected: StateDict, bound: StateDict) -> dict[str, torch.Tensor]:
    """Key -> bool mask of the entries where |ours − expected| exceeds the bound."""
    return {key: (ours[key] - expected[key]).abs() > bound[key] for key in ours}


def assert_within(ours: StateDict, expected: StateDict, bound: StateDict) -> None:
    assert set(ours) == set(expected)
    for key, mask in beyond(ours, expected, bound).items():
        if mask.any():
            worst = float((ours[key] - expected[key]).abs().max())
            raise AssertionError(f"{key}: {int(mask.sum())} entries beyond rounding (max |diff| {worst:.3g})")


def task_vector_rows(base: StateDict, experts) -> torch.Tensor:
    """[K, N] task vectors flattened in sorted-key order (FusionBench's ``state_dict_to_vector`` order)."""
    keys = sorted(base)
    return torch.stack([torch.cat([(expert[key] - base[key]).reshape(-1) for key in keys]) for expert in experts])


def flatten(state_dict: StateDict) -> torch.Tensor:
    return torch.cat([state_dict[key].reshape(-1) for key in sorted(state_dict)])


def kth_largest(values: torch.Tensor, k: int) -> float:
    return float(values.kthvalue(values.numel() - k + 1).values)


def disjoint_value(tau: list[torch.Tensor], sign: int, merge: str) -> torch.Tensor:
    """TIES' disjoint merge of the given (trimmed) entries at a given elected sign."""
    stacked = torch.stack(tau)
    agreeing = stacked * (stacked.sign() == sign)
    total = agreeing.sum(0)
    return total / (agreeing != 0).sum(0).clamp(min=1) if merge == "mean" else total


def relative_error(ours: StateDict, peer: StateDict, base: StateDict) -> dict[str, float]:
    """Per tensor ‖ours − peer‖_F / ‖peer − θ0‖_F (the error relative to the merged update)."""
    return {key: float((ours[key] - peer[key]).norm() / (peer[key] - base[key]).norm().clamp(min=1e-30))
            for key in ours}


# ------------------------------------------------------------------------------------------------------------
# Weight averaging and task arithmetic: the same arithmetic in the same order


def test_weight_averaging_equals_fusionbench_simple_average(clip):
    """FusionBench ``method.simple_average.simple_average(state_dicts)`` (``state_dict_avg``: zeros + Σ θ_i,
    then / K): bit-identical to ``weight_average``."""
    base, experts = clip
    assert_identical(weight_average(base, experts), fb_simple_average(experts))


def test_weight_averaging_equals_mergekit_linear(clip):
    """mergekit ``linear`` (``merge_state_dicts``, weight 1 each, normalize): bit-identical."""
    base, experts = clip
    assert_identical(weight_average(base, experts), mk_merge("linear", None, experts, weight=1.0))


def test_task_arithmetic_equals_fusionbench(clip):
    """FusionBench ``TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)`` on ``CLIPVisionModel``s:
    bit-identical to ``task_arithmetic_merge``."""
    base, experts = clip
    ours = task_arithmetic_merge(base, experts, scaling=LAMBDA)
    assert_identical(ours, fb_task_arithmetic(base, experts, LAMBDA, BLOCKS))


def test_task_arithmetic_equals_mergekit(clip):
    """mergekit ``task_arithmetic`` (weight 1 each, ``lambda`` 0.3, base = θ0): bit-identical."""
    base, experts = clip
    ours = task_arithmetic_merge(base, experts, scaling=LAMBDA)
    assert_identical(ours, mk_merge("task_arithmetic", base, experts, weight=1.0, **{"lambda": LAMBDA}))


# ------------------------------------------------------------------------------------------------------------
# TIES


def test_ties_fusionbench_keeps_one_more_entry_per_task(clip_cancel):
    """FusionBench ``TiesMergingAlgorithm(threshold=k, merge_func="sum", scaling_factor=0.3).run(pool)`` (global
    trim: ``topk_values_mask`` keeps |τ| ≥ the (n+1)-th largest magnitude, n = int(N·k/100); our docstring: we keep
    ≥ the n-th). k ≈ 20.00001 is put at the end of a run of tied magnitudes of task 0 (with ties at the n-th value
    both rules keep the same set, and real task vectors, differences of fp32 weights, have many ties), so the
    difference is really exercised. Checked exactly as that difference:

    1. FusionBench(k) equals ours with the trim at n + 1 (``keep_count(N, k') = n + 1``) within rounding,
       planted zero-sum entries included (both give them the model-wide majority sign);
    2. FusionBench(k) and ours(k) differ beyond rounding somewhere, and only at entries of a task vector equal to
       its (n+1)-th largest magnitude where that is strictly below its n-th."""
    base, experts = clip_cancel
    rows = task_vector_rows(base, experts).abs_()
    total = rows.shape[1]
    value = kth_largest(rows[0], keep_count(total, 20))
    kept = int((rows[0] >= value).sum())  # the last entry of the tie group: the (kept+1)-th is strictly smaller
    k = (kept + 0.5) * 100 / total
    k_plus_one = (kept + 1.5) * 100 / total
    assert keep_count(total, k) == kept == int(total * (k / 100)) and keep_count(total, k_plus_one) == kept + 1
    extra = torch.zeros(total, dtype=torch.bool)
    for row in rows:
        nth, next_one = kth_largest(row, kept), kth_largest(row, kept + 1)
        if next_one < nth:
            extra |= row == next_one
    del rows

    peer = fb_ties(base, experts, k=k, merge="sum", scaling=LAMBDA, blocks=BLOCKS)
    bound = rounding_bound(base, experts, LAMBDA, peer)
    notes: dict = {}
    ours_plus_one = ties_merge(base, experts, k=k_plus_one, trim_scope="global", merge="sum", scaling=LAMBDA,
                               notes=notes)
    assert notes["ties_cancelled_entries"] >= len(CANCEL_POSITIONS)
    assert_within(ours_plus_one, peer, bound)
    del ours_plus_one
    ours = ties_merge(base, experts, k=k, trim_scope="global", merge="sum", scaling=LAMBDA)
    differing = flatten(beyond(ours, peer, bound))
    assert differing.any(), "the extra kept entries should change the merge somewhere"
    assert not (differing & ~extra).any(), "ours and FusionBench differ away from FusionBench's extra entries"


_TRIM_CACHE: dict[int, tuple[list[StateDict], dict[str, list[float]]]] = {}


def _ours_per_tensor_trim(base: StateDict, experts, k: float) -> tuple[list[StateDict], dict[str, list[float]]]:
    """Our per-tensor trim rule, written out: keep |τ_i| ≥ t_i, t_i the n-th largest |τ_i| of the tensor,
    n = keep_count(numel, k). Returns the masks and thresholds (cached per input set: two tests use them)."""
    cached = _TRIM_CACHE.get(id(base))
    if cached is None:
        masks: list[StateDict] = [{} for _ in experts]
        thresholds: dict[str, list[float]] = {}
        for key in base:
            n = keep_count(base[key].numel(), k)
            thresholds[key] = []
            for index, expert in enumerate(experts):
                magnitude = (expert[key] - base[key]).abs()
                threshold = kth_largest(magnitude.reshape(-1), n)
                thresholds[key].append(threshold)
                masks[index][key] = magnitude >= threshold
        cached = _TRIM_CACHE[id(base)] = (masks, thresholds)
    return cached


def test_ties_per_tensor_trim_vs_mergekit_magnitude(clip_cancel):
    """mergekit ``sparsify.magnitude(τ, density=0.2)`` (its TIES trim) against our per-tensor trim rule: mergekit
    keeps exactly n = int(0.2·numel) entries per tensor (``argsort`` breaks ties), we keep every entry with
    |τ| ≥ the n-th largest. Its kept set must be inside ours, and ours may hold extra entries only where |τ_i|
    equals our threshold; there are some (task vectors are differences of fp32 weights, so magnitudes repeat)."""
    from mergekit.sparsify import magnitude

    base, experts = clip_cancel
    masks, thresholds = _ours_per_tensor_trim(base, experts, 20)
    tie_extras = 0
    for key in base:
        assert keep_count(base[key].numel(), 20) == int(0.2 * base[key].numel())
        for index, expert in enumerate(experts):
            tau = expert[key] - base[key]
            theirs = magnitude(tau, density=0.2) != 0
            ours_kept = masks[index][key] & (tau != 0)
            assert not (theirs & ~ours_kept).any(), key
            extra = ours_kept & ~theirs
            assert ((tau.abs() == thresholds[key][index]) | ~extra).all(), key
            tie_extras += int(extra.sum())
    assert tie_extras > 0, "the inputs should exercise the tie rule"


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_ties_per_tensor_vs_mergekit(clip_cancel, merge):
    """mergekit ``ties`` (``merge_state_dicts``: ``get_mask(..., "sum")``, weight 1 each, normalize = (merge ==
    mean), ``lambda`` 0.3) against ours with ``trim_scope="per_tensor"``, k = 20. Both documented differences are
    built into the expected output: (1) the trim, checked in the test above, by giving mergekit OUR trimmed task
    vectors (density 1: it trims nothing more); (2) the election where the trimmed values sum to exactly 0 (the
    planted entries): mergekit elects + (``>= 0``), we the model-wide majority sign (−1 here), so the expected
    output has the disjoint merge at our majority sign there. Ours must equal it within rounding; on the planted
    entries mergekit's own ties (density 0.2) gives θ0 + 0.3·0.25 and ours θ0 − 0.3·0.25."""
    base, experts = clip_cancel
    masks, _ = _ours_per_tensor_trim(base, experts, 20)
    notes: dict = {}
    ours = ties_merge(base, experts, k=20, trim_scope="per_tensor", merge=merge, scaling=LAMBDA, notes=notes)
    majority = notes["ties_majority_sign"]
    assert majority == -1, "the planted zero-sum entries are only a difference when the majority sign is −1"

    zeros = {key: torch.zeros_like(value) for key, value in base.items()}
    trimmed = [{key: (expert[key] - base[key]) * masks[index][key] for key in base}
               for index, expert in enumerate(experts)]
    merged = mk_merge("ties", zeros, trimmed, weight=1.0, density=1.0, normalize=merge == "mean",
                      **{"lambda": LAMBDA})
    expected = {key: base[key] + merged[key] for key in base}
    zero_sum_entries = 0
    for key in base:
        values = [tau[key] for tau in trimmed]
        stacked = torch.stack(values)
        cancelled = (stacked.sum(0) == 0) & (stacked != 0).any(0)
        if cancelled.any():
            zero_sum_entries += int(cancelled.sum())
            at_majority = base[key] + LAMBDA * disjoint_value(values, majority, merge)
            expected[key] = torch.where(cancelled, at_majority, expected[key])
    assert zero_sum_entries == notes["ties_cancelled_entries"] >= len(CANCEL_POSITIONS)
    assert_within(ours, expected, rounding_bound(base, experts, LAMBDA, expected))

    positions = torch.tensor(CANCEL_POSITIONS)
    planted = [{CANCEL_KEY: model[CANCEL_KEY]} for model in (base, *experts)]
    theirs = mk_merge("ties", planted[0], planted[1:], weight=1.0, density=0.2, normalize=merge == "mean",
                      **{"lambda": LAMBDA})
    torch.testing.assert_close(theirs[CANCEL_KEY][positions], torch.full((4,), 0.5 + LAMBDA * 0.25))
    torch.testing.assert_close(ours[CANCEL_KEY][positions], torch.full((4,), 0.5 - LAMBDA * 0.25))


# ------------------------------------------------------------------------------------------------------------
# DARE: masks come from different random streams, so compare p = 0 exactly and p > 0 by what is comparable


@pytest.mark.parametrize("rescale", ["l1", "inverse_keep"])
def test_dare_p0_equals_mergekit_dare_linear(clip, rescale):
    """mergekit ``dare_linear`` with density 1 (``sparsify.bernoulli`` returns τ unchanged; weight 1, ``lambda``
    0.3): bit-identical to our ``dare_ta`` with p = 0 (every entry kept, L1 or 1/(1−p) scale exactly 1), which is
    bit-identical to task arithmetic."""
    base, experts = clip
    ours = dare_ta_merge(base, experts, p=0.0, rescale=rescale, scaling=LAMBDA, seed=0)
    assert_identical(ours, task_arithmetic_merge(base, experts, scaling=LAMBDA))
    assert_identical(ours, mk_merge("dare_linear", base, experts, weight=1.0, density=1.0, **{"lambda": LAMBDA}))


def test_dare_ties_p0_vs_mergekit_dare_ties(clip_cancel):
    """mergekit ``dare_ties`` with density 1 (no drop; its TIES has no magnitude trim: sign election ``>= 0`` and a
    disjoint sum, weight 1, ``lambda`` 0.3) against our ``dare_ties`` with p = 0 and k = 100 (nothing dropped or
    trimmed), dis-sum. The one documented difference: exact zero sums (the planted entries) get our model-wide
    majority sign instead of +. Expected = mergekit with those entries replaced; within rounding elsewhere."""
    base, experts = clip_cancel
    notes: dict = {}
    ours = dare_ties_merge(base, experts, p=0.0, rescale="inverse_keep", k=100.0, trim_scope="global",
                           merge="sum", scaling=LAMBDA, seed=0, notes=notes)
    theirs = mk_merge("dare_ties", base, experts, weight=1.0, density=1.0, **{"lambda": LAMBDA})
    majority = notes["ties_majority_sign"]
    expected = dict(theirs)
    replaced = 0
    for key in base:
        values = [expert[key] - base[key] for expert in experts]
        stacked = torch.stack(values)
        cancelled = (stacked.sum(0) == 0) & (stacked != 0).any(0)
        if cancelled.any():
            replaced += int(cancelled.sum())
            expected[key] = torch.where(cancelled, base[key] + LAMBDA * disjoint_value(values, majority, "sum"),
                                        theirs[key])
    assert replaced == notes["ties_cancelled_entries"] >= len(CANCEL_POSITIONS)
    if majority < 0:
        positions = torch.tensor(CANCEL_POSITIONS)
        assert (ours[CANCEL_KEY][positions] != theirs[CANCEL_KEY][positions]).all()
    assert_within(ours, expected, rounding_bound(base, experts, LAMBDA, expected))


def test_dare_p0_fusionbench_drops_its_exact_zero_draws(clip):
    """FusionBench ``DareTaskArithmetic(sparsity_ratio=0, rescale=True, only_on_linear_weights=False,
    scaling_factor=0.3).run(pool)`` keeps an entry iff ``torch.rand_like(param) > 0``, so even p = 0 drops the
    entries whose uniform draw is exactly 0.0 (probability 2^-24 each: a handful per 83M draws). Replaying its
    draws (global RNG, seed 1, model by model, ``parameters()`` order) gives those entries; the expected output is
    our p = 0 (= task arithmetic) with exactly those task-vector entries set to 0. Bit-identical."""
    base, experts = clip
    seed = 1
    peer = fb_dare_task_arithmetic(base, experts, p=0.0, scaling=LAMBDA, blocks=BLOCKS, seed=seed)
    torch.manual_seed(seed)
    dropped_experts, dropped = [], 0
    for expert in experts:
        module = clip_module(expert, BLOCKS)
        copy = dict(expert)
        for name, parameter in module.named_parameters():
            zero_draw = torch.rand_like(parameter) <= 0.0
            if zero_draw.any():
                dropped += int(zero_draw.sum())
                copy[name] = torch.where(zero_draw, base[name], expert[name])
        dropped_experts.append(copy)
    assert dropped > 0, "seed 1 draws some exact zeros"
    ours = dare_ta_merge(base, experts, p=0.0, rescale="inverse_keep", scaling=LAMBDA, seed=0)
    assert not all(torch.equal(ours[key], peer[key]) for key in ours)
    assert_identical(task_arithmetic_merge(base, dropped_experts, scaling=LAMBDA), peer)


def _keep_fraction_ok(kept: int, total: int, p: float) -> bool:
    """Within 6 binomial standard deviations of (1 − p)·total."""
    return abs(kept - (1 - p) * total) <= 6 * math.sqrt(total * p * (1 - p)) + 1


def test_dare_random_matches_fusionbench_inverse_keep(clip):
    """FusionBench ``DareTaskArithmetic(sparsity_ratio=0.5, rescale=True)`` and our ``dare_ta(p=0.5,
    rescale="inverse_keep")`` on one expert (K = 1): masks come from different random streams, so compare what is
    comparable — every merged entry is either θ0 (dropped) or exactly θ0 + 0.3·(τ/(1 − p)) (kept; the same fp32
    value in both), and each tensor keeps a fraction consistent with 1 − p."""
    base, experts = clip
    expert = [experts[3]]
    p = 0.5
    outputs = {
        "fusionbench": fb_dare_task_arithmetic(base, expert, p=p, scaling=LAMBDA, blocks=BLOCKS, seed=2),
        "ours": dare_ta_merge(base, expert, p=p, rescale="inverse_keep", scaling=LAMBDA, seed=2),
    }
    for name, merged in outputs.items():
        for key in base:
            kept_value = base[key] + (expert[0][key] - base[key]) / (1 - p) * LAMBDA
            dropped, kept = merged[key] == base[key], merged[key] == kept_value
            assert (dropped | kept).all(), f"{name}: {key}"
            informative = kept_value != base[key]
            assert _keep_fraction_ok(int((kept & informative).sum()), int(informative.sum()), p), f"{name}: {key}"
    assert not all(torch.equal(outputs["ours"][key], outputs["fusionbench"][key]) for key in base)


def test_dare_random_l1_rescale_matches_mergekit(clip):
    """mergekit ``dare_linear`` (density 0.5: ``sparsify.bernoulli`` + ``rescaled_masked_tensor`` with the L1
    norm) and our ``dare_ta(p=0.5, rescale="l1")`` on one expert (K = 1): in both, each tensor keeps a fraction
    consistent with 1 − p, the kept entries are τ times ONE factor per tensor, and that factor restores the
    tensor's L1 norm (relative 1e-5: mergekit sums in fp32, we in fp64)."""
    base, experts = clip
    expert = [experts[2]]
    p = 0.5
    torch.manual_seed(3)
    outputs = {
        "mergekit": mk_merge("dare_linear", base, expert, weight=1.0, density=1 - p, **{"lambda": 1.0}),
        "ours": dare_ta_merge(base, expert, p=p, rescale="l1", scaling=1.0, seed=3),
    }
    for name, merged in outputs.items():
        for key in base:
            tau = expert[0][key].double() - base[key].double()
            delta = merged[key].double() - base[key].double()
            kept = delta != 0
            assert _keep_fraction_ok(int(kept.sum()), tau.numel(), p), f"{name}: {key}"
            factor = delta[kept] / tau[kept]
            # |delta| is exact to fp32 rounding of θ0 + c·τ: relative error ~ε·|θ0|/|τ|
            slack = float((EPS * 4 * base[key].abs()[kept] / tau[kept].abs()).max())
            assert float((factor - factor.median()).abs().max()) <= slack * float(factor.median()), f"{name}: {key}"
            assert abs(float(delta.abs().sum() / tau.abs().sum()) - 1) < 1e-5, f"{name}: {key}"


# ------------------------------------------------------------------------------------------------------------
# Consensus TA (TALL masks)


def _consensus_case(models, tall_lambda: float):
    base, experts = models
    ours = consensus_merge(base, experts, k=2, tall_lambda=tall_lambda, scaling=LAMBDA)
    peer = fb_consensus(base, experts, k=2, tall_lambda=tall_lambda, scaling=LAMBDA)
    return base, experts, ours, peer


def _near_boundary(base: StateDict, experts, tall_lambda: float) -> dict[str, torch.Tensor]:
    """Entries where some task's TALL-mask comparison |τ_t| vs λ_t·|Σ τ − τ_t| is decided within rounding: there
    FusionBench's weight-space form |θ0 − θ_t| > λ_t·|θ0 + Σ τ − θ_t| and our ≥ on task vectors may disagree."""
    near = {}
    for key in base:
        taus = [expert[key] - base[key] for expert in experts]
        total = sum(taus)
        flags = torch.zeros_like(base[key], dtype=torch.bool)
        for tau, expert in zip(taus, experts, strict=True):
            left, right = tau.abs(), tall_lambda * (total - tau).abs()
            scale = base[key].abs() + total.abs() + expert[key].abs()
            flags |= (left - right).abs() <= 8 * EPS * scale
        near[key] = flags
    return near


def test_consensus_matches_fusionbench_tall_masks(clip):
    """FusionBench ``tall_mask.utils.generate_task_masks`` (λ_t = 0.6) + the consensus rule of
    ``construct_consensus_mask`` (Σ masks ≥ 2) + θ0 + 0.3·(mask ⊙ Σ τ): equal to ``consensus_merge`` within
    rounding, except where a mask comparison is decided within rounding (FusionBench compares in weight space,
    |θ0 + Σ τ − θ_t|, we on task vectors)."""
    base, experts, ours, peer = _consensus_case(clip, 0.6)
    near = _near_boundary(base, experts, 0.6)
    for key, mask in beyond(ours, peer, rounding_bound(base, experts, LAMBDA, peer)).items():
        assert not (mask & ~near[key]).any(), key


def test_consensus_ge_versus_fusionbench_gt_on_exact_ties(clip_tall_ties):
    """The documented difference, ≥ (ours, the method facts) vs > (TALL-mask code), with the same FusionBench
    functions as above and λ_t = 0.5: at the planted entries (θ0 = 1, τ = (0.25, 0.5, 0, 0, 0)) task 0 sits
    exactly on the boundary (0.25 = 0.5·0.5, exact in fp32 in both forms), so our count is 2 (kept:
    θ = 1 + 0.3·0.75) and FusionBench's is 1 (dropped: θ = θ0). Elsewhere in the two tensors compared: as above."""
    base, experts = clip_tall_ties
    keys = (TIE_KEY, "encoder.layers.0.self_attn.q_proj.weight")
    models = ({key: base[key] for key in keys}, [{key: expert[key] for key in keys} for expert in experts])
    base, experts, ours, peer = _consensus_case(models, 0.5)
    positions = torch.tensor(TIE_POSITIONS)
    assert torch.equal(peer[TIE_KEY][positions], torch.ones(len(TIE_POSITIONS)))
    assert torch.equal(ours[TIE_KEY][positions], torch.full((len(TIE_POSITIONS),), 1.0 + LAMBDA * 0.75))
    near = _near_boundary(base, experts, 0.5)
    for key, mask in beyond(ours, peer, rounding_bound(base, experts, LAMBDA, peer)).items():
        assert not (mask & ~near[key]).any(), key


# ------------------------------------------------------------------------------------------------------------
# SVD methods: the same decompositions, composed in another order (stated relative tolerances)


def test_tsv_m_matches_fusionbench(clip_svd):
    """FusionBench ``TSVM_utils.compute_and_sum_svd_mem_reduction`` (+ θ0 + α·merged, α = 1), K = 5 (768 = 5·153
    + 3: three slots left zero in both): per tensor, ‖ours − FB‖_F ≤ 1e-5·‖FB − θ0‖_F. FusionBench's running
    mean on the non-matrix tensors and its ``multi_dot`` of the two polar factors differ from ours only by
    rounding (measured ~7e-7)."""
    base, experts = clip_svd
    errors = relative_error(tsv_merge(base, experts, alpha=1.0), fb_tsv(base, experts, alpha=1.0), base)
    assert max(errors.values()) <= 1e-5, errors


def test_tsv_m_fusionbench_rounds_slots_down():
    """The documented difference: FusionBench keeps int(r·(1/K)) components per task, which is below ⌊r/K⌋ for
    some r, K (r = K = 49: int(49·(1/49)) = int(0.999…) = 0). On a 49×64 matrix with 49 experts FusionBench's
    merged update is exactly 0 (θ = θ0) while ours keeps one component per task, so it is the full-rank
    decorrelated sum; on the 1-D tensor beside it both take the mean task vector."""
    generator = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(49, 64, generator=generator), "b": torch.randn(64, generator=generator)}
    experts = [{key: value + 0.01 * torch.randn(value.shape, generator=generator) for key, value in base.items()}
               for _ in range(49)]
    assert int(49 * (1 / 49)) == 0 and 49 // 49 == 1
    peer = fb_tsv(base, experts, alpha=1.0)
    ours = tsv_merge(base, experts, alpha=1.0)
    assert torch.equal(peer["w"], base["w"])
    assert float((ours["w"] - base["w"]).norm()) > 0.01
    assert relative_error({"b": ours["b"]}, {"b": peer["b"]}, base)["b"] <= 1e-5


def test_iso_c_matches_fusionbench(clip_svd):
    """FusionBench ``iso_utils.iso_c`` (+ θ0 + α·merged, α = 1): per tensor ‖ours − FB‖_F ≤ 1e-4·‖FB − θ0‖_F
    (FusionBench forms the matrix as (Σ τ / K)·K and multiplies ``U diag(mean S) V`` with ``multi_dot``;
    measured ~5e-6)."""
    base, experts = clip_svd
    errors = relative_error(iso_c_merge(base, experts, alpha=1.0), fb_iso_c(base, experts, alpha=1.0), base)
    assert max(errors.values()) <= 1e-4, errors


def test_iso_cts_matches_fusionbench(clip_svd):
    """FusionBench ``iso_utils.iso_cts`` (common_space_fraction 0.8, + θ0 + α·merged, α = 1): per tensor
    ‖ours − FB‖_F ≤ 1e-3·‖FB − θ0‖_F. Both use c = 613, s = 31 on 768 (K = 5) and c = 40, s = 2 on the 50-row
    position embedding; the projection U_c U_cᵀ τ is associated differently, and the top-s task-specific
    directions of a near-flat spectrum move with rounding (measured ~5e-5). The 3072×768 fc1 is left out here:
    its 8 SVDs per side cost a minute on two busy cores, and its path is the square one's."""
    base, experts = clip_svd
    keys = [key for key in base if "fc1" not in key]
    base, experts = {key: base[key] for key in keys}, [{key: expert[key] for key in keys} for expert in experts]
    assert subspace_sizes(768, 5, 0.8) == (613, 31) and subspace_sizes(50, 5, 0.8) == (40, 2)
    ours = iso_cts_merge(base, experts, alpha=1.0, common_space_fraction=0.8)
    errors = relative_error(ours, fb_iso_cts(base, experts, alpha=1.0, common_space_fraction=0.8), base)
    assert max(errors.values()) <= 1e-3, errors


def test_iso_cts_caps_task_directions_where_fusionbench_fails():
    """The documented generalisation: s = round((r − ⌊r·f⌋)/K) can exceed ⌊r/K⌋ (r = 13, K = 5, f = 0:
    round(2.6) = 3, 15 > 13 directions). FusionBench's ``iso_cts`` then gets a negative common size and fails on
    the slot assignment; ours caps s at ⌊r/K⌋ = 2 (c = 3) and returns a finite merge."""
    generator = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(13, 20, generator=generator)}
    experts = [{"w": base["w"] + 0.01 * torch.randn(13, 20, generator=generator)} for _ in range(5)]
    assert subspace_sizes(13, 5, 0.0) == (3, 2)
    with pytest.raises(RuntimeError), quiet():
        fb_iso_cts(base, experts, alpha=1.0, common_space_fraction=0.0)
    ours = iso_cts_merge(base, experts, alpha=1.0, common_space_fraction=0.0)
    assert torch.isfinite(ours["w"]).all() and not torch.equal(ours["w"], base["w"])


def test_inputs_are_clip_vit_b32_shaped(clip):
    """The inputs carry the tower's real names and shapes (HF ``CLIPVisionModel``, ViT-B/32)."""
    base, experts = clip
    assert base["embeddings.patch_embedding.weight"].shape == (768, 3, 32, 32)
    assert base["embeddings.position_embedding.weight"].shape == (50, 768)
    assert base["encoder.layers.1.mlp.fc1.weight"].shape == (3072, 768)
    assert len(experts) == 5
    norms = [float((expert["encoder.layers.0.mlp.fc2.weight"] - base["encoder.layers.0.mlp.fc2.weight"]).norm())
             for expert in experts]
    assert norms == sorted(norms) and norms[-1] > 5 * norms[0]  # the experts' task vectors have varied scales
    assert fusion_bench_pool(base, experts[:1], BLOCKS).model_names == ["task_0"]


# ------------------------------------------------------------------------------------------------------------
# Wave-2 methods with a peer implementation


def test_model_stock_equals_fusionbench(clip):
    """FusionBench ``ModelStock().run(pool)`` (K = 5: pairwise angles in degrees averaged, t = N cos / ((N−1) cos +
    1 + 1e-8)): bit-identical to ``model_stock_merge(cosine="mean_angle")``, as its docstring claims."""
    from methods.model_stock import model_stock_merge

    base, experts = clip
    assert_identical(model_stock_merge(base, experts, cosine="mean_angle"), fb_model_stock(base, experts, BLOCKS))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_mergekit(clip, filter_wise):
    """mergekit ``model_stock`` (mean of the pairwise cosines; ``filter_wise`` per row): bit-identical to
    ``model_stock_merge(cosine="mean_cosine", filter_wise=...)``, as its docstring claims."""
    from methods.model_stock import model_stock_merge

    base, experts = clip
    ours = model_stock_merge(base, experts, cosine="mean_cosine", filter_wise=filter_wise)
    assert_identical(ours, mk_merge("model_stock", base, experts, filter_wise=filter_wise))


def test_magmax_equals_fusionbench(clip_cancel):
    """FusionBench ``MagMaxAlgorithm(scaling_factor=0.5).run(pool)``: bit-identical to ``magmax_merge(scaling=0.5)``.
    The planted entries have |τ_0| = |τ_1| = 0.25 with opposite signs: both keep the LATER task's −0.25
    (θ = 0.5 − 0.5·0.25)."""
    from methods.magmax import magmax_merge

    base, experts = clip_cancel
    ours = magmax_merge(base, experts, scaling=0.5)
    assert_identical(ours, fb_magmax(base, experts, scaling=0.5, blocks=BLOCKS))
    positions = torch.tensor(CANCEL_POSITIONS)
    assert torch.equal(ours[CANCEL_KEY][positions], torch.full((len(CANCEL_POSITIONS),), 0.375))


def _slerp_pair(clip):
    """Experts 0 and 4 (task-vector scales 0.5 and 4.2): their raw weights are ~12° apart on the 0.02-scale
    tensors (slerp proper) and nearly parallel on the LayerNorm weights (|cos| > 0.9995: LERP)."""
    base, experts = clip
    first, second = experts[0], experts[4]
    cosines = {key: float(torch.nn.functional.cosine_similarity(first[key].reshape(1, -1),
                                                                second[key].reshape(1, -1)))
               for key in base}
    assert min(cosines.values()) < 0.9995 < max(cosines.values()), "both branches should be exercised"
    return base, first, second


def test_slerp_equals_fusionbench(clip):
    """FusionBench ``slerp.slerp_on_state_dicts(t=0.3, θ_a, θ_b)`` (two models, raw weights, one angle per tensor,
    LERP above |cos| 0.9995): bit-identical to ``slerp_merge(base, [θ_a, θ_b], t=0.3)`` (t ≠ 0.5, so swapping the
    two models would show)."""
    from methods.slerp import slerp_merge

    base, first, second = _slerp_pair(clip)
    assert_identical(slerp_merge(base, [first, second], t=0.3), fb_slerp(first, second, t=0.3))


def test_slerp_matches_mergekit(clip):
    """mergekit ``slerp`` (base = θ_a, the other θ_b, t = 0.3): per tensor, |ours − mergekit| ≤ 2e-5·max(|θ_a|,
    |θ_b|) over the tensor. Measured: 0 on the 768-entry vectors, ~2e-6 on the 589,824-entry attention matrices,
    ~1.4e-5 on the 2.4M-entry MLP and patch kernels. NOT the 1e-6 (elementwise) our docstring states: that was
    measured on small tensors against mergekit @a6e4028 (numpy); mergekit 0.1.5 normalises with norms of 1M-entry
    chunk norms, while ours (= FusionBench, bit for bit) divides by one fp32 ``torch.linalg.norm`` of the whole
    tensor, which on 2.4M entries is ~3.6e-5 too small: the dot of the "unit" vectors comes out ~7e-5 too large,
    Ω ~3e-4 too small, the coefficients ~1e-5 off. Against a float64 slerp mergekit is ~10x closer than ours."""
    from methods.slerp import slerp_merge

    base, first, second = _slerp_pair(clip)
    ours = slerp_merge(base, [first, second], t=0.3)
    theirs = mk_merge("slerp", first, [second], t=0.3)
    for key in base:
        scale = float(torch.maximum(first[key].abs(), second[key].abs()).max())
        assert float((ours[key] - theirs[key]).abs().max()) <= 2e-5 * scale, key


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_matches_mergekit(clip, flatten, row_wise):
    """mergekit ``nuslerp`` (base θ0, experts 0 and 4, weights 1 and 3 so t = 0.75, ``nuslerp_flatten`` /
    ``nuslerp_row_wise``): equal to ``nuslerp_merge(weights=[1, 3], flatten, row_wise)`` within
    1e-6·|mergekit| + 1e-6·max(|τ_a|, |τ_b|) per entry, the bound its docstring states (the arithmetic order
    differs: sin(Ω − tΩ)/sin Ω · v0 + … against (sin((1−t)Ω) v0 + sin(tΩ) v1)/sin Ω)."""
    from methods.nuslerp import nuslerp_merge

    base, experts = clip
    pair = [experts[0], experts[4]]
    ours = nuslerp_merge(base, pair, weights=[1.0, 3.0], flatten=flatten, row_wise=row_wise)
    theirs = mk_merge("nuslerp", base, pair, weight=[1.0, 3.0], nuslerp_flatten=flatten,
                      nuslerp_row_wise=row_wise)
    for key in base:
        taus = [(expert[key] - base[key]).abs() for expert in pair]
        bound = 1e-6 * theirs[key].abs() + 1e-6 * torch.maximum(*taus)
        assert ((ours[key] - theirs[key]).abs() <= bound).all(), key


@pytest.mark.parametrize("consensus,method", [("none", "breadcrumbs"), ("ties", "breadcrumbs_ties")])
def test_breadcrumbs_equals_mergekit(clip_light, consensus, method):
    """mergekit ``breadcrumbs`` / ``breadcrumbs_ties`` (``sparsify.magnitude_outliers`` with density 0.1, γ 0.01,
    weight 1 each, ``lambda`` 0.3): bit-identical to ``breadcrumbs_merge(density=0.1, gamma=0.01, scaling=0.3,
    consensus=...)``, as its docstring claims (same ``torch.sort`` order, so ties at the cuts fall alike)."""
    from methods.breadcrumbs import breadcrumbs_merge

    base, experts = clip_light
    ours = breadcrumbs_merge(base, experts, density=0.1, gamma=0.01, scaling=LAMBDA, consensus=consensus)
    theirs = mk_merge(method, base, experts, weight=1.0, density=0.1, gamma=0.01, **{"lambda": LAMBDA})
    assert_identical(ours, theirs)


def test_breadcrumbs_gamma0_mergekit_015_keeps_the_slice(clip_light):
    """Our docstring's one "deliberate difference" is mergekit @a6e4028's ``indices[n_bot:-n_top]``, empty when
    n_top = 0. mergekit 0.1.5 keeps ``indices[n_bot : n_bot + target]`` instead, so with γ = 0 (n_top = 0 on every
    tensor) it equals our default bit for bit, while ``mergekit_empty_slice=True`` (the old behaviour) drops every
    task vector (θ = θ0)."""
    from methods.breadcrumbs import breadcrumbs_merge

    base, experts = clip_light
    theirs = mk_merge("breadcrumbs", base, experts, weight=1.0, density=0.1, gamma=0.0, **{"lambda": LAMBDA})
    assert_identical(breadcrumbs_merge(base, experts, density=0.1, gamma=0.0, scaling=LAMBDA), theirs)
    old = breadcrumbs_merge(base, experts, density=0.1, gamma=0.0, scaling=LAMBDA, mergekit_empty_slice=True)
    assert_identical(old, base)


@pytest.mark.parametrize("consensus,method,scaling", [("ties", "della", 1.0), ("none", "della_linear", LAMBDA)])
def test_della_equals_mergekit_with_the_same_seed(clip_light, consensus, method, scaling):
    """mergekit ``della`` / ``della_linear`` (``sparsify.della_magprune``: density 0.7, ε 0.15, L1 rescale,
    ``torch.bernoulli`` from the global RNG seeded 7; tensors visited in the inputs' sorted key order) against
    ``della_merge(..., generator=torch.Generator().manual_seed(7))`` (one bernoulli per tensor and task, sorted key
    order): the same random masks, so bit-identical, as its docstring claims."""
    from methods.della import della_merge

    base, experts = clip_light
    assert list(base) == sorted(base)
    ours = della_merge(base, experts, density=0.7, epsilon=0.15, scaling=scaling, consensus=consensus,
                       rescale="l1", generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    theirs = mk_merge(method, base, experts, weight=1.0, density=0.7, epsilon=0.15, **{"lambda": scaling})
    assert_identical(ours, theirs)


def test_wudi_matches_fusionbench(clip_one_layer):
    """FusionBench ``wudi.wudi_merging`` (autograd + ``torch.optim.Adam``, lr 1e-5, from Σ τ_i; other tensors:
    the mean) + θ0, against ``wudi_merge`` (closed-form gradient, Adam written out): per tensor
    ‖ours − FB‖_F ≤ 1e-5·‖FB − θ0‖_F (measured ~6e-7), and the vectors bit-identical. The default 400 steps on
    the 50×768 positional embedding; 30 steps on the 768×768 q_proj (400 autograd steps there cost ~25 s)."""
    from methods.wudi import wudi_merge

    base, experts = clip_one_layer
    for keys, steps in ((["embeddings.position_embedding.weight", "embeddings.class_embedding"], 400),
                        (["encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.bias"], 30)):
        part_base, part_experts = {key: base[key] for key in keys}, [{key: e[key] for key in keys} for e in experts]
        ours = wudi_merge(part_base, part_experts, steps=steps, lr=1e-5)
        theirs = fb_wudi(part_base, part_experts, steps=steps)
        assert torch.equal(ours[keys[1]], theirs[keys[1]]), keys[1]
        error = relative_error({keys[0]: ours[keys[0]]}, {keys[0]: theirs[keys[0]]}, part_base)[keys[0]]
        assert error <= 1e-5, (keys[0], error)


def test_doge_ta_matches_fusionbench(clip_one_layer):
    """FusionBench ``DOGE_TA_Algorithm(subspace=6, K=30, lamda=0.07).run(pool)`` (400 projected Adam steps per
    layer, autograd) on one encoder matrix, a bias, the class and positional embeddings. FusionBench merges only
    keys with "encoder" and "weight" (not "layer_norm"); ours merges every matrix parameter — the documented
    difference. With the positional embedding declared a vector parameter (``vector_params``) the merged sets
    agree, and then: the q_proj weight within 1e-5 relative Frobenius (measured ~6e-7; closed-form gradient vs
    autograd), everything else θ0 in both, bit for bit. Without it, ours also merges the positional embedding
    (θ ≠ θ0 there) where FusionBench leaves θ0."""
    from methods.doge_ta import doge_ta_merge

    base, experts = clip_one_layer
    position = "embeddings.position_embedding.weight"
    theirs = fb_doge_ta(base, experts)
    ours = doge_ta_merge(base, experts, vector_params=[position])
    weight = "encoder.layers.0.self_attn.q_proj.weight"
    assert relative_error({weight: ours[weight]}, {weight: theirs[weight]}, base)[weight] <= 1e-5
    for key in base:
        if key != weight:
            assert torch.equal(theirs[key], base[key]) and torch.equal(ours[key], base[key]), key
    small = {position: base[position]}, [{position: expert[position]} for expert in experts]
    merged_position = doge_ta_merge(*small)[position]
    assert not torch.equal(merged_position, base[position])


# ------------------------------------------------------------------------------------------------------------
# Per-task results: TALL masks and EMR-Merging (one set of weights per task)


def test_tall_masks_match_fusionbench_per_task(clip):
    """FusionBench ``tall_mask.utils.generate_task_masks`` (λ = 0.6) and θ_t = θ0 + m_t ⊙ Σ τ (its
    ``TallMaskTaskArithmeticAlgorithm`` mixes weights and task vectors, see the consensus tests): every task's
    weights equal ``tall_masks_merge``'s within rounding, except where a mask comparison is decided within
    rounding (FusionBench compares in weight space, we on task vectors; ≥ against >)."""
    from methods.tall_masks import tall_masks_merge

    base, experts = clip
    ours = tall_masks_merge(base, experts, tall_lambda=0.6, scaling=1.0)
    masks, tv_flat, flat_ptm, to_state_dict = fb_tall_masks(base, experts, tall_lambda=0.6)
    near = _near_boundary(base, experts, 0.6)
    for task in range(len(experts)):
        peer = to_state_dict(flat_ptm + masks[task] * tv_flat.sum(0))
        mine = ours.for_task(str(task))
        for key, mask in beyond(mine, peer, rounding_bound(base, experts, 1.0, peer)).items():
            assert not (mask & ~near[key]).any(), (task, key)


def test_emr_matches_fusionbench(clip_cancel):
    """FusionBench ``emr_merging.utils.emr_merge`` on the task vectors: the unified vector and every mask are
    bit-identical to ours; the rescalers agree to 1e-6 relative (theirs sum fp32 scalars, ours in float64), so
    each task's θ0 + λ_t · m_t ⊙ τ_U agrees to that too."""
    from fusion_bench.method.emr_merging.utils import emr_merge as fb_emr_merge

    from methods.emr import emr_merge

    base, experts = clip_cancel
    ours = emr_merge(base, experts)
    with quiet():
        unified, masks, rescalers = fb_emr_merge([{k: e[k] - base[k] for k in base} for e in experts])
    for key in base:
        assert torch.equal(ours.state.shared[key], unified[key]), key
        for task in range(len(experts)):
            assert torch.equal(ours.state.mask(key, task), masks[key][task]), (key, task)
    for task in range(len(experts)):
        assert ours.rescalers[str(task)] == pytest.approx(float(rescalers[task]), rel=1e-6)
        mine = ours.for_task(str(task))
        for key in base:
            peer = base[key] + float(rescalers[task]) * (masks[key][task] * unified[key])
            torch.testing.assert_close(mine[key], peer, rtol=1e-6, atol=1e-6 * float(peer.abs().max()))
