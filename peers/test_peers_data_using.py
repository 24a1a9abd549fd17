"""Our data-using merges RegMean++ and FW-Merging (hard) against FusionBench 0.2.33's own code on identical tiny
inputs (``tox -e peers``). Both methods need a model forward, so the problems are tiny: RegMean++ runs on
:class:`data_using_calls.ToyTower` (a 2-layer CLIP-shaped tower, width 8, MLP 16, 3 experts, 32 examples × 4
tokens per task); FW-Merging's selection and update steps are compared on given gradients and candidates.
Each test names the FusionBench function it calls and what it compares.
"""

from __future__ import annotations

import pytest
import torch
from data_using_calls import buffer_module, fb_regmean_plusplus, linear_inputs, tower, toy_models
from peer_calls import quiet

from methods.fw_merging import alignment_table, fw_step, fw_update, select_candidates
from methods.regmean import gram_matrices, regmean_merge, shrink_off_diagonal
from methods.regmean_pp import regmean_plusplus

ALPHA = 0.95
TASKS = 3
POST_NORM = ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias")


def toy_inputs(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 4, 8, generator=generator) for _ in range(TASKS)]


def ours_regmean_pp(experts, inputs, alpha: float = ALPHA):
    return regmean_plusplus(experts, lambda p, t, probe: linear_inputs(p, inputs[t][:1] if probe else inputs[t]),
                            alpha)


# ------------------------------------------------------------------------------------------------------------
# RegMean++


