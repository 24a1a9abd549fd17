"""Figures from synthetic stores: files, series counts, known values, no overlapping labels, byte-stable output."""

import itertools

import matplotlib as mpl
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.text import Annotation

from bench import figures, report

TASKS = ("digits", "noisy_digits", "shapes", "textures", "colours", "counting", "position", "sizes")
EXPERT = 0.95
# method: (family, data access, average accuracy, merge s, adapt s)
METHODS = {
    "pretrained": ("reference", "none", 0.52, 0.001, 0.0),
    "individual": ("reference", "none", 0.95, 0.001, 0.0),
    "weight_averaging": ("data-free", "none", 0.61, 0.02, 0.0),
    "task_arithmetic": ("data-free", "none", 0.565, 0.03, 0.0),
    "ties": ("data-free", "none", 0.59, 0.25, 0.0),
    "dare_ta": ("data-free", "none", 0.57, 0.08, 0.0),
    "dare_ties": ("data-free", "none", 0.585, 0.3, 0.0),
    "consensus_ta": ("data-free", "none", 0.60, 0.2, 0.0),
    "tsv_m": ("data-free", "none", 0.655, 1.2, 0.0),
    "iso_c": ("data-free", "none", 0.668, 0.9, 0.0),
    "iso_cts": ("data-free", "none", 0.689, 1.5, 0.0),
    "adamerging_tw": ("test-time", "unlabeled", 0.70, 0.05, 35.0),
    "adamerging_lw": ("test-time", "unlabeled", 0.75, 0.05, 60.0),
    "samerging": ("test-time", "unlabeled", 0.79, 0.05, 80.0),
    "samerging_tw": ("test-time", "unlabeled", 0.72, 0.05, 40.0),
    "fisher": ("data-using", "labeled", 0.66, 3.0, 0.0),
    "regmean": ("data-using", "labeled", 0.71, 2.0, 0.0),
}
SWEPT = {"task_arithmetic": ("scaling", 0.3), "ties": ("scaling", 0.3), "adamerging_lw": ("init", 0.3),
         "samerging": ("init", 0.0)}


def make_record(method, seed, *, variant=None, shift=0.0, normalized=True):
    family, data, accuracy, merge, adapt = METHODS[method]
    variant = dict(variant or {})
    wiggle = [0.06 * np.sin(3 * i + accuracy * 20) for i in range(len(TASKS))]
    accs = [float(np.clip(accuracy + shift + w - np.mean(wiggle) + 0.01 * (seed - 1), 0, 1)) for w in wiggle]
    tasks = {t: {"accuracy": a, "normalized_accuracy": a / EXPERT if normalized else None}
             for t, a in zip(TASKS, accs, strict=True)}
    params = {SWEPT[method][0]: SWEPT[method][1]} if method in SWEPT else {}
    if method == "samerging":
        params["rho"] = 0.07
    return {
        "suite": "tiny8", "suite_variant": {}, "method": method, "params": {**params, **variant}, "variant": variant,
        "seed": seed, "protocol": "transductive", "family": family, "data_access": data, "tasks": tasks,
        "average": float(np.mean(accs)), "normalized_average": float(np.mean(accs)) / EXPERT if normalized else None,
        "timings": {"load": 2.0, "merge": merge * (1 + 0.05 * seed), "adapt": adapt, "eval": 0.28},
        "peak_memory": {"kind": "cpu_peak_rss", "bytes": 400 * 2**20}, "environment": {"device": "cpu"},
    }


def tiny8_like_store(seeds=(0, 1, 2), sweep=True):
    """17 default rows plus samerging(rho=0) and ties(k=10): 19 leaderboard rows on 8 tasks; with ``sweep``, the
    init sweep (11 values x 4 methods) and the rho=0 runs repeated over samerging's init."""
    records = []
    for seed in seeds:
        records += [make_record(m, seed) for m in METHODS]
        records.append(make_record("samerging", seed, variant={"rho": 0.0}, shift=-0.015))
        records.append(make_record("ties", seed, variant={"k": 10.0}, shift=0.004))
        if not sweep:
            continue
        for (method, (param, default)), value in itertools.product(SWEPT.items(), np.linspace(0, 1, 11)):
            value = round(float(value), 1)
            if value == default:
                continue
            shift = -0.5 * (value - 0.35) ** 2 + 0.5 * (default - 0.35) ** 2
            records.append(make_record(method, seed, variant={param: value}, shift=shift))
            if method == "samerging":
                records.append(make_record(method, seed, variant={param: value, "rho": 0.0}, shift=shift - 0.015))
    return records


