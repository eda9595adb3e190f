"""Connected-component cleaning with hand-built label maps and known answers."""

from __future__ import annotations

import numpy as np
import pytest

from volseg.errors import VolsegError
from volseg.postprocessing import keep_largest_component, remove_small_components


def make_seg() -> np.ndarray:
    """Label 1: blocks of 12, 2 and 1 voxels; label 2: blocks of 6 and 3 voxels; shape (7, 6, 5)."""
    seg = np.zeros((7, 6, 5), dtype=np.uint8)
    seg[0:2, 0:2, 0:3] = 1  # 12 voxels
    seg[4, 4, 0:2] = 1  # 2 voxels
    seg[6, 0, 4] = 1  # 1 voxel
    seg[3:5, 0:3, 4] = 2  # 6 voxels
    seg[6, 3:6, 2] = 2  # 3 voxels
    return seg


def test_remove_small_components_by_voxel_count():
    seg = make_seg()
    before = seg.copy()
    out = remove_small_components(seg, min_voxels=3)
    assert np.array_equal(seg, before)  # input untouched
    expected = seg.copy()
    expected[4, 4, 0:2] = 0
    expected[6, 0, 4] = 0
    assert np.array_equal(out, expected)
    assert out.dtype == seg.dtype


def test_remove_small_components_by_volume_with_anisotropic_spacing():
    seg = make_seg()
    # one voxel = 0.5 * 0.5 * 2.0 = 0.5 mm3, so 3 voxels = 1.5 mm3
    out = remove_small_components(seg, min_volume_mm3=1.5, spacing=(0.5, 0.5, 2.0))
    expected = seg.copy()
    expected[4, 4, 0:2] = 0  # 1.0 mm3
    expected[6, 0, 4] = 0  # 0.5 mm3; the 3-voxel block at exactly 1.5 mm3 is kept
    assert np.array_equal(out, expected)
    # a volume threshold that is not a whole number of voxels rounds up
    out = remove_small_components(seg, min_volume_mm3=1.6, spacing=(0.5, 0.5, 2.0))
    assert not np.any(out[6, 3:6, 2])


def test_remove_small_components_only_selected_labels():
    seg = make_seg()
    out = remove_small_components(seg, min_voxels=7, labels=[2])
    expected = seg.copy()
    expected[3:5, 0:3, 4] = 0
    expected[6, 3:6, 2] = 0
    assert np.array_equal(out, expected)


def test_connectivity_decides_what_touches():
    seg = np.zeros((3, 3, 3), dtype=np.int32)
    seg[0, 0, 0] = 1
    seg[1, 1, 1] = 1  # corner neighbour of the first voxel
    seg[2, 2, 2] = 1
    assert np.array_equal(remove_small_components(seg, min_voxels=2, connectivity=26), seg)
    assert not remove_small_components(seg, min_voxels=2, connectivity=6).any()
    with pytest.raises(VolsegError, match="connectivity"):
        remove_small_components(seg, min_voxels=2, connectivity=8)


def test_keep_largest_component_per_label():
    seg = make_seg()
    out = keep_largest_component(seg)
    expected = np.zeros_like(seg)
    expected[0:2, 0:2, 0:3] = 1
    expected[3:5, 0:3, 4] = 2
    assert np.array_equal(out, expected)
    only_one = keep_largest_component(seg, labels=[1])
    expected[6, 3:6, 2] = 2  # label 2 untouched
    assert np.array_equal(only_one, expected)


def test_touching_labels_are_separate_components():
    seg = np.zeros((1, 2, 6), dtype=np.int16)
    seg[0, 0, :] = [1, 1, 1, 2, 0, 1]
    seg[0, 1, :] = [0, 0, 0, 2, 0, 0]
    out = keep_largest_component(seg)
    assert out[0].tolist() == [[1, 1, 1, 2, 0, 0], [0, 0, 0, 2, 0, 0]]


def test_bad_input():
    with pytest.raises(VolsegError, match=r"\(I, J, K\)"):
        keep_largest_component(np.zeros((1, 2, 3, 4), dtype=np.uint8))
    with pytest.raises(VolsegError, match="integer"):
        remove_small_components(np.zeros((2, 3, 4)), min_voxels=2)
    with pytest.raises(VolsegError, match="spacing"):
        remove_small_components(np.zeros((2, 3, 4), np.uint8), spacing=(1.0, 0.0, 1.0))
