"""Resampling to the training spacing and back: shapes, label values, and prediction on other grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from volseg import volumes
from volseg.planning import plan_spacing
from volseg.preprocessing import (
    needs_resampling,
    resample_image,
    resample_labels,
    resample_probabilities,
    resampled_shape,
)


def test_resample_image_keeps_constant_and_extent() -> None:
    image = np.full((2, 20, 30, 6), 7.0, np.float32)
    out = resample_image(image, (1.0, 1.0, 5.0), (2.0, 0.5, 2.5))
    assert out.shape == (2, 10, 60, 12)
    np.testing.assert_allclose(out, 7.0, rtol=1e-5)


def test_resample_image_linear_ramp_is_preserved_across_thick_axis() -> None:
    # a ramp along the thick axis: linear interpolation reproduces it (a cubic spline would too,
    # but must not overshoot at the ends); values stay within the input range
    k = np.arange(6, dtype=np.float32)
    image = np.broadcast_to(k, (1, 8, 8, 6)).copy()
    out = resample_image(image, (0.5, 0.5, 5.0), (0.5, 0.5, 2.5))
    assert out.shape == (1, 8, 8, 12)
    assert out.min() >= 0 and out.max() <= 5
    assert np.all(np.diff(out[0, 4, 4]) >= -1e-6)


def test_resample_labels_never_invents_values() -> None:
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 3, 7], np.uint8), size=(9, 11, 5))
    out = resample_labels(label, (17, 23, 13))
    assert out.shape == (17, 23, 13) and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 3, 7}
    back = resample_labels(resample_labels(label, (18, 22, 10)), label.shape)
    np.testing.assert_array_equal(back, label)  # exact 2x up then down is the identity for nearest


def test_resample_probabilities_shape_and_sum() -> None:
    p = np.random.default_rng(1).dirichlet([1, 1, 1], size=(6, 7, 4)).transpose(3, 0, 1, 2).astype(np.float32)
    out = resample_probabilities(p, (12, 5, 9))
    assert out.shape == (3, 12, 5, 9)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_needs_resampling_and_shapes() -> None:
    assert not needs_resampling((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    assert needs_resampling((0.7, 0.7, 1.0), (1.0, 1.0, 1.0))
    assert resampled_shape((512, 512, 30), (0.5, 0.5, 6.0), (1.0, 1.0, 3.0)) == (256, 256, 60)


def test_plan_spacing_anisotropic_axis() -> None:
    spacings = [(0.7, 0.7, 5.0)] * 5 + [(0.7, 0.7, 2.5)] * 2 + [(0.8, 0.8, 1.25)]
    target = plan_spacing(spacings)
    assert target[:2] == (0.7, 0.7)
    assert 0.8 <= target[2] < 5.0  # finer than the median thick spacing, not finer than in-plane


def test_predict_on_a_finer_grid_returns_that_grid(trained_run: tuple[Path, dict], tiny_dataset: Path,
                                                     tmp_path: Path) -> None:
    import volseg
    from volseg.inference import predict_volume

    model, cfg = volseg.load_model(trained_run[0])
    image = volumes.read_image(sorted((tiny_dataset / "imagesTs").iterdir())[:1])
    native = predict_volume(model, cfg, image)
    # the same anatomy sampled twice as finely along I (nearest upsampling keeps it exact)
    fine = np.repeat(image.array, 2, axis=1)
    affine = image.affine.copy()
    affine[:3, 0] /= 2
    affine[:3, 3] -= image.affine[:3, 0] / 4  # voxel centres of the finer grid
    volumes.write_volume(tmp_path / "fine.nii.gz", fine, affine=affine)
    fine_vol = volumes.read_volume(tmp_path / "fine.nii.gz")
    assert needs_resampling(fine_vol.spacing, cfg.data.spacing)
    seg = predict_volume(model, cfg, fine_vol)
    assert seg.shape == fine.shape[1:]
    agreement = np.mean(seg == np.repeat(native, 2, axis=0))
    assert agreement > 0.9
