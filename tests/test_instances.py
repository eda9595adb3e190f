"""Object-level (instance) detection scores: hand-made volumes with answers worked out by hand."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from volseg import detection, metrics, report
from volseg.cli import app
from volseg.errors import VolsegError

ISO = (1.0, 1.0, 1.0)


def scores(pred, ref, spacing=ISO, labels=(1,), **kw) -> dict[str, float]:
    """The row of the first label in `labels`."""
    return detection.object_scores(pred, ref, spacing, labels, **kw)[labels[0]]


def bar(shape=(3, 4, 10)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# known answers


def test_two_reference_objects_predicted_as_one_blob_is_a_merge():
    ref = bar()
    ref[1, 1:3, 0:3] = 1  # 6 voxels
    ref[1, 1:3, 4:7] = 1  # 6 voxels, one background voxel apart
    pred = bar()
    pred[1, 1:3, 0:7] = 1  # 14 voxels, IoU 6/14 = 0.43 with each
    row = scores(pred, ref)
    assert (row["n_ref_objects"], row["n_pred_objects"]) == (2.0, 1.0)
    assert row["obj_tp@0.1"] == 1.0  # one blob matches one of them
    assert row["obj_precision@0.1"] == 1.0
    assert row["obj_recall@0.1"] == 0.5
    assert row["obj_f1@0.1"] == pytest.approx(2 / 3)
    assert row["obj_tp@0.5"] == 0.0
    assert row["obj_f1@0.5"] == 0.0
    assert (row["merged"], row["split"]) == (1.0, 0.0)


def test_merge_with_one_dominant_reference_object_matches_at_0_5():
    ref = bar()
    ref[1, 1:3, 0:6] = 1  # 12 voxels
    ref[1, 1:3, 7:8] = 1  # 2 voxels
    pred = bar()
    pred[1, 1:3, 0:8] = 1  # 16 voxels: IoU 12/16 = 0.75 and 2/16 = 0.125
    row = scores(pred, ref)
    assert row["obj_tp@0.1"] == row["obj_tp@0.5"] == 1.0
    assert row["obj_f1@0.5"] == pytest.approx(2 * 1 / (1 + 2))
    assert row["merged"] == 1.0


def test_one_reference_object_predicted_in_two_pieces_is_a_split():
    ref = bar()
    ref[1, 1:3, 0:8] = 1  # 16 voxels
    pred = bar()
    pred[1, 1:3, 0:3] = 1  # 6 voxels: IoU 6/16 = 0.375
    pred[1, 1:3, 4:8] = 1  # 8 voxels: IoU 8/16 = 0.5 exactly, which counts at 0.5
    row = scores(pred, ref)
    assert (row["n_ref_objects"], row["n_pred_objects"]) == (1.0, 2.0)
    assert row["obj_tp@0.1"] == row["obj_tp@0.5"] == 1.0
    assert row["obj_precision@0.5"] == 0.5 and row["obj_recall@0.5"] == 1.0
    assert row["obj_f1@0.5"] == pytest.approx(2 / 3)
    assert (row["merged"], row["split"]) == (0.0, 1.0)


def test_perfect_prediction_scores_one_at_both_thresholds():
    ref = bar()
    ref[0, 0, 0:2] = 1
    ref[2, 2:4, 5:9] = 1
    ref[0, 3, 9] = 1
    row = scores(ref.copy(), ref)
    assert row["n_ref_objects"] == row["n_pred_objects"] == 3.0
    for t in ("0.1", "0.5"):
        assert row[f"obj_tp@{t}"] == 3.0
        assert row[f"obj_precision@{t}"] == row[f"obj_recall@{t}"] == row[f"obj_f1@{t}"] == 1.0
    assert row["merged"] == row["split"] == 0.0


def test_iou_0_3_counts_at_0_1_but_not_at_0_5():
    ref = bar()
    ref[0, 0, 0:10] = 1  # 10 voxels
    pred = bar()
    pred[0, 0, 7:10] = 1  # 3 voxels inside: IoU 3/10
    row = scores(pred, ref)
    assert row["obj_tp@0.1"] == 1.0 and row["obj_f1@0.1"] == 1.0
    assert row["obj_tp@0.5"] == 0.0 and row["obj_f1@0.5"] == 0.0
    custom = scores(pred, ref, iou_thresholds=(0.3, 0.31))
    assert custom["obj_tp@0.3"] == 1.0 and custom["obj_tp@0.31"] == 0.0


def test_min_volume_on_anisotropic_spacing_keeps_an_object_exactly_at_the_threshold():
    spacing = (1.0, 1.0, 3.0)  # 3 mm³ per voxel
    ref = bar()
    ref[2, 0:3, 0:3] = 1  # 9 voxels = 27 mm³
    pred = ref.copy()
    pred[0, 0, 0:4] = 1  # a 4-voxel false positive = 12 mm³
    kept = scores(pred, ref, spacing, min_volume_mm3=12.0)
    assert kept["n_pred_objects"] == 2.0 and kept["obj_precision@0.5"] == 0.5
    dropped = scores(pred, ref, spacing, min_volume_mm3=13.0)
    assert dropped["n_pred_objects"] == 1.0 and dropped["obj_precision@0.5"] == 1.0
    # the same rule on the reference side: a small reference object is not counted as missed
    kept = scores(ref, pred, spacing, min_volume_mm3=12.0)
    dropped = scores(ref, pred, spacing, min_volume_mm3=13.0)
    assert (kept["n_ref_objects"], kept["obj_recall@0.5"]) == (2.0, 0.5)
    assert (dropped["n_ref_objects"], dropped["obj_recall@0.5"]) == (1.0, 1.0)


def test_reference_instances_override_connected_components():
    ref = bar()
    ref[1, 1:3, 0:8] = 1  # one connected mask ...
    instances = np.zeros(ref.shape, dtype=np.int32)
    instances[1, 1:3, 0:4] = 7  # ... holding two touching objects with different ids
    instances[1, 1:3, 4:8] = 300
    blob = ref.copy()
    assert scores(blob, ref)["n_ref_objects"] == 1.0
    row = scores(blob, ref, ref_instances=instances)
    assert row["n_ref_objects"] == 2.0
    assert row["obj_tp@0.5"] == 1.0  # IoU 8/16 = 0.5 with each; one-to-one
    assert row["obj_recall@0.5"] == 0.5 and row["merged"] == 1.0
    pieces = bar()
    pieces[1, 1:3, 0:3] = 1  # one voxel gap: two predicted objects equal to the instances...
    pieces[1, 1:3, 4:8] = 1
    pieces[1, 1:3, 3] = 0
    row = scores(pieces, ref, ref_instances=instances)
    assert row["obj_tp@0.5"] == 2.0 and row["obj_f1@0.5"] == 1.0  # ... up to one voxel
    # instance ids outside `ref == label` do not make objects of that label
    instances[0, 0, 0] = 5
    assert scores(pieces, ref, ref_instances=instances)["n_ref_objects"] == 2.0


def test_labels_are_scored_independently():
    ref = bar()
    ref[1, 1:3, 0:3] = 1
    ref[1, 1:3, 3:6] = 2  # touches label 1 but is another label's object
    pred = ref.copy()
    pred[1, 1:3, 3:6] = 0  # label 2 missed
    rows = detection.object_scores(pred, ref, ISO, [1, 2, 3])
    assert rows[1]["n_ref_objects"] == 1.0 and rows[1]["obj_f1@0.5"] == 1.0
    assert rows[2]["n_pred_objects"] == 0.0 and rows[2]["obj_f1@0.5"] == 0.0
    assert rows[2]["obj_precision@0.1"] == 0.0 and rows[2]["obj_recall@0.1"] == 0.0
    assert rows[3]["obj_f1@0.1"] == 1.0  # absent from both


def test_many_labels_use_the_same_answers():
    ref = np.zeros((6, 6, 6), dtype=np.uint8)
    for value in range(1, 7):
        ref[value - 1, 0:value, 0] = value
    pred = ref.copy()
    pred[5, :, 0] = 0  # label 6 missed
    rows = detection.object_scores(pred, ref, ISO, range(1, 8))
    assert [rows[v]["obj_f1@0.5"] for v in range(1, 8)] == [1.0] * 5 + [0.0, 1.0]


def test_empty_conventions():
    empty = bar()
    some = bar()
    some[1, 1, 1] = 1
    both = scores(empty, empty)
    assert both["n_ref_objects"] == both["n_pred_objects"] == 0.0
    assert both["obj_precision@0.5"] == both["obj_recall@0.5"] == both["obj_f1@0.5"] == 1.0
    assert both["merged"] == both["split"] == 0.0
    for pred, ref in ((empty, some), (some, empty)):
        row = scores(pred, ref)
        assert row["obj_precision@0.1"] == row["obj_recall@0.1"] == row["obj_f1@0.1"] == 0.0
    assert detection.detection_scores(0, 0, 0) == (1.0, 1.0, 1.0)
    assert detection.detection_scores(0, 3, 0) == (0.0, 0.0, 0.0)
    assert detection.detection_scores(0, 2, 2) == (0.0, 0.0, 0.0)


def test_connectivity_decides_what_one_object_is():
    ref = bar()
    ref[0, 0, 0] = ref[1, 1, 1] = 1  # corner neighbours
    assert scores(ref, ref)["n_ref_objects"] == 1.0
    assert scores(ref, ref, connectivity=6)["n_ref_objects"] == 2.0


def test_fields_follow_the_thresholds():
    assert detection.OBJECT_FIELDS == detection.object_fields((0.1, 0.5))
    row = scores(bar(), bar(), iou_thresholds=(0.25,))
    assert tuple(row) == detection.object_fields((0.25,))


@pytest.mark.parametrize(
    "kw",
    [
        {"iou_thresholds": (0.0,)},
        {"iou_thresholds": (0.5, 0.50)},
        {"connectivity": 4},
        {"min_volume_mm3": -1.0},
        {"ref_instances": np.zeros((2, 2, 2), dtype=np.int32)},
    ],
)
def test_bad_arguments_raise_volseg_errors(kw):
    with pytest.raises(VolsegError):
        scores(bar(), bar(), **kw)


def brute_force(pred_ids, ref_ids, n_pred, n_ref, t):
    """tp, merged, split from dense per-object masks and one Hungarian matching of everything."""
    iou = np.zeros((n_pred, n_ref))
    inter = np.zeros((n_pred, n_ref))
    for i in range(n_pred):
        for j in range(n_ref):
            p, r = pred_ids == i + 1, ref_ids == j + 1
            inter[i, j] = np.count_nonzero(p & r)
            iou[i, j] = inter[i, j] / np.count_nonzero(p | r)
    weights = np.where(iou >= t, iou, 0.0)
    rows, cols = linear_sum_assignment(weights, maximize=True)
    tp = int(np.count_nonzero(weights[rows, cols] > 0))
    p_size = np.array([np.count_nonzero(pred_ids == i + 1) for i in range(n_pred)])
    r_size = np.array([np.count_nonzero(ref_ids == j + 1) for j in range(n_ref)])
    merged = int(np.count_nonzero(((inter > 0) & (2 * inter >= r_size[None, :])).sum(axis=1) >= 2))
    split = int(np.count_nonzero(((inter > 0) & (2 * inter >= p_size[:, None])).sum(axis=0) >= 2))
    return tp, merged, split


@pytest.mark.parametrize("seed", range(8))
def test_sparse_overlaps_and_matching_equal_a_dense_brute_force(seed):
    import cc3d

    rng = np.random.default_rng(seed)
    shape = (7, 9, 8)
    pred = (rng.random(shape) < 0.3).astype(np.uint8)
    ref = (rng.random(shape) < 0.3).astype(np.uint8)
    pred_ids, n_pred = cc3d.connected_components(pred, connectivity=6, return_N=True)
    ref_ids, n_ref = cc3d.connected_components(ref, connectivity=6, return_N=True)
    row = scores(pred, ref, connectivity=6, iou_thresholds=(0.1, 0.3, 0.5))
    assert (row["n_pred_objects"], row["n_ref_objects"]) == (n_pred, n_ref)
    for t in (0.1, 0.3, 0.5):
        tp, merged, split = brute_force(pred_ids, ref_ids, n_pred, n_ref, t)
        assert row[f"obj_tp@{t:g}"] == tp
    assert (row["merged"], row["split"]) == (merged, split)


# --------------------------------------------------------------------------------------------------
# report and command line

SPACING = (1.0, 1.0, 3.0)


def save(path, array) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*SPACING, 1.0])), str(path))


def make_folders(tmp_path):
    """case_a: the merge volume (2 ref, 1 pred, tp@0.1 = 1, tp@0.5 = 0) plus a 4-voxel (12 mm³)
    false positive; case_b: the split volume (1 ref, 2 pred, tp = 1 at both thresholds)."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    ref = bar()
    ref[1, 1:3, 0:3] = 1
    ref[1, 1:3, 4:7] = 1
    pred = bar()
    pred[1, 1:3, 0:7] = 1
    pred[0, 0:4, 9] = 1
    save(ref_dir / "case_a.nii.gz", ref)
    save(pred_dir / "case_a.nii.gz", pred)
    ref = bar()
    ref[1, 1:3, 0:8] = 1
    pred = bar()
    pred[1, 1:3, 0:3] = 1
    pred[1, 1:3, 4:8] = 1
    save(ref_dir / "case_b.nii.gz", ref)
    save(pred_dir / "case_b.nii.gz", pred)
    return pred_dir, ref_dir


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_folders_pools_object_counts_over_cases(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    rows = report.evaluate_folders(pred_dir, ref_dir, {1: "lesion"}, out_csv=tmp_path / "m.csv", instances=True)
    by_case = {r["case"]: r for r in rows}
    assert by_case["case_a"]["n_pred_objects"] == 2 and by_case["case_a"]["merged"] == 1
    assert by_case["case_b"]["split"] == 1 and isinstance(by_case["case_b"]["obj_tp@0.5"], int)
    header = list(read_csv(tmp_path / "m.csv")[0])
    assert header == list(report.CSV_COLUMNS + detection.OBJECT_FIELDS)

    objects = report.summarize(read_csv(tmp_path / "m.csv"))["objects"]
    for key in ("1", "all"):
        pooled = objects[key]
        # pred 2 + 2, ref 2 + 1; tp@0.1 = 1 + 1, tp@0.5 = 0 + 1
        assert (pooled["n_pred_objects"], pooled["n_ref_objects"], pooled["n_cases"]) == (4, 3, 2)
        assert pooled["obj_precision@0.1"] == 0.5 and pooled["obj_recall@0.1"] == pytest.approx(2 / 3)
        assert pooled["obj_f1@0.1"] == pytest.approx(4 / 7)
        assert pooled["obj_f1@0.5"] == pytest.approx(2 / 7)
        assert (pooled["merged"], pooled["split"]) == (1, 1)
    assert objects["1"]["label_name"] == "lesion"
    text = report.format_summary(report.summarize(rows))
    assert "F1@0.5" in text and "merged" in text


def test_min_volume_cleans_the_prediction_for_voxel_and_object_scores(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    plain = report.evaluate_folders(pred_dir, ref_dir, {1: "lesion"}, instances=True)
    cleaned = report.evaluate_folders(pred_dir, ref_dir, {1: "lesion"}, instances=True, min_volume_mm3=13.0)
    assert plain[0]["n_pred"] == 14 + 4 and cleaned[0]["n_pred"] == 14  # the 12 mm³ part is gone
    assert cleaned[0]["dice"] > plain[0]["dice"]
    assert cleaned[0]["n_pred_objects"] == 1
    assert cleaned[1]["n_pred_objects"] == 2  # 6 and 8 voxels = 18 and 24 mm³ stay
    kept = report.evaluate_folders(pred_dir, ref_dir, {1: "lesion"}, min_volume_mm3=12.0)
    assert kept[0]["n_pred"] == 18 and "n_pred_objects" not in kept[0]


def test_reference_instances_folder_and_missing_file(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    inst_dir = tmp_path / "instances"
    inst_dir.mkdir()
    instances = np.zeros(bar().shape, dtype=np.int16)
    instances[1, 1:3, 0:4] = 1
    instances[1, 1:3, 4:8] = 2
    save(inst_dir / "case_b.nii.gz", instances)
    with pytest.raises(VolsegError, match="instance map not found") as info:
        report.evaluate_folders(pred_dir, ref_dir, None, ref_instances_dir=inst_dir)
    assert "case_a.nii.gz" in str(info.value.path)
    ref_a = np.asarray(nib.load(str(ref_dir / "case_a.nii.gz")).dataobj)
    save(inst_dir / "case_a.nii.gz", ref_a * 9)  # any ids: one per object
    rows = report.evaluate_folders(pred_dir, ref_dir, None, ref_instances_dir=inst_dir)  # implies instances
    by_case = {r["case"]: r for r in rows}
    assert by_case["case_a"]["n_ref_objects"] == 1  # both objects carry id 9: one instance
    assert by_case["case_b"]["n_ref_objects"] == 2  # two ids in one connected mask
    assert by_case["case_b"]["obj_tp@0.5"] == 2 and by_case["case_b"]["split"] == 0  # IoU 6/8 and 8/8


def test_without_instances_nothing_changes(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    rows = report.evaluate_folders(pred_dir, ref_dir, None, out_csv=tmp_path / "m.csv")
    assert list(read_csv(tmp_path / "m.csv")[0]) == list(report.CSV_COLUMNS)
    summary = report.summarize(rows)
    assert "objects" not in summary and "objects" not in report.format_summary(summary)


def test_cli_evaluate_instances_writes_object_columns_and_pooled_summary(tmp_path):
    from typer.testing import CliRunner

    pred_dir, ref_dir = make_folders(tmp_path)
    out_csv = tmp_path / "eval" / "metrics.csv"
    result = CliRunner().invoke(
        app, ["evaluate", str(pred_dir), str(ref_dir), "-o", str(out_csv), "--no-plot", "--instances",
              "--min-volume-mm3", "13"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "F1@0.1" in result.output
    rows = read_csv(out_csv)
    assert set(detection.OBJECT_FIELDS) <= set(rows[0])
    summary = json.loads(out_csv.with_suffix(".summary.json").read_text())
    pooled = summary["objects"]["all"]
    assert (pooled["n_pred_objects"], pooled["n_ref_objects"]) == (3, 3)  # the 12 mm³ blob dropped
    assert pooled["obj_f1@0.1"] == pytest.approx(2 * 2 / 6)
    assert summary["min_volume_mm3"] == 13.0


def test_merged_ref_counts_every_reference_object_in_a_merge():
    """One prediction swallowing a clump of three reference objects: merged 1, merged_ref 3."""
    ref = np.zeros((1, 3, 15), dtype=np.uint8)
    ref[0, 1, 0:3] = 1
    ref[0, 1, 4:7] = 1
    ref[0, 1, 8:11] = 1
    ref[0, 1, 13:15] = 1  # found alone
    pred = np.zeros_like(ref)
    pred[0, 1, 0:11] = 1
    pred[0, 1, 13:15] = 1
    row = detection.object_scores(pred, ref, (1.0, 1.0, 1.0), [1])[1]
    assert (row["merged"], row["merged_ref"], row["split"]) == (1.0, 3.0, 0.0)
