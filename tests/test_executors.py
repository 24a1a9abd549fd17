"""Executors (issue 11): the same records whoever runs the jobs (this process, a `--jobs` pool, Ray), `--resume`
submitting nothing recorded, a worker killed mid-job retried with no record lost or doubled, Ctrl-C keeping what
finished, the one-line errors of the executor flags. The Ray tests start real local Ray instances
(``bench run --executor ray`` starts one; one test starts a cluster with ``ray start --head``), as the README's
commands do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability_runs import alive, comparable, posix_only, wait_for

from bench.cli import main
from suites import tiny8

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra (pip install 'merge-bench[ray]')")

# Fisher and RegMean with small sample budgets: a data-free + data-using grid of seconds per job.
TINY8_GRID = ["--methods", "pretrained,task_arithmetic,ties,fisher,regmean", "--seeds", "0,1",
              "--set", "suite.size=ci", "--set", "fisher.num_samples=16", "--set", "regmean.num_samples=16"]
TOY = ["--suite", "toy", "--methods", "pretrained,task_arithmetic,ties"]


@pytest.fixture(scope="module")
def tiny8_ci_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache_dir = tmp_path_factory.mktemp("tiny8-cache")
    tiny8.build(tiny8.Tiny8Params(size="ci"), cache_dir, progress=False)
    return cache_dir


def bench(env: dict, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def records_of(results: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(results.rglob("*.json"))}


def same_records(one: dict[str, dict], two: dict[str, dict]) -> None:
    assert one.keys() == two.keys()
    for name in one:
        a, b = comparable(one[name]), comparable(two[name])
        differing = sorted(path for path in a.keys() | b.keys() if a.get(path) != b.get(path))
        assert not differing, f"{one[name]['method']}: " + "; ".join(
            f"{path}: {a.get(path)} != {b.get(path)}" for path in differing[:5])


def test_ray_grid_on_tiny8_gives_the_local_executors_records(tiny8_ci_cache: Path, tmp_path: Path) -> None:
    env = {**os.environ, "BENCH_CACHE": str(tiny8_ci_cache)}
    common = ["run", "--suite", "tiny8", *TINY8_GRID, "--no-progress", "--no-report"]
    local = bench(env, *common, "--results", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    distributed = bench(env, *common, "--results", str(tmp_path / "ray"), "--executor", "ray")
    assert distributed.returncode == 0, distributed.stderr
    assert "running 12 job(s) on Ray (a local Ray instance; 1 CPU and 0 GPU per job)" in distributed.stderr
    assert "12 run(s) computed, 0 already recorded" in distributed.stderr
    ours, theirs = records_of(tmp_path / "local"), records_of(tmp_path / "ray")
    assert len(ours) == 2 * 6  # 5 methods and the individual reference row, 2 seeds
    same_records(ours, theirs)
    for record in theirs.values():  # which node, process and device produced each record
        where = record["environment"]
        assert where["executor"] == "ray" and where["device"] == "cpu" and where["gpu_ids"] == []
        assert where["node_ip"] and where["ray_node_id"] and where["host"] and where["pid"] != os.getpid()
    assert {record["environment"]["executor"] for record in ours.values()} == {"local"}


def test_ray_resume_submits_nothing_already_recorded(tmp_path: Path, plugin_env: dict) -> None:
    results = tmp_path / "results"
    common = ["run", *TOY, "--results", str(results), "--no-progress", "--no-report", "--executor", "ray"]
    first = bench(plugin_env, *common, "--seeds", "0")
    assert first.returncode == 0, first.stderr
    assert "running 4 job(s) on Ray" in first.stderr  # the individual reference row first, then 3 methods
    before = {path: path.read_bytes() for path in results.rglob("*.json")}

    second = bench(plugin_env, *common, "--seeds", "0,1", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resume: 3 of 6 configurations already recorded, skipping them" in second.stderr
    assert "running 4 job(s) on Ray" in second.stderr  # seed 1's reference row and its 3 methods only
    assert all(path.read_bytes() == text for path, text in before.items())  # recorded ones were not rerun
    assert len(list(results.rglob("*.json"))) == 8

    third = bench(plugin_env, *common, "--seeds", "0,1", "--resume")
    assert third.returncode == 0, third.stderr
    assert "running" not in third.stderr and "0 run(s) computed, 6 already recorded" in third.stderr


def test_a_worker_killed_mid_job_has_its_job_retried_once_recorded(tmp_path: Path, plugin_env: dict) -> None:
    """``crash_once`` SIGKILLs the worker process running it the first time (tests/crash_plugin.py): Ray sees a
    worker die mid-task, retries the task on another worker, and the driver records every job exactly once."""
    env = {**plugin_env, "BENCH_PLUGINS": "toy_plugin,crash_plugin"}
    marker = tmp_path / "killed-worker.pid"
    results = tmp_path / "results"
    done = bench(env, "run", "--suite", "toy", "--methods", "pretrained,crash_once,ties", "--seeds", "0,1",
                 "--set", f"crash_once.marker={marker}", "--results", str(results), "--no-progress", "--no-report",
                 "--executor", "ray")
    assert done.returncode == 0, done.stderr
    killed = int(marker.read_text())
    assert not alive(killed)
    records = records_of(results)
    assert "8 run(s) computed, 0 already recorded" in done.stderr
    assert sorted(r["method"] for r in records.values()) == sorted(["individual", "pretrained", "crash_once",
                                                                    "ties"] * 2)
    assert len({(r["method"], r["seed"]) for r in records.values()}) == 8
    crash_runs = [r for r in records.values() if r["method"] == "crash_once"]
    assert all(r["environment"]["pid"] != killed for r in crash_runs)
    pretrained = {r["seed"]: r["tasks"] for r in records.values() if r["method"] == "pretrained"}
    assert all(r["tasks"] == pretrained[r["seed"]] for r in crash_runs)  # the retried run is a whole, normal one


@pytest.mark.parametrize("executor", [["--executor", "ray"], ["--jobs", "2"]], ids=["ray", "pool"])
def test_ctrl_c_cancels_outstanding_jobs_and_keeps_the_finished_ones(tmp_path: Path, plugin_env: dict,
                                                                     executor: list[str]) -> None:
    results = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "run", *TOY, "--set", "suite.eval_delay=0.4", "--seeds", "0,1,2,3,4,5",
            "--results", str(results), "--no-progress", "--no-report", *executor]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        driver = subprocess.Popen(argv, env=plugin_env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # 24 jobs of 1.2 s each on 2 workers: interrupt once the first records (references, then methods) exist
        assert wait_for(lambda: len(list(results.rglob("*.json"))) >= 8, 120), (tmp_path / "stderr.txt").read_text()
        driver.send_signal(signal.SIGINT)
        assert driver.wait(60) == 130
    finally:
        if driver.poll() is None:
            driver.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert err.endswith("bench: interrupted; every finished run is recorded, rerun with --resume to continue\n"), err
    assert "Traceback" not in err and "warn" not in err
    kept = records_of(results)
    assert 8 <= len(kept) < 24
    assert not list(results.rglob("*.tmp"))
    again = bench(plugin_env, *argv[3:], "--resume")
    assert again.returncode == 0, again.stderr
    finished = records_of(results)
    assert len(finished) == 24 and all(finished[name] == record for name, record in kept.items())


def test_sweep_on_a_cluster_started_with_ray_start(tiny8_ci_cache: Path, tmp_path: Path) -> None:
    """The README's cluster commands, as written there: `ray start --head`, `bench sweep --executor ray --address
    auto`, `ray stop`; the records equal a local sweep's."""
    env = {**os.environ, "BENCH_CACHE": str(tiny8_ci_cache)}
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert ray_cli, "the ray extra installs the `ray` command"
    sweep = ["sweep", "--suite", "tiny8", "--set", "suite.size=ci", "--param", "task_arithmetic.scaling=0.2,0.4,0.6",
             "--seeds", "0,1"]
    quiet = ["--no-progress"]
    started = subprocess.run([ray_cli, "start", "--head", "--num-cpus", "2"], env=env, capture_output=True,
                             text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        on_cluster = bench(env, *sweep, "--executor", "ray", "--address", "auto", *quiet,
                           "--results", str(tmp_path / "cluster"), "--out", str(tmp_path / "o1"))
        assert on_cluster.returncode == 0, on_cluster.stderr
        assert "running 8 job(s) on Ray (auto; 1 CPU and 0 GPU per job)" in on_cluster.stderr
    finally:
        subprocess.run([ray_cli, "stop"], env=env, capture_output=True, timeout=120)
    local = bench(env, *sweep, *quiet, "--results", str(tmp_path / "local"), "--out", str(tmp_path / "o2"))
    assert local.returncode == 0, local.stderr
    assert on_cluster.stdout == local.stdout  # the sweep table
    same_records(records_of(tmp_path / "local"), records_of(tmp_path / "cluster"))
    nodes = {(r["environment"]["ray_node_id"], r["environment"]["node_ip"])
             for r in records_of(tmp_path / "cluster").values()}
    assert len(nodes) == 1 and all(nodes.pop())  # one node ran them all, and the records say which


def test_jobs_pool_gives_the_in_process_records(tmp_path: Path, plugin_env: dict) -> None:
    common = ["run", *TOY, "--seeds", "0,1,2", "--no-progress", "--no-report"]
    serial = bench(plugin_env, *common, "--results", str(tmp_path / "serial"))
    pool = bench(plugin_env, *common, "--results", str(tmp_path / "pool"), "--jobs", "2")
    assert serial.returncode == 0 and pool.returncode == 0, pool.stderr
    assert "running 12 job(s) on 2 local worker processes" in pool.stderr
    same_records(records_of(tmp_path / "serial"), records_of(tmp_path / "pool"))
    pids = {r["environment"]["pid"] for r in records_of(tmp_path / "pool").values()}
    assert len(pids) == 2  # both workers took jobs; the driver ran none


def pool_workers(parent: int) -> list[int]:
    """The ``--jobs`` pool's worker processes among ``parent``'s children (not multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


@posix_only
def test_jobs_workers_end_when_the_parent_is_killed(tmp_path: Path, plugin_env: dict) -> None:
    results = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "run", *TOY, "--set", "suite.eval_delay=0.5", "--seeds", "0,1,2",
            "--jobs", "2", "--results", str(results), "--no-progress", "--no-report"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        parent = subprocess.Popen(argv, env=plugin_env, stdout=subprocess.DEVNULL, stderr=stderr)
    workers: list[int] = []
    try:
        assert wait_for(lambda: len(pool_workers(parent.pid)) == 2 and any(results.rglob("*.json")), 120), \
            (tmp_path / "stderr.txt").read_text()
        workers = pool_workers(parent.pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    try:
        assert wait_for(lambda: not any(alive(pid) for pid in workers), 5), "workers outlived their killed parent"
        written = sorted(results.rglob("*"))
        assert len([p for p in written if p.suffix == ".json"]) < 12, "the kill must land before the workers finish"
    finally:
        for pid in workers:  # only when the test fails: never leave the workers it started running
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@posix_only
def test_the_watcher_alone_ends_a_worker_whose_parent_is_gone(tmp_path: Path) -> None:
    """The portable fallback, without Linux's parent-death signal: the worker watches its parent's pid."""
    script = ("import os, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import os, time; from bench.lifeline import die_with; "
              "die_with(os.getppid(), pdeathsig=False); time.sleep(600)'])\n"
              "print(child.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        time.sleep(2)
        assert alive(worker)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert wait_for(lambda: not alive(worker), 5), "the worker outlived its killed parent"


@pytest.mark.parametrize(("flags", "message"), [
    (["--executor", "rai"], "unknown executor 'rai'; did you mean: ray?"),
    (["--jobs", "0"], "--jobs 0: give at least 1 (local worker processes)"),
    (["--executor", "ray", "--jobs", "2"], "--jobs is for --executor local; with --executor ray, Ray places the jobs "
                                          "(set --cpus-per-job/--gpus-per-job instead)"),
    (["--address", "auto"], "--address, --gpus-per-job and --cpus-per-job are for --executor ray; add --executor ray"),
    (["--executor", "ray", "--gpus-per-job", "-1"], "--gpus-per-job -1: give a number >= 0 (fractions share a "
                                                    "device, e.g. 0.5)"),
    (["--executor", "ray", "--cpus-per-job", "0"], "--cpus-per-job 0: give a number > 0 (fractions share a device, "
                                                   "e.g. 0.5)"),
    (["--executor", "ray", "--cpus-per-job", "nan"], "--cpus-per-job nan: give a number > 0 (fractions share a "
                                                     "device, e.g. 0.5)"),
])
def test_executor_flags_get_one_line_errors(tmp_path, capsys, flags, message) -> None:
    import toy_plugin  # noqa: F401 (registers the toy suite)

    code = main(["run", *TOY, "--results", str(tmp_path / "r"), "--no-progress", *flags])
    captured = capsys.readouterr()
    assert (code, captured.out, captured.err) == (2, "", f"bench: error: {message}\n")
    assert not (tmp_path / "r").exists()


def test_executor_ray_without_ray_names_the_extra(tmp_path, capsys, monkeypatch) -> None:
    import toy_plugin  # noqa: F401

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    code = main(["run", *TOY, "--results", str(tmp_path / "r"), "--no-progress", "--executor", "ray"])
    captured = capsys.readouterr()
    assert (code, captured.err) == (2, "bench: error: --executor ray needs Ray, which is not installed here: "
                                       "pip install 'merge-bench[ray]'\n")
    assert not (tmp_path / "r").exists()
