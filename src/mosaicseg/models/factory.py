"""``build_model``: plan + modalities + task count → :class:`UniversalNet` (stems + backbone + task head).

One network serves every dataset of a collection: a stem per modality maps each channel signature to the
first feature width, a backbone from :data:`MODELS` produces decoder maps, and the head gives one sigmoid
logit per global task. ``UniversalNet.config`` holds everything needed to rebuild the model, so a
checkpoint stores it next to the weights and :meth:`UniversalNet.from_config` restores the architecture.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mosaicseg.errors import MosaicSegError
from mosaicseg.models.backbones import MODELS, Topology, resolve_options
from mosaicseg.models.heads import TaskHead
from mosaicseg.models.stems import ModalityStems

CONFIG_VERSION = 1

__all__ = ["MODELS", "UniversalNet", "build_model", "use_device_layout"]


class UniversalNet(nn.Module):
    """Stems + backbone + task head.

    ``forward(image (B, C_max, *S), modality (B,) long)`` returns

    - in ``train()`` mode with deep supervision: a list of logits, full resolution first,
      ``[(B, K, *S), (B, K, *S / ds_scales[1]), ...]``. By default it covers every decoder level except the
      coarsest one (nnU-Net v2 gives that level zero loss weight), i.e. ``num_stages - 2`` levels for the
      U-Nets (at least 1) and 4 for SwinUNETR; ``deep_supervision_levels`` overrides this;
    - otherwise a single tensor ``(B, K, *S)``.

    Build it with :func:`build_model` or :meth:`from_config`.
    """

    def __init__(
        self,
        network_plan: Mapping[str, Any],
        modality_channels: Mapping[str, int],
        num_tasks: int,
        architecture: str = "unet",
        deep_supervision: bool = True,
        deep_supervision_levels: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        topology = Topology.from_plan(network_plan)
        resolved = resolve_options(architecture, dict(options or {}))
        self.spatial_dims = topology.spatial_dims
        self.num_tasks = int(num_tasks)
        self.deep_supervision = bool(deep_supervision)
        self.stems = ModalityStems(
            modality_channels, topology.features[0], topology.spatial_dims, kernel_size=topology.kernel_sizes[0]
        )
        self.backbone = MODELS.get(architecture)(topology, topology.features[0], **resolved)
        available = len(self.backbone.out_channels)
        default_levels = max(1, available - 1)
        levels = (deep_supervision_levels or default_levels) if deep_supervision else 1
        self.head = TaskHead(self.backbone.out_channels, self.num_tasks, self.spatial_dims, levels)
        self.ds_scales: list[tuple[int, ...]] = list(self.backbone.scales[:levels])
        _instance_norm_as_group_norm(self)
        self.channels_last = False
        self._config: dict[str, Any] = {
            "version": CONFIG_VERSION,
            "network_plan": topology.to_plan(),
            "modality_channels": dict(modality_channels),
            "num_tasks": self.num_tasks,
            "architecture": architecture,
            "deep_supervision": self.deep_supervision,
            "deep_supervision_levels": levels if deep_supervision else None,
            "options": copy.deepcopy(resolved),
        }

    def set_channels_last(self, enabled: bool) -> UniversalNet:
        """Keep conv weights and activations ``torch.channels_last_3d`` (``enabled``) or contiguous.

        A layout choice, not architecture: it is not part of :attr:`config` and changes results only by float
        rounding. On CPU (oneDNN) a channels-last 3D training step ran ~20 % faster here (BENCHMARKS.md, speed
        study). 3D only: with torch 2.13 on CPU a 2D channels-last 1x1 strided convolution returned a wrong
        weight gradient and a 2D 1x1 backward hung (found by tests/test_models.py; oneDNN's AVX2 1x1
        backward-weights kernel for nhwc with fewer input channels than its block, uxlfoundation/oneDNN#6035),
        and 2D was never slow.
        """
        if enabled and self.spatial_dims != 3:
            raise ValueError("channels-last is only used for 3D models (see the docstring)")
        self.channels_last = bool(enabled)
        fmt = torch.channels_last_3d if enabled else torch.contiguous_format
        for module in self.modules():
            for param in module.parameters(recurse=False):
                if param.ndim == 5:
                    param.data = param.data.contiguous(memory_format=fmt)
        return self

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names; a sample's ``modality`` index points into this tuple."""
        return self.stems.modalities

    @property
    def config(self) -> dict[str, Any]:
        """JSON-ready arguments that rebuild this architecture (a copy; editing it changes nothing)."""
        return copy.deepcopy(self._config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UniversalNet:
        """Rebuild the (untrained) architecture described by :attr:`config`, e.g. from a checkpoint."""
        version = config.get("version")
        if version != CONFIG_VERSION:
            raise MosaicSegError(
                f"model config version {version!r} is not supported (expected {CONFIG_VERSION}). "
                "Fix: use a checkpoint written by this version of mosaicseg."
            )
        kwargs = {k: v for k, v in config.items() if k != "version"}
        try:
            return cls(**copy.deepcopy(kwargs))
        except TypeError as err:
            raise MosaicSegError(
                f"model config is malformed ({err}). Fix: use a config from UniversalNet.config."
            ) from err

    def _check_shape(self, image: torch.Tensor) -> None:
        if image.ndim != self.spatial_dims + 2:
            raise MosaicSegError(
                f"image has shape {tuple(image.shape)} but the model is {self.spatial_dims}D. "
                f"Fix: pass a (B, C, {', '.join('XYZ'[: self.spatial_dims])}) tensor."
            )
        divisor = self.backbone.divisor
        spatial = tuple(image.shape[2:])
        if any(s % d for s, d in zip(spatial, divisor, strict=True)):
            raise MosaicSegError(
                f"input spatial shape {list(spatial)} is not divisible by {list(divisor)}. "
                "Fix: feed patches of the planned patch size (sliding-window inference does this)."
            )

    def features(self, image: torch.Tensor, modality: torch.Tensor) -> list[torch.Tensor]:
        """Decoder maps ``[(B, c_i, *S / backbone.scales[i]), ...]``, full resolution first."""
        self._check_shape(image)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last_3d)
        x = self.stems(image, modality)
        return self.backbone(x)

    def forward(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``(B, C_max, *S)``, ``(B,)`` → logits ``(B, K, *S)`` or, when training with deep supervision, a
        list of them at :attr:`ds_scales`."""
        feats = self.features(image, modality)
        if self.training and self.deep_supervision:
            return self.head(feats)
        return self.head(feats, levels=1)[0]


def use_device_layout(model: nn.Module, device: torch.device, *, mixed_precision: bool = False) -> None:
    """Channels-last for every 3D :class:`UniversalNet` in ``model`` on CPU in float32, contiguous otherwise
    (measured on CPU only; see :meth:`UniversalNet.set_channels_last`). ``mixed_precision``: the model trains
    under bf16 autocast, whose CPU training step is faster contiguous (measured with native bf16, brain4's CPU plan:
    0.397 s contiguous, 0.634 s channels-last, 0.646 s in float32 channels-last)."""
    for module in model.modules():
        if isinstance(module, UniversalNet):
            module.set_channels_last(device.type == "cpu" and module.spatial_dims == 3 and not mixed_precision)


def _instance_norm_as_group_norm(module: nn.Module) -> None:
    """Replace every ``InstanceNorm{1,2,3}d`` below ``module`` by ``GroupNorm(C, C)`` in place.

    One group per channel normalises each channel of each sample over its spatial axes: the same function,
    eps and ``weight``/``bias`` names (checkpoints load either way). The reason is speed: PyTorch's instance
    norm returns a contiguous tensor, which makes every following convolution reorder a channels-last input,
    while group norm keeps the layout (measured: training step 1.48 → 1.18 s, 2 threads, see BENCHMARKS.md).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.instancenorm._InstanceNorm):
            if child.track_running_stats:
                raise MosaicSegError(
                    f"{name}: instance norm with running statistics cannot become group norm. "
                    "Fix: build the block with track_running_stats=False (nnU-Net's default)."
                )
            norm = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
            setattr(module, name, norm)
        else:
            _instance_norm_as_group_norm(child)


def build_model(
    network_plan: Mapping[str, Any],
    modality_channels: Mapping[str, int],
    num_tasks: int,
    architecture: str = "unet",
    deep_supervision: bool = True,
    deep_supervision_levels: int | None = None,
    **options: Any,
) -> UniversalNet:
    """Build the universal network.

    - ``network_plan``: plans.json ``network`` (``patch_size``, ``features``, ``kernel_sizes``, ``strides``;
      other keys such as ``batch_size`` are ignored). ``spatial_dims`` is ``len(patch_size)``.
    - ``modality_channels``: modality name → channel count, in modality-vocabulary order.
    - ``num_tasks``: K, the number of global tasks (one sigmoid output each).
    - ``architecture``: a name in :data:`MODELS` (``unet``, ``resenc_unet``, ``swinunetr``).
    - ``options``: architecture options (e.g. ``blocks_per_stage``, ``feature_size``); unknown names raise.
    """
    return UniversalNet(
        network_plan,
        modality_channels,
        num_tasks,
        architecture=architecture,
        deep_supervision=deep_supervision,
        deep_supervision_levels=deep_supervision_levels,
        options=options,
    )
