"""Bring-your-own suites: ``bench run --suite path/to/suite.toml``.

A TOML file names a base checkpoint, one expert per task, each task's data and the evaluation ``kind``::

    kind = "image-classification"          # or "sequence-classification", "lm-eval"
    base = "openai/clip-vit-base-patch32"  # a hub id (read from the cache) or a local folder ("./...", "/...")
    protocol = "transductive"              # optional; test-time methods adapt on test inputs, or "inductive"

    [tasks.mnist]
    expert = "./experts/mnist"             # save_pretrained folder, or a folder holding a safetensors state dict
    dataset = "ylecun/mnist"               # hub id, save_to_disk folder, or files: "./data/mnist/{split}.parquet"
    eval_split = "test"                    # scored split; train_split / unlabeled_split are optional
    class_names = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    templates = ['a photo of the number: "{}".']

References that start with ``/``, ``./``, ``../`` or ``~`` are local paths (relative ones start at the suite file's
folder); anything else is a hub id, read from the local hub cache that ``bench prepare path/to/suite.toml`` fills.
Every problem with the file is one line naming the file, the key and the fix (:func:`read_suite_file`, in
:mod:`suites._suite_file` with the schema).

What each kind reuses:

- ``image-classification``: :mod:`suites.vit` (CLIP checkpoints in transformers' format, safe weight reading,
  zero-shot heads from the base's text tower, CLIP preprocessing, :class:`suites.vit.VitProblem`).
- ``sequence-classification`` and ``lm-eval``: :mod:`suites._lm` (local loading of transformers models,
  :class:`~suites._lm.MergedParameters`, :class:`~suites._lm.LmEvalRunner`).

The suite's parameters (what records key on) hold the resolved file path, the sha256 of its content and the
resolved artefact references, so records of different files or of an edited file never collide and ``--resume``
recomputes exactly what changed. ``bench list suites`` does not list these suites: :func:`bench.registry.get_suite`
calls :func:`file_suite` for a ``.toml`` path (or the ``custom:<stem>`` name of a file loaded in this process).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from bench.errors import BenchError, MethodNotApplicable, close_matches, missing_artifact_error
from bench.measure import torch_threads
from bench.model_pool import check_compatible, mapped
from bench.problem import MergeProblem, StateDict, TaskMetrics
from bench.registry import (
    ALL_DATA,
    CAPABILITIES,
    SCORED_SPLITS_ONLY,
    ArtefactSize,
    DataNeeds,
    SuiteSpec,
    capabilities_of,
    param,
    register_suite_resolver,
)
from suites import _clip_images as clip_images
from suites import _clip_weights as clip_weights
from suites import _hub, vit
from suites._clip_classification import DataSplit, TaskData, derived_seed
from suites._lm import (
    ExpertsProblem,
    LmEvalRunner,
    MergedParameters,
    capture_linear_inputs,
    draw_indices,
    from_pretrained,
    model_ids,
    pad_token_ids,
    real_tokens,
    refuse_untrusted_task_code,
    trim_padding,
)
from suites._suite_file import (
    CLASSIFICATION,
    DEFAULT_EVAL_BATCH,
    IMAGE,
    LM_EVAL,
    PROTOCOLS,
    SEQUENCE,
    SPLIT_PLACEHOLDER,
    Reference,
    SuiteFile,
    TaskConfig,
    read_suite_file,
)
from suites._torchvision_compat import ensure_torchvision_importable
from suites._vit_tasks import TaskSpec
from suites.llm import LlmProblem
from suites.vit import VitParams, VitProblem

# What `bench prepare` fetches of a hub checkpoint: config, tokenizer (sentencepiece included) and weights.
MODEL_FILES = vit.CheckpointFiles(clip_weights.HF_WEIGHT_FILES, (*vit.HF_FILES.preferred, "*.model"),
                                  vit.HF_FILES.fallback)

# ----------------------------------------------------------------------------------------------------------
# Where artefacts are: the hub cache (readiness, prepare) or local paths (checked when the suite loads)
# ----------------------------------------------------------------------------------------------------------


def used_splits(task: TaskConfig) -> list[str]:
    """The splits a classification task reads, eval split first."""
    return list(dict.fromkeys(s for s in (task.eval_split, task.train_split, task.unlabeled_split) if s))


def needed_splits(task: TaskConfig, needs: DataNeeds, protocol: str) -> list[str]:
    """The splits the methods behind ``needs`` read: the eval split always, the train split for labeled examples,
    the unlabeled pool (unlabeled_split, else train_split) for test-time methods under the inductive protocol."""
    pool = needs.unlabeled and protocol == "inductive"
    train = task.train_split if needs.labeled or (pool and not task.unlabeled_split) else ""
    return list(dict.fromkeys(s for s in (task.eval_split, train, task.unlabeled_split if pool else "") if s))


def hub_artefacts(suite: SuiteFile, cache_dir: Path, needs: DataNeeds = ALL_DATA,
                  protocol: str | None = None) -> list[vit.Artefact]:
    """Every hub checkpoint and dataset split the suite reads for the methods behind ``needs``, as
    :class:`suites.vit.Artefact` (cache folder and how ``bench prepare`` downloads it), in file order without
    repeats."""
    protocol = protocol or suite.config.protocol
    items: dict[Path, vit.Artefact] = {}
    for ref in (suite.base, *suite.experts.values()):
        if ref.hub_id:
            folder = _hub.model_dir(cache_dir, ref.hub_id)
            items.setdefault(folder, vit.Artefact(f"checkpoint {ref.hub_id} ({ref.key})", folder,
                                                  functools.partial(vit.download_checkpoint, ref.hub_id, MODEL_FILES),
                                                  remote=vit.checkpoint_remote(ref.hub_id, MODEL_FILES)))
    for name, ref in suite.datasets.items():
        task = suite.tasks[name]
        if not ref.hub_id:
            continue
        for split in needed_splits(task, needs, protocol):
            config = task.dataset_config or None
            folder = _hub.dataset_dir(cache_dir, ref.hub_id, split, config)
            label = f"dataset {ref.hub_id}" + (f" ({task.dataset_config})" if task.dataset_config else "")
            items.setdefault(folder, vit.Artefact(
                f"{label}, {split} split ({ref.key})", folder,
                functools.partial(_download_split, ref.hub_id, split, config),
                remote=functools.partial(_hub.dataset_split_files, ref.hub_id, split, config), converted=True))
    return list(items.values())


def _download_split(repo_id: str, split: str, config: str | None, folder: Path) -> None:
    _hub.download_dataset(repo_id, split, folder, config)


def _protocol(suite: SuiteFile, params: Any) -> str:
    return getattr(params, "protocol", None) or suite.config.protocol


def missing_artefacts(suite: SuiteFile, params: Any, cache_dir: Path, needs: DataNeeds = ALL_DATA) -> list[str]:
    """Readiness: one line per hub artefact not (completely) in the cache."""
    return [item.description for item in hub_artefacts(suite, Path(cache_dir), needs, _protocol(suite, params))
            if not _hub.is_complete(item.folder)]


def artefact_sizes(suite: SuiteFile, params: Any, cache_dir: Path, needs: DataNeeds,
                   online: bool) -> list[ArtefactSize]:
    return [item.size(Path(cache_dir), online)
            for item in hub_artefacts(suite, Path(cache_dir), needs, _protocol(suite, params))]


def require_ready(suite: SuiteFile, cache_dir: Path) -> None:
    """What every method needs is cached; a train or unlabeled split is checked when a method reads it."""
    missing = missing_artefacts(suite, None, cache_dir, SCORED_SPLITS_ONLY)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise missing_artifact_error(suite.source, missing[0] + more, cache_dir)


def prepare_suite(suite: SuiteFile, params: Any, cache_dir: Path, progress: bool,
                  needs: DataNeeds = ALL_DATA) -> None:
    """``bench prepare path/to/suite.toml``: check the local paths, download the hub artefacts the methods behind
    ``needs`` read (resumable)."""
    check_local_paths(suite)
    for item in hub_artefacts(suite, Path(cache_dir), needs, _protocol(suite, params)):
        if progress:
            print(f"{suite.name}: {item.description}", file=sys.stderr)
        _hub.fetch(item.folder, item.download)


def check_local_paths(suite: SuiteFile) -> None:
    """Every local checkpoint folder and task file exists (datasets are checked per split when read)."""
    for ref in (suite.base, *suite.experts.values()):
        if ref.local is not None and not ref.local.is_dir():
            raise suite.fail(ref.key, f"no checkpoint folder {ref.local}; fix the path (relative paths start at the "
                                      f"suite file's folder)")
    for ref in suite.task_files.values():
        if ref.local is not None and not ref.local.exists():
            raise suite.fail(ref.key, f"no task file or folder {ref.local}; fix the path (relative paths start at "
                                      f"the suite file's folder)")


def model_folder(suite: SuiteFile, ref: Reference, cache_dir: Path) -> Path:
    if ref.hub_id:
        return _hub.require(_hub.model_dir(cache_dir, ref.hub_id), suite.source, f"checkpoint {ref.hub_id}",
                            cache_dir)
    assert ref.local is not None
    return ref.local


def checkpoint_tensors(suite: SuiteFile, ref: Reference, folder: Path) -> Mapping[str, Tensor]:
    """A checkpoint's tensors: transformers' weight files (safetensors, sharded, or a weights-only torch file),
    else the folder's safetensors state dict. Pickled objects are refused. Safetensors come as a reader (one
    tensor read at a time), so experts are never held whole."""
    names = [*clip_weights.HF_WEIGHT_FILES,
             *sorted(p.name for p in folder.glob("*.safetensors") if p.name not in clip_weights.HF_WEIGHT_FILES)]
    if not any((folder / name).is_file() for name in names):
        raise suite.fail(ref.key, f"{folder} holds no weights (model.safetensors, pytorch_model.bin or a "
                                  f"*.safetensors state dict); save the checkpoint with save_pretrained")
    return clip_weights.open_weights(folder, names)


def folder_identity(folder: Path) -> str:
    """A short digest that changes when any file of ``folder`` does: the hub manifest, else names, sizes, mtimes."""
    folder = Path(folder)
    if (folder / _hub.MARKER).is_file():
        return _hub.manifest_digest(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    stamp = [(str(p.relative_to(folder.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Datasets: hub cache splits, save_to_disk folders, parquet / json / csv files
# ----------------------------------------------------------------------------------------------------------

DATA_FILE_READERS = {".parquet": "from_parquet", ".json": "from_json", ".jsonl": "from_json", ".csv": "from_csv"}


@dataclass
class OpenedSplit:
    """One split of a task's dataset and a digest of where it came from (for derived caches)."""

    dataset: Any  # datasets.Dataset
    identity: str
    where: str  # for messages


