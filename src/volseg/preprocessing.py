"""Intensity normalisation and label encoding, identical in training and prediction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from volseg.errors import VolsegError

NORMALIZATIONS = ("zscore", "zscore_nonzero", "ct", "none")


def zscore(image: np.ndarray, nonzero: bool = False) -> np.ndarray:
    """Per-channel z-score of an (C, I, J, K) image, as float32.

    With `nonzero`, statistics come from voxels where any channel is non-zero (skull-stripped MRI),
    and voxels outside that region stay 0. A constant channel becomes all zeros instead of NaN.

    >>> zscore(np.array([[[[1.0, 3.0]]]])).ravel().tolist()
    [-1.0, 1.0]
    """
    return normalize(np.asarray(image, dtype=np.float32), "zscore_nonzero" if nonzero else "zscore")


def apply_zscore(channel: np.ndarray, mean: float, std: float, mask: np.ndarray | None = None) -> np.ndarray:
    """(channel - mean) / std in float64 (a constant channel has std 0: divide by 1e-8 instead), 0 outside `mask`.

    >>> apply_zscore(np.array([1.0, 3.0], dtype=np.float32), 2.0, 1.0, np.array([True, False])).tolist()
    [-1.0, 0.0]
    """
    norm = (channel - np.float64(mean)) / max(np.float64(std), 1e-8)
    return norm if mask is None else np.where(mask, norm, 0)


def ct_normalize(channel: np.ndarray, lo: float, hi: float, mean: float, std: float) -> np.ndarray:
    """CT: Hounsfield units are absolute, so clip to the dataset's foreground range and z-score globally.

    >>> ct_normalize(np.array([-1000.0, 40.0, 3000.0]), -100, 200, 50, 10).tolist()
    [-15.0, -1.0, 15.0]
    """
    return ((np.clip(channel, lo, hi) - mean) / max(std, 1e-8)).astype(np.float32)


def zscore_mask_channels(methods: Sequence[str]) -> list[slice | None]:
    """Per channel, the channels whose non-zero voxels its z-score statistics come from (None: every voxel).

    "zscore_nonzero" looks at the channel itself, or at all channels when every channel uses it
    (one brain mask for all MR sequences); other methods take no mask.

    >>> zscore_mask_channels(["zscore_nonzero", "zscore_nonzero"]), zscore_mask_channels(["ct", "zscore_nonzero"])
    ([slice(None, None, None), slice(None, None, None)], [None, slice(1, 2, None)])
    """
    shared = len(set(methods)) == 1
    return [
        None if m != "zscore_nonzero" else slice(None) if shared else slice(c, c + 1) for c, m in enumerate(methods)
    ]


def zscore_masks(image: np.ndarray, mask_channels: Sequence[slice | None]) -> list[np.ndarray | None]:
    """The masks that `zscore_mask_channels` describes, for a (C, I, J, K) image or any of its rows.

    Voxel-wise, so prediction can build them for a few rows at a time; each distinct mask once.
    """
    masks: list[np.ndarray | None] = []
    made: dict[tuple, np.ndarray] = {}
    for scope in mask_channels:
        if scope is None:
            masks.append(None)
            continue
        key = (scope.start, scope.stop)
        if key not in made:
            made[key] = np.any(np.asarray(image[scope], dtype=np.float32) != 0, axis=0)
        masks.append(made[key])
    return masks


def apply_normalization(
    image: np.ndarray,
    methods: Sequence[str],
    stats: Sequence[Sequence[float] | None],
    masks: Sequence[np.ndarray | None],
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise each channel of a (C, ...) image with statistics already known, into float32 `out`.

    The one place the arithmetic lives, so that training (`normalize`, statistics of the whole
    image) and prediction (`inference.slab_normalizer`, statistics gathered once, applied a few
    rows at a time) give the same float32 values. `stats[c]`: (lo, hi, mean, std) for "ct",
    (mean, std) for the z-scores (None: no voxel to take them from, the channel becomes 0),
    unused for "none". `masks[c]` (see `zscore_masks`): z-scored voxels, 0 elsewhere; None = all.

    >>> image = np.array([[[[1.0, 3.0]]], [[[-50.0, 500.0]]]], dtype=np.float32)
    >>> apply_normalization(image, ["zscore", "ct"], [(2.0, 1.0), (0, 100, 50, 10)], [None, None]).tolist()
    [[[[-1.0, 1.0]]], [[[-5.0, 5.0]]]]
    """
    out = np.empty(image.shape, dtype=np.float32) if out is None else out
    for c, method in enumerate(methods):
        if method == "none":
            out[c] = image[c]
        elif method == "ct":
            out[c] = ct_normalize(image[c], *stats[c])  # type: ignore[misc]  # "ct" always has statistics
        elif stats[c] is None:
            out[c] = 0
        else:  # float32 voxels minus a float64 mean, as `zscore` always did
            out[c] = apply_zscore(np.asarray(image[c], dtype=np.float32), *stats[c], masks[c])  # type: ignore[misc]
    return out


