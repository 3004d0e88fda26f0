"""One input stem per modality: each channel signature gets its own conv into the shared first feature width.

A collection mixes modalities with different channel counts (``CT``: 1, ``FLAIR+T1c``: 2, ``RGB``: 3). The
collate zero-pads every image to ``C_max`` channels; each sample's stem reads only its own first ``C_m``
channels, so the padding never reaches the network and a sample's features do not depend on ``C_max``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from mosaicseg.errors import MosaicSegError

# nnU-Net's normalisation and activation; shared with the backbones
NORM: tuple[str, dict[str, bool]] = ("instance", {"affine": True})
ACT: tuple[str, dict[str, float | bool]] = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class ModalityStems(nn.Module):
    """Per-modality ``conv(k) + InstanceNorm + LeakyReLU`` mapping ``C_m`` channels to ``out_channels``.

    ``modality_channels`` maps a modality name (channel signature) to its channel count; the modality
    index used in :meth:`forward` is the position in this mapping (dict order, as the modality
    vocabulary). ``kernel_size`` is one int or one per axis (nnU-Net uses 1 on coarse axes).
    """

    def __init__(
        self,
        modality_channels: Mapping[str, int],
        out_channels: int,
        spatial_dims: int,
        kernel_size: int | Sequence[int] = 3,
    ) -> None:
        super().__init__()
        if not modality_channels:
            raise MosaicSegError("no modalities given to the model. Fix: pass at least one modality, e.g. {'CT': 1}.")
        for name, channels in modality_channels.items():
            if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
                raise MosaicSegError(
                    f"modality '{name}' has channel count {channels!r}. Fix: give a positive integer channel count."
                )
        self.modalities: tuple[str, ...] = tuple(modality_channels)
        self.channels: tuple[int, ...] = tuple(int(c) for c in modality_channels.values())
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims
        # ModuleList (not ModuleDict) because names like "FLAIR+T1c" are not valid attribute names
        self.stems = nn.ModuleList(
            get_conv_layer(
                spatial_dims,
                c,
                out_channels,
                kernel_size=kernel_size,
                stride=1,
                act=ACT,
                norm=NORM,
                conv_only=False,
                bias=True,
            )
            for c in self.channels
        )

    def _check(self, image: torch.Tensor, modality: torch.Tensor) -> list[int]:
        if image.ndim != self.spatial_dims + 2:
            raise MosaicSegError(
                f"image has shape {tuple(image.shape)} but the model is {self.spatial_dims}D. "
                f"Fix: pass a (B, C, {', '.join('XYZ'[: self.spatial_dims])}) tensor."
            )
        if modality.ndim != 1 or modality.shape[0] != image.shape[0] or modality.is_floating_point():
            raise MosaicSegError(
                f"modality has shape {tuple(modality.shape)} for a batch of {image.shape[0]}. "
                "Fix: pass one modality index per sample, a (B,) long tensor."
            )
        present = [int(m) for m in torch.unique(modality).tolist()]  # one host sync per batch
        for m in present:
            if not 0 <= m < len(self.stems):
                raise MosaicSegError(
                    f"modality index {m} is unknown; this model has {len(self.stems)} modalities "
                    f"{list(self.modalities)}. Fix: use the model's modality vocabulary (indices "
                    f"0..{len(self.stems) - 1}), or extend the model with the new modality."
                )
            if image.shape[1] < self.channels[m]:
                raise MosaicSegError(
                    f"modality '{self.modalities[m]}' needs {self.channels[m]} channels but the image has "
                    f"{image.shape[1]}. Fix: pad images to the collection's largest channel count."
                )
        return present

    def forward(self, image: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``image (B, C_max, *S)``, ``modality (B,)`` long → ``(B, out_channels, *S)``.

        Samples are grouped by modality so that each stem runs once per batch, whatever the mix.
        """
        present = self._check(image, modality)
        if len(present) == 1:
            m = present[0]
            return self.stems[m](image[:, : self.channels[m]])
        outputs: list[torch.Tensor] = []
        order: list[torch.Tensor] = []
        for m in present:
            idx = torch.nonzero(modality == m, as_tuple=True)[0]
            outputs.append(self.stems[m](image[idx, : self.channels[m]]))
            order.append(idx)
        # undo the grouping: row j of the concatenation belongs to sample order[j]
        return torch.cat(outputs)[torch.argsort(torch.cat(order))]
