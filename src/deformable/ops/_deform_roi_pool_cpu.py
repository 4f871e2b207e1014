"""Fast CPU kernels of deform_roi_pool and deform_ps_roi_pool (numba, multithreaded, deterministic).

RoI pooling (``deform_roi_pool``) samples channels last: the input is copied once to
``[N, H, W, C]``, so the four corners of a sample are four contiguous channel rows and every
channel loop vectorises. Each bin's sum is kept in a contiguous buffer and written to the
``[K, C, oh, ow]`` output once. Position-sensitive pooling (``deform_ps_roi_pool``) reads one
input channel per output value (``C_out`` of ``C_out * oh * ow`` per bin), so it samples the
NCHW input in place, plane by plane: one input plane serves every RoI from cache.

``deform_roi_pool``: the forward and the offset / mask gradients are split between threads by
RoI, so every output element and every offset / mask gradient is computed by one thread. The
input gradient is a scatter; it is split by channel instead (non-overlapping slices of the
gradient), and each chunk walks every RoI, bin and sample in order, so each element receives its
contributions in one fixed order whatever the number of threads. ``deform_ps_roi_pool`` splits
everything by input plane (each plane feeds exactly one output channel and bin), and sums the
offset gradients over channels afterwards, in channel order. No atomics, no races,
bit-identical results whatever the number of threads.

The per-RoI arithmetic (box corners, RoI size, samples per bin) comes from
:func:`deformable.ops.reference_roi.roi_geometry`, the very numbers the reference uses; the
bilinear sampling is RoIAlign's (see :mod:`deformable.ops.reference_roi`).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from deformable.ops import reference_roi
from deformable.ops._parallel import num_chunks, run_chunked

# As in _deform_conv_cpu: reassociation vectorises channel reductions; no 'nnan' / 'ninf', so
# NaN coordinates still fail the inside tests.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# Indices into the int64 'dims' array.
_N, _H, _W, _C, _K, _OH, _OW, _G, _COUT, _MOST = range(10)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _axis(v, size):
    """RoIAlign's clamping along one axis: (low, high, fraction, derivative factor)."""
    active = 1.0
    if v <= 0.0:
        v = 0.0
        active = 0.0
    low = int(v)
    if low >= size - 1:
        return size - 1, size - 1, 0.0, 0.0
    return low, low + 1, v - low, active


# Its twin lives in _deform_conv_cpu on purpose: numba's on-disk cache does not notice changes
# to njit functions imported from another module, so a shared helper would go stale.
@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _axpy(dst, d, w, src, s, count):
    """dst[d:d+count] += w * src[s:s+count]."""
    du = np.uint64(d)
    su = np.uint64(s)
    for c in range(np.uint64(count)):
        dst[du + c] += w * src[su + c]


