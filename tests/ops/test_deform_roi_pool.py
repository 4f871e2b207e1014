"""deform_roi_pool / deform_ps_roi_pool: held to torchvision, the reference and gradcheck."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_close
from deformable.ops import _deform_roi_pool_cpu, reference_roi
from deformable.ops.deform_roi_pool import deform_ps_roi_pool, deform_roi_pool

HEIGHT, WIDTH = 9, 11


def make_boxes(spatial_scale: float, dtype=torch.float64) -> torch.Tensor:
    """[K, 5] boxes in image units: inside, partly outside, zero-width, tiny, large, on the edge."""
    feature_boxes = torch.tensor([
        [0, 1.2, 2.3, 7.7, 8.1],
        [1, -3.0, -2.0, 5.0, 4.0],      # partly outside (top-left)
        [1, 3.0, 2.0, 3.0, 7.0],        # zero width
        [0, 8.0, 5.0, 14.5, 12.0],      # partly outside (bottom-right)
        [1, 0.5, 0.5, 1.0, 1.2],        # smaller than a pixel
        [0, -1.0, -1.0, 12.0, 10.0],    # larger than the map
        [2, 10.0, 0.0, 11.0, 8.9],      # on the right edge
        [1, 4.25, 3.5, 9.75, 4.0],      # flat
    ], dtype=dtype)  # fmt: skip
    return torch.cat([feature_boxes[:, :1], feature_boxes[:, 1:] / spatial_scale], 1)


def as_list(boxes: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [boxes[boxes[:, 0] == n, 1:] for n in range(batch)]


def leaves(*tensors):
    return [t if t is None else t.detach().clone().requires_grad_() for t in tensors]


def grads(fn, tensors, grad_out=None):
    """Output of ``fn(*tensors)`` and the gradient of every tensor (None stays None)."""
    tensors = leaves(*tensors)
    out = fn(*tensors)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    out.backward(grad_out)
    return out, [t if t is None else t.grad for t in tensors], grad_out


# ---------------------------------------------------------------------------------------------
# parity with torchvision when there are no offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25, 0.0625])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_zero_offset_equals_roi_align(aligned, sampling_ratio, spatial_scale, dtype):
    x = torch.randn(3, 5, HEIGHT, WIDTH, dtype=dtype)
    boxes = make_boxes(spatial_scale, dtype)
    args = ((3, 2), spatial_scale, sampling_ratio, aligned)
    expected, (expected_grad,), grad_out = grads(
        lambda x: torchvision.ops.roi_align(x, boxes, *args), [x])  # fmt: skip
    out, (grad,), _ = grads(lambda x: deform_roi_pool(x, boxes, *args), [x], grad_out)
    assert_close(out, expected, what="output")
    assert_close(grad, expected_grad, what="grad of input")
    zero = torch.zeros(boxes.shape[0], 2, 3, 2, dtype=dtype)
    ones = torch.ones(boxes.shape[0], 1, 3, 2, dtype=dtype)
    assert_close(deform_roi_pool(x, boxes, *args, offset=zero, mask=ones), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25, 0.0625])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
def test_zero_offset_equals_ps_roi_align(sampling_ratio, spatial_scale, dtype):
    x = torch.randn(3, 4 * 3 * 2, HEIGHT, WIDTH, dtype=dtype)
    boxes = make_boxes(spatial_scale, dtype)
    args = ((3, 2), spatial_scale, sampling_ratio)
    expected, (expected_grad,), grad_out = grads(
        lambda x: torchvision.ops.ps_roi_align(x, boxes, *args), [x])  # fmt: skip
    out, (grad,), _ = grads(lambda x: deform_ps_roi_pool(x, boxes, *args), [x], grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    finite = torch.isfinite(expected).flatten(1).all(1)  # torchvision: NaN for empty boxes
    if sampling_ratio > 0:
        assert finite.all()
    else:
        assert not finite[2], "the zero-width box (NaN in torchvision) is in the test"
    assert_close(out[finite], expected[finite], what="output")
    # input gradients over the boxes torchvision handles
    _, (expected_grad,), _ = grads(lambda x: torchvision.ops.ps_roi_align(x, boxes[finite], *args),
                                   [x], grad_out[finite])  # fmt: skip
    _, (grad,), _ = grads(lambda x: deform_ps_roi_pool(x, boxes[finite], *args), [x],
                          grad_out[finite])  # fmt: skip
    assert_close(grad, expected_grad, what="grad of input")


def test_ps_zero_width_box_samples_its_edge():
    """Where torchvision divides by zero, one sample per axis: the values along the box's edge."""
    x = torch.randn(1, 2 * 2 * 2, HEIGHT, WIDTH, dtype=torch.float64)
    line = torch.tensor([[0, 3.5, 1.5, 3.5, 7.5]], dtype=torch.float64)
    assert torch.isnan(torchvision.ops.ps_roi_align(x, line, 2, sampling_ratio=-1)).all()
    out = deform_ps_roi_pool(x, line, 2, sampling_ratio=-1)
    thin = torch.tensor([[0, 3.5 - 1e-12, 1.5, 3.5 + 1e-12, 7.5]], dtype=torch.float64)
    expected = torchvision.ops.ps_roi_align(x, thin, 2, sampling_ratio=-1)
    assert torch.isfinite(expected).all()
    assert_close(out, expected, what="a hair-thin box")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_list_of_boxes_form(dtype):
    x = torch.randn(3, 2 * 4, HEIGHT, WIDTH, dtype=dtype)
    boxes = make_boxes(0.5, dtype)
    order = torch.argsort(boxes[:, 0], stable=True)
    listed = as_list(boxes, 3)
    expected = torchvision.ops.roi_align(x, boxes[order], 2, 0.5, 2, True)
    assert_close(deform_roi_pool(x, listed, 2, 0.5, 2, True), expected)
    expected = torchvision.ops.ps_roi_align(x, boxes[order], 2, 0.5, 2)
    assert_close(deform_ps_roi_pool(x, listed, 2, 0.5, 2), expected)
    # a list form identical to torchvision's own
    assert_close(deform_roi_pool(x, listed, 2, 0.5, 2),
                 torchvision.ops.roi_align(x, listed, 2, 0.5, 2))  # fmt: skip


