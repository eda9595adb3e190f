"""Weight maps in the data pipeline: cached per case, recomputed when their parameters change,
built from instancesTr/ when present, carried into patches, and trained on end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from volseg import layout, volumes
from volseg.config import DataConfig
from volseg.data import instance_file, preprocess_case, sample_batch
from volseg.synthetic import make_touching_objects, write_touching_dataset
from volseg.weights import border_weights

SPEC = {"class_balance": False, "w0": 10.0, "sigma_mm": 2.0}
DATA = DataConfig(labels=(("background", 0), ("object", 1)))


@pytest.fixture(scope="module")
def touching(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_touching_dataset(tmp_path_factory.mktemp("touching") / "ds", n_cases=3, n_test=1,
                                  shape_vox=(24, 24, 20), spacing_mm=(1.0, 1.0, 1.5), n_objects=8)


def test_touching_objects_are_separated_by_a_gap():
    """Objects touch (their instance ids meet across a one-voxel gap) but never share a 26-neighbourhood."""
    import cc3d

    image, label, instances = make_touching_objects((40, 40, 40), rng=np.random.default_rng(3), n_objects=20)
    n = len(np.unique(instances)) - 1
    assert n >= 15
    assert cc3d.connected_components(label, connectivity=26).max() == n  # the label alone separates them
    grown = np.zeros_like(label, dtype=bool)
    from scipy import ndimage

    for k in range(1, n + 1):  # at least one pair is two voxels apart: touching through the gap
        near = ndimage.binary_dilation(instances == k, iterations=2)
        grown |= near & (instances > 0) & (instances != k)
    assert grown.any()
    assert image.shape == (1, 40, 40, 40) and image.dtype == np.float32


def test_weight_map_cached_and_recomputed_when_parameters_change(touching, tmp_path):
    _, cases = layout.read_dataset(touching)
    case = cases[0]
    assert instance_file(case) == touching / "instancesTr" / "case_000.nii.gz"
    cache = tmp_path / "cache"
    first = preprocess_case(case, DATA, cache, SPEC)
    instances = volumes.read_label(instance_file(case)).array[0]
    expected = border_weights(instances, (1.0, 1.0, 1.5), w0=10.0, sigma_mm=2.0) + 1.0
    np.testing.assert_allclose(np.asarray(first.loss_weight), expected, atol=1e-5)
    stamp = (cache / "case_000_wmap.npy").stat().st_mtime_ns
    again = preprocess_case(case, DATA, cache, SPEC)  # same parameters: the cached file is reused
    assert (cache / "case_000_wmap.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.asarray(again.loss_weight), np.asarray(first.loss_weight))
    wider = preprocess_case(case, DATA, cache, {**SPEC, "sigma_mm": 4.0})
    assert np.asarray(wider.loss_weight).sum() > np.asarray(first.loss_weight).sum()
    assert json.loads((cache / "case_000_wmap.json").read_text())["key"] != ""
    plain = preprocess_case(case, DATA, cache)
    assert plain.loss_weight is None


def test_instances_separate_what_connected_components_cannot(tmp_path):
    """Two touching objects with no gap form one component: only the instance file gives a border."""
    image = np.zeros((12, 12, 12), np.float32)
    label = np.zeros((12, 12, 12), np.uint8)
    label[2:10, 2:6, 2:10] = 1
    label[2:10, 6:10, 2:10] = 1
    instances = label.astype(np.int32)
    instances[2:10, 6:10, 2:10] = 2
    root = tmp_path / "ds"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    volumes.write_volume(root / "imagesTr" / "a_0000.nii.gz", image)
    volumes.write_volume(root / "labelsTr" / "a.nii.gz", label)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "x"}, "labels": {"background": 0, "object": 1},
                                                   "file_ending": ".nii.gz"}))
    _, cases = layout.read_dataset(root)
    without = preprocess_case(cases[0], DATA, tmp_path / "c1", SPEC)
    assert np.asarray(without.loss_weight).max() == pytest.approx(1.0)  # one component: no border term
    (root / "instancesTr").mkdir()
    volumes.write_volume(root / "instancesTr" / "a.nii.gz", instances)
    with_inst = preprocess_case(cases[0], DATA, tmp_path / "c2", SPEC)
    w = np.asarray(with_inst.loss_weight)
    assert w.max() > 1.5  # background next to the contact line
    assert np.all(w[label > 0] == 1.0)  # object voxels carry no border term


def test_unlabelled_voxels_keep_weight_zero_and_batches_carry_the_map(touching, tmp_path):
    from volseg.sparsify import sparsify_dataset

    sparse = tmp_path / "sparse"
    sparsify_dataset(touching, sparse, slices_per_axis=1, progress=False)
    info, cases = layout.read_dataset(sparse)
    data = DataConfig(labels=info.labels, ignore_label=info.ignore_label)
    case = preprocess_case(cases[0], data, tmp_path / "cache", {**SPEC, "class_balance": True})
    w = np.asarray(case.loss_weight)
    known = np.asarray(case.weight) > 0
    assert np.all(w[~known] == 0) and np.all(w[known] > 0)
    x, y, wb = sample_batch([case], (16, 16, 16), 4, np.random.default_rng(0), 0.5, mirror=False)
    assert wb.dtype.is_floating_point and float(wb.max()) > 1.0


def test_train_with_border_weighted_bce(touching, tmp_path):
    from typer.testing import CliRunner

    from volseg.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", str(touching), "-o", str(out), "--quiet", "--max-epochs", "1", "--iters-per-epoch", "2",
        "--patch-size", "16,16,16", "--base-width", "4", "--depth", "3", "--loss", "bce", "--border-w0", "10",
        "--border-sigma-mm", "2", "--class-balance", "--members", "1"])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["loss"] == "bce" and cfg["train"]["border_w0"] == 10.0 and cfg["train"]["class_balance"]
    assert list((out / "preprocessed").glob("*_wmap.npy"))
