"""Pure-PyTorch reference implementations of the operators.

Short, vectorised (gather + bilinear weights) and differentiable through autograd on any device.
They are the test oracle of the fast kernels and the fallback on every device that has none.
They do no argument checking: call the public functions in ``deformable.ops``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bilinear_gather(image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Sample ``image[B, C, H, W]`` at points ``y, x [B, P]`` → ``[B, C, P]``.

    ``g(a, b) = max(0, 1 - |a - b|)`` in each axis; a corner outside the image counts as zero
    (so a point outside ``(-1, H) x (-1, W)`` samples zero).
    """
    batch, channels, height, width = image.shape
    flat = image.reshape(batch, channels, height * width)
    # Far-away points only ever see zero corners; clamping keeps floor() and long() finite, and a
    # NaN point is far away (it samples zero and passes no gradient, as the fast kernels do).
    y = y.nan_to_num(nan=-2.0).clamp(-2.0, height + 1.0)
    x = x.nan_to_num(nan=-2.0).clamp(-2.0, width + 1.0)
    y0 = y.detach().floor()
    x0 = x.detach().floor()
    ly, lx = y - y0, x - x0
    out = image.new_zeros(batch, channels, y.shape[1])
    for dy, wy in ((0, 1 - ly), (1, ly)):
        for dx, wx in ((0, 1 - lx), (1, lx)):
            yi, xi = y0 + dy, x0 + dx
            valid = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
            index = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).long()
            values = flat.gather(2, index[:, None, :].expand(batch, channels, -1))
            out = out + values * (wy * wx * valid)[:, None, :]
    return out


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None) -> Tensor:  # fmt: skip
    """Deformable convolution by explicit sampling; conventions as ``deformable.ops.deform_conv2d``."""
    batch, channels, _, _ = input.shape
    out_channels, channels_per_weight_group, kh, kw = weight.shape
    out_h, out_w = offset.shape[-2:]
    taps = kh * kw
    groups = offset.shape[1] // (2 * taps)
    weight_groups = channels // channels_per_weight_group
    dev = input.device
    # regular grid p0 + p_k per tap and output position: [K, Ho, Wo]
    base_y = (torch.arange(out_h, device=dev) * stride[0] - padding[0])[None, :, None] + (
        torch.arange(kh, device=dev) * dilation[0]).repeat_interleave(kw)[:, None, None]
    base_x = (torch.arange(out_w, device=dev) * stride[1] - padding[1])[None, None, :] + (
        torch.arange(kw, device=dev) * dilation[1]).repeat(kh)[:, None, None]
    off = offset.reshape(batch, groups, taps, 2, out_h, out_w)
    points = taps * out_h * out_w
    y = (base_y + off[:, :, :, 0]).reshape(batch * groups, points)
    x = (base_x + off[:, :, :, 1]).reshape(batch * groups, points)
    image = input.reshape(batch * groups, channels // groups, *input.shape[-2:])
    cols = bilinear_gather(image, y, x).reshape(batch, groups, channels // groups, taps, out_h * out_w)
    if mask is not None:
        cols = cols * mask.reshape(batch, groups, 1, taps, out_h * out_w)
    # grouped GEMM: [N, wg, Cin/wg * K, P] x [wg, Cout/wg, Cin/wg * K]
    cols = cols.reshape(batch, weight_groups, channels_per_weight_group * taps, out_h * out_w)
    w = weight.reshape(weight_groups, out_channels // weight_groups, channels_per_weight_group * taps)
    out = torch.einsum("gok,ngkp->ngop", w, cols).reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out
