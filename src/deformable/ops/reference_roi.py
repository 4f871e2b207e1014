"""Pure-PyTorch references of the deformable RoI pooling operators.

Vectorised over RoIs, bins and samples (adaptive sampling grids are padded to the largest one
and masked), differentiable through autograd on any device. They are the test oracle of the
fast CPU kernels and the fallback on every other device. No argument checking: call
:func:`deformable.ops.deform_roi_pool.deform_roi_pool` / ``deform_ps_roi_pool``.

The bilinear sampling is RoIAlign's (``torchvision.ops.roi_align``), not the zero-padded one of
the convolution: a sample outside ``[-1, H] x [-1, W]`` is zero; inside that band a coordinate
below 0 is moved to 0 and one at or past ``size - 1`` to ``size - 1`` (border pixels repeat), and
the moved coordinate no longer moves the sample (zero derivative).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class RoiGeometry(NamedTuple):
    """Per-RoI geometry, each a ``[K]`` tensor (the kernels use exactly these numbers)."""

    batch: Tensor  # int64 image index
    start_y: Tensor  # top-left corner of the RoI in feature-map pixels
    start_x: Tensor
    height: Tensor  # RoI size; it also scales the normalised offsets
    width: Tensor
    grid_h: Tensor  # int64 samples per bin and axis
    grid_w: Tensor


def roi_geometry(boxes: Tensor, output_size: Sequence[int], spatial_scale: float,
                 sampling_ratio: int, aligned: bool, position_sensitive: bool) -> RoiGeometry:  # fmt: skip
    """RoIAlign's box arithmetic, in the dtype of ``boxes`` (``[K, 5]``).

    ``aligned`` shifts boxes by half a pixel; without it RoIs are at least 1x1 (torchvision's
    ``roi_align``). Adaptive sampling (``sampling_ratio <= 0``) takes ``ceil(size / bins)``
    samples per axis: zero for an empty RoI in RoIAlign (the bin is 0), at least one in the
    position-sensitive op (torchvision's ``ps_roi_align`` divides by zero there).
    """
    shift = 0.5 if aligned else 0.0
    start_x = boxes[:, 1] * spatial_scale - shift
    start_y = boxes[:, 2] * spatial_scale - shift
    width = boxes[:, 3] * spatial_scale - shift - start_x
    height = boxes[:, 4] * spatial_scale - shift - start_y
    if not aligned:
        width = width.clamp_min(1.0)
        height = height.clamp_min(1.0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(height, sampling_ratio, dtype=torch.int64)
        grid_w = torch.full_like(width, sampling_ratio, dtype=torch.int64)
    else:
        grid_h = torch.ceil(height / output_size[0]).to(torch.int64)
        grid_w = torch.ceil(width / output_size[1]).to(torch.int64)
    least = 1 if position_sensitive else 0
    return RoiGeometry(boxes[:, 0].to(torch.int64), start_y, start_x, height, width,
                       grid_h.clamp_min(least), grid_w.clamp_min(least))  # fmt: skip


def _axis(v: Tensor, size: int):
    """RoIAlign's clamping along one axis: (low, high, weight of low, weight of high)."""
    v = torch.where(v <= 0, torch.zeros_like(v), v)
    low = v.detach().floor()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    v = torch.where(edge, low, v)
    high = torch.where(edge, low, low + 1)
    frac = v - low
    return low.long(), high.long(), 1 - frac, frac


def roi_align_bilinear(rows: Tensor, base: Tensor, y: Tensor, x: Tensor, height: int,
                       width: int, stride: int) -> Tensor:  # fmt: skip
    """Sum over the four corners of ``weight * rows[base + (y * width + x) * stride]``.

    ``rows`` is ``[R, C]``; ``base``, ``y``, ``x`` broadcast to one shape ``S``; returns
    ``[*S, C]`` (RoIAlign's bilinear interpolation, see the module docstring).
    """
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)  # False for NaN
    y = torch.where(inside, y, torch.zeros_like(y))  # keeps floor() finite, gradients clean
    x = torch.where(inside, x, torch.zeros_like(x))
    y_low, y_high, hy, ly = _axis(y, height)
    x_low, x_high, hx, lx = _axis(x, width)
    out = 0
    for yi, wy in ((y_low, hy), (y_high, ly)):
        for xi, wx in ((x_low, hx), (x_high, lx)):
            index = (base + (yi * width + xi) * stride).expand(inside.shape)
            values = rows[index.reshape(-1)].reshape(*inside.shape, rows.shape[1])
            out = out + values * (wy * wx * inside)[..., None]
    return out


