"""Throughput of a job grid on Ray: 2 workers vs 1, side by side in one run (issue 11's benchmark, not a test).

The grid is a data-free + Fisher/RegMean grid on tiny8: task arithmetic, TIES, DARE, Fisher and RegMean over
several seeds (and each seed's `individual` reference row). Each configuration gets a fresh local Ray instance
of 2 CPUs; one Ray worker at a time is ``--cpus-per-job 2``, two are ``--cpus-per-job 1``. The time of a
configuration is the driver's whole execution: planning, submitting, starting the Ray workers, each worker
loading the suite, every job, writing every record (Ray's own start, ~3 s, is left out and printed apart). The
in-process local executor runs the same grid as the floor.

    python benchmarks/bench_ray_grid.py            # tiny8 full size (built into $BENCH_CACHE on first use)
    python benchmarks/bench_ray_grid.py --size ci --seeds 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import ray

from bench.executors import InProcessExecutor, RayExecutor, RayOptions
from bench.runner import RunConfig, default_cache_dir, execute

METHODS = ["task_arithmetic", "ties", "dare_ta", "fisher", "regmean"]


def run_grid(config: RunConfig, executor) -> tuple[float, int]:
    start = time.perf_counter()
    summary = execute(config, executor=executor, log=lambda message: None)
    return time.perf_counter() - start, len(summary.computed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=("full", "ci"))
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 (default 4)")
    parser.add_argument("--cache", default=None, help="suite cache (default: $BENCH_CACHE or ~/.cache/merge-bench)")
    args = parser.parse_args()
    cache = Path(args.cache) if args.cache else default_cache_dir()

    def config(results: Path) -> RunConfig:
        return RunConfig(suite="tiny8", methods=METHODS, seeds=list(range(args.seeds)), device="cpu",
                         suite_overrides={"size": args.size}, results_dir=results, cache_dir=cache, progress=False)

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        print(f"tiny8 size={args.size}: {', '.join(METHODS)} x {args.seeds} seeds, on {os.cpu_count()} cores",
              file=sys.stderr)
        build_seconds, _ = run_grid(config(scratch_dir / "warm"), InProcessExecutor())  # builds the cache once
        print(f"in-process warm-up (builds the suite if not cached): {build_seconds:.1f} s", file=sys.stderr)

        rows = []
        floor, jobs = run_grid(config(scratch_dir / "local"), InProcessExecutor())
        rows.append(("local, in process", floor, jobs))
        for workers in (1, 2):
            began = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
            ray_start = time.perf_counter() - began
            try:
                executor = RayExecutor(RayOptions(cpus_per_job=2 / workers))
                seconds, jobs = run_grid(config(scratch_dir / f"ray{workers}"), executor)
            finally:
                ray.shutdown()
            rows.append((f"Ray, {workers} worker{'s' if workers > 1 else ''} (Ray start {ray_start:.1f} s apart)",
                         seconds, jobs))

    one_worker = rows[1][1]
    print("| executor | jobs | seconds | jobs / min | vs Ray 1 worker |")
    print("|---|---|---|---|---|")
    for label, seconds, jobs in rows:
        print(f"| {label} | {jobs} | {seconds:.1f} | {60 * jobs / seconds:.1f} | {one_worker / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
