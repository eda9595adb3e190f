"""Per-voxel loss weight maps as pure functions: class balance and the U-Net border term.

The border term is Ronneberger et al. (2015), eq. 2, in 3D and in millimetres::

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

with ``d1``/``d2`` the distances from voxel x to the nearest and the second-nearest object. It
makes the thin background between touching objects count more, so a network learns to keep them
apart. Distances use the voxel spacing, so ``sigma_mm`` means the same on every scan.

Unlabelled voxels (``known == 0``) always get weight exactly 0 (STYLE.md 4.5): losses only see
weights, so a weight map is also how sparse annotation reaches the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cc3d
import numpy as np
from scipy import ndimage

from volseg.errors import VolsegError

_MAX_BOX_LABEL = 65535  # find_objects allocates a list as long as the largest id: relabel above
_CONNECTIVITIES = (6, 18, 26)


def border_weights(
    instances: np.ndarray,
    spacing_mm: Sequence[float],
    w0: float = 10.0,
    sigma_mm: float = 5.0,
    tolerance: float = 1e-5,
) -> np.ndarray:
    """The U-Net border term ``w0 * exp(-(d1 + d2)**2 / (2 sigma**2))`` of an instance map.

    `instances` is an integer array of shape (I, J, K): 0 is background and each positive value
    one object (values need not be consecutive). ``d_k(x)`` is the Euclidean distance in mm from
    voxel x to the nearest voxel of object k; d1 and d2 are the smallest and second smallest over
    the objects. Returns float32 (I, J, K): the term on background voxels and 0 on object voxels,
    since the extra importance is meant for the background between objects. With fewer than two
    objects there is no second distance and the term is 0 everywhere (as is any term with w0 = 0).

    Fast and within `tolerance` of the exact map: the term is below `tolerance` wherever
    ``d1 + d2 > cutoff = sigma * sqrt(2 ln(w0 / tolerance))``. So each object's distance transform
    is computed only in its bounding box grown by ``g = cutoff - min(spacing)`` mm per axis (at
    least 0), not in the whole volume. Why that is enough: a voxel outside the grown box of object
    k is more than g from it. Leaving objects out can only raise the computed d1 and d2, so the
    computed term never exceeds the exact one, and it is exact wherever the two nearest objects
    were both kept. If a left-out object k is among the two nearest at a background voxel, the
    exact ``d1 + d2 > cutoff``: d2 >= d_k > g, and d1 >= min(spacing) because the nearest object
    voxel is another voxel. Then both the exact and the computed term lie in [0, tolerance).

    >>> inst = np.zeros((1, 1, 7), dtype=np.int32); inst[0, 0, :2] = 4; inst[0, 0, 5:] = 9
    >>> w = border_weights(inst, (1.0, 1.0, 1.0), w0=10.0, sigma_mm=5.0)
    >>> [round(float(v), 3) for v in w[0, 0]]  # d1 + d2 = 4 mm in each gap voxel
    [0.0, 0.0, 7.261, 7.261, 7.261, 0.0, 0.0]
    >>> float(border_weights((inst == 4).astype(np.uint8), (1.0, 1.0, 1.0)).max())  # one object
    0.0
    """
    instances = _check_instances(instances)
    spacing = _check_spacing(spacing_mm)
    w0, sigma_mm, tolerance = float(w0), float(sigma_mm), float(tolerance)
    _check_border_params(w0, sigma_mm)
    if w0 > 0 and not (0 < tolerance < w0):
        raise VolsegError(
            None, f"tolerance must be in (0, w0) = (0, {w0:g}), got {tolerance}", "e.g. 1e-5"
        )
    out = np.zeros(instances.shape, dtype=np.float32)
    if w0 == 0 or instances.size == 0:
        return out
    if np.issubdtype(instances.dtype, np.signedinteger) and instances.min() < 0:
        raise VolsegError(None, "instances must be >= 0 (0 = background, > 0 = object ids)")
    objects = _object_boxes(instances)
    if len(objects) < 2:
        return out

    _sum_of_two_nearest(instances, objects, spacing, _margin_vox(spacing, w0, sigma_mm, tolerance), out)
    # w0 * exp(-(d1 + d2)^2 / (2 sigma^2)), in place; inf (no second object in reach) -> 0.
    np.multiply(out, out, out=out)
    out *= np.float32(-0.5 / sigma_mm**2)
    np.exp(out, out=out)
    out *= np.float32(w0)
    out[instances != 0] = 0
    return out


def _margin_vox(spacing: tuple[float, float, float], w0: float, sigma_mm: float, tolerance: float) -> list[int]:
    """Voxels per axis by which each object's box grows (`border_weights` says why that is enough).

    >>> _margin_vox((1.0, 1.0, 2.0), 10.0, 5.0, 1e-5)  # cutoff 26.3 mm, less one voxel
    [25, 25, 12]
    """
    cutoff_mm = sigma_mm * math.sqrt(2.0 * math.log(w0 / tolerance))
    grow_mm = max(cutoff_mm - min(spacing), 0.0)
    return [int(math.floor(grow_mm / s)) for s in spacing]


def _sum_of_two_nearest(
    instances: np.ndarray,
    objects: list[tuple[int, tuple[slice, ...]]],
    spacing: tuple[float, float, float],
    margin_vox: Sequence[int],
    out: np.ndarray,
) -> None:
    """``d1 + d2`` into `out` (float32): the distances in mm from each voxel to its nearest and
    second-nearest object (inf where fewer than two are in reach), each object's distance transform
    taken only in its box grown by `margin_vox`. Works on squares and takes two roots at the end."""
    # Running smallest and second-smallest *squared* distances (the min/max updates are the same
    # on squares, and the square root is taken once at the end instead of once per object).
    d1 = np.full(instances.shape, np.inf, dtype=np.float32)
    d2 = np.full(instances.shape, np.inf, dtype=np.float32)
    ft_buffer = np.empty(0, dtype=np.int32)
    work_buffer = np.empty(0, dtype=np.float32)
    for object_id, box in objects:
        crop_box = tuple(
            slice(max(b.start - m, 0), min(b.stop + m, n))
            for b, m, n in zip(box, margin_vox, instances.shape)
        )
        crop = instances[crop_box]
        n_crop = crop.size
        if ft_buffer.size < 3 * n_crop:  # grow-only buffers: no fresh pages to fault in per object
            ft_buffer = np.empty(3 * n_crop, dtype=np.int32)
            work_buffer = np.empty(2 * n_crop, dtype=np.float32)
        ft = ft_buffer[: 3 * n_crop].reshape((3, *crop.shape))
        # Feature transform only: scipy's own distances go through float64 copies of 3 x crop
        # and cost about three times the transform itself.
        ndimage.distance_transform_edt(
            crop != object_id, sampling=spacing, return_distances=False,
            return_indices=True, indices=ft,
        )
        new = work_buffer[:n_crop].reshape(crop.shape)
        tmp = work_buffer[n_crop : 2 * n_crop].reshape(crop.shape)
        _squared_distance(ft, spacing, new, tmp)
        d1_crop, d2_crop = d1[crop_box], d2[crop_box]
        np.maximum(d1_crop, new, out=tmp)
        np.minimum(d2_crop, tmp, out=d2_crop)  # d2 = min(d2, max(d1, new))
        np.minimum(d1_crop, new, out=d1_crop)  # d1 = min(d1, new)
    np.sqrt(d1, out=d1)
    np.sqrt(d2, out=d2)
    np.add(d1, d2, out=out)


def class_balance_weights(
    label: np.ndarray, num_classes: int, known: np.ndarray | None = None
) -> np.ndarray:
    """Inverse-frequency class weights per voxel: every class present gets the same total weight.

    `label` holds class indices 0..num_classes-1 (shape (I, J, K)); `known` marks the labelled
    voxels (None = all). Over the labelled voxels, class c weighs ``n_known / (n_present * n_c)``
    with n_present the number of classes that occur. That makes the mean weight over labelled
    voxels exactly 1 (each present class contributes ``n_known / n_present`` in total), so the
    loss keeps its scale. Classes that do not occur need no weight; unlabelled voxels get 0 and
    their label values are not checked (they may hold an ignore value). Returns float32.

    >>> label = np.array([[[0, 0, 0, 1]]], dtype=np.uint8)
    >>> [round(float(v), 4) for v in class_balance_weights(label, 2)[0, 0]]
    [0.6667, 0.6667, 0.6667, 2.0]
    >>> class_balance_weights(label, 2, known=np.array([[[1, 1, 0, 1]]]))[0, 0].tolist()
    [0.75, 0.75, 0.0, 1.5]
    """
    label = _check_volume(label, "label")
    _check_label_dtype(label, "label")
    num_classes = _check_num_classes(num_classes)
    known_mask = _check_known(known, label.shape)
    values = label if known_mask is None else label[known_mask]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise VolsegError(
            None,
            f"labelled voxels must hold classes 0..{num_classes - 1}, "
            f"found {int(values.min())}..{int(values.max())}",
            "raise num_classes, or mark ignore values as unknown",
        )
    counts = np.bincount(values.ravel(), minlength=num_classes).astype(np.float64)
    present = counts > 0
    lut = np.zeros(num_classes, dtype=np.float32)
    if values.size:
        lut[present] = values.size / (present.sum() * counts[present])
    out = np.take(lut, label, mode="clip")  # clip: unknown voxels may hold anything
    if known_mask is not None:
        out[~known_mask] = 0
    return out


def instances_from_labels(label: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Objects for the border term: connected components of each non-zero class.

    Voxels of different classes never join one component (cc3d labels a multi-valued array per
    value), so two touching organs stay two objects. Returns int32 (I, J, K), 0 = background,
    objects numbered 1..N.

    >>> label = np.array([[[1, 1, 2, 2, 0, 1]]], dtype=np.uint8)
    >>> instances_from_labels(label)[0, 0].tolist()
    [1, 1, 2, 2, 0, 3]
    """
    label = _check_volume(label, "label")
    _check_label_dtype(label, "label")
    if connectivity not in _CONNECTIVITIES:
        raise VolsegError(None, f"connectivity must be 6, 18 or 26, got {connectivity}")
    if np.issubdtype(label.dtype, np.signedinteger) and label.size and label.min() < 0:
        raise VolsegError(None, "label must be >= 0 (0 = background)")
    components = cc3d.connected_components(label, connectivity=connectivity)
    return components.astype(np.int32, copy=False)


