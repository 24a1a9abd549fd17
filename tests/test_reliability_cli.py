"""Bad input and broken stores at the command line (issue 12, defects 4, 6 and 9): every problem is one line and
exit 2 (or one warning per unusable record), a regression gate fails when it cannot check a baseline record, and
messages say what really happens, early. The property tests at the end feed generated values to the parsing and
planning layer: a valid plan or one line, never another exception."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import registry
from bench.cli import MAX_GRID_POINTS, main, parse_grid_values, parse_seeds
from bench.errors import BenchError
from bench.runner import MAX_SEED, RunConfig, execute
from bench.store import ResultsStore, config_hash, pack_correct

CREATED = "2026-01-01T00:00:00+00:00"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit 2 and exactly one line on stderr, ``bench: error: ...`` containing every fragment; returns it."""
    assert code == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("bench: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err.strip()


# ---------------------------------------------------------------- stores for `bench check`


def record(method: str, seed: int, p: float, salt: int, n: int = 200) -> dict:
    """A record with what `bench check` reads: per-task accuracy, example count and packed correctness."""
    rng = np.random.default_rng([seed, salt])
    tasks = {}
    for task in ("a", "b"):
        bits = rng.random(n) < p
        tasks[task] = {"accuracy": float(bits.mean()), "loss": 0.0, "num_examples": n,
                       "correct": pack_correct(torch.from_numpy(bits))}
    key = {"suite": "toy", "suite_params": {}, "method": method, "params": {}, "seed": seed}
    return {"schema": 1, "config_hash": config_hash(key), **key, "suite_variant": {}, "variant": {},
            "family": "data-free", "data_access": "none", "protocol": "transductive", "tasks": tasks,
            "average": float(np.mean([t["accuracy"] for t in tasks.values()])), "created": CREATED}


def store(root: Path, seeds=(0,)) -> Path:
    results = ResultsStore(root)
    for seed in seeds:
        results.put(record("strong", seed, 0.8, 1))
        results.put(record("weak", seed, 0.6, 2))
    return root


def record_path(root: Path, method: str, seed: int) -> Path:
    return ResultsStore(root).path_for({"suite": "toy", "suite_params": {}, "method": method, "params": {},
                                        "seed": seed})


def truncate(path: Path) -> None:
    path.write_text(path.read_text()[:40])


def check(capsys, baseline: Path, results: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "check", "--baseline", str(baseline), "--results", str(results), *extra)


# ---------------------------------------------------------------- defect 4: a gate must not pass a broken store


@pytest.mark.parametrize("damage", ["truncated", "without tasks", "tasks of another type"])
def test_check_fails_and_names_an_unreadable_record(capsys, tmp_path, damage):
    """The issue's case: one method, one seed, its record truncated: `check` said PASS ("1 not rerun")."""
    results = store(tmp_path / "results")
    code, _, err = run_cli(capsys, "export", "--results", str(results), "--out", str(tmp_path / "base.json"))
    assert code == 0, err
    bad = record_path(results, "weak", 0)
    if damage == "truncated":
        truncate(bad)
    else:
        payload = json.loads(bad.read_text())
        if damage == "without tasks":
            del payload["tasks"]
        else:
            payload["tasks"] = [1, 2]
        bad.write_text(json.dumps(payload))
    code, out, err = check(capsys, tmp_path / "base.json", results)
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0].startswith("bench check: FAIL — 0 regression(s) in 1 method(s)")
    assert "1 not rerun, 1 unreadable record(s)" in lines[0]
    assert "in the baseline but not in the results (FAIL: not checked): weak" in lines
    assert f"unreadable records (FAIL: not checked; see the warnings above): {bad}" in lines
    assert lines[-1].startswith("a gate fails on baseline records it cannot check: rerun them")
    assert err.count("\n") == 1 and err.startswith(f"bench: warning: ignoring unreadable record {bad} (")
    assert err.strip().endswith("it is skipped; rerun its configuration with --resume to recompute it")
    assert "will be recomputed" not in err


