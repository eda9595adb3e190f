"""Side by side: volseg.metrics against MONAI (CPU), DeepMind surface-distance, medpy and seg-metrics.

Three synthetic cases, each smooth reference blobs and a prediction that is the same blob perturbed
(finer surface wobble, a sub-voxel shift, and a small false-positive island so that HD and HD95
differ as they do in practice):

- small: a lesion of about 500 voxels in a 192 x 256 x 256 MRI-like volume, 1 mm voxels;
- lesions: 30 lesions of 0.01-1 cm³ spread through a 256³ brain-sized volume, 1 mm voxels; the
  prediction misses 3 of them and adds 3 false positives (lesion work: many small objects far apart);
- large: an organ of about 2 million voxels in a 300 x 512 x 512 CT-like volume, 2.5 x 0.8 x 0.8 mm.

Every tool scores Dice, HD and HD95 of one label with the spacing given (volseg computes all of its
fields: Dice, Jaccard, precision, recall, volume difference, HD, HD95, ASSD and NSD). volseg gets
the uint8 label arrays, as `volseg evaluate` does (C order; `volseg-fortran` is volseg on
Fortran-ordered copies, as nibabel's arrays come); each peer gets its preferred input (boolean
masks, torch tensors) prepared outside the timing. Tools take turns within each repeat so that
load from other processes hits them alike; the time of a tool is its median over the repeats.
medpy and seg-metrics work on the whole volume and run once (`--slow-repeats`). seg-metrics is
timed for HD + HD95 only: its Dice block sums a SimpleITK image voxel by voxel in Python (165 s for
the 12.6 M voxels of the small case, so most of an hour for the large one); `--seg-metrics-dice`
includes it anyway.

    pip install -c <(echo torch==2.13.0) monai==1.6.1 surface-distance==0.1 medpy==0.5.2 seg-metrics==1.2.8
    python benchmarks/metrics.py [--repeats 5] [--cases small,lesions,large]

A missing peer is reported and skipped. Values are compared where the definitions coincide
(docs/metrics.md): Dice with every peer, HD with all but surface-distance, HD95, ASSD and NSD
with MONAI. The last line is one JSON object: `speedup_vs_fastest_peer` (the fastest peer's seconds / volseg's, the minimum
over the cases), `max_value_diff` over every comparison, and `per_case` (seconds per tool, the
fastest peer, the speedup, and `fraction_of_two_read_limit`: the time of one streaming read of
both masks / volseg's time, so 1.0 would be as fast as reading the data can be).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from volseg import metrics
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from volseg import metrics

NSD_TOLERANCE_MM = 1.0
PEERS = ("monai", "surface-distance", "medpy", "seg-metrics")
SLOW_PEERS = ("medpy", "seg-metrics")
# Which values mean the same thing in volseg and in each peer (docs/metrics.md, "Other tools").
SAME_DEFINITION = {
    "monai": ("dice", "hd", "hd95", "assd", "nsd"),
    # DeepMind's surfaces sit on the voxel-corner grid: its HD equals the voxel-centre HD on smooth
    # blobs but not in general (0.29 mm apart on the lesions case), so only Dice is compared.
    "surface-distance": ("dice",),
    "medpy": ("dice", "hd"),
    "seg-metrics": ("dice", "hd"),
}


# --------------------------------------------------------------------------------------------------
# synthetic cases


@dataclass(frozen=True)
class Case:
    name: str
    pred: np.ndarray  # uint8 (I, J, K), label 1
    ref: np.ndarray
    spacing_mm: tuple[float, float, float]


def _wave_modes(rng: np.random.Generator, n: int, wavelength_mm: float) -> list[tuple[np.ndarray, float]]:
    """Random plane waves (vector in rad/mm, phase) that wobble a blob's surface."""
    modes = []
    for _ in range(n):
        vector = rng.normal(size=3)
        vector *= 2 * np.pi / wavelength_mm / np.linalg.norm(vector)
        modes.append((vector, float(rng.uniform(0, 2 * np.pi))))
    return modes


