"""The runner: joins a suite's MergeProblem and the registered methods, and writes one record per job.

resolve names -> plan jobs (method x hyperparameters x seed) -> skip recorded ones on --resume -> load the
suite once -> for each job: seed, merge (timed), evaluate (timed), write the record atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bench import execution, registry
from bench.disk import require_directory
from bench.errors import BenchError, missing_artifact_error
from bench.execution import Outcome, Setting, Task
from bench.executors import Executor, InProcessExecutor
from bench.measure import PeakMemory, PhaseTimer, resolve_device, torch_threads
from bench.model_pool import describe_nonfinite, nonfinite_keys
from bench.problem import MergeContext, MergeProblem, PerTaskWeights, StateDict
from bench.store import FAILED, ResultsStore, config_hash, finite_or_none, is_failed, pack_correct

REFERENCE_FOR_NORMALIZATION = "individual"


def default_cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "merge-bench"))


@dataclass
class RunConfig:
    suite: str
    methods: Sequence[str]  # names, or ["all"]
    seeds: Sequence[int] = (0,)
    device: str = "auto"
    method_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    suite_overrides: Mapping[str, Any] = field(default_factory=dict)
    results_dir: Path = Path("results")
    cache_dir: Path = field(default_factory=default_cache_dir)
    resume: bool = False
    progress: bool = True


@dataclass
class Job:
    method: registry.MethodSpec
    params: Any
    seed: int
    key: dict[str, Any]
    overrides: Mapping[str, Any] = field(default_factory=dict)  # the raw values ``params`` was built from


@dataclass
class RunSummary:
    computed: list[dict[str, Any]] = field(default_factory=list)
    skipped_recorded: int = 0
    not_applicable: list[tuple[str, str]] = field(default_factory=list)
    suite_key: dict[str, Any] = field(default_factory=dict)
    planned: list[str] = field(default_factory=list)  # config hashes of every job of this execution
    failed: list[tuple[str, str]] = field(default_factory=list)  # (method label, reason) of runs recorded as failed


def resolve_method_names(names: Sequence[str]) -> list[str]:
    known = registry.methods()
    if list(names) == ["all"]:
        return sorted(known, key=lambda n: (registry.FAMILIES.index(known[n].family), n))
    resolved = []
    for name in names:
        registry.get_method(name)  # raises with close matches
        if name not in resolved:
            resolved.append(name)
    return resolved


def record_key(suite: str, suite_params: Any, method: registry.MethodSpec, params: Any, seed: int) -> dict:
    return {
        "suite": suite,
        "suite_params": _recordable(dataclasses.asdict(suite_params)),
        "method": method.name,
        "params": _recordable(dataclasses.asdict(params)),
        "seed": seed,
    }


def _recordable(values: dict[str, Any]) -> dict[str, Any]:
    """Parameters as records hold them (strict JSON): a non-finite float, which only a parameter declared with
    ``finite=False`` can take, as its text (``inf``)."""
    return {name: registry.format_value(value) if isinstance(value, float) and not math.isfinite(value) else value
            for name, value in values.items()}


Grid = Mapping[str, Sequence[Mapping[str, Any]]]  # method -> list of hyperparameter overrides (a sweep)


MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes [0, 2**32); torch takes these too


def seed_problem(seed: Any) -> str | None:
    """Why ``seed`` cannot seed a run (None when it can); ``seed_problem(None)`` is the out-of-range phrase."""
    if seed is not None and isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED:
        return None
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        return f"is a {type(seed).__name__}, not an integer seed"
    return f"is outside [0, {MAX_SEED}], the seeds torch and numpy accept; write e.g. --seeds 0,1,2"


def _shown(value: Any, width: int = 40) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python prints
        return "(a number too large to print)"
    return text if len(text) <= width else text[: width - 3] + "..."


def plan_jobs(config: RunConfig, suite_params: Any, grid: Grid | None = None) -> list[Job]:
    """Every (method, hyperparameters, seed) to run; ``grid`` gives a method several points (sweeps)."""
    grid = grid or {}
    for seed in config.seeds:
        if problem := seed_problem(seed):
            raise BenchError(f"seed {_shown(seed)} {problem}")
    names = resolve_method_names(config.methods)
    for name in [*config.method_overrides, *grid]:
        if name not in names:
            raise BenchError(f"'{name}' has parameters set (--set/--param) but is not among the selected methods "
                             f"({', '.join(names)}); add it to --methods")
    suite = registry.get_suite(config.suite).name  # a suite file's path gives its name (custom:<stem>)
    jobs = []
    for name in names:
        spec = registry.get_method(name)
        for point in grid.get(name, [{}]):
            overrides = {**config.method_overrides.get(name, {}), **point}
            params = registry.build_params(name, spec.params, overrides)
            for seed in config.seeds:
                jobs.append(Job(spec, params, seed, record_key(suite, suite_params, spec, params, seed), overrides))
    return jobs


def default_params(spec: registry.MethodSpec | registry.SuiteSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec.params())


def non_default(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if defaults.get(k) != v}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_args(suite_overrides: Mapping[str, Any]) -> str:
    """The ``--set suite.X=Y`` flags that reproduce these suite parameters on the ``bench prepare`` line."""
    return " ".join(f"--set suite.{name}={value}" for name, value in sorted(suite_overrides.items()))


def load_problem(config: RunConfig, suite_params: Any, timer: PhaseTimer) -> MergeProblem:
    spec = registry.get_suite(config.suite)
    # What every method needs; a split only some methods read (e.g. a train split `bench prepare --methods` left
    # out) is checked when one asks for it, and that method is skipped with the reason.
    missing = spec.missing(suite_params, Path(config.cache_dir), registry.SCORED_SPLITS_ONLY)
    if missing:
        raise missing_artifact_error(config.suite, missing[0] + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                 else ""), config.cache_dir,
                                     prepare_args(config.suite_overrides))
    with timer.phase("load"):
        problem = spec.fn(suite_params, Path(config.cache_dir), config.progress)
        problem.model_pool().check()  # from the readers' headers: no expert is read here
    return problem


def to_device(weights: StateDict, device: torch.device) -> StateDict:
    return {k: v.to(device) for k, v in weights.items()}


class NonFiniteWeights(Exception):
    """Weights to be evaluated hold NaN or ±inf in ``keys`` (``task``: whose weights, for per-task results)."""

    def __init__(self, weights: StateDict, keys: list[str], task: str | None = None) -> None:
        super().__init__(f"non-finite weights in {keys[0]!r}")
        self.weights, self.keys, self.task = weights, keys, task


def require_finite(weights: StateDict, task: str | None = None) -> None:
    """Raise :class:`NonFiniteWeights` when a tensor of ``weights`` is not finite (one sum per tensor, on the
    device the weights are on: see :func:`bench.model_pool.all_finite`)."""
    keys = nonfinite_keys(weights)
    if keys:
        raise NonFiniteWeights(weights, keys, task)


def evaluate(
    problem: MergeProblem, merged: StateDict | PerTaskWeights, device: torch.device, progress: bool = False
) -> dict:
    """Score the merged weights on every task's test split; weights holding NaN or ±inf are never scored
    (:class:`NonFiniteWeights` before the first evaluation of them)."""
    per_task = {}
    shared = None if isinstance(merged, PerTaskWeights) else to_device(merged, device)
    if shared is not None:
        require_finite(shared)
    for task in tqdm(problem.tasks, desc="evaluating", leave=False, disable=not progress, file=sys.stderr):
        weights = to_device(merged.for_task(task), device) if shared is None else shared
        if shared is None:
            require_finite(weights, task)
        per_task[task] = problem.evaluate(weights, task, device)
    return per_task


def nonfinite_reason(problem: MergeProblem, failure: NonFiniteWeights) -> str:
    """Why weights are not finite, as a failed record's reason; a BenchError (one line naming the expert and the
    tensor) when the base or an expert itself holds NaN or ±inf there. Only the affected keys of the inputs are
    read, one tensor at a time."""
    culprit = problem.model_pool().find_nonfinite(failure.keys)
    if culprit is not None:
        raise nonfinite_input_error(culprit)
    first = failure.keys[0]
    where = f" for task '{failure.task}'" if failure.task else ""
    affected = f" ({len(failure.keys)} of {len(failure.weights)} tensors)" if len(failure.keys) > 1 else ""
    return (f"merged weights{where} not finite: tensor '{first}' holds {describe_nonfinite(failure.weights[first])}"
            f"{affected}; the base and experts are finite there, so the merge overflowed or diverged")


def nonfinite_input_error(culprit: str) -> BenchError:
    return BenchError(f"{culprit}; every result from it would be meaningless: fix or replace that checkpoint")


def merge_checked(method: registry.MethodSpec, ctx: MergeContext, params: Any) -> StateDict | PerTaskWeights:
    """``method.fn(ctx, params)``; when it crashes (an SVD or a sampler that meets NaN raises before any output
    exists), the base and experts are scanned, tensor by tensor, and a NaN or ±inf among them is reported as the
    cause (one line naming the expert and the tensor) instead of the crash. Nothing is scanned on success."""
    try:
        result = method.fn(ctx, params)
    except (BenchError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception:
        pool = ctx.problem.model_pool()
        culprit = pool.find_nonfinite(list(pool.base))
        if culprit is not None:
            raise nonfinite_input_error(culprit) from None
        raise
    if isinstance(result, PerTaskWeights) != (method.output == "per_task"):
        raise TypeError(f"method {method.name} declares output={method.output!r} but returned "
                        f"{type(result).__name__}; register it with the output it returns")
    if isinstance(result, PerTaskWeights) and result.per_task_bytes is not None:
        ctx.notes["per_task_bytes"] = int(result.per_task_bytes)
    return result


def finite_notes(value: Any) -> Any:
    """A method's notes with every non-finite float as None (null): diagnostics of a diverged run may hold NaN."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {key: finite_notes(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_notes(item) for item in value]
    return value


