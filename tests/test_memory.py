"""volseg.memory: the counted training memory against a real step, its bound, and plans fitted to a device."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from volseg.config import Config, DataConfig, InferConfig, ModelConfig, TrainConfig
from volseg.errors import VolsegError
from volseg.memory import (
    MIN_STEPS,
    MIN_WIDTH,
    activation_bytes,
    fit_to_memory,
    fit_width_to_time,
    step_bytes,
    step_bytes_bound,
    step_seconds,
)
from volseg.model import UNet3d, size_divisor
from volseg.planning import make_device_plan

GIB = 2**30
LABELS = (("background", 0), ("a", 1), ("b", 2))


def config(width: int = 32, depth: int = 5, patch=(160, 160, 160), batch: int = 2, spacing=(1.0, 1.0, 1.0)) -> Config:
    return Config(
        data=DataConfig(channel_names=("MRI",), labels=LABELS, spacing=spacing),
        model=ModelConfig(in_channels=1, num_classes=3, base_width=width, depth=depth),
        train=TrainConfig(patch_size=patch, batch_size=batch),
        infer=InferConfig(),
    )


def test_meta_count_equals_the_tensors_a_real_forward_saves():
    cfg = ModelConfig(in_channels=2, num_classes=3, base_width=4, depth=3)
    torch.manual_seed(0)
    net = UNet3d(cfg)
    saved: dict[int, int] = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(torch.randn(2, 2, 16, 24, 16, requires_grad=True))
    real = sum(saved.values()) + 5 * out.numel() * out.element_size()
    assert activation_bytes(cfg, (16, 24, 16), 2) == real


def test_activations_grow_linearly_with_the_batch():
    cfg = ModelConfig(in_channels=1, num_classes=3, base_width=8, depth=4)
    one, two, three = (activation_bytes(cfg, (32, 40, 32), b) for b in (1, 2, 3))
    assert three - two == two - one > 0


@pytest.mark.parametrize(("width", "depth", "max_width", "patch", "batch", "classes"), [
    (16, 4, 256, (40, 56, 40), 2, 3), (4, 3, 256, (16, 16, 16), 2, 3), (32, 5, 320, (32, 32, 32), 2, 3),
    (64, 5, 512, (32, 32, 32), 2, 3), (16, 3, 256, (8, 8, 8), 2, 3), (8, 4, 256, (32, 32, 32), 4, 40),
])  # fmt: skip
def test_the_cheap_bound_is_above_the_count(width, depth, max_width, patch, batch, classes):
    cfg = ModelConfig(in_channels=1, num_classes=classes, base_width=width, max_width=max_width, depth=depth)
    exact = step_bytes(cfg, patch, batch)
    assert exact < step_bytes_bound(cfg, patch, batch) < 6 * exact


def test_count_is_within_2x_of_a_real_cpu_steps_peak():
    """One real training step in a fresh process: its peak resident memory growth against `step_bytes`.

    The peak is the kernel's VmHWM, reset just before the step (`/proc/self/clear_refs`); ru_maxrss
    would not do, as Linux carries it over from the parent (a big pytest process) across exec.
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    code = (
        "import torch\n"
        "from volseg.config import ModelConfig\nfrom volseg.model import UNet3d\n"
        "from volseg.memory import step_bytes\nfrom volseg.losses import get_loss\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))\n"
        "torch.set_num_threads(1)\n"
        "m = ModelConfig(in_channels=1, num_classes=3, base_width=16, depth=4)\n"
        "est = step_bytes(m, (48, 48, 48), 2)\n"
        "net = UNet3d(m); opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99)\n"
        "x = torch.randn(2, 1, 48, 48, 48); y = torch.randint(0, 3, (2, 48, 48, 48)); w = torch.ones(2, 48, 48, 48)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = status('VmRSS:')\n"
        "loss = get_loss('dice_ce')(net(x), y, w); opt.zero_grad(); loss.backward(); opt.step()\n"
        "print((status('VmHWM:') - base) / est)\n"
    )
    ratio = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 timeout=120).stdout)  # fmt: skip
    assert 0.8 < ratio < 2.0, ratio


def test_a_plan_that_fits_is_kept_without_counting():
    cfg = config(width=16, depth=4, patch=(40, 56, 40), batch=2)
    fitted, info = fit_to_memory(cfg, 24 * GIB, "cpu")
    assert fitted == cfg
    assert info["device_memory_gib"] == 24 and "step_memory_bound_gib" in info and "step_memory_gib" not in info


def test_unknown_memory_keeps_the_plan():
    cfg = config()
    assert fit_to_memory(cfg, None, "cuda") == (cfg, {})


def test_batch_is_lowered_to_the_largest_that_fits():
    cfg = config(width=32, depth=4, patch=(40, 56, 40), batch=16)
    need16 = step_bytes(cfg.model, (40, 56, 40), 16)
    memory = int(need16 / 2 / 0.7)  # room for about half the batch
    fitted, info = fit_to_memory(cfg, memory, "cuda")
    b = fitted.train.batch_size
    assert fitted.train.patch_size == (40, 56, 40) and 2 <= b < 16
    assert step_bytes(cfg.model, (40, 56, 40), b) <= 0.7 * memory < step_bytes(cfg.model, (40, 56, 40), b + 1)
    assert info["step_memory_gib"] <= info["step_memory_budget_gib"]


