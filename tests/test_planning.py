"""volseg.planning: patch and depth from a dataset fingerprint, and the config built from them."""

from __future__ import annotations

import dataclasses
import doctest
import subprocess
import sys

import numpy as np
import pytest

import volseg.planning as vplan
from volseg.config import Config, DataConfig
from volseg.planning import plan_config, plan_patch


def test_doctests():
    assert doctest.testmod(vplan).failed == 0


@pytest.mark.parametrize(
    ("shape", "spacing", "max_voxels", "expected"),
    [
        ((35, 50, 36), (1, 1, 1), 80**3, ((32, 48, 32), 4)),  # fits: nearest multiples of 8, halves down
        ((37, 53, 45), (1, 1, 1), 80**3, ((40, 56, 48), 4)),  # more than half a divisor over: up
        ((64, 64, 64), (1, 1, 1), 80**3, ((64, 64, 64), 5)),  # 64 / 16 = 4 voxels at the bottleneck
        ((8, 128, 128), (1, 1, 1), 80**3, ((8, 128, 128), 2)),  # thin: only one pooling keeps 4 voxels
        ((3, 64, 64), (1, 1, 1), 80**3, ((2, 64, 64), 2)),  # depth never below 2; 3 is 1.5 divisors: down
        ((1, 64, 64), (1, 1, 1), 80**3, ((2, 64, 64), 2)),  # never below one divisor
        ((20, 30, 12), (1, 1, 1), 80**3, ((20, 30, 12), 2)),  # depth 3 would leave 12 / 4 = 3 < 4 voxels
    ],
)
def test_plan_patch_known(shape, spacing, max_voxels, expected):
    assert plan_patch(shape, spacing, max_voxels) == expected


@pytest.mark.parametrize(
    ("shape", "spacing", "max_voxels"),
    [
        ((35, 50, 36), (1, 1, 1), 80**3),
        ((100, 100, 100), (1, 1, 3), 600_000),
        ((300, 200, 90), (0.8, 0.8, 2.5), 80**3),
        ((17, 513, 499), (5, 0.7, 0.7), 160**3),
        ((57, 41, 23), (1.5, 1, 3), 80**3),
    ],
)
def test_patch_divisible_by_pooling(shape, spacing, max_voxels):
    patch, depth = plan_patch(shape, spacing, max_voxels)
    assert 2 <= depth <= 5
    assert all(p % 2 ** (depth - 1) == 0 for p in patch)
    assert all(isinstance(p, int) for p in patch)
    assert min(patch) / 2 ** (depth - 1) >= 4 or depth == 2


def test_anisotropic_spacing_shrinks_physically_longest_axis_first():
    # 100 voxels on every axis, but the last is 3 mm per voxel: 300 mm against 100 mm
    patch, _ = plan_patch((100, 100, 100), (1, 1, 3), 600_000)
    assert patch[0] == patch[1] >= 96  # untouched but for rounding to the pooling divisor
    assert patch[2] < patch[0]
    # the same shape with isotropic spacing shrinks the first axis first (ties go to the first axis)
    iso, _ = plan_patch((100, 100, 100), (1, 1, 1), 600_000)
    assert iso != patch


def test_shrinking_stops_near_equal_physical_extent():
    # 40 x 400 x 400 voxels of 5 x 0.5 x 0.5 mm: 200 mm on every axis, too many voxels
    patch, _ = plan_patch((40, 400, 400), (5, 0.5, 0.5), 80**3)
    extent = np.array(patch) * np.array([5, 0.5, 0.5])
    assert extent.max() / extent.min() < 1.5


def test_patch_within_budget_after_rounding():
    """The docstring promises a patch that fits `max_voxels`; rounding up to the divisor must not
    undo the shrinking: 100 x 100 x 57 fits 600 000 voxels, 104 x 104 x 64 does not."""
    patch, _ = plan_patch((100, 100, 100), (1, 1, 3), 600_000)
    assert int(np.prod(patch)) <= 600_000


