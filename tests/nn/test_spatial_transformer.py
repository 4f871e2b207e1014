"""SpatialTransformer: identity at initialisation, the affine convention, gradients, checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close
from deformable.nn.spatial_transformer import SpatialTransformer


def _set_theta(stn, theta):
    with torch.no_grad():
        stn.fc_theta.bias.copy_(torch.tensor(theta, dtype=stn.fc_theta.bias.dtype).flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [(1, 1), (7, 5), (20, 33)])
def test_identity_at_initialisation(dtype, size):
    stn = SpatialTransformer(3).to(dtype)
    x = torch.randn(4, 3, *size, dtype=dtype)
    assert_close(stn(x), x, what="identity")
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=dtype).expand(4, 2, 3)
    assert torch.equal(stn.last_theta, identity)
    assert not stn.last_theta.requires_grad
    theta = stn.theta(x)
    assert theta.shape == (4, 2, 3) and theta.requires_grad


def test_output_size_resamples_at_pixel_centres():
    # identity theta + align_corners=False: what bilinear interpolation of the image computes
    # (which clamps to the edge pixels, as padding_mode="border" does)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    for size in [(24, 20), (6, 5), (9, 13)]:
        stn = SpatialTransformer(3, output_size=size, padding_mode="border").double()
        expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        assert_close(stn(x), expected, what=f"output_size={size}")


def test_convention_x_first_and_corners():
    x = torch.randn(2, 3, 6, 9, dtype=torch.float64)
    stn = SpatialTransformer(3).double()
    _set_theta(stn, [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # x -> -x: horizontal flip
    assert_close(stn(x), x.flip(-1), what="horizontal flip")
    _set_theta(stn, [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    assert_close(stn(x), x.flip(-2), what="vertical flip")
    # shift right by one pixel: normalised 2 / W; the first column falls outside -> zeros
    _set_theta(stn, [[1.0, 0.0, -2.0 / 9], [0.0, 1.0, 0.0]])
    expected = torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], dim=-1)
    assert_close(stn(x), expected, what="translation")
    border = SpatialTransformer(3, padding_mode="border").double()
    _set_theta(border, [[1.0, 0.0, -2.0 / 9], [0.0, 1.0, 0.0]])
    assert_close(border(x)[..., 0], x[..., 0], what="border padding")


def test_gradient_reaches_localisation_network():
    stn = SpatialTransformer(3, hidden_channels=(8,))
    model = nn.Sequential(stn, nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 3, 16, 16)
    target = torch.randn(4, 4)
    for step in range(2):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        assert stn.fc_theta.weight.grad.abs().sum() > 0
        assert stn.fc_theta.bias.grad.abs().sum() > 0
        optimizer.step()
    # the localisation convs get gradient once the last layer has left zero
    assert stn.localisation[0].weight.grad.abs().sum() > 0
    theta = stn.theta(x)
    assert not torch.allclose(theta, stn.last_theta.new_tensor([[1, 0, 0], [0, 1, 0.0]]))


def test_gradcheck():
    stn = SpatialTransformer(2, hidden_channels=(3,), pooled_size=2, fc_channels=4).double()
    with torch.no_grad():
        stn.fc_theta.weight.normal_(0, 0.1)
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stn, (x,))


def test_exceptions():
    stn = SpatialTransformer(3)
    with pytest.raises(ValueError, match=r"input must be \[N, 3, H, W\], got \[3, 8, 8\]"):
        stn(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"input must be \[N, 3, H, W\], got \[1, 4, 8, 8\]"):
        stn(torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="floating point"):
        stn(torch.ones(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="in_channels"):
        SpatialTransformer(0)
    with pytest.raises(ValueError, match=r"padding_mode.*'zeros', 'border', 'reflection'"):
        SpatialTransformer(3, padding_mode="nearest")
    with pytest.raises(ValueError, match="output_size"):
        SpatialTransformer(3, output_size=(0, 4))
    with pytest.raises(ValueError, match="hidden_channels"):
        SpatialTransformer(3, hidden_channels=(8, -1))
    with pytest.raises(ValueError, match="fc_channels"):
        SpatialTransformer(3, fc_channels=0)
    with pytest.raises(TypeError):
        SpatialTransformer(3, 16)  # keyword-only options