def test_check_fails_on_a_missing_or_unreadable_seed_run_and_seeds_narrow_it(capsys, tmp_path):
    results = store(tmp_path / "results", seeds=(0, 1, 2))
    baseline = tmp_path / "baseline"
    shutil.copytree(results, baseline)
    record_path(results, "weak", 2).unlink()
    code, out, _ = check(capsys, baseline, results)
    assert code == 1 and out.startswith("bench check: FAIL"), out
    assert "1 seed run(s) missing" in out.splitlines()[0]
    assert "baseline seed runs not in the results (FAIL: not checked): toy weak seed 2" in out.splitlines()
    code, out, _ = check(capsys, baseline, results, "--seeds", "0,1")
    assert code == 0 and out.startswith("bench check: PASS"), out
    truncate(record_path(results, "strong", 1))
    code, out, _ = check(capsys, baseline, results, "--seeds", "0,1")  # whose seed it was is unknown: counted
    assert code == 1 and f"{record_path(results, 'strong', 1)}" in out
    code, out, _ = check(capsys, baseline, results, "--methods", "weak", "--seeds", "0,1")
    assert code == 0 and "1 method(s) checked" in out.splitlines()[0], out


def test_check_fails_on_an_unreadable_record_of_a_baseline_directory(capsys, tmp_path):
    results = store(tmp_path / "results", seeds=(0, 1))
    baseline = tmp_path / "baseline"
    shutil.copytree(results, baseline)
    truncate(record_path(baseline, "strong", 1))
    code, out, _ = check(capsys, baseline, results)
    assert code == 1 and out.startswith("bench check: FAIL")
    assert f"unreadable records (FAIL: not checked; see the warnings above): {record_path(baseline, 'strong', 1)}" \
        in out.splitlines()


def test_check_methods_must_name_recorded_methods(capsys, tmp_path):
    results = store(tmp_path / "results")
    code, _, err = check(capsys, results, results, "--methods", "strnog")
    assert_one_line_error(code, err, "--methods: no records of method 'strnog' in the baseline or the results; "
                                     "did you mean: strong?")


# ---------------------------------------------------------------- defect 6: one line, exit 2


def test_nan_k_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "ties", "--set", "ties.k=nan",
                           "--results", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-progress")
    assert_one_line_error(code, err, "ties.k=nan")
    assert not (tmp_path / "r").exists()


def test_nan_k_is_refused_by_the_methods_whatever_the_parser_lets_through(capsys, tmp_path, monkeypatch):
    from methods.dare import DareTiesParams
    from methods.ties import TiesParams

    for cls, name in ((TiesParams, "ties"), (DareTiesParams, "dare_ties")):
        with pytest.raises(ValueError, match=rf"^{name}\.k=nan is outside \[0\.0, 100\.0\]"):
            cls(k=float("nan"))
    original = registry.parse_value
    monkeypatch.setattr(registry, "parse_value", lambda owner, info, raw: float(raw) if info.type is float
                        else original(owner, info, raw))  # a parser that lets NaN through
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "ties", "--set", "ties.k=nan",
                           "--results", str(tmp_path / "r"), "--no-report", "--no-progress")
    assert_one_line_error(code, err, "ties: ties.k=nan is outside [0.0, 100.0]")


@pytest.mark.parametrize("seeds, shown", [
    ("99999999999999999999", "99999999999999999999"),
    ("0,4294967296", "4294967296"),
    ("-1", "-1"),
    ("9" * 5000, "999"),
], ids=["20-digits", "2**32", "negative", "5000-digits"])
def test_seeds_out_of_range_are_one_line(capsys, tmp_path, seeds, shown):
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "pretrained", f"--seeds={seeds}",
                           "--results", str(tmp_path / "r"), "--no-report", "--no-progress")
    line = assert_one_line_error(code, err, shown, f"is outside [0, {MAX_SEED}]")
    assert len(line) < 300
    assert not (tmp_path / "r").exists()


