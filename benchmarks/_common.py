"""Shared by the benchmark scripts: a fixed by-case split of a dataset and running volseg commands."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOLSEG = [sys.executable, "-m", "volseg"]


def split_dataset(data: Path, out: Path, test_fraction: float, seed: int,
                  train_cases: int | None = None) -> tuple[Path, Path, Path, int, int]:
    """Symlink a training dataset and a held-out test set (images + labels) into `out`.

    The split is by case, from a seeded permutation of the sorted case ids, so every benchmark
    with the same seed holds out the same cases. With `train_cases` only the next that many cases
    of the permutation are trained on (a small-data regime with the same held-out set). Files are
    linked, never copied.
    """
    info = json.loads((data / "dataset.json").read_text())
    ending = info.get("file_ending", ".nii.gz")
    labels = sorted((data / "labelsTr").glob(f"*{ending}"))
    ids = sorted(p.name[: -len(ending)] for p in labels)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_test = round(test_fraction * len(ids))
    test = {ids[i] for i in perm[:n_test]}
    pool = perm[n_test:] if train_cases is None else perm[n_test : n_test + train_cases]
    train = {ids[i] for i in pool}
    train_ds, test_img, test_lbl = out / "train_dataset", out / "test_images", out / "test_labels"
    for d in (train_ds / "imagesTr", train_ds / "labelsTr", test_img, test_lbl):
        d.mkdir(parents=True, exist_ok=True)
    for image in sorted((data / "imagesTr").glob(f"*{ending}")):
        case = image.name[: -len(ending)].rsplit("_", 1)[0]
        if case in test or case in train:
            (test_img if case in test else train_ds / "imagesTr").joinpath(image.name).symlink_to(image.resolve())
    for label in labels:
        case = label.name[: -len(ending)]
        if case in test or case in train:
            (test_lbl if case in test else train_ds / "labelsTr").joinpath(label.name).symlink_to(label.resolve())
    info["numTraining"] = len(train)
    (train_ds / "dataset.json").write_text(json.dumps(info, indent=2))
    return train_ds, test_img, test_lbl, len(train), n_test


def run(cmd: list[str]) -> float:
    """Run one command, streaming its output; return its wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    t = time.monotonic()
    subprocess.run(cmd, check=True)
    return time.monotonic() - t


def dice_per_class(metrics_csv: Path) -> dict[str, float]:
    """Mean Dice per label name from a `volseg evaluate` CSV."""
    per_class: dict[str, list[float]] = defaultdict(list)
    with open(metrics_csv) as fh:
        for row in csv.DictReader(fh):
            per_class[row["label_name"]].append(float(row["dice"]))
    return {name: round(float(np.mean(v)), 4) for name, v in per_class.items()}


def write_results(rows: list[dict], out: Path, caption: str, extra: tuple[str, object] | None = None) -> str:
    """results.csv and results.md (a caption line and a Markdown table) in `out`; returns the table.

    `extra` = (column name, function of a row) appends one computed column to the table only.
    """
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    head = cols + ([extra[0]] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r[c]) for c in cols] + ([str(extra[1](r))] if extra else [])
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "results.md").write_text(f"{caption}\n\n{table}\n")
    return table
