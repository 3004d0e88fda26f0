"""Overlap and surface metrics of one binary prediction against one binary reference.

:func:`case_metrics` returns Dice, IoU, HD95 (mm) and NSD (normalised surface Dice at a tolerance in mm)
for one (case, label). Surface distances come from MONAI (``compute_hausdorff_distance`` with
``percentile=95`` and ``compute_surface_dice``), which measure Euclidean distances between the edge voxels
of both masks (a voxel of the mask with a background neighbour along an axis) with voxel coordinates
scaled by the spacing, so anisotropic spacing is honoured. HD95 is the larger of the two directed 95th
percentiles (linear interpolation); NSD is the fraction of edge voxels of both masks within the tolerance
of the other mask's edge (``<=``, edge voxels counted, not surface areas).

Empty masks (:data:`EMPTY_CONVENTIONS`) follow nnU-Net for Dice and MONAI for NSD:

=====================  ======  ======  =======  ======  ==============
reference, prediction  dice    iou     hd95     nsd     ``status``
=====================  ======  ======  =======  ======  ==============
both non-empty         value   value   value    value   ``ok``
both empty             NaN     NaN     NaN      NaN     ``both_empty``
reference empty        0       0       NaN      0       ``ref_empty``
prediction empty       0       0       NaN      0       ``pred_empty``
=====================  ======  ======  =======  ======  ==============

A NaN is excluded from every mean and counted (``n_nan`` per label and metric, plus the ``status``
counts), so a reader sees how many cases a mean rests on. HD95 is NaN rather than infinite when exactly
one mask is empty: a distance to nothing is undefined, and an infinity would make every mean infinite.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

METRICS = ("dice", "iou", "hd95", "nsd")
EMPTY_CONVENTIONS = {
    "both_empty": {"dice": math.nan, "iou": math.nan, "hd95": math.nan, "nsd": math.nan},
    "ref_empty": {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "nsd": 0.0},
    "pred_empty": {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "nsd": 0.0},
}


def dice_from_counts(tp: int, fp: int, fn: int) -> float:
    """Dice ``2 tp / (2 tp + fp + fn)`` of voxel counts; NaN when both masks are empty (nnU-Net). Used per case
    here and over counts summed across cases for the training loop's pseudo-Dice."""
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator > 0 else math.nan


def region_mask(label_map: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``(X, Y[, Z])`` bool: voxels of the integer ``label_map`` whose value is one of ``values``.

    A plain label is a one-value region; an nnU-Net region label such as ``"Liver": [1, 2]`` covers every
    voxel labelled 1 or 2.
    """
    return np.isin(label_map, np.asarray(list(values)))


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus one voxel (clamped at the image border).

    Distances are translation invariant and the edges do not change (the margin keeps a background voxel
    next to every interior boundary, and the image border stays the image border), while MONAI then
    converts only the box, not the whole volume, to float tensors.
    """
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    return pred[tuple(box)], ref[tuple(box)]


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], nsd_tolerance_mm: float = 2.0
) -> dict[str, float | int | str]:
    """Metrics of one binary prediction against one binary reference.

    Args:
        pred: ``(X, Y[, Z])`` bool prediction mask.
        ref: ``(X, Y[, Z])`` bool reference mask, same shape.
        spacing: voxel size in mm per axis of the arrays (``Geometry.spacing``).
        nsd_tolerance_mm: distance (mm) up to which a boundary voxel counts as correct for NSD.

    Returns:
        ``dice``, ``iou``, ``hd95`` (mm), ``nsd`` as floats (NaN where undefined, see the module docstring),
        ``n_ref`` and ``n_pred`` voxel counts, and ``status`` (``ok``, ``both_empty``, ``ref_empty`` or
        ``pred_empty``).
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}D mask")
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm}")
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    counts: dict[str, float | int | str] = {"n_ref": n_ref, "n_pred": n_pred}
    if n_ref == 0 or n_pred == 0:
        status = "both_empty" if n_ref == n_pred else ("ref_empty" if n_ref == 0 else "pred_empty")
        # decided here rather than by MONAI, which warns and returns inf for HD on an empty mask
        return {**EMPTY_CONVENTIONS[status], **counts, "status": status}
    tp = int(np.count_nonzero(pred & ref))
    fp, fn = n_pred - tp, n_ref - tp
    pred_box, ref_box = _crop_to_union(pred, ref)
    # MONAI wants (batch, class, X, Y[, Z]) tensors; one batch item, one class, no background channel
    y_pred = torch.from_numpy(np.ascontiguousarray(pred_box))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(ref_box))[None, None]
    spacing_list = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI passes one of its own deprecated arguments internally; the FutureWarning is not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing_list)
        nsd = compute_surface_dice(
            y_pred.float(),
            y.float(),
            class_thresholds=[float(nsd_tolerance_mm)],
            include_background=True,
            spacing=spacing_list,
        )
    return {
        "dice": dice_from_counts(tp, fp, fn),
        "iou": tp / (tp + fp + fn),
        "hd95": float(hd95[0, 0]),
        "nsd": float(nsd[0, 0]),
        **counts,
        "status": "ok",
    }