def test_seeds_out_of_range_are_refused_by_the_runner_too(tmp_path):
    with pytest.raises(BenchError, match=r"^seed 1180591620717411303424 is outside \[0, 4294967295\]"):
        execute(RunConfig(suite="toy", methods=["pretrained"], seeds=[2**70], results_dir=tmp_path / "r",
                          progress=False))
    assert parse_seeds(f"0,{MAX_SEED},0") == [0, MAX_SEED]


def test_out_naming_a_file_is_one_line_for_run_and_report(capsys, tmp_path, monkeypatch):
    out_file = tmp_path / "reports.txt"
    out_file.write_text("not a folder")
    results = tmp_path / "results"
    monkeypatch.setattr("bench.runner.load_problem", lambda *a, **k: pytest.fail("loaded before checking --out"))
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "pretrained", "--results", str(results),
                           "--out", str(out_file), "--no-progress")
    assert_one_line_error(code, err, f"--out {out_file} is a file, not a directory; remove it or pick another --out")
    assert not results.exists()
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "pretrained", "--results", str(results),
                           "--no-report", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli(capsys, "report", "--results", str(results), "--out", str(out_file), "--no-figures")
    assert_one_line_error(code, err, f"--out {out_file} is a file, not a directory")
    code, _, err = run_cli(capsys, "report", "--results", str(results), "--out", str(out_file / "sub"),
                           "--no-figures")
    assert_one_line_error(code, err, f"--out {out_file / 'sub'} cannot be a directory: {out_file} is a file")
    assert out_file.read_text() == "not a folder"


def test_report_skips_records_of_changed_types_or_without_tasks_with_one_warning_each(capsys, tmp_path):
    results = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "pretrained,task_arithmetic",
                           "--seeds", "0,1", "--results", str(results), "--no-report", "--no-progress")
    assert code == 0, err
    damaged = {}
    for method, change, reason in [
        ("pretrained", lambda r: r.pop("tasks"), "field 'tasks' is missing"),
        ("task_arithmetic", lambda r: r.update(seed="1"), "field 'seed' is str, not an integer"),
        ("individual", lambda r: r["tasks"]["t0"].update(accuracy="0.9"), "task 't0' accuracy is str, not a number"),
    ]:
        path = sorted((results / "toy" / method).glob("*.json"))[0]
        payload = json.loads(path.read_text())
        change(payload)
        path.write_text(json.dumps(payload))
        damaged[path] = reason
    code, out, err = run_cli(capsys, "report", "--results", str(results), "--out", str(tmp_path / "reports"),
                             "--no-figures")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("bench: warning:")]
    assert len(warnings) == 3
    for path, reason in damaged.items():
        assert (f"bench: warning: ignoring unreadable record {path} ({reason}); it is skipped; rerun its "
                f"configuration with --resume to recompute it") in warnings
    assert "Traceback" not in err
    assert "pretrained" in out and "task_arithmetic" in out  # the other seed of each is still reported


@pytest.mark.parametrize("value", ["0:nan:0.1", "0:inf:1", "nan:1:0.1", "-inf:0:1", "0:1:nan", "0:1e999:1"])
def test_non_finite_sweep_ranges_are_one_line(capsys, tmp_path, value):
    code, _, err = run_cli(capsys, "sweep", "--suite", "toy", "--param", f"task_arithmetic.scaling={value}",
                           "--results", str(tmp_path))
    assert_one_line_error(code, err, f"--param range '{value}'")
    assert not any(tmp_path.iterdir())


# -- a bring-your-own image suite with damaged checkpoints: one line, end to end


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory) -> Path:
    """A hub cache with the tiny transformers CLIP base, two experts and their datasets (tests/fixtures_vision)."""
    import fixtures_vision as fv

    cache = tmp_path_factory.mktemp("damaged-clip") / "cache"
    pretrained = fv.save_hf_pretrained(cache)
    for index, task in enumerate(("eurosat", "mnist")):
        fv.save_hf_expert(cache, task, pretrained, seed=index + 1)
    fv.save_datasets(cache, ["eurosat", "mnist"], n_test=4, n_train=4)
    return cache


