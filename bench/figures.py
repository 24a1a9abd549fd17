"""Paper figures from the results store: matplotlib with the Agg canvas, one colour-blind-safe style, PNG and PDF.

Every ``*_figure`` function is pure: it takes the frames of :mod:`bench.report` and returns a
``matplotlib.figure.Figure`` (no pyplot state, so tests can count its series). :func:`save_figure` writes
``<stem>.png`` and ``<stem>.pdf`` with the metadata that would change between runs removed, so the same records
give the same files. Colours are the Okabe–Ito palette (distinguishable with every common colour-vision
deficiency); series also differ by marker and line style, so they survive greyscale printing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox, blended_transform_factory

from bench import report
from bench.store import is_failed

OKABE_ITO = {
    "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73", "yellow": "#F0E442",
    "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7", "black": "#000000",
}
# Yellow last: it is the hardest to see on white.
SERIES_COLOURS = tuple(OKABE_ITO[c] for c in ("blue", "vermillion", "bluish_green", "reddish_purple", "orange",
                                              "sky_blue", "black", "yellow"))
SERIES_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
SERIES_DASHES = ("-", "--", "-.", ":")
FAMILY_COLOURS = {"reference": "#999999", "data-free": OKABE_ITO["blue"], "test-time": OKABE_ITO["orange"],
                  "data-using": OKABE_ITO["bluish_green"]}
FAMILY_MARKERS = {"reference": "s", "data-free": "o", "test-time": "^", "data-using": "D"}
FAMILY_LEGEND = {"reference": "reference rows", "data-free": "data-free", "test-time": "test-time (unlabeled data)",
                 "data-using": "data-using (labeled data)"}
HEATMAP_CMAP = "cividis"  # perceptually uniform and colour-blind safe
FULL_WIDTH_IN = 6.5  # a paper's text width; fonts below are the sizes they print at
DISPLAY_NAMES = {"rho": "ρ", "lambda": "λ", "alpha": "α"}

STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.title_fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#DDDDDD",
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.5,
    "lines.markersize": 5,
    "errorbar.capsize": 2,
    "pdf.fonttype": 42,  # embed TrueType, not Type 3: editable text, accepted by paper checkers
    "ps.fonttype": 42,
    "savefig.dpi": 200,
    "figure.dpi": 200,  # the saving resolution, so text measured while laying out labels is the text saved
    "svg.hashsalt": "merge-bench",
    "axes.prop_cycle": mpl.cycler(color=SERIES_COLOURS),
}
PNG_METADATA = {"Software": None}
PDF_METADATA = {"CreationDate": None}


def styled(build: Callable[..., Figure]) -> Callable[..., Figure]:
    """Run a figure builder under the module style (rc parameters apply when artists are created)."""

    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with mpl.rc_context(STYLE):
            return build(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = build.__name__, build.__doc__
    return wrapper


def new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.pdf`` (tight bounding box, no timestamps or software versions)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    with mpl.rc_context(STYLE):
        fig.savefig(png, format="png", bbox_inches="tight", pad_inches=0.03, metadata=PNG_METADATA)
        fig.savefig(pdf, format="pdf", bbox_inches="tight", pad_inches=0.03, metadata=PDF_METADATA)
    return [png, pdf]


def display_param(name: str) -> str:
    return DISPLAY_NAMES.get(name, name)


def series_style(index: int) -> dict[str, Any]:
    """Colour, marker and dash of the ``index``-th series (cycles; 32 series before a repeat)."""
    return {"color": SERIES_COLOURS[index % len(SERIES_COLOURS)],
            "marker": SERIES_MARKERS[index % len(SERIES_MARKERS)],
            "linestyle": SERIES_DASHES[(index // len(SERIES_COLOURS)) % len(SERIES_DASHES)]}


def percent(values: Iterable[float]) -> np.ndarray:
    return 100 * np.asarray(list(values), dtype=float)


def seeds_text(seeds: Sequence[int], counts: Iterable[int] | None = None) -> str:
    """``3 seeds``; ``2–3 seeds`` when the rows of a figure (``counts``: seeds per row) have different numbers."""
    numbers = sorted({int(c) for c in counts}) if counts is not None else [len(seeds)]
    if len(numbers) > 1:
        return f"{numbers[0]}–{numbers[-1]} seeds"
    return f"{numbers[0]} seed{'s' if numbers[0] != 1 else ''}"


TITLE_WIDTH = 72  # characters on one title line at the style's title size and FULL_WIDTH_IN


def figure_title(suite_label: str, protocol: str, what: str) -> str:
    """``what — suite, protocol: p``, on two lines when one would run wider than the figure."""
    where = f"{suite_label}, protocol: {protocol}"
    one_line = f"{what} — {where}"
    return one_line if len(one_line) <= TITLE_WIDTH else f"{what}\n{where}"


def _outside_legend(fig: Figure, ax: Axes, ncols: int, title: str | None = None, last: str | None = None) -> None:
    """A legend below the axes (never over the data); the entry labelled ``last`` goes last."""
    handles, labels = ax.get_legend_handles_labels()
    if last in labels:
        index = labels.index(last)
        handles.append(handles.pop(index))
        labels.append(labels.pop(index))
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=max(1, min(ncols, len(handles))), title=title)


# --- leaderboard bars ---------------------------------------------------------------------------------------


@styled
def leaderboard_figure(board: pd.DataFrame, *, suite_label: str, protocol: str, seeds: Sequence[int],
                       metric: str = "average") -> Figure:
    """Horizontal bars of ``metric`` (mean over seeds, in %) per method in the board's order (a leaderboard:
    best first), top to bottom, error bars ± std over seeds, coloured by family; the value is printed at the end of
    each bar."""
    count = len(board)
    fig, ax = new_figure(FULL_WIDTH_IN, 1.3 + 0.24 * count)
    positions = np.arange(count)
    means, stds = percent(board[f"{metric}_mean"]), np.nan_to_num(percent(board[f"{metric}_std"]))
    families = list(board["family"])
    for family in families_in_order(families):
        rows = [i for i, f in enumerate(families) if f == family]
        ax.barh(positions[rows], means[rows], xerr=stds[rows], height=0.7, color=FAMILY_COLOURS.get(family, "#666666"),
                label=FAMILY_LEGEND.get(family, family), error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
    for y, mean, std in zip(positions, means, stds, strict=True):
        if not np.isnan(mean):
            ax.text(mean + std + 1.0, y, f"{mean:.1f}", va="center", ha="left", fontsize=7)
    ax.set_yticks(positions, [str(m) for m in board.index])
    ax.invert_yaxis()
    ax.set_xlim(0, 109)
    ax.set_xticks(range(0, 101, 20))
    ax.spines["bottom"].set_bounds(0, 100)
    ax.grid(axis="y", visible=False)
    tasks = len(report.board_tasks(board))
    what = "normalized accuracy" if metric == "normalized" else f"average accuracy over {tasks} tasks"
    ax.set_xlabel(f"{what} (%), mean ± std over {seeds_text(seeds, board['seeds'])}")
    ax.set_title(figure_title(suite_label, protocol, "Leaderboard"))
    _outside_legend(fig, ax, ncols=4)
    return fig


def families_in_order(families: Sequence[str]) -> list[str]:
    """The families present, in the fixed legend order (reference, data-free, test-time, data-using, others)."""
    present = list(dict.fromkeys(families))
    known = [f for f in report.FAMILY_ORDER if f in present]
    return known + [f for f in present if f not in known]


def bar_count(fig: Figure) -> int:
    """Bars drawn in a figure's first axes (tests and sanity checks)."""
    return sum(len(c.patches) for c in fig.axes[0].containers if isinstance(c, BarContainer))


