"""deform_conv2d: the fast CPU kernel held to torchvision, the reference, F.conv2d and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close
from deformable.ops import _deform_conv_cpu, deform_conv2d, reference, use_kernels
from deformable.ops.deform_conv import output_size


def make(batch=2, channels=6, height=9, width=8, out_channels=4, kernel=(3, 2), stride=(2, 1),
         padding=(1, 0), dilation=(2, 1), weight_groups=2, offset_groups=3, *,
         dtype=torch.float64, offset_scale=2.0, modulated=True, bias=True):  # fmt: skip
    """Random arguments of a deformable convolution (lopsided defaults, as torchvision's tests)."""
    kh, kw = kernel
    out_h = output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = output_size(width, kw, stride[1], padding[1], dilation[1])
    x = torch.randn(batch, channels, height, width, dtype=dtype)
    offset = torch.randn(batch, 2 * offset_groups * kh * kw, out_h, out_w, dtype=dtype)
    weight = torch.randn(out_channels, channels // weight_groups, kh, kw, dtype=dtype)
    b = torch.randn(out_channels, dtype=dtype) if bias else None
    mask = torch.rand(batch, offset_groups * kh * kw, out_h, out_w, dtype=dtype) if modulated else None
    return dict(input=x, offset=offset * offset_scale, weight=weight, bias=b, stride=stride,
                padding=padding, dilation=dilation, mask=mask)  # fmt: skip


TENSORS = ("input", "offset", "weight", "bias", "mask")

CONFIGS = {
    "lopsided": {},
    "offset_groups_4": dict(channels=8, offset_groups=4, weight_groups=2),
    "groups_cross": dict(channels=12, offset_groups=3, weight_groups=4, out_channels=8),
    "kernel_1x1": dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1)),
    "kernel_5x5": dict(kernel=(5, 5), stride=(1, 2), padding=(2, 2), dilation=(1, 1), height=11,
                       width=10),  # fmt: skip
    "batch_1": dict(batch=1),
    "batch_odd": dict(batch=5, weight_groups=1, offset_groups=1),
    "batch_0": dict(batch=0),
    "far_outside": dict(offset_scale=50.0),
    "v1_no_bias": dict(modulated=False, bias=False),
}


