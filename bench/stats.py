"""Paired statistics for comparing two methods on the same examples: pure functions over correctness arrays.

A method's result on one task is a bool array ``[seeds, examples]`` (per-example correctness, examples in the
split's fixed order, one row per seed). Two methods are compared on the seeds both were run with, row for row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95
ALPHA = 0.05


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Bootstrap:
    """Per-task and suite-average intervals of the accuracy difference A − B (fractions, not points)."""

    tasks: dict[str, Interval]
    average: Interval
    resamples: int


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``b`` = A right and B wrong, ``c`` = A wrong and B right."""

    b: int
    c: int
    pvalue: float


@dataclass(frozen=True)
class Wilcoxon:
    statistic: float
    pvalue: float
    n: int  # paired differences
    nonzero: int  # differences that are not zero (the test's effective sample size)


@dataclass(frozen=True)
class SeedPairing:
    common: list[int]
    only_a: list[int]
    only_b: list[int]

    def describe(self, a: str, b: str) -> str:
        """Empty when every seed is paired; otherwise one line saying which seeds were left out."""
        if not self.common:
            return (f"seeds do not overlap: {a} has {format_seeds(self.only_a)}, {b} has {format_seeds(self.only_b)}; "
                    "run both with the same --seeds")
        parts = [f"{name} only: {format_seeds(seeds)}" for name, seeds in ((a, self.only_a), (b, self.only_b)) if seeds]
        return f"unpaired seeds left out ({'; '.join(parts)})" if parts else ""


def format_seeds(seeds: Iterable[int]) -> str:
    return ",".join(str(s) for s in seeds) or "none"


def pair_seeds(a: Iterable[int], b: Iterable[int]) -> SeedPairing:
    set_a, set_b = set(a), set(b)
    return SeedPairing(sorted(set_a & set_b), sorted(set_a - set_b), sorted(set_b - set_a))


def _as_matrix(correct: np.ndarray) -> np.ndarray:
    matrix = np.asarray(correct, dtype=bool)
    return matrix[None, :] if matrix.ndim == 1 else matrix


def _check_paired(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"paired correctness arrays differ in shape: {a.shape} vs {b.shape}")


def _interval(samples: np.ndarray, estimate: float, level: float) -> Interval:
    tail = (1 - level) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return Interval(float(estimate), float(low), float(high), level)


def _task_resamples(a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """Observed difference and ``resamples`` bootstrap replicates for one task.

    Resampling the task's n examples with replacement (the same draw for every seed, so seeds stay paired)
    depends only on how often each distinct per-example difference is drawn; those counts are multinomial,
    so they are drawn directly: the same distribution as index resampling in O(resamples × distinct values).
    """
    seeds, n = a.shape
    per_example = a.sum(axis=0, dtype=np.int64) - b.sum(axis=0, dtype=np.int64)  # in [-seeds, seeds]
    values, counts = np.unique(per_example, return_counts=True)
    draws = rng.multinomial(n, counts / n, size=resamples)
    scale = n * seeds
    return float(per_example.sum() / scale), draws @ values / scale


def paired_bootstrap(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Bootstrap:
    """Percentile bootstrap CIs of accuracy(A) − accuracy(B), per task and for the suite average.

    ``a[task]``/``b[task]``: bool ``[seeds, examples]`` (or ``[examples]``), rows paired by seed. Examples are
    resampled within each task (stratified), paired between A and B; the suite average is the unweighted mean
    of the task differences, each replicate averaging the tasks' replicates.
    """
    if set(a) != set(b):
        raise ValueError(f"paired bootstrap needs the same tasks: {sorted(a)} vs {sorted(b)}")
    if not a:
        raise ValueError("paired bootstrap needs at least one task")
    rng = np.random.default_rng(seed)
    intervals: dict[str, Interval] = {}
    replicates = []
    estimates = []
    for task in sorted(a):
        ma, mb = _as_matrix(a[task]), _as_matrix(b[task])
        _check_paired(ma, mb)
        estimate, samples = _task_resamples(ma, mb, resamples, rng)
        intervals[task] = _interval(samples, estimate, level)
        replicates.append(samples)
        estimates.append(estimate)
    average = _interval(np.mean(replicates, axis=0), float(np.mean(estimates)), level)
    return Bootstrap(intervals, average, resamples)


def mcnemar(a: np.ndarray, b: np.ndarray) -> McNemar:
    """Exact (binomial) McNemar test on the discordant pairs, pooled over every row of ``a``/``b``."""
    ma, mb = _as_matrix(a), _as_matrix(b)
    _check_paired(ma, mb)
    b_count = int(np.count_nonzero(ma & ~mb))
    c_count = int(np.count_nonzero(~ma & mb))
    total = b_count + c_count
    pvalue = 1.0 if total == 0 else float(stats.binomtest(min(b_count, c_count), total, 0.5).pvalue)
    return McNemar(b_count, c_count, pvalue)


def wilcoxon(differences: Sequence[float]) -> Wilcoxon:
    """Wilcoxon signed-rank test of paired differences (zeros dropped, scipy's default); all zero gives p = 1."""
    values = np.asarray(differences, dtype=float)
    nonzero = int(np.count_nonzero(values))
    if nonzero == 0:
        return Wilcoxon(0.0, 1.0, len(values), 0)
    result = stats.wilcoxon(values)
    return Wilcoxon(float(result.statistic), float(result.pvalue), len(values), nonzero)


def accuracy_difference(a: np.ndarray, b: np.ndarray) -> float:
    """acc(A) − acc(B) on one seed's bits, from integer counts so equal count differences give equal floats."""
    return (int(np.count_nonzero(a)) - int(np.count_nonzero(b))) / len(a)