# --- heatmap ------------------------------------------------------------------------------------------------


def _text_colour(cmap: Any, norm: Any, value: float) -> str:
    red, green, blue, _ = cmap(norm(value))
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"


@styled
def heatmap_figure(values: pd.DataFrame, averages: pd.Series, *, suite_label: str, protocol: str,
                   seeds: Sequence[int], families: Sequence[str] | None = None) -> Figure:
    """Methods (rows) × tasks (columns) of normalized accuracy in %, each cell annotated, the average over tasks
    as a last column set apart by a gap, and a gap wherever ``families`` (one per row) changes."""
    table = values.copy()
    table["average"] = averages.reindex(table.index)
    data = percent(table.to_numpy().ravel()).reshape(table.shape)
    rows, cols = data.shape
    fig, ax = new_figure(FULL_WIDTH_IN, 1.6 + 0.26 * rows)
    finite = data[np.isfinite(data)]
    low = float(np.floor(finite.min() / 10) * 10) if finite.size else 0.0
    high = float(max(100.0, np.ceil(finite.max()))) if finite.size else 100.0
    norm = mpl.colors.Normalize(vmin=low, vmax=high)
    cmap = mpl.colormaps[HEATMAP_CMAP]
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for r in range(rows):
        for c in range(cols):
            value = data[r, c]
            text = "–" if np.isnan(value) else f"{value:.0f}"
            colour = "black" if np.isnan(value) else _text_colour(cmap, norm, value)
            ax.text(c, r, text, ha="center", va="center", fontsize=7, color=colour)
    ax.axvline(cols - 1.5, color="white", linewidth=3)
    for row in range(1, rows):
        if families is not None and families[row] != families[row - 1]:
            ax.axhline(row - 0.5, color="white", linewidth=3)
    ax.set_xticks(range(cols), [*values.columns, "avg"], rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(rows), [str(m) for m in table.index])
    ax.tick_params(length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("task")
    colourbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    colourbar.set_label("normalized accuracy (%)")
    ax.set_title(figure_title(suite_label, protocol, f"Normalized accuracy (merged / fine-tuned expert; mean over "
                                                     f"{seeds_text(seeds)})"))
    return fig


# --- sensitivity curves -------------------------------------------------------------------------------------


def _numeric(settings: Iterable[Any]) -> bool:
    return all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in settings)


