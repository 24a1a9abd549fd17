"""`bench paper --spec` and `bench report` end to end on synthetic stores; one-line errors for bad specs."""

import json
from pathlib import Path

import pytest
from test_figures import make_record, tiny8_like_store

from bench.cli import main
from bench.paper import load_spec

REPO = Path(__file__).resolve().parent.parent

SPEC = """
results = "{results}"
out = "{out}"
suites = ["tiny8"]
methods = ["pretrained", "individual", "task_arithmetic", "ties", "samerging", "samerging(rho=0.0)", "regmean"]

[leaderboard]
table = "tab_leaderboard"
figure = "fig_leaderboard"
heatmap = "fig_heatmap"
pareto = "fig_pareto"

[cost]
table = "tab_cost"

[[sweeps]]
params = ["task_arithmetic.scaling", "ties.scaling", "adamerging_lw.init", "samerging.init"]
x_label = "λ"
table = "tab_init"
figure = "fig_init"

[[ablations]]
method = "samerging"
param = "rho"
across = "init"
table = "tab_rho"
figure = "fig_rho"
"""


def write_store(root: Path, records) -> Path:
    for i, record in enumerate(records):
        path = root / record["suite"] / record["method"] / f"{i:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schema": 1, **record}))
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store") / "results", tiny8_like_store())


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_paper_writes_every_named_output(capsys, tmp_path, store):
    spec = write_spec(tmp_path / "spec.toml", SPEC.format(results=store, out=tmp_path / "out"))
    code, out, err = run_cli(capsys, "paper", "--spec", str(spec))
    assert code == 0, err
    tables = ["tab_leaderboard", "tab_cost", "tab_init", "tab_rho"]
    figures = ["fig_leaderboard", "fig_heatmap", "fig_pareto", "fig_init", "fig_rho"]
    expected = {f"{t}.{ext}" for t in tables for ext in ("tex", "md", "csv")}
    expected |= {f"{f}.{ext}" for f in figures for ext in ("png", "pdf")}
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected
    assert {Path(line).name for line in out.splitlines()} == expected
    assert "0 note(s)" in err
    leaderboard = (tmp_path / "out" / "tab_leaderboard.md").read_text().splitlines()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in leaderboard if line.startswith("| ")][1:]
    assert rows == ["pretrained", "individual", "task_arithmetic", "ties", "samerging", "samerging(rho=0)", "regmean"]
    init = (tmp_path / "out" / "tab_init.md").read_text()
    assert "samerging (init), rho=0" not in init  # the sweep shows default series; the ablation shows rho=0
    assert "rho / init" in (tmp_path / "out" / "tab_rho.tex").read_text()


def test_paper_overrides_and_tables_only(capsys, tmp_path, store):
    spec = write_spec(tmp_path / "spec.toml", SPEC.format(results="nowhere", out="nowhere"))
    code, out, err = run_cli(capsys, "paper", "--spec", str(spec), "--results", str(store), "--out",
                             str(tmp_path / "o"), "--no-figures")
    assert code == 0, err
    assert sorted({p.suffix for p in (tmp_path / "o").iterdir()}) == [".csv", ".md", ".tex"]


