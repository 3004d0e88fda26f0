"""Crop, normalise, resample and cache every case as the plans say (nnU-Net's preprocessing).

Per case: :func:`~mosaicseg.data.manifest.read_case` (canonical orientation) → :func:`replace_nonfinite`
(NaN/±inf voxels → the channel's finite minimum, with a warning) → :func:`crop_to_nonzero` → :func:`normalize`
(per-channel scheme from the plans) → :func:`resample_image` / :func:`resample_labels` to the dataset's target
spacing → cache. The cache lives in ``WORKDIR/preprocessed/DATASET/`` (paths: :func:`mosaicseg.data.workdir.case_paths`;
the work folder is read back through :mod:`mosaicseg.data.workdir`):

- ``CASE.npy``: image ``(C, *S)`` float32 (``S`` the resampled shape ``(X, Y[, Z])``).
- ``CASE_seg.npy``: label map ``(*S)`` int16 with the dataset's own label values (ignore value kept).
- ``CASE_fg.npz``: one array per foreground label name (a region is the union of its values) of at most
  10000 seeded random voxel coordinates ``(N, ndim)`` int32, for foreground oversampling.
- ``CASE.json``: meta, written last, so its presence marks the case as done::

      {"case_id", "dataset", "plans_hash",              # workdir.dataset_plans_hash: a changed plan redoes the case
       "geometry": Geometry.to_dict() of the first channel file,
       "shape_original": canonical shape before cropping, "bbox": [[lo, hi), ...] in that grid,
       "shape_cropped", "spacing_original" (canonical axis order), "spacing_target", "shape_resampled",
       "separate_axis", "labels_present": label values found in the resampled label map,
       "label_voxels": {value: voxel count} of the resampled label map (task frequencies, e.g. head_prior)}

To restore a prediction: resample ``shape_resampled`` → ``shape_cropped`` (:func:`resample_labels` with the
spacings swapped, or an exact ``output_shape``), paste it into zeros of ``shape_original`` at ``bbox``, and
write it with :func:`mosaicseg.data.io.write_image` and ``geometry`` (which restores the file orientation).

Every file is written atomically (temporary file in the same folder + ``os.replace``), so an interrupted
run never leaves a half-written file under a final name, and a rerun skips finished cases.
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mosaicseg.atomic import save_npy_atomic, save_npz_atomic, write_json_atomic
from mosaicseg.data.collection import open_collection
from mosaicseg.data.io import Geometry
from mosaicseg.data.manifest import CaseFiles, read_case
from mosaicseg.data.workdir import (
    cache_dir,
    case_paths,
    dataset_plans_hash,
    is_case_done,
    load_case_meta,
    load_plans,
    planned_collection,
)
from mosaicseg.errors import MosaicSegError
from mosaicseg.progress import progress_bar

FG_LOCATIONS_PER_LABEL = 10_000
ANISOTROPY_THRESHOLD = 3.0  # nnU-Net: an axis whose spacing exceeds 3× the finest is resampled separately
SCHEMES = ("ct", "ct_fixed", "mr", "zscore", "rgb")
_EPS = 1e-8


# --------------------------------------------------------------------------------------------- array ops
def replace_nonfinite(image: np.ndarray, source: str | Path = "image") -> np.ndarray:
    """``image`` ``(C, *S)`` with every NaN and ±inf voxel set to the finite minimum of its channel.

    Non-finite voxels would turn the crop box, the z-score statistics and every interpolated neighbour into
    NaN; as the channel minimum they read as background. A :class:`UserWarning` names ``source`` and the
    count per channel. Returns ``image`` itself (no copy) when every voxel is finite; raises a
    :class:`~mosaicseg.errors.MosaicSegError` naming ``source`` when a channel has no finite voxel at all.
    """
    if image.dtype.kind != "f":
        return image  # integer images cannot hold NaN or inf
    out = image
    replaced: list[tuple[int, int, float]] = []  # (channel, voxels replaced, value)
    for c in range(image.shape[0]):
        channel = image[c]
        # min and max propagate NaN and keep ±inf: a test without a voxel-sized temporary for the usual case
        if channel.size == 0 or (np.isfinite(channel.min()) and np.isfinite(channel.max())):
            continue
        finite = np.isfinite(channel)
        n_bad = int(channel.size - np.count_nonzero(finite))
        if n_bad == channel.size:
            raise MosaicSegError(
                f"{source}: channel {c} has no finite voxel (all {channel.size} are NaN or infinite). "
                "Fix: replace the image; mosaicseg check lists such files."
            )
        fill = float(np.min(channel, where=finite, initial=np.inf))
        if out is image:
            out = image.copy()  # never write into the caller's (possibly memory-mapped) array
        out[c][~finite] = fill
        replaced.append((c, n_bad, fill))
    if replaced:
        total = sum(n for _, n, _ in replaced)
        where = "; ".join(f"{n} in channel {c} set to {fill:g}" for c, n, fill in replaced)
        warnings.warn(
            f"{source}: {total} of {image.size} voxels are NaN or infinite ({where}: the channel's finite "
            "minimum, read as background). Fix: repair the image if those voxels matter.",
            UserWarning,
            stacklevel=2,
        )
    return out


def crop_to_nonzero(
    image: np.ndarray, seg: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[list[int]]]:
    """Crop ``image`` ``(C, *S)`` and ``seg`` ``(*S)`` to the bounding box of voxels that are non-zero in any
    channel (nnU-Net). Labelled voxels are kept inside the box too, so no annotation is ever cut away.

    Returns ``(image, seg, bbox)`` with ``bbox`` ``[[lo, hi), ...]`` per spatial axis; an image without any
    zero voxel (or an all-zero one) keeps its full extent.
    """
    mask = np.any(image != 0, axis=0)
    if seg is not None:
        mask |= seg != 0
    if not mask.any():
        bbox = [[0, int(s)] for s in mask.shape]
    else:
        bbox = []
        for axis in range(mask.ndim):
            other = tuple(a for a in range(mask.ndim) if a != axis)
            hits = np.flatnonzero(np.any(mask, axis=other))
            bbox.append([int(hits[0]), int(hits[-1]) + 1])
    region = tuple(slice(lo, hi) for lo, hi in bbox)
    cropped_seg = seg[region] if seg is not None else None
    return image[(slice(None), *region)], cropped_seg, bbox


def outside_image(image: np.ndarray) -> np.ndarray:
    """``(*S)`` bool: the voxels of ``image`` ``(C, *S)`` outside the imaged region — zero in every channel and
    connected (through faces) to the array's border, as masked or defaced MR (IXI: 40 % of each head) and
    skull-stripped images have. Zero voxels enclosed by the region (a dark ventricle, signal void) are inside.

    The plans decide per dataset whether a prediction there is background (:func:`mosaicseg.data.fingerprint.
    outside_rule`): a network never told otherwise may answer a large constant region with anything."""
    import cc3d

    zero = ~np.any(image != 0, axis=0)
    if not zero.any():
        return zero
    components = cc3d.connected_components(zero, connectivity=4 if zero.ndim == 2 else 6)
    faces = [np.take(components, i, axis=a) for a in range(zero.ndim) for i in (0, -1)]
    touching = np.unique(np.concatenate([f.ravel() for f in faces]))
    touching = touching[touching > 0]
    return np.isin(components, touching) if touching.size else np.zeros_like(zero)


def new_shape_for(shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's resampled shape: ``round(shape × old_spacing / new_spacing)``, at least 1 per axis."""
    return tuple(max(1, int(np.round(s * o / n))) for s, o, n in zip(shape, old_spacing, new_spacing, strict=True))


