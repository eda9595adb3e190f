"""volseg.train: run folder contents, split, LR schedule, resume, early stopping and refused runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from volseg import layout
from volseg.checkpoint import MODEL_BEST, MODEL_LAST, TRAIN_STATE, read_model_file
from volseg.config import Config, DataConfig, InferConfig, ModelConfig, TrainConfig
from volseg.data import CaseData
from volseg.errors import VolsegError
from volseg.train import (
    BestModel,
    Plateau,
    CONFIG_JSON,
    METRICS_CSV,
    SPLIT_JSON,
    class_frequencies,
    data_config_from_dataset,
    validation_note,
    poly_lr,
    selection_score,
    split_cases,
    train,
    validate,
)

METRIC_COLUMNS = [
    "epoch", "seconds", "lr", "train_loss", "val_loss", "val_dice_1", "val_dice_2", "val_dice", "data_wait_fraction",
]  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / METRICS_CSV, newline="") as fh:
        return list(csv.DictReader(fh))


def short_train(dataset: Path, out: Path, overrides: dict, **kwargs) -> dict:
    kwargs.setdefault("max_minutes", 5)
    kwargs.setdefault("members", 1)  # one model's run folder (five cases would plan two, tests/test_members.py)
    return train(dataset, out, seed=0, device="cpu", overrides=overrides, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------
# the shared two-epoch run


def test_run_folder_holds_models_state_metrics_config_and_split(trained_run, tiny_dataset):
    run_dir, summary = trained_run
    for name in (MODEL_BEST, MODEL_LAST, TRAIN_STATE, METRICS_CSV, CONFIG_JSON, SPLIT_JSON):
        assert (run_dir / name).is_file(), name
    assert summary["epochs"] == 2
    assert summary["stop_reason"] == "max_epochs"
    assert 0.0 <= summary["best_val_dice"] <= 1.0
    assert summary["run_dir"] == str(run_dir)

    cfg = Config.from_json((run_dir / CONFIG_JSON).read_text())
    assert cfg.model.base_width == 4 and cfg.model.depth == 3
    assert cfg.model.in_channels == 1 and cfg.model.num_classes == 3
    assert cfg.train.patch_size == (16, 16, 16) and cfg.train.batch_size == 2
    assert cfg.train.iters_per_epoch == 5 and cfg.train.max_epochs == 2
    assert cfg.data.class_values == (0, 1, 2)
    assert cfg.data.spacing == pytest.approx((1.0, 1.0, 2.0))  # the planner stored the median spacing

    _, model_cfg, extra = read_model_file(run_dir / MODEL_LAST)
    assert model_cfg == cfg  # the model file carries the same config as config.json
    assert extra["epoch"] == 2

    split = json.loads((run_dir / SPLIT_JSON).read_text())
    _, cases = layout.read_dataset(tiny_dataset)
    assert not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == sorted(c.case_id for c in cases)
    assert (split["train"], split["val"]) == split_cases([c.case_id for c in cases], cfg.train.val_fraction, 0)


def test_metrics_csv_has_one_row_per_epoch_with_the_expected_columns(trained_run):
    rows = read_metrics(trained_run[0])
    assert list(rows[0]) == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in ("val_dice", "val_dice_1", "val_dice_2"):
            assert 0.0 <= float(row[key]) <= 1.0
        assert float(row["train_loss"]) > 0 and float(row["val_loss"]) > 0
        assert 0 < float(row["lr"]) <= 0.01
        assert 0 <= float(row["data_wait_fraction"]) <= 1
    assert float(rows[1]["seconds"]) >= float(rows[0]["seconds"])
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])  # poly decay
    assert trained_run[1]["best_val_dice"] == pytest.approx(max(float(r["val_dice"]) for r in rows))


def test_training_into_a_folder_with_a_model_is_refused(trained_run, tiny_dataset, tiny_overrides):
    run_dir, _ = trained_run
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    with pytest.raises(VolsegError, match="already holds a trained model") as info:
        short_train(tiny_dataset, run_dir, tiny_overrides)
    assert "--resume" in info.value.message
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # nothing touched


# ------------------------------------------------------------------------------------------------
# pure helpers


def test_split_cases_is_deterministic_disjoint_and_complete():
    ids = [f"case_{i:03d}" for i in range(10)]
    train_ids, val_ids = split_cases(ids, 0.2, seed=3)
    assert len(val_ids) == 2 and len(train_ids) == 8
    assert not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == ids
    assert split_cases(list(reversed(ids)), 0.2, seed=3) == (train_ids, val_ids)  # order of input irrelevant
    assert split_cases(ids, 0.2, seed=3) == (train_ids, val_ids)
    assert any(split_cases(ids, 0.2, seed=s)[1] != val_ids for s in range(4, 10))  # the seed matters


@pytest.mark.parametrize(("n", "fraction", "n_val"), [(2, 0.2, 1), (5, 0.2, 1), (5, 0.5, 2), (4, 0.99, 3),
                                                     (6, 0.2, 2), (9, 0.1, 2), (20, 0.2, 4)])
def test_split_cases_sizes(n, fraction, n_val):
    train_ids, val_ids = split_cases([f"c{i}" for i in range(n)], fraction, seed=0)
    assert len(val_ids) == n_val and len(train_ids) == n - n_val  # always at least one of each


def test_few_cases_say_what_the_validation_rests_on():
    assert "rough guide" in validation_note(2, 6) and "rough guide" not in validation_note(4, 20)


def _chosen_epoch(dices: list[float], smooth: bool) -> int:
    """The epoch the training loop keeps as model_best for this sequence of validation Dice (every
    epoch in the schedule's last quarter)."""
    return _chosen_epoch_timed([(dice, 1.0) for dice in dices], smooth)


def test_few_cases_choose_the_best_model_on_smoothed_validation_dice():
    # validation Dice of a 10-minute run on the synthetic lesions (2 validation cases): the raw
    # maximum is epoch 3, undertrained; smoothed over epochs the later plateau wins
    dices = [0.576, 0.689, 0.814, 0.773, 0.709, 0.791, 0.729, 0.798, 0.768, 0.775, 0.785, 0.800]
    assert _chosen_epoch(dices, smooth=False) == 3
    assert _chosen_epoch(dices, smooth=True) == 12
    # a real improvement still wins at once, and many cases keep the raw maximum
    assert _chosen_epoch([0.5, 0.6, 0.9], smooth=True) == 3
    assert _chosen_epoch([0.5, 0.9, 0.8], smooth=False) == 2


def _chosen_epoch_timed(epochs: list[tuple[float, float]], smooth: bool) -> int:
    """As `_chosen_epoch` for (Dice, schedule progress at the epoch's end); the last epoch ends the run."""
    return BestModel.replay(epochs, smooth)


def test_few_cases_do_not_keep_an_early_high_learning_rate_epoch():
    # two averaged members of 10-minute lesion runs (2 validation cases, seconds of a 300 s and a
    # 200 s budget): the smoothed score kept epoch 1; the last model scored better on held-out cases
    for epochs in ([(0.594, 58 / 300), (0.503, 285 / 300)], [(0.560, 92 / 200), (0.479, 193 / 200)]):
        assert _chosen_epoch_timed(epochs, smooth=False) == 1  # many validation cases: the raw maximum
        assert _chosen_epoch_timed(epochs, smooth=True) == 2
    # a third member (a 300 s budget): epoch 2 of 3 ended at 61% of the schedule, and its last model
    # scored better on held-out cases too (run mean 0.663 -> 0.711)
    assert _chosen_epoch_timed([(0.509, 42 / 300), (0.627, 182 / 300), (0.518, 296 / 300)], smooth=True) == 3
    # in the schedule's last quarter the smoothed choice still applies ...
    assert _chosen_epoch_timed([(0.3, 0.2), (0.9, 0.8), (0.5, 0.9), (0.5, 1.0)], smooth=True) == 2
    # ... and an epoch before it is never kept, though its lift still carries in the smoothed score
    assert _chosen_epoch_timed([(0.3, 0.2), (0.9, 0.7), (0.5, 0.9), (0.5, 1.0)], smooth=True) == 3
    # ... and a run that stops early (plateau, or its epochs) still gets a model_best: its last epoch
    assert _chosen_epoch_timed([(0.7, 0.1), (0.6, 0.2)], smooth=True) == 2


def test_best_model_keeps_the_raw_dice_of_the_epoch_its_smoothed_score_chose():
    keeper = BestModel(smooth=True)
    assert keeper.update(0.5) and keeper.dice == 0.5
    assert keeper.update(0.9)  # smoothed 0.7 beats 0.5
    assert keeper.best == pytest.approx(selection_score(0.5, 0.9, True)) and keeper.dice == 0.9
    assert not keeper.update(0.6)  # smoothed 0.65 does not
    assert keeper.score == pytest.approx(0.65) and keeper.dice == 0.9


def test_plateau_stops_after_patience_epochs_without_a_min_delta_improvement():
    plateau = Plateau(patience=2, min_delta=0.1)
    for loss in (1.0, 0.95, 0.8):  # 0.95 is within min_delta of 1.0; 0.8 improves
        plateau.update(loss)
    assert (plateau.best_loss, plateau.stale, plateau.stalled) == (0.8, 0, False)
    plateau.update(0.75)
    assert not plateau.stalled
    plateau.update(0.79)
    assert plateau.stalled
    never = Plateau(patience=0, min_delta=0.0)
    for _ in range(50):
        never.update(1.0)
    assert never.stale == 49 and not never.stalled  # the first loss is an improvement


def test_split_cases_single_case_validates_on_itself():
    assert split_cases(["only"], 0.2, seed=0) == (["only"], ["only"])


def test_poly_lr():
    assert poly_lr(0.01, 0.0, 0.9) == 0.01
    assert poly_lr(0.01, 1.0, 0.9) == 0.0
    assert poly_lr(0.02, 0.5, 1.0) == pytest.approx(0.01)
    assert poly_lr(0.01, 0.75, 2.0) == pytest.approx(0.01 * 0.25**2)
    assert poly_lr(0.01, 1.5, 0.9) == 0.0  # clamped past the end
    assert poly_lr(0.01, -0.5, 0.9) == 0.01  # and before the start
    values = [poly_lr(0.01, p, 0.9) for p in np.linspace(0, 1, 11)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_data_config_from_dataset(tiny_dataset):
    info = layout.read_dataset_info(tiny_dataset)
    data = data_config_from_dataset(info)
    assert data.channel_names == ("ch0",)
    assert data.class_values == (0, 1, 2)
    assert data.ignore_label is None and data.file_ending == ".nii.gz"


def test_validate_scores_a_perfect_network_dice_one_and_ignores_unlabelled_voxels():
    """Normalisation 'none' and an image equal to the label: a network copying it is perfect."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(10, 9, 11)).astype(np.uint8)
    weight = np.ones(label.shape, np.uint8)
    weight[:3] = 0
    image = label[None].astype(np.float32)
    image[0, :3] = (image[0, :3] + 1) % 3  # wrong where unlabelled: must not count
    case = CaseData("c", image, label, weight, {}, (1.0, 1.0, 1.0))

    class Copy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 30 * torch.nn.functional.one_hot(x[:, 0].round().long(), 3).permute(0, 4, 1, 2, 3).float()

    data = DataConfig(labels=(("background", 0), ("a", 1), ("b", 2)), normalization="none")
    cfg = Config(data=data, model=ModelConfig(num_classes=3, depth=3), train=TrainConfig(patch_size=(8, 8, 8)),
                 infer=InferConfig(overlap=0.5))
    scores = validate(Copy(), cfg, [case], torch.device("cpu"))
    assert scores["val_dice_1"] == pytest.approx(1.0)
    assert scores["val_dice_2"] == pytest.approx(1.0)
    assert scores["val_dice"] == pytest.approx(1.0)
    assert scores["val_loss"] < 0.05


# ------------------------------------------------------------------------------------------------
# resume, early stopping, time budget, refused settings


def test_resume_continues_an_interrupted_run(tiny_dataset, tiny_overrides, tmp_path):
    """A run stopped after epoch 2 of 3 picks up at epoch 3 and keeps the first rows."""
    out = tmp_path / "run"
    tiny_overrides["train"]["max_epochs"] = 3
    seen: list[int] = []

    def interrupt_after_two(run_dir: Path, row: dict) -> None:
        seen.append(row["epoch"])
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        short_train(tiny_dataset, out, tiny_overrides, on_epoch=interrupt_after_two)
    before = read_metrics(out)
    assert [int(r["epoch"]) for r in before] == [1, 2]

    summary = train(
        tiny_dataset, out, device="cpu", resume=True, progress=False, on_epoch=lambda d, r: seen.append(r["epoch"])
    )

    assert seen == [1, 2, 3]
    assert summary["epochs"] == 3 and summary["stop_reason"] == "max_epochs"
    after = read_metrics(out)
    assert [int(r["epoch"]) for r in after] == [1, 2, 3]
    assert after[:2] == before  # history is kept, not recomputed
    assert read_model_file(out / MODEL_LAST)[2]["epoch"] == 3


def test_resume_with_more_epochs_extends_a_finished_run(tiny_dataset, tiny_overrides, tmp_path):
    """`volseg train --resume --max-epochs 3` after a 2-epoch run trains one more epoch."""
    out = tmp_path / "run"
    short_train(tiny_dataset, out, tiny_overrides)
    assert len(read_metrics(out)) == 2

    summary = train(tiny_dataset, out, device="cpu", resume=True, progress=False,
                    overrides={"train": {"max_epochs": 3}})

    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert summary["epochs"] == 3


def _train_state(run_dir: Path) -> tuple[dict, dict, dict]:
    """(JSON state, all metadata, tensors) of a run's train_state.safetensors."""
    from safetensors import safe_open

    with safe_open(str(run_dir / TRAIN_STATE), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return json.loads(meta["state"]), meta, tensors


def test_train_state_holds_what_resume_reads(trained_run):
    state, _, _ = _train_state(trained_run[0])
    assert set(state) == {"epoch", "spent_s", "best", "stale", "best_loss", "iters", "history", "score",
                          "best_dice", "torch_rng", "world_size"}
    assert state["epoch"] == 2 and [r["epoch"] for r in state["history"]] == [1, 2]
    assert state["best_dice"] == pytest.approx(trained_run[1]["best_val_dice"]) and state["world_size"] == 1


def test_a_state_file_without_the_smoothed_score_still_resumes(trained_run, tiny_dataset, tmp_path):
    """Runs saved before `score` and `best_dice` were kept (`best` was the raw Dice) resume."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    state, meta, tensors = _train_state(run)
    state["best"] = state.pop("best_dice")
    del state["score"]
    save_file(tensors, str(run / TRAIN_STATE), metadata={**meta, "state": json.dumps(state)})

    summary = train(tiny_dataset, run, device="cpu", resume=True, progress=False, overrides={"train": {"max_epochs": 3}})

    rows = read_metrics(run)
    assert summary["epochs"] == 3 and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert summary["best_val_dice"] in [pytest.approx(float(r["val_dice"])) for r in rows]
    assert read_model_file(run / MODEL_BEST)[2]["val_dice"] == pytest.approx(summary["best_val_dice"])


def test_resume_without_training_state_is_refused(tiny_dataset, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with pytest.raises(VolsegError, match="nothing to resume"):
        train(tiny_dataset, out, device="cpu", resume=True, progress=False)
    assert list(out.iterdir()) == []


def test_patience_stops_on_a_plateau(tiny_dataset, tiny_overrides, tmp_path):
    """With a huge min_delta only the first epoch counts as an improvement: patience 1 stops after 2."""
    tiny_overrides["train"].update(max_epochs=6, patience=1, min_delta=1e9)
    epochs: list[int] = []
    summary = short_train(
        tiny_dataset, tmp_path / "run", tiny_overrides, on_epoch=lambda d, r: epochs.append(r["epoch"])
    )
    assert summary["stop_reason"] == "plateau"
    assert summary["epochs"] == 2
    assert epochs == [1, 2]
    assert len(read_metrics(tmp_path / "run")) == 2


def test_time_budget_stops_training(tiny_dataset, tiny_overrides, tmp_path):
    tiny_overrides["train"].update(max_epochs=50, iters_per_epoch=1000)
    summary = short_train(tiny_dataset, tmp_path / "run", tiny_overrides, max_minutes=0.002)
    assert summary["stop_reason"] == "time"
    assert summary["epochs"] == 1
    assert (tmp_path / "run" / MODEL_LAST).is_file()  # a model is saved even when time runs out


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"train": {"bogus_option": 1}}, "unknown train option"),
        ({"model": {"widht": 8}}, "unknown model option"),
        ({"optimiser": {"lr": 0.1}}, "unknown config section"),
    ],
)
def test_unknown_override_is_refused(tiny_dataset, tiny_overrides, tmp_path, overrides, match):
    for section, values in overrides.items():
        tiny_overrides.setdefault(section, {}).update(values)
    with pytest.raises(VolsegError, match=match):
        short_train(tiny_dataset, tmp_path / "run", tiny_overrides)
    assert not (tmp_path / "run" / MODEL_LAST).exists()


def test_patch_the_network_cannot_take_is_refused_before_training(tiny_dataset, tiny_overrides, tmp_path):
    tiny_overrides["train"]["patch_size"] = (16, 14, 16)  # 14 is not a multiple of 2**(depth-1) = 4
    with pytest.raises(VolsegError, match="does not fit"):
        short_train(tiny_dataset, tmp_path / "run", tiny_overrides)
    assert not (tmp_path / "run" / MODEL_LAST).exists()


def test_dataset_with_an_unlabelled_case_is_refused(tiny_dataset, tiny_overrides, tmp_path):
    dataset = tmp_path / "ds"
    shutil.copytree(tiny_dataset, dataset)
    (dataset / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(VolsegError, match="label"):
        short_train(dataset, tmp_path / "run", tiny_overrides)


def test_class_frequencies_count_labelled_voxels_only():
    """Sparse cases: voxels with weight 0 (unlabelled) do not count towards the class prior."""
    label = np.zeros((4, 3, 2), np.uint8)
    label[0] = 1  # 6 voxels of class 1 in row 0
    label[3, 0, 0] = 2
    weight = np.ones_like(label)
    weight[1:3] = 0  # 12 unlabelled background voxels
    case = CaseData("c", np.zeros((1, 4, 3, 2), np.float32), label, weight, {}, (1.0, 1.0, 1.0))
    dense = CaseData("d", np.zeros((1, 1, 1, 2), np.float32), np.array([[[0, 2]]], np.uint8), None, {}, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(class_frequencies([case, dense], 3), np.array([6, 6, 2]) / 14)


def spy_on_grad_scalers(monkeypatch) -> tuple[list[torch.amp.GradScaler], list[float]]:
    """The GradScalers training makes, and the scale at each optimiser step (0 when disabled)."""
    made: list[torch.amp.GradScaler] = []
    steps: list[float] = []

    class SpyScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def step(self, optimizer, *args, **kwargs):
            steps.append(self.get_scale() if self.is_enabled() else 0.0)
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    return made, steps


def test_fp16_autocast_trains_through_a_grad_scaler(tiny_dataset, tiny_overrides, tmp_path, monkeypatch):
    """GPUs without bf16 (T4, V100) train under fp16 autocast, which needs loss scaling; forced here on the CPU."""
    import volseg.train as train_module

    made, steps = spy_on_grad_scalers(monkeypatch)
    monkeypatch.setattr(train_module, "autocast_dtype", lambda dev: torch.float16)
    tiny_overrides["train"].update(max_epochs=1, iters_per_epoch=3)
    short_train(tiny_dataset, tmp_path / "run", tiny_overrides)
    assert len(made) == 1 and made[0].is_enabled()
    assert len(steps) == 3 and all(s > 0 for s in steps)  # every step went through the scaler
    rows = read_metrics(tmp_path / "run")
    assert np.isfinite(float(rows[0]["train_loss"])) and np.isfinite(float(rows[0]["val_loss"]))
    tensors, _, _ = read_model_file(tmp_path / "run" / MODEL_LAST)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


def test_fp32_training_keeps_the_grad_scaler_off(tiny_dataset, tiny_overrides, tmp_path, monkeypatch):
    made, steps = spy_on_grad_scalers(monkeypatch)
    tiny_overrides["train"].update(max_epochs=1, iters_per_epoch=2)
    short_train(tiny_dataset, tmp_path / "run", tiny_overrides)
    assert len(made) == 1 and not made[0].is_enabled()
    assert steps == [0.0, 0.0]


def test_deep_supervision_trains_and_predicts_with_the_main_head(tiny_dataset, tiny_overrides, tmp_path):
    from volseg.checkpoint import load_model

    tiny_overrides["model"].update(depth=4, deep_supervision=True)
    tiny_overrides["train"].update(max_epochs=1, iters_per_epoch=3)
    short_train(tiny_dataset, tmp_path / "run", tiny_overrides)
    rows = read_metrics(tmp_path / "run")
    assert np.isfinite(float(rows[0]["train_loss"])) and 0 <= float(rows[0]["val_dice"]) <= 1
    tensors, cfg, _ = read_model_file(tmp_path / "run" / MODEL_LAST)
    assert cfg.model.deep_supervision and "aux_heads.0.weight" in tensors
    net = load_model(tmp_path / "run" / MODEL_LAST, torch.device("cpu"))[0]
    assert tuple(net(torch.zeros(1, 1, 16, 16, 16)).shape) == (1, 3, 16, 16, 16)


def test_unset_width_is_fitted_to_the_budget_and_recorded(tiny_dataset, tiny_overrides, tmp_path, monkeypatch):
    import volseg.memory as memory

    timed: list[int] = []

    def fake_step_seconds(cfg, device, amp_dtype=None):
        timed.append(cfg.model.base_width)
        # 0.9 * 60 s: width 16 gets 5,400 steps (below MIN_STEPS), width 8 gets 10,800, so it halves
        return 0.01 if cfg.model.base_width >= 16 else 0.005

    monkeypatch.setattr(memory, "step_seconds", fake_step_seconds)
    del tiny_overrides["model"]["base_width"]
    tiny_overrides["train"].update(max_epochs=1, iters_per_epoch=2)
    short_train(tiny_dataset, tmp_path / "run", tiny_overrides, max_minutes=1)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert timed[0] > timed[-1] == memory.MIN_WIDTH
    assert plan["config"]["model"]["base_width"] == memory.MIN_WIDTH
    assert plan["fingerprint"]["budget_steps"] == 10800 and plan["fingerprint"]["min_steps"] == memory.MIN_STEPS
    # a width chosen by the user is not second-guessed
    timed.clear()
    tiny_overrides["model"]["base_width"] = 4
    short_train(tiny_dataset, tmp_path / "run2", tiny_overrides, max_minutes=1)
    assert timed == []
