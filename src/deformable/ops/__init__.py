"""Differentiable deformable operators, registered with ``torch.library`` (namespace ``deformable``).

Each operator runs a fast multithreaded kernel on the CPU and the pure-PyTorch reference
(:mod:`deformable.ops.reference`) on any other device.
"""

from deformable.ops import reference
from deformable.ops.deform_conv import deform_conv2d

__all__ = ["deform_conv2d", "reference"]