@styled
def sensitivity_figure(points: pd.DataFrame, *, suite_label: str, protocol: str, seeds: Sequence[int],
                       x_label: str, metric: str = "average", what: str | None = None) -> Figure:
    """``metric`` (in %) against the swept value, one line per series (``label``) with a band of ± std across
    seeds where there is more than one seed."""
    fig, ax = new_figure(FULL_WIDTH_IN, 3.6)
    settings = report._setting_order(points["setting"])
    numeric = _numeric(settings)
    position = {s: (float(s) if numeric else i) for i, s in enumerate(settings)}
    for index, (label, part) in enumerate(points.groupby("label", sort=False)):
        part = part.sort_values("setting", key=lambda col: col.map(position))
        x = np.array([position[s] for s in part["setting"]])
        y, spread = percent(part["mean"]), percent(part["std"])
        style = series_style(index)
        ax.plot(x, y, label=str(label), color=style["color"], marker=style["marker"], linestyle=style["linestyle"])
        if np.isfinite(spread).any():
            ax.fill_between(x, y - np.nan_to_num(spread), y + np.nan_to_num(spread), color=style["color"], alpha=0.18,
                            linewidth=0)
    if not numeric:
        ax.set_xticks(range(len(settings)), [report._short(s) for s in settings], rotation=30, ha="right")
    ax.set_xlabel(x_label)
    metric_text = "normalized accuracy" if metric == "normalized_average" else "average accuracy"
    ax.set_ylabel(f"{metric_text} (%)")
    params = ", ".join(dict.fromkeys(str(p) for p in points["param"])) if "param" in points else "the swept value"
    ax.set_title(figure_title(suite_label, protocol, what or f"Sensitivity to {params}"))
    counts = points["seeds"] if "seeds" in points else None
    band = (f"line: mean, band: ± std over {seeds_text(seeds, counts)}" if len(seeds) > 1
            else seeds_text(seeds, counts))
    _outside_legend(fig, ax, ncols=3, title=band)
    return fig


# --- accuracy against time (Pareto front) --------------------------------------------------------------------


