"""How the peer comparisons call FusionBench (fusion-bench 0.2.33) and mergekit (0.1.5) on plain state dicts.

Each wrapper calls the peer's own code; where a peer's algorithm class needs a model pool of ``nn.Module``s it
gets one (:func:`clip_inputs.fusion_bench_pool`: ``CLIPVisionModel``s, or plain modules for a subset of keys),
and where the class only adds loading around a core function that takes state dicts (TSV-M, Iso-C/CTS, WUDI:
task vectors; slerp: the two models) the core function is called and the class's glue (``θ0 + α · merged``) is
written with FusionBench's own ``state_dict_arithmetic`` helpers. Consensus TA has no FusionBench class: see
:func:`fb_consensus`.
mergekit is called through its in-memory API ``mergekit.merge_methods.api.merge_state_dicts`` with the base
model as ``base``: the same per-tensor merge code its YAML-driven merges run.

Imported only inside the ``peers`` tox env (fusion_bench and mergekit are installed nowhere else).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch
from clip_inputs import StateDict, fusion_bench_pool, module_state


@contextlib.contextmanager
def quiet():
    """FusionBench prints progress lines for every key; keep them out of the test and speed-table output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ------------------------------------------------------------------------------------------------------------
# FusionBench


def fb_simple_average(experts: Sequence[StateDict]) -> StateDict:
    """``fusion_bench.method.simple_average.simple_average`` on state dicts (``state_dict_avg``)."""
    from fusion_bench.method.simple_average import simple_average

    return dict(simple_average(list(experts)))


def fb_task_arithmetic(base: StateDict, experts: Sequence[StateDict], scaling: float, blocks: int,
                       pool=None) -> StateDict:
    """``TaskArithmeticAlgorithm(scaling_factor).run(pool)`` on a pool of ``CLIPVisionModel``s."""
    from fusion_bench.method.task_arithmetic.task_arithmetic import TaskArithmeticAlgorithm

    pool = pool if pool is not None else fusion_bench_pool(base, experts, blocks)
    with quiet():
        return module_state(TaskArithmeticAlgorithm(scaling_factor=scaling).run(pool))


def fb_ties(base: StateDict, experts: Sequence[StateDict], *, k: float, merge: str, scaling: float,
            blocks: int, pool=None) -> StateDict:
    """``TiesMergingAlgorithm(scaling_factor, threshold=k, remove_keys=[], merge_func).run(pool)``."""
    from fusion_bench.method.ties_merging.ties_merging import TiesMergingAlgorithm

    pool = pool if pool is not None else fusion_bench_pool(base, experts, blocks)
    algorithm = TiesMergingAlgorithm(scaling_factor=scaling, threshold=k, remove_keys=[], merge_func=merge)
    with quiet():
        return module_state(algorithm.run(pool))


def fb_dare_task_arithmetic(base: StateDict, experts: Sequence[StateDict], *, p: float, scaling: float,
                            blocks: int, seed: int, pool=None) -> StateDict:
    """``DareTaskArithmetic(scaling_factor, sparsity_ratio=p, only_on_linear_weights=False, rescale=True)
    .run(pool)`` after ``torch.manual_seed(seed)`` (it draws its masks from the global RNG)."""
    from fusion_bench.method.dare.task_arithmetic import DareTaskArithmetic

    pool = pool if pool is not None else fusion_bench_pool(base, experts, blocks)
    algorithm = DareTaskArithmetic(scaling_factor=scaling, sparsity_ratio=p, only_on_linear_weights=False,
                                   rescale=True)
    torch.manual_seed(seed)
    with quiet():
        return module_state(algorithm.run(pool))


def fb_task_vectors(base: StateDict, experts: Sequence[StateDict]) -> list[StateDict]:
    """τ_i with FusionBench's ``state_dict_sub`` (what its model pools' ``load_pretrained_model_and_task_vectors``
    computes)."""
    from fusion_bench.utils.state_dict_arithmetic import state_dict_sub

    return [dict(state_dict_sub(expert, base)) for expert in experts]


def _fb_add_scaled(base: StateDict, merged: StateDict, scaling: float) -> StateDict:
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul

    return dict(state_dict_add(base, state_dict_mul(merged, scaling)))


def fb_tsv(base: StateDict, experts: Sequence[StateDict], *, alpha: float) -> StateDict:
    """``TSVM_utils.compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")``, then θ0 + α·merged
    (``TaskSingularVectorMerging.run`` with a float alpha)."""
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    with quiet():
        merged = compute_and_sum_svd_mem_reduction(fb_task_vectors(base, experts), accelerator="cpu")
    return _fb_add_scaled(base, merged, alpha)


def fb_iso_c(base: StateDict, experts: Sequence[StateDict], *, alpha: float) -> StateDict:
    """``iso_utils.iso_c(task_vectors, accelerator="cpu")``, then θ0 + α·merged
    (``IsotropicMergingInCommonSubspace.run``)."""
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c

    with quiet():
        merged = iso_c(fb_task_vectors(base, experts), accelerator="cpu")
    return _fb_add_scaled(base, merged, alpha)


def fb_iso_cts(base: StateDict, experts: Sequence[StateDict], *, alpha: float,
               common_space_fraction: float) -> StateDict:
    """``iso_utils.iso_cts(task_vectors, common_space_fraction, accelerator="cpu")``, then θ0 + α·merged
    (``IsotropicMergingInCommonAndTaskSubspace.run``)."""
    from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

    with quiet():
        merged = iso_cts(fb_task_vectors(base, experts), common_space_fraction=common_space_fraction,
                         accelerator="cpu")
    return _fb_add_scaled(base, merged, alpha)