def build_record(
    job: Job,
    problem: MergeProblem,
    metrics: dict,
    reference: Mapping[str, float] | None,
    timer: PhaseTimer,
    memory: dict,
    env: dict,
    notes: dict,
) -> dict[str, Any]:
    tasks = {}
    for task, m in metrics.items():
        tasks[task] = {
            "accuracy": m.accuracy,
            "loss": finite_or_none(m.loss),  # null where a task has no loss (NaN), e.g. a generation task
            "num_examples": m.num_examples,
            "correct": pack_correct(m.correct),
        }
    accuracies = [m.accuracy for m in metrics.values()]
    record = {
        **_record_head(job, problem),
        "tasks": tasks,
        "average": float(np.mean(accuracies)),
        "normalized_average": None,
        **_record_tail(timer, memory, env, problem, notes),
    }
    return normalize(record, reference) if reference else record


def normalize(record: dict[str, Any], reference: Mapping[str, float]) -> dict[str, Any]:
    """``record`` with each task's accuracy divided by the reference (the `individual` row's) accuracy on that
    task, and their mean; the driver applies it to the records workers hand back."""
    for task, entry in record["tasks"].items():
        entry["normalized_accuracy"] = entry["accuracy"] / reference[task] if reference[task] > 0 else None
    normalized = [t["normalized_accuracy"] for t in record["tasks"].values() if t["normalized_accuracy"] is not None]
    record["normalized_average"] = float(np.mean(normalized)) if len(normalized) == len(record["tasks"]) else None
    return record


