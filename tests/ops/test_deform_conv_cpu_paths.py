"""deform_conv2d's CPU kernel, path by path: every way the forward can multiply (by blocks with
MKL's GEMM inside the kernels; on tiles with columns in tap or channel order, oneDNN's matmul or
the kernel's own exact GEMM, ``_gemm``) and every backward subset, held to the reference in
float32 and float64, by gradcheck, and for bit-identical results across thread counts; plus the
layouts (channels last in, channels last out).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import assert_close
from deformable.ops import _deform_conv_cpu, deform_conv2d, reference
from deformable.ops.deform_conv import output_size

TENSORS = ("input", "offset", "weight", "bias", "mask")

#: (COLUMN_ORDER, FORWARD_GEMM) of each path: tiles of columns in tap or channel order, or blocks
#: (forward; backward on batches of at least BACKWARD_SEGMENTS images, 3 in these tests, and by
#: tiles of blocks on batches of 2 up to it: most configs here)
PATHS = {"gemm_tap": ("tap", "tiles"), "gemm_channel": ("channel", "tiles"),
         "blocks": ("tap", "blocks")}  # fmt: skip


def make(batch=2, channels=6, height=9, width=8, out_channels=4, kernel=(3, 2), stride=(2, 1),
         padding=(1, 0), dilation=(2, 1), weight_groups=2, offset_groups=3, *,
         dtype=torch.float64, offset_scale=2.0, modulated=True, bias=True):  # fmt: skip
    kh, kw = kernel
    out_h = output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = output_size(width, kw, stride[1], padding[1], dilation[1])
    return dict(
        input=torch.randn(batch, channels, height, width, dtype=dtype),
        offset=offset_scale * torch.randn(batch, 2 * offset_groups * kh * kw, out_h, out_w, dtype=dtype),
        weight=torch.randn(out_channels, channels // weight_groups, kh, kw, dtype=dtype),
        bias=torch.randn(out_channels, dtype=dtype) if bias else None,
        mask=torch.rand(batch, offset_groups * kh * kw, out_h, out_w, dtype=dtype) if modulated else None,
        stride=stride, padding=padding, dilation=dilation,
    )  # fmt: skip


CONFIGS = {
    "lopsided": {},
    "groups_cross": dict(channels=12, offset_groups=3, weight_groups=4, out_channels=8),
    "offset_groups_4_dilation_2": dict(channels=16, offset_groups=4, weight_groups=1, kernel=(3, 3),
                                       stride=(1, 1), padding=(2, 2), dilation=(2, 2), height=10,
                                       width=11),  # fmt: skip
    "kernel_5x5": dict(kernel=(5, 5), stride=(1, 2), padding=(2, 2), dilation=(1, 1), height=11,
                       width=10, weight_groups=1, offset_groups=1),  # fmt: skip
    "wide_channels": dict(channels=40, out_channels=24, weight_groups=1, offset_groups=1,
                          kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)),  # fmt: skip
    # channel loops specialised for 16, 32 and 64 channels per offset group (one run each):
    # vector intrinsics, each in a loop nest of its own
    "width_16": dict(channels=16, out_channels=8, weight_groups=1, offset_groups=1),
    "width_32_two_groups": dict(channels=64, out_channels=8, weight_groups=2, offset_groups=2,
                                height=7, width=6),  # fmt: skip
    "width_64": dict(channels=64, out_channels=8, weight_groups=1, offset_groups=1, height=7,
                     width=6),  # fmt: skip
    # one offset group in two runs of 32 channels (two weight groups): the general loop nests
    # with the 32-channel vector code inside
    "runs_of_32": dict(channels=64, out_channels=8, weight_groups=2, offset_groups=1, height=7,
                       width=6),  # fmt: skip
    "batch_odd": dict(batch=5, weight_groups=1, offset_groups=1),
    "far_outside": dict(offset_scale=50.0),
    "v1_no_bias": dict(modulated=False, bias=False),
}


@pytest.fixture(autouse=True)
def tiles_unless_asked(monkeypatch):
    """The tests of tiles' internals run on tiles, whatever this CPU's default (``path``, and the
    tests of blocks, ask for blocks)."""
    monkeypatch.setattr(_deform_conv_cpu, "FORWARD_GEMM", "tiles")


def use_blocks(monkeypatch, segments=2):
    assert _deform_conv_cpu._MKL is not None, "the blocks path needs the MKL torch links (x86)"
    monkeypatch.setattr(_deform_conv_cpu, "FORWARD_GEMM", "blocks")
    monkeypatch.setattr(_deform_conv_cpu, "BACKWARD_SEGMENTS", segments)


@pytest.fixture(params=PATHS.keys())
def path(request, monkeypatch):
    order, gemm = PATHS[request.param]
    monkeypatch.setattr(_deform_conv_cpu, "COLUMN_ORDER", order)
    if gemm == "blocks":
        use_blocks(monkeypatch, segments=3)
    return request.param


def grads_of(fn, args, grad_out=None):
    leaves = {k: (v.detach().clone().requires_grad_() if k in TENSORS and v is not None else v)
              for k, v in args.items()}  # fmt: skip
    out = fn(**leaves)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out)
    return out, {k: leaves[k].grad for k in TENSORS if leaves[k] is not None}, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_reference(path, config, dtype):
    args = make(dtype=dtype, **config)
    out, grads, grad_out = grads_of(deform_conv2d, args)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out)
    assert_close(out, expected, what="output")
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, what=f"grad of {name}")


@pytest.mark.parametrize("modulated", [False, True])
def test_gradcheck(path, modulated):
    args = make(batch=2, channels=4, height=6, width=5, out_channels=2, weight_groups=2,
                offset_groups=2, modulated=modulated, offset_scale=1.5)  # fmt: skip
    names = [k for k in TENSORS if args[k] is not None]

    def fn(*tensors):
        return deform_conv2d(**{**args, **dict(zip(names, tensors))})

    inputs = tuple(args[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, nondet_tol=0.0)


def test_gradcheck_specialised_width(path):
    """16 channels per group: the smallest of the channel loops unrolled as whole vectors."""
    args = make(batch=1, channels=16, height=4, width=4, out_channels=2, weight_groups=1,
                offset_groups=1, kernel=(2, 2), stride=(1, 1), padding=(1, 0), dilation=(1, 1),
                offset_scale=1.5)  # fmt: skip
    names = [k for k in TENSORS if args[k] is not None]

    def fn(*tensors):
        return deform_conv2d(**{**args, **dict(zip(names, tensors))})

    inputs = tuple(args[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, nondet_tol=0.0)


def same_on_any_thread_count(args):
    """deform_conv2d's output and gradients on 1, 2 and 3 threads: asserts they are the same bits;
    returns the first run's (output, gradients, output gradient)."""
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(grads_of(deform_conv2d, args, runs[0][2] if runs else None))
    finally:
        torch.set_num_threads(before)
    (out, grads, _), others = runs[0], runs[1:]
    for other, other_grads, _ in others:
        assert torch.equal(other, out)
        for name in grads:
            assert torch.equal(other_grads[name], grads[name]), name
    return runs[0]


