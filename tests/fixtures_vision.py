"""Tiny artefacts in the real on-disk formats of the ``vit`` suites, laid out as ``bench prepare`` leaves a cache.

- hf source: a tiny ``transformers.CLIPModel`` (with a tiny byte-level CLIP tokenizer) saved with
  ``save_pretrained`` under the pretrained repo's folder, and tiny ``CLIPVisionModel`` experts (perturbed copies of
  its vision tower) under the expert repos' folders;
- openclip source: a tiny open_clip config registered with ``open_clip.add_model_config``, its state dict as the
  cached ``open_clip_model.safetensors``, experts as ``finetuned.safetensors`` or as whole pickled modules of a
  task_vectors-like ``src.modeling.ImageEncoder`` class;
- datasets: ``datasets.Dataset`` splits with PIL images and class labels, saved with ``save_to_disk``.

Every folder gets its COMPLETE manifest, exactly as ``suites._hub.fetch`` writes it after a download.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from suites import _hub
from suites._torchvision_compat import ensure_torchvision_importable
from suites._vit_tasks import TASK_SPECS
from suites.vit import BACKBONES

ensure_torchvision_importable()

TINY_OPENCLIP = "tiny-vit-test"
BACKBONE = BACKBONES["vit-b-32"]


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet, each symbol also as a word end, plus the two special tokens (no merges)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    symbols = [chr(code) for code in printable] + [chr(256 + index) for index in range(len(others))]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + index for index, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_clip_config(image_size: int = 32, patch_size: int = 16):
    from transformers import CLIPConfig

    vocab = byte_level_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def save_hf_pretrained(cache: Path, seed: int = 0):
    """The pretrained CLIPModel + tokenizer at the folder of ``openai/clip-vit-base-patch32``; returns the model."""
    from transformers import CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config()).eval()
    folder = _hub.model_dir(cache, BACKBONE.hf_model)
    model.save_pretrained(folder)
    CLIPTokenizer(vocab=byte_level_vocab(), merges=[]).save_pretrained(folder)
    _hub.mark_complete(folder)
    return model


def save_hf_expert(cache: Path, task: str, pretrained, seed: int, scale: float = 0.02, image_size: int = 32,
                   hub_layout: bool = False) -> Path:
    """A CLIPVisionModel expert: the pretrained vision tower plus noise (or a differently shaped tower).

    ``save_pretrained`` of transformers 5 names the tensors ``embeddings...``; ``hub_layout`` rewrites them as the
    published experts (saved by transformers 4) have them, ``vision_model.embeddings...``.
    """
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionModel

    expert = CLIPVisionModel(tiny_clip_config(image_size=image_size).vision_config)
    if image_size == pretrained.config.vision_config.image_size:
        expert.load_state_dict(pretrained.vision_model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in expert.parameters():
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    folder = _hub.model_dir(cache, BACKBONE.hf_expert_prefix + TASK_SPECS[task].hf_expert)
    expert.save_pretrained(folder)
    if hub_layout:
        weights = folder / "model.safetensors"
        tensors = load_file(str(weights))
        save_file({f"vision_model.{k}": v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    _hub.mark_complete(folder)
    return folder


def random_images(n: int, generator: np.random.Generator, mode: str) -> list:
    """PIL images of assorted sizes (so resize and crop do something), grey or colour."""
    from PIL import Image

    images = []
    for _ in range(n):
        width, height = int(generator.integers(28, 48)), int(generator.integers(28, 48))
        channels = (height, width) if mode == "L" else (height, width, 3)
        images.append(Image.fromarray(generator.integers(0, 256, channels, dtype=np.uint8), mode=mode))
    return images


def save_dataset_split(cache: Path, task: str, split: str, n: int, seed: int) -> Path:
    """A ``save_to_disk`` split with the task's image and label columns (ClassLabel with its class count)."""
    import datasets

    spec = TASK_SPECS[task]
    generator = np.random.default_rng(seed)
    names = [str(index) for index in range(len(spec.class_names))]
    features = datasets.Features({spec.image_column: datasets.Image(), spec.label_column: datasets.ClassLabel(
        names=names)})
    data = {spec.image_column: random_images(n, generator, "L" if "mnist" in task else "RGB"),
            spec.label_column: generator.integers(0, len(names), n).tolist()}
    folder = _hub.dataset_dir(cache, spec.dataset, split, spec.config)
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(folder))
    _hub.mark_complete(folder)
    return folder


