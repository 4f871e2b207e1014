"""Effective sampling locations: where in the image a node of a network reads (DCNv1 Fig. 5-6).

A node (one position of one layer's output) reads its input at the taps of its kernel, each
moved by the layer's offset there when the layer is deformable. Every tap lands at a position
of the previous layer's output, which reads its own input the same way: following the taps
back through ``L`` stacked 3x3 layers gives ``9**L`` image points (729 for three). For a
modulated (DCNv2) layer each point is weighted by the product of the masks along its path.

:func:`sampling_locations` does this for a chain of convolutions, deformable convolutions,
pools and spatial transformers (see :mod:`deformable.analysis.chain`);
:func:`roi_sampling_locations` gives the sample points of the bins of a deformable RoI pooling.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from deformable.analysis.chain import (PASS_THROUGH_TYPES, check_image, check_input_size,
                                       check_node, layer_chain, most_active_node, resolve_layer,
                                       run_to_layer)  # fmt: skip
from deformable.nn import DeformConv2d, DeformRoIPool, SpatialTransformer
from deformable.ops.reference import bilinear_gather

__all__ = ["SamplingLocations", "sampling_locations", "node_location", "RoiSamplingLocations",
           "roi_sampling_locations", "roi_grid", "node_at", "propagate", "span_start", "POOL_MODES"]  # fmt: skip

POOL_MODES = ("centre", "window")


class SamplingLocations(NamedTuple):
    """Result of :func:`sampling_locations`."""

    #: Tensor[P, 2]: image coordinates (y, x) of the points (pixel centres at integers)
    points: Tensor
    #: Tensor[P]: weight of each point (product of the masks along its path, divided by the
    #: offset groups; 1 for regular layers)
    weights: Tensor
    #: (y, x) of the node in the layer's output map
    node: tuple[int, int]


def _conv_geometry(module: nn.Module):
    """kernel, stride, padding (top, left), dilation of a conv / pool, as (h, w) pairs."""
    if isinstance(module, (nn.Conv2d, DeformConv2d)):
        kernel, stride, dilation = (_pair(module.kernel_size), _pair(module.stride),
                                    _pair(module.dilation))  # fmt: skip
        padding = module.padding
        if isinstance(padding, str):
            # "valid": none; "same": PyTorch pads total // 2 before (the rest after)
            padding = ((0, 0) if padding == "valid"
                       else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)))  # fmt: skip
        return kernel, stride, _pair(padding), dilation
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    dilation = _pair(getattr(module, "dilation", 1))
    return kernel, stride, _pair(module.padding), dilation


def _taps(kernel, padding, dilation, like: Tensor) -> Tensor:
    """[K, 2] (dy, dx) of every tap, row-major, relative to ``stride * output position``."""
    ky = torch.arange(kernel[0], dtype=like.dtype) * dilation[0] - padding[0]
    kx = torch.arange(kernel[1], dtype=like.dtype) * dilation[1] - padding[1]
    return torch.stack([ky.repeat_interleave(kernel[1]), kx.repeat(kernel[0])], dim=1)


def _field_at(field: Tensor, points: Tensor) -> Tensor:
    """``field [C, H, W]`` bilinearly at ``points [P, 2]`` (y, x) → ``[C, P]``.

    Points in the padding read the nearest point of the map (the field is extended by
    replication), so a sample reaching into the padding keeps its neighbours' offsets / masks.
    """
    height, width = field.shape[-2:]
    y = points[:, 0].clamp(0, height - 1)
    x = points[:, 1].clamp(0, width - 1)
    return bilinear_gather(field[None], y[None], x[None])[0]


def _stn_map(points: Tensor, theta: Tensor, in_size, out_size) -> Tensor:
    """Output pixel coordinates of a spatial transformer → its input pixel coordinates."""
    (hi, wi), (ho, wo) = in_size, out_size
    xn = (2 * points[:, 1] + 1) / wo - 1
    yn = (2 * points[:, 0] + 1) / ho - 1
    u = theta[0, 0] * xn + theta[0, 1] * yn + theta[0, 2]
    v = theta[1, 0] * xn + theta[1, 1] * yn + theta[1, 2]
    return torch.stack([((v + 1) * hi - 1) / 2, ((u + 1) * wi - 1) / 2], dim=1)


def _step(name: str, module: nn.Module, points: Tensor, weights: Tensor, *, spread: bool,
          pool: str, seen: dict) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Points in ``module``'s output → points in its input (all taps if ``spread``, else the
    kernel's centre, offsets ignored)."""
    if isinstance(module, PASS_THROUGH_TYPES):
        return points, weights
    if isinstance(module, SpatialTransformer):
        layer_input, out_shape = seen[module]
        theta = module.theta(layer_input)[0].to(points.device, points.dtype)
        return _stn_map(points, theta, layer_input.shape[-2:], out_shape[-2:]), weights
    if not isinstance(module, (nn.Conv2d, DeformConv2d, nn.MaxPool2d, nn.AvgPool2d)):
        raise ValueError(
            f"sampling_locations: layer {name!r} is a {type(module).__name__}, which the analysis "
            "cannot follow; supported: Conv2d, DeformConv2d, MaxPool2d, AvgPool2d, "
            "SpatialTransformer and pass-through layers (norms, activations, dropout)"
        )
    kernel, stride, padding, dilation = _conv_geometry(module)
    stride_t = torch.tensor(stride, dtype=points.dtype)
    is_pool = isinstance(module, (nn.MaxPool2d, nn.AvgPool2d))
    if not spread or (is_pool and pool == "centre"):
        centre = torch.tensor([dilation[i] * (kernel[i] - 1) / 2 - padding[i] for i in (0, 1)],
                              dtype=points.dtype)  # fmt: skip
        return points * stride_t + centre, weights
    taps = _taps(kernel, padding, dilation, points)  # [K, 2]
    base = points * stride_t  # [P, 2]
    if not isinstance(module, DeformConv2d):
        new = base[:, None, :] + taps[None]
        return new.reshape(-1, 2), weights[:, None].expand(-1, taps.shape[0]).reshape(-1)
    layer_input, _ = seen[module]
    offset, mask = module.offset_and_mask(layer_input)
    groups, count = module.offset_groups, taps.shape[0]
    offset = _field_at(offset[0].to(points.device, points.dtype), points)  # [G*K*2, P]
    offset = offset.reshape(groups, count, 2, -1).permute(3, 0, 1, 2)  # [P, G, K, 2]
    new = base[:, None, None, :] + taps[None, None] + offset
    factor = torch.full((points.shape[0], groups, count), 1.0 / groups, dtype=points.dtype)
    if mask is not None:
        factor = factor * _field_at(mask[0].to(points.device, points.dtype), points).reshape(groups, count, -1
                                                                             ).permute(2, 0, 1)
    return new.reshape(-1, 2), (weights[:, None, None] * factor).reshape(-1)


