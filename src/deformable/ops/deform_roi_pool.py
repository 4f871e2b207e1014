"""Deformable RoI pooling v1 / v2 (modulated) and deformable position-sensitive RoI pooling.

The public functions and their torch.library ops (``deformable::deform_roi_pool``,
``deformable::deform_ps_roi_pool`` and their backward ops).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from deformable.ops import _deform_roi_pool_cpu, kernels, reference_roi
from deformable.ops._checks import autocast_dtype, cast_floating, check_same, pair, reference_grads, upcast

__all__ = ["deform_roi_pool", "deform_ps_roi_pool"]

BoxesType = Union[Tensor, Sequence[Tensor]]


def deform_roi_pool(
    input: Tensor,
    boxes: BoxesType,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    offset: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    gamma: float = 0.1,
) -> Tensor:
    r"""Deformable RoI pooling (DCNv1), or modulated deformable RoI pooling (DCNv2) with ``mask``.

    RoIAlign-style: each bin of each RoI is the average of ``grid_h x grid_w`` bilinear samples,
    and bin ``(i, j)`` of RoI ``k`` is moved by a normalised offset and scaled by a mask:

    .. math::
        y_k(i, j) = m_{kij} \cdot \frac{1}{|G|} \sum_{p \in G} x\big(p_{kij} + p
            + \gamma \, \Delta_{kij} \odot (w_k, h_k)\big)

    With neither ``offset`` nor ``mask`` it is :func:`torchvision.ops.roi_align` called with the
    same arguments, exactly: same box arithmetic, sampling grid and bilinear interpolation.

    Convention:
        - ``boxes`` are ``(x1, y1, x2, y2)`` in input-image pixels; ``spatial_scale`` maps them to
          the feature map. ``aligned=True`` shifts them by -0.5 pixel (pixel ``(y, x)`` is the
          centre of ``input[..., y, x]``); ``aligned=False`` (torchvision's legacy default) does
          not, and makes every RoI at least 1x1. mmcv's ``DeformRoIPool`` is ``aligned=True``.
        - ``offset`` is ``[K, 2, oh, ow]``: channel 0 the horizontal shift, channel 1 the
          vertical one, normalised by the RoI size: bin ``(i, j)`` moves by
          ``gamma * offset[k, 0, i, j] * roi_width`` pixels right and
          ``gamma * offset[k, 1, i, j] * roi_height`` down (mmcv's layout; ``roi_width`` and
          ``roi_height`` are the feature-map sizes after the 1x1 minimum of ``aligned=False``).
        - ``mask`` is ``[K, 1, oh, ow]`` and multiplies bin ``(i, j)`` (DCNv2 feeds it a sigmoid).
        - Samples per bin: ``sampling_ratio`` per axis, or ``ceil(roi_size / bins)`` when it is
          ``<= 0`` (none for an empty RoI with ``aligned=True``: the bin is 0, as torchvision's).
        - Bilinear sampling is RoIAlign's: a sample outside ``[-1, H] x [-1, W]`` is zero; inside
          that band, coordinates are clamped to ``[0, H - 1] x [0, W - 1]`` (border pixels
          repeat, and a clamped coordinate has no gradient).

    Args:
        input (Tensor[batch_size, channels, height, width]): feature map.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): RoIs as ``(batch_index, x1, y1, x2, y2)``
            rows, or one ``(x1, y1, x2, y2)`` tensor per image of the batch.
        output_size (int or Tuple[int, int]): bins per RoI, ``(oh, ow)``.
        spatial_scale (float): feature-map pixels per box unit (e.g. 1/16). Default: 1.0.
        sampling_ratio (int): samples per bin and axis; ``<= 0`` for adaptive. Default: -1.
        aligned (bool): shift boxes by half a pixel (see above). Default: False.
        offset (Tensor[K, 2, oh, ow], optional): normalised bin offsets. Default: None.
        mask (Tensor[K, 1, oh, ow], optional): bin modulation (DCNv2). Default: None.
        gamma (float): offset scale (0.1 in the papers). Default: 0.1.

    Returns:
        Tensor[K, channels, oh, ow]: the pooled features.

    ``input``, ``offset`` and ``mask`` get gradients; ``boxes`` do not. On the CPU a
    multithreaded deterministic kernel runs (float32 and float64 natively, float16 / bfloat16 in
    float32). On CUDA Triton kernels run: float32, float16 and bfloat16 natively with float32
    sums, float64 through the reference; the input gradient adds with float atomics unless
    :func:`torch.use_deterministic_algorithms` is on. On any other device the reference
    (:mod:`deformable.ops.reference_roi`). Kernel selection: :mod:`deformable.ops.kernels`.
    Under ``torch.autocast`` it computes in float32 and returns the input's dtype.

    Example:
        >>> import torch, torchvision
        >>> x = torch.rand(2, 8, 32, 32)
        >>> boxes = torch.tensor([[0, 1.0, 2.0, 20.0, 25.0], [1, 4.0, 4.0, 12.0, 30.0]])
        >>> plain = deform_roi_pool(x, boxes, 7, sampling_ratio=2)
        >>> torch.allclose(plain, torchvision.ops.roi_align(x, boxes, 7, sampling_ratio=2))
        True
        >>> offset = torch.randn(2, 2, 7, 7)
        >>> mask = torch.rand(2, 1, 7, 7)
        >>> deform_roi_pool(x, boxes, 7, sampling_ratio=2, offset=offset, mask=mask).shape
        torch.Size([2, 8, 7, 7])
    """
    op = "deform_roi_pool"
    output_size, spatial_scale, sampling_ratio, gamma = _check_scalars(
        op, output_size, spatial_scale, sampling_ratio, gamma)  # fmt: skip
    if not isinstance(aligned, bool):
        raise TypeError(f"{op}: aligned must be a bool, got {aligned!r}")
    dtype = autocast_dtype(input, offset, mask)
    if dtype is not None:  # under autocast: float32, as torchvision's roi_align; back after
        dtype, (input, offset, mask) = input.dtype, cast_floating(torch.float32, input, offset, mask)
    _check_tensors(op, input, offset=offset, mask=mask)
    rois = _as_rois(op, boxes, input)
    count = rois.shape[0]
    oh, ow = output_size
    for name, t, channels in (("offset", offset, 2), ("mask", mask, 1)):
        if t is not None and tuple(t.shape) != (count, channels, oh, ow):
            raise ValueError(
                f"{op}: {name} must be [K, {channels}, oh, ow] = {[count, channels, oh, ow]} for "
                f"{count} boxes and output_size {tuple(output_size)}, got {list(t.shape)}"
            )
    out = torch.ops.deformable.deform_roi_pool(input, rois, list(output_size), spatial_scale,
                                               sampling_ratio, aligned, offset, mask, gamma)  # fmt: skip
    return out if dtype is None else out.to(dtype)


def deform_ps_roi_pool(
    input: Tensor,
    boxes: BoxesType,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    *,
    offset: Optional[Tensor] = None,
    gamma: float = 0.1,
) -> Tensor:
    r"""Deformable position-sensitive RoI pooling (deformable R-FCN).

    Like :func:`deform_roi_pool`, but bin ``(i, j)`` of output channel ``c`` averages its
    samples from input channel ``(c * oh + i) * ow + j`` only, so the input has
    ``out_channels * oh * ow`` channels. Without ``offset`` it is
    :func:`torchvision.ops.ps_roi_align` with the same arguments, except for empty boxes:
    adaptive sampling takes at least one sample per axis, so a zero-width box gives the values
    along its edge where torchvision divides by zero (NaN).

    Convention:
        - Boxes are always half-pixel aligned (``aligned=True`` of :func:`deform_roi_pool`; no
          1x1 minimum), as in ``ps_roi_align``; bilinear sampling and the offset normalisation
          are those of :func:`deform_roi_pool`.
        - ``offset`` is ``[K, 2 * offset_groups, oh, ow]``: offset group ``g`` moves output
          channels ``[g * C / offset_groups, (g + 1) * C / offset_groups)``, channel ``2 * g``
          horizontally and ``2 * g + 1`` vertically (``gamma * offset * roi_width`` /
          ``roi_height`` pixels). Class-agnostic offsets: ``offset_groups = 1`` (``[K, 2, oh,
          ow]``); class-aware offsets as in deformable R-FCN: ``offset_groups = C`` (``[K, 2 * C,
          oh, ow]``, the layout of the original ``DeformablePSROIPooling``'s ``trans``).

    Args:
        input (Tensor[batch_size, out_channels * oh * ow, height, width]): position-sensitive
            score maps.
        boxes (Tensor[K, 5] or List[Tensor[L, 4]]): as :func:`deform_roi_pool`.
        output_size (int or Tuple[int, int]): bins per RoI, ``(oh, ow)``.
        spatial_scale (float): feature-map pixels per box unit. Default: 1.0.
        sampling_ratio (int): samples per bin and axis; ``<= 0`` for adaptive. Default: -1.
        offset (Tensor[K, 2 * offset_groups, oh, ow], optional): normalised bin offsets.
        gamma (float): offset scale. Default: 0.1.

    Returns:
        Tensor[K, out_channels, oh, ow]

    ``input`` and ``offset`` get gradients. Devices, dtypes and determinism as
    :func:`deform_roi_pool`.

    Example:
        >>> import torch, torchvision
        >>> x = torch.rand(1, 3 * 2 * 2, 16, 16)
        >>> boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0]])]
        >>> out = deform_ps_roi_pool(x, boxes, 2, sampling_ratio=2)
        >>> torch.allclose(out, torchvision.ops.ps_roi_align(x, boxes, 2, sampling_ratio=2))
        True
        >>> deform_ps_roi_pool(x, boxes, 2, offset=torch.randn(1, 2 * 3, 2, 2)).shape
        torch.Size([1, 3, 2, 2])
    """
    op = "deform_ps_roi_pool"
    output_size, spatial_scale, sampling_ratio, gamma = _check_scalars(
        op, output_size, spatial_scale, sampling_ratio, gamma)  # fmt: skip
    dtype = autocast_dtype(input, offset)
    if dtype is not None:  # under autocast: float32, as torchvision's ps_roi_align; back after
        dtype, (input, offset) = input.dtype, cast_floating(torch.float32, input, offset)
    _check_tensors(op, input, offset=offset)
    oh, ow = output_size
    channels = input.shape[1]
    if channels == 0 or channels % (oh * ow) != 0:
        raise ValueError(
            f"{op}: input channels ({channels}) must be a positive multiple of oh * ow = "
            f"{oh * ow} for output_size {tuple(output_size)} (out_channels * oh * ow)"
        )
    out_channels = channels // (oh * ow)
    rois = _as_rois(op, boxes, input)
    if offset is not None:
        count = rois.shape[0]
        shape = tuple(offset.shape)
        if (shape[0] != count or shape[2:] != (oh, ow) or shape[1] == 0 or shape[1] % 2
                or out_channels % (shape[1] // 2)):  # fmt: skip
            raise ValueError(
                f"{op}: offset must be [K, 2 * offset_groups, oh, ow] with K = {count} boxes, "
                f"(oh, ow) = {tuple(output_size)} and offset_groups dividing out_channels "
                f"({out_channels}), e.g. {[count, 2, oh, ow]} or {[count, 2 * out_channels, oh, ow]}"
                f"; got {list(shape)}"
            )
    out = torch.ops.deformable.deform_ps_roi_pool(input, rois, list(output_size), spatial_scale,
                                                  sampling_ratio, offset, gamma)  # fmt: skip
    return out if dtype is None else out.to(dtype)


# ---------------------------------------------------------------------------------------------
# argument checks


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_scalars(op, output_size, spatial_scale, sampling_ratio, gamma):
    output_size = pair(output_size, "output_size", minimum=1)
    if not _is_real(spatial_scale) or not math.isfinite(spatial_scale) or spatial_scale <= 0:
        raise ValueError(f"{op}: spatial_scale must be a positive number, got {spatial_scale!r}")
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
        raise TypeError(f"{op}: sampling_ratio must be an int, got {sampling_ratio!r}")
    if not _is_real(gamma) or not math.isfinite(gamma):
        raise TypeError(f"{op}: gamma must be a finite number, got {gamma!r}")
    return output_size, float(spatial_scale), sampling_ratio, float(gamma)


def _check_tensors(op, input, **optional):
    named = {"input": input, **optional}
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    check_same(named, op)
    for name, t in named.items():
        if t is not None and t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be 4-D, got shape {tuple(t.shape)}"
                + (" (input is [batch, channels, height, width])" if name == "input" else "")
            )


def _as_rois(op: str, boxes, input: Tensor) -> Tensor:
    """``boxes`` as a detached ``[K, 5]`` tensor in the dtype the op computes in."""
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    form = "boxes must be Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list of Tensor[L, 4]"
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"{op}: {form}, got a tensor of shape {list(boxes.shape)}")
        parts = [boxes]
    elif isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor):
                raise TypeError(f"{op}: {form}; boxes[{i}] is a {type(b).__name__}")
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"{op}: {form}; boxes[{i}] has shape {list(b.shape)}")
        parts = list(boxes)
    else:
        raise TypeError(f"{op}: {form}, got {type(boxes).__name__}")
    for b in parts:
        if b.is_complex() or b.dtype == torch.bool:
            raise TypeError(f"{op}: boxes must be real numbers, got {b.dtype}")
        if b.device != input.device:
            raise ValueError(f"{op}: boxes are on {b.device} but input is on {input.device}")
    if isinstance(boxes, Tensor):
        rois = boxes.detach().to(dtype)
    elif not parts:
        rois = torch.zeros(0, 5, dtype=dtype, device=input.device)
    else:
        rois = torch.cat([torch.cat([torch.full((b.shape[0], 1), float(i), dtype=dtype,
                                                device=input.device), b.detach().to(dtype)], 1)
                          for i, b in enumerate(parts)])  # fmt: skip
    if rois.shape[0] and not torch.compiler.is_compiling():
        # values, not shapes: checked eagerly only (a compiled graph cannot branch on them; the
        # kernels pool zeros for an out-of-range index)
        if not bool(torch.isfinite(rois).all()):
            bad = rois[~torch.isfinite(rois).all(1)][0].tolist()
            raise ValueError(f"{op}: boxes must be finite, got {bad}")
        index = rois[:, 0]
        if not bool((index == index.round()).all()):
            bad = index[index != index.round()][0].item()
            raise ValueError(f"{op}: the batch index boxes[:, 0] must be integral, got {bad}")
        outside = (index < 0) | (index >= input.shape[0])
        if bool(outside.any()):
            bad = index[outside][0].item()
            raise ValueError(
                f"{op}: batch index {bad:g} in boxes is out of range for an input batch of "
                f"{input.shape[0]}" + ("" if isinstance(boxes, Tensor) else
                                       f" (a list of {len(parts)} box tensors)")  # fmt: skip
            )
    return rois


# ---------------------------------------------------------------------------------------------
# torch.library registration (see deform_conv.py for the pattern): one op node for
# torch.compile / torch.export, fake kernels, and a backward op of its own.


def _pack_grads(grads, originals):
    """Gradients in the dtype of their inputs; an empty tensor stands for 'not computed'."""
    return tuple(originals[0].new_empty(0) if g is None else g.to(t.dtype)
                 for g, t in zip(grads, originals))  # fmt: skip


def _kernel_set(input: Tensor) -> str:
    """The kernel set that runs on ``input``: the Triton kernels take float32, float16 and
    bfloat16; float64 on them goes to the reference."""
    kernel_set = kernels.select(input.device)
    if kernel_set == "triton" and input.dtype == torch.float64:
        return "reference"
    return kernel_set


def _computed(kernel_set: str, *tensors):
    """The tensors in the dtype the kernel set computes in, and the dtype to return: the Triton
    kernels read float16 / bfloat16 natively (float32 sums); the others get them upcast."""
    if kernel_set == "triton":
        return tensors, tensors[0].dtype
    return upcast(*tensors)


def _box_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _fast_kernels(kernel_set: str):
    """The module of fast kernels of a kernel set (numba or triton)."""
    if kernel_set == "triton":
        from deformable.ops import _triton_roi

        return _triton_roi
    return _deform_roi_pool_cpu


@torch.library.custom_op("deformable::deform_roi_pool", mutates_args=())
def _deform_roi_pool_op(
    input: Tensor,
    boxes: Tensor,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    offset: Optional[Tensor],
    mask: Optional[Tensor],
    gamma: float,
) -> Tensor:
    return _roi_forward(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset,
                        mask, gamma)  # fmt: skip


@_deform_roi_pool_op.register_kernel(("cpu", "cuda"))
def _roi_forward(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset, mask,
                 gamma):  # fmt: skip
    kernel_set = _kernel_set(input)
    (input, offset, mask), dtype = _computed(kernel_set, input, offset, mask)
    boxes = boxes.to(_box_dtype(input))
    if kernel_set == "reference":
        out = reference_roi.deform_roi_pool(input, boxes, output_size, spatial_scale,
                                            sampling_ratio, aligned, offset, mask, gamma)  # fmt: skip
    else:
        out = _fast_kernels(kernel_set).forward(input, boxes, output_size, spatial_scale,
                                                sampling_ratio, aligned, offset, mask, gamma)  # fmt: skip
    return out.to(dtype)


@_deform_roi_pool_op.register_fake
def _roi_fake(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset, mask,
              gamma):  # fmt: skip
    return input.new_empty((boxes.shape[0], input.shape[1], *output_size))


@torch.library.custom_op("deformable::deform_roi_pool_backward", mutates_args=())
def _deform_roi_pool_backward_op(
    grad_out: Tensor,
    input: Tensor,
    boxes: Tensor,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    offset: Optional[Tensor],
    mask: Optional[Tensor],
    gamma: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (input, offset, mask); an empty tensor where output_mask is False."""
    return _roi_backward_dispatch(grad_out, input, boxes, output_size, spatial_scale,
                                  sampling_ratio, aligned, offset, mask, gamma, output_mask)  # fmt: skip


