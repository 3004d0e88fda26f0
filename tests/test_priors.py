"""``mosaicseg priors``: cosine-similarity matrices of the learned task and modality priors (Hermes Fig. 4/5)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mosaicseg.cli import app
from mosaicseg.config import TrainConfig
from mosaicseg.data.workdir import load_vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.evaluation.priors import cosine_matrix, prior_vectors, read_matrix, write_priors
from mosaicseg.models import HermesNet
from mosaicseg.training.loop import Trainer


def test_cosine_matrix_by_hand():
    m = cosine_matrix(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [0.0, 0.0]]))
    h = 1 / math.sqrt(2)
    np.testing.assert_allclose(m, [[1, 0, h, 0], [0, 1, h, 0], [h, h, 1, 0], [0, 0, 0, 0]], atol=1e-12)


def test_hermes_vectors_are_each_tasks_tokens_over_every_scale_without_the_null_token():
    plan = {
        "patch_size": [32, 32], "features": [4, 8, 16], "kernel_sizes": [[3, 3]] * 3,
        "strides": [[1, 1]] + [[2, 2]] * 2,
    }  # fmt: skip
    torch.manual_seed(0)
    model = HermesNet(plan, {"T1": 1, "CT": 1}, 3, hermes={"head_dim": 4, "fusion_depth": 1, "modality_tokens": 2})
    assert model.fused_stages == [2]  # the 4x stage, 16 wide
    v = prior_vectors(model, ["A/x", "A/y", "B/z"], ["T1", "CT"])
    torch.testing.assert_close(torch.from_numpy(v.tasks), model.fusion[0].pool.task[:3].detach())
    torch.testing.assert_close(torch.from_numpy(v.modalities), model.fusion[0].pool.modality.detach().mean(1))
    assert v.sources == ["fusion.0.pool.task", "fusion.0.pool.modality"]  # task_bias: one number per task


def _run(workdir: Path, tmp: Path, recipe: str) -> Path:
    cfg = TrainConfig(recipe=recipe, iterations=2, iterations_per_epoch=2, val_max_cases=1, seed=0, amp=False)
    run = tmp / recipe / "fold_0"
    Trainer(workdir, cfg, run, progress=False).fit()
    return run.parent


def test_priors_of_a_hermes_run_write_labelled_symmetric_matrices_and_heatmaps(tiny_workdir_2d, tmp_path):
    run = _run(tiny_workdir_2d, tmp_path, "hermes")
    out = tmp_path / "priors"
    written = write_priors(run, out)
    assert set(written) == {"tasks_csv", "tasks_png", "modalities_csv", "modalities_png"}
    vocab = load_vocabulary(tiny_workdir_2d)
    names, tasks = read_matrix(out / "task_priors.csv")
    assert names == [t.name for t in vocab.tasks] and tasks.shape == (vocab.num_tasks, vocab.num_tasks)
    np.testing.assert_allclose(tasks, tasks.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(tasks), 1.0, atol=1e-6)
    assert not np.allclose(tasks, 1.0)  # learned tokens, not copies
    names, modalities = read_matrix(out / "modality_priors.csv")
    assert names == list(vocab.modalities) and modalities.shape == (len(names), len(names))
    for png in ("task_priors.png", "modality_priors.png"):
        with Image.open(out / png) as image:
            assert image.size[0] > 400 and len(np.unique(np.asarray(image.convert("L")))) > 10
    with pytest.raises(MosaicSegError, match=r"exists already.*--overwrite"):
        write_priors(run, out)
    assert write_priors(run, out, overwrite=True) == written


def test_priors_of_a_universal_run_from_its_heads_and_a_kind_without_task_vectors_is_refused(tiny_workdir_2d, tmp_path):
    run = _run(tiny_workdir_2d, tmp_path, "universal")
    result = CliRunner().invoke(app, ["priors", str(run), "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    names, tasks = read_matrix(tmp_path / "p" / "task_priors.csv")
    assert len(names) == tasks.shape[0] == load_vocabulary(tiny_workdir_2d).num_tasks
    assert not (tmp_path / "p" / "modality_priors.csv").exists()  # no modality prior in a universal model
    assert re.search(r"task priors: mean cosine within a dataset -?\d\.\d\d; across datasets -?\d\.\d\d", result.output)
    dodnet = _run(tiny_workdir_2d, tmp_path, "dodnet")
    result = CliRunner().invoke(app, ["priors", str(dodnet), "-o", str(tmp_path / "q")])
    assert result.exit_code == 2 and "no per-task vectors" in result.output
    assert not (tmp_path / "q").exists()


def test_a_heatmap_of_36_tasks_gives_each_row_room_for_its_label(tmp_path):
    from mosaicseg.evaluation.priors import _heatmap

    names = [f"Dataset{d:03d}_Set{d}/Structure_{k}" for d in range(6) for k in range(6)]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(36, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    _heatmap(tmp_path / "h.png", names, vectors @ vectors.T, "36 tasks")
    with Image.open(tmp_path / "h.png") as image:
        width, height = image.size
    # ≥ 20 pixels a row (a 5-point label is ~10 px at 120 dpi), the figure growing with the rows
    assert height / 36 >= 20 and width >= height


def test_summarise_measures_blocks_nearest_tasks_and_mirror_pairs() -> None:
    from mosaicseg.evaluation.priors import describe, mirror_pairs, summarise

    names = ["A/Caudate_L", "A/Caudate_R", "A/Putamen_L", "A/Putamen_R", "A/BrainStem", "B/LV"]
    upper = {(0, 1): 0.8, (0, 2): 0.1, (0, 3): 0.2, (0, 4): 0.5, (0, 5): 0.9, (1, 2): 0.3, (1, 3): 0.0,
             (1, 4): -0.1, (1, 5): -0.2, (2, 3): 0.6, (2, 4): 0.0, (2, 5): 0.0, (3, 4): 0.0, (3, 5): 0.1,
             (4, 5): 0.2}  # fmt: skip
    m = np.eye(6)
    for (i, j), v in upper.items():
        m[i, j] = m[j, i] = v
    s = summarise(names, m)
    # A's 10 distinct pairs sum to 2.4; A with B: (0.9 - 0.2 + 0 + 0.1 + 0.2) / 5; B has one task
    assert s["blocks"]["A"]["A"] == pytest.approx(0.24) and s["blocks"]["A"]["B"] == pytest.approx(0.2)
    assert s["blocks"]["B"]["A"] == pytest.approx(0.2) and s["blocks"]["B"]["B"] is None
    assert s["nearest"]["A/Caudate_L"] == ("B/LV", 0.9) and s["nearest"]["A/BrainStem"] == ("A/Caudate_L", 0.5)
    assert s["nearest_same_dataset"] == pytest.approx(4 / 6)  # all but Caudate_L and LV
    # pairs (0.8 + 0.6) / 2; the other pairs of the mirrored tasks (0.1, 0.2, 0.3, 0.0); BrainStem left out
    assert s["mirror"]["pairs"] == [("A/Caudate_L", "A/Caudate_R"), ("A/Putamen_L", "A/Putamen_R")]
    assert s["mirror"]["pair_mean"] == pytest.approx(0.7) and s["mirror"]["other_mean"] == pytest.approx(0.15)
    assert describe(s) == (
        "task priors: mean cosine within a dataset 0.24; across datasets 0.20; 67% of the tasks nearest to a task of "
        "their own dataset; left/right pairs 0.70 (other pairs of those datasets 0.15)"
    )
    # left/right spelled out pair too; one name in two datasets does not
    assert mirror_pairs(["X/AmygdalaLeft", "X/AmygdalaRight", "Y/Foo_L", "Z/Foo_R"]) == [(0, 1)]
    with pytest.raises(ValueError, match="3 names"):
        summarise(names[:3], m)
