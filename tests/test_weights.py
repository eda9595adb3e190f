"""Weight maps against brute force and known answers: border term in mm, class balance, ignore = 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volseg.errors import VolsegError
from volseg.weights import border_weights, class_balance_weights, instances_from_labels, weight_map

# --------------------------------------------------------------------------------------------------
# helpers


def brute_force_border(
    instances: np.ndarray, spacing_mm: tuple[float, float, float], w0: float, sigma_mm: float
) -> np.ndarray:
    """The definition, literally: pairwise distances from every voxel to every object voxel."""
    coords_mm = np.indices(instances.shape).reshape(3, -1).T * np.asarray(spacing_mm)
    flat = instances.ravel()
    per_object = []
    for object_id in np.unique(flat[flat != 0]):
        voxels = coords_mm[flat == object_id]
        pairwise = np.sqrt(((coords_mm[:, None, :] - voxels[None, :, :]) ** 2).sum(-1))
        per_object.append(pairwise.min(axis=1))
    out = np.zeros(flat.shape)
    if len(per_object) >= 2:
        nearest_two = np.sort(np.stack(per_object, axis=1), axis=1)[:, :2]
        out = w0 * np.exp(-(nearest_two.sum(axis=1) ** 2) / (2 * sigma_mm**2))
        out[flat != 0] = 0
    return out.reshape(instances.shape)


def random_instances(rng: np.random.Generator, shape: tuple[int, int, int], n_objects: int) -> np.ndarray:
    """A few random boxes and scattered voxels per object, with non-consecutive (and huge) ids."""
    ids = rng.choice([1, 3, 7, 40, 255, 1000, 70_000, 2**31 - 5], size=n_objects, replace=False)
    instances = np.zeros(shape, dtype=np.int64)
    for object_id in ids:
        low = [int(rng.integers(0, n - 1)) for n in shape]
        high = [lo + int(rng.integers(1, 4)) for lo in low]
        instances[tuple(slice(lo, hi) for lo, hi in zip(low, high))] = object_id
        scattered = [rng.integers(0, n, size=2) for n in shape]
        instances[tuple(scattered)] = object_id
    return instances


def two_boxes_gap_along(axis: int, gap_vox: int = 1) -> np.ndarray:
    """Two 2-voxel-thick slabs facing each other along `axis` with `gap_vox` background between."""
    shape = [5, 5, 5]
    shape[axis] = 4 + gap_vox
    instances = np.zeros(shape, dtype=np.int32)
    first = [slice(None)] * 3
    first[axis] = slice(0, 2)
    second = [slice(None)] * 3
    second[axis] = slice(2 + gap_vox, None)
    instances[tuple(first)] = 1
    instances[tuple(second)] = 2
    return instances


# --------------------------------------------------------------------------------------------------
# border_weights: brute force


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_objects=st.integers(2, 4),
    sigma_mm=st.floats(0.5, 6.0),
    w0=st.floats(0.5, 20.0),
)
def test_border_weights_match_brute_force(seed: int, n_objects: int, sigma_mm: float, w0: float) -> None:
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in rng.uniform(0.4, 2.5, size=3))
    instances = random_instances(rng, (9, 11, 7), n_objects)
    expected = brute_force_border(instances, spacing, w0, sigma_mm)
    fast = border_weights(instances, spacing, w0=w0, sigma_mm=sigma_mm)
    assert fast.dtype == np.float32 and fast.shape == instances.shape
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-4)
    # A tolerance so small that every crop holds the whole volume: exact up to float32 rounding.
    exact = border_weights(instances, spacing, w0=w0, sigma_mm=sigma_mm, tolerance=1e-30)
    np.testing.assert_allclose(exact, expected, rtol=0, atol=1e-5)


def test_border_weights_with_crops_smaller_than_the_volume_stay_within_tolerance() -> None:
    # sigma 1 mm: cutoff ~5.3 mm, so every object's crop is much smaller than the 30-voxel volume.
    rng = np.random.default_rng(3)
    instances = np.zeros((30, 12, 10), dtype=np.int32)
    for object_id, start in enumerate(range(0, 28, 4), start=1):
        instances[start : start + 3, rng.integers(0, 8) :, : rng.integers(3, 10)] = object_id
    expected = brute_force_border(instances, (1.0, 0.8, 1.5), 10.0, 1.0)
    for tolerance in (1e-2, 1e-5):
        fast = border_weights(instances, (1.0, 0.8, 1.5), w0=10.0, sigma_mm=1.0, tolerance=tolerance)
        assert np.abs(fast - expected).max() < tolerance + 1e-6


# --------------------------------------------------------------------------------------------------
# border_weights: known answers and properties


def test_gap_voxel_between_two_objects_has_the_closed_form_value() -> None:
    instances = two_boxes_gap_along(2, gap_vox=1)
    w = border_weights(instances, (1.0, 1.0, 1.0), w0=10.0, sigma_mm=5.0)
    assert np.allclose(w[:, :, 2], 10 * math.exp(-4 / 50))  # d1 = d2 = 1 mm
    assert np.all(w[instances != 0] == 0)  # object voxels get no border term


def test_spacing_is_used_distances_are_in_mm() -> None:
    instances = two_boxes_gap_along(2, gap_vox=1)
    in_voxels = border_weights(instances, (1.0, 1.0, 1.0), w0=10.0, sigma_mm=5.0)
    in_mm = border_weights(instances, (1.0, 1.0, 3.0), w0=10.0, sigma_mm=5.0)
    assert np.allclose(in_mm[:, :, 2], 10 * math.exp(-36 / 50))  # d1 = d2 = 3 mm
    assert not np.allclose(in_mm, in_voxels)
    # The same gap along the finely sampled axis is unaffected by the coarse one.
    along_i = border_weights(two_boxes_gap_along(0), (1.0, 1.0, 3.0), w0=10.0, sigma_mm=5.0)
    assert np.allclose(along_i[2], 10 * math.exp(-4 / 50))


def test_same_physical_layout_on_two_grids_gives_the_same_map() -> None:
    # Axis-aligned boxes with even z ends (mm): on a 1 mm grid and on a 2 mm grid along K, every
    # distance from a shared voxel centre is the same, so the maps agree where the grids meet.
    boxes_mm = [((0, 3), (0, 4), (0, 6)), ((4, 7), (2, 6), (8, 12)), ((0, 7), (6, 8), (2, 4))]
    fine = np.zeros((8, 9, 15), dtype=np.int32)
    coarse = np.zeros((8, 9, 8), dtype=np.int32)
    for object_id, ((i0, i1), (j0, j1), (k0, k1)) in enumerate(boxes_mm, start=1):
        fine[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] = object_id
        coarse[i0 : i1 + 1, j0 : j1 + 1, k0 // 2 : k1 // 2 + 1] = object_id
    assert np.array_equal(fine[:, :, ::2], coarse)
    w_fine = border_weights(fine, (1.0, 1.0, 1.0), w0=10.0, sigma_mm=3.0)
    w_coarse = border_weights(coarse, (1.0, 1.0, 2.0), w0=10.0, sigma_mm=3.0)
    np.testing.assert_allclose(w_fine[:, :, ::2], w_coarse, rtol=0, atol=3e-5)
    assert w_coarse.max() > 1  # the comparison is not between two empty maps


def test_mirrored_input_gives_mirrored_map() -> None:
    instances = random_instances(np.random.default_rng(5), (9, 11, 7), 3)
    spacing = (0.7, 1.3, 2.0)
    w = border_weights(instances, spacing, sigma_mm=2.0)
    mirrored = border_weights(instances[::-1, :, ::-1], spacing, sigma_mm=2.0)
    np.testing.assert_allclose(mirrored, w[::-1, :, ::-1], rtol=0, atol=1e-5)


def test_objects_symmetric_about_a_plane_give_a_symmetric_map() -> None:
    instances = np.zeros((13, 8, 6), dtype=np.int32)
    instances[1:5, 2:7, 0:4] = 4
    instances[3:6, 0:2, 3:6] = 4
    instances[::-1][1:5, 2:7, 0:4] = 9  # the mirror image of object 4 about the plane i = 6
    instances[::-1][3:6, 0:2, 3:6] = 9
    w = border_weights(instances, (0.8, 1.0, 1.7), sigma_mm=3.0)
    np.testing.assert_allclose(w, w[::-1], rtol=0, atol=1e-5)
    assert w.max() > 0


def test_fewer_than_two_objects_give_no_border_term() -> None:
    instances = np.zeros((6, 5, 4), dtype=np.uint16)
    assert not border_weights(instances, (1, 1, 1)).any()
    instances[1:3, 1:3, 1:3] = 12
    instances[4, 4, 3] = 12  # one object in two pieces is still one object
    assert not border_weights(instances, (1, 1, 1)).any()
    assert not border_weights(two_boxes_gap_along(1), (1, 1, 1), w0=0.0).any()


def test_non_consecutive_ids_give_the_same_map_as_consecutive_ones() -> None:
    consecutive = random_instances(np.random.default_rng(8), (9, 11, 7), 4)
    _, relabelled = np.unique(consecutive, return_inverse=True)
    relabelled = relabelled.reshape(consecutive.shape)
    for instances in (consecutive, relabelled, relabelled.astype(np.uint8) * 50):
        np.testing.assert_array_equal(
            border_weights(instances, (1.0, 0.9, 1.8)), border_weights(relabelled, (1.0, 0.9, 1.8))
        )


def test_volume_without_background_and_huge_ids() -> None:
    instances = np.full((3, 4, 5), 2**40, dtype=np.int64)
    instances[:, :, 3:] = 2**40 + 7
    assert not border_weights(instances, (1, 1, 1)).any()  # no background voxel to weigh


# --------------------------------------------------------------------------------------------------
# class balance, instances, full map


def test_class_balance_mean_is_one_and_rarer_class_weighs_more() -> None:
    label = np.zeros((6, 5, 4), dtype=np.uint8)
    label[:2, :2, :2] = 2  # 8 voxels
    label[3:, :, :] = 1  # 60 voxels; class 0 keeps the other 52
    known = np.ones(label.shape, dtype=bool)
    known[5] = False
    for mask in (None, known):
        w = class_balance_weights(label, 4, known=mask)  # class 3 never occurs
        labelled = np.ones(label.shape, bool) if mask is None else mask
        assert w.dtype == np.float32
        assert math.isclose(float(w[labelled].mean()), 1.0, rel_tol=1e-6)
        counts = {c: int((label[labelled] == c).sum()) for c in range(3)}
        per_class = {c: np.unique(w[labelled & (label == c)]) for c in range(3)}
        assert all(values.size == 1 for values in per_class.values())  # one weight per class
        for a in range(3):
            for b in range(3):
                if counts[a] < counts[b]:
                    assert per_class[a][0] > per_class[b][0]  # rarer class weighs more
        assert np.all(w[~labelled] == 0)


def test_class_balance_ignores_values_of_unlabelled_voxels() -> None:
    label = np.array([[[0, 1, 255, 1]]], dtype=np.uint8)
    w = class_balance_weights(label, 2, known=label != 255)
    np.testing.assert_allclose(w[0, 0], [1.5, 0.75, 0.0, 0.75])
    assert not class_balance_weights(label, 2, known=np.zeros_like(label)).any()


def test_instances_from_labels_keeps_touching_classes_apart() -> None:
    label = np.zeros((4, 4, 4), dtype=np.uint8)
    label[0:2] = 1
    label[2:4, :, 0:2] = 2  # touches class 1
    label[3, 3, 3] = 1  # a second, separate component of class 1
    instances = instances_from_labels(label)
    assert instances.dtype == np.int32
    assert sorted(np.unique(instances).tolist()) == [0, 1, 2, 3]
    assert np.array_equal(instances == 0, label == 0)
    for object_id in (1, 2, 3):
        assert np.unique(label[instances == object_id]).size == 1


def test_weight_map_zero_where_unlabelled_and_sum_of_terms_elsewhere() -> None:
    label = np.zeros((5, 6, 7), dtype=np.uint8)
    label[:, :, :3] = 1
    label[:, :, 4:] = 2
    known = np.ones(label.shape, dtype=np.uint8)
    known[0] = 0
    known[:, 5, :] = 0
    spacing = (1.2, 1.0, 0.7)
    w = weight_map(label, 3, spacing, known=known)
    assert w.dtype == np.float32
    assert np.all(w[known == 0] == 0)
    instances = instances_from_labels(np.where(known, label, 0))
    expected = class_balance_weights(label, 3, known) + border_weights(instances, spacing)
    np.testing.assert_allclose(w[known == 1], expected[known == 1], rtol=1e-6)
    assert w[:, :, 3][known[:, :, 3] == 1].min() > w[:, :, 0][known[:, :, 0] == 1].max()


def test_weight_map_options() -> None:
    label = np.zeros((5, 6, 7), dtype=np.uint8)
    label[:, :, :3] = 1
    label[:, :, 5:] = 1
    spacing = (1.0, 1.0, 1.0)
    # one class-1 component per side: two objects, so a border term in the gap
    plain = weight_map(label, 2, spacing, class_balance=False)
    assert np.all(plain[label == 1] == 1)
    assert np.allclose(plain[:, :, 3:5], 1 + 10 * math.exp(-9 / 50))
    # w0 = 0: class balance only
    np.testing.assert_array_equal(weight_map(label, 2, spacing, w0=0), class_balance_weights(label, 2))
    # instances given: used as they are, even where label disagrees (one object -> no border term)
    one_object = (label == 1).astype(np.int32)
    np.testing.assert_array_equal(
        weight_map(label, 2, spacing, instances=one_object, class_balance=False), np.ones(label.shape)
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: border_weights(np.zeros((4, 4)), (1, 1, 1)),
        lambda: border_weights(np.zeros((4, 4, 4), np.float32), (1, 1, 1)),
        lambda: border_weights(np.full((4, 4, 4), -1), (1, 1, 1)),
        lambda: border_weights(np.zeros((4, 4, 4), int), (1, 1)),
        lambda: border_weights(np.zeros((4, 4, 4), int), (1, 0, 1)),
        lambda: border_weights(np.zeros((4, 4, 4), int), (1, float("nan"), 1)),
        lambda: border_weights(np.zeros((4, 4, 4), int), (1, 1, 1), w0=-1),
        lambda: border_weights(np.zeros((4, 4, 4), int), (1, 1, 1), sigma_mm=0),
        lambda: border_weights(np.zeros((4, 4, 4), int), (1, 1, 1), tolerance=0),
        lambda: border_weights(np.zeros((4, 4, 4), int), (1, 1, 1), w0=1.0, tolerance=1.0),
        lambda: class_balance_weights(np.full((4, 4, 4), 3, np.uint8), 3),
        lambda: class_balance_weights(np.zeros((4, 4, 4), np.uint8), 0),
        lambda: class_balance_weights(np.zeros((4, 4, 4), np.float32), 2),
        lambda: class_balance_weights(np.zeros((4, 4, 4), np.uint8), 2, known=np.ones((4, 4, 3))),
        lambda: instances_from_labels(np.zeros((4, 4, 4), np.uint8), connectivity=5),
        lambda: weight_map(np.zeros((4, 4, 4), np.uint8), 2, (1, 1, 1), instances=np.zeros((4, 4, 5), int)),
        lambda: weight_map(np.zeros((4, 4, 4), np.uint8), 2, (1, 1, -1)),
        lambda: weight_map(np.zeros((4, 4, 4), np.uint8), 0, (1, 1, 1), class_balance=False),
    ],
)
def test_bad_input_raises_volseg_error(call) -> None:
    with pytest.raises(VolsegError):
        call()
