"""Triton kernels of deform_conv2d (forward and every gradient), the op's CUDA kernels.

Same contract as :mod:`deformable.ops._deform_conv_cpu`: ``forward(input, offset, weight, bias,
stride, padding, dilation, mask)`` and ``backward(grad_out, input, offset, weight, stride,
padding, dilation, mask, need) -> (grad_input, grad_offset, grad_weight, grad_mask)``. float16 and
bfloat16 run natively (float32 coordinates, blends and accumulation); float64 is not handled here.
On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module is imported), which is how they are tested without a GPU.

Notation: M = N * Ho * Wo output positions (flattened over the batch), K = kh * kw taps, C input
channels in ``wg`` weight groups of ``cw`` channels and in ``G`` offset groups of ``cg`` channels.
A *run* is the intersection of one weight group and one offset group: the unit a channel chunk
never straddles (bilinear weights belong to one offset group, weights to one weight group).

Kernels
- ``_forward_kernel``, grid (M / BLOCK_M, wg * Cout_g / BLOCK_N): implicit GEMM. A program owns
  BLOCK_M positions x BLOCK_N output channels of one weight group; per tap and run it computes the
  sampling points and the four bilinear weights (times the mask) once, then per chunk of BLOCK_K
  channels gathers the four corners from a channels-last copy of the input (channel-contiguous
  rows: coalesced), blends them and feeds ``tl.dot`` with the weight tile. float32 accumulation,
  no column buffer in memory.
- ``_grad_sample_kernel``, grid (M / BLOCK_M, G * K): a program owns BLOCK_M positions of one
  (offset group, tap). Per chunk of the group's channels it forms dL/dsample = grad_out x W
  (``tl.dot`` over the output channels of the chunk's weight group) and at once reduces it over
  the group's channels into the offset and mask gradients (no other program touches them), and
  scatters it into the input gradient: float atomics, or, when deterministic algorithms are on,
  it writes dL/dsample and every corner's target and weight for a bounded slab of positions,
  and ``_scatter_reduce_kernel`` sums them per target pixel in a fixed order (after a stable sort
  by target), one program per (pixel, offset group): no atomics, bit-identical on repeat.
- ``_grad_weight_kernel``, grid (splits, runs * chunks, K * Cout_g / BLOCK_N): a program owns a
  (tap, channel chunk, output-channel block) tile of dL/dW and loops over the positions of its
  split with the forward's gather times the grad_out tile; the few per-split partial sums are
  added afterwards by ``torch.sum`` (deterministic, no atomics).

GPU rules the interpreter does not check, kept here: every ``tl.dot`` dimension is a power of two
>= 16 (``_config``); every load and store is masked at tile edges; addresses that scale with N, H,
W or C are computed in int64 (``offs_m`` is int64 and every image-sized index derives from it);
constexprs come from the kernel size, the flags and channel-derived block sizes only, and the
sizes that vary with the image (M, P, H, W, Wo) are not specialised (``do_not_specialize``), so one
binary serves every batch and image size of a layer.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "backward", "forward"]

#: Bound of the deterministic scatter's buffers per slab of positions, in bytes.
DETERMINISTIC_TILE_BYTES = 64 * 2**20
#: Bound of the weight gradient's per-split partial sums, in bytes.
WEIGHT_PARTIAL_BYTES = 64 * 2**20
#: Position granularity of the weight-gradient splits (a multiple of every BLOCK_M).
SPLIT_ALIGN = 128

_NO_SPEC = ["M", "m_start", "m_end", "nowhere", "P", "H", "W", "Wo", "per_split"]


# ---------------------------------------------------------------------------------------------
# Shared device functions (inlined by Triton).


@triton.jit
def _positions(offs_m, P, Wo, sh, sw, ph, pw):
    """Batch index, position in the image and top-left of the regular grid of ``offs_m``."""
    n = offs_m // P
    p = offs_m - n * P
    ho = p // Wo
    wo = p - ho * Wo
    return n, p, ho * sh - ph, wo * sw - pw


@triton.jit
def _sample_point(off_ptr, mask_ptr, n, p, m_ok, y_top, x_left, g, k, i, j, P, H, W, dh, dw,
                  G, KK: tl.constexpr, HAS_MASK: tl.constexpr, GRAD: tl.constexpr):  # fmt: skip
    """Sampling point of tap k (i, j), offset group g: inside flag, top-left corner, fractions,
    mask. The forward samples inside (-1, H) x (-1, W); the backward keeps -1 itself (the
    one-sided derivative from inside, torchvision's convention). NaN is never inside."""
    plane = n * G * KK + g * KK + k  # int64 (n is): channel (n, g, k) of mask, pair of offset
    dy = tl.load(off_ptr + plane * 2 * P + p, mask=m_ok, other=0.0).to(tl.float32)
    dx = tl.load(off_ptr + plane * 2 * P + P + p, mask=m_ok, other=0.0).to(tl.float32)
    y = (y_top + i * dh).to(tl.float32) + dy
    x = (x_left + j * dw).to(tl.float32) + dx
    if GRAD:
        inside = (y >= -1.0) & (y < H) & (x >= -1.0) & (x < W) & m_ok
    else:
        inside = (y > -1.0) & (y < H) & (x > -1.0) & (x < W) & m_ok
    # outside points (also NaN and inf) get finite stand-ins; all their corners are masked off
    ys = tl.where(inside, y, 0.0)
    xs = tl.where(inside, x, 0.0)
    y0f = tl.floor(ys)
    x0f = tl.floor(xs)
    if HAS_MASK:
        m = tl.load(mask_ptr + plane * P + p, mask=m_ok, other=0.0).to(tl.float32)
    else:
        m = tl.full(ys.shape, 1.0, tl.float32)
    return inside, y0f.to(tl.int32), x0f.to(tl.int32), ys - y0f, xs - x0f, m


@triton.jit
def _corners(n, y0, x0, inside, H, W):
    """Pixel index (int64, channels-last row) of the top-left corner and each corner's validity."""
    top = inside & (y0 >= 0)
    bottom = inside & (y0 + 1 < H)
    left = x0 >= 0
    right = x0 + 1 < W
    pix = (n * H + y0) * W + x0
    return pix, top & left, top & right, bottom & left, bottom & right


@triton.jit
def _gather(x_ptr, pix, ok00, ok01, ok10, ok11, offs_c, c_ok, C, W):
    """The four corners [BLOCK_M, BLOCK_K] of a channel chunk, zero where missing, in float32."""
    a = x_ptr + pix[:, None] * C + offs_c[None, :]
    c2 = c_ok[None, :]
    v00 = tl.load(a, mask=ok00[:, None] & c2, other=0.0).to(tl.float32)
    v01 = tl.load(a + C, mask=ok01[:, None] & c2, other=0.0).to(tl.float32)
    v10 = tl.load(a + W * C, mask=ok10[:, None] & c2, other=0.0).to(tl.float32)
    v11 = tl.load(a + W * C + C, mask=ok11[:, None] & c2, other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. ``UPCAST`` only under the interpreter, whose dot multiplies bfloat16 as raw
    integers: the operands (already rounded to bfloat16) are multiplied in float32 there."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


# ---------------------------------------------------------------------------------------------
# Forward.


@triton.jit(do_not_specialize=_NO_SPEC)
def _forward_kernel(x_ptr, off_ptr, mask_ptr, w_ptr, b_ptr, out_ptr,
                    M, P, H, W, Wo, C, Cout, cw, cout_g, cg, G, sh, sw, ph, pw, dh, dw,
                    KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):  # fmt: skip
    """out[n, gw*cout_g + co, p] for a tile of positions x output channels of weight group gw.

    x: channels-last input [N, H, W, C]; w: [wg, K, cw, cout_g] (output channels contiguous).
    """
    KK: tl.constexpr = KH * KW
    pid_m = tl.program_id(0)
    co_blocks = tl.cdiv(cout_g, BLOCK_N)
    gw = tl.program_id(1) // co_blocks
    offs_co = (tl.program_id(1) % co_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < cout_g
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n, p, y_top, x_left = _positions(offs_m, P, Wo, sh, sw, ph, pw)
    c_lo = gw * cw
    c_hi = c_lo + cw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(KK):
        i = k // KW
        j = k - i * KW
        # the runs of this weight group: one per offset group it overlaps
        for g in range(c_lo // cg, (c_hi - 1) // cg + 1):
            inside, y0, x0, ly, lx, m = _sample_point(
                off_ptr, mask_ptr, n, p, m_ok, y_top, x_left, g, k, i, j, P, H, W, dh, dw, G,
                KK, HAS_MASK, False)  # fmt: skip
            pix, ok00, ok01, ok10, ok11 = _corners(n, y0, x0, inside, H, W)
            hy = 1.0 - ly
            hx = 1.0 - lx
            w00 = (hy * hx * m)[:, None]
            w01 = (hy * lx * m)[:, None]
            w10 = (ly * hx * m)[:, None]
            w11 = (ly * lx * m)[:, None]
            run_lo = tl.maximum(c_lo, g * cg)
            run_hi = tl.minimum(c_hi, g * cg + cg)
            for c0 in range(run_lo, run_hi, BLOCK_K):
                offs_c = c0 + tl.arange(0, BLOCK_K)
                c_ok = offs_c < run_hi
                v00, v01, v10, v11 = _gather(x_ptr, pix, ok00, ok01, ok10, ok11, offs_c, c_ok, C, W)
                cols = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                w_rows = (gw * KK + k) * cw + (offs_c - c_lo)
                wt = tl.load(w_ptr + w_rows[:, None] * cout_g + offs_co[None, :],
                             mask=c_ok[:, None] & co_ok[None, :], other=0.0)  # fmt: skip
                acc = _mma(cols.to(wt.dtype), wt, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + gw * cout_g + offs_co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    planes = (n * Cout + gw * cout_g)[:, None] + offs_co[None, :]  # int64
    tl.store(out_ptr + planes * P + p[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & co_ok[None, :])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Backward: dL/dsample -> offset / mask / input gradients.


@triton.jit(do_not_specialize=_NO_SPEC)
def _grad_sample_kernel(x_ptr, off_ptr, mask_ptr, w_ptr, gout_ptr,
                        gx_ptr, goff_ptr, gmask_ptr, gs_ptr, key_ptr, cw_ptr,
                        m_start, m_end, nowhere, P, H, W, Wo, C, Cout, cw, cout_g, cg, G,
                        sh, sw, ph, pw, dh, dw,
                        KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
                        NEED_OFFSET: tl.constexpr, NEED_MASK: tl.constexpr,
                        NEED_INPUT: tl.constexpr, DETERMINISTIC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """Positions [m_start, m_end) x one (offset group, tap) per program.

    w: [wg, K, cout_g, cw] (input channels contiguous). gx: float32 channels-last input gradient
    (atomic path). Deterministic path, for the slab's local position q = m - m_start:
    ``gs[q, g, k, c - g*cg]`` = dL/dsample times the mask, and per corner e = ((q*G + g)*K + k)*4
    + corner its target ``key[e]`` = pixel * G + g (``nowhere`` = N*H*W*G for a missing corner)
    and bilinear weight ``cw[e]``.
    """
    KK: tl.constexpr = KH * KW
    pid_gk = tl.program_id(1)
    g = pid_gk // KK
    k = pid_gk - g * KK
    i = k // KW
    j = k - i * KW
    offs_m = m_start + tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < m_end
    n, p, y_top, x_left = _positions(offs_m, P, Wo, sh, sw, ph, pw)
    inside, y0, x0, ly, lx, m = _sample_point(
        off_ptr, mask_ptr, n, p, m_ok, y_top, x_left, g, k, i, j, P, H, W, dh, dw, G, KK,
        HAS_MASK, True)  # fmt: skip
    pix, ok00, ok01, ok10, ok11 = _corners(n, y0, x0, inside, H, W)
    hy = 1.0 - ly
    hx = 1.0 - lx
    acc_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_lo = g * cg
    c_hi = c_lo + cg
    # the runs of this offset group: one per weight group it overlaps
    for gw in range(c_lo // cw, (c_hi - 1) // cw + 1):
        run_lo = tl.maximum(c_lo, gw * cw)
        run_hi = tl.minimum(c_hi, gw * cw + cw)
        for c0 in range(run_lo, run_hi, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            c_ok = offs_c < run_hi
            # dL/dsample of the chunk: grad_out [BLOCK_M, co] x W [co, chunk]
            gs = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for co0 in range(0, cout_g, BLOCK_N):
                offs_co = co0 + tl.arange(0, BLOCK_N)
                co_ok = offs_co < cout_g
                planes = (n * Cout + gw * cout_g)[:, None] + offs_co[None, :]  # int64
                go = tl.load(gout_ptr + planes * P + p[:, None],
                             mask=m_ok[:, None] & co_ok[None, :], other=0.0)  # fmt: skip
                w_rows = (gw * KK + k) * cout_g + offs_co
                wt = tl.load(w_ptr + w_rows[:, None] * cw + (offs_c - gw * cw)[None, :],
                             mask=co_ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
                gs = _mma(go, wt, gs, PRECISION, UPCAST)
            if NEED_OFFSET or NEED_MASK:
                v00, v01, v10, v11 = _gather(x_ptr, pix, ok00, ok01, ok10, ok11, offs_c, c_ok, C, W)
                top = v00 + lx[:, None] * (v01 - v00)
                bottom = v10 + lx[:, None] * (v11 - v10)
                if NEED_MASK:
                    acc_m += tl.sum(gs * (top + ly[:, None] * (bottom - top)), axis=1)
                if NEED_OFFSET:
                    acc_y += tl.sum(gs * (bottom - top), axis=1)
                    across = hy[:, None] * (v01 - v00) + ly[:, None] * (v11 - v10)
                    acc_x += tl.sum(gs * across, axis=1)
            if NEED_INPUT:
                gsm = gs * m[:, None]
                c2 = c_ok[None, :]
                if DETERMINISTIC:
                    q = offs_m - m_start
                    rows = ((q * G + g) * KK + k) * cg
                    tl.store(gs_ptr + rows[:, None] + (offs_c - c_lo)[None, :], gsm,
                             mask=m_ok[:, None] & c2)  # fmt: skip
                else:
                    a = gx_ptr + pix[:, None] * C + offs_c[None, :]
                    tl.atomic_add(a, gsm * (hy * hx)[:, None], mask=ok00[:, None] & c2,
                                  sem="relaxed")  # fmt: skip
                    tl.atomic_add(a + C, gsm * (hy * lx)[:, None], mask=ok01[:, None] & c2,
                                  sem="relaxed")  # fmt: skip
                    tl.atomic_add(a + W * C, gsm * (ly * hx)[:, None], mask=ok10[:, None] & c2,
                                  sem="relaxed")  # fmt: skip
                    tl.atomic_add(a + W * C + C, gsm * (ly * lx)[:, None], mask=ok11[:, None] & c2,
                                  sem="relaxed")  # fmt: skip
    plane = n * G * KK + g * KK + k  # as in _sample_point
    if NEED_OFFSET:
        grad_y = tl.where(inside, acc_y * m, 0.0).to(goff_ptr.dtype.element_ty)
        grad_x = tl.where(inside, acc_x * m, 0.0).to(goff_ptr.dtype.element_ty)
        tl.store(goff_ptr + plane * 2 * P + p, grad_y, mask=m_ok)
        tl.store(goff_ptr + plane * 2 * P + P + p, grad_x, mask=m_ok)
    if NEED_MASK:
        grad_m = tl.where(inside, acc_m, 0.0).to(gmask_ptr.dtype.element_ty)
        tl.store(gmask_ptr + plane * P + p, grad_m, mask=m_ok)
    if NEED_INPUT and DETERMINISTIC:
        e = (((offs_m - m_start) * G + g) * KK + k) * 4
        key = pix * G + g
        tl.store(key_ptr + e, tl.where(ok00, key, nowhere), mask=m_ok)
        tl.store(key_ptr + e + 1, tl.where(ok01, key + G, nowhere), mask=m_ok)
        tl.store(key_ptr + e + 2, tl.where(ok10, key + W * G, nowhere), mask=m_ok)
        tl.store(key_ptr + e + 3, tl.where(ok11, key + W * G + G, nowhere), mask=m_ok)
        tl.store(cw_ptr + e, tl.where(ok00, hy * hx, 0.0), mask=m_ok)
        tl.store(cw_ptr + e + 1, tl.where(ok01, hy * lx, 0.0), mask=m_ok)
        tl.store(cw_ptr + e + 2, tl.where(ok10, ly * hx, 0.0), mask=m_ok)
        tl.store(cw_ptr + e + 3, tl.where(ok11, ly * lx, 0.0), mask=m_ok)


@triton.jit
def _scatter_reduce_kernel(gx_ptr, gs_ptr, cw_ptr, order_ptr, seg_key_ptr, seg_start_ptr,
                           seg_count_ptr, C, cg, G,
                           BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """The deterministic scatter: one program per (target pixel, offset group) of a slab adds the
    sum of its contributions, taken in sorted (stable) order, to the channels-last gradient."""
    s = tl.program_id(0)
    key = tl.load(seg_key_ptr + s)
    start = tl.load(seg_start_ptr + s)
    end = start + tl.load(seg_count_ptr + s)
    pix = key // G
    g = key - pix * G
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < cg
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        idx = e0 + tl.arange(0, BLOCK_E)
        ok = idx < end
        src = tl.load(order_ptr + idx, mask=ok, other=0)
        w = tl.load(cw_ptr + src, mask=ok, other=0.0)
        rows = tl.load(gs_ptr + (src // 4)[:, None] * cg + offs_c[None, :],
                       mask=ok[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
        acc += tl.sum(w[:, None] * rows, axis=0)
    dst = gx_ptr + pix * C + g * cg + offs_c
    tl.store(dst, tl.load(dst, mask=c_ok, other=0.0) + acc, mask=c_ok)


# ---------------------------------------------------------------------------------------------
# Backward: weight gradient.


@triton.jit(do_not_specialize=_NO_SPEC)
def _grad_weight_kernel(x_ptr, off_ptr, mask_ptr, gout_ptr, runs_ptr, part_ptr,
                        M, per_split, chunks_per_run, P, H, W, Wo, C, Cout, cw, cout_g, cg, G,
                        sh, sw, ph, pw, dh, dw,
                        KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """part[split, gw, k, c - gw*cw, co] = sum over the split's positions of sample x grad_out.

    runs: int32 [R, 4] = (first channel, end channel, offset group, weight group).
    """
    KK: tl.constexpr = KH * KW
    split = tl.program_id(0)
    r = tl.program_id(1) // chunks_per_run
    c0 = tl.load(runs_ptr + 4 * r) + (tl.program_id(1) % chunks_per_run) * BLOCK_K
    c_hi = tl.load(runs_ptr + 4 * r + 1)
    g = tl.load(runs_ptr + 4 * r + 2)
    gw = tl.load(runs_ptr + 4 * r + 3)
    co_blocks = tl.cdiv(cout_g, BLOCK_N)
    k = tl.program_id(2) // co_blocks
    i = k // KW
    j = k - i * KW
    offs_co = (tl.program_id(2) % co_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = offs_co < cout_g
    offs_c = c0 + tl.arange(0, BLOCK_K)
    c_ok = offs_c < c_hi
    m_begin = split.to(tl.int64) * per_split
    m_stop = tl.minimum(m_begin + per_split, M)
    m_stop = tl.where(c0 < c_hi, m_stop, m_begin)  # a chunk past its run's end: nothing to do
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_begin, m_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_stop
        n, p, y_top, x_left = _positions(offs_m, P, Wo, sh, sw, ph, pw)
        inside, y0, x0, ly, lx, m = _sample_point(
            off_ptr, mask_ptr, n, p, m_ok, y_top, x_left, g, k, i, j, P, H, W, dh, dw, G, KK,
            HAS_MASK, False)  # fmt: skip
        pix, ok00, ok01, ok10, ok11 = _corners(n, y0, x0, inside, H, W)
        v00, v01, v10, v11 = _gather(x_ptr, pix, ok00, ok01, ok10, ok11, offs_c, c_ok, C, W)
        hy = 1.0 - ly
        hx = 1.0 - lx
        cols = ((hy * hx * m)[:, None] * v00 + (hy * lx * m)[:, None] * v01
                + (ly * hx * m)[:, None] * v10 + (ly * lx * m)[:, None] * v11)  # fmt: skip
        planes = (n * Cout + gw * cout_g)[:, None] + offs_co[None, :]  # int64
        go = tl.load(gout_ptr + planes * P + p[:, None], mask=m_ok[:, None] & co_ok[None, :],
                     other=0.0)  # fmt: skip
        acc = _mma(tl.trans(cols.to(go.dtype)), go, acc, PRECISION, UPCAST)
    rows = ((split.to(tl.int64) * (C // cw) + gw) * KK + k) * cw + (offs_c - gw * cw)
    tl.store(part_ptr + rows[:, None] * cout_g + offs_co[None, :], acc,
             mask=c_ok[:, None] & co_ok[None, :])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Host side.

#: True when the kernels above are Triton's interpreter functions (``TRITON_INTERPRET=1`` was set
#: when this module was imported): only then can they run on CPU tensors.
INTERPRETED = not isinstance(_forward_kernel, triton.runtime.jit.JITFunction)


def _pow2(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(value), 1))))


def _config(geo: "_Geometry") -> dict:
    """Block sizes (powers of two >= 16: ``tl.dot``'s minimum) from the channel counts only.

    Under the interpreter: the smallest channel blocks a dot takes and 64 positions (its cost is
    per program and per operation, whatever the block size).
    """
    if INTERPRETED:
        return dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16)
    half = geo.dtype in (torch.float16, torch.bfloat16)
    return dict(BLOCK_M=64, BLOCK_N=_pow2(geo.cout_g, 16, 64),
                BLOCK_K=_pow2(geo.longest_run, 16, 64 if half else 32),
                num_warps=4, num_stages=2)  # fmt: skip


def _dot_options(dtype: torch.dtype) -> dict:
    """float32 exactly ("ieee") unless PyTorch's matmuls may use TF32 (NVIDIA only); float16 and
    bfloat16 operands natively (bfloat16 upcast under the interpreter only, see ``_mma``)."""
    nvidia = torch.version.hip is None
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and nvidia
    return dict(PRECISION="tf32" if tf32 else "ieee",
                UPCAST=INTERPRETED and dtype == torch.bfloat16)  # fmt: skip


def _launch_device(tensor: torch.Tensor):
    """Launch on the tensor's device (and so on its current stream)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _parallelism(device: torch.device) -> int:
    """Programs that keep the device busy (the weight gradient splits its positions to reach it)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


class _Geometry:
    """Sizes of one call, shared by the forward and the backward."""

    def __init__(self, input, offset, weight, stride, padding, dilation):
        self.batch, self.channels, self.height, self.width = input.shape
        self.out_channels, self.cw, self.kh, self.kw = weight.shape
        self.out_h, self.out_w = offset.shape[-2:]
        self.taps = self.kh * self.kw
        self.weight_groups = self.channels // self.cw
        self.cout_g = self.out_channels // self.weight_groups
        self.offset_groups = offset.shape[1] // (2 * self.taps)
        self.cg = self.channels // self.offset_groups
        self.positions = self.out_h * self.out_w
        self.M = self.batch * self.positions
        self.dtype = input.dtype
        self.runs = _runs(self.channels, self.offset_groups, self.cw)
        self.longest_run = max(hi - lo for lo, hi, _, _ in self.runs)
        self.scalars = (self.positions, self.height, self.width, self.out_w, self.channels,
                        self.out_channels, self.cw, self.cout_g, self.cg, self.offset_groups,
                        *stride, *padding, *dilation)  # fmt: skip


def _runs(channels: int, offset_groups: int, cw: int) -> list[tuple[int, int, int, int]]:
    """(first channel, end, offset group, weight group) of every run, in channel order."""
    cg = channels // offset_groups
    bounds = sorted(set(range(0, channels, cg)) | set(range(0, channels, cw)) | {channels})
    return [(lo, hi, lo // cg, lo // cw) for lo, hi in zip(bounds, bounds[1:])]


@functools.lru_cache(maxsize=64)
def _runs_table(runs: tuple, device: torch.device) -> torch.Tensor:
    """The runs as an int32 [R, 4] tensor on ``device`` (copied there once per layer shape)."""
    return torch.tensor(runs, dtype=torch.int32).to(device)


def _channels_last(input: torch.Tensor) -> torch.Tensor:
    """[N, H, W, C] contiguous (free when ``input`` is channels-last already)."""
    return input.detach().permute(0, 2, 3, 1).contiguous()


def forward(input, offset, weight, bias, stride, padding, dilation, mask):
    geo = _Geometry(input, offset, weight, stride, padding, dilation)
    out = torch.empty((geo.batch, geo.out_channels, geo.out_h, geo.out_w), dtype=input.dtype,
                      device=input.device)  # fmt: skip
    if out.numel() == 0:
        return out
    cfg = _config(geo)
    x = _channels_last(input)
    off = offset.detach().contiguous()
    msk = mask.detach().contiguous() if mask is not None else off
    # [wg, K, cw, cout_g]: a [channels, output channels] tile per tap is contiguous along Cout
    w = weight.detach().reshape(geo.weight_groups, geo.cout_g, geo.cw, geo.taps).permute(0, 3, 2, 1)
    w = w.contiguous()
    b = bias.detach().contiguous() if bias is not None else w
    co_blocks = triton.cdiv(geo.cout_g, cfg["BLOCK_N"])
    grid = (triton.cdiv(geo.M, cfg["BLOCK_M"]), geo.weight_groups * co_blocks)
    with _launch_device(input):
        _forward_kernel[grid](x, off, msk, w, b, out, geo.M, *geo.scalars,
                              KH=geo.kh, KW=geo.kw, HAS_MASK=mask is not None,
                              HAS_BIAS=bias is not None, **_dot_options(input.dtype),
                              **cfg)  # fmt: skip
    return out


def backward(grad_out, input, offset, weight, stride, padding, dilation, mask, need):
    """Gradients (input, offset, weight, mask) for the flags in ``need``; None where not needed."""
    need_input, need_offset, need_weight, need_mask = need
    need_mask = need_mask and mask is not None
    geo = _Geometry(input, offset, weight, stride, padding, dilation)
    grad_input = grad_offset = grad_weight = grad_mask = None
    x = _channels_last(input)
    off = offset.detach().contiguous()
    msk = mask.detach().contiguous() if mask is not None else off
    gout = grad_out.detach().contiguous()
    with _launch_device(input):
        if need_weight:
            grad_weight = _grad_weight(geo, x, off, msk, gout, mask is not None)
        if need_input or need_offset or need_mask:
            grad_x = None
            if need_input:  # float32 whatever the dtype: the scatter adds into it
                grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            if need_offset:
                grad_offset = torch.empty(offset.shape, dtype=offset.dtype, device=offset.device)
            if need_mask:
                grad_mask = torch.empty(mask.shape, dtype=mask.dtype, device=mask.device)
            if geo.M > 0:
                _grad_samples(geo, x, off, msk, weight, gout, grad_x, grad_offset, grad_mask,
                              mask is not None)  # fmt: skip
            if need_input:
                grad_input = grad_x.permute(0, 3, 1, 2).to(input.dtype)
                if input.is_contiguous():
                    grad_input = grad_input.contiguous()
    return grad_input, grad_offset, grad_weight, grad_mask


def _grad_samples(geo, x, off, msk, weight, gout, grad_x, grad_offset, grad_mask, has_mask):
    """Offset, mask and input gradients: atomics, or the deterministic slabs."""
    cfg = _config(geo)
    deterministic = grad_x is not None and torch.are_deterministic_algorithms_enabled()
    # [wg, K, cout_g, cw]: a [output channels, channels] tile per tap is contiguous along C
    w = weight.detach().reshape(geo.weight_groups, geo.cout_g, geo.cw, geo.taps).permute(0, 3, 1, 2)
    w = w.contiguous()
    flags = dict(KH=geo.kh, KW=geo.kw, HAS_MASK=has_mask, NEED_OFFSET=grad_offset is not None,
                 NEED_MASK=grad_mask is not None, NEED_INPUT=grad_x is not None,
                 DETERMINISTIC=deterministic, **_dot_options(geo.dtype), **cfg)  # fmt: skip
    dummy = off
    outputs = [t if t is not None else dummy for t in (grad_x, grad_offset, grad_mask)]
    if not deterministic:
        grid = (triton.cdiv(geo.M, cfg["BLOCK_M"]), geo.offset_groups * geo.taps)
        _grad_sample_kernel[grid](x, off, msk, w, gout, *outputs, dummy, dummy, dummy, 0, geo.M, 0,
                                  *geo.scalars, **flags)  # fmt: skip
        return
    # Deterministic: slabs of positions whose buffers fit DETERMINISTIC_TILE_BYTES.
    entries_per_position = geo.offset_groups * geo.taps * 4
    # dL/dsample (4 bytes per channel and tap), then per corner its key, weight, sorted key,
    # order and segment (8 + 4 + 8 + 8 + 24 bytes)
    bytes_per_position = geo.taps * (4 * geo.channels + 52 * 4 * geo.offset_groups)
    slab = max(1, DETERMINISTIC_TILE_BYTES // bytes_per_position) // cfg["BLOCK_M"] * cfg["BLOCK_M"]
    slab = max(slab, cfg["BLOCK_M"])
    slab = min(slab, triton.cdiv(geo.M, cfg["BLOCK_M"]) * cfg["BLOCK_M"])
    dev = x.device
    gs = torch.empty(slab * geo.offset_groups * geo.taps * geo.cg, dtype=torch.float32, device=dev)
    keys = torch.empty(slab * entries_per_position, dtype=torch.int64, device=dev)
    weights = torch.empty(slab * entries_per_position, dtype=torch.float32, device=dev)
    nowhere = geo.batch * geo.height * geo.width * geo.offset_groups
    block_c = _pow2(geo.cg, 16, 64)
    for m_start in range(0, geo.M, slab):
        m_end = min(m_start + slab, geo.M)
        grid = (triton.cdiv(m_end - m_start, cfg["BLOCK_M"]), geo.offset_groups * geo.taps)
        _grad_sample_kernel[grid](x, off, msk, w, gout, *outputs, gs, keys, weights, m_start,
                                  m_end, nowhere, *geo.scalars, **flags)  # fmt: skip
        used = (m_end - m_start) * entries_per_position
        sorted_keys, order = torch.sort(keys[:used], stable=True)
        seg_keys, seg_counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        seg_starts = torch.cumsum(seg_counts, 0) - seg_counts
        segments = seg_keys.numel() - int(seg_keys[-1].item() == nowhere)
        if segments == 0:
            continue
        grid = (segments, triton.cdiv(geo.cg, block_c))
        _scatter_reduce_kernel[grid](grad_x, gs, weights, order, seg_keys, seg_starts, seg_counts,
                                     geo.channels, geo.cg, geo.offset_groups,
                                     BLOCK_E=16, BLOCK_C=block_c)  # fmt: skip


def _grad_weight(geo, x, off, msk, gout, has_mask):
    """dL/dW [Cout, cw, kh, kw]: per-split partial sums (no atomics), added by torch.sum."""
    cfg = _config(geo)
    wg, K = geo.weight_groups, geo.taps
    shape = (wg, K, geo.cw, geo.cout_g)
    if geo.M == 0 or geo.out_channels == 0:
        part = torch.zeros((1, *shape), dtype=torch.float32, device=x.device)
    else:
        runs = _runs_table(tuple(geo.runs), x.device)
        chunks_per_run = triton.cdiv(geo.longest_run, cfg["BLOCK_K"])
        programs = len(geo.runs) * chunks_per_run * K * triton.cdiv(geo.cout_g, cfg["BLOCK_N"])
        splits = min(triton.cdiv(geo.M, SPLIT_ALIGN),
                     max(1, triton.cdiv(_parallelism(x.device), programs)),
                     max(1, WEIGHT_PARTIAL_BYTES // (4 * math.prod(shape))))  # fmt: skip
        per_split = triton.cdiv(triton.cdiv(geo.M, splits), SPLIT_ALIGN) * SPLIT_ALIGN
        splits = triton.cdiv(geo.M, per_split)
        part = torch.empty((splits, *shape), dtype=torch.float32, device=x.device)
        grid = (splits, len(geo.runs) * chunks_per_run, K * triton.cdiv(geo.cout_g, cfg["BLOCK_N"]))
        _grad_weight_kernel[grid](x, off, msk, gout, runs, part, geo.M, per_split, chunks_per_run,
                                  *geo.scalars, KH=geo.kh, KW=geo.kw, HAS_MASK=has_mask,
                                  **_dot_options(geo.dtype), **cfg)  # fmt: skip
    total = part[0] if part.shape[0] == 1 else part.sum(0)
    grad = total.permute(0, 3, 2, 1).reshape(geo.out_channels, geo.cw, geo.kh, geo.kw)
    return grad.to(geo.dtype).contiguous()
