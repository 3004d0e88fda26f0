"""Recipes: what a method plugs into the one Trainer — model, loss, inputs, parameter groups, batch policy,
state and hooks.

A recipe is registered by name with the options it accepts (:func:`register_recipe`) and built by a function
``(RecipeContext) -> Recipe``. The :class:`Recipe` is data plus a few functions, never a Trainer subclass:

- ``model``: any model of :data:`~mosaicseg.models.MODEL_KINDS` (``forward(image, modality, tasks=None,
  dataset=None, prompts=None) -> ModelOutput``; its ``config`` rebuilds it for resume and prediction);
- ``loss(outputs, batch)``: a scalar or named terms ``{name: scalar}`` (summed for the backward);
- ``inputs(batch)``: the keyword arguments the model gets besides ``image`` and ``modality`` (default: the
  sample's annotated ``tasks`` ``(B, K)`` and ``dataset`` ``(B,)``);
- ``param_groups(model)``: the trained parameters as :class:`ParamGroup` s with their own learning-rate scale,
  start and warm-up; parameters in no group are frozen (no gradient, not in the optimiser, not reduced by DDP);
- ``policy(cases)``: the batch policy over the fold's training cases (default: the collection's scheme, e.g.
  MultiTalent's per-case 1/√n draw);
- ``state_dict()`` / ``load_state_dict(state)``: the recipe's own state, saved inside every checkpoint;
- ``hooks``: objects with any of ``on_train_start(trainer)``, ``on_step_end(trainer, batch, outputs, losses)``,
  ``on_epoch_end(trainer, record)`` (:class:`Hook`);
- ``step``: replaces the Trainer's step (:data:`StepFn`) for methods that need more than one backward per turn
  (ASAP: a target and an auxiliary gradient); it reuses the Trainer's pieces (``trainer.forward_loss``,
  ``trainer.apply_gradients``).

``universal`` is MultiTalent (all datasets, one sigmoid output per global task, partial-label loss, cases ∝
1/√n); ``single`` is the traditional paradigm with the same code on one dataset.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mosaicseg.config import WIDTHS, TrainConfig
from mosaicseg.data.sampling import BatchPolicy, CaseSampler
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.models import build_model
from mosaicseg.models.baselines import DynamicHeadNet, MultiDecoderNet, PromptNet
from mosaicseg.models.priors import HERMES_OPTIONS, HermesNet
from mosaicseg.registry import Registry
from mosaicseg.training.losses import deep_supervision_loss, modality_loss
from mosaicseg.types import Batch, ModelOutput

Losses = dict[str, torch.Tensor]
LossFn = Callable[[ModelOutput, Batch], "torch.Tensor | Losses"]
StepFn = Callable[[Any, Batch], "StepResult"]


@dataclass
class StepResult:
    """What one training step produced: the summed loss (a float), its named terms and the model outputs."""

    loss: float
    losses: Losses
    outputs: ModelOutput | None = None


class Hook(Protocol):
    """Optional callbacks; a recipe's hook implements only the methods it needs (looked up with ``getattr``)."""

    def on_train_start(self, trainer: Any) -> None: ...
    def on_step_end(self, trainer: Any, batch: Batch, outputs: ModelOutput | None, losses: Losses) -> None: ...
    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None: ...


@dataclass
class ParamGroup:
    """Parameters trained together.

    The group's learning rate at iteration ``it`` is ``schedule(progress) × lr_scale × ramp``, where ``ramp`` is
    0 before ``start`` (the group is still frozen: its weights stay bit-identical), then rises linearly over
    ``warmup`` iterations to 1 (``(it − start + 1) / warmup``), then stays 1.

    ``rows``: only these rows (first axis) of every parameter of the group train; the Trainer zeroes the other
    rows' gradients and gives the group no weight decay, so they stay bit-identical (``extend``'s new tasks).
    """

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    start: int = 0
    warmup: int = 0
    rows: tuple[int, ...] | None = None

    def factor(self, iteration: int) -> float:
        """``lr_scale × ramp`` at ``iteration`` (0-based: the step about to run)."""
        if iteration < self.start:
            return 0.0
        if self.warmup > 0:
            return self.lr_scale * min(1.0, (iteration - self.start + 1) / self.warmup)
        return self.lr_scale