def open_split(suite: SuiteFile, task_name: str, split: str, cache_dir: Path) -> OpenedSplit:
    ref, task = suite.datasets[task_name], suite.tasks[task_name]
    if ref.hub_id:
        folder = _hub.require(_hub.dataset_dir(cache_dir, ref.hub_id, split, task.dataset_config or None),
                              suite.source, f"dataset {ref.hub_id}, {split} split", cache_dir)
        return OpenedSplit(clip_images.load_split(folder), _hub.manifest_digest(folder),
                           f"dataset {ref.hub_id} ({split})")
    return open_local_split(suite, ref, split, split == task.eval_split, cache_dir)


def open_local_split(suite: SuiteFile, ref: Reference, split: str, is_eval: bool, cache_dir: Path) -> OpenedSplit:
    """``{split}`` in the path names one file or folder per split; a folder of splits (``save_to_disk`` of a
    ``DatasetDict``, or one ``save_to_disk`` folder per split) is indexed by the split's name; any other single
    dataset can only be the eval split."""
    import datasets

    assert ref.local is not None
    templated = SPLIT_PLACEHOLDER in str(ref.local)
    path = Path(str(ref.local).replace(SPLIT_PLACEHOLDER, split))
    where = f"{ref.key} ({split} split)"
    if not path.exists():
        raise suite.fail(ref.key, f"no dataset at {path} for the {split} split; fix the path (relative paths start "
                                  f"at the suite file's folder; {{split}} in it stands for the split's name)")
    if path.is_file():
        reader = DATA_FILE_READERS.get(path.suffix.lower())
        if reader is None:
            raise suite.fail(ref.key, f"{path.name}: unsupported file type; use parquet, json, jsonl or csv files, "
                                      f"or a save_to_disk folder")
        try:
            dataset = getattr(datasets.Dataset, reader)(str(path), cache_dir=str(Path(cache_dir) / "custom" / "data"))
        except Exception as error:  # noqa: BLE001 - parsers fail in many ways; report one line
            first = f"{type(error).__name__}: {error}".splitlines()[0]
            raise suite.fail(ref.key, f"cannot read {path} ({first}); fix or replace the file") from None
    elif (path / "dataset_dict.json").is_file():
        splits = _load_from_disk(suite, ref, path)
        if split not in splits:
            raise suite.fail(ref.key, f"{path} has no split '{split}' (it has {', '.join(splits)}); fix the task's "
                                      f"split names")
        return OpenedSplit(splits[split], f"{folder_identity(path)}:{split}", where)
    elif not templated and (path / split).is_dir():  # one save_to_disk folder per split, as in the hub cache
        return OpenedSplit(_load_from_disk(suite, ref, path / split), folder_identity(path / split), where)
    else:
        dataset = _load_from_disk(suite, ref, path)
    if not templated and not is_eval:
        raise suite.fail(ref.key, f"{path} holds a single split, which is the eval split; for the {split} split "
                                  f"write the path with {{split}} (e.g. \"./data/{{split}}.parquet\") or save a "
                                  f"DatasetDict")
    return OpenedSplit(dataset, folder_identity(path), where)


