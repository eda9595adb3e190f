"""volseg.data: the preprocessing cache, patch sampling (foreground, padding, ignore) and the batch stream."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from volseg import data as vdata
from volseg import layout, volumes
from volseg.config import DataConfig
from volseg.data import BatchStream, CaseData, preprocess_case, sample_batch, sample_patch
from volseg.errors import VolsegError
from volseg.train import data_config_from_dataset

SPACING_MM = (0.8, 1.0, 2.5)


def affine(spacing=SPACING_MM) -> np.ndarray:
    out = np.diag([*spacing, 1.0])
    out[:3, 3] = (4.0, -3.0, 12.0)
    return out


def write_case(folder: Path, case_id: str, image: np.ndarray, label: np.ndarray | None) -> layout.Case:
    """One single-channel case on disk in the nnU-Net naming."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    image_path = folder / "imagesTr" / f"{case_id}_0000.nii.gz"
    volumes.write_volume(image_path, image, affine=affine())
    label_path = None
    if label is not None:
        label_path = folder / "labelsTr" / f"{case_id}.nii.gz"
        volumes.write_volume(label_path, label, affine=affine())
    return layout.Case(case_id, (image_path,), label_path)


def memory_case(label: np.ndarray, weight: np.ndarray | None = None, image: np.ndarray | None = None) -> CaseData:
    """A CaseData built in memory (as preprocess_case would), for sampling tests."""
    classes = int(label.max()) + 1
    known = np.ones(label.shape, bool) if weight is None else weight > 0
    fg = {c: np.argwhere((label == c) & known).astype(np.int32) for c in range(1, max(classes, 2))}
    if image is None:
        image = np.arange(label.size, dtype=np.float32).reshape(1, *label.shape)
    return CaseData("mem", image, label.astype(np.uint8), weight, fg, SPACING_MM)


# ------------------------------------------------------------------------------------------------
# preprocess_case and its cache


def test_preprocess_case_normalises_encodes_and_indexes_foreground(tiny_dataset, tmp_path):
    info, cases = layout.read_dataset(tiny_dataset)
    data = data_config_from_dataset(info)
    case = preprocess_case(cases[0], data, tmp_path / "cache")

    raw_image = volumes.read_image(cases[0].images)
    raw_label = volumes.read_label(cases[0].label).array[0]
    assert case.case_id == cases[0].case_id
    assert case.image.shape == raw_image.array.shape == (1, 24, 24, 16)
    assert case.image.dtype == np.float32
    assert abs(float(np.mean(case.image))) < 1e-4 and abs(float(np.std(case.image)) - 1) < 1e-3
    np.testing.assert_array_equal(case.label, raw_label)  # values 0, 1, 2 are already indices
    assert case.weight is None  # every voxel labelled
    assert case.spacing == pytest.approx((1.0, 1.0, 2.0))
    assert sorted(case.fg_voxels) == [1, 2]
    for c, pos in case.fg_voxels.items():
        assert pos.shape == (np.count_nonzero(raw_label == c), 3)
        assert np.all(raw_label[tuple(pos.T)] == c)


def test_preprocess_case_reuses_its_cache_without_reading_files(tiny_dataset, tmp_path, monkeypatch):
    info, cases = layout.read_dataset(tiny_dataset)
    data = data_config_from_dataset(info)
    first = preprocess_case(cases[1], data, tmp_path / "cache")
    first_image, first_label = np.array(first.image), np.array(first.label)

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(volumes, "read_image", refuse)
    monkeypatch.setattr(volumes, "read_label", refuse)
    second = preprocess_case(cases[1], data, tmp_path / "cache")
    np.testing.assert_array_equal(second.image, first_image)
    np.testing.assert_array_equal(second.label, first_label)
    assert isinstance(second.image, np.memmap)  # memory-mapped, not loaded
    assert second.spacing == first.spacing
    assert {c: p.tolist() for c, p in second.fg_voxels.items()} == {c: p.tolist() for c, p in first.fg_voxels.items()}


def test_preprocess_case_redoes_the_cache_when_the_config_changes(tiny_dataset, tmp_path, monkeypatch):
    info, cases = layout.read_dataset(tiny_dataset)
    data = data_config_from_dataset(info)
    preprocess_case(cases[2], data, tmp_path / "cache")
    reads = []
    real = volumes.read_image
    monkeypatch.setattr(volumes, "read_image", lambda paths: reads.append(paths) or real(paths))
    raw = preprocess_case(cases[2], dataclasses.replace(data, normalization="none"), tmp_path / "cache")
    assert len(reads) == 1
    np.testing.assert_array_equal(raw.image, real(cases[2].images).array.astype(np.float32))


