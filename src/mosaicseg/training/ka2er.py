"""The recipe ``ka2er``: a promptable student amalgamating frozen experts (Gao et al.; the student is
:class:`~mosaicseg.models.amalgamation.KA2ERNet`, the experts :mod:`mosaicseg.models.experts`).

The experts file (recipe option ``experts``: a YAML/JSON path, or the mapping itself) declares sub-tasks and
the expert of each, and optionally the external, task-agnostic expert::

    subtasks:
      deepgrey: {dataset: Dataset002_IXIDeepGrey}
      limbic:   {dataset: Dataset003_IXILimbic, labels: [Hippocampus_L, Hippocampus_R]}  # a label group
    experts:
      deepgrey: {run: runs/single_002/fold_0}                  # a MosaicSeg run
      limbic:   {nnunet: nnUNet_results/Dataset003_.../nnUNetTrainer__nnUNetPlans__3d_fullres, fold: 0}
    external:   {run: runs/universal_001_005/fold_0, dataset: Dataset001_Hippocampus}  # optional
    level: -1                                                   # encoder level of the features (-1: bottleneck)

Each step, only the experts of the sub-tasks in the batch run (no gradient; outside the student's state dict,
optimiser and DDP), on their samples; the external expert runs on every sample. The loss (eq. 1) is the
partial-label segmentation loss + ``align_weight`` × ``‖f_s − f_m‖`` (:func:`~mosaicseg.training.losses.
alignment_loss`) + ``kl_weight`` × KL(student ‖ expert) over each expert's labels on its samples. Training
boxes come from the ground truth of each asked task in the patch, each corner moved by up to ``box_jitter`` of
the box's extent and the box dropped with probability ``box_dropout`` (so the student also works without one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mosaicseg.errors import MosaicSegError
from mosaicseg.models.amalgamation import KA2ER_OPTIONS, KA2ERNet
from mosaicseg.models.experts import Expert, ExternalExpert, MosaicSegExpert, NnUNetExpert
from mosaicseg.training.losses import alignment_loss, bernoulli_kl, deep_supervision_loss
from mosaicseg.training.recipes import (
    NETWORK_OPTIONS,
    Recipe,
    RecipeContext,
    _body_arguments,
    _collection_vocabulary,
    _pos_weight,
    register_recipe,
    scheme_policy,
    with_prior,
)
from mosaicseg.types import Batch, ModelOutput

KA2ER_RECIPE_OPTIONS: dict[str, Any] = {
    **NETWORK_OPTIONS,
    "experts": None,
    "align_weight": 1.0,
    "align_norm": "mse",
    "align_detach": True,
    "kl_weight": 0.1,
    "box_dropout": 0.5,
    "box_jitter": 0.1,
    "sam_prompt_encoder": None,  # a local SAM/MedSAM checkpoint whose prompt encoder starts the student's
    "head_dim": KA2ER_OPTIONS["head_dim"],
    "prompt_width": KA2ER_OPTIONS["prompt_width"],
}


@dataclass
class Slot:
    """A sub-task's expert: which dataset's samples it reads, which of their tasks it predicts."""

    subtask: str
    expert: Expert
    dataset: int  # the dataset index in the student's vocabulary
    tasks: list[int]  # the student's global task of each expert label kept
    channels: list[int]  # the expert's output channel of each of them


def read_experts_file(spec: Any) -> dict[str, Any]:
    """The experts mapping from the recipe option (a path to YAML/JSON, or the mapping)."""
    if isinstance(spec, dict):
        return spec
    if not isinstance(spec, str):
        raise MosaicSegError(
            "the ka2er recipe needs its experts. Fix: --recipe-option experts=experts.yaml (sub-tasks, the expert of "
            "each, an optional external expert; see mosaicseg.training.ka2er)."
        )
    path = Path(spec)
    if not path.is_file():
        raise MosaicSegError(f"{path}: experts file not found. Fix: give the path of the sub-task → expert mapping.")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            data = json.loads(path.read_text())
    except Exception as exc:  # YAML and JSON raise their own kinds
        raise MosaicSegError(f"{path}: cannot parse the experts file ({exc}). Fix its syntax.") from exc
    if not isinstance(data, dict):
        raise MosaicSegError(f"{path}: the experts file must be a mapping with subtasks and experts. Fix it.")
    return {**data, "_source": str(path)}


def _load_expert(entry: Any, dataset: str, level: int, raw_image: Path | None, where: str) -> Expert:
    if not isinstance(entry, dict) or not ({"run", "nnunet"} & set(entry)):
        raise MosaicSegError(
            f"{where}: an expert is {{run: FOLDER}} or {{nnunet: FOLDER, fold: F}}. Fix the entry {entry!r}."
        )
    if "run" in entry:
        return MosaicSegExpert(entry["run"], dataset, level=level)
    if raw_image is None:
        raise MosaicSegError(f"{where}: the nnU-Net expert needs the dataset's images to read their orientation.")
    return NnUNetExpert(entry["nnunet"], dataset, raw_image, fold=entry.get("fold", 0), level=level)


def build_slots(
    ctx: RecipeContext, vocabulary: Any, spec: dict[str, Any], raw: dict[str, Path]
) -> tuple[list[Slot], Expert | None]:
    """The experts of the mapping, loaded and checked against the student's vocabulary."""
    where = spec.get("_source", "the experts mapping")
    subtasks, experts = spec.get("subtasks") or {}, spec.get("experts") or {}
    level = int(spec.get("level", -1))
    unknown = sorted(set(experts) - set(subtasks))
    if unknown:
        raise MosaicSegError(f"{where}: experts name unknown sub-tasks {unknown}. Fix: declare them under subtasks.")
    slots = []
    for name, sub in subtasks.items():
        if not isinstance(sub, dict) or "dataset" not in sub:
            raise MosaicSegError(
                f"{where}: sub-task {name!r} needs a dataset. Fix: {{dataset: NAME[, labels: [...]]}}."
            )
        dataset = sub["dataset"]
        if dataset not in vocabulary.datasets:
            raise MosaicSegError(
                f"{where}: sub-task {name!r} names dataset {dataset!r}, which the collection lacks. Fix: use one of "
                f"{list(vocabulary.datasets)}."
            )
        rows = {label: k for k, label, _ in vocabulary.dataset_tasks(dataset)}
        wanted = sub.get("labels") or list(rows)
        bad = sorted(set(wanted) - set(rows))
        if bad:
            raise MosaicSegError(
                f"{where}: sub-task {name!r} names labels {bad} that {dataset} lacks (it has {sorted(rows)})."
            )
        if name not in experts:
            raise MosaicSegError(f"{where}: sub-task {name!r} has no expert. Fix: map it under experts.")
        expert = _load_expert(experts[name], dataset, level, raw.get(dataset), f"{where}, expert {name!r}")
        dims = len(ctx.plans["network"]["patch_size"])
        if expert.spatial_dims != dims:
            raise MosaicSegError(
                f"{where}: expert {name!r} is {expert.spatial_dims}D, the student {dims}D. Fix: map a {dims}D expert."
            )
        kept = [(rows[lbl], c) for c, lbl in enumerate(expert.labels) if lbl in wanted]
        if not kept:
            raise MosaicSegError(
                f"{where}: expert {name!r} predicts none of {wanted}. Fix: map the expert of those labels."
            )
        slots.append(Slot(name, expert, vocabulary.dataset_index(dataset), [k for k, _ in kept], [c for _, c in kept]))
    external = None
    if spec.get("external") is not None:
        entry = spec["external"]
        if not isinstance(entry, dict) or not ({"run", "nnunet"} & set(entry)):
            raise MosaicSegError(f"{where}: the external expert is {{run: FOLDER}} or {{nnunet: FOLDER, image: FILE}}.")
        image = Path(entry["image"]) if entry.get("image") else None
        external = ExternalExpert(entry, level, image)
        dims = len(ctx.plans["network"]["patch_size"])
        if external.spatial_dims != dims:
            raise MosaicSegError(f"{where}: the external expert is {external.spatial_dims}D, the student {dims}D.")
    return slots, external


