"""``python -m benchmarks STUDY [--force]``: run one study, write ``benchmarks/results/STUDY.json`` and
regenerate ``BENCHMARKS.md`` from every result present. A finished study is not recomputed (``--force``), except a
long one with a ledger, which runs again and measures only the steps its ledger lacks under the current setting.

``python -m benchmarks quick`` runs every study at its smallest setting (13 minutes on 2 cores, half of it the
nnU-Net comparison; ``STUDY --quick`` one of them) in ``work/bench-quick``, with results and report there: the
check that the suite works.

Studies:
  partial-labels  synthetic 2D: MultiTalent's partial-label loss vs. treating missing labels as background
  hippocampus     single recipe on Dataset001_Hippocampus fold 0, 3D, 30-minute wall-clock budget (CPU)
  predict         predict seconds per case and peak memory on hippocampus and IXI cases
  memory          peak RSS of predicting a 512x512x400 CT with a 24-task model (target < 4 GiB)
  paradigms-brain4  the first paradigm study: single / universal on Dataset001-004, equal total iterations,
                  2 seeds (--iterations N per single run; a multi-dataset run gets 4 N); its IXI rows predate the
                  IXI rebuild (void); the precision and ensemble studies use its runs
  nnunet          MosaicSeg vs nnU-Net v2 on Dataset001 and Dataset003: equal iterations with nnU-Net's plan,
                  equal wall clock with each tool's CPU plan; Dice, iterations/s, predict s/case, peak RSS
                  (--quick: Dataset001, 2 iterations, 15 s, 2 cases)
  precision       bf16 training on the CPU (--precision mixed) vs float32: the paradigms-brain4 study's single runs on
                  Dataset001, 2 seeds (--iterations N); training time and validation pseudo-Dice
  ensemble        universal vs. 4 single models: time to predict all tasks of Dataset001-004 (needs paradigms)
  speed           training-step FLOP/s vs. this CPU's convolution peak, before/after the layout work, profile
  convergence     universal training on CPU: validation Dice against wall-clock minutes per configuration
                  (--collection ixi3|mri7, --configs NAME..., --budget-min; runs reused, results per collection)
  hermes-ablation Hermes' Table 4 in miniature: task prior at one scale / hierarchy / one-way fusion / modality
                  prior / auxiliary loss, --iterations N each, 3 seeds (--collection, default mri7)
  paradigms       every paradigm on Dataset001-005, 007, 008 at equal total iterations (--iterations N, default
                  8000), train defaults, 2 seeds: validation Dice per dataset and task, Dataset003's hippocampus on
                  Dataset001 (generalisation), s/iteration, predict --tasks all s/case, peak RSS
  transfer        pre-train (universal, hermes on Dataset002-005, 007), then finetune / extend on Dataset001 and
                  Dataset008 against training from scratch, 3 seeds, 1/8/32/all cases (MultiTalent Table 2, Hermes
                  Table 3 in miniature), and the iterations fine-tuning needs to reach scratch's Dice
  fewshot         mosaicseg adapt: asap / finetune / gms / mtl / dal, same turns, 3 folds of 3 shots (and 1, 5):
                  Dataset001 and Dataset008 from the transfer study's universal model with the 3D pool split by
                  label, Dataset010 (2D) from scratch and from a 2D universal model; ASAP's arm choices
  ka2er           the KA²ER student (no / oracle / automatic boxes) against its experts (one an nnU-Net v2 model)
                  and universal on Dataset002-004, 007, 008, 2 seeds; Dice, HD95, out-of-domain hippocampus, cost
  outside         the mri7 2-hour universal run's held-out cases predicted with and without background outside
                  the imaged region (predict --background-outside off / on) and the plan's decision per dataset
  anisotropy      ACDC (10 mm slices) in mri7 planned --anisotropy keep vs match: single ACDC models, 2 seeds, Dice
                  and HD95 of the held-out cases in their original geometry
  report          only regenerate BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import (
    QUICK,
    QUICK_ENV,
    RESULTS,
    SHARED,
    WORK,
    evaluate,
    finished,
    held_out_cases,
    held_out_links,
    last_metrics,
    link_all,
    plain_network,
    run_cli,
    run_study,
)
from benchmarks.report import write_report


def study_partial_labels() -> dict[str, Any]:
    from mosaicseg.demo import run_demo

    runs: dict[str, dict[str, Any]] = {}
    iterations, seeds = (10, (0,)) if QUICK else (400, (0, 1))
    for mode in ("ignore", "background"):
        for seed in seeds:
            summary = run_demo(
                WORK / f"partial_{mode}_s{seed}",
                dim=2,
                seed=seed,
                iterations=iterations,
                missing_labels=mode,
                progress=False,
                log=lambda *_: None,
            )
            runs[f"{mode}/{seed}"] = {
                d: {label: e["dice"]["mean"] for label, e in v["labels"].items()}
                for d, v in summary["datasets"].items()
            }
    return {
        "setting": f"synthetic 2D collection, universal recipe, unet (plan), AdamW 1e-3 poly, {iterations} "
        f"iterations, batch 2, fold 0 held-out cases, seeds {' and '.join(map(str, seeds))} (data and training)",
        "runs": runs,
    }


def study_hippocampus() -> dict[str, Any]:
    workdir = WORK / "hippo"
    dataset = "Dataset001_Hippocampus"
    t_plan = run_cli(
        ["plan", str(SHARED / dataset), "-o", str(workdir), "--overwrite"], WORK / "logs" / "hippo_plan.log"
    ).seconds
    # the train command's defaults; earlier runs are kept in their folders: single_adamw (explicit AdamW 1e-3),
    # single_defaults (the defaults with whole-case validation, before patch validation became the default)
    run = workdir / "runs" / "single_defaults_patchval" / "fold_0"
    # quick: a short budget, validation on 4 cases after every epoch of 10 iterations, 4 cases predicted
    budget, n_cases = ("20s", 4) if QUICK else ("30m", None)
    quick = ["--iterations-per-epoch", "10", "--val-max-cases", "4"] if QUICK else []
    args = ["train", str(workdir), "--recipe", "single", "--fold", "0", "--time-budget", budget, *quick,
            "--seed", "0", "--device", "cpu", "-o", str(run)]  # fmt: skip
    if (run / "checkpoint_latest.pt").is_file():
        args.append("--resume")
    t_train = run_cli(args, WORK / "logs" / "hippo_train.log").seconds
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cases = held_out_cases(workdir, dataset)[:n_cases]
    images, labels = held_out_links(dataset, cases, WORK / "hippo_heldout")
    pred = WORK / "hippo_pred"
    t_pred = run_cli(
        ["predict", "-m", str(run), "-i", str(images), "-o", str(pred), "--no-largest-component", "--overwrite"],
        WORK / "logs" / "hippo_predict.log",
    ).seconds
    scores = evaluate(pred, labels, dataset, WORK / "logs" / "hippo_eval.log")
    plans = json.loads((workdir / "plans.json").read_text())
    config = json.loads((run / "config.json").read_text())
    return {
        "earlier": _earlier_hippocampus_results(RESULTS / "hippocampus.json"),
        "setting": {
            "network": "unet (plan)",
            **{k: plans["network"][k] for k in ("patch_size", "batch_size", "features", "strides")},
            "optimizer": "the train command's defaults (AdamW 3e-3 poly, bf16 where native, head_prior auto, "
            "validation within 10 % of the time on at most 8 cases)",
            "val_mode": config["train_config"].get("val_mode", "cases"),
            "budget": f"{budget} wall clock",
            "fold": 0,
            "held_out_cases": len(cases),
        },
        "iterations": records[-1]["iteration"],
        "train_s": t_train,
        "plan_s": t_plan,
        "predict_s": t_pred,
        "final_pseudo_dice": records[-1].get("val_mean"),
        "dice_per_label": {k: v["dice"]["mean"] for k, v in scores["labels"].items()},
        "dice_mean": scores["mean"]["dice"],
        "curve": [(r["iteration"], r.get("val_mean")) for r in records if "val_mean" in r],
    }


def _earlier_hippocampus_results(previous: Path) -> list[dict[str, Any]]:
    """The earlier results this study is compared with, oldest first, each named by its settings.

    The file of the previous run holds them: in this form (``earlier``), or in the first form, where the
    result itself was the whole-case-validation defaults and ``before`` the explicit AdamW 1e-3 run.
    """
    if not previous.is_file():
        return []
    old = json.loads(previous.read_text())
    if "earlier" in old:
        return old["earlier"]
    earlier = []
    if old.get("before"):
        earlier.append({"name": "before: AdamW 1e-3, float32, whole-case validation every 500 iterations",
                        **{k: v for k, v in old["before"].items() if k != "before"}})  # fmt: skip
    earlier.append({"name": "defaults, whole-case validation",
                    **{k: v for k, v in old.items() if k != "before"}})  # fmt: skip
    return earlier


def study_predict() -> dict[str, Any]:
    """Prediction cost per case (own process: its peak RSS is the prediction's).

    Rows: the hippocampus run on hippocampus cases (with and without TTA) and, as a cost-only stress case, on
    IXI heads resampled to its 1 mm plan; and the brain4 universal model (2 mm plan for IXI) on IXI heads with
    all 19 tasks, if that study has trained it. Rows measured before are reused (``work/bench/predict_rows.json``)
    so a long study can span sittings; ``--force`` only recomputes the summary from them."""
    hippo = WORK / "hippo" / "runs" / "single_adamw" / "fold_0"
    if not (hippo / "checkpoint_final.pt").is_file():
        raise SystemExit("run the hippocampus study first (python -m benchmarks hippocampus)")
    universal = WORK / "brain4" / "runs" / "universal_s0"
    # (row, run, dataset of the plan, images of, cases, tta); an IXI head at the hippocampus plan's 1 mm is
    # ~650 tiles: TTA (8 mirrors) would take ~25 min per case
    rows = [
        ("Dataset001_Hippocampus", hippo, "Dataset001_Hippocampus", "Dataset001_Hippocampus", 10, False),
        ("Dataset001_Hippocampus +TTA", hippo, "Dataset001_Hippocampus", "Dataset001_Hippocampus", 10, True),
    ]
    if not QUICK:  # ~3 minutes per case
        rows.append(
            (
                "Dataset003_IXILimbic (hippocampus 1 mm plan)",
                hippo,
                "Dataset001_Hippocampus",
                "Dataset003_IXILimbic",
                2,
                False,
            )
        )
    if (universal / "checkpoint_final.pt").is_file():
        # quick: no TTA on IXI heads (8 passes of ~15 s)
        rows += [
            (
                "Dataset003_IXILimbic (brain4 universal, 2 mm, 19 tasks)",
                universal,
                "Dataset003_IXILimbic",
                "Dataset003_IXILimbic",
                4,
                False,
            ),
            (
                "Dataset003_IXILimbic (brain4 universal, 2 mm, 19 tasks) +TTA",
                universal,
                "Dataset003_IXILimbic",
                "Dataset003_IXILimbic",
                4,
                True,
            ),
        ][: 1 if QUICK else 2]
    cache = WORK / "predict_rows.json"
    out: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, run, plan_dataset, images_of, n, tta in rows:
        if name in out:
            continue
        n = 1 if QUICK else n
        images = sorted((SHARED / images_of / "imagesTr").glob("*_0000.nii.gz"))[:n]
        folder = link_all(images, WORK / f"predict_{images_of}" / "images")
        pred = WORK / f"predict_{images_of}" / f"pred_{len(out)}"
        args = ["predict", "-m", str(run), "-i", str(folder), "-o", str(pred), "--no-largest-component", "--overwrite"]
        args += ["--dataset", plan_dataset] + (["--tta"] if tta else [])
        if run == universal:
            args += ["--tasks", "all"]
        done = run_cli(args, WORK / "logs" / f"predict_{len(out)}.log")
        out[name] = {"cases": n, "s_per_case_incl_startup": done.seconds / n, "peak_rss_mb": done.peak_rss_mb}
        from mosaicseg.atomic import write_json_atomic

        write_json_atomic(cache, out)
    return {
        "setting": "mosaicseg predict in its own process (start-up included), CPU, final checkpoints; the "
        "hippocampus plan on IXI heads measures cost only, not quality",
        "results": out,
    }


BRAIN4 = ("Dataset001_Hippocampus", "Dataset002_IXIDeepGrey", "Dataset003_IXILimbic", "Dataset004_IXIVentricles")


# the collection's CPU plan (patch 64³, 5 stages) costs ~3 s per iteration here; this one ~1/3 of that
BRAIN4_NETWORK = {"patch_size": [48, 48, 48], "features": [16, 32, 64, 128], "batch_size": 2}


def _set_network(plans_path: Path, network: dict[str, Any]) -> None:
    """Edit the plan's network (plans.json is meant to be edited): patch, widths, batch; plain 3³ convs,
    stride 2 per stage."""
    from mosaicseg.atomic import write_json_atomic

    plans = json.loads(plans_path.read_text())
    plans["network"].update(plain_network(network))
    write_json_atomic(plans_path, plans)


# MultiTalent's paradigm comparison; the recipes of later issues join the table as they are registered
PARADIGMS = ("single", "universal", "multidecoder", "dodnet", "hermes", "ka2er")


def _paradigm_run_name(recipe: str, dataset: str | None, seed: int, precision: str = "auto") -> str:
    return f"{recipe}{'_' + dataset if dataset else ''}_s{seed}{'' if precision == 'auto' else '_' + precision}"


def _train_paradigm(
    workdir: Path, recipe: str, dataset: str | None, iterations: int, seed: int, precision: str = "auto"
) -> dict[str, Any]:
    """Train (or resume, or reuse when finished) one run of the paradigm study; its final metrics.
    ``precision``: ``auto`` (the float32 of these runs, named so before bf16 became the default on native-bf16
    CPUs) or ``mixed``. The settings these studies were measured with are pinned (AdamW 1e-3, no head prior), as
    ``train``'s defaults have changed since."""
    common = [
        "--fold",
        "0",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--recipe-option",
        "head_prior=null",
        "--iterations-per-epoch",
        str(min(100, iterations)),  # a checkpoint every 100 iterations: a study killed mid-run loses little
        "--val-every",
        "100000",
        "--val-max-cases",
        "2" if QUICK else "0",  # quick: the final validation of every held-out case takes minutes
        "--val-mode",
        "cases",  # the reported Dice: whole held-out cases
        "--device",
        "cpu",
        "--precision",
        "fp32" if precision == "auto" else precision,
    ]
    name = _paradigm_run_name(recipe, dataset, seed, precision)
    run = workdir / "runs" / name
    if not finished(run, iterations):
        args = ["train", str(workdir), "--recipe", recipe, "--iterations", str(iterations), "--seed", str(seed)]
        args += ["-o", str(run), *common, *(["--dataset", dataset] if dataset else [])]
        if (run / "checkpoint_latest.pt").is_file():
            args.append("--resume")
        run_cli(args, WORK / "logs" / f"brain4_{name}.log")
    final = last_metrics(run)
    # elapsed_s sums the training time of every resumed segment
    return {
        "recipe": recipe,
        "seed": seed,
        "precision": precision,
        "train_s": final["elapsed_s"],
        "iterations": iterations,
        "val_dice": final.get("val_dice", {}),
        "val_dice_tasks": final.get("val_dice_tasks", {}),
    }


def _brain4_workdir() -> Path:
    """``collections/brain4.yaml`` planned and preprocessed once, with :data:`BRAIN4_NETWORK` set in its plan."""
    from benchmarks.common import ROOT

    workdir = WORK / "brain4"
    if not (workdir / "runs").is_dir():  # a resumed study keeps the plan its first runs were trained with
        run_cli(
            ["plan", str(ROOT / "collections" / "brain4.yaml"), "-o", str(workdir), "--overwrite"],
            WORK / "logs" / "brain4_plan.log",
        )
        _set_network(workdir / "plans.json", BRAIN4_NETWORK)
    return workdir


def study_paradigms(iterations: int) -> dict[str, Any]:
    """Every paradigm of :data:`PARADIGMS` whose recipe is registered, on Dataset001-004
    (``collections/brain4.yaml``) at an equal total budget in iterations (so a busy machine cannot bias it):
    ``single`` trains ``iterations`` on each dataset, every multi-dataset paradigm ``4 × iterations`` on all
    four; same plan (network, patch, batch), optimiser and fold; seeds 0 and 1; validation pseudo-Dice on
    every held-out case of fold 0, final checkpoint. A finished run is reused, a stopped one resumed."""
    from mosaicseg.training.recipes import RECIPES

    workdir = _brain4_workdir()
    landed = [p for p in PARADIGMS if p in RECIPES]
    runs: dict[str, Any] = {}
    seeds = (0,) if QUICK else (0, 1)
    for seed in seeds:
        for recipe in landed:
            jobs = [(d, iterations) for d in BRAIN4] if recipe == "single" else [(None, 4 * iterations)]
            for dataset, its in jobs:
                name = _paradigm_run_name(recipe, dataset, seed)
                runs[name] = _train_paradigm(workdir, recipe, dataset, its, seed)
    plans = json.loads((workdir / "plans.json").read_text())
    return {
        "setting": {
            "network": "unet, CPU-affordable network set in plans.json (the CPU plan is patch [64, 64, 64], "
            "5 stages, features up to 256)",
            **{k: plans["network"][k] for k in ("patch_size", "batch_size", "features")},
            "optimizer": "AdamW 1e-3, poly",
            "iterations_single": iterations,
            "iterations_multi": 4 * iterations,
            "fold": 0,
            "seeds": list(seeds),
            "spacing": {d: plans["datasets"][d]["target_spacing"] for d in BRAIN4},
        },
        "paradigms": landed,
        "skipped": {p: "recipe not registered yet (its issue is open)" for p in PARADIGMS if p not in RECIPES},
        "runs": runs,
    }


def study_precision(iterations: int) -> dict[str, Any]:
    """Training in bf16 on the CPU (``mosaicseg train --precision mixed``) against float32: the paradigms
    study's single runs on Dataset001 (same plan, iterations, seeds; its float32 runs are reused when present)
    repeated under bf16 autocast. Training seconds and validation pseudo-Dice on every held-out case."""
    from mosaicseg.runtime import native_bf16

    workdir = _brain4_workdir()
    dataset = BRAIN4[0]  # the one dataset this budget learns (the IXI heads stay near Dice 0 at 600 iterations)
    runs = {}
    for seed in (0,) if QUICK else (0, 1):
        for precision in ("auto", "mixed"):
            name = _paradigm_run_name("single", dataset, seed, precision)
            runs[name] = _train_paradigm(workdir, "single", dataset, iterations, seed, precision)
    return {
        "setting": {
            "dataset": dataset,
            "iterations": iterations,
            "network": BRAIN4_NETWORK,
            "optimizer": "AdamW 1e-3, poly",
            "native_bf16": native_bf16(),
        },
        "runs": runs,
    }


def _big_ct(folder: Path, shape_zyx: tuple[int, int, int], tasks: int) -> Path:
    """A one-case CT dataset: HU noise in a body ellipse, ``tasks`` small labelled cubes (so every task has
    foreground), spacing 0.8 x 0.8 x 1.0 mm. Returns the image file."""
    import numpy as np
    import SimpleITK as sitk

    from mosaicseg.atomic import write_json_atomic

    image_path = folder / "imagesTr" / "big_0000.nii.gz"
    if image_path.is_file():
        return image_path
    rng = np.random.default_rng(0)
    z, y, x = shape_zyx
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.45 * y)) ** 2 + ((xx - x / 2) / (0.4 * x)) ** 2 < 1
    ct = np.full(shape_zyx, -1000, np.int16)
    ct[:, body] = rng.normal(40, 30, size=(z, int(body.sum()))).astype(np.int16)
    label = np.zeros(shape_zyx, np.uint8)
    for t in range(tasks):
        cz, cy, cx = z // 2 + (t % 4 - 2) * 20, y // 2 + (t // 4 - 3) * 20, x // 2
        label[cz : cz + 12, cy : cy + 12, cx : cx + 12] = t + 1
    for arr, path in ((ct, image_path), (label, folder / "labelsTr" / "big.nii.gz")):
        path.parent.mkdir(parents=True, exist_ok=True)
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.8, 0.8, 1.0))
        sitk.WriteImage(img, str(path), useCompression=True)
    write_json_atomic(
        folder / "dataset.json",
        {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **{f"organ{t + 1:02d}": t + 1 for t in range(tasks)}},
            "numTraining": 1,
            "file_ending": ".nii.gz",
        },
    )
    return image_path


