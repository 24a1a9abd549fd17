"""Temporary files and folders named after their writer, so that those a killed writer left behind are removed
by the next run and never one that a live writer is still filling.

A temporary's name carries an owner tag ``<host>-<pid>-<start>``: a short hash of the host name (a store or cache
on a shared disk is written from several machines, whose pids mean nothing here), the writer's pid and its start
time (``/proc/<pid>/stat``'s start tick on Linux, ``x`` elsewhere, so that a recycled pid is not taken for the
writer). A tagged temporary is stale when its host is this one and its writer is gone: no such pid, a zombie, or
a process that started at another time. Temporaries of other hosts, and untagged ones (written before tags
existed), are stale only once they are older than :data:`UNTAGGED_STALE_SECONDS`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from pathlib import Path

UNTAGGED_STALE_SECONDS = 24 * 3600  # far longer than any record write or cache build takes
UNKNOWN_START = "x"
_TAG = r"(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-(?P<start>\d+|x)"
_RANDOM = r"[a-z0-9_]{8}"  # what tempfile.mkstemp / mkdtemp append
TAGGED = re.compile(rf"{_TAG}\.{_RANDOM}(?:\.tmp)?$")


def host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def process_start(pid: int) -> str | None:
    """The start tick of ``pid`` (Linux), or None where unknown or the process does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def owner_tag(pid: int | None = None) -> str:
    """``<host>-<pid>-<start>`` of this process (or of ``pid``)."""
    pid = os.getpid() if pid is None else pid
    return f"{host_id()}-{pid}-{process_start(pid) or UNKNOWN_START}"


def writer_alive(pid: int, start: str) -> bool:
    """Whether the process that wrote a temporary tagged with (``pid``, ``start``) on this host still runs."""
    if sys.platform == "win32":  # os.kill(pid, 0) would terminate it there: never call a writer dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS, ...): the pid exists, so the writer may be running
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return False
    return start == UNKNOWN_START or fields[19] == start


def is_stale(path: Path, now: float | None = None) -> bool:
    """Whether the temporary ``path`` was left by a writer that is gone (see the module docstring)."""
    match = TAGGED.search(path.name)
    if match and match["host"] == host_id():
        return not writer_alive(int(match["pid"]), match["start"])
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    return age > UNTAGGED_STALE_SECONDS


def remove_stale(paths: Iterable[Path]) -> list[Path]:
    """Remove the stale temporaries among ``paths`` (files or folders); returns those removed."""
    removed = []
    for path in paths:
        if not is_stale(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)  # another run may be removing it too
        else:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                continue
        if not os.path.lexists(path):
            removed.append(path)
    return removed