def pareto_front(times: Sequence[float], accuracies: Sequence[float]) -> list[bool]:
    """Whether each point is on the front of (min time, max accuracy): no other point is at least as fast and
    at least as accurate while strictly better in one; ties in both keep the first."""
    flags = []
    points = list(zip(times, accuracies, strict=True))
    for i, (t, a) in enumerate(points):
        dominated = any((t2 <= t and a2 >= a and (t2 < t or a2 > a)) or (j < i and t2 == t and a2 == a)
                        for j, (t2, a2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


Segment = tuple[tuple[float, float], tuple[float, float]]
# Costs of a label position, worst first: a label over another label or outside the axes, text over a marker,
# error bar or line, a leader through a marker, label or leader, a leaderless label as near another point as its
# own, a leader across a drawn line (the Pareto staircase). Overlap areas (pixels²) order positions within a rank.
LABEL_OVERLAP_PENALTY = 1e8
OBSTACLE_PENALTY = 1e7
CROSSING_PENALTY = 1e6
AMBIGUITY_PENALTY = 1e5
LINE_PENALTY = 1e4


@dataclass
class Placement:
    note: Annotation
    box: Bbox  # padded text box, as registered in the placer's obstacles and labels
    leader: Segment | None
    data_xy: tuple[float, float]
    cost: float


@dataclass
class LabelPlacer:
    """Placement of point labels in display space: greedy, then refined.

    Each label tries rings of offsets, near to far (eight directions close in, sixteen further out); a candidate
    costs the penalties below (text over another label, a marker, a line or outside the axes; a leader line
    crossing a marker, label or leader; a leaderless label as near another point as its own) plus a little per
    pixel of distance, and the cheapest wins (offsets beyond the nearest ring get a thin leader line to their
    point). :meth:`refine` then moves each label again with every other one in place, while that lowers its cost.
    """

    ax: Axes
    obstacles: list[Bbox] = field(default_factory=list)  # text must not overlap these
    labels: list[Bbox] = field(default_factory=list)  # leaders must not cross these
    markers: list[tuple[float, float, float]] = field(default_factory=list)  # (x, y, radius) px, nor these
    leaders: list[Segment] = field(default_factory=list)
    lines: list[Segment] = field(default_factory=list)  # drawn lines leaders had better not cross
    placements: list[Placement] = field(default_factory=list)
    radii: tuple[float, ...] = (4.0, 10.0, 18.0, 28.0, 40.0, 54.0, 72.0, 96.0)

    NEAR = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))
    FAR = tuple((float(np.cos(a)), float(np.sin(a))) for a in np.linspace(0, 2 * np.pi, 16, endpoint=False))
    LEADER = {"arrowstyle": "-", "color": "#777777", "linewidth": 0.5, "shrinkA": 1, "shrinkB": 4}
    COST_PER_POINT = 20.0  # distance from the point, so that of two free positions the nearer wins

    def block(self, box: Bbox) -> None:
        self.obstacles.append(box)

    def block_label(self, box: Bbox) -> None:
        self.obstacles.append(box)
        self.labels.append(box)

    def mark(self, x: float, y: float, radius: float) -> None:
        """A marker at display position (x, y) that leader lines of other points must go around."""
        self.markers.append((x, y, radius))

    def place(self, x: float, y: float, text: str, fontsize: float = 7) -> None:
        """Label the data point (x, y)."""
        cost, offset, ha, va, radius = self._best(x, y, text, fontsize)
        self._commit(x, y, text, fontsize, offset, ha, va, radius, cost)

    def refine(self, passes: int = 2) -> None:
        """Move each label to its best position given all the others, while any label gets cheaper."""
        for _ in range(passes):
            moved = False
            for index, placement in enumerate(list(self.placements)):
                self._release(placement)
                x, y = placement.data_xy
                note = placement.note
                current = self._candidate_cost(note, (x, y), tuple(note.xyann))
                best = self._best(x, y, note.get_text(), note.get_fontsize())
                if best[0] < current - 1e-6:
                    note.remove()
                    self.placements.pop(index)
                    self._commit(x, y, note.get_text(), note.get_fontsize(), *best[1:], best[0], index=index)
                    moved = True
                else:
                    self._hold(placement)
            if not moved:
                return

    def _best(self, x: float, y: float, text: str, fontsize: float) -> tuple[float, tuple[float, float], str, str,
                                                                              float]:
        renderer = self.ax.figure.canvas.get_renderer()
        probe = self.ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize,
                                 annotation_clip=False)
        best: tuple[float, tuple[float, float], str, str, float] | None = None
        for radius in self.radii:
            for dx, dy in self.NEAR if radius <= self.radii[1] else self.FAR:
                ha, va = _alignment(dx, dy)
                probe.xyann = (dx * radius, dy * radius)
                probe.set_horizontalalignment(ha)
                probe.set_verticalalignment(va)
                cost = self._candidate_cost(probe, (x, y), probe.xyann, renderer)
                if best is None or cost < best[0]:
                    best = (cost, (dx * radius, dy * radius), ha, va, radius)
            if best is not None and best[0] <= self.COST_PER_POINT * radius:  # nothing in the way: stop here
                break
        probe.remove()
        assert best is not None
        return best

    def _candidate_cost(self, note: Annotation, data_xy: tuple[float, float], offset: tuple[float, float],
                        renderer: Any = None) -> float:
        renderer = renderer or self.ax.figure.canvas.get_renderer()
        radius = float(np.hypot(*offset))
        box = _text_box(note, renderer).padded(2.0)
        point = tuple(self.ax.transData.transform(data_xy))
        frame = self.ax.get_window_extent(renderer)
        return self._cost(box, point, radius > self.radii[0] + 1e-9, frame) + self.COST_PER_POINT * radius

    def _commit(self, x: float, y: float, text: str, fontsize: float, offset: tuple[float, float], ha: str, va: str,
                radius: float, cost: float, index: int | None = None) -> None:
        renderer = self.ax.figure.canvas.get_renderer()
        leader = dict(self.LEADER) if radius > self.radii[0] else None
        note = self.ax.annotate(text, (x, y), xytext=offset, textcoords="offset points", ha=ha, va=va,
                                fontsize=fontsize, arrowprops=leader, annotation_clip=False)
        note.set_in_layout(False)
        box = _text_box(note, renderer)
        point = tuple(self.ax.transData.transform((x, y)))
        placement = Placement(note, box.padded(2.0), _leader_segment(box, point) if leader else None, (x, y), cost)
        self.placements.insert(len(self.placements) if index is None else index, placement)
        self._hold(placement)

    def _hold(self, placement: Placement) -> None:
        self.block_label(placement.box)
        if placement.leader is not None:
            self.leaders.append(placement.leader)

    def _release(self, placement: Placement) -> None:
        self.obstacles = [b for b in self.obstacles if b is not placement.box]
        self.labels = [b for b in self.labels if b is not placement.box]
        self.leaders = [s for s in self.leaders if s is not placement.leader]

    def _ambiguous(self, box: Bbox, point: tuple[float, float], margin: float = 8.0) -> bool:
        """Whether a label without a leader has another marker about as close to its near edge (the spot facing its
        point, where a reader looks for the point) as its own point."""
        anchor = _nearest_in_box(box, point)
        own = float(np.hypot(anchor[0] - point[0], anchor[1] - point[1]))
        return any(np.hypot(anchor[0] - x, anchor[1] - y) - radius < own + margin
                   for x, y, radius in self.markers if (x, y) != point)

    def _cost(self, box: Bbox, point: tuple[float, float], has_leader: bool, frame: Bbox) -> float:
        cost = 0.0
        for other in self.obstacles:
            area = _overlap_area(box, other)
            if area > 0:
                is_label = any(other is label for label in self.labels)
                cost += area + (LABEL_OVERLAP_PENALTY if is_label else OBSTACLE_PENALTY)
        outside = _outside_area(box, frame)
        cost += outside + (LABEL_OVERLAP_PENALTY if outside > 0 else 0.0)
        cost += CROSSING_PENALTY * sum(_segment_hits(segment, box.contains) for segment in self.leaders)
        if not has_leader and self._ambiguous(box, point):
            cost += AMBIGUITY_PENALTY
        if has_leader:
            segment = _leader_segment(box, point)
            skip = self.LEADER["shrinkB"] * self.ax.figure.dpi / 72  # the leader stops short of its own marker
            others = [m for m in self.markers if (m[0], m[1]) != point]
            clearance = 3.0 * self.ax.figure.dpi / 72  # a leader grazing another marker reads as pointing at it
            cost += CROSSING_PENALTY * sum(_segment_hits(segment, _in_circle(m, clearance), skip) for m in others)
            cost += CROSSING_PENALTY * sum(_segment_hits(segment, other.contains, skip) for other in self.labels)
            cost += CROSSING_PENALTY * sum(_segments_cross(segment, other) for other in self.leaders)
            cost += LINE_PENALTY * sum(_segments_cross(segment, other) for other in self.lines)
        return cost