def _mean_std(channel: np.ndarray, mask: np.ndarray | None) -> tuple[float, float] | None:
    """Mean and standard deviation (float64) of a float32 channel's voxels in `mask`; None if there are none."""
    values = (channel.ravel() if mask is None else channel[mask]).astype(np.float64)
    if values.size == 0:
        return None
    return values.mean(), values.std()


def normalize(
    image: np.ndarray,
    method: str | Sequence[str],
    stats: Sequence[Sequence[float]] = (),
) -> np.ndarray:
    """Normalise each channel of a (C, I, J, K) image by name (one name for all, or one per channel).

    "ct" needs `stats[c] = (lo, hi, mean, std)`, the dataset's foreground intensity statistics;
    the z-scores take theirs from the image itself (`zscore_mask_channels` says from which voxels).
    """
    n = image.shape[0]
    methods = [method] * n if isinstance(method, str) else list(method)
    if len(methods) != n:
        raise VolsegError(None, f"{len(methods)} normalisations given for {n} channels")
    for m in methods:
        if m not in NORMALIZATIONS:
            raise VolsegError(None, f"unknown normalisation {m!r}", f"use one of {', '.join(NORMALIZATIONS)}")
    masks = zscore_masks(image, zscore_mask_channels(methods))
    channel_stats: list[Sequence[float] | None] = []
    for c, m in enumerate(methods):
        if m == "ct":
            if c >= len(stats):
                raise VolsegError(None, f"channel {c} uses CT normalisation but has no intensity statistics")
            channel_stats.append(stats[c])
        elif m == "none":
            channel_stats.append(None)
        else:
            channel_stats.append(_mean_std(np.asarray(image[c], dtype=np.float32), masks[c]))
    return apply_normalization(image, methods, channel_stats, masks)


def encode_labels(
    label: np.ndarray, class_values: tuple[int, ...], ignore_label: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Map label values to class indices 0..N-1 and build the weight mask (0 where unlabelled).

    Values that are neither a class nor `ignore` also get weight 0, so a stray value can never be
    trained as background.

    >>> idx, w = encode_labels(np.array([0, 2, 5, 9]), (0, 2, 5), ignore_label=9)
    >>> idx.tolist(), w.tolist()
    ([0, 1, 2, 0], [1, 1, 1, 0])
    """
    label = np.asarray(label)
    index = np.zeros(label.shape, dtype=np.uint8 if len(class_values) < 256 else np.int16)
    known = np.zeros(label.shape, dtype=bool)
    for i, v in enumerate(class_values):
        hit = label == v
        index[hit] = i
        known |= hit
    if ignore_label is not None:
        known &= label != ignore_label
    return index, known.astype(np.uint8)


def decode_labels(index: np.ndarray, class_values: tuple[int, ...]) -> np.ndarray:
    """Class indices back to the dataset's label values, in the smallest fitting integer dtype."""
    lut = np.asarray(class_values)
    dtype = np.uint8 if lut.max(initial=0) < 256 and lut.min(initial=0) >= 0 else np.int16
    return lut.astype(dtype)[index]


def slice_indices(size: int, k: int, strategy: str, rng: np.random.Generator | None = None) -> list[int]:
    """Which `k` of `size` slices to keep along one axis: evenly spread, or drawn at random.

    "even" places slices at the centres of k equal bins, so a single slice is the middle one.

    >>> slice_indices(36, 1, "even"), slice_indices(36, 4, "even")
    ([18], [4, 13, 22, 31])
    """
    k = max(0, min(int(k), size))
    if k == 0:
        return []
    if strategy == "even":
        return sorted({int((i + 0.5) * size / k) for i in range(k)})
    if strategy == "random":
        if rng is None:
            raise ValueError("strategy 'random' needs an rng")
        return sorted(int(i) for i in rng.choice(size, k, replace=False))
    raise VolsegError(None, f"unknown slice strategy {strategy!r}", "use even or random")


def sparse_slice_mask(
    shape: tuple[int, int, int],
    slices_per_axis: int | None = None,
    axes: tuple[int, ...] = (0, 1, 2),
    strategy: str = "even",
    rng: np.random.Generator | None = None,
    fraction: float | None = None,
) -> np.ndarray:
    """Boolean (I, J, K) mask of the voxels an annotator would label: whole slices along `axes`.

    Either `slices_per_axis` slices on each of `axes` (orthogonal planes, as in the 3D U-Net paper),
    or `fraction` of the slices of each axis (at least one).

    >>> m = sparse_slice_mask((4, 5, 6), slices_per_axis=1, axes=(2,))
    >>> m.sum() == 4 * 5, m[:, :, 3].all()
    (np.True_, np.True_)
    """
    if (slices_per_axis is None) == (fraction is None):
        raise VolsegError(None, "give either slices per axis or a fraction of slices")
    if fraction is not None and not 0 < fraction <= 1:
        raise VolsegError(None, f"fraction must be in (0, 1], got {fraction}")
    if any(a not in (0, 1, 2) for a in axes) or not axes:
        raise VolsegError(None, f"axes must be a non-empty subset of 0, 1, 2; got {axes}")
    mask = np.zeros(shape, dtype=bool)
    for axis in sorted(set(axes)):
        k = slices_per_axis if fraction is None else max(1, round(fraction * shape[axis]))
        index = [slice(None)] * 3
        index[axis] = slice_indices(shape[axis], k, strategy, rng)
        mask[tuple(index)] = True
    return mask


ANISOTROPY_RATIO = 3.0  # thick axis / thin axis above which the thick axis is treated separately


def needs_resampling(spacing: tuple[float, ...], target: tuple[float, ...], tolerance: float = 0.05) -> bool:
    """True when any axis differs from the target spacing by more than `tolerance` (relative).

    >>> needs_resampling((1.0, 1.0, 1.02), (1, 1, 1)), needs_resampling((0.5, 0.5, 3), (1, 1, 3))
    (False, True)
    """
    return any(abs(s - t) > tolerance * t for s, t in zip(spacing, target))


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, int, int]:
    """Voxel counts covering the same physical extent at the target spacing.

    >>> resampled_shape((100, 100, 20), (0.5, 0.5, 5.0), (1.0, 1.0, 2.5))
    (50, 50, 40)
    """
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))  # type: ignore[return-value]


