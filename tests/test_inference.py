"""volseg.inference: sliding-window tiling and blending with known answers, and geometry round trips."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volseg import volumes
from volseg.checkpoint import load_model
from volseg.config import Config, DataConfig, ModelConfig, TrainConfig
from volseg.errors import VolsegError
from volseg.inference import output_window, predict_volume, resolve_device, sliding_window
from volseg.prediction_files import _output_name, predict_paths
from volseg.sampling import gaussian_importance, sliding_window_grid


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def voxelwise_predictor(x: torch.Tensor) -> torch.Tensor:
    """Two-class logits (0, x): the softmax of class 1 is sigmoid(input), wherever the window lies."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1]], dim=1)


def random_image(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# sliding_window with a voxel-wise predictor: output = sigmoid(image) for any tiling


@pytest.mark.parametrize(
    "shape",
    [
        (5, 7, 3),  # smaller than the patch on every axis
        (8, 8, 8),  # exactly one patch
        (8, 13, 5),  # larger on one axis, smaller on another
        (17, 11, 19),  # larger on every axis, odd sizes
    ],
)
@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_sliding_window_voxelwise_predictor_reproduces_input(shape, blend, batch_size):
    image = random_image(shape)
    probs = sliding_window(image, voxelwise_predictor, (8, 8, 8), 2, overlap=0.5, blend=blend, batch_size=batch_size)
    assert probs.shape == (2, *shape)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs[1], sigmoid(image[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(*(st.integers(1, 21) for _ in range(3))),
    patch=st.tuples(*(st.integers(3, 10) for _ in range(3))),
    overlap=st.sampled_from([0.0, 0.25, 0.5]),
    blend=st.sampled_from(["gaussian", "uniform"]),
    batch_size=st.sampled_from([1, 3]),
)
def test_sliding_window_any_tiling_reproduces_input(shape, patch, overlap, blend, batch_size):
    image = random_image(shape, seed=sum(shape))
    probs = sliding_window(image, voxelwise_predictor, patch, 2, overlap=overlap, blend=blend, batch_size=batch_size)
    assert probs.shape == (2, *shape)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[1], sigmoid(image[0]), rtol=1e-5, atol=1e-6)


def test_sliding_window_calls_predictor_in_batches_covering_the_grid():
    shape, patch = (17, 11, 19), (8, 8, 8)
    calls: list[tuple[int, ...]] = []

    def predictor(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return voxelwise_predictor(x)

    sliding_window(random_image(shape), predictor, patch, 2, overlap=0.5, batch_size=3)
    n_windows = len(sliding_window_grid(shape, patch, 0.5))
    assert sum(c[0] for c in calls) == n_windows
    assert all(c[0] <= 3 for c in calls) and all(c[0] == 3 for c in calls[:-1])
    assert all(c[1:] == (1, *patch) for c in calls)


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
def test_sliding_window_blends_overlapping_windows_with_their_weights(blend):
    """Each window predicts one constant probability; overlaps get the weighted mean of them.

    Along I: size 12, patch 8, overlap 0.5 -> windows start at 0 and 4. The image encodes the
    start of each voxel's first window so the predictor can tell windows apart.
    """
    shape, patch = (12, 1, 1), (8, 1, 1)
    starts = [s[0] for s in sliding_window_grid(shape, patch, 0.5)]
    assert starts == [0, 4]
    window_logit = {0: -1.0, 4: 2.0}
    image = np.arange(12, dtype=np.float32).reshape(1, 12, 1, 1)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        first = x[:, 0, 0, 0, 0].round().long().tolist()  # = the window start
        logit = torch.tensor([window_logit[s] for s in first]).view(-1, 1, 1, 1, 1).expand(-1, 1, *patch)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)

    probs = sliding_window(image, predictor, patch, 2, overlap=0.5, blend=blend, batch_size=1)
    weight = gaussian_importance(patch)[:, 0, 0].astype(np.float64) if blend == "gaussian" else np.ones(8)
    num, den = np.zeros(12), np.zeros(12)
    for s in starts:
        num[s : s + 8] += weight * sigmoid(np.array(window_logit[s]))
        den[s : s + 8] += weight
    np.testing.assert_allclose(probs[1, :, 0, 0], num / den, rtol=1e-5)
    # the overlap really mixes the two windows: strictly between their probabilities
    middle = probs[1, 4:8, 0, 0]
    assert np.all(middle > sigmoid(np.array(-1.0)) + 1e-3) and np.all(middle < sigmoid(np.array(2.0)) - 1e-3)


@pytest.mark.parametrize("shape", [(5, 6, 3), (6, 6, 6), (13, 9, 17)])
def test_sliding_window_valid_padding_mode_with_centre_cropping_predictor(shape):
    """A valid-padding network sees `patch` voxels and answers for the centred `out_patch`."""
    patch, out_patch = (10, 10, 10), (6, 6, 6)

    def cropping_predictor(x: torch.Tensor) -> torch.Tensor:
        assert tuple(x.shape[2:]) == patch
        return voxelwise_predictor(x[:, :, 2:8, 2:8, 2:8])

    image = random_image(shape, seed=3)
    probs = sliding_window(image, cropping_predictor, patch, 2, overlap=0.5, batch_size=2, out_patch=out_patch)
    assert probs.shape == (2, *shape)
    np.testing.assert_allclose(probs[1], sigmoid(image[0]), rtol=1e-5, atol=1e-6)


def test_sliding_window_multichannel_input():
    image = np.stack([random_image((9, 10, 11), seed=1)[0], random_image((9, 10, 11), seed=2)[0]])

    def predictor(x: torch.Tensor) -> torch.Tensor:  # three classes from two channels
        return torch.stack([torch.zeros_like(x[:, 0]), x[:, 0], x[:, 1]], dim=1)

    probs = sliding_window(image, predictor, (8, 8, 8), 3, overlap=0.5, batch_size=3)
    logits = np.stack([np.zeros(image.shape[1:]), image[0], image[1]]).astype(np.float64)
    expected = np.exp(logits) / np.exp(logits).sum(0)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"blend": "median"}, {"overlap": 1.0}, {"overlap": -0.1}])
