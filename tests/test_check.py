"""`bench export`, `bench check` and `bench compare` on synthetic stores with known per-example bits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from bench.check import BASELINE_FORMAT, BASELINE_VERSION, load_baseline, load_results
from bench.cli import main
from bench.store import ResultsStore, config_hash, pack_correct, unpack_correct

N = 400
TASKS = ("a", "b", "c")
SEEDS = (0, 1, 2)
CREATED = "2026-01-01T00:00:00+00:00"


def make_record(method: str, seed: int, correct: dict[str, np.ndarray], *, suite: str = "toy",
                variant: dict | None = None, suite_variant: dict | None = None, family: str = "data-free",
                created: str = CREATED) -> dict:
    """A record with only the fields `bench check/compare/export` read, plus schema and config_hash."""
    key = {"suite": suite, "suite_params": suite_variant or {}, "method": method, "params": variant or {},
           "seed": seed}
    tasks = {task: {"accuracy": float(bits.mean()), "loss": 0.0, "num_examples": len(bits),
                    "correct": pack_correct(torch.from_numpy(bits))} for task, bits in correct.items()}
    return {"schema": 1, "config_hash": config_hash({**key, "created": created}), **key,
            "suite_variant": suite_variant or {}, "variant": variant or {}, "family": family, "data_access": "none",
            "protocol": "transductive", "tasks": tasks,
            "average": float(np.mean([t["accuracy"] for t in tasks.values()])), "created": created}


def sample_bits(p: float, seed: int, salt: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, salt])
    return {task: rng.random(N) < p for task in TASKS}


METHODS = {"strong": (0.8, 1), "weak": (0.6, 2)}


def write_store(root: Path, methods: dict[str, tuple[float, int]] = METHODS) -> Path:
    store = ResultsStore(root)
    for method, (p, salt) in methods.items():
        for seed in SEEDS:
            store.put(make_record(method, seed, sample_bits(p, seed, salt)))
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def row(out: str, method: str) -> str:
    """The check table's row of ``method`` on the toy suite."""
    return next(line for line in out.splitlines() if line.split()[:2] == ["toy", method])


def detail(out: str, kind: str, method: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"{kind} toy {method}: "))


def export(capsys, results: Path, out: Path) -> dict:
    code, _, err = run(capsys, "export", "--results", str(results), "--out", str(out))
    assert code == 0, err
    return json.loads(out.read_text())


def flip(bits: np.ndarray, up: int, down: int = 0) -> np.ndarray:
    """Make the first ``up`` wrong examples right and the first ``down`` right examples wrong."""
    out = bits.copy()
    out[np.flatnonzero(~bits)[:up]] = True
    out[np.flatnonzero(bits)[:down]] = False
    return out


def doctor(payload: dict, method: str, change, tasks=TASKS) -> dict:
    """Rewrite one method's bits (and accuracies) in an exported baseline."""
    for seed, body in payload["suites"]["toy"][method]["seeds"].items():
        for task in tasks:
            entry = body["tasks"][task]
            bits = change(unpack_correct(entry["correct"], entry["num_examples"]), int(seed), task)
            entry["correct"] = pack_correct(torch.from_numpy(bits))
            entry["accuracy"] = float(bits.mean())
    return payload


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return write_store(tmp_path / "results")


def doctored_file(capsys, results: Path, tmp_path: Path, method: str, change, tasks=TASKS) -> Path:
    payload = doctor(export(capsys, results, tmp_path / "base.json"), method, change, tasks)
    path = tmp_path / "doctored.json"
    path.write_text(json.dumps(payload))
    return path


# ---------------------------------------------------------------- export


def test_export_writes_versioned_baseline_with_bits(capsys, results, tmp_path):
    payload = export(capsys, results, tmp_path / "out" / "base.json")
    assert payload["format"] == BASELINE_FORMAT and payload["version"] == BASELINE_VERSION
    assert {"created", "harness_commit", "suites"} <= set(payload)
    assert sorted(payload["suites"]["toy"]) == ["strong", "weak"]
    seed1 = payload["suites"]["toy"]["weak"]["seeds"]["1"]
    expected = sample_bits(0.6, 1, 2)
    np.testing.assert_array_equal(unpack_correct(seed1["tasks"]["b"]["correct"], N), expected["b"])
    assert seed1["tasks"]["b"]["num_examples"] == N
    assert seed1["average"] == pytest.approx(np.mean([expected[t].mean() for t in TASKS]))
    assert payload["suites"]["toy"]["weak"]["family"] == "data-free"


