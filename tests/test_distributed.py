"""Two CPU processes under torchrun (gloo) train together and write the usual model files."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import volseg


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_dataset: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "volseg", "train", str(tiny_dataset),
         "-o", str(run), "--max-epochs", "2", "--iters-per-epoch", "3", "--patch-size", "16,16,16",
         "--batch-size", "2", "--base-width", "4", "--depth", "3", "--quiet", "--device", "cpu", "--members", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("best validation Dice") == 1  # only rank 0 reports
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    state = run / "train_state.safetensors"
    from safetensors import safe_open

    with safe_open(str(state), "pt") as f:
        assert '"world_size": 2' in f.metadata()["state"]
    model, cfg = volseg.load_model(run)
    assert cfg.model.base_width == 4 and cfg.train.patch_size == (16, 16, 16)
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 16, 16, 16))
    assert out.shape == (1, cfg.model.num_classes, 16, 16, 16)
    assert not any(k.startswith("module.") for k in model.state_dict())


@pytest.mark.parametrize(("device", "backend", "expected"), [
    ("cpu", "gloo", torch.device("cpu")),
    # NCCL takes CUDA tensors only; the per-step clock/stop reductions are CPU tensors and go over gloo
    ("cuda", "cpu:gloo,cuda:nccl", torch.device("cuda", 1)),
])  # fmt: skip
def test_process_group_backend_per_device(monkeypatch, device, backend, expected):
    import torch.distributed as dist

    from volseg.distributed import Dist

    seen: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    assert Dist().start(torch.device(device)) == expected
    assert seen == [backend]


def test_wait_released_waits_for_other_holders():
    """`Dist.stop` must not tear down while a gloo worker still holds a collective's tensor."""
    import threading

    from volseg.distributed import _wait_released

    t = torch.zeros(2, dtype=torch.float64)
    weight = torch.ones(2, dtype=torch.float64, requires_grad=True)
    holder = [t * weight]  # autograd saves `t`: a C++ reference, as a finished gloo work keeps one
    assert t._use_count() > 1
    assert _wait_released([t], timeout_s=0.05) is False
    release = threading.Timer(0.05, holder.clear)
    release.start()
    assert _wait_released([t], timeout_s=10.0) is True
    assert t._use_count() == torch.zeros(1)._use_count()
    release.join()
