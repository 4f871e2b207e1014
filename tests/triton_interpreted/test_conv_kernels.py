"""deform_conv2d's Triton kernels (forward and every gradient) under Triton's interpreter.

Held to the reference (autograd through it, in float64 on the same float32 inputs) and to
torchvision's kernel, on the lopsided configurations of ``tests/ops/test_deform_conv.py`` at
interpreter-friendly sizes, plus the deterministic scatter, several tiles per dimension,
NaN / border offsets and non-contiguous inputs. Every test checks that Triton actually ran.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close
from deformable.ops import KernelUnavailableError, _triton_conv, deform_conv2d, kernels, reference
from deformable.ops.deform_conv import output_size

TENSORS = ("input", "offset", "weight", "bias", "mask")


def make(batch=2, channels=6, height=7, width=6, out_channels=4, kernel=(3, 2), stride=(2, 1),
         padding=(1, 0), dilation=(2, 1), weight_groups=2, offset_groups=3, *,
         dtype=torch.float32, offset_scale=2.0, modulated=True, bias=True):  # fmt: skip
    """Random arguments; the lopsided defaults of the CPU tests on a smaller image."""
    kh, kw = kernel
    out_h = output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = output_size(width, kw, stride[1], padding[1], dilation[1])
    x = torch.randn(batch, channels, height, width, dtype=dtype)
    offset = torch.randn(batch, 2 * offset_groups * kh * kw, out_h, out_w, dtype=dtype)
    weight = torch.randn(out_channels, channels // weight_groups, kh, kw, dtype=dtype)
    b = torch.randn(out_channels, dtype=dtype) if bias else None
    mask = None
    if modulated:
        mask = torch.rand(batch, offset_groups * kh * kw, out_h, out_w, dtype=dtype)
    return dict(input=x, offset=offset * offset_scale, weight=weight, bias=b, stride=stride,
                padding=padding, dilation=dilation, mask=mask)  # fmt: skip


def grads_of(fn, args, grad_out=None, *, dtype=None, wanted=TENSORS):
    """Output and gradients of the ``wanted`` tensor arguments of ``fn(**args)`` (in ``dtype``)."""
    leaves = {}
    for k, v in args.items():
        if k in TENSORS and v is not None:
            v = v.detach().to(dtype or v.dtype)
            leaves[k] = v.requires_grad_(k in wanted)
        else:
            leaves[k] = v
    out = fn(**leaves)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out.to(out.dtype))
    return out, {k: leaves[k].grad for k in wanted if leaves.get(k) is not None}, grad_out


@pytest.fixture
def launches(monkeypatch):
    """Counts the calls of the Triton forward / backward (so a test cannot pass without them)."""
    counts = {"forward": 0, "backward": 0}
    for name in counts:
        original = getattr(_triton_conv, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_triton_conv, name, counted)
    return counts


@contextlib.contextmanager
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def check_against_oracles(args, *, torchvision_too=True, wanted=TENSORS, deterministic=False):
    with deterministic_algorithms() if deterministic else contextlib.nullcontext():
        out, grads, grad_out = grads_of(deform_conv2d, args, wanted=wanted)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out,
                                           dtype=torch.float64, wanted=wanted)  # fmt: skip
    assert out.dtype == args["input"].dtype
    assert_close(out, expected, out.dtype, what="output")
    assert set(grads) == set(expected_grads)
    for name, grad in expected_grads.items():
        assert grads[name].dtype == args[name].dtype
        assert_close(grads[name], grad, out.dtype, what=f"grad of {name}")
    if torchvision_too:
        tv, tv_grads, _ = grads_of(torchvision.ops.deform_conv2d, args, grad_out, wanted=wanted)
        assert_close(out, tv, what="output vs torchvision")
        for name, grad in tv_grads.items():
            assert_close(grads[name], grad, what=f"grad of {name} vs torchvision")
    return out, grads, grad_out


CONFIGS = {
    "lopsided": {},
    "offset_groups_4": dict(channels=8, offset_groups=4, weight_groups=2),
    "groups_cross": dict(channels=12, offset_groups=3, weight_groups=4, out_channels=8),
    "kernel_1x1": dict(kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1)),
    "kernel_5x5": dict(batch=1, kernel=(5, 5), stride=(1, 2), padding=(2, 2), dilation=(1, 1),
                       height=7, width=8),  # fmt: skip
    "batch_odd": dict(batch=3, weight_groups=1, offset_groups=1, height=5),
    "batch_0": dict(batch=0),
    "far_outside": dict(offset_scale=50.0),
    "v1_no_bias": dict(modulated=False, bias=False),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_reference_and_torchvision(config, launches):
    check_against_oracles(make(**config))
    assert launches == {"forward": 1, "backward": 1}


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 2),
    channels_per_group=st.integers(1, 3),
    offset_groups=st.integers(1, 3),
    weight_groups=st.integers(1, 2),
    out_per_group=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    extra=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    offset_scale=st.sampled_from([0.0, 0.5, 3.0, 30.0]),
    modulated=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(batch, channels_per_group, offset_groups, weight_groups,
                                    out_per_group, kernel, stride, padding, dilation, extra,
                                    offset_scale, modulated, seed):  # fmt: skip
    torch.manual_seed(seed)
    kh, kw = kernel
    height = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]) + extra[0]
    width = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]) + extra[1]
    args = make(batch=batch, channels=channels_per_group * offset_groups * weight_groups,
                height=height, width=width, out_channels=out_per_group * weight_groups,
                kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                weight_groups=weight_groups, offset_groups=offset_groups,
                offset_scale=offset_scale, modulated=modulated)  # fmt: skip
    check_against_oracles(args, torchvision_too=False)


def test_several_tiles_per_dimension(monkeypatch, launches):
    """Positions (4 blocks of 64), channel chunks (runs of 20 = 16 + 4), output channels
    (20 = 16 + 4) and weight-gradient splits (2 x 128 positions) all span several tiles."""
    monkeypatch.setattr(_triton_conv, "_parallelism", lambda device: 10**6)
    args = make(batch=2, channels=40, height=9, width=11, out_channels=20, kernel=(3, 2),
                stride=(1, 1), padding=(1, 1), dilation=(1, 2), weight_groups=1,
                offset_groups=2)  # fmt: skip
    assert output_size(9, 3, 1, 1, 1) * output_size(11, 2, 1, 1, 2) * 2 == 198
    check_against_oracles(args, torchvision_too=False)
    assert launches == {"forward": 1, "backward": 1}


def test_zero_offsets_equal_conv2d(launches):
    args = make(modulated=False, channels=8, out_channels=6, weight_groups=2, offset_groups=2)
    args["offset"] = torch.zeros_like(args["offset"])
    groups = args["input"].shape[1] // args["weight"].shape[1]
    expected = F.conv2d(args["input"], args["weight"], args["bias"], args["stride"],
                        args["padding"], args["dilation"], groups)  # fmt: skip
    assert_close(deform_conv2d(**args), expected)
    assert launches["forward"] == 1


def test_nan_infinite_and_border_offsets(launches):
    """NaN / infinite / huge offsets sample zero and get zero gradients (as the numba kernel; the
    reference cannot take NaN, so those points are compared with a far-away one); samples exactly
    on -1, 0, H-1 and H match the reference, gradients included (one-sided at -1)."""
    x = torch.randn(1, 2, 4, 5)
    weight = torch.randn(3, 2, 1, 1)
    values = torch.tensor([-1.0, -0.5, 0.0, 3.0, 3.5, 4.0, 1e30, float("nan"), float("inf"),
                           -float("inf"), -1.0 - 1e-6, 0.25])  # fmt: skip
    offset = values[torch.randint(len(values), (1, 2, 4, 5))]
    offset[0, :, 0, 0] = -1.0  # the corner sample (-1, -1)
    offset[0, :, 0, 2] = torch.tensor([-1.0, 0.5])  # on the line y = -1: one-sided in y
    offset[0, :, 1, 0] = torch.tensor([0.25, -1.0])  # on the line x = -1: one-sided in x
    offset[0, :, 2, 1] = torch.tensor([1.0, 3.0])  # (H - 1, W - 1)
    offset[0, :, 2, 3] = torch.tensor([2.0, -0.5])  # on the line y = H: zero
    offset[0, 0, 1, 2] = float("nan")
    args = dict(input=x, offset=offset, weight=weight, mask=torch.rand(1, 1, 4, 5))
    out, grads, grad_out = grads_of(deform_conv2d, args)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    finite = torch.where(torch.isfinite(offset) & (offset.abs() < 1e6), offset, 1e6)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, dict(args, offset=finite),
                                           grad_out, dtype=torch.float64)  # fmt: skip
    assert_close(out, expected, torch.float32)
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, torch.float32, what=f"grad of {name}")
    lost = ~torch.isfinite(offset).all(1, keepdim=True) | (offset.abs() >= 1e6).any(1, keepdim=True)
    assert (out * lost).abs().sum() == 0 and (grads["offset"] * lost).abs().sum() == 0
    assert launches == {"forward": 1, "backward": 1}


def test_converging_offsets():
    """Every tap of many positions samples the same few pixels: many contributions per target
    (atomics on one address within one block; deterministic segments longer than a block)."""
    args = make(batch=2, channels=6, height=7, width=6, kernel=(3, 3), stride=(1, 1),
                padding=(1, 1), dilation=(1, 1), weight_groups=1, offset_groups=2)  # fmt: skip
    kh = kw = 3
    out_h, out_w = args["offset"].shape[-2:]
    ys = torch.arange(out_h, dtype=torch.float32)[:, None] - 1 + torch.arange(kh)[:, None, None]
    xs = torch.arange(out_w, dtype=torch.float32)[None, :] - 1 + torch.arange(kw)[:, None, None]
    offset = args["offset"].view(2, 2, kh * kw, 2, out_h, out_w)
    # target (2.3, 3.6) for every tap: offset = target - regular grid point
    offset[:, :, :, 0] = (2.3 - ys.repeat_interleave(kw, 0))
    offset[:, :, :, 1] = (3.6 - xs.repeat(kh, 1, 1))
    check_against_oracles(args, torchvision_too=False)
    check_against_oracles(args, torchvision_too=False, deterministic=True)


class _CountingKernel:
    """Stands in for a Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_deterministic_path_is_repeatable_and_matches_atomics(monkeypatch):
    args = make(batch=2, channels=8, height=7, width=7, out_channels=6, offset_groups=2,
                kernel=(2, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))  # fmt: skip
    atomic, atomic_grads, grad_out = grads_of(deform_conv2d, args)
    scatter = _CountingKernel(_triton_conv._scatter_reduce_kernel)
    monkeypatch.setattr(_triton_conv, "_scatter_reduce_kernel", scatter)
    # slabs of 64 positions: the 2 x 8 x 7 positions take two, each sorted and reduced on its own
    monkeypatch.setattr(_triton_conv, "DETERMINISTIC_TILE_BYTES", 1)
    with deterministic_algorithms():
        runs = [grads_of(deform_conv2d, args, grad_out) for _ in range(2)]
    assert scatter.launches == 4
    (first, first_grads, _), (second, second_grads, _) = runs
    assert torch.equal(first, second)
    for name in first_grads:
        assert torch.equal(first_grads[name], second_grads[name]), name
        assert_close(first_grads[name], atomic_grads[name], what=f"grad of {name}")
    _, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out, dtype=torch.float64)
    assert_close(first_grads["input"], expected_grads["input"], torch.float32)