def study_ensemble(cases_per_dataset: int = 2) -> dict[str, Any]:
    """Universal vs. ensemble (MultiTalent's cost argument): predicting *all* tasks of Dataset001-004 on the
    first held-out cases of each dataset, once with brain4's universal model (``--tasks all``, one pass per
    case) and once with its four single models (four passes per case, each model in its own process as a user
    would run them). Training time is that of the same seed-0 runs of the paradigms-brain4 study: equal iterations, so
    about equal by design.
    """
    runs = WORK / "brain4" / "runs"
    names = ["universal_s0"] + [f"single_{d}_s0" for d in BRAIN4]
    missing = [n for n in names if not (runs / n / "checkpoint_final.pt").is_file()]
    if missing:
        raise SystemExit(f"run the paradigms-brain4 study first (seed 0 runs missing: {', '.join(missing)})")
    rows: dict[str, Any] = {"predict_s": {"universal": 0.0, "ensemble": 0.0}, "per_dataset": {}}
    # quick: hippocampus cases only (the hippocampus model's 1 mm plan takes ~3 minutes per IXI head)
    of = BRAIN4[:1] if QUICK else BRAIN4
    cases_per_dataset = 1 if QUICK else cases_per_dataset
    for dataset in of:
        cases = held_out_cases(WORK / "brain4", dataset)[:cases_per_dataset]
        images, _ = held_out_links(dataset, cases, WORK / "ensemble" / dataset)
        out = WORK / "ensemble" / dataset
        uni = run_cli(
            [
                "predict",
                "--no-largest-component",
                "-m",
                str(runs / "universal_s0"),
                "-i",
                str(images),
                "-o",
                str(out / "universal"),
                "--dataset",
                dataset,
                "--tasks",
                "all",
                "--overwrite",
            ],
            WORK / "logs" / f"ensemble_{dataset}_universal.log",
        )
        ens = [
            run_cli(
                [
                    "predict",
                    "--no-largest-component",
                    "-m",
                    str(runs / f"single_{d}_s0"),
                    "-i",
                    str(images),
                    "-o",
                    str(out / f"single_{d}"),
                    "--overwrite",
                ],
                WORK / "logs" / f"ensemble_{dataset}_single_{d}.log",
            )
            for d in BRAIN4
        ]
        rows["per_dataset"][dataset] = {
            "cases": len(cases),
            "universal_s": uni.seconds,
            "ensemble_s": sum(e.seconds for e in ens),
            "universal_peak_rss_mb": uni.peak_rss_mb,
            "ensemble_peak_rss_mb": max(e.peak_rss_mb for e in ens),
        }
        rows["predict_s"]["universal"] += uni.seconds
        rows["predict_s"]["ensemble"] += sum(e.seconds for e in ens)
    # from the very runs timed above (not paradigms.json, which may hold an earlier study's runs)
    train = {
        "universal": last_metrics(runs / "universal_s0")["elapsed_s"],
        "ensemble": sum(last_metrics(runs / f"single_{d}_s0")["elapsed_s"] for d in BRAIN4),
    }
    return {
        "setting": f"first {cases_per_dataset} held-out cases of each of {', '.join(of)}; all tasks of all "
        "four datasets per case; every predict call in its own process (start-up included), no TTA, CPU",
        **rows,
        "train_s": train,
    }


