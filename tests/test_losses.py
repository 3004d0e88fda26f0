"""MultiTalent's partial-label loss on tiny tensors with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mosaicseg.training.losses import (
    DICE_SMOOTH,
    deep_supervision_loss,
    deep_supervision_weights,
    partial_label_loss,
)

S = DICE_SMOOTH


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_single_task_value_by_hand_and_unannotated_task_has_zero_gradient():
    logits = torch.zeros(1, 2, 2, requires_grad=True)  # p = 0.5 everywhere
    target = torch.tensor([[[1, 0], [1, 1]]])
    mask = torch.tensor([[True, False]])
    loss = partial_label_loss(logits, target, mask)
    expected = math.log(2) + 1 - (2 * 0.5 + S) / (1.0 + 1 + S)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[:, 1] == 0)
    assert torch.all(logits.grad[:, 0] != 0)


def test_dice_is_computed_jointly_over_the_batch():
    p = [[0.8, 0.6], [0.2, 0.4]]
    logits = torch.tensor([[[logit(v) for v in row]] for row in p])  # (2, 1, 2)
    target = torch.tensor([[[1, 1]], [[0, 0]]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    bce = -(math.log(0.8) + math.log(0.6) + math.log(0.8) + math.log(0.6)) / 4
    batch_dice = (2 * 1.4 + S) / (2.0 + 2 + S)
    assert partial_label_loss(logits, target, mask).item() == pytest.approx(bce + 1 - batch_dice, rel=1e-5)
    per_sample = ((2 * 1.4 + S) / (1.4 + 2 + S) + S / (0.6 + S)) / 2
    assert abs((1 - batch_dice) - (1 - per_sample)) > 0.1  # the two definitions really differ here


def test_tasks_are_summed_not_averaged_and_overlaps_are_independent():
    torch.manual_seed(0)
    one = torch.randn(1, 1, 3, 3)
    t = (torch.rand(1, 1, 3, 3) > 0.5).to(torch.uint8)
    single = partial_label_loss(one, t, torch.ones(1, 1, dtype=torch.bool))
    # the same structure as three overlapping tasks (a voxel positive for all of them): three times the loss
    triple = partial_label_loss(one.repeat(1, 3, 1, 1), t.repeat(1, 3, 1, 1), torch.ones(1, 3, dtype=torch.bool))
    assert triple.item() == pytest.approx(3 * single.item(), rel=1e-6)


def test_each_task_only_uses_the_samples_that_annotate_it():
    # sample 0 annotates task 0 only, sample 1 task 1 only: each task sees one sample's voxels
    logits = torch.tensor([[[logit(0.9)], [logit(0.3)]], [[logit(0.7)], [logit(0.2)]]])  # (2, 2, 1)
    target = torch.tensor([[[1], [1]], [[0], [1]]])
    mask = torch.tensor([[True, False], [False, True]])
    task0 = -math.log(0.9) + 1 - (2 * 0.9 + S) / (0.9 + 1 + S)
    task1 = -math.log(0.2) + 1 - (2 * 0.2 + S) / (0.2 + 1 + S)
    assert partial_label_loss(logits, target, mask).item() == pytest.approx(task0 + task1, rel=1e-5)


def test_ignored_voxels_change_nothing_and_get_no_gradient():
    logits = torch.tensor([[[logit(0.7), logit(0.4), 5.0]]], requires_grad=True)  # (1, 1, 3)
    target = torch.tensor([[[1, 0, 0]]])
    ignore = torch.tensor([[False, False, True]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss = partial_label_loss(logits, target, mask, ignore)
    bce = -(math.log(0.7) + math.log(0.6)) / 2
    dice = (2 * 0.7 + S) / (0.7 + 0.4 + 1 + S)
    assert loss.item() == pytest.approx(bce + 1 - dice, rel=1e-5)
    loss.backward()
    assert logits.grad[0, 0, 2] == 0
    other = logits.detach().clone()
    other[0, 0, 2] = -7.0
    assert partial_label_loss(other, target, mask, ignore).item() == pytest.approx(loss.item(), rel=1e-7)


def test_nothing_annotated_gives_zero_with_a_graph():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = partial_label_loss(logits, torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_deep_supervision_weights_and_downsampled_targets():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    torch.manual_seed(1)
    full = torch.randn(1, 2, 4, 4)
    low = torch.randn(1, 2, 2, 2)
    target = (torch.rand(1, 2, 4, 4) > 0.5).to(torch.uint8)
    mask = torch.tensor([[True, True]])
    got = deep_supervision_loss([full, low], target, mask)
    expected = 2 / 3 * partial_label_loss(full, target, mask) + 1 / 3 * partial_label_loss(
        low, target[:, :, ::2, ::2], mask
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_distributed_option_needs_a_process_group():
    logits, target, mask = torch.zeros(1, 1, 2), torch.ones(1, 1, 2), torch.ones(1, 1, dtype=torch.bool)
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        partial_label_loss(logits, target, mask, distributed=True)
    with pytest.raises(RuntimeError, match="init_process_group"):
        deep_supervision_loss([logits], target, mask, distributed=True)
    # off by default: the same call without the option is the single-process loss
    assert deep_supervision_loss([logits], target, mask).item() == partial_label_loss(logits, target, mask).item()


def test_pos_weight_scales_the_bce_of_foreground_voxels_only_by_hand():
    # one task, two voxels at logit 0 (p = 1/2): one foreground, one background
    logits = torch.zeros(1, 1, 2)
    target = torch.tensor([[[1.0, 0.0]]])
    mask = torch.tensor([[True]])
    dice = 1 - (2 * 0.5 + DICE_SMOOTH) / (1.0 + 1.0 + DICE_SMOOTH)
    plain = partial_label_loss(logits, target, mask)
    weighted = partial_label_loss(logits, target, mask, pos_weight=3.0)
    # BCE per voxel is log 2; the weighted mean is (3 log 2 + log 2) / 2
    torch.testing.assert_close(plain, torch.tensor(math.log(2) + dice))
    torch.testing.assert_close(weighted, torch.tensor(2 * math.log(2) + dice))