def build_failed_record(job: Job, problem: MergeProblem, reason: str, timer: PhaseTimer, memory: dict, env: dict,
                        notes: dict) -> dict[str, Any]:
    """The record of a run that produced no scores: ``"status": "failed"`` and its ``"reason"``, no ``tasks`` and
    no averages (reports list it as failed and never average it; ``--resume`` counts it as recorded)."""
    return {**_record_head(job, problem), "status": FAILED, "reason": reason,
            **_record_tail(timer, memory, env, problem, notes)}


def _record_head(job: Job, problem: MergeProblem) -> dict[str, Any]:
    return {
        "schema": 1,
        "config_hash": config_hash(job.key),
        **job.key,
        "suite_variant": non_default(job.key["suite_params"], default_params(registry.get_suite(job.key["suite"]))),
        "variant": non_default(job.key["params"], default_params(job.method)),
        "protocol": problem.protocol,
        "family": job.method.family,
        "data_access": job.method.data,
        "samples_per_task": job.method.samples_per_task(job.params),
        "output": job.method.output,
    }


def _record_tail(timer: PhaseTimer, memory: dict, env: dict, problem: MergeProblem, notes: dict) -> dict[str, Any]:
    return {
        "timings": dict(timer.seconds),
        "peak_memory": memory,
        "environment": env,
        "problem": problem.describe(),
        "notes": finite_notes(notes),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_job(
    job: Job,
    problem: MergeProblem,
    device: torch.device,
    load_seconds: float,
    reference: Mapping[str, float] | None,
    env: dict,
    progress: bool = False,
    shared: dict | None = None,
) -> dict[str, Any]:
    seed_everything(job.seed)
    timer = PhaseTimer(device)
    timer.seconds["load"] = load_seconds
    memory = PeakMemory(device)
    memory.reset()
    ctx = MergeContext(
        problem=problem,
        seed=job.seed,
        device=device,
        generator=torch.Generator().manual_seed(job.seed),
        timer=timer,
        progress=progress,
        shared={} if shared is None else shared,
    )
    threads = problem.cpu_threads if device.type == "cpu" else None
    failure = None
    with torch_threads(threads):
        with timer.phase("merge"):
            merged = merge_checked(job.method, ctx, job.params)
        timer.seconds["merge"] -= timer.seconds["adapt"]  # adapt is timed inside the method call
        with timer.phase("eval"):
            try:
                metrics = evaluate(problem, merged, device, progress)
            except NonFiniteWeights as bad:
                failure = bad
        env = {**env, "torch_threads": torch.get_num_threads()}
    if failure is not None:
        reason = nonfinite_reason(problem, failure)  # raises when an input itself is not finite
        return build_failed_record(job, problem, reason, timer, memory.read(), env, ctx.notes)
    record = build_record(job, problem, metrics, reference, timer, memory.read(), env, ctx.notes)
    if "samples_per_task" in ctx.notes:  # what the method actually drew (a split may hold fewer than asked)
        record["samples_per_task"] = ctx.notes["samples_per_task"]
    return record


def _normalize_reference(record: dict[str, Any]) -> dict[str, Any]:
    for entry in record["tasks"].values():
        entry["normalized_accuracy"] = 1.0 if entry["accuracy"] > 0 else None
    record["normalized_average"] = 1.0
    return record


def drop_inapplicable(jobs: list[Job], suite_spec: registry.SuiteSpec, suite_params: Any, summary: RunSummary,
                      log: Callable[[str], None]) -> list[Job]:
    """The jobs whose method's needs the suite configuration meets; the others are reported, before anything is
    loaded, with what the suite lacks."""
    kept, reported = [], set()
    for job in jobs:
        lacking = suite_spec.lacks(suite_params, job.method)
        if not lacking:
            kept.append(job)
        elif job.method.name not in reported:
            reported.add(job.method.name)
            reason = f"suite {suite_spec.name} cannot give {' or '.join(lacking)} " \
                     f"({'; '.join(registry.CAPABILITIES[need] for need in lacking)})"
            summary.not_applicable.append((job.method.name, reason))
            log(f"skipped {job.method.name}: {reason}")
    return kept


def _reference_key(suite: str, suite_params: Any, seed: int) -> dict[str, Any]:
    spec = registry.get_method(REFERENCE_FOR_NORMALIZATION)
    return record_key(suite, suite_params, spec, registry.build_params(spec.name, spec.params, {}), seed)


def _task(job: Job, reference: bool = False) -> Task:
    return Task(job.method.name, tuple(sorted((k, v) for k, v in job.overrides.items())), job.seed,
                config_hash(job.key), reference)


class _Recorder:
    """The driver's side of an execution: every outcome an executor delivers is written here, and only here."""

    def __init__(self, store: ResultsStore, summary: RunSummary, log: Callable[[str], None], bar: Any) -> None:
        self.store, self.summary, self.log, self.bar = store, summary, log, bar
        self.references: dict[int, dict[str, float]] = {}
        self.written: set[str] = set()

    def deliver(self, task: Task, outcome: Outcome) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"{task.method} seed={task.seed}")
        if outcome.error is not None:
            raise BenchError(outcome.error)
        if outcome.not_applicable is not None:
            self.summary.not_applicable.append((task.method, outcome.not_applicable))
            self.log(f"skipped {task.method}: {outcome.not_applicable}")
            return
        record = outcome.record
        assert record is not None and record["config_hash"] == task.config_hash
        if record["config_hash"] in self.written:  # one record per configuration, whatever an executor retried
            return
        if is_failed(record):
            path = self.store.put(record)
            inner = ",".join(f"{k}={registry.format_value(v)}" for k, v in sorted(record["variant"].items()))
            label = f"{task.method}({inner})" if inner else task.method
            self.summary.failed.append((label, record["reason"]))
            self.log(f"failed: {label} seed {task.seed}: {record['reason']}; recorded as failed in {path} "
                     "(--resume will not rerun it; delete that file to rerun it)")
        else:
            if task.reference:
                record = _normalize_reference(record)
                self.references[task.seed] = {t: entry["accuracy"] for t, entry in record["tasks"].items()}
            else:
                record = normalize(record, self.references[task.seed])
            self.store.put(record)
        self.written.add(record["config_hash"])
        self.summary.computed.append(record)


