"""Side by side: volseg.metrics against MONAI (CPU), DeepMind surface-distance, medpy and seg-metrics.

Two synthetic cases, each a smooth reference blob and a prediction that is the same blob perturbed
(finer surface wobble, a sub-voxel shift, and a small false-positive island so that HD and HD95
differ as they do in practice):

- small: a lesion of about 2,300 voxels in a 192 x 256 x 256 MRI-like volume, 1.2 x 0.9 x 0.9 mm;
- large: an organ of about 2 million voxels in a 300 x 512 x 512 CT-like volume, 2.5 x 0.8 x 0.8 mm.

Every tool scores Dice, HD and HD95 of one label with the spacing given (volseg computes all of its
fields: Dice, Jaccard, precision, recall, volume difference, HD, HD95, ASSD and NSD). volseg gets
the uint8 label arrays, as `volseg evaluate` does; each peer gets its preferred input (boolean
masks, torch tensors) prepared outside the timing. Tools take turns within each repeat so that
load from other processes hits them alike; the time of a tool is its median over the repeats.
medpy and seg-metrics work on the whole volume and run once (`--slow-repeats`). seg-metrics is
timed for HD + HD95 only: its Dice block sums a SimpleITK image voxel by voxel in Python (165 s for
the 12.6 M voxels of the small case, so most of an hour for the large one); `--seg-metrics-dice`
includes it anyway.

    pip install -c <(echo torch==2.13.0) monai==1.6.1 surface-distance==0.1 medpy==0.5.2 seg-metrics==1.2.8
    python benchmarks/metrics.py [--repeats 5] [--cases small,large]

A missing peer is reported and skipped. Values are compared where the definitions coincide
(docs/metrics.md): Dice and HD with every peer, HD95, ASSD and NSD with MONAI. The last line is
one JSON object: seconds per tool and case, speedup_vs_fastest_peer_small/large (fastest peer's
seconds / volseg's), and max_value_diff over those comparisons.
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
    "surface-distance": ("dice", "hd"),
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
        shape, spacing = (192, 256, 256), (1.2, 0.9, 0.9)
        semi_axes = np.array([7.0, 9.0, 8.0])
        centre = np.array([100, 140, 110]) * np.array(spacing)
        wavelength = 10.0
    elif name == "large":
        shape, spacing = (300, 512, 512), (2.5, 0.8, 0.8)
        semi_axes = np.array([90.0, 100.0, 80.0])
        centre = np.array([150, 230, 260]) * np.array(spacing)
        wavelength = 60.0
    else:
        raise SystemExit(f"unknown case {name!r}: choose small or large")
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


# --------------------------------------------------------------------------------------------------
# tools: prepare (untimed) -> run (timed) -> values


def volseg_tool(case: Case) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        return metrics.compute(case.pred, case.ref, case.spacing_mm, [1], NSD_TOLERANCE_MM)[1]

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
    values: dict[str, dict[str, float]] = {}
    for repeat in range(repeats):
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
    return {"seconds": medians, "runs": runs_done, "values": values, "errors": errors}


def value_diffs(values: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    ours = values["volseg"]
    diffs: dict[str, dict[str, float]] = {}
    for peer, names in SAME_DEFINITION.items():
        if peer in values:
            diffs[peer] = {n: abs(ours[n] - values[peer][n]) for n in names if n in values[peer]}
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
    parser.add_argument("--cases", default="small,large", help="comma-separated: small, large")
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
    tools = ["volseg", *peers]

    report: dict[str, Any] = {"seconds": {}, "values": {}, "value_diffs": {}}
    speedups: dict[str, float | None] = {}
    all_diffs: list[float] = []
    for name in args.cases.split(","):
        rng = np.random.default_rng(args.seed)
        case = make_case(name.strip(), rng)
        result = bench_case(case, tools, args.repeats, args.slow_repeats, args.seg_metrics_dice)
        print_table(case, result)
        report["seconds"][case.name] = {t: round(s, 5) for t, s in result["seconds"].items()}
        report["values"][case.name] = result["values"]
        if "volseg" in result["values"]:
            diffs = value_diffs(result["values"])
            report["value_diffs"][case.name] = diffs
            all_diffs += [d for per_peer in diffs.values() for d in per_peer.values()]
        peer_seconds = {t: s for t, s in result["seconds"].items() if t != "volseg"}
        if peer_seconds and "volseg" in result["seconds"]:
            fastest = min(peer_seconds, key=peer_seconds.get)
            speedups[case.name] = peer_seconds[fastest] / result["seconds"]["volseg"]
            report.setdefault("fastest_peer", {})[case.name] = fastest
            print(f"speedup vs fastest peer ({fastest}): {speedups[case.name]:.1f}x")
        else:
            speedups[case.name] = None
        if result["errors"]:
            report.setdefault("errors", {})[case.name] = result["errors"]

    summary = {
        "seconds": report["seconds"],
        "speedup_vs_fastest_peer_small": _round(speedups.get("small")),
        "speedup_vs_fastest_peer_large": _round(speedups.get("large")),
        "max_value_diff": float(max(all_diffs)) if all_diffs else None,
        "fastest_peer": report.get("fastest_peer", {}),
        "value_diffs": report["value_diffs"],
        "missing_peers": sorted(missing),
        "repeats": args.repeats,
    }
    if "errors" in report:
        summary["errors"] = report["errors"]
    print(json.dumps(summary, default=float))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


if __name__ == "__main__":
    main()