def _zoom(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample ``volume`` ``(*S)`` to ``shape`` with voxel centres aligned as in skimage's ``resize``
    (``grid_mode``), replicating edges; an axis whose size does not change is left exactly untouched."""
    if tuple(volume.shape) == tuple(shape):
        return volume
    factors = [n / o for n, o in zip(shape, volume.shape, strict=True)]
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != tuple(shape):  # pragma: no cover - zoom rounds n/o*o back to n; guard against float slips
        raise RuntimeError(f"resampling produced {out.shape}, expected {tuple(shape)}")
    return out


def _in_plane_shape(old: Sequence[int], new: Sequence[int], separate_axis: int) -> tuple[int, ...]:
    """``new`` with the separate axis kept at its old size (the first, in-plane resampling step)."""
    return tuple(int(o if a == separate_axis else n) for a, (o, n) in enumerate(zip(old, new, strict=True)))


def _check_spacings(ndim: int, old_spacing: Sequence[float], new_spacing: Sequence[float]) -> None:
    if len(old_spacing) != ndim or len(new_spacing) != ndim:
        raise ValueError(f"spacings {old_spacing} / {new_spacing} do not match {ndim} spatial axes")


def resample_image(
    image: np.ndarray,
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int = 3,
    separate_axis: int | None = None,
    new_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample ``image`` ``(C, *S)`` from ``old_spacing`` to ``new_spacing`` (or to ``new_shape``) → ``(C, *S')``.

    Spline interpolation of ``order`` on every axis; with ``separate_axis`` (nnU-Net's anisotropic case) the
    other axes are interpolated with ``order`` slice by slice and ``separate_axis`` with nearest neighbour,
    so thick slices are never blended into each other. Returns float32.
    """
    spatial = image.shape[1:]
    _check_spacings(len(spatial), old_spacing, new_spacing)
    shape = tuple(new_shape) if new_shape is not None else new_shape_for(spatial, old_spacing, new_spacing)
    image = image.astype(np.float32, copy=False)
    if shape == spatial:
        return image
    out = np.empty((image.shape[0], *shape), dtype=np.float32)
    for c in range(image.shape[0]):
        if separate_axis is None:
            out[c] = _zoom(image[c], shape, order)
        else:
            # An interpolating spline evaluated at unchanged integer positions returns the samples exactly,
            # so a 3D zoom with factor 1 along the separate axis is the slice-wise in-plane resampling.
            in_plane = _in_plane_shape(spatial, shape, separate_axis)
            out[c] = _zoom(_zoom(image[c], in_plane, order), shape, 0)
    return out


def resample_labels(
    seg: np.ndarray,
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    separate_axis: int | None = None,
    new_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample a label map ``(*S)`` → ``(*S')`` as nnU-Net does: each label value is resampled as a one-hot
    mask with linear interpolation and set where it reaches 0.5 (later values win ties); with
    ``separate_axis`` the masks are interpolated in-plane and ``separate_axis`` is resampled by nearest
    neighbour. Every value (the ignore value too) survives unless it is thinner than half a new voxel."""
    _check_spacings(seg.ndim, old_spacing, new_spacing)
    shape = tuple(new_shape) if new_shape is not None else new_shape_for(seg.shape, old_spacing, new_spacing)
    if shape == seg.shape:
        return seg
    in_plane = shape if separate_axis is None else _in_plane_shape(seg.shape, shape, separate_axis)
    out = np.zeros(in_plane, dtype=seg.dtype)
    for value in np.unique(seg):
        if value == 0:
            continue
        mask = _zoom((seg == value).astype(np.float32), in_plane, 1)
        out[mask >= 0.5] = value
    return _zoom(out, shape, 0) if separate_axis is not None else out


def _zscore(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((x - mean) / max(std, _EPS)).astype(np.float32, copy=False)


def _zscore_image(x: np.ndarray) -> np.ndarray:
    """``x`` z-scored with its own mean and standard deviation (float64 sums: stable on large volumes)."""
    return _zscore(x, float(x.mean(dtype=np.float64)), float(x.std(dtype=np.float64)))


def check_percentiles(value: Any, where: str) -> tuple[float, float]:
    """``value`` as a clip range ``(lo, hi)`` of percentiles with ``0 <= lo < hi <= 100``; ``where`` names the
    file or option it came from in the error."""
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError("a string, not two numbers")
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        lo = hi = float("nan")  # fails the range test below, so every malformed value gets one message
    if not 0.0 <= lo < hi <= 100.0:
        raise MosaicSegError(
            f"{where}: clip percentiles {value!r} are not two numbers with 0 <= lo < hi <= 100. "
            "Fix: give e.g. 2 98 (the 2nd and 98th percentiles), or none for a plain z-score."
        )
    return lo, hi


def normalize(image: np.ndarray, channel_schemes: Sequence[dict[str, Any]]) -> np.ndarray:
    """Normalise ``image`` ``(C, *S)`` channel by channel → float32 ``(C, *S)``.

    Each scheme (a plans ``normalization`` entry) is one of:

    - ``ct``: clip to ``clip`` (the dataset's foreground 0.5–99.5 percentiles), z-score with the dataset's
      foreground ``mean``/``std`` (nnU-Net's CTNormalization);
    - ``ct_fixed``: clip to ``clip`` ([-990, 500] HU), then z-score this image's clipped values (Hermes). An
      entry that carries a ``mean`` and ``std`` (plans written before ct_fixed became per-image) is z-scored
      with those, so a model trained on such plans is fed as it was trained;
    - ``mr``: z-score this image (nnU-Net's ZScoreNormalization); with ``percentiles`` ``[lo, hi]`` (plan
      option ``mr_clip_percentiles``), first clip to this image's lo-th and hi-th percentiles;
    - ``zscore`` and ``rgb``: z-score this image channel.

    The statistics are those of the whole (cropped) channel; ``image`` must be finite (:func:`replace_nonfinite`).
    """
    if len(channel_schemes) != image.shape[0]:
        raise ValueError(f"{len(channel_schemes)} normalisation scheme(s) for an image with {image.shape[0]} channels")
    out = np.empty(image.shape, dtype=np.float32)
    for c, scheme in enumerate(channel_schemes):
        x = image[c].astype(np.float32, copy=False)
        kind = scheme.get("scheme")
        if kind == "ct" or (kind == "ct_fixed" and scheme.get("mean") is not None):
            lo, hi = scheme["clip"]
            out[c] = _zscore(np.clip(x, lo, hi), float(scheme["mean"]), float(scheme["std"]))
        elif kind == "ct_fixed":
            lo, hi = scheme["clip"]
            out[c] = _zscore_image(np.clip(x, lo, hi))
        elif kind == "mr":
            if scheme.get("percentiles") is not None:
                where = f"plans.json normalisation of channel {scheme.get('channel')!r}"
                lo, hi = np.percentile(x, check_percentiles(scheme["percentiles"], where))
                x = np.clip(x, lo, hi)
            out[c] = _zscore_image(x)
        elif kind in ("zscore", "rgb"):
            out[c] = _zscore_image(x)
        else:
            raise MosaicSegError(
                f"normalisation scheme {kind!r} of channel {scheme.get('channel')!r} is unknown. "
                f"Fix: use one of {', '.join(SCHEMES)} in plans.json."
            )
    return out


def sample_locations(
    seg: np.ndarray,
    labels: dict[str, tuple[int, ...]],
    rng: np.random.Generator,
    per_label: int = FG_LOCATIONS_PER_LABEL,
) -> dict[str, np.ndarray]:
    """Up to ``per_label`` random voxel coordinates ``(N, ndim)`` int32 of each label (region: union of values)."""
    out = {}
    for name, values in labels.items():
        mask = np.isin(seg, values) if len(values) > 1 else seg == values[0]
        idx = np.flatnonzero(mask)
        if len(idx) > per_label:
            idx = np.sort(rng.choice(idx, per_label, replace=False))
        out[name] = (
            np.stack(np.unravel_index(idx, seg.shape), axis=1).astype(np.int32)
            if len(idx)
            else (np.zeros((0, seg.ndim), dtype=np.int32))
        )
    return out


def case_rng(seed: int, dataset: str, case_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, dataset, case), never on worker count or order."""
    return np.random.default_rng([seed, zlib.crc32(f"{dataset}/{case_id}".encode())])


# --------------------------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class CachedCase:
    """One preprocessed case: ``image`` ``(C, *S)`` float32, ``seg`` ``(*S)`` int16 (dataset label values),
    ``meta`` (see the module docstring) and ``fg_locations`` (label name → ``(N, ndim)`` int coordinates)."""

    image: np.ndarray
    seg: np.ndarray
    meta: dict[str, Any]
    fg_locations: dict[str, np.ndarray]


@dataclass(frozen=True)
class _Job:
    workdir: Path
    dataset: str
    case: CaseFiles
    plan: dict[str, Any]
    labels: dict[str, tuple[int, ...]]
    plans_hash: str
    seed: int


def preprocess_arrays(
    image: np.ndarray, seg: np.ndarray | None, geometry: Geometry, plan: dict[str, Any], source: str | Path = "image"
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """One case's arrays as read by :func:`~mosaicseg.data.manifest.read_case` → the cached representation.

    Training preprocessing and prediction both go through here. ``image`` ``(C, *S)`` and ``seg`` ``(*S)`` (or
    None at prediction time) get their NaN and ±inf voxels set to the channel's finite minimum (a warning
    names ``source`` and the count; see :func:`replace_nonfinite`), are cropped to the non-zero region,
    normalised and resampled to ``plan["target_spacing"]``. Returns ``(image (C, *S'), seg (*S') | None,
    meta)`` with the geometry fields of the module docstring (everything :func:`restore_labels` needs).
    ``image`` itself is never modified.
    """
    spacing = tuple(float(s) for s in geometry.spacing)
    target = tuple(float(s) for s in plan["target_spacing"])
    if len(target) != len(spacing):
        raise MosaicSegError(
            f"{source}: a {len(spacing)}D image for a dataset planned with {len(target)}D target "
            "spacing. Fix: keep one dimensionality per dataset."
        )
    if len(plan["normalization"]) != image.shape[0]:
        raise MosaicSegError(
            f"{source}: {image.shape[0]} channel(s) but the plans normalise "
            f"{len(plan['normalization'])}. Fix: check channel_names, then re-run plan."
        )
    shape_original = image.shape[1:]
    # before cropping: a NaN is "non-zero" and would widen the crop box
    image = replace_nonfinite(image, source)
    image, seg, bbox = crop_to_nonzero(image, seg)
    shape_cropped = image.shape[1:]
    image = normalize(image, plan["normalization"])
    separate = plan.get("separate_axis")
    image = resample_image(image, spacing, target, order=int(plan.get("image_order", 3)), separate_axis=separate)
    if seg is not None:
        seg = resample_labels(seg, spacing, target, separate_axis=separate)
    meta = {
        "geometry": geometry.to_dict(),
        "shape_original": list(shape_original),
        "bbox": bbox,
        "shape_cropped": list(shape_cropped),
        "spacing_original": list(spacing),
        "spacing_target": list(target),
        "shape_resampled": list(image.shape[1:]),
        "separate_axis": separate,
    }
    return image, seg, meta


def _preprocess_case(job: _Job) -> str:
    image, seg, geometry = read_case(job.case)
    image, seg, geo_meta = preprocess_arrays(image, seg, geometry, job.plan, source=job.case.images[0])
    assert seg is not None  # preprocess_arrays returns the label map it was given
    values, counts = np.unique(seg, return_counts=True)
    fg = sample_locations(seg, job.labels, case_rng(job.seed, job.dataset, job.case.case_id))
    cid = job.case.case_id
    paths = case_paths(job.workdir, job.dataset, cid)
    save_npy_atomic(paths.image, np.ascontiguousarray(image, dtype=np.float32))
    save_npy_atomic(paths.seg, np.ascontiguousarray(seg, dtype=np.int16))
    save_npz_atomic(paths.fg, fg)
    meta = {
        "case_id": cid,
        "dataset": job.dataset,
        "plans_hash": job.plans_hash,
        **geo_meta,
        "labels_present": [int(v) for v in values],
        "label_voxels": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
    }
    write_json_atomic(paths.meta, meta)  # last: its presence marks the case as done
    return cid


def preprocess(
    workdir: str | Path, *, workers: int = 2, progress: bool = True, datasets: list[str] | None = None
) -> dict[str, Any]:
    """Preprocess every case of the planned collection in ``workdir`` (written by ``mosaicseg plan``).

    Resumable: cases whose ``CASE.json`` carries the current plan's hash
    (:func:`~mosaicseg.data.workdir.dataset_plans_hash`) are skipped, so a changed dataset plan (e.g. another
    normalisation) redoes exactly that dataset. ``datasets`` limits the work to those datasets. One case per
    worker process bounds peak memory. Returns ``{"n_done", "n_skipped", "seconds"}``.
    """
    t0 = time.perf_counter()
    workdir = Path(workdir)
    plans = load_plans(workdir)
    config = planned_collection(workdir, plans)
    opened = open_collection(config)
    names = list(plans["datasets"])
    if datasets:
        unknown = sorted(set(datasets) - set(names))
        if unknown:
            raise MosaicSegError(
                f"{workdir / 'plans.json'}: dataset(s) {unknown} are not planned. Fix: choose among {names}."
            )
        names = [n for n in names if n in datasets]
    jobs: list[_Job] = []
    n_skipped = 0
    for name in names:
        manifest = opened.manifest(name)
        cache_dir(workdir, name).mkdir(parents=True, exist_ok=True)
        phash = dataset_plans_hash(plans, name)
        for case in manifest.cases:
            if is_case_done(workdir, name, case.case_id, phash):
                n_skipped += 1
                continue
            jobs.append(
                _Job(workdir, name, case, plans["datasets"][name], dict(manifest.labels), phash, int(config.seed))
            )
    bar = progress_bar(total=len(jobs), desc="preprocess", unit="case", disable=not progress or not jobs)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                _preprocess_case(job)
                bar.update()
        else:
            # maxtasksperchild keeps a worker from holding on to memory fragmented by one huge case
            with get_context("spawn").Pool(min(workers, len(jobs)), maxtasksperchild=20) as pool:
                for _ in pool.imap_unordered(_preprocess_case, jobs):
                    bar.update()
    finally:
        bar.close()
    return {"n_done": len(jobs), "n_skipped": n_skipped, "seconds": time.perf_counter() - t0}


def load_case(workdir: str | Path, dataset: str, case_id: str, mmap: bool = True) -> CachedCase:
    """One cached case; with ``mmap`` the image and label arrays are memory-mapped read-only.
    (Which cases are cached: :func:`mosaicseg.data.workdir.list_cases`.)"""
    meta = load_case_meta(workdir, dataset, case_id)
    paths = case_paths(workdir, dataset, case_id)
    mode = "r" if mmap else None
    try:
        image = np.load(paths.image, mmap_mode=mode, allow_pickle=False)
        seg = np.load(paths.seg, mmap_mode=mode, allow_pickle=False)
        with np.load(paths.fg, allow_pickle=False) as npz:
            fg = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise MosaicSegError(
            f"{paths.image.parent}: cached files of case '{case_id}' are missing or damaged ({exc}). Fix: "
            f"delete {paths.meta.name} and re-run mosaicseg preprocess {workdir}."
        ) from exc
    return CachedCase(image=image, seg=seg, meta=meta, fg_locations=fg)


def restore_labels(seg: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """A label map ``(*shape_resampled)`` back on the canonical original grid ``(*shape_original)``:
    resampled to the cropped shape (label-wise linear, as :func:`resample_labels`), then uncropped.
    Write the result with :func:`mosaicseg.data.io.write_image` and ``Geometry.from_dict(meta["geometry"])``."""
    cropped = resample_labels(
        seg,
        meta["spacing_target"],
        meta["spacing_original"],
        meta.get("separate_axis"),
        new_shape=meta["shape_cropped"],
    )
    out = np.zeros(meta["shape_original"], dtype=seg.dtype)
    out[tuple(slice(lo, hi) for lo, hi in meta["bbox"])] = cropped
    return out


def case_geometry(meta: dict[str, Any]) -> Geometry:
    """The original file geometry stored in a case's meta."""
    return Geometry.from_dict(meta["geometry"])
