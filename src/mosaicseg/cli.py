"""``mosaicseg`` command line: thin typed wrappers around the public functions.

User errors (:class:`~mosaicseg.errors.MosaicSegError`) print their message and exit with code 2, with
no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mosaicseg.atomic import write_json_atomic
from mosaicseg.errors import MosaicSegError, printable

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="MosaicSeg: one segmentation model from many partially labelled datasets.",
)
_state = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MosaicSegError as exc:
            if _state["debug"]:
                raise
            typer.secho(f"error: {printable(str(exc))}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors.")] = False) -> None:
    _state["debug"] = debug


@app.command()
@_user_errors
def check(
    collection: Annotated[Path, typer.Argument(help="collection.yaml or a dataset folder")],
    folds: Annotated[
        int | None, typer.Option(help="Folds to check dataset sizes against (default: the collection's)")
    ] = None,
    workers: Annotated[int, typer.Option(help="Parallel readers")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the problems as JSON here")] = None,
) -> None:
    """Verify every dataset of a collection and list all problems at once (exit 2 on errors)."""
    from mosaicseg.data.checks import check_collection, render_report

    t0 = time.perf_counter()
    report = check_collection(collection, folds=folds, workers=workers, progress=True)
    typer.echo(printable(render_report(report)))
    typer.echo(f"checked in {time.perf_counter() - t0:.1f} s")
    if json_out:
        write_json_atomic(
            json_out,
            {
                "problems": [
                    {"severity": p.severity, "code": p.code, "path": str(p.path), "message": p.message, "fix": p.fix}
                    for p in report.problems
                ]
            },
        )
    if not report.ok:
        raise typer.Exit(code=2)


@app.command()
@_user_errors
def plan(
    collection: Annotated[Path, typer.Argument(help="collection.yaml or a dataset folder")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Work folder for plans and the cache")],
    device: Annotated[str, typer.Option(help="cpu or cuda: picks the network/patch/batch preset")] = "cpu",
    memory_budget_gb: Annotated[float | None, typer.Option(help="Override the preset's memory budget")] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="hermes: the Hermes paper's preprocessing (1.5 mm, CT [-990, 500] HU, MR 2-98 percentiles)"),
    ] = None,
    common_spacing: Annotated[float | None, typer.Option(help="Resample every dataset to this spacing (mm)")] = None,
    topology_spacing: Annotated[
        str,
        typer.Option(
            help="median or max: the spacing the shared network's anisotropy (kernels of 1, delayed pooling) is "
            "decided at: the datasets' per-axis median target spacing (default: one thick-slice dataset among "
            "isotropic ones leaves their network isotropic; BENCHMARKS.md, convergence on mri7) or the largest"
        ),
    ] = "median",
    anisotropy: Annotated[
        str,
        typer.Option(
            help="keep or match: a thick-slice dataset (e.g. 10 mm cine slices) on a network planned "
            "near-isotropic keeps its own spacing (keep, the default; nnU-Net's choice for a network of its own) or "
            "gets its coarse axis resampled to the network's anisotropy (match; on ACDC in mri7 not better over two "
            "seeds and 2x slower to predict: BENCHMARKS.md, anisotropy)"
        ),
    ] = "keep",
    ct_normalization: Annotated[
        str | None,
        typer.Option(
            help="CT in HU: percentile (nnU-Net: clip to the dataset's 0.5-99.5 percentiles, z-score with its "
            "statistics; the default) or fixed (Hermes: clip to [-990, 500] HU, then z-score each image)"
        ),
    ] = None,
    mr_clip_percentiles: Annotated[
        tuple[float, float] | None,
        typer.Option(
            metavar="LO HI",
            help="Grey-level (MR) channels: clip each image to its LO-th and HI-th percentiles before the z-score "
            "(e.g. 2 98, as Hermes; 0 <= LO < HI <= 100). Default: plain per-image z-score (nnU-Net)",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Parallel workers")] = 2,
    preprocess: Annotated[bool, typer.Option("--preprocess/--no-preprocess", help="Also preprocess")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace existing plans that differ")] = False,
    verify: Annotated[
        bool, typer.Option("--check/--no-check", help="Run mosaicseg check first and stop on errors")
    ] = True,
    network_from: Annotated[
        Path | None,
        typer.Option(
            help="Use this run's (fold folder, checkpoint or bundle) network instead of sizing one, so that its "
            "weights fit (for mosaicseg train --init-from; finetune and extend do it themselves)"
        ),
    ] = None,
) -> None:
    """Check the datasets, fingerprint them, write editable plans (JSON) and, unless told not to, preprocess."""
    from mosaicseg.config import PLAN_PRESETS, apply_preset
    from mosaicseg.data.fingerprint import ANISOTROPIES
    from mosaicseg.data.fingerprint import plan as make_plan
    from mosaicseg.data.preprocess import check_percentiles
    from mosaicseg.data.preprocess import preprocess as run_preprocess
    from mosaicseg.data.workdir import load_vocabulary

    chosen = apply_preset(
        PLAN_PRESETS,
        preset,
        {
            "common_spacing": common_spacing,
            "ct_normalization": ct_normalization,
            "mr_clip_percentiles": mr_clip_percentiles,
        },
        "--preset",
    )
    common_spacing, mr_clip_percentiles = chosen["common_spacing"], chosen["mr_clip_percentiles"]
    ct_normalization = chosen["ct_normalization"] or "percentile"
    # the options are checked before the (slow) dataset check and fingerprint
    if ct_normalization not in ("percentile", "fixed"):
        raise MosaicSegError(f"--ct-normalization {ct_normalization!r} is unknown. Fix: use percentile or fixed.")
    if device not in ("cpu", "cuda"):
        raise MosaicSegError(f"--device {device!r} is unknown. Fix: use cpu or cuda.")
    if anisotropy not in ANISOTROPIES:
        raise MosaicSegError(f"--anisotropy {anisotropy!r} is unknown. Fix: use one of {', '.join(ANISOTROPIES)}.")
    if mr_clip_percentiles is not None:
        check_percentiles(mr_clip_percentiles, "--mr-clip-percentiles")
    t0 = time.perf_counter()
    if verify:
        from mosaicseg.data.checks import check_collection
        from mosaicseg.errors import raise_if_errors

        report = check_collection(collection, workers=workers, progress=True)
        raise_if_errors(report.problems, f"{collection}: mosaicseg check")
        warnings = sum(p.severity == "warning" for p in report.problems)
        typer.echo(
            f"checked in {time.perf_counter() - t0:.1f} s: no errors, {warnings} warning(s)"
            + (f" (mosaicseg check {collection} lists them)" if warnings else "")
        )
    network = None
    if network_from is not None:
        from mosaicseg.inference.bundle import read_model
        from mosaicseg.training.procedures import source_network

        network = source_network(read_model(network_from))
    plans = make_plan(
        collection,
        output,
        network=network,
        device=device,
        memory_budget_gb=memory_budget_gb,
        common_spacing=common_spacing,
        ct_normalization=ct_normalization,
        mr_clip_percentiles=mr_clip_percentiles,
        workers=workers,
        overwrite=overwrite,
        progress=True,
        topology_spacing=topology_spacing,
        anisotropy=anisotropy,
    )
    typer.echo(load_vocabulary(output).describe())
    typer.echo(_describe_plans(plans))
    typer.echo(f"planned in {time.perf_counter() - t0:.1f} s → {output / 'plans.json'}")
    if preprocess:
        stats = run_preprocess(output, workers=workers, progress=True)
        typer.echo(
            f"preprocessed {stats['n_done']} case(s), skipped {stats['n_skipped']} done before, "
            f"{stats['seconds']:.1f} s"
        )


@app.command()
@_user_errors
def preprocess(
    workdir: Annotated[Path, typer.Argument(help="Work folder written by `mosaicseg plan`")],
    workers: Annotated[int, typer.Option(help="Parallel workers")] = 2,
    dataset: Annotated[list[str] | None, typer.Option(help="Only these datasets (repeatable)")] = None,
) -> None:
    """Resample, crop, normalise and cache every case (resumable: finished cases are skipped)."""
    from mosaicseg.data.preprocess import preprocess as run_preprocess

    stats = run_preprocess(workdir, workers=workers, progress=True, datasets=dataset or None)
    typer.echo(
        f"preprocessed {stats['n_done']} case(s), skipped {stats['n_skipped']} done before, {stats['seconds']:.1f} s"
    )


@app.command()
@_user_errors
def synth(
    output: Annotated[Path, typer.Argument(help="Folder to write the synthetic collection into")],
    dim: Annotated[int, typer.Option(help="2 or 3")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
) -> None:
    """Generate the seeded synthetic partial-label collection (nnU-Net raw format + collection.yaml)."""
    from mosaicseg.data.synthetic import generate_collection

    if dim not in (2, 3):
        raise MosaicSegError(f"--dim {dim} is not supported. Fix: use 2 or 3.")
    path = generate_collection(output, dim=dim, seed=seed)
    typer.echo(f"wrote {path}")


def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"1.5h"`` or plain seconds → seconds."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text or "")
    if not m or float(m[1]) <= 0:
        raise MosaicSegError(f"--time-budget {text!r} is not a duration. Fix: write e.g. 90s, 30m or 1.5h.")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[m[2]]


def parse_options(items: list[str], flag: str) -> dict[str, Any]:
    """``["name=VALUE", ...]`` → ``{name: value}``; a value is read as JSON when it parses (numbers, true,
    lists), else kept as text."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise MosaicSegError(f"{flag} {item!r} is not NAME=VALUE. Fix: write e.g. {flag} lr_scale=0.1.")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out[name.strip()] = value
    return out


