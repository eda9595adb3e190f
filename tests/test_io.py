"""volseg.volumes and volseg.layout: geometry survives every read/write, bad files fail with one line,
datasets are checked."""

from __future__ import annotations

import doctest
import gzip
import json
import locale
import os
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volseg import layout, volumes
from volseg.errors import VolsegError
from volseg.layout import Case, case_output_path, check_dataset, list_cases, read_dataset, read_dataset_info
from volseg.volumes import ItkHeader, Volume, read_image, read_label, read_volume, strip_ending, write_volume

SHAPE = (5, 6, 7)  # odd, all different: any axis mix-up changes the shape


def oblique_affine() -> np.ndarray:
    """Rotated, anisotropic (0.6, 0.8, 2.5 mm), shifted: no symmetry that could hide a bug."""
    angle = 0.3
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(0.2), -np.sin(0.2)], [0.0, np.sin(0.2), np.cos(0.2)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ tilt @ np.diag([0.6, 0.8, 2.5])
    affine[:3, 3] = [12.5, -40.25, 7.0]
    return affine


def ramp(shape: tuple[int, ...] = SHAPE, dtype: type = np.float32) -> np.ndarray:
    """Every voxel different, so transposes and flips are caught."""
    return np.arange(np.prod(shape), dtype=np.float64).reshape(shape).astype(dtype)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 2) -> Path:
    """Write with nibabel directly (independent of the code under test)."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=qform_code)
    image.header.set_sform(affine, code=sform_code)
    nib.save(image, str(path))
    return path


def itk_image(array_ijk: np.ndarray) -> sitk.Image:
    """SimpleITK image with an oblique direction, anisotropic spacing and an origin."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    image.SetSpacing((0.7, 1.1, 3.0))
    image.SetOrigin((-20.0, 14.5, 3.25))
    c, s = np.cos(0.4), np.sin(0.4)
    image.SetDirection((c, 0.0, s, 0.0, 1.0, 0.0, -s, 0.0, c))
    return image


def lps_to_ras(point: tuple[float, ...]) -> np.ndarray:
    return np.array([-point[0], -point[1], point[2]])


@pytest.mark.parametrize("module", [volumes, layout])
def test_doctests(module: ModuleType) -> None:
    assert doctest.testmod(module).failed == 0


# ---------------------------------------------------------------------------------------- NIfTI


def test_nifti_round_trip_keeps_array_affine_and_codes_exactly(tmp_path: Path) -> None:
    array = ramp()
    source = save_nifti(tmp_path / "in.nii.gz", array, oblique_affine(), qform_code=1, sform_code=2)
    volume = read_volume(source)
    assert volume.array.shape == (1, *SHAPE) and volume.array.dtype == np.float32
    assert volume.shape == SHAPE and volume.array.flags.c_contiguous
    np.testing.assert_array_equal(volume.array[0], array)
    np.testing.assert_allclose(volume.affine, oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(volume.spacing, (0.6, 0.8, 2.5), rtol=1e-6)

    out = tmp_path / "sub" / "out.nii.gz"  # parent folder is created
    write_volume(out, volume.array, reference=volume)
    original, written = nib.load(str(source)), nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), array)
    np.testing.assert_array_equal(written.affine, original.affine)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    np.testing.assert_array_equal(written.header.get_qform(), original.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), original.header.get_sform())
    for key in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim"):
        np.testing.assert_array_equal(written.header[key], original.header[key])
    np.testing.assert_array_equal(read_volume(out).affine, volume.affine)
    assert not [p.name for p in out.parent.iterdir() if p.name != "out.nii.gz"]  # no temp file left


