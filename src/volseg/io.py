"""Reading and writing volumes without losing geometry, and the nnU-Net v2 / MSD raw dataset layout.

Every reader returns a `Volume` whose array is channel-first `(C, I, J, K)` and whose affine maps
voxel indices `(i, j, k)` to RAS+ world millimetres, whatever the file format: NIfTI through
nibabel, NRRD/MetaImage/DICOM through SimpleITK (converted from ITK's `(K, J, I)` arrays and LPS
world). The format-specific header is kept so that `write_volume` can give an output exactly the
geometry of its input, which is what lets a viewer overlay a predicted segmentation on the image.
"""

from __future__ import annotations

import json
import locale
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from volseg.errors import VolsegError

NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd")
DETACHED_ENDINGS = (".nhdr", ".mhd")  # header file plus a separate data file
SUPPORTED_ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS
DEFAULT_FILE_ENDING = ".nii.gz"

_SUPPORTED_HINT = "supported: " + ", ".join(SUPPORTED_ENDINGS) + " or a DICOM series folder"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # ITK world is LPS, nibabel's is RAS: flip the first two rows
_AFFINE_MATCH_ATOL = 1e-6  # a Volume's affine "still is" its header's geometry (float32 round-off)
_CHANNEL_AFFINE_ATOL = 1e-4
_LABEL_AFFINE_ATOL = 1e-3