#: (batch, channels, height, width, out_channels) where the thread counts are compared: the first
#: big enough that oneDNN, BLAS and the kernels all split their work between threads; the
#: second a wide layer on a few positions (dL/dcols on oneDNN: MKL on Intel CPUs splits that
#: reduction between threads and gives other results on other thread counts)
THREAD_SHAPES = {"many_positions": (2, 64, 14, 14, 96), "wide_few_positions": (1, 64, 2, 2, 512)}


@pytest.mark.parametrize("shape", THREAD_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thread_count_does_not_change_results(path, dtype, shape):
    batch, channels, height, width, out_channels = THREAD_SHAPES[shape]
    args = make(dtype=dtype, batch=batch, channels=channels, height=height, width=width,
                out_channels=out_channels, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), weight_groups=1, offset_groups=2)  # fmt: skip
    same_on_any_thread_count(args)


@pytest.mark.parametrize("config", ["wide_channels", "groups_cross"])
def test_exact_gemm_where_onednn_is_not_exact(monkeypatch, config):
    """Past ONEDNN_MAX_REDUCTION the float32 GEMMs (the forward's, dL/dcols past
    BLAS_MAX_REDUCTION and the weight gradient's) run on ``_gemm``: same results, both held to
    the reference."""
    args = make(dtype=torch.float32, **CONFIGS[config])
    onednn, onednn_grads, grad_out = grads_of(deform_conv2d, args)
    monkeypatch.setattr(_deform_conv_cpu, "ONEDNN_MAX_REDUCTION", 0)
    monkeypatch.setattr(_deform_conv_cpu, "BLAS_MAX_REDUCTION", 0)
    blas, blas_grads, _ = grads_of(deform_conv2d, args, grad_out)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out)
    assert_close(blas, onednn)
    assert_close(onednn, expected)
    for name in expected_grads:
        assert_close(blas_grads[name], onednn_grads[name], what=f"grad of {name}")
        assert_close(onednn_grads[name], expected_grads[name], what=f"grad of {name}")


@pytest.mark.parametrize("config", ["wide_channels", "groups_cross"])
def test_sample_gradients_on_onednn(monkeypatch, config):
    """dL/dcols over more than BLAS_MAX_REDUCTION output channels a group runs on oneDNN's matmul
    (one weight group, and several stacked): the gradients held to the BLAS run's and the
    reference."""
    args = make(dtype=torch.float32, **CONFIGS[config])
    blas, blas_grads, grad_out = grads_of(deform_conv2d, args)
    monkeypatch.setattr(_deform_conv_cpu, "BLAS_MAX_REDUCTION", 0)
    onednn, onednn_grads, _ = grads_of(deform_conv2d, args, grad_out)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out)
    assert torch.equal(onednn, blas)  # the forward has no dL/dcols
    for name in expected_grads:
        assert_close(onednn_grads[name], blas_grads[name], what=f"grad of {name}")
        assert_close(onednn_grads[name], expected_grads[name], what=f"grad of {name}")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("config", ["wide_channels", "groups_cross"])