def _resolve(model, image, layer, chain, where):
    image = check_image(image, where)
    check_input_size(model, image, where)
    resolved = layer_chain(model, chain)
    index = resolve_layer(resolved, layer)
    return image, resolved[: index + 1]


def span_start(path, depth, where) -> int:
    """Index of the first layer propagated with all its taps (``depth`` convolutions back,
    counting those with more than one tap: a 1x1 conv keeps every point where it is)."""
    if depth is None:
        return 0
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"{where}: depth must be a positive int or None, got {depth!r}")
    seen = 0
    for i in range(len(path) - 1, -1, -1):
        module = path[i][1]
        if isinstance(module, (nn.Conv2d, DeformConv2d)) and _pair(module.kernel_size) != (1, 1):
            seen += 1
            if seen == depth:
                return i
    return 0


@torch.no_grad()
def sampling_locations(model: nn.Module, image: Tensor, layer: str | None = None,
                       node: tuple[int, int] | None = None, *, depth: int | None = None,
                       pool: str = "centre", chain: list[str] | None = None,
                       max_points: int = 2_000_000) -> SamplingLocations:  # fmt: skip
    """The image points a node reads through the stacked layers of ``model``, and their weights.

    The model runs on ``image`` (in eval mode, stopping at ``layer``) with forward hooks
    recording the input of every deformable layer and spatial transformer on the way. Then,
    from the node back to the image, every convolution replaces each point by its ``kh * kw``
    taps (``stride * p - padding + dilation * k``), a deformable one moves tap ``k`` by its
    offset at ``p`` (bilinearly interpolated: ``p`` is fractional after a deformable layer), and
    a modulated one multiplies the point's weight by its mask there. Normalisation,
    activation and dropout layers keep points where they are. A spatial transformer maps each
    point through its affine transform.

    Args:
        model (nn.Module): a chain of ``nn.Conv2d``, :class:`~deformable.nn.DeformConv2d`,
            ``nn.MaxPool2d`` / ``nn.AvgPool2d``, :class:`~deformable.nn.SpatialTransformer` and
            pass-through layers, as resolved by :func:`~deformable.analysis.layer_chain`.
        image (Tensor[C, H, W] or Tensor[1, C, H, W]): the input image.
        layer (str, optional): name of the node's layer (as in ``model.named_modules()``).
            Default: the last convolution of the chain.
        node (Tuple[int, int], optional): ``(y, x)`` of the node in the layer's output map.
            Default: the position with the largest response (L2 norm over channels).
        depth (int, optional): propagate through the taps of the last ``depth`` convolutions up
            to ``layer`` (DCNv1's figures use 3), not counting 1x1 convs (a bottleneck's 1x1
            convs keep points where they are, so a ResNet-50 node reads ``9**depth`` points too);
            the layers before them map each point to their kernel's centre (offsets ignored),
            which places the points in the image. Default: None, every layer.
        pool (str): how a pool of kernel ``k`` and stride ``s`` maps a point: ``"centre"``
            (default) to the centre of its ``k x k`` window, ``s * p - padding + (k - 1) / 2``
            (the max / average is over the window, so its centre is where it reads on average;
            this keeps the count at ``9**L`` as in the papers), or ``"window"`` to all ``k * k``
            window positions (each with the point's weight).
        chain (List[str], optional): module names from the input to ``layer`` in forward order,
            for models :func:`~deformable.analysis.layer_chain` cannot resolve.
        max_points (int): refuse (ValueError) to build more points than this; lower ``depth``.
            Default: 2,000,000.

    Returns:
        SamplingLocations: ``points`` ``Tensor[P, 2]`` (y, x) image coordinates, ``weights``
        ``Tensor[P]`` and the ``node``. Points repeat: in a regular network a point's
        multiplicity is the number of paths reaching it. With offset groups ``G > 1`` each tap
        gives ``G`` points (one per group), weighted ``1 / G``.

    Convention:
        Coordinates are ``(y, x)``, row first, in pixels of the input image; integer
        coordinates are pixel centres (``image[..., i, j]`` is at ``(i, j)``), as in the
        deformable convolution's own sampling. Node positions are ``(y, x)`` indices of the
        layer's output map. Offsets and masks at a point in the padding are those of the
        nearest point of the map.

    Example:
        >>> net = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)])
        >>> points, weights, node = sampling_locations(net, torch.rand(1, 16, 16), node=(8, 8))
        >>> points.shape, float(weights.sum())
        (torch.Size([729, 2]), 729.0)
        >>> points.min(0).values.tolist(), points.max(0).values.tolist()
        ([5.0, 5.0], [11.0, 11.0])
    """
    where = "sampling_locations"
    if pool not in POOL_MODES:
        raise ValueError(f"{where}: pool must be one of {POOL_MODES}, got {pool!r}")
    image, path = _resolve(model, image, layer, chain, where)
    start = span_start(path, depth, where)
    record = [m for _, m in path if isinstance(m, (DeformConv2d, SpatialTransformer))]
    output, seen = run_to_layer(model, image, path[-1][1], record)
    node = most_active_node(output) if node is None else check_node(node, output.shape, where)
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    points, weights = propagate(path, torch.tensor([node], dtype=dtype), torch.ones(1, dtype=dtype),
                                start=start, pool=pool, seen=seen, max_points=max_points,
                                where=where)  # fmt: skip
    return SamplingLocations(points, weights, node)


