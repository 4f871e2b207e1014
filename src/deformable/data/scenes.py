"""Generated detection scenes in COCO format: digits and shapes of widely varying scale and aspect.

Each scene is a ``size`` x ``size`` RGB canvas holding 1 to ``max_objects`` objects that do not
overlap much: scikit-learn's handwritten digits (classes "0".."9") and filled shapes ("square",
"disk", "triangle"), each stretched by a random aspect and drawn at a random scale from small
(a few pixels high) to a third of the canvas, in a random colour on a noisy background. The set is
written as ``<root>/<split>/*.png`` plus ``<root>/annotations_<split>.json`` (COCO: images,
annotations with ``bbox = [x, y, width, height]``, ``segmentation`` and ``area``, categories), a
pure function of (split, seed).

An object's mask is the pixels where it dominates what is drawn: its opacity is at least 0.5
and no object drawn after it covers the pixel so (COCO's masks are the visible parts too).
``area`` is the mask's pixel count; ``bbox`` is the box the object was drawn into (a digit's
strokes may not reach all its edges), which the masks do not change. An object left with an
empty mask (hidden or too faint) would get no annotation; none of the generated sets used here
has one.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from deformable.data.masks import mask_to_polygons, mask_to_rle

DIGITS = [str(i) for i in range(10)]
SHAPES = ["square", "disk", "triangle"]
CATEGORIES = DIGITS + SHAPES
#: the formats ``generate_scenes`` writes masks in
SEGMENTATIONS = ("rle", "polygon")


def _shape_mask(kind: str, height: int, width: int) -> torch.Tensor:
    y = (torch.arange(height) + 0.5)[:, None] / height
    x = (torch.arange(width) + 0.5)[None, :] / width
    if kind == "square":
        return torch.ones(height, width)
    if kind == "disk":
        return (((y - 0.5) ** 2 + (x - 0.5) ** 2) <= 0.25).float()
    return ((x >= 0.5 - y / 2) & (x <= 0.5 + y / 2)).float()  # triangle, apex up


def _digit_mask(digit: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(digit[None, None], size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0].clamp(0, 1)  # fmt: skip


def _overlap(box, boxes) -> float:
    x, y, w, h = box
    best = 0.0
    for bx, by, bw, bh in boxes:
        ix = max(0.0, min(x + w, bx + bw) - max(x, bx))
        iy = max(0.0, min(y + h, by + bh) - max(y, by))
        best = max(best, ix * iy / min(w * h, bw * bh))
    return best


def generate_scenes(root: str, split: str, count: int, *, size: int = 128, max_objects: int = 4,
                    seed: int = 0, segmentation: str = "rle") -> str:  # fmt: skip
    """Write ``count`` scenes of ``split`` under ``root``; returns the annotation file's path.

    ``segmentation`` is the format of the masks: ``"rle"`` (compressed RLE) or ``"polygon"``
    (pixel-exact polygons, :func:`deformable.data.masks.mask_to_polygons`); the images, boxes
    and masks are the same either way."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if count < 1 or size < 32 or max_objects < 1:
        raise ValueError(f"generate_scenes: count >= 1, size >= 32 and max_objects >= 1 expected, "
                         f"got {count}, {size}, {max_objects}")  # fmt: skip
    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"generate_scenes: segmentation must be one of {SEGMENTATIONS}, got {segmentation!r}")
    encode = mask_to_rle if segmentation == "rle" else mask_to_polygons
    digits = load_digits()
    # digits of the 'test' split draw from a disjoint set of base digits
    pool = [i for i in range(len(digits.target)) if (i % 4 == 0) == (split != "train")]
    g = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, split)))
    folder = os.path.join(root, split)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []

    def rand():
        return torch.rand(1, generator=g).item()

    for image_id in range(1, count + 1):
        canvas = 0.15 * torch.rand(3, size, size, generator=g) + 0.1 * rand()
        boxes, masks, labels = [], [], []
        for _ in range(1 + int(rand() * max_objects)):
            category = int(rand() * len(CATEGORIES))
            height = max(6, int(size * (0.06 + 0.3 * rand() ** 1.5)))  # many small, some large
            width = max(4, min(size - 2, int(height * math.exp((rand() - 0.5) * 1.4))))
            for _attempt in range(20):
                x, y = int(rand() * (size - width)), int(rand() * (size - height))
                if _overlap((x, y, width, height), boxes) < 0.2:
                    break
            else:
                continue
            if category < 10:
                index = pool[int(rand() * len(pool))]
                digit = torch.as_tensor(digits.images[index], dtype=torch.float32) / 16
                while int(digits.target[index]) != category:  # a base digit of this class
                    index = pool[int(rand() * len(pool))]
                    digit = torch.as_tensor(digits.images[index], dtype=torch.float32) / 16
                alpha = _digit_mask(digit, height, width)
            else:
                alpha = _shape_mask(CATEGORIES[category], height, width)
            colour = 0.45 + 0.55 * torch.rand(3, 1, 1, generator=g)
            region = canvas[:, y : y + height, x : x + width]
            canvas[:, y : y + height, x : x + width] = region * (1 - alpha) + colour * alpha
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[y : y + height, x : x + width] = alpha >= 0.5
            for earlier in masks:
                earlier &= ~mask  # hidden behind this object
            boxes.append((x, y, width, height))
            masks.append(mask)
            labels.append(category + 1)
        for box, mask, label in zip(boxes, masks, labels):
            if not mask.any():
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": list(box), "segmentation": encode(mask),
                                "area": float(mask.sum()), "iscrowd": 0})  # fmt: skip
        name = f"{image_id:06d}.png"
        pixels = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, name))
        images.append({"id": image_id, "file_name": name, "height": size, "width": size})
    path = os.path.join(root, f"annotations_{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]}, f)  # fmt: skip
    return path