def test_reference_matches_torchvision():
    """The oracle itself is right without offsets, on the same lopsided boxes."""
    x = torch.randn(3, 12, HEIGHT, WIDTH, dtype=torch.float64)
    for aligned in (False, True):
        for scale in (1.0, 0.25):
            boxes = make_boxes(scale)
            assert_close(reference_roi.deform_roi_pool(x, boxes, (2, 3), scale, -1, aligned),
                         torchvision.ops.roi_align(x, boxes, (2, 3), scale, -1, aligned))  # fmt: skip
            assert_close(reference_roi.deform_ps_roi_pool(x, boxes, (2, 3), scale, 2),
                         torchvision.ops.ps_roi_align(x, boxes, (2, 3), scale, 2))  # fmt: skip


def test_offset_moves_bins_by_roi_size():
    """A uniform offset (dx, dy) is RoIAlign of the box moved by gamma * (dx * w, dy * h)."""
    x = torch.randn(1, 3, 20, 24, dtype=torch.float64)
    box = torch.tensor([[0, 4.0, 3.0, 12.0, 15.0]], dtype=torch.float64)
    offset = torch.empty(1, 2, 3, 3, dtype=torch.float64)
    offset[:, 0], offset[:, 1] = 2.5, -1.0  # right 0.25 * 8 = 2, up 0.1 * 12 = 1.2 (gamma 0.1)
    moved = box + torch.tensor([[0, 2.0, -1.2, 2.0, -1.2]], dtype=torch.float64)
    expected = torchvision.ops.roi_align(x, moved, 3, 1.0, 2, True)
    assert_close(deform_roi_pool(x, box, 3, 1.0, 2, True, offset=offset), expected)
    mask = torch.rand(1, 1, 3, 3, dtype=torch.float64)
    assert_close(deform_roi_pool(x, box, 3, 1.0, 2, True, offset=offset, mask=mask),
                 expected * mask)  # fmt: skip
    ps_x = torch.randn(1, 2 * 9, 20, 24, dtype=torch.float64)
    ps_expected = torchvision.ops.ps_roi_align(ps_x, moved, 3, 1.0, 2)
    assert_close(deform_ps_roi_pool(ps_x, box, 3, 1.0, 2, offset=offset), ps_expected)
    # class-aware: group 1 moves, group 0 does not
    aware = torch.cat([torch.zeros_like(offset), offset], 1)
    out = deform_ps_roi_pool(ps_x, box, 3, 1.0, 2, offset=aware)
    assert_close(out[:, 1], ps_expected[:, 1])
    assert_close(out[:, 0], torchvision.ops.ps_roi_align(ps_x, box, 3, 1.0, 2)[:, 0])


