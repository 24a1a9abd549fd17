"""The real CLIP vision suites ``vit8``, ``vit14`` and ``vit20``: merge CLIP image encoders fine-tuned per task.

Tasks (TA8 / TALL14 / TALL20, see :mod:`suites._vit_tasks`), evaluated with frozen zero-shot heads on each task's
test split, through the same :class:`~suites._clip_classification.ClipClassificationProblem` as ``tiny8``.

Two public checkpoint families (``suite.source``):

- ``hf`` (default; FusionBench's experts, used by the SAMerging paper): pretrained ``openai/clip-vit-*``
  (transformers ``CLIPModel``), experts ``tanganke/clip-vit-*_<task>`` (``CLIPVisionModel``). What is merged is
  the ``vision_model.*`` state dict; the visual projection stays the pretrained one (the experts have none).
- ``openclip`` (the task_vectors experts): open_clip's ``ViT-B-32`` etc. with OpenAI's weights (QuickGELU), experts
  as task_vectors' ``<arch>/<Task>/finetuned.pt`` whole pickled modules (or ``finetuned.safetensors``). What is
  merged is the ``visual.*`` state dict (projection included, as task_vectors fine-tuned it).

Nothing is downloaded by a run. ``bench prepare vit8 [--set suite.X=Y]`` fills the cache on a connected machine
(``prepare`` below; resumable, each folder verified by its COMPLETE manifest), and building the problem first
checks readiness, so a missing artefact is one line naming it and the ``bench prepare`` command. Cache layout
under ``--cache`` / ``$BENCH_CACHE``::

    hub/models/openai--clip-vit-base-patch32/                 hf pretrained (config, weights, tokenizer)
    hub/models/tanganke--clip-vit-base-patch32_<task>/        hf experts
    hub/models/timm--vit_base_patch32_clip_224.openai/        open_clip pretrained weights
    task_vectors/ViT-B-32/<Task>/finetuned.{safetensors,pt}   openclip experts (task_vectors layout)
    hub/datasets/<owner>--<name>[--<config>]/<split>/         datasets (save_to_disk), test and train splits
    vit/heads/<hash>.safetensors                              zero-shot heads, by (backbone, source, task, text)
    vit/inputs/<hash>.npy                                     preprocessed test images, uint8 (suite.cache_inputs)

Checkpoints load through safetensors or ``torch.load(weights_only=True)``. task_vectors' whole-module pickles can
execute code when unpickled; they load only with ``suite.trust_pickles=true`` (``bench run --trust-pickles``).

Tests point the suite at tiny artefacts by laying out a cache exactly as ``prepare`` leaves it, under the real
repository ids (the model's shape comes from the cached config), choosing a subset with ``suite.tasks``, and for
``openclip`` naming a small open_clip config registered with ``open_clip.add_model_config`` in
``suite.openclip_model``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.func import functional_call

from bench.errors import BenchError, missing_artifact_error, unknown_name_error
from bench.model_pool import SafetensorsWeights, check_compatible
from bench.problem import MergeProblem, StateDict
from bench.registry import ALL_DATA, SCORED_SPLITS_ONLY, ArtefactSize, DataNeeds, param, register_suite
from suites import _hub
from suites._clip_classification import (
    PROTOCOLS,
    ClipClassificationProblem,
    ClipHead,
    DataSplit,
    TaskData,
    average_prompt_embeddings,
)
from suites._clip_images import (
    PREPROCESS_VERSION,
    SplitImages,
    load_split,
    normalise_images,
    store_images,
)
from suites._clip_weights import (
    HF_WEIGHT_FILES,
    OPENCLIP_WEIGHT_FILES,
    HFClipImageEncoder,
    LoadedBackbone,
    OpenClipImageEncoder,
    as_float32,
    frozen_tensors,
    full_clip_model,
    head_device,
    hf_vision_tensors,
    load_trusted_pickle,
    non_persistent_buffers,
    open_weights,
    openclip_visual_tensors,
    read_weights,
)
from suites._torchvision_compat import ensure_torchvision_importable
from suites._vit_tasks import SUITE_TASKS, TASK_SPECS, TaskSpec

SOURCES = ("hf", "openclip")
HEAD_VERSION = 1  # bump when head construction changes
# Encoders smaller than this (the tests' tiny ones) run on one CPU thread: for them OpenMP workers mostly wait on
# each other, ~100x slower on a shared machine. Real CLIP encoders (88M+ parameters) keep torch's default.
SINGLE_THREAD_BELOW = 5_000_000
TASK_VECTORS_DRIVE = "https://drive.google.com/drive/folders/1u_Tva6x0p6oxu5Eo0ZZsf-520Cc_3MKw"


@dataclass(frozen=True)
class Backbone:
    """Where one CLIP backbone's pretrained weights and experts live, per source."""

    hf_model: str  # transformers CLIPModel repo
    hf_expert_prefix: str  # FusionBench experts: <prefix><TaskSpec.hf_expert>
    openclip_arch: str  # open_clip model config name (also the task_vectors folder)
    openclip_weights: str  # hub repo holding open_clip's file of OpenAI's weights