def test_sliding_window_rejects_bad_settings(kwargs):
    with pytest.raises(VolsegError):
        sliding_window(random_image((4, 4, 4)), voxelwise_predictor, (4, 4, 4), 2, **kwargs)


# ------------------------------------------------------------------------------------------------
# devices, output windows and output names


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(VolsegError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_resolve_device_cuda_without_gpu_is_a_clear_error(device):
    with pytest.raises(VolsegError, match="no CUDA GPU") as info:
        resolve_device(device)
    assert "--device cpu" in info.value.message


def test_output_window_same_and_valid_padding():
    same = Config(model=ModelConfig(depth=3, padding="same"))
    assert output_window(same, (16, 16, 16)) == ((16, 16, 16), (0, 0, 0))
    valid = Config(model=ModelConfig(depth=3, padding="valid"))
    out, margin = output_window(valid, (44, 44, 44))
    assert out == (4, 4, 4) and margin == (20, 20, 20)


def test_output_window_refuses_a_patch_the_network_cannot_take():
    same = Config(model=ModelConfig(depth=3, padding="same"))
    with pytest.raises(VolsegError, match="does not fit"):
        output_window(same, (16, 14, 16))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("case_0000.nii.gz", "case.nii.gz"),
        ("liver_007_0000.nii.gz", "liver_007.nii.gz"),
        ("case_0003.nii", "case.nii"),
        ("scan_0000.mha", "scan.mha"),
        ("scan_0000.nrrd", "scan.nrrd"),
        ("case.nii.gz", "case.nii.gz"),  # no channel suffix: kept
        ("img_12.nii.gz", "img_12.nii.gz"),  # 2 digits is not a channel suffix
        ("img_abcd.nii.gz", "img_abcd.nii.gz"),  # not digits
        ("_0000.nii.gz", "_0000.nii.gz"),  # nothing left after removing the suffix: kept
        ("dicom_series", "dicom_series.nii.gz"),  # a DICOM folder gets the model's ending
    ],
)
def test_output_name(name, expected):
    assert _output_name(Path("/data") / name, ".nii.gz") == expected


# ------------------------------------------------------------------------------------------------
# predict_volume with a known network


