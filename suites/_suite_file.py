"""The bring-your-own suite file: its schema (typed dataclasses whose field types and metadata drive validation,
pydantic checking each value) and :func:`read_suite_file`, which reads a TOML file into a checked
:class:`SuiteFile` or fails with one line naming the file, the key and the fix. :mod:`suites.custom` builds
suites from it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pydantic

from bench.errors import BenchError, close_matches

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads suite files with the tomli backport
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

IMAGE = "image-classification"
SEQUENCE = "sequence-classification"
LM_EVAL = "lm-eval"
KINDS = (IMAGE, SEQUENCE, LM_EVAL)
CLASSIFICATION = (IMAGE, SEQUENCE)
PROTOCOLS = ("transductive", "inductive")
DEFAULT_EVAL_BATCH = {IMAGE: 128, SEQUENCE: 64, LM_EVAL: 16}
LOCAL_PREFIXES = ("/", "./", "../", "~")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
SPLIT_PLACEHOLDER = "{split}"
NAME_PART = re.compile(r"[A-Za-z0-9_.-]+")
NAME_RULE = "use only letters, digits and _ - . (not . or ..)"


# ----------------------------------------------------------------------------------------------------------
# The schema: typed dataclasses whose field metadata drive validation
# ----------------------------------------------------------------------------------------------------------


def key(default: Any, help: str, example: str, *, kinds: tuple[str, ...] = KINDS,
        required: tuple[str, ...] = ()) -> Any:
    """A suite-file key: its default, one line of help, an example value (for error messages), the kinds that use
    it and the kinds that require it."""
    return field(default=default, metadata={"help": help, "example": example, "kinds": kinds, "required": required})


@dataclass(frozen=True)
class TaskConfig:
    """One ``[tasks.NAME]`` table."""

    expert: str = key("", "the task's fine-tuned checkpoint: hub id or local folder", '"./experts/NAME"',
                      required=KINDS)
    dataset: str = key("", "hub id, save_to_disk folder, or parquet/json/jsonl/csv files with {split} in the path",
                       '"./data/NAME/{split}.parquet"', kinds=CLASSIFICATION, required=CLASSIFICATION)
    dataset_config: str = key("", "the hub dataset's configuration (e.g. \"sst2\" of nyu-mll/glue)", '"sst2"',
                              kinds=CLASSIFICATION)
    eval_split: str = key("test", "the scored split", '"test"', kinds=CLASSIFICATION)
    train_split: str = key("", "labeled examples (Fisher, RegMean); also the inductive protocol's unlabeled pool",
                           '"train"', kinds=CLASSIFICATION)
    unlabeled_split: str = key("", "the inductive protocol's unlabeled pool (default: train_split)", '"validation"',
                               kinds=CLASSIFICATION)
    label_column: str = key("label", "integer class ids, or the class names themselves", '"label"',
                            kinds=CLASSIFICATION)
    class_names: tuple[str, ...] = key((), "class names in label order", '["negative", "positive"]',
                                       kinds=CLASSIFICATION, required=CLASSIFICATION)
    image_column: str = key("image", "the images", '"image"', kinds=(IMAGE,))
    templates: tuple[str, ...] = key(("a photo of a {}.",), "zero-shot prompt templates, each with one {}",
                                     '["a photo of a {}."]', kinds=(IMAGE,))
    text_column: str = key("text", "the text to classify", '"sentence"', kinds=(SEQUENCE,))
    text_pair_column: str = key("", "a second text (sentence-pair tasks)", '"sentence2"', kinds=(SEQUENCE,))
    lm_eval_task: str = key("", "the lm-eval task name", '"arc_easy"', kinds=(LM_EVAL,), required=(LM_EVAL,))
    task_yaml: str = key("", "a task YAML file or a folder of them (default: lm-eval's built-in tasks)",
                         '"./lm_eval_tasks/NAME.yaml"', kinds=(LM_EVAL,))
    metric: str = key("", "lm-eval result key scored as accuracy (default: the task's first metric)",
                      '"acc,none"', kinds=(LM_EVAL,))


@dataclass(frozen=True)
class SuiteConfig:
    """The file's top level (``tasks`` is parsed into :class:`TaskConfig` separately)."""

    kind: str = key("", "what the experts do and how they are scored: " + ", ".join(KINDS), f'"{IMAGE}"',
                    required=KINDS)
    base: str = key("", "the pretrained checkpoint the experts were fine-tuned from: hub id or local folder",
                    '"openai/clip-vit-base-patch32"', required=KINDS)
    name: str = key("", "the suite's name in records (default: the file's stem)", '"my-suite"')
    description: str = key("", "one line for humans", '"CLIP ViT-B/32 on my tasks"')
    protocol: str = key("transductive", "test-time adaptation data: the eval split or the unlabeled split",
                        '"inductive"', kinds=CLASSIFICATION)
    eval_batch_size: int = key(0, "examples per forward pass when scoring (default: by kind)", "64")
    max_length: int = key(0, "longest tokenized input (default: the model's)", "256", kinds=(SEQUENCE, LM_EVAL))
    limit: int = key(0, "score only the first N documents of each lm-eval task (0: all)", "100", kinds=(LM_EVAL,))