# ---------------------------------------------------------------------------------------------
# gradients


def test_gradcheck_roi():
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    boxes = torch.tensor([[0, 0.7, 1.1, 5.3, 6.2], [1, -1.3, 2.2, 4.1, 8.5], [1, 3.3, 0.4, 9.6, 3.9]],
                         dtype=torch.float64)  # fmt: skip
    offset = torch.randn(3, 2, 2, 3, dtype=torch.float64)
    mask = torch.rand(3, 1, 2, 3, dtype=torch.float64)
    for aligned, ratio in ((False, 2), (True, -1)):
        def fn(x, offset, mask):
            return deform_roi_pool(x, boxes, (2, 3), 1.0, ratio, aligned, offset=offset, mask=mask,
                                   gamma=0.3)  # fmt: skip

        assert torch.autograd.gradcheck(fn, leaves(x, offset, mask))


def test_gradcheck_ps_roi():
    x = torch.randn(2, 4 * 4, 7, 8, dtype=torch.float64)
    boxes = torch.tensor([[0, 0.7, 1.1, 5.3, 6.2], [1, -1.3, 2.2, 4.1, 8.5]], dtype=torch.float64)
    for groups in (1, 4):
        offset = torch.randn(2, 2 * groups, 2, 2, dtype=torch.float64)

        def fn(x, offset):
            return deform_ps_roi_pool(x, boxes, 2, 1.0, -1, offset=offset, gamma=0.3)

        assert torch.autograd.gradcheck(fn, leaves(x, offset))


def test_gradcheck_reference():
    """The oracle's own gradients (autograd through the reference) are right."""
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    boxes = torch.tensor([[0, 0.7, 1.1, 4.3, 5.2]], dtype=torch.float64)
    offset = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    mask = torch.rand(1, 1, 2, 2, dtype=torch.float64)

    def fn(x, offset, mask):
        return reference_roi.deform_roi_pool(x, boxes, (2, 2), 1.0, 2, True, offset, mask, 0.3)

    assert torch.autograd.gradcheck(fn, leaves(x, offset, mask))


ROI_CONFIGS = {
    "v1": dict(),
    "v2": dict(modulated=True),
    "aligned_adaptive": dict(aligned=True, sampling_ratio=-1, modulated=True),
    "scale_quarter": dict(spatial_scale=0.25, sampling_ratio=1),
    "far_offsets": dict(offset_scale=12.0, modulated=True),
    "square_bins_7": dict(output_size=(7, 7), channels=9),
    "one_pixel_map": dict(height=1, width=1),
}


def roi_case(channels=6, height=HEIGHT, width=WIDTH, output_size=(3, 2), spatial_scale=1.0,
             sampling_ratio=2, aligned=False, modulated=False, offset_scale=1.5,
             dtype=torch.float64, position_sensitive=False, groups=1):  # fmt: skip
    boxes = make_boxes(spatial_scale, dtype)
    count = boxes.shape[0]
    bins = output_size[0] * output_size[1]
    x = torch.randn(3, channels * (bins if position_sensitive else 1), height, width, dtype=dtype)
    offset = torch.randn(count, 2 * groups, *output_size, dtype=dtype) * offset_scale
    mask = torch.rand(count, 1, *output_size, dtype=dtype) if modulated else None
    settings = (output_size, spatial_scale, sampling_ratio)
    return x, boxes, offset, mask, settings, aligned


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", ROI_CONFIGS.values(), ids=ROI_CONFIGS.keys())
def test_fast_kernel_matches_reference(config, dtype):
    x, boxes, offset, mask, settings, aligned = roi_case(dtype=dtype, **config)

    def ours(x, offset, mask):
        return deform_roi_pool(x, boxes, *settings, aligned, offset=offset, mask=mask, gamma=0.2)

    def oracle(x, offset, mask):
        return reference_roi.deform_roi_pool(x, boxes, *settings, aligned, offset, mask, 0.2)

    out, got, grad_out = grads(ours, [x, offset, mask])
    expected, wanted, _ = grads(oracle, [x, offset, mask], grad_out)
    assert_close(out, expected, what="output")
    for name, g, e in zip(("input", "offset", "mask"), got, wanted):
        if e is not None:
            assert_close(g, e, what=f"grad of {name}")


