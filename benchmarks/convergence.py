"""``python -m benchmarks convergence``: validation Dice against wall-clock minutes of universal training on CPU.

Each configuration is a set of ``mosaicseg train`` flags run for the same wall-clock budget on the same work
folder (fold 0, seed 0): the defaults, the settings of issue 7's report, and each lever alone. The curve is
the per-dataset validation pseudo-Dice the run logs (``metrics.jsonl``); the end point is scored like a user
would score it: ``mosaicseg predict`` on every held-out case of each dataset, then ``mosaicseg evaluate``
(per-task Dice in the original geometry). Runs are kept in ``work/bench/conv_COLLECTION/runs`` and reused
(a run with ``checkpoint_final.pt`` is not trained again; an interrupted one resumes), so the study can be
extended configuration by configuration. A configuration with plan flags (:data:`PLAN_FLAGS`) trains on its own
plan, in ``work/bench/conv_COLLECTION_NAME`` (the default plan's preprocessed cases linked in: the network plan
does not change them).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import (
    QUICK,
    RESULTS,
    ROOT,
    WORK,
    Ledger,
    evaluate,
    evaluation,
    held_out_cases,
    held_out_links,
    link_preprocessed,
    run_cli,
)

COLLECTIONS = {name: ROOT / "collections" / f"{name}.yaml" for name in ("ixi3", "mri7", "shared2d")}

# the settings before this study that later defaults changed, spelled out so those runs stay what they were:
# the CPU plan's 64³ patch, AdamW at 1e-3, validation of whole cases, unbounded, output biases at the layer's
# initialisation
BEFORE = [
    "--patch-size", "64,64,64", "--val-share", "1", "--val-mode", "cases", "--recipe-option", "head_prior=null",
]  # fmt: skip
# what issue 7 ran: AdamW, bf16 autocast, validation on 4 cases every 2 epochs of 100 iterations
ISSUE_SETTINGS = [
    "--optimizer", "adamw", "--lr", "1e-3", "--precision", "mixed", "--iterations-per-epoch", "100",
    "--val-every", "2", "--val-max-cases", "4",
]  # fmt: skip


def _flags(*parts: list[str]) -> list[str]:
    """Flag lists joined as the command line would resolve them: a later value of a flag (of a recipe option,
    by its name) replaces the earlier one in place, so the table shows each setting once."""
    resolved: dict[str, tuple[str, str]] = {}
    for part in parts:
        for flag, value in zip(part[::2], part[1::2], strict=True):
            key = f"{flag} {value.split('=', 1)[0]}" if flag == "--recipe-option" else flag
            resolved[key] = (flag, value)
    return [x for pair in resolved.values() for x in pair]


CONFIGS: dict[str, list[str]] = {
    # the train command's defaults before this study (SGD, float32, validation every 50 iterations)
    "defaults-before": _flags(BEFORE, ["--optimizer", "sgd", "--precision", "fp32", "--iterations-per-epoch", "50"]),
    "issue-settings": _flags(BEFORE, ISSUE_SETTINGS),
    "head-prior": _flags(BEFORE, ISSUE_SETTINGS, ["--recipe-option", "head_prior=0.003"]),
    # issue 7's third try (a smaller patch, so more iterations, and a larger learning rate) with the prior
    "prior-48-lr3e-3": _flags(
        BEFORE, ISSUE_SETTINGS, ["--recipe-option", "head_prior=0.003", "--patch-size", "48,48,48", "--lr", "3e-3"]
    ),
    # the prior with foreground voxels weighted 20x in the BCE (a task whose outputs collapsed to ~0 gets a pull)
    "prior-posweight20": _flags(
        BEFORE, ISSUE_SETTINGS, ["--recipe-option", "head_prior=0.003", "--recipe-option", "bce_pos_weight=20"]
    ),
    # the train command's defaults after this study, nothing typed (plan: 48³ on CPU; AdamW 3e-3; bf16 on
    # native-bf16 CPUs; validation within 10 % of the time; head_prior "auto", each task's voxel share)
    "defaults-after": [],
    # the new defaults with one lever taken back each
    "after-no-prior": ["--recipe-option", "head_prior=null"],
    "after-fp32": ["--precision", "fp32"],
    "after-val-unbounded": ["--val-share", "1"],
    # validation by sliding-window prediction of whole cases (the default before patch validation)
    "after-val-cases": ["--val-mode", "cases"],
    # every dataset drawn equally often (as each one's single run gets an equal share of the time), instead of
    # MultiTalent's sqrt of its size
    "after-uniform": ["--sampling", "uniform"],
    "after-64": ["--patch-size", "64,64,64"],
    # a smaller patch: cheaper iterations, less context (a candidate CPU plan for the paradigm study)
    "after-32": ["--patch-size", "32,32,32"],
    "after-lr1e-3": ["--lr", "1e-3"],
    "after-prior-0.003": ["--recipe-option", "head_prior=0.003"],
    # the defaults on a plan whose network anisotropy is decided at the datasets' largest spacing (PLAN_FLAGS)
    "topology-max": [],
    # Hermes (issue 8's recipe) with the same defaults: a first look on real data
    "hermes": ["--recipe", "hermes"],
    # one `single` run per dataset on the same plan, the budget split evenly: equal total time (see _singles)
    "singles": ["--recipe", "single"],
}  # fmt: skip
# `mosaicseg plan` flags of the configurations that train on a plan of their own
PLAN_FLAGS: dict[str, list[str]] = {
    # the rule before: one thick-slice dataset (mri7's ACDC, 10 mm) made the whole network anisotropic
    "topology-max": ["--topology-spacing", "max"],
}
SINGLES = "singles"
# the universal run that the singles are held against
UNIVERSAL = "defaults-after"


# runs on the default (patch) validation are kept apart from the cached ones trained before it became the default,
# which validated whole cases on another schedule
PATCHVAL = "_patchval"


def run_folder(workdir: Path, name: str, budget: str) -> Path:
    """A configuration's run folder (:data:`PATCHVAL` unless its flags set ``--val-mode``)."""
    pinned = any(flag == "--val-mode" for flag in CONFIGS[name][::2])
    return workdir / "runs" / f"{name}_{budget}{'' if pinned else PATCHVAL}"


