"""deform_conv2d as a torch.library op: opcheck, torch.compile(fullgraph=True), torch.export."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from deformable.ops import deform_conv2d


def example(modulated=True, bias=True, requires_grad=False):
    x = torch.randn(2, 4, 7, 6)
    offset = torch.randn(2, 2 * 2 * 9, 7, 6)
    weight = torch.randn(4, 2, 3, 3)
    b = torch.randn(4) if bias else None
    mask = torch.rand(2, 2 * 9, 7, 6) if modulated else None
    tensors = [t.requires_grad_(requires_grad) if t is not None else None
               for t in (x, offset, weight, b, mask)]  # fmt: skip
    return tensors


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(modulated, bias, requires_grad):
    x, offset, weight, b, mask = example(modulated, bias, requires_grad)
    args = (x, offset, weight, b, [1, 1], [1, 1], [1, 1], mask)
    torch.library.opcheck(torch.ops.deformable.deform_conv2d.default, args)


def test_opcheck_backward_op():
    x, offset, weight, b, mask = example()
    grad_out = torch.randn(2, 4, 7, 6)
    args = (grad_out, x, offset, weight, b, [1, 1], [1, 1], [1, 1], mask, [True, False, True, True, True])
    torch.library.opcheck(torch.ops.deformable.deform_conv2d_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_compile_fullgraph_matches_eager():
    x, offset, weight, b, mask = example(requires_grad=True)

    def fn(x, offset, weight, b, mask):
        return deform_conv2d(x, offset, weight, b, padding=1, mask=mask).relu().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    expected = fn(x, offset, weight, b, mask)
    expected_grads = torch.autograd.grad(expected, (x, offset, weight, b, mask))
    got = compiled(x, offset, weight, b, mask)
    got_grads = torch.autograd.grad(got, (x, offset, weight, b, mask))
    assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        assert_close(g, e)


def test_compile_inductor_fullgraph():
    x, offset, weight, b, mask = example()
    layer = lambda x, o, m: torch.sigmoid(deform_conv2d(x, o, weight, b, padding=1, mask=m))  # noqa: E731
    compiled = torch.compile(layer, fullgraph=True)
    assert_close(compiled(x, offset, mask), layer(x, offset, mask))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4, 3, 3))
        self.offset = torch.nn.Conv2d(4, 18, 3, padding=1)

    def forward(self, x):
        return deform_conv2d(x, self.offset(x), self.weight, padding=1)


def test_export_captures_one_node():
    net = _Net()
    x = torch.randn(2, 4, 8, 8)
    program = torch.export.export(net, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.deformable.deform_conv2d.default) == 1
    assert_close(program.module()(x), net(x))
