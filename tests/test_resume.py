"""Crash safety: a training process killed with SIGKILL resumes where its last finished epoch left off."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import volseg
from volseg.checkpoint import read_model_file

TINY_FLAGS = ["--patch-size", "16,16,16", "--batch-size", "2", "--base-width", "4", "--depth", "3",
              "--iters-per-epoch", "4", "--quiet", "--device", "cpu", "--members", "1"]


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_kill_9_then_resume(tiny_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "volseg", "train", str(tiny_dataset), "-o", str(run), *TINY_FLAGS]
    proc = subprocess.Popen(cmd + ["--max-epochs", "1000", "--max-minutes", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (run / "metrics.csv").exists() and len(_rows(run)) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("training never finished two epochs")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(_rows(run))
    # whatever moment the kill hit, the files on disk are complete and loadable
    _, cfg, extra = read_model_file(run / "model_last.safetensors")
    assert extra["epoch"] >= done - 1
    last_lr = float(_rows(run)[-1]["lr"])

    result = subprocess.run(cmd + ["--resume", "--max-epochs", str(done + 2)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(run)
    epochs = [int(r["epoch"]) for r in rows]
    assert epochs == list(range(1, len(rows) + 1)) and len(rows) >= done + 1
    # the schedule continued: the learning rate keeps decaying from where the killed run was
    assert float(rows[done]["lr"]) < last_lr
    model, cfg2 = volseg.load_model(run)
    assert cfg2.model == cfg.model and cfg2.data == cfg.data and cfg2.train.max_epochs == done + 2
    _, _, extra2 = read_model_file(run / "model_last.safetensors")
    assert extra2["epoch"] == len(rows)
    assert not [p for p in run.iterdir() if ".tmp" in p.name]  # stale temporaries of the killed run cleared


def test_resume_refuses_model_changes(trained_run: tuple[Path, dict], tiny_dataset: Path, tmp_path: Path) -> None:
    import shutil

    from volseg.errors import VolsegError
    from volseg.train import train

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    with pytest.raises(VolsegError, match="base_width"):
        train(tiny_dataset, run, resume=True, overrides={"model": {"base_width": 8}}, progress=False)