def _load_from_disk(suite: SuiteFile, ref: Reference, path: Path) -> Any:
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise suite.fail(ref.key, f"{path} is not a datasets save_to_disk folder ({first})") from None


def require_columns(suite: SuiteFile, opened: OpenedSplit, columns: Sequence[str], task_name: str) -> None:
    names = opened.dataset.column_names
    for column in columns:
        if column not in names:
            matches = close_matches(column, names)
            hint = f"did you mean: {', '.join(matches)}?" if matches else f"it has {', '.join(names)}"
            raise suite.fail(f"tasks.{task_name}", f"{opened.where} has no column '{column}'; {hint}")


def class_ids(suite: SuiteFile, opened: OpenedSplit, task_name: str) -> Tensor:
    """The label column as int64 class ids: integers as they are, strings by their position in class_names."""
    task = suite.tasks[task_name]
    values = opened.dataset.data.column(task.label_column).to_pylist()
    if values and all(isinstance(v, str) for v in values):
        index = {name: i for i, name in enumerate(task.class_names)}
        unknown = next((v for v in values if v not in index), None)
        if unknown is not None:
            raise suite.fail(f"tasks.{task_name}.class_names", f"{opened.where} has label '{unknown}', which is not "
                                                               f"a class name; add it to class_names")
        return torch.tensor([index[v] for v in values], dtype=torch.long)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = next(v for v in values if not isinstance(v, int) or isinstance(v, bool))
        raise suite.fail(f"tasks.{task_name}.label_column", f"{opened.where} has label {bad!r}; labels must be "
                                                            f"integer class ids or class names")
    labels = torch.tensor(values, dtype=torch.long)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(task.class_names)):
        raise suite.fail(f"tasks.{task_name}.class_names", f"{opened.where} has labels in [{int(labels.min())}, "
                                                           f"{int(labels.max())}] but {len(task.class_names)} class "
                                                           f"names; list one name per class")
    return labels


# ----------------------------------------------------------------------------------------------------------
# image-classification: CLIP checkpoints in transformers' format, zero-shot heads, VitProblem
# ----------------------------------------------------------------------------------------------------------


class CustomClipProblem(VitProblem):
    """:class:`~suites.vit.VitProblem` whose tasks may lack a train or unlabeled split (not in the file, or left
    out by ``bench prepare``): methods that need one are skipped with the reason (``missing_split``) instead of
    stopping the run."""


