"""Fast CPU kernels of deform_conv2d: channels-last bilinear sampling (numba) + oneDNN / MKL GEMMs.

The input is copied once, channels last, into a zero-bordered buffer (``_padded``): every
bilinear corner of a sample inside the band ``(-1, H) x (-1, W)`` is a valid address there, and
samples outside it point at a block of zeros, so the channel loops carry no bounds checks and no
branches. Sampling coordinates and the four bilinear weights depend on (n, group, tap, position)
only: they are computed once there, by loops across output positions (which vectorise whatever
the number of channels), and reused for every channel of the group. The channel loops of the
common widths (the blend of 16, 32 and 64 channels, the backward's reduction and scatter of 16
and 32) and the transposes into and out of channels last are intrinsics that write LLVM's vector
IR themselves (``_Vectors``): numba's loops for the same work vectorised behind run-time checks
that their arrays do not overlap, or not at all, and ran 1.8-5x slower (measured alone).

Forward, per tile of output positions: the samples as a column matrix per weight group and
oneDNN's matmul (``_matmul``). Its columns follow the weight's own (channel, tap) order when the
weight outweighs them (``_channel_major``: batch-1 inference of wide layers), so the weight is
used as it is rather than reordered on every call. (The design's other GEMM, ``F.conv2d`` of an
"expanded image" with stride = kernel, was as fast at best and up to 3x slower on small maps;
it is gone.)

Backward: per tile, one GEMM gives ``dL/dcols`` from the output gradient. Two passes turn it into
the gradients of offset / mask and of the input: the first splits output positions between
threads (each writes the offset / mask gradients of its own positions, the samples the weight
gradient's GEMM needs, transposed block by block where that GEMM runs faster on them
(``TRANSPOSED_SAMPLES_MAX_K``), and every tap's corner and bilinear weights); the second splits the
padded input's rows between threads, each walking all taps in order and adding only into its
own rows. No atomics, no races, no per-thread copies of the input gradient, and every element
receives its contributions in one fixed order: bit-identical results whatever the number of
threads (the GEMMs run where they are exact across thread counts, see ``_matmul``). Tiles
of many images split between threads by images instead, and run both passes in one
(``_backward_fused``): the same order, the same results.

By blocks (``FORWARD_GEMM``, on Intel CPUs where torch links MKL): no tile of samples is
written to memory. The kernel that samples a block of positions (whole rows of one image,
about 256 positions, within the L2 cache: ``BLOCK_BYTES``) multiplies it right away by MKL's
GEMM, called from the kernel on its own thread alone (``_forward_blocks``), into the output in
its final layout. The backward does the same on batches of many images (``_backward_blocks``):
per block, dL/dsamples by GEMM, the fused backward's work on it, and the weight gradient's share
by GEMM into one of a fixed number of segments' partial sums (``BACKWARD_SEGMENTS``), added in
order at the end. On batches of 2 to 7 images each tile's first pass runs so
(``_backward_blocks_taps``: dL/dsamples still fill a tile buffer, for the rows' pass that
follows). Measured on the 2-core Xeon, forward+backward 17-27 % faster on the batch-64 layers
of 32-64 channels, 13-17 % on batch-2 maps of 64 channels (3x3 and 5x5), and the demo's
training step 15 % faster: the tiles' write-then-read of tile-sized buffers (14.7 MB of samples
for the demo's 64-channel layer) cost most inside a network, where those buffers start out of
cache.

Threads: where torch runs on OpenMP, the kernels run on torch's own OpenMP threads (``_run``:
numba ``cfunc`` tasks handed to the runtime's ``GOMP_parallel``), else on a small thread pool
(``_parallel.run_chunked``); either way over a partition fixed by the tile, never by the threads.

Tiles are bounded in bytes (``TILE_BYTES``) whatever the image and batch size, and sized to an
eighth of the last-level cache below that (``_tile_bytes``). A channels-last
input gives a channels-last output and input gradient, as ``F.conv2d`` does.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import llvmlite.ir as llvm_ir
import numpy as np
import torch
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from deformable.ops import _parallel
from deformable.ops._parallel import num_chunks, run_chunked

#: Upper bound of one tile of samples, in bytes. The backward holds two (cols and dL/dcols).
TILE_BYTES = 32 * 2**20


@functools.lru_cache(maxsize=None)
def _cache_sizes() -> dict:
    """Bytes of CPU 0's cache of each level, as Linux lists them ({} where the system does not
    say). Read once."""
    sizes, units = {}, {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        for entry in os.scandir("/sys/devices/system/cpu/cpu0/cache"):
            if entry.name.startswith("index"):
                with open(os.path.join(entry.path, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(entry.path, "size")) as f:
                    text = f.read().strip()  # e.g. "32K", "480M"
                sizes[level] = int(text.rstrip("KMG")) * units.get(text[-1:], 1)
    except (OSError, ValueError):
        return {}
    return sizes


def _last_level_cache() -> int | None:
    """Bytes of the CPU's largest cache (its last level), or None where the system does not say."""
    sizes = _cache_sizes()
    return sizes[max(sizes)] if sizes else None


def _tile_bytes(smallest: int, largest: int = 16 * 2**20) -> int:
    """A tile budget an eighth of the last-level cache, within [smallest, largest]: the tile's
    samples, the input, the outputs and the other cores' work share that cache."""
    cache = _last_level_cache()
    return smallest if cache is None else min(largest, max(smallest, cache // 8))


#: The forward's tiles stay near this size (within ``TILE_BYTES``), so the samples are still in
#: cache when the GEMM reads them, and grow with the cache: fewer tiles cost less per call (the
#: GEMM's call, the threads' start and join, the Python around them). Measured, 64x32x20x20 3x3
#: and the demo's 10x10 layers, forward: 4 MiB 20 % faster than larger tiles on a 2-core AMD
#: EPYC; 16 MiB 20-27 % faster than 4 MiB on a 2-core Intel Xeon with a 480 MiB L3 (32 MiB:
#: no faster). They grow to 8x the weight's bytes, so the GEMM's weight reorder is paid on
#: enough work (4 MiB tiles of a 256-channel layer were 10 % slower).
FORWARD_TILE_BYTES = _tile_bytes(4 * 2**20)
#: The backward's tiles (within ``TILE_BYTES``): dL/dcols and the samples each take a
#: tile-sized buffer kept between calls. Measured: 8 MiB as fast as 32 on the EPYC; 16 MiB
#: 2-8 % faster than 8 on the Xeon (forward and backward, 5x5 and few-channel shapes).
BACKWARD_TILE_BYTES = _tile_bytes(8 * 2**20)
#: The backward's tiles where an image's samples exceed ``BACKWARD_TILE_BYTES`` (tiles of rows of
#: a large map). Measured on a ResNet-50 conv4 map at 50x84 (256 channels): 15 % faster
#: forward+backward than in 16 MiB tiles, its weight gradient's GEMM (oneDNN reordering the
#: samples' transposed view) 1.4x slower a position on 17-row tiles than on 10-row ones.
BACKWARD_ROWS_TILE_BYTES = 8 * 2**20
#: Tiles of at least this many images run the backward's two passes as one (``_backward_fused``,
#: split between threads by images). Measured: the backward 8-11 % faster on 64x32x20x20 3x3
#: (16 images a tile), 3-7 % on the 64-image 10x10 maps.
FUSED_BACKWARD_IMAGES = 8
#: Largest padded input (and its gradient) kept between calls for reuse (``_buffer``).
KEPT_BYTES = 8 * 2**20

# Reassociation lets LLVM vectorise the channel reductions; no 'nnan'/'ninf', so the
# out-of-image tests below still see NaN coordinates as outside.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

_workspace = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype, shape=None) -> torch.Tensor:
    """A flat scratch tensor kept per thread between calls (at most one tile each), or its
    first ``numel`` elements viewed as ``shape``.

    Freshly allocated tile buffers cost page faults on every call, and the kernel serialises
    faults from several threads: reusing them is worth several milliseconds per call. The
    views are kept too (two torch ops, 5-10 us of a batch-1 layer's call where it is cold).
    """
    space = _workspace.__dict__
    buffers = space.setdefault("buffers", {})
    buf = buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    views = space.setdefault("views", {})
    key = (name, dtype, numel, shape)
    kept = views.get(key)
    if kept is not None and kept[0] is buf:
        return kept[1]
    view = buf[:numel] if shape is None else buf[:numel].view(shape)
    if len(views) >= 64:
        views.clear()
    views[key] = (buf, view)
    return view


def _buffer(name: str, shape, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """A tensor of ``shape`` used only within one call: a ``_scratch`` buffer up to
    ``KEPT_BYTES`` (the padded input and its gradient of a small layer: measured ~1000 page
    faults a training step of the demo's network when allocated afresh), a fresh one beyond, so
    a large image's buffers are not kept after its call."""
    numel = math.prod(shape)
    if numel * dtype.itemsize > KEPT_BYTES:
        return torch.zeros(shape, dtype=dtype) if zero else torch.empty(shape, dtype=dtype)
    buf = _scratch(name, numel, dtype, tuple(shape))
    return buf.zero_() if zero else buf


# Indices into the int64 'geo' array handed to the kernels.
_BATCH, _H, _W, _C, _OH, _OW, _G, _KH, _KW, _SH, _SW, _PH, _PW, _DH, _DW, _CW = range(16)


# Runs: the channels of an offset group split where weight groups begin. ``runs`` holds G + 1
# indices into the run list (group g owns runs[g]:runs[g+1]), then from position _RUNS = 64 on,
# three numbers per run: first channel c, channel count, weight group gw.
_RUNS = 64


@functools.lru_cache(maxsize=256)
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
    runs = np.array(starts + triples, dtype=np.int64)
    runs.flags.writeable = False  # shared between calls (cached)
    return runs


@njit(nogil=True, cache=True)
def _run_destinations(runs, s_g, cw, s_c):
    """Offset of each run in a tap's block of samples: gw * s_g + (c - gw * cw) * s_c."""
    count = (runs.size - _RUNS) // 3
    dest = np.empty(count, dtype=np.int64)
    for r in range(count):
        c, gw = runs[_RUNS + 3 * r], runs[_RUNS + 3 * r + 2]
        dest[r] = gw * s_g + (c - gw * cw) * s_c
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


def _shuffle_mask(lanes):
    """A shuffle's mask: the lanes it picks, numbered across its two operands."""
    lanes = list(lanes)
    return llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(32), len(lanes)), lanes)


_LANE0 = llvm_ir.Constant(llvm_ir.IntType(32), 0)


class _Vectors:
    """LLVM IR of whole vectors of ``width`` elements for this module's intrinsics: loads and stores
    at an element index of a numba array (unaligned), splats of scalars, fused multiply-adds,
    a horizontal sum in a fixed order (halves added until one lane is left). The instructions
    carry no fast-math flags: LLVM keeps their order, the same in a fresh compilation and in
    numba's cache."""

    def __init__(self, context, builder, signature, args, width):
        self.context, self.builder, self.signature, self.args = context, builder, signature, args
        self.width = width
        self.dtype = signature.args[0].dtype
        self.type = llvm_ir.VectorType(context.get_data_type(self.dtype), width)
        self.align = self.dtype.bitwidth // 8
        self.fma_function = cgutils.get_or_insert_function(
            builder.module, llvm_ir.FunctionType(self.type, [self.type] * 3),
            f"llvm.fma.v{width}f{self.dtype.bitwidth}")  # fmt: skip

    def data(self, k):
        """The data pointer of array argument ``k``."""
        return self.context.make_array(self.signature.args[k])(self.context, self.builder,
                                                               self.args[k]).data  # fmt: skip

    def int(self, k):
        return self.context.cast(self.builder, self.args[k], self.signature.args[k], types.int64)

    def splat(self, k):
        """Scalar argument ``k`` in every lane."""
        value = self.context.cast(self.builder, self.args[k], self.signature.args[k], self.dtype)
        empty = llvm_ir.Constant(self.type, None)
        one = self.builder.insert_element(empty, value, _LANE0)
        return self.builder.shuffle_vector(one, empty, _shuffle_mask([0] * self.width))

    def pointer(self, data, index):
        return self.builder.bitcast(self.builder.gep(data, [index]), self.type.as_pointer())

    def load(self, data, index):
        return self.builder.load(self.pointer(data, index), align=self.align)

    def store(self, value, data, index):
        self.builder.store(value, self.pointer(data, index), align=self.align)

    def fma(self, a, b, c):
        """a * b + c, one rounding."""
        return self.builder.call(self.fma_function, [a, b, c])

    def sum(self, v):
        builder, n = self.builder, self.width
        while n > 1:
            n //= 2
            low = builder.shuffle_vector(v, v, _shuffle_mask(range(n)))
            high = builder.shuffle_vector(v, v, _shuffle_mask(range(n, 2 * n)))
            v = builder.fadd(low, high)
        return builder.extract_element(v, _LANE0)


def _vector_blend(width):
    """An intrinsic ``blend(out, o, inp, a, row, col, w00, w01, w10, w11)``: ``_blend4`` of
    ``width`` channels as straight-line vector code (LLVM splits the vector into the CPU's).

    Numba's loop of a constant width vectorised too, but behind run-time checks that ``out``
    and ``inp`` do not overlap, with a scalar fallback, in a loop nest whose variables then
    spilled to the stack: 21 ns a (position, tap) of 32 channels on one thread, 8-10 ns this
    way. The products are summed in the loop's order (w00 first, then three fused multiply-adds):
    the same bits."""

    @intrinsic
    def blend(typingctx, out, o, inp, a, row, col, w00, w01, w10, w11):
        def codegen(context, builder, signature, args):
            v = _Vectors(context, builder, signature, args, width)
            out_data, inp_data = v.data(0), v.data(2)
            a, row, col = v.int(3), v.int(4), v.int(5)
            a10 = builder.add(a, row)
            total = builder.fmul(v.splat(6), v.load(inp_data, a))
            for k, at in ((7, builder.add(a, col)), (8, a10), (9, builder.add(a10, col))):
                total = v.fma(v.splat(k), v.load(inp_data, at), total)
            v.store(total, out_data, v.int(1))
            return context.get_dummy_value()

        return types.void(out, o, inp, a, row, col, w00, w01, w10, w11), codegen

    return blend


def _vector_axpy2(width):
    """An intrinsic ``axpy2(dst, d, step, w0, w1, src, s)``: ``_axpy2`` of ``width`` channels
    as straight-line vector code (the blend's reasons; the same bits)."""

    @intrinsic
    def axpy2(typingctx, dst, d, step, w0, w1, src, s):
        def codegen(context, builder, signature, args):
            v = _Vectors(context, builder, signature, args, width)
            dst_data = v.data(0)
            value = v.load(v.data(5), v.int(6))
            d0 = v.int(1)
            d1 = builder.add(d0, v.int(2))
            v.store(v.fma(v.splat(3), value, v.load(dst_data, d0)), dst_data, d0)
            v.store(v.fma(v.splat(4), value, v.load(dst_data, d1)), dst_data, d1)
            return context.get_dummy_value()

        return types.void(dst, d, step, w0, w1, src, s), codegen

    return axpy2


def _vector_reduce4(width):
    """An intrinsic: ``_reduce4`` of ``width`` channels as straight-line vector code, the
    three sums over channels each added up in a fixed order (``_Vectors.sum``)."""

    @intrinsic
    def reduce4(typingctx, grad_cols, src, pad, a00, col, row, ly, lx, hy, write_cols, cols, shift,
                m):  # fmt: skip
        dtype = grad_cols.dtype
        signature = types.UniTuple(dtype, 3)(grad_cols, src, pad, a00, col, row, ly, lx, hy,
                                             write_cols, cols, shift, m)  # fmt: skip

        def codegen(context, builder, signature, args):
            v = _Vectors(context, builder, signature, args, width)
            pad_data = v.data(2)
            src = v.int(1)
            a00, col, row = v.int(3), v.int(4), v.int(5)
            a10 = builder.add(a00, row)
            ge = v.load(v.data(0), src)
            va, vb = v.load(pad_data, a00), v.load(pad_data, builder.add(a00, col))
            vc, vd = v.load(pad_data, a10), v.load(pad_data, builder.add(a10, col))
            ly, lx, hy = v.splat(6), v.splat(7), v.splat(8)
            dx_top = builder.fsub(vb, va)
            dx_bottom = builder.fsub(vd, vc)
            top = v.fma(lx, dx_top, va)
            bottom = v.fma(lx, dx_bottom, vc)
            dy = builder.fsub(bottom, top)
            value = v.fma(ly, dy, top)
            write = context.cast(builder, args[9], signature.args[9], types.boolean)
            with builder.if_then(write):
                v.store(builder.fmul(v.splat(12), value), v.data(10), builder.sub(src, v.int(11)))
            dx = v.fma(ly, dx_bottom, builder.fmul(hy, dx_top))
            sums = [v.sum(builder.fmul(ge, term)) for term in (dy, dx, value)]
            return context.make_tuple(builder, signature.return_type, sums)

        return signature, codegen

    return reduce4


