"""The Triton RoI-pooling kernels compile for a real GPU, on a machine without one.

The interpreter runs kernels as Python and skips Triton's front end (types of loop-carried
values, constexpr branches, scalar / block mixing) and the NVIDIA backend. Compiling to a cubin
for sm_80 (ptxas ships with Triton) checks both; each kernel is built once with its heaviest
flags and the GPU tile of :func:`deformable.ops._triton_roi._tile`.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted in this process", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deformable.ops import _triton_roi  # noqa: E402

FLOATS = ("spatial_scale", "gamma")
INT64_POINTERS = ("row_end", "keys", "src", "seg_start", "seg_key", "order")
BLOCK_B, BLOCK_C, NUM_WARPS = _triton_roi._tile(49, 256)
TILE = dict(BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C)
FULL = dict(ALIGNED=True, HAS_OFFSET=True)

KERNELS = {
    "forward": ("_forward_kernel", dict(FULL, PS=False, HAS_MASK=True, GROUPED=False, **TILE)),
    "forward_ps_grouped": ("_forward_kernel",
                           dict(FULL, PS=True, HAS_MASK=False, GROUPED=True, **TILE)),
    "offset_grad": ("_offset_grad_kernel", dict(FULL, PS=False, HAS_MASK=True, NEED_OFFSET=True,
                                                NEED_MASK=True, **TILE)),
    "input_grad_ps_grouped": ("_input_grad_kernel",
                              dict(FULL, PS=True, HAS_MASK=False, GROUPED=True, **TILE)),
    "contributions": ("_contributions_kernel",
                      dict(FULL, PS=True, HAS_MASK=False, BLOCK_S=64)),
    "segment_sum": ("_segment_sum_kernel", dict(ACCUMULATE=True, BLOCK_P=32, BLOCK_C=16)),
}


def signature(kernel, constexprs):
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in FLOATS:
            types[name] = "fp32"
        elif name in INT64_POINTERS:
            types[name] = "*i64"
        elif name == "counts":
            types[name] = "*i32"
        elif name in ("inp", "out", "grad_out", "off", "msk", "g_rows"):
            types[name] = "*fp16"  # half types are read natively
        elif name in ("boxes", "grad_inp", "grad_off", "grad_msk", "wts", "grad"):
            types[name] = "*fp32"
        else:
            types[name] = "i32"
    return types


@pytest.mark.parametrize("name", KERNELS)
def test_compiles_for_sm80(name):
    kernel_name, constexprs = KERNELS[name]
    kernel = getattr(_triton_roi, kernel_name)
    source = ASTSource(kernel, signature(kernel, constexprs), constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 80, 32),
                              options={"num_warps": NUM_WARPS})  # fmt: skip
    assert compiled.asm["cubin"], "ptxas produced no cubin"
    ptx = compiled.asm["ptx"]
    if name.startswith("input_grad"):
        assert "red.global" in ptx or "atom.global" in ptx, "the scatter lost its atomics"
    else:
        assert "red.global" not in ptx and "atom.global" not in ptx, f"{name} uses atomics"
