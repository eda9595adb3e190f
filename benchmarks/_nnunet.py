"""nnU-Net v2 trained on the CPU within a wall-clock budget, then predicting held-out cases.

Why: `generalisation.py` compares volseg with nnU-Net at equal training time. nnU-Net's own
command line trains 1000 epochs of 250 steps; here its trainer is driven step by step instead
(its classes, not a copy of its code), with the number of epochs and steps per epoch set from a
timed first epoch, and the epoch count re-planned after every later epoch from the time those
epochs really took, so that its polynomial learning-rate decay ends at the budget, as it would
after a full run. Two arms:

- "default": 3d_fullres exactly as `nnUNetv2_plan_and_preprocess` plans it;
- "reduced": the same plans.json with a configuration "3d_cpu" added, as nnU-Net's documentation
  describes editing plans: it inherits 3d_fullres (same preprocessed data) and sets a smaller
  patch (at most `CPU_PATCH_VOXELS`, shrunk along its largest axis by that axis' pooling divisor),
  batch 2, base features 16 (doubling per stage, capped at 320), and only the stages the patch
  still has 4 voxels for.

Both train fold 0 of nnU-Net's own 5-fold split (its default), on `torch.device("cpu")` with
`threads` threads and one data-augmentation worker (`nnUNet_n_proc_DA=1`: on 2 cores a second
worker only competes with the training step), torch.compile off. Prediction uses the final
checkpoint, Gaussian-weighted windows with step 0.5 and no mirroring (volseg is scored without
test-time mirroring too). Each phase runs in its own process (nnU-Net reads its folders from
environment variables at import time); logs go to `work/logs/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CPU_PATCH_VOXELS = 80**3  # the voxel budget of volseg's CPU patch
DATASET_ID = 987

_TRAIN = r'''
import json, math, sys, time
import numpy as np, torch
args = json.loads(sys.argv[1])
torch.manual_seed(args["seed"]); np.random.seed(args["seed"])
torch.set_num_threads(args["threads"])
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
plans = load_json(args["plans"])
plans["continue_training"] = False  # what nnU-Net's run_training adds before building its trainer
trainer = nnUNetTrainer(plans, args["configuration"], 0, load_json(args["dataset_json"]), device=torch.device("cpu"))
budget = args["minutes"] * 60
start = time.monotonic()
trainer.num_iterations_per_epoch = 3  # the first epoch times the step
trainer.num_val_iterations_per_epoch = 1
trainer.num_epochs = 1000
trainer.on_train_start()
steps, epoch, step_s = 0, 0, []
while True:
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    outs = []
    for _ in range(trainer.num_iterations_per_epoch):
        t = time.monotonic()
        outs.append(trainer.train_step(next(trainer.dataloader_train)))
        step_s.append(time.monotonic() - t)
        steps += 1
    trainer.on_train_epoch_end(outs)
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        vals = [trainer.validation_step(next(trainer.dataloader_val)) for _ in range(trainer.num_val_iterations_per_epoch)]
        trainer.on_validation_epoch_end(vals)
    trainer.on_epoch_end()
    epoch += 1
    elapsed = time.monotonic() - start
    if epoch == 1:
        # about 20 epochs in the budget (each ends with nnU-Net's logging, plotting and checkpointing),
        # 2..250 steps each (nnU-Net's 250), a fifth of that validating
        left = budget - elapsed
        step = float(np.median(step_s))
        iters = int(np.clip(left / 20 / (1.2 * step), 2, 250))
        trainer.num_iterations_per_epoch = iters
        trainer.num_val_iterations_per_epoch = max(1, iters // 5)
        epoch_s = 1.2 * iters * step + 0.2 * (iters // 5 + 1) * step
        trainer.num_epochs = max(2, 1 + int(left // epoch_s))
        trainer.lr_scheduler.max_steps = trainer.num_epochs
        per_epoch = epoch_s
    else:
        # re-plan from the epochs measured so far: the first epoch's estimate misses nnU-Net's own
        # per-epoch costs (validation, logging, plotting, checkpointing), and on its own it left up
        # to a quarter of the budget unused; the decay is stretched to end at the new last epoch
        per_epoch = (elapsed - first_s) / (epoch - 1)
        trainer.num_epochs = max(epoch, epoch + int((budget - elapsed) // per_epoch))
        trainer.lr_scheduler.max_steps = trainer.num_epochs
    if epoch == 1:
        first_s = elapsed
    if epoch >= trainer.num_epochs or elapsed + per_epoch > budget:
        break
train_s = time.monotonic() - start
trainer.num_epochs = epoch
trainer.on_train_end()
json.dump({"epochs": epoch, "steps": steps, "iterations_per_epoch": trainer.num_iterations_per_epoch,
           "step_seconds": float(np.mean(step_s)), "train_seconds": train_s}, open(args["result"], "w"))
'''

_PREDICT = r'''
import json, sys
import torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
                            device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
predictor.initialize_from_trained_model_folder(args["model"], use_folds=(0,), checkpoint_name="checkpoint_final.pth")
predictor.predict_from_files(args["inputs"], args["outputs"], save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
'''


def _env(work: Path, shared: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(shared / "raw"), "nnUNet_preprocessed": str(shared / "preprocessed"),
        "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "false",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
    })
    return env


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Run a phase, its output to `log`; RuntimeError with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({log}):\n" + log.read_text()[-3000:])
    return time.monotonic() - t


def _raw_dataset(dataset: Path, train_ids: list[str], work: Path) -> Path:
    """nnU-Net's raw folder holding only the training cases (links, not copies)."""
    info = json.loads((dataset / "dataset.json").read_text())
    ending = info.get("file_ending", ".nii.gz")
    raw = work / "raw" / f"Dataset{DATASET_ID}_Bench"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    n_channels = len(info["channel_names"])
    for case in train_ids:
        for c in range(n_channels):
            name = f"{case}_{c:04d}{ending}"
            (raw / "imagesTr" / name).symlink_to((dataset / "imagesTr" / name).resolve())
        (raw / "labelsTr" / f"{case}{ending}").symlink_to((dataset / "labelsTr" / f"{case}{ending}").resolve())
    keep = {k: info[k] for k in ("channel_names", "labels", "file_ending") if k in info}
    (raw / "dataset.json").write_text(json.dumps({**keep, "numTraining": len(train_ids)}, indent=2))
    return raw


