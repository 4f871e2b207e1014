"""Networks rebuilt from the plain-data description (``model_spec``) that a training checkpoint
stores, so that ``deformable eval`` and ``deformable explain`` can rebuild what was trained.

A classifier's spec: ``model`` (one of :data:`CLASSIFIERS`), ``num_classes``, and for the
ResNets ``deform_stages`` and ``modulated``. A detector's spec adds ``task: "detect"``,
``image_size``, ``roi_pool`` (one of :data:`ROI_POOLS`), ``mimic`` (and its crop size and RoIs
per image). A segmenter's spec: ``task: "segment"``, ``model`` (one of :data:`SEGMENTERS`),
``num_classes``, ``deform_stages``, ``modulated``, ``output_stride`` and ``atrous_rates``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["CLASSIFIERS", "DETECTORS", "DIGITNETS", "MASK_DETECTORS", "RESNETS", "ROI_POOLS",
           "SEGMENTERS", "build_classifier", "build_detector", "build_model", "build_segmenter"]

DIGITNETS = ("digitnet-regular", "digitnet-dcnv1", "digitnet-dcnv2", "digitnet-stn")
RESNETS = ("resnet18", "resnet34", "resnet50")
CLASSIFIERS = DIGITNETS + RESNETS
#: detectors that also predict instance masks (their data need masks)
MASK_DETECTORS = ("maskrcnn_resnet18_fpn", "maskrcnn_resnet50_fpn")
DETECTORS = ("fasterrcnn_resnet18_fpn", "fasterrcnn_resnet50_fpn", *MASK_DETECTORS, "rfcn_resnet18",
             "rfcn_resnet50")  # fmt: skip
ROI_POOLS = ("align", "deform", "mdeform")
SEGMENTERS = ("deeplabv3_resnet18", "deeplabv3_resnet50")


def build_classifier(spec: dict) -> nn.Module:
    """The classifier ``spec`` describes (a DigitNet variant or a deformable ResNet)."""
    name = spec["model"]
    if name in DIGITNETS:
        from deformable.models.digitnet import DigitNet

        return DigitNet(name.split("-")[1], num_classes=spec["num_classes"])
    if name not in RESNETS:
        raise ValueError(f"model_spec: model must be one of {CLASSIFIERS}, got {name!r}")
    from deformable import models

    return getattr(models, name)(deform_stages=tuple(spec["deform_stages"]), modulated=spec["modulated"],
                                 num_classes=spec["num_classes"])  # fmt: skip


def build_detector(spec: dict) -> nn.Module:
    """The detector ``spec`` describes, with CPU-scale proposal and RoI counts."""
    from deformable.models import detection

    if spec["model"] not in DETECTORS:
        raise ValueError(f"model_spec: model must be one of {DETECTORS}, got {spec['model']!r}")
    size = spec["image_size"]
    common = dict(num_classes=spec["num_classes"], deform_stages=tuple(spec["deform_stages"]),
                  modulated=spec["modulated"], min_size=size, max_size=size)  # fmt: skip
    if spec["model"].startswith("rfcn"):
        return getattr(detection, spec["model"])(**common)
    mimic = False
    if spec["mimic"]:
        # the paper's 224-pixel crops of 32 RoIs per image cost ~2.7x its backbone's pixels on
        # 1000x600 images; crops scaled to the image keep the ratio (64 / 8: 2x at 128x128)
        mimic = detection.FeatureMimicking(crop_size=spec.get("mimic_crop_size", 224),
                                           rois_per_image=spec.get("mimic_rois_per_image", 32))  # fmt: skip
    # CPU-scale settings: fewer proposals and sampled RoIs than torchvision's COCO defaults
    return getattr(detection, spec["model"])(
        **common, roi_pool=spec["roi_pool"], mimic=mimic, rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
        box_batch_size_per_image=128, box_detections_per_img=50)  # fmt: skip


def build_segmenter(spec: dict) -> nn.Module:
    """The DeepLabV3 ``spec`` describes."""
    from deformable.models import segmentation

    if spec["model"] not in SEGMENTERS:
        raise ValueError(f"model_spec: model must be one of {SEGMENTERS}, got {spec['model']!r}")
    rates = spec.get("atrous_rates")
    return getattr(segmentation, spec["model"])(
        num_classes=spec["num_classes"], deform_stages=tuple(spec["deform_stages"]),
        modulated=spec["modulated"], output_stride=spec.get("output_stride", 8),
        atrous_rates=None if rates is None else tuple(rates))  # fmt: skip


def build_model(spec: dict) -> nn.Module:
    """The network of any training checkpoint's spec (by its ``task``; classify by default)."""
    if spec.get("task") == "detect":
        return build_detector(spec)
    if spec.get("task") == "segment":
        return build_segmenter(spec)
    return build_classifier(spec)
