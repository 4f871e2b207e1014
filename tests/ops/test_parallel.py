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


def test_kernels_on_torch_openmp_threads_match_the_pool(two_threads, monkeypatch):
    """The conv kernels run on torch's OpenMP threads where torch runs on OpenMP; on the pool
    (the fallback elsewhere) they give bit-identical results."""
    from deformable.ops import deform_conv2d

    if not _parallel.openmp_available():
        pytest.skip("torch does not run on an OpenMP runtime here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 20, 20, generator=g)
    offset = torch.randn(4, 18, 20, 20, generator=g) * 2
    weight = torch.randn(16, 32, 3, 3, generator=g)
    mask = torch.rand(4, 9, 20, 20, generator=g)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, offset, weight, mask)]
        out = deform_conv2d(leaves[0], leaves[1], leaves[2], padding=1, mask=leaves[3])
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in leaves]

    on_openmp = run()
    monkeypatch.setattr(_parallel, "_openmp_parallel", False)
    assert not _parallel.openmp_available()
    on_pool = run()
    for a, b in zip(on_openmp, on_pool):
        assert torch.equal(a, b)


def test_channels_last_tensors_handed_to_the_pool(two_threads, monkeypatch):
    """The kernels take tensors by their memory: a channels-last input and output reach the
    pool's kernels (as numpy arrays of that memory) as they reach OpenMP's."""
    from deformable.ops import deform_conv2d

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 10, generator=g).contiguous(memory_format=torch.channels_last)
    offset = torch.randn(2, 18, 12, 10, generator=g)
    weight = torch.randn(8, 16, 3, 3, generator=g)
    expected = deform_conv2d(x, offset, weight, padding=1)
    assert expected.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(_parallel, "_openmp_parallel", False)
    assert not _parallel.openmp_available()
    assert torch.equal(deform_conv2d(x, offset, weight, padding=1), expected)