def test_thin_anisotropic_stack_terminates(src_env):
    """A thin stack of thick slices (10 x 1024 x 1024 at 10 x 0.25 x 0.25 mm, electron-microscopy
    like) used to loop for ever: the first axis is physically longest, and floored at 8 voxels it
    never shrinks again. Run it in a child process so that a hang fails instead of blocking the suite."""
    code = (
        "from volseg.planning import plan_patch;"
        "print(plan_patch((10, 1024, 1024), (10, 0.25, 0.25), 80**3))"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=src_env,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("plan_patch((10, 1024, 1024), (10, 0.25, 0.25), 80**3) does not terminate")
    assert done.returncode == 0, done.stderr
    patch, depth = eval(done.stdout)  # a tuple literal printed by the child
    assert int(np.prod(patch)) <= 80**3
    assert all(p % 2 ** (depth - 1) == 0 for p in patch)


def two_channel_data() -> DataConfig:
    return DataConfig(
        channel_names=("t1", "t2"),
        labels=(("background", 0), ("liver", 1), ("tumour", 3), ("unlabelled", 9)),
        ignore_label=9,
        normalization="zscore_nonzero",
    )


def test_plan_config_from_data():
    data = dataclasses.replace(two_channel_data(), spacing=(1.0, 1.0, 3.0))
    shapes = [(40, 50, 30), (44, 52, 36), (60, 48, 30)]  # at the target spacing
    cfg = plan_config(data, shapes, "cpu")
    assert isinstance(cfg, Config)
    assert cfg.model.in_channels == 2
    assert cfg.model.num_classes == 3  # 0, 1, 3; the ignore label is not a class
    assert cfg.data.spacing == (1.0, 1.0, 3.0)  # kept from the data config
    assert cfg.data.labels == data.labels and cfg.data.normalization == "zscore_nonzero"
    assert cfg.data.channel_names == ("t1", "t2")
    patch, depth = plan_patch((44, 50, 30), (1.0, 1.0, 3.0), 80**3)
    assert cfg.train.patch_size == patch
    assert cfg.model.depth == depth
    assert all(p % 2 ** (cfg.model.depth - 1) == 0 for p in cfg.train.patch_size)
    assert 2 <= cfg.train.batch_size <= 16
    assert Config.from_json(cfg.to_json()) == cfg


def test_plan_config_device_budget():
    data = DataConfig()
    shapes = [(200, 200, 200)] * 3
    cpu = plan_config(data, shapes, "cpu")
    gpu = plan_config(data, shapes, "cuda")
    assert np.prod(gpu.train.patch_size) > np.prod(cpu.train.patch_size)
    assert gpu.model.base_width >= cpu.model.base_width
    assert cpu.model.in_channels == 1 and cpu.model.num_classes == 2


def test_make_plan_ct_channel_and_anisotropic_spacing(tmp_path):
    """A CT channel gets clip + global z-score statistics from the labelled voxels; spacing is planned."""
    import json

    from volseg import io
    from volseg.planning import make_plan
    from volseg.train import data_config_from_dataset

    rng = np.random.default_rng(0)
    root = tmp_path / "ct"
    for i, spacing in enumerate([(0.8, 0.8, 5.0), (0.8, 0.8, 5.0), (0.7, 0.7, 2.5)]):
        image = rng.normal(-800, 50, size=(32, 32, 8)).astype(np.float32)
        label = np.zeros((32, 32, 8), np.uint8)
        label[10:20, 10:20, 2:6] = 1
        image[label == 1] = rng.normal(60, 20, size=int(label.sum()))
        affine = np.diag([*spacing, 1.0])
        io.write_volume(root / "imagesTr" / f"c{i}_0000.nii.gz", image, affine=affine)
        io.write_volume(root / "labelsTr" / f"c{i}.nii.gz", label, affine=affine)
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    info, cases = io.read_dataset(root)
    cfg, fingerprint = make_plan(data_config_from_dataset(info), cases, "cpu")
    assert cfg.data.channel_methods == ("ct",)
    lo, hi, mean, std = cfg.data.intensity_stats[0]
    assert 0 < lo < 60 < hi and 40 < mean < 80 and 10 < std < 30  # from the organ, not the -800 background
    assert cfg.data.spacing[:2] == (0.8, 0.8) and 0.8 <= cfg.data.spacing[2] <= 5.0
    assert fingerprint["n_cases"] == 3 and fingerprint["channel_normalization"] == ["ct"]
    assert all(p % 2 ** (cfg.model.depth - 1) == 0 for p in cfg.train.patch_size)