BACKBONES: dict[str, Backbone] = {
    "vit-b-32": Backbone("openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_", "ViT-B-32",
                         "timm/vit_base_patch32_clip_224.openai"),
    "vit-b-16": Backbone("openai/clip-vit-base-patch16", "tanganke/clip-vit-base-patch16_", "ViT-B-16",
                         "timm/vit_base_patch16_clip_224.openai"),
    "vit-l-14": Backbone("openai/clip-vit-large-patch14", "tanganke/clip-vit-large-patch14_", "ViT-L-14",
                         "timm/vit_large_patch14_clip_224.openai"),
}


@dataclass(frozen=True)
class VitParams:
    backbone: str = param("vit-b-32", "CLIP image encoder", choices=tuple(BACKBONES))
    source: str = param("hf", "hf: FusionBench experts (transformers); openclip: task_vectors experts (open_clip)",
                        choices=SOURCES)
    protocol: str = param("transductive", "test-time adaptation data: test images (as published) or the train "
                          "split's images (inductive)", choices=PROTOCOLS)
    trust_pickles: bool = param(False, "allow loading task_vectors' pickled experts (unpickling can run code)")
    eval_batch_size: int = param(128, "images per forward pass when scoring", low=1)
    tasks: str = param("", "comma list: only these of the suite's tasks (default: all)")
    cache_inputs: bool = param(True, "keep preprocessed test images on disk as uint8 (~150 KB per image at 224 px)")
    task_vectors_repo: str = param("", "openclip only: hub repo mirroring task_vectors' checkpoints folder "
                                   "(<arch>/<Task>/finetuned.pt); empty: place the files in the cache by hand")
    openclip_model: str = param("", "openclip only: open_clip model config name (default: the backbone's, e.g. "
                                "ViT-B-32; a config registered with open_clip.add_model_config also works)")


# ----------------------------------------------------------------------------------------------------------
# Artefacts: what a configuration needs, where it lives in the cache, how prepare gets it
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artefact:
    """One cache folder a configuration needs; ``download(folder)`` fetches it (``None``: placed by hand)."""

    description: str  # completes "suite 'vit8' needs <description>"
    folder: Path
    download: Callable[[Path], None] | None
    manual_hint: str = ""  # how to place it when there is no download
    verify: Callable[[Path], None] | None = None  # a content check after download (e.g. the dataset's columns)
    remote: Callable[[], list[_hub.RemoteFile]] | None = None  # the hub files download fetches (for sizes)
    converted: bool = False  # a dataset split: converted in scratch space beside its folder

    def size(self, cache_dir: Path, online: bool) -> ArtefactSize:
        return _hub.artefact_size(self.description, self.folder, self.remote, cache_dir, online, self.converted)


def selected_tasks(suite: str, params: VitParams) -> list[str]:
    """The suite's tasks, or the ``suite.tasks`` subset in the suite's order."""
    available = SUITE_TASKS[suite]
    if not params.tasks.strip():
        return list(available)
    chosen = [name.strip() for name in params.tasks.split(",") if name.strip()]
    for name in chosen:
        if name not in available:
            raise unknown_name_error(f"task of suite {suite}", name, available)
    return [name for name in available if name in chosen]


def task_vectors_folder(cache_dir: Path, params: VitParams, spec: TaskSpec) -> Path:
    return Path(cache_dir) / "task_vectors" / BACKBONES[params.backbone].openclip_arch / spec.task_vectors_name


