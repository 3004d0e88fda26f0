"""Procedures that start from a trained model and run the one Trainer: ``finetune`` (MultiTalent) and ``extend``
(Hermes' incremental learning).

- :func:`adapted_groups` turns a recipe's parameter groups into fine-tuning's: ``--freeze`` removes parts, the
  head trains alone first with a rising learning rate, then the rest joins with a warm-up; with ``extend`` only
  the new tasks' rows and new modalities' stems and rows train, so every old output stays bit-identical.
- :func:`adaptation_workdir` plans new data on the model's network (:func:`source_network`);
  :func:`check_network` refuses a work folder whose network the weights do not fit (2D against 3D included).
- :func:`adaptation_config` is the run's TrainConfig, taken from the model's own run unless overridden.

Loading the weights (tasks by name, stems and modality rows by modality) is ``init_from``'s job
(:mod:`mosaicseg.training.transfer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mosaicseg.config import TrainConfig
from mosaicseg.errors import MosaicSegError
from mosaicseg.models import modality_parameter_names, parameter_parts, task_parameter_names
from mosaicseg.training.recipes import ParamGroup


def adapted_groups(
    model: nn.Module,
    groups: list[ParamGroup],
    config: TrainConfig,
    new_tasks: list[int] | None = None,
    new_modalities: list[int] | None = None,
) -> list[ParamGroup]:
    """The recipe's ``groups`` as fine-tuning trains them (see the module docstring); parameters in no returned
    group are frozen by the Trainer.

    - ``config.extend``: only the rows ``new_tasks`` of the per-task parameters, the rows ``new_modalities`` of
      the per-modality ones and the stems of those modalities (groups ``new-tasks``, ``new-modalities``,
      ``new-stems``), whatever the recipe's groups were;
    - otherwise each group is split into its ``head`` and ``body`` parameters (:func:`parameter_parts`), the
      ``config.freeze`` parts dropped; the head starts at iteration 0 with a warm-up over ``head_epochs``, the
      body starts after them with a warm-up over ``warmup_epochs`` (epochs of ``iterations_per_epoch``).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    if config.extend:
        task_rows, modality_rows = task_parameter_names(model), modality_parameter_names(model)
        stems = [f"stems.stems.{m}." for m in new_modalities or []]
        by_name = dict(model.named_parameters())
        out = [ParamGroup("new-tasks", [by_name[n] for n in sorted(task_rows)], rows=tuple(new_tasks or ()))]
        if new_modalities:
            rows = tuple(new_modalities)
            out.append(ParamGroup("new-modalities", [by_name[n] for n in sorted(modality_rows)], rows=rows))
            out.append(ParamGroup("new-stems", [p for n, p in by_name.items() if n.startswith(tuple(stems))]))
        if not new_tasks:
            raise MosaicSegError("extend: the work folder adds no task to the model. Fix: give a dataset with labels.")
        return [g for g in out if g.params]
    parts = parameter_parts(model)
    frozen = {"none": set(), "encoder": {"encoder"}, "backbone": {"encoder", "decoder"}}[config.freeze]
    head_its = config.head_epochs * config.iterations_per_epoch
    body_its = config.warmup_epochs * config.iterations_per_epoch
    out = []
    for g in groups:
        head = [p for p in g.params if parts[names[id(p)]] == "head"]
        body = [p for p in g.params if parts[names[id(p)]] not in frozen | {"head"}]
        if head_its and "head" not in parts.values():
            raise MosaicSegError(
                f"head_epochs={config.head_epochs}, but the model ({type(model).__name__}) declares no head "
                "parameters. Fix: use --head-epochs 0."
            )
        out.append(ParamGroup(f"{g.name}/head", head, g.lr_scale, g.start, head_its or g.warmup, rows=g.rows))
        start = max(g.start, head_its)
        out.append(ParamGroup(f"{g.name}/body", body, g.lr_scale, start, body_its or g.warmup, rows=g.rows))
    return [g for g in out if g.params]


def source_network(ckpt: dict[str, Any]) -> dict[str, Any]:
    """plans.json's ``network`` of the model in ``ckpt`` as it was built (its width preset and patch applied):
    what a work folder needs for the model's weights to fit (``mosaicseg plan --network-from``)."""
    return {**ckpt["plans"]["network"], **ckpt["model_config"]["network_plan"]}


# the keys of plans.json's ``network`` that decide the shapes of the weights
TOPOLOGY_KEYS = ("features", "kernel_sizes", "strides", "num_stages")


