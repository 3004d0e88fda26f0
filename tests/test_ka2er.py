"""KA²ER: frozen experts outside the student, only the batch's experts run, the predictor without expert files,
the prompt encoder in 2D and 3D, the alignment and KL terms by hand, and an nnU-Net expert folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mosaicseg.config import TrainConfig
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.predictor import Predictor
from mosaicseg.models.experts import MosaicSegExpert, nnunet_axes, renormalize
from mosaicseg.models.prompts import BoxPromptEncoder, MaskDecoder
from mosaicseg.runtime import load_checkpoint
from mosaicseg.training.loop import Trainer
from mosaicseg.training.losses import alignment_loss, bernoulli_kl

DERM, CT, MR = "Dataset911_SynthDerm", "Dataset912_SynthCT", "Dataset913_SynthMR"


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(optimizer="adamw", iterations=2, iterations_per_epoch=2, seed=1, device="cpu",
                                amp=False, val_max_cases=1)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def experts(tiny_workdir_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Single experts on SynthCT and SynthMR, and an external universal model on SynthDerm and SynthCT (it can
    read the CT images, not the MR ones) (fold folders)."""
    root = tmp_path_factory.mktemp("experts")
    out = {}
    for name, cfg in {
        "ct": _cfg(recipe="single", dataset=CT),
        "mr": _cfg(recipe="single", dataset=MR),
        "external": _cfg(recipe="universal", datasets=(DERM, CT)),
    }.items():
        Trainer(tiny_workdir_2d, cfg, root / name / "fold_0", progress=False).fit()
        out[name] = root / name / "fold_0"
    return out


def _spec(experts: dict[str, Path], external: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "subtasks": {"ct": {"dataset": CT}, "mr": {"dataset": MR}},
        "experts": {"ct": {"run": str(experts["ct"])}, "mr": {"run": str(experts["mr"])}},
    }
    if external:
        spec["external"] = {"run": str(experts["external"])}
    return spec


def test_alignment_and_kl_by_hand():
    f_s = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # (B=1, N=2, C=2)
    f_m = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    # squared distances 4 and 25 over C = 2, mean over tokens: (2 + 12.5) / 2
    assert alignment_loss(f_s, f_m, "mse").item() == pytest.approx(7.25)
    assert alignment_loss(f_s, f_m, "l2").item() == pytest.approx((2.0 + 5.0) / 2)
    f_s.requires_grad_(True)
    f_m.requires_grad_(True)
    alignment_loss(f_s, f_m, "mse", detach=True).backward()
    assert f_m.grad is None and f_s.grad is not None
    # KL(p ‖ q) with p = σ(0) = 0.5, q = 0.25: 0.5 ln 2 + 0.5 ln(2/3)
    kl = bernoulli_kl(torch.zeros(1, 1, 2), torch.full((1, 1, 2), 0.25))
    assert kl.item() == pytest.approx(0.5 * np.log(2) + 0.5 * np.log(2 / 3), rel=1e-5)
    assert bernoulli_kl(torch.zeros(3), torch.full((3,), 0.5)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("dims", [2, 3])
def test_prompt_encoder_and_mask_decoder_shapes(dims):
    encoder = BoxPromptEncoder(dims, 16)
    boxes = torch.rand(2, 3, 2, dims).sort(dim=2).values
    valid = torch.tensor([[True, False, True], [False, False, True]])
    corners = encoder(boxes, valid, (2, 3))
    assert corners.shape == (2, 3, 2, 16)
    assert torch.equal(corners[0, 1], encoder.no_box)  # a missing box is the learned "no box" pair
    assert torch.equal(encoder(None, None, (2, 3))[1, 2], encoder.no_box)
    size = (8,) * dims
    decoder = MaskDecoder(dims, 4, 6, 16, num_tasks=5)
    out = decoder(
        torch.randn(2, 4, *size), torch.randn(2, 6, *(2,) * dims), corners, torch.tensor([[0, 2, 4], [1, 5, 5]])
    )
    assert out.shape == (2, 3, *size)


def test_renormalize_and_nnunet_axes():
    x = torch.randn(1, 1, 4, 4)
    assert torch.equal(renormalize(x, [{"scheme": "mr"}], [{"scheme": "mr"}]), x)
    ct_s = {"scheme": "ct", "clip": [-100, 300], "mean": 50.0, "std": 100.0}
    ct_e = {"scheme": "ct", "clip": [0, 200], "mean": 100.0, "std": 50.0}
    hu = torch.tensor([[[[-1.0, 0.5], [2.0, 1.0]]]])  # → HU -50, 100, 250, 150
    assert renormalize(hu, [ct_s], [ct_e]).flatten().tolist() == pytest.approx([-2.0, 0.0, 2.0, 1.0])
    with pytest.raises(MosaicSegError, match="cannot be mapped"):
        renormalize(x, [{"scheme": "mr"}], [ct_e])
    # a PSR file: nnU-Net's array is (R, S, P) reversed; canonical LPS: axis 0 = L (R reversed), 1 = P, 2 = S
    assert nnunet_axes("PSR", [0, 1, 2]) == [(0, True), (2, False), (1, False)]
    assert nnunet_axes("LPS", [0, 1, 2]) == [(2, False), (1, False), (0, False)]


def test_only_the_batchs_experts_run_and_none_learns(experts, tiny_workdir_2d, tmp_path, monkeypatch):
    calls: list[str] = []
    original = MosaicSegExpert._run

    def spy(self, x):
        calls.append(self.dataset)
        return original(self, x)

    monkeypatch.setattr(MosaicSegExpert, "_run", spy)
    cfg = _cfg(recipe="ka2er", datasets=(CT, MR), recipe_options={"experts": _spec(experts)})
    t = Trainer(tiny_workdir_2d, cfg, tmp_path / "s", progress=False)
    slots = t.recipe.inputs.slots
    expert_params = [p for s in slots for p in s.expert.network.parameters()]
    before = [p.detach().clone() for p in expert_params]
    student = {id(p) for p in t.model.parameters()}
    assert not any(id(p) in student for p in expert_params)  # outside the state dict and the optimiser
    in_optimizer = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in expert_params)
    assert not any(k.startswith("expert") for k in t.model.state_dict())

    # a batch of CT samples only: the CT expert and the external expert (reading them as CT) run, not the MR expert
    batch = t.to_device(next(iter(t._loader())))
    batch["dataset"][:] = t.vocabulary.dataset_index(CT)
    calls.clear()
    inputs = t.recipe.inputs(batch)
    assert calls == [CT, CT]
    assert [slot for slot, _, _ in inputs["prompts"]["experts"]] == [0]
    t.fit()
    assert all(torch.equal(a, b) for a, b in zip(before, expert_params, strict=True))
    assert all(p.grad is None and not p.requires_grad for p in expert_params)
    record = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"segmentation", "alignment", "kl"} <= set(record["loss_terms"])


