import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.report import (
    PER_TASK_NOTE,
    ablation_points,
    ci_halfwidth,
    cost_markdown,
    cost_table,
    format_bytes,
    format_seconds,
    latex_escape,
    leaderboard,
    leaderboard_records,
    paper_order,
    records_frame,
    suite_groups,
    sweep_points,
    swept_params,
    to_csv,
    to_latex,
    to_markdown,
    to_text,
    write_reports,
)


def record(method, seed, accs, family="data-free", variant=None, suite_variant=None):
    tasks = {t: {"accuracy": a, "normalized_accuracy": a / 0.9} for t, a in accs.items()}
    return {
        "suite": "toy", "suite_variant": suite_variant or {}, "method": method, "variant": variant or {},
        "family": family, "data_access": "none", "protocol": "transductive", "seed": seed, "tasks": tasks,
        "average": sum(accs.values()) / len(accs), "normalized_average": sum(accs.values()) / len(accs) / 0.9,
        "timings": {"merge": 0.1, "eval": 0.2},
    }


RECORDS = [
    record("individual", 0, {"a": 0.9, "b": 0.9}, family="reference"),
    record("ties", 0, {"a": 0.70, "b": 0.60}),
    record("ties", 1, {"a": 0.80, "b": 0.60}),
    record("task_arithmetic", 0, {"a": 0.60, "b": 0.62}),
    record("task_arithmetic", 1, {"a": 0.60, "b": 0.64}),
    record("task_arithmetic", 0, {"a": 0.1, "b": 0.1}, variant={"scaling": 1.0}),
]


def test_leaderboard_cells_by_hand():
    board = leaderboard(records_frame(RECORDS))
    # sorted by average: individual 0.9, ties (0.65+0.70)/2=0.675, TA (0.61+0.62)/2=0.615, TA(scaling=1) 0.1
    assert list(board.index) == ["individual", "ties", "task_arithmetic", "task_arithmetic(scaling=1)"]
    assert board.loc["ties", "task:a_mean"] == 0.75
    assert abs(board.loc["ties", "task:a_std"] - 0.0707107) < 1e-6  # sample std of 0.7, 0.8
    assert board.loc["ties", "seeds"] == 2
    assert pd.isna(board.loc["individual", "average_std"])  # one seed: no spread


def test_markdown_marks_best_merge_per_column_not_reference():
    text = to_markdown(leaderboard(records_frame(RECORDS)), "toy — protocol: transductive")
    lines = text.splitlines()
    assert lines[0] == "### toy — protocol: transductive"
    assert lines[2] == "| method | data | seeds | a | b | avg | avg 95% CI | norm. avg |"
    assert lines[4] == "| individual | none | 1 | 90.0 | 90.0 | 90.0 | n/a | 100.0 |"
    # ties average: 0.65, 0.70 -> mean 67.5, s = 3.54, t(0.975, 1) = 12.706 -> half-width 31.8
    assert lines[5] == ("| ties | none | 2 | **75.0 ± 7.1** | 60.0 ± 0.0 | **67.5 ± 3.5** | [35.7, 99.3] "
                        "| **75.0 ± 3.9** |")
    assert lines[6] == ("| task_arithmetic | none | 2 | 60.0 ± 0.0 | **63.0 ± 1.4** | 61.5 ± 0.7 | [55.1, 67.9] "
                        "| 68.3 ± 0.8 |")


def test_terminal_and_csv():
    board = leaderboard(records_frame(RECORDS))
    text = to_text(board, "toy")
    assert "*75.0 ± 7.1" in text
    csv = to_csv(board).splitlines()
    assert csv[0].startswith("method,family,data,output,seeds,task:a_mean,task:a_std")
    assert csv[2].startswith("ties,data-free,none,merged,2,0.750000,0.070711")


def test_one_file_per_suite_configuration(tmp_path):
    other = [dict(r, suite_variant={"size": "ci"}) for r in RECORDS[:2]]
    texts = write_reports(RECORDS + other, tmp_path)
    assert sorted(texts) == ["toy", "toy(size=ci)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{kind}_{suite}.{ext}" for kind in ("leaderboard", "cost") for suite in ("toy", "toy-size=ci")
        for ext in ("md", "csv", "tex"))
    only = write_reports(RECORDS + other, tmp_path / "x", suite="toy")
    assert sorted(only) == ["toy", "toy(size=ci)"]


