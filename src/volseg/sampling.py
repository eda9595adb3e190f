"""Where patches come from: training patch positions, crop-with-padding, and the sliding-window grid.

Pure numpy on index arithmetic, shared by training (random patches) and inference (window grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_patch_start(
    shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator, center: Sequence[int] | None = None,
    inner: float = 0.0,
) -> tuple[int, ...]:
    """Start corner of a random patch; if `center` is given the patch contains that voxel.

    With `inner` > 0 the voxel lies at least `inner` of the patch away from its faces (0.25: in the
    central half) where the volume allows, so that rotation and zoom about the patch centre cannot carry a small object out
    of an augmented patch. Starts may be negative or run past the end when the volume is smaller
    than the patch; `crop_pad` pads those parts.

    >>> random_patch_start((10, 10, 10), (10, 10, 10), np.random.default_rng(0))
    (0, 0, 0)
    >>> random_patch_start((100, 100, 100), (9, 9, 9), np.random.default_rng(0), (50, 50, 50), inner=0.5)
    (46, 46, 46)
    """
    starts = []
    for axis, (size, p) in enumerate(zip(shape, patch)):
        if center is None:
            lo, hi = min(0, size - p), max(0, size - p)
        else:
            c = int(center[axis])
            m = min(int(inner * p), (p - 1) // 2)
            # keep the centre inside the patch (`m` voxels from its faces) and, where possible, the patch inside the volume
            lo = max(c - p + 1 + m, min(0, size - p))
            hi = min(c - m, max(0, size - p))
            if lo > hi:  # near the volume's edge: staying inside the volume beats the margin
                lo, hi = max(c - p + 1, min(0, size - p)), min(c, max(0, size - p))
            if lo > hi:
                lo = hi = c - p // 2
        starts.append(int(rng.integers(lo, hi + 1)))
    return tuple(starts)


def crop_pad(array: np.ndarray, start: Sequence[int], patch: Sequence[int], value: float = 0) -> np.ndarray:
    """Cut `patch` voxels from the trailing three axes at `start`, padding outside with `value`.

    >>> crop_pad(np.arange(4).reshape(1, 1, 4), (0, 0, 2), (1, 1, 4)).tolist()
    [[[2, 3, 0, 0]]]
    """
    lead = array.shape[:-3]
    out = np.full((*lead, *patch), value, dtype=array.dtype)
    src, dst = [], []
    for s, p, size in zip(start, patch, array.shape[-3:]):
        a, b = max(s, 0), min(s + p, size)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[(..., *dst)] = array[(..., *src)]
    return out


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spread starts of windows of `patch` covering `size`, neighbours overlapping by >= `overlap`.

    >>> window_starts(100, 64, 0.5)
    [0, 18, 36]
    >>> window_starts(40, 64, 0.5)
    [0]
    """
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    n = int(np.ceil((size - patch) / step)) + 1
    return [int(round(i * (size - patch) / (n - 1))) for i in range(n)]


def sliding_window_grid(
    shape: Sequence[int], patch: Sequence[int], overlap: float
) -> list[tuple[int, int, int]]:
    """All window start corners for a volume at least as large as `patch` on every axis."""
    axes = [window_starts(s, p, overlap) for s, p in zip(shape, patch)]
    return [(i, j, k) for i in axes[0] for j in axes[1] for k in axes[2]]


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Blending weights peaking at the window centre (sigma = patch * sigma_scale), min > 0.

    Window borders see less context, so their predictions count less where windows overlap.
    """
    axes = []
    for p in patch:
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2
        sigma = max(p * sigma_scale, 1e-6)
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w /= w.max()
    return np.maximum(w, 1e-3).astype(np.float32)
