"""The results store: one JSON record per configuration, written atomically.

Layout: ``<results>/<suite>/<method>/<config_hash>.json``. A configuration is everything that determines a
result (suite, suite parameters, method, hyperparameters, seed); its hash names the file, so two writers of
the same configuration replace each other atomically and writers of different ones never touch the same
file. ``--resume`` skips configurations whose record already exists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError
from bench.temporaries import owner_tag, remove_stale

SCHEMA_VERSION = 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(config: dict[str, Any]) -> str:
    """Hash of the configuration: same inputs, same hash, on every machine."""
    payload = canonical_json({"schema": SCHEMA_VERSION, **config})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pack_correct(correct: torch.Tensor) -> str:
    """Per-example correctness as base64 of packed bits (1 bit per example)."""
    bits = np.packbits(correct.detach().cpu().numpy().astype(np.uint8))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(packed: str, num_examples: int) -> np.ndarray:
    bits = np.frombuffer(base64.b64decode(packed), dtype=np.uint8)
    return np.unpackbits(bits)[:num_examples].astype(bool)


def strict_json(payload: Any, path: Path | str = "record") -> str:
    """``payload`` as JSON without the non-standard ``NaN``/``Infinity`` tokens: a non-finite number raises
    ValueError naming where it is (values that may legitimately be missing, e.g. a task without a loss, are
    written as null by whoever builds the payload: :func:`finite_or_none`)."""
    try:
        return json.dumps(payload, indent=1, sort_keys=True, default=str, allow_nan=False)
    except ValueError:
        where = _nonfinite_path(payload) or "?"
        raise ValueError(f"{path}: refusing to write the non-finite number at '{where}' as JSON; "
                         "it must be finite or null") from None


def _nonfinite_path(value: Any, prefix: str = "") -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return prefix or "."
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _nonfinite_path(item, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def finite_or_none(value: float | None) -> float | None:
    """``value``, or None (JSON null) when it is missing, NaN or infinite."""
    return None if value is None or not math.isfinite(value) else float(value)


FAILED = "failed"


def is_failed(record: dict[str, Any]) -> bool:
    """Whether a record is a failed run (``"status": "failed"`` with its ``"reason"``, and no scores); records
    without a status are ok ones."""
    return record.get("status") == FAILED


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    The temporary, ``.<stem>.<owner tag>.<random>.tmp``, names its writer (:mod:`bench.temporaries`), so one
    that a killed run left behind is told from one a live run is writing (:meth:`ResultsStore.remove_stale`).
    """
    text = strict_json(payload, path)  # before any file is made: a NaN fails here
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_KINDS: dict[str, tuple[Any, str]] = {  # kind -> (test, name in messages)
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_integer, "an integer"),
    "number": (_number, "a number"),
    "number?": (lambda v: v is None or _number(v), "a number or null"),
    "int?": (lambda v: v is None or _integer(v), "an integer or null"),
    "str?": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "dict": (lambda v: isinstance(v, dict), "an object"),
    "dict?": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}
_RECORD_FIELDS = {  # field -> (kind, required in every record, required in scored records)
    "suite": ("str", True, True), "method": ("str", True, True), "seed": ("int", True, True),
    "family": ("str", False, True), "data_access": ("str", False, True), "tasks": ("dict", False, True),
    "average": ("number", False, True), "normalized_average": ("number?", False, False),
    "suite_variant": ("dict", False, False), "variant": ("dict", False, False), "suite_params": ("dict", False, False),
    "params": ("dict", False, False), "protocol": ("str", False, False), "timings": ("dict", False, False),
    "peak_memory": ("dict?", False, False), "environment": ("dict?", False, False), "notes": ("dict?", False, False),
    "problem": ("dict?", False, False), "created": ("str", False, False), "config_hash": ("str", False, False),
    "samples_per_task": ("int?", False, False), "reason": ("str?", False, False), "output": ("str", False, False),
}
_TASK_FIELDS = {"accuracy": ("number", True), "num_examples": ("int", False), "loss": ("number?", False),
                "normalized_accuracy": ("number?", False), "correct": ("str?", False)}


