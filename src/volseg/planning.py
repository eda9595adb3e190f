"""The whole training plan, in one place: from a dataset to the `Config` a run trains with.

`plan_run` is the one entry point (`volseg train` and `volseg plan` call it) and reads top to
bottom: fingerprint the dataset (shapes, spacings, object sizes, background), choose the target
spacing (coarser in-plane when a CPU patch would see too little of a large case), the
normalisation per channel, the patch and the network (per-level kernels and pooling from the
spacing, as nnU-Net plans them), the batch; then fit the plan to the device's memory and to the
time budget (`volseg.memory` measures, this module decides), and apply the user's overrides.
Every choice leaves one line in `reasons`, which `volseg plan` prints and plan.json keeps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from volseg import layout, memory, volumes
from volseg.config import Config, DataConfig, InferConfig, ModelConfig, TrainConfig
from volseg.errors import VolsegError
from volseg.model import level_scales, size_divisor
from volseg.preprocessing import resampled_shape

# Voxels per batch the device digests at a useful pace: 2 x 64^3 is nnU-Net's minimum on a GPU.
# A CPU gains nothing from batching (its step time grows in proportion to the voxels), so on a time
# budget a larger batch only trades away steps: the CPU keeps nnU-Net's minimum of 2 patches unless
# the patches are tiny.
_BATCH_VOXELS = {"cpu": 48**3, "cuda": 2 * 128**3}
_MAX_PATCH_VOXELS = {"cpu": 80**3, "cuda": 160**3}


@dataclass(frozen=True)
class Network:
    """Depth with per-level kernels and poolings (I, J, K); isotropic plans are the 3D U-Net's own."""

    depth: int
    kernels: tuple[tuple[int, int, int], ...]
    pools: tuple[tuple[int, int, int], ...]

    @property
    def isotropic(self) -> bool:
        return all(k == (3, 3, 3) for k in self.kernels) and all(p == (2, 2, 2) for p in self.pools)

    def model_fields(self) -> dict[str, Any]:
        """`ModelConfig` fields; empty per-level lists for the plain 3x3x3 / 2x2x2 network (old model files' form)."""
        if self.isotropic:
            return {"depth": self.depth, "kernel_sizes": (), "pool_sizes": ()}
        return {"depth": self.depth, "kernel_sizes": self.kernels, "pool_sizes": self.pools}

    def divisors(self) -> tuple[int, int, int]:
        return size_divisor(ModelConfig(**self.model_fields()))


def plan_network(spacing: Sequence[float], patch: Sequence[int], max_depth: int = 5, min_edge: int = 4) -> Network:
    """Per-level kernels and poolings for a patch at `spacing`, by nnU-Net's rule.

    An axis is pooled only while its (current) spacing is within 2x of the finest axis, so a 6 mm
    axis beside 0.5 mm ones waits until the in-plane axes have been pooled to 1.5 mm or more; it
    also gets 1-voxel kernels until then, since 3 voxels across 18 mm mix unrelated anatomy. The
    pooled axes must keep at least `min_edge` voxels at the next level; when one cannot, pooling
    stops (for isotropic spacing this is the 3D U-Net's rule: 2x2x2 everywhere, bottleneck >= 4).
    The bottleneck gets 3x3x3.

    >>> plan_network((1, 1, 1), (32, 48, 32)).pools
    ((2, 2, 2), (2, 2, 2), (2, 2, 2))
    >>> n = plan_network((1.0, 1.0, 5.6), (144, 144, 24))
    >>> n.depth, n.kernels[:3], n.pools
    (5, ((3, 3, 1), (3, 3, 1), (3, 3, 3)), ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)))
    """
    current = [float(s) for s in spacing]
    size = [int(p) for p in patch]
    kernel = [1, 1, 1]
    kernels: list[tuple[int, int, int]] = []
    pools: list[tuple[int, int, int]] = []
    while len(pools) < max_depth - 1:
        finest = min(current)
        axes = [a for a in range(3) if current[a] / finest < 2]
        if any(size[a] < 2 * min_edge for a in axes):
            break
        kernel = [3 if kernel[a] == 3 or current[a] / finest < 2 else 1 for a in range(3)]
        kernels.append((kernel[0], kernel[1], kernel[2]))
        pool = [2 if a in axes else 1 for a in range(3)]
        pools.append((pool[0], pool[1], pool[2]))
        for a in axes:
            current[a] *= 2
            size[a] //= 2
    if not pools:  # depth is never below 2: one pooling of the fine axes even for a very thin patch
        finest = min(current)
        kernels.append(tuple(3 if current[a] / finest < 2 else 1 for a in range(3)))  # type: ignore[arg-type]
        pools.append(tuple(2 if current[a] / finest < 2 else 1 for a in range(3)))  # type: ignore[arg-type]
    kernels.append((3, 3, 3))
    return Network(len(kernels), tuple(kernels), tuple(pools))


