"""Fingerprints and plans: spacing rules, normalisation choice, the shared network plan, plan files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from mosaicseg.data.collection import open_collection
from mosaicseg.data.fingerprint import (
    PRESETS,
    compute_fingerprint,
    hounsfield_like,
    make_plans,
    match_anisotropy,
    plan,
    plan_network,
    target_spacing,
    topology,
)
from mosaicseg.data.workdir import load_plans
from mosaicseg.errors import MosaicSegError


def write_nifti_dataset(
    folder: Path,
    n_cases: int,
    spacing: tuple[float, ...],
    channel: str = "T1",
    intensity: tuple[float, float] = (100.0, 20.0),
    shape: tuple[int, ...] = (16, 16, 16),
    seed: int = 0,
    zero_border: int = 0,
) -> Path:
    """An nnU-Net raw dataset of ``n_cases`` random images with one box label (value 1) from ``s // 4`` to
    ``s // 2`` on every axis; the first and last ``zero_border`` planes of the first axis are 0 (a masked image)."""
    rng = np.random.default_rng(seed)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i in range(n_cases):
        image = rng.normal(*intensity, shape).astype(np.float32)
        if zero_border:
            image[:zero_border] = image[-zero_border:] = 0
        seg = np.zeros(shape, dtype=np.uint8)
        seg[tuple(slice(s // 4, s // 2 + 1) for s in shape)] = 1
        for arr, path in ((image, f"imagesTr/c{i}_0000.nii.gz"), (seg, f"labelsTr/c{i}.nii.gz")):
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
            img.SetSpacing(spacing)
            sitk.WriteImage(img, str(folder / path))
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": channel},
                "labels": {"background": 0, "thing": 1},
                "numTraining": n_cases,
                "file_ending": ".nii.gz",
            }
        )
    )
    return folder


def write_rgb_dataset(folder: Path, n_cases: int = 2, shape: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(0)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i in range(n_cases):
        Image.fromarray(rng.integers(1, 255, (*shape, 3), dtype=np.uint8)).save(folder / f"imagesTr/p{i}_0000.png")
        seg = np.zeros(shape, dtype=np.uint8)
        seg[5:15, 5:12] = 1
        Image.fromarray(seg).save(folder / f"labelsTr/p{i}.png")
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "R", "1": "G", "2": "B"},
                "labels": {"background": 0, "lesion": 1},
                "numTraining": n_cases,
                "file_ending": ".png",
            }
        )
    )
    return folder


def write_collection(tmp_path: Path, folders: list[Path]) -> Path:
    path = tmp_path / "collection.yaml"
    path.write_text("name: test\ndatasets:\n" + "".join(f"  - path: {f}\n" for f in folders))
    return path


# --------------------------------------------------------------------------------------------- rules
def test_anisotropy_rule_picks_separate_axis_and_10th_percentile() -> None:
    spacings = np.array([[0.8, 0.8, z] for z in (3.0, 4.0, 5.0, 5.0, 5.0, 6.0, 6.0, 8.0, 9.0, 10.0)])
    shapes = np.array([[256, 256, 30]] * len(spacings))
    target, axis = target_spacing(spacings, shapes)
    assert axis == 2
    assert target[:2] == [0.8, 0.8]
    assert target[2] == pytest.approx(np.percentile(spacings[:, 2], 10))  # 3.9, not the median 5.5
    many_slices = np.array([[256, 256, 200]] * len(spacings))  # no anisotropy in voxels: the median stays
    target, axis = target_spacing(spacings, many_slices)
    assert target[2] == pytest.approx(5.5) and axis == 2  # still resampled separately (nnU-Net)
    iso, axis = target_spacing(np.array([[1.0, 1.0, 1.2], [1.0, 1.0, 0.8]]), np.array([[50, 50, 50]] * 2))
    assert iso == pytest.approx([1.0, 1.0, 1.0]) and axis is None


