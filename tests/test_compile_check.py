"""Every Triton kernel compiles for a Hopper GPU (sm_90), on this machine without one.

The CPU test suite runs the kernels in the Triton interpreter, which accepts programs the
compiler rejects and never takes the compiled-only branches; ``tapo_kernels.compile_check``
compiles every specialization the launchers produce to a CUDA binary instead.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend")

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {
    "_fused_correct_kernel",
    "_row_stats_kernel",
    "_policy_loss_fwd_kernel",
    "_policy_loss_bwd_kernel",
    "_logprob_fwd_kernel",
    "_logprob_bwd_kernel",
}


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    report_path = tmp_path / "report.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tapo_kernels.compile_check",
            "--arch",
            "90",
            "--quiet",
            "--json",
            str(report_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["failures"] == []
    assert set(report["kernels"]) == KERNELS
    # every algorithm x aggregation, dtypes, switches: well over a hundred launches
    assert report["specializations"] >= 150
    # only the half-precision log-probabilities are refused, by validation, before any launch
    assert all("logp must have dtype" in r for r in report["rejected"])
    cubins = list((tmp_path / "cache").rglob("*.cubin"))
    assert len(cubins) >= 30  # distinct binaries really built (the rest hit the cache)
