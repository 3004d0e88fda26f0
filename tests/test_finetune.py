"""Pre-train, then adapt: fine-tuning's schedule and freezing, ``extend`` (old outputs bit-identical, old and new
tasks from one model), training-case subsets, the ``finetune``/``extend`` commands and their bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest
import torch
from typer.testing import CliRunner

from mosaicseg.cli import app
from mosaicseg.config import TrainConfig
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.data.workdir import load_vocabulary
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.predictor import Predictor
from mosaicseg.models import parameter_parts
from mosaicseg.runtime import load_checkpoint
from mosaicseg.training.loop import Trainer, subset_cases
from mosaicseg.training.procedures import adaptation_config, adaptation_workdir
from mosaicseg.training.transfer import read_source

DERM, CT, MR = "Dataset911_SynthDerm", "Dataset912_SynthCT", "Dataset913_SynthMR"


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        recipe="universal", optimizer="adamw", iterations=2, iterations_per_epoch=2, seed=3, device="cpu", amp=False,
        val_max_cases=1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _pretrain(recipe: str, workdir: Path, folder: Path) -> Path:
    """A model pre-trained on SynthDerm and SynthCT (its fold folder)."""
    run = folder / "fold_0"
    options = {"fusion_depth": 1, "modality_tokens": 2, "prototype_dim": 8, "scales": [2, 4], "decoder_scales": [2]}
    cfg = _cfg(recipe=recipe, datasets=(DERM, CT), recipe_options=options if recipe == "hermes" else {})
    Trainer(workdir, cfg, run, progress=False).fit()
    return run


@pytest.fixture(scope="module", params=["universal", "hermes"])
def source_run(request, tiny_workdir_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pretrain(request.param, tiny_workdir_2d, tmp_path_factory.mktemp(f"source_{request.param}"))


def _batch(workdir: Path, datasets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A fixed input: a batch of training patches from ``datasets``' first cases (one per dataset)."""
    torch.manual_seed(0)
    vocab = load_vocabulary(workdir)
    images = torch.randn(len(datasets), 3, 32, 32)
    modality = torch.tensor([vocab.modality_index(d) for d in datasets])
    return {"image": images, "modality": modality}


def test_parts_split_every_parameter_into_encoder_decoder_and_head(source_run):
    ckpt = read_source(source_run)
    from mosaicseg.models import build_from_config

    model = build_from_config(ckpt["model_config"])
    parts = parameter_parts(model)
    assert set(parts) == {n for n, _ in model.named_parameters()}
    assert set(parts.values()) == {"encoder", "decoder", "head"}
    assert all(parts[n] == "encoder" for n in parts if n.startswith(("stems.", "backbone.encoder.")))
    assert all(parts[n] == "decoder" for n in parts if n.startswith("backbone.decoder."))
    heads = {n for n, p in parts.items() if p == "head"}
    if ckpt["model_config"]["kind"] == "hermes":
        assert {"task_bias", "fusion.0.pool.task", "fusion.0.pool.modality"} <= heads
        # fused at 2x and 4x in the encoder (fusion.0, .1) and at 2x in the decoder (fusion.2)
        blocks = {n: parts[n] for n in parts if n.startswith("fusion.") and ".pool." not in n}
        assert {n.split(".")[1] for n in blocks} == {"0", "1", "2"}
        assert all(part == ("decoder" if n.startswith("fusion.2.") else "encoder") for n, part in blocks.items())
    else:
        assert heads == {n for n in parts if n.startswith("head.")}


def test_finetune_schedule_rates_by_hand_and_the_head_phase_keeps_the_body_bit_identical(
    source_run, tiny_workdir_2d, tmp_path
):
    # 2 epochs of 2 iterations head only, then 3 epochs' warm-up of the rest, constant schedule at 1e-2
    cfg = _cfg(
        datasets=(DERM, CT), init_from=str(source_run), head_epochs=2, warmup_epochs=3, lr=1e-2, schedule="constant",
        iterations=4, recipe=load_checkpoint(source_run / "checkpoint_final.pt")["train_config"]["recipe"],
        recipe_options=load_checkpoint(source_run / "checkpoint_final.pt")["train_config"]["recipe_options"],
    )  # fmt: skip
    t = Trainer(tiny_workdir_2d, cfg, tmp_path / "ft", progress=False)
    rates = []
    for it in range(12):
        t.iteration = it
        t.set_learning_rates()
        rates.append({g["name"].split("/")[1]: g["lr"] for g in t.optimizer.param_groups})
    head = [r["head"] for r in rates]
    body = [r["body"] for r in rates]
    assert head == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2] + [1e-2] * 8)
    assert body == pytest.approx([0, 0, 0, 0] + [1e-2 * (i + 1) / 6 for i in range(6)] + [1e-2] * 2)
    t.iteration = 0
    parts = parameter_parts(t.model)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()  # 4 iterations: all in the head phase
    after = t.model.state_dict()
    body_names = [n for n, p in parts.items() if p != "head"]
    head_names = [n for n, p in parts.items() if p == "head"]
    assert body_names and all(torch.equal(after[n], before[n]) for n in body_names)
    assert any(not torch.equal(after[n], before[n]) for n in head_names)


