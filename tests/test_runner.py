import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.runner import RunConfig, execute


def config(tmp_path, **kwargs):
    defaults = dict(suite="toy", methods=["pretrained"], results_dir=tmp_path / "results", progress=False,
                    cache_dir=tmp_path / "cache")
    return RunConfig(**{**defaults, **kwargs})


def test_record_contents(tmp_path):
    summary = execute(config(tmp_path, methods=["pretrained", "task_arithmetic"], seeds=[3]))
    records = {r["method"]: r for r in summary.computed}
    assert set(records) == {"individual", "pretrained", "task_arithmetic"}
    ta, ind = records["task_arithmetic"], records["individual"]
    assert ta["seed"] == 3 and ta["family"] == "data-free" and ta["data_access"] == "none"
    assert ta["params"] == {"scaling": 0.3} and ta["variant"] == {}
    assert set(ta["timings"]) == {"load", "merge", "adapt", "eval"}
    assert ta["peak_memory"]["bytes"] > 0
    assert ta["environment"]["device"] == "cpu" and "torch" in ta["environment"]["packages"]
    for task, entry in ta["tasks"].items():
        assert entry["normalized_accuracy"] == pytest.approx(entry["accuracy"] / ind["tasks"][task]["accuracy"])
        assert entry["num_examples"] == 200
    assert ta["average"] == pytest.approx(sum(e["accuracy"] for e in ta["tasks"].values()) / 3)


def test_same_seed_same_numbers_and_dare_depends_on_seed(tmp_path):
    first = execute(config(tmp_path / "a", methods=["dare_ta", "ties"], seeds=[0, 1]))
    second = execute(config(tmp_path / "b", methods=["dare_ta", "ties"], seeds=[0, 1]))

    def numbers(summary):
        return {(r["method"], r["seed"]): {t: e["accuracy"] for t, e in r["tasks"].items()} for r in summary.computed}

    assert numbers(first) == numbers(second)
    one, two = numbers(first)[("dare_ta", 0)], numbers(first)[("dare_ta", 1)]
    assert one != two  # the DARE mask is drawn from the run seed
    assert numbers(first)[("ties", 0)] == numbers(first)[("ties", 1)]  # no randomness in TIES


def test_resume_skips_recorded_configurations(tmp_path):
    execute(config(tmp_path, methods=["pretrained"], seeds=[0, 1]))
    files = {p: p.read_bytes() for p in (tmp_path / "results").rglob("*.json")}
    summary = execute(config(tmp_path, methods=["pretrained", "task_arithmetic"], seeds=[0, 1], resume=True))
    assert summary.skipped_recorded == 2
    assert sorted(r["method"] for r in summary.computed) == ["task_arithmetic", "task_arithmetic"]
    assert all(p.read_bytes() == content for p, content in files.items())
    nothing = execute(config(tmp_path, methods=["pretrained", "task_arithmetic"], seeds=[0, 1], resume=True))
    assert nothing.computed == [] and nothing.skipped_recorded == 4