@pytest.fixture(scope="module")
def store_figures():
    records = tiny8_like_store()
    return records, figures.suite_figures(records, "tiny8")


def texts_overlap(fig, texts):
    renderer = fig.canvas.get_renderer()
    boxes = [figures._text_box(t, renderer) if isinstance(t, Annotation) else t.get_window_extent(renderer)
             for t in texts]
    return [(texts[i].get_text(), texts[j].get_text()) for i, j in itertools.combinations(range(len(boxes)), 2)
            if figures._overlap_area(boxes[i], boxes[j]) > 0]


def test_every_figure_of_a_full_store(store_figures):
    _, drawn = store_figures
    assert sorted(drawn) == ["fig_ablation_samerging_rho", "fig_heatmap", "fig_leaderboard", "fig_pareto",
                             "fig_sensitivity_init", "fig_sensitivity_scaling"]
    for name, fig in drawn.items():
        assert not isinstance(fig, str), f"{name} skipped: {fig}"
        ax = fig.axes[0]
        assert "protocol: transductive" in ax.get_title(), name
        assert ax.get_xlabel() and (ax.get_ylabel() or name in ("fig_heatmap", "fig_leaderboard")), name


def test_leaderboard_bars_one_per_row_with_error_bars(store_figures):
    _, drawn = store_figures
    fig = drawn["fig_leaderboard"]
    ax = fig.axes[0]
    assert figures.bar_count(fig) == 19
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 4 and all(c.errorbar is not None for c in bars)  # one series per family
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "individual" and labels[-1] == "pretrained"  # ranked, best first
    assert "(%)" in ax.get_xlabel() and "± std over 3 seeds" in ax.get_xlabel()
    fig.canvas.draw()
    assert not texts_overlap(fig, ax.get_yticklabels())
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["reference rows", "data-free",
                                                          "test-time (unlabeled data)", "data-using (labeled data)"]
    assert legend.get_window_extent().y1 <= ax.get_window_extent().y0  # legend below the axes, not on the data


def test_heatmap_annotates_every_cell(store_figures):
    records, drawn = store_figures
    fig = drawn["fig_heatmap"]
    ax = fig.axes[0]
    assert len(ax.images) == 1
    assert len(ax.texts) == 19 * (len(TASKS) + 1)  # 8 tasks and the average
    image = ax.images[0].get_array()
    assert image.shape == (19, 9)
    first = records[1]  # individual, seed 0: accuracy / expert per task
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["individual", "pretrained"]
    assert first["method"] == "individual"
    individual_digits = np.mean([r["tasks"]["digits"]["normalized_accuracy"] for r in records
                                 if r["method"] == "individual"])
    assert ax.texts[0].get_text() == f"{100 * individual_digits:.0f}"  # first cell: the individual row on digits
    assert [t.get_text() for t in ax.get_xticklabels()] == [*TASKS, "avg"]
    assert fig.axes[1].get_ylabel() == "normalized accuracy (%)"  # the colour bar has units


def test_heatmap_values_are_the_normalized_means():
    records = [make_record("ties", s) for s in (0, 1)] + [make_record("individual", s) for s in (0, 1)]
    frame = report.records_frame(records)
    board = report.paper_order(report.leaderboard(frame))
    values = report.normalized_task_means(frame, list(board.index))
    fig = figures.heatmap_figure(values, board["normalized_mean"], suite_label="tiny8", protocol="transductive",
                                 seeds=[0, 1])
    expected = np.mean([r["tasks"]["shapes"]["normalized_accuracy"] for r in records if r["method"] == "ties"])
    cell = fig.axes[0].texts[(len(TASKS) + 1) * list(board.index).index("ties") + TASKS.index("shapes")]
    assert cell.get_text() == f"{100 * expected:.0f}"


