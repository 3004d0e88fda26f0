"""What ``predict`` writes for one case besides the probabilities: label maps under per-task thresholds (each
source dataset's own numbering, or one merged map over every asked task), per-task volumes, and DICOM-SEG.

Every asked task is restored to the original grid once (:func:`export_case`); its mask (probability above the
task's threshold, default 0.5, then optionally its largest component) feeds every output, so a task's volume
in ``statistics.csv`` is exactly the voxel count of its own mask, independent of how overlapping tasks are
resolved in a label map.

Merged map: tasks are numbered 1..N in the asked order (global task order); a voxel takes the task with the
highest probability among the tasks above their threshold. Its ``dataset.json`` names each label by its
dataset's label name, prefixed ``Dataset/`` only where two asked tasks share that name.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mosaicseg.atomic import atomic_path, atomic_write, write_json_atomic
from mosaicseg.data.io import Geometry, to_file_order
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.postprocess import keep_largest_component, restore_probabilities

DEFAULT_THRESHOLD = 0.5
STATISTICS_CSV = "statistics.csv"
STATISTICS_JSON = "statistics.json"
STATISTICS_COLUMNS = ("case_id", "task", "voxels", "volume_ml", "area_mm2")
DICOM_SEG_SUFFIX = ".seg.dcm"
# dataset → rows (position in the asked tasks, position among the dataset's labels, label name, label values)
Groups = dict[str, list[tuple[int, int, str, tuple[int, ...]]]]


# --------------------------------------------------------------------------------------------- names, thresholds
def merged_label_names(vocabulary: Vocabulary, task_ids: Sequence[int]) -> list[str]:
    """Label names of the merged map, in ``task_ids`` order: each task's (first member's) label name, or its
    ``Dataset/label`` name where another asked task has the same label name (``Liver`` of a CT and of an MR)."""
    tasks = [vocabulary.tasks[k] for k in task_ids]
    labels = [t.members[0][1] for t in tasks]
    return [t.name if labels.count(label) > 1 else label for t, label in zip(tasks, labels, strict=True)]


def merged_dataset_json(
    names: Sequence[str],
    file_ending: str,
    channel_names: Sequence[str],
    tasks: Sequence[str],
    thresholds: Sequence[float],
) -> dict[str, Any]:
    """nnU-Net-style ``dataset.json`` of the merged maps (``evaluate --pred-dataset-json`` reads it)."""
    return {
        "channel_names": {str(i): c for i, c in enumerate(channel_names)},
        "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(names)}},
        "file_ending": file_ending,
        "mosaicseg": {
            "merged": True,
            "tasks": list(tasks),
            "thresholds": dict(zip(tasks, (float(t) for t in thresholds), strict=True)),
            "rule": "highest probability among the tasks above their threshold",
        },
    }


def write_dataset_json(path: Path, content: dict[str, Any], overwrite: bool) -> Path:
    """Write ``content`` at ``path`` unless an identical file is there; another numbering already there is an
    error without ``overwrite`` (label maps of two numberings in one folder could not be told apart)."""
    if path.is_file():
        try:
            same = json.loads(path.read_text()) == content
        except (OSError, ValueError):
            same = False
        if same:
            return path
        if not overwrite:
            raise MosaicSegError(
                f"{path}: exists and describes another label numbering (other tasks, thresholds or file ending). "
                "Fix: choose another output folder (-o) or pass --overwrite to re-predict every case."
            )
    return write_json_atomic(path, content)


def parse_thresholds(items: Sequence[str]) -> list[tuple[str, float]]:
    """``["Liver=0.4", ...]`` → ``[("Liver", 0.4), ...]``; each value in the open interval (0, 1)."""
    out = []
    for item in items:
        name, sep, value = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise MosaicSegError(
                f"--threshold {item!r}: expected TASK=VALUE. Fix: write e.g. --threshold Liver=0.4 "
                "(TASK as --tasks takes it: label or Dataset/label)."
            )
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not 0.0 < number < 1.0:  # also rejects NaN
            raise MosaicSegError(
                f"--threshold {item!r}: the value must be a probability strictly between 0 and 1. "
                f"Fix: e.g. --threshold {name}=0.4 (0.5 is the default)."
            )
        out.append((name, number))
    return out


def task_thresholds(items: Sequence[str], task_ids: Sequence[int], resolve: Callable[[str], int]) -> list[float]:
    """Threshold ``(T,)`` of each asked task: ``--threshold`` items (``resolve`` maps a task name as ``--tasks``
    takes it to its global index), else :data:`DEFAULT_THRESHOLD`."""
    cut = [DEFAULT_THRESHOLD] * len(task_ids)
    given: dict[int, tuple[str, float]] = {}
    for name, value in parse_thresholds(items):
        try:
            k = resolve(name)
        except MosaicSegError as exc:
            raise MosaicSegError(f"--threshold {name}={value}: {exc}") from None
        if k not in task_ids:
            raise MosaicSegError(
                f"--threshold {name}={value}: the task is not among the predicted tasks. Fix: add it to --tasks "
                "or drop the threshold."
            )
        if k in given and given[k][1] != value:
            raise MosaicSegError(
                f"--threshold {name}={value}: the task already has threshold {given[k][1]} (as {given[k][0]}). "
                "Fix: give one threshold per task."
            )
        given[k] = (name, value)
        cut[list(task_ids).index(k)] = value
    return cut


# --------------------------------------------------------------------------------------------- label maps
class _HighestProbability:
    """A label map ``(*S)`` built one task at a time: a voxel takes the value of the task with the highest
    probability among those whose mask holds it (strictly greater: on ties the earlier task keeps it)."""

    def __init__(self, shape: tuple[int, ...], dtype: type) -> None:
        self.seg = np.zeros(shape, dtype=dtype)
        self.best = np.full(shape, -1.0, dtype=np.float32)

    def add(self, value: int, mask: np.ndarray, p: np.ndarray) -> None:
        win = mask & (p > self.best)
        self.best[win] = p[win]
        self.seg[win] = value

    def finish(self) -> np.ndarray:
        return self.seg


class _Regions:
    """nnU-Net regions: each region's mask painted with its ``regions_class_order`` value in the dataset's
    order (later regions on top), whatever the order the tasks arrive in."""

    def __init__(self, shape: tuple[int, ...], dtype: type, order: Sequence[int]) -> None:
        self.seg = np.zeros(shape, dtype=dtype)
        self.masks: dict[int, np.ndarray] = {}
        self.order = list(order)

    def add(self, row: int, mask: np.ndarray, p: np.ndarray) -> None:
        self.masks[row] = mask

    def finish(self) -> np.ndarray:
        for row in sorted(self.masks):
            self.seg[self.masks[row]] = self.order[row]
        return self.seg


def _dtype(top: int) -> type:
    return np.uint8 if top < 256 else np.int16


@dataclass
class CaseMaps:
    """One case's outputs on the canonical original grid ``(*S)``: ``labels`` per source dataset (its own
    numbering), ``merged`` (1..T), ``voxels[t]`` of task ``t``'s mask, and the masks ``(T, *S)`` if kept."""

    labels: dict[str, np.ndarray]
    merged: np.ndarray | None
    voxels: list[int]
    masks: np.ndarray | None


