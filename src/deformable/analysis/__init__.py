"""Spatial support of a network's nodes: where they sample, what they are sensitive to, and
which image region they need (DCNv1 §4, DCNv2 §3).

- :func:`sampling_locations`: the image points a node reads through stacked (deformable)
  layers, weighted by the modulation masks; :func:`roi_sampling_locations` for the bins of a
  deformable RoI pooling.
- :func:`effective_receptive_field`: the gradient of the node's response w.r.t. the pixels.
- :func:`saliency_region`: the smallest growing region whose masked image keeps the node's
  response within an error bound.
- detectors (:mod:`deformable.analysis.detection`): the three functions above take a Faster /
  Mask R-CNN for a node of its backbone (``layer_chain`` resolves its ResNet; give it the image
  at its size, :func:`fit_image`); :func:`roi_node_sampling_locations`,
  :func:`roi_node_receptive_field` and :func:`roi_node_saliency_region` do the same for the
  per-RoI node (the box head's 2fc output for one RoI, held fixed).
- :mod:`deformable.analysis.figures`: the three views side by side for several models;
  :mod:`deformable.analysis.loading`: networks and images read from files, for
  ``deformable explain`` (:mod:`deformable.commands.explain`).

Convention:
    Image coordinates are ``(y, x)``, row first, in pixels, integer coordinates at pixel
    centres; a node is ``(y, x)`` in its layer's output map.
"""

from deformable.analysis.chain import conv_layer_names, default_layer, layer_chain
from deformable.analysis.detection import (Detections, RoiNodeSampling, detections, fit_image,
                                           roi_node_receptive_field, roi_node_response,
                                           roi_node_saliency_region,
                                           roi_node_sampling_locations)  # fmt: skip
from deformable.analysis.receptive_field import ReceptiveField, effective_receptive_field
from deformable.analysis.saliency import SaliencyRegion, saliency_region
from deformable.analysis.sampling import (RoiSamplingLocations, SamplingLocations, node_at,
                                          node_location, roi_sampling_locations,
                                          sampling_locations)  # fmt: skip

__all__ = [
    "Detections",
    "ReceptiveField",
    "RoiNodeSampling",
    "RoiSamplingLocations",
    "SaliencyRegion",
    "SamplingLocations",
    "conv_layer_names",
    "default_layer",
    "detections",
    "effective_receptive_field",
    "fit_image",
    "layer_chain",
    "node_at",
    "node_location",
    "roi_node_receptive_field",
    "roi_node_response",
    "roi_node_saliency_region",
    "roi_node_sampling_locations",
    "roi_sampling_locations",
    "saliency_region",
    "sampling_locations",
]
