"""KA²ER: frozen experts outside the student, only the batch's experts run, the predictor without expert files,
the prompt encoder in 2D and 3D, the alignment and KL terms by hand, and an nnU-Net expert folder."""

from __future__ import annotations

import json
import re
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
from mosaicseg.training.losses import alignment_loss, bernoulli_kl, deep_supervision_loss

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


def test_the_mask_decoder_scores_a_layer_norm_without_writing_it():
    """The decoder's scores equal ⟨MLP(q), LN(F + W q + W' PE)⟩ + b written out with nn.LayerNorm, and a sample's
    masks do not depend on the batch it is in."""
    torch.manual_seed(0)
    decoder = MaskDecoder(3, 6, 4, 16, num_tasks=4)
    with torch.no_grad():  # a LayerNorm with non-trivial affine parameters
        decoder.norm_map.weight.uniform_(0.5, 1.5)
        decoder.norm_map.bias.uniform_(-0.5, 0.5)
        decoder.task_bias.uniform_(-1, 1)
    full, coarse = 3 * torch.randn(2, 6, 5, 4, 3) + 1, torch.randn(2, 4, 2, 2, 2)
    corners, index = torch.randn(2, 3, 2, 16), torch.tensor([[0, 2, 3], [1, 4, 4]])
    with torch.no_grad():
        out = decoder(full, coarse, corners, index)
        token = decoder.tasks[index] + corners.mean(2)
        keys = decoder.key(coarse.flatten(2).transpose(1, 2)) + decoder.positions.grid((2, 2, 2)).flatten(1).t()
        token = decoder.norm_token(token + decoder.read(token, keys, keys, need_weights=False)[0])
        pe = decoder.position_to_map(decoder.positions.grid((5, 4, 3)).flatten(1).unsqueeze(0))
        shifted = (full.flatten(2) + pe).unsqueeze(1) + decoder.to_map(token).unsqueeze(-1)  # (B, T, c0, N)
        normed = decoder.norm_map(shifted.transpose(2, 3))
        expected = (normed * decoder.score(token).unsqueeze(2)).sum(-1) + decoder.task_bias[index].unsqueeze(-1)
        torch.testing.assert_close(out, expected.view(2, 3, 5, 4, 3), atol=1e-5, rtol=1e-5)
        alone = decoder(full[1:], coarse[1:], corners[1:], index[1:])
    torch.testing.assert_close(alone[0], out[1], atol=1e-6, rtol=0)


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
    assert {"segmentation", "student", "alignment", "kl"} <= set(record["loss_terms"])


def test_student_weight_zero_is_the_papers_loss_and_a_negative_one_is_named(experts, tiny_workdir_2d, tmp_path):
    for weight, expected in ((0.0, False), (0.5, True)):
        options = {"experts": _spec(experts), "student_weight": weight}
        t = Trainer(tiny_workdir_2d, _cfg(recipe="ka2er", datasets=(CT, MR), recipe_options=options),
                    tmp_path / f"w{weight}", progress=False)  # fmt: skip
        batch = t.to_device(next(iter(t._loader())))
        outputs = t.model(batch["image"], batch["modality"], **t.recipe.inputs(batch))
        terms = t.recipe.loss(outputs, batch)
        assert ("student_logits" in outputs.extras) is expected and ("student" in terms) is expected
        if expected:  # the term is the weighted segmentation loss of the f_s path
            plain = deep_supervision_loss(outputs.extras["student_logits"], batch["target"], batch["label_mask"],
                                          batch["ignore"], pos_weight=1.0)  # fmt: skip
            torch.testing.assert_close(terms["student"], weight * plain)
    options = {"experts": _spec(experts), "student_weight": -1}
    with pytest.raises(MosaicSegError, match=r"student_weight=-1 must be >= 0"):
        Trainer(tiny_workdir_2d, _cfg(recipe="ka2er", datasets=(CT, MR), recipe_options=options), tmp_path / "bad",
                progress=False)  # fmt: skip
    assert not (tmp_path / "bad" / "checkpoint_latest.pt").exists()


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
    # the folder's problem, whether or not nnunetv2 is installed (the folder is checked first)
    missing = re.escape(f"{tmp_path / 'nowhere' / 'plans.json'}: missing, so {tmp_path / 'nowhere'} is no usable")
    with pytest.raises(MosaicSegError, match=missing):
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


