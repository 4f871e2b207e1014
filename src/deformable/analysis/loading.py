"""Inputs of the analysis tools read from files: trained networks and images, with errors that
name the file (``ExplainError``), never a traceback for a file a user handed over."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

__all__ = ["CANVAS", "ExplainError", "load_digitnet", "load_image"]

#: side of the demo's images (TransformedDigits' default canvas)
CANVAS = 40


class ExplainError(ValueError):
    """Bad input to ``deformable explain`` (reported without a traceback)."""


def load_digitnet(path: str) -> tuple[nn.Module, str, dict]:
    """``(model in eval mode, variant, data options)`` from a checkpoint of a DigitNet: written by
    ``deformable demo`` (``<variant>.pt``) or ``deformable train classify --model digitnet-*``
    (``last.pt``); ``data options`` holds the ``copies`` of its digits.

    Raises CheckpointError naming the file if it is missing, unreadable or unsafe (it is read by
    :func:`deformable.engine.load_checkpoint`: it cannot run code), ExplainError if it is not a
    DigitNet checkpoint.
    """
    from deformable.models.digitnet import VARIANTS, DigitNet

    from deformable.engine.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)  # a CheckpointError names the file; nothing of it runs
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_spec"), dict):
        # `deformable train classify` on the digits: same network, its own key names
        name = str(checkpoint["model_spec"].get("model", ""))
        if not name.startswith("digitnet-"):
            raise ExplainError(f"checkpoint {path!r} holds a {name!r}; explain draws DigitNet "
                               "checkpoints (deformable demo, or train classify --model digitnet-*)")  # fmt: skip
        checkpoint = {"variant": name.split("-", 1)[1], "state_dict": checkpoint["model"],
                      # the demo records its digit copies; train's digits: TransformedDigits' default
                      "config": {"copies": 4, **checkpoint.get("data_options", {})}}  # fmt: skip
    if not isinstance(checkpoint, dict) or not {"variant", "state_dict"} <= set(checkpoint):
        raise ExplainError(f"{path!r} is not a checkpoint of `deformable demo` or `deformable "
                           "train` (expected a dict with keys 'variant' and 'state_dict', or "
                           "'model_spec' and 'model')")  # fmt: skip
    variant = checkpoint["variant"]
    if variant not in VARIANTS:
        raise ExplainError(f"checkpoint {path!r} has variant {variant!r}; expected one of "
                           f"{VARIANTS}")  # fmt: skip
    model = DigitNet(variant)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ExplainError(f"checkpoint {path!r} does not fit a DigitNet({variant!r}): "
                           f"{error}") from None  # fmt: skip
    return model.eval(), variant, dict(checkpoint.get("config") or {})


def load_image(path: str, *, size: int = CANVAS, invert: bool = False) -> Tensor:
    """A PNG / JPEG file as a grayscale ``Tensor[1, size, size]`` in ``[0, 1]``.

    Raises ExplainError naming the file if it is missing or not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ExplainError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as opened:
            gray = opened.convert("L").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ExplainError(f"cannot read image {path!r}: {error}") from None
    pixels = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8)
    image = pixels.view(1, size, size).float() / 255
    return 1 - image if invert else image