def export_case(
    prob: np.ndarray,
    meta: dict[str, Any],
    groups: Groups,
    regions: dict[str, Sequence[int] | None],
    thresholds: Sequence[float],
    *,
    largest_component: bool | Sequence[bool] = False,
    merged: bool = False,
    keep_masks: bool = False,
    on_probability: Callable[[int, np.ndarray], None] | None = None,
    outside: np.ndarray | None = None,
) -> CaseMaps:
    """Label maps, voxel counts and masks of one case from its probabilities ``(T, *S_resampled)`` (channel
    ``t`` is asked task ``t``; :meth:`Predictor.predict_resampled`).

    ``groups``: the source datasets whose label maps to build (:meth:`Predictor.outputs_by_dataset`; empty for
    none); ``regions[d]``: the ``regions_class_order`` value of each of ``groups[d]``'s rows, or None (the
    highest-probability rule). ``thresholds[t]``: task ``t``'s mask is ``p > thresholds[t]``. Only one task's
    probability map exists at the original resolution at a time; ``on_probability(t, p)`` receives it
    ``(*S_original)`` before it is dropped. ``outside`` ``(*S_original)`` bool: voxels whose probability is set
    to 0 first, for every task (the region outside the image, :func:`~mosaicseg.data.preprocess.outside_image`).
    ``largest_component``: for every task, or per task, keep only the mask's largest connected component."""
    shape = tuple(int(s) for s in meta["shape_original"])
    n = prob.shape[0]
    if len(thresholds) != n:
        raise ValueError(f"{len(thresholds)} thresholds for {n} tasks")
    kept = [largest_component] * n if isinstance(largest_component, bool) else list(largest_component)
    if len(kept) != n:
        raise ValueError(f"{len(kept)} largest-component choices for {n} tasks")
    rules: dict[str, _HighestProbability | _Regions] = {}
    # task position → (dataset, row, value written for it)
    consumers: dict[int, list[tuple[str, int, int]]] = {}
    for d, rows in groups.items():
        top = max((max(r[3]) for r in rows), default=0)
        order = regions.get(d)
        rules[d] = (
            _Regions(shape, _dtype(max([top, *order])), order) if order else _HighestProbability(shape, _dtype(top))
        )
        for j, r in enumerate(rows):
            consumers.setdefault(r[0], []).append((d, j, r[3][0]))
    union = _HighestProbability(shape, _dtype(n)) if merged else None
    masks = np.zeros((n, *shape), dtype=bool) if keep_masks else None
    voxels = []
    for t in range(n):
        p = restore_probabilities(prob[t : t + 1].astype(np.float32), meta)[0]
        if outside is not None:
            p[outside] = 0.0
        if on_probability is not None:
            on_probability(t, p)
        mask = p > thresholds[t]
        if kept[t]:
            mask = keep_largest_component(mask)
        voxels.append(int(np.count_nonzero(mask)))
        for d, row, value in consumers.get(t, []):
            rules[d].add(row if isinstance(rules[d], _Regions) else value, mask, p)
        if union is not None:
            union.add(t + 1, mask, p)
        if masks is not None:
            masks[t] = mask
        del p
    return CaseMaps(
        labels={d: rule.finish() for d, rule in rules.items()},
        merged=union.finish() if union is not None else None,
        voxels=voxels,
        masks=masks,
    )