# ---------------------------------------------------------------------------------------------- the audit's gaps
def _fake_ctx(patch: list[int]) -> Any:
    """The one thing build_slots reads of a RecipeContext: the student's patch size (hence its dimensionality)."""
    from types import SimpleNamespace

    return SimpleNamespace(plans={"network": {"patch_size": patch}})


def _vocabulary(tiny_workdir_2d: Path) -> Any:
    from mosaicseg.data.workdir import load_vocabulary

    return load_vocabulary(tiny_workdir_2d)


def test_alignment_sums_over_the_experts_used_by_hand():
    f_s = torch.tensor(
        [[[1.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]]
    )  # (R=3, N=2, C=2)
    f_m = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # per row, mse (mean over tokens of ‖·‖²/C): (4/2 + 25/2)/2 = 7.25, 0, (4/2 + 0)/2 = 1; l2: (2 + 5)/2, 0, (2 + 0)/2
    # rows 0 and 1 belong to one expert, row 2 to another: (7.25 + 0)/2 + 1 and (3.5 + 0)/2 + 1
    groups = torch.tensor([0, 0, 1])
    assert alignment_loss(f_s, f_m, "mse", groups=groups).item() == pytest.approx(3.625 + 1.0)
    assert alignment_loss(f_s, f_m, "l2", groups=groups).item() == pytest.approx(1.75 + 1.0)
    # the expert ids are labels, not positions; without groups all rows are one term (the mean over rows)
    assert alignment_loss(f_s, f_m, "mse", groups=torch.tensor([7, 7, 2])).item() == pytest.approx(4.625)
    assert alignment_loss(f_s, f_m, "mse").item() == pytest.approx((7.25 + 0 + 1) / 3)
    # no expert in the batch: a zero that still back-propagates
    empty = torch.zeros(0, 2, 2, requires_grad=True)
    zero = alignment_loss(empty, torch.zeros(0, 2, 2), "mse", groups=torch.zeros(0, dtype=torch.long))
    zero.backward()
    assert zero.item() == 0.0 and empty.grad is not None
    with pytest.raises(ValueError, match="alignment norm 'l1'"):
        alignment_loss(f_s, f_m, "l1")


def test_scale_free_alignment_compares_layer_normalised_tokens_by_hand():
    f_s = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])  # (R=1, N=2, C=2)
    # token 0 scaled and shifted: the same after layer norm; token 1 constant: normalised to (0, 0)
    f_m = torch.tensor([[[12.0, 20.0], [0.0, 1.0]]])
    # layer-normalised (eps 1e-5): token 0 (-1, 1) on both sides, token 1 (0, 0) against (-1, 1) (up to eps)
    # mse: (0 + (1 + 1)/2) / 2 = 0.5; without normalisation (121 + 289)/2 and (4 + 1)/2 -> (205 + 2.5)/2
    assert alignment_loss(f_s, f_m, "mse", scale_free=True).item() == pytest.approx(0.5, rel=1e-4)
    assert alignment_loss(f_s, f_m, "mse").item() == pytest.approx(103.75)
    assert alignment_loss(f_s, 7 * f_s + 3, "mse", scale_free=True).item() == pytest.approx(0.0, abs=1e-6)


def _tiny_student(num_tasks: int, expert_channels: list[int]) -> Any:
    """A 2D two-level KA²ER student (seeded 0, eval mode) on 32² CT patches."""
    from mosaicseg.models.amalgamation import KA2ERNet

    torch.manual_seed(0)
    plan = {"spatial_dims": 2, "patch_size": [32, 32], "features": [8, 16], "strides": [[1, 1], [2, 2]],
            "kernel_sizes": [[3, 3], [3, 3]]}  # fmt: skip
    settings = {"expert_channels": expert_channels, "external_channels": None, "head_dim": 8, "prompt_width": 8}
    return KA2ERNet(plan, {"CT": 1}, num_tasks=num_tasks, ka2er=settings).eval()


