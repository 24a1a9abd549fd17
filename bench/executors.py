"""Executors: who runs the planned jobs. The driver (:func:`bench.runner.execute`) plans, writes every record and
draws the progress bar; an executor only hands :class:`bench.execution.Task` s to workers and each finished
:class:`bench.execution.Outcome` back to the driver's ``deliver``, as it finishes.

- ``local`` (``--jobs 1``): the driver's own process, one job after another.
- ``local`` with ``--jobs N``: a pool of N worker processes (the standard library's ``ProcessPoolExecutor``,
  spawned), each loading the suite configuration once; they end with the driver even when it is killed
  (:mod:`bench.lifeline`).
- ``ray``: every job is a Ray task on a local or remote Ray cluster. Ray reuses worker processes, and each keeps
  its loaded suite configuration, so experts are not reloaded per job; a worker that dies has its task retried
  by Ray; records travel back as task results (no shared filesystem for them); Ctrl-C cancels what is still
  outstanding.

An exception from ``deliver`` (a one-line :class:`BenchError`, or Ctrl-C) stops the executor: outstanding jobs
are cancelled and running workers stopped; what was delivered before is recorded.
"""

from __future__ import annotations

import abc
import math
import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from bench.errors import BenchError, unknown_name_error
from bench.execution import Outcome, Setting, Task, compute

Deliver = Callable[[Task, Outcome], None]

EXECUTORS = ("local", "ray")
RAY_EXTRA_HINT = "pip install 'merge-bench[ray]'"


def describe_task(task: Task) -> str:
    inner = ",".join(f"{name}={value}" for name, value in task.overrides)
    return f"{task.method}({inner}) seed {task.seed}" if inner else f"{task.method} seed {task.seed}"


class Executor(abc.ABC):
    """Runs tasks of one suite configuration; ``start`` once, ``run`` one or more batches, ``stop`` once."""

    name: str
    in_process = False  # True: tasks run in the driver's process, on the problem the driver loaded

    def start(self, setting: Setting) -> None:  # noqa: B027 (optional hook)
        """Bring the workers up for ``setting`` (before the first batch)."""

    @abc.abstractmethod
    def run(self, setting: Setting, tasks: Sequence[Task], deliver: Deliver) -> None:
        """Run ``tasks`` and call ``deliver`` for each as it finishes (in any order), from the calling thread."""

    def stop(self) -> None:  # noqa: B027 (optional hook)
        """Release the workers; called however the run ends."""

    def describe(self) -> str:
        return self.name


class InProcessExecutor(Executor):
    name = "local"
    in_process = True

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress  # the job's own bars (evaluation, adaptation steps) under the driver's

    def run(self, setting: Setting, tasks: Sequence[Task], deliver: Deliver) -> None:
        for task in tasks:
            deliver(task, compute(setting, task, self.progress, {"executor": "local"}))


def _pool_worker_start(parent: int) -> None:
    """First thing in a pool worker: end with the driver; leave Ctrl-C to the driver (which stops the pool)."""
    from bench.lifeline import die_with

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with(parent)


def _pool_compute(setting: Setting, task: Task) -> Outcome:
    return compute(setting, task, extra={"executor": "local-pool"})


