"""Bad input, interrupted runs and fuzzing (issue 9): the tests behind the rows of docs/errors.md.

A bad input must end `volseg` with exit code 2 and exactly one stderr line `volseg: error: <file>: ...`
(checked at the file-descriptor level, so that C++ libraries printing on their own are caught too),
and must leave no output behind. Inputs that are odd but valid (constant, tiny, very anisotropic)
must give a valid segmentation instead.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from volseg import atomic, layout, synthetic, volumes
from volseg.checkpoint import load_model, read_model_file, save_model
from volseg.cli import main
from volseg.errors import VolsegError
from volseg.inference import predict_probabilities
from volseg.model import UNet3d
from volseg.preprocessing import sparse_slice_mask

SHAPE_VOX = (13, 11, 7)  # odd, all different, smaller than the tiny model's 16^3 patch on every axis
AFFINE = np.array([[0.8, 0, 0, -4.0], [0, 0.9, 0, 7.5], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def run_cli(argv: list[str | Path]) -> int:
    """Exit code of `volseg ARGV` as the console script reports it."""
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def error_line(capfd: pytest.CaptureFixture[str]) -> str:
    """The single `volseg: error:` line on stderr (file descriptor 2, native libraries included)."""
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("volseg: error: "), err
    assert "Traceback" not in err
    return lines[0]


def refused(argv: list[str | Path], capfd: pytest.CaptureFixture[str], names: str | Path, *fragments: str) -> str:
    """Run `volseg ARGV`, expect exit 2 and one error line naming `names` and holding `fragments`."""
    assert run_cli(argv) == 2
    line = error_line(capfd)
    assert str(names) in line, line
    for fragment in fragments:
        assert fragment in line, line
    return line


def predict(model: Path, inputs: Path, output: Path, *extra: str) -> list[str | Path]:
    return ["predict", "-m", model, "-i", inputs, "-o", output, "--device", "cpu", "--quiet", *extra]


def files_under(folder: Path) -> list[str]:
    """Every file left in `folder`, hidden temporaries included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def raw_image(seed: int = 0, shape: tuple[int, int, int] = SHAPE_VOX) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def model_file(trained_run) -> Path:
    return trained_run[0] / "model_best.safetensors"


# ------------------------------------------------------------------------------------------------
# image files that cannot be used: predict refuses with one line and writes nothing


def _truncated(ending: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        whole = folder / f"whole{ending}"
        volumes.write_volume(whole, raw_image(), affine=AFFINE)
        data = whole.read_bytes()
        path = folder / f"cut{ending}"
        path.write_bytes(data[: len(data) * 2 // 3])
        return path

    return make


def _garbage(ending: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / f"garbage{ending}"
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
        return path

    return make


def _empty_file(folder: Path) -> Path:
    path = folder / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not an image\n")
    return path


def _png_named_nifti(folder: Path) -> Path:
    path = folder / "photo.nii"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(500))
    return path


def _nifti_2d(folder: Path) -> Path:
    path = folder / "slice.nii.gz"
    nib.save(nib.Nifti1Image(raw_image()[:, :, 0], AFFINE), str(path))
    return path


def _nifti_4d(folder: Path) -> Path:
    path = folder / "twochannel.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([raw_image(), raw_image(1)], axis=-1), AFFINE), str(path))
    return path


def _mha_2d(folder: Path) -> Path:
    path = folder / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(raw_image()[:, :, 0]), str(path))
    return path


def _mha_vector(folder: Path) -> Path:
    path = folder / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True), str(path))
    return path


def _with_value(value: float) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        image = raw_image()
        image[3, 4, 5] = value
        image[0, 0, 0] = value
        path = folder / "scan.nii.gz"
        volumes.write_volume(path, image, affine=AFFINE)
        return path

    return make


