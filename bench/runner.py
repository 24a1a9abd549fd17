"""The runner: joins a suite's MergeProblem and the registered methods, and writes one record per job.

resolve names -> plan jobs (method x hyperparameters x seed) -> skip recorded ones on --resume -> load the
suite once -> for each job: seed, merge (timed), evaluate (timed), write the record atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
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

from bench import registry
from bench.errors import BenchError, MethodNotApplicable, missing_artifact_error
from bench.measure import PeakMemory, PhaseTimer, environment, resolve_device, torch_threads
from bench.problem import MergeContext, MergeProblem, PerTaskWeights, StateDict
from bench.store import ResultsStore, config_hash, pack_correct

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


@dataclass
class RunSummary:
    computed: list[dict[str, Any]] = field(default_factory=list)
    skipped_recorded: int = 0
    not_applicable: list[tuple[str, str]] = field(default_factory=list)
    suite_key: dict[str, Any] = field(default_factory=dict)
    planned: list[str] = field(default_factory=list)  # config hashes of every job of this execution


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
        "suite_params": dataclasses.asdict(suite_params),
        "method": method.name,
        "params": dataclasses.asdict(params),
        "seed": seed,
    }


Grid = Mapping[str, Sequence[Mapping[str, Any]]]  # method -> list of hyperparameter overrides (a sweep)


def plan_jobs(config: RunConfig, suite_params: Any, grid: Grid | None = None) -> list[Job]:
    """Every (method, hyperparameters, seed) to run; ``grid`` gives a method several points (sweeps)."""
    grid = grid or {}
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
                jobs.append(Job(spec, params, seed, record_key(suite, suite_params, spec, params, seed)))
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


def evaluate(
    problem: MergeProblem, merged: StateDict | PerTaskWeights, device: torch.device, progress: bool = False
) -> dict:
    """Score the merged weights on every task's test split."""
    per_task = {}
    shared = None if isinstance(merged, PerTaskWeights) else to_device(merged, device)
    for task in tqdm(problem.tasks, desc="evaluating", leave=False, disable=not progress, file=sys.stderr):
        weights = to_device(merged[task], device) if shared is None else shared
        per_task[task] = problem.evaluate(weights, task, device)
    return per_task


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
        entry = {
            "accuracy": m.accuracy,
            "loss": m.loss,
            "num_examples": m.num_examples,
            "correct": pack_correct(m.correct),
        }
        if reference:
            entry["normalized_accuracy"] = m.accuracy / reference[task] if reference[task] > 0 else None
        tasks[task] = entry
    accuracies = [m.accuracy for m in metrics.values()]
    normalized = [t["normalized_accuracy"] for t in tasks.values() if t.get("normalized_accuracy") is not None]
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
        "tasks": tasks,
        "average": float(np.mean(accuracies)),
        "normalized_average": float(np.mean(normalized)) if len(normalized) == len(tasks) else None,
        "timings": dict(timer.seconds),
        "peak_memory": memory,
        "environment": env,
        "problem": problem.describe(),
        "notes": notes,
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
    with torch_threads(threads):
        with timer.phase("merge"):
            merged = job.method.fn(ctx, job.params)
        timer.seconds["merge"] -= timer.seconds["adapt"]  # adapt is timed inside the method call
        with timer.phase("eval"):
            metrics = evaluate(problem, merged, device, progress)
        env = {**env, "torch_threads": torch.get_num_threads()}
    record = build_record(job, problem, metrics, reference, timer, memory.read(), env, ctx.notes)
    if "samples_per_task" in ctx.notes:  # what the method actually drew (a split may hold fewer than asked)
        record["samples_per_task"] = ctx.notes["samples_per_task"]
    return record


def reference_accuracies(
    problem: MergeProblem, config: RunConfig, suite_params: Any, store: ResultsStore, device, load_seconds, env, seed
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Per-task accuracy of each expert on its own task (the `individual` row), from the store or computed.

    Returns the accuracies and the record when this call computed (and stored) it.
    """
    spec = registry.get_method(REFERENCE_FOR_NORMALIZATION)
    params = registry.build_params(spec.name, spec.params, {})
    key = record_key(registry.get_suite(config.suite).name, suite_params, spec, params, seed)
    record = store.get(key)
    computed = None
    if record is None:
        record = computed = _normalize_reference(run_job(Job(spec, params, seed, key), problem, device, load_seconds,
                                                         None, env))
        store.put(record)
    return {task: entry["accuracy"] for task, entry in record["tasks"].items()}, computed


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


def execute(
    config: RunConfig,
    grid: Grid | None = None,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> RunSummary:
    """Run every planned job not yet recorded (with --resume) and write its record."""
    device = resolve_device(config.device)
    suite_spec = registry.get_suite(config.suite)
    suite_params = registry.build_params("suite", suite_spec.params, config.suite_overrides)
    jobs = plan_jobs(config, suite_params, grid)
    if not config.seeds:
        raise BenchError("--seeds is empty; give at least one seed, e.g. --seeds 0")
    store = ResultsStore(config.results_dir)
    summary = RunSummary(suite_key={"suite": suite_spec.name, "suite_params": dataclasses.asdict(suite_params)},
                         planned=[config_hash(job.key) for job in jobs])
    if config.resume:
        pending = [job for job in jobs if not store.has(job.key)]
        summary.skipped_recorded = len(jobs) - len(pending)
        if summary.skipped_recorded:
            log(f"resume: {summary.skipped_recorded} of {len(jobs)} configurations already recorded, skipping them")
    else:
        pending = jobs
    pending = drop_inapplicable(pending, suite_spec, suite_params, summary, log)
    if not pending:
        return summary

    load_timer = PhaseTimer(device)
    problem = load_problem(config, suite_params, load_timer)
    load_seconds = load_timer.seconds["load"]
    env = environment(device)
    references: dict[int, dict[str, float]] = {}
    shared: dict = {}  # reused across jobs: task-vector stacks, cached teacher logits (see MergeContext.memo)
    written: set[str] = set()  # config hashes recorded by this execution (the reference row may come early)

    bar = tqdm(pending, desc="methods", unit="run", disable=not config.progress, file=sys.stderr)
    for job in bar:
        bar.set_postfix_str(f"{job.method.name} seed={job.seed}")
        if config_hash(job.key) in written:
            continue
        if job.method.name == REFERENCE_FOR_NORMALIZATION:
            reference = None
        else:
            if job.seed not in references:
                references[job.seed], reference_record = reference_accuracies(
                    problem, config, suite_params, store, device, load_seconds, env, job.seed
                )
                if reference_record is not None:
                    written.add(reference_record["config_hash"])
                    summary.computed.append(reference_record)
            reference = references[job.seed]
        try:
            record = run_job(job, problem, device, load_seconds, reference, env, config.progress, shared)
        except MethodNotApplicable as reason:
            summary.not_applicable.append((job.method.name, str(reason)))
            log(f"skipped {job.method.name}: {reason}")
            continue
        if reference is None:
            record = _normalize_reference(record)
        store.put(record)
        written.add(record["config_hash"])
        summary.computed.append(record)
    return summary