def test_killed_run_resumes_without_recomputing_or_losing_anything(tmp_path, plugin_env):
    results = tmp_path / "results"
    argv = [sys.executable, "-m", "bench", "run", "--suite", "toy", "--set", "suite.eval_delay=0.15",
            "--methods", "pretrained,weight_averaging,task_arithmetic,ties", "--seeds", "0,1",
            "--results", str(results), "--out", str(tmp_path / "reports"), "--no-progress"]
    proc = subprocess.Popen(argv, env=plugin_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(results.rglob("*.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: p.read_bytes() for p in results.rglob("*.json")}
    assert 3 <= len(before) < 10, "the kill must land half-way"
    for content in before.values():
        json.loads(content)  # every record on disk is complete

    resumed = subprocess.run(argv + ["--resume"], env=plugin_env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    after = {p: p.read_bytes() for p in results.rglob("*.json")}
    assert len(after) == 10  # 4 methods x 2 seeds + the individual reference for each seed
    assert all(after[p] == content for p, content in before.items()), "resume rewrote a finished record"
    recomputed = int(resumed.stderr.split(" run(s) computed")[0].split()[-1])
    assert recomputed == len(after) - len(before)


def test_random_merges_do_not_depend_on_state_dict_order():
    from methods.dare import dare_ta_merge, dare_ties_merge

    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(4)}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]

    def reverse(sd):
        return dict(reversed(list(sd.items())))

    for merge in (dare_ta_merge, lambda *a, **k: dare_ties_merge(*a, k=20.0, trim_scope="global", merge="sum", **k)):
        one = merge(base, experts, p=0.5, rescale="inverse_keep", scaling=0.3, seed=7)
        two = merge(reverse(base), [reverse(e) for e in experts], p=0.5, rescale="inverse_keep", scaling=0.3, seed=7)
        assert all(torch.equal(one[k], two[k]) for k in base)


def test_problem_thread_policy_applies_to_the_job_and_is_restored(tmp_path, monkeypatch):
    import toy_plugin

    seen = []
    original = toy_plugin.ToyProblem.evaluate

    def spying_evaluate(self, params, task, device):
        seen.append(torch.get_num_threads())
        return original(self, params, task, device)

    before = torch.get_num_threads()
    monkeypatch.setattr(toy_plugin.ToyProblem, "cpu_threads", 1)
    monkeypatch.setattr(toy_plugin.ToyProblem, "evaluate", spying_evaluate)
    summary = execute(config(tmp_path, methods=["weight_averaging"]))
    assert set(seen) == {1}
    assert {r["environment"]["torch_threads"] for r in summary.computed} == {1}
    assert torch.get_num_threads() == before


def test_jobs_split_seeds_over_worker_processes_with_the_same_records(tmp_path, monkeypatch, plugin_env, capsys):
    from bench.cli import main

    for name in ("PYTHONPATH", "BENCH_PLUGINS"):
        monkeypatch.setenv(name, plugin_env[name])

    def run(results, *extra):
        argv = ["run", "--suite", "toy", "--methods", "pretrained,ties,dare_ta", "--seeds", "0,1,2",
                "--results", str(results), "--out", str(tmp_path / "out"), "--no-progress", *extra]
        assert main(argv) == 0
        return capsys.readouterr()

    run(tmp_path / "serial")
    parallel = run(tmp_path / "parallel", "--jobs", "2")
    assert "running 12 job(s) on 2 local worker processes" in parallel.err
    assert "ties" in parallel.out  # the leaderboard is printed once all workers finished

    def numbers(results):
        return {p.name: {t: e["accuracy"] for t, e in json.loads(p.read_text())["tasks"].items()}
                for p in results.rglob("*.json")}

    serial = numbers(tmp_path / "serial")
    assert len(serial) == 4 * 3 and numbers(tmp_path / "parallel") == serial


def test_jobs_must_be_positive(tmp_path, capsys):
    from bench.cli import main

    assert main(["run", "--suite", "toy", "--jobs", "0", "--results", str(tmp_path)]) == 2
    expected = "bench: error: --jobs 0: give at least 1 (local worker processes)\n"
    assert capsys.readouterr().err == expected
    assert main(["run", "--suite", "toy", "--jobs", "2", "--seeds", "0,1", "--methods", "tie",
                 "--results", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "bench: error: unknown method 'tie'; did you mean: ties, tint, dare_ties?\n"


def test_sweep_with_jobs_writes_the_same_records_and_table(tmp_path, monkeypatch, plugin_env, capsys):
    from bench.cli import main

    for name in ("PYTHONPATH", "BENCH_PLUGINS"):
        monkeypatch.setenv(name, plugin_env[name])

    def sweep(name, *extra):
        argv = ["sweep", "--suite", "toy", "--param", "task_arithmetic.scaling=0.1,0.5", "--param", "dare_ta.p=0.2,0.8",
                "--seeds", "0,1", "--results", str(tmp_path / name), "--out", str(tmp_path / f"{name}-out"),
                "--no-progress", *extra]
        assert main(argv) == 0
        return capsys.readouterr().out

    serial_table = sweep("serial")
    assert sweep("parallel", "--jobs", "2") == serial_table

    def numbers(results):
        return {p.name: json.loads(p.read_text())["average"] for p in results.rglob("*.json")}

    assert numbers(tmp_path / "parallel") == numbers(tmp_path / "serial") and len(numbers(tmp_path / "serial")) == 10


def test_methods_a_suite_cannot_feed_are_skipped_before_anything_is_loaded(tmp_path, monkeypatch):
    """The planner matches each method's declared needs with the suite's declared capabilities: a run whose
    methods all lack something never loads the suite, and says what is lacking."""
    from bench import registry

    spec = registry.get_suite("toy")
    blind = dataclasses.replace(spec, capabilities=registry.capabilities_of(("labeled_data",)),
                                fn=lambda *args: pytest.fail("the suite was loaded"))
    monkeypatch.setitem(registry._SUITES, "toy", blind)
    messages = []
    summary = execute(RunConfig(suite="toy", methods=["adamerging_tw", "regmean"], seeds=[0, 1],
                                results_dir=tmp_path, progress=False), log=messages.append)
    assert summary.computed == []
    assert summary.not_applicable == [
        ("adamerging_tw", "suite toy cannot give class_logits or unlabeled_data (per-class logits of the merged "
                          "model on a task's inputs (a forward to optimise through); unlabeled inputs of each task "
                          "(the protocol's adaptation split))"),
        ("regmean", "suite toy cannot give linear_inputs (the inputs of every merged linear layer on given "
                    "examples)"),
    ]
    assert messages == [f"skipped {name}: {reason}" for name, reason in summary.not_applicable]
    assert list(tmp_path.iterdir()) == []
