"""Clean a predicted label map by its connected components, as pure functions.

Both functions label all selected classes in one `cc3d.connected_components` pass (voxels of
different label values never join one component) and never modify their input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import cc3d
import numpy as np

from volseg.errors import VolsegError

_CONNECTIVITIES = (6, 18, 26)


def remove_small_components(
    seg: np.ndarray,
    min_voxels: int = 0,
    min_volume_mm3: float = 0.0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    labels: Iterable[int] | None = None,
    connectivity: int = 26,
) -> np.ndarray:
    """Set to 0 each component smaller than `min_voxels` or than `min_volume_mm3`.

    `seg` is an integer label array of shape (I, J, K); `labels` limits the cleaning to those
    values (default: every non-zero value). A component exactly at a threshold is kept. The
    volume of a component is its voxel count times ``prod(spacing)``.

    >>> seg = np.zeros((1, 1, 7), dtype=np.uint8); seg[0, 0, :3] = 1; seg[0, 0, 5] = 1
    >>> remove_small_components(seg, min_voxels=2)[0, 0].tolist()
    [1, 1, 1, 0, 0, 0, 0]
    """
    seg = _check_seg(seg)
    spacing_mm = tuple(float(s) for s in spacing)
    if len(spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise VolsegError(None, f"spacing must be 3 positive finite numbers (mm), got {spacing}")
    if min_voxels < 0 or not min_volume_mm3 >= 0:
        raise VolsegError(
            None,
            f"thresholds must be >= 0, got min_voxels={min_voxels}, "
            f"min_volume_mm3={min_volume_mm3}",
        )
    voxel_mm3 = math.prod(spacing_mm)
    # The smallest voxel count that passes both thresholds; the tiny relative tolerance keeps
    # a component whose volume equals the threshold up to rounding (e.g. 1000 * 0.1**3).
    min_count = max(int(min_voxels), math.ceil(float(min_volume_mm3) / voxel_mm3 * (1 - 1e-9)))
    out = seg.copy()
    if min_count <= 1:
        return out
    components, sizes, _ = _components(seg, labels, connectivity)
    too_small = sizes < min_count
    too_small[0] = False  # background / unselected labels
    out[too_small[components]] = 0
    return out


def keep_largest_component(
    seg: np.ndarray, labels: Iterable[int] | None = None, connectivity: int = 26
) -> np.ndarray:
    """Keep only the largest component of each label (default: every non-zero label).

    Of equally large components the one found first in C (row-major) order is kept.

    >>> seg = np.array([[[1, 0, 1, 1, 0, 2, 0, 2]]], dtype=np.uint8)
    >>> keep_largest_component(seg)[0, 0].tolist()
    [0, 0, 1, 1, 0, 2, 0, 0]
    """
    seg = _check_seg(seg)
    components, sizes, component_labels = _components(seg, labels, connectivity)
    keep = np.zeros(sizes.shape, dtype=bool)
    keep[0] = True  # background / unselected labels stay as they are
    if sizes.size > 1:
        ids = np.arange(1, sizes.size)
        # Sort by label, then by size descending, then by id: the first of each label wins.
        order = np.lexsort((ids, -sizes[1:], component_labels[1:]))
        sorted_labels = component_labels[1:][order]
        first_of_label = np.ones(order.size, dtype=bool)
        first_of_label[1:] = sorted_labels[1:] != sorted_labels[:-1]
        keep[ids[order[first_of_label]]] = True
    out = seg.copy()
    out[~keep[components]] = 0
    return out


def _components(
    seg: np.ndarray, labels: Iterable[int] | None, connectivity: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(component ids, size per id, label per id) over the selected labels; id 0 = not selected."""
    if connectivity not in _CONNECTIVITIES:
        raise VolsegError(None, f"connectivity must be one of {_CONNECTIVITIES}, got {connectivity}")
    if labels is None:
        selected = seg
    else:
        wanted = np.array(sorted({int(v) for v in labels} - {0}), dtype=np.int64)
        selected = np.where(np.isin(seg, wanted), seg, 0).astype(seg.dtype, copy=False)
    components = cc3d.connected_components(selected, connectivity=connectivity)
    flat = components.ravel()
    sizes = np.bincount(flat)
    component_labels = np.zeros(sizes.size, dtype=np.int64)
    component_labels[flat] = selected.ravel()
    return components, sizes, component_labels


def _check_seg(seg: np.ndarray) -> np.ndarray:
    seg = np.asarray(seg)
    if seg.ndim != 3:
        raise VolsegError(
            None,
            f"expected a label array of shape (I, J, K), got shape {seg.shape}",
            "drop the channel axis first (seg[0])",
        )
    if not (np.issubdtype(seg.dtype, np.integer) or seg.dtype == bool):
        raise VolsegError(None, f"expected an integer label array, got dtype {seg.dtype}")
    return seg