@_deform_roi_pool_backward_op.register_kernel(("cpu", "cuda"))
def _roi_backward_dispatch(grad_out, input, boxes, output_size, spatial_scale, sampling_ratio,
                           aligned, offset, mask, gamma, output_mask):  # fmt: skip
    kernel_set = _kernel_set(input)
    originals = (input, offset, mask)
    (grad_out, input, offset, mask), _ = _computed(kernel_set, grad_out, input, offset, mask)
    boxes = boxes.to(_box_dtype(input))
    if kernel_set == "reference":
        def pool(input, offset, mask):
            return reference_roi.deform_roi_pool(input, boxes, output_size, spatial_scale,
                                                 sampling_ratio, aligned, offset, mask, gamma)  # fmt: skip

        grads = reference_grads(pool, grad_out, (input, offset, mask), output_mask)
    else:
        grads = _fast_kernels(kernel_set).backward(
            grad_out, input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset,
            mask, gamma, tuple(bool(m) for m in output_mask))  # fmt: skip
    return _pack_grads(grads, originals)


@_deform_roi_pool_backward_op.register_fake
def _roi_backward_fake(grad_out, input, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                       offset, mask, gamma, output_mask):  # fmt: skip
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in zip((input, offset, mask), output_mask))  # fmt: skip