def _paint_blob(
    out: np.ndarray,
    spacing_mm: np.ndarray,
    centre_mm: np.ndarray,
    semi_axes_mm: np.ndarray,
    wobbles: list[tuple[list[tuple[np.ndarray, float]], float]],
) -> None:
    """Set the voxels of an ellipsoid whose radius is modulated by sums of plane waves.

    Evaluated only in the blob's bounding box, so a 300 x 512 x 512 volume takes seconds.
    """
    reach_mm = semi_axes_mm * (1 + 2 * sum(amplitude for _, amplitude in wobbles))
    low = np.maximum(np.floor((centre_mm - reach_mm) / spacing_mm).astype(int), 0)
    high = np.minimum(np.ceil((centre_mm + reach_mm) / spacing_mm).astype(int) + 1, out.shape)
    grid = np.meshgrid(
        *[np.arange(lo, hi) * s for lo, hi, s in zip(low, high, spacing_mm)], indexing="ij", sparse=True
    )
    radius = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre_mm, semi_axes_mm)))
    for modes, amplitude in wobbles:
        wave = sum(np.cos(sum(v * g for v, g in zip(vector, grid)) + phase) for vector, phase in modes)
        radius = radius - amplitude * wave / math.sqrt(len(modes))
    out[tuple(slice(lo, hi) for lo, hi in zip(low, high))] |= radius < 1


def make_case(name: str, rng: np.random.Generator) -> Case:
    if name == "small":
        shape, spacing = (192, 256, 256), (1.0, 1.0, 1.0)
        semi_axes = np.array([4.5, 5.5, 5.0])
        centre = np.array([100, 140, 110]) * np.array(spacing)
        wavelength = 8.0
    elif name == "large":
        shape, spacing = (300, 512, 512), (2.5, 0.8, 0.8)
        semi_axes = np.array([90.0, 100.0, 80.0])
        centre = np.array([150, 230, 260]) * np.array(spacing)
        wavelength = 60.0
    elif name == "lesions":
        return make_lesions_case(rng)
    else:
        raise SystemExit(f"unknown case {name!r}: choose small, lesions or large")
    spacing_mm = np.array(spacing)
    coarse = _wave_modes(rng, 6, wavelength)
    fine = _wave_modes(rng, 6, wavelength / 3)
    ref = np.zeros(shape, dtype=bool)
    _paint_blob(ref, spacing_mm, centre, semi_axes, [(coarse, 0.15)])
    pred = np.zeros(shape, dtype=bool)
    shift = rng.normal(size=3) * 0.5 * spacing_mm
    _paint_blob(pred, spacing_mm, centre + shift, semi_axes, [(coarse, 0.15), (fine, 0.03)])
    island = centre + semi_axes * np.array([0.0, 1.3, 0.0])
    _paint_blob(pred, spacing_mm, island, semi_axes * 0.06 + 1.5, [])
    return Case(name, pred.astype(np.uint8), ref.astype(np.uint8), spacing)


def make_lesions_case(rng: np.random.Generator, n_lesions: int = 30) -> Case:
    """30 wobbly lesions in a 256³ brain; the prediction shifts and roughens each, misses 3, adds 3."""
    shape, spacing = (256, 256, 256), (1.0, 1.0, 1.0)
    spacing_mm = np.array(spacing)
    brain_centre, brain_axes = np.array([128.0, 128.0, 128.0]), np.array([70.0, 85.0, 65.0])
    ref = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)

    def inside_brain() -> np.ndarray:
        while True:
            point = rng.uniform(-1, 1, size=3)
            if np.sum(point**2) < 0.8:
                return brain_centre + point * brain_axes

    for index in range(n_lesions):
        centre = inside_brain()
        radius = float(rng.uniform(1.4, 6.2))  # 0.01 - 1 cm³
        semi_axes = radius * rng.uniform(0.8, 1.25, size=3)
        coarse = _wave_modes(rng, 6, 3 * radius)
        fine = _wave_modes(rng, 6, radius)
        _paint_blob(ref, spacing_mm, centre, semi_axes, [(coarse, 0.15)])
        if index >= 3:  # the first three are missed
            shift = rng.normal(size=3) * 0.5 * spacing_mm
            _paint_blob(pred, spacing_mm, centre + shift, semi_axes, [(coarse, 0.15), (fine, 0.05)])
    for _ in range(3):  # false positives
        _paint_blob(pred, spacing_mm, inside_brain(), np.full(3, float(rng.uniform(1.5, 3.0))), [])
    return Case("lesions", pred.astype(np.uint8), ref.astype(np.uint8), spacing)


