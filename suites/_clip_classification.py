"""CLIP-style image classification as a merge problem, shared by ``tiny8`` and the real ``vit`` suites.

What is merged is an image encoder's state dict. Each task keeps a frozen zero-shot head (one unit-norm
class embedding per class plus CLIP's logit scale) that is never merged:
``logits = exp(logit_scale) * cos(image_embedding, class_embeddings)``.

This module holds the parts that do not depend on where weights and data come from:

- :class:`VisionTransformer`: a CLIP image encoder whose parameter names follow open_clip's
  ``VisionTransformer`` (``conv1.weight``, ``class_embedding``,
  ``transformer.resblocks.{i}.attn.in_proj_weight``, ...), so merge methods see the same tensor structure as
  on real CLIP;
- :class:`ClipHead` and :func:`average_prompt_embeddings`: zero-shot heads from per-class "prompt" embeddings;
- :class:`ClipClassificationProblem`: the :class:`~bench.problem.MergeProblem` (functional forward through
  ``torch.func.functional_call``, batched evaluation, seeded samplers for both adaptation protocols);
- :func:`write_artifacts` / :func:`read_artifacts`: a directory of safetensors files with a JSON manifest of
  sha256 checksums, written atomically, which suites use as their build cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call

from bench.disk import file_in_the_way
from bench.errors import BenchError, unknown_name_error
from bench.measure import torch_threads
from bench.problem import MergeProblem, StateDict, TaskMetrics
from bench.temporaries import owner_tag, remove_stale

PROTOCOLS = ("transductive", "inductive")
SPLITS = ("train", "unlabeled", "validation", "test")
CLIP_LOGIT_SCALE = math.log(100.0)  # CLIP's learned temperature ends at its clamp, exp(scale) = 100


# ----------------------------------------------------------------------------------------------------------
# The image encoder
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionTransformerConfig:
    """Shape of a CLIP ViT image encoder (open_clip's ``CLIPVisionCfg`` subset that matters here)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int
    quick_gelu: bool = False  # OpenAI's CLIP weights use QuickGELU; open_clip's default is nn.GELU

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``, ``out_proj``).

    Written out rather than using ``nn.MultiheadAttention`` so that ``functional_call`` always takes the same
    plain code path (the built-in module switches to a fused kernel in eval mode).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        activation: nn.Module = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", activation),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP's image encoder: patchify, class token, pre-norm transformer, projection of the class token.

    Input ``[batch, 3, image_size, image_size]`` float images (already normalised), output
    ``[batch, embed_dim]`` unnormalised image embeddings.
    """

    def __init__(self, config: VisionTransformerConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(config.grid_size**2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads, config.quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, config.embed_dim))

    def forward(self, images: Tensor) -> Tensor:
        patches = self.conv1(images).flatten(2).transpose(1, 2)  # [batch, grid*grid, width]
        class_token = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([class_token, patches], dim=1) + self.positional_embedding.to(patches.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


def init_vision_transformer_(model: VisionTransformer, generator: torch.Generator) -> None:
    """open_clip's initialisation, drawn from ``generator`` so that a build never touches the global RNG."""
    config = model.config
    width, layers = config.width, config.layers
    scale = width**-0.5
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5

    def normal_(tensor: Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)

    with torch.no_grad():
        normal_(model.conv1.weight, (3 * config.patch_size**2) ** -0.5)
        normal_(model.class_embedding, scale)
        normal_(model.positional_embedding, scale)
        normal_(model.proj, scale)
        for norm in [model.ln_pre, model.ln_post] + [
            m for m in model.modules() if isinstance(m, nn.LayerNorm)
        ]:
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        for block in model.transformer.resblocks:
            normal_(block.attn.in_proj_weight, attn_std)
            block.attn.in_proj_bias.zero_()
            normal_(block.attn.out_proj.weight, proj_std)
            block.attn.out_proj.bias.zero_()
            normal_(block.mlp.c_fc.weight, fc_std)
            block.mlp.c_fc.bias.zero_()
            normal_(block.mlp.c_proj.weight, proj_std)
            block.mlp.c_proj.bias.zero_()


