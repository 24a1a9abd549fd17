"""GLUE suites read from the local hub cache: ``glue-gpt2`` (sequence classification) and ``glue-flan-t5``
(text-to-text).

``glue-gpt2``: pretrained ``gpt2``, experts ``tanganke/gpt2_<task>`` (``GPT2ForSequenceClassification``) on 7
tasks (cola, mnli, mrpc, qnli, qqp, rte, sst2). Only the ``GPT2Model`` backbone is merged (keys
``transformer.*``; Conv1D weights exposed in linear ``[out, in]`` layout, see :mod:`suites._lm`); each task keeps
its own fine-tuned score head, also for the ``pretrained`` row. Inputs are the task's text field(s) tokenized as
a pair by the GPT-2 tokenizer (concatenated, as the experts were trained), truncated to ``max_length``; the class
logits are the score head at the last real token. Metric: accuracy on the validation split (mnli:
validation_matched).

``glue-flan-t5``: pretrained ``google/flan-t5-base``, experts ``tanganke/flan-t5-base_glue-<task>`` on 8 tasks
(the 7 plus stsb), all weights merged. Each example is the FusionBench prompt of its task; the model generates
greedily (``max_length=10``) and is scored by exact match of the decoded text with the label word. stsb's
target is the score written with one decimal; its metric is Spearman's ρ between the parsed predictions
(unparseable: 0.0) and the gold scores rounded to one decimal (as FusionBench scores them, see
:func:`stsb_spearman`), stored in the record's ``accuracy`` field, and its per-example
``correct`` bit is |prediction − gold| ≤ 0.5. How the λ-optimisers and Fisher see a generative task: the
decoder's first-step logits restricted to the first token of each label word (stsb: of the integer part 0-5,
class = floor of the gold score); if the words share leading tokens, the step after them (teacher-forced).
The record's ``loss`` is the cross-entropy of those restricted logits.

Data-using methods draw from the ``train`` split; test-time methods draw unlabeled inputs from the evaluation
split (``transductive``) or from ``train`` (``inductive``). ``bench prepare glue-gpt2`` / ``glue-flan-t5``
fetches every checkpoint and dataset split into the cache (see :mod:`suites._hub`); a run reads only the
cache and names the first missing artefact with the command that fetches it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.errors import BenchError, unknown_name_error
from bench.problem import MergeProblem, StateDict, TaskMetrics
from bench.registry import ALL_DATA, SCORED_SPLITS_ONLY, ArtefactSize, DataNeeds, param, register_suite
from suites import _hub
from suites._clip_classification import PROTOCOLS, derived_seed
from suites._lm import (
    CHECKPOINT_FALLBACK,
    CHECKPOINT_FILES,
    ExpertsProblem,
    MergedParameters,
    capture_linear_inputs,
    check_expert,
    download_checkpoint,
    draw_indices,
    from_pretrained,
    last_token_index,
    model_ids,
    pad_token_ids,
    real_tokens,
    trim_padding,
)
from suites._torchvision_compat import ensure_torchvision_importable


@dataclass(frozen=True)
class GlueTask:
    """A GLUE task: its text columns, evaluation split, classes and FusionBench's Flan-T5 prompt."""

    name: str
    text_fields: tuple[str, ...]
    eval_split: str
    label_words: tuple[str, ...]  # class index -> T5 answer word; empty for the regression task (stsb)
    prompt: str

    @property
    def regression(self) -> bool:
        return not self.label_words

    @property
    def num_classes(self) -> int:
        return len(self.label_words) if self.label_words else len(STSB_CLASSES)


STSB_CLASSES = tuple(str(i) for i in range(6))  # first token of the stsb target: the integer part of the score

GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("sentence",), "validation", ("unacceptable", "acceptable"),
                     "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". "
                     "Answere 'acceptable' or 'unacceptable'."),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), "validation_matched",
                     ("entailment", "neutral", "contradiction"),
                     "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
                     "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'."),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), "validation", ("no", "yes"),
                     "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? "
                     "Answere with 'yes' or 'no'."),
    "qnli": GlueTask("qnli", ("question", "sentence"), "validation", ("yes", "no"),
                     "Given the context: '{sentence}', does the question '{question}' have an answer based on the "
                     "information provided? Answer with 'yes' or 'no'."),
    "qqp": GlueTask("qqp", ("question1", "question2"), "validation", ("no", "yes"),
                    "Do the questions '{question1}' and '{question2}' have the same intent? "
                    "Answere with 'yes' or 'no'."),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), "validation", ("yes", "no"),
                    "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'."),
    "sst2": GlueTask("sst2", ("sentence",), "validation", ("negative", "positive"),
                     "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?"),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), "validation", (),
                     "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely "
                     "different) to 5 (completely similar), rate the similarity."),
}
GPT2_TASKS = "cola,mnli,mrpc,qnli,qqp,rte,sst2"
T5_TASKS = "cola,mnli,mrpc,qnli,qqp,rte,sst2,stsb"
TRAIN_SPLIT = "train"


@dataclass(frozen=True)
class GlueParams:
    """Shared parameters of the GLUE suites (defaults are the published setups)."""

    tasks: str = param(GPT2_TASKS, "comma list of GLUE tasks (a subset is a different suite configuration)")
    base_model: str = param("gpt2", "hub id of the pretrained checkpoint")
    expert_template: str = param("tanganke/gpt2_{task}", "hub id of each task's expert, with {task}")
    dataset: str = param("nyu-mll/glue", "hub id of the GLUE dataset (one config per task)")
    max_length: int = param(512, "tokens kept per example (longer inputs are truncated)", low=8)
    max_eval_examples: int = param(0, "score only the first N examples of each evaluation split (0: all)", low=0)
    batch_size: int = param(32, "examples per forward pass when evaluating", low=1)
    protocol: str = param("transductive", "test-time adaptation data: the evaluation split or train",
                          choices=PROTOCOLS)

    def task_list(self) -> list[str]:
        names = [name.strip() for name in self.tasks.split(",") if name.strip()]
        if not names:
            raise ValueError("tasks is empty; give a comma list, e.g. tasks=sst2,rte")
        for name in names:
            if name not in GLUE_TASKS:
                raise unknown_name_error("GLUE task", name, GLUE_TASKS)
        return list(dict.fromkeys(names))

    def __post_init__(self) -> None:
        if "{task}" not in self.expert_template:
            raise ValueError(f"expert_template '{self.expert_template}' has no {{task}} placeholder")
        self.task_list()


@dataclass(frozen=True)
class GlueGpt2Params(GlueParams):
    def __post_init__(self) -> None:
        super().__post_init__()
        if "stsb" in self.task_list():
            raise ValueError("glue-gpt2 has no stsb expert (regression); its tasks are " + GPT2_TASKS)


@dataclass(frozen=True)
class GlueT5Params(GlueParams):
    tasks: str = param(T5_TASKS, "comma list of GLUE tasks (a subset is a different suite configuration)")
    base_model: str = param("google/flan-t5-base", "hub id of the pretrained checkpoint")
    expert_template: str = param("tanganke/flan-t5-base_glue-{task}", "hub id of each task's expert, with {task}")
    max_new_tokens: int = param(10, "generation max_length (decoder tokens, start token included)", low=2)


# ----------------------------------------------------------------------------------------------------------
# Artefacts in the local hub cache
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artefact:
    kind: str  # "checkpoint" or "dataset"
    repo_id: str
    folder: Path
    split: str | None = None
    config: str | None = None

    def describe(self) -> str:
        if self.kind == "checkpoint":
            return f"checkpoint {self.repo_id}"
        return f"dataset {self.repo_id} ({self.config}, split {self.split})"

    def remote(self) -> list[_hub.RemoteFile]:
        """The hub files ``prepare`` fetches for it."""
        if self.kind == "checkpoint":
            return _hub.checkpoint_files(self.repo_id, CHECKPOINT_FILES, CHECKPOINT_FALLBACK)
        return _hub.dataset_split_files(self.repo_id, self.split, self.config)

    def size(self, cache_dir: Path, online: bool) -> ArtefactSize:
        return _hub.artefact_size(f"{self.describe()} (in {self.folder})", self.folder, self.remote, cache_dir, online,
                                  converted=self.kind == "dataset")


