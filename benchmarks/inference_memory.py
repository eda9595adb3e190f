"""Peak memory of `volseg predict` on a large volume (issue #6): 512 x 512 x 600 float32, 4 classes, <= 4 GiB.

Writes a synthetic image (smooth, anisotropic 0.8 x 0.8 x 1.0 mm, float32 NIfTI) and a model file
(a UNet3d with random weights: base width 8, depth 4, patch 96^3, 4 classes, trained spacing =
the image's, so no resampling), then runs `volseg predict` under `/usr/bin/time -v` in a fresh
process and reads its "Maximum resident set size". With `--baseline` the whole-volume path that
`volseg predict` used before (normalise the whole image, `sliding_window` into a float32 volume
per class, argmax) runs the same way beside it, and the two segmentations are compared.

    python benchmarks/inference_memory.py                      # the issue's case (minutes on a CPU)
    python benchmarks/inference_memory.py --shape 96,96,80 --baseline   # smoke run, seconds

The last line is one JSON object: peak_rss_gib, shape, classes, seconds, command (and
baseline_peak_rss_gib, baseline_seconds, agreement with --baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import volseg  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LIMIT_GIB = 4.0
SPACING_MM = (0.8, 0.8, 1.0)
CLASSES = 4

# The path `volseg predict` took before the memory-bounded window (one model, no resampling).
BASELINE = """
import sys, numpy as np, torch
from volseg import volumes
from volseg.checkpoint import load_model
from volseg.inference import make_predictor, sliding_window
from volseg.preprocessing import decode_labels, normalize
model, cfg = load_model(sys.argv[1])
volume = volumes.read_image([sys.argv[2]])
image = normalize(volume.array, cfg.data.channel_methods, cfg.data.intensity_stats)
probs = sliding_window(image, make_predictor(model, torch.device("cpu")), cfg.train.patch_size, cfg.model.num_classes,
                       overlap=cfg.infer.overlap, blend=cfg.infer.blend, batch_size=cfg.infer.batch_size)
volumes.write_volume(sys.argv[3], decode_labels(probs.argmax(0), cfg.data.class_values), reference=volume)
"""


def write_image(path: Path, shape: tuple[int, int, int]) -> None:
    """A smooth float32 phantom (overlapping waves and a bright ellipsoid), written slab by slab in memory."""
    import nibabel as nib

    i = np.arange(shape[0], dtype=np.float32)[:, None, None]
    j = np.arange(shape[1], dtype=np.float32)[None, :, None]
    k = np.arange(shape[2], dtype=np.float32)[None, None, :]
    image = np.empty(shape, dtype=np.float32)
    centre = [s / 2 for s in shape]
    for a in range(0, shape[0], 32):  # bounded temporaries: 32 rows at a time
        ii = i[a : a + 32]
        waves = 100 * np.sin(ii / 23.0) * np.cos(j / 31.0) + 60 * np.sin(k / 17.0 + ii / 41.0)
        blob = ((ii - centre[0]) / (0.3 * shape[0])) ** 2 + ((j - centre[1]) / (0.25 * shape[1])) ** 2
        blob = blob + ((k - centre[2]) / (0.35 * shape[2])) ** 2
        image[a : a + 32] = waves + 400 * (blob < 1) + 50
    affine = np.diag([*SPACING_MM, 1.0])
    img = nib.Nifti1Image(image, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def write_model(path: Path, patch: int, seed: int) -> None:
    """A random-weight UNet3d for 4 classes with a config like a trained one (spacing, patch)."""
    import torch

    from volseg.checkpoint import save_model
    from volseg.config import Config, DataConfig, ModelConfig, TrainConfig
    from volseg.model import UNet3d

    torch.manual_seed(seed)
    cfg = Config(
        data=DataConfig(labels=(("background", 0), ("a", 1), ("b", 2), ("c", 3)), spacing=SPACING_MM),
        model=ModelConfig(num_classes=CLASSES, base_width=8, depth=4),
        train=TrainConfig(patch_size=(patch, patch, patch)),
    )
    save_model(path, UNet3d(cfg.model).eval(), cfg)


def timed(command: list[str], threads: int, shown: str | None = None) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one command run under `/usr/bin/time -v`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$", shown or shlex.join(command), flush=True)
    t = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-v", *command], env=env, stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - t
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"command failed with exit code {done.returncode}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if match is None:
        raise SystemExit("no 'Maximum resident set size' in the output of /usr/bin/time -v")
    print(f"peak RSS {int(match.group(1)) / 2**20:.3f} GiB, {seconds:.1f} s", flush=True)  # kept if a later run dies
    return int(match.group(1)) / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,600", help="image shape I,J,K (default: the issue's)")
    parser.add_argument("--patch", type=int, default=96, help="window edge in voxels (a multiple of 8)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the predicting process")
    parser.add_argument("--baseline", action="store_true", help="also run the former whole-volume path")
    parser.add_argument("--save-probabilities", action="store_true", help="pass --save-probabilities")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.replace("x", ",").split(","))
    if len(shape) != 3 or args.patch % 8:
        parser.error("--shape needs three sizes and --patch a multiple of 8")
    if not Path("/usr/bin/time").exists():
        raise SystemExit("needs GNU time at /usr/bin/time (apt-get install time)")

    with tempfile.TemporaryDirectory(prefix="volseg_memory_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        image, model = work / "image.nii.gz", work / "model.safetensors"
        t = time.monotonic()
        write_image(image, shape)
        write_model(model, args.patch, args.seed)
        gib = np.prod(shape) * 4 / 2**30
        print(f"wrote {image} ({'x'.join(map(str, shape))} float32, {gib:.2f} GiB in memory; "
              f"{CLASSES} classes: {CLASSES * gib:.2f} GiB as float32) in {time.monotonic() - t:.0f} s", flush=True)

        out = work / "seg_new.nii.gz"
        command = [sys.executable, "-m", "volseg", "predict", "-m", str(model), "-i", str(image), "-o", str(out),
                   "--device", "cpu", "--quiet", "--overwrite"]
        if args.save_probabilities:
            command.append("--save-probabilities")
        rows = [("volseg predict (row ring)", *timed(command, args.threads))]
        result = {"peak_rss_gib": round(rows[0][1], 3), "shape": list(shape), "classes": CLASSES,
                  "seconds": round(rows[0][2], 1), "command": shlex.join(command), "threads": args.threads,
                  "patch": args.patch, "limit_gib": LIMIT_GIB, "within_limit": rows[0][1] <= LIMIT_GIB}
        if args.baseline:
            old = work / "seg_old.nii.gz"
            rows.append(("whole-volume path (before)",
                         *timed([sys.executable, "-c", BASELINE, str(model), str(image), str(old)], args.threads,
                                "python -c BASELINE (benchmarks/inference_memory.py) MODEL IMAGE OUT")))
            from volseg import volumes

            agreement = float(np.mean(volumes.read_label(out).array == volumes.read_label(old).array))
            result.update(baseline_peak_rss_gib=round(rows[1][1], 3), baseline_seconds=round(rows[1][2], 1),
                          agreement=agreement)

    print(f"\n{'path':<28} {'peak RSS GiB':>12} {'seconds':>9}")
    for name, rss, seconds in rows:
        print(f"{name:<28} {rss:>12.3f} {seconds:>9.1f}")
    print(f"limit {LIMIT_GIB} GiB; shape {shape}, {CLASSES} classes, patch {args.patch}, {args.threads} thread(s)")
    if "agreement" in result:
        print(f"segmentations agree on {100 * result['agreement']:.4f}% of voxels")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
