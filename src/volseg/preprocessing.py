"""Intensity normalisation and label encoding, identical in training and prediction."""

from __future__ import annotations

import numpy as np

from volseg.errors import VolsegError

NORMALIZATIONS = ("zscore", "zscore_nonzero", "none")


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
        mean, std = values.mean(), values.std()
        norm = (image[c] - mean) / max(std, 1e-8)
        out[c] = np.where(mask, norm, 0) if nonzero else norm
    return out


def normalize(image: np.ndarray, method: str) -> np.ndarray:
    """Apply the config's normalisation by name."""
    if method not in NORMALIZATIONS:
        raise VolsegError(None, f"unknown normalisation {method!r}", f"use one of {', '.join(NORMALIZATIONS)}")
    if method == "none":
        return np.asarray(image, dtype=np.float32)
    return zscore(image, nonzero=method == "zscore_nonzero")


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
