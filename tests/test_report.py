import pandas as pd

from bench.report import leaderboard, records_frame, to_csv, to_markdown, to_text, write_reports


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
    assert lines[2] == "| method | data | seeds | a | b | avg | norm. avg |"
    assert lines[4] == "| individual | none | 1 | 90.0 | 90.0 | 90.0 | 100.0 |"
    assert lines[5] == "| ties | none | 2 | **75.0 ± 7.1** | 60.0 ± 0.0 | **67.5 ± 3.5** | **75.0 ± 3.9** |"
    assert lines[6] == "| task_arithmetic | none | 2 | 60.0 ± 0.0 | **63.0 ± 1.4** | 61.5 ± 0.7 | 68.3 ± 0.8 |"


def test_terminal_and_csv():
    board = leaderboard(records_frame(RECORDS))
    text = to_text(board, "toy")
    assert "*75.0 ± 7.1" in text
    csv = to_csv(board).splitlines()
    assert csv[0].startswith("method,family,data,seeds,task:a_mean,task:a_std")
    assert csv[2].startswith("ties,data-free,none,2,0.750000,0.070711")


def test_one_file_per_suite_configuration(tmp_path):
    other = [dict(r, suite_variant={"size": "ci"}) for r in RECORDS[:2]]
    texts = write_reports(RECORDS + other, tmp_path)
    assert sorted(texts) == ["toy", "toy(size=ci)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "leaderboard_toy-size=ci.csv", "leaderboard_toy-size=ci.md", "leaderboard_toy.csv", "leaderboard_toy.md"]
    only = write_reports(RECORDS + other, tmp_path / "x", suite="toy")
    assert sorted(only) == ["toy", "toy(size=ci)"]
