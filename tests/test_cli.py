import subprocess
import sys

import pytest

from bench.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--suite", "toy", "--methods", "tie"], "unknown method 'tie'; did you mean: ties"),
        (["run", "--suite", "toi", "--methods", "ties"], "unknown suite 'toi'; did you mean: toy"),
        (["run", "--suite", "toy", "--methods", "ties", "--set", "ties.kk=3"],
         "unknown parameter of ties 'kk'; did you mean: k"),
        (["run", "--suite", "toy", "--methods", "ties", "--set", "ties.k=150"], "ties.k=150.0 is outside [0.0, 100.0]"),
        (["run", "--suite", "toy", "--methods", "ties", "--set", "ties.trim_scope=local"],
         "ties.trim_scope=local is not one of global|per_tensor"),
        (["run", "--suite", "toy", "--methods", "ties", "--set", "ties.k"],
         "--set 'ties.k': write METHOD.PARAM=VALUE or suite.PARAM=VALUE, e.g. --set ties.k=10"),
        (["run", "--suite", "toy", "--methods", "ties", "--set", "task_arithmetic.scaling=1"],
         "'task_arithmetic' has parameters set (--set/--param) but is not among the selected methods (ties); "
         "add it to --methods"),
        (["run", "--suite", "toy", "--methods", "ties", "--set", "suite.num_taks=2"],
         "unknown parameter of suite 'num_taks'; did you mean: num_tasks"),
        (["run", "--suite", "toy", "--methods", "ties", "--seeds", "0,x"],
         "--seeds '0,x': 'x' is not an integer; write e.g. --seeds 0,1,2"),
        (["run", "--suite", "toy", "--methods", "ties", "--device", "tpu"],
         "--device 'tpu' is not one of auto|cpu|cuda"),
        (["report", "--results", "/nonexistent/results"],
         "no results directory '/nonexistent/results'; run `bench run` first or pass --results DIR"),
    ],
)
def test_bad_input_is_one_line_without_traceback(capsys, tmp_path, argv, message):
    code, out, err = run_cli(capsys, *argv, *(["--results", str(tmp_path)] if argv[0] == "run" else []))
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"bench: error: {message}")
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir()), "nothing may be written on bad input"


def test_cuda_requested_without_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "pretrained", "--device", "cuda",
                           "--results", str(tmp_path))
    assert code == 2
    assert err == ("bench: error: --device cuda asked for, but torch sees no CUDA device here; "
                   "use --device cpu or auto\n")


def test_list_methods_shows_every_default(capsys):
    code, out, _ = run_cli(capsys, "list", "methods")
    assert code == 0
    assert "ties  [data-free; data: none; memory: streamed]" in out
    assert "adamerging_lw  [test-time; data: unlabeled, up to 16000 per task; memory: stacked]" in out
    assert "memory: stacked = holds all K task vectors" in out
    assert "k=20.0" in out and "trim_scope=global {global|per_tensor}" in out
    assert "individual  [reference; data: none; memory: streamed; output: per_task]" in out
    code, out, _ = run_cli(capsys, "list", "suites")
    assert "tiny8" in out and "size=full {full|ci}" in out


def test_run_writes_records_and_leaderboard(capsys, tmp_path):
    results, reports = tmp_path / "results", tmp_path / "reports"
    code, out, err = run_cli(capsys, "run", "--suite", "toy", "--methods", "pretrained,task_arithmetic",
                             "--seeds", "0,1", "--results", str(results), "--out", str(reports), "--no-progress")
    assert code == 0, err
    # individual is recorded as the normalization reference for each seed
    assert sorted(p.parent.name for p in results.glob("toy/*/*.json")) == ["individual"] * 2 + ["pretrained"] * 2 + [
        "task_arithmetic"] * 2
    assert "task_arithmetic" in out and "pretrained" in out
    md = (reports / "leaderboard_toy.md").read_text()
    assert md.startswith("### toy — protocol: transductive")
    assert (reports / "leaderboard_toy.csv").is_file()
    code, out2, _ = run_cli(capsys, "report", "--results", str(results), "--out", str(tmp_path / "r2"))
    assert code == 0 and out2 == out


def test_console_script_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "nope"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("bench: error: unknown method 'nope'")
    assert "Traceback" not in done.stderr


def test_grid_values():
    from bench.cli import parse_grid_values

    assert parse_grid_values("0:1:0.25") == ["0.0", "0.25", "0.5", "0.75", "1.0"]
    assert parse_grid_values("0:0.3:0.1") == ["0.0", "0.1", "0.2", "0.3"]  # inclusive despite float error
    assert parse_grid_values("1:5:2") == ["1", "3", "5"]
    assert parse_grid_values("0.1, 0.7") == ["0.1", "0.7"]


@pytest.mark.parametrize("value, message", [
    ("1:0:0.1", "--param range '1:0:0.1': needs step > 0 and stop >= start"),
    ("0:a:1", "--param range '0:a:1': write start:stop:step with numbers, e.g. 0:1:0.1"),
])
def test_bad_grid_values(capsys, tmp_path, value, message):
    code, _, err = run_cli(capsys, "sweep", "--suite", "toy", "--param", f"task_arithmetic.scaling={value}",
                           "--results", str(tmp_path))
    assert code == 2 and err == f"bench: error: {message}\n"


def test_sweep_end_to_end_with_resume(capsys, tmp_path):
    argv = ["sweep", "--suite", "toy", "--param", "task_arithmetic.scaling=0:1:0.5", "--param",
            "samerging.init=0,0.5", "--set", "samerging.num_batches=2", "--set", "samerging.epochs=2",
            "--seeds", "0,1", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "reports"),
            "--no-progress"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    # 3 TA points + 2 SAMerging points, 2 seeds each, plus the individual reference per seed
    assert len(list((tmp_path / "results").rglob("*.json"))) == 12
    assert "12 run(s) computed, 0 already recorded" in err
    lines = out.splitlines()
    assert lines[2] == "| method (swept) | 0 | 0.5 | 1 |"
    assert lines[4].startswith("| samerging (init) | ") and lines[4].endswith(" | – |")
    assert lines[5].startswith("| task_arithmetic (scaling) | 29.7 ± 0.0 | ")  # λ = 0 is the pretrained model
    table = (tmp_path / "reports" / "sweep_task_arithmetic.scaling_samerging.init.md").read_text()
    assert table.strip() in out
    before = {p: p.read_bytes() for p in (tmp_path / "results").rglob("*.json")}
    code, out2, err2 = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "0 run(s) computed, 10 already recorded" in err2
    assert out2 == out
    assert {p: p.read_bytes() for p in (tmp_path / "results").rglob("*.json")} == before
