"""`bench paper --spec FILE`: every table and figure a paper needs, regenerated from the results store.

The spec is a TOML file (see ``paper/tiny8.toml``) naming the suites, the leaderboard rows, the sweeps, the
ablations and the output names. Each output name gives ``<out>/<name>.tex|.md|.csv`` for a table and
``<out>/<name>.png|.pdf`` for a figure; with several suites a name must contain ``{suite}``, replaced by the
suite's file-name form. Relative paths are relative to the working directory; ``--results`` and ``--out``
override the spec's. A bad spec is one line naming the file, the key and the problem.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import pydantic

from bench import report
from bench.errors import BenchError, close_matches

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads the spec with the tomli backport
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

METRICS = {"average": "average", "normalized": "normalized_average"}
ROW_PATTERN = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(\((?P<inner>[^()]*)\))?$")


@dataclass(frozen=True)
class SweepSpec:
    params: tuple[tuple[str, str], ...]  # (method, hyperparameter)
    x_label: str
    metric: str = "average"  # a record field: average or normalized_average
    variants: bool = False  # also the series with another hyperparameter changed (e.g. samerging at rho=0)
    table: str | None = None
    figure: str | None = None


@dataclass(frozen=True)
class PaperSpec:
    source: str
    suites: tuple[str, ...]
    methods: tuple[str, ...] | None  # leaderboard rows in order; None: every row of the store
    results: str = "results"
    out: str = "reports/paper"
    leaderboard: dict[str, str] = field(default_factory=dict)  # role (table, figure, heatmap, pareto) -> name
    cost_table: str | None = None
    sweeps: tuple[SweepSpec, ...] = ()
    ablations: tuple[AblationSpec, ...] = ()

    def output_names(self) -> list[str]:
        names = [*self.leaderboard.values(), *([self.cost_table] if self.cost_table else [])]
        for item in [*self.sweeps, *self.ablations]:
            names += [n for n in (item.table, item.figure) if n]
        return names


@dataclass
class PaperOutputs:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per output left out, saying why


# --- reading and checking the spec ------------------------------------------------------------------------------


def load_spec(path: Path | str) -> PaperSpec:
    """Read and check a spec file; every problem is a one-line :class:`BenchError`."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"spec file '{path}' not found; pass --spec FILE, e.g. --spec paper/tiny8.toml")
    if tomllib is None:
        raise BenchError("reading a TOML spec on Python 3.10 needs the tomli package: pip install tomli")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BenchError(f"{path}: not valid TOML: {exc}") from None
    return parse_spec(data, str(path))


