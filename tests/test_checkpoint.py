"""volseg.checkpoint: safetensors round trips, pickles refused unread, atomic writes, exact resume."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

import volseg.checkpoint as vckpt
from volseg.checkpoint import (
    MODEL_BEST,
    MODEL_LAST,
    load_model,
    load_train_state,
    read_model_file,
    resolve_model_path,
    save_model,
    save_train_state,
)
from volseg.config import FORMAT_VERSION, Config, DataConfig, ModelConfig, TrainConfig
from volseg.errors import VolsegError
from volseg.model import UNet3d


def tiny_config(**model) -> Config:
    base = {"in_channels": 2, "num_classes": 3, "base_width": 2, "max_width": 4, "depth": 2, "norm": "batch"}
    return Config(
        data=DataConfig(
            channel_names=("t1", "t2"),
            labels=(("background", 0), ("a", 1), ("b", 4), ("ignore", 9)),
            ignore_label=9,
            spacing=(2.5, 0.7, 0.7),
        ),
        model=ModelConfig(**{**base, **model}),
        train=TrainConfig(patch_size=(8, 12, 4), batch_size=1, seed=3),
    )


def trained_model(cfg: Config, seed: int = 0) -> UNet3d:
    """A network whose batch-norm running statistics have moved away from their initial values."""
    torch.manual_seed(seed)
    net = UNet3d(cfg.model)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(2, cfg.model.in_channels, 8, 12, 4) * 3 + 1)
    return net.eval()


def test_save_load_round_trip(tmp_path):
    cfg = tiny_config()
    net = trained_model(cfg)
    path = tmp_path / "run" / "model.safetensors"  # parent folder does not exist yet
    save_model(path, net, cfg, extra={"epoch": 7, "val_dice": [0.5, 0.25]})
    loaded, cfg_back = load_model(path)
    assert cfg_back == cfg
    assert isinstance(loaded, UNet3d)
    assert not loaded.training
    x = torch.randn(1, 2, 8, 12, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    for (name, a), (name_b, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b
        assert torch.equal(a, b), name  # running statistics and counters included
    tensors, cfg_read, extra = read_model_file(path)
    assert cfg_read == cfg
    assert extra == {"epoch": 7, "val_dice": [0.5, 0.25]}
    assert set(tensors) == set(net.state_dict())


def test_extra_defaults_to_empty(tmp_path):
    cfg = tiny_config(norm="instance")
    save_model(tmp_path / "m.safetensors", UNet3d(cfg.model), cfg)
    assert read_model_file(tmp_path / "m.safetensors")[2] == {}


def test_file_is_plain_safetensors_with_json_config(tmp_path):
    """Anyone can read the model with the safetensors library alone; the config is in the header."""
    cfg = tiny_config()
    save_model(tmp_path / "m.safetensors", trained_model(cfg), cfg)
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert Config.from_json(next(v for v in meta.values() if '"version"' in v)) == cfg
    assert "head.weight" in keys


def test_ddp_wrapper_is_unwrapped(tmp_path):
    cfg = tiny_config()
    net = trained_model(cfg)

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: the net sits in .module
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    save_model(tmp_path / "m.safetensors", Wrapper(net), cfg)
    tensors, _, _ = read_model_file(tmp_path / "m.safetensors")
    assert set(tensors) == set(net.state_dict())


def test_run_folder_resolves_best_then_last(tmp_path):
    cfg = tiny_config()
    run = tmp_path / "run"
    with pytest.raises(VolsegError, match="no model"):
        resolve_model_path(run.parent)  # an existing folder without a model
    save_model(run / MODEL_LAST, trained_model(cfg, seed=1), cfg, extra={"which": "last"})
    assert resolve_model_path(run) == run / MODEL_LAST
    assert read_model_file(run)[2] == {"which": "last"}
    save_model(run / MODEL_BEST, trained_model(cfg, seed=2), cfg, extra={"which": "best"})
    assert resolve_model_path(run) == run / MODEL_BEST
    assert read_model_file(run)[2] == {"which": "best"}
    model, _ = load_model(run)
    best, _ = load_model(run / MODEL_BEST)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), best.state_dict().values()))
    assert resolve_model_path(run / MODEL_LAST) == run / MODEL_LAST


def test_missing_file_refused(tmp_path):
    with pytest.raises(VolsegError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


class _Payload:
    """Unpickling this object opens (creates) the marker file: proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_payload_is_real(tmp_path):
    """Control: the payload used below does run when unpickled, so its absence later means something."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps({"w": _Payload(marker)}, protocol=4))["w"].close()
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torch_zip", "torch_legacy"])
def test_torch_pickle_refused_without_running_it(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_best.safetensors"  # a pickle with the expected name
    obj = {"state_dict": {"head.weight": torch.zeros(3)}, "evil": _Payload(marker)}
    torch.save(obj, path, _use_new_zipfile_serialization=(kind == "torch_zip"))
    for load in (load_model, read_model_file, lambda p: resolve_model_path(p.parent) and load_model(p.parent)):
        with pytest.raises(VolsegError, match="pickle") as info:
            load(path)
        assert "\n" not in str(info.value)
    with pytest.raises(VolsegError, match="pickle"):
        load_train_state(path, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_raw_pickle_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"evil": _Payload(marker)}, protocol=protocol))
    with pytest.raises(VolsegError, match="pickle"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocol_pickle_refused_without_running_it(tmp_path, protocol):
    """Protocols 0 and 1 have no magic bytes, but are still never unpickled."""
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"evil": _Payload(marker)}, protocol=protocol))
    with pytest.raises(VolsegError):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["half", "header_only", "eight_bytes", "empty", "garbage"])
def test_corrupt_safetensors_refused(tmp_path, how):
    cfg = tiny_config()
    good = tmp_path / "good.safetensors"
    save_model(good, trained_model(cfg), cfg)
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(
        {
            "half": data[: len(data) // 2],
            "header_only": data[: 8 + header_len],
            "eight_bytes": data[:8],
            "empty": b"",
            "garbage": bytes(range(256)) * 4,
        }[how]
    )
    with pytest.raises(VolsegError) as info:
        load_model(bad)
    assert info.value.path == str(bad)


def write_with_config_text(path: Path, config_text: str) -> None:
    """A model file whose config JSON was edited, e.g. written by a future volseg."""
    cfg = tiny_config()
    save_model(path, trained_model(cfg), cfg)
    tensors, _, _ = read_model_file(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    key = next(k for k, v in meta.items() if v == cfg.to_json())
    meta[key] = config_text
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def test_other_format_version_refused(tmp_path):
    raw = json.loads(tiny_config().to_json())
    raw["version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.safetensors"
    write_with_config_text(path, json.dumps(raw))
    with pytest.raises(VolsegError, match="version") as info:
        load_model(path)
    assert str(FORMAT_VERSION + 1) in str(info.value)
    assert info.value.path == str(path)


def test_safetensors_without_config_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(VolsegError, match="config"):
        load_model(path)


def test_weights_not_matching_config_names_refused(tmp_path):
    """Tensors of a depth-2 network under a depth-3 config: keys are missing."""
    cfg = tiny_config()
    path = tmp_path / "m.safetensors"
    save_model(path, trained_model(cfg), tiny_config(depth=3))
    with pytest.raises(VolsegError) as info:
        load_model(path)
    assert info.value.path == str(path)


def test_weights_not_matching_config_shapes_refused(tmp_path):
    """Same tensor names, other widths: the file contradicts its own config, which is bad input."""
    cfg = tiny_config()
    path = tmp_path / "m.safetensors"
    save_model(path, trained_model(cfg), tiny_config(base_width=3, max_width=6))
    with pytest.raises(VolsegError) as info:
        load_model(path)
    assert info.value.path == str(path)


def sgd_setup(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return net, opt


def sgd_step(net, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=g)
    y = torch.randn(6, 2, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.step()


def test_train_state_round_trip_restores_momentum(tmp_path):
    net, opt = sgd_setup()
    sgd_step(net, opt, seed=1)
    sgd_step(net, opt, seed=2)
    rng_state = torch.get_rng_state()
    extra_tensors = {"torch_rng": rng_state, "best_scores": torch.tensor([0.1, 0.7], dtype=torch.float64)}
    state = {"epoch": 2, "best_val_loss": 0.375, "history": [1.0, 0.5], "numpy_rng": {"state": [1, 2, 3]}}
    path = tmp_path / "run" / "train_state.safetensors"
    save_train_state(path, opt, state, extra_tensors)

    # a fresh process: same parameters (from the model file), new optimizer with other settings
    net2, _ = sgd_setup(seed=99)
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.SGD(net2.parameters(), lr=1.0, momentum=0.5)
    state_back, tensors_back = load_train_state(path, opt2)

    assert state_back == state
    assert set(tensors_back) == set(extra_tensors)
    for key, value in extra_tensors.items():
        assert tensors_back[key].dtype == value.dtype
        assert torch.equal(tensors_back[key], value)

    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    assert sd1["state"].keys() == sd2["state"].keys() and len(sd1["state"]) == 4
    for pid, pstate in sd1["state"].items():
        assert pstate.keys() == sd2["state"][pid].keys()
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sd2["state"][pid][key]), (pid, key)
            else:
                assert value == sd2["state"][pid][key], (pid, key)

    # the next step is bit-identical to the uninterrupted run
    sgd_step(net, opt, seed=3)
    sgd_step(net2, opt2, seed=3)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_train_state_round_trip_adam(tmp_path):
    """Adam keeps a tensor `step` and two moment buffers per parameter."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for seed in (1, 2):
        x_step = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        net(x_step).square().mean().backward()
        opt.step()
    save_train_state(tmp_path / "s.safetensors", opt, {"epoch": 1}, {})
    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.5)
    load_train_state(tmp_path / "s.safetensors", opt2)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)


