"""Whole-volume prediction: normalise, slide overlapping windows, blend, argmax, restore geometry.

`sliding_window` takes any `predictor` callable (windows in, logits out), so other networks can be
run through the same tiling and blending.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from volseg import io
from volseg.config import Config
from volseg.errors import VolsegError
from volseg.model import valid_output_size
from volseg.preprocessing import (
    decode_labels,
    needs_resampling,
    normalize,
    resample_image,
    resample_probabilities,
)
from volseg.sampling import crop_pad, gaussian_importance, sliding_window_grid

Predictor = Callable[[torch.Tensor], torch.Tensor]


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" means the GPU when there is one; asking for CUDA without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VolsegError(None, f"device {device!r} requested but no CUDA GPU is available", "use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise VolsegError(None, f"unknown device {device!r}", "use auto, cpu or cuda")
    return torch.device(device)


def output_window(cfg: Config, patch: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Output size per window and the margin cut off on each side (non-zero only with valid padding)."""
    out = tuple(valid_output_size(cfg.model, p) for p in patch)
    if 0 in out:
        raise VolsegError(None, f"patch size {tuple(patch)} does not fit the network (depth {cfg.model.depth})")
    return out, tuple((p - o) // 2 for p, o in zip(patch, out))


@torch.inference_mode()
def sliding_window(
    image: np.ndarray,
    predictor: Predictor,
    patch: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    blend: str = "gaussian",
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    out_patch: Sequence[int] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Class probabilities (num_classes, I, J, K) of a normalised (C, I, J, K) image.

    Windows of `patch` voxels overlap by `overlap`; each window's softmax is weighted by a Gaussian
    (or uniformly) and the weighted sum is divided by the summed weights. Volumes smaller than a
    window are zero-padded. With a valid-padding network, `out_patch` is the (smaller, centred)
    output of one `patch`-sized input and the grid tiles the output space.
    """
    if blend not in ("gaussian", "uniform"):
        raise VolsegError(None, f"unknown blending {blend!r}", "use gaussian or uniform")
    if not 0 <= overlap < 1:
        raise VolsegError(None, f"overlap must be in [0, 1), got {overlap}")
    patch = tuple(int(p) for p in patch)
    out_patch = patch if out_patch is None else tuple(int(p) for p in out_patch)
    margin = [(p - o) // 2 for p, o in zip(patch, out_patch)]
    shape = image.shape[1:]
    padded = tuple(max(s, o) for s, o in zip(shape, out_patch))
    weight = gaussian_importance(out_patch) if blend == "gaussian" else np.ones(out_patch, np.float32)
    weight_t = torch.from_numpy(weight).to(device)
    acc = torch.zeros((num_classes, *padded), dtype=torch.float32, device=device)
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    starts = sliding_window_grid(padded, out_patch, overlap)
    image_t = torch.from_numpy(np.require(image, np.float32, ["C", "W"]))  # memmaps are read-only
    needs_padding = any(margin) or padded != tuple(shape)
    iterator = range(0, len(starts), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="windows", leave=False, unit="batch", disable=None)
    for b in iterator:
        batch_starts = starts[b : b + batch_size]
        if needs_padding:  # windows reach outside the image: cut with zero padding
            tiles = [torch.from_numpy(crop_pad(image, [s - m for s, m in zip(st, margin)], patch)) for st in batch_starts]
        else:  # plain views of the image
            tiles = [image_t[(slice(None), *(slice(s, s + p) for s, p in zip(st, patch)))] for st in batch_starts]
        x = torch.stack(tiles).to(device)
        probs = torch.softmax(predictor(x).float(), dim=1)
        for st, p in zip(batch_starts, probs):
            region = tuple(slice(s, s + o) for s, o in zip(st, out_patch))
            acc[(slice(None), *region)] += p * weight_t
            norm[region] += weight_t
    acc /= norm
    return acc[(slice(None), *(slice(0, s) for s in shape))].cpu().numpy()


def make_predictor(model: torch.nn.Module, device: torch.device) -> Predictor:
    """Forward under autocast on CUDA (fp16/bf16 tensor cores); plain fp32 on the CPU."""
    model = model.to(device).eval()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=dtype):
                return model(x)

        return predict
    return model


def predict_probabilities(
    model: torch.nn.Module, cfg: Config, image: np.ndarray, device: torch.device | str = "cpu", progress: bool = False
) -> np.ndarray:
    """Normalise a raw (C, I, J, K) image as in training and return class probabilities."""
    if image.shape[0] != cfg.model.in_channels:
        raise VolsegError(None, f"image has {image.shape[0]} channels, the model expects {cfg.model.in_channels}")
    device = torch.device(device)
    patch = cfg.train.patch_size
    out_patch, _ = output_window(cfg, patch)
    return sliding_window(
        normalize(image, cfg.data.channel_methods, cfg.data.intensity_stats),
        make_predictor(model, device),
        patch,
        cfg.model.num_classes,
        overlap=cfg.infer.overlap,
        blend=cfg.infer.blend,
        batch_size=cfg.infer.batch_size,
        device=device,
        out_patch=out_patch,
        progress=progress,
    )


def probabilities_on_input_grid(
    model: torch.nn.Module, cfg: Config, volume: io.Volume, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Class probabilities (C, I, J, K) on the input's own voxel grid.

    An image whose spacing differs from the training spacing is resampled to it, predicted there,
    and the probabilities are resampled back to the input grid.
    """
    image = volume.array
    resample = cfg.data.spacing is not None and needs_resampling(volume.spacing, cfg.data.spacing)
    if resample:
        image = resample_image(image, volume.spacing, cfg.data.spacing)
    probs = predict_probabilities(model, cfg, image, device)
    if resample:
        probs = resample_probabilities(probs, volume.shape)
    return probs


def predict_volume(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    cfg: Config | Sequence[Config],
    volume: io.Volume,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Segmentation (I, J, K) in the dataset's label values, on the input's voxel grid.

    Several models (cross-validation folds) are an ensemble: their probabilities, each on the
    input grid, are averaged before the argmax.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg] * len(models)
    probs = probabilities_on_input_grid(models[0], cfgs[0], volume, device)
    for m, c in zip(models[1:], cfgs[1:]):
        probs += probabilities_on_input_grid(m, c, volume, device)
    return decode_labels(probs.argmax(0), cfgs[0].data.class_values)


def load_ensemble(
    model_paths: str | Path | Sequence[str | Path], device: torch.device
) -> tuple[list[torch.nn.Module], list[Config]]:
    """Load one or several models; an ensemble must agree on channels, labels and file ending."""
    from volseg.checkpoint import load_model

    paths = [model_paths] if isinstance(model_paths, (str, Path)) else list(model_paths)
    if not paths:
        raise VolsegError(None, "no model given", "pass -m RUN_OR_MODEL (repeat -m for an ensemble)")
    models, cfgs = [], []
    for path in paths:
        model, cfg = load_model(path, device)
        if cfgs:
            first = cfgs[0].data
            if (cfg.data.class_values, cfg.data.channel_names, cfg.model.in_channels) != (
                first.class_values, first.channel_names, cfgs[0].model.in_channels
            ):
                raise VolsegError(path, "cannot join the ensemble: its channels or labels differ from the first model's")
        models.append(model)
        cfgs.append(cfg)
    return models, cfgs


def predict_paths(
    model_path: str | Path | Sequence[str | Path],
    inputs: str | Path,
    output: str | Path,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    skip_existing: bool = False,
) -> list[Path]:
    """`volseg predict`: a file or an nnU-Net-named folder in, `<case><ending>` segmentations out.

    An output that already exists is refused before any work (a good result is never replaced by
    accident) unless `overwrite`; `skip_existing` (`--continue`) keeps it and predicts only the
    missing cases, after removing temporaries a killed run left behind. Several model paths are
    predicted as an ensemble. Returns the written paths.
    """
    if overwrite and skip_existing:
        raise VolsegError(None, "--overwrite and --continue exclude each other", "pass one of them")
    dev = resolve_device(device)
    models, cfgs = load_ensemble(model_path, dev)
    cfg = cfgs[0]
    inputs, output = Path(inputs), Path(output)
    ending = cfg.data.file_ending
    is_folder = inputs.is_dir() and not _is_dicom_dir(inputs)
    if is_folder:
        jobs = [(c.images, output / f"{c.case_id}{ending}") for c in io.list_cases(inputs, ending, cfg.model.in_channels)]
    elif inputs.exists():
        if cfg.model.in_channels != 1:
            raise VolsegError(inputs, f"the model needs {cfg.model.in_channels} channels", "pass a folder of <case>_<CCCC> files")
        target = output if _has_image_ending(output) else output / _output_name(inputs, ending)
        jobs = [((inputs,), target)]
    else:
        raise VolsegError(inputs, "input not found")
    _check_output_folder(jobs)
    existing = [target for _, target in jobs if target.exists()]
    if existing and not (overwrite or skip_existing):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise VolsegError(
            existing[0],
            f"output already exists{more}",
            "pass --overwrite to replace or --continue to skip existing outputs",
        )
    if skip_existing:
        for folder in {target.parent for _, target in jobs}:
            io.remove_stale_temporaries(folder)
        jobs = [(images, target) for images, target in jobs if not target.exists()]
    written: list[Path] = []
    bar = None
    if progress and len(jobs) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="predict", unit="case", disable=None)
    try:
        for images, target in jobs:
            try:
                volume = io.read_image(images)
                _refuse_non_finite(volume, images)
                seg = predict_volume(models, cfgs, volume, dev)
                io.write_volume(target, seg, reference=volume)
            except VolsegError as exc:
                if not (is_folder and written):
                    raise
                resume = f"{len(written)} case(s) done; fix this one and rerun with --continue"
                raise VolsegError(exc.path, exc.problem, f"{exc.hint}; {resume}" if exc.hint else resume) from None
            written.append(target)
            if bar:
                bar.update()
    finally:
        if bar:
            bar.close()
    return written


def _check_output_folder(jobs: list[tuple[Sequence[Path], Path]]) -> None:
    """Refuse an output "folder" that is a file before any case is predicted."""
    for _, target in jobs:
        for parent in (target.parent, *target.parent.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise VolsegError(
                        parent, "is a file, but the outputs go into a folder there", "give a folder as -o"
                    )
                break


def _refuse_non_finite(volume: io.Volume, images: Sequence[Path]) -> None:
    """NaN/Inf voxels poison the normalisation and every window that sees them: refuse, do not guess."""
    if not np.issubdtype(volume.array.dtype, np.floating):
        return
    for channel, path in zip(volume.array, images):
        n_bad = int(channel.size - np.count_nonzero(np.isfinite(channel)))
        if n_bad:
            raise VolsegError(
                path,
                f"has {n_bad} NaN or Inf voxels; refusing to predict on them",
                "replace them, e.g. with the image minimum, before predicting",
            )


_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _has_image_ending(path: Path) -> bool:
    return path.name.endswith(_IMAGE_ENDINGS)


def _output_name(image: Path, ending: str) -> str:
    """`case_0000.nii.gz` -> `case.nii.gz` (nnU-Net naming); other names keep their stem."""
    name = image.name
    for end in _IMAGE_ENDINGS:
        if name.endswith(end):
            stem = name[: -len(end)]
            if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
                stem = stem[:-5]
            return stem + end
    return name + ending


def _is_dicom_dir(path: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in path.iterdir()) if path.is_dir() else False
