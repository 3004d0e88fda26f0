"""``mosaicseg adapt``: few-shot adaptation of a target dataset with a pool of auxiliary datasets (ASAP and its
baselines, :mod:`mosaicseg.training.auxiliary`), the protocol repeated over seeded draws of the shots.

target + auxiliary datasets (folders, or dataset names looked up in the data roots: :func:`resolve_datasets`)
→ one collection planned into the work folder on the source model's network (or its own plan from scratch) and
preprocessed → a fixed evaluation subset of the target (``eval_cases`` drawn once with the seed, or a given
list) → per fold ``f``: ``shots`` target cases drawn from the rest with seed ``(seed, f)``, at most
``aux_cases`` cases of every auxiliary dataset (drawn once) → the ``adapt`` recipe for ``turns`` turns
(``init_from`` the source) → prediction of the evaluation cases in their original geometry → the evaluator's
Dice and IoU → ``OUT/summary.json`` (per fold and mean ± sd), with each fold's wall time and peak RSS
(:func:`run_adaptation`). Every fold's finished run is reused when run again (its settings checked); an
interrupted fold resumes from its latest checkpoint, and one stopped before any checkpoint starts again.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
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

    target: str  # a dataset folder (nnU-Net raw), or a dataset name (resolve_datasets)
    shots: int
    source: str | None = None  # a run, checkpoint or bundle; None: from scratch
    aux: list[str] = field(default_factory=list)  # dataset folders or names
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
    data_root: str | None = None  # where dataset names are looked up first (resolve_datasets)


def _dataset_name(folder: Path) -> str:
    return folder.resolve().name


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only mean a path (a separator, or a leading ``.`` or ``~``), never a dataset name."""
    return "/" in spec or "\\" in spec or spec.startswith((".", "~"))


def data_roots(s: AdaptSettings, ckpt: dict[str, Any] | None, workdir: Path) -> list[Path]:
    """The folders a dataset name is looked up in, first match wins: ``s.data_root`` (``--data-root``, or
    ``MOSAICSEG_DATA_ROOT``); the folders holding the datasets given as paths in this request; the source
    model's collection root and its datasets' folders; the folders of the datasets already planned into
    ``workdir``. Only folders that exist; each once."""
    found: list[Path] = []
    if s.data_root is not None:
        found.append(Path(s.data_root).expanduser())
    found += [Path(x).expanduser().resolve().parent for x in (s.target, *s.aux) if Path(x).expanduser().is_dir()]
    collections = [ckpt["plans"].get("collection") or {}] if ckpt is not None else []
    if (workdir / "plans.json").is_file():
        collections.append(json.loads((workdir / "plans.json").read_text()).get("collection") or {})
    for c in collections:
        # the source's collection root holds datasets its model never saw (e.g. the few-shot target)
        found += [Path(c["root"])] if c.get("root") else []
        found += [Path(d["path"]).parent for d in c.get("datasets", []) if d.get("path")]
    return [r for r in dict.fromkeys(p.resolve() for p in found) if r.is_dir()]


