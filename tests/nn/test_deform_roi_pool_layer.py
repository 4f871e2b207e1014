"""Deformable RoI pooling layers: fresh layers are their plain twins; branches get gradients."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from helpers import assert_close
from deformable.nn.deform_roi_pool import DeformPSRoIPool, DeformRoIPool, MultiScaleDeformRoIPool
from deformable.nn.param_groups import param_groups
from deformable.ops.deform_roi_pool import deform_ps_roi_pool, deform_roi_pool


def boxes_for(batch=2):
    return [torch.tensor([[2.0, 3.0, 40.0, 30.0], [10.0, 0.0, 20.0, 60.0]]),
            torch.tensor([[0.0, 0.0, 63.0, 47.0]])][:batch]  # fmt: skip


def randomise_(module: nn.Module, std=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


# ---------------------------------------------------------------------------------------------
# DeformRoIPool


def test_smoke_and_cardinality():
    pool = DeformRoIPool((3, 2), 0.25, 2, in_channels=5, hidden_channels=16, modulated=True)
    out = pool(torch.randn(2, 5, 12, 16), boxes_for())
    assert out.shape == (3, 5, 3, 2)
    assert pool.offset_fc[0].in_features == 5 * 3 * 2 and pool.offset_fc[4].out_features == 2 * 6
    assert pool.mask_fc[2].out_features == 6


@pytest.mark.parametrize("aligned", [False, True])
def test_fresh_v1_layer_equals_roi_align(aligned):
    pool = DeformRoIPool(7, 0.25, 2, in_channels=4, hidden_channels=32, aligned=aligned)
    x = torch.randn(2, 4, 16, 16)
    expected = torchvision.ops.roi_align(x, boxes_for(), 7, 0.25, 2, aligned)
    assert_close(pool(x, boxes_for()), expected)


def test_fresh_v2_layer_is_half_of_roi_align():
    pool = DeformRoIPool(3, 0.25, -1, in_channels=4, hidden_channels=8, modulated=True).double()
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    boxes = [b.double() for b in boxes_for()]
    assert_close(pool(x, boxes), 0.5 * torchvision.ops.roi_align(x, boxes, 3, 0.25, -1))


def test_layer_is_the_functional_op_with_its_predicted_offsets():
    pool = DeformRoIPool((2, 3), 0.25, 2, in_channels=3, hidden_channels=8, gamma=0.2,
                         modulated=True).double()  # fmt: skip
    randomise_(pool)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    boxes = [b.double() for b in boxes_for()]
    plain = torchvision.ops.roi_align(x, boxes, (2, 3), 0.25, 2)
    flat = plain.flatten(1)
    offset = pool.offset_fc(flat).reshape(-1, 2, 2, 3)
    mask = pool.mask_fc(flat).reshape(-1, 1, 2, 3)
    assert offset.abs().max() > 0 and not torch.allclose(mask, torch.full_like(mask, 0.5))
    expected = deform_roi_pool(x, boxes, (2, 3), 0.25, 2, offset=offset, mask=mask, gamma=0.2)
    assert_close(pool(x, boxes), expected)


def test_gradients_reach_the_offset_branch():
    pool = DeformRoIPool(3, 0.25, 2, in_channels=4, hidden_channels=8, modulated=True)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    pool(x, boxes_for()).square().sum().backward()
    # zero-initialised last layers: they get gradients, the layers below not yet
    assert pool.offset_fc[4].weight.grad.abs().sum() > 0
    assert pool.mask_fc[2].weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_mmcv_parameter_names_and_param_groups():
    pool = DeformRoIPool(7, in_channels=4, hidden_channels=8, modulated=True)
    assert set(pool.state_dict()) == {f"{branch}.{i}.{kind}" for branch, layers in
                                      (("offset_fc", (0, 2, 4)), ("mask_fc", (0, 2)))
                                      for i in layers for kind in ("weight", "bias")}  # fmt: skip
    model = nn.Sequential(nn.Conv2d(3, 4, 1), pool)
    base, roi = param_groups(model, lr=0.1, offset_lr_mult=0.5)  # DCNv1's 0.01x by default
    assert roi["name"] == "roi_offset" and len(base["params"]) == 2 and len(roi["params"]) == 10
    assert roi["lr"] == pytest.approx(1e-3)
    base, roi = param_groups(model, lr=0.1, roi_offset_lr_mult=1.0)
    assert roi["lr"] == pytest.approx(0.1)


def test_empty_boxes():
    pool = DeformRoIPool(2, in_channels=3, hidden_channels=4, modulated=True)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    out = pool(x, [torch.zeros(0, 4)])
    assert out.shape == (0, 3, 2, 2)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_compile_fullgraph_matches_eager():
    pool = DeformRoIPool(2, 0.5, 2, in_channels=3, hidden_channels=8, modulated=True)
    randomise_(pool)
    x = torch.randn(2, 3, 8, 8)
    boxes = [b / 4 for b in boxes_for()]
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, boxes), pool(x, boxes))


# ---------------------------------------------------------------------------------------------
# DeformPSRoIPool


@pytest.mark.parametrize("offset_groups", [1, 3])
def test_fresh_ps_layer_equals_ps_roi_align(offset_groups):
    head = DeformPSRoIPool(3, 0.25, 2, in_channels=5, out_channels=3, offset_groups=offset_groups)
    x = torch.randn(2, 5, 16, 16)
    assert head.conv.out_channels == 3 * 9 and head.conv_offset.out_channels == 2 * offset_groups * 9
    expected = torchvision.ops.ps_roi_align(head.conv(x), boxes_for(), 3, 0.25, 2)
    assert_close(head(x, boxes_for()), expected)


def test_ps_layer_is_deformable_rfcn():
    """Offsets are the PS RoI pooling of the offset field; they move the score maps' bins."""
    head = DeformPSRoIPool((2, 3), 0.25, 2, in_channels=4, out_channels=2, offset_groups=2,
                           gamma=0.3).double()  # fmt: skip
    randomise_(head, 0.3)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    boxes = [b.double() for b in boxes_for()]
    offset = torchvision.ops.ps_roi_align(head.conv_offset(x), boxes, (2, 3), 0.25, 2)
    assert offset.shape == (3, 4, 2, 3) and offset.abs().max() > 0
    expected = deform_ps_roi_pool(head.conv(x), boxes, (2, 3), 0.25, 2, offset=offset, gamma=0.3)
    assert_close(head(x, boxes), expected)
    head(x, boxes).square().sum().backward()
    assert head.conv_offset.weight.grad.abs().sum() > 0
    assert {id(p) for p in head.offset_parameters()} == {id(head.conv_offset.weight),
                                                          id(head.conv_offset.bias)}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# MultiScaleDeformRoIPool


