"""volseg.synthetic_lesions: thick-slice two-channel brain MRI with tumours and their look-alikes."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
from scipy import ndimage

import volseg.synthetic_lesions as vles
from volseg import layout, volumes
from volseg.errors import VolsegError
from volseg.synthetic_lesions import LESION_CM3, make_lesion_case, write_lesion_dataset

IN_PLANE = 96  # 2.67 mm pixels over the 256 mm field of view: small and quick


def test_doctests():
    assert doctest.testmod(vles).failed == 0


@pytest.fixture(scope="module")
def cases():
    return [make_lesion_case(np.random.default_rng([3, i]), in_plane=IN_PLANE) for i in range(6)]


def test_same_seed_same_case_other_seed_other_case():
    a = make_lesion_case(np.random.default_rng([1, 0]), in_plane=48)
    b = make_lesion_case(np.random.default_rng([1, 0]), in_plane=48)
    c = make_lesion_case(np.random.default_rng([1, 1]), in_plane=48)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert a[2] != c[2] or not np.array_equal(a[1], c[1])


def test_geometry_is_thick_slice_axial(cases):
    for image, label, spacing in cases:
        assert image.shape[0] == 2 and image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape[1:] == label.shape and label.shape[:2] == (IN_PLANE, IN_PLANE)
        assert 20 <= label.shape[2] <= 30 and 5.0 <= spacing[2] <= 7.0
        assert spacing[0] == spacing[1] == pytest.approx(256 / IN_PLANE)
    assert len({c[2][2] for c in cases}) > 1 and len({c[1].shape[2] for c in cases}) > 1  # cases differ


def test_tumour_volumes_in_range(cases):
    volumes = []
    for _, label, spacing in cases:
        components, n = ndimage.label(label)
        assert 1 <= n <= 3 + 2  # 1-3 tumours (a wobbly one may split at a slice)
        volumes += [float(np.sum(components == i)) * float(np.prod(spacing)) / 1000 for i in range(1, n + 1)]
    # partial volume at 2.7 x 2.7 x 6 mm blurs the smallest; the total stays in the drawn range
    assert 0.2 < np.median(volumes) < LESION_CM3[1] * 1.3
    assert max(volumes) < 3 * LESION_CM3[1]


def test_t1c_ring_and_flair_bright_but_neither_alone_suffices(cases):
    rims, cores, fl_tumour, fl_brain, best = [], [], [], [], []
    for image, label, _ in cases:
        t1, fl = image
        tumour = label > 0
        inner = ndimage.binary_erosion(tumour, iterations=1)
        rim = tumour & ~inner
        if inner.any():
            rims.append(t1[rim].mean())
            cores.append(t1[inner].mean())
        brain = ndimage.binary_erosion(fl > np.percentile(fl, 60), iterations=2) & ~ndimage.binary_dilation(tumour, iterations=4)
        fl_tumour.append(fl[tumour].mean() / fl[brain].mean())
        fl_brain.append(1.0)
        for channel in (t1, fl):  # the best single global threshold on one channel
            dices = []
            for q in np.linspace(80, 99.9, 40):
                pred = channel > np.percentile(channel, q)
                dices.append(2 * np.sum(pred & tumour) / (pred.sum() + tumour.sum()))
            best.append(max(dices))
    assert np.mean(rims) > np.mean(cores)  # enhancing rim around a darker core
    assert np.mean(fl_tumour) > 1.3  # FLAIR-bright tumour
    assert max(best) < 0.6  # vessels, dura, oedema and white-matter spots defeat a threshold


def test_dataset_layout_and_check(tmp_path):
    out = write_lesion_dataset(tmp_path / "les", n_cases=2, n_test=1, seed=5, in_plane=48)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1c", "1": "FLAIR"} and meta["labels"] == {"background": 0, "tumour": 1}
    assert meta["numTraining"] == 2
    assert (out / "imagesTs" / "case_002_0001.nii.gz").exists() and (out / "labelsTs" / "case_002.nii.gz").exists()
    assert layout.check_dataset(out) == []  # the channels share one grid with the label
    t1, fl = (volumes.read_volume(out / "imagesTr" / f"case_000_{c:04d}.nii.gz") for c in range(2))
    assert np.allclose(t1.affine, fl.affine) and t1.spacing[0] == pytest.approx(256 / 48)


def test_bad_parameters_are_clear_errors(tmp_path):
    with pytest.raises(VolsegError, match="in_plane"):
        make_lesion_case(np.random.default_rng(0), in_plane=8)
    with pytest.raises(VolsegError, match="n_cases"):
        write_lesion_dataset(tmp_path / "x", n_cases=0)