class PoolExecutor(Executor):
    """``--jobs N``: N spawned worker processes given the plan's tasks (not command lines)."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def describe(self) -> str:
        return f"{self.workers} local worker processes"

    def start(self, setting: Setting) -> None:
        import multiprocessing
        import sys

        # Workers killed on Ctrl-C leave the pool's queue semaphores to multiprocessing's resource tracker, which
        # frees them and warns about each; the tracker is started with this process's warning options.
        quiet = "ignore:resource_tracker:UserWarning"
        if quiet not in sys.warnoptions:
            sys.warnoptions.append(quiet)
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_pool_worker_start, initargs=(os.getpid(),))

    def run(self, setting: Setting, tasks: Sequence[Task], deliver: Deliver) -> None:
        assert self._pool is not None, "start() first"
        futures: dict[Future, Task] = {self._pool.submit(_pool_compute, setting, task): task for task in tasks}
        outstanding = set(futures)
        try:
            while outstanding:
                done, outstanding = wait(outstanding, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        raise BenchError(f"a worker process died while running {describe_task(futures[future])} "
                                         "(out of memory, or killed); every finished run is recorded, rerun with "
                                         "--resume to continue") from None
                    deliver(futures[future], outcome)
        except BaseException:
            self._terminate()
            raise

    def _terminate(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list(getattr(pool, "_processes", None) or {})  # pids; the pool has no public handle on them
        pool.shutdown(wait=False, cancel_futures=True)
        for pid in processes:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _ray_compute(setting: Setting, task: Task) -> Outcome:
    """A Ray task: one job on whichever node Ray placed it; the record names the node and its GPUs."""
    import ray

    context = ray.get_runtime_context()
    extra = {"executor": "ray", "ray_node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
             "gpu_ids": [str(i) for i in context.get_accelerator_ids().get("GPU", [])]}
    return compute(setting, task, extra=extra)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BenchError(f"--executor ray needs Ray, which is not installed here: {RAY_EXTRA_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray instance; "auto": the cluster `ray start` made here
    gpus_per_job: float | None = None  # None: 1 when the cluster has GPUs and the device is not the CPU, else 0
    cpus_per_job: float = 1.0
    retries: int = 3  # times Ray reruns a job whose worker died


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, options: RayOptions, device: str = "auto") -> None:
        self.options = options
        self.device = device
        self._ray: Any = None
        self._started_here = False
        self._remote: Any = None

    def describe(self) -> str:
        where = self.options.address or "a local Ray instance"
        return f"Ray ({where}; {self._cpus:g} CPU and {self._gpus:g} GPU per job)"

    def start(self, setting: Setting) -> None:
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.options.address, include_dashboard=False, logging_level="WARNING",
                         configure_logging=True)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.options.address or "a local instance"
                raise BenchError(f"cannot start or reach Ray at {where}: {str(exc).splitlines()[0]}; start a cluster "
                                 "with `ray start --head` and pass --address auto, or leave --address out") from None
            self._started_here = True
        self._cpus = self.options.cpus_per_job
        gpus = self.options.gpus_per_job
        if gpus is None:
            gpus = 1.0 if self.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self._gpus = gpus
        # max_calls=0: workers stay up across tasks (Ray's default ends GPU workers after one), so each keeps
        # its loaded suite configuration; retry_exceptions=False: only a dead worker is retried, never a bug.
        self._remote = ray.remote(num_cpus=self._cpus, num_gpus=self._gpus, max_retries=self.options.retries,
                                  retry_exceptions=False, max_calls=0)(_ray_compute)

    def run(self, setting: Setting, tasks: Sequence[Task], deliver: Deliver) -> None:
        ray = self._ray
        setting_ref = ray.put(setting)
        refs = {self._remote.remote(setting_ref, task): task for task in tasks}
        outstanding = list(refs)
        lost: list[Task] = []
        try:
            while outstanding:
                done, outstanding = ray.wait(outstanding, num_returns=1)
                for ref in done:
                    try:
                        outcome = ray.get(ref)
                    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                            ray.exceptions.OutOfMemoryError):
                        lost.append(refs[ref])
                        continue
                    deliver(refs[ref], outcome)
        except BaseException:
            for ref in outstanding:
                ray.cancel(ref, force=True)
            raise
        if lost:
            raise BenchError(f"{len(lost)} job(s) lost their worker {self.options.retries + 1} times (first: "
                             f"{describe_task(lost[0])}; out of memory, or the node died); every other run is "
                             "recorded, rerun with --resume to retry them")

    def stop(self) -> None:
        if self._started_here and self._ray is not None:
            self._ray.shutdown()
        self._started_here = False


def make_executor(name: str, jobs: int = 1, ray: RayOptions | None = None, device: str = "auto",
                  progress: bool = False) -> Executor:
    """The executor a command line asks for (``--executor``, ``--jobs``, the Ray flags)."""
    if name not in EXECUTORS:
        raise unknown_name_error("executor", name, EXECUTORS)
    if jobs < 1:
        raise BenchError(f"--jobs {jobs}: give at least 1 (local worker processes)")
    if name == "ray":
        if jobs != 1:
            raise BenchError("--jobs is for --executor local; with --executor ray, Ray places the jobs (set "
                             "--cpus-per-job/--gpus-per-job instead)")
        import_ray()  # before anything is loaded
        options = ray or RayOptions()
        check_resource("--cpus-per-job", options.cpus_per_job, positive=True)
        if options.gpus_per_job is not None:
            check_resource("--gpus-per-job", options.gpus_per_job, positive=False)
        return RayExecutor(options, device)
    if ray is not None and ray != RayOptions():
        raise BenchError("--address, --gpus-per-job and --cpus-per-job are for --executor ray; add --executor ray")
    return PoolExecutor(jobs) if jobs > 1 else InProcessExecutor(progress)


def check_resource(flag: str, value: float, positive: bool) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "a number > 0" if positive else "a number >= 0"
        raise BenchError(f"{flag} {value:g}: give {bound} (fractions share a device, e.g. 0.5)")
