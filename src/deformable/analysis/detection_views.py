"""The spatial support of detectors side by side, as in DCNv2's Fig. 1: for one image, one
backbone node (the last layer of conv5 by default) and the per-RoI node of one box, the three
views (sampling locations, effective receptive field, error-bounded saliency region) of each
detector — what ``deformable explain`` draws for checkpoints of ``deformable train detect``.

Every detector is explained at the same node and the same RoI (the most confident detection of
the first detector, or a box given), on the same image, so rows compare like with like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deformable.analysis.chain import check_node, default_layer, layer_chain, resolve_layer, run_to_layer
from deformable.analysis.detection import (check_box, detections, fit_image,
                                           roi_node_receptive_field, roi_node_saliency_region,
                                           roi_node_sampling_locations)  # fmt: skip
from deformable.analysis.figures import NodeViews, node_views
from deformable.analysis.loading import ExplainError
from deformable.analysis.sampling import SamplingLocations, node_at

__all__ = ["DetectorExplanation", "explain_detectors", "roi_node_views"]


@dataclass
class DetectorExplanation:
    """Result of :func:`explain_detectors`."""

    #: Tensor[3, H, W]: the image at the detectors' size (every coordinate is a pixel of it)
    image: Tensor
    #: the RoI of the per-RoI node, (x1, y1, x2, y2) in pixels of ``image``
    box: tuple[float, float, float, float]
    #: where the box comes from ("the most confident detection: disk, score 0.91", "--box")
    box_source: str
    #: the backbone node's layer and position in its output map
    layer: str
    node: tuple[int, int]
    #: per detector: [backbone node views, per-RoI node views]
    rows: list[list[NodeViews]]


def roi_node_views(detector: nn.Module, image: Tensor, box, *, label: str = "",
                   depth: int | None = 1, error_bound: float = 0.1,
                   grow: str = "square") -> NodeViews:  # fmt: skip
    """The three views of the per-RoI node of ``box`` (see
    :func:`~deformable.analysis.roi_node_sampling_locations`,
    :func:`~deformable.analysis.roi_node_receptive_field`,
    :func:`~deformable.analysis.roi_node_saliency_region`); ``image`` fitted to the detector."""
    sampling = roi_node_sampling_locations(detector, image, box, depth=depth)
    erf = roi_node_receptive_field(detector, image, box)
    region = roi_node_saliency_region(detector, image, box, error_bound=error_bound, grow=grow)
    x1, y1, x2, y2 = sampling.box
    # a bin's location: the weighted mean of its samples; its weight: their sum (its mask)
    weights = sampling.bin_weights.reshape(-1, sampling.bin_weights.shape[-1])
    samples = sampling.bins.reshape(-1, *sampling.bins.shape[-2:]).nan_to_num()
    bin_weight = weights.sum(1)
    centres = (samples * weights[..., None]).sum(1) / bin_weight.clamp_min(1e-12)[:, None]
    level = f", P{int(sampling.level) + 2}" if sampling.level.isdigit() else ""
    caption = (f"{len(sampling.points):,} points from {len(centres)} bins x "
               f"{sampling.bins.shape[-2]} samples{level}")  # fmt: skip
    return NodeViews(label, "roi_heads.box_head", ((y1 + y2) / 2, (x1 + x2) / 2),
                     SamplingLocations(sampling.points, sampling.weights, (0, 0)), erf, region,
                     error_bound, name="per-RoI node", box=sampling.box, bins=centres,
                     bin_weights=bin_weight, caption=caption)  # fmt: skip


def _scaled_box(box, image: Tensor, fitted: Tensor) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = check_box(box, image.shape, "--box")
    except (TypeError, ValueError) as error:
        raise ExplainError(str(error).replace("--box: box", "--box")) from None
    ry, rx = fitted.shape[-2] / image.shape[-2], fitted.shape[-1] / image.shape[-1]
    return x1 * rx, y1 * ry, x2 * rx, y2 * ry


def explain_detectors(detectors: Sequence[nn.Module], image: Tensor, *,
                      labels: Sequence[str] | None = None, box=None,
                      node: tuple[int, int] | None = None, layer: str | None = None,
                      depth: int | None = 3, roi_depth: int | None = 1,
                      error_bound: float = 0.1, grow: str = "square",
                      classes: Sequence[str] | None = None) -> DetectorExplanation:  # fmt: skip
    """The views of one backbone node and of one RoI's per-RoI node, for every detector.

    Args:
        detectors (Sequence[nn.Module]): Faster / Mask R-CNNs of
            :mod:`deformable.models.detection` resizing images alike (same ``min_size`` /
            ``max_size``).
        image (Tensor[3, H, W]): RGB in [0, 1], any size: it is resized as the detectors
            resize it (:func:`~deformable.analysis.fit_image`) and explained at that size.
        labels (Sequence[str], optional): a name per detector, for the figures.
        box (Tuple[float, float, float, float], optional): the RoI ``(x1, y1, x2, y2)`` in
            pixels of ``image`` as given. Default: the first detector's most confident
            detection.
        node (Tuple[int, int], optional): ``(y, x)`` of the backbone node in ``layer``'s output
            map. Default: the node nearest the box's centre.
        layer (str, optional): the backbone node's layer (a name of the ResNet's main path,
            ``backbone.body.layer4.1.conv2``). Default: the last conv of conv5.
        depth (int, optional): convolutions the backbone node is followed through with all
            their taps (None: all). Default: 3 (729 points, as DCNv1's figures).
        roi_depth (int, optional): the same for each bin sample's paths. Default: 1.
        error_bound (float): relative error of the saliency regions. Default: 0.1.
        grow (str): how saliency regions grow, ``"square"`` or ``"gradient"``. Default: square.
        classes (Sequence[str], optional): class names (without the background) to describe
            the detection with.

    Raises:
        ExplainError: a box outside the image, no detection (and no box), a bad node or layer,
            detectors that resize images differently.
    """
    if not detectors:
        raise ValueError("explain_detectors: detectors must hold at least one detector")
    labels = list(labels) if labels is not None else [""] * len(detectors)
    fitted = fit_image(detectors[0], image)
    for other in detectors[1:]:
        if fit_image(other, image).shape != fitted.shape:
            raise ExplainError("the checkpoints resize images differently (trained at different "
                               "--image-size?); explain them separately")  # fmt: skip
    if box is not None:
        box, box_source = _scaled_box(box, image, fitted), "--box"
    else:
        found = detections(detectors[0], fitted)
        if not len(found.scores):
            raise ExplainError(f"{labels[0] or 'the detector'}: no detection in the image (none "
                               "scores above the detector's threshold); choose a box with "
                               "--box X1 Y1 X2 Y2")  # fmt: skip
        box = tuple(float(v) for v in found.boxes[0])
        label = int(found.labels[0])
        name = classes[label - 1] if classes and 0 < label <= len(classes) else f"class {label}"
        box_source = f"most confident detection: {name}, score {float(found.scores[0]):.2f}"
    chain = layer_chain(detectors[0])
    try:
        layer = chain[resolve_layer(chain, layer if layer is not None else default_layer(chain))][0]
    except (TypeError, ValueError) as error:
        raise ExplainError(f"--layer: {error}") from None
    if node is None:
        centre = ((box[1] + box[3]) / 2, (box[0] + box[2]) / 2)
        node = node_at(detectors[0], fitted, centre, layer)
    else:
        with torch.no_grad():
            output, _ = run_to_layer(detectors[0], fitted[None], dict(chain)[layer])
        try:
            node = check_node(tuple(node), output.shape, "--node")
        except (TypeError, ValueError) as error:
            raise ExplainError(str(error)) from None
    rows = []
    for detector, label in zip(detectors, labels):
        try:
            backbone = node_views(detector, fitted, layer, node, label=label, depth=depth,
                                  error_bound=error_bound, grow=grow)  # fmt: skip
            backbone.name = f"{_stage(layer)} node {node}"
            roi = roi_node_views(detector, fitted, box, label=label, depth=roi_depth,
                                 error_bound=error_bound, grow=grow)  # fmt: skip
        except ValueError as error:
            raise ExplainError(f"{label or 'detector'}: {error}") from None
        rows.append([backbone, roi])
    return DetectorExplanation(fitted, box, box_source, layer, node, rows)


def _stage(layer: str) -> str:
    """``"conv5"`` for a layer of ``layer4`` (the papers' stage names), else the layer."""
    for part in layer.split("."):
        if part.startswith("layer") and part[5:].isdigit():
            return f"conv{int(part[5:]) + 1}"
    return layer