def fb_tall_masks(base: StateDict, experts: Sequence[StateDict], *, tall_lambda: float):
    """FusionBench's port of the TALL-mask code, ``tall_mask.utils.generate_task_masks`` on the flattened
    models (``ties_merging_utils.state_dict_to_vector``: sorted keys): ``[K, N]`` bool masks
    ``|θ0 − θ_t| > λ_t·|θ0 + Σ_j τ_j − θ_t|``, plus the flat τ's and θ0 and a function back to state dicts."""
    from fusion_bench.method.tall_mask.utils import generate_task_masks
    from fusion_bench.method.ties_merging.ties_merging_utils import state_dict_to_vector, vector_to_state_dict

    flat_ptm = state_dict_to_vector(base)
    flat_ft = torch.vstack([state_dict_to_vector(expert) for expert in experts])
    tv_flat = flat_ft - flat_ptm
    with quiet():
        masks = generate_task_masks(tv_flat, flat_ft, flat_ptm, tall_mask_lambda=tall_lambda)
    return masks, tv_flat, flat_ptm, lambda vector: dict(vector_to_state_dict(vector, base))


def fb_consensus(base: StateDict, experts: Sequence[StateDict], *, k: int, tall_lambda: float,
                 scaling: float) -> StateDict:
    """Consensus TA from FusionBench's TALL-mask utilities: the masks of :func:`fb_tall_masks`, the consensus rule
    of ``tall_mask.utils.construct_consensus_mask`` (Σ_t mask_t ≥ k; that function reads masks from disk, so its
    two lines are applied here to the masks in memory), then θ0 + λ·(consensus ⊙ Σ τ_t) (the original repo's
    consensus TA; FusionBench 0.2.33 has no consensus algorithm class)."""
    masks, tv_flat, flat_ptm, to_state_dict = fb_tall_masks(base, experts, tall_lambda=tall_lambda)
    consensus = masks.float().sum(0) >= k
    return to_state_dict(flat_ptm + scaling * (consensus * tv_flat.sum(0)))


# ------------------------------------------------------------------------------------------------------------
# mergekit


def mk_merge(method: str, base: StateDict | None, experts: Sequence[StateDict], **parameters) -> StateDict:
    """``mergekit.merge_methods.api.merge_state_dicts`` with the experts as inputs 0..K-1 and, when given,
    ``base`` as the base input; ``parameters`` broadcast to every tensor (and every input)."""
    from mergekit.merge_methods.api import merge_state_dicts

    models: dict = {index: expert for index, expert in enumerate(experts)}
    if base is not None:
        models = {"base": base, **models}
    return merge_state_dicts(models, method, parameters=parameters, base="base" if base is not None else None)


# ------------------------------------------------------------------------------------------------------------
# FusionBench, wave-2 methods


def fb_model_stock(base: StateDict, experts: Sequence[StateDict], blocks: int | None, pool=None) -> StateDict:
    """``ModelStock().run(pool)`` (no ignored keys: its default ``ignore_keys`` are open_clip names)."""
    from fusion_bench.method.model_stock.model_stock import ModelStock

    pool = pool if pool is not None else fusion_bench_pool(base, experts, blocks)
    with quiet():
        return module_state(ModelStock().run(pool))


def fb_magmax(base: StateDict, experts: Sequence[StateDict], *, scaling: float, blocks: int | None,
              pool=None) -> StateDict:
    """``MagMaxAlgorithm(scaling_factor).run(pool)``."""
    from fusion_bench.method.magmax.magmax import MagMaxAlgorithm

    pool = pool if pool is not None else fusion_bench_pool(base, experts, blocks)
    with quiet():
        return module_state(MagMaxAlgorithm(scaling_factor=scaling).run(pool))


def fb_slerp(first: StateDict, second: StateDict, *, t: float) -> StateDict:
    """``slerp.slerp_on_state_dicts(t, primary, secondary)`` (what ``SlerpMergeAlgorithm.run`` calls on its two
    models' state dicts)."""
    from fusion_bench.method.slerp.slerp import slerp_on_state_dicts

    return dict(slerp_on_state_dicts(t, first, second))


def fb_wudi(base: StateDict, experts: Sequence[StateDict], *, steps: int) -> StateDict:
    """``wudi.wudi_merging(task_vectors, accelerator="cpu", iter_num=steps)`` + θ0 (``WUDIMerging.run``)."""
    from fusion_bench.method.wudi.wudi import wudi_merging
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add

    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        merged = wudi_merging(fb_task_vectors(base, experts), accelerator="cpu", iter_num=steps)
    return {key: value.detach() for key, value in state_dict_add(base, merged).items()}


def fb_doge_ta(base: StateDict, experts: Sequence[StateDict], *, subspace: int = 6, k: float = 30,
               lamda: float = 0.07, pool=None) -> StateDict:
    """``DOGE_TA_Algorithm(subspace, K, lamda).run(pool)`` on a pool of plain modules holding these keys (400
    Adam steps per merged layer are hard-coded there)."""
    from fusion_bench.method.doge_ta.doge_ta import DOGE_TA_Algorithm

    pool = pool if pool is not None else fusion_bench_pool(base, experts, None)
    with quiet():
        return module_state(DOGE_TA_Algorithm(subspace=subspace, K=k, lamda=lamda).run(pool))
