"""``llm-mergebench``: merging large language models, scored with lm-evaluation-harness from the local cache.

Default: the MergeBench experts ``MergeBench/<model>_<domain>`` fine-tuned from ``meta-llama/Llama-3.2-3B``
(also Llama-3.1-8B and Gemma-2 2B/9B), one expert per domain, all weights of the causal LM merged (a tied output
embedding once). Each domain is scored on its lm-eval tasks (``task_map``), MergeBench's lm-eval tasks:
instruction -> ifeval; math -> gsm8k_cot and hendrycks_math (MATH, lm-eval's group of seven subjects);
multilingual -> m_mmlu_{fr,es,de,ru}, arc_{fr,es,de,ru} and hellaswag_{fr,es,de,ru}. The domain's accuracy is
the mean of its tasks' primary metrics (ifeval: prompt-level strict accuracy; gsm8k_cot: strict-match exact
match; hendrycks_math: exact match; others: their first metric, accuracy for m_mmlu, arc and hellaswag), its
per-example ``correct`` bits are the tasks' samples in doc order (a sample counts as correct when its metric is
1), and its loss is the choice cross-entropy for multiple-choice tasks (NaN when a domain has a generative
task). An lm-eval group in the task map (hendrycks_math) runs its subtasks and scores as the mean over all of
their docs, as lm-eval aggregates hendrycks_math (``weight_by_size``). MergeBench's coding (code execution) and
safety domains have no lm-eval task here and are left out.

The merged model is evaluated in memory (``HFLM(pretrained=<model>)``). lm-eval's own task YAMLs read their
datasets from the hub; here every hub dataset a task uses is fetched by ``bench prepare llm-mergebench`` into
the cache (``datasets`` save_to_disk folders), and at load each task gets a YAML that includes lm-eval's
original and points ``dataset_path`` at the cached Arrow files (absolute paths), so a run never touches the
network. ``lm_eval_include`` looks tasks up in a folder of one's own YAMLs instead of lm-eval's built-in tasks.

Not applicable here, skipped with a reason: test-time methods (AdaMerging, SAMerging) and Fisher need a
fixed set of class logits per task, which generative lm-eval tasks do not have; RegMean needs the inputs of
every linear layer on training data, which this suite does not supply (Gram matrices of a 3B model's layers
would also need tens of GB).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.errors import BenchError, MethodNotApplicable, unknown_name_error
from bench.problem import MergeProblem, StateDict, TaskMetrics
from bench.registry import ALL_DATA, ArtefactSize, DataNeeds, param, register_suite
from suites import _hub
from suites._lm import (
    CHECKPOINT_FALLBACK,
    CHECKPOINT_FILES,
    ExpertsProblem,
    LmEvalRunner,
    LmEvalScore,
    MergedParameters,
    check_expert,
    combine_scores,
    download_checkpoint,
    evaluate_merged,
    from_pretrained,
    quiet_lm_eval,
    refuse_untrusted_task_code,
)
from suites._torchvision_compat import ensure_torchvision_importable

SUITE = "llm-mergebench"
BASE_MODELS = {
    "Llama-3.2-3B": "meta-llama/Llama-3.2-3B",
    "Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
}
DEFAULT_TASK_MAP = ("instruction=ifeval;math=gsm8k_cot+hendrycks_math;"
                    "multilingual=m_mmlu_fr+m_mmlu_es+m_mmlu_de+m_mmlu_ru+arc_fr+arc_es+arc_de+arc_ru"
                    "+hellaswag_fr+hellaswag_es+hellaswag_de+hellaswag_ru")
PRIMARY_METRICS = {"ifeval": "prompt_level_strict_acc,none", "gsm8k_cot": "exact_match,strict-match"}
LOCAL_BUILDERS = ("json", "csv", "parquet", "arrow", "text")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
FOLDER_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a dataset configuration or split as a folder of the cache


def parse_task_map(text: str) -> dict[str, list[str]]:
    """``"math=gsm8k_cot;multilingual=m_mmlu_fr+m_mmlu_es"`` -> {domain: [lm-eval tasks]}."""
    mapping: dict[str, list[str]] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        domain, sep, tasks = item.partition("=")
        names = [t.strip() for t in tasks.split("+") if t.strip()]
        if not sep or not domain.strip() or not names:
            raise ValueError(f"task_map item '{item}' is not DOMAIN=TASK[+TASK...]")
        mapping[domain.strip()] = names
    if not mapping:
        raise ValueError("task_map is empty; give DOMAIN=TASK[+TASK...];...")
    return mapping


@dataclass(frozen=True)
class LlmParams:
    """Parameters of ``llm-mergebench`` (defaults: MergeBench Llama-3.2-3B)."""

    model: str = param("Llama-3.2-3B", "MergeBench model family", choices=tuple(BASE_MODELS))
    base_model: str = param("", "hub id of the pretrained checkpoint ('': the family's base, e.g. "
                            "meta-llama/Llama-3.2-3B)")
    expert_template: str = param("MergeBench/{model}_{domain}", "hub id of each domain's expert, with {model} and "
                                 "{domain}")
    task_map: str = param(DEFAULT_TASK_MAP, "DOMAIN=LM_EVAL_TASK[+TASK...];... (one expert per domain)")
    lm_eval_include: str = param("", "folder of lm-eval task YAMLs to find the tasks in instead of lm-eval's "
                                 "built-in ones")
    trust_task_code: bool = param(False, "allow lm_eval_include's task YAMLs with !function tags (lm-eval imports "
                                  "and runs the Python code they name)")
    limit: int = param(0, "score only the first N docs of each lm-eval task (0: all)", low=0)
    batch_size: int = param(8, "lm-eval batch size", low=1)
    dtype: str = param("bfloat16", "dtype the checkpoints are loaded, merged and evaluated in",
                       choices=tuple(DTYPES))

    def __post_init__(self) -> None:
        parse_task_map(self.task_map)
        if "{domain}" not in self.expert_template:
            raise ValueError(f"expert_template '{self.expert_template}' has no {{domain}} placeholder")

    def base_id(self) -> str:
        return self.base_model or BASE_MODELS[self.model]

    def expert_id(self, domain: str) -> str:
        return self.expert_template.format(model=self.model, domain=domain)

    def domains(self) -> dict[str, list[str]]:
        return parse_task_map(self.task_map)


# ----------------------------------------------------------------------------------------------------------
# lm-eval tasks and their datasets
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSource:
    """Where an lm-eval task's YAML is and which dataset splits it reads."""

    task: str
    yaml_path: Path
    dataset_path: str
    dataset_name: str | None
    splits: tuple[str, ...]
    group: str | None = None  # the lm-eval group named in the task map that this task is a subtask of

    @property
    def local(self) -> bool:
        """Read from local files by a packaged builder (json, parquet, ...): nothing to fetch."""
        return self.dataset_path in LOCAL_BUILDERS

    def folder(self, cache_dir: Path, split: str) -> Path:
        return _hub.dataset_dir(cache_dir, self.dataset_path, split, config=self.dataset_name)


