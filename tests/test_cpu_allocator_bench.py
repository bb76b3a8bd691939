"""Smoke test of benchmarks/cpu_allocator.py: both kinds of child process run the main job's step and report
which allocator they had; the summary's ratio is the tuned median over the default one. No timing is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtime import _glibc

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not _glibc(), reason="needs glibc >= 2.33 (mallopt)")
def test_cpu_allocator_benchmark_runs_both_kinds_and_reports_a_ratio():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "cpu_allocator.py"), "--steps", "1", "--rounds", "1"]
    proc = subprocess.run(
        cmd + ["--phase", "word", "--threads", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, f"cpu_allocator.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["phase"] == "word" and out["rounds"] == 1
    for key in ("default_step_s", "tuned_step_s", "step_time_ratio"):
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0
    assert out["step_time_ratio"] == pytest.approx(out["tuned_step_s"] / out["default_step_s"])
    assert "round 0 default" in proc.stdout and "round 0 tuned" in proc.stdout
