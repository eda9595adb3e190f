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

TIE_SLACK = 1e-9  # docs/metrics.md: a distance equal to the NSD tolerance up to rounding is within


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a 6-neighbour outside the mask, by explicit shifts."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            shifted = np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
            inner &= shifted
    return mask & ~inner


def brute_directed(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred->ref, ref->pred) from all pairwise distances."""
    pred_pts = np.argwhere(brute_surface(pred)) * np.asarray(spacing)
    ref_pts = np.argwhere(brute_surface(ref)) * np.asarray(spacing)
    pairwise = cdist(pred_pts, ref_pts)
    return pairwise.min(axis=1), pairwise.min(axis=0)


def brute_hd(pred: np.ndarray, ref: np.ndarray, spacing, percentile: float) -> float:
    """Symmetric percentile surface distance from all pairwise distances (quadratic, tiny only)."""
    to_ref, to_pred = brute_directed(pred, ref, spacing)
    return max(float(np.percentile(to_ref, percentile)), float(np.percentile(to_pred, percentile)))


def brute_surface_metrics(pred, ref, spacing, tolerance_mm: float) -> dict[str, float]:
    to_ref, to_pred = brute_directed(pred, ref, spacing)
    both = np.concatenate([to_ref, to_pred])
    return {
        "hd": max(to_ref.max(), to_pred.max()),
        "hd95": max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)),
        "assd": both.mean(),
        "nsd": np.mean(both <= tolerance_mm * (1 + TIE_SLACK)),
    }


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
    assert one["vol_diff_mm3"] == pytest.approx(1 * 2.0 * 1.0 * 0.5)
    assert one["vol_diff_rel"] == pytest.approx(1 / 4)
    for only_one in (rows[2], rows[3]):
        assert only_one["dice"] == only_one["jaccard"] == only_one["nsd"] == 0.0
        assert only_one["precision"] == only_one["recall"] == 0.0
        assert only_one["hd"] == only_one["hd95"] == only_one["assd"] == pytest.approx(diagonal)
    assert (rows[2]["n_pred"], rows[2]["n_ref"]) == (1.0, 0.0)
    assert rows[2]["vol_diff_mm3"] == pytest.approx(1.0) and rows[2]["vol_diff_rel"] == 3 * 4 * 5
    assert rows[3]["vol_diff_mm3"] == pytest.approx(-2.0) and rows[3]["vol_diff_rel"] == -1.0
    assert rows[7] == {
        "dice": 1.0, "jaccard": 1.0, "precision": 1.0, "recall": 1.0,
        "hd": 0.0, "hd95": 0.0, "assd": 0.0, "nsd": 1.0,
        "vol_diff_mm3": 0.0, "vol_diff_rel": 0.0, "n_ref": 0.0, "n_pred": 0.0,
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
    assert row["assd"] == pytest.approx(expected)
    assert row["nsd"] == 0.0
    assert metrics.hausdorff(pred == 1, ref == 1, spacing) == pytest.approx(expected)
    near = metrics.compute(pred, ref, spacing, labels=[1], nsd_tolerance_mm=expected)[1]
    assert near["nsd"] == 1.0  # a distance equal to the tolerance is within it


def test_nsd_tie_at_the_tolerance_is_not_left_to_rounding():
    pred = np.zeros((6, 2, 2), dtype=np.uint8)
    ref = np.zeros_like(pred)
    pred[1, 0, 0] = ref[4, 0, 0] = 1  # 3 x 0.1 mm, which floats make 0.30000000000000004
    row = metrics.compute(pred, ref, (0.1, 1.0, 1.0), labels=[1], nsd_tolerance_mm=0.3)[1]
    assert row["hd"] > 0.3 and row["nsd"] == 1.0
    row = metrics.compute(pred, ref, (0.1, 1.0, 1.0), labels=[1], nsd_tolerance_mm=0.2999)[1]
    assert row["nsd"] == 0.0


def test_identical_masks_have_zero_distance_and_perfect_overlap():
    seg = np.zeros((6, 5, 4), dtype=np.int32)
    seg[1:5, 1:4, 1:3] = 2
    row = metrics.compute(seg, seg.copy(), (1.0, 1.0, 3.0), labels=[2], nsd_tolerance_mm=0.0)[2]
    assert row["dice"] == row["jaccard"] == row["precision"] == row["recall"] == 1.0
    assert row["hd"] == row["hd95"] == row["assd"] == 0.0
    assert row["nsd"] == 1.0 and row["vol_diff_mm3"] == row["vol_diff_rel"] == 0.0


def test_shifted_block_distances_use_the_shifted_axis_spacing():
    ref = np.zeros((9, 7, 8), dtype=np.uint8)
    ref[2:6, 2:5, 2:6] = 1
    pred = np.roll(ref, 2, axis=2)  # two voxels along axis 2, 0.4 mm each
    spacing = (3.0, 2.0, 0.4)
    row = metrics.compute(pred, ref, spacing, labels=[1], nsd_tolerance_mm=0.5)[1]
    assert row["hd"] == pytest.approx(0.8)
    assert row["dice"] == pytest.approx(2 / 4)
    # The 4x3x4 block has 4*3*4 - 2*1*2 = 44 surface voxels. Shifted by two along K, the side
    # walls (K = 4, 5 of pred / K = 2, 3 of ref) coincide with the other block's surface.
    to_ref, to_pred = metrics.surface_distances(pred == 1, ref == 1, spacing)
    assert to_ref.size == to_pred.size == 44
    np.testing.assert_allclose(np.sort(to_ref), np.sort(to_pred))
    np.testing.assert_allclose(to_ref, brute_directed(pred == 1, ref == 1, spacing)[0])
    assert row["assd"] == pytest.approx(float(np.mean(to_ref)))
    assert row["nsd"] == pytest.approx(np.mean(to_ref <= 0.5))
    assert row["vol_diff_mm3"] == 0.0


def test_dice_helper_and_empty_convention():
    a = np.array([[[1, 1, 0, 1]]], dtype=bool)
    b = np.array([[[1, 0, 0, 0]]], dtype=bool)
    assert metrics.dice(a, b) == pytest.approx(2 * 1 / (3 + 1))
    empty = np.zeros((2, 2, 2), dtype=bool)
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.hausdorff(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    full = ~empty
    assert metrics.hausdorff(full, empty, (1.0, 2.0, 2.0)) == pytest.approx(6.0)
    with pytest.raises(VolsegError, match="non-empty"):
        metrics.surface_distances(full, empty, (1.0, 1.0, 1.0))


def test_errors():
    with pytest.raises(VolsegError, match="shape"):
        metrics.compute(np.zeros((3, 4, 5), int), np.zeros((3, 4, 6), int), (1, 1, 1), [1])
    with pytest.raises(VolsegError, match="spacing"):
        metrics.compute(np.zeros((3, 4, 5), int), np.zeros((3, 4, 5), int), (1, 1), [1])
    with pytest.raises(VolsegError, match="integer"):
        metrics.compute(np.zeros((3, 4, 5)), np.zeros((3, 4, 5)), (1, 1, 1), [1])
    with pytest.raises(VolsegError, match="NSD tolerance"):
        metrics.compute(np.zeros((3, 4, 5), int), np.zeros((3, 4, 5), int), (1, 1, 1), [1], -1.0)
    with pytest.raises(VolsegError, match="shapes differ"):
        metrics.dice(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))
    with pytest.raises(VolsegError, match="shapes differ"):
        metrics.hausdorff(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool), (1, 1, 1))
    with pytest.raises(VolsegError, match="percentile"):
        metrics.hausdorff(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), (1, 1, 1), 101)
    with pytest.raises(VolsegError, match="scalar"):
        metrics.compute(np.int64(1), np.int64(1), (), [1])
    with pytest.raises(VolsegError, match="scalar"):
        metrics.hausdorff(np.bool_(True), np.bool_(True), ())
    nothing = np.zeros((0, 3, 2), np.uint8)
    assert metrics.compute(nothing, nothing, (1, 1, 1), [1])[1]["dice"] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)),
    offset=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    spacing=st.tuples(*[st.floats(0.2, 4.0, allow_nan=False)] * 3),
    density=st.floats(0.02, 0.7),
    tolerance_pick=st.floats(0.0, 1.0),
)
def test_surface_metrics_match_brute_force(seed, shape, offset, spacing, density, tolerance_pick):
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
    # Tolerances on an actual distance test the tie rule; others fall between distances.
    to_ref, to_pred = brute_directed(pred == 3, ref == 3, spacing)
    distances = np.concatenate([to_ref, to_pred])
    tolerance = float(np.quantile(distances, tolerance_pick, method="nearest"))
    if seed % 2:
        tolerance += 0.01

    row = metrics.compute(pred, ref, spacing, labels=[3], nsd_tolerance_mm=tolerance)[3]
    expected = brute_surface_metrics(pred == 3, ref == 3, spacing, tolerance)
    for name in ("hd", "hd95", "assd", "nsd"):
        assert row[name] == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name
    assert metrics.hausdorff(pred == 3, ref == 3, spacing, percentile=95.0) == row["hd95"]
    ours = metrics.surface_distances(pred == 3, ref == 3, spacing)
    np.testing.assert_allclose(ours[0], to_ref, rtol=1e-12)  # same voxel order (C order)
    np.testing.assert_allclose(ours[1], to_pred, rtol=1e-12)
    tp = np.count_nonzero(pred_small & ref_small)
    assert row["dice"] == pytest.approx(2 * tp / (pred_small.sum() + ref_small.sum()))
    assert row["n_pred"] == pred_small.sum() and row["n_ref"] == ref_small.sum()
    voxel_mm3 = math.prod(spacing)
    assert row["vol_diff_mm3"] == pytest.approx((pred_small.sum() - ref_small.sum()) * voxel_mm3)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    spacing=st.tuples(*[st.floats(0.2, 4.0, allow_nan=False)] * 3),
    layout=st.sampled_from(["F", "transposed", "strided"]),
    dtype=st.sampled_from([np.uint8, np.int16, np.int64, np.bool_]),
)
def test_any_memory_layout_gives_the_c_order_values_bit_for_bit(seed, shape, spacing, layout, dtype):
    """Fortran-ordered arrays (nibabel's), transposed and strided views are reduced along their
    memory layout, and give exactly the values of the same masks in C order."""
    rng = np.random.default_rng(seed)
    pred = (rng.random(shape) < 0.3).astype(dtype)
    ref = (rng.random(shape) < 0.3).astype(dtype)
    expected = metrics.compute(pred, ref, spacing, labels=[1])
    if layout == "F":
        views = np.asfortranarray(pred), np.asfortranarray(ref)
    elif layout == "transposed":  # a C array of the axes (2, 0, 1), seen as (I, J, K)
        views = (np.ascontiguousarray(pred.transpose(2, 0, 1)).transpose(1, 2, 0),
                 np.ascontiguousarray(ref.transpose(2, 0, 1)).transpose(1, 2, 0))
    else:  # every other voxel of a twice larger array
        big_pred, big_ref = (np.zeros(tuple(2 * n for n in shape), dtype) for _ in range(2))
        big_pred[::2, ::2, ::2], big_ref[::2, ::2, ::2] = pred, ref
        views = big_pred[::2, ::2, ::2], big_ref[::2, ::2, ::2]
    assert metrics.compute(*views, spacing, labels=[1]) == expected
    box = metrics.nonzero_box(*views)
    nonzero = np.argwhere((pred != 0) | (ref != 0))
    if nonzero.size == 0:
        assert box is None
    else:
        assert box == tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(nonzero.min(0), nonzero.max(0)))


@pytest.mark.parametrize("one_offset_at_a_time", [False, True])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (0.3, 5.0, 0.7)])
def test_far_surfaces_take_the_tree_and_stay_exact(spacing, one_offset_at_a_time, monkeypatch):
    """Distances beyond the looked-up offsets (a far false positive, a shifted organ)."""
    if one_offset_at_a_time:  # the path that large surfaces (many pending voxels) take
        monkeypatch.setattr(metrics, "_BLOCK_LOOKUPS", 1)
    rng = np.random.default_rng(7)
    shape = (23, 41, 37)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[3:9, 4:15, 5:14] = 1
    ref[rng.random(shape) < 0.002] = 1  # scattered specks: many small, near and far surfaces
    pred = np.roll(ref, (1, 2, -1), axis=(0, 1, 2))
    pred[3:20, 30:38, 28:35] = 1  # a false positive far from everything
    pred[20:22, 1:3, 30:33] = 2
    ref[1:3, 37:40, 2:5] = 2  # label 2: two specks at opposite corners, nothing near
    rows = metrics.compute(pred, ref, spacing, labels=[1, 2])
    for label in (1, 2):
        expected = brute_surface_metrics(pred == label, ref == label, spacing, 1.0)
        for name in ("hd", "hd95", "assd", "nsd"):
            assert rows[label][name] == pytest.approx(expected[name], rel=1e-12), (label, name)


def test_labels_share_one_crop_but_are_scored_alone():
    rng = np.random.default_rng(3)
    shape = (13, 17, 11)
    pred = rng.integers(0, 4, shape).astype(np.int16)
    ref = rng.integers(0, 4, shape).astype(np.int16)
    pred[:2] = ref[:2] = 0
    pred[5, 5, 5] = ref[6, 6, 6] = -1  # negative labels count as foreground too
    spacing = (1.3, 0.6, 2.2)
    together = metrics.compute(pred, ref, spacing, labels=[1, 2, 3, -1, 9])
    for label in (1, 2, 3, -1, 9):
        alone = metrics.compute(
            (pred == label).astype(np.uint8), (ref == label).astype(np.uint8), spacing, [1]
        )[1]
        assert together[label] == pytest.approx(alone, rel=1e-12)
    assert together[-1]["hd"] == pytest.approx(math.sqrt(1.3**2 + 0.6**2 + 2.2**2))
    fortran = metrics.compute(np.asfortranarray(pred), np.asfortranarray(ref), spacing, [1, 2])
    assert fortran == {1: together[1], 2: together[2]}
    positive = metrics.compute(pred, ref, spacing, labels=[1, 2, 3, 9, 4])  # arrays hold -1
    assert all(positive[v] == together[v] for v in (1, 2, 3, 9))
    # Many non-negative labels take one find_objects pass for all label boxes: same numbers.
    pred[pred < 0] = 0
    ref[ref < 0] = 0
    pred[8:, 10:, 6:] = np.where(pred[8:, 10:, 6:] == 2, 5, pred[8:, 10:, 6:])
    ref[9:, 12:, 3:] = np.where(ref[9:, 12:, 3:] == 3, 5, ref[9:, 12:, 3:])
    ref[4:6, 0:2, 9:11] = 6
    many = [1, 2, 3, 4, 5, 6, 300]
    for arrays in ((pred, ref), (pred.astype(np.uint8), ref.astype(np.uint16))):
        rows = metrics.compute(*arrays, spacing, labels=many)
        for label in many:
            alone = metrics.compute(
                (pred == label).astype(np.uint8), (ref == label).astype(np.uint8), spacing, [1]
            )[1]
            assert rows[label] == pytest.approx(alone, rel=1e-12), label


def test_background_and_large_label_values_take_the_generic_path():
    ref = np.zeros((4, 3, 5), dtype=np.int16)
    ref[1:3, 1, 1:4] = 5000
    pred = ref.copy()
    pred[1, 1, 1] = 0
    rows = metrics.compute(pred, ref, (1.0, 1.0, 1.0), labels=[0, 5000])
    assert rows[5000]["dice"] == pytest.approx(2 * 5 / 11)
    n_background = ref.size - 6
    assert rows[0]["dice"] == pytest.approx(2 * n_background / (2 * n_background + 1))
    assert rows[0]["hd"] == pytest.approx(1.0)
    small = metrics.compute(pred.astype(np.uint8) * 0, ref.astype(np.uint8) * 0, (1, 1, 1), [300])
    assert small[300]["dice"] == 1.0  # a value the dtype cannot hold: both empty


def test_two_dimensional_masks_work_too():
    pred = np.zeros((6, 9), bool)
    ref = np.zeros((6, 9), bool)
    pred[1:4, 1:5] = True
    ref[2:5, 2:8] = True
    spacing = (1.5, 0.5)
    to_ref, to_pred = metrics.surface_distances(pred, ref, spacing)
    pred[2, 2:4] = False  # drop the voxels with all four neighbours inside: the rest is surface
    ref[3, 3:7] = False
    pts_pred = np.argwhere(pred) * spacing
    pts_ref = np.argwhere(ref) * spacing
    np.testing.assert_allclose(to_ref, cdist(pts_pred, pts_ref).min(axis=1))
    np.testing.assert_allclose(to_pred, cdist(pts_pred, pts_ref).min(axis=0))