def test_latest_record_per_seed_wins(tmp_path):
    store = ResultsStore(tmp_path)
    old = make_record("m", 0, {"a": np.zeros(10, bool)}, created="2026-01-01T00:00:00+00:00")
    new = make_record("m", 0, {"a": np.ones(10, bool)}, created="2026-02-01T00:00:00+00:00")
    store.put(new)
    store.put(old)
    runs = load_results(tmp_path)
    assert runs["toy", "m"][0].tasks["a"].accuracy == 1.0


def test_labels_follow_the_leaderboard(tmp_path):
    store = ResultsStore(tmp_path)
    store.put(make_record("ties", 0, {"a": np.ones(8, bool)}, variant={"k": 10}, suite_variant={"size": "ci"}))
    assert list(load_results(tmp_path)) == [("toy(size=ci)", "ties(k=10)")]


# ---------------------------------------------------------------- check: pass / fail


def test_check_passes_on_identical_results_directory(capsys, results):
    code, out, _ = run(capsys, "check", "--baseline", str(results), "--results", str(results))
    assert code == 0
    header = out.splitlines()[0]
    assert header.startswith(f"bench check: PASS — 0 regression(s) in 2 method(s) checked against {results}")
    assert "0 new, 0 not rerun" in header
    assert len(out.splitlines()) < 25  # one screen


def test_check_passes_on_identical_exported_file(capsys, results, tmp_path):
    export(capsys, results, tmp_path / "base.json")
    code, out, _ = run(capsys, "check", "--baseline", str(tmp_path / "base.json"), "--results", str(results))
    assert code == 0
    assert out.startswith("bench check: PASS")
    assert row(out, "strong").endswith(" ok") and row(out, "weak").endswith(" ok")
    assert row(out, "weak").split()[2:8] == ["0,1,2", "59.6", "59.6", "+0.0", "[+0.0,", "+0.0]"]


def test_check_fails_on_doctored_baseline(capsys, results, tmp_path):
    # the baseline's `weak` gets 40 more right answers per task and seed: current drops 10 points
    path = doctored_file(capsys, results, tmp_path, "weak", lambda bits, seed, task: flip(bits, 40))
    code, out, _ = run(capsys, "check", "--baseline", str(path), "--results", str(results))
    assert code == 1
    assert out.startswith("bench check: FAIL — 1 regression(s) in 2 method(s)")
    assert row(out, "weak").split()[5] == "-10.0" and row(out, "weak").endswith("REGRESSION")
    assert detail(out, "REGRESSION", "weak").startswith("REGRESSION toy weak: average -10.0; a -10.0 (McNemar p=")
    assert row(out, "strong").endswith(" ok")


def test_doctored_results_directory_baseline_fails_too(capsys, results, tmp_path):
    baseline = tmp_path / "baseline"
    shutil.copytree(results, baseline)
    for path in (baseline / "toy" / "strong").glob("*.json"):
        record = json.loads(path.read_text())
        for entry in record["tasks"].values():
            bits = flip(unpack_correct(entry["correct"], N), 30)
            entry["correct"], entry["accuracy"] = pack_correct(torch.from_numpy(bits)), float(bits.mean())
        path.write_text(json.dumps(record))
    code, out, _ = run(capsys, "check", "--baseline", str(baseline), "--results", str(results))
    assert code == 1
    assert detail(out, "REGRESSION", "strong").startswith("REGRESSION toy strong: average -7.5;")


def test_small_drop_within_tolerance_passes_but_fails_a_tighter_tolerance(capsys, results, tmp_path):
    # 2 more right answers of 400 per task and seed: a 0.5-point drop, consistent, hence significant
    path = doctored_file(capsys, results, tmp_path, "weak", lambda bits, seed, task: flip(bits, 2))
    code, out, _ = run(capsys, "check", "--baseline", str(path), "--results", str(results))
    assert code == 0, out
    code, out, _ = run(capsys, "check", "--baseline", str(path), "--results", str(results), "--tolerance", "0.25")
    assert code == 1
    assert detail(out, "REGRESSION", "weak") == "REGRESSION toy weak: average -0.5"
    assert out.splitlines()[0].endswith("(tolerance: 0.25 pt on the average, 0.75 pt per task)")


