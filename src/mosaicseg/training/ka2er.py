"""The recipe ``ka2er``: a promptable student amalgamating frozen experts (Gao et al.; the student is
:class:`~mosaicseg.models.amalgamation.KA2ERNet`, the experts :mod:`mosaicseg.models.experts`).

The experts file (recipe option ``experts``: a YAML/JSON path, or the mapping itself) declares sub-tasks and
the expert of each, and optionally the external, task-agnostic expert::

    subtasks:
      deepgrey: {dataset: Dataset002_IXIDeepGrey}
      limbic:   {dataset: Dataset003_IXILimbic, labels: [Hippocampus_L, Hippocampus_R]}  # a label group
      centre_a: {dataset: Dataset009_MyoPS, cases: "^A_"}        # a centre (or sequence): a regex on case ids
      centre_bc: {dataset: Dataset009_MyoPS, cases: [B_001, C_004]}  # or the case ids themselves
    experts:
      deepgrey: {run: runs/single_002/fold_0}                  # a MosaicSeg run
      limbic:   {nnunet: nnUNet_results/Dataset003_.../nnUNetTrainer__nnUNetPlans__3d_fullres, fold: 0}
      ...
    external:   {run: runs/universal_001_005/fold_0, dataset: Dataset001_Hippocampus}  # optional
    level: -1                                                   # encoder level of the features (-1: bottleneck)

A sub-task is a dataset, optionally narrowed to a label group (``labels``) and/or to some of its cases
(``cases``: a regular expression searched in each case id — anchor it, ``^A_`` — or a list of case ids; the
paper split MyoPS++ by centre). Its expert then reads only the samples of those cases. Each step, only the
experts of the sub-tasks in the batch run (no gradient; outside the student's state dict, optimiser and DDP), on
their samples; the external expert runs on every sample. The loss (eq. 1) is the partial-label segmentation
loss + ``align_weight`` × Σ over the experts used in the batch of ``‖f_s − f_m^k‖`` on expert k's samples, f_m^k
the tokens the amalgamation merges from expert k (and the external expert) (:func:`~mosaicseg.training.losses.
alignment_loss`, :class:`~mosaicseg.models.amalgamation.Amalgamated`) + ``kl_weight`` × KL(student ‖ expert) over
each expert's labels on its samples + ``student_weight`` × the segmentation loss of the decoder reading f_s (the
path inference keeps; not in the paper, whose decoder learns on f_m only and meets f_s first at inference). With it
the KL reads the f_s path. Training boxes come from the ground truth of each asked task in the patch
(:func:`training_boxes`: each corner moved by up to ``box_jitter`` of the box's extent, the box dropped with
probability ``box_dropout``, so the student also works without one). With ``--architecture swinunetr`` the student's
``feature_size`` is the paper's 48 unless a model option sets it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
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
    "align_scale_free": True,  # compare f_s and f_m layer-normalised, as the decoder reads them
    "kl_weight": 0.1,
    "student_weight": 1.0,  # the segmentation loss of the decoder reading f_s (the inference path); 0: the paper's
    "box_dropout": 0.5,
    "box_jitter": 0.1,
    "sam_prompt_encoder": None,  # a local SAM/MedSAM checkpoint whose prompt encoder starts the student's
    "head_dim": KA2ER_OPTIONS["head_dim"],
    "prompt_width": KA2ER_OPTIONS["prompt_width"],
}
# the paper's SwinUNETR embedding dimension ("an embedding dimension of 48"); MosaicSeg's swinunetr default is 24
SWINUNETR_FEATURE_SIZE = 48
SUBTASK_KEYS = ("dataset", "labels", "cases")


@dataclass
class Slot:
    """A sub-task's expert: which dataset's samples it reads, which of their tasks it predicts."""

    subtask: str
    expert: Expert
    dataset: int  # the dataset index in the student's vocabulary
    tasks: list[int]  # the student's global task of each expert label kept
    channels: list[int]  # the expert's output channel of each of them
    cases: re.Pattern[str] | frozenset[str] | None = None  # the sub-task's cases of the dataset (None: all)

    def covers(self, case_id: str) -> bool:
        """Whether the sub-task holds the case ``case_id`` of its dataset."""
        if self.cases is None:
            return True
        if isinstance(self.cases, frozenset):
            return case_id in self.cases
        return self.cases.search(case_id) is not None


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
        try:
            return MosaicSegExpert(entry["run"], dataset, level=level)
        except MosaicSegError as exc:  # the run's own message names its folder; this names the mapping entry
            raise MosaicSegError(f"{where}: {exc}") from exc
    if raw_image is None:
        raise MosaicSegError(f"{where}: the nnU-Net expert needs the dataset's images to read their orientation.")
    return NnUNetExpert(entry["nnunet"], dataset, raw_image, fold=entry.get("fold", 0), level=level)


def build_slots(
    ctx: RecipeContext,
    vocabulary: Any,
    spec: dict[str, Any],
    raw: dict[str, Path],
    case_ids: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[Slot], Expert | None]:
    """The experts of the mapping, loaded and checked against the student's vocabulary and, for sub-tasks that
    choose cases, against ``case_ids`` (dataset → its case ids; a dataset not in it is checked for form only)."""
    where = spec.get("_source", "the experts mapping")
    subtasks, experts = spec.get("subtasks") or {}, spec.get("experts") or {}
    level = int(spec.get("level", -1))
    unknown = sorted(set(experts) - set(subtasks))
    if unknown:
        raise MosaicSegError(f"{where}: experts name unknown sub-tasks {unknown}. Fix: declare them under subtasks.")
    dims = len(ctx.plans["network"]["patch_size"])
    slots = []
    for name, sub in subtasks.items():
        if not isinstance(sub, dict) or "dataset" not in sub:
            raise MosaicSegError(
                f"{where}: sub-task {name!r} needs a dataset. Fix: {{dataset: NAME[, labels: [...]][, cases: ...]}}."
            )
        extra = sorted(set(sub) - set(SUBTASK_KEYS))
        if extra:
            raise MosaicSegError(
                f"{where}: sub-task {name!r} has unknown keys {extra}. Fix: use only {list(SUBTASK_KEYS)} (a centre "
                "or sequence split is cases: REGEX on the case ids)."
            )
        dataset = sub["dataset"]
        if dataset not in vocabulary.datasets:
            raise MosaicSegError(
                f"{where}: sub-task {name!r} names dataset {dataset!r}, which the collection lacks. Fix: use one of "
                f"{list(vocabulary.datasets)}."
            )
        rows = {label: k for k, label, _ in vocabulary.dataset_tasks(dataset)}
        labels = sub.get("labels")
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
            raise MosaicSegError(
                f"{where}: sub-task {name!r}: labels {labels!r} is not a list of label names. Fix: labels: [A, B]."
            )
        wanted = labels or list(rows)
        bad = sorted(set(wanted) - set(rows))
        if bad:
            raise MosaicSegError(
                f"{where}: sub-task {name!r} names labels {bad} that {dataset} lacks (it has {sorted(rows)})."
            )
        known = (case_ids or {}).get(dataset)
        cases = _case_selection(sub.get("cases"), known, f"{where}: sub-task {name!r} of {dataset}")
        if name not in experts:
            raise MosaicSegError(f"{where}: sub-task {name!r} has no expert. Fix: map it under experts.")
        expert = _load_expert(experts[name], dataset, level, raw.get(dataset), f"{where}, expert {name!r}")
        if expert.spatial_dims != dims:
            raise MosaicSegError(
                f"{where}: expert {name!r} ({expert.name}) is {expert.spatial_dims}D, the student {dims}D. Fix: map a "
                f"{dims}D expert."
            )
        kept = [(rows[lbl], c) for c, lbl in enumerate(expert.labels) if lbl in wanted]
        if not kept:
            raise MosaicSegError(
                f"{where}: expert {name!r} predicts none of {wanted}. Fix: map the expert of those labels."
            )
        index = vocabulary.dataset_index(dataset)
        slots.append(Slot(name, expert, index, [k for k, _ in kept], [c for _, c in kept], cases))
    external = None
    if spec.get("external") is not None:
        entry = spec["external"]
        if not isinstance(entry, dict) or not ({"run", "nnunet"} & set(entry)):
            raise MosaicSegError(f"{where}: the external expert is {{run: FOLDER}} or {{nnunet: FOLDER, image: FILE}}.")
        image = Path(entry["image"]) if entry.get("image") else None
        external = ExternalExpert(entry, level, image)
        if external.spatial_dims != dims:
            raise MosaicSegError(
                f"{where}: the external expert ({external.name}) is {external.spatial_dims}D, the student {dims}D. "
                f"Fix: use a {dims}D external expert."
            )
    return slots, external


def _case_selection(spec: Any, known: Sequence[str] | None, where: str) -> re.Pattern[str] | frozenset[str] | None:
    """A sub-task's ``cases``: a regular expression (searched in each case id) or a list of case ids; None: every
    case. Checked against ``known``, the dataset's case ids (None: not available, only the form is checked)."""
    if spec is None:
        return None
    fix = "Fix: cases: a regular expression searched in each case id (e.g. '^A_' for centre A), or a list of ids."
    chosen: re.Pattern[str] | frozenset[str]
    if isinstance(spec, str):
        try:
            chosen = re.compile(spec)
        except re.error as exc:
            raise MosaicSegError(f"{where}: cases {spec!r} is not a valid regular expression ({exc}). {fix}") from None
        matched = [c for c in known or () if chosen.search(c)]
    elif isinstance(spec, list) and spec and all(isinstance(c, str) for c in spec):
        chosen = frozenset(spec)
        missing = sorted(chosen - set(known)) if known is not None else []
        if missing:
            raise MosaicSegError(
                f"{where}: cases {missing[:5]}{' …' if len(missing) > 5 else ''} are not cases of the dataset (it has "
                f"{len(known or ())}, e.g. {list(known or ())[:3]}). Fix: list its case ids (file names without the "
                "channel suffix)."
            )
        matched = list(chosen)
    else:
        raise MosaicSegError(f"{where}: cases {spec!r} is neither a regular expression nor a list of case ids. {fix}")
    if known is not None and not matched:
        raise MosaicSegError(
            f"{where}: cases {spec!r} matches none of the dataset's {len(known)} cases (e.g. {list(known)[:3]}), so "
            f"its expert would never run. {fix}"
        )
    return chosen


