"""Side by side: one 1 x 96^3 image + label patch through rotation + scaling + elastic + noise.

Every tool gets the same kinds of transform, all with probability 1: rotation up to +-30 degrees
about each axis, scaling 0.7-1.4 (MONAI: 0.7-1.3, its range is symmetric around 1), a smooth
elastic deformation of a few voxels, Gaussian noise with standard deviation 0.1; the image is
interpolated linearly, the label by nearest neighbour (batchgenerators with order_data=1, not its
default cubic, so that it does the same work). Magnitudes cannot be made identical across the
tools' different elastic models; their cost barely depends on them.

- MONAI `Rand3DElasticd` (rotation + scaling + elastic in one grid) + `RandGaussianNoised`,
  cutting the centred 96^3 from the input region;
- TorchIO `RandomAffine` + `RandomElasticDeformation` + `RandomNoise`: it resamples the whole
  image, so it gets the 96^3 patch itself (its cheapest setting);
- batchgenerators `SpatialTransform` + `GaussianNoiseTransform`, centre crop (`random_crop=False`);
- batchgeneratorsv2 `SpatialTransform` + `GaussianNoiseTransform`, centre crop;
- volseg `augment.sample_params` + `augment.apply`, batched (one call for B patches) and batch 1,
  with uint8 labels as its training cache holds them (and, batched, int64 labels for comparison).

The input region is the one `volseg.augment.input_size_for` asks for (no drawn transform samples
outside it); every cropping tool gets that same region, prepared outside the timing in the tool's
preferred type. Tools take turns within each repeat, so that load from other processes hits them
alike; a tool's time is its median over the repeats. torch runs with 2 threads.

    pip install -c <(echo torch==2.13.0) monai==1.6.1 torchio==1.2.1 batchgenerators==0.25.5 batchgeneratorsv2
    python benchmarks/augmentation.py [--repeats 15] [--batch 8]

A missing peer is reported and skipped. volseg's two label modes (nearest; one-hot linear +
argmax) are timed side by side, and compared on an analytic ball: voxels that disagree with the
exactly transformed ball, in % of its volume. The last line is one JSON object: ms_per_patch per tool,
speedup_vs_fastest_peer (fastest peer's ms / volseg's batched ms) and the batch-1 speedup.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

try:
    from volseg import augment
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from volseg import augment

PATCH = (96, 96, 96)
SPACING = (1.0, 1.0, 1.0)
NUM_CLASSES = 3
PEERS = ("monai", "torchio", "batchgenerators", "batchgeneratorsv2")

CFG = augment.AugmentConfig(
    rotation_p=1.0, zoom_p=1.0, elastic_p=1.0, noise_p=1.0, noise_std=(0.1, 0.1),
    elastic_magnitude_mm=(0.0, 6.0), brightness_p=0.0, contrast_p=0.0, gamma_p=0.0, mirror_p=0.0,
    gamma_invert_p=0.0, blur_p=0.0, lowres_p=0.0,
)


def make_region(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image with two ball-shaped labels around the centre, float32 and int64 (I, J, K)."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape], indexing="ij", sparse=True)
    r1 = np.sqrt((grids[0] - 10) ** 2 + grids[1] ** 2 + (grids[2] + 5) ** 2)
    r2 = np.sqrt((grids[0] + 20) ** 2 + (grids[1] - 15) ** 2 + grids[2] ** 2)
    label = np.zeros(shape, np.int64)
    label[r1 < 25] = 1
    label[r2 < 12] = 2
    image = (label * 1.5 + 0.3 * np.sin(grids[0] / 7.0) * np.cos(grids[1] / 5.0) + grids[2] * 0.0).astype(np.float32)
    image += rng.normal(0, 0.05, size=shape).astype(np.float32)
    return image, label


def centre_crop(a: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    start = [(n - s) // 2 for n, s in zip(a.shape[-3:], size)]
    return a[(..., *[slice(st, st + s) for st, s in zip(start, size)])]


# --------------------------------------------------------------------------------------------------
# tools: each returns a callable that augments one patch (or, for volseg, a batch) and returns it


def setup_monai(image: np.ndarray, label: np.ndarray) -> Callable[[], object]:
    from monai.transforms import Compose, Rand3DElasticd, RandGaussianNoised

    t = Compose([
        Rand3DElasticd(keys=["image", "label"], sigma_range=(5, 8), magnitude_range=(100, 200), prob=1.0,
                       rotate_range=(math.pi / 6,) * 3, scale_range=(0.3,) * 3, spatial_size=PATCH,
                       mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandGaussianNoised(keys=["image"], prob=1.0, std=0.1),
    ])
    t.set_random_state(0)
    data = {"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label[None])}
    return lambda: t(dict(data))


def setup_torchio(image: np.ndarray, label: np.ndarray) -> Callable[[], object]:
    import torchio as tio

    torch.manual_seed(0)
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(centre_crop(image, PATCH)[None].copy())),
                          label=tio.LabelMap(tensor=torch.from_numpy(centre_crop(label, PATCH)[None].copy())))
    t = tio.Compose([
        tio.RandomAffine(scales=(0.7, 1.4), degrees=30, isotropic=True, image_interpolation="linear",
                         default_pad_value=0),
        tio.RandomElasticDeformation(num_control_points=7, max_displacement=6, image_interpolation="linear"),
        tio.RandomNoise(std=(0.1, 0.1)),
    ])
    return lambda: t(subject)


def setup_batchgenerators(image: np.ndarray, label: np.ndarray) -> Callable[[], object]:
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.noise_transforms import GaussianNoiseTransform
    from batchgenerators.transforms.spatial_transforms import SpatialTransform

    np.random.seed(0)
    a = math.pi / 6
    t = Compose([
        SpatialTransform(PATCH, patch_center_dist_from_border=None, do_elastic_deform=True, alpha=(0.0, 900.0),
                         sigma=(9.0, 13.0), do_rotation=True, angle_x=(-a, a), angle_y=(-a, a), angle_z=(-a, a),
                         do_scale=True, scale=(0.7, 1.4), border_mode_data="constant", border_cval_data=0,
                         order_data=1, border_mode_seg="constant", border_cval_seg=0, order_seg=0,
                         random_crop=False, p_el_per_sample=1.0, p_scale_per_sample=1.0, p_rot_per_sample=1.0),
        GaussianNoiseTransform(noise_variance=(0.01, 0.01), p_per_sample=1.0),
    ])
    data = image[None, None]
    seg = label[None, None].astype(np.float32)
    return lambda: t(data=data, seg=seg)


def setup_batchgeneratorsv2(image: np.ndarray, label: np.ndarray) -> Callable[[], object]:
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

    torch.manual_seed(0)
    np.random.seed(0)
    a = math.pi / 6
    t = ComposeTransforms([
        SpatialTransform(PATCH, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=1.0,
                         elastic_deform_scale=(0.0, 0.2), elastic_deform_magnitude=(0.0, 0.2), p_rotation=1.0,
                         rotation=(-a, a), p_scaling=1.0, scaling=(0.7, 1.4), mode_seg="nearest"),
        GaussianNoiseTransform(noise_variance=(0.01, 0.01)),
    ])
    img = torch.from_numpy(image[None])
    seg = torch.from_numpy(label[None].astype(np.int16))
    return lambda: t(image=img, segmentation=seg)


def setup_volseg(image: np.ndarray, label: np.ndarray, batch: int, label_dtype: type = np.uint8,
                 label_mode: str = "nearest") -> Callable[[], object]:
    """uint8 labels as volseg's cache holds them; int64 is measured too (one more conversion pass)."""
    rng = np.random.default_rng(0)
    img = torch.from_numpy(np.repeat(image[None, None], batch, axis=0))  # a region per sample, as in training
    lab = torch.from_numpy(np.repeat(label[None].astype(label_dtype), batch, axis=0))
    cfg = replace(CFG, label_mode=label_mode)

    def run() -> object:
        params = augment.sample_params(rng, batch, cfg, SPACING, PATCH)
        return augment.apply(img, lab, None, params, PATCH, NUM_CLASSES)

    return run