def test_non_significant_drop_beyond_tolerance_passes(capsys, results, tmp_path):
    # 100 up and 94 down per task and seed: a 1.5-point drop buried in ~half the examples changing
    path = doctored_file(capsys, results, tmp_path, "weak", lambda bits, seed, task: flip(bits, 100, 94))
    code, out, _ = run(capsys, "check", "--baseline", str(path), "--results", str(results))
    assert code == 0, out
    assert row(out, "weak").endswith("ok (note)")
    assert detail(out, "note", "weak") == "note toy weak: average -1.5 not significant"


def test_single_task_regression_uses_task_tolerance_and_mcnemar(capsys, results, tmp_path):
    path = doctored_file(capsys, results, tmp_path, "strong", lambda bits, seed, task: flip(bits, 40), tasks=("a",))
    argv = ("check", "--baseline", str(path), "--results", str(results), "--tolerance", "5")
    code, out, _ = run(capsys, *argv)  # task tolerance 15: a 10-point task drop is allowed
    assert code == 0, out
    code, out, _ = run(capsys, *argv, "--task-tolerance", "3")
    assert code == 1
    b_count, c_count = 120, 0  # 40 examples per seed right only in the baseline, pooled over 3 seeds
    pvalue = stats.binomtest(min(b_count, c_count), b_count + c_count, 0.5).pvalue
    # -3.3 on the average is within 5 points: only the task is named
    assert detail(out, "REGRESSION", "strong") == f"REGRESSION toy strong: a -10.0 (McNemar p={pvalue:.2g})"


def test_without_bits_the_average_falls_back_to_wilcoxon(capsys, results, tmp_path):
    payload = doctor(export(capsys, results, tmp_path / "base.json"), "weak", lambda bits, s, t: flip(bits, 40))
    for method in payload["suites"]["toy"].values():
        for body in method["seeds"].values():
            for entry in body["tasks"].values():
                entry["correct"] = None
    path = tmp_path / "nobits.json"
    path.write_text(json.dumps(payload))
    code, out, _ = run(capsys, "check", "--baseline", str(path), "--results", str(results))
    assert code == 1
    pvalue = stats.wilcoxon(np.full(9, -0.1)).pvalue  # 9 (task, seed) differences, all negative
    assert detail(out, "REGRESSION", "weak") == f"REGRESSION toy weak: average -10.0 (Wilcoxon p={pvalue:.3g})"
    assert detail(out, "note", "weak").startswith("note toy weak: a -10.0 significance unknown (no per-example bits);")
    assert row(out, "weak").split()[6:8] == ["Wilcoxon", f"p={pvalue:.3g}"]


def test_new_method_is_ranked_against_every_baseline_method(capsys, results, tmp_path):
    export(capsys, results, tmp_path / "base.json")
    store = ResultsStore(results)
    for seed in SEEDS:
        store.put(make_record("newbie", seed, sample_bits(0.7, seed, 3)))
        store.put(make_record("twin", seed, {t: flip(b, 1) for t, b in sample_bits(0.6, seed, 2).items()}))
    code, out, _ = run(capsys, "check", "--baseline", str(tmp_path / "base.json"), "--results", str(results))
    assert code == 0
    assert "2 new" in out.splitlines()[0]
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("new: newbie")))
    assert lines[start].startswith("new: newbie on toy ranks 2 of 3 by average (")
    strong, itself, weak = lines[start + 3: start + 6]
    assert strong.split()[0] == "strong" and strong.split()[2].startswith("-") and strong.endswith("yes")
    assert itself.split()[:2] == [">", "newbie"]
    assert weak.split()[0] == "weak" and weak.split()[2].startswith("+") and weak.endswith("yes")
    twin = lines.index(next(line for line in lines if line.startswith("new: twin")))
    assert lines[twin].startswith("new: twin on toy ranks 2 of 3")
    # one more right answer per task and seed: tiny, but consistent, hence significant
    assert lines[twin + 5].split()[0] == "weak" and lines[twin + 5].endswith("yes")


