"""Reading and writing volumes without losing geometry.

Every reader returns a `Volume` whose array is channel-first `(C, I, J, K)` and whose affine maps
voxel indices `(i, j, k)` to RAS+ world millimetres, whatever the file format: NIfTI through
nibabel, NRRD/MetaImage/DICOM through SimpleITK (converted from ITK's `(K, J, I)` arrays and LPS
world). The format-specific header is kept so that `write_volume` can give an output exactly the
geometry of its input, which is what lets a viewer overlay a predicted segmentation on the image.
Volumes are written atomically (`volseg.atomic`); the nnU-Net dataset layout built on these files
is `volseg.layout`.
"""

from __future__ import annotations

import locale
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from volseg import atomic
from volseg.errors import VolsegError, short_reason

NIFTI_ENDINGS = (".nii.gz", ".nii")
ITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd")
DETACHED_ENDINGS = (".nhdr", ".mhd")  # header file plus a separate data file
SUPPORTED_ENDINGS = NIFTI_ENDINGS + ITK_ENDINGS
SUPPORTED_HINT = "supported: " + ", ".join(SUPPORTED_ENDINGS) + " or a DICOM series folder"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # ITK world is LPS, nibabel's is RAS: flip the first two rows
_AFFINE_MATCH_ATOL = 1e-6  # a Volume's affine "still is" its header's geometry (float32 round-off)
CHANNEL_AFFINE_ATOL = 1e-4  # largest affine difference between the channels of one case
LABEL_AFFINE_ATOL = 1e-3  # largest affine difference between a label and its image


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


# --------------------------------------------------------------------------------------------------
# reading


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
        raise VolsegError(path, f"cannot read as NIfTI: {short_reason(exc, path)}") from None
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
        raise VolsegError(path, f"cannot read image: {short_reason(exc, path)}") from None
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
            raise VolsegError(folder, "is a folder without a DICOM series", SUPPORTED_HINT)
        file_names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(file_names)
        image = reader.Execute()
    except VolsegError:
        raise
    except Exception as exc:
        raise VolsegError(folder, f"cannot read DICOM series: {short_reason(exc, folder)}") from None
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
    raise VolsegError(path, "is not a supported image file", SUPPORTED_HINT)


def read_image(paths: Sequence[str | os.PathLike]) -> Volume:
    """Read the single-channel files of one case into `(C, I, J, K)`, checking they align."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise VolsegError(None, "no image files given")
    volumes = [read_volume(p) for p in paths]
    first = volumes[0]
    for volume in volumes[1:]:
        problem = alignment_problem(volume, first, CHANNEL_AFFINE_ATOL, "channel 0")
        if problem:
            raise VolsegError(volume.path, problem)
    array = np.concatenate([v.array for v in volumes], axis=0)
    return Volume(array, first.affine, first.header, first.path)


@dataclass(frozen=True)
class HeaderGrid:
    """Shape and affine of a file read from its header alone: enough to compare voxel grids."""

    shape: tuple[int, ...]
    affine: np.ndarray
    path: str


def header_grid(path: Path) -> HeaderGrid | None:
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
    return HeaderGrid(shape, affine, str(path)) if len(shape) == 3 else None


def read_grid(path: str | os.PathLike) -> tuple[tuple[int, int, int], tuple[float, float, float]] | None:
    """Shape and spacing from a file's header alone (no voxels read); None if the header can't say.

    Planning uses this to choose a target spacing before any image is loaded.
    """
    grid = header_grid(Path(path))
    if grid is None:
        return None
    return (grid.shape[0], grid.shape[1], grid.shape[2]), affine_spacing(grid.affine)


def alignment_problem(
    volume: Volume | HeaderGrid, reference: Volume | HeaderGrid, atol: float, what: str
) -> str | None:
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


def nifti_image(array_ijkc: np.ndarray, affine: np.ndarray, reference: Volume | None) -> nib.Nifti1Image:
    """A NIfTI image of an (I, J, K[, C]) array; with a NIfTI reference its header (qform/sform codes and
    matrices) is reused. Public so that outputs streamed to disk get the header `write_volume` would give."""
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
    nib.save(nifti_image(array_ijkc, affine, reference), str(path))


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
    atomic.create_folder_of(path)
    if ending in DETACHED_ENDINGS:
        atomic.write_detached_atomically(path, lambda target: writer(target, array, geometry, reference))
    else:
        atomic.write_atomically(path, ending, lambda target: writer(target, array, geometry, reference))
