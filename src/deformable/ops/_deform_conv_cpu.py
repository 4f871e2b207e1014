"""Fast CPU kernels of deform_conv2d: channels-last bilinear sampling (numba) + oneDNN / BLAS GEMMs.

Forward: the deformed samples of a tile of output positions are written as an "expanded image"
``E[n, ho * kh + i, wo * kw + j, c]`` (channels last), and ``F.conv2d(E, weight, stride=kernel)``
is exactly the GEMM of the deformable convolution, at the speed of a regular convolution.

Backward: per tile, the samples are written again as a column matrix ``cols[P, wg, kh*kw*cw]``
(P output positions, wg weight groups of cw channels) and two GEMMs give ``dL/dcols`` and
``dL/dW`` (oneDNN's backward of the expanded-image convolution is far slower than these on large
maps). Two passes then turn ``dL/dcols`` into the gradients of offset / mask and of the input:
the first splits output positions between threads (each writes the offset / mask gradients of
its own positions, and records every tap's corner and bilinear weights); the second splits the
input's rows between threads, each walking all taps in order and adding only into its own rows.
No atomics, no races, no per-thread copies of the input gradient, and every element receives its
contributions in one fixed order: bit-identical results whatever the number of threads.

Tiles are bounded in bytes (``TILE_BYTES``) whatever the image and batch size. Sampling
coordinates and the four bilinear weights depend on (n, group, tap, position) only: they are
computed once there and reused for every channel of the group.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from deformable.ops._parallel import num_chunks, run_chunked

#: Upper bound of one tile of samples, in bytes. The backward holds two (cols and dL/dcols).
TILE_BYTES = 32 * 2**20

# Reassociation lets LLVM vectorise the channel reductions; no 'nnan'/'ninf', so the
# out-of-image tests below still see NaN coordinates as outside.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

_workspace = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat scratch tensor kept per thread between calls (at most one tile each).

    Freshly allocated tile buffers cost page faults on every call, and the kernel serialises
    faults from several threads: reusing them is worth several milliseconds per call.
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


# Indices into the int64 'geo' array handed to the kernels.
_BATCH, _H, _W, _C, _OH, _OW, _G, _KH, _KW, _SH, _SW, _PH, _PW, _DH, _DW, _CW = range(16)


# Runs: the channels of an offset group split where weight groups begin. ``runs`` holds G + 1
# indices into the run list (group g owns runs[g]:runs[g+1]), then from position _RUNS = 64 on,
# three numbers per run: first channel c, channel count, weight group gw.
_RUNS = 64


def _channel_runs(channels: int, offset_groups: int, cw: int) -> np.ndarray:
    if offset_groups + 1 > _RUNS:
        raise ValueError(f"deform_conv2d supports at most {_RUNS - 1} offset groups, got {offset_groups}")
    cpg = channels // offset_groups
    starts, triples = [0], []
    for g in range(offset_groups):
        c = g * cpg
        while c < (g + 1) * cpg:
            gw = c // cw
            count = min((g + 1) * cpg, (gw + 1) * cw) - c
            triples += [c, count, gw]
            c += count
        starts.append(len(triples) // 3)
    starts += [0] * (_RUNS - len(starts))
    return np.array(starts + triples, dtype=np.int64)


@njit(nogil=True, cache=True)
def _run_destinations(runs, s_g, cw):
    """Offset of each run in a tap's block of samples: gw * s_g + c - gw * cw."""
    count = (runs.size - _RUNS) // 3
    dest = np.empty(count, dtype=np.int64)
    for r in range(count):
        c, gw = runs[_RUNS + 3 * r], runs[_RUNS + 3 * r + 2]
        dest[r] = gw * s_g + c - gw * cw
    return dest


