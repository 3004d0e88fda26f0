"""Backbones: ``(B, F0, *S)`` → encoder skips → decoder feature maps, full resolution first.

Every backbone has two halves, so that methods can reach inside without copying a forward:

- ``encode(x) -> skips``: ``[(B, skip_channels[i], *S / skip_scales[i]), ...]``, full resolution first and the
  bottleneck **last** (DoDNet's controller and KA²ER's alignment read it, Hermes fuses priors into the skips);
- ``decode(skips) -> maps``: ``[(B, out_channels[i], *S / scales[i]), ...]``, full resolution first; only maps a
  decoder produced, which is what heads and deep supervision consume.

``forward(x)`` is ``decode(encode(x))``. ``scales`` give the downsampling factor of a map per axis (anisotropic
plans give e.g. ``(8, 8, 4)``).

Architectures live in :data:`MODELS` (the one registry of model architectures); each entry is built as
``MODELS.get(name)(topology, in_channels, **options)`` and declares its options and their defaults in
``OPTIONS`` so that the factory can reject typos and store resolved options in checkpoints.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets import SwinUNETR
from torch import nn

from mosaicseg.errors import MosaicSegError
from mosaicseg.models.stems import ACT, NORM
from mosaicseg.registry import Registry

_FIX_PLAN = "edit 'network' in plans.json or re-run `mosaicseg plan`"


# ---------------------------------------------------------------------------------------------- topology
@dataclass(frozen=True)
class Topology:
    """The validated network part of a plan: ``patch_size`` and, per stage, features, kernel and stride."""

    patch_size: tuple[int, ...]
    features: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    @property
    def num_stages(self) -> int:
        return len(self.features)

    def scale(self, stage: int) -> tuple[int, ...]:
        """Downsampling of ``stage`` relative to the input, per axis (product of strides up to it)."""
        return tuple(math.prod(s[axis] for s in self.strides[: stage + 1]) for axis in range(self.spatial_dims))

    def to_plan(self) -> dict[str, Any]:
        """JSON-ready ``network`` dict (the keys :meth:`from_plan` reads)."""
        return {
            "patch_size": list(self.patch_size),
            "features": list(self.features),
            "kernel_sizes": [list(k) for k in self.kernel_sizes],
            "strides": [list(s) for s in self.strides],
            "num_stages": self.num_stages,
        }

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> Topology:
        """Validate a plan's ``network`` dict; every problem raises :class:`MosaicSegError` naming the fix."""
        for key in ("patch_size", "features", "kernel_sizes", "strides"):
            if key not in plan:
                raise MosaicSegError(f"network plan has no '{key}'. Fix: {_FIX_PLAN}.")
        patch = _int_list(plan["patch_size"], "patch_size")
        if len(patch) not in (2, 3):
            raise MosaicSegError(f"patch_size {patch} is neither 2D nor 3D. Fix: give 2 or 3 sizes ({_FIX_PLAN}).")
        dims = len(patch)
        features = _int_list(plan["features"], "features")
        n = len(features)
        if n < 2:
            raise MosaicSegError(f"network plan has {n} stage(s); a U-Net needs at least 2. Fix: {_FIX_PLAN}.")
        if plan.get("num_stages") is not None and plan["num_stages"] != n:
            raise MosaicSegError(
                f"network plan says num_stages={plan['num_stages']} but lists {n} features. Fix: {_FIX_PLAN}."
            )
        kernels = _per_stage(plan["kernel_sizes"], "kernel_sizes", n, dims)
        strides = _per_stage(plan["strides"], "strides", n, dims)
        if any(k % 2 == 0 for stage in kernels for k in stage):
            raise MosaicSegError(f"kernel_sizes {kernels} contain an even size. Fix: use odd kernels (1, 3, 5).")
        if any(s != 1 for s in strides[0]):
            raise MosaicSegError(
                f"the first stage's stride is {list(strides[0])}; it must be all 1 so that the first decoder map "
                f"is at full resolution. Fix: {_FIX_PLAN}."
            )
        topology = cls(tuple(patch), tuple(features), kernels, strides)
        total = topology.scale(n - 1)
        if any(p % t for p, t in zip(patch, total, strict=True)):
            nearest = [max(t, round(p / t) * t) for p, t in zip(patch, total, strict=True)]
            raise MosaicSegError(
                f"patch_size {patch} is not divisible by the total downsampling {list(total)} (product of the "
                f"strides per axis). Fix: use a patch size that is a multiple of it, e.g. {nearest}, or change "
                "the strides in plans.json 'network'."
            )
        return topology


