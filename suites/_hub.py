"""The local cache of hub artefacts (checkpoints and datasets) that real suites read from.

Runs never download: ``bench prepare SUITE`` fills the cache on a connected machine, and ``bench run`` reads it
offline. Layout under the suite cache directory (``--cache`` / ``$BENCH_CACHE``)::

    hub/models/<owner>--<name>/            a checkpoint folder as the hub has it (snapshot), plus COMPLETE
    hub/datasets/<owner>--<name>[--<config>]/<split>/   a ``datasets`` save_to_disk folder, plus COMPLETE

    hub/expected-sizes.json                the hub's size of each artefact, as last asked by ``prepare``

``COMPLETE`` is written last and lists every file with its size and sha256, so a folder interrupted half-way
is never taken for a finished one, ``prepare`` resumes where it stopped, and a corrupted file is noticed.

One copy: a checkpoint is fetched straight into its folder, a dataset split as the hub files of that split only
(parquet, json, csv, ...), converted into its save_to_disk folder in a staging folder beside it that is deleted
afterwards. Every cache the hub clients keep goes under the bench cache (``cache_dir`` is passed everywhere) and
is removed once the folder is complete: nothing is written to ``~/.cache/huggingface``.

The hub is reached through two functions only, :func:`repo_listing` (file names and sizes, nothing downloaded)
and :func:`download_files` (the named files of a repo), which tests replace with a stand-in hub.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import registry
from bench.disk import file_in_the_way
from bench.errors import BenchError, MethodNotApplicable, missing_artifact_error, prepare_command

MARKER = "COMPLETE"


def _slug(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def _folder_name(name: str, what: str, value: str) -> str:
    """``name`` (made from ``value``) as one folder of the cache: a name that would leave its parent folder (a path
    separator, ``.`` or ``..``) is refused in one line."""
    if name in ("", ".", "..") or any(ch in name for ch in ("/", "\\", "\0")):
        raise BenchError(f"{what} {value!r} cannot name a folder in the bench cache (it would resolve outside it); "
                         f"use only letters, digits and _ - . (not . or ..)")
    return name


def model_dir(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / "hub" / "models" / _folder_name(_slug(repo_id), "hub id", repo_id)


def dataset_dir(cache_dir: Path, repo_id: str, split: str, config: str | None = None) -> Path:
    _folder_name(_slug(repo_id), "dataset hub id", repo_id)
    name = _folder_name(_slug(repo_id) + (f"--{config}" if config else ""), "dataset configuration", config or "")
    return Path(cache_dir) / "hub" / "datasets" / name / _folder_name(split, "dataset split", split)


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


def require_folder(folder: Path) -> None:
    """One line when a file is where the cache folder ``folder`` (or a folder above it) should be: it is neither a
    missing download nor something to delete."""
    if (blocker := file_in_the_way(folder)) is not None:
        problem = ("is a file, not a directory" if blocker == Path(folder)
                   else f"cannot be a directory: {blocker} is a file")
        raise BenchError(f"the cache folder {folder} {problem}; remove it or pick another --cache (or BENCH_CACHE)")


def require(folder: Path, suite: str, artefact: str, cache_dir: Path, prepare_args: str = "") -> Path:
    """``folder`` if it holds a finished download, else the one-line missing-artefact error."""
    if not is_complete(folder):
        require_folder(folder)
        raise missing_artifact_error(suite, artefact, cache_dir, prepare_args)
    return folder


def fetch(folder: Path, download: Callable[[Path], None], verify: bool = True) -> bool:
    """Run ``download(folder)`` unless ``folder`` is already complete; returns whether it downloaded."""
    if is_complete(folder, verify=verify):
        return False
    require_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    download(folder)
    drop_client_cache(folder)
    mark_complete(folder)
    return True


def drop_client_cache(folder: Path) -> None:
    """Remove what the hub client kept in ``folder`` to resume an interrupted download (no longer needed)."""
    shutil.rmtree(Path(folder) / CLIENT_CACHE, ignore_errors=True)


def download_model(repo_id: str, folder: Path, allow_patterns: list[str] | None = None) -> None:
    """The files of a hub checkpoint matching ``allow_patterns`` straight into ``folder`` (resumes partial files)."""
    download_files(repo_id, "model", allow_patterns or ["*"], Path(folder))


def download_dataset(repo_id: str, split: str, folder: Path, config: str | None = None) -> None:
    """One split of a hub dataset into ``folder`` as a ``datasets`` save_to_disk folder, and nothing else.

    Only that split's hub files are fetched; they and the Arrow cache ``datasets`` builds from them live in a
    staging folder beside ``folder`` that is deleted afterwards, so one copy remains.
    """
    folder = Path(folder)
    files = dataset_split_files(repo_id, split, config)
    for stale in folder.parent.glob(f".{folder.name}.staging-*"):  # left by an interrupted prepare
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        download_files(repo_id, "dataset", [f.path for f in files], staging / "files", revision=files[0].revision)
        dataset = read_split_files([staging / "files" / f.path for f in files], split, staging / "arrow")
        shutil.rmtree(staging / "files")  # the Arrow cache holds the data now
        dataset.save_to_disk(str(staging / "saved"))
        del dataset
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging / "saved", folder)
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - parsers and the file system fail in many ways; report one line
        raise BenchError(f"cannot convert dataset {repo_id} ({split}) into {folder}: {type(exc).__name__}: {exc}"
                         .splitlines()[0]) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# The hub: file listings with sizes, and downloads of named files (the only two functions that reach it)
# ----------------------------------------------------------------------------------------------------------

CLIENT_CACHE = ".cache"  # what the hub client keeps in a folder it downloads into (resume records, chunk cache)
PARQUET_REVISION = "refs/convert/parquet"  # the hub's parquet conversion of datasets stored in other formats


@dataclass(frozen=True)
class RemoteFile:
    """A file of a hub repo that ``prepare`` fetches."""

    path: str
    size: int
    revision: str | None = None


@dataclass(frozen=True)
class RepoListing:
    """A hub repo's files (path -> bytes) and its card's metadata (the README's YAML header)."""

    files: dict[str, int]
    card: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=512)
