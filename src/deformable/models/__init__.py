"""Networks built on :mod:`deformable.nn`: ResNets with a per-stage deformable switch (loading
torchvision's weights), an FPN backbone, Faster / Mask R-CNN and R-FCN with deformable heads
(:mod:`deformable.models.detection`) and DeepLabV3 (:mod:`deformable.models.segmentation`)."""

from deformable.models import detection, segmentation
from deformable.models.resnet import (
    DeformResNet,
    load_torchvision_state_dict,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet_fpn_backbone,
)

__all__ = [
    "DeformResNet",
    "detection",
    "load_torchvision_state_dict",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet_fpn_backbone",
    "segmentation",
]
