"""The baselines as recipes (dodnet, uniseg, multidecoder, clip) on the synthetic collection: each trains,
checkpoints and predicts through the one Trainer and Predictor; clip's embeddings file and the predictor's
``--modality`` and task checks fail clearly and write nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import StopAt  # tests/ is on sys.path under pytest's default import mode
from typer.testing import CliRunner

from mosaicseg.cli import app
from mosaicseg.config import TrainConfig
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.predictor import Predictor, progress_label
from mosaicseg.models import build_from_config
from mosaicseg.runtime import load_checkpoint
from mosaicseg.training.loop import Trainer


def _cfg(recipe: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        recipe=recipe, iterations=2, iterations_per_epoch=2, seed=4, device="cpu", val_max_cases=1, amp=False
    )
    base.update(kw)
    return TrainConfig(**base)


def _embeddings(workdir: Path, path: Path, width: int = 8, rows: int | None = None) -> Path:
    tasks = json.loads((workdir / "vocabulary.json").read_text())["tasks"]
    np.save(path, np.random.default_rng(0).normal(size=(rows or len(tasks), width)).astype(np.float32))
    return path


@pytest.mark.parametrize("recipe", ["dodnet", "uniseg", "multidecoder", "clip"])
def test_each_baseline_trains_checkpoints_and_predicts(recipe, tiny_workdir_2d, tmp_path):
    options = {"task_embeddings": str(_embeddings(tiny_workdir_2d, tmp_path / "e.npy"))} if recipe == "clip" else {}
    trainer = Trainer(tiny_workdir_2d, _cfg(recipe, recipe_options=options), tmp_path / "run", progress=False)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_final.pt")
    assert ckpt["model_config"]["kind"] == recipe
    assert any(not torch.equal(start[k], v) for k, v in ckpt["model"].items())  # it trained
    rebuilt = build_from_config(ckpt["model_config"])
    rebuilt.load_state_dict(ckpt["model"])  # every trained tensor (clip: the embeddings too) round-trips
    predictor = Predictor.from_checkpoint(tmp_path / "run", precision="fp32")
    # the predictor's model is the trained one: same logits as the Trainer's model on one input
    k = trainer.vocabulary.num_tasks
    channels = trainer.model.stems.channels[0]
    x, modality = torch.randn(1, channels, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0])
    every = torch.ones(1, k, dtype=torch.bool)
    with torch.no_grad():
        expected = trainer.model.eval()(x, modality, tasks=every).logits[0]
        torch.testing.assert_close(predictor.models[0](x, modality, tasks=every).logits[0], expected)
    raw = tiny_workdir_2d.parent / "data" / "Dataset912_SynthCT" / "imagesTr"
    image = sorted(raw.iterdir())[0]
    report = predictor.predict_files([image], tmp_path / "pred", dataset="Dataset912_SynthCT", progress=False)
    assert len(report["cases"]) == 1 and Path(report["cases"][0]["files"][0]).is_file()
    # the progress bar says how a model that does not run all tasks in one plain forward evaluates them
    label = progress_label(predictor.models[0], k)
    notes = {
        "dodnet": f"dodnet: {k} task(s), one dynamic head each, batched (equals one forward per task)",
        "clip": f"clip: {k} task(s), one dynamic head each",
        "uniseg": "uniseg: the decoder runs once per tile for each dataset whose tasks are asked",
    }
    assert label == "predict" if recipe == "multidecoder" else notes[recipe] in label
    # every task of the collection, one output folder per source dataset
    report = predictor.predict_files(
        [image], tmp_path / "all", dataset="Dataset912_SynthCT", tasks=["all"], progress=False
    )
    datasets = json.loads((tiny_workdir_2d / "vocabulary.json").read_text())["datasets"]
    assert {Path(f).parent.name for f in report["cases"][0]["files"]} == set(datasets)


def test_clip_says_how_to_get_embeddings_and_checks_their_shape(tiny_workdir_2d, tmp_path):
    with pytest.raises(MosaicSegError, match=r"--task-embeddings FILE.*downloads nothing|downloads nothing.*FILE"):
        Trainer(tiny_workdir_2d, _cfg("clip"), tmp_path / "a")
    wrong = _embeddings(tiny_workdir_2d, tmp_path / "wrong.npy", rows=3)
    with pytest.raises(MosaicSegError, match=r"shape \[3, 8\], the model has \d+ tasks"):
        Trainer(tiny_workdir_2d, _cfg("clip", recipe_options={"task_embeddings": str(wrong)}), tmp_path / "b")
    names = [t["name"] for t in json.loads((tiny_workdir_2d / "vocabulary.json").read_text())["tasks"]]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({n: [0.0, 1.0] for n in names[1:]}))
    with pytest.raises(MosaicSegError, match=r"no embedding for tasks \['" + names[0]):
        Trainer(tiny_workdir_2d, _cfg("clip", recipe_options={"task_embeddings": str(partial)}), tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_train_cli_takes_task_embeddings_and_predict_checks_modality_and_tasks(tiny_workdir_2d, tmp_path):
    runner = CliRunner()
    emb = _embeddings(tiny_workdir_2d, tmp_path / "e.npy")
    run = tmp_path / "run"
    args = ["train", str(tiny_workdir_2d), "--recipe", "clip", "--task-embeddings", str(emb), "--iterations", "1"]
    result = runner.invoke(app, [*args, "--iterations-per-epoch", "1", "--val-max-cases", "1", "-o", str(run)])
    assert result.exit_code == 0, result.output
    image = sorted((tiny_workdir_2d.parent / "data" / "Dataset912_SynthCT" / "imagesTr").iterdir())[0]
    base = ["predict", "-m", str(run), "-i", str(image), "--dataset", "Dataset912_SynthCT"]
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "p1"), "--modality", "PET"])
    assert bad.exit_code == 2 and "--modality 'PET'" in bad.output and "Fix" in bad.output
    unknown = runner.invoke(app, [*base, "-o", str(tmp_path / "p2"), "--tasks", "NoSuchTask"])
    assert unknown.exit_code == 2 and "NoSuchTask" in unknown.output
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()


def test_resume_with_a_changed_embeddings_file_is_refused_before_loading(tiny_workdir_2d, tmp_path):
    emb = _embeddings(tiny_workdir_2d, tmp_path / "e.npy", width=8)
    cfg = _cfg("clip", iterations=4, iterations_per_epoch=1, recipe_options={"task_embeddings": str(emb)})
    stopped = Trainer(tiny_workdir_2d, cfg, tmp_path / "run", progress=False)
    stopped.recipe.hooks.append(StopAt(1))
    stopped.fit()
    _embeddings(tiny_workdir_2d, emb, width=6)  # the file the run started with, rewritten 6 wide
    with pytest.raises(MosaicSegError, match=r"differs from the checkpoint's \(changed: \['embedding_shape'\]\)"):
        Trainer(tiny_workdir_2d, cfg, tmp_path / "run", progress=False, resume=True).fit()


def test_uniseg_prompts_per_dataset_by_default_and_per_task_when_asked(tiny_workdir_2d, tmp_path):
    vocabulary = json.loads((tiny_workdir_2d / "vocabulary.json").read_text())
    default = Trainer(tiny_workdir_2d, _cfg("uniseg"), tmp_path / "d", progress=False).model
    assert default.prompts.shape[0] == len(vocabulary["datasets"])
    options = {"prompt": "task"}
    per_task = Trainer(tiny_workdir_2d, _cfg("uniseg", recipe_options=options), tmp_path / "t", progress=False).model
    assert per_task.prompts.shape[0] == len(vocabulary["tasks"])
    with pytest.raises(MosaicSegError, match=r"prompt='organ' is unknown\. Fix: --recipe-option prompt=dataset"):
        Trainer(tiny_workdir_2d, _cfg("uniseg", recipe_options={"prompt": "organ"}), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()  # nothing written