@dataclass(frozen=True)
class RecipeContext:
    config: TrainConfig
    plans: dict[str, Any]
    vocabulary: Vocabulary  # the collection's full vocabulary
    sampling: str  # the collection's sampling scheme
    weights: dict[str, float]  # the collection's per-dataset sampling weights
    options: dict[str, Any] = field(default_factory=dict)  # the recipe's options, defaults filled in
    distributed: bool = False  # several processes share each global batch (losses all-reduce their sums)
    # vocabulary → (K,) share of training voxels per task (the Trainer's fold; see data.workdir.task_frequencies)
    task_frequencies: Callable[[Vocabulary], np.ndarray] | None = None


def default_inputs(batch: Batch) -> dict[str, Any]:
    """The model's keyword arguments of a batch: each sample's annotated tasks and its dataset."""
    return {"tasks": batch["label_mask"], "dataset": batch["dataset"]}


def all_parameters(model: nn.Module) -> list[ParamGroup]:
    return [ParamGroup("all", [p for p in model.parameters() if p.requires_grad])]


def _no_state() -> dict[str, Any]:
    return {}


def _ignore_state(state: dict[str, Any]) -> None:
    if state:
        raise MosaicSegError(
            "the checkpoint holds recipe state, but this recipe keeps none. Fix: resume with the recipe the run "
            "was trained with (see config.json)."
        )


@dataclass
class Recipe:
    """A built recipe (see the module docstring)."""

    model: nn.Module
    loss: LossFn
    vocabulary: Vocabulary  # the model's output vocabulary (what its K outputs mean)
    datasets: tuple[str, ...]  # datasets trained and validated on
    policy: Callable[[Sequence[tuple[str, str]]], BatchPolicy]
    inputs: Callable[[Batch], dict[str, Any]] = default_inputs
    param_groups: Callable[[nn.Module], list[ParamGroup]] = all_parameters
    state_dict: Callable[[], dict[str, Any]] = _no_state
    load_state_dict: Callable[[dict[str, Any]], None] = _ignore_state
    hooks: list[Any] = field(default_factory=list)
    step: StepFn | None = None