_blend16, _blend32, _blend64 = (_vector_blend(width) for width in (16, 32, 64))
# the backward's intrinsics: 16 and 32 channels only (with 64, slower than numba's loops)
_axpy2_16, _axpy2_32 = (_vector_axpy2(width) for width in (16, 32))
_reduce16, _reduce32 = (_vector_reduce4(width) for width in (16, 32))


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _blend4_strided(out, o, step, inp, a, row, col, w00, w01, w10, w11, count):
    """As ``_blend4``, writing out[o + c * step] (channel-major columns)."""
    a00 = np.uint64(a)
    a01 = np.uint64(a + col)
    a10 = np.uint64(a + row)
    a11 = np.uint64(a + row + col)
    ou = np.uint64(o)
    su = np.uint64(step)
    for c in range(np.uint64(count)):
        out[ou + c * su] = (w00 * inp[a00 + c] + w01 * inp[a01 + c]
                            + w10 * inp[a10 + c] + w11 * inp[a11 + c])  # fmt: skip


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _axpy2(dst, d, step, w0, w1, src, s, count):
    """dst[d:d+count] += w0 * src[s:s+count]; dst[d+step:d+step+count] += w1 * src[s:s+count]."""
    d0 = np.uint64(d)
    d1 = np.uint64(d + step)
    su = np.uint64(s)
    for c in range(np.uint64(count)):
        v = src[su + c]
        dst[d0 + c] += w0 * v
        dst[d1 + c] += w1 * v


# The sampling and scatter loops are called through these dispatchers: the common widths by
# their vector intrinsics (above), the rest by numba's loops (a generic loop of 32 channels ran
# in its 8-wide remainder; 13 % of the forward's sampling time on 32 channels). Where every
# offset group is one run of channels, the width is rather fixed for a whole loop nest
# (``_blend_rows``, ``_reduce_rows``, ``_scatter_rows``): a test per call cost a tenth of its
# time, and one nest holding every width's code ran slower than the loops.


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _blend_width(out, o, inp, a, row, col, w00, w01, w10, w11, count):
    if count == 32:
        _blend32(out, o, inp, a, row, col, w00, w01, w10, w11)
    elif count == 64:
        _blend64(out, o, inp, a, row, col, w00, w01, w10, w11)
    elif count == 16:
        _blend16(out, o, inp, a, row, col, w00, w01, w10, w11)
    else:
        _blend4(out, o, inp, a, row, col, w00, w01, w10, w11, count)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _axpy2_width(dst, d, step, w0, w1, src, s, count):
    if count == 32:
        _axpy2(dst, d, step, w0, w1, src, s, 32)
    elif count == 64:
        _axpy2(dst, d, step, w0, w1, src, s, 64)
    elif count == 16:
        _axpy2(dst, d, step, w0, w1, src, s, 16)
    else:
        _axpy2(dst, d, step, w0, w1, src, s, count)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _axpy2_of(dst, d, step, w0, w1, src, s, count, width):
    """``_axpy2`` of ``count`` channels: by the intrinsic of a constant ``width`` of 16 or 32
    (then equal to ``count``), or with ``width`` -1 by numba's loops (``_axpy2_width``)."""
    if width == 32:
        _axpy2_32(dst, d, step, w0, w1, src, s)
    elif width == 16:
        _axpy2_16(dst, d, step, w0, w1, src, s)
    else:
        _axpy2_width(dst, d, step, w0, w1, src, s, count)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _reduce4(grad_cols, src, pad, a00, col, row, ly, lx, hy, write_cols, cols, shift, m, count):
    """Per channel c of one tap: dL/dy, dL/dx (before the mask) and dL/dmask summed over the
    ``count`` channels, from the four corners at a00 (``pad``) and dL/dsample (``grad_cols``
    from ``src``); with ``write_cols`` the samples too, into ``cols`` from ``src - shift``."""
    zero = grad_cols.dtype.type(0.0)
    acc_y = zero
    acc_x = zero
    acc_m = zero
    dst = np.uint64(src - shift)
    src = np.uint64(src)
    a00 = np.uint64(a00)
    a01 = a00 + np.uint64(col)
    a10 = a00 + np.uint64(row)
    a11 = a10 + np.uint64(col)
    if write_cols:
        for c in range(np.uint64(count)):
            ge = grad_cols[src + c]
            va = pad[a00 + c]
            vb = pad[a01 + c]
            vc = pad[a10 + c]
            vd = pad[a11 + c]
            top = va + lx * (vb - va)
            bottom = vc + lx * (vd - vc)
            value = top + ly * (bottom - top)
            cols[dst + c] = m * value
            acc_m += ge * value
            acc_y += ge * (bottom - top)
            acc_x += ge * (hy * (vb - va) + ly * (vd - vc))
    else:
        for c in range(np.uint64(count)):
            ge = grad_cols[src + c]
            va = pad[a00 + c]
            vb = pad[a01 + c]
            vc = pad[a10 + c]
            vd = pad[a11 + c]
            top = va + lx * (vb - va)
            bottom = vc + lx * (vd - vc)
            acc_m += ge * (top + ly * (bottom - top))
            acc_y += ge * (bottom - top)
            acc_x += ge * (hy * (vb - va) + ly * (vd - vc))
    return acc_y, acc_x, acc_m


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _reduce4_vector(grad_cols, src, pad, a00, col, row, ly, lx, hy, write_cols, cols, shift, m,
                    width):  # fmt: skip
    """``_reduce4`` of a constant ``width`` of 16 or 32 channels, by its intrinsic."""
    if width == 32:
        return _reduce32(grad_cols, src, pad, a00, col, row, ly, lx, hy, write_cols, cols, shift, m)
    return _reduce16(grad_cols, src, pad, a00, col, row, ly, lx, hy, write_cols, cols, shift, m)


#: Output positions whose taps are located in one go (whole tile rows of one image, or one).
_BLOCK = 256


