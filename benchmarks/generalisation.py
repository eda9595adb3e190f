"""volseg against nnU-Net v2 at equal wall time, on more than one dataset, in one run.

For each dataset the same training cases go to three arms, each given the same training budget:
volseg with its planned defaults (`volseg train --max-minutes M`; the budget includes its planning
and preprocessing), nnU-Net 3d_fullres with its own plans and defaults (epochs and iterations cut
to the budget), and nnU-Net with its plans.json reduced to fit a CPU (`_nnunet.py`). Every arm
predicts the same held-out cases without test-time mirroring, and `volseg evaluate` scores all of
them, so the three numbers differ only by what was trained. The better nnU-Net arm is the one to
beat: `ratio_to_nnunet` = volseg's mean foreground Dice / that arm's.

Datasets:
- `hippocampus`: MSD Task04 (`../shared/data`), the fixed 80/20 split of `benchmarks/hippocampus.py`;
- `lesions`: `volseg synth --kind lesions` (two-channel T1c + FLAIR brain MRI, 0.5 x 0.5 x 5-7 mm,
  512-wide slices, 20-30 slices, 6 training and 4 test volumes, lesions of 0.5-10 cm^3), one dataset
  per `--lesion-seeds` value.

    python benchmarks/generalisation.py --minutes 10 --out bench_out/generalisation

`--train-seeds 0,1,2` trains every arm once per training seed and reports the mean (and each run):
with a few training cases one run per arm is too noisy to rank two methods. `--lesion-test 12`
scores more held-out cases (nnU-Net's default network needs minutes per case to predict them).

needs the `bench` extra's nnunetv2 (see `_nnunet.py`). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, VOLSEG, dice_per_class, run, split_dataset  # noqa: E402


def lesion_dataset(out: Path, seed: int, n_train: int, n_test: int) -> tuple[Path, Path, Path]:
    """A synthetic thick-slice two-channel set: training dataset, test images, test labels."""
    data = out / "dataset"
    if not (data / "dataset.json").exists():
        run(VOLSEG + ["synth", "-o", str(data), "--kind", "lesions", "--cases", str(n_train),
                      "--test-cases", str(n_test), "--seed", str(seed)])
    return data, data / "imagesTs", data / "labelsTs"


def test_images(folder: Path, ending: str) -> dict[str, list[Path]]:
    """Case id -> channel files (`<case>_<CCCC><ending>`) of a folder of test images."""
    cases: dict[str, list[Path]] = {}
    for path in sorted(folder.glob(f"*{ending}")):
        cases.setdefault(path.name[: -len(ending)].rsplit("_", 1)[0], []).append(path)
    return cases


def score(pred: Path, labels: Path, dataset_json: Path, out_csv: Path) -> dict[str, float]:
    """Mean Dice per foreground label, by `volseg evaluate` (the same code for every arm)."""
    run(VOLSEG + ["evaluate", str(pred), str(labels), "-o", str(out_csv), "--dataset-json", str(dataset_json)])
    return dice_per_class(out_csv)


def mean(dice: dict[str, float]) -> float:
    return round(float(np.mean(list(dice.values()))), 4) if dice else 0.0


def repeated(arm: str, seeds: list[int], one: Callable[[int, str], dict]) -> dict:
    """An arm trained once per training seed: the mean Dice, and each run under "runs".

    Why: with a few training cases, which small lesions a model finds changes with the training seed
    (one case moved a seed's mean by 0.1-0.3), so one run per arm cannot rank two methods. A run
    that failed counts as Dice 0 in the mean, as a single failed run scores 0; the per-class means
    are over the runs that scored.
    """
    if len(seeds) == 1:
        return one(seeds[0], "")
    runs = [{"train_seed": s, **one(s, f"_t{s}")} for s in seeds]
    ok = [r for r in runs if "error" not in r]
    per_class = {k: round(float(np.mean([r["dice_per_class"][k] for r in ok])), 4)
                 for k in (ok[0]["dice_per_class"] if ok else {})}
    print(f"{arm}: Dice per training seed {[r['dice'] for r in runs]}", flush=True)
    return {"dice": round(float(np.mean([r["dice"] for r in runs])), 4), "dice_per_class": per_class,
            "dice_sd": round(float(np.std([r["dice"] for r in runs], ddof=1)), 4), "runs": runs}


def volseg_arm(train_ds: Path, test_img: Path, test_lbl: Path, out: Path, minutes: float, seed: int,
               extra: list[str], tag: str = "") -> dict:
    run_dir, pred = out / f"volseg_run{tag}", out / f"volseg_pred{tag}"
    for folder in (run_dir, pred):
        if folder.exists():
            shutil.rmtree(folder)
    train_s = run(VOLSEG + ["train", str(train_ds), "-o", str(run_dir), "--max-minutes", str(minutes),
                            "--seed", str(seed), *extra])
    predict_s = run(VOLSEG + ["predict", "-m", str(run_dir), "-i", str(test_img), "-o", str(pred)])
    dice = score(pred, test_lbl, train_ds / "dataset.json", out / f"volseg{tag}_metrics.csv")
    # below 10 cases volseg trains several models (member_<i>/, the first one's plan shared), averaged
    from volseg.checkpoint import member_folders

    members = member_folders(run_dir)
    plan = json.loads(((members[0] if members else run_dir) / "plan.json").read_text())
    model, train = plan["config"]["model"], plan["config"]["train"]
    return {"dice": mean(dice), "dice_per_class": dice, "train_minutes": round(train_s / 60, 2),
            "members": max(1, len(members)),
            "predict_minutes": round(predict_s / 60, 2), "patch_size": train["patch_size"],
            "base_width": model["base_width"], "depth": model["depth"], "pool_sizes": model["pool_sizes"],
            "target_spacing": plan["config"]["data"]["spacing"], "plan": plan["fingerprint"].get("reasons", [])}


def nnunet_arm(variant: str, train_ds: Path, train_ids: list[str], test_img: Path, test_lbl: Path, out: Path,
               minutes: float, seed: int, tag: str = "") -> dict:
    from _nnunet import train_and_predict

    ending = json.loads((train_ds / "dataset.json").read_text()).get("file_ending", ".nii.gz")
    work = out / f"nnunet_{variant}{tag}"
    if work.exists():
        shutil.rmtree(work)
    t = time.monotonic()
    try:
        info = train_and_predict(train_ds, train_ids, test_images(test_img, ending), work, minutes, variant, seed=seed)
    except Exception as exc:  # an arm that cannot train in the budget scores 0, and says why
        print(f"nnU-Net {variant} failed: {exc}", flush=True)
        return {"dice": 0.0, "error": str(exc)[-2000:], "wall_minutes": round((time.monotonic() - t) / 60, 2)}
    dice = score(Path(info["pred_dir"]), test_lbl, train_ds / "dataset.json", out / f"nnunet_{variant}{tag}_metrics.csv")
    return {"dice": mean(dice), "dice_per_class": dice, **{k: v for k, v in info.items() if k != "pred_dir"}}


def reusable_nnunet_arms(out: Path, args: argparse.Namespace, n_test: int) -> dict[str, dict]:
    """nnU-Net arms of an earlier run into the same folder, with the same budget, training seeds and test count.

    Why: they do not depend on volseg's code and cost most of the run (nnU-Net's default network
    takes minutes per case to predict on a CPU), so a change to volseg can be measured against
    them again without retraining them. Arms that failed are run again.
    """
    path = out / "result.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if (earlier.get("minutes") != args.minutes or earlier.get("n_test") != n_test
            or earlier.get("train_seeds", [earlier.get("seed", 0)]) != args.train_seeds):
        return {}
    return {k: v for k, v in earlier.get("arms", {}).items()
            if k.startswith("nnunet_") and "error" not in v and v.get("dice", 0) > 0}


def compare(name: str, train_ds: Path, test_img: Path, test_lbl: Path, out: Path, args: argparse.Namespace) -> dict:
    """The three arms on one dataset; the figures the issue asks for."""
    ending = json.loads((train_ds / "dataset.json").read_text()).get("file_ending", ".nii.gz")
    train_ids = sorted(p.name[: -len(ending)] for p in (train_ds / "labelsTr").glob(f"*{ending}"))
    arms = {"volseg": repeated("volseg", args.train_seeds, lambda s, tag: volseg_arm(
        train_ds, test_img, test_lbl, out, args.minutes, s, args.extra.split(), tag))}
    n_test = len(test_images(test_img, ending))
    earlier = reusable_nnunet_arms(out, args, n_test) if args.reuse_nnunet else {}
    for variant in args.nnunet:
        name_ = f"nnunet_{variant}"
        if name_ in earlier:
            print(f"{name}: nnU-Net {variant} reused from {out / 'result.json'} (same cases, same budget)", flush=True)
            arms[name_] = {**earlier[name_], "reused": True}
            continue
        arms[name_] = repeated(name_, args.train_seeds, lambda s, tag, v=variant: nnunet_arm(
            v, train_ds, train_ids, test_img, test_lbl, out, args.minutes, s, tag))
    # an arm that was not run is null, not 0.0: a 0.0 is a result (the default arm gets it when its
    # few steps learn nothing)
    default = arms["nnunet_default"]["dice"] if "nnunet_default" in arms else None
    reduced = arms["nnunet_reduced"]["dice"] if "nnunet_reduced" in arms else None
    best = _best_arm(default, reduced)
    result = {
        "dice_volseg": arms["volseg"]["dice"], "dice_nnunet": best, "dice_nnunet_default": default,
        "dice_nnunet_reduced": reduced, "minutes": args.minutes,
        "ratio_to_nnunet": round(arms["volseg"]["dice"] / best, 3) if best else None,
        "n_train": len(train_ids), "n_test": n_test, "seed": args.seed,
        "train_seeds": args.train_seeds, "arms": arms,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{name}: volseg {result['dice_volseg']}  nnU-Net default {'not run' if default is None else default}  "
          f"reduced {'not run' if reduced is None else reduced}  ratio {result['ratio_to_nnunet']}", flush=True)
    return result


def _best_arm(*dice: float | None) -> float | None:
    """The better nnU-Net arm's Dice among those that were run (None when none was)."""
    run = [d for d in dice if d is not None]
    return max(run) if run else None


