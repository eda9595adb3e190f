"""Training memory: what one step of a planned U-Net holds, and a plan shrunk to fit the device.

The planner's patch and batch come from voxel budgets per device kind, which say nothing about
the card in hand: a 160^3 patch that an 80 GB GPU trains happily runs out of memory on an 8 GB
one. Here the network is run once on PyTorch's meta device (shapes only: no memory, no
arithmetic) and every tensor autograd keeps for the backward pass is counted. That count grows
linearly with the batch, so the plan can drop the batch, then shrink the patch, until a step fits
a share of the device's memory. Small plans skip the count: a cheap bound already shows they fit.

Speed is fitted the same way, by measurement: a network too wide for the time budget gets too few
steps to converge, so the planned width is halved (down to `MIN_WIDTH`) when a timed training step
of the narrower network leaves at least `MIN_STEPS` steps in the budget (`fit_width_to_time`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from volseg.config import Config, DataConfig, ModelConfig
from volseg.errors import VolsegError
from volseg.losses import LossFn, deep_supervision_loss, get_loss
from volseg.model import UNet3d, center_crop, deep_supervision_weights, level_scales, level_widths, size_divisor, valid_input_size

# Share of the device's memory a training step may plan for. On a CPU the real peak of a step was
# 1.3-1.7 times `step_bytes` (backward scratch and gradients; tests/test_memory.py checks < 2x),
# and the machine also holds the OS, the preprocessed cases and the loader's batches. On a GPU the
# count is float32 while autocast keeps most activations in bf16/fp16, which leaves room for the
# CUDA context, cuDNN workspaces and the allocator's slack.
FRACTION = {"cuda": 0.7, "cpu": 0.4}


def _meta_unet(model_cfg: ModelConfig) -> UNet3d:
    """The network with shapes only (the first meta-device call in a process loads PyTorch's reference
    kernels, about 3 s on a 2-core CPU: `fit_to_memory` only pays it when the cheap bound fails)."""
    with torch.device("meta"):
        return UNet3d(model_cfg)


def step_bytes_bound(model_cfg: ModelConfig, patch: Sequence[int], batch: int) -> int:
    """A cheap upper bound of `step_bytes` (2-5x above it), to skip the exact count for small plans.

    Level l has 8^-l of the voxels (4^-l where a thick axis is not pooled) and at most 2^l times the
    base width, so all levels together hold less than 4/3 (2) of the full-resolution level; its saved tensors come to about 16 float32 values per
    voxel and base channel (measured with `activation_bytes`), bounded here by 64. Inputs and
    logits scale with the channel and class counts instead. Each level's convolutions hold fewer
    than 200 w^2 weights (27 (w^2 + w^2 + 2w^2 + w^2) plus the up-convolution), 12 bytes each with
    their gradients and momentum.
    """
    voxels = batch * int(math.prod(patch))
    activations = 4 * voxels * (64 * model_cfg.base_width + 8 * (model_cfg.in_channels + model_cfg.num_classes))
    return activations + 12 * 200 * sum(w * w for w in level_widths(model_cfg))


def activation_bytes(model_cfg: ModelConfig, patch: Sequence[int], batch: int) -> int:
    """Bytes of the tensors autograd saves in one float32 forward pass of `batch` patches.

    Under CUDA autocast many of these are bf16/fp16, so for GPU training this is an upper bound.
    """
    net = _meta_unet(model_cfg)
    x = torch.empty((batch, model_cfg.in_channels, *patch), device="meta", requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t.numel() * t.element_size()  # a tensor saved by two ops is held once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = net(x, deep=True) if net.aux_levels else [net(x)]
    # the loss keeps about five logits-sized tensors for its backward (Dice + CE; CE alone three)
    return sum(saved.values()) + sum(5 * out.numel() * out.element_size() for out in outs)


def step_bytes(model_cfg: ModelConfig, patch: Sequence[int], batch: int) -> int:
    """Peak bytes of one SGD training step: activations plus weights, gradients and momentum."""
    return activation_bytes(model_cfg, patch, batch) + 3 * 4 * _parameter_count(model_cfg)


@functools.lru_cache(maxsize=64)
def _parameter_count(model_cfg: ModelConfig) -> int:
    """Weights of a network shape; cached, since `fit_to_memory` asks for one shape many times."""
    return sum(p.numel() for p in _meta_unet(model_cfg).parameters())


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device, or the machine's physical RAM for the CPU; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX (Windows): keep the plan as it is
        return None


def _shrink(model_cfg: ModelConfig, patch: tuple[int, int, int], spacing: Sequence[float]) -> tuple[int, int, int] | None:
    """The patch a pooling divisor shorter along its physically longest shrinkable axis; None at the floor
    (two divisors: the bottleneck keeps at least 2 voxels along the axis, as instance norm needs)."""
    divs = size_divisor(model_cfg)
    options = []
    for axis in range(3):
        div = divs[axis]
        size = valid_input_size(model_cfg, patch[axis] - div, axis) if patch[axis] - div >= 2 * div else patch[axis]
        if size < patch[axis]:
            options.append((patch[axis] * spacing[axis], patch[axis], axis, size))
    if not options:
        return None
    _, _, axis, size = max(options)
    out = list(patch)
    out[axis] = size
    return (out[0], out[1], out[2])


def fit_to_memory(cfg: Config, memory_bytes: int | None, device_type: str) -> tuple[Config, dict[str, float]]:
    """Lower the batch (not below 2), then shrink the patch, until a training step fits the device.

    Returns the config (unchanged when it already fits or the memory is unknown) and what was
    decided, in GiB, for the plan's fingerprint.
    """
    if memory_bytes is None:
        return cfg, {}
    budget = FRACTION.get(device_type, FRACTION["cpu"]) * memory_bytes
    model, tc = cfg.model, cfg.train
    patch, batch = tuple(tc.patch_size), tc.batch_size
    spacing = cfg.data.spacing or (1.0, 1.0, 1.0)
    info = {"device_memory_gib": round(memory_bytes / 2**30, 2), "step_memory_budget_gib": round(budget / 2**30, 2)}
    bound = step_bytes_bound(model, patch, batch)
    if bound <= budget:
        return cfg, {**info, "step_memory_bound_gib": round(bound / 2**30, 3)}
    need = step_bytes(model, patch, batch)
    if need > budget and batch > 2:  # activations are linear in the batch: solve for the largest that fits
        one = step_bytes(model, patch, 1)
        per_sample = step_bytes(model, patch, 2) - one
        batch = max(2, min(batch, int((budget - (one - per_sample)) // per_sample)))
        need = step_bytes(model, patch, batch)
    while need > budget:
        smaller = _shrink(model, patch, spacing)  # type: ignore[arg-type]
        if smaller is None:
            raise VolsegError(None, f"a training step needs {need / 2**30:.1f} GiB at batch {batch} and patch "
                              f"{patch}, more than the {budget / 2**30:.1f} GiB planned for on this {device_type} "
                              "device", "choose a narrower or shallower network (--base-width, --depth)")
        patch = smaller
        need = step_bytes(model, patch, batch)
    fitted = dataclasses.replace(cfg, train=dataclasses.replace(tc, patch_size=patch, batch_size=batch))
    return fitted, {**info, "step_memory_gib": round(need / 2**30, 3)}


# Training steps a time budget must leave for the planned width to stay. Measured on MSD Hippocampus
# with 60 CPU minutes (2 cores): width 16 got about 4,800 steps and a held-out Dice of 0.859-0.866
# in four runs; width 8 got about 9,700 steps and 0.872-0.876 in three. With the 32x48x32 patch
# width 16 gets about 12,700 steps, is kept, and scored 0.881 in one run. Long budgets and GPUs keep the
# planned width; a 2-core CPU hour is where halving it starts to pay. Halving pays only when it
# reaches those steps: on the synthetic two-channel lesion set (512-wide slices, 10 CPU minutes)
# width 16 on the planned 144x144x24 patch (263 steps) scored a held-out Dice of 0.80 where width
# 8 on a patch shrunk for steps (7,600) scored 0.66, one run each (docs/benchmarks.md, "Generalisation").
MIN_STEPS = 8000
MIN_WIDTH = 8
_BUDGET_SHARE = 0.9  # of the budget left for steps; validation and preprocessing take the rest


def batch_loss(
    model: torch.nn.Module, net: UNet3d, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, loss_fn: LossFn,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """The training loss of one batch, as `volseg.train` and the step timing here both compute it.

    `model` is what runs the forward pass (`net` itself, or its DistributedDataParallel wrapper);
    `net` says whether deep supervision adds coarser outputs. Valid padding shrinks the output, so
    labels and weights are cropped to it.
    """
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(x, deep=True) if net.aux_levels else model(x)
    if net.aux_levels:
        scales = level_scales(net.cfg)
        return deep_supervision_loss(loss_fn, out, y, w, [scales[level] for level in net.aux_levels],
                                     deep_supervision_weights(net.cfg))
    size = tuple(out.shape[2:])
    return loss_fn(out.float(), center_crop(y, size), center_crop(w, size))


def step_seconds(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None = None) -> float:
    """Wall time of one training step (forward, loss, backward, SGD) of the plan on `device`, with
    random data, timed after a warm-up step (kernel choice, `fastconv`'s per-shape measurement)."""
    model_cfg, tc = cfg.model, cfg.train
    gen = torch.Generator().manual_seed(0)
    net = UNet3d(model_cfg).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = get_loss(tc.loss)
    x = torch.randn((tc.batch_size, model_cfg.in_channels, *tc.patch_size), generator=gen).to(device)
    y = torch.randint(0, model_cfg.num_classes, (tc.batch_size, *tc.patch_size), generator=gen).to(device)
    w = torch.ones(y.shape, device=device)

    def step() -> None:
        loss = batch_loss(net, net, x, y, w, loss_fn, amp_dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def budget_steps(minutes: float, seconds: float) -> int:
    """Training steps of `seconds` that a budget of `minutes` holds (validation and preprocessing take the rest)."""
    return int(_BUDGET_SHARE * minutes * 60 / max(seconds, 1e-9))


def fit_width_to_time(
    cfg: Config, minutes: float, device: torch.device, amp_dtype: torch.dtype | None = None,
    agree: Callable[[float], float] | None = None, timer: Callable[[Config], float] | None = None,
) -> tuple[Config, dict[str, float]]:
    """The widest of the planned width and its halvings (not below `MIN_WIDTH`) whose timed step
    leaves `MIN_STEPS` steps in the budget; the planned width when none does.

    Why not simply the narrowest: halving buys at most twice the steps. When even the narrowest
    network stays far short of `MIN_STEPS` (a large patch in a short budget), the wider one learns
    more from each of the few steps there are. `agree` combines a measurement across processes
    (torchrun: the slowest rank's), so every rank picks the same width; `timer` replaces the step
    measurement (tests). Returns the config and what was measured, for the plan's fingerprint.
    """
    timer = timer or (lambda c: step_seconds(c, device, amp_dtype))
    budget_s = _BUDGET_SHARE * minutes * 60
    timed: dict[str, float] = {}
    planned, chosen = cfg, None
    width = cfg.model.base_width
    while width >= MIN_WIDTH or width == planned.model.base_width:
        trial = dataclasses.replace(planned, model=dataclasses.replace(planned.model, base_width=width))
        seconds = timer(trial)
        if agree is not None:
            seconds = agree(seconds)
        timed[str(width)] = round(seconds, 4)
        if budget_s / max(seconds, 1e-9) >= MIN_STEPS:
            chosen = trial
            break
        width //= 2
    cfg = chosen or planned
    seconds = timed[str(cfg.model.base_width)]
    steps = budget_s / max(seconds, 1e-9)
    return cfg, {"step_seconds": round(seconds, 4), "step_seconds_by_width": timed, "budget_steps": int(steps),
                 "min_steps": MIN_STEPS, "budget_minutes": minutes}