def test_weight_gradient_from_transposed_samples(monkeypatch, config, fused):
    """The backward's kernels write the weight gradient's samples transposed ([K, P], block by
    block) up to TRANSPOSED_SAMPLES_MAX_K, else as dL/dcols ([P, K]): in the fused pass and in
    the two-pass backward, both held to the reference and to each other."""
    monkeypatch.setattr(_deform_conv_cpu, "FUSED_BACKWARD_IMAGES", 1 if fused else 10**9)
    args = make(dtype=torch.float32, **CONFIGS[config])
    out, grads, grad_out = grads_of(deform_conv2d, args)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out)
    monkeypatch.setattr(_deform_conv_cpu, "TRANSPOSED_SAMPLES_MAX_K", 0)
    _, untransposed, _ = grads_of(deform_conv2d, args, grad_out)
    for name in expected_grads:
        assert_close(grads[name], expected_grads[name], what=f"grad of {name}")
        assert_close(untransposed[name], expected_grads[name], what=f"grad of {name}")
        if name != "weight":  # only the weight gradient's GEMM differs
            assert torch.equal(grads[name], untransposed[name]), name
    assert_close(grads["weight"], untransposed["weight"])


@pytest.fixture
def problem_tiles(monkeypatch):
    """The tiles of every ``_Problem`` built from here on (forward first, then backward)."""
    seen = []

    class Spy(_deform_conv_cpu._Problem):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.tiles)

    monkeypatch.setattr(_deform_conv_cpu, "_Problem", Spy)
    return seen


def test_backward_tiles_stay_within_onednn_exact_reduction(monkeypatch, problem_tiles):
    """The weight gradient sums over a tile's positions: the backward's tiles hold at most
    ONEDNN_MAX_REDUCTION positions (so it stays on oneDNN's matmul) whatever the byte budget,
    and the gradients are the uncapped run's and the reference's."""
    args = make(dtype=torch.float32, batch=3, height=12, width=11, **{
        k: v for k, v in CONFIGS["wide_channels"].items() if k not in ("height", "width")})
    expected, expected_grads, grad_out = grads_of(reference.deform_conv2d, args)
    uncapped, uncapped_grads, _ = grads_of(deform_conv2d, args, grad_out)
    monkeypatch.setattr(_deform_conv_cpu, "ONEDNN_MAX_REDUCTION", 50)
    problem_tiles.clear()
    out, grads, _ = grads_of(deform_conv2d, args, grad_out)
    seen = [max(t[3] * t[4] * t[5] for t in tiles) for tiles in problem_tiles]
    assert seen[0] > 50 and seen[1] <= 50  # the forward's tiles are not capped, the backward's are
    assert_close(out, expected)
    for name in expected_grads:
        assert_close(grads[name], uncapped_grads[name], what=f"grad of {name}")
        assert_close(grads[name], expected_grads[name], what=f"grad of {name}")


