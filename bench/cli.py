"""The `bench` command line: thin parsing around the runner and the reports."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import registry
from bench.errors import BenchError


def shorten(text: str, width: int = 40) -> str:
    """``text`` cut to ``width`` characters for a one-line message (a pasted 5000-digit number stays readable)."""
    return text if len(text) <= width else text[: width - 3] + "..."


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]: integers in [0, MAX_SEED] (what torch and numpy seeding take), duplicates dropped."""
    from bench.runner import seed_problem

    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            seed = int(part)
        except ValueError:
            if re.fullmatch(r"[+-]?[0-9_]+", part):  # digits too many for int(): out of range all the same
                raise BenchError(f"--seeds {shorten(text)!r}: {shorten(part)} {seed_problem(None)}") from None
            raise BenchError(f"--seeds {shorten(text)!r}: {shorten(part)!r} is not an integer; write e.g. "
                             "--seeds 0,1,2") from None
        problem = seed_problem(seed)
        if problem:
            raise BenchError(f"--seeds {shorten(text)!r}: {shorten(part)} {problem}")
        seeds.append(seed)
    if not seeds:
        raise BenchError("--seeds is empty; write e.g. --seeds 0,1,2")
    return list(dict.fromkeys(seeds))


def parse_sets(items: Sequence[str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """``METHOD.PARAM=VALUE`` / ``suite.PARAM=VALUE`` -> (method overrides, suite overrides)."""
    methods: dict[str, dict[str, str]] = {}
    suite: dict[str, str] = {}
    for item in items:
        target, sep, value = item.partition("=")
        owner, dot, name = target.partition(".")
        if not sep or not dot or not owner or not name:
            raise BenchError(f"--set {item!r}: write METHOD.PARAM=VALUE or suite.PARAM=VALUE, e.g. --set ties.k=10")
        if owner == "suite":
            suite[name] = value
        else:
            registry.get_method(owner)
            methods.setdefault(owner, {})[name] = value
    return methods, suite


MAX_GRID_POINTS = 10_000  # values of one swept parameter, and grid points of one method


def parse_grid_values(text: str) -> list[str]:
    """``v1,v2,...`` or an inclusive range ``start:stop:step`` (e.g. ``0:1:0.1`` is 0.0, 0.1, ..., 1.0)."""
    if ":" not in text:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise BenchError(f"--param value list '{text}' is empty; write v1,v2 or start:stop:step")
        if len(values) > MAX_GRID_POINTS:
            raise BenchError(f"--param value list '{shorten(text)}' has {len(values):,} values, more than the "
                             f"{MAX_GRID_POINTS:,} one parameter may take")
        return values
    parts = text.split(":")
    try:
        start, stop, step = (float(x) for x in parts)
    except ValueError:
        raise BenchError(f"--param range '{text}': write start:stop:step with numbers, e.g. 0:1:0.1") from None
    if not all(math.isfinite(x) for x in (start, stop, step)):
        raise BenchError(f"--param range '{text}': start, stop and step must be finite numbers, e.g. 0:1:0.1")
    if step <= 0 or stop < start:
        raise BenchError(f"--param range '{text}': needs step > 0 and stop >= start")
    span = (stop - start) / step  # compared as a float first: 0:1:1e-300 has 1e300 points
    if not math.isfinite(span) or span > MAX_GRID_POINTS or int(round(span)) + 1 > MAX_GRID_POINTS:
        raise BenchError(f"--param range '{shorten(text)}' has more than {MAX_GRID_POINTS:,} points (the most one "
                         "parameter may take); use a coarser step")
    count = int(round(span)) + 1
    numbers = [round(start + i * step, 10) for i in range(count)]
    integral = all(float(x).is_integer() for x in parts)
    return [str(int(n)) if integral else repr(n) for n in numbers]


def parse_grid(items: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """``METHOD.PARAM=v1,v2`` / ``METHOD.PARAM=start:stop:step`` -> method -> param -> values."""
    grid: dict[str, dict[str, list[str]]] = {}
    for item in items:
        target, sep, values = item.partition("=")
        owner, dot, name = target.partition(".")
        if not sep or not dot or not owner or not name:
            raise BenchError(f"--param {item!r}: write METHOD.PARAM=v1,v2,... or METHOD.PARAM=start:stop:step")
        registry.get_method(owner)
        grid.setdefault(owner, {})[name] = parse_grid_values(values)
    for method, params in grid.items():
        points = math.prod(len(values) for values in params.values())
        if points > MAX_GRID_POINTS:
            raise BenchError(f"--param: the grid of {method} has {points:,} points ("
                             + " x ".join(f"{len(v):,} {name}" for name, v in params.items())
                             + f"), more than {MAX_GRID_POINTS:,}; use fewer values or coarser steps")
    return grid


def grid_points(grid: dict[str, dict[str, list[str]]]) -> dict[str, list[dict[str, str]]]:
    """Per method, the cartesian product of its swept parameters: method -> list of overrides."""
    return {
        method: [dict(zip(params, values, strict=True)) for values in itertools.product(*params.values())]
        for method, params in grid.items()
    }


def plugin_names(modules: Sequence[str]) -> list[str]:
    """The modules ``--plugin`` and ``BENCH_PLUGINS`` name (workers import them too)."""
    names = list(modules) + [m for m in os.environ.get("BENCH_PLUGINS", "").split(",") if m.strip()]
    return list(dict.fromkeys(name.strip() for name in names))


def load_plugins(modules: Sequence[str]) -> None:
    """Import extra modules that register methods or suites (``--plugin`` or ``BENCH_PLUGINS``)."""
    from bench.execution import import_plugins

    import_plugins(plugin_names(modules))


def _param_lines(params_cls: type) -> list[str]:
    infos = registry.param_infos(params_cls)
    if not infos:
        return ["    (no hyperparameters)"]
    width = max(len(info.describe()) for info in infos)
    return [f"    {info.describe().ljust(width)}  {info.help}" for info in infos]


def list_methods() -> str:
    lines = [f"memory: {kind} = {meaning}" for kind, meaning in registry.MEMORY.items()]
    lines += [f"output: {kind} = {meaning}" for kind, meaning in registry.OUTPUTS.items()]
    specs = registry.methods()
    for family in registry.FAMILIES:
        for name in sorted(n for n, s in specs.items() if s.family == family):
            spec = specs[name]
            data = spec.data
            budget = spec.samples_per_task(spec.params())
            if budget:
                data += f", up to {budget} per task"
            output = "; output: per_task" if spec.output == "per_task" else ""
            lines.append(f"{name}  [{spec.family}; data: {data}; memory: {spec.memory}{output}]  {spec.description}")
            lines += _param_lines(spec.params)
    return "\n".join(lines)


def suite_readiness(spec: registry.SuiteSpec, cache_dir: Path, needs: registry.DataNeeds = registry.ALL_DATA,
                    overrides: dict[str, str] | None = None) -> list[str]:
    """What ``spec`` (at its default or the given parameters) still lacks in ``cache_dir`` for methods reading
    ``needs``; empty when ready."""
    return spec.missing(registry.build_params("suite", spec.params, overrides or {}), cache_dir, needs)


def _readiness_label(spec: registry.SuiteSpec, cache_dir: Path) -> tuple[str, list[str]]:
    """The suite's readiness in words, and what it lacks for every method. A suite that lacks only splits the
    methods reading training data need is partly ready: the others run, those are skipped with the reason."""
    if spec.readiness is None:
        return "ready: built offline on first use", []
    missing = suite_readiness(spec, cache_dir)
    if not missing:
        return "ready: all artefacts cached", []
    if not suite_readiness(spec, cache_dir, registry.SCORED_SPLITS_ONLY):
        return (f"partly ready: {len(missing)} artefact(s) missing, needed only by methods that read training data "
                f"(`bench prepare {spec.name}`)", missing)
    return f"not ready: {len(missing)} artefact(s) missing (`bench prepare {spec.name}`)", missing


def list_suites(cache_dir: Path) -> str:
    lines = []
    for name, spec in sorted(registry.suites().items()):
        lines.append(f"{name}  [{_readiness_label(spec, cache_dir)[0]}]  {spec.description}")
        lines += _param_lines(spec.params)
    return "\n".join(lines)


def cache_dir_of(args: argparse.Namespace) -> Path:
    from bench.runner import default_cache_dir

    cache_dir = Path(args.cache) if getattr(args, "cache", None) else default_cache_dir()
    check_cache_dir(cache_dir)
    return cache_dir


def check_cache_dir(cache_dir: Path) -> None:
    """One line when the suite cache cannot be a directory (a file is in the way); read-only caches are fine."""
    from bench.disk import require_directory

    require_directory(cache_dir, "--cache", writable=False, hint=" (or BENCH_CACHE)")


def check_output_dirs(args: argparse.Namespace, config: Any) -> None:
    """Before anything is loaded or computed: --results (and --out, unless no tables are written) must be
    directories this user can write in, and --cache no file."""
    from bench.disk import require_directory

    require_directory(config.results_dir, "--results")
    if not args.no_report:
        require_directory(args.out, "--out")
    check_cache_dir(config.cache_dir)


def write_tables(records: Any, out: Path, suite: str | None = None) -> dict[str, str]:
    """:func:`bench.report.write_reports`, a file system error as one line."""
    from bench.report import write_reports

    try:
        return write_reports(records, out, suite=suite)
    except OSError as exc:
        raise BenchError(f"cannot write tables to --out {out}: {exc.strerror or exc}; pick another --out") from None


def cmd_list(args: argparse.Namespace) -> int:
    print(list_methods() if args.what == "methods" else list_suites(cache_dir_of(args)))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Which suites can run here (at their default parameters), what each still lacks, what each takes on disk."""
    from bench.disk import UNKNOWN, doctor_lines

    cache_dir = cache_dir_of(args)
    print(f"cache: {cache_dir}")
    ready = 0
    for name, spec in sorted(registry.suites().items()):
        label, missing = _readiness_label(spec, cache_dir)
        ready += not missing
        print(f"{name}: {label}")
        params = registry.build_params("suite", spec.params, {})
        sizes = spec.artefact_sizes(params, cache_dir, registry.ALL_DATA, online=False)
        for line in doctor_lines(sizes) if sizes else [f"    missing: {line} ({UNKNOWN})" for line in missing]:
            print(line)
    print(f"{ready} of {len(registry.suites())} suites ready here")
    return 0


def methods_data_needs(text: str) -> registry.DataNeeds:
    """What the methods of a ``--methods`` value (``all`` or a comma list) read besides the scored splits."""
    from bench.runner import resolve_method_names

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise BenchError("--methods is empty; write --methods all or a comma list, e.g. --methods ties,task_arithmetic")
    return registry.DataNeeds.of(registry.get_method(name) for name in resolve_method_names(names))


def cmd_prepare(args: argparse.Namespace) -> int:
    """Download what the suite needs for the chosen methods into the cache (resumable, verified), after printing
    the expected size and checking the free disk space."""
    from bench.disk import PreparePlan, check_free_space, plan_lines
    from bench.errors import prepare_command

    method_overrides, suite_overrides = parse_sets(args.set)
    if method_overrides:
        raise BenchError("bench prepare takes only --set suite.PARAM=VALUE (method parameters need no download)")
    spec = registry.get_suite(args.suite)
    params = registry.build_params("suite", spec.params, suite_overrides)
    needs = methods_data_needs(args.methods)
    cache_dir = cache_dir_of(args)
    if spec.prepare is None:
        print(f"{spec.name} needs no download: it is built offline on first use")
        return 0
    methods = "" if args.methods.strip() == "all" else args.methods.strip()
    command = prepare_command(args.suite, " ".join(f"--set {item}" for item in args.set), methods)
    plan = PreparePlan(spec.artefact_sizes(params, cache_dir, needs, online=True))
    if plan.artefacts:
        print("\n".join(plan_lines(spec.name, plan)), file=sys.stderr)
        check_free_space(cache_dir, plan, command)
    spec.run_prepare(params, cache_dir, not args.no_progress, needs)
    missing = spec.missing(params, cache_dir, needs)
    if missing:
        raise BenchError(f"prepare {spec.name} finished but {len(missing)} artefact(s) are still missing, "
                         f"first: {missing[0]}; rerun `{command}` to resume")
    print(f"{spec.name} is ready in {cache_dir}" + (f" for --methods {methods}" if methods else ""))
    return 0


def run_config(args: argparse.Namespace, methods: list[str]) -> Any:
    from bench.runner import RunConfig

    method_overrides, suite_overrides = parse_sets(args.set)
    if args.trust_pickles:
        suite = registry.get_suite(args.suite)
        if "trust_pickles" not in {info.name for info in registry.param_infos(suite.params)}:
            raise BenchError(f"--trust-pickles: suite '{suite.name}' never loads pickled checkpoints; drop the flag")
        suite_overrides["trust_pickles"] = "true"
    if args.trust_task_code:
        suite = registry.get_suite(args.suite)
        if "trust_task_code" not in {info.name for info in registry.param_infos(suite.params)}:
            raise BenchError(f"--trust-task-code: suite '{suite.name}' never loads lm-eval task YAMLs that could run "
                             f"code; drop the flag")
        suite_overrides["trust_task_code"] = "true"
    return RunConfig(
        suite=args.suite,
        methods=methods,
        seeds=parse_seeds(args.seeds),
        device=args.device,
        method_overrides=method_overrides,
        suite_overrides=suite_overrides,
        results_dir=Path(args.results),
        resume=args.resume,
        progress=not args.no_progress,
        **({"cache_dir": Path(args.cache)} if args.cache else {}),
    )


def cmd_run(args: argparse.Namespace) -> int:
    from bench.store import ResultsStore

    config = run_config(args, [m.strip() for m in args.methods.split(",") if m.strip()])
    if not config.methods:
        raise BenchError("--methods is empty; write --methods all or a comma list, e.g. --methods ties,task_arithmetic")
    executor = executor_of(args, config)
    check_output_dirs(args, config)
    summary = execute_with(args, config, executor)
    if args.no_report:
        return 0
    suite_key = summary.suite_key
    records = [r for r in ResultsStore(config.results_dir).records()
               if r["suite"] == suite_key["suite"] and r["suite_params"] == suite_key["suite_params"]]
    texts = write_tables(records, Path(args.out))
    for text in texts.values():
        print(text)
    return 0


def executor_of(args: argparse.Namespace, config: Any) -> Any:
    """The executor ``--executor``/``--jobs`` and the Ray flags ask for."""
    from bench.executors import RayOptions, make_executor

    given = {name: getattr(args, name) for name in ("address", "gpus_per_job", "cpus_per_job")}
    ray = RayOptions(**{name: value for name, value in given.items() if value is not None}) \
        if any(value is not None for value in given.values()) else None
    return make_executor(args.executor, args.jobs, ray, config.device, config.progress)


def execute_with(args: argparse.Namespace, config: Any, executor: Any, grid: Any = None) -> Any:
    """Run the plan on ``executor`` and print what was done."""
    from bench.runner import execute

    summary = execute(config, grid, executor=executor, plugins=plugin_names(args.plugin))
    print(f"{len(summary.computed)} run(s) computed, {summary.skipped_recorded} already recorded; "
          f"records in {config.results_dir}/", file=sys.stderr)
    for name, reason in summary.not_applicable:
        print(f"not applicable: {name}: {reason}", file=sys.stderr)
    return summary


def cmd_sweep(args: argparse.Namespace) -> int:
    from bench.report import sweep_markdown, sweep_table
    from bench.store import ResultsStore

    grid = parse_grid(args.param)
    if not grid:
        raise BenchError("bench sweep needs at least one --param METHOD.PARAM=v1,v2,... (or start:stop:step)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(grid)
    config = run_config(args, methods)
    executor = executor_of(args, config)
    check_output_dirs(args, config)
    suite_overrides = config.suite_overrides
    summary = execute_with(args, config, executor, grid_points(grid))
    if args.no_report:
        return 0
    planned = set(summary.planned)
    records = [r for r in ResultsStore(config.results_dir).records() if r["config_hash"] in planned]
    swept = {method: list(params) for method, params in grid.items()}
    suite_label = config.suite + "".join(f" {k}={v}" for k, v in sorted(suite_overrides.items()))
    text = sweep_markdown(sweep_table(records, swept), f"sweep on {suite_label}")
    out = Path(args.out)
    name = "sweep_" + "_".join(f"{m}.{p}" for m, params in grid.items() for p in params)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(text)
    except OSError as exc:
        raise BenchError(f"cannot write the sweep table to --out {out}: {exc.strerror or exc}; "
                         "pick another --out") from None
    print(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.disk import require_directory
    from bench.store import ResultsStore

    store = ResultsStore(args.results)
    if not store.root.is_dir():
        raise BenchError(f"no results directory '{args.results}'; run `bench run` first or pass --results DIR")
    require_directory(args.out, "--out")
    records = list(store.records())
    texts = write_tables(records, Path(args.out), suite=args.suite)
    if not texts:
        where = f" for suite '{args.suite}'" if args.suite else ""
        raise BenchError(f"no records{where} in '{args.results}'; run `bench run --suite ...` first")
    for text in texts.values():
        print(text)
    print(f"tables (Markdown, CSV, LaTeX) written to {args.out}/", file=sys.stderr)
    if not args.no_figures:
        from bench.figures import write_figures

        try:
            figures = write_figures(records, Path(args.out), suite=args.suite)
        except OSError as exc:
            raise BenchError(f"cannot write figures to --out {args.out}: {exc.strerror or exc}; "
                             "pick another --out") from None
        for note in figures.skipped:
            print(f"note: {note}", file=sys.stderr)
        print(f"{len(figures.written)} figure file(s) (PNG, PDF) written to {args.out}/<suite>/", file=sys.stderr)
    return 0


def cmd_paper(args: argparse.Namespace) -> int:
    from bench.paper import run_paper

    outputs = run_paper(args.spec, results=args.results, out=args.out, figures=not args.no_figures,
                        strict=args.strict)
    for note in outputs.skipped:
        print(f"note: {note}", file=sys.stderr)
    for path in outputs.written:
        print(path)
    print(f"{len(outputs.written)} file(s) written, {len(outputs.skipped)} note(s)", file=sys.stderr)
    return 0


CACHE_HELP = "suite cache directory (default: $BENCH_CACHE or ~/.cache/merge-bench)"


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.check import compare_methods, format_comparison, load_results, select_suite

    runs = select_suite(load_results(args.results), args.suite, args.results)
    seeds = parse_seeds(args.seeds) if args.seeds else None
    comparisons = compare_methods(runs, args.a, args.b, where=args.results, seeds=seeds)
    print("\n".join(format_comparison(c) for c in comparisons), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bench.check import export_payload, load_results, select_suite, write_baseline
    from bench.measure import git_commit

    runs = select_suite(load_results(args.results), args.suite, args.results)
    write_baseline(args.out, export_payload(runs, commit=git_commit(), source=str(args.results)))
    suites = sorted({suite for suite, _ in runs})
    print(f"baseline of {len(runs)} method(s) on {', '.join(suites)} "
          f"({sum(len(seeds) for seeds in runs.values())} seed run(s)) written to {args.out}", file=sys.stderr)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bench.check import (
        check,
        check_method_names,
        format_check,
        load_baseline,
        load_failed,
        load_results,
        select_methods,
        select_seeds,
        select_suite,
        unreadable_of,
    )

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    if methods is not None and not methods:
        raise BenchError("--methods is empty; leave it out to check every baseline method, or write e.g. "
                         "--methods ties,task_arithmetic")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    unreadable_baseline: list[Path] = []
    unreadable_results: list[Path] = []
    baseline = select_suite(load_baseline(args.baseline, unreadable_baseline), args.suite, args.baseline)
    current = select_suite(load_results(args.results, unreadable_results), args.suite, args.results)
    if methods is not None:
        check_method_names(methods, baseline, current)
    baseline = select_seeds(select_methods(baseline, methods), seeds)
    current = select_seeds(select_methods(current, methods), seeds)
    failed = {key: {seed: reason for seed, reason in by_seed.items() if seeds is None or seed in seeds}
              for key, by_seed in select_methods(load_failed(args.results, args.suite), methods).items()}
    unreadable = [*unreadable_of(unreadable_results, args.results, args.suite, methods),
                  *unreadable_of(unreadable_baseline, args.baseline, args.suite, methods)]
    if not baseline:
        raise BenchError(f"the baseline '{args.baseline}' holds no runs of the selected --methods/--seeds")
    if not current and not any(failed.values()):
        raise BenchError(f"'{args.results}' holds no runs of the selected --methods/--seeds; run them first")
    result = check(current, baseline, tolerance=args.tolerance, task_tolerance=args.task_tolerance,
                   results_name=str(args.results), baseline_name=str(args.baseline),
                   failed={key: by_seed for key, by_seed in failed.items() if by_seed}, unreadable=unreadable)
    print(format_check(result, str(args.baseline)), end="")
    return 0 if result.passed else 1


def _add_execution_args(parser: argparse.ArgumentParser, out_help: str) -> None:
    """Flags shared by `run` and `sweep`."""
    parser.add_argument("--suite", default="tiny8", help="suite name (default: tiny8)")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda (default: auto)")
    parser.add_argument("--set", action="append", default=[], metavar="OWNER.PARAM=VALUE",
                        help="override a hyperparameter: METHOD.PARAM=VALUE or suite.PARAM=VALUE (repeatable)")
    parser.add_argument("--results", default="results", help="results directory (default: results)")
    parser.add_argument("--out", default="reports", help=f"{out_help} (default: reports)")
    parser.add_argument("--cache", default=None, help=CACHE_HELP)
    parser.add_argument("--resume", action="store_true", help="skip configurations already recorded")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--no-report", action="store_true", help="record only: no tables printed or written")
    parser.add_argument("--executor", default="local", metavar="local|ray",
                        help="who runs the jobs: this machine (default), or a Ray cluster (pip install "
                             "'merge-bench[ray]')")
    parser.add_argument("--jobs", type=int, default=1,
                        help="--executor local: worker processes running jobs side by side (default 1: this process)")
    parser.add_argument("--address", default=None,
                        help="--executor ray: 'auto' (the cluster `ray start` made on this node) or ray://HOST:PORT "
                             "(default: start a local Ray instance)")
    parser.add_argument("--gpus-per-job", type=float, default=None,
                        help="--executor ray: GPUs per job, fractions share one (default: 1 when the cluster has GPUs "
                             "and --device is not cpu, else 0)")
    parser.add_argument("--cpus-per-job", type=float, default=None, help="--executor ray: CPUs per job (default 1)")
    parser.add_argument("--trust-pickles", action="store_true",
                        help="allow loading checkpoints stored as Python pickles (the task_vectors experts); "
                             "unpickling can run arbitrary code, so only for files you trust")
    parser.add_argument("--trust-task-code", action="store_true",
                        help="allow lm-eval task YAMLs (of a suite file, or suite.lm_eval_include) with !function "
                             "tags, which make lm-eval import and run Python code from beside the YAML; only for "
                             "files you trust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Benchmark model-merging methods on suites.")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE to register extra methods or suites (also BENCH_PLUGINS=a,b)")
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="list registered methods or suites with their hyperparameters")
    p_list.add_argument("what", choices=("methods", "suites"))
    p_list.add_argument("--cache", default=None, help=CACHE_HELP)
    p_list.set_defaults(func=cmd_list)

    p_doctor = sub.add_parser("doctor", help="which suites are ready to run here and what each still lacks")
    p_doctor.add_argument("--cache", default=None, help=CACHE_HELP)
    p_doctor.set_defaults(func=cmd_doctor)

    p_prepare = sub.add_parser("prepare", help="download a suite's checkpoints and datasets into the cache")
    p_prepare.add_argument("suite", help="suite name")
    p_prepare.add_argument("--set", action="append", default=[], metavar="suite.PARAM=VALUE",
                           help="suite parameter (repeatable), e.g. --set suite.backbone=vit-b-16")
    p_prepare.add_argument("--methods", default="all",
                           help="'all' or a comma list, as for `bench run`: train splits are fetched only when one of "
                                "these methods reads them (default: all)")
    p_prepare.add_argument("--cache", default=None, help=CACHE_HELP)
    p_prepare.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p_prepare.set_defaults(func=cmd_prepare)

    p_run = sub.add_parser("run", help="run methods on a suite and record the results")
    p_run.add_argument("--methods", default="all", help="'all' or a comma list of method names")
    _add_execution_args(p_run, "where the leaderboard tables go")
    p_run.set_defaults(func=cmd_run)

    p_sweep = sub.add_parser("sweep", help="run a grid over hyperparameters (records go to the same store)")
    p_sweep.add_argument("--methods", default=None, help="comma list (default: the methods named by --param)")
    p_sweep.add_argument("--param", action="append", default=[], metavar="METHOD.PARAM=VALUES",
                         help="values v1,v2,... or an inclusive range start:stop:step (repeatable)")
    _add_execution_args(p_sweep, "where the sweep table goes")
    p_sweep.set_defaults(func=cmd_sweep)

    p_report = sub.add_parser("report", help="leaderboards from the results store")
    p_report.add_argument("--results", default="results", help="results directory (default: results)")
    p_report.add_argument("--out", default="reports", help="output directory for tables (default: reports)")
    p_report.add_argument("--suite", default=None, help="only this suite")
    p_report.add_argument("--no-figures", action="store_true", help="tables only (figures go to OUT/<suite>/)")
    p_report.set_defaults(func=cmd_report)

    p_paper = sub.add_parser("paper", help="every table and figure a paper spec names, from the results store")
    p_paper.add_argument("--spec", required=True, metavar="FILE", help="TOML spec, e.g. paper/tiny8.toml")
    p_paper.add_argument("--results", default=None, help="results directory (default: the spec's, else results)")
    p_paper.add_argument("--out", default=None, help="output directory (default: the spec's, else reports/paper)")
    p_paper.add_argument("--no-figures", action="store_true", help="tables only")
    p_paper.add_argument("--strict", action="store_true", help="fail when an output is skipped for lack of data")
    p_paper.set_defaults(func=cmd_paper)

    p_compare = sub.add_parser("compare", help="paired statistics of two methods: bootstrap CI, McNemar, Wilcoxon")
    p_compare.add_argument("a", help="method label as in the leaderboard, e.g. ties or 'ties(k=10)'")
    p_compare.add_argument("b", help="method label to compare against")
    p_compare.add_argument("--results", default="results", help="results directory (default: results)")
    p_compare.add_argument("--suite", default=None, help="only this suite")
    p_compare.add_argument("--seeds", default=None, help="only these seeds, e.g. 0,1,2 (default: all shared)")
    p_compare.set_defaults(func=cmd_compare)

    p_export = sub.add_parser("export", help="write the latest records as a baseline file for `bench check`")
    p_export.add_argument("--results", default="results", help="results directory (default: results)")
    p_export.add_argument("--suite", default=None, help="only this suite")
    p_export.add_argument("--out", required=True, help="baseline file to write, e.g. baselines/tiny8.json")
    p_export.set_defaults(func=cmd_export)

    p_check = sub.add_parser("check", help="fail (exit 1) when a method regresses against a baseline")
    p_check.add_argument("--baseline", required=True, help="baseline file (`bench export`) or results directory")
    p_check.add_argument("--results", default="results", help="results directory (default: results)")
    p_check.add_argument("--suite", default=None, help="only this suite")
    p_check.add_argument("--tolerance", type=float, default=1.0,
                         help="allowed drop of a method's average, in points (default: 1.0)")
    p_check.add_argument("--task-tolerance", type=float, default=None,
                         help="allowed drop of a single task, in points (default: 3 x --tolerance)")
    p_check.add_argument("--methods", default=None,
                         help="check only these methods (comma list of names or labels, e.g. ties,'ties(k=10)'); "
                              "by default every baseline method must be in the results")
    p_check.add_argument("--seeds", default=None,
                         help="check only these seeds, e.g. 0 (default: every baseline seed must be in the results)")
    p_check.set_defaults(func=cmd_check)
    return parser


def one_line(message: str) -> str:
    """``message`` on one line whatever input text it quotes (line breaks shown as ``\\n``)."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; must precede CUDA init
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        load_plugins(args.plugin)
        return int(args.func(args) or 0)
    except BenchError as exc:
        print(f"bench: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; every finished run is recorded, rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
