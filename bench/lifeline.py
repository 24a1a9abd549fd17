"""Worker processes that end when the process that started them ends (``bench run/sweep --jobs N``).

A parent killed outright (``kill -9``, the OOM killer) runs no cleanup, so its workers must notice on their own:

- on Linux the kernel kills a worker as soon as its parent dies: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` is set in
  the child between fork and exec (``preexec_fn``; libc's ``prctl`` is looked up in the parent beforehand);
- everywhere with pipes (the portable fallback, and the cover for a parent that dies before the worker runs):
  the parent holds the write end of a pipe whose read end the worker gets (``--parent-pipe FD``). Nothing is
  ever written to it; when the parent ends, however it ends, the kernel closes the write end, the worker's read
  returns end-of-file, and a watcher thread ends the worker at once.

A worker that ends this way leaves at most one record temporary behind, which the next run removes
(:mod:`bench.temporaries`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1
PARENT_GONE_EXIT = 3
PIPE_FLAG = "--parent-pipe"


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _die_with_parent(prctl: Callable[..., int], parent: int) -> Callable[[], None]:
    """What the child runs between fork and exec: SIGKILL when the parent dies, and end now if it already has
    (it may have died before the prctl call, and then no signal comes)."""

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(PARENT_GONE_EXIT)

    return preexec


class Worker:
    """A ``bench`` worker process tied to this one (see the module docstring)."""

    def __init__(self, argv: Sequence[str], *, pdeathsig: bool = True) -> None:
        """``argv``: the worker's ``bench`` arguments (``run ...``); ``pdeathsig=False`` leaves only the pipe."""
        self._pipe: int | None = None
        pass_fds: tuple[int, ...] = ()
        lifeline: list[str] = []
        if os.name == "posix":
            read_end, self._pipe = os.pipe()  # both non-inheritable: only pass_fds hands the read end over
            pass_fds, lifeline = (read_end,), [PIPE_FLAG, str(read_end)]
        prctl = _libc_prctl() if pdeathsig else None
        preexec = _die_with_parent(prctl, os.getpid()) if prctl is not None else None
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "bench", *lifeline, *argv], pass_fds=pass_fds,
                                            preexec_fn=preexec)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in pass_fds:
                os.close(fd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, grace: float = 5.0) -> None:
        """End the worker if it still runs: a second to end on its own (a Ctrl-C reaches it too, and it stops
        cleanly), then SIGTERM, then SIGKILL after ``grace`` seconds more."""
        try:
            for signal_it in (None, self.process.terminate, self.process.kill):
                if self.process.poll() is not None:
                    break
                if signal_it is not None:
                    signal_it()
                try:
                    self.process.wait(1.0 if signal_it is None else grace)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.close()

    def close(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None


def exit_with_parent(fd: int) -> None:
    """In a worker: end this process as soon as the pipe ``fd`` from the parent reaches end-of-file."""

    def watch() -> None:
        try:
            while os.read(fd, 64):
                pass
        except OSError:
            pass
        try:
            os.write(2, b"bench: worker: the parent process ended; stopping\n")
        except OSError:
            pass
        os._exit(PARENT_GONE_EXIT)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