TOP_KEYS = (*(f.name for f in dataclasses.fields(SuiteConfig)), "tasks")


@dataclass(frozen=True)
class Reference:
    """A checkpoint, dataset or task file the suite file names: a local path or a hub id."""

    key: str  # where the file names it, e.g. "tasks.mnist.expert"
    text: str  # as written
    local: Path | None = None  # resolved (may contain {split} for datasets)
    hub_id: str | None = None

    def resolved(self) -> str:
        return f"hub:{self.hub_id}" if self.hub_id else str(self.local)


@dataclass(frozen=True)
class SuiteFile:
    """A parsed, validated suite file with its references resolved (not yet checked to exist)."""

    path: Path  # as given (messages)
    resolved: Path  # absolute (records)
    sha256: str
    config: SuiteConfig
    tasks: dict[str, TaskConfig]
    base: Reference
    experts: dict[str, Reference]
    datasets: dict[str, Reference]  # classification kinds
    task_files: dict[str, Reference]  # lm-eval tasks with a task_yaml

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def name(self) -> str:
        return f"custom:{self.config.name or self.resolved.stem}"

    @property
    def source(self) -> str:
        return str(self.path)

    def fail(self, where: str, problem: str) -> BenchError:
        return BenchError(f"{self.path}: {where}: {problem}")

    def references(self) -> dict[str, str]:
        """Every reference, resolved, by key (part of the suite's parameters)."""
        refs = [self.base, *self.experts.values(), *self.datasets.values(), *self.task_files.values()]
        return {ref.key: ref.resolved() for ref in refs}


# ----------------------------------------------------------------------------------------------------------
# Reading and validating
# ----------------------------------------------------------------------------------------------------------


