"""WUDI-Merging (Runxi Cheng, Feng Xiong, Yongxian Wei, Wanyun Zhu, Chun Yuan 2025, *Whoever Started the
Interference Should End It: Guiding Data-Free Model Merging via Task Vectors*, ICML 2025, arXiv:2503.08099).
Reference: FusionBench ``fusion_bench/method/wudi/wudi.py:wudi_merging`` and ``config/method/wudi/wudi.yaml``
(FB).

For every 2-D tensor (FB's rule: every ``ndim == 2`` entry of the state dict not in ``exclude_keys``, which is
empty by default; so positional embeddings are optimised too, and so is any matrix a suite lists in
``vector_params`` for the SVD methods, such as CLIP's ``*text_projection*``), with the K task vectors
τ_i ∈ ℝ^{out×in} and n_i = ‖τ_i‖_F²:

    τ_m ← Σ_i τ_i                                              (the start: the sum, not the mean)
    L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / n_i
    ∇L    = 2 (τ_m A − B),   A = Σ_i τ_iᵀ τ_i / n_i,   B = Σ_i τ_i τ_iᵀ τ_i / n_i
    τ_m ← Adam(lr, β = (0.9, 0.999), ε = 1e-8, no weight decay) on L, ``steps`` steps (``torch.optim.Adam``'s
          update, see :func:`adam_steps`)

Every other floating-point tensor gets τ_m = mean_i τ_i. θ = θ0 + τ_m, with no further scaling.

Defaults [steps = 400, lr = 1e-5]: FB's config (``iter_num: 400``; the function's own default is 300) and its
hard-coded Adam (lr 1e-5, weight_decay 0, torch's other defaults). FB's B/32 TA8 is 84.5 (methods-wave2.md).

How it differs from FB:

- FB differentiates the loss with autograd through K products (τ_m − τ_i) τ_iᵀ each step. Here the gradient is
  the closed form above, with A and B computed once per tensor, so a step costs one out×in×in product (or,
  when in > 2K·out, the same gradient as (τ_m Tᵀ) T − B with T = [τ_1/√n_1; …; τ_K/√n_K], 2K·out²·in). The
  Adam iterates are the same up to floating-point rounding, not bit for bit.
- An expert whose τ_i is exactly 0 on a tensor is left out of that tensor's loss (its term is 0/0); FB's loss,
  and so the merged tensor, becomes NaN there. If every τ_i is 0 the tensor stays at θ0.
- Arithmetic in fp32 (fp64 stays fp64) on ``device`` (the run's device); FB runs in the checkpoint's dtype on
  its accelerator. For fp16/bf16 checkpoints FB would run Adam in 16 bits; here it is fp32.

Deterministic: no randomness; on a CPU the result depends only on the inputs and torch's thread count (matmul
reductions are split by thread), so two runs with the same thread count are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method, require_range
from bench.tensorwise import TensorInputs, merge_tensorwise

GRADIENT_FORMS = ("auto", "gram", "stacked")


@dataclass(frozen=True)
class WudiParams:
    steps: int = param(400, "Adam steps per 2-D tensor (FB's iter_num)", low=0)
    lr: float = param(1e-5, "Adam learning rate", low=0.0)

    def __post_init__(self) -> None:
        require_range("wudi", "steps", self.steps, 0, None)
        require_range("wudi", "lr", self.lr, 0.0, None)


def wudi_loss(merged: Tensor, task_vectors: Sequence[Tensor]) -> Tensor:
    """L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F² over the non-zero τ_i (for checks and diagnostics)."""
    loss = merged.new_zeros(())
    for tau in task_vectors:
        norm = torch.linalg.vector_norm(tau) ** 2
        if norm > 0:
            loss = loss + ((merged - tau) @ tau.T).square().sum() / norm
    return loss


class WudiGradient:
    """∇L(τ_m) = 2 (τ_m A − B) for fixed task vectors, precomputed in the cheaper of two equivalent forms.

    ``form="gram"`` holds A = Σ_i G_i ∈ ℝ^{in×in} with G_i = τ_iᵀ τ_i / n_i, and B = Σ_i τ_i G_i;
    ``"stacked"`` holds T = [T_1; …; T_K] with T_i = τ_i / √n_i and uses τ_m A = (τ_m Tᵀ) T, B = Σ_i (τ_i T_iᵀ) T_i.
    ``"auto"`` picks "stacked" only when in > 2·K'·out (K' = the non-zero τ_i). Both forms compute B with the
    same products as τ_m A, so where the gradient is 0 in exact arithmetic because τ_m A = B term by term (one
    expert, or task vectors with τ_i τ_jᵀ = 0 and exactly representable products) it is exactly 0 here too.
    """

    def __init__(self, task_vectors: Sequence[Tensor], form: str = "auto") -> None:
        if form not in GRADIENT_FORMS:
            raise ValueError(f"form must be one of {GRADIENT_FORMS}, got {form!r}")
        used = [(tau, torch.linalg.vector_norm(tau) ** 2) for tau in task_vectors]
        used = [(tau, norm) for tau, norm in used if norm > 0]
        self.empty = not used
        if self.empty:
            return
        rows, cols = used[0][0].shape
        self.form = form if form != "auto" else ("stacked" if cols > 2 * len(used) * rows else "gram")
        if self.form == "gram":
            grams = [(tau.T @ tau) / norm for tau, norm in used]
            self.gram = sum(grams[1:], grams[0])
            self.target = sum((tau @ gram for (tau, _), gram in zip(used[1:], grams[1:], strict=True)),
                              used[0][0] @ grams[0])
        else:
            blocks = [tau / norm.sqrt() for tau, norm in used]
            self.stacked = torch.cat(blocks)
            products = [(tau @ block.T) @ block for (tau, _), block in zip(used, blocks, strict=True)]
            self.target = sum(products[1:], products[0])

    def __call__(self, merged: Tensor) -> Tensor:
        product = merged @ self.gram if self.form == "gram" else (merged @ self.stacked.T) @ self.stacked
        return product.sub_(self.target).mul_(2)


def adam_steps(start: Tensor, gradient: Callable[[Tensor], Tensor], *, steps: int, lr: float) -> Tensor:
    """``steps`` steps of Adam (β1 = 0.9, β2 = 0.999, ε = 1e-8, no weight decay, no AMSGrad) from ``start``.

    The update of ``torch.optim.Adam``'s single-tensor implementation, written out (it gives the same bits on a
    CPU and spares the optimizer's first-use import of ``torch._dynamo``, about a second):
    m ← lerp(m, g, 1 − β1); v ← β2 v + (1 − β2) g²; x ← x − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε).
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    param = start.clone()
    first, second = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, steps + 1):
        grad = gradient(param)
        first.lerp_(grad, 1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        denominator = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        param.addcdiv_(first, denominator, value=-step_size)
    return param


def wudi_matrix(task_vectors: Sequence[Tensor], *, steps: int, lr: float, form: str = "auto") -> Tensor:
    """τ_m for one 2-D tensor: Adam on L from Σ_i τ_i (see the module docstring)."""
    merged = torch.stack(list(task_vectors)).sum(dim=0)
    gradient = WudiGradient(task_vectors, form)
    if gradient.empty or steps == 0:
        return merged
    return adam_steps(merged, gradient, steps=steps, lr=lr)


def wudi_tensor(inputs: TensorInputs, *, steps: int, lr: float, device: torch.device | str = "cpu") -> Tensor:
    """θ for one key: θ0 + WUDI's τ_m on 2-D tensors, θ0 + mean_i τ_i elsewhere."""
    if inputs.base.ndim == 2:
        merged = wudi_matrix([tau.to(device) for tau in inputs.task_vectors], steps=steps, lr=lr).cpu()
    else:
        merged = torch.stack(inputs.task_vectors).sum(dim=0) / inputs.count
    return inputs.base + merged


def wudi_merge(
    base: StateDict,
    experts: Sequence[StateDict],
    *,
    steps: int,
    lr: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> StateDict:
    """θ0 + WUDI(θ_i − θ0) (see the module docstring). Deterministic: ``generator`` is unused."""
    return merge_tensorwise(base, experts, partial(wudi_tensor, steps=steps, lr=lr, device=device), generator=generator)


@register_method(
    "wudi",
    family="data-free",
    params=WudiParams,
    description="Adam from the task-vector sum to minimise each task's interference on its own task vector "
    "(Cheng et al. 2025)",
)
def merge(ctx: MergeContext, p: WudiParams) -> StateDict:
    return wudi_merge(ctx.pretrained(), ctx.experts(), steps=p.steps, lr=p.lr, device=ctx.device,
                      generator=ctx.generator)
