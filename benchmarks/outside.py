"""``python -m benchmarks outside``: predictions outside the imaged region, with and without the rule.

The seven-dataset MR universal model of the convergence study (``conv_mri7``, 120 minutes) predicted blobs of
some IXI tasks in the exact-zero air around the heads. ``mosaicseg plan`` now decides per dataset whether
predictions there are background (``plans.json`` ``postprocessing``: the images have such a region and no
training label lies in it), and ``predict --background-outside auto`` follows the decision. A seven-dataset
universal model (the first of :data:`RUNS` that exists) predicts its held-out cases (fold 0) twice,
``--background-outside off`` and ``on``, and both are scored; the decision comes from planning the same
collection again (``WORK/outside_plan``, fingerprint only). Per dataset and task: Dice and HD95 off, on, and as
the decision picks (*auto*).
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from benchmarks.common import QUICK, ROOT, WORK, evaluate, held_out_cases, held_out_links, run_cli

COLLECTION = ROOT / "collections" / "mri7.yaml"
# seven-dataset universal models on mri7, the first that exists is used: the convergence study's 2-hour run, the
# paradigm study's seed-0 universal run (its work folder: a fresh clone has neither until one of them is trained)
RUNS = (
    ("conv_mri7", "defaults-after_120m_patchval", "the convergence study's 2-hour universal run"),
    ("mri7", "universal_s0_*it", "the paradigm study's seed-0 universal run"),
)


def _scores(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    return {k: {"dice": v["dice"]["mean"], "hd95": v["hd95"]["mean"]} for k, v in summary["labels"].items()}


def study_outside() -> dict[str, Any]:
    found = [(WORK / w, run, about) for w, pattern, about in RUNS for run in sorted((WORK / w / "runs").glob(pattern))]
    found = [f for f in found if (f[1] / "checkpoint_final.pt").is_file()]
    if not found:
        raise SystemExit(
            "no seven-dataset universal model to re-predict: train one first, `python -m benchmarks paradigms "
            "--steps 1` (the universal seed-0 run) or `python -m benchmarks convergence --collection mri7 "
            "--budget-min 120 --configs defaults-after`"
        )
    workdir, run, about = found[0]
    decided = WORK / "outside_plan"
    run_cli(["plan", str(COLLECTION), "-o", str(decided), "--overwrite"], WORK / "logs" / "outside_plan.log")
    rules = json.loads((decided / "plans.json").read_text())["postprocessing"]
    fingerprint = json.loads((decided / "fingerprint.json").read_text())["datasets"]
    datasets = json.loads((workdir / "vocabulary.json").read_text())["datasets"]
    out: dict[str, Any] = {}
    for dataset in datasets:
        cases = held_out_cases(workdir, dataset)[: 2 if QUICK else None]
        base = WORK / "outside" / dataset
        images, labels = held_out_links(dataset, cases, base)
        scores = {}
        for mode in ("off", "on"):
            pred = base / mode
            run_cli(["predict", "-m", str(run), "-i", str(images), "-o", str(pred), "--dataset", dataset,
                     "--background-outside", mode, "--no-largest-component", "--overwrite"],
                    base / f"predict_{mode}.log")  # fmt: skip
            scores[mode] = _scores(evaluate(pred, labels, dataset, base / f"evaluate_{mode}.log"))
        rule = rules[dataset]
        scores["auto"] = scores["on" if rule["background_outside_image"] else "off"]
        out[dataset] = {"cases": len(cases), "rule": rule, "outside": fingerprint[dataset]["outside_image"], **scores}
    return {"run": str(run.relative_to(WORK)), "model": about, "datasets": out}


def _cell(v: float | None, digits: int) -> str:
    return "–" if v is None or v != v else f"{v:.{digits}f}"


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        "## Predictions outside the imaged region (the seven-dataset MR universal model)",
        "",
        f"`python -m benchmarks outside` — {r.get('model', RUNS[0][2])} on mri7 "
        f"(`{r['run']}`) predicts its fold-0 held-out cases with `--background-outside "
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