PS_CONFIGS = {
    "class_agnostic": dict(groups=1),
    "class_aware": dict(groups=4),
    "two_groups": dict(groups=2, sampling_ratio=-1),
    "scale_quarter": dict(spatial_scale=0.25, sampling_ratio=1),
    "far_offsets": dict(offset_scale=12.0),
    "square_bins_7": dict(output_size=(7, 7), channels=2, groups=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", PS_CONFIGS.values(), ids=PS_CONFIGS.keys())
def test_ps_fast_kernel_matches_reference(config, dtype):
    config = {"channels": 4, **config}
    x, boxes, offset, _, settings, _ = roi_case(dtype=dtype, position_sensitive=True, **config)

    def ours(x, offset):
        return deform_ps_roi_pool(x, boxes, *settings, offset=offset, gamma=0.2)

    def oracle(x, offset):
        return reference_roi.deform_ps_roi_pool(x, boxes, *settings, offset, 0.2)

    out, got, grad_out = grads(ours, [x, offset])
    expected, wanted, _ = grads(oracle, [x, offset], grad_out)
    assert_close(out, expected, what="output")
    assert_close(got[0], wanted[0], what="grad of input")
    assert_close(got[1], wanted[1], what="grad of offset")


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    output_size=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    spatial_scale=st.sampled_from([1.0, 0.5, 0.125]),
    sampling_ratio=st.integers(-1, 3),
    aligned=st.booleans(),
    offset_scale=st.sampled_from([0.0, 1.0, 8.0]),
    modulated=st.booleans(),
    position_sensitive=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_fast_kernels_match_reference(batch, channels, size, output_size, spatial_scale,
                                               sampling_ratio, aligned, offset_scale, modulated,
                                               position_sensitive, seed):  # fmt: skip
    torch.manual_seed(seed)
    height, width = size
    count = 5
    corner = (torch.rand(count, 2) * 1.4 - 0.2) * torch.tensor([width, height])
    extent = torch.rand(count, 2) * torch.tensor([width, height])
    boxes = torch.cat([torch.randint(0, batch, (count, 1)), corner, corner + extent], 1)
    boxes[:, 1:] /= spatial_scale
    boxes = boxes.double()
    bins = output_size[0] * output_size[1]
    settings_ = (output_size, spatial_scale, sampling_ratio)
    if position_sensitive:
        groups = channels if modulated else 1
        x = torch.randn(batch, channels * bins, height, width, dtype=torch.float64)
        offset = torch.randn(count, 2 * groups, *output_size, dtype=torch.float64) * offset_scale
        tensors = [x, offset]
        ours = lambda x, o: deform_ps_roi_pool(x, boxes, *settings_, offset=o)  # noqa: E731
        oracle = lambda x, o: reference_roi.deform_ps_roi_pool(x, boxes, *settings_, o)  # noqa: E731
    else:
        x = torch.randn(batch, channels, height, width, dtype=torch.float64)
        offset = torch.randn(count, 2, *output_size, dtype=torch.float64) * offset_scale
        mask = torch.rand(count, 1, *output_size, dtype=torch.float64) if modulated else None
        tensors = [x, offset, mask]

        def ours(x, o, m):
            return deform_roi_pool(x, boxes, *settings_, aligned, offset=o, mask=m)

        def oracle(x, o, m):
            return reference_roi.deform_roi_pool(x, boxes, *settings_, aligned, o, m)

    out, got, grad_out = grads(ours, tensors)
    expected, wanted, _ = grads(oracle, tensors, grad_out)
    assert_close(out, expected, what="output")
    for g, e in zip(got, wanted):
        if e is not None:
            assert_close(g, e, what="gradient")


def test_backward_op_computes_only_what_is_asked():
    x, boxes, offset, mask, settings, aligned = roi_case(modulated=True)
    grad_out = torch.randn(boxes.shape[0], 6, *settings[0], dtype=torch.float64)
    full = torch.ops.deformable.deform_roi_pool_backward(
        grad_out, x, boxes, list(settings[0]), *settings[1:], aligned, offset, mask, 0.1,
        [True, True, True])  # fmt: skip
    for need in ([True, False, False], [False, True, False], [False, False, True]):
        part = torch.ops.deformable.deform_roi_pool_backward(
            grad_out, x, boxes, list(settings[0]), *settings[1:], aligned, offset, mask, 0.1,
            need)  # fmt: skip
        for flag, p, f in zip(need, part, full):
            assert (torch.equal(p, f) if flag else p.numel() == 0)


def test_nan_and_infinite_offsets_pool_zero():
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    boxes = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]], dtype=torch.float64)
    for value in (float("nan"), float("inf"), -float("inf"), 1e30):
        offset = torch.full((1, 2, 2, 2), value, dtype=torch.float64, requires_grad=True)
        out = deform_roi_pool(x, boxes, 2, offset=offset)
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        assert torch.equal(offset.grad, torch.zeros_like(offset))
        ps = deform_ps_roi_pool(x.repeat(1, 4, 1, 1)[:, :4], boxes, 2, offset=offset.detach())
        assert torch.equal(ps, torch.zeros_like(ps))


