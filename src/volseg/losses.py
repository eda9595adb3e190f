"""Loss functions on logits; every loss takes a per-voxel weight where 0 means "unlabelled".

The weight map is how sparse annotation reaches the loss: ignored voxels contribute neither to the
value nor to any gradient, and averages run over labelled voxels only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from volseg.errors import VolsegError

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _weights(target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(target, dtype=torch.float32) if weight is None else weight.float()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean cross-entropy over voxels: sum(w * ce) / sum(w).

    logits (B, C, I, J, K); target (B, I, J, K) class indices; weight (B, I, J, K) >= 0.
    """
    w = _weights(target, weight)
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def binary_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted binary cross-entropy with logits, one-vs-rest per output channel.

    Each channel c is a sigmoid classifier of "class c here"; the voxel loss is the mean over
    channels and the batch loss sum(w * loss) / sum(w), so a precomputed weight map (class balance,
    U-Net border weights) scales each voxel's say. With two channels this is the binary case.
    Prediction still takes the argmax over channels, which is the most confident one-vs-rest vote.
    """
    w = _weights(target, weight)
    onehot = F.one_hot(target.long(), logits.shape[1]).movedim(-1, 1).float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), onehot, reduction="none").mean(1)
    return (bce * w).sum() / w.sum().clamp_min(1e-8)


def soft_dice(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, smooth: float = 1e-5,
    sigmoid: bool = False,
) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes, pooled over the batch and restricted to weight > 0.

    Pooling over the batch (as nnU-Net's batch Dice) keeps patches without a class from producing
    a meaningless 0/0 term for it. `sigmoid` reads the channels as one-vs-rest probabilities (the
    companion of `binary_cross_entropy`) instead of a softmax.
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise VolsegError(None, "soft Dice needs at least two output classes")
    w = _weights(target, weight).unsqueeze(1)
    probs = (torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), dim=1))[:, 1:]
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1)[:, 1:].float()
    dims = (0, *range(2, logits.ndim))
    intersect = (probs * onehot * w).sum(dims)
    denom = (probs * w).sum(dims) + (onehot * w).sum(dims)
    dice = (2 * intersect + smooth) / (denom + smooth)
    return 1 - dice.mean()


def dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of soft Dice and cross-entropy, the default of nnU-Net and of volseg.

    A weight map scales the cross-entropy; the Dice term uses it as a mask only (weight > 0).
    """
    mask = None if weight is None else (weight > 0).float()
    return soft_dice(logits, target, mask) + cross_entropy(logits, target, weight)


def bce_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted BCE plus sigmoid soft Dice; the Dice term sees the map only as a mask (weight > 0).

    Border weights of 10 or more would otherwise turn the Dice term into a Dice of the gaps.
    """
    mask = None if weight is None else (weight > 0).float()
    return soft_dice(logits, target, mask, sigmoid=True) + binary_cross_entropy(logits, target, weight)


def downsample_targets(
    target: torch.Tensor, weight: torch.Tensor | None, factor: int | tuple[int, int, int], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class indices and weights on a grid `factor` times coarser (per axis if a triple), for a deep-supervision head.

    Each coarse voxel takes the majority class of the labelled fine voxels it covers and their mean
    weight (labelled or not), so a single annotated slice of a sparse volume still reaches the
    coarse level (strided picking would drop every other slice) and an unlabelled block stays at
    weight 0.

    >>> t = torch.tensor([[[[1, 1], [2, 0]], [[2, 2], [0, 0]]]])
    >>> w = torch.tensor([[[[1., 1.], [1., 0.]], [[1., 1.], [0., 0.]]]])
    >>> y, v = downsample_targets(t, w, 2, 3)
    >>> y.flatten().tolist(), v.flatten().tolist()
    ([2], [0.625])
    """
    w = _weights(target, weight)
    labelled = (w > 0).unsqueeze(1).float()
    votes = F.avg_pool3d(F.one_hot(target.long(), num_classes).movedim(-1, 1).float() * labelled, factor)
    return votes.argmax(1), F.avg_pool3d(w.unsqueeze(1), factor).squeeze(1)


def deep_supervision_loss(
    loss_fn: LossFn, outputs: list[torch.Tensor], target: torch.Tensor, weight: torch.Tensor | None,
    factors: list[tuple[int, int, int]], level_weights: list[float],
) -> torch.Tensor:
    """Weighted sum of `loss_fn` on the full-resolution logits and on each coarser level's logits.

    `factors[i]` is how many voxels along I, J, K one voxel of `outputs[i + 1]` spans
    (`volseg.model.level_scales`: (2, 2, 2) per level, or less along a thick axis).
    """
    total = level_weights[0] * loss_fn(outputs[0].float(), target, weight)
    num_classes = outputs[0].shape[1]
    for logits, factor, lw in zip(outputs[1:], factors, level_weights[1:]):
        y, w = downsample_targets(target, weight, factor, num_classes)
        total = total + lw * loss_fn(logits.float(), y, w)
    return total


LOSSES: dict[str, LossFn] = {
    "dice_ce": dice_ce, "ce": cross_entropy, "dice": soft_dice, "bce": binary_cross_entropy, "bce_dice": bce_dice,
}
SIGMOID_LOSSES = ("bce", "bce_dice")  # losses that read the output channels as one-vs-rest sigmoids


def get_loss(name: str) -> LossFn:
    """Look a loss up by its config name."""
    if name not in LOSSES:
        raise VolsegError(None, f"unknown loss {name!r}", f"use one of {', '.join(LOSSES)}")
    return LOSSES[name]
