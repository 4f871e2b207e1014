"""The chain of layers between a model's input and a node, and running a model up to a node.

A *node* is one position ``(y, x)`` of the output map of one layer. The analysis tools in this
package need the layers the node's signal passes through, in forward order: a *chain*, a list of
``(name, module)`` pairs whose names are those of ``model.named_modules()`` (the names forward
hooks and ``--layer`` options use). :func:`layer_chain` resolves it for

- an ``nn.Sequential`` (nested ``nn.Sequential`` are flattened);
- a model with a ``features`` ``nn.Sequential`` (the demo's ``DigitNet``, torchvision's VGG /
  AlexNet style), with its ``stn`` spatial transformer first when it has one;
- a torchvision-style ResNet (:class:`deformable.models.DeformResNet`): the stem, then the
  **main path** of every residual block (``conv1``, ``conv2``, [``conv3``] with their norms).
  The shortcut (identity or strided 1x1 ``downsample``) is left out: it adds the block input
  at the node's own position, which the main path's centre tap already reaches, so the points
  are the same but the shortcut's contribution to the weights is not counted;
- a model holding such a ResNet, e.g. a detector of :mod:`deformable.models.detection`
  (``backbone.body``) or a DeepLab of :mod:`deformable.models.segmentation` (``backbone``): the
  ResNet's main path, with the model's own module names (``backbone.body.layer4.1.conv2``). The
  model must run the ResNet on the image it is given (a detector's transform normalises and
  pads it: give it an image at the size that transform resizes to,
  :func:`deformable.analysis.fit_image`).

Anything else: pass the chain yourself (a list of module names, in forward order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deformable.nn import DeformConv2d, SpatialTransformer

__all__ = ["layer_chain", "conv_layer_names", "default_layer", "run_to_layer", "most_active_node",
           "check_input_size", "resnet_inside", "SPATIAL_TYPES", "PASS_THROUGH_TYPES"]  # fmt: skip

#: Layers that move sampling locations (and are handled by the analysis).
SPATIAL_TYPES = (nn.Conv2d, DeformConv2d, nn.MaxPool2d, nn.AvgPool2d, SpatialTransformer)


def _pass_through_types() -> tuple[type, ...]:
    from torchvision.ops import FrozenBatchNorm2d

    return (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d, FrozenBatchNorm2d,
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
            nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Dropout2d,
            nn.Identity)  # fmt: skip


#: Layers that keep every position where it is (normalisation, activations, dropout, identity).
PASS_THROUGH_TYPES = _pass_through_types()

Chain = list[tuple[str, nn.Module]]


def _flatten(prefix: str, module: nn.Module) -> Chain:
    if isinstance(module, nn.Sequential):
        out: Chain = []
        for name, child in module.named_children():
            out += _flatten(f"{prefix}.{name}" if prefix else name, child)
        return out
    return [(prefix, module)]


def _is_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, n) for n in ("conv1", "bn1", "maxpool", "layer1", "layer4"))


def resnet_inside(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of the first torchvision-style ResNet among ``model``'s submodules (a
    detector's ``backbone.body``, a DeepLab's ``backbone``), or None."""
    for name, module in model.named_modules():
        if name and _is_resnet(module):
            return name, module
    return None


def layer_chain(model: nn.Module, chain: Sequence[str] | None = None) -> Chain:
    """The ``(name, module)`` pairs a node's signal passes through, in forward order.

    Args:
        model (nn.Module): an ``nn.Sequential``, a model with a ``features`` ``nn.Sequential``
            (and optionally an ``stn`` :class:`~deformable.nn.SpatialTransformer` in front),
            or a torchvision-style ResNet (main path of each block; see the module docstring).
        chain (Sequence[str], optional): module names (as in ``model.named_modules()``), in
            forward order, to use instead of resolving them; for any other architecture.

    Returns:
        List[Tuple[str, nn.Module]]: the chain, input side first.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Sequential(nn.MaxPool2d(2)))
        >>> [name for name, _ in layer_chain(net)]
        ['0', '1', '2.0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_chain: model must be an nn.Module, got {type(model).__name__}")
    if chain is not None:
        if isinstance(chain, str) or not isinstance(chain, Sequence) or not chain:
            raise TypeError(f"layer_chain: chain must be a non-empty list of module names, got "
                            f"{chain!r}")  # fmt: skip
        modules = dict(model.named_modules())
        unknown = [n for n in chain if n not in modules]
        if unknown:
            raise ValueError(f"layer_chain: chain names {unknown} are not modules of the model; "
                             f"its modules are {_short([n for n in modules if n])}")  # fmt: skip
        return [(n, modules[n]) for n in chain]
    if isinstance(model, nn.Sequential):
        return _flatten("", model)
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        stn = getattr(model, "stn", None)
        head = [("stn", stn)] if isinstance(stn, SpatialTransformer) else []
        return head + _flatten("features", features)
    if _is_resnet(model):
        out: Chain = [(n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for index, block in enumerate(getattr(model, stage)):
                for part in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
                    module = getattr(block, part, None)
                    if module is not None:
                        out.append((f"{stage}.{index}.{part}", module))
        return out
    inside = resnet_inside(model)
    if inside is not None:
        prefix, body = inside
        return [(f"{prefix}.{name}", module) for name, module in layer_chain(body)]
    raise TypeError(
        f"layer_chain: cannot resolve the layer chain of a {type(model).__name__} (supported: "
        "nn.Sequential, a model with a `features` nn.Sequential, a torchvision-style ResNet or "
        "a model holding one); pass chain=[module names in forward order]"
    )


def _short(names: list[str], limit: int = 30) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def conv_layer_names(chain: Chain) -> list[str]:
    """Names of the convolutions (``nn.Conv2d`` and ``DeformConv2d``) of ``chain``."""
    return [name for name, m in chain if isinstance(m, (nn.Conv2d, DeformConv2d))]


def default_layer(chain: Chain) -> str:
    """The last convolution of ``chain`` (regular or deformable)."""
    names = conv_layer_names(chain)
    if not names:
        raise ValueError("the layer chain has no convolution; pass layer= explicitly")
    return names[-1]


def resolve_layer(chain: Chain, layer: str | None) -> int:
    """Index in ``chain`` of ``layer`` (default: the last convolution), or a ValueError listing
    the valid names."""
    if layer is None:
        layer = default_layer(chain)
    names = [n for n, _ in chain]
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name (str), got {type(layer).__name__}")
    if layer not in names:
        raise ValueError(f"layer {layer!r} is not in the model's layer chain; valid names: "
                         f"{_short(names, 60)}")  # fmt: skip
    return names.index(layer)


def check_image(image: Tensor, where: str) -> Tensor:
    """``image`` as a ``[1, C, H, W]`` floating-point batch (from ``[C, H, W]`` or ``[1, C, H, W]``)."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{where}: image must be a Tensor, got {type(image).__name__}")
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"{where}: image must be [C, H, W] or [1, C, H, W], got "
                         f"{list(image.shape)}")  # fmt: skip
    if not image.is_floating_point():
        raise TypeError(f"{where}: image must be floating point, got {image.dtype}")
    return image