# ---------------------------------------------------------------------------------------------
# shapes, determinism, dtypes


@pytest.mark.parametrize("form", ["tensor", "list", "empty_list"])
def test_no_boxes_gives_empty_output_and_backward_works(form):
    x = torch.randn(2, 2 * 4, 6, 7, requires_grad=True)
    boxes = {"tensor": torch.zeros(0, 5), "list": [torch.zeros(0, 4), torch.zeros(0, 4)],
             "empty_list": []}[form]  # fmt: skip
    offset = torch.zeros(0, 2, 2, 2, requires_grad=True)
    mask = torch.zeros(0, 1, 2, 2, requires_grad=True)
    out = deform_roi_pool(x, boxes, 2, 0.5, offset=offset, mask=mask)
    assert out.shape == (0, 8, 2, 2)
    ps = deform_ps_roi_pool(x, boxes, 2, 0.5, offset=offset)
    assert ps.shape == (0, 2, 2, 2)
    (out.sum() + ps.sum()).backward()
    assert x.grad.shape == x.shape and torch.equal(x.grad, torch.zeros_like(x))
    assert offset.grad.shape == offset.shape and mask.grad.shape == mask.shape


def test_repeatable_bit_for_bit_and_independent_of_threads():
    x, boxes, offset, mask, settings, aligned = roi_case(channels=16, dtype=torch.float32,
                                                         modulated=True)  # fmt: skip
    px, _, poff, _, _, _ = roi_case(channels=4, dtype=torch.float32, position_sensitive=True,
                                    groups=2)  # fmt: skip

    def run():
        out, got, grad_out = grads(
            lambda x, o, m: deform_roi_pool(x, boxes, *settings, aligned, offset=o, mask=m),
            [x, offset, mask], torch.ones(boxes.shape[0], 16, *settings[0]))  # fmt: skip
        ps, ps_got, _ = grads(lambda x, o: deform_ps_roi_pool(x, boxes, *settings, offset=o),
                              [px, poff], torch.ones(boxes.shape[0], 4, *settings[0]))  # fmt: skip
        return [out, *got, ps, *ps_got]

    before = torch.get_num_threads()
    try:
        first, second = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_threads_and_chunking_do_not_change_results(monkeypatch):
    """Force one chunk, then many (past the serial threshold): same bits."""
    x, boxes, offset, mask, settings, aligned = roi_case(channels=7, modulated=True)
    px, _, poff, _, _, _ = roi_case(channels=5, position_sensitive=True, groups=5)

    def run():
        out, got, grad_out = grads(
            lambda x, o, m: deform_roi_pool(x, boxes, *settings, aligned, offset=o, mask=m),
            [x, offset, mask], torch.ones(boxes.shape[0], 7, *settings[0], dtype=x.dtype))  # fmt: skip
        ps, ps_got, _ = grads(lambda x, o: deform_ps_roi_pool(x, boxes, *settings, offset=o),
                              [px, poff], torch.ones(boxes.shape[0], 5, *settings[0], dtype=x.dtype))  # fmt: skip
        return [out, *got, ps, *ps_got]

    monkeypatch.setattr(_deform_roi_pool_cpu, "num_chunks", lambda items, work, per_thread=4: 1)
    one = run()
    monkeypatch.setattr(_deform_roi_pool_cpu, "num_chunks",
                        lambda items, work, per_thread=4: max(1, min(items, 5)))  # fmt: skip
    many = run()
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    x, boxes, offset, mask, settings, aligned = roi_case(dtype=torch.float32, modulated=True)
    low = [t.to(dtype) for t in (x, offset, mask)]
    out, got, _ = grads(lambda x, o, m: deform_roi_pool(x, boxes, *settings, aligned, offset=o,
                                                        mask=m), low)  # fmt: skip
    assert out.dtype == dtype and all(g.dtype == dtype for g in got)
    expected = deform_roi_pool(low[0].float(), boxes, *settings, aligned, offset=low[1].float(),
                               mask=low[2].float())  # fmt: skip
    assert_close(out, expected.to(dtype), dtype)


