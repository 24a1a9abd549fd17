"""Side-by-side merge speed, ours vs FusionBench 0.2.33 / mergekit 0.1.5, on the peer tests' CLIP inputs.

Run by ``tox -e peers`` after the equality tests (``python peers/bench_peers_speed.py [--blocks N]``). Every
merge runs ONCE on the same in-memory inputs (θ0 and K = 5 experts of the ViT-B/32 vision tower, 2 blocks by
default); each time is printed in seconds and as × the read-everything floor: the time to copy every input
tensor (θ0 and all experts) once into preallocated buffers (best of 3), i.e. what any merge must at least spend
reading its inputs. Building FusionBench's model pools (``CLIPVisionModel``s holding copies of the tensors) is
loading, not merging, and is outside the timed region; so is the copy our state dicts would need.
The SVD methods run on the tests' SVD subset without fc1 (their 3072×768 SVDs would dominate the whole run),
breadcrumbs and DELLA on the light subset, WUDI (50 steps) and DOGE-TA on the one-layer subset, slerp and
nuslerp on experts 0 and 4; each row's floor is that of the tensors it reads.
One run each on a shared machine: read the ratios as rough (±20%) and the big gaps as real.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import time
from collections.abc import Callable

import torch
from clip_inputs import (
    ONE_LAYER_KEYS,
    SCALES,
    SVD_KEYS,
    StateDict,
    fusion_bench_pool,
    light_keys,
    make_models,
    subset,
)
from peer_calls import (
    fb_consensus,
    fb_dare_task_arithmetic,
    fb_doge_ta,
    fb_iso_c,
    fb_iso_cts,
    fb_magmax,
    fb_model_stock,
    fb_simple_average,
    fb_slerp,
    fb_task_arithmetic,
    fb_ties,
    fb_tsv,
    fb_wudi,
    mk_merge,
)

from methods.consensus import consensus_merge
from methods.dare import dare_ta_merge, dare_ties_merge
from methods.iso import iso_c_merge, iso_cts_merge
from methods.task_arithmetic import task_arithmetic_merge
from methods.ties import ties_merge
from methods.tsv import tsv_merge
from methods.weight_averaging import weight_average

LAMBDA = 0.3


def read_floor(models: list[StateDict], repeats: int = 3) -> float:
    """Seconds to copy every tensor of ``models`` once into preallocated buffers (best of ``repeats``)."""
    buffers = [{key: torch.empty_like(value) for key, value in model.items()} for model in models]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for model, buffer in zip(models, buffers, strict=True):
            for key, value in model.items():
                buffer[key].copy_(value)
        best = min(best, time.perf_counter() - start)
    return best


def timed(run: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    result = run()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def input_sets(blocks: int) -> dict[str, tuple[StateDict, list[StateDict]]]:
    """The inputs of each row: the peer tests' sets (see ``peers/clip_inputs.py``)."""
    full = make_models(blocks, SCALES, seed=0)
    base, experts = full
    return {
        "full": full,
        "svd": subset(full, [key for key in SVD_KEYS if "fc1" not in key]),
        "light": subset(full, sorted(light_keys(base))),
        "one layer": subset(full, ONE_LAYER_KEYS),
        "pair": (base, [experts[0], experts[4]]),
    }


def read_models(name: str, models: tuple[StateDict, list[StateDict]]) -> list[StateDict]:
    """The state dicts a row reads: slerp reads the two experts only, everything else θ0 and the experts."""
    base, experts = models
    return list(experts) if name == "pair (slerp)" else [base, *experts]


