"""Few-shot adaptation (ASAP and its baselines): the bandit's arithmetic by hand, the turn's gradients, shot
draws, resume, the ``adapt`` command end to end and its refusals."""

from __future__ import annotations

import gc
import json
import math
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import StopAt  # tests/ is on sys.path under pytest's default import mode
from typer.testing import CliRunner

from mosaicseg.cli import app
from mosaicseg.config import TrainConfig
from mosaicseg.data.workdir import list_cases
from mosaicseg.errors import MosaicSegError
from mosaicseg.fewshot import (
    AdaptSettings,
    check_request,
    draw_shots,
    fold_config,
    peak_rss_mb,
    reset_peak_rss,
    resolve_dataset,
    split_target,
)
from mosaicseg.models import parameter_parts
from mosaicseg.runtime import load_checkpoint
from mosaicseg.training import auxiliary
from mosaicseg.training.bandit import Exp3Sampler, UCBBandit, alpha_at, cosine, gradient_magnitude_similarity
from mosaicseg.training.loop import Trainer

DERM, CT, MR = "Dataset911_SynthDerm", "Dataset912_SynthCT", "Dataset913_SynthMR"


# ------------------------------------------------------------------------------------------------ the bandit
def test_initial_pass_pulls_every_arm_once_with_half_loss_half_cosine_reward():
    b = UCBBandit(3, reward_loss="raw")
    b.initialise([1.0, 2.0, 0.5], [0.2, -0.4, 1.0])
    assert b.counts == [1, 1, 1]
    assert b.estimates == pytest.approx([0.5 * -1.0 + 0.1, 0.5 * -2.0 - 0.2, 0.5 * -0.5 + 0.5])
    n = UCBBandit(2)  # normalized: L0 = 1.5, R^PM = (1.5 - L) / (1.5 + L)
    n.initialise([1.0, 2.0], [0.0, 0.0])
    assert n.reference_loss == 1.5
    assert n.estimates == pytest.approx([0.5 * 0.5 / 2.5, 0.5 * -0.5 / 3.5])


def test_ucb_arithmetic_and_seeded_tie_breaking():
    b = UCBBandit(3, reward_loss="raw", seed=4)
    b.initialise([0.0, 0.0, 0.0], [0.5, 0.5, 0.5])  # all equal: R̂ = 0.25, n = 1
    assert b.ucb(2) == pytest.approx([0.25 + math.sqrt(2 * math.log(2))] * 3)
    first = b.choose(2)
    assert first == b.order[0] and sorted(b.order) == [0, 1, 2]
    assert UCBBandit(3, seed=4).order == b.order  # the same seed, the same order
    assert any(UCBBandit(3, seed=s).order != b.order for s in range(5))
    # pulling an arm lowers its bonus: sqrt(2 ln 3 / 2) < sqrt(2 ln 3 / 1); the others win the next turn
    b.update(first, turn=2, turns=10, loss=0.0, cos=0.5)
    assert b.counts[first] == 2
    assert b.choose(3) != first
    assert b.ucb(3)[first] == pytest.approx(b.estimates[first] + math.sqrt(2 * math.log(3) / 2))
    assert UCBBandit(2, seed=0).ucb(5) == [math.inf, math.inf]  # never pulled


def test_alpha_and_beta_schedules_by_hand():
    assert [alpha_at(t, 4, 0.5, "linear") for t in (1, 2, 3, 4, 5)] == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])
    assert alpha_at(3, 4, 0.5, "constant") == 0.5
    assert alpha_at(3, 4, 1.0, "exponential") == pytest.approx(0.01**0.5)
    b = UCBBandit(1, beta=0.2, alpha0=0.5, reward_loss="raw")
    b.initialise([1.0], [0.0])  # R̂ = -0.5
    r = b.update(0, turn=2, turns=4, loss=2.0, cos=0.5)  # α = 0.375: R = 0.375·(-2) + 0.625·0.5
    assert r == pytest.approx(-0.4375)
    assert b.estimates[0] == pytest.approx(0.8 * -0.5 + 0.2 * -0.4375)


