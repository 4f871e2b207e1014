"""Spatial support of a detector's nodes (DCNv2 §3 and Fig. 1): a node of its backbone and the
per-RoI node, the box head's 2fc output for one RoI.

Detectors: torchvision's Faster / Mask R-CNN as :mod:`deformable.models.detection` builds them
— a ResNet (``backbone.body``) under an FPN (``backbone.fpn``), a multi-level RoI pooling
(``roi_heads.box_roi_pool``: torchvision's ``MultiScaleRoIAlign`` or a
:class:`~deformable.nn.MultiScaleDeformRoIPool`) and the 2fc head (``roi_heads.box_head``).

- **A backbone node** (the last layer of conv5 by default): :func:`~deformable.analysis.layer_chain`
  resolves a detector to its ResNet's main path (``backbone.body.*``), so
  :func:`~deformable.analysis.sampling_locations`,
  :func:`~deformable.analysis.effective_receptive_field` and
  :func:`~deformable.analysis.saliency_region` take the detector itself.
- **The per-RoI node**: :func:`roi_node_sampling_locations` (the bins' sample points, then
  each of them down the FPN and the backbone), :func:`roi_node_receptive_field` and
  :func:`roi_node_saliency_region`; the response is :func:`roi_node_response`, the 2fc output of
  one RoI held fixed (it is given, not re-proposed: the RPN does not run).

The image is ``Tensor[3, H, W]`` (RGB in [0, 1], what the detector takes) at the size the
detector's transform resizes it to (:func:`fit_image`), so that every coordinate is a pixel of
the image given; the analysis refuses (ValueError) an image of another size.

Convention:
    Points are ``(y, x)``, row first, in image pixels, integer coordinates at pixel centres; a
    box is ``(x1, y1, x2, y2)`` in the same coordinates, as the detector's RoI pooling reads it
    (RoIAlign with ``aligned=False``: feature pixel ``i`` of a level of stride ``s`` is at ``s * i``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from deformable.analysis.chain import _EvalMode, check_image, check_input_size, layer_chain
from deformable.analysis.receptive_field import ReceptiveField
from deformable.analysis.saliency import (SaliencyRegion, check_region_settings, fill_background,
                                          grow_region, growing_masks)  # fmt: skip
from deformable.analysis.sampling import (POOL_MODES, propagate, roi_grid, roi_sampling_locations,
                                          span_start)  # fmt: skip
from deformable.nn import DeformConv2d, MultiScaleDeformRoIPool

__all__ = ["Detections", "RoiNodeSampling", "detector_parts", "fit_image", "detections",
           "check_box", "roi_node_response", "roi_node_sampling_locations",
           "roi_node_receptive_field", "roi_node_saliency_region"]  # fmt: skip


class DetectorParts(NamedTuple):
    """The modules of a detector the analysis follows."""

    transform: nn.Module
    backbone: nn.Module
    #: the ResNet under the FPN (``backbone.body``, an ``IntermediateLayerGetter``)
    body: nn.Module
    #: ``backbone.fpn``
    fpn: nn.Module
    #: ``roi_heads.box_roi_pool``
    box_roi_pool: nn.Module
    #: ``roi_heads.box_head`` (its output is the per-RoI node)
    box_head: nn.Module


def detector_parts(detector: nn.Module, where: str = "detector_parts") -> DetectorParts:
    """The parts of a Faster / Mask R-CNN of :mod:`deformable.models.detection`, or a TypeError
    saying what is missing (an R-FCN has no 2fc box head, for one)."""
    from torchvision.ops import MultiScaleRoIAlign

    transform = getattr(detector, "transform", None)
    backbone = getattr(detector, "backbone", None)
    body, fpn = getattr(backbone, "body", None), getattr(backbone, "fpn", None)
    heads = getattr(detector, "roi_heads", None)
    pool, head = getattr(heads, "box_roi_pool", None), getattr(heads, "box_head", None)
    missing = [name for name, part in (("transform", transform), ("backbone.body", body),
                                       ("backbone.fpn", fpn), ("roi_heads.box_roi_pool", pool),
                                       ("roi_heads.box_head", head)) if part is None]  # fmt: skip
    if missing or not hasattr(body, "return_layers"):
        raise TypeError(
            f"{where}: expected a Faster / Mask R-CNN of deformable.models.detection (a ResNet-FPN "
            f"backbone, a multi-level box RoI pooling and a 2fc box head); this "
            f"{type(detector).__name__} has no {', '.join(missing) or 'backbone.body.return_layers'}"
        )
    if not isinstance(pool, (MultiScaleRoIAlign, MultiScaleDeformRoIPool)):
        raise TypeError(f"{where}: roi_heads.box_roi_pool must be a MultiScaleRoIAlign or a "
                        f"MultiScaleDeformRoIPool, got {type(pool).__name__}")  # fmt: skip
    return DetectorParts(transform, backbone, body, fpn, pool, head)


@torch.no_grad()
def fit_image(detector: nn.Module, image: Tensor) -> Tensor:
    """``image`` (``[3, H, W]``) resized as the detector's transform resizes it (its own
    ``resize``, in eval mode: aspect kept, the shorter side to ``min_size`` unless the longer
    one would pass ``max_size``). An image already at that size comes back unchanged.

    Example:
        >>> from deformable.models.detection import fasterrcnn_resnet18_fpn
        >>> detector = fasterrcnn_resnet18_fpn(num_classes=3, min_size=64, max_size=96)
        >>> fit_image(detector, torch.rand(3, 100, 200)).shape
        torch.Size([3, 48, 96])
    """
    transform = detector_parts(detector, "fit_image").transform
    image = check_image(image, "fit_image")[0]
    training = transform.training
    transform.eval()
    try:
        fitted, _ = transform.resize(image, None)
    finally:
        transform.train(training)
    return image if fitted.shape == image.shape else fitted


class Detections(NamedTuple):
    """Result of :func:`detections`, most confident first."""

    #: Tensor[D, 4]: (x1, y1, x2, y2) in image pixels
    boxes: Tensor
    #: Tensor[D]
    scores: Tensor
    #: Tensor[D] (int64, 1..num_classes - 1; 0 is the background)
    labels: Tensor


@torch.no_grad()
def detections(detector: nn.Module, image: Tensor) -> Detections:
    """The detector's detections on ``image`` (``[3, H, W]``, fitted: :func:`fit_image`), in
    eval mode, sorted by decreasing score (the detector's score threshold and NMS applied)."""
    where = "detections"
    detector_parts(detector, where)
    image = check_image(image, where)
    check_input_size(detector, image, where)
    with _EvalMode(detector):
        found = detector([image[0].to(_device(detector))])[0]
    order = torch.argsort(found["scores"].cpu(), descending=True, stable=True)
    return Detections(found["boxes"].cpu()[order], found["scores"].cpu()[order],
                      found["labels"].cpu()[order])  # fmt: skip


def check_box(box, shape, where: str) -> tuple[float, float, float, float]:
    """``box`` as 4 floats ``(x1, y1, x2, y2)`` with ``x1 < x2``, ``y1 < y2``, inside an image
    of ``shape`` (``[..., H, W]``: ``0 <= x1``, ``x2 <= W``), or a ValueError naming it."""
    height, width = shape[-2:]
    if isinstance(box, Tensor):
        box = box.tolist()
    if (not isinstance(box, (tuple, list)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):  # fmt: skip
        raise TypeError(f"{where}: box must be 4 numbers (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is not inside the "
                         f"{width}x{height} image (0 <= x1 < x2 <= {width}, 0 <= y1 < y2 <= "
                         f"{height}; x is the column)")  # fmt: skip
    return x1, y1, x2, y2


def _device(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _features(detector: nn.Module, parts: DetectorParts, images: Tensor, record=()):
    """Run the transform and the backbone (eval mode) on ``images`` ``[B, 3, H, W]``: returns
    ``(FPN features, image sizes, {module: (input, output shape)} of record)``."""
    seen: dict = {}

    def recorder(module, args, output):
        seen[module] = (args[0].detach(), output.shape)

    hooks = [m.register_forward_hook(recorder) for m in set(record)]
    try:
        with _EvalMode(detector):
            image_list, _ = parts.transform(list(images.to(_device(detector))))
            features = parts.backbone(image_list.tensors)
    finally:
        for hook in hooks:
            hook.remove()
    return features, image_list.image_sizes, seen


def roi_node_response(detector: nn.Module, images: Tensor, box) -> Tensor:
    """The per-RoI node: the box head's 2fc output ``Tensor[B, D]`` for the RoI ``box`` (held
    fixed, not re-proposed) in each of ``images`` (``[B, 3, H, W]`` or ``[3, H, W]``, fitted).

    It runs what the detector runs for that RoI in eval mode: transform (normalise, pad),
    backbone and FPN, ``roi_heads.box_roi_pool`` (the RoI's FPN level by the pooler's own rule;
    a deformable pooler predicts its offsets from these features) and ``roi_heads.box_head``.
    Differentiable with respect to ``images``.
    """
    where = "roi_node_response"
    parts = detector_parts(detector, where)
    images = images[None] if isinstance(images, Tensor) and images.dim() == 3 else images
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{where}: images must be a Tensor[B, 3, H, W] or [3, H, W], got "
                         f"{getattr(images, 'shape', type(images).__name__)}")  # fmt: skip
    check_input_size(detector, images[:1], where)
    box = check_box(box, images.shape, where)
    features, sizes, _ = _features(detector, parts, images)
    first = next(iter(features.values()))
    rois = [torch.tensor([box], dtype=first.dtype, device=first.device) for _ in range(len(images))]
    with _EvalMode(detector):
        pooled = parts.box_roi_pool(features, rois, sizes)
        return parts.box_head(pooled).flatten(1)


class RoiNodeSampling(NamedTuple):
    """Result of :func:`roi_node_sampling_locations`."""

    #: Tensor[P, 2]: (y, x) image points the bins' samples read, down the FPN and the backbone
    points: Tensor
    #: Tensor[P]: weight of each point: its bin sample's weight times the masks along its path
    weights: Tensor
    #: Tensor[oh, ow, S, 2]: (y, x) in the image of the ``S`` samples of every bin of the RoI
    #: pooling (NaN for the unused ones of adaptive sampling)
    bins: Tensor
    #: Tensor[oh, ow, S]: weight of each sample in its bin's output (1 / samples per bin, times
    #: the bin's mask for modulated deformable RoI pooling; 0 for unused samples)
    bin_weights: Tensor
    #: key of the FPN level the RoI is pooled from (``"0"`` = P2, stride 4, ...)
    level: str
    #: the RoI, (x1, y1, x2, y2)
    box: tuple[float, float, float, float]


def _level(parts: DetectorParts, features, sizes, rois: Tensor) -> tuple[list[str], int, float]:
    """``(keys of the pooled levels, index of the RoI's level, its spatial scale)`` by the
    pooler's own rule."""
    pooler = parts.box_roi_pool
    keys = [k for k in features if k in pooler.featmap_names]
    maps = [features[k] for k in keys]
    if isinstance(pooler, MultiScaleDeformRoIPool):
        image_size = (max(s[0] for s in sizes), max(s[1] for s in sizes))
        scales = [pooler._scale(f, image_size) for f in maps]
        level = int(pooler.levels([rois[:, 1:]], scales)[0]) if len(maps) > 1 else 0
    else:
        from torchvision.ops.poolers import _setup_scales

        scales, mapper = _setup_scales(maps, sizes, pooler.canonical_scale, pooler.canonical_level)
        level = int(mapper([rois[:, 1:]])[0]) if len(maps) > 1 else 0
    return keys, level, float(scales[level])


def _nearest_source(points: Tensor, out_size, in_size) -> Tensor:
    """Where nearest up-sampling from ``in_size`` to ``out_size`` reads each point (the point
    rounded to its pixel first): ``floor(round(p) * in / out)``, clamped to the map."""
    ratio = torch.tensor([in_size[0] / out_size[0], in_size[1] / out_size[1]], dtype=points.dtype)
    top = torch.tensor([in_size[0] - 1, in_size[1] - 1], dtype=points.dtype)
    return torch.minimum(torch.floor(points.round().clamp_min(0) * ratio), top)


@torch.no_grad()
def roi_node_sampling_locations(detector: nn.Module, image: Tensor, box, *, depth: int | None = 1,
                                pool: str = "centre",
                                max_points: int = 2_000_000) -> RoiNodeSampling:  # fmt: skip
    """Where the per-RoI node of ``box`` reads the image: the bins' sample points, each followed
    down the FPN and the backbone's stacked (deformable) layers.

    1. **Bins.** The box head pools the RoI from one FPN level (the pooler's rule, FPN eq. 1).
       Each of its ``oh x ow`` bins averages ``sampling_ratio**2`` bilinear samples
       (RoIAlign's grid); a deformable pooler moves bin ``(i, j)`` by
       ``gamma * offset * (roi_width, roi_height)`` and a modulated one weighs it by its mask
       (:func:`~deformable.analysis.roi_sampling_locations`). ``bins`` are these samples.
    2. **FPN.** A sample at ``p`` in level ``P_k`` reads the backbone's stage output ``C_k``
       at ``p`` (the lateral 1x1 conv), and, through the top-down path's nearest up-sampling,
       ``C_{k+1}`` at ``floor(round(p) / 2)``, ``C_{k+2}`` at the same rule applied again, ...
       up to the top level: one point per stage from ``C_k`` up, each with the sample's weight.
       The FPN's convolutions are regular and are followed through their centre tap (its 3x3
       output conv would add the same blur to every model).
    3. **Backbone.** From each stage output, down the ResNet's main path as
       :func:`~deformable.analysis.sampling_locations` follows a node: the last ``depth``
       convolutions up to that stage with all their taps (moved by their offsets, weighted by
       their masks), the layers before through their centre.

    Args:
        detector (nn.Module): a Faster / Mask R-CNN of :mod:`deformable.models.detection`.
        image (Tensor[3, H, W]): RGB in [0, 1], at the detector's size (:func:`fit_image`).
        box (Tuple[float, float, float, float]): the RoI, ``(x1, y1, x2, y2)`` in image pixels.
        depth (int, optional): convolutions followed with all their taps on each path, not
            counting 1x1 convs (None: every one). Default: 1.
        pool (str): how the stem's max pool maps a point (see
            :func:`~deformable.analysis.sampling_locations`). Default: ``"centre"``.
        max_points (int): refuse (ValueError) to build more points than this. Default: 2,000,000.

    Returns:
        RoiNodeSampling: ``points`` / ``weights`` in the image, the ``bins``' samples and their
        ``bin_weights``, the FPN ``level`` pooled and the ``box``.

    Convention:
        See the module docstring: ``(y, x)`` points, pixel centres at integers; FPN level
        ``P_k``'s pixel ``i`` at image coordinate ``stride * i``.
    """
    where = "roi_node_sampling_locations"
    if pool not in POOL_MODES:
        raise ValueError(f"{where}: pool must be one of {POOL_MODES}, got {pool!r}")
    parts = detector_parts(detector, where)
    image = check_image(image, where)
    check_input_size(detector, image, where)
    box = check_box(box, image.shape, where)
    chain = layer_chain(parts.body)
    deformable = [m for _, m in chain if isinstance(m, DeformConv2d)]
    features, sizes, seen = _features(detector, parts, image, record=deformable)
    first = next(iter(features.values()))
    rois = torch.tensor([[0.0, *box]], dtype=first.dtype, device=first.device)
    keys, level, scale = _level(parts, features, sizes, rois)
    pooler = parts.box_roi_pool
    if isinstance(pooler, MultiScaleDeformRoIPool):
        grid = roi_sampling_locations(pooler.pool, features[keys[level]], rois, spatial_scale=scale)
        aligned = pooler.pool.aligned
    else:
        grid = roi_grid(rois, pooler.output_size, scale, pooler.sampling_ratio, False)
        aligned = False
    bins, bin_weights = grid.points[0].double(), grid.weights[0].double()
    used = bin_weights.reshape(-1) > 0
    samples, sample_weights = bins.reshape(-1, 2)[used], bin_weights.reshape(-1)[used]

    # the FPN: the body's outputs in order, each the input of one level (same size, same key)
    outputs = list(parts.body.return_layers.items())  # [(stage module name, level key)]
    order = [key for _, key in outputs]
    if keys[level] not in order:
        raise ValueError(f"{where}: the RoI's level {keys[level]!r} is not an output of the "
                         f"backbone's body ({order})")  # fmt: skip
    sizes_of = {key: features[key].shape[-2:] for key in order}
    names = [name for name, _ in chain]
    shift = 0.5 if aligned else 0.0
    current = samples * scale - shift  # in level pixels
    points, weights = [], []
    for index in range(order.index(keys[level]), len(order)):
        stage, key = outputs[index]
        if index > order.index(keys[level]):
            current = _nearest_source(current, sizes_of[order[index - 1]], sizes_of[key])
        end = max(i for i, name in enumerate(names) if name.split(".")[0] == stage)
        path = [(f"backbone.body.{name}", module) for name, module in chain[: end + 1]]
        start = span_start(path, depth, where)
        moved, weight = propagate(path, current, sample_weights, start=start, pool=pool, seen=seen,
                                  max_points=max_points, where=where)  # fmt: skip
        points.append(moved)
        weights.append(weight)
        if sum(len(p) for p in points) > max_points:
            raise ValueError(f"{where}: the RoI's paths make more than max_points="
                             f"{max_points:,} points; pass a smaller depth=")  # fmt: skip
    dtype = image.dtype if image.dtype == torch.float64 else torch.float32
    return RoiNodeSampling(torch.cat(points).to(dtype), torch.cat(weights).to(dtype),
                           bins.to(dtype), bin_weights.to(dtype), keys[level], box)  # fmt: skip


def roi_node_receptive_field(detector: nn.Module, image: Tensor, box) -> ReceptiveField:
    """The effective receptive field of the per-RoI node: ``|d response / d image|`` summed over
    the image's channels and divided by its maximum, the response being the sum of the 2fc
    outputs of the RoI ``box`` held fixed (:func:`roi_node_response`).

    Returns a :class:`~deformable.analysis.ReceptiveField` whose ``node`` is the ``box``.
    Arguments and conventions as :func:`roi_node_sampling_locations`.
    """
    where = "roi_node_receptive_field"
    image = check_image(image, where)
    check_input_size(detector, image, where)
    box = check_box(box, image.shape, where)
    image = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        response = roi_node_response(detector, image, box).sum()
        grad = None
        if response.requires_grad:
            (grad,) = torch.autograd.grad(response, [image], allow_unused=True)
    if grad is None:
        return ReceptiveField(torch.zeros(image.shape[-2:], dtype=image.dtype), box)
    magnitude = grad[0].detach().abs().sum(0).cpu()
    top = magnitude.max()
    return ReceptiveField(magnitude / top if top > 0 else magnitude, box)


def roi_node_saliency_region(detector: nn.Module, image: Tensor, box, *, error_bound: float = 0.1,
                             grow: str = "square", step: int | None = None,
                             fill: float | str = 0.0, batch_size: int = 16) -> SaliencyRegion:  # fmt: skip
    """The error-bounded saliency region of the per-RoI node (DCNv2 §3), the RoI held fixed.

    As :func:`~deformable.analysis.saliency_region`, with the node's response the 2fc output of
    the RoI ``box`` (:func:`roi_node_response`): the smallest of the growing regions (squares
    centred on the box's centre, or pixels in decreasing order of
    :func:`roi_node_receptive_field`) whose masked image keeps that output within a relative
    error ``error_bound`` (L2) of its value on the whole image. The RoI is the same for every
    masked image: only the image changes.

    Returns a :class:`~deformable.analysis.SaliencyRegion` whose ``node`` is the ``box``.
    """
    where = "roi_node_saliency_region"
    image = check_image(image, where)
    check_input_size(detector, image, where)
    box = check_box(box, image.shape, where)
    step = check_region_settings(where, image, error_bound=error_bound, grow=grow, step=step,
                                 batch_size=batch_size)  # fmt: skip
    background = fill_background(where, image, fill)
    with torch.no_grad():
        reference = roi_node_response(detector, image, box)[0]
    centre = ((box[1] + box[3]) / 2, (box[0] + box[2]) / 2)
    erf = roi_node_receptive_field(detector, image, box).map if grow == "gradient" else None
    mask, error = grow_region(image, lambda masked: roi_node_response(detector, masked, box),
                              reference, background,
                              growing_masks(grow, image.shape[-2:], centre, step, erf),
                              error_bound=error_bound, batch_size=batch_size)  # fmt: skip
    return SaliencyRegion(mask, int(mask.sum()), error, box)