def check_input_size(model: nn.Module, image: Tensor, where: str) -> None:
    """A ValueError if ``model`` resizes its input (a torchvision detector's transform) and
    ``image`` is not at the size it resizes to: the analysis would then describe another image
    than the one it is given."""
    transform = getattr(model, "transform", None)
    resize = getattr(transform, "resize", None)
    if resize is None or not hasattr(transform, "min_size"):
        return
    training = transform.training
    transform.eval()
    try:
        fitted, _ = resize(image[0].detach(), None)
    finally:
        transform.train(training)
    if fitted.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"{where}: the detector resizes a {image.shape[-2]}x{image.shape[-1]} image to "
            f"{fitted.shape[-2]}x{fitted.shape[-1]}; pass the image at that size "
            "(deformable.analysis.fit_image(detector, image)), so that every coordinate is a "
            "pixel of the image given"
        )


class _Stop(Exception):
    """Raised by the node layer's hook to end the forward pass there."""


class _EvalMode:
    """Put a model in eval mode and restore every module's training flag afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for module, flag in self.flags:
            module.training = flag
        return False


def run_to_layer(model: nn.Module, images: Tensor, layer_module: nn.Module,
                 record: Sequence[nn.Module] = ()) -> tuple[Tensor, dict]:  # fmt: skip
    """Run ``model(images)`` in eval mode until ``layer_module`` has produced its output.

    Returns the output of ``layer_module`` (with its autograd graph, if any) and, for every
    module of ``record``, ``(input, output_shape)`` of its call. The forward pass stops right
    after ``layer_module`` (the head of the network never runs); the model's training flags are
    restored afterwards.
    """
    seen: dict[nn.Module, tuple[Tensor, torch.Size]] = {}
    result: dict[str, Tensor] = {}

    def recorder(module, args, output):
        seen[module] = (args[0].detach(), output.shape)

    def stopper(module, args, output):
        result["output"] = output
        raise _Stop

    hooks = [m.register_forward_hook(recorder) for m in set(record)]
    hooks.append(layer_module.register_forward_hook(stopper))
    try:
        with _EvalMode(model):
            try:
                # on the model's device (a detector moved to a GPU, say); gradients reach `images`
                first = next(model.parameters(), None)
                model(images if first is None else images.to(first.device))
            except _Stop:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    if "output" not in result:
        raise ValueError(f"the layer {type(layer_module).__name__} never ran in model's forward "
                         "pass; is it part of the model's computation?")  # fmt: skip
    output = result["output"]
    if not isinstance(output, Tensor) or output.dim() != 4:
        raise ValueError(f"the layer's output must be a [N, C, H, W] tensor, got "
                         f"{getattr(output, 'shape', type(output).__name__)}")  # fmt: skip
    return output, seen


def check_node(node, output_shape, where: str) -> tuple[int, int]:
    """``node`` as an ``(y, x)`` pair of ints inside the ``[.., H, W]`` output, or a ValueError."""
    height, width = output_shape[-2:]
    if (not isinstance(node, (tuple, list)) or len(node) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in node)):  # fmt: skip
        raise TypeError(f"{where}: node must be a (y, x) pair of ints, got {node!r}")
    y, x = node
    if not (0 <= y < height and 0 <= x < width):
        raise ValueError(f"{where}: node {tuple(node)} is outside the layer's {height}x{width} "
                         "output map (node is (y, x) in output-map pixels)")  # fmt: skip
    return int(y), int(x)


def most_active_node(output: Tensor) -> tuple[int, int]:
    """``(y, x)`` of the position with the largest L2 norm over channels of ``output[0]``."""
    norm = output[0].detach().norm(dim=0)
    y, x = divmod(int(norm.argmax()), norm.shape[-1])
    return y, x


def strongest_node(model: nn.Module, image: Tensor, layer: str) -> tuple[int, int]:
    """The :func:`most_active_node` of ``layer`` for ``image`` (``[C, H, W]``)."""
    with torch.no_grad():
        output, _ = run_to_layer(model, image[None], dict(layer_chain(model))[layer])
    return most_active_node(output)