def artefacts(params: GlueParams, cache_dir: Path, needs: DataNeeds = ALL_DATA) -> list[Artefact]:
    """Every checkpoint and dataset split the suite reads for the methods behind ``needs`` (the train split only
    for labeled examples or the inductive protocol's pool), in the order they are needed."""
    cache_dir = Path(cache_dir)
    needed = [Artefact("checkpoint", params.base_model, _hub.model_dir(cache_dir, params.base_model))]
    for task in params.task_list():
        expert = params.expert_template.format(task=task)
        needed.append(Artefact("checkpoint", expert, _hub.model_dir(cache_dir, expert)))
    with_train = needs.train_split(params.protocol)
    for task in params.task_list():
        for split in (GLUE_TASKS[task].eval_split, TRAIN_SPLIT) if with_train else (GLUE_TASKS[task].eval_split,):
            folder = _hub.dataset_dir(cache_dir, params.dataset, split, config=task)
            needed.append(Artefact("dataset", params.dataset, folder, split=split, config=task))
    return needed


def prepare_args(params: GlueParams) -> str:
    """``--set suite.x=y`` for the parameters that change which artefacts are needed."""
    defaults = type(params)()
    keys = ("tasks", "base_model", "expert_template", "dataset")
    return " ".join(f"--set suite.{k}={getattr(params, k)}" for k in keys if getattr(params, k) != getattr(defaults, k))


def readiness(params: GlueParams, cache_dir: Path, needs: DataNeeds = ALL_DATA) -> list[str]:
    return [f"{a.describe()} (in {a.folder})" for a in artefacts(params, cache_dir, needs)
            if not _hub.is_complete(a.folder)]


def sizes(params: GlueParams, cache_dir: Path, needs: DataNeeds, online: bool) -> list[ArtefactSize]:
    return [a.size(Path(cache_dir), online) for a in artefacts(params, cache_dir, needs)]


def prepare(params: GlueParams, cache_dir: Path, progress: bool, needs: DataNeeds = ALL_DATA) -> None:
    for artefact in artefacts(params, cache_dir, needs):
        if artefact.kind == "checkpoint":
            _hub.fetch(artefact.folder, lambda folder, repo=artefact.repo_id: download_checkpoint(repo, folder))
        else:
            _hub.fetch(artefact.folder, lambda folder, a=artefact: _hub.download_dataset(a.repo_id, a.split, folder,
                                                                                          config=a.config))


def require_all(suite: str, params: GlueParams, cache_dir: Path) -> None:
    """The one-line missing-artefact error for the first artefact every method needs that is not in the cache
    (before any loading); train splits are checked when a method reads them."""
    for artefact in artefacts(params, cache_dir, SCORED_SPLITS_ONLY):
        _hub.require(artefact.folder, suite, artefact.describe(), cache_dir, prepare_args(params))


def load_split(folder: Path, limit: int = 0) -> Any:
    import datasets

    data = datasets.load_from_disk(str(folder))
    return data.select(range(min(limit, len(data)))) if limit else data


# ----------------------------------------------------------------------------------------------------------
# The merge problem (shared)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EncodedSplit:
    """A split's raw rows and, once needed, its token ids."""

    rows: Any  # datasets.Dataset
    ids: Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)


