"""Sparse annotation end to end: sparsify, labelled-only sampling, dense validation, ignore in losses."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volseg import layout, volumes
from volseg.cli import main
from volseg.config import DataConfig
from volseg.data import preprocess_case, sample_patch
from volseg.errors import VolsegError
from volseg.preprocessing import slice_indices, sparse_slice_mask
from volseg.sparsify import DENSE_LABELS, sparsify_dataset


def test_slice_indices_even_and_random() -> None:
    assert slice_indices(10, 1, "even") == [5]
    assert slice_indices(10, 2, "even") == [2, 7]
    assert slice_indices(3, 10, "even") == [0, 1, 2]  # more slices than the axis has: all of them
    picks = slice_indices(50, 5, "random", np.random.default_rng(1))
    assert len(picks) == 5 and len(set(picks)) == 5 and all(0 <= p < 50 for p in picks)
    with pytest.raises(VolsegError, match="strategy"):
        slice_indices(10, 1, "diagonal")


def test_sparse_mask_is_whole_orthogonal_slices() -> None:
    shape = (10, 12, 8)
    mask = sparse_slice_mask(shape, slices_per_axis=1)
    # exactly the union of the three middle planes
    expected = np.zeros(shape, bool)
    expected[5], expected[:, 6], expected[:, :, 4] = True, True, True
    np.testing.assert_array_equal(mask, expected)
    axial = sparse_slice_mask(shape, slices_per_axis=2, axes=(2,))
    assert axial.sum() == 2 * 10 * 12
    assert sorted(np.flatnonzero(axial.any(axis=(0, 1)))) == [2, 6]
    frac = sparse_slice_mask((20, 20, 20), fraction=0.1, axes=(0,))
    assert frac.mean() == pytest.approx(0.1)
    with pytest.raises(VolsegError):
        sparse_slice_mask(shape)
    with pytest.raises(VolsegError):
        sparse_slice_mask(shape, slices_per_axis=1, axes=(3,))


def test_sparsify_dataset_writes_ignore_label_and_dense_copy(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    result = sparsify_dataset(tiny_dataset, out, slices_per_axis=1, progress=False)
    info, cases = layout.read_dataset(out)
    assert info.ignore_label == 3 and dict(info.labels)["ignore"] == 3
    assert layout.check_dataset(out) == []
    total = labelled = 0
    for case in cases:
        sparse = volumes.read_label(case.label).array[0]
        dense = volumes.read_label(out / DENSE_LABELS / case.label.name).array[0]
        keep = sparse != 3
        # labelled voxels keep their dense value; unlabelled ones are exactly the non-slice voxels
        np.testing.assert_array_equal(sparse[keep], dense[keep])
        np.testing.assert_array_equal(keep, sparse_slice_mask(sparse.shape, slices_per_axis=1))
        # geometry unchanged
        np.testing.assert_allclose(volumes.read_label(case.label).affine, volumes.read_volume(case.images[0]).affine)
        total += keep.size
        labelled += keep.sum()
    assert result["labelled_fraction"] == pytest.approx(labelled / total)
    meta = json.loads((out / "dataset.json").read_text())["sparsify"]
    assert meta["slices_per_axis"] == 1 and meta["labelled_fraction"] == pytest.approx(result["labelled_fraction"])
    assert (out / "imagesTr").is_dir() and all(p.is_symlink() for p in (out / "imagesTr").iterdir())


def test_sparsify_refuses_existing_output_and_leaves_no_temp(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    out.mkdir()
    with pytest.raises(VolsegError, match="exists"):
        sparsify_dataset(tiny_dataset, out, slices_per_axis=1, progress=False)
    sparsify_dataset(tiny_dataset, out, slices_per_axis=2, overwrite=True, progress=False, copy_images=True)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert not any(p.is_symlink() for p in (out / "imagesTr").iterdir())


def test_sparsify_cli_reports_fraction(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as ok:
        main(["sparsify", str(tiny_dataset), "-o", str(tmp_path / "s"), "--slices-per-axis", "2", "--axes", "0,2"])
    assert ok.value.code == 0
    out = capsys.readouterr().out
    assert "% of voxels labelled" in out
    with pytest.raises(SystemExit) as exc:
        main(["sparsify", str(tiny_dataset), "-o", str(tmp_path / "t")])
    assert exc.value.code == 2


def test_every_sparse_patch_holds_labelled_voxels(tmp_path: Path) -> None:
    """A large volume with one labelled slice: random patches would mostly miss it; ours never do."""
    shape = (64, 64, 64)
    label = np.full(shape, 2, np.uint8)  # 2 = ignore
    label[:, :, 40] = 0
    label[20:30, 20:30, 40] = 1
    root = tmp_path / "ds"
    volumes.write_volume(root / "imagesTr" / "a_0000.nii.gz", np.random.default_rng(0).normal(size=shape).astype(np.float32))
    volumes.write_volume(root / "labelsTr" / "a.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "x"}, "labels": {"background": 0, "fg": 1, "ignore": 2}, "file_ending": ".nii.gz"}))
    info, cases = layout.read_dataset(root)
    data = DataConfig(channel_names=info.channel_names, labels=info.labels, ignore_label=info.ignore_label)
    case = preprocess_case(cases[0], data, tmp_path / "cache")
    assert case.weight is not None and case.labelled_voxels is not None
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, y, w = sample_patch(case, (16, 16, 16), rng, force_fg=False, mirror=True)
        assert w.sum() > 0
    for _ in range(20):
        _, y, w = sample_patch(case, (16, 16, 16), rng, force_fg=True, mirror=False)
        assert ((y == 1) & (w > 0)).any()


def test_training_on_sparse_labels_reports_dense_dice(tiny_dataset: Path, tmp_path: Path, tiny_overrides: dict) -> None:
    from volseg.train import METRICS_CSV, train

    sparse = tmp_path / "sparse"
    sparsify_dataset(tiny_dataset, sparse, slices_per_axis=2, progress=False)
    summary = train(sparse, tmp_path / "run", max_minutes=5, device="cpu", overrides=tiny_overrides, progress=False, members=1)
    assert summary["epochs"] == 2
    header = (tmp_path / "run" / METRICS_CSV).read_text().splitlines()[0].split(",")
    assert "val_dense_dice" in header and "val_dice" in header
    # the model predicts dense labels only (never the ignore value)
    from volseg.prediction_files import predict_paths

    pred = tmp_path / "pred"
    predict_paths(tmp_path / "run", tiny_dataset / "imagesTs", pred, device="cpu", progress=False)
    for f in pred.iterdir():
        values = set(np.unique(np.asarray(nib.load(f).dataobj)).tolist())
        assert values <= {0, 1, 2}


def test_evaluate_against_sparse_reference_scores_labelled_voxels_only(tmp_path: Path) -> None:
    from volseg.report import evaluate_folders

    ref = np.full((10, 10, 10), 9, np.uint8)  # 9 = ignore
    ref[:, :, 5] = 0
    ref[2:6, 2:6, 5] = 1
    pred = np.zeros((10, 10, 10), np.uint8)
    pred[2:6, 2:6, :] = 1  # right on the labelled slice; the rest is unlabelled and must not count
    volumes.write_volume(tmp_path / "ref" / "a.nii.gz", ref)
    volumes.write_volume(tmp_path / "pred" / "a.nii.gz", pred)
    rows = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "fg"}, ignore_label=9)
    assert rows[0]["dice"] == pytest.approx(1.0) and rows[0]["n_pred"] == 16
    plain = evaluate_folders(tmp_path / "pred", tmp_path / "ref", {1: "fg"})
    assert plain[0]["dice"] < 0.2  # without the ignore label, the unlabelled voxels count as misses
