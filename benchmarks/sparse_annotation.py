"""Sparse annotation on real data: how much Dice do a few labelled slices per volume keep?

Arms (same split, same compute budget): dense labels; 1, 2 and 4 labelled slices per axis on all
three axes (orthogonal planes, as in the 3D U-Net paper); and axial slices only. Every arm trains
for the same number of optimisation steps (a compute budget that a busy machine cannot bend),
predicts the held-out cases with `volseg predict` and is scored against their DENSE labels with
`volseg evaluate`.

    python benchmarks/sparse_annotation.py --epochs 20 --iters 50

Writes results.csv, results.md and dice_vs_fraction.png into --out. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import SHARED_DATA, VOLSEG, dice_per_class, run, split_dataset, write_results


def arms(axial_slices: int) -> list[tuple[str, list[str]]]:
    """(name, `volseg sparsify` flags); an empty flag list means the dense labels."""
    return [
        ("dense", []),
        ("1 slice/axis", ["--slices-per-axis", "1"]),
        ("2 slices/axis", ["--slices-per-axis", "2"]),
        ("4 slices/axis", ["--slices-per-axis", "4"]),
        (f"{axial_slices} axial slices", ["--slices-per-axis", str(axial_slices), "--axes", "2"]),
    ]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [k for k in rows[0] if k.startswith("dice_")]
    for key, marker in zip(names + ["mean_dice"], "os^D"):
        xs = [100 * r["labelled_fraction"] for r in rows]
        ax.scatter(xs, [r[key] for r in rows], marker=marker, label=key.replace("dice_", ""))
    for r in rows:
        ax.annotate(r["arm"], (100 * r["labelled_fraction"], r["mean_dice"]), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    dense = next(r for r in rows if r["arm"] == "dense")["mean_dice"]
    ax.axhline(0.95 * dense, color="grey", ls="--", lw=0.8, label="95% of dense mean")
    ax.set_xscale("log")
    ax.set_xlabel("voxels labelled (%)")
    ax.set_ylabel("held-out Dice (dense truth)")
    ax.set_title("Hippocampus: Dice against annotation effort")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "Dataset004_Hippocampus")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per arm (the compute budget)")
    parser.add_argument("--iters", type=int, default=50, help="steps per epoch")
    parser.add_argument("--axial-slices", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("bench_out/sparse_annotation"))
    args = parser.parse_args()
    if not (args.data / "dataset.json").exists():
        sys.exit(f"{args.data}: no dataset.json (pass --data)")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out}: exists; remove it or pass another --out")
    train_ds, test_img, test_lbl, n_train, n_test = split_dataset(args.data, args.out, args.test_fraction, args.seed)
    rows = []
    for i, (name, flags) in enumerate(arms(args.axial_slices)):
        arm_dir = args.out / f"arm{i}"
        dataset, fraction = train_ds, 1.0
        if flags:
            dataset = arm_dir / "dataset"
            run(VOLSEG + ["sparsify", str(train_ds), "-o", str(dataset), "--seed", str(args.seed), *flags])
            fraction = json.loads((dataset / "dataset.json").read_text())["sparsify"]["labelled_fraction"]
        t = time.monotonic()
        run(VOLSEG + ["train", str(dataset), "-o", str(arm_dir / "run"), "--seed", str(args.seed), "--quiet",
                      "--max-epochs", str(args.epochs), "--iters-per-epoch", str(args.iters), "--max-minutes", "600",
                      "--members", "1"])
        train_min = (time.monotonic() - t) / 60
        pred = arm_dir / "predictions"
        run(VOLSEG + ["predict", "-m", str(arm_dir / "run"), "-i", str(test_img), "-o", str(pred), "--quiet"])
        run(VOLSEG + ["evaluate", str(pred), str(test_lbl), "-o", str(arm_dir / "metrics.csv"),
                      "--dataset-json", str(train_ds / "dataset.json"), "--no-plot"])
        dice = dice_per_class(arm_dir / "metrics.csv")
        row = {"arm": name, "labelled_fraction": round(fraction, 4),
               **{f"dice_{k}": v for k, v in dice.items()},
               "mean_dice": round(float(np.mean(list(dice.values()))), 4), "train_minutes": round(train_min, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    dense = rows[0]["mean_dice"]
    table = write_results(
        rows, args.out,
        f"Held-out {n_test} cases, trained on {n_train}; {args.epochs} epochs x {args.iters} steps per arm.",
        ("% of dense", lambda r: f"{100 * r['mean_dice'] / dense:.1f}"),
    )
    plot(rows, args.out / "dice_vs_fraction.png")
    print(table)
    sparse = [r for r in rows[1:] if r["labelled_fraction"] <= 0.10]
    best = max(sparse, key=lambda r: r["mean_dice"]) if sparse else None
    print(json.dumps({
        "dense_mean_dice": dense,
        "best_sparse_mean_dice_at_most_10pct": best["mean_dice"] if best else None,
        "labelled_fraction_of_that_arm": best["labelled_fraction"] if best else None,
        "ratio_to_dense": round(best["mean_dice"] / dense, 4) if best else None,
        "arm": best["arm"] if best else None,
        "epochs": args.epochs, "iters_per_epoch": args.iters, "n_train": n_train, "n_test": n_test,
    }))


if __name__ == "__main__":
    main()