def test_regmean_pp_shrink_matches_fusion_bench_reduce_non_diagonal():
    """``fusion_bench.method.regmean_plusplus.regmean_plusplus.reduce_non_diagonal_elements(G, α)`` vs our
    ``shrink_off_diagonal(G, α)`` on a float64 Gram matrix. Off the diagonal FusionBench multiplies by α *rounded
    to float32* (its factor matrix is built from ``torch.ones`` in float32), so its entries are exactly
    G·float32(α) and ours G·α: that difference, and nothing else, is asserted bit for bit. On the diagonal both
    keep G up to one rounding (FusionBench: G·(float32(1 − α) + float32(α)); ours: αG + (1 − α)G)."""
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import reduce_non_diagonal_elements

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gram = x.T @ x
    peer = reduce_non_diagonal_elements(gram, ALPHA)
    ours = shrink_off_diagonal(gram, ALPHA)
    off = ~torch.eye(6, dtype=torch.bool)
    alpha32 = torch.tensor(ALPHA, dtype=torch.float32).double()
    assert torch.equal(peer[off], gram[off] * alpha32)
    assert torch.equal(ours[off], gram[off] * ALPHA)
    assert not torch.equal(peer[off], ours[off])  # the float32 rounding of α is visible in float64
    assert torch.allclose(peer.diagonal(), ours.diagonal(), rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    assert torch.allclose(ours.diagonal(), gram.diagonal(), rtol=2 * torch.finfo(torch.float64).eps, atol=0)


def test_regmean_pp_layer_merge_matches_fusion_bench_on_same_grams():
    """``fusion_bench.method.regmean_plusplus.regmean_plusplus.merging_with_regmean_weights`` (its per-layer
    merge: RegMean on the weights with Gram matrices, the mean elsewhere) vs our ``regmean_merge`` on the same
    experts' layer-0 parameters and the same float64 Gram matrices XᵀX of our hooked inputs. Non-linear
    parameters (mean, float32 on both sides): bit-identical. Linear weights (handed to FusionBench in float64,
    as ours computes): FusionBench inverts Σ G̃_i (``torch.inverse``) and
    multiplies, in float64 here, we solve; with FusionBench's float32(α) (see the test above) both are the same
    least-squares solution, so they must agree within 1e-6 relative to max |W| after both round to float32
    (on these inputs they are in fact bit-identical; float64 inverse-vs-solve noise could flip a float32 rounding)."""
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import merging_with_regmean_weights

    _, experts = toy_models(TASKS, seed=0)
    inputs = toy_inputs()
    prefix = "vision_model.encoder.layers.0."
    layer_keys = [key for key in experts[0] if key.startswith(prefix)]
    grams = [gram_matrices({k: v for k, v in linear_inputs(expert, x).items() if k.startswith(prefix)})
             for expert, x in zip(experts, inputs, strict=True)]
    peer = merging_with_regmean_weights(
        {key[len(prefix):]: [expert[key].double() if key in grams[0] else expert[key] for expert in experts]
         for key in layer_keys},
        [{key[len(prefix):-len(".weight")]: g for key, g in gram.items()} for gram in grams],
        reduce_non_diagonal_ratio=ALPHA, weight_transpose=True)
    alpha32 = float(torch.tensor(ALPHA, dtype=torch.float32))
    ours = regmean_merge([{key: expert[key] for key in layer_keys} for expert in experts], grams, alpha32)
    assert set(peer) == {key[len(prefix):] for key in ours}
    for key in layer_keys:
        peer_value = peer[key[len(prefix):]].float()
        if key.endswith("fc1.weight") or key.endswith("fc2.weight"):
            assert (ours[key] - peer_value).abs().max() <= 1e-6 * peer_value.abs().max(), key
        else:
            assert torch.equal(ours[key], peer_value), key


def test_regmean_pp_whole_merge_matches_fusion_bench_run():
    """``RegMeanAlgorithmForCLIPPlusPlus.run`` (FusionBench's whole RegMean++ loop: embeddings and pre-norm
    averaged first, each layer's Gram matrices hooked from the expert's layer on the outputs of the already
    merged layers, ``merging_with_regmean_weights``, the merged layer forwarded to give the next layer's inputs),
    on :class:`ToyTower`s with the CLIP processor / dataloader / Fabric parts replaced (``data_using_calls``), vs
    our ``regmean_plusplus`` with the same experts, inputs and α.
    - Embeddings, pre-norm, LayerNorms and biases inside the layers (means): bit-identical.
    - Linear weights: within 1e-4 relative to max |W| per tensor (FusionBench averages its Gram matrices over
      tokens and works in float32 with ``torch.inverse``; ours XᵀX in float64 with a solve; the observed gap is
      about 2e-5). That this tolerance discriminates: plain RegMean (each expert's own inputs, ``regmean_merge``
      on the experts' Grams) misses FusionBench's second-layer weights by more than 100 times it.
    - ``post_layernorm``: the documented difference: FusionBench leaves it at θ0, ours takes the experts' mean."""
    base, experts = toy_models(TASKS, seed=0)
    inputs = toy_inputs()
    with quiet():
        peer = fb_regmean_plusplus(base, experts, inputs, ALPHA)
    ours = ours_regmean_pp(experts, inputs)
    assert set(ours) == set(peer)
    linear = {key for key in ours if key.endswith(("fc1.weight", "fc2.weight"))}
    for key in ours:
        if key in linear:
            assert (ours[key] - peer[key]).abs().max() <= 1e-4 * peer[key].abs().max(), key
        elif key in POST_NORM:
            assert torch.equal(peer[key], base[key]), key
            assert torch.equal(ours[key], torch.stack([expert[key] for expert in experts]).mean(dim=0)), key
        else:
            assert torch.equal(ours[key], peer[key]), key
    plain = regmean_merge(experts, [gram_matrices(linear_inputs(expert, x)) for expert, x in
                                    zip(experts, inputs, strict=True)], ALPHA)
    key = "vision_model.encoder.layers.1.fc2.weight"
    assert (plain[key] - peer[key]).abs().max() > 100 * 1e-4 * peer[key].abs().max()


def test_regmean_pp_toy_tower_forward_is_the_layer_loop():
    """Guard of the harness itself: :func:`data_using_calls.linear_inputs` hooks the same forward FusionBench
    steps through layer by layer (``pre_layrnorm(embeddings(x))`` then ``layer(h)[0]``), so both sides' Gram
    matrices come from one model definition."""
    base, _ = toy_models(1, seed=0)
    model, x = tower(base), toy_inputs()[0]
    vision = model.vision_model
    h = vision.pre_layrnorm(vision.embeddings(x))
    captured = linear_inputs(base, x)
    assert list(captured) == [f"vision_model.encoder.layers.{i}.{name}.weight" for i in range(2)
                              for name in ("fc1", "fc2")]
    assert torch.equal(captured["vision_model.encoder.layers.0.fc1.weight"],
                       vision.encoder.layers[0].layer_norm1(h).detach().reshape(-1, 8))


# ------------------------------------------------------------------------------------------------------------
# FW-Merging (hard). FusionBench's ``FrankWolfeHardAlgorithm.run`` cannot run here: it moves the model to CUDA
# unconditionally (``.cuda()``) and takes its gradient through CLIP's zero-shot head on image datasets, so its
# step functions are called one by one on the same gradients and candidates, and its loop is replayed with them.
# Its models are :func:`data_using_calls.buffer_module`s (tensors held as buffers): with ordinary parameters its
# ``task_arithmetic_merge`` raises in 0.2.33 (see test_fusion_bench_fw_task_arithmetic_merge_rejects_parameters).

S, ETA = 0.3, 0.1


def fb_frank_wolfe_hard():
    from fusion_bench.method.fw_merging.fw_hard import FrankWolfeHardAlgorithm

    return FrankWolfeHardAlgorithm(merge_fn="task_arithmetic", step_size=ETA, max_iters=10, dataset_size=100,
                                   scaling_factor=S)


def fw_candidates(seed: int = 0):
    """θ0, the experts and the candidate list ours uses (experts in task order, then θ_init = θ0 + s·Στ_i) with
    FusionBench's names for them (``task_i`` …, then ``initial``, its dict order)."""
    from fusion_bench.method.fw_merging.fw_hard import task_arithmetic_merge

    base, experts = toy_models(TASKS, seed)
    merged = task_arithmetic_merge(buffer_module(base), [buffer_module(e) for e in experts], scaling_factor=S)
    start = {key: value.detach().clone() for key, value in merged.state_dict().items()}
    names = [f"task_{i}" for i in range(TASKS)] + ["initial"]
    return base, experts, start, [*experts, start], names


def random_gradient(keys, like, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(like[key].shape, generator=generator) for key in keys}


def test_fusion_bench_fw_task_arithmetic_merge_rejects_parameters():
    """The reason for ``buffer_module``: ``fw_hard.task_arithmetic_merge`` on modules holding ``nn.Parameter``s
    (as ``FrankWolfeHardAlgorithm.run`` calls it, for θ_init and for every update) raises in 0.2.33, because its
    last ``state_dict_add(pretrained.state_dict(keep_vars=True), task_vector)`` type-checks Parameter against
    Tensor."""
    from fusion_bench.method.fw_merging.fw_hard import task_arithmetic_merge

    base, experts = toy_models(TASKS, 0)
    with pytest.raises(TypeError, match="Tensor type mismatch"):
        task_arithmetic_merge(tower(base), [tower(e) for e in experts], scaling_factor=S)


def test_fw_start_matches_fusion_bench_task_arithmetic_merge():
    """``fusion_bench.method.fw_merging.fw_hard.task_arithmetic_merge(θ0, experts, s)`` (FusionBench's θ_init)
    vs our ``task_arithmetic_start``: bit-identical (both sum the task vectors in task order, scale, add θ0)."""
    from methods.fw_merging import task_arithmetic_start

    base, experts, start, _, _ = fw_candidates()
    keys = sorted(base)
    ours = task_arithmetic_start(base, experts, keys, S, {key: torch.float32 for key in keys})
    for key in keys:
        assert torch.equal(ours[key], start[key]), key


def test_fw_selection_model_granularity_matches_fusion_bench():
    """``FrankWolfeHardAlgorithm.frank_wolfe_selection(g, checkpoints, [], type="task")`` (FusionBench's "task"
    granularity = our ``model``) vs our ``alignment_table`` + ``select_candidates(·, "model")`` on 12 random
    gradients with the same candidates (the experts, then ``initial``). The chosen candidate is the same every
    time (and at least two different candidates get chosen across the gradients); each candidate's sum of
    per-tensor cosines agrees within 1e-5 (FusionBench: float32, ours: float64)."""
    algorithm = fb_frank_wolfe_hard()
    base, _, _, candidates, names = fw_candidates()
    keys = sorted(base)
    chosen = set()
    for seed in range(12):
        gradient = random_gradient(keys, base, seed)
        _, peer_name, _, peer_sums = algorithm.frank_wolfe_selection(
            gradient, {name: buffer_module(c) for name, c in zip(names, candidates, strict=True)}, [], type="task")
        table = alignment_table(gradient, candidates, keys)
        choice = select_candidates(table, "model")
        assert names[int(choice[0])] == peer_name, seed
        assert torch.allclose(table.sum(dim=1), torch.tensor([peer_sums[n] for n in names], dtype=torch.float64),
                              atol=1e-5, rtol=0)
        chosen.add(peer_name)
    assert len(chosen) >= 2


def test_fw_selection_layer_granularity_matches_fusion_bench():
    """``FrankWolfeHardAlgorithm.frank_wolfe_selection(g, checkpoints, {key: []}, type="layer")`` vs our
    ``select_candidates(·, "layer")``: the same candidate for every tensor, on 6 random gradients; the
    candidate tensors FusionBench returns are the chosen candidates' own (``torch.equal``)."""
    algorithm = fb_frank_wolfe_hard()
    base, _, _, candidates, names = fw_candidates()
    keys = sorted(base)
    for seed in range(6):
        gradient = random_gradient(keys, base, 100 + seed)
        peer_model, peer_names, _, _ = algorithm.frank_wolfe_selection(
            gradient, {name: buffer_module(c) for name, c in zip(names, candidates, strict=True)},
            {key: [] for key in keys}, type="layer")
        choice = select_candidates(alignment_table(gradient, candidates, keys), "layer")
        assert [names[int(c)] for c in choice] == [peer_names[key] for key in keys], seed
        for p, key in enumerate(keys):
            assert torch.equal(peer_model[key], candidates[int(choice[p])][key]), key


def test_fw_step_size_matches_fusion_bench_within_one_ulp():
    """γ_t: FusionBench's ``run`` computes ``(2 / (t + 2) * step_size) * scaling_factor``, our ``fw_step``
    ``scaling_factor * step_size * 2 / (t + 2)``: the same number up to the association of the products, at
    most one ulp apart for t = 0 … 9 (and equal for t = 0, 1, 2, 4, 6)."""
    import math

    for t in range(10):
        peer = 2 / (t + 2) * ETA * S
        assert abs(fw_step(t, ETA, S) - peer) <= math.ulp(peer), t
        if t in (0, 1, 2, 4, 6):
            assert fw_step(t, ETA, S) == peer, t


def test_fw_update_matches_fusion_bench_task_arithmetic_merge():
    """FusionBench's update ``task_arithmetic_merge(θ, [θ_m*], scaling_factor=γ)`` (θ + γ(θ_m* − θ)) vs our
    ``fw_update(θ, candidates, keys, choice, γ)`` with the same γ and choice: bit-identical, for one candidate
    for the whole model and for a different one per tensor."""
    from fusion_bench.method.fw_merging.fw_hard import task_arithmetic_merge

    base, experts, start, candidates, _ = fw_candidates()
    keys = sorted(base)
    theta = {key: 0.5 * (start[key] + experts[1][key]) for key in keys}
    gamma = 2 / (3 + 2) * ETA * S
    for choice in (torch.full((len(keys),), 2), torch.arange(len(keys)) % len(candidates)):
        vertex = {key: candidates[int(choice[p])][key] for p, key in enumerate(keys)}
        peer = task_arithmetic_merge(buffer_module(theta), [vertex], scaling_factor=gamma).state_dict()
        ours = fw_update(theta, candidates, keys, choice, gamma)
        for key in keys:
            assert torch.equal(ours[key], peer[key]), key


def test_fw_loop_matches_fusion_bench_steps_replayed():
    """Ten iterations of our ``frank_wolfe`` vs FusionBench's ``run`` loop replayed with its own step functions
    (``frank_wolfe_selection``, then ``task_arithmetic_merge`` with γ = ``2/(t+2) * step_size * scaling_factor``),
    both from FusionBench's θ_init and with the gradient of ½‖θ − target‖² (a fixed random target) in place of the
    CLIP cross-entropy, for both granularities: the same candidate choices in every iteration (they change across
    iterations here) and bit-identical final weights. (The γ's one-ulp float64 differences, see above, vanish:
    a float32 tensor times a Python float computes with the scalar rounded to float32.)"""
    from fusion_bench.method.fw_merging.fw_hard import task_arithmetic_merge

    from methods.fw_merging import frank_wolfe

    algorithm = fb_frank_wolfe_hard()
    base, _, start, candidates, names = fw_candidates()
    keys = sorted(base)
    target = random_gradient(keys, base, 7)

    def gradient_fn(_t, theta):
        return {key: theta[key] - target[key] for key in keys}

    for granularity, peer_type in (("model", "task"), ("layer", "layer")):
        ours, choices = frank_wolfe(start, candidates, keys, gradient_fn, max_iters=10, step_size=ETA,
                                    scaling_factor=S, granularity=granularity)
        merged = buffer_module(start)
        checkpoints = {name: buffer_module(c) for name, c in zip(names, candidates, strict=True)}
        for t in range(10):
            theta = {key: value.detach().clone() for key, value in merged.state_dict().items()}
            exclude = [] if peer_type == "task" else {key: [] for key in keys}
            vertex, picked, _, _ = algorithm.frank_wolfe_selection(gradient_fn(t, theta), checkpoints, exclude,
                                                                   type=peer_type)
            picked = [picked] * len(keys) if peer_type == "task" else [picked[key] for key in keys]
            assert [names[int(c)] for c in choices[t]] == picked, (granularity, t)
            merged = task_arithmetic_merge(merged, [vertex], scaling_factor=2 / (t + 2) * ETA * S)
        peer = merged.state_dict()
        assert len({tuple(c.tolist()) for c in choices}) >= 2, granularity
        for key in keys:
            assert torch.equal(ours[key], peer[key]), (granularity, key)


def test_fw_zero_gradient_tensor_documented_difference():
    """A tensor whose gradient is all zero (``frank_wolfe_selection`` as above; our module docstring: "a cosine
    whose denominator is 0 counts as 0; the reference yields NaN"). Model granularity: FusionBench's cosine is NaN
    for every candidate, so every sum is NaN, ``NaN < inf`` is false and it selects *no* candidate (``None``,
    which its next update cannot use); ours counts 0 and selects the same candidate as FusionBench does when
    that tensor is left out of its sums. Layer granularity: FusionBench keeps the first candidate seen for that
    tensor (``task_0``: later ``NaN < NaN`` is false), ours the lowest index among equal zeros: the same; the
    other tensors' choices agree as well."""
    algorithm = fb_frank_wolfe_hard()
    base, _, _, candidates, names = fw_candidates()
    keys = sorted(base)
    zero_key = "vision_model.encoder.layers.0.fc1.weight"
    gradient = random_gradient(keys, base, 3)
    gradient[zero_key] = torch.zeros_like(gradient[zero_key])
    checkpoints = {name: buffer_module(c) for name, c in zip(names, candidates, strict=True)}
    table = alignment_table(gradient, candidates, keys)
    assert torch.equal(table[:, keys.index(zero_key)], torch.zeros(len(candidates), dtype=torch.float64))

    _, peer_name, _, peer_sums = algorithm.frank_wolfe_selection(gradient, checkpoints, [], type="task")
    assert peer_name is None and all(torch.isnan(torch.tensor(v)) for v in peer_sums.values())
    others = [key for key in keys if key != zero_key]
    without = {name: buffer_module({key: c[key] for key in others}) for name, c in zip(names, candidates, strict=True)}
    _, peer_without, _, _ = algorithm.frank_wolfe_selection(gradient, without, [], type="task")
    assert names[int(select_candidates(table, "model")[0])] == peer_without

    _, peer_names, _, _ = algorithm.frank_wolfe_selection(gradient, checkpoints, {key: [] for key in keys},
                                                          type="layer")
    choice = select_candidates(table, "layer")
    assert peer_names[zero_key] == "task_0" == names[int(choice[keys.index(zero_key)])]
    assert [names[int(c)] for c in choice] == [peer_names[key] for key in keys]
