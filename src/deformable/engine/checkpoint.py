"""Checkpoints that cannot run code when loaded, written so that no crash destroys the last one.

Reading: every checkpoint is loaded with ``torch.load(weights_only=True)``, which unpickles
tensors, numbers, strings, lists, tuples and dicts only — never calls a function the file names.
A file that needs anything else is refused (:class:`CheckpointError`) before anything of it runs.
What the trainers save (model, optimiser, scheduler, RNG states, config, history, model spec) is
made of those types.

Writing (:func:`save_checkpoint`, :func:`durable_write`): to a temporary file beside the target,
flushed and ``fsync``-ed, renamed over the target (atomic on POSIX), then the folder ``fsync``-ed
so the rename itself survives a power cut. A failed write (disk full, no permission) removes the
temporary file, leaves the previous file intact and raises :class:`WriteError` naming the file.
"""

from __future__ import annotations

import os
import pickle
from typing import BinaryIO, Callable

import torch

__all__ = ["CheckpointError", "WriteError", "durable_write", "load_checkpoint", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, cannot be read, or is not safe to load."""


class WriteError(RuntimeError):
    """A file of a run (checkpoint, metrics) could not be written; the previous one is intact."""


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders (Windows): the rename is what we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; nothing more can be done there
    finally:
        os.close(fd)


def durable_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, made durable, then renamed over
    ``path``. Readers see the old file or the new one, never a part; after a crash or power cut
    at any point, ``path`` holds one of the two. Raises WriteError naming ``path`` when the
    folder or the file cannot be written."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
        raise WriteError(f"cannot write {path!r}: {error}; the previous file, if any, is intact") from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_folder(folder)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save(state)`` to ``path``, durably and atomically (:func:`durable_write`)."""
    durable_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """The state saved by :func:`save_checkpoint`, loaded without running any code of the file.

    Raises CheckpointError naming the file if it is missing, unreadable, not a dict, or holds
    objects other than tensors, numbers, strings, lists, tuples and dicts (which a
    ``weights_only`` load refuses: unpickling them could run code).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's weights_only unpickler names the global (class or function) it refused
        refused = [line.strip() for line in str(error).splitlines() if "global" in line.lower()
                   and "weights_only" not in line]  # fmt: skip
        if not refused:  # not a refusal: a file that is not a pickle at all
            raise CheckpointError(f"checkpoint {path!r} cannot be read: it is not a torch.save "
                                  "file") from None  # fmt: skip
        what = refused[0].split(". Please")[0].removeprefix("WeightsUnpickler error: ").rstrip(".")
        raise CheckpointError(
            f"checkpoint {path!r} holds objects other than tensors, numbers, strings, lists and "
            f"dicts ({what}); it was not loaded, because loading it could run code"
        ) from None
    except Exception as error:  # torch raises many kinds for a truncated or foreign file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, not a dict")
    return state