def test_non_contiguous_and_channels_last_inputs():
    x, boxes, offset, mask, settings, aligned = roi_case(modulated=True)
    expected = deform_roi_pool(x, boxes, *settings, aligned, offset=offset, mask=mask)
    wide = torch.randn(3, 12, HEIGHT, WIDTH, dtype=torch.float64)
    wide[:, ::2] = x
    got = deform_roi_pool(wide[:, ::2], boxes.t().contiguous().t(), *settings, aligned,
                          offset=offset.transpose(2, 3).contiguous().transpose(2, 3),
                          mask=mask.contiguous(memory_format=torch.channels_last))  # fmt: skip
    assert_close(got, expected)
    got = deform_roi_pool(x.contiguous(memory_format=torch.channels_last), boxes, *settings,
                          aligned, offset=offset, mask=mask)  # fmt: skip
    assert_close(got, expected)


def test_integer_boxes_and_other_float_dtypes_are_cast():
    x = torch.randn(1, 3, 8, 8)
    boxes = torch.tensor([[0, 1, 2, 6, 7]])
    expected = torchvision.ops.roi_align(x, boxes.float(), 2, 1.0, 2)
    assert_close(deform_roi_pool(x, boxes, 2, 1.0, 2), expected)
    assert_close(deform_roi_pool(x, boxes.double(), 2, 1.0, 2), expected)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile, torch.export


def library_example(requires_grad=False):
    x, boxes, offset, mask, settings, aligned = roi_case(dtype=torch.float32, modulated=True)
    x, offset, mask = (t.requires_grad_(requires_grad) for t in (x, offset, mask))
    return x, boxes, offset, mask, settings, aligned


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_offset", [False, True])
def test_opcheck(requires_grad, with_offset):
    x, boxes, offset, mask, (size, scale, ratio), aligned = library_example(requires_grad)
    offset, mask = (offset, mask) if with_offset else (None, None)
    torch.library.opcheck(torch.ops.deformable.deform_roi_pool.default,
                          (x, boxes, list(size), scale, ratio, aligned, offset, mask, 0.1))  # fmt: skip
    px = torch.randn(3, 4 * 6, HEIGHT, WIDTH, requires_grad=requires_grad)
    poff = offset.detach().repeat(1, 2, 1, 1).requires_grad_(requires_grad) if with_offset else None
    torch.library.opcheck(torch.ops.deformable.deform_ps_roi_pool.default,
                          (px, boxes, list(size), scale, ratio, poff, 0.1))  # fmt: skip


