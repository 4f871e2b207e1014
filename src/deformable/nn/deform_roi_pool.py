"""Deformable RoI pooling layers: each owns the branch that predicts its offsets (and masks).

- :class:`DeformRoIPool`: deformable RoI pooling v1 / v2 with its fc offset branch (DCNv1 §2.2).
- :class:`DeformPSRoIPool`: deformable position-sensitive RoI pooling, the head of deformable
  R-FCN, with its conv offset branch.
- :class:`MultiScaleDeformRoIPool`: a stand-in for ``torchvision.ops.MultiScaleRoIAlign`` that
  pools every RoI from its FPN level with a :class:`DeformRoIPool`.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from deformable.ops._checks import pair
from deformable.ops.deform_roi_pool import _as_rois, deform_ps_roi_pool, deform_roi_pool

__all__ = ["DeformRoIPool", "DeformPSRoIPool", "MultiScaleDeformRoIPool"]


def _positive_int(layer: str, name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{layer}: {name} must be a positive int, got {value!r}")
    return value


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling (DCNv1), or modulated deformable RoI pooling (DCNv2).

    See :func:`deformable.ops.deform_roi_pool` for the operator and its conventions. The layer
    first pools every RoI without offsets (RoIAlign), then predicts normalised offsets
    ``[K, 2, oh, ow]`` from those features with ``offset_fc`` (fc → ReLU → fc → ReLU → fc) and
    pools again with them. With ``modulated=True``, ``mask_fc`` (fc → ReLU → fc → sigmoid)
    predicts a mask ``[K, 1, oh, ow]`` that multiplies the bins (DCNv2).

    The last fc of each branch is zero-initialised: a fresh v1 layer computes exactly
    ``torchvision.ops.roi_align``; a fresh v2 layer half of it (masks start at 0.5, as in DCNv2).
    Module and parameter names follow mmcv's ``DeformRoIPoolPack`` /
    ``ModulatedDeformRoIPoolPack`` (``offset_fc.{0,2,4}``, ``mask_fc.{0,2}``), so their state
    dicts load; mmcv's op is half-pixel aligned, so pass ``aligned=True`` to reproduce it.

    Args:
        output_size (int or Tuple[int, int]): bins per RoI ``(oh, ow)``.
        spatial_scale (float): feature-map pixels per box unit. Default: 1.0.
        sampling_ratio (int): samples per bin and axis, ``<= 0`` for adaptive. Default: -1.
        in_channels (int): channels of the feature map (the fc branch sees
            ``in_channels * oh * ow`` features per RoI).
        hidden_channels (int): width of the hidden fc layers. Default: 1024.
        gamma (float): offset scale. Default: 0.1.
        modulated (bool): predict masks too (DCNv2). Default: False.
        aligned (bool): half-pixel aligned boxes (see the op). Default: False, as
            ``torchvision.ops.RoIAlign`` and ``MultiScaleRoIAlign``.

    Shape:
        forward(input ``[N, in_channels, H, W]``, boxes ``Tensor[K, 5]`` or
        ``List[Tensor[L, 4]]``) → ``[K, in_channels, oh, ow]``.

    Example:
        >>> import torchvision
        >>> pool = DeformRoIPool(7, 1 / 8, 2, in_channels=16, hidden_channels=64)
        >>> x = torch.rand(2, 16, 20, 24)
        >>> boxes = [torch.tensor([[8.0, 8.0, 90.0, 120.0]]), torch.tensor([[0.0, 4.0, 60.0, 30.0]])]
        >>> out = pool(x, boxes)
        >>> out.shape
        torch.Size([2, 16, 7, 7])
        >>> torch.allclose(out, torchvision.ops.roi_align(x, boxes, 7, 1 / 8, 2))
        True
    """

    offset_group = "roi_offset"  # deformable.nn.param_groups: DCNv1's 0.01x rate

    def __init__(
        self,
        output_size: Union[int, tuple[int, int]],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        *,
        in_channels: int,
        hidden_channels: int = 1024,
        gamma: float = 0.1,
        modulated: bool = False,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.output_size = pair(output_size, "output_size", minimum=1)
        self.in_channels = _positive_int(name, "in_channels", in_channels)
        self.hidden_channels = _positive_int(name, "hidden_channels", hidden_channels)
        if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
            raise TypeError(f"{name}: sampling_ratio must be an int, got {sampling_ratio!r}")
        if not isinstance(spatial_scale, (int, float)) or not spatial_scale > 0:
            raise ValueError(f"{name}: spatial_scale must be a positive number, got {spatial_scale!r}")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = sampling_ratio
        self.gamma = float(gamma)
        self.modulated = bool(modulated)
        self.aligned = bool(aligned)
        bins = self.output_size[0] * self.output_size[1]
        features = in_channels * bins
        self.offset_fc = nn.Sequential(
            nn.Linear(features, hidden_channels), nn.ReLU(inplace=True),
            nn.Linear(hidden_channels, hidden_channels), nn.ReLU(inplace=True),
            nn.Linear(hidden_channels, 2 * bins),
        )  # fmt: skip
        self.mask_fc = None
        if modulated:
            self.mask_fc = nn.Sequential(
                nn.Linear(features, hidden_channels), nn.ReLU(inplace=True),
                nn.Linear(hidden_channels, bins), nn.Sigmoid(),
            )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for the hidden layers; zeros for the last fc of a branch."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        for last in (self.offset_fc[4], self.mask_fc[2] if self.mask_fc is not None else None):
            if last is not None:
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def offset_and_mask(self, pooled: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Offsets ``[K, 2, oh, ow]`` and masks (or None) from RoIAlign features ``[K, C, oh, ow]``."""
        count = pooled.shape[0]
        flat = pooled.flatten(1)
        offset = self.offset_fc(flat).reshape(count, 2, *self.output_size)
        mask = None
        if self.mask_fc is not None:
            mask = self.mask_fc(flat).reshape(count, 1, *self.output_size)
        return offset, mask

    def pool(self, input: Tensor, boxes, spatial_scale: float) -> Tensor:
        """The layer at another ``spatial_scale`` (one FPN level, as used by the multi-level pooler)."""
        if input.dim() == 4 and input.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input has {input.shape[1]} channels, the layer was built "
                f"for in_channels={self.in_channels}"
            )
        settings = dict(output_size=self.output_size, spatial_scale=spatial_scale,
                        sampling_ratio=self.sampling_ratio, aligned=self.aligned)  # fmt: skip
        pooled = deform_roi_pool(input, boxes, **settings)
        offset, mask = self.offset_and_mask(pooled)
        return deform_roi_pool(input, boxes, **settings, offset=offset, mask=mask,
                               gamma=self.gamma)  # fmt: skip

    def forward(self, input: Tensor, boxes: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        return self.pool(input, boxes, self.spatial_scale)

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the offset / mask branches (see :func:`deformable.nn.param_groups`)."""
        yield from self.offset_fc.parameters()
        if self.mask_fc is not None:
            yield from self.mask_fc.parameters()

    def extra_repr(self) -> str:
        s = (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
             f"sampling_ratio={self.sampling_ratio}, in_channels={self.in_channels}, "
             f"hidden_channels={self.hidden_channels}, gamma={self.gamma}")  # fmt: skip
        if self.modulated:
            s += ", modulated=True"
        if self.aligned:
            s += ", aligned=True"
        return s


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling with its offset branch: a deformable R-FCN head.

    See :func:`deformable.ops.deform_ps_roi_pool` for the operator. From a feature map the layer
    computes, with 1x1 convolutions, the position-sensitive score maps
    (``conv``: ``out_channels * oh * ow`` channels) and an offset field
    (``conv_offset``: ``2 * offset_groups * oh * ow`` channels). As in deformable R-FCN, the
    offsets of each RoI are the position-sensitive RoI pooling of that field,
    ``[K, 2 * offset_groups, oh, ow]``, and move the bins of the score maps' pooling.
    ``conv_offset`` is zero-initialised: a fresh layer computes exactly
    ``torchvision.ops.ps_roi_align(conv(input), ...)``.

    Args:
        output_size (int or Tuple[int, int]): bins per RoI ``(oh, ow)``.
        spatial_scale (float): feature-map pixels per box unit. Default: 1.0.
        sampling_ratio (int): samples per bin and axis, ``<= 0`` for adaptive. Default: -1.
        in_channels (int): channels of the feature map.
        out_channels (int): channels of the output (classes, or 4 x classes for boxes).
        offset_groups (int): 1 for class-agnostic offsets, ``out_channels`` for class-aware
            ones (deformable R-FCN's classifier); any divisor of ``out_channels``. Default: 1.
        gamma (float): offset scale. Default: 0.1.

    Shape:
        forward(input ``[N, in_channels, H, W]``, boxes) → ``[K, out_channels, oh, ow]``.

    Example:
        >>> head = DeformPSRoIPool(3, 1 / 16, 2, in_channels=32, out_channels=5, offset_groups=5)
        >>> head(torch.rand(1, 32, 20, 20), [torch.tensor([[0.0, 0.0, 150.0, 100.0]])]).shape
        torch.Size([1, 5, 3, 3])
    """

    offset_group = "roi_offset"  # deformable.nn.param_groups: DCNv1's 0.01x rate

    def __init__(
        self,
        output_size: Union[int, tuple[int, int]],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        *,
        in_channels: int,
        out_channels: int,
        offset_groups: int = 1,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.output_size = pair(output_size, "output_size", minimum=1)
        self.in_channels = _positive_int(name, "in_channels", in_channels)
        self.out_channels = _positive_int(name, "out_channels", out_channels)
        self.offset_groups = _positive_int(name, "offset_groups", offset_groups)
        if out_channels % offset_groups:
            raise ValueError(f"{name}: out_channels ({out_channels}) must be divisible by "
                             f"offset_groups ({offset_groups})")  # fmt: skip
        if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool):
            raise TypeError(f"{name}: sampling_ratio must be an int, got {sampling_ratio!r}")
        if not isinstance(spatial_scale, (int, float)) or not spatial_scale > 0:
            raise ValueError(f"{name}: spatial_scale must be a positive number, got {spatial_scale!r}")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = sampling_ratio
        self.gamma = float(gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.conv = nn.Conv2d(in_channels, out_channels * bins, 1)
        self.conv_offset = nn.Conv2d(in_channels, 2 * offset_groups * bins, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, input: Tensor, boxes: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        settings = dict(output_size=self.output_size, spatial_scale=self.spatial_scale,
                        sampling_ratio=self.sampling_ratio)  # fmt: skip
        offset = deform_ps_roi_pool(self.conv_offset(input), boxes, **settings)
        return deform_ps_roi_pool(self.conv(input), boxes, **settings, offset=offset,
                                  gamma=self.gamma)  # fmt: skip

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the offset branch (see :func:`deformable.nn.param_groups`)."""
        return self.conv_offset.parameters()

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, in_channels={self.in_channels}, "
                f"out_channels={self.out_channels}, offset_groups={self.offset_groups}, "
                f"gamma={self.gamma}")  # fmt: skip


class MultiScaleDeformRoIPool(nn.Module):
    """Deformable RoI pooling over FPN levels: a stand-in for ``torchvision.ops.MultiScaleRoIAlign``.

    Same constructor (plus the keyword-only arguments of :class:`DeformRoIPool`) and same
    ``forward(x, boxes, image_shapes)``. Each RoI is pooled from one level, chosen by its size
    with the FPN paper's rule (eq. 1, torchvision's ``LevelMapper``):
    ``floor(canonical_level + log2(sqrt(area) / canonical_scale))`` clamped to the levels
    present; level scales are inferred from the feature-map and image sizes (powers of 2).

    One :class:`DeformRoIPool` (``self.pool``) is shared by every level: its fc offset branch
    sees RoIAlign features of the same shape whatever the level, and sharing keeps the parameter
    count of one layer (the fc branch is ``in_channels * oh * ow * hidden_channels`` weights).
    A fresh v1 pooler computes exactly ``MultiScaleRoIAlign``.

    Args:
        featmap_names (List[str]): keys of the feature maps to pool from, in increasing stride.
        output_size (int or Tuple[int, int]): bins per RoI.
        sampling_ratio (int): samples per bin and axis, ``<= 0`` for adaptive.
        canonical_scale (int): box size mapped to ``canonical_level``. Default: 224.
        canonical_level (int): FPN level of a ``canonical_scale`` box. Default: 4.
        in_channels, hidden_channels, gamma, modulated, aligned: as :class:`DeformRoIPool`.

    Example:
        >>> from collections import OrderedDict
        >>> pooler = MultiScaleDeformRoIPool(["p2", "p3"], 7, 2, in_channels=8, hidden_channels=32)
        >>> x = OrderedDict(p2=torch.rand(1, 8, 32, 32), p3=torch.rand(1, 8, 16, 16))
        >>> pooler(x, [torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 120.0, 90.0]])],
        ...        [(128, 128)]).shape
        torch.Size([2, 8, 7, 7])
    """

    offset_group = "roi_offset"  # deformable.nn.param_groups: DCNv1's 0.01x rate

    def __init__(
        self,
        featmap_names: list[str],
        output_size: Union[int, tuple[int, int], list[int]],
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        in_channels: int,
        hidden_channels: int = 1024,
        gamma: float = 0.1,
        modulated: bool = False,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(featmap_names, str) or not featmap_names or not all(
                isinstance(n, str) for n in featmap_names):  # fmt: skip
            raise ValueError(f"MultiScaleDeformRoIPool: featmap_names must be a non-empty list "
                             f"of str, got {featmap_names!r}")  # fmt: skip
        self.featmap_names = list(featmap_names)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.pool = DeformRoIPool(tuple(output_size) if isinstance(output_size, list) else output_size,
                                  1.0, sampling_ratio, in_channels=in_channels,
                                  hidden_channels=hidden_channels, gamma=gamma,
                                  modulated=modulated, aligned=aligned)  # fmt: skip
        self.output_size = self.pool.output_size
        self.sampling_ratio = sampling_ratio

    @staticmethod
    def _scale(feature: Tensor, image_size: tuple[int, int]) -> float:
        # torchvision's _infer_scale: the height ratio rounded to a power of 2
        return 2.0 ** round(math.log2(feature.shape[-2] / image_size[0]))

    def levels(self, boxes: list[Tensor], scales: list[float]) -> Tensor:
        """The index into ``scales`` of the level each box is pooled from (``[K]``, int64)."""
        k_min = int(-math.log2(scales[0]))
        k_max = int(-math.log2(scales[-1]))
        area = torch.cat([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes])
        size = torch.sqrt(area)
        target = torch.floor(self.canonical_level + torch.log2(size / self.canonical_scale)
                             + torch.tensor(1e-6, dtype=size.dtype))  # fmt: skip
        return (target.clamp(k_min, k_max).to(torch.int64) - k_min)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:  # fmt: skip
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not features:
            raise ValueError(f"MultiScaleDeformRoIPool: none of featmap_names "
                             f"{self.featmap_names} is a key of x ({list(x)})")  # fmt: skip
        if not image_shapes:
            raise ValueError("MultiScaleDeformRoIPool: image_shapes must not be empty")
        if not isinstance(boxes, (list, tuple)):
            raise TypeError(f"MultiScaleDeformRoIPool: boxes must be a list of Tensor[L, 4], "
                            f"got {type(boxes).__name__}")  # fmt: skip
        image_size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [self._scale(f, image_size) for f in features]
        rois = _as_rois("MultiScaleDeformRoIPool", boxes, features[0])
        if len(features) == 1:
            return self.pool.pool(features[0], rois, scales[0])
        levels = self.levels(list(boxes), scales)
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, scales)):
            index = torch.where(levels == level)[0]
            pooled = self.pool.pool(feature, rois[index], scale)
            result = result.index_copy(0, index, pooled.to(result.dtype))
        return result

    def offset_parameters(self) -> Iterator[nn.Parameter]:
        return self.pool.offset_parameters()

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}")  # fmt: skip
