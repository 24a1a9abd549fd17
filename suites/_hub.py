"""The local cache of hub artefacts (checkpoints and datasets) that real suites read from.

Runs never download: ``bench prepare SUITE`` fills the cache on a connected machine, and ``bench run`` reads it
offline. Layout under the suite cache directory (``--cache`` / ``$BENCH_CACHE``)::

    hub/models/<owner>--<name>/            a checkpoint folder as the hub has it (snapshot), plus COMPLETE
    hub/datasets/<owner>--<name>[--<config>]/<split>/   a ``datasets`` save_to_disk folder, plus COMPLETE

``COMPLETE`` is written last and lists every file with its size and sha256, so a folder interrupted half-way
is never taken for a finished one, ``prepare`` resumes where it stopped, and a corrupted file is noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from bench.errors import BenchError, missing_artifact_error

MARKER = "COMPLETE"


def _slug(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def model_dir(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / "hub" / "models" / _slug(repo_id)


def dataset_dir(cache_dir: Path, repo_id: str, split: str, config: str | None = None) -> Path:
    name = _slug(repo_id) + (f"--{config}" if config else "")
    return Path(cache_dir) / "hub" / "datasets" / name / split


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER and ".cache" not in p.parts)


def mark_complete(folder: Path) -> None:
    """Write the manifest of ``folder`` (atomically, last)."""
    manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MARKER)


def is_complete(folder: Path, verify: bool = False) -> bool:
    """The folder has a manifest whose files exist with their sizes (and, with ``verify``, their hashes)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        manifest = json.loads(marker.read_text())
    except ValueError:
        return False
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return False
        if verify and _sha256(path) != entry["sha256"]:
            return False
    return True


def manifest_digest(folder: Path) -> str:
    """A short digest of ``folder``'s manifest: changes whenever any of its files does (for derived-cache keys)."""
    marker = Path(folder) / MARKER
    return hashlib.sha256(marker.read_bytes()).hexdigest()[:16] if marker.is_file() else "unmarked"


def require(folder: Path, suite: str, artefact: str, cache_dir: Path, prepare_args: str = "") -> Path:
    """``folder`` if it holds a finished download, else the one-line missing-artefact error."""
    if not is_complete(folder):
        raise missing_artifact_error(suite, artefact, cache_dir, prepare_args)
    return folder


def fetch(folder: Path, download: Callable[[Path], None], verify: bool = True) -> bool:
    """Run ``download(folder)`` unless ``folder`` is already complete; returns whether it downloaded."""
    if is_complete(folder, verify=verify):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    download(folder)
    mark_complete(folder)
    return True


def download_model(repo_id: str, folder: Path, allow_patterns: list[str] | None = None) -> None:
    """A hub checkpoint snapshot into ``folder`` (resumes partial files)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_dir=folder, allow_patterns=allow_patterns)
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        raise BenchError(f"cannot download {repo_id} from the hub: {type(exc).__name__}: {exc}".splitlines()[0]) \
            from None


def download_dataset(repo_id: str, split: str, folder: Path, config: str | None = None) -> None:
    """One split of a hub dataset, saved with ``datasets``' save_to_disk into ``folder``."""
    try:
        import datasets

        data = datasets.load_dataset(repo_id, config, split=split)
        data.save_to_disk(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"cannot download dataset {repo_id} ({split}): {type(exc).__name__}: {exc}".splitlines()[0]) \
            from None