def missing_split(suite: SuiteFile, params: Any, task: str, split: str) -> MethodNotApplicable:
    """Why a method reading ``split`` (train or unlabeled) of ``task`` is skipped: the file names no such split,
    or ``bench prepare`` left the hub split out (the reason then names the command that adds it)."""
    config = suite.tasks[task]
    source = config.train_split if split == "train" else (config.unlabeled_split or config.train_split)
    ref = suite.datasets.get(task)
    if source and ref is not None and ref.hub_id:
        protocol = _protocol(suite, params)
        args = f"--set suite.protocol={protocol}" if protocol != suite.config.protocol else ""
        return _hub.split_not_prepared(f"the {source} split of dataset {ref.hub_id} (task '{task}')", suite.source,
                                       args, "unlabeled" if split == "unlabeled" else "labeled")
    key = "unlabeled_split (or train_split)" if split == "unlabeled" else f"{split}_split"
    return MethodNotApplicable(f"task '{task}' of {suite.name} has no {split} data; add tasks.{task}.{key} to the "
                               f"suite file")


def prepared_splits(suite: SuiteFile, name: str, cache_dir: Path) -> list[str]:
    """The task's splits to load: those the file names, less hub splits other than the eval split that
    ``bench prepare`` left out (no method chosen then read them)."""
    task, ref = suite.tasks[name], suite.datasets[name]
    if not ref.hub_id:
        return used_splits(task)
    return [split for split in used_splits(task) if split == task.eval_split
            or _hub.is_complete(_hub.dataset_dir(cache_dir, ref.hub_id, split, task.dataset_config or None))]


def load_clip_base(suite: SuiteFile, folder: Path) -> clip_weights.LoadedBackbone:
    """A transformers ``CLIPModel`` folder as a :class:`~suites._clip_weights.LoadedBackbone`, from the pieces of
    :func:`suites.vit.load_hf_backbone` (which reads the folder of a fixed hub id). The text tower is built only
    when a head is not cached yet."""
    ensure_torchvision_importable()
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    try:
        config = CLIPConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except BenchError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers fails on a damaged folder in many ways; one line
        raise suite.fail("base", f"{folder} is not a transformers CLIPModel folder with its tokenizer "
                                 f"({loading_error(error)})") from None
    raw = checkpoint_tensors(suite, suite.base, folder)
    if "visual_projection.weight" not in raw:
        raise suite.fail("base", f"{folder} lacks tensor 'visual_projection.weight'; the base must be a whole "
                                 f"CLIPModel (its text tower builds the zero-shot heads)")
    encoder = clip_weights.HFClipImageEncoder(config.vision_config, config.projection_dim)
    skip = clip_weights.non_persistent_buffers(encoder)
    pretrained = clip_weights.hf_vision_tensors(raw, skip, f"base {suite.base.text}")
    expected = {k: v for k, v in encoder.state_dict().items() if k.startswith("vision_model.")}
    check_compatible(expected, [pretrained], [f"base {suite.base.text}"])
    projection = raw["visual_projection.weight"].float()
    frozen = clip_weights.frozen_tensors(encoder, pretrained, {"visual_projection.weight": projection})
    text_model = functools.cache(lambda: clip_weights.full_clip_model(folder, config, CLIPModel, raw))

    def encode_text(prompts: list[str]) -> Tensor:
        model = text_model()
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt",
                           max_length=config.text_config.max_position_embeddings).to(model.text_projection.weight.device)
        with torch.no_grad():
            pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return model.text_projection(pooled.pooler_output).cpu()

    return clip_weights.LoadedBackbone(encoder=encoder, pretrained=pretrained, frozen=frozen,
                          image_size=int(config.vision_config.image_size), logit_scale=float(raw["logit_scale"]),
                          encode_text=encode_text, identity=f"custom:{folder_identity(folder)}",
                          expert_reader=lambda task: {})


def task_spec(suite: SuiteFile, name: str) -> TaskSpec:
    """The task as :mod:`suites.vit` describes one (heads, labels)."""
    task = suite.tasks[name]
    return TaskSpec(name=name, dataset=suite.datasets[name].resolved(), class_names=task.class_names,
                    templates=task.templates, task_vectors_name="", hf_expert="", config=task.dataset_config or None,
                    test_split=task.eval_split, train_split=task.train_split, image_column=task.image_column,
                    label_column=task.label_column)


def clip_experts(suite: SuiteFile, backbone: clip_weights.LoadedBackbone, cache_dir: Path) -> dict[str, StateDict]:
    """Every expert's vision tower, checked against the base (naming the first mismatching tensor) before anything
    else is loaded."""
    skip = clip_weights.non_persistent_buffers(backbone.encoder)
    experts = {}
    for name, ref in suite.experts.items():
        raw = checkpoint_tensors(suite, ref, model_folder(suite, ref, cache_dir))
        experts[name] = clip_weights.hf_vision_tensors(raw, skip, f"expert {ref.text} ({ref.key})")
        check_compatible(backbone.pretrained, [experts[name]], [name])
    return experts


def image_task_data(suite: SuiteFile, name: str, image_size: int, cache_dir: Path, progress: bool) -> TaskData:
    """The task's splits, named as :class:`~suites._clip_classification.ClipClassificationProblem` reads them."""
    task = suite.tasks[name]
    splits = {}
    for split in prepared_splits(suite, name, cache_dir):
        opened = open_split(suite, name, split, cache_dir)
        require_columns(suite, opened, (task.image_column, task.label_column), name)
        images: Any = clip_images.SplitImages(opened.dataset, task.image_column, image_size)
        if split == task.eval_split:  # scored by every method: preprocess once, keep on disk
            digest = hashlib.sha256(json.dumps([clip_images.PREPROCESS_VERSION, opened.identity, task.image_column,
                                                image_size]).encode()).hexdigest()[:16]
            stored = Path(cache_dir) / "custom" / "inputs" / f"{name}-{split}-{digest}.npy"
            images = clip_images.store_images(images, stored, progress, f"{name}: {split}")
        splits[split] = DataSplit(images, class_ids(suite, opened, name))
    return TaskData(task.class_names, named_splits(task, splits))