def test_new_method_without_significance_says_no(capsys, tmp_path):
    base = write_store(tmp_path / "base", {"ref": (0.7, 5)})
    current = write_store(tmp_path / "cur", {"ref": (0.7, 5)})
    store = ResultsStore(current)
    for seed in SEEDS:
        same = sample_bits(0.7, seed, 5)
        store.put(make_record("clone", seed, {t: np.roll(b, 1) for t, b in same.items()}))
    code, out, _ = run(capsys, "check", "--baseline", str(base), "--results", str(current))
    assert code == 0
    ref = next(line for line in out.splitlines() if line.strip().startswith("ref "))
    assert ref.split()[2] == "+0.0" and ref.endswith("no")


def test_methods_missing_from_results_fail_unless_left_out_with_methods(capsys, results, tmp_path):
    partial = write_store(tmp_path / "partial", {"strong": METHODS["strong"]})
    code, out, _ = run(capsys, "check", "--baseline", str(results), "--results", str(partial))
    assert code == 1  # a gate cannot vouch for a baseline method it never saw
    assert out.startswith("bench check: FAIL — 0 regression(s)") and "1 not rerun" in out.splitlines()[0]
    assert "in the baseline but not in the results (FAIL: not checked): weak" in out.splitlines()
    code, out, _ = run(capsys, "check", "--baseline", str(results), "--results", str(partial), "--methods", "strong")
    assert code == 0 and out.startswith("bench check: PASS") and "0 not rerun" in out.splitlines()[0]


# ---------------------------------------------------------------- errors


def error(capsys, *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("bench: error: ")
    return err.strip().removeprefix("bench: error: ")


def test_check_errors(capsys, results, tmp_path):
    missing = tmp_path / "nope.json"
    assert error(capsys, "check", "--baseline", str(missing), "--results", str(results)) == (
        f"baseline '{missing}' does not exist; write one with `bench export --out {missing}`")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert error(capsys, "check", "--baseline", str(garbage), "--results", str(results)) == (
        f"baseline '{garbage}' is not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)); re-export it with `bench export`")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    assert error(capsys, "check", "--baseline", str(other), "--results", str(results)) == (
        f"'{other}' is not a merge-bench baseline (no \"format\": \"merge-bench-baseline\"); "
        "write one with `bench export`")
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": BASELINE_FORMAT, "version": 9, "suites": {}}))
    assert error(capsys, "check", "--baseline", str(future), "--results", str(results)) == (
        f"baseline '{future}' has format version 9; this harness reads version 1; re-export it with `bench export`")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": BASELINE_FORMAT, "version": 1, "suites": {"toy": {"m": {}}}}))
    assert error(capsys, "check", "--baseline", str(broken), "--results", str(results)) == (
        f"baseline '{broken}' is corrupt: missing or malformed field ('seeds'); re-export it with `bench export`")
    assert error(capsys, "check", "--baseline", str(results), "--results", str(tmp_path / "none")) == (
        f"no results directory '{tmp_path / 'none'}'; run `bench run` first or pass --results DIR")


def test_check_error_on_bits_that_disagree_with_accuracy(capsys, results, tmp_path):
    payload = export(capsys, results, tmp_path / "base.json")
    payload["suites"]["toy"]["weak"]["seeds"]["0"]["tasks"]["b"]["accuracy"] = 0.99
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(payload))
    actual = sample_bits(0.6, 0, 2)["b"].mean()
    assert error(capsys, "check", "--baseline", str(path), "--results", str(results)) == (
        f"{path} [toy / weak / seed 0]: task 'b' accuracy 0.9900 disagrees with its correctness bits "
        f"({actual:.4f}); the file is corrupt")


