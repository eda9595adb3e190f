"""Side by side: volseg.weights.border_weights against the direct U-Net border weight map.

The case is many touching objects, as in cell or vertebra instance maps: a Voronoi partition of
balls around seeded random centres (each voxel within its nearest centre's radius belongs to that
centre), then a 1-voxel background gap carved wherever two objects meet (any voxel with a
26-neighbour of another object becomes background), so objects touch through thin background --
exactly where the border term matters.

Arms, same w0 and sigma_mm, in one process:

- direct: one full-volume ``scipy.ndimage.distance_transform_edt`` per object (float64) with a
  running smallest / second-smallest distance over the whole volume. The reference; it needs
  minutes at 256^3 with 300+ objects (tqdm shows progress on stderr).
- volseg: ``volseg.weights.border_weights`` (per-object EDT only in the box where the term can
  exceed ``--tolerance``); median of ``--repeats`` runs.

    python benchmarks/weight_maps.py [--shape 256] [--spacing 1,1,1] [--objects 320] [--quick]

Prints the object count, a table and, as the last line, one JSON object: seconds_direct,
seconds_volseg, speedup_vs_direct (direct / volseg), max_abs_diff over the whole map, n_objects
and shape. Target: speedup >= 10 with max_abs_diff <= 1e-4.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

try:
    from volseg import weights
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from volseg import weights


def touching_objects(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], n_seeds: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """int32 (I, J, K) instance map: balls cut by their Voronoi cells, 1-voxel gaps between them."""
    seeds = np.ones(shape, dtype=bool)
    centres = np.stack([rng.integers(0, n, size=n_seeds) for n in shape], axis=1)
    seeds[tuple(centres.T)] = False
    ids = np.zeros(shape, dtype=np.int32)
    ids[tuple(centres.T)] = np.arange(1, n_seeds + 1, dtype=np.int32)  # duplicates: last wins
    distance_mm, nearest = ndimage.distance_transform_edt(seeds, sampling=spacing_mm, return_indices=True)
    instances = ids[tuple(nearest)]
    del nearest
    # Radius per seed around the mean Voronoi cell radius: most cells are cut by their neighbours
    # (touching objects), some stay round with background around them.
    cell_radius_mm = (math.prod(shape) * math.prod(spacing_mm) / n_seeds * 3 / (4 * math.pi)) ** (1 / 3)
    radius_mm = rng.uniform(0.8, 1.4, size=n_seeds + 1) * cell_radius_mm
    instances[distance_mm > radius_mm[instances]] = 0
    del distance_mm
    # Carve: a voxel with a 26-neighbour of another object becomes background (both sides).
    gap = np.zeros(shape, dtype=bool)
    offsets = [o for o in np.ndindex(3, 3, 3) if o > (1, 1, 1)]  # 13 half-neighbourhood offsets
    for offset in offsets:
        delta = [o - 1 for o in offset]
        here = tuple(slice(max(-d, 0), n - max(d, 0)) for d, n in zip(delta, shape))
        there = tuple(slice(max(d, 0), n - max(-d, 0)) for d, n in zip(delta, shape))
        a, b = instances[here], instances[there]
        differ = (a != b) & (a != 0) & (b != 0)
        gap[here] |= differ
        gap[there] |= differ
    instances[gap] = 0
    return instances


def direct_border_weights(
    instances: np.ndarray, spacing_mm: tuple[float, float, float], w0: float, sigma_mm: float
) -> np.ndarray:
    """The textbook way: a full-volume EDT per object, running d1/d2 over the whole volume."""
    ids = np.unique(instances)
    ids = ids[ids != 0]
    d1 = np.full(instances.shape, np.inf)
    d2 = np.full(instances.shape, np.inf)
    for object_id in tqdm(ids, desc="direct", unit="object", file=sys.stderr, mininterval=5):
        distance = ndimage.distance_transform_edt(instances != object_id, sampling=spacing_mm)
        d2 = np.minimum(d2, np.maximum(d1, distance))
        d1 = np.minimum(d1, distance)
    out = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma_mm**2))
    out[instances != 0] = 0
    if ids.size < 2:
        out[:] = 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="256", help="I,J,K or one size for a cube (default 256)")
    parser.add_argument("--spacing", default="1,1,1", help="mm per voxel along I,J,K")
    parser.add_argument("--objects", type=int, default=320, help="seeds (one may vanish in the gaps)")
    parser.add_argument("--w0", type=float, default=10.0)
    parser.add_argument("--sigma-mm", type=float, default=5.0)
    parser.add_argument("--tolerance", type=float, default=1e-5, help="border_weights tolerance")
    parser.add_argument("--repeats", type=int, default=3, help="timed volseg runs (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="96^3 and 60 seeds: seconds, not minutes")
    args = parser.parse_args()

    sizes = [int(s) for s in args.shape.split(",")]
    shape = tuple(sizes * 3 if len(sizes) == 1 else sizes)
    n_seeds = args.objects
    if args.quick:
        shape, n_seeds = (96, 96, 96), 60
    spacing_mm = tuple(float(s) for s in args.spacing.split(","))
    if len(shape) != 3 or len(spacing_mm) != 3:
        raise SystemExit("--shape and --spacing need 1 or 3 and 3 values")

    start = time.perf_counter()
    instances = touching_objects(shape, spacing_mm, n_seeds, np.random.default_rng(args.seed))
    n_objects = int(np.unique(instances).size - 1)
    print(f"case: {shape} voxels, spacing {spacing_mm} mm, {n_objects} touching objects, "
          f"{(instances == 0).mean():.1%} background (built in {time.perf_counter() - start:.1f} s)",
          flush=True)

    seconds_volseg = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = weights.border_weights(instances, spacing_mm, args.w0, args.sigma_mm, args.tolerance)
        seconds_volseg.append(time.perf_counter() - start)
    seconds_ours = statistics.median(seconds_volseg)
    print(f"volseg: {seconds_ours:.2f} s (median of {args.repeats})", flush=True)

    start = time.perf_counter()
    reference = direct_border_weights(instances, spacing_mm, args.w0, args.sigma_mm)
    seconds_direct = time.perf_counter() - start
    max_abs_diff = float(np.abs(ours.astype(np.float64) - reference).max())
    speedup = seconds_direct / seconds_ours

    header = f"{'arm':<10}{'seconds':>11}{'x volseg':>10}{'max term':>10}"
    print(f"\n{header}\n{'-' * len(header)}")
    print(f"{'direct':<10}{seconds_direct:>11.2f}{speedup:>10.1f}{reference.max():>10.4f}")
    print(f"{'volseg':<10}{seconds_ours:>11.2f}{1.0:>10.1f}{ours.max():>10.4f}")
    print(f"speedup vs direct: {speedup:.1f}x; max |volseg - direct| = {max_abs_diff:.2e} "
          f"(tolerance {args.tolerance:g}); target >= 10x and <= 1e-4")
    print(json.dumps({
        "speedup_vs_direct": round(speedup, 2),
        "max_abs_diff": max_abs_diff,
        "seconds_direct": round(seconds_direct, 3),
        "seconds_volseg": round(seconds_ours, 3),
        "seconds_volseg_runs": [round(s, 3) for s in seconds_volseg],
        "n_objects": n_objects,
        "shape": list(shape),
        "spacing_mm": list(spacing_mm),
        "w0": args.w0,
        "sigma_mm": args.sigma_mm,
        "tolerance": args.tolerance,
    }))


if __name__ == "__main__":
    main()
