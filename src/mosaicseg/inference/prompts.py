"""Box prompts at prediction (KA²ER's student): where the boxes come from, how they reach the model's grid, and
the tile forward that prompts each sliding-window tile with its share of the boxes.

Sources (each gives, per case, ``task name → (low, high)`` corners in the input file's voxel index order,
``high`` exclusive):

- :class:`PromptFile` — ``--prompts boxes.json``::

      {"CASE_ID": {"Dataset/label": {"min": [x, y, z], "max": [x, y, z], "space": "voxel"}}}

  ``voxel``: indices of the file as stored (ITK/NIfTI index order, ``max`` inclusive); ``world``: physical
  points in mm (LPS, as ITK reports them), converted through the file's origin, spacing and direction. A task
  may be given as ``label`` alone with ``--dataset``.
- :class:`OracleBoxes` — the reference label files of the cases (``--oracle-boxes FOLDER``): each task's
  bounding box; for evaluation only, and marked so in ``predict.json``.
- :class:`AutoBoxes` — a first pass of any MosaicSeg model (``--auto-boxes RUN``): its masks' bounding boxes.

A box is mapped to the preprocessed grid (reoriented, cropped, resampled: :func:`preprocessed_box`), and each
tile gets it in its own normalised coordinates. A tile the box misses gets no box, and the task's logits
outside the box (grown by ``margin`` of its size on each side) are set to -20: the box says where the
structure is not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosaicseg.data.io import CANONICAL_ORIENTATION, Geometry
from mosaicseg.errors import MosaicSegError

Box = tuple[np.ndarray, np.ndarray]  # (low, high), high exclusive, float
NOT_ASKED = -20.0
BOX_MARGIN = 0.1


def _file_to_canonical_axes(geometry: Geometry) -> list[tuple[int, bool]]:
    """For each canonical axis, the file axis it comes from and whether it runs the other way."""
    stored = geometry.orientation
    nd = len(geometry.shape)
    if not stored or len(stored) != nd:
        return [(i, False) for i in range(nd)]  # 2D images and files without orientation keep their axes
    pairs = ("LR", "PA", "SI")
    pair_of = {letter: p for p in pairs for letter in p}
    out = []
    for letter in CANONICAL_ORIENTATION[:nd]:
        j = next(i for i, x in enumerate(stored) if pair_of[x] == pair_of[letter])
        out.append((j, stored[j] != letter))
    return out


def canonical_box(low: Sequence[float], high: Sequence[float], geometry: Geometry) -> Box:
    """A box in file index coordinates (``high`` exclusive) → the canonical grid's (``read_image``'s array)."""
    low, high = list(low), list(high)
    if geometry.squeezed_axis is not None:  # a 2D NIfTI: its singleton axis is not in the array
        del low[geometry.squeezed_axis], high[geometry.squeezed_axis]
    shape = geometry.shape
    axes = _file_to_canonical_axes(geometry)
    lo, hi = np.zeros(len(axes)), np.zeros(len(axes))
    for c, (j, flip) in enumerate(axes):
        n = shape[c]
        lo[c], hi[c] = (n - high[j], n - low[j]) if flip else (low[j], high[j])
    return lo, hi


def preprocessed_box(box: Box, meta: dict[str, Any]) -> Box:
    """A canonical-grid box → the preprocessed grid (cropped to the non-zero region, resampled), as ``meta``
    (:func:`~mosaicseg.data.preprocess.preprocess_arrays`) did to the image."""
    lo, hi = box
    crop_lo = np.asarray([b[0] for b in meta["bbox"]], dtype=float)
    scale = np.asarray(meta["shape_resampled"], dtype=float) / np.asarray(meta["shape_cropped"], dtype=float)
    return (lo - crop_lo) * scale, (hi - crop_lo) * scale


def world_to_index(point: Sequence[float], geometry: Geometry) -> np.ndarray:
    """A physical point (mm) → continuous file index coordinates."""
    n = geometry.file_ndim
    direction = np.asarray(geometry.file_direction, dtype=float).reshape(n, n)
    offset = np.asarray(point, dtype=float) - np.asarray(geometry.file_origin, dtype=float)
    return np.linalg.solve(direction * np.asarray(geometry.file_spacing, dtype=float), offset)


def bbox_of(mask: np.ndarray) -> Box | None:
    """The bounding box ``(low, high)`` (high exclusive) of a boolean array, or None when it is empty."""
    where = np.nonzero(mask)
    if not where[0].size:
        return None
    return np.asarray([w.min() for w in where], float), np.asarray([w.max() + 1 for w in where], float)


class PromptFile:
    """Boxes from a JSON file (see the module docstring); problems name the file and the box."""

    def __init__(self, path: str | Path, data: dict[str, Any] | None = None) -> None:
        """``path``: the JSON file; or ``data``, the same mapping in memory (``path`` then names it in errors)."""
        self.path = Path(path)
        if data is None:
            if not self.path.is_file():
                raise MosaicSegError(
                    f"{self.path}: prompts file not found. Fix: give the boxes JSON (see predict --help)."
                )
            try:
                data = json.loads(self.path.read_text())
            except ValueError as exc:
                raise MosaicSegError(f"{self.path}: not valid JSON ({exc}). Fix the file.") from exc
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise MosaicSegError(f"{self.path}: must map case ids to {{task: box}}. Fix: see predict --help.")
        self.data: dict[str, dict[str, Any]] = data
        self.kind = "file"

    def boxes(self, case_id: str, geometry: Geometry, resolve: Any) -> dict[int, Box]:
        """``task index → file-index box`` of ``case_id`` (``resolve``: task name → index)."""
        out = {}
        for task, box in self.data.get(case_id, {}).items():
            where = f"{self.path}: case {case_id!r}, box of {task!r}"
            if not isinstance(box, dict) or "min" not in box or "max" not in box:
                raise MosaicSegError(f"{where}: needs min and max (and space voxel or world). Fix it.")
            space = box.get("space", "voxel")
            lo, hi = np.asarray(box["min"], dtype=float), np.asarray(box["max"], dtype=float)
            if lo.shape != (geometry.file_ndim,) or hi.shape != lo.shape:
                raise MosaicSegError(f"{where}: min and max need {geometry.file_ndim} coordinates each. Fix it.")
            if space == "world":
                a, b = world_to_index(lo, geometry), world_to_index(hi, geometry)
                lo, hi = np.floor(np.minimum(a, b) + 0.5), np.floor(np.maximum(a, b) + 0.5)
            elif space != "voxel":
                raise MosaicSegError(f"{where}: space {space!r} is neither voxel nor world. Fix it.")
            hi = hi + 1  # max is inclusive in the file
            size = np.asarray(geometry.file_shape, dtype=float)
            if (lo > hi - 1).any() or (hi <= 0).any() or (lo >= size).any():
                raise MosaicSegError(
                    f"{where}: [{lo.tolist()}, {(hi - 1).tolist()}] is empty or outside the image of "
                    f"{geometry.file_shape} voxels. Fix the box."
                )
            out[resolve(task)] = (np.clip(lo, 0, size), np.clip(hi, 0, size))
        return out


class OracleBoxes:
    """Boxes from each case's reference label file (``FOLDER/CASE.ext``): for evaluation only."""

    def __init__(self, folder: str | Path, values_of: dict[int, tuple[int, ...]]) -> None:
        self.folder, self.values_of = Path(folder), values_of
        self.kind = "oracle"

    def boxes(self, case_id: str, geometry: Geometry, resolve: Any) -> dict[int, Box]:
        import SimpleITK as sitk

        files = sorted(p for p in self.folder.glob(f"{case_id}.*") if p.is_file())
        if not files:
            raise MosaicSegError(f"{self.folder}: no reference label for case {case_id}. Fix: --oracle-boxes FOLDER.")
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(files[0]))).T  # file index order
        out = {}
        for task, values in self.values_of.items():
            box = bbox_of(np.isin(labels, values))
            if box is not None:
                out[task] = box
        return out


