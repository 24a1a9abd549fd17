"""Per-phase timings, peak memory and the environment a record was produced in."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch

PHASES = ("load", "merge", "adapt", "eval")


class PhaseTimer:
    """Accumulates wall time per phase.

    On CUDA the device is synchronised before and after each phase and the time is taken from CUDA events,
    so asynchronous kernels are charged to the phase that launched them; on CPU a monotonic clock is used.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {name: 0.0 for name in PHASES}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                torch.cuda.synchronize(self.device)
                self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        else:
            begin = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin


class PeakMemory:
    """Peak memory of one record's work: CUDA max allocated, or the process's peak RSS on CPU.

    On Linux the RSS high-water mark is reset per record through /proc/self/clear_refs, so each record
    reports its own peak; where that is unavailable the process-lifetime peak is reported and said so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False

    def read(self) -> dict:
        if self.device.type == "cuda":
            return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated(self.device))}
        peak = _vm_hwm_bytes()
        if peak is not None and self.resettable:
            return {"kind": "cpu_peak_rss", "bytes": peak}
        maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"kind": "cpu_peak_rss_process_lifetime", "bytes": int(maxrss_kib) * 1024}


def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resolve_device(name: str) -> torch.device:
    from bench.errors import BenchError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda asked for, but torch sees no CUDA device here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise BenchError(f"--device {name!r} is not one of auto|cpu|cuda")
    return torch.device(name)


_PACKAGES = ("torch", "numpy", "pandas", "scipy", "safetensors", "merge-bench", "open_clip_torch", "transformers",
             "datasets", "lm_eval")


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "device": device.type,
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Cap torch's CPU threads at ``count`` inside the block (``None``: leave them alone)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(min(previous, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
