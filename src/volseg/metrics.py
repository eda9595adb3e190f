"""Spacing-aware overlap and surface-distance metrics per label, as pure functions.

Definitions (chosen once here so every table in the project means the same thing):

- Masks are ``pred == label`` and ``ref == label``; TP/FP/FN are voxel counts.
  ``dice = 2TP / (2TP + FP + FN)``, ``jaccard = TP / (TP + FP + FN)``,
  ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``.
- A *surface voxel* is a foreground voxel with at least one of its 6 face-neighbours in the
  background or outside the volume, so a structure touching the volume edge has a surface there.
- Distances are between surface voxel centres, in mm, with the anisotropic ``spacing``
  (``scipy.ndimage.distance_transform_edt(sampling=spacing)``). The directed distances from the
  prediction surface to the reference surface and back give ``hd`` (symmetric Hausdorff: the
  larger of the two maxima) and ``hd95`` (MONAI's definition: the larger of the two directed
  95th percentiles, ``numpy.percentile`` with linear interpolation).

Empty-mask conventions (no NaN, no inf, so means over cases stay finite):

- both masks empty: dice = jaccard = precision = recall = 1, hd = hd95 = 0 (nothing to find,
  nothing found).
- exactly one empty: dice = jaccard = precision = recall = 0, and hd = hd95 = the volume's
  diagonal ``sqrt(sum((n_vox * spacing) ** 2))`` in mm, which exceeds every distance between two
  voxels of the volume, so a missed (or hallucinated) structure scores worse than any found one.

Distances are computed on the bounding box of ``pred | ref`` grown by one voxel (clipped to the
volume): every surface voxel lies inside it and the one-voxel margin keeps the surface definition
exact, so the cost is linear in the box size rather than quadratic in the number of voxels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

from volseg.errors import VolsegError

FIELDS = ("dice", "jaccard", "precision", "recall", "hd", "hd95", "n_ref", "n_pred")

_MARGIN_VOX = 1


def compute(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Iterable[int]
) -> dict[int, dict[str, float]]:
    """All of `FIELDS` for each label value in `labels`, as plain Python floats.

    `pred` and `ref` are integer label arrays of shape (I, J, K); `labels` are the foreground
    values to score (the caller knows them; a value absent from both arrays scores as "both empty").

    >>> ref = np.zeros((4, 4, 3), dtype=np.uint8); ref[1:3, 1:3, 1] = 1
    >>> pred = ref.copy(); pred[1, 1, 1] = 0
    >>> row = compute(pred, ref, spacing=(1.0, 1.0, 2.0), labels=[1])[1]
    >>> round(row["dice"], 4), row["n_ref"], row["n_pred"]
    (0.8571, 4.0, 3.0)
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    _check_labels_array(pred, "pred")
    _check_labels_array(ref, "ref")
    if pred.shape != ref.shape:
        raise VolsegError(
            None,
            f"prediction shape {pred.shape} differs from reference shape {ref.shape}",
            "resample the prediction onto the reference grid first",
        )
    spacing_mm = _check_spacing(spacing, pred.ndim)
    pred_boxes = _label_boxes(pred)
    ref_boxes = _label_boxes(ref)
    result: dict[int, dict[str, float]] = {}
    for label in labels:
        label = int(label)
        box = _union_box(
            _box_of(pred, label, pred_boxes), _box_of(ref, label, ref_boxes), pred.shape
        )
        if box is None:  # both empty
            result[label] = _row(tp=0, n_pred=0, n_ref=0, hd=0.0, hd95=0.0)
            continue
        pred_mask = pred[box] == label
        ref_mask = ref[box] == label
        n_pred = int(np.count_nonzero(pred_mask))
        n_ref = int(np.count_nonzero(ref_mask))
        tp = int(np.count_nonzero(pred_mask & ref_mask))
        hd, hd95 = _hausdorff_pair(pred_mask, ref_mask, spacing_mm, pred.shape)
        result[label] = _row(tp=tp, n_pred=n_pred, n_ref=n_ref, hd=hd, hd95=hd95)
    return result


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """Dice overlap of two binary masks; 1.0 when both are empty.

    >>> dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool))
    0.6666666666666666
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    if pred_mask.shape != ref_mask.shape:
        raise VolsegError(None, f"mask shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
    tp = int(np.count_nonzero(pred_mask & ref_mask))
    total = int(np.count_nonzero(pred_mask)) + int(np.count_nonzero(ref_mask))
    return 1.0 if total == 0 else 2.0 * tp / total


def hausdorff(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Sequence[float],
    percentile: float = 100.0,
) -> float:
    """Symmetric surface distance in mm: the larger of the two directed `percentile`s.

    `percentile=100` is the Hausdorff distance, 95 is MONAI's HD95. Empty masks follow the
    module conventions (0 if both empty, the volume diagonal if exactly one is).

    >>> a = np.zeros((3, 1, 5), bool); a[0, 0, 0] = True
    >>> b = np.zeros((3, 1, 5), bool); b[2, 0, 4] = True
    >>> hausdorff(a, b, spacing=(1.5, 1.0, 0.5))
    3.605551275463989
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    if pred_mask.shape != ref_mask.shape:
        raise VolsegError(None, f"mask shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise VolsegError(None, f"percentile must be in [0, 100], got {percentile}")
    spacing_mm = _check_spacing(spacing, pred_mask.ndim)
    box = _union_box(_mask_box(pred_mask), _mask_box(ref_mask), pred_mask.shape)
    if box is None:
        return 0.0
    d_pred_to_ref, d_ref_to_pred = _directed_distances(pred_mask[box], ref_mask[box], spacing_mm)
    if d_pred_to_ref is None or d_ref_to_pred is None:
        return _diagonal_mm(pred_mask.shape, spacing_mm)
    return max(
        float(np.percentile(d_pred_to_ref, percentile)),
        float(np.percentile(d_ref_to_pred, percentile)),
    )


def _row(tp: int, n_pred: int, n_ref: int, hd: float, hd95: float) -> dict[str, float]:
    """One label's metrics from the counts, with the empty-mask conventions of the docstring."""
    fp = n_pred - tp
    fn = n_ref - tp
    if n_pred == 0 and n_ref == 0:
        d = j = p = r = 1.0
    else:
        d = 2.0 * tp / (2 * tp + fp + fn)
        j = tp / (tp + fp + fn)
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_ref if n_ref else 0.0
    return {
        "dice": float(d),
        "jaccard": float(j),
        "precision": float(p),
        "recall": float(r),
        "hd": float(hd),
        "hd95": float(hd95),
        "n_ref": float(n_ref),
        "n_pred": float(n_pred),
    }


def _hausdorff_pair(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing_mm: tuple[float, ...],
    full_shape: tuple[int, ...],
) -> tuple[float, float]:
    """(hd, hd95) of two cropped masks, at least one non-empty; `full_shape` sets the diagonal."""
    d_pred_to_ref, d_ref_to_pred = _directed_distances(pred_mask, ref_mask, spacing_mm)
    if d_pred_to_ref is None or d_ref_to_pred is None:
        diagonal = _diagonal_mm(full_shape, spacing_mm)
        return diagonal, diagonal
    hd = max(float(d_pred_to_ref.max()), float(d_ref_to_pred.max()))
    hd95 = max(float(np.percentile(d_pred_to_ref, 95)), float(np.percentile(d_ref_to_pred, 95)))
    return hd, hd95


def _directed_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_mm: tuple[float, ...]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Distances (mm) from each pred surface voxel to the ref surface and back; None if empty.

    The masks may be crops: a crop face that is not a volume face has a background voxel
    layer inside it (`_union_box`'s margin), so "outside the array" still means background.
    """
    pred_surface = _surface(pred_mask)
    ref_surface = _surface(ref_mask)
    if not pred_surface.any() or not ref_surface.any():
        return None, None
    # distance_transform_edt measures to the nearest zero, so surfaces become the zeros.
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing_mm)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing_mm)
    return to_ref[pred_surface], to_pred[ref_surface]


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a 6-neighbour in the background or outside the array."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    interior = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~interior


def _label_boxes(labels_array: np.ndarray) -> list[tuple[slice, ...] | None] | None:
    """Bounding boxes of all positive labels in one pass, or None if find_objects can't help."""
    if labels_array.size == 0 or labels_array.dtype == bool:
        return None
    top = int(labels_array.max())
    if top <= 0 or top > 4096:  # find_objects allocates a list of length max label
        return None
    work = labels_array if labels_array.min() >= 0 else np.where(labels_array > 0, labels_array, 0)
    return ndimage.find_objects(work)


def _box_of(
    labels_array: np.ndarray, label: int, boxes: list[tuple[slice, ...] | None] | None
) -> tuple[slice, ...] | None:
    """Bounding box of `label` in `labels_array`, or None if the label is absent."""
    if boxes is not None and label > 0:
        return boxes[label - 1] if label <= len(boxes) else None
    return _mask_box(labels_array == label)


def _mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a binary mask, or None if it is empty."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other_axes))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _union_box(
    a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """Smallest box holding both, grown by the margin and clipped to the volume."""
    boxes = [box for box in (a, b) if box is not None]
    if not boxes:
        return None
    return tuple(
        slice(
            max(0, min(box[axis].start for box in boxes) - _MARGIN_VOX),
            min(shape[axis], max(box[axis].stop for box in boxes) + _MARGIN_VOX),
        )
        for axis in range(len(shape))
    )


def _diagonal_mm(shape: tuple[int, ...], spacing_mm: tuple[float, ...]) -> float:
    """Length of the volume's diagonal, larger than any voxel-to-voxel distance inside it."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm))))


def _check_labels_array(array: np.ndarray, name: str) -> None:
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise VolsegError(
            None,
            f"{name} must be an integer label array, got dtype {array.dtype}",
            "round or argmax probabilities into labels first",
        )


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing_mm = tuple(float(s) for s in spacing)
    if len(spacing_mm) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise VolsegError(
            None,
            f"spacing must be {ndim} positive finite numbers (mm), got {tuple(spacing)}",
        )
    return spacing_mm
