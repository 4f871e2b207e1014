"""Differentiable deformable operators, registered with ``torch.library`` (namespace ``deformable``).

Each operator runs a fast multithreaded kernel on the CPU and the pure-PyTorch reference
(:mod:`deformable.ops.reference`) on any other device.
"""

from deformable.ops import reference, reference_roi
from deformable.ops.deform_conv import deform_conv2d
from deformable.ops.deform_roi_pool import deform_ps_roi_pool, deform_roi_pool

__all__ = ["deform_conv2d", "deform_ps_roi_pool", "deform_roi_pool", "reference", "reference_roi"]