def test_backward_tiles_of_rows_take_their_own_budget(monkeypatch, problem_tiles):
    """An image whose samples exceed BACKWARD_TILE_BYTES is split into tiles of rows within
    BACKWARD_ROWS_TILE_BYTES (one that fits stays whole); the gradients are the reference's."""
    args = make(dtype=torch.float64, batch=2, height=12, width=11)
    expected, expected_grads, grad_out = grads_of(reference.deform_conv2d, args)
    row_bytes = 2 * args["offset"].shape[-1] * 6 * 6 * 8  # two rows: 3x2 taps, 6 channels, 8 B
    for budget, rows_budget, whole in [(10**9, 1, True), (3 * row_bytes // 2, row_bytes, False)]:
        monkeypatch.setattr(_deform_conv_cpu, "BACKWARD_TILE_BYTES", budget)
        monkeypatch.setattr(_deform_conv_cpu, "BACKWARD_ROWS_TILE_BYTES", rows_budget)
        problem_tiles.clear()
        out, grads, _ = grads_of(deform_conv2d, args, grad_out)
        backward_tiles = problem_tiles[1]
        if whole:
            assert [t[3] for t in backward_tiles] == [2]
        else:
            assert {t[3] for t in backward_tiles} == {1} and max(t[4] for t in backward_tiles) == 2
        assert_close(out, expected)
        for name in expected_grads:
            assert_close(grads[name], expected_grads[name], what=f"grad of {name}")


def test_tile_budget_follows_the_last_level_cache(monkeypatch):
    """Tile budgets are an eighth of the last-level cache, within their bounds; the smallest
    where the system does not give the cache's size."""
    mib = 2**20
    for cache, expected in [(None, 4 * mib), (16 * mib, 4 * mib), (64 * mib, 8 * mib),
                            (480 * mib, 16 * mib)]:  # fmt: skip
        monkeypatch.setattr(_deform_conv_cpu, "_last_level_cache", lambda cache=cache: cache)
        assert _deform_conv_cpu._tile_bytes(4 * mib) == expected
    monkeypatch.undo()
    size = _deform_conv_cpu._last_level_cache()
    assert size is None or size >= 2**16  # read from the system: at least 64 KiB where given


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_in_channels_last_out(path, dtype):
    """A channels-last input gives a channels-last output and input gradient (as F.conv2d), with
    the values of the NCHW run; an NCHW input gives contiguous ones."""
    args = make(dtype=dtype, **CONFIGS["wide_channels"])
    out, grads, grad_out = grads_of(deform_conv2d, args)
    assert out.is_contiguous() and grads["input"].is_contiguous()
    cl = dict(args, input=args["input"].contiguous(memory_format=torch.channels_last))
    out_cl, grads_cl, _ = grads_of(deform_conv2d, cl, grad_out)
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert grads_cl["input"].is_contiguous(memory_format=torch.channels_last)
    assert_close(out_cl, out)
    for name, grad in grads.items():
        assert_close(grads_cl[name], grad, what=f"grad of {name}")


@pytest.mark.parametrize("budget", [1, 700, 5000])
def test_tiling_is_exact(path, monkeypatch, budget):
    args = make(batch=3, height=12, width=11)
    expected, expected_grads, grad_out = grads_of(deform_conv2d, args)
    monkeypatch.setattr(_deform_conv_cpu, "TILE_BYTES", budget)
    out, grads, _ = grads_of(deform_conv2d, args, grad_out)
    assert_close(out, expected)
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, what=f"grad of {name}")


@pytest.mark.parametrize("wanted", ["input", "offset", "weight", "mask", "bias"])
def test_backward_of_one_input(wanted):
    """Each gradient alone (the kernel skips the passes the others need) equals the reference's."""
    args = make(dtype=torch.float64)
    leaves = {k: (args[k].detach().clone().requires_grad_(k == wanted) if args[k] is not None else None)
              for k in TENSORS}  # fmt: skip
    out = deform_conv2d(**{**args, **leaves})
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, leaves[wanted], grad_out)
    expected = dict(args)
    expected[wanted] = args[wanted].detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(reference.deform_conv2d(**expected), expected[wanted],
                                           grad_out)  # fmt: skip
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wanted", ["offset", "mask", "input"])
@pytest.mark.parametrize("config", ["width_16", "width_32_two_groups", "width_64"])
def test_backward_of_one_input_specialised_width(config, wanted, dtype):
    """The backward at the widths the forward's blend fixes (16, 32, 64 channels a group) when
    the weight gradient is not wanted: no samples written for it, the same gradients."""
    args = make(dtype=dtype, **CONFIGS[config])
    leaves = {k: (args[k].detach().clone().requires_grad_(k == wanted) if args[k] is not None else None)
              for k in TENSORS}  # fmt: skip
    out = deform_conv2d(**{**args, **leaves})
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, leaves[wanted], grad_out)
    expected = dict(args)
    expected[wanted] = args[wanted].detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(reference.deform_conv2d(**expected), expected[wanted],
                                           grad_out)  # fmt: skip
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_fused_backward_matches_reference(monkeypatch, config, dtype):
    """Both backward passes in one (tiles of many images, here forced on every tile): the
    reference's gradients, and bit for bit those of the two passes."""
    args = make(dtype=dtype, **config)
    monkeypatch.setattr(_deform_conv_cpu, "FUSED_BACKWARD_IMAGES", 1)
    out, grads, grad_out = grads_of(deform_conv2d, args)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out)
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, what=f"grad of {name}")
    monkeypatch.setattr(_deform_conv_cpu, "FUSED_BACKWARD_IMAGES", 10**9)
    _, two_passes, _ = grads_of(deform_conv2d, args, grad_out)
    for name, grad in two_passes.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("wanted", ["input", "offset"])
def test_fused_backward_of_one_input(monkeypatch, wanted):
    """The fused pass without the weight gradient (no samples written for it)."""
    monkeypatch.setattr(_deform_conv_cpu, "FUSED_BACKWARD_IMAGES", 1)
    args = make(dtype=torch.float64, **CONFIGS["width_32_two_groups"])
    leaves = {k: (args[k].detach().clone().requires_grad_(k == wanted) if args[k] is not None else None)
              for k in TENSORS}  # fmt: skip
    out = deform_conv2d(**{**args, **leaves})
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, leaves[wanted], grad_out)
    expected = dict(args)
    expected[wanted] = args[wanted].detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(reference.deform_conv2d(**expected), expected[wanted],
                                           grad_out)  # fmt: skip
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_backward_thread_count_does_not_change_results(dtype):
    """A batch of 16 small maps: one tile of 16 images, split between threads by images."""
    args = make(dtype=dtype, batch=16, channels=32, height=10, width=9, out_channels=24,
                kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), weight_groups=1,
                offset_groups=1)  # fmt: skip
    _, grads, grad_out = same_on_any_thread_count(args)
    expected, expected_grads, _ = grads_of(reference.deform_conv2d, args, grad_out)
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, what=f"grad of {name}")


def test_inference_shapes_choose_the_gemm_in_weight_order():
    """Batch-1 maps of a ResNet-50's conv5 (big weight, 49 positions): the GEMM with columns in
    the weight's own (channel, tap) order, so the weight is used as it is."""
    x, offset = torch.randn(1, 512, 7, 7), torch.randn(1, 18, 7, 7)
    weight = torch.randn(512, 512, 3, 3)
    p = _deform_conv_cpu._Problem(x, offset, weight, (1, 1), (1, 1), (1, 1), None)
    assert _deform_conv_cpu._channel_major(p, weight)
    # a channels-last weight is already in (tap, channel) order
    weight_cl = weight.contiguous(memory_format=torch.channels_last)
    assert not _deform_conv_cpu._channel_major(p, weight_cl)


