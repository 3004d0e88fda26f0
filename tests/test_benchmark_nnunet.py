"""The nnU-Net study's step cache: finished steps are reused only for the setting they were made with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nnunet = pytest.importorskip("benchmarks.nnunet", reason="run from the repository root (python -m pytest)")


def test_steps_of_another_setting_are_superseded_not_reused(tmp_path, capsys):
    path = tmp_path / "steps.json"
    old = {"A/nnunet_plan_s": 30.0, "A/nnunet_train_iter": {"iterations": 100}, "B/nnunet_train_iter": {"x": 1}}
    path.write_text(json.dumps(old))
    steps = nnunet.Steps(path)
    setting = {"iterations": 250, "schedule": "s"}
    # steps cached before settings were recorded count as another setting
    assert steps.require("A", setting) is True
    assert "A's setting changed" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["superseded"] == [{"A/nnunet_train_iter": {"iterations": 100}}]
    assert saved["A/nnunet_plan_s"] == 30.0  # the plan does not depend on the setting
    assert "A/nnunet_train_iter" not in saved and saved["B/nnunet_train_iter"] == {"x": 1}
    assert saved["A/setting"] == setting
    # the same setting keeps its steps; a changed one moves them again
    steps.data["A/nnunet_train_iter"] = {"iterations": 250}
    assert nnunet.Steps(path).require("A", setting) is False
    steps.save()
    again = nnunet.Steps(path)
    assert again.require("A", {"iterations": 20, "schedule": "s"}) is True
    assert again.data["superseded"][-1] == {"A/nnunet_train_iter": {"iterations": 250}, "A/setting": setting}


def test_nnunet_patch_is_mapped_onto_mosaicsegs_canonical_grid(tmp_path: Path) -> None:
    """An image stored PSR (as IXI is) has its axes permuted by MosaicSeg's reader; nnU-Net's per-axis plan
    (SimpleITK ``(Z, Y, X)`` of the stored array) must follow, or the patch covers other anatomy."""
    import numpy as np
    import SimpleITK as sitk

    from mosaicseg.data.io import read_image

    image = sitk.GetImageFromArray(np.zeros((9, 7, 5), np.float32))  # stored size (X, Y, Z) = (5, 7, 9)
    # stored axis 0 runs posterior, axis 1 superior, axis 2 right (LPS-based direction cosines, columns)
    image.SetDirection((0, 0, -1, 1, 0, 0, 0, 1, 0))  # IXI's own direction
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "PSR"
    sitk.WriteImage(image, str(tmp_path / "a_0000.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "b_0000.nii.gz"))
    axes = nnunet._canonical_axes(tmp_path, ".nii.gz")
    ours = read_image(tmp_path / "a_0000.nii.gz")[0].shape[1:]
    assert [(5, 7, 9)[a] for a in axes] == list(ours) == [9, 5, 7]
    plans = {
        "configurations": {
            "3d_fullres": {
                "patch_size": [8, 6, 4],  # (Z, Y, X) of the stored array, as nnU-Net writes it
                "batch_size": 2,
                "spacing": [3.0, 2.0, 1.0],
                "architecture": {
                    "arch_kwargs": {
                        "features_per_stage": [4, 8],
                        "kernel_sizes": [[3, 3, 1], [3, 3, 3]],
                        "strides": [[1, 1, 1], [1, 2, 2]],
                        "n_stages": 2,
                    }
                },
            }
        }
    }
    network, spacing = nnunet._nnunet_network(plans, axes)
    # stored (X, Y, Z) patch (4, 6, 8) → canonical (Z, X, Y) of the stored axes
    assert network["patch_size"] == [8, 4, 6] and spacing == [3.0, 1.0, 2.0]
    assert network["kernel_sizes"] == [[3, 1, 3], [3, 3, 3]] and network["strides"][1] == [1, 2, 2]
    other = sitk.GetImageFromArray(np.zeros((9, 7, 5), np.float32))  # identity direction: LPS, unlike a and b
    sitk.WriteImage(other, str(tmp_path / "c_0000.nii.gz"))
    with pytest.raises(SystemExit, match="several orientations"):
        nnunet._canonical_axes(tmp_path, ".nii.gz")


def test_predict_stages_come_from_the_predict_record(tmp_path: Path) -> None:
    cases = [
        {"seconds": 2.0, "read_s": 0.1, "preprocess_s": 0.3, "network_s": 1.4, "export_s": 0.2},
        {"seconds": 4.0, "read_s": 0.3, "preprocess_s": 0.5, "network_s": 3.0, "export_s": 0.2},
    ]
    assert nnunet._stages(tmp_path, 10.0) is None  # no record: a step measured before predict kept one
    (tmp_path / "predict.json").write_text(json.dumps({"cases": cases}))
    got = nnunet._stages(tmp_path, 10.0)
    want = {"read": 0.2, "preprocess": 0.4, "network": 2.2, "export": 0.2, "startup": 2.0}  # (10 - 6) / 2
    assert got.pop("mixed_precision") is False  # a record written before predict had --precision
    assert got == pytest.approx(want)
    (tmp_path / "predict.json").write_text(json.dumps({"cases": cases, "mixed_precision": True}))
    assert nnunet._stages(tmp_path, 10.0)["mixed_precision"] is True


def test_held_out_cases_are_the_trainers_validation_cases(tiny_workdir_2d: Path, tmp_path: Path) -> None:
    """The studies score the cases that the fold's training run held out (benchmarks.common, shared by the study
    modules without importing benchmarks.__main__)."""
    from benchmarks.common import held_out_cases
    from mosaicseg.config import TrainConfig
    from mosaicseg.training.loop import Trainer

    trainer = Trainer(tiny_workdir_2d, TrainConfig(device="cpu", iterations=1), tmp_path / "run", progress=False)
    datasets = sorted({d for d, _ in trainer.val_cases})
    assert len(datasets) > 1
    for d in datasets:
        assert held_out_cases(tiny_workdir_2d, d) == sorted(c for dd, c in trainer.val_cases if dd == d)
    assert held_out_cases(tiny_workdir_2d, datasets[0], fold=1) != held_out_cases(tiny_workdir_2d, datasets[0])
