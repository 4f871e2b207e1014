"""Run a nogil numba kernel over a fixed partition of its work on a small thread pool.

The kernels take ``(chunk, num_chunks)`` and derive their own slice of the work from it, so the
partition (and with it every floating-point summation order) depends only on the number of
chunks, never on which thread ran what: results are bit-identical from run to run.

Threads pull chunks from a shared counter, so a thread that starts late does less. That matters
here: after each of its parallel regions torch's OpenMP workers spin on their core for a while,
and a static split would make every kernel that follows a torch op wait for its slowest half.

A plain thread pool rather than numba's ``parallel=True``: numba's threading layers either spin
after a parallel region (OpenMP: it would steal the cores from the oneDNN convolution that runs
right after each sampling pass) or abort the process when two Python threads launch kernels at
once (workqueue). Threads here just block, and any number of callers may share the pool.

Better still, where torch runs on OpenMP (its Linux wheels), :func:`run_openmp` runs a kernel on
torch's own OpenMP threads (``GOMP_parallel`` of the runtime torch loaded, called with a numba
``cfunc``): the workers that spin after torch's last op pick the kernel up at once, instead of
holding the cores the pool threads need (measured on this 2-core machine: right after a
convolution, a sampling pass took 4x as long on the pool as on torch's threads).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None


def num_threads() -> int:
    """The threads the kernels use: as many as torch is allowed to use."""
    return max(1, torch.get_num_threads())


#: Below this many elementary operations a kernel runs in one chunk on the calling thread:
#: waking a pool thread costs more than it saves.
SERIAL_WORK = 1 << 16


def num_chunks(work_items: int, total_work: int, per_thread: int = 4) -> int:
    """A partition of ``work_items`` into a few chunks per thread (at least one item each)."""
    if total_work < SERIAL_WORK:
        return 1
    return max(1, min(work_items, per_thread * num_threads()))


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)  # a forked child has no pool threads: make its own
    with _lock:
        if _pool_key != key:
            if _pool is not None and _pool_key is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deformable")
            _pool_key = key
        return _pool


class _Run:
    """The chunks of one ``run_chunked`` call: handed out in order, counted when finished."""

    def __init__(self, kernel, chunks: int, args) -> None:
        self.kernel, self.chunks, self.args = kernel, chunks, args
        self.next = itertools.count()  # next() on it is atomic under the GIL
        self.lock = threading.Lock()
        self.unfinished = chunks
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def work(self) -> None:
        for chunk in iter(self.next.__next__, None):
            if chunk >= self.chunks:
                return
            try:
                self.kernel(*self.args, chunk, self.chunks)
            except BaseException as exc:  # the caller raises it once every chunk is over
                self.error = self.error or exc
            finally:
                with self.lock:
                    self.unfinished -= 1
                    if self.unfinished == 0:
                        self.finished.set()


def run_chunked(kernel, chunks: int, *args) -> None:
    """Call ``kernel(*args, chunk, chunks)`` for every chunk, in parallel, and wait for all.

    The caller waits for the chunks, not for the pool threads: a pool thread that gets no core
    in time (right after a torch op, torch's OpenMP workers spin on the cores for milliseconds)
    claims nothing, and the caller does the work itself instead of waiting for it to wake up
    (measured: 6 ms lost per call that way, more than the work itself on small tiles).
    """
    threads = min(num_threads(), chunks)
    if threads <= 1:
        for chunk in range(chunks):
            kernel(*args, chunk, chunks)
        return
    run = _Run(kernel, chunks, args)
    pool = _get_pool(threads - 1)
    for _ in range(threads - 1):
        pool.submit(run.work)
    run.work()
    run.finished.wait()  # chunks other threads claimed and still run: they write shared buffers
    if run.error is not None:
        raise run.error


_openmp_lock = threading.Lock()
_openmp_parallel = None  # GOMP_parallel of torch's OpenMP runtime, once looked up (False: none)


def _torch_openmp():
    """``GOMP_parallel`` of the OpenMP runtime torch's intra-op threads run on, or None.

    Looked up among the libraries loaded from torch's own ``lib`` folder (the runtime its Linux
    wheels ship): a second OpenMP runtime in the process would have its own threads.
    """
    global _openmp_parallel
    if _openmp_parallel is not None:  # looked up already (False: there is none)
        return _openmp_parallel or None
    with _openmp_lock:
        if _openmp_parallel is None:
            _openmp_parallel = False
            wanted = os.environ.get("DEFORMABLE_OPENMP", "1") != "0"
            if wanted and "OpenMP" in torch.__config__.parallel_info():
                lib_dir = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
                try:
                    with open("/proc/self/maps") as maps:
                        paths = {line.split()[-1] for line in maps if "/" in line}
                except OSError:
                    paths = set()
                for path in sorted(paths):
                    name = os.path.basename(path)
                    if (os.path.dirname(os.path.realpath(path)) == lib_dir
                            and name.startswith(("libgomp", "libiomp"))):  # fmt: skip
                        try:
                            function = ctypes.CDLL(path).GOMP_parallel
                        except (OSError, AttributeError):
                            continue
                        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint,
                                             ctypes.c_uint]  # fmt: skip
                        function.restype = None
                        _openmp_parallel = function
                        break
        return _openmp_parallel or None


def openmp_available() -> bool:
    """Whether :func:`run_openmp` can run kernels on torch's OpenMP threads."""
    return _torch_openmp() is not None


def run_openmp(task_address: int, descriptor: int, threads: int) -> None:
    """Run a numba ``cfunc`` ``task(descriptor)`` on ``threads`` (>= 1) of torch's OpenMP
    threads; ``descriptor`` is the address of the task's arguments.

    The task claims chunks from a counter in the descriptor (atomically), so the partition is
    the caller's, whatever thread runs which chunk. ctypes releases the GIL for the call.
    """
    _torch_openmp()(task_address, descriptor, threads, 0)