def _plan_references(pending: list[Job], suite: str, suite_params: Any, store: ResultsStore,
                     recorder: _Recorder) -> tuple[list[Task], list[Job]]:
    """The reference (`individual`) rows to compute first, and the other jobs. A seed's reference comes from the
    store when recorded and not rerun; every job of a seed needs it, so it runs before them."""
    reference_tasks: dict[int, Task] = {}
    others = []
    for job in pending:
        if job.method.name == REFERENCE_FOR_NORMALIZATION:
            reference_tasks[job.seed] = _task(job, reference=True)
        else:
            others.append(job)
    for seed in sorted({job.seed for job in others} - set(reference_tasks)):
        key = _reference_key(suite, suite_params, seed)
        record = store.get(key)
        if record is None:
            spec = registry.get_method(REFERENCE_FOR_NORMALIZATION)
            reference_tasks[seed] = _task(Job(spec, None, seed, key), reference=True)
        elif is_failed(record):
            raise _failed_reference(seed, record["reason"], store.path_for(key))
        else:
            recorder.references[seed] = {task: entry["accuracy"] for task, entry in record["tasks"].items()}
    return [reference_tasks[seed] for seed in sorted(reference_tasks)], others


def _failed_reference(seed: int, reason: str, path: Path) -> BenchError:
    return BenchError(f"the {REFERENCE_FOR_NORMALIZATION} reference row of seed {seed} failed ({reason}); no method "
                      f"can be normalized against it: delete {path} once its cause is fixed")


