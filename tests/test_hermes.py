"""Hermes (models/priors.py, the ``hermes`` recipe): vectorised task padding, fusion, prototypes, the ablation
switches, the auxiliary modality loss, and a run that trains, checkpoints and predicts on the synthetic set."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from mosaicseg.config import TrainConfig
from mosaicseg.errors import MosaicSegError
from mosaicseg.inference.predictor import Predictor
from mosaicseg.models import HermesNet, build_from_config, task_parameter_names
from mosaicseg.models.backbones import einops_available
from mosaicseg.models.priors import NOT_ASKED, FusionLayer, PriorKeyValueAttention, PriorPool, select_tasks
from mosaicseg.runtime import load_checkpoint
from mosaicseg.training.loop import Trainer
from mosaicseg.training.losses import modality_loss
from mosaicseg.training.recipes import hermes_objective
from mosaicseg.types import ModelOutput

PLAN = {
    "patch_size": [32, 32, 32],
    "features": [4, 8, 16, 16, 16],
    "kernel_sizes": [[3, 3, 3]] * 5,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4,
}


def _net(**hermes: Any) -> HermesNet:
    torch.manual_seed(0)
    return HermesNet(PLAN, {"T1": 1, "CT": 2}, 5, hermes={"head_dim": 8, "fusion_depth": 1, **hermes})


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_select_tasks_puts_each_samples_tasks_first_and_pads_with_the_null_token():
    tasks = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    index, valid = select_tasks(tasks)
    assert index.tolist() == [[1, 3, 4], [0, 1, 2], [3, 4, 4]]  # 4 = K: the null token
    assert valid.tolist() == [[True, True, False], [True, True, True], [True, False, False]]


# three samples asking 2, 1 and 4 of the 5 tasks: each pads to 4 in a batch
MIXED_TASKS = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)


def _batch_equals_each_sample_alone(model: HermesNet, x: torch.Tensor, modality: torch.Tensor) -> Any:
    """The batch's output, after checking each sample's logits and modality logits against its forward alone."""
    with torch.no_grad():
        batch = model(x, modality, MIXED_TASKS)
        for b in range(len(x)):
            alone = model(x[b : b + 1], modality[b : b + 1], MIXED_TASKS[b : b + 1])
            torch.testing.assert_close(alone.logits[0], batch.logits[0][b : b + 1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(alone.extras["modality_logits"], batch.extras["modality_logits"][b : b + 1])
    return batch


def test_a_batch_with_mixed_task_counts_gives_each_sample_its_own_result():
    x = torch.randn(3, 2, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    tasks = MIXED_TASKS
    batch = _batch_equals_each_sample_alone(_net().eval(), x, torch.tensor([0, 1, 0]))
    # tasks a sample did not ask are absent; the asked ones are not constant
    out = batch.logits[0]
    assert torch.all(out[~tasks] == NOT_ASKED)
    assert all(out[b, k].std() > 0 for b, k in tasks.nonzero().tolist())


def test_hermes_on_the_residual_encoder_unet_gives_each_sample_its_own_result():
    torch.manual_seed(0)
    model = HermesNet(
        PLAN, {"T1": 1, "CT": 2}, 5, architecture="resenc_unet", options={"blocks_per_stage": [1, 1, 2, 2, 2]},
        hermes={"head_dim": 8, "fusion_depth": 1},
    ).eval()  # fmt: skip
    assert type(model.backbone).__name__ == "ResEncUNet" and model.config["architecture"] == "resenc_unet"
    assert _params(model) != _params(_net())  # another backbone, not the plain U-Net's
    x = torch.randn(3, 2, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    _batch_equals_each_sample_alone(model, x, torch.tensor([0, 1, 0]))


def test_padding_keys_are_masked_in_the_image_update():
    """A null token's content must not reach the image: changing it leaves the fused map unchanged."""
    torch.manual_seed(0)
    pool = PriorPool(3, 1, 2, 8, modality_prior=True)
    layer = FusionLayer(pool, 8, depth=1, head_dim=4, two_way=True).eval()
    x = torch.randn(1, 8, 4, 4, 4)
    index, valid = select_tasks(torch.tensor([[True, False, True]]))
    index, valid = torch.cat([index, torch.tensor([[3]])], 1), torch.cat([valid, torch.tensor([[False]])], 1)
    before, _ = layer(x, index, valid, torch.tensor([0]))
    with torch.no_grad():
        pool.task[3].normal_()
    after, _ = layer(x, index, valid, torch.tensor([0]))
    torch.testing.assert_close(before, after)


