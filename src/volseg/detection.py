"""Object-level detection scores per label: how many structures (lesions, nodules) were found.

Voxel overlap (`volseg.metrics`) hides whether a missed lesion was one of thirty or the only one;
these scores count objects: connected components (or reference instance ids) matched one-to-one
by IoU, with precision, recall and F1 per IoU threshold and counts of merged and split objects.
Definitions and conventions: `object_scores` below and docs/metrics.md. The crop around the
labels is shared with the voxel metrics (`metrics.label_regions`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import cc3d
import numpy as np

from volseg import metrics
from volseg.errors import VolsegError

OBJECT_IOU_THRESHOLDS = (0.1, 0.5)
_CONNECTIVITIES = (6, 18, 26)


def object_fields(iou_thresholds: Sequence[float] = OBJECT_IOU_THRESHOLDS) -> tuple[str, ...]:
    """Names of `object_scores`' fields for these IoU thresholds, in table order.

    >>> object_fields((0.5,))
    ('n_ref_objects', 'n_pred_objects', 'obj_tp@0.5', 'obj_precision@0.5', 'obj_recall@0.5', 'obj_f1@0.5', 'merged', 'merged_ref', 'split')
    """
    names = ["n_ref_objects", "n_pred_objects"]
    for t in _check_iou_thresholds(iou_thresholds):
        names += [f"obj_{field}@{t:g}" for field in ("tp", "precision", "recall", "f1")]
    return (*names, "merged", "merged_ref", "split")


def detection_scores(tp: float, n_pred: float, n_ref: float) -> tuple[float, float, float]:
    """(precision, recall, F1) of a detection from its counts, with the empty conventions.

    No objects on either side scores 1, 1, 1 (nothing to find, nothing found); when only one side
    has objects all three are 0. Otherwise precision = tp / n_pred, recall = tp / n_ref and
    F1 = 2 tp / (n_pred + n_ref). Used per case by `object_scores` and on counts pooled over
    cases by the report, so both follow one convention.

    >>> detection_scores(1, 1, 2)
    (1.0, 0.5, 0.6666666666666666)
    >>> detection_scores(0, 0, 0), detection_scores(0, 0, 3)
    ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    """
    tp, n_pred, n_ref = float(tp), float(n_pred), float(n_ref)
    if n_pred == 0 and n_ref == 0:
        return 1.0, 1.0, 1.0
    if n_pred == 0 or n_ref == 0:
        return 0.0, 0.0, 0.0
    return tp / n_pred, tp / n_ref, 2.0 * tp / (n_pred + n_ref)


def object_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Iterable[int],
    *,
    iou_thresholds: Sequence[float] = OBJECT_IOU_THRESHOLDS,
    min_volume_mm3: float = 0.0,
    ref_instances: np.ndarray | None = None,
    connectivity: int = 26,
) -> dict[int, dict[str, float]]:
    """Object-level detection scores per label value: `object_fields(iou_thresholds)` per label.

    Voxel overlap hides how many structures (lesions, nodules) were found; these count them.
    For label l, the predicted objects are the connected components (`connectivity` 6, 18 or 26)
    of ``pred == l``; the reference objects are those of ``ref == l``, or, with `ref_instances`
    (an instance-id map of the same shape, 0 = none), the distinct non-zero ids inside
    ``ref == l`` (so touching objects stay apart; one id is one object even if disconnected).
    Objects smaller than `min_volume_mm3` (voxel count times ``prod(spacing)``) on either side are
    removed before anything is counted, as if they were background; one exactly at the threshold
    stays.

    IoU = |P ∩ R| / |P ∪ R| in voxels for every overlapping pair. At each threshold t (in (0, 1])
    pairs with IoU >= t are matched one-to-one maximising the summed IoU (Hungarian method);
    ``obj_tp@t`` is the number of matched pairs and precision, recall and F1 follow
    `detection_scores` (both sides empty: 1; exactly one side empty: 0). ``merged`` counts
    predicted objects that each cover at least 2 reference objects (intersection >= 50 % of the
    reference object's voxels) and ``merged_ref`` the reference objects so covered by them (one
    prediction swallowing a clump of 10 counts 1 and 10); ``split`` counts reference objects each covered by at least 2
    predicted objects (intersection >= 50 % of the predicted object's voxels). All values are
    floats, counts included.

    >>> ref = np.zeros((1, 3, 9), dtype=np.uint8); ref[0, 1, 0:3] = 1; ref[0, 1, 4:7] = 1
    >>> pred = np.zeros_like(ref); pred[0, 1, 0:7] = 1  # one blob over both reference objects
    >>> row = object_scores(pred, ref, spacing=(1.0, 1.0, 1.0), labels=[1])[1]
    >>> row["n_ref_objects"], row["n_pred_objects"], row["obj_tp@0.1"], row["obj_tp@0.5"]
    (2.0, 1.0, 1.0, 0.0)
    >>> round(row["obj_f1@0.1"], 4), row["merged"], row["split"]
    (0.6667, 1.0, 0.0)
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    metrics.check_label_array(pred, "pred")
    metrics.check_label_array(ref, "ref")
    if pred.ndim != 3:
        raise VolsegError(None, f"object scores need arrays of shape (I, J, K), got {pred.shape}")
    if pred.shape != ref.shape:
        raise VolsegError(
            None,
            f"prediction shape {pred.shape} differs from reference shape {ref.shape}",
            "resample the prediction onto the reference grid first",
        )
    if ref_instances is not None:
        ref_instances = np.asarray(ref_instances)
        metrics.check_label_array(ref_instances, "ref_instances")
        if ref_instances.shape != ref.shape:
            raise VolsegError(
                None,
                f"instance map shape {ref_instances.shape} differs from reference shape {ref.shape}",
            )
    spacing_mm = metrics.check_spacing(spacing, 3)
    thresholds = _check_iou_thresholds(iou_thresholds)
    if connectivity not in _CONNECTIVITIES:
        raise VolsegError(None, f"connectivity must be one of {_CONNECTIVITIES}, got {connectivity}")
    min_volume = float(min_volume_mm3)
    if not (math.isfinite(min_volume) and min_volume >= 0):
        raise VolsegError(None, f"min_volume_mm3 must be a finite number >= 0, got {min_volume_mm3}")
    # Smallest voxel count kept; the relative slack keeps an object exactly at the threshold.
    min_count = max(1, math.ceil(min_volume / math.prod(spacing_mm) * (1 - 1e-9)))
    wanted = [int(label) for label in labels]

    result: dict[int, dict[str, float]] = {}
    for label, where in metrics.label_regions(pred, ref, wanted):
        if where is None:
            result[label] = _object_row(thresholds, _no_objects())
            continue
        pred_ids, n_pred = _objects(pred[where] == label, None, min_count, connectivity)
        ref_mask = ref[where] == label
        instances = None if ref_instances is None else ref_instances[where]
        ref_ids, n_ref = _objects(ref_mask, instances, min_count, connectivity)
        result[label] = _object_row(thresholds, _overlaps(pred_ids, n_pred, ref_ids, n_ref))
    return result


class _Overlaps(NamedTuple):
    """Every overlapping (pred, ref) object pair, and the objects' sizes; ids start at 1."""

    pred_id: np.ndarray  # (n_pairs,)
    ref_id: np.ndarray
    intersection: np.ndarray  # voxels
    pred_size: np.ndarray  # (n_pred + 1,), index 0 unused
    ref_size: np.ndarray  # (n_ref + 1,)


def _no_objects() -> _Overlaps:
    empty = np.zeros(0, dtype=np.int64)
    return _Overlaps(empty, empty, empty, np.zeros(1, np.int64), np.zeros(1, np.int64))


def _objects(
    mask: np.ndarray, instances: np.ndarray | None, min_count: int, connectivity: int
) -> tuple[np.ndarray, int]:
    """(object id map with ids 1..n, 0 elsewhere; n) of one label, small objects removed.

    Objects are the connected components of `mask`, or the distinct non-zero values of
    `instances` inside `mask` when an instance map is given.
    """
    if instances is None:
        ids = cc3d.connected_components(mask, connectivity=connectivity, binary_image=True)
        ids = ids.astype(np.int64, copy=False)
    else:  # voxels of the label with instance id 0 belong to no object
        selected = mask & (instances != 0)
        _, inverse = np.unique(instances[selected], return_inverse=True)
        ids = np.zeros(mask.shape, dtype=np.int64)
        ids[selected] = inverse.ravel() + 1
    sizes = np.bincount(ids.ravel())
    keep = sizes >= min_count
    keep[0] = False
    if keep[1:].all():
        return ids, int(sizes.size - 1)
    new_id = np.cumsum(keep) * keep  # kept objects renumbered 1..n, dropped ones -> 0
    return new_id[ids], int(np.count_nonzero(keep))


def _overlaps(pred_ids: np.ndarray, n_pred: int, ref_ids: np.ndarray, n_ref: int) -> _Overlaps:
    """Pair intersections from one pass over the voxels both sides cover (sparse, no per-object loop)."""
    pred_flat = pred_ids.ravel()
    ref_flat = ref_ids.ravel()
    pred_size = np.bincount(pred_flat, minlength=n_pred + 1)
    ref_size = np.bincount(ref_flat, minlength=n_ref + 1)
    both = (pred_flat > 0) & (ref_flat > 0)
    pair = pred_flat[both] * (n_ref + 1) + ref_flat[both]
    codes, counts = np.unique(pair, return_counts=True)
    return _Overlaps(codes // (n_ref + 1), codes % (n_ref + 1), counts, pred_size, ref_size)


def _object_row(thresholds: tuple[float, ...], overlaps: _Overlaps) -> dict[str, float]:
    """One label's object fields from its pair overlaps."""
    pred_id, ref_id, inter, pred_size, ref_size = overlaps
    n_pred = pred_size.size - 1
    n_ref = ref_size.size - 1
    union = pred_size[pred_id] + ref_size[ref_id] - inter
    iou = inter / np.maximum(union, 1)
    row: dict[str, float] = {"n_ref_objects": float(n_ref), "n_pred_objects": float(n_pred)}
    for t in thresholds:
        above = iou >= t * (1 - 1e-12)  # an IoU equal to t up to rounding counts
        tp = _matched(pred_id[above], ref_id[above], iou[above])
        precision, recall, f1 = detection_scores(tp, n_pred, n_ref)
        row[f"obj_tp@{t:g}"] = float(tp)
        row[f"obj_precision@{t:g}"] = precision
        row[f"obj_recall@{t:g}"] = recall
        row[f"obj_f1@{t:g}"] = f1
    covers_ref = 2 * inter >= ref_size[ref_id]  # pred object holds >= half of the ref object
    covers_pred = 2 * inter >= pred_size[pred_id]  # ref object holds >= half of the pred object
    merging = np.flatnonzero(np.bincount(pred_id[covers_ref]) >= 2)
    row["merged"] = float(merging.size)
    row["merged_ref"] = float(np.unique(ref_id[covers_ref & np.isin(pred_id, merging)]).size)
    row["split"] = float(np.count_nonzero(np.bincount(ref_id[covers_pred]) >= 2))
    return row


def _matched(pred_id: np.ndarray, ref_id: np.ndarray, iou: np.ndarray) -> int:
    """Size of the one-to-one matching of these candidate pairs that maximises the summed IoU.

    Pairs whose objects take part in no other candidate pair match outright; the rest fall
    apart into connected groups of the pair graph, each solved by the Hungarian method on its
    own small dense matrix (one matrix of all objects could need gigabytes).
    """
    if pred_id.size == 0:
        return 0
    pred_deg = np.unique(pred_id, return_inverse=True, return_counts=True)
    ref_deg = np.unique(ref_id, return_inverse=True, return_counts=True)
    alone = (pred_deg[2][pred_deg[1]] == 1) & (ref_deg[2][ref_deg[1]] == 1)
    matched = int(np.count_nonzero(alone))
    if matched == pred_id.size:
        return matched
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = pred_deg[1][~alone]  # compact pred index
    cols = ref_deg[1][~alone]  # compact ref index
    weights = iou[~alone]
    n_rows = pred_deg[0].size
    graph = coo_matrix(
        (np.ones(rows.size), (rows, n_rows + cols)), shape=(n_rows + ref_deg[0].size,) * 2
    )
    group = connected_components(graph, directed=False)[1][rows]
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.diff(group[order], prepend=-1))
    for part in np.split(order, starts[1:]):
        r_values, r = np.unique(rows[part], return_inverse=True)
        c_values, c = np.unique(cols[part], return_inverse=True)
        dense = np.zeros((r_values.size, c_values.size))
        dense[r, c] = weights[part]
        chosen_r, chosen_c = linear_sum_assignment(dense, maximize=True)
        matched += int(np.count_nonzero(dense[chosen_r, chosen_c] > 0))
    return matched


def _check_iou_thresholds(iou_thresholds: Sequence[float]) -> tuple[float, ...]:
    thresholds = tuple(float(t) for t in iou_thresholds)
    if not all(math.isfinite(t) and 0 < t <= 1 for t in thresholds):
        raise VolsegError(None, f"IoU thresholds must lie in (0, 1], got {tuple(iou_thresholds)}")
    names = [f"{t:g}" for t in thresholds]
    if len(set(names)) != len(names):
        raise VolsegError(None, f"IoU thresholds repeat: {tuple(iou_thresholds)}")
    return thresholds


OBJECT_FIELDS = object_fields()  # the fields at the default thresholds, for tables and CSV headers
