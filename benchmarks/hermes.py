"""``python -m benchmarks hermes-ablation``: Hermes' Table 4 in miniature on the CPU.

Five configurations of ``mosaicseg train --recipe hermes``, each switch a recipe option, at a fixed number of
iterations on one collection (``--collection``, default ``mri7``: several MR sequences, so the modality prior
has something to tell apart), seeds 0, 1, 2; validation pseudo-Dice per dataset on every held-out case of fold
0 (final checkpoint) and the model's parameter count:

1. the task prior at the 16× stage only (no modality prior, no auxiliary loss): the paper's base line;
2. + hierarchy: the task prior at 4×, 8× and 16×;
3. the same with one-way fusion (the tokens read the image, the image is not updated);
4. + the modality prior (no auxiliary loss);
5. + the auxiliary modality loss: Hermes as the recipe's defaults build it.

All on the paper's ablation backbone, ResUNet-Small (:data:`BACKBONE`). Runs live in
``work/bench/conv_COLLECTION/runs/hermes-ablation-resenc_unet-small`` and are reused (finished) or resumed;
each finished one is recorded in ``benchmarks/results/ledger/hermes-ablation-COLLECTION.json`` (committed), so
the study spans sittings and fresh clones.
"""

from __future__ import annotations

import json
import statistics
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import QUICK, WORK, Ledger, finished, last_metrics, run_cli
from benchmarks.convergence import _plan

# the paper ran its ablation (Table 4) on the ResUNet-Small backbone: the residual-encoder U-Net at half width
BACKBONE = ["--network", "resenc_unet", "--width", "small"]
# the optimiser every step of the table was measured with (before the recipe's default became LAMB; config.py,
# RECIPE_OPTIMIZERS): pinned so that a resumed study measures what the table holds
OPTIMIZER = ["--optimizer", "adamw"]
NO_MODALITY = ["modality_prior=false", "modality_loss_weight=0"]
ABLATIONS: dict[str, list[str]] = {
    "task prior, 16× only": ["scales=[16]", *NO_MODALITY],
    "+ hierarchy (4×, 8×, 16×)": NO_MODALITY,
    "hierarchy, one-way fusion": ["two_way=false", *NO_MODALITY],
    "+ modality prior": ["modality_loss_weight=0"],
    "+ auxiliary loss (Hermes)": [],
}


def _run(workdir: Path, name: str, options: list[str], iterations: int, seed: int) -> dict[str, Any]:
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    # the backbone in the folder name: runs of another backbone are never resumed as these
    run = workdir / "runs" / f"hermes-ablation-{BACKBONE[1]}-{BACKBONE[3]}" / f"{slug}_s{seed}"
    if not finished(run, iterations):
        args = ["train", str(workdir), "--recipe", "hermes", "--fold", "0", "--seed", str(seed), "--device", "cpu",
                "--iterations", str(iterations), "--iterations-per-epoch", str(min(100, iterations)),
                "--val-every", "100000", "--val-max-cases", "2" if QUICK else "0", "--val-mode", "cases",
                *OPTIMIZER, *BACKBONE, "-o", str(run)]  # fmt: skip
        for option in options:
            args += ["--recipe-option", option]
        if (run / "checkpoint_latest.pt").is_file():
            args.append("--resume")
        run_cli(args, WORK / "logs" / f"hermes-ablation_{slug}_s{seed}.log")
    import torch

    state = torch.load(run / "checkpoint_final.pt", map_location="cpu", weights_only=True)["model"]
    final = last_metrics(run)
    return {
        "seed": seed,
        "train_s": final["elapsed_s"],
        "val_dice": final.get("val_dice", {}),
        "parameters": int(sum(v.numel() for k, v in state.items() if v.is_floating_point())),
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def study_hermes_ablation(collection: str, iterations: int) -> dict[str, Any]:
    workdir = _plan(collection)
    seeds = (0,) if QUICK else (0, 1, 2)
    ledger = Ledger(f"hermes-ablation-{collection}")
    network = json.loads((workdir / "plans.json").read_text())["network"]
    plan = {k: network[k] for k in ("patch_size", "batch_size", "features", "strides")}
    rows: dict[str, Any] = {}
    keys: list[str] = []
    for name, options in ABLATIONS.items():
        runs = []
        for seed in seeds:
            keys.append(f"{name} s{seed} {iterations}it")
            setting = {"options": options, "iterations": iterations, "seed": seed, "backbone": BACKBONE, "plan": plan}
            runs.append(ledger.step(keys[-1], setting, partial(_run, workdir, name, options, iterations, seed)))
        datasets = sorted(runs[0]["val_dice"])
        per_dataset = {d: [r["val_dice"][d] for r in runs] for d in datasets}
        means = [statistics.mean(r["val_dice"][d] for d in datasets) for r in runs]
        rows[name] = {
            "options": options,
            "runs": runs,
            "dice": {d: _mean_sd(v) for d, v in per_dataset.items()},
            "mean": _mean_sd(means),
            "parameters": runs[0]["parameters"],
            "train_s": statistics.mean(r["train_s"] for r in runs),
        }
    setting = {"collection": collection, "iterations": iterations, "seeds": list(seeds), "backbone": BACKBONE}
    return {**setting, "rows": rows, "commits": ledger.commits(keys), "hosts": ledger.hosts(keys)}


def report(r: dict[str, Any]) -> list[str]:
    rows = r["rows"]
    datasets = list(next(iter(rows.values()))["dice"])
    short = [d.split("_", 1)[-1] for d in datasets]
    lines = [
        f"## Hermes ablations (Table 4 in miniature, {r['collection']}, {r['iterations']} iterations)",
        "",
        f"`python -m benchmarks hermes-ablation --collection {r['collection']} --iterations {r['iterations']}` — "
        f"`{' '.join(['mosaicseg train --recipe hermes', *OPTIMIZER, *r.get('backbone', [])])}` with the options "
        "below (AdamW: the table was measured before the recipe trained with LAMB by default), fold 0, "
        "seeds "
        f"{r['seeds']}; validation pseudo-Dice on every held-out case of the fold (final checkpoint), mean ± sd "
        "over seeds.",
        "",
        f"| configuration | recipe options | parameters | train s | mean | {' | '.join(short)} |",
        "|---|---|---|---|---|" + "---|" * len(short),
    ]
    for name, row in rows.items():
        options = " ".join(f"`{o}`" for o in row["options"]) or "none (the recipe's defaults)"
        cells = " | ".join(f"{row['dice'][d][0]:.3f} ± {row['dice'][d][1]:.3f}" for d in datasets)
        lines.append(
            f"| {name} | {options} | {row['parameters']:,} | {row['train_s']:.0f} | "
            f"{row['mean'][0]:.3f} ± {row['mean'][1]:.3f} | {cells} |"
        )
    return [*lines, ""]