@dataclass(frozen=True)
class ItkHeader:
    """Geometry of a SimpleITK-read image (ITK/LPS convention), kept to write it back bit-exactly."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Volume:
    """An image or segmentation with the geometry that places it in the world.

    `array` is always `(C, I, J, K)`; `affine` maps `(i, j, k)` to RAS+ mm. `header` is the file's
    own description (a nibabel NIfTI header or an `ItkHeader`) used to write outputs exactly.
    """

    array: np.ndarray
    affine: np.ndarray
    header: object | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 4:
            raise ValueError(f"Volume.array must be (C, I, J, K), got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got shape {self.affine.shape}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along I, J, K (norms of the affine's first three columns)."""
        return affine_spacing(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (I, J, K)."""
        return tuple(int(n) for n in self.array.shape[1:])  # type: ignore[return-value]


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along I, J, K: the lengths of the affine's first three columns.

    >>> affine_spacing(np.diag([0.5, -0.5, 6.0, 1.0]))
    (0.5, 0.5, 6.0)
    """
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


# --------------------------------------------------------------------------------------------------
# file names


def image_ending(path: str | os.PathLike) -> str | None:
    """The recognised image ending of a file name (lower case), or None.

    >>> image_ending("case_0000.NII.GZ"), image_ending("seg.nrrd"), image_ending("notes.txt")
    ('.nii.gz', '.nrrd', None)
    """
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return None


def strip_ending(name: str, file_ending: str) -> str:
    """File name without its ending, e.g. the case id of a label file.

    >>> strip_ending("hippocampus_001_0000.nii.gz", ".nii.gz")
    'hippocampus_001_0000'
    """
    if not file_ending or not name.endswith(file_ending) or len(name) == len(file_ending):
        raise VolsegError(name, f"file name does not end with {file_ending!r}")
    return name[: -len(file_ending)]


def case_output_path(out_dir: str | os.PathLike, case_id: str, file_ending: str) -> Path:
    """Where the prediction of one case goes: `<out_dir>/<case_id><file_ending>`.

    >>> case_output_path("out", "liver_007", ".nii.gz").as_posix()
    'out/liver_007.nii.gz'
    """
    return Path(out_dir) / f"{case_id}{file_ending}"


# --------------------------------------------------------------------------------------------------
# reading


def _short_reason(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """One line out of a library exception, without the file name the message already starts with.

    SimpleITK's messages span several lines and name C++ source files: keep the ERROR line only,
    plus the innermost cause when that line ends in a colon (NRRD's "Error reading <file>:").
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if "ERROR:" in line]
    if errors:
        text = lines[errors[-1]].split("ERROR:", 1)[1].strip()
        text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)  # "MetaImageIO(0x55d9...): " says nothing
        if text.endswith(":") and errors[-1] + 1 < len(lines):
            text += " " + re.sub(r"^\[\w+\]\s*", "", lines[-1])  # "[nrrd] ...: expected 4004 bytes but ..."
    else:
        text = " ".join(lines) or type(exc).__name__
    if path is not None:
        for spelling in (f'"{path}"', f"'{path}'", str(path)):
            text = text.replace(spelling, "the file")
        text = text.replace("File the file", "the file")
    if len(text) > 200:
        text = text[:197] + "..."
    return text


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze trailing singleton dimensions beyond the third; refuse anything not 3D."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolsegError(
            path,
            f"is {array.ndim}D (shape {tuple(array.shape)}), expected a 3D volume",
            "give one file per channel, named <case>_<CCCC>" if array.ndim == 4 else None,
        )
    if 0 in array.shape:
        raise VolsegError(path, f"is empty (shape {tuple(array.shape)})")
    return array


def _check_geometry(affine: np.ndarray, path: Path) -> None:
    spacing = affine_spacing(affine)
    if not np.all(np.isfinite(affine)) or min(spacing) <= 0:
        raise VolsegError(path, f"has an invalid voxel-to-world affine (spacing {spacing})")


def _read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(str(path), mmap=False)
        array = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel, gzip, zlib and OS errors all mean: unreadable
        raise VolsegError(path, f"cannot read as NIfTI: {_short_reason(exc, path)}") from None
    array = np.ascontiguousarray(_as_3d(np.asarray(array), path))  # nibabel's arrays are Fortran-ordered
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_geometry(affine, path)
    return Volume(array[np.newaxis], affine, image.header, str(path))


def _itk_to_affine(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """RAS affine of an ITK geometry: world_lps = origin + direction @ diag(spacing) @ index."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ matrix
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def _affine_to_itk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Inverse of `_itk_to_affine`: (origin, spacing, row-major direction) in ITK's LPS world."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = (_LPS_TO_RAS @ affine[:3, :3]) / spacing
    origin = _LPS_TO_RAS @ affine[:3, 3]
    return (
        tuple(float(v) for v in origin),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.ravel()),
    )


def _volume_from_itk(image: sitk.Image, path: Path, metadata: dict[str, str]) -> Volume:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolsegError(
            path,
            f"has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            f"(size {image.GetSize()}), expected a 3D single-channel volume",
            "give one file per channel, named <case>_<CCCC>",
        )
    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(image)  # (.., K, J, I): reverse the axes to (I, J, K, ..)
    array = array.transpose(tuple(range(array.ndim - 1, -1, -1)))
    if dim < 3:
        raise VolsegError(path, f"is {dim}D (shape {tuple(array.shape)}), expected a 3D volume")
    array = np.ascontiguousarray(_as_3d(array, path))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    header = ItkHeader(
        origin=tuple(float(v) for v in image.GetOrigin()[:3]),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in image.GetSpacing()[:3]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
        metadata=metadata,
    )
    affine = _itk_to_affine(header.origin, header.spacing, header.direction)
    _check_geometry(affine, path)
    return Volume(array[np.newaxis], affine, header, str(path))


@contextmanager
def _native_stderr_caught() -> Iterator[list[str]]:
    """Catch what C++ code prints to file descriptor 2 while the block runs.

    ITK's MetaImage and NRRD readers report a truncated file on `std::cerr` before they raise, out of
    Python's reach: without this a bad file gives stray lines around our one-line message. The
    lines land in the yielded list; the caller decides whether they explain an error or are echoed.
    """
    lines: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2 (embedded interpreter)
        yield lines
        return
    sink = tempfile.TemporaryFile()
    try:
        os.dup2(sink.fileno(), 2)
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)
        text = sink.read().decode("utf-8", errors="replace")
        sink.close()
        lines.extend(line.strip() for line in text.splitlines() if line.strip())


def _read_itk_file(path: Path) -> Volume:
    caught: list[str] = []
    try:
        with _native_stderr_caught() as caught:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            image = reader.Execute()
            metadata = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    except Exception as exc:
        if caught:  # ITK's own explanation, e.g. "data not read completely" for a truncated file
            reason = " ".join(" ".join(caught).split())
            reason = reason if len(reason) <= 200 else reason[:197] + "..."
            raise VolsegError(path, f"cannot read image: {reason}", "the file may be truncated or damaged") from None
        raise VolsegError(path, f"cannot read image: {_short_reason(exc, path)}") from None
    if caught:  # a successful read with warnings: pass them on rather than swallow them
        print("\n".join(caught), file=sys.stderr)
    return _volume_from_itk(image, path, metadata)


