"""What an executor's worker runs: one job of a plan, from plain picklable descriptions, to a record.

The driver (:func:`bench.runner.execute`) plans jobs and writes every record; an executor
(:mod:`bench.executors`) hands :class:`Task` s to workers (the driver's own process, a local process pool, or
Ray workers on other nodes) and each worker calls :func:`compute`. A worker loads a suite configuration once
and keeps it for the tasks that follow (experts are not reloaded per job), and it returns records without the
normalized accuracies: the driver adds those from the ``individual`` row (:func:`bench.runner.normalize`).
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import registry
from bench.errors import BenchError, MethodNotApplicable


@dataclass(frozen=True)
class Setting:
    """A suite configuration as every worker rebuilds it: the names and raw values the user gave."""

    suite: str
    suite_overrides: tuple[tuple[str, str], ...]
    cache_dir: str
    device: str
    plugins: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: Any, plugins: Sequence[str] = ()) -> Setting:
        """The setting of a :class:`bench.runner.RunConfig`."""
        return cls(config.suite, tuple(sorted((k, str(v)) for k, v in config.suite_overrides.items())),
                   str(config.cache_dir), config.device, tuple(plugins))


@dataclass(frozen=True)
class Task:
    """One job: a method with its hyperparameters (raw override values) and a seed, and the configuration hash
    the driver planned for it (a worker whose code computes another hash refuses the task)."""

    method: str
    overrides: tuple[tuple[str, Any], ...]
    seed: int
    config_hash: str
    reference: bool = False  # the `individual` row, whose accuracies normalize the others


@dataclass
class Outcome:
    """What a worker hands back: a record (ok or failed), or why the job does not apply, or a one-line error."""

    record: dict[str, Any] | None = None
    not_applicable: str | None = None
    error: str | None = None
    worker: dict[str, Any] = field(default_factory=dict)  # where it ran: host, process, executor's extras


def import_plugins(modules: Sequence[str]) -> None:
    """Import the modules that register extra methods or suites (``--plugin`` or ``BENCH_PLUGINS``)."""
    for name in modules:
        try:
            importlib.import_module(name.strip())
        except ImportError as exc:
            raise BenchError(f"cannot import plugin module '{name}': {exc}; is it on PYTHONPATH?") from None


@dataclass
class _Loaded:
    setting: Setting
    config: Any
    problem: Any
    suite_params: Any
    device: Any
    load_seconds: float
    env: dict[str, Any]
    shared: dict = field(default_factory=dict)  # MergeContext.memo across this worker's jobs


_loaded: _Loaded | None = None  # one suite configuration per worker process (the last one asked for)


def adopt(setting: Setting, config: Any, problem: Any, suite_params: Any, device: Any, load_seconds: float) -> None:
    """Make an already loaded problem this process's (the driver's own, for the in-process executor)."""
    global _loaded
    from bench.measure import environment

    _loaded = _Loaded(setting, config, problem, suite_params, device, load_seconds, environment(device))


def release() -> None:
    """Forget this process's loaded problem (the driver's, once its run is over)."""
    global _loaded
    _loaded = None


def _load(setting: Setting) -> _Loaded:
    global _loaded
    if _loaded is not None and _loaded.setting == setting:
        return _loaded
    _loaded = None  # the previous configuration's experts go before the next ones load
    from bench.measure import PhaseTimer, resolve_device
    from bench.runner import RunConfig, load_problem

    import_plugins(setting.plugins)
    config = RunConfig(suite=setting.suite, methods=[], suite_overrides=dict(setting.suite_overrides),
                       cache_dir=Path(setting.cache_dir), device=setting.device, progress=False)
    spec = registry.get_suite(config.suite)
    suite_params = registry.build_params("suite", spec.params, config.suite_overrides)
    device = resolve_device(config.device)
    timer = PhaseTimer(device)
    problem = load_problem(config, suite_params, timer)
    adopt(setting, config, problem, suite_params, device, timer.seconds["load"])
    assert _loaded is not None
    return _loaded


def where() -> dict[str, Any]:
    """Where this worker runs, as records say it (``environment.host``, ``environment.pid``)."""
    return {"host": platform.node(), "pid": os.getpid()}


def compute(setting: Setting, task: Task, progress: bool = False, extra: Mapping[str, Any] | None = None) -> Outcome:
    """Run ``task`` in this process (loading ``setting`` unless it is the one loaded) and return its outcome.

    Never raises for what a user can fix: a :class:`BenchError` comes back as ``Outcome.error``.
    """
    from bench.runner import Job, record_key, run_job
    from bench.store import config_hash

    place = {**where(), **(extra or {})}
    try:
        loaded = _load(setting)
        spec = registry.get_method(task.method)
        params = registry.build_params(spec.name, spec.params, dict(task.overrides))
        key = record_key(registry.get_suite(setting.suite).name, loaded.suite_params, spec, params, task.seed)
        if config_hash(key) != task.config_hash:
            raise BenchError(f"{place['host']} computes configuration {config_hash(key)} for {task.method} seed "
                             f"{task.seed}, not the driver's {task.config_hash}: its merge-bench, plugins or suite "
                             "files differ from the driver's; install the same version on every node")
        env = {**loaded.env, **place}
        record = run_job(Job(spec, params, task.seed, key), loaded.problem, loaded.device, loaded.load_seconds,
                         None, env, progress, loaded.shared)
        return Outcome(record=record, worker=place)
    except MethodNotApplicable as reason:
        return Outcome(not_applicable=str(reason), worker=place)
    except BenchError as exc:
        return Outcome(error=str(exc), worker=place)
