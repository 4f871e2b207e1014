"""Kernel selection: which set runs for which device and setting, and the reference through the
ops (what devices without a fast kernel run)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from deformable.ops import KernelUnavailableError, deform_ps_roi_pool, deform_roi_pool, use_kernels
from deformable.ops import kernels


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_auto_by_device(clean_env):
    assert kernels.select("cpu") == "numba"
    assert kernels.select("cuda") == "triton"  # triton ships with torch's Linux wheel
    assert kernels.select("mps") == "reference"
    assert kernels.select(torch.device("xpu", 0)) == "reference"


def test_auto_without_triton_falls_back_to_the_reference_on_cuda(clean_env):
    clean_env.setitem(__import__("sys").modules, "triton", None)  # import triton now fails
    assert kernels.select("cuda") == "reference"
    with pytest.raises(KernelUnavailableError, match="triton cannot be imported"):
        with use_kernels("triton"):
            kernels.select("cuda")


@pytest.mark.parametrize("name", ["numba", "reference"])
def test_environment_variable_forces_a_set(clean_env, name):
    clean_env.setenv(kernels.ENV_VAR, name)
    assert kernels.select("cpu") == name


def test_environment_variable_is_read_at_call_time(clean_env):
    assert kernels.select("cpu") == "numba"
    clean_env.setenv(kernels.ENV_VAR, " Reference ")
    assert kernels.select("cpu") == "reference"
    clean_env.setenv(kernels.ENV_VAR, "auto")
    assert kernels.select("cpu") == "numba"


def test_context_manager_wins_over_the_variable_and_restores(clean_env):
    clean_env.setenv(kernels.ENV_VAR, "reference")
    with use_kernels("numba"):
        assert kernels.select("cpu") == "numba"
        with use_kernels("auto"):
            assert kernels.select("mps") == "reference"
    assert kernels.select("cpu") == "reference"


def test_bad_names(clean_env):
    clean_env.setenv(kernels.ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match="DEFORMABLE_KERNELS must be one of auto, numba, triton, reference; got 'cudnn'"):
        kernels.select("cpu")
    with pytest.raises(ValueError, match="use_kernels: name must be one of"):
        with use_kernels("fast"):
            pass


def test_forcing_what_cannot_run(clean_env):
    with use_kernels("numba"), pytest.raises(KernelUnavailableError, match="numba kernels run on CPU"):
        kernels.select("cuda")
    with use_kernels("triton"):
        with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
            kernels.select("cpu")
        with pytest.raises(KernelUnavailableError, match="not on mps tensors"):
            kernels.select("mps")
        assert kernels.select("cuda") == "triton"
    # and through an op: the error reaches the caller before any kernel runs
    with use_kernels("triton"), pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        deform_roi_pool(torch.rand(1, 2, 5, 5), torch.tensor([[0.0, 0, 0, 3, 3]]), 2)


def _pool_runs(fn, tensors: dict, **kwargs):
    runs = {}
    for kernel_set in ("reference", "numba"):
        leaves = {k: t.detach().clone().requires_grad_() for k, t in tensors.items()}
        with use_kernels(kernel_set):
            out = fn(**leaves, **kwargs)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        runs[kernel_set] = out.detach(), {k: t.grad for k, t in leaves.items()}
    return runs


def test_roi_ops_reference_through_the_op_matches_numba():
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    boxes = torch.tensor([[0, 1.0, 1.5, 7.0, 6.0], [1, 0.0, 2.0, 10.0, 8.5], [1, 3.0, 3.0, 3.5, 4.0]],
                         dtype=torch.float64)  # fmt: skip
    offset = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    mask = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    runs = _pool_runs(deform_roi_pool, {"input": x, "offset": offset, "mask": mask}, boxes=boxes,
                      output_size=2, spatial_scale=0.9, sampling_ratio=2)  # fmt: skip
    ps_runs = _pool_runs(deform_ps_roi_pool, {"input": x, "offset": offset}, boxes=boxes,
                         output_size=2, spatial_scale=0.9)  # fmt: skip
    for pair in (runs, ps_runs):
        (slow, slow_grads), (fast, fast_grads) = pair["reference"], pair["numba"]
        assert_close(fast, slow)
        for name in slow_grads:
            assert_close(fast_grads[name], slow_grads[name], what=f"grad of {name}")