class AutoBoxes:
    """Boxes from a first pass of another model (:class:`~mosaicseg.inference.predictor.Predictor`)."""

    def __init__(self, predictor: Any, dataset: str | None) -> None:
        self.predictor, self.dataset = predictor, dataset
        self.kind = "auto"

    def boxes_from_file(self, files: Sequence[Path], names: dict[int, str]) -> dict[int, Box]:
        first = self.predictor.predict([str(f) for f in files], dataset=self.dataset, tasks=list(names.values()))
        out = {}
        for task, name in names.items():
            mask = first.masks.get(name)
            box = bbox_of(mask) if mask is not None else None
            if box is not None:
                out[task] = box
        return out


class PromptedTiles:
    """The tile forward of a prompted prediction: ``(tiles (N, C, *P), windows, flip, shape) → logits (N, K, *P)``
    (see the module docstring). ``boxes``: task index → preprocessed-grid box."""

    wants_window = True

    def __init__(
        self, model: torch.nn.Module, num_tasks: int, asked: Sequence[int], dataset: int, modality: int,
        boxes: dict[int, Box], margin: float = BOX_MARGIN,
    ) -> None:  # fmt: skip
        self.model, self.num_tasks, self.dataset, self.modality = model, num_tasks, dataset, modality
        device = next(model.parameters()).device
        self.tasks = torch.zeros(num_tasks, dtype=torch.bool, device=device)
        self.tasks[list(asked)] = True
        self.boxes, self.margin = boxes, margin

    def __call__(
        self, x: torch.Tensor, windows: list[list[tuple[int, int]]], flip: Sequence[int], shape: Sequence[int]
    ) -> torch.Tensor:
        n, dims = x.shape[0], x.ndim - 2
        boxes = torch.zeros(n, self.num_tasks, 2, dims, device=x.device)
        valid = torch.zeros(n, self.num_tasks, dtype=torch.bool, device=x.device)
        keep = torch.ones(n, self.num_tasks, *x.shape[2:], dtype=torch.bool, device=x.device)
        for k, (lo, hi) in self.boxes.items():
            lo, hi = lo.copy(), hi.copy()
            for a in flip:  # the image was mirrored along a: so is the box
                lo[a], hi[a] = shape[a] - hi[a], shape[a] - lo[a]
            grow = (hi - lo) * self.margin
            for i, window in enumerate(windows):
                start = np.asarray([w[0] for w in window], float)
                size = np.asarray([w[1] - w[0] for w in window], float)
                local_lo, local_hi = (lo - start) / size, (hi - start) / size
                if (local_hi > 0).all() and (local_lo < 1).all():
                    boxes[i, k, 0] = torch.as_tensor(local_lo.clip(0, 1))
                    boxes[i, k, 1] = torch.as_tensor(local_hi.clip(0, 1))
                    valid[i, k] = True
                region = [slice(int(max(0, np.floor(a - g - s))), int(max(0, np.ceil(b + g - s))))
                          for a, b, g, s in zip(lo, hi, grow, start, strict=True)]  # fmt: skip
                inside = torch.zeros(x.shape[2:], dtype=torch.bool, device=x.device)
                inside[tuple(region)] = True
                keep[i, k] = inside
        tasks = self.tasks.expand(n, -1)
        dataset = torch.full((n,), self.dataset, dtype=torch.long, device=x.device)
        modality = torch.full((n,), self.modality, dtype=torch.long, device=x.device)
        prompts = {"boxes": boxes, "box_valid": valid}
        logits = self.model(x, modality, tasks=tasks, dataset=dataset, prompts=prompts).logits[0]
        return torch.where(keep, logits, torch.full_like(logits, NOT_ASKED))
