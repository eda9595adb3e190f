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


def soft_dice(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, smooth: float = 1e-5
) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes, pooled over the batch and restricted to weight > 0.

    Pooling over the batch (as nnU-Net's batch Dice) keeps patches without a class from producing
    a meaningless 0/0 term for it.
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise VolsegError(None, "soft Dice needs at least two output classes")
    w = _weights(target, weight).unsqueeze(1)
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1)[:, 1:].float()
    dims = (0, *range(2, logits.ndim))
    intersect = (probs * onehot * w).sum(dims)
    denom = (probs * w).sum(dims) + (onehot * w).sum(dims)
    dice = (2 * intersect + smooth) / (denom + smooth)
    return 1 - dice.mean()


def dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of soft Dice and cross-entropy, the default of nnU-Net and of volseg."""
    return soft_dice(logits, target, weight) + cross_entropy(logits, target, weight)


LOSSES: dict[str, LossFn] = {"dice_ce": dice_ce, "ce": cross_entropy, "dice": soft_dice}


def get_loss(name: str) -> LossFn:
    """Look a loss up by its config name."""
    if name not in LOSSES:
        raise VolsegError(None, f"unknown loss {name!r}", f"use one of {', '.join(LOSSES)}")
    return LOSSES[name]