def test_sensitivity_one_line_and_one_band_per_series(store_figures):
    _, drawn = store_figures
    ax = drawn["fig_sensitivity_init"].axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["adamerging_lw (init)", "samerging (init)", "samerging (init), rho=0"]
    assert all(len(line.get_xdata()) == 11 for line in ax.lines)
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 3  # ± std bands
    assert ax.get_ylabel() == "average accuracy (%)"
    colours = {mpl.colors.to_hex(line.get_color()).upper() for line in ax.lines}
    assert colours <= set(figures.OKABE_ITO.values())


def test_sensitivity_without_spread_has_no_band():
    records = tiny8_like_store(seeds=(0,))
    points = report.sweep_points(records, "ties", "scaling")
    fig = figures.sensitivity_figure(points, suite_label="tiny8", protocol="transductive", seeds=[0], x_label="λ")
    ax = fig.axes[0]
    assert len(ax.lines) == 1 and not [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_pareto_front_by_hand():
    times = [1.0, 2.0, 0.5, 3.0, 2.0]
    accuracies = [60.0, 70.0, 55.0, 65.0, 70.0]
    assert figures.pareto_front(times, accuracies) == [True, True, True, False, False]


def test_pareto_figure_marks_the_front_and_labels_every_merge_apart(store_figures):
    _, drawn = store_figures
    fig = drawn["fig_pareto"]
    ax = fig.axes[0]
    front = [line for line in ax.lines if line.get_label() == figures.PARETO_LABEL]
    assert len(front) == 1
    assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 3  # families of merges
    labels = [t for t in ax.texts if isinstance(t, Annotation)]
    assert len(labels) == 17  # 19 rows less the two reference rows, which are dotted lines
    assert ax.get_xscale() == "log" and "(s, log scale)" in ax.get_xlabel()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[-1] == "Pareto front (max accuracy, min time)"
    assert not texts_overlap(fig, [t for t in ax.texts])
    frame = ax.get_window_extent()
    renderer = fig.canvas.get_renderer()
    for label in labels:
        box = figures._text_box(label, renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_ablation_across_init_is_lines_and_alone_is_bars(store_figures):
    records, drawn = store_figures
    ax = drawn["fig_ablation_samerging_rho"].axes[0]
    assert [line.get_label() for line in ax.lines] == ["ρ = 0", "ρ = 0.07 (default)"]
    points = report.ablation_points(tiny8_like_store(sweep=False), "samerging", "rho")
    fig = figures.ablation_figure(points, method="samerging", param="rho", across=None, suite_label="tiny8",
                                  protocol="transductive", seeds=[0, 1, 2])
    assert figures.bar_count(fig) == 2
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["ρ = 0", "ρ = 0.07 (default)"]


def test_files_are_png_and_pdf_and_byte_stable(tmp_path):
    records = tiny8_like_store(seeds=(0, 1), sweep=False)
    first = figures.write_figures(records, tmp_path / "a")
    second = figures.write_figures(records, tmp_path / "b")
    names = sorted(p.name for p in first.written)
    assert names == sorted(f"fig_{n}.{ext}" for n in ("ablation_samerging_rho", "heatmap", "leaderboard", "pareto")
                           for ext in ("png", "pdf"))
    assert all(p.parent == tmp_path / "a" / "tiny8" for p in first.written)
    assert first.skipped == ["tiny8: fig_sensitivity skipped: no sweep recorded (a hyperparameter at 3 or more "
                             "values); run `bench sweep`"]
    for a, b in zip(first.written, second.written, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert first.written[0].read_bytes().startswith(b"\x89PNG")
    assert first.written[1].read_bytes().startswith(b"%PDF")


def test_missing_data_skips_with_a_note(tmp_path):
    records = [make_record(m, 0, normalized=False) for m in ("ties", "task_arithmetic")]
    for record in records:
        record["timings"] = {}
    out = figures.write_figures(records, tmp_path)
    assert [p.name for p in out.written] == ["fig_leaderboard.png", "fig_leaderboard.pdf"]
    assert any("fig_heatmap skipped: no normalized accuracy" in note for note in out.skipped)
    assert any("fig_pareto skipped: no timings" in note for note in out.skipped)
    assert any("fig_ablation skipped" in note for note in out.skipped)
