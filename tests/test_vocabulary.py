"""Global task vocabulary: local labels → global tasks, label_mask, ignore mask, modalities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from mosaicseg.data.collection import open_collection
from mosaicseg.data.manifest import read_case
from mosaicseg.data.vocabulary import channel_signature
from mosaicseg.errors import MosaicSegError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def _write_dataset(root: Path, name: str, labels: dict, channels: dict, label_arrays: list[np.ndarray], **extra):
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i, lab in enumerate(label_arrays):
        for c in range(len(channels)):
            img = sitk.GetImageFromArray((lab * 10 + c + 1).astype(np.float32))
            sitk.WriteImage(img, str(folder / "imagesTr" / f"case{i}_{c:04d}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(lab.astype(np.uint8)), str(folder / "labelsTr" / f"case{i}.nii.gz"))
    meta = {"channel_names": channels, "labels": labels, "numTraining": len(label_arrays), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps({**meta, **extra}))
    return folder


@pytest.fixture
def collection(tmp_path):
    lab_a = np.zeros((4, 5, 6), dtype=np.uint8)
    lab_a[1, 1:3, 1:3] = 1  # organ without lesion
    lab_a[1, 2, 2] = 2  # lesion inside the organ
    lab_a[3, 4, 5] = 3  # ignore
    _write_dataset(
        tmp_path,
        "DatasetA",
        {"background": 0, "Organ": [1, 2], "Lesion": [2], "ignore": 3},
        {"0": "CT"},
        [lab_a],
        regions_class_order=[1, 2],
    )
    lab_b = np.zeros((4, 5, 6), dtype=np.uint8)
    lab_b[2, 0:2, 0:2] = 1
    lab_b[0, 0, 0] = 2
    _write_dataset(
        tmp_path, "DatasetB", {"background": 0, "Organ": 1, "Kidney": 2}, {"0": "FLAIR", "1": "T1c"}, [lab_b]
    )
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "datasets": [{"path": "DatasetA"}, {"path": "DatasetB", "modality": "MRpair"}],
                "shared_labels": [["DatasetA/Lesion", "DatasetB/Kidney"]],
            }
        )
    )
    return tmp_path / "c.yaml", lab_a, lab_b


def test_tasks_shared_labels_and_modalities(collection):
    path, _, _ = collection
    oc = open_collection(path)
    v = oc.vocabulary
    # A/Organ, A/Lesion (= B/Kidney, declared shared), B/Organ: same name, different task
    assert [t.name for t in v.tasks] == ["DatasetA/Organ", "DatasetA/Lesion", "DatasetB/Organ"]
    assert v.tasks[1].members == (("DatasetA", "Lesion"), ("DatasetB", "Kidney"))
    assert v.modalities == ("CT", "MRpair")
    assert v.label_mask("DatasetA").tolist() == [True, True, False]
    assert v.label_mask("DatasetB").tolist() == [False, True, True]


def test_targets_against_raw_label_files(collection):
    path, lab_a, lab_b = collection
    oc = open_collection(path)
    v = oc.vocabulary
    _, seg_a, _ = read_case(oc.manifest("DatasetA").cases[0])
    t = v.to_target("DatasetA", seg_a)
    # read_case returns (X, Y, Z); the raw arrays above are numpy (Z, Y, X)
    raw = np.transpose(lab_a)
    np.testing.assert_array_equal(t[0], np.isin(raw, [1, 2]))
    np.testing.assert_array_equal(t[1], raw == 2)
    assert t[2].sum() == 0
    assert (t[0] & t[1]).sum() == 1  # the lesion voxel is positive for both overlapping tasks
    np.testing.assert_array_equal(v.ignore_mask("DatasetA", seg_a), raw == 3)
    assert not t[:, raw == 3].any()  # ignored voxels are no task's foreground
    _, seg_b, _ = read_case(oc.manifest("DatasetB").cases[0])
    tb = v.to_target("DatasetB", seg_b)
    np.testing.assert_array_equal(tb[1], np.transpose(lab_b) == 2)
    np.testing.assert_array_equal(tb[2], np.transpose(lab_b) == 1)
    assert not v.ignore_mask("DatasetB", seg_b).any()


def test_unknown_shared_label_is_a_clear_error(collection):
    path, _, _ = collection
    data = yaml.safe_load(path.read_text())
    data["shared_labels"] = [["DatasetA/Lesion", "DatasetB/Liver"]]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MosaicSegError, match="DatasetB/Liver"):
        open_collection(path)


def test_vocabulary_serialises(collection):
    from mosaicseg.data.vocabulary import Vocabulary

    v = open_collection(collection[0]).vocabulary
    assert Vocabulary.from_dict(json.loads(json.dumps(v.to_dict()))) == v


@pytest.mark.parametrize(("names", "sig"), [(("R", "G", "B"), "RGB"), (("FLAIR", "T1c"), "FLAIR+T1c"), (("CT",), "CT")])
def test_channel_signature(names, sig):
    assert channel_signature(names) == sig


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_real_collection_vocabulary_and_label_files():
    import nibabel as nib

    oc = open_collection(REPO / "collections" / "shared3d.yaml")
    v = oc.vocabulary
    assert v.num_tasks == 28 == 2 + 8 + 4 + 5 + 4 + 1 + 3 + 1
    assert v.modalities == ("T1", "FLAIR+T1c", "CT", "cineMRI", "LGE")
    assert np.flatnonzero(v.label_mask("Dataset003_IXILimbic")).tolist() == [10, 11, 12, 13]
    case = oc.manifest("Dataset003_IXILimbic").cases[0]
    _, seg, _ = read_case(case)
    raw = np.asarray(nib.load(case.label).dataobj)  # independent reader, file axis order
    target = v.to_target("Dataset003_IXILimbic", seg)
    for value, task in zip([1, 2, 3, 4], [10, 11, 12, 13], strict=True):
        assert target[task].sum() == (raw == value).sum() > 0
    assert target[np.flatnonzero(~v.label_mask("Dataset003_IXILimbic"))].sum() == 0
