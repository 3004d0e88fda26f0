"""Dataset fingerprints → editable plans: per dataset spacing and normalisation, one shared network.

``plan(collection, workdir)`` writes four JSON files into ``workdir``: ``collection.json`` (the validated
collection), ``vocabulary.json`` (tasks and modalities), ``fingerprint.json`` (statistics read from every
case) and ``plans.json`` (derived settings, meant to be read and edited). They are read back through
:mod:`mosaicseg.data.workdir` (:func:`~mosaicseg.data.workdir.load_plans` and friends)::

    {"version": 1,
     "collection": {...},                  # CollectionConfig.to_dict(): which datasets, where
     "dim": 2 | 3,                         # every dataset of a collection has the same dimensionality
     "device": "cpu" | "cuda",             # the preset the network plan was sized for
     "datasets": {NAME: {
         "target_spacing": [sx, sy(, sz)], # resample every case to this (canonical axis order, mm)
         "original_median_spacing": [...], # for reference: the median spacing of the raw cases
         "median_shape": [...],            # median case shape after cropping and resampling
         "separate_axis": int | null,      # anisotropic axis resampled by nearest neighbour (nnU-Net)
         "spacing_note": "why",            # only where the target spacing was matched to the network's
                                           # anisotropy (match_anisotropy): thick slices made finer
         "normalization": [{               # one entry per channel, in channel order
             "channel": "T1", "scheme": "ct" | "ct_fixed" | "mr" | "zscore" | "rgb",
             "clip": [lo, hi] | null,      # fixed clip window (ct, ct_fixed)
             "mean": float | null, "std": float | null,   # dataset statistics (ct only; ct_fixed is per image)
             "percentiles": [lo, hi] | null,  # only "mr": per-image clip percentiles (null: plain z-score)
             "reason": "why this scheme"}],
         "image_order": 3,                 # spline order for images (1 is faster and smoother)
         "seg_order": 1}},                 # labels: per-label linear interpolation, threshold 0.5
     "common_spacing": null | [s, s(, s)], # set when every dataset was resampled to one spacing (Hermes)
     "network": {                          # ONE network shared by every dataset
         "patch_size": [...], "batch_size": int,
         "features": [f0, f1, ...],        # channels per stage
         "kernel_sizes": [[...], ...],     # conv kernel per stage and axis (1 on coarse axes, as nnU-Net)
         "strides": [[...], ...],          # downsampling of each stage (the first is all 1)
         "num_stages": int,
         "in_channels": int,               # most channels of any dataset
         "out_channels": int,              # number of global tasks
         "topology_spacing": [...],        # spacing the anisotropy decisions were made for (the datasets'
                                           # per-axis median target spacing, or with --topology-spacing max
                                           # the largest, or the common spacing)
         "precision": "fp32" | "amp",
         "memory_estimate_gb": float, "memory_budget_gb": float},
     "postprocessing": {NAME: {            # applied by the predictor (predict --background-outside auto)
         "background_outside_image": bool, # predictions outside the imaged region (zero in every channel,
                                           # connected to the border) are background: the dataset's images
                                           # have such a region and no training label lies in it
         "reason": "why"}}}

Changing ``datasets.*`` makes ``preprocess`` redo that dataset's cases; ``network`` and ``postprocessing`` may
be edited freely (keep ``patch_size`` divisible by the product of ``strides`` per axis).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from mosaicseg.atomic import write_json_atomic
from mosaicseg.data.collection import OpenCollection, open_collection
from mosaicseg.data.manifest import CaseFiles, DatasetManifest, read_case
from mosaicseg.data.preprocess import (
    ANISOTROPY_THRESHOLD,
    case_rng,
    check_percentiles,
    crop_to_nonzero,
    new_shape_for,
    outside_image,
    replace_nonfinite,
)
from mosaicseg.data.vocabulary import channel_signature
from mosaicseg.data.workdir import PLANS_VERSION, read_json
from mosaicseg.errors import MosaicSegError
from mosaicseg.progress import progress_bar

# 2: non-finite voxels replaced before sampling; no fixed-window statistics. 3: the region outside the image
FINGERPRINT_VERSION = 3
SAMPLES_PER_CASE = 10_000
CT_FIXED_WINDOW = (-990.0, 500.0)  # Hermes' fixed CT window (HU)
DEVICES = ("cpu", "cuda")
CT_NORMALIZATIONS = ("percentile", "fixed")
# which spacing the shared network's anisotropy is decided at (plan_network)
TOPOLOGY_SPACINGS = ("median", "max")
# thick-slice datasets on a network planned near-isotropic: resampled to its anisotropy, or kept (match_anisotropy)
ANISOTROPIES = ("match", "keep")
_MIN_FEATURE_MAP = 4  # nnU-Net: pool an axis only while its feature map stays ≥ 4 voxels


# --------------------------------------------------------------------------------------------- fingerprint
@dataclass(frozen=True)
class _CaseJob:
    dataset: str
    case: CaseFiles
    ignore_value: int | None
    seed: int


def _fingerprint_case(job: _CaseJob) -> dict[str, Any]:
    """Spacing, shapes and sampled intensities of one case (intensities: ``(C, N)`` float32 arrays)."""
    image, seg, geometry = read_case(job.case)
    shape_original = image.shape[1:]
    # as preprocess_arrays does, so that the statistics describe the images the network is trained on
    image = replace_nonfinite(image, job.case.images[0])
    foreground = seg > 0
    if job.ignore_value is not None:
        foreground &= seg != job.ignore_value
    outside = outside_image(image)
    outside_share = float(outside.mean())
    labels_outside = int(np.count_nonzero(foreground & outside))
    del outside
    image, _, bbox = crop_to_nonzero(image, seg)
    foreground = foreground[tuple(slice(lo, hi) for lo, hi in bbox)]
    rng = case_rng(job.seed, job.dataset, job.case.case_id)
    flat = image.reshape(image.shape[0], -1)
    fg_idx = np.flatnonzero(foreground)
    if len(fg_idx) > SAMPLES_PER_CASE:
        fg_idx = rng.choice(fg_idx, SAMPLES_PER_CASE, replace=False)
    all_idx = rng.choice(flat.shape[1], min(SAMPLES_PER_CASE, flat.shape[1]), replace=False)
    return {
        "dataset": job.dataset,
        "case_id": job.case.case_id,
        "spacing": [float(s) for s in geometry.spacing],
        "shape_original": [int(s) for s in shape_original],
        "shape_cropped": [int(s) for s in image.shape[1:]],
        "n_channels": int(image.shape[0]),
        "outside_share": outside_share,
        "labels_outside": labels_outside,
        "fg_values": flat[:, fg_idx].astype(np.float32),
        "image_values": flat[:, all_idx].astype(np.float32),
    }


def hounsfield_like(p_low: float, p_high: float) -> tuple[bool, str]:
    """Robust HU test on a channel's whole-image 0.5 and 99.5 percentiles: air/fat below 0, a span of at
    least 200 and nothing beyond the physical HU range."""
    span = p_high - p_low
    ok = span >= 200 and p_low >= -3100 and p_high <= 5000 and p_low < 0
    return ok, f"0.5–99.5 percentiles [{p_low:.4g}, {p_high:.4g}], span {span:.4g}"


def _channel_stats(fg: np.ndarray, whole: np.ndarray) -> dict[str, Any]:
    found = fg.size > 0
    values = (fg if found else whole).astype(np.float64)
    p = np.percentile(values, [0.5, 2, 50, 98, 99.5]) if values.size else np.zeros(5)
    wp = np.percentile(whole, [0.5, 99.5]) if whole.size else np.zeros(2)
    hu, why = hounsfield_like(float(wp[0]), float(wp[1]))
    return {
        "foreground_found": bool(found),  # false: the statistics below describe whole images instead
        "n_samples": int(values.size),
        "mean": float(values.mean()) if values.size else 0.0,
        "std": float(values.std()) if values.size else 1.0,
        "min": float(values.min()) if values.size else 0.0,
        "max": float(values.max()) if values.size else 0.0,
        "median": float(p[2]),
        "percentile_00_5": float(p[0]),
        "percentile_02_0": float(p[1]),
        "percentile_98_0": float(p[3]),
        "percentile_99_5": float(p[4]),
        "image_percentile_00_5": float(wp[0]),
        "image_percentile_99_5": float(wp[1]),
        "hounsfield_like": hu,
        "hounsfield_test": why,
    }


def _summarise(manifest: DatasetManifest, results: list[dict[str, Any]], files_hash: str) -> dict[str, Any]:
    dims = {len(r["spacing"]) for r in results}
    if len(dims) > 1:
        raise MosaicSegError(
            f"{manifest.folder}: the dataset mixes 2D and 3D cases. Fix: keep one dimensionality "
            "per dataset (a single-slice NIfTI is 2D)."
        )
    channels = {r["n_channels"] for r in results}
    if len(channels) > 1:
        raise MosaicSegError(
            f"{manifest.folder}: cases have different channel counts {sorted(channels)}. Fix: give "
            "every case the channels declared in dataset.json."
        )
    n_channels = channels.pop()
    names = list(manifest.channel_names)
    if len(names) != n_channels:
        raise MosaicSegError(
            f"{manifest.folder / 'dataset.json'}: channel_names declares {len(names)} channel(s) but "
            f"the images have {n_channels}. Fix: declare one name per image channel."
        )
    spacings = np.array([r["spacing"] for r in results])
    shapes = np.array([r["shape_cropped"] for r in results])
    intensity = []
    for c, name in enumerate(names):
        fg = np.concatenate([r["fg_values"][c] for r in results])
        whole = np.concatenate([r["image_values"][c] for r in results])
        intensity.append({"channel": name, **_channel_stats(fg, whole)})
    return {
        "name": manifest.name,
        "files_hash": files_hash,
        "dim": dims.pop(),
        "channel_names": names,
        "n_cases": len(results),
        "case_ids": [r["case_id"] for r in results],
        "spacings": spacings.tolist(),
        "shapes_original": [r["shape_original"] for r in results],
        "shapes_cropped": shapes.tolist(),
        "spacing": {
            "median": np.median(spacings, 0).tolist(),
            "min": spacings.min(0).tolist(),
            "max": spacings.max(0).tolist(),
        },
        "shape_cropped": {
            "median": np.median(shapes, 0).tolist(),
            "min": shapes.min(0).tolist(),
            "max": shapes.max(0).tolist(),
        },
        "intensity": intensity,
        # outside_image: share of each case's voxels outside the imaged region, and labelled voxels there
        "outside_image": {
            "share_median": float(np.median([r["outside_share"] for r in results])),
            "share_max": float(max(r["outside_share"] for r in results)),
            "label_voxels": int(sum(r["labels_outside"] for r in results)),
        },
    }


def outside_rule(fp: dict[str, Any]) -> dict[str, Any]:
    """Whether a prediction outside the imaged region (:func:`~mosaicseg.data.preprocess.outside_image`) is
    background for this dataset: yes when its images have such a region and no training label lies in it."""
    out = fp["outside_image"]
    share = f"{100 * out['share_median']:.0f} % of a case's voxels (median; at most {100 * out['share_max']:.0f} %)"
    if out["share_max"] == 0:
        return {"background_outside_image": False, "reason": "no case has zero voxels around the imaged region"}
    if out["label_voxels"]:
        return {
            "background_outside_image": False,
            "reason": f"{out['label_voxels']} labelled voxel(s) of the training cases lie outside the imaged "
            f"region ({share}): structures may be annotated there",
        }
    return {
        "background_outside_image": True,
        "reason": f"outside the imaged region ({share}) no training case has a label: predictions there are background",
    }


def _files_hash(manifest: DatasetManifest, seed: int) -> str:
    """Changes when any file of the dataset (or the sampling seed) changes: decides fingerprint reuse."""
    h = hashlib.sha256(f"v{FINGERPRINT_VERSION}:{seed}:{SAMPLES_PER_CASE}".encode())
    for path in [manifest.folder / "dataset.json"] + [p for c in manifest.cases for p in (*c.images, c.label)]:
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _run_pool(fn: Any, jobs: list[Any], workers: int, progress: bool, desc: str) -> list[Any]:
    """``fn`` over ``jobs`` in ``workers`` processes with a progress bar; results in job order."""
    results: list[Any] = [None] * len(jobs)
    with progress_bar(total=len(jobs), desc=desc, unit="case", disable=not progress or not jobs) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = fn(job)
                bar.update()
        else:
            # spawn, not fork: SimpleITK's thread pool does not survive a fork of a process that used it
            with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for i, result in enumerate(pool.imap(fn, jobs)):
                    results[i] = result
                    bar.update()
    return results


def compute_fingerprint(
    opened: OpenCollection, workers: int = 2, progress: bool = True, reuse: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read every case once and summarise each dataset (see the module docstring of :mod:`fingerprint`).

    Per dataset: per-case spacing and cropped shape (canonical orientation) with median/min/max, the
    dimensionality, and per channel foreground intensity statistics from up to 10000 seeded samples per
    case (foreground: label > 0 and not the ignore value) plus a Hounsfield test. Datasets whose files are
    unchanged since ``reuse`` (an earlier fingerprint) are taken from it instead of being read again.
    """
    seed = int(opened.config.seed)
    out: dict[str, Any] = {"version": FINGERPRINT_VERSION, "samples_per_case": SAMPLES_PER_CASE, "datasets": {}}
    old = (reuse or {}).get("datasets", {}) if (reuse or {}).get("version") == FINGERPRINT_VERSION else {}
    jobs: list[_CaseJob] = []
    hashes = {}
    for entry in opened.config.datasets:
        manifest = opened.manifest(entry.name)
        hashes[entry.name] = _files_hash(manifest, seed)
        if entry.name in old and old[entry.name].get("files_hash") == hashes[entry.name]:
            out["datasets"][entry.name] = old[entry.name]
            continue
        jobs += [_CaseJob(entry.name, case, manifest.ignore_value, seed) for case in manifest.cases]
    results = _run_pool(_fingerprint_case, jobs, workers, progress, "fingerprint")
    for entry in opened.config.datasets:
        if entry.name in out["datasets"]:
            continue
        mine = [r for r in results if r["dataset"] == entry.name]
        out["datasets"][entry.name] = _summarise(opened.manifest(entry.name), mine, hashes[entry.name])
    out["datasets"] = {e.name: out["datasets"][e.name] for e in opened.config.datasets}
    return out


