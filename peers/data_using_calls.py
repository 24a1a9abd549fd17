"""Tiny problems for the peer comparisons of the data-using merges (``tox -e peers``): RegMean++ and FW-Merging.

FusionBench's RegMean++ (``RegMeanAlgorithmPlusPlus.run``) walks a CLIP vision tower layer by layer;
:class:`ToyTower` has the attribute names it reads (``vision_model.embeddings``, ``.pre_layrnorm``,
``.encoder.layers``, ``.post_layernorm``) and layers called as CLIP's are (``layer(x, attention_mask=None,
causal_attention_mask=None)[0]``), at toy sizes. :class:`ToyRegMeanPlusPlus` is FusionBench's own CLIP subclass
with only the CLIP-processor / dataloader parts replaced: the first layer's inputs are the merged embeddings of
the task's tensor (no image processor), there is no zero-shot head, and Lightning Fabric's ``setup`` is the
identity (one CPU process). Everything else (the run loop, the Gram hooks, the per-layer merge, the embedding
merge, the key prefixes) is FusionBench's code.

Imported only inside the ``peers`` tox env.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bench.problem import StateDict
from suites._torchvision_compat import ensure_torchvision_importable

# FusionBench imports torchvision through transformers (see peers/clip_inputs.py).
ensure_torchvision_importable()

WIDTH, HIDDEN, LAYERS = 8, 16, 2


class ToyEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift


class ToyLayer(nn.Module):
    """x + fc2(gelu(fc1(LayerNorm(x)))), returned as a 1-tuple like CLIP's encoder layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x: Tensor, attention_mask=None, causal_attention_mask=None) -> tuple[Tensor]:
        return (x + self.fc2(torch.nn.functional.gelu(self.fc1(self.layer_norm1(x)))),)


class ToyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ToyLayer() for _ in range(LAYERS)])


class ToyVision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = ToyEmbeddings()
        self.pre_layrnorm = nn.LayerNorm(WIDTH)
        self.encoder = ToyEncoder()
        self.post_layernorm = nn.LayerNorm(WIDTH)


class ToyTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_model = ToyVision()

    def forward(self, x: Tensor) -> Tensor:
        vision = self.vision_model
        h = vision.pre_layrnorm(vision.embeddings(x))
        for layer in vision.encoder.layers:
            h = layer(h)[0]
        return vision.post_layernorm(h)


def toy_models(tasks: int, seed: int) -> tuple[StateDict, list[StateDict]]:
    """θ0 (a random :class:`ToyTower`, LayerNorm affine parameters perturbed too) and ``tasks`` experts
    θ0 + 0.3·noise (every parameter), all float32."""
    generator = torch.Generator().manual_seed(seed)
    model = ToyTower()
    base = {key: torch.randn(value.shape, generator=generator) * 0.5 + (1.0 if key.endswith("norm1.weight")
            or key.endswith("layrnorm.weight") or key.endswith("layernorm.weight") else 0.0)
            for key, value in model.state_dict().items()}
    experts = [{key: value + 0.3 * torch.randn(value.shape, generator=generator) for key, value in base.items()}
               for _ in range(tasks)]
    return base, experts


def tower(state: StateDict) -> ToyTower:
    model = ToyTower()
    model.load_state_dict(state)
    return model


def linear_inputs(params: StateDict, inputs: Tensor) -> dict[str, Tensor]:
    """Each ``nn.Linear`` weight of a :class:`ToyTower` with ``params`` → its inputs [N·T, in] on ``inputs``
    [N, T, WIDTH], in the order the layers fire (the suites' ``linear_inputs`` contract)."""
    model = tower(params)
    captured: dict[str, Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(_module, args, _output, name=name):
                captured[f"{name}.weight"] = args[0].detach().reshape(-1, args[0].shape[-1])
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return captured


class _IdentityFabric:
    def setup(self, module):
        return module


def fb_regmean_plusplus(base: StateDict, experts: Sequence[StateDict], inputs: Sequence[Tensor],
                        alpha: float) -> StateDict:
    """``RegMeanAlgorithmForCLIPPlusPlus.run`` on :class:`ToyTower`s (see the module docstring for the parts
    replaced), ``reduce_non_diagonal_ratio = alpha``, all of each task's ``inputs`` as one batch."""
    from fusion_bench.method.regmean_plusplus.clip_regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import RegMeanAlgorithmPlusPlus
    from fusion_bench.modelpool import BaseModelPool

    class ToyRegMeanPlusPlus(RegMeanAlgorithmForCLIPPlusPlus):
        fabric = _IdentityFabric()
        # In 0.2.33 the CLIP subclass's plain-dict ``_config_mapping`` hides the bidict that ``auto_register_config``
        # gave the base class, and constructing it fails ("'dict' object has no attribute 'inverse'"): restore it.
        _config_mapping = RegMeanAlgorithmPlusPlus._config_mapping.copy()

        def on_regmean_start(self):  # no zero-shot classification head (unused by the merge)
            pass

        def get_input_for_first_layer(self, model, train_dataset):
            with torch.no_grad():
                return [model.vision_model.pre_layrnorm(model.vision_model.embeddings(train_dataset)).detach()]

    names = [f"task_{index}" for index in range(len(experts))]
    models = {"_pretrained_": tower(base), **{name: tower(expert) for name, expert in zip(names, experts, strict=True)}}
    pool = BaseModelPool(models)
    datasets = dict(zip(names, inputs, strict=True))
    pool.load_train_dataset = lambda name, *args, **kwargs: datasets[name]
    algorithm = ToyRegMeanPlusPlus(num_regmean_examples=max(len(x) for x in inputs), exclude_param_names_regex=[],
                                   reduce_non_diagonal_ratio=alpha, weight_transpose=True, dataloader_kwargs={})
    merged = algorithm.run(pool)
    return {key: value.detach().clone() for key, value in merged.state_dict().items()}


def buffer_module(state_dict: StateDict) -> nn.Module:
    """A plain ``nn.Module`` holding copies of these tensors as *buffers* under the same dotted names. FusionBench
    0.2.33's ``fw_hard.task_arithmetic_merge`` adds ``state_dict(keep_vars=True)`` (``nn.Parameter``s for a normal
    module) to plain tensors, which its strict ``state_dict_add`` rejects ("Tensor type mismatch … expected
    Parameter, got Tensor"); with buffers, ``keep_vars`` yields plain tensors and the same arithmetic runs."""
    root = nn.Module()
    for name, tensor in state_dict.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, tensor.detach().clone())
    return root