# --- a richer synthetic store: every field the paper outputs read ------------------------------------------------

TASKS = ("digits", "noisy_digits", "shapes")
EXPERT = {"digits": 0.95, "noisy_digits": 0.90, "shapes": 0.80}
DEFAULTS = {"samerging": {"init": 0.0, "rho": 0.07}, "task_arithmetic": {"scaling": 0.3}, "ties": {"scaling": 0.3,
                                                                                               "k": 20.0}}
FAMILIES = {"samerging": ("test-time", "unlabeled"), "individual": ("reference", "none"),
            "pretrained": ("reference", "none"), "fisher": ("data-using", "labeled")}


def make_record(method, seed, accuracy, *, variant=None, suite="tiny8", suite_variant=None, protocol="transductive",
                timings=None, memory_bytes=100 * 2**20, device="cpu", offsets=(0.0, 0.02, -0.02)):
    """A record as the runner writes it; task accuracies are ``accuracy + offsets`` (their mean is ``accuracy``)."""
    variant = dict(variant or {})
    family, data = FAMILIES.get(method, ("data-free", "none"))
    accs = {task: accuracy + offset for task, offset in zip(TASKS, offsets, strict=True)}
    tasks = {t: {"accuracy": a, "loss": 1.0, "num_examples": 100, "correct": "", "normalized_accuracy": a / EXPERT[t]}
             for t, a in accs.items()}
    environment = {"device": device, "torch_threads": 2} if device == "cpu" else {"device": "cuda", "gpu": "H100"}
    return {
        "suite": suite, "suite_params": {}, "suite_variant": dict(suite_variant or {}), "method": method,
        "params": {**DEFAULTS.get(method, {}), **variant}, "variant": variant, "seed": seed, "protocol": protocol,
        "family": family, "data_access": data, "samples_per_task": 0, "tasks": tasks,
        "average": float(np.mean(list(accs.values()))),
        "normalized_average": float(np.mean([t["normalized_accuracy"] for t in tasks.values()])),
        "timings": timings or {"load": 1.0, "merge": 0.1, "adapt": 0.0, "eval": 0.2},
        "peak_memory": {"kind": "cpu_peak_rss" if device == "cpu" else "cuda_max_allocated", "bytes": memory_bytes},
        "environment": environment, "notes": {}, "created": "2026-01-01T00:00:00+00:00",
    }


def synthetic_store(seeds=(0, 1, 2)):
    """Known numbers: samerging averages 0.80/0.82/0.84 over seeds, task arithmetic 0.60/0.61/0.62, ..."""
    records = []
    for seed in seeds:
        records += [
            make_record("individual", seed, 0.90, offsets=(0.05, 0.0, -0.10)),
            make_record("pretrained", seed, 0.50),
            make_record("task_arithmetic", seed, 0.60 + 0.01 * seed),
            make_record("ties", seed, 0.62, timings={"merge": 1.5, "adapt": 0.0, "eval": 0.2}),
            make_record("samerging", seed, 0.80 + 0.02 * seed, timings={"merge": 0.05, "adapt": 40.0, "eval": 0.2},
                        memory_bytes=int(1.5 * 2**30)),
            make_record("samerging", seed, 0.78, variant={"rho": 0.0}),
            make_record("fisher", seed, 0.70),
        ]
        for value in (0.0, 0.5, 1.0):
            records.append(make_record("task_arithmetic", seed, 0.55 - 0.1 * value, variant={"scaling": value}))
        for value in (0.3, 0.6):
            records.append(make_record("samerging", seed, 0.75 - 0.1 * value, variant={"init": value}))
            records.append(make_record("samerging", seed, 0.70 - 0.1 * value, variant={"init": value, "rho": 0.0}))
    return records


