"""``python -m benchmarks anisotropy``: thick slices on a network shared with isotropic datasets.

ACDC (Dataset007, cine MR at 1.5 × 1.5 × 10 mm) sits in ``collections/mri7.yaml`` among isotropic sets (1–2 mm).
The collection's network is planned at the datasets' median spacing, near-isotropic (3×3×3 kernels, every axis
pooled from the first stage), and ACDC stayed near Dice 0.4 in every study (paradigms, convergence). ``mosaicseg
plan`` now resamples such a dataset's coarse axis to the network's anisotropy (``--anisotropy match``: ACDC at
1.5 × 1.5 × 2 mm, nearest neighbour across slices as nnU-Net resamples that axis); ``--anisotropy keep`` leaves
it at 10 mm. This study plans mri7 both ways (the same network), trains ``--recipe single --dataset
Dataset007_ACDC`` for :data:`ITERATIONS` (the paradigm study's single runs: 14,000 / 7) with seeds 0 and 1, and
scores every fold-0 held-out ACDC case with ``mosaicseg predict`` + ``mosaicseg evaluate`` in the original
10 mm geometry (Dice, HD95 per structure), so both plans are measured on the same grid.

Every finished run is a step of the study's ledger (``benchmarks/results/ledger/anisotropy.json``, committed):
the study resumes across sittings and fresh clones; ``MOSAICSEG_BENCH_QUICK=1`` checks the plumbing.
"""

from __future__ import annotations

import json
import shutil
import statistics
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import (
    QUICK,
    ROOT,
    WORK,
    Ledger,
    evaluate,
    finished,
    held_out_cases,
    held_out_links,
    last_metrics,
    run_cli,
)
from benchmarks.common import mean_sd as _ms

MRI7 = ROOT / "collections" / "mri7.yaml"
DATASET = "Dataset007_ACDC"
MODES = ("keep", "match")
SEEDS = (0, 1)
ITERATIONS = 2000


def _workdir(mode: str) -> Path:
    """mri7 planned with ``--anisotropy MODE``; only ACDC preprocessed (the single runs read nothing else)."""
    workdir = WORK / "anisotropy" / mode
    if not (workdir / "plans.json").is_file():
        # another mri7 work folder's fingerprint: plan reuses it for every unchanged dataset instead of reading them
        areas = [WORK, ROOT / "work" / "bench"]  # the quick check borrows the measured area's, too
        known = [a / w / "fingerprint.json" for a in areas for w in ("mri7", "conv_mri7")]
        known = [f for f in known if f.is_file()]
        if known:
            workdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(known[0], workdir / "fingerprint.json")
        run_cli(["plan", str(MRI7), "-o", str(workdir), "--anisotropy", mode, "--no-preprocess"],
                WORK / "logs" / f"anisotropy_plan_{mode}.log")  # fmt: skip
    run_cli(["preprocess", str(workdir), "--dataset", DATASET], WORK / "logs" / f"anisotropy_pre_{mode}.log")
    return workdir


def _run(workdir: Path, iterations: int, seed: int, cases: list[str]) -> dict[str, Any]:
    """Train (or resume, or reuse) one single ACDC model; predict and score the held-out ``cases``."""
    run = workdir / "runs" / f"single_ACDC_s{seed}_{iterations}it"
    if not finished(run, iterations):
        args = ["train", str(workdir), "--recipe", "single", "--dataset", DATASET, "--iterations", str(iterations),
                "--seed", str(seed), "--fold", "0", "--device", "cpu", "--iterations-per-epoch",
                str(min(100, iterations)), "--val-every", "100000", "--val-max-cases", "2" if QUICK else "0",
                "--val-mode", "cases", "-o", str(run)]  # fmt: skip
        if (run / "checkpoint_latest.pt").is_file():
            args.append("--resume")
        run_cli(args, WORK / "logs" / f"anisotropy_{workdir.name}_s{seed}.log")
    final = last_metrics(run)
    base = run / "heldout"
    images, labels = held_out_links(DATASET, cases, base)
    predicted = run_cli(["predict", "-m", str(run), "-i", str(images), "-o", str(base / "pred"), "--dataset",
                         DATASET, "--no-largest-component", "--overwrite"], base / "predict.log")  # fmt: skip
    scored = evaluate(base / "pred", labels, DATASET, base / "evaluate.log")
    return {
        "seed": seed,
        "run": str(run),
        "s_per_iteration": final["elapsed_s"] / iterations,
        "val_dice": final.get("val_dice", {}).get(DATASET),
        "cases": len(cases),
        "predict_s_per_case": predicted.seconds / len(cases),
        "dice": {k: v["dice"]["mean"] for k, v in scored["labels"].items()},
        "hd95": {k: v["hd95"]["mean"] for k, v in scored["labels"].items()},
    }


