"""Detection: COCO evaluation with pycocotools (boxes, and a Mask R-CNN's masks), and the training
loop's detector use."""

from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deformable.data.coco import CocoDetection, collate
from deformable.data.folder import DataError
from deformable.data.masks import mask_to_rle
from deformable.engine.devices import model_device
from deformable.engine.distributed import all_gather_list, shard
from deformable.engine.loop import TrainConfig, train_loop

#: COCOeval's summary, in its order
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: ... of a Mask R-CNN's masks (COCOeval's "segm"), named apart from the box metrics
MASK_METRICS = tuple(f"mask_{name}" for name in COCO_METRICS)


def has_mask_head(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision detector with a mask branch (a Mask R-CNN)."""
    heads = getattr(model, "roi_heads", None)
    return callable(getattr(heads, "has_mask", None)) and bool(heads.has_mask())


@torch.no_grad()
def evaluate_coco(model: nn.Module, data: CocoDetection, batch_size: int = 4, *,
                  masks: bool | None = None) -> dict[str, float]:  # fmt: skip
    """COCO box metrics (AP at IoU .5:.95, AP50, AP75, APs / APm / APl) of ``model`` on ``data``,
    and with ``masks`` the same metrics of its instance masks (:data:`MASK_METRICS`:
    ``mask_AP``, ...; by default when the model has a mask head).

    ``model`` is a torchvision-style detector: in eval mode it returns, per image, a dict with
    ``boxes`` (x1, y1, x2, y2), ``labels`` (1..C) and ``scores``, and for masks ``masks``
    ``[N, 1, H, W]`` (probabilities, binarised at 0.5 as torchvision's Mask R-CNN reference
    does). No detection at all gives 0; a size range with no ground-truth object (e.g. no large
    objects) gives NaN; a mask's size is its pixel count, as COCO's. Under torchrun each process
    detects on its share of the images and every process scores all the detections. Scoring masks
    on data without them is a DataError.
    """
    if masks is None:
        masks = has_mask_head(model)
    if masks and not data.has_masks:
        raise DataError(f"annotation file {data.annotation_file!r} has annotations without "
                        "'segmentation': there are no masks to score a Mask R-CNN's against")  # fmt: skip
    model.eval()
    device = model_device(model)
    found_boxes, found_masks = [], []
    for images, targets in DataLoader(shard(data), batch_size=batch_size, collate_fn=collate):
        for output, target in zip(model([image.to(device) for image in images]), targets):
            # on the CPU, boxes and scores in float32 (whatever autocast or the device made them)
            output = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in output.items()}
            boxes = output["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]  # COCO's [x, y, width, height]
            found = [{"image_id": target["image_id"], "score": score,
                      "category_id": data.category_ids[label - 1]}
                     for label, score in zip(output["labels"].tolist(), output["scores"].tolist())]  # fmt: skip
            found_boxes += [dict(f, bbox=box) for f, box in zip(found, boxes.tolist())]
            if masks:
                # apart from the boxes: pycocotools would size a result with a bbox by its box
                found_masks += [dict(f, segmentation=mask_to_rle(mask))
                                for f, mask in zip(found, output["masks"][:, 0] > 0.5)]  # fmt: skip
    found_boxes, found_masks = all_gather_list(found_boxes), all_gather_list(found_masks)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        metrics = _summary(data, found_boxes, "bbox", COCO_METRICS)
        if masks:
            metrics.update(_summary(data, found_masks, "segm", MASK_METRICS))
    return metrics


def _summary(data: CocoDetection, results: list[dict], iou_type: str, names: tuple[str, ...]) -> dict[str, float]:
    """COCOeval's six summary numbers of ``results`` on ``data`` for ``iou_type``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(names, 0.0)
    truth = COCO()
    truth.dataset = {**data.coco, "annotations": [
        {**a, "iscrowd": a.get("iscrowd", 0), "area": a.get("area", a["bbox"][2] * a["bbox"][3])}
        for a in data.coco["annotations"]]}  # fmt: skip
    truth.createIndex()
    evaluator = COCOeval(truth, truth.loadRes(results), iou_type)
    evaluator.params.imgIds = list(data.ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    # COCOeval's -1 marks a size range without ground truth: undefined, reported as NaN
    return {name: float(v) if v >= 0 else float("nan") for name, v in zip(names, evaluator.stats[:6])}


def detection_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """The sum of a torchvision detector's training losses, for :func:`train_loop`."""
    images, targets = batch
    keys = ("boxes", "labels", "masks")  # masks: a Mask R-CNN's data
    losses = model(images, [{k: t[k] for k in keys if k in t} for t in targets])
    return sum(losses.values()), len(images)


def fit(build_model: Callable[[], nn.Module], train_set: Dataset, val_set: CocoDetection,
        config: TrainConfig, out: str, *, resume: bool = False, progress: bool = True,
        extra_state: dict | None = None, device: torch.device | str = "cpu",
        workers: int | None = None) -> dict:  # fmt: skip
    """:func:`deformable.engine.loop.train_loop` for a torchvision-style detector: the sum of
    its losses, COCO box metrics (and mask metrics of a Mask R-CNN) on ``val_set`` after every
    epoch."""
    return train_loop(build_model, train_set, val_set, config, out, loss=detection_loss,
                      evaluate=evaluate_coco, collate_fn=collate, resume=resume, progress=progress,
                      extra_state=extra_state, device=device, workers=workers)  # fmt: skip
