"""`volseg train --tensorboard`: every epoch's metrics row reaches TensorBoard as scalars."""

from __future__ import annotations

import csv

from typer.testing import CliRunner

from volseg.cli import app


def test_train_logs_each_epoch_to_tensorboard(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", str(tiny_dataset), "-o", str(out), "--quiet", "--tensorboard", "--max-epochs", "2",
        "--iters-per-epoch", "2", "--patch-size", "16,16,16", "--base-width", "4", "--depth", "3", "--members", "1"])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/val", "dice/dice", "train/lr"} <= tags
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    val_loss = events.Scalars("loss/val")
    assert [e.step for e in val_loss] == [1, 2]
    for event, row in zip(val_loss, rows):
        assert abs(event.value - float(row["val_loss"])) < 1e-5
