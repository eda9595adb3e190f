"""`volseg` command line: thin Typer commands that build a config and call one library function.

Heavy imports (torch, the training loop) happen inside the commands so `volseg --help` is instant.
Exit codes: 0 success, 2 bad input (one line on stderr), 1 a bug (traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from volseg.errors import VolsegError

app = typer.Typer(
    name="volseg",
    help="3D U-Net segmentation of medical volumes: train, predict, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEMO_MARKER = ".volseg-demo"


def _echo(text: str) -> None:
    typer.echo(text)


@app.command()
def train(
    dataset: Annotated[Path, typer.Argument(help="nnU-Net-layout dataset folder (imagesTr/, labelsTr/, dataset.json)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="run folder for models, metrics and plots")],
    max_minutes: Annotated[Optional[float], typer.Option(help="wall-time budget, preprocessing included")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed for the split, initialisation and sampling")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in OUTPUT after an interruption")] = False,
    patch_size: Annotated[Optional[str], typer.Option(help="patch size as I,J,K voxels (default: planned)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="patches per step (default: planned)")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="stop after this many epochs")] = None,
    iters_per_epoch: Annotated[Optional[int], typer.Option(help="steps per epoch; 0 = about 1/30 of the budget")] = None,
    patience: Annotated[Optional[int], typer.Option(help="stop after this many epochs without a better validation loss")] = None,
    lr: Annotated[Optional[float], typer.Option(help="initial learning rate")] = None,
    loss: Annotated[Optional[str], typer.Option(help="dice_ce, ce, dice, bce (weighted binary cross-entropy, one-vs-rest) or bce_dice")] = None,
    border_w0: Annotated[Optional[float], typer.Option(help="U-Net border weight w0 between touching objects (0 = off)")] = None,
    border_sigma_mm: Annotated[Optional[float], typer.Option(help="width sigma of the border weight, in mm")] = None,
    class_balance: Annotated[Optional[bool], typer.Option("--class-balance/--no-class-balance", help="weight voxels by inverse class frequency")] = None,
    foreground_sampling: Annotated[Optional[str], typer.Option(help="voxel (any foreground voxel of the drawn class) or object (each connected object as often, so small lesions beside large ones are seen as often)")] = None,
    base_width: Annotated[Optional[int], typer.Option(help="feature channels at full resolution")] = None,
    depth: Annotated[Optional[int], typer.Option(help="resolution levels of the U-Net")] = None,
    norm: Annotated[Optional[str], typer.Option(help="instance, batch or none")] = None,
    deep_supervision: Annotated[Optional[bool], typer.Option("--deep-supervision/--no-deep-supervision", help="also train on the loss of coarser decoder levels (default: planned)")] = None,
    normalization: Annotated[Optional[str], typer.Option(help="zscore, zscore_nonzero, ct or none for every channel (default: planned per channel)")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="plan file from `volseg plan` (default: plan now)")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="random rotation, scaling, elastic deformation, intensity changes and mirroring of training patches")] = None,
    fold: Annotated[Optional[int], typer.Option(help="cross-validation fold to validate on (0-based)")] = None,
    folds: Annotated[Optional[int], typer.Option(help="number of cross-validation folds (with --fold)")] = None,
    members: Annotated[Optional[int], typer.Option(help="models trained one after another, each with its share of the budget, its own seed and validation split, averaged by `volseg predict -m OUTPUT` (default: 2 below 10 cases, else 1)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="also log every epoch to OUTPUT/tensorboard/ for TensorBoard")] = False,
) -> None:
    """Train a 3D U-Net on every case of DATASET (a validation split is taken inside)."""
    from volseg import report
    from volseg.train import METRICS_CSV, train as run_training

    overrides: dict[str, dict[str, Any]] = {
        "train": {
            "patch_size": _parse_triple(patch_size, "--patch-size") if patch_size else None,
            "batch_size": batch_size, "max_epochs": max_epochs, "iters_per_epoch": iters_per_epoch,
            "patience": patience, "lr": lr, "loss": loss, "fold": fold, "folds": folds,
            "augment": augment, "border_w0": border_w0, "border_sigma_mm": border_sigma_mm,
            "class_balance": class_balance, "foreground_sampling": foreground_sampling,
        },
        "model": {"base_width": base_width, "depth": depth, "norm": norm, "deep_supervision": deep_supervision},
        # one method for every channel replaces the planned per-channel choice
        "data": {"normalization": normalization, "channel_normalization": () if normalization else None},
    }

    log = None
    if tensorboard and os.environ.get("RANK", "0") == "0":
        log = report.tensorboard_logger(output / "tensorboard")

    def plot(run_dir: Path, row: dict[str, Any]) -> None:
        report.plot_training_curves(run_dir / METRICS_CSV, run_dir / "training_curves.png")
        if log is not None:
            log(row)

    summary = run_training(dataset, output, max_minutes=max_minutes, seed=seed, device=device,
                           overrides=overrides, resume=resume, progress=not quiet, on_epoch=plot, plan=plan,
                           members=members)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    if summary.get("members", 1) > 1:
        _echo(f"{summary['members']} models trained ({summary['minutes']:.1f} min; mean best validation Dice "
              f"{summary['best_val_dice']:.4f}); `volseg predict -m {output}` averages them")
        return
    _echo(f"best validation Dice {summary['best_val_dice']:.4f} after {summary['epochs']} epochs "
          f"({summary['minutes']:.1f} min, stopped: {summary['stop_reason']}); model in {output}")


@app.command("plan")
def plan_command(
    dataset: Annotated[Path, typer.Argument(help="nnU-Net-layout dataset folder")],
    output: Annotated[Path, typer.Option("-o", "--output", help="plan JSON to write (edit it, then train --plan)")] = Path("plan.json"),
    device: Annotated[str, typer.Option(help="plan for auto, cpu or cuda")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing plan file")] = False,
    max_minutes: Annotated[float, typer.Option(help="training budget the width is fitted to (timed on this device)")] = 60.0,
) -> None:
    """Fingerprint a dataset and write an editable training plan (spacing, normalisation, patch, network, width),
    explaining each choice in one line."""
    from volseg import layout
    from volseg.inference import autocast_dtype, resolve_device
    from volseg.planning import plan_members, plan_run

    if output.exists() and not overwrite:
        raise VolsegError(output, "output already exists", "pass --overwrite to replace it")
    info, cases = layout.read_dataset(dataset)
    dev = resolve_device(device)
    k, why = plan_members(len(cases))
    # each of k models trains for its share of the budget, so that share is what the plan fits
    cfg, fingerprint, reasons = plan_run(info, cases, dev, max_minutes=max_minutes / k, amp_dtype=autocast_dtype(dev))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_minutes=max_minutes))  # the whole budget
    reasons = [why, *reasons]
    from volseg.report import write_json

    write_json(output, {"config": json.loads(cfg.to_json()), "fingerprint": fingerprint})
    t = cfg.train
    _echo(f"{len(cases)} cases; target spacing {cfg.data.spacing} mm; normalisation {cfg.data.channel_methods}; "
          f"patch {t.patch_size}, batch {t.batch_size}, depth {cfg.model.depth}, width {cfg.model.base_width}")
    for line in reasons:
        _echo(f"  - {line}")
    _echo(f"plan written to {output}; train with `volseg train {dataset} -o RUN --plan {output}`")


@app.command()
def predict(
    model: Annotated[list[Path], typer.Option("-m", "--model", help="run folder or .safetensors model file; repeat for an ensemble (e.g. folds)")],
    input: Annotated[Path, typer.Option("-i", "--input", help="image file, DICOM folder, or folder of <case>_<CCCC> images")],
    output: Annotated[Path, typer.Option("-o", "--output", help="output file or folder")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    skip_existing: Annotated[bool, typer.Option("--continue", help="skip cases whose output already exists")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace outputs that already exist")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    save_probabilities: Annotated[bool, typer.Option("--save-probabilities", help="also write class probabilities, (I, J, K, C) NIfTI, to probabilities/<case>.nii.gz beside each output")] = False,
    min_size_voxels: Annotated[int, typer.Option(help="remove components (per class, 26-connected) smaller than this many voxels")] = 0,
    min_size_mm3: Annotated[float, typer.Option("--min-size-mm3", help="remove components (per class) smaller than this volume in mm³ (input spacing)")] = 0.0,
    keep_largest: Annotated[bool, typer.Option("--keep-largest", help="keep only the largest component of each class")] = False,
    compile: Annotated[str, typer.Option(help="torch.compile the network on the CPU: auto (when the windows ahead make it pay), on, off")] = "auto",
    tta: Annotated[bool, typer.Option("--tta", help="mirroring test-time augmentation: average the 8 flips (8x the work)")] = False,
    skip_empty: Annotated[bool, typer.Option("--skip-empty", help="do not run windows whose input is all 0 (e.g. masked-out air); they count as background")] = False,
) -> None:
    """Segment images with a trained model; outputs keep the input's geometry.

    Existing outputs are refused unless --overwrite; --continue resumes an interrupted folder run.
    """
    from volseg.prediction_files import predict_paths

    t = time.monotonic()
    written = predict_paths(model, input, output, device=device, overwrite=overwrite, skip_existing=skip_existing,
                            progress=not quiet, save_probabilities=save_probabilities,
                            min_size_voxels=min_size_voxels, min_size_mm3=min_size_mm3, keep_largest=keep_largest,
                            compile=compile, mirror=tta, skip_empty=skip_empty)
    _echo(f"wrote {len(written)} segmentation(s) to {output} in {time.monotonic() - t:.1f} s")


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="folder of predicted <case><ending> segmentations")],
    ref: Annotated[Path, typer.Argument(help="folder of reference segmentations with the same names")],
    output: Annotated[Path, typer.Option("-o", "--output", help="per-case, per-label CSV")] = Path("metrics.csv"),
    dataset_json: Annotated[Optional[Path], typer.Option(help="dataset.json for label names (default: next to REF)")] = None,
    workers: Annotated[int, typer.Option(help="processes reading and scoring cases side by side")] = 1,
    plot: Annotated[bool, typer.Option(help="also write a box plot PNG next to the CSV")] = True,
    nsd_tolerance_mm: Annotated[float, typer.Option(help="surface Dice (NSD) tolerance in mm")] = 1.0,
    instances: Annotated[bool, typer.Option("--instances", help="also score objects (lesion detection F1, merges, splits)")] = False,
    min_volume_mm3: Annotated[float, typer.Option(help="drop predicted components and objects smaller than this (mm³)")] = 0.0,
    ref_instances: Annotated[Optional[Path], typer.Option(help="folder of reference instance maps, same names (implies --instances)")] = None,
) -> None:
    """Dice, Jaccard, precision, recall, volume difference, HD, HD95, ASSD and NSD (mm) per case and label."""
    from volseg import layout, report

    labels = None
    ending = ".nii.gz"
    ignore = None
    candidate = dataset_json or (ref.parent / "dataset.json")
    if candidate.is_file():
        info = layout.read_dataset_info(candidate.parent)
        labels = {v: n for n, v in info.labels if v != 0 and v != info.ignore_label}
        ending = info.file_ending
        ignore = info.ignore_label
    elif dataset_json is not None:
        raise VolsegError(dataset_json, "file not found")
    rows = report.evaluate_folders(pred, ref, labels, file_ending=ending, out_csv=output, workers=workers,
                                   nsd_tolerance_mm=nsd_tolerance_mm, ignore_label=ignore, instances=instances,
                                   min_volume_mm3=min_volume_mm3, ref_instances_dir=ref_instances)
    summary = report.summarize(rows)
    summary["nsd_tolerance_mm"] = nsd_tolerance_mm
    if min_volume_mm3 > 0:
        summary["min_volume_mm3"] = min_volume_mm3
    report.write_json(output.with_suffix(".summary.json"), summary)
    if plot:
        report.plot_metric_boxes(rows, output.with_suffix(".png"))
    _echo(report.format_summary(summary))
    _echo(f"per-case metrics: {output}")


@app.command()
def check(dataset: Annotated[Path, typer.Argument(help="nnU-Net-layout dataset folder")]) -> None:
    """Report every problem of a dataset at once (exit 2 if there is any)."""
    from volseg import layout

    problems = layout.check_dataset(dataset)
    if problems:
        for p in problems:
            typer.echo(p, err=True)
        typer.echo(f"{dataset}: {len(problems)} problem(s) found", err=True)
        raise typer.Exit(2)
    _echo(f"{dataset}: OK")


@app.command()
def synth(
    output: Annotated[Path, typer.Option("-o", "--output", help="dataset folder to create")],
    cases: Annotated[int, typer.Option(help="training cases")] = 12,
    test_cases: Annotated[int, typer.Option(help="extra cases in imagesTs/labelsTs")] = 0,
    shape: Annotated[str, typer.Option(help="volume shape I,J,K in voxels")] = "48,48,48",
    spacing: Annotated[str, typer.Option(help="voxel spacing I,J,K in mm")] = "1,1,1",
    classes: Annotated[int, typer.Option(help="label classes including background")] = 3,
    channels: Annotated[int, typer.Option(help="input channels")] = 1,
    noise: Annotated[float, typer.Option(help="noise std relative to contrast")] = 0.1,
    bias: Annotated[float, typer.Option(help="bias-field amplitude")] = 0.3,
    touching: Annotated[bool, typer.Option(help="place objects so that some touch")] = True,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing folder")] = False,
    kind: Annotated[str, typer.Option(help="blobs (phantoms shaped by --shape/--spacing/--classes/--channels) or "
                                           "lesions (thick-slice T1c + FLAIR brain MRI with tumours, 0.5 x 0.5 x 5-7 mm)")] = "blobs",
    in_plane: Annotated[int, typer.Option(help="lesions: pixels across the 256 mm field of view (512 = 0.5 mm)")] = 512,
) -> None:
    """Write a seeded synthetic dataset in the nnU-Net layout."""
    from volseg import synthetic

    if kind not in ("blobs", "lesions"):
        raise VolsegError(None, f"unknown --kind {kind!r}", "use blobs or lesions")
    _refuse_existing(output, overwrite)
    if kind == "lesions":
        from volseg.synthetic_lesions import write_lesion_dataset

        write_lesion_dataset(output, n_cases=cases, n_test=test_cases, seed=seed, in_plane=in_plane)
        _echo(f"wrote {cases} training and {test_cases} test cases to {output}")
        return
    synthetic.write_dataset(
        output, n_cases=cases, shape_vox=_parse_triple(shape, "--shape", int),
        spacing_mm=_parse_triple(spacing, "--spacing", float), n_classes=classes, n_channels=channels,
        seed=seed, noise=noise, bias=bias, touching=touching, n_test=test_cases,
    )
    _echo(f"wrote {cases} training and {test_cases} test cases to {output}")


@app.command()
def sparsify(
    dataset: Annotated[Path, typer.Argument(help="densely labelled nnU-Net-layout dataset")],
    output: Annotated[Path, typer.Option("-o", "--output", help="sparse dataset folder to create")],
    slices_per_axis: Annotated[Optional[int], typer.Option(help="labelled slices kept on each chosen axis")] = None,
    axes: Annotated[str, typer.Option(help="axes to keep slices on, any of 0,1,2 (I, J, K)")] = "0,1,2",
    strategy: Annotated[str, typer.Option(help="even or random slice positions")] = "even",
    fraction: Annotated[Optional[float], typer.Option(help="instead of K slices: this fraction of each axis's slices")] = None,
    seed: Annotated[int, typer.Option(help="seed for random slice positions")] = 0,
    copy_images: Annotated[bool, typer.Option("--copy-images", help="copy images instead of linking them")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output folder")] = False,
) -> None:
    """Write a sparsely labelled copy of a dataset: a few whole slices labelled, the rest `ignore`."""
    from volseg.sparsify import sparsify_dataset

    if slices_per_axis is None and fraction is None:
        raise VolsegError(None, "give --slices-per-axis K or --fraction F")
    try:
        axis_tuple = tuple(int(a) for a in axes.split(","))
    except ValueError:
        raise VolsegError(None, f"--axes must be comma-separated axis numbers, got {axes!r}") from None
    result = sparsify_dataset(dataset, output, slices_per_axis, axis_tuple, strategy, seed, fraction,
                              copy_images=copy_images, overwrite=overwrite)
    _echo(f"wrote {output}: {100 * result['labelled_fraction']:.2f}% of voxels labelled "
          f"(ignore label {result['ignore_label']})")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="demo folder (re-created on each run)")] = Path("volseg_demo"),
    minutes: Annotated[float, typer.Option(help="training budget")] = 3.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Synthesize a dataset, train, predict the held-out cases, evaluate, and plot — all on this machine."""
    from volseg import layout, report, synthetic, volumes
    from volseg.prediction_files import predict_paths
    from volseg.train import METRICS_CSV, train as run_training

    t0 = time.monotonic()
    if output.exists():
        if not (output / DEMO_MARKER).exists():
            raise VolsegError(output, "exists and is not a volseg demo folder", "choose another --output")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    (output / DEMO_MARKER).write_text("created by `volseg demo`; deleted and re-created on each demo run\n")
    data = output / "data"
    _echo(f"[1/4] synthesizing a dataset in {data}")
    synthetic.write_dataset(data, n_cases=16, n_test=4, shape_vox=(40, 40, 32), spacing_mm=(1.0, 1.0, 1.25),
                            n_classes=3, n_channels=1, seed=seed)
    _echo(f"[2/4] training for up to {minutes:g} min")
    run = output / "run"
    # the phantoms need no augmentation to generalise, and a 2-3 minute budget is better spent on steps
    summary = run_training(data, run, max_minutes=minutes, seed=seed, device=device,
                           overrides={"train": {"augment": False}},
                           on_epoch=lambda d, r: report.plot_training_curves(d / METRICS_CSV, d / "training_curves.png"))
    _echo(f"[3/4] predicting {data / 'imagesTs'}")
    pred = output / "predictions"
    predict_paths(run, data / "imagesTs", pred, device=device)
    _echo("[4/4] evaluating")
    info = layout.read_dataset_info(data)
    labels = {v: n for n, v in info.labels if v != 0}
    rows = report.evaluate_folders(pred, data / "labelsTs", labels, out_csv=output / "metrics.csv")
    summ = report.summarize(rows)
    report.write_json(output / "metrics.summary.json", summ)
    first = sorted(pred.iterdir())[0]
    case = first.name[: -len(info.file_ending)]
    image = volumes.read_volume(data / "imagesTs" / f"{case}_0000{info.file_ending}")
    report.plot_overlay(image.array[0], volumes.read_label(first).array[0], output / "overlay.png",
                        ref=volumes.read_label(data / "labelsTs" / first.name).array[0], spacing=image.spacing,
                        title=f"{case}: prediction (solid) vs reference (dashed)")
    _echo(report.format_summary(summ))
    mean = summ["all"]["dice"]
    _echo(json.dumps({"mean_dice": round(mean, 4), "train_minutes": round(summary["minutes"], 2),
                      "total_minutes": round((time.monotonic() - t0) / 60, 2)}))
    _echo(f"done: overlay {output / 'overlay.png'}, curves {run / 'training_curves.png'}, table {output / 'metrics.csv'}")