def test_cosine_reward_sign_and_gradient_magnitude_similarity():
    g_t = np.array([1.0, 2.0, 0.0])
    assert cosine(2 * g_t, g_t) == pytest.approx(1.0)
    assert cosine(-g_t, g_t) == pytest.approx(-1.0)
    assert cosine(np.array([-2.0, 1.0, 0.0]), g_t) == pytest.approx(0.0)
    assert cosine(np.zeros(3), g_t) == 0.0
    # flattened gradients are compared as tensors where they are (a CUDA tensor has no .numpy())
    t = torch.tensor([[1.0, 2.0, 0.0], [-2.0, 1.0, 0.5]])
    assert cosine(t[0], t[1]) == pytest.approx(cosine(t[0].numpy(), t[1].numpy()), abs=1e-12)
    assert cosine(torch.zeros(3), t[0]) == 0.0
    b = UCBBandit(2, alpha0=0.0, reward_loss="raw")  # α = 0: the reward is the cosine alone
    b.initialise([1.0, 1.0], [0.0, 0.0])
    assert b.update(0, 1, 10, 1.0, cosine(g_t, g_t)) > 0 > b.update(1, 1, 10, 1.0, cosine(-g_t, g_t))
    assert gradient_magnitude_similarity(3.0, 3.0) == 1.0
    assert gradient_magnitude_similarity(1.0, 3.0) == pytest.approx(2 * 3 / 10)


def test_exp3_rewards_aligned_arms():
    e = Exp3Sampler(2, gamma=0.2)
    assert e.probabilities() == pytest.approx([0.5, 0.5])
    assert e.update(0, 1.0) == 1.0 and e.update(1, -1.0) == 0.0
    assert e.probabilities()[0] > 0.5  # w_0 grew by exp(0.2 · (1 / 0.5) / 2)
    assert e.log_weights == pytest.approx([0.2, 0.0])


# ------------------------------------------------------------------------------------------------ shots
def test_shot_draws_are_seeded_and_disjoint_from_evaluation():
    cases = [f"c{i:02d}" for i in range(20)]
    s = AdaptSettings(target="x", shots=3, eval_cases=8, seed=5)
    evaluation, pool = split_target(cases, s)
    assert len(evaluation) == 8 and not set(evaluation) & set(pool) and len(pool) == 12
    assert split_target(cases, s) == (evaluation, pool)
    folds = [draw_shots(pool, 3, 5, f) for f in range(3)]
    assert all(set(f) <= set(pool) for f in folds) and folds == [draw_shots(pool, 3, 5, f) for f in range(3)]
    assert len({tuple(f) for f in folds}) > 1  # the folds draw differently
    with pytest.raises(MosaicSegError, match="at least one must stay out"):
        split_target(cases[:3], AdaptSettings(target="x", shots=3))
    with pytest.raises(MosaicSegError, match="only 2 target cases"):
        split_target(cases[:10], AdaptSettings(target="x", shots=3, eval_cases=8))
    evaluation, pool = split_target(cases, AdaptSettings(target="x", shots=2, eval_list=["c03", "c07"]))
    assert evaluation == ["c03", "c07"] and "c03" not in pool


