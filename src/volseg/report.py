"""Evaluation tables (per case and label), their summary, and plots for people to look at.

Files are written atomically (a temporary file in the same folder, then `os.replace`), so an
interrupted run never leaves a half-written CSV, JSON or PNG that looks finished. matplotlib is
imported inside the plotting functions and drawn on an Agg canvas without pyplot, so importing
this module stays fast and no global backend is switched.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from volseg import detection, metrics, postprocessing
from volseg.atomic import atomic_open
from volseg.errors import VolsegError
from volseg.volumes import Volume, read_label

CSV_COLUMNS = (
    "case", "label", "label_name",
    "dice", "jaccard", "precision", "recall", "hd", "hd95", "assd", "nsd",
    "vol_diff_mm3", "vol_diff_rel", "n_ref", "n_pred",
)  # fmt: skip
SUMMARY_METRICS = (
    "dice", "jaccard", "precision", "recall", "hd", "hd95", "assd", "nsd",
    "vol_diff_mm3", "vol_diff_rel",
)  # fmt: skip
_COUNT_FIELDS = ("n_ref", "n_pred", "n_ref_objects", "n_pred_objects", "merged", "merged_ref", "split") + tuple(
    f for f in detection.OBJECT_FIELDS if f.startswith("obj_tp@")
)  # written as integers
_DISTANCE_METRICS = ("hd", "hd95", "assd")  # in mm; shown with "(mm)" in the summary table
GEOMETRY_ATOL = 1e-3  # affine tolerance (mm): float32 headers round-trip with ~1e-6 error

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate_folders(
    pred_dir: PathLike,
    ref_dir: PathLike,
    labels: dict[int, str] | None,
    file_ending: str = ".nii.gz",
    out_csv: PathLike | None = None,
    workers: int = 1,
    nsd_tolerance_mm: float = metrics.NSD_TOLERANCE_MM,
    ignore_label: int | None = None,
    instances: bool = False,
    min_volume_mm3: float = 0.0,
    ref_instances_dir: PathLike | None = None,
) -> list[dict]:
    """Score every `<case><file_ending>` in `pred_dir` against the same name in `ref_dir`.

    `labels` maps label value to name; None scores every non-zero value found in any reference
    (named by its value). Returns one row per case and label, with `CSV_COLUMNS` as keys, sorted
    by case then label, and writes them to `out_csv` when given. Spacing comes from the reference;
    `nsd_tolerance_mm` is the surface Dice tolerance (docs/metrics.md has every definition).
    With `ignore_label` (sparse references), voxels the reference marks unlabelled are left out of
    every metric: both maps are set to background there before scoring.

    With `instances` (implied by `ref_instances_dir`), each row also gets the object-level
    detection fields `detection.OBJECT_FIELDS` (detection.object_scores; reference objects are the
    ids in the same-named file of `ref_instances_dir` when given, else connected components), and
    the CSV gets those columns. `min_volume_mm3 > 0` removes prediction components smaller than
    that (26-connected, per label) from the whole prediction before anything is scored (then
    the ignore label applies), and leaves smaller objects of either side out of the object counts.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    pairs = _pair_files(pred_dir, ref_dir, file_ending)
    min_volume = float(min_volume_mm3)
    if not (math.isfinite(min_volume) and min_volume >= 0):
        raise VolsegError(None, f"min_volume_mm3 must be a finite number of mm³ >= 0, got {min_volume_mm3}")
    instances = instances or ref_instances_dir is not None
    instance_paths: list[str | None] = [None] * len(pairs)
    if ref_instances_dir is not None:
        instance_paths = [str(p) for p in _instance_files(Path(ref_instances_dir), pairs)]
    if workers < 1:
        raise VolsegError(None, f"workers must be >= 1, got {workers}")
    tolerance = float(nsd_tolerance_mm)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise VolsegError(
            None, f"NSD tolerance must be a finite number of mm >= 0, got {nsd_tolerance_mm}"
        )
    wanted = None if labels is None else sorted(int(v) for v in labels)
    jobs = [
        (case, str(pred), str(ref), wanted, tolerance, ignore_label, instances, min_volume, inst)
        for (case, pred, ref), inst in zip(pairs, instance_paths)
    ]
    results = _run_jobs(jobs, workers)

    if labels is None:
        found = sorted(set().union(*(ref_values for _, _, ref_values in results)))
        names = {value: str(value) for value in found}
    else:
        names = {int(v): str(n) for v, n in labels.items()}
    rows = []
    for case, per_label, _ in sorted(results, key=lambda r: r[0]):
        missing = [v for v in names if v not in per_label]
        if missing:  # in neither this prediction nor this reference: "both empty"
            per_label.update(_both_empty(missing, instances))
        for value in sorted(names):
            row: dict[str, Any] = {"case": case, "label": value, "label_name": names[value]}
            row.update(per_label[value])
            for field in _COUNT_FIELDS:
                if field in row:
                    row[field] = int(row[field])
            rows.append(row)
    if out_csv is not None:
        columns = CSV_COLUMNS + detection.OBJECT_FIELDS if instances else CSV_COLUMNS
        write_csv_rows(out_csv, rows, columns)
    return rows


