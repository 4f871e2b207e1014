"""SpatialTransformer: a learned global affine warp (Jaderberg et al., NIPS 2015).

The global, parametric forerunner the deformable ConvNets papers compare against: one affine
transform per image, predicted from the image, where a deformable conv learns a dense, local
offset field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformable.ops._checks import pair

__all__ = ["SpatialTransformer"]

_PADDING_MODES = ("zeros", "border", "reflection")


class SpatialTransformer(nn.Module):
    """Localisation network -> affine ``theta`` -> ``F.affine_grid`` -> bilinear ``F.grid_sample``.

    The localisation network is a few 3x3 convs of stride 2 (with ReLU), an adaptive average
    pool to ``pooled_size``, a hidden fc layer and a last fc layer predicting the six numbers of
    ``theta``. That last layer has a zero weight and the identity as its bias, so a fresh
    transformer returns its input (resampled at the same pixel centres: exactly, up to float
    rounding, when ``output_size`` is the input's size). The adaptive pool makes the layer work
    on any input size; put it in front of any CNN.

    Convention:
        ``theta`` is ``[N, 2, 3]`` and maps output coordinates to input coordinates, both
        normalised to ``[-1, 1]`` with x (horizontal) first: the output pixel at normalised
        ``(x, y)`` reads the input at ``theta @ (x, y, 1)``. ``(-1, -1)`` is the top-left
        corner of the top-left pixel and ``(1, 1)`` the bottom-right corner of the bottom-right
        pixel (``align_corners=False``, used by both ``affine_grid`` and ``grid_sample``).
        Samples outside the input follow ``padding_mode``.

    Args:
        in_channels (int): channels of the input.
        hidden_channels (Sequence[int]): output channels of the localisation convs, one stride-2
            3x3 conv each. Default: ``(16, 32)``.
        pooled_size (int or Tuple[int, int]): size the conv features are average-pooled to
            before the fc layers. Default: 4.
        fc_channels (int): width of the hidden fc layer. Default: 64.
        output_size (int or Tuple[int, int], optional): ``(height, width)`` of the output.
            Default: None (the input's size).
        padding_mode (str): ``"zeros"``, ``"border"`` or ``"reflection"``, as
            ``F.grid_sample``. Default: ``"zeros"``.

    Attributes:
        last_theta (Tensor[N, 2, 3] or None): the transforms of the last forward pass, detached
            (for analysis); None before the first call.

    Example:
        >>> stn = SpatialTransformer(3, output_size=(8, 8))
        >>> x = torch.rand(2, 3, 20, 30)
        >>> stn(x).shape
        torch.Size([2, 3, 8, 8])
        >>> stn.last_theta[0]
        tensor([[1., 0., 0.],
                [0., 1., 0.]])
        >>> torch.allclose(SpatialTransformer(3)(x), x, atol=1e-5)
        True
    """

    def __init__(
        self,
        in_channels: int,
        *,
        hidden_channels: Sequence[int] = (16, 32),
        pooled_size: int | tuple[int, int] = 4,
        fc_channels: int = 64,
        output_size: int | tuple[int, int] | None = None,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"SpatialTransformer: in_channels must be a positive int, got "
                             f"{in_channels!r}")  # fmt: skip
        if (not isinstance(hidden_channels, Sequence) or isinstance(hidden_channels, str)
                or any(not isinstance(c, int) or isinstance(c, bool) or c < 1
                       for c in hidden_channels)):  # fmt: skip
            raise ValueError(f"SpatialTransformer: hidden_channels must be a sequence of positive "
                             f"ints, got {hidden_channels!r}")  # fmt: skip
        if not isinstance(fc_channels, int) or isinstance(fc_channels, bool) or fc_channels < 1:
            raise ValueError(f"SpatialTransformer: fc_channels must be a positive int, got "
                             f"{fc_channels!r}")  # fmt: skip
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"SpatialTransformer: padding_mode must be one of {_PADDING_MODES}, "
                             f"got {padding_mode!r}")  # fmt: skip
        self.in_channels = in_channels
        self.pooled_size = pair(pooled_size, "pooled_size", minimum=1)
        self.output_size = None if output_size is None else pair(output_size, "output_size",
                                                                 minimum=1)  # fmt: skip
        self.padding_mode = padding_mode

        layers: list[nn.Module] = []
        channels = in_channels
        for c in hidden_channels:
            layers += [nn.Conv2d(channels, c, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            channels = c
        layers += [nn.AdaptiveAvgPool2d(self.pooled_size), nn.Flatten(),
                   nn.Linear(channels * self.pooled_size[0] * self.pooled_size[1], fc_channels),
                   nn.ReLU(inplace=True)]  # fmt: skip
        self.localisation = nn.Sequential(*layers)
        self.fc_theta = nn.Linear(fc_channels, 6)
        self.last_theta: Tensor | None = None
        self.reset_theta()

    def reset_theta(self) -> None:
        """Set the last layer to predict the identity for every input (zero weight)."""
        nn.init.zeros_(self.fc_theta.weight)
        with torch.no_grad():
            self.fc_theta.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def _check(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(
                f"SpatialTransformer: input must be a Tensor, got {type(input).__name__}"
            )
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"SpatialTransformer: input must be [N, {self.in_channels}, H, W], got "
                f"{list(input.shape)}"
            )
        if not input.is_floating_point():
            raise TypeError(f"SpatialTransformer: input must be floating point, got {input.dtype}")

    def theta(self, input: Tensor) -> Tensor:
        """The affine transforms ``Tensor[N, 2, 3]`` predicted for ``input`` (differentiable)."""
        self._check(input)
        return self.fc_theta(self.localisation(input)).view(-1, 2, 3)

    def forward(self, input: Tensor) -> Tensor:
        theta = self.theta(input)
        self.last_theta = theta.detach()
        n, c, h, w = input.shape
        out_h, out_w = self.output_size or (h, w)
        grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
        return F.grid_sample(input, grid, mode="bilinear", padding_mode=self.padding_mode,
                             align_corners=False)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, output_size={self.output_size}, "
                f"padding_mode={self.padding_mode!r}")  # fmt: skip