# The small helpers below are repeated in _deform_roi_pool_cpu on purpose: numba's on-disk cache
# does not notice changes to njit functions imported from another module.
# Channel loops index with unsigned integers: numba's wraparound handling of signed indices
# keeps LLVM from vectorising them.


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _blend4(out, o, inp, a, row, col, w00, w01, w10, w11, count):
    """out[o:o+count] = w00 * inp[a] + w01 * inp[a+col] + w10 * inp[a+row] + w11 * inp[a+row+col]."""
    a00 = np.uint64(a)
    a01 = np.uint64(a + col)
    a10 = np.uint64(a + row)
    a11 = np.uint64(a + row + col)
    ou = np.uint64(o)
    for c in range(np.uint64(count)):
        out[ou + c] = (w00 * inp[a00 + c] + w01 * inp[a01 + c]
                       + w10 * inp[a10 + c] + w11 * inp[a11 + c])  # fmt: skip


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _axpy(dst, d, w, src, s, count):
    """dst[d:d+count] += w * src[s:s+count]."""
    du = np.uint64(d)
    su = np.uint64(s)
    for c in range(np.uint64(count)):
        dst[du + c] += w * src[su + c]


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _fill(dst, d, count):
    du = np.uint64(d)
    for c in range(np.uint64(count)):
        dst[du + c] = 0.0


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _sample(inp, off, msk, has_mask, geo, runs, tile, lay, out, chunk, chunks):
    """Write mask * bilinear(input, p0 + p_k + offset) for one tile into ``out``.

    Flat arrays: inp [N, H, W, C], off [N, 2*G*K, Ho, Wo], msk [N, G*K, Ho, Wo]. ``tile`` is
    (n0, r0, c0, nb, rb, wb); the sample of channel c (weight group gw = c // cw) at tap (i, j) of
    tile position (nl, rl, wl) goes to
    ``out[(nl*rb + rl)*s_row + wl*s_wl + i*s_i + j*s_j + gw*s_g + c % cw]``, ``lay`` holding
    (s_row, s_wl, s_i, s_j, s_g). ``runs`` lists the channel runs (see ``_channel_runs``).
    """
    height, width, channels = geo[_H], geo[_W], geo[_C]
    out_w, groups, kh, kw = geo[_OW], geo[_G], geo[_KH], geo[_KW]
    sh, sw, ph, pw, dh, dw = geo[_SH], geo[_SW], geo[_PH], geo[_PW], geo[_DH], geo[_DW]
    plane = geo[_OH] * out_w
    taps = kh * kw
    n0, r0, c0, nb, rb, wb = tile[0], tile[1], tile[2], tile[3], tile[4], tile[5]
    s_row, s_wl, s_i, s_j = lay[0], lay[1], lay[2], lay[3]
    dest = _run_destinations(runs, lay[4], geo[_CW])
    row_stride = width * channels
    cast = out.dtype.type
    items = nb * rb
    for item in range(items * chunk // chunks, items * (chunk + 1) // chunks):
        nl = item // rb
        n = n0 + nl
        ho = r0 + item - nl * rb
        image = n * height * row_stride
        for wl in range(wb):
            wo = c0 + wl
            pos = ho * out_w + wo
            for i in range(kh):
                y_base = ho * sh - ph + i * dh
                for j in range(kw):
                    x_base = wo * sw - pw + j * dw
                    k = i * kw + j
                    base = item * s_row + wl * s_wl + i * s_i + j * s_j
                    for g in range(groups):
                        gk = (n * groups + g) * taps + k
                        y = y_base + off[2 * gk * plane + pos]
                        x = x_base + off[(2 * gk + 1) * plane + pos]
                        m = msk[gk * plane + pos] if has_mask else 1.0
                        if not (y > -1.0 and y < height and x > -1.0 and x < width):
                            for r in range(runs[g], runs[g + 1]):
                                _fill(out, base + dest[r], runs[_RUNS + 3 * r + 1])
                            continue
                        y0 = int(math.floor(y))
                        x0 = int(math.floor(x))
                        ly = y - y0
                        lx = x - x0
                        w00 = cast((1.0 - ly) * (1.0 - lx) * m)
                        w01 = cast((1.0 - ly) * lx * m)
                        w10 = cast(ly * (1.0 - lx) * m)
                        w11 = cast(ly * lx * m)
                        corner = image + (y0 * width + x0) * channels
                        if y0 >= 0 and x0 >= 0 and y0 + 1 < height and x0 + 1 < width:
                            for r in range(runs[g], runs[g + 1]):
                                _blend4(out, base + dest[r], inp, corner + runs[_RUNS + 3 * r],
                                        row_stride, channels, w00, w01, w10, w11,
                                        runs[_RUNS + 3 * r + 1])  # fmt: skip
                            continue
                        # a corner outside the image counts as zero
                        for r in range(runs[g], runs[g + 1]):
                            o = base + dest[r]
                            a = corner + runs[_RUNS + 3 * r]
                            count = runs[_RUNS + 3 * r + 1]
                            _fill(out, o, count)
                            if y0 >= 0 and x0 >= 0:
                                _axpy(out, o, w00, inp, a, count)
                            if y0 >= 0 and x0 + 1 < width:
                                _axpy(out, o, w01, inp, a + channels, count)
                            if y0 + 1 < height and x0 >= 0:
                                _axpy(out, o, w10, inp, a + row_stride, count)
                            if y0 + 1 < height and x0 + 1 < width:
                                _axpy(out, o, w11, inp, a + row_stride + channels, count)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_offset(inp, off, msk, has_mask, geo, runs, tile, lay, grad_cols, grad_off, grad_msk,
                     tap_corner, tap_weight, item_rows, chunk, chunks):  # fmt: skip
    """Phase 1 of the backward of ``_sample``, over this chunk's tile positions.

    ``grad_cols`` is dL/d(out of ``_sample``), same layout. Writes dL/doffset and dL/dmask of the
    chunk's positions into ``grad_off`` / ``grad_msk`` (flat, the layouts of off / msk), and for
    every tap t = ((item * wb + wl) * K + k) * G + g records its top-left corner (y0, x0) in
    ``tap_corner[2t:2t+2]`` (y0 = -2 when nothing is sampled) and its four bilinear weights times
    the mask, zero for corners outside the image, in ``tap_weight[4t:4t+4]``; and the range of
    y0 over the taps of each tile row ``item`` in ``item_rows[2 * item : 2 * item + 2]``.
    """
    height, width, channels = geo[_H], geo[_W], geo[_C]
    out_w, groups, kh, kw = geo[_OW], geo[_G], geo[_KH], geo[_KW]
    sh, sw, ph, pw, dh, dw = geo[_SH], geo[_SW], geo[_PH], geo[_PW], geo[_DH], geo[_DW]
    plane = geo[_OH] * out_w
    taps = kh * kw
    n0, r0, c0, nb, rb, wb = tile[0], tile[1], tile[2], tile[3], tile[4], tile[5]
    s_row, s_wl, s_i, s_j = lay[0], lay[1], lay[2], lay[3]
    dest = _run_destinations(runs, lay[4], geo[_CW])
    row_stride = width * channels
    cast = grad_cols.dtype.type
    items = nb * rb
    for item in range(items * chunk // chunks, items * (chunk + 1) // chunks):
        nl = item // rb
        n = n0 + nl
        ho = r0 + item - nl * rb
        image = n * height * row_stride
        lowest = height
        highest = -2
        for wl in range(wb):
            wo = c0 + wl
            pos = ho * out_w + wo
            for i in range(kh):
                y_base = ho * sh - ph + i * dh
                for j in range(kw):
                    x_base = wo * sw - pw + j * dw
                    k = i * kw + j
                    base = item * s_row + wl * s_wl + i * s_i + j * s_j
                    for g in range(groups):
                        t = ((item * wb + wl) * taps + k) * groups + g
                        gk = (n * groups + g) * taps + k
                        y = y_base + off[2 * gk * plane + pos]
                        x = x_base + off[(2 * gk + 1) * plane + pos]
                        m = msk[gk * plane + pos] if has_mask else 1.0
                        # y == -1 exactly samples zero, but its one-sided derivative is not
                        # (torchvision's convention): keep it, as the reference does.
                        if not (y >= -1.0 and y < height and x >= -1.0 and x < width):
                            tap_corner[2 * t] = -2
                            grad_off[2 * gk * plane + pos] = 0.0
                            grad_off[(2 * gk + 1) * plane + pos] = 0.0
                            grad_msk[gk * plane + pos] = 0.0
                            continue
                        y0 = int(math.floor(y))
                        x0 = int(math.floor(x))
                        ly = cast(y - y0)
                        lx = cast(x - x0)
                        hy = cast(1.0 - (y - y0))
                        ok00 = y0 >= 0 and x0 >= 0
                        ok01 = y0 >= 0 and x0 + 1 < width
                        ok10 = y0 + 1 < height and x0 >= 0
                        ok11 = y0 + 1 < height and x0 + 1 < width
                        tap_corner[2 * t] = y0
                        tap_corner[2 * t + 1] = x0
                        lowest = min(lowest, y0)
                        highest = max(highest, y0)
                        tap_weight[4 * t] = (1.0 - (y - y0)) * (1.0 - (x - x0)) * m if ok00 else 0.0
                        tap_weight[4 * t + 1] = (1.0 - (y - y0)) * (x - x0) * m if ok01 else 0.0
                        tap_weight[4 * t + 2] = (y - y0) * (1.0 - (x - x0)) * m if ok10 else 0.0
                        tap_weight[4 * t + 3] = (y - y0) * (x - x0) * m if ok11 else 0.0
                        zero = cast(0.0)
                        acc_y = zero
                        acc_x = zero
                        acc_m = zero
                        corner = image + (y0 * width + x0) * channels
                        for r in range(runs[g], runs[g + 1]):
                            src = np.uint64(base + dest[r])
                            a = corner + runs[_RUNS + 3 * r]
                            count = runs[_RUNS + 3 * r + 1]
                            if ok00 and ok11:  # interior: all four corners inside
                                a00 = np.uint64(a)
                                a01 = np.uint64(a + channels)
                                a10 = np.uint64(a + row_stride)
                                a11 = np.uint64(a + row_stride + channels)
                                for cc in range(np.uint64(count)):
                                    ge = grad_cols[src + cc]
                                    va = inp[a00 + cc]
                                    vb = inp[a01 + cc]
                                    vc = inp[a10 + cc]
                                    vd = inp[a11 + cc]
                                    top = va + lx * (vb - va)
                                    bottom = vc + lx * (vd - vc)
                                    acc_m += ge * (top + ly * (bottom - top))
                                    acc_y += ge * (bottom - top)
                                    acc_x += ge * (hy * (vb - va) + ly * (vd - vc))
                                continue
                            for cc in range(count):
                                ge = grad_cols[src + np.uint64(cc)]
                                va = inp[a + cc] if ok00 else zero
                                vb = inp[a + channels + cc] if ok01 else zero
                                vc = inp[a + row_stride + cc] if ok10 else zero
                                vd = inp[a + row_stride + channels + cc] if ok11 else zero
                                top = va + lx * (vb - va)
                                bottom = vc + lx * (vd - vc)
                                acc_m += ge * (top + ly * (bottom - top))
                                acc_y += ge * (bottom - top)
                                acc_x += ge * (hy * (vb - va) + ly * (vd - vc))
                        grad_off[2 * gk * plane + pos] = acc_y * m
                        grad_off[(2 * gk + 1) * plane + pos] = acc_x * m
                        grad_msk[gk * plane + pos] = acc_m
        item_rows[2 * item] = lowest
        item_rows[2 * item + 1] = highest


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_input(geo, runs, tile, lay, grad_cols, tap_corner, tap_weight, item_rows, grad_inp,
                    chunk, chunks):  # fmt: skip
    """Phase 2: scatter dL/d(samples) into the input gradient (flat [N, H, W, C]).

    The chunk owns a band of input rows of the tile's images and walks every tap in order,
    adding only into its own rows: no two threads write one element, and each element receives
    its contributions in tap order whatever the number of threads (bit-identical results).
    """
    height, width, channels = geo[_H], geo[_W], geo[_C]
    groups, kh, kw = geo[_G], geo[_KH], geo[_KW]
    taps = kh * kw
    n0, nb, rb, wb = tile[0], tile[3], tile[4], tile[5]
    s_row, s_wl, s_i, s_j = lay[0], lay[1], lay[2], lay[3]
    dest = _run_destinations(runs, lay[4], geo[_CW])
    rows = nb * height  # rows of the tile's images, numbered (nl * H + y)
    lo = rows * chunk // chunks
    hi = rows * (chunk + 1) // chunks
    if hi <= lo:
        return
    for item in range(nb * rb):
        nl = item // rb
        first = nl * height  # this image's row 0 in the numbering above
        if first + item_rows[2 * item + 1] + 1 < lo or first + item_rows[2 * item] >= hi:
            continue  # no tap of this tile row touches the band
        image = (n0 + nl) * height * width * channels
        for wl in range(wb):
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    base = item * s_row + wl * s_wl + i * s_i + j * s_j
                    for g in range(groups):
                        t = ((item * wb + wl) * taps + k) * groups + g
                        y0 = tap_corner[2 * t]
                        if y0 < -1 or first + y0 + 1 < lo or first + y0 >= hi:
                            continue
                        x0 = tap_corner[2 * t + 1]
                        for dy in range(2):
                            if first + y0 + dy < lo or first + y0 + dy >= hi:
                                continue
                            for dx in range(2):
                                w = tap_weight[4 * t + 2 * dy + dx]
                                if w == 0.0:  # also every corner outside the image
                                    continue
                                corner = image + ((y0 + dy) * width + x0 + dx) * channels
                                for r in range(runs[g], runs[g + 1]):
                                    _axpy(grad_inp, corner + runs[_RUNS + 3 * r], w, grad_cols,
                                          base + dest[r], runs[_RUNS + 3 * r + 1])  # fmt: skip


def _tiles(batch, out_h, out_w, bytes_per_position, budget):
    """Split (batch, rows, columns) of the output into tiles of at most ``budget`` bytes.

    Tiles are as even as the budget allows (a 50-row map in two tiles is 25 + 25, not 43 + 7):
    the GEMM runs best on tiles of one size.
    """
    row_bytes = out_w * bytes_per_position
    image_bytes = out_h * row_bytes
    if image_bytes <= budget:
        per_tile = max(1, budget // max(image_bytes, 1))
        per_tile = -(-batch // -(-batch // per_tile)) if batch else 1  # even split
        for n0 in range(0, batch, per_tile):
            yield n0, 0, 0, min(per_tile, batch - n0), out_h, out_w
    elif row_bytes <= budget:
        rows = budget // row_bytes
        rows = -(-out_h // -(-out_h // rows))
        for n0 in range(batch):
            for r0 in range(0, out_h, rows):
                yield n0, r0, 0, 1, min(rows, out_h - r0), out_w
    else:
        cols = max(1, budget // bytes_per_position)
        cols = -(-out_w // -(-out_w // cols))
        for n0 in range(batch):
            for r0 in range(out_h):
                for c0 in range(0, out_w, cols):
                    yield n0, r0, c0, 1, 1, min(cols, out_w - c0)


class _Problem:
    """Shapes and flat numpy views shared by the forward and backward of one call."""

    def __init__(self, input, offset, weight, stride, padding, dilation, mask):
        batch, channels, height, width = input.shape
        self.out_channels, self.cw, self.kh, self.kw = weight.shape
        self.out_h, self.out_w = offset.shape[-2:]
        self.taps = self.kh * self.kw
        self.channels = channels
        self.weight_groups = channels // self.cw
        self.dtype = input.dtype
        groups = offset.shape[1] // (2 * self.taps)
        self.offset_groups = groups
        self.runs = _channel_runs(channels, groups, self.cw)
        self.geo = np.array([batch, height, width, channels, self.out_h, self.out_w, groups,
                             self.kh, self.kw, *stride, *padding, *dilation, self.cw],
                            dtype=np.int64)  # fmt: skip
        # channels-last copy of the input (free when the caller's input already is channels last)
        self.inp_cl = input.detach().permute(0, 2, 3, 1).contiguous()
        off = offset.detach().contiguous().numpy().reshape(-1)
        msk = mask.detach().contiguous().numpy().reshape(-1) if mask is not None else off
        self.sources = (self.inp_cl.numpy().reshape(-1), off, msk, mask is not None)
        self.tiles = list(_tiles(batch, self.out_h, self.out_w,
                                 self.taps * channels * input.element_size(), TILE_BYTES))  # fmt: skip

    def sample(self, tile, shape, layout):
        """Samples of one tile into a reused buffer of ``shape``, laid out as ``layout``."""
        numel = math.prod(shape)
        out = _scratch("samples", numel, self.dtype)
        run_chunked(_sample, num_chunks(tile[3] * tile[4], numel), *self.sources, self.geo, self.runs,
                    np.array(tile, dtype=np.int64), layout, out.numpy())  # fmt: skip
        return out.view(shape)

    def expanded_image(self, tile):
        """The tile as an NCHW view (channels-last memory) of E[nb, rb*kh, wb*kw, C]."""
        _, _, _, nb, rb, wb = tile
        c, kw = self.channels, self.kw
        layout = np.array([self.kh * wb * kw * c, kw * c, wb * kw * c, c, self.cw], np.int64)
        return self.sample(tile, (nb, rb * self.kh, wb * kw, c), layout).permute(0, 3, 1, 2)

    def column_layout(self, tile):
        """Layout of cols[P, wg, kh*kw*cw], P = the tile's positions (n, row, column)."""
        wb = tile[5]
        k, c, cw = self.taps, self.channels, self.cw
        return np.array([wb * k * c, k * c, self.kw * cw, cw, k * cw], np.int64)

    def columns(self, tile):
        nb, rb, wb = tile[3:]
        shape = (nb * rb * wb, self.weight_groups, self.taps * self.cw)
        return self.sample(tile, shape, self.column_layout(tile))


def forward(input, offset, weight, bias, stride, padding, dilation, mask):
    p = _Problem(input, offset, weight, stride, padding, dilation, mask)
    out = torch.empty((input.shape[0], p.out_channels, p.out_h, p.out_w), dtype=input.dtype)
    w = weight.detach()
    b = bias.detach() if bias is not None else None
    for tile in p.tiles:
        n0, r0, c0, nb, rb, wb = tile
        res = F.conv2d(p.expanded_image(tile), w, b, stride=(p.kh, p.kw), groups=p.weight_groups)
        out[n0 : n0 + nb, :, r0 : r0 + rb, c0 : c0 + wb] = res
    return out


def backward(grad_out, input, offset, weight, stride, padding, dilation, mask, need):
    """Gradients (input, offset, weight, mask) for the flags in ``need``; None where not needed."""
    need_input, need_offset, need_weight, need_mask = need
    need_cols = need_input or need_offset or need_mask
    p = _Problem(input, offset, weight, stride, padding, dilation, mask)
    wg, cog = p.weight_groups, p.out_channels // p.weight_groups
    # weight as [wg, Cout/wg, kh*kw*cw], matching the column layout
    w_mat = weight.detach().permute(0, 2, 3, 1).reshape(wg, cog, p.taps * p.cw)
    grad_w_mat = torch.zeros_like(w_mat) if need_weight else None
    grad_inp = torch.zeros(p.inp_cl.shape, dtype=p.dtype) if need_input else None
    grad_offset = torch.empty(offset.shape, dtype=p.dtype)
    # without a mask its gradient is computed into a scratch buffer and dropped
    grad_mask = torch.empty(offset[:, : offset.shape[1] // 2].shape, dtype=p.dtype)
    grad_out = grad_out.detach()
    for tile in p.tiles:
        n0, r0, c0, nb, rb, wb = tile
        positions = nb * rb * wb
        # [P, Cout] in the column order (n, row, column)
        g = grad_out[n0 : n0 + nb, :, r0 : r0 + rb, c0 : c0 + wb].permute(0, 2, 3, 1)
        g = g.reshape(positions, p.out_channels)
        if need_weight:
            cols = p.columns(tile)
            for gw in range(wg):
                grad_w_mat[gw].addmm_(g[:, gw * cog : (gw + 1) * cog].t(), cols[:, gw])
        if not need_cols:
            continue
        shape = (positions, wg, p.taps * p.cw)
        gc = _scratch("grad_samples", math.prod(shape), p.dtype).view(shape)
        if wg == 1:
            torch.mm(g, w_mat[0], out=gc[:, 0])
        else:
            for gw in range(wg):
                gc[:, gw] = g[:, gw * cog : (gw + 1) * cog] @ w_mat[gw]
        tile_np, layout, gc_np = np.array(tile, dtype=np.int64), p.column_layout(tile), gc.numpy().reshape(-1)
        tap_count = positions * p.taps * p.offset_groups
        tap_corner = np.empty(2 * tap_count, dtype=np.int64)
        tap_weight = np.empty(4 * tap_count, dtype=gc_np.dtype)
        item_rows = np.empty(2 * nb * rb, dtype=np.int64)
        run_chunked(_backward_offset, num_chunks(nb * rb, gc.numel()), *p.sources, p.geo, p.runs, tile_np, layout,
                    gc_np, grad_offset.numpy().reshape(-1), grad_mask.numpy().reshape(-1),
                    tap_corner, tap_weight, item_rows)  # fmt: skip
        if need_input:
            run_chunked(_backward_input, num_chunks(nb * p.geo[1], gc.numel()), p.geo, p.runs, tile_np, layout,
                        gc_np, tap_corner, tap_weight, item_rows,
                        grad_inp.numpy().reshape(-1))  # fmt: skip
    grad_input = grad_inp.permute(0, 3, 1, 2).contiguous() if need_input else None
    grad_weight = None
    if need_weight:
        grad_weight = grad_w_mat.reshape(p.out_channels, p.kh, p.kw, p.cw).permute(0, 3, 1, 2)
        grad_weight = grad_weight.contiguous()
    return (grad_input, grad_offset if need_offset else None, grad_weight,
            grad_mask if need_mask and mask is not None else None)  # fmt: skip