def test_opcheck_backward_ops():
    x, boxes, offset, mask, (size, scale, ratio), aligned = library_example()
    grad_out = torch.randn(boxes.shape[0], 6, *size)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.deformable.deform_roi_pool_backward.default,
                          (grad_out, x, boxes, list(size), scale, ratio, aligned, offset, mask, 0.1,
                           [True, False, True]), test_utils=utils)  # fmt: skip
    px = torch.randn(3, 4 * 6, HEIGHT, WIDTH)
    torch.library.opcheck(torch.ops.deformable.deform_ps_roi_pool_backward.default,
                          (torch.randn(boxes.shape[0], 4, *size), px, boxes, list(size), scale,
                           ratio, offset.repeat(1, 2, 1, 1), 0.1, [True, True]),
                          test_utils=utils)  # fmt: skip


def test_compile_fullgraph_matches_eager():
    x, boxes, offset, mask, (size, scale, ratio), aligned = library_example(requires_grad=True)
    px = torch.randn(3, 4 * 6, HEIGHT, WIDTH, requires_grad=True)
    listed = as_list(boxes, 3)

    def fn(x, offset, mask, px):
        a = deform_roi_pool(x, boxes, size, scale, ratio, aligned, offset=offset, mask=mask)
        b = deform_ps_roi_pool(px, listed, size, scale, ratio, offset=offset)
        return a.relu().sum() + b.square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = (x, offset, mask, px)
    expected = fn(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs)
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, inputs)
    assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads):
        assert_close(g, e)


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Linear(6 * 4, 2 * 4)

    def forward(self, x, boxes):
        plain = deform_roi_pool(x, boxes, 2, 0.5, 2)
        offset = self.offset(plain.flatten(1)).reshape(-1, 2, 2, 2)
        return deform_roi_pool(x, boxes, 2, 0.5, 2, offset=offset)


def test_export_captures_one_node_per_call():
    head = _Head()
    x = torch.randn(3, 6, HEIGHT, WIDTH)
    boxes = make_boxes(0.5, torch.float32)
    program = torch.export.export(head, (x, boxes))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.deformable.deform_roi_pool.default) == 2
    assert_close(program.module()(x, boxes), head(x, boxes))


# ---------------------------------------------------------------------------------------------
# bad input


