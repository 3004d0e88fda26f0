"""``mosaicseg check``: verify every dataset of a collection before any work and list all problems at once.

Structural problems (dataset.json, file lists) come from :func:`~mosaicseg.data.collection.open_collection`;
this module then reads every file once (optionally in worker processes) and adds content checks: unreadable
files, grids that disagree, undeclared or non-integer label values, non-finite or empty images, wrong
dimensionality or channel count, CT channels that are not in Hounsfield units, patient grouping and fold
sizes. Every finding is a :class:`~mosaicseg.errors.Problem` with a stable ``code``.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mosaicseg.config import CollectionConfig, load_collection
from mosaicseg.data.collection import open_collection
from mosaicseg.data.io import Geometry, file_ending, read_header, read_image, scan_nifti
from mosaicseg.data.laterality import lateral_pairs
from mosaicseg.data.manifest import DatasetManifest, inside_folder
from mosaicseg.data.splits import patient_of, suspected_grouping
from mosaicseg.data.vocabulary import Vocabulary, build_vocabulary
from mosaicseg.errors import MosaicSegError, Problem, Severity
from mosaicseg.progress import progress_bar

MIN_AXIS_VOXELS = 8  # networks halve every axis several times; fewer voxels than this is suspicious
ANISOTROPY_RATIO = 3.0  # nnU-Net treats axes this much coarser than the finest as thick slices
_PERCENTILE_SAMPLE = 500_000  # voxels per channel used for percentiles: plenty for robust statistics
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass
class DatasetSummary:
    """One line of the check report's dataset table."""

    name: str
    dim: int | None  # 2 or 3; None when no case could be read
    n_cases: int
    n_patients: int
    modality: str
    channels: tuple[str, ...]
    labels: tuple[str, ...]
    grouping: str
    folds_ok: bool


@dataclass
class CheckReport:
    """Everything ``check`` found: problems (errors fail the command), one summary per dataset, the vocabulary."""

    problems: list[Problem]
    datasets: list[DatasetSummary]
    vocabulary: Vocabulary | None
    folds: int = 5
    name: str = ""
    roots: tuple[Path, ...] = field(default=(), repr=False)  # dataset folders, to group problems

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def count(self, severity: Severity) -> int:
        return sum(p.severity == severity for p in self.problems)

    def codes(self) -> set[str]:
        return {p.code for p in self.problems}


# ----------------------------------------------------------------------------------------------- per case


@dataclass(frozen=True)
class _CaseJob:
    dataset: str
    case_id: str
    images: tuple[Path, ...]
    label: Path
    channel_names: tuple[str, ...]
    declared_values: frozenset[int]
    ignore_value: int | None
    ct_channels: tuple[int, ...]


@dataclass
class _CaseResult:
    dataset: str
    case_id: str
    problems: list[Problem] = field(default_factory=list)
    dim: int | None = None
    spacing: tuple[float, ...] | None = None
    ct_percentiles: dict[int, tuple[float, float]] = field(default_factory=dict)


def _split_error(exc: MosaicSegError, path: Path) -> tuple[str, str]:
    """``"<path>: what. Fix: how."`` (io's message style) → (what, how)."""
    text = str(exc).strip()
    prefix = f"{path}: "
    if text.startswith(prefix):
        text = text[len(prefix) :]
    what, _, fix = text.partition(" Fix: ")
    return what.rstrip("."), fix.rstrip(".")


