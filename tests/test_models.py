"""Contract tests for every registered architecture in 2D and 3D: shapes, deep supervision, mixed-modality
batches, stem gradients, config round trip, plan validation. Tensors are tiny so the file runs in seconds."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from mosaicseg.errors import MosaicSegError
from mosaicseg.models import (
    MODEL_KINDS,
    MODELS,
    UniversalNet,
    build_from_config,
    build_model,
    task_parameter_names,
    use_device_layout,
)
from mosaicseg.models.backbones import einops_available
from mosaicseg.models.stems import ModalityStems
from mosaicseg.types import ModelOutput

MODALITIES = {"CT": 1, "FLAIR+T1c": 2, "RGB": 3, "T2": 1}
C_MAX = max(MODALITIES.values())
K = 5
# per architecture: options that keep it tiny on CPU, and a valid small patch per dimensionality
TINY: dict[str, dict[str, Any]] = {
    "resenc_unet": {"blocks_per_stage": [1, 2, 2, 2]},
    "swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
}
PATCH = {"swinunetr": {2: [32, 64], 3: [32, 32, 64]}}
CONV_PATCH = {2: [32, 32], 3: [16, 16, 16]}


def _arch_params() -> list[Any]:
    needs_einops = pytest.mark.skipif(not einops_available(), reason="swinunetr needs the optional 'einops' package")
    return [pytest.param(a, marks=needs_einops) if a == "swinunetr" else a for a in MODELS.names()]


ARCHS = _arch_params()
DIMS = [2, 3]


def plan_for(dims: int, patch: list[int] | None = None, strides: list[list[int]] | None = None) -> dict[str, Any]:
    strides = strides or [[1] * dims] + [[2] * dims] * 3
    return {
        "patch_size": patch or CONV_PATCH[dims],
        "batch_size": 2,
        "features": [4, 8, 16, 16][: len(strides)],
        "kernel_sizes": [[3] * dims] * len(strides),
        "strides": strides,
        "num_stages": len(strides),
    }


def make(arch: str, dims: int, **kwargs: Any) -> tuple[UniversalNet, list[int]]:
    torch.manual_seed(0)
    patch = PATCH.get(arch, CONV_PATCH)[dims]
    model = build_model(plan_for(dims, patch), MODALITIES, K, arch, **kwargs, **TINY.get(arch, {}))
    return model, patch


def batch(patch: list[int], modality: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded images as the collate makes them: sample i uses its modality's first channels."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(len(modality), C_MAX, *patch)
    channels = list(MODALITIES.values())
    for i, m in enumerate(modality):
        image[i, : channels[m]] = torch.randn(channels[m], *patch, generator=g)
    return image, torch.tensor(modality, dtype=torch.long)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_output_shapes_train_list_and_eval_tensor(arch: str, dims: int) -> None:
    model, patch = make(arch, dims)
    image, modality = batch(patch, [0, 2])
    assert model.spatial_dims == dims and model.num_tasks == K and model.modalities == tuple(MODALITIES)
    # default deep supervision: every decoder level except the coarsest one
    assert len(model.ds_scales) == max(1, len(model.backbone.out_channels) - 1)
    assert model.ds_scales[0] == (1,) * dims

    model.train()
    output = model(image, modality)
    assert isinstance(output, ModelOutput) and output.extras == {}
    outs = output.logits
    assert isinstance(outs, list) and len(outs) == len(model.ds_scales)
    for out, scale in zip(outs, model.ds_scales, strict=True):
        assert out.shape == (2, K, *(p // s for p, s in zip(patch, scale, strict=True)))

    model.eval()
    with torch.no_grad():
        out = model(image, modality).logits
    assert len(out) == 1 and out[0].shape == (2, K, *patch)

    feats = model.features(image, modality)
    assert [f.shape[1] for f in feats] == model.backbone.out_channels
    for f, scale in zip(feats, model.backbone.scales, strict=True):
        assert tuple(f.shape[2:]) == tuple(p // s for p, s in zip(patch, scale, strict=True))


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_encode_gives_skips_bottleneck_last_and_decode_of_them_is_the_forward(arch: str, dims: int) -> None:
    model, patch = make(arch, dims)
    model.eval()
    image, modality = batch(patch, [0, 2])
    with torch.no_grad():
        skips = model.encode(image, modality)
        assert [s.shape[1] for s in skips] == model.backbone.skip_channels
        for s, scale in zip(skips, model.backbone.skip_scales, strict=True):
            assert tuple(s.shape[2:]) == tuple(p // f for p, f in zip(patch, scale, strict=True))
        # the bottleneck is the coarsest skip
        assert max(model.backbone.skip_scales) == model.backbone.skip_scales[-1]
        maps = model.decode(skips)
        want = model(image, modality).logits[0]
        torch.testing.assert_close(model.head(maps, levels=1)[0], want)
        # the extra arguments every model kind accepts leave the universal model unchanged
        tasks = torch.zeros(2, K, dtype=torch.bool)
        got = model(image, modality, tasks=tasks, dataset=torch.tensor([1, 0]), prompts=None).logits[0]
        torch.testing.assert_close(got, want)


def test_build_from_config_rebuilds_the_universal_kind_from_new_and_version_1_configs() -> None:
    assert "universal" in MODEL_KINDS
    model, _ = make("unet", 2)
    config = json.loads(json.dumps(model.config))
    assert config["kind"] == "universal"
    rebuilt = build_from_config(config)
    assert type(rebuilt) is type(model) and rebuilt.config == model.config
    # a version-1 config (no kind, no head) from an earlier checkpoint still loads as the universal model
    old = {k: v for k, v in config.items() if k not in ("kind", "head")} | {"version": 1}
    assert isinstance(build_from_config(old), UniversalNet)
    assert task_parameter_names(model) == {"head.convs.0.conv.conv.weight", "head.convs.0.conv.conv.bias"} | {
        f"head.convs.{i}.conv.conv.{p}" for i in range(1, len(model.ds_scales)) for p in ("weight", "bias")
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_without_deep_supervision_train_mode_gives_one_tensor(arch: str) -> None:
    model, patch = make(arch, 2, deep_supervision=False)
    image, modality = batch(patch, [1])
    out = model.train()(image, modality).logits
    assert len(out) == 1 and out[0].shape == (1, K, *patch)
    assert model.ds_scales == [(1, 1)] and len(model.head.convs) == 1


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_modality_batch_matches_each_sample_alone(arch: str, dims: int) -> None:
    model, patch = make(arch, dims)
    model.eval()
    image, modality = batch(patch, [2, 0, 1])  # 3-, 1- and 2-channel samples in one batch
    # whatever sits in the padded channels must not matter: each stem reads only its own channels
    noisy = image.clone()
    noisy[1, 1:] = 7.0
    noisy[2, 2:] = -3.0
    with torch.no_grad():
        together = model(noisy, modality).logits[0]
        for i in range(3):
            alone = model(image[i : i + 1], modality[i : i + 1]).logits[0]
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_used_stems_only(arch: str, dims: int) -> None:
    model, patch = make(arch, dims)
    model.train()
    image, modality = batch(patch, [0, 2, 2])  # CT and RGB used; FLAIR+T1c and T2 not
    outs = model(image, modality).logits
    sum(o.square().mean() for o in outs).backward()
    for m, stem in enumerate(model.stems.stems):
        grads = [p.grad for p in stem.parameters()]
        if m in (0, 2):
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"stem {m} got no gradient"
        else:
            assert all(g is None for g in grads), f"unused stem {m} got a gradient"
    head_grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None for g in head_grads)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_from_config_rebuilds_identical_model(arch: str, dims: int) -> None:
    model, patch = make(arch, dims)
    config = json.loads(json.dumps(model.config))  # checkpoints store it as JSON
    rebuilt = UniversalNet.from_config(config)
    assert rebuilt.config == model.config
    ours, theirs = model.state_dict(), rebuilt.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    rebuilt.load_state_dict(ours)
    image, modality = batch(patch, [3, 1])
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image, modality).logits, rebuilt(image, modality).logits)


@pytest.mark.parametrize("arch", ["unet", "resenc_unet"])
def test_anisotropic_strides(arch: str) -> None:
    plan = plan_for(3, [16, 16, 4], strides=[[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]])
    plan["kernel_sizes"] = [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    model = build_model(plan, MODALITIES, K, arch)
    assert model.backbone.scales == [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    assert model.ds_scales == [(1, 1, 1), (2, 2, 1)]
    image, modality = batch([16, 16, 4], [0, 1])
    outs = model.train()(image, modality).logits
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 16, 4), (8, 8, 4)]
    assert model.eval()(image, modality).logits[0].shape == (2, K, 16, 16, 4)


@pytest.mark.parametrize("arch", MODELS.names())
def test_patch_not_divisible_by_strides_raises(arch: str) -> None:
    plan = plan_for(2, [36, 32])  # total downsampling is 8 per axis
    with pytest.raises(MosaicSegError, match=r"\[36, 32\].*Fix:"):
        build_model(plan, MODALITIES, K, arch, **TINY.get(arch, {}))


@pytest.mark.skipif(not einops_available(), reason="swinunetr needs the optional 'einops' package")
@pytest.mark.parametrize("patch", [[48, 64], [32, 32]])
def test_swinunetr_rejects_unsuitable_patch(patch: list[int]) -> None:
    plan = plan_for(2, patch, strides=[[1, 1], [2, 2], [2, 2]])  # fine for a conv net
    with pytest.raises(MosaicSegError, match=r"swinunetr.*Fix:"):
        build_model(plan, MODALITIES, K, "swinunetr", **TINY["swinunetr"])


@pytest.mark.skipif(einops_available(), reason="only meaningful without einops")
def test_swinunetr_without_einops_says_how_to_fix() -> None:
    with pytest.raises(MosaicSegError, match="einops"):
        build_model(plan_for(2, [32, 64]), MODALITIES, K, "swinunetr")


def test_plan_and_option_errors_are_mosaicseg_errors() -> None:
    with pytest.raises(MosaicSegError, match="Did you mean 'unet'"):
        build_model(plan_for(2), MODALITIES, K, "unett")
    with pytest.raises(MosaicSegError, match="Did you mean 'blocks_per_stage'"):
        build_model(plan_for(2), MODALITIES, K, "resenc_unet", block_per_stage=[1, 1, 1, 1])
    with pytest.raises(MosaicSegError, match="blocks_per_stage"):
        build_model(plan_for(2), MODALITIES, K, "resenc_unet", blocks_per_stage=[1, 1])
    bad_first = plan_for(2, strides=[[2, 2], [2, 2], [2, 2], [1, 1]])
    with pytest.raises(MosaicSegError, match="first stage"):
        build_model(bad_first, MODALITIES, K)
    missing = plan_for(2)
    del missing["strides"]
    with pytest.raises(MosaicSegError, match="'strides'"):
        build_model(missing, MODALITIES, K)
    with pytest.raises(MosaicSegError, match="num_stages"):
        build_model({**plan_for(2), "num_stages": 5}, MODALITIES, K)
    with pytest.raises(MosaicSegError, match="deep_supervision_levels"):
        build_model(plan_for(2), MODALITIES, K, deep_supervision_levels=4)
    with pytest.raises(MosaicSegError, match="version"):
        UniversalNet.from_config({**build_model(plan_for(2), MODALITIES, K).config, "version": 99})


def test_forward_input_errors() -> None:
    model, patch = make("unet", 2)
    image, _ = batch(patch, [0, 1])
    with pytest.raises(MosaicSegError, match="modality index 4 is unknown"):
        model(image, torch.tensor([0, 4]))
    with pytest.raises(MosaicSegError, match="one modality index per sample"):
        model(image, torch.tensor([0]))
    with pytest.raises(MosaicSegError, match="needs 3 channels"):
        model(image[:, :2], torch.tensor([2, 0]))
    with pytest.raises(MosaicSegError, match="not divisible"):
        model(image[..., :20], torch.tensor([0, 1]))
    with pytest.raises(MosaicSegError, match="2D"):
        model(image[:, :, None], torch.tensor([0, 1]))


def test_stems_group_by_modality_and_keep_order() -> None:
    stems = ModalityStems(MODALITIES, 4, spatial_dims=2)
    stems.eval()
    image, modality = batch([8, 8], [3, 0, 3, 2])
    with torch.no_grad():
        out = stems(image, modality)
        assert out.shape == (4, 4, 8, 8)
        for i, m in enumerate(modality.tolist()):
            c = MODALITIES[stems.modalities[m]]
            torch.testing.assert_close(out[i : i + 1], stems.stems[m](image[i : i + 1, :c]))
    with pytest.raises(MosaicSegError, match="channel count"):
        ModalityStems({"CT": 0}, 4, spatial_dims=2)


def test_group_norm_replacing_instance_norm_is_the_same_function() -> None:
    """GroupNorm(C, C) normalises each channel of each sample over space, exactly like InstanceNorm."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 6, generator=g) * 7 + 3
    inorm = torch.nn.InstanceNorm3d(3, affine=True)
    with torch.no_grad():
        inorm.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        inorm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    gnorm = torch.nn.GroupNorm(3, 3)
    gnorm.load_state_dict(inorm.state_dict())
    torch.testing.assert_close(gnorm(x), inorm(x))
    # by hand for one channel of one sample
    c = x[1, 2]
    expected = -1.0 * (c - c.mean()) / torch.sqrt(c.var(unbiased=False) + 1e-5) + 0.3
    torch.testing.assert_close(gnorm(x)[1, 2], expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last_layout_gives_the_same_outputs_and_gradients(arch: str) -> None:
    dims = 3
    model, patch = make(arch, dims)
    assert not any(isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) for m in model.modules())
    other = UniversalNet.from_config(model.config)
    other.load_state_dict(model.state_dict())
    other.set_channels_last(True)
    fmt = torch.channels_last_3d
    convs = [p for p in other.parameters() if p.ndim == dims + 2]
    assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
    image, modality = batch(patch, [0, 2])
    outs = [model(image, modality).logits, other(image, modality).logits]
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-3, atol=1e-4)
    for out in outs:
        sum(o.float().square().mean() for o in out).backward()
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4, msg=name)
    # an old contiguous checkpoint loads into the channels-last model and keeps its layout
    other.load_state_dict(model.state_dict())
    assert all(p.is_contiguous(memory_format=fmt) for p in other.parameters() if p.ndim == dims + 2)


def test_channels_last_is_refused_for_2d_models() -> None:
    model, _ = make("unet", 2)
    with pytest.raises(ValueError, match="3D"):
        model.set_channels_last(True)
    use_device_layout(model, torch.device("cpu"))
    assert not model.channels_last
