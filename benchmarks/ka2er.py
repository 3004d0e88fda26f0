"""``python -m benchmarks ka2er``: KA²ER's student against its experts and the universal model, CPU.

Sub-tasks, one expert each: Dataset002, 003 and 004 (three groups of structures of the same T1 heads) and
Dataset007 vs Dataset008 (cine vs LGE cardiac MR). Every expert is a ``single`` MosaicSeg run of
``EXPERT_ITERATIONS``, except the Dataset004 one: an nnU-Net v2 model trained by nnU-Net itself (its own plan,
shrunk to a CPU-sized 3d_fullres network by nnU-Net's plan editing, ``NNUNET_ITERATIONS``) and read from its
model folder. The external, task-agnostic expert is a ``universal`` run on Dataset001 and 005.

Rows, per dataset on its first ``CASES`` held-out cases of fold 0 (Dice and HD95 by ``mosaicseg evaluate``):
each expert on its own sub-task; ``universal`` on all five datasets; the ``ka2er`` student without boxes, with
oracle boxes (from the references, for evaluation only) and with automatic boxes (a first pass of the same
seed's ``universal`` model). Student and universal: ``STUDENT_ITERATIONS`` each, seeds 0 and 1 (equal student
budget). Out of domain: each model's Dataset003 hippocampus (L ∪ R) on Dataset001 crops (anterior ∪ posterior).
Cost: predicting one held-out case of each dataset with the student (no expert) against with every expert.
Post-processing like for like (a last step): the student's rows keep only each task's largest connected component
(the paper's pipeline), the experts' do not; so the experts are scored again with that filter and the student
(no box) without it, and the claim is checked both ways.

Every finished step is reused and recorded in the study's ledger (committed: the study spans sittings and fresh
clones); the nnU-Net side runs in the nnU-Net Python (``benchmarks/nnunet_runner.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

from benchmarks.common import (
    QUICK,
    SHARED,
    WORK,
    Ledger,
    evaluate,
    evaluation,
    held_out_cases,
    held_out_links,
    run_cli,
)
from benchmarks.common import mean_sd as _ms

SUBTASKS = {
    "deepgrey": "Dataset002_IXIDeepGrey",
    "limbic": "Dataset003_IXILimbic",
    "ventricles": "Dataset004_IXIVentricles",
    "cine": "Dataset007_ACDC",
    "lge": "Dataset008_LeftAtrium",
}
NNUNET_SUBTASK = "ventricles"
NNUNET_PLANS = "nnUNetPlansCPU"
NNUNET_NETWORK = {"features": [16, 32, 64, 128], "patch": [64, 64, 64]}
EXTERNAL = ("Dataset001_Hippocampus", "Dataset005_BraTS")
EXPERT_ITERATIONS, STUDENT_ITERATIONS, NNUNET_ITERATIONS = 1500, 3000, 1500
SEEDS = (0, 1)
CASES, OOD_CASES = 8, 10
CLAIM_MARGIN = 0.02  # the claim's "within 2 Dice points"
# below this in-domain Dice on the cropped control, the out-of-domain score measures the crop, not the domain
OOD_CONTROL_FLOOR = 0.1


def _area() -> Path:
    return WORK / "ka2er"


def _log(name: str) -> Path:
    return _area() / "logs" / f"{name}.log"


def _planned(name: str, datasets: tuple[str, ...] | list[str]) -> Path:
    """A collection of ``datasets`` (read in place) planned and preprocessed once."""
    import yaml

    workdir = _area() / name
    if not (workdir / "plans.json").is_file():
        collection = _area() / f"{name}.yaml"
        collection.parent.mkdir(parents=True, exist_ok=True)
        entries = [{"path": str(SHARED / d)} for d in datasets]
        collection.write_text(yaml.safe_dump({"name": name, "folds": 5, "datasets": entries}))
        run_cli(["plan", str(collection), "-o", str(workdir)], _log(f"plan_{name}"))
    return workdir


def _train(workdir: Path, name: str, iterations: int, *args: str, python: str | None = None) -> Path:
    run = workdir / "runs" / name
    if not (run / "checkpoint_final.pt").is_file():
        resume = ["--resume"] if (run / "checkpoint_latest.pt").is_file() else []
        run_cli(["train", str(workdir), "--iterations", str(iterations), "--iterations-per-epoch",
                 str(max(1, iterations // 20)), "--val-every", "100000", "--device", "cpu", *args, "-o", str(run),
                 *resume], _log(f"train_{name}"), python)  # fmt: skip
    return run


@cache
def student_python() -> str:
    """A Python that imports both MosaicSeg and nnunetv2: the student reads the nnU-Net expert while it trains.
    This one if it can; else the nnU-Net environment once ``scripts/setup_nnunet.sh`` has installed MosaicSeg in
    it (the same torch, numpy and MONAI pins; the queue's PYTHONPATH still selects the pinned commit's code)."""
    from benchmarks.nnunet import default_nnunet_python

    probe = "import mosaicseg.cli, nnunetv2"
    for python in dict.fromkeys([sys.executable, default_nnunet_python()]):
        if subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
            return python
    raise SystemExit(
        "the ka2er student reads an nnU-Net expert, so it trains in a Python with both mosaicseg and nnunetv2; "
        f"neither {sys.executable} nor {default_nnunet_python()} has both. Fix: `bash scripts/setup_nnunet.sh` "
        "(it installs MosaicSeg into .venv-nnunet too)."
    )


def _nnunet(workdir: Path, dataset: str, iterations: int) -> tuple[Path, dict[str, str], Any]:
    """nnU-Net's own model of ``dataset`` on MosaicSeg's fold-0 split (its model folder, env, runner call)."""
    from benchmarks.nnunet import RUNNER, _raw_dataset, _run, default_nnunet_python

    root = _area() / "nnunet"
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}  # fmt: skip
    python = default_nnunet_python()
    did = str(int(dataset[len("Dataset") : len("Dataset") + 3]))

    def nn(*args: str, log: str) -> Any:
        return _run([python, str(RUNNER), *args], _log(f"nnunet_{log}"), env)

    folder = root / "results" / dataset / f"nnUNetTrainerBench__{NNUNET_PLANS}__3d_fullres"
    if not (folder / "fold_0" / "checkpoint_final.pth").is_file():
        _raw_dataset(root / "raw", dataset)
        if not (root / "preprocessed" / dataset / "nnUNetPlans.json").is_file():
            nn("plan", did, log="plan")
        held = held_out_cases(workdir, dataset)
        cases = sorted(p.name.split(".")[0] for p in (SHARED / dataset / "labelsTr").iterdir())
        splits = [{"train": [c for c in cases if c not in held], "val": held}]
        (root / "preprocessed" / dataset / "splits_final.json").write_text(json.dumps(splits))
        nn("shrink", did, json.dumps(NNUNET_NETWORK["features"]), json.dumps(NNUNET_NETWORK["patch"]), NNUNET_PLANS,
           log="shrink")  # fmt: skip
        # a checkpoint per epoch: this training outlasts some sittings, and goes on from its last epoch
        nn("train", did, str(iterations), str(min(250, iterations)), str(root / "timing.json"), NNUNET_PLANS, "1",
           log="train")  # fmt: skip
    return folder, env, nn


def _scores(pred: Path, labels: Path, dataset: str) -> dict[str, Any]:
    scored = (pred / "summary.json").is_file()
    summary = evaluation(pred) if scored else evaluate(pred, labels, dataset, _log("evaluate"))
    return {"dice": summary["mean"]["dice"], "hd95": summary["mean"]["hd95"]}


def _predict(model: Path, images: Path, out: Path, dataset: str, *extra: str) -> dict[str, float]:
    record = out / "cost.json"
    # no post-processing unless asked for (the student's): the rows compare networks
    flags = extra if "--largest-component" in extra else ("--no-largest-component", *extra)
    if not record.is_file():
        done = run_cli(["predict", "-m", str(model), "-i", str(images), "-o", str(out), "--dataset", dataset,
                        "--overwrite", *flags], _log("predict"))  # fmt: skip
        record.write_text(json.dumps({"seconds": done.seconds, "peak_rss_mb": done.peak_rss_mb}))
    return json.loads(record.read_text())


def _experts(workdir: Path, e_its: int, n_its: int) -> dict[str, Any]:
    """Every expert trained (once; nnU-Net's by nnU-Net) and the experts file the student reads."""
    experts: dict[str, Any] = {}
    nn = None
    for name, dataset in SUBTASKS.items():
        if name == NNUNET_SUBTASK:
            folder, _env, nn = _nnunet(workdir, dataset, n_its)
            experts[name] = {"nnunet": str(folder), "fold": 0}
        else:
            run = _train(workdir, f"expert_{name}", e_its, "--recipe", "single", "--dataset", dataset)
            experts[name] = {"run": str(run)}
    external = _train(_planned("ext2", EXTERNAL), "universal_ext", e_its)
    spec = {"subtasks": {n: {"dataset": d} for n, d in SUBTASKS.items()}, "experts": experts,
            "external": {"run": str(external)}}  # fmt: skip
    spec_path = _area() / "experts.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    return {"experts": experts, "spec": spec_path, "nn": nn}


def _expert_rows(
    workdir: Path, experts: Callable[[], dict[str, Any]], n_cases: int, ood_cases: list[str]
) -> dict[str, Any]:
    """The experts' step: each expert on its own sub-task (Dice, HD95), and the limbic expert's hippocampus out of
    domain."""
    from benchmarks.paradigms import generalisation

    trained = experts()
    rows: dict[str, Any] = {}
    for name, dataset in SUBTASKS.items():
        cases = held_out_cases(workdir, dataset)[:n_cases]
        images, labels = held_out_links(dataset, cases, _area() / "subsets" / dataset)
        out = _area() / "pred" / dataset / "expert"
        _expert_predict(trained, name, dataset, images, out)
        rows[f"expert/{dataset}"] = _scores(out, labels, dataset)
    ood = generalisation(Path(trained["experts"]["limbic"]["run"]), ood_cases, _control_cases(workdir, ood_cases))
    return {"rows": rows, "ood": ood["mean"], "ood_control": ood["control"]["mean"]}


def _expert_predict(trained: dict[str, Any], name: str, dataset: str, images: Path, out: Path) -> dict[str, float]:
    """Expert ``name`` (nnU-Net's through its runner) predicting ``images`` into ``out``: its wall seconds and peak
    RSS (kept in ``out/cost.json``: a finished prediction is not repeated)."""
    if name != NNUNET_SUBTASK:
        return _predict(Path(trained["experts"][name]["run"]), images, out, dataset)
    if not (out / "cost.json").is_file():
        done = trained["nn"]("predict", str(int(dataset[7:10])), str(images), str(out), "notta", NNUNET_PLANS,
                             log="predict")  # fmt: skip
        (out / "cost.json").write_text(json.dumps({"seconds": done.seconds, "peak_rss_mb": done.peak_rss_mb}))
    return json.loads((out / "cost.json").read_text())


def _control_cases(workdir: Path, ood_cases: list[str]) -> list[str]:
    """As many held-out Dataset003 cases as ``ood_cases``: the in-domain control of the out-of-domain score
    (:func:`benchmarks.paradigms.generalisation`)."""
    return held_out_cases(workdir, SUBTASKS["limbic"])[: len(ood_cases)]


def _student(workdir: Path, experts: Callable[[], dict[str, Any]], seed: int, s_its: int) -> Path:
    """Seed ``seed``'s ``ka2er`` student (trained once)."""
    return _train(workdir, f"ka2er_s{seed}", s_its, "--seed", str(seed), "--recipe", "ka2er", "--recipe-option",
                  f"experts={experts()['spec']}", python=student_python())  # fmt: skip


def _seed_rows(
    workdir: Path, experts: Callable[[], dict[str, Any]], seed: int, s_its: int, n_cases: int, ood_cases: list[str],
    measure_cost: bool,
) -> dict[str, Any]:  # fmt: skip
    """One seed's step: ``universal`` and the ``ka2er`` student trained, scored per dataset (the student with no,
    oracle and automatic boxes), out of domain, and (``measure_cost``) the prediction cost of the student (no
    boxes) and of every expert on the same cases, measured in this one step."""
    from benchmarks.paradigms import generalisation

    student_python()  # before an hour of universal training, not after
    universal = _train(workdir, f"universal_s{seed}", s_its, "--seed", str(seed))
    student = _student(workdir, experts, seed, s_its)
    rows: dict[str, Any] = {}
    cost = {"student_s": 0.0, "student_rss_mb": 0.0, "experts_s": 0.0, "experts_rss_mb": 0.0}
    trained = experts()
    for name, dataset in SUBTASKS.items():
        cases = held_out_cases(workdir, dataset)[:n_cases]
        images, labels = held_out_links(dataset, cases, _area() / "subsets" / dataset)
        base = _area() / "pred" / dataset
        _predict(universal, images, base / f"universal_s{seed}", dataset)
        rows[f"universal_s{seed}/{dataset}"] = _scores(base / f"universal_s{seed}", labels, dataset)
        modes = {"none": [], "oracle": ["--oracle-boxes", str(labels)], "auto": ["--auto-boxes", str(universal)]}
        for mode, extra in modes.items():
            # KA²ER's pipeline ends with largest-connected-component post-processing (the paper's)
            out = base / f"ka2er_{mode}_lcc_s{seed}"
            student_cost = _predict(student, images, out, dataset, *extra, "--largest-component")
            rows[f"ka2er_{mode}_s{seed}/{dataset}"] = _scores(out, labels, dataset)
            if mode == "none":
                cost["student_s"] += student_cost["seconds"] / len(cases)
                cost["student_rss_mb"] = max(cost["student_rss_mb"], student_cost["peak_rss_mb"])
        if measure_cost:
            # the experts' cost in this step, beside the student's: steps may run in sittings on different hosts
            expert_cost = _expert_predict(trained, name, dataset, images, base / f"expert_cost_s{seed}")
            cost["experts_s"] += expert_cost["seconds"] / len(cases)
            cost["experts_rss_mb"] = max(cost["experts_rss_mb"], expert_cost["peak_rss_mb"])
    control = _control_cases(workdir, ood_cases)
    scored = {f"{name}_s{seed}": generalisation(run, ood_cases, control) for name, run in (("universal", universal),
              ("ka2er", student))}  # fmt: skip
    ood = {k: v["mean"] for k, v in scored.items()}
    ood_control = {k: v["control"]["mean"] for k, v in scored.items()}
    losses = student_losses(student)
    return {"rows": rows, "ood": ood, "ood_control": ood_control, "cost": cost if measure_cost else None,
            "student_losses": losses}  # fmt: skip


def student_losses(run: Path) -> dict[str, float]:
    """The student's loss terms over its last epoch (``metrics.jsonl``): ``segmentation`` is the decoder reading
    f_m (the experts' merge), ``student`` the decoder reading f_s (what prediction computes)."""
    from mosaicseg.training.logging import read_records

    terms = next((r["loss_terms"] for r in reversed(read_records(run / "metrics.jsonl")) if r.get("loss_terms")), {})
    return {k: float(v) for k, v in terms.items()}


def largest_components(pred: Path, out: Path) -> Path:
    """Every label map in ``pred`` with each label reduced to its largest connected component (26-connectivity,
    :func:`mosaicseg.inference.postprocess.keep_largest_component`), written to ``out`` with the same header:
    the filter ``predict --largest-component`` applies, for a model MosaicSeg does not predict with (nnU-Net's).
    MosaicSeg filters each task's mask before painting the label map, this the painted map: the same where a
    dataset's labels do not overlap."""
    import nibabel as nib
    import numpy as np

    from mosaicseg.inference.postprocess import keep_largest_component

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(pred.glob("*.nii.gz")):
        image = nib.load(path)
        labels = np.asarray(image.dataobj)
        kept = np.zeros_like(labels)
        for value in np.unique(labels[labels != 0]):
            kept[keep_largest_component(labels == value)] = value
        partial_path = out / f".{path.name}"
        nib.save(nib.Nifti1Image(kept, image.affine, image.header), partial_path)
        partial_path.replace(out / path.name)
    return out


def _lcc_rows(workdir: Path, experts: Callable[[], dict[str, Any]], seeds: tuple[int, ...], s_its: int,
              n_cases: int) -> dict[str, Any]:  # fmt: skip
    """The post-processing step: each expert with the student's largest-component filter (``expert_lcc/D``) and
    each seed's student without boxes and without the filter (``ka2er_none_raw_sN/D``)."""
    trained = experts()
    students = {seed: _student(workdir, experts, seed, s_its) for seed in seeds}
    rows: dict[str, Any] = {}
    for name, dataset in SUBTASKS.items():
        cases = held_out_cases(workdir, dataset)[:n_cases]
        images, labels = held_out_links(dataset, cases, _area() / "subsets" / dataset)
        base = _area() / "pred" / dataset
        if name == NNUNET_SUBTASK:
            _expert_predict(trained, name, dataset, images, base / "expert")
            largest_components(base / "expert", base / "expert_lcc")
        else:
            _predict(Path(trained["experts"][name]["run"]), images, base / "expert_lcc", dataset,
                     "--largest-component")  # fmt: skip
        rows[f"expert_lcc/{dataset}"] = _scores(base / "expert_lcc", labels, dataset)
        for seed, student in students.items():
            _predict(student, images, base / f"ka2er_none_raw_s{seed}", dataset)
            rows[f"ka2er_none_raw_s{seed}/{dataset}"] = _scores(base / f"ka2er_none_raw_s{seed}", labels, dataset)
    return {"rows": rows}


def study_ka2er() -> dict[str, Any]:
    """See the module docstring. Steps of the study's ledger (``benchmarks/results/ledger/ka2er.json``, committed):
    the experts' rows, then one step per seed; a sitting trains the experts only if a step is left, so the
    seeds may be measured in different sittings (each then trains the experts again: MosaicSeg's are seeded, nnU-Net's
    own training is not, so its expert may differ slightly between sittings)."""
    e_its, s_its, n_its = (4, 4, 2) if QUICK else (EXPERT_ITERATIONS, STUDENT_ITERATIONS, NNUNET_ITERATIONS)
    seeds = SEEDS[:1] if QUICK else SEEDS
    n_cases = 1 if QUICK else CASES
    workdir = _planned("sub5", list(SUBTASKS.values()))
    ood_cases = held_out_cases(_planned("ext2", EXTERNAL), "Dataset001_Hippocampus")[: 2 if QUICK else OOD_CASES]
    experts = cache(partial(_experts, workdir, e_its, n_its))
    ledger = Ledger("ka2er")
    plans = json.loads((workdir / "plans.json").read_text())
    network = {k: plans["network"][k] for k in ("patch_size", "batch_size", "features")}
    base = {"expert_iterations": e_its, "nnunet_iterations": n_its, "nnunet_network": NNUNET_NETWORK,
            "network": network, "cases": n_cases, "ood_cases": ood_cases}  # fmt: skip
    expert_step = ledger.step("experts", base, partial(_expert_rows, workdir, experts, n_cases, ood_cases))
    rows = dict(expert_step["rows"])
    ood = {"expert": expert_step["ood"]}
    ood_control = {"expert": expert_step["ood_control"]}
    cost: dict[str, float] = {}
    losses: dict[str, dict[str, float]] = {}
    for seed in seeds:
        setting = {**base, "student_iterations": s_its, "seed": seed}
        step = partial(_seed_rows, workdir, experts, seed, s_its, n_cases, ood_cases, seed == seeds[0])
        measured = ledger.step(f"s{seed}", setting, step)
        rows.update(measured["rows"])
        ood.update(measured["ood"])
        ood_control.update(measured["ood_control"])
        if measured["cost"] is not None:
            cost.update(measured["cost"])
        if measured.get("student_losses"):
            losses[f"ka2er_s{seed}"] = measured["student_losses"]
    lcc_setting = {**base, "student_iterations": s_its, "seeds": list(seeds)}
    rows.update(ledger.step("lcc", lcc_setting, partial(_lcc_rows, workdir, experts, seeds, s_its, n_cases))["rows"])
    return {
        "setting": {
            "network": network,
            "expert_iterations": e_its,
            "student_iterations": s_its,
            "nnunet_iterations": n_its,
            "nnunet_network": NNUNET_NETWORK,
            "seeds": list(seeds),
            "cases": n_cases,
            "ood_cases": len(ood_cases),
        },
        "datasets": list(SUBTASKS.values()),
        "rows": rows,
        "ood": ood,
        "ood_control": ood_control,
        "cost": cost,
        "student_losses": losses,
        "commits": ledger.commits(),
        "hosts": ledger.hosts(),
    }


def claim_gaps(
    rows: dict[str, Any], datasets: list[str], seeds: list[int], student: str, expert: str
) -> list[tuple[str, float]]:
    """Per dataset, the mean over seeds of the student's Dice (rows ``{student}_sN/D``) minus the expert's
    (``{expert}/D``), for the datasets that have both."""
    gaps = []
    for d in datasets:
        values = [rows[f"{student}_s{x}/{d}"]["dice"] for x in seeds if f"{student}_s{x}/{d}" in rows]
        reference = rows.get(f"{expert}/{d}", {}).get("dice")
        if values and reference is not None:
            gaps.append((d, statistics.mean(values) - reference))
    return gaps


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def report(r: dict[str, Any]) -> list[str]:
    s, rows, datasets = r["setting"], r["rows"], r["datasets"]
    seeds = s["seeds"]

    def cell(prefix: str, d: str, metric: str) -> str:
        values = [rows[f"{prefix}_s{x}/{d}"][metric] for x in seeds if f"{prefix}_s{x}/{d}" in rows]
        return _ms(values)

    lines = [
        "## KA²ER: a promptable student amalgamating frozen experts",
        "",
        f"`python -m benchmarks ka2er` — experts: `single` runs of {s['expert_iterations']} iterations (Dataset004: "
        f"nnU-Net v2 itself, its plan shrunk to features {s['nnunet_network']['features']}, patch "
        f"{s['nnunet_network']['patch']}, {s['nnunet_iterations']} iterations); external expert: `universal` on "
        f"Dataset001 and 005; `universal` and the `ka2er` student: {s['student_iterations']} iterations on the five "
        f"sub-task datasets, seeds {seeds}; the student's masks with largest-connected-component post-processing "
        "(`predict --largest-component`, as the paper), the other rows' without; "
        f"network {s['network']}; Dice / HD95 (mm) on the first {s['cases']} held-out cases of each dataset.",
        "",
        "| dataset | expert | universal | ka2er, no box | ka2er, oracle boxes | ka2er, auto boxes |",
        "|---|---|---|---|---|---|",
    ]
    for d in datasets:
        expert = rows.get(f"expert/{d}", {})
        # HD95 is None where every case's prediction (or reference) was empty: a dash, as in the other cells
        cells = [f"{_fmt(expert.get('dice'), '.3f')} / {_fmt(expert.get('hd95'), '.1f')}"]
        for prefix in ("universal", "ka2er_none", "ka2er_oracle", "ka2er_auto"):
            cells.append(f"{cell(prefix, d, 'dice')} / {cell(prefix, d, 'hd95')}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    like_for_like = any(f"expert_lcc/{d}" in rows for d in datasets)
    if like_for_like:
        lines += [
            "",
            "Post-processing like for like (Dice / HD95): the experts with the student's largest-component filter "
            "(nnU-Net's label maps filtered per label afterwards), the student (no box) without it.",
            "",
            "| dataset | expert | expert + LCC | ka2er, no box | ka2er, no box + LCC |",
            "|---|---|---|---|---|",
        ]
        for d in datasets:
            expert, lcc = rows.get(f"expert/{d}", {}), rows.get(f"expert_lcc/{d}", {})
            lines.append(
                f"| {d} | {_fmt(expert.get('dice'), '.3f')} / {_fmt(expert.get('hd95'), '.1f')} | "
                f"{_fmt(lcc.get('dice'), '.3f')} / {_fmt(lcc.get('hd95'), '.1f')} | "
                f"{cell('ka2er_none_raw', d, 'dice')} / {cell('ka2er_none_raw', d, 'hd95')} | "
                f"{cell('ka2er_none', d, 'dice')} / {cell('ka2er_none', d, 'hd95')} |"
            )
    ood, control = r["ood"], r["ood_control"]
    student_ood = statistics.mean([ood[f"ka2er_s{x}"] for x in seeds])
    controls = [control["expert"], *(control[f"{m}_s{x}"] for m in ("universal", "ka2er") for x in seeds)]
    lines += [
        "",
        f"Out of domain (Dataset003's hippocampus on {s['ood_cases']} Dataset001 crops, Dice of L ∪ R): expert "
        f"{ood['expert']:.3f}, universal {_ms([ood[f'universal_s{x}'] for x in seeds])}, ka2er "
        f"{_ms([ood[f'ka2er_s{x}'] for x in seeds])}. In domain, on as many Dataset003 cases cropped to those crops' "
        f"extent (the control): expert {control['expert']:.3f}, universal "
        f"{_ms([control[f'universal_s{x}'] for x in seeds])}, ka2er {_ms([control[f'ka2er_s{x}'] for x in seeds])}."
        + (
            f" Every model stays below {OOD_CONTROL_FLOOR} Dice even on its own domain cropped so: the crop protocol "
            "itself defeats these whole-head models, so this test cannot show better or worse generalisation."
            if max(controls) < OOD_CONTROL_FLOOR
            else ""
        ),
        "",
        f"Cost per case (one held-out case per dataset): the student alone {r['cost']['student_s']:.1f} s (peak RSS "
        f"{r['cost']['student_rss_mb']:.0f} MB) against every expert {r['cost']['experts_s']:.1f} s (largest peak "
        f"{r['cost']['experts_rss_mb']:.0f} MB).",
        "",
    ]
    paths = [
        f"seed {key.rsplit('_s', 1)[1]}: f_m {t['segmentation']:.3f}, f_s {t['student']:.3f}"
        for key, t in sorted((r.get("student_losses") or {}).items())
        if "segmentation" in t and "student" in t
    ]
    if paths:
        lines += [
            "The student's segmentation loss over its last epoch, its decoder reading the experts' merge (f_m) and "
            "its own tokens (f_s, what prediction computes; `student_weight` trains that path, not in the paper): "
            + "; ".join(paths)
            + ".",
            "",
        ]
    checks = [("as reported (student filtered, experts not)", "ka2er_none", "expert")]
    if like_for_like:
        checks += [("both filtered", "ka2er_none", "expert_lcc"), ("neither filtered", "ka2er_none_raw", "expert")]
    ood_better = student_ood > ood["expert"]
    for what, student_prefix, expert_prefix in checks:
        gaps = claim_gaps(rows, datasets, seeds, student_prefix, expert_prefix)
        misses = [f"{d} {gap:+.3f}" for d, gap in gaps if gap < -CLAIM_MARGIN]
        holds = not misses and bool(gaps) and ood_better
        lines.append(
            f"KA²ER's claim (the student within {CLAIM_MARGIN * 100:.0f} Dice points of each expert in-domain and "
            f"better out of domain), {what}: **{'holds' if holds else 'fails'}** (in-domain gaps beyond "
            f"{CLAIM_MARGIN * 100:.0f} points: {', '.join(misses) or 'none'}; out of domain {student_ood:.3f} vs the "
            f"expert's {ood['expert']:.3f})."
        )
        lines.append("")
    return [*lines, ""]