def _alignment(dx: float, dy: float) -> tuple[str, str]:
    """Text alignment that puts a label on the side of its point the offset points to."""
    return ("left" if dx > 0.3 else "right" if dx < -0.3 else "center",
            "bottom" if dy > 0.3 else "top" if dy < -0.3 else "center")


def _leader_segment(box: Bbox, point: tuple[float, float]) -> Segment:
    """The leader as matplotlib draws it: from the text's centre (clipped at the text's box) to the point."""
    centre = ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
    dx, dy = point[0] - centre[0], point[1] - centre[1]
    scale = min(box.width / 2 / abs(dx) if dx else np.inf, box.height / 2 / abs(dy) if dy else np.inf, 1.0)
    return ((centre[0] + scale * dx, centre[1] + scale * dy), point)


def _nearest_in_box(box: Bbox, point: tuple[float, float]) -> tuple[float, float]:
    return (min(max(point[0], box.x0), box.x1), min(max(point[1], box.y0), box.y1))


def _in_circle(marker: tuple[float, float, float], margin: float = 0.0) -> Callable[[float, float], bool]:
    x, y, radius = marker
    return lambda px, py: (px - x) ** 2 + (py - y) ** 2 <= (radius + margin) ** 2


def _segment_hits(segment: Segment, inside: Callable[[float, float], bool], skip_end: float = 0.0,
                  samples: int = 32) -> bool:
    """Whether the segment passes through a region (sampled; the last ``skip_end`` pixels at the point end, left
    blank by the leader's shrink, are not counted)."""
    (x0, y0), (x1, y1) = segment
    length = float(np.hypot(x1 - x0, y1 - y0))
    stop = 1.0 - skip_end / length if length > skip_end else 0.0
    return any(inside(x0 + stop * k / samples * (x1 - x0), y0 + stop * k / samples * (y1 - y0))
               for k in range(samples + 1))