_SOURCES: dict[tuple[str, str], list[TaskSource]] = {}  # indexing lm-eval's built-in tasks takes seconds


def task_sources(params: LlmParams) -> list[TaskSource]:
    """Every lm-eval task of the task map, looked up in ``lm_eval_include`` or lm-eval's built-in tasks."""
    key = (params.task_map, params.lm_eval_include)
    if key not in _SOURCES:
        _SOURCES[key] = find_task_sources(params)
    return list(_SOURCES[key])


def find_task_sources(params: LlmParams) -> list[TaskSource]:
    ensure_torchvision_importable()
    from lm_eval.tasks import TaskManager

    include = [params.lm_eval_include] if params.lm_eval_include else None
    with quiet_lm_eval():
        manager = TaskManager(include_path=include, include_defaults=not include)
    sources = []
    for names in params.domains().values():
        for name in names:
            config = _index_entry(manager, name).cfg or {}
            if config.get("group") == name:
                members = config.get("task")
                if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                    raise BenchError(f"lm-eval group '{name}' does not list its subtasks by name; list them "
                                     "in the task map instead")
                sources += [_task_source(manager, member, group=name) for member in members]
            else:
                sources.append(_task_source(manager, name))
    return sources


def _index_entry(manager: Any, name: str) -> Any:
    entry = manager.task_index.get(name)
    if entry is None:
        raise unknown_name_error("lm-eval task", name, manager.all_subtasks)
    return entry


