"""A test-only method whose worker process dies (SIGKILL) the first time it runs: how a Ray worker lost mid-job
(out of memory, a node gone) looks to the executor. Loaded only through BENCH_PLUGINS in subprocesses."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method


@dataclass(frozen=True)
class CrashParams:
    marker: str = param("", "file created by the one run that kills its own worker")


@register_method("crash_once", family="data-free", params=CrashParams,
                 description="test only: the first run SIGKILLs its worker, later runs return θ0")
def merge(ctx: MergeContext, params: CrashParams) -> StateDict:
    try:
        fd = os.open(params.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return ctx.pretrained()
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
