"""volseg.model: output sizes for both paddings, the paper's valid-padding arithmetic, gradients."""

from __future__ import annotations

import doctest

import pytest
import torch

import volseg.model as vmodel
from volseg.config import ModelConfig
from volseg.errors import VolsegError
from volseg.model import UNet3d, count_parameters, level_widths, size_divisor, valid_input_size, valid_output_size


def tiny(**kwargs) -> ModelConfig:
    base = {"in_channels": 1, "num_classes": 2, "base_width": 2, "max_width": 8, "depth": 2, "norm": "instance"}
    return ModelConfig(**{**base, **kwargs})


def forward(cfg: ModelConfig, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    net = UNet3d(cfg)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return net(x)


def test_doctests():
    assert doctest.testmod(vmodel, extraglobs={"ModelConfig": ModelConfig}).failed == 0


@pytest.mark.parametrize(
    ("depth", "shape"),
    [
        (4, (1, 1, 16, 24, 8)),  # anisotropic, every axis a multiple of 8, one axis 3 x 8
        (4, (2, 1, 24, 8, 40)),  # odd multiples of the divisor
        (3, (1, 1, 12, 20, 4)),
        (2, (1, 1, 6, 10, 14)),  # odd multiples of 2
        (1, (1, 1, 5, 7, 3)),  # no pooling: any size
    ],
)
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_same_padding_keeps_spatial_size(depth, shape, norm):
    cfg = tiny(depth=depth, norm=norm, in_channels=shape[1], num_classes=3)
    out = forward(cfg, shape)
    assert out.shape == (shape[0], 3, *shape[2:])
    assert torch.isfinite(out).all()


def test_same_padding_multichannel_input():
    out = forward(tiny(depth=3, in_channels=3, num_classes=4), (2, 3, 8, 12, 4))
    assert out.shape == (2, 4, 8, 12, 4)


def test_paper_valid_sizes():
    """Çiçek et al. 2016, Fig. 1: input 132 x 132 x 116 gives output 44 x 44 x 28 at depth 4."""
    cfg = ModelConfig(depth=4, padding="valid")
    assert [valid_output_size(cfg, s) for s in (132, 132, 116)] == [44, 44, 28]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (18, 2),  # smallest input for depth 2: 18 -4 = 14, /2 = 7, -4 = 3, x2 = 6, -4 = 2
        (16, 0),  # 16 -> 12 -> 6 -> 2 -> 4 -> 0: nothing left
        (17, 0),  # 13 cannot be pooled evenly
        (20, 4),
        (22, 6),
    ],
)
def test_valid_output_size_depth2_by_hand(size, expected):
    assert valid_output_size(ModelConfig(depth=2, padding="valid"), size) == expected


def test_valid_output_size_same_padding():
    cfg = ModelConfig(depth=4, padding="same")
    assert size_divisor(cfg) == (8, 8, 8)
    assert valid_output_size(cfg, 24) == 24
    assert valid_output_size(cfg, 20) == 0


@pytest.mark.parametrize(
    ("depth", "shape"),
    [
        (2, (1, 1, 20, 22, 18)),
        (3, (1, 2, 44, 52, 60)),
    ],
)
def test_valid_padding_real_forward_matches_arithmetic(depth, shape):
    cfg = tiny(depth=depth, padding="valid", in_channels=shape[1], num_classes=3)
    expected = tuple(valid_output_size(cfg, s) for s in shape[2:])
    assert all(e > 0 for e in expected)
    out = forward(cfg, shape)
    assert out.shape == (shape[0], 3, *expected)


def test_valid_padding_depth2_known_output():
    out = forward(tiny(depth=2, padding="valid"), (1, 1, 20, 22, 18))
    assert out.shape == (1, 2, 4, 6, 2)


def test_valid_input_size():
    valid2 = ModelConfig(depth=2, padding="valid")
    assert valid_input_size(valid2, 1) == 18
    assert valid_input_size(valid2, 19) == 20
    valid4 = ModelConfig(depth=4, padding="valid")
    assert valid_input_size(valid4, 129) == 132  # the paper's input
    assert valid_input_size(valid4, 132) == 132
    for min_size in range(1, 140):
        size = valid_input_size(valid4, min_size)
        assert size >= min_size
        assert valid_output_size(valid4, size) > 0
        assert all(valid_output_size(valid4, s) == 0 for s in range(min_size, size))
    same = ModelConfig(depth=3, padding="same")
    assert valid_input_size(same, 13) == 16
    assert valid_input_size(same, 16) == 16
    assert valid_input_size(same, 0) == 4


