"""Leaderboards: pure functions from records to tables (terminal text, Markdown, CSV, LaTeX).

One leaderboard per suite configuration (suite name plus its non-default parameters, protocol included, so two
protocols are never pooled). A row is a method with its non-default hyperparameters; cells are mean ± sample std
over seeds, in percent, and the average carries a 95% Student-t confidence interval of the mean over seeds. The
best merge per column (reference rows excluded) is marked: bold in Markdown and LaTeX, ``*`` in the terminal.

Sweep points (a hyperparameter recorded at three or more values for one method) are kept out of the leaderboard
and go to the sensitivity tables; the cost table gives merge, adapt and eval seconds, peak memory and device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from bench.store import is_failed

Record = dict[str, Any]

REFERENCE_FAMILY = "reference"
FAMILY_ORDER = ("reference", "data-free", "test-time", "data-using")
CI_LEVEL = 0.95
SWEEP_MIN_VALUES = 3  # a hyperparameter recorded at this many values for one method is a sweep, not a row
COSTED_PHASES = ("merge", "adapt", "eval")  # total time; suite loading is shared by every method and left out
MEMORY_KINDS = {
    "cuda_max_allocated": "GPU max allocated",
    "cpu_peak_rss": "CPU peak RSS",
    "cpu_peak_rss_process_lifetime": "CPU peak RSS (process lifetime)",
}


def variant_label(name: str, variant: dict[str, Any]) -> str:
    if not variant:
        return name
    inner = ",".join(f"{k}={_short(v)}" for k, v in sorted(variant.items()))
    return f"{name}({inner})"


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def device_label(environment: dict[str, Any]) -> str:
    """``NVIDIA H100 80GB HBM3`` on CUDA, ``CPU (2 threads)`` on CPU, from a record's environment."""
    device = environment.get("device")
    if device == "cuda":
        return str(environment.get("gpu") or "CUDA")
    if device == "cpu":
        threads = environment.get("torch_threads")
        return f"CPU ({threads} thread{'s' if threads != 1 else ''})" if threads else "CPU"
    return str(device) if device else ""


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per record: task accuracies as ``task:<name>`` columns and normalized ones as ``norm:<name>``
    (fractions), seconds per phase as ``time:<phase>``, peak memory (``memory_bytes``, ``memory_kind``), device.
    Failed records (no scores) are left out: see :func:`failed_lines`."""
    rows = []
    for record in records:
        if is_failed(record):
            continue
        row = {
            "suite": variant_label(record["suite"], record.get("suite_variant", {})),
            "method": variant_label(record["method"], record.get("variant", {})),
            "family": record["family"],
            "data": record["data_access"],
            "protocol": record.get("protocol", ""),
            "seed": record["seed"],
            "average": record["average"],
            "normalized": record.get("normalized_average"),
            "output": record.get("output", "merged"),
            "per_task_bytes": (record.get("notes") or {}).get("per_task_bytes"),
        }
        for task, entry in record["tasks"].items():
            row[f"task:{task}"] = entry["accuracy"]
        for task, entry in record["tasks"].items():
            row[f"norm:{task}"] = entry.get("normalized_accuracy")
        for phase, seconds in record.get("timings", {}).items():
            row[f"time:{phase}"] = seconds
        memory = record.get("peak_memory") or {}
        row["memory_bytes"] = memory.get("bytes")
        row["memory_kind"] = memory.get("kind")
        row["device"] = device_label(record.get("environment") or {})
        rows.append(row)
    return pd.DataFrame(rows)


def task_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("task:")]


def ci_halfwidth(values: Iterable[float], level: float = CI_LEVEL) -> float:
    """Half-width of the Student-t confidence interval of the mean, t_{(1+level)/2, n-1} · s / √n; NaN if n < 2."""
    data = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if data.size < 2:
        return float("nan")
    quantile = stats.t.ppf((1 + level) / 2, data.size - 1)
    return float(quantile * data.std(ddof=1) / math.sqrt(data.size))


def leaderboard(frame: pd.DataFrame) -> pd.DataFrame:
    """Aggregate one suite's records over seeds: ``<col>_mean``, ``<col>_std``, ``<col>_ci95`` (half-width of the
    95% t-interval of the mean) and ``seeds`` per method."""
    metrics = task_columns(frame) + ["average", "normalized"]
    grouped = frame.groupby("method", sort=False)
    board = grouped[["family", "data"]].first()
    board["output"] = grouped["output"].first() if "output" in frame else "merged"
    board["seeds"] = grouped["seed"].nunique()
    for col in metrics:
        values = frame[col].astype(float) if col in frame else pd.Series(np.nan, index=frame.index)
        board[f"{col}_mean"] = values.groupby(frame["method"]).mean()
        board[f"{col}_std"] = values.groupby(frame["method"]).std(ddof=1)
        board[f"{col}_ci95"] = values.groupby(frame["method"]).agg(ci_halfwidth)
    board = board.sort_values("average_mean", ascending=False, kind="stable")
    return board


def best_rows(board: pd.DataFrame, column: str) -> set[str]:
    """Methods holding the best mean of ``column`` among the merged models: reference rows and rows with one set of
    weights per task are not ranked with them (ties all marked)."""
    ranked = (board["family"] != REFERENCE_FAMILY) & (board.get("output", "merged") != "per_task")
    merges = board[ranked][f"{column}_mean"].dropna()
    if merges.empty:
        return set()
    best = merges.max()
    return set(merges.index[np.isclose(merges, best, rtol=0, atol=1e-12)])


PER_TASK_MARK = "†"
PER_TASK_NOTE = ("† one set of weights per task: a shared model plus a per-task part (its size per task in the cost "
                 "table); not ranked with the merged models")


def row_label(method: str, entry: pd.Series) -> str:
    """The method's label in a table: marked when its result is one set of weights per task."""
    return f"{method} {PER_TASK_MARK}" if entry.get("output") == "per_task" else str(method)


