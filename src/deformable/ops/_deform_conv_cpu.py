"""Fast CPU kernels of deform_conv2d: channels-last bilinear sampling (numba) + oneDNN convolution.

The forward writes the deformed samples of a tile of output positions as an "expanded image"
``E[n, ho * kh + i, wo * kw + j, c]`` (channels last) and runs ``F.conv2d`` on it with
stride = kernel size: that is exactly the GEMM of the deformable convolution, at the speed of a
regular convolution. Tiles are bounded in bytes (``TILE_BYTES``) whatever the image and batch size.

The backward recomputes ``E`` per tile, gets ``dL/dE`` and ``dL/dW`` from oneDNN's convolution
backward, then one fused pass per tile turns ``dL/dE`` into the gradients of input, offset and
mask. That pass splits the channels between threads: each thread owns its channel slice of the
input gradient (no write races, no atomics) and sums offset/mask partials over its channels;
the partials are added in chunk order. Everything is deterministic.

Sampling coordinates and the four bilinear weights depend on (n, group, tap, position) only:
they are computed once there and reused for every channel of the group.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from deformable.ops._parallel import num_chunks, run_chunked

#: Upper bound of one expanded-image tile, in bytes. The backward holds two of them (E, dL/dE).
TILE_BYTES = 32 * 2**20

# Reassociation lets LLVM vectorise the channel reductions; no 'nnan'/'ninf', so the
# out-of-image tests below still see NaN coordinates as outside.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _sample_tile(inp, off, msk, has_mask, out, n0, r0, c0, nb, rb, wb,
                 groups, kh, kw, sh, sw, ph, pw, dh, dw, chunk, chunks):  # fmt: skip
    """out[nl, rl*kh+i, wl*kw+j, c] = mask * bilinear(inp[n0+nl, :, :, c], p0 + p_k + offset)."""
    _, height, width, channels = inp.shape
    cpg = channels // groups
    taps = kh * kw
    wts = np.empty(4, dtype=out.dtype)  # bilinear weights, cast once to the data's dtype
    items = nb * rb
    for item in range(items * chunk // chunks, items * (chunk + 1) // chunks):
        nl = item // rb
        rl = item - nl * rb
        n = n0 + nl
        ho = r0 + rl
        for wl in range(wb):
            wo = c0 + wl
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    dst = out[nl, rl * kh + i, wl * kw + j]
                    for g in range(groups):
                        cs = g * cpg
                        ce = cs + cpg
                        y = ho * sh - ph + i * dh + off[n, 2 * (g * taps + k), ho, wo]
                        x = wo * sw - pw + j * dw + off[n, 2 * (g * taps + k) + 1, ho, wo]
                        m = msk[n, g * taps + k, ho, wo] if has_mask else 1.0
                        if not (y > -1.0 and y < height and x > -1.0 and x < width):
                            for c in range(cs, ce):
                                dst[c] = 0.0
                            continue
                        y0 = int(math.floor(y))
                        x0 = int(math.floor(x))
                        ly = y - y0
                        lx = x - x0
                        wts[0] = (1.0 - ly) * (1.0 - lx) * m
                        wts[1] = (1.0 - ly) * lx * m
                        wts[2] = ly * (1.0 - lx) * m
                        wts[3] = ly * lx * m
                        w00 = wts[0]
                        w01 = wts[1]
                        w10 = wts[2]
                        w11 = wts[3]
                        if y0 >= 0 and x0 >= 0 and y0 + 1 < height and x0 + 1 < width:
                            a = inp[n, y0, x0]
                            b = inp[n, y0, x0 + 1]
                            cc = inp[n, y0 + 1, x0]
                            d = inp[n, y0 + 1, x0 + 1]
                            for c in range(cs, ce):
                                dst[c] = w00 * a[c] + w01 * b[c] + w10 * cc[c] + w11 * d[c]
                        else:  # a corner outside the image counts as zero
                            for c in range(cs, ce):
                                dst[c] = 0.0
                            if y0 >= 0 and x0 >= 0:
                                a = inp[n, y0, x0]
                                for c in range(cs, ce):
                                    dst[c] += w00 * a[c]
                            if y0 >= 0 and x0 + 1 < width:
                                b = inp[n, y0, x0 + 1]
                                for c in range(cs, ce):
                                    dst[c] += w01 * b[c]
                            if y0 + 1 < height and x0 >= 0:
                                cc = inp[n, y0 + 1, x0]
                                for c in range(cs, ce):
                                    dst[c] += w10 * cc[c]
                            if y0 + 1 < height and x0 + 1 < width:
                                d = inp[n, y0 + 1, x0 + 1]
                                for c in range(cs, ce):
                                    dst[c] += w11 * d[c]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_tile(inp, off, msk, has_mask, grad_cols, n0, r0, c0, nb, rb, wb,
                   groups, kh, kw, sh, sw, ph, pw, dh, dw,
                   need_input, grad_inp, partial, chunk, chunks):  # fmt: skip
    """One thread's channel slice of the backward of ``_sample_tile``.

    grad_cols is dL/dE of the tile. Adds the input gradient of channels
    [C*chunk/chunks, C*(chunk+1)/chunks) into grad_inp (channels last) and writes this chunk's
    partial sums over those channels into partial[chunk, nl, rl, wl, g*K+k, :] as
    (dL/dy, dL/dx, dL/dmask).
    """
    _, height, width, channels = inp.shape
    cpg = channels // groups
    taps = kh * kw
    cb0 = channels * chunk // chunks
    cb1 = channels * (chunk + 1) // chunks
    part = partial[chunk]
    part[...] = 0.0
    if cb1 <= cb0:
        return
    g_first = cb0 // cpg
    g_last = (cb1 - 1) // cpg
    wts = np.empty(4, dtype=grad_cols.dtype)
    cf = np.zeros(4, dtype=grad_cols.dtype)  # typed copies, so channel loops stay in the dtype
    for nl in range(nb):
        n = n0 + nl
        for rl in range(rb):
            ho = r0 + rl
            for wl in range(wb):
                wo = c0 + wl
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        src = grad_cols[nl, rl * kh + i, wl * kw + j]
                        for g in range(g_first, g_last + 1):
                            cs = max(g * cpg, cb0)
                            ce = min(g * cpg + cpg, cb1)
                            y = ho * sh - ph + i * dh + off[n, 2 * (g * taps + k), ho, wo]
                            x = wo * sw - pw + j * dw + off[n, 2 * (g * taps + k) + 1, ho, wo]
                            m = msk[n, g * taps + k, ho, wo] if has_mask else 1.0
                            if not (y > -1.0 and y < height and x > -1.0 and x < width):
                                continue
                            y0 = int(math.floor(y))
                            x0 = int(math.floor(x))
                            cf[0] = y - y0
                            cf[1] = x - x0
                            cf[2] = 1.0 - (y - y0)
                            ly = cf[0]
                            lx = cf[1]
                            hy = cf[2]
                            hx = 1.0 - (x - x0)
                            ok00 = y0 >= 0 and x0 >= 0
                            ok01 = y0 >= 0 and x0 + 1 < width
                            ok10 = y0 + 1 < height and x0 >= 0
                            ok11 = y0 + 1 < height and x0 + 1 < width
                            acc_y = cf[3]
                            acc_x = cf[3]
                            acc_m = cf[3]
                            if ok00 and ok01 and ok10 and ok11:
                                a = inp[n, y0, x0]
                                b = inp[n, y0, x0 + 1]
                                cc = inp[n, y0 + 1, x0]
                                d = inp[n, y0 + 1, x0 + 1]
                                for c in range(cs, ce):
                                    ge = src[c]
                                    top = a[c] + lx * (b[c] - a[c])
                                    bottom = cc[c] + lx * (d[c] - cc[c])
                                    acc_m += ge * (top + ly * (bottom - top))
                                    acc_y += ge * (bottom - top)
                                    acc_x += ge * (hy * (b[c] - a[c]) + ly * (d[c] - cc[c]))
                            else:
                                for c in range(cs, ce):
                                    ge = src[c]
                                    va = inp[n, y0, x0, c] if ok00 else cf[3]
                                    vb = inp[n, y0, x0 + 1, c] if ok01 else cf[3]
                                    vc = inp[n, y0 + 1, x0, c] if ok10 else cf[3]
                                    vd = inp[n, y0 + 1, x0 + 1, c] if ok11 else cf[3]
                                    top = va + lx * (vb - va)
                                    bottom = vc + lx * (vd - vc)
                                    acc_m += ge * (top + ly * (bottom - top))
                                    acc_y += ge * (bottom - top)
                                    acc_x += ge * (hy * (vb - va) + ly * (vd - vc))
                            q = part[nl, rl, wl, g * taps + k]
                            q[0] += acc_y * m
                            q[1] += acc_x * m
                            q[2] += acc_m
                            if not need_input:
                                continue
                            # One loop per corner: a single store stream each, so it vectorises.
                            wts[0] = hy * hx * m
                            wts[1] = hy * lx * m
                            wts[2] = ly * hx * m
                            wts[3] = ly * lx * m
                            if ok00:
                                w = wts[0]
                                dst = grad_inp[n, y0, x0]
                                for c in range(cs, ce):
                                    dst[c] += w * src[c]
                            if ok01:
                                w = wts[1]
                                dst = grad_inp[n, y0, x0 + 1]
                                for c in range(cs, ce):
                                    dst[c] += w * src[c]
                            if ok10:
                                w = wts[2]
                                dst = grad_inp[n, y0 + 1, x0]
                                for c in range(cs, ce):
                                    dst[c] += w * src[c]
                            if ok11:
                                w = wts[3]
                                dst = grad_inp[n, y0 + 1, x0 + 1]
                                for c in range(cs, ce):
                                    dst[c] += w * src[c]


def _tiles(batch, out_h, out_w, channels, taps, itemsize, budget):
    """Split (batch, rows, columns) of the output so that each tile's E fits in ``budget`` bytes."""
    col_bytes = taps * channels * itemsize
    row_bytes = out_w * col_bytes
    image_bytes = out_h * row_bytes
    if image_bytes <= budget:
        nb = max(1, budget // max(image_bytes, 1))
        for n0 in range(0, batch, nb):
            yield n0, 0, 0, min(nb, batch - n0), out_h, out_w
    elif row_bytes <= budget:
        rb = budget // row_bytes
        for n0 in range(batch):
            for r0 in range(0, out_h, rb):
                yield n0, r0, 0, 1, min(rb, out_h - r0), out_w
    else:
        wb = max(1, budget // col_bytes)
        for n0 in range(batch):
            for r0 in range(out_h):
                for c0 in range(0, out_w, wb):
                    yield n0, r0, c0, 1, 1, min(wb, out_w - c0)


class _Problem:
    """Shapes and numpy views shared by the forward and backward of one call."""

    def __init__(self, input, offset, weight, stride, padding, dilation, mask):
        self.batch, self.channels, _, _ = input.shape
        self.out_channels, _, self.kh, self.kw = weight.shape
        self.out_h, self.out_w = offset.shape[-2:]
        self.taps = self.kh * self.kw
        self.offset_groups = offset.shape[1] // (2 * self.taps)
        self.weight_groups = self.channels // weight.shape[1]
        self.geometry = (self.offset_groups, self.kh, self.kw, *stride, *padding, *dilation)
        # channels-last copy of the input (free when the caller's input already is channels last)
        self.inp_cl = input.detach().permute(0, 2, 3, 1).contiguous()
        self.inp_np = self.inp_cl.numpy()
        self.off_np = offset.detach().contiguous().numpy()
        self.has_mask = mask is not None
        self.msk_np = mask.detach().contiguous().numpy() if mask is not None else self.off_np[:, :1]
        self.dtype = input.dtype
        self.buffer = None

    def tiles(self):
        itemsize = self.inp_cl.element_size()
        return _tiles(self.batch, self.out_h, self.out_w, self.channels, self.taps, itemsize,
                      TILE_BYTES)  # fmt: skip

    def expanded(self, n0, r0, c0, nb, rb, wb):
        """Sample one tile into a reused buffer; returns it as an NCHW (channels-last) view."""
        shape = (nb, rb * self.kh, wb * self.kw, self.channels)
        numel = math.prod(shape)
        if self.buffer is None or self.buffer.numel() < numel:
            self.buffer = torch.empty(numel, dtype=self.dtype)
        cols = self.buffer[:numel].view(shape)
        run_chunked(_sample_tile, min(num_chunks(), nb * rb), self.inp_np, self.off_np,
                    self.msk_np, self.has_mask, cols.numpy(), n0, r0, c0, nb, rb, wb,
                    *self.geometry)  # fmt: skip
        return cols.permute(0, 3, 1, 2)


def forward(input, offset, weight, bias, stride, padding, dilation, mask):
    p = _Problem(input, offset, weight, stride, padding, dilation, mask)
    out = torch.empty((p.batch, p.out_channels, p.out_h, p.out_w), dtype=input.dtype)
    w = weight.detach()
    b = bias.detach() if bias is not None else None
    for n0, r0, c0, nb, rb, wb in p.tiles():
        cols = p.expanded(n0, r0, c0, nb, rb, wb)
        res = F.conv2d(cols, w, b, stride=(p.kh, p.kw), groups=p.weight_groups)
        out[n0 : n0 + nb, :, r0 : r0 + rb, c0 : c0 + wb] = res
    return out


def backward(grad_out, input, offset, weight, stride, padding, dilation, mask, need):
    """Gradients (input, offset, weight, mask) for the flags in ``need``; None where not needed."""
    need_input, need_offset, need_weight, need_mask = need
    p = _Problem(input, offset, weight, stride, padding, dilation, mask)
    w = weight.detach()
    grad_out = grad_out.detach()
    need_cols = need_input or need_offset or need_mask
    chunks = num_chunks()
    grad_inp = torch.zeros_like(p.inp_cl) if need_input else None
    grad_inp_np = grad_inp.numpy() if need_input else p.inp_np[:0]
    grad_offset = torch.zeros_like(offset) if need_offset else None
    grad_mask = torch.zeros_like(mask) if need_mask else None
    grad_weight = torch.zeros_like(weight) if need_weight else None
    gk = p.offset_groups * p.taps
    for n0, r0, c0, nb, rb, wb in p.tiles():
        g_tile = grad_out[n0 : n0 + nb, :, r0 : r0 + rb, c0 : c0 + wb]
        if need_weight:
            cols = p.expanded(n0, r0, c0, nb, rb, wb)
        else:  # the input-side gradient of a convolution needs only the shape of its input
            cols = torch.empty((nb, rb * p.kh, wb * p.kw, p.channels), dtype=p.dtype)
            cols = cols.permute(0, 3, 1, 2)
        g_cols, g_w, _ = torch.ops.aten.convolution_backward(
            g_tile, cols, w, None, [p.kh, p.kw], [0, 0], [1, 1], False, [0, 0],
            p.weight_groups, [need_cols, need_weight, False])  # fmt: skip
        if need_weight:
            grad_weight += g_w
        if not need_cols:
            continue
        g_cols = g_cols.permute(0, 2, 3, 1).contiguous()
        partial = torch.empty((chunks, nb, rb, wb, gk, 3), dtype=p.dtype)
        run_chunked(_backward_tile, chunks, p.inp_np, p.off_np, p.msk_np, p.has_mask,
                    g_cols.numpy(), n0, r0, c0, nb, rb, wb, *p.geometry, need_input,
                    grad_inp_np, partial.numpy())  # fmt: skip
        sums = partial.sum(0)  # [nb, rb, wb, G*K, 3], added in chunk order
        if need_offset:
            grad_offset[n0 : n0 + nb, :, r0 : r0 + rb, c0 : c0 + wb] = (
                sums[..., :2].reshape(nb, rb, wb, 2 * gk).permute(0, 3, 1, 2)
            )
        if need_mask:
            grad_mask[n0 : n0 + nb, :, r0 : r0 + rb, c0 : c0 + wb] = sums[..., 2].permute(0, 3, 1, 2)
    grad_input = grad_inp.permute(0, 3, 1, 2).contiguous() if need_input else None
    return grad_input, grad_offset, grad_weight, grad_mask
