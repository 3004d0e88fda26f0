"""Score a folder of predicted label maps against reference label maps: ``summary.json`` and ``metrics.csv``.

:func:`evaluate_folders` matches prediction and reference files by case id (file name minus the dataset's
``file_ending``), scores every foreground label (or region) of the reference ``dataset.json`` per case
with :func:`~mosaicseg.evaluation.metrics.case_metrics`, and writes both files atomically.

Means (NaN values excluded and counted, see :mod:`mosaicseg.evaluation.metrics`):

- label mean: over the cases of one (dataset, label);
- dataset mean: over that dataset's label means (nnU-Net's ``foreground_mean``);
- ``mean_class_averaged``: over every (dataset, label) mean, so each class weighs the same;
- ``mean_dataset_averaged``: over the dataset means, so each dataset weighs the same whatever its
  number of labels.

:func:`summarise` computes these from per-(case, label) rows of any number of datasets, so several
evaluations of a collection combine into one table (:func:`format_table`).

Predictions written in another dataset's numbering (generalisation tests: a model's Dataset003
hippocampus scored on Dataset001's) are read with ``pred_dataset_json`` and paired through ``mapping``
(prediction label → reference label, names or integer values).
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mosaicseg.atomic import atomic_write, write_json_atomic
from mosaicseg.data.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_image
from mosaicseg.data.manifest import _as_labels, _parse_json, _parse_labels
from mosaicseg.errors import MosaicSegError, Problem, raise_if_errors
from mosaicseg.evaluation.metrics import METRICS, case_metrics, region_mask
from mosaicseg.progress import progress_bar

SUMMARY_NAME = "summary.json"
CSV_NAME = "metrics.csv"
STATUSES = ("ok", "both_empty", "ref_empty", "pred_empty")
CSV_COLUMNS = ("dataset", "case", "label", "prediction_label", *METRICS, "n_ref", "n_pred", "status")
_DIGITS = 6  # metrics are float32 inside MONAI; more decimals would only print noise


@dataclass(frozen=True)
class LabelMap:
    """The label part of one ``dataset.json``: foreground labels/regions → values, ignore value, file ending.

    ``name`` is the dataset folder's name (as :class:`~mosaicseg.data.manifest.DatasetManifest` uses).
    """

    name: str
    path: Path
    labels: dict[str, tuple[int, ...]]
    ignore_value: int | None
    file_ending: str


@dataclass(frozen=True)
class LabelPair:
    """One scored pair: prediction voxels with a value in ``pred_values`` against reference ``ref_values``."""

    label: str
    ref_values: tuple[int, ...]
    prediction_label: str
    pred_values: tuple[int, ...]


def load_label_map(path: str | Path) -> LabelMap:
    """Read the labels of ``path`` (a ``dataset.json`` or the dataset folder holding it) with the same parser
    and checks as the dataset manifest. Only ``labels`` and ``file_ending`` are required here."""
    path = Path(path)
    json_path = path / "dataset.json" if path.is_dir() else path
    if json_path.name != "dataset.json":
        raise MosaicSegError(f"{path}: not a dataset.json. Fix: pass the dataset's dataset.json or its folder.")
    if not json_path.is_file():
        raise MosaicSegError(f"{json_path}: file not found. Fix: check the --dataset-json path.")
    problems: list[Problem] = []
    data = _parse_json(json_path.parent, problems)
    # evaluation needs only the label map and the file ending, not channel_names/numTraining
    problems = [p for p in problems if p.code != "json-missing-key"]
    if data is not None:
        for key in ("labels", "file_ending"):
            if key not in data:
                problems.append(
                    Problem(
                        "error",
                        "json-missing-key",
                        json_path,
                        f"missing key '{key}'",
                        "add it as nnU-Net v2's dataset.json format describes",
                    )
                )
    raise_if_errors(problems, str(json_path))
    assert data is not None  # no errors implies the JSON was parsed
    labels, ignore_value, _regions = _parse_labels(data["labels"], json_path, problems)
    ending = data["file_ending"]
    if not isinstance(ending, str) or file_ending("x" + ending) != ending.lower() or not ending:
        problems.append(
            Problem(
                "error",
                "json-file-ending",
                json_path,
                f"file_ending {ending!r} is not supported",
                f"use one of {', '.join(SUPPORTED_ENDINGS)}",
            )
        )
    raise_if_errors(problems, str(json_path))
    return LabelMap(json_path.parent.name, json_path, labels, ignore_value, ending)


def parse_mapping(items: Iterable[str]) -> dict[str, str]:
    """``["A=B", ...]`` (the CLI's repeated ``--map``) → ``{"A": "B"}``: prediction label → reference label."""
    mapping: dict[str, str] = {}
    for item in items:
        pred, sep, ref = item.partition("=")
        if not sep or not pred.strip() or not ref.strip():
            raise MosaicSegError(
                f"--map {item}: expected PRED_LABEL=REF_LABEL. Fix: write e.g. "
                "--map Hippocampus=Hippocampus (names or integer values)."
            )
        if pred.strip() in mapping:
            raise MosaicSegError(
                f"--map {item}: prediction label '{pred.strip()}' is mapped twice. "
                "Fix: give each prediction label one --map."
            )
        mapping[pred.strip()] = ref.strip()
    return mapping


def _resolve(spec: str, label_map: LabelMap) -> tuple[str, tuple[int, ...]]:
    """(label name, values) for a label name of ``label_map`` (exact, else unique case-insensitive match) or
    an integer value."""
    if spec in label_map.labels:
        return spec, label_map.labels[spec]
    folded = [n for n in label_map.labels if n.lower() == spec.lower()]
    if len(folded) == 1:
        return folded[0], label_map.labels[folded[0]]
    if spec.isdigit():
        value = int(spec)
        named = [n for n, v in label_map.labels.items() if v == (value,)]
        return (named[0] if named else spec), (value,)
    close = difflib.get_close_matches(spec, list(label_map.labels), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise MosaicSegError(
        f"{label_map.path}: no label '{spec}' (labels: {', '.join(label_map.labels)}). "
        f"Fix: {hint}use one of these names or an integer value."
    )


def label_pairs(
    ref_map: LabelMap,
    pred_map: LabelMap | None = None,
    labels: Sequence[str] | None = None,
    mapping: dict[str, str] | None = None,
) -> list[LabelPair]:
    """Which prediction values are scored against which reference values.

    Without ``mapping`` every reference label is scored against the prediction label of the same name
    (the same values when ``pred_map`` is None). With ``mapping`` only the mapped pairs are scored.
    ``labels`` keeps only these reference labels.
    """
    pred_map = pred_map or ref_map
    pairs: list[LabelPair] = []
    if mapping:
        for pred_spec, ref_spec in mapping.items():
            pred_name, pred_values = _resolve(pred_spec, pred_map)
            ref_name, ref_values = _resolve(ref_spec, ref_map)
            if any(p.label == ref_name for p in pairs):
                raise MosaicSegError(
                    f"{ref_map.path}: reference label '{ref_name}' is the target of two mappings. "
                    "Fix: map one prediction label onto each reference label."
                )
            pairs.append(LabelPair(ref_name, ref_values, pred_name, pred_values))
    else:
        for ref_name, ref_values in ref_map.labels.items():
            if pred_map is ref_map:
                pairs.append(LabelPair(ref_name, ref_values, ref_name, ref_values))
                continue
            if ref_name not in pred_map.labels:
                raise MosaicSegError(
                    f"{pred_map.path}: has no label '{ref_name}' of {ref_map.path}. Fix: pair "
                    "labels explicitly with mapping (--map PRED_LABEL=REF_LABEL)."
                )
            pairs.append(LabelPair(ref_name, ref_values, ref_name, pred_map.labels[ref_name]))
    if labels:
        chosen = {_resolve(name, ref_map)[0] for name in labels}
        pairs = [p for p in pairs if p.label in chosen]
        if not pairs:
            raise MosaicSegError(
                f"{ref_map.path}: none of the labels {list(labels)} is scored. Fix: choose labels "
                "that the mapping covers."
            )
    return pairs


def _case_files(folder: Path, ending: str, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise MosaicSegError(f"{folder}: {what} folder not found. Fix: check the path.")
    return {
        p.name[: -len(ending)]: p
        for p in sorted(folder.iterdir())
        if not p.name.startswith(".") and p.is_file() and p.name.endswith(ending)
    }


@dataclass(frozen=True)
class _CaseJob:
    dataset: str
    case_id: str
    ref_path: Path
    pred_path: Path | None  # None: a missing prediction scored as empty
    pairs: tuple[LabelPair, ...]
    ignore_value: int | None
    nsd_tolerance_mm: float


def _read_label_map(path: Path) -> tuple[np.ndarray, Geometry]:
    arr, geometry = read_image(path)
    if arr.shape[0] != 1:
        raise MosaicSegError(
            f"{path}: a label map must have one channel, found {arr.shape[0]}. "
            "Fix: save label maps as single-channel integer images."
        )
    return _as_labels(arr[0], path), geometry


def _describe(g: Geometry) -> str:
    return f"shape {g.file_shape}, spacing {g.file_spacing}, origin {g.file_origin}"


def _score_case(job: _CaseJob) -> list[dict[str, Any]]:
    ref, ref_geom = _read_label_map(job.ref_path)
    if job.pred_path is None:
        pred = np.zeros_like(ref)
    else:
        pred, pred_geom = _read_label_map(job.pred_path)
        if pred.shape != ref.shape or not pred_geom.same_grid(ref_geom):
            raise MosaicSegError(
                f"{job.pred_path}: grid ({_describe(pred_geom)}) differs from the reference {job.ref_path} "
                f"({_describe(ref_geom)}). Fix: write predictions in the reference image's geometry."
            )
    # nnU-Net's ignore label marks unannotated voxels: they count neither for nor against a prediction
    valid = None if job.ignore_value is None else ref != job.ignore_value
    rows = []
    for pair in job.pairs:
        p, r = region_mask(pred, pair.pred_values), region_mask(ref, pair.ref_values)
        if valid is not None:
            p, r = p & valid, r & valid
        m = case_metrics(p, r, ref_geom.spacing, job.nsd_tolerance_mm)
        rows.append(
            {
                "dataset": job.dataset,
                "case": job.case_id,
                "label": pair.label,
                "prediction_label": pair.prediction_label,
                **{k: _json_float(m[k]) for k in METRICS},
                "n_ref": m["n_ref"],
                "n_pred": m["n_pred"],
                "status": m["status"],
            }
        )
    return rows


def _json_float(value: Any) -> float | None:
    """NaN → None: JSON has no NaN (Python would write the invalid token ``NaN``)."""
    value = float(value)
    return None if math.isnan(value) else round(value, _DIGITS)


def _init_worker() -> None:
    import SimpleITK as sitk
    import torch

    # one case per worker process; library threads would only compete for the same cores
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where available: a plain fork of this process may deadlock once torch's thread pool has run,
    while the fork server imports this module (torch, MONAI: seconds) once and forks every worker from it."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _run(jobs: list[_CaseJob], workers: int, progress: bool) -> list[list[dict[str, Any]]]:
    bar = progress_bar(total=len(jobs), desc="evaluate", unit="case", disable=not progress or not jobs)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(_score_case(job))
                bar.update()
            return results
        n = min(workers, len(jobs), os.cpu_count() or 1)
        with ProcessPoolExecutor(n, mp_context=_pool_context(), initializer=_init_worker) as pool:
            results = []
            for rows in pool.map(_score_case, jobs):
                results.append(rows)
                bar.update()
            return results


def _mean(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return round(float(np.mean(finite)), _DIGITS) if finite else None


def summarise(
    rows: Sequence[dict[str, Any]], *, dataset_of: Callable[[dict[str, Any]], str] | None = None
) -> dict[str, Any]:
    """Means per label, per dataset and overall from per-(case, label) rows of one or several datasets.

    Args:
        rows: dicts with ``case``, ``label``, the :data:`METRICS` (float, NaN or None) and ``status``, as in
            ``summary["cases"]`` of :func:`evaluate_folders`; rows of several evaluations may be concatenated.
        dataset_of: the dataset of a row; default ``row["dataset"]``.

    Returns:
        ``{"datasets": {dataset: {"labels": {label: {"n_cases", "n_<status>"..., metric: {"mean", "n",
        "n_nan"}}}, "mean": {metric: mean}}}, "mean_class_averaged": {metric: mean},
        "mean_dataset_averaged": {metric: mean}}``; a mean with nothing to average is None.
    """
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        dataset = dataset_of(row) if dataset_of else row["dataset"]
        grouped.setdefault(dataset, {}).setdefault(row["label"], []).append(row)
    datasets: dict[str, Any] = {}
    for dataset, by_label in grouped.items():
        labels: dict[str, Any] = {}
        for label, label_rows in by_label.items():
            entry: dict[str, Any] = {"n_cases": len(label_rows)}
            entry.update({f"n_{s}": sum(r.get("status") == s for r in label_rows) for s in STATUSES})
            for metric in METRICS:
                values = [r.get(metric) for r in label_rows]
                n_nan = sum(v is None or math.isnan(v) for v in values)
                entry[metric] = {"mean": _mean(values), "n": len(values) - n_nan, "n_nan": n_nan}
            labels[label] = entry
        datasets[dataset] = {
            "labels": labels,
            "mean": {m: _mean(e[m]["mean"] for e in labels.values()) for m in METRICS},
        }
    return {
        "datasets": datasets,
        "mean_class_averaged": {
            m: _mean(e[m]["mean"] for d in datasets.values() for e in d["labels"].values()) for m in METRICS
        },
        "mean_dataset_averaged": {m: _mean(d["mean"][m] for d in datasets.values()) for m in METRICS},
    }


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # an empty CSV cell would be ambiguous with a missing column; "nan" reads back as NaN in pandas/numpy
        writer.writerow({k: ("nan" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    return buffer.getvalue()


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One line per (case, label) with the :data:`CSV_COLUMNS`, atomically."""
    text = _csv_text(rows)
    return atomic_write(path, lambda f: f.write(text), mode="w")


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    dataset_json: str | Path,
    *,
    pred_dataset_json: str | Path | None = None,
    labels: Sequence[str] | None = None,
    mapping: dict[str, str] | None = None,
    nsd_tolerance_mm: float = 2.0,
    output_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    missing_as_empty: bool = False,
) -> dict[str, Any]:
    """Score every prediction of ``pred_dir`` against the reference label map of the same case in ``gt_dir``.

    Args:
        pred_dir: predicted label maps, ``CASE<file_ending>``.
        gt_dir: reference label maps, ``CASE<file_ending>`` (e.g. a dataset's ``labelsTr``).
        dataset_json: the reference dataset's ``dataset.json`` (or its folder): labels, regions, ignore
            label and file ending.
        pred_dataset_json: the ``dataset.json`` whose numbering and file ending the predictions use, when it
            is another dataset's; default ``dataset_json``.
        labels: reference labels to score; default all (background and ignore are never scored).
        mapping: prediction label → reference label (names or integer values); only these pairs are scored.
        nsd_tolerance_mm: NSD tolerance in mm.
        output_dir: where ``summary.json`` and ``metrics.csv`` go; default ``pred_dir``.
        workers: processes scoring cases in parallel.
        progress: show a progress bar.
        overwrite: replace an existing ``summary.json``/``metrics.csv``.
        missing_as_empty: score a reference case without prediction as an empty prediction (Dice 0)
            instead of refusing; the cases are listed under ``missing_predictions`` either way.

    Returns:
        The summary as written to ``summary.json``: settings, ``cases`` (one row per case × label, NaN
        as None), and the means of :func:`summarise`.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    out = Path(output_dir) if output_dir is not None else pred_dir
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise MosaicSegError(
            f"--nsd-tolerance {nsd_tolerance_mm}: must be a distance >= 0 in mm. Fix: pass e.g. --nsd-tolerance 2."
        )
    existing = [out / name for name in (SUMMARY_NAME, CSV_NAME) if (out / name).exists()]
    if existing and not overwrite:
        raise MosaicSegError(
            f"{existing[0]}: exists already. Fix: pass overwrite (--overwrite) or choose another output folder."
        )
    ref_map = load_label_map(dataset_json)
    pred_map = load_label_map(pred_dataset_json) if pred_dataset_json is not None else None
    pairs = tuple(label_pairs(ref_map, pred_map, labels, mapping))
    ref_files = _case_files(gt_dir, ref_map.file_ending, "reference")
    if not ref_files:
        raise MosaicSegError(
            f"{gt_dir}: no reference label file ending in {ref_map.file_ending}. Fix: pass the "
            "folder holding the reference label maps (e.g. labelsTr)."
        )
    pred_files = _case_files(pred_dir, (pred_map or ref_map).file_ending, "prediction")
    missing = [c for c in ref_files if c not in pred_files]
    if missing and not missing_as_empty:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MosaicSegError(
            f"{pred_dir}: no prediction for {len(missing)} of {len(ref_files)} reference case(s): "
            f"{shown}. Fix: predict them, or score them as empty (missing_as_empty, "
            "--missing-as-empty)."
        )
    jobs = [
        _CaseJob(
            ref_map.name, case, ref_path, pred_files.get(case), pairs, ref_map.ignore_value, float(nsd_tolerance_mm)
        )
        for case, ref_path in ref_files.items()
    ]
    rows = [row for case_rows in _run(jobs, workers, progress) for row in case_rows]
    summary = {
        "dataset": ref_map.name,
        "prediction_dataset": (pred_map or ref_map).name,
        "prediction_folder": str(pred_dir),
        "reference_folder": str(gt_dir),
        "dataset_json": str(ref_map.path),
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "labels": {
            p.label: {
                "reference_values": list(p.ref_values),
                "prediction_label": p.prediction_label,
                "prediction_values": list(p.pred_values),
            }
            for p in pairs
        },
        "n_cases": len(jobs),
        "missing_predictions": missing,
        "unmatched_predictions": [c for c in pred_files if c not in ref_files],
        **summarise(rows),
        "cases": rows,
    }
    write_csv(out / CSV_NAME, rows)
    write_json_atomic(out / SUMMARY_NAME, summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Console table of a summary (from :func:`evaluate_folders` or :func:`summarise`): Dice, NSD and HD95
    means per dataset and label, NaN counts, dataset means and both overall means."""

    def num(v: float | None, digits: int = 4) -> str:
        return "nan" if v is None else f"{v:.{digits}f}"

    rows = [("dataset", "label", "Dice", "NSD", "HD95 mm", "cases", "NaN")]
    for dataset, d in summary["datasets"].items():
        for label, e in d["labels"].items():
            rows.append(
                (
                    dataset,
                    label,
                    num(e["dice"]["mean"]),
                    num(e["nsd"]["mean"]),
                    num(e["hd95"]["mean"], 2),
                    str(e["n_cases"]),
                    str(e["dice"]["n_nan"]),
                )
            )
        mean = d["mean"]
        rows.append((dataset, "(mean)", num(mean["dice"]), num(mean["nsd"]), num(mean["hd95"], 2), "", ""))
    for key, title in (("mean_dataset_averaged", "dataset-averaged"), ("mean_class_averaged", "class-averaged")):
        mean = summary[key]
        rows.append(("overall", title, num(mean["dice"]), num(mean["nsd"]), num(mean["hd95"], 2), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
