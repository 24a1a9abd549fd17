"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``bench: error: <message>`` on one line and exits with status 2,
    without a traceback. Everything else is a bug and keeps its traceback.
    """


class MethodNotApplicable(BenchError):
    """A method cannot run on a suite (e.g. the suite cannot supply the data it needs); the run skips it."""


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def unknown_name_error(kind: str, name: str, candidates: Iterable[str]) -> BenchError:
    """``unknown method 'tie'; did you mean: ties, dare_ties? (see `bench list methods`)``."""
    candidates = sorted(candidates)
    matches = close_matches(name, candidates)
    hint = f"did you mean: {', '.join(matches)}?" if matches else f"known: {', '.join(candidates)}"
    return BenchError(f"unknown {kind} '{name}'; {hint}")
