"""The seams every method plugs into: the recipe protocol, parameter groups, batch policies, recipe state,
``init_from`` and the model registry — exercised by a toy recipe defined here, with no edit to the loop."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import StopAt  # tests/ is on sys.path under pytest's default import mode
from torch import nn

from mosaicseg.config import TrainConfig, parse_collection
from mosaicseg.data.augment import AugmentConfig
from mosaicseg.data.sampling import PatchDataset, SteeredPolicy, cached_loader, collate, draw_sample
from mosaicseg.data.vocabulary import Vocabulary
from mosaicseg.data.workdir import case_paths, list_cases, task_frequencies
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.predictor import Predictor
from mosaicseg.models import MODEL_KINDS, UniversalNet, build_model
from mosaicseg.runtime import load_checkpoint
from mosaicseg.training.loop import Trainer
from mosaicseg.training.optim import build_optimizer, learning_rate
from mosaicseg.training.recipes import (
    PRIOR_RANGE,
    RECIPES,
    ParamGroup,
    Recipe,
    RecipeContext,
    StepResult,
    modality_channels,
    partial_label_objective,
    register_recipe,
    scheme_policy,
)
from mosaicseg.types import ModelOutput


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        recipe="universal", optimizer="adamw", iterations=6, iterations_per_epoch=3, seed=5, device="cpu", amp=False
    )
    base.update(kw)
    return TrainConfig(**base)


def _context(workdir: Path, cfg: TrainConfig, cases: list[tuple[str, str]] | None = None) -> RecipeContext:
    """The Trainer's context for ``cfg`` built by hand; ``cases``: the training cases of the head prior."""
    plans = json.loads((workdir / "plans.json").read_text())
    collection = parse_collection(json.loads((workdir / "collection.json").read_text()), source=workdir)
    return RecipeContext(
        config=cfg,
        plans=plans,
        vocabulary=Vocabulary.from_dict(json.loads((workdir / "vocabulary.json").read_text())),
        sampling=collection.sampling,
        weights={d.name: d.weight for d in collection.datasets},
        options=RECIPES.get(cfg.recipe).resolve(cfg.recipe_options),
        task_frequencies=None if cases is None else (lambda v: task_frequencies(workdir, v, cases)),
    )