# --------------------------------------------------------------------------------------------- dataset plans
def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], int | None]:
    """nnU-Net's target spacing for cases with ``spacings`` and ``shapes`` ``(N, ndim)``.

    The median spacing, except that a low-resolution axis (spacing > 3× the others *and* fewer than a
    third as many voxels) gets the 10th percentile of its spacings, so that thick-slice cases are not
    interpolated far beyond their resolution. Returns ``(spacing, separate_axis)``: the axis resampled
    separately, chosen as nnU-Net does from the anisotropy of the median (else the target) spacing.
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    median = np.median(spacings, 0)
    target = median.copy()
    if spacings.shape[1] < 3:
        return target.tolist(), None
    sizes = np.median(np.asarray(shapes, dtype=np.float64), 0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[others])
    if aniso_spacing and aniso_voxels:
        low = float(np.percentile(spacings[:, worst], 10))
        # never finer than the other axes, which would turn the low-resolution axis into the fine one
        target[worst] = low if low >= max(target[others]) else max(target[others]) + 1e-5
    separate = _separate_axis(median)
    return target.tolist(), separate if separate is not None else _separate_axis(target)


def _separate_axis(spacing: np.ndarray) -> int | None:
    spacing = np.asarray(spacing)
    if len(spacing) < 3 or spacing.max() <= ANISOTROPY_THRESHOLD * spacing.min():
        return None
    axes = np.flatnonzero(spacing == spacing.max())
    return int(axes[0]) if len(axes) == 1 else None  # two coarse axes: no single axis to treat separately


def _is_ct(channel: str, modality: str, n_channels: int) -> bool:
    return channel.strip().upper() == "CT" or (n_channels == 1 and modality.strip().upper() == "CT")


def normalization_plan(
    fp: dict[str, Any],
    modality: str,
    ct_normalization: str = "percentile",
    mr_clip_percentiles: tuple[float, float] | None = None,
) -> list[dict[str, Any]]:
    """One normalisation entry per channel of a dataset fingerprint ``fp`` (see :func:`preprocess.normalize`).

    CT in Hounsfield units: ``ct`` (nnU-Net: dataset percentile window and statistics) or, with
    ``ct_normalization="fixed"``, ``ct_fixed`` (Hermes: the [-990, 500] HU window, then a per-image z-score).
    Grey-level channels: ``mr``, a per-image z-score as nnU-Net's; ``mr_clip_percentiles`` ``(lo, hi)`` first
    clips each image to its lo-th and hi-th percentiles (e.g. ``(2, 98)``, as Hermes does).
    """
    names = fp["channel_names"]
    rgb = channel_signature(tuple(names)) == "RGB"
    out = []
    for stats in fp["intensity"]:
        entry: dict[str, Any] = {"channel": stats["channel"], "scheme": "mr", "clip": None, "mean": None, "std": None}
        where = "foreground" if stats["foreground_found"] else "whole-image (no foreground found)"
        if rgb:
            entry.update(scheme="rgb", reason="RGB image: per-image z-score of each colour channel")
        elif _is_ct(stats["channel"], modality, len(names)):
            if not stats["hounsfield_like"]:
                entry.update(
                    scheme="zscore",
                    reason=f"CT but not Hounsfield units ({stats['hounsfield_test']}): per-image z-score",
                )
            elif ct_normalization == "fixed":
                lo, hi = CT_FIXED_WINDOW
                entry.update(
                    scheme="ct_fixed",
                    clip=[lo, hi],
                    reason=f"CT in HU: clip to the fixed window [{lo:g}, {hi:g}] HU, then z-score each image "
                    "with its own mean/std (Hermes)",
                )
            else:
                entry.update(
                    scheme="ct",
                    clip=[stats["percentile_00_5"], stats["percentile_99_5"]],
                    mean=stats["mean"],
                    std=stats["std"],
                    reason=f"CT in HU: clip to the dataset's {where} 0.5–99.5 percentiles, z-score with "
                    f"its mean/std (nnU-Net)",
                )
        elif mr_clip_percentiles is not None:
            lo, hi = mr_clip_percentiles
            entry.update(
                percentiles=[float(lo), float(hi)],
                reason=f"grey-level modality '{stats['channel']}': clip each image to its {lo:g}–{hi:g} "
                "percentiles (plan option mr_clip_percentiles), then z-score it",
            )
        else:
            entry.update(
                percentiles=None,
                reason=f"grey-level modality '{stats['channel']}': per-image z-score without clipping (nnU-Net)",
            )
        out.append(entry)
    return out


def _median_shape(fp: Mapping[str, Any], target: Sequence[float]) -> list[int]:
    """The median shape of a dataset's cropped cases resampled to ``target`` spacing."""
    spacings = np.asarray(fp["spacings"], dtype=np.float64)
    shapes = np.asarray(fp["shapes_cropped"], dtype=np.float64)
    resampled = np.array([new_shape_for(c, sp, target) for c, sp in zip(shapes, spacings, strict=True)])
    return [int(np.round(v)) for v in np.median(resampled, 0)]