def test_the_predictor_needs_no_expert_files(experts, tiny_workdir_2d, tmp_path):
    copies = {k: tmp_path / "copies" / k / "fold_0" for k in experts}
    for k, v in experts.items():
        shutil.copytree(v, copies[k])
    cfg = _cfg(recipe="ka2er", datasets=(CT, MR), recipe_options={"experts": _spec(copies)})
    Trainer(tiny_workdir_2d, cfg, tmp_path / "s", progress=False).fit()
    shutil.rmtree(tmp_path / "copies")
    predictor = Predictor.from_checkpoint(tmp_path / "s", precision="fp32", jit=False)
    assert predictor.models[0].amalgamation is None  # dropped: only student, prompt encoder and mask decoder
    image = sorted((tiny_workdir_2d.parent / "data" / CT / "imagesTr").iterdir())[0]
    out = predictor.predict(image, dataset=CT)
    assert set(out.masks) == {f"{CT}/Liver", f"{CT}/Tumor"}
    state = load_checkpoint(tmp_path / "s" / "checkpoint_final.pt")["model"]
    assert any(k.startswith("amalgamation.") for k in state)  # the training checkpoint keeps it (resume)


def test_bad_expert_mappings_are_named(experts, tiny_workdir_2d, tmp_path):
    bad = _spec(experts)
    bad["experts"]["liver"] = {"run": str(experts["ct"])}
    with pytest.raises(MosaicSegError, match=r"unknown sub-tasks \['liver'\]"):
        Trainer(tiny_workdir_2d, _cfg(recipe="ka2er", recipe_options={"experts": bad}), tmp_path / "a")
    bad = _spec(experts)
    bad["subtasks"]["mr"] = {"dataset": MR, "labels": ["Spleen"]}
    with pytest.raises(MosaicSegError, match=r"names labels \['Spleen'\]"):
        Trainer(tiny_workdir_2d, _cfg(recipe="ka2er", recipe_options={"experts": bad}), tmp_path / "b")
    bad = _spec(experts)
    bad["experts"]["mr"] = {"run": str(experts["ct"])}  # the CT expert never saw MR images
    with pytest.raises(MosaicSegError, match="was not trained on Dataset913_SynthMR"):
        Trainer(tiny_workdir_2d, _cfg(recipe="ka2er", recipe_options={"experts": bad}), tmp_path / "c")
    bad = _spec(experts)
    bad["experts"]["mr"] = {"nnunet": str(tmp_path / "nowhere")}
    with pytest.raises(MosaicSegError, match=r"nnU-Net|nnunetv2"):
        Trainer(tiny_workdir_2d, _cfg(recipe="ka2er", recipe_options={"experts": bad}), tmp_path / "d")
    with pytest.raises(MosaicSegError, match="needs its experts"):
        Trainer(tiny_workdir_2d, _cfg(recipe="ka2er"), tmp_path / "e")