def test_preprocess_case_with_ignore_label(tmp_path):
    """Ignored voxels get weight 0 and never appear among the foreground positions."""
    shape = (9, 8, 7)
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:6, 2:5] = 1
    label[4:9, :, :] = np.where(label[4:9, :, :] == 1, 3, label[4:9, :, :])  # part of the object ignored
    label[0, 0, :] = 3  # and a stripe of background
    label[8, 7, 6] = 2
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    case = write_case(tmp_path / "raw", "ign", image, label)
    data = DataConfig(labels=(("background", 0), ("a", 1), ("b", 2), ("ignore", 3)), ignore_label=3)

    prepared = preprocess_case(case, data, tmp_path / "cache")

    assert prepared.weight is not None
    np.testing.assert_array_equal(np.asarray(prepared.weight), (label != 3).astype(np.uint8))
    assert set(np.unique(prepared.label).tolist()) <= {0, 1, 2}
    ignored = {tuple(p) for p in np.argwhere(label == 3)}
    for c in (1, 2):
        listed = {tuple(p) for p in prepared.fg_voxels[c].tolist()}
        assert listed == {tuple(p) for p in np.argwhere(label == c)}
        assert not listed & ignored

    # a whole-volume patch reproduces the weight map: ignored voxels weigh 0
    x, y, w = sample_patch(prepared, shape, np.random.default_rng(0), force_fg=False, mirror=False)
    np.testing.assert_array_equal(w, (label != 3).astype(np.uint8))
    np.testing.assert_array_equal(y[label != 3], label[label != 3])


def test_preprocess_case_without_label_is_a_clear_error(tmp_path):
    case = write_case(tmp_path / "raw", "nolabel", np.zeros((4, 5, 6), np.float32), None)
    with pytest.raises(VolsegError, match="no label"):
        preprocess_case(case, DataConfig(), tmp_path / "cache")


# ------------------------------------------------------------------------------------------------
# sample_patch


def small_object_case() -> tuple[CaseData, np.ndarray]:
    label = np.zeros((30, 27, 21), np.uint8)
    label[25:27, 3:5, 17:19] = 1  # 8 voxels near a corner of a much larger volume
    return memory_case(label), label


@pytest.mark.parametrize("seed", range(20))
def test_sample_patch_force_fg_contains_foreground(seed):
    case, _ = small_object_case()
    x, y, w = sample_patch(case, (8, 8, 8), np.random.default_rng(seed), force_fg=True, mirror=True)
    assert (y == 1).any()
    assert x.shape == (1, 8, 8, 8) and y.shape == w.shape == (8, 8, 8)


def test_forced_foreground_survives_strong_augmentation():
    """A 2-voxel-wide object of each class must be in every forced patch after rotation, zoom and
    elastic deformation at their maximum (it is drawn in the patch's central half)."""
    from volseg.config import AugmentConfig

    label = np.zeros((40, 40, 12), np.uint8)
    label[5:7, 30:32, 2:4] = 1  # two tiny objects near the borders
    label[33:35, 6:8, 9:11] = 2
    case = memory_case(label)
    strong = AugmentConfig(rotation_p=1, zoom_p=1, zoom_range=(1.4, 1.4), elastic_p=1, mirror_p=0.5)
    seen = set()
    for seed in range(12):
        _, y, _ = sample_batch([case], (16, 16, 8), 2, np.random.default_rng(seed), fg_fraction=1.0, mirror=False,
                               augment=strong, num_classes=3)
        for b in range(2):
            present = set(torch.unique(y[b]).tolist()) - {0}
            assert present, f"seed {seed}: a forced patch lost its object"
            seen |= present
    assert seen == {1, 2}  # both classes are drawn


def test_sample_patch_without_force_fg_mostly_misses_a_small_object():
    case, _ = small_object_case()
    hits = [
        bool((sample_patch(case, (8, 8, 8), np.random.default_rng(s), force_fg=False, mirror=False)[1] == 1).any())
        for s in range(40)
    ]
    assert sum(hits) < 20  # the forced case above is not an accident of a big object


def big_and_small_object_case() -> CaseData:
    """One class, two objects: a 512-voxel cube and a 1-voxel speck far from it."""
    label = np.zeros((40, 40, 40), np.uint8)
    label[2:10, 2:10, 2:10] = 1
    label[35, 35, 35] = 1
    return memory_case(label)


def _centres_on_the_small_object(case: CaseData, seeds: range) -> int:
    """Forced 4-voxel patches that hold the speck: one foreground voxel (a patch centred on the cube
    holds at least 2 x 2 x 2 of it)."""
    hits = 0
    for s in seeds:
        _, y, _ = sample_patch(case, (4, 4, 4), np.random.default_rng(s), force_fg=True, mirror=False)
        hits += int(y.sum() == 1)
    return hits


