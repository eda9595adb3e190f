"""The nnU-Net v2 / MSD raw dataset layout: dataset.json, `<case>_<CCCC>` image files, and `volseg check`.

A dataset is `dataset.json` (channels, labels with nnU-Net's `ignore`, the file ending) beside
`imagesTr/<case>_<CCCC><ending>` and `labelsTr/<case><ending>`. Here those names become `Case`s,
dataset.json becomes a `DatasetInfo`, and `check_dataset` lists every problem of a dataset in
one pass (naming, missing files, grids, label values) rather than stopping at the first. Reading
the files themselves is `volseg.volumes`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from volseg import atomic, volumes
from volseg.errors import VolsegError

DEFAULT_FILE_ENDING = ".nii.gz"  # when dataset.json does not say
_ON_GRID_HINT = "labels must lie on the voxel grid of their image"


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


# --------------------------------------------------------------------------------------------------
# dataset.json


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
    elif volumes.image_ending("x" + ending) != ending.lower():
        problems.append(f"field 'file_ending' {ending!r} is not a supported format ({volumes.SUPPORTED_HINT})")
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
        raise _first_problem(problems)
    return info


def _first_problem(problems: list[str]) -> VolsegError:
    """One line for several problems: the first, counting the others (`check_dataset` lists them all)."""
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return VolsegError(None, problems[0] + more)


# --------------------------------------------------------------------------------------------------
# cases: <case>_<CCCC><ending> images, <case><ending> labels


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
        raise _first_problem(problems)
    return cases


def case_output_path(out_dir: str | os.PathLike, case_id: str, file_ending: str) -> Path:
    """Where the prediction of one case goes: `<out_dir>/<case_id><file_ending>`.

    >>> case_output_path("out", "liver_007", ".nii.gz").as_posix()
    'out/liver_007.nii.gz'
    """
    return Path(out_dir) / f"{case_id}{file_ending}"


# --------------------------------------------------------------------------------------------------
# reading a dataset for training


def read_dataset(root: str | os.PathLike) -> tuple[DatasetInfo, list[Case]]:
    """dataset.json plus the training cases of `imagesTr`/`labelsTr`."""
    root = Path(root)
    info = read_dataset_info(root)
    if not (root / "imagesTr").is_dir():
        raise VolsegError(root, "has no imagesTr folder", "the nnU-Net v2 raw layout puts training images there")
    cases = list_cases(root / "imagesTr", info.file_ending, len(info.channel_names), root / "labelsTr")
    problems = _grid_problems(cases)
    if problems:
        raise _first_problem(problems)
    return info, cases


def _grid_problems(cases: Sequence[Case]) -> list[str]:
    """Channels or labels off their case's voxel grid, found from the headers (cheap enough to run
    before every training: a misaligned label would otherwise be cropped against the wrong voxels)."""
    problems = []
    for case in cases:
        reference = volumes.header_grid(case.images[0])
        if reference is None:
            continue
        for path in case.images[1:]:
            grid = volumes.header_grid(path)
            problem = grid and volumes.alignment_problem(grid, reference, volumes.CHANNEL_AFFINE_ATOL, "channel 0")
            if problem:
                problems.append(VolsegError(path, problem).message)
        if case.label is not None:
            grid = volumes.header_grid(case.label)
            problem = grid and volumes.alignment_problem(grid, reference, volumes.LABEL_AFFINE_ATOL, "the image")
            if problem:
                problems.append(VolsegError(case.label, problem, _ON_GRID_HINT).message)
    return problems


def read_case(
    case: Case, declared: Sequence[int] | set[int] | None = None
) -> tuple[volumes.Volume, volumes.Volume | None]:
    """Image `(C, I, J, K)` and label `(1, I, J, K)` of one case, refusing a label off the image grid.

    A label of another shape or affine would be cropped against the wrong voxels without any error,
    so training must not start on it. With `declared` (the dataset.json values, `ignore`
    included), label values outside it are refused too.
    """
    image = volumes.read_image(case.images)
    if case.label is None:
        return image, None
    label = volumes.read_label(case.label)
    problem = volumes.alignment_problem(label, image, volumes.LABEL_AFFINE_ATOL, "the image")
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


# --------------------------------------------------------------------------------------------------
# `volseg check`: every problem, one line each


def _label_values(array: np.ndarray) -> np.ndarray:
    """Distinct values of an integer label array (bincount is much faster than unique for uint8)."""
    if array.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(array.ravel(), minlength=1))
    return np.unique(array)


def _check_case(case: Case, declared: set[int] | None) -> list[str]:
    """Every problem of one case, reading each of its files once."""
    problems: list[str] = []
    channels: list[volumes.Volume] = []
    for path in case.images:
        try:
            volume = volumes.read_volume(path)
        except VolsegError as exc:
            problems.append(exc.message)
            continue
        if np.issubdtype(volume.array.dtype, np.floating):
            n_bad = int(volume.array.size - np.count_nonzero(np.isfinite(volume.array)))
            if n_bad:
                problems.append(VolsegError(path, f"has {n_bad} NaN or Inf voxels").message)
        if channels:
            problem = volumes.alignment_problem(volume, channels[0], volumes.CHANNEL_AFFINE_ATOL, "channel 0")
            if problem:
                problems.append(VolsegError(path, problem).message)
        channels.append(volume)
    if case.label is None or not case.label.is_file():
        return problems
    try:
        label = volumes.read_label(case.label)
    except VolsegError as exc:
        problems.append(exc.message)
        return problems
    if channels:
        problem = volumes.alignment_problem(label, channels[0], volumes.LABEL_AFFINE_ATOL, "the image")
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




# --------------------------------------------------------------------------------------------------
# writing


def write_dataset_json(root: str | os.PathLike, name: str, channel_names: Sequence[str], labels: dict[str, int],
                       n_training: int, description: str, **extra: Any) -> Path:
    """Write an nnU-Net v2 dataset.json (channels by index, labels by name, .nii.gz files) atomically."""
    path = Path(root) / "dataset.json"
    dataset = {"name": name, "channel_names": {str(c): n for c, n in enumerate(channel_names)}, "labels": labels,
               "numTraining": int(n_training), "file_ending": ".nii.gz", "description": description, **extra}
    atomic.write_text_atomic(path, json.dumps(dataset, indent=2) + "\n")
    return path
