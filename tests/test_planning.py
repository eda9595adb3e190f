"""volseg.planning: patch and depth from a dataset fingerprint, and the config built from them."""

from __future__ import annotations

import dataclasses
import doctest
import subprocess
import sys

import numpy as np
import pytest

import volseg.planning as vplan
from volseg.config import Config, DataConfig, ModelConfig
from volseg.model import size_divisor
from volseg.planning import plan_config, plan_network, plan_patch, plan_patch_and_network


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
    patch, network = plan_patch_and_network(shape, spacing, max_voxels)
    depth = network.depth
    assert 2 <= depth <= 5 and plan_patch(shape, spacing, max_voxels) == (patch, depth)
    divisors = network.divisors()
    assert all(p % d == 0 for p, d in zip(patch, divisors))
    assert all(isinstance(p, int) for p in patch)
    # every pooled axis keeps at least 4 voxels at the bottleneck
    assert all(p // d >= 4 for p, d in zip(patch, divisors) if d > 1) or depth == 2


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
    divisors = plan_patch_and_network((10, 1024, 1024), (10, 0.25, 0.25), 80**3)[1].divisors()
    assert divisors[0] == 1 and all(p % d == 0 for p, d in zip(patch, divisors))  # the 10 mm axis is never pooled


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
    patch, network = plan_patch_and_network((44, 50, 30), (1.0, 1.0, 3.0), 80**3)
    assert cfg.train.patch_size == patch
    assert cfg.model.depth == network.depth and cfg.model.pool_sizes == network.pools
    assert cfg.model.pool_sizes[0] == (2, 2, 1)  # 3 mm is more than 2x the 1 mm axes: not pooled at first
    assert all(p % d == 0 for p, d in zip(cfg.train.patch_size, size_divisor(cfg.model)))
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

    from volseg import layout, volumes
    from volseg.planning import make_plan
    from volseg.planning import data_config_from_dataset

    rng = np.random.default_rng(0)
    root = tmp_path / "ct"
    for i, spacing in enumerate([(0.8, 0.8, 5.0), (0.8, 0.8, 5.0), (0.7, 0.7, 2.5)]):
        image = rng.normal(-800, 50, size=(32, 32, 8)).astype(np.float32)
        label = np.zeros((32, 32, 8), np.uint8)
        label[10:20, 10:20, 2:6] = 1
        image[label == 1] = rng.normal(60, 20, size=int(label.sum()))
        affine = np.diag([*spacing, 1.0])
        volumes.write_volume(root / "imagesTr" / f"c{i}_0000.nii.gz", image, affine=affine)
        volumes.write_volume(root / "labelsTr" / f"c{i}.nii.gz", label, affine=affine)
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    info, cases = layout.read_dataset(root)
    cfg, fingerprint = make_plan(data_config_from_dataset(info), cases, "cpu")
    assert cfg.data.channel_methods == ("ct",)
    lo, hi, mean, std = cfg.data.intensity_stats[0]
    assert 0 < lo < 60 < hi and 40 < mean < 80 and 10 < std < 30  # from the organ, not the -800 background
    assert cfg.data.spacing[:2] == (0.8, 0.8) and 0.8 <= cfg.data.spacing[2] <= 5.0
    assert fingerprint["n_cases"] == 3 and fingerprint["channel_normalization"] == ["ct"]
    assert all(p % d == 0 for p, d in zip(cfg.train.patch_size, size_divisor(cfg.model)))


# ---- per-level pooling and kernels from the spacing ---------------------------------------------------

def test_isotropic_spacing_plans_the_plain_3d_unet():
    network = plan_network((1.0, 1.0, 1.0), (32, 48, 32))
    assert network.isotropic and network.depth == 4
    assert network.model_fields() == {"depth": 4, "kernel_sizes": (), "pool_sizes": ()}  # as old model files
    # near-isotropic (within 2x) is still pooled 2x2x2 everywhere
    assert plan_network((1.0, 1.0, 1.8), (64, 64, 40)).isotropic


def test_hippocampus_like_plan_is_unchanged():
    """The planned 60-minute hippocampus runs (32x48x32, depth 4, 3x3x3 / 2x2x2) must plan as before."""
    data = DataConfig(spacing=(1.0, 1.0, 1.0))
    cfg = plan_config(data, [(35, 50, 36)] * 5, "cpu")
    assert cfg.train.patch_size == (32, 48, 32) and cfg.model.depth == 4
    assert cfg.model.kernel_sizes == () and cfg.model.pool_sizes == () and cfg.model.base_width == 16


def test_thick_slices_are_pooled_in_plane_first_with_in_plane_kernels():
    # 0.9 x 0.9 x 5.6 mm: the slice axis is 6x coarser, so it is left alone until the in-plane
    # spacing has been doubled twice (3.6 mm, within 2x of 5.6)
    network = plan_network((0.9, 0.9, 5.6), (128, 144, 24))
    assert network.pools[:2] == ((2, 2, 1), (2, 2, 1))
    assert network.kernels[:2] == ((3, 3, 1), (3, 3, 1))
    assert network.pools[2] == (2, 2, 2) and network.kernels[2] == (3, 3, 3)
    assert network.depth == 5  # deeper than the 3 levels that 2x2x2 pooling of 24 slices allowed
    divisors = network.divisors()
    assert divisors == (16, 16, 4)


def test_extreme_spacing_never_pools_the_thick_axis():
    # electron-microscopy-like: 10 x 0.25 x 0.25 mm
    network = plan_network((10.0, 0.25, 0.25), (8, 256, 256))
    assert all(p[0] == 1 for p in network.pools) and all(k[0] == 1 for k in network.kernels[:-1])
    assert network.depth == 5 and network.divisors() == (1, 16, 16)


def test_a_thin_patch_still_gets_two_levels():
    assert plan_network((1.0, 1.0, 1.0), (3, 64, 64)).depth == 2


def test_thick_slice_mri_plan_coarsens_in_plane_and_sees_most_of_the_slice():
    """512-wide 0.5 mm slices hold 6.5 M voxels per case: the CPU plan coarsens in-plane (3d_lowres
    style) so that its patch sees over 100 mm, where the old plan saw 82 mm at width 8."""
    shapes = [(512, 512, n) for n in (22, 25, 28)]
    spacings = [(0.5, 0.5, s) for s in (6.0, 5.6, 5.0)]
    target = vplan.plan_spacing(spacings)
    shape_at = np.median([vplan.resampled_shape(s, sp, target) for s, sp in zip(shapes, spacings)], 0)
    coarse = vplan.plan_resolution(target, shape_at, 80**3)
    assert coarse[2] == target[2] and 0.5 < coarse[0] == coarse[1] <= 1.0
    cfg = plan_config(DataConfig(spacing=coarse), [vplan.resampled_shape(s, sp, coarse) for s, sp in zip(shapes, spacings)], "cpu")
    fov = np.array(cfg.train.patch_size) * np.array(coarse)
    assert fov[0] > 100 and fov[1] > 100
    assert cfg.model.pool_sizes and cfg.model.pool_sizes[0] == (2, 2, 1) and cfg.model.depth >= 4
    # a GPU's larger patch needs no coarsening
    assert vplan.plan_resolution(target, shape_at, 160**3) == target


def write_lesion_dataset(root, n=4, zero_background=True):
    import json

    from volseg import volumes

    rng = np.random.default_rng(1)
    for i in range(n):
        image = np.zeros((2, 64, 64, 8), np.float32)
        image[:, 8:56, 8:56] = rng.normal(100, 10, size=(2, 48, 48, 8))
        if not zero_background:
            image += 1.0
        label = np.zeros((64, 64, 8), np.uint8)
        label[30:36, 30:38, 3:5] = 1
        affine = np.diag([1.0, 1.0, 5.0, 1.0])
        for c in range(2):
            volumes.write_volume(root / "imagesTr" / f"c{i}_{c:04d}.nii.gz", image[c], affine=affine)
        volumes.write_volume(root / "labelsTr" / f"c{i}.nii.gz", label, affine=affine)
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1c", "1": "FLAIR"}, "labels": {"background": 0, "tumour": 1}, "file_ending": ".nii.gz"}))
    return root


def test_plan_run_explains_each_choice_and_measures_objects(tmp_path):
    import torch

    from volseg import layout
    from volseg.planning import plan_run

    info, cases = layout.read_dataset(write_lesion_dataset(tmp_path / "d"))
    cfg, fingerprint, reasons = plan_run(info, cases, torch.device("cpu"), max_minutes=60, timer=lambda c: 0.01)
    assert fingerprint["object_extent_mm_p90"] == [6.0, 8.0, 10.0]
    assert fingerprint["background_fraction"] > 0.4 and cfg.data.channel_methods == ("zscore_nonzero",) * 2
    text = "\n".join(reasons)
    for word in ("target spacing", "channel 'T1c'", "channel 'FLAIR'", "patch", "network depth", "batch", "width 16 kept"):
        assert word in text
    assert fingerprint["reasons"] == reasons
    assert cfg.model.pool_sizes[0] == (2, 2, 1)  # 5 mm slices beside 1 mm pixels


def test_noisy_background_keeps_plain_zscore(tmp_path):
    import torch

    from volseg import layout
    from volseg.planning import plan_run

    info, cases = layout.read_dataset(write_lesion_dataset(tmp_path / "d", zero_background=False))
    cfg, _, _ = plan_run(info, cases, torch.device("cpu"), max_minutes=60, timer=lambda c: 0.01)
    assert cfg.data.channel_methods == ("zscore", "zscore")


def test_the_planned_patch_is_kept_unless_the_budget_is_too_short_for_a_few_hundred_steps(tmp_path):
    import torch

    from volseg import layout, memory
    from volseg.planning import MIN_PATCH_STEPS, plan_run

    info, cases = layout.read_dataset(write_lesion_dataset(tmp_path / "d"))
    full, _, _ = plan_run(info, cases, torch.device("cpu"), max_minutes=600, timer=lambda c: 0.01)
    voxels = float(np.prod(full.train.patch_size))

    calls: list[tuple[tuple[int, ...], int]] = []

    def timer(c):  # proportional to the patch, 1 s for the planned one, whatever the width
        calls.append((tuple(c.train.patch_size), c.model.base_width))
        return float(np.prod(c.train.patch_size)) / voxels

    # an hour holds 3,240 one-second steps: far below MIN_STEPS, but enough to keep the patch,
    # and since no narrower network is faster here, the width stays too
    cfg, fingerprint, reasons = plan_run(info, cases, torch.device("cpu"), max_minutes=60, timer=timer)
    assert cfg.train.patch_size == full.train.patch_size and cfg.model.base_width == full.model.base_width
    # the patch fit's timing of the planned network serves the width fit too: widths 16 and 8, once each
    assert [w for _, w in calls] == [16, 8] and len(set(calls)) == len(calls)
    assert fingerprint["budget_steps"] == 3240 < memory.MIN_STEPS
    assert any("no width down to 8 reaches" in r for r in reasons)
    # two minutes hold 108 such steps, below MIN_PATCH_STEPS: the patch shrinks toward the objects
    cfg, fingerprint, reasons = plan_run(info, cases, torch.device("cpu"), max_minutes=2, timer=timer)
    assert np.prod(cfg.train.patch_size) < voxels
    assert memory.budget_steps(2, timer(full)) < MIN_PATCH_STEPS < 1.5 * memory.budget_steps(2, timer(cfg))
    floor = vplan.fov_floor(full, fingerprint["object_extent_mm_p90"])
    assert all(p >= f for p, f in zip(cfg.train.patch_size, floor))
    for f, p, s, e in zip(floor, full.train.patch_size, cfg.data.spacing, fingerprint["object_extent_mm_p90"]):
        assert f == p or f * s >= 2 * e  # below the planned patch only where it still spans the objects twice
    assert any(r.startswith(f"patch {cfg.train.patch_size} instead of") for r in reasons)
    assert fingerprint["budget_steps"] == memory.budget_steps(2, timer(cfg))


def test_a_depth_override_on_an_anisotropic_plan_keeps_its_levels():
    base = plan_config(DataConfig(spacing=(0.9, 0.9, 5.6)), [(256, 256, 25)] * 3, "cpu")
    assert base.model.depth == 5
    cfg = vplan.apply_overrides(base, {"model": {"depth": 3}}, None, None)
    assert cfg.model.depth == 3 and cfg.model.pool_sizes == base.model.pool_sizes[:2]
    assert cfg.model.kernel_sizes == (*base.model.kernel_sizes[:2], (3, 3, 3))
    deeper = vplan.apply_overrides(base, {"model": {"depth": 6}}, None, None)
    assert deeper.model.pool_sizes[-1] == (2, 2, 2) and len(deeper.model.kernel_sizes) == 6
