"""A 3D convolution whose weight gradient is computed as a forward convolution, where that is faster.

Why: on CPUs, PyTorch's oneDNN kernels compute the weight gradient of a 3x3x3 convolution over a
large, few-channel volume up to about twice as slowly as the forward pass, although it takes the
same arithmetic (measured on an AVX2 machine: 160 ms against 72 ms for 32->16 channels at
2x40x56x40; see `benchmarks/conv_backward.py`). In a hippocampus-sized training step that kernel is
nearly half of the time. The weight gradient is a correlation of the padded input
with the output gradient, so it can be written as a forward convolution in which the batch axis
plays the channels and the output gradient plays the kernel::

    dW[o, i, a, b, c] = sum_{n, v} g[n, o, v] * x_pad[n, i, v + (a, b, c)]
                      = conv3d(x_pad as (i, n, ...), kernel g as (o, n, ...))[i, o, a, b, c]

Which way is faster depends on the machine and the layer's shape, so it is measured once per
shape (both ways, best of three after a warm-up) and the forward-convolution route is kept only
when it wins clearly (`_MARGIN`); other layers (on the AVX2 machine: the one-channel input layer
and 32 channels at 64^3) keep PyTorch's kernel. The data gradient and the forward pass are
PyTorch's own. GPUs and inference always take PyTorch's path. `VOLSEG_CONV_WGRAD=aten` switches the
rewrite off, `=conv` forces it (tests).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_MARGIN = 1.3  # the rewrite must be this much faster to be used: a close call stays with PyTorch
_choice: dict[tuple, bool] = {}
_lock = threading.Lock()


def _mode() -> str:
    mode = os.environ.get("VOLSEG_CONV_WGRAD", "auto").lower()
    return mode if mode in ("auto", "aten", "conv") else "auto"


def weight_grad_by_conv(x: torch.Tensor, grad_out: torch.Tensor, padding: tuple[int, int, int]) -> torch.Tensor:
    """Weight gradient of a stride-1, undilated, ungrouped conv3d, as one forward conv3d.

    >>> x, w = torch.randn(2, 3, 6, 5, 4), torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    >>> g = torch.randn(2, 4, 6, 5, 4)
    >>> ref, = torch.autograd.grad(F.conv3d(x, w, padding=1), w, g)
    >>> torch.allclose(weight_grad_by_conv(x, g, (1, 1, 1)), ref, atol=1e-4)
    True
    """
    pd, ph, pw = padding
    n, c, d, h, w = x.shape
    # padded and batch-transposed in one copy: the convolution wants (channels, batch, ...) contiguous
    xp = x.new_zeros((c, n, d + 2 * pd, h + 2 * ph, w + 2 * pw))
    xp[:, :, pd : pd + d, ph : ph + h, pw : pw + w] = x.transpose(0, 1)
    return F.conv3d(xp, grad_out.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()  # the parameter's layout


def torch_conv_grads(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int, int],
                     input_grad: bool, weight_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """PyTorch's own (input, weight) gradients of a stride-1 conv3d; None for those not asked for."""
    if not (input_grad or weight_grad):
        return None, None
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1, 1], list(padding), [1, 1, 1], False, [0, 0, 0], 1,
        [input_grad, weight_grad, False],
    )
    return (gx if input_grad else None), (gw if weight_grad else None)


def _fastest(fns: list[Any], rounds: int = 3) -> int:
    """Index of the fastest function (best of `rounds` alternated timings, after a warm-up call each).

    The first function is the incumbent: the others must beat it by `_MARGIN` to be chosen.
    """
    best = [float("inf")] * len(fns)
    for fn in fns:
        fn()  # the first call builds the kernels
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return min(range(len(fns)), key=lambda i: best[i] * (_MARGIN if i else 1.0))


def _use_conv_route(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int, int]) -> bool:
    mode = _mode()
    if mode != "auto":
        return mode == "conv"
    key = (tuple(x.shape), tuple(weight.shape), padding, x.dtype, torch.get_num_threads())
    with _lock:
        if key not in _choice:
            _choice[key] = _fastest([
                lambda: torch_conv_grads(x, grad_out, weight, padding, False, True),
                lambda: weight_grad_by_conv(x, grad_out, padding),
            ]) == 1
        return _choice[key]


def _cpu_autocast() -> bool:
    try:
        return bool(torch.is_autocast_enabled("cpu"))
    except TypeError:  # torch < 2.4
        return bool(torch.is_autocast_cpu_enabled())


class _Conv3dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        by_conv = want_w and _use_conv_route(x, grad_out, weight, ctx.padding)
        gx, gw = torch_conv_grads(x, grad_out, weight, ctx.padding, want_x, want_w and not by_conv)
        if by_conv:
            gw = weight_grad_by_conv(x, grad_out, ctx.padding)
        gb = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad_out.sum((0, 2, 3, 4))
        return gx, gw, gb, None


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` (same parameters, same state dict) with the faster weight gradient on CPUs.

    Only stride-1, undilated, ungrouped convolutions with numeric zero padding are rewritten,
    and only while training on the CPU; everything else is `nn.Conv3d` itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or not torch.is_grad_enabled()
            or not self.weight.requires_grad
            or _mode() == "aten"
            or self.stride != (1, 1, 1)
            or self.dilation != (1, 1, 1)
            or self.groups != 1
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or x.dim() != 5
            or _cpu_autocast()
        ):
            return super().forward(x)
        return _Conv3dFunction.apply(x, self.weight, self.bias, tuple(self.padding))
