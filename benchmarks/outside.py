"""``python -m benchmarks outside``: predictions outside the imaged region, with and without the rule.

The seven-dataset MR universal model of the convergence study (``conv_mri7``, 120 minutes) predicted blobs of
some IXI tasks in the exact-zero air around the heads. ``mosaicseg plan`` now decides per dataset whether
predictions there are background (``plans.json`` ``postprocessing``: the images have such a region and no
training label lies in it), and ``predict --background-outside auto`` follows the decision. That run was
planned before the rule, so its held-out cases (fold 0) are predicted twice, ``--background-outside off`` and
``on``, and scored; the decision comes from planning the same collection again (``WORK/outside_plan``,
fingerprint only). Per dataset and task: Dice and HD95 off, on, and as the decision picks (*auto*).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import QUICK, ROOT, SHARED, WORK, held_out_cases, held_out_files, link_all, run_cli

COLLECTION = ROOT / "collections" / "mri7.yaml"
RUN = "defaults-after_120m_patchval"  # the convergence study's 2-hour universal run on mri7


def _scores(pred: Path) -> dict[str, dict[str, float | None]]:
    labels = next(iter(json.loads((pred / "summary.json").read_text())["datasets"].values()))["labels"]
    return {k: {"dice": v["dice"]["mean"], "hd95": v["hd95"]["mean"]} for k, v in labels.items()}


def study_outside() -> dict[str, Any]:
    workdir = WORK / "conv_mri7"
    run = workdir / "runs" / RUN
    if not (run / "checkpoint_final.pt").is_file():
        raise SystemExit(f"{run}: no final checkpoint; run `python -m benchmarks convergence --collection mri7 "
                         "--budget-min 120` first")  # fmt: skip
    decided = WORK / "outside_plan"
    run_cli(["plan", str(COLLECTION), "-o", str(decided), "--overwrite"], WORK / "logs" / "outside_plan.log")
    rules = json.loads((decided / "plans.json").read_text())["postprocessing"]
    fingerprint = json.loads((decided / "fingerprint.json").read_text())["datasets"]
    datasets = json.loads((workdir / "vocabulary.json").read_text())["datasets"]
    out: dict[str, Any] = {}
    for dataset in datasets:
        cases = held_out_cases(workdir, dataset)[: 2 if QUICK else None]
        _, files = held_out_files(dataset, cases)
        base = WORK / "outside" / dataset
        images = link_all([f for f in files if "imagesTr" in str(f)], base / "images")
        labels = link_all([f for f in files if "labelsTr" in str(f)], base / "labels")
        scores = {}
        for mode in ("off", "on"):
            pred = base / mode
            run_cli(["predict", "-m", str(run), "-i", str(images), "-o", str(pred), "--dataset", dataset,
                     "--background-outside", mode, "--overwrite"], base / f"predict_{mode}.log")  # fmt: skip
            run_cli(["evaluate", str(pred), str(labels), "--dataset-json", str(SHARED / dataset / "dataset.json"),
                     "--overwrite"], base / f"evaluate_{mode}.log")  # fmt: skip
            scores[mode] = _scores(pred)
        rule = rules[dataset]
        scores["auto"] = scores["on" if rule["background_outside_image"] else "off"]
        out[dataset] = {"cases": len(cases), "rule": rule, "outside": fingerprint[dataset]["outside_image"], **scores}
    return {"run": str(run.relative_to(WORK)), "datasets": out}


def _cell(v: float | None, digits: int) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Predictions outside the imaged region (the seven-dataset MR universal model)",
        "",
        "`python -m benchmarks outside` — the convergence study's 2-hour universal run on mri7 "
        f"(`{r['run']}`, planned before the rule) predicts its fold-0 held-out cases with `--background-outside "
        "off` and `on`; the decision (`auto`) is `mosaicseg plan`'s for the same collection today: background "
        "outside the imaged region where the training images have such a region and no training label lies in "
        "it. Outside share: median share of a training case's voxels outside the imaged region.",
        "",
        "| dataset | outside share | training labels outside | decision | mean Dice off | mean Dice auto | "
        "tasks changed (Dice off → auto; HD95 mm off → auto) |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, v in r["datasets"].items():
        tasks = list(v["off"])
        changed = [
            f"{t} {_cell(v['off'][t]['dice'], 3)} → {_cell(v['auto'][t]['dice'], 3)} "
            f"({_cell(v['off'][t]['hd95'], 1)} → {_cell(v['auto'][t]['hd95'], 1)})"
            for t in tasks
            if v["off"][t] != v["auto"][t]
        ]
        lines.append(
            f"| {d.split('_', 1)[-1]} ({v['cases']} cases) | {100 * v['outside']['share_median']:.0f} % | "
            f"{v['outside']['label_voxels']} | {'background' if v['rule']['background_outside_image'] else 'kept'} "
            f"| {statistics.mean(x['dice'] for x in v['off'].values()):.3f} | "
            f"{statistics.mean(x['dice'] for x in v['auto'].values()):.3f} | {'; '.join(changed) or 'none'} |"
        )
    return [*lines, ""]