class TestBadInput:
    x = torch.randn(2, 8, 6, 7)
    boxes = torch.tensor([[0, 1.0, 1.0, 4.0, 5.0], [1, 0.0, 2.0, 3.0, 6.0]])

    def test_boxes_shape(self):
        with pytest.raises(ValueError, match=r"boxes must be Tensor\[K, 5\].*\[2, 4\]"):
            deform_roi_pool(self.x, self.boxes[:, 1:], 2)
        with pytest.raises(ValueError, match=r"boxes\[1\] has shape \[2, 5\]"):
            deform_roi_pool(self.x, [self.boxes[:, 1:], self.boxes], 2)
        with pytest.raises(TypeError, match="boxes must be"):
            deform_ps_roi_pool(self.x, "boxes", 2)
        with pytest.raises(ValueError, match=r"boxes must be Tensor\[K, 5\]"):
            deform_ps_roi_pool(self.x, self.boxes[0], 2)

    def test_batch_index_out_of_range(self):
        bad = self.boxes.clone()
        bad[1, 0] = 2
        with pytest.raises(ValueError, match="batch index 2 in boxes is out of range for an "
                                             "input batch of 2"):  # fmt: skip
            deform_roi_pool(self.x, bad, 2)
        bad[1, 0] = -1
        with pytest.raises(ValueError, match="batch index -1"):
            deform_ps_roi_pool(self.x, bad, 2)
        with pytest.raises(ValueError, match="out of range.*a list of 3 box tensors"):
            deform_roi_pool(self.x, [self.boxes[:, 1:]] * 3, 2)

    def test_batch_index_not_integral(self):
        bad = self.boxes.clone()
        bad[0, 0] = 0.5
        with pytest.raises(ValueError, match=r"batch index boxes\[:, 0\] must be integral, got 0.5"):
            deform_roi_pool(self.x, bad, 2)

    def test_boxes_not_finite(self):
        bad = self.boxes.clone()
        bad[1, 3] = float("inf")
        with pytest.raises(ValueError, match=r"boxes must be finite, got \[1.0, 0.0, 2.0, inf, 6.0\]"):
            deform_roi_pool(self.x, bad, 2)
        bad[1, 3] = float("nan")
        with pytest.raises(ValueError, match="boxes must be finite"):
            deform_ps_roi_pool(self.x, bad, 2)

    def test_offset_and_mask_shapes(self):
        with pytest.raises(ValueError, match=r"offset must be \[K, 2, oh, ow\] = \[2, 2, 2, 3\].*"
                                             r"got \[2, 2, 3, 2\]"):  # fmt: skip
            deform_roi_pool(self.x, self.boxes, (2, 3), offset=torch.zeros(2, 2, 3, 2))
        with pytest.raises(ValueError, match=r"offset must be \[K, 2, oh, ow\] = \[2, 2, 2, 2\]"):
            deform_roi_pool(self.x, self.boxes, 2, offset=torch.zeros(3, 2, 2, 2))
        with pytest.raises(ValueError, match=r"mask must be \[K, 1, oh, ow\] = \[2, 1, 2, 2\]"):
            deform_roi_pool(self.x, self.boxes, 2, mask=torch.zeros(2, 2, 2, 2))
        with pytest.raises(ValueError, match="offset must be 4-D"):
            deform_roi_pool(self.x, self.boxes, 2, offset=torch.zeros(2, 8))
        with pytest.raises(ValueError, match=r"offset must be \[K, 2 \* offset_groups, oh, ow\]"):
            deform_ps_roi_pool(self.x, self.boxes, 2, offset=torch.zeros(2, 3, 2, 2))
        with pytest.raises(ValueError, match="offset_groups dividing out_channels \\(2\\)"):
            deform_ps_roi_pool(self.x, self.boxes, 2, offset=torch.zeros(2, 6, 2, 2))
        with pytest.raises(ValueError, match=r"offset must be \[K, 2 \* offset_groups, oh, ow\]"):
            deform_ps_roi_pool(self.x, self.boxes, 2, offset=torch.zeros(1, 2, 2, 2))

    def test_ps_channels_not_divisible(self):
        with pytest.raises(ValueError, match=r"input channels \(8\) must be a positive multiple "
                                             r"of oh \* ow = 6"):  # fmt: skip
            deform_ps_roi_pool(self.x, self.boxes, (2, 3))

    def test_arguments(self):
        with pytest.raises(ValueError, match="output_size must be >= 1"):
            deform_roi_pool(self.x, self.boxes, 0)
        with pytest.raises(ValueError, match="spatial_scale must be a positive number"):
            deform_roi_pool(self.x, self.boxes, 2, spatial_scale=0.0)
        with pytest.raises(TypeError, match="sampling_ratio must be an int"):
            deform_roi_pool(self.x, self.boxes, 2, sampling_ratio=2.0)
        with pytest.raises(TypeError, match="aligned must be a bool"):
            deform_roi_pool(self.x, self.boxes, 2, aligned=1)
        with pytest.raises(TypeError, match="gamma must be a finite number"):
            deform_ps_roi_pool(self.x, self.boxes, 2, gamma=None)

    def test_tensors(self):
        with pytest.raises(ValueError, match="input must be 4-D"):
            deform_roi_pool(self.x[0], self.boxes, 2)
        with pytest.raises(TypeError, match="mask has dtype torch.float64"):
            deform_roi_pool(self.x, self.boxes, 2, mask=torch.ones(2, 1, 2, 2, dtype=torch.float64))
        with pytest.raises(TypeError, match="input must be a floating-point tensor"):
            deform_roi_pool(self.x.long(), self.boxes, 2)
        with pytest.raises(ValueError, match="boxes are on meta but input is on cpu"):
            deform_roi_pool(self.x, self.boxes.to("meta"), 2)
        with pytest.raises(TypeError, match="offset must be a Tensor"):
            deform_roi_pool(self.x, self.boxes, 2, offset=[0.0])