def cases(sets, blocks: int):
    """(method, peer, peer function, input set, ours, theirs, setup) rows; ``setup`` builds what the peer call
    consumes outside the timed region (FusionBench's model pools)."""
    base, experts = sets["full"]
    svd_base, svd_experts = sets["svd"]
    light_base, light_experts = sets["light"]
    one_base, one_experts = sets["one layer"]
    pair = sets["pair"][1]

    def pool():
        return fusion_bench_pool(base, experts, blocks)

    def one_layer_pool():
        return fusion_bench_pool(one_base, one_experts, None)

    return [
        ("weight_averaging", "FusionBench", "simple_average(state dicts)", "full",
         lambda _: weight_average(base, experts), lambda _: fb_simple_average(experts), None),
        ("weight_averaging", "mergekit", "linear", "full",
         lambda _: weight_average(base, experts), lambda _: mk_merge("linear", None, experts, weight=1.0), None),
        ("task_arithmetic", "FusionBench", "TaskArithmeticAlgorithm.run", "full",
         lambda _: task_arithmetic_merge(base, experts, scaling=LAMBDA),
         lambda p: fb_task_arithmetic(base, experts, LAMBDA, blocks, pool=p), pool),
        ("task_arithmetic", "mergekit", "task_arithmetic", "full",
         lambda _: task_arithmetic_merge(base, experts, scaling=LAMBDA),
         lambda _: mk_merge("task_arithmetic", base, experts, weight=1.0, **{"lambda": LAMBDA}), None),
        ("ties (global k=20, sum)", "FusionBench", "TiesMergingAlgorithm.run", "full",
         lambda _: ties_merge(base, experts, k=20, trim_scope="global", merge="sum", scaling=LAMBDA),
         lambda p: fb_ties(base, experts, k=20, merge="sum", scaling=LAMBDA, blocks=blocks, pool=p), pool),
        ("ties (per-tensor k=20, mean)", "mergekit", "ties", "full",
         lambda _: ties_merge(base, experts, k=20, trim_scope="per_tensor", merge="mean", scaling=LAMBDA),
         lambda _: mk_merge("ties", base, experts, weight=1.0, density=0.2, **{"lambda": LAMBDA}), None),
        ("dare_ta (p=0.5, 1/(1-p))", "FusionBench", "DareTaskArithmetic.run", "full",
         lambda _: dare_ta_merge(base, experts, p=0.5, rescale="inverse_keep", scaling=LAMBDA, seed=0),
         lambda p: fb_dare_task_arithmetic(base, experts, p=0.5, scaling=LAMBDA, blocks=blocks, seed=0, pool=p),
         pool),
        ("dare_ta (p=0.5, L1)", "mergekit", "dare_linear", "full",
         lambda _: dare_ta_merge(base, experts, p=0.5, rescale="l1", scaling=LAMBDA, seed=0),
         lambda _: mk_merge("dare_linear", base, experts, weight=1.0, density=0.5, **{"lambda": LAMBDA}), None),
        ("dare_ties (p=0.5, L1, no trim)", "mergekit", "dare_ties", "full",
         lambda _: dare_ties_merge(base, experts, p=0.5, rescale="l1", k=100.0, trim_scope="global", merge="sum",
                                   scaling=LAMBDA, seed=0),
         lambda _: mk_merge("dare_ties", base, experts, weight=1.0, density=0.5, **{"lambda": LAMBDA}), None),
        ("consensus_ta (k=2, λt=0.6)", "FusionBench", "tall_mask.utils.generate_task_masks", "full",
         lambda _: consensus_merge(base, experts, k=2, tall_lambda=0.6, scaling=LAMBDA),
         lambda _: fb_consensus(base, experts, k=2, tall_lambda=0.6, scaling=LAMBDA), None),
        ("tsv_m", "FusionBench", "compute_and_sum_svd_mem_reduction", "svd",
         lambda _: tsv_merge(svd_base, svd_experts, alpha=1.0),
         lambda _: fb_tsv(svd_base, svd_experts, alpha=1.0), None),
        ("iso_c", "FusionBench", "iso_utils.iso_c", "svd",
         lambda _: iso_c_merge(svd_base, svd_experts, alpha=1.0),
         lambda _: fb_iso_c(svd_base, svd_experts, alpha=1.0), None),
        ("iso_cts (f=0.8)", "FusionBench", "iso_utils.iso_cts", "svd",
         lambda _: iso_cts_merge(svd_base, svd_experts, alpha=1.0, common_space_fraction=0.8),
         lambda _: fb_iso_cts(svd_base, svd_experts, alpha=1.0, common_space_fraction=0.8), None),
        ("model_stock (mean angle)", "FusionBench", "ModelStock.run", "full",
         lambda _: _wave2("model_stock").model_stock_merge(base, experts, cosine="mean_angle"),
         lambda p: fb_model_stock(base, experts, blocks, pool=p), pool),
        ("model_stock (mean cosine)", "mergekit", "model_stock", "full",
         lambda _: _wave2("model_stock").model_stock_merge(base, experts, cosine="mean_cosine"),
         lambda _: mk_merge("model_stock", base, experts), None),
        ("magmax", "FusionBench", "MagMaxAlgorithm.run", "full",
         lambda _: _wave2("magmax").magmax_merge(base, experts, scaling=0.5),
         lambda p: fb_magmax(base, experts, scaling=0.5, blocks=blocks, pool=p), pool),
        ("slerp (2 experts, t=0.3)", "FusionBench", "slerp_on_state_dicts", "pair (slerp)",
         lambda _: _wave2("slerp").slerp_merge(base, pair, t=0.3), lambda _: fb_slerp(pair[0], pair[1], t=0.3),
         None),
        ("slerp (2 experts, t=0.3)", "mergekit", "slerp", "pair (slerp)",
         lambda _: _wave2("slerp").slerp_merge(base, pair, t=0.3), lambda _: mk_merge("slerp", pair[0], [pair[1]],
                                                                                      t=0.3), None),
        ("nuslerp (2 experts, weights 1:3)", "mergekit", "nuslerp", "pair",
         lambda _: _wave2("nuslerp").nuslerp_merge(base, pair, weights=[1.0, 3.0]),
         lambda _: mk_merge("nuslerp", base, pair, weight=[1.0, 3.0]), None),
        ("breadcrumbs (density 0.1, γ 0.01)", "mergekit", "breadcrumbs", "light",
         lambda _: _wave2("breadcrumbs").breadcrumbs_merge(light_base, light_experts, density=0.1, gamma=0.01,
                                                           scaling=LAMBDA),
         lambda _: mk_merge("breadcrumbs", light_base, light_experts, weight=1.0, density=0.1, gamma=0.01,
                            **{"lambda": LAMBDA}), None),
        ("della (density 0.7, ε 0.15)", "mergekit", "della", "light",
         lambda _: _wave2("della").della_merge(light_base, light_experts, density=0.7, epsilon=0.15, scaling=1.0,
                                               generator=torch.Generator().manual_seed(0)),
         lambda _: mk_merge("della", light_base, light_experts, weight=1.0, density=0.7, epsilon=0.15), None),
        ("wudi (50 Adam steps)", "FusionBench", "wudi_merging", "one layer",
         lambda _: _wave2("wudi").wudi_merge(one_base, one_experts, steps=50, lr=1e-5),
         lambda _: fb_wudi(one_base, one_experts, steps=50), None),
        ("doge_ta (400 steps)", "FusionBench", "DOGE_TA_Algorithm.run", "one layer",
         lambda _: _wave2("doge_ta").doge_ta_merge(one_base, one_experts,
                                                   vector_params=["embeddings.position_embedding.weight"]),
         lambda p: fb_doge_ta(one_base, one_experts, pool=p), one_layer_pool),
    ]