def check_network(ckpt: dict[str, Any], plans: dict[str, Any], width: float, source: str, workdir: str | Path) -> None:
    """Raise unless ``plans`` (a work folder's, features × ``width``) builds the network of the model in ``ckpt``."""
    want = source_network(ckpt)
    have = {**plans["network"], "features": [max(2, round(f * width)) for f in plans["network"]["features"]]}
    if len(have["patch_size"]) != len(want["patch_size"]):
        raise MosaicSegError(
            f"{workdir}: the data is {len(have['patch_size'])}D but {source} is a {len(want['patch_size'])}D model; "
            "its weights cannot be used. Fix: start from a model of the data's dimension, or train from scratch."
        )
    differs = [k for k in TOPOLOGY_KEYS if have.get(k) != want.get(k)]
    if differs:
        raise MosaicSegError(
            f"{Path(workdir) / 'plans.json'}: its network differs from the one {source} was trained with ({differs}), "
            f"so the weights do not fit. Fix: plan the new data with `mosaicseg plan DATA -o {workdir} --network-from "
            f"{source} --overwrite` (mosaicseg finetune and extend do this when given a dataset folder)."
        )


def extended_plans(
    ckpt: dict[str, Any], plans: dict[str, Any], width: float, source: str, workdir: str | Path
) -> dict[str, Any]:
    """The plans an extended model carries: the source's datasets (their preprocessing, for predicting the old
    tasks) and the work folder's new ones (``plans``, features × ``width``: the source's network)."""
    check_network(ckpt, plans, width, source, workdir)
    post = {**ckpt["plans"].get("postprocessing", {}), **plans.get("postprocessing", {})}
    return {**plans, "datasets": {**ckpt["plans"]["datasets"], **plans["datasets"]}, "postprocessing": post}


# MultiTalent's fine-tuning schedule (Ulrich et al. 2023, sec. 2): 10 epochs of heads only with a linearly rising
# learning rate, then a 50-epoch linear warm-up of the whole network
FINETUNE_SCHEDULE = {"head_epochs": 10, "warmup_epochs": 50}


def adaptation_workdir(
    ckpt: dict[str, Any],
    source: str,
    data: str | Path | None,
    workdir: str | Path | None,
    *,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """The work folder ``finetune``/``extend`` train on: ``data`` (a dataset folder or collection file) planned
    on the model's network and preprocessed into ``workdir`` (an existing plan with other content is never
    replaced), or, without ``data``, ``workdir`` (or ``data`` itself when it is a work folder) as planned before,
    checked to hold the model's network."""
    if data is not None and (Path(data) / "plans.json").is_file():
        data, workdir = None, data
    if workdir is None:
        raise MosaicSegError(
            f"{data}: raw data needs a work folder for its plans and preprocessed cases. Fix: pass -w/--workdir DIR."
        )
    workdir = Path(workdir)
    if data is not None:
        from mosaicseg.data.fingerprint import plan
        from mosaicseg.data.preprocess import preprocess

        plan(
            data,
            workdir,
            network=source_network(ckpt),
            device=ckpt["plans"].get("device", "cpu"),
            common_spacing=ckpt["plans"].get("common_spacing"),
            workers=workers,
            progress=progress,
        )
        preprocess(workdir, workers=workers, progress=progress)
    elif not (workdir / "plans.json").is_file():
        raise MosaicSegError(
            f"{workdir}: holds no plans.json. Fix: pass the new data with --dataset (a dataset folder or collection "
            "file), or a folder written by mosaicseg plan --network-from."
        )
    from mosaicseg.data.workdir import load_plans

    check_network(ckpt, load_plans(workdir), 1.0, source, workdir)
    return workdir


def adaptation_config(ckpt: dict[str, Any], source: str, mode: str, **settings: Any) -> TrainConfig:
    """The TrainConfig of ``finetune`` or ``extend`` from the model in ``ckpt``: its recipe (``single`` becomes
    ``universal`` for extend, whose model keeps every old task), architecture, options, optimiser and schedule,
    the network of the work folder (width ``base``), ``init_from`` = ``source``; ``settings`` override any field
    (None values are left out, so a flag not given keeps the source's value). Finetune's default schedule is
    :data:`FINETUNE_SCHEDULE`."""
    if mode not in ("finetune", "extend"):
        raise ValueError(f"mode {mode!r}")
    trained = dict(ckpt.get("train_config") or {})
    model = ckpt["model_config"]
    recipe = trained.get("recipe") or ("hermes" if model.get("kind") == "hermes" else "universal")
    if mode == "extend" and recipe == "single":
        recipe = "universal"
    options = dict(trained.get("recipe_options") or {})
    if model.get("kind") == "hermes":
        options.update(model.get("hermes") or {})
    base: dict[str, Any] = {
        "recipe": recipe,
        "architecture": model.get("architecture", "unet"),
        "model_options": dict(model.get("options") or {}),
        "recipe_options": options,
        "deep_supervision": bool(model.get("deep_supervision", True)),
        "init_from": str(source),
        "extend": mode == "extend",
        **{k: trained[k] for k in ("optimizer", "lr", "weight_decay", "schedule", "final_lr_ratio") if k in trained},
        **(FINETUNE_SCHEDULE if mode == "finetune" else {}),
    }
    given = {k: v for k, v in settings.items() if v is not None}
    return TrainConfig(**{**base, **given})
