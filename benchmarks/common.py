"""Shared plumbing of the studies: machine info, resumable result files, BENCHMARKS.md regeneration."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "work" / "bench"
SHARED = (ROOT / ".." / "shared" / "data").resolve()


def machine() -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "commit": commit.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def peak_rss_mb(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def run_study(name: str, fn: Callable[[], dict[str, Any]], force: bool = False) -> dict[str, Any]:
    """Run ``fn`` unless ``results/NAME.json`` exists (studies are resumable one finished study at a time)."""
    path = RESULTS / f"{name}.json"
    if path.is_file() and not force:
        print(f"{name}: finished before ({path}); --force recomputes it")
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    result = {"study": name, "machine": machine(), **fn()}
    result["wall_s"] = time.perf_counter() - t0
    from mosaicseg.atomic import write_json_atomic

    write_json_atomic(path, result)
    return result


def run_cli(args: list[str], log: Path) -> float:
    """Run ``mosaicseg ARGS`` in a subprocess (its own peak memory, like a user would), return wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "mosaicseg.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"mosaicseg {' '.join(args)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0