def training_boxes(
    target: torch.Tensor, label_mask: torch.Tensor, jitter: float, dropout: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box prompts from the ground truth: ``target (B, K, *P)`` (multi-hot), ``label_mask (B, K)`` → ``boxes (B,
    K, 2, d)`` (low, high corner in ``[0, 1]``: voxel index over the patch size, high exclusive) and ``valid (B,
    K)`` bool.

    Each task's bounding box in the patch; then, from ``generator`` (CPU) in this order, ``u (2, B, K, d)``
    uniform in ``[0, 1)`` moves the low (``u[0]``) and high (``u[1]``) corners by ``(2u − 1) · jitter · extent``
    (extent: the box's size along the axis, at least one voxel), clamped to ``[0, 1]`` (corners that cross are
    swapped back), and ``v (B, K)`` uniform drops a box where ``v < dropout``. ``valid``: present in the patch,
    annotated and kept; an invalid box's corners are meaningless."""
    target = target.bool()
    b, k, *size = target.shape
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
    shake = (torch.rand((2, b, k, len(size)), generator=generator) * 2 - 1) * jitter * extent
    low, high = (low + shake[0]).clamp(0, 1), (high + shake[1]).clamp(0, 1)
    keep = torch.rand((b, k), generator=generator) >= dropout
    valid = present.cpu() & label_mask.bool().cpu() & keep
    boxes = torch.stack([torch.minimum(low, high), torch.maximum(low, high)], 2)
    return boxes.to(target.device), valid.to(target.device)


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
        self.student_path = float(o["student_weight"]) > 0

    def boxes(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`training_boxes` of the batch, drawn from a generator seeded by the run's seed and the step (so a
        resumed run draws the boxes it would have)."""
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + self.calls)
        return training_boxes(batch["target"], batch["label_mask"], self.jitter, self.dropout, g)

    def samples(self, slot: Slot, batch: Batch) -> torch.Tensor:
        """``(n,)`` long: the batch's samples of ``slot``'s sub-task (its dataset, and its cases if it chose some)."""
        chosen = batch["dataset"] == slot.dataset
        if slot.cases is not None and bool(chosen.any()):
            ids = [meta.get("case_id") if isinstance(meta, dict) else None for meta in batch["meta"]]
            if any(i is None for i in ids):
                raise MosaicSegError(
                    f"sub-task {slot.subtask!r} chooses cases, but the batch's meta lacks case ids. Fix: train with "
                    "MosaicSeg's loader (its samples carry meta['case_id'])."
                )
            of_cases = torch.tensor([slot.covers(str(i)) for i in ids], device=chosen.device)
            chosen = chosen & of_cases
        return chosen.nonzero().flatten()

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
            samples = self.samples(slot, batch)
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
        prompts = {"experts": experts, "external": external, "boxes": boxes, "box_valid": valid,
                   "student_path": self.student_path}  # fmt: skip
        return {"tasks": batch["label_mask"], "dataset": dataset, "prompts": prompts}


@register_recipe("ka2er", options=KA2ER_RECIPE_OPTIONS)
def ka2er(ctx: RecipeContext) -> Recipe:
    """KA²ER: a promptable student amalgamating the frozen experts (see the module docstring)."""
    o = ctx.options
    if o["align_norm"] not in ("mse", "l2"):
        raise MosaicSegError(f"recipe option align_norm={o['align_norm']!r}: use mse or l2.")
    for name in ("align_weight", "kl_weight", "student_weight"):
        if isinstance(o[name], bool) or not isinstance(o[name], int | float) or o[name] < 0:
            raise MosaicSegError(f"recipe option {name}={o[name]!r} must be >= 0.")
    for name in ("align_detach", "align_scale_free"):
        if not isinstance(o[name], bool):
            raise MosaicSegError(f"recipe option {name}={o[name]!r}: use true or false.")
    for name in ("box_dropout", "box_jitter"):
        if isinstance(o[name], bool) or not isinstance(o[name], int | float) or not 0 <= o[name] <= 1:
            raise MosaicSegError(f"recipe option {name}={o[name]!r} must be a number in [0, 1].")
    vocabulary = _collection_vocabulary(ctx)
    raw = _raw_images(ctx)
    spec = read_experts_file(o["experts"])
    splits = any(isinstance(sub, dict) and "cases" in sub for sub in (spec.get("subtasks") or {}).values())
    slots, external = build_slots(ctx, vocabulary, spec, raw, _raw_case_ids(ctx) if splits else None)
    settings = {
        "expert_channels": [s.expert.feature_channels for s in slots],
        "external_channels": external.feature_channels if external is not None else None,
        "head_dim": o["head_dim"],
        "prompt_width": o["prompt_width"],
    }
    body = student_arguments(ctx, vocabulary)
    model = with_prior(ctx, vocabulary, KA2ERNet(**body, ka2er=settings))
    if o["sam_prompt_encoder"]:
        from mosaicseg.models.prompts import load_sam_prompt_encoder

        load_sam_prompt_encoder(model.prompt_encoder, o["sam_prompt_encoder"])
    inputs = _Inputs(ctx, vocabulary, slots, external)
    inputs.model = model
    weights = float(o["align_weight"]), float(o["kl_weight"]), float(o["student_weight"])
    pos_weight, norm, detach = _pos_weight(ctx), o["align_norm"], bool(o["align_detach"])
    scale_free = bool(o["align_scale_free"])

    def loss(outputs: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        terms = {"segmentation": deep_supervision_loss(outputs.logits, batch["target"], batch["label_mask"],
                                                       batch["ignore"], pos_weight=pos_weight)}  # fmt: skip
        extras = outputs.extras
        student = extras.get("student_logits")  # the decoder on f_s: what the student predicts without experts
        if student is not None:
            terms["student"] = weights[2] * deep_supervision_loss(
                student, batch["target"], batch["label_mask"], batch["ignore"], pos_weight=pos_weight
            )
        if "align_targets" in extras and weights[0] > 0:
            f_s = extras["f_s"][extras["align_rows"]]  # (R, N, C): each expert's samples, one row per (expert, sample)
            aligned = alignment_loss(f_s, extras["align_targets"], norm, detach, extras["align_groups"], scale_free)
            terms["alignment"] = weights[0] * aligned
        if inputs.targets and weights[1] > 0:
            logits = (student or outputs.logits)[0]  # distil the experts into the path inference keeps
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


def student_arguments(ctx: RecipeContext, vocabulary: Any) -> dict[str, Any]:
    """The student body's arguments: the plan's network, with SwinUNETR at the paper's ``feature_size`` 48 unless
    the run's model options set one."""
    body = _body_arguments(ctx, vocabulary)
    if body["architecture"] == "swinunetr" and "feature_size" not in (body["options"] or {}):
        body["options"] = {**(body["options"] or {}), "feature_size": SWINUNETR_FEATURE_SIZE}
    return body


def _raw_case_ids(ctx: RecipeContext) -> dict[str, list[str]]:
    """Each dataset's case ids, from its raw folder (a dataset whose folder cannot be read is left out: its
    sub-tasks' ``cases`` are then checked for form only)."""
    from mosaicseg.data.manifest import scan_dataset

    out: dict[str, list[str]] = {}
    collection = ctx.plans.get("collection") or {}
    for entry in collection.get("datasets", []):
        manifest, _ = scan_dataset(entry["path"])
        if manifest is not None and manifest.cases:
            out[manifest.name] = [case.case_id for case in manifest.cases]
    return out


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