def _pool(input: Tensor, boxes: Tensor, output_size, spatial_scale, sampling_ratio, aligned,
          offset: Optional[Tensor], gamma: float, position_sensitive: bool) -> Tensor:  # fmt: skip
    """[K, G, oh, ow, C / G]: the average of the samples of every bin, offset group g."""
    batch, channels, height, width = input.shape
    oh, ow = output_size
    bins = oh * ow
    groups = offset.shape[1] // 2 if offset is not None and position_sensitive else 1
    if position_sensitive:
        # rows[((n * bins + b) * H + y) * W + x) * G + g] = channels (g, r) of bin b at (y, x)
        per_group = channels // bins // groups
        image = input.reshape(batch, groups, per_group, bins, height, width)
        rows = image.permute(0, 3, 4, 5, 1, 2).reshape(-1, per_group)
        channel_bins = bins
    else:
        per_group = channels
        rows = input.permute(0, 2, 3, 1).reshape(-1, channels)
        channel_bins = 1
    geo = roi_geometry(boxes, output_size, spatial_scale, sampling_ratio, aligned,
                       position_sensitive)  # fmt: skip
    count = boxes.shape[0]
    most_h = int(geo.grid_h.max()) if count else 1
    most_w = int(geo.grid_w.max()) if count else 1
    # shapes [K, G, oh, ow, SY, SX] by broadcasting
    dev, dtype = input.device, input.dtype
    iy = torch.arange(max(most_h, 1), device=dev, dtype=dtype)[:, None]
    ix = torch.arange(max(most_w, 1), device=dev, dtype=dtype)[None, :]
    ii = torch.arange(oh, device=dev, dtype=dtype)[:, None, None, None]
    jj = torch.arange(ow, device=dev, dtype=dtype)[None, :, None, None]

    def per_roi(t):
        return t.reshape(-1, 1, 1, 1, 1, 1)

    bin_h, bin_w = geo.height / oh, geo.width / ow
    gh, gw = per_roi(geo.grid_h), per_roi(geo.grid_w)
    y = per_roi(geo.start_y) + ii * per_roi(bin_h) + (iy + 0.5) * per_roi(bin_h) / gh.clamp_min(1)
    x = per_roi(geo.start_x) + jj * per_roi(bin_w) + (ix + 0.5) * per_roi(bin_w) / gw.clamp_min(1)
    if offset is not None:
        off = offset.reshape(count, groups, 2, oh, ow)[..., None, None]
        x = x + gamma * off[:, :, 0] * per_roi(geo.width)
        y = y + gamma * off[:, :, 1] * per_roi(geo.height)
    used = (iy < gh) & (ix < gw)
    b = (torch.arange(bins, device=dev).reshape(oh, ow)[:, :, None, None]
         if position_sensitive else torch.zeros((), dtype=torch.int64, device=dev))  # fmt: skip
    g = torch.arange(groups, device=dev).reshape(1, groups, 1, 1, 1, 1)
    base = ((per_roi(geo.batch) * channel_bins + b) * height * width) * groups + g
    samples = roi_align_bilinear(rows, base, y, x, height, width, groups)
    samples = samples * used[..., None]
    total = samples.sum((4, 5))
    return total / per_roi(gh * gw).clamp_min(1)[..., 0, 0, None]


def deform_roi_pool(input: Tensor, boxes: Tensor, output_size: Sequence[int],
                    spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
                    offset: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                    gamma: float = 0.1) -> Tensor:  # fmt: skip
    """Deformable (modulated) RoI pooling; conventions as ``deformable.ops.deform_roi_pool``."""
    pooled = _pool(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset,
                   gamma, position_sensitive=False)  # fmt: skip
    out = pooled[:, 0].permute(0, 3, 1, 2)
    return out * mask if mask is not None else out


def deform_ps_roi_pool(input: Tensor, boxes: Tensor, output_size: Sequence[int],
                       spatial_scale: float = 1.0, sampling_ratio: int = -1,
                       offset: Optional[Tensor] = None, gamma: float = 0.1) -> Tensor:  # fmt: skip
    """Deformable PS RoI pooling; conventions as ``deformable.ops.deform_ps_roi_pool``."""
    pooled = _pool(input, boxes, output_size, spatial_scale, sampling_ratio, True, offset, gamma,
                   position_sensitive=True)  # fmt: skip
    count, groups, oh, ow, per_group = pooled.shape
    return pooled.permute(0, 1, 4, 2, 3).reshape(count, groups * per_group, oh, ow)