def _zoom_axes(array: np.ndarray, out_shape: tuple[int, ...], order: int, axes: tuple[int, ...]) -> np.ndarray:
    """Resample the last three axes of `array` to `out_shape`, only along `axes`, with one spline order."""
    from scipy import ndimage

    in_shape = array.shape[-3:]
    target = [in_shape[a] if a not in axes else out_shape[a] for a in range(3)]
    if tuple(target) == tuple(in_shape):
        return array
    factors = [t / n for t, n in zip(target, in_shape)]
    lead = array.shape[:-3]
    flat = array.reshape(-1, *in_shape)
    out = np.empty((flat.shape[0], *target), dtype=array.dtype)
    for i, channel in enumerate(flat):
        out[i] = ndimage.zoom(channel, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    return out.reshape(*lead, *target)


def _thick_axis(spacing: tuple[float, ...], target: tuple[float, ...]) -> int | None:
    """The axis sampled so coarsely (source or target) that interpolating across it invents anatomy."""
    for sp in (spacing, target):
        if max(sp) / min(sp) > ANISOTROPY_RATIO:
            return int(np.argmax(sp))
    return None


def resample_image(
    image: np.ndarray, spacing: tuple[float, ...], target: tuple[float, ...], out_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Resample a (C, I, J, K) image to the target spacing: cubic in-plane, linear across a thick axis.

    Like nnU-Net, strongly anisotropic data are not interpolated with a cubic spline across
    their thick slices (that overshoots between distant slices).
    """
    out_shape = out_shape or resampled_shape(image.shape[1:], spacing, target)
    thick = _thick_axis(spacing, target)
    image = np.asarray(image, dtype=np.float32)
    if thick is None:
        return _zoom_axes(image, out_shape, 3, (0, 1, 2))
    plane = tuple(a for a in range(3) if a != thick)
    return _zoom_axes(_zoom_axes(image, out_shape, 3, plane), out_shape, 1, (thick,))


def resample_labels(label: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of an (I, J, K) integer array: never invents label values."""
    return _zoom_axes(np.asarray(label), out_shape, 0, (0, 1, 2))


def resample_probabilities(probs: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of (C, I, J, K) class probabilities back to the input grid, one class at a time."""
    return _zoom_axes(np.asarray(probs, dtype=np.float32), out_shape, 1, (0, 1, 2))