def read_suite_file(path: Path | str) -> SuiteFile:
    """Parse and check ``path``; every problem is a one-line :class:`BenchError` naming the file, key and fix."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"suite file '{path}' not found; pass --suite path/to/suite.toml or a suite name "
                         f"(see `bench list suites`)")
    if tomllib is None:  # pragma: no cover
        raise BenchError("reading a suite file on Python 3.10 needs the tomli package: pip install tomli")
    content = path.read_bytes()
    try:
        data = tomllib.loads(content.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"{path}: not valid TOML: {exc}") from None
    source = str(path)
    _check_keys(data, TOP_KEYS, source, "", {})  # a misspelt `kind` is reported as such, before it is missing
    kind = _kind(data, source)
    _check_keys(data, TOP_KEYS, source, "", _kinds_of(SuiteConfig), kind)
    config = SuiteConfig(**_values(SuiteConfig, {k: v for k, v in data.items() if k != "tasks"}, source, "", kind))
    if config.name:
        check_name_part(source, f"name = {config.name!r}", config.name, "the folder of the suite's records")
    if config.protocol not in PROTOCOLS:
        raise BenchError(f"{source}: protocol = '{config.protocol}' is not one of {', '.join(PROTOCOLS)}")
    tasks = _tasks(data, source, kind)
    for name, task in tasks.items():
        _check_task(task, source, f"tasks.{name}", kind)
    root = path.resolve().parent
    return SuiteFile(
        path=path, resolved=path.resolve(), sha256=hashlib.sha256(content).hexdigest(), config=config, tasks=tasks,
        base=reference(source, root, "base", config.base),
        experts={name: reference(source, root, f"tasks.{name}.expert", t.expert) for name, t in tasks.items()},
        datasets={name: reference(source, root, f"tasks.{name}.dataset", t.dataset)
                  for name, t in tasks.items() if t.dataset},
        task_files={name: reference(source, root, f"tasks.{name}.task_yaml", t.task_yaml, hub=False)
                    for name, t in tasks.items() if t.task_yaml},
    )


def reference(source: str, root: Path, where: str, text: str, hub: bool = True) -> Reference:
    """``/``, ``./``, ``../`` and ``~`` start local paths (relative to ``root``); anything else is a hub id."""
    if text.startswith(LOCAL_PREFIXES):
        return Reference(where, text, local=(root / Path(text).expanduser()).resolve())
    if hub and HUB_ID.match(text):
        return Reference(where, text, hub_id=text)
    if not hub:
        raise BenchError(f"{source}: {where} = {text!r} must be a local path; start it with ./ (relative to the "
                         f"suite file), ../ or /")
    raise BenchError(f"{source}: {where} = {text!r} is neither a local path nor a hub id; start a local path with "
                     f"./ (relative to the suite file), ../ or /, or write a hub id as owner/name")


def _kind(data: Mapping[str, Any], source: str) -> str:
    if "kind" not in data:
        raise BenchError(f"{source}: missing key 'kind'; add kind = \"{IMAGE}\" (or one of {', '.join(KINDS[1:])}) "
                         f"to the top level")
    kind = data["kind"]
    if not isinstance(kind, str):
        raise BenchError(f"{source}: kind must be a string, not {_toml(kind)}; e.g. kind = \"{IMAGE}\"")
    if kind not in KINDS:
        matches = close_matches(kind, KINDS)
        hint = f"did you mean: {', '.join(matches)}?" if matches else f"write one of {', '.join(KINDS)}"
        raise BenchError(f"{source}: unknown kind '{kind}'; {hint}")
    return kind


def _tasks(data: dict[str, Any], source: str, kind: str) -> dict[str, TaskConfig]:
    tables = data.get("tasks")
    if tables is None:
        raise BenchError(f"{source}: no tasks; add one table per task, e.g. [tasks.mnist] with "
                         f"expert = \"./experts/mnist\"")
    if not isinstance(tables, dict) or not tables or not all(isinstance(t, dict) for t in tables.values()):
        raise BenchError(f"{source}: tasks must hold one table per task, e.g. [tasks.mnist] with "
                         f"expert = \"./experts/mnist\"")
    task_keys = [f.name for f in dataclasses.fields(TaskConfig)]
    tasks = {}
    for name, table in tables.items():
        where = f"tasks.{name}"
        check_name_part(source, f"task name {name!r} (a [tasks.NAME] table)", name, "files in the bench cache")
        _check_keys(table, task_keys, source, where, _kinds_of(TaskConfig), kind)
        tasks[name] = TaskConfig(**_values(TaskConfig, table, source, where, kind))
    return tasks


def _kinds_of(cls: type) -> dict[str, tuple[str, ...]]:
    return {f.name: f.metadata["kinds"] for f in dataclasses.fields(cls)}


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], source: str, section: str,
                kinds: Mapping[str, tuple[str, ...]], kind: str | None = None) -> None:
    """Unknown keys (with close matches among this kind's keys) and keys another kind uses."""
    usable = [k for k in allowed if kind not in KINDS or kind in kinds.get(k, KINDS)]
    for name in table:
        where = f"{section}.{name}" if section else name
        if name not in allowed:
            matches = close_matches(name, usable)
            hint = f"did you mean: {', '.join(matches)}?" if matches else f"known: {', '.join(usable)}"
            raise BenchError(f"{source}: unknown key '{where}'; {hint}")
        if kind in KINDS and name in kinds and kind not in kinds[name]:
            raise BenchError(f"{source}: {where} is not used by kind \"{kind}\" (only by {', '.join(kinds[name])}); "
                             f"remove it")


def _values(cls: type, table: Mapping[str, Any], source: str, section: str, kind: str) -> dict[str, Any]:
    """The table's values converted to ``cls``'s field types, after checking types and required keys."""
    hints = typing.get_type_hints(cls)
    values = {}
    for spec in dataclasses.fields(cls):
        where = f"{section}.{spec.name}" if section else spec.name
        required = kind in spec.metadata["required"]
        example = spec.metadata["example"].replace("NAME", section.removeprefix("tasks."))
        if spec.name not in table:
            if required:
                place = f"[{section}]" if section else "the top level"
                raise BenchError(f"{source}: missing key '{where}'; add {spec.name} = {example} to {place} "
                                 f"({spec.metadata['help']})")
            continue
        value = _typed(hints[spec.name], table[spec.name], source, where, example)
        if value == "" and (required or spec.default):
            raise BenchError(f"{source}: {where} is empty; e.g. {spec.name} = {example}")
        values[spec.name] = value
    return values


NonEmptyStr = Annotated[str, pydantic.Field(strict=True, min_length=1)]
SCHEMA_TYPES: dict[Any, Any] = {  # a field's type -> what TOML must give for it (strict: no coercion)
    str: Annotated[str, pydantic.Field(strict=True)],
    int: Annotated[int, pydantic.Field(strict=True, ge=0)],
    tuple[str, ...]: Annotated[tuple[NonEmptyStr, ...], pydantic.Field(min_length=1)],
}


@functools.cache
def _adapter(hint: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(SCHEMA_TYPES[hint])


def _typed(hint: Any, value: Any, source: str, where: str, example: str) -> Any:
    """``value`` as the field's type (validated by pydantic), or the one-line error saying what to write."""
    try:
        return _adapter(hint).validate_python(value)
    except pydantic.ValidationError as exc:
        negative = exc.errors()[0]["type"] == "greater_than_equal"
    if negative:
        raise BenchError(f"{source}: {where} = {value} must not be negative; e.g. {where.split('.')[-1]} = "
                         f"{example}")
    what = {str: "a string", int: "an integer"}.get(hint, "a non-empty list of strings")
    raise BenchError(f"{source}: {where} must be {what}, not {_toml(value)}; e.g. {where.split('.')[-1]} = "
                     f"{example}")


def check_name_part(source: str, label: str, value: str, names: str) -> None:
    """``value`` becomes one folder or file name (``names`` says which): only letters, digits and ``_ - .``, never
    ``.`` or ``..`` (no separators, so nothing is written outside the results folder or the cache)."""
    if not NAME_PART.fullmatch(value) or value in (".", ".."):
        raise BenchError(f"{source}: {label} is not allowed: it names {names}; {NAME_RULE}")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return json.dumps(value, default=str)


def _check_task(task: TaskConfig, source: str, where: str, kind: str) -> None:
    """Checks across keys of one task."""
    if kind in CLASSIFICATION:
        if len(set(task.class_names)) != len(task.class_names):
            duplicate = next(n for n in task.class_names if task.class_names.count(n) > 1)
            raise BenchError(f"{source}: {where}.class_names lists '{duplicate}' twice; class names must be unique")
        if kind == IMAGE:
            bad = [t for t in task.templates if t.count("{}") != 1]
            if bad:
                raise BenchError(f"{source}: {where}.templates: '{bad[0]}' must contain {{}} exactly once (where "
                                 f"the class name goes), e.g. \"a photo of a {{}}.\"")
        for name in ("eval_split", "train_split", "unlabeled_split", "dataset_config"):
            value = getattr(task, name)
            if value:
                check_name_part(source, f"{where}.{name} = {value!r}", value, "folders in the bench cache")
