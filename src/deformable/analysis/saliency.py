"""Error-bounded saliency region: the smallest image region that gives a node its response.

DCNv2 (§3 and its appendix) defines a node's support as the smallest image region that, with
the rest of the image masked out, leaves the node's response within a small relative error of
its response to the full image. Following it, the region is grown progressively and the first
one within the error bound is returned; the shape of the growing regions is a choice:

- ``grow="square"``: squares centred on the node's location in the image (the centre of its
  regular receptive field), growing by ``step`` pixels on each side;
- ``grow="gradient"``: the pixels in decreasing order of the node's effective receptive field
  (:func:`~deformable.analysis.effective_receptive_field`), ``step`` pixels at a time, so the
  region follows the shape of what the node is sensitive to.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from deformable.analysis.chain import (check_image, check_input_size, check_node, layer_chain,
                                       most_active_node, resolve_layer, run_to_layer)  # fmt: skip
from deformable.analysis.receptive_field import effective_receptive_field, node_response
from deformable.analysis.sampling import node_location

__all__ = ["SaliencyRegion", "saliency_region", "GROW_MODES", "check_region_settings",
           "fill_background", "growing_masks", "grow_region"]

GROW_MODES = ("square", "gradient")


class SaliencyRegion(NamedTuple):
    """Result of :func:`saliency_region`."""

    #: Tensor[H, W] bool: the region (True: kept, False: masked)
    mask: Tensor
    #: pixels in the region
    size: int
    #: relative error of the node's response with only the region kept
    error: float
    #: (y, x) of the node in the layer's output map
    node: tuple[int, int]


def _square_masks(shape, centre, step):
    """Growing squares: pixels with ``max(|i - cy|, |j - cx|) <= h + 0.5``, ``h = 0, step, ...``
    (preceded by the empty region), until the image is covered."""
    height, width = shape
    cy, cx = centre
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    distance = torch.maximum((rows - cy).abs(), (cols - cx).abs())
    yield torch.zeros(height, width, dtype=torch.bool)
    half = 0.0
    while True:
        mask = distance <= half + 0.5 + 1e-9
        yield mask
        if bool(mask.all()):
            return
        half += step


def _gradient_masks(order: Tensor, shape, step):
    """The first ``k`` pixels of ``order`` (flat indices), ``k = 0, step, 2 step, ..., H * W``."""
    total = order.numel()
    for count in list(range(0, total, step)) + [total]:
        mask = torch.zeros(total, dtype=torch.bool)
        mask[order[:count]] = True
        yield mask.view(shape)


def saliency_region(model: nn.Module, image: Tensor, layer: str | None = None,
                    node: tuple[int, int] | None = None, *, error_bound: float = 0.1,
                    grow: str = "square", step: int | None = None, fill: float | str = 0.0,
                    channel: int | None = None, chain: list[str] | None = None,
                    batch_size: int = 32) -> SaliencyRegion:  # fmt: skip
    """The smallest region of a growing family whose masked image keeps the node's response.

    The node's response ``r`` is the layer's output vector at the node (or one ``channel``).
    Each candidate region keeps its pixels and sets the others to ``fill``; the relative error
    is ``||r(masked) - r(image)|| / ||r(image)||`` (L2 over channels). Candidates are tried from
    the smallest (the empty region first), in batches of ``batch_size`` images, and the first
    with error ``<= error_bound`` is returned; the whole image always qualifies.

    Args:
        model (nn.Module): the network (runs in eval mode, stopping at ``layer``).
        image (Tensor[C, H, W] or Tensor[1, C, H, W]): the input image.
        layer (str, optional): name of the node's layer. Default: the last convolution.
        node (Tuple[int, int], optional): ``(y, x)`` in the layer's output map. Default: the
            position with the largest response (L2 norm over channels).
        error_bound (float): the relative error allowed, in ``[0, 1)``. Default: 0.1.
        grow (str): ``"square"`` or ``"gradient"`` (see the module docstring). Default: square.
        step (int, optional): growth per candidate: pixels added on each side of the square, or
            pixels added in gradient order. Default: 1 for squares, ``ceil(H * W / 256)`` for
            the gradient order.
        fill (float or str): value of the masked pixels, or ``"mean"`` for the image's mean
            per channel. Default: 0.
        channel (int, optional): use this output channel only. Default: None (all channels).
        chain (List[str], optional): module names from the input to ``layer``, forward order.
        batch_size (int): the most masked images per forward pass (the first passes take 2, 4,
            8, ...). Default: 32.

    Returns:
        SaliencyRegion: ``mask`` ``Tensor[H, W]`` (bool), its ``size`` in pixels, its relative
        ``error`` and the ``node``.

    Convention:
        ``mask[i, j]`` is the pixel at row ``i``, column ``j`` (centre at ``(y, x) = (i, j)``);
        squares are centred on the node's image location as given by
        :func:`~deformable.analysis.node_location` (a half-integer centre gives even sides).

    Example:
        >>> conv = nn.Conv2d(1, 1, 3, bias=False)
        >>> region = saliency_region(nn.Sequential(conv), torch.rand(1, 9, 9) + 0.1,
        ...                          node=(3, 3), error_bound=1e-6)
        >>> region.size, region.mask[3:6, 3:6].all().item()
        (9, True)
    """
    where = "saliency_region"
    image = check_image(image, where)
    check_input_size(model, image, where)
    step = check_region_settings(where, image, error_bound=error_bound, grow=grow, step=step,
                                 batch_size=batch_size)  # fmt: skip
    background = fill_background(where, image, fill)
    path = layer_chain(model, chain)
    index = resolve_layer(path, layer)
    layer_module = path[index][1]
    with torch.no_grad():
        output, _ = run_to_layer(model, image, layer_module)
    node = most_active_node(output) if node is None else check_node(node, output.shape, where)
    reference = node_response(output, node, channel)[0]
    centre, _ = node_location(model, image, path[index][0], node, chain=chain)
    erf = None
    if grow == "gradient":
        erf = effective_receptive_field(model, image, path[index][0], node, channel=channel,
                                        chain=chain).map  # fmt: skip

    def respond(masked: Tensor) -> Tensor:
        out, _ = run_to_layer(model, masked, layer_module)
        return node_response(out, node, channel)

    mask, error = grow_region(image, respond, reference, background,
                              growing_masks(grow, image.shape[-2:], centre, step, erf),
                              error_bound=error_bound, batch_size=batch_size)  # fmt: skip
    return SaliencyRegion(mask, int(mask.sum()), error, node)


def check_region_settings(where: str, image: Tensor, *, error_bound, grow, step, batch_size) -> int:
    """Validate the search settings of a saliency region; returns ``step`` (its default filled in)."""
    if grow not in GROW_MODES:
        raise ValueError(f"{where}: grow must be one of {GROW_MODES}, got {grow!r}")
    if not isinstance(error_bound, (int, float)) or isinstance(error_bound, bool) or not (
            0 <= error_bound < 1):  # fmt: skip
        raise ValueError(f"{where}: error_bound must be a number in [0, 1), got {error_bound!r}")
    height, width = image.shape[-2:]
    if step is None:
        step = 1 if grow == "square" else max(1, math.ceil(height * width / 256))
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"{where}: step must be a positive int, got {step!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive int, got {batch_size!r}")
    return step


def fill_background(where: str, image: Tensor, fill) -> Tensor:
    """The image that masked-out pixels take their values from: ``fill`` everywhere, or the
    image's mean per channel (``fill="mean"``)."""
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"{where}: fill must be a number or 'mean', got {fill!r}")
        return image.mean(dim=(2, 3), keepdim=True).expand_as(image)
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        return torch.full_like(image, float(fill))
    raise TypeError(f"{where}: fill must be a number or 'mean', got {fill!r}")