def test_missing_data_is_a_note_or_with_strict_an_error(capsys, tmp_path):
    records = [r for r in tiny8_like_store(sweep=False) if r["variant"].get("rho") is None]
    results = write_store(tmp_path / "results", records)
    spec = write_spec(tmp_path / "spec.toml", SPEC.format(results=results, out=tmp_path / "out"))
    code, _, err = run_cli(capsys, "paper", "--spec", str(spec))
    assert code == 0
    assert "note: tiny8: rows not in the store, left out of the tables: samerging(rho=0)" in err
    assert "note: tiny8: tab_init skipped: no records of task_arithmetic.scaling" in err
    assert "note: tiny8: fig_rho skipped: no records of samerging at 2 or more values of rho across init" in err
    code, _, err = run_cli(capsys, "paper", "--spec", str(spec), "--strict")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("bench: error: --strict: 5 output(s) or row(s) missing for lack of data; first: tiny8: rows")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("[cost]", "[costs]"), "unknown key 'costs'; did you mean: cost"),
    (lambda s: s.replace('table = "tab_cost"', 'tabel = "tab_cost"'), "unknown key 'cost.tabel'; did you mean: table"),
    (lambda s: s.replace('"regmean"]', '"regmaen"]'), "unknown method 'regmaen'; did you mean: regmean"),
    (lambda s: s.replace("ties.scaling", "ties.scalling"),
     "sweeps[0].params: unknown parameter of ties 'scalling'; did you mean: scaling"),
    (lambda s: s.replace('param = "rho"', 'param = "roh"'), "ablations[0]: unknown parameter of samerging 'roh'"),
    (lambda s: s.replace('suites = ["tiny8"]', 'suites = ["tiny8", "toy"]'),
     "output name 'tab_leaderboard' must contain {suite}: the spec names 2 suites"),
    (lambda s: s.replace('suites = ["tiny8"]', 'suites = ["tiny9"]'), "no records of suite 'tiny9' in the store"),
    (lambda s: s.replace('figure = "fig_rho"', 'figure = "fig_init"'), "output name 'fig_init' is used twice"),
    (lambda s: s.replace("[cost]", "[cost"), "not valid TOML"),
])
def test_bad_spec_is_one_line(capsys, tmp_path, store, edit, message):
    spec = write_spec(tmp_path / "spec.toml", edit(SPEC.format(results=store, out=tmp_path / "out")))
    code, out, err = run_cli(capsys, "paper", "--spec", str(spec))
    assert code == 2
    assert err.startswith(f"bench: error: {spec}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_spec_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "paper", "--spec", str(tmp_path / "nope.toml"))
    assert code == 2
    assert err == (f"bench: error: spec file '{tmp_path / 'nope.toml'}' not found; pass --spec FILE, "
                   "e.g. --spec paper/tiny8.toml\n")


def test_committed_tiny8_spec_names_the_init_sweep_and_rho_ablation():
    spec = load_spec(REPO / "paper" / "tiny8.toml")
    assert spec.suites == ("tiny8",)
    assert spec.sweeps[0].params == (("task_arithmetic", "scaling"), ("ties", "scaling"), ("adamerging_lw", "init"),
                                      ("samerging", "init"))
    assert (spec.ablations[0].method, spec.ablations[0].param) == ("samerging", "rho")
    assert {"samerging(rho=0)", "samerging(adaptive=false)"} <= set(spec.methods) and len(spec.methods) == 19
    assert set(spec.leaderboard) == {"table", "figure", "heatmap", "pareto"} and spec.cost_table


def test_committed_spec_runs_on_a_tiny8_like_store(capsys, tmp_path):
    records = tiny8_like_store() + [make_record("samerging", seed, variant={"adaptive": False}, shift=-0.002)
                                    for seed in range(3)]
    store = write_store(tmp_path / "results", records)
    code, out, err = run_cli(capsys, "paper", "--spec", str(REPO / "paper" / "tiny8.toml"), "--results", str(store),
                             "--out", str(tmp_path / "paper"))
    assert code == 0, err
    assert "0 note(s)" in err
    assert len(out.splitlines()) == 4 * 3 + 5 * 2


def test_report_writes_latex_cost_and_figures(capsys, tmp_path, store):
    code, out, err = run_cli(capsys, "report", "--results", str(store), "--out", str(tmp_path / "r"))
    assert code == 0, err
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"leaderboard_tiny8.tex", "cost_tiny8.tex", "sensitivity_tiny8_init.tex", "sensitivity_tiny8_scaling.tex",
            "ablation_tiny8_samerging_rho.tex", "tiny8"} <= names
    assert {p.name for p in (tmp_path / "r" / "tiny8").iterdir()} == {
        f"fig_{n}.{ext}" for n in ("leaderboard", "heatmap", "pareto", "sensitivity_init", "sensitivity_scaling",
                                   "ablation_samerging_rho") for ext in ("png", "pdf")}
    assert out.startswith("tiny8 — protocol: transductive")
    code, _, err = run_cli(capsys, "report", "--results", str(store), "--out", str(tmp_path / "t"), "--no-figures")
    assert code == 0 and not (tmp_path / "t" / "tiny8").exists()


@pytest.mark.parametrize("data, message", [
    ({"suites": 5}, 'suites must be a list of names, e.g. ["a", "b"]'),
    ({"suites": ["tiny8"], "methods": 3}, 'methods must be "all" or a list of rows, e.g. ["ties", "samerging(rho=0)"]'),
    ({"suites": ["tiny8"], "leaderboard": 3}, "[leaderboard] must be a table of output names"),
    ({"suites": ["tiny8"], "sweeps": {"a": 1}}, "sweeps must be an array of tables ([[sweeps]])"),
    ({"suites": ["tiny8"], "sweeps": [{"params": 3}]}, 'sweeps[0].params must be a list of names, e.g. ["a", "b"]'),
    ({"suites": ["tiny8"], "sweeps": [{"params": ["ties.k"], "variants": "yes"}]},
     "sweeps[0].variants must be true or false"),
    ({"suites": ["tiny8"], "sweeps": [{"params": ["ties.k"], "metrik": "x"}]},
     "unknown key 'sweeps[0].metrik'; did you mean: metric?"),
    ({"suites": ["tiny8"], "ablations": [{"method": "ties"}]}, "ablations[0].param is required (a name)"),
    ({"suites": ["tiny8"], "out": 3}, "out must be a string, not 3"),
    ({"suites": ["tiny8"], "leaderboard": {"table": True}}, "leaderboard.table must be a string, not True"),
])
def test_spec_structure_errors_are_one_line(data, message):
    """The spec's structure is one pydantic model; its first error is the one line naming the key."""
    from bench.errors import BenchError
    from bench.paper import parse_spec

    with pytest.raises(BenchError) as caught:
        parse_spec(data, "s.toml")
    assert str(caught.value) == f"s.toml: {message}"