def _segments_cross(a: Segment, b: Segment) -> bool:
    def turn(p: tuple[float, float], q: tuple[float, float], r: tuple[float, float]) -> float:
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    (p1, p2), (q1, q2) = a, b
    return turn(p1, p2, q1) * turn(p1, p2, q2) < 0 and turn(q1, q2, p1) * turn(q1, q2, p2) < 0


def _text_box(note: Annotation, renderer: Any) -> Bbox:
    """The box of an annotation's text alone (its own extent includes the leader line, which reaches the point)."""
    note.update_positions(renderer)
    return Text.get_window_extent(note, renderer)


def _overlap_area(a: Bbox, b: Bbox) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def _outside_area(box: Bbox, frame: Bbox) -> float:
    inside = _overlap_area(box, frame)
    return box.width * box.height - inside


@styled
def pareto_figure(board: pd.DataFrame, cost: pd.DataFrame, *, suite_label: str, protocol: str,
                  seeds: Sequence[int]) -> Figure:
    """Average accuracy (%, ± std over seeds) against total time (merge + adapt + eval, log scale) per merge,
    coloured by family, every point labelled; the Pareto front (max accuracy, min time) is ringed and joined by a
    staircase; reference rows are dotted horizontal lines."""
    total = cost["total_s_mean"].reindex(board.index).astype(float)
    merges = board[(board["family"] != report.REFERENCE_FAMILY) & np.isfinite(total) & (total > 0)
                   & np.isfinite(board["average_mean"].astype(float))]
    fig, ax = new_figure(FULL_WIDTH_IN, 4.4)
    times = total.reindex(merges.index).to_numpy()
    accuracy, spread = percent(merges["average_mean"]), np.nan_to_num(percent(merges["average_std"]))
    families = list(merges["family"])
    for family in families_in_order(families):
        rows = [i for i, f in enumerate(families) if f == family]
        ax.errorbar(times[rows], accuracy[rows], yerr=spread[rows], linestyle="none",
                    marker=FAMILY_MARKERS.get(family, "o"), color=FAMILY_COLOURS.get(family, "#666666"),
                    markersize=6, elinewidth=0.8, label=FAMILY_LEGEND.get(family, family), zorder=3)
    on_front = np.array(pareto_front(list(times), list(accuracy)), dtype=bool)
    order = np.argsort(times[on_front], kind="stable")
    front_t, front_a = times[on_front][order], accuracy[on_front][order]
    ax.plot(front_t, front_a, drawstyle="steps-post", color="black", linewidth=1.0, marker="o",
            markersize=RING_SIZE_PT, markerfacecolor="none", markeredgewidth=1.0,
            label=PARETO_LABEL, zorder=2)
    references = board[board["family"] == report.REFERENCE_FAMILY]
    levels = [(str(name), level) for name, level in zip(references.index, percent(references["average_mean"]),
                                                        strict=True) if np.isfinite(level)]
    for _, level in levels:
        ax.axhline(level, color="#777777", linestyle=":", linewidth=1.0, zorder=1)
    _log_time_axis(ax, times)
    low = min([*(accuracy - spread), *(level for _, level in levels)], default=0.0)
    high = max([*(accuracy + spread), *(level for _, level in levels)], default=100.0)
    margin = 0.07 * (high - low + 1)
    ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("total time per run (s, log scale): merge + adapt + eval")
    ax.set_ylabel(f"average accuracy (%), mean ± std over {seeds_text(seeds, merges['seeds'])}")
    ax.set_title(figure_title(suite_label, protocol, "Accuracy against time"))
    _outside_legend(fig, ax, ncols=2, last=PARETO_LABEL)
    fig.canvas.draw()  # fix the layout before measuring where labels fit
    fig.set_layout_engine("none")
    placer = LabelPlacer(ax)
    pixels_per_point = fig.dpi / 72
    for t, a, s, front in zip(times, accuracy, spread, on_front, strict=True):
        radius = (RING_SIZE_PT if front else 6.0) / 2 * pixels_per_point
        placer.block(_point_box(ax, t, a, s, half=radius + pixels_per_point))
        placer.mark(*ax.transData.transform((t, a)), radius)
    for name, level in levels:
        _reference_label(ax, placer, name, level)
    for box in _staircase_boxes(ax, front_t, front_a):
        placer.block(box)
    placer.lines += _staircase_segments(ax, front_t, front_a)
    for i in _crowded_first(placer.markers, on_front):
        placer.place(times[i], accuracy[i], str(merges.index[i]))
    placer.refine()
    return fig