BAD_IMAGES = {
    # row: (make the file, fragments of the message)
    "missing file": (lambda folder: folder / "absent_0000.nii.gz", ["input not found"]),
    "corrupt .nii.gz": (_garbage(".nii.gz"), ["cannot read as NIfTI"]),
    "corrupt .nii": (_garbage(".nii"), ["cannot read as NIfTI"]),
    "corrupt .mha": (_garbage(".mha"), ["cannot read image"]),
    "corrupt .nrrd": (_garbage(".nrrd"), ["cannot read image"]),
    "empty file": (_empty_file, ["is an empty file (0 bytes)"]),
    "truncated .nii.gz": (_truncated(".nii.gz"), ["cannot read as NIfTI"]),
    "truncated .nii": (_truncated(".nii"), ["cannot read as NIfTI", "damaged"]),
    "truncated .mha": (_truncated(".mha"), ["cannot read image", "truncated"]),
    "truncated .nrrd": (_truncated(".nrrd"), ["cannot read image", "expected 4004 bytes but received"]),
    "non-image file": (_text_file, ["is not a supported image file"]),
    "PNG named .nii": (_png_named_nifti, ["cannot read as NIfTI"]),
    "2D NIfTI": (_nifti_2d, ["is 2D", "expected a 3D volume"]),
    "4D NIfTI": (_nifti_4d, ["is 4D", "one file per channel"]),
    "2D MetaImage": (_mha_2d, ["is 2D"]),
    "vector MetaImage": (_mha_vector, ["3 components per voxel"]),
    "NaN voxels": (_with_value(np.nan), ["has 2 NaN or Inf voxels", "refusing to predict"]),
    "Inf voxels": (_with_value(np.inf), ["has 2 NaN or Inf voxels"]),
}


@pytest.mark.parametrize("row", sorted(BAD_IMAGES))
def test_predict_refuses_bad_image_file(row, model_file, tmp_path, capfd):
    make, fragments = BAD_IMAGES[row]
    path = make(tmp_path)
    out = tmp_path / "out"
    refused(predict(model_file, path, out), capfd, path, *fragments)
    assert files_under(out) == []


def test_predict_refuses_empty_folder(model_file, tmp_path, capfd):
    (tmp_path / "in").mkdir()
    refused(predict(model_file, tmp_path / "in", tmp_path / "out"), capfd, tmp_path / "in", "holds no image files")
    assert not (tmp_path / "out").exists()


def test_check_reports_nan_voxels_in_training_images(tmp_path, capfd):
    root = synthetic.write_dataset(tmp_path / "ds", n_cases=2, shape_vox=(10, 9, 8), spacing_mm=(1, 1, 2))
    path = root / "imagesTr" / "case_001_0000.nii.gz"
    image = volumes.read_volume(path)
    array = image.array[0].copy()
    array[1, 2, 3] = np.nan
    volumes.write_volume(path, array, reference=image)
    problem = check_problems(root, capfd)
    assert problem == [f"{path}: has 1 NaN or Inf voxels"]


# ------------------------------------------------------------------------------------------------
# odd but valid images: predict must work


def _predicts_valid_segmentation(
    model_file: Path, image: np.ndarray, affine: np.ndarray, folder: Path, capfd
) -> np.ndarray:
    src, out = folder / "odd_0000.nii.gz", folder / "odd_seg.nii.gz"
    volumes.write_volume(src, image, affine=affine)
    assert run_cli(predict(model_file, src, out)) == 0
    assert "wrote 1 segmentation(s)" in capfd.readouterr().out
    seg = volumes.read_label(out)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    assert set(np.unique(seg.array).tolist()) <= {0, 1, 2}
    return seg.array[0]


def test_constant_image_gives_a_valid_segmentation(model_file, tmp_path, capfd):
    image = np.full(SHAPE_VOX, 42.0, np.float32)
    _predicts_valid_segmentation(model_file, image, AFFINE, tmp_path, capfd)
    model, cfg = load_model(model_file, "cpu")
    probs = predict_probabilities(model, cfg, image[np.newaxis])
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_volume_smaller_than_the_patch(model_file, tmp_path, capfd):
    _, cfg = load_model(model_file, "cpu")
    shape = (3, 5, 2)
    assert all(s < p for s, p in zip(shape, cfg.train.patch_size))
    _predicts_valid_segmentation(model_file, raw_image(3, shape), AFFINE, tmp_path, capfd)