def _read(path: Path, res: _CaseResult) -> tuple[np.ndarray, Geometry, int] | None:
    """(array, geometry, number of NaN/inf values in the file) or None after recording why it failed."""
    try:
        arr, geometry = read_image(path)
        if file_ending(path) not in (".nii", ".nii.gz"):
            nonfinite = int(arr.size - np.count_nonzero(np.isfinite(arr))) if arr.dtype.kind in "fc" else 0
            return arr, geometry, nonfinite
        missing, nonfinite = scan_nifti(path)
        if missing is None:
            return arr, geometry, nonfinite
        what, fix = f"incomplete image: {missing}", "re-download or re-export the file"
    except MosaicSegError as exc:
        what, fix = _split_error(exc, path)
    except (OSError, ValueError) as exc:  # odd files can fail below io's own error handling
        what, fix = f"cannot read the image ({type(exc).__name__}: {exc})", "re-export the file"
    try:
        ndim = read_header(path)["ndim"]
    except MosaicSegError:
        ndim = None
    if ndim is not None and ndim not in (2, 3):
        res.problems.append(
            Problem(
                "error",
                "wrong-ndim",
                path,
                f"image has {ndim} dimensions, expected 2 or 3",
                "split 4D series into one file per channel (CASE_0000, CASE_0001, ...) or one case per time point",
            )
        )
    else:
        res.problems.append(Problem("error", "unreadable", path, what, fix or "re-export or re-download the file"))
    return None


def _grid_problem(path: Path, g: Geometry, ref_path: Path, ref: Geometry, what: str) -> Problem | None:
    if g.file_shape != ref.file_shape or g.shape != ref.shape:
        return Problem(
            "error",
            "shape-mismatch",
            path,
            f"{what} shape {g.file_shape} differs from {ref_path.name}'s {ref.file_shape}",
            "resample it onto the grid of the case's first channel (all files of a case share one grid)",
        )
    if not g.same_grid(ref):
        diffs = [
            f"{k} {getattr(g, 'file_' + k)} vs {getattr(ref, 'file_' + k)}"
            for k in ("spacing", "origin", "direction")
            if not np.allclose(getattr(g, "file_" + k), getattr(ref, "file_" + k), rtol=1e-3, atol=1e-3)
        ]
        return Problem(
            "error",
            "geometry-mismatch",
            path,
            f"{what} lies on another grid than {ref_path.name}: {'; '.join(diffs)}",
            "resample it onto the first channel's grid, or copy that header if only the header is wrong "
            "(SimpleITK CopyInformation)",
        )
    return None


def _label_values(lab: np.ndarray) -> list[int]:
    if lab.size == 0:
        return []
    lo, hi = int(lab.min()), int(lab.max())
    if lo >= 0 and hi < 65536:
        # chunked bincount: far faster than np.unique's sort, without an int64 copy of a whole big volume
        counts = np.zeros(hi + 1, dtype=np.int64)
        flat = lab.reshape(-1)
        for start in range(0, flat.size, 1 << 24):
            counts += np.bincount(flat[start : start + (1 << 24)], minlength=hi + 1)
        return [int(v) for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(lab)]


def _check_image_values(path: Path, arr: np.ndarray, nonfinite: int, res: _CaseResult) -> None:
    if nonfinite:
        res.problems.append(
            Problem(
                "error",
                "nonfinite",
                path,
                f"{nonfinite} of {arr.size} voxels are NaN or infinite",
                "replace them (e.g. by the background value) before training",
            )
        )
    values = arr[np.isfinite(arr)] if nonfinite and arr.dtype.kind in "fc" else arr
    if values.size == 0:
        return
    lo, hi = values.min(), values.max()
    if lo == hi:
        if lo == 0:
            res.problems.append(
                Problem(
                    "error",
                    "constant-image",
                    path,
                    "every voxel is 0 (empty image)",
                    "re-export the image; an empty file usually means a failed conversion",
                )
            )
        else:
            res.problems.append(
                Problem(
                    "warning",
                    "constant-image",
                    path,
                    f"every voxel has the value {lo:g}",
                    "check the export; a constant image carries no information",
                )
            )


