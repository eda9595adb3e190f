"""volseg.losses: known values, agreement with torch, and weight 0 meaning "not there at all"."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from volseg.errors import VolsegError
from volseg.losses import (
    LOSSES,
    bce_dice,
    binary_cross_entropy,
    cross_entropy,
    deep_supervision_loss,
    dice_ce,
    downsample_targets,
    get_loss,
    soft_dice,
)


def two_voxels() -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel 0: logits (0, 0), class 0 -> p = 1/2. Voxel 1: logits (ln 3, 0), class 1 -> p = 1/4."""
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 2, 1, 1)
    target = torch.tensor([0, 1]).reshape(1, 2, 1, 1)
    return logits, target


def test_cross_entropy_by_hand():
    logits, target = two_voxels()
    ln2 = math.log(2.0)
    assert cross_entropy(logits, target).item() == pytest.approx(1.5 * ln2, rel=1e-6)
    w = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
    assert cross_entropy(logits, target, w).item() == pytest.approx((ln2 + 3 * 2 * ln2) / 4, rel=1e-6)
    w = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    assert cross_entropy(logits, target, w).item() == pytest.approx(2 * ln2, rel=1e-6)


def test_soft_dice_by_hand():
    logits, target = two_voxels()
    # foreground probabilities (1/2, 1/4), foreground target (0, 1):
    # intersection 1/4, sums 3/4 + 1 -> Dice = (1/2) / (7/4) = 2/7
    assert soft_dice(logits, target).item() == pytest.approx(1 - 2 / 7, rel=1e-4)
    # only voxel 1 labelled: intersection 1/4, sums 1/4 + 1 -> Dice = 2/5
    w = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    assert soft_dice(logits, target, w).item() == pytest.approx(1 - 2 / 5, rel=1e-4)
    assert dice_ce(logits, target, w).item() == pytest.approx(1 - 2 / 5 + 2 * math.log(2.0), rel=1e-4)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_cross_entropy_matches_torch_without_weight(num_classes):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, num_classes, 3, 5, 4, generator=g) * 3
    target = torch.randint(0, num_classes, (2, 3, 5, 4), generator=g)
    expected = F.cross_entropy(logits, target)
    assert torch.allclose(cross_entropy(logits, target), expected, rtol=1e-6, atol=1e-7)
    ones = torch.ones(2, 3, 5, 4)
    assert torch.allclose(cross_entropy(logits, target, ones), expected, rtol=1e-6, atol=1e-7)
    # a uniform weight scale does not change a weighted mean
    assert torch.allclose(cross_entropy(logits, target, 2.5 * ones), expected, rtol=1e-6, atol=1e-7)


def test_cross_entropy_binary_mask_equals_mean_over_labelled():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 4, 3, 5, generator=g)
    target = torch.randint(0, 3, (1, 4, 3, 5), generator=g)
    mask = torch.rand(1, 4, 3, 5, generator=g) > 0.5
    per_voxel = F.cross_entropy(logits, target, reduction="none")
    assert torch.allclose(cross_entropy(logits, target, mask.float()), per_voxel[mask].mean(), rtol=1e-6)


def onehot_logits(target: torch.Tensor, num_classes: int, scale: float = 50.0) -> torch.Tensor:
    return F.one_hot(target, num_classes).movedim(-1, 1).float() * scale