def output_of(name: str, result: object) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of one patch from a tool's output, for a sanity check of shapes and labels."""
    if name == "monai":
        return np.asarray(result["image"][0]), np.asarray(result["label"][0])
    if name == "torchio":
        return result["image"].data[0].numpy(), result["label"].data[0].numpy()
    if name == "batchgenerators":
        return result["data"][0, 0], result["seg"][0, 0]
    if name == "batchgeneratorsv2":
        return result["image"][0].numpy(), result["segmentation"][0].numpy()
    return result[0][0, 0].numpy(), result[1][0].numpy()


# --------------------------------------------------------------------------------------------------
# label modes on an analytic ball


def label_mode_check() -> dict[str, float]:
    """Rotate + zoom + deform a ball of known radius: wrong voxels in % of the exact ball's volume."""
    region = (72, 72, 72)
    out = (48, 48, 48)
    centre = np.array([(n - 1) / 2 for n in region]) + np.array([3.3, -2.4, 1.7])
    radius = 13.6
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in region], indexing="ij")
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
    label = torch.from_numpy((dist < radius).astype(np.int64))[None]
    image = torch.zeros((1, 1, *region))
    rng = np.random.default_rng(1)
    cfg = augment.AugmentConfig(rotation_p=1, zoom_p=1, elastic_p=1, mirror_p=0, noise_p=0, brightness_p=0,
                                contrast_p=0, gamma_p=0, gamma_invert_p=0, blur_p=0, lowres_p=0,
                                elastic_magnitude_mm=(3.0, 3.0))
    results: dict[str, float] = {}
    params = [augment.sample_params(rng, 1, cfg, SPACING, out) for _ in range(8)]
    for mode in ("nearest", "linear"):
        wrong = []
        for p in params:
            p = replace(p, label_mode=mode)
            _, lab, _ = augment.apply(image, label, None, p, out, 2)
            # exact answer: is the continuous input position of each output voxel inside the ball?
            grid = augment.sampling_grid(p, region, out, dtype=torch.float64)[0].numpy()[..., ::-1]
            pos = (grid + 1) / 2 * (np.array(region) - 1)
            truth = np.sqrt(((pos - centre) ** 2).sum(-1)) < radius
            wrong.append(float((lab[0].numpy() != truth).sum() / truth.sum()))
        results[mode] = round(100 * statistics.mean(wrong), 2)
    return results


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8, help="volseg's batch for the batched measurement")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    region = augment.input_size_for(PATCH, CFG, SPACING)
    image, label = make_region(region, np.random.default_rng(0))
    print(f"patch {PATCH}, input region {region}, torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)

    tools: dict[str, tuple[Callable[[], object], int]] = {}
    versions: dict[str, str] = {}
    setups = {"monai": setup_monai, "torchio": setup_torchio, "batchgenerators": setup_batchgenerators,
              "batchgeneratorsv2": setup_batchgeneratorsv2}
    for name in PEERS:
        try:
            tools[name] = (setups[name](image, label), 1)
            versions[name] = _version(name)
        except ImportError as exc:
            print(f"{name}: not installed, skipped ({exc})", flush=True)
    tools[f"volseg_batch{args.batch}"] = (setup_volseg(image, label, args.batch), args.batch)
    tools["volseg_batch1"] = (setup_volseg(image, label, 1), 1)
    tools[f"volseg_batch{args.batch}_int64_labels"] = (setup_volseg(image, label, args.batch, np.int64), args.batch)
    tools[f"volseg_batch{args.batch}_linear_labels"] = (
        setup_volseg(image, label, args.batch, label_mode="linear"), args.batch)

    # warm-up and sanity check: every tool returns a 96^3 patch whose labels are those of the input
    for name, (fn, _) in tools.items():
        img, lab = output_of(name.split("_")[0], fn())
        values = sorted(int(v) for v in np.unique(lab))
        print(f"{name:20s} output {tuple(img.shape)} labels {values} foreground {float((lab > 0).mean()):.3f}",
              flush=True)

    times: dict[str, list[float]] = {name: [] for name in tools}
    for r in range(args.repeats):
        for name, (fn, n) in tools.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000 / n)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in times.items()), flush=True)

    ms = {name: round(statistics.median(v), 1) for name, v in times.items()}
    peers = {k: v for k, v in ms.items() if k in PEERS}
    batched = ms[f"volseg_batch{args.batch}"]
    print("\nms per 96^3 image + label patch (median over repeats):")
    for name, value in sorted(ms.items(), key=lambda kv: kv[1]):
        print(f"  {name:20s} {value:8.1f}   x{value / batched:5.2f} of volseg batched")
    modes = label_mode_check()
    print(f"wrong label voxels on an analytic ball, % of its volume, per label mode: {modes}")
    fastest = min(peers, key=peers.get) if peers else None
    summary = {
        "ms_per_patch": ms,
        "fastest_peer": fastest,
        "speedup_vs_fastest_peer": round(peers[fastest] / batched, 2) if fastest else None,
        "speedup_vs_fastest_peer_batch1": round(peers[fastest] / ms["volseg_batch1"], 2) if fastest else None,
        "label_mode_wrong_voxel_percent": modes,
        "input_region": list(region),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "versions": versions,
    }
    print(json.dumps(summary))


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
