"""Argument normalisation and checks shared by the operators."""

from __future__ import annotations

import torch
from torch import Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPUTED_IN_FLOAT32 = (torch.float16, torch.bfloat16)


def pair(value, name: str, *, minimum: int) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of ints ≥ ``minimum``, or a ValueError naming ``name``."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        items = tuple(value)
    else:
        items = (value, value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return items


def check_same(named: dict[str, Tensor | None], op: str) -> None:
    """All given tensors are floating point, of one dtype and on one device."""
    present = {k: t for k, t in named.items() if t is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.dtype not in _FLOATING:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                "all tensors must share one dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on one device"
            )


#: Tensor types that are tensors and nothing more (a Parameter overrides no torch function).
_PLAIN = (Tensor, torch.nn.Parameter)


def direct_call(*tensors, eager: bool = False) -> bool:
    """Whether an op's public function may run its kernel itself instead of through its
    torch.library op: the op's dispatch costs 60-110 us a call, 5-10 % of a batch-1 ResNet
    layer's forward (measured on 2 cores). Only where nothing needs the op: plain CPU or CUDA
    tensors (the devices its kernel is registered for) that need no gradient (the autograd
    formula is the op's), in eager mode, with nothing that records or redirects ops
    (torch.compile and torch.export, jit tracing, a dispatch or function mode such as
    FakeTensorMode, functorch transforms, the profiler). ``eager``: the caller knows it runs
    outside torch.compile / torch.export (the check costs 5 us where it runs cold)."""
    if not eager and torch.compiler.is_compiling():
        return False
    if torch._C._get_tracing_state() is not None:
        return False
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._are_functorch_transforms_active() or torch._C._autograd._profiler_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.device.type not in ("cpu", "cuda")
                              or (grad and t.requires_grad)):  # fmt: skip
            return False
    return True


def autocast_dtype(*tensors) -> torch.dtype | None:
    """The autocast dtype of the first tensor's device when autocast is on there, else None."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return None
    return torch.get_autocast_dtype(first.device.type)


def cast_floating(dtype: torch.dtype, *tensors):
    """Floating-point tensors of ``tensors`` as ``dtype`` (anything else passes)."""
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


def upcast(*tensors):
    """float16 / bfloat16 tensors as float32 (None passes); returns them and the original dtype."""
    dtype = next(t.dtype for t in tensors if t is not None)
    if dtype not in _COMPUTED_IN_FLOAT32:
        return tensors, dtype
    return tuple(None if t is None else t.float() for t in tensors), dtype


def reference_grads(fn, grad_out: Tensor, tensors, output_mask) -> list:
    """Gradients of ``fn(*tensors)`` for the flags of ``output_mask`` (None elsewhere).

    Through ``torch.func.vjp``, not ``torch.autograd.grad``: inside an op's kernel the dispatcher
    has switched autograd off (below the op's own autograd formula), and only functorch's
    transforms record a graph there.
    """
    wanted = [i for i, (t, need) in enumerate(zip(tensors, output_mask)) if need and t is not None]
    results = [None] * len(tensors)
    if not wanted:
        return results

    def partial(*chosen):
        full = list(tensors)
        for i, t in zip(wanted, chosen):
            full[i] = t
        return fn(*full)

    _, vjp = torch.func.vjp(partial, *(tensors[i] for i in wanted))
    for i, grad in zip(wanted, vjp(grad_out)):
        results[i] = grad
    return results