# ----------------------------------------------------------------------------------------------------------
# Heads and data
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipHead:
    """A frozen zero-shot classifier: unit-norm class embeddings [num_classes, embed_dim], a logit scale."""

    class_embeddings: Tensor
    logit_scale: float = CLIP_LOGIT_SCALE

    def logits(self, image_embeddings: Tensor) -> Tensor:
        weights = self.class_embeddings.to(device=image_embeddings.device, dtype=torch.float32)
        return math.exp(self.logit_scale) * F.normalize(image_embeddings.float(), dim=-1) @ weights.T

    @property
    def num_classes(self) -> int:
        return int(self.class_embeddings.shape[0])


def average_prompt_embeddings(per_class: Sequence[Tensor]) -> Tensor:
    """CLIP's zero-shot recipe: normalise each prompt's embedding, average per class, normalise again.

    ``per_class[c]`` is ``[num_prompts, embed_dim]``; returns ``[num_classes, embed_dim]``.
    """
    means = [F.normalize(embeddings.float(), dim=-1).mean(dim=0) for embeddings in per_class]
    return F.normalize(torch.stack(means), dim=-1)


@dataclass(frozen=True)
class DataSplit:
    """Examples in a fixed order: stored images (any dtype; ``prepare`` makes inputs) and labels."""

    images: Tensor
    labels: Tensor  # int64 [num_examples]

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class TaskData:
    """One task: its class names (in head order) and its splits by name (see :data:`SPLITS`)."""

    class_names: tuple[str, ...]
    splits: Mapping[str, DataSplit]


def derived_seed(seed: int, *parts: str) -> int:
    """A stable 63-bit seed for (seed, parts): distinct streams per task and purpose, same across runs."""
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ----------------------------------------------------------------------------------------------------------
# The merge problem
# ----------------------------------------------------------------------------------------------------------