def reduce_configuration(config: dict, max_voxels: int = CPU_PATCH_VOXELS, base_features: int = 16) -> dict:
    """A "3d_cpu" configuration from a planned 3d_fullres one: smaller patch and network, batch 2.

    The patch's largest axis loses one pooling divisor at a time until the patch fits `max_voxels`;
    stages whose feature maps would drop below 4 voxels on an axis that is still pooled are dropped.
    """
    arch = json.loads(json.dumps(config["architecture"]))
    kw = arch["arch_kwargs"]
    strides = [list(s) for s in kw["strides"]]
    patch = list(config["patch_size"])

    def divisor(n_stages: int) -> list[int]:
        div = [1] * len(patch)
        for s in strides[:n_stages]:
            div = [d * x for d, x in zip(div, s)]
        return div

    n_stages = kw["n_stages"]
    while True:
        div = divisor(n_stages)
        voxels = 1
        for p in patch:
            voxels *= p
        if voxels <= max_voxels:
            break
        axis = max(range(len(patch)), key=lambda a: patch[a] / div[a])
        if patch[axis] - div[axis] < div[axis]:
            if n_stages <= 2:
                break
            n_stages -= 1
            continue
        patch[axis] -= div[axis]
    while n_stages > 2:  # every pooled axis keeps 4 voxels at the bottleneck
        div = divisor(n_stages)
        if all(p // d >= 4 or s == 1 for p, d, s in zip(patch, div, strides[n_stages - 1])):
            break
        n_stages -= 1
    kw["n_stages"] = n_stages
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        kw[key] = kw[key][:n_stages]
    kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][: n_stages - 1]
    kw["features_per_stage"] = [min(base_features * 2**i, 320) for i in range(n_stages)]
    return {"inherits_from": "3d_fullres", "patch_size": patch, "batch_size": 2, "architecture": arch}