def test_hounsfield_rule() -> None:
    assert hounsfield_like(-923.0, 443.0)[0]  # abdominal CT crop (Dataset006)
    assert not hounsfield_like(-0.21, 1.81)[0]  # pre-normalised CT slices (Dataset012)
    assert not hounsfield_like(0.0, 4095.0)[0]  # MR: nothing below zero
    assert not hounsfield_like(-5000.0, 400.0)[0]  # beyond physical HU


def test_topology_anisotropic_kernels_and_delayed_pooling() -> None:
    strides, kernels = topology([128, 128, 32], [0.8, 0.8, 4.0])
    assert kernels[0] == [3, 3, 1]
    assert strides[1] == [2, 2, 1] and strides[2] == [2, 2, 1]  # z waits until in-plane spacing catches up
    assert [3, 3, 3] in kernels and kernels[-1] == [3, 3, 3]
    assert len(strides) == len(kernels)
    for axis, size in enumerate([128, 128, 32]):
        pooled = size / math.prod(s[axis] for s in strides)
        assert pooled >= 4 and pooled == int(pooled)


@pytest.mark.parametrize(("dim", "device"), [(3, "cpu"), (3, "cuda"), (2, "cpu"), (2, "cuda")])
def test_network_plan_divisible_and_within_caps(dim: int, device: str) -> None:
    shape = [300, 280, 200][:dim]
    datasets = {
        "A": {"target_spacing": [1.0] * dim, "median_shape": shape},
        "B": {"target_spacing": [1.0, 1.0, 3.0][:dim], "median_shape": [100, 120, 40][:dim]},
    }
    net = plan_network(datasets, dim, device, in_channels=2, out_channels=5, total_voxels=1e12)
    preset = PRESETS[device]
    for axis, p in enumerate(net["patch_size"]):
        assert p % math.prod(s[axis] for s in net["strides"]) == 0
    assert math.prod(net["patch_size"]) <= preset.max_patch_voxels[dim]
    assert net["memory_estimate_gb"] <= net["memory_budget_gb"] == preset.memory_budget_gb
    assert net["features"][0] == preset.base_features and max(net["features"]) <= preset.max_features
    assert net["batch_size"] >= 2 and net["num_stages"] == len(net["kernel_sizes"]) == len(net["features"])
    small = plan_network(datasets, dim, device, memory_budget_gb=0.1, in_channels=2, out_channels=5)
    assert small["memory_estimate_gb"] <= 0.1 and math.prod(small["patch_size"]) < math.prod(net["patch_size"])
    with pytest.raises(MosaicSegError, match="memory-budget"):
        plan_network(datasets, dim, device, memory_budget_gb=1e-6)


def test_one_thick_slice_dataset_leaves_the_isotropic_majoritys_network_isotropic() -> None:
    # mri7's shape: isotropic heads and crops, one cine set at 10 mm slices
    datasets = {
        "Heads": {"target_spacing": [2.0, 2.0, 2.0], "median_shape": [90, 120, 120]},
        "Crops": {"target_spacing": [1.0, 1.0, 1.0], "median_shape": [35, 50, 36]},
        "Cine": {"target_spacing": [1.5, 1.5, 10.0], "median_shape": [216, 256, 10]},
    }
    median = plan_network(datasets, 3, "cpu", in_channels=1, out_channels=3)
    assert median["topology_spacing"] == [1.5, 1.5, 2.0]
    assert all(k == [3, 3, 3] for k in median["kernel_sizes"])
    assert all(len(set(s)) == 1 for s in median["strides"])  # every axis pooled together
    largest = plan_network(datasets, 3, "cpu", in_channels=1, out_channels=3, topology_spacing="max")
    assert largest["topology_spacing"] == [2.0, 2.0, 10.0] and largest["kernel_sizes"][0] == [3, 3, 1]
    assert largest["num_stages"] > median["num_stages"]  # z's delayed pooling adds stages
    with pytest.raises(MosaicSegError, match=r"topology spacing 'mean' is unknown.*median, max"):
        plan_network(datasets, 3, "cpu", topology_spacing="mean")


