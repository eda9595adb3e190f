"""`volseg sparsify`: turn a densely labelled dataset into a sparsely labelled one, for experiments.

Keeps a few whole slices per axis (what an annotator would draw) and marks every other voxel with
the nnU-Net `ignore` label. The dense labels are linked beside the sparse ones (`labelsTr_dense/`)
so training can also report Dice against the dense truth.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from volseg import atomic, layout, volumes
from volseg.errors import VolsegError
from volseg.preprocessing import sparse_slice_mask

DENSE_LABELS = "labelsTr_dense"


def _place(src: Path, dst: Path, copy: bool) -> None:
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def sparsify_dataset(
    dense: str | Path,
    out: str | Path,
    slices_per_axis: int | None = None,
    axes: tuple[int, ...] = (0, 1, 2),
    strategy: str = "even",
    seed: int = 0,
    fraction: float | None = None,
    copy_images: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the sparse copy; returns the fraction of voxels that stay labelled (overall and per case).

    The copy is built in a temporary sibling folder and renamed at the end, so an interrupted run
    never leaves a half-sparsified dataset behind.
    """
    dense, out = Path(dense), Path(out)
    info, cases = layout.read_dataset(dense)
    if out.exists():
        if not overwrite:
            raise VolsegError(out, "output already exists", "pass --overwrite to replace it")
        if out.resolve() == dense.resolve():
            raise VolsegError(out, "output is the input dataset")
    missing = [c.case_id for c in cases if c.label is None]
    if missing:
        raise VolsegError(dense, f"{len(missing)} cases have no label (first: {missing[0]})")
    label_paths = [Path(str(c.label)) for c in cases]
    values = [v for _, v in info.labels]
    ignore = info.ignore_label if info.ignore_label is not None else max(values) + 1
    iterator = enumerate(cases)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(cases), desc="sparsify", unit="case", disable=None)
    labelled = total = 0
    per_case = {}
    with atomic.folder_written_atomically(out, ("imagesTr", "labelsTr", DENSE_LABELS)) as tmp:
        for index, case in iterator:
            for image in case.images:
                _place(image, tmp / "imagesTr" / image.name, copy_images)
            label_path = label_paths[index]
            _place(label_path, tmp / DENSE_LABELS / label_path.name, copy_images)
            label = volumes.read_label(label_path)
            rng = np.random.default_rng([seed, index])
            keep = sparse_slice_mask(label.shape, slices_per_axis, tuple(axes), strategy, rng, fraction)
            array = label.array[0]
            if info.ignore_label is not None:
                keep &= array != info.ignore_label
            sparse = np.where(keep, array, ignore).astype(volumes.label_dtype(0, ignore))
            volumes.write_volume(tmp / "labelsTr" / label_path.name, sparse, reference=label)
            per_case[case.case_id] = float(keep.mean())
            labelled += int(keep.sum())
            total += keep.size
        raw = json.loads((dense / "dataset.json").read_text())
        labels = {name: value for name, value in info.labels if value != info.ignore_label}
        labels["ignore"] = ignore
        raw["labels"] = labels
        raw.pop("modality", None)
        raw["channel_names"] = {str(i): n for i, n in enumerate(info.channel_names)}
        raw["file_ending"] = info.file_ending
        raw["sparsify"] = {
            "source": str(dense.resolve()), "slices_per_axis": slices_per_axis, "fraction": fraction,
            "axes": list(axes), "strategy": strategy, "seed": seed,
            "labelled_fraction": labelled / max(total, 1),
        }
        (tmp / "dataset.json").write_text(json.dumps(raw, indent=2))
    return {"labelled_fraction": labelled / max(total, 1), "per_case": per_case, "ignore_label": ignore}
