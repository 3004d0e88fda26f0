"""Shared plumbing of the studies: machine info, resumable result files, BENCHMARKS.md regeneration."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
# `--quick` runs the studies at their smallest setting (a few minutes in all): the check that the suite works. It
# runs in a scratch area of its own, so its figures never mix with measured ones or reach BENCHMARKS.md.
QUICK_ENV = "MOSAICSEG_BENCH_QUICK"
QUICK = os.environ.get(QUICK_ENV) == "1"
WORK = ROOT / "work" / ("bench-quick" if QUICK else "bench")
# the checkout whose results and report a study writes: this one, or (scripts/bench_queue.sh, which runs the code of
# a worktree pinned at a commit) the main checkout, so that the worktree stays clean and each study's results,
# ledger included, land where they are committed and where the next study reads them
OUT_ENV = "MOSAICSEG_BENCH_OUT"
OUT = Path(os.environ[OUT_ENV]).resolve() if os.environ.get(OUT_ENV) else ROOT
RESULTS = WORK / "results" if QUICK else OUT / "benchmarks" / "results"
REPORT = WORK / "BENCHMARKS.md" if QUICK else OUT / "BENCHMARKS.md"
SHARED = (ROOT / ".." / "shared" / "data").resolve()


def plain_network(network: dict[str, Any]) -> dict[str, Any]:
    """A plan ``network`` given by size (``patch_size``, ``features``, ``batch_size``) completed with plain
    3³ convolutions and stride 2 per stage after the first."""
    n, nd = len(network["features"]), len(network["patch_size"])
    return {
        **network,
        "num_stages": n,
        "kernel_sizes": [[3] * nd for _ in range(n)],
        "strides": [[1] * nd] + [[2] * nd for _ in range(n - 1)],
    }


# the instruction sets that decide which convolution kernels oneDNN can use (float32 width, bf16, int8)
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def kernel_flags() -> list[str]:
    """Which of :data:`KERNEL_FLAGS` this CPU reports (empty where ``/proc/cpuinfo`` is unreadable)."""
    from mosaicseg.runtime import cpu_flags

    have = cpu_flags()
    return [f for f in KERNEL_FLAGS if f in have]


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
        "cpu_flags": kernel_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "commit": commit.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CliRun(NamedTuple):
    seconds: float
    peak_rss_mb: float


def last_metrics(run: Path) -> dict[str, Any]:
    """The last line of a run's ``metrics.jsonl`` (empty before its first epoch): ``elapsed_s`` is the training
    time of every resumed segment together."""
    metrics = run / "metrics.jsonl"
    return json.loads(metrics.read_text().splitlines()[-1]) if metrics.is_file() else {}


def finished(run: Path, iterations: int) -> bool:
    """Whether ``run`` ended at ``iterations`` (a final checkpoint of a shorter or longer run does not count)."""
    return (run / "checkpoint_final.pt").is_file() and last_metrics(run).get("iteration") == iterations


def optimizer_setting(recipe: str) -> dict[str, str]:
    """A step setting's optimiser entry for ``recipe``: empty for AdamW (every step measured before recipes had
    optimisers of their own trained under it, and keeps its setting), else ``{"optimizer": name}``."""
    from mosaicseg.config import recipe_optimizer

    name = recipe_optimizer(recipe)
    return {} if name == "adamw" else {"optimizer": name}


def run_study(
    name: str, fn: Callable[[], dict[str, Any]], force: bool = False, ledgered: bool = False
) -> dict[str, Any]:
    """Run ``fn`` unless ``results/NAME.json`` exists (studies are resumable one finished study at a time).

    ``ledgered``: the study keeps its steps in a :class:`Ledger`, so it always runs. Its finished steps come back
    from the ledger in seconds, and a step whose setting changed since the results were written (another
    optimiser, say) is measured again. Skipping such a study because its results exist would keep the old figures
    under a setting the code no longer uses. ``wall_s`` is then the last invocation's time, not the study's."""
    path = RESULTS / f"{name}.json"
    if path.is_file() and not force:
        if not ledgered:
            print(f"{name}: finished before ({path}); --force recomputes it")
            return json.loads(path.read_text())
        print(f"{name}: results exist ({path}); its ledger decides which steps are still to measure", flush=True)
    t0 = time.perf_counter()
    result = {"study": name, "machine": machine(), **fn()}
    result["wall_s"] = time.perf_counter() - t0
    from mosaicseg.atomic import write_json_atomic

    write_json_atomic(path, result)
    return result


def run_cli(args: list[str], log: Path, python: str | None = None) -> CliRun:
    """Run ``mosaicseg ARGS`` in its own process (in ``python``, default this one), like a user would; return its
    wall seconds and peak RSS.

    ``os.wait4`` gives the rusage of that one child (``RUSAGE_CHILDREN`` would be the maximum over every child
    so far, hiding a smaller run behind a larger earlier one)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(
            [python or sys.executable, "-m", "mosaicseg.cli", *args], stdout=f, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise SystemExit(f"mosaicseg {' '.join(args)} failed (exit {code}); see {log}")
    return CliRun(seconds, usage.ru_maxrss / 1024)


def host(stamp: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a speed figure depends on in :func:`machine` (``stamp``, or taken now): the CPU, its flags, cores and
    torch threads."""
    stamp = stamp or machine()
    return {k: stamp[k] for k in ("cpu", "cpu_flags", "cores", "threads")}


def host_label(record: dict[str, Any] | None) -> str:
    """A short name of the host a step ran on: its CPU, whether it computes bf16 in hardware, its threads."""
    if not record:
        return "unrecorded"
    bf16 = (
        " with AMX"
        if "amx_bf16" in record["cpu_flags"]
        else " with AVX512-BF16"
        if "avx512_bf16" in record["cpu_flags"]
        else ""
    )
    return f"{record['cpu']}{bf16}, {record['threads']} threads"


class Ledger:
    """The finished steps of a study (a trained and scored run, say), kept with its results in
    ``RESULTS/ledger/STUDY.json`` — committed, unlike ``work/`` — so that a study longer than one sitting resumes
    from what earlier sittings measured even where their run folders and checkpoints are gone (a fresh clone).

    A step is stored under its key with the setting it was measured under, the commit and the date. Asked for
    under another setting, it is measured again and the old record moves to ``superseded`` (its figures stay on
    record). To measure a step again under the same setting, delete its entry from the file."""

    # how many new steps one invocation may measure (``python -m benchmarks STUDY --steps N``): a sitting that
    # ends at a fixed time starts only the steps it can finish; None: all
    limit: int | None = None

    def __init__(self, study: str) -> None:
        self.path = RESULTS / "ledger" / f"{study}.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("steps", {})
        self.measured = 0

    def get(self, key: str, setting: dict[str, Any]) -> dict[str, Any] | None:
        """The record of step ``key`` if it was measured under ``setting``, else None."""
        # a setting goes through JSON once so that tuples and lists compare as they are stored
        setting = json.loads(json.dumps(setting))
        entry = self.data["steps"].get(key)
        return entry["record"] if entry is not None and entry["setting"] == setting else None

    def step(
        self, key: str, setting: dict[str, Any], fn: Callable[[], dict[str, Any]], counted: bool = True
    ) -> dict[str, Any]:
        """Step ``key``'s record: the ledger's when it holds one measured under ``setting``; else ``fn()``, recorded
        (atomically, before it is returned: a study killed after this step keeps it). ``counted=False``: a step that
        belongs to the one before it (a score of its checkpoint), which ``--steps`` does not hold back."""
        setting = json.loads(json.dumps(setting))  # stored as JSON: compared and written in that form
        found = self.get(key, setting)
        if found is not None:
            return found
        if counted and Ledger.limit is not None and self.measured >= Ledger.limit:
            raise SystemExit(
                f"{self.path.name}: {self.measured} new step(s) measured, as --steps {Ledger.limit} asked; the next "
                f"is {key}. Run the study again to go on: every finished step is kept in {self.path}."
            )
        old = self.data["steps"].pop(key, None)
        if old is not None:
            self.data.setdefault("superseded", []).append({"key": key, **old})
            print(f"{self.path.name}: {key} was measured under another setting; measuring it again", flush=True)
        record = fn()
        self.measured += counted
        stamp = machine()
        self.data["steps"][key] = {
            "setting": setting,
            "commit": stamp["commit"],
            "date": stamp["date"],
            # the host of a sitting varies (two CPUs seen, 2x apart on one step): its speed figures need it
            "host": host(stamp),
            "record": record,
        }
        from mosaicseg.atomic import write_json_atomic

        write_json_atomic(self.path, self.data)
        return record

    def hosts(self, keys: list[str] | None = None) -> dict[str, int]:
        """How many of the steps (``keys``, default all) each host measured (:func:`host_label`; steps from before
        hosts were recorded: ``unrecorded``)."""
        steps = self.data["steps"]
        labels = [host_label(steps[k].get("host")) for k in (keys if keys is not None else steps) if k in steps]
        return {label: labels.count(label) for label in dict.fromkeys(labels)}

    def commits(self, keys: list[str] | None = None) -> list[str]:
        """The commits the steps (``keys``, default all) were measured at, in order of first appearance."""
        steps = self.data["steps"]
        return list(dict.fromkeys(steps[k]["commit"] for k in (keys if keys is not None else steps) if k in steps))


def held_out_cases(workdir: Path, dataset: str, fold: int = 0) -> list[str]:
    """The case ids of ``dataset`` that fold ``fold`` of a MosaicSeg work folder holds out for validation (read
    as the Trainer reads them)."""
    from mosaicseg.data.splits import fold_cases
    from mosaicseg.data.workdir import list_cases, load_collection_config

    _, val, _ = fold_cases(load_collection_config(workdir), {dataset: list_cases(workdir)[dataset]}, fold)
    return sorted(c for _, c in val)


def held_out_files(dataset: str, cases: list[str]) -> tuple[Path, list[Path]]:
    """The shared raw dataset folder, and the image files (every channel) then label files of ``cases``."""
    folder = SHARED / dataset
    ending = json.loads((folder / "dataset.json").read_text())["file_ending"]
    images = [p for c in cases for p in sorted((folder / "imagesTr").glob(f"{c}_*{ending}"))]
    labels = [folder / "labelsTr" / f"{c}{ending}" for c in cases]
    return folder, images + labels


def held_out_links(dataset: str, cases: list[str], into: Path) -> tuple[Path, Path]:
    """Folders ``into/images`` and ``into/labels`` of links to ``cases``' raw image (every channel) and label
    files: the input of ``mosaicseg predict`` and the reference of ``mosaicseg evaluate``."""
    _, files = held_out_files(dataset, cases)
    images = link_all([f for f in files if f.parent.name == "imagesTr"], into / "images")
    labels = link_all([f for f in files if f.parent.name == "labelsTr"], into / "labels")
    return images, labels


def evaluation(pred: Path) -> dict[str, Any]:
    """The one dataset's entry of ``pred/summary.json`` (``mean``, ``labels``) that ``mosaicseg evaluate`` wrote."""
    return next(iter(json.loads((pred / "summary.json").read_text())["datasets"].values()))


def evaluate(pred: Path, labels: Path, dataset: str, log: Path) -> dict[str, Any]:
    """``mosaicseg evaluate`` of the predictions in ``pred`` against ``labels`` with ``dataset``'s label names;
    its :func:`evaluation`."""
    run_cli(["evaluate", str(pred), str(labels), "--dataset-json", str(SHARED / dataset / "dataset.json"),
             "--overwrite"], log)  # fmt: skip
    return evaluation(pred)


def link_preprocessed(source: Path, workdir: Path) -> None:
    """Hard-link ``source``'s ``preprocessed`` cache into ``workdir`` when it has none: a plan that differs only in
    its network preprocesses the same cases (a case re-preprocessed later is written anew, not through the link)."""
    if (source / "preprocessed").is_dir() and not (workdir / "preprocessed").exists():
        shutil.copytree(source / "preprocessed", workdir / "preprocessed", copy_function=os.link)


def link_all(paths: list[Path], into: Path) -> Path:
    """A folder ``into`` of symlinks to exactly ``paths`` (links of an earlier, larger selection removed)."""
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.iterdir():  # a folder left by an earlier, larger selection
        if stale.is_symlink() and stale.name not in {p.name for p in paths}:
            stale.unlink()
    for p in paths:
        link = into / p.name
        if not link.exists():
            link.symlink_to(p)
    return into


def mean_sd(values: list[float | None], digits: int = 3) -> str:
    """``"m ± sd"`` over the values that are not None (one value: itself; none: a dash), for the report tables."""
    import statistics

    present = [v for v in values if v is not None]
    if not present:
        return "–"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.mean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"
