"""The data sets a training command names with ``--data``: bundled, generated, or a folder of
the user's.

- classification: ``digits`` (the bundled transformed digits) or an image folder with
  ``train/<class>/*`` and ``val/<class>/*``;
- detection: ``scenes`` (generated once into a folder, COCO format) or a COCO-format folder with
  ``annotations_train.json`` + ``train/`` and ``annotations_val.json`` + ``val/``.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset, Subset

from deformable.data.coco import CocoDetection
from deformable.data.digits import TransformedDigits
from deformable.data.folder import DataError, ImageFolderSplit

__all__ = ["RepeatChannels", "classification_data", "detection_data", "generated_scenes"]


class RepeatChannels(Dataset):
    """A grayscale data set with its channel repeated ``channels`` times (e.g. RGB for a ResNet)."""

    def __init__(self, data: Dataset, channels: int) -> None:
        self.data, self.channels = data, channels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        image, label = self.data[index]
        return image.expand(self.channels, -1, -1), label


def _limited(data: Dataset, limit: int | None) -> Dataset:
    return data if limit is None else Subset(data, range(min(limit, len(data))))


def classification_data(source: str, *, channels: int, image_size: int, limit: int | None = None,
                        copies: int | None = None):  # fmt: skip
    """``(train, val, classes)``: ``source`` is ``"digits"`` or an image-folder path.

    ``channels`` is what the model takes (1 or 3), ``image_size`` the side folder images are
    resized to, ``limit`` keeps the first N training images, ``copies`` the transformed copies
    of each digit (TransformedDigits' default when None). Raises DataError naming what is wrong.
    """
    if source == "digits":
        options = {} if copies is None else {"copies": copies}
        train, val = TransformedDigits("train", **options), TransformedDigits("test", **options)
        classes = [str(i) for i in range(10)]
        if channels != 1:
            train, val = RepeatChannels(train, channels), RepeatChannels(val, channels)
    else:
        if not os.path.isdir(source):
            raise DataError(f"--data {source!r}: no such folder (or use --data digits)")
        train = ImageFolderSplit(source, "train", size=image_size, channels=channels)
        val = ImageFolderSplit(source, "val", size=image_size, channels=channels, classes=train.classes)
        classes = train.classes
    return _limited(train, limit), val, classes


def generated_scenes(folder: str, *, counts: tuple[int, int] = (600, 150), size: int = 128) -> str:
    """``folder`` holding the generated scene set (``counts`` training and validation scenes of
    ``size`` pixels), written there unless it is already; returns ``folder``."""
    from deformable.data.scenes import generate_scenes

    for split, count in zip(("train", "val"), counts):
        if not os.path.exists(os.path.join(folder, f"annotations_{split}.json")):
            generate_scenes(folder, split, count, size=size)
    return folder


def detection_data(folder: str, *, limit: int | None = None, masks: bool = False):
    """``(train, val)`` of a COCO-format folder (the layout :func:`generated_scenes` writes), with
    instance masks in the targets when ``masks`` (Mask R-CNN). Raises DataError naming what is
    wrong."""
    if not os.path.isdir(folder):
        raise DataError(f"--data {folder!r}: no such folder (or use --data scenes)")
    train = CocoDetection(os.path.join(folder, "train"), os.path.join(folder, "annotations_train.json"),
                          masks=masks)  # fmt: skip
    val = CocoDetection(os.path.join(folder, "val"), os.path.join(folder, "annotations_val.json"),
                        masks=masks)  # fmt: skip
    if train.categories != val.categories:
        raise DataError(f"{folder!r}: the train and val annotation files list different categories")
    return _limited(train, limit), val
