"""CLIP image encoders from checkpoint files: the tensors of their vision towers and the modules that run them.

Shared by the real ``vit`` suites and the bring-your-own image kind. Checkpoints are read safely: safetensors as
readers (one tensor at a time, :mod:`bench.model_pool`), torch files with ``weights_only=True``; a pickled
task_vectors checkpoint only through :func:`load_trusted_pickle`, which the suites call behind ``--trust-pickles``.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.errors import BenchError
from bench.model_pool import SafetensorsWeights, mapped
from bench.problem import StateDict

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OPENCLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_weights(folder: Path, names: Sequence[str]) -> Mapping[str, Tensor]:
    """The first of ``names`` present in ``folder``, as a reader when it is safetensors (also sharded): tensors
    are then read one at a time, never the whole checkpoint at once; a weights-only torch file is loaded."""
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            return SafetensorsWeights.open(path, str(path))
        return load_weights_only(path)
    raise BenchError(f"{folder} holds none of {', '.join(names)}; rerun `bench prepare` for it")


def read_weights(folder: Path, names: Sequence[str]) -> StateDict:
    """Every tensor of the first of ``names`` present in ``folder`` (see :func:`open_weights`)."""
    return dict(open_weights(folder, names).items())


def load_weights_only(path: Path) -> StateDict:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BenchError(f"{path} is not a plain tensor file ({first}); it is refused rather than unpickled") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # a truncated or damaged zip archive
        first = str(error).strip().splitlines()[0].split(". ")[0][:200] if str(error).strip() else ""
        raise BenchError(f"{path} is not a readable torch file ({first or type(error).__name__}); the file is "
                         "truncated or damaged: download or write it again") from None
    if not isinstance(loaded, dict):
        raise BenchError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return loaded.get("state_dict", loaded)


def as_float32(tensors: StateDict) -> StateDict:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def hf_vision_tensors(raw: Mapping[str, Tensor], skip: Iterable[str], what: str) -> Mapping[str, Tensor]:
    """A CLIP vision tower's tensors under ``vision_model.`` as float32, without non-persistent buffers.

    Hub checkpoints (``CLIPModel`` and ``CLIPVisionModel`` saved by transformers 4) name them
    ``vision_model.embeddings...``; ``CLIPVisionModel`` saved by transformers 5 drops the prefix. Nothing else is
    filtered: a missing, extra or reshaped tensor is left for :func:`check_compatible` to name.
    """
    if any(k.startswith("vision_model.") for k in raw):
        names = {k: k for k in raw if k.startswith("vision_model.")}
    elif "embeddings.patch_embedding.weight" in raw:
        names = {f"vision_model.{k}": k for k in raw}
    else:
        raise BenchError(f"{what} holds no CLIP vision tower (no 'vision_model.*' or 'embeddings.*' tensors)")
    skip = set(skip)
    return mapped(raw, {new: old for new, old in names.items() if new not in skip}, cast=torch.float32)


class PickleStandIn(nn.Module):
    """Stands in for classes of task_vectors' ``src.modeling`` (and anything else missing) while unpickling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            if "_modules" in state or "_parameters" in state:
                nn.Module.__setstate__(self, state)
            else:
                self.__dict__.update(state)


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "src" or module.startswith("src."):
            return type(name, (PickleStandIn,), {"__module__": module})
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (PickleStandIn,), {"__module__": module})


_STAND_IN_PICKLE = types.SimpleNamespace(Unpickler=_StandInUnpickler, load=pickle.load, __name__="pickle")


def load_trusted_pickle(path: Path) -> StateDict:
    """A whole pickled module (task_vectors' ``finetuned.pt``) as its state dict. Only after an explicit opt-in."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_STAND_IN_PICKLE)
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways; report one line
        raise BenchError(f"cannot unpickle {path}: {type(error).__name__}: {error}".splitlines()[0]) from None
    if isinstance(loaded, nn.Module):
        return loaded.state_dict()
    if isinstance(loaded, dict):
        return loaded.get("state_dict", loaded)
    raise BenchError(f"{path} holds a {type(loaded).__name__}, neither a module nor a state dict")


def openclip_visual_tensors(raw: Mapping[str, Tensor], what: str) -> Mapping[str, Tensor]:
    """``visual.*`` tensors of an open_clip model wherever they sit (``model.visual.``, ``visual.``, or bare)."""
    anchor = next((k for k in raw if k == "visual.conv1.weight" or k.endswith(".visual.conv1.weight")), None)
    if anchor is not None:
        prefix = anchor[: -len("conv1.weight")]
    elif "conv1.weight" in raw:
        prefix = ""
    else:
        raise BenchError(f"{what} holds no open_clip image encoder (no 'visual.conv1.weight' tensor)")
    return mapped(raw, {"visual." + k[len(prefix):]: k for k in raw if k.startswith(prefix)}, cast=torch.float32)




class HFClipImageEncoder(nn.Module):
    """transformers' CLIP vision tower plus the pretrained visual projection; parameter names as CLIPVisionModel."""

    def __init__(self, vision_config: Any, projection_dim: int) -> None:
        super().__init__()
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel(vision_config)
        self.vision_model = getattr(tower, "vision_model", tower)  # transformers 4 wraps the tower, 5 does not
        self.visual_projection = nn.Linear(vision_config.hidden_size, projection_dim, bias=False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class OpenClipImageEncoder(nn.Module):
    """open_clip's ``model.visual`` under the name ``visual`` (its output is already projected)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)


@dataclass
class LoadedBackbone:
    """A built encoder with its pretrained weights, what stays frozen, and how to embed prompts."""

    encoder: nn.Module
    pretrained: StateDict  # merged keys only
    frozen: StateDict  # the encoder's other parameters and buffers (projection, position ids)
    image_size: int
    logit_scale: float
    encode_text: Callable[[list[str]], Tensor]  # prompts -> unnormalised text embeddings
    identity: str  # digest of the pretrained artefact (part of the head cache key)
    expert_reader: Callable[[str], StateDict]  # task -> raw expert tensors


def frozen_tensors(encoder: nn.Module, merged: Iterable[str], overrides: StateDict) -> StateDict:
    """Every parameter and buffer of ``encoder`` that is not merged, from ``overrides`` when given there."""
    merged = set(merged)
    everything = {**dict(encoder.named_parameters()), **dict(encoder.named_buffers())}
    return {k: overrides.get(k, v).detach().clone() for k, v in everything.items() if k not in merged}


def non_persistent_buffers(encoder: nn.Module) -> set[str]:
    return {name for name, _ in encoder.named_buffers()} - set(encoder.state_dict())


def full_clip_model(folder: Path, config: Any, model_cls: Any, raw: StateDict) -> nn.Module:
    """The whole pretrained CLIPModel (text tower included) on the head device, for encoding prompts."""
    model = model_cls(config)
    missing, _ = model.load_state_dict(as_float32(raw), strict=False)  # old files also hold position_ids buffers
    missing = [k for k in missing if k not in non_persistent_buffers(model)]
    if missing:
        raise BenchError(f"checkpoint in {folder} lacks tensor '{missing[0]}'")
    return model.eval().to(head_device())


def head_device() -> torch.device:
    """Heads are computed once and cached; a GPU makes the thousands of prompts of vit20 quick."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
