"""COCO-format detection data (a json file + an image folder), in torchvision's detection format."""

from __future__ import annotations

import json
import os

import torch
from torch.utils.data import Dataset

from deformable.data.folder import DataError


class CocoDetection(Dataset):
    """Items ``(image [3, H, W] float in [0, 1], target)`` with ``target`` = ``{"boxes":
    Tensor[N, 4] (x1, y1, x2, y2), "labels": Tensor[N] (1..num_classes, 0 is background),
    "image_id": int}`` — what torchvision's detection models take.

    Category ids of the file map to labels 1..C in the order of ``categories``; ``category_ids``
    maps back. Crowd annotations are skipped. The file is checked when the data set is made: a
    missing or malformed file, an annotation with a bad box or an unknown image / category raise
    a DataError naming the file and the entry; a missing image raises one when it is read.
    """

    def __init__(self, images_dir: str, annotation_file: str) -> None:
        if not os.path.isfile(annotation_file):
            raise DataError(f"annotation file {annotation_file!r} does not exist")
        if not os.path.isdir(images_dir):
            raise DataError(f"image folder {images_dir!r} does not exist")
        try:
            with open(annotation_file) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"annotation file {annotation_file!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                 for k in ("images", "annotations", "categories")):  # fmt: skip
            raise DataError(f"annotation file {annotation_file!r} is not COCO: it needs the lists "
                            "'images', 'annotations' and 'categories'")  # fmt: skip
        self.images_dir, self.annotation_file, self.coco = images_dir, annotation_file, data
        try:
            self.categories = [c["name"] for c in data["categories"]]
            self.category_ids = [int(c["id"]) for c in data["categories"]]
            self.images = {int(im["id"]): im for im in data["images"]}
            for im in self.images.values():
                str(im["file_name"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"annotation file {annotation_file!r}: an image or category entry "
                            f"lacks {exc} (images need id and file_name, categories id and name)") from exc  # fmt: skip
        if not self.images:
            raise DataError(f"annotation file {annotation_file!r} lists no images")
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.ids = sorted(self.images)
        self.targets: dict[int, list] = {i: [] for i in self.ids}
        for ann in data["annotations"]:
            where = f"annotation file {annotation_file!r}, annotation {ann.get('id', '?')}"
            if ann.get("iscrowd", 0):
                continue
            bbox = ann.get("bbox")
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0):  # fmt: skip
                raise DataError(f"{where}: bbox must be [x, y, width, height] with width, height > 0, "
                                f"got {bbox!r}")  # fmt: skip
            if ann.get("image_id") not in self.targets:
                raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
            if ann.get("category_id") not in label_of:
                raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
            x, y, w, h = bbox
            self.targets[ann["image_id"]].append((x, y, x + w, y + h, label_of[ann["category_id"]]))

    @property
    def num_classes(self) -> int:
        """Categories plus the background class."""
        return len(self.categories) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        image_id = self.ids[index]
        path = os.path.join(self.images_dir, self.images[image_id]["file_name"])
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                width, height = image.size
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except FileNotFoundError as exc:
            raise DataError(f"image {path!r} (id {image_id} in {self.annotation_file!r}) does not exist") from exc
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"image {path!r} cannot be read: {exc}") from exc
        image = pixels.view(height, width, 3).permute(2, 0, 1).float() / 255
        rows = torch.tensor(self.targets[image_id], dtype=torch.float32).view(-1, 5)
        return image, {"boxes": rows[:, :4], "labels": rows[:, 4].long(), "image_id": image_id}


def collate(batch):
    """Detection batches are lists: images of any size, one target dict each."""
    images, targets = zip(*batch)
    return list(images), list(targets)