def _roi_setup_context(ctx, inputs, output):
    input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset, mask, gamma = inputs
    ctx.settings = (output_size, spatial_scale, sampling_ratio, aligned)
    ctx.gamma = gamma
    ctx.save_for_backward(input, boxes, offset, mask)


def _roi_backward(ctx, grad_out):
    input, boxes, offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[6], needs[7]]
    grads = torch.ops.deformable.deform_roi_pool_backward(
        grad_out, input, boxes, *ctx.settings, offset, mask, ctx.gamma, output_mask
    )
    gi, go, gm = (g if need else None for g, need in zip(grads, output_mask))
    return gi, None, None, None, None, None, go, gm, None


_deform_roi_pool_op.register_autograd(_roi_backward, setup_context=_roi_setup_context)


@torch.library.custom_op("deformable::deform_ps_roi_pool", mutates_args=())
def _deform_ps_roi_pool_op(
    input: Tensor,
    boxes: Tensor,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    offset: Optional[Tensor],
    gamma: float,
) -> Tensor:
    return _ps_forward(input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma)


@_deform_ps_roi_pool_op.register_kernel(("cpu", "cuda"))
def _ps_forward(input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma):
    kernel_set = _kernel_set(input)
    (input, offset), dtype = _computed(kernel_set, input, offset)
    boxes = boxes.to(_box_dtype(input))
    if kernel_set == "reference":
        out = reference_roi.deform_ps_roi_pool(input, boxes, output_size, spatial_scale,
                                               sampling_ratio, offset, gamma)  # fmt: skip
    else:
        out = _fast_kernels(kernel_set).ps_forward(input, boxes, output_size, spatial_scale,
                                                   sampling_ratio, offset, gamma)  # fmt: skip
    return out.to(dtype)