def _instance_files(folder: Path, pairs: list[tuple[str, Path, Path]]) -> list[Path]:
    """The reference instance map of each case: the prediction's file name in `folder`."""
    if not folder.is_dir():
        raise VolsegError(folder, "is not a folder", "--ref-instances takes a folder of instance maps")
    paths = [folder / pred.name for _, pred, _ in pairs]
    for path in paths:
        if not path.is_file():
            raise VolsegError(
                path,
                "reference instance map not found",
                "every prediction needs an instance map of the same name in the instances folder",
            )
    return paths


def _pair_files(pred_dir: Path, ref_dir: Path, file_ending: str) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) for each prediction; every prediction needs a reference."""
    if not file_ending:
        raise VolsegError(None, "file_ending must not be empty", "e.g. '.nii.gz'")
    for folder in (pred_dir, ref_dir):
        if not folder.is_dir():
            raise VolsegError(folder, "is not a folder")
    preds = sorted(
        p
        for p in pred_dir.iterdir()
        if p.name.endswith(file_ending)
        and len(p.name) > len(file_ending)
        and not p.name.startswith(".")
        and p.is_file()
    )
    if not preds:
        raise VolsegError(
            pred_dir, f"holds no *{file_ending} predictions", "check the folder or --file-ending"
        )
    pairs = [(p.name[: -len(file_ending)], p, ref_dir / p.name) for p in preds]
    missing = [ref.name for _, _, ref in pairs if not ref.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise VolsegError(
            ref_dir,
            f"has no reference for {len(missing)} prediction(s): {shown}",
            "every prediction needs a reference file of the same name",
        )
    return pairs


def _run_jobs(jobs: list[tuple], workers: int) -> list[tuple[str, dict, set[int]]]:
    """Evaluate cases in this process or a process pool, with a progress bar over cases."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(jobs), desc="evaluate", unit="case", disable=None) as bar:
        if workers == 1 or len(jobs) == 1:
            outcomes: Iterator = map(_evaluate_case_safely, jobs)
            for outcome in outcomes:
                results.append(_unwrap(outcome))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                for outcome in pool.map(_evaluate_case_safely, jobs):
                    results.append(_unwrap(outcome))
                    bar.update()
    return results


def _evaluate_case_safely(job: tuple) -> tuple[str, Any]:
    """Run one case; a VolsegError comes back as data because it does not survive pickling."""
    try:
        return "ok", _evaluate_case(*job)
    except VolsegError as exc:
        return "error", (exc.path, exc.problem, exc.hint)


def _unwrap(outcome: tuple[str, Any]) -> tuple[str, dict, set[int]]:
    kind, value = outcome
    if kind == "error":
        raise VolsegError(*value)
    return value