def _read_dicom_series(folder: Path) -> Volume:
    warnings_shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr about every odd file
    # GDCM switches the whole process to the "C" locale, after which Python's default text
    # encoding is ASCII (torch.compile then fails on its own sources): put the locale back.
    kept_locale = locale.setlocale(locale.LC_ALL)
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        if not series_ids:
            raise VolsegError(folder, "is a folder without a DICOM series", _SUPPORTED_HINT)
        file_names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(file_names)
        image = reader.Execute()
    except VolsegError:
        raise
    except Exception as exc:
        raise VolsegError(folder, f"cannot read DICOM series: {_short_reason(exc, folder)}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings_shown)
        locale.setlocale(locale.LC_ALL, kept_locale)
    return _volume_from_itk(image, folder, {"series_id": series_ids[0]})


def read_volume(path: str | os.PathLike) -> Volume:
    """Read one image file (NIfTI, NRRD, MetaImage) or a DICOM series folder as `(1, I, J, K)`.

    The array keeps the file's dtype. Anything unreadable or not 3D raises `VolsegError` naming
    the file; NaN/Inf voxels are not checked here (`check_dataset` reports them).
    """
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(path)
    if not path.exists():
        raise VolsegError(path, "file does not exist")
    ending = image_ending(path)
    if path.is_file() and path.stat().st_size == 0:
        raise VolsegError(path, "is an empty file (0 bytes)")
    if ending in NIFTI_ENDINGS:
        return _read_nifti(path)
    if ending in ITK_ENDINGS:
        return _read_itk_file(path)
    raise VolsegError(path, "is not a supported image file", _SUPPORTED_HINT)


def read_image(paths: Sequence[str | os.PathLike]) -> Volume:
    """Read the single-channel files of one case into `(C, I, J, K)`, checking they align."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise VolsegError(None, "no image files given")
    volumes = [read_volume(p) for p in paths]
    first = volumes[0]
    for volume in volumes[1:]:
        problem = _alignment_problem(volume, first, _CHANNEL_AFFINE_ATOL, "channel 0")
        if problem:
            raise VolsegError(volume.path, problem)
    array = np.concatenate([v.array for v in volumes], axis=0)
    return Volume(array, first.affine, first.header, first.path)


@dataclass(frozen=True)
class _Grid:
    """Shape and affine of a file read from its header alone: enough to compare voxel grids."""

    shape: tuple[int, ...]
    affine: np.ndarray
    path: str


def _header_grid(path: Path) -> _Grid | None:
    """The voxel grid a file's header declares, without reading its voxels; None when the header
    does not describe a plain 3D volume (the full read then gives the precise error)."""
    ending = image_ending(path)
    try:
        if ending in NIFTI_ENDINGS:
            image = nib.load(str(path))  # lazy: only the header is read
            shape = tuple(int(n) for n in image.shape)
            affine = np.asarray(image.affine, dtype=np.float64)
        elif ending in ITK_ENDINGS:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            with _native_stderr_caught():
                reader.ReadImageInformation()
            if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
                return None
            shape = tuple(int(n) for n in reader.GetSize())
            affine = _itk_to_affine(reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())
        else:
            return None
    except Exception:  # unreadable: reported by whoever reads the voxels
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return _Grid(shape, affine, str(path)) if len(shape) == 3 else None


def _grid_problems(cases: Sequence[Case]) -> list[str]:
    """Channels or labels off their case's voxel grid, found from the headers (cheap enough to run
    before every training: a misaligned label would otherwise be cropped against the wrong voxels)."""
    problems = []
    for case in cases:
        reference = _header_grid(case.images[0])
        if reference is None:
            continue
        for path in case.images[1:]:
            grid = _header_grid(path)
            problem = grid and _alignment_problem(grid, reference, _CHANNEL_AFFINE_ATOL, "channel 0")
            if problem:
                problems.append(VolsegError(path, problem).message)
        if case.label is not None:
            grid = _header_grid(case.label)
            problem = grid and _alignment_problem(grid, reference, _LABEL_AFFINE_ATOL, "the image")
            if problem:
                problems.append(VolsegError(case.label, problem, _ON_GRID_HINT).message)
    return problems


_ON_GRID_HINT = "labels must lie on the voxel grid of their image"


def _alignment_problem(volume: Volume | _Grid, reference: Volume | _Grid, atol: float, what: str) -> str | None:
    """Why `volume` does not sit on the same voxel grid as `reference`, or None."""
    if volume.shape != reference.shape:
        return f"shape {volume.shape} differs from {what} ({reference.path}) shape {reference.shape}"
    if not np.allclose(volume.affine, reference.affine, atol=atol, rtol=0):
        diff = float(np.max(np.abs(volume.affine - reference.affine)))
        return f"affine differs from {what} ({reference.path}) by up to {diff:.3g} (tolerance {atol:g})"
    return None


def label_dtype(low: int, high: int) -> np.dtype:
    """Smallest of uint8/int16/int32 holding every value in [low, high].

    >>> label_dtype(0, 2), label_dtype(0, 300), label_dtype(-1, 3)
    (dtype('uint8'), dtype('int16'), dtype('int16'))
    """
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise ValueError(f"label values {low}..{high} do not fit in int32")


def _integral_label_array(array: np.ndarray, path: str | os.PathLike | None) -> np.ndarray:
    """Cast a label array to the smallest fitting integer dtype; non-integral values are refused."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating):
            raise VolsegError(path, f"has voxel type {array.dtype}, expected integer label values")
        integral = np.isfinite(array) & (array == np.round(array))
        if not integral.all():
            bad = array[~integral]
            raise VolsegError(
                path,
                f"holds {bad.size} non-integral label values (e.g. {bad.flat[0]!r})",
                "labels must be whole numbers, one per class",
            )
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    try:
        dtype = label_dtype(low, high)
    except ValueError as exc:
        raise VolsegError(path, str(exc)) from None
    return array.astype(dtype, copy=array.dtype != dtype)


