"""Segmentation data: the generated scenes (the detection scenes with a class per pixel), VOC-style
folders with index and palette PNGs, and the errors that name the bad file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from deformable.data import DataError
from deformable.data.masks import decode_segmentation
from deformable.data.scenes import generate_scenes
from deformable.data.segmentation import (IGNORE_INDEX, SCENE_CLASSES, SegmentationFolder,
                                          generate_segmentation_scenes, segmentation_data,
                                          voc_palette)  # fmt: skip


def write_voc(root, split, masks, *, palette=False, image_sizes=None, ext=".jpg"):
    """A VOC-style split: one image per mask (``masks``: id -> uint8 array)."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(root / folder, exist_ok=True)
    for id_, mask in masks.items():
        height, width = (image_sizes or {}).get(id_, mask.shape)
        Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(root / "JPEGImages" / f"{id_}{ext}")
        image = Image.fromarray(np.asarray(mask, np.uint8))
        if palette:
            image.putpalette(voc_palette())
        image.save(root / "SegmentationClass" / f"{id_}.png")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(masks) + "\n")


def test_generated_scenes_are_the_detection_scenes_with_their_pixels(tmp_path):
    generate_segmentation_scenes(str(tmp_path / "voc"), "val", 6, size=48, max_objects=3)
    annotations = json.loads(open(generate_scenes(str(tmp_path / "coco"), "val", 6, size=48,
                                                  max_objects=3)).read())  # fmt: skip
    assert (tmp_path / "voc" / "classes.txt").read_text().split() == SCENE_CLASSES
    assert len(SCENE_CLASSES) == 14 and SCENE_CLASSES[0] == "background"
    data = SegmentationFolder(str(tmp_path / "voc"), "val", num_classes=14)
    assert data.ids == [f"val_{i:06d}" for i in range(1, 7)]
    for index in range(6):
        image, mask = data[index]
        coco = np.array(Image.open(tmp_path / "coco" / "val" / f"{index + 1:06d}.png"))
        assert torch.equal(image, torch.from_numpy(coco).permute(2, 0, 1).float() / 255)
        assert Image.open(tmp_path / "voc" / "SegmentationClass" / f"val_{index + 1:06d}.png").mode == "P"
        # the class map is the detection scenes' instance masks (their visible parts), each
        # labelled with its category, and lies in their boxes
        objects = [a for a in annotations["annotations"] if a["image_id"] == index + 1]
        expected = torch.zeros(48, 48, dtype=torch.long)
        for a in objects:
            instance = decode_segmentation(a["segmentation"], 48, 48).bool()
            assert not (expected[instance] > 0).any()  # visible parts do not overlap
            expected[instance] = a["category_id"]
            x, y, w, h = a["bbox"]
            assert instance[y : y + h, x : x + w].sum() == instance.sum()
        assert (mask > 0).any() and torch.equal(mask, expected)


def test_index_and_palette_masks_load(tmp_path):
    mask = np.array([[0, 1, 2], [255, 2, 1]], np.uint8)
    write_voc(tmp_path / "index", "train", {"a": mask})
    write_voc(tmp_path / "palette", "train", {"a": mask}, palette=True)
    assert Image.open(tmp_path / "index" / "SegmentationClass" / "a.png").mode == "L"
    assert Image.open(tmp_path / "palette" / "SegmentationClass" / "a.png").mode == "P"
    for kind in ("index", "palette"):
        image, labels = SegmentationFolder(str(tmp_path / kind), "train", num_classes=3)[0]
        assert image.shape == (3, 2, 3) and image.dtype == torch.float32
        assert torch.allclose(image, torch.full((3, 2, 3), 100 / 255), atol=2 / 255)  # a JPEG
        assert labels.dtype == torch.int64 and labels.tolist() == mask.tolist(), kind


def test_resize_keeps_the_aspect_and_the_labels_nearest(tmp_path):
    mask = np.zeros((20, 40), np.uint8)
    mask[:, 20:] = 2
    mask[0, 0] = IGNORE_INDEX
    write_voc(tmp_path, "train", {"a": mask}, ext=".png")
    image, labels = SegmentationFolder(str(tmp_path), "train", num_classes=3, image_size=10)[0]
    assert image.shape == (3, 5, 10) and labels.shape == (5, 10)
    assert set(labels.unique().tolist()) <= {0, 2, IGNORE_INDEX}
    assert (labels[:, :5] != 2).all() and (labels[:, 5:] == 2).all()


def test_classes_from_the_file_or_the_masks(tmp_path):
    write_voc(tmp_path, "train", {"a": np.array([[0, 3]], np.uint8)})
    write_voc(tmp_path, "val", {"b": np.array([[5, 255]], np.uint8)})
    train, val, classes = segmentation_data(str(tmp_path))
    assert classes == ["0", "1", "2", "3", "4", "5"] and train.num_classes == val.num_classes == 6
    (tmp_path / "classes.txt").write_text("\n".join("bg a b c d e f".split()) + "\n")
    assert segmentation_data(str(tmp_path))[2] == ["bg", "a", "b", "c", "d", "e", "f"]
    with pytest.raises(DataError, match="classes.txt' names 7 classes, not 4"):
        segmentation_data(str(tmp_path), num_classes=4)


@pytest.mark.parametrize("case", ["split", "size", "range", "rgb", "mask", "image"])
def test_bad_folders_name_the_file(tmp_path, case):
    masks = {"a": np.zeros((4, 6), np.uint8), "b": np.ones((4, 6), np.uint8)}
    if case == "range":
        masks["b"][2, 3] = 7
    write_voc(tmp_path, "train", masks, image_sizes={"b": (4, 5)} if case == "size" else None)
    if case == "rgb":
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "SegmentationClass" / "b.png")
    if case == "mask":
        os.remove(tmp_path / "SegmentationClass" / "b.png")
    if case == "image":
        os.remove(tmp_path / "JPEGImages" / "b.jpg")
    split = "val" if case == "split" else "train"
    expected = {
        "split": r"split file '.*ImageSets/Segmentation/val.txt' does not exist",
        "size": r"mask '.*SegmentationClass/b.png' is 6x4 pixels but its image '.*JPEGImages/b.jpg' is 5x4",
        "range": r"mask '.*SegmentationClass/b.png' holds class 7, out of range: 3 classes are 0..2",
        "rgb": r"mask '.*SegmentationClass/b.png' is a RGB image: expected an index PNG",
        "mask": r"mask '.*SegmentationClass/b.png' \(image 'b' of .*train.txt'\) does not exist",
        "image": r"image 'b' of '.*train.txt' is not in '.*JPEGImages'",
    }[case]  # fmt: skip
    with pytest.raises(DataError, match=expected):
        SegmentationFolder(str(tmp_path), split, num_classes=3)