def _evaluate_case(
    case: str, pred_path: str, ref_path: str, wanted: list[int] | None, nsd_tolerance_mm: float,
    ignore_label: int | None = None, instances: bool = False, min_volume_mm3: float = 0.0,
    instances_path: str | None = None,
) -> tuple[str, dict[int, dict[str, float]], set[int]]:
    """(case, metrics per label, non-zero values in the reference) for one pair of files.

    The reference's values are looked for only when `wanted` is None (they then name the labels);
    with `wanted` given the set is empty and no extra pass over the volumes is made.
    """
    pred = read_label(pred_path)
    ref = read_label(ref_path)
    check_same_grid(pred, pred_path, ref, ref_path)
    ref_instances = None
    if instances_path is not None:
        instance_map = read_label(instances_path)
        check_same_grid(instance_map, instances_path, ref, ref_path)
        ref_instances = instance_map.array[0]
    pred_array, ref_array = pred.array[0], ref.array[0]
    if min_volume_mm3 > 0:  # post-processing of the prediction, before the ignore label cuts it
        pred_array = postprocessing.remove_small_components(
            pred_array, min_volume_mm3=min_volume_mm3, spacing=ref.spacing
        )
    if ignore_label is not None:
        unlabelled = ref_array == ignore_label
        if unlabelled.any():
            pred_array = np.where(unlabelled, 0, pred_array).astype(pred_array.dtype)
            ref_array = np.where(unlabelled, 0, ref_array).astype(ref_array.dtype)
    ref_values: set[int] = set()
    if wanted is not None:
        labels = wanted
    else:
        # Outside the box of both maps' non-zero voxels everything is background: the values present
        # are read off the crop (a lesion's crop is a few thousand voxels of a 10-million-voxel scan).
        box = metrics.nonzero_box(pred_array, ref_array)
        if box is not None:
            ref_values = nonzero_values(ref_array[box])
            labels = sorted(ref_values | nonzero_values(pred_array[box]))
        else:
            labels = []
    scores = metrics.compute(pred_array, ref_array, ref.spacing, labels, nsd_tolerance_mm)
    if instances:
        objects = detection.object_scores(
            pred_array, ref_array, ref.spacing, labels,
            min_volume_mm3=min_volume_mm3, ref_instances=ref_instances,
        )  # fmt: skip
        for label, row in objects.items():
            scores[label].update(row)
    return case, scores, ref_values


def check_same_grid(
    volume: Volume, path: PathLike, ref: Volume, ref_path: PathLike,
    hint: str = "predict on the reference grid or resample the prediction first", ref_is_label: bool = True,
) -> None:
    """A one-channel label map on the reference's grid (shape and affine), or a one-line VolsegError.

    `ref` may be an image instead of a label map (`ref_is_label=False`): then only its grid counts.
    """
    for item, item_path in ((volume, path), (ref, ref_path))[: 2 if ref_is_label else 1]:
        if item.array.shape[0] != 1:
            raise VolsegError(item_path, f"has {item.array.shape[0]} channels, a label map has one")
    detail = None
    if volume.shape != ref.shape:
        detail = f"shape {volume.shape} vs {ref.shape}"
    elif not np.allclose(volume.affine, ref.affine, atol=GEOMETRY_ATOL, rtol=0):
        diff = float(np.max(np.abs(volume.affine - ref.affine)))
        detail = f"shape {volume.shape} vs {ref.shape}, affines differ by up to {diff:.3g} mm"
    if detail is not None:
        raise VolsegError(path, f"geometry differs from {ref_path} ({detail})", hint)


def nonzero_values(array: np.ndarray) -> set[int]:
    """Distinct non-zero values; a bincount (linear) when the values are small and non-negative."""
    if array.size == 0:
        return set()
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < 65536:
        values = np.flatnonzero(np.bincount(array.ravel().astype(np.intp, copy=False)))
    else:
        values = np.unique(array)
    return {int(v) for v in values if v != 0}


def _both_empty(values: list[int], instances: bool = False) -> dict[int, dict[str, float]]:
    """metrics' row for labels present in neither mask, from metrics itself (one convention)."""
    blank = np.zeros((1, 1, 1), dtype=np.int32)
    rows = metrics.compute(blank, blank, (1.0, 1.0, 1.0), values)
    if instances:
        for value, row in detection.object_scores(blank, blank, (1.0, 1.0, 1.0), values).items():
            rows[value].update(row)
    return rows


# --------------------------------------------------------------------------------------------------
# summary