def test_backward_reuses_its_tile_buffers():
    """dL/dcols goes into a buffer kept between calls (``_scratch``), not a fresh tile-sized
    one per call (a page fault per 4 KiB, every call): two backward passes, one buffer."""
    args = make(dtype=torch.float32, **CONFIGS["wide_channels"])
    buffers = _deform_conv_cpu._workspace.__dict__.setdefault("buffers", {})
    buffers.clear()
    grads_of(deform_conv2d, args)
    first = buffers[("grad_samples", torch.float32)]
    grads_of(deform_conv2d, args)
    assert buffers[("grad_samples", torch.float32)].data_ptr() == first.data_ptr()


def test_padded_input_and_its_gradient_reused_only_when_small(monkeypatch):
    """The padded input and its gradient live within one call: reused buffers up to
    ``KEPT_BYTES``, fresh ones beyond it (a large image's are not kept after its call)."""
    args = make(dtype=torch.float32, **CONFIGS["wide_channels"])
    buffers = _deform_conv_cpu._workspace.__dict__.setdefault("buffers", {})
    buffers.clear()
    out, grads, grad_out = grads_of(deform_conv2d, args)
    kept = {name: buffers[(name, torch.float32)].data_ptr() for name in ("pad", "grad_pad")}
    again, again_grads, _ = grads_of(deform_conv2d, args, grad_out)
    assert {name: buffers[(name, torch.float32)].data_ptr() for name in kept} == kept
    assert torch.equal(again, out) and all(torch.equal(again_grads[k], grads[k]) for k in grads)
    buffers.clear()
    monkeypatch.setattr(_deform_conv_cpu, "KEPT_BYTES", 0)
    fresh, fresh_grads, _ = grads_of(deform_conv2d, args, grad_out)
    assert ("pad", torch.float32) not in buffers and ("grad_pad", torch.float32) not in buffers
    assert torch.equal(fresh, out) and all(torch.equal(fresh_grads[k], grads[k]) for k in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 6, 9, 8), (3, 40, 17, 33), (1, 1, 1, 1)])
def test_unpadding_inverts_padding(dtype, shape):
    """``_rows_to_nchw`` with ``_unpadding`` (the input gradient back to NCHW) is the inverse of
    ``_padded``, across its vector blocks and thread chunks."""
    x = torch.randn(shape, dtype=dtype)
    weight = torch.zeros(1, shape[1], 3, 3, dtype=dtype)
    offset = torch.zeros(shape[0], 18, *shape[2:], dtype=dtype)
    p = _deform_conv_cpu._Problem(x, offset, weight, (1, 1), (1, 1), (1, 1), None)
    out = torch.full_like(x, float("nan"))
    for chunks in (1, 3):
        for chunk in range(chunks):
            _deform_conv_cpu._rows_to_nchw(p.pad.numpy().reshape(-1), out.numpy().reshape(-1),
                                           _deform_conv_cpu._unpadding(p.geo), chunk, chunks)  # fmt: skip
        assert torch.equal(out, x)
        out.fill_(float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, cols",
                         [(8, 8), (4, 4), (3, 20), (20, 3), (9, 17), (17, 9), (16, 40), (1, 1)])
