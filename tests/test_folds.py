"""Cross-validation folds: disjoint, covering, deterministic; bad folds refused."""

import pytest

from volseg.errors import VolsegError
from volseg.train import split_cases


def test_folds_partition_the_cases() -> None:
    ids = [f"case_{i:03d}" for i in range(23)]
    vals = [split_cases(ids, 0.2, seed=3, fold=k, folds=5)[1] for k in range(5)]
    flat = [c for v in vals for c in v]
    assert sorted(flat) == ids and len(set(flat)) == len(ids)
    assert {len(v) for v in vals} <= {4, 5}
    for k in range(5):
        train, val = split_cases(ids, 0.2, seed=3, fold=k, folds=5)
        assert not set(train) & set(val) and sorted(train + val) == ids
    assert split_cases(ids, 0.2, seed=3, fold=1, folds=5) == split_cases(list(reversed(ids)), 0.2, seed=3, fold=1, folds=5)
    assert split_cases(ids, 0.2, seed=4, fold=1, folds=5) != split_cases(ids, 0.2, seed=3, fold=1, folds=5)


@pytest.mark.parametrize("fold,folds,n", [(5, 5, 10), (-1, 5, 10), (0, 1, 10), (0, 5, 3)])
def test_bad_folds_refused(fold: int, folds: int, n: int) -> None:
    with pytest.raises(VolsegError):
        split_cases([str(i) for i in range(n)], 0.2, 0, fold=fold, folds=folds)


def test_ensemble_of_identical_models_equals_one_model(trained_run, tiny_dataset, tmp_path) -> None:
    import numpy as np

    from volseg import volumes
    from volseg.prediction_files import predict_paths

    run = trained_run[0]
    single, double = tmp_path / "single", tmp_path / "double"
    predict_paths(run, tiny_dataset / "imagesTs", single, device="cpu", progress=False)
    predict_paths([run, run / "model_last.safetensors"], tiny_dataset / "imagesTs", double, device="cpu",
                  progress=False)
    for f in sorted(single.iterdir()):
        a, b = volumes.read_label(f).array, volumes.read_label(double / f.name).array
        if (run / "model_best.safetensors").read_bytes() == (run / "model_last.safetensors").read_bytes():
            np.testing.assert_array_equal(a, b)
        assert a.shape == b.shape


def test_ensemble_refuses_models_with_other_labels(trained_run, tiny_dataset, tmp_path) -> None:
    import dataclasses

    import volseg
    from volseg.checkpoint import save_model
    from volseg.prediction_files import predict_paths

    model, cfg = volseg.load_model(trained_run[0])
    other = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, labels=(("background", 0), ("x", 1), ("y", 5))))
    save_model(tmp_path / "other.safetensors", model, other)
    with pytest.raises(VolsegError, match="ensemble"):
        predict_paths([trained_run[0], tmp_path / "other.safetensors"], tiny_dataset / "imagesTs", tmp_path / "o",
                      device="cpu", progress=False)


def test_ensemble_averages_probabilities(trained_run, tiny_dataset) -> None:
    import numpy as np

    import volseg
    from volseg import volumes
    from volseg.inference import predict_volume, probabilities_on_input_grid

    m1, c1 = volseg.load_model(trained_run[0] / "model_best.safetensors")
    m2, c2 = volseg.load_model(trained_run[0] / "model_last.safetensors")
    volume = volumes.read_image(sorted((tiny_dataset / "imagesTs").iterdir())[:1])
    p = probabilities_on_input_grid(m1, c1, volume) + probabilities_on_input_grid(m2, c2, volume)
    expected = np.asarray(c1.data.class_values)[p.argmax(0)]
    np.testing.assert_array_equal(predict_volume([m1, m2], [c1, c2], volume), expected)
