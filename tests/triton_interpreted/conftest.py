"""The Triton kernels on CPU tensors, under Triton's interpreter.

Collected only in a process that set ``TRITON_INTERPRET=1`` before triton was first imported:
``tests/ops/test_triton_interpreted.py`` starts that process (with ``DEFORMABLE_KERNELS=triton``)
and fails unless every test here passed. In that process the numba kernels raise if called, so
a test here cannot pass by running them instead of Triton.
"""

import os

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETED:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _numba_kernels_forbidden(monkeypatch):
    from deformable.ops import _deform_conv_cpu, _deform_roi_pool_cpu

    def forbidden(*args, **kwargs):
        raise AssertionError("a numba kernel ran in the Triton interpreter tests")

    for module in (_deform_conv_cpu, _deform_roi_pool_cpu):
        for name in ("forward", "backward", "ps_forward", "ps_backward"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)