@dataclass(frozen=True)
class CheckpointFiles:
    """Which files of a hub checkpoint repo to fetch: ``preferred``, or ``fallback`` when it has no weights file."""

    weights: tuple[str, ...]  # weight file names in order of preference (reading takes the first present)
    preferred: tuple[str, ...]  # allow_patterns: config, tokenizer and safetensors weights
    fallback: tuple[str, ...]  # allow_patterns when the repo has no safetensors weights


HF_FILES = CheckpointFiles(HF_WEIGHT_FILES, ("*.json", "*.txt", "model.safetensors*", "model-*.safetensors"),
                           ("pytorch_model.bin",))
OPENCLIP_FILES = CheckpointFiles(OPENCLIP_WEIGHT_FILES, ("open_clip_config.json", "open_clip_model.safetensors"),
                                 ("open_clip_pytorch_model.bin",))


def checkpoint_remote(repo_id: str, files: CheckpointFiles) -> Callable[[], list[_hub.RemoteFile]]:
    """What :func:`download_checkpoint` fetches of ``repo_id``, as hub files with sizes."""
    return functools.partial(_hub.checkpoint_files, repo_id, files.preferred, files.fallback)


def download_checkpoint(repo_id: str, files: CheckpointFiles, folder: Path) -> None:
    """A hub checkpoint's config, tokenizer and weights: safetensors when the repo has them, else the bin file."""
    _hub.download_model(repo_id, folder, allow_patterns=list(files.preferred))
    if not any((folder / name).is_file() for name in files.weights):
        _hub.download_model(repo_id, folder, allow_patterns=list(files.fallback))


def download_task_vectors_expert(repo_id: str, cache_dir: Path, params: VitParams, spec: TaskSpec) -> None:
    """``<arch>/<Task>/finetuned.safetensors`` (or ``.pt``) from a hub mirror of task_vectors' checkpoints."""
    root = Path(cache_dir) / "task_vectors"
    prefix = f"{BACKBONES[params.backbone].openclip_arch}/{spec.task_vectors_name}"
    _hub.download_model(repo_id, root, allow_patterns=[f"{prefix}/finetuned.safetensors"])
    if not (root / prefix / "finetuned.safetensors").is_file():
        _hub.download_model(repo_id, root, allow_patterns=[f"{prefix}/finetuned.pt"])
    _hub.drop_client_cache(root)


def model_artefacts(params: VitParams, cache_dir: Path, tasks: Sequence[str]) -> list[Artefact]:
    backbone = BACKBONES[params.backbone]
    if params.source == "hf":
        items = [Artefact(f"checkpoint {backbone.hf_model}", _hub.model_dir(cache_dir, backbone.hf_model),
                          functools.partial(download_checkpoint, backbone.hf_model, HF_FILES),
                          remote=checkpoint_remote(backbone.hf_model, HF_FILES))]
        for task in tasks:
            repo = backbone.hf_expert_prefix + TASK_SPECS[task].hf_expert
            items.append(Artefact(f"expert checkpoint {repo}", _hub.model_dir(cache_dir, repo),
                                  functools.partial(download_checkpoint, repo, HF_FILES),
                                  remote=checkpoint_remote(repo, HF_FILES)))
        return items
    items = [Artefact(f"open_clip weights {backbone.openclip_weights}",
                      _hub.model_dir(cache_dir, backbone.openclip_weights),
                      functools.partial(download_checkpoint, backbone.openclip_weights, OPENCLIP_FILES),
                      remote=checkpoint_remote(backbone.openclip_weights, OPENCLIP_FILES))]
    for task in tasks:
        spec = TASK_SPECS[task]
        download = remote = None
        if params.task_vectors_repo:
            download = functools.partial(_ignore_folder, functools.partial(
                download_task_vectors_expert, params.task_vectors_repo, cache_dir, params, spec))
            prefix = f"{backbone.openclip_arch}/{spec.task_vectors_name}"
            remote = functools.partial(_hub.checkpoint_files, params.task_vectors_repo,
                                       [f"{prefix}/finetuned.safetensors"], [f"{prefix}/finetuned.pt"])
        folder = task_vectors_folder(cache_dir, params, spec)
        items.append(Artefact(
            f"task_vectors expert {backbone.openclip_arch}/{spec.task_vectors_name}/finetuned.pt", folder, download,
            manual_hint=f"copy task_vectors' checkpoints ({TASK_VECTORS_DRIVE}) so that {folder}/finetuned.pt "
                        f"exists, or pass --set suite.task_vectors_repo=OWNER/NAME for a hub mirror", remote=remote))
    return items


