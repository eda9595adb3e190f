"""`volseg predict` on files: image files or nnU-Net-named folders in, segmentation files out.

Whole-volume prediction is `volseg.inference`; here are the file-level concerns around it: which
cases a path names and where each output goes, refusing to replace outputs (or resuming after a
killed run), optional class probabilities beside each segmentation, clean-up of small components,
and overlapping disk work with the network (the next case is read and the previous one written
in background threads while this one is predicted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from volseg import atomic, layout, volumes
from volseg.config import Config
from volseg.errors import VolsegError
from volseg.inference import WindowRunner, load_ensemble, predict_volume, resolve_device
from volseg.postprocessing import keep_largest_component, remove_small_components

PROBABILITIES_FOLDER = "probabilities"  # `--save-probabilities` writes <output folder>/probabilities/<case>.nii.gz
_WRITE_VOXELS = 1 << 22  # probabilities widened to float32 at a time while streaming them to disk (16 MiB)

Job = tuple[Sequence[Path], Path]  # one case: its channel files, and where its segmentation goes


def clean_segmentation(
    seg: np.ndarray,
    spacing: Sequence[float],
    class_values: Sequence[int],
    min_size_voxels: int = 0,
    min_size_mm3: float = 0.0,
    keep_largest: bool = False,
) -> np.ndarray:
    """Post-process a segmentation in label values: per class, drop small components, keep the largest.

    Components are 26-connected and per label value (`volseg.postprocessing`); removed voxels
    become background 0, so 0 must be one of `class_values`. Sizes in mm³ use `spacing`.

    >>> seg = np.zeros((1, 1, 6), np.uint8); seg[0, 0, :2] = 1; seg[0, 0, 4] = 1
    >>> clean_segmentation(seg, (1.0, 1.0, 2.0), (0, 1), min_size_mm3=3.0)[0, 0].tolist()
    [1, 1, 0, 0, 0, 0]
    """
    if not min_size_voxels and not min_size_mm3 and not keep_largest:
        return seg
    if 0 not in class_values:
        raise VolsegError(None, "post-processing sets removed voxels to background 0, which is not a class of this model")
    foreground = [v for v in class_values if v != 0]
    if min_size_voxels or min_size_mm3:
        seg = remove_small_components(seg, int(min_size_voxels), float(min_size_mm3), spacing, foreground)
    if keep_largest:
        seg = keep_largest_component(seg, foreground)
    return seg


def probabilities_path(target: str | Path) -> Path:
    """Where `--save-probabilities` puts a case's probabilities: a `probabilities/` folder beside it.

    A folder of its own keeps `volseg evaluate` (which scores every `*<ending>` file of the output
    folder) from mistaking them for segmentations.

    >>> probabilities_path("out/case_007.mha").as_posix()
    'out/probabilities/case_007.nii.gz'
    """
    target = Path(target)
    stem = target.name
    for end in volumes.SUPPORTED_ENDINGS:
        if stem.endswith(end):
            stem = stem[: -len(end)]
            break
    return target.parent / PROBABILITIES_FOLDER / f"{stem}.nii.gz"


def write_probabilities(path: str | Path, probabilities: np.ndarray, reference: volumes.Volume) -> None:
    """Write (C, I, J, K) class probabilities as a NIfTI of shape (I, J, K, C), with `reference`'s geometry.

    The header is the one `volumes.write_volume` would give a segmentation of `reference` (same affine,
    qform and sform), with 4 dimensions and float32 voxels: NIfTI-1 has no float16, so a float16
    buffer is widened a few slices at a time while streaming into the gzip file (nibabel would
    convert one whole class at once, and copy it again). Written under a temporary name in the
    same folder and renamed when complete, like every volseg output.
    """
    from nibabel.openers import Opener
    from nibabel.volumeutils import seek_tell

    path = Path(path)
    if not path.name.endswith(".nii.gz"):
        raise VolsegError(path, "probabilities are written as .nii.gz")
    n_classes, *shape = probabilities.shape
    if tuple(shape) != reference.shape:
        raise VolsegError(path, f"probabilities of shape {tuple(shape)} do not match the image's {reference.shape}")
    header = volumes.nifti_image(np.broadcast_to(np.float32(0), (*shape, n_classes)), reference.affine, reference).header
    header.set_data_dtype(np.float32)
    step = max(1, _WRITE_VOXELS // (shape[0] * shape[1]))

    def write(target: Path) -> None:
        with Opener(str(target), "wb") as f:
            header.write_to(f)
            seek_tell(f, header.get_data_offset(), write0=True)
            for c in range(n_classes):  # on disk: Fortran order of (I, J, K, C), i.e. C order of (C, K, J, I)
                for k in range(0, shape[2], step):
                    f.write(np.ascontiguousarray(probabilities[c, :, :, k : k + step].T, dtype=np.float32).tobytes())

    atomic.create_folder_of(path)
    atomic.write_atomically(path, ".nii.gz", write)


def predict_paths(
    model_path: str | Path | Sequence[str | Path],
    inputs: str | Path,
    output: str | Path,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    skip_existing: bool = False,
    save_probabilities: bool = False,
    min_size_voxels: int = 0,
    min_size_mm3: float = 0.0,
    keep_largest: bool = False,
    compile: str = "auto",
    mirror: bool = False,
    skip_empty: bool = False,
) -> list[Path]:
    """`volseg predict`: a file or an nnU-Net-named folder in, `<case><ending>` segmentations out.

    An output that already exists is refused before any work (a good result is never replaced by
    accident) unless `overwrite`; `skip_existing` (`--continue`) keeps it and predicts only the
    missing cases, after removing temporaries a killed run left behind. Several model paths are
    predicted as an ensemble. `save_probabilities` also writes the class probabilities
    (`probabilities_path`, `write_probabilities`) before the segmentation, so an existing
    segmentation means both are complete. `min_size_voxels`, `min_size_mm3` (with the image's
    spacing) and `keep_largest` clean each class of the segmentation (`clean_segmentation`); the
    probabilities stay as the network gave them. `compile` and `mirror` are `WindowRunner`'s
    (compiled once, reused for every case); `skip_empty` is `sliding_window_labels`'. Returns the
    written segmentation paths.
    """
    if overwrite and skip_existing:
        raise VolsegError(None, "--overwrite and --continue exclude each other", "pass one of them")
    if not (min_size_voxels >= 0 and math.isfinite(min_size_mm3) and min_size_mm3 >= 0):
        raise VolsegError(None, f"minimum sizes must be >= 0, got {min_size_voxels} voxels and {min_size_mm3} mm³")
    dev = resolve_device(device)
    models, cfgs = load_ensemble(model_path, dev)
    runners = [WindowRunner(m, dev, c.infer.batch_size, compile, mirror, verbose=progress) for m, c in zip(models, cfgs)]
    cfg = cfgs[0]
    if (min_size_voxels or min_size_mm3 or keep_largest) and 0 not in cfg.data.class_values:
        raise VolsegError(None, "post-processing sets removed voxels to background 0, which is not a class of this model")
    inputs = Path(inputs)
    is_folder = inputs.is_dir() and not _is_dicom_dir(inputs)
    jobs = _jobs_to_run(_case_jobs(inputs, Path(output), cfg, is_folder), save_probabilities, overwrite, skip_existing)
    window_progress = progress and len(jobs) <= 1  # several cases get one bar over the cases instead

    def predict(volume: volumes.Volume) -> tuple[np.ndarray, np.ndarray | None]:
        probs = None
        if save_probabilities:  # float16: half the memory of float32, ample for probabilities
            probs = np.empty((cfg.model.num_classes, *volume.shape), dtype=np.float16)
        seg = predict_volume(models, cfgs, volume, dev, probabilities=probs, progress=window_progress,
                             runners=runners, skip_empty=skip_empty)
        seg = clean_segmentation(seg, volume.spacing, cfg.data.class_values, min_size_voxels, min_size_mm3,
                                 keep_largest)
        return seg, probs

    return _predict_jobs(jobs, predict, is_folder, progress)


def _case_jobs(inputs: Path, output: Path, cfg: Config, is_folder: bool) -> list[Job]:
    """The cases `inputs` names (a folder of `<case>_<CCCC>` files, or one image) and their output files."""
    ending = cfg.data.file_ending
    if is_folder:
        cases = layout.list_cases(inputs, ending, cfg.model.in_channels)
        return [(c.images, layout.case_output_path(output, c.case_id, ending)) for c in cases]
    if not inputs.exists():
        raise VolsegError(inputs, "input not found")
    if cfg.model.in_channels != 1:
        raise VolsegError(inputs, f"the model needs {cfg.model.in_channels} channels", "pass a folder of <case>_<CCCC> files")
    target = output if _has_image_ending(output) else output / _output_name(inputs, ending)
    return [((inputs,), target)]


def _jobs_to_run(jobs: list[Job], save_probabilities: bool, overwrite: bool, skip_existing: bool) -> list[Job]:
    """Refuse existing outputs unless `overwrite`; `skip_existing` drops the cases already done
    (after removing the temporaries a killed run left), so a run can be continued."""
    _check_output_folder(jobs)
    existing = [target for _, target in jobs if target.exists()]
    if save_probabilities:
        existing += [probabilities_path(target) for _, target in jobs if probabilities_path(target).exists()]
    if existing and not (overwrite or skip_existing):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise VolsegError(
            existing[0],
            f"output already exists{more}",
            "pass --overwrite to replace or --continue to skip existing outputs",
        )
    if skip_existing:
        for folder in {target.parent for _, target in jobs} | {probabilities_path(t).parent for _, t in jobs}:
            atomic.remove_stale_temporaries(folder)
        jobs = [(images, target) for images, target in jobs if not target.exists()]
    return jobs


def _predict_jobs(
    jobs: list[Job],
    predict: Callable[[volumes.Volume], tuple[np.ndarray, np.ndarray | None]],
    is_folder: bool,
    progress: bool,
) -> list[Path]:
    """Run `predict` (segmentation and probabilities) on each case and write the results; returns the
    segmentation paths written.

    The next case is read and the previous one written in background threads while the network
    works on this one (file I/O and gzip release the GIL), so the network never waits on disk. A
    bad case part-way through a folder says how many are done and how to continue.
    """
    written: list[Path] = []
    bar = None
    if progress and len(jobs) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="predict", unit="case", disable=None)

    def finish(pending: tuple[Future, Path] | None) -> None:
        """Wait for the previous case's files; its error (if any) is raised here."""
        if pending is not None:
            pending[0].result()
            written.append(pending[1])
            if bar:
                bar.update()

    reader = ThreadPoolExecutor(1, thread_name_prefix="volseg-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="volseg-write")
    pending_write: tuple[Future, Path] | None = None
    next_read = reader.submit(_load, jobs[0][0]) if jobs else None
    try:
        for n, (images, target) in enumerate(jobs):
            try:
                volume = next_read.result()
                next_read = reader.submit(_load, jobs[n + 1][0]) if n + 1 < len(jobs) else None
                seg, probs = predict(volume)
                finish(pending_write)
                pending_write = (writer.submit(_save, target, seg, probs, volume), target)
                del volume, probs, seg
                if n + 1 == len(jobs):
                    finish(pending_write)
                    pending_write = None
            except VolsegError as exc:
                finish(pending_write)  # the case before this one is complete: count it
                pending_write = None
                if not (is_folder and written):
                    raise
                resume = f"{len(written)} case(s) done; fix this one and rerun with --continue"
                raise VolsegError(exc.path, exc.problem, f"{exc.hint}; {resume}" if exc.hint else resume) from None
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)  # a case already predicted is still written: no lost work
        if bar:
            bar.close()
    return written


