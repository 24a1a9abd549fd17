"""The test-time methods' unlabeled pool holds positions, not inputs: its memory does not grow with the split.

The image splits here are stored as the vit suites' ``cache_inputs`` stores them: uint8 [N, 3, S, S] in a
memory-mapped ``.npy`` (:class:`suites.StoredImages`), normalised per batch by ``normalise_images``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toy_plugin import ToyParams, ToyProblem

from bench.adaptation import UnlabeledBatches
from bench.problem import MergeProblem
from suites._clip_classification import (
    ClipClassificationProblem,
    ClipHead,
    DataSplit,
    TaskData,
    VisionTransformer,
    VisionTransformerConfig,
)
from suites._clip_images import StoredImages, normalise_images

TESTS_DIR = Path(__file__).resolve().parent
CPU = torch.device("cpu")
IMAGE_SIZE = 32
TASK = "photos"
ADAMERGING_DRAWS, ADAMERGING_BATCH = 16_000, 16  # AdaMerging's defaults: 1,000 steps of 16 images per task
MiB = 2**20


def write_stored_split(path: Path, size: int) -> StoredImages:
    """``size`` random uint8 images in the memory-mapped layout that ``suites.store_images`` writes."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size, 3, IMAGE_SIZE, IMAGE_SIZE))
    rng = np.random.default_rng(size)
    for start in range(0, size, 4096):
        stop = min(start + 4096, size)
        array[start:stop] = rng.integers(0, 256, (stop - start, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    array.flush()
    del array
    return StoredImages(path)


def image_problem(images: StoredImages) -> ClipClassificationProblem:
    """A one-task CLIP problem adapting (transductively) on the stored split."""
    config = VisionTransformerConfig(image_size=IMAGE_SIZE, patch_size=16, width=8, layers=1, heads=2, embed_dim=4)
    encoder = VisionTransformer(config)
    weights = dict(encoder.state_dict())
    split = DataSplit(images, torch.arange(len(images)) % 10)
    class_embeddings = F.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    return ClipClassificationProblem(
        name="stored", encoder=encoder, pretrained=weights, expert_loader=lambda task: weights,
        heads={TASK: ClipHead(class_embeddings)}, data={TASK: TaskData(tuple("0123456789"), {"test": split})},
        prepare=normalise_images)


def whole_pool_batches(problem: MergeProblem, total: int, batch_size: int, seed: int) -> dict[str, list[torch.Tensor]]:
    """Every batch as the replaced code made them: all drawn inputs gathered and preprocessed up front, held in
    memory, and batches cut from seeded reshuffles of that pool."""
    num_batches = -(-total // batch_size)
    generator = torch.Generator().manual_seed(seed)
    batches = {}
    for task in problem.tasks:
        distinct = min(total, problem.unlabeled_size(task))
        pool = problem.unlabeled_inputs(task, problem.unlabeled_indices(task, distinct, seed))
        epochs = -(-num_batches * batch_size // distinct)
        order = torch.cat([torch.randperm(distinct, generator=generator) for _ in range(epochs)])
        batches[task] = [pool[order[b * batch_size : (b + 1) * batch_size]] for b in range(num_batches)]
    return batches


@pytest.mark.parametrize("total", [96, 500])  # fewer draws than examples, and several epochs of every example
def test_batches_equal_those_of_the_whole_pool_held_in_memory(total):
    problem = ToyProblem(ToyParams(num_tasks=3))
    expected = whole_pool_batches(problem, total, 16, seed=7)
    pool = UnlabeledBatches(problem, total, 16, seed=7, device=CPU)
    assert pool.distinct_per_task == min(total, 200)
    for task in problem.tasks:
        for index, batch in enumerate(expected[task]):
            assert torch.equal(pool.batch(task, index), batch), (task, index)


def test_stored_image_batches_are_gathered_and_normalised_per_batch_as_before(tmp_path):
    problem = image_problem(write_stored_split(tmp_path / "split.npy", 50))
    expected = whole_pool_batches(problem, 120, 16, seed=3)[TASK]  # 8 batches over 3 epochs of the 50 images
    pool = UnlabeledBatches(problem, 120, 16, seed=3, device=CPU)
    assert pool.num_batches == len(expected) == 8
    for index, batch in enumerate(expected):
        gathered = pool.batch(TASK, index)
        assert gathered.dtype == torch.float32 and torch.equal(gathered, batch), index
    assert torch.equal(pool.batch(TASK, 9), expected[1])  # the index is taken modulo the number of batches


def test_each_batch_is_read_once_while_it_is_the_latest(tmp_path):
    problem = image_problem(write_stored_split(tmp_path / "split.npy", 40))
    reads = []
    gather = problem.unlabeled_inputs

    def counted_gather(task: str, indices: torch.Tensor) -> torch.Tensor:
        reads.append(indices.tolist())
        return gather(task, indices)

    problem.unlabeled_inputs = counted_gather
    pool = UnlabeledBatches(problem, 64, 16, seed=0, device=CPU)
    assert reads == []  # building the pool reads no example
    first = pool.batch(TASK, 2)
    assert pool.batch(TASK, 2) is first and len(reads) == 1  # SAM's second pass on the same step
    pool.batch(TASK, 3)
    assert torch.equal(pool.batch(TASK, 2), first) and len(reads) == 3
    assert len(reads[0]) == 16 and reads[0] == pool.positions[TASK][32:48].tolist()


def anonymous_resident_bytes() -> int:
    """This process's resident anonymous memory (heap, not the pages of mapped files, which the kernel can drop)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measure_pool(path: str) -> dict[str, int]:
    """Run in a fresh process: anonymous memory grown by building an AdaMerging-sized pool over the stored split
    and reading every batch, the pool's own bytes, and (for scale) the growth from holding the whole pool."""
    problem = image_problem(StoredImages(Path(path)))
    problem.unlabeled_inputs(TASK, torch.arange(ADAMERGING_BATCH))  # warm up the gather and normalise paths
    before = anonymous_resident_bytes()
    pool = UnlabeledBatches(problem, ADAMERGING_DRAWS, ADAMERGING_BATCH, seed=0, device=CPU)
    for index in range(pool.num_batches):
        pool.batch(TASK, index)
    pool_growth = anonymous_resident_bytes() - before
    whole = problem.unlabeled_inputs(TASK, problem.unlabeled_indices(TASK, pool.distinct_per_task, seed=0))
    whole_growth = anonymous_resident_bytes() - before
    return {"pool_growth": pool_growth, "pool_nbytes": pool.nbytes, "whole_pool_growth": whole_growth,
            "whole_pool_nbytes": whole.nbytes, "distinct": pool.distinct_per_task}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from /proc (Linux)")
def test_pool_memory_does_not_grow_with_the_split(tmp_path):
    measured = {}
    for size in (2_000, 20_000):
        path = tmp_path / f"split-{size}.npy"
        write_stored_split(path, size)
        script = (f"import json, sys; sys.path.insert(0, {str(TESTS_DIR)!r}); "
                  f"from test_adaptation_pool import measure_pool; print(json.dumps(measure_pool({str(path)!r})))")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        measured[size] = json.loads(done.stdout.splitlines()[-1])
    small, large = measured[2_000], measured[20_000]
    # what the pool holds: one position per draw and the latest batch, the same for both splits
    image_bytes = 3 * IMAGE_SIZE**2
    assert small["pool_nbytes"] == large["pool_nbytes"] == ADAMERGING_DRAWS * 8 + ADAMERGING_BATCH * image_bytes * 4
    # the process's heap moves by allocator noise (0.3-2.5 MiB measured) for either split, while holding the
    # drawn inputs as the replaced pool did costs 23 MiB and 188 MiB, and the larger split alone is 59 MiB of uint8
    assert (small["distinct"], large["distinct"]) == (2_000, ADAMERGING_DRAWS)
    assert large["whole_pool_nbytes"] == ADAMERGING_DRAWS * image_bytes * 4
    assert large["whole_pool_growth"] > 0.9 * large["whole_pool_nbytes"]  # the measure does see held memory
    for size, values in measured.items():
        assert values["pool_growth"] < 8 * MiB, (size, values)