def _task_source(manager: Any, name: str, group: str | None = None) -> TaskSource:
    entry = _index_entry(manager, name)
    config = entry.cfg or {}
    if entry.yaml_path is None or "dataset_path" not in config:
        raise BenchError(f"lm-eval task '{name}' is not a single YAML task with a dataset_path "
                         "(nested groups and Python tasks are not supported; list its subtasks)")
    splits = tuple(dict.fromkeys(config[k] for k in SPLIT_KEYS if config.get(k)))
    if config["dataset_path"] not in LOCAL_BUILDERS:  # cached as hub/datasets/<path>[--<name>]/<split>/
        for key in ("dataset_name", *SPLIT_KEYS):
            value = config.get(key)
            if value not in (None, "") and (not FOLDER_NAME.fullmatch(str(value)) or str(value) in (".", "..")):
                raise BenchError(f"lm-eval task '{name}' ({entry.yaml_path}): {key} = {value!r} is not allowed: it "
                                 f"names a folder in the bench cache; use only letters, digits and _ - . (not . or ..)")
    return TaskSource(name, Path(entry.yaml_path).resolve(), config["dataset_path"], config.get("dataset_name"),
                      splits, group)


def group_subtasks(sources: list[TaskSource]) -> dict[str, list[str]]:
    """{lm-eval group named in the task map: its subtasks}."""
    groups: dict[str, list[str]] = {}
    for source in sources:
        if source.group is not None:
            groups.setdefault(source.group, []).append(source.task)
    return groups


def pool_group_scores(scores: list[LmEvalScore]) -> LmEvalScore:
    """One lm-eval group's score from its subtasks': the mean over all of their docs (lm-eval's
    ``weight_by_size`` aggregate), their bits concatenated, the doc-weighted mean choice loss."""
    sizes = [len(score.correct) for score in scores]
    total = sum(sizes)
    if total == 0:
        raise BenchError("an lm-eval group was scored on no docs")
    losses = [score.loss for score in scores]
    loss = (math.nan if any(math.isnan(x) for x in losses)
            else sum(x * n for x, n in zip(losses, sizes, strict=True)) / total)
    value = sum(score.value * n for score, n in zip(scores, sizes, strict=True)) / total
    return LmEvalScore(metric=scores[0].metric, value=value, correct=torch.cat([score.correct for score in scores]),
                       loss=loss)


def local_task_yaml(source: TaskSource, cache_dir: Path) -> dict[str, Any]:
    """lm-eval's task YAML, included, with its hub dataset replaced by the cached Arrow files."""
    config: dict[str, Any] = {"include": str(source.yaml_path), "task": source.task}
    if source.local:
        return config
    data_files = {}
    for split in source.splits:
        files = sorted(str(p.resolve()) for p in source.folder(cache_dir, split).glob("*.arrow"))
        if not files:
            raise BenchError(f"the cached dataset {source.folder(cache_dir, split)} has no Arrow files; rerun "
                             f"`bench prepare {SUITE}`")
        data_files[split] = files
    config.update({"dataset_path": "arrow", "dataset_name": None,
                   "dataset_kwargs": {"data_files": data_files,
                                      "cache_dir": str((Path(cache_dir) / "llm-lm-eval" / "hf_datasets").resolve())}})
    return config


