"""Comparisons between methods and regression checks against a stored baseline.

Runs are keyed like the leaderboard: (suite label, method label) -> seed -> the latest record's entry, where
labels are :func:`bench.report.variant_label` of the name and its non-default parameters.

A baseline is a results directory or a file written by ``bench export`` (format ``merge-bench-baseline``,
version 1): per suite label, method label and seed, the per-task accuracy, number of examples and packed
per-example correctness, plus the harness commit and creation time.

Regression rule (``bench check``), with Δ = current − baseline in points over the seeds both have:

* the average regresses when it drops by more than ``tolerance`` and the drop is significant: the paired
  bootstrap 95% CI of Δ (examples resampled within each task, seeds paired) lies below zero. Without
  per-example bits the Wilcoxon signed-rank test over (task, seed) differences decides (p < 0.05), given at
  least 6 nonzero differences (fewer can never reach p < 0.05); otherwise significance is unknown, which is
  reported and does not fail the check;
* a task regresses when it drops by more than ``task_tolerance`` (default 3 × ``tolerance``: single tasks are
  noisier than the average and are tested eight times over) and McNemar's exact test on the examples pooled
  over paired seeds gives p < 0.05.
"""

from __future__ import annotations

import binascii
import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError, close_matches
from bench.report import REFERENCE_FAMILY, variant_label
from bench.stats import (
    ALPHA,
    DEFAULT_RESAMPLES,
    Interval,
    McNemar,
    SeedPairing,
    Wilcoxon,
    accuracy_difference,
    format_seeds,
    mcnemar,
    pair_seeds,
    paired_bootstrap,
    wilcoxon,
)
from bench.store import ResultsStore, is_failed, unpack_correct, write_json_atomic

BASELINE_FORMAT = "merge-bench-baseline"
BASELINE_VERSION = 1
MIN_WILCOXON_PAIRS = 6  # the smallest n at which a two-sided exact signed-rank test can give p < 0.05
EPSILON = 1e-9


@dataclass(frozen=True)
class TaskResult:
    accuracy: float
    num_examples: int
    correct: np.ndarray | None  # bool [num_examples]; None when the source has no per-example bits


@dataclass(frozen=True)
class Entry:
    """One seed of one method on one suite configuration."""

    suite: str
    method: str
    family: str
    seed: int
    created: str
    tasks: dict[str, TaskResult]
    config_hash: str = ""
    packed: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    @property
    def average(self) -> float:
        return float(np.mean([t.accuracy for t in self.tasks.values()]))


Runs = dict[tuple[str, str], dict[int, Entry]]


# ---------------------------------------------------------------- loading


def _task_result(source: str, task: str, raw: Mapping[str, Any]) -> tuple[TaskResult, str | None]:
    accuracy, n, packed = float(raw["accuracy"]), int(raw["num_examples"]), raw.get("correct")
    if packed is None:
        return TaskResult(accuracy, n, None), None
    try:
        bits = unpack_correct(packed, n)
    except (binascii.Error, ValueError, TypeError):
        raise BenchError(f"{source}: task '{task}' has unreadable correctness bits; the file is corrupt") from None
    if len(bits) != n:
        raise BenchError(f"{source}: task '{task}' has {len(bits)} correctness bits for {n} examples; "
                         "the file is corrupt")
    exact = float(bits.mean()) if n else 0.0
    if abs(exact - accuracy) > 0.5 / max(n, 1) + EPSILON:
        raise BenchError(f"{source}: task '{task}' accuracy {accuracy:.4f} disagrees with its correctness bits "
                         f"({exact:.4f}); the file is corrupt")
    return TaskResult(exact, n, bits), packed


def make_entry(source: str, suite: str, method: str, family: str, seed: int, created: str,
               tasks: Mapping[str, Mapping[str, Any]], config_hash: str = "") -> Entry:
    results, packed = {}, {}
    for task, raw in tasks.items():
        results[task], packed[task] = _task_result(source, task, raw)
    if not results:
        raise BenchError(f"{source}: no tasks; the file is corrupt")
    return Entry(suite, method, family, int(seed), str(created), results, config_hash, packed)