def _plan(collection: str, name: str | None = None) -> Path:
    """Plan (again: a plan made by an older default is replaced; cached cases of an unchanged preprocessing
    are kept); configuration ``name``'s own plan (:data:`PLAN_FLAGS`) in a work folder of its own, after the
    default one, whose preprocessed cases it links."""
    flags = PLAN_FLAGS.get(name or "", [])
    default = WORK / f"conv_{collection}"
    workdir = WORK / f"conv_{collection}_{name}" if flags else default
    if flags:
        link_preprocessed(default, workdir)
    log = WORK / "logs" / f"{workdir.name}_plan.log"
    run_cli(["plan", str(COLLECTIONS[collection]), "-o", str(workdir), "--overwrite", *flags], log)
    return workdir


def network_summary(workdir: Path, run: Path | None = None) -> dict[str, Any]:
    """The plan's network as the report states it, with the patch and batch ``run`` trained with (a flag such as
    ``--patch-size`` overrides the plan's)."""
    net = json.loads((workdir / "plans.json").read_text())["network"]
    keys = ("patch_size", "batch_size", "features", "kernel_sizes", "strides", "topology_spacing")
    summary = {k: net[k] for k in keys}
    if run is not None and (run / "config.json").is_file():
        trained = json.loads((run / "config.json").read_text())
        summary.update({k: trained[k] for k in ("patch_size", "batch_size") if k in trained})
    return summary


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _score(workdir: Path, run: Path, datasets: list[str], n_cases: int | None) -> dict[str, dict[str, float]]:
    """Held-out Dice per dataset and task of the run's final checkpoint (predict + evaluate)."""
    out: dict[str, dict[str, float]] = {}
    for dataset in datasets:
        base = run / "heldout" / dataset
        images, labels = held_out_links(dataset, held_out_cases(workdir, dataset)[:n_cases], base)
        pred = base / "pred"
        final = run / "checkpoint_final.pt"
        summary_path = pred / "summary.json"
        if not (summary_path.is_file() and summary_path.stat().st_mtime > final.stat().st_mtime):  # not scored yet
            run_cli(["predict", "-m", str(run), "-i", str(images), "-o", str(pred), "--dataset", dataset,
                     "--no-largest-component", "--overwrite"], base / "predict.log")  # fmt: skip
            evaluate(pred, labels, dataset, base / "evaluate.log")
        out[dataset] = {label: v["dice"]["mean"] for label, v in evaluation(pred)["labels"].items()}
    return out


def study_convergence(collection: str, configs: list[str], budget_min: float) -> dict[str, Any]:
    default = _plan(collection)
    datasets = json.loads((default / "vocabulary.json").read_text())["datasets"]
    ledger = Ledger(f"convergence-{collection}-{budget_min:g}m")
    runs: dict[str, Any] = {}
    budget = f"{budget_min:g}m"
    for name in configs:
        if name == SINGLES:
            runs[name] = {**_singles(default, datasets, budget_min, ledger), "network": network_summary(default)}
            continue
        workdir = _plan(collection, name) if name in PLAN_FLAGS else default
        run = run_folder(workdir, name, budget)
        setting = {"flags": CONFIGS[name], "plan_flags": PLAN_FLAGS.get(name, []), "run": run.name}
        train = partial(_train_and_score, collection, name, workdir, run, budget, datasets)
        runs[name] = ledger.step(name, setting, train)
    keys = [*configs, *(f"{SINGLES}/{d}" for d in datasets)]
    return {
        "collection": collection,
        "datasets": datasets,
        "budget_min": budget_min,
        "runs": runs,
        "commits": ledger.commits(keys),
        "hosts": ledger.hosts(keys),
    }


