"""``python -m benchmarks paradigms``: every paradigm on Dataset001–005, 007 and 008 (``collections/mri7.yaml``:
T1 crops and heads, FLAIR+T1c, cine, LGE), at an equal total number of iterations (a busy machine cannot bias
it), with the ``train`` defaults (AdamW 3e-3 poly, hermes LAMB 2e-3 exponential as its recipe's default; bf16 where
native, head prior ``auto``) and the collection's
own plan (:data:`PATCH`), fold 0, seeds 0 and 1:

- ``single`` trains ``iterations / 7`` on each dataset; every multi-dataset paradigm (``universal``,
  ``multidecoder``, ``dodnet``, ``uniseg``, ``hermes``, ``clip``) ``iterations`` on all seven; ``clip`` with a
  fixed random task-embedding file (seeded; no text encoder is downloaded), so it measures the controller, not
  CLIP's language prior;
- validation pseudo-Dice per dataset and task on every held-out case of fold 0, final checkpoint;
- generalisation: Dataset003's ``Hippocampus_L`` and ``Hippocampus_R`` predicted on Dataset001's held-out crops
  (resampled by Dataset003's plan) and scored, L ∪ R, against Dataset001's anterior ∪ posterior; and, as its
  control, on Dataset003's own held-out heads cropped alike (a box of the crops' median extent around each
  hippocampus), which separates a field of view the model never saw from a definition or scanner it never saw;
- cost, measured in one sitting for every paradigm after all runs (the runs span sittings, and a sitting's host
  can differ: the same universal plan ran at 0.31 s/it on one and 0.59 s/it on another): a short run of each
  (:data:`COST_ITERATIONS`, the first epoch not timed) for training s/iteration, then ``predict --tasks all`` with
  its checkpoint (the cost of a forward does not depend on the weights' values) for s/case (start-up included) on
  held-out cases of one dataset; each process's peak RSS; ratios to ``universal``.

Every finished run is recorded in the study's ledger (``benchmarks/results/ledger/paradigms.json``, committed) and
reused: the study resumes across sittings and fresh clones; ``MOSAICSEG_BENCH_QUICK=1`` checks the plumbing.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    QUICK,
    ROOT,
    SHARED,
    WORK,
    Ledger,
    finished,
    held_out_cases,
    held_out_links,
    last_metrics,
    link_preprocessed,
    optimizer_setting,
    run_cli,
)
from benchmarks.common import mean_sd as _ms

MRI7 = ROOT / "collections" / "mri7.yaml"
# also the order the runs are measured in (after universal): hermes early, since issue 22's priors heatmap is read
# from its seed-0 model and Hermes' claim is tested against universal and dodnet
PARADIGMS = ("single", "universal", "multidecoder", "hermes", "dodnet", "uniseg", "clip")
SEEDS = (0, 1)
# generalisation: the hippocampus of the IXI limbic set against the Decathlon hippocampus crops
SOURCE, TARGET = "Dataset003_IXILimbic", "Dataset001_Hippocampus"
SOURCE_TASKS = ("Hippocampus_L", "Hippocampus_R")
# the cost of prediction is measured on this dataset's held-out cases (a whole head: the slowest input)
COST_DATASET = "Dataset002_IXIDeepGrey"
CLIP_WIDTH = 512  # CLIP ViT-B's text embedding width, as the CLIP-driven universal model uses
# the patch every run trains with; None: the collection plan's own ([48, 56, 40] on mri7). 32³ patches were
# considered as a cheaper CPU plan: 2.7x the iterations in the same time, but no more Dice per minute (ixi3, 30
# minutes: IXI patch-validation Dice at 11 and 21 minutes equal to the plan's patch within 0.03; mri7, 10 minutes:
# equal mean held-out Dice), and lower on the large structures (BraTS, left atrium)
PATCH: tuple[int, ...] | None = None
# issue 7's bar the universal model must clear on every IXI set before the paradigms are compared
IXI_BAR = 0.75
# the cost sitting's short runs: epochs of COST_EPOCH iterations, the first a warm-up (not timed)
COST_ITERATIONS, COST_EPOCH = (6, 2) if QUICK else (80, 20)


def _workdir() -> Path:
    workdir = WORK / "mri7"
    if not (workdir / "runs").is_dir():  # a resumed study keeps the plan its first runs were trained with
        link_preprocessed(WORK / "conv_mri7", workdir)  # the convergence study's cases: the same preprocessing
        # --anisotropy keep: ACDC at its own 10 mm slices, as every step measured so far (before that rule existed)
        run_cli(["plan", str(MRI7), "-o", str(workdir), "--overwrite", "--anisotropy", "keep"],
                WORK / "logs" / "mri7_plan.log")  # fmt: skip
    return workdir


def _clip_embeddings(workdir: Path) -> Path:
    """A fixed random ``(K, 512)`` embedding per task (seed 0), written once."""
    path = workdir / "clip_random_embeddings.npy"
    if not path.is_file():
        k = len(json.loads((workdir / "vocabulary.json").read_text())["tasks"])
        np.save(path, np.random.default_rng(0).standard_normal((k, CLIP_WIDTH)).astype(np.float32))
    return path


def _train(workdir: Path, recipe: str, dataset: str | None, iterations: int, seed: int) -> dict[str, Any]:
    # the iterations in the name: a study re-run at another length keeps the runs of the first
    name = f"{recipe}{'_' + dataset.split('_')[0] if dataset else ''}_s{seed}_{iterations}it"
    run = workdir / "runs" / name
    if not finished(run, iterations):
        args = ["train", str(workdir), "--recipe", recipe, "--iterations", str(iterations), "--seed", str(seed),
                "--fold", "0", "--device", "cpu", "--iterations-per-epoch", str(min(100, iterations)),
                "--val-every", "100000", "--val-max-cases", "2" if QUICK else "0", "--val-mode", "cases",
                "-o", str(run)]  # fmt: skip
        if PATCH:
            args += ["--patch-size", ",".join(map(str, PATCH))]
        if dataset:
            args += ["--dataset", dataset]
        if recipe == "clip":
            args += ["--task-embeddings", str(_clip_embeddings(workdir))]
        if (run / "checkpoint_latest.pt").is_file():
            args.append("--resume")
        done = run_cli(args, WORK / "logs" / f"mri7_{name}.log")
        peak = done.peak_rss_mb
    else:
        peak = None  # reused: its process is gone
    final = last_metrics(run)
    return {
        "recipe": recipe,
        "dataset": dataset,
        "seed": seed,
        "run": str(run),
        "iterations": iterations,
        "train_s": final["elapsed_s"],
        "s_per_iteration": final["elapsed_s"] / iterations,
        "train_peak_rss_mb": peak,
        "val_dice": final.get("val_dice", {}),
        "val_dice_tasks": final.get("val_dice_tasks", {}),
    }


def _case_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    both = pred.sum() + ref.sum()
    return float(2 * np.logical_and(pred, ref).sum() / both) if both else float("nan")


def _predict_source_tasks(run: Path, images: Path, pred: Path, log: Path, expected: list[str]) -> None:
    """``run``'s :data:`SOURCE_TASKS` predicted on ``images`` under :data:`SOURCE`'s plan (skipped when done)."""
    tasks = [x for t in SOURCE_TASKS for x in ("--tasks", f"{SOURCE}/{t}")]
    if not all((pred / name).exists() for name in expected):
        run_cli(["predict", "-m", str(run), "-i", str(images), "-o", str(pred), "--dataset", SOURCE, *tasks,
                 "--no-largest-component", "--overwrite"], log)  # fmt: skip


def _scored(pred: Path, labels: list[Path], values: list[int], reference_values: list[int] | None) -> dict[str, Any]:
    """Dice per case of the predicted ``values`` (their union) in ``pred`` against each file of ``labels`` (the union
    of ``reference_values``; None: any label), and their mean over the cases where it is defined."""
    from mosaicseg.data.io import read_image

    dice = {}
    for label_file in labels:
        predicted, _ = read_image(pred / label_file.name)
        reference, _ = read_image(label_file)
        ref = reference[0] > 0 if reference_values is None else np.isin(reference[0], reference_values)
        dice[label_file.name] = _case_dice(np.isin(predicted[0], values), ref)
    scored = [v for v in dice.values() if v == v]
    return {"cases": dice, "mean": float(np.mean(scored)) if scored else float("nan")}


def crop_extent_mm(images: list[Path]) -> list[float]:
    """The median extent (mm, canonical RAS axes) of ``images``: the field of view of Dataset001's crops."""
    import nibabel as nib

    extents = []
    for f in images:
        img = nib.as_closest_canonical(nib.load(f))
        extents.append(np.array(img.shape[:3]) * np.array(img.header.get_zooms()[:3]))
    return [float(x) for x in np.median(extents, axis=0)]


