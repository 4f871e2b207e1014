"""DeformConv2d: a drop-in for nn.Conv2d that owns the branch predicting its offsets (and masks)."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn

from deformable.ops import deform_conv2d
from deformable.ops._checks import pair


class DeformConv2d(nn.Module):
    """Deformable convolution (DCNv1), or modulated deformable convolution (DCNv2).

    See :func:`deformable.ops.deform_conv2d` for the operator and its conventions. The layer owns
    ``conv_offset``, a regular convolution with the same kernel, stride, padding and dilation
    that predicts ``2 * offset_groups * kh * kw`` offset channels from the layer's input (plus
    ``offset_groups * kh * kw`` mask logits, turned into masks by a sigmoid, when
    ``modulated=True``). It is zero-initialised: a fresh v1 layer computes exactly ``nn.Conv2d``
    with the same weight, a fresh v2 layer half of it (masks start at 0.5, as in DCNv2).

    Parameter names follow mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``
    (``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``), so their state dicts
    load as they are; the older name of the modulated branch (``conv_offset_mask``) is mapped
    on load. For torchvision's ``DeformConv2d`` with its own offset conv, use
    :meth:`from_torchvision`; to turn a trained ``nn.Conv2d`` into a deformable layer, use
    :meth:`from_conv2d`.

    Args:
        in_channels (int): channels of the input.
        out_channels (int): channels of the output.
        kernel_size (int or Tuple[int, int]): size of the kernel.
        stride, padding, dilation (int or Tuple[int, int]): as ``nn.Conv2d``.
        groups (int): weight groups, as ``nn.Conv2d``. Default: 1.
        offset_groups (int): groups of input channels that share one set of offsets. Default: 1.
        bias (bool): add a learnable bias. Default: True.
        modulated (bool): DCNv2 (predict a mask per sample too). Default: False.

    Example:
        >>> layer = DeformConv2d(8, 16, 3, padding=1, modulated=True)
        >>> layer(torch.rand(2, 8, 12, 12)).shape
        torch.Size([2, 16, 12, 12])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups), ("offset_groups", offset_groups)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DeformConv2d: {name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"DeformConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) "
                f"must be divisible by groups ({groups})"
            )
        if in_channels % offset_groups:
            raise ValueError(
                f"DeformConv2d: in_channels ({in_channels}) must be divisible by offset_groups "
                f"({offset_groups})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size", minimum=1)
        self.stride = pair(stride, "stride", minimum=1)
        self.padding = pair(padding, "padding", minimum=0)
        self.dilation = pair(dilation, "dilation", minimum=1)
        self.groups = groups
        self.offset_groups = offset_groups
        self.modulated = modulated
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(in_channels, self.offset_channels + self.mask_channels,
                                     self.kernel_size, self.stride, self.padding, self.dilation,
                                     bias=True)  # fmt: skip
        self.reset_parameters()

    @property
    def offset_channels(self) -> int:
        return 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]

    @property
    def mask_channels(self) -> int:
        return self.offset_groups * self.kernel_size[0] * self.kernel_size[1] if self.modulated else 0

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation for the weight and bias; zeros for the offset branch."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """The offsets ``[N, 2*G*kh*kw, Ho, Wo]`` and masks (or None) the layer predicts."""
        out = self.conv_offset(input)
        if not self.modulated:
            return out, None
        offset, logits = out.split([self.offset_channels, self.mask_channels], dim=1)
        return offset, torch.sigmoid(logits)

    def forward(self, input: Tensor) -> Tensor:
        offset, mask = self.offset_and_mask(input)
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)  # fmt: skip

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the offset / mask branch (see :func:`deformable.nn.param_groups`)."""
        return self.conv_offset.parameters()

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")  # fmt: skip
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.modulated:
            s += ", modulated=True"
        return s

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # mmdet v1 / early mmcv checkpoints name the modulated branch conv_offset_mask
        for suffix in ("weight", "bias"):
            old, new = prefix + "conv_offset_mask." + suffix, prefix + "conv_offset." + suffix
            if new not in state_dict and old in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, *, offset_groups: int = 1,
                    modulated: bool = False) -> "DeformConv2d":  # fmt: skip
        """A deformable layer carrying ``conv``'s weight and bias (the offset branch at zero).

        A v1 layer made this way computes exactly what ``conv`` computes until its offsets
        train. Only zero padding is supported (the deformable sampling pads with zeros).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv2d: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                "from_conv2d: conv must use explicit zero padding (padding_mode='zeros', integer "
                f"padding), got padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, offset_groups,
                    conv.bias is not None, modulated)  # fmt: skip
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_torchvision(cls, deform_conv, offset_conv: nn.Conv2d,
                         mask_conv: nn.Conv2d | None = None) -> "DeformConv2d":  # fmt: skip
        """Carry over a ``torchvision.ops.DeformConv2d`` and the convs that feed it.

        ``offset_conv`` predicts the offsets of ``deform_conv``; ``mask_conv`` (optional) the
        mask logits, which the result passes through a sigmoid (DCNv2's convention; if your
        model applied no sigmoid, the results differ). The offset conv must share the deformable
        conv's kernel, stride, padding and dilation, as this layer's own branch does.
        """
        kh, kw = deform_conv.weight.shape[-2:]
        taps = kh * kw
        if offset_conv.out_channels % (2 * taps):
            raise ValueError(
                f"from_torchvision: offset_conv must have 2 * offset_groups * {kh} * {kw} output "
                f"channels, got {offset_conv.out_channels}"
            )
        offset_groups = offset_conv.out_channels // (2 * taps)
        if mask_conv is not None and mask_conv.out_channels != offset_groups * taps:
            raise ValueError(
                f"from_torchvision: mask_conv must have offset_groups * {kh} * {kw} = "
                f"{offset_groups * taps} output channels, got {mask_conv.out_channels}"
            )
        for conv in (offset_conv, mask_conv):
            if conv is None:
                continue
            geometry = (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding),
                        tuple(conv.dilation))  # fmt: skip
            expected = ((kh, kw), tuple(deform_conv.stride), tuple(deform_conv.padding),
                        tuple(deform_conv.dilation))  # fmt: skip
            if geometry != expected or conv.groups != 1 or conv.in_channels != deform_conv.in_channels:
                raise ValueError(
                    "from_torchvision: offset_conv and mask_conv must read the layer's input with "
                    f"its kernel, stride, padding and dilation {expected}, got {geometry}"
                )
        layer = cls(deform_conv.in_channels, deform_conv.out_channels, (kh, kw),
                    deform_conv.stride, deform_conv.padding, deform_conv.dilation,
                    deform_conv.groups, offset_groups, deform_conv.bias is not None,
                    mask_conv is not None)  # fmt: skip
        layer.to(device=deform_conv.weight.device, dtype=deform_conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(deform_conv.weight)
            if deform_conv.bias is not None:
                layer.bias.copy_(deform_conv.bias)
            branches = [offset_conv] + ([mask_conv] if mask_conv is not None else [])
            layer.conv_offset.weight.copy_(torch.cat([c.weight for c in branches]))
            layer.conv_offset.bias.copy_(torch.cat([
                c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels)
                for c in branches]))  # fmt: skip
        return layer
