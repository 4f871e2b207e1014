"""Deformable R-FCN (DCNv1 §4) in torchvision's two-stage pipeline.

:class:`RFCN` is a ``torchvision.models.detection.GeneralizedRCNN``: torchvision's transform,
RPN (``RegionProposalNetwork``), RoI sampling, losses (``fastrcnn_loss``) and post-processing
(``RoIHeads.postprocess_detections``), input and output format. Only the per-RoI head differs:
:class:`RFCNHead` in :class:`RFCNRoIHeads`.

Single-level design (a simplification of the paper's, documented here):

- The backbone (:class:`RFCNBackbone`) is a deformable ResNet whose ``layer4`` (conv5) is
  dilated (stride 16, as in R-FCN), followed by R-FCN's 1x1 "new conv" + ReLU that reduces it to
  ``out_channels`` (1024 for ResNet-50). It returns the one map ``{"0": ...}``.
- The RPN and the R-FCN head both read that map (the paper's RPN reads conv4); the anchors are
  one level with sizes 32..512 and aspect ratios 0.5, 1, 2.
- The head computes, with 1x1 convs, ``k * k * num_classes`` position-sensitive class score
  maps and ``k * k * 4`` class-agnostic box maps, pools them with deformable position-sensitive
  RoI pooling (:class:`deformable.nn.DeformPSRoIPool`; class-aware offsets for the classes, one
  offset field for the boxes, as deformable R-FCN) and votes by averaging the ``k x k`` bins.
  The class-agnostic box deltas are repeated for every class so torchvision's per-class loss and
  decoding apply unchanged. No OHEM (torchvision's balanced sampler instead).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, ps_roi_align

from deformable.models.detection._checks import check_choice, check_kwargs, check_num_classes
from deformable.models.resnet import (
    DeformResNet,
    check_deform_stages,
    load_torchvision_state_dict,
    trainable_layer_names,
    resnet18,
    resnet50,
)
from deformable.nn import DeformPSRoIPool

__all__ = ["PS_ROI_POOLS", "RFCN", "RFCNBackbone", "RFCNHead", "RFCNRoIHeads", "rfcn_resnet50",
           "rfcn_resnet18"]  # fmt: skip

#: Values of ``ps_roi_pool``: torchvision's ``ps_roi_align`` (R-FCN) or deformable (DCNv1).
PS_ROI_POOLS = ("align", "deform")


class _PSRoIAlign(nn.Module):
    """Score maps (1x1 conv) + torchvision's ``ps_roi_align``: plain R-FCN, the ablation of
    :class:`DeformPSRoIPool` (same ``conv`` name, so the weights move between the two)."""

    def __init__(self, output_size: int, spatial_scale: float, sampling_ratio: int, *,
                 in_channels: int, out_channels: int) -> None:  # fmt: skip
        super().__init__()
        self.output_size = (output_size, output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.conv = nn.Conv2d(in_channels, out_channels * output_size * output_size, 1)

    def forward(self, input: Tensor, boxes: list[Tensor]) -> Tensor:
        return ps_roi_align(self.conv(input), boxes, self.output_size, self.spatial_scale,
                            self.sampling_ratio)  # fmt: skip


class RFCNHead(nn.Module):
    """The R-FCN head: position-sensitive score maps, (deformable) PS RoI pooling, voting.

    Args:
        in_channels (int): channels of the feature map.
        num_classes (int): classes, background included.
        output_size (int): ``k``, bins per RoI side (the paper's 7). Default: 7.
        spatial_scale (float): feature-map pixels per image pixel. Default: 1/16.
        sampling_ratio (int): samples per bin and axis (the paper's 4 per part is 2x2).
            Default: 2.
        deformable (bool): deformable PS RoI pooling with class-aware offsets for the class
            maps and one offset field for the box maps (DCNv1); else torchvision's
            ``ps_roi_align`` (R-FCN). Default: True.
        gamma (float): offset scale. Default: 0.1.
        featmap_name (str): key of the feature map in the backbone's output. Default: ``"0"``.

    Shape:
        forward(features ``{featmap_name: [N, in_channels, H, W]}``, proposals
        ``List[Tensor[L_i, 4]]``) → (class logits ``[K, num_classes]``, box deltas
        ``[K, 4 * num_classes]``, the class-agnostic deltas repeated per class).

    Example:
        >>> head = RFCNHead(64, 3, output_size=3)
        >>> boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
        >>> logits, deltas = head({"0": torch.rand(1, 64, 8, 8)}, boxes)
        >>> logits.shape, deltas.shape
        (torch.Size([1, 3]), torch.Size([1, 12]))
    """

    offset_group = "roi_offset"  # deformable.nn.param_groups: DCNv1's 0.01x rate

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        output_size: int = 7,
        spatial_scale: float = 1 / 16,
        sampling_ratio: int = 2,
        deformable: bool = True,
        gamma: float = 0.1,
        featmap_name: str = "0",
    ) -> None:
        super().__init__()
        check_num_classes(type(self).__name__, num_classes)
        if not isinstance(output_size, int) or isinstance(output_size, bool) or output_size < 1:
            raise ValueError(f"RFCNHead: output_size must be a positive int, got {output_size!r}")
        self.num_classes = num_classes
        self.featmap_name = featmap_name
        self.deformable = bool(deformable)
        common = dict(in_channels=in_channels)
        if deformable:
            self.cls_pool = DeformPSRoIPool(output_size, spatial_scale, sampling_ratio,
                                            out_channels=num_classes, offset_groups=num_classes,
                                            gamma=gamma, **common)  # fmt: skip
            self.bbox_pool = DeformPSRoIPool(output_size, spatial_scale, sampling_ratio,
                                             out_channels=4, offset_groups=1, gamma=gamma,
                                             **common)  # fmt: skip
        else:
            self.cls_pool = _PSRoIAlign(output_size, spatial_scale, sampling_ratio,
                                        out_channels=num_classes, **common)  # fmt: skip
            self.bbox_pool = _PSRoIAlign(output_size, spatial_scale, sampling_ratio, out_channels=4,
                                         **common)  # fmt: skip
        for pool in (self.cls_pool, self.bbox_pool):
            # R-FCN's initialisation of the score convs (the offset convs stay at zero)
            nn.init.normal_(pool.conv.weight, std=0.01)
            nn.init.zeros_(pool.conv.bias)

    def forward(self, features: Union[Tensor, dict[str, Tensor]],
                proposals: list[Tensor]) -> tuple[Tensor, Tensor]:  # fmt: skip
        x = features[self.featmap_name] if isinstance(features, dict) else features
        class_logits = self.cls_pool(x, proposals).mean(dim=(2, 3))  # vote: average the bins
        deltas = self.bbox_pool(x, proposals).mean(dim=(2, 3))
        return class_logits, deltas.repeat(1, self.num_classes)

    def offset_parameters(self):
        """Parameters of the offset branches (see :func:`deformable.nn.param_groups`)."""
        for pool in (self.cls_pool, self.bbox_pool):
            if hasattr(pool, "offset_parameters"):
                yield from pool.offset_parameters()


class RFCNRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with an :class:`RFCNHead` in place of pooler + 2fc + predictor.

    Training samples RoIs, computes ``loss_classifier`` / ``loss_box_reg`` with torchvision's
    ``fastrcnn_loss``; inference post-processes with ``postprocess_detections``: both unchanged.
    ``box_roi_pool``, ``box_head`` and ``box_predictor`` are None; the head is ``self.head``.

    Args:
        head (RFCNHead): the per-RoI head.
        fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction, bbox_reg_weights,
        score_thresh, nms_thresh, detections_per_img: as torchvision's ``RoIHeads``.
    """

    def __init__(self, head: RFCNHead, *, fg_iou_thresh: float, bg_iou_thresh: float,
                 batch_size_per_image: int, positive_fraction: float,
                 bbox_reg_weights: Optional[tuple[float, float, float, float]],
                 score_thresh: float, nms_thresh: float,
                 detections_per_img: int) -> None:  # fmt: skip
        super().__init__(None, None, None, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, bbox_reg_weights, score_thresh, nms_thresh,
                         detections_per_img)  # fmt: skip
        self.head = head

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("RFCNRoIHeads: targets are needed in training mode")
            for t in targets:
                if not t["boxes"].is_floating_point():
                    raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")
            sampled = self.select_training_samples(proposals, targets)
            proposals, _, labels, regression_targets = sampled
        class_logits, box_regression = self.head(features, proposals)
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels,
                                                          regression_targets)  # fmt: skip
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression,
                                                            proposals, image_shapes)  # fmt: skip
        return [{"boxes": b, "labels": l, "scores": s}
                for b, l, s in zip(boxes, labels, scores)], {}  # fmt: skip


