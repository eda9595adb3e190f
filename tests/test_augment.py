"""volseg.augment: sampled parameters, one-grid resampling, known geometric answers, batch consistency."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from volseg import augment
from volseg.augment import AugmentConfig, AugmentParams, apply, identity_params, input_size_for, sample_params
from volseg.errors import VolsegError

ISO = (1.0, 1.0, 1.0)
NO_INTENSITY = {"noise_p": 0, "brightness_p": 0, "contrast_p": 0, "gamma_p": 0, "gamma_invert_p": 0, "blur_p": 0,
                "lowres_p": 0}
ALL_SPATIAL = AugmentConfig(rotation_p=1, zoom_p=1, elastic_p=1, mirror_p=0.5, **NO_INTENSITY)


def _volumes(region: tuple[int, int, int], batch: int = 1, channels: int = 1, seed: int = 0,
             classes: tuple[int, ...] = (0, 1, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.normal(size=(batch, channels, *region)).astype(np.float32))
    label = torch.from_numpy(rng.choice(np.array(classes, dtype=np.uint8), size=(batch, *region)))
    return image, label


def _crop(a: np.ndarray, out: tuple[int, ...]) -> np.ndarray:
    start = [(n - o) // 2 for n, o in zip(a.shape[-3:], out)]
    return a[(..., *[slice(s, s + o) for s, o in zip(start, out)])]


def _with(params: AugmentParams, **values: object) -> AugmentParams:
    return replace(params, **{k: np.asarray(v) for k, v in values.items()})


def test_same_seed_gives_identical_params_and_outputs() -> None:
    cfg = AugmentConfig(rotation_p=0.5, zoom_p=0.5, elastic_p=0.5, noise_p=0.5, brightness_p=0.5, contrast_p=0.5,
                        gamma_p=0.5)
    out = (12, 17, 10)
    region = input_size_for(out, cfg, (1.2, 1.0, 1.5))
    image, label = _volumes(region, batch=4)
    runs = []
    for _ in range(2):
        params = sample_params(np.random.default_rng(7), 4, cfg, (1.2, 1.0, 1.5), out)
        runs.append((params.to_dict(), apply(image, label, None, params, out, 3)))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    other = sample_params(np.random.default_rng(8), 4, cfg, (1.2, 1.0, 1.5), out)
    assert other.to_dict() != runs[0][0]


def test_identity_params_return_the_centre_crop_exactly() -> None:
    out = (9, 14, 11)
    image, label = _volumes((15, 19, 18), batch=2, channels=2)
    weight = (torch.rand(2, 15, 19, 18) > 0.3).to(torch.uint8)
    img, lab, w = apply(image, label, weight, identity_params(2, (0.8, 1.0, 2.5), out), out, 3)
    assert torch.equal(img, torch.from_numpy(_crop(image.numpy(), out)))
    assert torch.equal(lab, torch.from_numpy(_crop(label.numpy(), out)).long())
    assert torch.equal(w, torch.from_numpy(_crop(weight.numpy(), out)).float())
    assert (img.dtype, lab.dtype, w.dtype) == (torch.float32, torch.int64, torch.float32)


def test_mirroring_alone_flips_the_crop_without_interpolation() -> None:
    out = (8, 9, 10)
    image, label = _volumes((12, 13, 14), batch=1)
    params = _with(identity_params(1, ISO, out), mirror=[[True, False, True]])
    img, lab, _ = apply(image, label, None, params, out, 3)
    assert torch.equal(img[0, 0], torch.from_numpy(np.flip(_crop(image[0, 0].numpy(), out), (0, 2)).copy()))
    assert torch.equal(lab[0], torch.from_numpy(np.flip(_crop(label[0].numpy(), out), (0, 2)).copy()).long())


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("label_mode", ["nearest", "linear"])
def test_quarter_turn_equals_rot90_of_the_crop(axis: int, label_mode: str) -> None:
    out = (13, 13, 13)
    image, label = _volumes((19, 19, 19), batch=1)
    angles = np.zeros((1, 3))
    angles[0, axis] = np.pi / 2
    params = replace(_with(identity_params(1, ISO, out), angles_rad=angles), label_mode=label_mode)
    img, lab, w = apply(image, label, None, params, out, 3)
    p, q = [a for a in range(3) if a != axis]
    # the pull map sends output offset (.., u, .., v) to input offset (.., -v, .., u): np.rot90 with k=-1
    expect_img = np.rot90(_crop(image[0, 0].numpy(), out), k=-1, axes=(p, q))
    expect_lab = np.rot90(_crop(label[0].numpy(), out), k=-1, axes=(p, q))
    np.testing.assert_allclose(img[0, 0].numpy(), expect_img, atol=1e-4)
    assert np.array_equal(lab[0].numpy(), expect_lab)
    assert bool((w == 1).all())


def test_a_marker_voxel_lands_where_geometry_says() -> None:
    # spacing (2, 1, 1): a quarter turn in the plane of axes 1 and 2 and a zoom of 0.5 (content halves)
    out = (15, 15, 15)
    region = (31, 31, 31)
    image = torch.zeros((1, 1, *region))
    label = torch.zeros((1, *region), dtype=torch.uint8)
    centre = np.array([15, 15, 15])
    marker = centre + np.array([4, 6, -2])
    label[(0, *marker)] = 2
    image[(0, 0, *marker)] = 1.0
    params = _with(identity_params(1, (2.0, 1.0, 1.0), out), angles_rad=[[np.pi / 2, 0, 0]], zoom=[[0.5] * 3])
    img, lab, _ = apply(image, label, None, params, out, 3)
    m = augment.voxel_matrix((np.pi / 2, 0, 0), (0.5,) * 3, (False,) * 3, (2.0, 1.0, 1.0))
    expected = np.rint(np.array([7, 7, 7]) + np.linalg.solve(m, marker - centre)).astype(int)
    # offset (4, 6, -2) halved to (2, 3, -1); the quarter turn takes (u, v) in the plane to (v, -u)
    assert expected.tolist() == [7 + 2, 7 - 1, 7 - 3]
    assert np.argwhere(lab[0].numpy() == 2).tolist() == [expected.tolist()]
    assert img[(0, 0, *expected)] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("label_mode", ["nearest", "linear"])
def test_labels_only_take_values_of_the_input_and_never_read_outside_the_region(label_mode: str) -> None:
    cfg = replace(ALL_SPATIAL, label_mode=label_mode)
    out = (11, 16, 9)
    spacing = (1.3, 0.9, 1.1)
    region = input_size_for(out, cfg, spacing)
    image, label = _volumes(region, batch=6, classes=(1, 3))
    params = sample_params(np.random.default_rng(3), 6, cfg, spacing, out)
    assert params.spatial.all()
    img, lab, w = apply(image, label, None, params, out, 4)
    assert set(torch.unique(lab).tolist()) <= {1, 3}
    assert bool((w == 1).all())  # input_size_for's region holds every voxel any drawn transform reads
    assert bool(torch.isfinite(img).all())
    # the smaller region that these very parameters need is enough as well
    tight = augment.input_size_for_params(params, out)
    assert all(t <= r for t, r in zip(tight, region))
    _, lab2, w2 = apply(torch.from_numpy(_crop(image.numpy(), tight)), torch.from_numpy(_crop(label.numpy(), tight)),
                        None, params, out, 4)
    assert bool((w2 == 1).all())
    assert torch.equal(lab2, lab)


def test_weight_is_zero_where_the_grid_samples_outside_the_input() -> None:
    out = (9, 9, 9)
    image, label = _volumes(out, batch=1)  # no margin: rotated corners fall outside
    params = _with(identity_params(1, ISO, out), angles_rad=[[np.pi / 4, 0, 0]])
    img, lab, w = apply(image, label, None, params, out, 3)
    # exact geometry in float64: input position of every output voxel
    m = augment.voxel_matrix((np.pi / 4, 0, 0), (1, 1, 1), (False,) * 3, ISO)
    offsets = np.stack(np.meshgrid(*[np.arange(9) - 4.0] * 3, indexing="ij"), -1)
    pos = 4.0 + offsets @ m.T
    nearest = np.rint(pos)
    inside = ((nearest >= 0) & (nearest <= 8)).all(-1)
    clear = (np.abs(np.abs(pos - 4.0) - 4.5) > 1e-3).all(-1)  # away from the rounding edge
    assert (~inside & clear).any() and (inside & clear).any()
    assert bool((w.numpy()[0][~inside & clear] == 0).all())
    assert bool((w.numpy()[0][inside & clear] == 1).all())
    idx = nearest[inside & clear].astype(int)
    assert np.array_equal(lab[0].numpy()[inside & clear], label[0].numpy()[tuple(idx.T)])


def test_ignore_mask_follows_the_label() -> None:
    out = (12, 12, 12)
    region = (20, 20, 20)
    image, label = _volumes(region, batch=1)
    weight = torch.ones((1, *region), dtype=torch.uint8)
    weight[:, :, 10:] = 0  # the second half along axis 1 is unlabelled
    label[weight == 0] = 0
    params = _with(identity_params(1, ISO, out), angles_rad=[[0.3, 0.2, -0.4]], zoom=[[1.2] * 3])
    img, lab, w = apply(image, label, weight, params, out, 3)
    # every output voxel's weight is that of the voxel its label came from: mark labelled voxels via the label
    marked = label.clone()
    marked[weight == 1] += 10
    _, lab_marked, _ = apply(image, marked, None, params, out, 13)
    assert torch.equal(w > 0, lab_marked >= 10)
    assert 0 < float(w.mean()) < 1


def test_zoom_two_stretches_a_known_pattern() -> None:
    out = (10, 12, 14)
    region = (16, 18, 20)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in region], indexing="ij")
    ramp = torch.from_numpy(i + 10 * j + 100 * k)[None, None]
    stripes = torch.from_numpy(((i // 2) % 2).astype(np.uint8))[None]  # stripes 2 voxels wide along axis 0
    params = _with(identity_params(1, ISO, out), zoom=[[2.0] * 3])
    img, lab, _ = apply(ramp, stripes, None, params, out, 2)
    o = img[0, 0].numpy().astype(np.float64)
    np.testing.assert_allclose(np.diff(o, axis=0), 0.5, atol=1e-3)
    np.testing.assert_allclose(np.diff(o, axis=1), 5.0, atol=1e-3)
    np.testing.assert_allclose(np.diff(o, axis=2), 50.0, atol=1e-2)
    centre_in = (np.array(region) - np.array(out)) // 2 + (np.array(out) - 1) / 2
    assert o.mean() == pytest.approx(centre_in @ [1, 10, 100], abs=1e-2)
    runs = np.diff(np.flatnonzero(np.diff(lab[0, :, 0, 0].numpy()) != 0))
    assert runs.tolist() and set(runs.tolist()) == {4}  # 2-voxel stripes come out 4 voxels wide


def test_elastic_displacement_is_smooth_and_bounded_by_its_magnitude() -> None:
    out = (20, 24, 22)
    cfg = AugmentConfig(rotation_p=0, zoom_p=0, elastic_p=1, elastic_magnitude_mm=(3.0, 3.0), elastic_spacing_mm=8.0,
                        mirror_p=0)
    spacing = (1.0, 1.5, 1.0)
    params = sample_params(np.random.default_rng(0), 2, cfg, spacing, out)
    region = (40, 40, 40)
    grid = augment.sampling_grid(params, region, out, dtype=torch.float64).numpy()[..., ::-1]
    pos = (grid + 1) / 2 * (np.array(region) - 1)
    base = np.stack(np.meshgrid(*[np.arange(n) for n in out], indexing="ij"), -1) + (np.array(region) - out) // 2
    disp_mm = (pos - base) * spacing
    bound = np.abs(params.elastic_mm).reshape(2, -1, 3).max(1)
    assert (np.abs(disp_mm).reshape(2, -1, 3).max(1) <= bound + 1e-9).all()
    assert np.abs(disp_mm).max() > 0.5
    # neighbouring voxels move alike: a smooth field, not noise
    steps = np.abs(np.diff(disp_mm, axis=1)).max()
    assert steps < 0.35 * np.abs(disp_mm).max()


def test_anisotropic_spacing_rotates_and_deforms_in_plane_only() -> None:
    spacing = (0.8, 0.8, 4.0)
    cfg = replace(ALL_SPATIAL, mirror_p=0)
    params = sample_params(np.random.default_rng(1), 16, cfg, spacing, (24, 24, 6))
    assert (params.angles_rad[:, :2] == 0).all() and (params.angles_rad[:, 2] != 0).all()
    assert (params.zoom[:, 2] == 1).all() and (params.elastic_mm[..., 2] == 0).all()
    assert input_size_for((24, 24, 6), cfg, spacing)[2] == 6
    # every output slice along the thick axis is drawn from the same input slice alone
    out = (24, 24, 6)
    region = input_size_for(out, cfg, spacing)
    slice_value = torch.arange(region[2], dtype=torch.float32) * 10
    image = slice_value.expand(4, 1, *region).contiguous()
    label = torch.zeros((4, *region), dtype=torch.uint8)
    img, _, w = apply(image, label, None, params.subset([0, 1, 2, 3]), out, 2)
    assert bool((w == 1).all())
    np.testing.assert_allclose(img.numpy(), _crop(image.numpy(), out)[:, :, :1, :1, :].repeat(24, 2).repeat(24, 3),
                               atol=1e-3)


def test_noise_changes_the_image_only() -> None:
    out = (16, 16, 16)
    image, label = _volumes((20, 20, 20), batch=2)
    weight = (torch.rand(2, 20, 20, 20) > 0.5).float()
    params = _with(identity_params(2, ISO, out), noise_std=[0.2, 0.0], noise_seed=[5, 6])
    img, lab, w = apply(image, label, weight, params, out, 3)
    crop = torch.from_numpy(_crop(image.numpy(), out))
    assert torch.equal(lab, torch.from_numpy(_crop(label.numpy(), out)).long())
    assert torch.equal(w, torch.from_numpy(_crop(weight.numpy(), out)))
    assert torch.equal(img[1], crop[1])
    noise = (img[0] - crop[0]).numpy()
    assert noise.std() == pytest.approx(0.2, rel=0.05) and abs(noise.mean()) < 0.01


def test_brightness_contrast_gamma_keep_what_they_promise() -> None:
    out = (12, 12, 12)
    image, label = _volumes(out, batch=3)
    image = image * 2 + 1
    params = _with(identity_params(3, ISO, out), brightness=[1.2, 1.0, 1.0], contrast=[1.0, 0.7, 1.0],
                   gamma=[1.0, 1.0, 1.4])
    img, _, _ = apply(image, label, None, params, out, 3)
    np.testing.assert_allclose(img[0].numpy(), image[0].numpy() * 1.2, rtol=1e-6)
    x, y = image[1].numpy(), img[1].numpy()
    assert y.mean() == pytest.approx(x.mean(), abs=1e-4) and y.std() < x.std()
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6
    x, y = image[2].numpy(), img[2].numpy()
    assert y.mean() == pytest.approx(x.mean(), abs=1e-3) and y.std() == pytest.approx(x.std(), rel=1e-3)
    assert not np.allclose(x, y, atol=1e-2)


def test_intensity_factors_are_drawn_per_channel_as_nnunet_does() -> None:
    """Two sequences get their own brightness / contrast / gamma, so the network never learns a
    fixed intensity ratio between them; one channel draws what it always drew."""
    cfg = AugmentConfig(brightness_p=1, contrast_p=1, gamma_p=1)
    one = sample_params(np.random.default_rng(5), 8, cfg, ISO, (8, 8, 8))
    assert one.brightness.shape == (8,)
    assert np.array_equal(one.gamma, sample_params(np.random.default_rng(5), 8, cfg, ISO, (8, 8, 8), channels=1).gamma)
    two = sample_params(np.random.default_rng(5), 8, cfg, ISO, (8, 8, 8), channels=2)
    for name in ("brightness", "contrast", "gamma"):
        values = getattr(two, name)
        assert values.shape == (8, 2) and not np.array_equal(values[:, 0], values[:, 1]), name
    sometimes = sample_params(np.random.default_rng(6), 64, AugmentConfig(brightness_p=0.5), ISO, (8, 8, 8), channels=3)
    drawn = sometimes.brightness != 1
    assert np.array_equal(drawn, np.repeat(drawn[:, :1], 3, axis=1)) and 0 < drawn[:, 0].mean() < 1  # per sample

    out = (10, 10, 10)
    image, label = _volumes(out, batch=1, channels=2)
    image = image * 2 + 1
    params = _with(identity_params(1, ISO, out), brightness=[[1.2, 0.8]])
    img, _, _ = apply(image, label, None, params, out, 3)
    np.testing.assert_allclose(img[0, 0].numpy(), image[0, 0].numpy() * 1.2, rtol=1e-6)
    np.testing.assert_allclose(img[0, 1].numpy(), image[0, 1].numpy() * 0.8, rtol=1e-6)
    params = _with(identity_params(1, ISO, out), gamma=[[1.0, 1.4]], contrast=[[0.7, 1.0]])
    img, _, _ = apply(image, label, None, params, out, 3)
    assert img[0, 0].std() < image[0, 0].std() and not torch.allclose(img[0, 1], image[0, 1], atol=1e-2)


def test_a_mixed_batch_equals_its_samples_one_by_one() -> None:
    out = (11, 13, 12)
    cfg = AugmentConfig(rotation_p=1, zoom_p=1, elastic_p=1, noise_p=1, brightness_p=1, contrast_p=1, gamma_p=1,
                        gamma_invert_p=1, blur_p=1, lowres_p=1)
    region = input_size_for(out, cfg, ISO)
    image, label = _volumes(region, batch=6, channels=2, seed=4)
    weight = (torch.rand(6, *region) > 0.2).to(torch.uint8)
    drawn = sample_params(np.random.default_rng(2), 6, cfg, ISO, out, channels=2)
    ident = replace(identity_params(6, ISO, out, cfg.elastic_spacing_mm), brightness=np.ones((6, 2)),
                    contrast=np.ones((6, 2)), gamma=np.ones((6, 2)), gamma_inverted=np.ones((6, 2)),
                    blur_sigma=np.zeros((6, 2, 3)), lowres_scale=np.ones((6, 2, 3)))
    intensity = ("noise_std", "blur_sigma", "brightness", "contrast", "lowres_scale", "gamma_inverted", "gamma")
    keep = {  # sample -> transforms it keeps: none, mirror only, rotation, zoom + elastic, intensity, all
        0: (), 1: ("mirror",), 2: ("angles_rad",), 3: ("zoom", "elastic_mm"),
        4: intensity,
        5: ("angles_rad", "zoom", "elastic_mm", "mirror", *intensity),
    }
    values = {}
    for name in ("angles_rad", "zoom", "elastic_mm", "mirror", *intensity):
        v = getattr(ident, name).copy()
        for n, kept in keep.items():
            if name in kept:
                v[n] = getattr(drawn, name)[n]
        values[name] = v
    values["mirror"][1] = [True, True, False]
    params = replace(ident, noise_seed=drawn.noise_seed, **values)
    assert params.spatial.tolist() == [False, False, True, True, False, True]
    img, lab, w = apply(image, label, weight, params, out, 3)
    for n in range(6):
        one = apply(image[n:n + 1], label[n:n + 1], weight[n:n + 1], params.subset([n]), out, 3)
        np.testing.assert_allclose(img[n:n + 1].numpy(), one[0].numpy(), atol=1e-4)
        assert float((lab[n:n + 1] != one[1]).float().mean()) < 0.005  # nearest may flip on exact ties
        assert float((w[n:n + 1] != one[2]).float().mean()) < 0.005
    assert torch.equal(img[0], torch.from_numpy(_crop(image[0].numpy(), out)))


def test_params_survive_json_and_replay_identically() -> None:
    out = (10, 10, 10)
    cfg = AugmentConfig(rotation_p=1, elastic_p=1, noise_p=1)
    params = sample_params(np.random.default_rng(0), 2, cfg, ISO, out)
    again = AugmentParams.from_dict(json.loads(json.dumps(params.to_dict())))
    image, label = _volumes(input_size_for(out, cfg, ISO), batch=2)
    for a, b in zip(apply(image, label, None, params, out, 3), apply(image, label, None, again, out, 3)):
        assert torch.equal(a, b)


def test_changing_one_probability_does_not_change_the_other_draws() -> None:
    a = sample_params(np.random.default_rng(0), 5, AugmentConfig(), ISO, (16, 16, 16))
    b = sample_params(np.random.default_rng(0), 5, AugmentConfig(noise_p=0.9, rotation_p=0.0), ISO, (16, 16, 16))
    assert np.array_equal(a.zoom, b.zoom) and np.array_equal(a.elastic_mm, b.elastic_mm)
    assert np.array_equal(a.mirror, b.mirror) and np.array_equal(a.gamma, b.gamma)


def test_bad_input_is_refused_with_a_clear_message() -> None:
    image, label = _volumes((8, 8, 8))
    params = identity_params(1, ISO, (10, 10, 10))
    with pytest.raises(VolsegError, match="input_size_for"):
        apply(image, label, None, params, (10, 10, 10), 3)
    with pytest.raises(VolsegError, match="integer class indices"):
        apply(image, label.float(), None, identity_params(1, ISO, (6, 6, 6)), (6, 6, 6), 3)
    with pytest.raises(VolsegError, match="2 samples"):
        apply(image, label, None, identity_params(2, ISO, (6, 6, 6)), (6, 6, 6), 3)
    with pytest.raises(VolsegError, match="probability"):
        AugmentConfig(noise_p=1.5)
    with pytest.raises(VolsegError, match="label_mode"):
        AugmentConfig(label_mode="cubic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_agrees_with_cpu() -> None:
    out = (16, 18, 14)
    region = input_size_for(out, ALL_SPATIAL, ISO)
    image, label = _volumes(region, batch=3)
    params = sample_params(np.random.default_rng(0), 3, replace(ALL_SPATIAL, noise_p=0), ISO, out)
    cpu = apply(image, label, None, params, out, 3)
    gpu = apply(image.cuda(), label.cuda(), None, params, out, 3)
    np.testing.assert_allclose(gpu[0].cpu().numpy(), cpu[0].numpy(), atol=1e-4)
    assert float((gpu[1].cpu() != cpu[1]).float().mean()) < 0.005


def test_blur_and_low_resolution_stay_in_plane_for_thick_slices_and_pick_channels() -> None:
    cfg = AugmentConfig(blur_p=1, lowres_p=1)
    thick = sample_params(np.random.default_rng(3), 400, cfg, (0.8, 0.8, 4.0), (24, 24, 6), channels=2)
    assert (thick.blur_sigma[..., 2] == 0).all() and (thick.lowres_scale[..., 2] == 1).all()
    blurred = (thick.blur_sigma > 0).any(-1)
    assert 0.4 < blurred.mean() < 0.6  # each channel of a drawn sample with probability 1/2, as nnU-Net
    assert ((thick.blur_sigma[..., :2] >= 0.5) & (thick.blur_sigma[..., :2] <= 1.0))[blurred].all()
    lowres = (thick.lowres_scale < 1).any(-1)
    assert 0.4 < lowres.mean() < 0.6
    # one factor for the axes it touches
    assert (thick.lowres_scale[..., 0] == thick.lowres_scale[..., 1]).all()
    iso = sample_params(np.random.default_rng(3), 50, cfg, ISO, (16, 16, 16), channels=1)
    assert (iso.blur_sigma[..., 2] > 0).any() and (iso.lowres_scale[..., 2] < 1).any()
    # off (the default), they draw nothing, so the other transforms of later batches draw what they drew before
    rng_off, rng_on = np.random.default_rng(3), np.random.default_rng(3)
    off = sample_params(rng_off, 50, AugmentConfig(), ISO, (16, 16, 16))
    assert off.blur_sigma is None and off.lowres_scale is None and off.gamma_inverted is None
    on = sample_params(rng_on, 50, cfg, ISO, (16, 16, 16))
    for name in ("angles_rad", "zoom", "elastic_mm", "mirror", "brightness", "contrast", "gamma"):
        assert np.array_equal(getattr(off, name), getattr(on, name))


def test_blur_and_low_resolution_change_only_the_drawn_channel() -> None:
    out = (12, 12, 6)
    image, label = _volumes(out, channels=2, seed=9)
    base = replace(identity_params(1, ISO, out), blur_sigma=np.array([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]),
                   lowres_scale=np.ones((1, 2, 3)))
    img, _, _ = apply(image.clone(), label, None, base, out, 3)
    assert img[0, 0].std() < 0.6 * image[0, 0].std()  # white noise loses most of its variance
    assert torch.equal(img[0, 1], image[0, 1])
    # each slice is blurred on its own when the thick axis is left out
    np.testing.assert_allclose(img[0, 0].mean((0, 1)).numpy(), image[0, 0].mean((0, 1)).numpy(), atol=0.15)
    flat = torch.full((1, 1, *out), 3.0)
    kept, _, _ = apply(flat, label, None, replace(base, blur_sigma=base.blur_sigma[:, :1],
                                                  lowres_scale=np.array([[[0.5, 0.5, 1.0]]])), out, 3)
    np.testing.assert_allclose(kept.numpy(), 3.0, atol=1e-5)  # mirrored borders: a constant stays constant
    coarse = replace(base, blur_sigma=np.zeros((1, 2, 3)), lowres_scale=np.array([[[1, 1, 1], [0.5, 0.5, 1]]]))
    low, _, _ = apply(image.clone(), label, None, coarse, out, 3)
    assert torch.equal(low[0, 0], image[0, 0]) and low.shape == image.shape
    # 6 x 6 nearest samples, linearly interpolated back: neighbouring voxels agree more
    rough = (image[0, 1, 1:] - image[0, 1, :-1]).abs().mean()
    assert (low[0, 1, 1:] - low[0, 1, :-1]).abs().mean() < 0.7 * rough


def test_inverted_gamma_keeps_mean_and_std_and_lifts_the_dark_end() -> None:
    out = (10, 10, 10)
    image = torch.from_numpy(np.random.default_rng(4).gamma(2.0, size=(1, 1, *out)).astype(np.float32))
    label = torch.zeros((1, *out), dtype=torch.uint8)
    ident = identity_params(1, ISO, out)
    plain, _, _ = apply(image.clone(), label, None, replace(ident, gamma=np.array([1.4])), out, 2)
    inverted, _, _ = apply(image.clone(), label, None, replace(ident, gamma_inverted=np.array([1.4])), out, 2)
    for x in (plain, inverted):
        assert abs(float(x.mean() - image.mean())) < 1e-4 and abs(float(x.std() - image.std())) < 1e-3
    assert not torch.allclose(plain, inverted, atol=1e-2)
    same, _, _ = apply(image.clone(), label, None, replace(ident, gamma_inverted=np.array([1.0])), out, 2)
    assert torch.equal(same, image)


def test_params_logged_before_blur_and_low_resolution_still_replay() -> None:
    out = (8, 8, 8)
    params = sample_params(np.random.default_rng(0), 2, AugmentConfig(noise_p=1), ISO, out)
    old = {k: v for k, v in params.to_dict().items() if k not in ("blur_sigma", "lowres_scale", "gamma_inverted")}
    again = AugmentParams.from_dict(old)
    assert again.blur_sigma is None and again.lowres_scale is None and again.gamma_inverted is None
    image, label = _volumes(input_size_for(out, AugmentConfig(), ISO), batch=2)
    a = apply(image.clone(), label, None, again, out, 3)
    b = apply(image.clone(), label, None, replace(params, blur_sigma=None, lowres_scale=None, gamma_inverted=None),
              out, 3)
    assert torch.equal(a[0], b[0])