def crop_around(image: Path, label: Path, value: int, box_mm: list[float], out_image: Path, out_label: Path) -> None:
    """``image`` and ``label`` cropped to a ``box_mm`` box (canonical RAS axes) centred on label ``value``'s centroid,
    written with their true position (the crop's own affine): a Dataset001-like field of view of a whole head."""
    import nibabel as nib

    img, lab = nib.as_closest_canonical(nib.load(image)), nib.as_closest_canonical(nib.load(label))
    zooms = np.array(img.header.get_zooms()[:3])
    size = np.maximum(np.round(np.array(box_mm) / zooms).astype(int), 1)
    centre = np.argwhere(np.asarray(lab.dataobj) == value).mean(axis=0)
    lo = np.clip(np.round(centre - (size - 1) / 2).astype(int), 0, np.array(img.shape[:3]) - size)
    box = tuple(slice(a, a + n) for a, n in zip(lo, size, strict=True))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    for source, out, dtype in ((img, out_image, np.float32), (lab, out_label, np.uint8)):
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[box].astype(dtype), affine), out)


def generalisation(run: Path, cases: list[str], control_cases: list[str]) -> dict[str, Any]:
    """Dice of ``run``'s Dataset003 hippocampus (L ∪ R) on Dataset001's ``cases`` (anterior ∪ posterior); and the
    control: the same tasks on Dataset003's own ``control_cases``, each hippocampus cropped to the Dataset001 crops'
    median extent (L ∪ R against Dataset003's L ∪ R in the crop)."""
    base = run / "generalisation"
    images, labels = held_out_links(TARGET, cases, base)
    label_files = sorted(labels.iterdir())
    _predict_source_tasks(run, images, base / "pred", base / "predict.log", [f.name for f in label_files])
    source = json.loads((SHARED / SOURCE / "dataset.json").read_text())
    values, ending = [int(source["labels"][t]) for t in SOURCE_TASKS], source["file_ending"]
    result = _scored(base / "pred", label_files, values, None)
    box = crop_extent_mm(sorted(images.iterdir()))
    control = base / "control"
    source_images, source_labels = held_out_links(SOURCE, control_cases, control / "whole")
    crops = []
    for case in control_cases:
        for task, value in zip(SOURCE_TASKS, values, strict=True):
            name = f"{case}_{task}"
            out_image, out_label = control / "images" / f"{name}_0000{ending}", control / "labels" / f"{name}{ending}"
            if not out_label.is_file():
                image, label = source_images / f"{case}_0000{ending}", source_labels / f"{case}{ending}"
                crop_around(image, label, value, box, out_image, out_label)
            crops.append(out_label)
    _predict_source_tasks(run, control / "images", control / "pred", control / "predict.log", [f.name for f in crops])
    return {**result, "control": {**_scored(control / "pred", crops, values, values), "box_mm": box}}