class SignNetwork(torch.nn.Module):
    """Logits (0, 10x, -10x): class 1 where the normalised input is > 0, class 2 where < 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 10 * x, -10 * x], dim=1)


def test_predict_volume_decodes_to_dataset_label_values():
    data = DataConfig(labels=(("background", 0), ("a", 2), ("b", 5), ("ignore", 9)), ignore_label=9,
                      normalization="none")
    cfg = Config(data=data, model=ModelConfig(num_classes=3, depth=3), train=TrainConfig(patch_size=(8, 8, 8)))
    image = random_image((9, 13, 7), seed=5)
    image[0, 0, 0, 0] = 0.0  # all logits equal: argmax takes the first class (background)
    volume = volumes.Volume(image, np.diag([0.7, 0.9, 2.5, 1.0]))
    seg = predict_volume(SignNetwork(), cfg, volume)
    assert seg.shape == (9, 13, 7)
    assert seg.dtype == np.uint8
    expected = np.where(image[0] > 0, 2, np.where(image[0] < 0, 5, 0))
    np.testing.assert_array_equal(seg, expected)


def test_predict_volume_with_trained_model(trained_run):
    run_dir, _ = trained_run
    model, cfg = load_model(run_dir, "cpu")
    image = random_image((21, 19, 13), seed=7) * 100 + 40  # unnormalised; odd shape, not a patch multiple
    seg = predict_volume(model, cfg, volumes.Volume(image, np.eye(4)))
    assert seg.shape == (21, 19, 13)
    assert set(np.unique(seg).tolist()) <= set(cfg.data.class_values)


def test_predict_volume_refuses_wrong_channel_count(trained_run):
    model, cfg = load_model(trained_run[0], "cpu")
    image = np.zeros((2, 8, 8, 8), np.float32)
    with pytest.raises(VolsegError, match="channels"):
        predict_volume(model, cfg, volumes.Volume(image, np.eye(4)))


# ------------------------------------------------------------------------------------------------
# geometry round trip through predict_paths (the requirement)

SHAPE_VOX = (21, 19, 13)  # odd and all different: an axis mix-up changes the shape


def oblique_affine(spacing_mm=(0.7, 0.9, 2.5)) -> np.ndarray:
    """Rotated about two axes, anisotropic and shifted: no symmetry can hide a geometry bug."""
    a, b = 0.35, -0.2
    rot_k = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_i = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rot_k @ rot_i @ np.diag(spacing_mm)
    affine[:3, 3] = (-31.5, 12.25, 57.0)
    return affine


def raw_image(seed: int = 11) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=SHAPE_VOX) * 50 + 200).astype(np.int16)


@pytest.mark.parametrize(("qform_code", "sform_code"), [(1, 2), (1, 0), (0, 1)])
def test_predict_nifti_keeps_shape_affine_qform_and_sform(trained_run, tmp_path, qform_code, sform_code):
    affine = oblique_affine()
    img = nib.Nifti1Image(raw_image(), affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)  # codes differ, and each must survive
    img.header.set_xyzt_units("mm")
    src = tmp_path / "patient_0000.nii.gz"
    nib.save(img, str(src))
    out_dir = tmp_path / "pred"

    written = predict_paths(trained_run[0], src, out_dir, device="cpu", progress=False)

    assert written == [out_dir / "patient.nii.gz"]
    before, after = nib.load(str(src)), nib.load(str(written[0]))
    assert after.shape == before.shape == SHAPE_VOX
    np.testing.assert_array_equal(after.affine, before.affine)
    q_before, q_code_before = before.header.get_qform(coded=True)
    q_after, q_code_after = after.header.get_qform(coded=True)
    s_before, s_code_before = before.header.get_sform(coded=True)
    s_after, s_code_after = after.header.get_sform(coded=True)
    assert (int(q_code_before), int(s_code_before)) == (qform_code, sform_code)
    assert (int(q_code_after), int(s_code_after)) == (qform_code, sform_code)
    for form in ("get_qform", "get_sform"):  # the stored matrices, whatever their codes
        np.testing.assert_array_equal(getattr(after.header, form)(), getattr(before.header, form)())
    if q_before is not None:
        np.testing.assert_array_equal(q_after, q_before)
    if s_before is not None:
        np.testing.assert_array_equal(s_after, s_before)
    np.testing.assert_allclose(after.affine, affine, atol=1e-5)  # and it is the affine we wrote
    np.testing.assert_array_equal(after.header.get_zooms(), before.header.get_zooms())
    seg = np.asarray(after.dataobj)
    assert np.issubdtype(seg.dtype, np.integer)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2}


def test_predict_nifti_written_by_volseg_io_to_explicit_output_file(trained_run, tmp_path):
    affine = oblique_affine((1.2, 0.6, 3.0))
    src = tmp_path / "scan.nii.gz"
    volumes.write_volume(src, raw_image(12), affine=affine)
    target = tmp_path / "out" / "seg_of_scan.nii.gz"
    written = predict_paths(trained_run[0], src, target, device="cpu", progress=False)
    assert written == [target]
    before, after = volumes.read_volume(src), volumes.read_label(target)
    assert after.shape == before.shape == SHAPE_VOX
    np.testing.assert_array_equal(after.affine, before.affine)
    b, a = nib.load(str(src)).header, nib.load(str(target)).header
    for form in ("get_qform", "get_sform"):
        m_b, c_b = getattr(b, form)(coded=True)
        m_a, c_a = getattr(a, form)(coded=True)
        assert int(c_a) == int(c_b)
        np.testing.assert_array_equal(m_a, m_b)


def test_predict_mha_keeps_origin_spacing_direction(trained_run, tmp_path):
    image = sitk.GetImageFromArray(raw_image(13).transpose(2, 1, 0))  # ITK arrays are (K, J, I)
    direction = oblique_affine((1.0, 1.0, 1.0))[:3, :3]
    image.SetDirection(tuple(direction.ravel()))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-31.5, 12.25, 57.0))
    src = tmp_path / "patient_0000.mha"
    sitk.WriteImage(image, str(src))

    written = predict_paths(trained_run[0], src, tmp_path / "pred", device="cpu", progress=False)

    assert written == [tmp_path / "pred" / "patient.mha"]
    before, after = sitk.ReadImage(str(src)), sitk.ReadImage(str(written[0]))
    assert after.GetSize() == before.GetSize() == SHAPE_VOX
    assert after.GetOrigin() == before.GetOrigin()
    assert after.GetSpacing() == before.GetSpacing()
    assert after.GetDirection() == before.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(after)).tolist()) <= {0, 1, 2}


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_predict_folder_names_outputs_by_case_and_continue_skips_existing(trained_run, tiny_dataset, tmp_path):
    inputs = tmp_path / "images"
    shutil.copytree(tiny_dataset / "imagesTs", inputs)
    (inputs / "README.txt").write_text("not an image")  # ignored
    out_dir = tmp_path / "pred"

    written = predict_paths(trained_run[0], inputs, out_dir, device="cpu", progress=False)

    names = sorted(p.name[: -len("_0000.nii.gz")] + ".nii.gz" for p in inputs.glob("*_0000.nii.gz"))
    assert sorted(p.name for p in written) == names == sorted(os.listdir(out_dir))
    for name in names:
        ref = volumes.read_volume(tiny_dataset / "labelsTs" / name)
        pred = volumes.read_label(out_dir / name)
        assert pred.shape == ref.shape
        np.testing.assert_array_equal(pred.affine, ref.affine)

    # --continue: nothing is redone while every output exists ...
    stamps = _mtimes(out_dir)
    assert predict_paths(trained_run[0], inputs, out_dir, device="cpu", skip_existing=True, progress=False) == []
    assert _mtimes(out_dir) == stamps
    # ... and only the missing one is written after one is deleted
    (out_dir / names[0]).unlink()
    again = predict_paths(trained_run[0], inputs, out_dir, device="cpu", skip_existing=True, progress=False)
    assert again == [out_dir / names[0]]
    assert {k: v for k, v in _mtimes(out_dir).items() if k != names[0]} == {
        k: v for k, v in stamps.items() if k != names[0]
    }
    # without a flag existing outputs are refused; --overwrite redoes every case
    with pytest.raises(VolsegError, match="exists"):
        predict_paths(trained_run[0], inputs, out_dir, device="cpu", progress=False)
    assert len(predict_paths(trained_run[0], inputs, out_dir, device="cpu", overwrite=True, progress=False)) == len(names)


def test_predict_paths_missing_input_is_a_clear_error(trained_run, tmp_path):
    with pytest.raises(VolsegError, match="not found"):
        predict_paths(trained_run[0], tmp_path / "nope.nii.gz", tmp_path / "out", device="cpu", progress=False)


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_autocast_dtype_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, bf16, expected):
    from volseg.inference import autocast_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert autocast_dtype(torch.device("cuda", 0)) == expected
    assert autocast_dtype(torch.device("cpu")) is None


def test_default_post_processing_keeps_a_one_voxel_lesion():
    """No component is removed unless asked: a tiny true lesion must survive `volseg predict`'s defaults."""
    from volseg.prediction_files import clean_segmentation

    seg = np.zeros((9, 9, 3), np.uint8)
    seg[1:6, 1:6, :] = 1
    seg[8, 8, 2] = 1  # a single-voxel lesion far from the large one
    assert np.array_equal(clean_segmentation(seg, (0.5, 0.5, 6.0), (0, 1)), seg)