def entry_from_record(record: Mapping[str, Any], source: str) -> Entry:
    try:
        return make_entry(
            source,
            variant_label(record["suite"], record.get("suite_variant", {})),
            variant_label(record["method"], record.get("variant", {})),
            record.get("family", ""),
            record["seed"],
            record.get("created", ""),
            record["tasks"],
            record.get("config_hash", ""),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BenchError(f"{source}: record is missing or has a malformed field ({exc}); the file is corrupt") from None


def add_latest(runs: Runs, entry: Entry) -> None:
    """Keep, per (suite, method, seed), the most recently created entry."""
    seeds = runs.setdefault((entry.suite, entry.method), {})
    held = seeds.get(entry.seed)
    if held is None or (entry.created, entry.config_hash) > (held.created, held.config_hash):
        seeds[entry.seed] = entry


def load_results(results: Path | str, unreadable: list[Path] | None = None) -> Runs:
    """The latest entry per (suite, method, seed) label of a results directory. A record that cannot be read is
    warned about and left out; ``unreadable`` (when given) collects its path (a gate must not pass without it)."""
    root = Path(results)
    if not root.is_dir():
        raise BenchError(f"no results directory '{results}'; run `bench run` first or pass --results DIR")
    runs: Runs = {}
    failed = 0
    skipped: list[Path] = []
    for path in sorted(root.glob("*/*/*.json")):
        record = ResultsStore.load(path)
        if record is None:  # unreadable (ResultsStore.load warned, naming it and why)
            skipped.append(path)
        elif is_failed(record):  # no scores: see load_failed
            failed += 1
        else:
            add_latest(runs, entry_from_record(record, str(path)))
    if unreadable is not None:
        unreadable += skipped
    if not runs:
        besides = [f"{failed} failed run(s)"] if failed else []
        besides += [f"{len(skipped)} unreadable one(s) (see the warnings above)"] if skipped else []
        only_failed = f" but {' and '.join(besides)}" if besides else ""
        raise BenchError(f"no records in '{results}'{only_failed}; run `bench run --suite ...` first")
    return runs


Failed = dict[tuple[str, str], dict[int, str]]  # (suite, method) label -> seed -> reason


def load_failed(results: Path | str, suite: str | None = None) -> Failed:
    """The failed runs in a results directory (``"status": "failed"``: no scores, never averaged), by suite and
    method label as in :func:`load_results`, with their reasons; only ``suite``'s when given."""
    failed: Failed = {}
    for path in sorted(Path(results).glob("*/*/*.json")):
        record = ResultsStore.load(path, warn=False)  # load_results warns about the unreadable ones
        if record is None or not is_failed(record):
            continue
        label = variant_label(record["suite"], record.get("suite_variant", {}))
        if suite is None or suite_matches(label, suite):
            method = variant_label(record["method"], record.get("variant", {}))
            failed.setdefault((label, method), {})[int(record["seed"])] = str(record.get("reason") or "no reason")
    return failed


def load_baseline(path: Path | str, unreadable: list[Path] | None = None) -> Runs:
    """A baseline from a results directory (``unreadable`` as for :func:`load_results`) or an exported file."""
    target = Path(path)
    if target.is_dir():
        return load_results(target, unreadable)
    if not target.exists():
        raise BenchError(f"baseline '{path}' does not exist; write one with `bench export --out {path}`")
    try:
        payload = json.loads(target.read_text())
    except OSError as exc:
        raise BenchError(f"cannot read baseline '{path}': {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BenchError(f"baseline '{path}' is not valid JSON ({exc}); re-export it with `bench export`") from None
    return baseline_runs(payload, str(path))


def baseline_runs(payload: Any, source: str) -> Runs:
    if not isinstance(payload, dict) or payload.get("format") != BASELINE_FORMAT:
        raise BenchError(f"'{source}' is not a merge-bench baseline (no \"format\": \"{BASELINE_FORMAT}\"); "
                         "write one with `bench export`")
    if payload.get("version") != BASELINE_VERSION:
        raise BenchError(f"baseline '{source}' has format version {payload.get('version')!r}; this harness reads "
                         f"version {BASELINE_VERSION}; re-export it with `bench export`")
    runs: Runs = {}
    try:
        for suite, methods in payload["suites"].items():
            for method, body in methods.items():
                for seed, raw in body["seeds"].items():
                    where = f"{source} [{suite} / {method} / seed {seed}]"
                    add_latest(runs, make_entry(where, suite, method, body.get("family", ""), int(seed),
                                                raw.get("created", ""), raw["tasks"], raw.get("config_hash", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BenchError(f"baseline '{source}' is corrupt: missing or malformed field ({exc}); "
                         "re-export it with `bench export`") from None
    if not runs:
        raise BenchError(f"baseline '{source}' holds no results")
    return runs


def suite_matches(label: str, suite: str) -> bool:
    return label == suite or label.startswith(f"{suite}(")


def select_suite(runs: Runs, suite: str | None, where: str) -> Runs:
    if suite is None:
        return runs
    chosen = {key: seeds for key, seeds in runs.items() if suite_matches(key[0], suite)}
    if not chosen:
        recorded = ", ".join(sorted({s for s, _ in runs}))
        raise BenchError(f"no records of suite '{suite}' in '{where}'; recorded: {recorded}")
    return chosen


def select_seeds(runs: Runs, seeds: Iterable[int] | None) -> Runs:
    if seeds is None:
        return runs
    wanted = set(seeds)
    chosen = {key: {s: e for s, e in entries.items() if s in wanted} for key, entries in runs.items()}
    return {key: entries for key, entries in chosen.items() if entries}


def method_matches(label: str, name: str) -> bool:
    """Whether a method label (``ties(k=10)``) is ``name``: that label, or any variant of a plain method name."""
    return label == name or ("(" not in name and label.startswith(f"{name}("))


def select_methods(runs: Mapping[tuple[str, str], Any], methods: Sequence[str] | None) -> dict:
    """Runs (or failed runs) of ``methods`` only (labels or plain names: :func:`method_matches`); all when None."""
    if methods is None:
        return dict(runs)
    return {key: value for key, value in runs.items() if any(method_matches(key[1], m) for m in methods)}


def check_method_names(methods: Sequence[str], *sides: Runs) -> None:
    """One line when a name of ``--methods`` is in none of ``sides`` (baseline and results), with close matches."""
    known = sorted({m for runs in sides for _, m in runs})
    for name in methods:
        if not any(method_matches(label, name) for label in known):
            matches = close_matches(name, known)
            hint = f"did you mean: {', '.join(matches)}?" if matches else f"recorded: {', '.join(known)}"
            raise BenchError(f"--methods: no records of method '{name}' in the baseline or the results; {hint}")


def unreadable_of(paths: Iterable[Path], root: Path | str, suite: str | None,
                  methods: Sequence[str] | None) -> list[Path]:
    """The unreadable record files (``<root>/<suite>/<method>/<hash>.json``) of ``suite`` and ``methods`` (their
    folders tell; their seeds and variants are unknown, so ``--seeds`` keeps them all)."""
    chosen = []
    for path in paths:
        suite_name, method_name = Path(path).relative_to(Path(root)).parts[:2]
        if suite is not None and suite_name != suite:
            continue
        if methods is not None and not any(method_name == m.split("(")[0] for m in methods):
            continue
        chosen.append(Path(path))
    return chosen


# ---------------------------------------------------------------- export


def export_payload(runs: Runs, *, commit: str | None, created: str | None = None, source: str = "") -> dict[str, Any]:
    suites: dict[str, dict[str, Any]] = {}
    for (suite, method), entries in sorted(runs.items()):
        seeds = {}
        for seed, entry in sorted(entries.items()):
            seeds[str(seed)] = {
                "created": entry.created,
                "config_hash": entry.config_hash,
                "average": entry.average,
                "tasks": {
                    task: {"accuracy": t.accuracy, "num_examples": t.num_examples, "correct": entry.packed.get(task)}
                    for task, t in sorted(entry.tasks.items())
                },
            }
        family = next(iter(entries.values())).family
        suites.setdefault(suite, {})[method] = {"family": family, "seeds": seeds}
    return {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "created": created or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "harness_commit": commit,
        "source": source,
        "suites": suites,
    }


def write_baseline(path: Path | str, payload: dict[str, Any]) -> None:
    try:
        write_json_atomic(Path(path), payload)
    except OSError as exc:
        raise BenchError(f"cannot write baseline '{path}': {exc.strerror}") from None


# ---------------------------------------------------------------- paired comparison


@dataclass(frozen=True)
class TaskComparison:
    task: str
    a: float  # mean accuracy over the paired seeds
    b: float
    ci: Interval | None  # of a − b; None without per-example bits
    mcnemar: McNemar | None

    @property
    def diff(self) -> float:
        return self.a - self.b


@dataclass(frozen=True)
class Comparison:
    """A vs B on one suite configuration over their common seeds (differences are A − B, fractions)."""

    suite: str
    a: str
    b: str
    pairing: SeedPairing
    tasks: list[TaskComparison]
    average_a: float
    average_b: float
    ci: Interval | None  # bootstrap CI of the average difference; None unless every task has bits
    wilcoxon: Wilcoxon

    @property
    def diff(self) -> float:
        return self.average_a - self.average_b


def _bits(entries: list[Entry], task: str) -> np.ndarray | None:
    rows = [e.tasks[task].correct for e in entries]
    if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    return np.stack(rows)


def compare_runs(a: Mapping[int, Entry], b: Mapping[int, Entry], *, resamples: int = DEFAULT_RESAMPLES,
                 seed: int = 0) -> Comparison:
    """Compare two methods' runs seed by seed; raises BenchError when no seed or task is shared."""
    first_a, first_b = next(iter(a.values())), next(iter(b.values()))
    pairing = pair_seeds(a, b)
    if not pairing.common:
        raise BenchError(f"'{first_a.method}' and '{first_b.method}' on {first_a.suite}: "
                         f"{pairing.describe(first_a.method, first_b.method)}")
    ea, eb = [a[s] for s in pairing.common], [b[s] for s in pairing.common]
    tasks = sorted(set.intersection(*(set(e.tasks) for e in ea + eb)))
    if not tasks:
        raise BenchError(f"'{first_a.method}' and '{first_b.method}' on {first_a.suite} share no task")
    bits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for task in tasks:
        ba, bb = _bits(ea, task), _bits(eb, task)
        if ba is not None and bb is not None and ba.shape == bb.shape:
            bits[task] = (ba, bb)
    boot = paired_bootstrap({t: p[0] for t, p in bits.items()}, {t: p[1] for t, p in bits.items()},
                            resamples=resamples, seed=seed) if bits else None
    rows, differences = [], []
    for task in tasks:
        acc_a = float(np.mean([e.tasks[task].accuracy for e in ea]))
        acc_b = float(np.mean([e.tasks[task].accuracy for e in eb]))
        pair = bits.get(task)
        rows.append(TaskComparison(task, acc_a, acc_b, boot.tasks[task] if boot and pair else None,
                                   mcnemar(*pair) if pair else None))
        for i, (x, y) in enumerate(zip(ea, eb, strict=True)):
            if pair is not None:
                differences.append(accuracy_difference(pair[0][i], pair[1][i]))
            else:
                differences.append(round(x.tasks[task].accuracy - y.tasks[task].accuracy, 12))
    average_ci = boot.average if boot is not None and len(bits) == len(tasks) else None
    return Comparison(first_a.suite, first_a.method, first_b.method, pairing, rows,
                      float(np.mean([r.a for r in rows])), float(np.mean([r.b for r in rows])),
                      average_ci, wilcoxon(differences))


def average_significance(comparison: Comparison) -> tuple[bool | None, str]:
    """Whether the average difference is significant, and by which test (see the module docstring)."""
    if comparison.ci is not None:
        return comparison.ci.excludes_zero(), "bootstrap"
    if comparison.wilcoxon.nonzero >= MIN_WILCOXON_PAIRS:
        return comparison.wilcoxon.pvalue < ALPHA, f"Wilcoxon p={comparison.wilcoxon.pvalue:.3g}"
    return None, "unknown"


# ---------------------------------------------------------------- check


@dataclass(frozen=True)
class CheckRow:
    suite: str
    method: str
    comparison: Comparison | None  # current vs baseline; None when no seed is shared
    regressions: list[str]
    notes: list[str]

    @property
    def failed(self) -> bool:
        return bool(self.regressions)


@dataclass(frozen=True)
class RankRow:
    method: str  # a baseline method
    family: str
    average: float  # its mean average over its baseline seeds
    comparison: Comparison | None  # new vs this baseline method; None when no seed is shared


@dataclass(frozen=True)
class NewMethod:
    suite: str
    method: str
    average: float
    seeds: list[int]
    rank: int
    rows: list[RankRow]


@dataclass(frozen=True)
class CheckResult:
    rows: list[CheckRow]
    new: list[NewMethod]
    missing: list[tuple[str, str]]  # in the baseline, not in the results
    unmatched_suites: list[str]  # in the results, not in the baseline
    tolerance: float
    task_tolerance: float
    failed_unchecked: list[str] = field(default_factory=list)  # failed runs of methods the baseline lacks
    # baseline seed runs of a method the results have, absent from them: (suite, method, seeds)
    missing_seeds: list[tuple[str, str, list[int]]] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # record files that could not be read (either side)

    @property
    def regressions(self) -> list[CheckRow]:
        return [row for row in self.rows if row.failed]

    @property
    def incomplete(self) -> bool:
        """Baseline records without a readable counterpart: the gate cannot vouch for them, so it fails."""
        return bool(self.missing or self.missing_seeds or self.unreadable)

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.incomplete


def _points(fraction: float) -> float:
    return 100 * fraction


def check_row(suite: str, method: str, current: Mapping[int, Entry], baseline: Mapping[int, Entry],
              tolerance: float, task_tolerance: float, resamples: int) -> CheckRow:
    pairing = pair_seeds(current, baseline)
    if not pairing.common:
        return CheckRow(suite, method, None, [], [pairing.describe("results", "baseline")])
    comp = compare_runs(current, baseline, resamples=resamples)
    regressions, notes = [], []
    delta = _points(comp.diff)
    if -delta > tolerance + EPSILON:
        significant, how = average_significance(comp)
        if significant:
            regressions.append(f"average {delta:+.1f}" + ("" if how == "bootstrap" else f" ({how})"))
        else:
            notes.append(f"average {delta:+.1f} " + ("significance unknown" if significant is None
                                                    else "not significant"))
    for task in comp.tasks:
        task_delta = _points(task.diff)
        if -task_delta <= task_tolerance + EPSILON:
            continue
        if task.mcnemar is None:
            notes.append(f"{task.task} {task_delta:+.1f} significance unknown (no per-example bits)")
        elif task.mcnemar.pvalue < ALPHA:
            regressions.append(f"{task.task} {task_delta:+.1f} (McNemar p={task.mcnemar.pvalue:.2g})")
        else:
            notes.append(f"{task.task} {task_delta:+.1f} not significant (McNemar p={task.mcnemar.pvalue:.2g})")
    seeds_note = pairing.describe("results", "baseline")
    if seeds_note:
        notes.append(seeds_note)
    return CheckRow(suite, method, comp, regressions, notes)


def rank_new(suite: str, method: str, entries: Mapping[int, Entry], baseline: Runs, resamples: int) -> NewMethod:
    average = float(np.mean([e.average for e in entries.values()]))
    rows = []
    for (base_suite, base_method), base_entries in baseline.items():
        if base_suite != suite:
            continue
        base_average = float(np.mean([e.average for e in base_entries.values()]))
        shared = pair_seeds(entries, base_entries).common
        comp = compare_runs(entries, base_entries, resamples=resamples) if shared else None
        rows.append(RankRow(base_method, next(iter(base_entries.values())).family, base_average, comp))
    rows.sort(key=lambda r: (-r.average, r.method))
    rank = 1 + sum(r.average > average + EPSILON for r in rows)
    return NewMethod(suite, method, average, sorted(entries), rank, rows)


def check(current: Runs, baseline: Runs, *, tolerance: float = 1.0, task_tolerance: float | None = None,
          resamples: int = DEFAULT_RESAMPLES, results_name: str = "results",
          baseline_name: str = "baseline", failed: Failed | None = None,
          unreadable: Iterable[Path | str] = ()) -> CheckResult:
    """Compare the current runs with the baseline on every suite configuration both have (tolerances in points).

    ``failed`` (:func:`load_failed`): a failed run of a method the baseline has is a regression (it scored
    before); one of a method it lacks is listed, not checked. A baseline method or seed run absent from the
    results, or an ``unreadable`` record file (of either side), fails the check: it cannot vouch for them.
    """
    failed = failed or {}
    if tolerance < 0 or (task_tolerance is not None and task_tolerance < 0):
        raise BenchError("--tolerance and --task-tolerance must be >= 0 (points)")
    task_tolerance = 3 * tolerance if task_tolerance is None else task_tolerance
    current_suites, baseline_suites = {s for s, _ in current}, {s for s, _ in baseline}
    shared = current_suites & baseline_suites
    if not shared:
        raise BenchError(f"no suite configuration in both '{results_name}' ({', '.join(sorted(current_suites))}) "
                         f"and the baseline '{baseline_name}' ({', '.join(sorted(baseline_suites))})")
    rows, new, unchecked = [], [], []
    for suite, method in sorted(set(current) | set(failed)):
        if suite not in shared:
            continue
        entries = current.get((suite, method), {})
        failures = [f"failed on seed {seed}: {reason}"
                    for seed, reason in sorted(failed.get((suite, method), {}).items())]
        if (suite, method) in baseline:
            row = (check_row(suite, method, entries, baseline[suite, method], tolerance, task_tolerance, resamples)
                   if entries else CheckRow(suite, method, None, [], []))
            rows.append(dataclasses.replace(row, regressions=row.regressions + failures) if failures else row)
        else:
            if entries:
                new.append(rank_new(suite, method, entries, baseline, resamples))
            unchecked += [f"{suite} {method} {failure}" for failure in failures]
    missing = sorted(key for key in baseline if key[0] in shared and key not in current and key not in failed)
    missing_seeds = []
    for key, entries in sorted(baseline.items()):
        if key[0] in shared and key in current:
            absent = sorted(set(entries) - set(current[key]) - set(failed.get(key, {})))
            if absent:
                missing_seeds.append((key[0], key[1], absent))
    return CheckResult(rows, new, missing, sorted(current_suites - shared), tolerance, task_tolerance, unchecked,
                       missing_seeds, sorted(str(path) for path in unreadable))


# ---------------------------------------------------------------- text


def text_table(header: list[str], rows: list[list[str]], left: Iterable[int] = (0,)) -> list[str]:
    """Aligned columns: those in ``left`` left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = set(left)

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def format_ci(ci: Interval | None) -> str:
    return "–" if ci is None else f"[{_points(ci.low):+.1f}, {_points(ci.high):+.1f}]"


def _significance_cell(comparison: Comparison) -> str:
    significant, how = average_significance(comparison)
    if significant is None:
        return "unknown"
    answer = "yes" if significant else "no"
    return answer if how == "bootstrap" else f"{answer} ({how})"


def format_comparison(comp: Comparison) -> str:
    a, b = comp.a, comp.b
    seeds = format_seeds(comp.pairing.common)
    lines = [f"{a} vs {b} on {comp.suite} — seeds {seeds} (paired); Δ = {a} − {b} in points, "
             f"95% paired bootstrap CI; McNemar b = only {a} right, c = only {b} right (pooled over seeds)"]
    rows = []
    for t in comp.tasks:
        test = "–" if t.mcnemar is None else f"{t.mcnemar.b}/{t.mcnemar.c}"
        p = "–" if t.mcnemar is None else f"{t.mcnemar.pvalue:.3g}"
        rows.append([t.task, f"{_points(t.a):.1f}", f"{_points(t.b):.1f}", f"{_points(t.diff):+.1f}",
                     format_ci(t.ci), test, p])
    rows.append(["average", f"{_points(comp.average_a):.1f}", f"{_points(comp.average_b):.1f}",
                 f"{_points(comp.diff):+.1f}", format_ci(comp.ci), "", ""])
    lines += text_table(["task", a, b, "Δ", "95% CI", "McNemar b/c", "p"], rows)
    w = comp.wilcoxon
    lines.append(f"Wilcoxon signed-rank over {w.n} (task, seed) differences ({w.nonzero} nonzero): "
                 f"W = {w.statistic:g}, p = {w.pvalue:.3g}")
    note = comp.pairing.describe(a, b)
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def _verdict(row: CheckRow) -> str:
    if row.comparison is None:
        return "REGRESSION" if row.failed else "skipped"
    if row.failed:
        return "REGRESSION"
    return "ok (note)" if row.notes else "ok"


def _check_rows(result: CheckResult) -> list[list[str]]:
    rows = []
    for row in result.rows:
        comp = row.comparison
        if comp is None:
            rows.append([row.suite, row.method, "–", "–", "–", "–", "–", _verdict(row)])
            continue
        _, how = average_significance(comp)
        rows.append([row.suite, row.method, format_seeds(comp.pairing.common), f"{_points(comp.average_b):.1f}",
                     f"{_points(comp.average_a):.1f}", f"{_points(comp.diff):+.1f}",
                     format_ci(comp.ci) if how == "bootstrap" else how, _verdict(row)])
    return rows


def _detail_lines(result: CheckResult) -> list[str]:
    lines = []
    for row in result.rows:
        if row.regressions:
            lines.append(f"REGRESSION {row.suite} {row.method}: {'; '.join(row.regressions)}")
        if row.notes:
            lines.append(f"note {row.suite} {row.method}: {'; '.join(row.notes)}")
    return lines


def _rank_lines(item: NewMethod) -> list[str]:
    total = len(item.rows) + 1
    lines = [f"new: {item.method} on {item.suite} ranks {item.rank} of {total} by average "
             f"({_points(item.average):.1f}, seeds {format_seeds(item.seeds)}) against the baseline:"]
    rows = []
    for r in item.rows:
        name = r.method + (" (reference)" if r.family == REFERENCE_FAMILY else "")
        if r.comparison is None:
            rows.append([name, f"{_points(r.average):.1f}", "–", "–", "no common seed"])
            continue
        rows.append([name, f"{_points(r.average):.1f}", f"{_points(r.comparison.diff):+.1f}",
                     format_ci(r.comparison.ci), _significance_cell(r.comparison)])
    rows.insert(item.rank - 1, [f"> {item.method}", f"{_points(item.average):.1f}", "", "", ""])
    header = ["baseline method", "avg", f"Δ {item.method} − it", "95% CI", "significant"]
    lines += ["  " + line for line in text_table(header, rows, left=(0, 4))]
    return lines


def format_check(result: CheckResult, baseline_name: str) -> str:
    failed = result.regressions
    status = "PASS" if result.passed else "FAIL"
    seed_runs = sum(len(seeds) for _, _, seeds in result.missing_seeds)
    incomplete = (f", {seed_runs} seed run(s) missing" if seed_runs else "") + (
        f", {len(result.unreadable)} unreadable record(s)" if result.unreadable else "")
    counts = (f"{len(failed)} regression(s) in {len(result.rows)} method(s) checked against {baseline_name}, "
              f"{len(result.new)} new, {len(result.missing)} not rerun{incomplete} "
              f"(tolerance: {result.tolerance:g} pt on the average, {result.task_tolerance:g} pt per task)")
    lines = [f"bench check: {status} — {counts}"]
    if result.rows:
        lines += text_table(["suite", "method", "seeds", "baseline", "current", "Δ", "95% CI", "verdict"],
                            _check_rows(result), left=(0, 1, 7))
        lines.append("accuracy %, mean over paired seeds; Δ = current − baseline in points; a regression is a drop "
                     "beyond the tolerance that is also significant")
        lines += _detail_lines(result)
    for item in result.new:
        lines += _rank_lines(item)
    if result.missing:
        names = [m if len({s for s, _ in result.missing}) == 1 else f"{s}:{m}" for s, m in result.missing]
        shown = ", ".join(names[:8]) + (f", … ({len(names) - 8} more)" if len(names) > 8 else "")
        lines.append(f"in the baseline but not in the results (FAIL: not checked): {shown}")
    if result.missing_seeds:
        runs = [f"{suite} {method} seed{'s' if len(seeds) > 1 else ''} {format_seeds(seeds)}"
                for suite, method, seeds in result.missing_seeds]
        shown = "; ".join(runs[:8]) + (f"; … ({len(runs) - 8} more)" if len(runs) > 8 else "")
        lines.append(f"baseline seed runs not in the results (FAIL: not checked): {shown}")
    if result.unreadable:
        shown = ", ".join(result.unreadable[:8]) + (f", … ({len(result.unreadable) - 8} more)"
                                                    if len(result.unreadable) > 8 else "")
        lines.append(f"unreadable records (FAIL: not checked; see the warnings above): {shown}")
    if result.unmatched_suites:
        lines.append(f"suite configurations with no baseline (not checked): {', '.join(result.unmatched_suites)}")
    lines += [f"failed run, not in the baseline (not checked): {line}" for line in result.failed_unchecked]
    if result.incomplete:
        lines.append("a gate fails on baseline records it cannot check: rerun them (with --resume, only what is "
                     "missing or unreadable is computed), or narrow the check with --methods/--seeds")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- compare


def find_method(runs: Runs, label: str, where: str) -> None:
    known = sorted({m for _, m in runs})
    if label in known:
        return
    matches = close_matches(label, known)
    hint = f"did you mean: {', '.join(matches)}?" if matches else f"recorded: {', '.join(known)}"
    raise BenchError(f"no records of method '{label}' in '{where}'; {hint}")


def compare_methods(runs: Runs, a: str, b: str, *, where: str = "results", seeds: Iterable[int] | None = None,
                    resamples: int = DEFAULT_RESAMPLES) -> list[Comparison]:
    """A vs B on every suite configuration where both were run (on ``seeds`` only, when given)."""
    find_method(runs, a, where)
    find_method(runs, b, where)
    suites = sorted({s for s, m in runs if m == a} & {s for s, m in runs if m == b})
    if not suites:
        suites_a = ", ".join(sorted({s for s, m in runs if m == a}))
        suites_b = ", ".join(sorted({s for s, m in runs if m == b}))
        raise BenchError(f"'{a}' and '{b}' were never run on the same suite configuration "
                         f"('{a}': {suites_a}; '{b}': {suites_b})")
    chosen = select_seeds({(s, m): runs[s, m] for s in suites for m in (a, b)}, seeds)
    for label in (a, b):
        if not any(m == label for _, m in chosen):
            recorded = sorted({seed for s in suites for seed in runs[s, label]})
            raise BenchError(f"'{label}' has no records with --seeds {format_seeds(sorted(set(seeds or [])))} "
                             f"(recorded seeds: {format_seeds(recorded)})")
    suites = [s for s in suites if (s, a) in chosen and (s, b) in chosen]
    paired = [s for s in suites if pair_seeds(chosen[s, a], chosen[s, b]).common]
    if not paired:
        first = suites[0] if suites else None
        if first is None:
            raise BenchError(f"'{a}' and '{b}' share no suite configuration with the selected seeds")
        compare_runs(chosen[first, a], chosen[first, b])  # raises: the seeds do not overlap
    return [compare_runs(chosen[s, a], chosen[s, b], resamples=resamples) for s in paired]
