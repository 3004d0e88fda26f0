"""`python -m benchmarks quick` works in a scratch area of its own: its figures never reach the measured results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("benchmarks.common", reason="run from the repository root (python -m pytest)")

PRINT = "import benchmarks.common as c; print(c.QUICK, c.WORK, c.RESULTS, c.REPORT, sep='\\n')"


def _paths(quick: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "MOSAICSEG_BENCH_QUICK"}
    if quick:
        env["MOSAICSEG_BENCH_QUICK"] = "1"
    out = subprocess.run([sys.executable, "-c", PRINT], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_quick_results_and_report_live_in_the_scratch_area():
    flag, work, results, report = _paths(quick=True)
    assert flag == "True"
    assert work == str(ROOT / "work" / "bench-quick")
    assert results == str(ROOT / "work" / "bench-quick" / "results")
    assert report == str(ROOT / "work" / "bench-quick" / "BENCHMARKS.md")


def test_measured_results_and_report_are_the_repository_ones():
    flag, work, results, report = _paths(quick=False)
    assert flag == "False"
    assert work == str(ROOT / "work" / "bench")
    assert results == str(ROOT / "benchmarks" / "results")
    assert report == str(ROOT / "BENCHMARKS.md")
