"""Segmentation scores against a hand-counted confusion matrix; the loss; evaluation over a data
set; a resumed `train segment` run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from deformable.engine import TrainConfig, checkpoint, load_checkpoint, loop
from deformable.engine.segmentation import (confusion_matrix, evaluate_segmentation, segmentation_loss,
                                            segmentation_scores)  # fmt: skip
from deformable.experiments.segmentation import train_segmenter

CLASSES = ["background", "cat", "dog", "bird"]


def test_scores_against_a_hand_counted_matrix():
    # 4 classes; "bird" (3) is in neither the truth nor the predictions; 255 = ignore
    target = torch.tensor([[0, 0, 0, 1], [1, 1, 2, 255], [2, 2, 255, 0]])
    prediction = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 3], [0, 2, 0, 0]])
    # scored pixels (truth, prediction): (0,0) x3 [incl. the last], (0,1), (1,1) x2, (1,2),
    # (2,2) x2, (2,0); the two ignored pixels (predicted 3 and 0) are not counted
    expected = torch.tensor([[3, 1, 0, 0], [0, 2, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    confusion = confusion_matrix(prediction, target, 4)
    assert confusion.dtype == torch.int64 and torch.equal(confusion, expected)
    scores = segmentation_scores(confusion, CLASSES)
    assert list(scores) == ["mIoU", "pixel_accuracy", "IoU/background", "IoU/cat", "IoU/dog", "IoU/bird"]
    # IoU = hits / (truth + predicted - hits): background 3/(4+4-3), cat 2/(3+3-2), dog 2/(3+3-2)
    assert scores["IoU/background"] == pytest.approx(3 / 5)
    assert scores["IoU/cat"] == pytest.approx(2 / 4) and scores["IoU/dog"] == pytest.approx(2 / 4)
    # bird: no union, undefined, left out of the mean (counted as 0 the mean would be 0.4)
    assert math.isnan(scores["IoU/bird"])
    assert scores["mIoU"] == pytest.approx((3 / 5 + 2 / 4 + 2 / 4) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(7 / 10)


def test_a_class_only_predicted_or_only_true_scores_zero():
    target = torch.tensor([0, 0, 1, 1])
    prediction = torch.tensor([0, 2, 0, 0])  # "dog" predicted, never true; "cat" true, never found
    scores = segmentation_scores(confusion_matrix(prediction, target, 4), CLASSES)
    assert scores["IoU/cat"] == 0 and scores["IoU/dog"] == 0 and math.isnan(scores["IoU/bird"])
    assert scores["IoU/background"] == pytest.approx(1 / 4)
    assert scores["mIoU"] == pytest.approx(1 / 12) and scores["pixel_accuracy"] == pytest.approx(1 / 4)
    nothing = segmentation_scores(confusion_matrix(prediction, torch.full((4,), 255), 4), CLASSES)
    assert all(math.isnan(v) for v in nothing.values())


def test_confusion_matrix_exceptions():
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)
    with pytest.raises(ValueError, match=r"outside 0..1 .*\[0, 4\]"):
        confusion_matrix(torch.zeros(2), torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match=r"a confusion matrix of 4 classes is 4x4, got \(3, 3\)"):
        segmentation_scores(torch.zeros(3, 3), CLASSES)


class FixedPrediction(nn.Module):
    """Predicts class ``image[0, y, x]`` (an image carries its own prediction)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, images):
        logits = nn.functional.one_hot(images[:, 0].long(), len(CLASSES)).permute(0, 3, 1, 2).float()
        return {"out": logits + self.weight}


def test_evaluation_sums_one_matrix_over_images_of_any_size():
    # three images of different sizes, evaluated in batches of 2: padding is not scored
    items = [(torch.randint(0, 4, (3, h, w)).float(), torch.randint(0, 4, (h, w))) for h, w in
             ((5, 7), (3, 9), (6, 2))]  # fmt: skip
    items[1][1][0, :4] = 255
    expected = sum(confusion_matrix(image[0].long(), mask, 4) for image, mask in items)
    scores = evaluate_segmentation(FixedPrediction(), items, CLASSES, batch_size=2)
    assert scores == pytest.approx(segmentation_scores(expected, CLASSES), nan_ok=True)
    assert expected.sum() == 35 + 27 - 4 + 12


def test_loss_leaves_out_ignored_pixels_and_adds_the_auxiliary_head():
    logits = torch.randn(2, 4, 3, 3)
    masks = torch.randint(0, 4, (2, 3, 3))
    masks[0, 0] = 255
    model = lambda images: {"out": logits}  # noqa: E731
    value, count = segmentation_loss(model, (torch.zeros(2, 3, 3, 3), masks))
    keep = masks != 255
    expected = nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep])
    assert count == 2 and value.item() == pytest.approx(expected.item(), rel=1e-6)
    with_aux = lambda images: {"out": logits, "aux": 2 * logits}  # noqa: E731
    aux = nn.functional.cross_entropy(2 * logits.permute(0, 2, 3, 1)[keep], masks[keep])
    assert segmentation_loss(with_aux, (torch.zeros(2), masks))[0].item() == pytest.approx((expected + 0.5 * aux).item(), rel=1e-6)
    assert segmentation_loss(model, (torch.zeros(2), torch.full_like(masks, 255)))[0].item() == 0  # not NaN


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    spec = {"task": "segment", "model": "deeplabv3_resnet18", "deform_stages": [5], "modulated": True,
            "output_stride": 16, "atrous_rates": [1, 2], "image_size": 32}  # fmt: skip
    config = TrainConfig(epochs=2, batch_size=3, lr=1e-3, seed=5)
    options = dict(data_root=str(tmp_path), scenes=(3, 2), progress=False)  # one step per epoch
    train_segmenter(spec, "scenes", config, str(tmp_path / "straight"), **options)
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")

    real_save = checkpoint.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise KeyboardInterrupt  # killed right after epoch 1 of 2 was saved

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(spec, "scenes", config, str(tmp_path / "resumed"), **options)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 0
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    history = train_segmenter(spec, "scenes", config, str(tmp_path / "resumed"), resume=True, **options)
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert resumed["epoch"] == 1 and len(history["val_mIoU"]) == 2
    assert resumed["model"].keys() == straight["model"].keys()
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert any("conv_offset" in name for name in straight["model"])  # the deformable layers too
    assert straight["history"]["train_loss"] == resumed["history"]["train_loss"]
    for key in straight["history"]:
        if key != "seconds":
            assert straight["history"][key] == pytest.approx(resumed["history"][key], nan_ok=True, abs=0), key
    with open(tmp_path / "resumed" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