def test_level_widths_capped():
    assert level_widths(ModelConfig(base_width=16, max_width=256, depth=4)) == [16, 32, 64, 128]
    assert level_widths(ModelConfig(base_width=32, max_width=100, depth=5)) == [32, 64, 100, 100, 100]
    assert level_widths(ModelConfig(base_width=3, max_width=3, depth=2)) == [3, 3]


def test_widths_reach_the_network():
    net = UNet3d(tiny(base_width=2, max_width=4, depth=3))
    assert [enc[0].out_channels for enc in net.encoders] == [2, 4, 4]
    assert net.head.out_channels == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "layer"},
        {"padding": "reflect"},
        {"depth": 0},
        {"base_width": 0},
        {"in_channels": 0},
        {"num_classes": 0},
    ],
)
def test_bad_config_refused(kwargs):
    with pytest.raises(VolsegError):
        UNet3d(tiny(**kwargs))


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_gradients_reach_every_parameter(norm):
    torch.manual_seed(3)
    net = UNet3d(tiny(depth=3, norm=norm, base_width=3))
    x = torch.randn(2, 1, 8, 12, 4)
    net(x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_norm_choice_sets_biases():
    with_norm = UNet3d(tiny(norm="instance"))
    without = UNet3d(tiny(norm="none"))
    assert with_norm.encoders[0][0].bias is None
    assert without.encoders[0][0].bias is not None
    assert count_parameters(without) > 0
    assert isinstance(with_norm.encoders[0][1], torch.nn.InstanceNorm3d)
    assert isinstance(UNet3d(tiny(norm="batch")).encoders[0][1], torch.nn.BatchNorm3d)


def test_same_seed_same_weights():
    torch.manual_seed(5)
    a = UNet3d(tiny())
    torch.manual_seed(5)
    b = UNet3d(tiny())
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        assert torch.equal(pa, pb)


def test_output_is_local_with_valid_padding():
    """With valid padding every output voxel sees a fixed window of the input, and only that window.

    Depth 2, input 20: output voxel o sits over input voxel o + 8; through the bottleneck it sees input
    voxels 2 * (o // 2) .. 2 * (o // 2) + 17 (decoder convs 5, transposed conv 2 -> 1, bottleneck convs 5,
    pooling x2, encoder convs 5), which contains the skip path's window o + 4 .. o + 12.
    """
    torch.manual_seed(0)
    net = UNet3d(tiny(depth=2, padding="valid", norm="none", base_width=4)).eval()
    for voxel, lo, hi in [(3, 2, 19), (0, 0, 17)]:
        x = torch.randn(1, 1, 20, 20, 20, requires_grad=True)
        out = net(x)
        assert out.shape == (1, 2, 4, 4, 4)
        out[0, :, voxel, voxel, voxel].sum().backward()
        grad = x.grad[0, 0]
        inside = torch.zeros_like(grad, dtype=torch.bool)
        inside[lo : hi + 1, lo : hi + 1, lo : hi + 1] = True
        assert torch.all(grad[~inside] == 0)
        assert grad[inside].abs().sum() > 0


def test_output_bias_starts_at_class_priors() -> None:
    """Softmax of the head bias is the class frequency; sigmoid heads get each class's own log-odds."""
    net = UNet3d(ModelConfig(in_channels=1, num_classes=3, base_width=2, depth=2))
    net.init_output_bias([0.9, 0.06, 0.04])
    assert torch.allclose(torch.softmax(net.head.bias, 0), torch.tensor([0.9, 0.06, 0.04]), atol=1e-6)
    net.init_output_bias([0.9, 0.1, 0.0], sigmoid=True)
    assert torch.allclose(torch.sigmoid(net.head.bias), torch.tensor([0.9, 0.1, 1e-4]), atol=1e-6)
    with pytest.raises(VolsegError, match="2 class frequencies for 3"):
        net.init_output_bias([0.5, 0.5])


def test_deep_supervision_adds_coarser_heads_only_when_asked():
    cfg = tiny(depth=4, base_width=4, num_classes=3, deep_supervision=True)
    net = UNet3d(cfg)
    x = torch.randn(2, 1, 16, 24, 16)
    outs = net(x, deep=True)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 24, 16), (2, 3, 8, 12, 8)]
    assert torch.equal(net(x), outs[0])  # prediction reads the full-resolution head only
    plain = UNet3d(tiny(depth=4, base_width=4, num_classes=3))
    assert torch.is_tensor(plain(x, deep=True))  # nothing to add without the heads
    assert set(net.state_dict()) - set(plain.state_dict()) == {"aux_heads.0.weight", "aux_heads.0.bias"}
    outs[1].sum().backward()
    assert net.aux_heads[0].weight.grad is not None and net.head.weight.grad is None