def weight_map(
    label: np.ndarray,
    num_classes: int,
    spacing_mm: Sequence[float],
    *,
    known: np.ndarray | None = None,
    instances: np.ndarray | None = None,
    w0: float = 10.0,
    sigma_mm: float = 5.0,
    class_balance: bool = True,
) -> np.ndarray:
    """The full per-voxel loss weight: (class balance or 1) + border term, 0 where unlabelled.

    The border term (see `border_weights`) uses `instances` when given (even where `label`
    disagrees with it), else the connected components of `label` with unlabelled voxels set to
    background. ``w0 = 0`` leaves the border term out. The sum is multiplied by `known`, so an
    unlabelled voxel weighs exactly 0. Returns float32 (I, J, K).

    >>> label = np.zeros((1, 1, 8), dtype=np.uint8); label[0, 0, :2] = 1; label[0, 0, 5:] = 1
    >>> known = np.ones_like(label); known[0, 0, 7] = 0
    >>> [round(float(v), 2) for v in weight_map(label, 2, (1, 1, 1), known=known)[0, 0]]
    [0.88, 0.88, 8.43, 8.43, 8.43, 0.88, 0.88, 0.0]
    """
    label = _check_volume(label, "label")
    _check_label_dtype(label, "label")
    spacing = _check_spacing(spacing_mm)
    _check_border_params(float(w0), float(sigma_mm))
    known_mask = _check_known(known, label.shape)
    if instances is not None:
        instances = _check_volume(instances, "instances")
        if instances.shape != label.shape:
            raise VolsegError(
                None, f"instances shape {instances.shape} differs from label shape {label.shape}"
            )
    if class_balance:
        out = class_balance_weights(label, num_classes, known_mask)
    else:
        _check_num_classes(num_classes)
        out = np.ones(label.shape, dtype=np.float32)
    if w0 > 0:
        if instances is None:
            masked = label if known_mask is None else np.where(known_mask, label, 0)
            instances = instances_from_labels(masked)
        out += border_weights(instances, spacing, w0=w0, sigma_mm=sigma_mm)
    if known_mask is not None:
        out[~known_mask] = 0
    return out