def test_uint8_segmentation_written_with_reference_geometry(tmp_path: Path) -> None:
    image = read_volume(save_nifti(tmp_path / "img.nii.gz", ramp(), oblique_affine()))
    segmentation = (ramp() % 3).astype(np.uint8)
    write_volume(tmp_path / "seg.nii.gz", segmentation, reference=image)
    written = nib.load(str(tmp_path / "seg.nii.gz"))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(written.affine, nib.load(str(tmp_path / "img.nii.gz")).affine)
    np.testing.assert_array_equal(written.header.get_qform(), image.header.get_qform())
    np.testing.assert_array_equal(written.header.get_sform(), image.header.get_sform())
    loaded = read_volume(tmp_path / "seg.nii.gz")
    assert loaded.array.dtype == np.uint8
    np.testing.assert_array_equal(loaded.array[0], segmentation)


def test_integer_dtypes_kept_and_int64_narrowed(tmp_path: Path) -> None:
    write_volume(tmp_path / "a.nii.gz", (ramp() - 50).astype(np.int16), affine=oblique_affine())
    assert read_volume(tmp_path / "a.nii.gz").array.dtype == np.int16
    write_volume(tmp_path / "b.nii.gz", np.argmax(np.stack([ramp(), -ramp()]), axis=0))  # int64
    assert read_volume(tmp_path / "b.nii.gz").array.dtype == np.int32
    written = nib.load(str(tmp_path / "a.nii.gz"))
    assert int(written.header["qform_code"]) > 0 and int(written.header["sform_code"]) > 0
    np.testing.assert_allclose(written.affine, oblique_affine(), atol=1e-5)


def test_reference_with_changed_affine_uses_new_affine_and_keeps_codes(tmp_path: Path) -> None:
    image = read_volume(save_nifti(tmp_path / "img.nii.gz", ramp(), oblique_affine(), 1, 2))
    shifted = image.affine.copy()
    shifted[:3, 3] += image.affine[:3, :3] @ [1, 2, 0]  # as after cropping one and two voxels
    cropped = Volume(image.array[:, 1:, 2:], shifted, image.header, image.path)
    write_volume(tmp_path / "crop.nii.gz", cropped.array, reference=cropped)
    written = nib.load(str(tmp_path / "crop.nii.gz"))
    assert written.shape == (4, 4, 7)
    np.testing.assert_allclose(written.affine, shifted, atol=1e-4)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)


def test_multichannel_write_gives_4d_nifti(tmp_path: Path) -> None:
    array = np.stack([ramp(), 2 * ramp()])
    write_volume(tmp_path / "probs.nii.gz", array, affine=oblique_affine())
    written = nib.load(str(tmp_path / "probs.nii.gz"))
    assert written.shape == (*SHAPE, 2)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj)[..., 1], 2 * ramp())
    write_volume(tmp_path / "probs.mha", array, affine=oblique_affine())
    vector = sitk.ReadImage(str(tmp_path / "probs.mha"))
    assert vector.GetNumberOfComponentsPerPixel() == 2 and vector.GetSize() == SHAPE
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vector)[..., 1].transpose(2, 1, 0), 2 * ramp())


# ---------------------------------------------------------------------------------- NRRD / MHA


@pytest.mark.parametrize("ending", [".nrrd", ".mha", ".nhdr", ".mhd"])
def test_itk_round_trip_keeps_array_and_affine(tmp_path: Path, ending: str) -> None:
    array = ramp(dtype=np.int16)
    image = itk_image(array)
    sitk.WriteImage(image, str(tmp_path / f"in{ending}"))
    volume = read_volume(tmp_path / f"in{ending}")
    assert volume.array.shape == (1, *SHAPE) and volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array[0], array)
    np.testing.assert_allclose(volume.spacing, (0.7, 1.1, 3.0))
    for index in [(0, 0, 0), (1, 2, 3), (4, 5, 6)]:
        world_ras = volume.affine @ [*index, 1.0]
        np.testing.assert_allclose(world_ras[:3], lps_to_ras(image.TransformIndexToPhysicalPoint(index)), atol=1e-9)
    assert isinstance(volume.header, ItkHeader)

    out = tmp_path / "out" / f"seg{ending}"
    write_volume(out, volume.array, reference=volume)
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(tmp_path / f"in{ending}"))
    assert written.GetOrigin() == source.GetOrigin()  # the file's values, not the (NRRD-rounded) original
    assert written.GetSpacing() == source.GetSpacing()
    assert written.GetDirection() == source.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written).transpose(2, 1, 0), array)
    again = read_volume(out)
    np.testing.assert_array_equal(again.affine, volume.affine)
    assert all(not p.name.startswith(".") for p in out.parent.iterdir())  # no temp file or folder left