def _field_problem(where: str, value: Any, kind: str) -> str | None:
    test, name = _KINDS[kind]
    return None if test(value) else f"{where} is {_type_name(value)}, not {name}"


def record_problem(record: dict[str, Any]) -> str | None:
    """What makes a schema-1 record unusable by the reports and checks (a field missing or of another type), or
    None. Failed records (:func:`is_failed`) have no scores; every other record has tasks with accuracies."""
    scored = not is_failed(record)
    for name, (kind, always, when_scored) in _RECORD_FIELDS.items():
        if name not in record:
            if always or (scored and when_scored):
                return f"field '{name}' is missing"
            continue
        if problem := _field_problem(f"field '{name}'", record[name], kind):
            return problem
    if scored:
        if not record["tasks"]:
            return "field 'tasks' is empty"
        for task, entry in record["tasks"].items():
            if not isinstance(entry, dict):
                return f"task {task!r} is {_type_name(entry)}, not an object"
            for name, (kind, required) in _TASK_FIELDS.items():
                if name not in entry:
                    if required:
                        return f"task {task!r} has no '{name}'"
                    continue
                if problem := _field_problem(f"task {task!r} {name}", entry[name], kind):
                    return problem
    for phase, seconds in (record.get("timings") or {}).items():
        if not _number(seconds):
            return f"field 'timings' phase {phase!r} is {_type_name(seconds)}, not a number"
    return None


class ResultsStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path_for(self, record_key: dict[str, Any]) -> Path:
        return self._record_path(record_key["suite"], record_key["method"], config_hash(record_key))

    def _record_path(self, suite: Any, method: Any, hash_: Any) -> Path:
        """``<root>/<suite>/<method>/<hash>.json``, refusing names that would resolve outside the root."""
        for part in (suite, method, hash_):
            if not isinstance(part, str) or part in ("", ".", "..") or any(c in part for c in ("/", "\\", "\0")):
                raise BenchError(f"refusing to store a record of suite {suite!r}, method {method!r} under {self.root}: "
                                 f"{part!r} cannot be a folder or file name there (no '/', not '.' or '..')")
        return self.root / suite / method / f"{hash_}.json"

    def has(self, record_key: dict[str, Any]) -> bool:
        return self.load(self.path_for(record_key), recompute=True) is not None

    def get(self, record_key: dict[str, Any]) -> dict[str, Any] | None:
        """The record of a configuration the caller is about to run (it recomputes an unreadable one)."""
        return self.load(self.path_for(record_key), recompute=True)

    def put(self, record: dict[str, Any]) -> Path:
        path = self._record_path(record["suite"], record["method"], record["config_hash"])
        try:
            write_json_atomic(path, record)
        except OSError as exc:
            raise BenchError(f"cannot write results to {path.parent}: {exc.strerror}; pass --results DIR") from None
        return path

    @staticmethod
    def load(path: Path, *, recompute: bool = False, warn: bool = True) -> dict[str, Any] | None:
        """A record, or None when missing; a corrupt record (unparsable, another schema, a field missing or of
        another type: :func:`record_problem`) is reported in one warning line and treated as missing. The warning
        says what becomes of it: ``recompute`` when the caller runs its configuration now (a resumed run), else it
        is skipped, and only a rerun of its configuration (e.g. with --resume) replaces it. ``warn=False``: no
        warning (for a second pass over files a first one warned about)."""
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or record.get("schema") != SCHEMA_VERSION:
                raise ValueError("unknown schema")
            if problem := record_problem(record):
                raise ValueError(problem)
            return record
        except (ValueError, OSError, RecursionError) as exc:
            fate = "it will be recomputed" if recompute else "it is skipped; rerun its configuration with --resume " \
                                                             "to recompute it"
            if warn:
                print(f"bench: warning: ignoring unreadable record {path} ({exc}); {fate}", file=sys.stderr)
            return None

    def remove_stale(self) -> list[Path]:
        """Delete the record temporaries (``*.tmp``) that killed runs left, never one a live run is writing;
        returns the paths removed."""
        if not self.root.is_dir():
            return []
        return remove_stale(sorted(self.root.glob("*/*/.*.tmp")))

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*/*/*.json")):
            record = self.load(path)
            if record is not None:
                yield record
