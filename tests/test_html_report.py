"""``mosaicseg report``: the self-contained HTML page (tables, curves, overlays, provenance), its DOM, and how
headless Chromium draws it."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mosaicseg.cli import app
from mosaicseg.config import TrainConfig
from mosaicseg.evaluation.html import PRED_COLOUR, REF_COLOUR, _centre_views, _plane, render_report
from mosaicseg.evaluation.report import evaluate_folders

CT = "Dataset912_SynthCT"


class _Page(HTMLParser):
    """Tables (rows of cell texts), ``<img>`` sources and tags of a page, as a browser's parser sees them."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")
        for key in ("href", "src"):
            if a.get(key) and not a[key].startswith(("#", "data:")):
                self.links.append(a[key])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def column(self, header: str) -> list[str]:
        """The cells under ``header`` in every table that has it."""
        out = []
        for table in self.tables:
            if table and header in table[0]:
                i = table[0].index(header)
                out += [row[i] for row in table[1:] if len(row) > i]
        return out


def _png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    data = base64.b64decode(uri.split(",", 1)[1], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()  # a truncated or corrupt PNG fails here
    return image.convert("RGB")


def _has_colour(image: Image.Image, hex_colour: str, tol: int = 40) -> int:
    """Pixels within ``tol`` of ``hex_colour`` (a contour line drawn in it)."""
    rgb = np.asarray(image, dtype=np.int16)
    want = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).max(axis=-1) <= tol).sum())


# --------------------------------------------------------------------------------------- slicing
def test_views_go_through_the_centre_of_mass_and_planes_are_drawn_the_radiological_way():
    mask = np.zeros((9, 12, 6), bool)
    mask[2:5, 5:10, 1:4] = True  # centre (3, 7, 2)
    views = {v.name: (v.axis, v.index, v.aspect) for v in _centre_views(mask, (1.0, 2.0, 4.0))}
    assert views == {"axial": (2, 2, 2.0), "coronal": (1, 7, 4.0), "sagittal": (0, 3, 2.0)}
    # two blobs: the centre slice z=4 holds no voxel, so the fullest slice (first of equals) is shown
    blobs = np.zeros((4, 4, 9), bool)
    blobs[1:3, 1:3, [0, 8]] = True
    axial = _centre_views(blobs, (1, 1, 1))[0]
    assert (axial.name, axial.index) == ("axial", 0)
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # (X, Y, Z); centre (0.5, 1, 1.5) rounds to (1, 1, 2)
    axial, coronal, sagittal = _centre_views(np.ones_like(arr, bool), (1, 1, 1))
    np.testing.assert_array_equal(_plane(arr, axial, False), arr[:, :, 2].T)  # rows Y, columns X
    top = _plane(arr, coronal, False)
    assert top.shape == (4, 2) and top[0, 0] == arr[0, 1, 3]  # rows Z, superior (last Z) on top
    assert _plane(arr, sagittal, False)[0, 0] == arr[1, 0, 3]


# --------------------------------------------------------------------------------------- 3D prediction folder
def test_report_of_a_3d_prediction_folder_shows_best_and_worst_case_in_three_views(make_dataset, tmp_path):
    ref = np.zeros((10, 12, 14), np.uint8)  # numpy (Z, Y, X)
    ref[3:7, 4:9, 5:10] = 1
    shifted = np.zeros_like(ref)
    shifted[3:7, 4:9, 7:12] = 1
    labels = {"case0": ref, "case1": ref}
    folder = make_dataset("Dataset005_Cube", 2, shape=ref.shape, spacing=(1.0, 1.0, 2.5), label_maps=labels)
    pred = tmp_path / "pred"
    for case, arr in (("case0", ref), ("case1", shifted)):
        make_dataset.write(pred / f"{case}.nii.gz", arr, (1.0, 1.0, 2.5))
    summary = evaluate_folders(pred, folder / "labelsTr", folder, progress=False)
    assert [r["dice"] for r in summary["cases"]] == [1.0, 0.6]

    out, found = render_report(pred)
    assert out == pred / "report.html" and not found.folds
    page = _Page(out.read_text(encoding="utf-8"))
    assert "Dataset005_Cube/Organ" in page.column("task")
    assert page.column("Dice")[0] == "0.800"  # the dataset mean of 1.0 and 0.6
    figures = [_png(src) for src in page.images]
    assert len(figures) == 2  # best (case0) and worst (case1); no training curves without a run
    for figure in figures:
        # axial, coronal and sagittal side by side, 3.6 inches (360 px) high plus the titles, each as wide as
        # its plane's extent in mm: 14 x 12 mm, 14 x 25 mm, 12 x 25 mm, with two 0.12-inch gaps
        assert figure.height == 400 and abs(figure.width - 100 * (3.6 * (14 / 12 + 14 / 25 + 12 / 25) + 0.24)) < 2
        assert _has_colour(figure, REF_COLOUR) > 50 and _has_colour(figure, PRED_COLOUR) > 50
    text = out.read_text(encoding="utf-8")
    assert text.index("<b>best</b>: case0 — Dice 1.000") < text.index("<b>worst</b>: case1 — Dice 0.600")
    assert "no run folder" in text and "predict.json" in text  # what it did not find is said
    # nothing to report is a user error; an existing report is kept without overwrite
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "nothing to report" in result.output
    result = runner.invoke(app, ["report", str(pred)])
    assert result.exit_code == 2 and "exists already" in result.output and "--overwrite" in result.output