# --------------------------------------------------------------------------------------------------
# helpers


def _object_boxes(instances: np.ndarray) -> list[tuple[int, tuple[slice, ...]]]:
    """(id, bounding box) of every object, from one find_objects pass.

    Ids up to _MAX_BOX_LABEL index find_objects' list directly; larger ids are first relabelled
    to 1..N (np.unique, a sort of the volume), since find_objects allocates one entry per id.
    """
    max_id = int(instances.max())
    if max_id == 0:
        return []
    if max_id <= _MAX_BOX_LABEL:
        boxes = ndimage.find_objects(instances, max_label=max_id)
        return [(i + 1, box) for i, box in enumerate(boxes) if box is not None]
    ids, inverse = np.unique(instances, return_inverse=True)
    inverse = inverse.reshape(instances.shape)
    if ids[0] != 0:  # no background voxel: shift so that relabelled 0 stays free
        inverse += 1
        ids = np.concatenate([[0], ids])
    boxes = ndimage.find_objects(inverse)
    return [(int(ids[i + 1]), box) for i, box in enumerate(boxes) if box is not None]


def _squared_distance(
    ft: np.ndarray, spacing: tuple[float, float, float], out: np.ndarray, tmp: np.ndarray
) -> None:
    """Squared distance in mm from each voxel to its feature voxel `ft`, in float32, into `out`."""
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = ft.shape[axis + 1]
        index = np.arange(shape[axis], dtype=np.int32).reshape(shape)
        target = out if axis == 0 else tmp
        np.subtract(ft[axis], index, out=target, dtype=np.float32, casting="same_kind")
        target *= np.float32(spacing[axis])
        np.multiply(target, target, out=target)
        if axis:
            out += tmp


