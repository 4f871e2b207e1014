"""DeepLabV3 (torchvision's) on a dilated deformable ResNet: the DCNv1 paper's DeepLab setting.

The backbone is :class:`deformable.models.DeformResNet` with the strides of ``layer3`` and
``layer4`` replaced by dilation (output stride 8, as torchvision's DeepLabV3), or of ``layer4``
alone (output stride 16, as DCNv1's DeepLab, which dilates conv5 only), so the deformable layers
of those stages are dilated too: their regular grid, and that of their offset branch, is spread
by the dilation, and the learned offsets move each tap from there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

from deformable.models.resnet import DeformResNet, load_torchvision_state_dict, resnet18, resnet50

__all__ = ["deeplabv3_resnet50", "deeplabv3_resnet18"]


#: the ASPP rates of DeepLabV3 (Chen et al. 2017) at each output stride
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


def _deeplabv3(builder, where: str, *, num_classes, deform_stages, modulated, offset_groups,
               aux_loss, weights_backbone, output_stride, atrous_rates) -> DeepLabV3:  # fmt: skip
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{where}: num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(aux_loss, bool):
        raise TypeError(f"{where}: aux_loss must be a bool, got {aux_loss!r}")
    if isinstance(output_stride, bool) or output_stride not in (8, 16):
        raise ValueError(f"{where}: output_stride must be 8 or 16, got {output_stride!r}")
    if atrous_rates is None:
        atrous_rates = ATROUS_RATES[output_stride]
    if (isinstance(atrous_rates, (str, bytes)) or not isinstance(atrous_rates, Sequence) or not atrous_rates
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in atrous_rates)):  # fmt: skip
        raise ValueError(f"{where}: atrous_rates must be a non-empty sequence of positive ints, "
                         f"got {atrous_rates!r}")  # fmt: skip
    backbone: DeformResNet = builder(deform_stages=deform_stages, modulated=modulated,
                                     offset_groups=offset_groups,
                                     replace_stride_with_dilation=[False, output_stride == 8, True])  # fmt: skip
    if weights_backbone is not None:
        load_torchvision_state_dict(backbone, weights_backbone, load_fc=False)
    channels = {info["module"]: info["num_chs"] for info in backbone.feature_info}
    return_layers = {"layer4": "out"}
    if aux_loss:
        return_layers["layer3"] = "aux"
    feature_info = [dict(info, module="backbone." + info["module"])
                    for info in backbone.feature_info]  # fmt: skip
    body = IntermediateLayerGetter(backbone, return_layers=return_layers)
    classifier = DeepLabHead(channels["layer4"], num_classes, atrous_rates=tuple(atrous_rates))
    aux_classifier = FCNHead(channels["layer3"], num_classes) if aux_loss else None
    model = DeepLabV3(body, classifier, aux_classifier)
    model.feature_info = feature_info
    return model


def deeplabv3_resnet50(
    *,
    num_classes: int,
    deform_stages: Iterable[int] = (5,),
    modulated: bool = False,
    offset_groups: int = 1,
    aux_loss: bool = False,
    weights_backbone: Mapping[str, torch.Tensor] | None = None,
    output_stride: int = 8,
    atrous_rates: Sequence[int] | None = None,
) -> DeepLabV3:
    """torchvision's DeepLabV3 with a (dilated) deformable ResNet-50 backbone.

    The model is ``torchvision.models.segmentation.DeepLabV3``: ``model(images)`` returns
    ``{"out": Tensor[N, num_classes, H, W]}`` (plus ``"aux"`` with ``aux_loss=True``) at the
    input's size. At output stride 8 ``layer3`` and ``layer4`` are dilated (2 and 4) instead of
    strided, as in torchvision; at 16 ``layer4`` alone (2). ``model.feature_info`` lists the
    backbone's feature maps (module names under ``backbone.``; reductions 2, 4, 8, 8, 8 at
    output stride 8, 2, 4, 8, 16, 16 at 16).

    Args:
        num_classes (int): classes of the segmentation head (background included).
        deform_stages (Sequence[int]): deformable stages of the backbone, from 2..5
            (= ``layer1``..``layer4``). Default: ``(5,)`` (DCNv1's DeepLab: conv5).
        modulated (bool): DCNv2 layers (offsets and masks). Default: False.
        offset_groups (int): offset groups of each deformable layer. Default: 1.
        aux_loss (bool): add torchvision's auxiliary FCN head on ``layer3``. Default: False.
        weights_backbone (Mapping[str, Tensor], optional): a torchvision ResNet-50 state dict
            (e.g. ``torchvision.models.resnet50().state_dict()`` with ImageNet weights; the
            classifier is ignored). Nothing is downloaded. Default: None.
        output_stride (int): 8 (torchvision's DeepLabV3) or 16 (DCNv1's DeepLab; a quarter of
            the work in ``layer3``, ``layer4`` and the head). Default: 8.
        atrous_rates (Sequence[int], optional): dilations of the ASPP's 3x3 branches. Default:
            DeepLabV3's for the output stride, ``(12, 24, 36)`` at 8 and ``(6, 12, 18)`` at 16
            (made for crops of ~500 pixels: scale them down with the image).

    Example:
        >>> model = deeplabv3_resnet50(num_classes=3).eval()
        >>> model(torch.rand(1, 3, 33, 47))["out"].shape
        torch.Size([1, 3, 33, 47])
    """
    return _deeplabv3(resnet50, "deeplabv3_resnet50", num_classes=num_classes,
                      deform_stages=deform_stages, modulated=modulated,
                      offset_groups=offset_groups, aux_loss=aux_loss,
                      weights_backbone=weights_backbone, output_stride=output_stride,
                      atrous_rates=atrous_rates)  # fmt: skip


def deeplabv3_resnet18(
    *,
    num_classes: int,
    deform_stages: Iterable[int] = (5,),
    modulated: bool = False,
    offset_groups: int = 1,
    aux_loss: bool = False,
    weights_backbone: Mapping[str, torch.Tensor] | None = None,
    output_stride: int = 8,
    atrous_rates: Sequence[int] | None = None,
) -> DeepLabV3:
    """:func:`deeplabv3_resnet50` on a ResNet-18, for CPU-scale experiments (not in torchvision).

    torchvision's ``BasicBlock`` refuses dilation; here, as torchvision does for ``Bottleneck``,
    the conv of a dilated stage that held its stride (the first block's first conv) keeps the
    previous dilation and every later 3x3 conv of the stage takes the stage's dilation (2 in
    ``layer3``, 4 in ``layer4``). The head reads 512 channels (the auxiliary head 256).
    ``weights_backbone`` takes a torchvision ResNet-18 state dict.

    Args:
        num_classes, deform_stages, modulated, offset_groups, aux_loss, weights_backbone,
        output_stride, atrous_rates: as :func:`deeplabv3_resnet50`.

    Example:
        >>> model = deeplabv3_resnet18(num_classes=2, aux_loss=True).eval()
        >>> {k: tuple(v.shape) for k, v in model(torch.rand(1, 3, 32, 32)).items()}
        {'out': (1, 2, 32, 32), 'aux': (1, 2, 32, 32)}
    """
    return _deeplabv3(resnet18, "deeplabv3_resnet18", num_classes=num_classes,
                      deform_stages=deform_stages, modulated=modulated,
                      offset_groups=offset_groups, aux_loss=aux_loss,
                      weights_backbone=weights_backbone, output_stride=output_stride,
                      atrous_rates=atrous_rates)  # fmt: skip
