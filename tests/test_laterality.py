"""Left/right label pairs: names, the label swap of mirroring in training, and swapped outputs in TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaicseg.data.augment import AugmentConfig, augment_intensity_and_mirror
from mosaicseg.data.laterality import lateral_partner
from mosaicseg.data.sampling import CaseSampler, PatchDataset
from mosaicseg.data.vocabulary import Task, Vocabulary
from mosaicseg.inference.sliding_window import bind_modality, predict_logits


@pytest.mark.parametrize(
    ("name", "partner"),
    [
        ("Caudate_R", "Caudate_L"),
        ("LateralVentricle_L", "LateralVentricle_R"),
        ("kidney_left", "kidney_right"),
        ("LeftKidney", "RightKidney"),
        ("Left-Lateral-Ventricle", "Right-Lateral-Ventricle"),
        ("lung_upper_lobe_RIGHT", "lung_upper_lobe_LEFT"),
        ("rh_cortex", "lh_cortex"),
        ("vertebrae_L1", None),  # a vertebra, not a side
        ("Lung", None),
        ("ThirdVentricle", None),
        ("Leftover", None),
    ],
)
def test_lateral_partner(name, partner):
    assert lateral_partner(name) == partner


def _vocab(labels: dict[str, dict[str, tuple[int, ...]]], shared: list[list[tuple[str, str]]] = ()) -> Vocabulary:
    """Tasks in dataset/label order; ``shared`` groups of (dataset, label) members become one task."""
    tasks: list[list[tuple[str, str]]] = []
    label_map: dict[str, list] = {}
    for d, labs in labels.items():
        label_map[d] = []
        for lbl, values in labs.items():
            group = next((g for g in shared if (d, lbl) in g), None)
            k = next((i for i, t in enumerate(tasks) if group and t[0] in group), None)
            if k is None:
                k = len(tasks)
                tasks.append([])
            tasks[k].append((d, lbl))
            label_map[d].append((k, values))
    return Vocabulary(
        datasets=tuple(labels),
        tasks=tuple(Task(i, f"{m[0][0]}/{m[0][1]}", tuple(m)) for i, m in enumerate(tasks)),
        modalities=("T1",),
        dataset_modality=dict.fromkeys(labels, "T1"),
        label_map={d: tuple(m) for d, m in label_map.items()},
    )


def test_lateral_lut_swaps_pairs_and_keeps_the_rest():
    v = _vocab({"A": {"Caudate_R": (1,), "Caudate_L": (2,), "Thalamus": (3,), "Putamen_L": (5,), "Putamen_R": (4,)}})
    assert v.lateral_lut("A").tolist() == [0, 2, 1, 3, 5, 4]


def test_lateral_lut_refuses_unpaired_and_region_labels():
    assert _vocab({"A": {"Caudate_R": (1,), "Thalamus": (2,)}}).lateral_lut("A") is None
    assert _vocab({"A": {"kidney_left": (1, 2), "kidney_right": (3,)}}).lateral_lut("A") is None
    no_sides = _vocab({"A": {"Liver": (1,), "Tumor": (2,)}}).lateral_lut("A")
    assert no_sides.tolist() == [0, 1, 2]


def test_lateral_permutation_over_global_tasks():
    v = _vocab(
        {
            "A": {"Caudate_R": (1,), "Caudate_L": (2,), "Liver": (3,)},
            "B": {"Hippo_L": (1,), "Amygdala_R": (2,), "Liver": (3,)},
            "C": {"Caudate_L": (1,), "Caudate_R": (2,)},
        },
        shared=[[("A", "Caudate_R"), ("C", "Caudate_R")], [("A", "Caudate_L"), ("C", "Caudate_L")]],
    )
    names = [t.name for t in v.tasks]
    assert names == ["A/Caudate_R", "A/Caudate_L", "A/Liver", "B/Hippo_L", "B/Amygdala_R", "B/Liver"]
    # Caudate pairs swap (in both datasets), Liver stays, B's unpaired sides are marked -1
    assert v.lateral_permutation().tolist() == [1, 0, 2, -1, -1, 5]


def test_mirroring_the_lateral_axis_swaps_labels():
    seg = np.zeros((4, 3, 2), dtype=np.int16)
    seg[0, 1, 1] = 1  # right structure on the right side (low x)
    seg[3, 2, 0] = 2  # left structure on the left side
    seg[1, 0, 0] = 3  # midline structure
    image = seg[None].astype(np.float32)
    cfg = AugmentConfig.off()
    cfg = AugmentConfig(**{**cfg.__dict__, "p_mirror": 1.0, "mirror_axes": (0,)})
    lut = np.array([0, 2, 1, 3])
    img_out, seg_out = augment_intensity_and_mirror(image, seg, cfg, np.random.default_rng(0), lateral_lut=lut)
    assert seg_out[3, 1, 1] == 2  # the right structure, mirrored to the left side, is now a left label
    assert seg_out[0, 2, 0] == 1
    assert seg_out[2, 0, 0] == 3
    assert np.array_equal(img_out[0], image[0, ::-1])  # the image itself is only mirrored
    # another axis is mirrored without relabelling
    cfg1 = AugmentConfig(**{**cfg.__dict__, "mirror_axes": (1,)})
    _, seg1 = augment_intensity_and_mirror(image, seg, cfg1, np.random.default_rng(0), lateral_lut=lut)
    assert np.array_equal(seg1, seg[:, ::-1])


class _Case:
    def __init__(self, seg):
        self.image = seg[None].astype(np.float32)
        self.seg = seg
        self.fg_locations = {}


def test_dataset_with_unswappable_sides_is_never_mirrored_left_right():
    v = _vocab({"A": {"Caudate_R": (1,)}, "B": {"Caudate_R": (1,), "Caudate_L": (2,)}})
    seg = np.zeros((6, 6, 6), dtype=np.int16)
    seg[0, 0, 0] = 1  # a right structure at the low-x corner
    always = AugmentConfig(**{**AugmentConfig.off().__dict__, "p_mirror": 1.0})
    ds = PatchDataset(
        lambda d, c: _Case(seg),
        CaseSampler.build([("A", "a"), ("B", "b")], scheme="uniform"),
        v,
        (6, 6, 6),
        0,
        40,
        augment=always,
    )
    seen = {"A": set(), "B": set()}
    for i in range(len(ds)):
        s = ds[i]
        name = v.datasets[s["dataset"]]
        idx = tuple(int(a[0]) for a in np.nonzero(s["target"].any(0)))
        seen[name].add((idx[0], tuple(int(t) for t in np.nonzero(s["target"][:, idx[0], idx[1], idx[2]])[0])))
    # A (no partner for Caudate_R): x never mirrored, the structure stays at x=0 as Caudate_R
    assert seen["A"] == {(0, (0,))}
    # B: always mirrored along x (p=1), so Caudate_R at x=0 becomes Caudate_L (task 2) at x=5
    assert seen["B"] == {(5, (2,))}


class _SideModel(torch.nn.Module):
    """A perfectly lateral 'model': output 0 (right) is the image on the low-x half, output 1 (left) the
    image on the high-x half, output 2 (midline) the whole image."""

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        half = x.shape[2] // 2
        right, left = torch.zeros_like(x), torch.zeros_like(x)
        right[:, :, :half] = x[:, :, :half]
        left[:, :, half:] = x[:, :, half:]
        return torch.cat([right, left, x], dim=1)


def test_tta_swaps_left_right_outputs():
    image = torch.rand(1, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    model = _SideModel()
    side = bind_modality(model, 0)
    plain = predict_logits(side, image, (6, 4, 4))
    tta = predict_logits(side, image, (6, 4, 4), mirror_axes=(0, 1, 2), lateral_permutation=[1, 0, 2])
    torch.testing.assert_close(tta, plain)
    # without the swap, mirroring smears each side's output onto the other
    naive = predict_logits(side, image, (6, 4, 4), mirror_axes=(0,))
    assert not torch.allclose(naive[0], plain[0])
    # a kept subset is swapped through the full permutation
    sub = predict_logits(side, image, (6, 4, 4), mirror_axes=(0,), lateral_permutation=[1, 0, 2], tasks=[1])
    torch.testing.assert_close(sub[0], plain[1])
    with pytest.raises(ValueError, match="partner"):
        predict_logits(side, image, (6, 4, 4), mirror_axes=(0,), lateral_permutation=[-1, 0, 2], tasks=[0])
