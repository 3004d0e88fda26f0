"""Partial-label losses.

MultiTalent (eq. 2): for every task ``c`` annotated by the sample's dataset, BCE averaged over voxels plus a
Dice loss computed **jointly over the batch**, **summed** (not averaged) over tasks, so a task's gradient does
not shrink when its dataset annotates many tasks. Tasks a sample's dataset does not annotate, and voxels under
nnU-Net's ``ignore`` label, contribute nothing (zero gradient), by one multiply with a mask — never a loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5  # nnU-Net's smoothing: an absent structure predicted absent costs ~0


def partial_label_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_mask: torch.Tensor,
    ignore: torch.Tensor | None = None,
    smooth: float = DICE_SMOOTH,
) -> torch.Tensor:
    """MultiTalent's loss for one resolution.

    Args:
        logits: ``(B, K, *S)`` raw scores, one sigmoid output per global task.
        target: ``(B, K, *S)`` multi-hot {0, 1} (any dtype).
        label_mask: ``(B, K)`` bool, tasks annotated by each sample's dataset.
        ignore: ``(B, *S)`` bool, voxels excluded for every task (nnU-Net's ignore label), or None.

    Returns a scalar: ``Σ_c [BCE_c + (1 − Dice_c)]`` over the tasks annotated by at least one sample of the
    batch, where ``BCE_c`` is the mean over that task's valid voxels (annotated samples, not ignored) and
    ``Dice_c = (2 Σ p t + s) / (Σ p + Σ t + s)`` sums over the same voxels of the whole batch (batch Dice).
    """
    b = logits.shape[0]
    annotated = label_mask.bool().any(dim=0)  # (K,)
    if not bool(annotated.any()):
        return logits.sum() * 0.0  # keeps the graph (DDP expects every step to backpropagate)
    tasks = annotated.nonzero().squeeze(1)
    # Only annotated tasks are evaluated: cheaper with many tasks, and un-annotated ones get exactly zero gradient.
    logits = logits.index_select(1, tasks).float()
    target = target.index_select(1, tasks).float()
    spatial = (1,) * (logits.ndim - 2)
    valid = label_mask.bool().index_select(1, tasks).reshape(b, len(tasks), *spatial).float()
    if ignore is not None:
        valid = valid * (~ignore.bool()).unsqueeze(1).float()
    valid = valid.expand_as(logits)
    dims = (0, *range(2, logits.ndim))  # batch and space: everything but the task axis
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    n_valid = valid.sum(dims)
    bce_per_task = (bce * valid).sum(dims) / n_valid.clamp_min(1.0)
    prob = torch.sigmoid(logits) * valid
    tgt = target * valid
    intersection = (prob * tgt).sum(dims)
    dice = (2.0 * intersection + smooth) / (prob.sum(dims) + tgt.sum(dims) + smooth).clamp_min(1e-8)
    has_voxels = (n_valid > 0).float()  # a task whose every voxel is ignored adds nothing
    return ((bce_per_task + 1.0 - dice) * has_voxels).sum()


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's weights ``1/2^i`` for output ``i`` (full resolution first), normalised to sum to 1."""
    raw = [1.0 / 2**i for i in range(levels)]
    total = sum(raw)
    return [w / total for w in raw]


def downsample_like(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour downsampling of a mask ``(B, [K,] *S)`` to spatial ``shape`` (as nnU-Net does for
    deep-supervision targets), keeping the dtype."""
    if tuple(x.shape[-len(shape) :]) == tuple(shape):
        return x
    squeeze = x.ndim == len(shape) + 1  # (B, *S) masks get a channel axis for interpolate
    y = x.unsqueeze(1) if squeeze else x
    y = F.interpolate(y.float(), size=tuple(shape), mode="nearest")
    y = y.squeeze(1) if squeeze else y
    return y.to(x.dtype)


def deep_supervision_loss(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    label_mask: torch.Tensor,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`partial_label_loss` over deep-supervision outputs ``[(B, K, *S_0), (B, K, *S_1), ...]`` (full
    resolution first; a single tensor is one level), targets and ignore masks downsampled to each level."""
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    weights = deep_supervision_weights(len(outputs))
    total = outputs[0].new_zeros(())
    for w, out in zip(weights, outputs, strict=True):
        shape = out.shape[2:]
        ign = downsample_like(ignore, shape) if ignore is not None else None
        total = total + w * partial_label_loss(out, downsample_like(target, shape), label_mask, ign)
    return total
