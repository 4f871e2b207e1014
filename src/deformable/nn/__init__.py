"""Layers built on :mod:`deformable.ops`; each owns the branches that predict its offsets / masks."""

from deformable.nn.deform_conv import DeformConv2d
from deformable.nn.deform_roi_pool import DeformPSRoIPool, DeformRoIPool, MultiScaleDeformRoIPool
from deformable.nn.param_groups import param_groups
from deformable.nn.spatial_transformer import SpatialTransformer

__all__ = ["DeformConv2d", "DeformPSRoIPool", "DeformRoIPool", "MultiScaleDeformRoIPool",
           "SpatialTransformer", "param_groups"]