@_deform_ps_roi_pool_op.register_fake
def _ps_fake(input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma):
    oh, ow = output_size
    return input.new_empty((boxes.shape[0], input.shape[1] // (oh * ow), oh, ow))


@torch.library.custom_op("deformable::deform_ps_roi_pool_backward", mutates_args=())
def _deform_ps_roi_pool_backward_op(
    grad_out: Tensor,
    input: Tensor,
    boxes: Tensor,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    offset: Optional[Tensor],
    gamma: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor]:
    """Gradients (input, offset); an empty tensor where output_mask is False."""
    return _ps_backward_dispatch(grad_out, input, boxes, output_size, spatial_scale,
                                 sampling_ratio, offset, gamma, output_mask)  # fmt: skip


@_deform_ps_roi_pool_backward_op.register_kernel(("cpu", "cuda"))
def _ps_backward_dispatch(grad_out, input, boxes, output_size, spatial_scale, sampling_ratio,
                          offset, gamma, output_mask):  # fmt: skip
    kernel_set = _kernel_set(input)
    originals = (input, offset)
    (grad_out, input, offset), _ = _computed(kernel_set, grad_out, input, offset)
    boxes = boxes.to(_box_dtype(input))
    if kernel_set == "reference":
        def pool(input, offset):
            return reference_roi.deform_ps_roi_pool(input, boxes, output_size, spatial_scale,
                                                    sampling_ratio, offset, gamma)  # fmt: skip

        grads = reference_grads(pool, grad_out, (input, offset), output_mask)
    else:
        grads = _fast_kernels(kernel_set).ps_backward(
            grad_out, input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma,
            tuple(bool(m) for m in output_mask))  # fmt: skip
    return _pack_grads(grads, originals)


@_deform_ps_roi_pool_backward_op.register_fake
def _ps_backward_fake(grad_out, input, boxes, output_size, spatial_scale, sampling_ratio, offset,
                      gamma, output_mask):  # fmt: skip
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in zip((input, offset), output_mask))  # fmt: skip


def _ps_setup_context(ctx, inputs, output):
    input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma = inputs
    ctx.settings = (output_size, spatial_scale, sampling_ratio)
    ctx.gamma = gamma
    ctx.save_for_backward(input, boxes, offset)


def _ps_backward(ctx, grad_out):
    input, boxes, offset = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[5]]
    grads = torch.ops.deformable.deform_ps_roi_pool_backward(
        grad_out, input, boxes, *ctx.settings, offset, ctx.gamma, output_mask
    )
    gi, go = (g if need else None for g, need in zip(grads, output_mask))
    return gi, None, None, None, None, go, None


_deform_ps_roi_pool_op.register_autograd(_ps_backward, setup_context=_ps_setup_context)
