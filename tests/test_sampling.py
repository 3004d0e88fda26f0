"""Case sampler frequencies (MultiTalent's 1/√n), patch sampling and sample determinism."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from mosaicseg.config import parse_collection
from mosaicseg.data.augment import AugmentConfig, sample_patch
from mosaicseg.data.manifest import DatasetManifest
from mosaicseg.data.sampling import CaseSampler, PatchDataset, collate
from mosaicseg.data.vocabulary import build_vocabulary
from mosaicseg.errors import MosaicSegError

SIZES = {"A": 100, "B": 25, "C": 4}
CASES = [(d, f"{d}{i:03d}") for d, n in SIZES.items() for i in range(n)]


def test_inv_sqrt_probabilities_are_exact():
    s = CaseSampler.build(CASES, "inv_sqrt")
    for (d, _), p in zip(s.cases, s.probabilities, strict=True):
        norm = sum(np.sqrt(n) for n in SIZES.values())
        assert p == pytest.approx(1 / np.sqrt(SIZES[d]) / norm)
    ds = s.dataset_probabilities()
    assert ds["A"] == pytest.approx(10 / 17) and ds["B"] == pytest.approx(5 / 17) and ds["C"] == pytest.approx(2 / 17)


@pytest.mark.parametrize(
    ("scheme", "weights", "expected"),
    [
        ("inv_sqrt", None, {d: np.sqrt(n) for d, n in SIZES.items()}),
        ("uniform", None, dict(SIZES)),
        ("weights", {"A": 1.0, "B": 1.0, "C": 2.0}, {"A": 1.0, "B": 1.0, "C": 2.0}),
    ],
)
def test_empirical_frequencies_match(scheme, weights, expected):
    s = CaseSampler.build(CASES, scheme, weights)
    n = 20_000
    index = {c: i for i, c in enumerate(s.cases)}
    # the code path the training dataset uses: one generator per sample index
    draws = np.array([index[s.draw(np.random.default_rng((11, i)))] for i in range(n)])
    total = sum(expected.values())
    per_dataset = {d: 0 for d in SIZES}
    for i in draws:
        per_dataset[s.cases[i][0]] += 1
    for d in SIZES:
        assert per_dataset[d] / n == pytest.approx(expected[d] / total, abs=0.012)
    # per case: every case of dataset d is drawn with probability expected[d] / total / n_d
    counts = np.bincount(draws, minlength=len(s.cases)) / n
    for i, (d, _) in enumerate(s.cases):
        p = expected[d] / total / SIZES[d]
        assert abs(counts[i] - p) < 5 * np.sqrt(p / n) + 1e-4


def test_draw_uses_the_generator():
    s = CaseSampler.build(CASES)
    a = [s.draw(np.random.default_rng((7, i))) for i in range(50)]
    b = [s.draw(np.random.default_rng((7, i))) for i in range(50)]
    assert a == b and len(set(a)) > 10


def test_weights_must_cover_every_dataset():
    with pytest.raises(MosaicSegError, match="no weight"):
        CaseSampler.build(CASES, "weights", {"A": 1.0})


@dataclass
class _Case:
    image: np.ndarray
    seg: np.ndarray
    fg_locations: dict[str, np.ndarray]


def _vocab():
    man_a = DatasetManifest("A", None, ("T1",), {"organ": (1,), "lesion": (2,)}, ".nii.gz", 1, (), ignore_value=3)
    man_b = DatasetManifest("B", None, ("CT",), {"organ": (1,)}, ".nii.gz", 1, ())
    cfg = parse_collection({"datasets": ["A", "B"]}, base=None)
    return build_vocabulary(cfg, [man_a, man_b])


def test_patch_dataset_oversamples_foreground_and_is_deterministic():
    seg = np.zeros((40, 40, 40), dtype=np.int16)
    seg[30:33, 5:8, 20:23] = 2  # a tiny lesion: random patches rarely hit it
    seg[0:2, 0:2, 0:2] = 3  # ignore label
    image = np.random.default_rng(0).normal(size=(1, 40, 40, 40)).astype(np.float32)
    locs = {"lesion": np.argwhere(seg == 2)}
    case = _Case(image, seg, locs)
    vocab = _vocab()
    sampler = CaseSampler.build([("A", "a0")])
    ds = PatchDataset(lambda d, c: case, sampler, vocab, (8, 8, 8), seed=3, length=600, augment=AugmentConfig.off())
    hits = [bool(ds[i]["target"][1].any()) for i in range(600)]
    # 1/3 forced onto the lesion; random 8^3 patches of a 40^3 case hit it only ~2% of the time
    assert 0.28 < np.mean(hits) < 0.42
    s1, s2 = ds[17], ds[17]
    np.testing.assert_array_equal(s1["image"], s2["image"])
    assert s1["label_mask"].tolist() == [True, True, False]
    assert s1["modality"] == 0 and s1["dataset"] == 0


def test_collate_pads_channels():
    vocab = _vocab()
    from mosaicseg.data.sampling import make_sample

    seg = np.zeros((4, 4), dtype=np.int16)
    s1 = make_sample(vocab, "A", np.ones((1, 4, 4), np.float32), seg, {})
    s2 = make_sample(vocab, "B", np.ones((2, 4, 4), np.float32), seg, {})
    batch = collate([s1, s2])
    assert tuple(batch["image"].shape) == (2, 2, 4, 4)
    assert batch["image"][0, 1].abs().sum() == 0 and batch["image"][1, 1].sum() == 16
    assert batch["label_mask"].tolist() == [[True, True, False], [False, False, True]]


def test_spatial_augmentation_keeps_labels_aligned_with_image():
    # image == label everywhere, so after any rotation/scale/elastic the nearest label matches the image
    seg = np.zeros((30, 30, 30), dtype=np.int16)
    seg[8:22, 10:20, 5:25] = 1
    image = seg[None].astype(np.float32)
    cfg = AugmentConfig(p_rotate=1.0, p_scale=1.0, p_elastic=1.0, image_order=0)
    rng = np.random.default_rng(0)
    img, lab = sample_patch(image, seg, np.array([15.0, 15.0, 15.0]), (16, 16, 16), cfg, rng)
    assert lab.any() and (lab == 0).any()
    np.testing.assert_array_equal(img[0], lab)
