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
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.errors import BenchError

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


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=1, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class ResultsStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path_for(self, record_key: dict[str, Any]) -> Path:
        return self.root / record_key["suite"] / record_key["method"] / f"{config_hash(record_key)}.json"

    def has(self, record_key: dict[str, Any]) -> bool:
        return self.load(self.path_for(record_key)) is not None

    def get(self, record_key: dict[str, Any]) -> dict[str, Any] | None:
        return self.load(self.path_for(record_key))

    def put(self, record: dict[str, Any]) -> Path:
        path = self.root / record["suite"] / record["method"] / f"{record['config_hash']}.json"
        try:
            write_json_atomic(path, record)
        except OSError as exc:
            raise BenchError(f"cannot write results to {path.parent}: {exc.strerror}; pass --results DIR") from None
        return path

    @staticmethod
    def load(path: Path) -> dict[str, Any] | None:
        """A record, or None when missing; a corrupt record is reported and treated as missing."""
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or record.get("schema") != SCHEMA_VERSION:
                raise ValueError("unknown schema")
            return record
        except (ValueError, OSError) as exc:
            print(f"bench: warning: ignoring unreadable record {path} ({exc}); it will be recomputed", file=sys.stderr)
            return None

    def records(self) -> Iterator[dict[str, Any]]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*/*/*.json")):
            record = self.load(path)
            if record is not None:
                yield record