def test_nifti_to_mha_keeps_world_position_of_a_voxel(tmp_path: Path) -> None:
    volume = read_volume(save_nifti(tmp_path / "img.nii.gz", ramp(), oblique_affine()))
    write_volume(tmp_path / "img.mha", volume.array, reference=volume)
    itk = sitk.ReadImage(str(tmp_path / "img.mha"))
    expected = (volume.affine @ [1, 2, 3, 1])[:3]
    np.testing.assert_allclose(lps_to_ras(itk.TransformIndexToPhysicalPoint((1, 2, 3))), expected, atol=1e-4)
    converted = read_volume(tmp_path / "img.mha")
    np.testing.assert_allclose(converted.affine, volume.affine, atol=1e-5)
    np.testing.assert_array_equal(converted.array, volume.array)
    # and back: MHA -> NIfTI
    write_volume(tmp_path / "back.nii", converted.array, reference=converted)
    np.testing.assert_allclose(read_volume(tmp_path / "back.nii").affine, volume.affine, atol=1e-4)


def test_dicom_series_folder(tmp_path: Path) -> None:
    array_ijk = ramp((7, 6, 4), np.int16)
    volume_itk = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
    volume_itk.SetSpacing((0.7, 0.9, 2.5))
    volume_itk.SetOrigin((10.0, -5.0, 3.0))
    series = "1.2.826.0.1.3680043.2.1125.1.424242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder = tmp_path / "dicom"
    folder.mkdir()
    for k in range(volume_itk.GetDepth()):
        slice_k = volume_itk[:, :, k]
        position = volume_itk.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0020|000d": series + ".1",  # study instance UID
            "0020|000e": series,  # series instance UID
            "0008|0018": f"{series}.2.{k}",  # SOP instance UID
            "0020|0013": str(k + 1),  # instance number
            "0020|0032": "\\".join(f"{v:g}" for v in position),  # image position (patient)
            "0020|0037": "1\\0\\0\\0\\1\\0",  # image orientation (patient)
            "0018|0050": "2.5",  # slice thickness
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:02d}.dcm"))
        writer.Execute(slice_k)
    locale.setlocale(locale.LC_ALL, "")  # as at start-up (GDCM's writer above switched to "C")
    before = locale.setlocale(locale.LC_ALL)
    volume = read_volume(folder)
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM's switch to "C" does not outlive the read
    assert volume.shape == (7, 6, 4)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.9, 2.5), atol=1e-6)
    np.testing.assert_array_equal(volume.array[0], array_ijk)
    np.testing.assert_allclose(volume.affine[:3, 3], [-10.0, 5.0, 3.0], atol=1e-6)  # LPS origin -> RAS


def test_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(VolsegError, match="DICOM") as info:
        read_volume(tmp_path)
    assert str(tmp_path) in str(info.value)


# ------------------------------------------------------------------------------ channels, labels