def per_task_note(board: pd.DataFrame) -> list[str]:
    """The note explaining the mark, when a row has it."""
    return [PER_TASK_NOTE] if "output" in board and (board["output"] == "per_task").any() else []


def format_cell(mean: float, std: float) -> str:
    if mean is None or np.isnan(mean):
        return "–"
    text = f"{100 * mean:.1f}"
    if std is not None and not np.isnan(std):
        text += f" ± {100 * std:.1f}"
    return text


def format_interval(mean: float, halfwidth: float) -> str:
    """``[58.5, 64.5]`` in %, or ``n/a`` when there is no interval (one seed)."""
    if mean is None or np.isnan(mean):
        return "–"
    if halfwidth is None or np.isnan(halfwidth):
        return "n/a"
    return f"[{100 * (mean - halfwidth):.1f}, {100 * (mean + halfwidth):.1f}]"


def board_tasks(board: pd.DataFrame) -> list[str]:
    """Task names of a leaderboard, in column order."""
    return [c[len("task:"):-len("_mean")] for c in board.columns if c.startswith("task:") and c.endswith("_mean")]


def _table_rows(board: pd.DataFrame, mark: tuple[str, str]) -> tuple[list[str], list[list[str]]]:
    tasks = [f"task:{t}" for t in board_tasks(board)]
    metrics = tasks + ["average", "normalized"]
    header = ["method", "data", "seeds"] + [t.removeprefix("task:") for t in tasks] + ["avg", "avg 95% CI",
                                                                                       "norm. avg"]
    best = {col: best_rows(board, col) for col in metrics}
    rows = []
    for method, entry in board.iterrows():
        cells = [row_label(method, entry), str(entry["data"]), str(entry["seeds"])]
        for col in metrics:
            cell = format_cell(entry[f"{col}_mean"], entry[f"{col}_std"])
            if method in best[col]:
                cell = f"{mark[0]}{cell}{mark[1]}"
            cells.append(cell)
            if col == "average":
                cells.append(format_interval(entry["average_mean"], entry.get("average_ci95", np.nan)))
        rows.append(cells)
    return header, rows


def to_markdown(board: pd.DataFrame, title: str) -> str:
    header, rows = _table_rows(board, ("**", "**"))
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Accuracy in %, mean ± std over seeds; avg 95% CI: Student-t interval of the mean over seeds "
              "(n/a with one seed); best merge per column in bold (reference rows excluded).", *per_task_note(board)]
    return "\n".join(lines) + "\n"