def read_label(path: str | os.PathLike) -> Volume:
    """Read a segmentation as integers (uint8 when values fit in 0..255, else int16/int32)."""
    volume = read_volume(path)
    volume.array = _integral_label_array(volume.array, volume.path)
    return volume


# --------------------------------------------------------------------------------------------------
# writing


def _writable_array(array: np.ndarray) -> np.ndarray:
    """Dtypes every writer and viewer understands; integers keep their dtype except 64-bit ones."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype in (np.int64, np.uint64):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if np.iinfo(np.int32).min <= low and high <= np.iinfo(np.int32).max:
            return array.astype(np.int32)  # e.g. argmax output; nibabel refuses int64 by default
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise VolsegError(None, f"cannot write voxel type {array.dtype}")
    return array


def _header_matches(volume: Volume) -> bool:
    """Whether the volume's header still describes its affine (it may have been cropped since)."""
    header = volume.header
    if isinstance(header, nib.Nifti1Header):
        best = header.get_best_affine()
    elif isinstance(header, ItkHeader):
        best = _itk_to_affine(header.origin, header.spacing, header.direction)
    else:
        return False
    return bool(np.allclose(best, volume.affine, atol=_AFFINE_MATCH_ATOL, rtol=0))


def _nifti_image(array_ijkc: np.ndarray, affine: np.ndarray, reference: Volume | None) -> nib.Nifti1Image:
    """A NIfTI image; with a NIfTI reference its header (qform/sform codes and matrices) is reused."""
    if reference is not None and isinstance(reference.header, nib.Nifti1Header):
        header = reference.header.copy()
        header.set_data_dtype(array_ijkc.dtype)
        header.set_data_shape(array_ijkc.shape)
        header.set_slope_inter(None, None)  # the array is written as is, no intensity scaling
        header["cal_min"], header["cal_max"] = 0, 0
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        if _header_matches(reference):
            return image_class(array_ijkc, None, header=header)  # header verbatim: bit-exact geometry
        qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
        header.set_qform(affine, code=qform_code or 1)
        header.set_sform(affine, code=sform_code or 1)
        return image_class(array_ijkc, None, header=header)
    image = nib.Nifti1Image(array_ijkc, affine)
    image.header.set_data_dtype(array_ijkc.dtype)
    image.header.set_qform(affine, code=1)  # "scanner", as ITK writes: both forms valid
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, reference: Volume | None) -> None:
    array_ijkc = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    nib.save(_nifti_image(array_ijkc, affine, reference), str(path))


def _write_itk(path: Path, array: np.ndarray, affine: np.ndarray, reference: Volume | None) -> None:
    if array.shape[0] == 1:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array[0].transpose(2, 1, 0)))
    else:  # (C, I, J, K) -> (K, J, I, C): a vector image with C components per voxel
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(3, 2, 1, 0)), isVector=True)
    if reference is not None and isinstance(reference.header, ItkHeader) and _header_matches(reference):
        header = reference.header
        origin, spacing, direction = header.origin, header.spacing, header.direction
    else:
        origin, spacing, direction = _affine_to_itk(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), True)


