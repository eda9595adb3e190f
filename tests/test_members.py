"""Several models sharing one budget (`volseg train --members`): layout, seeds, resume, prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from volseg import planning
from volseg.checkpoint import MODEL_LAST, TRAIN_STATE, model_paths, read_model_file, resolve_model_path
from volseg.errors import VolsegError
from volseg.inference import load_ensemble
from volseg.train import MEMBERS_JSON, SPLIT_JSON, train


def _train(dataset: Path, out: Path, overrides: dict, **kwargs) -> dict:
    return train(dataset, out, seed=3, device="cpu", max_minutes=4, overrides=overrides, progress=False, **kwargs)


def test_few_cases_plan_two_members_many_cases_one() -> None:
    k, why = planning.plan_members(6)
    assert k == planning.ENSEMBLE_MEMBERS == 2 and "6 cases" in why
    assert planning.plan_members(planning.FEW_CASES)[0] == 1
    assert planning.plan_members(6, requested=3)[0] == 3
    with pytest.raises(VolsegError, match="at least 1"):
        planning.plan_members(6, requested=0)


@pytest.fixture
def two_member_run(tiny_dataset: Path, tiny_overrides: dict, tmp_path: Path) -> tuple[Path, dict]:
    run = tmp_path / "run"
    return run, _train(tiny_dataset, run, tiny_overrides, members=2)


def test_members_train_with_their_own_seed_split_and_share_of_the_budget(two_member_run: tuple[Path, dict]) -> None:
    run, summary = two_member_run
    assert summary["members"] == 2
    state = json.loads((run / MEMBERS_JSON).read_text())
    assert state == {"members": 2, "minutes": 4.0, "seed": 3, "finished": [0, 1]}
    cfgs = [read_model_file(run / f"member_{i}")[1] for i in range(2)]
    assert [c.train.seed for c in cfgs] == [3, 4]
    assert [c.train.max_minutes for c in cfgs] == [2.0, 2.0]
    splits = [json.loads((run / f"member_{i}" / SPLIT_JSON).read_text()) for i in range(2)]
    assert splits[0] != splits[1]  # the seed draws the validation split
    # one preprocessing cache for all members, none inside them
    assert (run / "preprocessed").is_dir()
    assert not any((run / f"member_{i}" / "preprocessed").exists() for i in range(2))
    # the second member ran the first one's plan: same network and patch
    assert cfgs[0].model == cfgs[1].model and cfgs[0].train.patch_size == cfgs[1].train.patch_size


def test_prediction_from_the_run_folder_averages_every_member(two_member_run: tuple[Path, dict]) -> None:
    run, _ = two_member_run
    assert model_paths(run) == [resolve_model_path(run / "member_0"), resolve_model_path(run / "member_1")]
    models, cfgs = load_ensemble(run, torch.device("cpu"))
    assert len(models) == 2 and len(cfgs) == 2
    with pytest.raises(VolsegError, match="several averaged models"):
        resolve_model_path(run)  # one model cannot stand for the run


def test_members_are_listed_in_numeric_order(tmp_path: Path) -> None:
    for i in (10, 2, 0):
        (tmp_path / f"member_{i}").mkdir()
        (tmp_path / f"member_{i}" / MODEL_LAST).write_bytes(b"")
    assert [p.parent.name for p in model_paths(tmp_path)] == ["member_0", "member_2", "member_10"]


def test_a_members_folder_is_not_trained_into_again(two_member_run: tuple[Path, dict], tiny_dataset: Path,
                                                    tiny_overrides: dict) -> None:
    run, _ = two_member_run
    for members in (2, 1):
        with pytest.raises(VolsegError, match="already holds a trained model"):
            _train(tiny_dataset, run, tiny_overrides, members=members)


def test_resume_skips_finished_members_and_trains_the_rest(tiny_dataset: Path, tiny_overrides: dict,
                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    _train(tiny_dataset, run, tiny_overrides, members=2)
    # as if the command died before the second member started
    state = json.loads((run / MEMBERS_JSON).read_text())
    state["finished"] = [0]
    (run / MEMBERS_JSON).write_text(json.dumps(state))
    first = (run / "member_0" / MODEL_LAST).stat().st_mtime_ns
    for name in (run / "member_1").iterdir():
        name.unlink()
    summary = train(tiny_dataset, run, device="cpu", resume=True, progress=False, max_minutes=6)
    assert summary["members"] == 2
    assert (run / "member_0" / MODEL_LAST).stat().st_mtime_ns == first  # untouched
    assert (run / "member_1" / MODEL_LAST).is_file() and (run / "member_1" / TRAIN_STATE).is_file()
    assert json.loads((run / MEMBERS_JSON).read_text())["finished"] == [0, 1]
    resumed = read_model_file(run / "member_1")[1].train
    assert resumed.seed == 4 and resumed.max_minutes == 3.0  # the new budget, shared


def test_an_explicit_fold_trains_one_model(tiny_dataset: Path, tiny_overrides: dict, tmp_path: Path) -> None:
    tiny_overrides["train"]["fold"] = 1
    run = tmp_path / "run"
    summary = train(tiny_dataset, run, seed=0, device="cpu", max_minutes=4, overrides=tiny_overrides, progress=False)
    assert "members" not in summary and (run / MODEL_LAST).is_file() and not (run / MEMBERS_JSON).exists()