def _ignore_folder(download: Callable[[], None], folder: Path) -> None:
    download()


def used_splits(spec: TaskSpec, with_train: bool) -> list[str]:
    """The task's scored split, and its train split when a chosen method reads it."""
    return list(dict.fromkeys((spec.test_split, spec.train_split) if with_train else (spec.test_split,)))


def dataset_artefacts(cache_dir: Path, tasks: Sequence[str], with_train: bool = True) -> list[Artefact]:
    items = []
    for task in tasks:
        spec = TASK_SPECS[task]
        for split in used_splits(spec, with_train):
            label = f"dataset {spec.dataset}" + (f" ({spec.config})" if spec.config else "") + f", {split} split"
            download = functools.partial(_download_split, spec, split)
            items.append(Artefact(label, _hub.dataset_dir(cache_dir, spec.dataset, split, spec.config), download,
                                  verify=functools.partial(check_dataset_columns, spec),
                                  remote=functools.partial(_hub.dataset_split_files, spec.dataset, split, spec.config),
                                  converted=True))
    return items


def _download_split(spec: TaskSpec, split: str, folder: Path) -> None:
    _hub.download_dataset(spec.dataset, split, folder, spec.config)


def artefacts(suite: str, params: VitParams, cache_dir: Path, needs: DataNeeds = ALL_DATA) -> list[Artefact]:
    """What ``suite`` reads with ``params``: checkpoints, each task's scored split, and its train split when the
    methods behind ``needs`` read it (labeled examples, or the unlabeled pool of the inductive protocol)."""
    tasks = selected_tasks(suite, params)
    with_train = needs.train_split(params.protocol)
    return model_artefacts(params, Path(cache_dir), tasks) + dataset_artefacts(Path(cache_dir), tasks, with_train)


def missing_artefacts(suite: str, params: VitParams, cache_dir: Path, needs: DataNeeds = ALL_DATA) -> list[str]:
    """Readiness: one line per artefact that is not (completely) in the cache."""
    return [item.description for item in artefacts(suite, params, cache_dir, needs)
            if not _hub.is_complete(item.folder)]


def artefact_sizes(suite: str, params: VitParams, cache_dir: Path, needs: DataNeeds,
                   online: bool) -> list[ArtefactSize]:
    """Each artefact's size on disk, or the hub's size of what ``prepare`` fetches (:func:`_hub.artefact_size`)."""
    return [item.size(Path(cache_dir), online) for item in artefacts(suite, params, cache_dir, needs)]


def prepare_suite(suite: str, params: VitParams, cache_dir: Path, progress: bool,
                  needs: DataNeeds = ALL_DATA) -> None:
    """Download and verify what ``suite`` needs with ``params`` for the methods behind ``needs`` (resumes; skips
    verified folders)."""
    by_hand = []
    for item in artefacts(suite, params, cache_dir, needs):
        if item.download is None:
            if not _adopt_placed_files(item.folder):
                by_hand.append(item)
            continue
        if progress:
            print(f"{suite}: {item.description}", file=sys.stderr)
        _hub.fetch(item.folder, item.download)
        if item.verify is not None:
            try:
                item.verify(item.folder)
            except BenchError:
                (item.folder / _hub.MARKER).unlink(missing_ok=True)  # not usable: readiness keeps reporting it
                raise
    if by_hand:
        raise BenchError(f"{len(by_hand)} artefact(s) cannot be downloaded from the hub, first: "
                         f"{by_hand[0].description}; {by_hand[0].manual_hint}, then rerun `bench prepare {suite}`")


def _adopt_placed_files(folder: Path) -> bool:
    """A folder filled by hand (task_vectors checkpoints): write its manifest so runs can verify it."""
    if _hub.is_complete(folder, verify=True):
        return True
    if any((folder / name).is_file() for name in ("finetuned.safetensors", "finetuned.pt")):
        _hub.mark_complete(folder)
        return True
    return False


