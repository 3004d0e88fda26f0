"""predict's clinical outputs: the merged label map, per-task thresholds, volumes, and when --dataset is needed."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mosaicseg.data.io import Geometry
from mosaicseg.data.vocabulary import Task, Vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.outputs import (
    StatisticsTable,
    export_case,
    merged_dataset_json,
    merged_label_names,
    parse_thresholds,
    task_thresholds,
    write_dataset_json,
)
from mosaicseg.inference.postprocess import labels_from_probabilities, restore_probabilities
from mosaicseg.inference.predictor import Predictor

CT, MR, MULTI = "Dataset901_SynthCT", "Dataset902_SynthMR", "Dataset903_SynthMulti"


def _vocabulary(shared_liver: bool = False) -> Vocabulary:
    """A: Liver, Tumor; B: Liver, Kidney (B/Liver one task with A/Liver when ``shared_liver``); C: Lesion."""
    if shared_liver:
        tasks = [(("A", "Liver"), ("B", "Liver")), (("A", "Tumor"),), (("B", "Kidney"),), (("C", "Lesion"),)]
        label_map = {"A": ((0, (1,)), (1, (2,))), "B": ((0, (1,)), (2, (2,))), "C": ((3, (1,)),)}
    else:
        tasks = [(("A", "Liver"),), (("A", "Tumor"),), (("B", "Liver"),), (("B", "Kidney"),), (("C", "Lesion"),)]
        label_map = {"A": ((0, (1,)), (1, (2,))), "B": ((2, (1,)), (3, (2,))), "C": ((4, (1,)),)}
    return Vocabulary(
        datasets=("A", "B", "C"),
        tasks=tuple(Task(i, f"{m[0][0]}/{m[0][1]}", m) for i, m in enumerate(tasks)),
        modalities=("CT", "T1"),
        dataset_modality={"A": "CT", "B": "CT", "C": "T1"},
        label_map=label_map,
    )


def _plan(spacing: list[float], mean: float = 10.0, reason: str = "CT") -> dict:
    norm = {"channel": "CT", "scheme": "ct", "clip": [-100.0, 200.0], "mean": mean, "std": 5.0, "reason": reason}
    return {"target_spacing": spacing, "separate_axis": None, "image_order": 3, "normalization": [norm]}


def _predictor(vocabulary: Vocabulary, plans: dict) -> Predictor:
    """A predictor without models: enough for the choices made before any network runs."""
    return Predictor([], vocabulary, {"datasets": plans}, [8, 8], torch.device("cpu"))


def test_merged_names_prefix_the_dataset_only_where_two_asked_tasks_share_a_label_name():
    v = _vocabulary()
    assert merged_label_names(v, [0, 1, 2, 3, 4]) == ["A/Liver", "Tumor", "B/Liver", "Kidney", "Lesion"]
    assert merged_label_names(v, [1, 2]) == ["Tumor", "Liver"]  # one Liver asked: no prefix
    # a declared shared task is one task with one name
    assert merged_label_names(_vocabulary(shared_liver=True), [0, 1, 2, 3]) == ["Liver", "Tumor", "Kidney", "Lesion"]


def test_merged_dataset_json_is_kept_when_equal_and_protected_when_it_differs(tmp_path):
    about = merged_dataset_json(["Liver", "Tumor"], ".nii.gz", ["CT"], ["A/Liver", "A/Tumor"], [0.5, 0.3])
    assert about["labels"] == {"background": 0, "Liver": 1, "Tumor": 2} and about["channel_names"] == {"0": "CT"}
    path = write_dataset_json(tmp_path / "dataset.json", about, overwrite=False)
    stamp = path.stat().st_mtime_ns
    assert write_dataset_json(path, about, overwrite=False).stat().st_mtime_ns == stamp  # resume: untouched
    other = merged_dataset_json(["Liver", "Tumor"], ".nii.gz", ["CT"], ["A/Liver", "A/Tumor"], [0.5, 0.4])
    with pytest.raises(MosaicSegError, match=r"another label numbering.*Fix:"):
        write_dataset_json(path, other, overwrite=False)
    assert json.loads(write_dataset_json(path, other, overwrite=True).read_text()) == other


def _identity_meta(shape: tuple[int, ...]) -> dict:
    """Meta of a case whose preprocessed grid is its original grid (no crop, no resampling)."""
    return {
        "spacing_target": [1.0] * len(shape),
        "spacing_original": [1.0] * len(shape),
        "shape_cropped": list(shape),
        "shape_original": list(shape),
        "bbox": [[0, s] for s in shape],
        "separate_axis": None,
    }


# three tasks' probabilities on a 2 × 3 image: the merged map's highest-probability rule by hand
PROB = np.array(
    [
        [[0.90, 0.60, 0.20], [0.10, 0.70, 0.45]],
        [[0.80, 0.70, 0.30], [0.20, 0.60, 0.10]],
        [[0.95, 0.10, 0.10], [0.55, 0.65, 0.40]],
    ],
    dtype=np.float32,
)


def test_merged_map_takes_the_most_probable_task_above_its_threshold():
    meta = _identity_meta((2, 3))
    maps = export_case(PROB, meta, {}, {}, [0.5, 0.5, 0.5], merged=True)
    np.testing.assert_array_equal(maps.merged, [[3, 2, 0], [3, 1, 0]])
    assert maps.voxels == [3, 3, 3] and maps.labels == {}
    # task 3 needs 0.96 (drops out everywhere), task 1 only 0.4 (gains the 0.45 voxel)
    maps = export_case(PROB, meta, {}, {}, [0.4, 0.5, 0.96], merged=True, keep_masks=True)
    np.testing.assert_array_equal(maps.merged, [[1, 2, 0], [0, 1, 1]])
    assert maps.voxels == [4, 3, 0]
    np.testing.assert_array_equal(maps.masks[0], [[True, True, False], [False, True, True]])


@pytest.mark.parametrize("regions", [False, True])
def test_dataset_label_maps_with_default_thresholds_equal_the_whole_volume_label_rule(regions):
    rng = np.random.default_rng(0)
    prob = rng.uniform(0, 1, size=(3, 7, 9, 5)).astype(np.float32)
    meta = {
        "spacing_target": [2.0, 2.0, 3.0],
        "spacing_original": [1.0, 1.0, 1.5],
        "shape_cropped": [14, 18, 10],
        "shape_original": [16, 20, 11],
        "bbox": [[1, 15], [2, 20], [0, 10]],
        "separate_axis": None,
    }
    # two datasets' tasks in one prediction: D's rows are tasks 0 and 2, E's is task 1
    values = [(1, 2), (2,)] if regions else [(4,), (7,)]
    order = [1, 2] if regions else None
    groups = {"D": [(0, 0, "a", values[0]), (2, 1, "b", values[1])], "E": [(1, 0, "c", (1,))]}
    maps = export_case(prob, meta, groups, {"D": order, "E": None}, [0.5] * 3, largest_component=True)
    # the whole-volume rule: every task restored at once, then labelled
    restored = restore_probabilities(prob, meta)
    want = labels_from_probabilities(restored[[0, 2]], values, order, True)
    np.testing.assert_array_equal(maps.labels["D"], want)
    np.testing.assert_array_equal(maps.labels["E"], labels_from_probabilities(restored[[1]], [(1,)], None, True))
    assert maps.merged is None and maps.masks is None


def test_threshold_items_are_parsed_and_checked_with_helpful_errors():
    assert parse_thresholds(["Liver=0.4", "B/Kidney = 0.25"]) == [("Liver", 0.4), ("B/Kidney", 0.25)]
    for bad, why in [
        ("Liver", "expected TASK=VALUE"),
        ("=0.3", "expected TASK=VALUE"),
        ("Liver=1", "strictly between 0 and 1"),
        ("Liver=0", "strictly between 0 and 1"),
        ("Liver=nan", "strictly between 0 and 1"),
        ("Liver=high", "strictly between 0 and 1"),
    ]:
        with pytest.raises(MosaicSegError, match=why) as err:
            parse_thresholds([bad])
        assert "Fix:" in str(err.value)
    p = _predictor(_vocabulary(), {d: _plan([1.0, 1.0]) for d in "ABC"})
    asked = p.resolve_tasks("A", None)  # A/Liver, A/Tumor
    resolve = lambda name: p.resolve_tasks("A", [name])[0]  # noqa: E731 - as predict_files resolves them
    assert task_thresholds(["Tumor=0.3"], asked, resolve) == [0.5, 0.3]
    assert task_thresholds(["A/Liver=0.7", "Liver=0.7"], asked, resolve) == [0.7, 0.5]
    with pytest.raises(MosaicSegError, match=r"Tumour=0\.3: unknown task 'A/Tumour'"):
        task_thresholds(["Tumour=0.3"], asked, resolve)
    with pytest.raises(MosaicSegError, match="not among the predicted tasks"):
        task_thresholds(["B/Kidney=0.3"], asked, resolve)
    with pytest.raises(MosaicSegError, match=r"already has threshold 0\.7"):
        task_thresholds(["Liver=0.7", "A/Liver=0.6"], asked, resolve)


def test_dataset_is_needed_only_where_the_asked_datasets_preprocess_differently():
    plans = {"A": _plan([1.0, 1.0], reason="one text"), "B": _plan([1.0, 1.0], reason="other"), "C": _plan([1.0, 1.0])}
    p = _predictor(_vocabulary(), plans)
    every = p.resolve_tasks(None, ["all"])
    ab = p.resolve_tasks(None, ["A/Tumor", "B/Kidney"])
    assert p.preprocessing_dataset(None, ab) == "A"  # same plan and modality: either preprocesses alike
    with pytest.raises(MosaicSegError, match="--dataset"):
        p.preprocessing_dataset(None, every)  # C is T1
    plans["B"] = _plan([1.0, 1.0], mean=11.0)  # other CT statistics: other normalisation
    with pytest.raises(MosaicSegError, match="different preprocessing"):
        _predictor(_vocabulary(), plans).preprocessing_dataset(None, ab)
    plans["B"] = _plan([1.0, 2.0])  # other target spacing
    with pytest.raises(MosaicSegError, match="--dataset"):
        _predictor(_vocabulary(), plans).preprocessing_dataset(None, ab)
    # a bare label name needs no --dataset where only one dataset has it
    assert p.resolve_tasks(None, ["Kidney", "Tumor"]) == [1, 3]
    with pytest.raises(MosaicSegError, match=r"'Liver' is ambiguous.*A/Liver.*B/Liver"):
        p.resolve_tasks(None, ["Liver"])


def _geometry(spacing: tuple[float, ...], file_ndim: int = 3) -> Geometry:
    shape = (4, 5, 6)[:file_ndim]
    direction = tuple(np.eye(file_ndim).ravel().tolist())
    return Geometry(file_ndim, shape, spacing, (0.0,) * file_ndim, direction, "LPS"[:file_ndim], shape, spacing)


def test_statistics_are_voxel_counts_times_the_voxel_volume_and_resume_with_the_folder(tmp_path):
    table = StatisticsTable(tmp_path, ["A/Liver", "A/Tumor"], [0.5, 0.3])
    table.add("case1", [10, 0], _geometry((0.5, 2.0, 3.0)))  # 3 mm³ voxels
    table.add("photo", [7, 2], _geometry((0.25, 0.5), file_ndim=2))  # 2D: areas of 0.125 mm² pixels
    table.write()
    rows = list(csv.DictReader((tmp_path / "statistics.csv").open()))
    assert rows[0] == {"case_id": "case1", "task": "A/Liver", "voxels": "10", "volume_ml": "0.03", "area_mm2": ""}
    assert rows[1]["voxels"] == "0" and float(rows[1]["volume_ml"]) == 0.0
    assert rows[2] == {"case_id": "photo", "task": "A/Liver", "voxels": "7", "volume_ml": "", "area_mm2": "0.875"}
    data = json.loads((tmp_path / "statistics.json").read_text())
    assert data["thresholds"] == {"A/Liver": 0.5, "A/Tumor": 0.3}
    assert data["cases"]["case1"]["voxel_volume_mm3"] == 3.0
    assert data["cases"]["case1"]["tasks"]["A/Liver"] == {"voxels": 10, "volume_ml": 0.03, "area_mm2": None}
    # a resumed run keeps a skipped case's rows, unless they were made for other thresholds
    again = StatisticsTable(tmp_path, ["A/Liver", "A/Tumor"], [0.5, 0.3])
    assert again.keep("case1") and not again.keep("case2")
    assert not StatisticsTable(tmp_path, ["A/Liver", "A/Tumor"], [0.5, 0.5]).keep("case1")
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary files left


# ------------------------------------------------------------------------------------------ with a tiny model
@pytest.fixture(scope="module")
def run_3d(tiny_run_3d):
    return tiny_run_3d


def _read(path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def test_predict_merged_statistics_and_thresholds_on_the_command_line(run_3d, tiny_workdir_3d, tmp_path):
    from typer.testing import CliRunner

    from mosaicseg.cli import app
    from mosaicseg.evaluation.report import load_label_map

    image = sorted((tiny_workdir_3d.parent / "data" / CT / "imagesTr").glob("*_0000.nii.gz"))[0]
    case = image.name[: -len("_0000.nii.gz")]
    base = ["predict", "-m", str(run_3d), "-i", str(image), "--dataset", CT, "--tasks", "all"]
    out = tmp_path / "merged"
    extra = ["--merged", "--statistics", "--save-probabilities", "--precision", "fp32"]
    result = CliRunner().invoke(app, [*base, "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    names = [f"{CT}/Liver", "Tumor", f"{MR}/Liver", "Kidney", "Edema", "Lesion"]
    about = json.loads((out / "dataset.json").read_text())
    assert about["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}
    assert load_label_map(out / "dataset.json") is not None  # evaluate --pred-dataset-json reads it
    merged, merged_image = _read(out / f"{case}.nii.gz")
    source = sitk.ReadImage(str(image))
    assert merged_image.GetSize() == source.GetSize() and merged_image.GetOrigin() == source.GetOrigin()
    assert merged_image.GetDirection() == source.GetDirection() and merged_image.GetSpacing() == source.GetSpacing()
    probs = np.stack([_read(out / f"{case}_prob_{n.replace('/', '_')}.nii.gz")[0] for n in names])
    above = probs > 0.5
    want = np.where(above.any(0), np.argmax(np.where(above, probs, -1.0), axis=0) + 1, 0)
    np.testing.assert_array_equal(merged, want)
    voxel_mm3 = float(np.prod(source.GetSpacing()))
    stats = json.loads((out / "statistics.json").read_text())["cases"][case]["tasks"]
    full_names = [f"{CT}/Liver", f"{CT}/Tumor", f"{MR}/Liver", f"{MR}/Kidney", f"{MULTI}/Edema", f"{MULTI}/Lesion"]
    assert list(stats) == full_names
    for t, name in enumerate(full_names):
        assert stats[name]["voxels"] == int(above[t].sum())
        assert stats[name]["volume_ml"] == pytest.approx(above[t].sum() * voxel_mm3 / 1000, rel=1e-12)
    rows = list(csv.DictReader((out / "statistics.csv").open()))
    assert [(r["case_id"], r["task"], int(r["voxels"])) for r in rows] == [
        (case, n, stats[n]["voxels"]) for n in full_names
    ]
    # a threshold at the median of a task's probabilities halves its mask: per-dataset maps and volumes follow it
    tumor = probs[1]
    cut = float(np.quantile(tumor, 0.5))
    assert 0 < cut < 1
    out2 = tmp_path / "thresholds"
    args = [*base, "-o", str(out2), "--statistics", "--save-probabilities", "--precision", "fp32"]
    result = CliRunner().invoke(app, [*args, "--threshold", f"Tumor={cut}"])
    assert result.exit_code == 0, result.output
    stats2 = json.loads((out2 / "statistics.json").read_text())["cases"][case]["tasks"]
    tumor2 = _read(out2 / CT / f"{case}_prob_Tumor.nii.gz")[0]
    # the same network output, only the threshold differs; in float32 on the CPU one process may run a tile through
    # a frozen graph and the other eagerly (the choice is timed), which reorders float sums: equal to ~1e-6
    np.testing.assert_allclose(tumor2, tumor, rtol=0, atol=1e-5)
    assert stats2["Dataset901_SynthCT/Tumor"]["voxels"] == int((tumor2 > cut).sum()) != int((tumor2 > 0.5).sum())
    assert stats2["Dataset902_SynthMR/Kidney"]["voxels"] == pytest.approx(
        stats["Dataset902_SynthMR/Kidney"]["voxels"], abs=2
    )
    ct_map = _read(out2 / CT / f"{case}.nii.gz")[0]  # CT: Liver = {1, 2} painted first, Tumor = 2 on top
    np.testing.assert_array_equal(ct_map == 2, tumor2 > cut)
    # bad thresholds fail before any prediction, naming the option and the fix
    for bad, why in [("Tumor=1.5", "strictly between 0 and 1"), ("Spleen=0.3", "unknown task")]:
        result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "bad"), "--threshold", bad])
        assert result.exit_code == 2 and why in result.output and "Fix:" in result.output
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").glob("*.nii.gz"))


def test_background_outside_the_imaged_region(run_3d, tiny_workdir_3d, tmp_path):
    from typer.testing import CliRunner

    from mosaicseg.cli import app

    source = sorted((tiny_workdir_3d.parent / "data" / CT / "imagesTr").glob("*_0000.nii.gz"))[0]
    array, image = _read(source)
    # a masked corner: zero, connected to the border, and inside the crop box (the rest of its planes is imaged),
    # so that cropping to the non-zero box (which zeroes everything beyond the box anyway) does not remove it
    array[:2, :5] = 0
    masked = sitk.GetImageFromArray(array)
    masked.CopyInformation(image)
    path = tmp_path / "in" / "masked_0000.nii.gz"
    path.parent.mkdir()
    sitk.WriteImage(masked, str(path))
    outside = int(array[:2, :5].size)
    # eager (no frozen graphs): the two calls compared below run the same kernels
    predictor = Predictor.from_checkpoint(run_3d, precision="fp32", jit=False)
    # a threshold near 0 makes every imaged voxel foreground: only the rule can leave voxels out
    cut = ["Tumor=1e-6", "Liver=1e-6"]
    off = predictor.predict(path, dataset=CT, thresholds=cut, background_outside="off")
    on = predictor.predict(path, dataset=CT, thresholds=cut, background_outside="on")
    for task in off.masks:
        assert off.masks[task].all() and (off.probabilities[task] > 0).all()
        assert int((~on.masks[task]).sum()) == outside and int((on.probabilities[task] == 0).sum()) == outside
        np.testing.assert_array_equal(on.probabilities[task][on.masks[task]], off.probabilities[task][on.masks[task]])
    # auto follows the plans' decision for the dataset; runs planned before the rule existed leave it off
    planned = predictor.plans["postprocessing"]
    assert predictor.background_outside(CT, "auto") is planned[CT]["background_outside_image"]
    predictor.plans = {k: v for k, v in predictor.plans.items() if k != "postprocessing"}
    assert not predictor.background_outside(CT, "auto")
    predictor.plans = {**predictor.plans, "postprocessing": {CT: {"background_outside_image": True}}}
    assert predictor.background_outside(CT, "auto") and not predictor.background_outside(MR, "auto")
    report = predictor.predict_files([path], tmp_path / "files", dataset=CT, thresholds=cut, progress=False)
    assert report["background_outside_image"] is True
    labels = _read(tmp_path / "files" / "masked.nii.gz")[0]
    assert int((labels == 0).sum()) == outside and not labels[:2, :5].any()
    with pytest.raises(MosaicSegError, match="unknown"):
        predictor.background_outside(CT, "yes")
    bad = ["predict", "-m", str(run_3d), "-i", str(path), "-o", str(tmp_path / "bad"), "--background-outside", "yes"]
    result = CliRunner().invoke(app, bad)
    assert result.exit_code == 2 and "--background-outside" in result.output and "Fix:" in result.output
    assert not (tmp_path / "bad").exists()


def test_largest_component_is_kept_per_task_as_asked():
    # two tasks with the same two blobs (3 voxels and 1 voxel): only task 0 keeps just its largest
    one = np.array([[0.9, 0.9, 0.9, 0.1, 0.9]], dtype=np.float32)
    prob = np.stack([one, one])
    maps = export_case(
        prob, _identity_meta((1, 5)), {}, {}, [0.5, 0.5], largest_component=[True, False], keep_masks=True
    )
    np.testing.assert_array_equal(maps.masks[0], [[True, True, True, False, False]])
    np.testing.assert_array_equal(maps.masks[1], [[True, True, True, False, True]])
    assert maps.voxels == [3, 4]
    with pytest.raises(ValueError, match="1 largest-component choices for 2 tasks"):
        export_case(prob, _identity_meta((1, 5)), {}, {}, [0.5, 0.5], largest_component=[True])


def test_the_largest_component_decision_by_hand():
    from mosaicseg.inference.postprocess import decide_largest_component, ensemble_largest_component

    plain = {"A": 0.70, "B": 0.80, "C": 0.50, "D": float("nan")}
    kept = {"A": 0.75, "B": 0.60, "C": 0.50, "D": float("nan")}
    decided = decide_largest_component(plain, kept, {"A": 3, "B": 3, "C": 2, "D": 2})
    # only a rise counts: an equal Dice (C) or no evidence (D: nothing to find, nothing found) keeps the mask whole
    assert {n: d["largest_component"] for n, d in decided.items()} == {"A": True, "B": False, "C": False, "D": False}
    assert decided["A"] == {"largest_component": True, "dice": 0.70, "dice_largest_component": 0.75, "cases": 3}
    other = decide_largest_component({"A": 0.7, "B": 0.5}, {"A": 0.6, "B": 0.9}, {"A": 3, "B": 3})
    # an ensemble filters a task only where every fold decided so; a fold without decisions turns them all off
    assert ensemble_largest_component([decided]) == {"A": True, "B": False, "C": False, "D": False}
    assert ensemble_largest_component([decided, other]) == {"A": False, "B": False}
    assert ensemble_largest_component([decided, None]) == {}