def test_perfect_prediction_has_near_zero_loss():
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 3, (2, 5, 4, 3), generator=g)
    target[0, 0, 0, 0], target[0, 0, 0, 1], target[0, 0, 0, 2] = 0, 1, 2  # every class present
    logits = onehot_logits(target, 3)
    assert soft_dice(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    assert cross_entropy(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    assert dice_ce(logits, target).item() == pytest.approx(0.0, abs=1e-5)
    # and the exact opposite is the worst case: Dice loss near 1
    wrong = onehot_logits((target + 1) % 3, 3)
    assert soft_dice(wrong, target).item() == pytest.approx(1.0, abs=1e-5)


def test_soft_dice_pools_over_batch():
    """Dice sums run over the whole batch (nnU-Net's batch Dice), not per sample.

    Sample 0 predicts its single foreground voxel perfectly; sample 1 has no foreground and predicts
    p = 1/2 on its 27 voxels. Pooled: intersection 1, sums (1 + 13.5) + 1 -> loss 1 - 2/15.5 = 27/31
    (a per-sample mean would give about 1/2).
    """
    target = torch.zeros(2, 3, 3, 3, dtype=torch.long)
    target[0, 1, 1, 1] = 1
    logits = onehot_logits(target, 2)
    logits[1] = 0.0
    assert soft_dice(logits, target).item() == pytest.approx(27 / 31, rel=1e-5)


def test_soft_dice_needs_two_classes():
    with pytest.raises(VolsegError):
        soft_dice(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long))


def sparse_case(seed: int):
    """Random logits/labels, a weight map with zeros, and a copy that differs only where weight is 0."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 5, 3, 4)
    logits = torch.randn(2, 3, *shape[1:], generator=g) * 2
    target = torch.randint(0, 3, shape, generator=g)
    weight = (torch.rand(shape, generator=g) > 0.4).float() * torch.rand(shape, generator=g).add(0.5)
    weight[0, 0, 0, 0] = 0.0
    weight[1, 1, 1, 1] = 1.0
    unlabelled = weight == 0
    other_logits = logits.clone()
    other_logits[unlabelled.unsqueeze(1).expand_as(logits)] = (
        torch.randn(int(unlabelled.sum()) * 3, generator=g) * 10
    )
    other_target = target.clone()
    other_target[unlabelled] = (target[unlabelled] + 1 + torch.randint(0, 2, (int(unlabelled.sum()),), generator=g)) % 3
    assert unlabelled.sum() > 5 and (other_target != target).any()
    return logits, target, other_logits, other_target, weight, unlabelled


def value_and_grad(fn, logits, target, weight):
    x = logits.clone().requires_grad_(True)
    value = fn(x, target, weight)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("name", ["dice_ce", "ce", "dice", "bce", "bce_dice"])
@pytest.mark.parametrize("change", ["logits", "labels", "both"])
def test_unlabelled_voxels_change_nothing(name, change):
    """THE sparse-annotation property: whatever sits where weight is 0 is invisible to the loss."""
    fn = get_loss(name)
    logits, target, other_logits, other_target, weight, unlabelled = sparse_case(seed=11)
    new_logits = other_logits if change in ("logits", "both") else logits
    new_target = other_target if change in ("labels", "both") else target

    v1, g1 = value_and_grad(fn, logits, target, weight)
    v2, g2 = value_and_grad(fn, new_logits, new_target, weight)

    assert torch.isfinite(v1)
    assert torch.allclose(v1, v2, rtol=1e-6, atol=0)
    mask = unlabelled.unsqueeze(1).expand_as(g1)
    assert torch.equal(g1[mask], torch.zeros_like(g1[mask]))
    assert torch.equal(g2[mask], torch.zeros_like(g2[mask]))
    assert torch.allclose(g1[~mask], g2[~mask], rtol=1e-5, atol=1e-9)
    assert g1[~mask].abs().sum() > 0


@pytest.mark.parametrize("name", ["dice_ce", "ce", "dice", "bce", "bce_dice"])
def test_all_unlabelled_is_finite_and_flat(name):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 2, 3, 4, 5, generator=g)
    target = torch.randint(0, 2, (1, 3, 4, 5), generator=g)
    value, grad = value_and_grad(get_loss(name), logits, target, torch.zeros(1, 3, 4, 5))
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_get_loss():
    assert get_loss("ce") is cross_entropy
    assert get_loss("dice") is soft_dice
    assert get_loss("dice_ce") is dice_ce
    assert get_loss("bce") is binary_cross_entropy
    assert get_loss("bce_dice") is bce_dice
    assert set(LOSSES) == {"dice_ce", "ce", "dice", "bce", "bce_dice"}
    with pytest.raises(VolsegError, match="focal"):
        get_loss("focal")


def test_binary_cross_entropy_by_hand():
    """Voxel 0 (class 0): sigmoid(0) = 1/2 on both channels -> BCE ln2 on each.
    Voxel 1 (class 1): channel 0 logit ln3 vs target 0 -> ln4; channel 1 logit 0 vs target 1 -> ln2."""
    logits, target = two_voxels()
    ln2 = math.log(2.0)
    v0, v1 = ln2, (math.log(4.0) + ln2) / 2
    assert binary_cross_entropy(logits, target).item() == pytest.approx((v0 + v1) / 2, rel=1e-6)
    w = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1)
    assert binary_cross_entropy(logits, target, w).item() == pytest.approx((v0 + 3 * v1) / 4, rel=1e-6)


def test_binary_cross_entropy_matches_torch_per_channel():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, 5, 3, generator=g) * 2
    target = torch.randint(0, 3, (2, 4, 5, 3), generator=g)
    weight = torch.rand(2, 4, 5, 3, generator=g) * 10
    onehot = F.one_hot(target, 3).movedim(-1, 1).float()
    per_voxel = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").mean(1)
    expected = (per_voxel * weight).sum() / weight.sum()
    assert torch.allclose(binary_cross_entropy(logits, target, weight), expected, rtol=1e-6)


def test_weight_map_steers_the_gradient():
    """A border weight of 10 on one voxel makes its gradient 10x that of an identical weight-1 voxel."""
    logits = torch.zeros(1, 2, 2, 1, 1, requires_grad=True)
    target = torch.zeros(1, 2, 1, 1, dtype=torch.long)
    weight = torch.tensor([1.0, 10.0]).reshape(1, 2, 1, 1)
    binary_cross_entropy(logits, target, weight).backward()
    g = logits.grad[0, :, :, 0, 0]
    assert torch.allclose(g[:, 1], 10 * g[:, 0])


@pytest.mark.parametrize("fn", [dice_ce, bce_dice])
def test_dice_term_sees_the_weight_map_as_a_mask(fn):
    """Scaling the weights of labelled voxels changes only the cross-entropy part, never the Dice part."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 2, 4, 4, 4, generator=g)
    target = torch.randint(0, 2, (1, 4, 4, 4), generator=g)
    mask = (torch.rand(1, 4, 4, 4, generator=g) > 0.3).float()
    scaled = mask * (1 + 9 * torch.rand(1, 4, 4, 4, generator=g))
    ce_part = binary_cross_entropy if fn is bce_dice else cross_entropy
    dice_mask = fn(logits, target, mask) - ce_part(logits, target, mask)
    dice_scaled = fn(logits, target, scaled) - ce_part(logits, target, scaled)
    assert torch.allclose(dice_mask, dice_scaled, atol=1e-6)


def test_downsampled_targets_keep_a_single_labelled_slice():
    # sparse annotation: one labelled slice (odd index) of foreground; strided picking would lose it
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    weight = torch.zeros(1, 4, 4, 4)
    target[0, 1, :2, :2] = 2
    weight[0, 1] = 1.0
    y, w = downsample_targets(target, weight, 2, 3)
    assert y.shape == (1, 2, 2, 2) and y[0, 0, 0, 0] == 2
    assert torch.all(w[0, 0] == 0.5) and torch.all(w[0, 1] == 0)  # half of each block labelled; none below
    assert torch.all(y[0, 0][w[0, 0] > 0].flatten()[1:] == 0)


def test_deep_supervision_loss_is_the_weighted_sum_over_levels():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8, 8))
    weight = (torch.rand(2, 8, 8, 8) > 0.3).float()
    full, half = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)
    y, w = downsample_targets(target, weight, 2, 3)
    expected = 0.7 * dice_ce(full, target, weight) + 0.3 * dice_ce(half, y, w)
    got = deep_supervision_loss(dice_ce, [full, half], target, weight, [(2, 2, 2)], [0.7, 0.3])
    assert torch.allclose(got, expected)
    # a perfect coarse prediction adds (almost) nothing to a perfect full-resolution one
    perfect = F.one_hot(target, 3).movedim(-1, 1).float() * 50
    coarse = F.one_hot(y, 3).movedim(-1, 1).float() * 50
    assert float(deep_supervision_loss(cross_entropy, [perfect, coarse], target, weight, [(2, 2, 2)], [0.5, 0.5])) < 1e-6
