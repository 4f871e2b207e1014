"""DeepLabV3 on the dilated deformable ResNet: output at the input's size, torchvision's backbone
weights load, deformable layers dilated, one training step."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import DeepLabV3

from helpers import assert_close
from deformable.models.segmentation import deeplabv3_resnet18, deeplabv3_resnet50
from deformable.nn import DeformConv2d


def _deform_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, DeformConv2d)}


def test_resnet50_output_has_input_size_and_loads_torchvision_backbone():
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = deeplabv3_resnet50(num_classes=4, deform_stages=(4, 5), aux_loss=True,
                               weights_backbone=reference.state_dict()).eval()  # fmt: skip
    assert isinstance(model, DeepLabV3)
    layers = _deform_layers(model)
    assert len(layers) == 9 and {n.split(".")[1] for n in layers} == {"layer3", "layer4"}
    assert {m.dilation[0] for n, m in layers.items() if "layer4" in n} == {2, 4}

    x = torch.randn(1, 3, 33, 47)  # odd size: the head upsamples back to it
    body = IntermediateLayerGetter(reference.eval(), {"layer3": "aux", "layer4": "out"})
    with torch.no_grad():
        out = model(x)
        expected = body(x)
        actual = model.backbone(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == (1, 4, 33, 47) and out["aux"].shape == (1, 4, 33, 47)
    assert actual["out"].shape == (1, 2048, 5, 6)  # output stride 8
    # zero offsets: the deformable backbone computes torchvision's dilated ResNet-50
    assert_close(actual["out"], expected["out"], what="layer4")
    assert_close(actual["aux"], expected["aux"], what="layer3")


def test_feature_info_of_deeplab_matches_forward():
    model = deeplabv3_resnet18(num_classes=2).eval()
    shapes = {}
    for info in model.feature_info:
        model.get_submodule(info["module"]).register_forward_hook(
            lambda m, args, out, name=info["module"]: shapes.update({name: out.shape}))  # fmt: skip
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 8, 8]
    assert [f["module"] for f in model.feature_info][-1] == "backbone.layer4"
    for f in model.feature_info:
        assert shapes[f["module"]] == (1, f["num_chs"], 64 // f["reduction"], 64 // f["reduction"])


def test_output_stride_16_dilates_layer4_only_and_scales_the_aspp():
    model = deeplabv3_resnet18(num_classes=3, deform_stages=(4, 5), output_stride=16).eval()
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16, 16]
    layers = _deform_layers(model)
    assert {m.dilation[0] for n, m in layers.items() if "layer3" in n} == {1}
    assert {m.dilation[0] for n, m in layers.items() if "layer4" in n} == {1, 2}
    assert layers["backbone.layer3.0.conv1"].stride == (2, 2)
    with torch.no_grad():
        assert model.backbone(torch.rand(1, 3, 64, 64))["out"].shape == (1, 512, 4, 4)
        assert model(torch.rand(1, 3, 50, 35))["out"].shape == (1, 3, 50, 35)
    aspp = model.classifier[0].convs
    assert [branch[0].dilation[0] for branch in aspp[1:4]] == [6, 12, 18]  # DeepLabV3's at 16
    default = deeplabv3_resnet18(num_classes=3).classifier[0].convs
    assert [branch[0].dilation[0] for branch in default[1:4]] == [12, 24, 36]
    small = deeplabv3_resnet18(num_classes=3, atrous_rates=(1, 2)).classifier[0].convs
    assert [branch[0].dilation[0] for branch in small[1:3]] == [1, 2] and len(small) == 4


def test_resnet18_trains_one_step():
    model = deeplabv3_resnet18(num_classes=3, deform_stages=(4, 5), modulated=True, aux_loss=True)
    model.train()
    x = torch.randn(2, 3, 48, 48)
    target = torch.randint(0, 3, (2, 48, 48))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    out = model(x)
    assert out["out"].shape == (2, 3, 48, 48)
    loss = nn.functional.cross_entropy(out["out"], target) + \
        0.5 * nn.functional.cross_entropy(out["aux"], target)  # fmt: skip
    assert torch.isfinite(loss)
    loss.backward()
    layers = _deform_layers(model)
    assert len(layers) == 8
    for name, layer in layers.items():
        assert layer.modulated
        assert layer.conv_offset.weight.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(layer.conv_offset.weight.abs().sum() > 0 for layer in layers.values())
    with torch.no_grad():
        assert torch.isfinite(nn.functional.cross_entropy(model(x)["out"], target))


def test_resnet18_loads_torchvision_weights():
    state = torchvision.models.resnet18().state_dict()
    model = deeplabv3_resnet18(num_classes=2, deform_stages=(5,), weights_backbone=state)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.backbone.bn1.running_var, state["bn1.running_var"])


def test_exceptions():
    with pytest.raises(ValueError, match=r"deform_stages.*\(2, 3, 4, 5\)"):
        deeplabv3_resnet18(num_classes=2, deform_stages=(1, 5))
    with pytest.raises(ValueError, match="num_classes"):
        deeplabv3_resnet18(num_classes=0)
    with pytest.raises(TypeError, match="aux_loss"):
        deeplabv3_resnet18(num_classes=2, aux_loss=None)
    with pytest.raises(ValueError, match="unexpected keys"):  # a ResNet-34 is not a ResNet-18
        deeplabv3_resnet18(num_classes=2,
                           weights_backbone=torchvision.models.resnet34().state_dict())  # fmt: skip
    with pytest.raises(ValueError, match="output_stride must be 8 or 16, got 32"):
        deeplabv3_resnet18(num_classes=2, output_stride=32)
    with pytest.raises(ValueError, match=r"atrous_rates must be .* positive ints, got \(6, 0\)"):
        deeplabv3_resnet18(num_classes=2, atrous_rates=(6, 0))
    with pytest.raises(TypeError):
        deeplabv3_resnet18(2)  # keyword-only: num_classes must be named