def fpn_example(channels=4):
    x = OrderedDict(p2=torch.randn(2, channels, 64, 80), p3=torch.randn(2, channels, 32, 40),
                    pool=torch.randn(2, channels, 8, 10),
                    p4=torch.randn(2, channels, 16, 20), p5=torch.randn(2, channels, 8, 10))  # fmt: skip
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 20.0], [10.0, 10.0, 200.0, 250.0],
                           [5.0, 5.0, 315.0, 250.0]]),
             torch.tensor([[50.0, 60.0, 110.0, 100.0], [0.0, 0.0, 120.0, 140.0]])]  # fmt: skip
    return x, boxes, [(256, 320), (250, 300)]


@pytest.mark.parametrize("names", [["p2", "p3", "p4", "p5"], ["p3", "p5"], ["p4"]])
def test_fresh_multiscale_equals_multiscale_roi_align(names):
    x, boxes, image_shapes = fpn_example()
    tv = torchvision.ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=100, canonical_level=4)
    ours = MultiScaleDeformRoIPool(names, 7, 2, canonical_scale=100, canonical_level=4,
                                   in_channels=4, hidden_channels=16)  # fmt: skip
    expected = tv(x, boxes, image_shapes)
    got = ours(x, boxes, image_shapes)
    assert_close(got, expected)
    if len(names) > 1:  # the boxes really are spread over levels
        scales = [ours._scale(x[n], (256, 320)) for n in names]
        assert len(set(ours.levels(boxes, scales).tolist())) > 1


def test_multiscale_levels_follow_fpn_rule_and_share_one_branch():
    x, boxes, image_shapes = fpn_example()
    names = ["p2", "p3", "p4", "p5"]
    ours = MultiScaleDeformRoIPool(names, (2, 3), 2, in_channels=4, hidden_channels=8,
                                   modulated=True)  # fmt: skip
    randomise_(ours)
    scales = [0.25, 0.125, 0.0625, 0.03125]
    levels = ours.levels(boxes, scales)
    expected_levels = torchvision.ops.poolers.LevelMapper(2, 5)(boxes)
    assert torch.equal(levels, expected_levels)
    got = ours(x, boxes, image_shapes)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                      for i, b in enumerate(boxes)])  # fmt: skip
    for k in range(rois.shape[0]):
        level = int(levels[k])
        expected = ours.pool.pool(x[names[level]], rois[k : k + 1], scales[level])
        assert_close(got[k : k + 1], expected)
    assert len(list(ours.offset_parameters())) == 10
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ours.pool.parameters())


class TestBadArguments:
    def test_roi_pool(self):
        with pytest.raises(ValueError, match="in_channels must be a positive int"):
            DeformRoIPool(7, in_channels=0)
        with pytest.raises(ValueError, match="output_size must be >= 1"):
            DeformRoIPool(0, in_channels=3)
        with pytest.raises(ValueError, match="spatial_scale must be a positive number"):
            DeformRoIPool(7, -1.0, in_channels=3)
        with pytest.raises(TypeError, match="sampling_ratio must be an int"):
            DeformRoIPool(7, 1.0, 0.5, in_channels=3)
        pool = DeformRoIPool(2, in_channels=3, hidden_channels=4)
        with pytest.raises(ValueError, match="input has 5 channels.*in_channels=3"):
            pool(torch.randn(1, 5, 6, 6), [torch.zeros(1, 4)])

    def test_ps_roi_pool(self):
        with pytest.raises(ValueError, match=r"out_channels \(4\) must be divisible by offset_groups"):
            DeformPSRoIPool(3, in_channels=3, out_channels=4, offset_groups=3)
        with pytest.raises(ValueError, match="out_channels must be a positive int"):
            DeformPSRoIPool(3, in_channels=3, out_channels=0)

    def test_multiscale(self):
        with pytest.raises(ValueError, match="featmap_names must be a non-empty list"):
            MultiScaleDeformRoIPool("p2", 7, 2, in_channels=3)
        pooler = MultiScaleDeformRoIPool(["p9"], 2, 2, in_channels=4, hidden_channels=4)
        x, boxes, image_shapes = fpn_example()
        with pytest.raises(ValueError, match=r"none of featmap_names \['p9'\] is a key of x"):
            pooler(x, boxes, image_shapes)
