"""The embedded ``tinylm`` suite: an offline, CPU-sized stand-in for LLM merging evaluated through lm-eval.

Built from ``build_seed`` without downloads, as the real LLM suites came to be:

1. *Tokenizer*: a byte-level BPE trained with the ``tokenizers`` library on the generated pretraining corpus,
   wrapped in ``PreTrainedTokenizerFast`` (saved with ``save_pretrained``); every word of the world, each
   answer included, is one token.
2. *Pretraining*: a tiny ``GPT2LMHeadModel`` learns next-token prediction on generic generated text (random
   sentences, repeated phrases, key-value recalls over the whole vocabulary: copying and look-up, no task).
3. *Experts*: the whole model is fine-tuned per task on prompts followed by their answer word (next-token
   cross-entropy over the full vocabulary at the answer position).

Five generated tasks (see :mod:`suites._tinylm_data`): ``sentiment`` (2 answers), ``topic`` (4), ``counting``
(5), ``next_day`` (7), ``middle_digit`` (10). The whole causal LM is merged (tied output embedding once).

Evaluation goes through lm-evaluation-harness: one ``multiple_choice`` task YAML per task (``tinylm_<task>``)
over the test split's JSONL, written next to the cache with absolute paths, run with the merged model passed in
memory. Accuracy is lm-eval's ``acc``, per-example correctness comes from its logged samples, and the loss is
the cross-entropy over the answer choices' log-likelihoods. Since every answer is one token, lm-eval's score
of a choice is the next-token log-probability of that token after the prompt; :meth:`TinyLMProblem.logits`
(what AdaMerging, SAMerging and Fisher optimise) returns exactly those next-token logits, restricted to the
task's answer tokens, so the λ-optimisers see the classifier that lm-eval scores.

Artefacts are cached under ``cache_dir / "tinylm-<key>"`` (safetensors + a sha256 manifest, written
atomically; text artefacts, i.e. the tokenizer files and the JSONL splits, are stored as uint8 tensors so that
one manifest covers everything). They are unpacked to ``tinylm-<key>.files/`` for the tokenizer and lm-eval.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from tqdm import tqdm

from bench.errors import BenchError
from bench.problem import MergeProblem, StateDict, TaskMetrics
from bench.registry import param, register_suite
from suites._clip_classification import (
    PROTOCOLS,
    derived_seed,
    load_or_build_artifacts,
)
from suites._lm import (
    ExpertsProblem,
    LmEvalRunner,
    MergedParameters,
    capture_linear_inputs,
    combine_scores,
    draw_indices,
    evaluate_merged,
    last_token_index,
    model_ids,
    pad_token_ids,
    real_tokens,
    trim_padding,
    write_multiple_choice_task,
)
from suites._tinylm_data import TASKS, draw_examples, pretraining_corpus, vocabulary
from suites._torchvision_compat import ensure_torchvision_importable

BUILD_VERSION = 1  # bump whenever a change alters built weights or data, so old caches are not reused
SUITE = "tinylm"
TASK_NAMES = ("sentiment", "topic", "counting", "next_day", "middle_digit")
SPLITS = ("train", "unlabeled", "test")
END_OF_TEXT = "<|endoftext|>"
LM_EVAL_PREFIX = "tinylm_"


@dataclass(frozen=True)
class TinyLMPreset:
    """Every build constant a ``size`` fixes (all of it enters the cache key)."""

    vocab_size: int
    layers: int
    width: int
    heads: int
    positions: int
    corpus_documents: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_length: int
    pretrain_lr: float
    train_per_task: int
    unlabeled_per_task: int
    test_per_task: int
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_per_task, "unlabeled": self.unlabeled_per_task, "test": self.test_per_task}


PRESETS: dict[str, TinyLMPreset] = {
    "full": TinyLMPreset(
        vocab_size=1024, layers=3, width=96, heads=4, positions=64,
        corpus_documents=12000, pretrain_steps=1500, pretrain_batch=48, pretrain_length=48, pretrain_lr=2e-3,
        train_per_task=2000, unlabeled_per_task=300, test_per_task=300,
        finetune_steps=150, finetune_batch=48, finetune_lr=5e-4,
    ),
    "ci": TinyLMPreset(
        vocab_size=1024, layers=2, width=64, heads=4, positions=64,
        corpus_documents=4000, pretrain_steps=300, pretrain_batch=32, pretrain_length=32, pretrain_lr=3e-3,
        train_per_task=500, unlabeled_per_task=100, test_per_task=100,
        finetune_steps=120, finetune_batch=32, finetune_lr=1e-3,
    ),
}


@dataclass(frozen=True)
class TinyLMParams:
    """Build parameters of ``tinylm``."""

    size: str = param("full", "preset of model, data and training sizes ('ci': a faster, weaker build)",
                      choices=tuple(PRESETS))
    build_seed: int = param(0, "seeds the whole build: corpus, tokenizer, data, pretraining, experts", low=0)
    protocol: str = param("transductive", "test-time adaptation data: the test split or a disjoint one",
                          choices=PROTOCOLS)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------


def train_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on ``corpus`` (deterministic), as a ``PreTrainedTokenizerFast``."""
    ensure_torchvision_importable()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT,
                                   unk_token=END_OF_TEXT, pad_token=END_OF_TEXT)
    split = [word for word in vocabulary() if len(encode(fast, " " + word)) != 1]
    if split:
        raise RuntimeError(f"tinylm tokenizer splits the word '{split[0]}'; raise the preset's vocab_size")
    return fast


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids as lm-eval's HF backend computes them for a context (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_token_ids(tokenizer: Any, task: str) -> Tensor:
    """The one token of ``" " + answer`` per class of ``task``, in class order."""
    return torch.tensor([encode(tokenizer, " " + choice)[0] for choice in TASKS[task].choices])