class GlueProblem(ExpertsProblem, abc.ABC):
    """What both GLUE suites share: data, samplers, the merged parameters' view, evaluation loop."""

    def __init__(self, *, name: str, params: GlueParams, merged: MergedParameters, tokenizer: Any,
                 pretrained: StateDict, experts: dict[str, StateDict], splits: dict[str, dict[str, EncodedSplit]],
                 facts: dict[str, Any]) -> None:
        self.name = name
        self.params = params
        self._set_weights(pretrained, experts)
        self.protocol = params.protocol
        self.merged = merged
        self.tokenizer = tokenizer
        self.splits = splits
        self._facts = facts

    # -- data -----------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def encode_rows(self, task: str, rows: Any) -> list[list[int]]:
        """Token ids of each row's model input."""

    def split(self, task: str, split: str) -> EncodedSplit:
        self._check_task(task)
        if split not in self.splits[task]:  # a train split `bench prepare` left out: the method is skipped
            data = "labeled" if self.protocol == "transductive" else "training"
            raise _hub.split_not_prepared(f"the {split} split of dataset {self.params.dataset} ({task})", self.name,
                                          prepare_args(self.params), data)
        return self.splits[task][split]

    def token_ids(self, task: str, split: str, indices: Tensor | None = None) -> Tensor:
        """Padded ids of the split's rows (all of the evaluation split, cached; or just ``indices``)."""
        encoded = self.split(task, split)
        if indices is not None:
            return pad_token_ids(self.encode_rows(task, encoded.rows.select(indices.tolist())))
        if encoded.ids is None:
            encoded.ids = pad_token_ids(self.encode_rows(task, encoded.rows))
        return encoded.ids

    def labels(self, task: str, split: str, indices: Tensor | None = None) -> Tensor:
        column = list(self.split(task, split).rows["label"])
        values = [column[i] for i in indices.tolist()] if indices is not None else list(column)
        if GLUE_TASKS[task].regression:
            return torch.tensor([min(int(math.floor(v)), len(STSB_CLASSES) - 1) for v in values], dtype=torch.long)
        return torch.tensor(values, dtype=torch.long)

    def adaptation_split(self, task: str) -> str:
        return GLUE_TASKS[task].eval_split if self.protocol == "transductive" else TRAIN_SPLIT

    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        return self._draw(task, self.adaptation_split(task), n, seed, "unlabeled")

    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        return self.token_ids(task, self.adaptation_split(task), indices)

    def unlabeled_size(self, task: str) -> int:
        return len(self.split(task, self.adaptation_split(task)))

    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        indices = self._draw(task, TRAIN_SPLIT, n, seed, "labeled")
        return self.token_ids(task, TRAIN_SPLIT, indices), self.labels(task, TRAIN_SPLIT, indices)

    def _draw(self, task: str, split: str, n: int, seed: int, purpose: str) -> Tensor:
        size = len(self.split(task, split))
        if not 0 <= n <= size:
            raise BenchError(f"asked for {n} {purpose} examples of task '{task}' but its '{split}' split has {size}")
        return draw_indices(size, n, derived_seed(seed, self.name, task, purpose))

    # -- evaluation -----------------------------------------------------------------------------------------

    def batches(self, task: str) -> list[tuple[Tensor, slice]]:
        """The evaluation split in fixed order, in batches trimmed to their longest example."""
        ids = self.token_ids(task, GLUE_TASKS[task].eval_split)
        size = self.params.batch_size
        return [(trim_padding(ids[start : start + size]), slice(start, start + size))
                for start in range(0, len(ids), size)]

    def describe(self) -> dict:
        return {
            **self._facts,
            "protocol": self.protocol,
            "tasks": list(self.tasks),
            "num_parameters": self.num_parameters(),
            "split_sizes": {task: {name: len(split) for name, split in splits.items()}
                            for task, splits in self.splits.items()},
        }


