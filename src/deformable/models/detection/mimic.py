"""R-CNN feature mimicking (DCNv2 §3.3): a training-only branch that pulls the detector's per-RoI
features toward those of the same RoI cropped from the image and seen on its own.

At training time, up to ``rois_per_image`` foreground RoIs of each image are taken from the RoIs
the box head sampled; each is cropped from the (transformed, normalised) input image and resized
to ``crop_size x crop_size``; the crops go through the detector's own backbone and RoI head
(weights shared, as in the paper's figure 3), pooled over the whole crop, giving ``f_rcnn``.
The detector's features of the same RoIs are ``f_frcnn``. Two losses are added to torchvision's
loss dict:

- ``loss_mimic = mimic_weight * reduce(1 - cos(f_rcnn, f_frcnn))``
- ``loss_rcnn_cls = cls_weight * cross_entropy(cls_score(f_rcnn), labels)``, with the detector's
  own classifier ``box_predictor.cls_score`` (the R-CNN classifier of the paper's figure 3 shares
  the detector's weights here, like the backbone and the 2fc head).

The crops go through the backbone in training mode; with the builders' frozen batch norms
(``FrozenBatchNorm2d``, torchvision's default for detectors) they change no statistics.

Nothing of it runs in eval mode: :class:`MimicFasterRCNN` and :class:`MimicMaskRCNN` call
torchvision's forward unchanged there, so inference costs what it costs without mimicking.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import roi_align

from deformable.models.detection._checks import check_kwargs

__all__ = ["FeatureMimicking", "SampledRoIHeads", "MimicFasterRCNN", "MimicMaskRCNN"]

_REDUCTIONS = ("mean", "sum")


class FeatureMimicking(nn.Module):
    """The settings and the losses of R-CNN feature mimicking; has no parameters of its own.

    Pass an instance as ``mimic=`` to the detection builders (``mimic=True`` uses the defaults).

    Reduction: the paper writes the mimic loss as a sum over the sampled positive RoIs. With
    ``reduction="mean"`` (the default) the sum is divided by the number of RoIs mimicked, so the
    loss has the scale of torchvision's other losses (which are averages over RoIs) and the 0.1
    weight means the same whatever the batch and ``rois_per_image``; ``reduction="sum"`` gives
    the paper's plain sum. The R-CNN classification loss is always the mean cross-entropy, as
    torchvision's ``loss_classifier``.

    Args:
        crop_size (int): side of the square crops fed to the backbone. Default: 224 (the paper);
            a smaller size makes the branch cheap enough for CPU tests.
        rois_per_image (int): at most this many foreground RoIs per image are mimicked, chosen at
            random among the box head's sampled positives. Default: 32 (the paper).
        mimic_weight (float): weight of ``loss_mimic``. Default: 0.1.
        cls_weight (float): weight of ``loss_rcnn_cls``. Default: 0.1.
        reduction (str): ``"mean"`` or ``"sum"`` over the mimicked RoIs (see above).
            Default: ``"mean"``.
        sampling_ratio (int): bilinear samples per output pixel and axis when cropping (as in
            RoIAlign; 2 averages a little when a large RoI is shrunk). Default: 2.

    Example:
        >>> mimic = FeatureMimicking(crop_size=64, rois_per_image=4)
        >>> mimic.crop_size, mimic.rois_per_image, mimic.mimic_weight, mimic.reduction
        (64, 4, 0.1, 'mean')
    """

    def __init__(
        self,
        *,
        crop_size: int = 224,
        rois_per_image: int = 32,
        mimic_weight: float = 0.1,
        cls_weight: float = 0.1,
        reduction: str = "mean",
        sampling_ratio: int = 2,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        for name, value in (("crop_size", crop_size), ("rois_per_image", rois_per_image),
                            ("sampling_ratio", sampling_ratio)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        for name, value in (("mimic_weight", mimic_weight), ("cls_weight", cls_weight)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}: {name} must be a number >= 0, got {value!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{where}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.crop_size = crop_size
        self.rois_per_image = rois_per_image
        self.mimic_weight = float(mimic_weight)
        self.cls_weight = float(cls_weight)
        self.reduction = reduction
        self.sampling_ratio = sampling_ratio

    def select(self, proposals: list[Tensor], labels: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """The RoIs to mimic: up to ``rois_per_image`` random foreground RoIs of each image.

        Returns:
            (List[Tensor[L_i, 4]], Tensor[sum L_i]): the boxes per image and their labels.
        """
        boxes, chosen_labels = [], []
        for image_proposals, image_labels in zip(proposals, labels):
            positive = torch.where(image_labels > 0)[0]
            if positive.numel() > self.rois_per_image:
                keep = torch.randperm(positive.numel(), device=positive.device)
                positive = positive[keep[: self.rois_per_image]]
            boxes.append(image_proposals[positive].detach())
            chosen_labels.append(image_labels[positive])
        return boxes, torch.cat(chosen_labels)

    def crops(self, images: Tensor, boxes: list[Tensor]) -> Tensor:
        """``boxes`` (image pixels, ``x1, y1, x2, y2``) cut from ``images`` and resized:
        ``[sum L_i, C, crop_size, crop_size]``."""
        with torch.no_grad():
            return roi_align(images, [b.to(images.dtype) for b in boxes], self.crop_size,
                             spatial_scale=1.0, sampling_ratio=self.sampling_ratio,
                             aligned=True)  # fmt: skip

    def forward(
        self,
        *,
        images: Tensor,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        labels: list[Tensor],
        image_shapes: list[tuple[int, int]],
        backbone: nn.Module,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        cls_score: nn.Module,
    ) -> dict[str, Tensor]:
        """``{"loss_mimic", "loss_rcnn_cls"}`` for one training batch.

        Args:
            images (Tensor[N, C, H, W]): the transformed batch the detector saw.
            features (Dict[str, Tensor]): the backbone's feature maps of ``images``.
            proposals (List[Tensor[L_i, 4]]): the RoIs the box head sampled, per image.
            labels (List[Tensor[L_i]]): their labels (0 = background).
            image_shapes (List[Tuple[int, int]]): the images' sizes before batching.
            backbone, box_roi_pool, box_head (nn.Module): the detector's.
            cls_score (nn.Module): the detector's classifier, features → class logits.
        """
        boxes, targets = self.select(proposals, labels)
        count = targets.numel()
        if count == 0:
            zero = images.new_zeros(())
            return {"loss_mimic": zero, "loss_rcnn_cls": zero.clone()}
        f_frcnn = box_head(box_roi_pool(features, boxes, image_shapes))

        size = self.crop_size
        crop_features = backbone(self.crops(images, boxes))
        if isinstance(crop_features, Tensor):
            crop_features = {"0": crop_features}
        whole = images.new_tensor([[0.0, 0.0, size, size]])
        f_rcnn = box_head(box_roi_pool(crop_features, [whole] * count, [(size, size)] * count))

        distance = 1.0 - F.cosine_similarity(f_rcnn.flatten(1), f_frcnn.flatten(1), dim=1)
        mimic = distance.sum() if self.reduction == "sum" else distance.mean()
        rcnn_cls = F.cross_entropy(cls_score(f_rcnn.flatten(1)), targets)
        return {"loss_mimic": self.mimic_weight * mimic,
                "loss_rcnn_cls": self.cls_weight * rcnn_cls}  # fmt: skip

    def extra_repr(self) -> str:
        return (f"crop_size={self.crop_size}, rois_per_image={self.rois_per_image}, "
                f"mimic_weight={self.mimic_weight}, cls_weight={self.cls_weight}, "
                f"reduction={self.reduction!r}")  # fmt: skip


class SampledRoIHeads(RoIHeads):
    """torchvision's :class:`~torchvision.models.detection.roi_heads.RoIHeads` that, in training,
    keeps what feature mimicking needs: the feature maps it was given and the RoIs (with labels)
    it sampled. Everything it computes and returns is torchvision's.

    ``pop_training_batch()`` hands them over once and forgets them (no feature map outlives the
    step). Same parameters and state-dict keys as the ``RoIHeads`` it is made from
    (:meth:`from_roi_heads`).
    """

    _training_batch: Optional[dict]

    @classmethod
    def from_roi_heads(cls, heads: RoIHeads) -> "SampledRoIHeads":
        """A ``SampledRoIHeads`` with the modules and settings of ``heads`` (shared, not copied)."""
        new = cls(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            fg_iou_thresh=heads.proposal_matcher.high_threshold,
            bg_iou_thresh=heads.proposal_matcher.low_threshold,
            batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
            positive_fraction=heads.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=heads.box_coder.weights,
            score_thresh=heads.score_thresh, nms_thresh=heads.nms_thresh,
            detections_per_img=heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head,
            mask_predictor=heads.mask_predictor,
            keypoint_roi_pool=heads.keypoint_roi_pool, keypoint_head=heads.keypoint_head,
            keypoint_predictor=heads.keypoint_predictor,
        )  # fmt: skip
        matcher = heads.proposal_matcher
        new.proposal_matcher.allow_low_quality_matches = matcher.allow_low_quality_matches
        new.box_coder.bbox_xform_clip = heads.box_coder.bbox_xform_clip
        return new

    def __init__(self, *args, **kwargs) -> None:  # RoIHeads' arguments, unchanged
        super().__init__(*args, **kwargs)
        self._training_batch = None

    def forward(self, features, proposals, image_shapes, targets=None):
        self._training_batch = dict(features=features, image_shapes=image_shapes) \
            if self.training else None  # fmt: skip
        return super().forward(features, proposals, image_shapes, targets)

    def select_training_samples(self, proposals, targets):
        sampled = super().select_training_samples(proposals, targets)
        if self._training_batch is not None:
            self._training_batch.update(proposals=sampled[0], labels=sampled[2])
        return sampled

    def pop_training_batch(self) -> dict:
        """``features``, ``image_shapes``, ``proposals``, ``labels`` of the last training step."""
        batch, self._training_batch = self._training_batch, None
        if batch is None or "labels" not in batch:
            raise RuntimeError("SampledRoIHeads: no training batch recorded (call it in training "
                               "mode with targets first)")  # fmt: skip
        return batch


class _MimickingMixin:
    """The training forward of a torchvision two-stage detector plus feature mimicking."""

    mimic: FeatureMimicking
    roi_heads: SampledRoIHeads

    def _init_mimic(self, mimic: FeatureMimicking) -> None:
        if not isinstance(mimic, FeatureMimicking):
            raise TypeError(f"{type(self).__name__}: mimic must be a FeatureMimicking, got "
                            f"{type(mimic).__name__}")  # fmt: skip
        if not hasattr(self.roi_heads.box_predictor, "cls_score"):
            raise TypeError(f"{type(self).__name__}: feature mimicking needs a box_predictor with "
                            f"a cls_score layer (torchvision's FastRCNNPredictor)")  # fmt: skip
        self.roi_heads = SampledRoIHeads.from_roi_heads(self.roi_heads)
        self.mimic = mimic

    def forward(self, images, targets=None):
        if not self.training:
            return super().forward(images, targets)  # inference: torchvision's, untouched
        transformed: list[ImageList] = []
        # The transformed batch exists only inside torchvision's forward; catch it on its way out
        # of the transform for the duration of this call.
        handle = self.transform.register_forward_hook(
            lambda module, args, output: transformed.append(output[0]))  # fmt: skip
        try:
            losses = super().forward(images, targets)
        finally:
            handle.remove()
        batch = self.roi_heads.pop_training_batch()
        losses.update(self.mimic(
            images=transformed[0].tensors, features=batch["features"],
            proposals=batch["proposals"], labels=batch["labels"],
            image_shapes=batch["image_shapes"], backbone=self.backbone,
            box_roi_pool=self.roi_heads.box_roi_pool, box_head=self.roi_heads.box_head,
            cls_score=self.roi_heads.box_predictor.cls_score,
        ))  # fmt: skip
        return losses


class MimicFasterRCNN(_MimickingMixin, FasterRCNN):
    """torchvision's :class:`~torchvision.models.detection.FasterRCNN` trained with R-CNN feature
    mimicking (see :mod:`deformable.models.detection.mimic`).

    In training, the loss dict gets ``loss_mimic`` and ``loss_rcnn_cls`` besides torchvision's;
    in eval mode the model is torchvision's FasterRCNN (same outputs, same cost). The state dict
    is a plain FasterRCNN's.

    Args:
        backbone (nn.Module): as FasterRCNN's.
        mimic (FeatureMimicking): the mimicking settings.
        **kwargs: FasterRCNN's keyword arguments (``num_classes``, ``min_size``, ...), passed on;
            an unknown name is a TypeError.
    """

    def __init__(self, backbone: nn.Module, *, mimic: FeatureMimicking, **kwargs) -> None:
        check_kwargs(type(self).__name__, FasterRCNN, kwargs, {"backbone": "pass it first"})
        FasterRCNN.__init__(self, backbone, **kwargs)
        self._init_mimic(mimic)


class MimicMaskRCNN(_MimickingMixin, MaskRCNN):
    """torchvision's :class:`~torchvision.models.detection.MaskRCNN` trained with R-CNN feature
    mimicking on its box branch; see :class:`MimicFasterRCNN`.

    Args:
        backbone (nn.Module): as MaskRCNN's.
        mimic (FeatureMimicking): the mimicking settings.
        **kwargs: MaskRCNN's keyword arguments, passed on; an unknown name is a TypeError.
    """

    def __init__(self, backbone: nn.Module, *, mimic: FeatureMimicking, **kwargs) -> None:
        check_kwargs(type(self).__name__, MaskRCNN, kwargs, {"backbone": "pass it first"})
        MaskRCNN.__init__(self, backbone, **kwargs)
        self._init_mimic(mimic)