def _reference_label(ax: Axes, placer: LabelPlacer, name: str, level: float) -> None:
    """Name a reference row's dotted line just above it, at the left end or, if a point is there, the right."""
    renderer = ax.figure.canvas.get_renderer()
    transform = blended_transform_factory(ax.transAxes, ax.transData)
    best = None
    for x, ha in ((0.005, "left"), (0.995, "right")):
        note = ax.text(x, level, f" {name} ", transform=transform, va="bottom", ha=ha, fontsize=7, color="#555555")
        note.set_in_layout(False)
        box = note.get_window_extent(renderer)
        clash = sum(_overlap_area(box, other) for other in placer.obstacles)
        if best is None or clash < best[0]:
            if best is not None:
                best[1].remove()
            best = (clash, note, box)
        else:
            note.remove()
        if clash == 0:
            break
    assert best is not None
    placer.block_label(best[2])
    placer.block(_hline_box(ax, level))


RING_SIZE_PT = 11.0
PARETO_LABEL = "Pareto front (max accuracy, min time)"


def _log_time_axis(ax: Axes, times: np.ndarray) -> None:
    """Log x axis padded around the data, ticks at 1-2-5 steps labelled as plain seconds (0.2, 1, 50)."""
    ax.set_xscale("log")
    if len(times):
        ax.set_xlim(float(np.min(times)) / 2, float(np.max(times)) * 2)
    ax.xaxis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())


def _crowded_first(markers: Sequence[tuple[float, float, float]], first: Sequence[bool],
                   reach: float = 60.0) -> list[int]:
    """Indices of the points, those flagged ``first`` before the rest, each part most crowded first (most
    markers within ``reach`` pixels): greedy placement leaves the free space to the points that need it."""
    def crowd(i: int) -> int:
        x, y, _ = markers[i]
        return sum(np.hypot(x - u, y - v) < reach for u, v, _ in markers) - 1

    return sorted(range(len(markers)), key=lambda i: (not first[i], -crowd(i), i))


def _staircase_segments(ax: Axes, times: np.ndarray, accuracies: np.ndarray) -> list[Segment]:
    points = [tuple(ax.transData.transform((t, a))) for t, a in zip(times, accuracies, strict=True)]
    segments: list[Segment] = []
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        segments += [((x0, y0), (x1, y0)), ((x1, y0), (x1, y1))]
    return segments


def _hline_box(ax: Axes, level: float, half: float = 2.0) -> Bbox:
    frame = ax.get_window_extent()
    _, y = ax.transData.transform((1.0, level))
    return Bbox.from_extents(frame.x0, y - half, frame.x1, y + half)


def _staircase_boxes(ax: Axes, times: np.ndarray, accuracies: np.ndarray, half: float = 2.0) -> list[Bbox]:
    """Thin boxes around the segments of the steps-post staircase through the front."""
    boxes = []
    points = [ax.transData.transform((t, a)) for t, a in zip(times, accuracies, strict=True)]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        boxes.append(Bbox.from_extents(min(x0, x1), y0 - half, max(x0, x1), y0 + half))
        boxes.append(Bbox.from_extents(x1 - half, min(y0, y1), x1 + half, max(y0, y1)))
    return boxes


def _point_box(ax: Axes, x: float, y: float, err: float, half: float = 4.0) -> Bbox:
    x_px, y_px = ax.transData.transform((x, y))
    _, low = ax.transData.transform((x, y - err))
    _, high = ax.transData.transform((x, y + err))
    return Bbox.from_extents(x_px - half, min(low, y_px - half), x_px + half, max(high, y_px + half))


# --- ablation -----------------------------------------------------------------------------------------------