def test_ablation_switches_change_the_model_as_stated():
    full = _net()
    assert full.fused_stages == [2, 3, 4] and full.config["hermes"]["scales"] == [4, 8, 16]
    assert full.fused_levels == [] and full.config["hermes"]["decoder_scales"] == []  # the paper: encoder only
    single = _net(scales=[16])  # Table 4's "single scale": the 16x stage only
    assert single.fused_stages == [4] and len(single.fusion) == 1
    assert _params(single) < _params(full)
    one_way = _net(two_way=False)  # tokens read the image, the image is not updated
    assert not any("image_from_tokens" in n for n, _ in one_way.named_parameters())
    assert _params(one_way) < _params(full)
    layer = one_way.fusion[0]
    x = torch.randn(2, 16, 8, 8, 8)
    index, valid = select_tasks(torch.ones(2, 5, dtype=torch.bool))
    fused, _ = layer(x, index, valid, torch.tensor([0, 1]))
    assert torch.equal(fused, x)
    no_modality = _net(modality_prior=False)
    assert all(layer.pool.modality is None for layer in no_modality.fusion)
    assert no_modality.modality_head is None and _params(no_modality) < _params(full)
    out = no_modality.eval()(torch.randn(1, 2, 32, 32, 32), torch.tensor([1]))
    assert "modality_logits" not in out.extras
    with pytest.raises(MosaicSegError, match=r"scales=\[3\].*\[1, 2, 4, 8, 16\]"):
        _net(scales=[3])
    with pytest.raises(MosaicSegError, match="no option"):
        _net(depth=3)


def test_decoder_fusion_reads_the_decoder_and_old_configs_keep_the_encoder_only():
    full, encoder_only = _net(decoder_scales=None), _net()
    # None: the authors' layout, the decoder fused at the encoder's scales but the deepest, coarse first
    assert full.fused_levels == [3, 2] and full.config["hermes"]["decoder_scales"] == [8, 4]
    assert _net(decoder_scales=[4, 8]).config["hermes"]["decoder_scales"] == [8, 4]
    assert _net(scales=[16], decoder_scales=None).fused_levels == []
    assert len(full.fusion) == 5 and len(encoder_only.fusion) == 3 and _params(encoder_only) < _params(full)
    widths = [layer.blocks[0].norm_image.normalized_shape[0] for layer in full.fusion]
    assert widths == [16, 16, 16, full.backbone.out_channels[3], full.backbone.out_channels[2]]
    x, modality = torch.randn(2, 2, 32, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1])
    batch = _batch_equals_each_sample_alone(full.eval(), torch.cat([x, x[:1]]), torch.tensor([0, 1, 0]))
    assert batch.logits[0].shape == (3, 5, 32, 32, 32)
    # a decoder fusion's token reaches the image: another token there changes the other tasks' outputs
    tasks = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        before = full(x[:1], modality[:1], tasks).logits[0]
        full.fusion[4].pool.task[2].normal_()
        after = full(x[:1], modality[:1], tasks).logits[0]
    assert not torch.allclose(before[0, 0], after[0, 0])
    # a config saved before decoder_scales existed rebuilds the encoder-only model its weights belong to
    old = encoder_only.config
    del old["hermes"]["decoder_scales"]
    rebuilt = build_from_config(old)
    rebuilt.load_state_dict(encoder_only.state_dict())
    assert rebuilt.fused_levels == []
    with pytest.raises(MosaicSegError, match=r"decoder_scales=\[16\].*\[1, 2, 4, 8\]"):
        _net(decoder_scales=[16])
    with pytest.raises(MosaicSegError, match="decoder_scales=8 must be a list"):
        _net(decoder_scales=8)


def test_task_token_std_starts_the_tasks_apart_and_is_checked():
    xavier, normal = _net(), _net(task_token_std=1.0)
    assert _params(xavier) == _params(normal)  # an initialisation, not a change of the model
    pool_x, pool_n = xavier.fusion[0].pool.task.detach(), normal.fusion[0].pool.task.detach()
    # Xavier-uniform over the (K + 1, C) pool is bounded by sqrt(6 / (K + 1 + C)); N(0, 1) is not, nor that small
    assert pool_x.abs().max() <= math.sqrt(6 / sum(pool_x.shape)) + 1e-6
    assert 0.8 < float(pool_n.std()) < 1.2
    assert normal.config["hermes"]["task_token_std"] == 1.0 and xavier.config["hermes"]["task_token_std"] is None
    with pytest.raises(MosaicSegError, match=r"task_token_std=0\.0 must be positive"):
        _net(task_token_std=0.0)


