"""Metrics against hand-computed values and a brute-force pairwise-distance reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from volseg import metrics
from volseg.errors import VolsegError


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a 6-neighbour outside the mask, by explicit shifts."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            shifted = np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
            inner &= shifted
    return mask & ~inner


def brute_hd(pred: np.ndarray, ref: np.ndarray, spacing, percentile: float) -> float:
    """Symmetric percentile surface distance from all pairwise distances (quadratic, tiny only)."""
    pred_pts = np.argwhere(brute_surface(pred)) * np.asarray(spacing)
    ref_pts = np.argwhere(brute_surface(ref)) * np.asarray(spacing)
    pairwise = cdist(pred_pts, ref_pts)
    return max(
        float(np.percentile(pairwise.min(axis=1), percentile)),
        float(np.percentile(pairwise.min(axis=0), percentile)),
    )


def test_overlap_metrics_by_hand():
    shape = (3, 4, 5)
    pred = np.zeros(shape, dtype=np.int16)
    ref = np.zeros(shape, dtype=np.int16)
    # label 1: ref 4 voxels, pred 5 voxels, 3 shared -> TP=3, FP=2, FN=1
    ref[0, 0, 0:4] = 1
    pred[0, 0, 1:4] = 1
    pred[2, 3, 3:5] = 1
    # label 2: only in pred (1 voxel); label 3: only in ref (2 voxels)
    pred[1, 2, 2] = 2
    ref[2, 0, 0:2] = 3
    rows = metrics.compute(pred, ref, spacing=(2.0, 1.0, 0.5), labels=[1, 2, 3, 7])
    one = rows[1]
    assert one["dice"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert one["jaccard"] == pytest.approx(3 / 6)
    assert one["precision"] == pytest.approx(3 / 5)
    assert one["recall"] == pytest.approx(3 / 4)
    assert (one["n_ref"], one["n_pred"]) == (4.0, 5.0)
    diagonal = math.sqrt((3 * 2.0) ** 2 + (4 * 1.0) ** 2 + (5 * 0.5) ** 2)
    for only_one in (rows[2], rows[3]):
        assert only_one["dice"] == only_one["jaccard"] == 0.0
        assert only_one["precision"] == only_one["recall"] == 0.0
        assert only_one["hd"] == only_one["hd95"] == pytest.approx(diagonal)
    assert (rows[2]["n_pred"], rows[2]["n_ref"]) == (1.0, 0.0)
    assert rows[7] == {
        "dice": 1.0, "jaccard": 1.0, "precision": 1.0, "recall": 1.0,
        "hd": 0.0, "hd95": 0.0, "n_ref": 0.0, "n_pred": 0.0,
    }
    for row in rows.values():
        assert set(row) == set(metrics.FIELDS)
        assert all(type(v) is float for v in row.values())


def test_single_voxels_at_known_anisotropic_distance():
    pred = np.zeros((5, 3, 6), dtype=np.uint8)
    ref = np.zeros_like(pred)
    pred[1, 0, 1] = 1
    ref[4, 2, 5] = 1
    spacing = (0.7, 2.5, 1.2)
    expected = math.sqrt((3 * 0.7) ** 2 + (2 * 2.5) ** 2 + (4 * 1.2) ** 2)
    row = metrics.compute(pred, ref, spacing, labels=[1])[1]
    assert row["hd"] == pytest.approx(expected)
    assert row["hd95"] == pytest.approx(expected)
    assert metrics.hausdorff(pred == 1, ref == 1, spacing) == pytest.approx(expected)


def test_identical_masks_have_zero_distance_and_perfect_overlap():
    seg = np.zeros((6, 5, 4), dtype=np.int32)
    seg[1:5, 1:4, 1:3] = 2
    row = metrics.compute(seg, seg.copy(), (1.0, 1.0, 3.0), labels=[2])[2]
    assert row["dice"] == row["jaccard"] == row["precision"] == row["recall"] == 1.0
    assert row["hd"] == row["hd95"] == 0.0


def test_shifted_block_hausdorff_uses_the_shifted_axis_spacing():
    ref = np.zeros((9, 7, 8), dtype=np.uint8)
    ref[2:6, 2:5, 2:6] = 1
    pred = np.roll(ref, 2, axis=2)  # two voxels along axis 2, 0.4 mm each
    row = metrics.compute(pred, ref, (3.0, 2.0, 0.4), labels=[1])[1]
    assert row["hd"] == pytest.approx(0.8)
    assert row["dice"] == pytest.approx(2 / 4)


def test_dice_helper_and_empty_convention():
    a = np.array([[[1, 1, 0, 1]]], dtype=bool)
    b = np.array([[[1, 0, 0, 0]]], dtype=bool)
    assert metrics.dice(a, b) == pytest.approx(2 * 1 / (3 + 1))
    empty = np.zeros((2, 2, 2), dtype=bool)
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.hausdorff(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    full = ~empty
    assert metrics.hausdorff(full, empty, (1.0, 2.0, 2.0)) == pytest.approx(6.0)


def test_errors():
    with pytest.raises(VolsegError, match="shape"):
        metrics.compute(np.zeros((3, 4, 5), int), np.zeros((3, 4, 6), int), (1, 1, 1), [1])
    with pytest.raises(VolsegError, match="spacing"):
        metrics.compute(np.zeros((3, 4, 5), int), np.zeros((3, 4, 5), int), (1, 1), [1])
    with pytest.raises(VolsegError, match="integer"):
        metrics.compute(np.zeros((3, 4, 5)), np.zeros((3, 4, 5)), (1, 1, 1), [1])
    with pytest.raises(VolsegError, match="shapes differ"):
        metrics.dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
    offset=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    spacing=st.tuples(*[st.floats(0.2, 4.0, allow_nan=False)] * 3),
    density=st.floats(0.05, 0.7),
)
def test_hd_and_hd95_match_brute_force(seed, shape, offset, spacing, density):
    rng = np.random.default_rng(seed)
    pred_small = rng.random(shape) < density
    ref_small = rng.random(shape) < density
    pred_small.flat[rng.integers(pred_small.size)] = True  # both non-empty
    ref_small.flat[rng.integers(ref_small.size)] = True
    # Embed in a larger volume (sometimes flush with its faces) so the cropping is exercised.
    full_shape = tuple(n + o + 1 for n, o in zip(shape, offset))
    where = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    pred = np.zeros(full_shape, dtype=np.int64)
    ref = np.zeros(full_shape, dtype=np.int64)
    pred[where] = np.where(pred_small, 3, 1)  # label 1 fills the rest of the box
    ref[where] = np.where(ref_small, 3, 0)

    row = metrics.compute(pred, ref, spacing, labels=[3])[3]
    assert row["hd"] == pytest.approx(brute_hd(pred == 3, ref == 3, spacing, 100.0), abs=1e-9)
    assert row["hd95"] == pytest.approx(brute_hd(pred == 3, ref == 3, spacing, 95.0), abs=1e-9)
    assert metrics.hausdorff(pred == 3, ref == 3, spacing, percentile=95.0) == pytest.approx(
        row["hd95"]
    )
    tp = np.count_nonzero(pred_small & ref_small)
    assert row["dice"] == pytest.approx(2 * tp / (pred_small.sum() + ref_small.sum()))
    assert row["n_pred"] == pred_small.sum() and row["n_ref"] == ref_small.sum()


def test_background_and_large_label_values_take_the_generic_path():
    ref = np.zeros((4, 3, 5), dtype=np.int16)
    ref[1:3, 1, 1:4] = 5000  # beyond the one-pass bounding-box shortcut
    pred = ref.copy()
    pred[1, 1, 1] = 0
    rows = metrics.compute(pred, ref, (1.0, 1.0, 1.0), labels=[0, 5000])
    assert rows[5000]["dice"] == pytest.approx(2 * 5 / 11)
    n_background = ref.size - 6
    assert rows[0]["dice"] == pytest.approx(2 * n_background / (2 * n_background + 1))
    assert rows[0]["hd"] == pytest.approx(1.0)