def study_memory() -> dict[str, Any]:
    """Peak RSS of ``mosaicseg predict`` on a 512 x 512 x 400 CT with a 24-task model (1.5 mm plan, small
    network): cost only, the model is trained for one iteration."""
    root = WORK / "memory"
    shape = (100, 128, 128) if QUICK else (400, 512, 512)
    image = _big_ct(root / "Dataset990_BigCT", shape, 24)
    workdir, run = root / "work", root / "work" / "runs" / "single_1it"
    if not (run / "checkpoint_final.pt").is_file():
        run_cli(
            ["plan", str(image.parents[1]), "-o", str(workdir), "--common-spacing", "1.5", "--overwrite"],
            WORK / "logs" / "memory_plan.log",
        )
        _set_network(workdir / "plans.json", MEMORY_NETWORK)
        run_cli(
            ["train", str(workdir), "--recipe", "single", "--fold", "all", "--iterations", "1", "-o", str(run)],
            WORK / "logs" / "memory_train.log",
        )
    args = [
        "predict",
        "-m",
        str(run),
        "-i",
        str(image),
        "-o",
        str(root / "pred"),
        "--no-largest-component",
        "--overwrite",
        "--tasks",
        "all",
    ]
    done = run_cli(args, WORK / "logs" / "memory_predict.log")
    plans = json.loads((workdir / "plans.json").read_text())
    return {
        "setting": {
            "image": f"{shape[2]} x {shape[1]} x {shape[0]} CT, 0.8 x 0.8 x 1.0 mm, one case",
            "tasks": 24,
            "target_spacing": next(iter(plans["datasets"].values()))["target_spacing"],
            **{k: plans["network"][k] for k in ("patch_size", "features", "batch_size")},
        },
        "target_peak_rss_mb": 4096,
        "predict": {"seconds": done.seconds, "peak_rss_mb": done.peak_rss_mb},
    }