def test_check_error_without_overlapping_configuration(capsys, results, tmp_path):
    other = tmp_path / "other"
    ResultsStore(other).put(make_record("strong", 0, sample_bits(0.8, 0, 1), suite_variant={"size": "ci"}))
    assert error(capsys, "check", "--baseline", str(other), "--results", str(results)) == (
        f"no suite configuration in both '{results}' (toy) and the baseline '{other}' (toy(size=ci))")
    assert error(capsys, "check", "--baseline", str(other), "--results", str(results), "--suite", "vit8") == (
        f"no records of suite 'vit8' in '{other}'; recorded: toy(size=ci)")


def test_export_errors(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error(capsys, "export", "--results", str(empty), "--out", str(tmp_path / "b.json")) == (
        f"no records in '{empty}'; run `bench run --suite ...` first")


# ---------------------------------------------------------------- compare


def test_compare_prints_paired_statistics(capsys, results):
    code, out, _ = run(capsys, "compare", "strong", "weak", "--results", str(results))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("strong vs weak on toy — seeds 0,1,2 (paired); Δ = strong − weak in points")
    row_a = lines[3].split()
    strong = {s: sample_bits(0.8, s, 1)["a"] for s in SEEDS}
    weak = {s: sample_bits(0.6, s, 2)["a"] for s in SEEDS}
    b_count = sum(int(np.sum(strong[s] & ~weak[s])) for s in SEEDS)
    c_count = sum(int(np.sum(~strong[s] & weak[s])) for s in SEEDS)
    pvalue = stats.binomtest(min(b_count, c_count), b_count + c_count, 0.5).pvalue
    assert row_a[0] == "a" and row_a[-2:] == [f"{b_count}/{c_count}", f"{pvalue:.3g}"]
    diffs = [sample_bits(0.8, s, 1)[t].mean() - sample_bits(0.6, s, 2)[t].mean() for t in TASKS for s in SEEDS]
    assert lines[-1].endswith(f"p = {stats.wilcoxon(diffs).pvalue:.3g}")
    assert lines[-1].startswith("Wilcoxon signed-rank over 9 (task, seed) differences (9 nonzero)")
    assert lines[6].split()[0] == "average"


def test_compare_with_seed_subset_and_unpaired_seeds(capsys, results):
    ResultsStore(results).put(make_record("strong", 7, sample_bits(0.8, 7, 1)))
    code, out, _ = run(capsys, "compare", "strong", "weak", "--results", str(results))
    assert code == 0 and "note: unpaired seeds left out (strong only: 7)" in out
    code, out, _ = run(capsys, "compare", "strong", "weak", "--results", str(results), "--seeds", "1")
    assert code == 0 and "seeds 1 (paired)" in out and "Wilcoxon signed-rank over 3 " in out


def test_compare_errors(capsys, results):
    assert error(capsys, "compare", "strnog", "weak", "--results", str(results)) == (
        f"no records of method 'strnog' in '{results}'; did you mean: strong?")
    assert error(capsys, "compare", "xyz", "weak", "--results", str(results)) == (
        f"no records of method 'xyz' in '{results}'; recorded: strong, weak")
    ResultsStore(results).put(make_record("late", 5, sample_bits(0.8, 5, 4)))
    assert error(capsys, "compare", "late", "weak", "--results", str(results)) == (
        "'late' and 'weak' on toy: seeds do not overlap: late has 5, weak has 0,1,2; run both with the same --seeds")
    assert error(capsys, "compare", "strong", "weak", "--results", str(results), "--seeds", "9") == (
        "'strong' has no records with --seeds 9 (recorded seeds: 0,1,2)")
    ResultsStore(results).put(make_record("other", 0, sample_bits(0.8, 0, 4), suite_variant={"size": "ci"}))
    assert error(capsys, "compare", "other", "weak", "--results", str(results)) == (
        "'other' and 'weak' were never run on the same suite configuration ('other': toy(size=ci); 'weak': toy)")


def test_load_baseline_directory_equals_exported_file(capsys, results, tmp_path):
    export(capsys, results, tmp_path / "base.json")
    from_dir, from_file = load_baseline(results), load_baseline(tmp_path / "base.json")
    assert from_dir.keys() == from_file.keys()
    for key in from_dir:
        for seed, entry in from_dir[key].items():
            other = from_file[key][seed]
            assert entry.average == other.average
            for task in TASKS:
                np.testing.assert_array_equal(entry.tasks[task].correct, other.tasks[task].correct)
