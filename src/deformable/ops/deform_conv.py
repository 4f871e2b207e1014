"""Deformable convolution v1 / v2 (modulated): the public function and its torch.library op."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from deformable.ops import _deform_conv_cpu, kernels, reference
from deformable.ops._checks import (autocast_dtype, cast_floating, check_same, direct_call, pair,
                                    reference_grads, upcast)

__all__ = ["deform_conv2d"]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Deformable convolution (DCNv1), or modulated deformable convolution (DCNv2) with ``mask``.

    Argument for argument the semantics of :func:`torchvision.ops.deform_conv2d`:

    .. math::
        y(p) = \sum_k w_k \cdot m_k(p) \cdot x(p + p_k + \Delta p_k(p))

    where :math:`p_k` runs over the kernel taps and :math:`x(\cdot)` is bilinear interpolation.

    Convention:
        - ``offset`` is ``[N, 2 * offset_groups * kh * kw, out_h, out_w]``. For offset group ``g``
          and tap ``k = i * kw + j`` (taps row-major), channel ``2 * (g * kh * kw + k)`` is the
          vertical shift ``dy`` and the next channel the horizontal shift ``dx``, in input pixels
          (torchvision's and mmcv's layout). Offset group ``g`` moves input channels
          ``[g * C / offset_groups, (g + 1) * C / offset_groups)``.
        - ``mask`` is ``[N, offset_groups * kh * kw, out_h, out_w]``, channel ``g * kh * kw + k``;
          it multiplies each sample (DCNv2 feeds it a sigmoid, values in [0, 1]).
        - The regular grid is the one of ``F.conv2d``: tap ``(i, j)`` of output ``(ho, wo)``
          samples at ``(ho * stride_h - pad_h + i * dilation_h, wo * stride_w - pad_w +
          j * dilation_w)`` plus its offset; pixel ``(y, x)`` is the centre of ``input[..., y, x]``.
        - Bilinear sampling ``G(q, p) = g(qx, px) g(qy, py)``, ``g(a, b) = max(0, 1 - |a - b|)``:
          a sample outside ``(-1, H) x (-1, W)`` is zero, and corners outside the image count as
          zero (zero padding, as in ``F.conv2d``).
        - On the band's edges the value is zero and the offset gradient is one-sided, as in
          torchvision: at coordinate ``-1`` it is the derivative from inside the band (the
          corner at 0 times the weight), at ``H`` (``W``) it is 0 (the sample counts as
          outside). Every zero-offset tap that falls in a padding of 1 lies on such an edge, so
          a fresh layer's offset branch gets gradient there. mmcv's kernels give 0 at ``-1`` too,
          so offset-branch gradients differ from mmcv's at those taps (values do not).
        - With zero offsets (and a mask of ones) the result is ``F.conv2d(input, weight, bias,
          stride, padding, dilation, groups=C // weight.shape[1])``.

    Args:
        input (Tensor[batch_size, in_channels, in_height, in_width]): input tensor.
        offset (Tensor[batch_size, 2 * offset_groups * kernel_height * kernel_width, out_height,
            out_width]): sampling offsets; ``offset_groups`` is read from its channel count.
        weight (Tensor[out_channels, in_channels // groups, kernel_height, kernel_width]):
            convolution weights; the weight ``groups`` are read from ``weight.shape[1]``.
        bias (Tensor[out_channels], optional): bias added to the output. Default: None.
        stride (int or Tuple[int, int]): distance between output positions. Default: 1.
        padding (int or Tuple[int, int]): implicit zero padding on both sides. Default: 0.
        dilation (int or Tuple[int, int]): spacing between kernel taps. Default: 1.
        mask (Tensor[batch_size, offset_groups * kernel_height * kernel_width, out_height,
            out_width], optional): modulation of every sample (DCNv2). Default: None (DCNv1).

    Returns:
        Tensor[batch_size, out_channels, out_height, out_width]: the result of the convolution.

    Under ``torch.autocast`` every tensor is cast to the autocast dtype first (as ``F.conv2d``
    is). Every input (input, offset, weight, bias, mask) gets a gradient (first order: the backward is
    not itself differentiable, and asking for a second derivative raises). On the CPU a
    multithreaded kernel runs (deterministic, memory bounded per tile), float32 and float64
    natively, float16 and bfloat16 in float32 and returned in the input dtype. On CUDA Triton
    kernels run (an implicit GEMM, no column buffer): float32 exactly (TF32 when
    ``torch.backends.cuda.matmul.allow_tf32`` is on), float16 and bfloat16 natively with float32
    accumulation, float64 through the reference; the input gradient adds with float atomics,
    unless :func:`torch.use_deterministic_algorithms` is on, then a deterministic path runs. On any
    other device the pure-PyTorch reference (:func:`deformable.ops.reference.deform_conv2d`).
    Kernel selection (and forcing one set): :mod:`deformable.ops.kernels`.

    Example:
        >>> import torch
        >>> x = torch.rand(2, 4, 10, 10)
        >>> weight = torch.rand(5, 4, 3, 3)
        >>> offset = torch.zeros(2, 2 * 3 * 3, 8, 8)  # one offset group
        >>> out = deform_conv2d(x, offset, weight)
        >>> out.shape
        torch.Size([2, 5, 8, 8])
        >>> torch.allclose(out, torch.nn.functional.conv2d(x, weight), atol=1e-5)
        True
    """
    key = _call_key(input, offset, weight, bias, mask, stride, padding, dilation)
    known = _checked.get(key) if key is not None else None
    if known is not None:  # checked before, and not under torch.compile
        arguments, native = known
        if direct_call(input, offset, weight, bias, mask, eager=True):
            return _direct(input, offset, weight, bias, *arguments, mask, native)
        return torch.ops.deformable.deform_conv2d(input, offset, weight, bias, *arguments, mask)
    stride = pair(stride, "stride", minimum=1)
    padding = pair(padding, "padding", minimum=0)
    dilation = pair(dilation, "dilation", minimum=1)
    dtype = autocast_dtype(input, offset, weight, bias, mask)
    if dtype is not None:  # under autocast a convolution runs in the autocast dtype, as F.conv2d
        input, offset, weight, bias, mask = cast_floating(dtype, input, offset, weight, bias, mask)
    _check_arguments(input, offset, weight, bias, stride, padding, dilation, mask)
    arguments = (list(stride), list(padding), list(dilation))
    # CPU tensors the numba kernels take as they are (no upcast, no cast back)
    native = input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64)
    if key is not None:
        if len(_checked) >= 256:
            _checked.clear()
        _checked[key] = (arguments, native)
    if direct_call(input, offset, weight, bias, mask):
        return _direct(input, offset, weight, bias, *arguments, mask, native)
    return torch.ops.deformable.deform_conv2d(input, offset, weight, bias, *arguments, mask)


