"""Faster / Mask R-CNN (torchvision's) on a deformable ResNet-FPN, with deformable RoI pooling.

The models are ``torchvision.models.detection.FasterRCNN`` / ``MaskRCNN``: same transform,
RPN, losses, post-processing, input and output format. What changes:

- the backbone is :func:`deformable.models.resnet_fpn_backbone`: a ResNet with deformable
  (DCNv1) or modulated deformable (DCNv2) 3x3 convs in ``deform_stages``, under torchvision's
  FPN;
- the box head's RoI pooling (``roi_heads.box_roi_pool``, feeding torchvision's 2fc
  ``TwoMLPHead``) is torchvision's ``MultiScaleRoIAlign`` (``roi_pool="align"``), or a
  :class:`deformable.nn.MultiScaleDeformRoIPool`: deformable RoI pooling (``"deform"``, DCNv1)
  or modulated deformable RoI pooling (``"mdeform"``, DCNv2), one fc offset branch shared by
  the FPN levels;
- with ``mimic``, the model is a :class:`~deformable.models.detection.mimic.MimicFasterRCNN` /
  ``MimicMaskRCNN`` that adds R-CNN feature mimicking losses in training (DCNv2 §3.3).

Mask R-CNN's mask head keeps torchvision's ``MultiScaleRoIAlign(14)``: DCNv2 makes the box
head's pooling deformable, and the mask head pools the boxes the box head refined. (Pass your
own ``mask_roi_pool`` through the keyword arguments to change its settings.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import MultiScaleRoIAlign

from deformable.models.detection._checks import check_choice, check_kwargs, check_num_classes
from deformable.models.detection.mimic import FeatureMimicking, MimicFasterRCNN, MimicMaskRCNN
from deformable.models.resnet import resnet_fpn_backbone
from deformable.nn import MultiScaleDeformRoIPool

__all__ = [
    "ROI_POOLS",
    "box_roi_pool",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet18_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet18_fpn",
]

#: Values of ``roi_pool``: torchvision's RoIAlign, deformable RoI pooling v1, modulated (v2).
ROI_POOLS = ("align", "deform", "mdeform")

_FEATMAPS = ["0", "1", "2", "3"]  # the FPN levels torchvision's box head pools from (P2..P5)


def box_roi_pool(
    roi_pool: str,
    *,
    in_channels: int = 256,
    output_size: int = 7,
    sampling_ratio: int = 2,
    hidden_channels: int = 1024,
) -> Union[MultiScaleRoIAlign, MultiScaleDeformRoIPool]:
    """The multi-level RoI pooling of the box head, as torchvision's FPN detectors configure it.

    Args:
        roi_pool (str): ``"align"`` (``torchvision.ops.MultiScaleRoIAlign``), ``"deform"``
            (deformable RoI pooling, DCNv1) or ``"mdeform"`` (modulated, DCNv2).
        in_channels (int): channels of the FPN maps (for the offset branch). Default: 256.
        output_size (int): bins per RoI and side. Default: 7.
        sampling_ratio (int): samples per bin and axis. Default: 2.
        hidden_channels (int): width of the offset branch's hidden fc layers. Default: 1024.

    Example:
        >>> box_roi_pool("mdeform").pool.modulated
        True
    """
    check_choice("box_roi_pool", "roi_pool", roi_pool, ROI_POOLS)
    if roi_pool == "align":
        return MultiScaleRoIAlign(featmap_names=_FEATMAPS, output_size=output_size,
                                  sampling_ratio=sampling_ratio)  # fmt: skip
    return MultiScaleDeformRoIPool(_FEATMAPS, output_size, sampling_ratio, in_channels=in_channels,
                                   hidden_channels=hidden_channels,
                                   modulated=roi_pool == "mdeform")  # fmt: skip


_RESERVED = {
    "backbone": "built from deform_stages, modulated and weights_backbone",
    "box_roi_pool": "choose it with roi_pool",
    "box_head": "torchvision's TwoMLPHead; build FasterRCNN / MaskRCNN yourself for another",
    "box_predictor": "made for num_classes; build FasterRCNN / MaskRCNN yourself for another",
}


def _mimic_settings(where: str, mimic) -> FeatureMimicking | None:
    if mimic is True:
        return FeatureMimicking()
    if mimic is False or mimic is None:
        return None
    if isinstance(mimic, FeatureMimicking):
        return mimic
    raise TypeError(f"{where}: mimic must be a bool or a FeatureMimicking, got {mimic!r}")


def _rcnn(where: str, arch: str, with_masks: bool, *, num_classes, deform_stages, modulated,
          roi_pool, mimic, weights_backbone, trainable_backbone_layers, offset_groups,
          torchvision_kwargs) -> FasterRCNN:  # fmt: skip
    cls = MaskRCNN if with_masks else FasterRCNN
    check_num_classes(where, num_classes)
    check_choice(where, "roi_pool", roi_pool, ROI_POOLS)
    check_kwargs(where, cls, torchvision_kwargs, _RESERVED)
    settings = _mimic_settings(where, mimic)
    backbone = resnet_fpn_backbone(arch, deform_stages=deform_stages, modulated=modulated,
                                   offset_groups=offset_groups,
                                   trainable_layers=trainable_backbone_layers,
                                   weights_state_dict=weights_backbone)  # fmt: skip
    if settings is None:
        model = cls(backbone, num_classes=num_classes, **torchvision_kwargs)
    else:
        mimic_cls = MimicMaskRCNN if with_masks else MimicFasterRCNN
        model = mimic_cls(backbone, mimic=settings, num_classes=num_classes, **torchvision_kwargs)
    # torchvision's constructors accept only a MultiScaleRoIAlign, so the pooler is swapped in
    # afterwards; TwoMLPHead sees the same [K, 256, 7, 7] features either way.
    model.roi_heads.box_roi_pool = box_roi_pool(roi_pool, in_channels=backbone.out_channels)
    return model


def _builder(arch: str, with_masks: bool, name: str):
    def build(
        *,
        num_classes: int,
        deform_stages: Iterable[int] = (3, 4, 5),
        modulated: bool = True,
        roi_pool: str = "mdeform",
        mimic: Union[bool, FeatureMimicking] = False,
        weights_backbone: Mapping[str, torch.Tensor] | None = None,
        trainable_backbone_layers: int = 3,
        offset_groups: int = 1,
        **torchvision_kwargs: Any,
    ) -> FasterRCNN:
        return _rcnn(name, arch, with_masks, num_classes=num_classes,
                     deform_stages=deform_stages, modulated=modulated, roi_pool=roi_pool,
                     mimic=mimic, weights_backbone=weights_backbone,
                     trainable_backbone_layers=trainable_backbone_layers,
                     offset_groups=offset_groups,
                     torchvision_kwargs=torchvision_kwargs)  # fmt: skip

    build.__name__ = build.__qualname__ = name
    title = arch.replace("resnet", "ResNet-")
    detector = "MaskRCNN" if with_masks else "FasterRCNN"
    mimic_cls = "MimicMaskRCNN" if with_masks else "MimicFasterRCNN"
    outputs = "``boxes``, ``labels``, ``scores`` and ``masks``" if with_masks else \
        "``boxes``, ``labels`` and ``scores``"  # fmt: skip
    losses = ("``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``, "
              "``loss_rpn_box_reg``") if with_masks else (
              "``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, "
              "``loss_rpn_box_reg``")  # fmt: skip
    cost = "" if arch != "resnet18" else (
        "\n    The ResNet-18 variant is for CPU-scale experiments and tests; its FPN has"
        "\n    torchvision's 256 channels, like the ResNet-50 one.\n")  # fmt: skip
    build.__doc__ = f"""torchvision's {detector}: deformable {title}-FPN, deformable RoI pooling.

    The model is a ``torchvision.models.detection.{detector}`` (a ``{mimic_cls}`` subclass of
    it with ``mimic``). In training, ``model(images, targets)`` returns torchvision's loss dict,
    {losses}
    (plus ``loss_mimic`` and ``loss_rcnn_cls`` with ``mimic``); in eval mode, ``model(images)``
    returns a list of dicts with {outputs}.

    The defaults are DCNv2's: modulated deformable convs in conv3-conv5 and modulated deformable
    RoI pooling. The backbone's batch norms are frozen (``FrozenBatchNorm2d``), as in
    torchvision's detectors. Nothing is downloaded.
{cost}
    Args:
        num_classes (int): classes, background included.
        deform_stages (Sequence[int]): deformable stages of the backbone, from 2..5
            (= ``layer1``..``layer4``); each must be trainable. Default: ``(3, 4, 5)``.
        modulated (bool): the backbone's deformable convs are DCNv2's (offsets and masks), else
            DCNv1's. Default: True.
        roi_pool (str): RoI pooling of the box head: ``"align"`` (torchvision's
            ``MultiScaleRoIAlign``), ``"deform"`` (deformable RoI pooling, DCNv1) or
            ``"mdeform"`` (modulated deformable RoI pooling, DCNv2). Default: ``"mdeform"``.
        mimic (bool or FeatureMimicking): train with R-CNN feature mimicking (DCNv2 §3.3);
            ``True`` for the paper's settings (224x224 crops, 32 RoIs per image, weights 0.1),
            or a :class:`~deformable.models.detection.FeatureMimicking` with others. Training
            only. Default: False.
        weights_backbone (Mapping[str, Tensor], optional): a torchvision {title} state dict
            (e.g. ``torchvision.models.{arch}(weights=...).state_dict()``; the classifier is
            ignored), loaded into the backbone before freezing. Default: None.
        trainable_backbone_layers (int): 0..5 backbone stages that train, from ``layer4`` down,
            as torchvision's. Default: 3.
        offset_groups (int): offset groups of each deformable conv. Default: 1.
        **torchvision_kwargs: keyword arguments of ``{detector}`` (``min_size``,
            ``rpn_batch_size_per_image``, ``box_detections_per_img``, ...); an unknown name is a
            TypeError. ``backbone``, ``box_roi_pool``, ``box_head`` and ``box_predictor`` are the
            builder's.

    Raises:
        ValueError: ``roi_pool`` not one of {ROI_POOLS}, ``deform_stages`` outside
            2..5 or frozen, ``num_classes`` < 2.
        TypeError: an unknown keyword argument.

    Example:
        >>> model = {name}(num_classes=3, min_size=128, max_size=128).eval()
        >>> out = model([torch.rand(3, 128, 128)])
        >>> sorted(out[0])
        {sorted(["boxes", "labels", "scores"] + (["masks"] if with_masks else []))}
    """
    return build


fasterrcnn_resnet50_fpn = _builder("resnet50", False, "fasterrcnn_resnet50_fpn")
fasterrcnn_resnet18_fpn = _builder("resnet18", False, "fasterrcnn_resnet18_fpn")
maskrcnn_resnet50_fpn = _builder("resnet50", True, "maskrcnn_resnet50_fpn")
maskrcnn_resnet18_fpn = _builder("resnet18", True, "maskrcnn_resnet18_fpn")