def growing_masks(grow: str, shape, centre: tuple[float, float], step: int,
                  erf: Tensor | None = None):  # fmt: skip
    """The candidate regions, smallest first: squares centred on ``centre`` (y, x), or pixels in
    decreasing order of ``erf`` (``[H, W]``; ties go to the pixel nearer ``centre``)."""
    if grow == "square":
        return _square_masks(shape, centre, step)
    height, width = shape
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    distance = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2).flatten()
    # stable sort by distance, then by gradient: ties in the gradient go to the nearer pixel
    by_distance = torch.argsort(distance, stable=True)
    order = by_distance[torch.argsort(-erf.flatten()[by_distance].double(), stable=True)]
    return _gradient_masks(order, (height, width), step)


def grow_region(image: Tensor, respond, reference: Tensor, background: Tensor, candidates, *,
                error_bound: float, batch_size: int) -> tuple[Tensor, float]:  # fmt: skip
    """The first of ``candidates`` (bool masks ``[H, W]``) whose masked image gives a response
    within ``error_bound`` (relative, L2) of ``reference``; ``respond(images [B, C, H, W])``
    returns the responses ``[B, D]`` (at most ``batch_size`` images a call). Returns
    ``(mask, error)``."""
    scale = reference.norm().clamp_min(1e-12)
    last = None
    size = 1
    while True:
        # batches grow 2, 4, 8, ... up to batch_size: a small region costs a few passes, a large
        # one at most about twice the passes it needs
        size = min(2 * size, batch_size)
        batch = [m for _, m in zip(range(size), candidates)]
        if not batch:
            break
        masks = torch.stack(batch)[:, None].to(image.device)  # [B, 1, H, W]
        masked = torch.where(masks, image, background)
        with torch.no_grad():
            responses = respond(masked)
        errors = (responses - reference).norm(dim=1) / scale
        for mask, error in zip(batch, errors.tolist()):
            last = (mask, float(error))
            if error <= error_bound:
                return last
    # only reachable through rounding: the full image is the last candidate
    return last
