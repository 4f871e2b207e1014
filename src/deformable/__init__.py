"""deformable: Deformable ConvNets v1 and v2 for PyTorch.

``deformable.ops`` holds the differentiable operators, ``deformable.nn`` the layers built on them.
"""

from deformable import nn, ops

__version__ = "0.1.0"
__all__ = ["nn", "ops", "__version__"]
