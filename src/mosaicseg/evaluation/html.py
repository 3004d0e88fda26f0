"""``mosaicseg report``: one self-contained HTML page about a run, its predictions and their evaluation.

The page needs no server and no network: plots and slice overlays are PNG images inlined as base64 data
URIs, the style sheet is inline, there is no script. It shows what the input folder holds and says what it
did not find:

- metric tables per dataset and per task (a task is one ``dataset/label`` pair) from ``evaluate``'s
  ``summary.json`` files (:mod:`mosaicseg.evaluation.report`);
- training curves from each fold's ``metrics.jsonl``: train loss, validation pseudo-Dice per dataset,
  learning rate;
- the best and worst cases of every task by Dice, as contours of the reference and the prediction on the
  image: axial, coronal and sagittal slices through the structure's centre of mass (2D: the image);
- configuration and provenance: each fold's ``config.json``, the model config stored in its checkpoint,
  the ``predict.json`` record the ``predict`` command writes, the evaluation settings, package versions.

Accepted folders (:func:`find_inputs`): a run folder (``fold_*`` inside) or one fold folder; a prediction
or evaluation folder holding ``summary.json`` (or one per dataset in subfolders); the ``mosaicseg demo``
folder (``run/fold_0``, ``evaluation/DATASET/summary.json``, ``predictions/``, ``reference/``, ``data/``).
The prediction, reference and image folders of an evaluation are read from its ``summary.json`` and the
dataset's ``dataset.json`` folder (``imagesTr``, ``imagesTs``); ``--pred``, ``--gt``, ``--images`` and
``--dataset-json`` replace them (a ``DATASET`` subfolder of one of these is used for that dataset).

Arrays follow :func:`mosaicseg.data.io.read_image`: ``(C, X, Y[, Z])`` in the canonical ``LPS``
orientation for NIfTI/NRRD/MHA, ``(C, H, W)`` for PNG. Slices are drawn the radiological way: axial with
the patient's anterior up and right on the left, coronal and sagittal with superior up.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import platform
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mosaicseg.atomic import atomic_write
from mosaicseg.data.io import file_ending, read_image
from mosaicseg.errors import MosaicSegError
from mosaicseg.evaluation.metrics import region_mask

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"  # as mosaicseg.evaluation.report writes it (not imported: that pulls tqdm, MONAI)
PREDICT_RECORD = "predict.json"  # as the predict command writes it (mosaicseg.cli.PREDICT_RECORD)
REF_COLOUR = "#00e676"  # green and magenta stay apart for the common colour-vision deficiencies too
PRED_COLOUR = "#ff1fd2"
_PANEL_INCH = 3.6  # height of a 3D slice panel (2D: 1.2x); at _DPI 360 px, so a 64-pixel slice is drawn 5x
_DPI = 100
_RUN_FILES = ("metrics.jsonl", "config.json")
_VERSIONED = ("mosaicseg", "torch", "monai", "numpy", "SimpleITK", "nibabel", "matplotlib")


@dataclass
class Evaluation:
    """One ``summary.json`` and the folders its cases are drawn from (``None``: not found)."""

    dataset: str
    summary: dict[str, Any]
    source: str  # where the summary came from, for the page
    pred_dir: Path | None = None
    ref_dir: Path | None = None
    dataset_json: Path | None = None
    image_dirs: list[Path] = field(default_factory=list)
    ending: str | None = None


@dataclass
class Inputs:
    """What :func:`find_inputs` found under a folder, and ``missing``: sentences about what it did not."""

    root: Path
    folds: list[Path] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    tables_only: dict[str, Any] | None = None  # a summary without per-case rows (demo_summary.json)
    predict_records: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ discovery
def _read_json(path: Path, missing: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        missing.append(f"{path}: unreadable ({type(exc).__name__}: {exc}); left out.")
        return None
    if not isinstance(data, dict):
        missing.append(f"{path}: not a JSON object; left out.")
        return None
    return data


def _fold_key(path: Path) -> tuple[int, str]:
    m = re.search(r"(\d+)$", path.name)
    return (int(m[1]) if m else 1 << 30, path.name)


def _fold_dirs(folder: Path) -> list[Path]:
    """``folder`` itself when it is one fold (``metrics.jsonl``/``config.json``), else its ``fold_*`` folders."""
    if not folder.is_dir():
        return []
    if any((folder / n).is_file() for n in _RUN_FILES):
        return [folder]
    folds = [p for p in folder.glob("fold_*") if p.is_dir() and any((p / n).is_file() for n in _RUN_FILES)]
    return sorted(folds, key=_fold_key)


def _existing(text: Any, base: Path) -> Path | None:
    """A path recorded in a JSON file: as written (absolute, or relative to where the command ran), else
    relative to the folder of that file."""
    if not isinstance(text, str) or not text:
        return None
    path = Path(text)
    for candidate in (path, base / path) if not path.is_absolute() else (path,):
        if candidate.exists():
            return candidate
    return None


def _override(option: Path | None, dataset: str) -> Path | None:
    """A ``--pred``/``--gt``/``--images`` folder: its ``dataset`` subfolder when it has one (one folder per
    dataset, as the demo writes), else the folder itself."""
    if option is None:
        return None
    return option / dataset if (option / dataset).is_dir() else option


def _dataset_json_override(option: Path | None, dataset: str) -> Path | None:
    if option is None:
        return None
    for candidate in (option / dataset / "dataset.json", option / "dataset.json", option):
        if candidate.is_file():
            return candidate
    return option


def _summary_files(root: Path, pred: Path | None) -> list[Path]:
    if (root / SUMMARY_NAME).is_file():
        found = [root / SUMMARY_NAME]
    else:
        found = sorted({*root.glob(f"*/{SUMMARY_NAME}"), *root.glob(f"evaluation/*/{SUMMARY_NAME}")})
    if pred is not None:
        extra = [pred / SUMMARY_NAME] if (pred / SUMMARY_NAME).is_file() else sorted(pred.glob(f"*/{SUMMARY_NAME}"))
        resolved = {p.resolve() for p in found}
        found += [p for p in extra if p.resolve() not in resolved]
    return found


def _evaluation(path: Path, summary: dict[str, Any], options: dict[str, Path | None], missing: list[str]) -> Evaluation:
    base = path.parent
    dataset = str(summary.get("dataset") or base.name)
    ev = Evaluation(dataset, summary, str(path))
    ev.pred_dir = _override(options["pred"], dataset) or _existing(summary.get("prediction_folder"), base)
    ev.ref_dir = _override(options["gt"], dataset) or _existing(summary.get("reference_folder"), base)
    ev.dataset_json = _dataset_json_override(options["dataset_json"], dataset) or _existing(
        summary.get("dataset_json"), base
    )
    if ev.dataset_json is not None and ev.dataset_json.is_dir():
        ev.dataset_json = ev.dataset_json / "dataset.json"
    if ev.dataset_json is not None and ev.dataset_json.is_file():
        try:
            ev.ending = str(json.loads(ev.dataset_json.read_text(encoding="utf-8")).get("file_ending") or "") or None
        except (OSError, ValueError):
            missing.append(f"{ev.dataset_json}: unreadable dataset.json; the file ending is guessed from the files.")
    images = _override(options["images"], dataset)
    if images is not None:
        ev.image_dirs.append(images)
    if ev.dataset_json is not None:
        ev.image_dirs += [ev.dataset_json.parent / "imagesTr", ev.dataset_json.parent / "imagesTs"]
    ev.image_dirs = [d for d in ev.image_dirs if d.is_dir()]
    for what, value, hint in (
        ("prediction folder", ev.pred_dir, "--pred"),
        ("reference folder", ev.ref_dir, "--gt"),
        ("image folder", ev.image_dirs or None, "--images (or --dataset-json next to imagesTr)"),
    ):
        if value is None:
            missing.append(f"{dataset}: the {what} was not found ({path}); overlays need it: pass {hint}.")
    return ev


def _score_now(pred: Path, gt: Path, dataset_json: Path, missing: list[str]) -> tuple[dict[str, Any], Path]:
    from mosaicseg.evaluation.report import evaluate_folders

    with tempfile.TemporaryDirectory(prefix="mosaicseg-report-") as tmp:
        summary = evaluate_folders(pred, gt, dataset_json, output_dir=tmp, progress=False)
    missing.append(
        f"no {SUMMARY_NAME} was found, so the report scored {pred} against {gt} itself (nothing saved; "
        f"mosaicseg evaluate -o keeps a {SUMMARY_NAME})."
    )
    return summary, pred / SUMMARY_NAME


def find_inputs(
    folder: str | Path,
    *,
    pred: str | Path | None = None,
    gt: str | Path | None = None,
    images: str | Path | None = None,
    dataset_json: str | Path | None = None,
) -> Inputs:
    """Runs, evaluations and prediction records in ``folder`` (see the module docstring), with the optional
    folders replacing those recorded in ``summary.json``. Raises :class:`MosaicSegError` when ``folder``
    holds none of them."""
    root = Path(folder)
    if not root.is_dir():
        raise MosaicSegError(
            f"{root}: no such folder. Fix: pass a run folder, a prediction folder with {SUMMARY_NAME} or the demo "
            "folder."
        )
    options = {k: Path(v) if v is not None else None for k, v in (("pred", pred), ("gt", gt), ("images", images))}
    options["dataset_json"] = Path(dataset_json) if dataset_json is not None else None
    for name, value in options.items():
        if value is not None and not value.exists():
            flag = "--" + name.replace("_", "-")
            raise MosaicSegError(f"{flag} {value}: not found. Fix: check the path.")
    found = Inputs(root)
    missing = found.missing
    for path in _summary_files(root, options["pred"]):
        summary = _read_json(path, missing)
        if summary is None:
            continue
        if not isinstance(summary.get("datasets"), dict):
            missing.append(f"{path}: has no 'datasets' (not written by mosaicseg evaluate); left out.")
            continue
        found.evaluations.append(_evaluation(path, summary, options, missing))
    scoring = options["gt"] is not None or options["dataset_json"] is not None
    if not found.evaluations and (options["pred"] is not None or scoring):
        unscored = options["pred"] or root  # `report PRED --gt GT --dataset-json ...` names them as the folder
        if options["gt"] is not None and options["dataset_json"] is not None:
            summary, where = _score_now(unscored, options["gt"], options["dataset_json"], missing)
            scored = _evaluation(where, summary, {**options, "pred": unscored}, missing)
            scored.source = f"{unscored} (scored for this report, not saved)"
            found.evaluations.append(scored)
        else:
            missing.append(
                f"{unscored}: no {SUMMARY_NAME}; pass both --gt and --dataset-json to score the predictions for "
                "this report."
            )
    if not found.evaluations:
        demo = root / "demo_summary.json"
        if (
            demo.is_file()
            and (data := _read_json(demo, missing)) is not None
            and isinstance(data.get("datasets"), dict)
        ):
            found.tables_only = data
            missing.append(f"{demo}: tables only; the per-case {SUMMARY_NAME} files (evaluation/*/) were not found.")
        else:
            missing.append(
                f"no {SUMMARY_NAME} in {root} or its subfolders: no metric tables and no case overlays. Fix: run "
                "mosaicseg evaluate PRED GT --dataset-json ... -o PRED."
            )
    # prediction records: beside the predictions (predict writes one per output folder, datasets below it)
    record_paths = [root / PREDICT_RECORD]
    for ev in found.evaluations:
        if ev.pred_dir is not None:
            record_paths += [ev.pred_dir / PREDICT_RECORD, ev.pred_dir.parent / PREDICT_RECORD]
    if options["pred"] is not None:
        record_paths.append(options["pred"] / PREDICT_RECORD)
    seen: set[Path] = set()
    for path in record_paths:
        if path.is_file() and path.resolve() not in seen:
            seen.add(path.resolve())
            if (record := _read_json(path, missing)) is not None:
                found.predict_records.append((path, record))
    if not found.predict_records:
        missing.append(
            f"no {PREDICT_RECORD} (written by mosaicseg predict beside its outputs): no prediction settings."
        )
    # the run: the folder itself, the demo's run/, else the model a prediction record names
    candidates = [root, root / "run"]
    candidates += [p for path, r in found.predict_records if (p := _existing(r.get("model"), path.parent)) is not None]
    for candidate in candidates:
        run = candidate.parent if candidate.is_file() else candidate  # a checkpoint file: its fold folder
        if folds := _fold_dirs(run):
            found.folds = folds
            break
    if not found.folds:
        missing.append(
            "no run folder (metrics.jsonl/config.json, or fold_* folders holding them): no training curves and "
            "no training configuration."
        )
    if not found.folds and not found.evaluations and found.tables_only is None and not found.predict_records:
        raise MosaicSegError(
            f"{root}: nothing to report: no run (metrics.jsonl, config.json, fold_*), no {SUMMARY_NAME} and no "
            f"{PREDICT_RECORD}. Fix: pass a run folder, a prediction folder evaluated with mosaicseg evaluate -o "
            "(or with --gt and --dataset-json), or the mosaicseg demo folder."
            + "".join(f"\n  {m}" for m in missing if not m.startswith(f"no {PREDICT_RECORD}"))
        )
    return found


# ------------------------------------------------------------------------------------------------ figures
def _png_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def training_figure(folds: Sequence[tuple[str, list[dict[str, Any]]]]) -> str | None:
    """Train loss, validation pseudo-Dice per dataset and learning rate against the iteration, one line
    style per fold; a PNG data URI, ``None`` without records."""
    from matplotlib.figure import Figure

    folds = [(name, records) for name, records in folds if records]
    if not folds:
        return None
    datasets = sorted({d for _, records in folds for r in records for d in r.get("val_dice", {})})
    colours = {d: f"C{i % 10}" for i, d in enumerate(datasets)}
    styles = ("-", "--", ":", "-.")
    fig = Figure(figsize=(11, 7.2))
    loss_ax, dice_ax, lr_ax = fig.subplots(3, 1, sharex=True)
    for f, (name, records) in enumerate(folds):
        style = styles[f % len(styles)]
        label = f" ({name})" if len(folds) > 1 else ""
        its = [r.get("iteration", r.get("epoch", i)) for i, r in enumerate(records)]
        loss_ax.plot(
            its, [r.get("train_loss", math.nan) for r in records], style, color="C0", label=f"train loss{label}"
        )
        lr_ax.plot(its, [r.get("lr", math.nan) for r in records], style, color="C2", label=f"learning rate{label}")
        for d in datasets:
            pts = [(it, r["val_dice"][d]) for it, r in zip(its, records, strict=True) if d in r.get("val_dice", {})]
            if pts:
                dice_ax.plot(*zip(*pts, strict=True), style, marker="o", ms=4, color=colours[d], label=f"{d}{label}")
    loss_ax.set_ylabel("train loss")
    dice_ax.set_ylabel("validation pseudo-Dice")
    dice_ax.set_ylim(-0.02, 1.02)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("iteration")
    for ax in (loss_ax, dice_ax, lr_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=9, loc="best")
    if not datasets:
        dice_ax.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=dice_ax.transAxes)
    fig.tight_layout()
    return _png_uri(fig)


@dataclass(frozen=True)
class _View:
    name: str
    axis: int | None  # the sliced axis of an (X, Y, Z) array; None for a 2D image
    index: int
    aspect: float  # row spacing / column spacing of the displayed plane


def _centre_views(mask: np.ndarray, spacing: Sequence[float]) -> list[_View]:
    """Axial, coronal and sagittal views of a 3D ``(X, Y, Z)`` mask through its centre of mass (the grid's
    centre when empty); a view whose slice misses the structure (a ring's centre) takes its fullest slice."""
    # half voxels round up (not to even), so a centre is where one counts it by hand
    centre = (
        [int(np.floor(c + 0.5)) for c in np.argwhere(mask).mean(axis=0)] if mask.any() else [s // 2 for s in mask.shape]
    )
    sx, sy, sz = (float(s) for s in spacing)
    views = []
    for name, axis, aspect in (("axial", 2, sy / sx), ("coronal", 1, sz / sx), ("sagittal", 0, sz / sy)):
        index = centre[axis]
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        if mask.any() and counts[index] == 0:
            index = int(np.argmax(counts))
        views.append(_View(name, axis, index, aspect))
    return views


def _plane(arr: np.ndarray, view: _View, png: bool) -> np.ndarray:
    """The displayed plane of ``arr`` ``(X, Y[, Z])`` (PNG: ``(H, W)``), rows from the top of the screen."""
    if view.axis is None:
        return arr if png else arr.T  # NIfTI 2D (X, Y): rows Y (anterior up), columns X (patient right left)
    plane = np.take(arr, view.index, axis=view.axis).T
    return plane if view.axis == 2 else plane[::-1]  # coronal/sagittal rows are Z, superior (high Z) up


def _display_image(image: np.ndarray) -> np.ndarray:
    """``(C, ...)`` image → grey values in [0, 1] ``(...)`` (channel 0, 0.5-99.5 percentile window), or
    ``(..., 3)`` RGB for a three-channel 8-bit image."""
    if image.shape[0] == 3 and image.dtype == np.uint8:
        return np.moveaxis(image, 0, -1).astype(np.float32) / 255.0
    grey = image[0].astype(np.float32)
    finite = grey[np.isfinite(grey)]
    lo, hi = np.percentile(finite, (0.5, 99.5)) if finite.size else (0.0, 1.0)
    return np.clip((np.nan_to_num(grey, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1)


def overlay_figure(
    image: np.ndarray | None, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], png: bool
) -> str:
    """Contours of ``ref`` and ``pred`` (bool ``(X, Y[, Z])``, PNG ``(H, W)``) on ``image`` (display values
    from :func:`_display_image`, or ``None``: a black background) → PNG data URI.

    Panels share one height and take the width their plane's physical extent asks for, so nothing is
    letterboxed; a 2D image gets one larger panel and no title (the page's caption says what it is)."""
    from matplotlib.figure import Figure

    if ref.ndim == 3:
        views = _centre_views(ref if ref.any() else pred, spacing)
        height, title = _PANEL_INCH, 0.4
    else:
        views = [_View("image", None, 0, 1.0 if png else float(spacing[1]) / float(spacing[0]))]
        height, title = _PANEL_INCH * 1.2, 0.0
    planes = [(view, _plane(ref, view, png), _plane(pred, view, png)) for view in views]
    # displayed width / height of each plane, bounded so a thin slab still gets a usable panel
    ratios = [min(max(r.shape[1] / (r.shape[0] * view.aspect), 0.4), 2.5) for view, r, _ in planes]
    gap = 0.12
    width = height * sum(ratios) + gap * (len(views) - 1)
    fig = Figure(figsize=(width, height + title))
    grid = fig.add_gridspec(
        1, len(views), width_ratios=ratios, left=0, right=1, bottom=0, top=height / (height + title),
        wspace=gap * len(views) / (height * sum(ratios)),
    )  # fmt: skip
    for i, (view, r, p) in enumerate(planes):
        ax = fig.add_subplot(grid[0, i])
        if image is not None:
            shown = (
                np.stack([_plane(image[..., c], view, png) for c in range(3)], -1)
                if image.ndim > ref.ndim
                else _plane(image, view, png)
            )
        else:
            shown = np.zeros(r.shape)
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=view.aspect)
        # pixel centres at integer coordinates, as imshow draws them
        xs, ys = np.arange(r.shape[1]), np.arange(r.shape[0])
        # the prediction's thin line on top of the reference's wide one: where they agree both stay visible
        for mask, colour, line in ((r, REF_COLOUR, 3.6), (p, PRED_COLOUR, 1.8)):
            if mask.any() and not mask.all():
                ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=line)
        if view.axis is not None:
            ax.set_title(f"{view.name} {'xyz'[view.axis]}={view.index}", fontsize=12)
        ax.set_axis_off()
    return _png_uri(fig)


# ------------------------------------------------------------------------------------------------ cases
def _case_file(folder: Path | None, stem: str, ending: str | None) -> Path | None:
    if folder is None:
        return None
    if ending is not None:
        path = folder / f"{stem}{ending}"
        return path if path.is_file() else None
    for path in sorted(folder.glob(f"{stem}.*")):  # no dataset.json: the first supported file of that name
        if path.is_file() and file_ending(path) and path.name[: -len(file_ending(path))] == stem:
            return path
    return None


class _CaseReader:
    """Reads a case's image and label maps once while consecutive tasks show it; keeps the last ``size``
    files only, as 3D volumes take hundreds of MB each."""

    def __init__(self, size: int = 6) -> None:
        self._cache: OrderedDict[Path, tuple[np.ndarray, Any]] = OrderedDict()
        self.size = size

    def read(self, path: Path) -> tuple[np.ndarray, Any]:
        if path in self._cache:
            self._cache.move_to_end(path)
        else:
            self._cache[path] = read_image(path)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return self._cache[path]


def _pick_cases(rows: list[dict[str, Any]], n: int) -> list[tuple[str, dict[str, Any]]]:
    """The ``n`` worst and ``n`` best rows by Dice (ties: case id), each row once; rows without a Dice (both
    masks empty) are not candidates."""
    scored = sorted((r for r in rows if r.get("dice") is not None), key=lambda r: (r["dice"], str(r["case"])))
    best = list(reversed(scored[-n:]))
    worst = [r for r in scored[:n] if all(r is not b for b in best)]
    return [("best", r) for r in best] + [("worst", r) for r in worst]


@dataclass
class _Shown:
    kind: str
    row: dict[str, Any]
    uri: str | None
    captions: list[str]
    note: str


def _render_case(ev: Evaluation, label: str, row: dict[str, Any], reader: _CaseReader) -> tuple[str | None, str]:
    """The overlay of one case and task (``None`` when it cannot be drawn) and a note on what was missing."""
    info = ev.summary.get("labels", {}).get(label, {})
    ref_values = info.get("reference_values")
    pred_values = info.get("prediction_values", ref_values)
    if not ref_values:
        return None, f"{ev.source}: no reference values recorded for '{label}'."
    case = str(row["case"])
    ref_path = _case_file(ev.ref_dir, case, ev.ending)
    if ref_path is None:
        return None, f"reference label map of {case} not found in {ev.ref_dir}."
    ending = ev.ending or file_ending(ref_path)
    ref_arr, geometry = reader.read(ref_path)
    ref = region_mask(ref_arr[0], ref_values)
    notes = []
    pred_path = _case_file(ev.pred_dir, case, ending) if ev.pred_dir is not None else None
    if pred_path is None:
        pred = np.zeros_like(ref)
        notes.append("no prediction file: drawn as empty")
    else:
        pred = region_mask(reader.read(pred_path)[0][0], pred_values)
    image = None
    image_path = next((p for d in ev.image_dirs if (p := d / f"{case}_0000{ending}").is_file()), None)
    if image_path is None:
        notes.append(f"image {case}_0000{ending} not found: contours on black")
    else:
        arr = reader.read(image_path)[0]
        if arr.shape[1:] != ref.shape:
            notes.append(f"image {image_path.name} has shape {arr.shape[1:]}, labels {ref.shape}: contours on black")
        else:
            image = _display_image(arr)
    if pred.shape != ref.shape:
        return None, f"{pred_path}: shape {pred.shape} differs from the reference {ref.shape}."
    return overlay_figure(image, ref, pred, geometry.spacing, ending == ".png"), "; ".join(notes)


# ------------------------------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9;font-size:15px;line-height:1.45}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:21px;margin:34px 0 10px;border-bottom:2px solid #d5d9e0;
padding-bottom:4px}h3{font-size:17px;margin:22px 0 8px}h4{font-size:15px;margin:14px 0 6px}
.sub{color:#5b6475;margin:0 0 14px}nav a{margin-right:16px}
table{border-collapse:collapse;background:#fff;margin:8px 0 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
th,td{border:1px solid #d5d9e0;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#e9edf3;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;
font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:nowrap}
td.dice{min-width:84px}
tr.mean td{font-weight:600;background:#f1f4f8}tbody tr:nth-child(even):not(.mean) td{background:#fafbfc}
.missing{background:#fff6e0;border:1px solid #f0c36d;padding:10px 16px;border-radius:4px}
.missing li{margin:3px 0}
figure{margin:10px 0 18px;background:#fff;padding:10px;display:inline-block;box-shadow:0 1px 2px rgba(0,0,0,.1)}
figure img{display:block;max-width:100%;height:auto}figcaption{margin-top:6px;color:#1d2330}
.legend span{display:inline-block;width:26px;height:4px;vertical-align:middle;margin:0 6px 0 14px}
.task{border-top:1px solid #d5d9e0;margin-top:18px}.note{color:#8a5a00}
.cases{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.cases figure{margin:4px 0 10px}
.cases figcaption{margin:0 0 8px}
dl.kv{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));grid-auto-flow:row dense;background:#fff;
border-top:1px solid #d5d9e0;border-left:1px solid #d5d9e0;margin:8px 0 14px}
dl.kv div{padding:4px 8px;min-width:0;border-right:1px solid #d5d9e0;border-bottom:1px solid #d5d9e0}
dl.kv div.half{grid-column:span 2}dl.kv div.wide{grid-column:1/-1}
dt{font-size:12px;color:#5b6475}dd{margin:0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:13px;overflow-wrap:anywhere}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="n" title="no value (NaN: nothing to average)">n/a</td>'
    return f'<td class="n">{float(value):.{digits}f}</td>'


def _dice_cell(value: Any) -> str:
    """A Dice cell with a bar behind the number, so a column reads at a glance."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _num(value)
    pct = max(0.0, min(100.0, 100 * float(value)))
    bar = f"background:linear-gradient(90deg,#cfe3ff {pct:.1f}%,transparent {pct:.1f}%)"
    return f'<td class="n dice" style="{bar}">{float(value):.3f}</td>'


def _table(headers: Iterable[str], rows: Iterable[str], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _metric_cells(means: dict[str, Any]) -> str:
    return _dice_cell(means.get("dice")) + _num(means.get("iou")) + _num(means.get("nsd")) + _num(means.get("hd95"), 2)


def _combined(inputs: Inputs) -> dict[str, Any]:
    """Dataset entries of every evaluation, and the overall means over all of them."""
    if not inputs.evaluations:
        return inputs.tables_only or {"datasets": {}}
    if len(inputs.evaluations) == 1:
        return inputs.evaluations[0].summary
    from mosaicseg.evaluation.report import summarise

    rows = []
    for ev in inputs.evaluations:
        if not isinstance(ev.summary.get("cases"), list):
            break
        rows += [dict(r, dataset=ev.dataset) for r in ev.summary["cases"]]
    else:
        return summarise(rows)
    datasets = {}
    for ev in inputs.evaluations:
        datasets.update(ev.summary["datasets"])
    return {"datasets": datasets}


def _metrics_section(inputs: Inputs) -> str:
    combined = _combined(inputs)
    datasets = combined.get("datasets", {})
    if not datasets:
        return "<p>No evaluation was found (see above).</p>"
    metric_heads = ["Dice", "IoU", "NSD", "HD95 (mm)"]
    rows = []
    for name, d in datasets.items():
        labels = d.get("labels", {})
        n_cases = max((e.get("n_cases", 0) for e in labels.values()), default=0)
        rows.append(
            f"<tr><td>{_e(name)}</td><td class='n'>{len(labels)}</td><td class='n'>{n_cases}</td>"
            f"{_metric_cells(d.get('mean', {}))}</tr>"
        )
    for key, title in (
        ("mean_dataset_averaged", "all datasets (dataset-averaged)"),
        ("mean_class_averaged", "all tasks (class-averaged)"),
    ):
        if isinstance(combined.get(key), dict):
            rows.append(f"<tr class='mean'><td>{_e(title)}</td><td></td><td></td>{_metric_cells(combined[key])}</tr>")
    out = [
        "<h3>Per dataset</h3>",
        "<p class='sub'>A dataset's mean is the mean over its tasks' means; NaN (both masks empty) is left out.</p>",
        _table(["dataset", "tasks", "cases", *metric_heads], rows, "per-dataset"),
    ]
    rows = []
    for name, d in datasets.items():
        for label, e in d.get("labels", {}).items():
            means = {m: (e.get(m) or {}).get("mean") for m in ("dice", "iou", "nsd", "hd95")}
            counts = "".join(
                f"<td class='n'>{int(e.get(k, 0))}</td>" for k in ("n_ref_empty", "n_pred_empty", "n_both_empty")
            )
            rows.append(
                f"<tr><td>{_e(name)}/{_e(label)}</td><td class='n'>{e.get('n_cases', 0)}</td>"
                f"{_metric_cells(means)}{counts}</tr>"
            )
    out += [
        "<h3>Per task</h3>",
        "<p class='sub'>A task is one dataset's label. Empty counts: cases whose reference, prediction or "
        "both masks are empty (reference empty or prediction empty score Dice 0, both empty NaN).</p>",
        _table(["task", "cases", *metric_heads, "ref empty", "pred empty", "both empty"], rows, "per-task"),
    ]
    return "\n".join(out)


def _fold_table(folds: list[tuple[str, list[dict[str, Any]]]]) -> str:
    rows = []
    for name, records in folds:
        if not records:
            rows.append(f"<tr><td>{_e(name)}</td><td colspan='6'>no metrics.jsonl records</td></tr>")
            continue
        last = records[-1]
        validated = [r for r in records if isinstance(r.get("val_mean"), (int, float))]
        finite = [r for r in validated if not math.isnan(r["val_mean"])]
        best = max(finite, key=lambda r: r["val_mean"]) if finite else None
        rows.append(
            f"<tr><td>{_e(name)}</td><td class='n'>{last.get('epoch', '')}</td>"
            f"<td class='n'>{last.get('iteration', '')}</td>"
            f"{_num(last.get('train_loss'), 4)}{_num(validated[-1]['val_mean'] if validated else None)}"
            + (f"<td class='n'>{best['val_mean']:.3f} @ {best.get('iteration', '?')}</td>" if best else _num(None))
            + f"{_num(last.get('elapsed_s'), 0)}</tr>"
        )
    heads = [
        "fold",
        "epochs",
        "iterations",
        "last train loss",
        "last val. Dice",
        "best val. Dice @ it",
        "train time (s)",
    ]
    return _table(heads, rows, "folds")


def _training_section(inputs: Inputs) -> str:
    if not inputs.folds:
        return "<p>No run folder was found (see above).</p>"
    from mosaicseg.training.logging import read_records

    folds = [(p.name, read_records(p / "metrics.jsonl")) for p in inputs.folds]
    out = [
        f"<p class='sub'>Run: {_e(inputs.folds[0].parent if len(inputs.folds) > 1 else inputs.folds[0])}; "
        "validation pseudo-Dice is the training loop's quick check on held-out patches, not the evaluation.</p>"
    ]
    uri = training_figure(folds)
    if uri is None:
        out.append("<p class='note'>metrics.jsonl holds no records yet (training has not finished an epoch).</p>")
    else:
        out.append(
            f'<figure><img alt="training curves" src="{uri}"><figcaption>Train loss, '
            "validation pseudo-Dice per dataset and learning rate"
            + (", one line style per fold" if len(folds) > 1 else "")
            + ".</figcaption></figure>"
        )
    out.append(_fold_table(folds))
    return "\n".join(out)


def _cases_section(inputs: Inputs, n_cases: int) -> str:
    if not inputs.evaluations:
        return "<p>No per-case evaluation was found (see above).</p>"
    legend = (
        f"<p class='legend'>Contours:<span style='background:{REF_COLOUR}'></span>reference"
        f"<span style='background:{PRED_COLOUR}'></span>prediction, on the case's first image channel "
        "(CASE_0000). 3D cases: axial, coronal and sagittal "
        "slices through the reference structure's centre of mass (the prediction's when the reference is "
        "empty).</p>"
    )
    out = [legend]
    reader = _CaseReader()
    for ev in inputs.evaluations:
        rows = ev.summary.get("cases")
        if not isinstance(rows, list):
            out.append(f"<p class='note'>{_e(ev.source)}: no per-case rows.</p>")
            continue
        by_label: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_label.setdefault(str(row.get("label")), []).append(row)
        for label, label_rows in by_label.items():
            task = f"{ev.dataset}/{label}"
            out.append(f"<div class='task'><h3 id='{_e(_anchor(task))}'>{_e(task)}</h3>")
            picked = _pick_cases(label_rows, n_cases)
            if not picked:
                out.append("<p class='note'>No case with a Dice score (every case has both masks empty).</p></div>")
                continue
            out.append("<div class='cases'>")
            for kind, row in picked:
                head = (
                    f"<b>{kind}</b>: {_e(row['case'])} — Dice {row['dice']:.3f}"
                    + (f", HD95 {row['hd95']:.2f} mm" if row.get("hd95") is not None else "")
                    + f"<br>{int(row.get('n_ref', 0))} reference / {int(row.get('n_pred', 0))} predicted voxels"
                )
                try:
                    uri, note = _render_case(ev, label, row, reader)
                except MosaicSegError as exc:
                    uri, note = None, str(exc)
                drawn = (
                    f'<img alt="{_e(task)} {kind} case {_e(row["case"])}" src="{uri}">'
                    if uri is not None
                    else "<p class='note'>Not drawn.</p>"
                )
                out.append(
                    f"<figure><figcaption>{head}</figcaption>{drawn}"
                    + (f"<p class='note'>{_e(note)}</p>" if note else "")
                    + "</figure>"
                )
            out.append("</div>")
            out.append("</div>")
    return "\n".join(out)


def _anchor(text: str) -> str:
    return "task-" + re.sub(r"[^A-Za-z0-9_-]+", "-", text)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts → dotted keys (``network_plan.features``), so a config reads as one list of settings."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _with_defaults(train: dict[str, Any]) -> dict[str, Any]:
    """``train_config`` with what an unset (null) setting meant for this run spelled out: the optimiser's default
    rate, decay and schedule, automatic precision, the plan's patch and batch (a bare ``null`` says nothing)."""
    from mosaicseg.config import TrainConfig

    shown = dict(train)
    try:
        cfg = TrainConfig.from_dict(train)
    except (MosaicSegError, TypeError, ValueError, KeyError):
        return shown  # a config of another version: shown as written
    for key, value in (("lr", cfg.resolved_lr), ("weight_decay", cfg.resolved_weight_decay),
                       ("schedule", cfg.resolved_schedule)):  # fmt: skip
        if train.get(key) is None:
            shown[key] = f"{value} ({cfg.optimizer}'s default)"
    meaning = {"amp": "auto (bf16/fp16 where native)", "patch_size": "the plan's", "batch_size": "the plan's"}
    for key, text in meaning.items():
        if key in train and train[key] is None:
            shown[key] = text
    return shown


def _kv_grid(data: dict[str, Any]) -> str:
    """Settings as a grid of ``key value`` cells: strings as they are, everything else as compact JSON (as
    the JSON files hold it); long values take a wider cell."""
    cells = []
    for key, value in _flatten(data).items():
        if isinstance(value, str):
            text = value
        elif isinstance(value, float) and math.isfinite(value):
            text = f"{value:.6g}"  # 0.3333333333333333 and timer noise would only be harder to read
        else:
            text = json.dumps(value, default=str)
        span = " class='wide'" if len(text) > 110 else (" class='half'" if len(text) + len(key) > 46 else "")
        cells.append(f"<div{span}><dt>{_e(key)}</dt><dd>{_e(text)}</dd></div>")
    return f"<dl class='kv'>{''.join(cells)}</dl>"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _model_config(fold: Path, missing: list[str]) -> tuple[Path, dict[str, Any]] | None:
    from mosaicseg.runtime import load_checkpoint

    path = next(
        (fold / f"checkpoint_{n}.pt" for n in ("final", "latest") if (fold / f"checkpoint_{n}.pt").is_file()), None
    )
    if path is None:
        missing.append(f"{fold}: no checkpoint_final.pt or checkpoint_latest.pt: no model configuration.")
        return None
    try:
        ckpt = load_checkpoint(path, require=("model_config",))
    except MosaicSegError as exc:
        missing.append(f"model configuration left out: {exc}")
        return None
    keep = {"model_config": ckpt["model_config"]}
    keep.update(
        {k: ckpt[k] for k in ("iteration", "epoch", "elapsed_s", "best", "datasets", "patch_size") if k in ckpt}
    )
    return path, keep


def _provenance_section(inputs: Inputs) -> str:
    out = []
    missing_here: list[str] = []
    for fold in inputs.folds:
        config = fold / "config.json"
        out.append(f"<h3>Run configuration: {_e(fold)}</h3>")
        data = _read_json(config, missing_here) if config.is_file() else None
        if data is None:
            out.append(f"<p class='note'>{_e(config)} not found.</p>")
        else:
            train = data.get("train_config") if isinstance(data.get("train_config"), dict) else None
            if train is not None:
                out += ["<h4>Training settings (train_config)</h4>", _kv_grid(_with_defaults(train))]
            rest = {k: v for k, v in data.items() if k != "train_config"}
            if rest:
                out += ["<h4>Run</h4>", _kv_grid(rest)]
    if inputs.folds:
        model = _model_config(inputs.folds[0], missing_here)
        if model is not None:
            out += [f"<h3>Model (from {_e(model[0])})</h3>", _kv_grid(model[1])]
    for path, record in inputs.predict_records:
        out.append(f"<h3>Prediction record: {_e(path)}</h3>")
        cases = record.get("cases") if isinstance(record.get("cases"), list) else []
        shown = {k: v for k, v in record.items() if k not in ("cases", "skipped")}
        shown["predicted cases"] = len(cases)
        shown["skipped (existing outputs kept)"] = len(record.get("skipped") or [])
        stages = ("seconds", "read_s", "preprocess_s", "network_s", "export_s")
        for k in stages:
            values = [c[k] for c in cases if isinstance(c, dict) and isinstance(c.get(k), (int, float))]
            if values:
                shown[f"mean {k}"] = f"{sum(values) / len(values):.3f}"
        out.append(_kv_grid(shown))
    for ev in inputs.evaluations:
        settings = {k: v for k, v in ev.summary.items() if k not in ("cases", "datasets") and not k.startswith("mean_")}
        settings["images read from"] = [str(d) for d in ev.image_dirs] or "not found"
        out += [f"<h3>Evaluation: {_e(ev.source)}</h3>", _kv_grid(settings)]
    out += ["<h3>Software that wrote this report</h3>", _kv_grid(_versions())]
    inputs.missing += missing_here
    return "\n".join(out)


def build_html(inputs: Inputs, n_cases: int = 1) -> str:
    """The whole page for ``inputs`` (:func:`find_inputs`), showing the ``n_cases`` best and worst cases per task."""
    sections = [
        ("metrics", "Metrics", _metrics_section(inputs)),
        ("training", "Training", _training_section(inputs)),
        ("cases", "Best and worst cases per task", _cases_section(inputs, n_cases)),
        ("provenance", "Configuration and provenance", _provenance_section(inputs)),
    ]
    # the provenance pass may add notes, so the list of what was not found is written last
    missing = "".join(f"<li>{_e(m)}</li>" for m in inputs.missing)
    missing_html = (
        f"<section id='missing' class='missing'><strong>Not found or left out</strong><ul>{missing}</ul></section>"
        if missing
        else "<p class='sub'>Everything a report can show was found.</p>"
    )
    nav = "".join(f"<a href='#{key}'>{_e(title)}</a>" for key, title, _ in sections)
    body = "".join(f"<section id='{key}'><h2>{_e(title)}</h2>{content}</section>" for key, title, content in sections)
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = f"MosaicSeg report: {inputs.root.resolve().name}"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><p class='sub'>{_e(inputs.root.resolve())} — written {_e(stamp)}</p>"
        f"<nav>{nav}</nav>{missing_html}{body}</main></body></html>\n"
    )


def render_report(
    folder: str | Path,
    output: str | Path | None = None,
    *,
    pred: str | Path | None = None,
    gt: str | Path | None = None,
    images: str | Path | None = None,
    dataset_json: str | Path | None = None,
    n_cases: int = 1,
    overwrite: bool = False,
) -> tuple[Path, Inputs]:
    """Write the HTML report of ``folder`` to ``output`` (default ``folder/report.html``) atomically; returns
    the path and what was found. Refuses an existing ``output`` unless ``overwrite``."""
    out = Path(output) if output is not None else Path(folder) / REPORT_NAME
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or n_cases < 1:
        raise MosaicSegError(f"--cases {n_cases!r}: must be a positive integer. Fix: pass e.g. --cases 1.")
    if out.is_dir():
        raise MosaicSegError(f"{out}: is a folder. Fix: pass the HTML file to write, e.g. -o {out / REPORT_NAME}.")
    if out.exists() and not overwrite:
        raise MosaicSegError(f"{out}: exists already. Fix: pass --overwrite or choose another output (-o).")
    inputs = find_inputs(folder, pred=pred, gt=gt, images=images, dataset_json=dataset_json)
    text = build_html(inputs, n_cases)
    atomic_write(out, lambda f: f.write(text.encode("utf-8")))
    return out, inputs