def test_an_nnunet_expert_folder_loads_and_reads_the_same_region(tmp_path):
    pytest.importorskip(
        "nnunetv2", reason="nnunetv2 is optional (pip install nnunetv2 -c benchmarks/constraints-cpu.txt)"
    )
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from mosaicseg.models.experts import NnUNetExpert

    kwargs = {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True, "dropout_op": None, "dropout_op_kwargs": None,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }  # fmt: skip
    imports = ["conv_op", "norm_op", "dropout_op", "nonlin"]
    architecture = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": kwargs, "_kw_requires_import": imports,
    }  # fmt: skip
    configuration = {
        "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 16, 16], "median_image_size_in_voxels": [16, 16, 16], "spacing": [2.0, 2.0, 2.0],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False], "batch_dice": False,
        "resampling_fn_data": "x", "resampling_fn_seg": "x", "resampling_fn_data_kwargs": {},
        "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities": "x",
        "resampling_fn_probabilities_kwargs": {}, "architecture": architecture,
    }  # fmt: skip
    intensity = {"0": {"mean": 1.0, "std": 1.0, "percentile_00_5": 0, "percentile_99_5": 2}}
    plans = {
        "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "original_median_spacing_after_transp": [2.0, 2.0, 2.0],
        "original_median_shape_after_transp": [16, 16, 16], "image_reader_writer": "SimpleITKIO",
        "label_manager": "LabelManager", "experiment_planner_used": "x",
        "foreground_intensity_properties_per_channel": intensity, "configurations": {"3d_fullres": configuration},
    }  # fmt: skip
    folder = tmp_path / "Dataset999_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    labels = {"background": 0, "Liver": 1, "Tumor": 2}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))  # fmt: skip
    import pydoc

    net = PlainConvUNet(1, num_classes=3, deep_supervision=False,
                        **{k: (pydoc.locate(v) if k in imports and v else v) for k, v in kwargs.items()})  # fmt: skip
    torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": "3d_fullres", "fold": np.int64(0)}},
               folder / "fold_0" / "checkpoint_final.pth")  # fmt: skip
    image = tmp_path / "case_0000.nii.gz"
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.zeros((16, 16, 16), dtype=np.float32))
    img.SetDirection(sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation("PSR"))
    sitk.WriteImage(img, str(image))
    expert = NnUNetExpert(folder, "Dataset912_SynthCT", image)
    assert expert.labels == ["Liver", "Tumor"] and expert.feature_channels == 16
    assert expert.axes == [(0, True), (2, False), (1, False)] and expert.spacing == (2.0, 2.0, 2.0)
    x = torch.randn(2, 1, 12, 12, 12)
    feats, probs = expert(x, [2.0, 2.0, 2.0], [{"scheme": "mr"}], [3, 3, 3])
    assert feats.shape == (2, 16, 3, 3, 3) and probs.shape == (2, 2, 12, 12, 12)
    # the network saw the patch in its own axes: feeding it that way by hand gives the same probabilities
    into = torch.flip(x.permute(0, 1, 2, 4, 3), [2])
    with torch.no_grad():
        direct = torch.softmax(net(into), 1)[:, 1:]  # 12 is a multiple of the divisor 4: no padding
    back = torch.flip(direct, [2]).permute(0, 1, 2, 4, 3)
    torch.testing.assert_close(probs, back, atol=1e-5, rtol=1e-4)
    (folder / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(MosaicSegError, match=r"checkpoint_final\.pth: missing"):
        NnUNetExpert(folder, "Dataset912_SynthCT", image)


def test_boxes_reach_the_preprocessed_grid():
    from mosaicseg.data.io import Geometry
    from mosaicseg.inference.prompts import canonical_box, preprocessed_box

    # a PSR file of 10 × 20 × 30 voxels is (30, 10, 20) in the canonical LPS grid: L = R reversed, P, S
    geometry = Geometry(3, (10, 20, 30), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), "PSR",
                        (30, 10, 20), (1.0, 1.0, 1.0))  # fmt: skip
    lo, hi = canonical_box([2, 4, 6], [5, 8, 9], geometry)  # file (P, S, R) index box, high exclusive
    assert lo.tolist() == [21, 2, 4] and hi.tolist() == [24, 5, 8]
    meta = {"bbox": [[1, 29], [0, 10], [2, 20]], "shape_cropped": [28, 10, 18], "shape_resampled": [14, 10, 9]}
    plo, phi = preprocessed_box((lo, hi), meta)
    assert plo.tolist() == [10.0, 2.0, 1.0] and phi.tolist() == [11.5, 5.0, 3.0]


