"""The embedded ``tiny8`` suite: an offline, CPU-sized stand-in for the real ``vit8`` (CLIP ViT, 8 tasks).

Everything is built from ``build_seed`` without downloads: procedurally drawn 16x16 RGB images and
scikit-learn's bundled ``load_digits()`` glyphs. The build mirrors how ``vit8`` came to be:

1. *Pretraining*: a small CLIP-style ViT (open_clip parameter names) learns generic attributes of a mixed
   procedural corpus: which of 96 random stroke and blob symbols is drawn (the ImageNet of this world) and
   coarse kind of scene, warm/cool/grey tone, which half the content is in, small/large extent, over varied
   backgrounds. None of these are the tasks' labels, so its features are generic but insufficient.
2. *Zero-shot heads*: each class gets the normalised mean pretrained embedding of a few clean canonical
   renderings of it (white on black, centred): the analogue of encoding CLIP text prompts. Heads are frozen.
3. *Experts*: the whole encoder is fine-tuned per task against its frozen head (as in the task-vectors
   papers).

The eight heterogeneous tasks, each with its own look as the real datasets have (class counts in brackets):
``digits`` (10, clean grey glyphs, the MNIST analogue), ``noisy_digits`` (10, coloured, often inverted, noisy
glyphs with neighbours cut by the border, the SVHN analogue), ``shapes`` (6, dark on pale, GTSRB-like),
``textures`` (8 stripe orientations and patterns, the DTD analogue), ``colours`` (8 hues of full-frame blotchy
terrain, the EuroSAT analogue), ``counting`` (1-6 dots on a night sky), ``position`` (3x3 grid cell of a small
shape on a gradient) and ``sizes`` (4 size bands of a shape on a muted background).

The tasks' classes, image drawing, splits, prompts and pretraining corpus live in :mod:`suites._tiny8_world`;
this module holds the size presets, the build (pretraining, heads, experts) and the suite's registration.

Artefacts are cached under ``cache_dir / "tiny8-<key>"`` (safetensors + a manifest of sha256 checksums,
written atomically); a corrupt cache is rebuilt with a one-line warning on stderr.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bench.problem import MergeProblem, StateDict
from bench.registry import param, register_suite
from suites._clip_classification import (
    PROTOCOLS,
    SPLITS,
    ClipClassificationProblem,
    ClipHead,
    DataSplit,
    TaskData,
    VisionTransformer,
    VisionTransformerConfig,
    average_prompt_embeddings,
    derived_seed,
    init_vision_transformer_,
    load_or_build_artifacts,
)
from suites._tiny8_world import (
    IGNORE,
    PRETRAIN_GROUPS,
    TASK_CLASSES,
    TASKS,
    PretrainingCorpus,
    load_digit_pools,
    make_pretraining_corpus,
    make_prompts,
    make_task_split,
    prepare_images,
)

BUILD_VERSION = 1  # bump whenever a change alters built weights or data, so old caches are not reused



@dataclass(frozen=True)
class SizePreset:
    """Every build constant that a ``size`` choice fixes (all of it enters the cache key)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    train_per_task: int
    unlabeled_per_task: int
    validation_per_task: int
    test_per_task: int
    prompts_per_class: int
    pretrain_examples: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float

    def encoder_config(self) -> VisionTransformerConfig:
        return VisionTransformerConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            width=self.width,
            layers=self.layers,
            heads=self.heads,
            embed_dim=self.embed_dim,
        )

    def split_sizes(self) -> dict[str, int]:
        return {
            "train": self.train_per_task,
            "unlabeled": self.unlabeled_per_task,
            "validation": self.validation_per_task,
            "test": self.test_per_task,
        }


PRESETS: dict[str, SizePreset] = {
    "full": SizePreset(
        image_size=16,
        patch_size=4,
        width=64,
        layers=3,
        heads=4,
        embed_dim=64,
        train_per_task=2000,
        unlabeled_per_task=400,
        validation_per_task=200,
        test_per_task=400,
        prompts_per_class=8,
        pretrain_examples=48000,
        pretrain_steps=2400,
        pretrain_batch=256,
        pretrain_lr=1e-3,
        finetune_steps=200,
        finetune_batch=128,
        finetune_lr=1e-3,
    ),
    "ci": SizePreset(
        image_size=16,
        patch_size=4,
        width=32,
        layers=2,
        heads=2,
        embed_dim=32,
        train_per_task=500,
        unlabeled_per_task=100,
        validation_per_task=100,
        test_per_task=200,
        prompts_per_class=4,
        pretrain_examples=6000,
        pretrain_steps=600,
        pretrain_batch=128,
        pretrain_lr=2e-3,
        finetune_steps=120,
        finetune_batch=64,
        finetune_lr=2e-3,
    ),
}