def check_dataset_columns(spec: TaskSpec, folder: Path) -> None:
    """The saved split has the task's image and label columns (a renamed column fails here, not mid-run)."""
    dataset = load_split(folder)
    for column in (spec.image_column, spec.label_column):
        if column not in dataset.column_names:
            raise BenchError(f"dataset {spec.dataset} in {folder} has no column '{column}' (it has "
                             f"{', '.join(dataset.column_names)}); task '{spec.name}' cannot read it")


def prepare_args(params: VitParams) -> str:
    defaults = VitParams()
    return " ".join(
        f"--set suite.{f.name}={_format(getattr(params, f.name))}"
        for f in fields(params)
        if getattr(params, f.name) != getattr(defaults, f.name)
    )


def _format(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def require_ready(suite: str, params: VitParams, cache_dir: Path) -> None:
    """What every method needs (checkpoints, scored splits) is cached; train splits load when a method asks."""
    missing = missing_artefacts(suite, params, cache_dir, SCORED_SPLITS_ONLY)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise missing_artifact_error(suite, missing[0] + more, cache_dir, prepare_args(params))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def task_vectors_expert_file(folder: Path) -> Path:
    safetensors = folder / "finetuned.safetensors"
    return safetensors if safetensors.is_file() else folder / "finetuned.pt"


def refuse_untrusted_pickles(params: VitParams, cache_dir: Path, tasks: Sequence[str]) -> None:
    """Before loading anything: task_vectors pickles need ``trust_pickles``; say why and how, in one line."""
    if params.source != "openclip" or params.trust_pickles:
        return
    for task in tasks:
        path = task_vectors_expert_file(task_vectors_folder(cache_dir, params, TASK_SPECS[task]))
        if path.suffix == ".pt":
            raise BenchError(
                f"expert '{task}' is a pickled module ({path}); unpickling can execute arbitrary code, so it is not "
                f"loaded unless you trust its source: rerun with --trust-pickles (--set suite.trust_pickles=true), "
                f"or convert it to finetuned.safetensors")


# ----------------------------------------------------------------------------------------------------------
# Encoders (the module that functional_call runs with merged weights) and text towers (for the heads)
# ----------------------------------------------------------------------------------------------------------
def load_hf_backbone(params: VitParams, cache_dir: Path) -> LoadedBackbone:
    ensure_torchvision_importable()
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    backbone = BACKBONES[params.backbone]
    folder = _hub.model_dir(cache_dir, backbone.hf_model)
    config = CLIPConfig.from_pretrained(folder)
    raw = read_weights(folder, HF_FILES.weights)
    encoder = HFClipImageEncoder(config.vision_config, config.projection_dim)
    skip = non_persistent_buffers(encoder)
    expected = [k for k in encoder.state_dict() if k.startswith("vision_model.")]
    pretrained = hf_vision_tensors(raw, skip, f"checkpoint {backbone.hf_model}")
    check_compatible({k: encoder.state_dict()[k] for k in expected}, [pretrained], [f"pretrained {backbone.hf_model}"])
    for key in ("visual_projection.weight", "logit_scale"):
        if key not in raw:
            raise BenchError(f"checkpoint {backbone.hf_model} lacks tensor '{key}'; is it a full CLIPModel?")
    frozen = frozen_tensors(encoder, pretrained, {"visual_projection.weight": raw["visual_projection.weight"].float()})

    text_tower: dict[str, Any] = {}  # built on the first head that is not cached, freed with the closure

    def encode_text(prompts: list[str]) -> Tensor:
        if not text_tower:
            text_tower["model"] = full_clip_model(folder, config, CLIPModel, raw)
            text_tower["tokenizer"] = AutoTokenizer.from_pretrained(folder)
        model, tokenizer = text_tower["model"], text_tower["tokenizer"]
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt",
                           max_length=config.text_config.max_position_embeddings)
        tokens = {k: v.to(head_device()) for k, v in tokens.items()}
        with torch.no_grad():
            pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return model.text_projection(pooled.pooler_output).cpu()

    def read_expert(task: str) -> StateDict:
        repo = backbone.hf_expert_prefix + TASK_SPECS[task].hf_expert
        raw_expert = open_weights(_hub.model_dir(cache_dir, repo), HF_FILES.weights)
        return hf_vision_tensors(raw_expert, skip, f"expert checkpoint {repo}")

    return LoadedBackbone(encoder=encoder, pretrained=pretrained, frozen=frozen,
                          image_size=int(config.vision_config.image_size), logit_scale=float(raw["logit_scale"]),
                          encode_text=encode_text, identity=_hub.manifest_digest(folder), expert_reader=read_expert)


