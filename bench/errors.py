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


class MissingArtifact(BenchError):
    """A checkpoint or dataset a suite needs is not in the local cache (hub downloads are not attempted by runs)."""


def missing_artifact_error(suite: str, artefact: str, cache_dir: object, prepare_args: str = "") -> MissingArtifact:
    """``suite 'vit8' needs checkpoint openai/clip-vit-base-patch32, not in <cache>; on a connected machine run
    `bench prepare vit8` (...)``: one line naming the artefact and the command that fetches it."""
    command = prepare_command(suite, prepare_args)
    return MissingArtifact(
        f"suite '{suite}' needs {artefact}, which is not in the cache {cache_dir}; "
        f"run `{command}` on a machine with hub access (same --cache/BENCH_CACHE), then rerun"
    )


def prepare_command(suite: str, prepare_args: str = "", methods: str = "") -> str:
    """``bench prepare SUITE [--set suite.X=Y ...] [--methods a,b]``: the command that fetches what is missing."""
    return " ".join(part for part in ("bench prepare", suite, prepare_args, methods and f"--methods {methods}") if part)
