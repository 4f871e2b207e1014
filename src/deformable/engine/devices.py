"""Devices and mixed precision as the trainers, evaluators and benchmarks use them.

- :func:`resolve_device`: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or
  ``cuda:N``; under ``torchrun`` a bare ``cuda`` means the process's own GPU (``LOCAL_RANK``).
  A device that is not there is a :class:`DeviceError` saying so.
- :func:`autocast`: ``torch.autocast`` for ``amp`` = ``bf16`` / ``fp16`` (a no-op for ``none``);
  :func:`grad_scaler`: the gradient scaler fp16 needs (disabled otherwise).
- :func:`to_device`: a batch (tensors inside tuples, lists and dicts) moved to a device.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["AMP_DTYPES", "DeviceError", "autocast", "grad_scaler", "model_device", "resolve_device",
           "to_device"]

#: ``--amp`` values and their autocast dtypes
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """A device that was asked for is not there."""


def resolve_device(name: str = "auto") -> torch.device:
    """The ``torch.device`` of ``--device NAME`` on this machine (see the module docstring)."""
    if not isinstance(name, str):
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    name = name.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"--device {name}: the trainers run on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available here "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")  # fmt: skip
    count = torch.cuda.device_count()
    index = device.index
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: one process per GPU
    if not 0 <= index < count:
        raise DeviceError(f"--device {name}: cuda:{index} does not exist; this machine has {count} "
                          f"CUDA device(s), cuda:0 to cuda:{count - 1}")  # fmt: skip
    return torch.device("cuda", index)


def autocast(device: torch.device, amp: str):
    """The autocast context of ``amp`` on ``device`` (nothing for ``none``)."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """The gradient scaler of ``amp`` on ``device``: enabled for fp16 only (bf16 has float32's
    range, so its gradients do not underflow)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (the CPU for one that has none)."""
    for tensor in [*model.parameters(), *model.buffers()][:1]:
        return tensor.device
    return torch.device("cpu")


def to_device(batch, device: torch.device):
    """``batch`` with every tensor inside (tuples, lists, dicts) on ``device``; pinned CPU memory
    is copied asynchronously."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