@pytest.mark.parametrize(("freeze", "frozen"), [("encoder", {"encoder"}), ("backbone", {"encoder", "decoder"})])
def test_freeze_keeps_the_frozen_parts_bit_identical_and_trains_the_rest(
    freeze, frozen, tiny_workdir_2d, tmp_path, source_run
):
    ckpt = read_source(source_run)
    cfg = adaptation_config(
        ckpt, str(source_run), "finetune", datasets=(DERM, CT), freeze=freeze, head_epochs=0, warmup_epochs=0,
        iterations=2, iterations_per_epoch=2, device="cpu", amp=False, val_max_cases=1,
    )  # fmt: skip
    t = Trainer(tiny_workdir_2d, cfg, tmp_path / "frozen", progress=False)
    parts = parameter_parts(t.model)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    after = t.model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n, p in parts.items() if p in frozen)
    assert all(not p.requires_grad for n, p in t.model.named_parameters() if parts[n] in frozen)
    for part in {"encoder", "decoder", "head"} - frozen:  # every part not frozen trained
        assert any(not torch.equal(after[n], before[n]) for n, p in parts.items() if p == part), part


def test_extend_keeps_old_outputs_bit_identical_and_answers_old_and_new_tasks(source_run, tiny_workdir_2d, tmp_path):
    ckpt = read_source(source_run)
    old_vocab = Vocabulary.from_dict(ckpt["vocabulary"])
    cfg = adaptation_config(
        ckpt, str(source_run), "extend", datasets=(MR,), iterations=3, iterations_per_epoch=3, device="cpu",
        amp=False, val_max_cases=1, lr=1e-2,
    )  # fmt: skip
    t = Trainer(tiny_workdir_2d, cfg, tmp_path / "ext", progress=False)
    # the model grew: old tasks first (same indices), then the new dataset's, a new modality with a new stem
    assert [x.name for x in t.vocabulary.tasks[: old_vocab.num_tasks]] == [x.name for x in old_vocab.tasks]
    assert t.vocabulary.datasets == (DERM, CT, MR) and t.recipe.datasets == (MR,)
    assert t.vocabulary.modalities == (*old_vocab.modalities, "T1")
    assert {g.name for g in t.param_groups} >= {"new-tasks", "new-stems"}
    assert all(d == MR for d, _ in t.train_cases)
    assert any("modalities ['T1'] are new" in n for n in t.notes)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    ext = load_checkpoint(tmp_path / "ext" / "checkpoint_final.pt")
    new_rows = list(range(old_vocab.num_tasks, t.vocabulary.num_tasks))
    changed = [k for k in before if not torch.equal(before[k], ext["model"][k])]
    assert changed, "extend trained nothing"
    for name in changed:  # only new rows and the new stem moved
        if name.startswith("stems."):
            assert name.startswith(f"stems.stems.{t.vocabulary.modalities.index('T1')}.")
            continue
        old_rows = [i for i in range(before[name].shape[0]) if i not in new_rows]
        rows = old_rows if "pool.modality" not in name and "modality_head" not in name else range(2)
        assert torch.equal(before[name][list(rows)], ext["model"][name][list(rows)]), name

    # the old model and the extended one give bit-identical logits for the old tasks, asked as before
    from mosaicseg.models import build_from_config

    old_model = build_from_config(ckpt["model_config"])
    old_model.load_state_dict(ckpt["model"])
    new_model = build_from_config(ext["model_config"])
    new_model.load_state_dict(ext["model"])
    old_model.eval(), new_model.eval()
    batch = _batch(tiny_workdir_2d, (DERM, CT))
    for d in (DERM, CT):
        asked_old = torch.from_numpy(old_vocab.label_mask(d))[None].expand(2, -1)
        asked_new = torch.zeros(2, t.vocabulary.num_tasks, dtype=torch.bool)
        asked_new[:, : old_vocab.num_tasks] = asked_old
        with torch.no_grad():
            a = old_model(batch["image"], batch["modality"], tasks=asked_old).logits[0]
            b = new_model(batch["image"], batch["modality"], tasks=asked_new).logits[0]
        assert torch.equal(a, b[:, : old_vocab.num_tasks])

    # one checkpoint, one call: an old task and a new one
    predictor = Predictor.from_checkpoint(tmp_path / "ext", precision="fp32", jit=False)
    image = sorted((tiny_workdir_2d.parent / "data" / MR / "imagesTr").iterdir())[0]
    old_task, new_task = old_vocab.tasks[0].name, t.vocabulary.tasks[-1].name
    out = predictor.predict(image, dataset=MR, tasks=[old_task, new_task])
    assert set(out.masks) == {old_task, new_task}


