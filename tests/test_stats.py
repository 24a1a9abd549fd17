"""bench.stats against scipy and against a brute-force bootstrap, on vectors with known answers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from bench.check import Entry, TaskResult, average_significance, compare_runs
from bench.errors import BenchError
from bench.stats import Interval, mcnemar, pair_seeds, paired_bootstrap, wilcoxon


def known_pairs(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors with exactly ``b`` (A right, B wrong) and ``c`` (A wrong, B right) discordant pairs."""
    a = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    other = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    order = np.random.default_rng(0).permutation(len(a))
    return a[order], other[order]


@pytest.mark.parametrize(("b", "c"), [(7, 2), (2, 7), (15, 15), (30, 12), (1, 0)])
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(b, c):
    a, other = known_pairs(b, c, both=40, neither=25)
    result = mcnemar(a, other)
    assert (result.b, result.c) == (b, c)
    assert result.pvalue == stats.binomtest(min(b, c), b + c, 0.5).pvalue


def test_mcnemar_pools_seeds_and_handles_no_discordance():
    a1, b1 = known_pairs(5, 1, 10, 10)
    a2, b2 = known_pairs(4, 2, 10, 10)
    pooled = mcnemar(np.stack([a1, a2]), np.stack([b1, b2]))
    assert (pooled.b, pooled.c) == (9, 3)
    assert pooled.pvalue == stats.binomtest(3, 12, 0.5).pvalue
    same = np.array([True, False, True])
    assert mcnemar(same, same) == mcnemar(same, same.copy())
    assert mcnemar(same, same).pvalue == 1.0 and (mcnemar(same, same).b, mcnemar(same, same).c) == (0, 0)


@pytest.mark.parametrize("differences", [
    [0.1, 0.2, -0.05, 0.3, 0.15, 0.12, -0.02, 0.08],
    [-0.01, -0.02, -0.03, -0.04, -0.05, -0.06],
    [0.0, 0.1, -0.2, 0.3, 0.0, 0.05, 0.07],  # zeros are dropped, as scipy does by default
])
def test_wilcoxon_equals_scipy(differences):
    expected = stats.wilcoxon(differences)
    result = wilcoxon(differences)
    assert result.pvalue == expected.pvalue and result.statistic == expected.statistic
    assert result.n == len(differences) and result.nonzero == np.count_nonzero(differences)


def test_wilcoxon_all_zero_differences_is_p_one_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = wilcoxon([0.0] * 6)
    assert (result.pvalue, result.nonzero, result.n) == (1.0, 0, 6)