def openclip_weights_file(params: VitParams, cache_dir: Path) -> Path:
    folder = _hub.model_dir(cache_dir, BACKBONES[params.backbone].openclip_weights)
    for name in OPENCLIP_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise BenchError(f"{folder} holds none of {', '.join(OPENCLIP_WEIGHT_FILES)}; rerun `bench prepare` for it")


def load_openclip_backbone(params: VitParams, cache_dir: Path) -> LoadedBackbone:
    ensure_torchvision_importable()
    import open_clip

    backbone = BACKBONES[params.backbone]
    arch = params.openclip_model or backbone.openclip_arch
    weights = openclip_weights_file(params, cache_dir)
    try:  # OpenAI's CLIP weights were trained with QuickGELU, which open_clip's plain configs do not select
        model = open_clip.create_model(arch, pretrained=str(weights), force_quick_gelu=True, weights_only=True)
    except RuntimeError as error:  # shape mismatch between the config and the weights file
        raise BenchError(f"open_clip model '{arch}' cannot load {weights}: {str(error).splitlines()[0]}") from None
    model.eval()
    encoder = OpenClipImageEncoder(model.visual)
    pretrained = as_float32({f"visual.{k}": v.detach().clone() for k, v in model.visual.state_dict().items()})
    frozen = frozen_tensors(encoder, pretrained, {})
    tokenizer = open_clip.get_tokenizer(arch)
    image_size = model.visual.image_size
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)

    def encode_text(prompts: list[str]) -> Tensor:
        model.to(head_device())  # moved back afterwards: its image tower is the problem's (CPU) template module
        try:
            with torch.no_grad():
                return model.encode_text(tokenizer(prompts).to(head_device())).cpu()
        finally:
            model.to("cpu")

    def read_expert(task: str) -> StateDict:
        path = task_vectors_expert_file(task_vectors_folder(cache_dir, params, TASK_SPECS[task]))
        what = f"expert '{task}' ({path})"
        raw = SafetensorsWeights.open(path, what) if path.suffix == ".safetensors" else load_trusted_pickle(path)
        return openclip_visual_tensors(raw, what)

    return LoadedBackbone(encoder=encoder, pretrained=pretrained, frozen=frozen, image_size=image_size,
                          logit_scale=float(model.logit_scale.detach()), encode_text=encode_text,
                          identity=f"{arch}:{_hub.manifest_digest(weights.parent)}", expert_reader=read_expert)


# ----------------------------------------------------------------------------------------------------------
# Zero-shot heads, cached on disk
# ----------------------------------------------------------------------------------------------------------