def _check_volume(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise VolsegError(None, f"{name} must be a 3D array (I, J, K), got shape {array.shape}")
    return array


def _check_instances(instances: np.ndarray) -> np.ndarray:
    instances = _check_volume(instances, "instances")
    if not (np.issubdtype(instances.dtype, np.integer)):
        raise VolsegError(
            None,
            f"instances must be an integer array, got dtype {instances.dtype}",
            "pass object ids (0 = background), e.g. from instances_from_labels()",
        )
    return instances


def _check_label_dtype(label: np.ndarray, name: str) -> None:
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        raise VolsegError(None, f"{name} must hold integer class indices, got dtype {label.dtype}")


def _check_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(s) for s in spacing_mm)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise VolsegError(None, f"spacing must be 3 positive finite numbers (mm), got {spacing_mm}")
    return spacing  # type: ignore[return-value]


def _check_border_params(w0: float, sigma_mm: float) -> None:
    if not (math.isfinite(w0) and w0 >= 0):
        raise VolsegError(None, f"w0 must be a finite number >= 0, got {w0}", "0 turns the border term off")
    if not (math.isfinite(sigma_mm) and sigma_mm > 0):
        raise VolsegError(None, f"sigma_mm must be a finite number > 0, got {sigma_mm}")


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise VolsegError(None, f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def _check_known(known: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """`known` as a bool mask (None stays None: every voxel labelled)."""
    if known is None:
        return None
    known = np.asarray(known)
    if known.shape != shape:
        raise VolsegError(None, f"known mask shape {known.shape} differs from label shape {shape}")
    if known.dtype != bool:
        if not (np.issubdtype(known.dtype, np.integer) or np.issubdtype(known.dtype, np.floating)):
            raise VolsegError(None, f"known must be a bool or 0/1 mask, got dtype {known.dtype}")
        known = known != 0
    return known