def plan_patch(median_shape: Sequence[int], spacing: Sequence[float], max_voxels: int, max_depth: int = 5) -> tuple[tuple[int, int, int], int]:
    """Patch size (multiple of the pooling divisors) and U-Net depth for a median case shape.

    Shrinks the patch along its physically longest axis until it fits `max_voxels`, then rounds
    each axis to the *nearest* multiple of its pooling divisor (halves go down), never below one
    divisor. Rounding up would pad every patch beyond the typical case: on MSD Hippocampus
    (median 35x50x36) 40x56x40 has 82% more voxels than 32x48x32 and costs more per step; in a
    60-minute CPU budget the planned 32x48x32 run (width 16) scored 0.881 held-out Dice against
    0.872-0.876 for three 40x56x40 runs (width 8). The network (depth, per-level kernels and
    poolings) comes from `plan_network`.

    >>> plan_patch((35, 50, 36), (1, 1, 1), 80**3)
    ((32, 48, 32), 4)
    >>> plan_patch((37, 50, 36), (1, 1, 1), 80**3)
    ((40, 48, 32), 4)
    """
    patch, network = plan_patch_and_network(median_shape, spacing, max_voxels, max_depth)
    return patch, network.depth


def shrink_to_voxels(patch: Sequence[int], spacing: Sequence[float], max_voxels: int,
                     floor: Sequence[int] = (8, 8, 8)) -> list[int]:
    """Shrink the physically longest axis (by 10%) until the patch holds at most `max_voxels`; axes stop at `floor`."""
    patch = [max(int(p), 1) for p in patch]
    extent = [p * s for p, s in zip(patch, spacing)]
    while np.prod(patch) > max_voxels:
        shrinkable = [a for a in range(3) if patch[a] > floor[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: extent[a])
        patch[axis] = max(int(floor[axis]), int(patch[axis] * 0.9))
        extent[axis] = patch[axis] * spacing[axis]
    return patch


def round_to_divisors(patch: Sequence[int], divisors: Sequence[int], max_voxels: int | None = None) -> tuple[int, int, int]:
    """Each axis to its nearest multiple of the divisor (never below one); down instead if that exceeds `max_voxels`.

    >>> round_to_divisors((35, 50, 36), (8, 8, 4))
    (32, 48, 36)
    """
    rounded = [max(d, int(np.ceil(p / d - 0.5)) * d) for p, d in zip(patch, divisors)]
    if max_voxels is not None and np.prod(rounded) > max_voxels:
        rounded = [max(d, p // d * d) for p, d in zip(patch, divisors)]
    return (rounded[0], rounded[1], rounded[2])


def plan_patch_and_network(median_shape: Sequence[int], spacing: Sequence[float], max_voxels: int,
                           max_depth: int = 5) -> tuple[tuple[int, int, int], Network]:
    """`plan_patch` with the whole network plan: the patch fitted to the budget, then the network planned for it."""
    patch = shrink_to_voxels(median_shape, spacing, max_voxels)
    network = plan_network(spacing, patch, max_depth)
    return round_to_divisors(patch, network.divisors(), max_voxels), network


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


def plan_config(data: DataConfig, shapes: Sequence[Sequence[int]], device_type: str) -> Config:
    """Default config for a dataset on a device ("cpu" or "cuda"); `shapes` at `data.spacing`."""
    median_shape = np.median(np.asarray(shapes), axis=0)
    median_spacing = data.spacing or (1.0, 1.0, 1.0)
    key = "cuda" if device_type == "cuda" else "cpu"
    patch, network = plan_patch_and_network(median_shape, median_spacing, _MAX_PATCH_VOXELS[key])
    batch = int(np.clip(_BATCH_VOXELS[key] // int(np.prod(patch)), 2, 16))
    base = 32 if key == "cuda" else 16
    return Config(
        data=data,
        model=ModelConfig(in_channels=len(data.channel_names), num_classes=data.num_classes, base_width=base,
                          **network.model_fields()),
        train=TrainConfig(patch_size=patch, batch_size=batch),
        infer=InferConfig(),
    )


def is_ct(channel_name: str) -> bool:
    """nnU-Net's convention: a channel named CT (any case, optionally with a suffix) holds Hounsfield units.

    >>> is_ct("CT"), is_ct("ct_venous"), is_ct("T1"), is_ct("ACTIVITY")
    (True, True, False, False)
    """
    name = channel_name.strip().upper()
    return name == "CT" or name.startswith(("CT_", "CT-", "CT "))


def foreground_intensity_stats(
    cases: Sequence[layout.Case], channel: int, max_cases: int = 50, per_case: int = 10_000, seed: int = 0
) -> tuple[float, float, float, float]:
    """(0.5th percentile, 99.5th percentile, mean, std) of a channel's voxels inside the labels.

    A seeded sample of voxels per case keeps this quick on large CT datasets.
    """
    rng = np.random.default_rng(seed)
    picked = [cases[i] for i in sorted(rng.choice(len(cases), min(len(cases), max_cases), replace=False))]
    samples = []
    for case in picked:
        if case.label is None:
            continue
        image = volumes.read_volume(case.images[channel]).array[0]
        label = volumes.read_label(case.label).array[0]
        values = image[label > 0]
        if values.size > per_case:
            values = values[rng.choice(values.size, per_case, replace=False)]
        samples.append(values.astype(np.float64))
    if not samples or not sum(v.size for v in samples):
        return (-1000.0, 1000.0, 0.0, 1000.0)  # no foreground anywhere: a wide, harmless window
    allv = np.concatenate(samples)
    lo, hi = np.percentile(allv, [0.5, 99.5])
    clipped = np.clip(allv, lo, hi)
    return (float(lo), float(hi), float(clipped.mean()), float(clipped.std()))


# A case may hold this many times the patch's voxels before the fine axes are coarsened (nnU-Net
# makes its 3d_lowres configuration when the full-resolution patch covers less than about a
# quarter of the median case): a CPU patch of 80^3 voxels sees 88 x 88 mm of a 0.5 mm, 512-wide
# slice, less than a third of a brain, while at 1 mm it sees twice as far with the same voxels.
_CASE_PATCH_RATIO = 4.0
_MAX_COARSENING = 2.0  # fine axes are coarsened at most this much, never beyond the coarsest axis
_BACKGROUND_FRACTION = 0.25  # zero-valued background above this: z-score inside the non-zero region


def plan_resolution(target: Sequence[float], shape_at_target: Sequence[float], max_patch_voxels: int) -> tuple[float, float, float]:
    """Coarsen the fine axes of `target` (at most `_MAX_COARSENING` times, not beyond the coarsest
    axis) until the median case holds at most `_CASE_PATCH_RATIO` patches' worth of voxels.

    >>> plan_resolution((0.5, 0.5, 5.6), (512, 512, 25), 80**3)
    (0.89, 0.89, 5.6)
    >>> plan_resolution((1.0, 1.0, 1.0), (35, 50, 36), 80**3)
    (1.0, 1.0, 1.0)
    """
    target = [float(t) for t in target]
    coarsest = max(target)
    fine = [a for a in range(3) if target[a] * 1.5 < coarsest] or [0, 1, 2]
    excess = float(np.prod(shape_at_target)) / (_CASE_PATCH_RATIO * max_patch_voxels)
    if excess <= 1:
        return (target[0], target[1], target[2])
    factor = min(_MAX_COARSENING, excess ** (1 / len(fine)))
    if len(fine) == 3:  # isotropic (or nearly): every axis alike
        out = [t * factor for t in target]
    else:
        out = [min(coarsest, t * factor) if a in fine else t for a, t in enumerate(target)]
    return (round(out[0], 2), round(out[1], 2), round(out[2], 2))


def object_extent_mm(cases: Sequence[layout.Case], max_cases: int = 12) -> tuple[float, float, float] | None:
    """90th percentile of the foreground objects' bounding-box extent along I, J, K in mm (None: no objects).

    The structures a patch must see whole, with context: the patch's field of view is not shrunk
    below twice this by the time fit.
    """
    import cc3d

    extents = []
    for case in list(cases)[:max_cases]:
        if case.label is None:
            continue
        label = volumes.read_label(case.label)
        array = label.array[0]
        spacing = np.asarray(label.spacing, float)
        for _, box in enumerate(cc3d.statistics(cc3d.connected_components(array > 0, connectivity=26))["bounding_boxes"][1:]):
            extents.append([(sl.stop - sl.start) * sp for sl, sp in zip(box, spacing)])
    if not extents:
        return None
    p90 = np.percentile(np.asarray(extents, float), 90, axis=0)
    return (round(float(p90[0]), 2), round(float(p90[1]), 2), round(float(p90[2]), 2))


def background_fraction(cases: Sequence[layout.Case], max_cases: int = 5) -> float:
    """Median share of voxels that are exactly 0 in every channel (skull-stripped or masked MRI)."""
    fractions = []
    for case in list(cases)[:max_cases]:
        image = volumes.read_image(case.images).array
        fractions.append(float(np.mean(~np.any(image != 0, axis=0))))
    return float(np.median(fractions)) if fractions else 0.0


def make_plan(
    data: DataConfig, cases: Sequence[layout.Case], device_type: str, reasons: list[str] | None = None,
) -> tuple[Config, dict[str, Any]]:
    """The dataset's plan before fitting to the device: target spacing, normalisation per channel,
    patch, network, batch. Returns the config and the fingerprint it was derived from; one line per
    choice is appended to `reasons`.

    Reads file headers, the labels of a few cases (object sizes), the images of a few cases
    (background), plus a voxel sample of the labelled region when a channel is CT.
    """
    reasons = reasons if reasons is not None else []
    shapes, spacings = [], []
    for case in cases:
        grid = volumes.read_grid(case.images[0])
        if grid is None:
            volume = volumes.read_volume(case.images[0])
            grid = (volume.shape, volume.spacing)
        shapes.append(grid[0])
        spacings.append(grid[1])
    key = "cuda" if device_type == "cuda" else "cpu"
    median_spacing = np.median(np.asarray(spacings, float), 0)
    target = plan_spacing(spacings)
    if tuple(target) != tuple(round(float(v), 6) for v in median_spacing):
        reasons.append(f"target spacing {target} mm: the thick axis at its 10th percentile, not the median "
                       f"{tuple(round(float(v), 3) for v in median_spacing)} (nnU-Net's rule for anisotropic data)")
    resampled = [resampled_shape(s, sp, target) for s, sp in zip(shapes, spacings)]
    median_at_target = np.median(np.asarray(resampled, float), 0)
    coarse = plan_resolution(target, median_at_target, _MAX_PATCH_VOXELS[key])
    if coarse != tuple(target):
        reasons.append(f"target spacing {coarse} mm instead of {target}: the median case "
                       f"({' x '.join(str(int(v)) for v in median_at_target)} voxels) holds more than "
                       f"{_CASE_PATCH_RATIO:g} {key.upper()} patches, so the fine axes are coarsened (as nnU-Net's 3d_lowres)")
        target = coarse
        resampled = [resampled_shape(s, sp, target) for s, sp in zip(shapes, spacings)]
    elif reasons == [] or not reasons[-1].startswith("target spacing"):
        reasons.append(f"target spacing {target} mm: the median spacing")
    bg = background_fraction(cases)
    methods = tuple("ct" if is_ct(name) else ("zscore_nonzero" if bg > _BACKGROUND_FRACTION else "zscore")
                    for name in data.channel_names)
    for name, method in zip(data.channel_names, methods):
        why = {"ct": "Hounsfield units: clipped to the foreground's 0.5-99.5 percentiles, one global z-score",
               "zscore_nonzero": f"z-score per case inside the non-zero region ({bg:.0%} of the voxels are 0 in every channel)",
               "zscore": "z-score per case (arbitrary MRI/microscopy units differ between scans)"}[method]
        reasons.append(f"channel {name!r}: {method}, {why}")
    stats = tuple(
        foreground_intensity_stats(cases, c) if m == "ct" else (0.0, 0.0, 0.0, 1.0) for c, m in enumerate(methods)
    )
    uniform = len(set(methods)) == 1 and methods[0] != "ct"
    data = replace(
        data, spacing=target, normalization=methods[0] if uniform else data.normalization,
        channel_normalization=() if uniform else methods, intensity_stats=stats if "ct" in methods else (),
    )
    cfg = plan_config(data, resampled, device_type)
    extent = object_extent_mm(cases)
    net = cfg.model
    reasons.append(
        f"patch {cfg.train.patch_size} voxels = {' x '.join(f'{p * s:.0f}' for p, s in zip(cfg.train.patch_size, target))} mm "
        f"(the median case, shrunk along its physically longest axis to {_MAX_PATCH_VOXELS[key]:,} voxels)"
        + (f"; objects span up to {' x '.join(f'{e:.0f}' for e in extent)} mm (90th percentile)" if extent else ""))
    if net.pool_sizes:
        reasons.append(f"network depth {net.depth}, anisotropic: poolings {list(net.pool_sizes)}, kernels "
                       f"{list(net.kernel_sizes)} (an axis is pooled and convolved across only once its spacing is "
                       "within 2x of the finest)")
    else:
        reasons.append(f"network depth {net.depth}: 3x3x3 convolutions, 2x2x2 pooling, bottleneck of at least 4 voxels")
    reasons.append(f"batch {cfg.train.batch_size}: {_BATCH_VOXELS[key]:,} voxels per step on a {key.upper()} "
                   "(at least 2 patches)")
    arr_sp, arr_sh = np.asarray(spacings, float), np.asarray(shapes, float)
    fingerprint = {
        "n_cases": len(cases),
        "spacing_median": np.median(arr_sp, 0).tolist(), "spacing_min": arr_sp.min(0).tolist(),
        "spacing_max": arr_sp.max(0).tolist(),
        "shape_median": np.median(arr_sh, 0).tolist(), "shape_min": arr_sh.min(0).astype(int).tolist(),
        "shape_max": arr_sh.max(0).astype(int).tolist(),
        "target_spacing": list(target),
        "shape_median_at_target": np.median(np.asarray(resampled, float), 0).tolist(),
        "channel_normalization": list(methods),
        "background_fraction": round(bg, 4),
        "object_extent_mm_p90": list(extent) if extent else None,
        "intensity_stats": {data.channel_names[c]: list(stats[c]) for c, m in enumerate(methods) if m == "ct"},
        "device": device_type,
    }
    return cfg, fingerprint


def data_config_from_dataset(info: layout.DatasetInfo) -> DataConfig:
    """What dataset.json says about the data: channels, labels, the ignore label, the file ending."""
    return DataConfig(
        channel_names=info.channel_names,
        labels=info.labels,
        ignore_label=info.ignore_label,
        file_ending=info.file_ending,
    )


def make_device_plan(data: DataConfig, cases: Sequence[layout.Case], device: torch.device,
                     reasons: list[str] | None = None) -> tuple[Config, dict[str, Any]]:
    """`make_plan` for this device, with its patch and batch fitted to the device's memory."""
    reasons = reasons if reasons is not None else []
    cfg, fingerprint = make_plan(data, cases, device.type, reasons)
    fitted, info = memory.fit_to_memory(cfg, memory.device_memory_bytes(device), device.type)
    if fitted.train != cfg.train:
        reasons.append(f"patch {fitted.train.patch_size}, batch {fitted.train.batch_size}: lowered until a training "
                       f"step fits {info['step_memory_budget_gib']} GiB of this {device.type}'s memory")
    return fitted, {**fingerprint, **info}


# Steps a budget must hold before the time fit shrinks the planned patch: a couple of hundred.
# nnU-Net v2 with a CPU-reduced plan reached a held-out Dice of 0.82 on the synthetic lesion set
# in 183 steps of its 12x192x192 patch; volseg's planned 144x144x24 patch in 263 steps scored
# 0.80, and 0.66 once shrunk to 64x64x12 (with width 8) for 7,600 steps (one run each; two later
# runs of the planned patch gave 0.68 and 0.67, nnU-Net reduced 0.69 in its second run).
# Few cases: below FEW_CASES training cases one model's held-out Dice depends on its seed and
# validation split more than on anything planned (synthetic thick-slice lesions, 6 cases, 10 min:
# 0.653 to 0.815 over three seeds), so the budget is shared by ENSEMBLE_MEMBERS models, each with
# its own seed and split, whose probabilities `volseg predict` averages (nnU-Net's answer to few
# cases is the same: an ensemble of its cross-validation folds).
FEW_CASES = 10
ENSEMBLE_MEMBERS = 2


def plan_members(n_cases: int, requested: int | None = None) -> tuple[int, str]:
    """How many models share the training budget, and the one-line reason.

    >>> plan_members(6)[0], plan_members(166)[0], plan_members(6, requested=1)[0]
    (2, 1, 1)
    """
    if requested is not None:
        if requested < 1:
            raise VolsegError(None, f"--members must be at least 1, got {requested}")
        return requested, f"{requested} model(s) set on the command line"
    if n_cases < FEW_CASES:
        return ENSEMBLE_MEMBERS, (
            f"{ENSEMBLE_MEMBERS} models, each with 1/{ENSEMBLE_MEMBERS} of the budget, its own seed and validation "
            f"split, averaged at prediction: with {n_cases} cases (fewer than {FEW_CASES}) one model's result "
            "depends on its seed and split")
    return 1, f"one model: {n_cases} cases are enough for one run's split to be representative"


MIN_PATCH_STEPS = 200


def fov_floor(cfg: Config, extent_mm: Sequence[float] | None) -> tuple[int, int, int]:
    """The smallest patch the time fit may shrink to: twice the objects' extent (object plus context)
    on every axis, never above the planned patch; the planned patch itself when no objects are known."""
    patch = cfg.train.patch_size
    if extent_mm is None:
        return (patch[0], patch[1], patch[2])
    spacing = cfg.data.spacing or (1.0, 1.0, 1.0)
    divs = size_divisor(cfg.model)
    floor = [min(p, max(2 * d, int(math.ceil(2 * e / s / d)) * d)) for p, e, s, d in zip(patch, extent_mm, spacing, divs)]
    return (floor[0], floor[1], floor[2])


def fit_patch_to_time(cfg: Config, minutes: float, floor: Sequence[int], seconds: float) -> Config:
    """Shrink the patch toward `floor` (physically longest axis first) until the budget holds
    `MIN_PATCH_STEPS` steps, estimating the step time as proportional to the patch's voxels.

    Why so few: the planned patch is what the data needs (field of view, background to learn
    from), and shrinking it further for more steps did not pay on the thick-slice lesions: the
    floor patch at about 650 steps per 5-minute model against the plan's at about 220 scored
    0.750 (four runs, `MIN_PATCH_STEPS` 600) against 0.770 (six runs, 200; same cases and
    training seeds; docs/benchmarks.md, "Generalisation"). Only a budget too short for even 200
    steps gives up context. The width fit that follows times the result for real.
    """
    patch = cfg.train.patch_size
    steps = memory.budget_steps(minutes, seconds)
    if steps >= MIN_PATCH_STEPS or tuple(floor) == tuple(patch):
        return cfg
    voxels = int(np.prod(patch)) * steps / MIN_PATCH_STEPS
    spacing = cfg.data.spacing or (1.0, 1.0, 1.0)
    smaller = shrink_to_voxels(patch, spacing, int(voxels), floor)
    rounded = round_to_divisors(smaller, size_divisor(cfg.model), int(np.prod(patch)))
    rounded = tuple(max(f, r) for f, r in zip(floor, rounded))
    return replace(cfg, train=replace(cfg.train, patch_size=rounded))  # type: ignore[arg-type]


def _override_network(model: ModelConfig, values: dict[str, Any]) -> dict[str, Any]:
    """A depth override on an anisotropic plan keeps the planned levels it can and adds 2x2x2 / 3x3x3 ones."""
    depth = values.get("depth")
    if depth is None or not model.pool_sizes or "kernel_sizes" in values or "pool_sizes" in values:
        return values
    kernels = list(model.kernel_sizes[: depth - 1])
    pools = list(model.pool_sizes[: depth - 1])
    kernels += [(3, 3, 3)] * (depth - len(kernels))
    pools += [(2, 2, 2)] * (depth - 1 - len(pools))
    return {**values, "kernel_sizes": tuple(kernels), "pool_sizes": tuple(pools)}


def apply_overrides(cfg: Config, overrides: dict[str, dict[str, Any]], seed: int | None, max_minutes: float | None) -> Config:
    """Planned defaults, then user overrides, checked against the dataclass fields."""
    sections = {}
    for name in ("data", "model", "train", "infer", "augment"):
        section = getattr(cfg, name)
        values = dict(overrides.get(name, {}))
        if name == "train":
            if seed is not None:
                values["seed"] = seed
            if max_minutes is not None:
                values["max_minutes"] = max_minutes
        known = {f.name for f in dataclasses.fields(section)}
        unknown = set(values) - known
        if unknown:
            raise VolsegError(None, f"unknown {name} option(s): {', '.join(sorted(unknown))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}
        if name == "model":
            values = _override_network(section, values)
        sections[name] = dataclasses.replace(section, **values)
    unknown_sections = set(overrides) - set(sections)
    if unknown_sections:
        raise VolsegError(None, f"unknown config section(s): {', '.join(sorted(unknown_sections))}")
    return Config(**sections)


def plan_run(
    info: layout.DatasetInfo, cases: Sequence[layout.Case], device: torch.device,
    overrides: dict[str, dict[str, Any]] | None = None, seed: int | None = None, max_minutes: float | None = None,
    amp_dtype: torch.dtype | None = None, agree: Callable[[float], float] | None = None,
    timer: Callable[[Config], float] | None = None,
) -> tuple[Config, dict[str, Any], list[str]]:
    """The whole plan of a training run: dataset plan, memory fit, overrides, then the time fit.

    Returns the config, the fingerprint (measurements behind each choice) and one line per choice.
    `agree` makes torchrun ranks agree on a timing (the slowest rank's); `timer` replaces the step
    timing (tests).
    """
    overrides = overrides or {}
    reasons: list[str] = []
    cfg, fingerprint = make_device_plan(data_config_from_dataset(info), cases, device, reasons)
    cfg = apply_overrides(cfg, overrides, seed, max_minutes)
    set_by_user = {k for k, v in overrides.get("model", {}).items() if v is not None} | {
        k for k, v in overrides.get("train", {}).items() if v is not None}
    if set_by_user:
        reasons.append(f"set on the command line: {', '.join(sorted(set_by_user))}")
    if "base_width" not in set_by_user:
        step_timer = timer or (lambda c: memory.step_seconds(c, device, amp_dtype))
        measured: dict[tuple[tuple[int, ...], int], float] = {}

        def once(c: Config) -> float:
            """One timed step per (patch, width): when the patch is kept, the patch fit's timing is
            also the width fit's first candidate, so that step is not timed twice."""
            key = (tuple(c.train.patch_size), c.model.base_width)
            if key not in measured:
                measured[key] = step_timer(c)
            return measured[key]

        timed = (lambda c: agree(once(c))) if agree is not None else once
        minutes = cfg.train.max_minutes
        if "patch_size" not in set_by_user:
            floor = fov_floor(cfg, fingerprint.get("object_extent_mm_p90"))
            first = timed(cfg)
            shrunk = fit_patch_to_time(cfg, minutes, floor, first)
            if shrunk.train.patch_size != cfg.train.patch_size:
                reasons.append(
                    f"patch {shrunk.train.patch_size} instead of {cfg.train.patch_size}: a step took {first:.2f} s, "
                    f"{memory.budget_steps(minutes, first):,} steps in {minutes:g} min; shrunk toward "
                    f"{MIN_PATCH_STEPS:,} steps but not below {floor} (twice the objects' extent)")
                cfg = shrunk
        before = cfg.model.base_width
        cfg, timing = memory.fit_width_to_time(cfg, minutes, device, amp_dtype, agree=agree, timer=once)
        fingerprint = {**fingerprint, **timing}
        if cfg.model.base_width != before:
            verdict = f"halved from {before}: the narrower network reaches {memory.MIN_STEPS:,} steps"
        elif timing["budget_steps"] >= memory.MIN_STEPS:
            verdict = f"kept: {memory.MIN_STEPS:,} steps or more fit the budget"
        else:
            verdict = (f"kept: no width down to {memory.MIN_WIDTH} reaches {memory.MIN_STEPS:,} steps, so the wider "
                       f"network makes the most of the few there are")
        reasons.append(f"width {cfg.model.base_width} {verdict} (a timed step takes {timing['step_seconds']:.2f} s, "
                       f"{timing['budget_steps']:,} steps in {minutes:g} min)")
    return cfg, {**fingerprint, "reasons": reasons}, reasons
