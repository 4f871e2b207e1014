"""Effective receptive field: the normalised |gradient| of a node's response."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deformable.analysis import effective_receptive_field


def placed(kernel, shape, top, left):
    out = torch.zeros(shape)
    out[top : top + kernel.shape[0], left : left + kernel.shape[1]] = kernel
    return out


def test_single_conv_is_its_weights():
    conv = nn.Conv2d(1, 1, (3, 4), bias=True)
    erf = effective_receptive_field(nn.Sequential(conv), torch.rand(1, 10, 12), node=(2, 5))
    w = conv.weight[0, 0].detach().abs()
    assert torch.allclose(erf.map, placed(w / w.max(), (10, 12), 2, 5))
    assert erf.node == (2, 5)


def test_multichannel_strided_conv_sums_channels():
    conv = nn.Conv2d(3, 1, 3, stride=2, padding=1)
    erf = effective_receptive_field(nn.Sequential(conv), torch.rand(3, 11, 11), node=(3, 2))
    w = conv.weight[0].detach().abs().sum(0)
    # output (3, 2) reads rows 2*3-1 .. 2*3+1, columns 2*2-1 .. 2*2+1
    assert torch.allclose(erf.map, placed(w / w.max(), (11, 11), 5, 3))


def test_a_linear_map_is_its_composed_kernel():
    first, second = nn.Conv2d(1, 1, 3, bias=False), nn.Conv2d(1, 1, 3, bias=False)
    net = nn.Sequential(first, second)  # no nonlinearity: one 5x5 linear filter
    erf = effective_receptive_field(net, torch.rand(1, 9, 9), node=(1, 2))
    composed = F.conv_transpose2d(second.weight.detach(), first.weight.detach())[0, 0].abs()
    assert torch.allclose(erf.map, placed(composed / composed.max(), (9, 9), 1, 2), atol=1e-6)


def test_one_channel_and_the_default_node():
    conv = nn.Conv2d(1, 2, 3, padding=1)
    image = torch.zeros(1, 8, 8)
    image[0, 5, 6] = 1.0
    erf = effective_receptive_field(nn.Sequential(conv), image, channel=1)
    assert erf.map.max() == 1 and erf.map.shape == (8, 8)
    y, x = erf.node
    assert abs(y - 5) <= 1 and abs(x - 6) <= 1  # the most active node sees the bright pixel
    w = conv.weight[1, 0].detach().abs()
    assert torch.allclose(erf.map, placed(w / w.max(), (10, 10), y, x)[1:-1, 1:-1] /
                          (placed(w / w.max(), (10, 10), y, x)[1:-1, 1:-1].max()))


def test_a_node_that_ignores_the_image_has_a_zero_map():
    conv = nn.Conv2d(1, 1, 3)
    with torch.no_grad():
        conv.weight.zero_()
    erf = effective_receptive_field(nn.Sequential(conv), torch.rand(1, 6, 6), node=(0, 0))
    assert torch.equal(erf.map, torch.zeros(6, 6))


def test_digitnet_restores_training_mode_and_leaves_no_hooks():
    from deformable.models import DigitNet

    model = DigitNet("dcnv2").train()
    erf = effective_receptive_field(model, torch.rand(1, 40, 40))
    assert erf.map.shape == (40, 40) and float(erf.map.max()) == 1.0
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_exceptions():
    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="channel must be an int in"):
        effective_receptive_field(net, torch.rand(1, 5, 5), channel=2)
    with pytest.raises(TypeError, match="image must be floating point"):
        effective_receptive_field(net, torch.ones(1, 5, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="image must be a Tensor"):
        effective_receptive_field(net, [[1.0]])
