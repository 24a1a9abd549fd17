"""The embedded tinylm suite (CI size) end to end: build, cache, lm-eval scoring, methods through the CLI."""

import json
import shutil

import pytest
import torch

from bench.cli import main
from suites import tinylm
from suites._clip_classification import read_manifest

SHORT = ["--set", "samerging.num_batches=2", "--set", "samerging.epochs=1", "--set", "fisher.num_samples=8",
         "--set", "regmean.num_samples=8"]
METHODS = "pretrained,individual,task_arithmetic,samerging,fisher,regmean"


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins on a shared machine
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("tinylm")
    argv = ["run", "--suite", "tinylm", "--set", "suite.size=ci", "--methods", METHODS, "--seeds", "0", *SHORT,
            "--results", str(root / "results"), "--out", str(root / "reports"), "--cache", str(root / "cache"),
            "--no-progress"]
    assert main(argv) == 0
    records = {}
    for path in (root / "results").rglob("*.json"):
        record = json.loads(path.read_text())
        records[record["method"]] = record
    return root, records


def ci_problem(cache):
    return tinylm.build(tinylm.TinyLMParams(size="ci"), cache, progress=False)


def test_every_method_is_recorded_with_lm_eval_scores(ci_run):
    _, records = ci_run
    assert set(records) == set(METHODS.split(","))
    size = tinylm.PRESETS["ci"].test_per_task
    for name, record in records.items():
        assert set(record["tasks"]) == set(tinylm.TASK_NAMES), name
        for task, entry in record["tasks"].items():
            assert entry["num_examples"] == size, (name, task)
            assert 0.0 <= entry["accuracy"] <= 1.0 and entry["loss"] > 0.0, (name, task)
        assert record["problem"]["evaluation"] == "lm-eval multiple_choice acc"


def test_experts_beat_the_pretrained_model(ci_run):
    # the CI build is small and weak; the full build's targets are measured for the README
    _, records = ci_run
    assert records["individual"]["average"] > records["pretrained"]["average"] + 0.2
    assert records["pretrained"]["average"] < 0.4  # near chance (chance: 0.24 on average)


def test_lm_eval_scores_the_classifier_that_the_optimisers_see(ci_run):
    """lm-eval's per-example correctness equals the argmax of logits() (answer tokens after the prompt)."""
    root, _ = ci_run
    problem = ci_problem(root / "cache")
    for task in problem.tasks:
        expert = problem.expert(task)
        test = problem.split(task, "test")
        with torch.no_grad():
            predicted = problem.logits(expert, task, test.prompts).argmax(dim=-1)
        scored = problem.evaluate(expert, task, torch.device("cpu"))
        assert torch.equal(scored.correct, predicted == test.labels), task
        assert scored.accuracy == pytest.approx(float(scored.correct.float().mean()))


def test_lm_eval_task_files_use_absolute_paths(ci_run):
    root, _ = ci_run
    files = next((root / "cache").glob("tinylm-*.files"))
    tokenizer_files = {p.name for p in (files / "tokenizer").iterdir()}
    assert "tokenizer.json" in tokenizer_files and "tokenizer_config.json" in tokenizer_files
    for task in tinylm.TASK_NAMES:
        text = (files / "lm_eval_tasks" / f"tinylm_{task}.yaml").read_text()
        assert f"{files.resolve()}/data/{task}/test.jsonl" in text
        assert "output_type: multiple_choice" in text


def test_samplers_are_seeded_and_protocol_dependent(ci_run):
    root, _ = ci_run
    problem = ci_problem(root / "cache")
    first = problem.unlabeled_indices("topic", 8, seed=3)
    assert torch.equal(first, problem.unlabeled_indices("topic", 8, seed=3))
    assert not torch.equal(first, problem.unlabeled_indices("topic", 8, seed=4))
    assert torch.equal(problem.unlabeled_inputs("topic", first), problem.split("topic", "test").prompts[first])
    inputs, labels = problem.labeled("counting", 6, seed=0)
    assert inputs.dtype == torch.long and labels.tolist() == problem.labeled("counting", 6, seed=0)[1].tolist()
    inductive = tinylm.build(tinylm.TinyLMParams(size="ci", protocol="inductive"), root / "cache", progress=False)
    assert inductive.unlabeled_size("topic") == tinylm.PRESETS["ci"].unlabeled_per_task
    grams = problem.linear_inputs(problem.pretrained(), "topic", inputs)
    assert set(grams) == problem.merged.transposed  # every Conv1D projection, in linear [out, in] layout
    real_tokens = int((inputs >= 0).sum())
    assert all(x.shape[0] == real_tokens for x in grams.values())


def test_a_corrupt_cache_is_rebuilt_identically(ci_run, capsys):
    """One rebuild checks both: a corrupted cache is replaced, and the build is deterministic."""
    root, _ = ci_run
    directory = next(p for p in (root / "cache").glob("tinylm-*") if p.is_dir() and not p.name.endswith(".files"))
    original = read_manifest(directory)["files"]
    copy = root / "cache-copy"
    shutil.copytree(directory, copy / directory.name)
    expert = copy / directory.name / "expert-topic.safetensors"
    data = bytearray(expert.read_bytes())
    data[len(data) // 2] ^= 0xFF
    expert.write_bytes(bytes(data))
    ci_problem(copy)
    assert "unusable" in capsys.readouterr().err
    assert read_manifest(copy / directory.name)["files"] == original
