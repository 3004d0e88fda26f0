"""Global task and modality vocabularies of a collection.

Every (dataset, label) pair is its own task unless the collection declares that labels share one
definition (MultiTalent, Hermes). A dataset's modality is its channel signature (``CT``, ``T1``,
``FLAIR+T1c``; ``R,G,B`` → ``RGB``) unless overridden in the collection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mosaicseg.config import CollectionConfig
from mosaicseg.data.laterality import lateral_pairs, lateral_partner
from mosaicseg.data.manifest import DatasetManifest
from mosaicseg.errors import MosaicSegError


def channel_signature(channel_names: tuple[str, ...]) -> str:
    """``("FLAIR", "T1c")`` → ``"FLAIR+T1c"``; ``("R", "G", "B")`` → ``"RGB"``."""
    names = tuple(n.strip() for n in channel_names)
    if [n.upper() for n in names] in (["R", "G", "B"], ["RED", "GREEN", "BLUE"]):
        return "RGB"
    return "+".join(names)


@dataclass(frozen=True)
class Task:
    """One global output channel: the union of (dataset, label) pairs that share its definition."""

    index: int
    name: str  # "Dataset/label" of its first member
    members: tuple[tuple[str, str], ...]  # (dataset name, label name)


@dataclass(frozen=True)
class Vocabulary:
    """Tasks, modalities and the per-dataset maps from local label values to global tasks."""

    datasets: tuple[str, ...]
    tasks: tuple[Task, ...]
    modalities: tuple[str, ...]
    dataset_modality: dict[str, str]
    # dataset → ((global task index, label values in that dataset's files), ...)
    label_map: dict[str, tuple[tuple[int, tuple[int, ...]], ...]]
    # dataset → value of nnU-Net's ``ignore`` label in its files (None: no ignore label)
    ignore_value: dict[str, int | None] = field(default_factory=dict)
    # dataset → nnU-Net's ``regions_class_order`` (label value written for each region, in order) or None
    regions_class_order: dict[str, tuple[int, ...] | None] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, name: str) -> int:
        for t in self.tasks:
            if t.name == name or name in (f"{d}/{lbl}" for d, lbl in t.members):
                return t.index
        raise MosaicSegError(f"unknown task '{name}'. Fix: use one of {[t.name for t in self.tasks]}.")

    def dataset_index(self, name: str) -> int:
        try:
            return self.datasets.index(name)
        except ValueError:
            raise MosaicSegError(f"unknown dataset '{name}'. Fix: use one of {list(self.datasets)}.") from None

    def modality_index(self, dataset: str) -> int:
        return self.modalities.index(self.dataset_modality[dataset])

    def label_mask(self, dataset: str) -> np.ndarray:
        """``(K,)`` bool: the global tasks annotated by ``dataset``."""
        mask = np.zeros(self.num_tasks, dtype=bool)
        for k, _ in self.label_map[dataset]:
            mask[k] = True
        return mask

    def to_target(self, dataset: str, labels: np.ndarray) -> np.ndarray:
        """Local label map ``(X, Y[, Z])`` int → multi-hot global target ``(K, X, Y[, Z])`` uint8.

        Tasks the dataset does not annotate stay 0 (and are masked out by :meth:`label_mask`).
        """
        target = np.zeros((self.num_tasks, *labels.shape), dtype=np.uint8)
        for k, values in self.label_map[dataset]:
            target[k] = np.isin(labels, values) if len(values) > 1 else labels == values[0]
        return target

    def ignore_mask(self, dataset: str, labels: np.ndarray) -> np.ndarray:
        """``(X, Y[, Z])`` bool: voxels under the dataset's ignore label (all False without one)."""
        value = self.ignore_value.get(dataset)
        if value is None:
            return np.zeros(labels.shape, dtype=bool)
        return labels == value

    def lateral_lut(self, dataset: str) -> np.ndarray | None:
        """Label value → its value after mirroring along the left-right axis (``(V,)`` int, identity for
        labels without a side), or None when ``dataset`` has a lateral label that cannot be swapped (no
        partner of the other side, or a multi-value region label): that axis must then not be mirrored.
        See :mod:`mosaicseg.data.laterality`."""
        rows = self.dataset_tasks(dataset)
        values_of = {label: values for _, label, values in rows}
        pairs, unswappable = lateral_pairs(values_of)
        if unswappable:
            return None
        top = max([v for _, _, vs in rows for v in vs] + [self.ignore_value.get(dataset) or 0, 0])
        lut = np.arange(top + 1, dtype=np.int64)
        for a, b in pairs:
            lut[values_of[a][0]], lut[values_of[b][0]] = values_of[b][0], values_of[a][0]
        return lut

    def lateral_permutation(self) -> np.ndarray:
        """``(K,)`` int: the task each task becomes when the image is mirrored along the left-right axis
        (itself for tasks without a side, -1 for a lateral task whose partner is missing or ambiguous)."""
        perm = np.arange(self.num_tasks, dtype=np.int64)
        task_of = {m: t.index for t in self.tasks for m in t.members}
        for t in self.tasks:
            partners, plain = set(), False
            for d, label in t.members:
                partner = lateral_partner(label)
                if partner is None:
                    plain = True
                else:
                    partners.add(task_of.get((d, partner), -1))
            # members that disagree (two partners, or a side-less label shared with a sided one)
            if len(partners) > 1 or (partners and (plain or -1 in partners)):
                perm[t.index] = -1
            elif partners:
                perm[t.index] = partners.pop()
        return perm

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": list(self.datasets),
            "tasks": [{"index": t.index, "name": t.name, "members": [list(m) for m in t.members]} for t in self.tasks],
            "modalities": list(self.modalities),
            "dataset_modality": dict(self.dataset_modality),
            "label_map": {d: [[k, list(v)] for k, v in m] for d, m in self.label_map.items()},
            "ignore_value": dict(self.ignore_value),
            "regions_class_order": {d: list(v) if v else None for d, v in self.regions_class_order.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        return cls(
            datasets=tuple(d["datasets"]),
            tasks=tuple(Task(t["index"], t["name"], tuple(tuple(m) for m in t["members"])) for t in d["tasks"]),
            modalities=tuple(d["modalities"]),
            dataset_modality=dict(d["dataset_modality"]),
            label_map={k: tuple((int(i), tuple(v)) for i, v in m) for k, m in d["label_map"].items()},
            ignore_value=dict(d.get("ignore_value", {})),
            regions_class_order={k: tuple(v) if v else None for k, v in d.get("regions_class_order", {}).items()},
        )

    def restrict(self, datasets: list[str] | tuple[str, ...]) -> Vocabulary:
        """The vocabulary of a subset of datasets: only their tasks (renumbered in order) and modalities."""
        for d in datasets:
            self.dataset_index(d)  # raises with the list of known datasets
        keep = [t for t in self.tasks if any(m[0] in datasets for m in t.members)]
        new_index = {t.index: i for i, t in enumerate(keep)}
        dataset_modality = {d: self.dataset_modality[d] for d in self.datasets if d in datasets}
        return Vocabulary(
            datasets=tuple(d for d in self.datasets if d in datasets),
            tasks=tuple(
                Task(new_index[t.index], t.name, tuple(m for m in t.members if m[0] in datasets)) for t in keep
            ),
            modalities=tuple(dict.fromkeys(dataset_modality.values())),
            dataset_modality=dataset_modality,
            label_map={d: tuple((new_index[k], v) for k, v in self.label_map[d]) for d in datasets},
            ignore_value={d: self.ignore_value.get(d) for d in datasets},
            regions_class_order={d: self.regions_class_order.get(d) for d in datasets},
        )

    def extended_by(self, new: Vocabulary, source: str = "the model") -> Vocabulary:
        """This vocabulary followed by ``new``'s datasets: old tasks and modalities keep their indices, ``new``'s
        tasks come after them and its unknown modalities after the old ones (``mosaicseg extend``). A dataset
        both have is an error (task names are ``Dataset/label``, so they cannot clash otherwise): extending adds
        tasks, fine-tuning re-trains known ones."""
        clash = sorted(set(self.datasets) & set(new.datasets))
        if clash:
            raise MosaicSegError(
                f"{source} already has {clash}; extend only adds datasets and tasks the model does not know. Fix: "
                "rename the new dataset (its folder and dataset.json name), or use mosaicseg finetune to train "
                "known tasks again."
            )
        offset = self.num_tasks
        shifted = tuple(Task(t.index + offset, t.name, t.members) for t in new.tasks)
        return Vocabulary(
            datasets=self.datasets + new.datasets,
            tasks=self.tasks + shifted,
            modalities=self.modalities + tuple(m for m in new.modalities if m not in self.modalities),
            dataset_modality={**self.dataset_modality, **new.dataset_modality},
            label_map={
                **self.label_map,
                **{d: tuple((k + offset, v) for k, v in m) for d, m in new.label_map.items()},
            },
            ignore_value={**self.ignore_value, **new.ignore_value},
            regions_class_order={**self.regions_class_order, **new.regions_class_order},
        )

    def dataset_tasks(self, dataset: str) -> list[tuple[int, str, tuple[int, ...]]]:
        """``(global task index, label name, label values)`` of every label of ``dataset``, in file order."""
        names = {m: t.index for t in self.tasks for m in t.members}
        out = []
        for k, values in self.label_map[dataset]:
            label = next(lbl for (d, lbl), idx in names.items() if d == dataset and idx == k)
            out.append((k, label, values))
        return out

    def describe(self) -> str:
        lines = [f"{self.num_tasks} tasks, {len(self.modalities)} modalities ({', '.join(self.modalities)})"]
        for t in self.tasks:
            lines.append(f"  {t.index:3d} {' = '.join(f'{d}/{lbl}' for d, lbl in t.members)}")
        return "\n".join(lines)


def build_vocabulary(collection: CollectionConfig, manifests: list[DatasetManifest]) -> Vocabulary:
    """Tasks in dataset order then label order; declared shared labels are merged into one task."""
    by_name = {m.name: m for m in manifests}
    known = {f"{m.name}/{lbl}" for m in manifests for lbl in m.labels}
    group_of: dict[str, int] = {}
    for gi, group in enumerate(collection.shared_labels):
        for member in group:
            if member not in known:
                raise MosaicSegError(
                    f"{collection.source}: shared_labels names '{member}', which no dataset declares. Fix: use "
                    f"'Dataset/label' with a label from that dataset.json (known: {sorted(known)[:8]}...)."
                )
            if member in group_of:
                raise MosaicSegError(
                    f"{collection.source}: '{member}' appears in two shared_labels groups. Fix: merge the groups."
                )
            group_of[member] = gi
    tasks: list[list[tuple[str, str]]] = []
    group_task: dict[int, int] = {}
    label_map: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for entry in collection.datasets:
        m = by_name[entry.name]
        label_map[m.name] = []
        for label, values in m.labels.items():
            key = f"{m.name}/{label}"
            if key in group_of and group_of[key] in group_task:
                k = group_task[group_of[key]]
                tasks[k].append((m.name, label))
            else:
                k = len(tasks)
                tasks.append([(m.name, label)])
                if key in group_of:
                    group_task[group_of[key]] = k
            label_map[m.name].append((k, values))
    dataset_modality = {}
    for entry in collection.datasets:
        dataset_modality[entry.name] = entry.modality or channel_signature(by_name[entry.name].channel_names)
    modalities = tuple(dict.fromkeys(dataset_modality.values()))
    return Vocabulary(
        datasets=tuple(e.name for e in collection.datasets),
        tasks=tuple(Task(i, f"{ms[0][0]}/{ms[0][1]}", tuple(ms)) for i, ms in enumerate(tasks)),
        modalities=modalities,
        dataset_modality=dataset_modality,
        label_map={k: tuple(v) for k, v in label_map.items()},
        ignore_value={e.name: by_name[e.name].ignore_value for e in collection.datasets},
        regions_class_order={e.name: by_name[e.name].regions_class_order for e in collection.datasets},
    )