def test_transpose(dtype, rows, cols):
    """``_transpose`` (the padding and the NCHW output): vector blocks (8 x 8 in float32, 4 x 4 in
    float64), the last of each dimension overlapping the one before, and the scalar loops of a
    dimension shorter than a block, between strided rows at an offset; nothing written outside
    the destination."""
    # element (i, j) at 2 + j * (rows + 3) + i
    src = torch.randn(2 + cols * (rows + 3), dtype=dtype)
    dst = torch.full((3 + rows * (cols + 5),), float("nan"), dtype=dtype)
    _deform_conv_cpu._transpose(dst.numpy(), 3, cols + 5, src.numpy(), 2, rows + 3, rows, cols)
    expected = src[2:].view(cols, rows + 3)[:, :rows].T
    written = dst[3:].view(rows, cols + 5)
    assert torch.equal(written[:, :cols], expected)
    assert dst[:3].isnan().all() and written[:, cols:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, k, n", [(9, 7, 5), (1, 3, 17), (4, 1, 1), (3, 0, 2), (0, 4, 3)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_exact_gemm(dtype, m, k, n, accumulate):
    """``_gemm``, out (+)= a @ b (a of any strides, out's rows strided, rows in blocks of four
    and the rest), against the product in float64; its kernel split in chunks gives the same
    bits as in one."""
    a = torch.randn(k, m, dtype=dtype).t()  # strided, as the backward's output gradient
    b = torch.randn(k, n, dtype=dtype)
    start = torch.randn(m, n + 3, dtype=dtype)[:, :n]  # as one weight group's dL/dcols
    expected = (start.double() if accumulate else 0) + a.double() @ b.double()
    out = start.clone()
    _deform_conv_cpu._gemm(a, b, out, accumulate)
    assert_close(out, expected, dtype, what="_gemm")
    if m and n and k:
        dims = np.array([m, n, k, a.stride(0), a.stride(1), b.stride(0), out.stride(0), accumulate])
        for chunks in (1, 3):
            split = start.clone()
            for chunk in range(chunks):
                flat = [_deform_conv_cpu._flat(t) for t in (a, b, split)]
                _deform_conv_cpu._gemm_rows(*flat, dims, chunk, chunks)
            assert torch.equal(split, out)


@pytest.fixture
def block_runs(monkeypatch):
    """Counts the calls of the forward and the backward by blocks."""
    runs = {"forward": 0, "backward": 0, "tiles": 0}
    for name, key in (("_forward_by_blocks", "forward"), ("_backward_blocks_run", "backward"),
                      ("_backward_tile_by_blocks", "tiles")):  # fmt: skip
        original = getattr(_deform_conv_cpu, name)

        def counted(*args, original=original, key=key):
            runs[key] += 1
            return original(*args)

        monkeypatch.setattr(_deform_conv_cpu, name, counted)
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("formats", ["nchw", "input_channels_last", "grad_channels_last", "both"])
@pytest.mark.parametrize("config", ["groups_cross", "kernel_5x5", "width_32_two_groups"])
def test_blocks_match_reference_in_every_memory_format(monkeypatch, block_runs, config, formats,
                                                       dtype):  # fmt: skip
    """Forward and backward by blocks, each GEMM's orientation (NCHW or channels-last output,
    dL/dout in either format), 3 images in 2 segments of the weight gradient."""
    use_blocks(monkeypatch)
    args = make(dtype=dtype, **{**CONFIGS[config], "batch": 3})
    if formats in ("input_channels_last", "both"):
        args["input"] = args["input"].contiguous(memory_format=torch.channels_last)
    out, grads, grad_out = grads_of(reference.deform_conv2d, args)
    if formats in ("grad_channels_last", "both"):
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    ours, our_grads, _ = grads_of(deform_conv2d, args, grad_out)
    assert block_runs == {"forward": 1, "backward": 1, "tiles": 0}
    assert ours.is_contiguous(memory_format=torch.channels_last) == (
        formats in ("input_channels_last", "both"))
    assert_close(ours, out, what="output")
    for name, grad in grads.items():
        assert_close(our_grads[name], grad, what=f"grad of {name}")


@pytest.mark.parametrize("wanted", ["input", "offset", "weight", "mask"])
def test_backward_by_blocks_of_one_input(monkeypatch, block_runs, wanted):
    use_blocks(monkeypatch)
    args = make(batch=4, weight_groups=1, offset_groups=1)
    out, grads, grad_out = grads_of(reference.deform_conv2d, args)
    leaves = {k: (v.detach().clone().requires_grad_(k == wanted) if k in TENSORS and v is not None
                  else v) for k, v in args.items()}  # fmt: skip
    deform_conv2d(**leaves).backward(grad_out)
    assert_close(leaves[wanted].grad, grads[wanted], what=f"grad of {wanted}")
    # the weight alone needs no sampling gradients: the tiles' path
    assert block_runs["backward"] == (0 if wanted == "weight" else 1)


def test_blocks_same_bits_on_any_thread_count_with_the_default_segments(monkeypatch, block_runs):
    use_blocks(monkeypatch, segments=_deform_conv_cpu.FUSED_BACKWARD_IMAGES)
    args = make(dtype=torch.float32, batch=11, channels=32, height=9, width=10, out_channels=24,
                kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), weight_groups=1,
                offset_groups=1)  # fmt: skip
    out, grads, grad_out = same_on_any_thread_count(args)
    assert block_runs["backward"] == 3
    _, expected, _ = grads_of(reference.deform_conv2d, args, grad_out)
    assert_close(grads["weight"], expected["weight"], what="grad of weight")