def write_local_tasks(sources: list[TaskSource], cache_dir: Path) -> Path:
    """One YAML per task in a folder keyed by their content; returns the folder (lm-eval's include path)."""
    import yaml

    configs = {s.task: local_task_yaml(s, cache_dir) for s in sources}
    key = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "llm-lm-eval" / key
    folder.mkdir(parents=True, exist_ok=True)
    for task, config in configs.items():
        path = folder / f"{task}.yaml"
        text = yaml.safe_dump(config, sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return folder


# ----------------------------------------------------------------------------------------------------------
# Readiness and prepare
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needed:
    description: str
    folder: Path
    repo_id: str
    split: str | None = None
    config: str | None = None


def needed_artefacts(params: LlmParams, cache_dir: Path) -> list[Needed]:
    cache_dir = Path(cache_dir)
    needed = [Needed(f"checkpoint {params.base_id()}", _hub.model_dir(cache_dir, params.base_id()), params.base_id())]
    for domain in params.domains():
        repo = params.expert_id(domain)
        needed.append(Needed(f"checkpoint {repo}", _hub.model_dir(cache_dir, repo), repo))
    for source in task_sources(params):
        if source.local:
            continue
        for split in source.splits:
            name = f"{source.dataset_path}" + (f" ({source.dataset_name})" if source.dataset_name else "")
            needed.append(Needed(f"dataset {name}, split {split}, of lm-eval task {source.task}",
                                 source.folder(cache_dir, split), source.dataset_path, split, source.dataset_name))
    return needed


def prepare_args(params: LlmParams) -> str:
    defaults = LlmParams()
    keys = ("model", "base_model", "expert_template", "task_map", "lm_eval_include")
    return " ".join(f"--set suite.{k}={getattr(params, k)}" for k in keys if getattr(params, k) != getattr(defaults, k))


def readiness(params: LlmParams, cache_dir: Path, needs: DataNeeds = ALL_DATA) -> list[str]:
    return [f"{n.description} (in {n.folder})" for n in needed_artefacts(params, cache_dir)
            if not _hub.is_complete(n.folder)]


def prepare(params: LlmParams, cache_dir: Path, progress: bool, needs: DataNeeds = ALL_DATA) -> None:
    for item in needed_artefacts(params, cache_dir):
        if item.split is None:
            _hub.fetch(item.folder, lambda folder, repo=item.repo_id: download_checkpoint(repo, folder))
        else:
            _hub.fetch(item.folder, lambda folder, n=item: _hub.download_dataset(n.repo_id, n.split, folder,
                                                                                  config=n.config))


def sizes(params: LlmParams, cache_dir: Path, needs: DataNeeds, online: bool) -> list[ArtefactSize]:
    """Each artefact's size on disk, or the hub's size of what ``prepare`` fetches. Every split an lm-eval task's
    YAML names is needed (lm-eval opens them all), whatever the methods."""
    return [_hub.artefact_size(f"{n.description} (in {n.folder})", n.folder, functools.partial(_remote, n),
                               Path(cache_dir), online, converted=n.split is not None)
            for n in needed_artefacts(params, cache_dir)]


def _remote(item: Needed) -> list[_hub.RemoteFile]:
    if item.split is None:
        return _hub.checkpoint_files(item.repo_id, CHECKPOINT_FILES, CHECKPOINT_FALLBACK)
    return _hub.dataset_split_files(item.repo_id, item.split, item.config)


# ----------------------------------------------------------------------------------------------------------
# The merge problem
# ----------------------------------------------------------------------------------------------------------

NO_CLASS_LOGITS = ("has no class logits per task (its lm-eval tasks are generative or free-form), which "
                   "test-time λ optimisation needs")
NO_TRAINING_DATA = ("supplies no labeled training examples with classes (its lm-eval tasks are generative or "
                    "free-form), which Fisher and RegMean need")


class LlmProblem(ExpertsProblem):
    """Whole causal LMs merged, one expert per domain; every domain scored on its lm-eval tasks (the mean of their
    primary metrics, see :func:`suites._lm.combine_scores`).

    Also the problem of bring-your-own ``lm-eval`` suites (:mod:`suites.custom`), which give their own ``name``,
    one lm-eval task per domain and their own not-applicable reasons (:meth:`not_applicable`).
    """

    task_noun = "domain"

    def __init__(self, *, model: Any, tokenizer: Any, pretrained: StateDict, experts: dict[str, StateDict],
                 runner: LmEvalRunner, facts: dict[str, Any], params: LlmParams | None = None, name: str = SUITE,
                 domain_tasks: dict[str, list[str]] | None = None, batch_size: int | None = None,
                 limit: int | None = None, max_length: int | None = None,
                 groups: dict[str, list[str]] | None = None) -> None:
        self.name = name
        self.params = params
        self._set_weights(pretrained, experts)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.merged = MergedParameters(self.model)
        self.runner = runner
        self.domain_tasks = domain_tasks if domain_tasks is not None else params.domains()
        self.groups = dict(groups or {})  # lm-eval group in domain_tasks -> the subtasks lm-eval runs for it
        self.batch_size = batch_size if batch_size is not None else params.batch_size
        self.limit = limit if params is None else (params.limit or None)
        self.max_length = max_length
        self._facts = facts

    def not_applicable(self, what: str) -> MethodNotApplicable:
        """Why a method needing ``what`` (``logits``, ``unlabeled``, ``labeled`` or ``linear_inputs``) is skipped."""
        reason = NO_CLASS_LOGITS if what in ("logits", "unlabeled") else NO_TRAINING_DATA
        return MethodNotApplicable(f"suite {self.name} {reason}")

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        raise self.not_applicable("logits")

    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        raise self.not_applicable("unlabeled")

    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        raise self.not_applicable("unlabeled")

    def unlabeled_size(self, task: str) -> int:
        raise self.not_applicable("unlabeled")

    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        raise self.not_applicable("labeled")

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        raise self.not_applicable("linear_inputs")

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        self._check_task(task)
        names = self.domain_tasks[task]
        run = [subtask for name in names for subtask in self.groups.get(name, [name])]
        scores = evaluate_merged(self.runner, self.merged, self.model, self.tokenizer, params, run, device,
                                 self.batch_size, limit=self.limit, max_length=self.max_length)
        return combine_scores([pool_group_scores([scores[s] for s in self.groups[name]]) if name in self.groups
                               else scores[name] for name in names])

    def describe(self) -> dict:
        return {**self._facts, "tasks": list(self.tasks), "lm_eval_tasks": self.domain_tasks,
                "num_parameters": self.num_parameters()}


def load(params: LlmParams, cache_dir: Path) -> LlmProblem:
    ensure_torchvision_importable()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir)
    if params.lm_eval_include:  # lm-eval's own task files are part of the installed package
        refuse_untrusted_task_code([Path(params.lm_eval_include)], params.trust_task_code,
                                   where="suite.lm_eval_include: ")
    for item in needed_artefacts(params, cache_dir):  # every artefact checked before any weight is read
        _hub.require(item.folder, SUITE, item.description, cache_dir, prepare_args(params))
    dtype = DTYPES[params.dtype]
    base_dir = _hub.model_dir(cache_dir, params.base_id())
    model = from_pretrained(AutoModelForCausalLM, base_dir, dtype=dtype)
    merged = MergedParameters(model)
    pretrained = merged.extract()
    experts = {}
    for domain in params.domains():
        folder = _hub.model_dir(cache_dir, params.expert_id(domain))
        experts[domain] = merged.checkpoint_reader(folder, f"expert {params.expert_id(domain)}", dtype)
        if experts[domain] is None:  # no safetensors, or names transformers converts on load
            experts[domain] = merged.extract(from_pretrained(AutoModelForCausalLM, folder, dtype=dtype))
        check_expert(pretrained, experts[domain], domain)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    sources = task_sources(params)
    folder = write_local_tasks(sources, cache_dir)
    primary = {s.task: PRIMARY_METRICS[s.task] for s in sources if s.task in PRIMARY_METRICS}
    runner = LmEvalRunner([folder], primary_metrics=primary,
                          datasets_cache=cache_dir / "llm-lm-eval" / "hf_datasets")
    facts = {"base_model": params.base_id(), "dtype": params.dtype, "limit": params.limit}
    return LlmProblem(params=params, model=model, tokenizer=tokenizer, pretrained=pretrained, experts=experts,
                      runner=runner, facts=facts, groups=group_subtasks(sources))


@register_suite(SUITE, params=LlmParams, readiness=readiness, prepare=prepare, sizes=sizes, capabilities=(),
                description="LLM merging (MergeBench Llama-3.2-3B experts by default) scored with lm-eval on "
                "each domain's tasks, model passed in memory (needs `bench prepare llm-mergebench`)")
def build(params: LlmParams, cache_dir: Path, progress: bool) -> MergeProblem:
    return load(params, Path(cache_dir))