def _direct(input, offset, weight, bias, stride, padding, dilation, mask, native: bool):
    """The op's own kernel, minus its dispatch (``direct_call``); for ``native`` tensors (CPU,
    float32 or float64) the numba forward itself where it is the one :func:`kernels.select` would
    pick, without the selection's Python."""
    if native and kernels.requested() in kernels.NUMBA_ON_CPU:
        return _deform_conv_cpu.forward(input, offset, weight, bias, stride, padding, dilation,
                                        mask)  # fmt: skip
    return _forward(input, offset, weight, bias, stride, padding, dilation, mask)


#: ((stride, padding, dilation) as the kernels take them, whether they are CPU tensors of a dtype
#: the numba kernels run natively) by the key (``_call_key``) of a call whose arguments passed
#: the checks: the same call again skips them (with the Python around them 20-40 us of a 1 ms
#: call), bounded.
_checked: dict = {}


def _call_key(input, offset, weight, bias, mask, stride, padding, dilation):
    """What the checks of a call depend on: the types, shapes, dtypes and devices of its tensors
    and the exact stride, padding and dilation (ints or pairs of ints; True is not 1 here). None
    where it cannot be kept: under torch.compile, under autocast (the tensors are cast first),
    symbolic shapes, other argument types."""
    if torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled():
        return None
    if not (_int_or_pair(stride) and _int_or_pair(padding) and _int_or_pair(dilation)):
        return None
    try:
        key = (stride, padding, dilation, type(input), input.shape, input.dtype, input.device,
               type(offset), offset.shape, offset.dtype, offset.device, type(weight),
               weight.shape, weight.dtype, weight.device,
               None if bias is None else (type(bias), bias.shape, bias.dtype, bias.device),
               None if mask is None else (type(mask), mask.shape, mask.dtype, mask.device))
        hash(key)
    except (AttributeError, TypeError):  # not tensors, or symbolic sizes: the checks will say
        return None
    return key


def _int_or_pair(value) -> bool:
    kind = type(value)
    return kind is int or (kind is tuple and len(value) == 2 and type(value[0]) is int
                           and type(value[1]) is int)  # fmt: skip


