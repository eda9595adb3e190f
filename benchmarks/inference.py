"""Sliding-window inference side by side: volseg vs MONAI, nnU-Net and TorchIO on the same network.

One process, one volume (1x160x192x160, smooth noise, z-scored), the same weights, overlap 0.5,
Gaussian blending (sigma = patch/8), softmax probabilities blended by every tool:

- MONAI `sliding_window_inference` with the same windows batch size.
- nnU-Net v2 `nnUNetPredictor.predict_sliding_window_return_logits` (no mirroring, float16
  accumulators, one window at a time), with the network wrapped to return softmax.
- TorchIO `GridSampler` + `GridAggregator(overlap_mode="hann")` with the same batch size.

All grids equal volseg's for the shapes used here, and every peer is given volseg's Gaussian map
(MONAI as `roi_weight_map`, TorchIO in place of its Hann window, nnU-Net in place of its
`compute_gaussian`, scaled by its factor 10), so all compute the same blend and only their own
arithmetic differs. With their own maps the outputs differ far more on a random network, whose
overlapping windows disagree: nnU-Net's Gaussian is centred half a voxel off for even patches and
underflows in float16 at the image border; Hann weights differ everywhere.
- volseg `WindowRunner(compile="on")` through `sliding_window`: the network compiled by inductor
  with frozen weights in channels-last layout. "volseg_eager" is the same without compiling.

Every tool first runs one warm-up batch; volseg's compile time is that warm-up and is reported
apart (`compile_seconds`; inductor caches it on disk, so it is lower on later runs). The seconds
are medians over `--repeats` full passes. Two networks: hippocampus size (depth 4, width 16,
patch 40x48x40) and CT size (depth 5, width 32 capped at 320, patch 128^3). The achieved GFLOP/s
of the network (FLOPs of one window x windows / seconds) is compared with a 3x3x3 conv3d, 32->32
channels on 64^3 (the best of both memory layouts), measured in the same run.

    python benchmarks/inference.py [--nets hippo,ct] [--repeats 3] [--batch 2]

The last line is one JSON object: seconds, speedup_vs_fastest_peer, max_abs_diff,
argmax_agreement, fraction_of_conv_ceiling (per network), compile_seconds, conv_ceiling_gflops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
from scipy import ndimage

from volseg.config import ModelConfig
from volseg.inference import WindowRunner, sliding_window
from volseg.model import UNet3d
from volseg.sampling import gaussian_importance, sliding_window_grid

SHAPE = (160, 192, 160)
NETS = {
    "hippo": (ModelConfig(in_channels=1, num_classes=3, depth=4, base_width=16, norm="instance"), (40, 48, 40)),
    "ct": (ModelConfig(in_channels=1, num_classes=4, depth=5, base_width=32, max_width=320, norm="instance"),
           (128, 128, 128)),
}


def volume(seed: int = 0) -> np.ndarray:
    """Smooth noise, z-scored: structure at several scales, like a normalised scan."""
    x = np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)
    x = ndimage.gaussian_filter(x, 3) + 0.3 * ndimage.gaussian_filter(x, 1)
    return ((x - x.mean()) / x.std()).astype(np.float32)[None]


class Softmax(torch.nn.Module):
    """The network with a softmax on top, so that every tool blends probabilities."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def run_monai(net, image, patch, batch, warm=False):
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(image)[None]
    if warm:
        x = x[..., : patch[0], : patch[1], : patch[2]]
    weight = torch.from_numpy(gaussian_importance(patch))
    with torch.inference_mode():
        out = sliding_window_inference(x, patch, batch, Softmax(net), overlap=0.5, mode="gaussian",
                                       sigma_scale=0.125, roi_weight_map=weight, progress=False)
    return out[0].numpy()


def run_nnunet(net, image, patch, batch, warm=False):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import contextlib
        import io as _io

        with contextlib.redirect_stdout(_io.StringIO()):  # it prints a note about CPU devices
            pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                   perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    import nnunetv2.inference.predict_from_raw_data as nnunet_predict

    weight = torch.from_numpy(gaussian_importance(patch))  # volseg's map, in nnU-Net's scale and dtype

    def same_gaussian(tile_size, sigma_scale=1 / 8, value_scaling_factor=1, dtype=torch.float16, device=None):
        return (weight * value_scaling_factor).to(dtype=dtype, device=device)

    nnunet_predict.compute_gaussian = same_gaussian
    pred.network = Softmax(net)
    pred.configuration_manager = SimpleNamespace(patch_size=list(patch))
    pred.label_manager = SimpleNamespace(num_segmentation_heads=net.cfg.num_classes)
    pred.allowed_mirroring_axes = (0, 1, 2)
    x = torch.from_numpy(image)
    if warm:
        x = x[..., : patch[0], : patch[1], : patch[2]]
    out = pred.predict_sliding_window_return_logits(x)
    return out.float().numpy()