def _train_and_score(
    collection: str, name: str, workdir: Path, run: Path, budget: str, datasets: list[str]
) -> dict[str, Any]:
    """Configuration ``name``'s run (trained, or resumed, unless finished) summed up and scored on held-out cases."""
    if not (run / "checkpoint_final.pt").is_file():
        args = ["train", str(workdir), "--fold", "0", "--seed", "0", "--device", "cpu", "--time-budget", budget,
                *CONFIGS[name], "-o", str(run)]  # fmt: skip
        if (run / "checkpoint_latest.pt").is_file():
            args.append("--resume")
        run_cli(args, WORK / "logs" / f"conv_{collection}_{name}_{budget}.log")
    records = _records(run)
    last = records[-1]
    return {
        "flags": CONFIGS[name],
        "plan_flags": PLAN_FLAGS.get(name, []),
        "network": network_summary(workdir, run),
        "iterations": last["iteration"],
        "train_min": last["elapsed_s"] / 60,
        "s_per_iteration": last["elapsed_s"] / max(1, last["iteration"]),
        "validation_min": sum(r.get("val_time_s", 0.0) for r in records) / 60,
        # runs from before patch validation have no val_mode: they validated whole cases
        "val_mode": json.loads((run / "config.json").read_text())["train_config"].get("val_mode", "cases"),
        "curve": [
            {"minutes": r["elapsed_s"] / 60, "iteration": r["iteration"], "val_dice": r["val_dice"]}
            for r in records
            if "val_dice" in r
        ],
        "heldout_dice": _score(workdir, run, datasets, 2 if QUICK else None),
    }


def _singles(workdir: Path, datasets: list[str], budget_min: float, ledger: Ledger) -> dict[str, Any]:
    """Each dataset's own ``single`` model, trained for ``budget_min / len(datasets)`` minutes on the collection's
    plan (same preprocessing, fold and seed as the universal run), scored on its held-out cases: together they
    take the universal run's total time. Returned in a run's shape (summed iterations and minutes), with each
    dataset's part under ``per_dataset``; each part is a step of ``ledger``."""
    share_s = budget_min * 60 / len(datasets)
    parts: dict[str, Any] = {}
    for dataset in datasets:
        run = workdir / "runs" / f"{SINGLES}-{dataset.split('_')[0]}_{budget_min:g}m{PATCHVAL}"
        setting = {"flags": ["--recipe", "single", "--dataset", dataset, "--time-budget", f"{share_s:.0f}s"]}
        parts[dataset] = ledger.step(f"{SINGLES}/{dataset}", setting, partial(_single, workdir, run, dataset, share_s))
    iterations = sum(p["iterations"] for p in parts.values())
    train_min = sum(p["train_min"] for p in parts.values())
    return {
        "flags": ["--recipe", "single", "--dataset", "EACH", "--time-budget", f"{share_s:.0f}s"],
        "iterations": iterations,
        "train_min": train_min,
        "s_per_iteration": train_min * 60 / max(1, iterations),
        "validation_min": sum(p["validation_min"] for p in parts.values()),
        "val_mode": "/".join(sorted({p.get("val_mode", "cases") for p in parts.values()})),
        "curve": [],  # one curve per dataset: see per_dataset
        "heldout_dice": {d: p["heldout_dice"] for d, p in parts.items()},
        "per_dataset": parts,
    }


def _single(workdir: Path, run: Path, dataset: str, share_s: float) -> dict[str, Any]:
    if not (run / "checkpoint_final.pt").is_file():
        args = ["train", str(workdir), "--recipe", "single", "--dataset", dataset, "--fold", "0", "--seed", "0",
                "--device", "cpu", "--time-budget", f"{share_s:.0f}s", "-o", str(run)]  # fmt: skip
        if (run / "checkpoint_latest.pt").is_file():
            args.append("--resume")
        run_cli(args, WORK / "logs" / f"conv_{workdir.name}_{run.name}.log")
    records = _records(run)
    return {
        "iterations": records[-1]["iteration"],
        "train_min": records[-1]["elapsed_s"] / 60,
        "validation_min": sum(r.get("val_time_s", 0.0) for r in records) / 60,
        "val_mode": json.loads((run / "config.json").read_text())["train_config"].get("val_mode", "cases"),
        "heldout_dice": _score(workdir, run, [dataset], 2 if QUICK else None)[dataset],
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Mean validation pseudo-Dice over the collection's datasets against training minutes, one line a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, run in result["runs"].items():
        if not run["curve"]:
            continue  # the singles: several runs, each on its own dataset
        xs = [p["minutes"] for p in run["curve"]]
        ys = [sum(p["val_dice"].values()) / len(p["val_dice"]) for p in run["curve"]]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("training wall-clock minutes (validation included)")
    ax.set_ylabel("mean validation pseudo-Dice")
    ax.set_title(f"{result['collection']}: universal recipe, fold 0, seed 0")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_path(collection: str, budget_min: float) -> Path:
    return RESULTS / f"convergence-{collection}-{budget_min:g}m.png"
