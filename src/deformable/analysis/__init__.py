"""Spatial support of a network's nodes: where they sample, what they are sensitive to, and
which image region they need (DCNv1 §4, DCNv2 §3).

- :func:`sampling_locations`: the image points a node reads through stacked (deformable)
  layers, weighted by the modulation masks; :func:`roi_sampling_locations` for the bins of a
  deformable RoI pooling.
- :func:`effective_receptive_field`: the gradient of the node's response w.r.t. the pixels.
- :func:`saliency_region`: the smallest growing region whose masked image keeps the node's
  response within an error bound.
- :mod:`deformable.analysis.figures`: the three views side by side for several models;
  :mod:`deformable.analysis.loading`: networks and images read from files, for
  ``deformable explain`` (:mod:`deformable.commands.explain`).

Convention:
    Image coordinates are ``(y, x)``, row first, in pixels, integer coordinates at pixel
    centres; a node is ``(y, x)`` in its layer's output map.
"""

from deformable.analysis.chain import conv_layer_names, default_layer, layer_chain
from deformable.analysis.receptive_field import ReceptiveField, effective_receptive_field
from deformable.analysis.saliency import SaliencyRegion, saliency_region
from deformable.analysis.sampling import (RoiSamplingLocations, SamplingLocations, node_location,
                                          roi_sampling_locations, sampling_locations)  # fmt: skip

__all__ = [
    "ReceptiveField",
    "RoiSamplingLocations",
    "SaliencyRegion",
    "SamplingLocations",
    "conv_layer_names",
    "default_layer",
    "effective_receptive_field",
    "layer_chain",
    "node_location",
    "roi_sampling_locations",
    "saliency_region",
    "sampling_locations",
]