def output_size(in_size, kernel, stride, padding, dilation) -> int:
    """Output length of a convolution along one axis (as ``F.conv2d``)."""
    return (in_size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_arguments(input, offset, weight, bias, stride, padding, dilation, mask) -> None:
    named = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name, t in named.items():
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"deform_conv2d: {name} must be a Tensor, got {type(t).__name__}")
    check_same(named, "deform_conv2d")
    for name, t, dims in (("input", input, 4), ("offset", offset, 4), ("weight", weight, 4),
                          ("bias", bias, 1), ("mask", mask, 4)):  # fmt: skip
        if t is not None and t.dim() != dims:
            raise ValueError(
                f"deform_conv2d: {name} must be {dims}-D, got shape {tuple(t.shape)}"
                + (" (input is [batch, channels, height, width])" if name == "input" else "")
            )
    batch, channels, height, width = input.shape
    out_channels, weight_channels, kh, kw = weight.shape
    if weight_channels == 0 or channels % weight_channels != 0:
        raise ValueError(
            f"deform_conv2d: input channels ({channels}) must be a multiple of weight.shape[1] "
            f"({weight_channels}); weight is [out_channels, in_channels // groups, kh, kw]"
        )
    groups = channels // weight_channels
    if out_channels % groups != 0:
        raise ValueError(
            f"deform_conv2d: out_channels ({out_channels}) must be divisible by the weight "
            f"groups ({groups} = in_channels {channels} / weight.shape[1] {weight_channels})"
        )
    if kh < 1 or kw < 1:
        raise ValueError(f"deform_conv2d: weight has an empty kernel {kh}x{kw}")
    out_h = output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = output_size(width, kw, stride[1], padding[1], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"deform_conv2d: the kernel {kh}x{kw} (dilation {dilation}) is larger than the padded "
            f"input {height + 2 * padding[0]}x{width + 2 * padding[1]}"
        )
    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise ValueError(
            f"deform_conv2d: offset must have 2 * offset_groups * kh * kw channels, a positive "
            f"multiple of {2 * taps} for a {kh}x{kw} kernel, got {offset.shape[1]}"
        )
    offset_groups = offset.shape[1] // (2 * taps)
    if channels % offset_groups != 0:
        raise ValueError(
            f"deform_conv2d: input channels ({channels}) must be divisible by offset_groups "
            f"({offset_groups} = offset.shape[1] {offset.shape[1]} / (2 * {kh} * {kw}))"
        )
    expected = (batch, offset.shape[1], out_h, out_w)
    if tuple(offset.shape) != expected:
        raise ValueError(
            f"deform_conv2d: offset must be [batch, 2 * offset_groups * kh * kw, out_h, out_w] = "
            f"{list(expected)} for this input, kernel, stride, padding and dilation, "
            f"got {list(offset.shape)}"
        )
    if mask is not None:
        expected = (batch, offset_groups * taps, out_h, out_w)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"deform_conv2d: mask must be [batch, offset_groups * kh * kw, out_h, out_w] = "
                f"{list(expected)}, got {list(mask.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"deform_conv2d: bias must be [out_channels] = [{out_channels}], "
            f"got {list(bias.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# torch.library registration: one op node for torch.compile / torch.export, its fake kernel and
# its autograd formula (the backward is an op of its own, so compiled graphs keep it opaque too).


@torch.library.custom_op("deformable::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    mask: Optional[Tensor],
) -> Tensor:
    return _forward(input, offset, weight, bias, stride, padding, dilation, mask)


@_deform_conv2d_op.register_kernel(("cpu", "cuda"))
def _forward(input, offset, weight, bias, stride, padding, dilation, mask):
    """The kernel set :func:`deformable.ops.kernels.select` picks for the device (the op's
    body runs it on any other device too)."""
    return _FORWARD[kernels.select(input.device)](input, offset, weight, bias, stride, padding,
                                                  dilation, mask)  # fmt: skip


def _forward_reference(input, offset, weight, bias, stride, padding, dilation, mask):
    (input, offset, weight, bias, mask), dtype = upcast(input, offset, weight, bias, mask)
    out = reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    return out.to(dtype)


def _forward_numba(input, offset, weight, bias, stride, padding, dilation, mask):
    (input, offset, weight, bias, mask), dtype = upcast(input, offset, weight, bias, mask)
    out = _deform_conv_cpu.forward(input, offset, weight, bias, stride, padding, dilation, mask)
    return out if out.dtype == dtype else out.to(dtype)


def _forward_triton(input, offset, weight, bias, stride, padding, dilation, mask):
    if input.dtype == torch.float64:  # no float64 tl.dot worth having: the reference
        return _forward_reference(input, offset, weight, bias, stride, padding, dilation, mask)
    from deformable.ops import _triton_conv

    # float16 / bfloat16 natively (float32 coordinates and accumulation)
    return _triton_conv.forward(input, offset, weight, bias, stride, padding, dilation, mask)


_FORWARD = {"numba": _forward_numba, "triton": _forward_triton, "reference": _forward_reference}


