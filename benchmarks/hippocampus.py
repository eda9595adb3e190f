"""Real-data run: train on MSD Hippocampus with a fixed CPU budget, predict and score the held-out 20%.

Everything goes through the command line exactly as a user would run it (`volseg train`,
`volseg predict`, `volseg evaluate`). The split is fixed by case with a fixed seed; the held-out
cases are never seen in training (the training run takes its own validation split from the rest).

    python benchmarks/hippocampus.py --minutes 20
    python benchmarks/hippocampus.py --plot bench_out/run_a bench_out/run_b --png curves.png

The data are read from ../shared/data (never copied): the benchmark links the files into a
scratch folder. Writes `dice_vs_minutes.png` (validation Dice against wall time, the held-out
Dice at the end) into --out. Last line: one JSON object with mean_dice, dice_per_class and minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from _common import SHARED_DATA, VOLSEG, dice_per_class, run, split_dataset


TARGET_DICE = 0.88  # the 60-minute CPU target on MSD Hippocampus


def val_curve(out: Path) -> list[tuple[float, float]]:
    """(minutes, validation Dice) per epoch of a benchmark --out folder's training run."""
    with open(out / "run" / "metrics.csv") as fh:
        return [(float(r["seconds"]) / 60, float(r["val_dice"])) for r in csv.DictReader(fh)]


def plot_curves(outs: Sequence[Path], png: Path) -> None:
    """Validation Dice against wall time for one or more benchmark --out folders, held-out Dice at the end.

    Why a picture: whether a run is still climbing or flat at the budget is what decides if more
    minutes would help, and a column of numbers hides it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    shown = [TARGET_DICE]
    for i, out in enumerate(outs):
        minutes, dice = (list(col) for col in zip(*val_curve(out)))
        color = f"C{i}"
        shown += dice
        ax.plot(minutes, dice, "-o", ms=3, color=color,
                label=f"{out.name}: validation Dice")
        for name, marker in (("metrics.csv", "*"), ("metrics_tta.csv", "P")):
            if (out / name).exists():
                held = float(np.mean(list(dice_per_class(out / name).values())))
                shown.append(held)
                tag = "held-out" + (" --tta" if "tta" in name else "")
                ax.plot([minutes[-1]], [held], marker, ms=11, color=color, label=f"{out.name}: {tag} {held:.3f}")
    ax.axhline(TARGET_DICE, color="gray", ls="--", lw=1, label=f"target {TARGET_DICE}")
    ax.set_xlabel("wall time (minutes, preprocessing included)")
    ax.set_ylabel("mean Dice (foreground classes)")
    # the first epochs of a short run can sit far below the plateau: keep them in view, but no lower than needed
    ax.set_ylim(max(0.0, min(shown) - 0.02), min(1.0, max(shown) + 0.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("MSD Hippocampus, 2-core CPU")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "Dataset004_Hippocampus")
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall-time budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("bench_out/hippocampus"))
    parser.add_argument("--extra", default="", help="extra `volseg train` flags, e.g. '--base-width 24'")
    parser.add_argument("--tta", action="store_true",
                        help="also predict with mirroring test-time augmentation (`volseg predict --tta`) and score it")
    parser.add_argument("--reuse-run", action="store_true",
                        help="re-score an existing --out (same split, trained model): predict and evaluate only")
    parser.add_argument("--plot", type=Path, nargs="+", metavar="OUT",
                        help="only draw the Dice-against-minutes curves of finished --out folders into --png")
    parser.add_argument("--png", type=Path, default=Path("dice_vs_minutes.png"), help="image for --plot")
    args = parser.parse_args()
    if args.plot:
        plot_curves(args.plot, args.png)
        print(json.dumps({"png": str(args.png), "runs": [str(p) for p in args.plot]}))
        return
    if not (args.data / "dataset.json").exists():
        sys.exit(f"{args.data}: no dataset.json (pass --data)")
    run_dir, pred = args.out / "run", args.out / "predictions"
    if args.reuse_run:
        train_ds, test_img, test_lbl = args.out / "train_dataset", args.out / "test_images", args.out / "test_labels"
        n_train, n_test = len(list((train_ds / "labelsTr").iterdir())), len(list(test_lbl.iterdir()))
        with open(run_dir / "metrics.csv") as fh:
            train_s = float(list(csv.DictReader(fh))[-1]["seconds"])
        for folder in (pred, args.out / "predictions_tta"):
            if folder.exists():
                shutil.rmtree(folder)
    else:
        if args.out.exists() and any(args.out.iterdir()):
            sys.exit(f"{args.out}: exists; remove it, pass another --out, or --reuse-run")
        train_ds, test_img, test_lbl, n_train, n_test = split_dataset(args.data, args.out, args.test_fraction, args.seed)
        train_s = run(VOLSEG + ["train", str(train_ds), "-o", str(run_dir), "--max-minutes", str(args.minutes),
                                "--seed", str(args.seed), *args.extra.split()])
    predict_s = run(VOLSEG + ["predict", "-m", str(run_dir), "-i", str(test_img), "-o", str(pred)])
    metrics = args.out / "metrics.csv"
    run(VOLSEG + ["evaluate", str(pred), str(test_lbl), "-o", str(metrics),
                  "--dataset-json", str(train_ds / "dataset.json")])
    dice = dice_per_class(metrics)
    tta = {}
    if args.tta:  # the same model, each window averaged over its 8 mirrorings (as nnU-Net predicts by default)
        pred_tta, metrics_tta = args.out / "predictions_tta", args.out / "metrics_tta.csv"
        tta_s = run(VOLSEG + ["predict", "-m", str(run_dir), "-i", str(test_img), "-o", str(pred_tta), "--tta"])
        run(VOLSEG + ["evaluate", str(pred_tta), str(test_lbl), "-o", str(metrics_tta),
                      "--dataset-json", str(train_ds / "dataset.json")])
        dice_tta = dice_per_class(metrics_tta)
        print(f"held-out Dice per class with --tta: {dice_tta}")
        tta = {"mean_dice_tta": round(float(np.mean(list(dice_tta.values()))), 4), "dice_per_class_tta": dice_tta,
               "predict_seconds_tta": round(tta_s, 1)}
    plot_curves([args.out], args.out / "dice_vs_minutes.png")
    curve = [[round(m, 2), round(d, 4)] for m, d in val_curve(args.out)]
    print(f"held-out Dice per class ({n_test} cases, trained on {n_train}, {args.minutes:g} min budget): {dice}")
    print(json.dumps({
        "mean_dice": round(float(np.mean(list(dice.values()))), 4),
        "dice_per_class": dice,
        "minutes": round(train_s / 60, 2),
        "budget_minutes": args.minutes,
        "predict_seconds": round(predict_s, 1),
        "n_train": n_train,
        "n_test": n_test,
        **tta,
        "val_dice_curve_minutes": curve,
    }))


if __name__ == "__main__":
    main()
