"""Disk space of a suite's artefacts: what ``bench prepare`` is about to fetch (checked against the free space of
the cache's disk before anything is downloaded), and what ``bench doctor`` finds on disk."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError
from bench.registry import ArtefactSize

UNKNOWN = "size unknown until prepare"


def format_bytes(count: int) -> str:
    """Decimal units, as the hub shows file sizes: ``512 B``, ``86.1 MB``, ``1.7 GB``."""
    size = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class PreparePlan:
    """A suite's artefacts for one ``bench prepare``: those present, and those to fetch with their hub sizes."""

    artefacts: Sequence[ArtefactSize]

    @property
    def to_fetch(self) -> list[ArtefactSize]:
        return [a for a in self.artefacts if a.present_bytes is None]

    @property
    def present_bytes(self) -> int:
        return sum(a.present_bytes or 0 for a in self.artefacts)

    @property
    def fetch_bytes(self) -> int:
        return sum(a.expected_bytes or 0 for a in self.to_fetch)

    @property
    def unknown(self) -> int:
        return sum(a.expected_bytes is None for a in self.to_fetch)

    @property
    def scratch_bytes(self) -> int:
        """Temporary space beside the cache while one artefact is converted (they are fetched one at a time)."""
        return max((a.scratch_bytes for a in self.to_fetch), default=0)

    @property
    def needed_bytes(self) -> int:
        return self.fetch_bytes + self.scratch_bytes


def plan_lines(suite: str, plan: PreparePlan) -> list[str]:
    """The header (expected total, present, to fetch) and one line per artefact."""
    unknown = f" (and {plan.unknown} artefact(s) of unknown size)" if plan.unknown else ""
    lines = [f"{suite}: {len(plan.artefacts)} artefact(s), {format_bytes(plan.present_bytes + plan.fetch_bytes)} "
             f"expected; {format_bytes(plan.present_bytes)} already present, {format_bytes(plan.fetch_bytes)} to "
             f"fetch{unknown}"]
    for artefact in plan.artefacts:
        if artefact.present_bytes is not None:
            lines.append(f"    present  {format_bytes(artefact.present_bytes):>9}  {artefact.description}")
        else:
            size = "?" if artefact.expected_bytes is None else format_bytes(artefact.expected_bytes)
            lines.append(f"    fetch    {size:>9}  {artefact.description}")
    return lines


def check_free_space(cache_dir: Path, plan: PreparePlan, command: str) -> None:
    """One-line error when the cache's disk has less free space than the plan needs (before any download)."""
    free = shutil.disk_usage(existing_ancestor(Path(cache_dir))).free
    if plan.needed_bytes <= free:
        return
    scratch = (f" ({format_bytes(plan.fetch_bytes)} to fetch + {format_bytes(plan.scratch_bytes)} of scratch space "
               f"while a dataset split is converted)") if plan.scratch_bytes else ""
    raise BenchError(f"not enough disk space for `{command}`: it needs {format_bytes(plan.needed_bytes)}{scratch} "
                     f"in {cache_dir}, but only {format_bytes(free)} is free there; free some space or pass "
                     f"--cache DIR on a larger disk")


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent (the cache folder may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def file_in_the_way(path: Path | str) -> Path | None:
    """What keeps ``path`` from being, or becoming, a directory: ``path`` itself or its nearest existing parent when
    that is a file (or anything else but a directory); None when ``path`` is a directory or can be made one."""
    probe = Path(path)
    while True:
        if os.path.lexists(probe):
            return None if os.path.isdir(probe) else probe
        if probe == probe.parent:
            return None
        probe = probe.parent


def require_directory(path: Path | str, flag: str, *, writable: bool = True, hint: str = "") -> None:
    """One line (BenchError) naming ``flag`` when ``path`` cannot serve as a directory: a file is in the way, or
    (``writable``) its nearest existing folder does not let this user write. Nothing is created."""
    blocker = file_in_the_way(path)
    if blocker is not None:
        problem = ("is a file, not a directory" if blocker == Path(path)
                   else f"cannot be a directory: {blocker} is a file")
        raise BenchError(f"{flag} {path} {problem}; remove it or pick another {flag}{hint}")
    if writable:
        folder = existing_ancestor(Path(path))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BenchError(f"{flag} {path} is not writable (this user cannot write in {folder}); "
                             f"pick another {flag}{hint}")


def doctor_lines(artefacts: Sequence[ArtefactSize]) -> list[str]:
    """Per artefact: its size on disk, or ``missing: ...`` with the expected size when known offline; a total."""
    lines = []
    for artefact in artefacts:
        if artefact.present_bytes is not None:
            lines.append(f"    {format_bytes(artefact.present_bytes):>9}  {artefact.description}")
        else:
            lines.append(f"    missing: {artefact.description} ({expected(artefact)})")
    missing = [a for a in artefacts if a.present_bytes is None]
    total = f"    total: {format_bytes(sum(a.present_bytes or 0 for a in artefacts))} on disk"
    if missing:
        known = sum(a.expected_bytes or 0 for a in missing)
        unknown = sum(a.expected_bytes is None for a in missing)
        total += f"; {len(missing)} missing, {format_bytes(known)} expected"
        total += f" ({unknown} of unknown size)" if unknown else ""
    return [*lines, total]


def expected(artefact: ArtefactSize) -> str:
    return UNKNOWN if artefact.expected_bytes is None else f"expected {format_bytes(artefact.expected_bytes)}"
