"""deformable train segment: a tiny run end to end and its evaluation, a tiny ablation, bad data,
a data-parallel run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from deformable.commands import evaluate, train
from deformable.engine import load_checkpoint
from deformable.experiments.segmentation import evaluate_segmenter

TINY = ["--image-size", "32", "--scenes", "4", "2", "--epochs", "1", "--batch-size", "2",
        "--output-stride", "16", "--atrous-rates", "1", "2", "--no-progress"]  # fmt: skip


def test_train_segment_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(["segment", *TINY, "--deform-stages", "4", "5", "--modulated", "--out", str(out)])
    assert code == 0
    state = load_checkpoint(out / "last.pt")
    spec = state["model_spec"]
    assert spec["task"] == "segment" and spec["deform_stages"] == [4, 5] and spec["modulated"]
    assert spec["num_classes"] == 14 and spec["classes"][:2] == ["background", "0"]
    assert state["config"]["offset_lr_mult"] == 0.1 and state["config"]["lr"] == 2e-3  # the measured defaults
    assert state["data"] == str(out / "scenes-32px-4-2")
    assert sum("conv_offset" in k and "layer4" in k for k in state["model"]) > 0
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert {"val/mIoU", "val/pixel_accuracy", "val/IoU/background", "val/IoU/triangle"} <= set(row)
    assert 0 <= float(row["val/pixel_accuracy"]) <= 1 and os.listdir(out / "tensorboard")
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "(2 images, epoch 1)" in printed and "IoU  background " in printed
    # eval scores what training logged
    scores, count = evaluate_segmenter(state)
    assert count == 2 and scores["pixel_accuracy"] == pytest.approx(state["history"]["val_pixel_accuracy"][-1])
    assert f"pixel accuracy {100 * scores['pixel_accuracy']:.1f}" in printed


def test_ablation_writes_its_table_and_figure(tmp_path):
    out = tmp_path / "ablation"
    code = train.main(["segment", "--ablation", *TINY, "--out", str(out)])
    assert code == 0
    table = (out / "ablation.md").read_text()
    for name in ("regular", "dcnv1 conv5", "dcnv1 conv3-5", "dcnv2 conv3-5"):
        assert f"| {name} |" in table
    assert "| class | regular | dcnv1 conv5 | dcnv1 conv3-5 | dcnv2 conv3-5 |" in table
    assert "| triangle |" in table and "(ablation.png)" in table
    image = Image.open(out / "ablation.png")
    assert image.format == "PNG" and image.size[0] > 1000
    specs = [load_checkpoint(out / f"run{i}" / "last.pt")["model_spec"] for i in range(4)]
    assert [(s["deform_stages"], s["modulated"]) for s in specs] == \
        [([], False), ([5], False), ([3, 4, 5], False), ([3, 4, 5], True)]  # fmt: skip
    assert len({s["output_stride"] for s in specs}) == 1  # the settings differ in the backbone only
    # --resume keeps finished runs: nothing is trained again
    before = os.path.getmtime(out / "run3" / "last.pt")
    assert train.main(["segment", "--ablation", *TINY, "--out", str(out), "--resume"]) == 0
    assert os.path.getmtime(out / "run3" / "last.pt") == before


@pytest.mark.parametrize("case", ["split", "range", "one"])
def test_bad_data_is_one_line(tmp_path, capsys, case):
    data = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(data / folder)
    for split, ids in (("train", "abc"), ("val", "d")):
        for id_ in ids:
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "JPEGImages" / f"{id_}.jpg")
            Image.fromarray(np.full((8, 8), 9 if id_ == "d" else 1, np.uint8)).save(
                data / "SegmentationClass" / f"{id_}.png")  # fmt: skip
        if not (case == "split" and split == "val"):
            (data / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids))
    options = {"split": [], "range": ["--num-classes", "5"], "one": ["--batch-size", "2"]}[case]
    code = train.main(["segment", "--data", str(data), "--epochs", "1", "--out", str(tmp_path / "run"),
                       "--no-progress", *options])  # fmt: skip
    err = capsys.readouterr().err
    expected = {"split": "ImageSets/Segmentation/val.txt' does not exist",
                "range": "SegmentationClass/d.png' holds class 9, out of range: 5 classes are 0..4",
                "one": "3 training images per process in batches of 2 leave a batch of one image"}[case]  # fmt: skip
    assert code == 2 and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_two_process_ddp_segmentation(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "deformable.cli", "train", "segment", *TINY, "--scenes", "8", "3", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(out / "last.pt")
    # 8 training images, 2 processes, batch 2: 2 steps per process (4 in one process)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {2.0}
    # the 3 validation images, split over the two processes and scored with rank 0's model
    # (BatchNorm statistics broadcast), score what one process scores with the saved model
    scores, count = evaluate_segmenter(state)
    assert count == 3
    for name, value in scores.items():
        assert value == pytest.approx(state["history"][f"val_{name}"][-1], abs=1e-9, nan_ok=True), name