def test_blocks_give_the_thread_its_mkl_setting_back(monkeypatch, block_runs):
    import ctypes

    setting = ctypes.CDLL(_deform_conv_cpu._mkl_library()).mkl_set_num_threads_local_
    setting.restype = ctypes.c_int
    use_blocks(monkeypatch)
    args = make(dtype=torch.float32, batch=1, weight_groups=1, offset_groups=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the kernel runs on this thread
        setting(ctypes.byref(ctypes.c_int(3)))
        deform_conv2d(**args)
        assert block_runs["forward"] == 1
        assert setting(ctypes.byref(ctypes.c_int(0))) == 3
    finally:
        torch.set_num_threads(before)


def test_blocks_where_auto_chooses_them(monkeypatch):
    module = _deform_conv_cpu
    monkeypatch.setattr(module, "FORWARD_GEMM", "auto")
    monkeypatch.setattr(module, "_INTEL", True)
    args = make(dtype=torch.float32, batch=8, channels=32, height=10, width=10, out_channels=32,
                kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), weight_groups=1,
                offset_groups=1)  # fmt: skip
    p = module._Problem(args["input"], args["offset"], args["weight"], (1, 1), (1, 1), (1, 1),
                        args["mask"])  # fmt: skip
    assert module._by_blocks(p, channel_major=False)
    assert not module._by_blocks(p, channel_major=True)
    assert module._backward_by_blocks(p, need_taps=True)
    assert not module._backward_by_blocks(p, need_taps=False)
    # a block: an image of 100 positions x 9 taps x 32 channels x 4 bytes
    monkeypatch.setattr(module, "BLOCK_BYTES", 115200 - 1)
    assert not module._by_blocks(p, channel_major=False)
    monkeypatch.setattr(module, "BLOCK_BYTES", 115200)
    assert module._by_blocks(p, channel_major=False)
    monkeypatch.setattr(module, "BACKWARD_SEGMENTS", 9)  # more segments than images
    assert not module._backward_by_blocks(p, need_taps=True)
    monkeypatch.setattr(module, "BACKWARD_SEGMENTS", 8)
    monkeypatch.setattr(module, "KEPT_BYTES", 8 * 32 * 32 * 9 * 4 - 1)  # the segments' dL/dW
    assert not module._backward_by_blocks(p, need_taps=True)
    monkeypatch.setattr(module, "_INTEL", False)
    assert not module._by_blocks(p, channel_major=False)
    monkeypatch.setattr(module, "FORWARD_GEMM", "blocks")
    assert module._by_blocks(p, channel_major=False)
    monkeypatch.setattr(module, "_MKL", None)  # no MKL in this torch: never
    assert not module._by_blocks(p, channel_major=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("formats", ["nchw", "input_channels_last", "grad_channels_last"])
@pytest.mark.parametrize("tile_bytes", [None, 3000, 700])
@pytest.mark.parametrize("config", ["groups_cross", "kernel_5x5"])
def test_backward_tiles_by_blocks_match_reference(monkeypatch, block_runs, config, tile_bytes,
                                                  formats, dtype):  # fmt: skip
    """Batches below BACKWARD_SEGMENTS: each tile's sampling gradients by blocks
    (``_backward_blocks_taps``), then the rows' pass; one tile, tiles of rows and of columns."""
    use_blocks(monkeypatch, segments=8)
    if tile_bytes is not None:
        monkeypatch.setattr(_deform_conv_cpu, "TILE_BYTES", tile_bytes)
    args = make(dtype=dtype, **{**CONFIGS[config], "batch": 2})
    if formats == "input_channels_last":
        args["input"] = args["input"].contiguous(memory_format=torch.channels_last)
    out, grads, grad_out = grads_of(reference.deform_conv2d, args)
    if formats == "grad_channels_last":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    _, our_grads, _ = grads_of(deform_conv2d, args, grad_out)
    assert block_runs["backward"] == 0
    assert block_runs["tiles"] >= (1 if tile_bytes is None else 3)
    for name, grad in grads.items():
        assert_close(our_grads[name], grad, what=f"grad of {name}")


def test_backward_tiles_by_blocks_same_bits_on_any_thread_count(monkeypatch, block_runs):
    use_blocks(monkeypatch, segments=8)
    args = make(dtype=torch.float32, batch=3, channels=32, height=12, width=10, out_channels=24,
                kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), weight_groups=1,
                offset_groups=1)  # fmt: skip
    same_on_any_thread_count(args)
    assert block_runs["tiles"] == 3 and block_runs["backward"] == 0


def test_batch_of_one_backward_stays_on_tiles(monkeypatch, block_runs):
    use_blocks(monkeypatch, segments=8)
    args = make(dtype=torch.float32, batch=1, weight_groups=1, offset_groups=1)
    _, grads, grad_out = grads_of(deform_conv2d, args)
    _, expected, _ = grads_of(reference.deform_conv2d, args, grad_out)
    assert block_runs == {"forward": 1, "backward": 0, "tiles": 0}
    for name, grad in expected.items():
        assert_close(grads[name], grad, what=f"grad of {name}")


@pytest.mark.parametrize("nb, rb, wb", [(1, 28, 28), (1, 14, 14), (1, 7, 7), (2, 14, 14),
                                         (64, 20, 20), (2, 56, 56), (1, 50, 84), (3, 5, 600),
                                         (1, 1, 9), (9, 2, 3)])  # fmt: skip
def test_block_grid_splits_rows_evenly(nb, rb, wb):
    """Each image's rows in blocks of near-equal length, the longer first, covering every row
    once in order; at least eight blocks a tile where the rows allow, within ``_BLOCK``
    positions where a row fits; the block buffers sized for the longest."""
    k = _deform_conv_cpu
    tile = np.array([0, 0, 0, nb, rb, wb], dtype=np.int64)
    count = k._block_count(tile)
    per_image = count // nb
    assert count == nb * per_image
    blocks = [k._block(tile, b) for b in range(count)]
    for n in range(nb):
        mine = blocks[n * per_image : (n + 1) * per_image]
        assert [item for item, _ in mine] == list(np.cumsum([n * rb] + [r for _, r in mine])[:-1])
        sizes = [rows for _, rows in mine]
        assert sum(sizes) == rb and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)[::-1]
        assert max(sizes) == k._block_rows(nb, rb, wb)
        assert max(sizes) * wb <= max(k._BLOCK, wb)
    assert count >= min(8, nb * rb)
    if (nb, rb) == (1, 28):  # 28 rows for two threads: 4, 4, 4, 4, 3, 3, 3, 3
        assert [rows for _, rows in blocks] == [4] * 4 + [3] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cout, cin, kh, kw, groups, channels_last",
                         [(128, 128, 3, 3, 1, False), (64, 32, 5, 5, 2, False),
                          (7, 3, 3, 2, 1, False), (16, 8, 1, 1, 1, False), (12, 4, 3, 3, 3, True)])
