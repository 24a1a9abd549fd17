"""Issue 12, defect 3 ("silent NaN"): non-finite hyperparameters, experts and merges never become a score.

- a NaN or ±inf hyperparameter (``--set``, a sweep grid, a suite parameter) is a one-line error, nothing recorded;
- an expert holding NaN or ±inf is a one-line error naming the expert and the tensor;
- a merge whose output is not finite is recorded as failed with its reason (never scored, never averaged);
- records are strict JSON: no bare ``NaN``/``Infinity`` token, a missing loss is null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from toy_plugin import ToyParams, ToyProblem

from bench import registry, runner
from bench.cli import main
from bench.errors import BenchError
from bench.model_pool import SafetensorsWeights
from bench.problem import TaskMetrics
from bench.registry import build_params, param, register_suite
from bench.store import ResultsStore, write_json_atomic

# --------------------------------------------------------------------------------------------- a suite with a
# broken expert: the toy suite, except that one entry of expert t1's tensor 'w' holds NaN or ±inf; its experts are
# safetensors files read through SafetensorsWeights (or state dicts in memory). Labels stay those of the clean
# experts, so only the weights are broken.


@dataclass(frozen=True)
class BrokenToyParams:
    value: str = param("nan", "what one entry of expert t1's tensor 'w' holds", choices=("nan", "inf", "-inf"))
    storage: str = param("safetensors", "where the experts live", choices=("safetensors", "memory"))


class BrokenToyProblem(ToyProblem):
    def __init__(self, params: BrokenToyParams, cache_dir: Path) -> None:
        super().__init__(ToyParams())
        self.name = "toy_nonfinite"
        experts = {task: {key: value.clone() for key, value in weights.items()} for task, weights in
                   self._experts.items()}
        experts["t1"]["w"][2, 3] = float(params.value)
        if params.storage == "memory":
            self._readers = experts
            return
        folder = Path(cache_dir) / "toy_nonfinite"
        folder.mkdir(parents=True, exist_ok=True)
        self._readers = {}
        for task, weights in experts.items():
            save_file(weights, str(folder / f"{task}.safetensors"))
            self._readers[task] = SafetensorsWeights.open(folder / f"{task}.safetensors")

    def expert(self, task: str):
        return self._readers[task]


@register_suite("toy_nonfinite", description="test-only toy suite whose expert t1 holds NaN or inf",
                params=BrokenToyParams)
def build_broken(params: BrokenToyParams, cache_dir: Path, progress: bool) -> BrokenToyProblem:
    return BrokenToyProblem(params, cache_dir)


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.json")) if root.exists() else []


def assert_strict_json(root: Path) -> None:
    """No bare NaN/Infinity token in any JSON file under ``root`` (strict parsers refuse them)."""
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON token {token}")

    for path in json_files(root):
        json.loads(path.read_text(), parse_constant=refuse)


# ----------------------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_nonfinite_hyperparameter_is_one_line_error_and_nothing_is_recorded(capsys, tmp_path, value):
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "task_arithmetic", "--set",
                           f"task_arithmetic.scaling={value}", "--results", str(tmp_path / "results"),
                           "--out", str(tmp_path / "reports"), "--no-progress")
    shown = registry.format_value(float(value))
    assert code == 2
    assert err == f"bench: error: task_arithmetic.scaling={shown} is not a finite number; default is 0.3\n"
    assert not any(tmp_path.iterdir()), "nothing may be written on bad input"


@pytest.mark.parametrize("values, message", [
    ("0,nan", "task_arithmetic.scaling=nan is not a finite number; default is 0.3"),
    ("0.3,-inf", "task_arithmetic.scaling=-inf is not a finite number; default is 0.3"),
    ("0:inf:0.1", "--param range '0:inf:0.1': start, stop and step must be finite numbers, e.g. 0:1:0.1"),
    ("nan:1:0.1", "--param range 'nan:1:0.1': start, stop and step must be finite numbers, e.g. 0:1:0.1"),
])
def test_nonfinite_sweep_grid_is_one_line_error(capsys, tmp_path, values, message):
    code, _, err = run_cli(capsys, "sweep", "--suite", "toy", "--param", f"task_arithmetic.scaling={values}",
                           "--results", str(tmp_path / "results"), "--out", str(tmp_path / "reports"),
                           "--no-progress")
    assert code == 2 and err == f"bench: error: {message}\n"
    assert not any(tmp_path.iterdir())


def test_nonfinite_suite_parameter_is_one_line_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "pretrained", "--set",
                           "suite.eval_delay=inf", "--results", str(tmp_path / "results"), "--no-progress")
    assert code == 2
    assert err == "bench: error: suite.eval_delay=inf is not a finite number; default is 0.0\n"
    assert not any(tmp_path.iterdir())


def test_finite_is_the_default_and_a_parameter_may_opt_out():
    @dataclass(frozen=True)
    class Params:
        scaling: float = param(0.3, "lambda", low=0.0)
        limit: float = param(1.0, "may be unbounded", finite=False)

    with pytest.raises(BenchError) as info:
        build_params("m", Params, {"scaling": "inf"})  # inf passes low=0.0, but not the finiteness check
    assert str(info.value) == "m.scaling=inf is not a finite number; default is 0.3"
    assert build_params("m", Params, {"limit": "inf"}).limit == math.inf
    assert not any(info.finite is False for spec in registry.methods().values()
                   for info in registry.param_infos(spec.params)), "no current method needs the opt-out"


# ----------------------------------------------------------------------------------------------------- (b)


@pytest.mark.parametrize("value, storage, shown", [
    ("nan", "safetensors", "NaN in 1 of 36 entries"),
    ("inf", "safetensors", "+inf in 1 of 36 entries"),
    ("-inf", "memory", "-inf in 1 of 36 entries"),
])
def test_expert_with_nonfinite_tensor_is_one_line_naming_expert_and_tensor(capsys, tmp_path, value, storage, shown):
    results = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", "--suite", "toy_nonfinite", "--methods", "task_arithmetic",
                           "--set", f"suite.value={value}", "--set", f"suite.storage={storage}",
                           "--results", str(results), "--cache", str(tmp_path / "cache"), "--no-progress")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    label = f" ({tmp_path / 'cache' / 'toy_nonfinite' / 't1.safetensors'})" if storage == "safetensors" else ""
    assert err == (f"bench: error: expert 't1'{label}: tensor 'w' holds {shown}; every result from it would be "
                   "meaningless: fix or replace that checkpoint\n")
    assert json_files(results) == [], "no score from a broken expert is recorded"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv_m", "fisher", "adamerging_tw"])
def test_every_merge_path_names_the_broken_expert(tmp_path, method):
    """Even with the reference row already known (so the expert is first read by the merge itself): the merged
    output's check (task arithmetic, TIES, AdaMerging) or a crash inside the method (an SVD, Fisher's sampler)
    leads to the expert and the tensor."""
    spec, suite = registry.get_method(method), registry.get_suite("toy_nonfinite")
    suite_params = build_params("suite", suite.params, {})
    problem = suite.fn(suite_params, tmp_path, False)
    params = build_params(method, spec.params, {})
    job = runner.Job(spec, params, 0, runner.record_key(suite.name, suite_params, spec, params, 0))
    with pytest.raises(BenchError) as info:
        runner.run_job(job, problem, torch.device("cpu"), 0.0, {task: 1.0 for task in problem.tasks}, {})
    assert str(info.value).startswith(f"expert 't1' ({tmp_path / 'toy_nonfinite' / 't1.safetensors'}): "
                                      "tensor 'w' holds NaN in 1 of 36 entries;")


# ----------------------------------------------------------------------------------------------------- (c)


def test_overflowing_merge_is_recorded_as_failed_and_reported_as_such(capsys, tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    argv = ["run", "--suite", "toy", "--methods", "pretrained,task_arithmetic", "--set",
            "task_arithmetic.scaling=1e38", "--results", str(results), "--out", str(reports), "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    failed_path = next(results.glob("toy/task_arithmetic/*.json"))
    record = json.loads(failed_path.read_text())
    assert record["status"] == "failed"
    assert record["reason"].startswith("merged weights not finite: tensor 'w' holds ")
    assert "the base and experts are finite there" in record["reason"]
    assert not {"tasks", "average", "normalized_average"} & set(record), "a failed run has no scores"
    assert record["variant"] == {"scaling": 1e38} and "merge" in record["timings"]
    assert f"failed: task_arithmetic(scaling=1e+38) seed 0: {record['reason']}; recorded as failed in " \
           f"{failed_path} (--resume will not rerun it; delete that file to rerun it)" in err
    assert_strict_json(results)

    # the leaderboard never averages it and lists it under the table, as failed
    failed_line = f"failed: task_arithmetic(scaling=1e+38) seed 0: {record['reason']}"
    code, out, err = run_cli(capsys, "report", "--results", str(results), "--out", str(tmp_path / "r2"))
    assert code == 0, err
    rows = [line.split()[0] for line in out.splitlines()[3:]
            if line and not line.startswith(("accuracy", "failed", "†"))]
    assert rows == ["individual", "pretrained"]
    assert out.rstrip().endswith(failed_line)
    assert (tmp_path / "r2" / "leaderboard_toy.md").read_text().rstrip().endswith(failed_line)
    assert "task_arithmetic" not in (tmp_path / "r2" / "leaderboard_toy.csv").read_text()

    # --resume counts it as recorded (the same configuration would fail the same way) and says how to rerun it
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0
    assert "resume: 2 of 2 configurations already recorded, skipping them" in err
    assert f"resume: 1 of them failed and are not rerun (the same configuration fails the same way); delete a " \
           f"failed record to rerun it, e.g. {failed_path}" in err
    assert json.loads(failed_path.read_text()) == record
    assert_strict_json(results)


def test_failed_point_of_a_sweep_is_shown_as_failed(capsys, tmp_path):
    code, out, err = run_cli(capsys, "sweep", "--suite", "toy", "--param", "task_arithmetic.scaling=0,0.5,1e38",
                             "--results", str(tmp_path / "results"), "--out", str(tmp_path / "reports"),
                             "--no-progress")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| task_arithmetic (scaling)"))
    assert row.startswith("| task_arithmetic (scaling) | 29.7 | ") and row.endswith(" | failed |")
    assert_strict_json(tmp_path / "results")


def test_check_counts_a_failed_run_as_a_regression(capsys, tmp_path):
    results = tmp_path / "results"
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "task_arithmetic", "--seeds", "0,1",
                           "--results", str(results), "--out", str(tmp_path / "reports"), "--no-progress")
    assert code == 0, err
    baseline = tmp_path / "baseline.json"
    assert run_cli(capsys, "export", "--results", str(results), "--out", str(baseline))[0] == 0
    # seed 1 of task_arithmetic now fails (e.g. after a change to the method): the record of the same configuration
    path = next(p for p in results.glob("toy/task_arithmetic/*.json") if json.loads(p.read_text())["seed"] == 1)
    record = json.loads(path.read_text())
    for key in ("tasks", "average", "normalized_average"):
        del record[key]
    write_json_atomic(path, {**record, "status": "failed", "reason": "merged weights not finite: overflow"})
    code, out, _ = run_cli(capsys, "check", "--baseline", str(baseline), "--results", str(results))
    assert code == 1
    assert "REGRESSION toy task_arithmetic: failed on seed 1: merged weights not finite: overflow" in out
    code, out, _ = run_cli(capsys, "compare", "task_arithmetic", "individual", "--results", str(results))
    assert code == 0 and "seeds 0 (paired)" in out  # the failed seed is never paired


# ----------------------------------------------------------------------------------------------------- (d)


def test_records_are_strict_json_and_a_missing_loss_is_null(tmp_path):
    with pytest.raises(ValueError, match=r"refusing to write the non-finite number at 'tasks\.t0\.loss'"):
        write_json_atomic(tmp_path / "r" / "x.json", {"schema": 1, "tasks": {"t0": {"loss": math.nan}}})
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir()), "no file, no temporary"

    # a task without a loss (lm-eval generation tasks report NaN) is recorded as null and read back as None
    problem = ToyProblem(ToyParams())
    spec = registry.get_method("pretrained")
    params = build_params(spec.name, spec.params, {})
    job = runner.Job(spec, params, 0, runner.record_key("toy", ToyParams(), spec, params, 0))
    metrics = {"t0": TaskMetrics(0.5, math.nan, torch.tensor([True, False])),
               "t1": TaskMetrics(1.0, 0.25, torch.tensor([True, True])),
               "t2": TaskMetrics(0.0, math.inf, torch.tensor([False, False]))}
    record = runner.build_record(job, problem, metrics, None, runner.PhaseTimer(torch.device("cpu")), {}, {},
                                 {"loss_last": math.nan, "trace": [1.0, math.inf]})
    store = ResultsStore(tmp_path / "results")
    path = store.put(record)
    assert_strict_json(tmp_path / "results")
    back = store.load(path)
    assert [back["tasks"][t]["loss"] for t in ("t0", "t1", "t2")] == [None, 0.25, None]
    assert back["notes"] == {"loss_last": None, "trace": [1.0, None]}

