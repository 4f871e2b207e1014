"""deform_conv2d's Triton kernels compile for a GPU, on a machine without one.

The interpreter (``tests/triton_interpreted``) checks what the kernels compute, not that Triton's
compiler accepts them: types of loop-carried values, ``tl.dot`` shapes and operand dtypes, the
constexpr branches. Here every kernel goes through Triton's whole NVIDIA pipeline down to a
cubin (ptxas ships with triton), for sm_80, in the dtypes the op runs natively.
"""

from __future__ import annotations

import pytest
import triton

from deformable.ops import _triton_conv

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_triton_conv.INTERPRETED, reason="kernels are interpreted in this process"),
    pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="no NVIDIA backend"),
]


def compile_for_gpu(kernel, pointers: dict, constexprs: dict, arch: int = 80):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints64 = {"nowhere", "m_start", "m_end"}
    signature = {name: "constexpr" if name in constexprs else
                 pointers.get(name, "i64" if name in ints64 else "i32")
                 for name in kernel.arg_names}  # fmt: skip
    source = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=4, num_stages=2))  # fmt: skip


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_sm80(dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, leave no cache
    p = "*" + dtype
    common = dict(KH=3, KW=2, HAS_MASK=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32,
                  PRECISION="ieee", UPCAST=False)  # fmt: skip
    compile_for_gpu(_triton_conv._forward_kernel,
                    dict(x_ptr=p, off_ptr=p, mask_ptr=p, w_ptr=p, b_ptr=p, out_ptr=p),
                    dict(common, HAS_BIAS=True))  # fmt: skip
    compile_for_gpu(_triton_conv._grad_weight_kernel,
                    dict(x_ptr=p, off_ptr=p, mask_ptr=p, gout_ptr=p, runs_ptr="*i32",
                         part_ptr="*fp32"), common)  # fmt: skip
    for deterministic in (False, True):
        compile_for_gpu(_triton_conv._grad_sample_kernel,
                        dict(x_ptr=p, off_ptr=p, mask_ptr=p, w_ptr=p, gout_ptr=p, gx_ptr="*fp32",
                             goff_ptr=p, gmask_ptr=p, gs_ptr="*fp32", key_ptr="*i64",
                             cw_ptr="*fp32"),
                        dict(common, NEED_OFFSET=True, NEED_MASK=True, NEED_INPUT=True,
                             DETERMINISTIC=deterministic))  # fmt: skip
    compile_for_gpu(_triton_conv._scatter_reduce_kernel,
                    dict(gx_ptr="*fp32", gs_ptr="*fp32", cw_ptr="*fp32", order_ptr="*i64",
                         seg_key_ptr="*i64", seg_start_ptr="*i64", seg_count_ptr="*i64"),
                    dict(BLOCK_E=16, BLOCK_C=32))  # fmt: skip


def test_image_sizes_are_not_specialised():
    """One binary per layer shape class: Triton specialises integer arguments (== 1, multiple of
    16) unless told not to; the sizes that change with the batch and the image are told."""
    varying = {"M", "m_start", "m_end", "nowhere", "per_split", "P", "H", "W", "Wo"}
    for kernel in (_triton_conv._forward_kernel, _triton_conv._grad_sample_kernel,
                   _triton_conv._grad_weight_kernel):  # fmt: skip
        present = varying & set(kernel.arg_names)
        assert present >= {"P", "H", "W", "Wo"}
        assert {p.name for p in kernel.params if p.do_not_specialize} == present
