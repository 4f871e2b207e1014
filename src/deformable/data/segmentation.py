"""Semantic segmentation data: VOC-style folders, and the generated scenes written as one.

The folder layout is PASCAL VOC 2012's::

    ROOT/JPEGImages/<id>.jpg             the images (any extension of IMAGE_EXTENSIONS)
    ROOT/SegmentationClass/<id>.png      one class index per pixel: an index (one channel) or
                                         palette PNG; 255 = ignore (VOC's object outlines)
    ROOT/ImageSets/Segmentation/train.txt, val.txt   the ids of each split, one per line
    ROOT/classes.txt                     optional: the class names, one per line, background first

:func:`generate_segmentation_scenes` writes that layout from the detection scene generator
(:mod:`deformable.data.scenes`): its images, with every pixel of an object's (visible) instance
mask labelled with the object's category (1..13) and the rest background (0).
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from deformable.data.folder import IMAGE_EXTENSIONS, DataError
from deformable.data.scenes import CATEGORIES

__all__ = ["IGNORE_INDEX", "SCENE_CLASSES", "SegmentationFolder", "collate_segmentation",
           "generate_segmentation_scenes", "read_classes", "segmentation_data", "segmentation_scenes",
           "voc_palette"]  # fmt: skip

#: the label of pixels that are neither scored nor trained on (VOC's)
IGNORE_INDEX = 255
#: the classes of the generated scenes: background, then the detection scenes' categories
SCENE_CLASSES = ["background"] + CATEGORIES


def voc_palette() -> list[int]:
    """PASCAL VOC's colour map (768 values: R, G, B of indices 0..255; 0 black, 255 cream), so
    the generated masks look like VOC's in an image viewer."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def _split_file(root: str, split: str) -> str:
    return os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")


def generate_segmentation_scenes(root: str, split: str, count: int, *, size: int = 128,
                                 max_objects: int = 4, seed: int = 0) -> str:  # fmt: skip
    """Write ``count`` scenes of ``split`` under ``root`` as a VOC-style folder; returns ``root``.

    The scenes are those :func:`deformable.data.scenes.generate_scenes` writes with the same
    arguments, and each one's class map is drawn from its objects' instance masks (their visible
    parts: where an object's opacity is at least 0.5 and no later object covers it so), each
    labelled with its category (``1 + index`` in :data:`~deformable.data.scenes.CATEGORIES`),
    background (0) elsewhere. Images are the generator's lossless PNGs (named
    ``<split>_<n>.png`` under ``JPEGImages/``, as VOC keeps every split in one folder), masks
    palette PNGs; the split file is written last, so a split whose file exists is complete.
    ``classes.txt`` names the 14 classes.
    """
    import json
    import tempfile

    from PIL import Image

    from deformable.data.masks import decode_segmentation
    from deformable.data.scenes import generate_scenes

    for folder in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    palette = voc_palette()
    ids = []
    with tempfile.TemporaryDirectory(dir=root) as scenes:
        with open(generate_scenes(scenes, split, count, size=size, max_objects=max_objects, seed=seed)) as f:
            coco = json.load(f)
        objects: dict[int, list] = {image["id"]: [] for image in coco["images"]}
        for annotation in coco["annotations"]:
            objects[annotation["image_id"]].append(annotation)
        for image in coco["images"]:
            labels = torch.zeros(image["height"], image["width"], dtype=torch.uint8)
            for annotation in objects[image["id"]]:  # visible parts: they do not overlap
                instance = decode_segmentation(annotation["segmentation"], image["height"], image["width"])
                labels[instance.bool()] = annotation["category_id"]
            name = f"{split}_{image['id']:06d}"
            os.replace(os.path.join(scenes, split, image["file_name"]),
                       os.path.join(root, "JPEGImages", f"{name}.png"))  # fmt: skip
            mask = Image.fromarray(labels.numpy())
            mask.putpalette(palette)  # a palette PNG, as VOC's
            mask.save(os.path.join(root, "SegmentationClass", f"{name}.png"))
            ids.append(name)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(SCENE_CLASSES) + "\n")
    with open(_split_file(root, split), "w") as f:
        f.write("\n".join(ids) + "\n")
    return root


