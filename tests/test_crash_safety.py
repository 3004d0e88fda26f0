"""Crash safety: SIGKILL at the worst moments, then resume; a failing disk never damages the last good file.

Each kill runs in a child process (``python -c``) that patches one function of the package to kill itself at
a chosen point — the package itself carries no fault-injection code.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import mosaicseg.atomic
from mosaicseg.config import TrainConfig
from mosaicseg.errors import MosaicSegError
from mosaicseg.runtime import load_checkpoint
from mosaicseg.training.loop import Trainer

CONFIG = dict(
    recipe="universal",
    optimizer="adamw",
    iterations=8,
    iterations_per_epoch=5,
    checkpoint_every=2,
    seed=3,
    device="cpu",
    val_max_cases=1,
)

PRELUDE = """
import json, os, signal, sys
from pathlib import Path
def die():
    os.kill(os.getpid(), signal.SIGKILL)
"""

TRAIN = (
    PRELUDE
    + """
from mosaicseg.config import TrainConfig
import mosaicseg.training.loop as loop
workdir, run, point, config = sys.argv[1], Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
cfg = TrainConfig(**config)
resume = (run / "checkpoint_latest.pt").exists() or (run / "config.json").exists()
trainer = loop.Trainer(workdir, cfg, run, resume=resume, progress=False)
if point == "mid-epoch":
    class Kill:
        def on_step_end(self, t, batch, outputs, losses):
            if t.iteration == 3:
                die()
    trainer.recipe.hooks.append(Kill())
elif point == "checkpoint":
    import mosaicseg.runtime as runtime
    real = runtime.atomic_write
    def torn(path, write, mode="wb"):
        # the second epoch-end save: half a checkpoint is on disk when the process dies
        if Path(path).name == "checkpoint_latest.pt" and trainer.iteration == 8:
            return real(path, lambda f: (f.write(b"PK" + b"x" * 5000), f.flush(), die()), mode)
        return real(path, write, mode)
    runtime.atomic_write = torn
elif point == "validation":
    real_validate = trainer.validate
    def validate(**kwargs):
        if trainer.iteration == 5:
            die()
        return real_validate(**kwargs)
    trainer.validate = validate
trainer.fit()
"""
)


def _run_child(script: str, *args: str) -> int:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stderr)
    return proc.returncode


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _records(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["iteration"], r["train_loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference(tiny_workdir_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    Trainer(tiny_workdir_2d, TrainConfig(**CONFIG), run, progress=False).fit()
    return run


@pytest.mark.parametrize("point", ["mid-epoch", "checkpoint", "validation"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(point, tiny_workdir_2d, reference, tmp_path):
    run = tmp_path / "run"
    config = json.dumps(CONFIG)
    assert _run_child(TRAIN, str(tiny_workdir_2d), str(run), point, config) == -signal.SIGKILL
    assert not (run / "checkpoint_final.pt").exists()
    latest = load_checkpoint(run / "checkpoint_latest.pt")  # never a torn file: the previous one is intact
    assert latest["iteration"] == {"mid-epoch": 2, "checkpoint": 6, "validation": 4}[point]
    assert _run_child(TRAIN, str(tiny_workdir_2d), str(run), "none", config) == 0
    _same_weights(reference / "checkpoint_final.pt", run / "checkpoint_final.pt")
    assert _records(run) == _records(reference)  # no duplicated or lost epoch record
    assert not list(run.glob(".*.tmp"))  # the torn temporary file was cleaned up on resume


def test_full_disk_keeps_the_previous_checkpoint(tiny_workdir_2d, tmp_path, monkeypatch):
    trainer = Trainer(tiny_workdir_2d, TrainConfig(**{**CONFIG, "iterations": 2}), tmp_path / "run", progress=False)
    trainer.fit()
    before = (tmp_path / "run" / "checkpoint_latest.pt").read_bytes()
    trainer.iteration = 99

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mosaicseg.atomic.os, "fsync", full)
    with pytest.raises(MosaicSegError, match=r"disk is full.*previous version of the file is intact"):
        trainer.save("latest")
    assert (tmp_path / "run" / "checkpoint_latest.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "run" / "checkpoint_latest.pt")["iteration"] == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []


PREPROCESS = (
    PRELUDE
    + """
import mosaicseg.data.preprocess as pre
workdir, kill_after = sys.argv[1], int(sys.argv[2])
real = pre.write_json_atomic
done = []
def meta_then_die(path, data):
    # the meta file is written last and marks a finished case; die right before the 3rd one
    if Path(path).parent.parent.name == "preprocessed" and kill_after >= 0:
        if len(done) == kill_after:
            die()
        done.append(path)
    return real(path, data)
pre.write_json_atomic = meta_then_die
print(json.dumps(pre.preprocess(workdir, workers=1, progress=False)))
"""
)


def test_preprocessing_resumes_after_sigkill(tiny_workdir_2d, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(tiny_workdir_2d, workdir, symlinks=True, ignore=shutil.ignore_patterns("preprocessed", "runs"))
    assert _run_child(PREPROCESS, str(workdir), "2") == -signal.SIGKILL
    metas = sorted(workdir.glob("preprocessed/*/*.json"))
    assert len(metas) == 2
    proc = subprocess.run([sys.executable, "-c", PREPROCESS, str(workdir), "-1"], capture_output=True, text=True)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["n_skipped"] == 2 and stats["n_done"] > 0
    for fresh in sorted(tiny_workdir_2d.glob("preprocessed/*/*.npy")):
        resumed = workdir / fresh.relative_to(tiny_workdir_2d)
        assert np.array_equal(np.load(fresh), np.load(resumed)), fresh.name
    assert not list(workdir.glob("preprocessed/*/.*.tmp*"))


PREDICT = (
    PRELUDE
    + """
import mosaicseg.inference.predictor as predictor
run, images, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real = predictor.write_image
calls = []
def write_then_die(path, *args, **kwargs):
    calls.append(path)
    if len(calls) == kill_at:
        die()
    return real(path, *args, **kwargs)
predictor.write_image = write_then_die
p = predictor.Predictor.from_checkpoint(run, device="cpu")
report = p.predict_files([images], out, dataset="Dataset912_SynthCT", progress=False)
print(json.dumps({"done": [c["case_id"] for c in report["cases"]], "skipped": report["skipped"]}))
"""
)


def test_prediction_resumes_after_sigkill(reference, tiny_workdir_2d, tmp_path):
    collection = json.loads((tiny_workdir_2d / "collection.json").read_text())
    source = Path(next(d["path"] for d in collection["datasets"] if d["path"].endswith("SynthCT")))
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((source / "imagesTr").iterdir())[:3]:
        (images / f.name).symlink_to(f)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _run_child(PREDICT, str(reference), str(images), str(whole), "0") == 0
    assert _run_child(PREDICT, str(reference), str(images), str(resumed), "2") == -signal.SIGKILL
    assert len(list(resumed.iterdir())) == 1  # the first case only; the second died before its rename
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT, str(reference), str(images), str(resumed), "0"], capture_output=True, text=True
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["skipped"]) == 1 and len(report["done"]) == 2
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    for name in names:
        a, b = sitk.ReadImage(str(whole / name)), sitk.ReadImage(str(resumed / name))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), name
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
