"""deformable: Deformable ConvNets v1 and v2 for PyTorch.

``deformable.ops`` holds the differentiable operators, ``deformable.nn`` the layers built on them,
``deformable.models`` the backbones and networks built from the layers.
"""

from deformable import analysis, models, nn, ops

__version__ = "0.1.0"
__all__ = ["analysis", "models", "nn", "ops", "__version__"]