def repo_listing(repo_id: str, repo_type: str, revision: str | None = None) -> RepoListing:
    """The files of a hub repo with their sizes (one API call; nothing is downloaded)."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        lookup = api.dataset_info if repo_type == "dataset" else api.model_info
        info = lookup(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        raise BenchError(f"cannot list {repo_type} {repo_id} on the hub: {type(exc).__name__}: {exc}"
                         .splitlines()[0]) from None
    card = info.card_data.to_dict() if getattr(info, "card_data", None) else {}
    return RepoListing({s.rfilename: int(s.size or 0) for s in info.siblings or []}, card)


def download_files(repo_id: str, repo_type: str, patterns: Sequence[str], folder: Path,
                   revision: str | None = None) -> None:
    """The files of a hub repo matching ``patterns`` into ``folder``; the client's caches go under ``folder``."""
    scratch = Path(folder) / CLIENT_CACHE
    try:
        from huggingface_hub import snapshot_download

        with _environment(HF_XET_CACHE=str(scratch / "xet")):
            snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_dir=folder,
                              cache_dir=scratch / "hub", allow_patterns=list(patterns))
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"cannot download {repo_id} from the hub: {type(exc).__name__}: {exc}".splitlines()[0]) \
            from None


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----------------------------------------------------------------------------------------------------------
# Which hub files an artefact is
# ----------------------------------------------------------------------------------------------------------


def model_files(repo_id: str, patterns: Iterable[str]) -> list[RemoteFile]:
    """The files of a model repo that ``download_model`` fetches with these ``allow_patterns``."""
    patterns = list(patterns)
    listing = repo_listing(repo_id, "model")
    return [RemoteFile(path, size) for path, size in sorted(listing.files.items())
            if any(fnmatch.fnmatch(path, pattern) for pattern in patterns)]