def gpt2_config(preset: TinyLMPreset, vocab_size: int, end_of_text: int) -> Any:
    ensure_torchvision_importable()
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=preset.positions, n_embd=preset.width,
                      n_layer=preset.layers, n_head=preset.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=end_of_text, eos_token_id=end_of_text,
                      pad_token_id=end_of_text, tie_word_embeddings=True)


def new_model(config: Any, seed: int | None = None) -> Any:
    """A GPT2LMHeadModel; with ``seed``, initialised from it without touching the caller's global RNG."""
    ensure_torchvision_importable()
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


# ----------------------------------------------------------------------------------------------------------
# Build
# ----------------------------------------------------------------------------------------------------------


def _batches(generator: torch.Generator, n: int, batch: int, steps: int) -> Iterator[Tensor]:
    """``steps`` batches of indices, reshuffling every epoch."""
    produced = 0
    while produced < steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            if produced == steps:
                return
            yield order[start : start + batch]
            produced += 1


def pretrain(model: Any, stream: Tensor, preset: TinyLMPreset, seed: int, bar: tqdm) -> None:
    """Next-token prediction on random windows of the token stream (AdamW, one-cycle schedule)."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=preset.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, preset.pretrain_lr,
                                                   total_steps=preset.pretrain_steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(preset.pretrain_length + 1)
    model.train()
    for _ in range(preset.pretrain_steps):
        starts = torch.randint(len(stream) - len(offsets), (preset.pretrain_batch,), generator=generator)
        windows = stream[starts[:, None] + offsets]
        inputs = windows[:, :-1]
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        bar.update(1)
    model.eval()


def finetune(model: Any, prompts: Tensor, answers: Tensor, preset: TinyLMPreset, seed: int, bar: tqdm) -> None:
    """Full fine-tuning on (prompt, answer token): cross-entropy over the vocabulary after the prompt."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=preset.finetune_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for indices in _batches(generator, len(prompts), preset.finetune_batch, preset.finetune_steps):
        batch = trim_padding(prompts[indices])
        hidden = model.transformer(input_ids=model_ids(batch, 0), attention_mask=real_tokens(batch)).last_hidden_state
        last = hidden[torch.arange(len(batch)), last_token_index(batch)]
        loss = F.cross_entropy(model.lm_head(last), answers[indices])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        bar.update(1)
    model.eval()


