"""Evaluation over folders, summaries, atomic writers and plots, on tiny NIfTI files."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from volseg import report
from volseg.errors import VolsegError

SHAPE = (5, 6, 7)
SPACING = (0.8, 1.0, 2.5)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def affine(spacing=SPACING) -> np.ndarray:
    out = np.diag([*spacing, 1.0])
    out[:3, 3] = (-3.0, 10.0, 2.0)
    return out


def save(path, array, spacing=SPACING) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine(spacing)), str(path))


def make_folders(tmp_path):
    """Two cases with known counts.

    case_a: label 1 ref 8 voxels, pred 6 of them + 2 extra (TP 6, FP 2, FN 2) -> Dice 0.75;
            label 2 ref 4 voxels, pred identical -> Dice 1.
    case_b: label 1 ref 4 voxels, pred 2 of them (TP 2, FN 2) -> Dice 2/3; label 2 absent in both.
    """
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[4, 0:4, 6] = 2
    pred = ref.copy()
    pred[1, 1, 1:3] = 0
    pred[3, 1:3, 1] = 1
    save(ref_dir / "case_a.nii.gz", ref)
    save(pred_dir / "case_a.nii.gz", pred)
    ref = np.zeros(SHAPE, np.uint8)
    ref[0, 0, 0:4] = 1
    pred = np.zeros(SHAPE, np.uint8)
    pred[0, 0, 0:2] = 1
    save(ref_dir / "case_b.nii.gz", ref)
    save(pred_dir / "case_b.nii.gz", pred)
    (pred_dir / "notes.txt").write_text("not an image")
    return pred_dir, ref_dir


def test_evaluate_folders_known_dice_and_csv(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    out_csv = tmp_path / "out" / "metrics.csv"
    rows = report.evaluate_folders(pred_dir, ref_dir, {2: "vessel", 1: "tumour"}, out_csv=out_csv)
    assert [(r["case"], r["label"], r["label_name"]) for r in rows] == [
        ("case_a", 1, "tumour"), ("case_a", 2, "vessel"),
        ("case_b", 1, "tumour"), ("case_b", 2, "vessel"),
    ]  # fmt: skip
    a1, a2, b1, b2 = rows
    assert a1["dice"] == pytest.approx(0.75)
    assert a1["jaccard"] == pytest.approx(6 / 10)
    assert (a1["n_ref"], a1["n_pred"]) == (8, 8)
    assert a2["dice"] == 1.0 and a2["hd"] == 0.0
    assert b1["dice"] == pytest.approx(2 / 3)
    assert b1["precision"] == 1.0 and b1["recall"] == pytest.approx(0.5)
    assert b1["hd"] == pytest.approx(2 * SPACING[2])  # the two missed voxels, along K
    # b1: pred->ref distances (0, 0); ref->pred (0, 0, 2.5, 5) mm; per-direction 95th percentiles
    assert b1["hd95"] == pytest.approx(2.5 + 0.85 * 2.5)
    assert b1["assd"] == pytest.approx(7.5 / 6)
    assert b1["nsd"] == pytest.approx(4 / 6)  # within the default 1 mm: the four zeros
    assert b1["vol_diff_mm3"] == pytest.approx(-2 * 0.8 * 1.0 * 2.5)
    assert b1["vol_diff_rel"] == pytest.approx(-0.5)
    assert b2["nsd"] == 1.0 and b2["assd"] == 0.0 and b2["vol_diff_rel"] == 0.0
    assert b2["dice"] == 1.0 and b2["n_ref"] == 0 and b2["hd95"] == 0.0
    for row in rows:
        assert tuple(row) == report.CSV_COLUMNS

    with open(out_csv, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.CSV_COLUMNS
        written = list(reader)
    assert len(written) == 4
    assert written[0]["case"] == "case_a" and written[0]["label_name"] == "tumour"
    assert float(written[0]["dice"]) == pytest.approx(0.75)
    assert written[2]["n_pred"] == "2"
    assert [p.name for p in out_csv.parent.iterdir()] == ["metrics.csv"]  # no temp files left


def test_labels_none_uses_reference_values_and_workers_agree(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    rows = report.evaluate_folders(pred_dir, ref_dir, None)
    assert [(r["case"], r["label"], r["label_name"]) for r in rows] == [
        ("case_a", 1, "1"), ("case_a", 2, "2"), ("case_b", 1, "1"), ("case_b", 2, "2"),
    ]  # fmt: skip
    assert rows[3]["dice"] == 1.0  # label 2 only exists in case_a: both empty in case_b
    parallel = report.evaluate_folders(pred_dir, ref_dir, None, workers=2)
    assert parallel == rows
    wider = report.evaluate_folders(pred_dir, ref_dir, {1: "a"}, nsd_tolerance_mm=2.5)
    assert wider[1]["nsd"] == pytest.approx(5 / 6)  # case_b: now also the voxel 2.5 mm away
    with pytest.raises(VolsegError, match="NSD tolerance"):
        report.evaluate_folders(pred_dir, ref_dir, {1: "a"}, nsd_tolerance_mm=float("nan"))


def test_geometry_mismatch_is_reported(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    save(pred_dir / "case_b.nii.gz", np.zeros((5, 6, 8)))
    with pytest.raises(VolsegError, match=r"case_b\.nii\.gz: geometry differs from .*ref.*case_b"
                       r"\.nii\.gz \(shape \(5, 6, 8\) vs \(5, 6, 7\)"):  # fmt: skip
        report.evaluate_folders(pred_dir, ref_dir, {1: "a"})
    save(pred_dir / "case_b.nii.gz", np.zeros(SHAPE), spacing=(0.8, 1.0, 2.6))
    with pytest.raises(VolsegError, match="geometry differs.*affines differ by up to 0.1"):
        report.evaluate_folders(pred_dir, ref_dir, {1: "a"}, workers=2)  # error crosses processes


def test_missing_reference_and_empty_folder(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    (ref_dir / "case_b.nii.gz").unlink()
    with pytest.raises(VolsegError, match=r"no reference for 1 prediction\(s\): case_b\.nii\.gz"):
        report.evaluate_folders(pred_dir, ref_dir, {1: "a"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolsegError, match=r"empty: holds no \*\.nii\.gz predictions"):
        report.evaluate_folders(empty, ref_dir, {1: "a"})


def test_summarize_numbers_and_table():
    rows = [
        {"case": "a", "label": 1, "label_name": "x", "dice": 0.5, "hd95": 4.0, "hd": 6.0},
        {"case": "b", "label": 1, "label_name": "x", "dice": 0.7, "hd95": 2.0, "hd": 2.0},
        {"case": "c", "label": 1, "label_name": "x", "dice": 1.0, "hd95": 0.0, "hd": 1.0},
        {"case": "a", "label": 2, "label_name": "y", "dice": "0.2", "hd95": 8.0, "hd": "nan"},
    ]
    summary = report.summarize(rows)
    x = summary["per_label"]["1"]
    assert x["label_name"] == "x" and x["n_cases"] == 3
    assert x["dice"]["mean"] == pytest.approx(2.2 / 3)
    assert x["dice"]["median"] == pytest.approx(0.7)
    assert x["dice"]["std"] == pytest.approx(np.std([0.5, 0.7, 1.0]))
    assert x["hd95"] == {"mean": 2.0, "median": 2.0, "std": pytest.approx(math.sqrt(8 / 3))}
    y = summary["per_label"]["2"]
    assert y["dice"]["mean"] == pytest.approx(0.2) and "hd" not in y  # NaN left out
    assert summary["all"]["dice"] == pytest.approx((2.2 / 3 + 0.2) / 2)
    assert summary["all"]["hd95"] == pytest.approx(5.0)
    assert summary["all"]["hd"] == pytest.approx(3.0)  # label 1 only
    json.dumps(summary, allow_nan=False)  # finite and JSON-serialisable

    table = report.format_summary(summary)
    lines = [[cell.strip() for cell in line.split("|")] for line in table.splitlines()]
    assert lines[0] == ["label", "name", "cases", "dice", "hd (mm)", "hd95 (mm)"]
    assert lines[2] == ["1", "x", "3", "0.733 ± 0.205", "3.00 ± 2.16", "2.00 ± 1.63"]
    assert lines[3] == ["2", "y", "1", "0.200 ± 0.000", "-", "8.00 ± 0.00"]
    assert lines[4] == ["all", "(mean of labels)", "", "0.467", "3.00", "5.00"]
    with pytest.raises(VolsegError):
        report.summarize([])

    more = [dict(r, assd=1.0, nsd=0.5, vol_diff_mm3=-12.25, vol_diff_rel=-0.1) for r in rows[:3]]
    table = report.format_summary(report.summarize(more))
    lines = [[cell.strip() for cell in line.split("|")] for line in table.splitlines()]
    assert lines[0] == [
        "label", "name", "cases", "dice", "hd (mm)", "hd95 (mm)", "assd (mm)", "nsd",
        "vol_diff_mm3", "vol_diff_rel",
    ]  # fmt: skip
    assert lines[2][6:] == ["1.00 ± 0.00", "0.500 ± 0.000", "-12.2 ± 0.0", "-0.100 ± 0.000"]


def test_write_json_and_csv_are_atomic_and_strict(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    report.write_json(path, {"a": [1, 2.5], "b": "x"})
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": "x"}
    with pytest.raises(ValueError):
        report.write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": [1, 2.5], "b": "x"}  # old file intact
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]
    report.write_csv_rows(tmp_path / "t.csv", [{"x": 1, "y": "b", "z": 0}], ("y", "x"))
    assert (tmp_path / "t.csv").read_text().splitlines() == ["y,x", "b,1"]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE


def test_plot_training_curves(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,seconds,lr,train_loss,val_loss,val_dice,val_dice_tumour\n"
        "0,1.5,0.01,1.2,,,\n"
        "1,1.4,0.009,0.9,1.0,0.4,0.35\n"
        "2,1.4,0.008,0.7,0.8,0.6,0.5\n"
    )
    out = tmp_path / "curves.png"
    report.plot_training_curves(csv_path, out)
    assert_png(out)
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,loss\n0,1\n")
    with pytest.raises(VolsegError, match="lacks column"):
        report.plot_training_curves(bad, tmp_path / "x.png")


def test_plot_overlay_and_boxes(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(9, 7, 5))
    ref = np.zeros((9, 7, 5), np.int16)
    ref[2:6, 2:5, 1:4] = 1
    ref[6:8, 1:3, 2:4] = 2
    seg = np.roll(ref, 1, axis=0)
    out = tmp_path / "overlay.png"
    report.plot_overlay(image, seg, out, ref=ref, spacing=(0.7, 1.0, 3.0), title="case")
    assert_png(out)
    report.plot_overlay(image, np.zeros_like(seg), tmp_path / "empty.png")  # nothing to outline
    assert_png(tmp_path / "empty.png")
    with pytest.raises(VolsegError, match="differs from image shape"):
        report.plot_overlay(image, seg[:-1], tmp_path / "x.png")

    rows = [
        {"case": c, "label": v, "label_name": n, "dice": d}
        for c, (v, n, d) in enumerate([(1, "a", 0.8), (1, "a", 0.6), (2, "b", 0.3), (2, "b", 0.5)])
    ]
    boxes = tmp_path / "boxes.png"
    report.plot_metric_boxes(rows, boxes)
    assert_png(boxes)
    with pytest.raises(VolsegError, match="unknown metric"):
        report.plot_metric_boxes(rows, boxes, metric="volume")
