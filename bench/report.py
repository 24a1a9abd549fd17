"""Leaderboards: pure functions from records to tables (terminal text, Markdown, CSV).

One leaderboard per suite configuration (suite name plus its non-default parameters). A row is a method with
its non-default hyperparameters; cells are mean ± sample std over seeds, in percent. The best merge per column
(reference rows excluded) is marked: bold in Markdown, ``*`` in the terminal.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REFERENCE_FAMILY = "reference"


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


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per record, task accuracies as ``task:<name>`` columns (fractions)."""
    rows = []
    for record in records:
        row = {
            "suite": variant_label(record["suite"], record.get("suite_variant", {})),
            "method": variant_label(record["method"], record.get("variant", {})),
            "family": record["family"],
            "data": record["data_access"],
            "protocol": record.get("protocol", ""),
            "seed": record["seed"],
            "average": record["average"],
            "normalized": record.get("normalized_average"),
        }
        for task, entry in record["tasks"].items():
            row[f"task:{task}"] = entry["accuracy"]
        for phase, seconds in record.get("timings", {}).items():
            row[f"time:{phase}"] = seconds
        rows.append(row)
    return pd.DataFrame(rows)


def task_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("task:")]


def leaderboard(frame: pd.DataFrame) -> pd.DataFrame:
    """Aggregate one suite's records over seeds: ``<col>_mean``, ``<col>_std`` and ``seeds`` per method."""
    metrics = task_columns(frame) + ["average", "normalized"]
    grouped = frame.groupby("method", sort=False)
    board = grouped[["family", "data"]].first()
    board["seeds"] = grouped["seed"].nunique()
    for col in metrics:
        values = frame[col].astype(float) if col in frame else pd.Series(np.nan, index=frame.index)
        board[f"{col}_mean"] = values.groupby(frame["method"]).mean()
        board[f"{col}_std"] = values.groupby(frame["method"]).std(ddof=1)
    board = board.sort_values("average_mean", ascending=False, kind="stable")
    return board


def best_rows(board: pd.DataFrame, column: str) -> set[str]:
    """Methods holding the best mean of ``column`` among non-reference rows (ties all marked)."""
    merges = board[board["family"] != REFERENCE_FAMILY][f"{column}_mean"].dropna()
    if merges.empty:
        return set()
    best = merges.max()
    return set(merges.index[np.isclose(merges, best, rtol=0, atol=1e-12)])


def format_cell(mean: float, std: float) -> str:
    if mean is None or np.isnan(mean):
        return "–"
    text = f"{100 * mean:.1f}"
    if std is not None and not np.isnan(std):
        text += f" ± {100 * std:.1f}"
    return text


def _table_rows(board: pd.DataFrame, mark: tuple[str, str]) -> tuple[list[str], list[list[str]]]:
    tasks = [c[:-5] for c in board.columns if c.startswith("task:") and c.endswith("_mean")]
    metrics = tasks + ["average", "normalized"]
    header = ["method", "data", "seeds"] + [t.removeprefix("task:") for t in tasks] + ["avg", "norm. avg"]
    best = {col: best_rows(board, col) for col in metrics}
    rows = []
    for method, entry in board.iterrows():
        cells = [str(method), str(entry["data"]), str(entry["seeds"])]
        for col in metrics:
            cell = format_cell(entry[f"{col}_mean"], entry[f"{col}_std"])
            if method in best[col]:
                cell = f"{mark[0]}{cell}{mark[1]}"
            cells.append(cell)
        rows.append(cells)
    return header, rows


def to_markdown(board: pd.DataFrame, title: str) -> str:
    header, rows = _table_rows(board, ("**", "**"))
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Accuracy in %, mean ± std over seeds; best merge per column in bold (reference rows excluded)."]
    return "\n".join(lines) + "\n"


def to_text(board: pd.DataFrame, title: str) -> str:
    header, rows = _table_rows(board, ("*", ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    lines = [title, fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines.append("accuracy %, mean ± std over seeds; * best merge per column")
    return "\n".join(lines) + "\n"


def to_csv(board: pd.DataFrame) -> str:
    out = board.copy()
    out.insert(0, "method", out.index)
    return out.to_csv(index=False, float_format="%.6f")


def suite_title(frame: pd.DataFrame, suite: str) -> str:
    protocols = sorted(set(frame["protocol"]))
    return f"{suite} — protocol: {', '.join(protocols)}"


def file_stem(suite_label: str) -> str:
    flat = suite_label.replace("(", "-").replace(",", "-").replace(")", "")
    safe = "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in flat)
    return f"leaderboard_{safe}"


def write_reports(records: Iterable[dict[str, Any]], out_dir: Path, suite: str | None = None) -> dict[str, str]:
    """Write ``leaderboard_<suite>.{md,csv}`` per suite configuration; return the terminal text per suite."""
    frame = records_frame(records)
    texts: dict[str, str] = {}
    if frame.empty:
        return texts
    out_dir.mkdir(parents=True, exist_ok=True)
    for suite_label, part in frame.groupby("suite", sort=True):
        if suite is not None and suite_label != suite and not suite_label.startswith(f"{suite}("):
            continue
        part = part.dropna(axis=1, how="all")
        board = leaderboard(part)
        title = suite_title(part, suite_label)
        stem = file_stem(suite_label)
        (out_dir / f"{stem}.md").write_text(to_markdown(board, title))
        (out_dir / f"{stem}.csv").write_text(to_csv(board))
        texts[suite_label] = to_text(board, title)
    return texts


def sweep_table(records: Iterable[dict[str, Any]], swept: dict[str, list[str]]) -> pd.DataFrame:
    """Average accuracy (mean and std over seeds) per method and value of its swept parameters.

    ``swept`` maps method -> names of the parameters it was swept over. One row per (method, setting):
    ``label`` is ``method (param)``, ``setting`` the value (or ``a=1,b=2`` when several were swept together).
    """
    rows: dict[tuple[str, Any], list[float]] = {}
    for record in records:
        names = swept.get(record["method"])
        if not names:
            continue
        if len(names) == 1:
            label, setting = f"{record['method']} ({names[0]})", record["params"][names[0]]
        else:
            label = f"{record['method']} ({', '.join(names)})"
            setting = ",".join(f"{n}={_short(record['params'][n])}" for n in names)
        rows.setdefault((label, setting), []).append(record["average"])
    return pd.DataFrame(
        [{"label": label, "setting": setting, "mean": float(np.mean(v)),
          "std": float(np.std(v, ddof=1)) if len(v) > 1 else np.nan, "seeds": len(v)}
         for (label, setting), v in rows.items()]
    )


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
        cells = {row.setting: format_cell(row.mean, row.std) for row in part.itertuples()}
        lines.append(f"| {label} | " + " | ".join(cells.get(s, "–") for s in settings) + " |")
    seeds = sorted(set(table["seeds"]))
    lines += ["", f"Average accuracy in %, mean ± std over {'/'.join(map(str, seeds))} seed(s)."]
    return "\n".join(lines) + "\n"