# ------------------------------------------------------------------------------------------------ turns
def _cfg(strategy: str, arms: list[list[Any]], **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        recipe="adapt", fold="all", optimizer="adamw", lr=1e-3, iterations=6, iterations_per_epoch=3, seed=2,
        device="cpu", amp=False, val_every=10**6, train_case_ids=None,
        recipe_options={"strategy": strategy, "target": DERM, "arms": arms},
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


ARMS = [[CT, None], [MR, None], [CT, "Tumor"]]


@pytest.mark.parametrize("strategy", ["asap", "gms", "mtl", "dal", "finetune"])
def test_every_strategy_runs_turns_and_logs_them(strategy, tiny_workdir_2d, tmp_path):
    t = Trainer(tiny_workdir_2d, _cfg(strategy, ARMS), tmp_path / strategy, progress=False)
    assert t.recipe.datasets == ((DERM, CT, MR) if strategy != "finetune" else (DERM,))
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / strategy / "arms.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 3, 4, 5, 6]
    if strategy == "finetune":
        assert all("arm" not in r for r in rows)
        return
    assert (tmp_path / strategy / "arms.png").is_file()
    if strategy == "asap":
        initial = json.loads((tmp_path / strategy / "arms_initial.json").read_text())
        assert len(initial["loss"]) == len(ARMS) and all(-1 <= c <= 1 for c in initial["cosine"])
        assert all(len(r["ucb"]) == len(ARMS) and r["reward"] is not None for r in rows)
        counts = t.recipe.hooks[0].bandit.counts
        assert sum(counts) == len(ARMS) + 6  # the initial pass, then one pull per turn
    if strategy == "gms":
        assert len({r["arm"] for r in rows}) == 1
    if strategy == "mtl":
        assert {r["arm_name"] for r in rows} == {"mixed"}


def test_mtl_mixes_datasets_evenly_then_arms_within():
    # dataset A split into 4 label arms, B into 1: drawing arms uniformly would give A 80 % of the samples
    arms = [auxiliary.Arm("A", f"l{i}", i) for i in range(4)] + [auxiliary.Arm("B", "only", 4)]
    policy = auxiliary._ArmPolicy({"A": ["a0", "a1"], "B": ["b0"]}, arms)
    policy.mixed = True
    draws = [policy.choose(i, np.random.default_rng((3, i))) for i in range(4000)]
    datasets = [d for d, _, _ in draws]
    assert 1850 <= datasets.count("A") <= 2150  # 2000 expected; binomial sd ≈ 32
    labels = [lbl for d, _, lbl in draws if d == "A"]
    assert all(abs(labels.count(f"l{i}") - len(labels) / 4) < 0.1 * len(labels) for i in range(4))
    assert {c for d, c, _ in draws if d == "B"} == {"b0"}
    assert draws == [policy.choose(i, np.random.default_rng((3, i))) for i in range(4000)]  # seeded
    policy.mixed, policy.selected = False, arms[2]  # a pulled arm (asap, gms, dal) is drawn as it is
    assert {policy.choose(i, np.random.default_rng(i))[2] for i in range(20)} == {"l2"}


def test_a_sample_of_a_label_arm_trains_that_task_only_pulled_or_mixed(tiny_workdir_2d, tmp_path):
    from mosaicseg.data.sampling import draw_sample

    t = Trainer(tiny_workdir_2d, _cfg("mtl", ARMS), tmp_path / "m", progress=False)
    state = t.recipe.hooks[0]
    tumor = state.arms[2].task
    seen = set()
    for turn in range(1, 9):
        mask = state._arm_batch(t, None, turn, mixed=True)["label_mask"]
        draws = [draw_sample(state._policy, state._stream.seed, turn * t.batch_size + j) for j in range(len(mask))]
        for row, d in zip(mask, draws, strict=True):
            seen.add((d.dataset, d.label))
            own = t.vocabulary.label_mask(d.dataset)
            if d.label == "Tumor":
                assert row.nonzero().flatten().tolist() == [tumor]
            else:  # a dataset arm: every label of its dataset
                assert torch.equal(row.bool(), torch.as_tensor(own, dtype=torch.bool))
    assert (CT, "Tumor") in seen and (CT, None) in seen  # both kinds were drawn
    pulled = state._arm_batch(t, 2, 1)["label_mask"]
    assert all(row.nonzero().flatten().tolist() == [tumor] for row in pulled)


def test_initial_pass_at_trainer_level_sets_each_arm_once_with_half_loss_half_cosine(tiny_workdir_2d, tmp_path):
    t = Trainer(tiny_workdir_2d, _cfg("asap", ARMS), tmp_path / "a", progress=False)
    state = t.recipe.hooks[0]
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    state.on_train_start(t)
    assert state.bandit.counts == [1, 1, 1]
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())  # θ₀ unchanged
    # the same batches at θ₀, gradients taken by autograd apart from the recipe's .grad bookkeeping
    parts = parameter_parts(t.model)
    shared = [p for n, p in t.model.named_parameters() if parts[n] != "head" and p.requires_grad]

    def loss_and_gradient(batch):
        _, _, total = t.forward_loss(batch)
        grads = torch.autograd.grad(total, shared, allow_unused=True)
        # a modality's stem the batch does not use gets no gradient: zeros, as in the recipe's flat vector
        flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, shared, strict=True)]
        return float(total.detach()), torch.cat(flat)

    _, g_t = loss_and_gradient(state._target_batch(t, auxiliary.INITIAL))
    losses, cosines = [], []
    for a in range(len(ARMS)):
        loss, g_a = loss_and_gradient(state._arm_batch(t, a, auxiliary.INITIAL + a))
        losses.append(loss)
        cosines.append(float(torch.nn.functional.cosine_similarity(g_a, g_t, dim=0)))
    reference = sum(losses) / len(losses)  # L₀ of the normalized R^PM
    expected = [0.5 * (reference - x) / (reference + x) + 0.5 * c for x, c in zip(losses, cosines, strict=True)]
    assert state.bandit.reference_loss == pytest.approx(reference, rel=1e-5)
    assert state.bandit.estimates == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert len({round(c, 4) for c in cosines}) > 1  # the arms really differ: the check is not all zeros
    initial = json.loads((tmp_path / "a" / "arms_initial.json").read_text())
    assert initial["estimate"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert state.next_arm == state.bandit.choose(1)


def test_paper_preset_resolves_to_the_papers_optimiser_settings(tiny_workdir_2d, tmp_path):
    derm = list_cases(tiny_workdir_2d)[DERM]
    aux_ids = {CT: list_cases(tiny_workdir_2d)[CT][:2]}
    settings = AdaptSettings(target="x", shots=1, preset="paper", device="cpu", amp=False, turns=4)
    cfg = fold_config(settings, 0, DERM, derm[:1], aux_ids, [[CT, None]])
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("adamw", 3e-4, 1e-7, 4)
    t = Trainer(tiny_workdir_2d, cfg, tmp_path / "paper", progress=False)
    t.set_learning_rates()
    assert t.batch_size == 4  # not the plan's 2
    assert {(g["lr"], g["weight_decay"]) for g in t.optimizer.param_groups} == {(3e-4, 1e-7)}
    assert isinstance(t.optimizer, torch.optim.AdamW)
    cpu_settings = AdaptSettings(target="x", shots=1, device="cpu", amp=False)
    cpu = fold_config(cpu_settings, 0, DERM, derm[:1], aux_ids, [[CT, None]])
    assert Trainer(tiny_workdir_2d, cpu, tmp_path / "cpu", progress=False).batch_size == 2  # the plan's batch


def test_peak_rss_window_is_reset_per_fold():
    if not reset_peak_rss():
        pytest.skip("this platform cannot reset the peak RSS (the summary then says peak_rss_scope: process)")
    base = peak_rss_mb()
    block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MiB, touched
    high = peak_rss_mb()
    assert high - base > 150
    del block
    assert reset_peak_rss()
    assert peak_rss_mb() < high - 150  # the next fold does not inherit the earlier peak


def test_one_auxiliary_gradient_at_a_time(tiny_workdir_2d, tmp_path, monkeypatch):
    alive: list[int] = [0]
    most: list[int] = [0]
    flat = auxiliary.Auxiliary._flat

    def tracked(params):
        g = flat(params)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(g, lambda: alive.__setitem__(0, alive[0] - 1))
        return g

    monkeypatch.setattr(auxiliary.Auxiliary, "_flat", staticmethod(tracked))
    gc.collect()
    t = Trainer(tiny_workdir_2d, _cfg("asap", ARMS, iterations=3), tmp_path / "a", progress=False)
    t.fit()
    # the target's gradient and one arm's (a turn's "all" copy lives only to make the arm's difference)
    assert most[0] <= 3
    assert alive[0] <= 1


def test_resume_mid_run_reproduces_the_arm_sequence_and_weights(tiny_workdir_2d, tmp_path):
    cfg = _cfg("asap", ARMS, iterations=6, iterations_per_epoch=2)
    Trainer(tiny_workdir_2d, cfg, tmp_path / "whole", progress=False).fit()
    stopped = Trainer(tiny_workdir_2d, cfg, tmp_path / "parts", progress=False)
    stopped.recipe.hooks.append(StopAt(3))
    stopped.fit()
    Trainer(tiny_workdir_2d, cfg, tmp_path / "parts", resume=True, progress=False).fit()
    whole = [json.loads(x) for x in (tmp_path / "whole" / "arms.jsonl").read_text().splitlines()]
    parts = [json.loads(x) for x in (tmp_path / "parts" / "arms.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in parts] == [r["arm"] for r in whole]
    assert [r["turn"] for r in parts] == list(range(1, 7))
    a = load_checkpoint(tmp_path / "whole" / "checkpoint_final.pt")
    b = load_checkpoint(tmp_path / "parts" / "checkpoint_final.pt")
    assert a["recipe"] == b["recipe"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_recipe_refuses_a_bad_pool(tiny_workdir_2d, tmp_path):
    with pytest.raises(MosaicSegError, match="needs auxiliary arms"):
        Trainer(tiny_workdir_2d, _cfg("asap", []), tmp_path / "x", progress=False)
    with pytest.raises(MosaicSegError, match="also in the auxiliary pool"):
        Trainer(tiny_workdir_2d, _cfg("asap", [[DERM, None]]), tmp_path / "y", progress=False)
    with pytest.raises(MosaicSegError, match="has no label 'Spleen'"):
        Trainer(tiny_workdir_2d, _cfg("asap", [[CT, "Spleen"]]), tmp_path / "z", progress=False)


# ------------------------------------------------------------------------------------------------ the command
def _raw(workdir: Path, name: str) -> Path:
    return workdir.parent / "data" / name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/device_check.sh runs it on a GPU)")
@pytest.mark.parametrize("strategy", ["asap", "gms", "dal"])
def test_gradient_strategies_run_on_cuda_under_mixed_precision(strategy, tiny_workdir_2d, tmp_path):
    source = tmp_path / "source" / "fold_0"
    pre = dict(recipe="universal", datasets=(CT, MR), iterations=2, iterations_per_epoch=2, device="cuda")
    Trainer(tiny_workdir_2d, TrainConfig(**pre, val_max_cases=1), source, progress=False).fit()
    args = ["adapt", "--target", str(_raw(tiny_workdir_2d, DERM)), "--shots", "1", "--source", str(source),
            "--aux", str(_raw(tiny_workdir_2d, CT)), "--aux", str(_raw(tiny_workdir_2d, MR)), "--strategy", strategy,
            "--turns", "3", "--folds", "1", "--aux-cases", "2", "-w", str(tmp_path / "w"), "-o", str(tmp_path / "o"),
            "--device", "cuda", "--precision", "auto"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "o" / "fold_0" / "arms.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss_target"]) for r in rows)


def test_adapt_command_runs_folds_and_writes_dice_and_iou(tiny_workdir_2d, tmp_path):
    source = tmp_path / "source" / "fold_0"
    pre = dict(recipe="universal", datasets=(CT, MR), iterations=2, iterations_per_epoch=2, device="cpu", amp=False)
    Trainer(tiny_workdir_2d, TrainConfig(**pre, val_max_cases=1), source, progress=False).fit()
    args = ["adapt", "--target", str(_raw(tiny_workdir_2d, DERM)), "--shots", "1", "--source", str(source),
            "--aux", str(_raw(tiny_workdir_2d, CT)), "--aux", str(_raw(tiny_workdir_2d, MR)), "--aux-split-by-label",
            "--turns", "2", "--folds", "2", "--aux-cases", "2", "-w", str(tmp_path / "w"), "-o", str(tmp_path / "o"),
            "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert len(summary["folds"]) == 2 and summary["dice"]["n"] == 2
    assert 0 <= summary["dice"]["mean"] <= 1 and 0 <= summary["iou"]["mean"] <= 1
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    for fold in summary["folds"]:  # each fold's own wall time and peak memory
        assert 0 < fold["train_s"] <= fold["wall_s"] < 600 and 0 < fold["predict_s"] < fold["wall_s"]
        assert 100 < fold["peak_rss_mb"] < memory_mb and fold["peak_rss_scope"] == "fold"
        assert fold["training_sessions"] == 1
    assert summary["wall_s"]["n"] == 2 and summary["peak_rss_mb"] == max(f["peak_rss_mb"] for f in summary["folds"])
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert all(len(v) <= 2 for v in settings["aux_case_ids"].values())
    assert [CT, "Liver"] in settings["arms"]  # split by label
    for f in range(2):
        shots = summary["folds"][f]["shots"]
        evaluated = {p.name.split(".")[0] for p in (tmp_path / "o" / f"fold_{f}" / "reference").iterdir()}
        assert len(shots) == 1 and not set(shots) & evaluated
    # the same command again reuses every fold
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    reused = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert reused["dice"] == summary["dice"]
    for a, b in zip(summary["folds"], reused["folds"], strict=True):  # the training's time kept, not this call's
        assert b["training_sessions"] == 1
        assert b["wall_s"] - b["predict_s"] == pytest.approx(a["wall_s"] - a["predict_s"])
    # finetune with the same pool given (as a study comparing strategies gives it) trains on the target alone
    tuned = [*args[: args.index("-o")], "-o", str(tmp_path / "ft"), "--device", "cpu", "--precision", "fp32"]
    result = CliRunner().invoke(app, [*tuned, "--strategy", "finetune", "--folds", "1"])
    assert result.exit_code == 0, result.output


def test_datasets_are_given_by_folder_name_or_number(tiny_workdir_3d, tmp_path):
    root = tiny_workdir_3d.parent / "data"
    mr = str(root / "Dataset902_SynthMR")
    assert resolve_dataset(mr, [], "--target") == mr  # a folder as given, no root needed
    for spec in ("Dataset902_SynthMR", "902", "Dataset902"):
        assert resolve_dataset(spec, [tmp_path, root], "--target") == mr
    with pytest.raises(MosaicSegError, match=r"no data root to look the dataset name up in.*pass the dataset folder"):
        resolve_dataset("Dataset902_SynthMR", [], "--target")
    with pytest.raises(MosaicSegError, match="did you mean Dataset902_SynthMR"):
        resolve_dataset("Dataset902_SynthMRI", [root], "--target")
    with pytest.raises(MosaicSegError, match="no such folder"):
        resolve_dataset("./Dataset902_SynthMR", [root], "--target")  # a path, not looked up
    for name in ("Dataset905_A", "Dataset905_B"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text("{}")
    with pytest.raises(MosaicSegError, match="holds 2 datasets numbered 905"):
        resolve_dataset("905", [tmp_path], "--aux")
    # through the command: no source, no --data-root, no dataset given as a path: nothing to look a name up in
    args = ["adapt", "--target", "Dataset902_SynthMR", "--shots", "1", "--strategy", "finetune",
            "-w", str(tmp_path / "w"), "-o", str(tmp_path / "o"), "--turns", "1", "--folds", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"MOSAICSEG_DATA_ROOT": None})
    assert result.exit_code == 2 and "no data root" in result.output and not (tmp_path / "o").exists()
    # the other datasets' folder, or the data root from the environment, is where a name is looked up: the name
    # resolves, and the request is then refused for what the checks before planning find
    aux = ["--aux", str(root / "Dataset901_SynthCT")]
    result = CliRunner().invoke(app, [*args, *aux, "--aux-cases", "0"], env={"MOSAICSEG_DATA_ROOT": None})
    assert result.exit_code == 2 and "--aux-cases must be at least 1" in result.output
    result = CliRunner().invoke(app, [*args, "--strategy", "gms"], env={"MOSAICSEG_DATA_ROOT": str(root)})
    assert result.exit_code == 2 and "--strategy gms needs an auxiliary pool" in result.output


def test_adapt_command_3d_end_to_end_with_dataset_names(tiny_run_3d, tmp_path):
    # the target and the pool by name and number, found in the source model's collection root
    args = ["adapt", "--target", "Dataset902_SynthMR", "--shots", "1", "--eval-cases", "1", "--source",
            str(tiny_run_3d / "fold_0"), "--aux", "901", "--aux", "Dataset903_SynthMulti", "--aux-split-by-label",
            "--turns", "3", "--folds", "1", "--aux-cases", "2", "-w", str(tmp_path / "w"), "-o", str(tmp_path / "o"),
            "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"MOSAICSEG_DATA_ROOT": None})
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["target"] == "Dataset902_SynthMR" and Path(summary["settings"]["target"]).is_dir()
    assert summary["settings"]["arms"] == [
        "Dataset901_SynthCT/Liver", "Dataset901_SynthCT/Tumor", "Dataset903_SynthMulti/Edema",
        "Dataset903_SynthMulti/Lesion",
    ]  # fmt: skip
    fold = summary["folds"][0]
    assert fold["evaluation_cases"] == 1 and 0 <= fold["dice"] <= 1 and 0 <= fold["iou"] <= 1
    assert set(fold["labels"]) == {"Liver", "Kidney"}
    rows = [json.loads(x) for x in Path(fold["arms_log"]).read_text().splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 3] and all(len(r["ucb"]) == 4 for r in rows)
    prediction = next((tmp_path / "o" / "fold_0" / "pred").glob("*.nii.gz"))
    assert len(sitk.ReadImage(str(prediction)).GetSize()) == 3  # written back as a 3D volume


def _stop_at(turn: int):
    def on_step_end(self, trainer, batch, outputs, losses):
        if trainer.iteration == turn:
            trainer.request_stop()

    return on_step_end


def test_adapt_command_resumes_an_interrupted_fold_with_the_same_arms(tiny_workdir_2d, tmp_path, monkeypatch):
    base = ["adapt", "--target", str(_raw(tiny_workdir_2d, DERM)), "--shots", "1", "--aux",
            str(_raw(tiny_workdir_2d, CT)), "--aux", str(_raw(tiny_workdir_2d, MR)), "--aux-split-by-label",
            "--turns", "6", "--folds", "1", "--aux-cases", "2", "-w", str(tmp_path / "w"), "--device", "cpu",
            "--precision", "fp32"]  # fmt: skip
    assert CliRunner().invoke(app, [*base, "-o", str(tmp_path / "whole")]).exit_code == 0
    monkeypatch.setattr(auxiliary.Auxiliary, "on_step_end", _stop_at(3), raising=False)
    stopped = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "parts")])
    assert stopped.exit_code == 2 and "run the same command again to resume" in stopped.output
    fold = tmp_path / "parts" / "fold_0"
    # the kill point: a latest checkpoint, no final one, no summary
    assert (fold / "checkpoint_latest.pt").is_file() and not (fold / "checkpoint_final.pt").exists()
    assert not (tmp_path / "parts" / "summary.json").exists()
    monkeypatch.delattr(auxiliary.Auxiliary, "on_step_end")
    other = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "parts"), "--turns", "7"])
    assert other.exit_code == 2 and "other settings (iterations" in other.output  # not resumed as another run
    resumed = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "parts")])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed at turn 3" in resumed.output

    def arms(out: str) -> list[tuple[int, int]]:
        lines = (tmp_path / out / "fold_0" / "arms.jsonl").read_text().splitlines()
        return [(r["turn"], r["arm"]) for r in map(json.loads, lines)]

    assert arms("parts") == arms("whole") and [t for t, _ in arms("whole")] == list(range(1, 7))
    a = load_checkpoint(tmp_path / "whole" / "fold_0" / "checkpoint_final.pt")
    b = load_checkpoint(tmp_path / "parts" / "fold_0" / "checkpoint_final.pt")
    assert a["recipe"] == b["recipe"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    summary = json.loads((tmp_path / "parts" / "summary.json").read_text())
    assert summary["folds"][0]["training_sessions"] == 2
    # killed before its first checkpoint (a turn logged, nothing to resume): the fold starts again
    stale = tmp_path / "stale" / "fold_0"
    stale.mkdir(parents=True)
    (stale / "arms.jsonl").write_text(json.dumps({"turn": 1, "arm": 0}) + "\n")
    (stale / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "elapsed_s": 1.0}) + "\n")
    restarted = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "stale")])
    assert restarted.exit_code == 0, restarted.output
    assert arms("stale") == arms("whole")