def synthetic(p_a: float, p_b: float, n: int, seeds: int, tasks: int, salt: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(salt)
    a = {f"t{i}": rng.random((seeds, n)) < p_a for i in range(tasks)}
    b = {f"t{i}": rng.random((seeds, n)) < p_b for i in range(tasks)}
    return a, b


def test_bootstrap_ci_contains_the_true_difference_and_estimate():
    a, b = synthetic(0.8, 0.7, n=2000, seeds=3, tasks=4)
    result = paired_bootstrap(a, b, resamples=4000)
    observed = np.mean([a[t].mean() - b[t].mean() for t in a])
    assert result.average.estimate == pytest.approx(observed)
    assert result.average.low < 0.1 < result.average.high
    assert result.average.low < observed < result.average.high
    for task in a:
        assert result.tasks[task].estimate == pytest.approx(a[task].mean() - b[task].mean())
        assert result.tasks[task].low < 0.1 < result.tasks[task].high
    assert result.average.excludes_zero()


def test_bootstrap_is_deterministic_under_a_seed():
    a, b = synthetic(0.6, 0.55, n=300, seeds=2, tasks=3, salt=1)
    first = paired_bootstrap(a, b, resamples=2000, seed=7)
    assert paired_bootstrap(a, b, resamples=2000, seed=7) == first
    assert paired_bootstrap(a, b, resamples=2000, seed=8) != first


def brute_force_bootstrap(a: dict, b: dict, resamples: int, level: float, seed: int) -> tuple[float, float]:
    """Resample example indices per task (the same indices for every seed), average the task differences."""
    rng = np.random.default_rng(seed)
    replicates = np.zeros(resamples)
    for task in sorted(a):
        n = a[task].shape[1]
        idx = rng.integers(0, n, size=(resamples, n))
        diff = a[task].astype(float).mean(axis=0) - b[task].astype(float).mean(axis=0)
        replicates += diff[idx].mean(axis=1)
    replicates /= len(a)
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def test_bootstrap_matches_brute_force_index_resampling():
    a, b = synthetic(0.75, 0.7, n=500, seeds=3, tasks=3, salt=2)
    fast = paired_bootstrap(a, b, resamples=20_000, seed=0).average
    low, high = brute_force_bootstrap(a, b, resamples=5000, level=0.95, seed=1)
    width = high - low
    assert fast.low == pytest.approx(low, abs=0.05 * width)
    assert fast.high == pytest.approx(high, abs=0.05 * width)


def test_bootstrap_on_identical_runs_is_zero_and_one_dimensional_rows_work():
    bits = np.random.default_rng(3).random(100) < 0.5
    result = paired_bootstrap({"x": bits}, {"x": bits.copy()}, resamples=500)
    assert result.average == Interval(0.0, 0.0, 0.0)
    assert not result.average.excludes_zero()


def test_bootstrap_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap({"x": np.ones(3, bool)}, {"y": np.ones(3, bool)})
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap({"x": np.ones(3, bool)}, {"x": np.ones(4, bool)})


def test_seed_pairing_says_when_seeds_do_not_overlap():
    pairing = pair_seeds([0, 1, 2], [1, 2, 3])
    assert (pairing.common, pairing.only_a, pairing.only_b) == ([1, 2], [0], [3])
    assert pairing.describe("A", "B") == "unpaired seeds left out (A only: 0; B only: 3)"
    assert pair_seeds([0, 1], [0, 1]).describe("A", "B") == ""
    assert pair_seeds([0], [5, 6]).describe("A", "B") == (
        "seeds do not overlap: A has 0, B has 5,6; run both with the same --seeds")


def entries(method: str, bits: dict[str, np.ndarray], with_bits: bool = True) -> dict[int, Entry]:
    """``bits[task]``: [seeds, examples]."""
    seeds = next(iter(bits.values())).shape[0]
    return {s: Entry("toy", method, "data-free", s, "", {
        t: TaskResult(float(v[s].mean()), v.shape[1], v[s] if with_bits else None) for t, v in bits.items()})
        for s in range(seeds)}


def test_compare_runs_pairs_seeds_and_matches_independent_statistics():
    a, b = synthetic(0.7, 0.6, n=300, seeds=3, tasks=3, salt=4)
    comp = compare_runs(entries("A", a), entries("B", b), resamples=2000)
    diffs = [a[t][s].mean() - b[t][s].mean() for t in sorted(a) for s in range(3)]
    assert comp.wilcoxon.pvalue == pytest.approx(stats.wilcoxon(diffs).pvalue, rel=1e-12)
    assert comp.diff == pytest.approx(np.mean(diffs))
    assert comp.ci == paired_bootstrap(a, b, resamples=2000).average
    for row in comp.tasks:
        assert (row.mcnemar.b, row.mcnemar.c) == (int((a[row.task] & ~b[row.task]).sum()),
                                                   int((~a[row.task] & b[row.task]).sum()))
    assert average_significance(comp) == (True, "bootstrap")


def test_without_bits_significance_falls_back_to_wilcoxon_then_unknown():
    a, b = synthetic(0.7, 0.6, n=300, seeds=3, tasks=3, salt=5)
    comp = compare_runs(entries("A", a, with_bits=False), entries("B", b, with_bits=False))
    assert comp.ci is None and all(row.mcnemar is None for row in comp.tasks)
    significant, how = average_significance(comp)
    assert significant is (comp.wilcoxon.pvalue < 0.05) and how.startswith("Wilcoxon p=")
    small_a, small_b = synthetic(0.7, 0.6, n=300, seeds=1, tasks=3, salt=6)
    few = compare_runs(entries("A", small_a, with_bits=False), entries("B", small_b, with_bits=False))
    assert average_significance(few) == (None, "unknown")  # 3 differences can never reach p < 0.05


def test_compare_runs_without_common_seed_is_a_bench_error():
    a, b = synthetic(0.7, 0.6, n=10, seeds=1, tasks=1)
    runs_b = {5: entries("B", b)[0]}
    with pytest.raises(BenchError, match="^'A' and 'B' on toy: seeds do not overlap: A has 0, B has 5;"):
        compare_runs(entries("A", a), runs_b)
