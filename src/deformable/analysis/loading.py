"""Inputs of the analysis tools read from files: trained networks and images, with errors that
name the file (``ExplainError``), never a traceback for a file a user handed over.

:func:`load_explainable` reads any checkpoint ``deformable explain`` draws and says what it is
(:class:`Explainable`): a DigitNet (``deformable demo``, ``train classify --model digitnet-*``),
a detector (``train detect``: Faster / Mask R-CNN) or a segmenter (``train segment``: DeepLabV3).
Another kind of network is one more branch in :func:`load_explainable` and one more ``kind``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["CANVAS", "ExplainError", "Explainable", "load_digitnet", "load_explainable",
           "load_image", "load_rgb_image", "validation_scene", "validation_segmentation_image",
           "detector_label"]

#: side of the demo's images (TransformedDigits' default canvas)
CANVAS = 40


class ExplainError(ValueError):
    """Bad input to ``deformable explain`` (reported without a traceback)."""


@dataclass
class Explainable:
    """A network read from a checkpoint by :func:`load_explainable`."""

    path: str
    #: ``"digitnet"``, ``"detector"`` or ``"segmenter"``
    kind: str
    #: the network, in eval mode
    model: nn.Module
    #: its name in figures: the DigitNet variant's label, or the detector's setting
    #: (``"DCNv2 conv3-5 + mdeform RoI pooling"``)
    label: str
    #: DigitNet: its variant; detector, segmenter: its ``model_spec``'s model name
    variant: str
    #: DigitNet: the data options (``copies``); detector, segmenter: the checkpoint's ``model_spec``
    options: dict = field(default_factory=dict)
    #: detector: the COCO folder it was trained on; segmenter: its VOC-style folder (their
    #: validation images are the images explained)
    data: str | None = None


def _read(path: str) -> dict:
    from deformable.engine.checkpoint import load_checkpoint

    return load_checkpoint(path)  # a CheckpointError names the file; nothing of it runs


def load_explainable(path: str) -> Explainable:
    """The network of a checkpoint ``deformable explain`` draws: a DigitNet (``<variant>.pt`` of
    ``deformable demo``, ``last.pt`` of ``train classify --model digitnet-*``), a Faster /
    Mask R-CNN (``last.pt`` of ``deformable train detect``) or a DeepLabV3 (``last.pt`` of
    ``deformable train segment``), rebuilt in eval mode.

    Raises CheckpointError naming the file if it is missing, unreadable or unsafe (it is read by
    :func:`deformable.engine.load_checkpoint`: it cannot run code), ExplainError if it holds
    another kind of network (a ResNet classifier, an R-FCN: it has no 2fc box head).
    """
    checkpoint = _read(path)
    spec = checkpoint.get("model_spec") if isinstance(checkpoint, dict) else None
    if isinstance(spec, dict) and spec.get("task") == "detect":
        return _detector(path, checkpoint, spec)
    if isinstance(spec, dict) and spec.get("task") == "segment":
        return _segmenter(path, checkpoint, spec)
    model, variant, options = _digitnet(path, checkpoint)
    from deformable.models.digitnet import LABELS

    return Explainable(path, "digitnet", model, LABELS[variant], variant, options)


def detector_label(spec: dict) -> str:
    """A detector's setting in a few words, from its ``model_spec``: ``"regular"``,
    ``"DCNv1 conv3-5"``, ``"DCNv2 conv5 + mdeform RoI pooling + mimicking"``, ...

    Example:
        >>> detector_label({"deform_stages": [3, 4, 5], "modulated": True, "roi_pool": "align"})
        'DCNv2 conv3-5'
    """
    stages = sorted(spec.get("deform_stages") or [])
    if not stages:
        label = "regular"
    else:
        contiguous = stages == list(range(stages[0], stages[-1] + 1))
        where = (f"conv{stages[0]}-{stages[-1]}" if contiguous and len(stages) > 1
                 else "conv" + ",".join(map(str, stages)))  # fmt: skip
        label = f"{'DCNv2' if spec.get('modulated') else 'DCNv1'} {where}"
    if spec.get("roi_pool") in ("deform", "mdeform"):
        label += f" + {spec['roi_pool']} RoI pooling"
    if spec.get("mimic"):
        label += " + mimicking"
    return label


def _detector(path: str, checkpoint: dict, spec: dict) -> Explainable:
    from deformable.analysis.detection import detector_parts
    from deformable.models.build import build_detector

    name = str(spec.get("model", ""))
    if name.startswith("rfcn"):
        raise ExplainError(f"checkpoint {path!r} holds an R-FCN ({name!r}), which has no 2fc box "
                           "head; explain draws Faster / Mask R-CNN checkpoints of `deformable "
                           "train detect`")  # fmt: skip

    def build(spec):
        model = build_detector(spec)
        model.load_state_dict(checkpoint["model"])
        detector_parts(model, "explain")
        return model

    return _rebuilt(path, checkpoint, spec, "detector", build)


def _segmenter(path: str, checkpoint: dict, spec: dict) -> Explainable:
    from deformable.models.build import build_segmenter

    def build(spec):
        model = build_segmenter(spec)
        model.load_state_dict(checkpoint["model"])
        return model

    return _rebuilt(path, checkpoint, spec, "segmenter", build)


def _rebuilt(path: str, checkpoint: dict, spec: dict, kind: str, build) -> Explainable:
    """The :class:`Explainable` of a ``train detect`` / ``train segment`` checkpoint: the network
    ``build(spec)`` makes and loads, or an ExplainError naming the file."""
    name = str(spec.get("model", ""))
    if "model" not in checkpoint:
        raise ExplainError(f"checkpoint {path!r} has a model_spec but no 'model' weights")
    try:
        model = build(spec)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise ExplainError(f"checkpoint {path!r} does not rebuild into a {kind} ({name!r}): "
                           f"{error}") from None  # fmt: skip
    data = checkpoint.get("data")
    return Explainable(path, kind, model.eval(), detector_label(spec), name, dict(spec),
                       data if isinstance(data, str) else None)  # fmt: skip


def load_digitnet(path: str) -> tuple[nn.Module, str, dict]:
    """``(model in eval mode, variant, data options)`` from a checkpoint of a DigitNet: written by
    ``deformable demo`` (``<variant>.pt``) or ``deformable train classify --model digitnet-*``
    (``last.pt``); ``data options`` holds the ``copies`` of its digits.

    Raises CheckpointError naming the file if it is missing, unreadable or unsafe (it is read by
    :func:`deformable.engine.load_checkpoint`: it cannot run code), ExplainError if it is not a
    DigitNet checkpoint.
    """
    return _digitnet(path, _read(path))


def _digitnet(path: str, checkpoint) -> tuple[nn.Module, str, dict]:
    from deformable.models.digitnet import VARIANTS, DigitNet

    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_spec"), dict):
        # `deformable train classify` on the digits: same network, its own key names
        spec = checkpoint["model_spec"]
        name = str(spec.get("model", ""))
        if not name.startswith("digitnet-"):
            task = spec.get("task", "classify")
            raise ExplainError(f"checkpoint {path!r} holds a {task} model {name!r}; explain draws "
                               "DigitNet checkpoints (deformable demo, or train classify --model "
                               "digitnet-*), detector checkpoints (train detect: Faster / "
                               "Mask R-CNN) and segmenter checkpoints (train segment)")  # fmt: skip
        checkpoint = {"variant": name.split("-", 1)[1], "state_dict": checkpoint["model"],
                      # the demo records its digit copies; train's digits: TransformedDigits' default
                      "config": {"copies": 4, **checkpoint.get("data_options", {})}}  # fmt: skip
    if not isinstance(checkpoint, dict) or not {"variant", "state_dict"} <= set(checkpoint):
        raise ExplainError(f"{path!r} is not a checkpoint of `deformable demo` or `deformable "
                           "train` (expected a dict with keys 'variant' and 'state_dict', or "
                           "'model_spec' and 'model')")  # fmt: skip
    variant = checkpoint["variant"]
    if variant not in VARIANTS:
        raise ExplainError(f"checkpoint {path!r} has variant {variant!r}; expected one of "
                           f"{VARIANTS}")  # fmt: skip
    model = DigitNet(variant)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ExplainError(f"checkpoint {path!r} does not fit a DigitNet({variant!r}): "
                           f"{error}") from None  # fmt: skip
    return model.eval(), variant, dict(checkpoint.get("config") or {})


def load_image(path: str, *, size: int = CANVAS, invert: bool = False) -> Tensor:
    """A PNG / JPEG file as a grayscale ``Tensor[1, size, size]`` in ``[0, 1]``.

    Raises ExplainError naming the file if it is missing or not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ExplainError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as opened:
            gray = opened.convert("L").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ExplainError(f"cannot read image {path!r}: {error}") from None
    pixels = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8)
    image = pixels.view(1, size, size).float() / 255
    return 1 - image if invert else image