def test_deep_supervision_levels_and_weights_follow_nnunet():
    assert vmodel.deep_supervision_levels(tiny(depth=2)) == []
    assert vmodel.deep_supervision_levels(tiny(depth=6)) == [1, 2, 3]
    weights = vmodel.deep_supervision_weights(tiny(depth=4))
    assert weights == pytest.approx([2 / 3, 1 / 3])


def test_deep_supervision_needs_same_padding():
    with pytest.raises(VolsegError, match="deep supervision"):
        UNet3d(tiny(depth=3, padding="valid", deep_supervision=True))


def test_output_bias_prior_reaches_every_head():
    net = UNet3d(tiny(depth=4, base_width=2, num_classes=3, deep_supervision=True))
    net.init_output_bias([0.9, 0.05, 0.05])
    assert torch.allclose(net.aux_heads[0].bias, net.head.bias)


# ---- per-level kernels and pooling (thick-slice data) ------------------------------------------------

ANISO = dict(depth=4, kernel_sizes=((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3)),
             pool_sizes=((2, 2, 1), (2, 2, 1), (2, 2, 2)))


def test_anisotropic_network_keeps_the_input_size_and_pools_the_thick_axis_late():
    cfg = tiny(in_channels=2, num_classes=3, **ANISO)
    assert size_divisor(cfg) == (8, 8, 2)
    out = forward(cfg, (1, 2, 32, 24, 6))  # 6 slices: 2x2x2 pooling three times would need 8
    assert out.shape == (1, 3, 32, 24, 6)
    net = UNet3d(cfg)
    assert net.encoders[0][0].weight.shape[2:] == (3, 3, 1) and net.encoders[2][0].weight.shape[2:] == (3, 3, 3)
    assert net.ups[-1].weight.shape[2:] == (2, 2, 1)  # the finest up-convolution undoes a 2x2x1 pooling


def test_anisotropic_network_refuses_sizes_off_its_divisors():
    with pytest.raises(VolsegError, match=r"multiple of \(8, 8, 2\)"):
        forward(tiny(**ANISO), (1, 1, 32, 24, 5))


def test_anisotropic_valid_padding_forward_matches_arithmetic():
    cfg = tiny(padding="valid", depth=3, kernel_sizes=((3, 3, 1), (3, 3, 3), (3, 3, 3)), pool_sizes=((2, 2, 1), (2, 2, 2)))
    shape = (1, 1, 44, 52, 22)
    expected = tuple(valid_output_size(cfg, s, axis) for axis, s in enumerate(shape[2:]))
    assert expected[2] > 0 and all(e > 0 for e in expected)
    assert forward(cfg, shape).shape == (1, 2, *expected)
    assert valid_input_size(cfg, 1, axis=2) < valid_input_size(cfg, 1, axis=0)  # 1-voxel kernels shrink nothing


def test_anisotropic_deep_supervision_heads_match_their_level():
    cfg = tiny(deep_supervision=True, depth=4, kernel_sizes=ANISO["kernel_sizes"], pool_sizes=ANISO["pool_sizes"])
    net = UNet3d(cfg)
    outs = net(torch.zeros(1, 1, 32, 32, 8), deep=True)
    assert [tuple(o.shape[2:]) for o in outs] == [(32, 32, 8), (16, 16, 8), (8, 8, 8)][: len(outs)]


@pytest.mark.parametrize("bad", [dict(depth=3, kernel_sizes=((3, 3, 3),) * 2),
                                 dict(depth=2, pool_sizes=((2, 2, 5),)),
                                 dict(depth=2, kernel_sizes=((3, 3),) * 2)])
def test_malformed_per_level_sizes_are_a_clear_error(bad):
    with pytest.raises(VolsegError, match="must hold"):
        ModelConfig(**bad)


def test_a_model_file_from_before_per_level_pooling_loads_and_predicts_the_same():
    """Written by volseg 8e4539b (no kernel_sizes / pool_sizes in its config); the output it gave
    then on this input is pinned below."""
    from pathlib import Path

    from volseg.checkpoint import load_model

    net, cfg = load_model(Path(__file__).parent / "data" / "model_before_per_level_pooling.safetensors")
    assert cfg.model.kernel_sizes == () and cfg.model.pool_sizes == () and cfg.model.depth == 3
    x = torch.linspace(-1, 1, 16**3).reshape(1, 1, 16, 16, 16)
    with torch.no_grad():
        y = net(x)
    assert float(y.abs().sum()) == pytest.approx(6400.103, rel=1e-4)
    assert float(y[0, 1, 8, 8, 8]) == pytest.approx(-2.17767, abs=1e-4)