def test_object_sampling_centres_small_objects_as_often_as_large_ones():
    case = big_and_small_object_case()
    grouped = vdata.with_objects(case)
    assert [len(g) for g in grouped.fg_objects[1]] == [512, 1]
    assert np.array_equal(np.sort(np.concatenate(grouped.fg_objects[1])), np.arange(513))
    voxel_hits = _centres_on_the_small_object(case, range(200))
    object_hits = _centres_on_the_small_object(grouped, range(200))
    assert voxel_hits < 5  # 1 voxel in 513
    assert 70 < object_hits < 130  # one object in two


def test_object_sampling_draws_as_voxel_sampling_when_a_class_is_one_object():
    """Data whose classes are single objects (the hippocampus) trains exactly as before."""
    label = np.zeros((30, 27, 21), np.uint8)
    label[3:12, 4:10, 5:9] = 1
    label[15:25, 10:20, 5:15] = 2
    case = memory_case(label)
    grouped = vdata.with_objects(case)
    for seed in range(5):
        a = sample_batch([case], (8, 8, 8), 3, np.random.default_rng(seed), fg_fraction=1.0, mirror=True)
        b = sample_batch([grouped], (8, 8, 8), 3, np.random.default_rng(seed), fg_fraction=1.0, mirror=True)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_foreground_sampling_must_be_a_known_method():
    from volseg.config import TrainConfig

    assert TrainConfig(foreground_sampling="object").foreground_sampling == "object"
    with pytest.raises(VolsegError, match="foreground_sampling must be one of voxel, object"):
        TrainConfig(foreground_sampling="lesion")


def test_sample_patch_cuts_the_image_and_label_at_the_same_place():
    label = np.random.default_rng(0).integers(0, 3, size=(13, 11, 9)).astype(np.uint8)
    image = label[None].astype(np.float32) * 10 + 0.5  # image encodes the label
    case = memory_case(label, image=image)
    for seed in range(10):
        x, y, w = sample_patch(case, (6, 5, 4), np.random.default_rng(seed), force_fg=seed % 2 == 0, mirror=True)
        np.testing.assert_array_equal(x[0], y * 10 + 0.5)
        assert w.min() == 1  # the patch fits: no padding


@pytest.mark.parametrize("mirror", [False, True])
def test_sample_patch_padding_has_weight_zero(mirror):
    shape, patch = (5, 6, 3), (8, 7, 9)
    label = np.zeros(shape, np.uint8)
    label[1:3, 2:4, 1] = 1
    case = memory_case(label)  # image = 0 .. 89, every voxel distinct
    for seed in range(5):
        x, y, w = sample_patch(case, patch, np.random.default_rng(seed), force_fg=seed % 2 == 1, mirror=mirror)
        assert w.shape == patch and w.dtype == np.uint8
        assert int(w.sum()) == int(np.prod(shape))  # exactly the volume's voxels weigh 1
        np.testing.assert_array_equal(np.sort(x[0][w == 1]), np.asarray(case.image).ravel())
        assert np.all(x[0][w == 0] == 0) and np.all(y[w == 0] == 0)
        assert int((y == 1).sum()) == 4  # the whole object is in the patch


def test_sample_patch_mirroring_flips_all_three_arrays_together():
    label = np.random.default_rng(1).integers(0, 2, size=(7, 6, 5)).astype(np.uint8)
    weight = np.random.default_rng(2).integers(0, 2, size=(7, 6, 5)).astype(np.uint8)
    image = (label * 100 + weight * 10)[None].astype(np.float32)
    case = memory_case(label, weight=weight, image=image)
    flipped = 0
    for seed in range(8):
        x, y, w = sample_patch(case, (7, 6, 5), np.random.default_rng(seed), force_fg=False, mirror=True)
        np.testing.assert_array_equal(x[0], y * 100 + w * 10)
        flipped += not np.array_equal(y, label)
    assert flipped > 0


# ------------------------------------------------------------------------------------------------
# sample_batch and BatchStream


def two_cases() -> list[CaseData]:
    a = np.zeros((12, 10, 9), np.uint8)
    a[1:3, 1:3, 1:3] = 1
    b = np.zeros((9, 14, 11), np.uint8)
    b[7:9, 11:13, 8:10] = 2
    return [memory_case(a), memory_case(b)]


def test_sample_batch_shapes_dtypes_and_foreground():
    x, y, w = sample_batch(two_cases(), (8, 8, 8), 3, np.random.default_rng(0), fg_fraction=1.0, mirror=True)
    assert x.shape == (3, 1, 8, 8, 8) and x.dtype == torch.float32
    assert y.shape == (3, 8, 8, 8) and y.dtype == torch.int64
    assert w.shape == (3, 8, 8, 8) and w.dtype == torch.float32
    for b in range(3):
        assert (y[b] > 0).any()  # fg_fraction 1: every patch holds an object