def image_suite(base: str, mnist_expert: str) -> str:
    from suites._vit_tasks import TASK_SPECS

    text = f'kind = "image-classification"\nbase = "{base}"\n'
    for name, expert in (("mnist", mnist_expert), ("eurosat", "tanganke/clip-vit-base-patch32_eurosat")):
        spec = TASK_SPECS[name]
        text += (f'[tasks.{name}]\nexpert = "{expert}"\ndataset = "{spec.dataset}"\n'
                 f'class_names = {json.dumps(list(spec.class_names))}\n')
    return text


def _truncate_file(folder: Path, name: str) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) - 100])


def _index_without_weight_map(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))


def _truncated_torch_file(folder: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])


def _config_of_another_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["projection_dim"] = "sixteen"
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("which, damage, message", [
    ("base", lambda f: _truncate_file(f, "model.safetensors"), "lies beyond the end of the file"),
    ("expert", lambda f: _truncate_file(f, "model.safetensors"), "lies beyond the end of the file"),
    ("base", _index_without_weight_map, "has no 'weight_map'"),
    ("expert", _index_without_weight_map, "has no 'weight_map'"),
    ("base", _truncated_torch_file, "pytorch_model.bin is not a readable torch file (PytorchStreamReader failed"),
    ("expert", _truncated_torch_file, "pytorch_model.bin is not a readable torch file"),
    ("base", _config_of_another_type, "is not a transformers CLIPModel folder with its tokenizer "
                                      "(StrictDataclassFieldValidationError"),
], ids=["truncated-base", "truncated-expert", "index-base", "index-expert", "torch-base", "torch-expert",
        "config-base"])
def test_damaged_checkpoints_of_an_image_suite_are_one_line(capsys, tmp_path, clip_cache, which, damage, message):
    from suites import _hub

    hub_base = _hub.model_dir(clip_cache, "openai/clip-vit-base-patch32")
    hub_expert = _hub.model_dir(clip_cache, "tanganke/clip-vit-base-patch32_mnist")
    folder = tmp_path / which
    shutil.copytree(hub_base if which == "base" else hub_expert, folder)
    (folder / _hub.MARKER).unlink()
    damage(folder)
    suite = tmp_path / "damaged.toml"
    suite.write_text(image_suite(str(folder) if which == "base" else "openai/clip-vit-base-patch32",
                                 str(folder) if which == "expert" else "tanganke/clip-vit-base-patch32_mnist"))
    code, _, err = run_cli(capsys, "run", "--suite", str(suite), "--methods", "pretrained", "--cache",
                           str(clip_cache), "--results", str(tmp_path / "results"), "--no-report", "--no-progress")
    assert_one_line_error(code, err, str(folder), message)
    assert not (tmp_path / "results").exists()


def test_a_truncated_base_of_a_sequence_suite_is_one_line(capsys, tmp_path, monkeypatch):
    """transformers' own loading of the base folder (sequence-classification kind): its SafetensorError is one line."""
    import test_custom_suite as custom

    custom.save_tiny_sequence_classifiers(tmp_path)
    # its own file name: suites.custom caches a suite file's spec by the path as given and the content
    (tmp_path / "truncated_base.toml").write_text(custom.TEXT_SUITE)
    _truncate_file(tmp_path / "base", "model.safetensors")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # what building the fixture printed
    code, _, err = run_cli(capsys, "run", "--suite", "truncated_base.toml", "--methods", "pretrained", "--cache",
                           str(tmp_path / "cache"), "--results", str(tmp_path / "results"), "--no-report",
                           "--no-progress")
    assert_one_line_error(code, err, f"truncated_base.toml: base: {tmp_path / 'base'} is not a transformers ",
                          "folder with its tokenizer (SafetensorError")


# ---------------------------------------------------------------- defect 9: say what happens, and early