def dataset_plan(
    fp: dict[str, Any],
    modality: str,
    common_spacing: float | None = None,
    ct_normalization: str = "percentile",
    mr_clip_percentiles: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Target spacing, resampled median shape, separate axis and normalisation of one dataset."""
    spacings = np.asarray(fp["spacings"], dtype=np.float64)
    shapes = np.asarray(fp["shapes_cropped"], dtype=np.float64)
    target, separate = target_spacing(spacings, shapes)
    if common_spacing is not None:
        target = [float(common_spacing)] * spacings.shape[1]
    return {
        "target_spacing": [float(t) for t in target],
        "original_median_spacing": np.median(spacings, 0).tolist(),
        "median_shape": _median_shape(fp, target),
        "separate_axis": separate,
        "normalization": normalization_plan(fp, modality, ct_normalization, mr_clip_percentiles),
        "image_order": 3,
        "seg_order": 1,
    }


def match_anisotropy(
    datasets: dict[str, dict[str, Any]], fps: Mapping[str, Mapping[str, Any]], topology_spacing: list[float]
) -> list[str]:
    """Resample thick-slice datasets along their coarse axis to the shared network's anisotropy, in place; returns
    the names of the datasets changed.

    A dataset whose target spacing has a coarse axis (more than ``ANISOTROPY_THRESHOLD`` times its finest) that the
    network, planned at ``topology_spacing``, treats like the others (3×3×3 kernels, pooled from the first stage)
    gets that axis at ``finest × topology[axis] / min(topology)``: the network's own ratio. nnU-Net keeps such
    data at its spacing because it plans a network for it alone; a network shared with isotropic datasets sees
    10 mm slices through kernels meant for 2 mm (ACDC on mri7 stayed near Dice 0.4; BENCHMARKS.md). The axis keeps
    nnU-Net's separate resampling (nearest neighbour across slices), so no structure is invented between them."""
    topo = np.asarray(topology_spacing, dtype=np.float64)
    changed = []
    for name, plan in datasets.items():
        target = np.asarray(plan["target_spacing"], dtype=np.float64)
        axis = _separate_axis(target)
        if axis is None or _separate_axis(topo) == axis:
            continue
        matched = round(float(target.min() * topo[axis] / topo.min()), 6)
        if matched >= target[axis]:
            continue
        old = float(target[axis])
        target[axis] = matched
        plan["target_spacing"] = [float(t) for t in target]
        plan["median_shape"] = _median_shape(fps[name], target)
        plan["spacing_note"] = (
            f"axis {axis} resampled from {old:g} to {matched:g} mm: its {old / target.min():.1f}x thick slices would "
            f"meet a network planned near-isotropic (topology spacing {[round(float(t), 3) for t in topo]} mm); "
            "plan --anisotropy keep keeps them"
        )
        changed.append(name)
    return changed


# --------------------------------------------------------------------------------------------- network plan
@dataclass(frozen=True)
class DevicePreset:
    """Sizing rules of the shared network for one kind of device."""

    base_features: int
    max_features: int
    batch_size: int
    max_batch_size: int
    memory_budget_gb: float
    max_patch_voxels: dict[int, int]  # dim → voxels per patch
    bytes_per_value: int  # activations: 4 (fp32) or 2 (mixed precision)
    activation_factor: float  # tensors kept per stage output for encoder + decoder + backward (measured)


PRESETS: dict[str, DevicePreset] = {
    # CPU: 48³ patches at most, the convergence study's best (BENCHMARKS.md): 48³ steps take ~0.6 s on 2 cores
    # against ~1 s for 64³, and with lr 3e-3 reached 0.72/0.21/0.65 IXI held-out Dice in 10 minutes against
    # 0.43/0.00/0.54 (64³, 1e-3)
    "cpu": DevicePreset(16, 256, 2, 2, 1.5, {3: 48**3, 2: 256**2}, 4, 12.0),
    "cuda": DevicePreset(32, 320, 2, 64, 8.0, {3: 128**3, 2: 512**2}, 2, 16.0),
}


def topology(patch: list[int], spacing: list[float]) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's pooling and kernel rules for ``patch`` at ``spacing`` → ``(strides, kernel_sizes)`` per stage.

    An axis is pooled while its feature map stays ≥ 4 voxels and its spacing is within 2× the finest
    poolable spacing (coarse axes wait until the others catch up); its kernel is 1 until its spacing is
    within 2× the finest, then 3. The first stage has stride 1; the bottleneck kernel is all 3.
    """
    dim = len(patch)
    size = [float(p) for p in patch]
    sp = [float(s) for s in spacing]
    strides: list[list[int]] = [[1] * dim]
    kernels: list[list[int]] = []
    kernel = [1] * dim
    while True:
        valid = [a for a in range(dim) if size[a] >= 2 * _MIN_FEATURE_MAP]
        if not valid:
            break
        finest = min(sp[a] for a in valid)
        valid = [a for a in valid if sp[a] / finest < 2]
        # pooling a single axis only pays off when it still leaves a reasonably large map (nnU-Net)
        if len(valid) == 1 and size[valid[0]] < 3 * _MIN_FEATURE_MAP:
            break
        for a in range(dim):
            if kernel[a] != 3 and sp[a] / min(sp) < 2:
                kernel[a] = 3
        kernels.append(list(kernel))
        stride = [1] * dim
        for a in valid:
            stride[a] = 2
            sp[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
    kernels.append([3] * dim)
    return strides, kernels


def _divisor(strides: list[list[int]]) -> list[int]:
    return [int(np.prod([s[a] for s in strides])) for a in range(len(strides[0]))]


def estimate_memory_gb(
    patch: list[int],
    strides: list[list[int]],
    kernels: list[list[int]],
    features: list[int],
    batch: int,
    in_channels: int,
    out_channels: int,
    preset: DevicePreset,
) -> float:
    """Training-step memory: activations ``batch × Σ_s features_s × voxels_s × bytes × factor``, the task
    outputs (logits, probabilities, gradients) and parameters × 4 (weights, gradients, Adam's two moments)."""
    voxels, size = [], np.asarray(patch, dtype=np.float64)
    for st in strides:
        size = size / np.asarray(st)
        voxels.append(float(np.prod(size)))
    acts = batch * sum(f * v for f, v in zip(features, voxels, strict=True)) * preset.bytes_per_value
    acts *= preset.activation_factor
    outputs = batch * out_channels * voxels[0] * preset.bytes_per_value * 3
    params = 0
    for s, f in enumerate(features):
        k = int(np.prod(kernels[s]))
        c_in = in_channels if s == 0 else features[s - 1]
        params += c_in * f * k + f * f * k  # encoder: two convolutions
        if s + 1 < len(features):
            # decoder: transposed convolution from the stage below, then two convolutions on the concatenation
            params += features[s + 1] * f * int(np.prod(strides[s + 1])) + 2 * f * f * k + f * f * k
    params += features[0] * out_channels
    return float((acts + outputs + params * 4 * 4) / 1024**3)


def plan_network(
    dataset_plans: dict[str, dict[str, Any]],
    dim: int,
    device: str = "cpu",
    memory_budget_gb: float | None = None,
    common_spacing: float | None = None,
    in_channels: int = 1,
    out_channels: int = 1,
    total_voxels: float | None = None,
    topology_spacing: str = "median",
) -> dict[str, Any]:
    """The one network of a collection: patch, topology, features and batch size within the device preset.

    The patch starts at the per-axis largest median shape of the datasets and its physically longest axis
    (at the datasets' median target spacing) is shrunk, one pooling multiple at a time, until the patch fits
    both the preset's voxel cap and the memory budget. Anisotropy (kernels of 1, delayed pooling) is decided
    at the common spacing if there is one, else by ``topology_spacing``: ``median``, the datasets' per-axis
    median target spacing (the majority's: one thick-slice dataset among isotropic ones no longer makes the
    shared network anisotropic, deeper and slower for all of them; BENCHMARKS.md, convergence on mri7), or
    ``max``, the per-axis largest (every dataset's coarse axis respected; the rule before).
    """
    if topology_spacing not in TOPOLOGY_SPACINGS:
        raise MosaicSegError(
            f"topology spacing {topology_spacing!r} is unknown. Fix: use one of {', '.join(TOPOLOGY_SPACINGS)}."
        )
    preset = PRESETS[device]
    budget = float(memory_budget_gb if memory_budget_gb is not None else preset.memory_budget_gb)
    targets = np.array([p["target_spacing"] for p in dataset_plans.values()], dtype=np.float64)
    if common_spacing is not None:
        topo_spacing = [float(common_spacing)] * dim
        typical = np.array(topo_spacing)
    else:
        typical = np.median(targets, 0)
        topo_spacing = (typical if topology_spacing == "median" else targets.max(0)).tolist()
    largest = np.array([p["median_shape"] for p in dataset_plans.values()]).max(0)
    patch = [max(_MIN_FEATURE_MAP, int(v)) for v in largest]
    cap = preset.max_patch_voxels[dim]
    batch = preset.batch_size
    for _ in range(100_000):
        strides, kernels = topology(patch, topo_spacing)
        div = _divisor(strides)
        patch = [int(math.ceil(p / d) * d) for p, d in zip(patch, div, strict=True)]
        features = [min(preset.base_features * 2**s, preset.max_features) for s in range(len(strides))]
        estimate = estimate_memory_gb(patch, strides, kernels, features, batch, in_channels, out_channels, preset)
        if math.prod(patch) <= cap and estimate <= budget:
            break
        shrinkable = [a for a in range(dim) if patch[a] - div[a] >= _MIN_FEATURE_MAP]
        if not shrinkable:
            raise MosaicSegError(
                f"no patch fits the memory budget of {budget:g} GB on {device} (the smallest needs {estimate:.2f} "
                "GB). Fix: pass a larger --memory-budget-gb."
            )
        axis = max(shrinkable, key=lambda a: (patch[a] * typical[a], patch[a]))
        patch[axis] -= div[axis]
    if preset.max_batch_size > batch:
        # nnU-Net: a batch never covers more than 5% of all the collection's voxels
        voxel_cap = 0.05 * total_voxels / math.prod(patch) if total_voxels else preset.max_batch_size
        limit = int(min(preset.max_batch_size, max(batch, math.floor(voxel_cap))))
        while batch < limit:
            bigger = estimate_memory_gb(patch, strides, kernels, features, batch + 1, in_channels, out_channels, preset)
            if bigger > budget:
                break
            batch, estimate = batch + 1, bigger
    return {
        "patch_size": patch,
        "batch_size": batch,
        "features": features,
        "kernel_sizes": kernels,
        "strides": strides,
        "num_stages": len(strides),
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
        "topology_spacing": [float(s) for s in topo_spacing],
        "precision": "fp32" if preset.bytes_per_value == 4 else "amp",
        "memory_estimate_gb": round(estimate, 3),
        "memory_budget_gb": budget,
    }


# --------------------------------------------------------------------------------------------- plans
def _check_options(
    device: str,
    memory_budget_gb: float | None,
    common_spacing: float | None,
    ct_normalization: str,
    mr_clip_percentiles: tuple[float, float] | None,
) -> tuple[float, float] | None:
    """Validate the plan options; returns ``mr_clip_percentiles`` as floats."""
    if device not in DEVICES:
        raise MosaicSegError(f"device {device!r} is unknown. Fix: use one of {', '.join(DEVICES)}.")
    if ct_normalization not in CT_NORMALIZATIONS:
        raise MosaicSegError(
            f"CT normalisation {ct_normalization!r} is unknown. Fix: use one of {', '.join(CT_NORMALIZATIONS)}."
        )
    if memory_budget_gb is not None and not memory_budget_gb > 0:
        raise MosaicSegError(f"memory budget {memory_budget_gb!r} GB is not positive. Fix: pass e.g. 8.")
    if common_spacing is not None and not common_spacing > 0:
        raise MosaicSegError(f"common spacing {common_spacing!r} mm is not positive. Fix: pass e.g. 1.5.")
    if mr_clip_percentiles is None:
        return None
    return check_percentiles(mr_clip_percentiles, "MR clip percentiles (--mr-clip-percentiles)")


def make_plans(
    fingerprint: dict[str, Any],
    opened: OpenCollection,
    device: str = "cpu",
    memory_budget_gb: float | None = None,
    common_spacing: float | None = None,
    ct_normalization: str = "percentile",
    mr_clip_percentiles: tuple[float, float] | None = None,
    topology_spacing: str = "median",
    anisotropy: str = "keep",
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Plans (see the module docstring) from a fingerprint of ``opened``'s datasets; the options as for
    :func:`plan` (``given`` is its ``network``)."""
    mr_clip = _check_options(device, memory_budget_gb, common_spacing, ct_normalization, mr_clip_percentiles)
    if anisotropy not in ANISOTROPIES:
        raise MosaicSegError(f"anisotropy {anisotropy!r} is unknown. Fix: use one of {', '.join(ANISOTROPIES)}.")
    fps = fingerprint.get("datasets", {})
    missing = [e.name for e in opened.config.datasets if e.name not in fps]
    if missing:
        raise MosaicSegError(
            f"the fingerprint lacks dataset(s) {missing}. Fix: re-run mosaicseg plan so that "
            "every dataset is fingerprinted."
        )
    names = [e.name for e in opened.config.datasets]
    dims = {fps[n]["dim"] for n in names}
    if len(dims) > 1:
        by_dim = {d: [n for n in names if fps[n]["dim"] == d] for d in sorted(dims)}
        raise MosaicSegError(
            f"{opened.config.source or opened.config.name}: the collection mixes 2D and 3D "
            f"datasets {by_dim}; one network has one dimensionality. Fix: put them in separate "
            "collections."
        )
    dim = dims.pop()
    datasets = {
        n: dataset_plan(fps[n], opened.vocabulary.dataset_modality[n], common_spacing, ct_normalization, mr_clip)
        for n in names
    }

    def network_plan() -> dict[str, Any]:
        total_voxels = sum(fps[n]["n_cases"] * math.prod(datasets[n]["median_shape"]) for n in names)
        return plan_network(
            datasets,
            dim,
            device,
            memory_budget_gb,
            common_spacing,
            in_channels=max(len(fps[n]["channel_names"]) for n in names),
            out_channels=opened.vocabulary.num_tasks,
            total_voxels=total_voxels,
            topology_spacing=topology_spacing,
        )

    if given is not None:
        if len(given["patch_size"]) != dim:
            raise MosaicSegError(
                f"{opened.config.source or opened.config.name}: the data is {dim}D but the pre-trained network is "
                f"{len(given['patch_size'])}D (patch {list(given['patch_size'])}); its weights cannot be used. "
                f"Fix: fine-tune a {dim}D model, or train this data from scratch with mosaicseg train."
            )
        channels = {
            "in_channels": max(len(fps[n]["channel_names"]) for n in names),
            "out_channels": opened.vocabulary.num_tasks,
        }
        network = {**given, **channels}
        # the pre-trained network is fixed: thick slices are matched to its topology once (an older plan without
        # topology_spacing leaves them as they are)
        if anisotropy == "match" and common_spacing is None and "topology_spacing" in given:
            match_anisotropy(datasets, fps, list(given["topology_spacing"]))
    else:
        network = network_plan()
        # a matched dataset changes the median spacing the network is planned at: plan again until nothing changes
        # (a matched axis only gets finer, so this ends; three rounds are plenty)
        for _ in range(3 if anisotropy == "match" else 0):
            if not match_anisotropy(datasets, fps, network["topology_spacing"]):
                break
            network = network_plan()
    plans = {
        "version": PLANS_VERSION,
        "collection": opened.config.to_dict(),
        "dim": dim,
        "device": device,
        "datasets": datasets,
        "common_spacing": [float(common_spacing)] * dim if common_spacing is not None else None,
        "network": network,
        # kept apart from "datasets", whose content keys the preprocessed cases: no re-preprocessing for it
        "postprocessing": {n: outside_rule(fps[n]) for n in names},
    }
    return json.loads(json.dumps(plans))  # plain JSON types, so a re-plan compares equal to the file


def plan(
    collection: str | Path,
    workdir: str | Path,
    *,
    device: str = "cpu",
    memory_budget_gb: float | None = None,
    common_spacing: float | None = None,
    ct_normalization: str = "percentile",
    mr_clip_percentiles: tuple[float, float] | None = None,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    network: Mapping[str, Any] | None = None,
    topology_spacing: str = "median",
    anisotropy: str = "keep",
) -> dict[str, Any]:
    """Fingerprint ``collection`` (reusing an earlier fingerprint in ``workdir`` for unchanged datasets), derive
    plans and write ``collection.json``, ``vocabulary.json``, ``fingerprint.json`` and ``plans.json`` into
    ``workdir`` atomically. Existing plans with different content are only replaced with ``overwrite``.

    ``device`` (``cpu``/``cuda``) and ``memory_budget_gb`` size the network; ``common_spacing`` (mm) resamples
    every dataset to one isotropic spacing; ``ct_normalization`` is ``percentile`` (nnU-Net) or ``fixed``
    (Hermes: [-990, 500] HU, per-image z-score); ``mr_clip_percentiles`` ``(lo, hi)`` with
    ``0 <= lo < hi <= 100`` clips grey-level images to their percentiles before the z-score (default: none,
    as nnU-Net). A changed normalisation changes the dataset's plan, so ``preprocess`` redoes its cases.
    ``topology_spacing``: ``median`` or ``max``, the spacing the network's anisotropy is decided at
    (:func:`plan_network`). ``anisotropy``: ``match`` resamples thick-slice datasets to the network's anisotropy
    (:func:`match_anisotropy`), ``keep`` leaves them at their own spacing. ``network``: another plan's ``network``
    section to use instead of sizing one (fine-tuning: the pre-trained model's, so that its weights fit); it must
    have the collection's number of spatial dimensions; under ``match`` thick-slice datasets are matched to it."""
    mr_clip = _check_options(device, memory_budget_gb, common_spacing, ct_normalization, mr_clip_percentiles)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise MosaicSegError(f"{workdir}: is a file, not a folder. Fix: choose a work folder.")
    opened = open_collection(collection)
    fp_path, plans_path = workdir / "fingerprint.json", workdir / "plans.json"
    damaged = "delete it, or re-run mosaicseg plan with --overwrite"
    previous = read_json(fp_path, damaged) if fp_path.is_file() else None
    fingerprint = compute_fingerprint(opened, workers=workers, progress=progress, reuse=previous)
    plans = make_plans(
        fingerprint,
        opened,
        device,
        memory_budget_gb,
        common_spacing,
        ct_normalization,
        mr_clip,
        topology_spacing,
        anisotropy,
        network,
    )
    if plans_path.is_file() and not overwrite:
        existing = read_json(plans_path, damaged)
        if existing != plans:
            changed = sorted(k for k in set(plans) | set(existing) if plans.get(k) != existing.get(k))
            raise MosaicSegError(
                f"{plans_path}: plans exist with different content (changed: {', '.join(changed)}). "
                "Fix: pass --overwrite to replace them (preprocess then redoes datasets whose plan "
                "changed), or choose another work folder."
            )
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "collection.json", opened.config.to_dict())
    write_json_atomic(workdir / "vocabulary.json", opened.vocabulary.to_dict())
    write_json_atomic(fp_path, fingerprint)
    write_json_atomic(plans_path, plans)
    return plans