def summarize(rows: list[dict]) -> dict:
    """Mean, std (population) and median of each metric per label over cases, plus "all".

    "all" holds the mean over labels of the per-label means, so each label counts equally
    however many cases it appears in. Rows may come straight from `evaluate_folders` or from a
    CSV (strings are converted); non-finite values are left out of the statistics.

    Rows with object fields (`evaluate_folders(..., instances=True)`) add "objects": per label
    and for "all" (every label and case), the object counts summed over cases and the pooled
    precision, recall and F1 at each IoU threshold computed from those sums
    (`detection.detection_scores`), so a case with many objects weighs more than one with few.

    >>> rows = [{"label": 1, "label_name": "a", "dice": d, "hd95": 2.0} for d in (0.5, 1.0)]
    >>> s = summarize(rows)
    >>> s["per_label"]["1"]["dice"], s["all"]["dice"]
    ({'mean': 0.75, 'std': 0.25, 'median': 0.75}, 0.75)
    """
    if not rows:
        raise VolsegError(None, "no rows to summarise", "was the prediction folder empty?")
    present = [m for m in SUMMARY_METRICS if any(m in row for row in rows)]
    by_label: dict[int, list[dict]] = {}
    for row in rows:
        by_label.setdefault(int(row["label"]), []).append(row)
    per_label: dict[str, dict] = {}
    for value in sorted(by_label):
        label_rows = by_label[value]
        entry: dict[str, Any] = {
            "label_name": str(label_rows[0].get("label_name", value)),
            "n_cases": len(label_rows),
        }
        for metric in present:
            values = np.array([_as_float(r.get(metric)) for r in label_rows], dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                entry[metric] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values)),
                    "median": float(np.median(values)),
                }
        per_label[str(value)] = entry
    overall: dict[str, Any] = {"n_labels": len(per_label)}
    for metric in present:
        means = [e[metric]["mean"] for e in per_label.values() if metric in e]
        if means:
            overall[metric] = float(np.mean(means))
    summary: dict[str, Any] = {"per_label": per_label, "all": overall}
    objects = _pooled_objects(by_label)
    if objects is not None:
        summary["objects"] = objects
    return summary


def _pooled_objects(by_label: dict[int, list[dict]]) -> dict[str, dict] | None:
    """Object counts summed over cases and the pooled detection scores, per label and "all".

    None when no row has object fields. Rows without a finite `n_ref_objects` are left out.

    >>> rows = [{"n_ref_objects": 2, "n_pred_objects": 1, "obj_tp@0.5": 1, "merged": 0, "split": 0},
    ...         {"n_ref_objects": 1, "n_pred_objects": 3, "obj_tp@0.5": 1, "merged": 0, "split": 1}]
    >>> pooled = _pooled_objects({1: rows})["all"]
    >>> pooled["obj_tp@0.5"], pooled["obj_precision@0.5"], pooled["obj_recall@0.5"], pooled["obj_f1@0.5"]
    (2, 0.5, 0.6666666666666666, 0.5714285714285714)
    """
    keys: list[str] = []  # the thresholds as they appear in the field names, e.g. "0.1"
    for label_rows in by_label.values():
        for row in label_rows:
            for name in row:
                if name.startswith("obj_tp@") and name[len("obj_tp@"):] not in keys:
                    keys.append(name[len("obj_tp@"):])
    if not keys:
        return None
    counts = ["n_ref_objects", "n_pred_objects", *[f"obj_tp@{k}" for k in keys], "merged", "merged_ref", "split"]

    def pooled(rows: list[dict]) -> dict[str, Any]:
        used = [r for r in rows if math.isfinite(_as_float(r.get("n_ref_objects")))]
        sums = {c: int(sum(_value_or_zero(r.get(c)) for r in used)) for c in counts}
        entry: dict[str, Any] = {"n_cases": len(used)}
        entry.update({c: sums[c] for c in ("n_ref_objects", "n_pred_objects")})
        for k in keys:
            tp = sums[f"obj_tp@{k}"]
            precision, recall, f1 = detection.detection_scores(
                tp, sums["n_pred_objects"], sums["n_ref_objects"]
            )
            entry.update({
                f"obj_tp@{k}": tp, f"obj_precision@{k}": precision, f"obj_recall@{k}": recall,
                f"obj_f1@{k}": f1,
            })  # fmt: skip
        entry["merged"], entry["merged_ref"], entry["split"] = sums["merged"], sums["merged_ref"], sums["split"]
        return entry

    out: dict[str, dict] = {}
    for value in sorted(by_label):
        label_rows = by_label[value]
        out[str(value)] = {"label_name": str(label_rows[0].get("label_name", value))}
        out[str(value)].update(pooled(label_rows))
    out["all"] = {"label_name": "(pooled)"}
    out["all"].update(pooled([r for label_rows in by_label.values() for r in label_rows]))
    return out