def test_read_image_stacks_channels_and_checks_alignment(tmp_path: Path) -> None:
    affine = oblique_affine()
    first = save_nifti(tmp_path / "c_0000.nii.gz", ramp(), affine)
    second = save_nifti(tmp_path / "c_0001.nii.gz", ramp(dtype=np.float32) * -1, affine)
    volume = read_image([first, second])
    assert volume.array.shape == (2, *SHAPE)
    np.testing.assert_array_equal(volume.array[1], -ramp())
    assert volume.path == str(first)

    moved = affine.copy()
    moved[0, 3] += 0.5
    shifted = save_nifti(tmp_path / "c_0002.nii.gz", ramp(), moved)
    with pytest.raises(VolsegError, match="affine") as info:
        read_image([first, shifted])
    assert "c_0002.nii.gz" in str(info.value)
    smaller = save_nifti(tmp_path / "c_0003.nii.gz", ramp((5, 6, 6)), affine)
    with pytest.raises(VolsegError, match="shape") as info:
        read_image([first, smaller])
    assert "c_0003.nii.gz" in str(info.value)


def test_read_label_casts_integral_floats_and_refuses_others(tmp_path: Path) -> None:
    values = (ramp() % 3).astype(np.float32)
    label = read_label(save_nifti(tmp_path / "float.nii.gz", values, oblique_affine()))
    assert label.array.dtype == np.uint8
    np.testing.assert_array_equal(label.array[0], values.astype(np.uint8))

    large = values * 150  # values up to 300 do not fit in uint8
    assert read_label(save_nifti(tmp_path / "large.nii.gz", large, np.eye(4))).array.dtype == np.int16

    with_fraction = values.copy()
    with_fraction[1, 2, 3] = 1.5
    with pytest.raises(VolsegError, match="non-integral") as info:
        read_label(save_nifti(tmp_path / "frac.nii.gz", with_fraction, np.eye(4)))
    assert "frac.nii.gz" in str(info.value)

    with_nan = values.copy()
    with_nan[0, 0, 0] = np.nan
    with pytest.raises(VolsegError, match="non-integral"):
        read_label(save_nifti(tmp_path / "nan.nii.gz", with_nan, np.eye(4)))


# ------------------------------------------------------------------------------------ bad files


def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = save_nifti(tmp_path / "good.nii.gz", ramp(), oblique_affine())
    raw = save_nifti(tmp_path / "good.nii", ramp(), oblique_affine())
    files = {
        "missing": tmp_path / "missing.nii.gz",
        "corrupt": tmp_path / "corrupt.nii.gz",
        "truncated_gz": tmp_path / "truncated.nii.gz",
        "truncated_nii": tmp_path / "truncated.nii",
        "text_as_nifti": tmp_path / "text.nii.gz",
        "text_as_nrrd": tmp_path / "text.nrrd",
        "not_an_image": tmp_path / "notes.txt",
    }
    files["corrupt"].write_bytes(np.random.default_rng(0).bytes(400))
    files["truncated_gz"].write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    files["truncated_nii"].write_bytes(raw.read_bytes()[:500])
    with gzip.open(files["text_as_nifti"], "wt") as handle:
        handle.write("just some text\n" * 40)
    files["text_as_nrrd"].write_text("hello\n")
    files["not_an_image"].write_text("hello\n")
    return files


