"""Task heads: decoder feature maps → one logit map per global task (MultiTalent).

Every global task is its own sigmoid output, so overlapping structures (organ and the tumour inside it)
can both be positive; the sigmoid is applied by the loss and the predictor, never here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetOutBlock
from torch import nn

from mosaicseg.errors import MosaicSegError


class TaskHead(nn.Module):
    """A 1x1 conv to ``num_tasks`` logits on each of the first ``deep_supervision_levels`` decoder maps.

    ``channels[i]`` is the channel count of decoder map ``i`` (full resolution first).
    """

    def __init__(
        self, channels: Sequence[int], num_tasks: int, spatial_dims: int, deep_supervision_levels: int
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise MosaicSegError(f"the model has {num_tasks} tasks. Fix: give at least one global task.")
        if not 1 <= deep_supervision_levels <= len(channels):
            raise MosaicSegError(
                f"deep_supervision_levels={deep_supervision_levels} but the backbone has {len(channels)} decoder "
                f"levels. Fix: use a value between 1 and {len(channels)}."
            )
        self.num_tasks = num_tasks
        self.levels = deep_supervision_levels
        self.convs = nn.ModuleList(
            UnetOutBlock(spatial_dims, channels[i], num_tasks) for i in range(deep_supervision_levels)
        )

    def forward(self, features: Sequence[torch.Tensor], levels: int | None = None) -> list[torch.Tensor]:
        """``[(B, c_i, *S_i), ...]`` → ``[(B, K, *S_i)]`` for the first ``levels`` maps (default: all heads)."""
        n = self.levels if levels is None else levels
        return [self.convs[i](features[i]) for i in range(n)]