# --------------------------------------------------------------------------------------------- statistics
def voxel_size(geometry: Geometry) -> tuple[float | None, float | None]:
    """``(voxel volume in mm³, None)`` of a 3D file (a one-slice NIfTI included: its slice thickness counts),
    ``(None, pixel area in mm²)`` of a 2D file (PNG: 1 × 1 pixel units)."""
    size = float(np.prod(geometry.file_spacing))
    return (size, None) if geometry.file_ndim == 3 else (None, size)


class StatisticsTable:
    """Per-case, per-task voxel counts and volumes (mL = voxels × voxel volume in mm³ / 1000, on the original
    grid), written as ``statistics.csv`` (one row per case and task) and ``statistics.json`` (per case).

    A resumed prediction keeps the rows of the cases it skips from the ``statistics.json`` already in the
    folder, provided it was made for the same tasks and thresholds."""

    def __init__(self, output: Path, tasks: Sequence[str], thresholds: Sequence[float]) -> None:
        self.output = output
        self.tasks = list(tasks)
        self.thresholds = {t: float(v) for t, v in zip(tasks, thresholds, strict=True)}
        self.cases: dict[str, dict[str, Any]] = {}
        self._previous: dict[str, dict[str, Any]] = {}
        old = output / STATISTICS_JSON
        if old.is_file():
            try:
                data = json.loads(old.read_text())
                if data.get("tasks") == self.tasks and data.get("thresholds") == self.thresholds:
                    self._previous = dict(data.get("cases", {}))
            except (OSError, ValueError, AttributeError):
                self._previous = {}  # unreadable: the skipped cases are reported as missing

    def add(self, case_id: str, voxels: Sequence[int], geometry: Geometry) -> None:
        volume, area = voxel_size(geometry)
        self.cases[case_id] = {
            "voxel_volume_mm3": volume,
            "pixel_area_mm2": area,
            "tasks": {
                task: {
                    "voxels": int(v),
                    "volume_ml": v * volume / 1000.0 if volume is not None else None,
                    "area_mm2": v * area if area is not None else None,
                }
                for task, v in zip(self.tasks, voxels, strict=True)
            },
        }

    def keep(self, case_id: str) -> bool:
        """Carry a skipped case's earlier rows over; False if there are none to carry."""
        if case_id not in self._previous:
            return False
        self.cases[case_id] = self._previous[case_id]
        return True

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"case_id": case_id, "task": task, **values}
            for case_id, case in self.cases.items()
            for task, values in case["tasks"].items()
        ]

    def write(self) -> list[Path]:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=STATISTICS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: "" if row[k] is None else row[k] for k in STATISTICS_COLUMNS})
        text = buffer.getvalue()
        csv_path = atomic_write(self.output / STATISTICS_CSV, lambda f: f.write(text), mode="w")
        json_path = write_json_atomic(
            self.output / STATISTICS_JSON,
            {"tasks": self.tasks, "thresholds": self.thresholds, "cases": self.cases},
        )
        return [csv_path, json_path]


