"""The active-annotation benchmark (the evidence for `suggest-slices`) still runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_active_annotation_run_with_two_training_seeds(tmp_path: Path) -> None:
    out = tmp_path / "aa"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "active_annotation.py"), "--quick", "--train-seeds", "2",
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["train_seeds"] == 2 and len(result["dense_seed_dice"]) == 2
    assert set(result["curves"]) == {"suggested", "even", "random"}
    for arm in ("suggested", "even", "random"):
        assert [x for x, _ in result["curves"][arm]] == [3.0, 6.0]  # one slice per axis, then three more
        assert f"slices_to_target_{arm}" in result
    for arm in ("suggested", "even"):  # both training seeds of each model trained and scored
        assert (out / arm / "round1" / "metrics.csv").is_file()
        assert (out / arm / "round1" / "metrics_seed1.csv").is_file()
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0].split(",")[-2:] == ["seed_dice", "pct_of_dense"] and len(rows) == 1 + 3 * 2
    assert (out / "dice_vs_slices.png").read_bytes()[:4] == b"\x89PNG"
    suggestions = (out / "suggested" / "round1" / "suggest" / "suggestions.csv").read_text().splitlines()
    assert suggestions[0].split(",")[:6] == ["case", "rank", "axis", "index", "score", "position"]