@dataclass(frozen=True)
class Tiny8Params:
    """Build parameters of ``tiny8``."""

    size: str = param(
        "full",
        "preset of model, data and training sizes ('ci': a faster, weaker build)",
        choices=tuple(PRESETS),
    )
    build_seed: int = param(0, "seeds the whole build: data, pretraining, heads and experts", low=0)
    protocol: str = param(
        "transductive", "test-time adaptation data: the test split or a disjoint one", choices=PROTOCOLS
    )


# ----------------------------------------------------------------------------------------------------------
# Drawing: every function takes explicit generators and returns float images in [0, 1], [n, 3, size, size]
# ----------------------------------------------------------------------------------------------------------


def _batches(generator: torch.Generator, n: int, batch: int, steps: int) -> Iterator[Tensor]:
    """``steps`` batches of indices, reshuffling every epoch."""
    produced = 0
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            if produced == steps:
                return
            yield order[start : start + batch]
            produced += 1


def pretrain(preset: SizePreset, build_seed: int, corpus: PretrainingCorpus, bar: tqdm) -> VisionTransformer:
    """Train the encoder plus throwaway linear read-outs on the generic attributes of the corpus."""
    encoder = VisionTransformer(preset.encoder_config())
    init_vision_transformer_(encoder, torch.Generator().manual_seed(derived_seed(build_seed, "init")))
    readout = nn.Linear(preset.embed_dim, sum(PRETRAIN_GROUPS.values()))
    with torch.no_grad():
        readout_generator = torch.Generator().manual_seed(derived_seed(build_seed, "readout"))
        readout.weight.copy_(
            torch.randn(readout.weight.shape, generator=readout_generator) * preset.embed_dim**-0.5
        )
        readout.bias.zero_()
    parameters = list(encoder.parameters()) + list(readout.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=preset.pretrain_lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, preset.pretrain_lr, total_steps=preset.pretrain_steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(derived_seed(build_seed, "pretrain-batches"))
    encoder.train()
    for indices in _batches(generator, len(corpus.labels), preset.pretrain_batch, preset.pretrain_steps):
        outputs = readout(encoder(prepare_images(corpus.images[indices]))).split(
            list(PRETRAIN_GROUPS.values()), 1
        )
        labels = corpus.labels[indices]
        loss = sum(
            F.cross_entropy(output, labels[:, g], ignore_index=IGNORE) for g, output in enumerate(outputs)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update(1)
    return encoder.eval()


def finetune(
    pretrained: StateDict, preset: SizePreset, head: ClipHead, train: DataSplit, seed: int, bar: tqdm
) -> StateDict:
    """Fine-tune the whole encoder on one task against its frozen head; returns the expert's state dict.

    Adam with a short warm-up and cosine decay, as in the task-vectors recipe (without weight decay, which
    would give every task vector a shared shrink-towards-zero component).
    """
    encoder = VisionTransformer(preset.encoder_config())
    encoder.load_state_dict(pretrained)
    encoder.train()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=preset.finetune_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, preset.finetune_lr, total_steps=preset.finetune_steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    for indices in _batches(generator, len(train), preset.finetune_batch, preset.finetune_steps):
        logits = head.logits(encoder(prepare_images(train.images[indices])))
        loss = F.cross_entropy(logits, train.labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update(1)
    return {key: value.detach().clone() for key, value in encoder.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# Build, cache, load
# ----------------------------------------------------------------------------------------------------------


def cache_key(preset: SizePreset, build_seed: int) -> str:
    identity = {"build_version": BUILD_VERSION, "preset": asdict(preset), "build_seed": build_seed}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def build_artifacts(
    preset: SizePreset, build_seed: int, progress: bool
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Build everything from scratch: (file name -> tensors, manifest metadata)."""
    started = time.perf_counter()
    size = preset.image_size
    pools = load_digit_pools(build_seed)
    data: dict[str, Tensor] = {}
    splits: dict[str, dict[str, DataSplit]] = {}
    for task in TASKS:
        splits[task] = {}
        for split, n in preset.split_sizes().items():
            generator = torch.Generator().manual_seed(derived_seed(build_seed, "data", task, split))
            splits[task][split] = made = make_task_split(task, n, generator, size, pools[split])
            data[f"{task}/{split}/images"], data[f"{task}/{split}/labels"] = made.images, made.labels

    corpus_generator = torch.Generator().manual_seed(derived_seed(build_seed, "corpus"))
    corpus = make_pretraining_corpus(preset.pretrain_examples, corpus_generator, size)
    with tqdm(
        total=preset.pretrain_steps, desc="tiny8: pretraining", disable=not progress, leave=False
    ) as bar:
        encoder = pretrain(preset, build_seed, corpus, bar)
    pretrained = {key: value.detach().clone() for key, value in encoder.state_dict().items()}

    heads: dict[str, ClipHead] = {}
    with torch.no_grad():
        for task in TASKS:
            prompts = make_prompts(task, preset.prompts_per_class, size, pools["train"], build_seed)
            heads[task] = ClipHead(average_prompt_embeddings([encoder(batch) for batch in prompts]))

    files: dict[str, dict[str, Tensor]] = {"pretrained.safetensors": pretrained, "data.safetensors": data}
    total = preset.finetune_steps * len(TASKS)
    with tqdm(total=total, desc="tiny8: fine-tuning experts", disable=not progress, leave=False) as bar:
        for task in TASKS:
            seed = derived_seed(build_seed, "finetune", task)
            files[f"expert-{task}.safetensors"] = finetune(
                pretrained, preset, heads[task], splits[task]["train"], seed, bar
            )
    files["heads.safetensors"] = {
        **{f"{task}/class_embeddings": head.class_embeddings for task, head in heads.items()},
        **{f"{task}/logit_scale": torch.tensor(head.logit_scale) for task, head in heads.items()},
    }
    metadata = {
        "suite": "tiny8",
        "build_version": BUILD_VERSION,
        "build_seed": build_seed,
        "preset": asdict(preset),
        "tasks": {task: list(TASK_CLASSES[task]) for task in TASKS},
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    return files, metadata


def problem_from_artifacts(
    files: dict[str, dict[str, Tensor]], metadata: dict[str, Any], key: str, protocol: str
) -> ClipClassificationProblem:
    preset = SizePreset(**metadata["preset"])
    data_tensors, head_tensors = files["data.safetensors"], files["heads.safetensors"]
    experts = {task: files[f"expert-{task}.safetensors"] for task in TASKS}
    data = {
        task: TaskData(
            class_names=TASK_CLASSES[task],
            splits={
                split: DataSplit(
                    data_tensors[f"{task}/{split}/images"], data_tensors[f"{task}/{split}/labels"]
                )
                for split in SPLITS
            },
        )
        for task in TASKS
    }
    heads = {
        task: ClipHead(head_tensors[f"{task}/class_embeddings"], float(head_tensors[f"{task}/logit_scale"]))
        for task in TASKS
    }
    return ClipClassificationProblem(
        name="tiny8",
        encoder=VisionTransformer(preset.encoder_config()),
        pretrained=files["pretrained.safetensors"],
        expert_loader=experts.__getitem__,
        heads=heads,
        data=data,
        protocol=protocol,
        prepare=prepare_images,
        cpu_threads=1,
        facts={
            "cache_key": key,
            "build_seed": metadata["build_seed"],
            "image_size": preset.image_size,
        },
    )


def load_or_build(
    cache_dir: Path, preset: SizePreset, build_seed: int, progress: bool
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any], str]:
    """Verified cached artefacts, or a fresh build written to the cache (a bad cache: one warning line)."""
    key = cache_key(preset, build_seed)
    expected_metadata = {"suite": "tiny8", "build_version": BUILD_VERSION, "build_seed": build_seed,
                         "preset": asdict(preset)}
    expected_files = {"pretrained.safetensors", "data.safetensors", "heads.safetensors",
                      *(f"expert-{task}.safetensors" for task in TASKS)}
    files, metadata = load_or_build_artifacts(Path(cache_dir) / f"tiny8-{key}", "tiny8", expected_metadata,
                                              expected_files, lambda: build_artifacts(preset, build_seed, progress))
    return files, metadata, key


@register_suite(
    "tiny8",
    description="Embedded offline stand-in for vit8: a tiny CLIP-style ViT, 8 procedural image tasks, "
    "zero-shot heads, one fine-tuned expert per task (built on CPU in minutes, then cached)",
    params=Tiny8Params,
)
def build(params: Tiny8Params, cache_dir: Path, progress: bool) -> MergeProblem:
    """Load tiny8 from ``cache_dir`` or build it there first."""
    preset = PRESETS[params.size]
    files, metadata, key = load_or_build(cache_dir, preset, params.build_seed, progress)
    return problem_from_artifacts(files, metadata, key, params.protocol)