class ClipClassificationProblem(MergeProblem):
    """Merge CLIP image encoders fine-tuned on several classification tasks that keep frozen zero-shot heads.

    ``encoder`` is a template module: its own weights are never used, every forward substitutes the given
    state dict with ``torch.func.functional_call`` (strictly, so a state dict missing a key fails loudly).
    ``prepare`` turns stored images into encoder inputs (e.g. uint8 -> normalised float); the samplers return
    prepared inputs. Under the ``transductive`` protocol ``unlabeled_indices`` draws from the test split (the
    published AdaMerging protocol); under ``inductive`` it draws from the separate ``unlabeled`` split.
    ``cpu_threads`` caps torch's threads on the CPU (the runner applies it to whole jobs, this class to
    evaluation): for tiny models on a shared machine, OpenMP workers waiting on each other make a second thread
    ~50x slower instead of faster.
    """

    vector_params = ("*text_projection*",)  # merged as a vector by the SVD methods (TSV, Iso reference code)

    def __init__(
        self,
        *,
        name: str,
        encoder: nn.Module,
        pretrained: StateDict,
        expert_loader: Callable[[str], StateDict],
        heads: Mapping[str, ClipHead],
        data: Mapping[str, TaskData],
        protocol: str = "transductive",
        prepare: Callable[[Tensor], Tensor] | None = None,
        eval_batch_size: int = 512,
        cpu_threads: int | None = None,
        facts: Mapping[str, Any] | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise BenchError(f"protocol '{protocol}' is not one of {'|'.join(PROTOCOLS)}")
        if set(heads) != set(data):
            raise ValueError(f"tasks with heads {sorted(heads)} differ from tasks with data {sorted(data)}")
        for task, task_data in data.items():
            if len(task_data.class_names) != heads[task].num_classes:
                raise ValueError(
                    f"task '{task}' has {len(task_data.class_names)} class names for "
                    f"{heads[task].num_classes} class embeddings"
                )
        self.name = name
        self.tasks = list(data)
        self.protocol = protocol
        self.encoder = encoder.eval()
        self._pretrained = pretrained
        self._expert_loader = expert_loader
        self.heads = dict(heads)
        self.data = dict(data)
        self._prepare = prepare or (lambda images: images)
        self.eval_batch_size = eval_batch_size
        self.cpu_threads = cpu_threads
        self._facts = dict(facts or {})

    # -- weights --------------------------------------------------------------------------------------------

    def pretrained(self) -> StateDict:
        return self._pretrained

    def expert(self, task: str) -> StateDict:
        self._check_task(task)
        return self._expert_loader(task)

    # -- forward --------------------------------------------------------------------------------------------

    def embed(self, params: StateDict, inputs: Tensor) -> Tensor:
        """Image embeddings of ``inputs`` under ``params`` (inputs move to the parameters' device, dtype)."""
        reference = next(iter(params.values()))
        inputs = inputs.to(device=reference.device, dtype=reference.dtype)
        return functional_call(self.encoder, params, (inputs,), strict=True)

    def logits(self, params: StateDict, task: str, inputs: Tensor) -> Tensor:
        self._check_task(task)
        return self.heads[task].logits(self.embed(params, inputs))

    def logits_per_task(self, params: StateDict, batches: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """One encoder pass over all tasks' batches (the encoder is shared; only the heads differ per task)."""
        for task in batches:
            self._check_task(task)
        embeddings = self.embed(params, torch.cat(list(batches.values())))
        sizes = [len(inputs) for inputs in batches.values()]
        return {task: self.heads[task].logits(part)
                for task, part in zip(batches, embeddings.split(sizes), strict=True)}

    # -- data -----------------------------------------------------------------------------------------------

    def split(self, task: str, split: str) -> DataSplit:
        self._check_task(task)
        if split not in self.data[task].splits:
            raise BenchError(
                f"task '{task}' has no '{split}' split; it has {', '.join(self.data[task].splits)}"
            )
        return self.data[task].splits[split]

    def inputs(self, task: str, split: str) -> Tensor:
        """All prepared inputs of one split, in its fixed order."""
        return self._prepare(self.split(task, split).images)

    def adaptation_split(self) -> str:
        return "test" if self.protocol == "transductive" else "unlabeled"

    def unlabeled_indices(self, task: str, n: int, seed: int) -> Tensor:
        return self._draw(task, self.adaptation_split(), n, seed, "unlabeled")

    def unlabeled_inputs(self, task: str, indices: Tensor) -> Tensor:
        """Gathers only these images from the stored split (a tensor, the memory-mapped uint8 store, or images
        decoded from the dataset on access) and prepares them."""
        return self._prepare(self.split(task, self.adaptation_split()).images[indices])

    def unlabeled_size(self, task: str) -> int:
        return len(self.split(task, self.adaptation_split()))

    def linear_inputs(self, params: StateDict, task: str, inputs: Tensor) -> dict[str, Tensor]:
        """Inputs of every linear map of the encoder, [N·tokens, in_features], keyed by its weight's name.

        ``nn.Linear`` modules and the attention's fused ``in_proj_weight`` (whose input is the attention
        module's input) are captured with forward pre-hooks while the encoder runs on ``params``.
        """
        captured: dict[str, list[Tensor]] = {}
        handles = []

        def capture(key: str):
            def hook(module: nn.Module, args: tuple) -> None:
                captured.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

            return hook

        for name, module in self.encoder.named_modules():
            if isinstance(module, nn.Linear) and f"{name}.weight" in params:
                handles.append(module.register_forward_pre_hook(capture(f"{name}.weight")))
            elif (isinstance(module, (MultiheadSelfAttention, nn.MultiheadAttention))  # the latter: open_clip's
                  and f"{name}.in_proj_weight" in params):
                handles.append(module.register_forward_pre_hook(capture(f"{name}.in_proj_weight")))
        try:
            with torch.no_grad():
                for start in range(0, len(inputs), self.eval_batch_size):
                    self.embed(params, inputs[start : start + self.eval_batch_size])
        finally:
            for handle in handles:
                handle.remove()
        return {key: torch.cat(chunks) for key, chunks in captured.items()}

    def labeled(self, task: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
        indices = self._draw(task, "train", n, seed, "labeled")
        split = self.split(task, "train")
        return self._prepare(split.images[indices]), split.labels[indices].clone()

    def _draw(self, task: str, split_name: str, n: int, seed: int, purpose: str) -> Tensor:
        """``n`` distinct indices; a smaller ``n`` with the same seed gives a prefix of a larger one."""
        size = len(self.split(task, split_name))
        if not 0 <= n <= size:
            raise BenchError(
                f"asked for {n} {purpose} examples of task '{task}' but its '{split_name}' split has {size}"
            )
        generator = torch.Generator().manual_seed(derived_seed(seed, self.name, task, purpose))
        return torch.randperm(size, generator=generator)[:n]

    # -- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, params: StateDict, task: str, device: torch.device) -> TaskMetrics:
        split = self.split(task, "test")
        params = {key: value.to(device) for key, value in params.items()}
        correct_chunks, loss_sum = [], 0.0
        on_cpu = torch.device(device).type == "cpu"
        with torch_threads(self.cpu_threads if on_cpu else None), torch.no_grad():
            for start in range(0, len(split), self.eval_batch_size):
                images = split.images[start : start + self.eval_batch_size]
                labels = split.labels[start : start + self.eval_batch_size].to(device)
                logits = self.logits(params, task, self._prepare(images))
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct_chunks.append((logits.argmax(dim=-1) == labels).cpu())
        correct = torch.cat(correct_chunks)
        return TaskMetrics(
            accuracy=float(correct.float().mean()), loss=loss_sum / len(split), correct=correct
        )

    def describe(self) -> dict:
        return {
            **self._facts,
            "protocol": self.protocol,
            "tasks": list(self.tasks),
            "num_parameters": sum(value.numel() for value in self._pretrained.values()),
            "num_classes": {task: head.num_classes for task, head in self.heads.items()},
            "split_sizes": {
                task: {name: len(split) for name, split in task_data.splits.items()}
                for task, task_data in self.data.items()
            },
        }

    def _check_task(self, task: str) -> None:
        if task not in self.heads:
            raise unknown_name_error(f"task of suite {self.name}", task, self.tasks)


# ----------------------------------------------------------------------------------------------------------
# Checksummed artefact directories (the build cache)
# ----------------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"


class CorruptArtifacts(Exception):
    """A cache directory is missing, incomplete or fails its checksums; the message says which file, why."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifacts(
    directory: Path, files: Mapping[str, Mapping[str, Tensor]], metadata: Mapping[str, Any]
) -> None:
    """Write ``files`` (file name -> tensors) as safetensors plus a manifest, atomically at ``directory``.

    Everything is written into a temporary sibling directory that is renamed into place last, so a reader
    sees either no directory or a complete one. If another writer got there first with a valid directory,
    theirs is kept; an invalid one in the way is replaced.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{owner_tag()}.", dir=directory.parent))
    try:
        checksums = {}
        for file_name, tensors in files.items():
            path = staging / file_name
            save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(path))
            checksums[file_name] = _sha256(path.read_bytes())
        manifest = {**metadata, "files": checksums}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(staging, directory)
        except OSError:  # something is already there: keep it if valid, otherwise replace it
            try:
                read_manifest(directory)
                return
            except CorruptArtifacts:
                remove_artifacts(directory)
                os.rename(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory`` after checking every listed file's sha256 (raises CorruptArtifacts)."""
    _, manifest = read_artifacts(directory, load=False)
    return manifest


def read_artifacts(
    directory: Path, *, load: bool = True
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Verify and load a directory written by :func:`write_artifacts`: (file name -> tensors, manifest)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CorruptArtifacts(f"{manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        checksums = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptArtifacts(f"{manifest_path} is unreadable ({type(exc).__name__})") from None
    files: dict[str, dict[str, Tensor]] = {}
    for file_name, expected in checksums.items():
        path = directory / file_name
        try:
            data = path.read_bytes()
        except OSError:
            raise CorruptArtifacts(f"{path} is missing") from None
        if _sha256(data) != expected:
            raise CorruptArtifacts(f"{path} fails its sha256 checksum")
        if load:
            try:
                files[file_name] = sorted_tensors(load_safetensors_bytes(data))
            except Exception as exc:  # a file that matches its checksum but does not parse: still a bad cache
                raise CorruptArtifacts(f"{path} does not parse ({type(exc).__name__})") from None
    return files, manifest


def sorted_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` in the order of their names: safetensors hands a file's tensors over in an order that changes
    from process to process, and nothing downstream may depend on it (reruns must be bit-identical)."""
    return dict(sorted(tensors.items()))


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Delete the staging (``.<name>.tmp-*``) and doomed (``.<name>.old-*``) folders that builds or removals
    killed half-way left in ``parent``, never one whose writer still runs (:mod:`bench.temporaries`)."""
    if not parent.is_dir():
        return []
    return remove_stale(sorted([*parent.glob(".*.tmp-*"), *parent.glob(".*.old-*")]))


def remove_artifacts(directory: Path) -> None:
    """Delete an artefact directory by first renaming it away, so no reader ever sees it half-deleted."""
    if not directory.exists():
        return
    doomed = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-{owner_tag()}.", dir=directory.parent))
    try:
        os.replace(directory, doomed / directory.name)
    except OSError:
        pass
    shutil.rmtree(doomed, ignore_errors=True)


def load_or_build_artifacts(
    directory: Path,
    label: str,
    expected_metadata: Mapping[str, Any],
    expected_files: set[str],
    build: Callable[[], tuple[dict[str, dict[str, Tensor]], dict[str, Any]]],
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Verified artefacts of an embedded suite's build cached at ``directory``, or ``build()`` written there.

    A cache that fails its checksums, was made by another build version or parameters, or lacks a file is
    reported in one warning line and rebuilt. The build runs on one thread: tiny matrices barely gain from a
    second one on an idle machine, on a shared one OpenMP workers spin waiting for each other (training ~20x
    slower), and one thread keeps the built weights independent of the machine's core count. Temporaries that
    killed builds left beside ``directory`` are removed first; each file's tensors come in the order of their
    names, whether loaded or just built. A file where the cache folder (or one above it) should be is an error
    (it is never deleted, nor built around).
    """
    if (blocker := file_in_the_way(directory)) is not None:
        problem = ("is a file, not a directory" if blocker == directory
                   else f"cannot be a directory: {blocker} is a file")
        raise BenchError(f"the {label} cache {directory} {problem}; remove it or pick another --cache (or BENCH_CACHE)")
    remove_stale_temporaries(directory.parent)
    if directory.exists():
        try:
            files, metadata = read_artifacts(directory)
            for name, value in expected_metadata.items():
                if metadata.get(name) != value:
                    raise CorruptArtifacts(f"its manifest's {name} is {metadata.get(name)!r}, expected {value!r}")
            if missing := sorted(expected_files - set(files)):
                raise CorruptArtifacts(f"its manifest lacks {missing[0]}")
            return files, metadata
        except CorruptArtifacts as problem:
            print(f"warning: {label} cache {directory} is unusable ({problem}); rebuilding it", file=sys.stderr)
            remove_artifacts(directory)
    with torch_threads(1):
        files, metadata = build()
    files = {file_name: sorted_tensors(tensors) for file_name, tensors in files.items()}
    try:
        write_artifacts(directory, files, metadata)
    except OSError as error:  # still usable, only not cached: say so and go on
        print(f"warning: cannot write the {label} cache {directory} ({error.strerror or error}); "
              "the next run will build it again", file=sys.stderr)
    return files, metadata