def read_classes(root: str) -> list[str] | None:
    """The names in ``root/classes.txt`` (one per line, background first), or None without it."""
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"{path!r} names no classes (one name per line, background first)")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"{path!r} names {len(names)} classes; at most {IGNORE_INDEX} fit below the "
                        f"ignore index {IGNORE_INDEX}")  # fmt: skip
    return names


def _read_mask(path: str):
    """The mask at ``path`` as a uint8 numpy array, or a DataError naming it."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DataError(f"mask {path!r} is a {image.mode} image: expected an index PNG (one "
                                "channel, a class index per pixel) or a palette PNG")  # fmt: skip
            return np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"mask {path!r} cannot be read: {exc}") from exc


class SegmentationFolder(Dataset):
    """The ``split`` of a VOC-style folder (layout in :mod:`deformable.data.segmentation`) as
    ``(image [3, H, W] float in [0, 1], mask [H, W] int64)``; mask values are class indices in
    ``0..num_classes-1`` or :data:`IGNORE_INDEX` (255).

    Every mask is read once when the set is made, so bad data fails before training does: a
    missing split file, image or mask, a mask that is not an index or palette PNG, a mask whose
    size differs from its image's, or a class index of ``num_classes`` or more (other than 255)
    raises a DataError naming the file. ``num_classes=None`` leaves the count to the caller:
    :attr:`max_label` is the largest class index found.

    Args:
        root (str): the folder.
        split (str): ``train`` or ``val`` (``ImageSets/Segmentation/<split>.txt``).
        num_classes (int, optional): classes of the masks, background included.
        image_size (int, optional): resize every image (bilinear) and mask (nearest) so that its
            longer side is ``image_size`` (aspect kept). Default: None (as they are).
    """

    def __init__(self, root: str, split: str, *, num_classes: int | None = None,
                 image_size: int | None = None) -> None:  # fmt: skip
        from PIL import Image, UnidentifiedImageError

        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):  # fmt: skip
            raise ValueError(f"SegmentationFolder: image_size must be a positive int or None, got {image_size!r}")
        if not os.path.isdir(root):
            raise DataError(f"--data {root!r}: no such folder (or use --data scenes)")
        split_file = _split_file(root, split)
        if not os.path.isfile(split_file):
            raise DataError(f"split file {split_file!r} does not exist: a VOC-style folder lists the "
                            f"ids of its '{split}' images there, one per line")  # fmt: skip
        with open(split_file) as f:
            ids = [line.strip() for line in f if line.strip()]
        if not ids:
            raise DataError(f"split file {split_file!r} lists no images")
        image_dir = os.path.join(root, "JPEGImages")
        if not os.path.isdir(image_dir):
            raise DataError(f"image folder {image_dir!r} does not exist")
        images = {}
        for name in sorted(os.listdir(image_dir)):  # sorted: .jpg before .png for the same id
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                images.setdefault(stem, os.path.join(image_dir, name))
        self.samples: list[tuple[str, str]] = []
        self.max_label = 0
        for id_ in ids:
            if id_ not in images:
                raise DataError(f"image {id_!r} of {split_file!r} is not in {image_dir!r}")
            mask_path = os.path.join(root, "SegmentationClass", f"{id_}.png")
            if not os.path.isfile(mask_path):
                raise DataError(f"mask {mask_path!r} (image {id_!r} of {split_file!r}) does not exist")
            mask = _read_mask(mask_path)
            try:
                with Image.open(images[id_]) as image:
                    width, height = image.size
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"image {images[id_]!r} cannot be read: {exc}") from exc
            if mask.shape != (height, width):
                raise DataError(f"mask {mask_path!r} is {mask.shape[1]}x{mask.shape[0]} pixels but its "
                                f"image {images[id_]!r} is {width}x{height}")  # fmt: skip
            labels = mask[mask != IGNORE_INDEX]
            largest = int(labels.max()) if labels.size else 0
            if num_classes is not None and largest >= num_classes:
                raise DataError(f"mask {mask_path!r} holds class {largest}, out of range: "
                                f"{num_classes} classes are 0..{num_classes - 1} "
                                f"({IGNORE_INDEX} = ignore)")  # fmt: skip
            self.max_label = max(self.max_label, largest)
            self.samples.append((images[id_], mask_path))
        self.root, self.split, self.ids, self.image_size = root, split, ids, image_size
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError

        image_path, mask_path = self.samples[index]
        try:
            with Image.open(image_path) as image:
                image = image.convert("RGB")
                size = self._size(image.size)
                if size != image.size:
                    image = image.resize(size, Image.BILINEAR)
                pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"image {image_path!r} cannot be read: {exc}") from exc
        mask = Image.fromarray(_read_mask(mask_path))
        if size != mask.size:
            mask = mask.resize(size, Image.NEAREST)
        width, height = size
        image = pixels.view(height, width, 3).permute(2, 0, 1).float() / 255
        labels = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).view(height, width)
        return image, labels.long()

    def _size(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.image_size is None:
            return size
        scale = self.image_size / max(size)
        return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def collate_segmentation(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and masks of any sizes in one batch: padded at the bottom and right to the largest
    (images with 0, masks with :data:`IGNORE_INDEX`, so padding is neither trained nor scored).

    Example:
        >>> images, masks = collate_segmentation([(torch.ones(3, 2, 3), torch.zeros(2, 3).long()),
        ...                                        (torch.ones(3, 4, 1), torch.ones(4, 1).long())])
        >>> images.shape, masks.shape, masks[1, :, 1].tolist(), masks[0, 3].tolist()
        (torch.Size([2, 3, 4, 3]), torch.Size([2, 4, 3]), [255, 255, 255, 255], [255, 255, 255])
    """
    height = max(image.shape[1] for image, _ in batch)
    width = max(image.shape[2] for image, _ in batch)
    images = torch.zeros(len(batch), 3, height, width)
    masks = torch.full((len(batch), height, width), IGNORE_INDEX, dtype=torch.long)
    for i, (image, mask) in enumerate(batch):
        images[i, :, : image.shape[1], : image.shape[2]] = image
        masks[i, : mask.shape[0], : mask.shape[1]] = mask
    return images, masks


