"""`bench prepare`, `bench doctor`, readiness in `bench list suites`, and the missing-artefact error."""

from __future__ import annotations

from bench.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_without_artefacts_fails_fast_with_one_line_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    code, out, err = run_cli(capsys, "run", "--suite", "toyhub", "--methods", "all", "--cache", str(tmp_path / "c"),
                             "--results", str(results), "--no-progress")
    assert code == 2
    assert err == (
        f"bench: error: suite 'toyhub' needs artefact toy/base.pt (and 1 more), which is not in the cache "
        f"{tmp_path / 'c'}; run `bench prepare toyhub` on a machine with hub access (same --cache/BENCH_CACHE), "
        f"then rerun\n"
    )
    assert not results.exists() or not any(results.rglob("*.json"))


def test_missing_artefact_error_repeats_the_suite_parameters_for_prepare(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--suite", "toyhub", "--methods", "pretrained", "--set", "suite.num_tasks=2",
                           "--cache", str(tmp_path), "--results", str(tmp_path / "r"), "--no-progress")
    assert code == 2
    assert "run `bench prepare toyhub --set suite.num_tasks=2` on a machine" in err


def test_doctor_and_list_show_readiness_before_and_after_prepare(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    code, out, _ = run_cli(capsys, "doctor", "--cache", cache)
    assert code == 0
    assert "toyhub: not ready: 2 artefact(s) missing (`bench prepare toyhub`)" in out
    assert "    missing: artefact toy/base.pt" in out
    assert "tiny8: ready: built offline on first use" in out
    _, listing, _ = run_cli(capsys, "list", "suites", "--cache", cache)
    assert "toyhub  [not ready: 2 artefact(s) missing (`bench prepare toyhub`)]" in listing

    code, out, _ = run_cli(capsys, "prepare", "toyhub", "--cache", cache, "--no-progress")
    assert (code, out) == (0, f"toyhub is ready in {cache}\n")
    _, out, _ = run_cli(capsys, "doctor", "--cache", cache)
    assert "toyhub: ready: all artefacts cached" in out

    code, out, err = run_cli(capsys, "run", "--suite", "toyhub", "--methods", "pretrained", "--cache", cache,
                             "--results", str(tmp_path / "r"), "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 0, err
    assert "pretrained" in out


def test_prepare_resumes_and_redoes_a_corrupted_artefact(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert run_cli(capsys, "prepare", "toyhub", "--cache", str(cache))[0] == 0
    payload = cache / "toyhub" / "toy" / "data.pt" / "payload.bin"
    payload.write_bytes(b"truncated")
    _, out, _ = run_cli(capsys, "doctor", "--cache", str(cache))
    assert "missing: artefact toy/data.pt" in out
    assert run_cli(capsys, "prepare", "toyhub", "--cache", str(cache))[0] == 0
    assert payload.read_bytes() == b"x" * 16


def test_prepare_errors(tmp_path, capsys):
    assert run_cli(capsys, "prepare", "toyhb", "--cache", str(tmp_path))[2] == (
        "bench: error: unknown suite 'toyhb'; did you mean: toyhub, toy?\n")
    assert run_cli(capsys, "prepare", "toyhub", "--set", "ties.k=3", "--cache", str(tmp_path))[2] == (
        "bench: error: bench prepare takes only --set suite.PARAM=VALUE (method parameters need no download)\n")
    code, out, _ = run_cli(capsys, "prepare", "tiny8", "--cache", str(tmp_path))
    assert (code, out) == (0, "tiny8 needs no download: it is built offline on first use\n")


def test_trust_pickles_on_a_suite_without_pickles_says_so(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--suite", "toy", "--trust-pickles", "--results", str(tmp_path))
    assert code == 2
    assert err == "bench: error: --trust-pickles: suite 'toy' never loads pickled checkpoints; drop the flag\n"