def test_model_file_is_not_a_train_state(tmp_path):
    cfg = tiny_config()
    save_model(tmp_path / "m.safetensors", trained_model(cfg), cfg)
    _, opt = sgd_setup()
    with pytest.raises(VolsegError, match="training-state"):
        load_train_state(tmp_path / "m.safetensors", opt)


class _Boom(Exception):
    pass


def test_save_is_atomic(tmp_path, monkeypatch):
    cfg = tiny_config()
    path = tmp_path / "run" / MODEL_BEST
    save_model(path, trained_model(cfg, seed=1), cfg, extra={"epoch": 1})
    before = path.read_bytes()
    calls = []

    def half_write_then_crash(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"partial")
        raise _Boom("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write_then_crash)
    monkeypatch.setattr(vckpt, "save_file", half_write_then_crash, raising=False)
    with pytest.raises((_Boom, VolsegError)):
        save_model(path, trained_model(cfg, seed=2), cfg, extra={"epoch": 2})
    assert calls and Path(calls[0]) != path  # it wrote somewhere else first
    assert path.read_bytes() == before  # the previous model is untouched
    assert sorted(os.listdir(path.parent)) == [MODEL_BEST]  # and no temporary file is left behind
    assert read_model_file(path)[2] == {"epoch": 1}

    _, opt = sgd_setup()
    with pytest.raises((_Boom, VolsegError)):
        save_train_state(path.parent / "train_state.safetensors", opt, {"epoch": 2}, {})
    assert sorted(os.listdir(path.parent)) == [MODEL_BEST]


def test_save_overwrites_existing(tmp_path):
    cfg = tiny_config()
    path = tmp_path / MODEL_LAST
    save_model(path, trained_model(cfg, seed=1), cfg, extra={"epoch": 1})
    save_model(path, trained_model(cfg, seed=2), cfg, extra={"epoch": 2})
    assert read_model_file(path)[2] == {"epoch": 2}
    assert sorted(os.listdir(tmp_path)) == [MODEL_LAST]


def test_weights_missing_a_tensor_refused(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "m.safetensors"
    save_model(path, trained_model(cfg), cfg)
    tensors, _, _ = read_model_file(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    del tensors["head.bias"]
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with pytest.raises(VolsegError, match="missing 1"):
        load_model(path)