def _predict_cost(workdir: Path, run: Path, cases: list[str]) -> dict[str, Any]:
    """``predict --tasks all`` on ``cases`` of :data:`COST_DATASET`: s/case (start-up included), peak RSS."""
    base = run / "cost"
    images, _ = held_out_links(COST_DATASET, cases, base)
    record = base / "cost.json"
    if not record.is_file():
        done = run_cli(["predict", "-m", str(run), "-i", str(images), "-o", str(base / "pred"), "--dataset",
                        COST_DATASET, "--tasks", "all", "--no-largest-component", "--overwrite"],
                       base / "predict.log")  # fmt: skip
        record.write_text(json.dumps({"s_per_case": done.seconds / len(cases), "peak_rss_mb": done.peak_rss_mb}))
    return json.loads(record.read_text())


def study_paradigms_mri7(iterations: int) -> dict[str, Any]:
    """See the module docstring. ``iterations``: each paradigm's total (a single run: a seventh of it). Each run,
    scored, is a step of the study's :class:`~benchmarks.common.Ledger`: the study spans sittings and clones."""
    from mosaicseg.training.recipes import RECIPES

    workdir = _workdir()
    datasets = json.loads((workdir / "vocabulary.json").read_text())["datasets"]
    plans = json.loads((workdir / "plans.json").read_text())
    landed = [p for p in PARADIGMS if p in RECIPES]
    seeds = SEEDS[:1] if QUICK else SEEDS
    n_general = 2 if QUICK else 10
    n_cost = 1 if QUICK else 3
    general_cases = held_out_cases(workdir, TARGET)[:n_general] if TARGET in datasets else []
    control_cases = held_out_cases(workdir, SOURCE)[:n_general] if general_cases else []
    cost_cases = held_out_cases(workdir, COST_DATASET)[:n_cost]
    ledger = Ledger("paradigms")
    # what every step is measured under: a run of another plan (a changed planner) is a run of another study
    plan = {
        "network": {k: plans["network"][k] for k in ("patch_size", "batch_size", "features", "strides")},
        "patch": list(PATCH) if PATCH else None,
        "spacing": {d: plans["datasets"][d]["target_spacing"] for d in datasets},
        "generalisation_cases": general_cases,
        "cost_cases": cost_cases,
    }
    runs: dict[str, Any] = {}
    # universal first: the comparison is only worth its CPU-hours once universal clears issue 7's bar
    landed = sorted(landed, key=lambda r: r != "universal")
    for seed in seeds:
        for recipe in landed:
            jobs = (
                [(d, max(1, iterations // len(datasets))) for d in datasets]
                if recipe == "single"
                else [(None, iterations)]
            )
            for dataset, its in jobs:
                key = f"{recipe}{'_' + dataset if dataset else ''}_s{seed}"
                setting = {"recipe": recipe, "dataset": dataset, "iterations": its, "seed": seed, **plan}
                setting |= optimizer_setting(recipe)
                extras = {
                    "cost": seed == seeds[0] and (recipe != "single" or dataset == COST_DATASET),
                    "priors": recipe == "hermes" and seed == seeds[0],
                }
                step = partial(_run, workdir, recipe, dataset, its, seed, cost_cases, extras)
                # the iterations in the key: a study at another length keeps this one's steps
                entry = runs[key] = ledger.step(f"{key}_{its}it", setting, step)
                if general_cases and (recipe != "single" or dataset == SOURCE):
                    runs[key] = _with_generalisation(
                        ledger, f"{key}_{its}it", entry, general_cases, control_cases, setting.get("optimizer")
                    )
                short = below_bar(entry["val_dice"]) if recipe == "universal" and seed == seeds[0] else {}
                if short and not QUICK:
                    raise SystemExit(
                        f"universal (seed {seed}, {iterations} iterations) is below {IXI_BAR} on "
                        + ", ".join(f"{d} ({v:.3f})" for d, v in short.items())
                        + ": the paradigms are not compared on it. Fix: run the study with a larger --iterations "
                        "(its runs are kept per iteration count)."
                    )
    priors = next((v["priors"] for v in runs.values() if v.get("priors")), None)
    cost_setting = {"paradigms": landed, "iterations": COST_ITERATIONS, "epoch": COST_EPOCH, **plan}
    # last: every paradigm's cost from one sitting, on one host (a study cut short measures it when it comes back)
    cost = ledger.step("cost", cost_setting, partial(cost_sitting, workdir, landed, cost_cases))
    keys = [f"{k}_{v['iterations']}it" for k, v in runs.items()]
    return {
        "priors": priors,
        "cost": cost,
        "commits": ledger.commits(keys),
        "hosts": ledger.hosts(keys),
        "setting": {
            "collection": "mri7",
            "network": {
                **{k: plans["network"][k] for k in ("batch_size", "features")},
                "patch_size": list(PATCH or plans["network"]["patch_size"]),
                **({"plan_patch_size": plans["network"]["patch_size"]} if PATCH else {}),
            },
            "spacing": plan["spacing"],
            "training": "the train defaults: AdamW 3e-3 poly (hermes: LAMB 2e-3 exponential, its recipe's "
            "default), bf16 where native, head prior auto",
            "iterations_multi": iterations,
            "iterations_single": max(1, iterations // len(datasets)),
            "fold": 0,
            "seeds": list(seeds),
            "clip_embeddings": f"fixed random (seed 0, width {CLIP_WIDTH}): not CLIP's text prior",
            "generalisation": f"{SOURCE} {'+'.join(SOURCE_TASKS)} on {len(general_cases)} held-out {TARGET} cases",
            "cost_cases": f"{len(cost_cases)} held-out {COST_DATASET} cases, --tasks all",
        },
        "datasets": datasets,
        "paradigms": landed,
        "runs": runs,
    }


def cost_sitting(workdir: Path, paradigms: list[str], cases: list[str]) -> dict[str, Any]:
    """Every paradigm's training and prediction cost, measured back to back: a fresh short run of each
    (``single``: on :data:`COST_DATASET`), its s/iteration over the epochs after the first, then ``predict --tasks
    all`` with its checkpoint on ``cases``; and the host it ran on."""
    import shutil

    from benchmarks.common import host

    out: dict[str, Any] = {}
    for recipe in paradigms:
        run = workdir / "runs" / f"cost_{recipe}"
        shutil.rmtree(run, ignore_errors=True)  # a measurement of this sitting, not a reused one
        args = ["train", str(workdir), "--recipe", recipe, "--iterations", str(COST_ITERATIONS), "--seed", "0",
                "--fold", "0", "--device", "cpu", "--iterations-per-epoch", str(COST_EPOCH), "--val-every", "100000",
                "--val-max-cases", "1", "-o", str(run)]  # fmt: skip
        if PATCH:
            args += ["--patch-size", ",".join(map(str, PATCH))]
        if recipe == "single":
            args += ["--dataset", COST_DATASET]
        if recipe == "clip":
            args += ["--task-embeddings", str(_clip_embeddings(workdir))]
        done = run_cli(args, WORK / "logs" / f"mri7_cost_{recipe}.log")
        epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
        out[recipe] = {
            "s_per_iteration": statistics.mean(e["epoch_time_s"] for e in epochs) / COST_EPOCH,
            "train_peak_rss_mb": done.peak_rss_mb,
            **_predict_cost(workdir, run, cases),
        }
    return {"paradigms": out, "host": host()}


def _run(
    workdir: Path,
    recipe: str,
    dataset: str | None,
    iterations: int,
    seed: int,
    cost_cases: list[str],
    extras: dict[str, bool],
) -> dict[str, Any]:
    """One run trained (or resumed, or reused) and measured: validation, and the ``extras`` asked for
    (prediction cost, Hermes' priors), while its checkpoint is at hand."""
    entry = _train(workdir, recipe, dataset, iterations, seed)
    run = Path(entry["run"])
    if extras["cost"]:
        entry["predict_cost"] = _predict_cost(workdir, run, cost_cases)
    if extras["priors"]:
        entry["priors"] = _hermes_priors(run)
    return entry


def _with_generalisation(
    ledger: Ledger, key: str, entry: dict[str, Any], cases: list[str], control_cases: list[str],
    optimizer: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``entry`` with its run's :func:`generalisation`, a step of its own (``KEY_generalisation``): a run measured
    before the control existed is scored again from its checkpoint while that is at hand; where the checkpoint is
    gone too, the run's record keeps what it has. ``optimizer``: the run's, where its step setting names one (a
    run trained again under another optimiser is scored again, not given the old run's figure)."""
    gkey, run = f"{key}_generalisation", Path(entry["run"])
    setting = {"cases": cases, "control_cases": control_cases, "control_box": "median extent of the cases"}
    if optimizer is not None:
        setting["optimizer"] = optimizer
    if ledger.get(gkey, setting) is None and not (run / "checkpoint_final.pt").is_file():
        print(f"{gkey}: not measured, and {run} has no checkpoint to measure it with", flush=True)
        return entry
    return {
        **entry,
        "generalisation": ledger.step(gkey, setting, partial(generalisation, run, cases, control_cases), counted=False),
    }


def below_bar(val_dice: dict[str, float]) -> dict[str, float]:
    """The IXI sets of a run's validation Dice per dataset that are below :data:`IXI_BAR`."""
    return {d: v for d, v in val_dice.items() if "_IXI" in d and not v >= IXI_BAR}


def _hermes_priors(run: Path) -> dict[str, Any]:
    """``mosaicseg priors`` of a Hermes run: its heatmaps copied next to the results (issue 22), and what the
    matrices measure (:func:`~mosaicseg.evaluation.priors.summarise` of the tasks, the modality matrix itself)."""
    from benchmarks.common import RESULTS
    from mosaicseg.evaluation.priors import read_matrix, summarise

    out = run / "priors"
    if not (out / "task_priors.png").is_file():
        run_cli(["priors", str(run), "-o", str(out)], WORK / "logs" / "mri7_priors.log")
    RESULTS.mkdir(parents=True, exist_ok=True)
    copied = {}
    for name in ("task_priors", "modality_priors"):
        if (out / f"{name}.png").is_file():
            target = RESULTS / f"paradigms-hermes-{name}.png"
            target.write_bytes((out / f"{name}.png").read_bytes())
            copied[name] = f"benchmarks/results/{target.name}"
    task_names, tasks = read_matrix(out / "task_priors.csv")
    modalities = None
    if (out / "modality_priors.csv").is_file():
        names, matrix = read_matrix(out / "modality_priors.csv")
        modalities = {"names": names, "matrix": matrix.round(4).tolist()}
    task_matrix = {"names": task_names, "matrix": tasks.round(4).tolist()}
    return {"images": copied, "tasks": summarise(task_names, tasks), "task_matrix": task_matrix,
            "modalities": modalities}  # fmt: skip


IXI = ("Dataset002_IXIDeepGrey", "Dataset003_IXILimbic", "Dataset004_IXIVentricles")
CINE, LGE = "Dataset007_ACDC", "Dataset008_LeftAtrium"
# the vocabulary's modality names of the two cardiac sequences
CINE_MODALITY, LGE_MODALITY = "cineMRI", "LGE"


def priors_lines(priors: dict[str, Any]) -> list[str]:
    """The heatmaps of a Hermes run's priors and what they show, in sentences built from the measured
    matrices (:func:`_hermes_priors`): issue 22's questions — do the IXI sets' tokens group by structure, the
    cardiac ones by sequence, the two hippocampus definitions together?"""
    about = "Hermes' learned priors (paradigms, seed 0): cosine similarity of the task and of the modality tokens"
    lines = [f"{about} (`mosaicseg priors`):", ""]
    lines += [f"![{name}]({path})" for name, path in priors.get("images", {}).items()]
    tasks = priors.get("tasks")
    if not tasks:
        return [*lines, ""]
    blocks, mirror = tasks["blocks"], tasks["mirror"]
    said: list[str] = []
    ixi = [d for d in IXI if d in blocks]
    if len(ixi) > 1 and mirror["pair_mean"] is not None and mirror["other_mean"] is not None:
        within = statistics.mean(blocks[d][d] for d in ixi if blocks[d][d] is not None)
        between = statistics.mean(blocks[a][b] for a in ixi for b in ixi if a != b)
        by_structure = mirror["pair_mean"] > mirror["other_mean"]
        by_set = within > between
        leans = abs(mirror["pair_mean"] - mirror["other_mean"]), abs(within - between)
        said.append(
            f"IXI (one kind of T1 head, three annotated groups): a structure's left and right tokens are at mean "
            f"cosine {mirror['pair_mean']:.2f} against {mirror['other_mean']:.2f} for two different structures of "
            f"the same set, and the tokens of one set at {within:.2f} against {between:.2f} across the sets, so "
            f"they {'pair by structure' if by_structure else 'do not pair left with right'} and "
            f"{'cluster by annotating set' if by_set else 'do not cluster by annotating set'}"
            # a lean of a few hundredths between near-orthogonal tokens is not a grouping: say how small it is
            + (
                f", both only faintly (differences of {leans[0]:.2f} and {leans[1]:.2f}; the task tokens are nearly "
                "orthogonal)."
                if max(leans) < 0.1
                else "."
            )
        )
    if CINE in blocks and LGE in blocks and blocks[CINE][CINE] is not None:
        lge_task = next(n for n in tasks["nearest"] if n.startswith(LGE + "/"))
        near, cos = tasks["nearest"][lge_task]
        sentence = (
            f"Cardiac: ACDC's cine tokens are at {blocks[CINE][CINE]:.2f} among themselves and {blocks[CINE][LGE]:.2f} "
            f"with the LGE left atrium, whose nearest task is {near} ({cos:.2f})"
        )
        modal = priors.get("modalities")
        if modal and CINE_MODALITY in modal["names"] and LGE_MODALITY in modal["names"]:
            i, j = modal["names"].index(CINE_MODALITY), modal["names"].index(LGE_MODALITY)
            m = modal["matrix"]
            rest = [m[a][b] for a in range(len(m)) for b in range(a + 1, len(m)) if {a, b} != {i, j}]
            sentence += f"; the cine and LGE modality tokens are at {m[i][j]:.2f}"
            sentence += f" (the other modality pairs {statistics.mean(rest):.2f})" if rest else ""
        said.append(sentence + ".")
    full = priors.get("task_matrix")
    if full:
        names, m = full["names"], full["matrix"]
        crops = [i for i, n in enumerate(names) if n.startswith(TARGET + "/")]
        heads = [i for i, n in enumerate(names) if n.startswith(SOURCE + "/") and "hippocamp" in n.lower()]
        rest = [j for j, n in enumerate(names) if j not in crops and j not in heads]
        if crops and heads and rest:
            said.append(
                f"The hippocampus under two definitions: {_short(TARGET)}'s anterior/posterior tokens are at "
                f"{statistics.mean(m[i][j] for i in crops for j in heads):.2f} with {_short(SOURCE)}'s "
                f"hippocampus L/R and {statistics.mean(m[i][j] for i in crops for j in rest):.2f} with every other "
                "task."
            )
    share = tasks.get("nearest_same_dataset")
    if share is not None:
        said.append(f"{share:.0%} of the tasks have their nearest token in their own dataset.")
    return [*lines, "", " ".join(said), ""]


def _short(dataset: str) -> str:
    return dataset.split("_", 1)[-1]


def report(r: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md section: Dice per dataset (mean ± sd over seeds), Hermes' claim checked on the average,
    Dice per task, generalisation and cost."""
    s, runs, names, datasets = r["setting"], r["runs"], r["paradigms"], r["datasets"]

    def runs_of(recipe: str) -> list[dict[str, Any]]:
        return [v for v in runs.values() if v["recipe"] == recipe]

    def dice(recipe: str, dataset: str) -> list[float]:
        # per seed; a single run scores its own dataset only
        return [v["val_dice"][dataset] for v in runs_of(recipe) if dataset in v["val_dice"]]

    def average(recipe: str) -> float | None:
        means = [statistics.mean(x) for d in datasets if (x := dice(recipe, d))]
        return statistics.mean(means) if len(means) == len(datasets) else None

    label = {n: f"{n} (random embeddings)" if n == "clip" else n for n in names}
    lines = [
        f"## Paradigms on {len(datasets)} MR datasets (mri7, equal total iterations, {len(s['seeds'])} seeds)",
        "",
        f"`python -m benchmarks paradigms --iterations {s['iterations_multi']}` — `collections/mri7.yaml` "
        f"planned once; its network (features {s['network']['features']}, batch "
        f"{s['network']['batch_size']}) with patch {s['network']['patch_size']}"
        + (f" instead of its {s['network']['plan_patch_size']}" if s["network"].get("plan_patch_size") else "")
        + f"; {s['training']}; every multi-dataset paradigm {s['iterations_multi']} "
        f"iterations, `single` {s['iterations_single']} on each dataset; fold {s['fold']}, seeds {s['seeds']}; "
        f"validation pseudo-Dice (mean ± sd over seeds) on every held-out case, final checkpoint; `clip`: "
        f"{s['clip_embeddings']}. ACDC is planned at its own 10 mm slices (`plan --anisotropy keep`: the steps "
        "were measured before `plan` matched thick slices to the network; the anisotropy study measures what "
        "matching changes).",
        "",
        "| dataset | " + " | ".join(label[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for d in datasets:
        lines.append(f"| {_short(d)} | " + " | ".join(_ms(dice(n, d)) for n in names) + " |")
    avg = {n: average(n) for n in names}
    lines.append("| **average** | " + " | ".join("–" if avg[n] is None else f"{avg[n]:.3f}" for n in names) + " |")
    ixi = [d for d in datasets if "_IXI" in d]
    universal_ixi = {d: statistics.mean(x) for d in ixi if (x := dice("universal", d))}
    if universal_ixi:
        short = [d for d, v in universal_ixi.items() if v < IXI_BAR]
        lines += [
            "",
            f"Precondition (universal ≥ {IXI_BAR} on every IXI set before comparing): "
            + ", ".join(f"{_short(d)} {v:.3f}" for d, v in universal_ixi.items())
            + (": **met**." if not short else f": **not met** ({', '.join(_short(d) for d in short)} below)."),
        ]
    if all(avg.get(n) is not None for n in ("hermes", "universal", "dodnet", "single")):
        h, u, dd, one = avg["hermes"], avg["universal"], avg["dodnet"], avg["single"]
        holds = h >= max(u, dd) and min(u, dd) >= one
        lines += [
            "",
            f"Hermes' claim (hermes ≥ universal, dodnet ≥ single, on the average): hermes {h:.3f}, universal "
            f"{u:.3f}, dodnet {dd:.3f}, single {one:.3f}: **{'holds' if holds else 'fails'}**"
            + ("." if holds else f" ({_why(h, u, dd, one)})."),
        ]
    order = {d: i for i, d in enumerate(datasets)}
    seen = dict.fromkeys(t for v in runs.values() for t in v["val_dice_tasks"])  # each run's task order
    tasks = sorted(seen, key=lambda t: order.get(t.split("/")[0], len(order)))  # stable: by dataset, then as seen
    lines += ["", "Validation pseudo-Dice per task (mean over seeds):", "",
              "| task | " + " | ".join(label[n] for n in names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for t in tasks:
        cells = []
        for n in names:
            xs = [v["val_dice_tasks"][t] for v in runs_of(n) if t in v["val_dice_tasks"]]
            cells.append(f"{statistics.mean(xs):.3f}" if xs else "–")
        lines.append(f"| {_short(t)} | " + " | ".join(cells) + " |")
    box = next((v["generalisation"]["control"]["box_mm"] for v in runs.values()
                if "control" in v.get("generalisation", {})), None)  # fmt: skip
    lines += ["", f"Generalisation: {s['generalisation']}, Dice of L ∪ R against anterior ∪ posterior. Control: the "
              f"same tasks on {SOURCE}'s own held-out heads, each hippocampus cropped to the crops' median extent"
              + (f" ({' × '.join(f'{x:.0f}' for x in box)} mm)" if box else "")
              + " — where both are low, the model needs the whole head's context; where only the first is, the other "
              "definition or scanner. Whole heads: the run's own validation Dice of those tasks.", "",
              "| paradigm | Dataset001 crops | control: Dataset003 cropped alike | whole heads (validation) |",
              "|---|---|---|---|"]  # fmt: skip
    for n in names:
        scored = [v for v in runs_of(n) if "generalisation" in v]
        general = [v["generalisation"]["mean"] for v in scored]
        control = [v["generalisation"]["control"]["mean"] for v in scored if "control" in v["generalisation"]]
        tasks = [f"{SOURCE}/{t}" for t in SOURCE_TASKS]
        whole = [statistics.mean(v["val_dice_tasks"][t] for t in tasks) for v in scored
                 if all(t in v["val_dice_tasks"] for t in tasks)]  # fmt: skip
        lines.append(f"| {label[n]} | {_ms(general)} | {_ms(control)} | {_ms(whole)} |")
    lines += cost_lines(r.get("cost"), names, label, s["cost_cases"])
    if not r.get("cost"):  # results from before the cost sitting: each run's own figures
        lines += _run_cost_lines(runs_of, names, label, s["cost_cases"])
    if r.get("priors"):
        lines += ["", *priors_lines(r["priors"])]
    return [*lines, ""]


def cost_lines(cost: dict[str, Any] | None, names: list[str], label: dict[str, str], cases: str) -> list[str]:
    """The cost table of the one-sitting measurement (:func:`cost_sitting`), with ratios to ``universal``."""
    if not cost:
        return []
    host, per = cost["host"], cost["paradigms"]
    base = per.get("universal")
    lines = ["", f"Cost, every paradigm measured back to back in one sitting ({host['cpu']}, {host['cores']} cores, "
             f"{host['threads']} threads; training: a short run after a warm-up epoch; prediction: {cases} with "
             "that run's checkpoint; a single model: the one of that dataset). Each run's own training time is not "
             "compared: the runs span sittings on hosts of different speed.", "",
             "| paradigm | training s/iteration | × universal | train peak RSS MB | predict s/case | × universal "
             "| predict peak RSS MB |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def ratio(n: str, key: str) -> str:
        return f"{per[n][key] / base[key]:.2f}" if base else "–"

    for n in names:
        if n in per:
            c = per[n]
            lines.append(
                f"| {label[n]} | {c['s_per_iteration']:.2f} | {ratio(n, 's_per_iteration')} | "
                f"{c['train_peak_rss_mb']:.0f} | {c['s_per_case']:.1f} | {ratio(n, 's_per_case')} | "
                f"{c['peak_rss_mb']:.0f} |"
            )
    return lines


def _run_cost_lines(runs_of: Callable[[str], list[dict[str, Any]]], names: list[str], label: dict[str, str],
                    cases: str) -> list[str]:  # fmt: skip
    lines = ["", f"Cost ({cases}; a single model: the one of that dataset; each run's own figures, sittings and "
             "hosts mixed):", "",
             "| paradigm | training s/iteration | train peak RSS MB | predict s/case | predict peak RSS MB |",
             "|---|---|---|---|---|"]  # fmt: skip
    for n in names:
        its = [v["s_per_iteration"] for v in runs_of(n)]
        rss = [v["train_peak_rss_mb"] for v in runs_of(n) if v.get("train_peak_rss_mb")]
        cost = next((v["predict_cost"] for v in runs_of(n) if "predict_cost" in v), None)
        peak = f"{max(rss):.0f}" if rss else "–"
        predict = f"{cost['s_per_case']:.1f} | {cost['peak_rss_mb']:.0f}" if cost else "– | –"
        lines.append(f"| {label[n]} | {statistics.mean(its):.2f} | {peak} | {predict} |")
    return lines


def _why(h: float, u: float, dd: float, one: float) -> str:
    out = []
    if h < max(u, dd):
        out.append(f"hermes is {max(u, dd) - h:.3f} below the better of universal and dodnet")
    if min(u, dd) < one:
        out.append(f"{'universal' if u < dd else 'dodnet'} is {one - min(u, dd):.3f} below single")
    return "; ".join(out)
