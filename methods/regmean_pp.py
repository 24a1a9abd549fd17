"""RegMean++ (Nguyen et al., 2025), "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for
Model Merging", arXiv 2508.03121; reference: FusionBench ``method/regmean_plusplus``.

RegMean (``methods/regmean.py``) takes the Gram matrices of every linear layer's inputs from each expert run on
its own. RegMean++ merges the network block by block, in forward order, and takes block b's inputs from the
*merged* model's earlier blocks: for block b and task i, the parameters fed forward are

    θ^(b,i)[k] = θ_merged[k]   if k lies outside every block or in a block before b    (already merged)
               = θ_i[k]        if k lies in block b or later                             (task i's own)

and for every linear weight W of block b, with X_i^b its inputs under θ^(b,i) on n examples of task i:

    G_i = X_iᵀ X_i,   G̃_i = α G_i + (1 − α) diag(G_i),   Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ

(RegMean's closed form, imported from ``methods/regmean.py``). Every other parameter (biases, norms, embeddings)
is the mean of the experts, as in RegMean. [n = 256, α = 0.95: FusionBench's config.] Examples come from each
task's training split (labels unused).

Generalisation to the suites' ``linear_inputs(params, task, inputs)`` API (no per-block forward exists): a block
is the set of parameters whose name shares the prefix up to its first all-digit component (``…resblocks.3``,
``transformer.h.3``, ``encoder.block.3``); the blocks are ordered by when their linear layers first appear in
``linear_inputs``'s result (the order their forward hooks fire). A linear weight whose name has no such component
is a block of its own; every other parameter outside the blocks (embeddings, pre- and post-norms, projections) is
"outside" and is taken merged (the mean) from the start. Block b's Gram matrices come from one full forward of
θ^(b,i) per task, so the method costs (number of blocks) × (number of tasks) forwards of n examples instead of
RegMean's one per task; the inputs of block b are recomputed through the merged blocks rather than propagated
block by block (the same numbers, in exact arithmetic). ``granularity=layer`` (not in the reference) makes every
linear weight a stage of its own, in forward order: layer l's inputs then come from the merged linear layers
before it, also within its block, while the block's other parameters (norms, biases) stay the expert's own until
the block's last linear layer is merged; it costs (number of linear layers) × (number of tasks) forwards.

Deliberate differences from the reference:
- FusionBench leaves CLIP's ``post_layernorm`` at θ0 (its merge covers only the embeddings and the encoder
  layers); here every non-linear parameter, inside or outside the blocks, is the mean of the experts, as in RegMean.
- The Gram matrices are XᵀX (not divided by the token count, as ``methods/regmean.py``); with the same number of
  examples per task this only differs where tasks have different numbers of (real) tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bench.problem import MergeContext, StateDict
from bench.registry import param, register_method
from methods.regmean import gram_matrices, regmean_merge


@dataclass(frozen=True)
class RegMeanPlusPlusParams:
    num_samples: int = param(256, "examples per task for the Gram matrices", low=1)
    alpha: float = param(0.95, "off-diagonal scaling α of each Gram matrix (1: plain least squares)", low=0.0,
                         high=1.0)
    granularity: str = param("block", "merge a block (the reference) or one linear layer at a time",
                             choices=("block", "layer"))


def block_of(key: str) -> str | None:
    """The block a parameter belongs to: its name up to the first all-digit component, None if it has none."""
    parts = key.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return None


def merge_stages(linear_keys: Iterable[str], granularity: str = "block") -> list[list[str]]:
    """The linear weights in forward order (``linear_keys`` in the order they fire), grouped into stages: one per
    block (``block``) or one per weight (``layer``)."""
    if granularity == "layer":
        return [[key] for key in linear_keys]
    stages: dict[str, list[str]] = {}
    for key in linear_keys:
        stages.setdefault(block_of(key) or key, []).append(key)
    return list(stages.values())


def stage_index(keys: Iterable[str], stages: Sequence[Sequence[str]]) -> dict[str, int]:
    """Each parameter's stage: a linear weight's own; another parameter of a block, the last stage holding one of
    the block's linear weights (so it is the expert's own while any of them is merged); −1 outside the blocks."""
    own, by_block = {}, {}
    for index, stage in enumerate(stages):
        for key in stage:
            own[key] = index
            by_block[block_of(key) or key] = index  # stages come in order: the last one wins
    return {key: own[key] if key in own else by_block.get(block_of(key) or "", -1) for key in keys}


def hybrid_params(merged: Mapping[str, Tensor], expert: Mapping[str, Tensor], stages_of: Mapping[str, int],
                  stage: int) -> StateDict:
    """θ^(b,i): merged parameters outside the blocks and in blocks before ``stage``, the expert's from it on."""
    return {key: merged[key] if stages_of[key] < stage else expert[key] for key in expert}


def mean_of(experts: Sequence[Mapping[str, Tensor]], keys: Iterable[str]) -> StateDict:
    return {key: torch.stack([expert[key] for expert in experts]).mean(dim=0) for key in keys}


LinearInputs = Callable[[StateDict, int, bool], Mapping[str, Tensor]]


def regmean_plusplus(
    experts: Sequence[Mapping[str, Tensor]], linear_inputs: LinearInputs, alpha: float, granularity: str = "block"
) -> StateDict:
    """The RegMean++ merge of ``experts`` (task order). ``linear_inputs(params, i, probe)`` maps each linear weight
    to its inputs [N, in] on task i's examples (only the first one when ``probe``: that call only finds the
    forward order, which fixes the stages)."""
    with torch.no_grad():
        stages = merge_stages(linear_inputs(dict(experts[0]), 0, True).keys(), granularity)
    linear = {key for stage in stages for key in stage}
    merged = mean_of(experts, [key for key in experts[0] if key not in linear])
    stages_of = stage_index(experts[0].keys(), stages)
    for index, stage in enumerate(stages):
        grams = []
        for task, expert in enumerate(experts):
            hybrid = hybrid_params(merged, expert, stages_of, index)
            with torch.no_grad():
                captured = linear_inputs(hybrid, task, False)
            grams.append(gram_matrices({key: captured[key] for key in stage}))
            del captured
        merged.update(regmean_merge([{key: expert[key] for key in stage} for expert in experts], grams, alpha))
    return {key: merged[key] for key in experts[0]}


@register_method("regmean_pp", family="data-using", params=RegMeanPlusPlusParams, data="labeled",
                 budget=lambda p: p.num_samples, memory="stacked",
                 needs=("linear_inputs", "labeled_data"),
                 description="RegMean++: RegMean block by block, each block's inputs from the merged earlier blocks")
def merge(ctx: MergeContext, p: RegMeanPlusPlusParams) -> StateDict:
    problem = ctx.problem
    inputs = [problem.labeled(task, p.num_samples, ctx.seed)[0] for task in ctx.tasks]
    experts = [{k: v.to(ctx.device) for k, v in problem.expert(task).items()} for task in ctx.tasks]
    ctx.note_held("experts", experts)

    def linear_inputs(params: StateDict, task: int, probe: bool) -> dict[str, Tensor]:
        return problem.linear_inputs(params, ctx.tasks[task], inputs[task][:1] if probe else inputs[task])

    with ctx.adapt_phase():
        merged = regmean_plusplus(experts, linear_inputs, p.alpha, p.granularity)
    return {key: value.cpu() for key, value in merged.items()}