def _parse_fold(fold: str) -> int | str:
    if fold == "all":
        return fold
    try:
        return int(fold)
    except ValueError:
        raise MosaicSegError(f"--fold {fold!r} is not a fold. Fix: use 0, 1, ... or all.") from None


# the validation of train, finetune and extend
ValMode = Annotated[
    str,
    typer.Option(
        help="patches: nnU-Net's pseudo-Dice on --val-patches fixed patches per case, its cost set by the number "
        "of cases (default: a whole-case pass took 200 s of a 30-minute seven-dataset run, BENCHMARKS.md); "
        "cases: each held-out case predicted whole"
    ),
]


@app.command()
@_user_errors
def train(
    workdir: Annotated[Path, typer.Argument(help="Work folder written by `mosaicseg plan`")],
    recipe: Annotated[
        str,
        typer.Option(
            help="A registered recipe: universal (MultiTalent), single, hermes, or the baselines dodnet, uniseg, "
            "multidecoder and clip (needs --task-embeddings)"
        ),
    ] = "universal",
    task_embeddings: Annotated[
        Path | None,
        typer.Option(help="clip: per-task text embeddings, .npy (tasks, width) or .json {task: vector}; made offline"),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="hermes: the Hermes paper's training (LAMB 2e-3, exponential decay, uniform dataset draws)"),
    ] = None,
    sampling: Annotated[
        str | None,
        typer.Option(
            help="How batches draw datasets: inv_sqrt (MultiTalent: each case by 1/sqrt of its dataset's size, so a "
            "dataset by sqrt of it), uniform (each dataset equally) or weights (the collection's); default: the "
            "collection file's sampling (inv_sqrt unless it says otherwise)"
        ),
    ] = None,
    recipe_option: Annotated[
        list[str] | None,
        typer.Option(
            "--recipe-option",
            help="A recipe option as NAME=VALUE (JSON value; repeat). universal/single: head_prior (default "
            '"auto": output biases start at each task\'s voxel share; without it no IXI structure was found in '
            "10 minutes, BENCHMARKS.md), bce_pos_weight (default 1)",
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(help="Start from this run/fold folder or checkpoint: matching weights, tasks matched by name"),
    ] = None,
    freeze: Annotated[
        str, typer.Option(help="Parts that never train: none, encoder (stems + encoder) or backbone (all but the head)")
    ] = "none",
    head_epochs: Annotated[
        int, typer.Option(help="Train the head alone for this many epochs first, its learning rate rising linearly")
    ] = 0,
    warmup_epochs: Annotated[
        int, typer.Option(help="Then warm up the rest linearly over this many epochs (after --head-epochs)")
    ] = 0,
    cases: Annotated[
        int | None, typer.Option(help="Train on this many of each dataset's training cases (drawn with --seed)")
    ] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Train on this share of each dataset's training cases (drawn with --seed)")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="The dataset of the single recipe")] = None,
    only: Annotated[list[str] | None, typer.Option("--datasets", help="Train on these datasets only (repeat)")] = None,
    fold: Annotated[str, typer.Option(help="Fold number or all")] = "0",
    architecture: Annotated[str, typer.Option("--network", help="unet, resenc_unet or swinunetr")] = "unet",
    width: Annotated[
        str, typer.Option(help="Width preset: small, base or large (the plan's features x 0.5, 1, 2)")
    ] = "base",
    iterations: Annotated[int | None, typer.Option(help="Total training iterations")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (of --iterations-per-epoch)")] = None,
    iterations_per_epoch: Annotated[int, typer.Option(help="Iterations per epoch")] = 50,
    time_budget: Annotated[str | None, typer.Option(help="Wall-clock budget, e.g. 30m (not reproducible)")] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="adamw (poly; the default: the CPU convergence study's best, BENCHMARKS.md), sgd (poly, nnU-Net's) or "
            "lamb (exponential; Hermes' and the hermes recipe's default)"
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Initial learning rate (default: adamw 3e-3, the convergence study's; sgd 1e-2; lamb 2e-3)"),
    ] = None,
    schedule: Annotated[
        str | None, typer.Option(help="Learning-rate schedule: poly, exp or constant (default per optimiser)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the plan's batch size")] = None,
    patch_size: Annotated[
        str | None,
        typer.Option(help="Override the plan's patch, e.g. 64,64,48 (CPU plans: at most 48³, the convergence study)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    oversample_foreground: Annotated[
        float, typer.Option(help="Share of patches centred on a voxel of an annotated structure (nnU-Net's 1/3)")
    ] = 1 / 3,
    val_every: Annotated[int, typer.Option(help="Validate every N epochs")] = 1,
    val_share: Annotated[
        float | None,
        typer.Option(
            help="With --time-budget: run a validation only if, at its predicted cost, validation stays within this "
            "share of the time, and keep the final validation's cost free at the end of the budget (default 0.1: "
            "validation took 28 %% of a 30-minute IXI run without it, BENCHMARKS.md)"
        ),
    ] = 0.1,
    val_max_cases: Annotated[int, typer.Option(help="Held-out cases per dataset per validation (0: all)")] = 8,
    val_mode: ValMode = "patches",
    val_patches: Annotated[int, typer.Option(help="Validation patches per case with --val-mode patches")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    workers: Annotated[int, typer.Option(help="Data-loader worker processes")] = 0,
    precision: Annotated[
        str,
        typer.Option(
            help="auto: mixed on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX: 0.65x the float32 time "
            "at the same Dice, BENCHMARKS.md 'Training precision'), fp32 elsewhere; mixed: autocast (fp16 with loss "
            "scaling on CUDA, bf16 on CPU, emulated and slower without native bf16); fp32"
        ),
    ] = "auto",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Run folder (default WORKDIR/runs/...)")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in the run folder")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start the run folder again")] = False,
) -> None:
    """Train one model on the preprocessed collection (Ctrl-C saves checkpoint_latest.pt; --resume continues)."""
    from mosaicseg.config import TrainConfig
    from mosaicseg.inference.predictor import PRECISIONS

    if precision not in PRECISIONS:
        raise MosaicSegError(f"--precision {precision!r} is unknown. Fix: use one of {', '.join(PRECISIONS)}.")
    patch = None
    if patch_size:
        try:
            patch = tuple(int(p) for p in patch_size.split(","))
        except ValueError:
            raise MosaicSegError(
                f"--patch-size {patch_size!r} is not a list of integers. Fix: e.g. 64,64,48."
            ) from None
    from mosaicseg.config import TRAIN_PRESETS, apply_preset

    chosen = apply_preset(
        TRAIN_PRESETS,
        preset,
        {"optimizer": optimizer, "lr": lr, "schedule": schedule, "sampling": sampling},
        "--preset",
    )
    cfg = TrainConfig(
        recipe=recipe,
        architecture=architecture,
        width=width,
        dataset=dataset,
        datasets=tuple(only) if only else None,
        fold=_parse_fold(fold),
        iterations=iterations,
        epochs=epochs,
        iterations_per_epoch=iterations_per_epoch,
        time_budget_s=parse_duration(time_budget) if time_budget else None,
        optimizer=chosen["optimizer"],
        lr=chosen["lr"],
        schedule=chosen["schedule"],
        sampling=chosen["sampling"],
        batch_size=batch_size,
        patch_size=patch,
        seed=seed,
        oversample_foreground=oversample_foreground,
        val_every=val_every,
        val_share=val_share,
        val_max_cases=val_max_cases or None,
        val_mode=val_mode,
        val_patches=val_patches,
        device=device,
        num_workers=workers,
        amp={"auto": None, "fp32": False, "mixed": True}[precision],
        recipe_options={
            **parse_options(recipe_option or [], "--recipe-option"),
            **({"task_embeddings": str(task_embeddings)} if task_embeddings is not None else {}),
        },
        init_from=str(init_from) if init_from is not None else None,
        freeze=freeze,
        head_epochs=head_epochs,
        warmup_epochs=warmup_epochs,
        cases=cases,
        fraction=fraction,
    )
    _fit(workdir, cfg, output, resume, overwrite)


def _fit(
    workdir: Path, cfg: Any, output: Path | None, resume: bool, overwrite: bool, source: dict[str, Any] | None = None
) -> None:
    """Train ``cfg`` (a TrainConfig) on ``workdir`` into ``output``, reporting as ``mosaicseg train`` does;
    ``source``: the model ``cfg.init_from`` names, read here (default: read from it, bundles included)."""
    from mosaicseg.inference.bundle import read_model
    from mosaicseg.training.loop import Trainer

    if source is None and cfg.init_from is not None:
        source = read_model(cfg.init_from)
    trainer = Trainer(workdir, cfg, output, resume=resume, overwrite=overwrite, source=source)
    del source
    for note in trainer.notes:
        typer.echo(f"note: {note}")
    typer.echo(
        f"run folder: {trainer.run_dir}  ({len(trainer.train_cases)} training / {len(trainer.val_cases)} "
        f"validation cases, patch {list(trainer.patch_size)}, batch {trainer.batch_size}, {cfg.optimizer})"
    )
    t0 = time.perf_counter()
    record = trainer.fit()
    status = "stopped (resume with --resume)" if trainer.stop_requested else "finished"
    typer.echo(f"{status} at iteration {trainer.iteration} after {time.perf_counter() - t0:.0f} s")
    if record.get("val_dice"):
        for d, v in record["val_dice"].items():
            typer.echo(f"  {d}: validation pseudo-Dice {v:.4f}")


def _adapt(mode: str, run: Path, data: Path | None, workdir: Path | None, output: Path | None, **flags: Any) -> None:
    """``finetune`` and ``extend``: plan/preprocess the new data on the model's network if needed, then train."""
    from mosaicseg.inference.bundle import read_model
    from mosaicseg.training.loop import run_folder_for
    from mosaicseg.training.procedures import adaptation_config, adaptation_workdir

    resume, overwrite, workers = flags.pop("resume"), flags.pop("overwrite"), flags.pop("workers")
    time_budget, precision, fold = flags.pop("time_budget"), flags.pop("precision"), flags.pop("fold")
    if precision not in ("auto", "fp32", "mixed"):
        raise MosaicSegError(f"--precision {precision!r} is unknown. Fix: use auto, mixed or fp32.")
    ckpt = read_model(run)
    folder = adaptation_workdir(ckpt, str(run), data, workdir, workers=workers)
    cfg = adaptation_config(
        ckpt,
        str(run),
        mode,
        fold=_parse_fold(fold),
        time_budget_s=parse_duration(time_budget) if time_budget else None,
        amp={"auto": None, "fp32": False, "mixed": True}[precision],
        **flags,
    )
    if output is None:
        default = run_folder_for(folder, cfg)
        output = default.parent.with_name(f"{mode}_{default.parent.name}") / default.name
    _fit(folder, cfg, output, resume, overwrite, source=ckpt)


_ADAPT_DATA = (
    "The new data: a dataset folder (nnU-Net raw) or collection file, planned into --workdir on the model's network"
)


@app.command()
@_user_errors
def finetune(
    run: Annotated[
        Path, typer.Argument(help="The pre-trained model: a fold folder, a checkpoint or a one-fold bundle")
    ],
    dataset: Annotated[Path | None, typer.Option("--dataset", help=_ADAPT_DATA)] = None,
    workdir: Annotated[Path | None, typer.Option("-w", "--workdir", help="Work folder of the new data")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Run folder")] = None,
    head_epochs: Annotated[int, typer.Option(help="Head only, learning rate rising linearly (MultiTalent: 10)")] = 10,
    warmup_epochs: Annotated[int, typer.Option(help="Then the whole network, linear warm-up (MultiTalent: 50)")] = 50,
    freeze: Annotated[str, typer.Option(help="none, encoder or backbone: parts that never train")] = "none",
    cases: Annotated[int | None, typer.Option(help="Train on this many cases of each dataset (seeded)")] = None,
    fraction: Annotated[float | None, typer.Option(help="Train on this share of each dataset's cases (seeded)")] = None,
    iterations: Annotated[int | None, typer.Option(help="Total training iterations")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (of --iterations-per-epoch)")] = None,
    iterations_per_epoch: Annotated[int, typer.Option(help="Iterations per epoch")] = 50,
    time_budget: Annotated[str | None, typer.Option(help="Wall-clock budget, e.g. 30m")] = None,
    optimizer: Annotated[str | None, typer.Option(help="Default: the pre-trained run's")] = None,
    lr: Annotated[float | None, typer.Option(help="Default: the pre-trained run's")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (also draws --cases/--fraction)")] = 0,
    fold: Annotated[str, typer.Option(help="Fold number or all")] = "0",
    val_every: Annotated[int, typer.Option(help="Validate every N epochs")] = 1,
    val_max_cases: Annotated[int, typer.Option(help="Held-out cases per dataset per validation (0: all)")] = 8,
    val_mode: ValMode = "patches",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, mixed or fp32 (as mosaicseg train)")] = "auto",
    workers: Annotated[int, typer.Option(help="Parallel workers for planning and preprocessing")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue the run in the run folder")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start the run folder again")] = False,
) -> None:
    """Fine-tune a pre-trained model on new data: matching weights loaded (init_report.json says what was
    loaded, new and dropped), new heads or task tokens for new tasks, MultiTalent's head-then-warm-up schedule."""
    _adapt(
        "finetune", run, dataset, workdir, output, head_epochs=head_epochs, warmup_epochs=warmup_epochs,
        freeze=freeze, cases=cases, fraction=fraction, iterations=iterations, epochs=epochs,
        iterations_per_epoch=iterations_per_epoch, time_budget=time_budget, optimizer=optimizer, lr=lr, seed=seed,
        fold=fold, val_every=val_every, val_max_cases=val_max_cases or None, val_mode=val_mode, device=device,
        precision=precision, workers=workers, resume=resume, overwrite=overwrite,
    )  # fmt: skip


@app.command()
@_user_errors
def extend(
    run: Annotated[Path, typer.Argument(help="The model to extend: a fold folder, a checkpoint or a one-fold bundle")],
    dataset: Annotated[Path | None, typer.Option("--dataset", help=_ADAPT_DATA)] = None,
    workdir: Annotated[Path | None, typer.Option("-w", "--workdir", help="Work folder of the new data")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Run folder")] = None,
    cases: Annotated[int | None, typer.Option(help="Train on this many cases of each dataset (seeded)")] = None,
    fraction: Annotated[float | None, typer.Option(help="Train on this share of each dataset's cases (seeded)")] = None,
    iterations: Annotated[int | None, typer.Option(help="Total training iterations")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (of --iterations-per-epoch)")] = None,
    iterations_per_epoch: Annotated[int, typer.Option(help="Iterations per epoch")] = 50,
    time_budget: Annotated[str | None, typer.Option(help="Wall-clock budget, e.g. 30m")] = None,
    optimizer: Annotated[str | None, typer.Option(help="Default: the model's run's")] = None,
    lr: Annotated[float | None, typer.Option(help="Default: the model's run's")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (also draws --cases/--fraction)")] = 0,
    fold: Annotated[str, typer.Option(help="Fold number or all")] = "0",
    val_every: Annotated[int, typer.Option(help="Validate every N epochs")] = 1,
    val_max_cases: Annotated[int, typer.Option(help="Held-out cases per dataset per validation (0: all)")] = 8,
    val_mode: ValMode = "patches",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, mixed or fp32 (as mosaicseg train)")] = "auto",
    workers: Annotated[int, typer.Option(help="Parallel workers for planning and preprocessing")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue the run in the run folder")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start the run folder again")] = False,
) -> None:
    """Add the new data's tasks to a model (Hermes' incremental learning): everything the model has stays frozen,
    only the new tasks' rows (task tokens or head channels, and a new modality's stem and tokens) train. The
    result predicts old and new tasks; old outputs are bit-identical to the model's."""
    _adapt(
        "extend", run, dataset, workdir, output, cases=cases, fraction=fraction, iterations=iterations,
        epochs=epochs, iterations_per_epoch=iterations_per_epoch, time_budget=time_budget, optimizer=optimizer,
        lr=lr, seed=seed, fold=fold, val_every=val_every, val_max_cases=val_max_cases or None, val_mode=val_mode,
        device=device, precision=precision, workers=workers, resume=resume, overwrite=overwrite,
    )  # fmt: skip


@app.command()
@_user_errors
def adapt(
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="The target: a dataset folder (nnU-Net raw, labelled), or a dataset name or number "
            "(Dataset001_Hippocampus, 001) found in --data-root, the source model's collection root or the "
            "folders of the other datasets given",
        ),
    ],
    shots: Annotated[int, typer.Option(help="Labelled target cases to train on, drawn per fold")],
    workdir: Annotated[Path, typer.Option("-w", "--workdir", help="Work folder: target + pool, planned")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder of the folds' runs and summary.json")],
    source: Annotated[
        str, typer.Option(help="The pre-trained model (run/fold folder, checkpoint, bundle), or none (scratch)")
    ] = "none",
    aux: Annotated[
        list[str] | None, typer.Option("--aux", help="An auxiliary dataset folder or name, as --target (repeat)")
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(
            envvar="MOSAICSEG_DATA_ROOT",
            help="A folder of nnU-Net raw datasets where --target/--aux names are looked up first",
        ),
    ] = None,
    aux_cases: Annotated[int, typer.Option(help="At most this many cases per auxiliary dataset (ASAP: 30)")] = 30,
    aux_split_by_label: Annotated[
        bool, typer.Option(help="Every (dataset, label) is its own arm (as ASAP built 30 arms)")
    ] = False,
    strategy: Annotated[
        str,
        typer.Option(
            help="asap, finetune (target only), gms, mtl (each sample: an auxiliary dataset drawn evenly, then one "
            "of its arms) or dal"
        ),
    ] = "asap",
    turns: Annotated[int, typer.Option(help="Training turns (steps), the same for every strategy")] = 500,
    folds: Annotated[int, typer.Option(help="Repeat over this many seeded draws of the shots")] = 3,
    eval_cases: Annotated[
        int | None, typer.Option(help="A fixed evaluation subset of this many target cases (default: the rest)")
    ] = None,
    eval_list: Annotated[
        Path | None, typer.Option(help="A text file of target case ids to evaluate on (one per line)")
    ] = None,
    preset: Annotated[str, typer.Option(help="paper (AdamW 3e-4, wd 1e-7, batch 4) or cpu (the plan's batch)")] = "cpu",
    lr: Annotated[float | None, typer.Option(help="Override the preset's learning rate")] = None,
    alpha: Annotated[float, typer.Option(help="ASAP: weight of the loss reward at turn 1 (eq. 3)")] = 0.5,
    alpha_schedule: Annotated[
        str,
        typer.Option(
            help="ASAP: linear (alpha·(1 - (t-1)/N) at turn t of N: alpha at turn 1, alpha/N at the last), "
            "exponential (to alpha/100) or constant"
        ),
    ] = "linear",
    beta: Annotated[float, typer.Option(help="ASAP: reward smoothing (eq. 4)")] = 0.1,
    reward_loss: Annotated[
        str, typer.Option(help="ASAP: normalized ((L0 - L) / (L0 + L), in [-1, 1]) or raw (-L, the paper's)")
    ] = "normalized",
    seed: Annotated[int, typer.Option(help="Seed of the draws and of training")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, mixed or fp32 (as mosaicseg train)")] = "auto",
) -> None:
    """Few-shot adaptation of a target with auxiliary datasets chosen by a bandit (ASAP) or a baseline; Dice and
    IoU per fold and mean ± sd in OUT/summary.json; each fold's arms.jsonl and arms.png show the choices."""
    from mosaicseg.fewshot import AdaptSettings, run_adaptation

    if precision not in ("auto", "fp32", "mixed"):
        raise MosaicSegError(f"--precision {precision!r} is unknown. Fix: use auto, mixed or fp32.")
    ids = None
    if eval_list is not None:
        if not eval_list.is_file():
            raise MosaicSegError(f"{eval_list}: not found. Fix: give a text file of case ids, one per line.")
        ids = [x.strip() for x in eval_list.read_text().splitlines() if x.strip()]
    settings = AdaptSettings(
        target=target, shots=shots, source=None if source.lower() == "none" else source, aux=list(aux or []),
        data_root=str(data_root) if data_root is not None else None, aux_cases=aux_cases,
        split_by_label=aux_split_by_label, strategy=strategy, turns=turns, folds=folds, eval_cases=eval_cases,
        eval_list=ids, preset=preset, lr=lr, seed=seed, device=device,
        amp={"auto": None, "fp32": False, "mixed": True}[precision], alpha=alpha, alpha_schedule=alpha_schedule,
        beta=beta, reward_loss=reward_loss,
    )  # fmt: skip
    result = run_adaptation(settings, workdir, output, log=typer.echo)
    typer.echo(
        f"{strategy}: Dice {result['dice']['mean']:.4f} ± {result['dice']['sd']:.4f}, IoU {result['iou']['mean']:.4f}"
        f" ± {result['iou']['sd']:.4f} over {len(result['folds'])} folds → {output / 'summary.json'}"
    )


def _box_source(
    predictor: Any,
    prompts: Path | None,
    oracle: Path | None,
    auto: Path | None,
    dataset: str | None,
    tasks: list[str] | None,
    device: str,
) -> Any:
    """The one box source predict was given (``--prompts``, ``--oracle-boxes`` or ``--auto-boxes``), or None."""
    from mosaicseg.inference.prompts import AutoBoxes, OracleBoxes, PromptFile

    given = [x for x in (prompts, oracle, auto) if x is not None]
    if len(given) > 1:
        raise MosaicSegError("give one of --prompts, --oracle-boxes and --auto-boxes. Fix: drop the others.")
    if not given:
        return None
    if not hasattr(predictor.models[0], "prompt_encoder"):
        raise MosaicSegError(
            f"boxes were given, but the model ({type(predictor.models[0]).__name__}) takes no prompts. Fix: drop "
            "--prompts/--oracle-boxes/--auto-boxes, or predict with a ka2er model."
        )
    if prompts is not None:
        return PromptFile(prompts)
    task_ids = predictor.resolve_tasks(dataset, tasks)
    if oracle is not None:
        if not oracle.is_dir():
            raise MosaicSegError(f"{oracle}: not a folder of reference labels. Fix: --oracle-boxes LABELS_FOLDER.")
        source = predictor.preprocessing_dataset(dataset, task_ids)
        values = {k: v for k, _, v in predictor.vocabulary.dataset_tasks(source) if k in set(task_ids)}
        return OracleBoxes(oracle, values)
    from mosaicseg.inference.predictor import Predictor

    assert auto is not None
    return AutoBoxes(Predictor.from_checkpoint(auto, device=device), dataset)


# the predict command's record in its output folder, and the per-case stages it times
PREDICT_RECORD = "predict.json"
PREDICT_STAGES = ("read_s", "preprocess_s", "network_s", "export_s")


@app.command()
@_user_errors
def predict(
    model: Annotated[
        Path, typer.Option("-m", "--model", help="Run folder (fold_* inside), checkpoint or bundle (mosaicseg export)")
    ],
    inputs: Annotated[
        list[Path],
        typer.Option("-i", "--input", help="Image files, folders of them, or DICOM series folders (repeat)"),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder")],
    dataset: Annotated[str | None, typer.Option(help="Dataset whose preprocessing and tasks apply")] = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", help="Tasks (repeat; all: every task)")] = None,
    modality: Annotated[
        str | None,
        typer.Option(help="Read the inputs as this modality (default: the --dataset's, from its channel names)"),
    ] = None,
    folds: Annotated[list[str] | None, typer.Option("--folds", help="Folds to ensemble (repeat)")] = None,
    checkpoint: Annotated[str, typer.Option(help="final, latest or best")] = "final",
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="Mirroring test-time augmentation")] = False,
    save_probabilities: Annotated[bool, typer.Option(help="Also write per-task probability maps")] = False,
    largest_component: Annotated[
        bool | None,
        typer.Option(
            "--largest-component/--no-largest-component",
            help="Keep only each task's largest connected component, or never (default: for the tasks where the "
            "run's final validation found it raised the Dice; RUN/postprocessing.json)",
        ),
    ] = None,
    background_outside: Annotated[
        str,
        typer.Option(
            help="Background outside the imaged region (zero in every channel, connected to the border): auto (as "
            "the plans decided from the training labels: plans.json postprocessing), on or off"
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda or mps")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs")] = False,
    jit: Annotated[
        bool, typer.Option("--jit/--no-jit", help="CPU: frozen TorchScript graphs, checked against the model")
    ] = True,
    precision: Annotated[
        str,
        typer.Option(
            help="fp32; mixed: autocast (bf16 on CPU, fp16 on CUDA); auto: mixed on CUDA and on CPUs with native "
            "bf16 (AVX512-BF16, AMX), else fp32"
        ),
    ] = "auto",
    merged: Annotated[
        bool,
        typer.Option(help="One label map over every asked task (1..N in task order; names in OUT/dataset.json)"),
    ] = False,
    statistics: Annotated[
        bool, typer.Option(help="Per-case, per-task voxel counts and volumes (mL) in OUT/statistics.csv and .json")
    ] = False,
    thresholds: Annotated[
        list[str] | None,
        typer.Option("--threshold", help="TASK=VALUE: probability threshold of a task (repeat; default 0.5)"),
    ] = None,
    dicom_seg: Annotated[
        bool, typer.Option(help="Also write a DICOM-SEG per DICOM series input (needs mosaicseg[dicom])")
    ] = False,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help='KA²ER boxes: JSON {"CASE": {"TASK": {"min": [x,y,z], "max": [x,y,z], "space": "voxel"|"world"}}} '
            "(voxel: the file's index order, max inclusive; world: mm)"
        ),
    ] = None,
    oracle_boxes: Annotated[
        Path | None,
        typer.Option(
            help="KA²ER boxes from these reference labels (CASE.ext): evaluation only, marked in predict.json"
        ),
    ] = None,
    auto_boxes: Annotated[
        Path | None, typer.Option(help="KA²ER boxes from a first pass of this MosaicSeg model (run or bundle)")
    ] = None,
) -> None:
    """Predict label maps (each source dataset's own numbering, or --merged) in the input's exact geometry."""
    from mosaicseg.inference.outputs import parse_thresholds, require_highdicom
    from mosaicseg.inference.predictor import Predictor, check_background_outside

    if checkpoint not in ("final", "latest", "best"):
        raise MosaicSegError(f"--checkpoint {checkpoint!r} is unknown. Fix: use final, latest or best.")
    check_background_outside(background_outside, "--background-outside")
    parse_thresholds(thresholds or [])  # malformed values fail before the model is loaded
    if dicom_seg:
        require_highdicom()
    predictor = Predictor.from_checkpoint(
        model, folds=folds, checkpoint=checkpoint, device=device, jit=jit, precision=precision
    )
    predictor.use_modality(modality)
    box_source = _box_source(predictor, prompts, oracle_boxes, auto_boxes, dataset, tasks, device)
    report = predictor.predict_files(
        inputs,
        output,
        dataset=dataset,
        tasks=tasks,
        tta=tta,
        save_probabilities=save_probabilities,
        largest_component=largest_component,
        overwrite=overwrite,
        merged=merged,
        statistics=statistics,
        thresholds=thresholds or (),
        dicom_seg=dicom_seg,
        prompts=box_source,
        background_outside=background_outside,
    )
    from mosaicseg.atomic import write_json_atomic

    # where the time went, kept beside the outputs (the evaluator reads only image files)
    write_json_atomic(
        output / PREDICT_RECORD,
        {**report, "model": str(model), "tta": tta, "jit": jit, "device": device, "mixed_precision": predictor.amp},
    )
    cases = report["cases"]
    mean = {k: sum(c[k] for c in cases) / len(cases) for k in ("seconds", *PREDICT_STAGES)} if cases else {}
    typer.echo(
        f"predicted {len(cases)} case(s) into {output}"
        + (
            f", {mean['seconds']:.2f} s/case ("
            + ", ".join(f"{k[:-2]} {mean[k]:.2f}" for k in PREDICT_STAGES)
            + f"; per case in {PREDICT_RECORD})"
            if cases
            else ""
        )
        + (f"; kept {len(report['skipped'])} existing (use --overwrite)" if report["skipped"] else "")
        + (f"; volumes in {output / 'statistics.csv'}" if statistics else "")
    )
    if report["largest_component"] and report["largest_component_from"] == "run":
        kept = report["largest_component"]
        typer.echo(
            f"largest connected component kept for {len(kept)} task(s) ({', '.join(kept[:6])}"
            f"{', ...' if len(kept) > 6 else ''}): the run's final validation found it raised their Dice "
            "(--no-largest-component turns it off)"
        )
    if report.get("statistics_missing"):
        typer.secho(
            f"warning: no statistics for {len(report['statistics_missing'])} kept case(s) predicted earlier without "
            f"--statistics or other thresholds ({', '.join(report['statistics_missing'][:5])}). Fix: rerun with "
            "--overwrite.",
            fg=typer.colors.YELLOW,
            err=True,
        )


@app.command()
@_user_errors
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Folder of predicted label maps")],
    gt: Annotated[Path, typer.Argument(help="Folder of reference label maps (e.g. labelsTr)")],
    dataset_json: Annotated[Path, typer.Option(help="dataset.json of the references")],
    pred_dataset_json: Annotated[Path | None, typer.Option(help="dataset.json of the predictions' numbering")] = None,
    map_items: Annotated[list[str] | None, typer.Option("--map", help="PRED_LABEL=GT_LABEL (repeat)")] = None,
    labels: Annotated[list[str] | None, typer.Option("--labels", help="Only these labels (repeat)")] = None,
    nsd_tolerance: Annotated[float, typer.Option(help="NSD tolerance in mm")] = 2.0,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where summary.json/metrics.csv go")] = None,
    workers: Annotated[int, typer.Option(help="Parallel workers")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing summary")] = False,
    missing_as_empty: Annotated[bool, typer.Option(help="Score missing predictions as empty")] = False,
) -> None:
    """Dice, IoU, HD95 and NSD per case and label; summary.json and metrics.csv."""
    from mosaicseg.evaluation.report import evaluate_folders, format_table, parse_mapping

    summary = evaluate_folders(
        pred,
        gt,
        dataset_json,
        pred_dataset_json=pred_dataset_json,
        mapping=parse_mapping(map_items or []) or None,
        labels=labels or None,
        nsd_tolerance_mm=nsd_tolerance,
        output_dir=output,
        workers=workers,
        progress=True,
        overwrite=overwrite,
        missing_as_empty=missing_as_empty,
    )
    typer.echo(format_table(summary))


@app.command()
@_user_errors
def demo(
    workdir: Annotated[Path, typer.Option("-o", "--output", help="Demo folder")] = Path("work/demo"),
    dim: Annotated[int, typer.Option(help="2 (default, about a minute on CPU) or 3 (slower)")] = 2,
    iterations: Annotated[int | None, typer.Option(help="Training iterations (default 400 in 2D, 1500 in 3D)")] = None,
    time_budget: Annotated[str | None, typer.Option(help="Wall-clock training budget instead, e.g. 5m")] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Retrain and re-predict instead of reusing earlier results")] = False,
) -> None:
    """Synthetic collection → plan → train (universal) → predict held-out cases → evaluate → Dice table."""
    from mosaicseg.demo import run_demo

    if dim not in (2, 3):
        raise MosaicSegError(f"--dim {dim} is not supported. Fix: use 2 or 3.")
    run_demo(
        workdir,
        dim=dim,
        seed=seed,
        iterations=iterations,
        time_budget_s=parse_duration(time_budget) if time_budget else None,
        overwrite=overwrite,
        log=typer.echo,
    )


@app.command()
@_user_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run folder (fold_* inside), fold folder or checkpoint_*.pt")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle file to write, e.g. model.mosaic")],
    folds: Annotated[list[str] | None, typer.Option("--folds", help="Folds to bundle (repeat; default all)")] = None,
    checkpoint: Annotated[str, typer.Option(help="final, latest or best")] = "final",
    workdir: Annotated[
        Path | None,
        typer.Option(help="Work folder the run was trained from, for the split's case ids (default: found above RUN)"),
    ] = None,
    checksums: Annotated[
        str,
        typer.Option(
            help="Raw data checksums: manifest (dataset.json + file names and sizes; fast) or content (also every "
            "file's SHA-256; reads all data)"
        ),
    ] = "manifest",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle file")] = False,
) -> None:
    """Write a run as ONE file (safetensors weights of every fold + JSON model card; no pickle) for predict -m."""
    from mosaicseg.inference.bundle import export_bundle

    if checkpoint not in ("final", "latest", "best"):
        raise MosaicSegError(f"--checkpoint {checkpoint!r} is unknown. Fix: use final, latest or best.")
    card = export_bundle(
        run, output, folds=folds, checkpoint=checkpoint, workdir=workdir, checksums=checksums, overwrite=overwrite
    )
    vocabulary = card["vocabulary"]
    for note in card["provenance"]["notes"]:
        typer.echo(printable(f"note: {note}"))
    typer.echo(
        f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB): {len(card['folds'])} fold(s), "
        f"{len(vocabulary['tasks'])} task(s) of {len(vocabulary['datasets'])} dataset(s); mosaicseg info {output}"
    )


