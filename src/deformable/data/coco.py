"""COCO-format detection data (a json file + an image folder), in torchvision's detection format."""

from __future__ import annotations

import json
import os

import torch
from torch.utils.data import Dataset

from deformable.data.folder import DataError
from deformable.data.masks import decode_segmentation, segmentation_problem


class CocoDetection(Dataset):
    """Items ``(image [3, H, W] float in [0, 1], target)`` with ``target`` = ``{"boxes":
    Tensor[N, 4] (x1, y1, x2, y2), "labels": Tensor[N] (1..num_classes, 0 is background),
    "image_id": int}`` — what torchvision's detection models take. With ``masks=True`` the target
    also holds ``"masks": Tensor[N, H, W]`` (uint8), the instance masks in the order of the boxes
    (what torchvision's Mask R-CNN takes), decoded from the ``segmentation`` polygons or RLE
    (:mod:`deformable.data.masks`).

    Category ids of the file map to labels 1..C in the order of ``categories``; ``category_ids``
    maps back. Crowd annotations are skipped. The file is checked when the data set is made: a
    missing or malformed file, an annotation with a bad box, a malformed ``segmentation`` or an
    unknown image / category raise a DataError naming the file and the entry; a missing image
    raises one when it is read. A file without ``segmentation`` loads (``has_masks`` is False)
    unless ``masks=True`` asks for masks.
    """

    def __init__(self, images_dir: str, annotation_file: str, *, masks: bool = False) -> None:
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
        for image_id, im in self.images.items() if masks else ():
            if not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("height", "width")):
                raise DataError(f"annotation file {annotation_file!r}, image {image_id}: height and width "
                                "(positive ints) are needed to read masks")  # fmt: skip
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.ids = sorted(self.images)
        self.targets: dict[int, list] = {i: [] for i in self.ids}
        #: per image, (annotation id, segmentation or None) in the order of its targets
        self.segmentations: dict[int, list] = {i: [] for i in self.ids}
        #: every (non-crowd) annotation has a segmentation
        self.has_masks = True
        self.masks = masks
        for ann in data["annotations"]:
            where = f"annotation file {annotation_file!r}, annotation {ann.get('id', '?')}"
            segmentation = ann.get("segmentation")
            if segmentation is not None:  # crowd regions too: COCOeval reads them
                image_id = ann.get("image_id")
                image = self.images.get(image_id, {}) if isinstance(image_id, int) else {}
                problem = segmentation_problem(segmentation, image.get("height"), image.get("width"))
                if problem:
                    raise DataError(f"{where}: malformed segmentation: {problem}")
            if ann.get("iscrowd", 0):
                continue
            if segmentation is None:
                if masks:
                    raise DataError(f"{where}: no 'segmentation', and instance masks were asked for (a "
                                    "Mask R-CNN needs them: train a fasterrcnn model on box-only data; "
                                    "scenes generated before masks existed: delete their folder to "
                                    "regenerate them)")  # fmt: skip
                self.has_masks = False
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
            self.segmentations[ann["image_id"]].append((ann.get("id", "?"), segmentation))

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
        target = {"boxes": rows[:, :4], "labels": rows[:, 4].long(), "image_id": image_id}
        if self.masks:
            target["masks"] = self._masks(image_id, path, height, width)
        return image, target

    def _masks(self, image_id: int, path: str, height: int, width: int) -> torch.Tensor:
        masks = []
        for ann_id, segmentation in self.segmentations[image_id]:
            problem = segmentation_problem(segmentation, height, width)  # the image's real size
            if problem:
                raise DataError(f"annotation file {self.annotation_file!r}, annotation {ann_id} "
                                f"(image {path!r}): malformed segmentation: {problem}")  # fmt: skip
            masks.append(decode_segmentation(segmentation, height, width))
        return torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8)


def collate(batch):
    """Detection batches are lists: images of any size, one target dict each."""
    images, targets = zip(*batch)
    return list(images), list(targets)