def execute(
    config: RunConfig,
    grid: Grid | None = None,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    executor: Executor | None = None,
    plugins: Sequence[str] = (),
) -> RunSummary:
    """Run every planned job not yet recorded (with --resume) on ``executor`` (default: this process, one job
    after another) and write its record; only this function writes records."""
    executor = executor or InProcessExecutor(config.progress)
    suite_spec = registry.get_suite(config.suite)
    suite_params = registry.build_params("suite", suite_spec.params, config.suite_overrides)
    jobs = plan_jobs(config, suite_params, grid)
    if not config.seeds:
        raise BenchError("--seeds is empty; give at least one seed, e.g. --seeds 0")
    # The driver's device: where in-process jobs run; other executors' workers resolve --device themselves.
    device = resolve_device(config.device if executor.in_process else "cpu")
    store = ResultsStore(config.results_dir)
    store.remove_stale()  # temporaries of killed runs (never those of a live one)
    summary = RunSummary(suite_key={"suite": suite_spec.name, "suite_params": dataclasses.asdict(suite_params)},
                         planned=[config_hash(job.key) for job in jobs])
    if config.resume:
        pending, failed = [], []
        for job in jobs:
            record = store.get(job.key)
            if record is None:
                pending.append(job)
            elif is_failed(record):
                failed.append(store.path_for(job.key))
        summary.skipped_recorded = len(jobs) - len(pending)
        if summary.skipped_recorded:
            log(f"resume: {summary.skipped_recorded} of {len(jobs)} configurations already recorded, skipping them")
        if failed:
            log(f"resume: {len(failed)} of them failed and are not rerun (the same configuration fails the same "
                f"way); delete a failed record to rerun it, e.g. {failed[0]}")
    else:
        pending = jobs
    pending = drop_inapplicable(pending, suite_spec, suite_params, summary, log)
    if not pending:
        return summary
    require_directory(config.results_dir, "--results")  # before the suite loads, not at the first record

    # Loaded here once whatever the executor: a missing artefact or mismatched checkpoint fails in one line
    # before anything is submitted, and an embedded suite is built once, not by each worker at the same time.
    load_timer = PhaseTimer(device)
    problem = load_problem(config, suite_params, load_timer)
    setting = Setting.of(config, plugins)
    if executor.in_process:
        execution.adopt(setting, config, problem, suite_params, device, load_timer.seconds["load"])
    del problem
    bar = tqdm(total=0, desc="runs", unit="run", disable=not config.progress, file=sys.stderr)
    recorder = _Recorder(store, summary, log, bar)
    try:
        references, others = _plan_references(pending, suite_spec.name, suite_params, store, recorder)
        bar.total = len(references) + len(others)
        bar.refresh()
        executor.start(setting)
        if not executor.in_process:
            log(f"running {bar.total} job(s) on {executor.describe()}")
        if references:
            executor.run(setting, references, recorder.deliver)
            for task in references:
                if task.seed not in recorder.references and any(job.seed == task.seed for job in others):
                    key = _reference_key(suite_spec.name, suite_params, task.seed)
                    record = store.get(key)
                    raise _failed_reference(task.seed, record["reason"] if record else "no record",
                                            store.path_for(key))
        executor.run(setting, [_task(job) for job in others], recorder.deliver)
    finally:
        executor.stop()
        bar.close()
        if executor.in_process:
            execution.release()
    return summary
