"""Worker processes that end when the process that started them ends (``bench run/sweep --jobs N``).

A parent killed outright (``kill -9``, the OOM killer) runs no cleanup, so its workers must notice on their own.
:func:`die_with` is what a pool worker runs first:

- on Linux it asks the kernel to kill this process as soon as its parent dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and ends at once if the parent died before that call;
- everywhere, a watcher thread checks the parent every fraction of a second and ends the process when it is
  gone (the portable fallback: an orphan is handed to another parent, so ``getppid`` changes).

A worker that ends this way leaves at most one record temporary behind, which the next run removes
(:mod:`bench.temporaries`); records are written by the parent only, so in practice none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PARENT_GONE_EXIT = 3
WATCH_INTERVAL = 0.2  # seconds between two looks at the parent


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


def _parent_gone() -> None:
    try:
        os.write(2, b"bench: worker: the parent process ended; stopping\n")
    except OSError:
        pass
    os._exit(PARENT_GONE_EXIT)


def die_with(parent: int, *, pdeathsig: bool = True) -> None:
    """In a worker: end this process as soon as ``parent`` (the pid that started it) is gone.
    ``pdeathsig=False`` leaves only the watcher thread (the fallback where the kernel cannot help)."""
    prctl = _libc_prctl() if pdeathsig else None
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl call, and then no signal comes
        _parent_gone()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_INTERVAL)
        _parent_gone()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
