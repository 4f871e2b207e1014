"""Detectors on torchvision's API: Faster / Mask R-CNN with deformable backbones and RoI pooling,
R-CNN feature mimicking, deformable R-FCN. Two 128x128 images, ResNet-18 variants, small RPN."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import MultiScaleRoIAlign

from deformable.models import detection
from deformable.models.detection import (
    FeatureMimicking,
    MimicFasterRCNN,
    MimicMaskRCNN,
    RFCNHead,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet50_fpn,
    maskrcnn_resnet18_fpn,
    rfcn_resnet18,
    rfcn_resnet50,
)
from deformable.nn import DeformConv2d, DeformPSRoIPool, MultiScaleDeformRoIPool

SMALL = dict(min_size=128, max_size=128, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
             rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, rpn_batch_size_per_image=64,
             box_batch_size_per_image=32, box_detections_per_img=10)  # fmt: skip
TINY_MIMIC = dict(crop_size=64, rois_per_image=4)


def _batch(masks: bool = False):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(2)]
    targets = []
    for boxes, labels in (([[10.0, 20.0, 70.0, 90.0]], [1]),
                          ([[30.0, 30.0, 100.0, 110.0], [5.0, 5.0, 50.0, 40.0]],
                           [2, 1])):  # fmt: skip
        target = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}
        if masks:
            m = torch.zeros(len(boxes), 128, 128, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(target["boxes"].int().tolist()):
                m[i, y1:y2, x1:x2] = 1
            target["masks"] = m
        targets.append(target)
    return images, targets


def _deform_convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DeformConv2d)}


def _nonzero_grad(p) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def _check_losses(losses, expected_keys):
    assert isinstance(losses, dict) and set(losses) == set(expected_keys)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k


def _check_detections(out, masks: bool = False):
    assert isinstance(out, list) and len(out) == 2
    for d in out:
        keys = {"boxes", "labels", "scores"} | ({"masks"} if masks else set())
        assert set(d) == keys
        n = d["boxes"].shape[0]
        assert d["boxes"].shape == (n, 4)
        assert d["labels"].shape == d["scores"].shape == (n,)
        assert d["labels"].dtype == torch.int64
        if masks:
            assert d["masks"].shape == (n, 1, 128, 128)


RCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


# ---------------------------------------------------------------------------------------------
# Faster / Mask R-CNN


def _train_step(model, convs):
    """One training forward/backward on the tiny batch: torchvision's losses, finite, and a
    gradient in every backbone offset branch. Returns the batch."""
    images, targets = _batch()
    model.train()
    losses = model(images, targets)
    _check_losses(losses, RCNN_LOSSES)
    sum(losses.values()).backward()
    for name, conv in convs.items():
        assert _nonzero_grad(conv.conv_offset.weight), name
    return images, targets


@pytest.mark.parametrize("roi_pool", ["align", "deform", "mdeform"])
def test_fasterrcnn_smoke(roi_pool):
    model = fasterrcnn_resnet18_fpn(num_classes=3, roi_pool=roi_pool, **SMALL)
    assert type(model) is FasterRCNN
    pool = model.roi_heads.box_roi_pool
    if roi_pool == "align":
        assert type(pool) is MultiScaleRoIAlign
    else:
        assert isinstance(pool, MultiScaleDeformRoIPool)
        assert pool.pool.modulated == (roi_pool == "mdeform")
    convs = _deform_convs(model)
    assert len(convs) == 12 and all(c.modulated for c in convs.values())  # layer2..layer4

    images, targets = _train_step(model, convs)
    if roi_pool != "align":
        # the zero-initialised last fc of each branch gets gradient (its input is not zero)
        assert _nonzero_grad(pool.pool.offset_fc[4].weight)
        if roi_pool == "mdeform":
            assert _nonzero_grad(pool.pool.mask_fc[2].weight)

    model.eval()
    with torch.no_grad():
        _check_detections(model(images))


def test_maskrcnn_smoke():
    model = maskrcnn_resnet18_fpn(num_classes=3, deform_stages=(4, 5), modulated=False,
                                  roi_pool="deform", **SMALL)  # fmt: skip
    assert type(model) is MaskRCNN
    assert type(model.roi_heads.mask_roi_pool) is MultiScaleRoIAlign  # documented: stays RoIAlign
    images, targets = _batch(masks=True)
    model.train()
    losses = model(images, targets)
    _check_losses(losses, RCNN_LOSSES | {"loss_mask"})
    sum(losses.values()).backward()
    convs = _deform_convs(model)
    assert len(convs) == 8 and not any(c.modulated for c in convs.values())
    assert all(_nonzero_grad(c.conv_offset.weight) for c in convs.values())
    assert _nonzero_grad(model.roi_heads.box_roi_pool.pool.offset_fc[4].weight)
    model.eval()
    with torch.no_grad():
        _check_detections(model(images), masks=True)


def test_fresh_deform_pool_computes_roi_align_detector():
    # zero offsets: a v1 deformable pooler is RoIAlign, so the two detectors agree
    align = fasterrcnn_resnet18_fpn(num_classes=3, roi_pool="align", **SMALL).eval()
    deform = fasterrcnn_resnet18_fpn(num_classes=3, roi_pool="deform", **SMALL).eval()
    result = deform.load_state_dict(align.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith("roi_heads.box_roi_pool.pool.offset_fc") for k in result.missing_keys)
    images, _ = _batch()
    with torch.no_grad():
        expected, actual = align(images), deform(images)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a["boxes"], e["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a["scores"], e["scores"], rtol=1e-4, atol=1e-5)


def test_resnet50_builders_default_to_dcnv2():
    model = fasterrcnn_resnet50_fpn(num_classes=5)
    convs = _deform_convs(model)
    assert len(convs) == 13 and all(c.modulated for c in convs.values())
    assert {n.split(".")[2] for n in convs} == {"layer2", "layer3", "layer4"}
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, MultiScaleDeformRoIPool) and pool.pool.modulated
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    mask_model = detection.maskrcnn_resnet50_fpn(num_classes=2, roi_pool="align",
                                                 deform_stages=(5,))  # fmt: skip
    assert type(mask_model) is MaskRCNN and len(_deform_convs(mask_model)) == 3


def test_weights_backbone_loads_torchvision_resnet():
    reference = torchvision.models.resnet18()
    state = reference.state_dict()
    model = fasterrcnn_resnet18_fpn(num_classes=3, weights_backbone=state, **SMALL)
    body = model.backbone.body
    torch.testing.assert_close(body.conv1.weight, state["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"],
                               rtol=0, atol=0)  # fmt: skip
    torch.testing.assert_close(body.layer1[0].bn1.running_var, state["layer1.0.bn1.running_var"])
    assert not body.conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    rfcn = rfcn_resnet18(num_classes=3, weights_backbone=state, **_rfcn_small())
    torch.testing.assert_close(rfcn.backbone.body.layer3[0].conv1.weight,
                               state["layer3.0.conv1.weight"], rtol=0, atol=0)  # fmt: skip
    with pytest.raises(ValueError, match="state_dict does not fit"):
        fasterrcnn_resnet18_fpn(num_classes=3,
                                weights_backbone=torchvision.models.resnet34().state_dict())


# ---------------------------------------------------------------------------------------------
# feature mimicking


def test_mimic_training_losses_and_gradients():
    model = fasterrcnn_resnet18_fpn(num_classes=3, mimic=FeatureMimicking(**TINY_MIMIC), **SMALL)
    assert isinstance(model, MimicFasterRCNN) and isinstance(model, FasterRCNN)
    images, targets = _batch()
    model.train()
    calls = []
    original = FeatureMimicking.forward

    def spy(self, **kwargs):
        calls.append(kwargs)
        return original(self, **kwargs)

    with mock.patch.object(FeatureMimicking, "forward", spy):
        losses = model(images, targets)
    _check_losses(losses, RCNN_LOSSES | {"loss_mimic", "loss_rcnn_cls"})
    assert len(calls) == 1
    kwargs = calls[0]
    # the transformed batch, and the box head's sampled RoIs (GT boxes are among them)
    assert kwargs["images"].shape == (2, 3, 128, 128)
    assert sum(int((lab > 0).sum()) for lab in kwargs["labels"]) >= 3
    assert model.roi_heads._training_batch is None  # nothing kept after the step

    # each loss alone reaches the shared weights
    model.zero_grad()
    losses["loss_mimic"].backward(retain_graph=True)
    pool = model.roi_heads.box_roi_pool.pool
    assert _nonzero_grad(model.roi_heads.box_head.fc6.weight)
    assert _nonzero_grad(pool.offset_fc[4].weight)
    assert _nonzero_grad(model.backbone.body.layer4[0].conv1.conv_offset.weight)
    model.zero_grad()
    losses["loss_rcnn_cls"].backward()
    assert _nonzero_grad(model.roi_heads.box_predictor.cls_score.weight)
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad is None
    assert _nonzero_grad(model.backbone.body.layer2[0].conv1.conv_offset.weight)


def test_mimic_never_runs_in_eval_and_changes_nothing():
    mimicking = maskrcnn_resnet18_fpn(num_classes=3, mimic=True, **SMALL)
    assert isinstance(mimicking, MimicMaskRCNN) and mimicking.mimic.crop_size == 224
    plain = maskrcnn_resnet18_fpn(num_classes=3, **SMALL)
    assert set(plain.state_dict()) == set(mimicking.state_dict())
    plain.load_state_dict(mimicking.state_dict())
    mimicking.eval(), plain.eval()
    images, _ = _batch()
    with torch.no_grad(), mock.patch.object(FeatureMimicking, "forward",
                                            side_effect=AssertionError("mimic ran")):  # fmt: skip
        actual = mimicking(images)
    with torch.no_grad():
        expected = plain(images)
    for a, e in zip(actual, expected):
        assert set(a) == set(e) == {"boxes", "labels", "scores", "masks"}
        for k in e:
            torch.testing.assert_close(a[k], e[k], rtol=0, atol=0)


def test_mimic_with_masks_trains():
    model = maskrcnn_resnet18_fpn(num_classes=3, roi_pool="align",
                                  mimic=FeatureMimicking(**TINY_MIMIC), **SMALL)  # fmt: skip
    images, targets = _batch(masks=True)
    model.train()
    losses = model(images, targets)
    _check_losses(losses, RCNN_LOSSES | {"loss_mask", "loss_mimic", "loss_rcnn_cls"})


def test_mimic_select_caps_rois_and_crops():
    mimic = FeatureMimicking(crop_size=8, rois_per_image=2)
    proposals = [torch.tensor([[0.0, 0, 4, 4]] * 5), torch.tensor([[0.0, 0, 4, 4]] * 3)]
    labels = [torch.tensor([1, 0, 2, 2, 1]), torch.tensor([0, 0, 1])]
    boxes, chosen = mimic.select(proposals, labels)
    assert [len(b) for b in boxes] == [2, 1] and chosen.shape == (3,) and bool((chosen > 0).all())

    image = torch.zeros(1, 3, 40, 40)
    image[:, :, 10:30, 20:40] = 1.0  # a bright box at x 20..40, y 10..30
    crops = mimic.crops(image, [torch.tensor([[20.0, 10, 40, 30], [0.0, 0, 10, 10]])])
    assert crops.shape == (2, 3, 8, 8)
    torch.testing.assert_close(crops[0], torch.ones(3, 8, 8))
    torch.testing.assert_close(crops[1], torch.zeros(3, 8, 8))

    loss = mimic(images=image, features={}, proposals=[torch.zeros(0, 4)],
                 labels=[torch.zeros(0, dtype=torch.int64)], image_shapes=[(40, 40)],
                 backbone=None, box_roi_pool=None, box_head=None, cls_score=None)  # fmt: skip
    assert set(loss) == {"loss_mimic", "loss_rcnn_cls"} and float(sum(loss.values())) == 0.0


def test_mimic_reduction_sum_is_count_times_mean():
    images, targets = _batch()
    values = {}
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = fasterrcnn_resnet18_fpn(num_classes=3, roi_pool="align", mimic=FeatureMimicking(
            reduction=reduction, mimic_weight=1.0, **TINY_MIMIC), **SMALL).train()  # fmt: skip
        torch.manual_seed(3)
        values[reduction] = model(images, targets)["loss_mimic"]
    # same weights, same sampled RoIs: the sum is the mean times the RoIs mimicked (2..8 here:
    # at least one foreground RoI per image, at most rois_per_image = 4)
    ratio = (values["sum"] / values["mean"]).item()
    assert abs(ratio - round(ratio)) < 1e-3 and 2 <= round(ratio) <= 8


# ---------------------------------------------------------------------------------------------
# R-FCN


def _rfcn_small():
    return {k: v for k, v in SMALL.items()} | dict(head_output_size=3)


@pytest.mark.parametrize("ps_roi_pool", ["deform", "align"])
def test_rfcn_smoke(ps_roi_pool):
    model = rfcn_resnet18(num_classes=3, ps_roi_pool=ps_roi_pool, modulated=True, **_rfcn_small())
    assert isinstance(model, torchvision.models.detection.generalized_rcnn.GeneralizedRCNN)
    head = model.roi_heads.head
    assert isinstance(head.cls_pool, DeformPSRoIPool) == (ps_roi_pool == "deform")
    convs = _deform_convs(model)
    # conv5 dilated (its first conv keeps dilation 1, as torchvision's)
    assert len(convs) == 4 and {c.dilation for c in convs.values()} == {(1, 1), (2, 2)}

    images, targets = _train_step(model, convs)
    if ps_roi_pool == "deform":
        assert _nonzero_grad(head.cls_pool.conv_offset.weight)
        assert _nonzero_grad(head.bbox_pool.conv_offset.weight)
        assert len(list(head.offset_parameters())) == 4
    model.eval()
    with torch.no_grad():
        _check_detections(model(images))


def test_rfcn_head_votes_and_fresh_deformable_is_ps_roi_align():
    deform = RFCNHead(16, 4, output_size=3, spatial_scale=1 / 8)
    align = RFCNHead(16, 4, output_size=3, spatial_scale=1 / 8, deformable=False)
    align.load_state_dict(deform.state_dict(), strict=False)
    x = torch.randn(2, 16, 12, 12)
    boxes = [torch.tensor([[0.0, 0, 50, 60], [8.0, 16, 90, 90]]), torch.tensor([[4.0, 4, 40, 30]])]
    logits, deltas = deform({"0": x}, boxes)
    assert logits.shape == (3, 4) and deltas.shape == (3, 16)
    torch.testing.assert_close(deltas[:, :4], deltas[:, 12:])  # class-agnostic, repeated
    expected = torchvision.ops.ps_roi_align(deform.cls_pool.conv(x), boxes, 3, 1 / 8, 2)
    torch.testing.assert_close(logits, expected.mean(dim=(2, 3)))
    torch.testing.assert_close(align({"0": x}, boxes)[0], logits)


def test_rfcn_resnet50_has_stride_16():
    model = rfcn_resnet50(num_classes=3, min_size=128, max_size=128).eval()
    assert model.backbone.out_channels == 1024
    convs = _deform_convs(model)
    assert len(convs) == 3 and not any(c.modulated for c in convs.values())
    with torch.no_grad():
        features = model.backbone(torch.rand(1, 3, 128, 128))
    assert list(features) == ["0"] and features["0"].shape == (1, 1024, 8, 8)


# ---------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("builder", [fasterrcnn_resnet18_fpn, maskrcnn_resnet18_fpn])
def test_rcnn_exception(builder):
    allowed = r"roi_pool must be one of \('align', 'deform', 'mdeform'\)"
    with pytest.raises(ValueError, match=allowed):
        builder(num_classes=3, roi_pool="deformable")
    with pytest.raises(ValueError, match="deform_stages"):
        builder(num_classes=3, deform_stages=(1, 5))
    with pytest.raises(ValueError, match="trainable"):
        builder(num_classes=3, deform_stages=(2,))
    with pytest.raises(ValueError, match="num_classes"):
        builder(num_classes=1)
    with pytest.raises(TypeError, match="min_sise"):
        builder(num_classes=3, min_sise=128)
    with pytest.raises(TypeError, match="box_roi_pool is set by the builder"):
        builder(num_classes=3, box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2))
    with pytest.raises(TypeError, match="mimic"):
        builder(num_classes=3, mimic="yes")


def test_rfcn_exception():
    with pytest.raises(ValueError, match=r"ps_roi_pool must be one of \('align', 'deform'\)"):
        rfcn_resnet18(num_classes=3, ps_roi_pool="mdeform")
    with pytest.raises(ValueError, match="deform_stages"):
        rfcn_resnet18(num_classes=3, deform_stages=(6,))
    with pytest.raises(ValueError, match="trainable"):
        rfcn_resnet18(num_classes=3, deform_stages=(3,), trainable_backbone_layers=1)
    with pytest.raises(TypeError, match="rpn_batch_size"):
        rfcn_resnet18(num_classes=3, rpn_batch_size=8)
    with pytest.raises(TypeError, match="deformable_head is set by the builder"):
        rfcn_resnet18(num_classes=3, deformable_head=False)


def test_feature_mimicking_exception():
    with pytest.raises(ValueError, match="crop_size"):
        FeatureMimicking(crop_size=0)
    with pytest.raises(ValueError, match="rois_per_image"):
        FeatureMimicking(rois_per_image=-1)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum'\)"):
        FeatureMimicking(reduction="none")
    with pytest.raises(ValueError, match="mimic_weight"):
        FeatureMimicking(mimic_weight=-0.1)
