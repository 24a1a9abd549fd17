"""Shared inputs of the peer comparisons (``tox -e peers``): CLIP ViT-B/32 vision-tower state dicts.

Key names and shapes come from the installed transformers' ``CLIPVisionModel`` with the default
``CLIPVisionConfig`` (hidden 768, MLP 3072, patch 32, image 224: ViT-B/32), built on the meta device with only
``blocks`` transformer blocks (the embeddings, pre/post LayerNorms and ``blocks`` encoder layers: 16.6M
parameters for 2 blocks). The values are synthetic and seeded:

- θ0: LayerNorm weights 1 + 0.02·N(0, 1), everything else 0.02·N(0, 1);
- τ_i = s_i · (1e-3·N(0, 1) + a rank-4 component on matrices), with a different scale s_i per expert
  (``SCALES``), and θ_i = θ0 + τ_i in fp32.

Peers never import this package's methods: this file only builds inputs and wraps them for FusionBench's model
pools. The peers themselves are installed only in the ``peers`` tox env.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from suites._torchvision_compat import ensure_torchvision_importable

# transformers' model modules (and FusionBench, through them) import torchvision, whose CUDA-only 0.28.0 build
# fails beside the CPU torch unless its op schemas are defined first (see suites/_torchvision_compat.py).
ensure_torchvision_importable()

SCALES = (0.5, 1.0, 1.7, 2.9, 4.2)
"""Task-vector scale of expert i (K = 5 experts by default: 768 is not a multiple of 5, so TSV-M leaves slots)."""

StateDict = dict[str, torch.Tensor]

BLOCKS = 2
"""Transformer blocks of the ViT-B/32 vision tower in the test inputs (16.6M parameters per model)."""

SVD_KEYS = (
    "embeddings.class_embedding",
    "embeddings.patch_embedding.weight",  # 4-D: the mean task vector in TSV-M / Iso
    "embeddings.position_embedding.weight",  # 50 x 768: a wide matrix
    "pre_layrnorm.weight",
    "pre_layrnorm.bias",
    "encoder.layers.0.self_attn.q_proj.weight",  # 768 x 768
    "encoder.layers.0.self_attn.q_proj.bias",
    "encoder.layers.0.layer_norm1.weight",
    "encoder.layers.0.layer_norm1.bias",
    "encoder.layers.0.mlp.fc1.weight",  # 3072 x 768: a tall matrix
    "encoder.layers.0.mlp.fc1.bias",
    "post_layernorm.weight",
    "post_layernorm.bias",
)
"""The SVD methods' test inputs: one matrix of each shape class of the tower (SVDs of all 12 block matrices of
K experts take minutes on two cores), with the vectors and the 4-D kernel around them."""

LIGHT_DROP = ("encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc2.weight")
"""Left out of the light inputs (:func:`light_keys`): the two 2.4M-entry MLP matrices of block 0."""

ONE_LAYER_KEYS = (
    "embeddings.class_embedding",
    "embeddings.position_embedding.weight",
    "encoder.layers.0.self_attn.q_proj.weight",
    "encoder.layers.0.self_attn.q_proj.bias",
)
"""The optimising methods' inputs (WUDI, DOGE: hundreds of Adam steps per matrix): one encoder matrix, the
positional embedding (a 2-D non-encoder tensor) and two vectors."""

CANCEL_KEY = "encoder.layers.0.mlp.fc1.bias"
CANCEL_POSITIONS = (0, 1, 2, 3)
"""Planted sign cancellations: θ0 = 0.5, τ_0 = +0.25, τ_1 = −0.25, the other τ_i = 0 at these entries (exact
in fp32), so the trimmed task vectors sum to exactly 0 there while two of them are nonzero."""

TIE_KEY = "post_layernorm.bias"
TIE_POSITIONS = (0, 1, 2)
"""Planted TALL-mask ties for λ_t = 0.5: θ0 = 1, τ = (0.25, 0.5, 0, ..., 0), so task 0 has |τ_0| = 0.25 =
0.5·|Σ τ − τ_0| exactly."""


def clip_config(blocks: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(num_hidden_layers=blocks)


def clip_shapes(blocks: int = 2) -> dict[str, torch.Size]:
    """``{key: shape}`` of a ViT-B/32 ``CLIPVisionModel`` state dict with ``blocks`` encoder layers."""
    from transformers import CLIPVisionModel

    config = clip_config(blocks)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def _is_norm_weight(key: str) -> bool:
    return ("layrnorm" in key or "layernorm" in key or "layer_norm" in key) and key.endswith(".weight")


def make_models(blocks: int = 2, scales: Sequence[float] = SCALES, seed: int = 0) -> tuple[StateDict,
                                                                                          list[StateDict]]:
    """(θ0, [θ_1..θ_K]) on CLIP ViT-B/32 shapes (see the module docstring); deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    shapes = clip_shapes(blocks)
    base: StateDict = {}
    experts: list[StateDict] = [{} for _ in scales]
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator).mul_(0.02)
        base[key] = noise.add_(1.0) if _is_norm_weight(key) else noise
        for expert, scale in zip(experts, scales, strict=True):
            tau = torch.randn(shape, generator=generator).mul_(1e-3)
            if len(shape) == 2:
                left = torch.randn(shape[0], 4, generator=generator)
                right = torch.randn(4, shape[1], generator=generator)
                tau.add_(left @ right, alpha=2e-3 / (shape[0] * shape[1]) ** 0.25)
            expert[key] = base[key] + scale * tau
    return base, experts