class RFCNBackbone(nn.Module):
    """A ResNet body up to ``layer4`` + R-FCN's 1x1 "new conv" (+ ReLU): one map, ``{"0": ...}``.

    Args:
        body (DeformResNet): the ResNet (its ``avgpool`` and ``fc`` are not used); build it with
            a dilated ``layer4`` for R-FCN's stride 16.
        out_channels (int): channels of the map (R-FCN: 1024).
    """

    def __init__(self, body: DeformResNet, out_channels: int) -> None:
        super().__init__()
        self.body = body
        in_channels = body.feature_info[-1]["num_chs"]
        self.reduce = nn.Conv2d(in_channels, out_channels, 1)
        self.out_channels = out_channels
        nn.init.normal_(self.reduce.weight, std=0.01)
        nn.init.zeros_(self.reduce.bias)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return OrderedDict([("0", torch.relu(self.reduce(x)))])


class RFCN(GeneralizedRCNN):
    """Deformable R-FCN: torchvision's transform and RPN, an :class:`RFCNHead` per RoI.

    See :mod:`deformable.models.detection.rfcn` for the design. The arguments are
    ``torchvision.models.detection.FasterRCNN``'s, with the same defaults, minus the box pooler,
    head and predictor, plus the head's. Build it with :func:`rfcn_resnet50` /
    :func:`rfcn_resnet18`.

    Args:
        backbone (nn.Module): returns ``{"0": [N, out_channels, H / 16, W / 16]}`` and has
            ``out_channels``.
        num_classes (int): classes, background included.
        head_output_size (int): ``k`` of the k x k position-sensitive bins. Default: 7.
        head_sampling_ratio (int): samples per bin and axis. Default: 2.
        deformable_head (bool): deformable PS RoI pooling (else torchvision's). Default: True.
        feature_stride (int): the backbone's stride (sets the head's spatial scale).
            Default: 16.
        min_size, max_size, image_mean, image_std, size_divisible, fixed_size: the transform's,
            as FasterRCNN's.
        rpn_anchor_generator (AnchorGenerator, optional): one level. Default: sizes
            ``(32, 64, 128, 256, 512)``, aspect ratios ``(0.5, 1, 2)``.
        rpn_head (nn.Module, optional): Default: ``RPNHead(out_channels, 15)``.
        rpn_*, box_*, bbox_reg_weights: as FasterRCNN's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        head_output_size: int = 7,
        head_sampling_ratio: int = 2,
        deformable_head: bool = True,
        feature_stride: int = 16,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: Optional[list[float]] = None,
        image_std: Optional[list[float]] = None,
        size_divisible: int = 32,
        fixed_size: Optional[tuple[int, int]] = None,
        rpn_anchor_generator: Optional[AnchorGenerator] = None,
        rpn_head: Optional[nn.Module] = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        bbox_reg_weights: Optional[tuple[float, float, float, float]] = None,
    ) -> None:
        if not hasattr(backbone, "out_channels"):
            raise ValueError("RFCN: backbone must have an out_channels attribute")
        check_num_classes("RFCN", num_classes)
        channels = backbone.out_channels
        if rpn_anchor_generator is None:
            rpn_anchor_generator = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
        if rpn_head is None:
            rpn_head = RPNHead(channels, rpn_anchor_generator.num_anchors_per_location()[0])
        rpn = RegionProposalNetwork(
            rpn_anchor_generator, rpn_head, rpn_fg_iou_thresh, rpn_bg_iou_thresh,
            rpn_batch_size_per_image, rpn_positive_fraction,
            dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
            rpn_nms_thresh, score_thresh=rpn_score_thresh,
        )  # fmt: skip
        head = RFCNHead(channels, num_classes, output_size=head_output_size,
                        spatial_scale=1.0 / feature_stride, sampling_ratio=head_sampling_ratio,
                        deformable=deformable_head)  # fmt: skip
        roi_heads = RFCNRoIHeads(
            head, fg_iou_thresh=box_fg_iou_thresh, bg_iou_thresh=box_bg_iou_thresh,
            batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
            bbox_reg_weights=bbox_reg_weights, score_thresh=box_score_thresh,
            nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img,
        )  # fmt: skip
        if image_mean is None:
            image_mean = [0.485, 0.456, 0.406]
        if image_std is None:
            image_std = [0.229, 0.224, 0.225]
        transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std,
                                             size_divisible=size_divisible,
                                             fixed_size=fixed_size)  # fmt: skip
        super().__init__(backbone, rpn, roi_heads, transform)


_ARCHS = {"resnet50": (resnet50, 1024), "resnet18": (resnet18, 256)}

_RESERVED = {
    "backbone": "built from deform_stages, modulated and weights_backbone",
    "num_classes": "pass it as num_classes",
    "deformable_head": "choose it with ps_roi_pool",
}


def _rfcn(where: str, arch: str, *, num_classes, deform_stages, modulated, ps_roi_pool,
          weights_backbone, trainable_backbone_layers, offset_groups, head_channels,
          rfcn_kwargs) -> RFCN:  # fmt: skip
    check_num_classes(where, num_classes)
    check_choice(where, "ps_roi_pool", ps_roi_pool, PS_ROI_POOLS)
    check_kwargs(where, RFCN, rfcn_kwargs, _RESERVED)
    stages = check_deform_stages(deform_stages, where)
    trainable = trainable_layer_names(where, "trainable_backbone_layers", trainable_backbone_layers,
                                      stages)  # fmt: skip
    builder, default_channels = _ARCHS[arch]
    if head_channels is None:
        head_channels = default_channels
    if not isinstance(head_channels, int) or isinstance(head_channels, bool) or head_channels < 1:
        raise ValueError(f"{where}: head_channels must be a positive int, got {head_channels!r}")
    body = builder(deform_stages=stages, modulated=modulated, offset_groups=offset_groups,
                   replace_stride_with_dilation=[False, False, True],
                   norm_layer=FrozenBatchNorm2d)  # fmt: skip
    if weights_backbone is not None:
        load_torchvision_state_dict(body, weights_backbone, load_fc=False)
    for name, parameter in body.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    body.avgpool, body.fc = nn.Identity(), nn.Identity()  # unused: keep no classifier weights
    backbone = RFCNBackbone(body, head_channels)
    return RFCN(backbone, num_classes, deformable_head=ps_roi_pool == "deform", **rfcn_kwargs)


def _builder(arch: str, name: str):
    def build(
        *,
        num_classes: int,
        deform_stages: Iterable[int] = (5,),
        modulated: bool = False,
        ps_roi_pool: str = "deform",
        weights_backbone: Mapping[str, torch.Tensor] | None = None,
        trainable_backbone_layers: int = 3,
        offset_groups: int = 1,
        head_channels: Optional[int] = None,
        **rfcn_kwargs,
    ) -> RFCN:
        return _rfcn(name, arch, num_classes=num_classes, deform_stages=deform_stages,
                     modulated=modulated, ps_roi_pool=ps_roi_pool,
                     weights_backbone=weights_backbone,
                     trainable_backbone_layers=trainable_backbone_layers,
                     offset_groups=offset_groups, head_channels=head_channels,
                     rfcn_kwargs=rfcn_kwargs)  # fmt: skip

    build.__name__ = build.__qualname__ = name
    title = arch.replace("resnet", "ResNet-")
    channels = _ARCHS[arch][1]
    build.__doc__ = f"""Deformable R-FCN (DCNv1): a {title}, dilated conv5, torchvision's pipeline.

    The model is an :class:`RFCN` (a torchvision ``GeneralizedRCNN``): in training
    ``model(images, targets)`` returns torchvision's loss dict (``loss_classifier``,
    ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``), in eval mode ``model(images)``
    a list of dicts with ``boxes``, ``labels`` and ``scores``. Single feature map at stride 16;
    see :mod:`deformable.models.detection.rfcn` for the design. Nothing is downloaded.

    Args:
        num_classes (int): classes, background included.
        deform_stages (Sequence[int]): deformable stages of the backbone, from 2..5; each must
            be trainable. Default: ``(5,)`` (DCNv1: conv5).
        modulated (bool): DCNv2 convs (offsets and masks) instead of DCNv1's. Default: False.
        ps_roi_pool (str): ``"deform"`` (deformable PS RoI pooling, DCNv1) or ``"align"``
            (torchvision's ``ps_roi_align``, plain R-FCN). Default: ``"deform"``.
        weights_backbone (Mapping[str, Tensor], optional): a torchvision {title} state dict (the
            classifier is ignored). Default: None.
        trainable_backbone_layers (int): 0..5 backbone stages that train, from ``layer4`` down.
            Default: 3.
        offset_groups (int): offset groups of each deformable conv. Default: 1.
        head_channels (int, optional): channels of the 1x1 "new conv" that the RPN and the head
            read. Default: {channels}.
        **rfcn_kwargs: keyword arguments of :class:`RFCN` (``min_size``, ``head_output_size``,
            ``rpn_batch_size_per_image``, ...); an unknown name is a TypeError.

    Raises:
        ValueError: ``ps_roi_pool`` not one of {PS_ROI_POOLS}, ``deform_stages`` outside 2..5 or
            frozen, ``num_classes`` < 2.
        TypeError: an unknown keyword argument.

    Example:
        >>> model = {name}(num_classes=3, min_size=128, max_size=128).eval()
        >>> sorted(model([torch.rand(3, 128, 128)])[0])
        ['boxes', 'labels', 'scores']
    """
    return build


rfcn_resnet50 = _builder("resnet50", "rfcn_resnet50")
rfcn_resnet18 = _builder("resnet18", "rfcn_resnet18")
