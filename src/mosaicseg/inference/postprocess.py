"""From per-task probabilities on the preprocessed grid to label maps on the original grid.

MultiTalent outputs one independent sigmoid per task, so a dataset's label map is derived by rule:
a voxel gets the label of the dataset task with the highest probability if that probability is > 0.5, else
background; region datasets follow nnU-Net's ``regions_class_order`` (regions painted in order, later ones
on top). Optional largest-connected-component filtering per task: asked for, or as a run decided it on its
final validation (:func:`decide_largest_component`, nnU-Net's post-processing rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cc3d
import numpy as np

from mosaicseg.data.preprocess import resample_image


def restore_probabilities(prob: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """``prob`` ``(K, *S_resampled)`` → ``(K, *S_original)`` on the canonical original grid: linear resampling
    to the cropped shape (in-plane only, nearest along nnU-Net's separate axis), zeros outside the crop box."""
    cropped = resample_image(
        prob,
        meta["spacing_target"],
        meta["spacing_original"],
        order=1,
        separate_axis=meta.get("separate_axis"),
        new_shape=meta["shape_cropped"],
    )
    if cropped is prob:  # nothing to resample: resample_image handed back the caller's array
        cropped = cropped.copy()
    np.clip(cropped, 0.0, 1.0, out=cropped)
    if list(cropped.shape[1:]) == list(meta["shape_original"]):  # nothing was cropped: no second full-size copy
        return cropped
    out = np.zeros((prob.shape[0], *meta["shape_original"]), dtype=np.float32)
    out[(slice(None), *(slice(lo, hi) for lo, hi in meta["bbox"]))] = cropped
    return out


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a bool mask ``(*S)`` (26-/8-connectivity), or the mask if empty."""
    if not mask.any():
        return mask
    connectivity = 26 if mask.ndim == 3 else 8
    return cc3d.largest_k(mask.astype(np.uint8), k=1, connectivity=connectivity) > 0


def decide_largest_component(
    plain: dict[str, float], largest: dict[str, float], cases: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """Per task, whether predictions keep only their largest connected component: yes where that raised the task's
    validation Dice (nnU-Net decides its post-processing the same way, on cross-validation predictions). ``plain``
    and ``largest``: task name → Dice without and with the filter (NaN where the task has no reference voxel and
    no prediction: no evidence, so no filter); ``cases``: task name → validation cases it was measured on."""
    out = {}
    for name, before in plain.items():
        after = largest[name]
        keep = bool(after > before) if not (math.isnan(before) or math.isnan(after)) else False
        out[name] = {"largest_component": keep, "dice": before, "dice_largest_component": after, "cases": cases[name]}
    return out


def ensemble_largest_component(decisions: Sequence[dict[str, dict[str, Any]] | None]) -> dict[str, bool]:
    """Task name → whether an ensemble of folds with these decisions (:func:`decide_largest_component`; None: a
    fold without one) keeps the largest component: only where every fold decided so, since the filter can delete a
    true structure when a false positive is larger."""
    if not decisions or any(d is None for d in decisions):
        return {}
    names = set.intersection(*(set(d) for d in decisions if d is not None))
    return {n: all(bool(d[n]["largest_component"]) for d in decisions if d is not None) for n in sorted(names)}


def labels_from_probabilities(
    prob: np.ndarray,
    values: Sequence[Sequence[int]],
    regions_class_order: Sequence[int] | None = None,
    largest_component: bool = False,
) -> np.ndarray:
    """A dataset's label map ``(*S)`` uint8/int16 from its tasks' probabilities ``(T, *S)``.

    ``values[t]`` are the dataset's label values of task ``t`` (a region has several). Without regions:
    ``argmax_t prob`` where ``max_t prob > 0.5``, labelled ``values[t][0]``. With ``regions_class_order``:
    each region ``t`` with ``prob > 0.5`` is painted ``regions_class_order[t]`` in turn.
    """
    masks = prob > 0.5
    if largest_component:
        masks = np.stack([keep_largest_component(m) for m in masks]) if len(masks) else masks
    dtype = np.uint8 if max((max(v) for v in values), default=0) < 256 else np.int16
    seg = np.zeros(prob.shape[1:], dtype=dtype)
    if len(values) == 0:
        return seg
    if regions_class_order is not None:
        for t, label in enumerate(regions_class_order):
            seg[masks[t]] = label
        return seg
    winner = np.argmax(np.where(masks, prob, -1.0), axis=0)
    lut = np.array([v[0] for v in values], dtype=dtype)
    any_fg = masks.any(axis=0)
    seg[any_fg] = lut[winner[any_fg]]
    return seg
