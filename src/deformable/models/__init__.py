"""Networks built on :mod:`deformable.nn`: ResNets with a per-stage deformable switch (loading
torchvision's weights), an FPN backbone, Faster / Mask R-CNN and R-FCN with deformable heads
(:mod:`deformable.models.detection`), DeepLabV3 (:mod:`deformable.models.segmentation`), the
demo's DigitNet (:mod:`deformable.models.digitnet`), and the networks of training checkpoints
rebuilt from their description (:mod:`deformable.models.build`)."""

from deformable.models import detection, segmentation
from deformable.models.digitnet import DigitNet
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
    "DigitNet",
    "detection",
    "load_torchvision_state_dict",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet_fpn_backbone",
    "segmentation",
]
