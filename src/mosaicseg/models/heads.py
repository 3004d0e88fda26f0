"""Task heads: decoder feature maps → one logit map per global task (MultiTalent).

Every global task is its own sigmoid output, so overlapping structures (organ and the tumour inside it)
can both be positive; the sigmoid is applied by the loss and the predictor, never here.

Heads live in :data:`HEADS`; each is built as ``HEADS.get(name)(channels, num_tasks, spatial_dims, levels)``.
A head lists in ``task_parameters`` the names of its parameters whose first axis indexes the tasks, so that
``init_from`` can carry a trained task's row over to a model with another task list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock
from torch import nn

from mosaicseg.errors import MosaicSegError
from mosaicseg.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("head")


@HEADS.register("task")
class TaskHead(nn.Module):
    """A 1x1 conv to ``num_tasks`` logits on each of the first ``deep_supervision_levels`` decoder maps.

    ``channels[i]`` is the channel count of decoder map ``i`` (full resolution first).
    """

    # conv weight (K, c, 1, 1[, 1]) and bias (K,) of every level: row k belongs to task k
    task_parameters: ClassVar[tuple[str, ...]] = ("conv.conv.weight", "conv.conv.bias")

    def __init__(
        self,
        channels: Sequence[int],
        num_tasks: int,
        spatial_dims: int,
        deep_supervision_levels: int,
        global_rows: bool = True,
    ) -> None:
        """``global_rows``: row k of the output is global task k (False for a head of one dataset's tasks or of
        one task at a time, whose rows ``init_from`` must not map by task name)."""
        super().__init__()
        self.global_rows = global_rows
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

        self.blocks: tuple[int, ...] | None = None

    def set_task_blocks(self, blocks: Sequence[int] | None) -> None:
        """Compute the outputs in consecutive blocks of ``blocks[j]`` tasks, one convolution each (None: one for
        all). ``extend`` appends a block for the new tasks so that the old tasks' logits come from a convolution
        of the very shape they were trained with: one conv over more output channels may round differently
        (oneDNN blocks the channels), and old outputs must stay bit-identical."""
        if blocks is not None and (sum(blocks) != self.num_tasks or min(blocks) < 1):
            raise ValueError(f"task blocks {list(blocks)} do not split {self.num_tasks} tasks")
        self.blocks = tuple(int(b) for b in blocks) if blocks is not None and len(blocks) > 1 else None

    def forward(self, features: Sequence[torch.Tensor], levels: int | None = None) -> list[torch.Tensor]:
        """``[(B, c_i, *S_i), ...]`` → ``[(B, K, *S_i)]`` for the first ``levels`` maps (default: all heads)."""
        n = self.levels if levels is None else levels
        if self.blocks is None:
            return [self.convs[i](features[i]) for i in range(n)]
        conv = F.conv3d if features[0].ndim == 5 else F.conv2d
        out = []
        for i in range(n):
            layer = self.convs[i].conv.conv
            starts = [sum(self.blocks[:j]) for j in range(len(self.blocks))]
            out.append(
                torch.cat(
                    [
                        conv(features[i], layer.weight[a : a + b], layer.bias[a : a + b])
                        for a, b in zip(starts, self.blocks, strict=True)
                    ],
                    dim=1,
                )
            )
        return out

    def is_task_parameter(self, name: str) -> bool:
        """Whether parameter ``name`` (relative to this head) has one row per task on its first axis."""
        return self.global_rows and any(name.endswith(p) for p in self.task_parameters)
