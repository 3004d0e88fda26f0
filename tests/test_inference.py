"""Sliding window, TTA, the label rule, and the Predictor writing files in the input's exact geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mosaicseg.config import TrainConfig
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.outputs import export_case
from mosaicseg.inference.postprocess import (
    keep_largest_component,
    labels_from_probabilities,
    restore_probabilities,
)
from mosaicseg.inference.predictor import Predictor, group_inputs
from mosaicseg.inference.sliding_window import FrozenForward, TileModel, bind_modality, predict_logits
from mosaicseg.models import build_model, use_device_layout
from mosaicseg.training.loop import Trainer


def _plan(patch: list[int]) -> dict:
    nd = len(patch)
    return {
        "patch_size": patch,
        "features": [4, 8, 16],
        "num_stages": 3,
        "batch_size": 1,
        "kernel_sizes": [[3] * nd] * 3,
        "strides": [[1] * nd, [2] * nd, [2] * nd],
    }


@pytest.mark.parametrize("patch", [[16, 16], [16, 16, 8]])
def test_sliding_window_on_a_patch_sized_image_equals_the_whole_image_forward(patch):
    torch.manual_seed(0)
    model = build_model(_plan(patch), {"CT": 1, "RGB": 3}, num_tasks=3).eval()
    image = torch.randn(3, *patch)
    got = predict_logits(bind_modality(TileModel(model, torch.ones(3, dtype=torch.bool), 0), 1), image, patch)
    with torch.no_grad():
        want = model(image[None], torch.tensor([1])).logits[0][0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Pointwise(torch.nn.Module):
    """A 1x1 convolution: tiling cannot change its output, so any sliding window must reproduce it."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        self.conv = conv(2, 3, 1)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + modality.view(-1, *[1] * (x.ndim - 1)).float()


@pytest.mark.parametrize("shape,patch", [((37, 45), (16, 16)), ((21, 18, 13), (8, 8, 8))])
def test_sliding_window_and_mirroring_equal_the_whole_image_on_larger_inputs(shape, patch):
    torch.manual_seed(1)
    model = _Pointwise(len(shape)).eval()
    image = torch.randn(2, *shape)
    with torch.no_grad():
        want = model(image[None], torch.tensor([2]))[0]
    got = predict_logits(bind_modality(model, 2), image, patch, overlap=0.5, tile_batch=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mirrored = predict_logits(bind_modality(model, 2), image, patch, mirror_axes=tuple(range(len(shape))))
    torch.testing.assert_close(mirrored, want, rtol=1e-5, atol=1e-5)
    half = predict_logits(bind_modality(model, 2), image, patch, accumulate=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), want, rtol=1e-2, atol=5e-3)  # float16 blending: within 1 %


