"""One training run described by plain data, and the evaluation of its checkpoint.

The checkpoint of a run records ``model_spec`` (how to rebuild the network:
:mod:`deformable.models.build`) and ``data`` (where its data came from), so that
:func:`evaluate_checkpoint` needs nothing else.
"""

from __future__ import annotations

import os

import torch

from deformable.data.sources import classification_data, detection_data, generated_scenes
from deformable.engine import TrainConfig, classification, detection, distributed
from deformable.models.build import DIGITNETS, MASK_DETECTORS, build_classifier, build_detector

__all__ = ["evaluate_checkpoint", "train_classifier", "train_detector"]


def train_classifier(spec: dict, data: str, config: TrainConfig, out: str, *, limit: int | None = None,
                     resume: bool = False, progress: bool = True, device: torch.device | str = "cpu",
                     workers: int | None = None) -> dict:  # fmt: skip
    """Train the classifier of ``spec`` (without ``num_classes``: the data decide) on ``data``
    (``digits`` or an image folder, images of ``spec["image_size"]``) into ``out`` on
    ``device``; returns the history. Resumes from ``out/last.pt`` with ``resume=True``."""
    channels = 1 if spec["model"] in DIGITNETS else 3
    train, val, classes = classification_data(data, channels=channels, image_size=spec["image_size"],
                                              limit=limit)  # fmt: skip
    spec = dict(spec, num_classes=len(classes), classes=classes)
    return classification.fit(lambda: build_classifier(spec), train, val, config, out, resume=resume,
                              progress=progress, extra_state={"model_spec": spec, "data": data},
                              device=device, workers=workers)  # fmt: skip


def detection_folder(data: str, data_root: str, image_size: int) -> str:
    """The COCO folder of ``--data``: ``scenes`` is generated into ``data_root/data`` once (by one
    process under torchrun, the others waiting), anything else is a folder of the user's."""
    if data != "scenes":
        return data
    folder = os.path.join(data_root, "data")
    if distributed.rank_and_world()[0] == 0:
        generated_scenes(folder, size=image_size)
    distributed.barrier()
    return folder


def train_detector(spec: dict, data: str, config: TrainConfig, out: str, *, data_root: str | None = None,
                   limit: int | None = None, resume: bool = False, progress: bool = True,
                   device: torch.device | str = "cpu", workers: int | None = None) -> dict:  # fmt: skip
    """Train the detector of ``spec`` (without ``num_classes``: the data decide) on ``data``
    (``scenes``, generated into ``data_root`` — default ``out`` — or a COCO folder) into
    ``out`` on ``device``; returns the history."""
    folder = detection_folder(data, out if data_root is None else data_root, spec["image_size"])
    train, val = detection_data(folder, limit=limit, masks=spec["model"] in MASK_DETECTORS)
    spec = dict(spec, num_classes=val.num_classes, classes=val.categories)  # limit cuts train only
    return detection.fit(lambda: build_detector(spec), train, val, config, out, resume=resume,
                         progress=progress, extra_state={"model_spec": spec, "data": folder},
                         device=device, workers=workers)  # fmt: skip


def evaluate_checkpoint(state: dict, data: str | None = None,
                        device: torch.device | str = "cpu") -> tuple[dict[str, float], int]:  # fmt: skip
    """``(metrics, number of validation images)`` of a run's checkpoint on its validation data
    (or on ``data``), on ``device`` (whatever device it was trained on): accuracy and loss of a
    classifier, COCO box metrics of a detector (and mask metrics of a Mask R-CNN), mIoU, pixel
    accuracy and per-class IoU of a segmenter."""
    spec = state["model_spec"]
    source = data or state["data"]
    if spec.get("task") == "segment":
        from deformable.experiments.segmentation import evaluate_segmenter

        return evaluate_segmenter(state, data, device=device)
    if spec.get("task") == "detect":
        model = build_detector(spec)
        model.load_state_dict(state["model"])
        model.to(device)
        _, val = detection_data(source, masks=spec["model"] in MASK_DETECTORS)
        return detection.evaluate_coco(model, val), len(val)
    model = build_classifier(spec)
    model.load_state_dict(state["model"])
    model.to(device)
    channels = 1 if spec["model"] in DIGITNETS else 3
    # the run's own data options (e.g. the demo's digit copies) unless another source is named
    options = state.get("data_options", {}) if source == state["data"] else {}
    _, val, _ = classification_data(source, channels=channels, image_size=spec["image_size"], **options)
    return classification.evaluate(model, val), len(val)