def named_splits(task: TaskConfig, splits: Mapping[str, DataSplit]) -> dict[str, DataSplit]:
    """The file's splits under the names problems read: test (scored), train (labeled), unlabeled (inductive);
    a split that was not loaded (not prepared) is left out."""
    named = {"test": splits[task.eval_split]}
    if task.train_split in splits:
        named["train"] = splits[task.train_split]
    if (task.unlabeled_split or task.train_split) in splits:
        named["unlabeled"] = splits[task.unlabeled_split or task.train_split]
    return named


def build_image_problem(suite: SuiteFile, params: Any, cache_dir: Path, progress: bool) -> MergeProblem:
    base_folder = model_folder(suite, suite.base, cache_dir)
    backbone = load_clip_base(suite, base_folder)
    experts = clip_experts(suite, backbone, cache_dir)
    # Head cache keys: VitParams' defaults plus the backbone's identity (a digest of this base folder) and the task.
    heads = {name: vit.cached_head(cache_dir, VitParams(), task_spec(suite, name), backbone) for name in suite.tasks}
    data = {name: image_task_data(suite, name, backbone.image_size, cache_dir, progress) for name in suite.tasks}
    size = sum(v.numel() for v in backbone.pretrained.values())
    return CustomClipProblem(
        name=suite.name, encoder=backbone.encoder, pretrained=backbone.pretrained, frozen=backbone.frozen,
        expert_reader=experts.__getitem__, heads=heads, data=data, protocol=params.protocol,
        missing_split=functools.partial(missing_split, suite, params),
        prepare=clip_images.normalise_images, eval_batch_size=params.eval_batch_size,
        cpu_threads=1 if size < vit.SINGLE_THREAD_BELOW else None,
        facts={"suite_file": str(suite.resolved), "sha256": suite.sha256, "kind": suite.kind,
               "image_size": backbone.image_size, "pretrained_identity": backbone.identity},
    )


# ----------------------------------------------------------------------------------------------------------
# Checkpoints of transformers models (sequence-classification, lm-eval)
# ----------------------------------------------------------------------------------------------------------


def merged_layout(merged: MergedParameters, raw: Mapping[str, Tensor], keys: Sequence[str] | None = None
                  ) -> Mapping[str, Tensor]:
    """A checkpoint's tensors under the merged names and layout, for ``keys`` (default: every merged key). Tied
    copies and buffers it also holds are left out; a missing tensor is left for
    :func:`~bench.problem.check_compatible` to name."""
    return mapped(raw, {key: key for key in (merged.keys if keys is None else keys) if key in raw},
                  cast=torch.float32, transposed=merged.transposed)


