"""The synthetic partial-label collection: valid, deterministic, partial, overlapping, and not solvable by a
threshold."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mosaicseg.config import load_collection
from mosaicseg.data import synthetic
from mosaicseg.data.collection import OpenCollection, open_collection
from mosaicseg.data.io import read_image
from mosaicseg.data.manifest import read_case
from mosaicseg.data.splits import patient_of
from mosaicseg.errors import MosaicSegError

EXPECTED_TASKS = {
    3: [
        "Dataset901_SynthCT/Liver",
        "Dataset901_SynthCT/Tumor",
        "Dataset902_SynthMR/Liver",
        "Dataset902_SynthMR/Kidney",
        "Dataset903_SynthMulti/Edema",
        "Dataset903_SynthMulti/Lesion",
    ],
    2: [
        "Dataset911_SynthDerm/Lesion",
        "Dataset912_SynthCT/Liver",
        "Dataset912_SynthCT/Tumor",
        "Dataset913_SynthMR/Liver",
        "Dataset913_SynthMR/Kidney",
        "Dataset914_SynthMulti/Edema",
        "Dataset914_SynthMulti/Lesion",
    ],
}
EXPECTED_MODALITIES = {3: ("CT", "T1", "FLAIR+T1c"), 2: ("RGB", "CT", "T1", "FLAIR+T1c")}


def _spec(dim: int, short: str) -> synthetic._Spec:
    return next(s for s in synthetic._SPECS[dim] if s.short == short)


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def generated(request, tmp_path_factory) -> tuple[int, Path, OpenCollection]:
    """The default collection (default case count, seed 0), generated once per dimensionality."""
    dim = request.param
    path = synthetic.generate_collection(tmp_path_factory.mktemp(f"synth{dim}d"), dim=dim, seed=0)
    return dim, path, open_collection(path)


@pytest.fixture(scope="module")
def cases(generated) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    _, _, oc = generated
    return {m.name: [read_case(c)[:2] for c in m.cases] for m in oc.manifests}


def test_collection_opens_strictly_with_expected_tasks(generated):
    dim, path, oc = generated
    assert path.name == "collection.yaml"
    assert [m.name for m in oc.manifests] == list(synthetic.SYNTHETIC_DATASETS[dim])
    v = oc.vocabulary
    # the CT's Liver (with lesion) and the MR's Liver (without) keep two tasks: nothing declares them shared
    assert [t.name for t in v.tasks] == EXPECTED_TASKS[dim]
    assert v.modalities == EXPECTED_MODALITIES[dim]
    assert all(len(m.cases) == synthetic.DEFAULT_CASES for m in oc.manifests)
    config = load_collection(path)
    assert config.synthetic is not None and (config.synthetic.dim, config.synthetic.seed) == (dim, 0)
    assert config.root == path.parent.resolve()
    mr = next(d for d in config.datasets if d.name.endswith("SynthMR"))
    assert mr.patient_regex == synthetic.MR_PATIENT_REGEX
    for m in oc.manifests:
        assert "synthetic, CC0" in m.raw_json["description"]


def test_files_round_trip_to_the_rendered_arrays(generated):
    """What read_case returns is exactly what the renderer drew (so structure masks describe the files)."""
    dim, _, oc = generated
    for spec in synthetic._SPECS[dim]:
        manifest = oc.manifest(spec.folder)
        for index in (0, 1):
            case = synthetic._render_case(spec, dim, 0, index)
            image, label, geometry = read_case(manifest.cases[index])
            assert manifest.cases[index].case_id == case.case_id
            if spec.kind == "derm":
                np.testing.assert_array_equal(image, np.moveaxis(case.image, -1, 0))
                np.testing.assert_array_equal(label, case.label)
                continue
            squeeze = (lambda a: a[..., 0]) if dim == 2 else (lambda a: a)
            np.testing.assert_array_equal(image, squeeze(case.image.astype(np.float32)))
            np.testing.assert_array_equal(label, squeeze(case.label))
            assert geometry.spacing == pytest.approx(case.spacing[:dim])


def test_deterministic_per_seed(tmp_path):
    def arrays(out: Path, seed: int) -> list[np.ndarray]:
        oc = open_collection(synthetic.generate_collection(out, dim=3, seed=seed, cases_per_dataset=2))
        return [a for m in oc.manifests for c in m.cases for a in read_case(c)[:2]]

    first, again, other = arrays(tmp_path / "a", 0), arrays(tmp_path / "b", 0), arrays(tmp_path / "c", 1)
    assert len(first) == len(again) == 12
    for x, y in zip(first, again, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert any(x.shape != z.shape or not np.array_equal(x, z) for x, z in zip(first, other, strict=True))


def test_regions_overlap_and_lesion_inside_organ(generated, cases):
    dim, _, oc = generated
    name = synthetic.SYNTHETIC_DATASETS[dim][1 if dim == 2 else 0]
    v = oc.vocabulary
    liver, tumor = v.task_index(f"{name}/Liver"), v.task_index(f"{name}/Tumor")
    assert oc.manifest(name).regions_class_order == (1, 2)
    for _, label in cases[name]:
        target = v.to_target(name, label)
        assert (target[liver] & target[tumor]).sum() > 0  # one voxel, two tasks
        assert not (target[tumor] & ~target[liver]).any()  # the lesion lies inside the organ


def test_ignore_label_and_patients(generated, cases):
    dim, path, oc = generated
    name = synthetic.SYNTHETIC_DATASETS[dim][2 if dim == 2 else 1]
    v = oc.vocabulary
    assert oc.manifest(name).ignore_value == 3
    ignored = [v.ignore_mask(name, label).sum() for _, label in cases[name]]
    assert sum(n > 0 for n in ignored) >= 2 and min(ignored) == 0  # some cases carry it, not every case
    ids = [c.case_id for c in oc.manifest(name).cases]
    regex = load_collection(path).entry(name).patient_regex
    per_patient = Counter(patient_of(c, regex) for c in ids)
    assert len(per_patient) == len(ids) // 2 and set(per_patient.values()) == {2}


def test_partial_labels_unannotated_structures_are_visible(generated):
    """Kidneys appear in the CT, lesions in the MR, yet neither dataset labels them there."""
    dim, _, _ = generated
    for index in range(3):
        ct = synthetic._render_case(_spec(dim, "SynthCT"), dim, 0, index)
        kidney, fat = ct.structures["kidney"], ct.structures["interior_fat"]
        assert kidney.sum() > 20
        assert (ct.label[kidney] == 0).all()
        # visible: kidney attenuation is soft tissue, far above the fat around it
        assert ct.image[0][kidney].mean() - ct.image[0][fat].mean() > 100
        mr = synthetic._render_case(_spec(dim, "SynthMR"), dim, 0, index)
        lesion = mr.structures["lesion"] & ~mr.structures.get("ignore", np.zeros_like(mr.label, dtype=bool))
        liver = mr.label == 1
        assert lesion.sum() > 10
        assert (mr.label[lesion] == 0).all()
        assert mr.image[0][lesion].mean() < 0.75 * mr.image[0][liver].mean()  # a dark spot in the liver


def test_geometry_varies(generated):
    dim, _, oc = generated
    ct, mr, multi = (oc.manifest(n) for n in synthetic.SYNTHETIC_DATASETS[dim][-3:])
    ct_geoms = [read_image(c.images[0])[1] for c in ct.cases[:4]]
    assert len({g.shape for g in ct_geoms}) > 1 and len({g.spacing for g in ct_geoms}) > 1
    assert ct_geoms[0].orientation == "RAS"  # flipped axes in the file
    if dim == 3:
        mr_geom = read_image(mr.cases[0].images[0])[1]
        assert mr_geom.spacing[2] == pytest.approx(2.5) and mr_geom.spacing[0] < 1.2  # anisotropic
        multi_geom = read_image(multi.cases[0].images[0])[1]
        assert multi_geom.orientation == "PIR" and multi_geom.file_shape != multi_geom.shape  # permuted axes
        for g in [*ct_geoms, mr_geom, multi_geom]:
            assert all(14 <= s <= 56 for s in g.shape)
    else:
        assert ct_geoms[0].file_shape[2] == 1 and ct_geoms[0].squeezed_axis == 2
        derm = oc.manifest(synthetic.SYNTHETIC_DATASETS[2][0])
        image, _ = read_image(derm.cases[0].images[0])
        assert image.shape[0] == 3 and image.dtype == np.uint8
        assert all(64 <= s <= 96 for s in image.shape[1:])


def _best_threshold_dice(images: list[np.ndarray], targets: list[np.ndarray], valid: list[np.ndarray]) -> float:
    """Mean per-case Dice of the best single threshold (any channel, either polarity), chosen with hindsight."""
    best = 0.0
    for ch in range(images[0].shape[0]):
        pooled = np.concatenate([im[ch][ok] for im, ok in zip(images, valid, strict=True)])
        thresholds = np.unique(
            np.concatenate(
                [np.quantile(pooled, np.linspace(0.005, 0.995, 50)), np.linspace(pooled.min(), pooled.max(), 50)]
            )
        )
        for sign in (1.0, -1.0):
            dice = np.zeros(len(thresholds))
            for im, tg, ok in zip(images, targets, valid, strict=True):
                x = sign * im[ch][ok]
                everything, inside = np.sort(x), np.sort(x[tg[ok]])
                # predicted positive: sign * value > sign * threshold
                n_pred = len(everything) - np.searchsorted(everything, sign * thresholds, side="right")
                n_hit = len(inside) - np.searchsorted(inside, sign * thresholds, side="right")
                dice += 2 * n_hit / np.maximum(n_pred + len(inside), 1)
            best = max(best, float(dice.max()) / len(images))
    return best


def test_no_intensity_threshold_solves_it(generated, cases):
    _, _, oc = generated
    v = oc.vocabulary
    for name, data in cases.items():
        images = [im for im, _ in data]
        valid = [~v.ignore_mask(name, label) for _, label in data]
        scores = []
        for k, _values in v.label_map[name]:
            targets = [v.to_target(name, label)[k].astype(bool) for _, label in data]
            assert all(t.any() for t in targets)  # every case shows every annotated structure
            scores.append(_best_threshold_dice(images, targets, valid))
        assert np.mean(scores) <= 0.5, (name, scores)


def test_idempotent_and_regenerates_on_change(tmp_path):
    path = synthetic.generate_collection(tmp_path, dim=2, seed=0, cases_per_dataset=3)
    folder = tmp_path / synthetic.SYNTHETIC_DATASETS[2][1]
    files = sorted(folder.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert synthetic.generate_collection(tmp_path, dim=2, seed=0, cases_per_dataset=3) == path
    assert {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))} == stamps
    # another seed and fewer cases: rewritten, stale cases removed, still a valid collection
    synthetic.generate_collection(tmp_path, dim=2, seed=5, cases_per_dataset=2)
    oc = open_collection(path)
    assert all(len(m.cases) == 2 for m in oc.manifests)
    assert "seed 5" in oc.manifests[0].raw_json["description"]
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left behind


def test_collection_file_regenerates_absent_datasets(tmp_path):
    path = synthetic.generate_collection(tmp_path / "a", dim=2, seed=0, cases_per_dataset=2)
    (tmp_path / "b").mkdir()
    shutil.copy(path, tmp_path / "b" / "collection.yaml")
    oc = open_collection(tmp_path / "b" / "collection.yaml")  # the `synthetic:` entry generates them
    assert [m.name for m in oc.manifests] == list(synthetic.SYNTHETIC_DATASETS[2])
    assert all(len(m.cases) == synthetic.DEFAULT_CASES for m in oc.manifests)


def test_without_collection_file_and_bad_arguments(tmp_path):
    out = synthetic.generate_collection(tmp_path, dim=2, seed=1, write_collection=False, cases_per_dataset=1)
    assert out == tmp_path and not (tmp_path / "collection.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(synthetic.SYNTHETIC_DATASETS[2])
    for kwargs in ({"dim": 4}, {"seed": -1}, {"cases_per_dataset": 0}):
        with pytest.raises(MosaicSegError):
            synthetic.generate_collection(tmp_path / "x", **kwargs)


def test_small_on_disk(generated):
    _, path, _ = generated
    total = sum(p.stat().st_size for p in path.parent.rglob("*") if p.is_file())
    assert total < 8 * 2**20
