"""volseg.fastconv: the rewritten weight gradient must equal PyTorch's, and change nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from volseg import fastconv
from volseg.config import ModelConfig
from volseg.fastconv import Conv3d
from volseg.model import UNet3d


def _grads(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = conv(x)
    out.backward(g)
    return (out.detach(), x.grad, conv.weight.grad) + ((conv.bias.grad,) if conv.bias is not None else ())


@pytest.mark.parametrize("padding", [1, 0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["conv", "auto"])
def test_gradients_equal_torch(monkeypatch: pytest.MonkeyPatch, padding: int, bias: bool, mode: str) -> None:
    monkeypatch.setenv("VOLSEG_CONV_WGRAD", mode)
    torch.manual_seed(0)
    ref = nn.Conv3d(3, 5, 3, padding=padding, bias=bias)
    ours = Conv3d(3, 5, 3, padding=padding, bias=bias)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 9, 8, 7)
    g = torch.randn_like(ref(x))
    for a, b in zip(_grads(ours, x, g), _grads(ref, x, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_rewrite_only_while_training_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLSEG_CONV_WGRAD", "conv")
    conv = Conv3d(2, 4, 3, padding=1)
    x = torch.randn(1, 2, 6, 6, 6)
    assert type(conv(x).grad_fn).__name__ == "_Conv3dFunctionBackward"
    with torch.no_grad():
        assert conv(x).grad_fn is None
    monkeypatch.setenv("VOLSEG_CONV_WGRAD", "aten")
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"  # exactly nn.Conv3d
    monkeypatch.setenv("VOLSEG_CONV_WGRAD", "conv")
    strided = Conv3d(2, 4, 3, padding=1, stride=2)
    assert type(strided(x).grad_fn).__name__ == "ConvolutionBackward0"  # not a case the rewrite covers


def test_auto_measures_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLSEG_CONV_WGRAD", "auto")
    monkeypatch.setattr(fastconv, "_choice", {})
    conv = Conv3d(2, 3, 3, padding=1)
    for _ in range(3):
        conv(torch.randn(1, 2, 8, 8, 8, requires_grad=True)).sum().backward()
    assert len(fastconv._choice) == 1
    conv(torch.randn(1, 2, 8, 8, 4, requires_grad=True)).sum().backward()
    assert len(fastconv._choice) == 2
    assert all(isinstance(v, bool) for v in fastconv._choice.values())


def test_unet_state_dict_is_nn_conv3d_compatible() -> None:
    """Model files stay the same: a U-Net's parameters load into plain nn.Conv3d layers and back."""
    net = UNet3d(ModelConfig(in_channels=1, num_classes=2, base_width=4, depth=2))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert any(isinstance(m, Conv3d) for m in convs)
    for m in convs:
        plain = nn.Conv3d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding, bias=m.bias is not None)
        plain.load_state_dict(m.state_dict())
        m.load_state_dict(plain.state_dict())


def test_unet_training_step_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """One U-Net step with the rewrite gives PyTorch's gradients (to float32 summation order)."""
    cfg = ModelConfig(in_channels=1, num_classes=3, base_width=4, depth=3, norm="instance")
    x = torch.randn(2, 1, 16, 16, 8)
    grads = {}
    for mode in ("aten", "conv"):
        monkeypatch.setenv("VOLSEG_CONV_WGRAD", mode)
        torch.manual_seed(0)
        net = UNet3d(cfg)
        net(x).square().mean().backward()
        grads[mode] = [p.grad for p in net.parameters()]
    for a, b in zip(grads["conv"], grads["aten"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