def test_extend_refuses_a_dataset_the_model_knows(source_run, tiny_workdir_2d, tmp_path):
    ckpt = read_source(source_run)
    cfg = adaptation_config(ckpt, str(source_run), "extend", datasets=(CT, MR), iterations=1, device="cpu")
    with pytest.raises(MosaicSegError, match=r"already has \['Dataset912_SynthCT'\].*finetune"):
        Trainer(tiny_workdir_2d, cfg, tmp_path / "x", progress=False)


def test_a_patch_larger_than_every_image_is_refused_unless_the_network_comes_from_a_source(
    source_run, tiny_workdir_2d, tmp_path
):
    big = _cfg(datasets=(MR,), patch_size=(512, 512))
    with pytest.raises(MosaicSegError, match="larger than every training image"):
        Trainer(tiny_workdir_2d, big, tmp_path / "plain", progress=False)
    # fine-tuning keeps the source's network and patch: a target of small images (few shots) is padded
    tuned = Trainer(tiny_workdir_2d, replace(big, init_from=str(source_run)), tmp_path / "tuned", progress=False)
    assert any("padded, as the network comes from" in n for n in tuned.notes)


def test_case_subsets_are_seeded_per_dataset_and_saved(tiny_workdir_2d, tmp_path):
    train = [("A", f"a{i}") for i in range(10)] + [("B", f"b{i}") for i in range(3)]
    one = subset_cases(train, 2, None, seed=1)
    assert one == subset_cases(train, 2, None, seed=1) and len(one) == 4
    assert one != subset_cases(train, 2, None, seed=2) or subset_cases(train, 2, None, seed=3) != one
    assert sorted({d for d, _ in one}) == ["A", "B"]
    half = subset_cases(train, None, 0.5, seed=0)
    assert sum(d == "A" for d, _ in half) == 5 and sum(d == "B" for d, _ in half) == 2
    with pytest.raises(MosaicSegError, match=r"--cases 4: dataset B has only 3"):
        subset_cases(train, 4, None, seed=0)

    t = Trainer(tiny_workdir_2d, _cfg(datasets=(DERM, CT), cases=1), tmp_path / "sub", progress=False)
    assert sorted(d for d, _ in t.train_cases) == [DERM, CT]
    saved = json.loads((tmp_path / "sub" / "train_cases.json").read_text())
    assert [tuple(c) for c in saved] == t.train_cases
    assert any("seeded subset" in n for n in t.notes)
    with pytest.raises(MosaicSegError, match="only"):
        Trainer(tiny_workdir_2d, _cfg(datasets=(DERM,), cases=99), tmp_path / "big", progress=False)
    with pytest.raises(MosaicSegError, match="both cases and fraction"):
        _cfg(cases=1, fraction=0.5)


def test_adaptation_refuses_another_dimension_and_an_unfinished_run(
    source_run, tiny_workdir_3d, tiny_workdir_2d, tmp_path
):
    ckpt = read_source(source_run)
    with pytest.raises(MosaicSegError, match=r"the data is 3D but .* is a 2D model"):
        adaptation_workdir(ckpt, str(source_run), None, tiny_workdir_3d)
    raw3d = tiny_workdir_3d.parent / "data" / "Dataset902_SynthMR"
    with pytest.raises(MosaicSegError, match=r"the data is 3D but the pre-trained network is 2D"):
        adaptation_workdir(ckpt, str(source_run), raw3d, tmp_path / "w3", progress=False, workers=1)
    assert not (tmp_path / "w3" / "plans.json").exists()  # nothing written
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint_latest.pt").write_bytes((source_run / "checkpoint_final.pt").read_bytes())
    with pytest.raises(MosaicSegError, match=r"checkpoint_final.pt"):
        read_source(unfinished)
    with pytest.raises(MosaicSegError, match=r"-w/--workdir"):
        adaptation_workdir(ckpt, str(source_run), raw3d, None)