def make_splits(preset: TinyLMPreset, build_seed: int) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """task -> split -> (prompt, class) pairs, each split from its own seeded generator."""
    return {
        task: {split: draw_examples(TASKS[task], n, random.Random(derived_seed(build_seed, "data", task, split)))
               for split, n in preset.split_sizes().items()}
        for task in TASK_NAMES
    }


def jsonl(examples: list[tuple[str, int]]) -> str:
    return "".join(json.dumps({"prompt": prompt, "label": label}) + "\n" for prompt, label in examples)


def text_blob(text: str | bytes) -> Tensor:
    data = text.encode() if isinstance(text, str) else text
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


def blob_text(blob: Tensor) -> bytes:
    return bytes(blob.numpy().tobytes())


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes, by name."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def build_artifacts(preset: TinyLMPreset, build_seed: int, progress: bool) -> tuple[dict, dict[str, Any]]:
    """Build everything from scratch: (file name -> tensors, manifest metadata)."""
    started = time.perf_counter()
    corpus = pretraining_corpus(preset.corpus_documents, random.Random(derived_seed(build_seed, "corpus")))
    tokenizer = train_tokenizer(corpus, preset.vocab_size)
    end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = gpt2_config(preset, len(tokenizer), end_of_text)
    stream = torch.tensor([t for document in corpus for t in [*encode(tokenizer, document), end_of_text]])

    model = new_model(config, derived_seed(build_seed, "init"))
    with tqdm(total=preset.pretrain_steps, desc="tinylm: pretraining", disable=not progress, leave=False) as bar:
        pretrain(model, stream, preset, derived_seed(build_seed, "pretrain-batches"), bar)
    merged = MergedParameters(model)
    pretrained = merged.extract()

    splits = make_splits(preset, build_seed)
    files: dict[str, dict[str, Tensor]] = {"pretrained.safetensors": merged.to_module(pretrained)}
    total = preset.finetune_steps * len(TASK_NAMES)
    with tqdm(total=total, desc="tinylm: fine-tuning experts", disable=not progress, leave=False) as bar:
        for task in TASK_NAMES:
            merged.load_into(model, pretrained)
            train = splits[task]["train"]
            prompts = pad_token_ids([encode(tokenizer, prompt) for prompt, _ in train])
            answers = answer_token_ids(tokenizer, task)[torch.tensor([label for _, label in train])]
            finetune(model, prompts, answers, preset, derived_seed(build_seed, "finetune", task), bar)
            files[f"expert-{task}.safetensors"] = merged.to_module(merged.extract(model))
    texts = {f"tokenizer/{name}": text_blob(data) for name, data in tokenizer_files(tokenizer).items()}
    for task in TASK_NAMES:
        for split in SPLITS:
            texts[f"data/{task}/{split}.jsonl"] = text_blob(jsonl(splits[task][split]))
    files["text.safetensors"] = texts
    metadata = {
        "suite": SUITE,
        "build_version": BUILD_VERSION,
        "build_seed": build_seed,
        "preset": asdict(preset),
        "model_config": config.to_dict(),
        "tasks": {task: list(TASKS[task].choices) for task in TASK_NAMES},
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    return files, metadata


def cache_key(preset: TinyLMPreset, build_seed: int) -> str:
    identity = {"suite": SUITE, "build_version": BUILD_VERSION, "preset": asdict(preset), "build_seed": build_seed}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def expected_files() -> set[str]:
    return {"pretrained.safetensors", "text.safetensors", *(f"expert-{task}.safetensors" for task in TASK_NAMES)}


def load_or_build(cache_dir: Path, preset: TinyLMPreset, build_seed: int, progress: bool
                  ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any], Path]:
    """Verified cached artefacts, or a fresh build written to the cache (a bad cache: one warning line)."""
    directory = Path(cache_dir) / f"{SUITE}-{cache_key(preset, build_seed)}"
    expected_metadata = {"suite": SUITE, "build_version": BUILD_VERSION, "build_seed": build_seed,
                         "preset": asdict(preset)}
    files, metadata = load_or_build_artifacts(directory, SUITE, expected_metadata, expected_files(),
                                              lambda: build_artifacts(preset, build_seed, progress))
    return files, metadata, directory


