"""Bad input through the command line: every kind exits with code 2, prints no traceback (unless ``--debug``)
and a message that names the file (or option), the problem and the fix.

Each entry of ``KINDS`` builds one bad input in ``tmp_path`` and returns the CLI arguments plus the words the
message must contain (a file name and the problem). The checks' own unit tests (``test_checks.py``) cover
the report details; this file holds the user-facing contract for each kind.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from typer.testing import CliRunner

from mosaicseg.cli import app


@dataclass
class Ctx:
    tmp: Path
    make_dataset: object
    monkeypatch: pytest.MonkeyPatch
    run: Callable[[], Path]  # a tiny trained 2D run (built on first use)
    workdir: Callable[[], Path]  # a private copy of the tiny 2D work folder


Case = tuple[list[str], list[str]]


def _check(folder: Path) -> list[str]:
    return ["check", str(folder), "--folds", "2", "--workers", "1"]


def _ds(ctx: Ctx, **kw) -> Path:
    return ctx.make_dataset(cases=kw.pop("cases", 2), **kw)


def _img(folder: Path, case: str = "case0", channel: int = 0) -> Path:
    return folder / "imagesTr" / f"{case}_{channel:04d}.nii.gz"


def _lbl(folder: Path, case: str = "case0") -> Path:
    return folder / "labelsTr" / f"{case}.nii.gz"


def _edit_json(folder: Path, fn: Callable[[dict], None]) -> Path:
    path = folder / "dataset.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    return path


def _collection(ctx: Ctx, datasets: list[dict], **extra) -> Path:
    path = ctx.tmp / "collection.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "folds": 2, "datasets": datasets, **extra}))
    return path


# ------------------------------------------------------------------------------------------------ data files
def corrupt_gzip(ctx: Ctx) -> Case:
    f = _img(_ds(ctx))
    f.write_bytes(gzip.compress(b"\x5c\x01\x00\x00" + os.urandom(100))[:-8] + os.urandom(8))
    return _check(f.parents[1]), [f.name, "unreadable"]


def truncated_nifti(ctx: Ctx) -> Case:
    f = _img(_ds(ctx))
    f.write_bytes(f.read_bytes()[:150])
    return _check(f.parents[1]), [f.name, "unreadable"]


def wrong_magic(ctx: Ctx) -> Case:
    f = _lbl(_ds(ctx))
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return _check(f.parents[1]), [f.name, "unreadable"]


def image_4d(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    ctx.make_dataset.write(_img(folder), np.ones((2, 8, 8, 8), np.float32))
    return _check(folder), ["case0_0000.nii.gz", "4"]


def shape_mismatch(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    ctx.make_dataset.write(_lbl(folder), np.zeros((6, 8, 8), np.uint8))
    return _check(folder), ["case0", "shape"]


def spacing_mismatch(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    ctx.make_dataset.write(_lbl(folder), ctx.make_dataset.default_label((8, 8, 8)), spacing=(1, 1, 2))
    return _check(folder), ["case0", "spacing"]


def orientation_mismatch(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    image = sitk.GetImageFromArray(ctx.make_dataset.default_label((8, 8, 8)))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(_lbl(folder)))
    return _check(folder), ["case0", "direction"]


def non_integer_label(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    ctx.make_dataset.write(_lbl(folder), np.full((8, 8, 8), 0.5, np.float32))
    return _check(folder), ["case0.nii.gz", "integer"]


def undeclared_label(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    ctx.make_dataset.write(_lbl(folder), np.full((8, 8, 8), 7, np.uint8))
    return _check(folder), ["case0.nii.gz", "7"]


def _nonfinite(ctx: Ctx, value: float) -> Path:
    folder = _ds(ctx, channels=("T1",))
    arr = np.ones((8, 8, 8), np.float32)
    arr[2, 2, 2] = value
    ctx.make_dataset.write(_img(folder), arr)
    return folder


def nan_image(ctx: Ctx) -> Case:
    return _check(_nonfinite(ctx, np.nan)), ["case0_0000.nii.gz", "NaN"]


def inf_image(ctx: Ctx) -> Case:
    return _check(_nonfinite(ctx, np.inf)), ["case0_0000.nii.gz", "inf"]


def all_zero_image(ctx: Ctx) -> Case:
    folder = _ds(ctx, channels=("T1",))
    ctx.make_dataset.write(_img(folder, "case1"), np.zeros((8, 8, 8), np.float32))
    return _check(folder), ["case1_0000.nii.gz", "empty image"]


def empty_label_set(ctx: Ctx) -> Case:
    folder = _ds(ctx, labels={"background": 0})
    return _check(folder), ["dataset.json", "label"]


def missing_channel_file(ctx: Ctx) -> Case:
    folder = _ds(ctx, channels=("T1", "T2"))
    _img(folder, "case1", 1).unlink()
    return _check(folder), ["case1", "channel"]


def extra_channel_file(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    shutil.copy(_img(folder), _img(folder, "case0", 1))
    return _check(folder), ["case0_0001.nii.gz", "channel"]


def label_without_image(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    shutil.copy(_lbl(folder), _lbl(folder, "stray"))
    return _check(folder), ["stray.nii.gz", "image"]


def missing_label_file(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    _lbl(folder, "case1").unlink()
    return _check(folder), ["case1", "label"]


def json_missing_keys(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    _edit_json(folder, lambda d: d.pop("labels"))
    return _check(folder), ["dataset.json", "labels"]


def json_wrong_types(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    _edit_json(folder, lambda d: d.update(numTraining="two"))
    return _check(folder), ["dataset.json", "numTraining"]


def json_duplicate_label_values(ctx: Ctx) -> Case:
    folder = _ds(ctx, labels={"background": 0, "Organ": 1, "Other": 1})
    return _check(folder), ["dataset.json", "Other"]


def json_syntax(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    (folder / "dataset.json").write_text('{"labels": {"background": 0,}')
    return _check(folder), ["dataset.json", "JSON"]


def num_training_mismatch(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    _edit_json(folder, lambda d: d.update(numTraining=5))
    return _check(folder), ["dataset.json", "numTraining"]


def unsupported_file_ending(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    _edit_json(folder, lambda d: d.update(file_ending=".jpg"))
    return _check(folder), ["dataset.json", ".jpg"]


def path_traversal(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    (ctx.tmp / "secret_0000.nii.gz").write_bytes(_img(folder).read_bytes())
    _edit_json(
        folder,
        lambda d: d.update(
            dataset={"case0": {"images": ["../secret_0000.nii.gz"], "label": "labelsTr/case0.nii.gz"}},
            numTraining=1,
        ),
    )
    return _check(folder), ["secret_0000.nii.gz", "outside"]


def non_utf8_name(ctx: Ctx) -> Case:
    folder = _ds(ctx)
    bad = os.fsencode(folder / "imagesTr") + b"/case\xff_0000.nii.gz"
    with open(bad, "wb") as f:
        f.write(_img(folder).read_bytes())
    return _check(folder), ["UTF-8"]


def permission_denied(ctx: Ctx) -> Case:
    # tests run as root, where chmod does not stop a read: inject the failure instead
    folder = _ds(ctx)
    target = _img(folder, "case1")
    real = sitk.ReadImage

    def refuse(path, *args, **kwargs):
        if str(path) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    ctx.monkeypatch.setattr(sitk, "ReadImage", refuse)
    return _check(folder), [target.name, "ermission"]


# ------------------------------------------------------------------------------------------------ collections
def collection_yaml_syntax(ctx: Ctx) -> Case:
    path = ctx.tmp / "collection.yaml"
    path.write_text("name: bad\ndatasets: [\n")
    return _check(path), ["collection.yaml", "YAML"]


def collection_unknown_key(ctx: Ctx) -> Case:
    path = _collection(ctx, [{"path": str(_ds(ctx))}], sampeling="inv_sqrt")
    return _check(path), ["collection.yaml", "sampeling"]


def collection_missing_dataset(ctx: Ctx) -> Case:
    path = _collection(ctx, [{"path": str(ctx.tmp / "Dataset404_Nowhere")}])
    return _check(path), ["Dataset404_Nowhere"]


def collection_mixing_2d_and_3d(ctx: Ctx) -> Case:
    a = ctx.make_dataset("Dataset001_Vol", cases=2)
    b = ctx.make_dataset("Dataset002_Flat", cases=2, shape=(8, 8), ending=".png", channels=("R", "G", "B"))
    return _check(_collection(ctx, [{"path": str(a)}, {"path": str(b)}])), ["2D", "3D"]


def label_names_clash(ctx: Ctx) -> Case:
    # the same dataset twice under two folders: every task name would exist twice
    a = ctx.make_dataset("Dataset001_Liver", cases=2)
    b = ctx.make_dataset("Dataset001_Liver", cases=2, root=ctx.tmp / "copy")
    return _check(_collection(ctx, [{"path": str(a)}, {"path": str(b)}])), ["Dataset001_Liver", "twice"]


def modality_channel_mismatch(ctx: Ctx) -> Case:
    a = ctx.make_dataset("Dataset001_One", cases=2, channels=("T1",))
    b = ctx.make_dataset("Dataset002_Two", cases=2, channels=("FLAIR", "T1c"))
    path = _collection(ctx, [{"path": str(a), "modality": "MR"}, {"path": str(b), "modality": "MR"}])
    return _check(path), ["Dataset002_Two", "channel counts"]


def unknown_modality(ctx: Ctx) -> Case:
    # nnU-Net users write normalisation schemes where a modality belongs
    folder = _ds(ctx, channels=("noNorm",))
    return _check(folder), ["dataset.json", "noNorm", "modality:"]


# ------------------------------------------------------------------------------------------------ training
def not_planned(ctx: Ctx) -> Case:
    return ["train", str(ctx.tmp / "empty"), "--iterations", "1"], ["empty", "plan"]


def bad_time_budget(ctx: Ctx) -> Case:
    return ["train", str(ctx.tmp), "--time-budget", "soon"], ["--time-budget", "soon"]


def unknown_recipe(ctx: Ctx) -> Case:
    return ["train", str(ctx.workdir()), "--recipe", "magic", "--iterations", "1"], ["magic", "recipe"]


def unknown_network(ctx: Ctx) -> Case:
    return ["train", str(ctx.workdir()), "--network", "vgg", "--iterations", "1"], ["vgg"]


def unknown_schedule(ctx: Ctx) -> Case:
    return ["train", str(ctx.workdir()), "--schedule", "cosine", "--iterations", "1"], ["cosine", "poly"]


def unknown_training_precision(ctx: Ctx) -> Case:
    return ["train", str(ctx.tmp), "--precision", "half", "--iterations", "1"], ["--precision", "half", "mixed"]


def patch_larger_than_every_image(ctx: Ctx) -> Case:
    workdir = ctx.workdir()
    plans_path = workdir / "plans.json"
    plans = json.loads(plans_path.read_text())
    plans["network"]["patch_size"] = [1024, 1024]
    plans_path.write_text(json.dumps(plans))
    return ["train", str(workdir), "--iterations", "1", "-o", str(ctx.tmp / "r")], ["plans.json", "patch"]


def resume_with_other_settings(ctx: Ctx) -> Case:
    run = ctx.run()
    return ["train", str(run.parent.parent.parent), "-o", str(run), "--resume", "--iterations", "7"], [
        str(run),
        "differ",
    ]


def checkpoint_from_other_vocabulary(ctx: Ctx) -> Case:
    run = ctx.run()
    workdir = ctx.workdir()
    vocab_path = workdir / "vocabulary.json"
    vocab = json.loads(vocab_path.read_text())
    vocab["tasks"][0]["name"] = "Dataset999_Other/Thing"
    vocab_path.write_text(json.dumps(vocab))
    copy = ctx.tmp / "copy_run"
    shutil.copytree(run, copy)
    cfg = json.loads((run / "config.json").read_text())["train_config"]
    return ["train", str(workdir), "-o", str(copy), "--resume", "--iterations", str(cfg["iterations"])], ["vocabulary"]


# ------------------------------------------------------------------------------------------------ prediction
def _some_image(ctx: Ctx) -> Path:
    run = ctx.run()
    cfg = json.loads((run.parent.parent.parent / "collection.json").read_text())
    folder = Path(cfg["datasets"][1]["path"])  # the synthetic CT dataset (1 channel, NIfTI)
    return next((folder / "imagesTr").glob("*_0000.nii.gz"))


def predict_unknown_task(ctx: Ctx) -> Case:
    args = ["predict", "-m", str(ctx.run()), "-i", str(_some_image(ctx)), "-o", str(ctx.tmp / "p")]
    return [*args, "--dataset", "Dataset912_SynthCT", "--tasks", "Spleen"], ["Spleen", "task"]


def predict_unknown_dataset(ctx: Ctx) -> Case:
    args = ["predict", "-m", str(ctx.run()), "-i", str(_some_image(ctx)), "-o", str(ctx.tmp / "p")]
    return [*args, "--dataset", "Dataset404_Nope"], ["Dataset404_Nope"]


def predict_output_is_a_file(ctx: Ctx) -> Case:
    out = ctx.tmp / "taken"
    out.write_text("mine")
    args = ["predict", "-m", str(ctx.run()), "-i", str(_some_image(ctx)), "-o", str(out)]
    return [*args, "--dataset", "Dataset912_SynthCT"], ["taken", "file"]


def predict_wrong_channel_count(ctx: Ctx) -> Case:
    image = _some_image(ctx)
    folder = ctx.tmp / "in"
    folder.mkdir()
    shutil.copy(image, folder / "x_0000.nii.gz")
    shutil.copy(image, folder / "x_0001.nii.gz")
    args = ["predict", "-m", str(ctx.run()), "-i", str(folder), "-o", str(ctx.tmp / "p")]
    return [*args, "--dataset", "Dataset912_SynthCT"], ["x_0000.nii.gz", "channel"]


def predict_3d_image_with_2d_model(ctx: Ctx) -> Case:
    image = ctx.make_dataset.write(ctx.tmp / "in" / "vol_0000.nii.gz", np.ones((8, 8, 8), np.float32))
    args = ["predict", "-m", str(ctx.run()), "-i", str(image), "-o", str(ctx.tmp / "p")]
    return [*args, "--dataset", "Dataset912_SynthCT"], ["vol_0000.nii.gz", "3D"]


def predict_empty_input_folder(ctx: Ctx) -> Case:
    (ctx.tmp / "in").mkdir()
    return ["predict", "-m", str(ctx.run()), "-i", str(ctx.tmp / "in"), "-o", str(ctx.tmp / "p")], ["in", "no image"]


def predict_unsupported_input(ctx: Ctx) -> Case:
    f = ctx.tmp / "scan.dcm"
    f.write_bytes(b"DICM")
    return ["predict", "-m", str(ctx.run()), "-i", str(f), "-o", str(ctx.tmp / "p")], ["scan.dcm", "unsupported"]


def not_a_checkpoint(ctx: Ctx) -> Case:
    f = ctx.tmp / "checkpoint_final.pt"
    f.write_bytes(os.urandom(300))
    return ["predict", "-m", str(f), "-i", str(ctx.tmp), "-o", str(ctx.tmp / "p")], ["checkpoint_final.pt"]


def crafted_pickle_checkpoint(ctx: Ctx) -> Case:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    f = ctx.tmp / "checkpoint_final.pt"
    f.write_bytes(pickle.dumps({"format": "mosaicseg/checkpoint", "x": Evil()}, protocol=2))
    return ["predict", "-m", str(f), "-i", str(ctx.tmp), "-o", str(ctx.tmp / "p")], ["checkpoint_final.pt", "refused"]


def disk_full(ctx: Ctx) -> Case:
    import mosaicseg.atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    ctx.monkeypatch.setattr(mosaicseg.atomic.os, "fsync", full)
    return ["synth", str(ctx.tmp / "synth"), "--dim", "2"], ["disk is full"]


# ------------------------------------------------------------------------------------------------ evaluation
def _eval_pair(ctx: Ctx) -> tuple[Path, Path, Path]:
    folder = _ds(ctx, cases=2)
    pred = ctx.tmp / "pred"
    pred.mkdir()
    return folder, pred, folder / "labelsTr"


def evaluate_missing_prediction(ctx: Ctx) -> Case:
    folder, pred, gt = _eval_pair(ctx)
    shutil.copy(gt / "case0.nii.gz", pred / "case0.nii.gz")
    return ["evaluate", str(pred), str(gt), "--dataset-json", str(folder / "dataset.json")], ["case1", "prediction"]


def evaluate_shape_mismatch(ctx: Ctx) -> Case:
    folder, pred, gt = _eval_pair(ctx)
    shutil.copy(gt / "case0.nii.gz", pred / "case0.nii.gz")
    ctx.make_dataset.write(pred / "case1.nii.gz", np.zeros((4, 8, 8), np.uint8))
    return ["evaluate", str(pred), str(gt), "--dataset-json", str(folder / "dataset.json")], ["case1", "shape"]


def evaluate_bad_mapping(ctx: Ctx) -> Case:
    folder, pred, gt = _eval_pair(ctx)
    args = ["evaluate", str(pred), str(gt), "--dataset-json", str(folder / "dataset.json")]
    return [*args, "--map", "Organ"], ["--map", "Organ"]


KINDS: dict[str, Callable[[Ctx], Case]] = {
    f.__name__: f
    for f in (
        corrupt_gzip,
        truncated_nifti,
        wrong_magic,
        image_4d,
        shape_mismatch,
        spacing_mismatch,
        orientation_mismatch,
        non_integer_label,
        undeclared_label,
        nan_image,
        inf_image,
        all_zero_image,
        empty_label_set,
        missing_channel_file,
        extra_channel_file,
        label_without_image,
        missing_label_file,
        json_missing_keys,
        json_wrong_types,
        json_duplicate_label_values,
        json_syntax,
        num_training_mismatch,
        unsupported_file_ending,
        path_traversal,
        non_utf8_name,
        permission_denied,
        collection_yaml_syntax,
        collection_unknown_key,
        collection_missing_dataset,
        collection_mixing_2d_and_3d,
        label_names_clash,
        modality_channel_mismatch,
        unknown_modality,
        not_planned,
        bad_time_budget,
        unknown_recipe,
        unknown_network,
        unknown_schedule,
        unknown_training_precision,
        patch_larger_than_every_image,
        resume_with_other_settings,
        checkpoint_from_other_vocabulary,
        predict_unknown_task,
        predict_unknown_dataset,
        predict_output_is_a_file,
        predict_wrong_channel_count,
        predict_3d_image_with_2d_model,
        predict_empty_input_folder,
        predict_unsupported_input,
        not_a_checkpoint,
        crafted_pickle_checkpoint,
        disk_full,
        evaluate_missing_prediction,
        evaluate_shape_mismatch,
        evaluate_bad_mapping,
    )
}


@pytest.fixture(scope="module")
def tiny_run(tiny_workdir_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-iteration universal run on the tiny synthetic 2D collection (inside a private work folder)."""
    from mosaicseg.config import TrainConfig
    from mosaicseg.training.loop import Trainer

    workdir = tmp_path_factory.mktemp("badrun") / "work"
    shutil.copytree(tiny_workdir_2d, workdir, symlinks=True)
    run = workdir / "runs" / "universal" / "fold_0"
    cfg = TrainConfig(iterations=2, iterations_per_epoch=2, val_max_cases=1, seed=0)
    Trainer(workdir, cfg, run, progress=False).fit()
    return run


