"""volseg.config: JSON round trip, refused versions and fields, label bookkeeping with an ignore label."""

from __future__ import annotations

import dataclasses
import json

import pytest

from volseg.config import (
    FORMAT_VERSION,
    Config,
    DataConfig,
    InferConfig,
    ModelConfig,
    TrainConfig,
)
from volseg.errors import VolsegError


def sample_config() -> Config:
    """A config with every section away from its defaults, tuples nested two deep included."""
    return Config(
        data=DataConfig(
            channel_names=("t1", "flair"),
            labels=(("background", 0), ("edema", 2), ("tumour", 5), ("unlabelled", 9)),
            ignore_label=9,
            file_ending=".nrrd",
            normalization="zscore_nonzero",
            spacing=(3.0, 0.75, 0.8),
        ),
        model=ModelConfig(in_channels=2, num_classes=3, base_width=4, max_width=12, depth=3, norm="batch", padding="valid"),
        train=TrainConfig(patch_size=(16, 40, 24), batch_size=3, lr=0.02, loss="ce", seed=7, nesterov=False),
        infer=InferConfig(overlap=0.25, blend="uniform", batch_size=1),
    )


def test_json_round_trip_is_equal():
    cfg = sample_config()
    back = Config.from_json(cfg.to_json())
    assert back == cfg
    # tuples come back as tuples (lists would make the frozen dataclass unhashable and unequal)
    assert back.data.labels == (("background", 0), ("edema", 2), ("tumour", 5), ("unlabelled", 9))
    assert isinstance(back.train.patch_size, tuple)
    assert isinstance(back.data.labels[0], tuple)
    assert hash(back) == hash(cfg)


def test_default_config_round_trip():
    assert Config.from_json(Config().to_json()) == Config()
    assert json.loads(Config().to_json())["version"] == FORMAT_VERSION


def test_missing_sections_take_defaults():
    cfg = Config.from_json(json.dumps({"version": FORMAT_VERSION, "model": {"depth": 2}}))
    assert cfg.model == ModelConfig(depth=2)
    assert cfg.data == DataConfig()
    assert cfg.train == TrainConfig()


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None, "1"])
def test_other_version_refused(version):
    raw = json.loads(sample_config().to_json())
    if version is None:
        del raw["version"]
    else:
        raw["version"] = version
    with pytest.raises(VolsegError, match="version") as info:
        Config.from_json(json.dumps(raw), source="run/model.json")
    assert info.value.path == "run/model.json"
    assert str(FORMAT_VERSION) in info.value.problem


@pytest.mark.parametrize("section", ["data", "model", "train", "infer"])
def test_unknown_field_refused(section):
    raw = json.loads(Config().to_json())
    raw[section]["no_such_field"] = 1
    with pytest.raises(VolsegError, match="no_such_field"):
        Config.from_json(json.dumps(raw))


def test_section_of_wrong_type_refused():
    raw = json.loads(Config().to_json())
    raw["model"] = [1, 2, 3]
    with pytest.raises(VolsegError):
        Config.from_json(json.dumps(raw))


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", "3", '"config"'])
def test_wrong_json_refused(text):
    with pytest.raises(VolsegError) as info:
        Config.from_json(text, source="cfg.json")
    assert info.value.path == "cfg.json"
    # one line, so the CLI can print it as is
    assert "\n" not in str(info.value)


def test_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.depth = 3  # type: ignore[misc]


def test_labels_with_ignore():
    data = sample_config().data
    assert data.class_values == (0, 2, 5)
    assert data.num_classes == 3
    assert data.foreground_labels == {2: "edema", 5: "tumour"}


def test_labels_without_ignore_sorted_by_value():
    data = DataConfig(labels=(("liver", 3), ("background", 0), ("vessel", 1)))
    assert data.class_values == (0, 1, 3)
    assert data.num_classes == 3
    assert data.foreground_labels == {1: "vessel", 3: "liver"}


def test_default_labels():
    data = DataConfig()
    assert data.class_values == (0, 1)
    assert data.num_classes == 2
    assert data.foreground_labels == {1: "foreground"}
