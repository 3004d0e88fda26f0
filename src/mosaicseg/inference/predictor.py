"""Predict image files with a trained run: preprocessing from the plans, sliding window, TTA, fold ensemble,
label maps in each source dataset's own numbering, written in the input's exact geometry.

Input files follow nnU-Net's naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` ... one file per channel; an
RGB PNG is one file). Output layout: ``OUT/CASE.ext`` when the chosen tasks come from one dataset, else
``OUT/DATASET/CASE.ext`` per source dataset; ``--save-probabilities`` adds ``OUT/[DATASET/]CASE_prob_LABEL.ext``
(float32; PNG: uint8 of probability × 255). Existing outputs are kept (the case is skipped) unless
``overwrite``, so an interrupted prediction resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mosaicseg.data.io import (
    DICOM_ENDINGS,
    SUPPORTED_ENDINGS,
    Geometry,
    dicom_series_files,
    file_ending,
    read_dicom_series,
    read_image,
    write_image,
)
from mosaicseg.data.laterality import LATERAL_AXIS
from mosaicseg.data.preprocess import outside_image, preprocess_arrays
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.outputs import (
    DICOM_SEG_SUFFIX,
    StatisticsTable,
    export_case,
    merged_dataset_json,
    merged_label_names,
    require_highdicom,
    task_thresholds,
    write_dataset_json,
    write_dicom_seg,
)
from mosaicseg.inference.postprocess import ensemble_largest_component
from mosaicseg.inference.prompts import Box, PromptedTiles, PromptFile, canonical_box, preprocessed_box
from mosaicseg.inference.sliding_window import FrozenForward, TileModel, bind_modality, predict_logits
from mosaicseg.models import build_from_config, use_device_layout
from mosaicseg.progress import progress_bar
from mosaicseg.runtime import MODEL_KEYS, find_checkpoints, load_checkpoint, native_bf16, resolve_device

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One case: its channel files (``dicom``: the slice files of one DICOM series, in the series reader's
    order) and the ending of its outputs."""

    case_id: str
    files: tuple[Path, ...]
    ending: str
    dicom: bool = False


DICOM_OUTPUT_ENDING = ".nii.gz"


def _dicom_cases(folder: Path) -> list[InputCase]:
    """The DICOM series in ``folder`` (one case named after it) or, if none, in its sub-folders (one each)."""
    name = folder.resolve().name
    slices = dicom_series_files(folder)
    if slices is not None:
        return [InputCase(name, slices, DICOM_OUTPUT_ENDING, dicom=True)]
    out = []
    for sub in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        slices = dicom_series_files(sub)
        if slices is not None:
            out.append(InputCase(sub.name, slices, DICOM_OUTPUT_ENDING, dicom=True))
    return out


def group_inputs(inputs: Sequence[str | Path]) -> list[InputCase]:
    """Files and folders → cases; ``CASE_XXXX`` files are the channels of ``CASE`` (sorted by channel). A folder
    without image files is read as a DICOM series (one case named after the folder), or as a folder of DICOM
    series folders (one case each)."""
    files: list[Path] = []
    series: list[InputCase] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and file_ending(f) and not f.name.startswith("."))
            if not found:
                series += _dicom_cases(p)
            elif any(f.suffix.lower() in DICOM_ENDINGS for f in p.iterdir() if f.is_file()):
                raise MosaicSegError(
                    f"{p}: holds both image files ({found[0].name}, ...) and DICOM files. Fix: keep each DICOM "
                    "series in a folder of its own."
                )
            files += found
        elif p.is_file():
            if p.suffix.lower() in DICOM_ENDINGS:
                raise MosaicSegError(
                    f"{p}: a single DICOM file is unsupported as input; a series is read from its folder. Fix: pass "
                    "the folder holding the series (-i FOLDER)."
                )
            if not file_ending(p):
                raise MosaicSegError(f"{p}: unsupported file type. Fix: use one of {', '.join(SUPPORTED_ENDINGS)}.")
            files.append(p)
        else:
            raise MosaicSegError(f"{p}: no such file or folder. Fix: check the input path (-i).")
    groups: dict[str, list[tuple[int, Path]]] = {}
    endings: dict[str, str] = {}
    for f in files:
        ending = file_ending(f)
        stem = f.name[: -len(ending)]
        m = _CHANNEL.match(stem)
        case, channel = (m["case"], int(m["channel"])) if m else (stem, 0)
        groups.setdefault(case, []).append((channel, f))
        endings[case] = ending
    if not groups and not series:
        raise MosaicSegError(
            f"no image files in {[str(i) for i in inputs]}. Fix: pass files or folders holding "
            f"{', '.join(SUPPORTED_ENDINGS)} images, or DICOM series folders (one series per folder)."
        )
    out = []
    for case, chans in sorted(groups.items()):
        chans.sort()
        numbers = [c for c, _ in chans]
        if numbers != list(range(len(numbers))):
            raise MosaicSegError(
                f"{chans[0][1].parent}: case '{case}' has channel files {numbers}, expected 0.."
                f"{len(numbers) - 1}. Fix: name channels CASE_0000, CASE_0001, ... without gaps."
            )
        out.append(InputCase(case, tuple(f for _, f in chans), endings[case]))
    seen = {c.case_id: c.files[0].parent for c in out}
    for c in series:
        if c.case_id in seen:
            raise MosaicSegError(
                f"{c.files[0].parent}: case id '{c.case_id}' (the DICOM folder's name) is also the case of "
                f"{seen[c.case_id]}; their outputs would overwrite each other. Fix: rename one of the folders."
            )
        seen[c.case_id] = c.files[0].parent
    return sorted(out + series, key=lambda c: c.case_id)


