"""Reliability of runs (issue 12, defects 5, 7 and 8): bit-identical reruns in fresh processes, `--jobs` workers
that end with their parent, and no litter from killed writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import registry
from bench.lambda_merge import TaskVectorStack
from bench.runner import RunConfig, execute
from bench.store import write_json_atomic
from bench.temporaries import TAGGED, UNTAGGED_STALE_SECONDS, host_id, owner_tag
from suites import tiny8
from suites._clip_classification import load_or_build_artifacts, read_artifacts, write_artifacts

posix_only = pytest.mark.skipif(os.name != "posix", reason="process groups, pipes and pids as on POSIX")


@pytest.fixture(scope="module")
def tiny8_ci_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CI-sized tiny8 build (~20 s on 2 cores), shared by the module's tests; they only read it."""
    cache_dir = tmp_path_factory.mktemp("tiny8-cache")
    tiny8.build(tiny8.Tiny8Params(size="ci"), cache_dir, progress=False)
    return cache_dir


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not reaped by a PID 1 that never reaps, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"


# ------------------------------------------------------------------------------------------------------------
# Defect 5: reruns are bit-identical
# ------------------------------------------------------------------------------------------------------------

# Measurements of the run rather than results of the computation: they differ between any two runs.
VOLATILE = {"timings", "peak_memory", "environment", "created"}
VOLATILE_NOTES = {"seconds_per_step"}  # the adapt phase's wall clock per step

# Every method with hyperparameters small enough for seconds per run (their numbers are not the point here).
SHORT = {
    "adamerging_tw.steps": 3, "adamerging_lw.steps": 3,
    "samerging.num_batches": 2, "samerging.epochs": 2, "samerging_tw.num_batches": 2, "samerging_tw.epochs": 2,
    "fisher.num_samples": 8, "regmean.num_samples": 8,
    "expert_merging.steps": 3, "fw_merging.max_iters": 2, "fw_merging.dataset_size": 8,
    "m2n2.evaluations": 5, "m2n2.num_samples": 8, "tint.epochs": 2, "statsmerging.steps": 3, "statsmerging.hidden": 8,
}


def comparable(record: dict) -> dict[str, str]:
    """A record as {field path: JSON of the value} without the volatile fields (exact: floats by repr, NaN too)."""
    flat: dict[str, str] = {}

    def walk(value: object, path: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else key)
        else:
            flat[path] = json.dumps(value, sort_keys=True)

    walk({k: v for k, v in record.items() if k not in VOLATILE}, "")
    return {path: text for path, text in flat.items()
            if not (path.startswith("notes.") and path.split(".")[1] in VOLATILE_NOTES)}


def run_all_methods(cache: Path, results: Path, hash_seed: str) -> dict[str, dict]:
    argv = [sys.executable, "-m", "bench", "run", "--suite", "tiny8", "--set", "suite.size=ci", "--methods", "all",
            "--seeds", "0", "--device", "cpu", "--cache", str(cache), "--results", str(results),
            "--no-progress", "--no-report", *(f for name, value in SHORT.items() for f in ("--set", f"{name}={value}"))]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}  # set iteration order differs too
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "not applicable" not in done.stderr and "skipped" not in done.stderr, done.stderr
    records = {}
    for path in results.rglob("*.json"):
        record = json.loads(path.read_text())
        records[record["method"]] = record
    return records


def test_every_method_reruns_bit_identically_in_a_fresh_process(tiny8_ci_cache: Path, tmp_path: Path) -> None:
    """Two runs of every registered method, each in its own process (safetensors hands tensors over in another
    order in each), agree in every recorded field but the run's own measurements, to the last bit."""
    first = run_all_methods(tiny8_ci_cache, tmp_path / "first", "1")
    second = run_all_methods(tiny8_ci_cache, tmp_path / "second", "2")
    assert set(first) == set(second) == set(registry.methods())
    for method in sorted(first):
        one, two = comparable(first[method]), comparable(second[method])
        differing = sorted(path for path in one.keys() | two.keys() if one.get(path) != two.get(path))
        assert not differing, f"{method}: " + "; ".join(
            f"{path}: {one.get(path)} != {two.get(path)}" for path in differing[:5])


def test_task_vector_stack_gradient_does_not_depend_on_key_order() -> None:
    """Task-wise λ sums every tensor's contribution: summed in the loader's key order, it changed in the last
    bits from process to process."""
    generator = torch.Generator().manual_seed(0)
    names = [f"layer{i}.weight" for i in range(64)]
    base = {name: torch.randn(8, 8, generator=generator) * 10 ** (i % 7 - 3) for i, name in enumerate(names)}
    experts = [{name: tensor + torch.randn(8, 8, generator=generator) for name, tensor in base.items()}
               for _ in range(3)]

    def gradient(order: list[str]) -> torch.Tensor:
        stack = TaskVectorStack({k: base[k] for k in order}, [{k: e[k] for k in order} for e in experts])
        lambdas = torch.full((3,), 0.3, requires_grad=True)
        merged = stack.merge(lambdas)
        loss = sum((merged[k] ** 2).sum() for k in order)
        (grad,) = torch.autograd.grad(loss, lambdas)
        return grad

    reference = gradient(names)
    for seed in range(5):
        shuffled = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))]
        assert torch.equal(gradient(shuffled), reference)


