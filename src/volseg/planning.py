"""From a dataset's shapes and spacings to a concrete training configuration.

A first, deliberately simple planner: patch covers the median case (capped by a voxel budget that
depends on the device), depth gives a bottleneck of at least 4 voxels, batch fills the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from volseg.config import Config, DataConfig, InferConfig, ModelConfig, TrainConfig

# Voxels per batch the device digests at a useful pace: 2 x 64^3 is nnU-Net's minimum on a GPU;
# a 2-core CPU gets less so that an epoch stays in minutes.
_BATCH_VOXELS = {"cpu": 2 * 48**3, "cuda": 2 * 128**3}
_MAX_PATCH_VOXELS = {"cpu": 80**3, "cuda": 160**3}


def plan_patch(median_shape: Sequence[int], spacing: Sequence[float], max_voxels: int, max_depth: int = 5) -> tuple[tuple[int, int, int], int]:
    """Patch size (multiple of the pooling divisor) and U-Net depth for a median case shape.

    Shrinks the patch along its physically longest axis until it fits `max_voxels`.

    >>> plan_patch((35, 50, 36), (1, 1, 1), 80**3)
    ((40, 56, 40), 4)
    """
    floor = 8
    patch = [max(int(s), 1) for s in median_shape]
    extent = [p * s for p, s in zip(patch, spacing)]
    while np.prod(patch) > max_voxels:
        shrinkable = [a for a in range(3) if patch[a] > floor]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: extent[a])
        patch[axis] = max(floor, int(patch[axis] * 0.9))
        extent[axis] = patch[axis] * spacing[axis]
    depth = max_depth
    while depth > 2 and min(patch) / 2 ** (depth - 1) < 4:
        depth -= 1
    div = 2 ** (depth - 1)
    rounded = [int(np.ceil(p / div) * div) for p in patch]
    if np.prod(rounded) > max_voxels:
        # rounding up would undo the budget: round down instead, never below one divisor
        rounded = [max(div, p // div * div) for p in patch]
    patch = rounded
    return (patch[0], patch[1], patch[2]), depth


def plan_spacing(spacings: Sequence[Sequence[float]], anisotropy_ratio: float = 3.0) -> tuple[float, float, float]:
    """Target spacing: the median per axis; a strongly thick axis gets its 10th percentile instead.

    Resampling every case to the median keeps physical sizes consistent across scanners. When the
    median is very anisotropic (thick slices), nnU-Net's rule is followed: use a finer percentile for
    the thick axis, but never finer than the in-plane spacing.

    >>> plan_spacing([(1, 1, 1), (1, 1, 1.2), (0.9, 0.9, 1)])
    (1.0, 1.0, 1.0)
    >>> plan_spacing([(0.5, 0.5, 5), (0.5, 0.5, 3), (0.5, 0.5, 6)])
    (0.5, 0.5, 3.4)
    """
    arr = np.asarray(spacings, dtype=np.float64)
    target = np.median(arr, axis=0)
    thick = int(np.argmax(target))
    others = [a for a in range(3) if a != thick]
    if target[thick] / target[others].min() > anisotropy_ratio:
        target[thick] = max(float(np.percentile(arr[:, thick], 10)), float(target[others].max()))
    return tuple(round(float(t), 6) for t in target)  # type: ignore[return-value]


def plan_config(
    data: DataConfig, shapes: Sequence[Sequence[int]], spacings: Sequence[Sequence[float]], device_type: str
) -> Config:
    """Default config for a dataset on a device ("cpu" or "cuda")."""
    median_shape = np.median(np.asarray(shapes), axis=0)
    median_spacing = data.spacing if data.spacing else tuple(float(s) for s in np.median(np.asarray(spacings), axis=0))
    key = "cuda" if device_type == "cuda" else "cpu"
    patch, depth = plan_patch(median_shape, median_spacing, _MAX_PATCH_VOXELS[key])
    batch = int(np.clip(_BATCH_VOXELS[key] // int(np.prod(patch)), 2, 16))
    base = 32 if key == "cuda" else 16
    data = DataConfig(**{**data.__dict__, "spacing": median_spacing})
    return Config(
        data=data,
        model=ModelConfig(in_channels=len(data.channel_names), num_classes=data.num_classes, base_width=base, depth=depth),
        train=TrainConfig(patch_size=patch, batch_size=batch),
        infer=InferConfig(),
    )