def _ct_percentiles(channel: np.ndarray) -> tuple[float, float] | None:
    flat = channel.reshape(-1)
    sample = flat[:: max(1, flat.size // _PERCENTILE_SAMPLE)]
    if np.issubdtype(sample.dtype, np.floating):
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(hi)


def _check_label(job: _CaseJob, arr: np.ndarray, nonfinite: int, res: _CaseResult) -> None:
    path = job.label
    if arr.shape[0] != 1:
        res.problems.append(
            Problem(
                "error",
                "channel-count",
                path,
                f"label file has {arr.shape[0]} channels, expected 1",
                "save labels as single-channel integer images",
            )
        )
        return
    if nonfinite:
        res.problems.append(
            Problem(
                "error",
                "label-not-integer",
                path,
                f"case '{job.case_id}': {nonfinite} label voxels are NaN or infinite",
                "save labels as integer images",
            )
        )
        return
    lab = arr[0]
    if np.issubdtype(lab.dtype, np.floating):
        finite = np.isfinite(lab)
        bad = ~finite
        bad[finite] = np.rint(lab[finite]) != lab[finite]
        if bad.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(lab[bad])[:5])
            res.problems.append(
                Problem(
                    "error",
                    "label-not-integer",
                    path,
                    f"case '{job.case_id}': {int(bad.sum())} label voxels are not integers (e.g. {examples})",
                    "save labels as integer images (nearest-neighbour resampling, no smoothing)",
                )
            )
            return
        lab = lab.astype(np.int64)
    values = _label_values(lab)
    undeclared = [v for v in values if v not in job.declared_values]
    if undeclared:
        res.problems.append(
            Problem(
                "error",
                "undeclared-label",
                path,
                f"case '{job.case_id}' contains label value(s) {undeclared} not declared in "
                f"dataset.json (declared: {sorted(job.declared_values)})",
                "declare them in 'labels' or relabel the file",
            )
        )
    if not set(values) - {0, job.ignore_value}:
        res.problems.append(
            Problem(
                "warning",
                "empty-label",
                path,
                f"case '{job.case_id}' has no foreground: every voxel is background"
                + (" or ignore" if job.ignore_value in values else ""),
                "check the label; an unannotated case only teaches 'background'",
            )
        )


def _check_case(job: _CaseJob) -> _CaseResult:
    """Read every file of one case once and check it (runs in worker processes, so it must be top-level)."""
    res = _CaseResult(job.dataset, job.case_id)
    ref: tuple[Path, Geometry] | None = None
    channels: list[np.ndarray] = []
    per_file: list[int] = []
    for path in job.images:
        read = _read(path, res)
        if read is None:
            per_file.append(0)
            continue
        arr, g, nonfinite = read
        per_file.append(arr.shape[0])
        if ref is None:
            ref = (path, g)
            res.dim, res.spacing = g.ndim, g.spacing
        elif (p := _grid_problem(path, g, ref[0], ref[1], "channel")) is not None:
            res.problems.append(p)
        _check_image_values(path, arr, nonfinite, res)
        channels.extend(arr[i] for i in range(arr.shape[0]))
    n_declared = len(job.channel_names)
    readable = all(per_file)
    if readable and n_declared and len(channels) != n_declared:
        if len(job.images) == 1:
            kind = "grayscale " if per_file[0] == 1 else ""
            res.problems.append(
                Problem(
                    "error",
                    "channel-count",
                    job.images[0],
                    f"{kind}file has {per_file[0]} channel(s) but dataset.json declares "
                    f"{n_declared} ({', '.join(job.channel_names)})",
                    f"save it with {n_declared} channel(s), or fix channel_names",
                )
            )
        else:  # one file per channel (a missing file is the manifest's missing-channel)
            for path, n in zip(job.images, per_file, strict=True):
                if n != 1:
                    res.problems.append(
                        Problem(
                            "error",
                            "channel-count",
                            path,
                            f"file has {n} channels; with one file per channel each file must have exactly one",
                            "split it into single-channel files, one per declared channel",
                        )
                    )
    elif readable and ref is not None:
        for c in job.ct_channels:
            if c < len(channels) and (pct := _ct_percentiles(channels[c])) is not None:
                res.ct_percentiles[c] = pct
    if ref is not None and res.spacing is not None:
        finest = min(res.spacing)
        small = [
            ax
            for ax, (n, s) in enumerate(zip(ref[1].shape, res.spacing, strict=True))
            if n < MIN_AXIS_VOXELS and s < ANISOTROPY_RATIO * finest
        ]  # few thick slices are normal
        if small:
            res.problems.append(
                Problem(
                    "warning",
                    "small-image",
                    ref[0],
                    f"case '{job.case_id}' has only {[ref[1].shape[a] for a in small]} voxel(s) "
                    f"along axis {small} (shape {ref[1].shape})",
                    "check the export; such images are mostly padding for the network",
                )
            )
    label = _read(job.label, res)
    if label is not None:
        arr, g, nonfinite = label
        if ref is not None and (p := _grid_problem(job.label, g, ref[0], ref[1], "label")) is not None:
            res.problems.append(p)
        _check_label(job, arr, nonfinite, res)
    return res


def _init_worker() -> None:
    import SimpleITK as sitk

    # each worker is one reader; ITK's own threads would only compete for the same cores
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _run_jobs(jobs: list[_CaseJob], workers: int, progress: bool) -> list[_CaseResult]:
    def bar(results: Iterable[_CaseResult]) -> Iterable[_CaseResult]:
        return progress_bar(results, total=len(jobs), desc="checking cases", unit="case", disable=not progress)

    if workers <= 1 or len(jobs) < 2:
        return list(bar(map(_check_case, jobs)))
    n = min(workers, len(jobs), os.cpu_count() or 1)
    # fork where available: spawn re-imports __main__ and so fails from unguarded scripts and notebooks, and
    # SimpleITK's default "Platform" threader keeps no thread pool that a fork could inherit mid-lock
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker) as pool:
        return list(bar(pool.map(_check_case, jobs, chunksize=max(1, len(jobs) // (8 * n)))))


# ------------------------------------------------------------------------------------------- per dataset


def looks_like_hu(lo: float, hi: float) -> bool:
    """Whether robust 0.5/99.5 percentiles of a CT channel look like Hounsfield units.

    HU span hundreds to thousands of units, reach below 0 (air −1000, fat −100; −3024 is the usual padding)
    and stay below a few thousand (dense bone and metal clip at 3071). Normalised data (z-scores, [0, 1]),
    windowed 8-bit data and HU stored with a +1024 offset all fail one of these.
    """
    return hi - lo >= 200 and -3100 <= lo < 0 and hi <= 5000


def _ct_channels(manifest: DatasetManifest, modality: str) -> tuple[int, ...]:
    named = tuple(i for i, n in enumerate(manifest.channel_names) if n.strip().casefold() == "ct")
    if not named and modality.strip().casefold() == "ct" and len(manifest.channel_names) == 1:
        return (0,)
    return named


def _dataset_checks(
    manifest: DatasetManifest,
    regex: str | None,
    modality: str,
    folds: int,
    results: list[_CaseResult],
    problems: list[Problem],
) -> DatasetSummary:
    folder = manifest.folder
    dims = Counter(r.dim for r in results if r.dim is not None)
    dim = dims.most_common(1)[0][0] if dims else None
    if len(dims) > 1:
        for r in results:
            if r.dim is not None and r.dim != dim:
                case = manifest.cases[[c.case_id for c in manifest.cases].index(r.case_id)]
                problems.append(
                    Problem(
                        "error",
                        "mixed-dim",
                        case.images[0],
                        f"case '{r.case_id}' is {r.dim}D but {dims[dim]} other case(s) of {manifest.name} are {dim}D",
                        "keep one dimensionality per dataset (a single-slice NIfTI counts as 2D)",
                    )
                )

    json_path = folder / "dataset.json"
    for c in _ct_channels(manifest, modality):
        pcts = [r.ct_percentiles[c] for r in results if c in r.ct_percentiles]
        if not pcts:
            continue
        lo, hi = float(np.median([p[0] for p in pcts])), float(np.median([p[1] for p in pcts]))
        if not looks_like_hu(lo, hi):
            first = manifest.cases[0].images
            example = first[min(c, len(first) - 1)].name
            problems.append(
                Problem(
                    "warning",
                    "not-hu",
                    json_path,
                    f"channel {c} ('{manifest.channel_names[c]}') is declared CT but its intensities are not "
                    f"Hounsfield units (0.5–99.5th percentiles {lo:.3g}..{hi:.3g}, median over {len(pcts)} case(s) "
                    f"such as {example}): HU windowing would destroy it; the planner will use z-score "
                    "normalisation instead",
                    "nothing to do if the source normalised the images; otherwise export the original HU values",
                )
            )

    spacings = [r.spacing for r in results if r.spacing]
    if spacings:
        ratios = [max(s) / min(s) for s in spacings if min(s) > 0]
        if ratios and float(np.median(ratios)) > ANISOTROPY_RATIO:
            med = np.median(np.array([s for s in spacings if len(s) == len(spacings[0])]), axis=0)
            problems.append(
                Problem(
                    "info",
                    "anisotropic-spacing",
                    folder,
                    f"{sum(r > ANISOTROPY_RATIO for r in ratios)} of {len(ratios)} case(s) have "
                    f"voxels over {ANISOTROPY_RATIO:g}x longer on one axis (median spacing "
                    f"{' x '.join(f'{v:.3g}' for v in med)})",
                    "nothing to do; planning treats the coarse axis as thick slices",
                )
            )

    pairs, unswappable = lateral_pairs({k: v for k, v in manifest.labels.items() if k != "background"})
    if unswappable:
        problems.append(
            Problem(
                "warning",
                "lateral-unpaired",
                json_path,
                f"label(s) {', '.join(unswappable)} name a body side but have no single-value partner of the "
                "other side, so training and TTA will not mirror the left-right axis for this dataset",
                "nothing to do if that is intended; to keep left-right mirroring, declare both sides "
                "(e.g. 'Caudate_L' and 'Caudate_R') as plain labels",
            )
        )
    elif pairs:
        problems.append(
            Problem(
                "info",
                "lateral-pairs",
                json_path,
                f"{len(pairs)} left/right label pair(s) ({', '.join('/'.join(p) for p in pairs[:3])}"
                f"{', ...' if len(pairs) > 3 else ''}): mirroring the left-right axis swaps them",
                "",
            )
        )

    images_dirs = [folder / "imagesTr", folder / "labelsTr"]
    for d in images_dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.is_symlink() and not inside_folder(folder, p):
                problems.append(
                    Problem(
                        "warning",
                        "path-escape",
                        p,
                        f"symbolic link to {p.resolve()}, outside the dataset folder",
                        "copy the file into the dataset, or make sure the target stays available",
                    )
                )

    case_ids = [c.case_id for c in manifest.cases]
    n_patients = len({patient_of(c, regex) for c in case_ids})
    if regex:
        grouping = f"{len(case_ids)} cases of {n_patients} patients (patient_regex)"
        matched = sum(bool(re.search(regex, c)) for c in case_ids)
        if case_ids and not matched:
            problems.append(
                Problem(
                    "warning",
                    "patient-grouping",
                    folder,
                    f"patient_regex {regex!r} matches none of the {len(case_ids)} case ids "
                    f"(e.g. '{case_ids[0]}'), so every case is its own patient",
                    "fix patient_regex in the collection file",
                )
            )
        else:
            problems.append(
                Problem(
                    "info",
                    "patient-grouping-ok",
                    folder,
                    f"{len(case_ids)} cases of {n_patients} patients grouped by patient_regex",
                    "",
                )
            )
    else:
        n_suspect, examples = suspected_grouping(case_ids)
        grouping = f"{len(case_ids)} case{'' if len(case_ids) == 1 else 's'}, one per patient"
        if n_suspect:
            grouping += f" ({n_suspect} look grouped)"
            problems.append(
                Problem(
                    "warning",
                    "patient-grouping",
                    folder,
                    f"{n_suspect} case ids look like several images of one patient (e.g. "
                    f"{', '.join(examples)}) but no patient_regex groups them, so one patient can "
                    "land in both training and validation",
                    "add patient_regex: '^(?P<patient>...)' for this dataset in the collection file",
                )
            )
    folds_ok = n_patients >= folds
    if not folds_ok and case_ids:
        problems.append(
            Problem(
                "warning",
                "too-few-for-folds",
                folder,
                f"{n_patients} patient(s) for {folds} folds: {manifest.name} is only trained on, never validated",
                "add cases, lower 'folds', or accept that it is not validated",
            )
        )
    return DatasetSummary(
        manifest.name,
        dim,
        len(case_ids),
        n_patients,
        modality,
        manifest.channel_names,
        tuple(manifest.labels),
        grouping,
        folds_ok,
    )


# ---------------------------------------------------------------------------------------- per collection


# channel_names values that nnU-Net reads as normalisation schemes rather than modalities
NNUNET_SCHEMES = {"nonorm", "zscore", "rescale_to_0_1", "rgb_to_0_1"}


def _collection_checks(
    config: CollectionConfig,
    manifests: list[DatasetManifest],
    summaries: list[DatasetSummary],
    vocabulary: Vocabulary,
    problems: list[Problem],
) -> None:
    where: Path | str = config.source or config.name
    dims = {s.name: s.dim for s in summaries if s.dim is not None}
    if len(set(dims.values())) > 1:
        listing = ", ".join(f"{n} ({d}D)" for n, d in dims.items())
        problems.append(
            Problem(
                "error",
                "collection-mixed-dim",
                where,
                f"the collection mixes 2D and 3D datasets: {listing}",
                "split it into a 2D and a 3D collection; one network is either 2D or 3D",
            )
        )
    by_modality: dict[str, list[DatasetManifest]] = {}
    for m in manifests:
        by_modality.setdefault(vocabulary.dataset_modality.get(m.name, ""), []).append(m)
    for modality, ms in by_modality.items():
        if len({len(m.channel_names) for m in ms}) > 1:
            listing = ", ".join(f"{m.name} ({len(m.channel_names)}: {'+'.join(m.channel_names)})" for m in ms)
            problems.append(
                Problem(
                    "error",
                    "modality-channels",
                    where,
                    f"modality '{modality}' is given to datasets with different channel counts: {listing}",
                    "give them different 'modality' names; each modality has one input stem with "
                    "a fixed number of channels",
                )
            )
    overridden = {e.name for e in config.datasets if e.modality}
    for m in manifests:
        schemes = [c for c in m.channel_names if c.strip().lower() in NNUNET_SCHEMES]
        if schemes and m.name not in overridden:
            problems.append(
                Problem(
                    "error",
                    "unknown-modality",
                    m.folder / "dataset.json",
                    f"channel name(s) {schemes} are nnU-Net normalisation schemes, not modalities: MosaicSeg "
                    "gives each modality its own input stem and normalisation, so it cannot tell what the "
                    "images are",
                    f"set 'modality:' for {m.name} in the collection file (e.g. modality: T1, CT, RGB) or "
                    "name the channels by modality in dataset.json",
                )
            )


def _load(source: str | Path | CollectionConfig) -> tuple[CollectionConfig | None, list[Problem]]:
    if isinstance(source, CollectionConfig):
        return source, []
    try:
        return load_collection(source), []
    except MosaicSegError as exc:
        if exc.problems:
            return None, list(exc.problems)
        what, fix = _split_error(exc, Path(source))
        return None, [Problem("error", "collection", source, what, fix)]


def check_collection(
    source: str | Path | CollectionConfig, folds: int | None = None, workers: int = 1, progress: bool = False
) -> CheckReport:
    """Check a collection (``collection.yaml``, a dataset folder or a loaded config); never raises for bad data."""
    config, problems = _load(source)
    if config is None:
        return CheckReport(problems, [], None, folds or 5, str(source))
    folds = folds if folds is not None else config.folds
    if folds < 2:
        raise MosaicSegError(f"folds must be ≥ 2, got {folds}. Fix: pass --folds 2 or more.")
    # shared_labels are validated separately so that a bad declaration becomes a Problem, not a crash
    opened = open_collection(replace(config, shared_labels=()), strict=False)
    problems.extend(opened.problems)
    manifests = list(opened.manifests)
    names = {m.name for m in manifests}
    shared = tuple(g for g in config.shared_labels if all(m.split("/")[0] in names for m in g))
    vocabulary = opened.vocabulary
    if shared:
        try:
            vocabulary = build_vocabulary(replace(opened.config, shared_labels=shared), manifests)
        except MosaicSegError as exc:
            what, fix = _split_error(exc, config.source or Path(config.name))
            problems.append(Problem("error", "shared-labels", config.source or config.name, what, fix))

    regex = {e.name: e.patient_regex for e in config.datasets}
    jobs = []
    for m in manifests:
        modality = vocabulary.dataset_modality.get(m.name, "")
        jobs += [
            _CaseJob(
                m.name,
                c.case_id,
                c.images,
                c.label,
                m.channel_names,
                frozenset(m.declared_values),
                m.ignore_value,
                _ct_channels(m, modality),
            )
            for c in m.cases
        ]
    results = _run_jobs(jobs, workers, progress)
    by_dataset: dict[str, list[_CaseResult]] = {}
    for r in results:
        by_dataset.setdefault(r.dataset, []).append(r)
        problems.extend(r.problems)

    summaries = [
        _dataset_checks(
            m,
            regex.get(m.name),
            vocabulary.dataset_modality.get(m.name, ""),
            folds,
            by_dataset.get(m.name, []),
            problems,
        )
        for m in manifests
    ]
    _collection_checks(config, manifests, summaries, vocabulary, problems)
    return CheckReport(problems, summaries, vocabulary, folds, config.name, tuple(e.path for e in config.datasets))


# ------------------------------------------------------------------------------------------------ report


def _dataset_of(path: Path | str, roots: tuple[Path, ...]) -> tuple[int, str]:
    text = str(path)
    for i, root in enumerate(roots):
        if text == str(root) or text.startswith(str(root) + os.sep):
            return i, root.name
    return len(roots), "(collection)"


def _short(path: Path | str, roots: tuple[Path, ...]) -> str:
    text = str(path)
    for root in roots:
        if text == str(root) or text.startswith(str(root) + os.sep):
            return os.path.relpath(text, root.parent)
    return text


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]


def render_report(report: CheckReport, max_per_code: int = 3) -> str:
    """Human-readable report: dataset table, vocabulary, problems grouped by (dataset, code), totals."""
    lines: list[str] = []
    n_cases = sum(s.n_cases for s in report.datasets)
    lines.append(
        f"Collection {report.name}: {len(report.datasets)} dataset(s), {n_cases} case(s), {report.folds} folds"
    )
    if report.datasets:
        rows = [["dataset", "dim", "cases", "patients", "modality", "channels", "labels", "folds", "grouping"]]
        rows += [
            [
                s.name,
                f"{s.dim}D" if s.dim else "?",
                str(s.n_cases),
                str(s.n_patients),
                s.modality,
                ",".join(s.channels),
                str(len(s.labels)),
                "ok" if s.folds_ok else "too few",
                s.grouping,
            ]
            for s in report.datasets
        ]
        lines += ["", *_table(rows, {2, 3, 6})]
    if report.vocabulary is not None:
        v = report.vocabulary
        lines += ["", f"Vocabulary: {v.describe()}"]

    groups: dict[tuple[int, str, int, str], list[Problem]] = {}
    for p in report.problems:
        idx, name = _dataset_of(p.path, report.roots)
        groups.setdefault((idx, name, _SEVERITY_ORDER[p.severity], p.code), []).append(p)
    if groups:
        lines += ["", "Problems:"]
        current = None
        for (_, name, _, code), items in sorted(groups.items()):
            if name != current:
                lines.append(f"{name}:")
                current = name
            severity = items[0].severity
            lines.append(f"  [{severity}] {code} ({len(items)})")
            for p in items[:max_per_code]:
                fix = f" Fix: {p.fix}." if p.fix else ""
                lines.append(f"    {_short(p.path, report.roots)}: {p.message}.{fix}")
            if len(items) > max_per_code:
                lines.append(f"    ... and {len(items) - max_per_code} more like this")
    else:
        lines += ["", "No problems found."]
    lines += ["", f"{report.count('error')} error(s), {report.count('warning')} warning(s)"]
    return "\n".join(lines)