def test_artefacts_come_back_in_the_order_of_their_names(tmp_path: Path) -> None:
    tensors = {name: torch.full((2,), float(i)) for i, name in enumerate(["b", "c", "a", "e", "d"])}
    write_artifacts(tmp_path / "art", {"w.safetensors": tensors}, {"suite": "test"})
    files, _ = read_artifacts(tmp_path / "art")
    assert list(files["w.safetensors"]) == ["a", "b", "c", "d", "e"]

    def build() -> tuple[dict, dict]:
        return {"w.safetensors": dict(tensors)}, {"suite": "test"}

    built, _ = load_or_build_artifacts(tmp_path / "other", "test", {"suite": "test"}, {"w.safetensors"}, build)
    assert list(built["w.safetensors"]) == ["a", "b", "c", "d", "e"]  # a fresh build hands them over the same way


# ------------------------------------------------------------------------------------------------------------
# Defect 7: --jobs workers end with their parent (tests/test_executors.py, with the pool that replaced them)
# ------------------------------------------------------------------------------------------------------------


def wait_for(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# ------------------------------------------------------------------------------------------------------------
# Defect 8: temporaries of killed writers are removed by the next run, never those of a live one
# ------------------------------------------------------------------------------------------------------------


def age(path: Path, seconds: float) -> Path:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))
    return path


def test_record_temporaries_name_their_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(Path(src).name), real_replace(src, dst)))
    write_json_atomic(tmp_path / "abc.json", {"x": 1})
    match = TAGGED.search(replaced[0])
    assert replaced[0].startswith(".abc.") and replaced[0].endswith(".tmp") and match
    assert (match["host"], int(match["pid"])) == (host_id(), os.getpid())


def test_a_run_removes_stale_record_temporaries_and_keeps_live_ones(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "toy" / "pretrained"
    folder.mkdir(parents=True)
    dead, mine = dead_pid(), os.getpid()
    old_untagged = folder / ".0123456789abcdef.k2j4h5g6.tmp"  # from before tags, and old
    stale = [folder / f".0123456789abcdef.{host_id()}-{dead}-x.abcd1234.tmp", old_untagged]  # a killed writer's
    live = [folder / f".fedcba9876543210.{owner_tag()}.efgh5678.tmp",  # this process: a live writer
            folder / f".0123456789abcdef.{'0' * 6 if host_id() != '0' * 6 else '1' * 6}-{dead}-x.ijkl9012.tmp",
            folder / ".0123456789abcdef.m3n4b5v6.tmp",  # untagged and recent: may be a live older writer's
            folder / "notes.txt"]
    if sys.platform.startswith("linux"):  # this pid with another start time: a recycled pid, the writer is gone
        stale.append(folder / f".0123456789abcdef.{host_id()}-{mine}-1.qrst3456.tmp")
    for path in [*stale, *live]:
        path.write_text('{"trunc')
    age(old_untagged, UNTAGGED_STALE_SECONDS + 60)
    execute(RunConfig(suite="toy", methods=["pretrained"], results_dir=tmp_path / "results", progress=False,
                      cache_dir=tmp_path / "cache"))
    assert not [path for path in stale if path.exists()]
    assert all(path.exists() for path in live)
    assert len(list(folder.glob("*.json"))) == 1  # the run itself wrote its record and no temporary


def test_a_cache_load_removes_stale_build_folders_and_keeps_live_ones(tmp_path: Path) -> None:
    dead = dead_pid()
    directory = tmp_path / "cache" / "demo-0123"
    directory.parent.mkdir()

    def folder(name: str, seconds_old: float = 0.0) -> Path:
        path = directory.parent / name
        path.mkdir()
        (path / "pretrained.safetensors").write_bytes(b"partial")
        return age(path, seconds_old) if seconds_old else path

    stale = [folder(f".demo-0123.tmp-{host_id()}-{dead}-x.abcd1234"),  # a build killed half-way
             folder(f".demo-0123.old-{host_id()}-{dead}-x.efgh5678"),  # a removal killed half-way
             folder(f".demo-4567.tmp-{host_id()}-{dead}-x.ijkl9012"),  # another build's
             folder(".demo-0123.tmp-k2j4h5g6", UNTAGGED_STALE_SECONDS + 60)]  # old, from before tags
    live = [folder(f".demo-0123.tmp-{owner_tag()}.mnop3456"),  # a live build (this process)
            folder(".demo-0123.tmp-q7w8e9r0")]  # untagged and recent

    def build() -> tuple[dict, dict]:
        return {"w.safetensors": {"w": torch.zeros(2)}}, {"suite": "demo"}

    load_or_build_artifacts(directory, "demo", {"suite": "demo"}, {"w.safetensors"}, build)
    assert not [path for path in stale if path.exists()]
    assert all(path.exists() for path in live)
    assert sorted(p.name for p in directory.parent.iterdir()) == sorted(["demo-0123", *(p.name for p in live)])


def test_tiny8_removes_stale_build_folders_on_a_cache_hit(tiny8_ci_cache: Path, tmp_path: Path) -> None:
    (built,) = [p for p in tiny8_ci_cache.iterdir() if p.name.startswith("tiny8-")]
    stale = tiny8_ci_cache / f".{built.name}.tmp-{host_id()}-{dead_pid()}-x.abcd1234"
    live = tiny8_ci_cache / f".{built.name}.tmp-{owner_tag()}.efgh5678"
    for path in (stale, live):
        path.mkdir()
    try:
        tiny8.build(tiny8.Tiny8Params(size="ci"), tiny8_ci_cache, progress=False)
        assert not stale.exists() and live.exists()
    finally:
        for path in (stale, live):
            if path.exists():
                path.rmdir()