# a small network: the memory study measures the pipeline around it, not the network
MEMORY_NETWORK = {"patch_size": [64, 64, 64], "features": [8, 16, 32, 64], "batch_size": 2}


STUDIES = {
    "partial-labels": study_partial_labels,
    "hippocampus": study_hippocampus,
    "predict": study_predict,
    "memory": study_memory,
    "ensemble": study_ensemble,
    "speed": lambda: __import__("benchmarks.speed", fromlist=["study_speed"]).study_speed(),
    "transfer": lambda: __import__("benchmarks.transfer", fromlist=["study_transfer"]).study_transfer(),
    "fewshot": lambda: __import__("benchmarks.fewshot", fromlist=["study_fewshot"]).study_fewshot(),
    "ka2er": lambda: __import__("benchmarks.ka2er", fromlist=["study_ka2er"]).study_ka2er(),
    "outside": lambda: __import__("benchmarks.outside", fromlist=["study_outside"]).study_outside(),
    "anisotropy": lambda: __import__("benchmarks.anisotropy", fromlist=["study_anisotropy"]).study_anisotropy(),
}


# the order of `quick`: a study that needs another's runs comes after it
QUICK_ORDER = (
    "partial-labels",
    "hippocampus",
    "paradigms-brain4",
    "precision",
    "predict",
    "ensemble",
    "memory",
    "speed",
    "nnunet",
)