def test_the_decoder_reads_layer_normalised_tokens():
    """Whatever the scale of f_s (or f_m in training), the decoder gets the tokens through one LayerNorm."""
    net = _tiny_student(num_tasks=2, expert_channels=[])
    seen = []
    decode = net.backbone.decode
    net.backbone.decode = lambda skips: (seen.append(skips[-1]), decode(skips))[1]
    image = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        first = net(image, torch.zeros(1, dtype=torch.long)).logits[0]
        net.self_attention.out.weight.mul_(50.0)  # f_s ten times larger or more: the decoder's input stays normalised
        net(image, torch.zeros(1, dtype=torch.long))
    for bottleneck in seen:
        tokens = bottleneck.flatten(2).transpose(1, 2)  # (B, N, C)
        torch.testing.assert_close(tokens.mean(-1), torch.zeros(tokens.shape[:2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(tokens.shape[:2]), atol=1e-3, rtol=0)
    assert first.shape[:2] == (1, 2)


def test_the_decoder_meets_f_s_in_training_as_at_inference():
    """With ``student_path`` the training forward also decodes f_s: those logits are exactly what the model
    predicts with no expert (the inference path), while its main logits read f_m and differ."""
    net = _tiny_student(num_tasks=3, expert_channels=[5])
    image, modality = torch.randn(2, 1, 32, 32), torch.zeros(2, dtype=torch.long)
    tasks = torch.tensor([[True, False, True], [False, True, False]])
    boxes = torch.rand(2, 3, 2, 2).sort(2).values
    box_valid = torch.tensor([[True, False, False], [False, True, False]])
    experts = [(0, torch.tensor([0, 1]), torch.randn(2, 5, 16, 16))]
    prompts = {"experts": experts, "external": None, "boxes": boxes, "box_valid": box_valid}
    with torch.no_grad():
        both = net(image, modality, tasks, prompts={**prompts, "student_path": True})
        alone = net(image, modality, tasks, prompts={"boxes": boxes, "box_valid": box_valid})
        merged_only = net(image, modality, tasks, prompts=prompts)
    assert "student_logits" not in merged_only.extras
    torch.testing.assert_close(both.extras["student_logits"][0], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.logits[0], merged_only.logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both.logits[0], alone.logits[0], atol=1e-3)
    assert (both.extras["student_logits"][0][~tasks] == -20).all()  # tasks not asked, as on the main path


def test_the_amalgamation_aligns_each_expert_with_its_own_merge():
    from mosaicseg.models.amalgamation import Amalgamation

    torch.manual_seed(0)
    layer = Amalgamation(4, [3, 5], 2, head_dim=2).eval()
    f_s = torch.randn(3, 4, 4)  # (B, N, C)
    e0, e1, x = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2), torch.randn(2, 2, 2, 2)
    external = [(torch.tensor([0, 2]), x)]
    # sample 1 is in both experts' sub-tasks (one dataset split by label groups)
    out = layer(f_s, [(0, torch.tensor([0, 1]), e0), (1, torch.tensor([1, 2]), e1)], external)
    assert out.rows.tolist() == [0, 1, 1, 2] and out.groups.tolist() == [0, 0, 1, 1]
    alone0 = layer(f_s, [(0, torch.tensor([0, 1]), e0)], external).merged
    alone1 = layer(f_s, [(1, torch.tensor([1, 2]), e1)], external).merged
    torch.testing.assert_close(out.targets[:2], alone0[[0, 1]])  # expert 0's merge, with the external on top
    torch.testing.assert_close(out.targets[2:], alone1[[1, 2]])
    torch.testing.assert_close(out.targets[0], out.merged[0])  # sample 0 has expert 0 alone: the joint merge
    assert not torch.allclose(out.targets[1], out.merged[1])  # sample 1's joint merge mixes both experts
    # every sample with one expert: the targets are the merged rows themselves; a sample only the external expert
    # reads is aligned with its merge as group len(experts); one read by none is not aligned
    out = layer(f_s, [(1, torch.tensor([1]), e1[:1])], [(torch.tensor([0, 1]), x)])
    assert out.rows.tolist() == [1, 0] and out.groups.tolist() == [1, 2]
    assert torch.equal(out.targets, out.merged[[1, 0]])
    out = layer(f_s, [], None)
    assert out.rows.numel() == 0 and out.targets.shape == (0, 4, 4) and torch.equal(out.merged, f_s)


def test_the_merge_does_not_carry_f_s_along():
    """The experts' read replaces f_s (no residual): otherwise f_m − f_s is the read itself, which the detached
    alignment target cannot shrink, and f_m moves with every step f_s takes towards it. The reads see f_s through
    a LayerNorm, so scaling f_s leaves the merge of every read sample unchanged; an unread sample passes as f_s."""
    from mosaicseg.models.amalgamation import Amalgamation

    torch.manual_seed(0)
    layer = Amalgamation(4, [3], 2, head_dim=2).eval()
    f_s = torch.randn(3, 4, 4)  # sample 0: expert (and external), sample 1: external only, sample 2: neither
    e0, x = torch.randn(1, 3, 2, 2), torch.randn(2, 2, 2, 2)
    experts, external = [(0, torch.tensor([0]), e0)], [(torch.tensor([0, 1]), x)]
    with torch.no_grad():
        once, twice = layer(f_s, experts, external), layer(5 * f_s, experts, external)
    torch.testing.assert_close(twice.merged[:2], once.merged[:2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(twice.targets, once.targets, atol=1e-4, rtol=1e-4)
    assert torch.equal(once.merged[2], f_s[2]) and torch.equal(twice.merged[2], 5 * f_s[2])


def test_training_boxes_jitter_and_dropout_by_hand():
    from mosaicseg.training.ka2er import training_boxes

    target = torch.zeros(1, 3, 10, 10, dtype=torch.uint8)
    target[0, 0, 2:6, 3:8] = 1  # box [0.2, 0.3] – [0.6, 0.8], extent (0.4, 0.5)
    target[0, 2, 0:10, 9:10] = 1  # [0, 0.9] – [1, 1], extent (1, 0.1)
    label_mask = torch.tensor([[True, True, True]])
    boxes, valid = training_boxes(target, label_mask, 0.0, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(boxes[0, 0], torch.tensor([[0.2, 0.3], [0.6, 0.8]]))
    torch.testing.assert_close(boxes[0, 2], torch.tensor([[0.0, 0.9], [1.0, 1.0]]))
    assert valid.tolist() == [[True, False, True]]  # task 1 is absent from the patch
    # jitter 0.1 and dropout 0.5, seeded: the generator's first draws move the corners, the next drop boxes
    boxes, valid = training_boxes(target, label_mask, 0.1, 0.5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u = torch.rand((2, 1, 3, 2), generator=g) * 2 - 1
    v = torch.rand((1, 3), generator=g)
    low0 = torch.tensor([0.2, 0.3]) + u[0, 0, 0] * 0.1 * torch.tensor([0.4, 0.5])
    high0 = torch.tensor([0.6, 0.8]) + u[1, 0, 0] * 0.1 * torch.tensor([0.4, 0.5])
    torch.testing.assert_close(boxes[0, 0], torch.stack([low0, high0]))
    high2 = (torch.tensor([1.0, 1.0]) + u[1, 0, 2] * 0.1 * torch.tensor([1.0, 0.1])).clamp(0, 1)
    torch.testing.assert_close(boxes[0, 2, 1], high2)  # a corner pushed past the patch stays on its border
    assert valid.tolist() == [[bool(v[0, 0] >= 0.5), False, bool(v[0, 2] >= 0.5)]]
    again, _ = training_boxes(target, label_mask, 0.1, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(again, boxes)  # the seed decides
    _, none = training_boxes(target, label_mask, 0.0, 1.0, torch.Generator().manual_seed(0))
    assert not none.any()  # dropout 1: no box at all (the student learns to segment without one)
    _, unasked = training_boxes(target, torch.tensor([[False, True, True]]), 0.0, 0.0, torch.Generator())
    assert unasked.tolist() == [[False, False, True]]  # a task the dataset does not annotate gets no box


def _write_sam(path: Path, width: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """A SAM-shaped prompt-encoder state dict (as in SAM's and MedSAM's checkpoints) of ``width``."""
    g = torch.Generator().manual_seed(5)
    state = {
        "image_encoder.patch_embed.proj.bias": torch.zeros(3),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, width // 2, generator=g),
        **{f"prompt_encoder.point_embeddings.{i}.weight": torch.randn(1, width, generator=g) for i in range(4)},
        "prompt_encoder.not_a_point_embed.weight": torch.randn(1, width, generator=g),
        **extra,
    }
    torch.save(state, path)
    return state


def test_a_sam_prompt_encoder_loads_from_a_local_file(tmp_path):
    from mosaicseg.models.prompts import load_sam_prompt_encoder

    path = tmp_path / "medsam_vit_b.pth"
    state = _write_sam(path, 16)
    encoder = BoxPromptEncoder(2, 16)
    assert load_sam_prompt_encoder(encoder, path) == ["gaussian", "corners", "no_box"]
    # SAM's box embedding by hand: corner c ∈ [0, 1]² → [sin, cos](2π (2c − 1) G) + point_embeddings[2 + corner]
    gauss = state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].double()
    box = torch.tensor([[[[0.25, 0.5], [0.75, 1.0]]]])  # (B=1, T=1, 2, d=2)
    expected = []
    for corner in range(2):
        angle = 2 * np.pi * ((2 * box[0, 0, corner].double() - 1) @ gauss)
        pe = torch.cat([angle.sin(), angle.cos()])
        expected.append(pe + state[f"prompt_encoder.point_embeddings.{2 + corner}.weight"][0].double())
    got = encoder(box, torch.tensor([[True]]), (1, 1))[0, 0]
    torch.testing.assert_close(got.double(), torch.stack(expected), atol=1e-4, rtol=1e-4)
    missing = encoder(box, torch.tensor([[False]]), (1, 1))[0, 0]
    assert torch.equal(missing, state["prompt_encoder.not_a_point_embed.weight"].expand(2, -1))

    with pytest.raises(MosaicSegError, match=r"is 2D with width 16; this one is 3D .* prompt_width=16"):
        load_sam_prompt_encoder(BoxPromptEncoder(3, 16), path)
    with pytest.raises(MosaicSegError, match=r"width 16; this one is 2D with width 32"):
        load_sam_prompt_encoder(BoxPromptEncoder(2, 32), path)
    torch.save({"image_encoder.x": torch.zeros(1)}, tmp_path / "vit.pth")
    with pytest.raises(MosaicSegError, match=r"vit\.pth: no SAM prompt-encoder weights"):
        load_sam_prompt_encoder(encoder, tmp_path / "vit.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MosaicSegError, match=r"junk\.pth: cannot read it as a PyTorch state dict"):
        load_sam_prompt_encoder(encoder, tmp_path / "junk.pth")
    with pytest.raises(MosaicSegError, match=r"nothing\.pth: SAM/MedSAM weights not found"):
        load_sam_prompt_encoder(encoder, tmp_path / "nothing.pth")
    _write_sam(tmp_path / "odd.pth", 16, **{"prompt_encoder.point_embeddings.3.weight": torch.zeros(2, 16)})
    with pytest.raises(MosaicSegError, match=r"point_embeddings.2/3 weight is \(2, 16\), not \(1, 16\)"):
        load_sam_prompt_encoder(encoder, tmp_path / "odd.pth")


def test_the_recipe_starts_the_student_from_a_sam_prompt_encoder(experts, tiny_workdir_2d, tmp_path):
    state = _write_sam(tmp_path / "sam.pth", 32)  # the recipe's default prompt_width
    options = {"experts": _spec(experts, external=False), "sam_prompt_encoder": str(tmp_path / "sam.pth")}
    t = Trainer(tiny_workdir_2d, _cfg(recipe="ka2er", datasets=(CT, MR), recipe_options=options), tmp_path / "s")
    encoder = t.model.prompt_encoder
    assert torch.equal(encoder.positions.gaussian, state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    low, high = (state[f"prompt_encoder.point_embeddings.{i}.weight"] for i in (2, 3))
    assert torch.equal(encoder.corners.detach(), torch.cat([low, high]))


def test_subtasks_split_by_case_ids(experts, tiny_workdir_2d, tmp_path):
    import yaml

    from mosaicseg.training.ka2er import build_slots

    spec = _spec(experts, external=False)
    spec["subtasks"] = {  # the MR dataset split by patient (as the paper split MyoPS++ by centre)
        "ct": {"dataset": CT},
        "mr_p0": {"dataset": MR, "cases": "^synmr_p000_"},
        "mr_p1": {"dataset": MR, "cases": ["synmr_p001_tp1", "synmr_p001_tp2"]},
    }
    spec["experts"] = {"ct": spec["experts"]["ct"], "mr_p0": spec["experts"]["mr"], "mr_p1": spec["experts"]["mr"]}
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = _cfg(recipe="ka2er", datasets=(CT, MR), recipe_options={"experts": str(path)})
    t = Trainer(tiny_workdir_2d, cfg, tmp_path / "s", progress=False)
    inputs = t.recipe.inputs
    assert [s.subtask for s in inputs.slots] == ["ct", "mr_p0", "mr_p1"]
    batch = t.to_device(next(iter(t._loader())))
    batch["dataset"][:] = t.vocabulary.dataset_index(MR)
    batch["meta"] = [{"case_id": "synmr_p001_tp2"}, {"case_id": "synmr_p000_tp1"}]
    prompts = inputs(batch)["prompts"]
    # each expert reads only its own cases' samples; its KL targets are those samples too
    assert [(slot, samples.tolist()) for slot, samples, _ in prompts["experts"]] == [(1, [1]), (2, [0])]
    assert [samples.tolist() for samples, *_ in inputs.targets] == [[1], [0]]
    batch["meta"] = [{"case_id": "synmr_p000_tp2"}, {"case_id": "synmr_p000_tp1"}]
    assert [(slot, s.tolist()) for slot, s, _ in inputs(batch)["prompts"]["experts"]] == [(1, [0, 1])]

    def fails(subtask: dict[str, Any], match: str) -> None:
        bad = {**spec, "subtasks": {**spec["subtasks"], "mr_p0": subtask}, "_source": str(path)}
        with pytest.raises(MosaicSegError, match=match):
            build_slots(_fake_ctx([32, 32]), t.vocabulary, bad, {}, {MR: ["synmr_p000_tp1", "synmr_p001_tp1"]})

    where = re.escape(f"{path}: sub-task 'mr_p0' of {MR}: cases")
    fails({"dataset": MR, "cases": "(["}, where + r" '\(\[' is not a valid regular expression")
    fails({"dataset": MR, "cases": "^synct_"}, where + r" '\^synct_' matches none of the dataset's 2 cases")
    fails({"dataset": MR, "cases": ["synmr_p000_tp1", "synmr_p009_tp1"]}, where + r" \['synmr_p009_tp1'\] are not")
    fails({"dataset": MR, "cases": 3}, where + " 3 is neither a regular expression nor a list of case ids")
    fails({"dataset": MR, "cases": []}, where + r" \[\] is neither")
    fails({"dataset": MR, "centre": "A"}, re.escape(f"{path}: sub-task 'mr_p0' has unknown keys ['centre']"))
    fails({"dataset": MR, "labels": "Brain"}, r"labels 'Brain' is not a list of label names")
    # the Trainer reads the case ids from the raw dataset: a regex matching none of them fails there too
    spec["subtasks"]["mr_p0"]["cases"] = "^nobody$"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MosaicSegError, match=r"matches none of the dataset's 4 cases"):
        Trainer(tiny_workdir_2d, cfg, tmp_path / "t", progress=False)


def test_the_swinunetr_student_has_the_papers_feature_size(experts, tiny_workdir_2d, tmp_path):
    pytest.importorskip("einops", reason="MONAI's SwinUNETR needs einops")
    options = {"experts": _spec(experts, external=False)}
    small = {"depths": [1, 1, 1, 1]}  # fewer Swin blocks: construction only, the width is what is checked
    for given, expected in (({}, 48), ({"feature_size": 24}, 24)):
        cfg = _cfg(recipe="ka2er", datasets=(CT, MR), architecture="swinunetr", patch_size=(64, 32),
                   model_options={**small, **given}, recipe_options=options)  # fmt: skip
        t = Trainer(tiny_workdir_2d, cfg, tmp_path / f"fs{expected}", progress=False)
        assert t.model.config["options"]["feature_size"] == expected  # what the checkpoint rebuilds from
        assert t.model.backbone.skip_channels[-1] == 16 * expected


def test_an_expert_of_another_dimensionality_is_named(experts, tiny_workdir_2d):
    from mosaicseg.training.ka2er import build_slots

    spec = {**_spec(experts, external=False), "_source": "experts.yaml"}
    with pytest.raises(MosaicSegError, match=re.escape(f"experts.yaml: expert 'ct' ({experts['ct']}) is 2D, the ")):
        build_slots(_fake_ctx([16, 16, 16]), _vocabulary(tiny_workdir_2d), spec, {})
    spec = {"subtasks": {}, "experts": {}, "external": {"run": str(experts["external"])}, "_source": "experts.yaml"}
    with pytest.raises(MosaicSegError, match=r"the external expert \(.*external.*\) is 2D, the student 3D"):
        build_slots(_fake_ctx([16, 16, 16]), _vocabulary(tiny_workdir_2d), spec, {})
    expert = MosaicSegExpert(experts["ct"], CT)  # called on 3D patches all the same
    with pytest.raises(MosaicSegError, match=r"is 2D, the student's patches are 3D"):
        expert(torch.zeros(1, 1, 8, 8, 8), [1.0] * 3, [{"scheme": "ct"}], [2, 2, 2])


def test_an_expert_run_folder_without_a_checkpoint_is_named(experts, tiny_workdir_2d, tmp_path):
    from mosaicseg.training.ka2er import build_slots

    empty = tmp_path / "ct_run"
    empty.mkdir()
    spec = _spec(experts, external=False)
    spec["experts"]["ct"] = {"run": str(empty)}
    spec["_source"] = "experts.yaml"
    vocabulary = _vocabulary(tiny_workdir_2d)
    with pytest.raises(MosaicSegError, match=re.escape(f"expert 'ct': {empty}: holds neither checkpoint_final.pt")):
        build_slots(_fake_ctx([32, 32]), vocabulary, spec, {})
    (empty / "fold_0").mkdir()  # a fold that never finished
    with pytest.raises(MosaicSegError, match=re.escape(f"checkpoint_final.pt is missing in ['{empty / 'fold_0'}']")):
        build_slots(_fake_ctx([32, 32]), vocabulary, spec, {})


def test_world_coordinate_boxes_in_a_prompts_file(tmp_path):
    from mosaicseg.data.io import Geometry
    from mosaicseg.inference.prompts import PromptFile

    # a file whose first two axes run against the world's (direction diag(-1, -1, 1)), spacing 2 × 1 × 0.5 mm
    geometry = Geometry(3, (10, 20, 30), (2.0, 1.0, 0.5), (10.0, -5.0, 3.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), "RAS",
                        (10, 20, 30), (2.0, 1.0, 0.5))  # fmt: skip
    # world x = 10 − 2i, y = −5 − j, z = 3 + k/2: (6, −10.4, 4) is index (2, 5.4, 2), (0.2, −15.6, 8) is (4.9, 10.6, 10)
    data = {"c1": {"Liver": {"min": [6, -10.4, 4], "max": [0.2, -15.6, 8], "space": "world"},
                   "Tumor": {"min": [2, 5, 2], "max": [5, 11, 10]}}}  # fmt: skip
    found = PromptFile(tmp_path / "boxes.json", data).boxes("c1", geometry, {"Liver": 0, "Tumor": 1}.__getitem__)
    # rounded to the nearest voxel, max inclusive → high exclusive; the voxel box says the same
    assert found[0][0].tolist() == [2, 5, 2] and found[0][1].tolist() == [6, 12, 11]
    assert found[1][0].tolist() == [2, 5, 2] and found[1][1].tolist() == [6, 12, 11]
    data = {"c1": {"Liver": {"min": [100, 0, 0], "max": [90, 0, 0], "space": "world"}}}  # x = 100 mm: index −45
    with pytest.raises(MosaicSegError, match=r"case 'c1', box of 'Liver': .* outside the image"):
        PromptFile(tmp_path / "boxes.json", data).boxes("c1", geometry, {"Liver": 0}.__getitem__)
    data = {"c1": {"Liver": {"min": [0, 0, 0], "max": [1, 1, 1], "space": "mm"}}}
    with pytest.raises(MosaicSegError, match=r"boxes\.json: case 'c1', box of 'Liver': space 'mm' is neither"):
        PromptFile(tmp_path / "boxes.json", data).boxes("c1", geometry, {"Liver": 0}.__getitem__)


def test_predict_with_automatic_boxes_and_world_coordinate_boxes(experts, tiny_workdir_2d, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import mosaicseg.inference.predictor as predictor_module
    from mosaicseg.cli import app
    from mosaicseg.data.io import read_image
    from mosaicseg.data.vocabulary import Vocabulary
    from mosaicseg.runtime import save_checkpoint

    cfg = _cfg(recipe="ka2er", datasets=(CT, MR), recipe_options={"experts": _spec(experts, external=False)})
    Trainer(tiny_workdir_2d, cfg, tmp_path / "s" / "fold_0", progress=False).fit()
    # the first pass: the CT expert's run with its head set to find the liver everywhere and the tumour nowhere
    first = tmp_path / "first" / "fold_0"
    shutil.copytree(experts["ct"], first)
    ckpt = load_checkpoint(first / "checkpoint_final.pt")
    names = [t.name for t in Vocabulary.from_dict(ckpt["vocabulary"]).tasks]
    weight, bias = "head.convs.0.conv.conv.weight", "head.convs.0.conv.conv.bias"
    ckpt["model"][weight] = torch.zeros_like(ckpt["model"][weight])
    ckpt["model"][bias] = torch.tensor([10.0 if n == f"{CT}/Liver" else -10.0 for n in names])
    save_checkpoint(first / "checkpoint_final.pt", ckpt)

    seen: list[dict[int, tuple[list[float], list[float]]]] = []

    class Recorded(predictor_module.PromptedTiles):  # the boxes the student's tile forward is prompted with
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.append({k: (lo.tolist(), hi.tolist()) for k, (lo, hi) in self.boxes.items()})

    monkeypatch.setattr(predictor_module, "PromptedTiles", Recorded)
    image = sorted((tiny_workdir_2d.parent / "data" / CT / "imagesTr").iterdir())[0]
    case = image.name.split("_0000")[0]
    _, geometry = read_image(image)
    x, y, _ = geometry.file_shape  # a single-slice NIfTI: three file axes
    runner = CliRunner()
    base = ["predict", "-m", str(tmp_path / "s"), "-i", str(image), "--dataset", CT, "--precision", "fp32"]

    def predict(name: str, *extra: str) -> None:
        result = runner.invoke(app, [*base, "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output

    predict("auto", "--auto-boxes", str(tmp_path / "first"))
    assert json.loads((tmp_path / "auto" / "predict.json").read_text())["prompts"] == "auto"
    assert len(seen) == 1 and len(seen[0]) == 1  # a liver box; the first pass found no tumour, so no tumour box
    lo, _ = next(iter(seen[0].values()))
    assert lo == [0.0, 0.0]  # the first pass's liver fills the image: so does its box
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({case: {"Liver": {"min": [0, 0, 0], "max": [x - 1, y - 1, 0]}}}))
    predict("voxel_full", "--prompts", str(boxes))
    assert seen[1] == seen[0]  # the same box as the whole-image voxel box

    def world(index: list[int]) -> list[float]:
        direction = np.asarray(geometry.file_direction).reshape(3, 3)
        return (np.asarray(geometry.file_origin) + direction @ (np.asarray(geometry.file_spacing) * index)).tolist()

    # the file's direction flips its first two axes: the world corners come out swapped, the box is the same
    boxes.write_text(json.dumps({case: {"Liver": {"min": [3, 5, 0], "max": [40, 30, 0]}}}))
    predict("voxel", "--prompts", str(boxes))
    boxes.write_text(json.dumps({case: {"Liver": {"min": world([3, 5, 0]), "max": world([40, 30, 0]),
                                                  "space": "world"}}}))  # fmt: skip
    predict("world", "--prompts", str(boxes))
    assert seen[2] == seen[3] and seen[2] != seen[0]
    written = image.name.replace("_0000", "")
    assert np.array_equal(read_image(tmp_path / "voxel" / written)[0], read_image(tmp_path / "world" / written)[0])