def test_task_tokens_and_biases_are_per_task_rows_for_init_from():
    model = _net()
    names = task_parameter_names(model)
    assert names == {"fusion.0.pool.task", "fusion.1.pool.task", "fusion.2.pool.task", "task_bias"}
    assert model.fusion[0].pool.task.shape[0] == 5 + 1  # + the null token


def test_modality_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (1 + math.e))) / 2
    assert modality_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(expected)


def test_the_auxiliary_loss_switch_adds_or_drops_the_modality_term():
    # a zero logit map over an all-background annotated task: the segmentation term is the same in both objectives
    outputs = ModelOutput([torch.zeros(2, 1, 4, 4)], {"modality_logits": torch.tensor([[2.0, 0.0], [0.0, 1.0]])})
    batch = {
        "target": torch.zeros(2, 1, 4, 4),
        "label_mask": torch.ones(2, 1),
        "ignore": torch.zeros(2, 4, 4, dtype=torch.bool),
        "modality": torch.tensor([0, 1]),
    }
    with_term = hermes_objective(False, 1.0, 0.001)(outputs, batch)
    without = hermes_objective(False, 1.0, 0.0)(outputs, batch)
    assert set(without) == {"segmentation"} and set(with_term) == {"segmentation", "modality"}
    torch.testing.assert_close(with_term["segmentation"], without["segmentation"])
    expected = 0.001 * modality_loss(outputs.extras["modality_logits"], batch["modality"])
    torch.testing.assert_close(with_term["modality"], expected)


def _cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        recipe="hermes", iterations=4, iterations_per_epoch=2, seed=3, device="cpu", val_max_cases=1, amp=False
    )
    base.update(kw)
    return TrainConfig(**base)


def test_hermes_trains_checkpoints_and_predicts_the_asked_tasks_all_tasks_and_another_modality(
    tiny_workdir_2d, tmp_path
):
    trainer = Trainer(tiny_workdir_2d, _cfg(), tmp_path / "run", progress=False)
    assert isinstance(trainer.model, HermesNet)
    first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    terms = records[-1]["loss_terms"]
    # λ = 0.001 times a cross-entropy of order 1
    assert set(terms) == {"segmentation", "modality"} and 0 < terms["modality"] < 0.01
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_final.pt")
    assert ckpt["model_config"]["kind"] == "hermes"
    # the token pools and prototypes were trained and round-trip through the checkpoint
    assert not torch.equal(ckpt["model"]["fusion.0.pool.task"], first["fusion.0.pool.task"])
    rebuilt = build_from_config(ckpt["model_config"])
    rebuilt.load_state_dict(ckpt["model"])
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in rebuilt.state_dict().items())
    # the head prior starts each task's bias at its voxel share
    prior = torch.sigmoid(first["task_bias"][:-1])
    assert torch.all((prior > 0) & (prior < 0.5)) and prior.std() > 0

    predictor = Predictor.from_checkpoint(tmp_path / "run", precision="fp32")
    assert isinstance(predictor.models[0], HermesNet)
    # the predictor's model is the trained one, token pools and prototypes included: the same logits
    model = trainer.model.eval()
    k = trainer.vocabulary.num_tasks
    x = torch.randn(1, model.stems.channels[0], 32, 32, generator=torch.Generator().manual_seed(0))
    every = torch.ones(1, k, dtype=torch.bool)
    with torch.no_grad():
        expected = model(x, torch.tensor([0]), tasks=every).logits[0]
        torch.testing.assert_close(predictor.models[0](x, torch.tensor([0]), tasks=every).logits[0], expected)
    raw = tiny_workdir_2d.parent / "data" / "Dataset912_SynthCT" / "imagesTr"
    image = sorted(raw.iterdir())[0]
    report = predictor.predict_files(
        [image], tmp_path / "pred", dataset="Dataset912_SynthCT", progress=False, save_probabilities=True
    )
    assert len(report["cases"]) == 1 and Path(report["cases"][0]["files"][0]).is_file()
    # one probability map per task of the dataset: the model was asked for exactly those
    files = report["cases"][0]["files"]
    labels = json.loads((raw.parent / "dataset.json").read_text())["labels"]
    assert len([f for f in files if "_prob_" in Path(f).name]) == len([k for k in labels if k != "background"])
    # --tasks all: one probability map for every task of the collection, in one output folder per dataset
    every_task = predictor.predict_files(
        [image], tmp_path / "all", dataset="Dataset912_SynthCT", tasks=["all"], progress=False, save_probabilities=True
    )
    probabilities = [Path(f) for f in every_task["cases"][0]["files"] if "_prob_" in Path(f).name]
    assert len(probabilities) == k
    datasets = json.loads((tiny_workdir_2d / "vocabulary.json").read_text())["datasets"]
    assert {f.parent.name for f in probabilities} == set(datasets)
    # --modality: the CT slice read as T1 (same channel count) goes through T1's stem and prior tokens
    as_ct = _probabilities(report)
    predictor.use_modality("T1")
    as_t1 = _probabilities(
        predictor.predict_files(
            [image], tmp_path / "t1", dataset="Dataset912_SynthCT", progress=False, save_probabilities=True
        )
    )
    # (tolerances, not equality: the predictor may run a tile through its frozen graph or eagerly, by timing)
    assert as_t1.keys() == as_ct.keys() and any(np.abs(as_t1[n] - as_ct[n]).max() > 1e-2 for n in as_ct)
    # a task the checkpoint has no prior token for: a clear error before anything is written
    with pytest.raises(MosaicSegError, match=r"unknown task 'Dataset912_SynthCT/Spleen'. Fix: use one of"):
        predictor.predict_files([image], tmp_path / "none", dataset="Dataset912_SynthCT", tasks=["Spleen"])
    assert not (tmp_path / "none").exists()
    predictor.use_modality(None)  # back to the dataset's own modality: the first output again
    again = predictor.predict_files(
        [image], tmp_path / "ct", dataset="Dataset912_SynthCT", progress=False, save_probabilities=True
    )
    for n, v in _probabilities(again).items():
        np.testing.assert_allclose(v, as_ct[n], atol=1e-3)