def test_the_trainer_runs_the_universal_recipe_exactly_as_a_direct_call_of_its_parts(tiny_workdir_2d, tmp_path):
    cfg = _cfg(iterations=4, iterations_per_epoch=4, val_max_cases=1)
    trainer = Trainer(tiny_workdir_2d, cfg, tmp_path / "t", progress=False)
    trainer.fit()
    via_trainer = load_checkpoint(tmp_path / "t" / "checkpoint_final.pt")["model"]

    # the same run by hand: recipe parts, the default policy's draws, the optimiser, the schedule
    torch.manual_seed(cfg.seed)
    recipe = RECIPES.get("universal").build(_context(tiny_workdir_2d, cfg, trainer.train_cases))
    model = recipe.model
    groups = recipe.param_groups(model)
    optimizer = build_optimizer([{"params": g.params, "name": g.name} for g in groups], cfg)
    policy = recipe.policy(trainer.train_cases)
    patch = tuple(trainer.patch_size)
    dataset = PatchDataset(
        cached_loader(tiny_workdir_2d), policy, recipe.vocabulary, patch, seed=cfg.seed, length=10**9,
        augment=AugmentConfig(), oversample_foreground=cfg.oversample_foreground,
    )  # fmt: skip
    channels = max(len(d["normalization"]) for d in trainer.plans["datasets"].values())
    b = trainer.batch_size
    for it in range(cfg.iterations):
        batch = collate([dataset[draw_sample(policy, cfg.seed, it * b + j)] for j in range(b)], channels)
        for g in optimizer.param_groups:
            g["lr"] = learning_rate(cfg, it / cfg.iterations)
        optimizer.zero_grad(set_to_none=True)
        model.train()
        outputs = model(batch["image"], batch["modality"], **recipe.inputs(batch))
        recipe.loss(outputs, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
    by_hand = model.state_dict()
    assert via_trainer.keys() == by_hand.keys()
    for k in by_hand:
        assert torch.equal(via_trainer[k], by_hand[k]), k


# ------------------------------------------------------------------------------------------------ a toy method
@MODEL_KINDS.register("test_task_gain")
class TaskGainNet(nn.Module):
    """A universal network whose logits are scaled by a learned gain per task; it refuses to run without
    ``tasks`` and leaves tasks not asked for at -20 (as a method that computes only asked tasks would)."""

    def __init__(self, inner: Mapping[str, Any]) -> None:
        super().__init__()
        self.net = UniversalNet.from_config(inner)
        self.gain = nn.Parameter(torch.ones(self.net.num_tasks))
        self.spatial_dims = self.net.spatial_dims

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.net.modalities

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": "test_task_gain", "inner": self.net.config}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TaskGainNet:
        return cls(config["inner"])

    def forward(self, image, modality, tasks=None, dataset=None, prompts=None) -> ModelOutput:
        if tasks is None or dataset is None:
            raise ValueError("this model needs the tasks and dataset of every sample")
        logits = self.net(image, modality).logits
        shape = (*tasks.shape, *[1] * self.spatial_dims)
        out = [
            torch.where(tasks.view(shape), x * self.gain.view(1, -1, *[1] * self.spatial_dims), -20.0) for x in logits
        ]
        return ModelOutput(out, {})


class _RoundRobin:
    """Steers the policy so that batch ``i`` comes from dataset ``i mod n`` and counts the samples per dataset
    (the recipe's state)."""

    def __init__(self, datasets: tuple[str, ...]) -> None:
        self.datasets = datasets
        self.policy: SteeredPolicy | None = None
        self.seen: dict[str, int] = {d: 0 for d in datasets}
        self.log: list[tuple[int, list[int]]] = []

    def make_policy(self, cases):
        self.policy = SteeredPolicy(cases, scheme_policy("uniform", None)(cases))
        self.policy.select(self.datasets[0])
        return self.policy

    def on_step_end(self, trainer, batch, outputs, losses) -> None:
        assert set(losses) == {"seg", "gain_l2"} and outputs is not None
        for d in batch["dataset"].tolist():
            self.seen[trainer.vocabulary.datasets[d]] += 1
        self.log.append((trainer.iteration, batch["dataset"].tolist()))
        self.policy.select(self.datasets[trainer.iteration % len(self.datasets)])

    def state_dict(self) -> dict[str, Any]:
        return {"seen": dict(self.seen), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = dict(state["seen"])
        self.policy.load_state_dict(state["policy"])


@register_recipe("test_round_robin", options={"gain_weight": 0.1})
def _round_robin(ctx: RecipeContext) -> Recipe:
    vocabulary = ctx.vocabulary
    plan = dict(ctx.plans["network"])
    inner = build_model(plan, modality_channels(ctx.plans, vocabulary), vocabulary.num_tasks).config
    model = TaskGainNet(inner)
    steer = _RoundRobin(vocabulary.datasets)
    seg = partial_label_objective()

    def loss(outputs: ModelOutput, batch) -> dict[str, torch.Tensor]:
        return {"seg": seg(outputs, batch), "gain_l2": ctx.options["gain_weight"] * (model.gain - 1).square().sum()}

    def groups(m: TaskGainNet) -> list[ParamGroup]:  # the stems stay frozen; the gain learns 10x faster
        body = [p for n, p in m.named_parameters() if not n.startswith("net.stems") and n != "gain"]
        return [ParamGroup("body", body), ParamGroup("gain", [m.gain], lr_scale=10.0)]

    return Recipe(
        model=model,
        loss=loss,
        vocabulary=vocabulary,
        datasets=vocabulary.datasets,
        policy=steer.make_policy,
        param_groups=groups,
        state_dict=steer.state_dict,
        load_state_dict=steer.load_state_dict,
        hooks=[steer],
    )


def test_a_recipe_defined_outside_the_package_trains_checkpoints_resumes_and_predicts(tiny_workdir_2d, tmp_path):
    cfg = _cfg(recipe="test_round_robin", recipe_options={"gain_weight": 0.5}, val_max_cases=1)
    a = Trainer(tiny_workdir_2d, cfg, tmp_path / "a", progress=False)
    stems_before = {k: v.clone() for k, v in a.model.state_dict().items() if k.startswith("net.stems")}
    gain_group = next(g for g in a.optimizer.param_groups if g["name"] == "gain")
    a.fit()
    # frozen part: bit-identical, no gradient, not in the optimiser
    after = a.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stems_before.items())
    assert all(not p.requires_grad for p in a.model.net.stems.parameters())
    in_optimizer = {id(p) for g in a.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in a.model.net.stems.parameters())
    assert gain_group["lr"] == pytest.approx(10 * learning_rate(cfg, 5 / 6))  # the last step's rate, scaled
    # the policy picked the dataset of every batch, round robin
    names = a.vocabulary.datasets
    for i, (it, datasets) in enumerate(a.recipe.hooks[0].log):
        assert it == i + 1 and set(datasets) == {names.index(names[i % len(names)])}
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint_final.pt")
    assert ckpt["recipe"]["seen"] == {d: 2 * a.batch_size if i < 2 else a.batch_size for i, d in enumerate(names)}
    assert ckpt["model_config"]["kind"] == "test_task_gain"

    # stopped mid-epoch and resumed: the same choices, state and weights
    b = Trainer(tiny_workdir_2d, cfg, tmp_path / "b", progress=False)
    b.recipe.hooks.append(StopAt(2))
    b.fit()
    resumed = Trainer(tiny_workdir_2d, cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.recipe.hooks[0].seen == {d: a.batch_size if i < 2 else 0 for i, d in enumerate(names)}
    resumed.fit()
    resumed_ckpt = load_checkpoint(tmp_path / "b" / "checkpoint_final.pt")
    assert resumed_ckpt["recipe"] == ckpt["recipe"]
    for k, v in ckpt["model"].items():
        assert torch.equal(resumed_ckpt["model"][k], v), k

    # predicts through build_from_config, the model getting the tasks it needs
    predictor = Predictor.from_checkpoint(tmp_path / "a", precision="fp32")
    assert isinstance(predictor.models[0], TaskGainNet)
    raw = tiny_workdir_2d.parent / "data" / "Dataset912_SynthCT" / "imagesTr"
    image = sorted(raw.iterdir())[0]
    report = predictor.predict_files([image], tmp_path / "pred", dataset="Dataset912_SynthCT", progress=False)
    assert len(report["cases"]) == 1 and Path(report["cases"][0]["files"][0]).is_file()


def test_recipe_options_are_validated_against_the_recipe(tiny_workdir_2d, tmp_path):
    with pytest.raises(MosaicSegError, match=r"recipe 'test_round_robin' has no option 'gain_wieght'.*gain_weight"):
        Trainer(tiny_workdir_2d, _cfg(recipe="test_round_robin", recipe_options={"gain_wieght": 1}), tmp_path / "x")
    with pytest.raises(MosaicSegError, match=r"recipe 'universal' has no option 'x'.*head_prior"):
        Trainer(tiny_workdir_2d, _cfg(recipe_options={"x": 1}), tmp_path / "y")


def test_param_group_learning_rate_factors_by_hand():
    g = ParamGroup("heads", [], lr_scale=2.0, start=3, warmup=4)
    assert [g.factor(i) for i in range(9)] == [0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [ParamGroup("all", []).factor(i) for i in (0, 7)] == [1.0, 1.0]


def test_a_frozen_group_keeps_its_weights_bit_identical_until_its_start(tiny_workdir_2d, tmp_path):
    @register_recipe("test_heads_first")
    def heads_first(ctx: RecipeContext) -> Recipe:
        recipe = RECIPES.get("universal").build(ctx)

        def groups(model: nn.Module) -> list[ParamGroup]:
            head = [p for n, p in model.named_parameters() if n.startswith("head")]
            body = [p for n, p in model.named_parameters() if not n.startswith("head")]
            return [ParamGroup("head", head, warmup=2), ParamGroup("body", body, start=3, warmup=2)]

        recipe.param_groups = groups
        return recipe

    t = Trainer(tiny_workdir_2d, _cfg(recipe="test_heads_first", iterations=3, val_max_cases=1), tmp_path / "h")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    after = t.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("head"))
    assert not all(torch.equal(after[k], before[k]) for k in before if k.startswith("head"))


def test_init_from_loads_a_two_task_checkpoint_into_a_three_task_model(tiny_workdir_2d, tmp_path):
    single = _cfg(recipe="single", dataset="Dataset912_SynthCT", iterations=2, val_max_cases=1)
    Trainer(tiny_workdir_2d, single, tmp_path / "two", progress=False).fit()
    source = load_checkpoint(tmp_path / "two" / "checkpoint_final.pt")
    assert [t["name"] for t in source["vocabulary"]["tasks"]] == [
        "Dataset912_SynthCT/Liver",
        "Dataset912_SynthCT/Tumor",
    ]

    # the new task comes first and the CT stem moves from index 0 to 1 (RGB is first): both mapped by name
    three = ("Dataset911_SynthDerm", "Dataset912_SynthCT")
    cfg = _cfg(datasets=three, iterations=1, init_from=str(tmp_path / "two"), val_max_cases=1)
    t = Trainer(tiny_workdir_2d, cfg, tmp_path / "three", progress=False)
    names = [task.name for task in t.vocabulary.tasks]
    assert names == ["Dataset911_SynthDerm/Lesion", "Dataset912_SynthCT/Liver", "Dataset912_SynthCT/Tumor"]
    assert t.model.modalities == ("RGB", "CT")
    report = json.loads((tmp_path / "three" / "init_report.json").read_text())
    assert report["kept_tasks"] == names[1:] and report["new_tasks"] == names[:1] and report["dropped_tasks"] == []
    assert "head.convs.0.conv.conv.weight" in report["task_rows"] and not report["mismatched"]
    state = t.model.state_dict()
    for name, old in source["model"].items():
        if name.startswith("head"):
            torch.testing.assert_close(state[name][1:], old)  # the two known tasks' rows, one place down
            assert not torch.equal(state[name][0], old[0])
        elif name.startswith("stems.stems.0."):
            torch.testing.assert_close(state[name.replace("stems.0.", "stems.1.")], old)
        else:
            torch.testing.assert_close(state[name], old)
    assert any(n.startswith("stems.stems.0.") for n in report["new"]) and not report["dropped"]
    assert any("2 tasks kept, 1 new" in note for note in t.notes)
    t.fit()
    with pytest.raises(MosaicSegError, match=r"checkpoint not found|no such run folder"):
        Trainer(tiny_workdir_2d, _cfg(init_from=str(tmp_path / "nowhere"), iterations=1), tmp_path / "z")


def test_draws_are_a_pure_function_of_seed_and_index_and_steering_changes_only_the_case():
    cases = [("A", "a0"), ("A", "a1"), ("B", "b0"), ("B", "b1"), ("B", "b2")]
    base = scheme_policy("inv_sqrt", None)(cases)
    first = [draw_sample(base, 7, i) for i in range(20)]
    assert [draw_sample(base, 7, i) for i in range(20)] == first
    # the default draw is the case draw of earlier versions: one choice from the sample's own stream
    legacy = [base.draw(np.random.default_rng((7, i))) for i in range(20)]
    assert [(d.dataset, d.case) for d in first] == legacy
    steered = SteeredPolicy(cases, base)
    steered.select("A", "Liver")
    draws = [draw_sample(steered, 7, i) for i in range(20)]
    assert {d.dataset for d in draws} == {"A"} and {d.label for d in draws} == {"Liver"}
    with pytest.raises(MosaicSegError, match="no training cases"):
        steered.select("C")


def test_train_command_takes_recipe_options_and_init_from(tiny_workdir_2d, tmp_path):
    from typer.testing import CliRunner

    from mosaicseg.cli import app, parse_options

    assert parse_options(["a=1", "b=[1, 2]", "c=text", "d=true"], "--x") == {
        "a": 1,
        "b": [1, 2],
        "c": "text",
        "d": True,
    }
    with pytest.raises(MosaicSegError, match="NAME=VALUE"):
        parse_options(["novalue"], "--recipe-option")
    runner = CliRunner()
    base = ["train", str(tiny_workdir_2d), "--iterations", "1", "--device", "cpu", "--val-max-cases", "1"]
    result = runner.invoke(app, [*base, "--recipe-option", "warmup=3", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "recipe 'universal' has no option 'warmup'" in result.output
    first = runner.invoke(app, [*base, "--optimizer", "adamw", "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        app, [*base, "--optimizer", "adamw", "--init-from", str(tmp_path / "a"), "-o", str(tmp_path / "b")]
    )
    assert second.exit_code == 0, second.output
    assert "init_from" in second.output and "7 tasks kept, 0 new" in second.output
    assert (tmp_path / "b" / "init_report.json").is_file()


def test_head_prior_option_starts_every_output_at_the_prior(tiny_workdir_2d):
    ctx = _context(tiny_workdir_2d, _cfg())
    spec = RECIPES.get("universal")
    model = spec.build(RecipeContext(**{**ctx.__dict__, "options": spec.resolve({"head_prior": 0.01})})).model
    biases = [p for n, p in model.named_parameters() if n.startswith("head.") and n.endswith("bias")]
    assert biases  # every deep-supervision level
    for b in biases:
        torch.testing.assert_close(torch.sigmoid(b.detach()), torch.full_like(b, 0.01))
    plain = spec.build(RecipeContext(**{**ctx.__dict__, "options": spec.resolve({"head_prior": None})})).model
    assert not torch.allclose(
        torch.sigmoid(next(p for n, p in plain.named_parameters() if n.endswith("convs.0.conv.conv.bias"))),
        torch.tensor(0.01),
    )
    with pytest.raises(MosaicSegError, match=r"head_prior=1\.5 is not a probability"):
        spec.build(RecipeContext(**{**ctx.__dict__, "options": spec.resolve({"head_prior": 1.5})}))


def test_a_recipe_can_replace_the_step_and_reuse_the_trainer_s_pieces(tiny_workdir_2d, tmp_path):
    """A step with two backward passes per turn (as ASAP's target + auxiliary gradients): two half-weighted
    backwards of the same batch give the standard step's update."""
    calls: list[int] = []

    def two_halves(trainer, batch):
        for _ in range(2):
            outputs, losses, total = trainer.forward_loss(batch)
            trainer.scaler.scale(0.5 * total).backward()
        trainer.apply_gradients(None)  # the gradients are in .grad already
        calls.append(trainer.iteration)
        return StepResult(float(total.detach()), {k: v.detach() for k, v in losses.items()}, outputs)

    @register_recipe("test_two_halves")
    def build(ctx: RecipeContext) -> Recipe:
        recipe = RECIPES.get("universal").build(ctx)
        recipe.step = two_halves
        return recipe

    cfg = _cfg(iterations=3, iterations_per_epoch=3, val_max_cases=1)
    Trainer(tiny_workdir_2d, cfg, tmp_path / "std", progress=False).fit()
    custom = Trainer(tiny_workdir_2d, replace(cfg, recipe="test_two_halves"), tmp_path / "two", progress=False)
    custom.fit()
    assert calls == [0, 1, 2]
    want = load_checkpoint(tmp_path / "std" / "checkpoint_final.pt")["model"]
    got = load_checkpoint(tmp_path / "two" / "checkpoint_final.pt")["model"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_auto_head_prior_starts_each_output_at_its_tasks_voxel_share(tiny_workdir_2d):
    cfg = _cfg()
    cases = [(d, c) for d, ids in list_cases(tiny_workdir_2d).items() for c in ids][::2]
    ctx = _context(tiny_workdir_2d, cfg, cases)
    assert ctx.options["head_prior"] == "auto"  # the default
    recipe = RECIPES.get("universal").build(ctx)
    # by hand: every case's multi-hot target, mean over its voxels, averaged over the cases annotating the task
    vocab = recipe.vocabulary
    shares: list[list[float]] = [[] for _ in range(vocab.num_tasks)]
    for dataset, case_id in cases:
        seg = np.load(case_paths(tiny_workdir_2d, dataset, case_id).seg)
        target = vocab.to_target(dataset, seg)
        for k in np.flatnonzero(vocab.label_mask(dataset)):
            shares[k].append(float(target[k].mean()))
    expected = np.clip([np.mean(v) if v else 0.0 for v in shares], *PRIOR_RANGE)
    assert (expected > PRIOR_RANGE[0]).sum() >= 2  # the fixture's structures are not all clipped
    biases = [p for n, p in recipe.model.named_parameters() if n.startswith("head.") and n.endswith("bias")]
    for b in biases:
        np.testing.assert_allclose(torch.sigmoid(b.detach()).numpy(), expected, rtol=1e-5)


def test_task_frequencies_count_old_caches_from_the_label_map(tiny_workdir_2d, tmp_path):
    """A cache written before ``label_voxels`` existed gives the same shares (counted from CASE_seg.npy)."""
    tiny_workdir_2d = Path(shutil.copytree(tiny_workdir_2d, tmp_path / "w"))  # the fixture is shared
    vocab = Vocabulary.from_dict(json.loads((tiny_workdir_2d / "vocabulary.json").read_text()))
    cases = [(d, c) for d, ids in list_cases(tiny_workdir_2d).items() for c in ids]
    with_counts = task_frequencies(tiny_workdir_2d, vocab, cases)
    dataset, case_id = cases[0]
    meta_path = case_paths(tiny_workdir_2d, dataset, case_id).meta
    meta = json.loads(meta_path.read_text())
    assert sum(meta["label_voxels"].values()) == int(np.prod(meta["shape_resampled"]))
    del meta["label_voxels"]
    meta_path.write_text(json.dumps(meta))
    np.testing.assert_allclose(task_frequencies(tiny_workdir_2d, vocab, cases), with_counts)


@pytest.mark.parametrize(("width", "features"), [("small", [2, 4, 8]), ("base", [4, 8, 16]), ("large", [8, 16, 32])])
def test_width_presets_scale_every_stage_of_the_plan(tiny_workdir_2d, width, features):
    for recipe in ("universal", "hermes"):
        cfg = _cfg(recipe=recipe, width=width)
        model = RECIPES.get(recipe).build(_context(tiny_workdir_2d, cfg, [])).model
        assert model.config["network_plan"]["features"] == features
    with pytest.raises(MosaicSegError, match="width 'huge' is unknown"):
        _cfg(width="huge")