def test_resume_says_an_unreadable_record_is_recomputed_and_does(capsys, tmp_path):
    results = tmp_path / "results"
    argv = ("run", "--suite", "toy", "--methods", "pretrained", "--results", str(results), "--no-report",
            "--no-progress")
    assert run_cli(capsys, *argv)[0] == 0
    bad = sorted((results / "toy" / "pretrained").glob("*.json"))[0]
    truncate(bad)
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert f"bench: warning: ignoring unreadable record {bad} (" in err and "); it will be recomputed\n" in err
    assert "1 run(s) computed, 0 already recorded" in err
    assert json.loads(bad.read_text())["method"] == "pretrained"


def test_unwritable_results_is_reported_before_the_suite_loads(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file")
    monkeypatch.setattr("bench.runner.load_problem", lambda *a, **k: pytest.fail("loaded before checking --results"))
    for results, problem in [(blocker, "is a file, not a directory"),
                             (blocker / "sub", f"cannot be a directory: {blocker} is a file")]:
        for command in (["run", "--methods", "pretrained"], ["sweep", "--param", "task_arithmetic.scaling=0,1"]):
            code, _, err = run_cli(capsys, *command, "--suite", "toy", "--results", str(results), "--no-progress")
            assert_one_line_error(code, err, f"--results {results} {problem}; remove it or pick another --results")
        with pytest.raises(BenchError, match="^--results .* pick another --results$"):  # the runner checks too
            execute(RunConfig(suite="toy", methods=["pretrained"], results_dir=results, progress=False))
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("param, fragment", [
    ("task_arithmetic.scaling=0:1:1e-300", "'0:1:1e-300' has more than 10,000 points"),
    ("task_arithmetic.scaling=0:10000:1", "'0:10000:1' has more than 10,000 points"),
    ("task_arithmetic.scaling=" + ",".join(map(str, range(MAX_GRID_POINTS + 1))), "has 10,001 values"),
], ids=["tiny-step", "10001-points", "10001-values"])
def test_grid_sizes_are_capped_with_a_short_message(capsys, tmp_path, param, fragment):
    code, _, err = run_cli(capsys, "sweep", "--suite", "toy", "--param", param, "--results", str(tmp_path))
    line = assert_one_line_error(code, err, fragment)
    assert len(line) < 250
    assert len(parse_grid_values("0:9999:1")) == MAX_GRID_POINTS


def test_the_grid_of_one_method_is_capped_before_planning(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("bench.runner.execute", lambda *a, **k: pytest.fail("a 40,000-point grid was planned"))
    code, _, err = run_cli(capsys, "sweep", "--suite", "toy", "--param", "ties.k=0:99.5:0.5", "--param",
                           "ties.scaling=0:1.99:0.01", "--results", str(tmp_path))
    assert_one_line_error(code, err, "--param: the grid of ties has 40,000 points (200 k x 200 scaling), more "
                                     "than 10,000")


def test_a_cache_path_that_is_a_file_is_named_as_such(capsys, tmp_path):
    from suites import _hub
    from suites._clip_classification import load_or_build_artifacts

    blocker = tmp_path / "tiny8-abc"
    blocker.write_text("mine")

    def build():
        raise AssertionError("built around a file in the cache's way")

    for directory, problem in [(blocker, "is a file, not a directory"),
                               (blocker / "tiny8-abc", f"cannot be a directory: {blocker} is a file")]:
        with pytest.raises(BenchError) as error:
            load_or_build_artifacts(directory, "tiny8", {}, set(), build)
        assert str(error.value) == (f"the tiny8 cache {directory} {problem}; remove it or pick another --cache "
                                    "(or BENCH_CACHE)")
        expected = rf"^the cache folder {re.escape(str(directory))} {re.escape(problem)}; remove it"
        with pytest.raises(BenchError, match=expected):
            _hub.require(directory, "vit8", "checkpoint x", tmp_path)
        with pytest.raises(BenchError, match=expected):
            _hub.fetch(directory, lambda folder: None)
    assert blocker.read_text() == "mine"
    for argv in (["doctor"], ["list", "suites"], ["run", "--suite", "toy", "--methods", "pretrained",
                                                 "--results", str(tmp_path / "r")]):
        code, _, err = run_cli(capsys, *argv, "--cache", str(blocker))
        assert_one_line_error(code, err, f"--cache {blocker} is a file, not a directory; remove it or pick another "
                                         "--cache (or BENCH_CACHE)")


# ---------------------------------------------------------------- property tests: a plan or one line, nothing else


NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", "1_0", "0x10", "9" * 400, "", " ", "true", "1e-300"]),
)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
VALUE = st.one_of(NUMBER_TEXT, TEXT)
PLANS: list = []


def planning_only(config, grid=None, log=None, executor=None, plugins=()):
    """`execute` up to its plan: what the runner would run, nothing loaded or computed."""
    from bench.runner import RunSummary, plan_jobs

    spec = registry.get_suite(config.suite)
    params = registry.build_params("suite", spec.params, config.suite_overrides)
    jobs = plan_jobs(config, params, grid)
    PLANS.append(jobs)
    return RunSummary(planned=[config_hash(job.key) for job in jobs])


def outcome(argv: list[str]) -> tuple[int, str, list]:
    """``main(argv)`` with execution stopped after planning: exit code, stderr, the plan (when one was made)."""
    PLANS.clear()
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr("bench.runner.execute", planning_only)
        code = main(argv)
    return code, err.getvalue(), list(PLANS[0]) if PLANS else []


def assert_plan_or_one_line(code: int, err: str, plan: list) -> None:
    if code == 0:
        assert plan, err
        for job in plan:
            assert 0 <= job.seed <= MAX_SEED
            for value in job.key["params"].values():
                assert not (isinstance(value, float) and math.isnan(value)), job.key
    else:
        assert code == 2 and not plan, err
        assert err.count("\n") == 1 and err.startswith("bench: error: ") and "Traceback" not in err, err


METHOD_PARAMS = {"ties": ["k", "scaling", "trim_scope", "merge"], "task_arithmetic": ["scaling"],
                 "dare_ta": ["p", "scaling", "rescale"], "samerging": ["init", "rho", "epochs"],
                 "suite": ["num_tasks", "eval_delay", "protocol"]}
ASSIGNMENT = st.sampled_from(sorted(METHOD_PARAMS)).flatmap(
    lambda owner: st.tuples(st.just(owner), st.one_of(st.sampled_from(METHOD_PARAMS[owner]), TEXT), VALUE))
SEEDS = st.one_of(
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), min_size=1, max_size=4)
    .map(lambda xs: ",".join(map(str, xs))),
    st.lists(st.integers(min_value=0, max_value=MAX_SEED), min_size=1, max_size=3)
    .map(lambda xs: ",".join(map(str, xs))),
    TEXT,
)
RANGE = st.one_of(
    st.tuples(NUMBER_TEXT, NUMBER_TEXT, NUMBER_TEXT).map(":".join),
    st.tuples(st.integers(-50, 50), st.integers(-50, 200), st.integers(0, 60))
    .map(lambda t: f"{t[0]}:{t[1]}:{t[2] / 10:g}"),
    st.lists(VALUE, min_size=0, max_size=4).map(",".join),
    TEXT,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(assignments=st.lists(ASSIGNMENT, max_size=3), seeds=SEEDS, all_methods=st.booleans())
def test_run_planning_gives_a_plan_or_one_line(assignments, seeds, all_methods):
    owners = sorted({owner for owner, _, _ in assignments if owner != "suite"})
    methods = "all" if all_methods or not owners else ",".join(owners)
    argv = ["run", "--suite", "toy", "--methods", methods, f"--seeds={seeds}", "--no-report", "--no-progress",
            "--results", tempfile.gettempdir()]
    argv += [f"--set={owner}.{name}={value}" for owner, name, value in assignments]
    assert_plan_or_one_line(*outcome(argv))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=st.lists(st.tuples(st.sampled_from(["ties.k", "ties.scaling", "task_arithmetic.scaling",
                                                  "samerging.rho", "dare_ta.p", "ties.trim_scope"]), RANGE),
                       min_size=1, max_size=2),
       seeds=SEEDS)
