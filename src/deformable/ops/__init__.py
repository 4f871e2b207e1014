"""Differentiable deformable operators, registered with ``torch.library`` (namespace ``deformable``).

Each operator runs the kernel set :mod:`deformable.ops.kernels` selects: the multithreaded numba
kernels on CPU tensors, Triton kernels on CUDA tensors, and the pure-PyTorch reference
(:mod:`deformable.ops.reference`, :mod:`deformable.ops.reference_roi`) on any other device.
``DEFORMABLE_KERNELS=numba|triton|reference`` or :func:`use_kernels` forces one set.
"""

from deformable.ops import reference, reference_roi
from deformable.ops.deform_conv import deform_conv2d
from deformable.ops.deform_roi_pool import deform_ps_roi_pool, deform_roi_pool
from deformable.ops.kernels import KernelUnavailableError, use_kernels

__all__ = ["KernelUnavailableError", "deform_conv2d", "deform_ps_roi_pool", "deform_roi_pool",
           "reference", "reference_roi", "use_kernels"]