def load_rgb_image(path: str, *, invert: bool = False) -> Tensor:
    """A PNG / JPEG file as an RGB ``Tensor[3, H, W]`` in ``[0, 1]`` (its own size; a detector's
    analysis resizes it as the detector does). Raises ExplainError naming the file if it is
    missing or not an image PIL can read."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ExplainError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")
            width, height = rgb.size
            pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ExplainError(f"cannot read image {path!r}: {error}") from None
    image = pixels.view(height, width, 3).permute(2, 0, 1).float() / 255
    return 1 - image if invert else image


def _validation_item(data: str | None, index: int, open_split):
    """``(set, set[index])`` of the validation set ``open_split(data)`` opens in a checkpoint's
    data folder, with an ExplainError naming what is wrong: the folder gone, its data unreadable,
    ``index`` out of range."""
    from deformable.data.folder import DataError

    if not data or not os.path.isdir(data):
        raise ExplainError(f"the checkpoint's data folder {data!r} does not exist (moved, or "
                           "trained elsewhere?); pass an image with --image FILE")  # fmt: skip
    try:
        images = open_split(data)
        if not 0 <= index < len(images):
            raise ExplainError(f"--index must be in [0, {len(images)}) (the validation images of "
                               f"{data!r}), got {index}")  # fmt: skip
        return images, images[index]
    except DataError as error:
        raise ExplainError(f"the checkpoint's data {data!r}: {error}") from None


def validation_scene(data: str | None, index: int) -> tuple[Tensor, str]:
    """``(image [3, H, W], description)``: validation image ``index`` of a detector's COCO folder
    (``data/val``, ``data/annotations_val.json``: the checkpoint's ``data``). Raises
    ExplainError if the folder is gone or ``index`` is out of range."""
    from deformable.data.coco import CocoDetection

    def open_split(root):
        return CocoDetection(os.path.join(root, "val"), os.path.join(root, "annotations_val.json"))

    scenes, (image, target) = _validation_item(data, index, open_split)
    return image, f"validation image {index} ({scenes.images[target['image_id']]['file_name']})"


def validation_segmentation_image(data: str | None, index: int,
                                  image_size: int | None = None) -> tuple[Tensor, str]:  # fmt: skip
    """``(image [3, H, W], description)``: validation image ``index`` of a segmenter's VOC-style
    folder (the checkpoint's ``data``), its longer side resized to ``image_size`` as in training.
    Raises ExplainError if the folder is gone or unreadable or ``index`` is out of range."""
    from deformable.data.segmentation import SegmentationFolder

    images, (image, _) = _validation_item(
        data, index, lambda root: SegmentationFolder(root, "val", image_size=image_size))
    return image, f"validation image {index} ({images.ids[index]})"


def fit_longer_side(image: Tensor, size: int | None) -> Tensor:
    """``image [C, H, W]`` resized (bilinear) so that its longer side is ``size`` (aspect kept), as
    :class:`~deformable.data.segmentation.SegmentationFolder` resizes; as it is if ``size`` is None."""
    if size is None or max(image.shape[-2:]) == size:
        return image
    scale = size / max(image.shape[-2:])
    shape = [max(1, round(side * scale)) for side in image.shape[-2:]]
    return torch.nn.functional.interpolate(image[None], size=shape, mode="bilinear",
                                           align_corners=False)[0]  # fmt: skip
