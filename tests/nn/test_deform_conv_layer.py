"""DeformConv2d layer: a fresh layer is its regular twin; checkpoints of mmcv / torchvision load."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from helpers import assert_close
from deformable.nn import DeformConv2d, param_groups
from deformable.ops import deform_conv2d


def test_smoke_and_cardinality():
    layer = DeformConv2d(6, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                         offset_groups=3, modulated=True)  # fmt: skip
    out = layer(torch.randn(2, 6, 9, 8))
    assert out.shape == (2, 8, 4, 7)
    assert layer.conv_offset.out_channels == 3 * 3 * 3 * 2


@pytest.mark.parametrize("groups", [1, 2])
def test_fresh_v1_layer_equals_conv2d(groups):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=groups)
    layer = DeformConv2d.from_conv2d(conv)
    x = torch.randn(3, 4, 11, 10)
    assert_close(layer(x), conv(x))


def test_fresh_v2_layer_is_half_of_conv_plus_bias():
    layer = DeformConv2d(4, 6, 3, padding=1, modulated=True).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    conv = torch.nn.functional.conv2d(x, layer.weight, None, padding=1)
    assert_close(layer(x), 0.5 * conv + layer.bias[None, :, None, None])


def test_gradients_reach_offset_branch():
    layer = DeformConv2d(4, 6, 3, padding=1, modulated=True)
    x = torch.randn(2, 4, 7, 7)
    layer(x).square().sum().backward()
    assert layer.conv_offset.weight.grad.abs().sum() > 0
    assert layer.weight.grad.abs().sum() > 0


def _mmcv_forward(x, sd, stride, padding, dilation, modulated):
    """mmcv's DeformConv2dPack / ModulatedDeformConv2dPack forward, written from its semantics."""
    out = torch.nn.functional.conv2d(x, sd["conv_offset.weight"], sd["conv_offset.bias"], stride,
                                     padding, dilation)  # fmt: skip
    mask = None
    if modulated:
        o1, o2, logits = torch.chunk(out, 3, dim=1)
        out, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(logits)
    return torchvision.ops.deform_conv2d(x, out, sd["weight"], sd.get("bias"), stride, padding,
                                         dilation, mask)  # fmt: skip


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("old_name", [None, "conv_offset_mask"])
def test_loads_mmcv_pack_state_dict(modulated, old_name):
    g, k = 2, 9
    sd = {
        "weight": torch.randn(8, 4, 3, 3),
        "conv_offset.weight": torch.randn((3 if modulated else 2) * g * k, 4, 3, 3) * 0.1,
        "conv_offset.bias": torch.randn((3 if modulated else 2) * g * k) * 0.1,
    }
    if modulated:
        sd["bias"] = torch.randn(8)
    x = torch.randn(2, 4, 9, 9)
    expected = _mmcv_forward(x, sd, (1, 1), (1, 1), (1, 1), modulated)
    if old_name:
        sd = {k.replace("conv_offset", old_name): v for k, v in sd.items()}
    layer = DeformConv2d(4, 8, 3, padding=1, offset_groups=g, bias=modulated, modulated=modulated)
    layer.load_state_dict(sd)
    assert_close(layer(x), expected)


@pytest.mark.parametrize("with_mask", [False, True])
def test_from_torchvision(with_mask):
    tv = torchvision.ops.DeformConv2d(4, 6, 3, stride=1, padding=1, groups=2)
    offset_conv = nn.Conv2d(4, 2 * 2 * 9, 3, padding=1)
    mask_conv = nn.Conv2d(4, 2 * 9, 3, padding=1) if with_mask else None
    x = torch.randn(2, 4, 8, 8)
    mask = torch.sigmoid(mask_conv(x)) if with_mask else None
    expected = tv(x, offset_conv(x), mask)
    layer = DeformConv2d.from_torchvision(tv, offset_conv, mask_conv)
    assert layer.modulated == with_mask and layer.offset_groups == 2
    assert_close(layer(x), expected)


def test_param_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), DeformConv2d(4, 4, 3, modulated=True))
    model[0].bias.requires_grad_(False)
    base, offset = param_groups(model, lr=0.1, offset_lr_mult=0.01, weight_decay=1e-4)
    assert base["lr"] == 0.1 and offset["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in offset["params"]} == {id(p) for p in model[1].conv_offset.parameters()}
    assert len(base["params"]) == 3  # conv weight (bias frozen), deform weight and bias
    assert base["weight_decay"] == offset["weight_decay"] == 1e-4
    optimizer = torch.optim.SGD([base, offset], lr=0.1)
    assert len(optimizer.param_groups) == 2


class TestBadArguments:
    def test_groups(self):
        with pytest.raises(ValueError, match="divisible by groups"):
            DeformConv2d(6, 4, 3, groups=4)

    def test_offset_groups(self):
        with pytest.raises(ValueError, match="divisible by offset_groups"):
            DeformConv2d(6, 4, 3, offset_groups=4)

    def test_kernel_size(self):
        with pytest.raises(ValueError, match="kernel_size must be >= 1"):
            DeformConv2d(6, 4, 0)

    def test_channels(self):
        with pytest.raises(ValueError, match="in_channels must be a positive int"):
            DeformConv2d(0, 4, 3)

    def test_from_conv2d_padding_mode(self):
        with pytest.raises(ValueError, match="padding_mode"):
            DeformConv2d.from_conv2d(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))

    def test_from_torchvision_offset_channels(self):
        tv = torchvision.ops.DeformConv2d(4, 6, 3, padding=1)
        with pytest.raises(ValueError, match="offset_conv must have 2 \\* offset_groups"):
            DeformConv2d.from_torchvision(tv, nn.Conv2d(4, 17, 3, padding=1))
        with pytest.raises(ValueError, match="kernel, stride, padding and dilation"):
            DeformConv2d.from_torchvision(tv, nn.Conv2d(4, 18, 3, padding=0))


def test_functional_and_layer_agree_under_compile():
    layer = DeformConv2d(4, 4, 3, padding=1, modulated=True)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.1)
    x = torch.randn(1, 4, 6, 6)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    offset, mask = layer.offset_and_mask(x)
    expected = deform_conv2d(x, offset, layer.weight, layer.bias, padding=1, mask=mask)
    assert_close(compiled(x), expected)
