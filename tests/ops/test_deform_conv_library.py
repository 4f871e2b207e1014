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


# ---------------------------------------------------------------------------------------------
# The direct call: deform_conv2d runs the op's kernel itself, without the op's dispatch, where
# nothing needs the op.


def counted(monkeypatch, name):
    """The calls of ``deform_conv``'s function ``name`` (a spy in its place), from an empty
    memory of checked calls."""
    from deformable.ops import deform_conv

    calls = []
    function = getattr(deform_conv, name)

    def spy(*args):
        calls.append(1)
        return function(*args)

    monkeypatch.setattr(deform_conv, name, spy)
    monkeypatch.setattr(deform_conv, "_checked", {})
    return calls


@pytest.fixture
def direct_calls(monkeypatch):
    """How many times deform_conv2d called the kernel itself (``_direct``; the op calls the
    kernel it was registered with)."""
    return counted(monkeypatch, "_direct")


def call(tensors):
    x, offset, weight, b, mask = tensors
    return deform_conv2d(x, offset, weight, b, padding=1, mask=mask)


def test_direct_call_without_gradients_same_bits_as_the_op(direct_calls):
    x, offset, weight, b, mask = tensors = example()
    via_op = torch.ops.deformable.deform_conv2d(x, offset, weight, b, [1, 1], [1, 1], [1, 1], mask)
    assert direct_calls == []
    assert torch.equal(call(tensors), via_op)  # nothing needs a gradient
    assert len(direct_calls) == 1
    assert torch.equal(call(tensors), via_op)  # again: a kept call, the numba forward itself
    assert len(direct_calls) == 2
    with torch.no_grad():  # a layer's Parameter under no_grad
        assert torch.equal(call([x, offset, torch.nn.Parameter(weight), b, mask]), via_op)
    assert len(direct_calls) == 3


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning",
                            "ignore:.*batching rule")  # fmt: skip
def test_the_op_runs_where_something_needs_it(direct_calls):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    tensors = example(requires_grad=True)
    out = call(tensors)  # autograd: the op's formula
    out.sum().backward()
    assert tensors[1].grad is not None

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    plain = example()
    x, offset, weight, b, mask = plain
    expected = call(plain)  # the one direct call
    with Log() as log:
        call(plain)
    assert "deformable.deform_conv2d.default" in log.ops
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if t is not None else None for t in plain]
        assert call(fake).shape == (2, 4, 7, 6)
    with torch.profiler.profile() as prof:
        call(plain)
    assert any("deformable::deform_conv2d" in e.name for e in prof.events())
    one = torch.func.vmap(lambda x, o, m: call([x[None], o[None], weight, b, m[None]])[0])
    assert_close(one(x, offset, mask), expected)
    traced = torch.jit.trace(lambda x: call([x, *plain[1:]]), plain[0], check_trace=False)
    assert "deformable::deform_conv2d" in str(traced.graph)
    assert len(direct_calls) == 1


# ---------------------------------------------------------------------------------------------
# Checked calls: a call whose arguments passed the checks is kept by its key, and the same call
# again skips them; anything the checks depend on makes another key.


@pytest.fixture
def checks(monkeypatch):
    """How many times deform_conv2d ran its argument checks."""
    return counted(monkeypatch, "_check_arguments")


def test_a_repeated_call_skips_the_checks_it_passed(checks):
    x, offset, weight, b, mask = tensors = example()
    first = call(tensors)
    assert torch.equal(call(tensors), first) and len(checks) == 1
    assert torch.equal(deform_conv2d(x, offset, weight, b, 1, 1, 1, mask), first)
    assert len(checks) == 1  # the same arguments, given by position
    assert torch.equal(deform_conv2d(x, offset, weight, b, (1, 1), 1, (1, 1), mask), first)
    assert len(checks) == 2  # pairs: another key, checked once
    assert torch.equal(deform_conv2d(x, offset, weight, b, (1, 1), 1, (1, 1), mask), first)
    assert len(checks) == 2
    as_lists = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1])  # lists are never kept
    for _ in range(2):
        assert torch.equal(deform_conv2d(x, offset, weight, b, mask=mask, **as_lists), first)
    assert len(checks) == 4
    doubles = [t.double() for t in tensors]
    assert_close(call(doubles), first.double(), torch.float32)
    assert len(checks) == 5


def test_what_the_checks_depend_on_is_checked_again(checks):
    x, offset, weight, b, mask = tensors = example()
    call(tensors)
    with pytest.raises(TypeError, match="padding"):  # True equals 1 but is not an int here
        deform_conv2d(x, offset, weight, b, padding=True, mask=mask)
    with pytest.raises(TypeError, match="padding"):
        deform_conv2d(x, offset, weight, b, padding=(True, 1), mask=mask)
    with pytest.raises(ValueError, match="offset must be"):
        deform_conv2d(x, offset, weight, b, padding=2, mask=mask)  # another output size
    with pytest.raises(ValueError, match="mask must be"):
        deform_conv2d(x, offset, weight, b, padding=1, mask=mask[:, :9])
    with pytest.raises(TypeError, match="dtype"):
        deform_conv2d(x, offset.double(), weight, b, padding=1, mask=mask)
    with pytest.raises(ValueError, match="bias"):
        deform_conv2d(x, offset, weight, b[:3], padding=1, mask=mask)
    with pytest.raises(TypeError, match="offset must be a Tensor"):
        deform_conv2d(x, offset.numpy(), weight, b, padding=1, mask=mask)
    for _ in range(2):  # under autocast the tensors are cast first: never kept
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert call(tensors).dtype == torch.bfloat16
    assert len(checks) == 1 + 5 + 2  # (the pairs are refused before the checks)


def test_the_kept_calls_are_bounded(checks):
    from deformable.ops import deform_conv

    weight = torch.randn(2, 1, 1, 1)
    for width in range(1, 301):
        x = torch.randn(1, 1, 1, width)
        deform_conv2d(x, torch.zeros(1, 2, 1, width), weight)
        assert len(deform_conv._checked) <= 256
    assert len(checks) == 300


def test_a_kept_call_still_follows_the_kernel_choice(checks, monkeypatch):
    """A kept call of CPU float32 / float64 tensors runs the numba forward directly, unless
    another kernel set is asked for (``use_kernels``, ``DEFORMABLE_KERNELS``); other dtypes go
    through the kernel selection (float16 and bfloat16 computed in float32)."""
    from deformable.ops import _deform_conv_cpu, reference, use_kernels

    ran = []

    def spy(name, function):
        def counted(*args):
            ran.append(name)
            return function(*args)

        return counted

    monkeypatch.setattr(_deform_conv_cpu, "forward", spy("numba", _deform_conv_cpu.forward))
    monkeypatch.setattr(reference, "deform_conv2d", spy("reference", reference.deform_conv2d))
    tensors = example()
    first = call(tensors)
    assert torch.equal(call(tensors), first) and ran == ["numba", "numba"]
    with use_kernels("reference"):
        assert_close(call(tensors), first)
    assert ran[2:] == ["reference"]
    monkeypatch.setenv("DEFORMABLE_KERNELS", "reference")
    assert_close(call(tensors), first)
    assert ran[3:] == ["reference"]
    monkeypatch.delenv("DEFORMABLE_KERNELS")
    halves = [t.bfloat16() for t in tensors]
    results = [call(halves) for _ in range(2)]
    assert all(r.dtype == torch.bfloat16 for r in results) and torch.equal(*results)
    assert ran[4:] == ["numba", "numba"] and len(checks) == 2