# The spec's structure, declared once: pydantic checks every key and type (strict: no coercion); its first error
# becomes the one-line message of :func:`_structure_error`. Meaning (known methods, parameters, output names) is
# checked after.
class _Table(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


Names = Annotated[list[Annotated[str, pydantic.Field(min_length=1)]], pydantic.BeforeValidator(
    lambda value: [value] if isinstance(value, str) else value)]


class _LeaderboardOutputs(_Table):
    table: str | None = None
    figure: str | None = None
    heatmap: str | None = None
    pareto: str | None = None


class _CostOutputs(_Table):
    table: str | None = None


class _Sweep(_Table):
    params: Names = []
    x_label: str | None = None
    metric: str = "average"
    variants: bool = False
    table: str | None = None
    figure: str | None = None


class AblationSpec(_Table):
    method: str
    param: str
    across: str | None = None
    x_label: str | None = None
    table: str | None = None
    figure: str | None = None


class _SpecFile(_Table):
    results: str = "results"
    out: str = "reports/paper"
    suites: Names = []
    methods: str | list[str] = "all"
    leaderboard: _LeaderboardOutputs = _LeaderboardOutputs()
    cost: _CostOutputs = _CostOutputs()
    sweeps: list[_Sweep] = []
    ablations: list[AblationSpec] = []


SECTIONS = {"leaderboard": _LeaderboardOutputs, "cost": _CostOutputs, "sweeps": _Sweep, "ablations": AblationSpec}
TOP_KEYS = tuple(_SpecFile.model_fields)


def _structure_error(error: Any, source: str) -> BenchError:
    """The one line for pydantic's first error about the spec's structure."""
    loc, kind = list(error["loc"]), error["type"]
    section = loc[0] if loc else ""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if kind == "extra_forbidden":
        model = SECTIONS.get(section, _SpecFile) if len(loc) > 1 else _SpecFile
        allowed = list(model.model_fields)
        matches = close_matches(str(loc[-1]), allowed)
        hint = f"did you mean: {', '.join(matches)}?" if matches else f"known: {', '.join(allowed)}"
        return BenchError(f"{source}: unknown key '{where}'; {hint}")
    if section in ("leaderboard", "cost") and len(loc) == 1:
        return BenchError(f"{source}: [{section}] must be a table of output names")
    if section in ("sweeps", "ablations") and len(loc) <= 2:
        return BenchError(f"{source}: {section} must be an array of tables ([[{section}]])")
    if section == "suites" or (section == "sweeps" and loc[2:3] == ["params"]):
        names = "suites" if section == "suites" else f"sweeps[{loc[1]}].params"
        return BenchError(f"{source}: {names} must be a list of names, e.g. [\"a\", \"b\"]")
    if section == "methods":
        return BenchError(f"{source}: methods must be \"all\" or a list of rows, e.g. [\"ties\", \"samerging(rho=0)\"]")
    if kind == "missing":
        return BenchError(f"{source}: {where} is required (a name)")
    if loc[-1] == "variants":
        return BenchError(f"{source}: {where} must be true or false")
    return BenchError(f"{source}: {where} must be a string, not {error['input']!r}")


def parse_spec(data: dict[str, Any], source: str = "spec") -> PaperSpec:
    from bench import registry

    try:
        parsed = _SpecFile.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _structure_error(exc.errors()[0], source) from None
    known_methods = registry.methods()
    if not parsed.suites:
        raise BenchError(f"{source}: 'suites' must name at least one suite, e.g. suites = [\"tiny8\"]")
    methods = _methods(parsed.methods, known_methods, source)
    leaderboard = {role: name for role, name in parsed.leaderboard.model_dump().items() if name is not None}
    sweeps = tuple(_sweep(item, f"sweeps[{i}]", known_methods, source) for i, item in enumerate(parsed.sweeps))
    ablations = tuple(_ablation(item, f"ablations[{i}]", known_methods, source)
                      for i, item in enumerate(parsed.ablations))
    spec = PaperSpec(source=source, suites=tuple(parsed.suites), methods=methods, results=parsed.results,
                     out=parsed.out, leaderboard=leaderboard, cost_table=parsed.cost.table, sweeps=sweeps,
                     ablations=ablations)
    _check_names(spec)
    return spec


def _where(source: str, section: str, key: str) -> str:
    return f"{source}: {section + '.' if section else ''}{key}"


def _methods(value: str | list[str], known: dict[str, Any], source: str) -> tuple[str, ...] | None:
    if value == "all":
        return None
    if not isinstance(value, list) or not value:
        raise BenchError(f"{source}: methods must be \"all\" or a list of rows, e.g. [\"ties\", \"samerging(rho=0)\"]")
    rows = []
    for row in value:
        match = ROW_PATTERN.match(row.replace(" ", ""))
        if match is None:
            raise BenchError(f"{source}: methods: '{row}' is not a row; write NAME or NAME(param=value,...)")
        _known_method(match["name"], known, source)
        rows.append(_canonical_row(match["name"], match["inner"]))
    return tuple(rows)


def _canonical_row(name: str, inner: str | None) -> str:
    """``samerging(rho=0.0)`` -> ``samerging(rho=0)``: the label the leaderboard gives that configuration."""
    if not inner:
        return name
    variant: dict[str, Any] = {}
    for part in inner.split(","):
        key, _, value = part.partition("=")
        variant[key] = _parse_value(value)
    return report.variant_label(name, variant)


def _parse_value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _known_method(name: str, known: dict[str, Any], source: str) -> Any:
    if name not in known:
        matches = close_matches(name, known)
        hint = f"did you mean: {', '.join(matches)}?" if matches else "see `bench list methods`"
        raise BenchError(f"{source}: unknown method '{name}'; {hint}")
    return known[name]


def _known_param(method: str, param: str, known: dict[str, Any], source: str, where: str) -> None:
    from bench.registry import param_infos

    names = [info.name for info in param_infos(_known_method(method, known, source).params)]
    if param not in names:
        matches = close_matches(param, names)
        hint = f"did you mean: {', '.join(matches)}?" if matches else f"known: {', '.join(names) or 'none'}"
        raise BenchError(f"{source}: {where}: unknown parameter of {method} '{param}'; {hint}")


def _sweep(item: _Sweep, where: str, known: dict[str, Any], source: str) -> SweepSpec:
    params = []
    for entry in item.params:
        method, dot, param = entry.partition(".")
        if not dot:
            raise BenchError(f"{source}: {where}.params: '{entry}' must be METHOD.PARAM, e.g. ties.scaling")
        _known_param(method, param, known, source, f"{where}.params")
        params.append((method, param))
    if not params:
        raise BenchError(f"{source}: {where}.params must name at least one METHOD.PARAM")
    if item.metric not in METRICS:
        raise BenchError(f"{_where(source, where, 'metric')} must be one of {'|'.join(METRICS)}, not '{item.metric}'")
    default_label = ", ".join(dict.fromkeys(p for _, p in params))
    return SweepSpec(params=tuple(params), x_label=item.x_label if item.x_label is not None else default_label,
                     metric=METRICS[item.metric], variants=item.variants, table=item.table, figure=item.figure)


def _ablation(item: AblationSpec, where: str, known: dict[str, Any], source: str) -> AblationSpec:
    _known_param(item.method, item.param, known, source, where)
    if item.across is not None:
        _known_param(item.method, item.across, known, source, f"{where}.across")
    return item.model_copy(update={"x_label": item.x_label or None})


def _check_names(spec: PaperSpec) -> None:
    names = spec.output_names()
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise BenchError(f"{spec.source}: output name {name!r} must be a plain file name without extension")
        if len(spec.suites) > 1 and "{suite}" not in name:
            raise BenchError(f"{spec.source}: output name '{name}' must contain {{suite}}: the spec names "
                             f"{len(spec.suites)} suites")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BenchError(f"{spec.source}: output name '{duplicates[0]}' is used twice")


# --- building the outputs ---------------------------------------------------------------------------------------


def output_stem(out_dir: Path, name: str, suite_label: str) -> Path:
    return out_dir / name.replace("{suite}", report.suite_slug(suite_label))


def build_paper(spec: PaperSpec, records: Sequence[report.Record], out_dir: Path,
                figures: bool = True) -> PaperOutputs:
    """Write every output the spec names, suite by suite; an output whose data is missing is skipped with a note."""
    groups = report.suite_groups(records)
    outputs = PaperOutputs()
    for suite in spec.suites:
        if suite not in groups:
            recorded = ", ".join(groups) or "none"
            raise BenchError(f"{spec.source}: no records of suite '{suite}' in the store (recorded: {recorded})")
        failed = report.failed_lines(groups[suite])  # failed runs have no scores: left out, with a note each
        if len(failed) == len(groups[suite]):
            raise BenchError(f"{spec.source}: every record of suite '{suite}' is a failed run, first: "
                             f"{failed[0].removeprefix('failed: ')}")
        outputs.skipped += [f"{suite}: {line} (left out)" for line in failed]
        _suite_outputs(spec, suite, groups[suite], out_dir, figures, outputs)
    return outputs


def _suite_outputs(spec: PaperSpec, suite: str, group: list[report.Record], out_dir: Path, figures: bool,
                   outputs: PaperOutputs) -> None:
    from bench import figures as fig

    swept = report.swept_params(group)
    frame = report.records_frame(report.leaderboard_records(group, swept)).dropna(axis=1, how="all")
    ranked = report.leaderboard(frame)
    rows = _selected_rows(spec, ranked, suite, outputs)
    board = ranked.loc[rows] if spec.methods is not None else report.paper_order(ranked)
    frame = frame[frame["method"].isin(list(board.index))]
    protocol, seeds = report.suite_protocol(frame), report.suite_seeds(frame)
    all_seeds = report.suite_seeds(report.records_frame(group))
    common = {"suite_label": suite, "protocol": protocol}
    slug = report.suite_slug(suite)

    def stem(name: str) -> Path:
        return output_stem(out_dir, name, suite)

    roles = spec.leaderboard
    if "table" in roles:
        title = report.suite_title(frame, suite)
        _write_table(stem(roles["table"]), outputs, {
            "md": report.to_markdown(board, title), "csv": report.to_csv(board),
            "tex": report.to_latex(board, seeds=seeds, label=report.latex_label("tab:leaderboard", slug), **common)})
    if spec.cost_table:
        cost = report.cost_table(frame).loc[list(board.index)]
        title = f"cost — {report.suite_title(frame, suite)}"
        _write_table(stem(spec.cost_table), outputs, {
            "md": report.cost_markdown(cost, title), "csv": report.cost_csv(cost),
            "tex": report.cost_latex(cost, label=report.latex_label("tab:cost", slug), **common)})
    if figures:
        ranked_rows = ranked.loc[[m for m in ranked.index if m in set(board.index)]]
        _figure(stem, roles.get("figure"), outputs, suite,
                lambda: fig.leaderboard_figure(ranked_rows, seeds=seeds, **common))
        _figure(stem, roles.get("heatmap"), outputs, suite,
                lambda: fig.heatmap_or_reason(frame, board, seeds=seeds, **common))
        _figure(stem, roles.get("pareto"), outputs, suite,
                lambda: fig.pareto_or_reason(frame, board, seeds=seeds, **common))
    for sweep in spec.sweeps:
        points = _sweep_points(group, sweep)
        reason = "no records of " + ", ".join(f"{m}.{p}" for m, p in sweep.params) + " at 2 or more values"
        if sweep.table:
            if points.empty:
                outputs.skipped.append(f"{suite}: {sweep.table} skipped: {reason}")
            else:
                caption = report.sensitivity_caption(suite, protocol, all_seeds, sweep.x_label, sweep.metric)
                _write_grid(stem(sweep.table), outputs, points, corner="Method", title=f"{sweep.x_label} — {suite}",
                            caption=caption, label=report.latex_label("tab", sweep.table, slug))
        if figures:
            _figure(stem, sweep.figure, outputs, suite, lambda s=sweep, p=points, r=reason: r if p.empty else
                    fig.sensitivity_figure(p, seeds=all_seeds, x_label=s.x_label, metric=s.metric, **common))
    for ablation in spec.ablations:
        points = report.ablation_points(group, ablation.method, ablation.param, ablation.across)
        reason = (f"no records of {ablation.method} at 2 or more values of {ablation.param}"
                  + (f" across {ablation.across}" if ablation.across else ""))
        if ablation.table:
            if points.empty:
                outputs.skipped.append(f"{suite}: {ablation.table} skipped: {reason}")
            else:
                caption = report.ablation_caption(ablation.method, ablation.param, ablation.across, suite, protocol,
                                                  all_seeds)
                corner = f"{ablation.param} / {ablation.across}" if ablation.across else ablation.param
                _write_grid(stem(ablation.table), outputs, points, corner=corner,
                            title=f"{ablation.method}: ablation of {ablation.param} — {suite}", caption=caption,
                            label=report.latex_label("tab", ablation.table, slug))
        if figures:
            _figure(stem, ablation.figure, outputs, suite, lambda a=ablation, p=points, r=reason: r if p.empty else
                    fig.ablation_figure(p, method=a.method, param=a.param, across=a.across, seeds=all_seeds,
                                        x_label=a.x_label, **common))


def _selected_rows(spec: PaperSpec, ranked: pd.DataFrame, suite: str, outputs: PaperOutputs) -> list[str]:
    if spec.methods is None:
        return list(ranked.index)
    missing = [m for m in spec.methods if m not in ranked.index]
    if missing:
        outputs.skipped.append(f"{suite}: rows not in the store, left out of the tables: {', '.join(missing)}")
    rows = [m for m in spec.methods if m in ranked.index]
    if not rows:
        raise BenchError(f"{spec.source}: none of the methods it names is recorded for suite '{suite}'")
    return rows


def _sweep_points(records: Sequence[report.Record], sweep: SweepSpec) -> pd.DataFrame:
    parts = [report.sweep_points(records, method, param, sweep.metric) for method, param in sweep.params]
    recorded = [part for part in parts if not part.empty]
    points = pd.concat(recorded, ignore_index=True) if recorded else parts[0]
    if not sweep.variants and not points.empty:
        points = points[points["context"] == ""].reset_index(drop=True)
    return points


def _write_table(stem: Path, outputs: PaperOutputs, texts: dict[str, str]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    for extension, text in texts.items():
        path = stem.parent / f"{stem.name}.{extension}"
        path.write_text(text)
        outputs.written.append(path)


def _write_grid(stem: Path, outputs: PaperOutputs, points: pd.DataFrame, **kwargs: Any) -> None:
    report.write_grid_tables(points, stem, **kwargs)
    outputs.written += [stem.parent / f"{stem.name}.{ext}" for ext in ("md", "csv", "tex")]


def _figure(stem: Callable[[str], Path], name: str | None, outputs: PaperOutputs, suite: str,
            build: Callable[[], Any]) -> None:
    from bench.figures import save_figure

    if not name:
        return
    figure = build()
    if isinstance(figure, str):
        outputs.skipped.append(f"{suite}: {name} skipped: {figure}")
    else:
        outputs.written += save_figure(figure, stem(name))


def run_paper(spec_path: Path | str, results: str | None = None, out: str | None = None, figures: bool = True,
              strict: bool = False) -> PaperOutputs:
    """Load the spec, read the store, write every output; ``strict`` makes a skipped output or row an error."""
    from bench.store import ResultsStore

    spec = load_spec(spec_path)
    store = ResultsStore(results or spec.results)
    if not store.root.is_dir():
        raise BenchError(f"no results directory '{store.root}'; run `bench run` first or pass --results DIR")
    outputs = build_paper(spec, list(store.records()), Path(out or spec.out), figures=figures)
    if strict and outputs.skipped:
        raise BenchError(f"--strict: {len(outputs.skipped)} output(s) or row(s) missing for lack of data; first: "
                         f"{outputs.skipped[0]}")
    return outputs