def study_anisotropy() -> dict[str, Any]:
    """See the module docstring."""
    iterations = 4 if QUICK else ITERATIONS
    seeds = SEEDS[:1] if QUICK else SEEDS
    ledger = Ledger("anisotropy")
    runs: dict[str, Any] = {}
    plans: dict[str, Any] = {}
    workdirs, cases = {}, {}
    for mode in MODES:
        workdirs[mode] = _workdir(mode)
        plan = json.loads((workdirs[mode] / "plans.json").read_text())
        cases[mode] = held_out_cases(workdirs[mode], DATASET)[: 2 if QUICK else None]
        plans[mode] = {
            "spacing": plan["datasets"][DATASET]["target_spacing"],
            "median_shape": plan["datasets"][DATASET]["median_shape"],
            "network": {k: plan["network"][k] for k in ("patch_size", "features", "strides", "topology_spacing")},
        }
    # seed by seed: a study stopped half-way has both plans at the first seed to compare
    for seed in seeds:
        for mode in MODES:
            setting = {"mode": mode, "iterations": iterations, "seed": seed, "cases": cases[mode], **plans[mode]}
            step = partial(_run, workdirs[mode], iterations, seed, cases[mode])
            runs[f"{mode}_s{seed}"] = {**ledger.step(f"{mode}_s{seed}", setting, step), "mode": mode}
    return {
        "setting": {"iterations": iterations, "seeds": list(seeds), "plans": plans},
        "runs": runs,
        "commits": ledger.commits(),
        "hosts": ledger.hosts(),
    }


def report(r: dict[str, Any]) -> list[str]:
    s = r["setting"]
    structures = list(next(iter(r["runs"].values()))["dice"])
    net = next(iter(s["plans"].values()))["network"]
    lines = [
        "## Thick slices on a shared network: ACDC in mri7, planned at its 10 mm or matched to the network",
        "",
        f"`python -m benchmarks anisotropy` — mri7 planned with `--anisotropy keep` and `match` (the network is the "
        f"same: patch {net['patch_size']}, features {net['features']}, planned at {net['topology_spacing']} mm, "
        f"3×3×3 kernels); `train --recipe single --dataset {DATASET}`, {s['iterations']:,} iterations, seeds "
        f"{s['seeds']}; every fold-0 held-out case predicted and scored in its original 10 mm geometry "
        "(`predict` + `evaluate`), mean ± sd over seeds. Validation: the run's own pseudo-Dice in its preprocessed "
        "grid (not comparable across the two plans).",
        "",
        "| plan | ACDC spacing mm | median shape | s/iteration | validation | "
        + " | ".join(f"{t} Dice" for t in structures)
        + " | mean Dice | mean HD95 mm |",
        "|---|---|---|---|---|" + "---|" * len(structures) + "---|---|",
    ]
    for mode, plan in s["plans"].items():
        runs = [v for v in r["runs"].values() if v["mode"] == mode]
        cells = [_ms([v["dice"][t] for v in runs]) for t in structures]
        mean_dice = [statistics.mean(v["dice"].values()) for v in runs]
        hd = [statistics.mean(x for x in v["hd95"].values() if x is not None) for v in runs]
        lines.append(
            f"| `{mode}` | {' × '.join(f'{x:g}' for x in plan['spacing'])} | {plan['median_shape']} | "
            f"{statistics.mean(v['s_per_iteration'] for v in runs):.2f} | {_ms([v['val_dice'] for v in runs])} | "
            + " | ".join(cells)
            + f" | {_ms(mean_dice)} | {_ms(hd, 1)} |"
        )
    return [*lines, ""]