def test_weight_rows_are_the_weight_matrix(cout, cin, kh, kw, groups, channels_last, dtype):
    """The forward's contiguous weight matrix, reordered by a kernel, is torch's permuted copy;
    ``weight_gradient`` takes such a matrix back to the weight's shape and order."""
    x = torch.randn(1, cin * groups, 9, 9, dtype=dtype)
    w = torch.randn(cout, cin, kh, kw, dtype=dtype)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    offset = torch.randn(1, 2 * kh * kw, 10 - kh, 10 - kw, dtype=dtype)
    p = _deform_conv_cpu._Problem(x, offset, w, (1, 1), (0, 0), (1, 1), None)
    rows = p.weight_rows(w)
    assert rows.is_contiguous() and torch.equal(rows, p.weight_matrix(w))
    # the weight gradient's way back (a contiguous matrix by the kernel, a view by torch)
    for matrix in (rows, rows.transpose(1, 2).contiguous().transpose(1, 2)):
        back = p.weight_gradient(matrix)
        assert back.is_contiguous() and torch.equal(back, w)


def test_problem_shapes_kept_by_the_calls_key(monkeypatch):
    """A _Problem's shapes (geo, runs, tiles) are computed once per key and kept; the kernels
    never write the kept ones; what they depend on (dtype, layout, budget, TILE_BYTES) makes
    another key."""
    statics = {}
    monkeypatch.setattr(_deform_conv_cpu, "_statics", statics)
    make_problem = _deform_conv_cpu._Problem
    args = make(dtype=torch.float32, **CONFIGS["wide_channels"])
    x, offset, weight = args["input"], args["offset"], args["weight"]
    geometry = (args["stride"], args["padding"], args["dilation"])
    first = make_problem(x, offset, weight, *geometry, None)
    assert make_problem(x, offset, weight, *geometry, None).geo is first.geo
    out, grads, grad_out = grads_of(deform_conv2d, args)  # the forward's and backward's keys
    assert len(statics) == 3
    kept = {key: value["geo"].copy() for key, value in statics.items()}
    again, again_grads, _ = grads_of(deform_conv2d, args, grad_out)
    assert torch.equal(again, out) and all(torch.equal(again_grads[k], grads[k]) for k in grads)
    assert len(statics) == 3 and all(np.array_equal(statics[k]["geo"], kept[k]) for k in kept)
    others = [make_problem(x.double(), offset.double(), weight.double(), *geometry, None),
              make_problem(x.contiguous(memory_format=torch.channels_last), offset, weight,
                           *geometry, None),
              make_problem(x, offset, weight, *geometry, None, budget=4096),
              make_problem(x, offset, weight, *geometry, None, max_positions=3)]  # fmt: skip
    assert all(p.geo is not first.geo for p in others)
    assert others[0].dtype == torch.float64 and others[1].channels_last
    assert len(others[2].tiles) > len(first.tiles) and len(others[3].tiles) > len(first.tiles)
    monkeypatch.setattr(_deform_conv_cpu, "TILE_BYTES", 4096)
    assert make_problem(x, offset, weight, *geometry, None).tiles == others[2].tiles


def test_forward_plan_follows_every_setting_it_reads(monkeypatch):
    """The forward's plan is kept by the call's key and the settings its decisions read: each
    setting changed between two calls gives the plan a fresh one would."""
    module = _deform_conv_cpu
    monkeypatch.setattr(module, "_forward_plans", {})
    x, offset = torch.randn(2, 16, 12, 12), torch.randn(2, 18, 12, 12)
    weight = torch.randn(16, 16, 3, 3)
    p = module._Problem(x, offset, weight, (1, 1), (1, 1), (1, 1), None)

    def fresh(w):
        channel_major = module._channel_major(p, w)
        return module._by_blocks(p, channel_major), channel_major

    settings = [("FORWARD_GEMM", "tiles"), ("FORWARD_GEMM", "blocks"), ("COLUMN_ORDER", "channel"),
                ("COLUMN_ORDER", "tap"), ("BLOCK_BYTES", 0), ("_INTEL", not module._INTEL),
                ("_MKL", None)]  # fmt: skip
    seen = set()
    for name, value in [(None, None)] + settings:
        with monkeypatch.context() as m:
            if name is not None:
                m.setattr(module, name, value)
            for w in (weight, weight.contiguous(memory_format=torch.channels_last)):
                plan = module._forward_plan(p, w)
                assert plan[:2] == fresh(w), (name, value)
                assert module._forward_plan(p, w) is plan
                seen.add(plan[:2])
    assert len(seen) >= 3  # the settings did change the decisions


def test_scratch_views_follow_their_buffer():
    """A scratch view is kept with the buffer it views: the same call again gets it back, and
    once the buffer has grown (or been dropped) a view of the new buffer."""
    scratch = _deform_conv_cpu._scratch
    buffers = _deform_conv_cpu._workspace.__dict__.setdefault("buffers", {})
    first = scratch("test_views", 10, torch.float32, (2, 5))
    assert scratch("test_views", 10, torch.float32, (2, 5)) is first
    assert scratch("test_views", 10, torch.float32).shape == (10,)
    grown = scratch("test_views", 100, torch.float32, (10, 10))
    again = scratch("test_views", 10, torch.float32, (2, 5))
    assert again is not first and again.shape == (2, 5)
    key = ("test_views", torch.float32)
    assert again.data_ptr() == grown.data_ptr() == buffers[key].data_ptr()
    del buffers[key]
    fresh = scratch("test_views", 10, torch.float32, (2, 5))
    assert fresh is not again and fresh.data_ptr() == buffers[key].data_ptr()
    del buffers[key]