@styled
def ablation_figure(points: pd.DataFrame, *, method: str, param: str, across: str | None, suite_label: str,
                    protocol: str, seeds: Sequence[int], x_label: str | None = None) -> Figure:
    """One value of ``param`` against another: lines with ± std bands against ``across`` when the ablation was
    repeated over a sweep, otherwise one bar per value (error bars ± std, the value printed on each bar)."""
    title = f"Ablation of {display_param(param)} in {method}"
    points = points.assign(label=[str(label).replace(f"{param}=", f"{display_param(param)} = ", 1)
                                  for label in points["label"]])
    if across:
        return sensitivity_figure(points, suite_label=suite_label, protocol=protocol, seeds=seeds,
                                  x_label=x_label or f"{across} (value of {method}.{across})", what=title)
    fig, ax = new_figure(FULL_WIDTH_IN * 0.6, 3.2)
    labels = list(points["label"])
    means, spread = percent(points["mean"]), np.nan_to_num(percent(points["std"]))
    for index, (label, mean, std) in enumerate(zip(labels, means, spread, strict=True)):
        ax.bar([index], [mean], yerr=[std], width=0.6, color=series_style(index)["color"], label=label,
               error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
        ax.text(index, mean + std + 1.5, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 109)
    ax.set_yticks(range(0, 101, 20))
    ax.spines["left"].set_bounds(0, 100)
    ax.grid(axis="x", visible=False)
    ax.set_xlabel(f"{method}.{param}, every other hyperparameter at its default\n"
                  f"error bars: ± std over {seeds_text(seeds, points['seeds'])}")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(f"{title}\n{suite_label}, protocol: {protocol}")
    return fig


# --- every figure of a store --------------------------------------------------------------------------------


@dataclass
class FigureOutputs:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per figure left out, saying why


def suite_figures(records: Sequence[report.Record], suite_label: str) -> dict[str, Figure | str]:
    """Every figure `bench report` draws for one suite configuration, by file name (without extension); a string
    instead of a figure says why that figure was skipped."""
    swept = report.swept_params(records)
    frame = report.records_frame(report.leaderboard_records(records, swept)).dropna(axis=1, how="all")
    all_seeds = report.suite_seeds(report.records_frame(records))
    protocol, seeds = report.suite_protocol(frame), report.suite_seeds(frame)
    ranked = report.leaderboard(frame)
    board = report.paper_order(ranked)
    common = {"suite_label": suite_label, "protocol": protocol}
    figures: dict[str, Figure | str] = {
        "fig_leaderboard": leaderboard_figure(ranked, seeds=seeds, **common),
        "fig_heatmap": heatmap_or_reason(frame, board, seeds=seeds, **common),
        "fig_pareto": pareto_or_reason(frame, board, seeds=seeds, **common),
    }
    by_param = report.swept_by_param(swept)
    if not by_param:
        figures["fig_sensitivity"] = "no sweep recorded (a hyperparameter at 3 or more values); run `bench sweep`"
    for param, methods in by_param.items():
        points = pd.concat([report.sweep_points(records, m, param) for m in methods], ignore_index=True)
        swept_names = ", ".join(f"{m}.{param}" for m in methods)
        figures[f"fig_sensitivity_{param}"] = sensitivity_figure(
            points, seeds=all_seeds, x_label=f"{param} (value of {swept_names})", **common)
    ablations = [(param, m) for param in report.ABLATION_PARAMS for m in report.ablated_methods(records, param)]
    if not ablations:
        figures["fig_ablation"] = (f"no ablation recorded ({', '.join(report.ABLATION_PARAMS)} at 2 or more values "
                                   "of one method)")
    for param, method in ablations:
        across = report.ablation_across(records, method, param, swept)
        points = report.ablation_points(records, method, param, across)
        if not points.empty:
            figures[f"fig_ablation_{method}_{param}"] = ablation_figure(
                points, method=method, param=param, across=across, seeds=all_seeds, **common)
    return figures


def heatmap_or_reason(frame: pd.DataFrame, board: pd.DataFrame, **kwargs: Any) -> Figure | str:
    values = report.normalized_task_means(frame, list(board.index))
    if values.empty or values.isna().all().all():
        return "no normalized accuracy in the records (the `individual` row is its reference)"
    return heatmap_figure(values, board["normalized_mean"], families=list(board["family"]), **kwargs)


def pareto_or_reason(frame: pd.DataFrame, board: pd.DataFrame, **kwargs: Any) -> Figure | str:
    cost = report.cost_table(frame)
    merges = board[board["family"] != report.REFERENCE_FAMILY]
    total = cost["total_s_mean"].reindex(merges.index)
    if not (np.isfinite(total.astype(float)) & (total > 0)).any():
        return "no timings of a merge in the records"
    return pareto_figure(board, cost, **kwargs)


def write_figures(records: Iterable[report.Record], out_dir: Path, suite: str | None = None) -> FigureOutputs:
    """Draw every figure per suite configuration into ``<out_dir>/<suite>/<name>.{png,pdf}``."""
    outputs = FigureOutputs()
    for suite_label, group in report.suite_groups(records).items():
        if not report.matches_suite(suite_label, suite):
            continue
        if all(is_failed(record) for record in group):
            outputs.skipped.append(f"{suite_label}: every figure skipped: no scored runs ({len(group)} failed)")
            continue
        folder = out_dir / report.suite_slug(suite_label)
        for name, figure in suite_figures(group, suite_label).items():
            if isinstance(figure, str):
                outputs.skipped.append(f"{suite_label}: {name} skipped: {figure}")
            else:
                outputs.written += save_figure(figure, folder / name)
    return outputs