def test_sweep_planning_gives_a_plan_or_one_line(params, seeds):
    argv = ["sweep", "--suite", "toy", f"--seeds={seeds}", "--no-report", "--no-progress", "--results",
            tempfile.gettempdir()] + [f"--param={name}={values}" for name, values in params]
    code, err, plan = outcome(argv)
    assert_plan_or_one_line(code, err, plan)
    assert len(plan) <= MAX_GRID_POINTS * 4 * 2


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(RANGE, SEEDS, VALUE))
def test_parsers_give_values_or_a_one_line_error(text):
    for parse in (parse_seeds, parse_grid_values):
        try:
            values = parse(text)
        except BenchError as error:
            assert "\n" not in str(error)
            continue
        assert values and len(values) <= MAX_GRID_POINTS
        if parse is parse_seeds:
            assert all(0 <= seed <= MAX_SEED for seed in values)


TOML_VALUE = st.one_of(
    TEXT, st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.lists(TEXT, max_size=3),
    st.sampled_from(["image-classification", "sequence-classification", "lm-eval", "../x", "/abs", "./local",
                     "a/b", "..", "custom:x", "{split}", "openai/clip-vit-base-patch32", "ok-name", 64, 0, -1]),
)
TEMPLATES = {  # a valid file of each kind, which the test then changes in a few keys
    "image-classification": ({"base": "openai/clip-vit-base-patch32"},
                             {"expert": "tanganke/clip-vit-base-patch32_mnist", "dataset": "ylecun/mnist",
                              "class_names": ["0", "1"]}),
    "sequence-classification": ({"base": "gpt2"}, {"expert": "someone/gpt2-sst2", "dataset": "nyu-mll/glue",
                                                   "dataset_config": "sst2", "class_names": ["neg", "pos"]}),
    "lm-eval": ({"base": "gpt2"}, {"expert": "someone/gpt2-arc", "lm_eval_task": "arc_easy"}),
}
TOP_KEYS = ["kind", "base", "name", "description", "protocol", "eval_batch_size", "max_length", "limit", "kidn"]
TASK_KEYS = ["expert", "dataset", "dataset_config", "eval_split", "train_split", "unlabeled_split", "label_column",
             "class_names", "image_column", "templates", "text_column", "text_pair_column", "lm_eval_task",
             "task_yaml", "metric", "expret"]


