"""The one reader of a work folder: plans, vocabulary, collection and the preprocessed cases' meta.

A work folder is written by ``mosaicseg plan`` (:func:`mosaicseg.data.fingerprint.plan`) and ``mosaicseg
preprocess`` (:func:`mosaicseg.data.preprocess.preprocess`)::

    WORKDIR/
      collection.json        CollectionConfig.to_dict() as planned; folds, sampling and weights may be edited
      vocabulary.json        Vocabulary.to_dict(): global tasks and modalities
      fingerprint.json       dataset statistics (see data/fingerprint.py)
      plans.json             derived, editable plans (layout: data/fingerprint.py)
      preprocessed/DATASET/  CASE.npy, CASE_seg.npy, CASE_fg.npz, CASE.json (layout: data/preprocess.py)

Every JSON file is read by :func:`read_json`, so a missing, unreadable or damaged file always gives one
:class:`~mosaicseg.errors.MosaicSegError` naming the file, the problem and the fix. This module imports only
lower layers (config, errors, the vocabulary), so every stage can read a work folder without import circles.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mosaicseg.config import CollectionConfig, parse_collection
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.errors import MosaicSegError

PLANS_VERSION = 1
PLANS_KEYS = ("version", "collection", "dim", "datasets", "network")
_REPLAN = "re-run mosaicseg plan with --overwrite"


def read_json(path: str | Path, fix: str, *, missing_fix: str | None = None, mapping: bool = True) -> Any:
    """The JSON content of ``path``; with ``mapping`` it must be a JSON object.

    Every failure raises a :class:`~mosaicseg.errors.MosaicSegError` ``"PATH: problem. Fix: ..."``: ``fix``
    for an unreadable or damaged file, ``missing_fix`` (default ``fix``) for an absent one.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a JSON file" if path.is_dir() else "not found"
        raise MosaicSegError(f"{path}: {problem}. Fix: {missing_fix or fix}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise MosaicSegError(f"{path}: not UTF-8 text ({exc.reason}). Fix: {fix}.") from exc
    except OSError as exc:
        raise MosaicSegError(f"{path}: cannot read it ({exc.strerror or exc}). Fix: {fix}.") from exc
    except ValueError as exc:  # json.JSONDecodeError: the message gives line and column
        raise MosaicSegError(f"{path}: not valid JSON ({exc}). Fix: {fix}.") from exc
    if mapping and not isinstance(data, dict):
        raise MosaicSegError(f"{path}: holds a JSON {type(data).__name__}, not an object. Fix: {fix}.")
    return data


# --------------------------------------------------------------------------------------------- plan files
def load_plans(workdir: str | Path) -> dict[str, Any]:
    """``workdir/plans.json``, checked for the keys and the version everything downstream relies on."""
    path = Path(workdir) / "plans.json"
    plans = read_json(path, _REPLAN, missing_fix=f"run mosaicseg plan COLLECTION -o {workdir} first")
    missing = [k for k in PLANS_KEYS if k not in plans]
    if missing:
        raise MosaicSegError(f"{path}: plans lack {missing}. Fix: {_REPLAN}.")
    if plans["version"] != PLANS_VERSION:
        raise MosaicSegError(
            f"{path}: plans version {plans['version']} is not supported (expected {PLANS_VERSION}). Fix: {_REPLAN}."
        )
    if not isinstance(plans["datasets"], dict) or not plans["datasets"]:
        raise MosaicSegError(f"{path}: 'datasets' must map each dataset name to its plan. Fix: {_REPLAN}.")
    return plans


def load_vocabulary(workdir: str | Path) -> Vocabulary:
    """The collection's global task and modality vocabulary, ``workdir/vocabulary.json``."""
    path = Path(workdir) / "vocabulary.json"
    data = read_json(path, _REPLAN, missing_fix=f"run mosaicseg plan COLLECTION -o {workdir} first")
    try:
        return Vocabulary.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise MosaicSegError(
            f"{path}: not a MosaicSeg vocabulary ({type(exc).__name__}: {exc}). Fix: {_REPLAN}."
        ) from exc


def load_collection_config(workdir: str | Path) -> CollectionConfig:
    """``workdir/collection.json``: the planned collection with the user's later edits (folds, sampling,
    weights, patient grouping). Training and its splits read this one."""
    path = Path(workdir) / "collection.json"
    data = read_json(path, _REPLAN, missing_fix=f"run mosaicseg plan COLLECTION -o {workdir} first")
    return parse_collection(data, source=path)


def planned_collection(workdir: str | Path, plans: dict[str, Any] | None = None) -> CollectionConfig:
    """The collection ``plans`` (default: :func:`load_plans`) were made from: which datasets, where.

    Preprocessing reads this copy, so that an edit of ``collection.json`` cannot point a planned dataset at
    other files than those it was fingerprinted from.
    """
    plans = plans if plans is not None else load_plans(workdir)
    return parse_collection(plans["collection"], source=Path(workdir) / "plans.json")


# --------------------------------------------------------------------------------------------- the cache
class CasePaths(NamedTuple):
    """The four files of one preprocessed case; ``meta`` is written last and marks the case as done."""

    image: Path  # CASE.npy: (C, *S) float32
    seg: Path  # CASE_seg.npy: (*S) int16, the dataset's own label values
    fg: Path  # CASE_fg.npz: label name -> (N, ndim) int32 voxel coordinates
    meta: Path  # CASE.json


def cache_dir(workdir: str | Path, dataset: str) -> Path:
    """``workdir/preprocessed/DATASET``: the folder of a dataset's preprocessed cases."""
    return Path(workdir) / "preprocessed" / dataset


def case_paths(workdir: str | Path, dataset: str, case_id: str) -> CasePaths:
    """Where a case of ``dataset`` is cached (the files need not exist)."""
    folder = cache_dir(workdir, dataset)
    return CasePaths(*(folder / f"{case_id}{suffix}" for suffix in (".npy", "_seg.npy", "_fg.npz", ".json")))


def dataset_plans_hash(plans: dict[str, Any], dataset: str) -> str:
    """Hash of everything that determines a dataset's cached cases: a cached case whose ``plans_hash``
    differs (an edited or re-made plan, e.g. another normalisation scheme) is preprocessed again."""
    key = {"version": plans.get("version"), "dim": plans.get("dim"), "dataset": plans["datasets"][dataset]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_case_meta(workdir: str | Path, dataset: str, case_id: str) -> dict[str, Any]:
    """``CASE.json`` of a preprocessed case (its keys: see data/preprocess.py)."""
    path = case_paths(workdir, dataset, case_id).meta
    return read_json(
        path,
        f"delete it and re-run mosaicseg preprocess {workdir}",
        missing_fix=f"case '{case_id}' of {dataset} is not preprocessed; run mosaicseg preprocess {workdir}",
    )


def is_case_done(workdir: str | Path, dataset: str, case_id: str, plans_hash: str) -> bool:
    """Whether a case was preprocessed completely under the plan with ``plans_hash``. An unreadable meta
    file counts as not done (preprocessing then rewrites it) instead of raising."""
    paths = case_paths(workdir, dataset, case_id)
    if not paths.meta.is_file():
        return False
    try:
        meta = load_case_meta(workdir, dataset, case_id)
    except MosaicSegError:
        return False
    return meta.get("plans_hash") == plans_hash and all(p.is_file() for p in (paths.image, paths.seg, paths.fg))


def list_cases(workdir: str | Path, plans: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Dataset → sorted ids of the cases preprocessed under the current ``plans`` (default: :func:`load_plans`);
    unfinished cases and cases of an older plan are left out."""
    plans = plans if plans is not None else load_plans(workdir)
    out: dict[str, list[str]] = {}
    for name in plans["datasets"]:
        folder = cache_dir(workdir, name)
        phash = dataset_plans_hash(plans, name)
        ids = []
        if folder.is_dir():
            for meta_path in folder.glob("*.json"):
                if meta_path.name.startswith("."):  # temporary files of atomic writes
                    continue
                case_id = meta_path.name[: -len(".json")]
                if is_case_done(workdir, name, case_id, phash):
                    ids.append(case_id)
        out[name] = sorted(ids)
    return out


def label_voxels(workdir: str | Path, dataset: str, case_id: str) -> tuple[dict[int, int], int]:
    """Voxels per label value of a preprocessed case's label map, and its total voxel count.

    Read from ``CASE.json`` (``label_voxels``, written by preprocessing); caches written before that key
    existed are counted from ``CASE_seg.npy``."""
    meta = load_case_meta(workdir, dataset, case_id)
    if "label_voxels" in meta and "shape_resampled" in meta:
        counts = {int(k): int(v) for k, v in meta["label_voxels"].items()}
        return counts, int(np.prod(meta["shape_resampled"]))
    seg = np.load(case_paths(workdir, dataset, case_id).seg, mmap_mode="r")
    values, n = np.unique(np.asarray(seg), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, n, strict=True)}, int(seg.size)


def task_frequencies(workdir: str | Path, vocabulary: Vocabulary, cases: list[tuple[str, str]]) -> np.ndarray:
    """``(K,)``: the share of voxels each task of ``vocabulary`` covers in the preprocessed label maps of
    ``cases`` (``(dataset, case_id)`` pairs), averaged over the cases of the datasets that annotate it
    (0 for a task none of them annotates)."""
    sums = np.zeros(vocabulary.num_tasks)
    n = np.zeros(vocabulary.num_tasks)
    for dataset, case_id in cases:
        if dataset not in vocabulary.label_map:
            continue
        counts, total = label_voxels(workdir, dataset, case_id)
        for k, values in vocabulary.label_map[dataset]:
            sums[k] += sum(counts.get(v, 0) for v in values) / max(total, 1)
            n[k] += 1
    return np.divide(sums, n, out=np.zeros_like(sums), where=n > 0)
