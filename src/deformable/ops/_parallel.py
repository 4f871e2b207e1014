"""Run a nogil numba kernel over a fixed partition of its work on a small thread pool.

The kernels take ``(chunk, num_chunks)`` and derive their own slice of the work from it, so the
partition (and with it every floating-point summation order) depends only on the number of
chunks, never on which thread ran what: results are bit-identical from run to run.

A plain thread pool rather than numba's ``parallel=True``: numba's threading layers either spin
after a parallel region (OpenMP: it would steal the cores from the oneDNN convolution that runs
right after each sampling pass) or abort the process when two Python threads launch kernels at
once (workqueue). Threads here just block, and any number of callers may share the pool.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None


def num_chunks() -> int:
    """How many chunks to split a kernel's work into: the threads torch is allowed to use."""
    return max(1, torch.get_num_threads())


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


def run_chunked(kernel, chunks: int, *args) -> None:
    """Call ``kernel(*args, chunk, chunks)`` for every chunk, in parallel, and wait for all."""
    if chunks <= 1:
        kernel(*args, 0, 1)
        return
    pool = _get_pool(chunks - 1)
    futures = [pool.submit(kernel, *args, t, chunks) for t in range(1, chunks)]
    error = None
    try:
        kernel(*args, 0, chunks)
    except BaseException as exc:  # still wait for the others: they write into shared buffers
        error = exc
    for future in futures:
        try:
            future.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