def _wave2(name: str):
    """A wave-2 method module, imported when its row runs (``--only`` can skip one that is missing)."""
    return importlib.import_module(f"methods.{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks of the ViT-B/32 tower")
    parser.add_argument("--only", default="", help="comma-separated substrings of method names to run")
    args = parser.parse_args(argv)

    sets = input_sets(args.blocks)
    sets["pair (slerp)"] = sets["pair"]
    floors = {name: read_floor(read_models(name, models)) for name, models in sets.items()}

    print(f"\nPeer merge speed: θ0 + K = {len(sets['full'][1])} experts, CLIP ViT-B/32 vision tower "
          f"({args.blocks} blocks), fp32, CPU, {torch.get_num_threads()} threads, one run each")
    print("floor = copy every input tensor once (best of 3): " + "; ".join(
        f"{name} = {floors[name] * 1e3:.1f} ms ({len(read_models(name, models))} models x "
        f"{sum(t.numel() for t in models[0].values()) / 1e6:.2f}M)" for name, models in sets.items()) + "\n")
    print("| method | peer | peer function | inputs | ours (× floor) | theirs (× floor) | ours s | theirs s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    only = [part for part in args.only.split(",") if part]
    for method, peer, function, inputs, ours, theirs, setup in cases(sets, args.blocks):
        if only and not any(part in method for part in only):
            continue
        ours_s = timed(lambda ours=ours: ours(None))
        prepared = setup() if setup is not None else None
        theirs_s = timed(lambda theirs=theirs, prepared=prepared: theirs(prepared))
        del prepared
        floor = floors[inputs]
        print(f"| {method} | {peer} | `{function}` | {inputs} | {ours_s / floor:.1f} | {theirs_s / floor:.1f} | "
              f"{ours_s:.2f} | {theirs_s:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