def load_splits(params: GlueParams, cache_dir: Path) -> dict[str, dict[str, EncodedSplit]]:
    splits = {}
    for task in params.task_list():
        eval_split = GLUE_TASKS[task].eval_split
        splits[task] = {eval_split: EncodedSplit(load_split(_hub.dataset_dir(cache_dir, params.dataset, eval_split,
                                                                           task), params.max_eval_examples))}
        train = _hub.dataset_dir(cache_dir, params.dataset, TRAIN_SPLIT, task)
        if _hub.is_complete(train):  # opened, not read: rows are memory-mapped, tokenized when drawn
            splits[task][TRAIN_SPLIT] = EncodedSplit(load_split(train))
    return splits


def accuracy_metrics(logits: Tensor, labels: Tensor) -> TaskMetrics:
    correct = logits.argmax(dim=-1) == labels
    return TaskMetrics(accuracy=float(correct.float().mean()), loss=float(F.cross_entropy(logits, labels)),
                       correct=correct.cpu())


# ----------------------------------------------------------------------------------------------------------
# glue-gpt2
# ----------------------------------------------------------------------------------------------------------


class GlueGpt2Problem(GlueProblem):
    """GPT-2 backbones merged; every task scores with its own fine-tuned head (``score.weight``)."""

    def __init__(self, *, heads: dict[str, Tensor], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heads = heads

    def encode_rows(self, task: str, rows: Any) -> list[list[int]]:
        columns = [list(rows[field]) for field in GLUE_TASKS[task].text_fields]
        encoded = self.tokenizer(*columns, truncation=True, max_length=self.params.max_length)
        return encoded["input_ids"]

    def hidden_states(self, params: StateDict, inputs: Tensor) -> Tensor:
        device = next(iter(params.values())).device
        inputs = trim_padding(inputs).to(device)
        output = self.merged.call(params, input_ids=model_ids(inputs, 0), attention_mask=real_tokens(inputs))
        return output.last_hidden_state

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        self._check_task(task)
        inputs = trim_padding(inputs)
        hidden = self.hidden_states(params, inputs)
        last = hidden[torch.arange(len(inputs), device=hidden.device), last_token_index(inputs).to(hidden.device)]
        head = self.heads[task].to(device=last.device, dtype=last.dtype)
        return last @ head.T

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        """Inputs of every Conv1D projection of the backbone (real tokens only)."""
        return capture_linear_inputs(self.merged, inputs, self.params.batch_size,
                                     lambda chunk: self.hidden_states(params, chunk))

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        self._check_task(task)
        params = {key: value.to(device) for key, value in params.items()}
        chunks = []
        with torch.no_grad():
            for batch, _ in self.batches(task):
                chunks.append(self.logits(params, task, batch).float().cpu())
        return accuracy_metrics(torch.cat(chunks), self.labels(task, GLUE_TASKS[task].eval_split))


def load_gpt2(params: GlueParams, cache_dir: Path, suite: str) -> GlueGpt2Problem:
    """Base backbone, each expert's backbone and score head; experts checked against the base as they load."""
    ensure_torchvision_importable()
    from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2Model

    require_all(suite, params, cache_dir)
    base_dir = _hub.model_dir(cache_dir, params.base_model)
    backbone = from_pretrained(GPT2Model, base_dir)
    merged = MergedParameters(backbone, prefix="transformer.")
    pretrained = merged.extract()
    experts, heads = {}, {}
    dtype = next(iter(pretrained.values())).dtype
    for task in params.task_list():
        expert_id = params.expert_template.format(task=task)
        folder = _hub.model_dir(cache_dir, expert_id)
        reader = merged.checkpoint_reader(folder, f"expert {expert_id}", dtype, file_prefix="transformer.")
        if reader is not None and "score.weight" in reader.source:
            experts[task], heads[task] = reader, reader.source["score.weight"].to(dtype).clone()
        else:  # no safetensors, or names transformers converts on load: load the classifier
            model = from_pretrained(GPT2ForSequenceClassification, folder)
            experts[task], heads[task] = merged.extract(model.transformer), model.score.weight.detach().clone()
            del model
        check_expert(pretrained, experts[task], task)
        if heads[task].shape[0] != GLUE_TASKS[task].num_classes:
            raise BenchError(f"expert {expert_id} has {heads[task].shape[0]} labels, task {task} has "
                             f"{GLUE_TASKS[task].num_classes}")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    return GlueGpt2Problem(name=suite, params=params, merged=merged, tokenizer=tokenizer, pretrained=pretrained,
                           experts=experts, splits=load_splits(params, cache_dir), heads=heads,
                           facts={"base_model": params.base_model, "evaluation": "accuracy, GLUE validation"})


# ----------------------------------------------------------------------------------------------------------
# glue-flan-t5
# ----------------------------------------------------------------------------------------------------------


def spearman(predictions: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman's ρ (scipy); 0.0 when either side is constant (undefined)."""
    import warnings

    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input only warns; ρ is then NaN
        rho = spearmanr(predictions, gold)[0]
    return 0.0 if rho is None or math.isnan(rho) else float(rho)


def stsb_spearman(predictions: Sequence[float], gold: Sequence[float]) -> float:
    """The stsb metric: Spearman's ρ against the gold scores rounded to one decimal.

    FusionBench reads the gold score back from the expert's target text ("{:.1f}"), so its reference numbers rank
    the rounded scores; rounding merges nearby gold scores into ties, which changes ρ.
    """
    return spearman(predictions, [float(f"{score:.1f}") for score in gold])


def parse_score(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


class GlueT5Problem(GlueProblem):
    """Whole Flan-T5 models merged; generative evaluation (exact match; Spearman for stsb)."""

    def __init__(self, *, model: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model.eval()
        self.decoder_start = int(model.config.decoder_start_token_id)
        self.label_tokens = {task: self._label_tokens(task) for task in self.tasks}

    def _label_tokens(self, task: str) -> tuple[list[int], Tensor]:
        """(the label words' common leading tokens, the first token where they differ: one per class)."""
        words = GLUE_TASKS[task].label_words or STSB_CLASSES
        pieces = [self.tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
        common = 0
        while all(len(p) > common + 1 for p in pieces) and len({p[common] for p in pieces}) == 1:
            common += 1
        tokens = [p[common] if len(p) > common else -1 for p in pieces]
        if -1 in tokens or len(set(tokens)) != len(tokens):
            raise BenchError(f"the label words of {task} ({', '.join(words)}) do not start with distinct tokens; "
                             "the suite's classification view needs them distinct")
        return pieces[0][:common], torch.tensor(tokens)

    def encode_rows(self, task: str, rows: Any) -> list[list[int]]:
        spec = GLUE_TASKS[task]
        columns = [list(rows[field]) for field in spec.text_fields]
        prompts = [spec.prompt.format(**dict(zip(spec.text_fields, values, strict=True)))
                   for values in zip(*columns, strict=True)]
        return self.tokenizer(prompts, truncation=True, max_length=self.params.max_length)["input_ids"]

    def decoder_logits(self, params: StateDict, inputs: Tensor, prefix: Sequence[int] = ()) -> Tensor:
        """Decoder logits over the vocabulary after the start token and ``prefix``: ``[n, vocab]``."""
        device = next(iter(params.values())).device
        inputs = trim_padding(inputs).to(device)
        decoder = torch.tensor([[self.decoder_start, *prefix]], device=device).expand(len(inputs), -1)
        output = self.merged.call(params, input_ids=model_ids(inputs, self.tokenizer.pad_token_id),
                                  attention_mask=real_tokens(inputs), decoder_input_ids=decoder)
        return output.logits[:, -1]

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        """Decoder logits at the first step where the label words differ (the first step unless they share a
        leading token), restricted to each label word's token there (see the module doc)."""
        self._check_task(task)
        prefix, tokens = self.label_tokens[task]
        logits = self.decoder_logits(params, inputs, prefix)
        return logits[:, tokens.to(logits.device)]

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        """Inputs of every linear map of encoder and decoder (the classification steps) and of the LM head."""
        prefix, _ = self.label_tokens[task]
        return capture_linear_inputs(self.merged, inputs, self.params.batch_size,
                                     lambda chunk: self.decoder_logits(params, chunk, prefix))

    def generate(self, model: Any, inputs: Tensor) -> list[str]:
        ids = model_ids(inputs, self.tokenizer.pad_token_id).to(model.device)
        output = model.generate(input_ids=ids, attention_mask=real_tokens(inputs).to(model.device),
                                max_length=self.params.max_new_tokens, do_sample=False, num_beams=1)
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        self._check_task(task)
        spec = GLUE_TASKS[task]
        model = self.merged.load_into(self.model.to(device), params)
        params = {key: value.to(device) for key, value in params.items()}
        texts, chunks = [], []
        with torch.no_grad():
            for batch, _ in self.batches(task):
                texts += self.generate(model, batch)
                chunks.append(self.logits(params, task, batch).float().cpu())
        logits, classes = torch.cat(chunks), self.labels(task, spec.eval_split)
        loss = float(F.cross_entropy(logits, classes))
        gold = list(self.split(task, spec.eval_split).rows["label"])
        if spec.regression:
            predicted = [parse_score(text) for text in texts]
            correct = torch.tensor([abs(p - g) <= 0.5 for p, g in zip(predicted, gold, strict=True)])
            return TaskMetrics(accuracy=stsb_spearman(predicted, gold), loss=loss, correct=correct)
        correct = torch.tensor([text == spec.label_words[g] for text, g in zip(texts, gold, strict=True)])
        return TaskMetrics(accuracy=float(correct.float().mean()), loss=loss, correct=correct)


def load_t5(params: GlueT5Params, cache_dir: Path, suite: str) -> GlueT5Problem:
    ensure_torchvision_importable()
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    require_all(suite, params, cache_dir)
    base_dir = _hub.model_dir(cache_dir, params.base_model)
    model = from_pretrained(T5ForConditionalGeneration, base_dir)
    merged = MergedParameters(model)
    pretrained = merged.extract()
    experts = {}
    dtype = next(iter(pretrained.values())).dtype
    for task in params.task_list():
        expert_id = params.expert_template.format(task=task)
        expert_dir = _hub.model_dir(cache_dir, expert_id)
        experts[task] = merged.checkpoint_reader(expert_dir, f"expert {expert_id}", dtype)
        if experts[task] is None:  # no safetensors, or names transformers converts on load
            experts[task] = merged.extract(from_pretrained(T5ForConditionalGeneration, expert_dir))
        check_expert(pretrained, experts[task], task)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    return GlueT5Problem(name=suite, params=params, merged=merged, tokenizer=tokenizer, pretrained=pretrained,
                         experts=experts, splits=load_splits(params, cache_dir), model=model,
                         facts={"base_model": params.base_model,
                                "evaluation": "exact match of greedy generations (stsb: Spearman), GLUE validation"})


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------


@register_suite("glue-gpt2", params=GlueGpt2Params, readiness=readiness, prepare=prepare, sizes=sizes,
                description="GPT-2 on 7 GLUE tasks (tanganke/gpt2_<task>): backbone merged, each task keeps its "
                "score head; accuracy on validation (needs `bench prepare glue-gpt2`)")
def build_gpt2(params: GlueGpt2Params, cache_dir: Path, progress: bool) -> MergeProblem:
    return load_gpt2(params, Path(cache_dir), "glue-gpt2")


@register_suite("glue-flan-t5", params=GlueT5Params, readiness=readiness, prepare=prepare, sizes=sizes,
                description="Flan-T5-base on 8 GLUE tasks (tanganke/flan-t5-base_glue-<task>), generative: exact "
                "match, Spearman for stsb (needs `bench prepare glue-flan-t5`)")
def build_t5(params: GlueT5Params, cache_dir: Path, progress: bool) -> MergeProblem:
    return load_t5(params, Path(cache_dir), "glue-flan-t5")