@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_exits_2_with_file_problem_and_fix(kind, tmp_path, make_dataset, monkeypatch, request):
    def workdir() -> Path:
        dst = tmp_path / "work"
        if not dst.exists():
            shutil.copytree(request.getfixturevalue("tiny_workdir_2d"), dst, symlinks=True)
        return dst

    ctx = Ctx(tmp_path, make_dataset, monkeypatch, lambda: request.getfixturevalue("tiny_run"), workdir)
    monkeypatch.chdir(tmp_path)
    args, needles = KINDS[kind](ctx)
    result = CliRunner().invoke(app, args)
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}\n{out}\n{result.exception!r}"
    assert "Traceback" not in out, out
    assert "Fix" in out or "fix" in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    assert not (tmp_path / "pwned").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(app, ["--debug", "train", str(tmp_path / "nowhere"), "--iterations", "1"])
    assert result.exit_code != 2 and result.exception is not None
    assert type(result.exception).__name__ == "MosaicSegError"


def test_kinds_are_at_least_thirty():
    assert len(KINDS) >= 30


def test_plan_checks_the_data_first(make_dataset, tmp_path):
    folder = make_dataset(cases=2)
    make_dataset.write(folder / "labelsTr" / "case1.nii.gz", np.full((8, 8, 8), 7, np.uint8))
    result = CliRunner().invoke(app, ["plan", str(folder), "-o", str(tmp_path / "w"), "--workers", "1"])
    assert result.exit_code == 2 and "undeclared-label" in result.output and "case1.nii.gz" in result.output
    assert not (tmp_path / "w" / "plans.json").exists()