def _value_or_zero(value: Any) -> float:
    number = _as_float(value)
    return number if math.isfinite(number) else 0.0


def _as_float(value: Any) -> float:
    """A metric cell as float; missing or unparsable cells become NaN (then skipped)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def format_summary(summary: dict) -> str:
    """A plain-text table of `summarize`'s output: one line per label plus an "all" line.

    Ratios get three decimals, distances (mm) two, volumes (mm³) one; "-" marks a metric with
    no value.
    """
    metric_names = [
        m
        for m in SUMMARY_METRICS
        if any(m in e for e in summary["per_label"].values()) or m in summary["all"]
    ]
    digits = {m: 2 if m in _DISTANCE_METRICS else 3 for m in metric_names}
    digits["vol_diff_mm3"] = 1
    header = ["label", "name", "cases"] + [
        f"{m} (mm)" if m in _DISTANCE_METRICS else m for m in metric_names
    ]
    lines = []
    for value, entry in summary["per_label"].items():
        cells = [value, entry["label_name"], str(entry["n_cases"])]
        for m in metric_names:
            stats = entry.get(m)
            cells.append(
                "-" if stats is None else f"{stats['mean']:.{digits[m]}f} ± {stats['std']:.{digits[m]}f}"
            )
        lines.append(cells)
    overall = summary["all"]
    lines.append(
        ["all", "(mean of labels)", ""]
        + [f"{overall[m]:.{digits[m]}f}" if m in overall else "-" for m in metric_names]
    )
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]

    def fmt(cells: Sequence[str]) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    text = "\n".join([fmt(header), rule] + [fmt(cells) for cells in lines])
    if summary.get("objects"):
        title = "objects (counts summed over cases, pooled scores)"
        text += f"\n\n{title}\n{_format_objects(summary['objects'])}"
    return text


def _format_objects(objects: dict[str, dict]) -> str:
    """The object table: counts, pooled precision / recall / F1 per IoU threshold, merges, splits."""
    keys = [name[len("obj_f1@"):] for name in objects["all"] if name.startswith("obj_f1@")]
    header = ["label", "name", "ref", "pred"]
    for k in keys:
        header += [f"P@{k}", f"R@{k}", f"F1@{k}"]
    header += ["merged", "refs merged", "split"]
    lines = []
    for value, entry in objects.items():
        cells = [value, entry["label_name"], str(entry["n_ref_objects"]), str(entry["n_pred_objects"])]
        for k in keys:
            cells += [f"{entry[f'obj_{m}@{k}']:.3f}" for m in ("precision", "recall", "f1")]
        cells += [str(entry["merged"]), str(entry.get("merged_ref", "")), str(entry["split"])]
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]

    def fmt(cells: Sequence[str]) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule] + [fmt(cells) for cells in lines])


# --------------------------------------------------------------------------------------------------
# files


def write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically; NaN/inf are refused (they are not JSON)."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_open(path, "w") as f:
        f.write(text)


def write_csv_rows(path: PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write `rows` under the header `columns`, atomically; keys outside `columns` are dropped."""
    with atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------------
# plots


def _new_figure(width_in: float, height_in: float) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, out_png: PathLike, dpi: int = 110) -> None:
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