@dataclass(frozen=True)
class RecipeSpec:
    """A registered recipe: its build function and its options with their defaults."""

    name: str
    build: Callable[[RecipeContext], Recipe]
    options: Mapping[str, Any]

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``given``; an unknown name is an error naming this recipe's options."""
        for name in given:
            if name not in self.options:
                close = difflib.get_close_matches(name, list(self.options), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                known = ", ".join(sorted(self.options)) or "none"
                raise MosaicSegError(
                    f"recipe '{self.name}' has no option '{name}'.{hint} Fix: use one of its options ({known})."
                )
        return {**self.options, **given}


RECIPES: Registry[RecipeSpec] = Registry("recipe")


def register_recipe(
    name: str, options: Mapping[str, Any] | None = None
) -> Callable[[Callable[[RecipeContext], Recipe]], Callable[[RecipeContext], Recipe]]:
    """Decorator: register ``build`` as recipe ``name`` accepting ``options`` (name → default)."""

    def add(build: Callable[[RecipeContext], Recipe]) -> Callable[[RecipeContext], Recipe]:
        RECIPES.register(name)(RecipeSpec(name, build, dict(options or {})))
        return build

    return add


def modality_channels(plans: dict[str, Any], vocabulary: Vocabulary) -> dict[str, int]:
    """Modality name → its channel count (from the plans' per-channel normalisation), in vocabulary order."""
    out: dict[str, int] = {}
    for d in vocabulary.datasets:
        m = vocabulary.dataset_modality[d]
        n = len(plans["datasets"][d]["normalization"])
        if out.setdefault(m, n) != n:
            raise MosaicSegError(
                f"modality '{m}' has {out[m]} channels in one dataset and {n} in {d}. Fix: give "
                "one of them another modality name in the collection file."
            )
    return {m: out[m] for m in vocabulary.modalities}


def partial_label_objective(distributed: bool = False, pos_weight: float = 1.0) -> LossFn:
    """MultiTalent's loss over deep-supervision outputs (see :mod:`mosaicseg.training.losses`); ``distributed``:
    its batch sums run over the global batch of every process; ``pos_weight``: the BCE weight of foreground."""

    def loss(outputs: ModelOutput, batch: Batch) -> torch.Tensor:
        return deep_supervision_loss(
            outputs.logits,
            batch["target"],
            batch["label_mask"],
            batch["ignore"],
            pos_weight=pos_weight,
            distributed=distributed,
        )

    return loss


def missing_as_background_objective(distributed: bool = False, pos_weight: float = 1.0) -> LossFn:
    """The naive baseline: every task is supervised on every sample, un-annotated ones as background."""

    def loss(outputs: ModelOutput, batch: Batch) -> torch.Tensor:
        everything = torch.ones_like(batch["label_mask"])
        return deep_supervision_loss(
            outputs.logits, batch["target"], everything, batch["ignore"], pos_weight=pos_weight, distributed=distributed
        )

    return loss


# options of the recipes built on the plan's network (universal, single)
NETWORK_OPTIONS: dict[str, Any] = {"head_prior": "auto", "bce_pos_weight": 1.0}
# "auto" head prior: each task's training-voxel share, kept within these bounds (a task with no voxel in the
# fold, or one filling most of each image, would otherwise start at an extreme logit)
PRIOR_RANGE = (1e-4, 0.5)


def head_prior(ctx: RecipeContext, vocabulary: Vocabulary) -> np.ndarray | None:
    """Option ``head_prior``: ``(K,)`` probabilities the untrained outputs start at, or None (the layer's own
    initialisation). ``"auto"`` (default): each task's share of the training voxels (clipped to
    :data:`PRIOR_RANGE`); a number: that probability for every task; ``null``: no prior."""
    # a recipe built on network() without declaring the option gets its default
    prior = ctx.options.get("head_prior", NETWORK_OPTIONS["head_prior"])
    if prior is None:
        return None
    if prior == "auto":
        if ctx.task_frequencies is None:
            raise ValueError("head_prior='auto' needs RecipeContext.task_frequencies (the Trainer passes it)")
        return np.clip(ctx.task_frequencies(vocabulary), *PRIOR_RANGE)
    if isinstance(prior, bool) or not isinstance(prior, int | float) or not 0 < prior < 1:
        raise MosaicSegError(
            f"recipe option head_prior={prior!r} is not a probability. Fix: give a number in (0, 1) such as 0.01, "
            '"auto" (each task\'s voxel share) or null (no prior).'
        )
    return np.full(vocabulary.num_tasks, float(prior))


def network(ctx: RecipeContext, vocabulary: Vocabulary) -> nn.Module:
    """The plan's network (patch size overridable) with one output per task of ``vocabulary``.

    Its output biases start at ``log(π_k / (1 − π_k))`` for the :func:`head_prior` ``π`` ``(K,)``, so the
    untrained model predicts each structure's frequency everywhere instead of 0.5 (the prior-probability
    initialisation of focal-loss detectors). Without it, BCE over mostly-background patches first pushes
    every output towards 0, where the sigmoid's slope, and with it the Dice gradient, vanishes: on the IXI
    collection no task was found in 10 minutes (BENCHMARKS.md, convergence).
    """
    model = build_model(
        network_plan(ctx),
        modality_channels(ctx.plans, vocabulary),
        vocabulary.num_tasks,
        architecture=ctx.config.architecture,
        deep_supervision=ctx.config.deep_supervision,
        **ctx.config.model_options,
    )
    return with_prior(ctx, vocabulary, model)


def network_plan(ctx: RecipeContext) -> dict[str, Any]:
    """plans.json's ``network`` with the run's ``patch_size`` override and ``width`` preset (features × factor)."""
    plan = dict(ctx.plans["network"])
    if ctx.config.patch_size is not None:
        plan["patch_size"] = list(ctx.config.patch_size)
    factor = WIDTHS[ctx.config.width]
    if factor != 1.0:
        plan["features"] = [max(2, round(f * factor)) for f in plan["features"]]
    return plan


def _pos_weight(ctx: RecipeContext) -> float:
    """Option ``bce_pos_weight``: the BCE weight of foreground voxels (see :func:`partial_label_loss`)."""
    value = ctx.options.get("bce_pos_weight", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise MosaicSegError(f"recipe option bce_pos_weight={value!r} is not positive. Fix: give e.g. 1 or 20.")
    return float(value)


def scheme_policy(scheme: str, weights: dict[str, float] | None) -> Callable[[Sequence[tuple[str, str]]], BatchPolicy]:
    """A fixed-probability policy factory (``inv_sqrt``, ``uniform`` or ``weights``)."""

    def build(cases: Sequence[tuple[str, str]]) -> BatchPolicy:
        return CaseSampler.build(cases, scheme, weights)

    return build


def _collection_vocabulary(ctx: RecipeContext) -> Vocabulary:
    """The collection's vocabulary, restricted to ``--datasets`` when given."""
    return ctx.vocabulary.restrict(list(ctx.config.datasets)) if ctx.config.datasets else ctx.vocabulary


@register_recipe("universal", options=NETWORK_OPTIONS)
def universal(ctx: RecipeContext) -> Recipe:
    """MultiTalent: one model, every task of every (chosen) dataset its own sigmoid output."""
    vocabulary = _collection_vocabulary(ctx)
    objective = (
        missing_as_background_objective if ctx.config.missing_labels == "background" else partial_label_objective
    )
    return Recipe(
        model=network(ctx, vocabulary),
        loss=objective(ctx.distributed, _pos_weight(ctx)),
        vocabulary=vocabulary,
        datasets=vocabulary.datasets,
        policy=scheme_policy(ctx.config.sampling or ctx.sampling, ctx.weights),
    )


@register_recipe("single", options=NETWORK_OPTIONS)
def single(ctx: RecipeContext) -> Recipe:
    """The traditional paradigm: one dataset, its own tasks only, same network, loss and loop."""
    dataset = ctx.config.dataset
    if dataset is None:
        if len(ctx.vocabulary.datasets) != 1:
            raise MosaicSegError(
                f"the single recipe trains on one dataset, the collection has "
                f"{len(ctx.vocabulary.datasets)}. Fix: pass --dataset with one of "
                f"{list(ctx.vocabulary.datasets)}."
            )
        dataset = ctx.vocabulary.datasets[0]
    vocabulary = ctx.vocabulary.restrict([dataset])
    return Recipe(
        model=network(ctx, vocabulary),
        loss=partial_label_objective(ctx.distributed, _pos_weight(ctx)),
        vocabulary=vocabulary,
        datasets=(dataset,),
        policy=scheme_policy("uniform", None),
    )


# Hermes' options: the network's (head_prior, bce_pos_weight), the model's (models/priors.py) and the weight of
# the auxiliary modality loss (the paper's λ = 0.001)
HERMES_RECIPE_OPTIONS: dict[str, Any] = {**NETWORK_OPTIONS, **HERMES_OPTIONS, "modality_loss_weight": 0.001}


def hermes_objective(distributed: bool, pos_weight: float, modality_weight: float) -> LossFn:
    """MultiTalent's partial-label loss over the asked tasks plus ``modality_weight`` × modality cross-entropy
    (when the model has a modality prior); two named terms."""
    segmentation = partial_label_objective(distributed, pos_weight)

    def loss(outputs: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        terms = {"segmentation": segmentation(outputs, batch)}
        if modality_weight > 0 and "modality_logits" in outputs.extras:
            terms["modality"] = modality_weight * modality_loss(outputs.extras["modality_logits"], batch["modality"])
        return terms

    return loss


@register_recipe("hermes", options=HERMES_RECIPE_OPTIONS)
def hermes(ctx: RecipeContext) -> Recipe:
    """Hermes: task and modality prior tokens fused into the encoder, posterior prototypes as classifiers."""
    vocabulary = _collection_vocabulary(ctx)
    weight = ctx.options["modality_loss_weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise MosaicSegError(f"recipe option modality_loss_weight={weight!r} is not >= 0. Fix: e.g. 0.001 or 0.")
    model = HermesNet(
        **_body_arguments(ctx, vocabulary),
        deep_supervision=ctx.config.deep_supervision,
        hermes={k: ctx.options[k] for k in HERMES_OPTIONS},
    )
    return Recipe(
        model=with_prior(ctx, vocabulary, model),
        loss=hermes_objective(ctx.distributed, _pos_weight(ctx), float(weight)),
        vocabulary=vocabulary,
        datasets=vocabulary.datasets,
        policy=scheme_policy(ctx.config.sampling or ctx.sampling, ctx.weights),
    )


def with_prior(ctx: RecipeContext, vocabulary: Vocabulary, model: nn.Module) -> nn.Module:
    """``model`` with its outputs started at the :func:`head_prior` (``model.set_output_prior``), if any."""
    prior = head_prior(ctx, vocabulary)
    if prior is not None:
        model.set_output_prior(prior)  # type: ignore[operator]
    return model


def _baseline(ctx: RecipeContext, vocabulary: Vocabulary, model: nn.Module) -> Recipe:
    """A universal-paradigm baseline: MultiTalent's loss over the asked tasks, the collection's draws."""
    return Recipe(
        model=with_prior(ctx, vocabulary, model),
        loss=partial_label_objective(ctx.distributed, _pos_weight(ctx)),
        vocabulary=vocabulary,
        datasets=vocabulary.datasets,
        policy=scheme_policy(ctx.config.sampling or ctx.sampling, ctx.weights),
    )


def _body_arguments(ctx: RecipeContext, vocabulary: Vocabulary) -> dict[str, Any]:
    return {
        "network_plan": network_plan(ctx),
        "modality_channels": modality_channels(ctx.plans, vocabulary),
        "num_tasks": vocabulary.num_tasks,
        "architecture": ctx.config.architecture,
        "options": ctx.config.model_options,
    }


@register_recipe("dodnet", options=NETWORK_OPTIONS)
def dodnet(ctx: RecipeContext) -> Recipe:
    """DoDNet: a dynamic head whose weights a controller generates from [GAP(bottleneck), one-hot task]."""
    vocabulary = _collection_vocabulary(ctx)
    return _baseline(ctx, vocabulary, DynamicHeadNet(**_body_arguments(ctx, vocabulary)))


def read_task_embeddings(path: str | Path, vocabulary: Vocabulary) -> torch.Tensor:
    """``(K, E)`` float32 text embeddings, one row per task of ``vocabulary``: a ``.npy`` array in task order, or
    a ``.json`` object mapping every task name to its vector (or a list of rows in task order)."""
    path = Path(path)
    names = [t.name for t in vocabulary.tasks]
    fix = (
        f"give one row per task ({len(names)}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}; all in "
        "WORKDIR/vocabulary.json), e.g. each task name encoded offline by a CLIP text encoder"
    )
    if not path.is_file():
        raise MosaicSegError(f"{path}: task-embeddings file not found. Fix: {fix}, saved as .npy or .json.")
    try:
        if path.suffix == ".npy":
            rows = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                missing = [n for n in names if n not in data]
                if missing:
                    raise MosaicSegError(f"{path}: no embedding for tasks {missing}. Fix: {fix}.")
                data = [data[n] for n in names]
            rows = np.asarray(data, dtype=np.float64)
        else:
            raise MosaicSegError(f"{path}: task embeddings must be .npy or .json. Fix: {fix}.")
    except (ValueError, OSError) as err:
        raise MosaicSegError(f"{path}: cannot read task embeddings ({err}). Fix: {fix}.") from err
    if rows.ndim != 2 or rows.shape[0] != len(names) or rows.shape[1] < 1 or not np.isfinite(rows).all():
        raise MosaicSegError(
            f"{path}: task embeddings have shape {list(rows.shape)}, the model has {len(names)} tasks (and needs "
            f"finite values). Fix: {fix}."
        )
    return torch.as_tensor(rows, dtype=torch.float32)


@register_recipe("clip", options={**NETWORK_OPTIONS, "task_embeddings": None})
def clip(ctx: RecipeContext) -> Recipe:
    """The CLIP-driven universal model: DoDNet's controller fed by the user's per-task text embeddings."""
    vocabulary = _collection_vocabulary(ctx)
    path = ctx.options.get("task_embeddings")
    if path is None:
        raise MosaicSegError(
            "the clip recipe needs per-task text embeddings and downloads nothing. Fix: pass --task-embeddings "
            "FILE (.npy of shape (tasks, width) in the order of WORKDIR/vocabulary.json, or .json mapping each task "
            "name to its vector), made offline, e.g. by encoding 'a computed tomography of a {task}' with CLIP's text "
            "encoder."
        )
    embeddings = read_task_embeddings(path, vocabulary)
    model = DynamicHeadNet(**_body_arguments(ctx, vocabulary), embedding_shape=list(embeddings.shape))
    model.set_task_embeddings(embeddings)
    return _baseline(ctx, vocabulary, model)


UNISEG_PROMPTS = ("dataset", "task")


@register_recipe("uniseg", options={**NETWORK_OPTIONS, "prompt": "dataset"})
def uniseg(ctx: RecipeContext) -> Recipe:
    """UniSeg: a learnable prompt joined to the bottleneck, one per dataset (``prompt=dataset``, UniSeg's own: its
    tasks are datasets) or per global task (``prompt=task``); the decoder runs once per asked dataset or task."""
    vocabulary = _collection_vocabulary(ctx)
    prompt = ctx.options.get("prompt", "dataset")
    if prompt not in UNISEG_PROMPTS:
        raise MosaicSegError(
            f"uniseg: prompt={prompt!r} is unknown. Fix: --recipe-option prompt=dataset (one prompt per dataset, as "
            "UniSeg) or prompt=task (one per global task; the decoder then runs once per task)."
        )
    per_dataset = [[int(k) for k in np.flatnonzero(vocabulary.label_mask(d))] for d in vocabulary.datasets]
    model = PromptNet(
        **_body_arguments(ctx, vocabulary),
        deep_supervision=ctx.config.deep_supervision,
        dataset_tasks=per_dataset if prompt == "dataset" else None,
    )
    return _baseline(ctx, vocabulary, model)


@register_recipe("multidecoder", options=NETWORK_OPTIONS)
def multidecoder(ctx: RecipeContext) -> Recipe:
    """The shared encoder with one decoder and task head per dataset."""
    vocabulary = _collection_vocabulary(ctx)
    per_dataset = [[int(k) for k in np.flatnonzero(vocabulary.label_mask(d))] for d in vocabulary.datasets]
    model = MultiDecoderNet(
        **_body_arguments(ctx, vocabulary), dataset_tasks=per_dataset, deep_supervision=ctx.config.deep_supervision
    )
    return _baseline(ctx, vocabulary, model)
