"""``python -m benchmarks nnunet``: MosaicSeg and nnU-Net v2 side by side on the same machine, fold and cases.

Per dataset, on fold 0 of MosaicSeg's split (written into nnU-Net's ``splits_final.json``):

- **equal iterations** (i): nnU-Net's stock 3d_fullres plan trained for ``iterations`` by a trainer subclass
  (nnU-Net's extension mechanism), and MosaicSeg trained for as many iterations with *that* plan's network,
  patch, batch and spacing, and nnU-Net's optimiser and learning rate (SGD-Nesterov, momentum 0.99, 1e-2: the
  stock schedule's rate over the first 250 iterations, whose poly decay runs over 1000 epochs);
- **equal wall clock** (ii): each tool with its own best CPU plan for ``budget`` minutes: nnU-Net's stock plan
  (iterations = budget / its measured s per iteration), MosaicSeg's ``train`` defaults on its own plan, nothing
  typed but the budget (validation switched off on both sides: training time only);
- on the same fixed subset of held-out cases: Dice of every run by one evaluator (``mosaicseg evaluate``),
  prediction s/case with and without mirroring TTA and each process's peak RSS.

nnU-Net runs in the Python named by ``--nnunet-python`` (default: this one), through ``nnunet_runner.py``.
Every finished step is cached in ``work/bench/nnunet*/steps.json``, so the study can span sittings; a dataset's
steps made with another setting (iterations, schedule) are moved to ``superseded`` there and recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    SHARED,
    WORK,
    CliRun,
    evaluate,
    held_out_cases,
    held_out_links,
    plain_network,
    run_cli,
)

RUNNER = ROOT / "benchmarks" / "nnunet_runner.py"

# per dataset: nnU-Net's numeric id, iterations of the equal-iteration comparison, held-out cases scored and
# timed (the first ones of fold 0), MosaicSeg's CPU plan for the equal-time comparison (None: the plan as
# `mosaicseg plan` makes it)
SETTINGS: dict[str, dict[str, Any]] = {
    # 250: nnU-Net's shortest stock trainer (one epoch), whose validation Dice the issue quotes (0.82 with TTA)
    "Dataset001_Hippocampus": {"id": 1, "iterations": 250, "cases": 20},
    "Dataset002_IXIDeepGrey": {
        "id": 2,
        "iterations": 20,
        "cases": 4,
    },
    "Dataset003_IXILimbic": {
        "id": 3,
        "iterations": 20,
        "cases": 4,  # whole 1 mm heads: nnU-Net's TTA prediction takes minutes per case on 2 cores
    },
}


QUICK_BUDGET_MIN = 0.25
# nnU-Net's stock epoch; its stock learning rate is 1e-2 throughout the first one (poly over 1000 epochs)
STOCK_EPOCH = 250
# what the cached steps of a dataset were made with: a change recomputes them (the old ones are kept on record)
SCHEDULE = (
    "SGD-Nesterov 1e-2, nnU-Net's stock schedule (epochs of 250 iterations, poly over 1000 epochs: 1e-2 throughout "
    "the first), MosaicSeg constant"
)


class Steps:
    """Finished steps of the study, kept on disk (``steps.json``) so that a killed study resumes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, key: str, fn: Any) -> Any:
        if key not in self.data:
            print(f"nnunet study: {key}", flush=True)
            self.data[key] = fn()
            self.save()
        return self.data[key]

    def require(self, dataset: str, setting: dict[str, Any]) -> bool:
        """Keep ``dataset``'s cached steps only if they were made with ``setting``; otherwise move them to
        ``superseded`` (their figures stay on record) and return True: the study recomputes them."""
        key = f"{dataset}/setting"
        if self.data.get(key, setting) != setting or (key not in self.data and self._trained(dataset)):
            old = {k: v for k, v in self.data.items() if k.startswith(dataset + "/") and not k.endswith("_plan_s")}
            self.data.setdefault("superseded", []).append(old)
            for k in old:
                del self.data[k]
            print(f"nnunet study: {dataset}'s setting changed, its steps are recomputed", flush=True)
            changed = True
        else:
            changed = False
        self.data[key] = setting
        self.save()
        return changed

    def _trained(self, dataset: str) -> bool:
        return any(k.startswith(f"{dataset}/") and "_train_" in k for k in self.data)

    def save(self) -> None:
        from mosaicseg.atomic import write_json_atomic

        write_json_atomic(self.path, self.data)


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> CliRun:
    """Run ``cmd`` with ``env``; wall seconds and the peak RSS of that process tree's largest process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {code}); see {log}")
    return CliRun(time.perf_counter() - t0, usage.ru_maxrss / 1024)


def _raw_dataset(raw: Path, dataset: str) -> None:
    """nnU-Net's raw folder as links to the shared data (never copies), with a dataset.json whose
    ``numTraining`` counts the cases present."""
    target = raw / dataset
    target.mkdir(parents=True, exist_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        if not (target / sub).exists():
            (target / sub).symlink_to(SHARED / dataset / sub)
    meta = json.loads((SHARED / dataset / "dataset.json").read_text())
    meta["numTraining"] = len(list((SHARED / dataset / "labelsTr").glob(f"*{meta['file_ending']}")))
    (target / "dataset.json").write_text(json.dumps(meta, indent=1))


def _canonical_axes(images: Path, file_ending: str) -> list[int]:
    """For each axis of MosaicSeg's canonical grid, the axis of the stored image it comes from (in the file's
    own ``(X, Y, Z)`` index order, which nnU-Net keeps, reversed). MosaicSeg reorients every image to
    ``CANONICAL_ORIENTATION``; nnU-Net does not: e.g. IXI heads are stored PSR, 120×120×90, and are 90×120×120 in
    MosaicSeg's LPS grid, so nnU-Net's patch must be permuted, not only reversed, to cover the same anatomy."""
    import SimpleITK as sitk

    from mosaicseg.data.io import CANONICAL_ORIENTATION

    orientations = set()
    for path in sorted(images.glob(f"*{file_ending}")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # the header only
        orientations.add(sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection()))
    if len(orientations) != 1:
        raise SystemExit(
            f"{images}: its images are stored in several orientations ({sorted(orientations)}); nnU-Net's one "
            "patch then covers different anatomy per case and the study cannot map it to MosaicSeg's grid"
        )
    stored = orientations.pop()
    pairs = ("LR", "PA", "SI")
    axis_of = {next(p for p in pairs if letter in p): i for i, letter in enumerate(stored)}
    return [axis_of[next(p for p in pairs if letter in p)] for letter in CANONICAL_ORIENTATION]


def _nnunet_network(plans: dict[str, Any], axes: list[int]) -> tuple[dict[str, Any], list[float]]:
    """nnU-Net's 3d_fullres network in MosaicSeg's plan terms, and its spacing, in MosaicSeg's axis order.

    nnU-Net works on SimpleITK arrays ``(Z, Y, X)`` of the stored image; MosaicSeg on ``(X, Y, Z)`` of the image
    reoriented to its canonical grid: every per-axis list is reversed, then permuted by ``axes``
    (:func:`_canonical_axes`). The study's datasets have no nnU-Net transposition (``transpose_forward`` =
    ``[0, 1, 2]``)."""
    config = plans["configurations"]["3d_fullres"]
    if plans.get("transpose_forward", [0, 1, 2]) != [0, 1, 2]:
        raise SystemExit("nnU-Net transposes this dataset's axes; the study does not map that case")

    def ours(zyx: list[Any]) -> list[Any]:
        xyz = list(zyx)[::-1]
        return [xyz[a] for a in axes]

    arch = config["architecture"]["arch_kwargs"]
    network = {
        "patch_size": ours(config["patch_size"]),
        "batch_size": config["batch_size"],
        "features": list(arch["features_per_stage"]),
        "kernel_sizes": [ours(k) for k in arch["kernel_sizes"]],
        "strides": [ours(s) for s in arch["strides"]],
        "num_stages": arch["n_stages"],
    }
    return network, [float(s) for s in ours(config["spacing"])]


def _mosaicseg_workdir(workdir: Path, dataset: str, network: dict[str, Any] | None, spacing: Any) -> None:
    """``mosaicseg plan`` the dataset, then (optionally) replace the network and the target spacing and
    preprocess with them."""
    from mosaicseg.atomic import write_json_atomic

    if (workdir / "plans.json").is_file():
        return
    run_cli(["plan", str(SHARED / dataset), "-o", str(workdir), "--no-preprocess"], WORK / "logs" / "nn_plan.log")
    plans = json.loads((workdir / "plans.json").read_text())
    if network is not None:
        # a CPU plan given by size only gets plain convolutions; nnU-Net's plan brings its own kernels/strides
        plans["network"].update(network if "kernel_sizes" in network else plain_network(network))
    if spacing is not None:
        plans["datasets"][dataset]["target_spacing"] = [float(s) for s in spacing]
    write_json_atomic(workdir / "plans.json", plans)
    run_cli(["preprocess", str(workdir)], WORK / "logs" / "nn_preprocess.log")


def _stages(pred: Path, wall_s: float) -> dict[str, Any] | None:
    """Mean seconds per case of each stage ``mosaicseg predict`` timed (its ``predict.json`` in ``pred``), the
    process's start-up and shutdown (``wall_s`` less the cases' own seconds) per case, and whether the tiles ran
    under autocast (``mixed_precision``); None without a record."""
    from mosaicseg.cli import PREDICT_RECORD, PREDICT_STAGES

    record = pred / PREDICT_RECORD
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    cases = data["cases"]
    if not cases:
        return None
    out: dict[str, Any] = {k[:-2]: sum(c[k] for c in cases) / len(cases) for k in PREDICT_STAGES}
    out["startup"] = (wall_s - sum(c["seconds"] for c in cases)) / len(cases)
    out["mixed_precision"] = data.get("mixed_precision", False)  # records before the option: float32
    return out


def _evaluate(pred: Path, labels: Path, dataset: str) -> dict[str, Any]:
    summary = evaluate(pred, labels, dataset, WORK / "logs" / "nn_eval.log")
    return {
        "dice_mean": summary["mean"]["dice"],
        "dice_per_label": {k: v["dice"]["mean"] for k, v in summary["labels"].items()},
    }


def _one_dataset(
    dataset: str,
    root: Path,
    env: dict[str, str],
    steps: Steps,
    nnunet_python: str,
    budget_s: float,
    quick: bool,
    subset: int | None,
) -> dict[str, Any]:
    setting = SETTINGS[dataset]
    iterations = 2 if quick else setting["iterations"]
    budget_s = QUICK_BUDGET_MIN * 60 if quick else budget_s
    n_cases = 2 if quick else (subset or setting["cases"])
    did = setting["id"]
    logs = WORK / "logs" / f"nnunet_{dataset}"
    _raw_dataset(root / "raw", dataset)

    def nn(*args: str, log: str) -> CliRun:
        return _run([nnunet_python, str(RUNNER), *args], logs / f"{log}.log", env)

    if steps.require(dataset, {"iterations": iterations, "schedule": SCHEDULE}):
        for folder in root.glob(f"ms_{dataset}_*/runs"):
            shutil.rmtree(folder)  # MosaicSeg runs of the superseded setting: they would be resumed
    steps.run(f"{dataset}/nnunet_plan_s", lambda: nn("plan", str(did), log="plan").seconds)
    nn_plans = json.loads((root / "preprocessed" / dataset / "nnUNetPlans.json").read_text())
    axes = _canonical_axes(
        SHARED / dataset / "imagesTr", json.loads((SHARED / dataset / "dataset.json").read_text())["file_ending"]
    )
    network, spacing = _nnunet_network(nn_plans, axes)

    same = root / f"ms_{dataset}_nnunet_plan"
    _mosaicseg_workdir(same, dataset, network, spacing)
    held_out = held_out_cases(same, dataset)
    all_cases = sorted(p.name.split(".")[0] for p in (SHARED / dataset / "labelsTr").iterdir())
    splits = [{"train": [c for c in all_cases if c not in held_out], "val": held_out}]
    (root / "preprocessed" / dataset / "splits_final.json").write_text(json.dumps(splits, indent=1))
    cases = held_out[:n_cases]
    images, labels = held_out_links(dataset, cases, root / f"subset_{dataset}")

    def nn_train(its: int, tag: str) -> dict[str, Any]:
        timing = root / f"timing_{dataset}_{tag}.json"
        folder = root / "results" / dataset / "nnUNetTrainerBench__nnUNetPlans__3d_fullres" / "fold_0"
        shutil.rmtree(folder, ignore_errors=True)  # one trainer folder: a fresh run per step
        done = nn("train", str(did), str(its), str(min(its, STOCK_EPOCH)), str(timing), log=tag)
        keep = root / f"nnunet_{dataset}_{tag}"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(folder.parent, keep)  # the predictor reads the model folder by this fixed name
        return {**json.loads(timing.read_text()), "peak_rss_mb": done.peak_rss_mb, "model": str(keep)}

    def nn_predict(tag: str, tta: bool) -> dict[str, Any]:
        model = Path(steps.data[f"{dataset}/nnunet_train_{tag}"]["model"])
        folder = root / "results" / dataset / "nnUNetTrainerBench__nnUNetPlans__3d_fullres"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(model, folder)
        pred = root / f"pred_{dataset}_nnunet_{tag}{'_tta' if tta else ''}"
        shutil.rmtree(pred, ignore_errors=True)
        done = nn("predict", str(did), str(images), str(pred), "tta" if tta else "notta", log=f"predict_{tag}")
        return {
            "s_per_case_incl_startup": done.seconds / len(cases),
            "peak_rss_mb": done.peak_rss_mb,
            **_evaluate(pred, labels, dataset),
        }

    def ms_train(workdir: Path, tag: str, extra: list[str]) -> dict[str, Any]:
        run = workdir / "runs" / tag
        args = ["train", str(workdir), "--recipe", "single", "--fold", "0", "--seed", "0", "--device", "cpu"]
        args += ["--val-every", "1000000", "-o", str(run), *extra]
        if (run / "checkpoint_latest.pt").is_file():
            args.append("--resume")  # a step killed mid-way
        done = run_cli(args, logs / f"ms_train_{tag}.log")
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        return {
            "iterations": last["iteration"],
            "train_s": last["elapsed_s"],
            "s_per_iteration": last["elapsed_s"] / last["iteration"],
            "peak_rss_mb": done.peak_rss_mb,
            "run": str(run),
        }

    def ms_predict(tag: str, tta: bool) -> dict[str, Any]:
        run = Path(steps.data[f"{dataset}/mosaicseg_train_{tag}"]["run"])
        pred = root / f"pred_{dataset}_mosaicseg_{tag}{'_tta' if tta else ''}"
        args = ["predict", "-m", str(run), "-i", str(images), "-o", str(pred), "--no-largest-component", "--overwrite"]
        done = run_cli(args + (["--tta"] if tta else []), logs / f"ms_predict_{tag}.log")
        return {
            "s_per_case_incl_startup": done.seconds / len(cases),
            "peak_rss_mb": done.peak_rss_mb,
            **_evaluate(pred, labels, dataset),
        }

    # (i) equal iterations, nnU-Net's network, patch, batch, spacing and optimiser
    steps.run(f"{dataset}/nnunet_train_iter", lambda: nn_train(iterations, "iter"))
    sgd = ["--optimizer", "sgd", "--lr", "0.01", "--schedule", "constant", "--iterations", str(iterations)]
    sgd += ["--iterations-per-epoch", str(min(iterations, STOCK_EPOCH))]
    steps.run(f"{dataset}/mosaicseg_train_iter", lambda: ms_train(same, "iter", sgd))
    # (ii) equal wall clock, each with its own CPU plan
    nn_its = max(2, int(budget_s / steps.data[f"{dataset}/nnunet_train_iter"]["s_per_iteration"]))
    nn_its -= nn_its % min(nn_its, STOCK_EPOCH)  # whole stock epochs beyond the first
    steps.run(f"{dataset}/nnunet_train_time", lambda: nn_train(nn_its, "time"))
    own = root / f"ms_{dataset}_cpu_plan"
    # the plan's own choice for this machine (on the CPU: 48³, features 16-128, 2 mm for the IXI heads)
    _mosaicseg_workdir(own, dataset, None, None)
    budget = ["--time-budget", f"{budget_s:.0f}s"]  # the train defaults: AdamW 3e-3, bf16 where native, head prior
    steps.run(f"{dataset}/mosaicseg_train_time", lambda: ms_train(own, "time", budget))
    for tag in ("iter", "time"):
        for tta in (False, True):
            suffix = "_tta" if tta else ""
            steps.run(f"{dataset}/nnunet_predict_{tag}{suffix}", lambda t=tag, a=tta: nn_predict(t, a))
            steps.run(f"{dataset}/mosaicseg_predict_{tag}{suffix}", lambda t=tag, a=tta: ms_predict(t, a))
            step = steps.data[f"{dataset}/mosaicseg_predict_{tag}{suffix}"]
            # from the predict record beside the step's outputs; steps cached before the record existed get it here
            if "mixed_precision" not in (step.get("stages_s_per_case") or {}):
                pred = root / f"pred_{dataset}_mosaicseg_{tag}{suffix}"
                step["stages_s_per_case"] = _stages(pred, step["s_per_case_incl_startup"] * len(cases))
                steps.save()
    return {
        "cases": cases,
        "nnunet_network_in_mosaicseg_axes": network,
        "nnunet_spacing_in_mosaicseg_axes": spacing,
        "mosaicseg_cpu_plan": json.loads((own / "plans.json").read_text())["network"],
        "mosaicseg_time_flags": budget,
        "steps": {k.split("/", 1)[1]: v for k, v in steps.data.items() if k.startswith(dataset + "/")},
    }


def study_nnunet(
    datasets: list[str], nnunet_python: str, budget_min: float, subset: int | None, quick: bool = False
) -> dict[str, Any]:
    """See the module docstring. ``quick``: 2 iterations, a 15-second budget, 2 cases (checks the plumbing)."""
    root = WORK / "nnunet"  # the quick check has a WORK of its own
    env = {
        **os.environ,
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
    }
    steps = Steps(root / "steps.json")
    # cached wall-clock steps hold for one budget only: mixing budgets would make the table lie
    effective = QUICK_BUDGET_MIN if quick else budget_min
    recorded = steps.data.setdefault("budget_min", effective)
    if recorded != effective:
        raise SystemExit(
            f"{steps.path} holds steps trained with --budget-min {recorded}, not {budget_min}. Fix: rerun with "
            f"--budget-min {recorded}, or delete {root} to start the study afresh with the new budget."
        )
    steps.save()
    out: dict[str, Any] = {}
    for dataset in datasets:
        out[dataset] = _one_dataset(dataset, root, env, steps, nnunet_python, budget_min * 60, quick, subset)
    return {
        "setting": {
            "iterations": {d: (2 if quick else SETTINGS[d]["iterations"]) for d in datasets},
            "budget_min": effective,
            "schedule": SCHEDULE,
            "subset_cases": {d: 2 if quick else (subset or SETTINGS[d]["cases"]) for d in datasets},
            "nnunet_python": nnunet_python,
            "quick": quick,
        },
        "datasets": out,
        # figures of steps that were recomputed, with why: e.g. the float32 prediction before --precision
        "superseded": steps.data.get("superseded", []),
    }


def default_nnunet_python() -> str:
    """``$MOSAICSEG_NNUNET_PYTHON``, else ``.venv-nnunet`` (``scripts/setup_nnunet.sh``), else this Python if it
    can import nnunetv2."""
    env = os.environ.get("MOSAICSEG_NNUNET_PYTHON")
    if env:
        return env
    local = ROOT / ".venv-nnunet" / "bin" / "python"
    if local.is_file():
        return str(local)
    probe = subprocess.run([sys.executable, "-c", "import nnunetv2"], capture_output=True)
    if probe.returncode != 0:
        raise SystemExit(
            "nnunetv2 is not installed. Fix: `bash scripts/setup_nnunet.sh` (its own environment, CPU torch "
            "kept), or point MOSAICSEG_NNUNET_PYTHON / --nnunet-python at a Python that has nnunetv2."
        )
    return sys.executable