def write_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    reference: Volume | None = None,
    affine: np.ndarray | None = None,
) -> None:
    """Write `(I, J, K)` or `(C, I, J, K)` atomically, with the geometry of `reference` or `affine`.

    The format follows the path's ending and may differ from the reference's (geometry then goes
    through the affine). The file is written under a temporary name in the same folder and renamed
    onto `path`, so a crash never leaves a half-written output behind.
    """
    path = Path(path)
    if reference is not None and affine is not None:
        raise ValueError("give either reference or affine, not both")
    ending = image_ending(path)
    if ending is None or path.is_dir():
        raise VolsegError(path, "cannot write this file type", "use " + ", ".join(SUPPORTED_ENDINGS))
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[np.newaxis]
    if array.ndim != 4 or 0 in array.shape:
        raise VolsegError(path, f"cannot write an array of shape {array.shape}, expected (I, J, K) or (C, I, J, K)")
    try:
        array = _writable_array(array)
    except VolsegError as exc:
        raise VolsegError(path, exc.problem) from None
    if reference is not None:
        geometry = reference.affine
    else:
        geometry = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if geometry.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {geometry.shape}")
    _check_geometry(geometry, path)
    writer = _write_nifti if ending in NIFTI_ENDINGS else _write_itk
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, no permission, no space
        raise VolsegError(path.parent, f"cannot create the output folder: {exc.strerror or exc}") from None
    if ending in DETACHED_ENDINGS:
        _write_detached_atomically(path, lambda target: writer(target, array, geometry, reference))
    else:
        _write_atomically(path, ending, lambda target: writer(target, array, geometry, reference))


def _write_atomically(path: Path, ending: str, write: Any) -> None:
    stem = path.name[: -len(ending)]
    temporary = path.parent / f".{stem}.tmp-{os.getpid()}{path.name[-len(ending):]}"
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, VolsegError):
            raise VolsegError(path, f"cannot write: {_write_reason(exc)}") from None
        raise


def _write_reason(exc: BaseException) -> str:
    """"No space left on device" rather than errno digits and the temporary file's name."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _short_reason(exc)


_TEMPORARY_NAME = re.compile(r"\..+\.tmp-(\d+)(\.[A-Za-z.]+)?")  # ours: `.<stem>.tmp-<pid><ending>`


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders `write_volume` left in `folder` when its process died.

    A process killed while writing (SIGKILL, power loss) cannot clean up; its temporaries carry its
    process id, so those of processes still running (another writer into the same folder) are kept.
    Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.fullmatch(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or cannot tell: leave its files alone
    return True


def _write_detached_atomically(path: Path, write: Any) -> None:
    """.nhdr/.mhd name their data file after the header: write both into a temporary folder under
    their final names, then move the data file(s) first and the header last."""
    folder = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        folder.mkdir()
        write(folder / path.name)
        written = sorted(folder.iterdir(), key=lambda p: p.name == path.name)  # header last
        for file in written:
            os.replace(file, path.parent / file.name)
        folder.rmdir()
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, VolsegError):
            raise VolsegError(path, f"cannot write: {_write_reason(exc)}") from None
        raise


@contextmanager
def folder_written_atomically(out: Path, subfolders: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh temporary sibling folder to fill; it replaces `out` only if the block completes.

    A dataset written by volseg is therefore either the old one or the complete new one, never
    half of each; an interrupted or failed write leaves only `.<name>.tmp-<pid>`, which the
    block removes itself on errors.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in subfolders:
            (tmp / sub).mkdir(parents=True)
        tmp.mkdir(parents=True, exist_ok=True)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --------------------------------------------------------------------------------------------------
# nnU-Net v2 / MSD raw dataset layout


@dataclass(frozen=True)
class Case:
    """One training or prediction case: its channel files in channel order and its label file."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class DatasetInfo:
    """What dataset.json declares: channels, labels (with nnU-Net's `ignore`) and the file ending."""

    root: Path
    channel_names: tuple[str, ...]
    labels: tuple[tuple[str, int], ...]
    ignore_label: int | None
    file_ending: str
    num_training: int | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_key(key: str) -> bool:
    return re.fullmatch(r"\d+", key) is not None


def _parse_channels(data: dict, problems: list[str]) -> tuple[str, ...] | None:
    key = "channel_names" if "channel_names" in data else "modality" if "modality" in data else None
    if key is None:
        problems.append("field 'channel_names' is missing (e.g. {\"0\": \"CT\"})")
        return None
    channels = data[key]
    if not isinstance(channels, dict) or not channels:
        problems.append(f"field {key!r} must be a non-empty object like {{\"0\": \"CT\"}}, got {channels!r}")
        return None
    if not all(_is_int_key(k) for k in channels):
        problems.append(f"field {key!r} keys must be channel indices \"0\", \"1\", ..., got {list(channels)}")
        return None
    indices = sorted(int(k) for k in channels)
    if indices != list(range(len(indices))):
        problems.append(f"field {key!r} must number channels 0..{len(indices) - 1} without gaps, got {indices}")
        return None
    by_index = {int(k): v for k, v in channels.items()}
    if not all(isinstance(v, str) for v in by_index.values()):
        problems.append(f"field {key!r} values must be channel names (strings), got {list(by_index.values())}")
        return None
    return tuple(by_index[i] for i in range(len(indices)))