# ---------------------------------------------------------------------------------------------
# deform_roi_pool: channels-last input [N, H, W, C], output / grad_out [K, C, oh, ow]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _forward(inp, geo_f, geo_i, off, msk, has_off, has_msk, gamma, dims, out, chunk, chunks):
    batch, height, width, channels = dims[_N], dims[_H], dims[_W], dims[_C]
    rois, oh, ow = dims[_K], dims[_OH], dims[_OW]
    bins = oh * ow
    acc = np.empty(channels, dtype=out.dtype)
    wts = np.empty(4, dtype=out.dtype)  # bilinear weights cast once to the data's dtype
    for k in range(rois * chunk // chunks, rois * (chunk + 1) // chunks):
        n, gh, gw = geo_i[3 * k], geo_i[3 * k + 1], geo_i[3 * k + 2]
        sy, sx, rh, rw = geo_f[4 * k], geo_f[4 * k + 1], geo_f[4 * k + 2], geo_f[4 * k + 3]
        bh = rh / oh
        bw = rw / ow
        inv_count = 1.0 / max(gh * gw, 1)
        image = n * height
        for b in range(bins):
            i = b // ow
            j = b - i * ow
            for c in range(np.uint64(channels)):
                acc[c] = 0.0
            y0 = sy + i * bh
            x0 = sx + j * bw
            if has_off:
                x0 += gamma * off[2 * k * bins + b] * rw
                y0 += gamma * off[(2 * k + 1) * bins + b] * rh
            for iy in range(gh if 0 <= n < batch else 0):  # a bad batch index pools zeros
                y = y0 + (iy + 0.5) * bh / gh
                if not (y >= -1.0 and y <= height):  # also NaN
                    continue
                yl, yh, ly, _ = _axis(y, height)
                for ix in range(gw):
                    x = x0 + (ix + 0.5) * bw / gw
                    if not (x >= -1.0 and x <= width):
                        continue
                    xl, xh, lx, _ = _axis(x, width)
                    wts[0] = (1.0 - ly) * (1.0 - lx)
                    wts[1] = (1.0 - ly) * lx
                    wts[2] = ly * (1.0 - lx)
                    wts[3] = ly * lx
                    a00 = np.uint64(((image + yl) * width + xl) * channels)
                    a01 = np.uint64(((image + yl) * width + xh) * channels)
                    a10 = np.uint64(((image + yh) * width + xl) * channels)
                    a11 = np.uint64(((image + yh) * width + xh) * channels)
                    w00, w01, w10, w11 = wts[0], wts[1], wts[2], wts[3]
                    for c in range(np.uint64(channels)):
                        acc[c] += (w00 * inp[a00 + c] + w01 * inp[a01 + c]
                                   + w10 * inp[a10 + c] + w11 * inp[a11 + c])  # fmt: skip
            scale = inv_count * (msk[k * bins + b] if has_msk else 1.0)
            wts[0] = scale
            base = k * channels * bins + b
            for c in range(channels):
                out[base + c * bins] = acc[c] * wts[0]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_offset(inp, geo_f, geo_i, off, msk, has_off, has_msk, gamma, dims, grad_out,
                     grad_off, grad_msk, chunk, chunks):  # fmt: skip
    """dL/doffset [K, 2, oh, ow] and dL/dmask [K, 1, oh, ow] of this chunk's RoIs."""
    batch, height, width, channels = dims[_N], dims[_H], dims[_W], dims[_C]
    rois, oh, ow = dims[_K], dims[_OH], dims[_OW]
    bins = oh * ow
    gbuf = np.empty(channels, dtype=grad_out.dtype)
    cf = np.zeros(4, dtype=grad_out.dtype)  # typed fractions (cf[3] stays a typed zero)
    for k in range(rois * chunk // chunks, rois * (chunk + 1) // chunks):
        n, gh, gw = geo_i[3 * k], geo_i[3 * k + 1], geo_i[3 * k + 2]
        sy, sx, rh, rw = geo_f[4 * k], geo_f[4 * k + 1], geo_f[4 * k + 2], geo_f[4 * k + 3]
        bh = rh / oh
        bw = rw / ow
        inv_count = 1.0 / max(gh * gw, 1)
        image = n * height
        for b in range(bins):
            i = b // ow
            j = b - i * ow
            base = k * channels * bins + b
            for c in range(channels):
                gbuf[c] = grad_out[base + c * bins]
            y0 = sy + i * bh
            x0 = sx + j * bw
            if has_off:
                x0 += gamma * off[2 * k * bins + b] * rw
                y0 += gamma * off[(2 * k + 1) * bins + b] * rh
            sum_v = 0.0
            sum_y = 0.0
            sum_x = 0.0
            for iy in range(gh if 0 <= n < batch else 0):
                y = y0 + (iy + 0.5) * bh / gh
                if not (y >= -1.0 and y <= height):
                    continue
                yl, yh, ly, ay = _axis(y, height)
                for ix in range(gw):
                    x = x0 + (ix + 0.5) * bw / gw
                    if not (x >= -1.0 and x <= width):
                        continue
                    xl, xh, lx, ax = _axis(x, width)
                    cf[0] = ly
                    cf[1] = lx
                    cf[2] = 1.0 - ly
                    fy, fx, hy = cf[0], cf[1], cf[2]
                    a00 = np.uint64(((image + yl) * width + xl) * channels)
                    a01 = np.uint64(((image + yl) * width + xh) * channels)
                    a10 = np.uint64(((image + yh) * width + xl) * channels)
                    a11 = np.uint64(((image + yh) * width + xh) * channels)
                    acc_v = cf[3]
                    acc_y = cf[3]
                    acc_x = cf[3]
                    for c in range(np.uint64(channels)):
                        g = gbuf[c]
                        va = inp[a00 + c]
                        vb = inp[a01 + c]
                        vc = inp[a10 + c]
                        vd = inp[a11 + c]
                        top = va + fx * (vb - va)
                        bottom = vc + fx * (vd - vc)
                        acc_v += g * (top + fy * (bottom - top))
                        acc_y += g * (bottom - top)
                        acc_x += g * (hy * (vb - va) + fy * (vd - vc))
                    sum_v += acc_v
                    sum_y += acc_y * ay
                    sum_x += acc_x * ax
            m = msk[k * bins + b] if has_msk else 1.0
            grad_msk[k * bins + b] = sum_v * inv_count
            grad_off[2 * k * bins + b] = gamma * rw * m * inv_count * sum_x
            grad_off[(2 * k + 1) * bins + b] = gamma * rh * m * inv_count * sum_y


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_input(geo_f, geo_i, off, msk, has_off, has_msk, gamma, dims, grad_out, grad_inp,
                    chunk, chunks):  # fmt: skip
    """Scatter into the channels ``[c0, c1)`` of this chunk of dL/dinput (flat [N, H, W, C])."""
    batch, height, width, channels = dims[_N], dims[_H], dims[_W], dims[_C]
    rois, oh, ow = dims[_K], dims[_OH], dims[_OW]
    bins = oh * ow
    c0 = channels * chunk // chunks
    cn = channels * (chunk + 1) // chunks - c0
    if cn <= 0:
        return
    gbuf = np.empty(cn, dtype=grad_out.dtype)
    wts = np.empty(5, dtype=grad_out.dtype)
    for k in range(rois):
        n, gh, gw = geo_i[3 * k], geo_i[3 * k + 1], geo_i[3 * k + 2]
        if not (0 <= n < batch):
            continue
        sy, sx, rh, rw = geo_f[4 * k], geo_f[4 * k + 1], geo_f[4 * k + 2], geo_f[4 * k + 3]
        bh = rh / oh
        bw = rw / ow
        inv_count = 1.0 / max(gh * gw, 1)
        image = n * height
        for b in range(bins):
            i = b // ow
            j = b - i * ow
            wts[4] = inv_count * (msk[k * bins + b] if has_msk else 1.0)
            base = (k * channels + c0) * bins + b
            for c in range(cn):
                gbuf[c] = grad_out[base + c * bins] * wts[4]
            y0 = sy + i * bh
            x0 = sx + j * bw
            if has_off:
                x0 += gamma * off[2 * k * bins + b] * rw
                y0 += gamma * off[(2 * k + 1) * bins + b] * rh
            for iy in range(gh):
                y = y0 + (iy + 0.5) * bh / gh
                if not (y >= -1.0 and y <= height):
                    continue
                yl, yh, ly, _ = _axis(y, height)
                for ix in range(gw):
                    x = x0 + (ix + 0.5) * bw / gw
                    if not (x >= -1.0 and x <= width):
                        continue
                    xl, xh, lx, _ = _axis(x, width)
                    wts[0] = (1.0 - ly) * (1.0 - lx)
                    wts[1] = (1.0 - ly) * lx
                    wts[2] = ly * (1.0 - lx)
                    wts[3] = ly * lx
                    if wts[0] != 0.0:
                        _axpy(grad_inp, ((image + yl) * width + xl) * channels + c0, wts[0],
                              gbuf, 0, cn)  # fmt: skip
                    if wts[1] != 0.0:
                        _axpy(grad_inp, ((image + yl) * width + xh) * channels + c0, wts[1],
                              gbuf, 0, cn)  # fmt: skip
                    if wts[2] != 0.0:
                        _axpy(grad_inp, ((image + yh) * width + xl) * channels + c0, wts[2],
                              gbuf, 0, cn)  # fmt: skip
                    if wts[3] != 0.0:
                        _axpy(grad_inp, ((image + yh) * width + xh) * channels + c0, wts[3],
                              gbuf, 0, cn)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# deform_ps_roi_pool: NCHW input [N, C_out * oh * ow, H, W], output [K, C_out, oh, ow]; output
# channel c of bin b reads input channel c * oh * ow + b and moves with offset group
# c // (C_out / G), offsets [K, 2 * G, oh, ow].


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _ps_samples(geo_f, geo_i, off, has_off, gamma, dims, k, b, g, idx, wt):
    """Samples of bin b, group g: corners (pixel indices) in ``idx[4s:4s+4]``; their weights,
    derivative factors (y, x) and fractions (y, x) in ``wt[8s:8s+8]``. Returns how many."""
    height, width = dims[_H], dims[_W]
    oh, ow, groups = dims[_OH], dims[_OW], dims[_G]
    bins = oh * ow
    gh, gw = geo_i[3 * k + 1], geo_i[3 * k + 2]
    sy, sx, rh, rw = geo_f[4 * k], geo_f[4 * k + 1], geo_f[4 * k + 2], geo_f[4 * k + 3]
    bh = rh / oh
    bw = rw / ow
    i = b // ow
    j = b - i * ow
    y0 = sy + i * bh
    x0 = sx + j * bw
    if has_off:
        x0 += gamma * off[(2 * (k * groups + g)) * bins + b] * rw
        y0 += gamma * off[(2 * (k * groups + g) + 1) * bins + b] * rh
    count = 0
    for iy in range(gh):
        y = y0 + (iy + 0.5) * bh / gh
        if not (y >= -1.0 and y <= height):
            continue
        yl, yh, ly, ay = _axis(y, height)
        for ix in range(gw):
            x = x0 + (ix + 0.5) * bw / gw
            if not (x >= -1.0 and x <= width):
                continue
            xl, xh, lx, ax = _axis(x, width)
            idx[4 * count] = yl * width + xl
            idx[4 * count + 1] = yl * width + xh
            idx[4 * count + 2] = yh * width + xl
            idx[4 * count + 3] = yh * width + xh
            wt[8 * count] = (1.0 - ly) * (1.0 - lx)
            wt[8 * count + 1] = (1.0 - ly) * lx
            wt[8 * count + 2] = ly * (1.0 - lx)
            wt[8 * count + 3] = ly * lx
            wt[8 * count + 4] = ay
            wt[8 * count + 5] = ax
            wt[8 * count + 6] = ly
            wt[8 * count + 7] = lx
            count += 1
    return count


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _ps_forward(inp, geo_f, geo_i, off, has_off, gamma, dims, out, chunk, chunks):
    """Output channel c, bin b of every RoI, for the planes p = c * bins + b of this chunk.

    Plane by plane rather than RoI by RoI: one input plane (a few KiB) serves every RoI from
    cache, where RoI order would fetch a new plane for every channel of every bin.
    """
    batch, height, width, channels_in = dims[_N], dims[_H], dims[_W], dims[_C]
    rois, oh, ow, groups, channels = dims[_K], dims[_OH], dims[_OW], dims[_G], dims[_COUT]
    bins = oh * ow
    per_group = channels // groups
    plane = height * width
    idx = np.empty(4 * dims[_MOST], dtype=np.int64)
    wt = np.empty(8 * dims[_MOST], dtype=out.dtype)
    planes = channels * bins
    for p in range(planes * chunk // chunks, planes * (chunk + 1) // chunks):
        c = p // bins
        b = p - c * bins
        g = c // per_group
        for k in range(rois):
            n = geo_i[3 * k]
            inv_count = 1.0 / max(geo_i[3 * k + 1] * geo_i[3 * k + 2], 1)
            count = 0
            if 0 <= n < batch:  # a bad batch index pools zeros
                count = _ps_samples(geo_f, geo_i, off, has_off, gamma, dims, k, b, g, idx, wt)
            src = (n * channels_in + p) * plane
            acc = 0.0
            for s in range(count):
                acc += (wt[8 * s] * inp[src + idx[4 * s]]
                        + wt[8 * s + 1] * inp[src + idx[4 * s + 1]]
                        + wt[8 * s + 2] * inp[src + idx[4 * s + 2]]
                        + wt[8 * s + 3] * inp[src + idx[4 * s + 3]])  # fmt: skip
            out[(k * channels + c) * bins + b] = acc * inv_count


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _ps_backward(inp, geo_f, geo_i, off, has_off, gamma, dims, grad_out, need_input, need_offset,
                 grad_inp, partial, chunk, chunks):  # fmt: skip
    """Backward of ``_ps_forward`` over the same planes.

    Scatters into the input-gradient planes of the chunk (its own: no other chunk writes them)
    and writes, per (RoI, channel, bin), the derivative of the bin along x and y in
    ``partial[2 * ((k * C + c) * bins + b) + {0, 1}]``; ``_ps_reduce_offset`` sums them over the
    channels of each offset group.
    """
    batch, height, width, channels_in = dims[_N], dims[_H], dims[_W], dims[_C]
    rois, oh, ow, groups, channels = dims[_K], dims[_OH], dims[_OW], dims[_G], dims[_COUT]
    bins = oh * ow
    per_group = channels // groups
    plane = height * width
    idx = np.empty(4 * dims[_MOST], dtype=np.int64)
    wt = np.empty(8 * dims[_MOST], dtype=grad_out.dtype)
    planes = channels * bins
    for p in range(planes * chunk // chunks, planes * (chunk + 1) // chunks):
        c = p // bins
        b = p - c * bins
        g = c // per_group
        for k in range(rois):
            n = geo_i[3 * k]
            at = (k * channels + c) * bins + b
            count = 0
            if 0 <= n < batch:
                count = _ps_samples(geo_f, geo_i, off, has_off, gamma, dims, k, b, g, idx, wt)
            gv = grad_out[at]
            gi = gv / max(geo_i[3 * k + 1] * geo_i[3 * k + 2], 1)
            base = (n * channels_in + p) * plane
            sum_y = 0.0
            sum_x = 0.0
            for s in range(count):
                if need_input:
                    grad_inp[base + idx[4 * s]] += wt[8 * s] * gi
                    grad_inp[base + idx[4 * s + 1]] += wt[8 * s + 1] * gi
                    grad_inp[base + idx[4 * s + 2]] += wt[8 * s + 2] * gi
                    grad_inp[base + idx[4 * s + 3]] += wt[8 * s + 3] * gi
                if need_offset:
                    va = inp[base + idx[4 * s]]
                    vb = inp[base + idx[4 * s + 1]]
                    vc = inp[base + idx[4 * s + 2]]
                    vd = inp[base + idx[4 * s + 3]]
                    ly = wt[8 * s + 6]
                    lx = wt[8 * s + 7]
                    sum_y += wt[8 * s + 4] * ((1.0 - lx) * (vc - va) + lx * (vd - vb))
                    sum_x += wt[8 * s + 5] * ((1.0 - ly) * (vb - va) + ly * (vd - vc))
            if need_offset:
                partial[2 * at] = gv * sum_x
                partial[2 * at + 1] = gv * sum_y


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _ps_reduce_offset(geo_f, geo_i, gamma, dims, partial, grad_off, chunk, chunks):
    """dL/doffset [K, 2 * G, oh, ow] of this chunk's RoIs: sums of ``partial``, channels in order."""
    rois, oh, ow, groups, channels = dims[_K], dims[_OH], dims[_OW], dims[_G], dims[_COUT]
    bins = oh * ow
    per_group = channels // groups
    for k in range(rois * chunk // chunks, rois * (chunk + 1) // chunks):
        inv_count = 1.0 / max(geo_i[3 * k + 1] * geo_i[3 * k + 2], 1)
        rh, rw = geo_f[4 * k + 2], geo_f[4 * k + 3]
        for g in range(groups):
            for b in range(bins):
                sum_x = 0.0
                sum_y = 0.0
                for c in range(g * per_group, (g + 1) * per_group):
                    at = (k * channels + c) * bins + b
                    sum_x += partial[2 * at]
                    sum_y += partial[2 * at + 1]
                grad_off[(2 * (k * groups + g)) * bins + b] = gamma * rw * inv_count * sum_x
                grad_off[(2 * (k * groups + g) + 1) * bins + b] = gamma * rh * inv_count * sum_y


# ---------------------------------------------------------------------------------------------


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy().reshape(-1)


def _geometry(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, ps):
    geo = reference_roi.roi_geometry(boxes.detach().to(input.dtype), output_size, spatial_scale,
                                     sampling_ratio, aligned, ps)  # fmt: skip
    geo_f = torch.stack([geo.start_y, geo.start_x, geo.height, geo.width], 1)
    geo_i = torch.stack([geo.batch, geo.grid_h, geo.grid_w], 1)
    most = int((geo.grid_h * geo.grid_w).max()) if boxes.shape[0] else 0
    return _flat(geo_f), _flat(geo_i), most


def _dims(input, boxes, output_size, groups, channels_out, most):
    batch, channels, height, width = input.shape
    return np.array([batch, height, width, channels, boxes.shape[0], *output_size, groups,
                     channels_out, max(most, 1)], dtype=np.int64)  # fmt: skip


class _RoiProblem:
    """Flat numpy views shared by the forward and backward of one deform_roi_pool call."""

    def __init__(self, input, boxes, output_size, spatial_scale, sampling_ratio, aligned,
                 offset, mask, gamma):  # fmt: skip
        self.geo_f, self.geo_i, most = _geometry(input, boxes, output_size, spatial_scale,
                                                 sampling_ratio, aligned, False)  # fmt: skip
        self.dims = _dims(input, boxes, output_size, 1, input.shape[1], most)
        self.input = input.detach()
        off = _flat(offset) if offset is not None else self.geo_f
        msk = _flat(mask) if mask is not None else self.geo_f
        self.options = (off, msk, offset is not None, mask is not None, float(gamma))
        # elementary operations, roughly: what decides whether threads pay off
        self.work = int(self.dims[_K] * self.dims[_OH] * self.dims[_OW] * most * self.dims[_C] * 4)

    def channels_last(self) -> np.ndarray:
        """The input as flat [N, H, W, C] (free when it already is channels last in memory)."""
        return self.input.permute(0, 2, 3, 1).contiguous().numpy().reshape(-1)

    def out_shape(self):
        return (int(self.dims[_K]), int(self.dims[_C]), int(self.dims[_OH]), int(self.dims[_OW]))


def forward(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset, mask,
            gamma):  # fmt: skip
    p = _RoiProblem(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset,
                    mask, gamma)  # fmt: skip
    out = torch.empty(p.out_shape(), dtype=input.dtype)
    rois = int(p.dims[_K])
    run_chunked(_forward, num_chunks(rois, p.work), p.channels_last(), p.geo_f, p.geo_i,
                *p.options, p.dims, out.numpy().reshape(-1))  # fmt: skip
    return out


def backward(grad_out, input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset,
             mask, gamma, need):  # fmt: skip
    """Gradients (input, offset, mask) for the flags in ``need``; None where not needed."""
    need_input, need_offset, need_mask = need
    need_offset = need_offset and offset is not None
    need_mask = need_mask and mask is not None
    p = _RoiProblem(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, offset,
                    mask, gamma)  # fmt: skip
    g = _flat(grad_out)
    rois = int(p.dims[_K])
    batch, channels, height, width = input.shape
    grad_input = grad_offset = grad_mask = None
    if need_offset or need_mask:
        grad_off = torch.empty((rois, 2, *output_size), dtype=input.dtype)
        grad_msk = torch.empty((rois, 1, *output_size), dtype=input.dtype)
        run_chunked(_backward_offset, num_chunks(rois, p.work), p.channels_last(), p.geo_f,
                    p.geo_i, *p.options, p.dims, g, grad_off.numpy().reshape(-1),
                    grad_msk.numpy().reshape(-1))  # fmt: skip
        grad_offset = grad_off if need_offset else None
        grad_mask = grad_msk if need_mask else None
    if need_input:
        grad_cl = torch.zeros((batch, height, width, channels), dtype=input.dtype)
        run_chunked(_backward_input, num_chunks(channels, p.work, per_thread=2), p.geo_f, p.geo_i,
                    *p.options, p.dims, g, grad_cl.numpy().reshape(-1))  # fmt: skip
        grad_input = grad_cl.permute(0, 3, 1, 2).contiguous()
    return grad_input, grad_offset, grad_mask


class _PsProblem:
    def __init__(self, input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma):
        oh, ow = output_size
        self.channels_out = input.shape[1] // (oh * ow)
        groups = offset.shape[1] // 2 if offset is not None else 1
        self.geo_f, self.geo_i, most = _geometry(input, boxes, output_size, spatial_scale,
                                                 sampling_ratio, True, True)  # fmt: skip
        self.dims = _dims(input, boxes, output_size, groups, self.channels_out, most)
        self.inp = _flat(input)
        off = _flat(offset) if offset is not None else self.geo_f
        self.options = (off, offset is not None, float(gamma))
        self.work = int(boxes.shape[0] * input.shape[1] * most * 4)
        self.out_shape = (boxes.shape[0], self.channels_out, oh, ow)


def ps_forward(input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma):
    p = _PsProblem(input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma)
    out = torch.empty(p.out_shape, dtype=input.dtype)
    planes = p.channels_out * output_size[0] * output_size[1]
    run_chunked(_ps_forward, num_chunks(planes, p.work), p.inp, p.geo_f, p.geo_i, *p.options,
                p.dims, out.numpy().reshape(-1))  # fmt: skip
    return out


def ps_backward(grad_out, input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma,
                need):  # fmt: skip
    """Gradients (input, offset) for the flags in ``need``; None where not needed."""
    need_input, need_offset = need
    need_offset = need_offset and offset is not None
    p = _PsProblem(input, boxes, output_size, spatial_scale, sampling_ratio, offset, gamma)
    rois, planes = boxes.shape[0], p.channels_out * output_size[0] * output_size[1]
    grad_input = torch.zeros(input.shape, dtype=input.dtype) if need_input else None
    partial = torch.empty(2 * rois * planes if need_offset else 0, dtype=input.dtype)
    if need_input or need_offset:
        target = grad_input if need_input else partial
        run_chunked(_ps_backward, num_chunks(planes, p.work), p.inp, p.geo_f, p.geo_i, *p.options,
                    p.dims, _flat(grad_out), need_input, need_offset,
                    target.numpy().reshape(-1), partial.numpy())  # fmt: skip
    grad_offset = None
    if need_offset:
        grad_offset = torch.empty(offset.shape, dtype=input.dtype)
        run_chunked(_ps_reduce_offset, num_chunks(rois, rois * planes), p.geo_f, p.geo_i,
                    float(gamma), p.dims, partial.numpy(), grad_offset.numpy().reshape(-1))  # fmt: skip
    return grad_input, grad_offset
