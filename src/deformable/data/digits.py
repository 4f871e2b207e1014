"""Transformed digits: scikit-learn's handwritten digits under random scale, rotation and aspect.

The 1,797 8x8 digits that ship with scikit-learn are drawn onto a larger canvas, each copy
scaled, rotated, stretched and moved at random: a small, real, bundled data set on which the
geometric variation that deformable layers are meant to absorb is the main difficulty. Every
image is a pure function of (split, seed): the test split is fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DigitTransforms:
    """Ranges of the random geometry (uniform in each range)."""

    #: digit height on the canvas, in units of its native 8 pixels
    scale: tuple[float, float] = (1.0, 3.2)
    #: rotation, degrees either way
    rotation: float = 40.0
    #: width / height stretch
    aspect: tuple[float, float] = (0.6, 1.6)


class TransformedDigits(Dataset):
    """scikit-learn's digits on a ``canvas`` x ``canvas`` image under random geometry.

    Base digits with index ``i % 4 == 0`` form the test split (450), the rest the train split
    (1,347); each base digit appears ``copies`` times, each copy under its own transform.

    Items are ``(image [1, canvas, canvas] float in [0, 1], label int)``. The transform of every
    item is kept in ``self.scale``, ``self.angle`` (degrees) and ``self.aspect`` for analysis.

    Args:
        split (str): ``"train"`` or ``"test"``.
        canvas (int): side of the square image in pixels. Default: 40.
        copies (int): transformed copies of each base digit. Default: 4.
        seed (int): seed of the transforms (the test split of seed 0 is the reference one).
        transforms (DigitTransforms): ranges of scale, rotation and aspect.

    Example:
        >>> data = TransformedDigits("test", copies=1)
        >>> len(data), data[0][0].shape, data[0][1]
        (450, torch.Size([1, 40, 40]), 0)
    """

    def __init__(self, split: str = "train", *, canvas: int = 40, copies: int = 4, seed: int = 0,
                 transforms: DigitTransforms = DigitTransforms()) -> None:  # fmt: skip
        if split not in SPLITS:
            raise ValueError(f"TransformedDigits: split must be one of {SPLITS}, got {split!r}")
        if not isinstance(canvas, int) or canvas < 8:
            raise ValueError(f"TransformedDigits: canvas must be an int >= 8, got {canvas!r}")
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"TransformedDigits: copies must be a positive int, got {copies!r}")
        from sklearn.datasets import load_digits  # ships its data: no download

        digits = load_digits()
        index = torch.arange(len(digits.target))
        keep = index % 4 == 0 if split == "test" else index % 4 != 0
        base = torch.as_tensor(digits.images, dtype=torch.float32)[keep] / 16.0
        labels = torch.as_tensor(digits.target)[keep]
        generator = torch.Generator().manual_seed(seed * 2 + SPLITS.index(split))
        count = len(base) * copies
        t = transforms

        def uniform(low, high):
            return low + (high - low) * torch.rand(count, generator=generator)

        self.scale = uniform(*t.scale)
        self.angle = uniform(-t.rotation, t.rotation)
        self.aspect = uniform(*t.aspect)
        # half extents of the digit on the canvas, in normalised canvas units ([-1, 1] spans it)
        half_h = self.scale * 8 / canvas
        half_w = half_h * self.aspect
        # keep the (rotated) digit's bounding circle mostly inside the canvas
        room = (1 - torch.maximum(half_h, half_w)).clamp_min(0)
        shift = torch.stack([uniform(-1, 1) * room, uniform(-1, 1) * room], dim=1)
        rad = self.angle * math.pi / 180
        cos, sin = torch.cos(rad), torch.sin(rad)
        # canvas point u = R S v + shift for digit point v; grid_sample needs v = (R S)^-1 (u - shift)
        forward = torch.stack([torch.stack([cos * half_w, -sin * half_h], -1),
                               torch.stack([sin * half_w, cos * half_h], -1)], -2)  # fmt: skip
        inverse = torch.linalg.inv(forward)
        theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)
        grid = F.affine_grid(theta, [count, 1, canvas, canvas], align_corners=False)
        source = base.repeat(copies, 1, 1)[:, None]
        self.images = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=False).clamp_(0, 1)  # fmt: skip
        self.labels = labels.repeat(copies)
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