def test_frozen_forward_equals_the_model_with_one_checked_graph_per_tile_shape_and_modalities():
    torch.manual_seed(0)
    model = build_model(_plan([16, 16, 8]), {"CT": 1, "MR": 2}, num_tasks=3).eval()
    use_device_layout(model, torch.device("cpu"))  # channels-last, as prediction runs it
    model = TileModel(model, torch.ones(3, dtype=torch.bool), 0).eval()  # what the predictor freezes
    # kept whatever its speed, and built however slow the eager calls (on a loaded machine these tiny forwards took
    # over MAX_EAGER_S, and no graph was built)
    frozen = FrozenForward(model, build_after=2, min_speedup=None, max_eager_s=None)
    x = torch.randn(2, 2, 16, 16, 8)
    wanted = {}
    for mods in ([0, 0], [1, 1], [0, 1]):
        m = torch.tensor(mods)
        with torch.no_grad():
            wanted[tuple(mods)] = want = model(x, m)
        for call in range(4):  # eager, traced (its own eager result), checked against eager, graph alone
            torch.testing.assert_close(frozen(x, m), want, rtol=1e-4, atol=1e-4)
            assert frozen.num_graphs == len(wanted) - (call < 2)
    frozen.build_after = 1  # a new key: traced on its first call, checked on its second
    for _ in range(2):
        torch.testing.assert_close(frozen(x[:1], torch.tensor([1])), wanted[(1, 1)][:1], rtol=1e-4, atol=1e-4)
    assert frozen.num_graphs == 4
    # a checked key is answered by its graph, which kept the weights it was built with
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.head"):
                p.add_(1.0)
        changed = model(x, torch.tensor([0, 0]))
    assert not torch.allclose(changed, wanted[(0, 0)], atol=1e-2)
    torch.testing.assert_close(frozen(x, torch.tensor([0, 0])), wanted[(0, 0)], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval mode"):
        FrozenForward(model.train())


class _SignOfSum(torch.nn.Module):
    """Branches in Python on the input's values: a trace records the branch of its own input only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if float(x.sum()) > 0 else -self.conv(x)


def test_frozen_forward_drops_a_graph_that_differs_from_the_model_on_a_later_batch():
    torch.manual_seed(0)
    model = _SignOfSum().eval()
    frozen = FrozenForward(model, build_after=1)
    x, m = torch.rand(1, 1, 4, 4, 4) + 0.1, torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        plus, minus = model.conv(x), -model.conv(-x)
    torch.testing.assert_close(frozen(x, m), plus)  # traced on a positive input: the graph keeps that branch
    with pytest.warns(RuntimeWarning, match="differs from the eager model"):
        torch.testing.assert_close(frozen(-x, m), minus)  # checked on a negative one: caught, eager answer
    assert frozen.num_graphs == 0
    torch.testing.assert_close(frozen(-x, m), minus)  # eager from now on, without a second warning
    torch.testing.assert_close(frozen(x, m), plus)


def test_frozen_forward_drops_a_graph_that_is_not_faster_after_timing_it():
    from mosaicseg.inference.sliding_window import PROBE

    model = _SignOfSum().eval()
    frozen = FrozenForward(model, build_after=1, min_speedup=1e6)  # no graph is a million times faster
    x, m = torch.rand(1, 1, 4, 4, 4) + 0.1, torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        want = model.conv(x)
    for call in range(2 + PROBE + 1):  # traced, checked, timed PROBE times, then eager
        torch.testing.assert_close(frozen(x, m), want)
        assert frozen.num_graphs == (1 <= call <= PROBE)


def test_frozen_forward_never_traces_a_key_whose_eager_call_is_too_slow_to_win_back_a_graph(monkeypatch, recwarn):
    def no_trace(*args: object, **kwargs: object) -> None:
        raise AssertionError("traced a key whose eager calls exceed max_eager_s")

    model = _SignOfSum().eval()
    frozen = FrozenForward(model, build_after=2, max_eager_s=0.0)  # every eager call is slower than 0 s
    monkeypatch.setattr(torch.jit, "trace", no_trace)
    x, m = torch.rand(1, 1, 4, 4, 4) + 0.1, torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        want = model.conv(x)
    for _ in range(6):
        torch.testing.assert_close(frozen(x, m), want)
    assert frozen.num_graphs == 0 and not [w for w in recwarn if w.category is RuntimeWarning]
    # the same model under a bound it meets is traced, which shows the bound alone stopped it above
    fast = FrozenForward(model, build_after=2, max_eager_s=60.0)
    fast(x, m)
    with pytest.warns(RuntimeWarning, match="traced a key"):  # a failed trace falls back to eager, warning
        torch.testing.assert_close(fast(x, m), want)


def test_large_outputs_are_blended_in_half_precision(monkeypatch):
    import mosaicseg.inference.sliding_window as sw

    model = _Pointwise(2).eval()
    image = torch.randn(2, 20, 20)
    assert predict_logits(bind_modality(model, 0), image, (16, 16), tasks=[0, 2]).dtype == torch.float32
    monkeypatch.setattr(sw, "HALF_ABOVE_BYTES", 2 * 20 * 20 * 4 - 1)  # just below the float32 output size
    assert predict_logits(bind_modality(model, 0), image, (16, 16), tasks=[0, 2]).dtype == torch.float16


@pytest.mark.parametrize("regions", [False, True])
@pytest.mark.parametrize("largest", [False, True])
def test_streaming_export_equals_restoring_every_task_at_once(regions, largest):
    rng = np.random.default_rng(0)
    prob = rng.uniform(0, 1, size=(3, 9, 11, 6)).astype(np.float32)
    prob[1, 2:5] = prob[0, 2:5]  # ties: the earlier task must win, as with np.argmax
    meta = {
        "spacing_target": [2.0, 2.0, 3.0],
        "spacing_original": [1.0, 1.0, 1.5],
        "shape_cropped": [18, 22, 12],
        "shape_original": [20, 25, 14],
        "bbox": [[1, 19], [2, 24], [0, 12]],
        "separate_axis": None,
    }
    values = [(1, 2), (2,), (3,)] if regions else [(4,), (7,), (9,)]
    order = (1, 2, 3) if regions else None
    want = labels_from_probabilities(restore_probabilities(prob, meta), values, order, largest)
    seen = {}
    rows = [(t, t, f"label{t}", v) for t, v in enumerate(values)]
    got = export_case(
        prob.astype(np.float16),
        meta,
        {"D": rows},
        {"D": list(order) if order else None},
        [0.5] * 3,
        largest_component=largest,
        on_probability=lambda t, p: seen.setdefault(t, p),
    ).labels["D"]
    half = labels_from_probabilities(
        restore_probabilities(prob.astype(np.float16).astype(np.float32), meta), values, order, largest
    )
    np.testing.assert_array_equal(got, half)
    assert (got != want).mean() < 0.01  # float16 storage moves only voxels within ~1e-3 of 0.5 or of a tie
    assert sorted(seen) == [0, 1, 2] and seen[0].shape == (20, 25, 14)


def test_label_rule_highest_probability_above_half_else_background():
    prob = np.array([[0.9, 0.6, 0.4, 0.2], [0.7, 0.8, 0.45, 0.1]], dtype=np.float32)[:, None, :]  # (T=2, 1, 4)
    seg = labels_from_probabilities(prob, [(3,), (5,)])
    np.testing.assert_array_equal(seg[0], [3, 5, 0, 0])


def test_region_datasets_paint_regions_in_regions_class_order():
    # nnU-Net regions: Liver = {1, 2} (includes the tumour), Tumor = {2}; order [1, 2]: tumour painted last
    prob = np.array([[0.9, 0.9, 0.2], [0.1, 0.8, 0.9]], dtype=np.float32)
    seg = labels_from_probabilities(prob, [(1, 2), (2,)], regions_class_order=(1, 2))
    np.testing.assert_array_equal(seg, [1, 2, 2])


def test_largest_component_keeps_only_the_biggest_blob():
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:3, 1:3] = True
    mask[5:9, 5:9] = True
    kept = keep_largest_component(mask)
    assert kept.sum() == 16 and not kept[1, 1]


def test_group_inputs_pairs_channel_files(tmp_path):
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = group_inputs([tmp_path])
    assert [(c.case_id, [f.name for f in c.files]) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"]),
        ("b", ["b_0000.nii.gz"]),
    ]
    (tmp_path / "c_0001.nii.gz").write_bytes(b"")
    with pytest.raises(MosaicSegError, match="channel files \\[1\\]"):
        group_inputs([tmp_path])


def _train(workdir, run, fold=0, iterations=2):
    cfg = TrainConfig(
        recipe="universal",
        optimizer="adamw",
        iterations=iterations,
        iterations_per_epoch=iterations,
        device="cpu",
        fold=fold,
        val_max_cases=1,
    )
    Trainer(workdir, cfg, run / f"fold_{fold}", progress=False).fit()
    return run


def _same_geometry(a, b) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize()
    assert ia.GetSpacing() == ib.GetSpacing()
    assert ia.GetOrigin() == ib.GetOrigin()
    assert ia.GetDirection() == ib.GetDirection()


def test_predicted_files_have_the_input_geometry_exactly_3d(tiny_workdir_3d, tmp_path, monkeypatch):
    import functools

    import mosaicseg.inference.predictor as predictor_module

    # whether a graph is built and kept depends on the timing of these tiny forwards (MAX_EAGER_S, MIN_SPEEDUP),
    # which a loaded machine changes; the test is about what the graphs compute, so they are always built and kept
    free = functools.partial(FrozenForward, min_speedup=None, max_eager_s=None)
    monkeypatch.setattr(predictor_module, "FrozenForward", free)
    run = _train(tiny_workdir_3d, tmp_path / "run")
    predictor = Predictor.from_checkpoint(run, precision="fp32")  # float32 on the CPU: the frozen graphs
    data = tiny_workdir_3d.parent / "data"
    for dataset in ("Dataset901_SynthCT", "Dataset902_SynthMR", "Dataset903_SynthMulti"):
        images = sorted((data / dataset / "imagesTr").glob("*.nii.gz"))
        out = tmp_path / "pred" / dataset
        report = predictor.predict_files(images, out, dataset=dataset, save_probabilities=True, progress=False)
        assert len(report["cases"]) == 3
        for case in report["cases"]:
            first = next(p for p in images if p.name.startswith(case["case_id"] + "_0000"))
            label = out / f"{case['case_id']}.nii.gz"
            _same_geometry(label, first)
            values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label)))).tolist())
            declared = {1, 2}
            assert values <= {0} | declared
            probs = sorted(out.glob(f"{case['case_id']}_prob_*.nii.gz"))
            assert len(probs) == 2
            _same_geometry(probs[0], first)
    # existing outputs are kept unless overwrite
    again = predictor.predict_files(images, out, dataset="Dataset903_SynthMulti", progress=False)
    assert len(again["skipped"]) == 3 and not again["cases"]
    # the frozen graphs the CPU predictor ran give the eager model's probabilities
    frozen = list(predictor._tiles.values())
    assert frozen and all(isinstance(f, FrozenForward) for f in frozen) and frozen[0].num_graphs >= 1
    eager = Predictor.from_checkpoint(run, jit=False, precision="fp32")
    multi = "Dataset903_SynthMulti"
    image, geometry = predictor._read(group_inputs(images)[0], len(predictor.plans["datasets"][multi]["normalization"]))
    tasks = predictor.resolve_tasks(multi, None)
    got, _ = predictor.predict_resampled([image.copy()], geometry, multi, tasks, tta=True)
    want, _ = eager.predict_resampled([image.copy()], geometry, multi, tasks, tta=True)
    assert all(isinstance(f, TileModel) for f in eager._tiles.values())
    np.testing.assert_allclose(got, want, atol=1e-5)
    # bf16 autocast (eager: no graph) moves probabilities by rounding only, and labels barely
    mixed = Predictor.from_checkpoint(run, precision="mixed")
    bf16, _ = mixed.predict_resampled([image], geometry, multi, tasks, tta=True)
    assert mixed.amp and all(isinstance(f, TileModel) for f in mixed._tiles.values())
    assert not np.array_equal(bf16, want)  # it really ran in another precision
    np.testing.assert_allclose(bf16, want, atol=0.02)
    flipped = (bf16 > 0.5) != (want > 0.5)
    assert np.abs(want[flipped] - 0.5).max(initial=0.0) < 0.02  # only where float32 itself is on the threshold


def test_precision_auto_is_mixed_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    import mosaicseg.inference.predictor as predictor

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert predictor.resolve_precision("fp32", cuda) is False and predictor.resolve_precision("mixed", cpu) is True
    assert predictor.resolve_precision("auto", cuda) is True
    assert predictor.resolve_precision("mixed", torch.device("mps")) is False  # no autocast path there
    for native in (True, False):
        monkeypatch.setattr(predictor, "native_bf16", lambda native=native: native)
        assert predictor.resolve_precision("auto", cpu) is native
    with pytest.raises(MosaicSegError, match="precision 'half' is unknown"):
        predictor.resolve_precision("half", cpu)


def test_predict_png_and_2d_nifti_and_fold_ensemble(tiny_workdir_2d, tmp_path):
    run = _train(tiny_workdir_2d, tmp_path / "run", fold=0)
    _train(tiny_workdir_2d, run, fold=1)
    predictor = Predictor.from_checkpoint(run, precision="fp32")  # the blending comparison below is float32's
    assert len(predictor.models) == 2
    data = tiny_workdir_2d.parent / "data"
    pngs = sorted((data / "Dataset911_SynthDerm" / "imagesTr").glob("*.png"))[:2]
    report = predictor.predict_files(pngs, tmp_path / "derm", dataset="Dataset911_SynthDerm", progress=False)
    from PIL import Image

    for case in report["cases"]:
        src = next(p for p in pngs if p.name.startswith(case["case_id"]))
        out = np.asarray(Image.open(tmp_path / "derm" / f"{case['case_id']}.png"))
        assert out.shape == np.asarray(Image.open(src)).shape[:2]
    ct = sorted((data / "Dataset912_SynthCT" / "imagesTr").glob("*.nii.gz"))[:1]
    predictor.predict_files(ct, tmp_path / "ct", dataset="Dataset912_SynthCT", progress=False)
    case_id = ct[0].name[: -len("_0000.nii.gz")]
    _same_geometry(tmp_path / "ct" / f"{case_id}.nii.gz", ct[0])
    # the half-precision path of large volumes (forced here) gives the same label map up to threshold ties
    import mosaicseg.inference.sliding_window as sw

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sw, "HALF_ABOVE_BYTES", 0)
        predictor.predict_files(ct, tmp_path / "ct16", dataset="Dataset912_SynthCT", progress=False)
    full, half = (
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / f"{case_id}.nii.gz"))) for d in ("ct", "ct16")
    )
    assert (full != half).mean() < 0.001
    # every task: one output folder per source dataset, each in its own numbering
    everything = predictor.predict_files(
        ct,
        tmp_path / "all",
        dataset="Dataset912_SynthCT",
        tasks=["Dataset913_SynthMR/Kidney", "Dataset912_SynthCT/Tumor"],
        progress=False,
    )
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["Dataset912_SynthCT", "Dataset913_SynthMR"]
    assert everything["tasks"] == ["Dataset912_SynthCT/Tumor", "Dataset913_SynthMR/Kidney"]
    assert predictor.resolve_tasks("Dataset912_SynthCT", ["all"]) == list(range(predictor.vocabulary.num_tasks))
    with pytest.raises(MosaicSegError, match="unknown task"):
        predictor.predict_files(ct, tmp_path / "x", dataset="Dataset912_SynthCT", tasks=["Spleen"], progress=False)
    with pytest.raises(MosaicSegError, match="--dataset"):
        predictor.predict_files(ct, tmp_path / "x", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(MosaicSegError, match="is a file"):
        predictor.predict_files(ct, tmp_path / "file", dataset="Dataset912_SynthCT", progress=False)


def test_predict_command_records_where_each_case_s_time_went(tiny_workdir_3d, tmp_path):
    import json

    from typer.testing import CliRunner

    from mosaicseg.cli import PREDICT_RECORD, PREDICT_STAGES, app

    run = _train(tiny_workdir_3d, tmp_path / "run")
    images = tiny_workdir_3d.parent / "data" / "Dataset901_SynthCT" / "imagesTr"
    out = tmp_path / "pred"
    args = ["predict", "-m", str(run), "-i", str(images), "-o", str(out), "--dataset", "Dataset901_SynthCT"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / PREDICT_RECORD).read_text())
    assert len(record["cases"]) == 3 and record["tta"] is False and record["model"] == str(run)
    for case in record["cases"]:
        stages = [case[k] for k in PREDICT_STAGES]
        assert all(s > 0 for s in stages)
        # the stages tile the case: only bookkeeping between them is left out
        assert 0.9 * case["seconds"] - 0.01 <= sum(stages) <= case["seconds"]
    assert "s/case (read " in result.output and ", network " in result.output


def test_predict_warns_about_nan_and_inf_voxels_and_reads_them_as_the_channel_minimum(tiny_workdir_3d, tmp_path):
    import nibabel as nib

    run = _train(tiny_workdir_3d, tmp_path / "run")
    predictor = Predictor.from_checkpoint(run, precision="fp32", jit=False)
    source = sorted((tiny_workdir_3d.parent / "data" / "Dataset901_SynthCT" / "imagesTr").glob("*.nii.gz"))[0]
    nii = nib.load(source)
    values = np.asarray(nii.dataobj, dtype=np.float32)
    bad, filled = values.copy(), values.copy()
    for (i, j, k), v in zip([(3, 4, 5), (6, 7, 8), (1, 9, 2)], [np.nan, np.inf, -np.inf], strict=True):
        bad[i, j, k] = v
        filled[i, j, k] = np.nan  # placeholder: the finite minimum is taken over the other voxels
    filled[np.isnan(filled)] = np.nanmin(filled)
    for folder, array in (("bad", bad), ("filled", filled)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(array, nii.affine), tmp_path / folder / "case_0000.nii.gz")  # float32
    with pytest.warns(UserWarning, match=r"bad/case_0000\.nii\.gz.*\b3\b"):
        predictor.predict_files([tmp_path / "bad"], tmp_path / "p_bad", dataset="Dataset901_SynthCT",
                                save_probabilities=True, progress=False)  # fmt: skip
    predictor.predict_files([tmp_path / "filled"], tmp_path / "p_filled", dataset="Dataset901_SynthCT",
                            save_probabilities=True, progress=False)  # fmt: skip
    for got in sorted((tmp_path / "p_bad").iterdir()):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(got)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p_filled" / got.name)))
        np.testing.assert_array_equal(a, b)