def test_finetune_and_extend_commands_plan_new_data_on_the_models_network(tiny_workdir_2d, tmp_path):
    source_run = _pretrain("universal", tiny_workdir_2d, tmp_path / "source")
    raw = tiny_workdir_2d.parent / "data" / MR
    runner = CliRunner()
    args = ["--dataset", str(raw), "-w", str(tmp_path / "w"), "--iterations", "2", "--iterations-per-epoch", "2",
            "--device", "cpu", "--precision", "fp32", "--val-max-cases", "1", "--workers", "1",
            "--val-mode", "cases"]  # fmt: skip
    result = runner.invoke(app, ["finetune", str(source_run), *args, "-o", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    assert "init_from" in result.output and "new" in result.output
    report = json.loads((tmp_path / "ft" / "init_report.json").read_text())
    assert report["new_tasks"] and not report["kept_tasks"] and report["new_modalities"] == ["T1"]
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["train_config"]["head_epochs"] == 10 and config["train_config"]["warmup_epochs"] == 50
    assert config["train_config"]["val_mode"] == "cases"
    plans = json.loads((tmp_path / "w" / "plans.json").read_text())
    source_plans = json.loads((tiny_workdir_2d / "plans.json").read_text())
    assert plans["network"]["features"] == source_plans["network"]["features"]

    result = runner.invoke(app, ["extend", str(source_run), *args, "-o", str(tmp_path / "ext")])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(tmp_path / "ext" / "checkpoint_final.pt")
    assert ckpt["train_config"]["val_mode"] == "cases"
    assert ckpt["vocabulary"]["datasets"] == [DERM, CT, MR]
    assert set(ckpt["plans"]["datasets"]) == {DERM, CT, MR}
    # from an exported one-fold bundle, on the work folder planned above
    result = runner.invoke(app, ["export", str(source_run.parent), "-o", str(tmp_path / "model.mosaic")])
    assert result.exit_code == 0, result.output
    bundle_args = ["--dataset", str(tmp_path / "w"), *args[4:]]
    result = runner.invoke(app, ["finetune", str(tmp_path / "model.mosaic"), *bundle_args, "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b" / "init_report.json").read_text())["loaded"]

    # a second extend of the same data into the extended model is refused with the fix
    result = runner.invoke(app, ["extend", str(tmp_path / "ext"), *args, "-o", str(tmp_path / "again")])
    assert result.exit_code == 2 and "already has" in result.output


def test_the_init_report_states_what_a_name_clash_means():
    from mosaicseg.training.transfer import InitReport

    clash = InitReport(source="RUN", kept_tasks=["Dataset901_SynthCT/Liver"], new_tasks=["Dataset999_New/Liver"])
    text = clash.summary()
    assert "tasks ['Dataset901_SynthCT/Liver'] have the same (dataset/label) names as the source's" in text
    assert "kept and fine-tuned" in text and "give its dataset another name" in text
    assert "same (dataset/label) names" not in InitReport(source="RUN", new_tasks=["A/x"]).summary()


def test_a_3d_single_run_fine_tunes_onto_another_dataset(tiny_workdir_3d, tmp_path):
    ct3d, mr3d = "Dataset901_SynthCT", "Dataset902_SynthMR"
    source = tmp_path / "single" / "fold_0"
    Trainer(tiny_workdir_3d, _cfg(recipe="single", dataset=ct3d), source, progress=False).fit()
    ckpt = read_source(source)
    cfg = adaptation_config(
        ckpt, str(source), "finetune", dataset=mr3d, head_epochs=1, warmup_epochs=1, iterations=3,
        iterations_per_epoch=1, device="cpu", amp=False, val_max_cases=1,
    )  # fmt: skip
    assert cfg.recipe == "single" and cfg.init_from == str(source)
    t = Trainer(tiny_workdir_3d, cfg, tmp_path / "ft", progress=False)
    report = t.init_report
    # the body comes from the CT model; MR's tasks and its T1 stem are new
    assert report.loaded and report.new_tasks and not report.kept_tasks and report.new_modalities == ["T1"]
    assert all(task.startswith(mr3d) for task in report.new_tasks)
    t.fit()
    predictor = Predictor.from_checkpoint(tmp_path / "ft", precision="fp32")
    image = sorted((tiny_workdir_3d.parent / "data" / mr3d / "imagesTr").iterdir())[0]
    written = predictor.predict_files([image], tmp_path / "pred", dataset=mr3d, progress=False)
    out = nib.load(written["cases"][0]["files"][0])
    assert out.shape == nib.load(image).shape[:3]