def run_torchio(net, image, patch, batch, warm=False):
    import torchio as tio

    x = torch.from_numpy(image)
    if warm:
        x = x[..., : patch[0], : patch[1], : patch[2]]
    subject = tio.Subject(img=tio.ScalarImage(tensor=x))
    sampler = tio.inference.GridSampler(subject, patch, tuple(p // 2 for p in patch))
    loader = torch.utils.data.DataLoader(sampler, batch_size=batch)
    aggregator = tio.inference.GridAggregator(sampler, overlap_mode="hann")
    aggregator._hann_window = torch.from_numpy(gaussian_importance(patch))  # volseg's Gaussian instead of Hann
    model = Softmax(net)
    with torch.inference_mode():
        for b in loader:
            aggregator.add_batch(model(b["img"][tio.DATA]), b[tio.LOCATION])
    return aggregator.get_output_tensor().numpy()


def volseg_runner(net, batch, compile):
    runner = WindowRunner(net, "cpu", batch, compile=compile)

    def run(_net, image, patch, batch, warm=False):
        x = image[..., : patch[0], : patch[1], : patch[2]] if warm else image
        return sliding_window(x, runner, patch, net.cfg.num_classes, overlap=0.5, blend="gaussian", batch_size=batch)

    return runner, run


def conv_ceiling() -> float:
    """GFLOP/s of a 3x3x3 conv3d, 32->32 channels, 64^3: the best of NCDHW and channels-last."""
    best = 0.0
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False).eval().to(memory_format=layout)
        x = torch.randn(1, 32, 64, 64, 64).contiguous(memory_format=layout)
        with torch.inference_mode():
            conv(x)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - t)
        best = max(best, 2 * 27 * 32 * 32 * 64**3 / min(times) / 1e9)
    return best


def window_gflop(net, patch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.zeros(1, 1, *patch))
    return counter.get_total_flops() / 1e9


def bench_net(name: str, repeats: int, batch: int, image: np.ndarray, ceiling: float) -> dict:
    cfg, patch = NETS[name]
    torch.manual_seed(0)
    net = UNet3d(cfg).eval()
    runner, volseg = volseg_runner(net, batch, "on")
    _, volseg_eager = volseg_runner(net, batch, "off")
    tools = {"monai": run_monai, "nnunet": run_nnunet, "torchio": run_torchio, "volseg": volseg,
             "volseg_eager": volseg_eager}
    warm = {}
    for tool, fn in tools.items():  # one warm-up batch each; volseg's is the compilation
        t = time.perf_counter()
        fn(net, image, patch, batch, warm=True)
        warm[tool] = time.perf_counter() - t
    seconds: dict[str, list[float]] = {tool: [] for tool in tools}
    outputs = {}
    for r in range(repeats):
        for tool, fn in tools.items():
            t = time.perf_counter()
            out = fn(net, image, patch, batch)
            seconds[tool].append(time.perf_counter() - t)
            print(f"{name} repeat {r}: {tool} {seconds[tool][-1]:.1f} s", flush=True)
            outputs[tool] = out
    median = {tool: round(statistics.median(s), 2) for tool, s in seconds.items()}
    ref = outputs["volseg"]
    diff = {t: float(np.abs(o - ref).max()) for t, o in outputs.items() if t != "volseg"}
    agree = {t: float((o.argmax(0) == ref.argmax(0)).mean()) for t, o in outputs.items() if t != "volseg"}
    peers = ("monai", "nnunet", "torchio")
    fastest = min(peers, key=lambda t: median[t])
    n_windows = len(sliding_window_grid(SHAPE, patch, 0.5))
    gflop = window_gflop(net, patch) * n_windows
    result = {
        "seconds": median,
        "fastest_peer": fastest,
        "speedup_vs_fastest_peer": round(median[fastest] / median["volseg"], 3),
        "speedup_vs_volseg_eager": round(median["volseg_eager"] / median["volseg"], 3),
        "max_abs_diff": diff,
        "argmax_agreement": agree,
        "windows": n_windows,
        "gflop": round(gflop, 1),
        "gflops_volseg": round(gflop / median["volseg"], 1),
        "gflops_fastest_peer": round(gflop / median[fastest], 1),
        "fraction_of_conv_ceiling": round(gflop / median["volseg"] / ceiling, 3),
        "compile_seconds": round(runner.compile_seconds, 1),
        "warmup_seconds": {t: round(s, 2) for t, s in warm.items()},
    }
    print(name, json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="hippo,ct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ct-repeats", type=int, default=1, help="repeats for the CT-size network (slow)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, volume {SHAPE}", flush=True)
    ceiling = conv_ceiling()
    print(f"conv3d ceiling {ceiling:.1f} GFLOP/s", flush=True)
    image = volume()
    results = {}
    for name in args.nets.split(","):
        results[name] = bench_net(name, args.ct_repeats if name == "ct" else args.repeats, args.batch, image, ceiling)
    summary = {
        key: {name: r[key] for name, r in results.items()}
        for key in ("seconds", "speedup_vs_fastest_peer", "max_abs_diff", "argmax_agreement",
                    "fraction_of_conv_ceiling", "compile_seconds", "speedup_vs_volseg_eager")
    }
    summary["conv_ceiling_gflops"] = round(ceiling, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
