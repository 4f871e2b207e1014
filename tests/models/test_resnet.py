"""Deformable ResNets: torchvision's weights load and compute torchvision's output; the deformable
switch, feature_info, state dict round trip, FPN backbone, and the argument checks."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from helpers import assert_close
from deformable.models import (
    DeformResNet,
    load_torchvision_state_dict,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet_fpn_backbone,
)
from deformable.nn import DeformConv2d, param_groups


def _deform_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, DeformConv2d)}


def _offset_keys(model):
    return [f"{name}.conv_offset.{p}" for name, _ in _deform_layers(model).items()
            for p in ("weight", "bias")]  # fmt: skip


def _randomise_offsets(model, scale=0.05):
    with torch.no_grad():
        for layer in _deform_layers(model).values():
            layer.conv_offset.weight.normal_(0, scale)
            layer.conv_offset.bias.normal_(0, scale)


def test_resnet50_conv3_to_conv5_computes_torchvision_output():
    reference = torchvision.models.resnet50().eval()
    model = resnet50(deform_stages=(3, 4, 5)).eval()
    layers = _deform_layers(model)
    assert len(layers) == 13
    assert {name.split(".")[0] for name in layers} == {"layer2", "layer3", "layer4"}
    assert all(name.endswith("conv2") and not m.modulated for name, m in layers.items())
    assert [m.stride for name, m in layers.items() if name.endswith(".0.conv2")] == [(2, 2)] * 3

    missing = load_torchvision_state_dict(model, reference.state_dict())
    assert missing == _offset_keys(model)
    assert len(missing) == 26
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        actual = model(x)
    assert_close(actual, expected, what="resnet50 logits")


@pytest.mark.parametrize("deform_stages", [(2, 3, 4, 5), (5,)])
def test_resnet18_computes_torchvision_output(deform_stages):
    reference = torchvision.models.resnet18().eval()
    model = resnet18(deform_stages=deform_stages).eval()
    # BasicBlock: both 3x3 convs of every block of the stage
    assert len(_deform_layers(model)) == 4 * len(deform_stages)
    assert load_torchvision_state_dict(model, reference.state_dict()) == _offset_keys(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), reference(x), what="resnet18 logits")


@pytest.mark.parametrize("builder, expected", [(resnet34, 26), (resnet101, 30)])
def test_layer_counts(builder, expected):
    assert len(_deform_layers(builder(deform_stages=(3, 4, 5)))) == expected


def test_no_deform_stages_is_torchvision_resnet():
    model = resnet18()
    reference = torchvision.models.resnet18()
    assert isinstance(model, torchvision.models.ResNet)
    assert not _deform_layers(model)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert load_torchvision_state_dict(model, reference.state_dict()) == []
    model.eval(), reference.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_modulated_layers_predict_masks():
    reference = torchvision.models.resnet18().eval()
    model = resnet18(deform_stages=(4, 5), modulated=True, offset_groups=2).eval()
    missing = load_torchvision_state_dict(model, reference.state_dict())
    assert missing == _offset_keys(model)
    layer = model.layer4[1].conv1
    assert isinstance(layer, DeformConv2d) and layer.modulated and layer.offset_groups == 2
    assert layer.conv_offset.out_channels == 3 * 2 * 9
    offset, mask = layer.offset_and_mask(torch.randn(1, 512, 4, 4))
    assert offset.shape == (1, 36, 4, 4) and mask.shape == (1, 18, 4, 4)
    assert torch.equal(mask, torch.full_like(mask, 0.5))  # zero-initialised logits
    with torch.no_grad():  # the masks halve each deformable conv: not torchvision's output
        x = torch.randn(1, 3, 64, 64)
        assert (model(x) - reference(x)).abs().max() > 1e-3


def test_state_dict_round_trip_with_trained_offsets():
    model = resnet18(deform_stages=(3, 4, 5), modulated=True, num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        at_zero = model(x)
        _randomise_offsets(model)
        expected = model(x)
    assert (expected - at_zero).abs().max() > 1e-4  # the offsets do move the samples

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = resnet18(deform_stages=(3, 4, 5), modulated=True, num_classes=7).eval()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(restored(x), expected)
    # a full state dict of the deformable model also goes through the torchvision loader
    again = resnet18(deform_stages=(3, 4, 5), modulated=True, num_classes=7).eval()
    assert load_torchvision_state_dict(again, model.state_dict()) == []
    with torch.no_grad():
        assert torch.equal(again(x), expected)


@pytest.mark.parametrize("modulated", [False, True])
def test_gradients_reach_offset_branches(modulated):
    model = resnet18(deform_stages=(3, 4, 5), modulated=modulated, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    nn.functional.cross_entropy(model(x), torch.tensor([1, 3])).backward()
    layers = _deform_layers(model)
    assert len(layers) == 12
    for name, layer in layers.items():
        assert layer.conv_offset.weight.grad.abs().sum() > 0, name
        assert layer.conv_offset.bias.grad.abs().sum() > 0, name

    offset_group = [g for g in param_groups(model, lr=0.1) if g["name"] == "offset"][0]
    assert {id(p) for p in offset_group["params"]} == \
        {id(p) for m in layers.values() for p in m.conv_offset.parameters()}  # fmt: skip


def _hooked_shapes(model, x):
    shapes, handles = {}, []

    def record(name):
        def hook(module, args, output):
            shapes[name] = output.shape
        return hook

    for info in model.feature_info:
        module = model.get_submodule(info["module"])
        handles.append(module.register_forward_hook(record(info["module"])))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


@pytest.mark.parametrize("builder, dilation, reductions, channels", [
    (resnet18, None, [2, 4, 8, 16, 32], [64, 64, 128, 256, 512]),
    (resnet50, None, [2, 4, 8, 16, 32], [64, 256, 512, 1024, 2048]),
    (resnet50, [False, True, True], [2, 4, 8, 8, 8], [64, 256, 512, 1024, 2048]),
    (resnet18, [False, False, True], [2, 4, 8, 16, 16], [64, 64, 128, 256, 512]),
])  # fmt: skip
def test_feature_info_matches_forward(builder, dilation, reductions, channels):
    model = builder(deform_stages=(4, 5), replace_stride_with_dilation=dilation).eval()
    info = model.feature_info
    assert [f["module"] for f in info] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert [f["stage"] for f in info] == [1, 2, 3, 4, 5]
    assert [f["reduction"] for f in info] == reductions
    assert [f["num_chs"] for f in info] == channels
    shapes = _hooked_shapes(model, torch.randn(1, 3, 64, 96))
    for f in info:
        assert shapes[f["module"]] == (1, f["num_chs"], 64 // f["reduction"], 96 // f["reduction"])


def test_dilated_deformable_layers_keep_dilation():
    model = resnet18(deform_stages=(5,), replace_stride_with_dilation=[False, False, True])
    layers = _deform_layers(model)
    # the conv that held the stride keeps the previous dilation, the later ones take the stage's
    assert {n: m.dilation for n, m in layers.items()} == {
        "layer4.0.conv1": (1, 1), "layer4.0.conv2": (2, 2), "layer4.1.conv1": (2, 2),
        "layer4.1.conv2": (2, 2)}  # fmt: skip
    assert all(m.padding == m.dilation == m.conv_offset.dilation == m.conv_offset.padding
               and m.stride == (1, 1) for m in layers.values())  # fmt: skip
    model50 = resnet50(deform_stages=(4, 5), replace_stride_with_dilation=[False, True, True])
    assert [m.dilation[0] for m in _deform_layers(model50).values()] == \
        [1] + [2] * 5 + [2] + [4] * 2  # fmt: skip


@pytest.mark.parametrize("deform_stages", [(1,), (6,), (3, 3), (0, 5), ("layer2",), (True,),
                                           (2.0,)])  # fmt: skip
def test_bad_deform_stages(deform_stages):
    with pytest.raises(ValueError, match=r"deform_stages.*\(2, 3, 4, 5\)"):
        resnet50(deform_stages=deform_stages)


def test_exceptions():
    with pytest.raises(TypeError, match=r"deform_stages.*\(2, 3, 4, 5\)"):
        resnet18(deform_stages=5)
    with pytest.raises(TypeError, match="deform_stages"):
        resnet18(deform_stages="345")
    with pytest.raises(ValueError, match=r"offset_groups \(3\).*\[64, 128\]"):
        resnet18(deform_stages=(2, 3), offset_groups=3)
    with pytest.raises(ValueError, match="offset_groups"):
        resnet18(deform_stages=(2,), offset_groups=0)
    with pytest.raises(ValueError, match="num_classes"):
        resnet18(num_classes=0)
    with pytest.raises(TypeError, match="modulated"):
        resnet18(deform_stages=(5,), modulated="yes")
    with pytest.raises(ValueError, match="replace_stride_with_dilation"):
        resnet50(replace_stride_with_dilation=[True, True])
    with pytest.raises(TypeError):  # no silently ignored keywords
        resnet18(deform_stage=(5,))


def test_loader_rejects_other_mismatches_and_loads_nothing():
    model = resnet18(deform_stages=(5,), num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torchvision.models.resnet18().state_dict()

    with pytest.raises(ValueError, match=r"shape mismatches.*fc\.weight.*load_fc=False"):
        load_torchvision_state_dict(model, state)
    incomplete = {k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"}
    with pytest.raises(ValueError, match=r"missing keys.*layer4\.1\.bn2\.running_var"):
        load_torchvision_state_dict(model, incomplete, load_fc=False)
    extra = dict(state, **{"layer5.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys.*layer5\.0\.conv1\.weight"):
        load_torchvision_state_dict(model, extra, load_fc=False)
    wrong_arch = torchvision.models.resnet34().state_dict()
    with pytest.raises(ValueError, match="unexpected keys"):
        load_torchvision_state_dict(model, wrong_arch, load_fc=False)
    with pytest.raises(TypeError, match="state_dict"):
        load_torchvision_state_dict(model, [1, 2])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # another num_classes: everything but the classifier (and the offsets) loads
    missing = load_torchvision_state_dict(model, state, load_fc=False)
    assert missing == _offset_keys(model)
    assert torch.equal(model.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    assert torch.equal(model.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    assert torch.equal(model.fc.weight, before["fc.weight"])


def test_frozen_batch_norm_model_loads_torchvision_weights():
    model = resnet18(deform_stages=(5,), norm_layer=FrozenBatchNorm2d)
    state = torchvision.models.resnet18().state_dict()  # holds num_batches_tracked
    assert load_torchvision_state_dict(model, state) == _offset_keys(model)
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])


def test_resnet_fpn_backbone():
    reference = torchvision.models.resnet18()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    backbone = resnet_fpn_backbone("resnet18", deform_stages=(4, 5), modulated=True,
                                   weights_state_dict=reference.state_dict())  # fmt: skip
    body = backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert torch.equal(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(body.bn1.running_mean, reference.bn1.running_mean)
    assert isinstance(body.layer3[1].conv2, DeformConv2d) and body.layer3[1].conv2.modulated
    trainable = {name.split(".")[0] for name, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    assert body.layer4[0].conv1.conv_offset.weight.requires_grad

    features = backbone(torch.randn(1, 3, 64, 64))
    assert backbone.out_channels == 256
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "0": (1, 256, 16, 16), "1": (1, 256, 8, 8), "2": (1, 256, 4, 4), "3": (1, 256, 2, 2),
        "pool": (1, 256, 1, 1)}  # fmt: skip

    two = resnet_fpn_backbone("resnet50", deform_stages=(), modulated=False, trainable_layers=0,
                              returned_layers=[3, 4])  # fmt: skip
    assert not any(p.requires_grad for p in two.body.parameters())
    assert [tuple(v.shape) for v in two(torch.randn(1, 3, 64, 64)).values()] == \
        [(1, 256, 4, 4), (1, 256, 2, 2), (1, 256, 1, 1)]  # fmt: skip


def test_resnet_fpn_backbone_plugs_into_torchvision_faster_rcnn():
    from torchvision.models.detection import FasterRCNN

    backbone = resnet_fpn_backbone("resnet18", deform_stages=(3, 4, 5), modulated=True)
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])}]
    losses = detector(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    offset_grads = [m.conv_offset.weight.grad for m in _deform_layers(backbone).values()]
    assert len(offset_grads) == 12
    assert all(g is not None and g.abs().sum() > 0 for g in offset_grads)
    detector.eval()
    with torch.no_grad():
        (out,) = detector(images)
    assert set(out) == {"boxes", "labels", "scores"}


def test_resnet_fpn_backbone_exceptions():
    with pytest.raises(ValueError, match=r"name.*'resnet101', 'resnet18', 'resnet34', 'resnet50'"):
        resnet_fpn_backbone("resnet152", deform_stages=(), modulated=False)
    with pytest.raises(ValueError, match=r"deform_stages.*\(2, 3, 4, 5\)"):
        resnet_fpn_backbone("resnet18", deform_stages=(6,), modulated=False)
    with pytest.raises(ValueError, match=r"deform_stages \[2, 3\].*trainable_layers to at least 4"):
        resnet_fpn_backbone("resnet18", deform_stages=(2, 3, 5), modulated=False,
                            trainable_layers=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"trainable_layers.*0\.\.5"):
        resnet_fpn_backbone("resnet18", deform_stages=(5,), modulated=False, trainable_layers=6)
    with pytest.raises(ValueError, match=r"returned_layers.*\[1, 2, 3, 4\]"):
        resnet_fpn_backbone("resnet18", deform_stages=(5,), modulated=False,
                            returned_layers=[0, 1])  # fmt: skip
    resnet50_state = torchvision.models.resnet50().state_dict()
    with pytest.raises(ValueError, match="unexpected keys"):
        resnet_fpn_backbone("resnet18", deform_stages=(5,), modulated=False,
                            weights_state_dict=resnet50_state)  # fmt: skip


def test_is_a_torchvision_resnet_subclass():
    model = resnet50(deform_stages=(5,))
    assert isinstance(model, DeformResNet) and isinstance(model, torchvision.models.ResNet)
    assert model.deform_stages == (5,) and model.modulated is False and model.offset_groups == 1
    assert resnet18(deform_stages=[5, 3]).deform_stages == (3, 5)
