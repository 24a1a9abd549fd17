"""Every registered method end to end on the embedded suite (CI-sized), through the CLI."""

import json

import pytest

from bench import registry
from bench.cli import main


@pytest.fixture(scope="module")
def tiny8_ci_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    # the test-time methods run a few steps here (their optimisation is tested on its own); every other
    # method runs with its reference defaults
    short = ["--set", "adamerging_tw.steps=20", "--set", "adamerging_lw.steps=20", "--set", "samerging.num_batches=5",
             "--set", "samerging.epochs=4", "--set", "samerging_tw.num_batches=5", "--set", "samerging_tw.epochs=4",
             "--set", "fisher.num_samples=64", "--set", "regmean.num_samples=64",
             "--set", "expert_merging.steps=20", "--set", "fw_merging.max_iters=3",
             "--set", "fw_merging.dataset_size=16",
             "--set", "m2n2.evaluations=50", "--set", "m2n2.num_samples=64", "--set", "tint.epochs=10",
             "--set", "statsmerging.steps=20", "--set", "statsmerging.hidden=32"]
    argv = ["run", "--suite", "tiny8", "--methods", "all", "--set", "suite.size=ci", "--seeds", "0", *short,
            "--results", str(root / "results"), "--out", str(root / "reports"), "--cache", str(root / "cache"),
            "--no-progress"]
    assert main(argv) == 0
    records = {}
    for path in (root / "results").rglob("*.json"):
        record = json.loads(path.read_text())
        records[record["method"]] = record
    return root, argv, records


def test_every_registered_method_runs_on_tiny8(tiny8_ci_run):
    _, _, records = tiny8_ci_run
    assert set(records) == set(registry.methods())
    for name, record in records.items():
        assert len(record["tasks"]) == 8, name
        assert 0.0 <= record["average"] <= 1.0, name
        assert record["suite_params"]["size"] == "ci"


def test_experts_beat_pretrained_and_merges_stay_below_experts(tiny8_ci_run):
    # the CI-sized build is deliberately weak; the full-size targets are asserted in test_tiny8_targets (slow)
    _, _, records = tiny8_ci_run
    pretrained, individual = records["pretrained"]["average"], records["individual"]["average"]
    assert individual > pretrained + 0.15
    for name in ("weight_averaging", "task_arithmetic", "ties"):
        assert records[name]["average"] < individual, name


def test_rerun_of_the_same_seed_gives_identical_numbers(tiny8_ci_run, tmp_path):
    root, argv, records = tiny8_ci_run
    again = [a if a != str(root / "results") else str(tmp_path / "results") for a in argv]
    again[again.index("--methods") + 1] = "all"
    assert main(again) == 0
    for path in (tmp_path / "results").rglob("*.json"):
        record = json.loads(path.read_text())
        expected = records[record["method"]]
        for task, entry in record["tasks"].items():
            # predictions are bit-identical; the mean loss may differ in float32's last bits (BLAS reductions
            # can depend on buffer alignment)
            reference = expected["tasks"][task]
            assert entry["correct"] == reference["correct"], (record["method"], task)
            assert entry["accuracy"] == reference["accuracy"], (record["method"], task)
            assert entry["loss"] == pytest.approx(reference["loss"], rel=1e-5), (record["method"], task)


def test_leaderboard_written(tiny8_ci_run):
    root, _, records = tiny8_ci_run
    md = (root / "reports" / "leaderboard_tiny8-size=ci.md").read_text()
    for name, record in records.items():
        label = name if not record["variant"] else f"{name}(" + ",".join(
            f"{k}={v}" for k, v in sorted(record["variant"].items())) + ")"
        marked = " †" if record["output"] == "per_task" else ""  # one set of weights per task
        assert f"\n| {label}{marked} | " in md
