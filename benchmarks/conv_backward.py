"""Training-step speed on the CPU: volseg's conv weight gradient (`volseg.fastconv`) vs PyTorch's.

nnU-Net, MONAI, pytorch-3dunet and TorchIO-fed models all train with `torch.nn.Conv3d`, whose
weight gradient on CPUs comes from oneDNN's backward-weights kernel. volseg computes it as a
forward convolution where that measures faster (see `volseg/fastconv.py`). Same process, same
inputs; for whole steps PyTorch's route is timed before and after volseg's, and the faster of the
two is the one compared, so drift of the machine cannot favour volseg:

1. per layer: the weight gradient of single 3x3x3 convolutions of a U-Net (hippocampus and
   CT-sized levels), PyTorch's kernel vs the forward-convolution route, and the largest relative
   difference between the two results;
2. whole step: forward + backward + SGD step of volseg's U-Net (instance norm, Dice + CE) with
   the rewrite off (`VOLSEG_CONV_WGRAD=aten`, which is exactly `nn.Conv3d`) and on (`auto`).

    python benchmarks/conv_backward.py [--repeats 5] [--nets hippo,ct]

The last line is one JSON object: per-layer and per-network seconds and speedups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from volseg.config import ModelConfig
from volseg.fastconv import torch_conv_grads, weight_grad_by_conv
from volseg.losses import get_loss
from volseg.model import UNet3d

LAYERS = [  # (in channels, out channels, spatial size), batch 2
    (1, 16, (40, 56, 40)),
    (16, 16, (40, 56, 40)),
    (32, 16, (40, 56, 40)),
    (32, 32, (20, 28, 20)),
    (64, 64, (10, 14, 10)),
    (128, 128, (5, 7, 5)),
    (32, 32, (64, 64, 64)),
    (64, 64, (32, 32, 32)),
    (320, 320, (4, 4, 4)),
]
NETS = {
    "hippo": (ModelConfig(in_channels=1, num_classes=3, depth=4, base_width=16, norm="instance"), (40, 56, 40), 2),
    "hippo_w8": (ModelConfig(in_channels=1, num_classes=3, depth=4, base_width=8, norm="instance"), (40, 56, 40), 2),
    "ct": (ModelConfig(in_channels=1, num_classes=4, depth=5, base_width=32, max_width=320, norm="instance"),
           (64, 64, 64), 2),
}


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_rows(repeats: int) -> list[dict]:
    rows = []
    for cin, cout, size in LAYERS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, cin, *size, generator=g)
        w = torch.randn(cout, cin, 3, 3, 3, generator=g)
        grad = torch.randn(2, cout, *size, generator=g)
        ref = torch_conv_grads(x, grad, w, (1, 1, 1), False, True)[1]
        diff = float((weight_grad_by_conv(x, grad, (1, 1, 1)) - ref).abs().max() / ref.abs().max())
        t_aten = median_seconds(lambda: torch_conv_grads(x, grad, w, (1, 1, 1), False, True), repeats)
        t_conv = median_seconds(lambda: weight_grad_by_conv(x, grad, (1, 1, 1)), repeats)
        rows.append({"layer": f"{cin}->{cout} @ {'x'.join(map(str, size))}", "torch_ms": round(1e3 * t_aten, 1),
                     "volseg_conv_route_ms": round(1e3 * t_conv, 1), "speedup": round(t_aten / t_conv, 2),
                     "max_rel_diff": f"{diff:.1e}"})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def step_seconds(cfg: ModelConfig, patch: tuple[int, int, int], batch: int, mode: str, repeats: int) -> float:
    os.environ["VOLSEG_CONV_WGRAD"] = mode
    torch.manual_seed(0)
    net = UNet3d(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(batch, cfg.in_channels, *patch)
    y = torch.randint(0, cfg.num_classes, (batch, *patch))
    w = torch.ones(batch, *patch)
    loss_fn = get_loss("dice_ce")

    def step() -> None:
        loss = loss_fn(net(x), y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # the "auto" route measures its choices here, once per layer shape
    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nets", default="hippo,hippo_w8,ct")
    parser.add_argument("--no-layers", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    result: dict = {"threads": torch.get_num_threads()}
    if not args.no_layers:
        result["layers"] = layer_rows(args.repeats)
    for name in args.nets.split(","):
        cfg, patch, batch = NETS[name]
        t_torch = step_seconds(cfg, patch, batch, "aten", args.repeats)
        t_volseg = step_seconds(cfg, patch, batch, "auto", args.repeats)
        t_torch2 = step_seconds(cfg, patch, batch, "aten", args.repeats)  # again: drift shows up as a gap
        result[name] = {"patch": list(patch), "batch": batch, "torch_step_s": round(min(t_torch, t_torch2), 3),
                        "volseg_step_s": round(t_volseg, 3), "speedup": round(min(t_torch, t_torch2) / t_volseg, 2)}
        print(name, result[name], flush=True)
    os.environ.pop("VOLSEG_CONV_WGRAD", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
