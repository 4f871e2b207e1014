"""The harness itself: Triton is the selected set on CPU tensors here, and numba cannot run."""

import pytest
import torch

from deformable.ops import deform_conv2d, deform_roi_pool, kernels, use_kernels


def test_triton_is_selected_on_cpu_tensors():
    assert kernels.requested() == "triton"
    assert kernels.select("cpu") == "triton"


def test_numba_kernels_cannot_run_here():
    with use_kernels("numba"), pytest.raises(AssertionError, match="a numba kernel ran"):
        deform_conv2d(torch.rand(1, 1, 3, 3), torch.zeros(1, 2, 3, 3), torch.rand(1, 1, 1, 1))
    with use_kernels("numba"), pytest.raises(AssertionError, match="a numba kernel ran"):
        deform_roi_pool(torch.rand(1, 1, 3, 3), torch.tensor([[0.0, 0, 0, 2, 2]]), 1)
