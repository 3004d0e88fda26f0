"""Recipes: what a method plugs into the one Trainer — model, loss, datasets, sampling and hooks.

A recipe is a function ``(RecipeContext) -> RecipeParts`` registered by name. ``universal`` is MultiTalent
(all datasets, one sigmoid output per global task, partial-label loss, cases ∝ 1/√n); ``single`` is the
traditional paradigm with the same code on one dataset. Later methods (Hermes, KA²ER, ...) register here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mosaicseg.config import TrainConfig
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.models import build_model
from mosaicseg.registry import Registry
from mosaicseg.training.losses import deep_supervision_loss
from mosaicseg.types import Batch

LossFn = Callable[[Any, Batch], torch.Tensor]


class Hook(Protocol):
    """Optional callbacks; a recipe implements only the methods it needs (looked up with ``getattr``)."""

    def on_train_start(self, trainer: Any) -> None: ...
    def on_step_end(self, trainer: Any, loss: float) -> None: ...
    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RecipeContext:
    config: TrainConfig
    plans: dict[str, Any]
    vocabulary: Vocabulary  # the collection's full vocabulary
    sampling: str  # the collection's sampling scheme
    weights: dict[str, float]  # the collection's per-dataset sampling weights


@dataclass
class RecipeParts:
    model: torch.nn.Module
    loss: LossFn
    vocabulary: Vocabulary  # the model's output vocabulary (what its K outputs mean)
    datasets: tuple[str, ...]  # datasets trained and validated on
    sampling: str
    weights: dict[str, float] | None = None
    hooks: list[Any] = field(default_factory=list)


RECIPES: Registry[Callable[[RecipeContext], RecipeParts]] = Registry("recipe")


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


def partial_label_objective(outputs: Any, batch: Batch) -> torch.Tensor:
    """MultiTalent's loss over deep-supervision outputs (see :mod:`mosaicseg.training.losses`)."""
    return deep_supervision_loss(outputs, batch["target"], batch["label_mask"], batch["ignore"])


def missing_as_background_objective(outputs: Any, batch: Batch) -> torch.Tensor:
    """The naive baseline: every task is supervised on every sample, un-annotated ones as background."""
    return deep_supervision_loss(outputs, batch["target"], torch.ones_like(batch["label_mask"]), batch["ignore"])


def _objective(cfg: TrainConfig) -> LossFn:
    return missing_as_background_objective if cfg.missing_labels == "background" else partial_label_objective


def _network(ctx: RecipeContext, vocabulary: Vocabulary) -> torch.nn.Module:
    network = dict(ctx.plans["network"])
    if ctx.config.patch_size is not None:
        network["patch_size"] = list(ctx.config.patch_size)
    return build_model(
        network,
        modality_channels(ctx.plans, vocabulary),
        vocabulary.num_tasks,
        architecture=ctx.config.architecture,
        deep_supervision=ctx.config.deep_supervision,
        **ctx.config.model_options,
    )


@RECIPES.register("universal")
def universal(ctx: RecipeContext) -> RecipeParts:
    """MultiTalent: one model, every task of every (chosen) dataset its own sigmoid output."""
    vocabulary = ctx.vocabulary
    if ctx.config.datasets:
        vocabulary = vocabulary.restrict(list(ctx.config.datasets))
    return RecipeParts(
        model=_network(ctx, vocabulary),
        loss=_objective(ctx.config),
        vocabulary=vocabulary,
        datasets=vocabulary.datasets,
        sampling=ctx.config.sampling or ctx.sampling,
        weights=ctx.weights,
    )


@RECIPES.register("single")
def single(ctx: RecipeContext) -> RecipeParts:
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
    return RecipeParts(
        model=_network(ctx, vocabulary),
        loss=partial_label_objective,
        vocabulary=vocabulary,
        datasets=(dataset,),
        sampling="uniform",
    )
