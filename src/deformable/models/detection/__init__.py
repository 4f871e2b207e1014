"""Detectors in torchvision's detection API with deformable backbones and RoI heads.

- :func:`fasterrcnn_resnet50_fpn`, :func:`maskrcnn_resnet50_fpn` (and ResNet-18 variants for
  CPU-scale work): torchvision's Faster / Mask R-CNN on a deformable ResNet-FPN, with RoIAlign,
  deformable or modulated deformable RoI pooling in the box head (DCNv1 / DCNv2).
- :class:`FeatureMimicking`: R-CNN feature mimicking (DCNv2 §3.3), a training-only branch
  enabled with ``mimic=`` in those builders (:class:`MimicFasterRCNN`, :class:`MimicMaskRCNN`).
- :func:`rfcn_resnet50`, :func:`rfcn_resnet18`: deformable R-FCN (DCNv1) with deformable
  position-sensitive RoI pooling, on torchvision's RPN, losses and post-processing.
"""

from deformable.models.detection.faster_rcnn import (
    ROI_POOLS,
    box_roi_pool,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet50_fpn,
    maskrcnn_resnet18_fpn,
    maskrcnn_resnet50_fpn,
)
from deformable.models.detection.mimic import (
    FeatureMimicking,
    MimicFasterRCNN,
    MimicMaskRCNN,
    SampledRoIHeads,
)
from deformable.models.detection.rfcn import (
    PS_ROI_POOLS,
    RFCN,
    RFCNBackbone,
    RFCNHead,
    RFCNRoIHeads,
    rfcn_resnet18,
    rfcn_resnet50,
)

__all__ = [
    "ROI_POOLS",
    "PS_ROI_POOLS",
    "box_roi_pool",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet18_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet18_fpn",
    "FeatureMimicking",
    "MimicFasterRCNN",
    "MimicMaskRCNN",
    "SampledRoIHeads",
    "RFCN",
    "RFCNBackbone",
    "RFCNHead",
    "RFCNRoIHeads",
    "rfcn_resnet50",
    "rfcn_resnet18",
]