def test_evaluations_per_dataset_combine_like_the_demo_folder_and_png_cases_are_drawn_in_colour(make_dataset, tmp_path):
    cube = np.zeros((6, 8, 8), np.uint8)
    cube[2:4, 2:6, 2:6] = 1
    nifti = make_dataset("Dataset005_Cube", 1, shape=cube.shape, label_maps={"case0": cube})
    png = make_dataset("Dataset006_Derm", 1, channels=("R", "G", "B"), ending=".png", shape=(16, 16))
    root = tmp_path / "demo"
    # Cube: empty prediction (Dice 0); Derm: the reference itself (Dice 1)
    make_dataset.write(root / "predictions" / nifti.name / "case0.nii.gz", np.zeros_like(cube))
    (root / "predictions" / png.name).mkdir(parents=True)
    shutil.copy(png / "labelsTr" / "case0.png", root / "predictions" / png.name / "case0.png")
    for folder in (nifti, png):
        evaluate_folders(
            root / "predictions" / folder.name,
            folder / "labelsTr",
            folder,
            output_dir=root / "evaluation" / folder.name,
        )
    out, found = render_report(root)
    assert sorted(ev.dataset for ev in found.evaluations) == ["Dataset005_Cube", "Dataset006_Derm"]
    page = _Page(out.read_text(encoding="utf-8"))
    dataset_table = next(t for t in page.tables if t[0][0] == "dataset")
    means = {row[0]: row[3] for row in dataset_table[1:]}
    assert means == {
        "Dataset005_Cube": "0.000",
        "Dataset006_Derm": "1.000",
        "all datasets (dataset-averaged)": "0.500",
        "all tasks (class-averaged)": "0.500",
    }
    cube_figure, derm_figure = (_png(src) for src in page.images)
    assert _has_colour(cube_figure, REF_COLOUR) > 50 and _has_colour(cube_figure, PRED_COLOUR) == 0
    rgb = np.asarray(derm_figure, dtype=np.int16)
    assert np.abs(rgb[..., 0] - rgb[..., 1]).max() > 100  # the RGB image, not a grey rendering of it