def head_key(params: VitParams, spec: TaskSpec, identity: str) -> str:
    text = json.dumps({"version": HEAD_VERSION, "backbone": params.backbone, "source": params.source,
                       "pretrained": identity, "task": spec.name, "class_names": list(spec.class_names),
                       "templates": list(spec.templates)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def build_head(spec: TaskSpec, encode_text: Callable[[list[str]], Tensor], logit_scale: float,
               chunk: int = 512) -> ClipHead:
    """CLIP's recipe: every template per class through the text tower, normalise, average, normalise again."""
    prompts = [prompt for name in spec.class_names for prompt in spec.prompts(name)]
    embeddings = torch.cat([encode_text(prompts[start:start + chunk]) for start in range(0, len(prompts), chunk)])
    per_class = embeddings.float().split(len(spec.templates))
    return ClipHead(average_prompt_embeddings(per_class), logit_scale)


def cached_head(cache_dir: Path, params: VitParams, spec: TaskSpec, backbone: LoadedBackbone) -> ClipHead:
    path = Path(cache_dir) / "vit" / "heads" / f"{head_key(params, spec, backbone.identity)}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            head = ClipHead(stored["class_embeddings"], float(stored["logit_scale"]))
            if head.num_classes == len(spec.class_names):
                return head
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed
            pass
    head = build_head(spec, backbone.encode_text, backbone.logit_scale)
    _atomic_save({"class_embeddings": head.class_embeddings.contiguous(),
                  "logit_scale": torch.tensor(head.logit_scale)}, path)
    return head


def _atomic_save(tensors: StateDict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Data: saved `datasets` splits, CLIP preprocessing, optional on-disk tensors of the test images
# ----------------------------------------------------------------------------------------------------------
def split_labels(dataset: Any, spec: TaskSpec, where: str) -> Tensor:
    """The label column as int64 (PatchCamelyon's booleans included), checked against the class names."""
    labels = torch.from_numpy(np.array(dataset.data.column(spec.label_column).to_numpy(), dtype=np.int64))
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(spec.class_names)):
        raise BenchError(f"{where} has labels in [{int(labels.min())}, {int(labels.max())}] but task '{spec.name}' "
                         f"has {len(spec.class_names)} class names")
    return labels


def load_task_split(cache_dir: Path, spec: TaskSpec, split: str, image_size: int, stored: bool,
                    progress: bool) -> DataSplit:
    folder = _hub.dataset_dir(cache_dir, spec.dataset, split, spec.config)
    where = f"dataset {spec.dataset} ({split}) in {folder}"
    check_dataset_columns(spec, folder)
    dataset = load_split(folder)
    images: Any = SplitImages(dataset, spec.image_column, image_size)
    if stored:
        key = json.dumps({"version": PREPROCESS_VERSION, "dataset": spec.dataset, "config": spec.config,
                          "split": split, "column": spec.image_column, "size": image_size,
                          "data": _hub.manifest_digest(folder)}, sort_keys=True)
        name = f"{spec.name}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
        images = store_images(images, Path(cache_dir) / "vit" / "inputs" / name, progress, f"{spec.name}: {split}")
    return DataSplit(images, split_labels(dataset, spec, where))


# ----------------------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------------------


class DeferredSplit:
    """A saved split opened when a method first reads it (``images``, ``labels``); duck-types :class:`DataSplit`.

    Its length (records' split sizes) comes from opening the saved folder, without reading labels or images.
    """

    def __init__(self, folder: Path, load: Callable[[], DataSplit]) -> None:
        self._folder = folder
        self._load = load
        self._split: DataSplit | None = None
        self._length: int | None = None

    def _loaded(self) -> DataSplit:
        if self._split is None:
            self._split = self._load()
        return self._split

    @property
    def images(self) -> Any:
        return self._loaded().images

    @property
    def labels(self) -> Tensor:
        return self._loaded().labels

    def __len__(self) -> int:
        if self._split is not None:
            return len(self._split)
        if self._length is None:
            self._length = len(load_split(self._folder))
        return self._length


MissingSplit = Callable[[str, str], BenchError]  # (task, split) -> why a method cannot read that split


class VitProblem(ClipClassificationProblem):
    """:class:`ClipClassificationProblem` whose encoder also has tensors that are never merged (the projection of
    the hf source, non-persistent buffers); they join the merged weights in every functional call.

    ``missing_split(task, split)`` is the reason a method is skipped when it reads a split the task lacks here
    (e.g. a train split ``bench prepare`` left out); without it, such a read is an error.
    """

    def __init__(self, *, frozen: StateDict, expert_reader: Callable[[str], StateDict],
                 missing_split: MissingSplit | None = None, **kwargs: Any) -> None:
        self._frozen = frozen
        self._frozen_by_device: dict[str, StateDict] = {}
        self._expert_reader = expert_reader
        self._experts: dict[str, StateDict] = {}
        self._missing_split = missing_split
        super().__init__(expert_loader=self._load_expert, **kwargs)

    def split(self, task: str, split: str) -> DataSplit:
        self._check_task(task)
        if self._missing_split is not None and split not in self.data[task].splits:
            raise self._missing_split(task, split)
        return super().split(task, split)

    def _load_expert(self, task: str) -> StateDict:
        """Read once, check against the base (naming the first mismatching tensor), keep for later calls."""
        if task not in self._experts:
            expert = self._expert_reader(task)
            check_compatible(self.pretrained(), [expert], [task])
            self._experts[task] = expert
        return self._experts[task]

    def _frozen_on(self, device: torch.device, dtype: torch.dtype) -> StateDict:
        key = f"{device}:{dtype}"
        if key not in self._frozen_by_device:
            self._frozen_by_device[key] = {
                k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                for k, v in self._frozen.items()
            }
        return self._frozen_by_device[key]

    def embed(self, params: StateDict, inputs: Tensor) -> Tensor:
        reference = next(iter(params.values()))
        frozen = self._frozen_on(reference.device, reference.dtype)
        inputs = inputs.to(device=reference.device, dtype=reference.dtype)
        return functional_call(self.encoder, {**frozen, **params}, (inputs,), strict=True)


def build_vit(suite: str, params: VitParams, cache_dir: Path, progress: bool) -> MergeProblem:
    """Check the cache, refuse untrusted pickles, then load weights, heads and data (nothing is downloaded)."""
    cache_dir = Path(cache_dir)
    tasks = selected_tasks(suite, params)
    require_ready(suite, params, cache_dir)
    refuse_untrusted_pickles(params, cache_dir, tasks)
    loader = load_hf_backbone if params.source == "hf" else load_openclip_backbone
    backbone = loader(params, cache_dir)
    heads = {task: cached_head(cache_dir, params, TASK_SPECS[task], backbone) for task in tasks}
    data = {}
    for task in tasks:
        spec = TASK_SPECS[task]
        test = load_task_split(cache_dir, spec, spec.test_split, backbone.image_size, params.cache_inputs, progress)
        data[task] = TaskData(spec.class_names, {"test": test, **train_splits(cache_dir, spec, backbone.image_size)})
    return VitProblem(
        name=suite,
        encoder=backbone.encoder,
        pretrained=backbone.pretrained,
        frozen=backbone.frozen,
        expert_reader=backbone.expert_reader,
        missing_split=functools.partial(train_split_not_prepared, suite, params),
        heads=heads,
        data=data,
        protocol=params.protocol,
        prepare=normalise_images,
        eval_batch_size=params.eval_batch_size,
        cpu_threads=1 if sum(v.numel() for v in backbone.pretrained.values()) < SINGLE_THREAD_BELOW else None,
        facts={"backbone": params.backbone, "source": params.source, "image_size": backbone.image_size,
               "pretrained_identity": backbone.identity},
    )


def train_splits(cache_dir: Path, spec: TaskSpec, image_size: int) -> dict[str, DeferredSplit]:
    """The task's train split as ``train`` (labeled examples) and ``unlabeled`` (the inductive pool), opened when a
    method first reads it; none when ``bench prepare`` left it out (no method chosen then needed it)."""
    folder = _hub.dataset_dir(cache_dir, spec.dataset, spec.train_split, spec.config)
    if not _hub.is_complete(folder):
        return {}
    train = DeferredSplit(folder, functools.partial(load_task_split, cache_dir, spec, spec.train_split, image_size,
                                                    False, False))
    return {"train": train, "unlabeled": train}


def train_split_not_prepared(suite: str, params: VitParams, task: str, split: str) -> BenchError:
    """Why a method reading ``split`` of ``task`` is skipped: the train split is not in the cache (one line with the
    ``bench prepare`` command that adds it)."""
    if split not in ("train", "unlabeled"):
        return BenchError(f"task '{task}' has no '{split}' split; it has test, train, unlabeled")
    spec = TASK_SPECS[task]
    what = f"the {spec.train_split} split of dataset {spec.dataset} (task '{task}')"
    data = "unlabeled" if split == "unlabeled" else "labeled"
    return _hub.split_not_prepared(what, suite, prepare_args(params), data)


_DESCRIPTIONS = {
    "vit8": "CLIP ViT on the 8 task-arithmetic tasks (TA8: SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD)",
    "vit14": "CLIP ViT on TALL14: TA8 + Flowers102, PCam, FER2013, Oxford-IIIT Pet, STL-10, CIFAR-100",
    "vit20": "CLIP ViT on TALL20: TALL14 + CIFAR-10, Food-101, Fashion-MNIST, EMNIST letters, KMNIST, Rendered SST-2",
}

for _suite in SUITE_TASKS:
    register_suite(
        _suite,
        description=_DESCRIPTIONS[_suite] + "; hub checkpoints and datasets from the cache (`bench prepare`)",
        params=VitParams,
        readiness=functools.partial(missing_artefacts, _suite),
        prepare=functools.partial(prepare_suite, _suite),
        sizes=functools.partial(artefact_sizes, _suite),
    )(functools.partial(build_vit, _suite))