def load_transformers_model(suite: SuiteFile, folder: Path, auto_class: str, what: str) -> tuple[Any, Any]:
    """A model of ``transformers.<auto_class>`` and its tokenizer from a local folder (safe loading, float32)."""
    ensure_torchvision_importable()
    import transformers

    try:
        model = from_pretrained(getattr(transformers, auto_class), folder, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except BenchError:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. a truncated model.safetensors (SafetensorError); one line
        raise suite.fail("base", f"{folder} is not a transformers {what} folder with its tokenizer "
                                 f"({loading_error(error)})") from None
    return model, tokenizer


def loading_error(error: BaseException) -> str:
    """The first line of a loader's exception, with its type unless it is an OSError or ValueError."""
    lines = str(error).strip().splitlines()
    first = lines[0][:300] if lines else ""
    if isinstance(error, (OSError, ValueError)) and first:  # as before: their message says enough
        return first
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


# ----------------------------------------------------------------------------------------------------------
# sequence-classification: transformers sequence classifiers; the backbone is merged, each task keeps its head
# ----------------------------------------------------------------------------------------------------------


class SequenceClassificationProblem(ExpertsProblem):
    """Merge the backbone of ``AutoModelForSequenceClassification`` models fine-tuned per task (e.g. GPT-2 on GLUE);
    each task keeps its expert's classification head, which is never merged.

    ``model`` is a template: every forward substitutes the merged backbone and the task's head with
    ``torch.func.functional_call``, so transformers does the architecture's own pooling (GPT-2: the last token that
    is not padding; padding is :data:`suites._lm.PAD` in stored inputs, ``pad_id`` in the model's). Splits hold
    token ids in :class:`~suites._clip_classification.DataSplit` (``images`` are the padded ids).
    """

    def __init__(self, *, name: str, model: Any, pretrained: StateDict, experts: dict[str, StateDict],
                 heads: dict[str, StateDict], data: dict[str, dict[str, DataSplit]], pad_id: int, protocol: str,
                 eval_batch_size: int, cpu_threads: int | None, facts: dict[str, Any],
                 missing_split: Callable[[str, str], BenchError] | None = None) -> None:
        self.name = name
        self._set_weights(pretrained, experts)  # the backbone's parameters, merged names and layout
        self.protocol = protocol
        self.model = model.eval()
        self.merged = MergedParameters(self.model)
        self.heads = heads
        self.data = data
        self.pad_id = pad_id
        self.eval_batch_size = eval_batch_size
        self.cpu_threads = cpu_threads
        self._facts = facts
        # (task, split) -> why a method reading a split the task lacks is skipped
        self.missing_split = missing_split or (lambda task, split: BenchError(f"task '{task}' has no {split} split"))

    # -- forward --------------------------------------------------------------------------------------------

    def _forward(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        """Logits of already trimmed ``inputs`` (the caller's capture hooks see exactly these tokens)."""
        device = next(iter(params.values())).device
        self.model.to(device)
        inputs = inputs.to(device)
        head = {k: v.to(device) for k, v in self.heads[task].items()}
        kwargs = {"input_ids": model_ids(inputs, self.pad_id), "attention_mask": real_tokens(inputs).long()}
        output = functional_call(self.model, {**self.merged.to_module(params), **head}, (), kwargs, strict=False,
                                 tie_weights=True)
        return output.logits

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        return self._forward(params, task, trim_padding(inputs))

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        """Inputs of the backbone's linear maps (real tokens only), keyed by merged weight name (RegMean)."""
        captured = capture_linear_inputs(self.merged, inputs, self.eval_batch_size,
                                         lambda chunk: self._forward(params, task, chunk))
        return {key: value for key, value in captured.items() if key in self._pretrained}

    # -- data -----------------------------------------------------------------------------------------------

    def split(self, task: str, split: str) -> DataSplit:
        if split not in self.data[task]:
            raise self.missing_split(task, split)
        return self.data[task][split]

    def _adaptation_split(self) -> str:
        return "test" if self.protocol == "transductive" else "unlabeled"

    def _draw(self, task: str, split: str, n: int, seed: int, purpose: str) -> Tensor:
        size = len(self.split(task, split))
        if not 0 <= n <= size:
            raise BenchError(f"asked for {n} {purpose} examples of task '{task}' but its {split} split has {size}")
        return draw_indices(size, n, derived_seed(seed, self.name, task, purpose))

    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        return self._draw(task, self._adaptation_split(), n, seed, "unlabeled")

    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        return self.split(task, self._adaptation_split()).images[indices]

    def unlabeled_size(self, task: str) -> int:
        return len(self.split(task, self._adaptation_split()))

    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        indices = self._draw(task, "train", n, seed, "labeled")
        split = self.split(task, "train")
        return split.images[indices], split.labels[indices].clone()

    # -- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        split = self.split(task, "test")
        params = {key: value.to(device) for key, value in params.items()}
        correct, loss_sum = [], 0.0
        on_cpu = torch.device(device).type == "cpu"
        with torch_threads(self.cpu_threads if on_cpu else None), torch.no_grad():
            for start in range(0, len(split), self.eval_batch_size):
                labels = split.labels[start : start + self.eval_batch_size].to(device)
                logits = self.logits(params, task, split.images[start : start + self.eval_batch_size])
                loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct.append((logits.argmax(dim=-1) == labels).cpu())
        hits = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
        return TaskMetrics(accuracy=float(hits.float().mean()) if len(hits) else 0.0,
                           loss=loss_sum / max(len(split), 1), correct=hits)

    def describe(self) -> dict:
        return {**self._facts, "protocol": self.protocol, "tasks": list(self.tasks),
                "num_parameters": self.num_parameters(),
                "num_classes": {task: int(next(iter(head.values())).shape[0]) for task, head in self.heads.items()},
                "split_sizes": {task: {name: len(split) for name, split in splits.items()}
                                for task, splits in self.data.items()}}


def classifier_head(suite: SuiteFile, name: str, raw: StateDict, head_keys: Sequence[str]) -> StateDict:
    """The expert's classification head (the model's parameters outside the backbone), checked against the task's
    class names."""
    head = {key: raw[key].float().contiguous() for key in head_keys if key in raw}
    where = f"tasks.{name}.expert"
    if len(head) != len(head_keys):
        missing = next(key for key in head_keys if key not in raw)
        raise suite.fail(where, f"{suite.experts[name].text} has no classification head tensor '{missing}'; save "
                                f"the fine-tuned AutoModelForSequenceClassification with save_pretrained")
    outputs = {int(tensor.shape[0]) for tensor in head.values()}
    classes = len(suite.tasks[name].class_names)
    if outputs != {classes}:
        raise suite.fail(f"tasks.{name}.class_names", f"lists {classes} classes but the expert's head has "
                                                      f"{max(outputs)} outputs; list one name per output")
    return head


def text_splits(suite: SuiteFile, name: str, tokenizer: Any, max_length: int, cache_dir: Path
                ) -> dict[str, DataSplit]:
    """The task's splits as padded token ids (text, or text and text pair, truncated to ``max_length``)."""
    task = suite.tasks[name]
    columns = [c for c in (task.text_column, task.text_pair_column, task.label_column) if c]
    splits = {}
    for split in prepared_splits(suite, name, cache_dir):
        opened = open_split(suite, name, split, cache_dir)
        require_columns(suite, opened, columns, name)
        pairs = column_texts(suite, opened, name, "text_pair_column") if task.text_pair_column else None
        texts = column_texts(suite, opened, name, "text_column")
        ids = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"] if texts else []
        splits[split] = DataSplit(pad_token_ids(ids), class_ids(suite, opened, name))
    return named_splits(task, splits)


def column_texts(suite: SuiteFile, opened: OpenedSplit, name: str, key: str) -> list[str]:
    column = getattr(suite.tasks[name], key)
    values = opened.dataset.data.column(column).to_pylist()
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise suite.fail(f"tasks.{name}.{key}", f"{opened.where} column '{column}' holds {bad[0]!r}, not text")
    return values


def padding_id(suite: SuiteFile, model: Any, tokenizer: Any) -> int:
    """The id the model reads as padding (GPT-2 has none: its end-of-text token, as FusionBench's experts use)."""
    for candidate in (model.config.pad_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            model.config.pad_token_id = int(candidate)
            return int(candidate)
    raise suite.fail("base", "the tokenizer has neither a padding nor an end-of-text token; set pad_token in its "
                             "tokenizer_config.json")


def build_sequence_problem(suite: SuiteFile, params: Any, cache_dir: Path, progress: bool) -> MergeProblem:
    model, tokenizer = load_transformers_model(suite, model_folder(suite, suite.base, cache_dir),
                                               "AutoModelForSequenceClassification", "sequence classification")
    merged = MergedParameters(model)
    prefix = f"{model.base_model_prefix}."
    backbone = [key for key in merged.keys if key.startswith(prefix)]
    head_keys = [key for key in merged.keys if not key.startswith(prefix)]
    base = {k: v for k, v in merged.extract().items() if k.startswith(prefix)}
    experts, heads = {}, {}
    for name, ref in suite.experts.items():
        raw = checkpoint_tensors(suite, ref, model_folder(suite, ref, cache_dir))
        experts[name] = merged_layout(merged, raw, backbone)
        check_compatible(base, [experts[name]], [name])
        heads[name] = classifier_head(suite, name, raw, head_keys)
    max_length = suite.config.max_length or int(getattr(model.config, "max_position_embeddings", 512))
    data = {name: text_splits(suite, name, tokenizer, max_length, cache_dir) for name in suite.tasks}
    size = sum(v.numel() for v in base.values())
    return SequenceClassificationProblem(
        name=suite.name, model=model, pretrained=base, experts=experts, heads=heads, data=data,
        pad_id=padding_id(suite, model, tokenizer), protocol=params.protocol, eval_batch_size=params.eval_batch_size,
        cpu_threads=1 if size < vit.SINGLE_THREAD_BELOW else None,
        facts={"suite_file": str(suite.resolved), "sha256": suite.sha256, "kind": suite.kind,
               "max_length": max_length, "backbone_prefix": prefix},
        missing_split=functools.partial(missing_split, suite, params),
    )


# ----------------------------------------------------------------------------------------------------------
# lm-eval: causal LMs in transformers' format, scored by lm-evaluation-harness on the merged model in memory
# ----------------------------------------------------------------------------------------------------------


class LmEvalProblem(LlmProblem):
    """Merge causal LMs fine-tuned from one base; each task is one lm-eval task scored on the merged model
    (:class:`suites.llm.LlmProblem` with one lm-eval task per domain).

    What is merged is every parameter of the model (tied ones once, GPT-2's Conv1D weights in linear layout, see
    :class:`suites._lm.MergedParameters`). lm-eval tasks offer no tensors of inputs, so test-time and data-using
    methods are skipped with the reason.
    """

    task_noun = "task"

    def __init__(self, *, name: str, model: Any, tokenizer: Any, pretrained: StateDict, experts: dict[str, StateDict],
                 lm_eval_tasks: dict[str, str], runner: LmEvalRunner, eval_batch_size: int, limit: int | None,
                 max_length: int | None, facts: dict[str, Any]) -> None:
        super().__init__(name=name, model=model, tokenizer=tokenizer, pretrained=pretrained, experts=experts,
                         runner=runner, facts=facts, domain_tasks={task: [lm] for task, lm in lm_eval_tasks.items()},
                         batch_size=eval_batch_size, limit=limit, max_length=max_length)
        self.lm_eval_tasks = lm_eval_tasks

    def not_applicable(self, what: str) -> MethodNotApplicable:
        if what == "linear_inputs":
            return MethodNotApplicable(f"suite {self.name} does not expose the inputs of its linear layers")
        exposed = {"logits": "classifier logits", "unlabeled": "unlabeled inputs", "labeled": "labeled examples"}
        return MethodNotApplicable(f"lm-eval suites score through lm-eval tasks and expose no {exposed[what]}; only "
                                   f"data-free methods apply")

    def describe(self) -> dict:
        return {**super().describe(), "lm_eval_tasks": dict(self.lm_eval_tasks)}


def task_folders(suite: SuiteFile) -> dict[Path, str]:
    """The folders lm-eval indexes for the suite's task files (a file's folder), each with the first key naming
    it."""
    folders: dict[Path, str] = {}
    for ref in suite.task_files.values():
        if ref.local is not None:
            folders.setdefault(ref.local if ref.local.is_dir() else ref.local.parent, ref.key)
    return folders


def refuse_task_code(suite: SuiteFile, params: Any) -> None:
    """Before anything is loaded: task YAMLs (and what they include) whose ``!function`` tags would make lm-eval
    import and run Python need ``--trust-task-code``."""
    for folder, key in task_folders(suite).items():
        refuse_untrusted_task_code([folder], params.trust_task_code, where=f"{suite.path}: {key}: ")


def lm_eval_runner(suite: SuiteFile, cache_dir: Path) -> LmEvalRunner:
    """A task manager over the suite's task files (plus lm-eval's built-in tasks when a task names no file); the
    tasks' datasets are cached under the bench cache."""
    paths = list(task_folders(suite))
    builtin = len(suite.task_files) < len(suite.tasks)
    metrics = {t.lm_eval_task: t.metric for t in suite.tasks.values() if t.metric}
    runner = LmEvalRunner(paths, include_defaults=builtin, primary_metrics=metrics,
                          datasets_cache=Path(cache_dir) / "custom" / "hf_datasets")
    for name, task in suite.tasks.items():
        if not runner.has_task(task.lm_eval_task):
            where = f"the task files ({', '.join(str(p) for p in paths)})" if paths else "lm-eval's built-in tasks"
            matches = close_matches(task.lm_eval_task, runner.task_manager.all_tasks)
            hint = f"; did you mean: {', '.join(matches)}?" if matches else ""
            raise suite.fail(f"tasks.{name}.lm_eval_task", f"no task '{task.lm_eval_task}' in {where}{hint}")
    return runner


def build_lm_eval_problem(suite: SuiteFile, params: Any, cache_dir: Path, progress: bool) -> MergeProblem:
    model, tokenizer = load_transformers_model(suite, model_folder(suite, suite.base, cache_dir),
                                               "AutoModelForCausalLM", "causal LM")
    merged = MergedParameters(model)
    base = merged.extract()
    experts = {}
    for name, ref in suite.experts.items():
        raw = checkpoint_tensors(suite, ref, model_folder(suite, ref, cache_dir))
        experts[name] = merged_layout(merged, raw)
        check_compatible(base, [experts[name]], [name])
    return LmEvalProblem(
        name=suite.name, model=model, tokenizer=tokenizer, pretrained=base, experts=experts,
        lm_eval_tasks={name: task.lm_eval_task for name, task in suite.tasks.items()},
        runner=lm_eval_runner(suite, cache_dir),
        eval_batch_size=params.eval_batch_size, limit=suite.config.limit or None,
        max_length=suite.config.max_length or None,
        facts={"suite_file": str(suite.resolved), "sha256": suite.sha256, "kind": suite.kind},
    )


# ----------------------------------------------------------------------------------------------------------
# The suite: parameters (what records key on), builders by kind, the SuiteSpec
# ----------------------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[SuiteFile, Any, Path, bool], MergeProblem]] = {
    IMAGE: build_image_problem,
    SEQUENCE: build_sequence_problem,
    LM_EVAL: build_lm_eval_problem,
}


def params_class(suite: SuiteFile) -> type:
    """A frozen dataclass of the suite's parameters: the file's resolved path, its content's sha256 and every
    resolved reference (fixed: a record of another file, another content or another checkpoint never matches),
    and what ``--set suite.X=Y`` may change (eval batch size; protocol for classification kinds; for lm-eval,
    trust_task_code, set by ``--trust-task-code``)."""
    references = json.dumps(suite.references(), sort_keys=True)
    fields: list[tuple[str, type, Any]] = [
        ("file", str, param(str(suite.resolved), "the suite file (fixed)", choices=(str(suite.resolved),))),
        ("sha256", str, param(suite.sha256, "sha256 of the suite file's content (fixed)", choices=(suite.sha256,))),
        ("references", str, param(references, "resolved checkpoints and datasets (fixed)", choices=(references,))),
        ("eval_batch_size", int, param(suite.config.eval_batch_size or DEFAULT_EVAL_BATCH[suite.kind],
                                       "examples per forward pass when scoring", low=1)),
    ]
    if suite.kind in CLASSIFICATION:
        fields.append(("protocol", str, param(suite.config.protocol, "test-time adaptation data: the eval split "
                                              "(transductive) or the unlabeled split (inductive)", choices=PROTOCOLS)))
    if suite.kind == LM_EVAL:
        fields.append(("trust_task_code", bool, param(False, "allow task YAMLs with !function tags (lm-eval imports "
                                                             "and runs the Python code they name)")))
    return dataclasses.make_dataclass("CustomSuiteParams", fields, frozen=True, namespace={"__module__": __name__})


def build(suite: SuiteFile, params: Any, cache_dir: Path, progress: bool) -> MergeProblem:
    """Check local paths and the cache first (one line naming what is missing), then load by kind."""
    cache_dir = Path(cache_dir)
    check_local_paths(suite)
    if suite.kind == LM_EVAL:
        refuse_task_code(suite, params)
    require_ready(suite, cache_dir)
    return BUILDERS[suite.kind](suite, params, cache_dir, progress)


_SPECS: dict[tuple[str, str], SuiteSpec] = {}  # by (path as given, sha256)
_LOADED: dict[str, SuiteSpec] = {}  # by suite name: the file last loaded under it in this process


def toml_suite(path: Path | str) -> SuiteSpec:
    """The :class:`~bench.registry.SuiteSpec` of a suite file (one per path and content; never registered, so
    ``bench list suites`` is unchanged)."""
    suite = read_suite_file(path)
    cache_key = (str(suite.resolved), suite.sha256)
    if cache_key not in _SPECS:
        description = suite.config.description or f"{suite.kind} suite from {suite.path}"
        _SPECS[cache_key] = SuiteSpec(
            name=suite.name, params=params_class(suite), description=description,
            fn=functools.partial(build, suite), readiness=functools.partial(missing_artefacts, suite),
            prepare=functools.partial(prepare_suite, suite), sizes=functools.partial(artefact_sizes, suite),
            capabilities=capabilities_of(() if suite.kind == LM_EVAL else tuple(CAPABILITIES)),
        )
    return _SPECS[cache_key]


def is_file_suite(name: str) -> bool:
    return name.endswith(".toml") or name.startswith("custom:")


def file_suite(name: str) -> SuiteSpec:
    """:func:`bench.registry.get_suite`'s resolver: a suite file's path, or the name (``custom:<stem>``) of a suite
    file loaded earlier in this process (records carry the name; the runner looks the suite up again by it)."""
    if name.endswith(".toml"):
        spec = toml_suite(name)
        _LOADED[spec.name] = spec
        return spec
    if name in _LOADED:
        return _LOADED[name]
    raise BenchError(f"suite '{name}' comes from a suite file; pass the file's path instead, e.g. "
                     f"--suite path/to/{name.removeprefix('custom:')}.toml")


register_suite_resolver(is_file_suite, file_suite)
