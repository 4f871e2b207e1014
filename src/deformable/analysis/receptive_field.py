"""Effective receptive field: how much each input pixel moves a node's response (Luo et al. 2016).

The gradient of the node's response with respect to the image, made a map by taking its
absolute value, summing over the image's channels and dividing by the maximum. For a linear
model it is the (absolute, normalised) weight pattern the node applies to the image; for a
deep network it shows which pixels the node is actually sensitive to, which is usually much
smaller than, and differently shaped from, its theoretical receptive field.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from deformable.analysis.chain import (check_image, check_input_size, check_node, layer_chain,
                                       most_active_node, resolve_layer, run_to_layer)  # fmt: skip

__all__ = ["ReceptiveField", "effective_receptive_field", "node_response"]


class ReceptiveField(NamedTuple):
    """Result of :func:`effective_receptive_field`."""

    #: Tensor[H, W]: |d response / d pixel| summed over channels, divided by its maximum
    map: Tensor
    #: (y, x) of the node in the layer's output map
    node: tuple[int, int]


def node_response(output: Tensor, node: tuple[int, int], channel: int | None) -> Tensor:
    """``output[:, :, y, x]`` (``[N, C]``), or ``[N, 1]`` of one ``channel``."""
    y, x = node
    response = output[:, :, y, x]
    if channel is not None:
        if not isinstance(channel, int) or isinstance(channel, bool) or not (
                0 <= channel < output.shape[1]):  # fmt: skip
            raise ValueError(f"channel must be an int in [0, {output.shape[1]}), got {channel!r}")
        response = response[:, channel : channel + 1]
    return response


def effective_receptive_field(model: nn.Module, image: Tensor, layer: str | None = None,
                              node: tuple[int, int] | None = None, *, channel: int | None = None,
                              chain: list[str] | None = None) -> ReceptiveField:  # fmt: skip
    """The effective receptive field of a node on ``image``: ``|d response / d image|``, normalised.

    The response of the node is the sum over the layer's output channels at the node (or one
    ``channel``); the model runs in eval mode (batch norm uses its running statistics) and stops
    at ``layer``.

    Args:
        model (nn.Module): the network; ``layer`` must be one of its modules on the path of the
            image (see :func:`~deformable.analysis.layer_chain`; any architecture works with
            ``chain``).
        image (Tensor[C, H, W] or Tensor[1, C, H, W]): the input image.
        layer (str, optional): name of the node's layer. Default: the last convolution.
        node (Tuple[int, int], optional): ``(y, x)`` in the layer's output map. Default: the
            position with the largest response (L2 norm over channels).
        channel (int, optional): use this output channel only. Default: None (sum of all).
        chain (List[str], optional): module names from the input to ``layer``, in forward order.

    Returns:
        ReceptiveField: ``map`` ``Tensor[H, W]`` in ``[0, 1]`` (all zero if the response does
        not depend on the image) and the ``node``.

    Convention:
        ``map[i, j]`` is the pixel at row ``i``, column ``j`` of the image (its centre at
        ``(y, x) = (i, j)``); ``node`` is ``(y, x)`` in the layer's output map.

    Example:
        >>> conv = nn.Conv2d(1, 1, 3, bias=False)
        >>> with torch.no_grad():
        ...     _ = conv.weight.copy_(torch.tensor([[[[1.0, -2, 0], [0, 4, 0], [0, 0, 1]]]]))
        >>> erf = effective_receptive_field(nn.Sequential(conv), torch.rand(1, 6, 6), node=(2, 1))
        >>> erf.map[2:5, 1:4].tolist()
        [[0.25, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.25]]
        >>> float(erf.map.sum())
        2.0
    """
    where = "effective_receptive_field"
    image = check_image(image, where)
    check_input_size(model, image, where)
    path = layer_chain(model, chain)
    index = resolve_layer(path, layer)
    image = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        output, _ = run_to_layer(model, image, path[index][1])
        node = most_active_node(output) if node is None else check_node(node, output.shape, where)
        response = node_response(output, node, channel).sum()
        if response.requires_grad:
            (grad,) = torch.autograd.grad(response, [image], allow_unused=True)
        else:
            grad = None
    if grad is None:
        return ReceptiveField(torch.zeros(image.shape[-2:], dtype=image.dtype), node)
    magnitude = grad[0].abs().sum(0)
    top = magnitude.max()
    return ReceptiveField(magnitude / top if top > 0 else magnitude, node)
