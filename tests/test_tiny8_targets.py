"""The full-size tiny8 suite meets the targets it is designed for (slow: `tox -e slow`)."""

import os
from pathlib import Path

import numpy as np
import pytest

from bench.runner import RunConfig, default_cache_dir, execute

pytestmark = pytest.mark.slow


def test_full_tiny8_targets(tmp_path):
    cache = Path(os.environ.get("BENCH_CACHE", default_cache_dir()))
    summary = execute(RunConfig(suite="tiny8", methods=["all"], seeds=[0, 1], results_dir=tmp_path, cache_dir=cache,
                                progress=False))
    by_method: dict[str, list[float]] = {}
    for record in summary.computed:
        by_method.setdefault(record["method"], []).append(record["average"])
    mean = {m: float(np.mean(v)) for m, v in by_method.items()}
    spread = {m: float(np.std(v)) for m, v in by_method.items()}
    assert mean["individual"] >= 0.90
    assert mean["pretrained"] <= 0.60
    classic = ("weight_averaging", "task_arithmetic", "ties")
    for name in classic:
        assert mean["pretrained"] < mean[name] < mean["individual"], name
    for i, a in enumerate(classic):
        for b in classic[i + 1:]:
            assert abs(mean[a] - mean[b]) > max(spread[a], spread[b]) + 0.005, (a, b)
    # issue 4: SAMerging at its defaults beats task arithmetic at its default
    assert mean["samerging"] > mean["task_arithmetic"] + max(spread["samerging"], spread["task_arithmetic"])
