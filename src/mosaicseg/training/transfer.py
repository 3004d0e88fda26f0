"""``init_from``: start a model from another run's weights, task by task.

Fine-tuning, ``extend`` and ``adapt`` all start from a pre-trained model whose task list differs from the new
one. A model declares which of its parameters hold one row per task (:func:`~mosaicseg.models.task_parameter_names`);
those are copied row by row for every task whose name both vocabularies share, new tasks keep their fresh rows.
Input stems and per-modality rows (Hermes' modality tokens) are matched by modality name (a stem's place in
the state dict is its modality's index, which differs between collections); a modality the source lacks gets
a new stem, which the report states. Every other tensor is copied when the name and shape match. The report
says what was loaded, what is new and what was dropped, so that a silent mismatch (another architecture,
another plan) is visible.

:func:`adapted_groups` turns a recipe's parameter groups into fine-tuning's (MultiTalent): ``--freeze``
removes parts, the head trains alone first with a rising learning rate, then the rest joins with a warm-up;
with ``extend`` (Hermes' incremental learning) only the new tasks' rows and new modalities' stems and rows
train, so every old output stays bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mosaicseg.config import TrainConfig
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.models import modality_parameter_names, parameter_parts, task_parameter_names
from mosaicseg.runtime import MODEL_KEYS, find_checkpoints, load_checkpoint
from mosaicseg.training.recipes import ParamGroup


@dataclass
class InitReport:
    """What :func:`load_matching` did. Tensor lists hold state-dict names; task lists hold task names."""

    source: str
    loaded: list[str] = field(default_factory=list)  # copied whole
    task_rows: list[str] = field(default_factory=list)  # per-task tensors, copied for the shared tasks
    kept_tasks: list[str] = field(default_factory=list)  # tasks of both models (rows copied)
    new_tasks: list[str] = field(default_factory=list)  # tasks only the new model has (fresh rows)
    dropped_tasks: list[str] = field(default_factory=list)  # tasks only the source has
    new: list[str] = field(default_factory=list)  # tensors the source lacks (initialised fresh)
    dropped: list[str] = field(default_factory=list)  # source tensors with no place in the new model
    mismatched: list[str] = field(default_factory=list)  # same name, other shape (initialised fresh)
    new_modalities: list[str] = field(default_factory=list)  # modalities the source has no stem for (new stems)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"init_from {self.source}: {len(self.loaded)} tensors loaded, {len(self.task_rows)} per-task tensors "
            f"mapped ({len(self.kept_tasks)} tasks kept, {len(self.new_tasks)} new: {self.new_tasks}, "
            f"{len(self.dropped_tasks)} dropped: {self.dropped_tasks}); {len(self.new)} new, {len(self.dropped)} "
            f"dropped and {len(self.mismatched)} mismatched tensors"
            + (
                f"; modalities {self.new_modalities} are new to the model: their input stems start untrained"
                if self.new_modalities
                else ""
            )
        )


def read_source(source: str | Path) -> dict[str, Any]:
    """The checkpoint behind ``source`` (a ``.pt``, a fold folder, or a run folder with exactly one fold); a
    bundle (``mosaicseg export``) is read by :func:`mosaicseg.inference.bundle.read_model`, a later stage."""
    paths = find_checkpoints(source)
    if len(paths) != 1:
        raise MosaicSegError(
            f"{source}: holds {len(paths)} folds; init_from starts from one model. Fix: pass one fold folder or "
            "one checkpoint_*.pt."
        )
    return load_checkpoint(paths[0], require=MODEL_KEYS)


def source_network(ckpt: dict[str, Any]) -> dict[str, Any]:
    """plans.json's ``network`` of the model in ``ckpt`` as it was built (its width preset and patch applied):
    what a work folder needs for the model's weights to fit (``mosaicseg plan --network-from``)."""
    return {**ckpt["plans"]["network"], **ckpt["model_config"]["network_plan"]}


def load_matching(model: nn.Module, vocabulary: Vocabulary, ckpt: dict[str, Any], source: str = "") -> InitReport:
    """Copy into ``model`` (outputs = ``vocabulary``'s tasks) what fits from checkpoint ``ckpt``; in place."""
    old_vocab = Vocabulary.from_dict(ckpt["vocabulary"])
    old_names = [t.name for t in old_vocab.tasks]
    new_names = [t.name for t in vocabulary.tasks]
    old_index = {n: i for i, n in enumerate(old_names)}
    pairs = [(j, old_index[n]) for j, n in enumerate(new_names) if n in old_index]
    report = InitReport(
        source=str(source),
        kept_tasks=[new_names[j] for j, _ in pairs],
        new_tasks=[n for n in new_names if n not in old_index],
        dropped_tasks=[n for n in old_names if n not in set(new_names)],
        new_modalities=[m for m in vocabulary.modalities if m not in old_vocab.modalities],
    )
    rows = task_parameter_names(model)
    modality_rows = modality_parameter_names(model)
    modality_pairs = [
        (j, old_vocab.modalities.index(m)) for j, m in enumerate(vocabulary.modalities) if m in old_vocab.modalities
    ]
    state = model.state_dict()
    old_state = _stems_by_modality(ckpt["model"], old_vocab.modalities, vocabulary.modalities)
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in old_state:
                report.new.append(name)
                continue
            old = old_state[name]
            if name in rows:
                # rows past the tasks belong to no task (Hermes' null token): copied when both have as many
                extra = old.shape[0] - len(old_names)
                if old.shape[1:] != tensor.shape[1:] or extra < 0 or extra != tensor.shape[0] - len(new_names):
                    report.mismatched.append(name)
                    continue
                for j, i in pairs:
                    tensor[j].copy_(old[i])
                if extra:
                    tensor[len(new_names) :].copy_(old[len(old_names) :])
                report.task_rows.append(name)
            elif name in modality_rows:
                if old.shape[0] != len(old_vocab.modalities) or old.shape[1:] != tensor.shape[1:]:
                    report.mismatched.append(name)
                    continue
                for j, i in modality_pairs:
                    tensor[j].copy_(old[i])
                report.task_rows.append(name)
            elif old.shape == tensor.shape:
                tensor.copy_(old)
                report.loaded.append(name)
            else:
                report.mismatched.append(name)
    report.dropped = sorted(set(old_state) - set(state))
    model.load_state_dict(state)
    return report


_STEM = re.compile(r"(^|\.)stems\.stems\.(\d+)\.")


def _stems_by_modality(
    state: dict[str, torch.Tensor], old: tuple[str, ...], new: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """``state`` with each stem renamed to its modality's index in ``new``; stems of modalities ``new`` lacks
    keep a name no model has (``stems.dropped_NAME``), so they are reported as dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _STEM.search(name)
        if match is not None and int(match[2]) < len(old):
            modality = old[int(match[2])]
            place = f"stems.stems.{new.index(modality)}." if modality in new else f"stems.dropped_{modality}."
            name = name[: match.start()] + match[1] + place + name[match.end() :]
        out[name] = tensor
    return out


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
    return {**plans, "datasets": {**ckpt["plans"]["datasets"], **plans["datasets"]}}


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