def test_extreme_anisotropy(model_file, tmp_path, capfd):
    """0.3 x 0.3 x 10 mm, 64 x 64 x 3 voxels: a thick-slice scan the model never saw."""
    affine = np.diag([0.3, 0.3, 10.0, 1.0])
    affine[:3, 3] = (-9.6, 4.0, -15.0)
    image = raw_image(4, (64, 64, 3))
    image[20:40, 24:44, :] += 80.0
    _predicts_valid_segmentation(model_file, image, affine, tmp_path, capfd)


# ------------------------------------------------------------------------------------------------
# models that do not fit the input


@pytest.fixture(scope="module")
def two_channel_model(model_file, tmp_path_factory) -> Path:
    """An (untrained) model asking for two channels, written like `volseg train` writes one."""
    _, cfg, _ = read_model_file(model_file)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, in_channels=2),
        data=dataclasses.replace(cfg.data, channel_names=("T1", "T2")),
    )
    path = tmp_path_factory.mktemp("models") / "two_channels.safetensors"
    save_model(path, UNet3d(cfg.model), cfg)
    return path


def test_single_file_for_a_two_channel_model(two_channel_model, tmp_path, capfd):
    src = tmp_path / "scan_0000.nii.gz"
    volumes.write_volume(src, raw_image(), affine=AFFINE)
    refused(predict(two_channel_model, src, tmp_path / "out"), capfd, src, "the model needs 2 channels")


def test_folder_missing_a_channel_for_a_two_channel_model(two_channel_model, tmp_path, capfd):
    inputs = tmp_path / "in"
    volumes.write_volume(inputs / "scan_0000.nii.gz", raw_image(), affine=AFFINE)
    refused(predict(two_channel_model, inputs, tmp_path / "out"), capfd, inputs / "scan_0001.nii.gz",
            "channel 1 of case 'scan' is missing")
    assert not (tmp_path / "out").exists()


def test_extra_channel_for_a_one_channel_model(model_file, tmp_path, capfd):
    inputs = tmp_path / "in"
    for c in range(2):
        volumes.write_volume(inputs / f"scan_{c:04d}.nii.gz", raw_image(c), affine=AFFINE)
    refused(predict(model_file, inputs, tmp_path / "out"), capfd, inputs / "scan_0001.nii.gz",
            "beyond the 1 declared channel(s)")


def test_channels_on_different_grids(two_channel_model, tmp_path, capfd):
    inputs = tmp_path / "in"
    volumes.write_volume(inputs / "scan_0000.nii.gz", raw_image(), affine=AFFINE)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    volumes.write_volume(inputs / "scan_0001.nii.gz", raw_image(1), affine=shifted)
    refused(predict(two_channel_model, inputs, tmp_path / "out"), capfd, inputs / "scan_0001.nii.gz",
            "affine differs from channel 0")


def test_model_file_from_an_incompatible_version(model_file, tmp_path, capfd):
    with safe_open(str(model_file), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["volseg_config"])
    config["version"] = 999
    meta["volseg_config"] = json.dumps(config)
    future = tmp_path / "future.safetensors"
    save_file(tensors, str(future), metadata=meta)
    src = tmp_path / "scan.nii.gz"
    volumes.write_volume(src, raw_image(), affine=AFFINE)
    refused(predict(future, src, tmp_path / "out"), capfd, future, "config format version 999 is not supported")
    refused(["info", future], capfd, future, "version 999")


# ------------------------------------------------------------------------------------------------
# outputs: existing ones are refused, a full disk leaves nothing behind


