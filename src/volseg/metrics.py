"""Spacing-aware overlap, volume and surface-distance metrics per label, as pure functions.

Definitions (chosen once here so every table in the project means the same thing; the long form
with the differences to other libraries is docs/metrics.md):

- Masks are ``pred == label`` and ``ref == label``; TP/FP/FN are voxel counts.
  ``dice = 2TP / (2TP + FP + FN)``, ``jaccard = TP / (TP + FP + FN)``,
  ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``.
- ``vol_diff_mm3 = V_pred - V_ref`` (signed, mm³) and ``vol_diff_rel = (V_pred - V_ref) / V_ref``
  (signed, relative to the reference).
- A *surface voxel* is a foreground voxel with at least one of its 6 face-neighbours in the
  background or outside the volume, so a structure touching the volume edge has a surface there.
- Distances are between surface voxel centres, in mm, with the anisotropic ``spacing``. For each
  surface voxel of one mask, its distance to the nearest surface voxel of the other mask gives two
  sets of *directed* distances. ``hd`` is the larger of their maxima (symmetric Hausdorff);
  ``hd95`` is the larger of their 95th percentiles (MONAI's definition, ``numpy.percentile`` with
  linear interpolation); ``assd`` is the mean over both sets pooled (each surface voxel counts
  once); ``nsd`` is the fraction of all surface voxels of both masks within ``nsd_tolerance_mm``
  of the other surface (normalised surface Dice, counted per voxel).

Empty-mask conventions (no NaN, no inf, so means over cases stay finite):

- both masks empty: dice = jaccard = precision = recall = nsd = 1, hd = hd95 = assd = 0,
  vol_diff_mm3 = vol_diff_rel = 0 (nothing to find, nothing found).
- exactly one empty: dice = jaccard = precision = recall = nsd = 0, and hd = hd95 = assd = the
  volume's diagonal ``sqrt(sum((n_vox * spacing) ** 2))`` in mm, which exceeds every distance
  between two voxels of the volume, so a missed (or hallucinated) structure scores worse than any
  found one. An empty prediction has vol_diff_rel = -1 (exact); an empty reference has
  vol_diff_rel = the volume's voxel count, more than any ratio a non-empty reference allows.

Speed, exactly: everything runs on the bounding box of the labels in ``pred | ref`` (found with
per-axis max projections, one streaming pass over each array, taken along the arrays' memory
layout, so a Fortran-ordered array from nibabel streams as fast as a C-ordered one). Distances are found by looking up
the other surface at integer voxel offsets in order of increasing length in mm, so a surface
voxel at distance d costs only the offsets shorter than d; voxels still unresolved when lookups
stop paying (a far-away false positive, a missed part) go to a k-d tree over the other surface.
Both steps give the exact nearest surface voxel; nothing is approximated or thresholded.

Object-level detection scores (objects matched by IoU, merges, splits) live in
`volseg.detection`, with their own definitions and conventions (docs/metrics.md).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from volseg.errors import VolsegError

FIELDS = (
    "dice", "jaccard", "precision", "recall", "hd", "hd95", "assd", "nsd",
    "vol_diff_mm3", "vol_diff_rel", "n_ref", "n_pred",
)  # fmt: skip
NSD_TOLERANCE_MM = 1.0

_TIE_SLACK = 1e-9  # relative: a distance equal to the NSD tolerance up to rounding counts as within
_OFFSETS_WANTED = 512  # voxel offsets looked up before the k-d tree takes the rest
_MAX_REACH_VOX = 64  # caps the padding along a finely sampled axis
_CHECK_EVERY = 32  # offsets between two "do lookups still pay?" checks
_LOOKUPS_PER_TREE_QUERY = 256  # a k-d tree query costs about this many array lookups
_BLOCK_LOOKUPS = 8192  # lookups per numpy call while few queries are pending
_FEW_LABELS = 4  # above this many labels, find all label boxes in one pass (find_objects)
_MAX_BOX_LABEL = 65535  # find_objects allocates a list as long as the largest label


def compute(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int],
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[int, dict[str, float]]:
    """All of `FIELDS` for each label value in `labels`, as plain Python floats.

    `pred` and `ref` are integer label arrays of shape (I, J, K); `labels` are the values to score
    (the caller knows them; a value absent from both arrays scores as "both empty").
    `nsd_tolerance_mm` is the distance (mm) within which a surface voxel counts as matched.

    >>> ref = np.zeros((4, 4, 3), dtype=np.uint8); ref[1:3, 1:3, 1] = 1
    >>> pred = ref.copy(); pred[1, 1, 1] = 0
    >>> row = compute(pred, ref, spacing=(1.0, 1.0, 2.0), labels=[1])[1]
    >>> round(row["dice"], 4), row["n_ref"], row["n_pred"], row["vol_diff_mm3"], row["hd"]
    (0.8571, 4.0, 3.0, -2.0, 1.0)
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    check_label_array(pred, "pred")
    check_label_array(ref, "ref")
    if pred.shape != ref.shape:
        raise VolsegError(
            None,
            f"prediction shape {pred.shape} differs from reference shape {ref.shape}",
            "resample the prediction onto the reference grid first",
        )
    spacing_mm = check_spacing(spacing, pred.ndim)
    tolerance_mm = _check_tolerance(nsd_tolerance_mm)
    wanted = [int(label) for label in labels]
    scale = _scale(pred.shape, spacing_mm)
    pred, ref, spacing_mm, order = _memory_order(pred, ref, spacing_mm)

    result: dict[int, dict[str, float]] = {}
    for label, where in label_regions(pred, ref, wanted):
        if where is None:
            result[label] = _row(scale, tp=0, n_pred=0, n_ref=0)
            continue
        pred_mask = pred[where] == label
        ref_mask = ref[where] == label
        n_pred = int(np.count_nonzero(pred_mask))
        n_ref = int(np.count_nonzero(ref_mask))
        tp = int(np.count_nonzero(np.logical_and(pred_mask, ref_mask))) if n_pred and n_ref else 0
        distances = None
        if n_pred and n_ref:
            box = _nonzero_box(pred_mask, ref_mask)
            distances = _surface_distances(pred_mask[box], ref_mask[box], spacing_mm, order)
        result[label] = _row(scale, tp, n_pred, n_ref, distances, tolerance_mm)
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
    pred_mask, ref_mask, spacing_mm = _check_masks(pred_mask, ref_mask, spacing)
    if not 0.0 <= float(percentile) <= 100.0:
        raise VolsegError(None, f"percentile must be in [0, 100], got {percentile}")
    box = _nonzero_box(pred_mask, ref_mask)
    if box is None:
        return 0.0
    if not pred_mask[box].any() or not ref_mask[box].any():
        return _scale(pred_mask.shape, spacing_mm).diagonal_mm
    to_ref, to_pred = _surface_distances(pred_mask[box], ref_mask[box], spacing_mm)
    return max(float(np.percentile(to_ref, percentile)), float(np.percentile(to_pred, percentile)))


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm): pred surface -> ref surface, and ref -> pred.

    One float64 value per surface voxel, in C order of the voxels, for statistics of your own.
    Both masks must be non-empty (`compute` applies the empty-mask conventions instead).

    >>> a = np.zeros((1, 1, 6), bool); a[0, 0, :2] = True
    >>> b = np.zeros((1, 1, 6), bool); b[0, 0, 4] = True
    >>> [d.tolist() for d in surface_distances(a, b, spacing=(1.0, 1.0, 0.5))]
    [[2.0, 1.5], [1.5]]
    """
    pred_mask, ref_mask, spacing_mm = _check_masks(pred_mask, ref_mask, spacing)
    box = _nonzero_box(pred_mask, ref_mask)
    if box is None or not pred_mask[box].any() or not ref_mask[box].any():
        raise VolsegError(
            None,
            "surface distances need two non-empty masks",
            "use metrics.compute, which applies the empty-mask conventions",
        )
    return _surface_distances(pred_mask[box], ref_mask[box], spacing_mm)


# --------------------------------------------------------------------------------------------------
# rows and conventions


class _Scale(NamedTuple):
    """What the volume and empty-mask conventions need to know about the whole volume."""

    voxel_mm3: float
    diagonal_mm: float  # longer than any distance between two voxels of the volume
    n_voxels: float


def _scale(shape: tuple[int, ...], spacing_mm: tuple[float, ...]) -> _Scale:
    return _Scale(
        voxel_mm3=float(math.prod(spacing_mm)),
        diagonal_mm=float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm)))),
        n_voxels=float(math.prod(shape)),
    )


def _row(
    scale: _Scale,
    tp: int,
    n_pred: int,
    n_ref: int,
    distances: tuple[np.ndarray, np.ndarray] | None = None,
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[str, float]:
    """One label's metrics from the counts and distances, with the module's empty conventions."""
    fp = n_pred - tp
    fn = n_ref - tp
    if n_pred == 0 and n_ref == 0:
        d = j = p = r = nsd = 1.0
        hd = hd95 = assd = 0.0
    elif distances is None:  # exactly one empty
        d = j = p = r = nsd = 0.0
        hd = hd95 = assd = scale.diagonal_mm
    else:
        d = 2.0 * tp / (2 * tp + fp + fn)
        j = tp / (tp + fp + fn)
        p = tp / n_pred
        r = tp / n_ref
        to_ref, to_pred = distances
        hd = max(float(to_ref.max()), float(to_pred.max()))
        hd95 = max(float(np.percentile(to_ref, 95)), float(np.percentile(to_pred, 95)))
        n_surface = to_ref.size + to_pred.size
        assd = (float(to_ref.sum()) + float(to_pred.sum())) / n_surface
        within = tolerance_mm * (1.0 + _TIE_SLACK)
        nsd = (np.count_nonzero(to_ref <= within) + np.count_nonzero(to_pred <= within)) / n_surface
    if n_ref:
        vol_rel = (n_pred - n_ref) / n_ref
    else:
        vol_rel = scale.n_voxels if n_pred else 0.0
    return {
        "dice": float(d),
        "jaccard": float(j),
        "precision": float(p),
        "recall": float(r),
        "hd": float(hd),
        "hd95": float(hd95),
        "assd": float(assd),
        "nsd": float(nsd),
        "vol_diff_mm3": float((n_pred - n_ref) * scale.voxel_mm3),
        "vol_diff_rel": float(vol_rel),
        "n_ref": float(n_ref),
        "n_pred": float(n_pred),
    }


# --------------------------------------------------------------------------------------------------
# surfaces and distances


def _surface_distances(
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing_mm: tuple[float, ...],
    axes: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm) between the surfaces of two non-empty masks.

    The masks may be crops of larger volumes as long as everything outside them is background
    for both: the padding of zeros then stands for the rest of the volume and its outside.
    With `axes` (the masks are `transpose(axes)` views of the caller's arrays), the distances
    come in the C order of the caller's voxels, so that sums over them are bit-identical
    whatever the memory layout.
    """
    vectors, lengths_mm, reach_vox = _offsets(spacing_mm)
    pad = tuple(int(r) + 1 for r in reach_vox)  # room for every offset, plus the outside layer
    pred_surface, pred_index = _padded_surface(pred_mask, pad)
    ref_surface, ref_index = _padded_surface(ref_mask, pad)
    strides = np.array([math.prod(pred_surface.shape[a + 1 :]) for a in range(pred_mask.ndim)])
    flat_offsets = vectors @ strides
    to_ref = _directed(pred_index, ref_surface, ref_index, flat_offsets, lengths_mm, spacing_mm)
    to_pred = _directed(ref_index, pred_surface, pred_index, flat_offsets, lengths_mm, spacing_mm)
    if axes is not None and axes != tuple(range(len(axes))):
        to_ref = to_ref[_c_order(pred_index, pred_surface.shape, axes)]
        to_pred = to_pred[_c_order(ref_index, pred_surface.shape, axes)]
    return to_ref, to_pred


