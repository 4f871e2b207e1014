"""run_chunked: every chunk runs exactly once, and the caller never waits for an idle pool thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from deformable.ops import _parallel


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_every_chunk_once(two_threads):
    seen = []
    _parallel.run_chunked(lambda tag, chunk, chunks: seen.append((tag, chunk, chunks)), 9, "x")
    assert sorted(seen) == [("x", c, 9) for c in range(9)]


def test_caller_does_not_wait_for_a_busy_pool_thread(two_threads):
    """A pool thread that gets no core in time (here: busy with something else) claims nothing;
    the caller runs every chunk itself and returns without waiting for it."""
    pool = _parallel._get_pool(1)
    release = threading.Event()
    pool.submit(release.wait, 30)  # the only pool thread is busy until released
    ran_by = []
    start = time.perf_counter()
    try:
        _parallel.run_chunked(lambda chunk, chunks: ran_by.append(threading.get_ident()), 8)
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert ran_by == [threading.get_ident()] * 8
    assert elapsed < 5


def test_an_error_is_raised_after_the_other_chunks(two_threads):
    finished = []

    def kernel(chunk, chunks):
        if chunk == 0:
            raise ValueError("chunk 0")
        time.sleep(0.01)
        finished.append(chunk)

    with pytest.raises(ValueError, match="chunk 0"):
        _parallel.run_chunked(kernel, 4)
    assert sorted(finished) == [1, 2, 3]