@pytest.mark.parametrize(
    "kind",
    ["missing", "corrupt", "truncated_gz", "truncated_nii", "text_as_nifti", "text_as_nrrd", "not_an_image"],
)
def test_unreadable_files_raise_one_line_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = bad_files(tmp_path)[kind]
    with pytest.raises(VolsegError) as info:
        read_volume(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert info.value.__cause__ is None  # no chained library traceback


def test_4d_and_2d_refused_singleton_4d_accepted(tmp_path: Path) -> None:
    four_d = save_nifti(tmp_path / "4d.nii.gz", ramp((*SHAPE, 2)), np.eye(4))
    with pytest.raises(VolsegError, match=r"is 4D \(shape \(5, 6, 7, 2\)\), expected a 3D volume") as info:
        read_volume(four_d)
    assert "4d.nii.gz" in str(info.value)
    two_d = save_nifti(tmp_path / "2d.nii.gz", ramp((5, 6)), np.eye(4))
    with pytest.raises(VolsegError, match="is 2D"):
        read_volume(two_d)
    singleton = read_volume(save_nifti(tmp_path / "s.nii.gz", ramp((*SHAPE, 1)), np.eye(4)))
    assert singleton.array.shape == (1, *SHAPE)

    sitk.WriteImage(sitk.GetImageFromArray(ramp((6, 5))), str(tmp_path / "2d.mha"))
    with pytest.raises(VolsegError, match="is 2D"):
        read_volume(tmp_path / "2d.mha")
    vector = sitk.GetImageFromArray(ramp((7, 6, 5, 3)), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector.mha"))
    with pytest.raises(VolsegError, match="3 components"):
        read_volume(tmp_path / "vector.mha")


@pytest.mark.parametrize("ending", [".nii.gz", ".mha"])
def test_failed_write_leaves_target_untouched_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    target = tmp_path / f"out{ending}"
    target.write_bytes(b"previous result")

    def half_write(image: object, filename: str, *args: object) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(nib, "save", half_write)
    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(VolsegError, match="No space left") as info:
        write_volume(target, ramp())
    assert str(target) in str(info.value)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_write_refuses_bad_shapes_and_formats(tmp_path: Path) -> None:
    with pytest.raises(VolsegError, match="shape"):
        write_volume(tmp_path / "a.nii.gz", np.zeros((2, 3)))
    with pytest.raises(VolsegError, match="cannot write"):
        write_volume(tmp_path / "a.png", ramp())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ dataset layout


def write_json(root: Path, data: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(data))
    return root


V2 = {
    "channel_names": {"1": "ADC", "0": "T2"},
    "labels": {"background": 0, "peripheral": 1, "transition": 2},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def test_dataset_info_v2_and_msd_forms(tmp_path: Path) -> None:
    info = read_dataset_info(write_json(tmp_path / "v2", V2))
    assert info.channel_names == ("T2", "ADC")
    assert info.labels == (("background", 0), ("peripheral", 1), ("transition", 2))
    assert info.ignore_label is None and info.file_ending == ".nii.gz"

    msd = {"modality": {"0": "MRI"}, "labels": {"0": "background", "2": "Posterior", "1": "Anterior"}}
    info = read_dataset_info(write_json(tmp_path / "msd", msd))
    assert info.channel_names == ("MRI",)
    assert info.labels == (("background", 0), ("Anterior", 1), ("Posterior", 2))
    assert info.file_ending == ".nii.gz"  # default when missing

    with_ignore = {**V2, "labels": {"background": 0, "lesion": 1, "ignore": 2}, "file_ending": ".nrrd"}
    info = read_dataset_info(write_json(tmp_path / "ignore", with_ignore))
    assert info.ignore_label == 2 and ("ignore", 2) in info.labels and info.file_ending == ".nrrd"


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"labels": {"background": 0, "ignore": 1, "lesion": 2}}, "labels.ignore.*highest"),
        ({"labels": {"lesion": 1, "edema": 2}}, "background"),
        ({"labels": {"background": 0, "whole": [1, 2], "core": 2}}, "region-based labels are not supported yet"),
        ({"labels": ["background", "lesion"]}, "'labels'"),
        ({"labels": {"background": 0, "lesion": 1.5}}, "labels.lesion"),
        ({"labels": {"background": 0, "lesion": "1"}}, "labels.lesion"),
        ({"labels": {"background": 0, "a": 1, "b": 1}}, "share the value 1"),
        ({"channel_names": "T2"}, "'channel_names'"),
        ({"channel_names": {"0": "T2", "2": "ADC"}}, "'channel_names'"),
        ({"file_ending": 3}, "'file_ending'"),
        ({"numTraining": "many"}, "'numTraining'"),
    ],
)
def test_dataset_info_refuses_bad_fields(tmp_path: Path, change: dict, pattern: str) -> None:
    root = write_json(tmp_path, {**V2, **change})
    with pytest.raises(VolsegError, match=pattern) as info:
        read_dataset_info(root)
    assert "dataset.json" in str(info.value)


