"""Instance masks: COCO's polygons and RLE, checked, decoded, encoded; the scenes' masks round-trip
through their annotation file and the loader."""

from __future__ import annotations

import json
import re

import pytest
import torch

from deformable.data import DataError
from deformable.data import scenes as scenes_module
from deformable.data.coco import CocoDetection
from deformable.data.masks import decode_segmentation, mask_to_polygons, mask_to_rle, segmentation_problem
from deformable.data.scenes import generate_scenes


def random_masks(count=60):
    g = torch.Generator().manual_seed(0)
    for _ in range(count):
        height, width = torch.randint(1, 24, (2,), generator=g).tolist()
        density = torch.rand(1, generator=g).item()
        yield (torch.rand(height, width, generator=g) < density).to(torch.uint8)


def test_rle_and_polygons_round_trip_exactly():
    for mask in random_masks():
        height, width = mask.shape
        rle = mask_to_rle(mask)
        assert segmentation_problem(rle, height, width) is None
        assert torch.equal(decode_segmentation(rle, height, width), mask)
        # the uncompressed form (a list of runs, as crowd regions are stored) reads the same
        runs = [int(r) for r in _runs(mask)]
        assert torch.equal(decode_segmentation({"size": [height, width], "counts": runs}, height, width), mask)
        if mask.any():  # holes included: polygons are their union
            polygons = mask_to_polygons(mask)
            assert segmentation_problem(polygons) is None
            assert torch.equal(decode_segmentation(polygons, height, width), mask)


def _runs(mask):
    """Run lengths down the columns, from a run of zeros: the obviously right loop."""
    runs, value, length = [], 0, 0
    for pixel in mask.t().flatten().tolist():
        if pixel != value:
            runs.append(length)
            value, length = pixel, 0
        length += 1
    return runs + [length]


@pytest.mark.parametrize("segmentation, match", [
    ([[1, 1, 3, 1, 3]], "polygon 0 has 5 coordinates"),
    ([[1, 1, 3, 1]], "polygon 0 has 4 coordinates"),
    ([[1, 1, 3, 1, 3, 3], [0, 0, "a", 1, 1, 1]], "polygon 1 is not a list of finite numbers"),
    ([], "an empty list of polygons"),
    ("0 1 2", "a list of polygons or an RLE dict expected, got str"),
    ({"size": [8, 9], "counts": [72]}, r"RLE size \[8, 9\] is not the image's \[height, width\] \[8, 8\]"),
    ({"size": [8], "counts": [8]}, "RLE size must be"),
    ({"size": [8, 8], "counts": [10, 20]}, "RLE counts cover 30 pixels, its size"),
    ({"size": [8, 8], "counts": [10, -2, 56]}, "negative runs"),
    ({"size": [8, 8], "counts": "6230S2"}, "RLE counts cover"),
    ({"size": [8, 8], "counts": "ab c"}, "not a valid compressed RLE string"),
    ({"size": [8, 8]}, "RLE counts must be"),
])  # fmt: skip
def test_segmentation_problems(segmentation, match):
    problem = segmentation_problem(segmentation, 8, 8)
    assert problem is not None and re.search(match, problem), problem


@pytest.mark.parametrize("segmentation", ["rle", "polygon"])
def test_scene_masks_round_trip_through_the_file_and_the_loader(tmp_path, monkeypatch, segmentation):
    drawn = []  # the masks the generator computed, in the order it writes them
    encoders = {"rle": "mask_to_rle", "polygon": "mask_to_polygons"}
    real = getattr(scenes_module, encoders[segmentation])
    monkeypatch.setattr(scenes_module, encoders[segmentation], lambda m: drawn.append(m.clone()) or real(m))
    path = generate_scenes(str(tmp_path), "val", 5, size=64, segmentation=segmentation)
    annotations = json.load(open(path))["annotations"]
    kind = dict if segmentation == "rle" else list
    assert len(drawn) == len(annotations) > 5 and all(isinstance(a["segmentation"], kind) for a in annotations)
    data = CocoDetection(str(tmp_path / "val"), path, masks=True)
    loaded = [m for i in range(len(data)) for m in data[i][1]["masks"]]
    assert len(loaded) == len(drawn)
    for mask, expected, ann in zip(loaded, drawn, annotations):
        assert mask.dtype == torch.uint8 and torch.equal(mask.bool(), expected)
        assert ann["area"] == expected.sum().item() > 0
        x, y, w, h = ann["bbox"]  # the mask lies in the box the object was drawn into
        assert not mask[:y].any() and not mask[y + h :].any() and not mask[:, :x].any() and not mask[:, x + w :].any()
    # the masks are aligned with the boxes and labels of each image
    image, target = data[0]
    assert target["masks"].shape == (len(target["boxes"]), 64, 64)