def test_a_windowed_forward_gets_each_tiles_place_in_the_mirrored_image():
    from mosaicseg.inference.sliding_window import predict_logits

    seen: list[tuple[tuple[int, ...], list[tuple[int, int]]]] = []

    class Recorder:
        wants_window = True

        def __call__(self, x, windows, flip, shape):
            seen.extend((tuple(flip), w) for w in windows)
            return torch.zeros(x.shape[0], 1, *x.shape[2:])

    predict_logits(Recorder(), torch.zeros(1, 12, 20), (8, 8), mirror_axes=(1,))
    assert {f for f, _ in seen} == {(), (1,)}
    for _, w in seen:
        assert 0 <= w[0][0] < w[0][1] <= 12 and 0 <= w[1][0] < w[1][1] <= 20 and w[0][1] - w[0][0] == 8
    # an image smaller than a tile is padded on both sides: the window is given in the image's own coordinates
    seen.clear()
    predict_logits(Recorder(), torch.zeros(1, 6, 8), (8, 8))
    assert seen == [((), [(-1, 7), (0, 8)])]


def test_predict_with_boxes_from_references_prompts_and_bad_prompts(experts, tiny_workdir_2d, tmp_path):
    from typer.testing import CliRunner

    from mosaicseg.cli import app

    cfg = _cfg(recipe="ka2er", datasets=(CT, MR), recipe_options={"experts": _spec(experts, external=False)})
    Trainer(tiny_workdir_2d, cfg, tmp_path / "s" / "fold_0", progress=False).fit()
    raw = tiny_workdir_2d.parent / "data" / CT
    image = sorted((raw / "imagesTr").iterdir())[0]
    case = image.name.split("_0000")[0]
    runner = CliRunner()
    base = ["predict", "-m", str(tmp_path / "s"), "-i", str(image), "--dataset", CT, "--precision", "fp32"]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "oracle"), "--oracle-boxes", str(raw / "labelsTr")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "oracle" / "predict.json").read_text())["prompts"] == "oracle"
    boxes = tmp_path / "boxes.json"  # the synthetic 2D images are single-slice NIfTIs: three file axes
    boxes.write_text(json.dumps({case: {"Liver": {"min": [0, 0, 0], "max": [9, 9, 0]}}}))
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "given"), "--prompts", str(boxes)])
    assert result.exit_code == 0, result.output
    predicted = tmp_path / "given" / image.name.replace("_0000", "")
    from mosaicseg.data.io import read_image

    seg, _ = read_image(predicted)
    liver = 1  # outside the box (grown by 10 %) the liver is never predicted
    assert not (seg[0][11:, :] == liver).any() and not (seg[0][:, 11:] == liver).any()
    boxes.write_text(json.dumps({case: {"Liver": {"min": [0, 0, 0], "max": [999, 9, 0]}}}))
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "bad"), "--prompts", str(boxes), "--overwrite"])
    assert result.exit_code == 0  # clipped to the image: a box reaching beyond the image is still inside it
    boxes.write_text(json.dumps({case: {"Liver": {"min": [500, 0, 0], "max": [999, 9, 0]}}}))
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "bad2"), "--prompts", str(boxes)])
    assert result.exit_code == 2 and f"case '{case}', box of 'Liver'" in result.output and "outside" in result.output
    boxes.write_text("{not json")
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "bad3"), "--prompts", str(boxes)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    plain = ["predict", "-m", str(experts["ct"].parent), "-i", str(image), "--dataset", CT, "-o", str(tmp_path / "p")]
    result = runner.invoke(app, [*plain, "--oracle-boxes", str(raw / "labelsTr")])
    assert result.exit_code == 2 and "takes no prompts" in result.output