def grads_of(fn, args, grad_out=None):
    """Output and gradients of every tensor argument of ``fn(**args)``."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in TENSORS and v is not None else v)
              for k, v in args.items()}  # fmt: skip
    out = fn(**leaves)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)
    return out, {k: leaves[k].grad for k in TENSORS if leaves[k] is not None}, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torchvision(config, dtype):
    args = make(dtype=dtype, **config)
    out, grads, grad_out = grads_of(deform_conv2d, args)
    expected, expected_grads, _ = grads_of(torchvision.ops.deform_conv2d, args, grad_out)
    assert_close(out, expected, what="output")
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, what=f"grad of {name}")


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_reference_matches_torchvision(config):
    """The oracle itself is right: the reference agrees with torchvision in float64."""
    args = make(**config)
    out, grads, grad_out = grads_of(reference.deform_conv2d, args)
    expected, expected_grads, _ = grads_of(torchvision.ops.deform_conv2d, args, grad_out)
    assert_close(out, expected)
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, what=f"grad of {name}")


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_device_fallback_matches_fast_kernel(config):
    """The reference, which runs on devices without a fast kernel (MPS, ...), forced here."""
    args = make(**config)
    names = [k for k in TENSORS if args[k] is not None]
    runs = {}
    for kernel_set in ("reference", "numba"):
        leaves = {k: args[k].detach().clone().requires_grad_() for k in names}
        with use_kernels(kernel_set):
            out = deform_conv2d(**{**args, **leaves})
            out.backward(torch.ones_like(out) + torch.arange(out.numel()).view_as(out) % 3)
        runs[kernel_set] = out.detach(), {k: t.grad for k, t in leaves.items()}
    (slow, slow_grads), (fast, fast_grads) = runs["reference"], runs["numba"]
    assert_close(fast, slow)
    for name in names:
        assert_close(fast_grads[name], slow_grads[name], what=f"grad of {name}")


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck(modulated, bias):
    args = make(batch=2, channels=4, height=6, width=5, out_channels=2, weight_groups=2,
                offset_groups=2, modulated=modulated, bias=bias, offset_scale=1.5)  # fmt: skip
    names = [k for k in TENSORS if args[k] is not None]

    def fn(*tensors):
        return deform_conv2d(**{**args, **dict(zip(names, tensors))})

    inputs = tuple(args[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, nondet_tol=0.0)


def test_zero_offsets_equal_conv2d():
    args = make(dtype=torch.float32, modulated=False)
    args["offset"] = torch.zeros_like(args["offset"])
    out = deform_conv2d(**args)
    groups = args["input"].shape[1] // args["weight"].shape[1]
    expected = F.conv2d(args["input"], args["weight"], args["bias"], args["stride"],
                        args["padding"], args["dilation"], groups)  # fmt: skip
    assert_close(out, expected)


def test_mask_of_ones_equals_v1():
    args = make(dtype=torch.float32)
    args["mask"] = torch.ones_like(args["mask"])
    v1 = deform_conv2d(**{**args, "mask": None})
    assert torch.equal(deform_conv2d(**args), v1)


def test_integer_offsets_equal_shifted_convolution():
    """Moving every tap by (+2, -1) pixels is a convolution of the shifted, zero-filled input."""
    x = torch.randn(2, 3, 10, 12, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    offset = torch.zeros(2, 18, 10, 12, dtype=torch.float64)
    offset[:, 0::2] = 2.0
    offset[:, 1::2] = -1.0
    # with padding 1, tap (i, j) of output (y, x) reads x[y + i - 1 + 2, x + j - 1 - 1]
    big = F.pad(x, (3, 3, 3, 3))  # big[a + 3, b + 3] = x[a, b], zero outside
    shifted = big[:, :, 4 : 4 + 12, 1 : 1 + 14]
    expected = F.conv2d(shifted, weight)
    assert_close(deform_conv2d(x, offset, weight, padding=1), expected)


def test_batch_zero_backward():
    args = make(batch=0)
    out, grads, _ = grads_of(deform_conv2d, args)
    assert out.shape == (0, 4, 4, 7)
    assert grads["weight"].abs().sum() == 0 and grads["bias"].abs().sum() == 0


def test_non_contiguous_and_channels_last_inputs():
    args = make(dtype=torch.float64, channels=4, weight_groups=1, offset_groups=2)
    expected = deform_conv2d(**args)
    wide = torch.randn(2, 8, 9, 8, dtype=torch.float64)
    wide[:, ::2] = args["input"]
    strided = dict(args, input=wide[:, ::2],
                   offset=args["offset"].transpose(2, 3).contiguous().transpose(2, 3),
                   weight=args["weight"].contiguous(memory_format=torch.channels_last),
                   mask=args["mask"].contiguous(memory_format=torch.channels_last))  # fmt: skip
    assert not strided["input"].is_contiguous() and not strided["offset"].is_contiguous()
    assert_close(deform_conv2d(**strided), expected)
    channels_last = dict(args, input=args["input"].contiguous(memory_format=torch.channels_last))
    assert_close(deform_conv2d(**channels_last), expected)


@pytest.mark.parametrize("budget", [1, 700, 5000])
def test_tiling_is_exact(monkeypatch, budget):
    """Tiny tile budgets force tiles of columns, rows and images: same results, every gradient."""
    args = make(batch=3, height=12, width=11)
    expected, expected_grads, grad_out = grads_of(deform_conv2d, args)
    monkeypatch.setattr(_deform_conv_cpu, "TILE_BYTES", budget)
    out, grads, _ = grads_of(deform_conv2d, args, grad_out)
    assert_close(out, expected)
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, what=f"grad of {name}")


def test_repeatable_bit_for_bit():
    args = make(dtype=torch.float32, batch=3, channels=16, height=20, width=20, out_channels=8,
                weight_groups=1, offset_groups=2)  # fmt: skip
    first, first_grads, grad_out = grads_of(deform_conv2d, args)
    second, second_grads, _ = grads_of(deform_conv2d, args, grad_out)
    assert torch.equal(first, second)
    for name in first_grads:
        assert torch.equal(first_grads[name], second_grads[name]), name


def test_thread_count_does_not_change_results():
    args = make(dtype=torch.float64, channels=8, height=16, width=16, weight_groups=1,
                offset_groups=2)  # fmt: skip
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, single_grads, grad_out = grads_of(deform_conv2d, args)
        torch.set_num_threads(2)
        multi, multi_grads, _ = grads_of(deform_conv2d, args, grad_out)
    finally:
        torch.set_num_threads(before)
    # the partition of the work does not depend on the threads that run it: bit-identical
    assert torch.equal(multi, single)
    for name in single_grads:
        assert torch.equal(multi_grads[name], single_grads[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    args = make(dtype=torch.float32)
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out, grads, _ = grads_of(deform_conv2d, low)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    upcast = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in low.items()}
    assert_close(out, deform_conv2d(**upcast).to(dtype), dtype)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels_per_group=st.integers(1, 5),
    offset_groups=st.integers(1, 3),
    weight_groups=st.integers(1, 2),
    out_per_group=st.integers(1, 4),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    extra=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    offset_scale=st.sampled_from([0.0, 0.5, 3.0, 30.0]),
    modulated=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_fast_kernel_matches_reference(batch, channels_per_group, offset_groups,
                                                weight_groups, out_per_group, kernel, stride,
                                                padding, dilation, extra, offset_scale, modulated,
                                                seed):  # fmt: skip
    torch.manual_seed(seed)
    kh, kw = kernel
    height = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]) + extra[0]
    width = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]) + extra[1]
    # channels split by offset groups and weight groups independently (runs cross both)
    args = make(batch=batch, channels=channels_per_group * offset_groups * weight_groups,
                height=height, width=width, out_channels=out_per_group * weight_groups,
                kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                weight_groups=weight_groups, offset_groups=offset_groups,
                offset_scale=offset_scale, modulated=modulated)  # fmt: skip
    out, grads, grad_out = grads_of(deform_conv2d, args)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out)
    assert_close(out, expected)
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, what=f"grad of {name}")


def test_offsets_on_the_image_border():
    """Samples exactly on -1, 0, H-1 and H; NaN and infinite offsets sample zero, never crash."""
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    weight = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    for value in (-1.0, -0.5, 3.0, 3.5, 4.0, 1e30, float("nan"), float("inf"), -float("inf")):
        runs = {}
        for kernel_set in ("numba", "reference"):  # the reference too: it runs on MPS, XPU, ...
            offset = torch.full((1, 2, 4, 5), value, dtype=torch.float64, requires_grad=True)
            with use_kernels(kernel_set):
                out = deform_conv2d(x, offset, weight)
                out.backward(torch.ones_like(out))
            assert torch.isfinite(out).all() and torch.isfinite(offset.grad).all()
            runs[kernel_set] = out.detach(), offset.grad
        assert_close(runs["numba"][0], runs["reference"][0])
        assert_close(runs["numba"][1], runs["reference"][1])
        if torch.isfinite(torch.tensor(value)) and abs(value) < 1e6:
            assert_close(out, torchvision.ops.deform_conv2d(x, offset.detach(), weight))
        else:
            assert not runs["numba"][0].any() and not runs["numba"][1].any()


class TestBadInput:
    def call(self, **changes):
        args = make(dtype=torch.float32)
        args.update(changes)
        return deform_conv2d(**args)

    def test_offset_channels(self):
        with pytest.raises(ValueError, match="offset must have 2 \\* offset_groups \\* kh \\* kw"):
            self.call(offset=torch.randn(2, 13, 5, 7))

    def test_offset_groups_do_not_divide_channels(self):
        with pytest.raises(ValueError, match="divisible by offset_groups"):
            self.call(offset=torch.randn(2, 2 * 4 * 6, 4, 7), mask=None)

    def test_offset_spatial_size(self):
        with pytest.raises(ValueError, match=r"offset must be \[batch.*\[2, 36, 4, 7\].*\[2, 36, 5, 7\]"):
            self.call(offset=torch.randn(2, 36, 5, 7))

    def test_mask_shape(self):
        with pytest.raises(ValueError, match="mask must be"):
            self.call(mask=torch.rand(2, 17, 4, 7))
        with pytest.raises(ValueError, match="mask must be"):
            self.call(mask=torch.rand(2, 18, 4, 6))

    def test_weight_groups(self):
        with pytest.raises(ValueError, match="multiple of weight.shape\\[1\\]"):
            self.call(weight=torch.randn(4, 4, 3, 2))
        with pytest.raises(ValueError, match="out_channels \\(5\\) must be divisible"):
            self.call(weight=torch.randn(5, 3, 3, 2), bias=None)

    def test_kernel_larger_than_padded_input(self):
        with pytest.raises(ValueError, match="larger than the padded input"):
            deform_conv2d(torch.randn(1, 1, 3, 3), torch.zeros(1, 50, 1, 1), torch.randn(1, 1, 5, 5))

    def test_three_dimensional_input(self):
        with pytest.raises(ValueError, match="input must be 4-D"):
            self.call(input=torch.randn(6, 9, 8))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="offset has dtype torch.float64"):
            self.call(offset=torch.randn(2, 36, 4, 7, dtype=torch.float64))

    def test_integer_input(self):
        with pytest.raises(TypeError, match="input must be a floating-point tensor"):
            self.call(input=torch.ones(2, 6, 9, 8, dtype=torch.int64))

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="weight is on meta"):
            self.call(weight=torch.randn(4, 3, 3, 2, device="meta"))

    def test_bias_shape(self):
        with pytest.raises(ValueError, match="bias must be \\[out_channels\\]"):
            self.call(bias=torch.randn(5))

    def test_stride(self):
        with pytest.raises(ValueError, match="stride must be >= 1"):
            self.call(stride=0)
        with pytest.raises(TypeError, match="padding must be an int or a pair"):
            self.call(padding=1.5)
        with pytest.raises(ValueError, match="dilation must be an int or a pair"):
            self.call(dilation=(1, 1, 1))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="offset must be a Tensor"):
            self.call(offset=[0.0])


@pytest.mark.parametrize("kernel_set", ["numba", "reference"])
def test_offset_gradient_on_the_band_edges(kernel_set):
    """Zero-offset taps in a padding of 1 lie exactly on -1 and on H / W: the value is 0; the
    offset gradient is the derivative from inside at -1 (torchvision's choice, not mmcv's 0) and
    0 at H / W. Pinned here, as the docstring's Convention says."""
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    weight = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    offset = torch.zeros(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    with use_kernels(kernel_set):
        out = deform_conv2d(x, offset, weight, padding=1)
    assert out[0, 0, 0, 2] == 0 and out[0, 0, 4, 2] == 0 and out[0, 0, 2, 0] == 0
    picks = {(0, 0, 2): 1.0, (4, 0, 2): 10.0, (2, 1, 0): 100.0, (2, 1, 4): 1000.0}
    grad_out = torch.zeros_like(out)
    for (y, _, x_), scale in picks.items():
        grad_out[0, 0, y, x_] = scale
    out.backward(grad_out)
    dy, dx = offset.grad[0, 0], offset.grad[0, 1]
    assert dy[0, 2] == 2.0 * x[0, 0, 0, 1]  # top edge y = -1: from inside, weight x corner (0, 1)
    assert dy[4, 2] == 0.0  # bottom edge y = H
    assert dx[2, 0] == 100.0 * 2.0 * x[0, 0, 1, 0]  # left edge x = -1
    assert dx[2, 4] == 0.0  # right edge x = W
    # torchvision agrees
    tv_offset = offset.detach().clone().requires_grad_()
    torchvision.ops.deform_conv2d(x, tv_offset, weight, padding=1).backward(grad_out)
    assert torch.equal(tv_offset.grad, offset.grad)
