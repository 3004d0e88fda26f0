"""Orientation and geometry round-trip of the image reader/writer."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from mosaicseg.data.io import read_image, write_image
from mosaicseg.errors import MosaicSegError


def _image(arr_zyx: np.ndarray, spacing, origin, direction) -> sitk.Image:
    img = sitk.GetImageFromArray(arr_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _oblique() -> tuple[float, ...]:
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rot @ np.diag([-1, 1, 1])).ravel())


DIRECTIONS = {
    "LPS": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "RAS": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "PSR": (0, 0, -1, 1, 0, 0, 0, 1, 0),
    "oblique": _oblique(),
}


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_round_trip_restores_array_and_geometry_exactly(tmp_path, name, ending):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 1000, size=(5, 7, 9)).astype(np.int16)
    src = tmp_path / f"src{ending}"
    sitk.WriteImage(_image(arr, (0.8, 1.1, 2.5), (10.5, -3.0, 7.25), DIRECTIONS[name]), str(src))
    data, geom = read_image(src)
    assert data.shape[0] == 1 and data.shape[1:] == geom.shape
    out = tmp_path / f"out{ending}"
    write_image(out, data[0], geom)
    back = sitk.ReadImage(str(out))
    orig = sitk.ReadImage(str(src))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(orig))
    assert back.GetSpacing() == orig.GetSpacing()
    assert back.GetOrigin() == orig.GetOrigin()
    assert back.GetDirection() == orig.GetDirection()


def test_same_world_content_gives_same_canonical_array(tmp_path):
    """Two files storing one volume in different axis orders read back as one array and spacing."""
    rng = np.random.default_rng(1)
    img = _image(rng.normal(size=(4, 6, 8)).astype(np.float32), (1.0, 2.0, 3.0), (0, 0, 0), DIRECTIONS["LPS"])
    sitk.WriteImage(img, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(sitk.DICOMOrient(img, "PSR"), str(tmp_path / "b.nii.gz"))
    a, ga = read_image(tmp_path / "a.nii.gz")
    b, gb = read_image(tmp_path / "b.nii.gz")
    assert gb.orientation == "PSR" and ga.orientation == "LPS"
    np.testing.assert_array_equal(a, b)
    assert ga.spacing == gb.spacing == (1.0, 2.0, 3.0)


def test_single_slice_nifti_is_2d_and_restored(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    src = tmp_path / "s.nii.gz"
    sitk.WriteImage(_image(arr, (0.5, 0.7, 3.0), (1, 2, 3), DIRECTIONS["RAS"]), str(src))
    data, geom = read_image(src)
    assert data.shape == (1, 4, 3) and np.allclose(geom.spacing, (0.5, 0.7)) and geom.squeezed_axis == 2
    write_image(tmp_path / "o.nii.gz", data[0], geom)
    back = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
    assert back.GetDirection() == sitk.ReadImage(str(src)).GetDirection()


def test_rgb_png_has_three_channels_and_label_png_round_trips(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(2).integers(0, 255, size=(6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    data, _ = read_image(tmp_path / "c.png")
    assert data.shape == (3, 6, 5)
    np.testing.assert_array_equal(data[1], rgb[..., 1])
    lab = (rgb[..., 0] > 128).astype(np.uint8)
    Image.fromarray(lab).save(tmp_path / "l.png")
    ldata, lgeom = read_image(tmp_path / "l.png")
    write_image(tmp_path / "o.png", ldata[0], lgeom)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o.png")), lab)


def test_write_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path):
    arr = np.zeros((3, 3, 3), dtype=np.uint8)
    sitk.WriteImage(_image(arr, (1, 1, 1), (0, 0, 0), DIRECTIONS["LPS"]), str(tmp_path / "a.nii.gz"))
    data, geom = read_image(tmp_path / "a.nii.gz")
    with pytest.raises(MosaicSegError, match="exists already"):
        write_image(tmp_path / "a.nii.gz", data[0], geom)
    write_image(tmp_path / "a.nii.gz", data[0] + 1, geom, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_corrupt_file_gives_clean_error(tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    with pytest.raises(MosaicSegError, match=r"x\.nii\.gz: cannot read"):
        read_image(bad)


def test_single_slice_on_another_axis_is_2d_and_restored(tmp_path):
    # one sagittal slice: after reorientation to LPS the singleton lies on X, not on the last axis
    arr = np.arange(20, dtype=np.int16).reshape(4, 5, 1)
    src = tmp_path / "sag.nii.gz"
    sitk.WriteImage(_image(arr, (0.8, 0.9, 1.1), (0, 0, 0), DIRECTIONS["LPS"]), str(src))
    data, geom = read_image(src)
    assert data.shape == (1, 5, 4) and geom.squeezed_axis == 0 and np.allclose(geom.spacing, (0.9, 1.1))
    write_image(tmp_path / "o.nii.gz", data[0], geom)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o.nii.gz"))), arr)


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, ending):
    import gzip

    arr = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    full = tmp_path / f"full{ending}"
    sitk.WriteImage(_image(arr, (1, 1, 1), (0, 0, 0), DIRECTIONS["LPS"]), str(full))
    raw = gzip.decompress(full.read_bytes()) if ending == ".nii.gz" else full.read_bytes()
    cut = raw[: len(raw) // 2]
    bad = tmp_path / f"cut{ending}"
    bad.write_bytes(gzip.compress(cut) if ending == ".nii.gz" else cut)
    with pytest.raises(MosaicSegError, match=r"cut\.nii(\.gz)?: incomplete image.*Fix: re-download"):
        read_image(bad)


def test_grey_alpha_png_drops_alpha(tmp_path):
    from PIL import Image

    la = np.random.default_rng(3).integers(0, 255, size=(6, 5, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "g.png")
    data, _ = read_image(tmp_path / "g.png")
    assert data.shape == (1, 6, 5)
    np.testing.assert_array_equal(data[0], la[..., 0])


def test_nifti_nan_and_inf_voxels_are_read_where_they_are(tmp_path):
    """ITK's NIfTI reader makes NaN/inf 0; read_image puts them back, at their place after reorientation."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    values = rng.random((5, 6, 7)).astype(np.float32)
    marked = values.copy()
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # a flipped axis: reorientation moves the voxels
    for (i, j, k), bad, marker in (((1, 2, 3), np.nan, -7.0), ((4, 5, 6), -np.inf, -9.0), ((0, 0, 1), np.inf, -5.0)):
        values[i, j, k], marked[i, j, k] = bad, marker
    nib.save(nib.Nifti1Image(values, affine), tmp_path / "bad.nii.gz")
    nib.save(nib.Nifti1Image(marked, affine), tmp_path / "marked.nii.gz")
    got, _ = read_image(tmp_path / "bad.nii.gz")
    where, _ = read_image(tmp_path / "marked.nii.gz")
    np.testing.assert_array_equal(np.isnan(got), where == -7.0)
    np.testing.assert_array_equal(np.isneginf(got), where == -9.0)
    np.testing.assert_array_equal(np.isposinf(got), where == -5.0)
    finite = np.isfinite(got)
    np.testing.assert_array_equal(got[finite], where[finite])
