"""``mosaicseg demo``: the whole pipeline on the synthetic collection, end to end, on CPU.

synthetic collection → plan + preprocess → universal (MultiTalent) training on fold 0 → prediction of every
dataset's held-out raw files → evaluation against their reference labels → one per-dataset Dice table.
Every stage writes under ``workdir`` and is reused when run again (generation and preprocessing are
resumable; training resumes or is skipped when finished; existing predictions are kept).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mosaicseg.atomic import write_json_atomic
from mosaicseg.config import TrainConfig
from mosaicseg.data.collection import open_collection
from mosaicseg.data.fingerprint import plan
from mosaicseg.data.preprocess import preprocess
from mosaicseg.data.synthetic import generate_collection
from mosaicseg.errors import MosaicSegError


def run_demo(
    workdir: str | Path = "work/demo",
    *,
    dim: int = 2,
    seed: int = 0,
    iterations: int | None = None,
    time_budget_s: float | None = None,
    iterations_per_epoch: int = 100,
    overwrite: bool = False,
    missing_labels: str = "ignore",
    progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Run the demo; returns the cross-dataset summary (see :func:`mosaicseg.evaluation.summarise`).

    The default budget is 400 iterations for 2D (about a minute on 2 CPU cores) and 1500 for 3D.
    """
    from mosaicseg.evaluation.report import evaluate_folders, format_table, summarise
    from mosaicseg.inference.predictor import Predictor
    from mosaicseg.training.loop import Trainer

    if iterations is None and time_budget_s is None:
        iterations = 400 if dim == 2 else 1500
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise MosaicSegError(f"{workdir}: is a file, not a folder. Fix: choose another demo folder.")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    collection = generate_collection(workdir / "data", dim=dim, seed=seed)
    opened = open_collection(collection)
    timings["generate_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    plan_dir = workdir / "plan"
    plan(collection, plan_dir, progress=progress, overwrite=True)
    preprocess(plan_dir, progress=progress)
    timings["plan_preprocess_s"] = time.perf_counter() - t
    log(
        f"planned and preprocessed {sum(len(m.cases) for m in opened.manifests)} cases in "
        f"{timings['plan_preprocess_s']:.1f} s"
    )

    t = time.perf_counter()
    config = TrainConfig(
        recipe="universal",
        optimizer="adamw",
        iterations=iterations,
        time_budget_s=time_budget_s,
        iterations_per_epoch=iterations_per_epoch,
        seed=seed,
        device="auto",
        missing_labels=missing_labels,
    )
    run_dir = workdir / "run" / "fold_0"
    resume = (run_dir / "checkpoint_latest.pt").is_file() and not overwrite
    trainer = Trainer(plan_dir, config, run_dir, resume=resume, overwrite=overwrite, progress=progress)
    log(
        f"training universal model: {len(trainer.train_cases)} training cases, {trainer.total_iterations or '-'} "
        f"iterations, patch {list(trainer.patch_size)}, batch {trainer.batch_size} → {run_dir}"
    )
    trainer.fit()
    if trainer.stop_requested:  # SIGINT/SIGTERM: the trainer saved its state; there is no final model to predict with
        log(
            f"training stopped at iteration {trainer.iteration} by an interrupt; {run_dir / 'checkpoint_latest.pt'} "
            "is kept: run the same demo command again to resume"
        )
        raise KeyboardInterrupt
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    predictor = Predictor.from_checkpoint(
        run_dir, device=config.device if config.device != "auto" else trainer.device.type
    )
    rows: list[dict[str, Any]] = []
    per_case_s: list[float] = []
    held_out: dict[str, set[str]] = {}
    for d, c in trainer.val_cases:
        held_out.setdefault(d, set()).add(c)
    for manifest in opened.manifests:
        ids = held_out.get(manifest.name, set())
        if not ids:
            continue
        cases = [c for c in manifest.cases if c.case_id in ids]
        pred_dir = workdir / "predictions" / manifest.name
        report = predictor.predict_files(
            [f for c in cases for f in c.images],
            pred_dir,
            dataset=manifest.name,
            overwrite=overwrite,
            progress=progress,
        )
        per_case_s += [c["seconds"] for c in report["cases"]]
        ref_dir = workdir / "reference" / manifest.name
        ref_dir.mkdir(parents=True, exist_ok=True)
        for c in cases:
            link = ref_dir / c.label.name
            if not link.exists():
                link.symlink_to(c.label.resolve())
        summary = evaluate_folders(
            pred_dir,
            ref_dir,
            manifest.folder / "dataset.json",
            progress=False,
            overwrite=True,
            output_dir=workdir / "evaluation" / manifest.name,
        )
        rows += [dict(r, dataset=manifest.name) for r in summary["cases"]]
    timings["predict_evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    result = summarise(rows)
    result["timings"] = timings
    result["predict_s_per_case"] = sum(per_case_s) / len(per_case_s) if per_case_s else None
    write_json_atomic(workdir / "demo_summary.json", json.loads(json.dumps(result, default=str)))
    log(format_table(result))
    log(
        f"demo finished in {timings['total_s']:.0f} s (train {timings['train_s']:.0f} s) → "
        f"{workdir / 'demo_summary.json'}"
    )
    return result