# --------------------------------------------------------------------------------------------------
# tools: prepare (untimed) -> run (timed) -> values


def volseg_tool(case: Case) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        return metrics.compute(case.pred, case.ref, case.spacing_mm, [1], NSD_TOLERANCE_MM)[1]

    return run


def volseg_fortran_tool(case: Case) -> Callable[[], dict[str, float]]:
    """volseg on Fortran-ordered copies (nibabel's layout, e.g. `get_fdata().astype(np.uint8)`)."""
    pred, ref = np.asfortranarray(case.pred), np.asfortranarray(case.ref)

    def run() -> dict[str, float]:
        return metrics.compute(pred, ref, case.spacing_mm, [1], NSD_TOLERANCE_MM)[1]

    return run


def monai_tool(case: Case) -> Callable[[], dict[str, float]]:
    import torch
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    pred = torch.from_numpy(case.pred.astype(bool))[None, None]  # (batch, channel, I, J, K)
    ref = torch.from_numpy(case.ref.astype(bool))[None, None]
    spacing = list(case.spacing_mm)

    def run() -> dict[str, float]:
        dice = DiceMetric(include_background=True, reduction="none")(pred, ref)
        hd = compute_hausdorff_distance(pred, ref, include_background=True, spacing=spacing)
        hd95 = compute_hausdorff_distance(pred, ref, include_background=True, percentile=95, spacing=spacing)
        return {"dice": float(dice), "hd": float(hd), "hd95": float(hd95)}

    return run