@_deform_conv2d_op.register_fake
def _deform_conv2d_fake(input, offset, weight, bias, stride, padding, dilation, mask):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


@torch.library.custom_op("deformable::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    mask: Optional[Tensor],
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (input, offset, weight, bias, mask); an empty tensor where output_mask is False."""
    return _backward_dispatch(grad_out, input, offset, weight, bias, stride, padding, dilation,
                              mask, output_mask)  # fmt: skip


@_deform_conv2d_backward_op.register_kernel(("cpu", "cuda"))
def _backward_dispatch(grad_out, input, offset, weight, bias, stride, padding, dilation, mask,
                       output_mask):  # fmt: skip
    return _BACKWARD[kernels.select(input.device)](grad_out, input, offset, weight, bias, stride,
                                                   padding, dilation, mask, output_mask)  # fmt: skip


def _backward_reference(grad_out, input, offset, weight, bias, stride, padding, dilation, mask,
                        output_mask):  # fmt: skip
    """Autograd through the reference."""
    originals = (input, offset, weight, bias, mask)
    (grad_out, input, offset, weight, bias, mask), _ = upcast(
        grad_out, input, offset, weight, bias, mask
    )

    def conv(input, offset, weight, bias, mask):
        return reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)

    grads = reference_grads(conv, grad_out, (input, offset, weight, bias, mask), output_mask)
    return _pack_grads(grads, originals)


def _backward_numba(grad_out, input, offset, weight, bias, stride, padding, dilation,
                    mask, output_mask):  # fmt: skip
    originals = (input, offset, weight, bias, mask)
    (grad_out, input, offset, weight, mask), _ = upcast(grad_out, input, offset, weight, mask)
    return _backward_fused(_deform_conv_cpu.backward, originals, grad_out, input, offset, weight,
                           bias, (stride, padding, dilation), mask, output_mask)  # fmt: skip


def _backward_triton(grad_out, input, offset, weight, bias, stride, padding, dilation,
                     mask, output_mask):  # fmt: skip
    if input.dtype == torch.float64:
        return _backward_reference(grad_out, input, offset, weight, bias, stride, padding,
                                   dilation, mask, output_mask)  # fmt: skip
    from deformable.ops import _triton_conv

    # float16 / bfloat16 natively, like the forward
    return _backward_fused(_triton_conv.backward, (input, offset, weight, bias, mask), grad_out,
                           input, offset, weight, bias, (stride, padding, dilation), mask,
                           output_mask)  # fmt: skip


def _backward_fused(backward, originals, grad_out, input, offset, weight, bias, geometry, mask,
                    output_mask):  # fmt: skip
    """A fused kernel set's ``backward`` (input, offset, weight and mask gradients in one call)
    plus the bias gradient, each in the dtype of its tensor in ``originals``."""
    need_input, need_offset, need_weight, need_bias, need_mask = (bool(m) for m in output_mask)
    need_mask = need_mask and mask is not None
    grad_input, grad_offset, grad_weight, grad_mask = backward(
        grad_out, input, offset, weight, *geometry, mask,
        (need_input, need_offset, need_weight, need_mask))  # fmt: skip
    grad_bias = grad_out.sum((0, 2, 3)) if need_bias and bias is not None else None
    return _pack_grads([grad_input, grad_offset, grad_weight, grad_bias, grad_mask], originals)


_BACKWARD = {"numba": _backward_numba, "triton": _backward_triton, "reference": _backward_reference}


def _pack_grads(grads, originals):
    """Gradients in the dtype of their inputs; an empty tensor stands for 'not computed'."""
    return tuple(originals[0].new_empty(0) if g is None else g.to(t.dtype)
                 for g, t in zip(grads, originals))  # fmt: skip


@_deform_conv2d_backward_op.register_fake
def _deform_conv2d_backward_fake(grad_out, input, offset, weight, bias, stride, padding,
                                 dilation, mask, output_mask):  # fmt: skip
    originals = (input, offset, weight, bias, mask)
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in zip(originals, output_mask))  # fmt: skip


def _setup_context(ctx, inputs, output):
    input, offset, weight, bias, stride, padding, dilation, mask = inputs
    ctx.geometry = (stride, padding, dilation)
    ctx.save_for_backward(input, offset, weight, bias, mask)


def _backward(ctx, grad_out):
    input, offset, weight, bias, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], needs[2], needs[3], needs[7]]
    grads = torch.ops.deformable.deform_conv2d_backward(
        grad_out, input, offset, weight, bias, *ctx.geometry, mask, output_mask
    )
    gi, go, gw, gb, gm = (g if need else None for g, need in zip(grads, output_mask))
    return gi, go, gw, gb, None, None, None, gm


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
