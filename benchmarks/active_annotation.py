"""Active annotation: do the slices `volseg suggest-slices` picks beat evenly spaced ones?

Same split as the other benchmarks (`_common.split_dataset`, seed 0, 20% of the cases held out).
Every arm starts from one labelled slice per axis (`volseg sparsify --slices-per-axis 1`); then,
for R rounds, each arm labels N more slices per case, taken from the dense labels (a simulated
annotator, `volseg.suggest.apply_suggestions`), chosen

- suggested: by `volseg suggest-slices` with the arm's model of the previous round (top N by the
             entropy of the mirror-averaged prediction, at least --min-gap slices apart);
- even:      as the next evenly spaced slices (`volseg.suggest.next_even_slices`: from the middle
             slice it adds sparsify's even positions for three slices, then fills the largest gaps);
- random:    (with --random) uniformly among the unlabelled slices.

With --budget N a round adds N slices over the whole training set instead of --add per case (at
most --add per case): the suggested arm keeps the N most uncertain slices over all cases
(`suggest-slices --budget`), the even arm gives the next evenly spaced slice to N cases, round
robin with the least-labelled cases first (`volseg.suggest.even_over_cases`), the random arm draws
N unlabelled slices from all cases (`volseg.suggest.random_over_cases`). A budget smaller than the number of cases gives fractional
steps (e.g. 1.25 slices per case), fine enough to see how many slices each arm needs.

Every model (round 0 is shared by all arms) trains with `volseg train` for the same fixed budget
of --epochs x --iters optimisation steps (a budget a busy machine cannot bend) and is scored on the
held-out cases against their DENSE labels (`volseg predict` + `volseg evaluate`). A dense arm with
the same budget gives the reference Dice.

    python benchmarks/active_annotation.py --rounds 4 --add 3 --epochs 20 --iters 50 [--random]
    python benchmarks/active_annotation.py --axes 0 --add 1 --budget 42 --rounds 4 --epochs 10 --iters 100
    python benchmarks/active_annotation.py --train-cases 16 --axes 0 --add 1 --rounds 3 --epochs 10 --iters 100
    python benchmarks/active_annotation.py --quick      # synthetic smoke test, tiny network, in-process

--train-seeds K trains every model K times (training seeds seed, seed+1, ...) on the same data and
scores the mean Dice per point: a single training seed moves a model by up to ~0.04 Dice, more
than the arms differ by. The suggestions come from the first seed's model.

--train-cases N trains every model on only N of the non-held-out cases (same held-out set): fewer
cases put the one-slice start further below dense, leaving more room to tell the arms apart.

Resumable: rerun the same command with the same --out; finished steps (datasets, trained runs,
evaluations) are kept, an interrupted training continues with `--resume`, and more rounds can be
added later with a larger --rounds. Writes curves.csv, curves.md and dice_vs_slices.png into --out.
Last line: one JSON object with slices_to_target_suggested / _even (/ _random): the labelled
slices per case needed to reach 95% of the dense arm's mean Dice (None if never reached), the
dense Dice and the curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from _common import SHARED_DATA, VOLSEG, dice_per_class, run, split_dataset

try:
    import volseg  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from volseg import layout, volumes  # noqa: E402
from volseg.suggest import (  # noqa: E402
    apply_suggestions,
    even_over_cases,
    labelled_slices,
    next_even_slices,
    random_over_cases,
    random_unlabelled_slices,
    read_suggestions_csv,
)

TARGET = 0.95  # fraction of the dense arm's Dice that counts as "as good as dense"
QUICK_TRAIN_FLAGS = ["--patch-size", "16,16,16", "--batch-size", "2", "--base-width", "4", "--depth", "3",
                     "--no-augment"]  # fmt: skip


def volseg_cmd(argv: list[str], in_process: bool) -> None:
    """Run one `volseg` command: as a subprocess (the default), or in this process (--quick)."""
    if not in_process:
        run(VOLSEG + argv)
        return
    from volseg.cli import main

    print("$ volseg", " ".join(argv), flush=True)
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"volseg {argv[0]} failed with exit code {exc.code}") from None


def epochs_done(run_dir: Path) -> int | None:
    """Epochs an earlier run in `run_dir` finished; None when there is none."""
    if not (run_dir / "model_last.safetensors").exists():
        return None
    with open(run_dir / "metrics.csv", newline="") as fh:
        return len(list(csv.DictReader(fh)))


def train_and_score(dataset: Path, step: Path, test_img: Path, test_lbl: Path, dataset_json: Path,
                    args: argparse.Namespace) -> tuple[dict[str, float], list[float]]:
    """Train on `dataset` into step/run (or continue it), score it on the held-out cases.

    With --train-seeds K, K models (training seeds seed, seed+1, ...; step/run, step/run_seed<S>)
    on the same data. Returns (mean Dice per label over the seeds, each seed's mean Dice).
    """
    per_seed: list[dict[str, float]] = []
    for k in range(args.train_seeds):
        seed = args.seed + k
        suffix = "" if k == 0 else f"_seed{seed}"
        run_dir, metrics, predictions = step / f"run{suffix}", step / f"metrics{suffix}.csv", step / f"predictions{suffix}"
        done = epochs_done(run_dir)
        if done is None:
            volseg_cmd(["train", str(dataset), "-o", str(run_dir), "--seed", str(seed), "--quiet",
                        "--max-epochs", str(args.epochs), "--iters-per-epoch", str(args.iters), "--max-minutes", "600",
                        "--members", "1", "--device", args.device, *args.train_flags], args.quick)  # fmt: skip
        elif done < args.epochs:  # interrupted: continue where it stopped
            volseg_cmd(["train", str(dataset), "-o", str(run_dir), "--resume", "--quiet", "--device", args.device],
                       args.quick)
        if not metrics.exists():
            volseg_cmd(["predict", "-m", str(run_dir), "-i", str(test_img), "-o", str(predictions), "--quiet",
                        "--continue", "--device", args.device], args.quick)  # fmt: skip
            volseg_cmd(["evaluate", str(predictions), str(test_lbl), "-o", str(metrics),
                        "--dataset-json", str(dataset_json), "--no-plot"], args.quick)  # fmt: skip
        per_seed.append(dice_per_class(metrics))
    mean = {name: round(float(np.mean([d[name] for d in per_seed])), 4) for name in per_seed[0]}
    return mean, [round(float(np.mean(list(d.values()))), 4) for d in per_seed]


def labelled_masks(dataset: Path) -> dict[str, np.ndarray]:
    """Each case's labelled voxels (label != ignore)."""
    info, cases = layout.read_dataset(dataset)
    return {c.case_id: volumes.read_label(c.label).array[0] != info.ignore_label for c in cases}


def slices_per_case(masks: dict[str, np.ndarray], axes: tuple[int, ...]) -> float:
    """Mean number of labelled slices per case, over the annotated axes."""
    return float(np.mean([sum(int(labelled_slices(m, a).sum()) for a in axes) for m in masks.values()]))


def choose(arm: str, dataset: Path, prev_run: Path, step: Path, round_: int, args: argparse.Namespace) -> list[dict]:
    """The N slices per case this arm labels next, as rows {case, axis, index}; recorded in step/additions.csv."""
    axes = tuple(int(a) for a in args.axes.split(","))
    if arm == "suggested":
        folder = step / "suggest"
        if not (folder / "suggestions.csv").exists():
            budget = [] if args.budget is None else ["--budget", str(args.budget)]
            volseg_cmd(["suggest-slices", str(dataset), "-m", str(prev_run), "-o", str(folder), "--top-k",
                        str(args.add), "--axes", args.axes, "--min-gap", str(args.min_gap), "--device", args.device,
                        *budget, "--quiet", "--overwrite"], args.quick)  # fmt: skip
        rows = [{"case": r["case"], "axis": r["axis"], "index": r["index"]}
                for r in read_suggestions_csv(folder / "suggestions.csv")]  # fmt: skip
    elif args.budget is not None and arm == "even":  # one seeded case order for every round: a round robin
        rows = even_over_cases(labelled_masks(dataset), args.budget, np.random.default_rng(args.seed), axes)
    elif args.budget is not None:
        rows = random_over_cases(labelled_masks(dataset), args.budget, np.random.default_rng([args.seed, round_]), axes)
    else:
        rows = []
        for i, (case, mask) in enumerate(sorted(labelled_masks(dataset).items())):
            if arm == "even":
                picks = next_even_slices(mask, args.add, axes)
            else:
                picks = random_unlabelled_slices(mask, args.add, np.random.default_rng([args.seed, round_, i]), axes)
            rows += [{"case": case, "axis": a, "index": idx} for a, idx in picks]
    step.mkdir(parents=True, exist_ok=True)
    with open(step / "additions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["case", "axis", "index"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def curve_row(arm: str, round_: int, dataset: Path, scores: tuple[dict[str, float], list[float]],
              axes: tuple[int, ...]) -> dict:
    dice, per_seed = scores
    masks = labelled_masks(dataset)
    fraction = float(np.mean([m.mean() for m in masks.values()]))
    return {"arm": arm, "round": round_, "slices_per_case": round(slices_per_case(masks, axes), 2),
            "labelled_fraction": round(fraction, 4), **{f"dice_{k}": v for k, v in dice.items()},
            "mean_dice": round(float(np.mean(list(dice.values()))), 4),
            "seed_dice": " ".join(f"{d:.4f}" for d in per_seed)}  # fmt: skip


def slices_to_target(rows: list[dict], target: float) -> float | None:
    """Fewest labelled slices per case at which an arm's mean Dice reaches `target`; None if never."""
    hits = [r["slices_per_case"] for r in rows if r["mean_dice"] >= target]
    return min(hits) if hits else None


def plot(curves: dict[str, list[dict]], dense: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (arm, rows), marker in zip(curves.items(), "os^D"):
        line = ax.plot([r["slices_per_case"] for r in rows], [r["mean_dice"] for r in rows], marker=marker,
                       label=arm)[0]
        seeds = [(r["slices_per_case"], float(d)) for r in rows for d in r["seed_dice"].split()]
        if len(seeds) > len(rows):  # several training seeds: each seed's model as a faint dot
            ax.scatter(*zip(*seeds), s=12, color=line.get_color(), alpha=0.35, linewidths=0)
    ax.axhline(dense, color="black", lw=0.8, label="dense labels")
    ax.axhline(TARGET * dense, color="grey", ls="--", lw=0.8, label=f"{TARGET:.0%} of dense")
    ax.set_xlabel("labelled slices per case")
    ax.set_ylabel("held-out mean Dice (dense truth)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quick_dataset(out: Path) -> Path:
    """A tiny seeded synthetic dataset for the smoke test."""
    from volseg import synthetic

    data = out / "synthetic"
    if not (data / "dataset.json").exists():
        synthetic.write_dataset(data, n_cases=8, shape_vox=(24, 24, 16), spacing_mm=(1.0, 1.0, 2.0), n_classes=3,
                                seed=0)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "Dataset004_Hippocampus")
    parser.add_argument("--rounds", type=int, default=4, help="annotation rounds after the initial slices")
    parser.add_argument("--add", type=int, default=3,
                        help="slices labelled per case and round (with --budget: at most this many per case)")
    parser.add_argument("--budget", type=int, default=None,
                        help="slices labelled per round over the whole training set (instead of --add per case)")
    parser.add_argument("--axes", default="0,1,2", help="axes slices are labelled on")
    parser.add_argument("--min-gap", type=int, default=2, help="suggest-slices --min-gap")
    parser.add_argument("--random", action="store_true", help="add the random-slices arm")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per model (the compute budget)")
    parser.add_argument("--iters", type=int, default=50, help="steps per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--train-cases", type=int, default=None,
                        help="train on only this many of the non-held-out cases (small-data regime)")
    parser.add_argument("--train-seeds", type=int, default=1,
                        help="train every model with this many training seeds and score their mean Dice "
                             "(one seed moves a model by up to ~0.04 Dice); suggestions use the first seed's model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-flags", default="", help="extra `volseg train` flags shared by every model")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny synthetic data and network, 1 round, 1 epoch x 2 steps, in-process")
    parser.add_argument("--out", type=Path, default=None, help="default bench_out/active_annotation[_quick]")
    args = parser.parse_args()
    args.train_flags = args.train_flags.split()
    if args.quick:
        args.rounds, args.epochs, args.iters, args.random = 1, 1, 2, True
        args.device = "cpu"
        args.train_flags = QUICK_TRAIN_FLAGS + args.train_flags
    out = args.out or Path("bench_out/active_annotation" + ("_quick" if args.quick else ""))
    data = quick_dataset(out) if args.quick else args.data
    if not (data / "dataset.json").exists():
        sys.exit(f"{data}: no dataset.json (pass --data)")
    axes = tuple(int(a) for a in args.axes.split(","))
    if (out / "train_dataset" / "dataset.json").exists():  # resuming: the split is already there
        train_ds, test_img, test_lbl = out / "train_dataset", out / "test_images", out / "test_labels"
        n_train = len(list((train_ds / "labelsTr").iterdir()))
        n_test = len(list(test_lbl.iterdir()))
    elif (out / "train_dataset").exists():
        sys.exit(f"{out}: holds a half-made split; remove {out / 'train_dataset'}, test_images and test_labels")
    else:
        train_ds, test_img, test_lbl, n_train, n_test = split_dataset(data, out, args.test_fraction, args.seed,
                                                                    args.train_cases)
    dataset_json = train_ds / "dataset.json"

    dense_dice, dense_seeds = train_and_score(train_ds, out / "dense", test_img, test_lbl, dataset_json, args)
    dense = round(float(np.mean(list(dense_dice.values()))), 4)
    print(json.dumps({"arm": "dense", "mean_dice": dense, **dense_dice, "seed_dice": dense_seeds}), flush=True)

    start = out / "round0"
    start_ds = start / "dataset"
    if not (start_ds / "dataset.json").exists():
        volseg_cmd(["sparsify", str(train_ds), "-o", str(start_ds), "--slices-per-axis", "1", "--axes", args.axes,
                    "--overwrite"], args.quick)  # fmt: skip
    first = curve_row("round 0", 0, start_ds, train_and_score(start_ds, start, test_img, test_lbl, dataset_json, args),
                      axes)
    print(json.dumps(first), flush=True)
    arms = ["suggested", "even"] + (["random"] if args.random else [])
    curves: dict[str, list[dict]] = {arm: [{**first, "arm": arm}] for arm in arms}
    state = {arm: (start_ds, start / "run") for arm in arms}  # each arm's current dataset and model
    for r in range(1, args.rounds + 1):  # round by round, so an interrupted run still compares the arms
        for arm in arms:
            dataset, prev_run = state[arm]
            step = out / arm / f"round{r}"
            next_ds = step / "dataset"
            if not (next_ds / "dataset.json").exists():  # apply_suggestions renames a finished copy into place
                additions = choose(arm, dataset, prev_run, step, r, args)
                apply_suggestions(dataset, additions, next_ds, overwrite=True)
            dice = train_and_score(next_ds, step, test_img, test_lbl, dataset_json, args)
            curves[arm].append(curve_row(arm, r, next_ds, dice, axes))
            print(json.dumps(curves[arm][-1]), flush=True)
            state[arm] = (next_ds, step / "run")

    all_rows = [row for rows in curves.values() for row in rows]
    cols = list(all_rows[0])
    with open(out / "curves.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols + ["pct_of_dense"])
        writer.writeheader()
        writer.writerows({**r, "pct_of_dense": round(100 * r["mean_dice"] / dense, 1)} for r in all_rows)
    lines = ["| " + " | ".join(cols) + " | % of dense |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + f" | {100 * r['mean_dice'] / dense:.1f} |" for r in all_rows]
    table = "\n".join(lines)
    source = "synthetic (--quick)" if args.quick else data.name
    added = (f"{args.add} slices added per case and round" if args.budget is None else
             f"{args.budget} slices added per round over all cases (at most {args.add} per case)")  # fmt: skip
    (out / "curves.md").write_text(
        f"{source}: held-out {n_test} cases, trained on {n_train}; {args.epochs} epochs x {args.iters} steps "
        f"per model, mean of {args.train_seeds} training seed(s) per point; "
        f"{added} on axes {args.axes}; dense mean Dice {dense}.\n\n{table}\n")
    plot(curves, dense, out / "dice_vs_slices.png", f"{source}: Dice against labelled slices")
    print(table)
    target = TARGET * dense
    result: dict = {f"slices_to_target_{arm}": slices_to_target(rows, target) for arm, rows in curves.items()}
    result.update({
        "dense_mean_dice": dense, "target_dice": round(target, 4), "rounds": args.rounds, "add_per_round": args.add,
        "budget_per_round": args.budget,
        "epochs": args.epochs, "iters_per_epoch": args.iters, "n_train": n_train, "n_test": n_test,
        "train_seeds": args.train_seeds, "dense_seed_dice": dense_seeds,
        "quick": args.quick,
        "curves": {arm: [[r["slices_per_case"], r["mean_dice"]] for r in rows] for arm, rows in curves.items()},
    })  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
