"""Users' own classification data: an image folder with ``train/`` and ``val/`` class folders."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """Data that cannot be used as it is; the message names the file or folder."""


class ImageFolderSplit(Dataset):
    """``root/<split>/<class>/<image>`` as ``(image [C, size, size] in [0, 1], class index)``.

    Classes are the sub-folder names in sorted order (``classes``); ``channels`` is 1 (grayscale)
    or 3 (RGB). Images are read lazily; an unreadable image raises a DataError naming it.
    """

    def __init__(self, root: str, split: str, *, size: int, channels: int,
                 classes: list[str] | None = None) -> None:  # fmt: skip
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataError(f"{folder!r} is not a folder: expected {root!r} to hold '{split}/' "
                            "with one sub-folder per class")  # fmt: skip
        found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        if not found:
            raise DataError(f"{folder!r} has no class folders (expected {split}/<class>/<image>)")
        if classes is not None and found != classes:
            raise DataError(f"{folder!r} has classes {found}, but the training data has {classes}")
        self.classes = found
        self.samples = []
        for index, name in enumerate(found):
            directory = os.path.join(folder, name)
            files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))
            self.samples += [(os.path.join(directory, f), index) for f in files]
        if not self.samples:
            raise DataError(f"{folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if channels not in (1, 3):
            raise ValueError(f"ImageFolderSplit: channels must be 1 or 3, got {channels!r}")
        self.size = size
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode).resize((self.size, self.size), Image.BILINEAR)
                data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"image {path!r} cannot be read: {exc}") from exc
        channels = 1 if self.mode == "L" else 3
        data = data.view(self.size, self.size, channels).permute(2, 0, 1).float() / 255
        return data, label