# --------------------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def run_and_predictions(tiny_workdir_2d, tmp_path_factory) -> dict[str, Path]:
    """A 2-iteration universal run, its predictions of the synthetic CT (predict CLI: predict.json) and their
    evaluation (evaluate CLI: summary.json in the prediction folder)."""
    from mosaicseg.training.loop import Trainer

    root = tmp_path_factory.mktemp("report")
    # two epochs (two points per curve), validated once at the end
    cfg = TrainConfig(
        recipe="universal", iterations=2, iterations_per_epoch=1, val_every=2, device="cpu", val_max_cases=1
    )
    Trainer(tiny_workdir_2d, cfg, root / "run" / "fold_0", progress=False).fit()
    data = tiny_workdir_2d.parent / "data" / CT
    pred = root / "pred"
    runner = CliRunner()
    model = ["-m", str(root / "run"), "--no-jit"]  # eager: tracing would only slow a 4-case prediction
    for args in (
        ["predict", *model, "-i", str(data / "imagesTr"), "-o", str(pred), "--dataset", CT],
        ["evaluate", str(pred), str(data / "labelsTr"), "--dataset-json", str(data / "dataset.json"), "-o", str(pred)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return {"run": root / "run", "pred": pred, "data": data, "root": root}


@pytest.fixture(scope="module")
def report_of_predictions(run_and_predictions) -> Path:
    pred = run_and_predictions["pred"]
    out = run_and_predictions["root"] / "report.html"
    result = CliRunner().invoke(app, ["report", str(pred), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_report_of_a_prediction_folder_finds_the_run_through_predict_json(run_and_predictions, report_of_predictions):
    text = report_of_predictions.read_text(encoding="utf-8")
    page = _Page(text)
    assert {f"{CT}/Liver", f"{CT}/Tumor"} <= set(page.column("task"))
    assert CT in page.column("dataset")
    summary = json.loads((run_and_predictions["pred"] / "summary.json").read_text())
    assert page.column("Dice")[0] == f"{summary['datasets'][CT]['mean']['dice']:.3f}"
    # the curves of the run that predict.json names, and one overlay per best/worst case of each task
    assert page.column("fold") == ["fold_0"] and page.column("iterations") == ["2"]
    images = [_png(src) for src in page.images]
    assert len(images) >= 3 and all(i.width >= 300 and i.height >= 300 for i in images)
    assert page.images[0] in text[text.index("id='training'") : text.index("id='cases'")]
    # provenance: train config, model config from the checkpoint, predict.json, evaluation settings
    provenance = text[text.index("id='provenance'") :]
    for needle in ("Training settings", "universal", "model_config", "predict.json", "nsd_tolerance_mm", "torch"):
        assert needle in provenance, needle
    # an unset setting says what it meant for the run (the default optimiser's rate), not a bare null
    assert "0.003 (adamw&#x27;s default)" in provenance and "poly (adamw&#x27;s default)" in provenance
    # self-contained: no script, style sheet link, frame or reference outside the page
    assert not page.links and not {"script", "link", "iframe"} & page.tags


def test_report_of_a_run_alone_and_of_unscored_predictions(run_and_predictions):
    run, pred, data = run_and_predictions["run"], run_and_predictions["pred"], run_and_predictions["data"]
    root = run_and_predictions["root"]
    out, found = render_report(run, root / "run_only.html")
    page = _Page(out.read_text(encoding="utf-8"))
    assert [p.name for p in found.folds] == ["fold_0"] and not page.column("task")
    assert len(page.images) == 1 and "no summary.json" in out.read_text(encoding="utf-8")
    # predictions without summary.json are scored for the page when the references are given
    bare = root / "bare"
    shutil.copytree(pred, bare, ignore=shutil.ignore_patterns("summary.json", "metrics.csv", "*.html"))
    out, found = render_report(
        run, root / "scored.html", pred=bare, gt=data / "labelsTr", dataset_json=data / "dataset.json"
    )
    assert not (bare / "summary.json").exists() and found.evaluations[0].dataset == CT
    page = _Page(out.read_text(encoding="utf-8"))
    assert f"{CT}/Tumor" in page.column("task") and len(page.images) >= 3
    # the prediction folder itself as the argument; without the dataset.json the page has no metrics (it still
    # finds the run through predict.json) and says what to pass
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(bare), "--gt", str(data / "labelsTr"), "-o", str(root / "part.html")])
    assert result.exit_code == 0 and "pass both --gt and --dataset-json" in result.output
    assert not _Page((root / "part.html").read_text(encoding="utf-8")).column("task")
    args = ["report", str(bare), "--gt", str(data / "labelsTr"), "--dataset-json", str(data / "dataset.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "scored for this report, not saved" in (bare / "report.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------- headless Chromium
def _chromium() -> str | None:
    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome", "chrome") if (p := shutil.which(n))), None
    )


@pytest.mark.skipif(
    _chromium() is None, reason="chromium not found on PATH (install: apt-get install chromium; .ci/run does)"
)
def test_chromium_draws_the_report_with_its_tables(report_of_predictions, tmp_path):
    browser = _chromium()
    url = report_of_predictions.resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,2000", url], check=True, capture_output=True, timeout=180
    )
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = np.unique(np.asarray(image).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # text, tables and plots, not a blank or single-colour page
    dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180).stdout
    page = _Page(dom)
    assert {f"{CT}/Liver", f"{CT}/Tumor"} <= set(page.column("task"))
    assert all(_png(src).width > 0 for src in page.images)