def propagate(path, points: Tensor, weights: Tensor, *, start: int, pool: str, seen: dict,
              max_points: int, where: str) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Points ``[P, 2]`` (and weights ``[P]``) in the output of ``path``'s last layer → the
    points its first layer reads, through every layer from the last to the first (those from
    index ``start`` on with all their taps; see :func:`sampling_locations`). ``seen`` holds the
    recorded input of every deformable layer and spatial transformer of ``path``."""
    for i in range(len(path) - 1, -1, -1):
        name, module = path[i]
        spread = i >= start
        if spread and isinstance(module, (nn.Conv2d, DeformConv2d, nn.MaxPool2d, nn.AvgPool2d)):
            kernel = _conv_geometry(module)[0]
            factor = (kernel[0] * kernel[1] * getattr(module, "offset_groups", 1)
                      if not isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) or pool == "window"
                      else 1)  # fmt: skip
            if points.shape[0] * factor > max_points:
                raise ValueError(
                    f"{where}: following layer {name!r} would make {points.shape[0] * factor:,} "
                    f"points (more than max_points={max_points:,}); pass a smaller depth="
                )
        points, weights = _step(name, module, points, weights, spread=spread, pool=pool, seen=seen)
    return points, weights


@torch.no_grad()
def node_location(model: nn.Module, image: Tensor, layer: str | None = None,
                  node: tuple[int, int] | None = None, *,
                  chain: list[str] | None = None) -> tuple[tuple[float, float], tuple[int, int]]:  # fmt: skip
    """Image coordinates ``(y, x)`` of a node: the centre of its regular receptive field.

    Every layer maps the point to its kernel's (or pool window's) centre, offsets ignored; a
    spatial transformer applies its transform. Conventions and arguments as
    :func:`sampling_locations`. Returns ``((y, x) in the image, node)``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(2))
        >>> node_location(net, torch.rand(1, 8, 8), layer="1", node=(1, 2))
        ((2.5, 4.5), (1, 2))
    """
    where = "node_location"
    image, path = _resolve(model, image, layer, chain, where)
    record = [m for _, m in path if isinstance(m, SpatialTransformer)]
    output, seen = run_to_layer(model, image, path[-1][1], record)
    node = most_active_node(output) if node is None else check_node(node, output.shape, where)
    return _centre(path, seen, node), node


def _centre(path, seen, node) -> tuple[float, float]:
    """The image location of ``node`` (any (y, x), even outside the map) through ``path``'s
    kernel centres."""
    points = torch.tensor([node], dtype=torch.float64)
    weights = torch.ones(1, dtype=torch.float64)
    for name, module in reversed(path):
        points, weights = _step(name, module, points, weights, spread=False, pool="centre",
                                seen=seen)  # fmt: skip
    return float(points[0, 0]), float(points[0, 1])


@torch.no_grad()
def node_at(model: nn.Module, image: Tensor, point: tuple[float, float], layer: str | None = None,
            *, chain: list[str] | None = None) -> tuple[int, int]:  # fmt: skip
    """The node ``(y, x)`` of ``layer`` whose image location (:func:`node_location`) is nearest
    to ``point`` (``(y, x)`` in image pixels), clamped to the layer's output map.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, stride=2), nn.Conv2d(1, 1, 3, stride=2))
        >>> node_at(net, torch.rand(1, 32, 32), (13.0, 40.0))
        (3, 6)
    """
    where = "node_at"
    image, path = _resolve(model, image, layer, chain, where)
    record = [m for _, m in path if isinstance(m, SpatialTransformer)]
    output, seen = run_to_layer(model, image, path[-1][1], record)
    # every layer maps a node's location affinely (kernel centres, strides): two nodes fix it
    origin, step = _centre(path, seen, (0, 0)), _centre(path, seen, (1, 1))
    node = []
    for axis in (0, 1):
        stride = step[axis] - origin[axis]
        size = output.shape[-2 + axis]
        index = round((point[axis] - origin[axis]) / stride) if stride else 0
        node.append(int(min(max(index, 0), size - 1)))
    return node[0], node[1]


class RoiSamplingLocations(NamedTuple):
    """Result of :func:`roi_sampling_locations`."""

    #: Tensor[K, oh, ow, S, 2]: (y, x) of every sample of every bin, in the units of ``boxes``
    #: (NaN for the padding of RoIs with fewer samples per bin than the largest)
    points: Tensor
    #: Tensor[K, oh, ow, S]: weight of each sample in its bin's output (mask / samples; 0 for
    #: padding)
    weights: Tensor


@torch.no_grad()
def roi_sampling_locations(pool: DeformRoIPool, features: Tensor, boxes, *,
                           spatial_scale: float | None = None) -> RoiSamplingLocations:  # fmt: skip
    """Where each bin of a :class:`~deformable.nn.DeformRoIPool` samples, in box (image) units.

    The layer pools the RoIs once without offsets, predicts its normalised offsets (and masks)
    from that, and moves every bin by ``gamma * offset * (roi_width, roi_height)`` (see
    :func:`deformable.ops.deform_roi_pool`). This returns the sample points of the moved bins,
    mapped back from feature-map pixels to the frame of ``boxes`` (divided by the layer's
    ``spatial_scale``).

    Args:
        pool (DeformRoIPool): the layer.
        features (Tensor[N, C, H, W]): the feature map it pools from.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): RoIs, as for the layer.
        spatial_scale (float, optional): the scale ``features`` has, when the layer pools
            another one than its own (one FPN level of a
            :class:`~deformable.nn.MultiScaleDeformRoIPool`, which calls ``pool.pool(features,
            boxes, spatial_scale)``). Default: the layer's ``spatial_scale``.

    Returns:
        RoiSamplingLocations: ``points [K, oh, ow, S, 2]`` and ``weights [K, oh, ow, S]``,
        ``S`` the largest number of samples per bin (``grid_h * grid_w``).

    Convention:
        Points are ``(y, x)``, row first, in the coordinate frame of ``boxes`` (box
        ``(x1, y1, x2, y2)`` spans ``[x1, x2] x [y1, y2]``). With ``aligned=False``
        (torchvision's default) a feature pixel ``i`` is at ``i / spatial_scale``; with
        ``aligned=True`` at ``(i + 0.5) / spatial_scale``, the centre of the pixels it covers.

    Example:
        >>> layer = DeformRoIPool(2, 1.0, 2, in_channels=4, hidden_channels=8)
        >>> points, weights = roi_sampling_locations(layer, torch.rand(1, 4, 8, 8),
        ...                                          torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]))
        >>> points.shape, points[0, 0, 0].tolist(), float(weights.sum())
        (torch.Size([1, 2, 2, 4, 2]), [[0.5, 0.5], [0.5, 1.5], [1.5, 0.5], [1.5, 1.5]], 4.0)
    """
    from deformable.ops import deform_roi_pool
    from deformable.ops.deform_roi_pool import _as_rois

    where = "roi_sampling_locations"
    if not isinstance(pool, DeformRoIPool):
        raise TypeError(f"{where}: pool must be a DeformRoIPool, got {type(pool).__name__}")
    if not isinstance(features, Tensor) or features.dim() != 4:
        raise ValueError(f"{where}: features must be a Tensor[N, C, H, W], got "
                         f"{getattr(features, 'shape', type(features).__name__)}")  # fmt: skip
    rois = _as_rois(where, boxes, features)
    scale = pool.spatial_scale if spatial_scale is None else float(spatial_scale)
    settings = dict(output_size=pool.output_size, spatial_scale=scale,
                    sampling_ratio=pool.sampling_ratio, aligned=pool.aligned)  # fmt: skip
    pooled = deform_roi_pool(features, rois, **settings)
    offset, mask = pool.offset_and_mask(pooled)
    out_dtype = features.dtype if features.is_floating_point() else torch.float32
    points, weights = roi_grid(rois, pool.output_size, scale, pool.sampling_ratio, pool.aligned,
                               offset=offset, mask=mask, gamma=pool.gamma)  # fmt: skip
    return RoiSamplingLocations(points.to(out_dtype), weights.to(out_dtype))


def roi_grid(rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
             sampling_ratio: int, aligned: bool = False, *, offset: Tensor | None = None,
             mask: Tensor | None = None, gamma: float = 0.1) -> RoiSamplingLocations:  # fmt: skip
    """RoIAlign's sample points of every bin of ``rois`` (``Tensor[K, 5]``), moved by the
    normalised ``offset`` (``[K, 2, oh, ow]``, see :func:`deformable.ops.deform_roi_pool`)
    when given; weights ``1 / samples`` per bin, times ``mask`` (``[K, 1, oh, ow]``) when given.
    Points (float64) are in box units, as :func:`roi_sampling_locations` returns them.
    """
    from deformable.ops.reference_roi import roi_geometry

    oh, ow = output_size
    dtype = torch.float64
    geo = roi_geometry(rois.to("cpu", dtype), output_size, spatial_scale, sampling_ratio,
                       aligned, position_sensitive=False)  # fmt: skip
    count = rois.shape[0]
    most_h = int(geo.grid_h.max()) if count else 1
    most_w = int(geo.grid_w.max()) if count else 1
    iy = torch.arange(max(most_h, 1), dtype=dtype)
    ix = torch.arange(max(most_w, 1), dtype=dtype)
    k = (slice(None),) + (None,) * 4  # broadcast a [K] tensor to [K, oh, ow, SY, SX]
    bin_h, bin_w = geo.height / oh, geo.width / ow
    gh, gw = geo.grid_h.to(dtype).clamp_min(1), geo.grid_w.to(dtype).clamp_min(1)
    ii = torch.arange(oh, dtype=dtype)[None, :, None, None, None]
    jj = torch.arange(ow, dtype=dtype)[None, None, :, None, None]
    y = geo.start_y[k] + ii * bin_h[k] + (iy[None, None, None, :, None] + 0.5) * (bin_h / gh)[k]
    x = geo.start_x[k] + jj * bin_w[k] + (ix[None, None, None, None, :] + 0.5) * (bin_w / gw)[k]
    if offset is not None:
        off = offset.to("cpu", dtype)[..., None, None]  # [K, 2, oh, ow, 1, 1]
        x = x + gamma * off[:, 0] * geo.width[k]
        y = y + gamma * off[:, 1] * geo.height[k]
    used = ((iy[None, None, None, :, None] < geo.grid_h.to(dtype)[k])
            & (ix[None, None, None, None, :] < geo.grid_w.to(dtype)[k]))  # fmt: skip
    y, x = torch.broadcast_tensors(y, x)
    shift = 0.5 if aligned else 0.0
    points = (torch.stack([y, x], dim=-1) + shift) / spatial_scale
    points = torch.where(used[..., None], points, torch.full_like(points, math.nan))
    weights = used.to(dtype) / (geo.grid_h * geo.grid_w).to(dtype).clamp_min(1)[k]
    weights = weights.expand(count, oh, ow, *weights.shape[3:])
    if mask is not None:
        weights = weights * mask.to("cpu", dtype)[:, 0, :, :, None, None]
    samples = points.shape[3] * points.shape[4]
    return RoiSamplingLocations(points.reshape(count, oh, ow, samples, 2),
                                weights.reshape(count, oh, ow, samples))