@app.command()
def info(model: Annotated[Path, typer.Argument(help="run folder or .safetensors model file")]) -> None:
    """Print a model file's configuration and validation scores."""
    from volseg.checkpoint import read_model_file

    tensors, cfg, extra = read_model_file(model)
    n = sum(t.numel() for t in tensors.values())
    _echo(cfg.to_json())
    _echo(json.dumps({"parameters": n, **extra}, indent=2))


@app.command("suggest-slices")
def suggest_slices(
    dataset: Annotated[Path, typer.Argument(help="sparsely labelled nnU-Net-layout dataset (dataset.json declares 'ignore')")],
    model: Annotated[list[Path], typer.Option("-m", "--model", help="run folder or .safetensors model file; repeat for an ensemble")],
    output: Annotated[Path, typer.Option("-o", "--output", help="folder for suggestions.csv and one preview PNG per case")],
    top_k: Annotated[int, typer.Option(help="slices to suggest per case (with --budget: at most this many per case)")] = 3,
    budget: Annotated[Optional[int], typer.Option(help="suggest only the N best slices over the whole dataset, so hard cases get more")] = None,
    axes: Annotated[str, typer.Option(help="axes to suggest slices on, any of 0,1,2 (I, J, K)")] = "0,1,2",
    mirror: Annotated[bool, typer.Option("--mirror/--no-mirror", help="average predictions mirrored along each axis")] = True,
    min_gap: Annotated[int, typer.Option(help="suggested slices on one axis are at least this many slices apart")] = 2,
    diversity: Annotated[float, typer.Option(help="0-1: how much a labelled slice lowers the worth of the same anatomy in other cases (0: rank each case alone)")] = 0.1,
    measure: Annotated[str, typer.Option(help="entropy (of the mean prediction) or mutual_information (disagreement)")] = "entropy",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing suggestions.csv")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """Rank each case's unlabelled slices by the model's uncertainty: which slices to label next."""
    from volseg.suggest import SUGGESTIONS_CSV, suggest_slices as run_suggest

    try:
        axis_tuple = tuple(int(a) for a in axes.split(","))
    except ValueError:
        raise VolsegError(None, f"--axes must be comma-separated axis numbers, got {axes!r}") from None
    rows = run_suggest(model, dataset, top_k=top_k, axes=axis_tuple, mirror=mirror, device=device, min_gap=min_gap,
                       measure=measure.replace("-", "_"), out=output, overwrite=overwrite, progress=not quiet,
                       budget=budget, diversity=diversity)
    n_cases = len({r["case"] for r in rows})
    _echo(f"{len(rows)} slices suggested for {n_cases} case(s): {output / SUGGESTIONS_CSV}; previews {output}/<case>.png")


@app.command("show")
def show_command(
    image: Annotated[Path, typer.Argument(help="image file (of a <case>_<CCCC> image, --channel picks the sibling file)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG to write")],
    seg: Annotated[Optional[Path], typer.Argument(help="segmentation on the image's grid, drawn as solid contours")] = None,
    slice_vox: Annotated[Optional[str], typer.Option("--slice", help="voxel I,J,K the three slices go through (default: centre of the objects)")] = None,
    channel: Annotated[int, typer.Option(help="input channel to show (0-based)")] = 0,
    ref: Annotated[Optional[Path], typer.Option("--ref", help="reference segmentation, drawn dashed (prediction vs reference)")] = None,
    title: Annotated[Optional[str], typer.Option(help="figure title (default: the file names)")] = None,
) -> None:
    """Draw three orthogonal slices of IMAGE with SEG (and --ref) as coloured contours into a PNG."""
    from volseg.pictures import show_volume

    position = _parse_triple(slice_vox, "--slice", int) if slice_vox else None
    centre = show_volume(image, output, seg, ref, position, channel, title)
    _echo(f"wrote {output} (slices through voxel {','.join(map(str, centre))})")


@app.command("report")
def report_command(
    run: Annotated[Path, typer.Argument(help="run folder of `volseg train`")],
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write (self-contained, opens offline)")] = Path("report.html"),
    dataset: Annotated[Optional[Path], typer.Option(help="predict the run's validation cases (split.json) of this dataset for per-case results")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="folder of predicted segmentations to score (with --labels)")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="folder of reference segmentations (with --predictions)")] = None,
    images: Annotated[Optional[Path], typer.Option(help="images for the overlays (default: imagesTs/imagesTr next to --labels)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (with --dataset)")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """One self-contained HTML report of a run: model card, curves, validation scores, per-case overlays."""
    from volseg.htmlreport import build_report

    result = build_report(run, output, dataset=dataset, predictions=predictions, labels=labels, images=images,
                          device=device, progress=not quiet)
    cases = f" with {result['cases']} scored case(s)" if result["cases"] else " (no per-case results)"
    _echo(f"wrote {output}{cases}")


def _parse_triple(text: str, flag: str, kind: type = int) -> tuple:
    try:
        values = tuple(kind(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise VolsegError(None, f"{flag} must be three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise VolsegError(None, f"{flag} must be three comma-separated numbers, got {text!r}")
    return values


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise VolsegError(path, "output already exists", "pass --overwrite to replace it")
        shutil.rmtree(path)


def main(argv: list[str] | None = None) -> None:
    """Entry point: click handles help and usage errors (exit 2); `VolsegError` becomes one line, exit 2."""
    try:
        app(args=argv, prog_name="volseg")
    except VolsegError as exc:
        typer.echo(f"volseg: error: {exc.message}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