def test_dataset_info_missing_or_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(VolsegError, match="dataset.json.*missing"):
        read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(VolsegError, match="dataset.json.*not valid JSON"):
        read_dataset_info(tmp_path)
    with pytest.raises(VolsegError, match="does not exist"):
        read_dataset_info(tmp_path / "nowhere")


def touch_case(folder: Path, case_id: str, channels: range, ending: str = ".nii.gz") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for c in channels:
        (folder / f"{case_id}_{c:04d}{ending}").write_bytes(b"")


def test_list_cases_groups_channels_and_finds_labels(tmp_path: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    touch_case(images, "prostate_10", range(2))
    touch_case(images, "prostate_02", range(2))
    (images / "README.txt").write_text("ignored")
    (images / "prostate_02.nii.gz").write_bytes(b"")  # no channel suffix: ignored
    (images / "._prostate_02_0000.nii.gz").write_bytes(b"")  # macOS resource fork: ignored
    labels.mkdir()
    for case_id in ("prostate_02", "prostate_10"):
        (labels / f"{case_id}.nii.gz").write_bytes(b"")
    cases = list_cases(images, ".nii.gz", 2, labels)
    assert [c.case_id for c in cases] == ["prostate_02", "prostate_10"]
    assert cases[0] == Case(
        "prostate_02",
        (images / "prostate_02_0000.nii.gz", images / "prostate_02_0001.nii.gz"),
        labels / "prostate_02.nii.gz",
    )
    assert all(c.label is None for c in list_cases(images, ".nii.gz", 2))

    (labels / "prostate_10.nii.gz").unlink()
    with pytest.raises(VolsegError, match="label of case 'prostate_10' is missing"):
        list_cases(images, ".nii.gz", 2, labels)


def test_list_cases_missing_channel_and_empty_folder(tmp_path: Path) -> None:
    touch_case(tmp_path, "a", range(2))
    touch_case(tmp_path, "b", range(1))
    with pytest.raises(VolsegError, match="channel 1 of case 'b' is missing") as info:
        list_cases(tmp_path, ".nii.gz", 2)
    assert "b_0001.nii.gz" in str(info.value)
    with pytest.raises(VolsegError, match=r"<case>_<CCCC>\.nrrd"):
        list_cases(tmp_path, ".nrrd", 1)


def test_read_dataset_needs_root_and_images(tmp_path: Path) -> None:
    with pytest.raises(VolsegError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")
    write_json(tmp_path, V2)
    with pytest.raises(VolsegError, match="imagesTr"):
        read_dataset(tmp_path)


def test_strip_ending_and_output_path() -> None:
    assert strip_ending("case_0000.nrrd", ".nrrd") == "case_0000"
    with pytest.raises(VolsegError):
        strip_ending("case.nii", ".nii.gz")
    assert case_output_path(Path("out"), "c1", ".mha") == Path("out/c1.mha")


# ------------------------------------------------------------------------------- check_dataset


def build_case(root: Path, case_id: str, *, n_channels: int = 2, label: np.ndarray | None = None) -> None:
    affine = oblique_affine()
    for c in range(n_channels):
        save_nifti(root / "imagesTr" / f"{case_id}_{c:04d}.nii.gz", ramp() + c, affine)
    values = (ramp() % 3).astype(np.uint8) if label is None else label
    save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", values, affine)


def test_check_dataset_clean(tmp_path: Path) -> None:
    write_json(tmp_path, {**V2, "numTraining": 2})
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    build_case(tmp_path, "ok_1")
    build_case(tmp_path, "ok_2")
    assert check_dataset(tmp_path) == []
    info, cases = read_dataset(tmp_path)
    assert len(cases) == 2 and info.channel_names == ("T2", "ADC")


def test_check_dataset_reports_every_problem_at_once(tmp_path: Path) -> None:
    write_json(tmp_path, {**V2, "numTraining": 99})
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    affine = oblique_affine()
    build_case(tmp_path, "ok")
    build_case(tmp_path, "missing_channel")
    (images / "missing_channel_0001.nii.gz").unlink()
    build_case(tmp_path, "missing_label")
    (labels / "missing_label.nii.gz").unlink()
    build_case(tmp_path, "unreadable")
    (images / "unreadable_0001.nii.gz").write_bytes(b"garbage")
    build_case(tmp_path, "channel_shape")
    save_nifti(images / "channel_shape_0001.nii.gz", ramp((5, 6, 8)), affine)
    build_case(tmp_path, "label_shape", label=np.zeros((5, 6, 8), np.uint8))
    build_case(tmp_path, "label_affine")
    moved = affine.copy()
    moved[2, 3] += 0.01
    save_nifti(labels / "label_affine.nii.gz", np.zeros(SHAPE, np.uint8), moved)
    build_case(tmp_path, "undeclared", label=np.full(SHAPE, 5, np.uint8))
    build_case(tmp_path, "nan_voxels")
    with_nan = ramp()
    with_nan[1, 1, 1], with_nan[2, 2, 2] = np.nan, np.inf
    save_nifti(images / "nan_voxels_0000.nii.gz", with_nan, affine)
    build_case(tmp_path, "four_d")
    save_nifti(images / "four_d_0001.nii.gz", ramp((*SHAPE, 3)), affine)
    save_nifti(labels / "orphan.nii.gz", np.zeros(SHAPE, np.uint8), affine)

    problems = check_dataset(tmp_path)
    expected = {
        "numTraining is 99": "dataset.json",
        "channel 1 of case 'missing_channel' is missing": "missing_channel_0001.nii.gz",
        "label of case 'missing_label' is missing": "missing_label.nii.gz",
        "cannot read": "unreadable_0001.nii.gz",
        "shape (5, 6, 8) differs from channel 0": "channel_shape_0001.nii.gz",
        "shape (5, 6, 8) differs from the image": "label_shape.nii.gz",
        "affine differs from the image": "label_affine.nii.gz",
        "label values [5] not declared": "undeclared.nii.gz",
        "2 NaN or Inf voxels": "nan_voxels_0000.nii.gz",
        "is 4D": "four_d_0001.nii.gz",
        "label has no image": "orphan.nii.gz",
    }
    for fragment, file_name in expected.items():
        assert any(fragment in line and file_name in line for line in problems), (fragment, problems)
    assert not any("/ok_" in line or "ok.nii.gz" in line for line in problems)
    assert len(problems) == len(expected)
    assert all("\n" not in line for line in problems)


def test_check_dataset_with_broken_json_still_checks_files(tmp_path: Path) -> None:
    write_json(tmp_path, {**V2, "labels": "background", "channel_names": []})
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    build_case(tmp_path, "ok")
    build_case(tmp_path, "nolabel")
    (tmp_path / "labelsTr" / "nolabel.nii.gz").unlink()
    problems = check_dataset(tmp_path)
    assert any("'channel_names'" in line for line in problems)
    assert any("'labels'" in line for line in problems)
    assert any("nolabel.nii.gz" in line and "missing" in line for line in problems)
    assert len(problems) == 3
    assert check_dataset(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'}: dataset folder does not exist"]


def test_volume_properties() -> None:
    volume = Volume(np.zeros((2, *SHAPE), np.float32), np.diag([0.5, -0.5, 6.0, 1.0]))
    assert volume.shape == SHAPE and volume.spacing == (0.5, 0.5, 6.0)
    assert volume.affine.dtype == np.float64
    with pytest.raises(ValueError):
        Volume(np.zeros(SHAPE), np.eye(4))
    assert os.sep not in strip_ending("x.nii", ".nii")
