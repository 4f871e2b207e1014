"""COCO loading, COCO evaluation and the generated scenes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from deformable.data import DataError
from deformable.data.coco import CocoDetection, collate
from deformable.data.scenes import CATEGORIES, generate_scenes
from deformable.engine.detection import COCO_METRICS, MASK_METRICS, evaluate_coco


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    path = generate_scenes(str(root), "val", 6, size=64)
    return root, path


def test_generated_scenes_load(scenes):
    root, path = scenes
    data = CocoDetection(str(root / "val"), path)
    assert len(data) == 6 and data.num_classes == len(CATEGORIES) + 1
    image, target = data[0]
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    boxes = target["boxes"]
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 64).all()
    assert ((target["labels"] >= 1) & (target["labels"] <= len(CATEGORIES))).all()
    again = json.load(open(generate_scenes(str(root / "again"), "val", 6, size=64)))
    assert again["annotations"] == json.load(open(path))["annotations"]  # a function of (split, seed)
    images, targets = collate([data[0], data[1]])
    assert len(images) == 2 and targets[1]["image_id"] == data.ids[1]


class _Replay(torch.nn.Module):
    """A 'detector' that returns given boxes for each image, in order."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, images):
        return [next(self.outputs) for _ in images]


def test_evaluation_of_perfect_and_shifted_detections(scenes):
    root, path = scenes
    data = CocoDetection(str(root / "val"), path)
    truth = [data[i][1] for i in range(len(data))]
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
               for t in truth]  # fmt: skip
    metrics = evaluate_coco(_Replay(perfect), data)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    # a real detector's outputs: its own device, labels int64, boxes in whatever autocast made
    half = [dict(p, boxes=p["boxes"].to(torch.bfloat16).float()) for p in perfect]
    with_weights = _Replay(half)
    with_weights.layer = torch.nn.Linear(1, 1)
    assert evaluate_coco(with_weights, data)["AP50"] == pytest.approx(1.0)
    assert math.isnan(metrics["APl"])  # no large objects on a 64x64 canvas
    wrong = [dict(p, labels=p["labels"] % len(CATEGORIES) + 1) for p in perfect]
    assert evaluate_coco(_Replay(wrong), data)["AP"] == 0.0
    nothing = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "scores": torch.zeros(0)} for _ in truth]  # fmt: skip
    assert evaluate_coco(_Replay(nothing), data)["AP"] == 0.0


def test_mask_evaluation_of_perfect_empty_and_wrong_masks(scenes):
    root, path = scenes
    data = CocoDetection(str(root / "val"), path, masks=True)
    truth = [data[i][1] for i in range(len(data))]
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                "masks": t["masks"][:, None].float()} for t in truth]  # fmt: skip
    metrics = evaluate_coco(_Replay(perfect), data, masks=True)
    assert set(metrics) == set(COCO_METRICS) | set(MASK_METRICS)
    assert metrics["mask_AP"] == pytest.approx(1.0) and metrics["mask_AP50"] == pytest.approx(1.0)
    assert metrics["AP"] == pytest.approx(1.0) and math.isnan(metrics["mask_APl"])
    # right boxes, each mask its box's complement: the masks are scored apart from the boxes
    inverted = [dict(p, masks=1 - p["masks"]) for p in perfect]
    metrics = evaluate_coco(_Replay(inverted), data, masks=True)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["mask_AP"] == 0.0
    nothing = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
                "masks": torch.zeros(0, 1, 64, 64)} for _ in truth]  # fmt: skip
    metrics = evaluate_coco(_Replay(nothing), data, masks=True)
    assert metrics["mask_AP"] == 0.0 and metrics["AP"] == 0.0
    # a box detector has no mask metrics (by default: the model has no mask head)
    assert set(evaluate_coco(_Replay(perfect), data)) == set(COCO_METRICS)


def test_masks_are_not_scored_on_box_only_data(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    data = CocoDetection(str(tmp_path), write(tmp_path, GOOD))
    found = [{"boxes": torch.tensor([[1.0, 1, 5, 5]]), "labels": torch.tensor([1]), "scores": torch.ones(1),
              "masks": torch.ones(1, 1, 8, 8)}]  # fmt: skip
    with pytest.raises(DataError, match="without 'segmentation': there are no masks to score"):
        evaluate_coco(_Replay(found), data, masks=True)


_SHARDED_EVAL = """
import json, sys
import torch, torch.distributed as dist
from deformable.data.coco import CocoDetection
from deformable.engine.detection import evaluate_coco

class Keyed(torch.nn.Module):  # right labels on even images, wrong on odd ones, found by content
    def __init__(self, data):
        super().__init__()
        self.table = {}
        for i in range(len(data)):
            image, t = data[i]
            labels = t["labels"] if i % 2 == 0 else t["labels"] % 13 + 1
            self.table[round(image.sum().item(), 3)] = {
                "boxes": t["boxes"], "labels": labels, "scores": torch.linspace(1, 0.5, len(labels)),
                "masks": t["masks"][:, None].float()}
    def forward(self, images):
        return [self.table[round(image.sum().item(), 3)] for image in images]

data = CocoDetection(sys.argv[1], sys.argv[2], masks=True)
if len(sys.argv) > 4:
    dist.init_process_group("gloo")
metrics = evaluate_coco(Keyed(data), data, batch_size=2, masks=True)
if not dist.is_initialized() or dist.get_rank() == 0:
    json.dump(metrics, open(sys.argv[3], "w"))
"""


def test_evaluation_sharded_over_two_processes_scores_every_image(scenes, tmp_path):
    root, path = scenes
    script = tmp_path / "sharded_eval.py"
    script.write_text(_SHARDED_EVAL)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [str(root / "val"), path]
    subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one.json")], check=True, env=env,
                   timeout=300)  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), *args, str(tmp_path / "two.json"), "distributed"],
        capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.load(open(tmp_path / f"{n}.json")) for n in ("one", "two"))
    assert 0.2 < one["AP"] < 0.8 and 0.2 < one["mask_AP"] < 0.8  # half the images right
    assert one == pytest.approx(two, nan_ok=True)


def write(tmp_path, content):
    path = tmp_path / "ann.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


GOOD = {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}],
        "categories": [{"id": 3, "name": "thing"}]}  # fmt: skip


@pytest.mark.parametrize("content, match", [
    ("{not json", "is not valid JSON"),
    ({"images": []}, "is not COCO"),
    ({**GOOD, "images": []}, "lists no images"),
    ({**GOOD, "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 4]}]},
     "annotation 7: bbox must be"),
    ({**GOOD, "annotations": [{"id": 8, "image_id": 5, "category_id": 3, "bbox": [1, 1, 2, 4]}]},
     "image_id 5 is not in 'images'"),
    ({**GOOD, "annotations": [{"id": 9, "image_id": 1, "category_id": 4, "bbox": [1, 1, 2, 4]}]},
     "category_id 4 is not in 'categories'"),
    ({**GOOD, "categories": [{"id": 3}]}, "lacks 'name'"),
])  # fmt: skip
def test_bad_annotation_files(tmp_path, content, match):
    with pytest.raises(DataError, match=match):
        CocoDetection(str(tmp_path), write(tmp_path, content))


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="annotation file .* does not exist"):
        CocoDetection(str(tmp_path), str(tmp_path / "none.json"))
    data = CocoDetection(str(tmp_path), write(tmp_path, GOOD))
    assert data.num_classes == 2
    with pytest.raises(DataError, match="a.png' .* does not exist"):
        data[0]