class _Inputs:
    """The recipe's ``inputs(batch)``: boxes from the ground truth, and the experts' features for the model;
    keeps the experts' probabilities of the step for the KL term."""

    def __init__(self, ctx: RecipeContext, vocabulary: Any, slots: list[Slot], external: ExternalExpert | None) -> None:
        o = ctx.options
        self.slots, self.external = slots, external
        self.plans = {vocabulary.dataset_index(d): ctx.plans["datasets"][d] for d in vocabulary.datasets}
        self.vocabulary = vocabulary
        self.dropout, self.jitter = float(o["box_dropout"]), float(o["box_jitter"])
        self.seed, self.calls = ctx.config.seed, 0
        self.targets: list[tuple[torch.Tensor, list[int], list[int], torch.Tensor]] = []
        self.model: KA2ERNet | None = None
        self.on_device = False

    def boxes(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K, 2, d)`` jittered ground-truth boxes in ``[0, 1]`` and ``(B, K)`` validity (asked, present, kept)."""
        target = batch["target"].bool()
        b, k, *size = target.shape
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.calls)
        lows, highs = [], []
        present = target.flatten(2).any(-1)
        for axis, n in enumerate(size):
            other = [2 + a for a in range(len(size)) if a != axis]
            line = target.any(dim=other) if other else target  # (B, K, n)
            idx = torch.arange(n, device=line.device)
            lows.append(torch.where(line, idx, n).amin(-1).float() / n)
            highs.append((torch.where(line, idx, -1).amax(-1).float() + 1) / n)
        low, high = torch.stack(lows, -1).cpu(), torch.stack(highs, -1).cpu()  # (B, K, d)
        extent = (high - low).clamp(min=1.0 / max(size))
        shake = (torch.rand((2, b, k, len(size)), generator=g) * 2 - 1) * self.jitter * extent
        low, high = (low + shake[0]).clamp(0, 1), (high + shake[1]).clamp(0, 1)
        keep = torch.rand((b, k), generator=g) >= self.dropout
        valid = present.cpu() & batch["label_mask"].bool().cpu() & keep
        boxes = torch.stack([torch.minimum(low, high), torch.maximum(low, high)], 2)
        return boxes.to(target.device), valid.to(target.device)

    def __call__(self, batch: Batch) -> dict[str, Any]:
        assert self.model is not None  # set by the recipe
        image, dataset = batch["image"], batch["dataset"]
        if not self.on_device:
            for s in self.slots:
                s.expert.to(image.device)
            if self.external is not None:
                self.external.to(image.device)
            self.on_device = True
        scale = self.model.backbone.skip_scales[-1]
        feature_size = [n // s for n, s in zip(image.shape[2:], scale, strict=True)]
        experts, self.targets = [], []
        for j, slot in enumerate(self.slots):
            samples = (dataset == slot.dataset).nonzero().flatten()
            if not len(samples):
                continue  # only the experts of the batch's sub-tasks run
            plan = self.plans[slot.dataset]
            feats, probs = slot.expert(image[samples], plan["target_spacing"], plan["normalization"], feature_size)
            experts.append((j, samples, feats))
            self.targets.append((samples, slot.tasks, slot.channels, probs))
        external = []
        if self.external is not None:
            for d in dataset.unique().tolist():
                name = self.vocabulary.datasets[int(d)]
                plan = self.plans[int(d)]
                reader = self.external.for_dataset(
                    name, self.vocabulary.dataset_modality[name], len(plan["normalization"]), plan["normalization"]
                )
                if reader is None:
                    continue  # the external expert cannot read this dataset's images
                samples = (dataset == d).nonzero().flatten()
                feats, _ = reader(image[samples], plan["target_spacing"], plan["normalization"], feature_size)
                external.append((samples, feats))
        boxes, valid = self.boxes(batch)
        self.calls += 1
        prompts = {"experts": experts, "external": external, "boxes": boxes, "box_valid": valid}
        return {"tasks": batch["label_mask"], "dataset": dataset, "prompts": prompts}


@register_recipe("ka2er", options=KA2ER_RECIPE_OPTIONS)
def ka2er(ctx: RecipeContext) -> Recipe:
    """KA²ER: a promptable student amalgamating the frozen experts (see the module docstring)."""
    o = ctx.options
    if o["align_norm"] not in ("mse", "l2"):
        raise MosaicSegError(f"recipe option align_norm={o['align_norm']!r}: use mse or l2.")
    for name in ("align_weight", "kl_weight"):
        if isinstance(o[name], bool) or not isinstance(o[name], int | float) or o[name] < 0:
            raise MosaicSegError(f"recipe option {name}={o[name]!r} must be >= 0.")
    if not (0 <= float(o["box_dropout"]) <= 1 and 0 <= float(o["box_jitter"]) <= 1):
        raise MosaicSegError("recipe options box_dropout and box_jitter must be in [0, 1].")
    vocabulary = _collection_vocabulary(ctx)
    raw = _raw_images(ctx)
    slots, external = build_slots(ctx, vocabulary, read_experts_file(o["experts"]), raw)
    settings = {
        "expert_channels": [s.expert.feature_channels for s in slots],
        "external_channels": external.feature_channels if external is not None else None,
        "head_dim": o["head_dim"],
        "prompt_width": o["prompt_width"],
    }
    body = _body_arguments(ctx, vocabulary)
    model = with_prior(ctx, vocabulary, KA2ERNet(**body, ka2er=settings))
    if o["sam_prompt_encoder"]:
        from mosaicseg.models.prompts import load_sam_prompt_encoder

        load_sam_prompt_encoder(model.prompt_encoder, o["sam_prompt_encoder"])
    inputs = _Inputs(ctx, vocabulary, slots, external)
    inputs.model = model
    weights = float(o["align_weight"]), float(o["kl_weight"])
    pos_weight, norm, detach = _pos_weight(ctx), o["align_norm"], bool(o["align_detach"])

    def loss(outputs: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        terms = {"segmentation": deep_supervision_loss(outputs.logits, batch["target"], batch["label_mask"],
                                                       batch["ignore"], pos_weight=pos_weight)}  # fmt: skip
        if "f_s" in outputs.extras and weights[0] > 0:
            terms["alignment"] = weights[0] * alignment_loss(outputs.extras["f_s"], outputs.extras["f_m"], norm, detach)
        if inputs.targets and weights[1] > 0:
            logits = outputs.logits[0]
            kl = [
                bernoulli_kl(logits[samples][:, tasks], probs[:, channels])
                for samples, tasks, channels, probs in inputs.targets
            ]
            terms["kl"] = weights[1] * torch.stack(kl).mean()
        return terms

    return Recipe(
        model=model,
        loss=loss,
        vocabulary=vocabulary,
        datasets=vocabulary.datasets,
        policy=scheme_policy(ctx.config.sampling or ctx.sampling, ctx.weights),
        inputs=inputs,
        state_dict=lambda: {"calls": inputs.calls},
        load_state_dict=lambda state: setattr(inputs, "calls", int(state.get("calls", 0))),
    )


def _raw_images(ctx: RecipeContext) -> dict[str, Path]:
    """One raw image file per dataset of the collection (for the stored orientation nnU-Net experts need)."""
    out: dict[str, Path] = {}
    collection = ctx.plans.get("collection") or {}
    for entry in collection.get("datasets", []):
        folder = Path(entry["path"])
        images = sorted((folder / "imagesTr").glob("*")) if (folder / "imagesTr").is_dir() else []
        if images:
            out[folder.name] = images[0]
    return out
