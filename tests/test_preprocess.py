"""Resampling, cropping, normalisation and the resumable preprocessed cache."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mosaicseg.data.fingerprint import plan
from mosaicseg.data.io import Geometry, write_image
from mosaicseg.data.manifest import load_dataset, read_case
from mosaicseg.data.preprocess import (
    crop_to_nonzero,
    load_case,
    normalize,
    outside_image,
    preprocess,
    preprocess_arrays,
    resample_image,
    resample_labels,
    restore_labels,
)
from mosaicseg.data.workdir import list_cases
from mosaicseg.errors import MosaicSegError


def write_dataset(
    folder: Path,
    cases: dict[str, tuple[np.ndarray, np.ndarray]],
    spacing: tuple[float, ...],
    channel_names: tuple[str, ...] = ("T1",),
    labels: dict[str, int] | None = None,
    direction: tuple[float, ...] | None = None,
) -> Path:
    """An nnU-Net raw dataset from arrays: image ``(C, X, Y, Z)``, labels ``(X, Y, Z)``."""
    labels = labels or {"a": 1, "b": 2}
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()

    def save(arr: np.ndarray, path: Path) -> None:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
        img.SetSpacing(spacing)
        if direction is not None:
            img.SetDirection(direction)
        sitk.WriteImage(img, str(path))

    for cid, (image, seg) in cases.items():
        for c in range(image.shape[0]):
            save(image[c].astype(np.float32), folder / "imagesTr" / f"{cid}_{c:04d}.nii.gz")
        save(seg.astype(np.uint8), folder / "labelsTr" / f"{cid}.nii.gz")
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {str(i): n for i, n in enumerate(channel_names)},
                "labels": {"background": 0, **labels},
                "numTraining": len(cases),
                "file_ending": ".nii.gz",
            }
        )
    )
    return folder


def blob_case(
    rng: np.random.Generator, shape: tuple[int, ...] = (16, 16, 16), border: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """A case with a zero border (so cropping has work to do) and two box labels."""
    image = np.zeros((1, *shape), dtype=np.float32)
    inner = tuple(slice(border, s - border) for s in shape)
    image[(0, *inner)] = rng.normal(100, 20, [s - 2 * border for s in shape])
    seg = np.zeros(shape, dtype=np.uint8)
    seg[4:8, 4:9, 5:10] = 1
    seg[9:12, 6:11, 4:8] = 2
    return image, seg


# --------------------------------------------------------------------------------------------- resampling
def test_resample_image_cubic_is_accurate_on_a_smooth_function() -> None:
    n = 24
    x = (np.arange(n) + 0.5) / n
    f = lambda t: np.sin(2 * np.pi * t)  # noqa: E731
    image = np.broadcast_to(f(x)[:, None, None], (n, 6, 5))[None].astype(np.float32)
    out = resample_image(image, (1.0, 1.0, 1.0), (0.5, 1.0, 1.0), order=3)
    assert out.shape == (1, 2 * n, 6, 5) and out.dtype == np.float32
    fine = (np.arange(2 * n) + 0.5) / (2 * n)  # voxel centres of the new grid cover the same extent
    err = np.abs(out[0, :, 3, 2] - f(fine))[6:-6]  # edges are replicated, not extrapolated
    linear = resample_image(image, (1.0, 1.0, 1.0), (0.5, 1.0, 1.0), order=1)
    assert err.max() < 1e-3 < np.abs(linear[0, :, 3, 2] - f(fine))[6:-6].max()
    np.testing.assert_array_equal(resample_image(image, (1, 1, 1), (1, 1, 1)), image)


def test_resample_labels_keeps_every_label_and_round_trips_shape() -> None:
    seg = np.zeros((20, 20, 20), dtype=np.int16)
    seg[2:10, 2:10, 2:10] = 1
    seg[10:16, 4:12, 6:14] = 2
    seg[15:18, 15:18, 15:18] = 3  # small: survives coarsening by 2
    coarse = resample_labels(seg, (1, 1, 1), (2, 2, 2))
    assert coarse.shape == (10, 10, 10) and coarse.dtype == np.int16
    assert set(np.unique(coarse)) == {0, 1, 2, 3}
    back = resample_labels(coarse, (2, 2, 2), (1, 1, 1))
    assert back.shape == seg.shape
    assert (back == seg).mean() > 0.9


def test_separate_axis_resamples_the_coarse_axis_by_nearest_neighbour() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
    out = resample_image(image, (1, 1, 4), (1, 1, 2), order=3, separate_axis=2)
    assert out.shape == (1, 8, 8, 8)
    # nearest along z: every new slice is one of the old slices, untouched in-plane
    for k in range(8):
        assert any(np.array_equal(out[0, :, :, k], image[0, :, :, j]) for j in range(4))
    blended = resample_image(image, (1, 1, 4), (1, 1, 2), order=3)
    assert not any(np.allclose(blended[0, :, :, 1], image[0, :, :, j]) for j in range(4))
    seg = (rng.random((8, 8, 4)) > 0.5).astype(np.int16)
    seg_out = resample_labels(seg, (1, 1, 4), (1, 1, 2), separate_axis=2)
    for k in range(8):
        assert any(np.array_equal(seg_out[:, :, k], seg[:, :, j]) for j in range(4))


# --------------------------------------------------------------------------------------------- crop, normalise
def test_crop_to_nonzero_bbox_and_full_image() -> None:
    image = np.zeros((2, 10, 12, 8), dtype=np.float32)
    image[0, 2:5, 3:9, 1:4] = 1
    image[1, 6:7, 4:5, 5:6] = -3  # another channel widens the box
    seg = np.zeros((10, 12, 8), dtype=np.int16)
    seg[3, 4, 2] = 1
    cropped, cseg, bbox = crop_to_nonzero(image, seg)
    assert bbox == [[2, 7], [3, 9], [1, 6]]
    assert cropped.shape == (2, 5, 6, 5) and cseg is not None and cseg.shape == (5, 6, 5)
    assert cseg[1, 1, 1] == 1 and cseg.sum() == 1
    full = np.ones((1, 4, 5, 6), dtype=np.float32)
    assert crop_to_nonzero(full, None)[2] == [[0, 4], [0, 5], [0, 6]]


def test_outside_image_is_the_zero_region_connected_to_the_border() -> None:
    image = np.ones((2, 6, 7, 5), dtype=np.float32)
    image[:, :2] = 0  # a slab at the border, zero in both channels: outside
    image[:, 3, 3, 2] = 0  # an enclosed zero voxel (a signal void): inside
    image[0, 5, 6, 4] = 0  # a border voxel zero in one channel only: imaged, inside
    want = np.zeros((6, 7, 5), dtype=bool)
    want[:2] = True
    np.testing.assert_array_equal(outside_image(image), want)
    # 2D: a zero frame around the image, with a zero hole in the middle; a diagonal touch does not connect
    flat = np.zeros((1, 7, 7), dtype=np.float32)
    flat[0, 1:6, 1:6] = 5
    flat[0, 3, 3] = 0
    want2 = np.ones((7, 7), dtype=bool)
    want2[1:6, 1:6] = False
    np.testing.assert_array_equal(outside_image(flat), want2)
    assert not outside_image(np.ones((1, 4, 4, 4), dtype=np.float32)).any()  # nothing zero: nothing outside


def test_normalize_schemes_match_hand_computed_values() -> None:
    x = np.array([-1000.0, -100.0, 0.0, 50.0, 200.0, 1000.0], dtype=np.float32).reshape(1, 6, 1)
    ct = normalize(x, [{"channel": "CT", "scheme": "ct", "clip": [-50, 300], "mean": 10.0, "std": 2.0}])
    np.testing.assert_allclose(ct[0, :, 0], [-30, -30, -5, 20, 95, 145])
    fixed = normalize(x, [{"channel": "CT", "scheme": "ct_fixed", "clip": [-990, 500], "mean": 0.0, "std": 10.0}])
    np.testing.assert_allclose(fixed[0, :, 0], [-99, -10, 0, 5, 20, 50])
    z = normalize(np.array([[1.0, 2.0, 3.0, 4.0]]), [{"scheme": "zscore"}])
    np.testing.assert_allclose(z[0], (np.array([1, 2, 3, 4]) - 2.5) / np.std([1, 2, 3, 4]), rtol=1e-6)
    ramp = np.arange(101, dtype=np.float32)[None]  # percentiles 2 and 98 are 2 and 98
    mr = normalize(ramp, [{"scheme": "mr", "percentiles": [2, 98]}])
    clipped = np.clip(np.arange(101.0), 2, 98)
    np.testing.assert_allclose(mr[0], (clipped - clipped.mean()) / clipped.std(), rtol=1e-5, atol=1e-6)
    rgb = normalize(np.stack([ramp[0], 2 * ramp[0] + 7, np.full(101, 5.0)]), [{"scheme": "rgb"}] * 3)
    np.testing.assert_allclose(rgb[0], rgb[1], atol=1e-5)  # per channel: scale and offset disappear
    assert rgb.dtype == np.float32 and np.all(rgb[2] == 0)  # a constant channel does not divide by zero
    with pytest.raises(MosaicSegError, match="unknown"):
        normalize(ramp, [{"scheme": "nope", "channel": "T1"}])


# --------------------------------------------------------------------------------------------- the cache
@pytest.fixture()
def planned(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    folder = write_dataset(
        tmp_path / "Dataset001_Tiny", {f"case{i}": blob_case(rng) for i in range(3)}, spacing=(1.0, 1.0, 1.0)
    )
    work = tmp_path / "work"
    plan(folder, work, workers=1, progress=False)
    return work


def test_preprocess_writes_cache_and_resumes(planned: Path) -> None:
    stats = preprocess(planned, workers=1, progress=False)
    assert (stats["n_done"], stats["n_skipped"]) == (3, 0)
    assert list_cases(planned) == {"Dataset001_Tiny": ["case0", "case1", "case2"]}
    case = load_case(planned, "Dataset001_Tiny", "case1")
    assert isinstance(case.image, np.memmap) and case.image.dtype == np.float32 and case.seg.dtype == np.int16
    assert case.image.shape == (1, 12, 12, 12) == (1, *case.seg.shape)  # 2-voxel zero border cropped
    assert set(case.fg_locations) == {"a", "b"}
    locs = case.fg_locations["a"]
    assert locs.shape == (4 * 5 * 5, 3) and locs.dtype == np.int32
    assert np.all(case.seg[tuple(locs.T)] == 1)
    assert case.meta["labels_present"] == [0, 1, 2] and case.meta["bbox"] == [[2, 14]] * 3
    again = preprocess(planned, workers=1, progress=False)
    assert (again["n_done"], again["n_skipped"]) == (0, 3)
    (planned / "preprocessed" / "Dataset001_Tiny" / "case2.json").unlink()
    assert list_cases(planned) == {"Dataset001_Tiny": ["case0", "case1"]}
    redo = preprocess(planned, workers=1, progress=False)
    assert (redo["n_done"], redo["n_skipped"]) == (1, 2)
    # an edited dataset plan invalidates that dataset's cases
    plans = json.loads((planned / "plans.json").read_text())
    plans["datasets"]["Dataset001_Tiny"]["image_order"] = 1
    (planned / "plans.json").write_text(json.dumps(plans))
    assert list_cases(planned) == {"Dataset001_Tiny": []}
    assert preprocess(planned, workers=1, progress=False)["n_done"] == 3


def test_preprocess_in_parallel_and_errors(planned: Path) -> None:
    with pytest.raises(MosaicSegError, match="not planned"):
        preprocess(planned, progress=False, datasets=["Dataset999_None"])
    with pytest.raises(MosaicSegError, match="mosaicseg preprocess"):
        load_case(planned, "Dataset001_Tiny", "case0")
    stats = preprocess(planned, workers=2, progress=False, datasets=["Dataset001_Tiny"])
    assert stats["n_done"] == 3
    assert not [p for p in (planned / "preprocessed" / "Dataset001_Tiny").iterdir() if p.name.startswith(".")]


def test_meta_restores_original_labels_and_geometry(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    ras = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)  # not the canonical orientation: exercises reorientation
    folder = write_dataset(
        tmp_path / "Dataset002_Ras",
        {"c0": blob_case(rng, (16, 14, 12), border=3)},
        spacing=(1.0, 1.0, 1.0),
        direction=ras,
    )
    work = tmp_path / "work"
    plan(folder, work, workers=1, progress=False)
    preprocess(work, workers=1, progress=False)
    case = load_case(work, "Dataset002_Ras", "c0", mmap=False)
    assert case.meta["shape_cropped"] != case.meta["shape_original"]  # really cropped
    restored = restore_labels(np.asarray(case.seg), case.meta)
    _, original, geometry = read_case(load_dataset(folder).cases[0])
    np.testing.assert_array_equal(restored, original)
    out = write_image(tmp_path / "pred.nii.gz", restored.astype(np.uint8), geometry)
    raw_written = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    raw_label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "c0.nii.gz")))
    np.testing.assert_array_equal(raw_written, raw_label)


# --------------------------------------------------------------------------------------------- non-finite voxels
def _geometry(shape: tuple[int, ...]) -> Geometry:
    return Geometry(3, shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), "LPS", shape, (1.0,) * 3)


NAN_PLAN = {
    "target_spacing": [0.5, 1.0, 1.0],  # cubic upsampling would spread a NaN over its neighbours
    "separate_axis": None,
    "image_order": 3,
    "normalization": [{"channel": "T1", "scheme": "mr", "percentiles": None}, {"channel": "T2", "scheme": "zscore"}],
}


def test_nonfinite_voxels_become_the_channel_minimum_with_a_warning() -> None:
    rng = np.random.default_rng(3)
    clean = rng.uniform(10, 100, size=(2, 8, 8, 8)).astype(np.float32)
    dirty = clean.copy()
    dirty[0, 1, 2, 3], dirty[0, 4, 4, 4], dirty[0, 7, 0, 1] = np.nan, np.nan, np.inf
    dirty[1, 2, 2, 2] = -np.inf
    fixed = dirty.copy()
    for c in range(2):
        bad = ~np.isfinite(fixed[c])
        fixed[c][bad] = fixed[c][~bad].min()
    seg = np.zeros((8, 8, 8), dtype=np.int16)
    seg[2:5, 2:5, 2:5] = 1
    geometry = _geometry((8, 8, 8))
    with pytest.warns(UserWarning, match=r"scan_0000\.nii\.gz: 4 of 1024 voxels are NaN or infinite") as caught:
        out, out_seg, meta = preprocess_arrays(dirty, seg, geometry, NAN_PLAN, source="scan_0000.nii.gz")
    assert "3 in channel 0" in str(caught[0].message) and "1 in channel 1" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an image without non-finite voxels passes silently
        ref, ref_seg, ref_meta = preprocess_arrays(fixed, seg, geometry, NAN_PLAN, source="scan_0000.nii.gz")
    assert out.shape == (2, 16, 8, 8) and np.isfinite(out).all()
    np.testing.assert_array_equal(out, ref)
    assert out_seg is not None and ref_seg is not None and np.array_equal(out_seg, ref_seg) and meta == ref_meta
    assert np.isnan(dirty[0, 1, 2, 3])  # the caller's array is left as it was


def test_a_channel_without_finite_voxels_is_an_error() -> None:
    image = np.ones((2, 4, 4, 4), dtype=np.float32)
    image[1] = np.nan
    with pytest.raises(MosaicSegError, match=r"bad\.nii\.gz: channel 1 has no finite voxel"):
        preprocess_arrays(image, None, _geometry((4, 4, 4)), NAN_PLAN, source="bad.nii.gz")


def test_training_preprocessing_replaces_nonfinite_voxels_too(make_dataset, tmp_path: Path) -> None:
    """plan (fingerprint) and preprocess share the replacement. MHA keeps NaN; ITK's NIfTI reader turns it into 0
    before MosaicSeg sees the array."""
    image = np.random.default_rng(4).uniform(10, 100, size=(8, 8, 8)).astype(np.float32)
    image[5, 5, 5] = np.nan
    folder = make_dataset("Dataset003_Nan", ["c0"], channels=("T1",), ending=".mha", images={"c0": [image]})
    work = tmp_path / "work"
    with pytest.warns(UserWarning, match=r"c0_0000\.mha: 1 of 512 voxels"):
        plan(folder, work, workers=1, progress=False)
    fp = json.loads((work / "fingerprint.json").read_text())["datasets"]["Dataset003_Nan"]["intensity"][0]
    assert all(np.isfinite(fp[k]) for k in ("mean", "std", "min", "percentile_00_5", "percentile_99_5"))
    with pytest.warns(UserWarning, match=r"c0_0000\.mha: 1 of 512 voxels"):
        preprocess(work, workers=1, progress=False)
    cached = np.asarray(load_case(work, "Dataset003_Nan", "c0").image)
    finite = np.where(np.isfinite(image), image, np.nanmin(image)).T  # files hold (Z, Y, X); the cache (X, Y, Z)
    np.testing.assert_allclose(cached[0], (finite - finite.mean()) / finite.std(), rtol=1e-5, atol=1e-5)
