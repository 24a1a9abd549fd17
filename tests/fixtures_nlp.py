"""Tiny NLP artefacts in the exact on-disk layout `bench prepare` leaves in the cache (see suites/_hub.py).

Everything is made here, offline and in a few seconds: tokenizers trained with the `tokenizers` library, tiny
GPT-2 / T5 / Llama checkpoints saved with save_pretrained (safetensors), GLUE-like datasets saved with
save_to_disk, an lm-eval task folder, and a COMPLETE manifest on every folder.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from suites import _hub
from suites._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

import datasets  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

datasets.disable_progress_bars()  # the fixtures' own saving progress; tests read the run's stderr
transformers_logging.disable_progress_bar()

WORDS = ("the", "a", "film", "was", "good", "bad", "great", "awful", "movie", "plot", "is", "it", "and", "not",
         "yes", "no", "negative", "positive", "acceptable", "unacceptable", "entailment", "neutral",
         "contradiction", "sentence", "question", "answer", "cat", "dog", "sat", "on", "mat", "red", "blue")
GPT2_BASE = "fixture/gpt2-tiny"
GPT2_EXPERTS = "fixture/gpt2-tiny_{task}"
T5_BASE = "fixture/t5-tiny"
T5_EXPERTS = "fixture/t5-tiny_glue-{task}"
LLM_BASE = "fixture/llama-tiny"
LLM_EXPERTS = "fixture/llama-tiny_{domain}"
GLUE = "fixture/glue"
QA_DATASET = "fixture/qa"


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    digits = [f"{rng.randrange(6)}.{rng.randrange(10)}" for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(8)) + f" {d} ." for d in digits]


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-2's (no special tokens added around inputs)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-like tokenizer: <pad>=0, </s>=1, <unk>=2, Metaspace pieces, </s> appended to every input."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(corpus())) | set("'\":?,()"))
    tokenizer.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False, initial_alphabet=alphabet))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def _perturbed(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def _save_model(model: torch.nn.Module, folder: Path, tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    model.save_pretrained(str(folder))  # safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    _hub.mark_complete(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------
# GLUE-like datasets
# ----------------------------------------------------------------------------------------------------------

TEXT_FIELDS = {"sst2": ("sentence",), "cola": ("sentence",), "rte": ("sentence1", "sentence2"),
               "mrpc": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"),
               "mnli": ("premise", "hypothesis")}
NUM_LABELS = {"sst2": 2, "cola": 2, "rte": 2, "mrpc": 2, "mnli": 3}
EVAL_SPLIT = {"mnli": "validation_matched"}


def glue_rows(task: str, n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    rows: dict[str, list] = {field: [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9)))
                                     for _ in range(n)] for field in TEXT_FIELDS[task]}
    if task == "stsb":
        rows["label"] = [round(rng.uniform(0, 5), 1) for _ in range(n)]
    else:
        rows["label"] = [i % NUM_LABELS[task] for i in range(n)]
    rows["idx"] = list(range(n))
    return rows


def save_glue(cache: Path, tasks: Sequence[str], eval_rows: int = 12, train_rows: int = 24) -> None:
    for task in tasks:
        for split, n in ((EVAL_SPLIT.get(task, "validation"), eval_rows), ("train", train_rows)):
            folder = _hub.dataset_dir(cache, GLUE, split, config=task)
            datasets.Dataset.from_dict(glue_rows(task, n, hash((task, split)) % 1000)).save_to_disk(str(folder))
            _hub.mark_complete(folder)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def gpt2_config(vocab_size: int, width: int = 32):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=width, n_layer=2, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def make_glue_gpt2(cache: Path, tasks: Sequence[str] = ("sst2", "rte"), mismatched: str | None = None) -> None:
    """Base ``GPT2LMHeadModel`` (as the hub's `gpt2`) with its tokenizer, one ``GPT2ForSequenceClassification``
    expert per task (perturbed base backbone, random head); ``mismatched`` gets a wider model."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config(len(tokenizer))).eval()
    _save_model(base, _hub.model_dir(cache, GPT2_BASE), tokenizer)
    for index, task in enumerate(tasks):
        config = gpt2_config(len(tokenizer), width=48 if task == mismatched else 32)
        config.num_labels, config.pad_token_id = NUM_LABELS[task], 0
        expert = GPT2ForSequenceClassification(config)
        if task != mismatched:
            expert.transformer.load_state_dict(base.transformer.state_dict())
            _perturbed(expert.transformer, seed=index + 1, scale=0.02)
        _save_model(expert, _hub.model_dir(cache, GPT2_EXPERTS.format(task=task)), tokenizer)
    save_glue(cache, tasks)


def t5_config(vocab_size: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                    num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)


def make_glue_t5(cache: Path, tasks: Sequence[str] = ("sst2", "stsb")) -> None:
    from transformers import T5ForConditionalGeneration

    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(t5_config(len(tokenizer))).eval()
    _save_model(base, _hub.model_dir(cache, T5_BASE), tokenizer)
    for index, task in enumerate(tasks):
        expert = T5ForConditionalGeneration(t5_config(len(tokenizer)))
        expert.load_state_dict(base.state_dict())
        folder = _hub.model_dir(cache, T5_EXPERTS.format(task=task))
        _save_model(_perturbed(expert, seed=index + 1, scale=0.05), folder, tokenizer)
    save_glue(cache, tasks)


# ----------------------------------------------------------------------------------------------------------
# A tiny causal LM and a local lm-eval task folder
# ----------------------------------------------------------------------------------------------------------

MC_TASK = """task: fixture_mc
dataset_path: fixture/qa
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: ["good", "bad", "great"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = """task: fixture_gen
dataset_path: fixture/qa
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def llama_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


def make_llm(cache: Path, tasks_dir: Path, domains: Sequence[str] = ("alpha", "beta"), docs: int = 10) -> None:
    """A tiny Llama base and one perturbed expert per domain; a hub-style QA dataset in the cache; lm-eval task
    YAMLs (one multiple-choice, one generative) that name the hub dataset, as lm-eval's built-in tasks do."""
    from transformers import LlamaForCausalLM

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(len(tokenizer))).eval()
    _save_model(base, _hub.model_dir(cache, LLM_BASE), tokenizer)
    for index, domain in enumerate(domains):
        expert = LlamaForCausalLM(llama_config(len(tokenizer)))
        expert.load_state_dict(base.state_dict())
        folder = _hub.model_dir(cache, LLM_EXPERTS.format(domain=domain))
        _save_model(_perturbed(expert, seed=index + 1, scale=0.02), folder, tokenizer)
    rng = random.Random(0)
    rows = {"question": [f"the {rng.choice(WORDS)} film was" for _ in range(docs)],
            "answer": [rng.choice(("good", "bad")) for _ in range(docs)],
            "label": [i % 3 for i in range(docs)]}
    folder = _hub.dataset_dir(cache, QA_DATASET, "test")
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    _hub.mark_complete(folder)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "fixture_mc.yaml").write_text(MC_TASK)
    (tasks_dir / "fixture_gen.yaml").write_text(GEN_TASK)
