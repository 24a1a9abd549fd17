"""Transitional re-exports while the wave-2 method files move to the new homes of these names; removed when
they have: :mod:`bench.selection` (exact k-th largest, ``keep_count``), :mod:`bench.task_vectors` (task vectors
and loops), :mod:`bench.buffers`, ``bench.registry.require_*``, TIES in ``methods/ties.py``, the SVD helpers in
``methods/tsv.py`` and ``methods/iso.py``."""

from __future__ import annotations

from typing import Any

from bench.buffers import *  # noqa: F403
from bench.registry import require_choice, require_range  # noqa: F401
from bench.selection import *  # noqa: F403
from bench.selection import kth_largest_small  # noqa: F401
from bench.task_vectors import *  # noqa: F403

_MOVED = {"TIES_MERGES": "methods.ties", "TRIM_SCOPES": "methods.ties", "trim_": "methods.ties",
          "disjoint_merge": "methods.ties", "SignElection": "methods.ties", "ties_merge_task_vectors": "methods.ties",
          "polar_factor": "methods.tsv", "isotropic": "methods.iso"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(name)