def _save_probability(t: int, p: np.ndarray, *, paths: list[Path], geometry: Geometry, written: list[str]) -> None:
    """Write task ``t``'s probability map ``(*S)``: float32, or 0–255 for PNG."""
    arr = np.round(p * 255).astype(np.uint8) if paths[t].name.endswith(".png") else p
    written.append(str(write_image(paths[t], arr, geometry, overwrite=True)))


def _save_probabilities(
    t: int, p: np.ndarray, *, paths: dict[int, list[Path]], geometry: Geometry, written: list[str]
) -> None:
    """Write task ``t``'s probability map ``(*S)`` to each of ``paths[t]`` (a shared task: one per dataset)."""
    for path in paths.get(t, []):
        _save_probability(0, p, paths=[path], geometry=geometry, written=written)


PRECISIONS = ("auto", "fp32", "mixed")
# predict --background-outside (Predictor.background_outside)
BACKGROUND_OUTSIDE = ("auto", "on", "off")


def check_background_outside(choice: str, name: str = "background_outside") -> None:
    """Refuse an unknown ``background_outside`` value, named as the caller knows it (``--background-outside`` on
    the command line, before a model is loaded)."""
    if choice not in BACKGROUND_OUTSIDE:
        raise MosaicSegError(f"{name} {choice!r} is unknown. Fix: use one of {', '.join(BACKGROUND_OUTSIDE)}.")


def resolve_precision(precision: str, device: torch.device) -> bool:
    """Whether tiles run under autocast (bf16 on CPU, fp16 on CUDA) for ``precision``: ``fp32`` never, ``mixed``
    always (CPU and CUDA), ``auto`` on CUDA and on CPUs with :func:`native_bf16` (measured on an AVX512-BF16 CPU:
    a tile of a 16–128 network 146 → 41 ms, of nnU-Net's 6-stage IXI network 5.3 → 2.6 s)."""
    if precision not in PRECISIONS:
        raise MosaicSegError(f"precision {precision!r} is unknown. Fix: use one of {', '.join(PRECISIONS)}.")
    if device.type not in ("cpu", "cuda"):
        return False  # no autocast path measured elsewhere (e.g. MPS): float32
    if precision == "auto":
        return device.type == "cuda" or native_bf16()
    return precision == "mixed"


@dataclass(frozen=True)
class Prediction:
    """What :meth:`Predictor.predict` returns for one image; every array lies in the input's own voxel grid
    ``S``: a numpy input's axes, or a file's voxels as stored (``sitk.GetArrayFromImage(image).T``, nibabel's
    array order; a PNG as PIL reads it, ``(H, W)``).

    ``masks``: task name (``Dataset/label``) → ``(*S)`` bool, probability > 0.5 (its largest component if asked);
    ``probabilities``: task name → ``(*S)`` float32, the folds' mean; ``label_maps``: source dataset → ``(*S)``
    uint8/int16 in that dataset's own numbering, what ``mosaicseg predict`` writes; ``dataset``: whose plan
    (spacing, normalisation, modality) preprocessed the image.
    """

    masks: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]
    label_maps: dict[str, np.ndarray]
    dataset: str


def _array_input(
    image: np.ndarray,
    spacing: Sequence[float] | None,
    origin: Sequence[float] | None,
    direction: Sequence[float] | None,
    dim: int,
) -> tuple[np.ndarray, Geometry]:
    """A caller's array ``(X, Y[, Z])`` or ``(C, X, Y[, Z])`` (ITK index order, as a file's voxels) with its
    geometry → ``(C, *S_canonical)`` float32 and the :class:`Geometry` :func:`read_image` would give the same
    voxels in a file (3D: reoriented to the canonical orientation)."""
    import SimpleITK as sitk

    from mosaicseg.data.io import CANONICAL_ORIENTATION

    arr = np.asarray(image)
    if arr.ndim == dim:
        arr = arr[None]
    axes = ", ".join("XYZ"[:dim])
    if arr.ndim != dim + 1:
        raise MosaicSegError(
            f"image array of shape {arr.shape}: the model is {dim}D. Fix: pass ({axes}) or (C, {axes}) arrays."
        )
    if arr.size == 0:
        raise MosaicSegError(f"image array of shape {arr.shape} is empty. Fix: pass an image with voxels.")
    if spacing is None:
        raise MosaicSegError(f"image array of shape {arr.shape} without spacing. Fix: pass spacing=({axes} in mm).")

    def floats(name: str, values: Sequence[float], n: int) -> tuple[float, ...]:
        out = tuple(float(v) for v in values)
        if len(out) != n or not all(np.isfinite(out)):
            raise MosaicSegError(f"{name}={list(values)} for a {dim}D image. Fix: give {n} finite numbers.")
        return out

    spacing_ = floats("spacing", spacing, dim)
    if min(spacing_) <= 0:
        raise MosaicSegError(f"spacing={list(spacing_)}: spacings must be positive. Fix: give the voxel size in mm.")
    origin_ = floats("origin", origin, dim) if origin is not None else (0.0,) * dim
    identity = tuple(float(v) for v in np.eye(dim).ravel())
    direction_ = floats("direction", direction, dim * dim) if direction is not None else identity
    arr = arr.astype(np.float32, copy=False)
    shape = tuple(int(s) for s in arr.shape[1:])
    file_geometry = dict(file_ndim=dim, file_shape=shape, file_spacing=spacing_, file_origin=origin_)
    if dim == 2:  # read_image does not reorient 2D images either
        geometry = Geometry(**file_geometry, file_direction=direction_, orientation="", shape=shape, spacing=spacing_)
        return np.ascontiguousarray(arr), geometry
    channels = []
    for channel in arr:
        img = sitk.GetImageFromArray(np.ascontiguousarray(channel.T))
        img.SetSpacing(spacing_)
        img.SetOrigin(origin_)
        try:
            img.SetDirection(direction_)
        except RuntimeError as exc:
            raise MosaicSegError(
                f"direction={list(direction_)} is not a rotation matrix. Fix: pass the image's direction "
                "cosines (row-major, as SimpleITK's GetDirection())."
            ) from exc
        canonical = sitk.DICOMOrient(img, CANONICAL_ORIENTATION)
        channels.append(sitk.GetArrayFromImage(canonical).T)
    geometry = Geometry(
        **file_geometry,
        file_direction=direction_,
        orientation=sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction_),
        shape=tuple(int(s) for s in channels[0].shape),
        spacing=tuple(float(s) for s in canonical.GetSpacing()),
    )
    return np.ascontiguousarray(np.stack(channels)), geometry


