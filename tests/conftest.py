import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub: a stray hub call fails at once
sys.path.insert(0, str(TESTS_DIR))

import toy_plugin  # noqa: E402,F401  (registers the `toy` suite)


@pytest.fixture
def plugin_env(tmp_path):
    """Environment for `bench` subprocesses that need the toy suite."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["BENCH_PLUGINS"] = "toy_plugin"
    env["BENCH_CACHE"] = str(tmp_path / "cache")
    return env