def tensorboard_logger(log_dir: PathLike) -> Any:
    """A callback that writes one epoch's metrics row as TensorBoard scalars (step = epoch).

    Made before training starts, so a missing `tensorboard` package is reported at once rather
    than after the first epoch. Losses go under `loss/`, Dice under `dice/`, the rest under
    `train/`; a resumed run appends to the same folder and TensorBoard joins the steps.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VolsegError(None, "--tensorboard needs the tensorboard package",
                          "pip install tensorboard (or volseg[tensorboard])") from None
    writer = SummaryWriter(log_dir=str(log_dir))

    def log(row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            if key.endswith("_loss"):
                tag = f"loss/{key[: -len('_loss')]}"
            elif key.startswith(("val_dice", "val_dense_dice")):
                tag = f"dice/{key[len('val_'):]}"
            else:
                tag = f"train/{key}"
            writer.add_scalar(tag, float(value), step)
        writer.flush()

    return log


def plot_training_curves(metrics_csv: PathLike, out_png: PathLike) -> None:
    """Losses and validation Dice per epoch from training's metrics CSV, in two panels.

    Expects columns epoch, train_loss, val_loss, val_dice (seconds and lr are ignored) and
    draws any `val_dice_<label>` columns too; empty cells (epochs without validation) are gaps.
    """
    metrics_csv = Path(metrics_csv)
    try:
        with open(metrics_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            records = list(reader)
    except OSError as exc:
        raise VolsegError(metrics_csv, f"cannot read ({exc.strerror or exc})") from None
    needed = ("epoch", "train_loss", "val_loss", "val_dice")
    absent = [c for c in needed if c not in columns]
    if absent:
        raise VolsegError(
            metrics_csv,
            f"lacks column(s) {', '.join(absent)}",
            "expected the metrics CSV that training writes",
        )
    if not records:
        raise VolsegError(metrics_csv, "has no epochs yet")

    def column(name: str) -> np.ndarray:
        return np.array([_as_float(r.get(name)) for r in records], dtype=np.float64)

    epoch = column("epoch")
    fig = _new_figure(10.0, 4.0)
    loss_ax, dice_ax = fig.subplots(1, 2)
    for name, style in (("train_loss", "-"), ("val_loss", "--")):
        _plot_series(loss_ax, epoch, column(name), name.replace("_", " "), style)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("losses")
    _plot_series(dice_ax, epoch, column("val_dice"), "val dice (mean)", "-", linewidth=2.0)
    for name in columns:
        if name.startswith("val_dice_"):
            _plot_series(dice_ax, epoch, column(name), name[len("val_dice_"):], ":")
    dice_ax.set_xlabel("epoch")
    dice_ax.set_ylabel("Dice")
    dice_ax.set_ylim(-0.02, 1.02)
    dice_ax.set_title("validation Dice")
    for ax in (loss_ax, dice_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    _save_png(fig, out_png)


def _plot_series(ax: Any, x: np.ndarray, y: np.ndarray, label: str, style: str, **kw: Any) -> None:
    """Plot the finite points only (with markers, so a single validation epoch still shows)."""
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.any():
        ax.plot(x[finite], y[finite], style, marker=".", label=label, **kw)


def plot_overlay(
    image: np.ndarray,
    seg: np.ndarray,
    out_png: PathLike,
    ref: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
) -> None:
    """Three orthogonal slices through the foreground's centre of mass with label contours.

    `image` is a float array (I, J, K); `seg` (and `ref`) integer arrays of the same shape.
    Prediction contours are solid, reference contours dashed, in one colour per label; the
    slices go through the centre of mass of `ref` if given, else of `seg`, else the centre.
    Pixels are drawn with their physical aspect ratio from `spacing`.
    """
    image = np.asarray(image, dtype=np.float64)
    seg = np.asarray(seg)
    if image.ndim != 3:
        raise VolsegError(None, f"image must be (I, J, K), got shape {image.shape}", "pass image[c]")
    for name, array in (("seg", seg), ("ref", ref)):
        if array is not None and np.shape(array) != image.shape:
            raise VolsegError(
                None, f"{name} shape {np.shape(array)} differs from image shape {image.shape}"
            )
    spacing_mm = tuple(float(s) for s in spacing)
    if len(spacing_mm) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise VolsegError(None, f"spacing must be 3 positive numbers (mm), got {tuple(spacing)}")
    ref = None if ref is None else np.asarray(ref)
    centre = _centre_vox(ref if ref is not None and np.any(ref) else seg)
    values = sorted(nonzero_values(seg) | (set() if ref is None else nonzero_values(ref)))

    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    palette = colormaps["tab10"]
    colours = {value: palette(i % 10) for i, value in enumerate(values)}
    finite = image[np.isfinite(image)]
    low, high = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    fig = _new_figure(12.0, 4.6)
    axes = fig.subplots(1, 3)
    for axis, ax in enumerate(axes):
        # Slice at `axis`; rows and columns are the two remaining axes in order.
        rows_axis, cols_axis = [a for a in range(3) if a != axis]
        index = [slice(None)] * 3
        index[axis] = centre[axis]
        index = tuple(index)
        ax.imshow(
            image[index], cmap="gray", vmin=low, vmax=high, interpolation="nearest",
            aspect=spacing_mm[rows_axis] / spacing_mm[cols_axis], origin="lower",
        )  # fmt: skip
        for array, style in ((seg, "solid"), (ref, "dashed")):
            if array is not None:
                draw_contours(ax, array[index], values, colours, style, 1.2)
        names = "IJK"
        ax.set_title(f"{names[axis]} = {centre[axis]}")
        ax.set_xlabel(names[cols_axis])
        ax.set_ylabel(names[rows_axis])
        ax.tick_params(labelsize="small")
    handles = []
    for value in values:
        handles.append(Line2D([], [], color=colours[value], linestyle="solid", label=f"{value} pred"))
        if ref is not None:
            handles.append(
                Line2D([], [], color=colours[value], linestyle="dashed", label=f"{value} ref")
            )
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize="small")
    if title:
        fig.suptitle(title)
    _save_png(fig, out_png)


def draw_contours(ax, plane: np.ndarray, values: Sequence[int], colours: dict, style: str, width: float) -> None:
    """Outline each label value of a 2D label `plane` on `ax` (one colour per value, one line style)."""
    if min(plane.shape) < 2:
        return  # matplotlib cannot contour a single row
    for value in values:
        mask = plane == value
        if mask.any():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colours[value]], linestyles=style,
                       linewidths=width)


def _centre_vox(labels_array: np.ndarray) -> tuple[int, int, int]:
    """Rounded centre of mass of the non-zero voxels, or the volume centre if there are none."""
    coords = np.nonzero(labels_array)
    if coords[0].size == 0:
        return tuple(n // 2 for n in labels_array.shape)  # type: ignore[return-value]
    return tuple(int(round(float(np.mean(c)))) for c in coords)  # type: ignore[return-value]


def plot_metric_boxes(rows: Sequence[dict], out_png: PathLike, metric: str = "dice") -> None:
    """One box (with the cases as dots) per label for `metric` over cases."""
    if metric not in SUMMARY_METRICS:
        raise VolsegError(None, f"unknown metric {metric!r}", f"choose from {', '.join(SUMMARY_METRICS)}")
    if not rows:
        raise VolsegError(None, "no rows to plot", "was the prediction folder empty?")
    groups: dict[int, tuple[str, list[float]]] = {}
    for row in rows:
        value = int(row["label"])
        name, values = groups.setdefault(value, (str(row.get("label_name", value)), []))
        number = _as_float(row.get(metric))
        if math.isfinite(number):
            values.append(number)
    order = sorted(groups)
    data = [groups[v][1] for v in order]
    names = [f"{v} {groups[v][0]}" if groups[v][0] != str(v) else str(v) for v in order]
    fig = _new_figure(max(4.0, 1.0 + 0.9 * len(order)), 4.0)
    ax = fig.subplots()
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(order) + 1), names, rotation=30 if len(order) > 4 else 0)
    for position, values in enumerate(data, start=1):
        jitter = np.linspace(-0.08, 0.08, len(values)) if len(values) > 1 else np.zeros(len(values))
        ax.plot(position + jitter, values, ".", color="black", alpha=0.6)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per label ({len(rows)} rows)")
    ax.grid(axis="y", alpha=0.3)
    _save_png(fig, out_png)