def unpack_text_files(texts: dict[str, Tensor], folder: Path) -> None:
    """Write the stored text artefacts under ``folder`` (only files whose content differs are rewritten)."""
    for name, blob in texts.items():
        path = folder / name
        data = blob_text(blob)
        if path.is_file() and path.read_bytes() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------
# The merge problem
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSplit:
    prompts: Tensor  # padded token ids [n, longest]
    labels: Tensor  # int64 [n]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class TinyLMProblem(ExpertsProblem):
    """Merge tiny GPT-2 causal LMs fine-tuned on generated multiple-choice text tasks; score with lm-eval."""

    def __init__(self, *, model: Any, tokenizer: Any, pretrained: StateDict, experts: dict[str, StateDict],
                 splits: dict[str, dict[str, TextSplit]], lm_eval_dir: Path, protocol: str,
                 facts: dict[str, Any], eval_batch_size: int = 64) -> None:
        if protocol not in PROTOCOLS:
            raise BenchError(f"protocol '{protocol}' is not one of {'|'.join(PROTOCOLS)}")
        self.name = SUITE
        self._set_weights(pretrained, experts)
        self.protocol = protocol
        self.cpu_threads = 1  # a tiny model: one thread is fastest, and immune to a busy second core
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.merged = MergedParameters(self.model)
        self.splits = splits
        self.answers = {task: answer_token_ids(tokenizer, task) for task in self.tasks}
        self.lm_eval = LmEvalRunner([lm_eval_dir])
        self.eval_batch_size = eval_batch_size
        self._facts = facts

    # -- forward --------------------------------------------------------------------------------------------

    def hidden_states(self, params: StateDict, inputs: Tensor) -> Tensor:
        """Last-layer hidden states ``[n, length, width]`` of the merged model's backbone (right padding masked;
        being causal, the real tokens would not see it anyway)."""
        inputs = inputs.to(next(iter(params.values())).device)
        backbone = {key.removeprefix("transformer."): value for key, value in self.merged.to_module(params).items()}
        kwargs = {"input_ids": model_ids(inputs, 0), "attention_mask": real_tokens(inputs)}
        output = functional_call(self.model.transformer, backbone, (), kwargs, strict=False)
        return output.last_hidden_state

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        """Next-token logits after the prompt, restricted to ``task``'s answer tokens: ``[n, #choices]``."""
        self._check_task(task)
        inputs = trim_padding(inputs)
        hidden = self.hidden_states(params, inputs)
        last = hidden[torch.arange(len(inputs), device=hidden.device), last_token_index(inputs).to(hidden.device)]
        answers = self.answers[task].to(hidden.device)
        return last @ params["transformer.wte.weight"][answers].T  # the output embedding is tied to wte

    # -- data -----------------------------------------------------------------------------------------------

    def split(self, task: str, split: str) -> TextSplit:
        self._check_task(task)
        return self.splits[task][split]

    def adaptation_split(self) -> str:
        return "test" if self.protocol == "transductive" else "unlabeled"

    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        return self._draw(task, self.unlabeled_size(task), n, seed, "unlabeled")

    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        return self.split(task, self.adaptation_split()).prompts[indices]

    def unlabeled_size(self, task: str) -> int:
        return len(self.split(task, self.adaptation_split()))

    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        split = self.split(task, "train")
        indices = self._draw(task, len(split), n, seed, "labeled")
        return split.prompts[indices], split.labels[indices].clone()

    def _draw(self, task: str, size: int, n: int, seed: int, purpose: str) -> Tensor:
        if not 0 <= n <= size:
            raise BenchError(f"asked for {n} {purpose} examples of task '{task}' but its split has {size}")
        return draw_indices(size, n, derived_seed(seed, self.name, task, purpose))

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        """Inputs of every attention and MLP projection (real tokens only), keyed by the merged weight name.

        The tied embedding/output matrix is not a linear map of the backbone; RegMean averages it.
        """
        return capture_linear_inputs(self.merged, inputs, self.eval_batch_size,
                                     lambda chunk: self.hidden_states(params, chunk))

    # -- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        """lm-eval's ``acc`` on the test split (``tinylm_<task>``), with the merged model passed in memory."""
        self._check_task(task)
        name = LM_EVAL_PREFIX + task
        score = evaluate_merged(self.lm_eval, self.merged, self.model, self.tokenizer, params, [name], device,
                                self.eval_batch_size, cpu_threads=1)[name]
        expected = len(self.split(task, "test"))
        if score.correct.numel() != expected:
            raise BenchError(f"lm-eval scored {score.correct.numel()} examples of {name}, expected {expected}")
        return combine_scores([score])

    def describe(self) -> dict:
        return {
            **self._facts,
            "protocol": self.protocol,
            "tasks": list(self.tasks),
            "num_parameters": self.num_parameters(),
            "num_choices": {task: len(TASKS[task].choices) for task in self.tasks},
            "split_sizes": {task: {name: len(split) for name, split in splits.items()}
                            for task, splits in self.splits.items()},
            "evaluation": "lm-eval multiple_choice acc",
        }