def test_non_contiguous_and_channels_last_inputs(launches):
    args = make(channels=4, weight_groups=1, offset_groups=2)
    expected = deform_conv2d(**args)
    wide = torch.randn(2, 8, 7, 6)
    wide[:, ::2] = args["input"]
    strided = dict(args, input=wide[:, ::2],
                   offset=args["offset"].transpose(2, 3).contiguous().transpose(2, 3),
                   weight=args["weight"].contiguous(memory_format=torch.channels_last),
                   mask=args["mask"].contiguous(memory_format=torch.channels_last))  # fmt: skip
    assert not strided["input"].is_contiguous() and not strided["offset"].is_contiguous()
    out, grads, grad_out = grads_of(deform_conv2d, strided)
    assert_close(out, expected)
    _, contiguous_grads, _ = grads_of(deform_conv2d, args, grad_out)
    for name in contiguous_grads:
        assert_close(grads[name], contiguous_grads[name], what=f"grad of {name}")
    channels_last = dict(args, input=args["input"].contiguous(memory_format=torch.channels_last))
    assert_close(deform_conv2d(**channels_last), expected)


@pytest.mark.parametrize("wanted", [("input",), ("offset",), ("weight",), ("mask", "bias"),
                                    ("offset", "weight")], ids="+".join)  # fmt: skip
def test_only_the_gradients_asked_for(wanted, launches):
    check_against_oracles(make(batch=1), torchvision_too=False, wanted=wanted)
    assert launches == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_natively(dtype, launches):
    """float16 / bfloat16 computed natively (float32 accumulation), against the reference on the
    same rounded inputs."""
    args = make(batch=1, channels=6, height=6, width=5, weight_groups=1)
    args = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    check_against_oracles(args, torchvision_too=False)
    assert launches == {"forward": 1, "backward": 1}


def test_float64_runs_the_reference(launches):
    args = make(batch=1, dtype=torch.float64)
    out, grads, grad_out = grads_of(deform_conv2d, args)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out)
    assert torch.equal(out, expected)
    for name in grads:
        assert_close(grads[name], expected_grads[name])
    assert launches == {"forward": 0, "backward": 0}


def test_kernels_compiled_for_the_gpu_are_reported(monkeypatch):
    """A kernel module imported before TRITON_INTERPRET=1 holds compiled kernels: CPU tensors
    then get an error saying so rather than a crash in the launcher."""
    monkeypatch.setattr(_triton_conv, "INTERPRETED", False)
    with pytest.raises(KernelUnavailableError, match="imported before TRITON_INTERPRET=1"):
        kernels.select("cpu")
