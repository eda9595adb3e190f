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
    image = np.asarray(image, dtype=np.float32)
    out = np.zeros_like(image)
    mask = np.any(image != 0, axis=0) if nonzero else np.ones(image.shape[1:], dtype=bool)
    if not mask.any():
        return out
    for c in range(image.shape[0]):
        values = image[c][mask].astype(np.float64)
        out[c] = apply_zscore(image[c], values.mean(), values.std(), mask if nonzero else None)
    return out


def apply_zscore(channel: np.ndarray, mean: float, std: float, mask: np.ndarray | None = None) -> np.ndarray:
    """(channel - mean) / std in float64 (a constant channel has std 0: divide by 1e-8 instead), 0 outside `mask`.

    Shared by `zscore` and prediction's row-wise normaliser, so both give the same float32 values.

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


def normalize(
    image: np.ndarray,
    method: str | Sequence[str],
    stats: Sequence[Sequence[float]] = (),
) -> np.ndarray:
    """Normalise each channel of a (C, I, J, K) image by name (one name for all, or one per channel).

    "ct" needs `stats[c] = (lo, hi, mean, std)`, the dataset's foreground intensity statistics.
    """
    n = image.shape[0]
    methods = [method] * n if isinstance(method, str) else list(method)
    if len(methods) != n:
        raise VolsegError(None, f"{len(methods)} normalisations given for {n} channels")
    for m in methods:
        if m not in NORMALIZATIONS:
            raise VolsegError(None, f"unknown normalisation {m!r}", f"use one of {', '.join(NORMALIZATIONS)}")
    if len(set(methods)) == 1 and methods[0] in ("zscore", "zscore_nonzero"):
        return zscore(image, nonzero=methods[0] == "zscore_nonzero")
    out = np.empty(image.shape, dtype=np.float32)
    for c, m in enumerate(methods):
        if m == "none":
            out[c] = image[c]
        elif m == "ct":
            if c >= len(stats):
                raise VolsegError(None, f"channel {c} uses CT normalisation but has no intensity statistics")
            out[c] = ct_normalize(image[c], *stats[c])
        else:
            out[c] = zscore(image[c : c + 1], nonzero=m == "zscore_nonzero")[0]
    return out


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