def test_ci_is_the_student_t_interval_of_the_mean():
    values = [0.80, 0.82, 0.84]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert ci_halfwidth(values) == pytest.approx((high - low) / 2)
    assert np.isnan(ci_halfwidth([0.8]))
    board = leaderboard(records_frame(leaderboard_records(synthetic_store(), swept_params(synthetic_store()))))
    assert board.loc["samerging", "average_ci95"] == pytest.approx((high - low) / 2)
    text = to_markdown(board, "t")
    row = next(line for line in text.splitlines() if line.startswith("| samerging |"))
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in row and "**82.0 ± 2.0**" in row


def test_sweep_points_leave_the_leaderboard_and_form_series():
    records = synthetic_store()
    swept = swept_params(records)
    # task_arithmetic.scaling recorded at 0.3 (default), 0, 0.5, 1; samerging.init at 0, 0.3, 0.6; rho at 2 values
    assert swept == {"samerging": ["init"], "task_arithmetic": ["scaling"]}
    rows = set(leaderboard(records_frame(leaderboard_records(records, swept))).index)
    assert rows == {"individual", "pretrained", "task_arithmetic", "ties", "samerging", "samerging(rho=0)", "fisher"}
    points = sweep_points(records, "samerging", "init")
    assert list(dict.fromkeys(points["label"])) == ["samerging (init)", "samerging (init), rho=0"]
    default_series = points[points["label"] == "samerging (init)"]
    assert list(default_series["setting"]) == [0.0, 0.3, 0.6]
    assert list(default_series["mean"].round(6)) == [0.82, 0.72, 0.69]
    assert set(points["seeds"]) == {3}
    ties_points = sweep_points(records + [make_record("ties", 0, 0.6, variant={"k": 10.0})], "ties", "scaling")
    assert ties_points.empty  # one value per series: a leaderboard row, not a sweep


def test_ablation_points_with_and_without_a_sweep_across():
    records = synthetic_store()
    alone = ablation_points(records, "samerging", "rho")
    assert list(alone["label"]) == ["rho=0", "rho=0.07 (default)"]
    assert list(alone["setting"]) == ["default", "default"]
    assert list(alone["mean"].round(6)) == [0.78, 0.82]
    across = ablation_points(records, "samerging", "rho", across="init")
    assert sorted(set(across["setting"])) == [0.0, 0.3, 0.6]
    assert across.set_index(["label", "setting"]).loc[("rho=0", 0.3), "mean"] == pytest.approx(0.67)
    assert ablation_points(records, "task_arithmetic", "scaling", across="init").empty  # no init: nothing across
    assert ablation_points([r for r in records if r["variant"].get("rho") is None], "samerging", "rho").empty


def test_cost_table_cells_and_units():
    frame = records_frame(leaderboard_records(synthetic_store(), swept_params(synthetic_store())))
    board = paper_order(leaderboard(frame))
    cost = cost_table(frame).loc[board.index]
    assert cost.loc["samerging", "total_s_mean"] == pytest.approx(40.25)
    text = cost_markdown(cost, "cost")
    lines = text.splitlines()
    assert lines[2] == ("| method | data | seeds | merge (s) | adapt (s) | eval (s) | total (s) | peak memory "
                        "| per-task storage | device |")
    assert "| samerging | unlabeled | 3 | 0.05 | 40.0 | 0.20 | 40.2 | 1.50 GiB | – | CPU (2 threads) |" in lines
    assert "| ties | none | 3 | 1.5 | – | 0.20 | 1.7 | 100 MiB | – | CPU (2 threads) |" in lines
    assert "max over seeds of CPU peak RSS" in text
    assert format_seconds(0.0042) == "0.004" and format_seconds(1234.5) == "1234" and format_seconds(np.nan) == "–"
    assert format_bytes(512 * 2**20) == "512 MiB" and format_bytes(3 * 2**30) == "3.00 GiB"


def test_protocols_are_never_pooled():
    transductive = [make_record("ties", s, 0.6) for s in (0, 1)]
    inductive = [make_record("ties", s, 0.5, suite_variant={"protocol": "inductive"}, protocol="inductive")
                 for s in (0, 1)]
    assert sorted(suite_groups(transductive + inductive)) == ["tiny8", "tiny8(protocol=inductive)"]
    mixed = transductive + [make_record("ties", 2, 0.5, protocol="inductive")]  # same label, two protocols
    assert sorted(suite_groups(mixed)) == ["tiny8[protocol=inductive]", "tiny8[protocol=transductive]"]