def test_sample_batch_is_reproducible_with_the_same_rng():
    first = sample_batch(two_cases(), (8, 8, 8), 2, np.random.default_rng(4), fg_fraction=0.5, mirror=True)
    second = sample_batch(two_cases(), (8, 8, 8), 2, np.random.default_rng(4), fg_fraction=0.5, mirror=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_batch_stream_yields_the_batches_sample_batch_would():
    stream = BatchStream(two_cases(), (8, 8, 8), 2, np.random.default_rng(7), 0.5, True)
    try:
        got = [next(stream) for _ in range(3)]
    finally:
        stream.close()
    rng = np.random.default_rng(7)
    for batch in got:
        expected = sample_batch(two_cases(), (8, 8, 8), 2, rng, 0.5, True)
        for a, b in zip(batch, expected):
            assert torch.equal(a, b)


def test_batch_stream_surfaces_an_error_raised_while_sampling(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("patch cutting failed")

    monkeypatch.setattr(vdata, "sample_batch", broken)
    stream = BatchStream(two_cases(), (8, 8, 8), 2, np.random.default_rng(0), 0.5, True)
    try:
        with pytest.raises(RuntimeError, match="patch cutting failed"):
            next(stream)
    finally:
        stream.close()


def test_batch_stream_surfaces_a_real_sampling_error():
    stream = BatchStream([], (8, 8, 8), 2, np.random.default_rng(0), 0.5, True)  # no cases to draw from
    try:
        with pytest.raises(ValueError):
            next(stream)
    finally:
        stream.close()


def test_batch_stream_close_stops_the_thread():
    stream = BatchStream(two_cases(), (8, 8, 8), 2, np.random.default_rng(0), 0.5, False, prefetch=1)
    next(stream)
    stream.close()
    assert not stream._thread.is_alive()


def test_augmented_batch_shapes_values_and_reproducibility():
    from volseg.config import AugmentConfig

    strong = AugmentConfig(rotation_p=1, zoom_p=1, elastic_p=1, noise_p=1, brightness_p=1, contrast_p=1,
                           gamma_p=1, gamma_invert_p=1, blur_p=1, lowres_p=1, mirror_p=0.5)
    first = sample_batch(two_cases(), (8, 8, 8), 4, np.random.default_rng(7), fg_fraction=1.0, mirror=False,
                         augment=strong, num_classes=3)
    second = sample_batch(two_cases(), (8, 8, 8), 4, np.random.default_rng(7), fg_fraction=1.0, mirror=False,
                          augment=strong, num_classes=3)
    x, y, w = first
    assert x.shape == (4, 1, 8, 8, 8) and x.dtype == torch.float32
    assert y.shape == (4, 8, 8, 8) and y.dtype == torch.int64
    assert w.shape == (4, 8, 8, 8) and w.dtype == torch.float32
    assert set(torch.unique(y).tolist()) <= {0, 1, 2}  # nearest labels: no invented values
    assert set(torch.unique(w).tolist()) <= {0.0, 1.0}
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_identity_augmentation_equals_plain_patches():
    from volseg.config import AugmentConfig

    off = AugmentConfig(rotation_p=0, zoom_p=0, elastic_p=0, noise_p=0, brightness_p=0, contrast_p=0, gamma_p=0,
                        gamma_invert_p=0, blur_p=0, lowres_p=0, mirror_p=0)
    aug = sample_batch(two_cases(), (8, 8, 8), 3, np.random.default_rng(2), fg_fraction=0.5, mirror=False,
                       augment=off, num_classes=3)
    # the same rng stream without augmentation: parameters are drawn first, so draw them to stay in step
    from volseg import augment

    rng = np.random.default_rng(2)
    augment.sample_params(rng, 3, off, two_cases()[0].spacing, (8, 8, 8))
    plain = sample_batch(two_cases(), (8, 8, 8), 3, rng, fg_fraction=0.5, mirror=False)
    for a, b in zip(aug, plain):
        assert torch.equal(a, b.to(a.dtype))


def test_deferred_augmentation_matches_immediate():
    """On a GPU the regions are resampled on the device; the result equals resampling in the loader."""
    from volseg.config import AugmentConfig
    from volseg.data import finish_augment

    strong = AugmentConfig(rotation_p=1, zoom_p=1, elastic_p=1, noise_p=0, mirror_p=0.5)
    now = sample_batch(two_cases(), (8, 8, 8), 3, np.random.default_rng(5), 1.0, False, augment=strong, num_classes=3)
    later = sample_batch(two_cases(), (8, 8, 8), 3, np.random.default_rng(5), 1.0, False, augment=strong,
                         num_classes=3, defer_augment=True)
    assert len(later) == 4 and later[0].shape[2:] != (8, 8, 8)  # regions larger than the patch
    for a, b in zip(now, finish_augment(*later, (8, 8, 8), 3)):
        assert torch.equal(a, b)