# --------------------------------------------------------------------------------------------- DICOM-SEG
def require_highdicom() -> None:
    """Fail before any prediction when ``--dicom-seg`` cannot be written."""
    try:
        import highdicom  # noqa: F401
        import pydicom  # noqa: F401
    except ImportError:
        raise MosaicSegError(
            "--dicom-seg needs the optional package highdicom, which is not installed. "
            "Fix: pip install 'mosaicseg[dicom]' (or drop --dicom-seg)."
        ) from None


def write_dicom_seg(
    path: Path, masks: np.ndarray, geometry: Geometry, names: Sequence[str], source_files: Sequence[Path]
) -> Path:
    """A binary DICOM-SEG at ``path`` with one segment per task (``names``: segment labels) from the masks
    ``(T, *S)`` on the canonical grid of the series ``source_files`` (slice files in the series reader's order;
    frame ``z`` of the file grid lies on ``source_files[z]``). Empty slices of a segment are left out."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    from mosaicseg import __version__

    folder = Path(source_files[0]).parent
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source_files]
    # (Z, Y, X, T): frames in slice-file order, rows × columns as in the slices' pixel data
    pixels = np.stack([to_file_order(m, geometry) for m in masks], axis=-1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="MosaicSeg",
        version=__version__,
        family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=name[:64],  # LO: at most 64 characters
            # generic codes: a task is a label name from a dataset.json, not a coded anatomical concept
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, name in enumerate(names)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=generate_uid(),
            series_number=9901,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="MosaicSeg",
            manufacturer_model_name="mosaicseg",
            software_versions=__version__,
            device_serial_number="0",
            series_description="MosaicSeg segmentation",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise MosaicSegError(
            f"{folder}: cannot build a DICOM-SEG for this series ({exc}); the NIfTI label map is written. "
            "Fix: check the series' DICOM attributes (e.g. Frame of Reference UID), or drop --dicom-seg."
        ) from exc
    with atomic_path(path, ".dcm") as tmp:
        seg.save_as(str(tmp))
    return path
