"""Semantic segmentation: the confusion matrix and its scores (mIoU, per-class IoU, pixel
accuracy), and the training loop's segmentation use.

Convention: ``confusion[t, p]`` counts the pixels of true class ``t`` predicted as ``p``, over
every scored pixel of the data set (pixels labelled :data:`IGNORE_INDEX`, 255, are not scored).
The IoU of class ``c`` is ``confusion[c, c] / (row c + column c - confusion[c, c])``: true
positives over the union of the pixels that are ``c`` and the pixels predicted ``c``. A class
absent from both the truth and the predictions has no union: its IoU is undefined (NaN) and the
mean IoU leaves it out. A class that is in the truth but never predicted, or predicted but not
in the truth, scores 0 and counts. Pixel accuracy is the trace over the total.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from deformable.data.segmentation import IGNORE_INDEX, collate_segmentation
from deformable.engine.devices import model_device
from deformable.engine.distributed import all_reduce_sum, broadcast_buffers, shard
from deformable.engine.loop import TrainConfig, train_loop

__all__ = ["confusion_matrix", "evaluate_segmentation", "fit", "segmentation_loss",
           "segmentation_scores"]  # fmt: skip


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:  # fmt: skip
    """The ``[num_classes, num_classes]`` int64 confusion matrix (rows: truth, columns:
    prediction) of the pixels of ``target`` that are not ``ignore_index``.

    Args:
        prediction (Tensor[...]): predicted class per pixel, in ``0..num_classes-1``.
        target (Tensor[...]): true class per pixel (same shape), or ``ignore_index``.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 255]), 3).tolist()
        [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    """
    if prediction.shape != target.shape:
        raise ValueError(f"confusion_matrix: prediction {tuple(prediction.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")  # fmt: skip
    keep = target != ignore_index
    truth, predicted = target[keep].long(), prediction[keep].long()
    if truth.numel() and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"confusion_matrix: target holds classes outside 0..{num_classes - 1} "
                         f"(and {ignore_index} = ignore): {sorted(set(truth.unique().tolist()))}")  # fmt: skip
    if predicted.numel() and (predicted.min() < 0 or predicted.max() >= num_classes):
        raise ValueError(f"confusion_matrix: prediction holds classes outside 0..{num_classes - 1}")
    return torch.bincount(truth * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    """``mIoU``, ``pixel_accuracy`` and ``IoU/<class>`` of a confusion matrix (see the module's
    convention: a class absent from truth and predictions has IoU NaN, left out of the mean;
    with no scored pixel at all every score is NaN).

    Example:
        >>> scores = segmentation_scores(torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]]), ["a", "b", "c"])
        >>> {k: round(v, 3) for k, v in scores.items()}
        {'mIoU': 0.467, 'pixel_accuracy': 0.667, 'IoU/a': 0.6, 'IoU/b': 0.333, 'IoU/c': nan}
    """
    if confusion.shape != (len(classes), len(classes)):
        raise ValueError(f"segmentation_scores: a confusion matrix of {len(classes)} classes is "
                         f"{len(classes)}x{len(classes)}, got {tuple(confusion.shape)}")  # fmt: skip
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp_min(1), torch.full_like(hits, math.nan))
    present = iou[~iou.isnan()]
    total = confusion.sum()
    return {"mIoU": present.mean().item() if present.numel() else math.nan,
            "pixel_accuracy": (hits.sum() / total).item() if total > 0 else math.nan,
            **{f"IoU/{name}": value for name, value in zip(classes, iou.tolist())}}  # fmt: skip


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, data: Dataset, classes: Sequence[str],
                          batch_size: int = 8) -> dict[str, float]:  # fmt: skip
    """:func:`segmentation_scores` of ``model`` (``model(images)["out"]``: logits ``[N, C, H, W]``)
    on ``data`` (items ``(image, mask)``), on the model's device, from one confusion matrix over
    the whole set. Under
    torchrun each process scores its share of the images with rank 0's model (its BatchNorm
    statistics broadcast first) and the matrices are summed."""
    broadcast_buffers(model)
    model.eval()
    device = model_device(model)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for images, masks in DataLoader(shard(data), batch_size=batch_size, collate_fn=collate_segmentation):
        prediction = model(images.to(device))["out"].argmax(1).cpu()
        confusion += confusion_matrix(prediction, masks, len(classes))
    confusion = torch.tensor(all_reduce_sum(confusion.flatten().double().tolist()), dtype=torch.float64)
    return segmentation_scores(confusion.round().long().view(len(classes), len(classes)), classes)


def _cross_entropy(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    # mean over the scored pixels; a batch with none (all ignore) gives 0, not NaN
    scored = (masks != IGNORE_INDEX).sum().clamp_min(1)
    return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum") / scored


def segmentation_loss(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    """Pixel cross-entropy of ``model(images)["out"]`` (plus 0.5 x that of ``"aux"`` when the
    model has torchvision's auxiliary head), pixels labelled 255 left out; for :func:`train_loop`."""
    images, masks = batch
    outputs = model(images)
    value = _cross_entropy(outputs["out"], masks)
    if "aux" in outputs:
        value = value + 0.5 * _cross_entropy(outputs["aux"], masks)
    return value, len(images)


def fit(build_model: Callable[[], nn.Module], train_set: Dataset, val_set: Dataset,
        config: TrainConfig, out: str, *, classes: Sequence[str], resume: bool = False,
        progress: bool = True, extra_state: dict | None = None, device: torch.device | str = "cpu",
        workers: int | None = None) -> dict:  # fmt: skip
    """:func:`deformable.engine.loop.train_loop` for a segmentation model: pixel cross-entropy,
    mIoU, pixel accuracy and per-class IoU on ``val_set`` after every epoch."""
    classes = list(classes)
    return train_loop(build_model, train_set, val_set, config, out, loss=segmentation_loss,
                      evaluate=lambda model, data: evaluate_segmentation(model, data, classes),
                      collate_fn=collate_segmentation, resume=resume, progress=progress,
                      extra_state=extra_state, device=device, workers=workers)  # fmt: skip