def assert_latex_is_sane(tex: str) -> None:
    """Balanced braces and environments, even $, specials escaped, rows with a fixed number of cells."""
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    plain = re.sub(r"\\[{}$%&#_]", "", body)
    assert plain.count("{") == plain.count("}")
    assert plain.count("$") % 2 == 0
    stack = []
    for kind, name in re.findall(r"\\(begin|end)\{([^}]*)\}", body):
        if kind == "begin":
            stack.append(name)
        else:
            assert stack.pop() == name
    assert not stack
    assert "#" not in plain and "_" not in plain
    assert not re.search(r"%(?!$)", plain, flags=re.M), "an unescaped % outside a line end"
    for env in ("toprule", "midrule", "bottomrule"):
        assert f"\\{env}" in body
    rows = [line for line in body.splitlines() if line.endswith("\\\\")]
    assert len({line.count(" & ") for line in rows}) == 1
    assert "&" not in plain.replace(" & ", "")


def test_latex_leaderboard_booktabs_bold_and_caption():
    records = synthetic_store()
    frame = records_frame(leaderboard_records(records, swept_params(records)))
    board = paper_order(leaderboard(frame))
    tex = to_latex(board, suite_label="tiny8", protocol="transductive", seeds=[0, 1, 2], label="tab:leaderboard")
    assert_latex_is_sane(tex)
    assert "\\begin{table*}" in tex and "\\label{tab:leaderboard}" in tex
    assert "Method & Data & digits & noisy\\_digits & shapes & Avg. & 95\\% CI & Norm.\\ avg. \\\\" in tex
    low, high = stats.t.interval(0.95, 2, loc=0.82, scale=stats.sem([0.80, 0.82, 0.84]))
    assert (f"samerging & unlabeled & \\textbf{{\\boldmath$82.0 \\pm 2.0$}} & \\textbf{{\\boldmath$84.0 \\pm 2.0$}} & "
            f"\\textbf{{\\boldmath$80.0 \\pm 2.0$}} & \\textbf{{\\boldmath$82.0 \\pm 2.0$}} & "
            f"$[{100 * low:.1f}, {100 * high:.1f}]$") in tex
    assert "individual & none & $95.0 \\pm 0.0$" in tex  # reference rows are never bold
    caption = re.search(r"\\caption\{(.*)\}\n", tex).group(1)
    assert "tiny8" in caption and "protocol: transductive" in caption and "3 seeds (0, 1, 2)" in caption
    assert "Student-$t$ confidence interval" in caption and "n/a with one seed" in caption
    # families in blocks: reference, data-free, test-time, data-using, a rule between each
    order = [line.split(" & ")[0] for line in tex.splitlines() if line.endswith("\\\\")][1:]
    assert order == ["individual", "pretrained", "ties", "task\\_arithmetic", "samerging", "samerging(rho=0)",
                     "fisher"]
    assert tex.count("\\midrule") == 1 + 3


def test_latex_escapes_special_characters():
    assert latex_escape("a_b%c&d#e$f{g}~^\\") == (
        r"a\_b\%c\&d\#e\$f\{g\}\textasciitilde{}\textasciicircum{}\textbackslash{}")
    assert latex_escape("tiny8 — λ ± ρ") == r"tiny8 --- $\lambda$ $\pm$ $\rho$"


def test_one_seed_says_n_a(tmp_path):
    records = [make_record("ties", 0, 0.6), make_record("individual", 0, 0.9)]
    write_reports(records, tmp_path)
    tex = (tmp_path / "leaderboard_tiny8.tex").read_text()
    assert "& n/a &" in tex and "1 seed (0)" in tex
    markdown = (tmp_path / "leaderboard_tiny8.md").read_text()
    assert "| ties | none | 1 | **60.0** | **62.0** | **58.0** | **60.0** | n/a |" in markdown