def save_datasets(cache: Path, tasks: list[str], n_test: int = 12, n_train: int = 16) -> None:
    for index, task in enumerate(tasks):
        spec = TASK_SPECS[task]
        save_dataset_split(cache, task, spec.test_split, n_test, seed=100 + index)
        save_dataset_split(cache, task, spec.train_split, n_train, seed=200 + index)


def hf_cache(cache: Path, tasks: list[str]) -> Path:
    """A complete hf-source cache for ``tasks``."""
    pretrained = save_hf_pretrained(cache)
    for index, task in enumerate(tasks):
        save_hf_expert(cache, task, pretrained, seed=index + 1, hub_layout=index == 0)
    save_datasets(cache, tasks)
    return cache


# -- open_clip ---------------------------------------------------------------------------------------------------


def register_tiny_openclip(config_dir: Path) -> str:
    """Register the tiny open_clip config (idempotent) and return its name."""
    import open_clip

    config = {"embed_dim": 16, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{TINY_OPENCLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(config_dir)
    return TINY_OPENCLIP


def tiny_openclip_model(seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(TINY_OPENCLIP, pretrained=None).eval()


def save_openclip_pretrained(cache: Path, model) -> Path:
    from safetensors.torch import save_file

    folder = _hub.model_dir(cache, BACKBONE.openclip_weights)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    _hub.mark_complete(folder)
    return folder


def perturbed_visual(model, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"visual.{k}": v + scale * torch.randn(v.shape, generator=generator)
            for k, v in model.visual.state_dict().items()}


def task_vectors_folder(cache: Path, task: str) -> Path:
    return Path(cache) / "task_vectors" / BACKBONE.openclip_arch / TASK_SPECS[task].task_vectors_name


def save_openclip_expert_safetensors(cache: Path, task: str, model, seed: int) -> Path:
    from safetensors.torch import save_file

    folder = task_vectors_folder(cache, task)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in perturbed_visual(model, seed).items()},
              str(folder / "finetuned.safetensors"))
    _hub.mark_complete(folder)
    return folder


def save_openclip_expert_pickle(cache: Path, task: str, model, seed: int) -> Path:
    """``finetuned.pt`` as task_vectors wrote it: ``torch.save`` of a whole ``src.modeling.ImageEncoder``.

    The class lives in a throw-away ``src.modeling`` module that is removed again, as on a machine without the
    task_vectors code, so loading must do without it.
    """
    import copy

    package, module = types.ModuleType("src"), types.ModuleType("src.modeling")

    class ImageEncoder(nn.Module):
        def __init__(self, clip_model: nn.Module) -> None:
            super().__init__()
            self.model = clip_model

    ImageEncoder.__module__ = "src.modeling"
    ImageEncoder.__qualname__ = "ImageEncoder"
    module.ImageEncoder = ImageEncoder
    package.modeling = module
    expert = copy.deepcopy(model)
    expert.visual.load_state_dict({k[len("visual."):]: v for k, v in perturbed_visual(model, seed).items()})
    folder = task_vectors_folder(cache, task)
    folder.mkdir(parents=True, exist_ok=True)
    sys.modules.update({"src": package, "src.modeling": module})
    try:
        torch.save(ImageEncoder(expert), folder / "finetuned.pt")
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]
    _hub.mark_complete(folder)
    return folder