def segmentation_scenes(folder: str, *, counts: tuple[int, int] = (600, 150), size: int = 128) -> str:
    """``folder`` holding the generated scenes as a VOC-style folder (``counts`` training and
    validation scenes of ``size`` pixels), written there unless it is already; returns ``folder``."""
    for split, count in zip(("train", "val"), counts):
        if not os.path.isfile(_split_file(folder, split)):
            generate_segmentation_scenes(folder, split, count, size=size)
    return folder


def segmentation_data(folder: str, *, num_classes: int | None = None, image_size: int | None = None):
    """``(train, val, classes)`` of a VOC-style folder. The classes are named by
    ``folder/classes.txt`` if there is one (``num_classes``, if given, must agree), else they are
    ``num_classes`` (default: the largest index in the masks, plus one) named by their index.
    Raises DataError naming what is wrong."""
    names = read_classes(folder) if os.path.isdir(folder) else None
    if names is not None:
        if num_classes is not None and num_classes != len(names):
            raise DataError(f"{os.path.join(folder, 'classes.txt')!r} names {len(names)} classes, "
                            f"not {num_classes}")  # fmt: skip
        num_classes = len(names)
    train = SegmentationFolder(folder, "train", num_classes=num_classes, image_size=image_size)
    val = SegmentationFolder(folder, "val", num_classes=num_classes, image_size=image_size)
    if num_classes is None:
        num_classes = max(train.max_label, val.max_label) + 1
        train.num_classes = val.num_classes = num_classes
    return train, val, names or [str(i) for i in range(num_classes)]
