"""ONNX export: deformable layers become the standard DeformConv and run in onnxruntime."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from helpers import assert_close
from deformable.export import export_onnx
from deformable.nn import DeformConv2d
from deformable.ops import deform_conv2d


def run_onnx(path, *inputs):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def with_offsets(layer: DeformConv2d, std=0.5) -> DeformConv2d:
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, std)
        layer.conv_offset.bias.normal_(0, std)
    return layer


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("groups, offset_groups", [(1, 1), (2, 3)])
def test_layer_matches_onnxruntime(tmp_path, modulated, groups, offset_groups):
    layer = with_offsets(DeformConv2d(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                                      groups=groups, offset_groups=offset_groups,
                                      bias=modulated, modulated=modulated))  # fmt: skip
    x = torch.randn(2, 6, 11, 10)
    path = export_onnx(layer, (x,), tmp_path / "layer.onnx")
    nodes = [n.op_type for n in onnx.load(path).graph.node]
    assert nodes.count("DeformConv") == 1
    (got,) = run_onnx(path, x)
    assert_close(got, layer(x).detach())


def test_dynamic_batch(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          with_offsets(DeformConv2d(8, 8, 3, padding=1, modulated=True)),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))  # fmt: skip
    path = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "net.onnx")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        (got,) = run_onnx(path, x)
        assert_close(got, model(x).detach())


def test_functional_with_external_offsets(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.bias = nn.Parameter(torch.randn(4))

        def forward(self, x, offset, mask):
            return deform_conv2d(x, offset, self.weight, self.bias, padding=1, mask=mask)

    net = Net()
    args = (torch.randn(2, 3, 8, 8), torch.randn(2, 18, 8, 8) * 2, torch.rand(2, 9, 8, 8))
    path = export_onnx(net, args, tmp_path / "f.onnx")
    (got,) = run_onnx(path, *args)
    assert_close(got, net(*args).detach())


def test_static_batch_of_one(tmp_path):
    layer = with_offsets(DeformConv2d(2, 3, 3, padding=1))
    x = torch.randn(1, 2, 6, 6)
    path = export_onnx(layer, x, tmp_path / "x.onnx", dynamic_batch=False)
    (got,) = run_onnx(path, x)
    assert_close(got, layer(x).detach())
    batch = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_value == 1 and not batch.dim_param


def test_a_batch_of_one_exports_a_dynamic_batch(tmp_path):
    """The most common call there is: one example image, default settings."""
    layer = with_offsets(DeformConv2d(2, 3, 3, padding=1, modulated=True))
    path = export_onnx(layer, torch.randn(1, 2, 6, 6), tmp_path / "x.onnx")
    batch = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    for size in (1, 3):
        x = torch.randn(size, 2, 6, 6)
        (got,) = run_onnx(path, x)
        assert_close(got, layer(x).detach())


def test_an_empty_example_batch_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"example_inputs\[0\] has an empty batch"):
        export_onnx(DeformConv2d(2, 3, 3), torch.randn(0, 2, 6, 6), tmp_path / "x.onnx")


def test_opset_below_19_is_refused(tmp_path):
    with pytest.raises(ValueError, match="opset must be >= 19"):
        export_onnx(DeformConv2d(2, 2, 3), torch.randn(1, 2, 5, 5), tmp_path / "x.onnx", opset=18)


def test_example_inputs_type(tmp_path):
    with pytest.raises(TypeError, match="example_inputs must be a Tensor or a tuple"):
        export_onnx(DeformConv2d(2, 2, 3), [torch.randn(1, 2, 5, 5)], tmp_path / "x.onnx")


def test_dcn_resnet18_matches_onnxruntime(tmp_path):
    from deformable.models import resnet18

    torch.manual_seed(0)
    model = resnet18(deform_stages=(3, 4, 5), modulated=True, num_classes=7).eval()
    for module in model.modules():
        if isinstance(module, DeformConv2d):
            with_offsets(module, std=0.01)
    path = export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "r18.onnx")  # the defaults
    # conv3-conv5 of ResNet-18: 3 stages x 2 basic blocks x 2 3x3 convs
    assert [n.op_type for n in onnx.load(path).graph.node].count("DeformConv") == 12
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        (got,) = run_onnx(path, x)
        assert_close(got, model(x).detach())


def test_deformable_roi_pooling_is_refused_with_a_clear_error(tmp_path):
    from deformable.ops import deform_roi_pool

    class Head(nn.Module):
        def forward(self, features, boxes, offset):
            return deform_roi_pool(features, boxes, 3, offset=offset)

    args = (torch.randn(2, 4, 10, 10), torch.tensor([[0, 1.0, 1, 6, 6], [1, 2, 2, 8, 9]]),
            torch.randn(2, 2, 3, 3))  # fmt: skip
    with pytest.raises(ValueError, match="deform_roi_pool.*no standard ONNX operator"):
        export_onnx(Head(), args, tmp_path / "roi.onnx")
    assert not (tmp_path / "roi.onnx").exists()