def resolve_dataset(spec: str, roots: list[Path], flag: str) -> str:
    """The folder ``spec`` names: an existing folder as given, else a dataset in the first of ``roots`` that has
    it, by its folder name (``Dataset001_Hippocampus``), its number (``001``, ``1``) or ``Dataset001``."""
    if Path(spec).expanduser().is_dir():
        return spec
    if _looks_like_path(spec):
        raise MosaicSegError(f"{flag} {spec}: no such folder. Fix: give an existing dataset folder or a dataset name.")
    if not roots:
        raise MosaicSegError(
            f"{flag} {spec}: not a folder, and there is no data root to look the dataset name up in (no "
            "--data-root, no source model with a collection, no dataset given as a path). Fix: pass the dataset "
            "folder's path, or --data-root DIR (or MOSAICSEG_DATA_ROOT) of the folder holding it."
        )
    number = re.fullmatch(r"(?:Dataset)?(\d{1,3})", spec)
    for root in roots:
        if number is None:
            if (root / spec / "dataset.json").is_file():
                return str(root / spec)
            continue
        prefix = f"Dataset{int(number.group(1)):03d}_"
        hits = sorted(p for p in root.glob(f"{prefix}*") if (p / "dataset.json").is_file())
        if len(hits) > 1:
            raise MosaicSegError(
                f"{flag} {spec}: {root} holds {len(hits)} datasets numbered {prefix[7:10]} "
                f"({', '.join(p.name for p in hits)}). Fix: give the full dataset name or its path."
            )
        if hits:
            return str(hits[0])
    known = sorted({p.name for r in roots for p in r.glob("Dataset*") if (p / "dataset.json").is_file()})
    close = difflib.get_close_matches(spec, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise MosaicSegError(
        f"{flag} {spec}: no dataset of that name or number in the data roots {[str(r) for r in roots]} (they hold "
        f"{known[:12]}). Fix: {hint}give a dataset name listed there, or the dataset folder's path."
    )


def resolve_datasets(s: AdaptSettings, ckpt: dict[str, Any] | None, workdir: Path) -> AdaptSettings:
    """``s`` with its target and auxiliary datasets as folders (names looked up in :func:`data_roots`)."""
    roots = data_roots(s, ckpt, workdir)
    if s.data_root is not None and not Path(s.data_root).expanduser().is_dir():
        raise MosaicSegError(f"--data-root {s.data_root}: no such folder. Fix: give the folder holding the datasets.")
    return replace(
        s,
        target=resolve_dataset(s.target, roots, "--target"),
        aux=[resolve_dataset(a, roots, "--aux") for a in s.aux],
    )


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


def fold_config(
    s: AdaptSettings, fold: int, target: str, shots: list[str], aux_ids: dict[str, list[str]], arms: list[Any]
) -> TrainConfig:
    """Fold ``fold``'s training settings: the ``adapt`` recipe on the shots (and the auxiliary cases), the
    preset's optimiser, learning rate, weight decay and batch (None: the plan's)."""
    preset = ADAPT_PRESETS[s.preset]
    return TrainConfig(
        recipe="adapt",
        fold="all",
        # finetune trains on the target alone: the pool's cases are not its training cases
        train_case_ids={target: shots, **(aux_ids if s.strategy != "finetune" else {})},
        iterations=s.turns,
        iterations_per_epoch=min(s.iterations_per_epoch, s.turns),
        val_every=10**6,  # evaluated in the original geometry by run_adaptation
        seed=s.seed + fold,
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


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window: on Linux writing 5 to ``/proc/self/clear_refs`` sets ``VmHWM`` back to the
    current RSS. False where the platform cannot (the peak is then the process's since it started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` (since the last :func:`reset_peak_rss`), else
    ``ru_maxrss`` (since the process started; KiB on Linux, bytes on macOS). Training and prediction run in
    this process (the adapt folds use no loader workers), so nothing of a fold is left out."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _check_reuse(run: Path, cfg: TrainConfig) -> None:
    """A fold run left by an earlier call is reused or resumed only if it was asked the same."""
    saved = run / "config.json"
    if not (run / "checkpoint_final.pt").is_file() and not (run / "checkpoint_latest.pt").is_file():
        return
    if not saved.is_file():
        return  # written at the start of every training session: a run without it was not made by adapt
    before = json.loads(saved.read_text())["train_config"]
    now = json.loads(json.dumps(cfg.to_dict()))
    if before != now:
        diff = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
        raise MosaicSegError(
            f"{run}: holds this fold's run with other settings ({', '.join(diff)}). Fix: repeat the earlier "
            "command's settings to reuse or resume it, or give another -o/--output."
        )


def _train_fold(
    workdir: Path, cfg: TrainConfig, run: Path, ckpt: dict[str, Any] | None, progress: bool, log: Any, what: str
) -> None:
    """Train (or resume) one fold, adding the session's wall time and peak RSS to ``RUN/resources.json``."""
    from mosaicseg.training.loop import Trainer

    resume = (run / "checkpoint_latest.pt").is_file()
    if not resume:
        # nothing to resume: leftovers of a session killed before its first checkpoint (arms.jsonl, a
        # metrics.jsonl line) would make the Trainer refuse the folder, and their time is lost work
        (run / "resources.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    trainer = Trainer(workdir, cfg, run, resume=resume, overwrite=not resume, progress=progress, source=ckpt)
    log(f"{what} → {run}" + (f" (resumed at turn {trainer.iteration})" if resume else ""))
    trainer.fit()
    stopped = trainer.stop_requested
    del trainer
    before = _read_json(run / "resources.json")
    write_json_atomic(
        run / "resources.json",
        {
            "train_wall_s": before.get("train_wall_s", 0.0) + time.perf_counter() - t0,
            "train_peak_rss_mb": max(before.get("train_peak_rss_mb", 0.0), peak_rss_mb()),
            "sessions": before.get("sessions", 0) + 1,
        },
    )
    if stopped:
        raise MosaicSegError(f"{run}: stopped. Fix: run the same command again to resume.")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_adaptation(
    s: AdaptSettings,
    workdir: str | Path,
    output: str | Path,
    *,
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """See the module docstring; returns (and writes) ``OUT/summary.json``.

    Per fold: ``wall_s`` = its training sessions' wall time (set-up, ASAP's initial pass and the turns, summed
    over resumed sessions, from ``RUN/resources.json``) + this call's prediction and evaluation (``predict_s``);
    ``train_s`` = the Trainer's own clock of the turns alone; ``peak_rss_mb`` = the highest resident memory of
    its training sessions and of its prediction (``peak_rss_scope`` "fold" where the platform resets the peak
    between folds, else "process": the process's peak so far)."""
    from mosaicseg.data.workdir import list_cases, load_vocabulary
    from mosaicseg.evaluation.report import evaluate_folders
    from mosaicseg.inference.bundle import read_model
    from mosaicseg.inference.predictor import Predictor

    workdir, output = Path(workdir), Path(output)
    t_start = time.perf_counter()
    ckpt = read_model(s.source) if s.source else None
    s = resolve_datasets(s, ckpt, workdir)
    check_request(s)
    prepare_workdir(s, workdir, ckpt, progress=progress)
    prepare_s = time.perf_counter() - t_start
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
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "settings.json", {**asdict(s), "arms": arms, "aux_case_ids": aux_ids})
    raw = Path(s.target)
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    folds = []
    for f in range(s.folds):
        shots = draw_shots(pool, s.shots, s.seed, f)
        held_out = evaluation or [c for c in pool if c not in set(shots)]
        run = output / f"fold_{f}"
        cfg = fold_config(s, f, target, shots, aux_ids, arms)
        _check_reuse(run, cfg)
        scoped = reset_peak_rss()  # this fold's peak, not the folds' before it
        if not (run / "checkpoint_final.pt").is_file():
            what = f"fold {f}: {s.strategy}, {len(shots)} shots {shots}, {len(arms)} arms, {s.turns} turns"
            _train_fold(workdir, cfg, run, ckpt, progress, log, what)
        metrics = (run / "metrics.jsonl").read_text().splitlines()
        resources = _read_json(run / "resources.json")
        train_s = float(json.loads(metrics[-1])["elapsed_s"]) if metrics else math.nan
        t0 = time.perf_counter()
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
        del predictor
        summary = evaluate_folders(
            run / "pred", reference, raw / "dataset.json", output_dir=run / "eval", overwrite=True, progress=False
        )
        predict_s = time.perf_counter() - t0
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
                # a fold trained before resources.json existed: its turns' clock is the best account left
                "wall_s": resources.get("train_wall_s", train_s) + predict_s,
                "predict_s": predict_s,
                "peak_rss_mb": max(resources.get("train_peak_rss_mb", 0.0), peak_rss_mb()),
                "peak_rss_scope": "fold" if scoped else "process",
                "training_sessions": resources.get("sessions"),
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
        "wall_s": _mean_sd([x["wall_s"] for x in folds]),
        "prepare_s": prepare_s,  # this call's planning and preprocessing (reused work is quick)
        "peak_rss_mb": max(x["peak_rss_mb"] for x in folds),  # the highest fold's
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
