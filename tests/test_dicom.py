"""DICOM series inputs of predict: one series per folder, its geometry kept, and DICOM-SEG outputs."""

from __future__ import annotations

import locale
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from mosaicseg.data.io import dicom_series_files, read_dicom_series, read_image
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.predictor import group_inputs

CT = "Dataset901_SynthCT"
STUDY = "1.2.826.0.1.3680043.8.498.1"


def write_series(image: sitk.Image, folder: Path, uid: str, description: str, prefix: str = "IM") -> list[Path]:
    """Write a 3D int16 ``image`` as a DICOM series, one file per slice, with the tags a scanner writes for
    position and orientation (SimpleITK's own series-writing recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    tags = {
        "0008|0060": "CT",
        "0008|103e": description,
        "0020|000d": STUDY,
        "0020|000e": uid,
        "0020|0052": STUDY + ".9",  # frame of reference: required by DICOM-SEG
        "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": str(image.GetSpacing()[2]),
    }
    files = []
    saved = locale.setlocale(locale.LC_ALL)
    try:
        for z in range(image.GetDepth()):
            piece = image[:, :, z]
            for key, value in tags.items():
                piece.SetMetaData(key, value)
            position = image.TransformIndexToPhysicalPoint((0, 0, z))
            piece.SetMetaData("0020|0032", "\\".join(str(v) for v in position))
            piece.SetMetaData("0020|0013", str(z + 1))
            piece.SetMetaData("0008|0018", f"{uid}.{z + 1}")
            # reversed file names: the reader must order slices by position, not by name
            files.append(folder / f"{prefix}{image.GetDepth() - z:04d}.dcm")
            writer.SetFileName(str(files[-1]))
            writer.Execute(piece)
    finally:
        # GDCM's writer sets the process locale to "C" (Python's default text encoding becomes ASCII)
        locale.setlocale(locale.LC_ALL, saved)
    return files


def oblique(array: np.ndarray) -> sitk.Image:
    """``array`` ``(Z, Y, X)`` as an int16 image with a non-trivial origin, anisotropic spacing and a rotated
    (right-handed) direction, so the slice normal is the third axis as DICOM series readers compute it."""
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-101.5, 20.25, 33.0))
    image.SetDirection(Rotation.from_euler("xyz", [0.3, -0.2, 0.5]).as_matrix().ravel().tolist())
    return image


def test_a_series_is_read_back_with_its_geometry_and_voxels(tmp_path):
    array = np.random.default_rng(0).integers(-1000, 1000, size=(5, 6, 7))
    image = oblique(array)
    write_series(image, tmp_path / "patient7", "1.2.826.0.1.3680043.8.498.2", "synthetic")
    (case,) = group_inputs([tmp_path / "patient7"])
    assert case.case_id == "patient7" and case.dicom and case.ending == ".nii.gz"
    assert [f.name for f in case.files] == [f"IM{5 - z:04d}.dcm" for z in range(5)]  # ordered by position
    arr, geometry = read_dicom_series(case.files)
    assert geometry.file_shape == (7, 6, 5)
    np.testing.assert_allclose(geometry.file_spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(geometry.file_origin, image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(geometry.file_direction, image.GetDirection(), atol=1e-6)
    # the same voxels in the same canonical orientation as the volume written as NIfTI
    sitk.WriteImage(image, str(tmp_path / "patient7.nii.gz"))
    want, nifti_geometry = read_image(tmp_path / "patient7.nii.gz")
    np.testing.assert_array_equal(arr, want)
    assert geometry.orientation == nifti_geometry.orientation and geometry.shape == nifti_geometry.shape
    # a parent folder of series folders: one case per series, named after its folder
    write_series(image, tmp_path / "series" / "patient3", "1.2.826.0.1.3680043.8.498.3", "synthetic")
    (tmp_path / "patient7").rename(tmp_path / "series" / "patient7")
    assert [c.case_id for c in group_inputs([tmp_path / "series"])] == ["patient3", "patient7"]
    # a folder of image files is read as before, whatever DICOM folders lie beside them
    assert [c.case_id for c in group_inputs([tmp_path])] == ["patient7"] and not group_inputs([tmp_path])[0].dicom
    # a DICOM series and a NIfTI of one case id would overwrite each other's outputs
    with pytest.raises(MosaicSegError, match=r"case id 'patient7'.*Fix: rename"):
        group_inputs([tmp_path / "patient7.nii.gz", tmp_path / "series" / "patient7"])


def test_a_folder_with_several_series_is_an_error_that_lists_them(tmp_path):
    image = oblique(np.zeros((3, 4, 4)))
    write_series(image, tmp_path / "mixed", "1.2.826.0.1.3680043.8.498.10", "T1 axial")
    write_series(image[:, :, :2], tmp_path / "mixed", "1.2.826.0.1.3680043.8.498.11", "scout", prefix="SC")
    for call in (lambda: dicom_series_files(tmp_path / "mixed"), lambda: group_inputs([tmp_path / "mixed"])):
        with pytest.raises(MosaicSegError) as err:
            call()
        text = str(err.value)
        assert "holds 2 DICOM series" in text
        assert "1.2.826.0.1.3680043.8.498.10 ('T1 axial', 3 files)" in text
        assert "1.2.826.0.1.3680043.8.498.11 ('scout', 2 files)" in text
        assert "Fix: move each series into its own folder" in text
    assert dicom_series_files(tmp_path) is None  # no slice files directly in it
    with pytest.raises(MosaicSegError, match="pass the folder holding the series"):
        group_inputs([next((tmp_path / "mixed").iterdir())])


@pytest.fixture(scope="module")
def run_3d(tiny_run_3d):
    return tiny_run_3d


@pytest.fixture
def ct_series(tiny_workdir_3d, tmp_path) -> tuple[Path, sitk.Image]:
    """A synthetic CT case of the tiny collection written as an oblique DICOM series ``SERIES/ct_case``."""
    source = sorted((tiny_workdir_3d.parent / "data" / CT / "imagesTr").glob("*_0000.nii.gz"))[0]
    image = oblique(sitk.GetArrayFromImage(sitk.ReadImage(str(source))))
    write_series(image, tmp_path / "series" / "ct_case", "1.2.826.0.1.3680043.8.498.20", "synthetic CT")
    return tmp_path / "series" / "ct_case", image


def test_predict_a_series_into_nifti_on_its_grid_and_a_dicom_seg(run_3d, ct_series, tmp_path):
    pytest.importorskip("highdicom")
    import highdicom as hd
    import pydicom
    from typer.testing import CliRunner

    from mosaicseg.cli import app

    folder, image = ct_series
    out = tmp_path / "pred"
    args = ["predict", "-m", str(run_3d), "-i", str(folder.parent), "-o", str(out), "--dataset", CT]
    result = CliRunner().invoke(app, [*args, "--save-probabilities", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    label = sitk.ReadImage(str(out / "ct_case.nii.gz"))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-5)
    names = ("Liver", "Tumor")
    probs = [sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"ct_case_prob_{n}.nii.gz"))) for n in names]
    # a barely trained network is unsure everywhere: a threshold at the highest probability of one half of the
    # slices leaves that half empty and the other not, so frames are both encoded and left out
    half = image.GetDepth() // 2
    cuts = [float(min(p[:half].max(), p[half:].max())) for p in probs]
    thresholds = [x for n, c in zip(names, cuts, strict=True) for x in ("--threshold", f"{n}={c}")]
    opts = ["--dicom-seg", "--overwrite", "--precision", "fp32", *thresholds]
    result = CliRunner().invoke(app, [*args, *opts])
    assert result.exit_code == 0, result.output
    # DICOM-SEG: one segment per task (CT: Liver, Tumor), one frame per slice where a segment has voxels
    seg = hd.seg.segread(out / "ct_case.seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(names)
    masks = [p > c for p, c in zip(probs, cuts, strict=True)]  # (Z, Y, X): the series' own grid
    per_slice = [m.reshape(m.shape[0], -1).any(1) for m in masks]  # (Z,) per segment, in slice-file order
    assert all(0 < s.sum() < image.GetDepth() for s in per_slice)  # some slices empty, some not
    assert int(seg.NumberOfFrames) == sum(int(s.sum()) for s in per_slice)
    # each frame is the mask of its segment on the slice it references
    files = dicom_series_files(folder)
    uid_slice = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): z for z, f in enumerate(files)}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), image.GetHeight(), image.GetWidth())
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        np.testing.assert_array_equal(pixels[i].astype(bool), masks[number - 1][uid_slice[uid]])
    # a second run keeps both outputs (resume) unless --overwrite
    result = CliRunner().invoke(app, [*args, "--dicom-seg"])
    assert result.exit_code == 0 and "kept 1 existing" in result.output


def test_dicom_seg_fails_early_without_highdicom_or_without_dicom_inputs(monkeypatch, tmp_path, tiny_workdir_3d):
    from typer.testing import CliRunner

    from mosaicseg.cli import app

    nifti = sorted((tiny_workdir_3d.parent / "data" / CT / "imagesTr").glob("*_0000.nii.gz"))[0]
    args = ["predict", "-m", str(tmp_path / "no_model"), "-i", str(nifti), "-o", str(tmp_path / "o"), "--dicom-seg"]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "highdicom", None)  # import highdicom raises ImportError
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "pip install 'mosaicseg[dicom]'" in result.output  # before the (missing) model is even looked at
    pytest.importorskip("highdicom")
    from mosaicseg.inference.predictor import Predictor

    predictor = Predictor([], None, {}, [8, 8, 8], torch.device("cpu"))  # the input check comes before any model use
    with pytest.raises(MosaicSegError, match="no DICOM series among the inputs"):
        predictor.predict_files([nifti], tmp_path / "o", dicom_seg=True)