def train_and_predict(dataset: Path, train_ids: list[str], test_images: dict[str, list[Path]], work: Path,
                      minutes: float, variant: str, seed: int = 0, threads: int = 2) -> dict:
    """Plan, preprocess, train within `minutes` and predict `test_images` into `work/pred_<variant>/`.

    nnU-Net's plan and preprocessed data are made once in `<work>/../nnunet_shared` (given the
    same training cases) and shared by both variants: "3d_cpu" inherits the 3d_fullres data.
    """
    if variant not in ("default", "reduced"):
        raise ValueError(f"unknown nnU-Net variant {variant!r}")
    work = Path(work).resolve()
    shared = work.parent / "nnunet_shared"
    env = _env(work, shared, threads)
    pre = shared / "preprocessed" / f"Dataset{DATASET_ID}_Bench"
    stamp = shared / "train_ids.json"
    t0 = time.monotonic()
    if not (stamp.exists() and json.loads(stamp.read_text()) == sorted(train_ids) and (pre / "nnUNetPlans.json").exists()):
        if shared.exists():
            import shutil

            shutil.rmtree(shared)
        _raw_dataset(Path(dataset), train_ids, shared)
        _run([sys.executable, "-m", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "-d",
              str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1"], work / "logs" / "plan.log", env)
        stamp.write_text(json.dumps(sorted(train_ids)))
    plan_s = time.monotonic() - t0
    plans_file = pre / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    configuration = "3d_fullres"
    if variant == "reduced":
        plans["configurations"]["3d_cpu"] = reduce_configuration(plans["configurations"]["3d_fullres"])
        plans_file.write_text(json.dumps(plans, indent=2))
        configuration = "3d_cpu"
    result = work / "train_result.json"
    args = {"plans": str(plans_file), "configuration": configuration, "dataset_json": str(pre / "dataset.json"),
            "minutes": minutes, "seed": seed, "threads": threads, "result": str(result)}
    _run([sys.executable, "-c", _TRAIN, json.dumps(args)], work / "logs" / "train.log", env)
    trained = json.loads(result.read_text())
    model = work / "results" / f"Dataset{DATASET_ID}_Bench" / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    pred = work / f"pred_{variant}"
    pred.mkdir(parents=True, exist_ok=True)
    ending = json.loads((pre / "dataset.json").read_text())["file_ending"]
    cases = sorted(test_images)
    p_args = {"model": str(model), "threads": threads, "inputs": [[str(p) for p in test_images[c]] for c in cases],
              "outputs": [str(pred / c) for c in cases]}
    predict_s = _run([sys.executable, "-c", _PREDICT, json.dumps(p_args)], work / "logs" / "predict.log", env)
    cfg = plans["configurations"][configuration]
    merged = {**plans["configurations"]["3d_fullres"], **cfg}
    kw = merged["architecture"]["arch_kwargs"]
    return {
        "variant": variant, "pred_dir": str(pred), "file_ending": ending,
        "train_minutes": round(trained["train_seconds"] / 60, 2), "plan_minutes": round(plan_s / 60, 2),
        "predict_minutes": round(predict_s / 60, 2), "epochs": trained["epochs"],
        "iterations_per_epoch": trained["iterations_per_epoch"], "steps": trained["steps"],
        "step_seconds": round(trained["step_seconds"], 3), "patch_size": merged["patch_size"],
        "batch_size": merged["batch_size"], "features_per_stage": kw["features_per_stage"], "strides": kw["strides"],
        "spacing": merged.get("spacing"),
    }