def test_thick_slices_are_matched_to_a_near_isotropic_network() -> None:
    datasets = {
        "Heads": {"target_spacing": [2.0, 2.0, 2.0], "median_shape": [90, 120, 120]},
        "Cine": {"target_spacing": [1.5, 1.5, 10.0], "median_shape": [216, 256, 10]},
    }
    fps = {"Cine": {"spacings": [[1.5, 1.5, 10.0], [1.25, 1.25, 10.0]], "shapes_cropped": [[216, 256, 10]] * 2}}
    assert match_anisotropy(datasets, fps, [1.5, 1.5, 2.0]) == ["Cine"]
    cine = datasets["Cine"]
    # the network's ratio: finest 1.5 × 2.0 / 1.5. Shapes, medians of the two cases: x (216, 216·1.25/1.5 = 180)
    # → 198; y (256, 213) → 234.5, rounded to even 234; z 10·10/2 = 50
    assert cine["target_spacing"] == [1.5, 1.5, 2.0]
    assert cine["median_shape"] == [198, 234, 50]
    assert "axis 2 resampled from 10 to 2 mm" in cine["spacing_note"] and "--anisotropy keep" in cine["spacing_note"]
    assert "spacing_note" not in datasets["Heads"]  # isotropic datasets (and their cache keys) are untouched
    assert match_anisotropy(datasets, fps, [1.5, 1.5, 2.0]) == []  # matched once, nothing left
    # a network anisotropic on the same axis (planned at the largest spacing) takes thick slices as they are
    thick = {"Cine": {"target_spacing": [1.5, 1.5, 10.0], "median_shape": [216, 256, 10]}}
    assert match_anisotropy(thick, fps, [2.0, 2.0, 10.0]) == [] and thick["Cine"]["target_spacing"][2] == 10.0


def test_plan_matches_thick_slices_unless_kept_and_against_a_given_network(tmp_path: Path) -> None:
    iso = write_nifti_dataset(tmp_path / "Dataset001_Iso", 2, (1.0, 1.0, 1.0))
    iso2 = write_nifti_dataset(tmp_path / "Dataset002_Iso", 2, (1.0, 1.0, 1.0), seed=1)
    thick = write_nifti_dataset(tmp_path / "Dataset003_Thick", 2, (1.0, 1.0, 5.0), shape=(16, 16, 4), seed=2)
    collection = write_collection(tmp_path, [iso, iso2, thick])
    matched = plan(collection, tmp_path / "m", workers=1, progress=False, anisotropy="match")
    t = matched["datasets"]["Dataset003_Thick"]
    assert t["target_spacing"] == [1.0, 1.0, 1.0] and t["median_shape"][2] == 20 and t["separate_axis"] == 2
    assert matched["network"]["topology_spacing"] == [1.0, 1.0, 1.0]
    kept = plan(collection, tmp_path / "k", workers=1, progress=False)  # keep is the default
    assert kept["datasets"]["Dataset003_Thick"]["target_spacing"] == [1.0, 1.0, 5.0]
    assert "spacing_note" not in kept["datasets"]["Dataset003_Thick"]
    assert kept["datasets"]["Dataset001_Iso"] == matched["datasets"]["Dataset001_Iso"]
    # fine-tuning on another model's network: matched to that network, here anisotropic like the thick set
    network = {**kept["network"], "topology_spacing": [1.0, 1.0, 5.0]}
    given = plan(collection, tmp_path / "g", workers=1, progress=False, network=network, anisotropy="match")
    assert given["datasets"]["Dataset003_Thick"]["target_spacing"] == [1.0, 1.0, 5.0]
    with pytest.raises(MosaicSegError, match=r"anisotropy 'some' is unknown.*match, keep"):
        plan(collection, tmp_path / "x", workers=1, progress=False, anisotropy="some")


