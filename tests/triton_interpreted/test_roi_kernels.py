"""The Triton kernels of deform_roi_pool / deform_ps_roi_pool under the interpreter.

Held to torchvision (no offsets) and to autograd through the reference (offsets, masks, every
gradient), in float32 on CPU tensors. Sizes are small (the interpreter runs every program in
Python) but lopsided: boxes inside, partly outside, empty, sub-pixel, larger than the map, on the
edge; under the interpreter blocks are 8 channels x 4 bins wide, so 20 channels and 3 x 4 bins
span several blocks of both.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from helpers import assert_close
from deformable.ops import _triton_roi, reference_roi
from deformable.ops.deform_roi_pool import deform_ps_roi_pool, deform_roi_pool

HEIGHT, WIDTH = 7, 9
GAMMA = 0.2


def make_boxes(spatial_scale: float = 1.0) -> torch.Tensor:
    """[K, 5] in image units: inside, partly outside, zero width, zero height, sub-pixel, larger
    than the map, on the edge; three images."""
    feature_boxes = torch.tensor([
        [0, 1.2, 2.3, 6.7, 5.1],
        [1, -3.0, -2.0, 4.0, 3.0],      # partly outside (top-left)
        [1, 3.0, 2.0, 3.0, 6.0],        # zero width
        [0, 2.0, 3.5, 6.5, 3.5],        # zero height
        [0, 6.0, 4.0, 11.5, 9.0],       # partly outside (bottom-right)
        [2, 0.5, 0.5, 1.0, 1.2],        # smaller than a pixel
        [2, -1.0, -1.0, 10.0, 8.0],     # larger than the map
        [1, 8.0, 0.0, 9.0, 6.9],        # on the right edge
    ])  # fmt: skip
    return torch.cat([feature_boxes[:, :1], feature_boxes[:, 1:] / spatial_scale], 1)


def as_list(boxes: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [boxes[boxes[:, 0] == n, 1:] for n in range(batch)]


def in_list_order(boxes: torch.Tensor) -> torch.Tensor:
    return boxes[torch.argsort(boxes[:, 0], stable=True)]


def grads(fn, tensors, grad_out=None):
    """Output of ``fn(*tensors)`` and the gradient of every tensor (None stays None)."""
    tensors = [t if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(grad_out)
    return out, [t if t is None else t.grad for t in tensors], grad_out


def check_against_oracle(ours, oracle, tensors, names):
    out, got, grad_out = grads(ours, tensors)
    expected, wanted, _ = grads(oracle, tensors, grad_out)
    assert_close(out, expected, what="output")
    for name, g, e in zip(names, got, wanted):
        if e is not None:
            assert_close(g, e, what=f"grad of {name}")


class Launches:
    """Stands in for a kernel: counts its launches and records the dtype of its first tensor."""

    def __init__(self, kernel):
        self.kernel, self.count, self.dtypes = kernel, 0, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.count += 1
            self.dtypes.append(args[0].dtype)
            return self.kernel[grid](*args, **kwargs)

        return launch


# ---------------------------------------------------------------------------------------------
# no offsets: torchvision


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_zero_offsets_equal_roi_align(aligned, sampling_ratio):
    x = torch.randn(3, 5, HEIGHT, WIDTH)
    boxes = make_boxes(0.5)
    args = ((2, 3), 0.5, sampling_ratio, aligned)
    expected, (expected_grad,), grad_out = grads(
        lambda x: torchvision.ops.roi_align(x, boxes, *args), [x])  # fmt: skip
    out, (grad,), _ = grads(lambda x: deform_roi_pool(x, boxes, *args), [x], grad_out)
    assert_close(out, expected, what="output")
    assert_close(grad, expected_grad, what="grad of input")
    zero = torch.zeros(boxes.shape[0], 2, 2, 3)
    ones = torch.ones(boxes.shape[0], 1, 2, 3)
    assert_close(deform_roi_pool(x, boxes, *args, offset=zero, mask=ones), expected)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_zero_offsets_equal_ps_roi_align(sampling_ratio):
    x = torch.randn(3, 3 * 2 * 2, HEIGHT, WIDTH)
    boxes = make_boxes(0.5)
    if sampling_ratio <= 0:
        empty = (boxes[:, 1] == boxes[:, 3]) | (boxes[:, 2] == boxes[:, 4])
        assert empty.sum() == 2
        boxes = boxes[~empty]  # torchvision divides by zero (NaN) for them
    args = (2, 0.5, sampling_ratio)
    expected, (expected_grad,), grad_out = grads(
        lambda x: torchvision.ops.ps_roi_align(x, boxes, *args), [x])  # fmt: skip
    out, (grad,), _ = grads(lambda x: deform_ps_roi_pool(x, boxes, *args), [x], grad_out)
    assert_close(out, expected, what="output")
    assert_close(grad, expected_grad, what="grad of input")
    assert_close(deform_ps_roi_pool(x, boxes, *args, offset=torch.zeros(len(boxes), 2, 2, 2)),
                 expected)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# offsets and masks: the reference, every gradient

ROI_CASES = {
    "v1": dict(),
    "v2_modulated": dict(modulated=True),
    "aligned_adaptive_list": dict(aligned=True, sampling_ratio=-1, modulated=True, listed=True),
    "far_offsets": dict(offset_scale=10.0, modulated=True),
    "several_blocks": dict(channels=20, output_size=(3, 4), modulated=True, listed=True,
                           boxes=[0, 1, 4, 6]),
}


@pytest.mark.parametrize("case", ROI_CASES.values(), ids=ROI_CASES.keys())
def test_roi_pool_matches_reference(case):
    channels = case.get("channels", 5)
    output_size = case.get("output_size", (2, 3))
    sampling_ratio = case.get("sampling_ratio", 2)
    aligned = case.get("aligned", False)
    boxes = make_boxes()[case.get("boxes", slice(None))]
    count = boxes.shape[0]
    x = torch.randn(3, channels, HEIGHT, WIDTH)
    offset = torch.randn(count, 2, *output_size) * case.get("offset_scale", 1.5)
    mask = torch.rand(count, 1, *output_size) if case.get("modulated") else None
    given = as_list(boxes, 3) if case.get("listed") else boxes
    if case.get("listed"):  # the list form orders the RoIs by image
        order = torch.argsort(boxes[:, 0], stable=True)
        boxes, offset = boxes[order], offset[order]
        mask = mask[order] if mask is not None else None

    def ours(x, offset, mask):
        return deform_roi_pool(x, given, output_size, 1.0, sampling_ratio, aligned, offset=offset,
                               mask=mask, gamma=GAMMA)  # fmt: skip

    def oracle(x, offset, mask):
        return reference_roi.deform_roi_pool(x, boxes, output_size, 1.0, sampling_ratio, aligned,
                                             offset, mask, GAMMA)  # fmt: skip

    check_against_oracle(ours, oracle, [x, offset, mask], ("input", "offset", "mask"))


PS_CASES = {
    "class_agnostic": dict(groups=1),
    "class_aware_adaptive": dict(groups=3, sampling_ratio=-1),
    "far_offsets_list": dict(groups=1, offset_scale=10.0, listed=True),
    "several_blocks": dict(channels=20, groups=2, output_size=(3, 4), boxes=[0, 1, 4, 6]),
}


@pytest.mark.parametrize("case", PS_CASES.values(), ids=PS_CASES.keys())
def test_ps_roi_pool_matches_reference(case):
    channels = case.get("channels", 3)
    output_size = case.get("output_size", (2, 2))
    sampling_ratio = case.get("sampling_ratio", 2)
    bins = output_size[0] * output_size[1]
    boxes = make_boxes()[case.get("boxes", slice(None))]
    count = boxes.shape[0]
    x = torch.randn(3, channels * bins, HEIGHT, WIDTH)
    offset = torch.randn(count, 2 * case["groups"], *output_size) * case.get("offset_scale", 1.5)
    given = as_list(boxes, 3) if case.get("listed") else boxes
    if case.get("listed"):
        order = torch.argsort(boxes[:, 0], stable=True)
        boxes, offset = boxes[order], offset[order]

    def ours(x, offset):
        return deform_ps_roi_pool(x, given, output_size, 1.0, sampling_ratio, offset=offset,
                                  gamma=GAMMA)  # fmt: skip

    def oracle(x, offset):
        return reference_roi.deform_ps_roi_pool(x, boxes, output_size, 1.0, sampling_ratio,
                                                offset, GAMMA)  # fmt: skip

    check_against_oracle(ours, oracle, [x, offset], ("input", "offset"))


# ---------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("form", ["tensor", "list"])
def test_no_boxes(form):
    x = torch.randn(2, 2 * 4, 5, 6, requires_grad=True)
    boxes = torch.zeros(0, 5) if form == "tensor" else [torch.zeros(0, 4), torch.zeros(0, 4)]
    offset = torch.zeros(0, 2, 2, 2, requires_grad=True)
    mask = torch.zeros(0, 1, 2, 2, requires_grad=True)
    out = deform_roi_pool(x, boxes, 2, 0.5, offset=offset, mask=mask)
    ps = deform_ps_roi_pool(x, boxes, 2, 0.5, offset=offset)
    assert out.shape == (0, 8, 2, 2) and ps.shape == (0, 2, 2, 2)
    (out.sum() + ps.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert offset.grad.shape == offset.shape and mask.grad.shape == mask.shape


def test_non_finite_offsets_pool_zero_with_zero_gradient():
    x = torch.randn(1, 4, 6, 6)
    boxes = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]])
    offset = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30]).reshape(1, 2, 2, 1)
    offset = offset.expand(1, 2, 2, 2).contiguous().requires_grad_()
    out = deform_roi_pool(x, boxes, 2, offset=offset, mask=torch.ones(1, 1, 2, 2))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(offset.grad, torch.zeros_like(offset))
    ps = deform_ps_roi_pool(x, boxes, (2, 2), offset=offset.detach())
    assert torch.equal(ps, torch.zeros_like(ps))


def test_bad_batch_index_pools_zero_in_the_kernels():
    """Indices are checked eagerly; a compiled graph skips that, and the kernels read nothing."""
    x = torch.randn(2, 4, 5, 5)
    boxes = torch.tensor([[5.0, 0, 0, 3, 3], [-1.0, 0, 0, 3, 3], [1.0, 0, 0, 3, 3]])
    out = _triton_roi.forward(x, boxes, (2, 2), 1.0, 2, True, None, None, 0.1)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert_close(out[2:], torchvision.ops.roi_align(x, boxes[2:], 2, 1.0, 2, True))
    ps = _triton_roi.ps_forward(x, boxes, (1, 2), 1.0, 2, None, 0.1)
    assert torch.equal(ps[:2], torch.zeros_like(ps[:2]))
    grad_input, _ = _triton_roi.ps_backward(torch.ones(2, 2, 1, 2), x, boxes[:2], (1, 2), 1.0, 2,
                                            None, 0.1, (True, False))  # fmt: skip
    assert torch.equal(grad_input, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_read_natively_summed_in_float32(dtype, monkeypatch):
    forward = Launches(_triton_roi._forward_kernel)
    monkeypatch.setattr(_triton_roi, "_forward_kernel", forward)
    boxes = make_boxes() % torch.tensor([2.0, 100, 100, 100, 100])  # two images
    count = boxes.shape[0]
    low = [t.to(dtype) for t in (torch.randn(2, 6, HEIGHT, WIDTH), torch.randn(count, 2, 2, 2),
                                 torch.rand(count, 1, 2, 2))]  # fmt: skip

    def ours(x, offset, mask):
        return deform_roi_pool(x, boxes, 2, 1.0, 2, offset=offset, mask=mask, gamma=GAMMA)

    def oracle(x, offset, mask):  # float32 from the same half values
        return reference_roi.deform_roi_pool(x.float(), boxes, (2, 2), 1.0, 2, False,
                                             offset.float(), mask.float(), GAMMA)  # fmt: skip

    out, got, grad_out = grads(ours, low)
    assert forward.dtypes == [dtype], "the kernel did not read the half input"
    assert out.dtype == dtype and all(g.dtype == dtype for g in got)
    expected, wanted, _ = grads(oracle, low, grad_out.float())
    assert_close(out, expected.to(dtype), dtype, what="output")
    for name, g, e in zip(("input", "offset", "mask"), got, wanted):
        assert_close(g, e.to(dtype), dtype, what=f"grad of {name}")


# ---------------------------------------------------------------------------------------------
# the deterministic input gradient (no float atomics)


@pytest.mark.parametrize("op", ["roi", "ps"])
def test_deterministic_input_gradient(op, monkeypatch):
    """No float atomics, several list chunks, repeatable, equal to the atomic path.

    (Under the interpreter programs run one after another, so only a GPU can show the atomic
    path's run-to-run differences; here the test shows which path runs and that it is right.)
    """
    # lists of ~256 entries: the gradient is built over several chunks
    monkeypatch.setattr(_triton_roi, "_DETERMINISTIC_ENTRIES", 256)
    atomics = Launches(_triton_roi._input_grad_kernel)
    chunks = Launches(_triton_roi._contributions_kernel)
    monkeypatch.setattr(_triton_roi, "_input_grad_kernel", atomics)
    monkeypatch.setattr(_triton_roi, "_contributions_kernel", chunks)
    boxes = make_boxes()[[0, 1, 4, 6, 7]]  # big and partly outside; the small and empty: above
    count = boxes.shape[0]
    if op == "roi":
        x = torch.randn(3, 10, HEIGHT, WIDTH)
        offset, mask = torch.randn(count, 2, 2, 3) * 2, torch.rand(count, 1, 2, 3)

        def pool(x):
            return deform_roi_pool(x, boxes, (2, 3), 1.0, -1, True, offset=offset, mask=mask)
    else:
        x = torch.randn(3, 4 * 2 * 2, HEIGHT, WIDTH)
        offset = torch.randn(count, 2 * 2, 2, 2) * 2  # two offset groups

        def pool(x):
            return deform_ps_roi_pool(x, boxes, 2, 1.0, -1, offset=offset)

    _, (atomic,), grad_out = grads(pool, [x])
    assert atomics.count == 1 and chunks.count == 0
    torch.use_deterministic_algorithms(True)
    try:
        _, (first,), _ = grads(pool, [x], grad_out)
        _, (second,), _ = grads(pool, [x], grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
    assert atomics.count == 1, "float atomics ran in deterministic mode"
    assert chunks.count >= 2 * 3, "expected several chunks per backward"
    assert torch.equal(first, second), "not bit-identical on repeat"
    assert_close(first, atomic, what="deterministic vs atomic")