@njit(nogil=True, cache=True, inline="always")
def _image_blocks(nb, rb, wb):
    """Blocks of each image's rows in a tile (``_block``): as few as keep them within about
    ``_BLOCK`` positions (the coordinate loops run in vectors of 32 and leave the rest to a slow
    scalar remainder: short blocks cost), and at least eight a tile where the rows allow it (a
    batch-1 map still splits between threads). It depends on the tile only, never on the
    threads."""
    most = max(1, _BLOCK // wb)
    return max((rb + most - 1) // most, min(rb, (nb + 7) // nb))


@njit(nogil=True, cache=True, inline="always")
def _block_rows(nb, rb, wb):
    """The most tile rows a block holds: what the kernels size a block's buffers by."""
    blocks = _image_blocks(nb, rb, wb)
    return (rb + blocks - 1) // blocks


def _block_count(tile) -> int:
    """Blocks of a tile (as ``_block``): the unit of work the kernels split between threads."""
    nb, rb, wb = tile[3:]
    return nb * _image_blocks(nb, rb, wb)


@njit(nogil=True, cache=True, inline="always")
def _block(tile, b):
    """First tile row ``item`` and row count of block ``b``. Blocks lie on a fixed grid whatever
    the threads: each image's rows in ``_image_blocks`` runs of near-equal length, the longer
    ones first. A position is then always located by the same code (the vector loop or its
    remainder), so results do not depend on the number of threads; and threads claiming blocks
    in order finish together (28 rows in blocks of 4, 4, 4, 4, 3, 3, 3, 3 rows split 14 / 14
    between two threads, where seven blocks of 4 split 16 / 12)."""
    rb = tile[4]
    per_image = _image_blocks(tile[3], rb, tile[5])
    nl = b // per_image
    j = b - nl * per_image
    rows, longer = rb // per_image, rb % per_image
    return nl * rb + j * rows + min(j, longer), rows + (1 if j < longer else 0)


@njit(nogil=True, cache=True, inline="always")
def _block_bases(geo, tile, item, rows, grid):
    """Regular-grid coordinates (before the kernel offset) of ``rows`` tile rows from ``item``:
    y and x of position q at ``grid[2 * q]`` and ``grid[2 * q + 1]`` (one array, see ``_taps``)."""
    sh, sw, ph, pw = geo[_SH], geo[_SW], geo[_PH], geo[_PW]
    r0, c0, rb, wb = tile[1], tile[2], tile[4], tile[5]
    ho = r0 + item % rb
    q = 0
    for r in range(rows):
        for wl in range(wb):
            grid[2 * q] = np.float64((ho + r) * sh - ph)
            grid[2 * q + 1] = np.float64((c0 + wl) * sw - pw)
            q += 1


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _taps(off, msk, has_mask, o_y, o_x, o_m, grid, dy, dx, geo, count, index, weight, s):
    """Corners and bilinear weights of one kernel tap at ``count`` consecutive output positions.

    The loop runs across positions (offsets are contiguous there), so it vectorises whatever the
    number of channels. Position q gets ``index[s + q]``, the flat offset in a padded image
    (``_padded``) of its top-left corner, and ``weight[4 * (s + q) + p]`` (p = 0..3), its
    bilinear weights times the mask, side by side as the blend reads them. A sample outside
    ``(-1, H) x (-1, W)`` gets zero weights and the corner of a block of padding, so it reads
    zeros without a branch. The index is computed in float64 (exact) and converted once: integer
    multiplies do not vectorise well.

    LLVM vectorises the loop only where a few runtime checks tell its stores from its loads:
    weights written in four planes (``weight[s + q + p * stride]``, the stride unknown to it)
    or the grid read from two arrays kept it scalar (measured: 7 ns a position and tap, against
    1.5 ns vectorised).
    """
    height, width, channels = geo[_H], geo[_W], geo[_C]
    rowf = np.float64((width + 2) * channels)
    colf = np.float64(channels)
    outside = np.float64((height + 1) * (width + 2) * channels)
    fh = np.float64(height)
    fw = np.float64(width)
    cast = weight.dtype.type
    o_y, o_x, o_m = np.uint64(o_y), np.uint64(o_x), np.uint64(o_m)
    s = np.uint64(s)
    for q in range(np.uint64(count)):
        yy = grid[np.uint64(2) * q] + dy + off[o_y + q]
        xx = grid[np.uint64(2) * q + np.uint64(1)] + dx + off[o_x + q]
        m = msk[o_m + q] if has_mask else 1.0
        inside = (yy > -1.0) & (yy < fh) & (xx > -1.0) & (xx < fw)
        yf = math.floor(yy)
        xf = math.floor(xx)
        corner = (yf + 1.0) * rowf + (xf + 1.0) * colf
        index[s + q] = int(corner if inside else outside)
        # selecting the fractions and the mask (not the four weights) vectorises better; zeros
        # outside also keep NaN coordinates from reaching the weights
        ly = yy - yf if inside else 0.0
        lx = xx - xf if inside else 0.0
        mm = np.float64(m) if inside else 0.0
        w = np.uint64(4) * (s + q)
        weight[w] = cast((1.0 - ly) * (1.0 - lx) * mm)
        weight[w + np.uint64(1)] = cast((1.0 - ly) * lx * mm)
        weight[w + np.uint64(2)] = cast(ly * (1.0 - lx) * mm)
        weight[w + np.uint64(3)] = cast(ly * lx * mm)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _taps_backward(off, msk, has_mask, o_y, o_x, o_m, grid, dy, dx, geo, count, index, frac, s,
                   weights):  # fmt: skip
    """As ``_taps`` for the backward: the band includes -1 (the one-sided derivative there,
    torchvision's convention); ``frac[span * (s + q) + p]`` (``span`` = 4, or 8 with
    ``weights``) holds for p = 0..3 the fractions ly and lx, the mask and the padded row of the
    top corners (-1 outside the band), and with ``weights`` for p = 4..7 the four bilinear
    weights times the mask. Outside the band every one of them but the row is zero, and the
    corner a block of padding."""
    height, width, channels = geo[_H], geo[_W], geo[_C]
    rowf = np.float64((width + 2) * channels)
    colf = np.float64(channels)
    outside = np.float64((height + 1) * (width + 2) * channels)
    fh = np.float64(height)
    fw = np.float64(width)
    cast = frac.dtype.type
    o_y, o_x, o_m = np.uint64(o_y), np.uint64(o_x), np.uint64(o_m)
    s = np.uint64(s)
    span = np.uint64(8 if weights else 4)
    for q in range(np.uint64(count)):
        yy = grid[np.uint64(2) * q] + dy + off[o_y + q]
        xx = grid[np.uint64(2) * q + np.uint64(1)] + dx + off[o_x + q]
        m = msk[o_m + q] if has_mask else 1.0
        inside = (yy >= -1.0) & (yy < fh) & (xx >= -1.0) & (xx < fw)
        yf = math.floor(yy)
        xf = math.floor(xx)
        corner = (yf + 1.0) * rowf + (xf + 1.0) * colf
        index[s + q] = int(corner if inside else outside)
        ly = yy - yf if inside else 0.0
        lx = xx - xf if inside else 0.0
        mm = np.float64(m) if inside else 0.0
        f = span * (s + q)
        frac[f] = cast(ly)
        frac[f + np.uint64(1)] = cast(lx)
        frac[f + np.uint64(2)] = cast(mm)
        frac[f + np.uint64(3)] = cast(yf + 1.0 if inside else -1.0)
        if weights:
            frac[f + np.uint64(4)] = cast((1.0 - ly) * (1.0 - lx) * mm)
            frac[f + np.uint64(5)] = cast((1.0 - ly) * lx * mm)
            frac[f + np.uint64(6)] = cast(ly * (1.0 - lx) * mm)
            frac[f + np.uint64(7)] = cast(ly * lx * mm)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _locate_block(off, msk, has_mask, geo, tile, item, rows, grid, index, values, backward,
                  weights):  # fmt: skip
    """Every tap of a block: ``_taps`` (or ``_taps_backward``) for each (group, tap), their
    positions at ``(g * K + k) * count + q``. Returns the block's first position in its plane."""
    out_w, groups, kh, kw = geo[_OW], geo[_G], geo[_KH], geo[_KW]
    dh, dw = geo[_DH], geo[_DW]
    plane = geo[_OH] * out_w
    taps = kh * kw
    n0, r0, c0, rb, wb = tile[0], tile[1], tile[2], tile[4], tile[5]
    nl = item // rb
    n = n0 + nl
    count = rows * wb
    _block_bases(geo, tile, item, rows, grid)
    first = (r0 + item - nl * rb) * out_w + c0  # the block's positions are consecutive
    for gk in range(groups * taps):
        g = gk // taps
        k = gk - g * taps
        i = k // kw
        at = (n * groups + g) * taps + k
        dy = np.float64(i * dh)
        dx = np.float64((k - i * kw) * dw)
        if backward:
            _taps_backward(off, msk, has_mask, 2 * at * plane + first, (2 * at + 1) * plane + first,
                           at * plane + first, grid, dy, dx, geo, count, index, values, gk * count,
                           weights)  # fmt: skip
        else:
            _taps(off, msk, has_mask, 2 * at * plane + first, (2 * at + 1) * plane + first,
                  at * plane + first, grid, dy, dx, geo, count, index, values, gk * count)
    return first


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _blend_rows(out, pad, image, index, weight, geo, dest, lay, item, rows, wb, cpg):
    """The loops of ``_blend_block_simple``, ``cpg`` channels a group."""
    channels, groups, kw = geo[_C], geo[_G], geo[_KW]
    taps = geo[_KH] * kw
    s_row, s_wl, s_i, s_j = lay[0], lay[1], lay[2], lay[3]
    col = np.uint64(channels)
    row = np.uint64((geo[_W] + 2) * channels)
    count = rows * wb
    step = np.uint64(taps * count)  # from one group's taps to the next one's
    q = 0
    for r in range(rows):
        for wl in range(wb):
            at = (item + r) * s_row + wl * s_wl
            i = 0
            j = 0
            for k in range(taps):
                # unsigned: numba's handling of negative indices costs a few instructions a load
                t = np.uint64(k * count + q)
                for g in range(groups):
                    a = np.uint64(image + index[t] + g * cpg)
                    o = np.uint64(at + i * s_i + j * s_j + dest[g])
                    w = np.uint64(4) * t
                    w00, w01 = weight[w], weight[w + np.uint64(1)]
                    w10, w11 = weight[w + np.uint64(2)], weight[w + np.uint64(3)]
                    _blend_width(out, o, pad, a, row, col, w00, w01, w10, w11, cpg)
                    t += step
                j += 1
                if j == kw:
                    i += 1
                    j = 0
            q += 1


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _blend_block_simple(out, pad, image, index, weight, geo, dest, lay, item, rows, wb):
    """``_blend_block`` when every offset group is one run of channels, written contiguously;
    the common widths are constants of the whole loop nest."""
    cpg = geo[_C] // geo[_G]
    if cpg == 32:
        _blend_rows(out, pad, image, index, weight, geo, dest, lay, item, rows, wb, 32)
    elif cpg == 64:
        _blend_rows(out, pad, image, index, weight, geo, dest, lay, item, rows, wb, 64)
    elif cpg == 16:
        _blend_rows(out, pad, image, index, weight, geo, dest, lay, item, rows, wb, 16)
    else:
        _blend_rows(out, pad, image, index, weight, geo, dest, lay, item, rows, wb, cpg)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _blend_block(out, pad, image, index, weight, geo, runs, dest, lay, item, rows, wb):
    """The samples of a block of positions (``_sample``) from its taps' corners and weights.

    A function of its own, not inlined: LLVM keeps this loop nest's registers to itself, which
    made it about a fifth faster than inside ``_sample``.
    """
    channels, groups, kh, kw = geo[_C], geo[_G], geo[_KH], geo[_KW]
    taps = kh * kw
    s_row, s_wl, s_i, s_j, s_c = lay[0], lay[1], lay[2], lay[3], lay[5]
    row = (geo[_W] + 2) * channels
    count = rows * wb
    q = 0
    for r in range(rows):
        for wl in range(wb):
            at = (item + r) * s_row + wl * s_wl
            k = 0
            for i in range(kh):
                for j in range(kw):
                    base = at + i * s_i + j * s_j
                    t = k * count + q
                    for g in range(groups):
                        corner = image + index[t]
                        w00, w01 = weight[4 * t], weight[4 * t + 1]
                        w10, w11 = weight[4 * t + 2], weight[4 * t + 3]
                        for r_ in range(runs[g], runs[g + 1]):
                            if s_c == 1:
                                _blend_width(out, base + dest[r_], pad,
                                             corner + runs[_RUNS + 3 * r_], row, channels, w00,
                                             w01, w10, w11, runs[_RUNS + 3 * r_ + 1])  # fmt: skip
                            else:
                                _blend4_strided(out, base + dest[r_], s_c, pad,
                                                corner + runs[_RUNS + 3 * r_], row, channels, w00,
                                                w01, w10, w11, runs[_RUNS + 3 * r_ + 1])  # fmt: skip
                        t += taps * count
                    k += 1
            q += 1


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _blend_block_channel_major(out, pad, image, index, weight, geo, lay, item, rows, wb, local):
    """``_blend_block`` for columns in the weight's (channel, tap) order (``s_c`` = taps,
    ``s_j`` = 1): each position's samples blended channels innermost into ``local`` [taps, C]
    (contiguous, the vector code of ``_blend_rows``), then transposed into the position's
    [cw, taps] block of each weight group (``_transpose``). Writing them straight at a stride of
    the taps cost a scalar store each: measured about twice as slow."""
    channels, groups, cw = geo[_C], geo[_G], geo[_CW]
    taps = geo[_KH] * geo[_KW]
    cpg = channels // groups
    s_row, s_wl, s_g = lay[0], lay[1], lay[4]
    col = np.uint64(channels)
    row = np.uint64((geo[_W] + 2) * channels)
    count = rows * wb
    q = 0
    for r in range(rows):
        for wl in range(wb):
            at = (item + r) * s_row + wl * s_wl
            for k in range(taps):
                t = np.uint64(k * count + q)
                for g in range(groups):
                    w = np.uint64(4) * t
                    _blend_width(local, k * channels + g * cpg, pad, image + index[t] + g * cpg,
                                 row, col, weight[w], weight[w + np.uint64(1)],
                                 weight[w + np.uint64(2)], weight[w + np.uint64(3)],
                                 cpg)  # fmt: skip
                    t += np.uint64(taps * count)
            for gw in range(channels // cw):
                _transpose(out, at + gw * s_g, taps, local, gw * cw, channels, cw, taps)
            q += 1


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _sample(pad, off, msk, has_mask, geo, runs, tile, lay, out, chunk, chunks):
    """Write mask * bilinear(input, p0 + p_k + offset) for one tile into ``out``.

    Flat arrays: pad [N, H+3, W+2, C] (``_padded``), off [N, 2*G*K, Ho, Wo], msk [N, G*K, Ho, Wo].
    ``tile`` is (n0, r0, c0, nb, rb, wb); the sample of channel c (weight group gw = c // cw) at
    tap (i, j) of tile position (nl, rl, wl) goes to
    ``out[(nl*rb + rl)*s_row + wl*s_wl + i*s_i + j*s_j + gw*s_g + (c % cw)*s_c]``, ``lay``
    holding (s_row, s_wl, s_i, s_j, s_g, s_c). ``runs`` lists the channel runs (see
    ``_channel_runs``). The chunk does its share of the tile's blocks (``_block``).

    By blocks of output positions: first the corners and weights of every tap (``_taps``,
    vectorised across positions), then the samples, channels innermost (vectorised across
    channels). The padding makes every corner readable, so the channel loop has no branch.
    """
    channels, groups, taps = geo[_C], geo[_G], geo[_KH] * geo[_KW]
    n0, rb, wb = tile[0], tile[4], tile[5]
    dest = _run_destinations(runs, lay[4], geo[_CW], lay[5])
    # every offset group one run of channels, written contiguously: the common case
    simple = lay[5] == 1 and runs.size - _RUNS == 3 * groups
    channel_major = taps > 1 and lay[5] == taps and lay[3] == 1 and lay[2] == geo[_KW]
    local = np.empty(taps * channels if channel_major else 0, dtype=out.dtype)
    image_size = (geo[_H] + 3) * (geo[_W] + 2) * channels
    block_rows = _block_rows(tile[3], rb, wb)
    located = groups * taps * block_rows * wb  # (group, tap, position) of a block
    index = np.empty(located, dtype=np.int64)
    weight = np.empty(4 * located, dtype=out.dtype)
    grid = np.empty(2 * block_rows * wb, dtype=np.float64)
    blocks = tile[3] * _image_blocks(tile[3], rb, wb)
    for b in range(blocks * chunk // chunks, blocks * (chunk + 1) // chunks):
        item, rows = _block(tile, b)
        _locate_block(off, msk, has_mask, geo, tile, item, rows, grid, index, weight, False, True)
        image = (n0 + item // rb) * image_size
        if channel_major:
            _blend_block_channel_major(out, pad, image, index, weight, geo, lay, item, rows, wb,
                                       local)  # fmt: skip
        elif simple:
            _blend_block_simple(out, pad, image, index, weight, geo, dest, lay, item, rows, wb)
        else:
            _blend_block(out, pad, image, index, weight, geo, runs, dest, lay, item, rows, wb)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _reduce_rows(pad, grad_cols, write_cols, cols, shift, image, index, frac, span, stride, geo,
                 dest, lay, item, rows, wb, sums, cpg):  # fmt: skip
    """The loops of ``_backward_reduce_simple``, ``cpg`` channels a group: a constant 16 or 32
    (the vector intrinsics), or -1 for a variable width (numba's loop)."""
    channels, groups, kw = geo[_C], geo[_G], geo[_KW]
    width = channels // groups
    taps = geo[_KH] * kw
    s_row, s_wl, s_i, s_j = lay[0], lay[1], lay[2], lay[3]
    row = (geo[_W] + 2) * channels
    count = rows * wb
    step = np.uint64(taps * count)  # from one group's taps to the next one's
    one = grad_cols.dtype.type(1.0)
    u1, u2, uspan = np.uint64(1), np.uint64(2), np.uint64(span)
    ustride = np.uint64(stride)
    q = 0
    for r in range(rows):
        for wl in range(wb):
            at = (item + r) * s_row + wl * s_wl
            i = 0
            j = 0
            for k in range(taps):
                s = np.uint64(k * count + q)  # unsigned, as in _blend_rows
                for g in range(groups):
                    ly, lx, m = frac[uspan * s], frac[uspan * s + u1], frac[uspan * s + u2]
                    o = at + i * s_i + j * s_j + dest[g]
                    a = image + index[s] + g * width
                    if cpg < 0:
                        acc_y, acc_x, acc_m = _reduce4(grad_cols, o, pad, a, channels, row, ly,
                                                       lx, one - ly, write_cols, cols, shift, m,
                                                       width)  # fmt: skip
                    else:
                        acc_y, acc_x, acc_m = _reduce4_vector(grad_cols, o, pad, a, channels, row,
                                                              ly, lx, one - ly, write_cols, cols,
                                                              shift, m, cpg)  # fmt: skip
                    sums[s] = acc_y * m
                    sums[s + ustride] = acc_x * m
                    sums[s + u2 * ustride] = acc_m
                    s += step
                j += 1
                if j == kw:
                    i += 1
                    j = 0
            q += 1


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_reduce_simple(pad, grad_cols, write_cols, cols, shift, image, index, frac, span,
                            stride, geo, dest, lay, item, rows, wb, sums):  # fmt: skip
    """``_backward_reduce`` when every offset group is one run of channels (the common case).
    Widths 16 and 32 run as vector intrinsics whose sums have their order written in their IR,
    each in a loop nest of its own (one nest holding every width's code ran 20 % slower than
    numba's loop; with 64 channels the intrinsics were no faster). Other widths keep that loop, its width a variable: its sums run under
    ``fastmath``, and with constant widths the order LLVM gave them differed between a fresh
    compilation and numba's cache, so a resumed training run drifted from an uninterrupted one
    (the test ``test_a_run_is_the_same_whether_numba_compiles_or_loads_its_cache``)."""
    cpg = geo[_C] // geo[_G]
    if cpg == 32:
        _reduce_rows(pad, grad_cols, write_cols, cols, shift, image, index, frac, span, stride,
                     geo, dest, lay, item, rows, wb, sums, 32)
    elif cpg == 16:
        _reduce_rows(pad, grad_cols, write_cols, cols, shift, image, index, frac, span, stride,
                     geo, dest, lay, item, rows, wb, sums, 16)
    else:
        _reduce_rows(pad, grad_cols, write_cols, cols, shift, image, index, frac, span, stride,
                     geo, dest, lay, item, rows, wb, sums, -1)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_reduce(pad, grad_cols, write_cols, cols, shift, image, index, frac, span, stride, geo,
                     runs, dest, lay, item, rows, wb, sums):  # fmt: skip
    """The channel work of ``_backward_taps`` for a block: per tap, dL/dy and dL/dx (times the
    mask) and dL/dmask into ``sums[s + p * stride]`` (p = 0, 1, 2), and with ``write_cols`` the
    samples themselves. A function of its own, as ``_blend_block``."""
    channels, groups, kh, kw = geo[_C], geo[_G], geo[_KH], geo[_KW]
    taps = kh * kw
    s_row, s_wl, s_i, s_j = lay[0], lay[1], lay[2], lay[3]
    row = (geo[_W] + 2) * channels
    count = rows * wb
    cast = grad_cols.dtype.type
    zero = cast(0.0)
    one = cast(1.0)
    q = 0
    for r in range(rows):
        for wl in range(wb):
            at = (item + r) * s_row + wl * s_wl
            i = 0
            j = 0
            for k in range(taps):
                base = at + i * s_i + j * s_j
                s = k * count + q
                for g in range(groups):
                    corner = image + index[s]
                    ly, lx, m = frac[span * s], frac[span * s + 1], frac[span * s + 2]
                    hy = one - ly
                    acc_y = zero
                    acc_x = zero
                    acc_m = zero
                    for r_ in range(runs[g], runs[g + 1]):
                        ry, rx, rm = _reduce4(grad_cols, base + dest[r_], pad,
                                                   corner + runs[_RUNS + 3 * r_], channels, row,
                                                   ly, lx, hy, write_cols, cols, shift, m,
                                                   runs[_RUNS + 3 * r_ + 1])  # fmt: skip
                        acc_y += ry
                        acc_x += rx
                        acc_m += rm
                    sums[s] = acc_y * m
                    sums[s + stride] = acc_x * m
                    sums[s + 2 * stride] = acc_m
                    s += taps * count
                j += 1
                if j == kw:
                    i += 1
                    j = 0
            q += 1


@njit(nogil=True, cache=True, inline="always")
def _block_samples(cols, cols_t, write_cols, block_rows, lay):
    """Where the backward's kernels write a block's samples: ``cols`` (the tile's, in the layout
    ``lay``), or where they go to ``cols_t`` transposed, a scratch row block of the layout."""
    if write_cols and cols_t.size > 0:
        return np.empty(block_rows * lay[0], dtype=cols.dtype)
    return cols


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _block_gradients(pad, off, msk, has_mask, geo, runs, tile, lay, grad_cols, write_cols, cols,
                     cols_t, grad_off, grad_msk, item, rows, grid, index, frac, sums, dest, simple,
                     weights, origin, local_cols):  # fmt: skip
    """Phase 1 for one block (``_backward_taps``): locates its taps into ``index`` / ``frac``
    (with ``weights``, the bilinear weights too: ``_taps_backward``), writes its dL/doffset and
    dL/dmask, and with ``write_cols`` its samples: into ``cols`` in the layout ``lay``, or where
    ``cols_t`` is not empty, into ``cols`` as the block's rows alone, then transposed into
    ``cols_t`` [K, P] while still in cache (``TRANSPOSED_SAMPLES_MAX_K``). ``grad_cols`` and
    ``cols`` start at tile row ``origin`` of the layout: 0, or ``item`` for buffers of the block
    alone (``_backward_blocks``); with ``local_cols``, ``cols`` holds the block's rows alone
    whatever ``origin`` (``_backward_blocks_taps``)."""
    out_w, groups, taps = geo[_OW], geo[_G], geo[_KH] * geo[_KW]
    plane = geo[_OH] * out_w
    n0, rb, wb = tile[0], tile[4], tile[5]
    image_size = (geo[_H] + 3) * (geo[_W] + 2) * geo[_C]
    stride = index.size  # (group, tap, position) of a block
    span = 8 if weights else 4
    count = rows * wb
    first = _locate_block(off, msk, has_mask, geo, tile, item, rows, grid, index, frac, True,
                          weights)  # fmt: skip
    n = n0 + item // rb
    transposed = write_cols and cols_t.size > 0
    at = item - origin  # the block's first row in grad_cols
    shift = at * lay[0] if transposed or local_cols else 0  # the block's first row of the layout
    if simple:
        _backward_reduce_simple(pad, grad_cols, write_cols, cols, shift, n * image_size, index,
                                frac, span, stride, geo, dest, lay, at, rows, wb, sums)  # fmt: skip
    else:
        _backward_reduce(pad, grad_cols, write_cols, cols, shift, n * image_size, index, frac,
                         span, stride, geo, runs, dest, lay, at, rows, wb, sums)  # fmt: skip
    if transposed:
        _transpose(cols_t, item * wb, tile[3] * rb * wb, cols, 0, lay[1], lay[1], count)
    # the block's offset / mask gradients: one contiguous run per (group, tap)
    for gk in range(groups * taps):
        at = n * groups * taps + gk
        o_y = np.uint64(2 * at * plane + first)
        o_m = np.uint64(at * plane + first)
        s = np.uint64(gk * count)
        for q in range(np.uint64(count)):
            grad_off[o_y + q] = sums[s + q]
            grad_off[o_y + np.uint64(plane) + q] = sums[s + np.uint64(stride) + q]
            grad_msk[o_m + q] = sums[s + np.uint64(2 * stride) + q]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_taps(pad, off, msk, has_mask, geo, runs, tile, lay, grad_cols, write_cols, cols,
                   grad_off, grad_msk, item_rows, cols_t, chunk, chunks):  # fmt: skip
    """Phase 1 of the backward, over this chunk's blocks of the tile (``_block``).

    ``grad_cols`` is dL/d(samples) in the layout ``lay`` of ``_sample`` (channels contiguous).
    Writes dL/doffset and dL/dmask of the chunk's positions into ``grad_off`` / ``grad_msk``
    (flat, the layouts of off / msk); with ``write_cols``, the samples themselves into ``cols``
    (the layout of ``grad_cols``: the weight gradient's operand, from the corners this pass reads
    anyway); and for each tile row ``item`` the range of the padded rows its taps' top corners
    lie on, in ``item_rows[2 * item : 2 * item + 2]`` (empty, (H + 3, -1), if none samples).
    Where ``cols_t`` is not empty the samples go there instead, transposed (``_block_gradients``).
    """
    groups, taps = geo[_G], geo[_KH] * geo[_KW]
    rb, wb = tile[4], tile[5]
    dest = _run_destinations(runs, lay[4], geo[_CW], lay[5])
    simple = runs.size - _RUNS == 3 * groups  # every offset group one run of channels
    image_rows = geo[_H] + 3
    block_rows = _block_rows(tile[3], rb, wb)
    stride = groups * taps * block_rows * wb  # (group, tap, position) of a block
    index = np.empty(stride, dtype=np.int64)
    frac = np.empty(4 * stride, dtype=grad_cols.dtype)
    sums = np.empty(3 * stride, dtype=grad_cols.dtype)
    grid = np.empty(2 * block_rows * wb, dtype=np.float64)
    samples = _block_samples(cols, cols_t, write_cols, block_rows, lay)
    blocks = tile[3] * _image_blocks(tile[3], rb, wb)
    for b in range(blocks * chunk // chunks, blocks * (chunk + 1) // chunks):
        item, rows = _block(tile, b)
        _block_gradients(pad, off, msk, has_mask, geo, runs, tile, lay, grad_cols, write_cols,
                         samples, cols_t, grad_off, grad_msk, item, rows, grid, index, frac, sums,
                         dest, simple, False, 0, False)  # fmt: skip
        _block_item_rows(frac, item_rows, item, rows, wb, groups * taps, image_rows)


@njit(nogil=True, cache=True, inline="always")
def _block_item_rows(frac, item_rows, item, rows, wb, group_taps, image_rows):
    """For each tile row of a located block (``_taps_backward`` with a span of 4), the range of
    padded rows its taps' top corners lie on, into ``item_rows`` (see ``_backward_taps``)."""
    count = rows * wb
    for r in range(rows):
        lowest = np.float64(image_rows)
        highest = -1.0
        for gk in range(group_taps):
            s = np.uint64(gk * count + r * wb)
            for wl in range(np.uint64(wb)):
                top = np.float64(frac[np.uint64(4) * (s + wl) + np.uint64(3)])
                lowest = min(lowest, top) if top >= 0.0 else lowest
                highest = max(highest, top)
        item_rows[2 * (item + r)] = int(lowest)
        item_rows[2 * (item + r) + 1] = int(highest)


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _scatter_rows(grad_pad, grad_cols, geo, runs, dest, lay, item, rows, wb, index, frac, image,
                  first_row, lo, hi, width):  # fmt: skip
    """The input gradient's share of one located block (``_locate_block`` with weights): each
    tap's dL/dsample times its bilinear weights, added to the padded rows ``lo:hi`` (numbered
    as in ``_backward_input``, the block's image's row 0 being ``first_row``), in the order
    (position, tap, group). ``width``: the channels of every run, a constant 16 or 32 (their
    vector intrinsics), or -1 for runs of any width (numba's loops)."""
    channels, groups, kw = geo[_C], geo[_G], geo[_KW]
    taps = geo[_KH] * kw
    s_row, s_wl, s_i, s_j = lay[0], lay[1], lay[2], lay[3]
    row = (geo[_W] + 2) * channels
    count = rows * wb
    q = 0
    for r in range(rows):
        for wl in range(wb):
            at = (item + r) * s_row + wl * s_wl
            i = 0
            j = 0
            for k in range(taps):
                base = at + i * s_i + j * s_j
                s = k * count + q
                for g in range(groups):
                    top = first_row + int(frac[8 * s + 3])
                    if frac[8 * s + 3] >= 0.0 and top + 1 >= lo and top < hi:
                        corner = image + index[s]
                        w00, w01 = frac[8 * s + 4], frac[8 * s + 5]
                        w10, w11 = frac[8 * s + 6], frac[8 * s + 7]
                        for r_ in range(runs[g], runs[g + 1]):
                            a = corner + runs[_RUNS + 3 * r_]
                            src = base + dest[r_]
                            n_c = runs[_RUNS + 3 * r_ + 1]
                            if top >= lo:
                                _axpy2_of(grad_pad, a, channels, w00, w01, grad_cols, src, n_c,
                                          width)  # fmt: skip
                            if top + 1 < hi:
                                _axpy2_of(grad_pad, a + row, channels, w10, w11, grad_cols, src,
                                          n_c, width)  # fmt: skip
                    s += taps * count
                j += 1
                if j == kw:
                    i += 1
                    j = 0
            q += 1


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _scatter_taps(grad_pad, grad_cols, geo, runs, dest, lay, item, rows, wb, index, frac, image,
                  first_row, lo, hi):  # fmt: skip
    """``_scatter_rows``, in a loop nest of its own for each vector width (where every offset
    group is one run of 16 or 32 channels) and one for the rest."""
    groups = geo[_G]
    cpg = geo[_C] // groups
    if runs.size - _RUNS == 3 * groups and cpg == 32:
        _scatter_rows(grad_pad, grad_cols, geo, runs, dest, lay, item, rows, wb, index, frac,
                      image, first_row, lo, hi, 32)  # fmt: skip
    elif runs.size - _RUNS == 3 * groups and cpg == 16:
        _scatter_rows(grad_pad, grad_cols, geo, runs, dest, lay, item, rows, wb, index, frac,
                      image, first_row, lo, hi, 16)  # fmt: skip
    else:
        _scatter_rows(grad_pad, grad_cols, geo, runs, dest, lay, item, rows, wb, index, frac,
                      image, first_row, lo, hi, -1)  # fmt: skip


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_input(off, msk, has_mask, geo, runs, tile, lay, grad_cols, item_rows, grad_pad,
                    chunk, chunks):  # fmt: skip
    """Phase 2: scatter dL/d(samples) into the padded input gradient (flat [N, H+3, W+2, C]).

    The chunk owns a band of padded rows of the tile's images. It walks every block whose taps
    touch the band (``item_rows``), locates its taps again (cheaper than keeping a table of
    them), and adds only into its own rows: no two threads write one element, and each element
    receives its contributions in tap order whatever the number of threads (bit-identical
    results). Corners in the padding get their share too; the caller drops the padding.
    """
    groups, taps = geo[_G], geo[_KH] * geo[_KW]
    n0, nb, rb, wb = tile[0], tile[3], tile[4], tile[5]
    dest = _run_destinations(runs, lay[4], geo[_CW], lay[5])
    row = (geo[_W] + 2) * geo[_C]
    image_rows = geo[_H] + 3
    rows_all = nb * image_rows  # padded rows of the tile's images, numbered (nl * (H + 3) + y)
    lo = rows_all * chunk // chunks
    hi = rows_all * (chunk + 1) // chunks
    if hi <= lo:
        return
    block_rows = _block_rows(tile[3], rb, wb)
    located = groups * taps * block_rows * wb  # (group, tap, position) of a block
    index = np.empty(located, dtype=np.int64)
    frac = np.empty(8 * located, dtype=grad_cols.dtype)
    grid = np.empty(2 * block_rows * wb, dtype=np.float64)
    blocks = nb * _image_blocks(nb, rb, wb)
    for b in range(blocks):
        item, rows = _block(tile, b)
        first_row = (item // rb) * image_rows  # this image's row 0 in the numbering above
        touches = False
        for r in range(rows):
            low, high = item_rows[2 * (item + r)], item_rows[2 * (item + r) + 1]
            if first_row + high + 1 >= lo and first_row + low < hi:
                touches = True
        if not touches:
            continue
        _locate_block(off, msk, has_mask, geo, tile, item, rows, grid, index, frac, True, True)
        image = (n0 + item // rb) * image_rows * row
        _scatter_taps(grad_pad, grad_cols, geo, runs, dest, lay, item, rows, wb, index, frac, image,
                      first_row, lo, hi)  # fmt: skip


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_fused(pad, off, msk, has_mask, geo, runs, tile, lay, grad_cols, write_cols, cols,
                    grad_off, grad_msk, grad_pad, cols_t, chunk, chunks):  # fmt: skip
    """Both phases of the backward in one pass, over this chunk's images of the tile.

    A thread that owns whole images owns their rows of the input gradient too: it can add each
    block's taps into them as soon as it has located them (``_block_gradients`` with the
    bilinear weights, then ``_scatter_taps``), reading dL/dsamples once and locating each tap
    once, where the two phases read and locate twice. Every element of the input gradient gets
    its contributions in the order of the two phases (block, position, tap, group): the same
    results, bit for bit. Worth it on tiles of many images (``FUSED_BACKWARD_IMAGES``), which
    split between threads by images.
    """
    groups, taps = geo[_G], geo[_KH] * geo[_KW]
    n0, nb, rb, wb = tile[0], tile[3], tile[4], tile[5]
    dest = _run_destinations(runs, lay[4], geo[_CW], lay[5])
    simple = runs.size - _RUNS == 3 * groups  # every offset group one run of channels
    image_rows = geo[_H] + 3
    row = (geo[_W] + 2) * geo[_C]
    block_rows = _block_rows(nb, rb, wb)
    per_image = _image_blocks(nb, rb, wb)  # blocks of an image (as ``_block``)
    stride = groups * taps * block_rows * wb  # (group, tap, position) of a block
    index = np.empty(stride, dtype=np.int64)
    frac = np.empty(8 * stride, dtype=grad_cols.dtype)
    sums = np.empty(3 * stride, dtype=grad_cols.dtype)
    grid = np.empty(2 * block_rows * wb, dtype=np.float64)
    samples = _block_samples(cols, cols_t, write_cols, block_rows, lay)
    for nl in range(nb * chunk // chunks, nb * (chunk + 1) // chunks):
        first_row = nl * image_rows
        image = (n0 + nl) * image_rows * row
        for b in range(nl * per_image, (nl + 1) * per_image):
            item, rows = _block(tile, b)
            _block_gradients(pad, off, msk, has_mask, geo, runs, tile, lay, grad_cols, write_cols,
                             samples, cols_t, grad_off, grad_msk, item, rows, grid, index, frac,
                             sums, dest, simple, True, 0, False)  # fmt: skip
            _scatter_taps(grad_pad, grad_cols, geo, runs, dest, lay, item, rows, wb, index, frac,
                          image, first_row, first_row, first_row + image_rows)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The forward by blocks: MKL's GEMM called from the sampling kernel on each block of samples while
# it is in cache, no tile of samples in memory.


def _mkl_library() -> str:
    """The library torch links MKL into (Linux wheels)."""
    return os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")


def _mkl_functions():
    """Addresses of ``sgemm_``, ``dgemm_`` and ``mkl_set_num_threads_local_`` (MKL's Fortran
    interface: every argument by reference) in the MKL that torch links into libtorch_cpu, as an
    int64 array; None where torch has no MKL (ARM, macOS builds)."""
    import ctypes

    try:
        lib = ctypes.CDLL(_mkl_library())
        names = ("sgemm_", "dgemm_", "mkl_set_num_threads_local_")
        return np.array([ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in names],
                        dtype=np.int64)  # fmt: skip
    except (OSError, AttributeError):
        return None


_MKL = _mkl_functions()


def _intel_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            return "GenuineIntel" in f.read(4096)
    except OSError:
        return False


@intrinsic
def _call_gemm(typingctx, function, pointers):
    """``function(*pointers)``: a Fortran-interface GEMM at address ``function`` called with its
    13 arguments' addresses."""

    def codegen(context, builder, signature, args):
        voidptr = cgutils.voidptr_t
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [voidptr] * 13)
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        builder.call(fn, [builder.inttoptr(builder.extract_value(args[1], i), voidptr)
                          for i in range(13)])  # fmt: skip
        return context.get_dummy_value()

    return types.void(types.int64, types.UniTuple(types.int64, 13)), codegen


@intrinsic
def _call_int(typingctx, function, address):
    """``function(address)`` returning a C int (MKL's Fortran-interface thread setting)."""

    def codegen(context, builder, signature, args):
        fnty = llvm_ir.FunctionType(llvm_ir.IntType(32), [cgutils.voidptr_t])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        return builder.call(fn, [builder.inttoptr(args[1], cgutils.voidptr_t)])

    return types.int32(types.int64, types.int64), codegen


@njit(nogil=True, cache=True, inline="always")
def _address_of(a):
    return np.int64(a.ctypes.data)


@njit(nogil=True, cache=True, inline="always")
def _blas_arguments(like):
    """What the block kernels hand MKL's Fortran GEMM by reference, in arrays of their own: m,
    n, k, lda, ldb, ldc and two thread counts (``ints``); 'N' and 'T' (``chars``); 1, 0, 1 of
    ``like``'s dtype (alpha, beta, beta accumulating: ``scalars``)."""
    ints = np.empty(8, dtype=np.int32)
    chars = np.empty(2, dtype=np.uint8)
    chars[0] = 78  # 'N'
    chars[1] = 84  # 'T'
    scalars = np.ones(3, dtype=like.dtype)
    scalars[1] = 0.0
    return ints, chars, scalars


@njit(nogil=True, cache=True, inline="always")
def _blas_threads(mkl, ints, one):
    """With ``one``, MKL on this thread alone (``mkl_set_num_threads_local``: its GEMMs are then
    one fixed sequence of operations whatever the threads around), keeping the thread's setting
    in ``ints[7]``; without, that setting back."""
    if one:
        ints[6] = 1
        ints[7] = _call_int(mkl[2], _address_of(ints) + 24)
    else:
        _call_int(mkl[2], _address_of(ints) + 28)


@njit(nogil=True, cache=True, inline="always")
def _blas_gemm(gemm, ints, chars, scalars, trans_a, trans_b, m, n, k, a, lda, b, ldb, accumulate,
               c, ldc):  # fmt: skip
    """C = op(A) op(B) (+ C with ``accumulate``), column major, by the Fortran GEMM at ``gemm``;
    ``a``, ``b``, ``c`` addresses, ``trans_a`` / ``trans_b`` 0 ('N') or 1 ('T')."""
    ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = m, n, k, lda, ldb, ldc
    i, t, f = _address_of(ints), _address_of(chars), _address_of(scalars)
    beta = f + scalars.itemsize * (2 if accumulate else 1)
    _call_gemm(gemm, (t + trans_a, t + trans_b, i, i + 4, i + 8, f, a, i + 12, b, i + 16, beta, c,
                      i + 20))  # fmt: skip


@njit(nogil=True, cache=True, inline="always")
def _aligned(numel, like):
    """An uninitialised array of ``numel`` elements of ``like``'s dtype at a 64-byte boundary."""
    raw = np.empty(numel + 64 // like.itemsize, dtype=like.dtype)
    skip = (-_address_of(raw)) % 64 // raw.itemsize
    return raw[skip : skip + numel]


@njit(nogil=True, cache=True, inline="always")
def _dout(g_at, n, first, gw, cog, cout, plane, size, grad_channels_last):
    """Address of dL/dout of weight group ``gw`` at position ``first`` of image ``n``'s plane,
    and its leading dimension: [P, Cout] rows (channels last) or the [Cout, P] planes."""
    if grad_channels_last:
        return g_at + ((n * plane + first) * cout + gw * cog) * size, cout
    return g_at + ((n * cout + gw * cog) * plane + first) * size, plane


@njit(nogil=True, cache=True, inline="always")
def _block_sample_gradients(blas, w_at, g_at, gc_at, ldc, n, first, count, geometry,
                            grad_channels_last):  # fmt: skip
    """A block's dL/dsamples by GEMM: each weight group's [Cout / wg, K] matrix times dL/dout of
    the block's ``count`` positions (from ``first`` of image ``n``), into ``gc_at`` (positions
    ``ldc`` apart). ``blas`` is (gemm, ints, chars, scalars), ``geometry`` (wg, cog, k, cout,
    plane, element size)."""
    gemm, ints, chars, scalars = blas
    wg, cog, k, cout, plane, size = geometry
    for gw in range(wg):
        g, ldg = _dout(g_at, n, first, gw, cog, cout, plane, size, grad_channels_last)
        _blas_gemm(gemm, ints, chars, scalars, 0, 0 if grad_channels_last else 1, k, count, cog,
                   w_at + gw * cog * k * size, k, g, ldg, False, gc_at + gw * k * size,
                   ldc)  # fmt: skip


@njit(nogil=True, cache=True, inline="always")
def _block_weight_gradient(blas, cols_at, g_at, dw_at, n, first, count, geometry,
                           grad_channels_last):  # fmt: skip
    """A block's share of the weight gradient by GEMM: dL/dout of its positions times its samples
    (``cols_at``, [P, wg, K]), added into ``dw_at`` ([wg, Cout / wg, K])."""
    gemm, ints, chars, scalars = blas
    wg, cog, k, cout, plane, size = geometry
    for gw in range(wg):
        g, ldg = _dout(g_at, n, first, gw, cog, cout, plane, size, grad_channels_last)
        _blas_gemm(gemm, ints, chars, scalars, 0, 1 if grad_channels_last else 0, k, cog, count,
                   cols_at + gw * k * size, wg * k, g, ldg, True, dw_at + gw * cog * k * size,
                   k)  # fmt: skip


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _forward_blocks(pad, off, msk, has_mask, geo, runs, tile, lay, w_mat, bias, has_bias, out,
                    channels_last, mkl, chunk, chunks):  # fmt: skip
    """The whole forward of this chunk's blocks of ``tile`` (every image, whole rows): each
    block's samples into a scratch of the thread's own, 64-byte aligned, in the column layout
    ``lay`` (``_sample``'s code), then each weight group's output block by MKL's GEMM on this
    thread alone (``_blas_threads``), straight into ``out`` (flat NCHW, or NHWC with
    ``channels_last``), then the bias.

    A block's output is one GEMM of fixed shape on one thread whatever the chunks: exact across
    thread counts. ``w_mat`` is [wg, Cout / wg, K] (``_Problem.weight_matrix``), ``mkl`` the
    addresses of ``_mkl_functions``."""
    channels, groups, taps, cw = geo[_C], geo[_G], geo[_KH] * geo[_KW], geo[_CW]
    rb, wb = tile[4], tile[5]
    plane = geo[_OH] * geo[_OW]
    k = taps * cw
    wg = channels // cw
    cout = w_mat.size // k
    cog = cout // wg
    size = np.int64(out.itemsize)
    dest = _run_destinations(runs, lay[4], cw, lay[5])
    simple = runs.size - _RUNS == 3 * groups  # every offset group one run of channels
    image_size = (geo[_H] + 3) * (geo[_W] + 2) * channels
    block_rows = _block_rows(tile[3], rb, wb)
    located = groups * taps * block_rows * wb
    index = np.empty(located, dtype=np.int64)
    weight = np.empty(4 * located, dtype=out.dtype)
    grid = np.empty(2 * block_rows * wb, dtype=np.float64)
    local = _aligned(block_rows * lay[0], out)
    # NCHW, where a block holds half its image or more: the block's [P, Cout] result, then
    # transposed into the planes (MKL's GEMM in this orientation ran 12-15 % faster than
    # writing the planes' rows itself, on 32-64 channels: the forward 5-10 % faster on 10x10
    # and 20x20 maps; 3 % slower on 28x28 and 56x56 maps in blocks of 4 rows)
    transposed = not channels_last and 2 * block_rows * wb >= plane
    rows_out = _aligned(block_rows * wb * cout if transposed else 0, out)
    ints, chars, scalars = _blas_arguments(out)
    gemm = mkl[1] if out.itemsize == 8 else mkl[0]
    _blas_threads(mkl, ints, True)
    samples, weights, out_at = _address_of(local), _address_of(w_mat), _address_of(out)
    rows_at = _address_of(rows_out)
    blocks = tile[3] * _image_blocks(tile[3], rb, wb)
    for b in range(blocks * chunk // chunks, blocks * (chunk + 1) // chunks):
        item, rows = _block(tile, b)
        first = _locate_block(off, msk, has_mask, geo, tile, item, rows, grid, index, weight,
                              False, True)  # fmt: skip
        n = item // rb
        if simple:
            _blend_block_simple(local, pad, n * image_size, index, weight, geo, dest, lay, 0, rows,
                                wb)  # fmt: skip
        else:
            _blend_block(local, pad, n * image_size, index, weight, geo, runs, dest, lay, 0, rows,
                         wb)  # fmt: skip
        count = rows * wb
        # [P, Cout] rows: the output's own (channels last), or the scratch to transpose
        rows_base = out_at + (n * plane + first) * cout * size if channels_last else rows_at
        for gw in range(wg):
            a = samples + gw * k * size
            w = weights + gw * cog * k * size
            if channels_last or transposed:  # [P, cog] (row major) = samples @ w.T
                c = rows_base + gw * cog * size
                _blas_gemm(gemm, ints, chars, scalars, 1, 0, cog, count, k, w, k, a, wg * k,
                           False, c, cout)  # fmt: skip
            else:  # out[cog, P] (row major, rows of the NCHW planes) = w @ samples.T
                c = out_at + ((n * cout + gw * cog) * plane + first) * size
                _blas_gemm(gemm, ints, chars, scalars, 1, 0, count, cog, k, a, wg * k, w, k,
                           False, c, plane)  # fmt: skip
        if transposed:
            _transpose(out, n * cout * plane + first, plane, rows_out, 0, cout, cout, count)
        if has_bias:
            for co in range(cout):
                if channels_last:
                    o = (n * plane + first) * cout + co
                    for q in range(count):
                        out[o + q * cout] += bias[co]
                else:
                    o = (n * cout + co) * plane + first
                    for q in range(count):
                        out[o + q] += bias[co]
    _blas_threads(mkl, ints, False)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_blocks(pad, off, msk, has_mask, geo, runs, tile, lay, w_mat, grad_out,
                     grad_channels_last, need_weight, need_input, grad_off, grad_msk, grad_pad,
                     grad_w, mkl, chunk, chunks):  # fmt: skip
    """The backward of the images of segment ``chunk`` of ``chunks`` (fixed: not the threads'
    share), block by block, without a tile of dL/dsamples or of samples in memory.

    For each block: its dL/dsamples by MKL's GEMM (dL/dout times each weight group's matrix)
    into a block-sized scratch; then ``_backward_fused``'s work on it (``_block_gradients``:
    dL/doffset, dL/dmask and the samples, into a second scratch; ``_scatter_taps`` into the
    segment's own images of ``grad_pad``); then the weight gradient's share, dL/dout times the
    samples, added by GEMM into the segment's own [wg, Cout / wg, K] slice of ``grad_w``. The
    caller sums the segments in order: every sum has one order whatever the threads.
    ``grad_out`` is flat NCHW, or NHWC with ``grad_channels_last``."""
    channels, groups, taps, cw = geo[_C], geo[_G], geo[_KH] * geo[_KW], geo[_CW]
    nb, rb, wb = tile[3], tile[4], tile[5]
    plane = geo[_OH] * geo[_OW]
    k = taps * cw
    wg = channels // cw
    cout = w_mat.size // k
    cog = cout // wg
    size = np.int64(grad_off.itemsize)
    dest = _run_destinations(runs, lay[4], cw, lay[5])
    simple = runs.size - _RUNS == 3 * groups  # every offset group one run of channels
    image_rows = geo[_H] + 3
    row = (geo[_W] + 2) * channels
    block_rows = _block_rows(nb, rb, wb)
    per_image = _image_blocks(nb, rb, wb)  # blocks of an image (as ``_block``)
    stride = groups * taps * block_rows * wb  # (group, tap, position) of a block
    index = np.empty(stride, dtype=np.int64)
    frac = np.empty(8 * stride, dtype=grad_off.dtype)
    sums = np.empty(3 * stride, dtype=grad_off.dtype)
    grid = np.empty(2 * block_rows * wb, dtype=np.float64)
    grad_cols = _aligned(block_rows * lay[0], grad_off)
    cols = _aligned(block_rows * lay[0] if need_weight else 0, grad_off)
    no_cols_t = cols[:0]
    ints, chars, scalars = _blas_arguments(grad_off)
    gemm = mkl[1] if size == 8 else mkl[0]
    blas = (gemm, ints, chars, scalars)
    geometry = (wg, cog, k, cout, plane, size)
    _blas_threads(mkl, ints, True)
    g_at, gc_at, cols_at = _address_of(grad_out), _address_of(grad_cols), _address_of(cols)
    w_at = _address_of(w_mat)
    dw_at = _address_of(grad_w) + chunk * cout * k * size
    for nl in range(nb * chunk // chunks, nb * (chunk + 1) // chunks):
        first_row = nl * image_rows
        for b in range(nl * per_image, (nl + 1) * per_image):
            item, rows = _block(tile, b)
            count = rows * wb
            first = (item - nl * rb) * wb  # the block's first position in its plane
            _block_sample_gradients(blas, w_at, g_at, gc_at, wg * k, nl, first, count, geometry,
                                    grad_channels_last)  # fmt: skip
            _block_gradients(pad, off, msk, has_mask, geo, runs, tile, lay, grad_cols,
                             need_weight, cols, no_cols_t, grad_off, grad_msk, item, rows, grid,
                             index, frac, sums, dest, simple, True, item, False)  # fmt: skip
            if need_input:
                _scatter_taps(grad_pad, grad_cols, geo, runs, dest, lay, 0, rows, wb, index, frac,
                              nl * image_rows * row, first_row, first_row,
                              first_row + image_rows)  # fmt: skip
            if need_weight:
                _block_weight_gradient(blas, cols_at, g_at, dw_at, nl, first, count, geometry,
                                       grad_channels_last)  # fmt: skip
    _blas_threads(mkl, ints, False)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _backward_blocks_taps(pad, off, msk, has_mask, geo, runs, tile, lay, w_mat, grad_out,
                          grad_channels_last, need_weight, grad_cols, grad_off, grad_msk, item_rows,
                          grad_w, mkl, chunk, chunks):  # fmt: skip
    """Phase 1 of the backward by blocks where a tile has too few images for
    ``_backward_blocks`` (its input gradient is then the rows' pass, ``_backward_input``): the
    blocks of segment ``chunk`` of ``chunks`` (fixed: not the threads' share). For each block:
    its dL/dsamples by MKL's GEMM into its rows of the tile's ``grad_cols`` (the rows' pass reads
    them), ``_backward_taps``' work on them while they are in cache (the samples into a
    block-sized scratch), then the weight gradient's share by GEMM into the segment's own slice
    of ``grad_w``, as ``_backward_blocks`` does."""
    channels, groups, taps, cw = geo[_C], geo[_G], geo[_KH] * geo[_KW], geo[_CW]
    n0, nb, rb, wb = tile[0], tile[3], tile[4], tile[5]
    plane = geo[_OH] * geo[_OW]
    k = taps * cw
    wg = channels // cw
    cout = w_mat.size // k
    cog = cout // wg
    size = np.int64(grad_off.itemsize)
    dest = _run_destinations(runs, lay[4], cw, lay[5])
    simple = runs.size - _RUNS == 3 * groups  # every offset group one run of channels
    block_rows = _block_rows(nb, rb, wb)
    stride = groups * taps * block_rows * wb  # (group, tap, position) of a block
    index = np.empty(stride, dtype=np.int64)
    frac = np.empty(4 * stride, dtype=grad_off.dtype)
    sums = np.empty(3 * stride, dtype=grad_off.dtype)
    grid = np.empty(2 * block_rows * wb, dtype=np.float64)
    cols = _aligned(block_rows * lay[0] if need_weight else 0, grad_off)
    no_cols_t = cols[:0]
    ints, chars, scalars = _blas_arguments(grad_off)
    gemm = mkl[1] if size == 8 else mkl[0]
    blas = (gemm, ints, chars, scalars)
    geometry = (wg, cog, k, cout, plane, size)
    _blas_threads(mkl, ints, True)
    g_at, gc_at, cols_at = _address_of(grad_out), _address_of(grad_cols), _address_of(cols)
    w_at = _address_of(w_mat)
    dw_at = _address_of(grad_w) + chunk * cout * k * size
    blocks = nb * _image_blocks(nb, rb, wb)
    for b in range(blocks * chunk // chunks, blocks * (chunk + 1) // chunks):
        item, rows = _block(tile, b)
        count = rows * wb
        n = n0 + item // rb
        first = (tile[1] + item - (item // rb) * rb) * geo[_OW] + tile[2]  # as _locate_block
        _block_sample_gradients(blas, w_at, g_at, gc_at + item * lay[0] * size, wg * k, n, first,
                                count, geometry, grad_channels_last)  # fmt: skip
        _block_gradients(pad, off, msk, has_mask, geo, runs, tile, lay, grad_cols, need_weight,
                         cols, no_cols_t, grad_off, grad_msk, item, rows, grid, index, frac, sums,
                         dest, simple, False, 0, True)  # fmt: skip
        _block_item_rows(frac, item_rows, item, rows, wb, groups * taps, geo[_H] + 3)
        if need_weight:
            _block_weight_gradient(blas, cols_at, g_at, dw_at, n, first, count, geometry,
                                   grad_channels_last)  # fmt: skip
    _blas_threads(mkl, ints, False)


# ---------------------------------------------------------------------------------------------
# The kernels as tasks for torch's OpenMP threads (``_parallel.run_openmp``). A task receives an
# int64 descriptor: [counter address, chunks, float64?, then (address, length) of every array
# argument, then the scalar ones]; its threads claim chunks from the counter until none is left.


@intrinsic
def _address(typingctx, address):
    """The int64 ``address`` as a void pointer (memory handed over by the descriptor)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


@intrinsic
def _claim(typingctx, address):
    """Atomically add one to the int64 at ``address``; the value it had."""

    def codegen(context, builder, signature, args):
        counter = builder.inttoptr(args[0], llvm_ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", counter, llvm_ir.Constant(llvm_ir.IntType(64), 1),
                                  "monotonic")  # fmt: skip

    return types.int64(types.int64), codegen


@njit(nogil=True, cache=True, inline="always")
def _ints(d, k):
    return carray(_address(d[k]), d[k + 1], dtype=np.int64)


@njit(nogil=True, cache=True, inline="always")
def _floats32(d, k):
    return carray(_address(d[k]), d[k + 1], dtype=np.float32)


@njit(nogil=True, cache=True, inline="always")
def _floats64(d, k):
    return carray(_address(d[k]), d[k + 1], dtype=np.float64)


@njit(nogil=True, cache=True)
def _pad_rows_chunks(d, inp, pad):
    chunk = _claim(d[0])
    while chunk < d[1]:
        _pad_rows(inp, d[9] != 0, pad, _ints(d, 7), chunk, d[1])
        chunk = _claim(d[0])


def _pad_rows_task(data):
    d = carray(data, 16, dtype=np.int64)
    if d[2]:
        _pad_rows_chunks(d, _floats64(d, 3), _floats64(d, 5))
    else:
        _pad_rows_chunks(d, _floats32(d, 3), _floats32(d, 5))


@njit(nogil=True, cache=True)
def _rows_to_nchw_chunks(d, src, out):
    chunk = _claim(d[0])
    while chunk < d[1]:
        _rows_to_nchw(src, out, _ints(d, 7), chunk, d[1])
        chunk = _claim(d[0])


def _rows_to_nchw_task(data):
    d = carray(data, 16, dtype=np.int64)
    if d[2]:
        _rows_to_nchw_chunks(d, _floats64(d, 3), _floats64(d, 5))
    else:
        _rows_to_nchw_chunks(d, _floats32(d, 3), _floats32(d, 5))


@njit(nogil=True, cache=True)
def _gemm_rows_chunks(d, a, b, c):
    chunk = _claim(d[0])
    while chunk < d[1]:
        _gemm_rows(a, b, c, _ints(d, 9), chunk, d[1])
        chunk = _claim(d[0])


def _gemm_rows_task(data):
    d = carray(data, 16, dtype=np.int64)
    if d[2]:
        _gemm_rows_chunks(d, _floats64(d, 3), _floats64(d, 5), _floats64(d, 7))
    else:
        _gemm_rows_chunks(d, _floats32(d, 3), _floats32(d, 5), _floats32(d, 7))


@njit(nogil=True, cache=True)
def _sample_chunks(d, pad, off, msk, out):
    geo, runs, tile, lay = _ints(d, 9), _ints(d, 11), _ints(d, 13), _ints(d, 15)
    chunk = _claim(d[0])
    while chunk < d[1]:
        _sample(pad, off, msk, d[19] != 0, geo, runs, tile, lay, out, chunk, d[1])
        chunk = _claim(d[0])


def _sample_task(data):
    d = carray(data, 32, dtype=np.int64)
    if d[2]:
        _sample_chunks(d, _floats64(d, 3), _floats64(d, 5), _floats64(d, 7), _floats64(d, 17))
    else:
        _sample_chunks(d, _floats32(d, 3), _floats32(d, 5), _floats32(d, 7), _floats32(d, 17))


@njit(nogil=True, cache=True)
def _forward_blocks_chunks(d, pad, off, msk, w_mat, bias, out):
    geo, runs, tile, lay, mkl = _ints(d, 9), _ints(d, 11), _ints(d, 13), _ints(d, 15), _ints(d, 23)
    chunk = _claim(d[0])
    while chunk < d[1]:
        _forward_blocks(pad, off, msk, d[25] != 0, geo, runs, tile, lay, w_mat, bias, d[26] != 0,
                        out, d[27] != 0, mkl, chunk, d[1])  # fmt: skip
        chunk = _claim(d[0])


def _forward_blocks_task(data):
    d = carray(data, 40, dtype=np.int64)
    if d[2]:
        _forward_blocks_chunks(d, _floats64(d, 3), _floats64(d, 5), _floats64(d, 7),
                               _floats64(d, 17), _floats64(d, 19), _floats64(d, 21))  # fmt: skip
    else:
        _forward_blocks_chunks(d, _floats32(d, 3), _floats32(d, 5), _floats32(d, 7),
                               _floats32(d, 17), _floats32(d, 19), _floats32(d, 21))  # fmt: skip


@njit(nogil=True, cache=True)
def _backward_blocks_chunks(d, pad, off, msk, w_mat, grad_out, grad_off, grad_msk, grad_pad,
                           grad_w):  # fmt: skip
    geo, runs, tile, lay, mkl = _ints(d, 9), _ints(d, 11), _ints(d, 13), _ints(d, 15), _ints(d, 29)
    chunk = _claim(d[0])
    while chunk < d[1]:
        _backward_blocks(pad, off, msk, d[31] != 0, geo, runs, tile, lay, w_mat, grad_out,
                         d[32] != 0, d[33] != 0, d[34] != 0, grad_off, grad_msk, grad_pad, grad_w,
                         mkl, chunk, d[1])  # fmt: skip
        chunk = _claim(d[0])


def _backward_blocks_task(data):
    d = carray(data, 40, dtype=np.int64)
    if d[2]:
        _backward_blocks_chunks(d, _floats64(d, 3), _floats64(d, 5), _floats64(d, 7),
                                _floats64(d, 17), _floats64(d, 19), _floats64(d, 21),
                                _floats64(d, 23), _floats64(d, 25), _floats64(d, 27))  # fmt: skip
    else:
        _backward_blocks_chunks(d, _floats32(d, 3), _floats32(d, 5), _floats32(d, 7),
                                _floats32(d, 17), _floats32(d, 19), _floats32(d, 21),
                                _floats32(d, 23), _floats32(d, 25), _floats32(d, 27))  # fmt: skip


@njit(nogil=True, cache=True)
def _backward_blocks_taps_chunks(d, pad, off, msk, w_mat, grad_out, grad_cols, grad_off, grad_msk,
                                grad_w):  # fmt: skip
    geo, runs, tile, lay = _ints(d, 9), _ints(d, 11), _ints(d, 13), _ints(d, 15)
    item_rows, mkl = _ints(d, 27), _ints(d, 31)
    chunk = _claim(d[0])
    while chunk < d[1]:
        _backward_blocks_taps(pad, off, msk, d[33] != 0, geo, runs, tile, lay, w_mat, grad_out,
                              d[34] != 0, d[35] != 0, grad_cols, grad_off, grad_msk, item_rows,
                              grad_w, mkl, chunk, d[1])  # fmt: skip
        chunk = _claim(d[0])


def _backward_blocks_taps_task(data):
    d = carray(data, 40, dtype=np.int64)
    if d[2]:
        _backward_blocks_taps_chunks(d, _floats64(d, 3), _floats64(d, 5), _floats64(d, 7),
                                     _floats64(d, 17), _floats64(d, 19), _floats64(d, 21),
                                     _floats64(d, 23), _floats64(d, 25),
                                     _floats64(d, 29))  # fmt: skip
    else:
        _backward_blocks_taps_chunks(d, _floats32(d, 3), _floats32(d, 5), _floats32(d, 7),
                                     _floats32(d, 17), _floats32(d, 19), _floats32(d, 21),
                                     _floats32(d, 23), _floats32(d, 25),
                                     _floats32(d, 29))  # fmt: skip


@njit(nogil=True, cache=True)
def _backward_taps_chunks(d, pad, off, msk, grad_cols, cols, grad_off, grad_msk, cols_t):
    geo, runs, tile, lay = _ints(d, 9), _ints(d, 11), _ints(d, 13), _ints(d, 15)
    item_rows = _ints(d, 25)
    chunk = _claim(d[0])
    while chunk < d[1]:
        _backward_taps(pad, off, msk, d[29] != 0, geo, runs, tile, lay, grad_cols, d[30] != 0,
                       cols, grad_off, grad_msk, item_rows, cols_t, chunk, d[1])  # fmt: skip
        chunk = _claim(d[0])


def _backward_taps_task(data):
    d = carray(data, 40, dtype=np.int64)
    if d[2]:
        _backward_taps_chunks(d, _floats64(d, 3), _floats64(d, 5), _floats64(d, 7),
                              _floats64(d, 17), _floats64(d, 19), _floats64(d, 21),
                              _floats64(d, 23), _floats64(d, 27))  # fmt: skip
    else:
        _backward_taps_chunks(d, _floats32(d, 3), _floats32(d, 5), _floats32(d, 7),
                              _floats32(d, 17), _floats32(d, 19), _floats32(d, 21),
                              _floats32(d, 23), _floats32(d, 27))  # fmt: skip


@njit(nogil=True, cache=True)
def _backward_input_chunks(d, off, msk, grad_cols, grad_pad):
    geo, runs, tile, lay = _ints(d, 7), _ints(d, 9), _ints(d, 11), _ints(d, 13)
    item_rows = _ints(d, 17)
    chunk = _claim(d[0])
    while chunk < d[1]:
        _backward_input(off, msk, d[21] != 0, geo, runs, tile, lay, grad_cols, item_rows, grad_pad,
                        chunk, d[1])  # fmt: skip
        chunk = _claim(d[0])


def _backward_input_task(data):
    d = carray(data, 32, dtype=np.int64)
    if d[2]:
        _backward_input_chunks(d, _floats64(d, 3), _floats64(d, 5), _floats64(d, 15),
                               _floats64(d, 19))  # fmt: skip
    else:
        _backward_input_chunks(d, _floats32(d, 3), _floats32(d, 5), _floats32(d, 15),
                               _floats32(d, 19))  # fmt: skip


@njit(nogil=True, cache=True)
def _backward_fused_chunks(d, pad, off, msk, grad_cols, cols, grad_off, grad_msk, grad_pad, cols_t):
    geo, runs, tile, lay = _ints(d, 9), _ints(d, 11), _ints(d, 13), _ints(d, 15)
    chunk = _claim(d[0])
    while chunk < d[1]:
        _backward_fused(pad, off, msk, d[29] != 0, geo, runs, tile, lay, grad_cols, d[30] != 0,
                        cols, grad_off, grad_msk, grad_pad, cols_t, chunk, d[1])  # fmt: skip
        chunk = _claim(d[0])


def _backward_fused_task(data):
    d = carray(data, 40, dtype=np.int64)
    if d[2]:
        _backward_fused_chunks(d, _floats64(d, 3), _floats64(d, 5), _floats64(d, 7),
                               _floats64(d, 17), _floats64(d, 19), _floats64(d, 21),
                               _floats64(d, 23), _floats64(d, 25), _floats64(d, 27))  # fmt: skip
    else:
        _backward_fused_chunks(d, _floats32(d, 3), _floats32(d, 5), _floats32(d, 7),
                               _floats32(d, 17), _floats32(d, 19), _floats32(d, 21),
                               _floats32(d, 23), _floats32(d, 25), _floats32(d, 27))  # fmt: skip


#: kernel name -> its task, compiled (and cached on disk) the first time it runs on OpenMP
_compiled_tasks: dict = {}


def _run(kernel, chunks: int, *args) -> None:
    """``run_chunked(kernel, chunks, *args)``, on torch's OpenMP threads where it runs on them
    (``_parallel.run_openmp``), even in one chunk (one thread: a numba dispatch from Python
    types every argument, 10-20 us): the arrays are handed over by address, numbers as they are.

    An array argument is a numpy array or a dense tensor (one whose memory is its elements,
    contiguous in some order of its dimensions, e.g. a channels-last output): handed over as
    its memory, the address and length of a tensor cost a tenth of a numpy view's."""
    if not _parallel.openmp_available():
        run_chunked(kernel, chunks, *(_dense_numpy(a) if isinstance(a, torch.Tensor) else a
                                      for a in args))  # fmt: skip
        return
    task = _compiled_tasks.get(kernel.__name__)
    if task is None:
        function = globals()[kernel.__name__ + "_task"]
        task = _compiled_tasks[kernel.__name__] = cfunc(types.void(types.voidptr), cache=True)(function)
    words = [0, chunks, 0]
    numbers = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            words += (arg.data_ptr(), arg.numel())
            if arg.dtype == torch.float64:
                words[2] = 1
        elif isinstance(arg, np.ndarray):
            words += (arg.ctypes.data, arg.size)
            if arg.dtype == np.float64:
                words[2] = 1
        else:
            numbers.append(int(arg))
    words += numbers
    descriptor = np.zeros(_DESCRIPTOR_WORDS, dtype=np.int64)
    descriptor[: len(words)] = words
    address = descriptor.ctypes.data
    descriptor[0] = address + 8 * (_DESCRIPTOR_WORDS - 1)  # the chunk counter: the last word
    _parallel.run_openmp(task.address, address, max(1, min(_parallel.num_threads(), chunks)))


#: Words of a task's descriptor: the longest (``_backward_blocks_task``) reads 36, and the last
#: word counts the chunks claimed.
_DESCRIPTOR_WORDS = 40


def _dense_numpy(t: torch.Tensor) -> np.ndarray:
    """A dense tensor's memory as a 1-D numpy array (for ``run_chunked``'s kernels)."""
    return t.detach().as_strided((t.numel(),), (1,)).numpy()


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


def _is_channels_last(t: torch.Tensor) -> bool:
    """Channels-last memory that is not also plain contiguous (as F.conv2d decides its output)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@intrinsic
def _transpose_block(typingctx, dst, d, d_stride, src, s, s_stride):
    """``dst[d + i * d_stride + j] = src[s + j * s_stride + i]`` for i, j < L, L the elements
    of a 256-bit vector (8 float32, 4 float64): L vector loads, log2(L) rounds of shuffles, L
    stores (LLVM picks the instructions). Numba's loops gave a scalar load and store an
    element, 3-5x slower on 32-channel maps."""
    lanes = 256 // dst.dtype.bitwidth

    def codegen(context, builder, signature, args):
        v = _Vectors(context, builder, signature, args, lanes)
        d, d_stride, s, s_stride = v.int(1), v.int(2), v.int(4), v.int(5)
        dst_data, src_data = v.data(0), v.data(3)

        def at(base, stride, k):
            return builder.add(base, builder.mul(stride, llvm_ir.Constant(llvm_ir.IntType(64), k)))

        rows = [v.load(src_data, at(s, s_stride, j)) for j in range(lanes)]
        # the transpose of [[A, B], [C, D]] is [[A', C'], [B', D']]: swap the off-diagonal
        # blocks of width w (rows r and r + w), then recurse into blocks half as wide
        w = lanes // 2
        while w:
            runs = [(b, t) for b in range(0, lanes, 2 * w) for t in range(2 * w)]
            low = _shuffle_mask(b + t if t < w else lanes + b + t - w for b, t in runs)
            high = _shuffle_mask(b + w + t if t < w else lanes + b + t for b, t in runs)
            for r in range(lanes):
                if r & w == 0:
                    a, b = rows[r], rows[r + w]
                    rows[r] = builder.shuffle_vector(a, b, low)
                    rows[r + w] = builder.shuffle_vector(a, b, high)
            w //= 2
        for i in range(lanes):
            v.store(rows[i], dst_data, at(d, d_stride, i))
        return context.get_dummy_value()

    return types.void(dst, d, d_stride, src, s, s_stride), codegen


@njit(nogil=True, cache=True, inline="always")
def _transpose(dst, d, d_stride, src, s, s_stride, rows, cols):
    """``dst[d + i * d_stride + j] = src[s + j * s_stride + i]`` for i < ``rows``, j < ``cols``:
    in ``_transpose_block``s, the last block of each dimension overlapping the one before it
    (a copy: its elements are written twice, with the same values) so that no scalar remainder
    is left unless a dimension is shorter than a block."""
    d, d_stride, s, s_stride = np.int64(d), np.int64(d_stride), np.int64(s), np.int64(s_stride)
    block = 32 // dst.itemsize
    if rows < block or cols < block:
        for i in range(rows):
            for j in range(cols):
                dst[d + i * d_stride + j] = src[s + j * s_stride + i]
        return
    for i0 in range(0, rows, block):
        i = min(i0, rows - block)
        for j0 in range(0, cols, block):
            j = min(j0, cols - block)
            _transpose_block(dst, d + i * d_stride + j, d_stride, src, s + j * s_stride + i,
                             s_stride)


@njit(nogil=True, cache=True)
def _pad_rows(inp, channels_last, pad, geo, chunk, chunks):
    """Rows of ``_padded``: the chunk's share of the padded rows of every image, from ``inp``
    (flat NCHW, or NHWC with ``channels_last``). NCHW rows are transposed by ``_transpose``
    (torch's own permuted copy was 6x slower on 32 x 32 maps, its reads along channels striding
    by H * W: 4 KiB, every one in the same cache set)."""
    height, width, channels = geo[_H], geo[_W], geo[_C]
    rows = geo[_BATCH] * (height + 3)
    row = (width + 2) * channels
    for r in range(rows * chunk // chunks, rows * (chunk + 1) // chunks):
        n = r // (height + 3)
        y = r - n * (height + 3) - 1  # the input row, -1 and >= H are padding
        d = np.uint64(r * row)
        if y < 0 or y >= height:
            for q in range(np.uint64(row)):
                pad[d + q] = 0.0
            continue
        for q in range(np.uint64(channels)):
            pad[d + q] = 0.0
            pad[d + np.uint64(row - channels) + q] = 0.0
        d += np.uint64(channels)
        if channels_last:
            s = np.uint64((n * height + y) * width * channels)
            for q in range(np.uint64(width * channels)):
                pad[d + q] = inp[s + q]
            continue
        src = (n * channels * height + y) * width
        _transpose(pad, d, channels, inp, src, height * width, width, channels)


@njit(nogil=True, cache=True)
def _rows_to_nchw(src, out, dims, chunk, chunks):
    """Rows of positions, channels innermost, into their region of ``out`` (flat [N, C, H, W]):
    the forward's GEMM result and the input gradient's padded rows. ``dims`` = (C, H, W, n0, r0,
    c0, nb, rb, wb, image, row, first): ``nb`` x ``rb`` rows of ``wb`` positions go to images
    n0.., rows r0.., columns c0.. of ``out``; row (nl, rl) starts at
    ``src[first + nl * image + rl * row]``. The chunk does its share of the rows, by
    ``_transpose``: a run of the chunk's rows of one image at once where they are contiguous
    in both (whole rows of ``out``, rows of ``src`` back to back), else row by row."""
    channels, height, width = dims[0], dims[1], dims[2]
    n0, r0, c0, rb, wb = dims[3], dims[4], dims[5], dims[7], dims[8]
    rows = dims[6] * rb
    plane = height * width
    whole = wb == width and dims[10] == wb * channels
    r = rows * chunk // chunks
    end = rows * (chunk + 1) // chunks
    while r < end:
        nl = r // rb
        rl = r - nl * rb
        run = min(end - r, rb - rl) if whole else 1
        s = dims[11] + nl * dims[9] + rl * dims[10]
        d = ((n0 + nl) * channels * height + r0 + rl) * width + c0
        _transpose(out, d, plane, src, s, channels, channels, run * wb)
        r += run


def _unpadding(geo) -> np.ndarray:
    """``_rows_to_nchw``'s dims that invert ``_padded``: its image rows back into NCHW."""
    batch, height, width, channels = (int(v) for v in geo[[_BATCH, _H, _W, _C]])
    row = (width + 2) * channels
    return np.array([channels, height, width, 0, 0, 0, batch, height, width, (height + 3) * row,
                     row, row + channels], dtype=np.int64)  # fmt: skip


def _padded(input: torch.Tensor, geo, channels_last: bool) -> torch.Tensor:
    """The input channels last with a border of zeros: [N, H + 3, W + 2, C], pixel (y, x) at
    (y + 1, x + 1). Every bilinear corner of a sample inside (-1, H) x (-1, W) is in it, so the
    kernels read corners without bounds checks; rows H + 1 and H + 2 are a block of zeros that
    samples outside the band point at (``_taps``). ``channels_last``: the input's layout
    (``_is_channels_last``), read as it is in memory."""
    batch, channels, height, width = input.shape
    pad = _buffer("pad", (batch, height + 3, width + 2, channels), input.dtype)
    _run(_pad_rows, num_chunks(batch * (height + 3), pad.numel(), per_thread=1),
         input if channels_last else input.contiguous(), channels_last, pad, geo)  # fmt: skip
    return pad


#: The shapes of a _Problem by its call's key (``_Problem.statics``), bounded.
_statics: dict = {}


class _Problem:
    """Shapes and flat views shared by the forward and backward of one call; its tiles hold at
    most ``budget`` bytes of samples (within ``TILE_BYTES``) and ``max_positions`` positions."""

    def __init__(self, input, offset, weight, stride, padding, dilation, mask, budget=None,
                 max_positions=None):  # fmt: skip
        channels_last = _is_channels_last(input)
        key = (input.shape, input.dtype, channels_last, weight.shape, offset.shape, *stride,
               *padding, *dilation, budget, max_positions, TILE_BYTES)  # fmt: skip
        statics = _statics.get(key)
        if statics is None:
            if len(_statics) >= 256:
                _statics.clear()
            statics = _statics[key] = self.statics(input, offset, weight, stride, padding,
                                                   dilation, budget, max_positions,
                                                   channels_last)  # fmt: skip
        self.__dict__.update(statics)
        self.key = key
        self.pad = _padded(input, self.geo, channels_last)
        off = offset.contiguous()
        msk = mask.contiguous() if mask is not None else off
        self.sources = (self.pad, off, msk, mask is not None)

    @staticmethod
    def statics(input, offset, weight, stride, padding, dilation, budget, max_positions,
                channels_last) -> dict:
        """The attributes that follow from the call's shapes, dtype, layout and arguments alone
        (kept between calls: computing them took 15-20 us of a 1 ms call): sizes, ``geo`` and
        ``runs`` (the kernels' int64 arguments, shared: never written), ``tiles``."""
        batch, channels, height, width = input.shape
        out_channels, cw, kh, kw = weight.shape
        out_h, out_w = offset.shape[-2:]
        taps = kh * kw
        groups = offset.shape[1] // (2 * taps)
        geo = np.array([batch, height, width, channels, out_h, out_w, groups, kh, kw, *stride,
                        *padding, *dilation, cw], dtype=np.int64)  # fmt: skip
        budget = TILE_BYTES if budget is None else min(budget, TILE_BYTES)
        bytes_per_position = taps * channels * input.element_size()
        if max_positions is not None:
            budget = min(budget, max_positions * bytes_per_position)
        return dict(out_channels=out_channels, cw=cw, kh=kh, kw=kw, out_h=out_h, out_w=out_w,
                    taps=taps, channels=channels, weight_groups=channels // cw,
                    dtype=input.dtype, channels_last=channels_last,
                    offset_groups=groups, runs=_channel_runs(channels, groups, cw), geo=geo,
                    tiles=tuple(_tiles(batch, out_h, out_w, bytes_per_position, budget)))

    def sample(self, tile, shape, layout, blocks=None):
        """Samples of one tile into a reused buffer of ``shape``, laid out as ``layout``;
        ``tile`` as a tuple or as the kernels' int64 array, and then ``blocks``, its
        ``_block_count``."""
        numel = math.prod(shape)
        out = _scratch("samples", numel, self.dtype, shape)
        if blocks is None:
            blocks, tile = _block_count(tile), np.array(tile, dtype=np.int64)
        _run(_sample, num_chunks(blocks, numel), *self.sources, self.geo, self.runs, tile, layout,
             out)  # fmt: skip
        return out

    def column_layout(self, tile):
        """Layout of cols[P, wg, kh*kw*cw], P = the tile's positions (n, row, column)."""
        wb = tile[5]
        k, c, cw = self.taps, self.channels, self.cw
        return np.array([wb * k * c, k * c, self.kw * cw, cw, k * cw, 1], np.int64)

    def columns(self, tile):
        nb, rb, wb = tile[3:]
        shape = (nb * rb * wb, self.weight_groups, self.taps * self.cw)
        return self.sample(tile, shape, self.column_layout(tile))

    def group_layout(self, tile, channel_major):
        """Shape and layout of the tile's column matrix of each weight group, contiguous (the
        forward's, ``sample``'s ``shape`` and ``layout``): cols[wg, P, kh*kw*cw], a row (tap,
        channel) in ``weight.permute(0, 2, 3, 1)``'s order, or with ``channel_major`` (channel,
        tap), ``weight``'s own order (then the weight needs no reordering)."""
        nb, rb, wb = tile[3:]
        positions, k, cw = nb * rb * wb, self.taps, self.cw
        if channel_major:
            layout = [wb * k * cw, k * cw, self.kw, 1, positions * k * cw, k]
        else:
            layout = [wb * k * cw, k * cw, self.kw * cw, cw, positions * k * cw, 1]
        return (self.weight_groups, positions, k * cw), np.array(layout, np.int64)

    def weight_matrix(self, weight):
        """The weight as [wg, Cout/wg, kh*kw*cw], matching the column layout (a view)."""
        wg = self.weight_groups
        shape = (wg, self.out_channels // wg, self.taps * self.cw)
        return weight.detach().permute(0, 2, 3, 1).reshape(shape)

    def weight_rows(self, weight):
        """``weight_matrix`` contiguous. A contiguous weight is reordered by ``_rows_to_nchw``
        (each output channel's [cw, taps] transposed): torch's permuted copy took 30 us on a
        128 x 128 x 3 x 3 weight, 60 us out of cache."""
        weight = weight.detach()
        if self.taps == 1 or not weight.is_contiguous():  # a channels-last weight: a view
            return self.weight_matrix(weight).contiguous()
        wg = self.weight_groups
        out = torch.empty((wg, self.out_channels // wg, self.taps * self.cw), dtype=weight.dtype)
        # as positions (cw of them) of taps channels, one row an output channel
        k = self.taps * self.cw
        dims = np.array([self.taps, 1, self.cw, 0, 0, 0, self.out_channels, 1, self.cw, k, k, 0],
                        dtype=np.int64)  # fmt: skip
        _run(_rows_to_nchw, num_chunks(self.out_channels, weight.numel(), per_thread=1),
             weight, out, dims)  # fmt: skip
        return out

    def weight_gradient(self, grad_w_mat):
        """dL/dW [Cout, cw, kh, kw] (contiguous) from ``grad_w_mat`` in ``weight_matrix``'s
        layout: the inverse of ``weight_rows``, by the same kernel where it is contiguous (torch's
        permuted copy took 2.5 ms on a 512 x 512 x 3 x 3 gradient, on 2 threads)."""
        shape = (self.out_channels, self.kh, self.kw, self.cw)
        if self.taps == 1 or not grad_w_mat.is_contiguous():
            return grad_w_mat.reshape(shape).permute(0, 3, 1, 2).contiguous()
        out = torch.empty((self.out_channels, self.cw, self.kh, self.kw), dtype=grad_w_mat.dtype)
        # as positions (taps of them) of cw channels, one row an output channel
        k = self.taps * self.cw
        dims = np.array([self.cw, 1, self.taps, 0, 0, 0, self.out_channels, 1, self.taps, k, k,
                         0], dtype=np.int64)  # fmt: skip
        _run(_rows_to_nchw, num_chunks(self.out_channels, out.numel(), per_thread=1), grad_w_mat,
             out, dims)  # fmt: skip
        return out


#: Forces the column order of the forward's GEMM: "channel" or "tap" major; "auto" decides.
COLUMN_ORDER = "auto"


def _channel_major(p: _Problem, weight) -> bool:
    """Whether the forward's columns follow the weight's memory order (channel, tap) instead of
    the sampler's natural (tap, channel): a weight in NCHW order then needs no reordering. In a
    network the weight is cold in cache at every call, and reordering it costs more than the
    sampler's strided writes (about three times its contiguous ones) unless the columns far
    outweigh it (measured: a ResNet-50's conv4 at batch 1 spent 1.5 ms per call reordering a
    2.4 MB weight)."""
    if COLUMN_ORDER != "auto":
        return COLUMN_ORDER == "channel"
    if weight.is_contiguous(memory_format=torch.channels_last):  # tap major is free
        return False
    positions = max((t[3] * t[4] * t[5] for t in p.tiles), default=0)
    return 2 * p.out_channels >= positions


try:
    _onednn_linear = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # a torch built without oneDNN
    _onednn_linear = None

#: Longest reduction handed to oneDNN's matmul: beyond it, with few rows and columns, oneDNN
#: splits the reduction between threads, and the result would depend on their number.
ONEDNN_MAX_REDUCTION = 16384


def _onednn(a, reduction: int) -> bool:
    """Whether oneDNN's matmul runs a GEMM of ``a``'s dtype over ``reduction`` terms."""
    return _onednn_linear is not None and a.dtype == torch.float32 and reduction <= ONEDNN_MAX_REDUCTION


def _matmul(a, w, w_t, bias=None):
    """``a @ w.T (+ bias)`` for a [M, K] and w [N, K]: oneDNN's matmul where it is exact across
    thread counts (float32, K not too long), else ``_gemm`` on ``w_t``, ``w.T`` made contiguous
    (by the caller, once for all its tiles; None where oneDNN runs). (On AMD CPUs the BLAS torch
    ships, MKL, runs a slower code path, so oneDNN is worth a good deal on narrow outputs; on
    Intel CPUs MKL is not exact across thread counts.)"""
    if _onednn(a, a.shape[1]):
        return _onednn_linear(a, w, bias, "none", [], "")
    out = torch.empty(a.shape[0], w.shape[0], dtype=a.dtype)
    if bias is not None:
        out.copy_(bias.expand_as(out))
    _gemm(a, w_t, out, accumulate=bias is not None)
    return out


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _gemm_rows(a, b, c, dims, chunk, chunks):
    """``c[m, :] (+)= a[m, :] @ b`` for the chunk's share of the blocks of four rows of ``c``;
    ``dims`` = (M, N, K, a's row and column strides, b's row stride, c's row stride, accumulate).
    Each element of ``c`` is one sum over k in order, by the same code whatever the chunks: exact
    across thread counts. A block's rows share each row of ``b`` (read once for four)."""
    m_, n_, k_ = dims[0], dims[1], dims[2]
    a_row, a_col, b_row, c_row = dims[3], dims[4], dims[5], dims[6]
    zero = c.dtype.type(0.0)
    nu = np.uint64(n_)
    blocks = (m_ + 3) // 4
    for blk in range(blocks * chunk // chunks, blocks * (chunk + 1) // chunks):
        m0 = 4 * blk
        rows = min(4, m_ - m0)
        if dims[7] == 0:
            for r in range(rows):
                cr = np.uint64((m0 + r) * c_row)
                for n in range(nu):
                    c[cr + n] = zero
        if rows == 4:
            c0 = np.uint64(m0 * c_row)
            c1 = c0 + np.uint64(c_row)
            c2 = c1 + np.uint64(c_row)
            c3 = c2 + np.uint64(c_row)
            for k in range(k_):
                a0 = a[m0 * a_row + k * a_col]
                a1 = a[(m0 + 1) * a_row + k * a_col]
                a2 = a[(m0 + 2) * a_row + k * a_col]
                a3 = a[(m0 + 3) * a_row + k * a_col]
                bk = np.uint64(k * b_row)
                for n in range(nu):
                    v = b[bk + n]
                    c[c0 + n] += a0 * v
                    c[c1 + n] += a1 * v
                    c[c2 + n] += a2 * v
                    c[c3 + n] += a3 * v
        else:
            for r in range(rows):
                cr = np.uint64((m0 + r) * c_row)
                for k in range(k_):
                    ar = a[(m0 + r) * a_row + k * a_col]
                    bk = np.uint64(k * b_row)
                    for n in range(nu):
                        c[cr + n] += ar * b[bk + n]


def _flat(t: torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of ``t``'s memory from its first element to its last (strides kept by
    the caller)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.as_strided((extent,), (1,)).numpy()


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """``out (+)= a @ b`` by ``_gemm_rows``: the GEMMs oneDNN cannot run exactly (float64, long
    reductions), where BLAS would do (MKL on Intel CPUs gives other results on other thread
    counts). ``a`` [M, K] any strides; ``b`` [K, N] and ``out`` [M, N] with unit column stride."""
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            out.zero_()
        return
    dims = np.array([m, n, k, a.stride(0), a.stride(1), b.stride(0), out.stride(0), accumulate],
                    dtype=np.int64)  # fmt: skip
    _run(_gemm_rows, num_chunks((m + 3) // 4, m * n * k), _flat(a), _flat(b), _flat(out), dims)


#: The forward's GEMM: "blocks" (MKL's, called by the sampling kernel on each block of samples
#: while it is in cache: ``_forward_blocks``), "tiles" (oneDNN's, on tiles of samples written to
#: memory first), or "auto": blocks where MKL is there, on Intel CPUs (MKL ran slower code on
#: the AMD CPU this was first developed on), with the columns tap major.
FORWARD_GEMM = "auto"

_INTEL = _intel_cpu()


#: Largest block of samples the forward runs by blocks (``FORWARD_GEMM`` "auto"): the CPU's L2
#: cache (1 MiB where the system does not say). Measured on a 2 MiB L2: a 50x84 map of 256
#: channels (blocks of 2.3 MB) 8 % slower by blocks than on tiles; 1.2-1.6 MB blocks 1-8 % faster.
BLOCK_BYTES = _cache_sizes().get(2, 2**20)


def _by_blocks(p: _Problem, channel_major: bool) -> bool:
    """Whether the forward runs by blocks (``FORWARD_GEMM``)."""
    if _MKL is None or channel_major:
        return False
    if FORWARD_GEMM != "auto":
        return FORWARD_GEMM == "blocks"
    batch = int(p.geo[_BATCH])
    if batch * p.out_h * p.out_w == 0:
        return False
    positions = _block_rows(batch, p.out_h, p.out_w) * p.out_w
    return _INTEL and positions * p.taps * p.channels * p.pad.element_size() <= BLOCK_BYTES


def _forward_by_blocks(p: _Problem, w, b, shape, memory_format, step):
    """The forward by ``_forward_blocks``: the whole batch one tile (``step``, the plan's),
    split in its blocks."""
    out = torch.empty(shape, dtype=p.dtype, memory_format=memory_format)
    if out.numel() == 0:
        return out
    tile, layout, blocks = step
    w_mat = p.weight_rows(w)
    bias = b.contiguous() if b is not None else w_mat[:0, 0, 0]
    _run(_forward_blocks, num_chunks(blocks, out.numel() * w_mat.numel()), *p.sources, p.geo,
         p.runs, tile, layout, w_mat, bias, b is not None, out, p.channels_last, _MKL)  # fmt: skip
    return out


#: The forward's plans by their keys (``_forward_plan``), bounded.
_forward_plans: dict = {}


def _forward_plan(p: _Problem, weight):
    """The forward's decisions for ``p`` and ``weight`` and its kernels' int64 arguments: (by
    blocks, channel major, steps), a step (tile, its int64 array, columns' shape, layout,
    blocks, ``_rows_to_nchw``'s dims) per tile, or (tile array, layout, blocks) by blocks.
    Kept by the call's key and every setting the decisions read (they cost 20-30 us of a batch-1
    layer's call where it runs cold: numpy arrays, numba dispatches, the decisions' Python)."""
    key = (p.key, weight.is_contiguous(memory_format=torch.channels_last), COLUMN_ORDER,
           FORWARD_GEMM, BLOCK_BYTES, _INTEL, _MKL is None)  # fmt: skip
    plan = _forward_plans.get(key)
    if plan is not None:
        return plan
    channel_major = _channel_major(p, weight)
    if _by_blocks(p, channel_major):
        tile = np.array([0, 0, 0, p.geo[_BATCH], p.out_h, p.out_w], dtype=np.int64)
        plan = (True, channel_major, (tile, p.column_layout(tile), _block_count(tile)))
    else:
        steps, cout = [], p.out_channels
        for tile in p.tiles:
            n0, r0, c0, nb, rb, wb = tile
            dims = np.array([cout, p.out_h, p.out_w, *tile, rb * wb * cout, wb * cout, 0],
                            dtype=np.int64)  # fmt: skip
            steps.append((tile, np.array(tile, dtype=np.int64),
                          *p.group_layout(tile, channel_major), _block_count(tile), dims))
        plan = (False, channel_major, steps)
    if len(_forward_plans) >= 256:
        _forward_plans.clear()
    _forward_plans[key] = plan
    return plan


def forward(input, offset, weight, bias, stride, padding, dilation, mask):
    budget = max(FORWARD_TILE_BYTES, 8 * weight.numel() * weight.element_size())
    p = _Problem(input, offset, weight, stride, padding, dilation, mask, budget)
    cout = p.out_channels
    shape = (input.shape[0], cout, p.out_h, p.out_w)
    memory_format = torch.channels_last if p.channels_last else torch.contiguous_format
    w = weight.detach()
    b = bias.detach() if bias is not None else None
    wg, cog = p.weight_groups, cout // p.weight_groups
    by_blocks, channel_major, steps = _forward_plan(p, w)
    if by_blocks:
        return _forward_by_blocks(p, w, b, shape, memory_format, steps)
    w_mat = w.reshape(wg, cog, p.cw * p.taps).contiguous() if channel_major else p.weight_rows(w)
    # _gemm's operand, transposed once for all tiles (not used where oneDNN runs)
    w_t = [None] * wg if _onednn(w_mat, w_mat.shape[2]) else w_mat.transpose(1, 2).contiguous()
    biases = [b] if wg == 1 else [None if b is None else b[gw * cog : (gw + 1) * cog]
                                  for gw in range(wg)]  # fmt: skip
    out = None
    for tile, tile_np, cols_shape, layout, blocks, dims in steps:
        n0, r0, c0, nb, rb, wb = tile
        cols = p.sample(tile_np, cols_shape, layout, blocks)
        parts = [_matmul(cols[gw], w_mat[gw], w_t[gw], biases[gw]) for gw in range(wg)]
        res = parts[0] if wg == 1 else torch.cat(parts, dim=1)
        if not p.channels_last:  # into NCHW by a blocked transpose, not torch's permuted copy
            if out is None:
                out = torch.empty(shape, dtype=p.dtype)
            _run(_rows_to_nchw, num_chunks(nb * rb, res.numel(), per_thread=1), res, out, dims)
            continue
        res = res.view(nb, rb, wb, cout).permute(0, 3, 1, 2)
        if len(steps) == 1:
            return res.contiguous(memory_format=memory_format)
        if out is None:
            out = torch.empty(shape, dtype=p.dtype, memory_format=memory_format)
        out[n0 : n0 + nb, :, r0 : r0 + rb, c0 : c0 + wb] = res
    if out is None:  # an empty batch
        out = torch.empty(shape, dtype=p.dtype, memory_format=memory_format)
    return out


#: Output channels per weight group up to which dL/dcols (a reduction over them) runs on BLAS:
#: measured exact across 1-4 threads there on both CPUs this was developed on (MKL on Intel
#: split longer reductions between threads when the tile has few positions, 256 channels and
#: up). Beyond it, oneDNN's matmul, exact up to ``ONEDNN_MAX_REDUCTION``.
BLAS_MAX_REDUCTION = 128

#: Samples a position per weight group (kernel taps x channels) up to which the backward's kernels
#: write the weight gradient's samples transposed, [K, P], block by block while in cache, for
#: oneDNN's matmul over contiguous positions. Handed [P, K] (a transposed view) it reorders them
#: itself: 1.6-2x slower than on [K, P]. The kernels' transposes cost about as much where K is
#: wider. Measured, forward+backward: 64 channels 3x3 (K = 576) 4-11 % faster; 32 and 16
#: channels even; 64 channels 5x5 (1600) 1 % faster; 128 channels (1152) 10 % and 256 (2304)
#: 16 % slower.
TRANSPOSED_SAMPLES_MAX_K = 576


def _grad_samples(g, w_mat, shape):
    """dL/dcols [P, wg, kh*kw*cw] of one tile: ``g`` [P, Cout] times each weight group's matrix.

    On BLAS it goes into a buffer kept between calls: oneDNN's matmul (no ``out=``) returns a
    fresh tile-sized one, which costs a page fault per 4 KiB on every call (measured on
    2x64x56x56: 3700 faults and a quarter of the forward+backward time)."""
    wg, cog = w_mat.shape[:2]
    if g.dtype == torch.float32 and cog <= BLAS_MAX_REDUCTION:
        gc = _scratch("grad_samples", math.prod(shape), g.dtype, shape)
        for gw in range(wg):
            torch.mm(g[:, gw * cog : (gw + 1) * cog], w_mat[gw], out=gc[:, gw])
        return gc
    if _onednn(g, cog):
        parts = [_onednn_linear(g[:, gw * cog : (gw + 1) * cog], w_mat[gw].t(), None, "none", [], "")
                 for gw in range(wg)]  # fmt: skip
        return parts[0].view(shape) if wg == 1 else torch.stack(parts, dim=1)
    gc = torch.empty(shape, dtype=g.dtype)
    for gw in range(wg):
        _gemm(g[:, gw * cog : (gw + 1) * cog], w_mat[gw], gc[:, gw])
    return gc


#: Segments of the batch the backward by blocks splits its work into, whatever the threads: each
#: adds its images' share of the weight gradient into a slice of its own.
BACKWARD_SEGMENTS = FUSED_BACKWARD_IMAGES


def _backward_blocks_fit(p: _Problem, need_taps: bool) -> bool:
    """Whether the backward's sampling gradients run by blocks: where the forward does
    (``FORWARD_GEMM``, the same size of block), with the segments' weight gradients within
    ``KEPT_BYTES``."""
    weight_bytes = p.out_channels * p.taps * p.cw * p.pad.element_size()
    return need_taps and _by_blocks(p, False) and BACKWARD_SEGMENTS * weight_bytes <= KEPT_BYTES


def _backward_by_blocks(p: _Problem, need_taps: bool) -> bool:
    """Whether the whole backward runs by blocks (``_backward_blocks``): where its sampling
    gradients can (``_backward_blocks_fit``), on batches of at least ``BACKWARD_SEGMENTS`` images
    (the segments are whole images, each thread's own for the input gradient). Batches of 2 to
    ``BACKWARD_SEGMENTS`` - 1 run ``_backward_blocks_taps`` on their tiles, then the rows' pass
    for the input gradient (``_backward_tile_by_blocks``)."""
    return int(p.geo[_BATCH]) >= BACKWARD_SEGMENTS and _backward_blocks_fit(p, need_taps)


def _blocks_operands(p: _Problem, grad_out, w_mat):
    """What the backward's block kernels read of the weight and dL/dout: the weight matrix
    ``w_mat`` (``_Problem.weight_rows``), dL/dout flat in its own memory format, and whether
    that format is channels last. Made once a call."""
    grad_channels_last = _is_channels_last(grad_out)
    return w_mat, grad_out if grad_channels_last else grad_out.contiguous(), grad_channels_last


def _backward_blocks_run(p: _Problem, operands, need, grad_offset, grad_mask, grad_pad):
    """dL/dW (as ``_Problem.weight_matrix``), with the other gradients written into the buffers
    given, by ``_backward_blocks``; ``operands`` from ``_blocks_operands``."""
    need_input, _, need_weight, _ = need
    w_mat, grad_out, grad_channels_last = operands
    tile = np.array([0, 0, 0, p.geo[_BATCH], p.out_h, p.out_w], dtype=np.int64)
    parts = torch.zeros((BACKWARD_SEGMENTS if need_weight else 0, *w_mat.shape), dtype=p.dtype)
    no_input = parts.new_empty(0)
    _run(_backward_blocks, BACKWARD_SEGMENTS, *p.sources, p.geo, p.runs, tile,
         p.column_layout(tile), w_mat, grad_out, grad_channels_last, need_weight, need_input,
         grad_offset, grad_mask, grad_pad if need_input else no_input, parts,
         _MKL)  # fmt: skip
    if not need_weight:
        return None
    grad_w_mat = parts[0].clone()
    for part in parts[1:]:  # in order: the same sum whatever the threads
        grad_w_mat += part
    return grad_w_mat


def _backward_tile_by_blocks(p: _Problem, tile, operands, need, grad_offset, grad_mask, grad_pad,
                             grad_w_mat) -> None:
    """One tile's backward: ``_backward_blocks_taps`` over ``BACKWARD_SEGMENTS`` fixed segments
    of its blocks (dL/dsamples into a tile buffer, the offset and mask gradients, the weight
    gradient's partial sums, added to ``grad_w_mat`` in order), then ``_backward_input``."""
    need_input, _, need_weight, _ = need
    w_mat, grad_out, grad_channels_last = operands
    nb, rb, wb = tile[3:]
    shape = (nb * rb * wb, p.weight_groups, p.taps * p.cw)
    gc = _scratch("grad_samples", math.prod(shape), p.dtype)
    parts = torch.zeros((BACKWARD_SEGMENTS if need_weight else 0, *w_mat.shape), dtype=p.dtype)
    tile_np, layout = np.array(tile, dtype=np.int64), p.column_layout(tile)
    item_rows = np.empty(2 * nb * rb, dtype=np.int64)
    _run(_backward_blocks_taps, BACKWARD_SEGMENTS, *p.sources, p.geo, p.runs, tile_np, layout,
         w_mat, grad_out, grad_channels_last, need_weight, gc, grad_offset, grad_mask, item_rows,
         parts, _MKL)  # fmt: skip
    if need_input:
        _run(_backward_input, num_chunks(nb * (p.geo[_H] + 3), gc.numel()), *p.sources[1:],
             p.geo, p.runs, tile_np, layout, gc, item_rows, grad_pad)  # fmt: skip
    for part in parts:  # in order: the same sum whatever the threads
        grad_w_mat += part


def backward(grad_out, input, offset, weight, stride, padding, dilation, mask, need):
    """Gradients (input, offset, weight, mask) for the flags in ``need``; None where not needed."""
    need_input, need_offset, need_weight, need_mask = need
    need_taps = need_input or need_offset or need_mask
    # dL/dW sums over a tile's positions: tiles no longer than oneDNN runs exactly (past it,
    # ``_gemm``, several times slower; 8-channel layers reached it within the budget)
    longest = ONEDNN_MAX_REDUCTION if need_weight and _onednn(input, 1) else None
    taps, (out_h, out_w) = weight.shape[2] * weight.shape[3], offset.shape[-2:]
    image_bytes = out_h * out_w * taps * input.shape[1] * input.element_size()  # an image's samples
    budget = BACKWARD_TILE_BYTES if image_bytes <= BACKWARD_TILE_BYTES else BACKWARD_ROWS_TILE_BYTES
    p = _Problem(input, offset, weight, stride, padding, dilation, mask, budget, longest)
    wg, cog = p.weight_groups, p.out_channels // p.weight_groups
    # contiguous, by a kernel (torch's permuted copy of a 512 x 512 x 3 x 3 weight: 0.7 ms)
    w_mat = p.weight_rows(weight)
    grad_pad = _buffer("grad_pad", p.pad.shape, p.dtype, zero=True) if need_input else None
    grad_offset = torch.empty(offset.shape, dtype=p.dtype)
    # without a mask its gradient is computed into a scratch buffer and dropped
    grad_mask = torch.empty(offset[:, : offset.shape[1] // 2].shape, dtype=p.dtype)
    grad_out = grad_out.detach()
    tiles = p.tiles
    # by blocks on batches of 2 or more (batch 1 measured 1-4 % slower: few blocks to split)
    by_blocks = _backward_blocks_fit(p, need_taps) and int(p.geo[_BATCH]) >= 2
    operands = _blocks_operands(p, grad_out, w_mat) if by_blocks else None
    if by_blocks and _backward_by_blocks(p, need_taps):
        grad_w_mat = _backward_blocks_run(p, operands, need, grad_offset, grad_mask, grad_pad)
        tiles = []
    else:  # the tiles add their shares into it; one tile's share of one weight group is it
        # (no weight-sized accumulator to zero and add into: 1 ms of a 512-channel layer's call)
        alone = len(tiles) == 1 and wg == 1 and not by_blocks
        grad_w_mat = torch.zeros_like(w_mat) if need_weight and not alone else None
    for tile in tiles:
        n0, r0, c0, nb, rb, wb = tile
        positions = nb * rb * wb
        if by_blocks:
            _backward_tile_by_blocks(p, tile, operands, need, grad_offset, grad_mask, grad_pad,
                                     grad_w_mat)  # fmt: skip
            continue
        # [Cout, P], P in the column order (n, row, column), and g its [P, Cout] view
        g_t = grad_out[n0 : n0 + nb, :, r0 : r0 + rb, c0 : c0 + wb].permute(1, 0, 2, 3)
        g_t = g_t.reshape(p.out_channels, positions)
        g = g_t.t()
        shape = (positions, wg, p.taps * p.cw)
        # the weight gradient's samples: [wg, K, P] for oneDNN where worth it (its positions,
        # the reduction, contiguous), else the layout of dL/dcols, [P, wg, K]
        transposed = (need_taps and need_weight and _onednn(g_t, positions)
                      and p.taps * p.cw <= TRANSPOSED_SAMPLES_MAX_K)  # fmt: skip
        if need_taps:
            gc = _grad_samples(g, w_mat, shape)
            samples = _scratch("samples", math.prod(shape), p.dtype) if need_weight else None
            cols = samples.view(shape) if need_weight and not transposed else gc
            tile_np, layout = np.array(tile, dtype=np.int64), p.column_layout(tile)
            gc_flat = gc.view(-1)
            cols_t = samples if transposed else gc_flat[:0]
            item_rows = np.empty(2 * nb * rb, dtype=np.int64)
            blocks = _block_count(tile)
            if need_input and nb >= FUSED_BACKWARD_IMAGES:
                _run(_backward_fused, num_chunks(nb, gc.numel()), *p.sources, p.geo, p.runs,
                            tile_np, layout, gc_flat, need_weight, cols, grad_offset,
                            grad_mask, grad_pad, cols_t)  # fmt: skip
                need_input_pass = False
            else:
                _run(_backward_taps, num_chunks(blocks, gc.numel()), *p.sources, p.geo, p.runs,
                            tile_np, layout, gc_flat, need_weight, cols, grad_offset,
                            grad_mask, item_rows, cols_t)  # fmt: skip
                need_input_pass = need_input
            if need_input_pass:
                _run(_backward_input, num_chunks(nb * (p.geo[_H] + 3), gc.numel()),
                            *p.sources[1:], p.geo, p.runs, tile_np, layout, gc_flat, item_rows,
                            grad_pad)  # fmt: skip
        elif need_weight:
            cols = p.columns(tile)
        if need_weight:
            # oneDNN's matmul, exact across thread counts up to its limit: on the samples the
            # kernels wrote transposed, else on a transposed view of them (which it reorders)
            onednn = _onednn(g_t, positions)
            for gw in range(wg):
                rows = g_t[gw * cog : (gw + 1) * cog]  # contiguous
                if transposed:
                    part = samples.view(wg, p.taps * p.cw, positions)[gw]
                    share = _onednn_linear(part, rows, None, "none", [], "").t()
                elif onednn:
                    share = _onednn_linear(rows, cols[:, gw].t(), None, "none", [], "")
                else:
                    if grad_w_mat is None:
                        grad_w_mat = torch.zeros_like(w_mat)
                    _gemm(rows, cols[:, gw], grad_w_mat[gw], accumulate=True)
                    continue
                if grad_w_mat is None:  # the one share
                    grad_w_mat = share[None]
                else:
                    grad_w_mat[gw] += share
    grad_input = None
    if need_input:
        height, width = input.shape[-2:]
        if p.channels_last:
            grad_input = grad_pad[:, 1 : height + 1, 1 : width + 1].permute(0, 3, 1, 2)
            grad_input = grad_input.contiguous(memory_format=torch.channels_last)
        else:
            grad_input = torch.empty(input.shape, dtype=p.dtype)
            chunks = num_chunks(input.shape[0] * height, grad_input.numel(), per_thread=1)
            _run(_rows_to_nchw, chunks, grad_pad, grad_input, _unpadding(p.geo))
    grad_weight = None
    if need_weight:
        grad_weight = p.weight_gradient(grad_w_mat)
    return (grad_input, grad_offset if need_offset else None, grad_weight,
            grad_mask if need_mask and mask is not None else None)  # fmt: skip
