"""Synthetic phantoms: reproducible, every class present, physically round, touching, written as nnU-Net raw."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from volseg import synthetic
from volseg.errors import VolsegError
from volseg.synthetic import class_means, make_phantom, write_dataset

SHAPE = (29, 33, 24)
SPACING = (1.0, 1.25, 1.5)
CUBE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def _phantom(seed: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    kwargs.setdefault("shape_vox", SHAPE)
    kwargs.setdefault("spacing_mm", SPACING)
    return make_phantom(rng=np.random.default_rng([seed, 0]), **kwargs)


def _touch(mask_a: np.ndarray, mask_b: np.ndarray) -> bool:
    return bool(np.any(ndimage.binary_dilation(mask_a, structure=CUBE) & mask_b))


def test_doctests() -> None:
    assert doctest.testmod(synthetic).failed == 0


def test_same_seed_gives_identical_arrays_and_other_seeds_differ() -> None:
    image_a, label_a = _phantom(7, n_channels=2)
    image_b, label_b = _phantom(7, n_channels=2)
    image_c, label_c = _phantom(8, n_channels=2)
    assert image_a.tobytes() == image_b.tobytes()
    assert label_a.tobytes() == label_b.tobytes()
    assert not np.array_equal(label_a, label_c)
    assert not np.array_equal(image_a, image_c)


def test_shapes_and_dtypes() -> None:
    image, label = _phantom(1, n_classes=4, n_channels=3)
    assert image.shape == (3, *SHAPE) and image.dtype == np.float32
    assert label.shape == SHAPE and label.dtype == np.uint8
    assert np.all(np.isfinite(image))
    assert set(np.unique(label)) <= {0, 1, 2, 3}


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_every_class_present_thick_and_inside(n_classes: int) -> None:
    for seed in range(6):
        _, label = _phantom(seed, n_classes=n_classes)
        assert set(np.unique(label)) == set(range(n_classes))
        for value in range(1, n_classes):
            # at least one voxel whose 6 neighbours share its class: the object is >= 3 voxels thick
            assert ndimage.binary_erosion(label == value).any()
        faces = [label[0], label[-1], label[:, 0], label[:, -1], label[:, :, 0], label[:, :, -1]]
        assert all(not face.any() for face in faces)  # objects stay inside the volume


@settings(max_examples=15, deadline=None)
@given(
    shape_vox=st.tuples(*[st.integers(16, 30)] * 3),
    spacing_mm=st.tuples(*[st.sampled_from([0.6, 1.0, 1.7, 2.4])] * 3),
    n_classes=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_every_class_present_for_any_small_geometry(shape_vox, spacing_mm, n_classes, seed) -> None:
    image, label = make_phantom(shape_vox, spacing_mm, n_classes, rng=np.random.default_rng(seed))
    assert label.shape == shape_vox and image.shape == (1, *shape_vox)
    assert set(np.unique(label)) == set(range(n_classes))


def test_anisotropic_spacing_gives_physically_round_objects() -> None:
    spacing = np.array([0.5, 0.5, 5.0])
    n_objects = 0
    for seed in range(3):
        _, label = make_phantom(
            (64, 64, 12), spacing, 3, rng=np.random.default_rng([seed, 1]), touching=False
        )
        components, count = ndimage.label(label > 0, structure=CUBE)
        for index in range(1, count + 1):
            where = np.argwhere(components == index)
            extent_vox = where.max(axis=0) - where.min(axis=0) + 1
            extent_mm = extent_vox * spacing
            assert 0.5 <= extent_mm[0] / extent_mm[2] <= 2.0, extent_mm
            assert 0.5 <= extent_mm[1] / extent_mm[2] <= 2.0, extent_mm
            assert extent_vox[2] >= 3  # still several voxels thick along the coarse axis
            assert extent_vox[0] >= 4 * extent_vox[2]  # ... and many more along the fine one
            n_objects += 1
    assert n_objects >= 6


def test_touching_places_objects_of_different_classes_against_each_other() -> None:
    for seed in range(5):
        _, label = _phantom(seed, n_classes=3, n_objects=3, touching=True)
        assert _touch(label == 1, label == 2)
        _, count = ndimage.label(label > 0, structure=CUBE)
        assert count < 3  # at least two of the three objects merge into one 26-connected component


def test_without_touching_objects_are_separated() -> None:
    for seed in range(5):
        _, label = _phantom(seed, n_classes=3, n_objects=3, touching=False)
        assert not _touch(label == 1, label == 2)
        _, count = ndimage.label(label > 0, structure=CUBE)
        assert count == 3


def test_channels_differ_and_order_classes_differently() -> None:
    image, label = _phantom(3, n_classes=3, n_channels=3, bias=0.0)
    medians = np.array([[np.median(channel[label == c]) for c in range(3)] for channel in image])
    assert not np.allclose(image[0], image[1]) and not np.allclose(image[1], image[2])
    orders = {tuple(np.argsort(row)) for row in medians}
    assert orders == {(0, 1, 2), (2, 0, 1), (1, 2, 0)}  # each channel ranks the classes differently
    assert orders == {tuple(np.argsort(row)) for row in class_means(3, 3)}


def test_without_noise_and_bias_each_class_has_one_value_per_channel() -> None:
    image, label = _phantom(4, n_classes=3, n_channels=2, noise=0.0, bias=0.0)
    for channel, means in zip(image, class_means(3, 2)):
        values = [channel[label == c] for c in range(3)]
        assert all(np.ptp(v) <= 1e-4 * np.abs(v).max() for v in values)
        observed = np.array([v[0] for v in values])
        # an affine map (random per-case scale and offset) of the documented class means
        scale = (observed[1] - observed[0]) / (means[1] - means[0])
        assert scale > 0
        np.testing.assert_allclose(observed, observed[0] + scale * (means - means[0]), rtol=1e-4)


def test_noise_std_is_relative_to_the_gap_between_class_means() -> None:
    noise = 0.2
    image, label = _phantom(5, n_classes=3, noise=noise, bias=0.0)
    channel = image[0]
    gap = np.median(channel[label == 1]) - np.median(channel[label == 0])
    std = channel[label == 0].std()
    assert std / gap == pytest.approx(noise, rel=0.05)


def test_bias_field_is_smooth_multiplicative_with_the_requested_amplitude() -> None:
    # The rng draws do not depend on `bias`, so both phantoms share layout, scale and offset.
    flat, label = _phantom(6, n_classes=2, noise=0.0, bias=0.0)
    biased, label_biased = _phantom(6, n_classes=2, noise=0.0, bias=0.3)
    np.testing.assert_array_equal(label, label_biased)
    level_bg, level_fg = (float(flat[0][label == c][0]) for c in (0, 1))
    means = class_means(2, 1)[0]
    scale = (level_fg - level_bg) / (means[1] - means[0])
    offset = level_bg - scale * means[0]
    field = ((biased[0].astype(np.float64) - offset) / (flat[0] - offset) - 1.0) / 0.3
    assert np.abs(field).max() == pytest.approx(1.0, abs=1e-3)  # amplitude: intensity * (1 +- bias)
    assert abs(field.mean()) < 1e-3
    for axis in range(3):
        assert np.abs(np.diff(field, axis=axis)).max() < 0.2  # low-frequency


def test_per_case_intensity_scale_and_offset_differ() -> None:
    backgrounds = [np.median(img[0][lab == 0]) for img, lab in (_phantom(s) for s in range(3))]
    assert len({round(float(b), 3) for b in backgrounds}) == 3


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def test_write_dataset_writes_the_nnunet_raw_layout(tmp_path: Path) -> None:
    shape, spacing, seed = (20, 17, 11), (0.8, 1.0, 2.5), 5
    out = write_dataset(
        tmp_path / "ds", n_cases=3, shape_vox=shape, spacing_mm=spacing, n_classes=3, n_channels=2,
        seed=seed, n_test=2,
    )
    assert out == tmp_path / "ds"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {"dataset.json"}
    for folder, labels, indices in [("imagesTr", "labelsTr", range(3)), ("imagesTs", "labelsTs", range(3, 5))]:
        for i in indices:
            expected |= {f"{folder}/case_{i:03d}_0000.nii.gz", f"{folder}/case_{i:03d}_0001.nii.gz"}
            expected.add(f"{labels}/case_{i:03d}.nii.gz")
    assert names == expected

    meta = json.loads((out / "dataset.json").read_text())
    assert meta["name"] == "volseg-synthetic"
    assert meta["channel_names"] == {"0": "ch0", "1": "ch1"}
    assert meta["labels"] == {"background": 0, "class1": 1, "class2": 2}
    assert meta["numTraining"] == 3
    assert meta["file_ending"] == ".nii.gz"
    assert '"seed": 5' in meta["description"] and '"n_test": 2' in meta["description"]
    assert meta["generator_params"]["spacing_mm"] == list(spacing)

    # any case can be regenerated alone from default_rng([seed, index]); test cases continue the numbering
    for folder, labels, index in [("imagesTr", "labelsTr", 1), ("imagesTs", "labelsTs", 4)]:
        image, label = make_phantom(shape, spacing, 3, 2, rng=np.random.default_rng([seed, index]))
        for channel in range(2):
            data, affine = _read(out / folder / f"case_{index:03d}_{channel:04d}.nii.gz")
            assert data.shape == shape
            np.testing.assert_array_equal(data, image[channel])
        data, affine = _read(out / labels / f"case_{index:03d}.nii.gz")
        np.testing.assert_array_equal(data, label)
        np.testing.assert_allclose(np.diag(affine)[:3], spacing)
        assert np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine)[:3])) == 0
        assert np.all(affine[:3, 3] != 0)


def test_write_dataset_is_byte_reproducible(tmp_path: Path) -> None:
    kwargs = dict(n_cases=2, shape_vox=(13, 11, 9), spacing_mm=(1.0, 1.0, 2.0), n_classes=2, seed=3)
    first = write_dataset(tmp_path / "a", **kwargs)
    second = write_dataset(tmp_path / "b", **kwargs)
    other = write_dataset(tmp_path / "c", **{**kwargs, "seed": 4})
    for name in ["imagesTr/case_000_0000.nii.gz", "imagesTr/case_001_0000.nii.gz", "labelsTr/case_001.nii.gz"]:
        a, b, c = (_read(root / name)[0] for root in (first, second, other))
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() != c.tobytes()
    assert not (first / "imagesTs").exists()


def test_progress_bar_only_for_many_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = dict(shape_vox=(9, 8, 8), n_classes=2)
    write_dataset(tmp_path / "few", n_cases=2, **kwargs)
    assert "synthetic cases" not in capsys.readouterr().err
    write_dataset(tmp_path / "many", n_cases=20, **kwargs)
    assert "synthetic cases" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_classes=1),
        dict(n_classes=2.5),
        dict(n_classes=300),
        dict(shape_vox=(7, 20, 20)),
        dict(shape_vox=(20, 20)),
        dict(spacing_mm=(1.0, 0.0, 1.0)),
        dict(spacing_mm=(1.0, -2.0, 1.0)),
        dict(spacing_mm=(1.0, float("nan"), 1.0)),
        dict(n_channels=0),
        dict(noise=-0.1),
        dict(bias=1.5),
        dict(noise="lots"),
    ],
)
def test_bad_parameters_raise_volseg_error(kwargs: dict, tmp_path: Path) -> None:
    with pytest.raises(VolsegError):
        make_phantom(**{"shape_vox": (12, 12, 12), **kwargs}, rng=np.random.default_rng(0))
    with pytest.raises(VolsegError):
        write_dataset(tmp_path / "ds", n_cases=1, **{"shape_vox": (12, 12, 12), **kwargs})
    assert not (tmp_path / "ds").exists()  # validated before anything is written


def test_bad_counts_and_impossible_layouts_raise_volseg_error(tmp_path: Path) -> None:
    with pytest.raises(VolsegError, match="n_objects"):
        make_phantom((12, 12, 12), n_classes=4, n_objects=2, rng=np.random.default_rng(0))
    with pytest.raises(VolsegError, match="n_cases"):
        write_dataset(tmp_path / "ds", n_cases=0)
    with pytest.raises(VolsegError, match="n_test"):
        write_dataset(tmp_path / "ds", n_cases=1, n_test=-1)
    with pytest.raises(VolsegError, match="cannot fit"):
        make_phantom((8, 8, 8), n_classes=12, rng=np.random.default_rng(0))