def test_adapt_refuses_bad_requests_before_training(tiny_workdir_2d, tiny_workdir_3d, tmp_path):
    target = str(_raw(tiny_workdir_2d, DERM))
    with pytest.raises(MosaicSegError, match="needs an auxiliary pool"):
        check_request(AdaptSettings(target=target, shots=1, strategy="gms"))
    with pytest.raises(MosaicSegError, match="also in the auxiliary pool"):
        check_request(AdaptSettings(target=target, shots=1, aux=[target]))
    unlabelled = tmp_path / "Dataset990_Unlabelled"
    unlabelled.mkdir()
    (unlabelled / "dataset.json").write_text(json.dumps({"labels": {"background": 0}, "file_ending": ".nii.gz"}))
    with pytest.raises(MosaicSegError, match="has no labels"):
        check_request(AdaptSettings(target=str(unlabelled), shots=1, strategy="finetune"))
    aux3d = str(tiny_workdir_3d.parent / "data" / "Dataset901_SynthCT")
    args = ["adapt", "--target", target, "--shots", "1", "--aux", aux3d, "-w", str(tmp_path / "w"),
            "-o", str(tmp_path / "o"), "--turns", "1", "--folds", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "mixes 2D and 3D" in result.output
    assert not (tmp_path / "o").exists()
    args = ["adapt", "--target", target, "--shots", "99", "--strategy", "finetune", "-w", str(tmp_path / "w2"),
            "-o", str(tmp_path / "o2"), "--turns", "1", "--folds", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "--shots 99" in result.output