def checkpoint_files(repo_id: str, preferred: Iterable[str], fallback: Iterable[str]) -> list[RemoteFile]:
    """What fetching a checkpoint takes: the ``preferred`` files, plus the ``fallback`` ones when those hold no
    safetensors weights (as the suites' checkpoint downloads do)."""
    files = model_files(repo_id, preferred)
    if not any(f.path.endswith(".safetensors") for f in files):
        files += model_files(repo_id, fallback)
    return files


DATA_READERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv",
                ".tsv": "csv", ".txt": "text"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
NOT_DATA = ("README.md", "dataset_infos.json", "dataset_info.json", "dataset_dict.json", "config.json")


def dataset_split_files(repo_id: str, split: str, config: str | None = None) -> list[RemoteFile]:
    """The hub files that hold one split of a dataset (config): as the dataset card's ``configs`` list them, else
    by ``datasets``' default file-name patterns, else from the hub's parquet conversion."""
    listing = repo_listing(repo_id, "dataset")
    data = {path: size for path, size in listing.files.items() if _is_data_file(path)}
    patterns = _card_split_patterns(listing.card, repo_id, split, config)
    if patterns is None and config is None:
        patterns = _default_split_patterns(list(data)).get(split, [])
    chosen = _matching(data, patterns or [])
    if chosen:
        return [RemoteFile(path, size) for path, size in chosen]
    try:
        converted = repo_listing(repo_id, "dataset", PARQUET_REVISION)
    except BenchError:  # no conversion either
        converted = RepoListing({})
    name = config or "default"
    chosen = _matching(converted.files, [f"{name}/{split}/*.parquet", f"{name}/*-{split}.parquet",
                                         f"{name}/*-{split}-*.parquet"])
    if not chosen:
        raise BenchError(f"dataset {repo_id}{f' ({config})' if config else ''} has no files for split '{split}' on "
                         f"the hub; check the task's split names")
    return [RemoteFile(path, size, PARQUET_REVISION) for path, size in chosen]


def _is_data_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower()
    return (name not in NOT_DATA and not any(part.startswith(".") for part in path.split("/"))
            and (suffix in DATA_READERS or suffix in IMAGE_SUFFIXES))


def _card_split_patterns(card: dict[str, Any], repo_id: str, split: str, config: str | None) -> list[str] | None:
    """The split's ``data_files`` patterns of the card's config ``config`` (None: the card lists no configs)."""
    configs = [c for c in card.get("configs") or [] if isinstance(c, dict)]
    if not configs:
        return None
    wanted = config or "default"
    chosen = next((c for c in configs if c.get("config_name") == wanted), None)
    if chosen is None and config is None:
        chosen = next((c for c in configs if c.get("default")), configs[0] if len(configs) == 1 else None)
    if chosen is None:
        names = ", ".join(str(c.get("config_name")) for c in configs)
        raise BenchError(f"dataset {repo_id} has no config '{wanted}' on the hub (it has {names}); check the suite's "
                         f"dataset config")
    data_files = chosen.get("data_files")
    if isinstance(data_files, (str, list)) and not any(isinstance(d, dict) for d in _as_list(data_files)):
        return _as_list(data_files) if split == "train" else []  # plain files are one split: train
    for entry in _as_list(data_files):
        if isinstance(entry, dict) and entry.get("split") == split:
            return _as_list(entry.get("path"))
    return []


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _default_split_patterns(paths: list[str]) -> dict[str, list[str]]:
    """``datasets``' own inference of split patterns from file names (``data/train-00000-of-00001.parquet``, ...)."""
    from datasets.data_files import _get_data_files_patterns

    def resolve(pattern: str) -> list[str]:
        return [path for path, _ in _matching(dict.fromkeys(paths, 0), [pattern])]

    try:
        return {str(split): list(patterns) for split, patterns in _get_data_files_patterns(resolve).items()}
    except (FileNotFoundError, ValueError):
        return {}