def to_text(board: pd.DataFrame, title: str) -> str:
    header, rows = _table_rows(board, ("*", ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    lines = [title, fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines.append("accuracy %, mean ± std over seeds; avg 95% CI: t-interval of the mean; * best merge per column")
    lines += per_task_note(board)
    return "\n".join(lines) + "\n"


def to_csv(board: pd.DataFrame) -> str:
    out = board.copy()
    out.insert(0, "method", out.index)
    return out.to_csv(index=False, float_format="%.6f")


def suite_title(frame: pd.DataFrame, suite: str) -> str:
    protocols = sorted(set(frame["protocol"]))
    return f"{suite} — protocol: {', '.join(protocols)}"


MAX_SLUG = 96


def suite_slug(suite_label: str) -> str:
    """A file-name-safe form of a suite configuration label: ``tiny8(size=ci)`` -> ``tiny8-size=ci``."""
    flat = suite_label.replace("(", "-").replace(",", "-").replace(")", "").replace("[", "-").replace("]", "")
    slug = "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in flat)
    if len(slug) <= MAX_SLUG:  # long labels (paths, task maps) would overflow file-name limits: keep a prefix + hash
        return slug
    return f"{slug[:MAX_SLUG - 17]}-{hashlib.sha256(suite_label.encode()).hexdigest()[:16]}"


def file_stem(suite_label: str) -> str:
    return f"leaderboard_{suite_slug(suite_label)}"


# --- grouping: suite configurations, sweeps, leaderboard rows -------------------------------------------------


def suite_groups(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records per suite configuration label (``tiny8``, ``tiny8(protocol=inductive)``), sorted by label.

    The protocol is a suite parameter, so it is part of the label; a label whose records still mix protocols is
    split into ``<label>[protocol=<p>]`` groups, so no table or figure ever pools two protocols.
    """
    by_label: dict[str, list[Record]] = {}
    for record in records:
        by_label.setdefault(variant_label(record["suite"], record.get("suite_variant", {})), []).append(record)
    groups: dict[str, list[Record]] = {}
    for label, part in sorted(by_label.items()):
        protocols = sorted({str(r.get("protocol", "")) for r in part})
        if len(protocols) == 1:
            groups[label] = part
            continue
        for protocol in protocols:
            groups[f"{label}[protocol={protocol}]"] = [r for r in part if str(r.get("protocol", "")) == protocol]
    return groups


def matches_suite(suite_label: str, suite: str | None) -> bool:
    """Whether a configuration label belongs to ``suite`` (``None``: every suite)."""
    if suite is None or suite_label == suite:
        return True
    return suite_label.startswith((f"{suite}(", f"{suite}["))


def param_value(record: Record, name: str) -> Any:
    """The value of hyperparameter ``name`` in a record (``None`` when the record does not say)."""
    params = record.get("params") or {}
    if name in params:
        return params[name]
    return (record.get("variant") or {}).get(name)


def swept_params(records: Iterable[Record]) -> dict[str, list[str]]:
    """Per method, the hyperparameters recorded at ``SWEEP_MIN_VALUES`` or more distinct values (sweeps)."""
    records = list(records)
    seen: dict[tuple[str, str], set[str]] = {}
    for record in records:
        for name in record.get("variant") or {}:
            seen.setdefault((record["method"], name), set())
    for record in records:
        for (method, name), values in seen.items():
            if record["method"] == method:
                values.add(_short(param_value(record, name)))
    swept: dict[str, list[str]] = {}
    for (method, name), values in sorted(seen.items()):
        if len(values) >= SWEEP_MIN_VALUES:
            swept.setdefault(method, []).append(name)
    return swept


def leaderboard_records(records: Iterable[Record], swept: dict[str, list[str]]) -> list[Record]:
    """Records that are leaderboard rows: every record except the points of a sweep (``swept_params``)."""
    return [r for r in records if not set(r.get("variant") or {}) & set(swept.get(r["method"], ()))]


def _sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def _context_key(context: dict[str, Any]) -> tuple:
    return (len(context), tuple((k, _sortable(v)) for k, v in sorted(context.items())))


def _inner_label(context: dict[str, Any]) -> str:
    return ",".join(f"{k}={_short(v)}" for k, v in sorted(context.items()))


def _seed_stats(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else np.nan,
            "ci95": ci_halfwidth(values), "seeds": len(values)}


def sweep_points(records: Iterable[Record], method: str, param: str, metric: str = "average") -> pd.DataFrame:
    """The sweep of ``method.param``: one row per (series, value) with mean, std, 95% CI half-width and number of
    seeds of ``metric`` (``average`` or ``normalized_average``).

    A series is the method with every other non-default hyperparameter held fixed (``samerging (init)`` and
    ``samerging (init), rho=0`` are two series, never pooled); the default-configuration record is the point at
    the default value, and a series recorded at a single value (e.g. ``ties(k=10)``, a leaderboard row) is left
    out. Columns: label, method, param, context, setting, mean, std, ci95, seeds.
    """
    groups: dict[tuple[str, Any], dict[str, Any]] = {}
    for record in records:
        value = param_value(record, param)
        if record["method"] != method or value is None or record.get(metric) is None:
            continue
        context = {k: v for k, v in (record.get("variant") or {}).items() if k != param}
        label = f"{method} ({param})" + (f", {_inner_label(context)}" if context else "")
        entry = groups.setdefault((label, value), {"context": context, "values": []})
        entry["values"].append(float(record[metric]))
    rows = [{"label": label, "method": method, "param": param, "context": _inner_label(entry["context"]),
             "setting": value, "_key": (_context_key(entry["context"]), _sortable(value)),
             **_seed_stats(entry["values"])}
            for (label, value), entry in groups.items()]
    columns = ["label", "method", "param", "context", "setting", "mean", "std", "ci95", "seeds"]
    points = pd.DataFrame(rows, columns=[*columns, "_key"])
    counts = points.groupby("label")["setting"].nunique()
    points = points[points["label"].map(counts) >= 2]
    if points.empty:
        return pd.DataFrame(columns=columns)
    return points.sort_values("_key", kind="stable").drop(columns="_key").reset_index(drop=True)[columns]


def ablation_points(records: Iterable[Record], method: str, param: str, across: str | None = None,
                    metric: str = "average") -> pd.DataFrame:
    """``method`` at each recorded value of ``param``: one series (``label``: ``rho=0``, ``rho=0.07 (default)``)
    per value, against the values of ``across`` (``setting``, e.g. init) or, without it, as one column
    (``setting``: ``default``). Only records that differ in ``param`` (and ``across``) are compared: among the
    settings of the other hyperparameters recorded at two or more values of ``param``, those closest to the defaults
    are kept (named in the label when not all default). Fewer than two values give an empty frame. Same columns as
    :func:`sweep_points`."""
    by_context: dict[str, list[Record]] = {}
    for record in records:
        if record["method"] == method and record.get(metric) is not None:
            context = {k: v for k, v in (record.get("variant") or {}).items() if k not in (param, across)}
            by_context.setdefault(_inner_label(context), []).append(record)
    comparable = {c: part for c, part in by_context.items() if len({_short(param_value(r, param)) for r in part}) > 1}
    columns = ["label", "method", "param", "context", "setting", "mean", "std", "ci95", "seeds"]
    if not comparable:
        return pd.DataFrame(columns=columns)
    fewest = min(c.count("=") for c in comparable)
    groups: dict[tuple[str, Any, Any], list[float]] = {}
    defaults: set[str] = set()
    for context, part in comparable.items():
        if context.count("=") != fewest:
            continue
        defaults |= {_short(param_value(r, param)) for r in part if param not in (r.get("variant") or {})}
        for record in part:
            value = param_value(record, param)
            setting = param_value(record, across) if across else "default"
            if value is not None and setting is not None:
                groups.setdefault((context, value, setting), []).append(float(record[metric]))
    if len({_short(value) for _, value, _ in groups}) < 2:
        return pd.DataFrame(columns=columns)
    rows = [{"label": f"{param}={_short(value)}" + (" (default)" if _short(value) in defaults else "")
             + (f"; {context}" if context else ""),
             "method": method, "param": param, "context": context, "setting": setting,
             "_key": (context, _sortable(value), _sortable(setting)), **_seed_stats(values)}
            for (context, value, setting), values in groups.items()]
    return pd.DataFrame(rows).sort_values("_key", kind="stable").drop(columns="_key").reset_index(drop=True)[columns]


def ablation_across(records: Sequence[Record], method: str, param: str, swept: dict[str, list[str]]) -> str | None:
    """The swept hyperparameter of ``method`` across which every value of ``param`` was recorded at two or more
    points (e.g. init, when the rho ablation was repeated over the init sweep); ``None`` when there is none."""
    for across in swept.get(method, []):
        if across == param:
            continue
        points = ablation_points(records, method, param, across)
        if not points.empty and bool((points.groupby("label")["setting"].nunique() >= 2).all()):
            return across
    return None


# --- views of one suite configuration -------------------------------------------------------------------------


def suite_seeds(frame: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in set(frame["seed"]))


def suite_protocol(frame: pd.DataFrame) -> str:
    return ", ".join(sorted(str(p) for p in set(frame["protocol"])))


def paper_order(board: pd.DataFrame) -> pd.DataFrame:
    """Rows grouped by family (reference, data-free, test-time, data-using), best average first in each."""
    rank = [FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER) for f in board["family"]]
    order = sorted(range(len(board)), key=lambda i: (rank[i], -np.nan_to_num(board["average_mean"].iloc[i], nan=-1)))
    return board.iloc[order]


def normalized_task_means(frame: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """Methods x tasks: mean over seeds of the normalized accuracy (fraction); NaN where a record lacks it."""
    columns = [c for c in frame.columns if c.startswith("norm:")]
    if not columns:
        return pd.DataFrame(index=list(methods))
    means = frame[columns].astype(float).groupby(frame["method"]).mean()
    means.columns = [c.removeprefix("norm:") for c in columns]
    return means.reindex(list(methods))


def cost_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: seconds per phase and in total (merge + adapt + eval; mean and std over seeds), peak memory
    (max over seeds, bytes), how memory was measured, and the device(s)."""
    method = frame["method"]
    grouped = frame.groupby(method, sort=False)
    cost = grouped[["family", "data"]].first()
    cost["seeds"] = grouped["seed"].nunique()
    present = [f"time:{phase}" for phase in COSTED_PHASES if f"time:{phase}" in frame]
    for phase in COSTED_PHASES:
        column = f"time:{phase}"
        seconds = frame[column].astype(float) if column in frame else pd.Series(np.nan, index=frame.index)
        cost[f"{phase}_s_mean"] = seconds.groupby(method).mean()
        cost[f"{phase}_s_std"] = seconds.groupby(method).std(ddof=1)
    total = frame[present].astype(float).sum(axis=1, min_count=1) if present else pd.Series(np.nan, index=frame.index)
    cost["total_s_mean"] = total.groupby(method).mean()
    cost["total_s_std"] = total.groupby(method).std(ddof=1)
    memory = frame["memory_bytes"].astype(float) if "memory_bytes" in frame else pd.Series(np.nan, index=frame.index)
    cost["peak_memory_bytes"] = memory.groupby(method).max()
    per_task = (frame["per_task_bytes"].astype(float) if "per_task_bytes" in frame
                else pd.Series(np.nan, index=frame.index))
    cost["per_task_bytes"] = per_task.groupby(method).max()
    cost["memory_kind"] = _joined_unique(frame, "memory_kind", lambda k: MEMORY_KINDS.get(k, k))
    cost["device"] = _joined_unique(frame, "device", str)
    return cost


def _joined_unique(frame: pd.DataFrame, column: str, render: Any) -> pd.Series:
    if column not in frame:
        return pd.Series("", index=pd.unique(frame["method"]))
    return frame.groupby("method", sort=False)[column].agg(
        lambda values: ", ".join(sorted({render(v) for v in values if isinstance(v, str) and v})))


def format_seconds(seconds: float, blank_zero: bool = False) -> str:
    """Seconds with a precision that suits their size: 0.004, 0.12, 12.3, 1234; ``–`` when unknown or (with
    ``blank_zero``) exactly zero, i.e. the phase did not run."""
    if seconds is None or np.isnan(seconds) or (blank_zero and seconds == 0):
        return "–"
    if seconds < 0.01:
        return f"{seconds:.3f}"
    if seconds < 1:
        return f"{seconds:.2f}"
    if seconds < 100:
        return f"{seconds:.1f}"
    return f"{seconds:.0f}"


def format_bytes(count: float) -> str:
    """``412 MiB`` below one GiB, ``1.25 GiB`` from there; ``–`` when unknown."""
    if count is None or np.isnan(count):
        return "–"
    if count < 2**30:
        return f"{count / 2**20:.0f} MiB"
    return f"{count / 2**30:.2f} GiB"


def _cost_cells(entry: pd.Series) -> list[str]:
    return [format_seconds(entry["merge_s_mean"]), format_seconds(entry["adapt_s_mean"], blank_zero=True),
            format_seconds(entry["eval_s_mean"]), format_seconds(entry["total_s_mean"]),
            format_bytes(entry["peak_memory_bytes"]), format_storage(entry.get("per_task_bytes", np.nan)),
            str(entry["device"]) or "–"]


COST_HEADER = ["merge (s)", "adapt (s)", "eval (s)", "total (s)", "peak memory", "per-task storage", "device"]


def format_storage(count: float) -> str:
    """Bytes a per-task result adds per task (``–`` for one merged model): B, KiB or MiB as fits."""
    if count is None or np.isnan(count):
        return "–"
    if count < 2**10:
        return f"{count:.0f} B"
    if count < 2**20:
        return f"{count / 2**10:.1f} KiB"
    return format_bytes(count)


def cost_note(cost: pd.DataFrame) -> str:
    kinds = sorted({k for cell in cost["memory_kind"] for k in str(cell).split(", ") if k})
    measured = " / ".join(kinds) if kinds else "not recorded"
    return ("Seconds, mean over seeds; total = merge + adapt + eval (suite loading, shared by every method, left "
            f"out); – in adapt: no adaptation phase. Peak memory: max over seeds of {measured}. Per-task storage: "
            "what a method with one set of weights per task adds for each task to its shared model (– : one model).")


def cost_markdown(cost: pd.DataFrame, title: str) -> str:
    header = ["method", "data", "seeds", *COST_HEADER]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for method, entry in cost.iterrows():
        lines.append("| " + " | ".join([str(method), str(entry["data"]), str(entry["seeds"]), *_cost_cells(entry)])
                     + " |")
    lines += ["", cost_note(cost)]
    return "\n".join(lines) + "\n"


def cost_csv(cost: pd.DataFrame) -> str:
    out = cost.copy()
    out.insert(0, "method", out.index)
    return out.to_csv(index=False, float_format="%.6f")


def sweep_csv(points: pd.DataFrame) -> str:
    return points.to_csv(index=False, float_format="%.6f")


# --- LaTeX (booktabs) ----------------------------------------------------------------------------------------

LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
    "—": "---", "–": "--", "±": r"$\pm$", "×": r"$\times$", "→": r"$\rightarrow$", "≥": r"$\geq$", "≤": r"$\leq$",
    "·": r"$\cdot$", "α": r"$\alpha$", "λ": r"$\lambda$", "ρ": r"$\rho$", "τ": r"$\tau$", "θ": r"$\theta$",
}
LATEX_PREAMBLE_NOTE = "% generated by merge-bench; needs \\usepackage{booktabs} and \\usepackage{graphicx}"


def latex_escape(text: str) -> str:
    """Text safe in a LaTeX paragraph or tabular cell: specials escaped, dashes and Greek letters typeset."""
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex_label(*parts: str) -> str:
    """A ``\\label`` key from free text: letters, digits, ``-`` and ``:`` only."""
    text = "-".join(parts)
    return "".join(ch if ch.isalnum() or ch in "-:" else "-" for ch in text).strip("-")


def latex_number(mean: float, std: float | None = None, bold: bool = False) -> str:
    """``$61.5 \\pm 1.2$`` in %; bold as ``\\textbf{\\boldmath$...$}`` (plain \\textbf leaves math upright)."""
    if mean is None or np.isnan(mean):
        return "--"
    body = f"{100 * mean:.1f}"
    if std is not None and not np.isnan(std):
        body += f" \\pm {100 * std:.1f}"
    return f"\\textbf{{\\boldmath${body}$}}" if bold else f"${body}$"


def latex_interval(mean: float, halfwidth: float) -> str:
    if mean is None or np.isnan(mean):
        return "--"
    if halfwidth is None or np.isnan(halfwidth):
        return "n/a"
    return f"$[{100 * (mean - halfwidth):.1f}, {100 * (mean + halfwidth):.1f}]$"


def latex_table(header: Sequence[str], rows: Sequence[Sequence[str] | None], *, column_spec: str, caption: str,
                label: str, wide: bool) -> str:
    """A booktabs table, caption above; ``None`` in ``rows`` is a ``\\midrule``. ``wide`` spans both columns of
    a two-column paper (``table*``). A tabular wider than the line is scaled down to it, never up."""
    env = "table*" if wide else "table"
    lines = [LATEX_PREAMBLE_NOTE, f"\\begin{{{env}}}[t]", "\\centering", f"\\caption{{{caption}}}",
             f"\\label{{{label}}}", "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
             f"\\begin{{tabular}}{{{column_spec}}}", "\\toprule", " & ".join(header) + " \\\\", "\\midrule"]
    lines += ["\\midrule" if row is None else " & ".join(row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}%", "}", f"\\end{{{env}}}"]
    return "\n".join(lines) + "\n"


def seeds_phrase(seeds: Sequence[int], per_row: bool) -> str:
    """``3 seeds (0, 1, 2)``; ``up to 3 seeds (...; per row: n)`` when rows have different numbers of seeds."""
    listed = ", ".join(str(s) for s in seeds)
    count = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    return f"up to {count} ({listed}; per row: $n$)" if per_row else f"{count} ({listed})"


def _family_blocks(families: Sequence[str]) -> list[bool]:
    """Whether a \\midrule goes before each row (the family changes)."""
    return [i > 0 and families[i] != families[i - 1] for i in range(len(families))]


def to_latex(board: pd.DataFrame, *, suite_label: str, protocol: str, seeds: Sequence[int], label: str) -> str:
    """The leaderboard as a booktabs table in the board's row order, a rule between families; per-task accuracy,
    average with its 95% CI and normalized average, best merge per column in bold."""
    tasks = board_tasks(board)
    metrics = [f"task:{t}" for t in tasks] + ["average", "normalized"]
    per_row = board["seeds"].nunique() > 1
    best = {col: best_rows(board, col) for col in metrics}
    header = ["Method", "Data", *(["$n$"] if per_row else []), *(latex_escape(t) for t in tasks),
              "Avg.", "95\\% CI", "Norm.\\ avg."]
    rows: list[list[str] | None] = []
    for (method, entry), rule in zip(board.iterrows(), _family_blocks(list(board["family"])), strict=True):
        if rule:
            rows.append(None)
        cells = [latex_escape(row_label(method, entry)), latex_escape(entry["data"]),
                 *([str(entry["seeds"])] if per_row else [])]
        for col in metrics:
            cells.append(latex_number(entry[f"{col}_mean"], entry[f"{col}_std"], method in best[col]))
            if col == "average":
                cells.append(latex_interval(entry["average_mean"], entry.get("average_ci95", np.nan)))
        rows.append(cells)
    caption = (f"Accuracy (\\%) on {latex_escape(suite_label)}, protocol: {latex_escape(protocol)}; mean $\\pm$ std "
               f"over {seeds_phrase(seeds, per_row)}. 95\\% CI: Student-$t$ confidence interval of the mean average "
               "accuracy over seeds (n/a with one seed). Norm.\\ avg.: accuracy divided by the fine-tuned expert's on "
               "each task, averaged over tasks. Data: what a method reads besides the weights (none, unlabeled or "
               "labeled examples). Bold: best merge per column (reference rows excluded)."
               + "".join(f" {latex_escape(note)}." for note in per_task_note(board)))
    column_spec = "ll" + ("r" if per_row else "") + "c" * (len(metrics) + 1)
    return latex_table(header, rows, column_spec=column_spec, caption=caption, label=label, wide=True)


def cost_latex(cost: pd.DataFrame, *, suite_label: str, protocol: str, label: str) -> str:
    header = ["Method", "Data", "Merge (s)", "Adapt (s)", "Eval (s)", "Total (s)", "Peak memory", "Per-task storage",
              "Device"]
    rows: list[list[str] | None] = []
    for (method, entry), rule in zip(cost.iterrows(), _family_blocks(list(cost["family"])), strict=True):
        if rule:
            rows.append(None)
        rows.append([latex_escape(method), latex_escape(entry["data"]), *map(latex_escape, _cost_cells(entry))])
    caption = (f"Cost on {latex_escape(suite_label)}, protocol: {latex_escape(protocol)}. "
               f"{latex_escape(cost_note(cost))}")
    return latex_table(header, rows, column_spec="llrrrrrrl", caption=caption, label=label, wide=True)


def grid_latex(points: pd.DataFrame, *, corner: str, caption: str, label: str) -> str:
    """A sweep or ablation as a booktabs table: one row per series (``label``), one column per ``setting``, cells
    mean $\\pm$ std in %."""
    settings = _setting_order(points["setting"])
    header = [latex_escape(corner), *(_grid_header(s) for s in settings)]
    rows: list[list[str] | None] = []
    for series, part in points.groupby("label", sort=False):
        cells = {row.setting: latex_number(row.mean, row.std) for row in part.itertuples()}
        rows.append([latex_escape(series), *(cells.get(s, "--") for s in settings)])
    return latex_table(header, rows, column_spec="l" + "c" * len(settings), caption=caption, label=label,
                       wide=len(settings) > 4)


def _grid_header(setting: Any) -> str:
    if _sortable(setting)[0] == 0:
        return f"${_short(setting)}$"
    return "Accuracy (\\%)" if setting == "default" else latex_escape(_short(setting))


def sensitivity_caption(suite_label: str, protocol: str, seeds: Sequence[int], params: str, metric: str) -> str:
    what = "Normalized accuracy" if metric == "normalized_average" else "Average accuracy"
    return (f"{what} (\\%) on {latex_escape(suite_label)}, protocol: {latex_escape(protocol)}, against "
            f"{latex_escape(params)} (columns); mean $\\pm$ std over {seeds_phrase(seeds, False)}. Every other "
            "hyperparameter at its default unless the row says otherwise.")


# --- writing every table of a store ---------------------------------------------------------------------------


def swept_by_param(swept: dict[str, list[str]]) -> dict[str, list[str]]:
    """param name -> methods swept over it (one sensitivity table and figure per param name)."""
    by_param: dict[str, list[str]] = {}
    for method, names in sorted(swept.items()):
        for name in names:
            by_param.setdefault(name, []).append(method)
    return by_param


ABLATION_PARAMS = ("rho",)  # hyperparameters `bench report` reports as an ablation when recorded at 2+ values


def ablated_methods(records: Sequence[Record], param: str) -> list[str]:
    """Methods with ``param`` recorded at two or more values (e.g. samerging at rho 0 and 0.07)."""
    values: dict[str, set[str]] = {}
    for record in records:
        if param in (record.get("params") or {}) or param in (record.get("variant") or {}):
            values.setdefault(record["method"], set()).add(_short(param_value(record, param)))
    return sorted(m for m, v in values.items() if len(v) >= 2)


def failed_lines(records: Iterable[Record]) -> list[str]:
    """``failed: <method> seed <s>: <reason>`` for every failed record (they have no scores and are never
    averaged), sorted."""
    return sorted(f"failed: {variant_label(r['method'], r.get('variant') or {})} seed {r['seed']}: "
                  f"{r.get('reason') or 'no reason recorded'}" for r in records if is_failed(r))


def _with_failed(text: str, failed: list[str]) -> str:
    return text + "".join(f"{line}\n" for line in failed)


def write_reports(records: Iterable[dict[str, Any]], out_dir: Path, suite: str | None = None) -> dict[str, str]:
    """Write every table per suite configuration; return the terminal leaderboard per suite.

    ``leaderboard_<suite>.{md,csv,tex}``, ``cost_<suite>.{md,csv,tex}``, ``sensitivity_<suite>_<param>.{md,csv,tex}``
    per swept hyperparameter and ``ablation_<suite>_<method>_<param>.{md,csv,tex}`` (see ``ABLATION_PARAMS``).
    Failed runs are listed under the leaderboard (terminal and Markdown), one ``failed: ...`` line each.
    """
    texts: dict[str, str] = {}
    for suite_label, group in suite_groups(records).items():
        if not matches_suite(suite_label, suite):
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        slug = suite_slug(suite_label)
        failed = failed_lines(group)
        if all(is_failed(r) for r in group):  # nothing to tabulate
            protocols = ", ".join(sorted({str(r.get("protocol", "")) for r in group}))
            text = _with_failed(f"{suite_label} — protocol: {protocols}\n(no scored runs)\n", failed)
            (out_dir / f"leaderboard_{slug}.md").write_text(f"### {text}")
            texts[suite_label] = text
            continue
        swept = swept_params(group)
        part = records_frame(leaderboard_records(group, swept)).dropna(axis=1, how="all")
        board = leaderboard(part)
        title = suite_title(part, suite_label)
        protocol, seeds = suite_protocol(part), suite_seeds(part)
        (out_dir / f"leaderboard_{slug}.md").write_text(_with_failed(to_markdown(board, title), failed))
        (out_dir / f"leaderboard_{slug}.csv").write_text(to_csv(board))
        (out_dir / f"leaderboard_{slug}.tex").write_text(to_latex(
            paper_order(board), suite_label=suite_label, protocol=protocol, seeds=seeds,
            label=latex_label("tab:leaderboard", slug)))
        cost = cost_table(part).loc[paper_order(board).index]
        (out_dir / f"cost_{slug}.md").write_text(cost_markdown(cost, f"cost — {title}"))
        (out_dir / f"cost_{slug}.csv").write_text(cost_csv(cost))
        (out_dir / f"cost_{slug}.tex").write_text(cost_latex(
            cost, suite_label=suite_label, protocol=protocol, label=latex_label("tab:cost", slug)))
        for param, methods in swept_by_param(swept).items():
            points = pd.concat([sweep_points(group, m, param) for m in methods], ignore_index=True)
            write_grid_tables(points, out_dir / f"sensitivity_{slug}_{param}", corner=f"Method / {param}",
                              title=f"sensitivity to {param} — {title}",
                              caption=sensitivity_caption(suite_label, protocol, suite_seeds(records_frame(group)),
                                                          param, "average"),
                              label=latex_label("tab:sensitivity", slug, param))
        for param in ABLATION_PARAMS:
            for method in ablated_methods(group, param):
                across = ablation_across(group, method, param, swept)
                points = ablation_points(group, method, param, across)
                if points.empty:
                    continue
                write_grid_tables(points, out_dir / f"ablation_{slug}_{method}_{param}",
                                  corner=f"{param} / {across}" if across else param,
                                  title=f"{method}: ablation of {param} — {title}",
                                  caption=ablation_caption(method, param, across, suite_label, protocol,
                                                           suite_seeds(records_frame(group))),
                                  label=latex_label("tab:ablation", slug, method, param))
        texts[suite_label] = _with_failed(to_text(board, title), failed)
    return texts


def ablation_caption(method: str, param: str, across: str | None, suite_label: str, protocol: str,
                     seeds: Sequence[int]) -> str:
    columns = (f"against {latex_escape(across)} (columns)" if across
               else "every other hyperparameter at its default")
    return (f"Ablation of {latex_escape(param)} in {latex_escape(method)}: average accuracy (\\%) on "
            f"{latex_escape(suite_label)}, protocol: {latex_escape(protocol)}, per value of {latex_escape(param)} "
            f"(rows), {columns}; mean $\\pm$ std over {seeds_phrase(seeds, False)}.")


def write_grid_tables(points: pd.DataFrame, stem: Path, *, corner: str, title: str, caption: str, label: str) -> None:
    """``<stem>.md``, ``<stem>.csv`` and ``<stem>.tex`` of a sweep or ablation table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    (stem.parent / f"{stem.name}.md").write_text(sweep_markdown(points, title))
    (stem.parent / f"{stem.name}.csv").write_text(sweep_csv(points))
    (stem.parent / f"{stem.name}.tex").write_text(grid_latex(points, corner=corner, caption=caption, label=label))


def sweep_table(records: Iterable[dict[str, Any]], swept: dict[str, list[str]]) -> pd.DataFrame:
    """Average accuracy (mean and std over seeds) per method and value of its swept parameters.

    ``swept`` maps method -> names of the parameters it was swept over. One row per (method, setting):
    ``label`` is ``method (param)``, ``setting`` the value (or ``a=1,b=2`` when several were swept together).
    """
    rows: dict[tuple[str, Any], list[float]] = {}
    failed: dict[tuple[str, Any], int] = {}  # failed runs per point: never averaged, shown as "failed"
    for record in records:
        names = swept.get(record["method"])
        if not names:
            continue
        if len(names) == 1:
            label, setting = f"{record['method']} ({names[0]})", record["params"][names[0]]
        else:
            label = f"{record['method']} ({', '.join(names)})"
            setting = ",".join(f"{n}={_short(record['params'][n])}" for n in names)
        values = rows.setdefault((label, setting), [])
        if is_failed(record):
            failed[label, setting] = failed.get((label, setting), 0) + 1
        else:
            values.append(record["average"])
    return pd.DataFrame(
        [{"label": label, "setting": setting, "mean": float(np.mean(v)) if v else np.nan,
          "std": float(np.std(v, ddof=1)) if len(v) > 1 else np.nan, "seeds": len(v),
          "failed": failed.get((label, setting), 0)}
         for (label, setting), v in rows.items()]
    )


def _sweep_cell(row: Any) -> str:
    """mean ± std; ``failed`` for a point whose every run failed, ``(n failed)`` after one where some did."""
    failed = int(getattr(row, "failed", 0) or 0)
    if not failed:
        return format_cell(row.mean, row.std)
    if not row.seeds:
        return "failed"
    return f"{format_cell(row.mean, row.std)} ({failed} failed)"


def _setting_order(settings: Iterable[Any]) -> list[Any]:
    unique = list(dict.fromkeys(settings))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in unique):
        return sorted(unique)
    return sorted(unique, key=str)


def sweep_markdown(table: pd.DataFrame, title: str) -> str:
    """Swept methods as rows, the values of their swept parameter as columns, cells mean ± std in %."""
    if table.empty:
        return f"### {title}\n\n(no records)\n"
    settings = _setting_order(table["setting"])
    lines = [f"### {title}", "", "| method (swept) | " + " | ".join(_short(s) for s in settings) + " |",
             "|" + "|".join(["---"] * (len(settings) + 1)) + "|"]
    for label, part in table.groupby("label", sort=True):
        cells = {row.setting: _sweep_cell(row) for row in part.itertuples()}
        lines.append(f"| {label} | " + " | ".join(cells.get(s, "–") for s in settings) + " |")
    seeds = sorted(set(table["seeds"]) - {0}) or [0]  # 0: points whose every run failed
    lines += ["", f"Average accuracy in %, mean ± std over {'/'.join(map(str, seeds))} seed(s)."]
    return "\n".join(lines) + "\n"