def _int_list(value: Any, key: str) -> list[int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise MosaicSegError(f"network plan '{key}' is {value!r}, not a list. Fix: {_FIX_PLAN}.")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise MosaicSegError(f"network plan '{key}' is {list(value)}; use positive integers. Fix: {_FIX_PLAN}.")
    return [int(v) for v in value]


def _per_stage(value: Any, key: str, stages: int, dims: int) -> tuple[tuple[int, ...], ...]:
    """One entry per stage; an entry is an int (isotropic) or one int per axis."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != stages:
        raise MosaicSegError(f"network plan '{key}' must list one entry per stage ({stages}). Fix: {_FIX_PLAN}.")
    out = []
    for entry in value:
        per_axis = [entry] * dims if isinstance(entry, int) else entry
        values = _int_list(per_axis, key)
        if len(values) != dims:
            raise MosaicSegError(f"network plan '{key}' entry {entry} does not have {dims} axes. Fix: {_FIX_PLAN}.")
        out.append(tuple(values))
    return tuple(out)


# ----------------------------------------------------------------------------------------------- backbones
def einops_available() -> bool:
    """Whether MONAI's SwinUNETR can run: it needs the optional ``einops`` package."""
    return importlib.util.find_spec("einops") is not None


class Backbone(nn.Module):
    """Base class: ``encode`` and ``decode`` (see the module docstring); ``forward = decode ∘ encode``."""

    OPTIONS: ClassVar[dict[str, Any]] = {}
    out_channels: list[int]
    scales: list[tuple[int, ...]]
    skip_channels: list[int]
    skip_scales: list[tuple[int, ...]]
    divisor: tuple[int, ...]  # every input axis must be a multiple of this
    # names (relative to the backbone) that start an encoder parameter; the rest is decoder (``--freeze``)
    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ("encoder.",)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """``(B, in_channels, *S)`` → skips, full resolution first, bottleneck last."""
        raise NotImplementedError

    def decode(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """Skips (as :meth:`encode` returns them) → decoder maps, full resolution first."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decode(self.encode(x))


MODELS: Registry[type[Backbone]] = Registry("architecture")


def resolve_options(architecture: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults of ``architecture`` updated with ``options``; unknown names raise with a suggestion."""
    cls = MODELS.get(architecture)
    for name in options:
        if name not in cls.OPTIONS:
            close = difflib.get_close_matches(name, cls.OPTIONS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            known = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise MosaicSegError(
                f"architecture '{architecture}' has no option '{name}'.{hint} Fix: use one of {known}."
            )
    return {**cls.OPTIONS, **options}


class _ConvDecoder(nn.Module):
    """nnU-Net decoder: transposed conv (kernel = stride) → concat skip → 2 conv-norm-lrelu, per stage."""

    def __init__(self, topology: Topology) -> None:
        super().__init__()
        f, k, s = topology.features, topology.kernel_sizes, topology.strides
        self.ups = nn.ModuleList(
            UnetUpBlock(
                topology.spatial_dims,
                f[i + 1],
                f[i],
                kernel_size=k[i],
                stride=1,
                upsample_kernel_size=s[i + 1],
                norm_name=NORM,
                act_name=ACT,
            )
            for i in range(topology.num_stages - 1)
        )

    def forward(
        self, skips: list[torch.Tensor], after_level: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Encoder outputs (full resolution first, bottleneck last) → decoder maps, full resolution first;
        ``after_level(i, map_i)``, if given, replaces level ``i``'s map before the next (finer) level reads it."""
        x = skips[-1]
        outs = []
        for i in reversed(range(len(self.ups))):
            x = self.ups[i](x, skips[i])
            if after_level is not None:
                x = after_level(i, x)
            outs.append(x)
        return outs[::-1]


class _EncoderDecoder(Backbone):
    """A conv encoder (``self.encoder``: one module per stage) with the nnU-Net decoder."""

    encoder: nn.ModuleList

    def __init__(self, topology: Topology) -> None:
        super().__init__()
        self.decoder = _ConvDecoder(topology)
        self.out_channels = list(topology.features[:-1])
        self.scales = [topology.scale(i) for i in range(topology.num_stages - 1)]
        self.skip_channels = list(topology.features)
        self.skip_scales = [topology.scale(i) for i in range(topology.num_stages)]
        self.divisor = topology.scale(topology.num_stages - 1)

    def encode(
        self, x: torch.Tensor, after_stage: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``after_stage(i, skip_i)``, if given, replaces stage ``i``'s output before the next stage reads it
        (how Hermes fuses priors into the encoder)."""
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if after_stage is not None:
                x = after_stage(i, x)
            skips.append(x)
        return skips

    def decode(
        self, skips: list[torch.Tensor], after_level: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """``after_level(i, map_i)``, if given, replaces decoder level ``i``'s map before the next level reads it
        (how Hermes fuses priors into the decoder)."""
        return self.decoder(skips, after_level)


@MODELS.register("unet")
class PlainUNet(_EncoderDecoder):
    """nnU-Net's plain U-Net: per stage 2 conv-norm-lrelu, the first strided (no pooling)."""

    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, topology: Topology, in_channels: int) -> None:
        super().__init__(topology)
        f, k, s, d = topology.features, topology.kernel_sizes, topology.strides, topology.spatial_dims
        self.encoder = nn.ModuleList(
            UnetBasicBlock(d, in_channels if i == 0 else f[i - 1], f[i], k[i], s[i], norm_name=NORM, act_name=ACT)
            for i in range(topology.num_stages)
        )


@MODELS.register("resenc_unet")
class ResEncUNet(_EncoderDecoder):
    """nnU-Net's residual-encoder U-Net (ResEnc): ``blocks_per_stage[i]`` residual blocks in encoder stage
    ``i`` (the first one strided, with a strided 1x1 conv on the skip path), plain decoder.

    The default ``blocks_per_stage`` is nnU-Net ResEnc's ``[1, 3, 4, 6, 6, 6, ...]`` cut to the stage count.
    The modality stems play the role of ResEnc's input stem.
    """

    OPTIONS: ClassVar[dict[str, Any]] = {"blocks_per_stage": None}

    def __init__(self, topology: Topology, in_channels: int, blocks_per_stage: Sequence[int] | None = None) -> None:
        super().__init__(topology)
        n = topology.num_stages
        blocks = list(blocks_per_stage) if blocks_per_stage is not None else ([1, 3, 4] + [6] * n)[:n]
        if len(blocks) != n or not all(isinstance(b, int) and b >= 1 for b in blocks):
            raise MosaicSegError(
                f"blocks_per_stage {blocks} does not give a positive count for each of the {n} stages. "
                f"Fix: pass {n} positive integers, e.g. {([1, 3, 4] + [6] * n)[:n]}."
            )
        f, k, s, d = topology.features, topology.kernel_sizes, topology.strides, topology.spatial_dims
        self.encoder = nn.ModuleList(
            nn.Sequential(
                UnetResBlock(d, in_channels if i == 0 else f[i - 1], f[i], k[i], s[i], norm_name=NORM, act_name=ACT),
                *(UnetResBlock(d, f[i], f[i], k[i], 1, norm_name=NORM, act_name=ACT) for _ in range(blocks[i] - 1)),
            )
            for i in range(n)
        )


@MODELS.register("swinunetr")
class SwinUNETRBackbone(Backbone):
    """MONAI's SwinUNETR (Swin transformer encoder, conv decoder) as a feature extractor.

    Uses only ``patch_size`` from the topology (its depth is fixed: 5 halvings, so each patch axis must be a
    multiple of 32, and not all of them exactly 32). Needs the optional ``einops`` package. ``encode`` gives
    ``[enc0, enc1, enc2, enc3, swin3, bottleneck]`` with channels ``[fs, fs, 2fs, 4fs, 8fs, 16fs]`` at scales
    ``1, 2, 4, 8, 16, 32``; ``decode`` gives ``[out, dec0, dec1, dec2, dec3]`` with channels
    ``[fs, fs, 2fs, 4fs, 8fs]`` at scales ``1, 2, 4, 8, 16`` (``fs`` = ``feature_size``).
    """

    OPTIONS: ClassVar[dict[str, Any]] = {
        "feature_size": 24,
        "depths": [2, 2, 2, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 7,
        "dropout_path_rate": 0.0,
        "use_checkpoint": False,
        "use_v2": False,
    }
    DIVISOR = 32
    ENCODER_PREFIXES: ClassVar[tuple[str, ...]] = ("net.swinViT.", "net.encoder")

    def __init__(
        self,
        topology: Topology,
        in_channels: int,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        dropout_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        use_v2: bool = False,
    ) -> None:
        super().__init__()
        if not einops_available():
            raise MosaicSegError(
                "architecture 'swinunetr' needs the 'einops' package (MONAI's SwinUNETR uses it). "
                "Fix: `pip install einops`, or use architecture 'unet' or 'resenc_unet'."
            )
        patch = list(topology.patch_size)
        if any(p % self.DIVISOR for p in patch):
            nearest = [max(self.DIVISOR, round(p / self.DIVISOR) * self.DIVISOR) for p in patch]
            raise MosaicSegError(
                f"swinunetr needs every patch axis divisible by {self.DIVISOR}, but patch_size is {patch}. "
                f"Fix: set network.patch_size to e.g. {nearest} in plans.json, or use architecture 'unet'."
            )
        if all(p == self.DIVISOR for p in patch):
            # the bottleneck (1/32) would be one voxel, which InstanceNorm cannot normalise while training
            raise MosaicSegError(
                f"swinunetr with patch_size {patch} has a single-voxel bottleneck. "
                f"Fix: make at least one patch axis {2 * self.DIVISOR} or larger."
            )
        if feature_size % 12:
            raise MosaicSegError(
                f"swinunetr feature_size {feature_size} is not a multiple of 12. Fix: use 12, 24 or 48."
            )
        self.net = SwinUNETR(
            in_channels=in_channels,
            out_channels=1,
            feature_size=feature_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            dropout_path_rate=dropout_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=topology.spatial_dims,
            use_v2=use_v2,
        )
        # the task head replaces MONAI's output conv; dropping it keeps DDP free of unused parameters
        self.net.out = nn.Identity()  # type: ignore[assignment]
        fs, d = feature_size, topology.spatial_dims
        self.out_channels = [fs, fs, 2 * fs, 4 * fs, 8 * fs]
        self.scales = [(2**i,) * d for i in range(5)]
        self.skip_channels = [fs, fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs]
        self.skip_scales = [(2**i,) * d for i in range(6)]
        self.divisor = (self.DIVISOR,) * d

    # encode + decode mirror SwinUNETR.forward (MONAI 1.6) up to, not including, its output conv: MONAI has no
    # public split between its encoder and decoder
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        hidden = net.swinViT(x, net.normalize)
        return [
            net.encoder1(x),
            net.encoder2(hidden[0]),
            net.encoder3(hidden[1]),
            net.encoder4(hidden[2]),
            hidden[3],
            net.encoder10(hidden[4]),
        ]

    def decode(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        net = self.net
        enc0, enc1, enc2, enc3, swin3, bottleneck = skips
        dec3 = net.decoder5(bottleneck, swin3)
        dec2 = net.decoder4(dec3, enc3)
        dec1 = net.decoder3(dec2, enc2)
        dec0 = net.decoder2(dec1, enc1)
        out = net.decoder1(dec0, enc0)
        return [out, dec0, dec1, dec2, dec3]