def _matching(files: dict[str, int], patterns: Iterable[str]) -> list[tuple[str, int]]:
    """Files (path, size) matching any of the glob ``patterns`` (``**`` spans folders), sorted by path."""
    from fsspec.utils import glob_translate

    expressions = [re.compile(glob_translate(pattern.removeprefix("./"))) for pattern in patterns]
    return sorted((path, size) for path, size in files.items() if any(e.match(path) for e in expressions))


def read_split_files(paths: Sequence[Path], split: str, cache_dir: Path) -> Any:
    """Local data files of one split as a ``datasets.Dataset`` (its Arrow cache in ``cache_dir``)."""
    import datasets

    readers = {_reader(path) for path in paths}
    if len(readers) != 1:
        raise BenchError(f"the {split} split mixes file types ({', '.join(sorted(readers))}); cannot read it")
    return datasets.load_dataset(readers.pop(), data_files={split: [str(p) for p in paths]}, split=split,
                                 cache_dir=str(cache_dir))


def _reader(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "imagefolder"
    return DATA_READERS[suffix]


# ----------------------------------------------------------------------------------------------------------
# Sizes: on disk once prepared, else from the hub (and remembered for `bench doctor` offline)
# ----------------------------------------------------------------------------------------------------------

EXPECTED_SIZES = "expected-sizes.json"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def artefact_size(description: str, folder: Path, remote: Callable[[], list[RemoteFile]] | None, cache_dir: Path,
                  online: bool, converted: bool = False) -> registry.ArtefactSize:
    """``folder``'s size when complete; else the hub's size of ``remote()`` (asked only when ``online``, then
    remembered in the cache) or the size remembered from an earlier ``prepare``. A ``converted`` artefact (a
    dataset split) needs as much again in scratch space while it is converted."""
    if is_complete(folder):
        return registry.ArtefactSize(description, folder_bytes(folder), None)
    expected = _remembered_sizes(cache_dir).get(_size_key(folder, cache_dir))
    if online and remote is not None:
        try:
            expected = sum(f.size for f in remote())
            _remember_size(cache_dir, folder, expected)
        except BenchError:
            expected = None  # the download reports why
    return registry.ArtefactSize(description, None, expected, expected if converted and expected else 0)


def _size_key(folder: Path, cache_dir: Path) -> str:
    return Path(folder).relative_to(Path(cache_dir)).as_posix()


def _remembered_sizes(cache_dir: Path) -> dict[str, int]:
    path = Path(cache_dir) / "hub" / EXPECTED_SIZES
    try:
        sizes = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return sizes if isinstance(sizes, dict) else {}


def _remember_size(cache_dir: Path, folder: Path, size: int) -> None:
    sizes = {**_remembered_sizes(cache_dir), _size_key(folder, cache_dir): size}
    path = Path(cache_dir) / "hub" / EXPECTED_SIZES
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{EXPECTED_SIZES}.tmp")
    tmp.write_text(json.dumps(sizes, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Splits left out by `bench prepare --methods ...`
# ----------------------------------------------------------------------------------------------------------


SPLIT_PURPOSES = {"labeled": "labeled examples", "unlabeled": "the inductive protocol's unlabeled pool",
                  "training": "labeled examples or the inductive protocol's unlabeled pool"}


def split_not_prepared(what: str, suite: str, prepare_args: str, data: str) -> MethodNotApplicable:
    """Why a method is skipped when ``what`` (e.g. "the train split of dataset ylecun/mnist") was left out by
    ``bench prepare`` because no method chosen then needed it: one line with the command that adds it. ``data``
    is what the method reads from it: ``labeled`` examples, ``unlabeled`` inputs (the inductive pool), or either
    (``training``)."""
    readers = registry.methods_reading(data) if data != "training" else [
        *registry.methods_reading("labeled"), *registry.methods_reading("unlabeled")]
    purpose = SPLIT_PURPOSES[data]
    command = prepare_command(suite, prepare_args, ",".join(readers))
    return MethodNotApplicable(f"{what} ({purpose}) was not prepared; run `{command}` (same --cache/BENCH_CACHE), "
                               f"then rerun")
