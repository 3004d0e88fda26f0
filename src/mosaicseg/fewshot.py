"""``mosaicseg adapt``: few-shot adaptation of a target dataset with a pool of auxiliary datasets (ASAP and its
baselines, :mod:`mosaicseg.training.auxiliary`), the protocol repeated over seeded draws of the shots.

target + auxiliary datasets → one collection planned into the work folder on the source model's network (or
its own plan from scratch) and preprocessed → a fixed evaluation subset of the target (``eval_cases`` drawn
once with the seed, or a given list) → per fold ``f``: ``shots`` target cases drawn from the rest with seed
``(seed, f)``, at most ``aux_cases`` cases of every auxiliary dataset (drawn once) → the ``adapt`` recipe for
``turns`` turns (``init_from`` the source) → prediction of the evaluation cases in their original geometry →
the evaluator's Dice and IoU → ``OUT/summary.json`` (per fold and mean ± sd), with wall time and peak RSS.
Every fold's run, predictions and evaluation are reused when run again; an interrupted run resumes.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mosaicseg.atomic import write_json_atomic
from mosaicseg.config import TrainConfig, parse_collection
from mosaicseg.errors import MosaicSegError

# the paper's settings (Yang et al., sec. 3.1: Adam-type, lr 3e-4, weight decay 1e-7, batch 4) and this
# machine's: the same optimiser with the plan's batch (2 on the CPU plans), which a 2-core CPU can afford
ADAPT_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-7, "batch_size": 4},
    "cpu": {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-7, "batch_size": None},
}


@dataclass
class AdaptSettings:
    """What ``mosaicseg adapt`` was asked (saved in ``OUT/settings.json``)."""

    target: str  # a dataset folder (nnU-Net raw)
    shots: int
    source: str | None = None  # a run, checkpoint or bundle; None: from scratch
    aux: list[str] = field(default_factory=list)  # dataset folders
    aux_cases: int = 30
    split_by_label: bool = False
    strategy: str = "asap"
    turns: int = 500
    folds: int = 3
    eval_cases: int | None = None  # a fixed evaluation subset of this many target cases (None: all the rest)
    eval_list: list[str] | None = None  # or these case ids
    preset: str = "cpu"
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    alpha: float = 0.5
    alpha_schedule: str = "linear"
    beta: float = 0.1
    reward_loss: str = "normalized"
    iterations_per_epoch: int = 50


def _dataset_name(folder: Path) -> str:
    return folder.resolve().name


def check_request(s: AdaptSettings) -> None:
    """Refuse what cannot work before anything is planned or trained (each problem names its fix)."""
    from mosaicseg.training.auxiliary import STRATEGIES

    target = Path(s.target)
    if not (target / "dataset.json").is_file():
        raise MosaicSegError(f"{target}: no dataset.json. Fix: --target takes a dataset folder in nnU-Net raw format.")
    labels = json.loads((target / "dataset.json").read_text()).get("labels", {})
    if not [k for k, v in labels.items() if k != "background" and v != 0] or not (target / "labelsTr").is_dir():
        raise MosaicSegError(
            f"{target}: the target has no labels (dataset.json labels besides background, and labelsTr/). Fix: "
            "few-shot adaptation needs labelled target cases."
        )
    if s.strategy not in STRATEGIES:
        raise MosaicSegError(f"--strategy {s.strategy!r} is unknown. Fix: use one of {', '.join(STRATEGIES)}.")
    if s.strategy != "finetune" and not s.aux:
        raise MosaicSegError(f"--strategy {s.strategy} needs an auxiliary pool. Fix: give --aux DATASET (repeat).")
    names = [_dataset_name(Path(a)) for a in s.aux]
    if _dataset_name(target) in names:
        raise MosaicSegError(f"{target}: the target is also in the auxiliary pool. Fix: leave it out of --aux.")
    for a in s.aux:
        if not (Path(a) / "dataset.json").is_file():
            raise MosaicSegError(f"{a}: no dataset.json. Fix: --aux takes dataset folders in nnU-Net raw format.")
    if s.shots < 1 or s.folds < 1 or s.turns < 1 or s.aux_cases < 1:
        raise MosaicSegError("--shots, --folds, --turns and --aux-cases must be at least 1. Fix them.")
    if s.preset not in ADAPT_PRESETS:
        raise MosaicSegError(f"--preset {s.preset!r} is unknown. Fix: use one of {', '.join(ADAPT_PRESETS)}.")


def prepare_workdir(s: AdaptSettings, workdir: Path, ckpt: dict[str, Any] | None, progress: bool = True) -> Path:
    """The target and the auxiliary datasets planned as one collection (on the source's network) and
    preprocessed; a 2D dataset next to 3D ones is refused by the plan."""
    from mosaicseg.data.fingerprint import plan
    from mosaicseg.data.preprocess import preprocess
    from mosaicseg.training.procedures import source_network

    folders = [Path(s.target).resolve(), *(Path(a).resolve() for a in s.aux)]
    collection = parse_collection(
        {"name": f"adapt_{_dataset_name(folders[0])}", "datasets": [{"path": str(f)} for f in folders]},
        base=workdir.resolve(),
    )
    network = source_network(ckpt) if ckpt is not None else None
    device = ckpt["plans"].get("device", "cpu") if ckpt is not None else "cpu"
    plan(collection, workdir, network=network, device=device, progress=progress)  # type: ignore[arg-type]
    preprocess(workdir, progress=progress)
    return workdir


def split_target(cases: list[str], s: AdaptSettings) -> tuple[list[str], list[str]]:
    """The fixed evaluation cases and the pool the shots are drawn from (disjoint)."""
    if s.eval_list is not None:
        unknown = sorted(set(s.eval_list) - set(cases))
        if unknown:
            raise MosaicSegError(f"--eval-list names cases the target does not have: {unknown[:5]}. Fix the list.")
        evaluation = sorted(set(s.eval_list))
    elif s.eval_cases is not None:
        if s.eval_cases >= len(cases):
            raise MosaicSegError(
                f"--eval-cases {s.eval_cases}: the target has {len(cases)} cases and needs some for the shots. Fix: "
                "fewer evaluation cases."
            )
        evaluation = sorted(np.random.default_rng((s.seed, 1)).choice(cases, s.eval_cases, replace=False).tolist())
    else:
        evaluation = []
    pool = [c for c in cases if c not in set(evaluation)]
    if not evaluation and s.shots >= len(cases):
        raise MosaicSegError(
            f"--shots {s.shots}: the target has {len(cases)} labelled cases; at least one must stay out for the "
            "evaluation. Fix: fewer shots."
        )
    if s.shots > len(pool):
        raise MosaicSegError(f"--shots {s.shots}: only {len(pool)} target cases are not evaluation cases. Fix: fewer.")
    return evaluation, pool


def draw_shots(pool: list[str], shots: int, seed: int, fold: int) -> list[str]:
    """Fold ``fold``'s shots: ``shots`` of ``pool`` drawn with ``(seed, fold)``, sorted."""
    return sorted(np.random.default_rng((seed, 0, fold)).choice(sorted(pool), shots, replace=False).tolist())


def arms_for(vocabulary: Any, datasets: list[str], split_by_label: bool) -> list[list[str | None]]:
    """``[dataset, None]`` per auxiliary dataset, or ``[dataset, label]`` per label of each."""
    if not split_by_label:
        return [[d, None] for d in datasets]
    return [[d, label] for d in datasets for _, label, _ in vocabulary.dataset_tasks(d)]


def run_adaptation(
    s: AdaptSettings,
    workdir: str | Path,
    output: str | Path,
    *,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """See the module docstring; returns (and writes) ``OUT/summary.json``."""
    from mosaicseg.data.workdir import list_cases, load_vocabulary
    from mosaicseg.evaluation.report import evaluate_folders
    from mosaicseg.inference.bundle import read_model
    from mosaicseg.inference.predictor import Predictor
    from mosaicseg.training.loop import Trainer

    check_request(s)
    workdir, output = Path(workdir), Path(output)
    ckpt = read_model(s.source) if s.source else None
    prepare_workdir(s, workdir, ckpt, progress=progress)
    vocabulary = load_vocabulary(workdir)
    target = _dataset_name(Path(s.target))
    aux = [_dataset_name(Path(a)) for a in s.aux]
    cases = list_cases(workdir)
    evaluation, pool = split_target(cases[target], s)
    aux_ids = {
        d: sorted(np.random.default_rng((s.seed, 2, i)).permutation(cases[d])[: s.aux_cases].tolist())
        for i, d in enumerate(aux)
    }
    arms = arms_for(vocabulary, aux, s.split_by_label)
    preset = ADAPT_PRESETS[s.preset]
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "settings.json", {**asdict(s), "arms": arms, "aux_case_ids": aux_ids})
    raw = Path(s.target)
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    folds = []
    for f in range(s.folds):
        shots = draw_shots(pool, s.shots, s.seed, f)
        held_out = evaluation or [c for c in pool if c not in set(shots)]
        run = output / f"fold_{f}"
        cfg = TrainConfig(
            recipe="adapt",
            fold="all",
            # finetune trains on the target alone: the pool's cases are not its training cases
            train_case_ids={target: shots, **(aux_ids if s.strategy != "finetune" else {})},
            iterations=s.turns,
            iterations_per_epoch=min(s.iterations_per_epoch, s.turns),
            val_every=10**6,  # evaluated below, in the original geometry
            seed=s.seed + f,
            optimizer=preset["optimizer"],
            lr=s.lr if s.lr is not None else preset["lr"],
            weight_decay=preset["weight_decay"],
            batch_size=preset["batch_size"],
            device=s.device,
            amp=s.amp,
            init_from=str(s.source) if s.source else None,
            recipe_options={
                "strategy": s.strategy, "target": target, "arms": arms, "alpha": s.alpha,
                "alpha_schedule": s.alpha_schedule, "beta": s.beta, "reward_loss": s.reward_loss,
            },
        )  # fmt: skip
        t0 = time.perf_counter()
        if not (run / "checkpoint_final.pt").is_file():
            resume = (run / "checkpoint_latest.pt").is_file()
            trainer = Trainer(workdir, cfg, run, resume=resume, overwrite=False, progress=progress, source=ckpt)
            log(f"fold {f}: {s.strategy}, {len(shots)} shots {shots}, {len(arms)} arms, {s.turns} turns → {run}")
            trainer.fit()
            if trainer.stop_requested:
                raise MosaicSegError(f"{run}: stopped. Fix: run the same command again to resume.")
            del trainer
        metrics = (run / "metrics.jsonl").read_text().splitlines()
        train_s = float(json.loads(metrics[-1])["elapsed_s"]) if metrics else time.perf_counter() - t0
        images = [p for c in held_out for p in sorted((raw / "imagesTr").glob(f"{c}_*{ending}"))]
        reference = output / f"fold_{f}" / "reference"
        reference.mkdir(parents=True, exist_ok=True)
        for c in held_out:
            link = reference / f"{c}{ending}"
            if not link.exists():
                link.symlink_to((raw / "labelsTr" / f"{c}{ending}").resolve())
        predictor = Predictor.from_checkpoint(
            run / "checkpoint_final.pt", device="cpu" if s.device == "auto" else s.device
        )
        predictor.predict_files(images, run / "pred", dataset=target, overwrite=True, progress=progress)
        summary = evaluate_folders(
            run / "pred", reference, raw / "dataset.json", output_dir=run / "eval", overwrite=True, progress=False
        )
        mean = summary["mean_class_averaged"]
        folds.append(
            {
                "fold": f,
                "shots": shots,
                "evaluation_cases": len(held_out),
                "dice": mean["dice"],
                "iou": mean["iou"],
                "labels": {k: v["dice"]["mean"] for k, v in summary["datasets"][target]["labels"].items()},
                "train_s": train_s,
                "arms_log": str(run / "arms.jsonl") if (run / "arms.jsonl").is_file() else None,
            }
        )
        log(f"fold {f}: Dice {mean['dice']:.4f}, IoU {mean['iou']:.4f} on {len(held_out)} cases")
    result = {
        "settings": {**asdict(s), "arms": [a[0] if a[1] is None else f"{a[0]}/{a[1]}" for a in arms]},
        "target": target,
        "evaluation": "fixed" if evaluation else "each fold's remaining cases",
        "folds": folds,
        "dice": _mean_sd([x["dice"] for x in folds]),
        "iou": _mean_sd([x["iou"] for x in folds]),
        "train_s": _mean_sd([x["train_s"] for x in folds]),
        "peak_rss_mb": max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        )
        / 1024,
    }
    write_json_atomic(output / "summary.json", result)
    return result


def _mean_sd(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return {
        "mean": statistics.mean(finite) if finite else math.nan,
        "sd": statistics.stdev(finite) if len(finite) > 1 else 0.0,
        "n": len(finite),
    }