def test_existing_output_file_is_refused_unless_overwrite(model_file, tmp_path, capfd):
    src, out = tmp_path / "scan.nii.gz", tmp_path / "seg.nii.gz"
    volumes.write_volume(src, raw_image(), affine=AFFINE)
    out.write_bytes(b"a good result")
    refused(predict(model_file, src, out), capfd, out, "output already exists", "--overwrite")
    assert out.read_bytes() == b"a good result"

    assert run_cli(predict(model_file, src, out, "--continue")) == 0
    assert "wrote 0 segmentation(s)" in capfd.readouterr().out
    assert out.read_bytes() == b"a good result"

    refused(predict(model_file, src, out, "--continue", "--overwrite"), capfd, "--overwrite and --continue")

    assert run_cli(predict(model_file, src, out, "--overwrite")) == 0
    assert volumes.read_label(out).shape == SHAPE_VOX
    assert files_under(tmp_path) == ["scan.nii.gz", "seg.nii.gz"]


def test_output_folder_that_is_a_file(model_file, tmp_path, capfd):
    inputs = tmp_path / "in"
    volumes.write_volume(inputs / "scan_0000.nii.gz", raw_image(), affine=AFFINE)
    (tmp_path / "out").write_text("a file")
    refused(predict(model_file, inputs, tmp_path / "out"), capfd, tmp_path / "out", "is a file")


def test_no_space_left_on_device(model_file, tmp_path, capfd, monkeypatch):
    """A writer that fills the disk half-way: one line naming the output, and no file left at all."""

    def full_disk(path: Path, *args) -> None:
        Path(path).write_bytes(b"\x00" * 100)  # what a real writer managed before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    src, out = tmp_path / "scan.nii.gz", tmp_path / "out"
    volumes.write_volume(src, raw_image(), affine=AFFINE)
    monkeypatch.setattr(volumes, "_write_nifti", full_disk)
    line = refused(predict(model_file, src, out), capfd, out / "scan.nii.gz", "cannot write: No space left on device")
    assert ".tmp-" not in line  # the temporary's name would only confuse
    assert files_under(out) == []


# ------------------------------------------------------------------------------------------------
# datasets: label problems, wrong dataset.json types, empty folders


