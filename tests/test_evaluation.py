"""Evaluation: hand-computed Dice/IoU/HD95/NSD, empty-mask conventions, regions, ignore voxels, label mapping
across datasets, summary.json/metrics.csv contents and the user errors of ``evaluate``."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from mosaicseg.errors import MosaicSegError
from mosaicseg.evaluation.metrics import case_metrics, dice_from_counts, region_mask
from mosaicseg.evaluation.report import (
    evaluate_folders,
    format_table,
    label_pairs,
    load_label_map,
    parse_mapping,
    summarise,
)

SPACING = (0.7, 0.9, 1.5)  # (x, y, z) in mm: anisotropic, so a swapped axis changes every distance


def write_label(
    path: Path, array_zyx: np.ndarray, spacing: tuple[float, ...] = SPACING, origin: tuple[float, ...] | None = None
) -> Path:
    """``array_zyx`` in numpy (Z, Y, X) order, as SimpleITK writes it; read_image returns it as (X, Y, Z)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx.astype(np.uint8)))
    image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def write_json(folder: Path, labels: dict[str, Any], **extra: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz", **extra}
    (folder / "dataset.json").write_text(json.dumps(data))
    return folder / "dataset.json"


def slab(z: int, shape: tuple[int, int, int] = (8, 6, 6)) -> np.ndarray:
    """(Z, Y, X) mask with one full plane at index ``z``: every voxel is a boundary voxel."""
    a = np.zeros(shape, dtype=np.uint8)
    a[z] = 1
    return a


# ------------------------------------------------------------------------------------------- case_metrics


def test_dice_iou_of_known_overlap() -> None:
    ref = np.zeros((6, 6), bool)
    ref[0:2, 0:3] = True  # 6 voxels
    pred = np.zeros((6, 6), bool)
    pred[1:3, 1:3] = True  # 4 voxels, 2 of them in ref
    m = case_metrics(pred, ref, (1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 2 / (4 + 6))
    assert m["iou"] == pytest.approx(2 / (4 + 6 - 2))
    assert (m["n_ref"], m["n_pred"], m["status"]) == (6, 4, "ok")
    same = case_metrics(ref, ref, (1.0, 1.0))
    assert (same["dice"], same["iou"], same["hd95"], same["nsd"]) == (1.0, 1.0, 0.0, 1.0)


def test_hd95_and_nsd_honour_anisotropic_spacing() -> None:
    # (X, Y, Z) = (1, 4, 2), spacing (1, 2, 3): ref voxel at the origin; prediction one voxel away along z
    # (3 mm) and one three voxels away along y (6 mm). Directed distances: pred→ref [3, 6], ref→pred [3].
    ref = np.zeros((1, 4, 2), bool)
    ref[0, 0, 0] = True
    pred = np.zeros((1, 4, 2), bool)
    pred[0, 0, 1] = pred[0, 3, 0] = True
    m = case_metrics(pred, ref, (1.0, 2.0, 3.0), nsd_tolerance_mm=3.0)
    # HD95: larger directed 95th percentile, linear interpolation: 3 + 0.95 * (6 - 3)
    assert m["hd95"] == pytest.approx(5.85, abs=1e-5)
    assert m["nsd"] == pytest.approx(2 / 3)  # 3 mm ≤ 3 mm on both sides, 6 mm not
    assert case_metrics(pred, ref, (1.0, 2.0, 3.0), nsd_tolerance_mm=2.9)["nsd"] == 0.0
    assert m["dice"] == 0.0


def test_parallel_planes_distance_is_gap_times_spacing() -> None:
    ref, pred = slab(2).T.astype(bool), slab(5).T.astype(bool)  # (X, Y, Z), planes 3 voxels apart along z
    m = case_metrics(pred, ref, SPACING, nsd_tolerance_mm=4.5)
    assert m["hd95"] == pytest.approx(3 * SPACING[2], abs=1e-5)
    assert m["nsd"] == 1.0
    assert case_metrics(pred, ref, SPACING, nsd_tolerance_mm=4.4)["nsd"] == 0.0


def test_crop_to_union_matches_monai_on_whole_volume() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((12, 10, 7)) > 0.6
    ref = rng.random((12, 10, 7)) > 0.6
    pred[:, :, 4:] = ref[:3] = False  # box smaller than the image on some sides, touching the border on others
    spacing = [0.8, 1.3, 2.1]
    m = case_metrics(pred, ref, spacing, nsd_tolerance_mm=1.5)
    p, r = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(ref)[None, None].float()
    with warnings.catch_warnings():  # MONAI warns about its own deprecated internal argument
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(p, r, class_thresholds=[1.5], include_background=True, spacing=spacing)
    assert m["hd95"] == pytest.approx(float(hd[0, 0]), rel=1e-6)
    assert m["nsd"] == pytest.approx(float(nsd[0, 0]), rel=1e-6)


def test_empty_conventions() -> None:
    empty, blob = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    blob[1:3, 1:3, 1:3] = True
    both = case_metrics(empty, empty, (1.0, 1.0, 1.0))
    assert all(math.isnan(both[k]) for k in ("dice", "iou", "hd95", "nsd")) and both["status"] == "both_empty"
    for pred, ref, status in ((blob, empty, "ref_empty"), (empty, blob, "pred_empty")):
        m = case_metrics(pred, ref, (1.0, 1.0, 1.0))
        assert (m["dice"], m["iou"], m["nsd"], m["status"]) == (0.0, 0.0, 0.0, status)
        assert math.isnan(m["hd95"])


def test_region_mask() -> None:
    label_map = np.array([[0, 1, 2], [3, 2, 1]], dtype=np.int16)
    assert region_mask(label_map, (1, 2)).tolist() == [[False, True, True], [False, True, True]]
    assert region_mask(label_map, (3,)).sum() == 1


# ------------------------------------------------------------------------------------------- summaries


def test_summarise_class_and_dataset_averages() -> None:
    def row(dataset: str, case: str, label: str, dice: float | None, status: str = "ok") -> dict[str, Any]:
        return {
            "dataset": dataset,
            "case": case,
            "label": label,
            "dice": dice,
            "iou": dice,
            "hd95": None,
            "nsd": dice,
            "status": status,
        }

    rows = [
        row("A", "c0", "x", 1.0),
        row("A", "c1", "x", 1.0),
        row("A", "c0", "y", 0.5),
        row("A", "c1", "y", None, "both_empty"),
        row("B", "c0", "z", 0.0),
        row("B", "c1", "z", float("nan")),
    ]
    s = summarise(rows)
    y = s["datasets"]["A"]["labels"]["y"]
    assert y["dice"] == {"mean": 0.5, "n": 1, "n_nan": 1} and y["n_both_empty"] == 1 and y["n_cases"] == 2
    assert s["datasets"]["A"]["mean"]["dice"] == 0.75
    assert s["mean_class_averaged"]["dice"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert s["mean_dataset_averaged"]["dice"] == pytest.approx((0.75 + 0.0) / 2)
    assert s["mean_class_averaged"]["hd95"] is None  # nothing to average is None, not NaN
    by_case = summarise(rows, dataset_of=lambda r: r["case"])
    assert set(by_case["datasets"]) == {"c0", "c1"}
    table = format_table(s)
    assert "dataset-averaged" in table and "class-averaged" in table and "0.3750" in table


# ------------------------------------------------------------------------------------------- folders


@pytest.fixture
def organ_task(tmp_path: Path) -> dict[str, Path]:
    """Dataset with labels Organ=1, Core=2, region Whole=[1, 2] and ignore=3; two cases on SPACING."""
    json_path = write_json(
        tmp_path / "Dataset001_Organ",
        {"background": 0, "Organ": 1, "Core": 2, "Whole": [1, 2], "ignore": 3},
        regions_class_order=[1, 2],
    )
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    # case0: reference Organ = slab z=2, Core = slab z=3; prediction Organ at z=5 (3 voxels off), no Core
    write_label(gt / "case0.nii.gz", slab(2) + 2 * slab(3))
    write_label(pred / "case0.nii.gz", slab(5))
    # case1: reference Organ = half of slab z=4, other half under the ignore label; no Core anywhere.
    # The prediction covers the whole slab: the ignored half is neither a false positive nor counted.
    ref1 = slab(4)
    ref1[4, :, 3:] = 3
    write_label(gt / "case1.nii.gz", ref1)
    write_label(pred / "case1.nii.gz", slab(4))
    return {"json": json_path, "gt": gt, "pred": pred}


def test_evaluate_folders_summary_and_csv(organ_task: dict[str, Path], tmp_path: Path) -> None:
    s = evaluate_folders(organ_task["pred"], organ_task["gt"], organ_task["json"], progress=False, nsd_tolerance_mm=4.5)
    rows = {(r["case"], r["label"]): r for r in s["cases"]}
    assert len(rows) == 6 and s["n_cases"] == 2 and s["dataset"] == "Dataset001_Organ"
    # case0 Organ: disjoint planes 3 z-voxels (4.5 mm) apart
    assert rows["case0", "Organ"]["dice"] == 0.0 and rows["case0", "Organ"]["hd95"] == pytest.approx(4.5)
    assert rows["case0", "Organ"]["nsd"] == 1.0
    assert rows["case0", "Core"]["status"] == "pred_empty" and rows["case0", "Core"]["hd95"] is None
    # Whole = {1, 2}: reference slabs z=2,3 (72 voxels), prediction z=5 (36): disjoint
    assert (rows["case0", "Whole"]["n_ref"], rows["case0", "Whole"]["n_pred"]) == (72, 36)
    # case1: ignore voxels removed from prediction and reference -> perfect
    assert rows["case1", "Organ"]["dice"] == 1.0 and rows["case1", "Organ"]["n_pred"] == 18
    assert rows["case1", "Core"]["status"] == "both_empty" and rows["case1", "Core"]["dice"] is None
    core = s["datasets"]["Dataset001_Organ"]["labels"]["Core"]
    assert core["dice"] == {"mean": 0.0, "n": 1, "n_nan": 1} and core["n_both_empty"] == 1
    assert core["hd95"] == {"mean": None, "n": 0, "n_nan": 2}
    organ = s["datasets"]["Dataset001_Organ"]["labels"]["Organ"]
    assert organ["dice"]["mean"] == 0.5
    # Whole: case0 0.0; case1 the ignore voxels are outside the region and the prediction -> 1.0
    assert s["datasets"]["Dataset001_Organ"]["mean"]["dice"] == pytest.approx((0.5 + 0.0 + 0.5) / 3, abs=1e-6)
    assert s["mean_class_averaged"] == s["mean_dataset_averaged"]  # one dataset

    written = json.loads((organ_task["pred"] / "summary.json").read_text())  # strict JSON: no NaN tokens
    assert written == json.loads(json.dumps(s))
    with (organ_task["pred"] / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and table[0].keys() >= {"dataset", "case", "label", "dice", "iou", "hd95", "nsd"}
    core0 = next(r for r in table if r["case"] == "case0" and r["label"] == "Core")
    assert core0["hd95"] == "nan" and float(core0["dice"]) == 0.0

    with pytest.raises(MosaicSegError, match=r"summary\.json: exists already.*overwrite"):
        evaluate_folders(organ_task["pred"], organ_task["gt"], organ_task["json"], progress=False)
    again = evaluate_folders(
        organ_task["pred"],
        organ_task["gt"],
        organ_task["json"],
        progress=False,
        overwrite=True,
        labels=["organ"],
        output_dir=tmp_path / "out",
    )
    assert {r["label"] for r in again["cases"]} == {"Organ"} and (tmp_path / "out" / "metrics.csv").is_file()


def test_missing_prediction_and_geometry_errors(organ_task: dict[str, Path], tmp_path: Path) -> None:
    (organ_task["pred"] / "case1.nii.gz").unlink()
    with pytest.raises(MosaicSegError, match=r"no prediction for 1 of 2 reference case\(s\): case1"):
        evaluate_folders(organ_task["pred"], organ_task["gt"], organ_task["json"], progress=False)
    s = evaluate_folders(
        organ_task["pred"],
        organ_task["gt"],
        organ_task["json"],
        progress=False,
        missing_as_empty=True,
        output_dir=tmp_path / "o1",
    )
    assert s["missing_predictions"] == ["case1"]
    assert next(r for r in s["cases"] if r["case"] == "case1" and r["label"] == "Organ")["status"] == "pred_empty"

    write_label(organ_task["pred"] / "case1.nii.gz", slab(4), origin=(0.0, 0.0, 10.0))
    with pytest.raises(MosaicSegError, match=r"pred/case1\.nii\.gz: grid .* differs from the reference .*gt/case1"):
        evaluate_folders(
            organ_task["pred"], organ_task["gt"], organ_task["json"], progress=False, output_dir=tmp_path / "o2"
        )


def test_mapping_across_datasets(tmp_path: Path) -> None:
    # Reference dataset numbers the hippocampus as two parts (1, 2) plus a region; the model's dataset as 3.
    ref_json = write_json(
        tmp_path / "Dataset001_Hippo",
        {"background": 0, "Anterior": 1, "Posterior": 2, "Hippocampus": [1, 2]},
        regions_class_order=[1, 2],
    )
    pred_json = write_json(tmp_path / "Dataset003_Brain", {"background": 0, "Ventricle": 1, "Hippocampus": 3})
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    write_label(gt / "a.nii.gz", slab(2) + 2 * slab(3))
    write_label(pred / "a.nii.gz", 3 * slab(3) + slab(6))  # hippocampus half right; ventricle elsewhere
    s = evaluate_folders(
        pred, gt, ref_json, pred_dataset_json=pred_json, mapping={"Hippocampus": "Hippocampus"}, progress=False
    )
    assert [(r["label"], r["prediction_label"]) for r in s["cases"]] == [("Hippocampus", "Hippocampus")]
    assert s["cases"][0]["dice"] == pytest.approx(2 * 36 / (72 + 36), abs=1e-6)
    assert s["labels"]["Hippocampus"] == {
        "reference_values": [1, 2],
        "prediction_label": "Hippocampus",
        "prediction_values": [3],
    }
    assert s["prediction_dataset"] == "Dataset003_Brain"

    ref_map, pred_map = load_label_map(ref_json.parent), load_label_map(pred_json)
    assert [p.pred_values for p in label_pairs(ref_map, pred_map, mapping=parse_mapping(["3=Posterior"]))] == [(3,)]
    with pytest.raises(MosaicSegError, match=r"no label 'Hipocampus'.*did you mean 'Hippocampus'"):
        label_pairs(ref_map, pred_map, mapping={"Hipocampus": "Anterior"})
    with pytest.raises(MosaicSegError, match=r"has no label 'Anterior'.*--map"):
        label_pairs(ref_map, pred_map)  # different numbering without a mapping
    with pytest.raises(MosaicSegError, match="expected PRED_LABEL=REF_LABEL"):
        parse_mapping(["Hippocampus"])


def test_bad_dataset_json(tmp_path: Path) -> None:
    json_path = write_json(tmp_path / "D", {"background": 0, "a": 1})
    json_path.write_text('{"labels": {"background": 0, "a": 1}}')
    with pytest.raises(MosaicSegError, match="missing key 'file_ending'"):
        load_label_map(json_path)
    with pytest.raises(MosaicSegError, match=r"not a dataset\.json"):
        load_label_map(tmp_path / "other.json")


def test_workers_give_the_same_rows(organ_task: dict[str, Path], tmp_path: Path) -> None:
    serial = evaluate_folders(
        organ_task["pred"], organ_task["gt"], organ_task["json"], progress=False, output_dir=tmp_path / "serial"
    )
    parallel = evaluate_folders(
        organ_task["pred"],
        organ_task["gt"],
        organ_task["json"],
        progress=False,
        output_dir=tmp_path / "parallel",
        workers=2,
    )
    assert parallel["cases"] == serial["cases"]


def test_dice_from_counts_by_hand():
    assert dice_from_counts(3, 1, 2) == 6 / 9
    assert dice_from_counts(0, 4, 0) == 0.0
    assert math.isnan(dice_from_counts(0, 0, 0))  # both empty: nnU-Net's NaN, excluded from means