@app.command()
@_user_errors
def info(
    bundle: Annotated[Path, typer.Argument(help="Bundle file written by mosaicseg export")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole model card as JSON")] = False,
) -> None:
    """Print a bundle's model card: tasks per dataset, modalities, network, folds, licences, versions."""
    from mosaicseg.inference.bundle import model_card, read_metadata

    metadata = read_metadata(bundle)
    typer.echo(json.dumps(metadata, indent=2) if as_json else printable(model_card(metadata, bundle)))


def _describe_plans(plans: dict[str, Any]) -> str:
    net = plans["network"]
    lines = [
        f"{plans['dim']}D collection plan for {plans['device']}: patch {net['patch_size']}, batch "
        f"{net['batch_size']}, {net['num_stages']} stages, features {net['features']}, estimated "
        f"{net['memory_estimate_gb']:.2f} GB of {net['memory_budget_gb']:.2f} GB"
    ]
    for name, d in plans["datasets"].items():
        norm = ", ".join(
            f"{n['channel']}:{n['scheme']}" + ("({:g}-{:g}%)".format(*n["percentiles"]) if n.get("percentiles") else "")
            for n in d["normalization"]
        )
        sep = f", separate axis {d['separate_axis']}" if d.get("separate_axis") is not None else ""
        rule = plans.get("postprocessing", {}).get(name, {})
        outside = "; background outside the imaged region" if rule.get("background_outside_image") else ""
        lines.append(
            f"  {name}: spacing {[round(s, 3) for s in d['target_spacing']]}, median shape "
            f"{d['median_shape']}{sep}; {norm}{outside}"
        )
        if d.get("spacing_note"):
            lines.append(f"    ({d['spacing_note']})")
    return "\n".join(lines)


@app.command()
@_user_errors
def report(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Run folder (fold_* inside, or one fold), prediction folder with summary.json, or demo folder"
        ),
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="HTML file (default FOLDER/report.html)")
    ] = None,
    pred: Annotated[Path | None, typer.Option(help="Predicted label maps (default: summary.json's folder)")] = None,
    gt: Annotated[Path | None, typer.Option(help="Reference label maps (default: summary.json's folder)")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Images CASE_0000.* (default: imagesTr/imagesTs beside the dataset.json)")
    ] = None,
    dataset_json: Annotated[Path | None, typer.Option(help="dataset.json of the references")] = None,
    cases: Annotated[int, typer.Option(help="Best and worst cases drawn per task")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report")] = False,
) -> None:
    """One self-contained HTML page: metric tables, training curves, best/worst case overlays, provenance."""
    from mosaicseg.evaluation.html import render_report

    path, found = render_report(
        folder,
        output,
        pred=pred,
        gt=gt,
        images=images,
        dataset_json=dataset_json,
        n_cases=cases,
        overwrite=overwrite,
    )
    for note in found.missing:
        typer.echo(printable(f"note: {note}"))
    typer.echo(f"wrote {path}")


@app.command()
@_user_errors
def priors(
    model: Annotated[Path, typer.Argument(help="Run folder (fold_* inside), checkpoint or .mosaic bundle")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the CSV and PNG files")],
    fold: Annotated[str | None, typer.Option(help="Fold to read (default: the first)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing files")] = False,
) -> None:
    """Cosine similarity of the learned task (and modality) priors: CSV and labelled heatmaps (Hermes Fig. 4/5)."""
    from mosaicseg.evaluation.priors import describe, read_matrix, summarise, write_priors

    written = write_priors(model, output, fold=fold, overwrite=overwrite)
    for name, path in written.items():
        typer.echo(f"{name}: {path}")
    typer.echo(describe(summarise(*read_matrix(written["tasks_csv"]))))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
