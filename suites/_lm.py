"""Shared pieces of the NLP suites (``tinylm``, ``glue-gpt2``, ``glue-flan-t5``, ``llm-mergebench``).

- Token batches: a suite's inputs are int64 token ids ``[n, length]``, right-padded with :data:`PAD` (-1), so the
  harness can slice and index them like images and every suite can recover the real tokens (:func:`real_tokens`).
- :class:`MergedParameters`: which parameters of a transformers module are merged and under which names. Tied
  parameters appear once. GPT-2's ``Conv1D`` weights (stored ``[in, out]``) are exposed transposed, in
  ``nn.Linear``'s ``[out, in]`` layout, so every method sees one convention (RegMean's ``y = x Wᵀ``); the
  functional forward transposes them back.
- :func:`capture_linear_inputs`: the inputs of every merged linear map (RegMean), real tokens only.
- Loading checkpoints from the local hub cache (safetensors, or ``torch.load(weights_only=True)`` through
  transformers), and comparing an expert with the base before anything else is loaded.
- :class:`ExpertsProblem`: the weights part every NLP problem shares (pretrained and expert state dicts, task
  checks).
- :class:`LmEvalRunner`: lm-evaluation-harness on a model held in memory (``HFLM(pretrained=<model>)``) with a
  task manager that indexes only the given task directories, returning per-example correctness in doc order;
  :func:`evaluate_merged` scores merged weights with it and :func:`combine_scores` turns scores into metrics. The
  tasks' datasets are cached where the runner is told (:func:`datasets_cache_in`), not in ``~/.cache/huggingface``.
- :func:`refuse_untrusted_task_code`: task YAMLs whose ``!function`` tags would make lm-eval import and run Python
  are refused unless the suite's ``trust_task_code`` is set (``--trust-task-code``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bench.errors import BenchError, unknown_name_error
from bench.measure import torch_threads
from bench.model_pool import MappedWeights, SafetensorsWeights, check_compatible
from bench.problem import MergeProblem, StateDict, TaskMetrics
from suites._torchvision_compat import ensure_torchvision_importable

PAD = -1
LM_EVAL_FEWSHOT_SEED = 1234  # simple_evaluate's default few-shot sampler seed


# ----------------------------------------------------------------------------------------------------------
# Token batches
# ----------------------------------------------------------------------------------------------------------


def pad_token_ids(sequences: Sequence[Sequence[int]]) -> Tensor:
    """Right-padded int64 ids ``[n, longest]`` (:data:`PAD` after each sequence's end)."""
    longest = max((len(s) for s in sequences), default=1)
    batch = torch.full((len(sequences), max(longest, 1)), PAD, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
    return batch


def real_tokens(inputs: Tensor) -> Tensor:
    """Bool mask of the non-padding positions."""
    return inputs != PAD


def trim_padding(inputs: Tensor) -> Tensor:
    """Drop trailing columns that are padding in every row (a drawn batch is padded to its whole pool)."""
    longest = int(real_tokens(inputs).sum(dim=1).max()) if inputs.numel() else 1
    return inputs[:, : max(longest, 1)]


def last_token_index(inputs: Tensor) -> Tensor:
    """Index of each row's last real token."""
    return real_tokens(inputs).sum(dim=1) - 1


def model_ids(inputs: Tensor, fill_id: int) -> Tensor:
    """Ids a model can embed: padding replaced by ``fill_id`` (attention masks or causality keep it unseen)."""
    return inputs.masked_fill(~real_tokens(inputs), fill_id)


def draw_indices(size: int, n: int, seed: int) -> Tensor:
    """``n`` distinct indices of ``range(size)``; a smaller ``n`` with the same seed gives a prefix."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]


# ----------------------------------------------------------------------------------------------------------
# Merged parameters of a transformers module
# ----------------------------------------------------------------------------------------------------------


def _conv1d_type() -> type | None:
    ensure_torchvision_importable()
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Conv1D


class MergedParameters:
    """The merged view of ``module``'s parameters: names (with ``prefix``), Conv1D weights in linear layout.

    ``module`` is a template: its own weights are read once by :meth:`extract` and otherwise every forward
    substitutes the given parameters (``torch.func.functional_call``, tied weights tied).
    """

    def __init__(self, module: nn.Module, prefix: str = "") -> None:
        self.module = module
        self.prefix = prefix
        conv1d = _conv1d_type()
        self.transposed: set[str] = set()
        self.linear_modules: dict[str, nn.Module] = {}  # merged weight name -> module computing y = x Wᵀ (+ b)
        names = {name for name, _ in module.named_parameters()}  # tied parameters are listed once
        for module_name, child in module.named_modules():
            weight = f"{module_name}.weight" if module_name else "weight"
            if weight not in names:
                continue
            if conv1d is not None and isinstance(child, conv1d):
                self.transposed.add(prefix + weight)
                self.linear_modules[prefix + weight] = child
            elif isinstance(child, nn.Linear):
                self.linear_modules[prefix + weight] = child
        self.keys = [prefix + name for name, _ in module.named_parameters()]

    def extract(self, module: nn.Module | None = None) -> StateDict:
        """The merged state dict of ``module`` (default: the template), detached CPU copies."""
        source = self.module if module is None else module
        merged = {}
        for name, parameter in source.named_parameters():
            key = self.prefix + name
            value = parameter.detach().to("cpu")
            merged[key] = (value.T if key in self.transposed else value).contiguous().clone()
        return merged

    def checkpoint_reader(self, folder: Path, label: str, dtype: torch.dtype, file_prefix: str = ""
                          ) -> Mapping[str, Tensor] | None:
        """The merged tensors of the checkpoint in ``folder`` (saved by transformers), read one at a time from its
        safetensors files, in ``dtype``: no whole model is loaded. ``file_prefix`` is what the file puts before
        the merged module's names (``transformer.`` for a GPT-2 classifier's backbone).

        None when the folder has no safetensors weights, or names a merged tensor differently (old checkpoints
        that transformers renames on load): the caller then loads the model and extracts its tensors.
        """
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        path = index if index.is_file() else single if single.is_file() else None
        if path is None:
            return None
        files = SafetensorsWeights.open(path, label)
        names = {}
        for key in self.keys:
            name = key[len(self.prefix):]
            found = next((candidate for candidate in (file_prefix + name, name) if candidate in files), None)
            if found is None:
                return None
            names[key] = found
        return MappedWeights(files, names, cast=dtype, transposed=self.transposed)

    def to_module(self, params: StateDict) -> StateDict:
        """Module-layout tensors (prefix stripped, Conv1D weights transposed back) for ``functional_call``."""
        start = len(self.prefix)
        return {key[start:]: (value.T if key in self.transposed else value) for key, value in params.items()}

    def from_module(self, tensors: StateDict) -> StateDict:
        """The inverse of :meth:`to_module`: merged names and layout from module-layout tensors."""
        merged = {}
        for name, value in tensors.items():
            key = self.prefix + name
            merged[key] = value.T.contiguous() if key in self.transposed else value
        return merged

    def check_keys(self, params: StateDict) -> None:
        if list(params) != self.keys and set(params) != set(self.keys):
            missing = [k for k in self.keys if k not in params] or [k for k in params if k not in self.keys]
            raise BenchError(f"merged weights do not match the model: first differing tensor '{missing[0]}'")

    def call(self, params: StateDict, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` with ``params`` substituted (buffers stay the template's)."""
        return functional_call(self.module, self.to_module(params), args, kwargs, tie_weights=True, strict=False)

    def load_into(self, module: nn.Module, params: StateDict) -> nn.Module:
        """Copy ``params`` into ``module``'s parameters in place (for code that needs a real module)."""
        self.check_keys(params)
        tensors = self.to_module(params)
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                parameter.copy_(tensors[name].to(device=parameter.device, dtype=parameter.dtype))
        return module


def capture_linear_inputs(merged: MergedParameters, inputs: Tensor, batch_size: int,
                          forward: Callable[[Tensor], Any]) -> dict[str, Tensor]:
    """Inputs ``[N, in_features]`` of every merged linear map while ``forward(chunk)`` runs on ``inputs`` in
    chunks of ``batch_size``: real tokens only (a module input aligned with the chunk's tokens keeps its
    non-padding rows; any other, e.g. a decoder step, keeps every row)."""
    captured: dict[str, list[Tensor]] = {}
    current: dict[str, Tensor] = {}

    def hook_for(key: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x, chunk = args[0].detach(), current["chunk"]
            if x.shape[:2] == chunk.shape:
                rows = x[real_tokens(chunk).to(x.device)]
            else:
                rows = x.reshape(-1, x.shape[-1])
            captured.setdefault(key, []).append(rows)

        return hook

    handles = [module.register_forward_pre_hook(hook_for(key)) for key, module in merged.linear_modules.items()]
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                current["chunk"] = trim_padding(inputs[start : start + batch_size])
                forward(current["chunk"])
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(chunks) for key, chunks in captured.items()}


# ----------------------------------------------------------------------------------------------------------
# The weights part of every NLP problem
# ----------------------------------------------------------------------------------------------------------


class ExpertsProblem(MergeProblem):
    """Holds the pretrained and expert state dicts (merged names and layout) and checks task names.

    Subclasses set ``name``, ``tasks`` (the experts' order) and call :meth:`_set_weights`; ``task_noun`` names a
    task in errors (e.g. ``"domain"``).
    """

    name: str
    tasks: list[str]
    task_noun = "task"

    def _set_weights(self, pretrained: StateDict, experts: dict[str, StateDict]) -> None:
        self._pretrained = pretrained
        self._experts = experts
        self.tasks = list(experts)

    def pretrained(self) -> StateDict:
        return self._pretrained

    def expert(self, task: str) -> StateDict:
        self._check_task(task)
        return self._experts[task]

    def num_parameters(self) -> int:
        return sum(value.numel() for value in self._pretrained.values())

    def _check_task(self, task: str) -> None:
        if task not in self._experts:
            raise unknown_name_error(f"{self.task_noun} of suite {self.name}", task, self.tasks)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints from the local hub cache
# ----------------------------------------------------------------------------------------------------------


def from_pretrained(model_class: Any, folder: Path, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """A transformers model from a local folder, never the network: safetensors when present, otherwise
    transformers' ``torch.load(weights_only=True)``; no remote code."""
    ensure_torchvision_importable()
    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, **kwargs}
    if dtype is not None:
        options["dtype"] = dtype
    with quiet_transformers():
        return model_class.from_pretrained(str(folder), **options).eval()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info and warning logs and its loading progress bars."""
    ensure_torchvision_importable()
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]  # config, weights, tokenizer
CHECKPOINT_FALLBACK = ["pytorch_model*.bin", "pytorch_model*.json"]  # when a repo has no safetensors weights


def download_checkpoint(repo_id: str, folder: Path) -> None:
    """A transformers checkpoint from the hub: config, tokenizer and safetensors weights only (hub repos often
    also hold TF, Flax, ONNX or GGUF copies); pickled ``*.bin`` weights only when there are no safetensors
    (transformers then loads them with ``torch.load(weights_only=True)``)."""
    from suites import _hub

    _hub.download_model(repo_id, folder, allow_patterns=CHECKPOINT_FILES)
    if not any(Path(folder).rglob("*.safetensors")):
        _hub.download_model(repo_id, folder, allow_patterns=CHECKPOINT_FALLBACK)


def check_expert(base: Mapping[str, Tensor], expert: Mapping[str, Tensor], name: str) -> None:
    """Fail now, naming the first mismatching tensor, if ``expert`` does not share the base architecture."""
    check_compatible(base, [expert], [name])


# ----------------------------------------------------------------------------------------------------------
# lm-evaluation-harness on a model held in memory
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LmEvalScore:
    """One lm-eval task's outcome: its primary metric, per-doc correctness (doc order) and choice loss."""

    metric: str
    value: float
    correct: Tensor
    loss: float  # mean cross-entropy over the answer choices (multiple_choice); NaN for generative tasks


def _is_correct(value: Any) -> bool:
    return bool(value) if isinstance(value, bool) else float(value) >= 1.0


def _choice_loss(sample: dict[str, Any]) -> float:
    """−log softmax(choice log-likelihoods)[gold] of one multiple-choice sample; NaN if not multiple choice."""
    responses = sample.get("filtered_resps")
    target = sample.get("target")
    if not isinstance(target, int) or not isinstance(responses, list) or not responses:
        return math.nan
    try:
        loglikelihoods = torch.tensor([float(r[0] if isinstance(r, (tuple, list)) else r) for r in responses])
    except (TypeError, ValueError):
        return math.nan
    if not 0 <= target < len(loglikelihoods):
        return math.nan
    return float(-torch.log_softmax(loglikelihoods, dim=0)[target])


def samples_to_score(samples: list[dict[str, Any]], metric: str, value: float) -> LmEvalScore:
    """Per-doc correctness and choice loss from lm-eval's logged samples of one task and filter."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    correct = torch.tensor([_is_correct(s[metric]) for s in ordered], dtype=torch.bool)
    losses = [_choice_loss(s) for s in ordered]
    loss = math.nan if not losses or any(math.isnan(x) for x in losses) else sum(losses) / len(losses)
    return LmEvalScore(metric=metric, value=value, correct=correct, loss=loss)


class LmEvalRunner:
    """lm-eval on in-memory models, with a task manager over ``include_paths`` only (indexing the ~14k built-in
    tasks costs seconds; ``include_defaults=True`` adds them).

    ``primary_metrics`` maps a task to ``"metric,filter"`` (lm-eval's result key); by default a task's first
    metric under its first filter is used.
    """

    def __init__(self, include_paths: Sequence[Path], include_defaults: bool = False,
                 primary_metrics: dict[str, str] | None = None, datasets_cache: Path | None = None) -> None:
        ensure_torchvision_importable()
        from lm_eval.tasks import TaskManager

        with quiet_lm_eval():
            self.task_manager = TaskManager(include_path=[str(p) for p in include_paths],
                                            include_defaults=include_defaults)
        self.primary_metrics = dict(primary_metrics or {})
        self.datasets_cache = datasets_cache  # where the tasks' datasets are cached (None: datasets' default)

    def has_task(self, name: str) -> bool:
        return name in self.task_manager.all_tasks

    def evaluate(self, model: nn.Module, tokenizer: Any, tasks: Sequence[str], batch_size: int,
                 limit: int | None = None, max_length: int | None = None) -> dict[str, LmEvalScore]:
        """Score ``model`` (already on its device, eval mode) on ``tasks``; per-doc results come from lm-eval's
        logged samples.

        This is ``lm_eval.simple_evaluate`` without its per-call extras: it loads the tasks through the task
        manager, applies the same defaults (``num_fewshot`` 0 where a task sets none, the default few-shot seed)
        and calls ``lm_eval.evaluator.evaluate``. Skipped: reseeding the global RNGs, which would disturb the
        run's own seeding, and collecting environment information (pip and git subprocesses, ~1.5 s a call).
        """
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        with quiet_lm_eval(), datasets_cache_in(self.datasets_cache):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            loaded = self.task_manager.load(list(tasks))
            for task in loaded["tasks"].values():
                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=LM_EVAL_FEWSHOT_SEED)
            output = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True,
                              verbosity="ERROR")
        if output is None:  # pragma: no cover - only non-zero ranks of a distributed run get None
            raise BenchError("lm-eval returned no results")
        return {task: self._score(task, output) for task in tasks}

    def _score(self, task: str, output: dict[str, Any]) -> LmEvalScore:
        results = output["results"][task]
        key = self.primary_metrics.get(task) or next(
            k for k in results if "," in k and not k.split(",")[0].endswith("_stderr") and k != "alias"
        )
        metric, _, filter_name = key.partition(",")
        samples = [s for s in output["samples"][task] if s.get("filter", "none") == filter_name]
        return samples_to_score(samples, metric, float(results[key]))


@contextlib.contextmanager
def datasets_cache_in(folder: Path | None) -> Iterator[None]:
    """Within the block, what ``datasets`` caches (prepared Arrow files, downloads, extracted archives) and the hub
    files it fetches go under ``folder``, not the user's ``~/.cache/huggingface``: lm-eval loads a task's dataset
    with ``datasets.load_dataset`` and no ``cache_dir`` unless the task YAML gives one. Sets the environment
    variables (for code reading them now) and ``datasets.config`` / ``huggingface_hub.constants`` (which read them
    once, at import); everything is restored afterwards. ``None``: no change."""
    if folder is None:
        yield
        return
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants

    folder = Path(folder).expanduser().resolve()
    downloads = folder / datasets_config.DOWNLOADED_DATASETS_DIR
    values: list[tuple[Any, str, Any]] = [
        (datasets_config, "HF_DATASETS_CACHE", folder),
        (datasets_config, "DOWNLOADED_DATASETS_PATH", downloads),
        (datasets_config, "EXTRACTED_DATASETS_PATH", downloads / datasets_config.EXTRACTED_DATASETS_DIR),
        (hub_constants, "HF_HUB_CACHE", str(folder / "hub")),
    ]
    environment = {"HF_DATASETS_CACHE": str(folder), "HF_HUB_CACHE": str(folder / "hub"),
                   "HF_XET_CACHE": str(folder / "xet")}
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in values if hasattr(owner, name)]
    saved_environment = {name: os.environ.get(name) for name in environment}
    try:
        for owner, name, value in values:
            if hasattr(owner, name):
                setattr(owner, name, value)
        os.environ.update(environment)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----------------------------------------------------------------------------------------------------------
# Task YAMLs that would run code: lm-eval imports the Python a `!function` tag names (from beside the YAML)
# ----------------------------------------------------------------------------------------------------------

TRUST_TASK_CODE_HINT = ("it is not loaded unless you trust its source: rerun with --trust-task-code "
                        "(--set suite.trust_task_code=true)")
PYTHON_TAG_PREFIX = "tag:yaml.org,2002:python/"  # PyYAML's !!python/... tags (lm-eval's fallback FullLoader)
IGNORED_TASK_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # as lm-eval's task index


@dataclass(frozen=True)
class TaskCode:
    """A task YAML holding a tag that makes lm-eval import and run Python."""

    path: Path
    tag: str


def _is_code_tag(tag: str) -> bool:
    return tag == "!function" or tag.startswith(PYTHON_TAG_PREFIX)


@functools.cache
def _tag_recorder() -> type:
    """A safe YAML loader that records every application tag (``!function``, ``!!python/...``) and reads the
    tagged node as plain data: nothing is imported or run."""
    import yaml

    class TagRecorder(yaml.SafeLoader):
        recorded: list[str]

    def construct(loader: Any, suffix: str, node: Any) -> Any:
        loader.recorded.append(node.tag)
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        return loader.construct_scalar(node)

    TagRecorder.add_multi_constructor("", construct)
    return TagRecorder


def _tags_and_includes(text: str) -> tuple[list[str], list[str]]:
    """The tags a task YAML applies and the files it includes. Text that does not parse is read as text:
    any ``!function`` or ``!!python/`` in it counts."""
    import yaml

    loader = _tag_recorder()(text)
    loader.recorded = []
    try:
        data = loader.get_single_data()
    except yaml.YAMLError:
        return [tag if tag == "!function" else PYTHON_TAG_PREFIX
                for tag in re.findall(r"!function\b|!!python/", text)], []
    finally:
        loader.dispose()
    include = data.get("include") if isinstance(data, dict) else None
    includes = include if isinstance(include, list) else [include]
    return loader.recorded, [item for item in includes if isinstance(item, str)]


def _lm_eval_package() -> Path | None:
    spec = importlib.util.find_spec("lm_eval")
    return Path(spec.origin).resolve().parent if spec is not None and spec.origin else None


def task_code(paths: Sequence[Path]) -> list[TaskCode]:
    """Every task YAML lm-eval would read from ``paths`` (a folder: its ``**/*.yaml``, as lm-eval indexes it; a
    file: itself), and every file they ``include:``, that holds a tag making lm-eval import and run Python
    (``!function``; PyYAML's ``!!python/...``). Read with a loader that only records tags. lm-eval's own task
    files are left out: their code is part of the installed package."""
    package = _lm_eval_package()
    pending: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            pending += sorted((p for p in path.glob("**/*.yaml") if not IGNORED_TASK_DIRS & set(p.parts)),
                              key=lambda p: p.as_posix())
        else:
            pending.append(path)
    found: list[TaskCode] = []
    seen: set[Path] = set()
    while pending:
        path = pending.pop(0).expanduser().resolve()
        if path in seen or not path.is_file() or (package is not None and path.is_relative_to(package)):
            continue
        seen.add(path)
        tags, includes = _tags_and_includes(path.read_text(errors="replace"))
        found += [TaskCode(path, tag) for tag in dict.fromkeys(tags) if _is_code_tag(tag)][:1]
        pending += [Path(item) if Path(item).is_absolute() else path.parent / item for item in includes]
    return found


def refuse_untrusted_task_code(paths: Sequence[Path], trusted: bool, where: str = "") -> None:
    """Before anything is loaded: task YAMLs whose tags run Python need ``trust_task_code``; one line naming the
    file, why and the flag (``where`` prefixes it, e.g. the suite file and key)."""
    if trusted:
        return
    found = task_code(paths)
    if found:
        code = found[0]
        tag = "!function" if code.tag == "!function" else f"!!{code.tag.removeprefix('tag:yaml.org,2002:')}"
        raise BenchError(f"{where}lm-eval task file {code.path} has a {tag} tag: it would import and run Python "
                         f"code from {code.path.parent}; {TRUST_TASK_CODE_HINT}")


def evaluate_merged(runner: LmEvalRunner, merged: MergedParameters, model: nn.Module, tokenizer: Any,
                    params: StateDict, tasks: Sequence[str], device: torch.device, batch_size: int,
                    limit: int | None = None, max_length: int | None = None,
                    cpu_threads: int | None = None) -> dict[str, LmEvalScore]:
    """lm-eval ``tasks`` on ``model`` (the template of ``merged``) holding ``params``, moved to ``device``;
    ``cpu_threads`` caps torch's threads when that device is the CPU."""
    model = merged.load_into(model.to(device), params)
    on_cpu = torch.device(device).type == "cpu"
    with torch_threads(cpu_threads if on_cpu else None), torch.no_grad():
        return runner.evaluate(model, tokenizer, tasks, batch_size=batch_size, limit=limit, max_length=max_length)


def combine_scores(scores: Sequence[LmEvalScore]) -> TaskMetrics:
    """One task's metrics from its lm-eval scores: mean metric, concatenated per-doc bits, mean choice loss (NaN
    if any is NaN)."""
    losses = [s.loss for s in scores]
    return TaskMetrics(accuracy=sum(s.value for s in scores) / len(scores),
                       loss=math.nan if any(math.isnan(x) for x in losses) else sum(losses) / len(losses),
                       correct=torch.cat([s.correct for s in scores]))


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval and datasets print progress bars and warnings per call; keep them off the run's output (they are
    shown again if the call fails)."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer), quiet_transformers():
            yield
    except Exception:
        import sys

        sys.stderr.write(buffer.getvalue()[-4000:])
        raise
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def write_multiple_choice_task(
    path: Path, task: str, data_file: Path, choices: Sequence[str], datasets_cache: Path,
    text_field: str = "prompt", label_field: str = "label",
) -> None:
    """An lm-eval ``multiple_choice`` task YAML over a local JSONL (ABSOLUTE paths: lm-eval resolves relative
    ones against the working directory). The answer is scored as ``" " + choice`` after the prompt."""
    import yaml

    config = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())},
                           "cache_dir": str(Path(datasets_cache).resolve())},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{" + text_field + "}}",
        "doc_to_choice": list(choices),
        "doc_to_target": label_field,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