def check_problems(root: Path, capfd) -> list[str]:
    """`volseg check` lists every problem, one line each, then a count line; exit code 2."""
    assert run_cli(["check", root]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"{root}: {len(lines) - 1} problem(s) found"
    return lines[:-1]


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    return synthetic.write_dataset(tmp_path / "ds", n_cases=3, shape_vox=(10, 9, 8), spacing_mm=(1, 1, 2), seed=3)


def _train(root: Path, out: Path) -> list[str | Path]:
    return ["train", root, "-o", out, "--max-epochs", "1", "--iters-per-epoch", "1", "--patch-size", "8,8,8",
            "--base-width", "2", "--depth", "2", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("change", ["shape", "affine"])
def test_label_off_the_image_grid(small_dataset, tmp_path, capfd, change):
    label_path = small_dataset / "labelsTr" / "case_001.nii.gz"
    label = volumes.read_label(label_path)
    if change == "shape":
        volumes.write_volume(label_path, label.array[0][:, :, :-2], affine=label.affine)
        fragment = "shape (10, 9, 6) differs from the image"
    else:
        affine = label.affine.copy()
        affine[2, 3] += 4.0  # two slices off
        volumes.write_volume(label_path, label.array[0], affine=affine)
        fragment = "affine differs from the image"
    # train refuses before any work; check lists it; evaluate refuses the pair
    refused(_train(small_dataset, tmp_path / "run"), capfd, label_path, fragment)
    assert not (tmp_path / "run").exists()
    [problem] = check_problems(small_dataset, capfd)
    assert problem.startswith(f"{label_path}: ") and fragment in problem
    case = layout.Case("case_001", (small_dataset / "imagesTr" / "case_001_0000.nii.gz",), label_path)
    with pytest.raises(VolsegError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        layout.read_case(case)  # the full read, for loaders that want image and label together
    pred = tmp_path / "pred"
    volumes.write_volume(pred / "case_001.nii.gz", volumes.read_label(label_path).array[0], affine=AFFINE)
    refused(["evaluate", pred, small_dataset / "labelsTr", "-o", tmp_path / "m.csv", "--no-plot"], capfd,
            pred / "case_001.nii.gz", "geometry differs")
    assert not (tmp_path / "m.csv").exists()


def test_label_values_not_in_dataset_json(small_dataset, tmp_path, capfd):
    label_path = small_dataset / "labelsTr" / "case_002.nii.gz"
    label = volumes.read_label(label_path)
    array = label.array[0].copy()
    array[0, 0, :2] = 9
    volumes.write_volume(label_path, array, reference=label)
    [problem] = check_problems(small_dataset, capfd)
    assert problem == f"{label_path}: holds label values [9] not declared in dataset.json (declared [0, 1, 2])"
    # the library's case reader refuses them too (for train, see docs/errors.md)
    case = layout.read_dataset(small_dataset)[1][2]
    with pytest.raises(VolsegError, match=r"label values \[9\] not declared"):
        layout.read_case(case, declared={0, 1, 2})


BAD_DATASET_JSON = {
    "labels value is a string": (
        {"labels": {"background": "zero", "tumour": 1}}, "field 'labels.background' must be an integer"
    ),
    "labels is a list": ({"labels": ["background", "tumour"]}, "field 'labels' must be a non-empty object"),
    "label value is a bool": ({"labels": {"background": 0, "tumour": True}}, "must be an integer label value"),
    "channel_names is a list": ({"channel_names": ["CT"]}, "field 'channel_names' must be a non-empty object"),
    "channel name is a number": ({"channel_names": {"0": 5}}, "values must be channel names (strings)"),
    "file_ending is a number": ({"file_ending": 3}, "field 'file_ending' must be a string"),
    "numTraining is a string": ({"numTraining": "three"}, "field 'numTraining' must be a non-negative integer"),
    "top level is a list": ([], "must hold a JSON object"),
    "not JSON at all": ("{'labels': oops", "is not valid JSON"),
}


@pytest.mark.parametrize("row", sorted(BAD_DATASET_JSON))
def test_dataset_json_with_wrong_types(small_dataset, tmp_path, capfd, row):
    change, fragment = BAD_DATASET_JSON[row]
    path = small_dataset / "dataset.json"
    if isinstance(change, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    else:
        path.write_text(change if isinstance(change, str) else json.dumps(change))
    refused(_train(small_dataset, tmp_path / "run"), capfd, path, fragment)
    assert not (tmp_path / "run").exists()
    assert any(fragment in line for line in check_problems(small_dataset, capfd))


def test_empty_dataset_and_prediction_folders(tmp_path, capfd):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(_train(empty, tmp_path / "run"), capfd, empty / "dataset.json", "is missing")
    refused(["evaluate", empty, empty, "-o", tmp_path / "m.csv"], capfd, empty, "holds no *.nii.gz predictions")
    assert files_under(tmp_path) == ["empty"]


def test_read_dataset_finds_misaligned_channels_from_headers(tmp_path):
    root = synthetic.write_dataset(tmp_path / "ds", n_cases=2, shape_vox=(10, 9, 8), n_channels=2, seed=1)
    path = root / "imagesTr" / "case_000_0001.nii.gz"
    volume = volumes.read_volume(path)
    volumes.write_volume(path, volume.array[0][:-1], affine=volume.affine)
    with pytest.raises(VolsegError, match=r"case_000_0001.nii.gz: shape \(9, 9, 8\) differs from channel 0"):
        layout.read_dataset(root)


# ------------------------------------------------------------------------------------------------
# no lost work: kill a folder prediction, then --continue


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def test_killed_predict_resumes_with_continue(model_file, tmp_path, capfd, src_env):
    inputs, out = tmp_path / "in", tmp_path / "out"
    names = [f"case_{i}" for i in range(6)]
    for i, name in enumerate(names):
        volumes.write_volume(inputs / f"{name}_0000.nii.gz", raw_image(i, (40, 36, 24)), affine=AFFINE)
    env = src_env
    proc = subprocess.Popen([sys.executable, "-m", "volseg", *map(str, predict(model_file, inputs, out))], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _visible(out) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    proc.stderr.close()

    done = _visible(out)
    assert 1 <= len(done) < len(names), done  # killed part-way
    for name in done:  # what carries a final name is complete
        assert volumes.read_label(out / name).shape == (40, 36, 24)
    leftovers = sorted(set(os.listdir(out)) - set(done))
    assert all(f".tmp-{proc.pid}" in name for name in leftovers), leftovers  # only its own temporaries
    stale = out / f".case_5.tmp-{proc.pid}.nii.gz"  # as if the kill had landed during a write
    stale.write_bytes(b"half a file")
    stamps = {name: (out / name).stat().st_mtime_ns for name in done}

    refused(predict(model_file, inputs, out), capfd, out / done[0], "output already exists")  # no flag: refused
    assert run_cli(predict(model_file, inputs, out, "--continue")) == 0
    assert f"wrote {len(names) - len(done)} segmentation(s)" in capfd.readouterr().out
    assert sorted(os.listdir(out)) == [f"{name}.nii.gz" for name in names]  # temporaries cleared
    assert {name: (out / name).stat().st_mtime_ns for name in done} == stamps  # done ones untouched


def test_bad_case_part_way_through_a_folder(model_file, tmp_path, capfd):
    """The cases before a bad one stay done; the message says how to resume after fixing it."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        volumes.write_volume(inputs / f"case_{i}_0000.nii.gz", raw_image(i), affine=AFFINE)
    bad = inputs / "case_2_0000.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])
    refused(predict(model_file, inputs, out), capfd, bad, "2 case(s) done; fix this one and rerun with --continue")
    assert files_under(out) == ["case_0.nii.gz", "case_1.nii.gz"]
    volumes.write_volume(bad, raw_image(2), affine=AFFINE)
    assert run_cli(predict(model_file, inputs, out, "--continue")) == 0
    assert "wrote 1 segmentation(s)" in capfd.readouterr().out
    assert files_under(out) == ["case_0.nii.gz", "case_1.nii.gz", "case_2.nii.gz"]


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    mine = tmp_path / f".case.tmp-{os.getpid()}.nii.gz"
    dead = tmp_path / ".case.tmp-999999999.nii.gz"
    folder = tmp_path / ".case.mhd.tmp-999999999"
    other = tmp_path / ".hidden_notes"
    for path in (mine, dead, other):
        path.write_bytes(b"x")
    folder.mkdir()
    assert atomic.remove_stale_temporaries(tmp_path) == sorted([dead, folder])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])


# ------------------------------------------------------------------------------------------------
# fuzzing (sliding-window shapes: tests/test_inference.py; metrics: tests/test_metrics.py)

DTYPES = ["uint8", "int8", "int16", "uint16", "int32", "float32", "float64"]


@st.composite
def affines(draw) -> np.ndarray:
    """Random rotation (or reflection), spacing 0.1-10 mm per axis, origin within 500 mm."""
    noise = np.asarray(draw(st.lists(st.floats(-1, 1), min_size=9, max_size=9))).reshape(3, 3)
    q, _ = np.linalg.qr(noise + 2 * np.eye(3))
    spacing = draw(st.lists(st.floats(0.1, 10.0), min_size=3, max_size=3))
    affine = np.eye(4)
    affine[:3, :3] = q * np.asarray(spacing)
    affine[:3, 3] = draw(st.lists(st.floats(-500, 500), min_size=3, max_size=3))
    return affine


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(*[st.integers(1, 7)] * 3),
    dtype=st.sampled_from(DTYPES),
    affine=affines(),
    ending=st.sampled_from([".nii.gz", ".nii", ".mha", ".nrrd"]),
    seed=st.integers(0, 2**16),
)
def test_io_round_trip(tmp_path, shape, dtype, affine, ending, seed):
    info = np.iinfo(dtype) if dtype.startswith(("int", "uint")) else np.finfo(dtype)
    array = np.random.default_rng(seed).uniform(max(info.min, -1e6), min(info.max, 1e6), size=shape).astype(dtype)
    path = tmp_path / f"vol_{seed}{ending}"
    volumes.write_volume(path, array, affine=affine)
    volume = volumes.read_volume(path)
    assert volume.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(volume.array[0], array)
    np.testing.assert_allclose(volume.affine, affine, rtol=1e-6, atol=1e-4)
    volumes.write_volume(path, volume.array, reference=volume)  # again, through the kept header: bit-exact
    again = volumes.read_volume(path)
    np.testing.assert_array_equal(again.array, volume.array)
    # NIfTI and MetaImage keep the header verbatim; NRRD stores spacing x direction, so 1 ulp may move
    np.testing.assert_allclose(again.affine, volume.affine, rtol=0, atol=1e-12 if ending == ".nrrd" else 0)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("valid")
    out = {}
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        volumes.write_volume(folder / f"v{ending}", raw_image(7, (6, 5, 4)), affine=AFFINE)
        out[ending] = (folder / f"v{ending}").read_bytes()
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ending=st.sampled_from([".nii.gz", ".nii", ".mha", ".nrrd"]), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3))
def test_damaged_files_raise_volseg_error_or_read(valid_files, tmp_path, ending, cut, flips):
    """Truncated or bit-flipped files: a `VolsegError` or a valid volume, never another exception."""
    data = bytearray(valid_files[ending])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    path = tmp_path / f"damaged{ending}"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
    try:
        volume = volumes.read_volume(path)
    except VolsegError as exc:
        assert exc.path == str(path) and "\n" not in exc.message
    else:
        assert volume.array.ndim == 4 and volume.array.shape[0] == 1


@settings(max_examples=150, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 12)] * 3),
    axes=st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=3, unique=True),
    k=st.integers(0, 14),
    fraction=st.one_of(st.none(), st.floats(0.01, 1.0)),
    strategy=st.sampled_from(["even", "random"]),
    seed=st.integers(0, 1000),
)
def test_sparse_slice_mask_is_whole_slices_with_the_planned_fraction(shape, axes, k, fraction, strategy, seed):
    kwargs = {"fraction": fraction} if fraction is not None else {"slices_per_axis": k}
    mask = sparse_slice_mask(shape, axes=tuple(axes), strategy=strategy, rng=np.random.default_rng(seed), **kwargs)
    assert mask.shape == shape and mask.dtype == bool
    # slice structure: the mask is exactly the union of its complete slices along the chosen axes
    union = np.zeros(shape, bool)
    full = {}
    for axis in axes:
        other = tuple(a for a in range(3) if a != axis)
        full[axis] = mask.all(axis=other)
        index = [np.newaxis] * 3
        index[axis] = slice(None)
        union |= np.broadcast_to(full[axis][tuple(index)], shape)
    np.testing.assert_array_equal(mask, union)
    # labelled fraction: `wanted` distinct slices per axis, so 1 - prod(1 - wanted / size)
    wanted = {a: (max(1, round(fraction * shape[a])) if fraction is not None else min(k, shape[a])) for a in axes}
    expected = 1.0 - np.prod([1.0 - wanted[a] / shape[a] for a in axes])
    assert mask.mean() == pytest.approx(expected, abs=1e-12)
    # same seed, same mask
    again = sparse_slice_mask(shape, axes=tuple(axes), strategy=strategy, rng=np.random.default_rng(seed), **kwargs)
    np.testing.assert_array_equal(mask, again)
