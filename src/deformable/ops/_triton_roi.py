"""Triton kernels of deform_roi_pool and deform_ps_roi_pool: the ops' CUDA kernels.

Same contract as :mod:`deformable.ops._deform_roi_pool_cpu` (``forward``, ``backward``,
``ps_forward``, ``ps_backward``: same arguments, same results; gradients in float32, None where
not asked). Inputs may be float32, float16 or bfloat16: loads are converted to float32 and every
sum is accumulated in float32; the forward output has the input's dtype. float64 never reaches
this module (the dispatch sends it to the reference).

Design. A program owns one RoI, so the box arithmetic and the sample count of a bin are scalars
of the program; the samples are a runtime loop of ``grid_h * grid_w`` iterations (uniform in the
program: adaptive sampling neither recompiles nor diverges).

- Forward: a program owns (RoI, block of bins, block of channels). Per sample the position, the
  clamping and the four bilinear weights are computed once per bin and broadcast over the
  channel block; the four corners are channel-contiguous rows of a channels-last copy of the
  input: [N, H, W, C], or for the position-sensitive op [N, H, W, bins, C_out], where the output
  channels of one bin are contiguous (offset groups that split the channels make the positions
  per channel).
- Offset / mask gradients: a program owns (RoI, block of bins, offset group) and loops over all
  the channels that move with it, reducing over channels in registers: no atomics, a fixed order,
  bit-identical on repeat.
- Input gradient, a scatter: float atomics into a float32 channels-last buffer (program per RoI,
  bin block, channel block). Under ``torch.use_deterministic_algorithms(True)`` no float atomics:
  each (bin, sample, corner) writes its target pixel, its weight and its gradient row to a list;
  the list is sorted by target (stable: ties keep their generation order) and each target's run is
  summed, in that order, by the one program that owns the target. Lists are built for a chunk of
  bins at a time (``_DETERMINISTIC_ENTRIES`` entries, overshot by at most one bin's), so scratch
  memory is bounded whatever the number of RoIs; chunks add into the gradient in order.

GPU rules the interpreter does not check, and where they hold:
- no ``tl.dot`` (the pooling has no matrix product);
- every load / store / atomic is masked at the tile edges (bins, channels, samples, segments); a
  sample outside the map, a zero-weight corner and a box with a bad batch index touch no memory;
- addresses in int64: the RoI index, batch index, pixel and key indices are widened before they
  meet a channel count (``_frame``, ``_corners``, each kernel's ``k64``);
- compile keys: block sizes (from the channel count and the number of bins, :func:`_tile`) and
  feature flags only; N, H, W, K, the output size, the sampling ratio and the groups are runtime
  arguments excluded from Triton's value specialisation (``do_not_specialize``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Entries (bin x sample x corner) per chunk of the deterministic input gradient: 36 bytes each
# (key, sorted key, permutation, source row, weight), so about 36 MiB of scratch.
_DETERMINISTIC_ENTRIES = 1 << 20

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Integer arguments that change from call to call: never compile keys.
_RUNTIME = ["batch", "height", "width", "oh", "ow", "groups", "per_group", "sampling_ratio"]


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _tile(rows: int, channels: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, num_warps): the compile class of a rows x channels tile.

    On a GPU up to 64 channels (a 256-byte float32 row per corner) and 512 elements per tile, two
    per thread: compiled for sm_80 (ptxas), every kernel variant then takes at most 98 registers
    and none spills beyond 8 bytes, where 2048-element tiles took up to 255 and spilled up to
    700 bytes. Under the interpreter one small class, so small tests span several blocks.
    """
    cap_c, cap_tile = (8, 64) if _INTERPRETED else (64, 512)
    block_c = min(_pow2(channels), cap_c)
    block_b = min(_pow2(rows), max(cap_tile // block_c, 1))
    num_warps = max(1, min(8, block_b * block_c // 64))
    return block_b, block_c, num_warps


# ---------------------------------------------------------------------------------------------
# device functions shared by the kernels


@triton.jit
def _frame(boxes, k, b, batch, height, spatial_scale, sampling_ratio, oh, ow,
           ALIGNED: tl.constexpr, PS: tl.constexpr):  # fmt: skip
    """Bins ``b`` of RoI ``k``: (image, y0, x0, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w).

    RoIAlign's box arithmetic, as :func:`deformable.ops.reference_roi.roi_geometry`; ``image`` is
    the int64 row of the image in [N * H, ...]; (y0, x0) the bins' top-left corners. A batch index
    outside [0, batch) gives no samples (the bin pools zero) and image 0.
    """
    row = boxes + k.to(tl.int64) * 5
    n = tl.load(row).to(tl.int32)
    if ALIGNED:
        shift = 0.5
    else:
        shift = 0.0
    start_x = tl.load(row + 1) * spatial_scale - shift
    start_y = tl.load(row + 2) * spatial_scale - shift
    roi_w = tl.load(row + 3) * spatial_scale - shift - start_x
    roi_h = tl.load(row + 4) * spatial_scale - shift - start_y
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    # correctly rounded: ceil() of an approximate quotient could take one more sample
    bin_h = tl.math.div_rn(roi_h, (oh + 0.0).to(tl.float32))
    bin_w = tl.math.div_rn(roi_w, (ow + 0.0).to(tl.float32))
    grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_h).to(tl.int32))
    grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(bin_w).to(tl.int32))
    if PS:  # at least one sample per axis (ps_roi_align divides by zero there)
        grid_h = tl.maximum(grid_h, 1)
        grid_w = tl.maximum(grid_w, 1)
    else:
        grid_h = tl.maximum(grid_h, 0)
        grid_w = tl.maximum(grid_w, 0)
    valid = (n >= 0) & (n < batch)
    grid_h = tl.where(valid, grid_h, 0)
    image = tl.where(valid, n, 0).to(tl.int64) * height
    i = b // ow
    y0 = start_y + i.to(tl.float32) * bin_h
    x0 = start_x + (b - i * ow).to(tl.float32) * bin_w
    return image, y0, x0, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w


@triton.jit
def _shift(off, k64, b, group, groups, bins, ok):
    """Normalised offsets (dx, dy) of bins ``b`` (a column) for offset ``group`` (a scalar, or a
    row over the channels), from [K, 2 * groups, oh, ow]."""
    at = 2 * (k64 * groups + group) * bins + b
    dx = tl.load(off + at, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(off + at + bins, mask=ok, other=0.0).to(tl.float32)
    return dx, dy


@triton.jit
def _axis(v, size):
    """RoIAlign's clamping of v in [-1, size]: (low, high, fraction, derivative factor)."""
    moved = v <= 0.0
    v = tl.where(moved, 0.0, v)
    low = v.to(tl.int32)  # floor: v >= 0
    edge = low >= size - 1
    low = tl.where(edge, size - 1, low)
    high = tl.where(edge, low, low + 1)
    frac = tl.where(edge, 0.0, v - low.to(tl.float32))
    return low, high, frac, tl.where(edge | moved, 0.0, 1.0)


@triton.jit
def _corners(s, y0, x0, dy, dx, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w, gamma, image,
             height, width, HAS_OFFSET: tl.constexpr):  # fmt: skip
    """Sample ``s`` (row-major in the bin's grid) of bins at (y0, x0), moved by the offsets.

    Returns (inside, row_low, row_high, x_low, x_high, ly, lx, ay, ax): the pixel rows (int64,
    ``(image + y) * width``) and columns of the corners, the fractions and the derivative factors
    of the clamped coordinates. Positions follow the reference's order of operations. Outside
    ``[-1, H] x [-1, W]`` (or NaN) ``inside`` is False and every corner is pixel (image, 0, 0).
    """
    iy = s // grid_w
    ix = s - iy * grid_w
    y = y0 + tl.math.div_rn((iy.to(tl.float32) + 0.5) * bin_h, grid_h.to(tl.float32))
    x = x0 + tl.math.div_rn((ix.to(tl.float32) + 0.5) * bin_w, grid_w.to(tl.float32))
    if HAS_OFFSET:
        y = y + gamma * dy * roi_h
        x = x + gamma * dx * roi_w
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y_low, y_high, ly, ay = _axis(tl.where(inside, y, 0.0), height)
    x_low, x_high, lx, ax = _axis(tl.where(inside, x, 0.0), width)
    return (inside, (image + y_low) * width, (image + y_high) * width, x_low, x_high, ly, lx, ay,
            ax)  # fmt: skip


@triton.jit
def _tile_frame(boxes, off, k, b, c, batch, height, channels, oh, ow, groups, per_group,
                spatial_scale, sampling_ratio, ALIGNED: tl.constexpr, PS: tl.constexpr,
                HAS_OFFSET: tl.constexpr, GROUPED: tl.constexpr):  # fmt: skip
    """What a (RoI, bins, channels) tile needs: the frame with (y0, x0) as columns, the offsets
    ([B, 1], or [B, C] when GROUPED), and the layout of the input: a corner of bin b, channel c
    at pixel p is ``p * stride + lane``."""
    bins = oh * ow
    b_ok = b < bins
    tile_ok = b_ok[:, None] & (c < channels)[None, :]
    image, y0, x0, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w = _frame(
        boxes, k, b, batch, height, spatial_scale, sampling_ratio, oh, ow, ALIGNED, PS)
    k64 = k.to(tl.int64)
    dx = tl.zeros((b.shape[0], 1), tl.float32)
    dy = dx
    if HAS_OFFSET:
        if GROUPED:
            dx, dy = _shift(off, k64, b[:, None], (c // per_group)[None, :], groups, bins,
                            tile_ok)  # fmt: skip
        else:
            dx, dy = _shift(off, k64, b[:, None], 0, groups, bins, b_ok[:, None])
    if PS:
        stride = bins * channels
        lane = b[:, None] * channels + c[None, :]
    else:
        stride = channels
        lane = c[None, :]
    return (tile_ok, image, y0[:, None], x0[:, None], dy, dx, bin_h, bin_w, roi_h, roi_w,
            grid_h, grid_w, stride, lane)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# kernels of both ops. deform_roi_pool: input [N, H, W, C]; deform_ps_roi_pool (PS): input
# [N, H, W, bins, C_out], output channel c of bin b reads input channel c * bins + b and moves
# with offset group c // per_group. Output / grad_out [K, C, oh, ow]; offsets [K, 2 * G, oh, ow].


@triton.jit(do_not_specialize=_RUNTIME)
def _forward_kernel(inp, boxes, off, msk, out, batch, height, width, channels, oh, ow, groups,
                    per_group, spatial_scale, sampling_ratio, gamma, ALIGNED: tl.constexpr,
                    PS: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_MASK: tl.constexpr,
                    GROUPED: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_C: tl.constexpr):  # fmt: skip
    """out[k, c, b] for a block of bins and a block of channels of RoI k."""
    k = tl.program_id(0)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    bins = oh * ow
    (tile_ok, image, y0, x0, dy, dx, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w, stride,
     lane) = _tile_frame(boxes, off, k, b, c, batch, height, channels, oh, ow, groups, per_group,
                         spatial_scale, sampling_ratio, ALIGNED, PS, HAS_OFFSET, GROUPED)  # fmt: skip
    acc = tl.zeros((BLOCK_B, BLOCK_C), tl.float32)
    for s in range(0, grid_h * grid_w):
        inside, row_l, row_h, xl, xh, ly, lx, ay, ax = _corners(
            s, y0, x0, dy, dx, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w, gamma, image, height,
            width, HAS_OFFSET)  # fmt: skip
        ok = tile_ok & inside
        v00 = tl.load(inp + (row_l + xl) * stride + lane, mask=ok, other=0.0).to(tl.float32)
        v01 = tl.load(inp + (row_l + xh) * stride + lane, mask=ok, other=0.0).to(tl.float32)
        v10 = tl.load(inp + (row_h + xl) * stride + lane, mask=ok, other=0.0).to(tl.float32)
        v11 = tl.load(inp + (row_h + xh) * stride + lane, mask=ok, other=0.0).to(tl.float32)
        acc += ((1.0 - ly) * (1.0 - lx)) * v00 + ((1.0 - ly) * lx) * v01
        acc += (ly * (1.0 - lx)) * v10 + (ly * lx) * v11
    acc = acc / tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    k64 = k.to(tl.int64)
    if HAS_MASK:
        m = tl.load(msk + (k64 * bins + b)[:, None], mask=(b < bins)[:, None])
        acc = acc * m.to(tl.float32)
    dst = out + (k64 * channels + c[None, :]) * bins + b[:, None]
    tl.store(dst, acc.to(out.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=_RUNTIME)
def _offset_grad_kernel(inp, boxes, off, msk, grad_out, grad_off, grad_msk, batch, height, width,
                        channels, oh, ow, groups, per_group, spatial_scale, sampling_ratio, gamma,
                        ALIGNED: tl.constexpr, PS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        HAS_MASK: tl.constexpr, NEED_OFFSET: tl.constexpr,
                        NEED_MASK: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_C: tl.constexpr):  # fmt: skip
    """dL/doffset[k, 2g:2g+2, bins] (and dL/dmask[k, 0, bins]) for offset group g.

    The channels of the group (all of them without groups) are reduced here, block after block
    in a fixed order: no atomics.
    """
    k = tl.program_id(0)
    g_id = tl.program_id(2)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    bins = oh * ow
    b_ok = b < bins
    image, y0, x0, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w = _frame(
        boxes, k, b, batch, height, spatial_scale, sampling_ratio, oh, ow, ALIGNED, PS)
    y0 = y0[:, None]
    x0 = x0[:, None]
    k64 = k.to(tl.int64)
    dx = tl.zeros((BLOCK_B, 1), tl.float32)
    dy = dx
    if HAS_OFFSET:
        dx, dy = _shift(off, k64, b[:, None], g_id, groups, bins, b_ok[:, None])
    if PS:
        stride = bins * channels
    else:
        stride = channels
    sum_v = tl.zeros((BLOCK_B, 1), tl.float32)
    sum_y = tl.zeros((BLOCK_B, 1), tl.float32)
    sum_x = tl.zeros((BLOCK_B, 1), tl.float32)
    for c0 in range(0, per_group, BLOCK_C):
        r = c0 + tl.arange(0, BLOCK_C)
        c = (g_id * per_group + r)[None, :]
        tile_ok = b_ok[:, None] & (r < per_group)[None, :]
        if PS:
            lane = b[:, None] * channels + c
        else:
            lane = c
        g = tl.load(grad_out + (k64 * channels + c) * bins + b[:, None], mask=tile_ok,
                    other=0.0).to(tl.float32)  # fmt: skip
        for s in range(0, grid_h * grid_w):
            inside, row_l, row_h, xl, xh, ly, lx, ay, ax = _corners(
                s, y0, x0, dy, dx, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w, gamma, image,
                height, width, HAS_OFFSET)  # fmt: skip
            ok = tile_ok & inside
            va = tl.load(inp + (row_l + xl) * stride + lane, mask=ok, other=0.0).to(tl.float32)
            vb = tl.load(inp + (row_l + xh) * stride + lane, mask=ok, other=0.0).to(tl.float32)
            vc = tl.load(inp + (row_h + xl) * stride + lane, mask=ok, other=0.0).to(tl.float32)
            vd = tl.load(inp + (row_h + xh) * stride + lane, mask=ok, other=0.0).to(tl.float32)
            top = va + lx * (vb - va)
            bottom = vc + lx * (vd - vc)
            if NEED_MASK:
                sum_v += tl.sum(g * (top + ly * (bottom - top)), axis=1, keep_dims=True)
            if NEED_OFFSET:
                sum_y += tl.sum(g * (bottom - top), axis=1, keep_dims=True) * ay
                sum_x += tl.sum(g * ((1.0 - ly) * (vb - va) + ly * (vd - vc)), axis=1,
                                keep_dims=True) * ax  # fmt: skip
    scale = 1.0 / tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    at = k64 * bins + b[:, None]
    if NEED_MASK:
        tl.store(grad_msk + at, sum_v * scale, mask=b_ok[:, None])
    if NEED_OFFSET:
        if HAS_MASK:
            scale = scale * tl.load(msk + at, mask=b_ok[:, None]).to(tl.float32)
        at = 2 * (k64 * groups + g_id) * bins + b[:, None]
        tl.store(grad_off + at, gamma * roi_w * scale * sum_x, mask=b_ok[:, None])
        tl.store(grad_off + at + bins, gamma * roi_h * scale * sum_y, mask=b_ok[:, None])


@triton.jit(do_not_specialize=_RUNTIME)
def _input_grad_kernel(boxes, off, msk, grad_out, grad_inp, batch, height, width, channels, oh,
                       ow, groups, per_group, spatial_scale, sampling_ratio, gamma,
                       ALIGNED: tl.constexpr, PS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                       HAS_MASK: tl.constexpr, GROUPED: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_C: tl.constexpr):  # fmt: skip
    """Scatter of a (RoI, bin block, channel block) into a float32 channels-last input gradient
    (the input's layout), by float atomics."""
    k = tl.program_id(0)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    bins = oh * ow
    (tile_ok, image, y0, x0, dy, dx, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w, stride,
     lane) = _tile_frame(boxes, off, k, b, c, batch, height, channels, oh, ow, groups, per_group,
                         spatial_scale, sampling_ratio, ALIGNED, PS, HAS_OFFSET, GROUPED)  # fmt: skip
    k64 = k.to(tl.int64)
    g = tl.load(grad_out + (k64 * channels + c[None, :]) * bins + b[:, None], mask=tile_ok,
                other=0.0).to(tl.float32)  # fmt: skip
    g = g / tl.maximum(grid_h * grid_w, 1).to(tl.float32)
    if HAS_MASK:
        g = g * tl.load(msk + (k64 * bins + b)[:, None], mask=(b < bins)[:, None]).to(tl.float32)
    for s in range(0, grid_h * grid_w):
        inside, row_l, row_h, xl, xh, ly, lx, ay, ax = _corners(
            s, y0, x0, dy, dx, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w, gamma, image, height,
            width, HAS_OFFSET)  # fmt: skip
        ok = tile_ok & inside
        w00 = (1.0 - ly) * (1.0 - lx)
        w01 = (1.0 - ly) * lx
        w10 = ly * (1.0 - lx)
        w11 = ly * lx
        # a zero weight (a clamped corner) sends nothing: fewer atomics
        tl.atomic_add(grad_inp + (row_l + xl) * stride + lane, w00 * g, mask=ok & (w00 != 0.0),
                      sem="relaxed")  # fmt: skip
        tl.atomic_add(grad_inp + (row_l + xh) * stride + lane, w01 * g, mask=ok & (w01 != 0.0),
                      sem="relaxed")  # fmt: skip
        tl.atomic_add(grad_inp + (row_h + xl) * stride + lane, w10 * g, mask=ok & (w10 != 0.0),
                      sem="relaxed")  # fmt: skip
        tl.atomic_add(grad_inp + (row_h + xh) * stride + lane, w11 * g, mask=ok & (w11 != 0.0),
                      sem="relaxed")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the deterministic input gradient: contribution lists, sorted by target, summed in order.
# A "row" is one bin of one RoI and one offset group: r = (k * bins + b) * G + g (G = 1 without
# groups). Its gradient row g_rows[r] holds the channels that move with it (all C; or the
# C_out / G channels of group g). A target ("key") is a pixel of [N, H, W], or for PS a pixel of
# plane (n, b, g): [N, bins, G, H, W].


@triton.jit(do_not_specialize=_RUNTIME)
def _sample_count_kernel(boxes, counts, batch, spatial_scale, sampling_ratio, oh, ow,
                         ALIGNED: tl.constexpr, PS: tl.constexpr):  # fmt: skip
    """grid_h * grid_w of RoI k, exactly as the other kernels compute it."""
    k = tl.program_id(0)
    _, _, _, _, _, _, _, grid_h, grid_w = _frame(boxes, k, 0, batch, 1, spatial_scale,
                                                 sampling_ratio, oh, ow, ALIGNED, PS)  # fmt: skip
    tl.store(counts + k, grid_h * grid_w)


@triton.jit(do_not_specialize=_RUNTIME + ["row0", "entry0", "num_keys"])
def _contributions_kernel(boxes, off, msk, row_end, keys, src, wts, row0, entry0, batch, height,
                          width, oh, ow, groups, spatial_scale, sampling_ratio, gamma, num_keys,
                          ALIGNED: tl.constexpr, PS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                          HAS_MASK: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """The 4 * grid_h * grid_w entries (key, source row, weight) of row ``row0 + program``.

    Entry ``4 * s + corner`` of the row lands at ``row_end[r] - 4 * count - entry0 + 4 * s +
    corner``; a sample outside the map or a zero-weight corner gets the key ``num_keys`` (sorted
    last, never summed).
    """
    r = row0 + tl.program_id(0).to(tl.int64)
    bins = oh * ow
    g_id = r % groups
    b = (r // groups) % bins
    k = r // groups // bins
    image, y0, x0, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w = _frame(
        boxes, k, b, batch, height, spatial_scale, sampling_ratio, oh, ow, ALIGNED, PS)
    dx = 0.0
    dy = 0.0
    if HAS_OFFSET:  # one bin per program: no tile edge
        at = 2 * (k * groups + g_id) * bins + b
        dx = tl.load(off + at).to(tl.float32)
        dy = tl.load(off + at + bins).to(tl.float32)
    count = grid_h * grid_w
    scale = 1.0 / tl.maximum(count, 1).to(tl.float32)
    if HAS_MASK:
        scale = scale * tl.load(msk + k * bins + b).to(tl.float32)
    if PS:  # image = n * H: the pixel rows of plane (n, b, g) start at ((n * bins + b) * G + g) * H
        image = (image * bins + b * height) * groups + g_id * height
    first = tl.load(row_end + r) - 4 * count - entry0
    for s0 in range(0, count, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < count
        inside, row_l, row_h, xl, xh, ly, lx, ay, ax = _corners(
            s, y0, x0, dy, dx, bin_h, bin_w, roi_h, roi_w, grid_h, grid_w, gamma, image, height,
            width, HAS_OFFSET)  # fmt: skip
        slot = first + 4 * s
        for corner in tl.static_range(4):
            if corner // 2 == 0:
                row = row_l
                wy = 1.0 - ly
            else:
                row = row_h
                wy = ly
            if corner % 2 == 0:
                col = xl
                wx = 1.0 - lx
            else:
                col = xh
                wx = lx
            w = wy * wx
            tl.store(keys + slot + corner, tl.where(inside & (w != 0.0), row + col, num_keys),
                     mask=s_ok)  # fmt: skip
            tl.store(src + slot + corner, r, mask=s_ok)
            tl.store(wts + slot + corner, w * scale, mask=s_ok)


@triton.jit(do_not_specialize=["segments", "channels"])
def _segment_sum_kernel(seg_start, seg_key, order, src, wts, g_rows, grad, segments, channels,
                        ACCUMULATE: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_C: tl.constexpr):  # fmt: skip
    """grad[key, c] (+)= the sum of weight * g_rows[source, c] over a key's run, in list order.

    A program owns BLOCK_P keys (distinct: no other program writes them) and BLOCK_C channels.
    """
    q = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    q_ok = q < segments
    c_ok = c < channels
    start = tl.load(seg_start + q, mask=q_ok, other=0)
    end = tl.load(seg_start + q + 1, mask=q_ok, other=0)
    acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for j in range(0, tl.max(end - start, axis=0)):
        at = start + j
        ok = q_ok & (at < end)
        e = tl.load(order + at, mask=ok, other=0)
        row = tl.load(src + e, mask=ok, other=0)
        w = tl.load(wts + e, mask=ok, other=0.0)
        v = tl.load(g_rows + row[:, None] * channels + c, mask=ok[:, None] & c_ok, other=0.0)
        acc += w[:, None] * v.to(tl.float32)
    key = tl.load(seg_key + q, mask=q_ok, other=0)
    dst = grad + key[:, None] * channels + c
    tile_ok = q_ok[:, None] & c_ok
    if ACCUMULATE:
        acc = tl.load(dst, mask=tile_ok, other=0.0) + acc
    tl.store(dst, acc, mask=tile_ok)


def _deterministic_scatter(p: "_Problem", g_rows, num_keys):
    """float32 [num_keys, channels of g_rows]: the input gradient, without float atomics.

    Bit-identical on repeat: the lists are generated at fixed places, the sort is stable, and
    each key's run is summed in list order by the one program that owns the key.
    """
    device = g_rows.device
    channels = g_rows.shape[1]
    grad = torch.zeros(num_keys, channels, dtype=torch.float32, device=device)
    counts = torch.empty(p.rois, dtype=torch.int32, device=device)
    _sample_count_kernel[(p.rois,)](p.boxes, counts, p.batch, p.spatial_scale, p.sampling_ratio,
                                    p.oh, p.ow, ALIGNED=p.aligned, PS=p.ps)  # fmt: skip
    rows_per_roi = p.bins * p.groups
    row_end = torch.cumsum((4 * counts.to(torch.int64)).repeat_interleave(rows_per_roi), 0)
    total = int(row_end[-1])
    # chunks: the rows whose lists end within the same multiple of the budget
    budget = _DETERMINISTIC_ENTRIES
    cuts = []
    if total > budget:
        marks = torch.arange(budget, total, budget, device=device, dtype=torch.int64)
        cuts = torch.searchsorted(row_end, marks, right=True).tolist()
    bounds = sorted({0, *cuts, row_end.numel()})
    ends = dict(zip(bounds[1:], row_end[torch.tensor(bounds[1:], device=device) - 1].tolist()))
    ends[0] = 0
    block_p, block_c, num_warps = _tile(64, channels)
    for chunk, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:])):
        entries = ends[r1] - ends[r0]
        if entries == 0:
            continue
        keys = torch.empty(entries, dtype=torch.int64, device=device)
        src = torch.empty(entries, dtype=torch.int64, device=device)
        wts = torch.empty(entries, dtype=torch.float32, device=device)
        _contributions_kernel[(r1 - r0,)](
            p.boxes, p.off, p.msk, row_end, keys, src, wts, r0, ends[r0], p.batch, p.height,
            p.width, p.oh, p.ow, p.groups, p.spatial_scale, p.sampling_ratio, p.gamma, num_keys,
            ALIGNED=p.aligned, PS=p.ps, HAS_OFFSET=p.has_offset, HAS_MASK=p.has_mask,
            BLOCK_S=16 if _INTERPRETED else 64)  # fmt: skip
        sorted_keys, order = torch.sort(keys, stable=True)
        used = int(torch.searchsorted(sorted_keys, torch.tensor([num_keys], device=device)))
        if used == 0:
            continue
        sorted_keys = sorted_keys[:used]
        first = torch.ones(used, dtype=torch.bool, device=device)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        starts = torch.nonzero(first).flatten()
        segments = starts.numel()
        grid = (triton.cdiv(segments, block_p), triton.cdiv(channels, block_c))
        _segment_sum_kernel[grid](torch.cat([starts, starts.new_tensor([used])]),
                                  sorted_keys[starts], order, src, wts, g_rows, grad, segments,
                                  channels, ACCUMULATE=chunk > 0, BLOCK_P=block_p,
                                  BLOCK_C=block_c, num_warps=num_warps)  # fmt: skip
    return grad


# ---------------------------------------------------------------------------------------------
# the module's contract (as _deform_roi_pool_cpu)


class _Problem:
    """The operands and launch settings of one call, shared by its forward and backward."""

    def __init__(self, input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset,
                 mask, gamma, ps):  # fmt: skip
        self.batch, channels_in, self.height, self.width = input.shape
        self.oh, self.ow = output_size
        self.bins = self.oh * self.ow
        self.channels = channels_in // self.bins if ps else channels_in
        self.rois = boxes.shape[0]
        self.ps = ps
        self.aligned = bool(aligned) or ps
        self.spatial_scale, self.sampling_ratio, self.gamma = spatial_scale, sampling_ratio, gamma
        self.groups = offset.shape[1] // 2 if offset is not None and ps else 1
        self.per_group = self.channels // self.groups
        self.has_offset, self.has_mask = offset is not None, mask is not None
        self.empty = self.rois == 0 or input.numel() == 0
        self.input = input.detach()
        self.boxes = boxes.detach().to(torch.float32).contiguous()
        # an absent offset / mask is never read (the kernels are compiled without it)
        self.off = offset.detach().contiguous() if offset is not None else self.boxes
        self.msk = mask.detach().contiguous() if mask is not None else self.boxes

    def layout(self):
        """The input channels last: [N, H, W, C], or [N, H, W, bins, C_out] for PS."""
        if not self.ps:
            return self.input.permute(0, 2, 3, 1).contiguous()  # free if already channels last
        view = self.input.reshape(self.batch, self.channels, self.bins, self.height, self.width)
        return view.permute(0, 3, 4, 2, 1).contiguous()

    def common(self):
        """The runtime arguments every tile kernel takes after its tensors."""
        return (self.batch, self.height, self.width, self.channels, self.oh, self.ow, self.groups,
                self.per_group, self.spatial_scale, self.sampling_ratio, self.gamma)  # fmt: skip

    def tile_grid(self):
        block_b, block_c, num_warps = _tile(self.bins, self.channels)
        grid = (self.rois, triton.cdiv(self.bins, block_b), triton.cdiv(self.channels, block_c))
        flags = dict(ALIGNED=self.aligned, PS=self.ps, HAS_OFFSET=self.has_offset,
                     HAS_MASK=self.has_mask, GROUPED=self.groups > 1, BLOCK_B=block_b,
                     BLOCK_C=block_c, num_warps=num_warps)  # fmt: skip
        return grid, flags


def _pool(p: _Problem):
    out = torch.empty((p.rois, p.channels, p.oh, p.ow), dtype=p.input.dtype,
                      device=p.input.device)  # fmt: skip
    if p.empty:
        return out.zero_()
    grid, flags = p.tile_grid()
    _forward_kernel[grid](p.layout(), p.boxes, p.off, p.msk, out, *p.common(), **flags)
    return out


def _offset_grads(p: _Problem, grad_out, need_offset: bool, need_mask: bool):
    """float32 (dL/doffset [K, 2 * G, oh, ow], dL/dmask [K, 1, oh, ow])."""
    device = p.input.device
    grad_off = torch.zeros((p.rois, 2 * p.groups, p.oh, p.ow), dtype=torch.float32, device=device)
    grad_msk = torch.zeros((p.rois, 1, p.oh, p.ow), dtype=torch.float32, device=device)
    if not p.empty:
        block_b, block_c, num_warps = _tile(p.bins, p.per_group)
        grid = (p.rois, triton.cdiv(p.bins, block_b), p.groups)
        _offset_grad_kernel[grid](p.layout(), p.boxes, p.off, p.msk, grad_out, grad_off, grad_msk,
                                  *p.common(), ALIGNED=p.aligned, PS=p.ps,
                                  HAS_OFFSET=p.has_offset, HAS_MASK=p.has_mask,
                                  NEED_OFFSET=need_offset, NEED_MASK=need_mask, BLOCK_B=block_b,
                                  BLOCK_C=block_c, num_warps=num_warps)  # fmt: skip
    return grad_off, grad_msk


def _input_grad(p: _Problem, grad_out):
    """float32 dL/dinput in the input's NCHW shape."""
    device = p.input.device
    cl_shape = ((p.batch, p.height, p.width, p.bins, p.channels) if p.ps
                else (p.batch, p.height, p.width, p.channels))  # fmt: skip
    if p.empty:
        return torch.zeros(p.input.shape, dtype=torch.float32, device=device)
    if torch.are_deterministic_algorithms_enabled():
        # rows (k, b, g) carry the channels of group g: [K, G, C / G, bins] -> [K, bins, G, C / G]
        g_rows = (grad_out.reshape(p.rois, p.groups, p.per_group, p.bins).permute(0, 3, 1, 2)
                  .reshape(p.rois * p.bins * p.groups, p.per_group).contiguous())  # fmt: skip
        planes = p.batch * (p.bins * p.groups if p.ps else 1)
        grad = _deterministic_scatter(p, g_rows, planes * p.height * p.width)
        if not p.ps:
            return grad.reshape(cl_shape).permute(0, 3, 1, 2).contiguous()
        # keys (n, b, g, y, x), channels r  ->  NCHW channel (g * C / G + r) * bins + b
        grad = grad.reshape(p.batch, p.bins, p.groups, p.height, p.width, p.per_group)
        return grad.permute(0, 2, 5, 1, 3, 4).reshape(p.input.shape)
    grad = torch.zeros(cl_shape, dtype=torch.float32, device=device)
    grid, flags = p.tile_grid()
    _input_grad_kernel[grid](p.boxes, p.off, p.msk, grad_out, grad, *p.common(), **flags)
    if not p.ps:
        return grad.permute(0, 3, 1, 2).contiguous()
    return grad.permute(0, 4, 3, 1, 2).reshape(p.input.shape)  # [N, C_out, bins, H, W]


def forward(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset, mask,
            gamma):  # fmt: skip
    return _pool(_Problem(input, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                          offset, mask, gamma, ps=False))  # fmt: skip


def backward(grad_out, input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset,
             mask, gamma, need):  # fmt: skip
    """Gradients (input, offset, mask) for the flags in ``need``; None where not needed."""
    need_input, need_offset, need_mask = need
    need_offset = need_offset and offset is not None
    need_mask = need_mask and mask is not None
    p = _Problem(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset, mask,
                 gamma, ps=False)  # fmt: skip
    grad_out = grad_out.detach().contiguous()
    grad_input = grad_offset = grad_mask = None
    if need_offset or need_mask:
        grad_offset, grad_mask = _offset_grads(p, grad_out, need_offset, need_mask)
        grad_offset = grad_offset if need_offset else None
        grad_mask = grad_mask if need_mask else None
    if need_input:
        grad_input = _input_grad(p, grad_out)
    return grad_input, grad_offset, grad_mask


def ps_forward(input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma):
    return _pool(_Problem(input, boxes, output_size, spatial_scale, sampling_ratio, True, offset,
                          None, gamma, ps=True))  # fmt: skip


def ps_backward(grad_out, input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma,
                need):  # fmt: skip
    """Gradients (input, offset) for the flags in ``need``; None where not needed."""
    need_input, need_offset = need
    need_offset = need_offset and offset is not None
    p = _Problem(input, boxes, output_size, spatial_scale, sampling_ratio, True, offset, None,
                 gamma, ps=True)  # fmt: skip
    grad_out = grad_out.detach().contiguous()
    grad_offset = _offset_grads(p, grad_out, True, False)[0] if need_offset else None
    grad_input = _input_grad(p, grad_out) if need_input else None
    return grad_input, grad_offset