def _load(images: Sequence[Path]) -> volumes.Volume:
    volume = volumes.read_image(images)
    _refuse_non_finite(volume, images)
    return volume


def _save(target: Path, seg: np.ndarray, probs: np.ndarray | None, volume: volumes.Volume) -> None:
    if probs is not None:  # first, so that an existing segmentation means both are complete
        write_probabilities(probabilities_path(target), probs, volume)
    volumes.write_volume(target, seg, reference=volume)


def _check_output_folder(jobs: list[tuple[Sequence[Path], Path]]) -> None:
    """Refuse an output "folder" that is a file before any case is predicted."""
    for _, target in jobs:
        for parent in (target.parent, *target.parent.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise VolsegError(
                        parent, "is a file, but the outputs go into a folder there", "give a folder as -o"
                    )
                break


def _refuse_non_finite(volume: volumes.Volume, images: Sequence[Path]) -> None:
    """NaN/Inf voxels poison the normalisation and every window that sees them: refuse, do not guess."""
    if not np.issubdtype(volume.array.dtype, np.floating):
        return
    for channel, path in zip(volume.array, images):
        n_bad = int(channel.size - np.count_nonzero(np.isfinite(channel)))
        if n_bad:
            raise VolsegError(
                path,
                f"has {n_bad} NaN or Inf voxels; refusing to predict on them",
                "replace them, e.g. with the image minimum, before predicting",
            )


def _has_image_ending(path: Path) -> bool:
    return path.name.endswith(volumes.SUPPORTED_ENDINGS)


def _output_name(image: Path, ending: str) -> str:
    """`case_0000.nii.gz` -> `case.nii.gz` (nnU-Net naming); other names keep their stem."""
    name = image.name
    for end in volumes.SUPPORTED_ENDINGS:
        if name.endswith(end):
            stem = name[: -len(end)]
            if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                stem = stem[:-5]
            return stem + end
    return name + ending


def _is_dicom_dir(path: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in path.iterdir()) if path.is_dir() else False