def _probabilities(report: dict[str, Any]) -> dict[str, np.ndarray]:
    """A prediction report's probability maps by file name."""
    files = [Path(f) for f in report["cases"][0]["files"] if "_prob_" in Path(f).name]
    return {f.name: np.asarray(nib.load(f).dataobj) for f in files}


def test_hermes_rejects_bad_options_before_writing(tiny_workdir_2d, tmp_path):
    with pytest.raises(MosaicSegError, match=r"recipe 'hermes' has no option 'two_ways'.*two_way"):
        Trainer(tiny_workdir_2d, _cfg(recipe_options={"two_ways": False}), tmp_path / "a")
    with pytest.raises(MosaicSegError, match="modality_loss_weight"):
        Trainer(tiny_workdir_2d, _cfg(recipe_options={"modality_loss_weight": -1}), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # an --overwrite with a bad option leaves the run it was to replace intact
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(MosaicSegError, match="two_ways"):
        Trainer(tiny_workdir_2d, _cfg(recipe_options={"two_ways": 1}), tmp_path / "kept", overwrite=True)
    assert (tmp_path / "kept" / "metrics.jsonl").read_text() == "{}\n"


def test_train_preset_hermes_sets_the_papers_training_under_what_is_typed(tiny_workdir_2d, tmp_path):
    from typer.testing import CliRunner

    from mosaicseg.cli import app

    base = ["train", str(tiny_workdir_2d), "--recipe", "hermes", "--preset", "hermes", "--iterations", "1"]
    base += ["--iterations-per-epoch", "1", "--val-max-cases", "1", "--precision", "fp32"]
    result = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "a" / "config.json").read_text())["train_config"]
    chosen = (config["optimizer"], config["lr"], config["schedule"], config["sampling"])
    assert chosen == ("lamb", 2e-3, "exp", "uniform")
    typed = CliRunner().invoke(app, [*base, "--lr", "1e-3", "-o", str(tmp_path / "b")])
    assert typed.exit_code == 0, typed.output
    config = json.loads((tmp_path / "b" / "config.json").read_text())["train_config"]
    assert config["optimizer"] == "lamb" and config["lr"] == 1e-3
    typed = CliRunner().invoke(app, [*base, "--sampling", "inv_sqrt", "-o", str(tmp_path / "c")])
    assert typed.exit_code == 0, typed.output
    assert json.loads((tmp_path / "c" / "config.json").read_text())["train_config"]["sampling"] == "inv_sqrt"
    bad = CliRunner().invoke(app, [*base, "--sampling", "sqrt", "-o", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "sampling 'sqrt' is unknown" in bad.output and not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------------ SwinUNETR
needs_einops = pytest.mark.skipif(not einops_available(), reason="swinunetr needs the optional 'einops' package")
SWIN_PLAN = {"patch_size": [32, 64], "features": [4, 8], "kernel_sizes": [[3, 3]] * 2, "strides": [[1, 1], [2, 2]]}
SWIN = {"feature_size": 12, "depths": [2, 2, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 4}


def _swin(**hermes: Any) -> HermesNet:
    torch.manual_seed(0)
    return HermesNet(
        SWIN_PLAN, {"T1": 1, "CT": 2}, 5, architecture="swinunetr", options=SWIN,
        hermes={"head_dim": 12, "fusion_depth": 1, **hermes},
    )  # fmt: skip


@needs_einops
def test_swin_prior_keys_masked_out_leave_monai_attention_unchanged_and_shifted_windows_keep_their_mask():
    """The priors as extra keys/values: with every token masked the wrapped attention is MONAI's exactly (shifted
    windows included); with tokens visible the output moves; each window sees its own sample's tokens."""
    model = _swin().eval()
    layer = model.backbone.net.swinViT.layers2[0]
    for block in layer.blocks:  # the last one is wrapped in a capture of its output
        assert isinstance(getattr(block, "module", block).attn, PriorKeyValueAttention)
    shifted = layer.blocks[1].module.attn  # the second block of a layer works on shifted windows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * 4, 16, 24, generator=g)  # 2 samples × 4 windows of 4×4 tokens, width 24
    mask = torch.zeros(4, 16, 16).masked_fill(torch.rand(4, 16, 16, generator=g) > 0.7, -100.0)
    tokens = torch.randn(2, 3, 24, generator=g)
    with torch.no_grad():
        plain = shifted.attention(x, mask)
        shifted.context = (tokens, torch.zeros(2, 3, dtype=torch.bool))
        torch.testing.assert_close(shifted(x, mask), plain, rtol=1e-5, atol=1e-6)
        shifted.context = (tokens, torch.tensor([[True, False, True], [False, False, False]]))
        seen = shifted(x, mask)
        shifted.context = None
    assert not torch.allclose(seen[:4], plain[:4])  # sample 0 sees two tokens
    torch.testing.assert_close(seen[4:], plain[4:], rtol=1e-5, atol=1e-6)  # sample 1 sees none


@needs_einops
def test_hermes_on_swinunetr_gives_each_sample_its_own_result_and_the_switches_hold():
    model = _swin().eval()
    assert model.fused_stages == [2, 3, 4] and model.config["hermes"]["scales"] == [4, 8, 16]
    x = torch.randn(3, 2, 32, 64, generator=torch.Generator().manual_seed(1))
    modality, tasks = torch.tensor([0, 1, 0]), MIXED_TASKS
    batch = _batch_equals_each_sample_alone(model, x, modality)
    assert batch.logits[0].shape == (3, 5, 32, 64)
    assert torch.all(batch.logits[0][~tasks] == NOT_ASKED)
    assert batch.extras["modality_logits"].shape == (3, 2)
    # every attention's context is cleared after a forward (nothing leaks into a later one)
    assert all(a.context is None for wrapped in model._swin_attention for a in wrapped)
    # the image reads the tokens: another task token changes the features, hence the other tasks' outputs
    with torch.no_grad():
        model.fusion[0].pool.task[2].normal_()
        moved = model(x[2:], modality[2:], tasks[2:])
    assert not torch.allclose(moved.logits[0][0, 0], batch.logits[0][2, 0])
    one_way = _swin(two_way=False)  # tokens read the image only: no attention is wrapped
    assert not any(isinstance(m, PriorKeyValueAttention) for m in one_way.modules())
    assert sum(p.numel() for p in one_way.parameters()) == sum(p.numel() for p in _swin().parameters())
    assert _swin(scales=[16]).fused_stages == [4] and len(_swin(scales=[16]).fusion) == 1
    assert model.fused_levels == [] and model.config["hermes"]["decoder_scales"] == []  # the priors join attention
    with pytest.raises(MosaicSegError, match="SwinUNETR's decoder is not fused"):
        _swin(decoder_scales=[4])
    with pytest.raises(MosaicSegError, match=r"scales=\[32\].*\[2, 4, 8, 16\]"):
        _swin(scales=[32])
    # round trip through the config, as checkpoints and the predictor rebuild it
    rebuilt = build_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x[2:], modality[2:], tasks[2:]).logits[0], moved.logits[0])