# --------------------------------------------------------------------------------------------- plans from data
def test_ct_in_hu_and_not_hu_and_fixed_window(tmp_path: Path) -> None:
    hu = write_nifti_dataset(
        tmp_path / "Dataset001_HU", 2, (0.8, 0.8, 4.0), "CT", intensity=(-300.0, 400.0), shape=(32, 32, 6)
    )
    flat = write_nifti_dataset(
        tmp_path / "Dataset002_Flat", 2, (0.8, 0.8, 4.0), "CT", intensity=(0.5, 0.3), shape=(32, 32, 6)
    )
    opened = open_collection(write_collection(tmp_path, [hu, flat]))
    fp = compute_fingerprint(opened, workers=1, progress=False)
    stats = fp["datasets"]["Dataset001_HU"]["intensity"][0]
    assert stats["hounsfield_like"] and stats["foreground_found"]
    assert fp["datasets"]["Dataset001_HU"]["spacing"]["median"] == pytest.approx([0.8, 0.8, 4.0])
    plans = make_plans(fp, opened)
    ct = plans["datasets"]["Dataset001_HU"]["normalization"][0]
    assert ct["scheme"] == "ct" and ct["clip"] == [stats["percentile_00_5"], stats["percentile_99_5"]]
    assert ct["mean"] == pytest.approx(-300, abs=60) and ct["std"] == pytest.approx(400, rel=0.2)
    not_hu = plans["datasets"]["Dataset002_Flat"]["normalization"][0]
    assert not_hu["scheme"] == "zscore" and "not Hounsfield units" in not_hu["reason"]
    assert plans["datasets"]["Dataset001_HU"]["separate_axis"] == 2
    assert plans["network"]["kernel_sizes"][0] == [3, 3, 1]
    fixed = make_plans(fp, opened, ct_normalization="fixed")["datasets"]["Dataset001_HU"]["normalization"][0]
    assert fixed["scheme"] == "ct_fixed" and fixed["clip"] == [-990.0, 500.0]
    # Hermes z-scores each clipped image with its own statistics: the plan holds no dataset mean/std
    assert fixed["mean"] is None and fixed["std"] is None and "each image" in fixed["reason"]
    common = make_plans(fp, opened, common_spacing=1.5)
    assert common["common_spacing"] == [1.5, 1.5, 1.5]
    assert all(d["target_spacing"] == [1.5, 1.5, 1.5] for d in common["datasets"].values())
    assert common["datasets"]["Dataset001_HU"]["median_shape"] == [17, 17, 16]  # 32·0.8/1.5, 6·4/1.5
    assert common["network"]["topology_spacing"] == [1.5, 1.5, 1.5]


def test_rgb_and_mr_schemes_and_mixed_dims(tmp_path: Path) -> None:
    rgb = write_rgb_dataset(tmp_path / "Dataset003_Rgb")
    opened = open_collection(rgb)
    plans = make_plans(compute_fingerprint(opened, workers=1, progress=False), opened)
    assert plans["dim"] == 2 and plans["datasets"]["Dataset003_Rgb"]["target_spacing"] == [1.0, 1.0]
    assert [n["scheme"] for n in plans["datasets"]["Dataset003_Rgb"]["normalization"]] == ["rgb"] * 3
    assert plans["network"]["in_channels"] == 3 and len(plans["network"]["patch_size"]) == 2
    mr = write_nifti_dataset(tmp_path / "Dataset004_Mr", 2, (1.0, 1.0, 1.0))
    both = open_collection(write_collection(tmp_path, [rgb, mr]))
    fp = compute_fingerprint(both, workers=1, progress=False)
    assert fp["datasets"]["Dataset004_Mr"]["dim"] == 3
    assert fp["datasets"]["Dataset004_Mr"]["intensity"][0]["hounsfield_like"] is False
    with pytest.raises(MosaicSegError, match="mixes 2D and 3D"):
        make_plans(fp, both)
    one = open_collection(mr)
    one_fp = compute_fingerprint(one, workers=1, progress=False)
    mr_default = make_plans(one_fp, one)["datasets"]["Dataset004_Mr"]["normalization"][0]
    # nnU-Net's default for grey-level channels: a plain per-image z-score, no percentile clip
    assert mr_default["scheme"] == "mr" and mr_default["percentiles"] is None
    assert "without clipping" in mr_default["reason"]
    clipped = make_plans(one_fp, one, mr_clip_percentiles=(2, 98))["datasets"]["Dataset004_Mr"]["normalization"][0]
    assert clipped["scheme"] == "mr" and clipped["percentiles"] == [2.0, 98.0] and "2–98" in clipped["reason"]
    for bad in ((98, 2), (-1, 50), (5, 101), (50, 50)):
        with pytest.raises(MosaicSegError, match="0 <= lo < hi <= 100"):
            make_plans(one_fp, one, mr_clip_percentiles=bad)


