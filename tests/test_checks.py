"""``mosaicseg check``: every check fires on a crafted bad dataset and names the offending file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from mosaicseg.data.checks import CheckReport, check_collection, looks_like_hu, render_report
from mosaicseg.errors import Problem

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # CI clones the repo at d/p next to d/shared
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


def found(report: CheckReport, code: str, severity: str | None = None) -> list[Problem]:
    return [p for p in report.problems if p.code == code and (severity is None or p.severity == severity)]


def fires(report: CheckReport, code: str, path: Path, severity: str = "error") -> Problem:
    """The problem ``code`` was reported for ``path`` (the message or the path names the file)."""
    hits = [p for p in found(report, code, severity) if str(path) in str(p.path) or path.name in p.message]
    assert hits, f"no {severity} {code} for {path}; got {[p.format() for p in report.problems]}"
    return hits[0]


def write_collection(tmp_path: Path, datasets: list[dict], **extra) -> Path:
    path = tmp_path / "collection.yaml"
    path.write_text(yaml.safe_dump({"name": "test", "folds": 2, "datasets": datasets, **extra}))
    return path


def test_clean_dataset_has_no_problems(make_dataset):
    folder = make_dataset(cases=2)
    report = check_collection(folder, folds=2)
    assert report.ok
    assert [p for p in report.problems if p.severity != "info"] == []
    (summary,) = report.datasets
    assert (summary.dim, summary.n_cases, summary.n_patients, summary.modality) == (3, 2, 2, "CT")
    assert summary.channels == ("CT",) and summary.labels == ("Organ",) and summary.folds_ok
    assert report.vocabulary is not None and report.vocabulary.num_tasks == 1
    assert render_report(report).splitlines()[-1] == "0 error(s), 0 warning(s)"


def test_unreadable_truncated_and_fake_files(make_dataset):
    folder = make_dataset(cases=3)
    truncated = folder / "imagesTr" / "case0_0000.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:200])
    fake = folder / "labelsTr" / "case1.nii.gz"
    fake.write_text("this is not an image\n")
    report = check_collection(folder, folds=2)
    fires(report, "unreadable", truncated)
    fires(report, "unreadable", fake)
    assert not report.ok
    assert len(found(report, "unreadable")) == 2  # each problem once; the rest of the cases still checked


def test_truncated_plain_nifti_and_nrrd(make_dataset):
    # ITK reads a truncated NIfTI without complaint (the rest is zeros): check must notice
    folder = make_dataset(cases=2, ending=".nii")
    truncated = folder / "imagesTr" / "case1_0000.nii"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    assert "truncated" in fires(check_collection(folder, folds=2), "unreadable", truncated).message
    nrrd = make_dataset("Dataset002_Nrrd", cases=2, ending=".nrrd")
    broken = nrrd / "labelsTr" / "case0.nrrd"
    broken.write_bytes(broken.read_bytes()[:-10])
    fires(check_collection(nrrd, folds=2), "unreadable", broken)


def test_shape_and_geometry_mismatch(make_dataset):
    folder = make_dataset(cases=3, channels=("T1", "T2"))
    other_shape = make_dataset.write(folder / "labelsTr" / "case0.nii.gz", np.zeros((6, 8, 8), np.uint8))
    other_spacing = make_dataset.write(
        folder / "labelsTr" / "case1.nii.gz", make_dataset.default_label((8, 8, 8)), spacing=(1, 1, 2)
    )
    other_channel = make_dataset.write(
        folder / "imagesTr" / "case2_0001.nii.gz", np.ones((8, 8, 8), np.float32), origin=(5, 0, 0)
    )
    report = check_collection(folder, folds=2)
    assert "(8, 8, 6)" in fires(report, "shape-mismatch", other_shape).message
    assert "spacing" in fires(report, "geometry-mismatch", other_spacing).message
    assert "origin" in fires(report, "geometry-mismatch", other_channel).message


def test_label_values(make_dataset):
    undeclared = make_dataset.default_label((8, 8, 8))
    undeclared[0, 0, 0] = 5
    fractional = make_dataset.default_label((8, 8, 8)).astype(np.float32)
    fractional[0, 0, 0] = 0.5
    folder = make_dataset(
        cases=3, label_maps={"case0": undeclared, "case1": fractional, "case2": np.zeros((8, 8, 8), np.uint8)}
    )
    report = check_collection(folder, folds=2)
    p = fires(report, "undeclared-label", folder / "labelsTr" / "case0.nii.gz")
    assert "[5]" in p.message and "case0" in p.message
    assert "0.5" in fires(report, "label-not-integer", folder / "labelsTr" / "case1.nii.gz").message
    fires(report, "empty-label", folder / "labelsTr" / "case2.nii.gz", "warning")
    assert not found(report, "empty-label", "error")


def test_nan_label_is_not_integer_even_though_itk_reads_it_as_zero(make_dataset):
    nan = make_dataset.default_label((8, 8, 8)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    folder = make_dataset(cases=2, label_maps={"case0": nan})
    p = fires(check_collection(folder, folds=2), "label-not-integer", folder / "labelsTr" / "case0.nii.gz")
    assert "NaN" in p.message


def test_ignore_label_is_declared_and_not_foreground(make_dataset):
    only_ignore = np.zeros((8, 8, 8), np.uint8)
    only_ignore[0] = 2
    folder = make_dataset(cases=2, labels={"background": 0, "Organ": 1, "ignore": 2}, label_maps={"case0": only_ignore})
    report = check_collection(folder, folds=2)
    assert not found(report, "undeclared-label")
    fires(report, "empty-label", folder / "labelsTr" / "case0.nii.gz", "warning")


def test_intensity_checks(make_dataset):
    nan = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    nan[1, 2, 3] = np.nan
    nan[2, 2, 2] = np.inf
    folder = make_dataset(
        cases=3,
        channels=("T1",),
        images={"case0": [nan], "case1": [np.zeros((8, 8, 8), np.float32)], "case2": [np.full((8, 8, 8), 7, np.int16)]},
    )
    report = check_collection(folder, folds=2)
    assert "2 of 512" in fires(report, "nonfinite", folder / "imagesTr" / "case0_0000.nii.gz").message
    fires(report, "constant-image", folder / "imagesTr" / "case1_0000.nii.gz", "error")
    assert "7" in fires(report, "constant-image", folder / "imagesTr" / "case2_0000.nii.gz", "warning").message


def test_nonfinite_outside_nifti(make_dataset):
    nan = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    folder = make_dataset(cases=2, channels=("T1",), ending=".mha", images={"case0": [nan]})
    fires(check_collection(folder, folds=2), "nonfinite", folder / "imagesTr" / "case0_0000.mha")


def test_wrong_ndim_and_mixed_dim(make_dataset):
    folder = make_dataset(cases=4, channels=("T1",))
    four_d = make_dataset.write(folder / "imagesTr" / "case0_0000.nii.gz", np.ones((2, 8, 8, 8), np.float32))
    # a NIfTI with one slice is 2D: a 2D case in a 3D dataset
    single = make_dataset.write(
        folder / "imagesTr" / "case1_0000.nii.gz", np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    )
    make_dataset.write(folder / "labelsTr" / "case1.nii.gz", make_dataset.default_label((1, 8, 8)))
    report = check_collection(folder, folds=2)
    assert "4 dimensions" in fires(report, "wrong-ndim", four_d).message
    assert not any(p.path == four_d for p in found(report, "unreadable"))
    p = fires(report, "mixed-dim", single)
    assert "case1" in p.message and "2D" in p.message
    assert report.datasets[0].dim == 3


def test_collection_mixing_2d_and_3d(make_dataset, tmp_path):
    make_dataset("Dataset001_Vol", cases=2)
    make_dataset("Dataset002_Png", cases=2, channels=("R", "G", "B"), ending=".png", shape=(8, 8))
    report = check_collection(write_collection(tmp_path, ["Dataset001_Vol", "Dataset002_Png"]))
    (p,) = found(report, "collection-mixed-dim")
    assert "Dataset001_Vol (3D)" in p.message and "Dataset002_Png (2D)" in p.message
    assert [s.dim for s in report.datasets] == [3, 2]


def test_channel_count(make_dataset, tmp_path):
    gray = make_dataset(
        "Dataset001_Gray",
        cases=2,
        channels=("R", "G", "B"),
        ending=".png",
        shape=(8, 8),
        images={"case0": [np.arange(64, dtype=np.uint8).reshape(8, 8)]},
    )
    report = check_collection(gray, folds=2)
    p = fires(report, "channel-count", gray / "imagesTr" / "case0_0000.png")
    assert "grayscale" in p.message and "3" in p.message
    assert len(found(report, "channel-count")) == 1  # case1 is RGB as declared
    rgb = make_dataset(
        "Dataset002_Rgb",
        cases=2,
        channels=("CT",),
        ending=".png",
        shape=(8, 8),
        images={"case0": [np.zeros((8, 8, 3), np.uint8) + np.arange(8, dtype=np.uint8)[:, None]]},
    )
    fires(check_collection(rgb, folds=2), "channel-count", rgb / "imagesTr" / "case0_0000.png")


def test_num_training_and_structural_problems_are_included(make_dataset):
    folder = make_dataset(cases=2, dataset_json={"numTraining": 5})
    (folder / "labelsTr" / "case1.nii.gz").unlink()
    report = check_collection(folder, folds=2)
    assert "numTraining is 5" in found(report, "num-training")[0].message
    fires(report, "missing-label", folder / "labelsTr" / "case1.nii.gz")


def test_path_escape(make_dataset, tmp_path):
    outside = make_dataset.write(
        tmp_path / "elsewhere" / "img.nii.gz", np.ones((8, 8, 8), np.float32) * 3 + np.arange(8, dtype=np.float32)
    )
    folder = make_dataset(cases=2, channels=("T1",))
    link = folder / "imagesTr" / "case0_0000.nii.gz"
    link.unlink()
    os.symlink(outside, link)
    report = check_collection(folder, folds=2)
    assert "outside the dataset folder" in fires(report, "path-escape", link, "warning").message
    assert report.ok  # a link is suspicious, not wrong

    listing = {"case0": {"images": ["../elsewhere/img.nii.gz"], "label": "labelsTr/case0.nii.gz"}}
    explicit = make_dataset("Dataset002_Explicit", cases=1, dataset_json={"numTraining": 1, "dataset": listing})
    report = check_collection(explicit, folds=2)
    assert "img.nii.gz" in fires(report, "path-escape", explicit / "dataset.json").message


def test_not_hu(make_dataset, tmp_path):
    rng = np.random.default_rng(0)
    zscored = {f"case{i}": [rng.normal(size=(8, 8, 8)).astype(np.float32)] for i in range(2)}
    norm = make_dataset("Dataset001_Norm", cases=2, images=zscored)
    p = fires(check_collection(norm, folds=2), "not-hu", norm / "dataset.json", "warning")
    assert "HU windowing would destroy it" in p.message and "case0_0000.nii.gz" in p.message
    hu = make_dataset("Dataset002_Hu", cases=2)
    assert not found(check_collection(hu, folds=2), "not-hu")
    # MR channels are never HU; only CT channels are judged
    assert not found(
        check_collection(make_dataset("Dataset003_Mr", cases=2, channels=("T1",), images=zscored), folds=2), "not-hu"
    )


@pytest.mark.parametrize(
    ("lo", "hi", "hu"),
    [
        (-1019, 949, True),  # body CT
        (-3024, 1500, True),  # padded scan
        (-120, 250, True),  # soft-tissue crop with fat
        (-0.2, 3.1, False),  # z-scored
        (0, 1, False),  # min-max scaled
        (0, 255, False),  # windowed 8-bit
        (24, 2100, False),  # HU stored with a +1024 offset
        (-1000, 30000, False),  # not plausible
    ],
)
def test_looks_like_hu(lo, hi, hu):
    assert looks_like_hu(lo, hi) is hu


def test_patient_grouping(make_dataset, tmp_path):
    ids = [f"patient{p}_frame{f:02d}" for p in range(3) for f in (1, 12)]
    folder = make_dataset("Dataset001_Cine", cases=ids, channels=("cineMRI",))
    report = check_collection(folder, folds=2)
    p = fires(report, "patient-grouping", folder, "warning")
    assert "patient0" in p.message and "patient_regex" in p.fix
    regex = r"^(?P<patient>patient\d+)_frame\d+$"
    report = check_collection(write_collection(tmp_path, [{"path": "Dataset001_Cine", "patient_regex": regex}]))
    assert not found(report, "patient-grouping")
    assert found(report, "patient-grouping-ok", "info")[0].message == "6 cases of 3 patients grouped by patient_regex"
    assert report.datasets[0].grouping == "6 cases of 3 patients (patient_regex)"
    assert report.datasets[0].n_patients == 3
    report = check_collection(write_collection(tmp_path, [{"path": "Dataset001_Cine", "patient_regex": "^(pat)_x"}]))
    assert "matches none" in found(report, "patient-grouping", "warning")[0].message


def test_too_few_for_folds(make_dataset):
    folder = make_dataset(cases=2)
    report = check_collection(folder)  # a dataset folder gets the default 5 folds
    p = fires(report, "too-few-for-folds", folder, "warning")
    assert "only trained on, never validated" in p.message
    assert not report.datasets[0].folds_ok
    assert not found(check_collection(folder, folds=2), "too-few-for-folds")


def test_modality_channels_and_shared_labels(make_dataset, tmp_path):
    make_dataset("Dataset001_One", cases=2, channels=("T1",))
    make_dataset("Dataset002_Two", cases=2, channels=("T1", "T2"))
    path = write_collection(
        tmp_path,
        [{"path": "Dataset001_One", "modality": "MR"}, {"path": "Dataset002_Two", "modality": "MR"}],
        shared_labels=[["Dataset001_One/Organ", "Dataset002_Two/Liver"]],
    )
    report = check_collection(path)
    p = fires(report, "modality-channels", path)
    assert "Dataset001_One" in p.message and "Dataset002_Two" in p.message
    assert "Dataset002_Two/Liver" in fires(report, "shared-labels", path).message
    assert report.vocabulary is not None  # still built, without the bad declaration


def test_spacing_and_size_hints(make_dataset):
    thick = make_dataset("Dataset001_Thick", cases=2, channels=("T1",), shape=(4, 8, 8), spacing=(1, 1, 5))
    report = check_collection(thick, folds=2)
    assert found(report, "anisotropic-spacing", "info")
    assert not found(report, "small-image")  # a few thick slices are normal (cine MRI)
    flat = make_dataset("Dataset002_Flat", cases=2, channels=("T1",), shape=(4, 8, 8))
    fires(check_collection(flat, folds=2), "small-image", flat / "imagesTr" / "case0_0000.nii.gz", "warning")


def test_bad_collection_file_is_a_report_not_a_crash(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("datasets: [{path: X, colour: red}]\nfolds: 1\n")
    report = check_collection(path)
    assert not report.ok and report.vocabulary is None
    assert {p.code for p in report.problems} == {"collection"}
    assert render_report(report).endswith("2 error(s), 0 warning(s)")
    missing = check_collection(tmp_path / "nope.yaml")
    assert "not found" in missing.problems[0].message


def test_render_report_groups_and_counts(make_dataset):
    maps = {}
    for i in range(5):
        maps[f"case{i}"] = make_dataset.default_label((8, 8, 8))
        maps[f"case{i}"][0, 0, 0] = 9
    folder = make_dataset(cases=5, label_maps=maps)
    report = check_collection(folder, folds=2)
    text = render_report(report, max_per_code=2)
    assert "Dataset001_Tiny" in text and "1 tasks" in text and "(CT)" in text
    assert "[error] undeclared-label (5)" in text
    assert text.count("contains label value(s) [9]") == 2
    assert "... and 3 more like this" in text
    assert text.splitlines()[-1] == "5 error(s), 0 warning(s)"
    assert re.search(r"Dataset001_Tiny\s+3D\s+5\s+5\s+CT", text)


def test_workers_give_the_same_report(make_dataset):
    folder = make_dataset(cases=4, dataset_json={"numTraining": 4})
    (folder / "imagesTr" / "case3_0000.nii.gz").write_text("garbage")
    one = check_collection(folder, folds=2, workers=1)
    two = check_collection(folder, folds=2, workers=2, progress=True)
    assert one.problems == two.problems and one.datasets == two.datasets


# ------------------------------------------------------------------------------------------- real data


@needs_shared
@pytest.mark.slow
def test_real_3d_collection():
    report = check_collection(REPO / "collections" / "shared3d.yaml", workers=2)
    assert report.ok, render_report(report)
    assert report.vocabulary is not None and report.vocabulary.num_tasks == 28
    assert report.vocabulary.modalities == ("T1", "FLAIR+T1c", "CT", "cineMRI", "LGE")
    assert [p.path.name for p in found(report, "too-few-for-folds")] == ["Dataset006_SpleenCTCrop"]
    assert not found(report, "not-hu")  # Dataset006 is real HU
    acdc = next(s for s in report.datasets if s.name == "Dataset007_ACDC")
    assert (acdc.n_cases, acdc.n_patients) == (100, 50)
    assert "100 cases of 50 patients" in acdc.grouping
    text = render_report(report)
    assert "28 tasks" in text and "T1, FLAIR+T1c, CT, cineMRI, LGE" in text


@needs_shared
def test_real_2d_collection():
    report = check_collection(REPO / "collections" / "shared2d.yaml")
    assert report.ok, render_report(report)
    assert report.vocabulary is not None and report.vocabulary.num_tasks == 3
    # DRIVE and PH2 are both R,G,B photographs; the collection names their modalities apart
    assert report.vocabulary.modalities == ("fundus", "dermoscopy", "CT")
    (p,) = found(report, "not-hu")
    assert "Dataset012_LIDCNoduleSlices" in str(p.path)
    assert {s.dim for s in report.datasets} == {2}
    text = render_report(report)
    assert "3 tasks" in text and "fundus, dermoscopy, CT" in text


def test_lateral_labels_are_reported(make_dataset, tmp_path):
    shape = (8, 8, 8)
    label = np.zeros(shape, dtype=np.uint8)
    label[1:3, 2:6, 2:6], label[5:7, 2:6, 2:6] = 1, 2
    maps = {"case0": label, "case1": label}
    paired = make_dataset("Dataset001_Pair", labels={"background": 0, "Caudate_R": 1, "Caudate_L": 2}, label_maps=maps)
    report = check_collection(paired, folds=2)
    (hit,) = found(report, "lateral-pairs", "info")
    assert "Caudate_R/Caudate_L" in hit.message and not found(report, "lateral-unpaired")
    single = make_dataset("Dataset002_Single", labels={"background": 0, "kidney_left": 1, "Liver": 2}, label_maps=maps)
    report = check_collection(single, folds=2)
    fires(report, "lateral-unpaired", single / "dataset.json", "warning")
