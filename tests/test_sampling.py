"""volseg.sampling: patch starts keep their centre, crop_pad against np.pad, full-coverage window grids."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import volseg.sampling as vsampling
from volseg.sampling import crop_pad, gaussian_importance, random_patch_start, sliding_window_grid, window_starts

FAST = settings(max_examples=150, deadline=None)


def test_doctests():
    assert doctest.testmod(vsampling).failed == 0


@st.composite
def shape_patch_centre(draw):
    shape = tuple(draw(st.integers(1, 40)) for _ in range(3))
    patch = tuple(draw(st.integers(1, 48)) for _ in range(3))
    centre = tuple(draw(st.integers(0, s - 1)) for s in shape)
    seed = draw(st.integers(0, 2**32 - 1))
    return shape, patch, centre, seed


@FAST
@given(shape_patch_centre())
def test_patch_around_centre_contains_it(case):
    shape, patch, centre, seed = case
    start = random_patch_start(shape, patch, np.random.default_rng(seed), center=centre)
    assert len(start) == 3
    for s, p, c, size in zip(start, patch, centre, shape):
        assert isinstance(s, int)
        assert s <= c < s + p  # the centre voxel is inside the patch
        if p <= size:
            assert 0 <= s <= size - p  # the patch stays inside the volume when it can
        else:
            assert s <= 0 and s + p >= size  # a patch larger than the volume covers all of it


@FAST
@given(shape_patch_centre())
def test_uniform_patch_start_range(case):
    shape, patch, _, seed = case
    start = random_patch_start(shape, patch, np.random.default_rng(seed))
    for s, p, size in zip(start, patch, shape):
        assert min(0, size - p) <= s <= max(0, size - p)


def test_patch_start_is_reproducible_and_spread():
    shape, patch = (30, 20, 9), (8, 8, 4)
    a = [random_patch_start(shape, patch, np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    starts = np.array([random_patch_start(shape, patch, rng) for _ in range(2000)])
    assert starts.min(axis=0).tolist() == [0, 0, 0]
    assert starts.max(axis=0).tolist() == [22, 12, 5]


def test_patch_start_around_centre_reaches_both_extremes():
    rng = np.random.default_rng(1)
    starts = {random_patch_start((50, 50, 50), (10, 10, 10), rng, center=(25, 3, 48))[:] for _ in range(2000)}
    i, j, k = (sorted({s[a] for s in starts}) for a in range(3))
    assert i == list(range(16, 26))  # 25 - 10 + 1 .. 25
    assert j == list(range(0, 4))  # clipped at the volume start
    assert k == list(range(39, 41))  # 48 - 9 .. 40 = 50 - 10


def reference_crop(array: np.ndarray, start, patch, value) -> np.ndarray:
    """Pad generously with np.pad, then slice: the obvious (slow) way."""
    pad = max(patch) + max(abs(s) for s in start) + max(array.shape[-3:])  # covers start + patch on any side
    widths = [(0, 0)] * (array.ndim - 3) + [(pad, pad)] * 3
    padded = np.pad(array, widths, constant_values=value)
    index = tuple(slice(s + pad, s + pad + p) for s, p in zip(start, patch))
    return padded[(..., *index)]


@st.composite
def crop_case(draw):
    lead = draw(st.sampled_from([(), (1,), (2,)]))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(3))
    patch = tuple(draw(st.integers(1, 12)) for _ in range(3))
    start = tuple(draw(st.integers(-p - 3, size + 3)) for p, size in zip(patch, shape))
    value = draw(st.sampled_from([0, -1, 7]))
    return lead, shape, patch, start, value


@FAST
@given(crop_case())
def test_crop_pad_matches_padded_slice(case):
    lead, shape, patch, start, value = case
    array = np.arange(int(np.prod(lead + shape)), dtype=np.int32).reshape(lead + shape) + 100
    out = crop_pad(array, start, patch, value=value)
    assert out.shape == lead + patch
    assert out.dtype == array.dtype
    np.testing.assert_array_equal(out, reference_crop(array, start, patch, value))


def test_crop_pad_float_channels():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    out = crop_pad(image, (-2, 3, 1), (6, 6, 4), value=np.nan)
    assert out.shape == (2, 6, 6, 4)
    np.testing.assert_array_equal(out[:, 2:, :4, :2], image[:, :4, 3:, 1:])
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, :, 4:]).all() and np.isnan(out[..., 2:]).all()
    # the input is not modified and the output is not a view of it
    out[:, 2:, :4, :2] = 0
    assert image[0, 0, 3, 1] != 0


@FAST
@given(
    size=st.integers(1, 300),
    patch=st.integers(1, 80),
    overlap=st.floats(0.0, 0.9),
)
def test_window_starts_cover_axis_with_overlap(size, patch, overlap):
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0
    if size <= patch:
        assert starts == [0]
        return
    assert starts[-1] == size - patch
    assert all(isinstance(s, int) for s in starts)
    steps = np.diff(starts)
    assert (steps > 0).all()
    # neighbours overlap by at least the requested fraction (a step of 1 is the most any grid can do)
    for step in steps:
        assert patch - step >= overlap * patch - 1e-9 or step == 1
    covered = np.zeros(size, dtype=bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()
    # and no more windows than needed: with one window fewer the even step would be too long
    if len(starts) > 2:
        assert (size - patch) / (len(starts) - 2) > max(1, math.floor(patch * (1 - overlap)))


def test_window_starts_known():
    assert window_starts(100, 64, 0.5) == [0, 18, 36]
    assert window_starts(64, 64, 0.5) == [0]
    assert window_starts(20, 16, 0.5) == [0, 4]
    assert window_starts(10, 4, 0.0) == [0, 3, 6]  # 3 windows of 4 cover 10 (12 >= 10)


def test_sliding_window_grid_count_and_corners():
    grid = sliding_window_grid((100, 40, 20), (64, 40, 16), 0.5)
    assert len(grid) == 3 * 1 * 2
    assert grid[0] == (0, 0, 0)
    assert grid[-1] == (36, 0, 4)
    assert len(set(grid)) == len(grid)
    shape, patch = (23, 17, 9), (8, 6, 4)
    grid = sliding_window_grid(shape, patch, 0.25)
    expected = 1
    for s, p in zip(shape, patch):
        expected *= len(window_starts(s, p, 0.25))
    assert len(grid) == expected
    covered = np.zeros(shape, dtype=bool)
    for i, j, k in grid:
        covered[i : i + patch[0], j : j + patch[1], k : k + patch[2]] = True
    assert covered.all()


@pytest.mark.parametrize("patch", [(9, 7, 5), (8, 12, 4), (1, 3, 2)])
def test_gaussian_importance(patch):
    w = gaussian_importance(patch)
    assert w.shape == patch
    assert w.dtype == np.float32
    assert (w > 0).all()
    assert w.max() == pytest.approx(1.0)
    # symmetric under flipping each axis
    for axis in range(3):
        np.testing.assert_allclose(w, np.flip(w, axis=axis), rtol=1e-6)
    # the peak is at the centre: the middle voxel (odd) or the two middle voxels (even) of each axis
    centre = tuple(slice((p - 1) // 2, p // 2 + 1) for p in patch)
    assert np.all(w[centre] == w.max())
    # decreasing away from the centre along an axis through it
    line = w[:, (patch[1] - 1) // 2, (patch[2] - 1) // 2]
    half = line[: (patch[0] + 1) // 2]
    assert np.all(np.diff(half) >= 0)


def test_gaussian_importance_floor():
    w = gaussian_importance((33, 33, 33))
    assert w.min() == pytest.approx(1e-3)
    assert w[16, 16, 16] == 1.0
    assert w[0, 16, 16] < w[8, 16, 16] < w[12, 16, 16] < 1.0