def read_split(path: Path, tokenizer: Any) -> TextSplit:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return TextSplit(pad_token_ids([encode(tokenizer, row["prompt"]) for row in rows]),
                     torch.tensor([row["label"] for row in rows], dtype=torch.long))


def problem_from_artifacts(files: dict[str, dict[str, Tensor]], metadata: dict[str, Any], directory: Path,
                           protocol: str) -> TinyLMProblem:
    ensure_torchvision_importable()
    from transformers import GPT2Config, PreTrainedTokenizerFast

    folder = directory.with_name(directory.name + ".files")
    unpack_text_files(files["text.safetensors"], folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    model = new_model(GPT2Config.from_dict(metadata["model_config"]))
    merged = MergedParameters(model)
    # Weights are stored in the module's layout; what is merged is the linear layout (see suites._lm).
    pretrained = merged.from_module(files["pretrained.safetensors"])
    experts = {task: merged.from_module(files[f"expert-{task}.safetensors"]) for task in TASK_NAMES}
    splits = {task: {split: read_split(folder / "data" / task / f"{split}.jsonl", tokenizer) for split in SPLITS}
              for task in TASK_NAMES}
    for task in TASK_NAMES:
        write_multiple_choice_task(folder / "lm_eval_tasks" / f"{LM_EVAL_PREFIX}{task}.yaml", LM_EVAL_PREFIX + task,
                                   folder / "data" / task / "test.jsonl", TASKS[task].choices,
                                   folder / "hf_datasets")
    facts = {"cache_key": directory.name.removeprefix(f"{SUITE}-"), "build_seed": metadata["build_seed"],
             "build_seconds": metadata.get("build_seconds")}
    return TinyLMProblem(model=model, tokenizer=tokenizer, pretrained=pretrained, experts=experts, splits=splits,
                         lm_eval_dir=folder / "lm_eval_tasks", protocol=protocol, facts=facts)


@register_suite(
    SUITE,
    description="Embedded offline NLP suite: a tiny GPT-2 with a locally trained tokenizer, 5 generated "
    "multiple-choice text tasks, one fully fine-tuned expert each, scored through lm-eval (built on CPU, cached)",
    params=TinyLMParams,
)
def build(params: TinyLMParams, cache_dir: Path, progress: bool) -> MergeProblem:
    """Load tinylm from ``cache_dir`` or build it there first."""
    preset = PRESETS[params.size]
    files, metadata, directory = load_or_build(cache_dir, preset, params.build_seed, progress)
    return problem_from_artifacts(files, metadata, directory, params.protocol)