def monai_extra_values(case: Case) -> dict[str, float]:
    """MONAI's ASSD (symmetric) and NSD (per voxel): untimed, for the value comparison only."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_surface_dice

    pred = torch.from_numpy(case.pred.astype(bool))[None, None]
    ref = torch.from_numpy(case.ref.astype(bool))[None, None]
    spacing = list(case.spacing_mm)
    assd = compute_average_surface_distance(
        pred, ref, include_background=True, symmetric=True, spacing=spacing
    )
    nsd = compute_surface_dice(pred, ref, [NSD_TOLERANCE_MM], include_background=True, spacing=spacing)
    return {"assd": float(assd), "nsd": float(nsd)}


def surface_distance_tool(case: Case) -> Callable[[], dict[str, float]]:
    import surface_distance

    pred, ref = case.pred.astype(bool), case.ref.astype(bool)

    def run() -> dict[str, float]:
        distances = surface_distance.compute_surface_distances(ref, pred, case.spacing_mm)
        return {
            "dice": float(surface_distance.compute_dice_coefficient(ref, pred)),
            "hd": float(surface_distance.compute_robust_hausdorff(distances, 100)),
            "hd95": float(surface_distance.compute_robust_hausdorff(distances, 95)),
        }

    return run


def medpy_tool(case: Case) -> Callable[[], dict[str, float]]:
    from medpy.metric import binary

    pred, ref = case.pred.astype(bool), case.ref.astype(bool)

    def run() -> dict[str, float]:
        return {
            "dice": float(binary.dc(pred, ref)),
            "hd": float(binary.hd(pred, ref, voxelspacing=case.spacing_mm)),
            "hd95": float(binary.hd95(pred, ref, voxelspacing=case.spacing_mm)),
        }

    return run


def seg_metrics_tool(case: Case, with_dice: bool = False) -> Callable[[], dict[str, float]]:
    from seg_metrics import seg_metrics

    # SimpleITK reads a numpy (I, J, K) array as (x, y, z) = (K, J, I): spacing goes reversed.
    # fullyConnected=False: contour voxels touch the background through a face, as in volseg.
    spacing_xyz = np.array(case.spacing_mm[::-1], dtype=np.float64)
    names = ["dice", "hd", "hd95"] if with_dice else ["hd", "hd95"]

    def run() -> dict[str, float]:
        quality = seg_metrics.computeQualityMeasures(
            case.pred, case.ref, spacing_xyz, metrics_names=names, fullyConnected=False
        )
        return {name: float(quality[name]) for name in names}

    return run


TOOLS: dict[str, Callable[[Case], Callable[[], dict[str, float]]]] = {
    "volseg": volseg_tool,
    "volseg-fortran": volseg_fortran_tool,
    "monai": monai_tool,
    "surface-distance": surface_distance_tool,
    "medpy": medpy_tool,
    "seg-metrics": seg_metrics_tool,
}
MODULES = {
    "monai": "monai", "surface-distance": "surface_distance", "medpy": "medpy", "seg-metrics": "seg_metrics",
}


def available_peers() -> tuple[list[str], dict[str, str]]:
    present, missing = [], {}
    for peer in PEERS:
        try:
            __import__(MODULES[peer])
            present.append(peer)
        except Exception as exc:  # noqa: BLE001 - any import failure means "cannot compare"
            missing[peer] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return present, missing


# --------------------------------------------------------------------------------------------------
# measuring


def bench_case(
    case: Case, tools: list[str], repeats: int, slow_repeats: int, seg_metrics_dice: bool
) -> dict[str, Any]:
    """Times (median) and values per tool; tools take turns within each repeat."""
    runs: dict[str, Callable[[], dict[str, float]]] = {}
    errors: dict[str, str] = {}
    for tool in tools:
        try:
            if tool == "seg-metrics":
                runs[tool] = seg_metrics_tool(case, with_dice=seg_metrics_dice)
            else:
                runs[tool] = TOOLS[tool](case)
        except Exception as exc:  # noqa: BLE001
            errors[tool] = f"{type(exc).__name__}: {exc}"
    seconds: dict[str, list[float]] = {tool: [] for tool in runs}
    read_seconds: list[float] = []
    values: dict[str, dict[str, float]] = {}
    for repeat in range(repeats):
        start = time.perf_counter()
        read_both(case)
        read_seconds.append(time.perf_counter() - start)
        for tool, run in runs.items():
            if tool in errors or (tool in SLOW_PEERS and repeat >= slow_repeats):
                continue
            start = time.perf_counter()
            try:
                values[tool] = run()
            except Exception as exc:  # noqa: BLE001 - a broken peer must not stop the others
                errors[tool] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                continue
            seconds[tool].append(time.perf_counter() - start)
        print(f"  [{case.name}] repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    if "monai" in values:
        try:
            values["monai"].update(monai_extra_values(case))
        except Exception as exc:  # noqa: BLE001
            errors["monai (assd/nsd)"] = f"{type(exc).__name__}: {exc}"
    medians = {tool: statistics.median(times) for tool, times in seconds.items() if times}
    runs_done = {tool: len(times) for tool, times in seconds.items()}
    return {"seconds": medians, "runs": runs_done, "values": values, "errors": errors,
            "two_read_seconds": statistics.median(read_seconds)}


def read_both(case: Case) -> int:
    """One streaming read of both masks (a max over 8-byte words): the floor for any tool that
    must look at every voxel to find the structures, as every tool here must."""
    found = 0
    for array in (case.pred, case.ref):
        flat = np.ascontiguousarray(array).reshape(-1)
        words = flat[: flat.size // 8 * 8].view(np.uint64)
        found |= int(words.max()) | int(flat[words.size * 8 :].max(initial=0))
    return found


def value_diffs(values: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    ours = values["volseg"]
    diffs: dict[str, dict[str, float]] = {}
    for peer, names in SAME_DEFINITION.items():
        if peer in values:
            diffs[peer] = {n: abs(ours[n] - values[peer][n]) for n in names if n in values[peer]}
    if "volseg-fortran" in values:  # the same masks in the other layout: every field, exactly
        diffs["volseg-fortran"] = {n: abs(ours[n] - values["volseg-fortran"][n]) for n in metrics.FIELDS}
    return diffs


def print_table(case: Case, result: dict[str, Any]) -> None:
    seconds, values = result["seconds"], result["values"]
    ours = seconds.get("volseg")
    n_voxels = math.prod(case.ref.shape)
    print(f"\n{case.name}: {case.ref.shape} voxels ({n_voxels / 1e6:.1f} M), spacing {case.spacing_mm} mm, "
          f"ref {int(case.ref.sum())} / pred {int(case.pred.sum())} voxels")
    header = (f"{'tool':<17}{'runs':>5}{'seconds':>11}{'x volseg':>10}"
              f"{'dice':>10}{'hd (mm)':>11}{'hd95 (mm)':>11}")
    print(header)
    print("-" * len(header))
    cells = (("dice", 10), ("hd", 11), ("hd95", 11))
    for tool in seconds:
        v = values.get(tool, {})
        ratio = seconds[tool] / ours if ours else float("nan")
        print(f"{tool:<17}{result['runs'][tool]:>5}{seconds[tool]:>11.4f}{ratio:>10.1f}"
              + "".join(f"{v.get(name, math.nan):>{width}.5f}" for name, width in cells))
    if ours:
        print(f"reading both masks once takes {result['two_read_seconds']:.4f} s: volseg runs at "
              f"{result['two_read_seconds'] / ours:.2f} of that limit")
    if "volseg" in values:
        v = values["volseg"]
        extra = f"volseg also: assd {v['assd']:.5f} mm, nsd@{NSD_TOLERANCE_MM:g}mm {v['nsd']:.5f}"
        if "monai" in values and "assd" in values["monai"]:
            extra += f"; MONAI: assd {values['monai']['assd']:.5f} mm, nsd {values['monai']['nsd']:.5f}"
        print(extra)
    for tool, problem in result["errors"].items():
        print(f"{tool}: FAILED ({problem})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per tool (median reported)")
    parser.add_argument("--slow-repeats", type=int, default=1, help="timed runs of medpy and seg-metrics")
    parser.add_argument("--cases", default="small,lesions,large", help="comma-separated: small, lesions, large")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seg-metrics-dice", action="store_true", help="time seg-metrics' (very slow) Dice too"
    )
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # seg-metrics logs a line per call
    peers, missing = available_peers()
    for peer, why in missing.items():
        print(f"peer {peer} is missing ({why}); the others still run", file=sys.stderr)
    tools = ["volseg", "volseg-fortran", *peers]

    per_case: dict[str, dict[str, Any]] = {}
    for name in args.cases.split(","):
        rng = np.random.default_rng(args.seed)
        case = make_case(name.strip(), rng)
        result = bench_case(case, tools, args.repeats, args.slow_repeats, args.seg_metrics_dice)
        print_table(case, result)
        per_case[case.name] = summarize_case(case, result)
        if per_case[case.name]["speedup_vs_fastest_peer"] is not None:
            row = per_case[case.name]
            print(f"speedup vs fastest peer ({row['fastest_peer']}): {row['speedup_vs_fastest_peer']:.1f}x")

    speedups = [row["speedup_vs_fastest_peer"] for row in per_case.values()]
    diffs = [row["max_value_diff"] for row in per_case.values() if row["max_value_diff"] is not None]
    summary = {
        "speedup_vs_fastest_peer": None if None in speedups or not speedups else min(speedups),
        "max_value_diff": max(diffs) if diffs else None,
        "per_case": per_case,
        "missing_peers": sorted(missing),
        "repeats": args.repeats,
    }
    print(json.dumps(summary, default=float))


def summarize_case(case: Case, result: dict[str, Any]) -> dict[str, Any]:
    """The JSON entry of one case: times, the speedup over the fastest peer, the read limit, values."""
    seconds = result["seconds"]
    ours = seconds.get("volseg")
    peers = {t: s for t, s in seconds.items() if not t.startswith("volseg")}
    fastest = min(peers, key=peers.get) if peers else None
    diffs = value_diffs(result["values"]) if "volseg" in result["values"] else {}
    flat = [d for per_peer in diffs.values() for d in per_peer.values()]
    row: dict[str, Any] = {
        "shape": list(case.ref.shape),
        "spacing_mm": list(case.spacing_mm),
        "seconds": {t: round(s, 5) for t, s in seconds.items()},
        "fastest_peer": fastest,
        "speedup_vs_fastest_peer": _round(peers[fastest] / ours) if fastest and ours else None,
        "two_read_seconds": round(result["two_read_seconds"], 5),
        "fraction_of_two_read_limit": _round(result["two_read_seconds"] / ours) if ours else None,
        "max_value_diff": float(max(flat)) if flat else None,
        "value_diffs": diffs,
    }
    if result["errors"]:
        row["errors"] = result["errors"]
    return row


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


if __name__ == "__main__":
    main()