def test_scene_masks_are_the_visible_parts(tmp_path):
    # overlapping objects: a pixel belongs to at most one mask (the object drawn last)
    data = CocoDetection(str(tmp_path / "val"), generate_scenes(str(tmp_path), "val", 30, size=64), masks=True)
    overlapped = 0
    for i in range(len(data)):
        boxes, masks = data[i][1]["boxes"], data[i][1]["masks"]
        assert (masks.sum(0) <= 1).all()
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                lo, hi = torch.maximum(boxes[a, :2], boxes[b, :2]), torch.minimum(boxes[a, 2:], boxes[b, 2:])
                overlapped += bool((hi > lo).all())
    assert overlapped > 0  # the check above saw overlapping objects


GOOD = {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4],
                         "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}],
        "categories": [{"id": 3, "name": "thing"}]}  # fmt: skip


def write(tmp_path, content):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("segmentation, match", [
    ([[1, 1, 5, 1, 5]], "polygon 0 has 5 coordinates"),
    ({"size": [16, 16], "counts": [256]}, r"RLE size \[16, 16\] is not the image's"),
])  # fmt: skip
def test_malformed_segmentation_names_the_file_and_the_annotation(tmp_path, segmentation, match):
    content = {**GOOD, "annotations": [dict(GOOD["annotations"][0], id=42, segmentation=segmentation)]}
    path = write(tmp_path, content)
    for masks in (True, False):  # a malformed file, whatever is read from it
        with pytest.raises(DataError, match=rf"ann\.json', annotation 42: malformed segmentation: {match}"):
            CocoDetection(str(tmp_path), path, masks=masks)


def test_box_only_files_load_without_masks_and_are_refused_with_them(tmp_path):
    content = {**GOOD, "annotations": [{k: v for k, v in GOOD["annotations"][0].items() if k != "segmentation"}]}
    path = write(tmp_path, content)
    data = CocoDetection(str(tmp_path), path)
    assert not data.has_masks and not data.masks
    with pytest.raises(DataError, match=r"annotation 1: no 'segmentation', and instance masks were asked for"):
        CocoDetection(str(tmp_path), path, masks=True)


def test_an_image_of_another_size_than_its_entry(tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")  # the entry says 8 x 8
    content = {**GOOD, "annotations": [dict(GOOD["annotations"][0], segmentation={"size": [8, 8], "counts": [64]})]}
    data = CocoDetection(str(tmp_path), write(tmp_path, content), masks=True)
    with pytest.raises(DataError, match=r"annotation 1 \(image .*a\.png'\): malformed segmentation: RLE size"):
        data[0]
    polygons = CocoDetection(str(tmp_path), write(tmp_path, GOOD), masks=True)
    assert polygons[0][1]["masks"].shape == (1, 16, 16)  # polygons are drawn at the image's size
    assert polygons[0][1]["masks"].sum() == 16


def test_scene_masks_agree_with_the_segmentation_scenes(tmp_path):
    # the same scenes drawn for semantic segmentation: each pixel's class is the category of the
    # instance mask that covers it (background where none does)
    import numpy as np
    from PIL import Image

    from deformable.data.segmentation import generate_segmentation_scenes

    path = generate_scenes(str(tmp_path / "det"), "val", 6, size=64)
    generate_segmentation_scenes(str(tmp_path / "seg"), "val", 6, size=64)
    data = CocoDetection(str(tmp_path / "det" / "val"), path, masks=True)
    for index in range(len(data)):
        image, target = data[index]
        classes = torch.zeros(64, 64, dtype=torch.long)
        for mask, label in zip(target["masks"], target["labels"]):
            classes[mask.bool()] = label
        name = f"val_{target['image_id']:06d}.png"
        expected = torch.from_numpy(np.array(Image.open(tmp_path / "seg" / "SegmentationClass" / name))).long()
        assert torch.equal(classes, expected), name
        pixels = torch.from_numpy(np.array(Image.open(tmp_path / "seg" / "JPEGImages" / name)))
        assert torch.equal((image * 255).round().byte().permute(1, 2, 0), pixels)
