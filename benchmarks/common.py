"""Shared benchmark plumbing (imported by the suites and by conftest.py): device, environment record, side-by-side ratio tables.

Every benchmark records its case (shape, scope, mode, ...) and provider through
``record(benchmark, case, provider, **info)``. At the end of the session the mean times of
all providers of a case, measured in this one run, are printed as ratios to the case's
baseline (the eager reference) and floor (the cheapest possible memory pass), and written to
``benchmarks/results/ratios-<device>.json``.
"""

from __future__ import annotations

import math
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_CASES: dict[str, dict] = defaultdict(dict)


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def environment() -> dict:
    """Device, versions and commit, stored with every benchmark."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    import tapo_kernels

    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
        "cpu_backend": dict(tapo_kernels.CPU_BACKEND),
    }


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_s(benchmark) -> float:
    """The median seconds of a finished benchmark; NaN when nothing was timed
    (``--benchmark-disable`` runs each step once, untimed)."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        return stats.stats.median
    return math.nan


def record(benchmark, case: str, provider: str, **info) -> None:
    """Attach the case and environment to a finished benchmark and remember its mean time."""
    benchmark.extra_info.update({"case": case, "provider": provider, **environment(), **info})
    median = median_s(benchmark)
    if not math.isnan(median):
        _CASES[case][provider] = median


def ratio_tables() -> dict[str, dict[str, float]]:
    return {case: dict(providers) for case, providers in sorted(_CASES.items())}
