"""Detection: COCO evaluation with pycocotools, and the training loop's detector use."""

from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deformable.data.coco import CocoDetection, collate
from deformable.engine.devices import model_device
from deformable.engine.distributed import all_gather_list, shard
from deformable.engine.loop import TrainConfig, train_loop

#: COCOeval's summary, in its order
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def evaluate_coco(model: nn.Module, data: CocoDetection, batch_size: int = 4) -> dict[str, float]:
    """COCO box metrics (AP at IoU .5:.95, AP50, AP75, APs / APm / APl) of ``model`` on ``data``.

    ``model`` is a torchvision-style detector: in eval mode it returns, per image, a dict with
    ``boxes`` (x1, y1, x2, y2), ``labels`` (1..C) and ``scores``. No detection at all gives 0; a
    size range with no ground-truth object (e.g. no large objects) gives NaN. Under torchrun each
    process detects on its share of the images and every process scores all the detections.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    device = model_device(model)
    results = []
    for images, targets in DataLoader(shard(data), batch_size=batch_size, collate_fn=collate):
        for output, target in zip(model([image.to(device) for image in images]), targets):
            # on the CPU, boxes and scores in float32 (whatever autocast or the device made them)
            output = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in output.items()}
            boxes = output["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]  # COCO's [x, y, width, height]
            for box, label, score in zip(boxes.tolist(), output["labels"].tolist(),
                                         output["scores"].tolist()):  # fmt: skip
                results.append({"image_id": target["image_id"], "bbox": box, "score": score,
                                "category_id": data.category_ids[label - 1]})  # fmt: skip
    results = all_gather_list(results)
    if not results:
        return dict.fromkeys(COCO_METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = {**data.coco, "annotations": [
            {**a, "iscrowd": a.get("iscrowd", 0), "area": a.get("area", a["bbox"][2] * a["bbox"][3])}
            for a in data.coco["annotations"]]}  # fmt: skip
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluator.params.imgIds = list(data.ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval's -1 marks a size range without ground truth: undefined, reported as NaN
    return {name: float(v) if v >= 0 else float("nan") for name, v in zip(COCO_METRICS, evaluator.stats[:6])}


def detection_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """The sum of a torchvision detector's training losses, for :func:`train_loop`."""
    images, targets = batch
    losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    return sum(losses.values()), len(images)


def fit(build_model: Callable[[], nn.Module], train_set: Dataset, val_set: CocoDetection,
        config: TrainConfig, out: str, *, resume: bool = False, progress: bool = True,
        extra_state: dict | None = None, device: torch.device | str = "cpu",
        workers: int | None = None) -> dict:  # fmt: skip
    """:func:`deformable.engine.loop.train_loop` for a torchvision-style detector: the sum of
    its losses, COCO box metrics on ``val_set`` after every epoch."""
    return train_loop(build_model, train_set, val_set, config, out, loss=detection_loss,
                      evaluate=evaluate_coco, collate_fn=collate, resume=resume, progress=progress,
                      extra_state=extra_state, device=device, workers=workers)  # fmt: skip
