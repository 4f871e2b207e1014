"""Timing and memory measurement shared by the benchmark suites."""

from __future__ import annotations

import gc
import platform
import re
import statistics
import time

import torch

__all__ = ["cpu_name", "cuda_peak_extra_mib", "median_ms", "peak_extra_mib", "unsupported"]


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux: from ``cpuinfo``), for the header of a CPU table: ratios
    against ``F.conv2d`` depend on it (oneDNN's and MKL's kernels, the vector width)."""
    try:
        with open(cpuinfo) as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


#: Rounds of turns a CPU timing takes (``median_ms``).
CPU_ROUNDS = 3


def median_ms(fns: dict, repeats: int, device: torch.device | str = "cpu") -> dict:
    """Median time (ms) of each function over ``repeats`` runs after a warm-up.

    One function at a time, not in turns: torch's OpenMP workers and onnxruntime's pool spin
    for a while after each parallel region, so a function run right after another one's would
    be charged for its neighbour's spinning threads. On a CUDA ``device`` each run is timed by
    CUDA events around it (the GPU's time, not the launch's), after the device is idle.

    On the CPU the functions take ``CPU_ROUNDS`` rounds of such turns (each a warm-up, which
    also absorbs the previous function's spinning threads, then ``repeats`` runs), and each
    keeps the smallest of its medians: on a machine shared with other work the load comes and
    goes over seconds, and a function timed in one quiet or busy stretch only was off by up to
    3x against its neighbours (measured: F.conv2d from 2.3 to 7.4 ms a call between runs).
    """
    device = torch.device(device)
    rounds = 1 if device.type == "cuda" else CPU_ROUNDS
    medians: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()  # warm-up: compilation (numba, Triton), allocator, caches
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                else:
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times) * 1e3)
    return {name: min(values) for name, values in medians.items()}


def cuda_peak_extra_mib(fn, accounted_bytes: int, device: torch.device) -> float:
    """Rise of ``torch.cuda.max_memory_allocated`` while ``fn`` runs on ``device``, less
    ``accounted_bytes`` (what it returns: outputs, gradients)."""
    fn()  # warm-up: workspaces, Triton's compiled kernels
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0.0, torch.cuda.max_memory_allocated(device) - before - accounted_bytes) / 2**20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _release_freed_memory() -> bool:
    """Make glibc hand freed blocks back to the OS at once, so RSS follows live memory."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so big blocks are mmapped
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_extra_mib(fn, accounted_bytes: int) -> float | None:
    """Rise of the peak RSS while ``fn`` runs, less ``accounted_bytes`` (outputs, gradients)."""
    if not _release_freed_memory():
        return None
    fn()  # warm-up under the fixed threshold, then let go of what it freed
    gc.collect()
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0.0, (peak - before) * 1024 - accounted_bytes) / 2**20


def unsupported(error: Exception) -> str:
    """A short reason from the error of an implementation that lacks a dtype (torchvision's
    kernels say '"roi_align_forward_kernel" not implemented for 'BFloat16'' after a file path)."""
    match = re.search(r"\"?[\w.]+\"? not implemented for '\w+'", str(error))
    return match.group(0) if match else str(error).strip().splitlines()[0][:120]
