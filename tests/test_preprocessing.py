"""volseg.preprocessing: z-score statistics, the non-zero mode, and label encoding with an ignore label."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import volseg.preprocessing as vpre
from volseg.errors import VolsegError
from volseg.preprocessing import NORMALIZATIONS, decode_labels, encode_labels, normalize, zscore


def test_doctests():
    assert doctest.testmod(vpre).failed == 0


def test_zscore_per_channel():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(100.0, 20.0, (5, 7, 3)), rng.uniform(-3.0, 1.0, (5, 7, 3))])
    out = zscore(image)
    assert out.shape == image.shape
    assert out.dtype == np.float32
    for c in range(2):
        assert out[c].mean() == pytest.approx(0.0, abs=1e-5)
        assert out[c].std() == pytest.approx(1.0, abs=1e-5)
        # an affine map of the input, so the order of voxels is kept
        np.testing.assert_allclose(out[c], (image[c] - image[c].mean()) / image[c].std(), rtol=1e-5, atol=1e-5)


def test_zscore_by_hand():
    image = np.array([[[[2.0, 4.0, 6.0, 8.0]]]])  # mean 5, std sqrt(5)
    expected = (np.array([2.0, 4.0, 6.0, 8.0]) - 5.0) / np.sqrt(5.0)
    np.testing.assert_allclose(zscore(image).ravel(), expected, rtol=1e-6)


def test_zscore_integer_input_does_not_overflow():
    image = np.full((1, 3, 4, 5), 60000, dtype=np.uint16)
    image[0, 0] = 0
    out = zscore(image)
    assert out[0].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[0].std() == pytest.approx(1.0, abs=1e-5)


def test_zscore_nonzero_keeps_background_and_uses_foreground_stats():
    # channel 0 is a skull-stripped image (zero outside), channel 1 is zero in part of the brain too
    image = np.zeros((2, 4, 5, 3))
    brain = np.zeros((4, 5, 3), dtype=bool)
    brain[1:3, 1:4, :] = True  # 18 voxels
    rng = np.random.default_rng(1)
    image[0][brain] = rng.normal(50.0, 5.0, brain.sum())
    image[1][brain] = rng.normal(-2.0, 1.0, brain.sum())
    image[1, 1, 1, 0] = 0.0  # zero in channel 1 only: still inside the region (channel 0 is non-zero)
    image[0, 0, 0, 0] = 0.0
    out = zscore(image, nonzero=True)
    assert np.all(out[:, ~brain] == 0)
    for c in range(2):
        inside = image[c][brain]
        np.testing.assert_allclose(out[c][brain], (inside - inside.mean()) / inside.std(), rtol=1e-5, atol=1e-5)
        assert out[c][brain].mean() == pytest.approx(0.0, abs=1e-5)
        assert out[c][brain].std() == pytest.approx(1.0, abs=1e-5)
    # the zero of channel 1 inside the region is normalised like any other value, not kept at 0
    assert out[1, 1, 1, 0] == pytest.approx((0.0 - image[1][brain].mean()) / image[1][brain].std(), rel=1e-5)


def test_zscore_nonzero_differs_from_plain():
    image = np.zeros((1, 6, 6, 6))
    image[0, 2:4, 2:4, 2:4] = [[[1.0, 3.0], [1.0, 3.0]], [[1.0, 3.0], [1.0, 3.0]]]
    inside = zscore(image, nonzero=True)[0, 2:4, 2:4, 2:4]
    np.testing.assert_allclose(np.unique(inside), [-1.0, 1.0], rtol=1e-6)
    assert zscore(image)[0, 0, 0, 0] < 0  # the plain z-score moves the background


@pytest.mark.parametrize("nonzero", [False, True])
@pytest.mark.parametrize("value", [0.0, 3.5])
def test_constant_image_gives_zeros(nonzero, value):
    image = np.full((2, 3, 4, 5), value)
    with np.errstate(all="raise"):
        out = zscore(image, nonzero=nonzero)
    assert np.isfinite(out).all()
    assert np.all(out == 0)


def test_constant_channel_beside_varying_one():
    image = np.stack([np.full((3, 3, 3), 7.0), np.arange(27, dtype=float).reshape(3, 3, 3)])
    out = zscore(image)
    assert np.all(out[0] == 0)
    assert out[1].std() == pytest.approx(1.0, abs=1e-5)


def test_normalize_by_name():
    image = np.arange(24, dtype=np.int16).reshape(1, 2, 3, 4) - 5
    assert set(NORMALIZATIONS) == {"zscore", "zscore_nonzero", "ct", "none"}
    ct = normalize(image.astype(np.float32), "ct", stats=[(-2.0, 10.0, 4.0, 2.0)])
    np.testing.assert_allclose(ct, (np.clip(image, -2, 10) - 4.0) / 2.0)
    mixed = normalize(np.stack([image[0], image[0]]), ["none", "zscore"])
    np.testing.assert_array_equal(mixed[0], image[0])
    np.testing.assert_allclose(mixed[1], zscore(image)[0])
    np.testing.assert_array_equal(normalize(image, "none"), image.astype(np.float32))
    assert normalize(image, "none").dtype == np.float32
    np.testing.assert_array_equal(normalize(image, "zscore"), zscore(image))
    np.testing.assert_array_equal(normalize(image, "zscore_nonzero"), zscore(image, nonzero=True))
    assert image[0, 0, 1, 1] == 0
    assert normalize(image, "zscore_nonzero")[0, 0, 1, 1] == 0
    assert normalize(image, "zscore")[0, 0, 1, 1] != 0


@pytest.mark.parametrize("method", ["zscore-nonzero", "None", "minmax", ""])
def test_normalize_unknown_name_refused(method):
    """A typo in the config (or `--normalization`) must not silently fall back to plain z-score."""
    with pytest.raises(VolsegError, match="normali"):
        normalize(np.ones((1, 2, 2, 2)), method)


def test_encode_decode_round_trip_with_ignore():
    class_values = (0, 2, 5, 7)
    rng = np.random.default_rng(2)
    label = rng.choice(np.array([0, 2, 5, 7, 255]), size=(5, 6, 3)).astype(np.uint8)
    index, weight = encode_labels(label, class_values, ignore_label=255)
    assert index.shape == label.shape == weight.shape
    assert index.max() <= 3
    labelled = label != 255
    np.testing.assert_array_equal(weight, labelled.astype(np.uint8))
    lut = {0: 0, 2: 1, 5: 2, 7: 3}
    np.testing.assert_array_equal(index[labelled], [lut[v] for v in label[labelled]])
    back = decode_labels(index, class_values)
    np.testing.assert_array_equal(back[labelled], label[labelled])
    assert back.dtype == np.uint8


def test_unknown_values_get_weight_zero():
    label = np.array([[[0, 1, 3, 4, 9, 200]]])
    index, weight = encode_labels(label, (0, 1, 4), ignore_label=9)
    assert weight.tolist() == [[[1, 1, 0, 1, 0, 0]]]
    assert index[weight == 1].tolist() == [0, 1, 2]
    # without an ignore label, unknown values are still unlabelled rather than background
    index, weight = encode_labels(label, (0, 1, 4))
    assert weight.tolist() == [[[1, 1, 0, 1, 0, 0]]]


def test_ignore_label_that_is_not_a_class():
    label = np.array([0, 1, 2, 1, 2])
    index, weight = encode_labels(label, (0, 1), ignore_label=2)
    assert index.tolist()[:2] == [0, 1]
    assert weight.tolist() == [1, 1, 0, 1, 0]


def test_decode_negative_and_large_values():
    index = np.array([0, 1, 2, 1])
    assert decode_labels(index, (-1, 0, 3)).tolist() == [-1, 0, 3, 0]
    out = decode_labels(index, (0, 300, 1000))
    assert out.tolist() == [0, 300, 1000, 300]
    assert np.issubdtype(out.dtype, np.integer)
