"""Which epoch would each few-case rule keep as model_best? A replay over saved runs.

Below 10 cases `volseg train` keeps as model_best the epoch with the best validation Dice smoothed
over epochs (`train.selection_score`), and only from `train.SELECT_FROM_PROGRESS` of the
learning-rate schedule on, or the run's last epoch (`train.BestModel`). Retraining to compare
thresholds costs 10 minutes a member; the choice itself depends only on each epoch's validation
Dice and when it ended, both in the member's metrics.csv. This script replays `BestModel` on every
member of every averaged run (a folder with members.json) under the given folders, at each
threshold, and lists the members whose model_best would not be their last epoch. Which of two
models is better on held-out cases still takes `volseg predict -m .../model_best.safetensors` or
`model_last.safetensors` and `volseg evaluate` (docs/benchmarks.md).

    python benchmarks/model_choice.py bench_out --thresholds 0,0.5,0.75

A member's schedule progress at an epoch's end is the epoch's `seconds` over the member's share of
the budget (members.json: minutes / members), as the training loop's `schedule_progress` has it for
a time-budgeted run. Last line: one JSON object, the count of members keeping an epoch other than
their last per threshold.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from volseg.train import MEMBERS_JSON, BestModel, member_folder


def members(root: Path) -> list[tuple[Path, list[tuple[float, float]]]]:
    """(member folder, [(validation Dice, schedule progress at the epoch's end), ...]) for every
    member with a metrics.csv of every averaged run under root."""
    found = []
    for state_path in sorted(root.rglob(MEMBERS_JSON)):
        state = json.loads(state_path.read_text())
        share_s = 60 * state["minutes"] / state["members"]
        for i in range(state["members"]):
            metrics = member_folder(state_path.parent, i) / "metrics.csv"
            if metrics.exists():
                with metrics.open() as f:
                    epochs = [(float(r["val_dice"]), float(r["seconds"]) / share_s) for r in csv.DictReader(f)]
                if epochs:
                    found.append((metrics.parent, epochs))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", type=Path, help="folders searched for averaged runs (members.json)")
    ap.add_argument("--thresholds", default="0,0.5,0.75",
                    help="comma-separated SELECT_FROM_PROGRESS values (0: the smoothed choice alone)")
    args = ap.parse_args()
    runs = [m for root in args.roots for m in members(root)]
    if not runs:
        raise SystemExit(f"no member metrics.csv under {', '.join(map(str, args.roots))} (looked for {MEMBERS_JSON})")
    counts: dict[str, int] = {}
    for threshold in (float(t) for t in args.thresholds.split(",")):
        chosen = [(folder, BestModel.replay(epochs, smooth=True, select_from=threshold), epochs) for folder, epochs in runs]
        not_last = [(folder, at, epochs) for folder, at, epochs in chosen if at != len(epochs)]
        counts[f"{threshold:g}"] = len(not_last)
        print(f"SELECT_FROM_PROGRESS {threshold:g}: {len(not_last)} of {len(runs)} members keep an epoch other than their last")
        for folder, at, epochs in not_last:
            trail = ", ".join(f"{dice:.3f} at {progress:.0%}" for dice, progress in epochs)
            print(f"  {folder}: epoch {at} of {len(epochs)} ({trail})")
    print(json.dumps({"members": len(runs), "not_last": counts}))


if __name__ == "__main__":
    main()