def _mean_of_run(values: list[float | None]) -> float | None:
    """Mean over the lesion seeds of an arm's Dice, None when the arm was not run."""
    run = [v for v in values if v is not None]
    return round(float(np.mean(run)), 4) if run else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall-time budget of every arm")
    parser.add_argument("--datasets", default="hippocampus,lesions")
    parser.add_argument("--lesion-seeds", default="0", help="comma-separated seeds of the synthetic lesion sets")
    parser.add_argument("--lesion-train", type=int, default=6)
    parser.add_argument("--lesion-test", type=int, default=4)
    parser.add_argument("--hippocampus", type=Path, default=SHARED_DATA / "Dataset004_Hippocampus")
    parser.add_argument("--nnunet", default="default,reduced", help="nnU-Net arms to run ('' for none)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (hippocampus) and training seed")
    parser.add_argument("--train-seeds", default=None,
                        help="comma-separated training seeds: every arm is trained once per seed and its Dice averaged "
                             "(default: --seed)")
    parser.add_argument("--extra", default="", help="extra `volseg train` flags")
    parser.add_argument("--reuse-nnunet", action="store_true",
                        help="take the nnU-Net arms from an earlier run's result.json in --out (same budget, "
                             "training seeds and number of test cases)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/generalisation"))
    args = parser.parse_args()
    args.nnunet = [v for v in args.nnunet.split(",") if v]
    args.train_seeds = [int(s) for s in args.train_seeds.split(",")] if args.train_seeds else [args.seed]
    results: dict[str, dict] = {}
    for name in args.datasets.split(","):
        if name == "hippocampus":
            out = args.out / "hippocampus"
            earlier = (out / "result.json").read_text() if (out / "result.json").exists() else None
            if out.exists():
                shutil.rmtree(out)  # the split is made afresh (its seed may differ)
            out.mkdir(parents=True)
            if earlier is not None:
                (out / "result.json").write_text(earlier)
            train_ds, test_img, test_lbl, _, _ = split_dataset(args.hippocampus, out, 0.2, args.seed)
            results["hippocampus"] = compare(name, train_ds, test_img, test_lbl, out, args)
        elif name == "lesions":
            for seed in (int(s) for s in args.lesion_seeds.split(",")):
                out = args.out / f"lesions_seed{seed}"
                out.mkdir(parents=True, exist_ok=True)
                train_ds, test_img, test_lbl = lesion_dataset(out, seed, args.lesion_train, args.lesion_test)
                results[f"lesions_seed{seed}"] = compare(name, train_ds, test_img, test_lbl, out, args)
        else:
            sys.exit(f"unknown dataset {name!r} (hippocampus, lesions)")
    summary = {k: {f: v[f] for f in ("dice_volseg", "dice_nnunet", "dice_nnunet_default", "dice_nnunet_reduced",
                                     "minutes", "ratio_to_nnunet")} for k, v in results.items()}
    seeds = [v for k, v in summary.items() if k.startswith("lesions_seed")]
    if len(seeds) > 1:  # the lesion dataset over its seeds: each arm's mean, then the better nnU-Net arm
        pooled = {f: _mean_of_run([v[f] for v in seeds])
                  for f in ("dice_volseg", "dice_nnunet_default", "dice_nnunet_reduced")}
        best = _best_arm(pooled["dice_nnunet_default"], pooled["dice_nnunet_reduced"])
        summary["lesions"] = {**pooled, "dice_nnunet": best, "minutes": args.minutes, "seeds": len(seeds),
                              "ratio_to_nnunet": round(pooled["dice_volseg"] / best, 3) if best else None}
    ratios = [v["ratio_to_nnunet"] for v in summary.values() if v["ratio_to_nnunet"] is not None]
    print(json.dumps({**summary, "min_ratio_to_nnunet": min(ratios) if ratios else None}))


if __name__ == "__main__":
    main()
