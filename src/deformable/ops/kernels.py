"""Which kernel set runs an operator: chosen by the tensors' device, or forced by the user.

- ``auto`` (the default): CPU tensors run the numba kernels; CUDA tensors the Triton kernels
  where Triton is importable, else the pure-PyTorch reference; any other device (MPS, XPU, ...)
  the reference.
- ``numba``, ``triton`` or ``reference`` forces one set, with the environment variable
  ``DEFORMABLE_KERNELS`` (read at every call) or with :func:`use_kernels` (which wins over the
  variable, for the block it wraps). Forcing a set that cannot run on the tensors' device raises
  :class:`KernelUnavailableError` saying why.

Triton runs on CPU tensors only under its interpreter: ``TRITON_INTERPRET=1`` set before triton
is first imported (what counts is that it is set before ``@triton.jit`` runs, when deformable's
Triton kernel modules are imported; one imported earlier is reported). That is how the Triton
kernels are tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Iterator

import torch

__all__ = ["ENV_VAR", "KERNEL_SETS", "KernelUnavailableError", "requested", "select", "use_kernels"]

#: The environment variable that forces a kernel set.
ENV_VAR = "DEFORMABLE_KERNELS"
#: What it (and :func:`use_kernels`) accepts.
KERNEL_SETS = ("auto", "numba", "triton", "reference")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("deformable_kernels", default=None)


class KernelUnavailableError(RuntimeError):
    """A forced kernel set cannot run on the tensors' device."""


def _validated(name, source: str) -> str:
    if name not in KERNEL_SETS:
        raise ValueError(f"{source} must be one of {', '.join(KERNEL_SETS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_kernels(name: str) -> Iterator[None]:
    """Run the operators of the block with one kernel set (``auto`` restores the default).

    Wins over ``DEFORMABLE_KERNELS``; applies to the current thread (and asyncio task).

    Example:
        >>> import torch
        >>> from deformable.ops import deform_conv2d, use_kernels
        >>> x, w = torch.rand(1, 2, 5, 5), torch.rand(3, 2, 3, 3)
        >>> offset = torch.rand(1, 18, 3, 3)
        >>> with use_kernels("reference"):
        ...     slow = deform_conv2d(x, offset, w)
        >>> torch.allclose(slow, deform_conv2d(x, offset, w), atol=1e-5)
        True
    """
    token = _override.set(_validated(name, "use_kernels: name"))
    try:
        yield
    finally:
        _override.reset(token)


def requested() -> str:
    """The kernel set asked for now: :func:`use_kernels`, else ``DEFORMABLE_KERNELS``, else auto."""
    name = _override.get()
    if name is not None:
        return name
    value = os.environ.get(ENV_VAR, "").strip().lower()
    return _validated(value, f"the environment variable {ENV_VAR}") if value else "auto"


def triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None: they can)."""
    if device.type not in ("cuda", "cpu"):
        return (f"the Triton kernels run on CUDA tensors (and on CPU tensors under Triton's "
                f"interpreter), not on {device.type} tensors")  # fmt: skip
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton cannot be imported ({error}); it ships with PyTorch's Linux wheels"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("the Triton kernels run on CPU tensors only under Triton's interpreter: set "
                "TRITON_INTERPRET=1 before triton is first imported")  # fmt: skip
    if device.type == "cpu":
        # @triton.jit picks interpreter or compiler when a kernel module is imported: one imported
        # before TRITON_INTERPRET=1 was set holds GPU kernels, which would fail on CPU pointers.
        compiled = sorted(name for name, module in list(sys.modules.items())
                          if name.startswith("deformable.ops._triton")
                          and getattr(module, "INTERPRETED", None) is False)  # fmt: skip
        if compiled:
            return (f"{compiled[0]} was imported before TRITON_INTERPRET=1 was set, so its kernels "
                    "are compiled for the GPU, not interpreted; set TRITON_INTERPRET=1 before "
                    "deformable's Triton kernels are first imported")  # fmt: skip
    return None


#: What :func:`requested` says where CPU tensors run the numba kernels (``select``'s rule, which
#: the ops' direct calls read too).
NUMBA_ON_CPU = ("auto", "numba")


def select(device: torch.device | str) -> str:
    """The kernel set (``numba``, ``triton`` or ``reference``) that runs on ``device`` now."""
    device = torch.device(device)
    name = requested()
    if device.type == "cpu" and name in NUMBA_ON_CPU:
        return "numba"
    if name == "auto":
        if device.type == "cuda" and triton_problem(device) is None:
            return "triton"
        return "reference"
    if name == "numba" and device.type != "cpu":
        raise KernelUnavailableError(
            f"{ENV_VAR}=numba: the numba kernels run on CPU tensors, got {device.type} tensors "
            "(use auto, triton or reference)"
        )
    if name == "triton":
        problem = triton_problem(device)
        if problem is not None:
            raise KernelUnavailableError(f"{ENV_VAR}=triton: {problem}")
    return name
