"""Partial-label losses.

MultiTalent (eq. 2): for every task ``c`` annotated by the sample's dataset, BCE averaged over voxels plus a
Dice loss computed **jointly over the batch**, **summed** (not averaged) over tasks, so a task's gradient does
not shrink when its dataset annotates many tasks. Tasks a sample's dataset does not annotate, and voxels under
nnU-Net's ``ignore`` label, contribute nothing (zero gradient), by one multiply with a mask — never a loop.

Under DDP each rank holds only its share of the global batch, while the BCE mean and the batch Dice are ratios of
sums over the whole batch: averaging per-rank losses is not the loss of the global batch (a rank whose samples
barely show a task gets a Dice of its own). ``distributed=True`` all-reduces the per-task sums instead, so every
rank computes the loss of the global batch (see :func:`partial_label_loss` for why the gradients come out right).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

DICE_SMOOTH = 1e-5  # nnU-Net's smoothing: an absent structure predicted absent costs ~0


def partial_label_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_mask: torch.Tensor,
    ignore: torch.Tensor | None = None,
    smooth: float = DICE_SMOOTH,
    *,
    pos_weight: float = 1.0,
    distributed: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """MultiTalent's loss for one resolution.

    Args:
        logits: ``(B, K, *S)`` raw scores, one sigmoid output per global task.
        target: ``(B, K, *S)`` multi-hot {0, 1} (any dtype).
        label_mask: ``(B, K)`` bool, tasks annotated by each sample's dataset.
        ignore: ``(B, *S)`` bool, voxels excluded for every task (nnU-Net's ignore label), or None.
        distributed: the batch is this rank's share of a global batch split over the ranks of ``group``
            (default: every rank); every rank must call this with the same ``K`` and returns the loss of the
            global batch.
        group: the process group of ``distributed`` (None: the default group).
        pos_weight: weight of the BCE term of foreground voxels (1: MultiTalent's plain BCE). A structure that
            fills 0.1 % of a patch gets 0.1 % of the BCE's pull; a larger weight lets BCE raise a task whose
            probabilities have collapsed to ~0, where the Dice gradient vanishes through the sigmoid.

    Returns a scalar: ``Σ_c [BCE_c + (1 − Dice_c)]`` over the tasks annotated by at least one sample of the
    batch, where ``BCE_c`` is the mean over that task's valid voxels (annotated samples, not ignored) and
    ``Dice_c = (2 Σ p t + s) / (Σ p + Σ t + s)`` sums over the same voxels of the whole batch (batch Dice).

    ``distributed``: the annotated-task set is or-ed over the ranks first (an all-reduce without autograd of the
    ``(K,)`` mask), so every rank evaluates the same tasks and issues the same collectives, even a rank whose own
    samples annotate none of them. Then the per-task sums (BCE numerator, valid-voxel count, Dice intersection,
    prediction sum, target sum) are summed over the ranks by one differentiable all-reduce (the semantics of
    ``torch.distributed.nn.functional.all_reduce``), and each rank computes the same global loss ``L`` of the
    summed ``S = Σ_r sums_r``. Gradients: the backward of that all-reduce sums the incoming ``∂L/∂S`` over the
    ``W`` ranks, each of which sends the same one (every rank's loss is ``L``), so rank ``r``'s parameters get
    ``W · ∂L/∂S · ∂sums_r/∂θ`` through its own share. DDP then averages over the ranks:
    ``(1/W) Σ_r W · ∂L/∂S · ∂sums_r/∂θ = ∂L/∂θ``, the gradient of the single-process loss on the global batch
    (tests/test_distributed.py checks it). Without DDP's averaging (a plain sum of gradients) it would be ``W``
    times too large.
    """
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("partial_label_loss(distributed=True) needs torch.distributed.init_process_group first")
    annotated = _annotated_tasks(label_mask, distributed, group)
    return _partial_label_loss(logits, target, label_mask, ignore, smooth, annotated, distributed, group, pos_weight)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks with autograd: the backward sums the incoming gradients over the ranks too. The same as
    ``torch.distributed.nn.functional.all_reduce``, which recent torch deprecates with a warning on every call
    (2.13); its suggested replacement in ``torch.distributed._functional_collectives`` is private and
    differentiable only in recent versions."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _annotated_tasks(label_mask: torch.Tensor, distributed: bool, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``(K,)`` bool: the tasks annotated by at least one sample of the batch (of the global batch if
    ``distributed``)."""
    annotated = label_mask.bool().any(dim=0)
    if distributed:
        counts = annotated.to(torch.int32)  # no autograd: a mask
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        annotated = counts > 0
    return annotated


def _partial_label_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_mask: torch.Tensor,
    ignore: torch.Tensor | None,
    smooth: float,
    annotated: torch.Tensor,
    distributed: bool,
    group: dist.ProcessGroup | None,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """:func:`partial_label_loss` with the ``(K,)`` annotated-task set given (the same on every rank)."""
    b = logits.shape[0]
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
    weight = None if pos_weight == 1.0 else logits.new_tensor(pos_weight)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=weight)
    prob = torch.sigmoid(logits) * valid
    tgt = target * valid
    # per task (T,): BCE numerator, valid voxels, Dice intersection, prediction sum, target sum
    sums = torch.stack(
        [(bce * valid).sum(dims), valid.sum(dims), (prob * tgt).sum(dims), prob.sum(dims), tgt.sum(dims)]
    )
    if distributed:
        sums = _AllReduceSum.apply(sums, group)
    bce_sum, n_valid, intersection, prob_sum, tgt_sum = sums.unbind(0)
    bce_per_task = bce_sum / n_valid.clamp_min(1.0)
    dice = (2.0 * intersection + smooth) / (prob_sum + tgt_sum + smooth).clamp_min(1e-8)
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
    *,
    pos_weight: float = 1.0,
    distributed: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """:func:`partial_label_loss` over deep-supervision outputs ``[(B, K, *S_0), (B, K, *S_1), ...]`` (full
    resolution first; a single tensor is one level), targets ``(B, K, *S_0)`` and ignore masks ``(B, *S_0)``
    downsampled to each level. ``distributed``/``group``: as in :func:`partial_label_loss` (the global loss on
    every rank; the annotated-task set is reduced once for all levels)."""
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("deep_supervision_loss(distributed=True) needs torch.distributed.init_process_group first")
    if isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    annotated = _annotated_tasks(label_mask, distributed, group)
    weights = deep_supervision_weights(len(outputs))
    total = outputs[0].new_zeros(())
    for w, out in zip(weights, outputs, strict=True):
        shape = out.shape[2:]
        ign = downsample_like(ignore, shape) if ignore is not None else None
        level = _partial_label_loss(
            out, downsample_like(target, shape), label_mask, ign, DICE_SMOOTH, annotated, distributed, group, pos_weight
        )
        total = total + w * level
    return total


def modality_loss(logits: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Hermes' auxiliary term: cross-entropy of modality logits ``(B, M)`` against modality indices ``(B,)``."""
    return F.cross_entropy(logits.float(), modality.long())


def alignment_loss(
    f_s: torch.Tensor,
    f_m: torch.Tensor,
    norm: str = "mse",
    detach: bool = True,
    groups: torch.Tensor | None = None,
    scale_free: bool = False,
) -> torch.Tensor:
    """KA²ER's feature alignment: eq. 1's ``Σ_k L_align`` over the experts ``k``, each term eq. 2's ``‖f_s − f_m‖``.

    ``f_s (R, N, C)``: rows of the student's self-attended bottleneck tokens; ``f_m (R, N, C)``: the amalgamated
    tokens each row is aligned with; ``groups (R,)`` long: the expert each row belongs to (None: all rows one
    group, a single term). Per group: ``mse`` = mean over its rows' tokens of ``‖f_s − f_m‖² / C``, ``l2`` = mean
    over its rows' tokens of ``‖f_s − f_m‖``; the result is the **sum** over the groups present (eq. 1 sums over
    the teachers, so the term grows with the number of experts in the batch; ``align_weight`` scales it), a
    zero scalar without rows. ``detach``: ``f_m`` is the target (no gradient through it), so the student's own
    path learns what the experts added; the paper does not say (an option of the recipe). ``scale_free``: both
    sides layer-normalised over C first (no affine), so only what the student's decoder reads after its own
    LayerNorm is compared, not a scale the decoder ignores."""
    if norm not in ("mse", "l2"):
        raise ValueError(f"alignment norm {norm!r}: use mse or l2")
    target = (f_m.detach() if detach else f_m).float()
    student = f_s.float()
    if scale_free:
        student, target = F.layer_norm(student, student.shape[-1:]), F.layer_norm(target, target.shape[-1:])
    diff = student - target  # (R, N, C)
    if diff.shape[0] == 0:
        return diff.sum()  # no expert in the batch: nothing to align (a zero that keeps the graph)
    per_token = diff.square().mean(-1) if norm == "mse" else diff.norm(dim=-1)  # (R, N)
    per_row = per_token.mean(-1)  # (R,): every row has the same N tokens, so a group's mean of rows is its token mean
    if groups is None:
        return per_row.mean()
    ids, index = torch.unique(groups, return_inverse=True)
    sums = per_row.new_zeros(len(ids)).index_add(0, index, per_row)
    counts = per_row.new_zeros(len(ids)).index_add(0, index, torch.ones_like(per_row))
    return (sums / counts).sum()


def bernoulli_kl(student_logits: torch.Tensor, expert_probs: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """KL(student ‖ expert) of per-voxel Bernoulli outputs, averaged over every element: ``p log(p/q) + (1 − p)
    log((1 − p)/(1 − q))``, ``p = σ(student_logits)``, ``q = expert_probs`` clamped to ``[eps, 1 − eps]``."""
    p = torch.sigmoid(student_logits.float()).clamp(eps, 1 - eps)
    q = expert_probs.float().clamp(eps, 1 - eps)
    return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).mean()