def _parse_labels(data: dict, problems: list[str]) -> tuple[tuple[tuple[str, int], ...], int | None] | None:
    if "labels" not in data:
        problems.append("field 'labels' is missing (e.g. {\"background\": 0, \"tumour\": 1})")
        return None
    labels = data["labels"]
    if not isinstance(labels, dict) or not labels:
        problems.append(f"field 'labels' must be a non-empty object of name: value, got {labels!r}")
        return None
    if all(_is_int_key(k) and isinstance(v, str) for k, v in labels.items()):
        pairs = [(name, int(value)) for value, name in labels.items()]  # MSD v1: {"0": "background"}
    else:
        pairs = []
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                problems.append(
                    f"field 'labels.{name}' is a region ({value!r}): region-based labels are not supported yet"
                )
                return None
            if not _is_int(value):
                problems.append(f"field 'labels.{name}' must be an integer label value, got {value!r}")
                return None
            pairs.append((name, value))
    pairs.sort(key=lambda pair: pair[1])
    values = [value for _, value in pairs]
    for (name_a, value_a), (name_b, value_b) in zip(pairs, pairs[1:]):
        if value_a == value_b:
            problems.append(f"field 'labels': {name_a!r} and {name_b!r} share the value {value_a}")
            return None
    if values[0] < 0:
        problems.append(f"field 'labels': values must be >= 0, got {values[0]}")
        return None
    if values[0] != 0:
        problems.append("field 'labels' must declare background with value 0 (e.g. \"background\": 0)")
        return None
    names = {name: value for name, value in pairs}
    ignore = names.get("ignore")
    if ignore is not None and (ignore != values[-1] or ignore == 0):
        problems.append(
            f"field 'labels.ignore' is {ignore} but must be the highest label value ({values[-1]})",
        )
        return None
    return tuple(pairs), ignore


def _parse_dataset_json(root: Path) -> tuple[DatasetInfo | None, list[str], str]:
    """Parse dataset.json collecting every problem; also return the best-guess file ending."""
    path = root / "dataset.json"
    problems: list[str] = []
    if not path.is_file():
        return None, [VolsegError(path, "is missing", "the nnU-Net v2 raw layout needs one").message], DEFAULT_FILE_ENDING
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [VolsegError(path, f"is not valid JSON: {exc}").message], DEFAULT_FILE_ENDING
    if not isinstance(data, dict):
        return None, [VolsegError(path, "must hold a JSON object").message], DEFAULT_FILE_ENDING
    ending = data.get("file_ending", DEFAULT_FILE_ENDING)
    if not isinstance(ending, str) or not ending.startswith(".") or len(ending) < 2:
        problems.append(f"field 'file_ending' must be a string like \".nii.gz\", got {ending!r}")
        ending = DEFAULT_FILE_ENDING
    elif image_ending("x" + ending) != ending.lower():
        problems.append(f"field 'file_ending' {ending!r} is not a supported format ({_SUPPORTED_HINT})")
    num_training = data.get("numTraining")
    if num_training is not None and (not _is_int(num_training) or num_training < 0):
        problems.append(f"field 'numTraining' must be a non-negative integer, got {num_training!r}")
        num_training = None
    channels = _parse_channels(data, problems)
    labels = _parse_labels(data, problems)
    messages = [VolsegError(path, problem).message for problem in problems]
    if problems or channels is None or labels is None:
        return None, messages, ending
    info = DatasetInfo(root, channels, labels[0], labels[1], ending, num_training)
    return info, [], ending


def read_dataset_info(root: str | os.PathLike) -> DatasetInfo:
    """Read dataset.json (nnU-Net v2 form, or MSD v1 with `modality` and value->name labels)."""
    root = Path(root)
    if not root.is_dir():
        raise VolsegError(root, "dataset folder does not exist")
    info, problems, _ = _parse_dataset_json(root)
    if info is None:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise VolsegError(None, problems[0] + more)
    return info


_CHANNEL_FILE = re.compile(r"(.+)_(\d{4})")