def test_plan_writes_files_reuses_fingerprint_and_guards_overwrite(tmp_path: Path) -> None:
    folder = write_nifti_dataset(tmp_path / "Dataset005_Tiny", 3, (1.0, 1.0, 1.0))
    work = tmp_path / "work"
    with pytest.raises(MosaicSegError, match="mosaicseg plan"):
        load_plans(work)
    plans = plan(folder, work, workers=1, progress=False)
    for name in ("collection.json", "vocabulary.json", "fingerprint.json", "plans.json"):
        assert (work / name).is_file()
    assert load_plans(work) == plans
    assert plans["collection"]["name"] == "Dataset005_Tiny" and plans["device"] == "cpu"
    # an unchanged dataset is not read again: a marker in the stored fingerprint survives a re-plan
    fp = json.loads((work / "fingerprint.json").read_text())
    fp["datasets"]["Dataset005_Tiny"]["marker"] = 1
    (work / "fingerprint.json").write_text(json.dumps(fp))
    assert plan(folder, work, workers=1, progress=False) == plans  # identical re-plan is fine
    assert json.loads((work / "fingerprint.json").read_text())["datasets"]["Dataset005_Tiny"]["marker"] == 1
    with pytest.raises(MosaicSegError, match="--overwrite") as err:
        plan(folder, work, device="cuda", workers=1, progress=False)
    assert "plans.json" in str(err.value)
    assert load_plans(work)["device"] == "cpu"  # nothing was replaced
    assert plan(folder, work, device="cuda", overwrite=True, workers=1, progress=False)["device"] == "cuda"
    with pytest.raises(MosaicSegError, match="cpu, cuda"):
        plan(folder, work, device="tpu", progress=False)


def test_background_outside_the_imaged_region_is_planned_from_the_training_labels(tmp_path: Path) -> None:
    masked = write_nifti_dataset(tmp_path / "Dataset006_Masked", 2, (1.0, 1.0, 1.0), zero_border=2)
    # the label box starts at plane 4, which is zero here: structures lie outside the imaged region
    touching = write_nifti_dataset(tmp_path / "Dataset007_Touching", 2, (1.0, 1.0, 1.0), zero_border=5)
    plain = write_nifti_dataset(tmp_path / "Dataset008_Plain", 2, (1.0, 1.0, 1.0))
    opened = open_collection(write_collection(tmp_path, [masked, touching, plain]))
    full = compute_fingerprint(opened, workers=1, progress=False)
    fp = full["datasets"]
    # 4 of 16 planes zero; touching: 10 of 16, and plane 4 of the 5x5x5 label box in each of 2 cases
    assert fp["Dataset006_Masked"]["outside_image"] == {"share_median": 0.25, "share_max": 0.25, "label_voxels": 0}
    assert fp["Dataset007_Touching"]["outside_image"]["label_voxels"] == 2 * 25
    assert fp["Dataset008_Plain"]["outside_image"]["share_max"] == 0
    rules = make_plans(full, opened)["postprocessing"]
    assert rules["Dataset006_Masked"]["background_outside_image"] is True
    assert "25 %" in rules["Dataset006_Masked"]["reason"]
    assert rules["Dataset007_Touching"]["background_outside_image"] is False
    assert "50 labelled voxel(s)" in rules["Dataset007_Touching"]["reason"]
    assert rules["Dataset008_Plain"]["background_outside_image"] is False
    assert "no case has zero voxels" in rules["Dataset008_Plain"]["reason"]