def _to_input_grid(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``(*S_canonical)`` as :func:`read_image` returns it → ``(*S_file)``, the input's own voxel order (the
    reorientation :func:`write_image` applies, in memory)."""
    import SimpleITK as sitk

    from mosaicseg.data.io import CANONICAL_ORIENTATION, _canonical_direction

    if geometry.file_ndim != 3:
        return array
    arr = array if geometry.squeezed_axis is None else np.expand_dims(array, geometry.squeezed_axis)
    if geometry.orientation == CANONICAL_ORIENTATION:
        return np.ascontiguousarray(arr)
    source = arr.astype(np.uint8) if arr.dtype == bool else arr  # ITK has no bool pixels
    img = sitk.GetImageFromArray(np.ascontiguousarray(source.T))
    img.SetDirection(_canonical_direction(geometry))
    out = np.ascontiguousarray(sitk.GetArrayFromImage(sitk.DICOMOrient(img, geometry.orientation)).T)
    return out.astype(bool) if arr.dtype == bool else out


def progress_label(model: torch.nn.Module, n_tasks: int) -> str:
    """The progress bar's label: ``predict``, with how the model evaluates ``n_tasks`` tasks where that is not one
    forward for all (a model's ``prediction_note``: DoDNet's dynamic heads, UniSeg's decoder per task)."""
    note = getattr(model, "prediction_note", None)
    return f"predict ({note(n_tasks)})" if callable(note) else "predict"


class Predictor:
    """One or several models (folds) of one run, sharing its plans and vocabulary.

    ``amp``: tiles under autocast (bf16 on the CPU, fp16 on CUDA; see :func:`resolve_precision`).
    ``jit``: on the CPU in float32, run the tiles through frozen TorchScript graphs (:class:`FrozenForward`:
    built after a few tiles of each shape and modality, checked against the eager model, kept where faster; a
    1.7× faster forward for small networks). Ignored under autocast, which is faster still where it is chosen.
    """

    def __init__(
        self,
        models: list[torch.nn.Module],
        vocabulary: Vocabulary,
        plans: dict[str, Any],
        patch_size: Sequence[int],
        device: torch.device,
        amp: bool = False,
        jit: bool = True,
        largest_component: dict[str, bool] | None = None,
    ) -> None:
        self.models = models
        # task name → keep only its largest connected component, as the run decided (ensemble_largest_component)
        self.largest_component = dict(largest_component or {})
        self.jit = jit and device.type == "cpu" and not amp
        # one bound tile forward per (fold, tasks asked, dataset): frozen graphs are kept across cases
        self._tiles: dict[tuple[int, tuple[int, ...], int], TileModel | FrozenForward] = {}
        self.vocabulary = vocabulary
        self.plans = plans
        self.patch_size = tuple(int(p) for p in patch_size)
        self.device = device
        self.amp = amp
        self.modality: str | None = None  # set by use_modality: overrides the dataset's modality

    def use_modality(self, name: str | None) -> None:
        """Read every input as modality ``name`` (its stem and, for Hermes, its prior tokens) instead of the
        modality of the dataset whose plan preprocesses it; None: the dataset's."""
        if name is not None and name not in self.vocabulary.modalities:
            raise MosaicSegError(
                f"--modality {name!r} is not a modality the model knows. Fix: use one of "
                f"{list(self.vocabulary.modalities)}."
            )
        self.modality = name

    @classmethod
    def from_checkpoint(
        cls,
        run: str | Path,
        folds: Sequence[str] | None = None,
        checkpoint: str = "final",
        device: str = "cpu",
        jit: bool = True,
        precision: str = "auto",
    ) -> Predictor:
        """Load ``run``: a ``.pt`` checkpoint, a fold folder, or a run folder whose ``fold_*`` folders (or
        ``folds``) are ensembled; ``checkpoint`` picks ``checkpoint_{final,best,latest}.pt`` in folders.
        ``precision``: ``auto`` | ``fp32`` | ``mixed`` (:func:`resolve_precision`). A bundle file
        (``mosaicseg export``) is loaded by :meth:`from_bundle` (``checkpoint`` is then the one exported)."""
        from mosaicseg.inference.bundle import is_bundle

        if is_bundle(run):
            return cls.from_bundle(run, folds=folds, device=device, jit=jit, precision=precision)
        dev = resolve_device(device)
        amp = resolve_precision(precision, dev)
        models: list[torch.nn.Module] = []
        first: dict[str, Any] | None = None
        decisions = []
        for path in find_checkpoints(run, folds, checkpoint):
            ckpt = load_checkpoint(path, "cpu", require=MODEL_KEYS)
            decisions.append(ckpt.get("postprocessing"))
            if first is None:
                first = ckpt
            elif ckpt["vocabulary"] != first["vocabulary"] or ckpt["plans"] != first["plans"]:
                raise MosaicSegError(
                    f"{path}: this fold was trained with other plans or tasks than the first fold. "
                    "Fix: ensemble only folds of one run (--folds)."
                )
            models.append(cls._load_model(ckpt["model_config"], ckpt["model"], dev))
        assert first is not None  # find_checkpoints returns at least one path or raises
        return cls._of(models, first, dev, amp, jit, ensemble_largest_component(decisions))

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        folds: Sequence[str] | None = None,
        device: str = "cpu",
        jit: bool = True,
        precision: str = "auto",
    ) -> Predictor:
        """Load a one-file model written by ``mosaicseg export`` (:mod:`mosaicseg.inference.bundle`): its folds
        (or ``folds``, by name) are ensembled as those of the run folder were; predictions are identical."""
        from mosaicseg.inference.bundle import load_bundle

        bundle = load_bundle(path, folds)
        dev = resolve_device(device)
        amp = resolve_precision(precision, dev)
        models = []
        for fold in bundle.folds:
            try:
                models.append(cls._load_model(fold.model_config, fold.state_dict, dev))
            except MosaicSegError as exc:
                raise MosaicSegError(f"{bundle.path}: fold {fold.name}: {exc}") from exc
            except (RuntimeError, TypeError, KeyError, ValueError) as exc:  # weights that do not fit the config
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise MosaicSegError(
                    f"{bundle.path}: fold {fold.name}'s weights do not fit its model config ({first[:200]}; an "
                    "edited or damaged bundle). Fix: export it again with mosaicseg export RUN -o FILE."
                ) from exc
        decisions = ensemble_largest_component([fold.postprocessing for fold in bundle.folds])
        return cls._of(models, bundle.metadata, dev, amp, jit, decisions)

    @classmethod
    def _of(
        cls,
        models: list[torch.nn.Module],
        about: dict[str, Any],
        dev: torch.device,
        amp: bool,
        jit: bool,
        largest_component: dict[str, bool],
    ) -> Predictor:
        """The predictor of ``models`` with the vocabulary, plans and patch size that ``about`` (a checkpoint or a
        bundle's metadata) records, and the folds' post-processing decisions."""
        return cls(
            models,
            Vocabulary.from_dict(about["vocabulary"]),
            about["plans"],
            about["patch_size"],
            dev,
            amp=amp,
            jit=jit,
            largest_component=largest_component,
        )

    def task_largest_component(self, task_ids: Sequence[int], asked: bool | None) -> list[bool]:
        """Per asked task: keep only its largest connected component? ``asked`` True/False for every task, None:
        the run's decision (off where it made none)."""
        if asked is not None:
            return [asked] * len(task_ids)
        return [self.largest_component.get(self.vocabulary.tasks[k].name, False) for k in task_ids]

    @staticmethod
    def _load_model(
        config: dict[str, Any], state_dict: dict[str, torch.Tensor], device: torch.device
    ) -> torch.nn.Module:
        """The model ``config`` describes with ``state_dict`` loaded, on ``device`` in eval mode. A kind with parts
        only training uses (KA²ER's amalgamation layer) drops them first: ``prediction_only()`` returns their
        prefix, and their weights are not loaded."""
        model = build_from_config(config)
        if hasattr(model, "prediction_only"):
            prefix = model.prediction_only()
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        model.load_state_dict(state_dict)
        model = model.to(device).eval()
        use_device_layout(model, device)
        return model

    # ----------------------------------------------------------------------------------------- choices
    def resolve_tasks(self, dataset: str | None, tasks: Sequence[str] | None) -> list[int]:
        """Task indices: ``tasks`` (names ``Dataset/label``, or ``label`` within ``dataset``; ``["all"]``: every
        task), else all tasks of ``dataset``, else every task."""
        v = self.vocabulary
        if tasks and [t.lower() for t in tasks] == ["all"]:
            return list(range(v.num_tasks))
        if tasks:
            out = []
            for name in tasks:
                if dataset is None and "/" not in name:
                    out.append(self._bare_label(name))
                    continue
                full = f"{dataset}/{name}" if dataset and "/" not in name else name
                out.append(v.task_index(full))
            return sorted(set(out))
        if dataset is not None:
            return [k for k, _, _ in v.dataset_tasks(self._check_dataset(dataset))]
        return list(range(v.num_tasks))

    def _bare_label(self, label: str) -> int:
        """The one task with a member named ``label`` (a task name without ``Dataset/`` and no --dataset)."""
        found = sorted({t.index for t in self.vocabulary.tasks for _, lbl in t.members if lbl == label})
        if len(found) == 1:
            return found[0]
        if found:
            raise MosaicSegError(
                f"task '{label}' is ambiguous: {[self.vocabulary.tasks[k].name for k in found]} all have that "
                "label. Fix: name it Dataset/label, or pass --dataset."
            )
        return self.vocabulary.task_index(label)  # raises, listing the known tasks

    def _check_dataset(self, dataset: str) -> str:
        if dataset not in self.vocabulary.datasets:
            raise MosaicSegError(
                f"dataset '{dataset}' is not one the model was trained on. Fix: use one of "
                f"{list(self.vocabulary.datasets)}."
            )
        return dataset

    def preprocessing_dataset(self, dataset: str | None, task_ids: Sequence[int]) -> str:
        """Whose plan (spacing, normalisation, modality) preprocesses the input."""
        if dataset is not None:
            return self._check_dataset(dataset)
        owners = {m[0] for k in task_ids for m in self.vocabulary.tasks[k].members}
        if len(self.vocabulary.datasets) == 1:
            return self.vocabulary.datasets[0]
        if len(owners) == 1:
            return owners.pop()
        candidates = [d for d in self.vocabulary.datasets if d in owners]
        # datasets that preprocess alike and share a modality (hence the model's stem) are interchangeable here
        if len({self._preprocessing_key(d) for d in candidates}) == 1:
            return candidates[0]
        raise MosaicSegError(
            f"the model knows {len(self.vocabulary.datasets)} datasets with different preprocessing or modality; "
            f"say which one the input images are like (spacing, normalisation, modality). Fix: pass --dataset "
            f"with one of {list(self.vocabulary.datasets)}."
        )

    def _preprocessing_key(self, dataset: str) -> str:
        """What of ``dataset``'s plan and modality decides how an input is preprocessed and read by the model."""
        plan = self.plans["datasets"][dataset]
        normalization = [{k: v for k, v in c.items() if k != "reason"} for c in plan["normalization"]]
        return json.dumps(
            [
                self.vocabulary.dataset_modality[dataset],
                [float(s) for s in plan["target_spacing"]],
                plan.get("separate_axis"),
                int(plan.get("image_order", 3)),
                normalization,
            ],
            sort_keys=True,
        )

    # ----------------------------------------------------------------------------------------- predict
    def tile_forward(self, fold: int, dataset: str, asked: Sequence[int]) -> torch.nn.Module | FrozenForward:
        """Fold ``fold``'s model with the tasks ``asked`` (global indices) and ``dataset`` bound
        (:class:`TileModel`), frozen on the CPU in float32 (:class:`FrozenForward`); built once, then reused."""
        key = (fold, tuple(sorted(asked)), self.vocabulary.dataset_index(dataset))
        if key not in self._tiles:
            tile = TileModel.asking(self.models[fold], self.vocabulary.num_tasks, asked, key[2]).eval()
            self._tiles[key] = FrozenForward(tile) if self.jit else tile
        return self._tiles[key]

    def predict_resampled(
        self,
        images: list[np.ndarray],
        geometry: Geometry,
        dataset: str,
        task_ids: Sequence[int],
        tta: bool = False,
        source: str | Path = "image",
        timings: dict[str, float] | None = None,
        boxes: dict[int, Box] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Probabilities ``(T, *S_resampled)`` of ``task_ids`` on the preprocessed grid for one raw image
        ``(C, *S_original)`` (preprocessed with ``dataset``'s plan; TTA averaged in logits, folds in
        probabilities), and the meta that maps them back (:func:`~mosaicseg.inference.outputs.export_case`).
        Large outputs are float16 (see :func:`predict_logits`).

        ``images`` is a one-element list that this method empties: the raw image is released once it is
        preprocessed, before the sliding window allocates its output (a 512×512×400 CT is 0.4 GB).
        ``timings``, if given, receives the seconds of ``preprocess_s`` and ``network_s`` (sliding window, TTA,
        folds, sigmoid). ``boxes``: task → box in the read image's (canonical) grid, prompting a promptable
        model (:class:`~mosaicseg.inference.prompts.PromptedTiles`, eager: a frozen graph takes no prompts)."""
        plan = self.plans["datasets"][dataset]
        t0 = time.perf_counter()
        pre, _, meta = preprocess_arrays(images.pop(), None, geometry, plan, source=source)
        t1 = time.perf_counter()
        x = torch.from_numpy(pre)
        mirror: tuple[int, ...] = tuple(range(pre.ndim - 1)) if tta else ()
        perm = self.vocabulary.lateral_permutation()
        if bool((perm[list(task_ids)] < 0).any()) or boxes:
            # (with boxes too: a mirrored tile's left output would need its right partner's box)
            # a left or right task without its partner cannot be mirrored left-right and stay correct
            mirror = tuple(a for a in mirror if a != LATERAL_AXIS)
        modality = (
            self.vocabulary.modalities.index(self.modality)
            if self.modality is not None
            else self.vocabulary.modality_index(dataset)
        )
        # a mirrored tile's left task is read from its right partner's output: ask the model for both
        asked = set(task_ids) | ({int(perm[k]) for k in task_ids} if LATERAL_AXIS in mirror else set())
        prob: np.ndarray | None = None
        prepared = {k: preprocessed_box(b, meta) for k, b in (boxes or {}).items()}
        for fold in range(len(self.models)):
            forward = (
                PromptedTiles(
                    self.models[fold],
                    self.vocabulary.num_tasks,
                    sorted(asked),
                    self.vocabulary.dataset_index(dataset),
                    modality,
                    prepared,
                )
                if boxes
                else bind_modality(self.tile_forward(fold, dataset, sorted(asked)), modality)
            )
            logits = predict_logits(
                forward,
                x,
                self.patch_size,
                tasks=list(task_ids),
                mirror_axes=mirror,
                lateral_permutation=perm.tolist(),
                device=self.device,
                amp=self.amp,
            )
            p = logits.sigmoid_().numpy()  # in place: the logits are not needed again
            if prob is None:
                prob = p
            else:
                prob += p
            del logits, p
        assert prob is not None
        if len(self.models) > 1:
            prob /= len(self.models)
        if timings is not None:
            timings.update(preprocess_s=t1 - t0, network_s=time.perf_counter() - t1)
        return prob, meta

    def predict(
        self,
        image: np.ndarray | str | Path | Sequence[str | Path],
        *,
        spacing: Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
        direction: Sequence[float] | None = None,
        dataset: str | None = None,
        tasks: Sequence[str] | None = None,
        tta: bool = False,
        largest_component: bool | None = None,
        thresholds: Sequence[str] | None = None,
        boxes: dict[str, dict[str, Any]] | None = None,
        background_outside: str = "auto",
    ) -> Prediction:
        """Predict one image in memory: per task a mask and a probability map, per source dataset the label map
        ``mosaicseg predict`` would write, all in the input's voxel grid (:class:`Prediction`).

        ``image``: a file, or the channel files of one case (``CASE_0000``, ``CASE_0001``, ...), read with their
        geometry; or an array ``(X, Y[, Z])`` / ``(C, X, Y[, Z])`` in ITK index order with its ``spacing`` (mm)
        and optionally ``origin`` and ``direction`` (row-major cosines; default identity). ``dataset``, ``tasks``
        and ``thresholds`` (``TASK=VALUE`` items, default 0.5) as in :meth:`predict_files`: the same label rule
        (:func:`~mosaicseg.inference.outputs.export_case`). ``boxes``: a promptable model's box per task, ``{task:
        {"min": [...], "max": [...], "space": "voxel" | "world"}}`` as in a prompts file
        (:class:`~mosaicseg.inference.prompts.PromptFile`); ``background_outside`` as in :meth:`predict_files`."""
        task_ids = self.resolve_tasks(dataset, tasks)
        source = self.preprocessing_dataset(dataset, task_ids)
        n_channels = len(self.plans["datasets"][source]["normalization"])
        paths = [image] if isinstance(image, (str, Path)) else image
        if isinstance(paths, (list, tuple)) and paths and all(isinstance(p, (str, Path)) for p in paths):
            if spacing is not None or origin is not None or direction is not None:
                raise MosaicSegError(
                    f"{paths[0]}: spacing, origin and direction are read from the file. Fix: leave them out."
                )
            cases = group_inputs(paths)
            if len(cases) != 1:
                raise MosaicSegError(
                    f"{[str(p) for p in paths]}: {len(cases)} cases ({', '.join(c.case_id for c in cases)}); "
                    "predict() takes one. Fix: pass the channel files of one case, or use predict_files."
                )
            holder = list(self._read(cases[0], n_channels))
            geometry, where = holder.pop(), cases[0].files[0]
        else:
            arr, geometry = _array_input(np.asarray(image), spacing, origin, direction, len(self.patch_size))
            if arr.shape[0] != n_channels:
                raise MosaicSegError(
                    f"image array with {arr.shape[0]} channel(s); dataset {source}'s plan expects {n_channels}. "
                    "Fix: pass (C, X, Y[, Z]) with its channels in dataset.json order, or choose another dataset."
                )
            holder, where = [arr], "image array"
            del arr
        found = None
        if boxes:
            given = PromptFile("boxes argument", {"image": boxes})
            found = self.case_boxes(given, "image", [], geometry, task_ids, dataset)
        outside = outside_image(holder[0]) if self.background_outside(source, background_outside) else None
        prob, meta = self.predict_resampled(holder, geometry, source, task_ids, tta=tta, source=where, boxes=found)
        names = [self.vocabulary.tasks[k].name for k in task_ids]
        groups = self.outputs_by_dataset(task_ids)
        probabilities: dict[str, np.ndarray] = {}

        def keep(t: int, p: np.ndarray) -> None:
            probabilities[names[t]] = _to_input_grid(p, geometry)

        maps = export_case(
            prob,
            meta,
            groups,
            self._regions(groups),
            task_thresholds(thresholds or [], task_ids, lambda name: self.resolve_tasks(dataset, [name])[0]),
            largest_component=self.task_largest_component(task_ids, largest_component),
            keep_masks=True,
            on_probability=keep,
            outside=outside,
        )
        del prob
        assert maps.masks is not None  # keep_masks
        masks = {name: _to_input_grid(maps.masks[t], geometry) for t, name in enumerate(names)}
        label_maps = {d: _to_input_grid(seg, geometry) for d, seg in maps.labels.items()}
        return Prediction(masks, probabilities, label_maps, source)

    def _regions(self, groups: dict[str, list[tuple[int, int, str, tuple[int, ...]]]]) -> dict[str, list[int] | None]:
        """Per source dataset of ``groups`` (:meth:`outputs_by_dataset`): the ``regions_class_order`` value of each
        of its rows, or None (the highest-probability rule)."""
        return {
            d: [order[r[1]] for r in rows] if (order := self.vocabulary.regions_class_order.get(d)) else None
            for d, rows in groups.items()
        }

    def outputs_by_dataset(self, task_ids: Sequence[int]) -> dict[str, list[tuple[int, int, str, tuple[int, ...]]]]:
        """Source dataset → ``(position in task_ids, position among the dataset's labels, label name, label
        values)`` of its chosen tasks, in the dataset's label order."""
        pos = {k: i for i, k in enumerate(task_ids)}
        out: dict[str, list[tuple[int, int, str, tuple[int, ...]]]] = {}
        for d in self.vocabulary.datasets:
            rows = [
                (pos[k], j, label, values)
                for j, (k, label, values) in enumerate(self.vocabulary.dataset_tasks(d))
                if k in pos
            ]
            if rows:
                out[d] = rows
        return out

    def predict_files(
        self,
        inputs: Sequence[str | Path],
        output: str | Path,
        *,
        dataset: str | None = None,
        tasks: Sequence[str] | None = None,
        tta: bool = False,
        save_probabilities: bool = False,
        largest_component: bool | None = None,
        overwrite: bool = False,
        progress: bool = True,
        merged: bool = False,
        statistics: bool = False,
        thresholds: Sequence[str] = (),
        dicom_seg: bool = False,
        prompts: Any = None,
        background_outside: str = "auto",
    ) -> dict[str, Any]:
        """Predict every case of ``inputs`` into ``output``; returns per-case seconds (in all, and per stage:
        ``read_s``, ``preprocess_s``, ``network_s``, ``export_s``) and what was written.

        ``merged``: one label map ``OUT/CASE.ext`` over every asked task (1..N, ``OUT/dataset.json``) instead of
        one per source dataset; ``statistics``: per-task voxel counts and volumes in ``OUT/statistics.{csv,json}``;
        ``thresholds``: ``TASK=VALUE`` items (default 0.5); ``dicom_seg``: also ``OUT/CASE.seg.dcm`` for DICOM
        series inputs (:mod:`mosaicseg.inference.outputs`); ``prompts``: a box source of
        :mod:`mosaicseg.inference.prompts` (a promptable model's boxes per case; the report names its kind);
        ``background_outside``: ``auto`` (the plans' decision for the dataset), ``on`` or ``off`` — whether voxels
        outside the imaged region (zero in every channel, connected to the border:
        :func:`~mosaicseg.data.preprocess.outside_image`) are background whatever the network says there;
        ``largest_component``: keep only each task's largest connected component (True), never (False), or where
        the run's final validation decided so (None; :meth:`task_largest_component`)."""
        output = Path(output)
        if output.exists() and not output.is_dir():
            raise MosaicSegError(f"{output}: is a file, not a folder. Fix: choose an output folder (-o).")
        if dicom_seg:
            require_highdicom()
        cases = group_inputs(inputs)  # the input's own problems first: they are the likeliest
        if dicom_seg and not any(c.dicom for c in cases):
            raise MosaicSegError(
                f"--dicom-seg: no DICOM series among the inputs {[str(i) for i in inputs]}. Fix: pass DICOM series "
                "folders with -i, or drop --dicom-seg."
            )
        task_ids = self.resolve_tasks(dataset, tasks)
        source = self.preprocessing_dataset(dataset, task_ids)
        cut = task_thresholds(thresholds, task_ids, lambda name: self.resolve_tasks(dataset, [name])[0])
        names = [self.vocabulary.tasks[k].name for k in task_ids]
        labels = merged_label_names(self.vocabulary, task_ids)
        groups = {} if merged else self.outputs_by_dataset(task_ids)
        regions = self._regions(groups)
        # where each asked task's label maps (and probability maps) go: "" is the merged map
        folders = {"": output} if merged else {d: output if len(groups) == 1 else output / d for d in groups}
        prob_names: dict[str, list[tuple[int, str]]] = (
            {"": [(t, name.replace("/", "_")) for t, name in enumerate(labels)]}
            if merged
            else {d: [(r[0], r[2]) for r in rows] for d, rows in groups.items()}
        )
        plan = self.plans["datasets"][source]
        n_channels = len(plan["normalization"])
        mask_outside = self.background_outside(source, background_outside)
        kept = self.task_largest_component(task_ids, largest_component)
        report: dict[str, Any] = {
            "cases": [],
            "skipped": [],
            "dataset": source,
            "background_outside_image": mask_outside,
            "tasks": names,
            "thresholds": dict(zip(names, cut, strict=True)),
            # the tasks whose masks keep only their largest component, and why (asked, or the run's decision)
            "largest_component": [n for n, k in zip(names, kept, strict=True) if k],
            "largest_component_from": "asked" if largest_component is not None else "run",
            "merged": merged,
            "prompts": getattr(prompts, "kind", None),  # "oracle": boxes from the references, for evaluation only
        }
        output.mkdir(parents=True, exist_ok=True)
        if merged:
            channels = [c.get("channel", str(i)) for i, c in enumerate(plan["normalization"])]
            about = merged_dataset_json(labels, cases[0].ending, channels, names, cut)
            report["dataset_json"] = str(write_dataset_json(output / "dataset.json", about, overwrite))
        table = StatisticsTable(output, names, cut) if statistics else None
        if table is not None:
            report["statistics_missing"] = []
        desc = progress_label(self.models[0], len(task_ids))
        for case in progress_bar(cases, desc=desc, unit="case", disable=not progress):
            targets = {d: f / f"{case.case_id}{case.ending}" for d, f in folders.items()}
            seg_path = output / f"{case.case_id}{DICOM_SEG_SUFFIX}" if dicom_seg and case.dicom else None
            if not overwrite and all(p.exists() for p in [*targets.values(), *([seg_path] if seg_path else [])]):
                report["skipped"].append(case.case_id)
                if table is not None and not table.keep(case.case_id):
                    report["statistics_missing"].append(case.case_id)
                continue
            t0 = time.perf_counter()
            image, geometry = self._read(case, n_channels)
            stages = {"read_s": time.perf_counter() - t0}
            holder = [image]
            del image
            boxes = self.case_boxes(prompts, case.case_id, case.files, geometry, task_ids, dataset)
            outside = outside_image(holder[0]) if mask_outside else None
            prob, meta = self.predict_resampled(
                holder, geometry, source, task_ids, tta=tta, source=case.files[0], timings=stages, boxes=boxes
            )
            t_export = time.perf_counter()
            written: list[str] = []
            prob_paths: dict[int, list[Path]] = {}
            for d, items in prob_names.items():
                for t, name in items:
                    path = targets[d].with_name(f"{case.case_id}_prob_{name}{case.ending}")
                    prob_paths.setdefault(t, []).append(path)
            save = functools.partial(_save_probabilities, paths=prob_paths, geometry=geometry, written=written)
            maps = export_case(
                prob,
                meta,
                groups,
                regions,
                cut,
                largest_component=kept,
                merged=merged,
                keep_masks=seg_path is not None,
                on_probability=save if save_probabilities else None,
                outside=outside,
            )
            del outside
            del prob
            for d, seg in ({"": maps.merged} if merged else maps.labels).items():
                written.insert(0, str(write_image(targets[d], seg, geometry, overwrite=True)))
            if seg_path is not None:
                assert maps.masks is not None  # asked for with keep_masks
                written.append(str(write_dicom_seg(seg_path, maps.masks, geometry, labels, case.files)))
            if table is not None:
                table.add(case.case_id, maps.voxels, geometry)
                table.write()  # after every case: an interrupted run keeps the statistics of the cases it wrote
            done = time.perf_counter()
            stages["export_s"] = done - t_export  # back to the original grid, label rule, writing
            report["cases"].append({"case_id": case.case_id, "seconds": done - t0, **stages, "files": written})
        if table is not None:
            report["statistics"] = [str(p) for p in table.write()]
        return report

    def background_outside(self, source: str, choice: str = "auto") -> bool:
        """Whether predictions of dataset ``source`` are background outside the imaged region: ``on``, ``off``, or
        ``auto``, the plans' decision (``postprocessing``, from the training labels; runs planned before it: off)."""
        check_background_outside(choice)
        if choice != "auto":
            return choice == "on"
        rule = self.plans.get("postprocessing", {}).get(source, {})
        return bool(rule.get("background_outside_image", False))

    def case_boxes(
        self,
        prompts: Any,
        case_id: str,
        files: Sequence[Path],
        geometry: Geometry,
        task_ids: Sequence[int],
        dataset: str | None,
    ) -> dict[int, Box] | None:
        """The boxes of one case from a box source (file-index boxes → the read image's canonical grid), only
        of the asked tasks; None without a source."""
        if prompts is None:
            return None
        if prompts.kind == "auto":
            found = prompts.boxes_from_file(files, {k: self.vocabulary.tasks[k].name for k in task_ids})
        else:
            found = prompts.boxes(case_id, geometry, lambda name: self.resolve_tasks(dataset, [name])[0])
        return {k: canonical_box(lo, hi, geometry) for k, (lo, hi) in found.items() if k in set(task_ids)}

    def _read(self, case: InputCase, n_channels: int) -> tuple[np.ndarray, Geometry]:
        if case.dicom:  # one series: its slice files are one image, not channels
            series, geometry = read_dicom_series(case.files)
            arrays: list[np.ndarray] = [series]
        else:
            arrays, geometry = [], None
        for f in () if case.dicom else case.files:
            arr, geo = read_image(f)
            if geometry is None:
                geometry = geo
            elif arr.shape[1:] != geometry.shape:
                raise MosaicSegError(
                    f"{f}: shape {arr.shape[1:]} differs from {case.files[0].name} "
                    f"{geometry.shape}. Fix: give every channel of a case the same grid."
                )
            arrays.append(arr)
        image = np.concatenate(arrays, axis=0).astype(np.float32, copy=False)
        dim = len(self.patch_size)
        if image.ndim - 1 != dim:
            raise MosaicSegError(
                f"{case.files[0]}: a {image.ndim - 1}D image, but the model is {dim}D. Fix: predict it with a "
                f"{image.ndim - 1}D model (trained on a {image.ndim - 1}D collection)."
            )
        if image.shape[0] != n_channels:
            raise MosaicSegError(
                f"{case.files[0]}: case '{case.case_id}' has {image.shape[0]} channel(s), the model "
                f"expects {n_channels} for this dataset. Fix: provide CASE_0000..CASE_"
                f"{n_channels - 1:04d} files or choose the right --dataset."
            )
        assert geometry is not None
        return image, geometry