@pytest.mark.parametrize("gib", [8, 4])
def test_patch_shrinks_along_the_physically_longest_axis_until_a_step_fits(gib):
    cfg = config(patch=(160, 160, 160), batch=2, spacing=(2.0, 1.0, 1.0))
    fitted, info = fit_to_memory(cfg, gib * GIB, "cuda")
    patch = fitted.train.patch_size
    assert fitted.train.batch_size == 2
    assert step_bytes(cfg.model, patch, 2) <= 0.7 * gib * GIB
    assert all(p % d == 0 for p, d in zip(patch, size_divisor(cfg.model)))
    assert patch[0] < 160 and patch[0] * 2.0 >= max(patch[1], patch[2]) - size_divisor(cfg.model)[0]  # thick axis first
    assert dataclasses.replace(fitted, train=cfg.train) == cfg  # nothing else changed


def test_a_device_too_small_for_any_patch_is_a_clear_error():
    with pytest.raises(VolsegError, match="narrower or shallower"):
        fit_to_memory(config(), 1 * 2**20, "cuda")


def test_device_plan_records_the_memory_in_the_fingerprint(tiny_dataset):
    from volseg import layout
    from volseg.planning import data_config_from_dataset

    info, cases = layout.read_dataset(tiny_dataset)
    cfg, fingerprint = make_device_plan(data_config_from_dataset(info), cases, torch.device("cpu"))
    assert fingerprint["device"] == "cpu" and fingerprint["device_memory_gib"] > 0
    assert fingerprint["step_memory_bound_gib"] <= fingerprint["step_memory_budget_gib"]


# ---- width fitted to the time budget ----------------------------------------------------------------

def _timer_by_width(seconds_at: dict[int, float]):
    calls: list[int] = []

    def timer(cfg: Config) -> float:
        calls.append(cfg.model.base_width)
        return seconds_at[cfg.model.base_width]

    return timer, calls


def test_width_is_halved_until_the_budget_holds_enough_steps():
    # 60 min x 0.9 = 3240 s: 0.6 s/step leaves 5,400 steps (< MIN_STEPS), 0.3 s leaves 10,800
    timer, calls = _timer_by_width({32: 1.2, 16: 0.6, 8: 0.3})
    cfg, info = fit_width_to_time(config(width=32), 60, torch.device("cpu"), timer=timer)
    assert cfg.model.base_width == 8 and calls == [32, 16, 8]
    assert info["budget_steps"] == 10800 and info["step_seconds"] == 0.3 and info["min_steps"] == MIN_STEPS
    assert info["step_seconds_by_width"] == {"32": 1.2, "16": 0.6, "8": 0.3}


def test_a_fast_device_or_long_budget_keeps_the_planned_width():
    timer, calls = _timer_by_width({32: 0.15})
    cfg, _ = fit_width_to_time(config(width=32), 60, torch.device("cpu"), timer=timer)
    assert cfg.model.base_width == 32 and calls == [32]
    timer, calls = _timer_by_width({16: 0.6})
    cfg, _ = fit_width_to_time(config(width=16), 600, torch.device("cpu"), timer=timer)
    assert cfg.model.base_width == 16


def test_halving_that_cannot_reach_the_steps_keeps_the_planned_width():
    # width 8 leaves 3240 / 0.5 = 6,480 steps, still short of MIN_STEPS: the wider network learns
    # more per step, so the planned width stays (a large patch in a short budget)
    timer, calls = _timer_by_width({32: 1.2, 16: 0.6, 8: 0.5})
    cfg, info = fit_width_to_time(config(width=32), 60, torch.device("cpu"), timer=timer)
    assert cfg.model.base_width == 32 and calls == [32, 16, 8]
    assert info["step_seconds"] == 1.2 and info["budget_steps"] == 2700
    assert info["step_seconds_by_width"] == {"32": 1.2, "16": 0.6, "8": 0.5}


def test_width_never_goes_below_the_floor():
    timer, calls = _timer_by_width({16: 5.0, 8: 4.0})
    cfg, info = fit_width_to_time(config(width=16), 1, torch.device("cpu"), timer=timer)
    assert MIN_WIDTH == 8 and calls == [16, 8]  # width 4 is never timed
    assert cfg.model.base_width == 16 and info["budget_steps"] == 10


def test_ranks_agree_on_the_slowest_measurement():
    timer, _ = _timer_by_width({16: 0.3, 8: 0.2})  # this rank alone would keep width 16 (10,800 steps)
    cfg, info = fit_width_to_time(config(width=16), 60, torch.device("cpu"), timer=timer,
                                  agree=lambda s: round(s * 5 / 3, 4))
    assert cfg.model.base_width == 8 and info["step_seconds"] == 0.3333


def test_a_real_step_is_timed():
    # Which width is faster is a timing claim (benchmarks/, not tests: a busy machine inverted it here)
    small = dataclasses.replace(config(width=16, depth=3, patch=(24, 24, 24)), model=ModelConfig(num_classes=3, base_width=16, depth=3))
    for width in (16, 4):
        seconds = step_seconds(dataclasses.replace(small, model=dataclasses.replace(small.model, base_width=width)),
                               torch.device("cpu"))
        assert 0 < seconds < 30
    ds = dataclasses.replace(small, model=dataclasses.replace(small.model, depth=4, deep_supervision=True))
    assert step_seconds(ds, torch.device("cpu")) > 0  # the deep-supervision heads take part
