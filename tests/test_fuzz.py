"""Fuzzing the parsers that read user files: ``dataset.json``, ``collection.yaml`` and image headers.

Whatever the bytes, the outcome is a parsed object or a clean user error (:class:`MosaicSegError` or a
reported :class:`Problem`) — never another exception. Example counts and deadlines bound the time.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosaicseg.config import load_collection, parse_collection
from mosaicseg.data.io import read_header, read_image
from mosaicseg.data.manifest import scan_dataset
from mosaicseg.errors import MosaicSegError

# the deadline catches a reader that hangs; 10 s, not 2: a first call that loads an image plugin took 3 s
FUZZ = settings(
    max_examples=150, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["CT", "T1", "background", ".nii.gz", ".png", "../x", "0", "1", "imagesTr/a_0000.nii.gz"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
KEYS = ["channel_names", "modality", "labels", "numTraining", "file_ending", "dataset", "regions_class_order", "name"]
dataset_jsons = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=len(KEYS)),
    st.fixed_dictionaries(
        {
            "channel_names": st.one_of(json_values, st.just({"0": "CT"})),
            "labels": st.one_of(
                json_values, st.just({"background": 0, "a": 1}), st.just({"background": 0, "r": [1, 2]})
            ),
            "numTraining": st.one_of(json_values, st.just(2)),
            "file_ending": st.one_of(json_values, st.just(".nii.gz")),
        },
        optional={"dataset": json_values, "regions_class_order": json_values},
    ),
    json_values,
)


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import DatasetFactory  # tests/ is on sys.path under pytest's default import mode

    return DatasetFactory(tmp_path_factory.mktemp("fuzz"))("Dataset001_Fuzz", cases=2)


@FUZZ
@given(data=dataset_jsons)
def test_dataset_json_fuzz(clean_dataset: Path, data) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "Dataset001_Fuzz"
        shutil.copytree(clean_dataset, folder)
        (folder / "dataset.json").write_text(json.dumps(data, allow_nan=True))
        manifest, problems = scan_dataset(folder)
        assert manifest is not None or any(p.severity == "error" for p in problems)
        for p in problems:
            assert p.message and p.path


@FUZZ
@given(raw=st.binary(max_size=200))
def test_dataset_json_random_bytes(clean_dataset: Path, raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "Dataset001_Fuzz"
        shutil.copytree(clean_dataset, folder)
        (folder / "dataset.json").write_bytes(raw)
        manifest, problems = scan_dataset(folder)
        assert manifest is not None or problems


COLLECTION_KEYS = ["name", "root", "folds", "seed", "sampling", "datasets", "shared_labels", "synthetic", "weights"]
collections = st.one_of(
    st.dictionaries(st.sampled_from(COLLECTION_KEYS), json_values, max_size=6),
    st.fixed_dictionaries(
        {
            "name": st.one_of(st.text(max_size=6), json_values),
            "datasets": st.lists(
                st.one_of(
                    json_values,
                    st.dictionaries(
                        st.sampled_from(["path", "modality", "weight", "patient_regex", "name", "bogus"]),
                        st.one_of(json_values, st.sampled_from(["(", "p(\\d+)", "Dataset001_X"])),
                        max_size=5,
                    ),
                ),
                max_size=3,
            ),
        },
        optional={"folds": json_values, "sampling": json_values, "shared_labels": json_values},
    ),
    json_values,
)


@FUZZ
@given(data=collections)
def test_collection_fuzz(data) -> None:
    try:
        parse_collection(data, source=Path("collection.yaml"), base=Path("/nonexistent"))
    except MosaicSegError as exc:
        assert "collection" in str(exc) or "Fix" in str(exc)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_collection_yaml_text_fuzz(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "collection.yaml"
        path.write_text(text, encoding="latin-1", errors="replace")
        with contextlib.suppress(MosaicSegError):
            load_collection(path)


@pytest.fixture(scope="module")
def nifti_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("hdr") / "x.nii.gz"
    image = sitk.GetImageFromArray(np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8))
    sitk.WriteImage(image, str(path))
    return path.read_bytes()


def _read_cleanly(data: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        for fn in (read_header, read_image):
            try:
                fn(path)
            except MosaicSegError as exc:
                assert name in str(exc)


@FUZZ
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6))
def test_nifti_header_fuzz(nifti_bytes: bytes, cut: int, flips) -> None:
    raw = bytearray(gzip.decompress(nifti_bytes))
    for pos, value in flips:  # corrupt the 348-byte header and the first voxels
        raw[pos % len(raw)] = value
    data = bytes(raw[: max(0, len(raw) - cut)])
    _read_cleanly(data, "x.nii")
    _read_cleanly(gzip.compress(data), "x.nii.gz")


@FUZZ
@given(cut=st.integers(1, 400))
def test_truncated_gzip_fuzz(nifti_bytes: bytes, cut: int) -> None:
    _read_cleanly(nifti_bytes[: max(0, len(nifti_bytes) - cut)], "x.nii.gz")


@FUZZ
@given(raw=st.binary(max_size=600), ending=st.sampled_from(["x.nii.gz", "x.nii", "x.nrrd", "x.mha", "x.png"]))
def test_random_bytes_as_images(raw: bytes, ending: str) -> None:
    _read_cleanly(raw, ending)


def test_yaml_module_is_the_safe_loader() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "collection.yaml"
        path.write_text("!!python/object/apply:os.system ['touch pwned']\n")
        with pytest.raises(MosaicSegError):
            load_collection(path)
        assert not (Path.cwd() / "pwned").exists()
    assert yaml.safe_load("a: 1") == {"a": 1}
