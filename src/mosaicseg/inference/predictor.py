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
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mosaicseg.data.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_image, write_image
from mosaicseg.data.laterality import LATERAL_AXIS
from mosaicseg.data.preprocess import preprocess_arrays
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.postprocess import labels_from_resampled
from mosaicseg.inference.sliding_window import FrozenForward, TileModel, bind_modality, predict_logits
from mosaicseg.models import build_from_config, use_device_layout
from mosaicseg.runtime import MODEL_KEYS, find_checkpoints, load_checkpoint, native_bf16, resolve_device

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    case_id: str
    files: tuple[Path, ...]
    ending: str


def group_inputs(inputs: Sequence[str | Path]) -> list[InputCase]:
    """Files and folders → cases; ``CASE_XXXX`` files are the channels of ``CASE`` (sorted by channel)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and file_ending(f) and not f.name.startswith("."))
        elif p.is_file():
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
    if not groups:
        raise MosaicSegError(
            f"no image files in {[str(i) for i in inputs]}. Fix: pass files or folders holding "
            f"{', '.join(SUPPORTED_ENDINGS)} images."
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
    return out


def _save_probability(t: int, p: np.ndarray, *, paths: list[Path], geometry: Geometry, written: list[str]) -> None:
    """Write task ``t``'s probability map ``(*S)``: float32, or 0–255 for PNG."""
    arr = np.round(p * 255).astype(np.uint8) if paths[t].name.endswith(".png") else p
    written.append(str(write_image(paths[t], arr, geometry, overwrite=True)))


PRECISIONS = ("auto", "fp32", "mixed")


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
    ) -> None:
        self.models = models
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
        ``precision``: ``auto`` | ``fp32`` | ``mixed`` (:func:`resolve_precision`)."""
        dev = resolve_device(device)
        amp = resolve_precision(precision, dev)
        models: list[torch.nn.Module] = []
        first: dict[str, Any] | None = None
        for path in find_checkpoints(run, folds, checkpoint):
            ckpt = load_checkpoint(path, "cpu", require=MODEL_KEYS)
            if first is None:
                first = ckpt
            elif ckpt["vocabulary"] != first["vocabulary"] or ckpt["plans"] != first["plans"]:
                raise MosaicSegError(
                    f"{path}: this fold was trained with other plans or tasks than the first fold. "
                    "Fix: ensemble only folds of one run (--folds)."
                )
            model = build_from_config(ckpt["model_config"])
            model.load_state_dict(ckpt["model"])
            model = model.to(dev).eval()
            use_device_layout(model, dev)
            models.append(model)
        assert first is not None  # find_checkpoints returns at least one path or raises
        return cls(
            models,
            Vocabulary.from_dict(first["vocabulary"]),
            first["plans"],
            first["patch_size"],
            dev,
            amp=amp,
            jit=jit,
        )

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
                full = f"{dataset}/{name}" if dataset and "/" not in name else name
                out.append(v.task_index(full))
            return sorted(set(out))
        if dataset is not None:
            return [k for k, _, _ in v.dataset_tasks(self._check_dataset(dataset))]
        return list(range(v.num_tasks))

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
        raise MosaicSegError(
            f"the model knows {len(self.vocabulary.datasets)} datasets; say which one the input "
            f"images are like (spacing, normalisation, modality). Fix: pass --dataset with one of "
            f"{list(self.vocabulary.datasets)}."
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
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Probabilities ``(T, *S_resampled)`` of ``task_ids`` on the preprocessed grid for one raw image
        ``(C, *S_original)`` (preprocessed with ``dataset``'s plan; TTA averaged in logits, folds in
        probabilities), and the meta that maps them back (:func:`labels_from_resampled`). Large outputs are
        float16 (see :func:`predict_logits`).

        ``images`` is a one-element list that this method empties: the raw image is released once it is
        preprocessed, before the sliding window allocates its output (a 512×512×400 CT is 0.4 GB).
        ``timings``, if given, receives the seconds of ``preprocess_s`` and ``network_s`` (sliding window, TTA,
        folds, sigmoid)."""
        plan = self.plans["datasets"][dataset]
        t0 = time.perf_counter()
        pre, _, meta = preprocess_arrays(images.pop(), None, geometry, plan, source=source)
        t1 = time.perf_counter()
        x = torch.from_numpy(pre)
        mirror: tuple[int, ...] = tuple(range(pre.ndim - 1)) if tta else ()
        perm = self.vocabulary.lateral_permutation()
        if bool((perm[list(task_ids)] < 0).any()):
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
        for fold in range(len(self.models)):
            logits = predict_logits(
                bind_modality(self.tile_forward(fold, dataset, sorted(asked)), modality),
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
        largest_component: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Predict every case of ``inputs`` into ``output``; returns per-case seconds (in all, and per stage:
        ``read_s``, ``preprocess_s``, ``network_s``, ``export_s``) and what was written."""
        output = Path(output)
        if output.exists() and not output.is_dir():
            raise MosaicSegError(f"{output}: is a file, not a folder. Fix: choose an output folder (-o).")
        cases = group_inputs(inputs)  # the input's own problems first: they are the likeliest
        task_ids = self.resolve_tasks(dataset, tasks)
        source = self.preprocessing_dataset(dataset, task_ids)
        groups = self.outputs_by_dataset(task_ids)
        flat = len(groups) == 1
        n_channels = len(self.plans["datasets"][source]["normalization"])
        report: dict[str, Any] = {
            "cases": [],
            "skipped": [],
            "dataset": source,
            "tasks": [self.vocabulary.tasks[k].name for k in task_ids],
        }
        output.mkdir(parents=True, exist_ok=True)
        for case in tqdm(cases, desc="predict", unit="case", disable=not progress, dynamic_ncols=True):
            targets = {d: (output if flat else output / d) / f"{case.case_id}{case.ending}" for d in groups}
            if not overwrite and all(p.exists() for p in targets.values()):
                report["skipped"].append(case.case_id)
                continue
            t0 = time.perf_counter()
            image, geometry = self._read(case, n_channels)
            stages = {"read_s": time.perf_counter() - t0}
            holder = [image]
            del image
            prob, meta = self.predict_resampled(
                holder, geometry, source, task_ids, tta=tta, source=case.files[0], timings=stages
            )
            t_export = time.perf_counter()
            written: list[str] = []
            for d, rows in groups.items():
                order = self.vocabulary.regions_class_order.get(d)
                order = [order[r[1]] for r in rows] if order else None

                paths = [targets[d].with_name(f"{case.case_id}_prob_{r[2]}{case.ending}") for r in rows]
                save = functools.partial(_save_probability, paths=paths, geometry=geometry, written=written)
                seg = labels_from_resampled(
                    prob,
                    meta,
                    [r[3] for r in rows],
                    order,
                    largest_component,
                    on_probability=save if save_probabilities else None,
                    channels=[r[0] for r in rows],
                )
                written.insert(0, str(write_image(targets[d], seg, geometry, overwrite=True)))
            done = time.perf_counter()
            stages["export_s"] = done - t_export  # back to the original grid, label rule, writing
            report["cases"].append({"case_id": case.case_id, "seconds": done - t0, **stages, "files": written})
        return report

    def _read(self, case: InputCase, n_channels: int) -> tuple[np.ndarray, Geometry]:
        arrays, geometry = [], None
        for f in case.files:
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