def _c_order(flat_index: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """The permutation that puts voxels of a `transpose(axes)` view into the original C order."""
    coords = np.unravel_index(flat_index, shape)
    back = np.argsort(axes)  # original axis a sits at position back[a] of the view
    original_shape = tuple(shape[p] for p in back)
    key = np.ravel_multi_index(tuple(coords[p] for p in back), original_shape)
    return np.argsort(key, kind="stable")


def _padded_surface(mask: np.ndarray, pad: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The mask's surface voxels in a zero-padded array, and their flat indices into it.

    Surface = mask minus its erosion by the 6-neighbourhood (face neighbours), with everything
    outside the mask's array counting as background.
    """
    shape = tuple(n + 2 * p for n, p in zip(mask.shape, pad))
    padded = np.zeros(shape, dtype=bool)
    inner = tuple(slice(p, p + n) for n, p in zip(mask.shape, pad))
    padded[inner] = mask
    interior = padded[inner].copy()
    for axis, (p, n) in enumerate(zip(pad, mask.shape)):
        for step in (-1, 1):
            shifted = list(inner)
            shifted[axis] = slice(p + step, p + step + n)
            np.logical_and(interior, padded[tuple(shifted)], out=interior)
    np.logical_xor(padded[inner], interior, out=padded[inner])  # interior is inside the mask
    return padded, np.flatnonzero(padded)


def _directed(
    queries: np.ndarray,
    target: np.ndarray,
    target_index: np.ndarray,
    flat_offsets: np.ndarray,
    lengths_mm: np.ndarray,
    spacing_mm: tuple[float, ...],
) -> np.ndarray:
    """Distance (mm) from each query voxel (flat index) to the nearest `True` voxel of `target`.

    Offsets come nearest first, so the first offset that lands on the target is the exact
    nearest voxel (ties have equal length). Queries still pending when lookups stop paying, or
    when the offsets run out, are answered exactly by a k-d tree over the target voxels.
    """
    target_flat = target.reshape(-1)
    out = np.empty(queries.size, dtype=np.float64)
    pending = queries
    position = np.arange(queries.size)
    n_offsets = flat_offsets.size
    start = checked = lookups = hits = 0
    while start < n_offsets:
        # Few pending queries: look up a run of offsets at once (fewer, larger numpy calls).
        width = max(1, min(n_offsets - start, _BLOCK_LOOKUPS // pending.size))
        stop = start + width
        if width == 1:
            hit = target_flat[pending + flat_offsets[start]]
            n_found = int(np.count_nonzero(hit))
            if n_found:
                out[position[hit]] = lengths_mm[start]
        else:
            found = target_flat[pending[:, None] + flat_offsets[None, start:stop]]
            nearest = found.argmax(axis=1)  # first hit in the run = the nearest (runs are sorted)
            hit = found[np.arange(pending.size), nearest]
            n_found = int(np.count_nonzero(hit))
            if n_found:
                out[position[hit]] = lengths_mm[start + nearest[hit]]
        lookups += pending.size * width
        hits += n_found
        if n_found:
            missing = ~hit
            pending = pending[missing]
            position = position[missing]
            if pending.size == 0:
                return out
        start = stop
        if start - checked >= _CHECK_EVERY:
            if hits * _LOOKUPS_PER_TREE_QUERY < lookups:
                break  # the rest is far away: the tree is cheaper
            checked, lookups, hits = start, 0, 0
    spacing = np.asarray(spacing_mm)
    target_vox = np.stack(np.unravel_index(target_index, target.shape), axis=1)
    asked_vox = np.stack(np.unravel_index(pending, target.shape), axis=1)
    tree = cKDTree(target_vox * spacing, leafsize=32, balanced_tree=False, compact_nodes=False)
    nearest = tree.query(asked_vox * spacing, k=1)[1]
    out[position] = _length_mm(target_vox[nearest] - asked_vox, spacing)
    return out


def _length_mm(vectors: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Lengths (mm) of integer voxel offsets (n, ndim), the same to the last bit in any axis order.

    The squared components are added smallest first, so that a permutation of the axes (a
    Fortran-ordered array is processed in its memory order) cannot change a distance by rounding.
    """
    return np.sqrt(np.sort((vectors * spacing) ** 2, axis=1).sum(axis=1))


@functools.lru_cache(maxsize=32)
def _offsets(spacing_mm: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every integer offset within a ball of about `_OFFSETS_WANTED` voxels, nearest (mm) first.

    The ball reaches the face neighbours along every axis, unless the spacing is more than
    `_MAX_REACH_VOX` times finer along another axis (then the k-d tree answers more queries).

    Returns the offsets (n, ndim), their lengths in mm, and the largest |offset| per axis. The
    ball is complete: every offset no longer than the last one listed is listed.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    ndim = spacing.size
    unit_ball = math.pi ** (ndim / 2) / math.gamma(ndim / 2 + 1)
    radius_mm = (_OFFSETS_WANTED * float(np.prod(spacing)) / unit_ball) ** (1.0 / ndim)
    # At least the face neighbours along every axis (thick slices), at most _MAX_REACH_VOX voxels.
    radius_mm = max(radius_mm, float(spacing.max()))
    radius_mm = min(radius_mm, _MAX_REACH_VOX * float(spacing.min()))
    reach = np.floor(radius_mm / spacing).astype(np.int64)
    axes = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    vectors = np.stack([a.ravel() for a in axes], axis=1)
    lengths = _length_mm(vectors, spacing)
    keep = lengths <= radius_mm
    order = np.argsort(lengths[keep], kind="stable")
    return vectors[keep][order], lengths[keep][order], reach


# --------------------------------------------------------------------------------------------------
# boxes and checks


def label_regions(
    pred: np.ndarray, ref: np.ndarray, wanted: list[int]
) -> Iterator[tuple[int, tuple[slice, ...] | None]]:
    """(label, box holding all its voxels in pred and ref, or None when it is in neither).

    One crop serves all labels: the box of every non-zero voxel (the whole volume if 0 is wanted);
    with many labels (whole-body organs) one pass finds every label's box within that crop.
    """
    if 0 in wanted:
        crop: tuple[slice, ...] | None = tuple(slice(0, n) for n in pred.shape)
    else:
        crop = _nonzero_box(pred, ref)
    boxes = None
    if crop is not None and len(wanted) > _FEW_LABELS:
        boxes = _label_boxes(pred[crop], ref[crop], wanted)
    for label in wanted:
        where = crop
        if crop is not None and boxes is not None:
            where = _within(crop, boxes[label])
        yield label, where


def nonzero_box(*arrays: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding every non-zero voxel of the same-shaped arrays, or None if all are zero.

    One streaming pass over each array in its memory layout (C or Fortran order alike), then a
    pass over a block only: callers that need anything about the labels present (which values
    occur, per-label boxes) can look at this crop instead of the whole volume.

    >>> a = np.zeros((4, 5, 6), np.uint8); a[1, 2, 3] = 2
    >>> b = np.asfortranarray(np.zeros((4, 5, 6), np.int16)); b[2, 2, 0] = 1
    >>> nonzero_box(a, b)
    (slice(1, 3, None), slice(2, 3, None), slice(0, 4, None))
    """
    if not arrays:
        raise VolsegError(None, "nonzero_box needs at least one array")
    order = _axis_order(arrays[0])
    box = _nonzero_box(*(np.asarray(a).transpose(order) for a in arrays))
    if box is None:
        return None
    back = [slice(0, 0)] * len(order)
    for position, axis in enumerate(order):
        back[axis] = box[position]
    return tuple(back)


def _axis_order(array: np.ndarray) -> tuple[int, ...]:
    """The array's axes from the largest stride to the smallest (C order: 0, 1, 2)."""
    return tuple(int(a) for a in np.argsort([-abs(s) for s in array.strides], kind="stable"))


def _memory_order(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """Views of both arrays with their axes in memory order (largest stride first), the spacing
    permuted alike, and the permutation.

    Every metric is the same under a permutation of the axes (with the spacing permuted alike),
    and the streaming passes that find the boxes are several times faster along the memory
    layout: a Fortran-ordered array (nibabel's, e.g. from `get_fdata().astype(np.uint8)`) would
    otherwise be reduced along its contiguous axis.
    """
    order = _axis_order(pred)
    if order == tuple(range(pred.ndim)):
        return pred, ref, spacing_mm, order
    return pred.transpose(order), ref.transpose(order), tuple(spacing_mm[a] for a in order), order


def _nonzero_box(*arrays: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding every non-zero voxel of the (same-shaped) arrays, or None.

    A max over axis 0 streams through each array once; the box of the remaining axes, found on
    that projection, then limits the pass that finds axis 0's extent to a block.
    """
    views = [_unsigned(a) for a in arrays]
    if views[0].size == 0:
        return None
    if views[0].ndim == 1:
        merged = functools.reduce(np.maximum, views) if len(views) > 1 else views[0]
        hits = np.flatnonzero(merged)
        return None if hits.size == 0 else (slice(int(hits[0]), int(hits[-1]) + 1),)
    projection = functools.reduce(np.maximum, [v.max(axis=0) for v in views])
    rest = _nonzero_box(projection)
    if rest is None:
        return None
    other_axes = tuple(range(1, views[0].ndim))
    along = functools.reduce(
        np.maximum, [v[(slice(None), *rest)].max(axis=other_axes) for v in views]
    )
    hits = np.flatnonzero(along)
    return (slice(int(hits[0]), int(hits[-1]) + 1), *rest)


def _label_boxes(
    pred: np.ndarray, ref: np.ndarray, labels: list[int]
) -> dict[int, tuple[slice, ...] | None] | None:
    """Union box of each label in `pred` and `ref` from one find_objects pass over each array.

    None when the shortcut does not apply (negative or huge label values); callers then fall
    back to scanning the whole crop per label.
    """
    if min(labels) < 1 or max(labels) > _MAX_BOX_LABEL:
        return None
    per_array = []
    for array in (pred, ref):
        if array.dtype == bool or np.issubdtype(array.dtype, np.signedinteger):
            if array.dtype != bool and array.min() < 0:
                return None
            array = array.view(f"u{array.dtype.itemsize}")
        per_array.append(ndimage.find_objects(array, max_label=max(labels)))
    boxes: dict[int, tuple[slice, ...] | None] = {}
    for label in labels:
        found = [objects[label - 1] for objects in per_array if objects[label - 1] is not None]
        boxes[label] = None if not found else tuple(
            slice(min(b[a].start for b in found), max(b[a].stop for b in found))
            for a in range(pred.ndim)
        )
    return boxes


def _within(
    outer: tuple[slice, ...], inner: tuple[slice, ...] | None
) -> tuple[slice, ...] | None:
    """`inner` (relative to the `outer` crop) as a box of the whole array."""
    if inner is None:
        return None
    return tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(outer, inner))


def _unsigned(array: np.ndarray) -> np.ndarray:
    """A same-size unsigned view: non-zero exactly where `array` is, so max() finds non-zeros."""
    if array.dtype == bool or np.issubdtype(array.dtype, np.signedinteger):
        return array.view(f"u{array.dtype.itemsize}")
    return array


def _check_masks(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    if pred_mask.shape != ref_mask.shape:
        raise VolsegError(None, f"mask shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
    if pred_mask.ndim == 0:
        raise VolsegError(None, "masks must have at least one axis, got scalars")
    return pred_mask, ref_mask, check_spacing(spacing, pred_mask.ndim)


def check_label_array(array: np.ndarray, name: str) -> None:
    """An integer (or boolean) label array with at least one axis, or a one-line VolsegError."""
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise VolsegError(
            None,
            f"{name} must be an integer label array, got dtype {array.dtype}",
            "round or argmax probabilities into labels first",
        )
    if array.ndim == 0:
        raise VolsegError(None, f"{name} must have at least one axis, got a scalar")


def check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """`ndim` positive finite voxel sizes in mm as floats, or a one-line VolsegError."""
    spacing_mm = tuple(float(s) for s in spacing)
    if len(spacing_mm) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise VolsegError(
            None,
            f"spacing must be {ndim} positive finite numbers (mm), got {tuple(spacing)}",
        )
    return spacing_mm


def _check_tolerance(tolerance_mm: float) -> float:
    tolerance = float(tolerance_mm)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise VolsegError(
            None, f"NSD tolerance must be a finite number of mm >= 0, got {tolerance_mm}"
        )
    return tolerance
