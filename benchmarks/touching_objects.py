"""Touching objects: does the U-Net border weight map keep touching objects apart?

A synthetic dataset of clumps of touching blobs (nuclei, confluent lesions), each pair of touching
objects separated in the label by a one-voxel gap that is only faintly darker in the image
(`volseg.synthetic.write_touching_dataset`, instance maps in instancesTr/ and instancesTs/). Two arms
train with the same settings and the same number of optimisation steps (a budget a busy machine
cannot bend) and differ only in the per-voxel weights of the binary cross-entropy:

- unweighted: `--loss bce`, every labelled voxel weight 1;
- weighted:   `--loss bce --border-w0 W0 --border-sigma-mm S` (+ `--class-balance` with the flag),
              the U-Net map w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on the background between objects,
              computed from instancesTr/ once per case and cached with the preprocessed data.

Both predict the held-out cases with `volseg predict` and are scored with `volseg evaluate
--instances --ref-instances instancesTs`: object F1 at IoU 0.5 and 0.1 (pooled over cases), merged
and split object counts, and voxel Dice.

    python benchmarks/touching_objects.py [--epochs 20 --iters 40] [--seeds 0,1]

Writes results.csv and results.md into --out; arms already trained there (same --out) are only
re-scored, so an interrupted run continues and more --seeds can be added later. Last line: one JSON object with object_f1_weighted,
object_f1_unweighted, dice_weighted, dice_unweighted (means over seeds) and the per-seed rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from _common import VOLSEG, run, write_results

try:
    from volseg.synthetic import write_touching_dataset
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from volseg.synthetic import write_touching_dataset


def arm_flags(name: str, w0: float, sigma_mm: float, class_balance: bool) -> list[str]:
    """The `volseg train` flags of an arm; only the weights differ between arms."""
    if name == "unweighted":
        return ["--loss", "bce"]
    flags = ["--loss", "bce", "--border-w0", str(w0), "--border-sigma-mm", str(sigma_mm)]
    return flags + (["--class-balance"] if class_balance else [])


def epochs_done(run_dir: Path) -> int | None:
    """Epochs an earlier run in `run_dir` finished; None when there is none."""
    if not (run_dir / "model_last.safetensors").exists():
        return None
    with open(run_dir / "metrics.csv", newline="") as fh:
        return len(list(csv.DictReader(fh)))


def scores(arm_dir: Path) -> dict[str, float]:
    """Pooled object scores and mean voxel Dice of one evaluated arm."""
    summary = json.loads((arm_dir / "metrics.summary.json").read_text())
    objects = summary["objects"]["all"]
    with open(arm_dir / "metrics.csv", newline="") as fh:
        dice = [float(r["dice"]) for r in csv.DictReader(fh)]
    return {
        "object_f1_0.5": round(float(objects["obj_f1@0.5"]), 4),
        "object_f1_0.1": round(float(objects["obj_f1@0.1"]), 4),
        "merged": int(objects["merged"]),
        "refs_merged": int(objects["merged_ref"]),
        "split": int(objects["split"]),
        "n_ref_objects": int(objects["n_ref_objects"]),
        "n_pred_objects": int(objects["n_pred_objects"]),
        "dice": round(float(np.mean(dice)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16, help="training cases")
    parser.add_argument("--test-cases", type=int, default=8, help="held-out cases")
    parser.add_argument("--shape", default="64,64,64")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per arm (the compute budget)")
    parser.add_argument("--iters", type=int, default=40, help="steps per epoch")
    parser.add_argument("--w0", type=float, default=10.0)
    parser.add_argument("--sigma-mm", type=float, default=2.0)
    parser.add_argument("--class-balance", action="store_true", help="weighted arm adds the class-balance term")
    parser.add_argument("--seeds", default="0", help="training seeds, comma-separated (one run per arm and seed)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench_out/touching_objects"))
    parser.add_argument("--train-flags", default="--patch-size 48,48,48 --batch-size 2 --no-augment",
                        help="flags shared by both arms")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    data = args.out / "data"
    if not (data / "dataset.json").exists():
        write_touching_dataset(data, n_cases=args.cases, n_test=args.test_cases, shape_vox=shape, seed=args.data_seed)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in ("unweighted", "weighted"):
            arm_dir = args.out / f"{name}_seed{seed}"
            done = epochs_done(arm_dir / "run")
            if done is None:
                run(VOLSEG + ["train", str(data), "-o", str(arm_dir / "run"), "--seed", str(seed), "--quiet",
                              "--max-epochs", str(args.epochs), "--iters-per-epoch", str(args.iters),
                              "--max-minutes", "600", "--members", "1", *args.train_flags.split(),
                              *arm_flags(name, args.w0, args.sigma_mm, args.class_balance)])
            elif done < args.epochs:  # interrupted: continue where it stopped
                run(VOLSEG + ["train", str(data), "-o", str(arm_dir / "run"), "--resume", "--quiet"])
            with open(arm_dir / "run" / "metrics.csv", newline="") as fh:
                train_min = float(list(csv.DictReader(fh))[-1]["seconds"]) / 60
            pred = arm_dir / "predictions"
            run(VOLSEG + ["predict", "-m", str(arm_dir / "run"), "-i", str(data / "imagesTs"), "-o", str(pred),
                          "--quiet", "--overwrite"])
            run(VOLSEG + ["evaluate", str(pred), str(data / "labelsTs"), "-o", str(arm_dir / "metrics.csv"),
                          "--dataset-json", str(data / "dataset.json"), "--no-plot", "--instances",
                          "--ref-instances", str(data / "instancesTs")])
            row = {"arm": name, "seed": seed, **scores(arm_dir), "train_minutes": round(train_min, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = write_results(
        rows, args.out,
        f"{args.cases} training / {args.test_cases} held-out synthetic volumes {shape}; "
        f"{args.epochs} epochs x {args.iters} steps per arm; w0 {args.w0}, sigma {args.sigma_mm} mm.",
    )
    print(table)

    def mean(arm: str, key: str) -> float:
        return round(float(np.mean([r[key] for r in rows if r["arm"] == arm])), 4)

    result = {
        "object_f1_weighted": mean("weighted", "object_f1_0.5"),
        "object_f1_unweighted": mean("unweighted", "object_f1_0.5"),
        "dice_weighted": mean("weighted", "dice"),
        "dice_unweighted": mean("unweighted", "dice"),
        "merged_weighted": mean("weighted", "merged"),
        "merged_unweighted": mean("unweighted", "merged"),
        "refs_merged_weighted": mean("weighted", "refs_merged"),
        "refs_merged_unweighted": mean("unweighted", "refs_merged"),
        "object_f1_0.1_weighted": mean("weighted", "object_f1_0.1"),
        "object_f1_0.1_unweighted": mean("unweighted", "object_f1_0.1"),
    }
    result["f1_gain"] = round(result["object_f1_weighted"] - result["object_f1_unweighted"], 4)
    result["dice_change"] = round(result["dice_weighted"] - result["dice_unweighted"], 4)
    result.update({"epochs": args.epochs, "iters_per_epoch": args.iters, "w0": args.w0, "sigma_mm": args.sigma_mm,
                   "class_balance": args.class_balance, "seeds": args.seeds, "rows": rows})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