def _quick_all(study: Any) -> None:
    """Every study at its smallest setting, from a clean scratch area; a table of what ran and how long."""
    import shutil
    import time

    if not QUICK or WORK.name != "bench-quick":
        raise RuntimeError("the quick check clears its scratch area only")  # never the measured runs
    shutil.rmtree(WORK, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in QUICK_ORDER:
        t0 = time.perf_counter()
        try:
            study(name)
            status = "ok"
        except SystemExit as exc:  # a study's own refusal (e.g. nnunetv2 not installed) names the fix
            status = f"failed: {exc}"
        rows.append((name, time.perf_counter() - t0, status))
        print(f"quick: {name} {status} ({rows[-1][1]:.0f} s)", flush=True)
    report = write_report()
    print("\n".join(f"{n:15s} {sec:7.0f} s  {st}" for n, sec, st in rows))
    print(f"total {sum(r[1] for r in rows):.0f} s; results in {RESULTS}, report {report}")
    if any(st != "ok" for _, _, st in rows):
        raise SystemExit(1)


# studies with settings of their own (the others are in STUDIES)
EXTRA_STUDIES = (
    "paradigms-brain4", "paradigms", "precision", "nnunet", "convergence", "hermes-ablation", "quick", "report"
)  # fmt: skip
# each paradigm's total iterations on mri7 with the collection's plan: the 2-hour universal run's IXI sets first
# reached 0.75 patch-validation Dice together at 7,550 iterations (DeepGrey 0.79, Limbic 0.75, Ventricles 0.79;
# held-out 0.83 / 0.82 / 0.85 at the end, 12,479); at 0.52 s an iteration a multi-dataset run takes about 70
# minutes and the study about 16 CPU-hours. If universal is still below 0.75 on one, the study stops after it and
# says so (benchmarks/paradigms.py)
MRI7_ITERATIONS = 8000


# studies that keep their finished steps in a Ledger: they run even when their results exist (run_study)
LEDGERED = ("anisotropy", "convergence", "fewshot", "hermes-ablation", "ka2er", "paradigms", "transfer")


def main() -> None:
    import os
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "study",
        choices=[*STUDIES, *EXTRA_STUDIES],
    )
    parser.add_argument(
        "--force", action="store_true", help="recompute a finished study (one with a ledger always resumes from it)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="paradigms-brain4, precision: iterations of each single run (default 600); paradigms: each paradigm's "
        f"total (default {MRI7_ITERATIONS})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="the smallest setting, in work/bench-quick (results and report there)"
    )
    parser.add_argument(
        "--budget-min", type=float, default=None, help="nnunet (default 20), convergence (default 30): wall clock"
    )
    parser.add_argument("--collection", default="ixi3", help="convergence: ixi3 or mri7")
    parser.add_argument("--configs", nargs="+", help="convergence: configurations (default: all)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="convergence, paradigms, hermes-ablation: measure at most this many new steps (runs), then stop; the "
        "finished ones are kept in benchmarks/results/ledger/ (committed), so a study spans sittings",
    )
    parser.add_argument("--subset", type=int, help="nnunet: held-out cases scored and timed (default per dataset)")
    parser.add_argument("--datasets", nargs="+", help="nnunet: datasets (default Dataset001 and Dataset003)")
    parser.add_argument("--nnunet-python", help="nnunet: a Python with nnunetv2 (default: this one)")
    args = parser.parse_args()
    if (args.quick or args.study == "quick") and not QUICK:
        # the scratch area is fixed when benchmarks.common is imported: start again with it chosen
        env = {**os.environ, QUICK_ENV: "1"}
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *sys.argv[1:]], env)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps must be at least 1, got {args.steps}")
        from benchmarks.common import Ledger

        Ledger.limit = args.steps

    def study(name: str, force: bool = True) -> None:
        ledgered = name in LEDGERED
        fn = STUDIES.get(name)
        if name in ("paradigms-brain4", "precision"):
            of = study_paradigms if name == "paradigms-brain4" else study_precision

            def fn() -> dict[str, Any]:
                return of(2 if QUICK else args.iterations or 600)

        if name == "paradigms":
            from benchmarks.paradigms import study_paradigms_mri7

            def fn() -> dict[str, Any]:
                return study_paradigms_mri7(14 if QUICK else args.iterations or MRI7_ITERATIONS)

        if name == "nnunet":
            from benchmarks.nnunet import default_nnunet_python, study_nnunet

            python = args.nnunet_python or default_nnunet_python()
            default = ["Dataset001_Hippocampus"] if QUICK else ["Dataset001_Hippocampus", "Dataset003_IXILimbic"]

            def fn() -> dict[str, Any]:
                budget = args.budget_min if args.budget_min is not None else 20
                return study_nnunet(args.datasets or default, python, budget, args.subset, quick=QUICK)

            if args.datasets and sorted(args.datasets) != sorted(default):
                # another set of datasets is a study of its own: the default one's results stay
                name = "nnunet-" + "-".join(sorted(d.split("_")[0].removeprefix("Dataset") for d in args.datasets))

        if name == "hermes-ablation":
            from benchmarks.hermes import study_hermes_ablation

            collection = "mri7" if args.collection == "ixi3" and "--collection" not in sys.argv else args.collection
            its = 2 if QUICK else args.iterations or 600

            def fn() -> dict[str, Any]:
                return study_hermes_ablation(collection, its)

            name = f"hermes-ablation-{collection}-{its}"

        if name == "convergence":
            from benchmarks.convergence import CONFIGS, plot, plot_path, study_convergence

            budget = args.budget_min if args.budget_min is not None else (0.5 if QUICK else 30)

            def fn() -> dict[str, Any]:
                result = study_convergence(args.collection, args.configs or list(CONFIGS), budget)
                plot(result, plot_path(args.collection, budget))
                return result

            name = f"convergence-{args.collection}-{budget:g}m"

        run_study(name, fn, force=force, ledgered=ledgered)

    if args.study == "quick":
        _quick_all(study)
        return
    if args.study != "report":
        study(args.study, force=args.force)
    print(f"updated {write_report()}")


if __name__ == "__main__":
    main()
