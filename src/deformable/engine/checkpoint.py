"""Checkpoints written atomically: an interrupted write never destroys the previous one."""

from __future__ import annotations

import os

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing or cannot be read."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save(state)`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state saved by :func:`save_checkpoint`, or a CheckpointError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, not a dict")
    return state
