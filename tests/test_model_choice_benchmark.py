"""The model-choice replay (the evidence for `train.SELECT_FROM_PROGRESS`) reads saved runs as the
training loop would have chosen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _member(run: Path, i: int, rows: list[tuple[float, float]]) -> None:
    folder = run / f"member_{i}"
    folder.mkdir(parents=True)
    lines = ["epoch,seconds,val_dice"] + [f"{e},{s},{d}" for e, (s, d) in enumerate(rows, 1)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_replay_lists_members_whose_model_best_is_not_their_last_epoch(tmp_path: Path) -> None:
    run = tmp_path / "lesions" / "volseg_run"
    run.mkdir(parents=True)
    (run / "members.json").write_text(json.dumps({"members": 2, "minutes": 10.0, "seed": 0, "finished": [0, 1]}))
    _member(run, 0, [(42.0, 0.509), (182.0, 0.627), (296.0, 0.518)])  # epoch 2 ends at 61% of 300 s
    _member(run, 1, [(60.0, 0.5), (290.0, 0.7)])  # the last epoch is also the best
    cmd = [sys.executable, str(ROOT / "benchmarks" / "model_choice.py"), str(tmp_path), "--thresholds", "0,0.5,0.75"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"members": 2, "not_last": {"0": 1, "0.5": 1, "0.75": 0}}
    assert "member_0: epoch 2 of 3" in done.stdout and "member_1" not in done.stdout


def test_replay_says_when_it_finds_no_runs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "model_choice.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no member metrics.csv under" in done.stderr
