"""``init_from``: start a model from another run's weights, task by task.

Fine-tuning, ``extend`` and ``adapt`` all start from a pre-trained model whose task list differs from the new
one. A model declares which of its parameters hold one row per task (:func:`~mosaicseg.models.task_parameter_names`);
those are copied row by row for every task whose name both vocabularies share, new tasks keep their fresh rows.
Input stems and per-modality rows (Hermes' modality tokens) are matched by modality name (a stem's place in
the state dict is its modality's index, which differs between collections); a modality the source lacks gets
a new stem, which the report states. Every other tensor is copied when the name and shape match. The report
says what was loaded, what is new and what was dropped, so that a silent mismatch (another architecture,
another plan) is visible.

The procedures built on it (fine-tuning's schedule, ``extend``) are in :mod:`mosaicseg.training.procedures`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.models import modality_parameter_names, task_parameter_names
from mosaicseg.runtime import load_one_model


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
            + (
                # a clash of names is a decision, stated: a task is its dataset and label name, so the same name
                # is the same task
                f"; tasks {self.kept_tasks} have the same (dataset/label) names as the source's tasks and are "
                "taken to be the same tasks: their trained outputs are kept and fine-tuned (to start one afresh, "
                "give its dataset another name)"
                if self.kept_tasks
                else ""
            )
        )


def read_source(source: str | Path) -> dict[str, Any]:
    """The checkpoint behind ``source`` (a ``.pt``, a fold folder, or a run folder with exactly one fold); a
    bundle (``mosaicseg export``) is read by :func:`mosaicseg.inference.bundle.read_model`, a later stage."""
    return load_one_model(source, "init_from starts from")


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