def _channel_files(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    """`<case>_<CCCC><ending>` files of a folder by case id and channel; dotfiles are skipped."""
    channels: dict[str, dict[int, Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.name.endswith(ending) or entry.is_dir():
            continue
        match = _CHANNEL_FILE.fullmatch(entry.name[: -len(ending)])
        if match:
            channels.setdefault(match.group(1), {})[int(match.group(2))] = entry
    return channels


def _scan_cases(
    folder: Path, ending: str, n_channels: int, label_folder: Path | None
) -> tuple[list[Case], list[str]]:
    """Group `<case>_<CCCC><ending>` files into complete cases, collecting every naming problem."""
    problems: list[str] = []
    if not folder.is_dir():
        return [], [VolsegError(folder, "image folder does not exist").message]
    channels = _channel_files(folder, ending)
    if not channels:
        problems.append(
            VolsegError(
                folder,
                f"holds no image files named <case>_<CCCC>{ending}",
                f"name channel c of case 'case1' like case1_{0:04d}{ending}",
            ).message
        )
        return [], problems
    if label_folder is not None and not label_folder.is_dir():
        problems.append(VolsegError(label_folder, "label folder does not exist").message)
        label_folder_ok = False
    else:
        label_folder_ok = label_folder is not None
    cases = []
    for case_id in sorted(channels):
        files = channels[case_id]
        missing = [c for c in range(n_channels) if c not in files]
        extra = sorted(c for c in files if c >= n_channels)
        for c in missing:
            expected = folder / f"{case_id}_{c:04d}{ending}"
            problems.append(VolsegError(expected, f"channel {c} of case {case_id!r} is missing").message)
        for c in extra:
            problems.append(
                VolsegError(
                    files[c], f"channel {c} of case {case_id!r} is beyond the {n_channels} declared channel(s)"
                ).message
            )
        label = None
        if label_folder is not None:
            label = label_folder / f"{case_id}{ending}"
            if label_folder_ok and not label.is_file():
                problems.append(VolsegError(label, f"label of case {case_id!r} is missing").message)
        if not missing:
            cases.append(Case(case_id, tuple(files[c] for c in range(n_channels)), label))
    return cases, problems


def list_cases(
    folder: str | os.PathLike,
    file_ending: str,
    n_channels: int,
    label_folder: str | os.PathLike | None = None,
) -> list[Case]:
    """Cases of a folder of `<case>_<CCCC><file_ending>` images, sorted by case id.

    Labels are `<case><file_ending>` in `label_folder` (None: cases get `label=None`). Files not
    following the pattern are ignored; a missing channel or label raises `VolsegError`.
    """
    cases, problems = _scan_cases(
        Path(folder), file_ending, n_channels, None if label_folder is None else Path(label_folder)
    )
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise VolsegError(None, problems[0] + more)
    return cases


def read_dataset(root: str | os.PathLike) -> tuple[DatasetInfo, list[Case]]:
    """dataset.json plus the training cases of `imagesTr`/`labelsTr`."""
    root = Path(root)
    info = read_dataset_info(root)
    if not (root / "imagesTr").is_dir():
        raise VolsegError(root, "has no imagesTr folder", "the nnU-Net v2 raw layout puts training images there")
    cases = list_cases(root / "imagesTr", info.file_ending, len(info.channel_names), root / "labelsTr")
    problems = _grid_problems(cases)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise VolsegError(None, problems[0] + more)
    return info, cases


def read_case(case: Case, declared: Sequence[int] | set[int] | None = None) -> tuple[Volume, Volume | None]:
    """Image `(C, I, J, K)` and label `(1, I, J, K)` of one case, refusing a label off the image grid.

    A label of another shape or affine would be cropped against the wrong voxels without any error,
    so training must not start on it. With `declared` (the dataset.json values, `ignore`
    included), label values outside it are refused too.
    """
    image = read_image(case.images)
    if case.label is None:
        return image, None
    label = read_label(case.label)
    problem = _alignment_problem(label, image, _LABEL_AFFINE_ATOL, "the image")
    if problem:
        raise VolsegError(case.label, problem, _ON_GRID_HINT)
    if declared is not None:
        undeclared = sorted(set(_label_values(label.array).tolist()) - set(declared))
        if undeclared:
            raise VolsegError(
                case.label,
                f"holds label values {undeclared} not declared in dataset.json (declared {sorted(declared)})",
            )
    return image, label


def _label_values(array: np.ndarray) -> np.ndarray:
    """Distinct values of an integer label array (bincount is much faster than unique for uint8)."""
    if array.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(array.ravel(), minlength=1))
    return np.unique(array)


def _check_case(case: Case, declared: set[int] | None) -> list[str]:
    """Every problem of one case, reading each of its files once."""
    problems: list[str] = []
    channels: list[Volume] = []
    for path in case.images:
        try:
            volume = read_volume(path)
        except VolsegError as exc:
            problems.append(exc.message)
            continue
        if np.issubdtype(volume.array.dtype, np.floating):
            n_bad = int(volume.array.size - np.count_nonzero(np.isfinite(volume.array)))
            if n_bad:
                problems.append(VolsegError(path, f"has {n_bad} NaN or Inf voxels").message)
        if channels:
            problem = _alignment_problem(volume, channels[0], _CHANNEL_AFFINE_ATOL, "channel 0")
            if problem:
                problems.append(VolsegError(path, problem).message)
        channels.append(volume)
    if case.label is None or not case.label.is_file():
        return problems
    try:
        label = read_volume(case.label)
        label.array = _integral_label_array(label.array, case.label)
    except VolsegError as exc:
        problems.append(exc.message)
        return problems
    if channels:
        problem = _alignment_problem(label, channels[0], _LABEL_AFFINE_ATOL, "the image")
        if problem:
            problems.append(VolsegError(case.label, problem).message)
    if declared is not None:
        undeclared = sorted(set(_label_values(label.array).tolist()) - declared)
        if undeclared:
            problems.append(
                VolsegError(
                    case.label,
                    f"holds label values {undeclared} not declared in dataset.json (declared {sorted(declared)})",
                ).message
            )
    return problems


def check_dataset(root: str | os.PathLike) -> list[str]:
    """Every problem of a raw dataset, one line each naming the file; an empty list means OK."""
    root = Path(root)
    if not root.is_dir():
        return [VolsegError(root, "dataset folder does not exist").message]
    info, problems, ending = _parse_dataset_json(root)
    images_folder, labels_folder = root / "imagesTr", root / "labelsTr"
    if not images_folder.is_dir():
        return problems + [VolsegError(images_folder, "is missing", "training images go there").message]
    channel_files = _channel_files(images_folder, ending)
    if info is not None:
        n_channels = len(info.channel_names)
    else:  # dataset.json is broken: still check the files, with the channel count they suggest
        n_channels = 1 + max((c for files in channel_files.values() for c in files), default=0)
    cases, scan_problems = _scan_cases(images_folder, ending, n_channels, labels_folder)
    problems += scan_problems
    if labels_folder.is_dir():
        for entry in sorted(labels_folder.iterdir()):
            if entry.name.startswith(".") or not entry.name.endswith(ending):
                continue
            case_id = entry.name[: -len(ending)]
            if case_id not in channel_files:
                problems.append(VolsegError(entry, f"label has no image {case_id}_0000{ending} in imagesTr").message)
    if info is not None and info.num_training is not None and info.num_training != len(channel_files):
        problems.append(
            VolsegError(
                root / "dataset.json", f"numTraining is {info.num_training} but imagesTr has {len(channel_files)} cases"
            ).message
        )
    declared = None if info is None else {value for _, value in info.labels}
    for case in cases:
        problems += _check_case(case, declared)
    return problems


def read_grid(path: str | os.PathLike) -> tuple[tuple[int, int, int], tuple[float, float, float]] | None:
    """Shape and spacing from a file's header alone (no voxels read); None if the header can't say.

    Planning uses this to choose a target spacing before any image is loaded.
    """
    grid = _header_grid(Path(path))
    if grid is None:
        return None
    return (grid.shape[0], grid.shape[1], grid.shape[2]), affine_spacing(grid.affine)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open ("w" or "wb") a temporary sibling of `path`; move it onto `path` only on success.

    Every table, JSON and plot volseg writes goes through here, so a crash never leaves a
    half-written file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    text_kw = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with open(tmp, mode.replace("w", "x"), **text_kw) as f:  # "x": never clobber a stray file
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_dataset_json(root: str | os.PathLike, name: str, channel_names: Sequence[str], labels: dict[str, int],
                       n_training: int, description: str, **extra: Any) -> Path:
    """Write an nnU-Net v2 dataset.json (channels by index, labels by name, .nii.gz files) atomically."""
    path = Path(root) / "dataset.json"
    dataset = {"name": name, "channel_names": {str(c): n for c, n in enumerate(channel_names)}, "labels": labels,
               "numTraining": int(n_training), "file_ending": ".nii.gz", "description": description, **extra}
    write_text_atomic(path, json.dumps(dataset, indent=2) + "\n")
    return path