def light_keys(keys) -> list[str]:
    """The embeddings (1-D, 4-D patch kernel, 2-D positions), the pre/post LayerNorms and block 0 without its MLP
    matrices (``LIGHT_DROP``): every kind of tensor of the tower, 3.6M entries per model, for the per-tensor
    methods that sort every tensor of every expert (breadcrumbs, DELLA)."""
    return [key for key in keys if ("layers." not in key or "layers.0." in key) and key not in LIGHT_DROP]


def subset(models: tuple[StateDict, list[StateDict]], keys) -> tuple[StateDict, list[StateDict]]:
    """(θ0, experts) restricted to ``keys``, inserted in that order."""
    base, experts = models
    return {key: base[key] for key in keys}, [{key: expert[key] for key in keys} for expert in experts]


def clone(state_dict: StateDict) -> StateDict:
    return {key: value.clone() for key, value in state_dict.items()}


def clip_module(state_dict: StateDict, blocks: int):
    """A ``CLIPVisionModel`` holding (copies of) these tensors: what FusionBench's model pools contain."""
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(clip_config(blocks))
    model.load_state_dict(clone(state_dict), assign=True, strict=True)
    # Non-persistent buffers (position ids) are not in the state dict: make them real tensors too.
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                if name == "position_ids":
                    module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                           persistent=False)
                else:
                    module.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype), persistent=False)
    return model


def holder_module(state_dict: StateDict) -> torch.nn.Module:
    """A plain ``nn.Module`` whose parameters are (copies of) these tensors under the same dotted names: for
    FusionBench pools of a subset of the tower's keys (a ``CLIPVisionModel`` needs all of them)."""
    root = torch.nn.Module()
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone()))
    return root


def fusion_bench_pool(base: StateDict, experts: Sequence[StateDict], blocks: int | None):
    """A FusionBench ``BaseModelPool``: ``_pretrained_`` and ``task_0..task_{K-1}``, each a ``CLIPVisionModel``
    with ``blocks`` blocks (or, with ``blocks=None``, a :func:`holder_module` of the given keys); copies, since
    FusionBench's algorithms modify the pool's models in place."""
    from fusion_bench.modelpool import BaseModelPool

    def build(state_dict: StateDict) -> torch.nn.Module:
        return holder_module(state_dict) if blocks is None else clip_module(state_dict, blocks)

    models = {"_pretrained_": build(base)}
    for index, expert in enumerate(experts):
        models[f"task_{index}"] = build(expert)
    return BaseModelPool(models)


def module_state(model) -> StateDict:
    """The merged tensors of a returned module, detached copies."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def replace_entries(models: tuple[StateDict, list[StateDict]], key: str, positions: Sequence[int],
                    base_value: float, deltas: Sequence[float]) -> tuple[StateDict, list[StateDict]]:
    """Copies of (θ0, experts) with θ0[key][positions] = base_value and θ_i = base_value + deltas[i] there
    (0 for the experts past ``deltas``); the other tensors are shared, not copied."""
    base, experts = models
    index = torch.tensor(list(positions))
    new_base = dict(base)
    new_base[key] = base[key].clone()
    new_base[key][index] = base_value
    new_experts = []
    for i, expert in enumerate(experts):
        new_expert = dict(expert)
        new_expert[key] = expert[key].clone()
        new_expert[key][index] = base_value + (deltas[i] if i < len(deltas) else 0.0)
        new_experts.append(new_expert)
    return new_base, new_experts