def toml(value) -> str:
    """TOML for a generated value (strings as JSON basic strings, which TOML reads the same, DEL escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(TEMPLATES)),
       top=st.one_of(st.just({}), st.dictionaries(st.sampled_from(TOP_KEYS), TOML_VALUE, max_size=2)),
       task_name=st.one_of(st.sampled_from(["mnist", "t-1", "a.b", "..", "x/y"]), TEXT.filter(bool)),
       task=st.one_of(st.just({}), st.dictionaries(st.sampled_from(TASK_KEYS), TOML_VALUE, max_size=2)),
       dropped=st.lists(st.sampled_from(["kind", "base", "expert", "dataset", "class_names", "lm_eval_task"]),
                        max_size=1))
def test_suite_files_give_a_plan_or_one_line(kind, top, task_name, task, dropped):
    base_top, base_task = TEMPLATES[kind]
    top = {key: value for key, value in {"kind": kind, **base_top, **top}.items() if key not in dropped}
    task = {key: value for key, value in {**base_task, **task}.items() if key not in dropped}
    lines = [f"{key} = {toml(value)}" for key, value in top.items()]
    lines.append(f"[tasks.{toml(task_name)}]")
    lines += [f"{key} = {toml(value)}" for key, value in task.items()]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        argv = ["run", "--suite", str(path), "--methods", "pretrained", "--no-report", "--no-progress",
                "--results", folder, "--cache", folder]
        assert_plan_or_one_line(*outcome(argv))