def test_write_reports_writes_every_table_of_a_store(tmp_path):
    write_reports(synthetic_store(), tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    stems = ["ablation_tiny8_samerging_rho", "cost_tiny8", "leaderboard_tiny8", "sensitivity_tiny8_init",
             "sensitivity_tiny8_scaling"]
    assert names == sorted(f"{stem}.{ext}" for stem in stems for ext in ("csv", "md", "tex"))
    for path in tmp_path.glob("*.tex"):
        assert_latex_is_sane(path.read_text())
    sensitivity = (tmp_path / "sensitivity_tiny8_init.md").read_text().splitlines()
    assert sensitivity[2] == "| method (swept) | 0 | 0.3 | 0.6 |"
    assert sensitivity[4] == "| samerging (init) | 82.0 ± 2.0 | 72.0 ± 0.0 | 69.0 ± 0.0 |"
    assert sensitivity[5] == "| samerging (init), rho=0 | 78.0 ± 0.0 | 67.0 ± 0.0 | 64.0 ± 0.0 |"
    ablation = (tmp_path / "ablation_tiny8_samerging_rho.tex").read_text()
    assert "rho / init & $0$ & $0.3$ & $0.6$ \\\\" in ablation


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_tables_compile(tmp_path):
    write_reports(synthetic_store(), tmp_path)
    inputs = "\n".join(f"\\input{{{p.name}}}" for p in sorted(tmp_path.glob("*.tex")))
    (tmp_path / "doc.tex").write_text(
        "\\documentclass[twocolumn]{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
        f"\\usepackage{{graphicx}}\n\\begin{{document}}\n{inputs}\n\\end{{document}}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "Overfull" not in (tmp_path / "doc.log").read_text()


def test_long_suite_labels_give_short_distinct_file_names():
    from bench.report import suite_slug

    long_a = "llm-mergebench(task_map=" + "instruction=ifeval;" * 20 + ")"
    long_b = long_a.replace("ifeval", "gsm8k")
    assert suite_slug("tiny8(size=ci)") == "tiny8-size=ci"
    assert len(suite_slug(long_a)) == 96 and suite_slug(long_a) != suite_slug(long_b)
    assert suite_slug(long_a).startswith("llm-mergebench-task_map=instruction=ifeval_")


def test_per_task_results_are_marked_and_their_storage_is_a_cost_column():
    """A method whose result is one set of weights per task (``output: per_task``) is a row like any other, marked
    in every table, with what it adds per task in the cost table; one-model rows are unmarked with –."""
    per_task = [dict(make_record("tall_masks", seed, 0.7), output="per_task", notes={"per_task_bytes": 3 * 2**10})
                for seed in (0, 1)]
    merged = [dict(make_record("ties", seed, 0.6), output="merged") for seed in (0, 1)]
    frame = records_frame(per_task + merged)
    board = leaderboard(frame)
    markdown = to_markdown(board, "toy")
    assert "| tall_masks † | none | 2 |" in markdown and "| ties | none | 2 |" in markdown
    assert markdown.rstrip().endswith(PER_TASK_NOTE)
    assert "tall_masks †" in to_text(board, "toy") and "tall\\_masks †" in to_latex(
        board, suite_label="toy", protocol="transductive", seeds=[0, 1], label="tab:x")
    cost = cost_markdown(cost_table(frame), "cost").splitlines()
    assert any(line.startswith("| tall_masks | none | 2 |") and "| 3.0 KiB |" in line for line in cost)
    assert any(line.startswith("| ties | none | 2 |") and "| – | CPU" in line for line in cost)
    assert PER_TASK_NOTE not in to_markdown(leaderboard(records_frame(merged)), "toy")


def test_per_task_rows_are_not_ranked_with_merged_models():
    records = [dict(make_record("emr", seed, 0.9), output="per_task") for seed in (0, 1)]
    records += [dict(make_record("ties", seed, 0.6), output="merged") for seed in (0, 1)]
    board = leaderboard(records_frame(records))
    assert "| **60.0 ± 0.0** |" in to_markdown(board, "toy") and "| 90.0 ± 0.0 |" in to_markdown(board, "toy")
